"""Plugin machinery: hookspecs, plugin loading, the registry, option parsing, probing.

Includes datasette-style meta-tests: every hookspec has a ``test_hook_<name>`` test here
and is documented in docs/hooks.md with its exact signature.  Test plugins are always
registered through the ``register_plugin`` fixture (unregistered in ``finally``) or on a
fresh PluginManager.
"""
from __future__ import annotations

import errno
import importlib.metadata
import inspect
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ufs import hookspecs, plugins
from ufs.errors import InvalidError, NotSupportedError, PluginError
from ufs.hookspecs import hookimpl
from ufs.registry import (PROBE_SIZE, DeviceType, OptionError, OptionSpec, Personality, Registry,
                          RegistryBuilder, UnknownTypeError, parse_options)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = ROOT / "plugins" / "ufs-example"
HOOK_NAMES = sorted(n for n in dir(hookspecs) if n.startswith("ufs_")
                    and callable(getattr(hookspecs, n)))


@pytest.fixture
def register_plugin():
    """register(obj, name) on the global pm; everything is unregistered afterwards."""
    names = []

    def register(obj, name):
        plugins.pm.register(obj, name=name)
        names.append(name)
        return obj

    try:
        yield register
    finally:
        for name in names:
            if plugins.pm.has_plugin(name):
                plugins.pm.unregister(name=name)


@pytest.fixture
def example_module(monkeypatch):
    """The ufs-example plugin module, imported from the source tree (not pip installed)."""
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    for mod in [m for m in sys.modules if m == "ufs_example" or m.startswith("ufs_example.")]:
        monkeypatch.delitem(sys.modules, mod)
    import ufs_example.plugin
    return ufs_example.plugin


def make_personality(name="testfs", **kw):
    kw.setdefault("magic", b"TESTFS!!")
    kw.setdefault("magic_offset", 1024)
    return Personality(name=name, description="test personality", **kw)


class PersonalityPlugin:
    def __init__(self, *personalities):
        self.personalities = personalities

    @hookimpl
    def ufs_register_personalities(self, register):
        for p in self.personalities:
            register(p)


class FakeDev:
    """Just enough of a BlockDev for probing: counts preads."""

    def __init__(self, data: bytes, logical_block_size=512):
        self.data = data
        self.size = len(data)
        self.logical_block_size = logical_block_size
        self.reads = []

    def pread(self, length, addr):
        assert addr % self.logical_block_size == 0 and length % self.logical_block_size == 0
        assert addr + length <= self.size, "read past the end of the device"
        self.reads.append((addr, length))
        return self.data[addr:addr + length]


# --- Meta-tests (datasette) ---

def test_hookspecs_are_found():
    assert HOOK_NAMES == ["ufs_register_commands", "ufs_register_devices", "ufs_register_personalities"]
    assert set(HOOK_NAMES) == {n for n in dir(plugins.pm.hook) if n.startswith("ufs_")}


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_plugin_hooks_have_tests(hook):
    assert f"test_hook_{hook}" in globals(), f"hook {hook} has no test_hook_{hook} test"


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_plugin_hooks_are_documented(hook):
    doc = (ROOT / "docs" / "hooks.md").read_text()
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"\n## {hook}\n" in doc, f"docs/hooks.md has no '## {hook}' section"
    section = doc.split(f"\n## {hook}\n", 1)[1].split("\n## ", 1)[0]
    assert f"`{hook}({params})`" in section, f"docs/hooks.md does not give the signature {hook}({params})"


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hookspec_docstrings_say_when_and_result(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert ":param " in doc and "When:" in doc and "Result:" in doc


def test_no_installed_entry_point_targets_a_builtin():
    installed = list(importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP))
    assert not [ep for ep in installed if ep.value.startswith("ufs.fs_")]
    plugins.check_entry_points(installed)


def test_check_entry_points_rejects_builtin_targets():
    ep = importlib.metadata.EntryPoint("xfslike", "ufs.fs_xfslike.plugin", "ufs")
    with pytest.raises(PluginError, match="xfslike"):
        plugins.check_entry_points([ep])
    plugins.check_entry_points([importlib.metadata.EntryPoint("example", "ufs_example.plugin", "ufs")])


# --- The hooks ---

def test_hook_ufs_register_personalities(register_plugin):
    seen = {}
    p = make_personality(mkfs=lambda dev, geometry, options: seen.setdefault("mkfs", (dev, options)),
                         options={"lockdep": OptionSpec(bool, False)})
    register_plugin(PersonalityPlugin(p), "testplugin")
    reg = plugins.get_registry()
    got = reg["testfs"]
    assert got.name == "testfs" and got.magic == p.magic
    assert got.source == "test_plugins"          # filled with the plugin's package
    assert reg.providers["testfs"] == "testplugin"
    got.mkfs("dev", None, got.parse_options("lockdep"))
    assert seen["mkfs"] == ("dev", {"lockdep": True})
    row = next(r for r in plugins.get_plugins() if r["name"] == "testplugin")
    assert row["hooks"] == ["ufs_register_personalities"] and row["personalities"] == ["testfs"]


def test_hook_ufs_register_commands(register_plugin):
    class CommandPlugin:
        @hookimpl
        def ufs_register_commands(self, cli):
            @cli.command(name="hello")
            @click.argument("who")
            def hello(who):
                click.echo(f"hello {who}")

    register_plugin(CommandPlugin(), "cmdplugin")

    @click.group()
    def cli():
        pass

    plugins.register_commands(cli)
    result = CliRunner().invoke(cli, ["hello", "ufs"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello ufs\n"


def test_hook_ufs_register_devices(register_plugin):
    opened = []

    def open_mem(path, *, read_only=False, **options):
        opened.append((path, read_only, options))
        return FakeDev(bytes(4096))

    class DevPlugin:
        @hookimpl
        def ufs_register_devices(self, register):
            register(DeviceType(name="memdev", open=open_mem, description="test memory device"))

    register_plugin(DevPlugin(), "devplugin")
    reg = plugins.get_registry()
    dev = reg.device_type("memdev").open("x.img", read_only=True, depth=4)
    assert isinstance(dev, FakeDev) and opened == [("x.img", True, {"depth": 4})]
    assert reg.device_providers["memdev"] == "devplugin"
    with pytest.raises(UnknownTypeError) as ei:
        reg.device_type("nosuch")
    assert ei.value.errno == errno.ENODEV
    row = next(r for r in plugins.get_plugins() if r["name"] == "devplugin")
    assert row["devices"] == ["memdev"] and row["hooks"] == ["ufs_register_devices"]


# --- Registry validation ---

def test_duplicate_personality_names_both_plugins(register_plugin):
    register_plugin(PersonalityPlugin(make_personality()), "first-plugin")
    register_plugin(PersonalityPlugin(make_personality()), "second-plugin")
    with pytest.raises(PluginError) as ei:
        plugins.get_registry()
    msg = str(ei.value)
    assert "'testfs'" in msg and "first-plugin" in msg and "second-plugin" in msg


def test_duplicate_device_names_both_plugins():
    b = RegistryBuilder()
    b.add_device(DeviceType("d", open=print), plugin="p1")
    with pytest.raises(PluginError, match=r"'d'.*'p1'.*'p2'"):
        b.add_device(DeviceType("d", open=print), plugin="p2")


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="Bad Name"), "name"),
    (dict(name=""), "name"),
    (dict(magic="text"), "magic must be bytes"),
    (dict(magic_offset=PROBE_SIZE - 4), "outside the first"),
    (dict(magic_offset=-1), "outside the first"),
    (dict(mkfs="not callable"), "mkfs must be callable"),
    (dict(probe=42), "probe must be callable"),
    (dict(options={"x": int}), "option 'x' must be an OptionSpec"),
    (dict(options={"a,b": OptionSpec()}), "bad option name"),
])
def test_personality_validation(kwargs, match):
    with pytest.raises(PluginError, match=match):
        make_personality(**kwargs)


def test_register_rejects_non_personality_naming_plugin():
    b = RegistryBuilder()
    with pytest.raises(PluginError, match="plugin 'sloppy'"):
        b.personality_callback("sloppy")({"name": "x"})


def test_registry_is_immutable_and_unknown_type_is_enodev():
    reg = Registry({"testfs": make_personality()})
    with pytest.raises(TypeError):
        reg["other"] = make_personality("other")
    with pytest.raises(TypeError):
        reg.devices["x"] = None
    with pytest.raises(UnknownTypeError, match="unknown filesystem type 'nosuch'.*testfs") as ei:
        reg.personality("nosuch")
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENODEV
    with pytest.raises(PluginError):
        Registry({"wrongkey": make_personality()})
    with pytest.raises(TypeError):
        make_personality().options["new"] = OptionSpec()


# --- Options ---

OPTS = {
    "lockdep": OptionSpec(bool, False, help="check locks"),
    "agcount": OptionSpec(int, 4),
    "dio_complete": OptionSpec(str, "unlocked", choices=("unlocked", "locked", "marker")),
    "ratio": OptionSpec(float, 1.0),
}


def test_parse_options_values_and_defaults():
    p = make_personality(options=OPTS)
    assert parse_options(p, None) == {"lockdep": False, "agcount": 4, "dio_complete": "unlocked", "ratio": 1.0}
    assert parse_options(p, "") == parse_options(p, None)
    got = parse_options(p, "lockdep, agcount=0x10,dio_complete=marker,agcount=8,ratio=0.5")
    assert got == {"lockdep": True, "agcount": 8, "dio_complete": "marker", "ratio": 0.5}
    assert parse_options(p, "lockdep=off")["lockdep"] is False
    assert parse_options(p, {"lockdep": True, "agcount": "16"}) == dict(got, agcount=16, dio_complete="unlocked",
                                                                         ratio=1.0)


@pytest.mark.parametrize("text,words", [
    ("nosuch=1", ["nosuch"]),
    ("lockdep,bogus", ["bogus"]),
    ("agcount=four", ["agcount", "four"]),
    ("agcount", ["agcount", "no value"]),
    ("lockdep=maybe", ["lockdep", "maybe"]),
    ("dio_complete=sideways", ["dio_complete", "sideways", "unlocked"]),
    ("ratio=x", ["ratio", "'x'"]),
])
def test_parse_options_errors_name_key_and_value(text, words):
    p = make_personality(options=OPTS)
    with pytest.raises(OptionError) as ei:
        parse_options(p, text)
    e = ei.value
    assert isinstance(e, InvalidError) and isinstance(e, PluginError) and e.errno == errno.EINVAL
    for w in words:
        assert w in str(e)


def test_parse_options_rejects_float_for_int_and_bool_for_int():
    p = make_personality(options=OPTS)
    with pytest.raises(OptionError, match="agcount"):
        parse_options(p, {"agcount": 2.5})
    with pytest.raises(OptionError, match="agcount"):
        parse_options(p, {"agcount": True})
    with pytest.raises(OptionError):
        parse_options(p, 42)


# --- Probing ---

def test_probe_reads_once_and_matches_magic():
    a = make_personality("afs", magic=b"AFSMAGIC", magic_offset=1024)
    b = make_personality("bfs", magic=b"BFS", magic_offset=PROBE_SIZE - 3)
    reg = Registry({"afs": a, "bfs": b})
    img = bytearray(1 << 20)
    img[1024:1032] = b"AFSMAGIC"
    dev = FakeDev(bytes(img))
    assert reg.probe(dev) is a
    assert dev.reads == [(0, PROBE_SIZE)]
    img[PROBE_SIZE - 3:PROBE_SIZE] = b"BFS"
    with pytest.raises(PluginError, match="ambiguous.*'afs'.*'bfs'"):
        reg.probe(FakeDev(bytes(img)))
    assert reg.probe(FakeDev(bytes(1 << 20))) is None


def test_probe_small_device_and_custom_probe():
    seen = []

    def probe(buf):
        seen.append(len(buf))
        return buf[:2] == b"OK"

    p = make_personality("custom", magic=b"", probe=probe)
    reg = Registry({"custom": p})
    dev = FakeDev(b"OK" + bytes(5000), logical_block_size=4096)   # 5002 bytes: one whole block
    assert reg.probe(dev) is p
    assert dev.reads == [(0, 4096)] and seen == [4096]
    assert reg.probe(FakeDev(b"")) is None
    assert not make_personality("nomagic", magic=b"").matches(bytes(100))


# --- Loading ---

def write_module(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text(body)
    return name


PLUGIN_BODY = '''
from ufs.hookspecs import hookimpl
from ufs.registry import Personality

@hookimpl
def ufs_register_personalities(register):
    register(Personality(name={name!r}, magic=b"M" + {name!r}.encode()))
'''


@pytest.fixture
def fake_modules(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    made = []

    def make(name, body):
        made.append(write_module(tmp_path, name, body))
        return name

    yield make
    for name in made:
        sys.modules.pop(name, None)


def test_default_plugins_missing_modules_are_skipped():
    fresh = plugins.make_plugin_manager()
    got = plugins.load_into(fresh, defaults={"a": "ufs_no_such_pkg.plugin", "b": "ufs.fs_nosuch.plugin",
                                             "c": "ufs.no_such_module"}, environ={})
    assert got == [] and fresh.get_plugins() == set()


def test_default_plugin_import_error_inside_propagates(fake_modules):
    fake_modules("ufs_broken_dep", "import ufs_dependency_that_is_not_there\n")
    fake_modules("ufs_broken_raise", "raise ImportError('broken on purpose')\n")
    with pytest.raises(ModuleNotFoundError, match="ufs_dependency_that_is_not_there"):
        plugins.load_into(plugins.make_plugin_manager(), defaults={"x": "ufs_broken_dep"}, environ={})
    with pytest.raises(ImportError, match="broken on purpose"):
        plugins.load_into(plugins.make_plugin_manager(), defaults={"x": "ufs_broken_raise"}, environ={})


def test_ufs_load_plugins_restricts(fake_modules):
    defaults = {"one": fake_modules("ufs_fake_one", PLUGIN_BODY.format(name="one")),
                "two": fake_modules("ufs_fake_two", PLUGIN_BODY.format(name="two"))}
    for env, want in [({}, ["one", "two"]), ({"UFS_LOAD_PLUGINS": "two"}, ["two"]),
                      ({"UFS_LOAD_PLUGINS": " one , nope"}, ["one"]), ({"UFS_LOAD_PLUGINS": ""}, [])]:
        fresh = plugins.make_plugin_manager()
        assert plugins.load_into(fresh, defaults=defaults, environ=env) == want
        assert list(plugins.get_registry(fresh)) == want
    # loading twice registers nothing new
    fresh = plugins.make_plugin_manager()
    plugins.load_into(fresh, defaults=defaults, environ={})
    assert plugins.load_into(fresh, defaults=defaults, environ={}) == []


def test_misspelled_hook_fails_at_load(fake_modules):
    body = "from ufs.hookspecs import hookimpl\n\n@hookimpl\ndef ufs_register_personality(register):\n    pass\n"
    mod = fake_modules("ufs_fake_typo", body)
    with pytest.raises(PluginError, match="ufs_register_personality"):
        plugins.load_into(plugins.make_plugin_manager(), defaults={"typo": mod}, environ={})


def test_trace_plugins_prints_hook_calls(fake_modules, capsys):
    mod = fake_modules("ufs_fake_traced", PLUGIN_BODY.format(name="traced"))
    fresh = plugins.make_plugin_manager()
    plugins.load_into(fresh, defaults={"traced": mod}, environ={"UFS_TRACE_PLUGINS": "1"})
    plugins.get_registry(fresh)
    err = capsys.readouterr().err
    assert "ufs-plugins: call ufs_register_personalities(register=function) -> [traced]" in err
    assert "ufs-plugins: done ufs_register_personalities" in err and ": ok" in err


def test_entry_points_skipped_under_test_guard(monkeypatch, example_module):
    assert sys._called_from_test is True
    ep = importlib.metadata.EntryPoint("example", "ufs_example.plugin", "ufs")
    monkeypatch.setattr(plugins, "_entry_points", lambda: [ep])
    fresh = plugins.make_plugin_manager()
    assert plugins.load_into(fresh, defaults={}, environ={}) == []
    # Outside the guard the same entry point loads, and UFS_LOAD_PLUGINS applies to it.
    assert plugins.load_into(plugins.make_plugin_manager(), defaults={}, environ={"UFS_LOAD_PLUGINS": "x"},
                             entry_points=True) == []
    assert plugins.load_into(fresh, defaults={}, environ={}, entry_points=True) == ["example"]
    reg = plugins.get_registry(fresh)
    assert reg["example"].source == "ufs_example" and reg.providers["example"] == "example"
    rows = plugins.get_plugins(fresh)
    assert rows == [{"name": "example", "version": "", "package": "ufs_example",
                     "hooks": ["ufs_register_personalities"], "personalities": ["example"], "devices": []}]


def test_entry_point_pointing_at_builtin_refused_at_load(monkeypatch):
    ep = importlib.metadata.EntryPoint("xfslike", "ufs.fs_xfslike.plugin", "ufs")
    monkeypatch.setattr(plugins, "_entry_points", lambda: [ep])
    with pytest.raises(PluginError, match="built-in"):
        plugins.load_into(plugins.make_plugin_manager(), defaults={}, environ={}, entry_points=True)


def test_builtin_default_plugins_load_and_register_their_own_name():
    # Works both before the built-in personalities exist (all skipped) and after.
    fresh = plugins.make_plugin_manager()
    loaded = plugins.load_into(fresh, environ={})
    assert set(loaded) <= set(plugins.DEFAULT_PLUGINS)
    reg = plugins.get_registry(fresh)
    for name in loaded:
        assert name in reg, f"built-in plugin {name!r} must register a personality of the same name"
        assert reg[name].source == "ufs"


# --- The third-party example ---

def test_example_plugin_loaded_by_registering_module(register_plugin, example_module):
    register_plugin(example_module, "example")
    reg = plugins.get_registry()
    ex = reg["example"]
    assert ex.source == "ufs_example" and reg.providers["example"] == "example"
    assert reg.probe(FakeDev(b"UFSEXMPL" + bytes(8192 - 8))) is ex
    assert ex.parse_options("verbose=2") == {"lockdep": False, "verbose": 2}
    with pytest.raises(OptionError, match="verbose"):
        ex.parse_options("verbose=3")
    for call in (lambda: ex.mkfs(None, None, {}), lambda: ex.mount(None, {}, False),
                 lambda: ex.fsck(None, False)):
        with pytest.raises(NotSupportedError):
            call()
    row = next(r for r in plugins.get_plugins() if r["name"] == "example")
    assert row["package"] == "ufs_example" and row["personalities"] == ["example"]


def test_example_package_declares_entry_point():
    import tomllib

    meta = tomllib.loads((EXAMPLE_DIR / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["ufs"] == {"example": "ufs_example.plugin"}


def test_int_option_and_the_shared_vfs_options():
    from ufs.registry import VFS_OPTIONS, int_option
    from ufs.vfs.super import DEFAULT_INODE_CACHE

    conv = int_option(1024, 65536, pow2=True)
    assert conv("0x4000") == 16384 and conv(2048) == 2048
    for bad in ("3000", "512", "131072", "x"):
        with pytest.raises(ValueError):
            conv(bad)
    assert int_option(1)("7") == 7
    with pytest.raises(ValueError):
        int_option(1)("0")
    # the help states the VFS's real default
    assert f"default {DEFAULT_INODE_CACHE};" in VFS_OPTIONS["inode_cache"].help
    for name in ("xfslike", "btrfslike"):
        from ufs.plugins import get_registry
        pers = get_registry()[name]
        assert pers.options["inode_cache"] is VFS_OPTIONS["inode_cache"]
        assert pers.options["lockdep"] is VFS_OPTIONS["lockdep"]

"""The plugin manager: which plugins load, in what order, and the registry they build.

Layer: plugin machinery.  Imports pluggy, ``ufs.hookspecs``, ``ufs.registry`` and
``ufs.errors``.  Personalities are named here only as strings (``DEFAULT_PLUGINS``) or
reached through entry points; nothing imports a personality module directly.

Sources of plugins, in loading order (``load_plugins()``, lazily, once per process):
1. ``DEFAULT_PLUGINS``: the built-in personalities, each registered under its short
   name (which is also its personality name).  A built-in whose module does not exist
   (yet) is skipped silently; an ``ImportError`` raised *inside* an existing module
   propagates: a broken personality must not vanish quietly.
2. Entry points of group ``"ufs"`` (third-party packages, e.g. ``plugins/ufs-example``),
   except while running the test suite (``sys._called_from_test``, set by
   ``tests/conftest.py``), so installed plugins never leak into tests.  Built-ins must
   never be declared as entry points (pluggy would refuse the second registration of
   the same module); :func:`check_entry_points` rejects ``ufs.fs_*`` targets.

Environment:
- ``UFS_LOAD_PLUGINS=a,b``: load only the plugins with these names (built-in short
  names and entry-point names alike); ``UFS_LOAD_PLUGINS=`` (empty) loads none.
- ``UFS_TRACE_PLUGINS=1``: print every hook call (plugins called, arguments, duration,
  outcome) to stderr.

After loading, ``pm.check_pending()`` turns a hook implementation whose name matches no
hookspec (a typo) into a :class:`PluginError` at start-up.

Cost rule: hooks run at registration and mount time only.  :func:`get_registry` calls
the registration hooks and returns a frozen :class:`~ufs.registry.Registry`; a mount
keeps what it needs from it and never calls pluggy again.

Thread safety: loading is serialised by a module lock; the registry is immutable.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import threading
import time
from typing import Any
from collections.abc import Iterable, Mapping

import pluggy

from ufs import hookspecs
from ufs.errors import PluginError
from ufs.registry import Registry, RegistryBuilder

__all__ = ["pm", "DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "make_plugin_manager", "load_plugins",
           "load_into", "check_entry_points", "get_registry", "get_plugins", "register_commands"]

#: Built-in personalities: short name (= plugin name = personality name) -> module.
DEFAULT_PLUGINS: dict[str, str] = {
    "xfslike": "ufs.fs_xfslike.plugin",
    "btrfslike": "ufs.fs_btrfslike.plugin",
}

ENTRY_POINT_GROUP = "ufs"

_BUILTIN_PREFIX = "ufs.fs_"


def make_plugin_manager() -> pluggy.PluginManager:
    """A fresh PluginManager for project ``"ufs"`` with the ufs hookspecs added."""
    manager = pluggy.PluginManager("ufs")
    manager.add_hookspecs(hookspecs)
    return manager


#: The process-wide plugin manager.
pm = make_plugin_manager()

_lock = threading.RLock()
_loaded = False
# (plugin name, id(plugin)) -> (package, version) for plugins loaded by load_into
# (built-ins and entry points); other plugins are described from their module.
_origin: dict[tuple[str, int], tuple[str, str]] = {}
_tracing: dict[int, Any] = {}          # id(manager) -> undo function of the hook monitor


# --- Loading ---

def _ufs_version() -> str:
    pkg = sys.modules.get("ufs")
    return getattr(pkg, "__version__", "") if pkg is not None else ""


def _allowed_names(environ: Mapping[str, str]) -> set[str] | None:
    raw = environ.get("UFS_LOAD_PLUGINS")
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _import_builtin(modname: str):
    """Import a DEFAULT_PLUGINS module; None if that module (or its package) does not exist."""
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        # Only "this module is missing" is silent.  e.name is the module that could not
        # be found; anything else (a missing dependency of an existing plugin module)
        # is a real error.
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            return None
        raise


def _entry_points() -> list:
    """Entry points of the ``ufs`` group (a function so tests can substitute it)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def check_entry_points(entry_points: Iterable) -> None:
    """Reject entry points that point at a built-in ``ufs.fs_*`` module.

    Built-ins load from ``DEFAULT_PLUGINS``; declaring them as entry points too would
    register the same module twice (pluggy raises "Plugin already registered under a
    different name").  Raises :class:`PluginError` naming the entry point.
    """
    for ep in entry_points:
        if ep.value.split(":", 1)[0].startswith(_BUILTIN_PREFIX):
            raise PluginError(f"entry point {ep.name!r} = {ep.value!r} in group {ep.group!r} points at "
                              "a built-in personality; built-ins load from ufs.plugins.DEFAULT_PLUGINS")


def _enable_tracing(manager: pluggy.PluginManager) -> None:
    if id(manager) in _tracing:
        return
    starts = threading.local()

    def before(hook_name, hook_impls, kwargs):
        names = ", ".join(impl.plugin_name for impl in hook_impls) or "-"
        args = ", ".join(f"{k}={type(v).__name__}" for k, v in kwargs.items())
        print(f"ufs-plugins: call {hook_name}({args}) -> [{names}]", file=sys.stderr, flush=True)
        starts.__dict__.setdefault("stack", []).append(time.perf_counter())

    def after(outcome, hook_name, hook_impls, kwargs):
        elapsed_ms = (time.perf_counter() - starts.stack.pop()) * 1e3
        status = "ok" if outcome.exception is None else f"raised {outcome.exception!r}"
        print(f"ufs-plugins: done {hook_name} in {elapsed_ms:.3f} ms: {status}", file=sys.stderr, flush=True)

    _tracing[id(manager)] = manager.add_hookcall_monitoring(before, after)


def load_into(manager: pluggy.PluginManager, *, defaults: Mapping[str, str] = DEFAULT_PLUGINS,
              environ: Mapping[str, str] | None = None, entry_points: bool | None = None) -> list[str]:
    """Load built-ins and entry-point plugins into ``manager``; return the names registered.

    The worker behind :func:`load_plugins`, exposed so tests can load into a fresh
    manager.  ``environ`` defaults to ``os.environ``; ``entry_points`` defaults to "not
    under the test guard".  Plugins already registered (or blocked) under a name are
    skipped, so calling it twice is harmless.
    """
    environ = os.environ if environ is None else environ
    if entry_points is None:
        entry_points = not getattr(sys, "_called_from_test", False)
    allowed = _allowed_names(environ)
    registered: list[str] = []

    for name, modname in defaults.items():
        if allowed is not None and name not in allowed:
            continue
        if manager.has_plugin(name) or manager.is_blocked(name):
            continue
        module = _import_builtin(modname)
        if module is None or manager.is_registered(module):
            continue
        manager.register(module, name=name)
        _origin[(name, id(module))] = ("ufs", _ufs_version())
        registered.append(name)

    if entry_points:
        eps = _entry_points()
        check_entry_points(eps)
        for ep in eps:
            if allowed is not None and ep.name not in allowed:
                continue
            if manager.has_plugin(ep.name) or manager.is_blocked(ep.name):
                continue
            plugin = ep.load()
            manager.register(plugin, name=ep.name)
            dist = getattr(ep, "dist", None)
            if dist is not None:
                origin = (dist.metadata["Name"] or ep.module.split(".")[0], dist.version or "")
            else:
                origin = (ep.module.split(".")[0], "")
            _origin[(ep.name, id(plugin))] = origin
            registered.append(ep.name)

    if environ.get("UFS_TRACE_PLUGINS", "") not in ("", "0"):
        _enable_tracing(manager)
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {e.plugin!r}: {e}") from e
    return registered


def load_plugins() -> None:
    """Load every plugin into :data:`pm`, once per process (later calls do nothing)."""
    global _loaded
    with _lock:
        if _loaded:
            return
        load_into(pm)
        _loaded = True


# --- What plugins provide ---

def _package_of(manager: pluggy.PluginManager, name: str, plugin: object) -> tuple[str, str]:
    """(package, version) of a registered plugin."""
    if (name, id(plugin)) in _origin:
        return _origin[(name, id(plugin))]
    modname = plugin.__name__ if isinstance(plugin, type(sys)) else type(plugin).__module__
    package = modname.split(".")[0]
    if package == "ufs":
        return "ufs", _ufs_version()
    try:
        return package, importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return package, ""


def _call_each(manager: pluggy.PluginManager, hook_name: str, make_register) -> None:
    # One call per implementing plugin, so each register callback knows its plugin.
    # subset_hook_caller keeps the call inside pluggy (monitoring, argument checks).
    caller = getattr(manager.hook, hook_name)
    plugins = manager.get_plugins()
    for impl in reversed(caller.get_hookimpls()):       # pluggy's own call order (LIFO)
        others = [p for p in plugins if p is not impl.plugin]
        package, _ = _package_of(manager, impl.plugin_name, impl.plugin)
        manager.subset_hook_caller(hook_name, others)(register=make_register(impl.plugin_name, package))


def get_registry(manager: pluggy.PluginManager | None = None) -> Registry:
    """Call the registration hooks of every loaded plugin; return the frozen Registry.

    Raises :class:`PluginError` for a malformed record or a name registered by two
    plugins (the message names both).  Builds a new Registry on each call (mount time:
    cheap enough, and it sees plugins registered since the last call).
    """
    if manager is None:
        load_plugins()
        manager = pm
    builder = RegistryBuilder()
    _call_each(manager, "ufs_register_personalities", builder.personality_callback)
    _call_each(manager, "ufs_register_devices", builder.device_callback)
    return builder.build()


def get_plugins(manager: pluggy.PluginManager | None = None) -> list[dict[str, Any]]:
    """One dict per loaded plugin for ``ufs plugins``, sorted by name.

    Keys: ``name``, ``version``, ``package``, ``hooks`` (hook names it implements),
    ``personalities`` and ``devices`` (names it registered).
    """
    if manager is None:
        load_plugins()
        manager = pm
    registry = get_registry(manager)
    rows = []
    for name, plugin in sorted(manager.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:                      # blocked name
            continue
        package, version = _package_of(manager, name, plugin)
        callers = manager.get_hookcallers(plugin) or []
        rows.append({
            "name": name,
            "version": version,
            "package": package,
            "hooks": sorted(c.name for c in callers),
            "personalities": sorted(p for p, who in registry.providers.items() if who == name),
            "devices": sorted(d for d, who in registry.device_providers.items() if who == name),
        })
    return rows


def register_commands(cli) -> None:
    """Let every plugin add subcommands to the click group ``cli`` (once, at start-up)."""
    load_plugins()
    pm.hook.ufs_register_commands(cli=cli)

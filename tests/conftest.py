"""Shared test set-up for ufs.

Kept small on purpose.  It holds:
- the build-staleness guard: at session start, stop with a clear message if a
  ``ufs/iomap/*.pyx`` has no built module, or its module is older than the ``.pyx``, its
  ``.pxd``, a ``.pxd``/``.pxi`` it cimports/includes (transitively) or a header under
  ``ufs/iomap/include/`` it uses ("run make build").  ``UFS_SKIP_BUILD_CHECK=1`` skips it
  (for someone mid-edit on another module);
- the plugin test guard: ``sys._called_from_test = True`` before anything imports
  ``ufs.plugins`` (installed entry-point plugins are not loaded in tests), and an autouse
  check that a test leaves the global plugin manager as it found it;
- the ``root`` marker: tests marked ``@pytest.mark.root`` (or using the
  ``needs_root_loop`` fixture) skip with a reason unless running as root with loop
  devices.
"""
from __future__ import annotations

import importlib.machinery
import os
import re
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import pytest

# Before any ufs.plugins import: entry points are skipped under this guard (datasette/llm).
sys._called_from_test = True

ROOT = Path(__file__).resolve().parent.parent
FUSE = ROOT / "ufs" / "fuse"
IOMAP = ROOT / "ufs" / "iomap"


# --- Build staleness ---

_CIMPORT_RE = re.compile(
    r"^\s*(?:from\s+([\w.]+)\s+cimport\b|cimport\s+([\w.]+(?:\s*,\s*[\w.]+)*))", re.M)
_INCLUDE_RE = re.compile(r"""^\s*include\s+["']([^"']+)["']""", re.M)
_EXTERN_RE = re.compile(r"""^\s*cdef\s+extern\s+from\s+["']([^"']+)["']""", re.M)


def _local_pxd(modname: str, here: Path, iomap_dir: Path) -> Path | None:
    """The ufs/iomap .pxd a cimport names, or None for Cython/libc/cpython ones."""
    if modname.startswith("."):
        cand = here / (modname.lstrip(".").replace(".", "/") + ".pxd")
    elif modname.startswith("ufs.iomap."):
        cand = iomap_dir / (modname[len("ufs.iomap."):].replace(".", "/") + ".pxd")
    else:
        cand = here / (modname.replace(".", "/") + ".pxd")
    return cand if cand.is_file() else None


def build_dependencies(source: Path, iomap_dir: Path = IOMAP) -> set[Path]:
    """Every local file the module built from ``source`` (.pyx) depends on."""
    seen: set[Path] = set()
    todo = [source]
    own_pxd = source.with_suffix(".pxd")
    if own_pxd.is_file():
        todo.append(own_pxd)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path.suffix == ".h":
            continue
        text = path.read_text(errors="replace")
        for m in _CIMPORT_RE.finditer(text):
            names = [m.group(1)] if m.group(1) else [n.strip() for n in m.group(2).split(",")]
            for name in names:
                pxd = _local_pxd(name.split(" as ")[0].strip(), path.parent, iomap_dir)
                if pxd is not None:
                    todo.append(pxd)
        for m in _INCLUDE_RE.finditer(text):
            inc = path.parent / m.group(1)
            if inc.is_file():
                todo.append(inc)
        for m in _EXTERN_RE.finditer(text):
            for hdr in (iomap_dir / "include" / m.group(1), path.parent / m.group(1)):
                if hdr.is_file():
                    todo.append(hdr)
    return seen


def stale_extensions(iomap_dir: Path = IOMAP, optional_dirs: tuple = (FUSE,)) -> list[str]:
    """Problems with the in-place build: one line per missing or out-of-date module.

    Modules under ``iomap_dir`` are required.  Those under ``optional_dirs`` (the native FUSE
    loop, built only where libfuse3-dev is installed) are checked only when they were built.
    """
    problems = []
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    sources = [(pyx, True) for pyx in sorted(iomap_dir.glob("*.pyx"))]
    sources += [(pyx, False) for d in optional_dirs for pyx in sorted(d.glob("*.pyx"))]
    for pyx, required in sources:
        built = [p for s in suffixes if (p := pyx.with_name(pyx.stem + s)).is_file()]
        if not built:
            if required:
                problems.append(f"{rel(pyx)}: no built module")
            continue
        so_mtime = max(p.stat().st_mtime for p in built)
        newer = sorted(rel(d) for d in build_dependencies(pyx, iomap_dir) if d.stat().st_mtime > so_mtime)
        if newer:
            problems.append(f"{rel(pyx)}: built module is older than {', '.join(newer)}")
    return problems


def pytest_sessionstart(session):
    if os.environ.get("UFS_SKIP_BUILD_CHECK") == "1":
        return
    problems = stale_extensions()
    if problems:
        pytest.exit("the Cython build is stale or incomplete; run `make build` "
                    "(or scripts/build-one.sh MOD ...)\n  " + "\n  ".join(problems)
                    + "\n(UFS_SKIP_BUILD_CHECK=1 skips this check)", returncode=3)


# --- Plugin guard ---

@pytest.fixture(autouse=True)
def _plugin_manager_unchanged():
    """Fail a test that leaves plugins registered on ufs.plugins.pm (after removing them)."""
    plugins = sys.modules.get("ufs.plugins")
    before = dict(plugins.pm.list_name_plugin()) if plugins else None
    yield
    plugins = sys.modules.get("ufs.plugins")
    if plugins is None:
        return
    before = before or {}

    def builtin(name, plugin):     # load_plugins() may run for the first time in any test
        return name in plugins.DEFAULT_PLUGINS and getattr(plugin, "__name__", None) == plugins.DEFAULT_PLUGINS[name]

    leaked = [n for n, p in plugins.pm.list_name_plugin()
              if p is not None and before.get(n) is not p and not builtin(n, p)]
    for name in leaked:
        plugins.pm.unregister(name=name)
    assert not leaked, f"test left plugins registered on ufs.plugins.pm: {leaked} (unregister in finally)"


# --- root / loop devices ---

@lru_cache(maxsize=1)
def root_loop_unavailable() -> str | None:
    """None when tests may use root and loop devices, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control missing)"
    if shutil.which("losetup") is None:
        return "needs losetup (util-linux)"
    return None


@pytest.fixture
def needs_root_loop():
    """Skip the test (with the reason) unless root and loop devices are available."""
    reason = root_loop_unavailable()
    if reason:
        pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    reason = root_loop_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)

"""Source meta-tests: layer import rules, module docstrings, ruff, the build guard.

Layer rules (DESIGN.md §1, CORE-API.md §1) are checked by parsing every module under
``ufs/`` (``ast`` for .py; a regex on import/cimport lines for .pyx/.pxd), so a
forbidden edge fails here even if nothing executes it.  Imports under
``if TYPE_CHECKING:`` are not runtime edges and are ignored; imports inside functions
are edges.
"""
from __future__ import annotations

import ast
import importlib.machinery
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import stale_extensions

ROOT = Path(__file__).resolve().parent.parent


# --- Collecting imports ---

def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path, root: Path) -> str:
    name = module_name(path, root)
    return name if path.stem == "__init__" else name.rpartition(".")[0]


def _resolve(path: Path, root: Path, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = _package_of(path, root).split(".")
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def py_imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every runtime import in a .py file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit_stmt(sub)
                continue
            visit_stmt(child)

    def visit_stmt(node):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(path, root, node.level, node.module)
            for a in node.names:
                # "from ufs import errors" names a submodule; "from ufs.x import y" the module
                out.append((node.lineno, f"{base}.{a.name}" if base == "ufs" or not node.module else base))
        visit(node)

    visit(tree)
    return out


_PYX_IMPORT = re.compile(
    r"^\s*(?:from\s+(?P<from>\.*[\w.]*)\s+c?import\s+(?P<names>[^#\n]+)|c?import\s+(?P<mods>[\w.]+(?:\s*,\s*[\w.]+)*))",
    re.M)


def pyx_imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported module) for import/cimport lines of a .pyx/.pxd file."""
    text = path.read_text()
    out = []
    for m in _PYX_IMPORT.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group("from") is not None:
            spec = m.group("from")
            level = len(spec) - len(spec.lstrip("."))
            base = _resolve(path, root, level, spec.lstrip(".") or None)
            if base == "ufs" or not spec.lstrip("."):
                names = [n.strip().split(" ")[0] for n in m.group("names").strip("() ").split(",")]
                out.extend((line, f"{base}.{n}") for n in names if n)
            else:
                out.append((line, base))
        else:
            out.extend((line, n.strip()) for n in m.group("mods").split(","))
    return out


def source_files(root: Path, suffixes=(".py", ".pyx", ".pxd")) -> list[Path]:
    return sorted(p for p in (root / "ufs").rglob("*") if p.suffix in suffixes and p.is_file()
                  and "__pycache__" not in p.parts)


# --- The rules ---

def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (None when allowed)."""
    if not _under(imported, "ufs"):
        return None
    if _under(importer, "ufs.iomap"):
        if not (_under(imported, "ufs.errors") or _under(imported, "ufs.iomap")):
            return "ufs/iomap imports nothing from ufs except ufs.errors"
    elif _under(importer, "ufs.vfs"):
        if not any(_under(imported, p) for p in ("ufs.errors", "ufs.iomap", "ufs.vfs")):
            return "ufs/vfs may import only ufs.iomap and ufs.errors"
    elif importer.startswith("ufs.fs_"):
        own = ".".join(importer.split(".")[:2])
        if imported.startswith("ufs.fs_") and not _under(imported, own):
            return "personalities never import each other"
        for bad in ("ufs.cli", "ufs.fuse", "ufs.api", "ufs.plugins", "ufs.testing"):
            if _under(imported, bad):
                return f"personalities never import {bad}"
    elif importer in ("ufs.hookspecs", "ufs.registry", "ufs.plugins"):
        if not any(_under(imported, p) for p in ("ufs.errors", "ufs.hookspecs", "ufs.registry")):
            return "plugin machinery imports only ufs.errors/hookspecs/registry (personalities by name)"
    elif importer == "ufs.errors":
        return "ufs.errors is the bottom layer"
    if _under(imported, "ufs.cli") and importer not in ("ufs.__main__", "ufs.cli"):
        return "only ufs.__main__ imports the CLI"
    return None


def layer_violations(root: Path) -> list[str]:
    out = []
    for path in source_files(root):
        importer = module_name(path, root)
        imports = py_imports(path, root) if path.suffix == ".py" else pyx_imports(path, root)
        for line, imported in imports:
            why = forbidden(importer, imported)
            if why:
                out.append(f"{path.relative_to(root)}:{line}: {importer} imports {imported}: {why}")
    return out


def missing_docstrings(root: Path) -> list[str]:
    out = []
    for path in source_files(root, (".py", ".pyx")):
        text = path.read_text()
        if path.suffix == ".py":
            if not ast.get_docstring(ast.parse(text)):
                out.append(str(path.relative_to(root)))
            continue
        lines = [ln.strip() for ln in text.splitlines()]
        body = [ln for ln in lines if ln and not re.match(r"#\s*(cython|distutils):", ln)]
        if not body or not (body[0].startswith(("#", '"""', "'''", 'r"""'))):
            out.append(str(path.relative_to(root)))
    return out


# --- Tests ---

def test_layer_imports():
    violations = layer_violations(ROOT)
    assert not violations, "forbidden imports:\n" + "\n".join(violations)


def test_every_module_has_a_docstring():
    missing = missing_docstrings(ROOT)
    assert not missing, "modules without a leading docstring/comment block: " + ", ".join(missing)


def test_layer_checker_catches_violations(tmp_path):
    files = {
        "ufs/errors.py": '"""e"""\n',
        "ufs/iomap/bad.py": '"""b"""\nimport ufs.vfs.inode\nfrom ufs.errors import InvalidError\n',
        "ufs/iomap/bad2.pyx": '# cython: language_level=3\n# comment block\nfrom ufs.testing cimport x\n'
                              'from .bdev cimport bio\ncimport libc.stdlib\n',
        "ufs/iomap/bdev.pxd": "",
        "ufs/vfs/v.py": '"""v"""\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ufs.cli\n'
                        'def f():\n    from ufs import plugins\n',
        "ufs/fs_a/__init__.py": '"""a"""\nfrom . import ops\nfrom ..fs_b import format\n',
        "ufs/fs_a/ops.py": '"""ops"""\nfrom ufs.iomap import IomapOps\nfrom ufs.registry import Personality\n'
                           'from ufs.vfs import Inode\nfrom ufs.hookspecs import hookimpl\nimport ufs.fs_a.format\n',
        "ufs/fs_b/__init__.py": "x = 1\n",
        "ufs/registry.py": '"""r"""\nimport pluggy\nfrom ufs import fs_a\n',
        "ufs/noddoc.pyx": "# cython: language_level=3\n\ncdef int x = 1\n",
    }
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    got = {v.split(": ", 2)[0] + ": " + v.split(": ", 2)[1] for v in layer_violations(tmp_path)}
    assert got == {
        "ufs/iomap/bad.py:2: ufs.iomap.bad imports ufs.vfs.inode",
        "ufs/iomap/bad2.pyx:3: ufs.iomap.bad2 imports ufs.testing",
        "ufs/vfs/v.py:6: ufs.vfs.v imports ufs.plugins",
        "ufs/fs_a/__init__.py:3: ufs.fs_a imports ufs.fs_b",
        "ufs/registry.py:3: ufs.registry imports ufs.fs_a",
    }
    assert sorted(missing_docstrings(tmp_path)) == ["ufs/fs_b/__init__.py", "ufs/noddoc.pyx"]


def test_ruff():
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed in the virtualenv")
    proc = subprocess.run([str(ruff), "check", "ufs", "tests", "plugins"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_build_is_fresh():
    # The session guard (conftest) stops the run before this when the build is stale,
    # unless UFS_SKIP_BUILD_CHECK=1; then this test reports it.
    problems = stale_extensions()
    assert not problems, "stale build (run make build):\n" + "\n".join(problems)


def test_build_guard_detects_stale_and_missing(tmp_path):
    iomap = tmp_path / "iomap"
    (iomap / "include").mkdir(parents=True)
    files = {
        "a.pyx": 'from ufs.iomap.b cimport thing\ncdef extern from "h.h":\n    pass\ninclude "x.pxi"\n',
        "a.pxd": "", "b.pxd": "from .c cimport y\n", "c.pxd": "", "x.pxi": "", "include/h.h": "",
        "unrelated.pxd": "",
    }
    for rel, text in files.items():
        (iomap / rel).write_text(text)
    so = iomap / ("a" + importlib.machinery.EXTENSION_SUFFIXES[0])
    so.write_text("")
    old, new = 1_000_000_000, 1_000_000_100
    for p in iomap.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))
    os.utime(so, (new, new))
    assert stale_extensions(iomap) == []
    for dep in ("c.pxd", "include/h.h", "x.pxi", "a.pxd"):
        os.utime(iomap / dep, (new + 1, new + 1))
        problems = stale_extensions(iomap)
        assert len(problems) == 1 and dep in problems[0] and "a.pyx" in problems[0], problems
        os.utime(iomap / dep, (old, old))
    os.utime(iomap / "unrelated.pxd", (new + 1, new + 1))
    assert stale_extensions(iomap) == []
    (iomap / "d.pyx").write_text("")
    assert [p for p in stale_extensions(iomap) if "d.pyx" in p and "no built module" in p]

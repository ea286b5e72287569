"""Build the Cython core (ufs.iomap.*) and the native FUSE session (ufs.fuse._lowlevel, only
when libfuse3's development files are found: pkg-config fuse3).  Everything else is plain Python.

UFS_DEBUG=1 compiles expensive assertions in (see ufs/iomap/include/debug.h);
UFS_ANNOTATE=1 writes cython -a HTML next to each .pyx.
"""
import os
from glob import glob

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError as e:  # pragma: no cover - pyproject pins Cython for builds
    raise SystemExit("Cython is required to build ufs: pip install 'Cython>=3'") from e

debug = os.environ.get("UFS_DEBUG", "0") == "1"
macros = [("UFS_DEBUG", "1" if debug else "0"), ("_GNU_SOURCE", "1")]
cflags = ["-O2", "-g0" if not debug else "-g", "-Wno-unused-function", "-Wno-unreachable-code"]

# UFS_BUILD_ONLY=bdev,dio limits the build to those modules (developers building one
# module while another is being edited).
only = {m for m in os.environ.get("UFS_BUILD_ONLY", "").split(",") if m}
exts = []
for pyx in sorted(glob("ufs/iomap/*.pyx")):
    mod = pyx[:-4].replace("/", ".")
    if only and mod.rsplit(".", 1)[1] not in only:
        continue
    exts.append(Extension(mod, [pyx], include_dirs=["ufs/iomap/include"],
                          define_macros=macros, extra_compile_args=cflags))


def _pkg_config_fuse3():
    """(include dirs, library dirs, libraries) of libfuse3, or None when it is not installed."""
    import shlex
    import subprocess
    try:
        out = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    inc, libdirs, libs = [], [], []
    for tok in shlex.split(out):
        if tok.startswith("-I"):
            inc.append(tok[2:])
        elif tok.startswith("-L"):
            libdirs.append(tok[2:])
        elif tok.startswith("-l"):
            libs.append(tok[2:])
    return inc, libdirs, libs


fuse_pyx = [p for p in sorted(glob("ufs/fuse/*.pyx"))
            if not only or p[:-4].rsplit("/", 1)[1] in only]
if fuse_pyx:
    fuse3 = _pkg_config_fuse3()
    if fuse3 is None:
        print("WARNING: libfuse3 development files not found (pkg-config fuse3): "
              "skipping " + ", ".join(fuse_pyx) + "; the native FUSE engine is unavailable")
    else:
        for pyx in fuse_pyx:
            exts.append(Extension(pyx[:-4].replace("/", "."), [pyx],
                                  include_dirs=["ufs/fuse"] + fuse3[0],
                                  library_dirs=fuse3[1], libraries=fuse3[2],
                                  define_macros=macros, extra_compile_args=cflags))

setup(
    ext_modules=cythonize(
        exts,
        language_level=3,
        annotate=os.environ.get("UFS_ANNOTATE") == "1",
        compiler_directives={
            "boundscheck": debug, "wraparound": False, "cdivision": True,
            "initializedcheck": debug, "embedsignature": True,
        },
    ),
)

"""ufs: a userspace filesystem framework built on a Cython reimplementation of the Linux
kernel's iomap layer and direct-I/O engine.

Layer: public API.  Re-exports what users import (DESIGN.md §6):

    import ufs
    ufs.mkfs("disk.img", "xfslike", size="256M")
    with ufs.mount("disk.img", options={"lockdep": True}) as fs:
        ...

The re-exports are lazy so that `import ufs` stays cheap and importing a lower layer
(ufs.iomap, ufs.vfs) does not pull in the plugin machinery.
"""
__version__ = "0.1.0"

__all__ = ["mkfs", "mount", "fsck", "Filesystem", "__version__"]


def __getattr__(name):
    if name in ("mkfs", "mount", "fsck", "Filesystem"):
        from ufs import api

        return getattr(api, name)
    raise AttributeError(f"module 'ufs' has no attribute {name!r}")

"""mkfs and mount of btrfslike: the ``Personality`` callables' bodies.

Layer: personality.  Imports ``ufs.errors``, ``ufs.vfs.ops`` (Geometry) and this package.

mkfs: the foundation's empty filesystem (``TransactionManager.mkfs``: root, extent, fs and
csum trees, generation 1), then the root directory inode 256 of the fs tree (``nlink`` 2, no
INODE_REF: it has no parent) in a second commit, then the probe label at 60 KiB (SPEC.md §2).
mount: ``TransactionManager.mount`` (newest valid generation) wrapped in a ``BtrfsSuper``.
"""
from __future__ import annotations

import errno as _errno
import stat as _stat
import time

from ufs.errors import InvalidError

from . import format as fmt
from .format import FIRST_FREE_OBJECTID, FS_TREE_ID, INODE_ITEM, DiskInodeItem
from .transaction import TransactionManager

__all__ = ["DEFAULT_NODESIZE", "mkfs", "mount", "probe"]

DEFAULT_NODESIZE = 16384


def probe_label(fsid):
    return fmt.PROBE_LABEL_L.pack(fmt.SB_MAGIC, fsid, bytes(8))


def probe(buf):
    """Does ``buf`` (the first 64 KiB of a device) carry a btrfslike probe label?"""
    a = fmt.PROBE_LABEL_ADDR
    return bytes(buf[a:a + len(fmt.SB_MAGIC)]) == fmt.SB_MAGIC


def mkfs(device, geometry=None, options=None):
    """Format ``device``; returns the fsid."""
    options = dict(options or {})
    ss = getattr(geometry, "block_size", None) or 4096
    ns = int(options.get("nodesize") or max(DEFAULT_NODESIZE, ss))
    if options.get("sectorsize"):
        ss = int(options["sectorsize"])
    try:
        tm = TransactionManager.mkfs(device, nodesize=ns, sectorsize=ss)
    except InvalidError:
        raise
    except ValueError as e:
        raise InvalidError(_errno.EINVAL, str(e)) from None
    now = time.time_ns()
    t = (now // 1_000_000_000, now % 1_000_000_000)
    flags = 0
    if options.get("nodatacow"):
        flags = fmt.INODE_NODATACOW | fmt.INODE_NODATASUM
    elif options.get("nodatasum"):
        flags = fmt.INODE_NODATASUM
    root = DiskInodeItem(2, 2, 0, 0, 2, 0, 0, _stat.S_IFDIR | 0o755, 0, flags, 0, t, t, t, t)
    with tm.lock:
        trans = tm.start()
        tm.tree(FS_TREE_ID).insert(trans, (FIRST_FREE_OBJECTID, INODE_ITEM, 0), root.encode())
        tm.commit(trans)
    lbs = max(512, getattr(device, "logical_block_size", 512) or 512)
    label = probe_label(tm.fsid)
    device.pwrite(label + bytes(max(lbs, 4096) - len(label)), fmt.PROBE_LABEL_ADDR)
    device.flush()
    return tm.fsid


def mount(device, options=None, readonly=False):
    from .super import BtrfsSuper

    tm = TransactionManager.mount(device)
    return BtrfsSuper(device, tm, options, readonly)

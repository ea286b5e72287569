"""xfslike mkfs and mount: build an empty filesystem with a root directory; mount one.

Layer: personality.  Imports ``ufs.errors``, this package's ``format``/``alloc`` (the metadata
foundation: ``mkfs_metadata``, ``Metadata``) and ``super`` (the mounted filesystem).

mkfs: geometry (``format.Geometry.compute``; the device's logical block size is the sector
size), the foundation's metadata (log, AGs, superblock copies), then -- through the journal of
a first mount -- the root directory's inode chunk and inode and ``sb.root_ino``; a clean
unmount leaves the log empty and the superblock CLEAN.

mount: ``Metadata.open`` (verifies the superblock, replays the journal, marks it mounted; a
read-only mount does this on an in-memory overlay so nothing is written), then ``XfsSuper``
(which frees the inodes left on the unlinked list).  No locks of its own.
"""
from __future__ import annotations

import stat as _stat

from ufs.errors import InvalidError

from . import format as fmt
from .alloc import Metadata, mkfs_metadata

__all__ = ["mkfs", "mount"]


def mkfs(dev, geometry=None, options=None):
    """Format ``dev``.  ``geometry``: ``ufs.vfs.ops.Geometry`` (size, block_size) or None;
    ``options``: ``inode_size``, ``ag_count``, ``log_blocks``, ``label``."""
    o = dict(options or {})
    size = getattr(geometry, "size", 0) or dev.size
    bs = getattr(geometry, "block_size", 0) or fmt.DEFAULT_BLOCK_SIZE
    lbs = getattr(dev, "logical_block_size", 512)
    if bs < lbs:
        raise InvalidError(f"block size {bs} is below the device's logical block size {lbs}")
    geo = fmt.Geometry.compute(min(size, dev.size), bs, sector_size=max(512, lbs),
                               ag_count=o.get("ag_count") or None,
                               log_nblocks=o.get("log_blocks") or None,
                               inode_size=o.get("inode_size") or fmt.DEFAULT_INODE_SIZE)
    label = str(o.get("label") or "").encode()[:32]
    mkfs_metadata(dev, geo, label=label)
    fs = mount(dev, {}, False)
    try:
        with fs.trans() as tx:
            root = fs.new_inode(tx, None, _stat.S_IFDIR | 0o755, nlink=2)
            root.i_uid = root.i_gid = 0
            fs.log_inode(tx, root)
            fs.md.log_superblock(tx).root_ino = root.i_ino
    finally:
        fs.put_super()
        fs.shutdown()
    return geo


def mount(dev, options=None, readonly=False):
    """Mount ``dev``.  A read-only mount replays the journal into an in-memory overlay (the
    device may be read-only); file data is still read from ``dev`` itself."""
    from .fsck import OverlayDev
    from .super import XfsSuper
    md = Metadata.open(OverlayDev(dev) if readonly else dev, read_only=readonly)
    return XfsSuper(dev, md, options, readonly)

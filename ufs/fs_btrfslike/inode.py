"""In-memory inodes of btrfslike and their file extent items.

Layer: personality.  Imports ``ufs.vfs`` (Inode), ``ufs.errors`` and ``.format``.

What it owns:
- :class:`BtrfsInode`: the VFS inode plus its subvolume (``tree_id``), objectid, inode flags
  (``NODATASUM``/``NODATACOW``, SPEC.md §6 inode_item.flags), ``nbytes`` and ``disk_size``
  (the size last recorded for the INODE_ITEM: a DIO write raises ``i_size`` in iomap_begin,
  as btrfs does, and the on-disk size only at completion, so a commit in between never
  records a size whose data is not there yet);
- VFS inode numbers: ``objectid`` for the top-level fs tree, ``tree_id << 40 | objectid`` in a
  snapshot/subvolume (one VFS ino space over several fs trees);
- the file extent item helpers ``extent_items``/``drop_extents``/``add_extent``: the one place
  EXTENT_DATA items change, keeping data references exact (a reference per item, taken before
  the old one is dropped, as the foundation's rules in tests/fs_btrfslike/test_extent_tree.py).

Locking: everything here runs with ``tm.lock`` held by the caller.
"""
from __future__ import annotations

import stat as _stat

from ufs.vfs.inode import Inode

from . import format as fmt
from .format import (
    EXTENT_DATA,
    FILE_EXTENT_INLINE,
    FILE_EXTENT_PREALLOC,
    FILE_EXTENT_REG,
    FS_TREE_ID,
    INODE_ITEM,
    INODE_NODATACOW,
    INODE_NODATASUM,
    DiskFileExtent,
    DiskInodeItem,
)

__all__ = [
    "INODE_NODATACOW",
    "INODE_NODATASUM",
    "BtrfsInode",
    "add_extent",
    "drop_extents",
    "extent_items",
    "extent_len",
    "split_ino",
    "vfs_ino",
]

INO_TREE_SHIFT = 40

_NS = 1_000_000_000


def vfs_ino(tree_id, objectid):
    return objectid if tree_id == FS_TREE_ID else (tree_id << INO_TREE_SHIFT) | objectid


def split_ino(ino):
    """``(tree_id, objectid)`` of a VFS inode number."""
    tree = ino >> INO_TREE_SHIFT
    return (FS_TREE_ID, ino) if tree == 0 else (tree, ino & ((1 << INO_TREE_SHIFT) - 1))


def _ts(ns):
    return (ns // _NS, ns % _NS)


def _ns(t):
    return t[0] * _NS + t[1]


class BtrfsInode(Inode):
    """One btrfslike inode in memory."""

    def __init__(self, sb, tree_id, objectid, item: DiskInodeItem):
        super().__init__(sb, vfs_ino(tree_id, objectid), item.mode, size=item.size,
                         blkbits=sb.s_blocksize_bits, uid=item.uid, gid=item.gid,
                         nlink=item.nlink)
        self.tree_id, self.objectid = tree_id, objectid
        self.i_op = sb.iops
        self.i_fop = sb.fops
        self.flags = item.flags
        self.nbytes = item.nbytes
        self.generation = item.generation
        self.sequence = item.sequence
        self.rdev = item.rdev
        self.disk_size = item.size
        self.i_atime_ns, self.i_ctime_ns = _ns(item.atime), _ns(item.ctime)
        self.i_mtime_ns, self.otime_ns = _ns(item.mtime), _ns(item.otime)
        self.next_index = None          # directories: next DIR_INDEX index (lazy)
        # fsync log bookkeeping (tree_log.py): file extent ranges changed in transaction
        # ``log_trans`` since the inode was last logged; the transaction of the last change of
        # one of its names (link/unlink/rename) and, for a directory, of the last entry
        # removed from it; ``(transid, sequence)`` of the last log record written for it.
        self.log_trans, self.log_ranges = None, []
        self.ns_trans = self.rm_trans = 0
        self.logged = None

    @property
    def i_blocks(self):
        return self.nbytes // 512

    @property
    def nodatasum(self):
        return bool(self.flags & (INODE_NODATASUM | INODE_NODATACOW))

    @property
    def nodatacow(self):
        return bool(self.flags & INODE_NODATACOW)

    def to_item(self, transid):
        size = self.disk_size if _stat.S_ISREG(self.i_mode) else self.i_size
        return DiskInodeItem(self.generation, transid, size, self.nbytes, self.i_nlink,
                             self.i_uid, self.i_gid, self.i_mode, self.rdev, self.flags,
                             self.sequence, _ts(self.i_atime_ns), _ts(self.i_ctime_ns),
                             _ts(self.i_mtime_ns), _ts(self.otime_ns))

    def key(self):
        return (self.objectid, INODE_ITEM, 0)


def backref_offset(pos, fe):
    """The data back-reference offset of an item at file ``pos``: ``pos - fe.offset`` modulo
    2^64 (SPEC.md inline_extent_data_ref.offset)."""
    return (pos - fe.offset) & fmt.U64_MAX


def extent_len(fe):
    return fe.ram_bytes if fe.type == FILE_EXTENT_INLINE else fe.num_bytes


def extent_items(tree, oid, start, end):
    """``[(pos, DiskFileExtent)]`` of the items of ``oid`` overlapping ``[start, end)``."""
    out = []
    prev = tree.prev_item((oid, EXTENT_DATA, start))
    if prev is not None and prev[0][0] == oid and prev[0][1] == EXTENT_DATA and prev[0][2] < start:
        fe = DiskFileExtent.decode(prev[1], f"inode {oid} extent {prev[0][2]}")
        if prev[0][2] + extent_len(fe) > start:
            out.append((prev[0][2], fe))
    for k, d in tree.items((oid, EXTENT_DATA, start), (oid, EXTENT_DATA, end)):
        out.append((k[2], DiskFileExtent.decode(d, f"inode {oid} extent {k[2]}")))
    return out


LOG_RANGES_MAX = 4096       # ranges kept per inode before they are merged (memory bound)


def _note_range(inode, trans, start, end):
    """Record for the fsync log that the items of ``[start, end)`` changed in ``trans``.
    Over ``LOG_RANGES_MAX`` ranges they are merged, at worst into one covering range: logging
    more than changed is still exact (the log drops a range and re-adds its items)."""
    if inode.log_trans != trans.transid:
        inode.log_trans = trans.transid
        inode.log_ranges = []
    r = inode.log_ranges
    r.append((start, end))
    if len(r) > LOG_RANGES_MAX:
        merged = []
        for s, e in sorted(r):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
            else:
                merged.append((s, e))
        if len(merged) > LOG_RANGES_MAX // 2:
            merged = [(merged[0][0], max(e for _s, e in merged))]
        inode.log_ranges = merged


def add_extent(tm, trans, tree, inode, pos, fe):
    """Insert a file extent item and take its data reference (the item counts once)."""
    tree.insert(trans, (inode.objectid, EXTENT_DATA, pos), fe.encode())
    _note_range(inode, trans, pos, pos + extent_len(fe))
    if fe.type != FILE_EXTENT_INLINE and fe.disk_bytenr:
        tm.extents.inc_data_ref(trans, fe.disk_bytenr, fe.disk_num_bytes, tree.tree_id,
                                inode.objectid, backref_offset(pos, fe))
        inode.nbytes += fe.num_bytes


def drop_extents(tm, trans, tree, inode, start, end):
    """Unmap ``[start, end)`` of ``inode``: items inside go, items across an edge are cut
    (the kept pieces take their own reference before the old item's is dropped).  Returns the
    bytes unmapped."""
    oid = inode.objectid
    dropped = 0
    _note_range(inode, trans, start, end)
    for pos, fe in extent_items(tree, oid, start, end):
        fend = pos + extent_len(fe)
        tree.delete(trans, (oid, EXTENT_DATA, pos))
        if fe.type == FILE_EXTENT_INLINE or not fe.disk_bytenr:
            continue
        inode.nbytes -= fe.num_bytes
        if pos < start:
            head = DiskFileExtent(fe.type, fe.generation, fe.ram_bytes, fe.disk_bytenr,
                                  fe.disk_num_bytes, fe.offset, start - pos)
            add_extent(tm, trans, tree, inode, pos, head)
        if fend > end:
            tail = DiskFileExtent(fe.type, fe.generation, fe.ram_bytes, fe.disk_bytenr,
                                  fe.disk_num_bytes, fe.offset + (end - pos), fend - end)
            add_extent(tm, trans, tree, inode, end, tail)
        dropped += min(fend, end) - max(pos, start)
        tm.extents.dec_data_ref(trans, fe.disk_bytenr, fe.disk_num_bytes, tree.tree_id, oid,
                                backref_offset(pos, fe))
    return dropped


def new_reg_extent(transid, bytenr, disk_bytes, num_bytes, prealloc=False):
    return DiskFileExtent(FILE_EXTENT_PREALLOC if prealloc else FILE_EXTENT_REG, transid,
                          disk_bytes, bytenr, disk_bytes, 0, num_bytes)


__all__.append("new_reg_extent")
_ = fmt

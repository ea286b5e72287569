"""xfslike directories: short form in the inode fork, a hashed B+tree (dirbt) beyond.

Owns: the entries of one directory.  Every entry has the key ``(dir_hash(name), coll)``
(SPEC.md section 6): lookups descend the dirbt to the hash and compare the few names that
share it, so lookup/insert/remove are O(log n) at any size; readdir walks the keys in order and
its cookie (``(hash << 32 | coll) + 1``) stays valid across other entries' insertions and
removals.  ``..`` is kept as the record with key (0, 0) (in the fork header for short form).

Short form (``FMT_INLINE``): ``u64 parent`` then packed entries; converted to a dirbt (same
keys, so cookies survive) when the next entry would not fit.  A dirbt directory stays one.

May import: ``ufs.errors``, ``ufs.iomap.csum`` (via format), this package's ``format`` and
``btree``.

Locks: callers hold the directory's ``i_rwsem`` (VFS) and the metadata lock with an open
transaction for changes; lookups/readdir need only the metadata lock.
"""
from __future__ import annotations

import struct

from ufs.errors import CorruptError, NoSpaceError

from . import format as fmt
from .btree import Btree

__all__ = ["DirState", "dir_hash"]

_SF_HDR = struct.Struct("<Q")
_SF_ENT = struct.Struct("<QIBB")          # ino, coll, ftype, namelen; name follows
DOTDOT = (0, 0)
DT_DIR = 4                                # d_type of the '..' record


def dir_hash(name: bytes) -> int:
    return (fmt.crc32c(name) & 0x7FFF_FFFF) | 1


def cookie_of(key: tuple) -> int:
    return ((key[0] << 32) | key[1]) + 1


def key_of_cookie(pos: int) -> tuple:
    return (pos >> 32, pos & 0xFFFF_FFFF)


class DirState:
    """Decoded entries of one directory inode (``inode.di``)."""

    def __init__(self, fs, inode):
        self.fs = fs
        self.inode = inode
        self.fork_size = fmt.DiskInode.fork_size(fs.inode_size)
        di = inode.di
        self.tree = None
        self.sf = None            # short form: {key: (name, ino, ftype)}
        self.parent = 0
        if di.data_format == fmt.FMT_BTREE:
            self.tree = self._btree()
        elif di.data_format == fmt.FMT_INLINE:
            self._decode_sf(di.fork[:di.inline_len])
        else:
            raise CorruptError("directory", f"inode {di.ino}", f"data format {di.data_format}")

    def _btree(self) -> Btree:
        return Btree(self.fs.md.cache, fmt.DIRBT, self.inode.di.ino, self.inode,
                     self._node_alloc, self._node_free)

    def _node_alloc(self, tx) -> int:
        blk, _ = self.fs.md.alloc.alloc(tx, self.inode.di.ino // self.fs.ipb, 1, 1)
        self.inode.di.nblocks += 1
        return blk

    def _node_free(self, tx, blkno: int) -> None:
        self.fs.md.alloc.free(tx, blkno, 1)
        self.inode.di.nblocks -= 1

    # -- short form -----------------------------------------------------------------------
    def _decode_sf(self, data: bytes) -> None:
        loc = f"inode {self.inode.di.ino} (short-form directory)"
        if len(data) < 8:
            raise CorruptError("directory", loc, "short header")
        self.parent = _SF_HDR.unpack_from(data, 0)[0]
        sf = {}
        off = 8
        while off < len(data):
            if off + _SF_ENT.size > len(data):
                raise CorruptError("directory", loc, f"truncated entry at byte {off}")
            ino, coll, ftype, nlen = _SF_ENT.unpack_from(data, off)
            off += _SF_ENT.size
            name = bytes(data[off:off + nlen])
            off += nlen
            if len(name) != nlen or not nlen:
                raise CorruptError("directory", loc, "bad name length")
            key = (dir_hash(name), coll)
            if key in sf:
                raise CorruptError("directory", loc, f"duplicate key {key}")
            sf[key] = (name, ino, ftype)
        self.sf = sf

    def _encode_sf(self) -> bytes:
        out = [_SF_HDR.pack(self.parent)]
        for (_h, coll), (name, ino, ftype) in self.sf.items():
            out.append(_SF_ENT.pack(ino, coll, ftype, len(name)) + name)
        return b"".join(out)

    def _sf_size_with(self, name: bytes) -> int:
        return (8 + sum(_SF_ENT.size + len(n) for n, _, _ in self.sf.values())
                + _SF_ENT.size + len(name))

    def _store_sf(self) -> None:
        data = self._encode_sf()
        di = self.inode.di
        di.fork = data
        di.inline_len = len(data)
        di.data_format = fmt.FMT_INLINE

    # -- queries --------------------------------------------------------------------------
    def _candidates(self, h: int):
        if self.tree is None:
            return [(k, v) for k, v in self.sf.items() if k[0] == h]
        return [((r[0], r[1]), (r[5][:r[4]], r[2], r[3]))
                for r in self.tree.iterate((h, 0), (h + 1, 0))]

    def lookup(self, name: bytes):
        """(ino, ftype, key) of ``name`` or None."""
        for key, (n, ino, ftype) in self._candidates(dir_hash(name)):
            if n == name:
                return ino, ftype, key
        return None

    def get_parent(self) -> int:
        if self.tree is None:
            return self.parent
        rec = self.tree.lookup(DOTDOT)
        if rec is None:
            raise CorruptError("directory", f"inode {self.inode.di.ino}", "no '..' record")
        return rec[2]

    def iterate(self, pos: int = 0):
        """``(name, ino, ftype, next_cookie)`` in key order from cookie ``pos``."""
        lo = max(key_of_cookie(pos), (0, 1))
        if self.tree is None:
            for key in sorted(k for k in self.sf if k >= lo):
                name, ino, ftype = self.sf[key]
                yield name, ino, ftype, cookie_of(key)
            return
        for r in self.tree.iterate(lo):
            yield r[5][:r[4]], r[2], r[3], cookie_of((r[0], r[1]))

    def is_empty(self) -> bool:
        return next(iter(self.iterate(0)), None) is None

    # -- changes --------------------------------------------------------------------------
    def add(self, tx, name: bytes, ino: int, ftype: int) -> None:
        h = dir_hash(name)
        used = {k[1] for k, _ in self._candidates(h)}
        coll = 0
        while coll in used:
            coll += 1
        if coll > 0xFFFF_FFFF:
            raise NoSpaceError("too many names with one hash")
        if self.tree is None and self._sf_size_with(name) > self.fork_size:
            self._to_tree(tx)
        if self.tree is None:
            self.sf[(h, coll)] = (name, ino, ftype)
            self._store_sf()
        else:
            self.tree.insert(tx, (h, coll, ino, ftype, len(name), name))
        self.inode.di.nextents += 1

    def remove(self, tx, name: bytes) -> int:
        hit = self.lookup(name)
        if hit is None:
            raise CorruptError("directory", f"inode {self.inode.di.ino}", f"no entry {name!r} to remove")
        ino, _ftype, key = hit
        if self.tree is None:
            del self.sf[key]
            self._store_sf()
        else:
            self.tree.delete(tx, key)
        self.inode.di.nextents -= 1
        return ino

    def retarget(self, tx, name: bytes, ino: int, ftype: int) -> None:
        """Point the existing entry ``name`` at another inode (rename over a target)."""
        _old, _f, key = self.lookup(name)
        if self.tree is None:
            self.sf[key] = (name, ino, ftype)
            self._store_sf()
        else:
            self.tree.update(tx, key + (ino, ftype, len(name), name))

    def set_parent(self, tx, parent: int) -> None:
        if self.tree is None:
            self.parent = parent
            self._store_sf()
        else:
            self.tree.update(tx, DOTDOT + (parent, DT_DIR, 2, b".."))

    def _to_tree(self, tx) -> None:
        di = self.inode.di
        blk = self._node_alloc(tx)
        Btree.create_root(tx, fmt.DIRBT, blk, di.ino)
        di.bmbt_root_blk, di.bmbt_level = blk, 0
        di.data_format = fmt.FMT_BTREE
        di.fork = b""
        di.inline_len = 0
        self.tree = self._btree()
        self.tree.insert(tx, DOTDOT + (self.parent, DT_DIR, 2, b".."))
        for key in sorted(self.sf):
            name, ino, ftype = self.sf[key]
            self.tree.insert(tx, key + (ino, ftype, len(name), name))
        self.sf = None

    def tree_blocks(self) -> list:
        if self.tree is None:
            return []
        return self.tree.node_blocks()

    def free_all(self, tx) -> None:
        """Free the dirbt blocks of an (empty) directory being removed."""
        for blk in self.tree_blocks():
            tx.free_buf(blk)
            self._node_free(tx, blk)
        self.tree = None
        self.sf = {}
        di = self.inode.di
        di.bmbt_root_blk, di.bmbt_level = fmt.NULL_BLK, 0

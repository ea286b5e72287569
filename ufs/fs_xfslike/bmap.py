"""xfslike per-inode extent map: extents in the inode fork, spilling into a bmbt.

Owns: the in-memory extent list of one inode (XFS's incore extent list: sorted tuples
``(file_off_blk, dev_blk, len_blk, flags)``) and keeping the on-disk copy equal to it in the
same transaction: ``FMT_EXTENTS`` (the array in the fork) while the extents fit, ``FMT_BTREE``
(a bmbt owned by the inode) beyond; back to the fork when the count drops to half of what fits.
Every change is ``set_range``: replace the mappings of a block range by new extents, merging
neighbours; the difference between the old and new records of the touched window is applied to
the bmbt (delete + insert of whole records), so a change costs O(log n) node visits.

May import: ``ufs.errors``, this package's ``format`` and ``btree``.

Invariants: extents sorted by ``file_off_blk``, non-overlapping, ``len_blk > 0``; adjacent
extents that are contiguous on disk with equal flags are merged; ``di.nextents`` is the count;
``di.nblocks`` counts data blocks and bmbt nodes (callers adjust data blocks, this module the
nodes).  ``ext``/``keys`` change only in ``set_range`` (and ``__init__``); nobody else may
assign to them.

Lookup cache: ``last_found`` is None or one extent tuple that ``find`` returned and that is,
as long as it is set, exactly the element of ``ext`` containing those blocks.  ``set_range``
clears it *before* touching the lists, so every change of the mapping clears it (allocation,
unwritten conversion, punch, truncate, merges; a cancelled transaction reloads the inode with a
new ExtentMap).  Only the xfslike mapping code sets it, with the metadata lock held and outside
any transaction; its fast path reads it without that lock (one attribute load of an immutable
tuple): a value read just before a concurrent ``set_range`` is a lookup ordered before that
change, exactly as if the reader had taken the lock first.

Locks: the caller holds the filesystem metadata lock and an open transaction (queries: the
metadata lock; ``last_found`` may be read without it).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right

from ufs.errors import CorruptError

from . import format as fmt
from .btree import Btree

__all__ = ["ExtentMap"]

UNWRITTEN = fmt.EXT_UNWRITTEN


class ExtentMap:
    """The extent map of one inode (``inode.di`` is its on-disk core)."""

    def __init__(self, fs, inode):
        self.fs = fs
        self.inode = inode
        self.cap = fmt.DiskInode.fork_size(fs.inode_size) // fmt.EXTENT.size
        self.ext: list[tuple] = []
        self.keys: list[int] = []
        self.last_found = None      # the lookup cache (module docstring)
        self.tree = None
        di = inode.di
        if di.data_format == fmt.FMT_BTREE:
            self.tree = self._btree()
            self.ext = [tuple(r) for r in self.tree.iterate()]
        elif di.data_format == fmt.FMT_EXTENTS:
            self.ext = [e.as_record() for e in fmt.DiskExtent.decode_array(
                di.fork, di.nextents, f"inode {di.ino}")]
        self.keys = [e[0] for e in self.ext]
        if len(self.ext) != di.nextents:
            raise CorruptError("extent map", f"inode {di.ino}",
                               f"{len(self.ext)} extents, core says {di.nextents}")
        prev = 0
        for e in self.ext:
            if e[2] <= 0 or e[0] < prev or e[3] & ~UNWRITTEN:
                raise CorruptError("extent map", f"inode {di.ino}", f"bad extent {e}")
            prev = e[0] + e[2]

    def _btree(self) -> Btree:
        return Btree(self.fs.md.cache, fmt.BMBT, self.inode.di.ino, self.inode,
                     self._node_alloc, self._node_free)

    def _node_alloc(self, tx) -> int:
        near = self.inode.di.ino // self.fs.ipb
        blk, _ = self.fs.md.alloc.alloc(tx, near, 1, 1)
        self.inode.di.nblocks += 1
        return blk

    def _node_free(self, tx, blkno: int) -> None:
        self.fs.md.alloc.free(tx, blkno, 1)
        self.inode.di.nblocks -= 1

    # -- queries ---------------------------------------------------------------------------
    def __len__(self):
        return len(self.ext)

    def find(self, blk: int):
        """(extent containing ``blk`` or None, start of the next extent after ``blk`` or None)."""
        i = bisect_right(self.keys, blk) - 1
        if i >= 0:
            e = self.ext[i]
            if e[0] + e[2] > blk:
                return e, (self.keys[i + 1] if i + 1 < len(self.keys) else None)
        nxt = self.keys[i + 1] if i + 1 < len(self.keys) else None
        return None, nxt

    def overlapping(self, start: int, end: int) -> list:
        i = max(0, bisect_right(self.keys, start) - 1)
        out = []
        while i < len(self.ext) and self.ext[i][0] < end:
            e = self.ext[i]
            if e[0] + e[2] > start:
                out.append(e)
            i += 1
        return out

    def last_end(self) -> int:
        if not self.ext:
            return 0
        e = self.ext[-1]
        return e[0] + e[2]

    # -- change ----------------------------------------------------------------------------
    def set_range(self, tx, start: int, end: int, new: list) -> list:
        """Make ``new`` (extents inside ``[start, end)``) the only mappings of that range.

        Returns the ``(file_off, dev_blk, len, flags)`` pieces that were mapped in the range
        and are no longer (the caller frees their blocks or not).  Logs the on-disk change.
        """
        # first: no lockless reader may see a cached extent once the lists start to change
        self.last_found = None
        # and a cancelled tx must give the inode back its on-disk map (the list changes
        # below happen before the caller logs the inode core)
        self.fs.join_inode(tx, self.inode)
        keys = self.keys
        lo = max(0, bisect_right(keys, start) - 1)
        if lo > 0:
            lo -= 1                          # one more on the left, for merging
        hi = bisect_left(keys, end)
        if hi < len(keys):
            hi += 1                          # and on the right
        old = self.ext[lo:hi]
        window = []
        removed = []
        for e in old:
            s, d, n, f = e
            ee = s + n
            if ee <= start or s >= end:
                window.append(e)
                continue
            if s < start:
                window.append((s, d, start - s, f))
            if ee > end:
                window.append((end, d + (end - s), ee - end, f))
            a, b = max(s, start), min(ee, end)
            removed.append((a, d + (a - s), b - a, f))
        window.extend(new)
        window.sort()
        merged = []
        for e in window:
            if merged:
                p = merged[-1]
                if p[0] + p[2] > e[0]:
                    raise CorruptError("extent map", f"inode {self.inode.di.ino}",
                                       f"overlapping extents {p} and {e}")
                if (p[0] + p[2] == e[0] and p[1] + p[2] == e[1] and p[3] == e[3]
                        and p[2] + e[2] < 1 << 31):
                    merged[-1] = (p[0], p[1], p[2] + e[2], p[3])
                    continue
            merged.append(e)
        self.ext[lo:hi] = merged
        self.keys[lo:hi] = [e[0] for e in merged]
        self._sync(tx, old, merged)
        return removed

    def _sync(self, tx, old: list, new: list) -> None:
        di = self.inode.di
        n = len(self.ext)
        if self.tree is None and n > self.cap:
            # spill into a bmbt: a root leaf, then every record
            blk = self._node_alloc(tx)
            Btree.create_root(tx, fmt.BMBT, blk, di.ino)
            di.bmbt_root_blk, di.bmbt_level = blk, 0
            di.data_format = fmt.FMT_BTREE
            self.tree = self._btree()
            for e in self.ext:
                self.tree.insert(tx, e)
            di.fork = b""
        elif self.tree is not None and n <= self.cap // 2:
            self._free_tree(tx)
            di.data_format = fmt.FMT_EXTENTS
            di.fork = b"".join(fmt.EXTENT.struct.pack(*e) for e in self.ext)
        elif self.tree is not None:
            oldset = set(old)
            newset = set(new)
            for e in old:
                if e not in newset:
                    self.tree.delete(tx, e[0])
            for e in new:
                if e not in oldset:
                    self.tree.insert(tx, e)
        else:
            di.data_format = fmt.FMT_EXTENTS
            di.fork = b"".join(fmt.EXTENT.struct.pack(*e) for e in self.ext)
        di.nextents = n

    def tree_blocks(self) -> list:
        """Every node block of the bmbt (for freeing or checking)."""
        if self.tree is None:
            return []
        return self.tree.node_blocks()

    def _free_tree(self, tx) -> None:
        for blk in self.tree_blocks():
            tx.free_buf(blk)
            self._node_free(tx, blk)
        self.tree = None
        self.inode.di.bmbt_root_blk = fmt.NULL_BLK
        self.inode.di.bmbt_level = 0

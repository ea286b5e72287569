"""xfslike inodes: on-disk inode I/O, dynamic inode allocation (inode chunks in the inobt),
the in-memory inode (``XfsInode``) and the unlinked (orphan) list.

Owns: reading/writing one ``DiskInode`` inside its cluster block (raw, journaled blocks),
allocating and freeing inode numbers through each AG's inode-chunk B+tree (``inobt``: records
``(start_ino, free_mask)``, 64 inodes per chunk, chunk blocks allocated from the AG's free
space), the per-AG cache of chunks with free inodes, and the VFS inode subclass with its
decoded core (``di``), its extent map (``bmap.ExtentMap``) and delayed-allocation state.

May import: ``ufs.errors``, ``ufs.vfs`` (Inode), this package's ``format``, ``btree``,
``alloc``, ``bmap``.

Inode numbers: ``ino = cluster block * inodes_per_block + slot`` (SPEC.md section 6), so the
location of an inode follows from its number with no lookup.

Locks: everything here runs under the filesystem's metadata lock (``XfsFs.meta_lock``, held
for the whole transaction by ``XfsFs.trans``); the AG lock of an AG whose inobt/header changes
is taken through ``tx.lock`` (AG ascending order, as the allocator requires).
"""
from __future__ import annotations

import heapq
import stat as _stat

from ufs.errors import CorruptError, NoSpaceError
from ufs.vfs.inode import Inode

from . import format as fmt
from .alloc import _TreeRoot
from .btree import Btree

__all__ = ["InodeAllocator", "XfsInode", "dinode_loc"]


def dinode_loc(ino: int, ipb: int, inode_size: int) -> tuple[int, int]:
    """(cluster block, byte offset in it) of inode ``ino``."""
    blk, slot = divmod(ino, ipb)
    return blk, slot * inode_size


class InodeAllocator:
    """Inode numbers of the whole filesystem: one inobt per AG.

    ``free_chunks[agno]`` caches the start inos of chunks with a free inode; it is built by
    one scan of the AG's inobt the first time the AG is asked (then kept current), so an
    allocation costs O(log n) after that.
    """

    def __init__(self, fs):
        self.fs = fs
        md = fs.md
        self.cache = md.cache
        self.sb = md.sb
        self.ipb = fs.ipb
        self.chunk_blk = max(1, fmt.INODES_PER_CHUNK // self.ipb)
        self.chunk_inodes = min(fmt.INODES_PER_CHUNK, self.ipb * self.chunk_blk)
        self.full_mask = (1 << self.chunk_inodes) - 1
        self.trees = []
        for ag in md.alloc.ags:
            self.trees.append(Btree(self.cache, fmt.INOBT, ag.agno, _TreeRoot(ag, "ino"),
                                    self._node_alloc(ag), self._node_free))
        self.free_chunks: list[set | None] = [None] * len(self.trees)
        self._heaps: dict[int, list] = {}

    def _node_alloc(self, ag):
        def alloc_block(tx):
            blk, _ = self.fs.md.alloc.alloc(tx, ag.start_blk, 1, 1)
            return blk
        return alloc_block

    def _node_free(self, tx, blkno):
        self.fs.md.alloc.free(tx, blkno, 1)

    def _free_set(self, agno: int) -> set:
        s = self.free_chunks[agno]
        if s is None:
            s = {rec[0] for rec in self.trees[agno].iterate() if rec[1]}
            self.free_chunks[agno] = s
        return s

    def _lowest_free(self, agno: int):
        """Lowest chunk with a free inode (a heap over the set, stale entries skipped)."""
        free = self._free_set(agno)
        heap = self._heaps.get(agno)
        if heap is None or len(heap) > 4 * len(free) + 64:
            heap = self._heaps[agno] = sorted(free)
        while heap and heap[0] not in free:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _mark_free_chunk(self, agno: int, start: int) -> None:
        free = self._free_set(agno)
        if start not in free:
            free.add(start)
            heap = self._heaps.get(agno)
            if heap is not None:
                heapq.heappush(heap, start)

    def chunk_of(self, agno: int, ino: int):
        rec = self.trees[agno].lookup_le(ino)
        if rec is None or not rec[0] <= ino < rec[0] + self.chunk_inodes:
            return None
        return rec

    def agno_of_ino(self, ino: int) -> int:
        return (ino // self.ipb) // self.sb.ag_blk

    def alloc(self, tx, near_agno: int) -> int:
        """Allocate a free inode number (its slot is left free-formatted; the caller writes
        the new inode).  Prefers ``near_agno``; NoSpaceError when no AG has room."""
        n = len(self.trees)
        order = [(near_agno + i) % n for i in range(n)]
        held = [ag.agno for ag in self.fs.md.alloc.ags if tx.holds(ag.lock)]
        floor = max(held) if held else 0
        order = [a for a in order if a >= floor] or order
        for agno in order:
            ag = self.fs.md.alloc.ags[agno]
            if agno < floor:
                continue
            start = self._lowest_free(agno)
            if start is not None:
                ag.lock_for(tx)
                return self._take(tx, agno, start)
        for agno in order:
            if agno < floor:
                continue
            try:
                start = self._new_chunk(tx, agno)
            except NoSpaceError:
                continue
            return self._take(tx, agno, start)
        raise NoSpaceError("no free inodes and no space for a new inode chunk")

    def _take(self, tx, agno: int, start: int) -> int:
        tree = self.trees[agno]
        rec = tree.lookup(start)
        if rec is None or not rec[1]:
            raise CorruptError("inobt", f"AG {agno} chunk {start}", "chunk listed free has no free inode")
        mask = rec[1]
        bit = (mask & -mask).bit_length() - 1
        mask &= ~(1 << bit)
        tree.update(tx, (start, mask))
        agh = self.fs.md.alloc.ags[agno].header(tx)
        agh.ifree -= 1
        free = self._free_set(agno)
        if not mask:
            free.discard(start)
        tx.on_abort(self._forget_cache(agno))
        return start + bit

    def _forget_cache(self, agno):
        def undo():
            self.free_chunks[agno] = None
            self._heaps.pop(agno, None)
        return undo

    def _new_chunk(self, tx, agno: int) -> int:
        ag = self.fs.md.alloc.ags[agno]
        ag.lock_for(tx)
        if ag.header().longest_free_blk < self.chunk_blk:
            raise NoSpaceError(f"AG {agno}: no room for an inode chunk")
        got = ag.alloc(tx, 0, self.chunk_blk, self.chunk_blk, False)
        if got is None:
            raise NoSpaceError(f"AG {agno}: no room for an inode chunk")
        blk = ag.start_blk + got[0]
        start = blk * self.ipb
        isz = self.fs.inode_size
        uuid = self.sb.uuid
        for i in range(self.chunk_blk):
            buf = tx.new_buf(blk + i, None, 0)
            for slot in range(self.ipb):
                ino = (blk + i) * self.ipb + slot
                fmt.DiskInode(ino=ino).encode_into(buf.data, slot * isz, isz, uuid)
        self.trees[agno].insert(tx, (start, self.full_mask))
        agh = ag.header(tx)
        agh.icount += self.chunk_inodes
        agh.ifree += self.chunk_inodes
        self._mark_free_chunk(agno, start)
        tx.on_abort(self._forget_cache(agno))
        return start

    def free(self, tx, ino: int) -> None:
        agno = self.agno_of_ino(ino)
        ag = self.fs.md.alloc.ags[agno]
        ag.lock_for(tx)
        rec = self.chunk_of(agno, ino)
        if rec is None:
            raise CorruptError("inobt", f"inode {ino}", "no inode chunk holds this inode")
        bit = 1 << (ino - rec[0])
        if rec[1] & bit:
            raise CorruptError("inobt", f"inode {ino}", "freeing a free inode")
        self.trees[agno].update(tx, (rec[0], rec[1] | bit))
        ag.header(tx).ifree += 1
        self._mark_free_chunk(agno, rec[0])
        tx.on_abort(self._forget_cache(agno))

    def counts(self) -> tuple[int, int]:
        icount = ifree = 0
        for ag in self.fs.md.alloc.ags:
            agh = ag.header()
            icount += agh.icount
            ifree += agh.ifree
        return icount, ifree


class XfsInode(Inode):
    """In-memory inode of xfslike: VFS fields + decoded core + extent map + delalloc."""

    def __init__(self, fs, di: fmt.DiskInode):
        super().__init__(fs.vsb, di.ino, di.mode or _stat.S_IFREG, size=di.size,
                         blkbits=fs.vsb.s_blocksize_bits, wb_ops=fs.wb_ops)
        self.fs = fs
        self.i_op = fs.iops
        self.i_fop = fs.fops
        self.di = di
        self.bmap = None            # bmap.ExtentMap for files/long symlinks (lazily)
        self.dir = None             # dir.DirState for directories (lazily)
        self.delalloc: list = []    # sorted [start_blk, len_blk] reservations (no blocks yet)
        self.delalloc_blk = 0
        self.disk_size = di.size    # the size the log has (buffered data may be ahead)
        self.i_rdev = di.rdev
        self.core_dirty = False     # VFS fields (times) changed but not logged yet
        self.load_core()

    # -- core <-> VFS fields -------------------------------------------------------------
    def load_core(self) -> None:
        di = self.di
        self.i_mode = di.mode
        self.i_nlink = di.nlink
        self.i_uid = di.uid
        self.i_gid = di.gid
        self.i_size = di.size
        self.disk_size = di.size
        self.i_atime_ns = di.atime_ns
        self.i_mtime_ns = di.mtime_ns
        self.i_ctime_ns = di.ctime_ns
        self.i_rdev = di.rdev

    @property
    def i_blocks(self) -> int:
        return (self.di.nblocks + self.delalloc_blk) * (self.fs.block_size // 512)

    def store_core(self) -> None:
        """Copy the VFS fields into ``di`` (size: the logged size, never ahead of the data)."""
        di = self.di
        di.mode = self.i_mode
        di.nlink = self.i_nlink
        di.uid = self.i_uid
        di.gid = self.i_gid
        di.size = self.disk_size
        di.atime_ns = self.i_atime_ns
        di.mtime_ns = self.i_mtime_ns
        di.ctime_ns = self.i_ctime_ns

    # -- B+tree root holder (bmbt or dirbt) -------------------------------------------------
    @property
    def root_blk(self) -> int:
        return self.di.bmbt_root_blk

    @property
    def level(self) -> int:
        return self.di.bmbt_level

    def set_root(self, tx, root_blk: int, level: int) -> None:
        self.di.bmbt_root_blk = root_blk
        self.di.bmbt_level = level

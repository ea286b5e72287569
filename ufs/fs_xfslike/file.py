"""The data path of xfslike: iomap mapping, DIO (XFS locking), delayed allocation, fsync,
fallocate, truncate, SEEK_DATA/SEEK_HOLE.

Layer: personality.  Imports ``ufs.iomap`` (IomapOps/DioOps, dio_rw, IoMap and flags),
``ufs.vfs`` (buffered I/O, WritebackOps, ops contract), ``ufs.errors`` and this package.

Design (sem §5, §6):
- Extents are HOLE / MAPPED / UNWRITTEN (on disk, ``EXT_UNWRITTEN``) / DELALLOC (in memory
  only: ``inode.delalloc`` ranges reserved against free space by buffered writes).
- Buffered writes map holes as DELALLOC; write-back (``XfsWritebackOps.map_blocks``) allocates
  the reservation as UNWRITTEN extents, and ``writeback_end`` converts what reached the device to
  written and moves the on-disk size (``disk_size``) forward to ``min(i_size, end written)``: so
  after a crash a file never shows blocks whose data did not reach the disk.
- DIO writes into holes allocate UNWRITTEN extents in ``iomap_begin`` (``MapFlag.NEW``);
  ``end_io`` converts them and moves ``i_size`` forward, after the conversion, in one
  transaction.  A mapping reaching past EOF carries ``MapFlag.DIRTY`` so the engine's FUA
  shortcut never skips the fsync that commits the size.
- Locking of DIO writes is XFS's: ``i_rwsem`` shared for block-aligned writes inside EOF; an
  unaligned write inside EOF first tries shared + ``DioFlag.OVERWRITE_ONLY`` (v5.12+); an
  unaligned or extending write otherwise takes ``i_rwsem`` exclusive, waits for other DIO
  (``inode_dio_wait``) and passes ``DioFlag.FORCE_WAIT``.  The combined ``dio_rw`` runs under
  ``i_rwsem``, which is safe because ``fsync`` never takes it: it writes back the page cache,
  logs timestamps when asked, forces the journal and flushes the device.
- ENOTBLK from the engine (a page-cache invalidation that failed before the write) is the
  only fallback: the write is redone buffered under the exclusive lock, written back and
  invalidated (best effort), as ``xfs_file_write_iter`` does.
- NOWAIT: the metadata lock is only tried, allocations and multi-extent or unaligned
  unwritten writes are EAGAIN, so a NOWAIT write never sleeps.
- fallocate/truncate take ``i_rwsem`` exclusive and ``inode_dio_wait``.
- Mapping fast path: ``map_range`` first tries the inode's ``ExtentMap.last_found`` (the
  extent the previous lookup found, cleared by every change of the map, see ``bmap``) without
  ``fs.meta_lock``; a hit is what a locked lookup would return at that moment.  A mapped or
  unwritten extent's answer depends only on the extent, the flags and ``i_size``, which the
  caller's ``i_rwsem`` keeps stable.  NOWAIT lookups always take the lock (they must fail
  while it is busy); lookups made inside a transaction of the calling thread (the map may
  still be rolled back) do not fill the cache.

Locks: ``i_rwsem`` → page-cache locks → ``fs.meta_lock`` (never held across data I/O or page
cache calls).
"""
from __future__ import annotations

import errno as _errno
import os
import time
from bisect import bisect_right

from ufs.errors import AgainError, InvalidError, NoSpaceError, NotBlockError, from_errno
from ufs.iomap import (
    DioFlag,
    DioOps,
    Iocb,
    IoMap,
    IomapOps,
    IterFlag,
    MapFlag,
    MapType,
    dio_rw,
)
from ufs.vfs import ops
from ufs.vfs.buffered import buffered_read, buffered_write, buffered_zero_range
from ufs.vfs.ops import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FileOperations,
    generic_write_checks,
)
from ufs.vfs.sync import generic_write_sync
from ufs.vfs.writeback import WritebackOps

from . import format as fmt

__all__ = [
    "MAX_ALLOC_BLK",
    "XfsDioOps",
    "XfsFileOps",
    "XfsIomapOps",
    "XfsWritebackOps",
    "fallocate",
    "seek_data_hole",
    "truncate_locked",
]

#: largest extent one iomap_begin / write-back allocation asks for
MAX_ALLOC_BLK = 1 << 16
#: blocks kept free beyond delalloc reservations (metadata of the conversions)
DELALLOC_SLACK_BLK = 64

_NOWAIT = int(IterFlag.NOWAIT)
_WRITE = int(IterFlag.WRITE)
_DIRECT = int(IterFlag.DIRECT)
_ZERO = int(IterFlag.ZERO)
_OVERWRITE_ONLY = int(IterFlag.OVERWRITE_ONLY)
# Plain ints for the per-I/O paths: IntFlag/IntEnum arithmetic costs about a microsecond per
# operator there.
_IOCB_DIRECT = int(Iocb.DIRECT)
_IOCB_NOWAIT = int(Iocb.NOWAIT)
_DIO_FORCE_WAIT = int(DioFlag.FORCE_WAIT)
_DIO_OVERWRITE_ONLY = int(DioFlag.OVERWRITE_ONLY)
_DIO_UNWRITTEN = int(DioFlag.UNWRITTEN)
_MAP_F_NEW = int(MapFlag.NEW)
_MAP_F_DIRTY = int(MapFlag.DIRTY)
_MAPPED = int(MapType.MAPPED)
_UNWRITTEN_T = int(MapType.UNWRITTEN)
UNWRITTEN = fmt.EXT_UNWRITTEN
_time_ns = time.time_ns
BLK_INF = 1 << 62


def _first(rng) -> int:
    return rng[0]


def _ceil_blk(pos: int, bs: int) -> int:
    return -(-pos // bs)


class XfsIomapOps(IomapOps):
    """``iomap_begin`` of xfslike (reads, buffered writes, DIO writes, zeroing, reports)."""

    def __init__(self, fs, fops):
        self.fs = fs
        self.fops = fops

    def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
        self.fops.map_range(inode, pos, length, flags, iomap)


class XfsDioOps(DioOps):
    """DIO write completion: unwritten conversion and the size update (sem §5.5)."""

    def __init__(self, fs):
        self.fs = fs

    def end_io(self, iocb, size, error, flags):
        if error or size <= 0:
            return
        inode = iocb.ki_filp.f_inode
        end = iocb.ki_pos + size
        # An overwrite of written blocks inside the on-disk size changes no metadata: nothing
        # to convert, no size to move.  (Blocks cannot turn unwritten under an in-flight DIO:
        # fallocate/truncate take i_rwsem exclusive and wait for DIO first.)
        if not flags & _DIO_UNWRITTEN and end <= inode.disk_size and end <= inode.i_size:
            return
        self.fs.fops.dio_write_done(inode, iocb.ki_pos, size)
        return


class XfsWritebackOps(WritebackOps):
    """Write-back of buffered data: delalloc → unwritten allocation → conversion at the end."""

    def __init__(self, fs):
        self.fs = fs

    def map_blocks(self, inode, pos: int, length: int) -> IoMap:
        return self.fs.fops.map_writeback(inode, pos, length)

    def writeback_end(self, inode, pos: int, length: int, error: int) -> None:
        if error:
            return
        self.fs.fops.convert_written(inode, pos, length, min(inode.i_size, pos + length))


class XfsFileOps(FileOperations):
    """``inode.i_fop`` of xfslike inodes, and the mapping logic behind the iomap ops."""

    def __init__(self, fs):
        self.fs = fs
        self.bs = fs.block_size
        self.bits = fs.blkbits
        self.iomap_ops = XfsIomapOps(fs, self)
        self.dio_ops = XfsDioOps(fs)

    # -- mapping ----------------------------------------------------------------------------
    def _fill(self, iomap, kind, start_blk, len_blk, dev_blk=None) -> None:
        bs = self.bs
        iomap.offset = start_blk * bs
        iomap.length = len_blk * bs
        iomap.type = kind
        if dev_blk is not None:
            iomap.addr = dev_blk * bs
            iomap.bdev = self.fs.dev

    @staticmethod
    def _delalloc_at(inode, blk):
        """(range containing blk or None, start of the next range or None)."""
        dl = inode.delalloc
        i = bisect_right(dl, blk, key=_first) - 1
        if i >= 0 and dl[i][0] + dl[i][1] > blk:
            return (dl[i][0], dl[i][1]), None
        return None, (dl[i + 1][0] if i + 1 < len(dl) else None)

    def map_range(self, inode, pos, length, flags, iomap) -> None:
        bm = inode.bmap
        # Fast path (every overwrite): the extent found last still contains pos.  The cache
        # (ExtentMap.last_found) is cleared by every change of the mapping, so it is what a
        # locked lookup would find now.  NOWAIT always looks up under the lock: it must fail
        # with EAGAIN while the metadata lock is busy (xfs_ilock_nowait).
        if bm is not None and not flags & _NOWAIT:
            e = bm.last_found
            if e is not None and not e[0] <= pos >> self.bits < e[0] + e[2]:
                e = None
        else:
            e = None
        if e is None:
            lock = self.fs.meta_lock
            # Inside a transaction of this thread the map may still be rolled back: no
            # caching then (nor with a lock that cannot say who owns it).
            is_owned = getattr(lock, "_is_owned", None)
            cache = is_owned is not None and not is_owned()
            if flags & _NOWAIT:
                # NOWAIT: never sleep on the metadata lock (sem §2.4)
                if not lock.acquire(blocking=False):
                    raise AgainError(_errno.EAGAIN, "metadata busy (NOWAIT)")
            else:
                lock.acquire()
            try:
                e = self._map_locked(inode, pos, length, flags, iomap, cache)
            finally:
                lock.release()
            if e is None:
                return
        # A written or unwritten extent contains pos.  Only e, the flags and i_size (stable
        # under the caller's i_rwsem) matter from here: no metadata lock needed.
        bs = self.bs
        iomap.offset = e[0] * bs
        iomap.length = e[2] * bs
        iomap.type = _UNWRITTEN_T if e[3] & UNWRITTEN else _MAPPED
        iomap.addr = e[1] * bs
        iomap.bdev = self.fs.dev
        if flags & _WRITE and flags & _DIRECT:
            if flags & (_NOWAIT | _OVERWRITE_ONLY) and e[0] + e[2] < (
                    (pos + length + bs - 1) >> self.bits):
                raise AgainError(_errno.EAGAIN, "write spans more than one extent")
            if flags & _OVERWRITE_ONLY and e[3] & UNWRITTEN and (pos | length) & (bs - 1):
                raise AgainError(_errno.EAGAIN, "unaligned write to an unwritten extent")
            if pos + length > inode.i_size:
                iomap.flags |= _MAP_F_DIRTY

    def _map_locked(self, inode, pos, length, flags, iomap, cache: bool):
        """The extent containing ``pos`` (cached in ``last_found`` when ``cache``), or None
        after mapping the hole/delalloc/new allocation there into ``iomap``."""
        fs = self.fs
        bs = self.bs
        bits = self.bits
        blk = pos >> bits
        end_blk = (pos + length + bs - 1) >> bits
        bm = inode.bmap
        if bm is None:
            bm = fs.bmap(inode)
        e, nxt = bm.find(blk)
        if e is not None:
            if cache:
                bm.last_found = e
            return e
        d, dnext = self._delalloc_at(inode, blk)
        if d is not None:
            if flags & _WRITE and flags & _DIRECT:
                # the engine wrote the page cache back first; a reservation left here
                # means a racing buffered write: let the caller fall back
                raise NotBlockError(_errno.ENOTBLK, "delayed allocation under a DIO write")
            lim = d[0] + d[1] if nxt is None else min(d[0] + d[1], nxt)
            self._fill(iomap, MapType.DELALLOC, blk, lim - blk)
            return
        hole_end = min(x for x in (nxt, dnext, BLK_INF >> self.bits) if x is not None)
        if not flags & _WRITE or flags & _ZERO:
            self._fill(iomap, MapType.HOLE, blk, hole_end - blk)
            return
        want = min(end_blk, hole_end) - blk
        if flags & _DIRECT:
            if flags & (_NOWAIT | _OVERWRITE_ONLY):
                raise AgainError(_errno.EAGAIN, "DIO write needs an allocation")
            start, got = self._alloc_unwritten(inode, blk, min(want, MAX_ALLOC_BLK))
            self._fill(iomap, MapType.UNWRITTEN, blk, got, start)
            iomap.flags |= _MAP_F_NEW
            if pos + length > inode.i_size:
                iomap.flags |= _MAP_F_DIRTY
            return
        # buffered write into a hole: delayed allocation
        want = min(want, MAX_ALLOC_BLK)
        self._reserve(want)
        self._add_delalloc(inode, blk, want)
        fs.mark_dirty(inode)
        self._fill(iomap, MapType.DELALLOC, blk, want)

    def _reserve(self, nblk: int) -> None:
        fs = self.fs
        # what data can really get: AGFL blocks and the AGFL refill reserve are free but
        # never become file data, so promising them loses the write at write-back
        free = fs.md.alloc.avail_blocks()
        if free - fs.delalloc_blk - DELALLOC_SLACK_BLK < nblk:
            raise NoSpaceError(_errno.ENOSPC, "no space for a delayed allocation")
        fs.delalloc_blk += nblk

    @staticmethod
    def _add_delalloc(inode, blk, n) -> None:
        """Record a reservation, merging it with touching neighbours (sequential writes
        keep one range, so lookups stay O(log n))."""
        dl = inode.delalloc
        i = bisect_right(dl, blk, key=_first)
        if i > 0 and dl[i - 1][0] + dl[i - 1][1] == blk:
            dl[i - 1][1] += n
            if i < len(dl) and dl[i][0] == blk + n:
                dl[i - 1][1] += dl[i][1]
                del dl[i]
        elif i < len(dl) and dl[i][0] == blk + n:
            dl[i][0] = blk
            dl[i][1] += n
        else:
            dl.insert(i, [blk, n])
        inode.delalloc_blk += n

    def _alloc_unwritten(self, inode, blk: int, want: int):
        """Allocate up to ``want`` blocks for file block ``blk`` as one unwritten extent."""
        fs = self.fs
        with fs.trans() as tx:
            start, got = self._alloc_near(tx, inode, blk, want)
            fs.bmap(inode).set_range(tx, blk, blk + got, [(blk, start, got, UNWRITTEN)])
            inode.di.nblocks += got
            fs.log_inode(tx, inode)
        return start, got

    def _alloc_near(self, tx, inode, blk, want):
        fs = self.fs
        bm = fs.bmap(inode)
        e, _ = bm.find(blk - 1) if blk else (None, None)
        near = e[1] + (blk - e[0]) if e is not None else inode.i_ino // fs.ipb
        return fs.md.alloc.alloc(tx, near, 1, want, userdata=True)

    def map_writeback(self, inode, pos: int, length: int) -> IoMap:
        fs = self.fs
        blk = pos >> self.bits
        end_blk = _ceil_blk(pos + length, self.bs)
        iomap = IoMap()
        with fs.meta_lock:
            bm = fs.bmap(inode)
            e, nxt = bm.find(blk)
            if e is not None:
                kind = MapType.UNWRITTEN if e[3] & UNWRITTEN else MapType.MAPPED
                self._fill(iomap, kind, e[0], e[2], e[1])
                return iomap
            d, _next = self._delalloc_at(inode, blk)
            if d is not None:
                lim = d[0] + d[1]
            else:
                lim = end_blk          # dirty pages over a hole without a reservation
            if nxt is not None:
                lim = min(lim, nxt)
            want = min(lim - blk, MAX_ALLOC_BLK)
            with fs.trans() as tx:
                start, got = self._alloc_near(tx, inode, blk, want)
                bm.set_range(tx, blk, blk + got, [(blk, start, got, UNWRITTEN)])
                inode.di.nblocks += got
                fs.log_inode(tx, inode)
            fs.drop_delalloc(inode, blk, blk + got)
            fs.stats["writeback_allocs"] += 1
            self._fill(iomap, MapType.UNWRITTEN, blk, got, start)
            return iomap

    def convert_written(self, inode, pos: int, length: int, new_disk_size: int) -> None:
        """Data of ``[pos, pos+length)`` is on the device: convert unwritten blocks there to
        written and move the on-disk size forward to ``new_disk_size`` (one transaction)."""
        fs = self.fs
        bs = self.bs
        a, b = pos >> self.bits, _ceil_blk(pos + length, bs)
        with fs.meta_lock:
            bm = fs.bmap(inode)
            unw = [e for e in bm.overlapping(a, b) if e[3] & UNWRITTEN]
            grow = new_disk_size > inode.disk_size
            if not unw and not grow:
                return
            with fs.trans() as tx:
                for e in unw:
                    s, t = max(a, e[0]), min(b, e[0] + e[2])
                    bm.set_range(tx, s, t, [(s, e[1] + (s - e[0]), t - s, 0)])
                if grow:
                    inode.disk_size = new_disk_size
                fs.log_inode(tx, inode)

    def dio_write_done(self, inode, pos: int, size: int) -> None:
        """end_io of a DIO write: convert, then move i_size forward (never back)."""
        end = pos + size
        with self.fs.meta_lock:
            self.convert_written(inode, pos, size, max(inode.disk_size, end))
            inode.i_size = max(inode.i_size, end)

    # -- read / write -----------------------------------------------------------------------
    def _check_dio_align(self, pos: int, count: int) -> None:
        lbs = self.fs.dev.logical_block_size
        if (pos | count) & (lbs - 1):
            raise InvalidError(_errno.EINVAL, f"O_DIRECT I/O at {pos}+{count} is not aligned "
                                              f"to the {lbs}-byte logical block size")

    def read_iter(self, iocb, buf):
        filp = iocb.ki_filp
        filp.check_readable()
        inode = filp.f_inode
        sem = inode.i_rwsem
        ki_flags = iocb.ki_flags
        if ki_flags & _IOCB_NOWAIT:
            if not sem.down_read_trylock():
                raise AgainError(_errno.EAGAIN, "i_rwsem busy (NOWAIT)")
        else:
            sem.down_read()
        try:
            if ki_flags & _IOCB_DIRECT:
                mv = memoryview(buf).cast("B")
                self._check_dio_align(iocb.ki_pos, len(mv))
                if iocb.ki_pos >= inode.i_size or not len(mv):
                    return 0
                return dio_rw(iocb, mv, self.iomap_ops, None, 0)
            return buffered_read(iocb, buf, self.iomap_ops)
        finally:
            sem.up_read()

    def _file_modified(self, inode) -> None:
        """file_modified(): mtime/ctime to now, in core; logged by the next transaction on the
        inode, fsync or sync_fs.  Runs once per write, so the common case (the inode is on
        the dirty list already) takes no lock: ``core_dirty`` is set before the membership
        test, and sync_fs only drops an inode whose ``core_dirty`` is clear."""
        inode.i_mtime_ns = inode.i_ctime_ns = _time_ns()
        inode.core_dirty = True
        fs = self.fs
        if inode not in fs._dirty:
            fs.mark_dirty(inode)

    def _zero_eof_gap(self, inode, pos: int) -> None:
        """Writing at ``pos`` past EOF: zero the rest of the old EOF block (iomap_zero_range)."""
        size = inode.i_size
        if pos > size and size % self.bs:
            end = min(pos, size - size % self.bs + self.bs)
            buffered_zero_range(inode, size, end - size, self.iomap_ops)
            inode.i_mapping.write_and_wait_range(size - size % self.bs, end)

    def write_iter(self, iocb, data):
        filp = iocb.ki_filp
        filp.check_writable()
        if iocb.ki_flags & _IOCB_DIRECT:
            return self._dio_write(iocb, data)
        return self._buffered_write(iocb, data)

    def _lock(self, sem, exclusive: bool, nowait: bool) -> None:
        if nowait:
            ok = sem.down_write_trylock() if exclusive else sem.down_read_trylock()
            if not ok:
                raise AgainError(_errno.EAGAIN, "i_rwsem busy (NOWAIT)")
        elif exclusive:
            sem.down_write()
        else:
            sem.down_read()

    def _buffered_write(self, iocb, data):
        inode = iocb.ki_filp.f_inode
        sem = inode.i_rwsem
        self._lock(sem, True, bool(iocb.ki_flags & _IOCB_NOWAIT))
        try:
            view = memoryview(data).cast("B")
            count = ops.generic_write_checks(iocb, len(view), self.fs.s_maxbytes)
            if count == 0:
                return 0
            self._zero_eof_gap(inode, iocb.ki_pos)
            written = buffered_write(iocb, view[:count], self.iomap_ops)
            if written:
                self._file_modified(inode)
        finally:
            sem.up_write()
        if written > 0:
            written = generic_write_sync(iocb, written)
        return written

    def _dio_write(self, iocb, data):
        inode = iocb.ki_filp.f_inode
        sem = inode.i_rwsem
        nowait = iocb.ki_flags & _IOCB_NOWAIT
        if type(data) is memoryview and data.format == "B" and data.ndim == 1 \
                and data.c_contiguous:
            view = data
        else:
            view = memoryview(data).cast("B")
        nbytes = len(view)
        bs = self.bs
        s_maxbytes = self.fs.s_maxbytes
        lbs_mask = self.fs.dev.logical_block_size - 1
        exclusive = False
        if nowait:
            if not sem.down_read_trylock():
                raise AgainError(_errno.EAGAIN, "i_rwsem busy (NOWAIT)")
        else:
            sem.down_read()
        try:
            while True:
                count = generic_write_checks(iocb, nbytes, s_maxbytes)
                pos = iocb.ki_pos
                if count == 0:
                    return 0
                if (pos | count) & lbs_mask:
                    self._check_dio_align(pos, count)
                unaligned = (pos | count) & (bs - 1)
                extending = pos + count > inode.i_size
                if exclusive or not (unaligned or extending):
                    break
                if unaligned and not extending:
                    # v5.12+: try the shared lock with OVERWRITE_ONLY first
                    try:
                        self._file_modified(inode)
                        return dio_rw(iocb, view[:count], self.iomap_ops, self.dio_ops,
                                      _DIO_OVERWRITE_ONLY)
                    except AgainError:
                        if nowait:
                            raise
                        self.fs.stats["dio_overwrite_only_retry"] += 1
                if nowait:
                    raise AgainError(_errno.EAGAIN, "unaligned or extending DIO write (NOWAIT)")
                sem.up_read()
                sem.down_write()
                exclusive = True
            dio_flags = 0
            if exclusive:
                inode.inode_dio_wait()
                dio_flags = _DIO_FORCE_WAIT
                self._zero_eof_gap(inode, pos)
            self._file_modified(inode)
            try:
                return dio_rw(iocb, view if count == nbytes else view[:count], self.iomap_ops,
                              self.dio_ops, dio_flags)
            except NotBlockError:
                # fall back to buffered I/O (exclusive), then write it back (O_DIRECT
                # coherence): xfs_file_write_iter's only fallback
                if not exclusive:
                    if nowait:
                        raise AgainError(_errno.EAGAIN, "DIO fallback would block") from None
                    sem.up_read()
                    sem.down_write()
                    exclusive = True
                    inode.inode_dio_wait()
                n = buffered_write(iocb, view[:count], self.iomap_ops)
                inode.i_mapping.write_and_wait_range(pos, pos + n)
                try:
                    inode.i_mapping.invalidate_range(pos, pos + n)   # best effort
                except OSError:
                    pass
                self.fs.stats["dio_buffered_fallback"] += 1
                if n > 0:
                    n = generic_write_sync(iocb, n)
                return n
        finally:
            if exclusive:
                sem.up_write()
            else:
                sem.up_read()

    # -- sync -------------------------------------------------------------------------------
    def fsync(self, file, start: int, end: int, datasync: bool) -> None:
        """Write back, log timestamps (unless datasync), force the journal, flush the device.
        Never takes ``i_rwsem`` (sem §5.6)."""
        fs = self.fs
        inode = file.f_inode
        if fs.readonly:
            return
        inode.i_mapping.write_and_wait_range(start, None if end >= ops.FSYNC_END else end)
        if inode.core_dirty and not datasync and inode.i_nlink:
            with fs.trans() as tx:
                fs.log_inode(tx, inode)
        with fs.meta_lock:
            fs.md.log.force()
        fs.dev.flush()
        fs.stats["fsyncs"] += 1

    def open(self, inode, file) -> None:
        pass

    def release(self, inode, file) -> None:
        pass


# -- size changes, fallocate, seek (called under i_rwsem exclusive by the VFS) ---------------

def truncate_locked(fs, inode, new_size: int) -> None:
    """setattr(size): zero the new EOF block's tail, drop cached pages and blocks past EOF,
    log the size.  ``i_rwsem`` held exclusive."""
    bs = fs.block_size
    fops = fs.fops
    inode.inode_dio_wait()
    old = inode.i_size
    mapping = inode.i_mapping
    if new_size < old:
        if new_size % bs:
            tail_end = new_size - new_size % bs + bs
            buffered_zero_range(inode, new_size, tail_end - new_size, fops.iomap_ops)
            mapping.write_and_wait_range(new_size - new_size % bs, tail_end)
        mapping.truncate_pages(new_size)
        inode.i_size = new_size
        fs.free_blocks_from(inode, _ceil_blk(new_size, bs), new_size)
    else:
        if old % bs:
            # the bytes past the old EOF must read as zeros once inside the file
            tail_end = min(new_size, old - old % bs + bs)
            buffered_zero_range(inode, old, tail_end - old, fops.iomap_ops)
            mapping.write_and_wait_range(old - old % bs, tail_end)
        inode.i_size = new_size
        with fs.trans() as tx:
            inode.disk_size = new_size
            fs.log_inode(tx, inode)


def _prealloc(fs, inode, a: int, b: int) -> None:
    """Allocate unwritten extents over the holes of file blocks [a, b)."""
    fops = fs.fops
    blk = a
    while blk < b:
        with fs.meta_lock:
            e, nxt = fs.bmap(inode).find(blk)
            if e is not None:
                blk = e[0] + e[2]
                continue
            lim = b if nxt is None else min(b, nxt)
            fops._alloc_unwritten(inode, blk, min(lim - blk, MAX_ALLOC_BLK))


def _punch(fs, inode, a: int, b: int) -> None:
    """Unmap and free file blocks [a, b) (page cache already written back and dropped)."""
    while True:
        with fs.trans() as tx:
            bm = fs.bmap(inode)
            exts = bm.overlapping(a, b)
            if not exts:
                break
            batch = exts[:8]
            hi = min(b, batch[-1][0] + batch[-1][2])
            for piece in bm.set_range(tx, a, hi, []):
                fs.md.alloc.free(tx, piece[1], piece[2])
                inode.di.nblocks -= piece[2]
            fs.log_inode(tx, inode)
        a = hi
        if a >= b:
            break
    fs.drop_delalloc(inode, a, b)


def fallocate(fs, inode, mode: int, pos: int, length: int) -> None:
    # Collapse and insert shift every extent past the range; xfslike does not implement
    # the shift, so it says so (as a filesystem without them does) rather than doing
    # something else.  UNSHARE_RANGE is a preallocation here: nothing is ever shared.
    if mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE):
        raise from_errno(_errno.EOPNOTSUPP, "xfslike does not collapse or insert ranges")
    inode.i_rwsem.down_write()
    try:
        inode.inode_dio_wait()
        bs = fs.block_size
        end = pos + length
        mapping = inode.i_mapping
        fops = fs.fops
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            mapping.write_and_wait_range(pos - pos % bs, _ceil_blk(end, bs) * bs)
            size = inode.i_size
            a, b = _ceil_blk(pos, bs), end // bs
            # partial blocks at the edges: zero through the cache (only inside EOF matters)
            for zs, ze in ((pos, min(end, a * bs)), (max(pos, b * bs), end)):
                ze = min(ze, size)
                if zs < ze and not (a < b and a * bs <= zs and ze <= b * bs):
                    buffered_zero_range(inode, zs, ze - zs, fops.iomap_ops)
                    mapping.write_and_wait_range(zs - zs % bs, _ceil_blk(ze, bs) * bs)
            if a < b:
                mapping.invalidate_range(a * bs, b * bs)
                fs.drop_delalloc(inode, a, b)
                _punch(fs, inode, a, b)
            if mode & FALLOC_FL_ZERO_RANGE:
                _prealloc(fs, inode, pos // bs, _ceil_blk(end, bs))
        else:
            mapping.write_and_wait_range(pos - pos % bs, _ceil_blk(end, bs) * bs)
            _prealloc(fs, inode, pos // bs, _ceil_blk(end, bs))
        old = inode.i_size
        if not mode & FALLOC_FL_KEEP_SIZE and end > old and old % bs:
            # growing the file: the rest of the old EOF block must read as zeros (XFS goes
            # through setattr(size), which zeroes it); it may hold bytes a failed DIO wrote
            tail_end = min(end, old - old % bs + bs)
            buffered_zero_range(inode, old, tail_end - old, fops.iomap_ops)
            mapping.write_and_wait_range(old - old % bs, tail_end)
        with fs.trans() as tx:
            if not mode & FALLOC_FL_KEEP_SIZE and end > inode.i_size:
                inode.i_size = end
                inode.disk_size = max(inode.disk_size, end)
            inode.i_ctime_ns = inode.i_mtime_ns = time.time_ns()    # file_modified()
            fs.log_inode(tx, inode)
    finally:
        inode.i_rwsem.up_write()


def seek_data_hole(fs, inode, pos: int, whence: int) -> int:
    """SEEK_DATA/SEEK_HOLE: MAPPED and DELALLOC are data; UNWRITTEN is data only where the page
    cache holds dirty (written, not yet written back) blocks -- zero-filled pages cached by a
    read are not data; EOF is a hole."""
    bs = fs.block_size
    size = inode.i_size
    mapping = inode.i_mapping
    ps = mapping.page_size

    def runs():
        """(start byte, end byte, is_data) from the block holding pos, in order."""
        blk = pos // bs
        while blk * bs < size:
            with fs.meta_lock:
                e, nxt = fs.bmap(inode).find(blk)
                if e is not None:
                    s, t = blk * bs, (e[0] + e[2]) * bs
                    unw = bool(e[3] & UNWRITTEN)
                    blk = e[0] + e[2]
                else:
                    d, dnext = XfsFileOps._delalloc_at(inode, blk)
                    if d is not None:
                        lim = d[0] + d[1] if nxt is None else min(d[0] + d[1], nxt)
                        yield blk * bs, lim * bs, True
                        blk = lim
                        continue
                    lim = min(x for x in (nxt, dnext, _ceil_blk(size, bs)) if x is not None)
                    yield blk * bs, lim * bs, False
                    blk = max(lim, blk + 1)
                    continue
            if not unw:
                yield s, t, True
                continue
            p = s
            while p < t:
                q = min(t, p - p % ps + ps)
                yield p, q, mapping.has_dirty(p, q)
                p = q

    for s, t, is_data in runs():
        s = max(s, pos)
        if s >= t:
            continue
        if s >= size:
            break
        if whence == os.SEEK_DATA and is_data:
            return s
        if whence == os.SEEK_HOLE and not is_data:
            return s
    if whence == os.SEEK_DATA:
        raise from_errno(_errno.ENXIO, "no data past this offset")
    return size

"""The data path of btrfslike: DIO through the iomap engine, checksums, fsync, fallocate.

Layer: personality.  Imports ``ufs.iomap`` (the engine: dio_start/dio_complete/dio_rw,
IomapOps/DioOps), ``ufs.vfs`` (ops contract), ``ufs.errors`` and this package.

Design (sem §4.3/§4.4, the seed patch):
- Every write is copy-on-write unless the inode is NODATACOW and the extent under it is not
  shared: ``iomap_begin`` reserves a new data extent (``alloc_data``), maps it MAPPED with
  ``NEW|DIRTY`` (DIRTY: the completion changes metadata, so the engine's FUA shortcut never
  skips the sync that must commit it) and raises ``i_size`` there, as btrfs does.  ``end_io``
  inserts the file extent items (``drop_extents`` + ``add_extent``) and the checksums, and
  records the new on-disk size; on error it gives the reservations back and undoes the
  ``i_size`` it raised.  A full device with space pinned by this transaction (freed extents
  come back only with a commit, and fsyncs write the log instead of committing) commits and
  retries before shrinking the request or failing with ENOSPC.
- Checksums: writes of checksummed inodes use ``DioFlag.BOUNCE`` (the device gets a stable
  copy) and checksum each bio in ``submit_io`` from ``bio.data`` (that copy), so a caller
  changing its buffer mid-write cannot create a mismatch.  Reads of checksummed inodes go
  through an aligned bounce buffer; each sector is verified against the csum tree before a
  byte reaches the caller: a mismatch is EIO (``IOFailure``) naming the device address.
- No page cache: a write that is not O_DIRECT, or not sector-aligned, is a read-modify-write
  of whole sectors done through the same DIO path (synchronous), and reads likewise; so the
  page cache of a btrfslike inode is always empty and DIO/buffered coherency is trivial.
- ``dio_complete=`` mount option (the seed): ``unlocked`` (default) does ``dio_start`` under
  ``i_rwsem``, releases it, then ``dio_complete``; ``locked`` calls ``dio_rw`` under
  ``i_rwsem`` (O_DSYNC then self-deadlocks in fsync: EDEADLK with lockdep, a hung-task report
  without); ``marker`` completes under ``i_rwsem`` with a per-task marker (a ContextVar naming
  the inode) that tells fsync the lock is already held by this task (btrfs cd9253c23aed).
- ``fsync`` takes ``i_rwsem`` exclusive (unless the marker says this task holds it) and
  ``i_mmap_lock`` shared, builds one fsync log record for the inode (``tree_log``), drops both
  locks (the marker's ``i_rwsem`` stays with its task) and writes the record (a cache flush,
  then the record with FUA; or, checksummed, the record then one flush); it falls back to a
  full transaction commit, under the locks, for the cases the log does not cover
  (``tree_log.FALLBACK_REASONS``).  With nothing to log it still
  flushes the device cache (NODATACOW overwrites change no metadata).

Locks: ``inode.i_rwsem`` (VFS) → ``inode.i_mmap_lock`` → ``tm.lock``.  ``tm.lock`` is held only
around metadata work in iomap_begin/end_io, never across data I/O.
"""
from __future__ import annotations

import contextvars
import errno as _errno
import logging
import os

from ufs.errors import AgainError, InvariantError, IOFailure, NoSpaceError, from_errno
from ufs.iomap import (
    EIOCBQUEUED,
    DioFlag,
    DioOps,
    Iocb,
    IomapOps,
    IterFlag,
    Kiocb,
    MapFlag,
    MapType,
    aligned_buffer,
    dio_complete,
    dio_rw,
    dio_start,
)
from ufs.iomap.csum import block_csums
from ufs.vfs import ops
from ufs.vfs.ops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FileOperations,
)

from . import tree_log
from .format import FILE_EXTENT_REG, U64_MAX
from .inode import add_extent, drop_extents, extent_items, extent_len, new_reg_extent

__all__ = ["DIO_WRITE_MARKER", "MAX_EXTENT_BYTES", "BtrfsFileOps"]

log = logging.getLogger("ufs.fs_btrfslike")

#: Per-task marker: the inode whose DIO write this task is completing under ``i_rwsem``
#: (``dio_complete=marker``).  A ContextVar, so another thread using the same file never
#: sees it (the bug of per-file state, btrfs cd9253c23aed).
DIO_WRITE_MARKER = contextvars.ContextVar("btrfslike_dio_write", default=None)

MAX_EXTENT_BYTES = 8 << 20


class _Filp:
    """The ``ki_filp`` of internal I/O (read-modify-write): only ``f_inode`` is used."""

    __slots__ = ("f_inode",)

    def __init__(self, inode):
        self.f_inode = inode


class _WriteState:
    __slots__ = (
        "csums",
        "ended",
        "inode",
        "old_isize",
        "raised_to",
        "res",
        "size_end",
        "start",
        "sum",
        "tree",
    )

    def __init__(self, inode, start, size_end, csum):
        self.inode, self.start, self.size_end = inode, start, size_end
        self.res = []              # [pos, reserved bytes, disk addr] per COW mapping
        self.csums = {}            # bio device addr -> per-sector crc32c (submit_io)
        self.old_isize = inode.i_size
        self.raised_to = 0
        self.sum = csum
        self.ended = False


class _ReadState:
    __slots__ = ("maps",)

    def __init__(self):
        self.maps = []             # (file pos, length, disk addr) of MAPPED read mappings


class _MapOps(IomapOps):
    """iomap_begin of btrfslike; the per-I/O state is the dio's ``private``."""

    def __init__(self, fops):
        self.fops = fops

    def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
        if flags & IterFlag.WRITE:
            self.fops._map_write(inode, pos, length, flags, iomap, iomap.iter_private)
        else:
            self.fops._map_read(inode, pos, length, iomap, iomap.iter_private)


class _WriteDops(DioOps):
    def __init__(self, fops, st):
        self.fops, self.st = fops, st

    def end_io(self, iocb, size, error, flags):
        return self.fops._write_end_io(self.st, size, error)


class _CsumWriteDops(_WriteDops):
    def submit_io(self, iter, bio, file_offset):
        # bio.data is the bounce copy the device will get (DioFlag.BOUNCE): stable
        self.st.csums[bio.addr] = block_csums(bio, self.fops.ss)
        bio.submit()


class _ReadDops(DioOps):
    """Ends the read's registration (``sb.read_end``) when the dio completes, also for an
    asynchronous read completed by another thread."""

    def __init__(self, sb, epoch, verify=None):
        self.sb, self.epoch = sb, epoch
        # (fops, inode, st, buf): check the sectors read against the csum tree at
        # completion, as btrfs verifies a direct read in its end_io (an async read's
        # ki_complete then sees EIO, not the bad bytes' count)
        self.verify = verify

    def end_io(self, iocb, size, error, flags):
        try:
            if self.verify is not None and error == 0 and size > 0:
                fops, inode, st, buf = self.verify
                self.verify = None
                fops._verify(inode, st, buf, iocb.ki_pos, size)
        finally:
            if self.epoch is not None:
                self.sb.read_end(self.epoch)
                self.epoch = None


class BtrfsFileOps(FileOperations):
    """``inode.i_fop`` of btrfslike inodes."""

    def __init__(self, sb):
        self.sb = sb
        self.tm = sb.tm
        self.ss = sb.ss
        self.map_ops = _MapOps(self)

    # -- mapping -----------------------------------------------------------------------------
    def _raise_isize(self, inode, st, end):
        end = min(end, st.size_end)
        if end > inode.i_size:
            inode.i_size = end
            st.raised_to = end

    def _map_write(self, inode, pos, length, flags, iomap, st):
        ss = self.ss
        tm = self.tm
        with tm.lock:
            trans = tm.start()
            tree = tm.tree(inode.tree_id)
            if inode.nodatacow:
                items = extent_items(tree, inode.objectid, pos, pos + 1)
                if items:
                    kpos, fe = items[0]
                    if (fe.type == FILE_EXTENT_REG and fe.disk_bytenr
                            and fe.generation > tree.last_snapshot
                            and tm.extents.refs(fe.disk_bytenr) == 1):
                        n = min(length, kpos + fe.num_bytes - pos)
                        iomap.type = MapType.MAPPED
                        iomap.addr = fe.disk_bytenr + fe.offset + (pos - kpos)
                        iomap.offset, iomap.length = pos, n
                        iomap.bdev = self.sb.dev
                        if pos + n > inode.disk_size:
                            iomap.flags = MapFlag.DIRTY
                        self._raise_isize(inode, st, pos + n)
                        return
            if flags & IterFlag.NOWAIT:
                # as btrfs: a NOWAIT write must not allocate (only NOCOW overwrites qualify)
                raise AgainError(_errno.EAGAIN, "NOWAIT DIO write needs a new extent")
            n = min(length, MAX_EXTENT_BYTES)
            n = (n + ss - 1) // ss * ss
            while True:
                try:
                    addr = tm.extents.alloc_data(trans, n)
                    break
                except NoSpaceError:
                    if tm.extents.pinned_bytes >= n:
                        # space freed in this transaction (overwrites: copy-on-write; fsyncs
                        # write the log, not commits) comes back with a commit
                        tm.commit()
                        trans = tm.start()
                        continue
                    if n <= ss:
                        raise
                    n = max(ss, n // 2 // ss * ss)
            st.res.append([pos, n, addr])
        iomap.type = MapType.MAPPED
        iomap.addr, iomap.offset, iomap.length = addr, pos, n
        iomap.flags = MapFlag.NEW | MapFlag.DIRTY
        iomap.bdev = self.sb.dev
        self._raise_isize(inode, st, pos + n)

    def _map_read(self, inode, pos, length, iomap, st):
        tm = self.tm
        with tm.lock:
            tree = tm.tree(inode.tree_id)
            items = extent_items(tree, inode.objectid, pos, pos + 1)
            iomap.offset = pos
            if items:
                kpos, fe = items[0]
                fend = kpos + extent_len(fe)
                if fe.type == FILE_EXTENT_REG and fe.disk_bytenr:
                    iomap.type = MapType.MAPPED
                    iomap.addr = fe.disk_bytenr + fe.offset + (pos - kpos)
                    iomap.length = fend - pos
                    iomap.bdev = self.sb.dev
                    if st is not None:
                        st.maps.append((pos, fend - pos, iomap.addr))
                    return
                iomap.type = MapType.HOLE         # prealloc reads as zeros
                iomap.length = fend - pos
                return
            nxt = tree.next_item((inode.objectid, 108, pos))
            if nxt is not None and nxt[0][0] == inode.objectid and nxt[0][1] == 108:
                iomap.length = nxt[0][2] - pos
            else:
                iomap.length = max(length, self.ss)
            iomap.type = MapType.HOLE

    # -- completion ----------------------------------------------------------------------------
    def _csums_for(self, st, addr, nsect):
        ss = self.ss
        out = [None] * nsect
        for baddr, cs in st.csums.items():
            base = (baddr - addr) // ss
            for i, c in enumerate(cs):
                j = base + i
                if 0 <= j < nsect:
                    out[j] = c
        if None in out:
            raise InvariantError(f"DIO write to {addr:#x}: a sector was never checksummed")
        return out

    def _release_reservations(self, st, trans):
        ext = self.tm.extents
        for _pos, _n, addr in st.res:
            ext.release_data(trans, addr)
        st.res = []

    def _undo_isize(self, st, new_end):
        inode = st.inode
        if st.raised_to and inode.i_size == st.raised_to and st.raised_to > new_end:
            inode.i_size = max(new_end, st.old_isize, inode.disk_size)

    def _write_end_io(self, st, size, error):
        hook = self.sb.fault_hooks.get("dio_end_io")
        if hook is not None:
            hook(st.inode)
        tm, ss, inode = self.tm, self.ss, st.inode
        with tm.lock:
            st.ended = True
            trans = tm.start()
            if error or size <= 0:
                self._release_reservations(st, trans)
                self._undo_isize(st, st.old_isize)   # nothing was written: i_size as before
                return
            tree = tm.tree(inode.tree_id)
            done_end = st.start + size
            for pos, n, addr in st.res:
                w = min(n, max(0, done_end - pos))
                w = (w + ss - 1) // ss * ss
                if w == 0:
                    tm.extents.release_data(trans, addr)
                    continue
                drop_extents(tm, trans, tree, inode, pos, pos + w)
                add_extent(tm, trans, tree, inode, pos,
                           new_reg_extent(trans.transid, addr, n, w))
                if st.sum:
                    self.sb.csum.insert(trans, addr, self._csums_for(st, addr, w // ss))
            st.res = []
            new_end = min(done_end, st.size_end)
            inode.disk_size = max(inode.disk_size, new_end)
            inode.i_size = max(inode.i_size, new_end)
            self._undo_isize(st, new_end)
            inode.touch_mtime()
            self.sb.write_inode(trans, inode)
            self.sb.flush_freed(trans)
        return

    def _abort_write(self, st):
        """dio_start raised before any completion: give back what iomap_begin reserved."""
        if st.ended:
            return
        with self.tm.lock:
            st.ended = True
            if st.res:
                self._release_reservations(st, self.tm.start())
            self._undo_isize(st, st.old_isize)   # nothing was written: i_size as before

    # -- reads -----------------------------------------------------------------------------------
    def _verify(self, inode, st, buf, base, nbytes):
        """Check every read sector of ``buf`` (file offset ``base``) against the csum tree."""
        ss = self.ss
        limit = base + (nbytes + ss - 1) // ss * ss
        with self.tm.lock:
            for pos, ln, addr in st.maps:
                lo, hi = max(pos, base), min(pos + ln, limit)
                if lo >= hi:
                    continue
                nsect = (hi - lo) // ss
                dstart = addr + (lo - pos)
                want = self.sb.csum.lookup(dstart, nsect)
                got = block_csums(memoryview(buf)[lo - base:lo - base + nsect * ss], ss)
                for i in range(nsect):
                    if want[i] is not None and want[i] != got[i]:
                        where = dstart + i * ss
                        log.error("btrfslike: csum mismatch ino %d file pos %d device %#x: "
                                  "%#010x != %#010x", inode.i_ino, lo + i * ss, where,
                                  got[i], want[i])
                        raise IOFailure(_errno.EIO, f"data checksum mismatch at device "
                                                    f"{where:#x} (inode {inode.i_ino}, file "
                                                    f"position {lo + i * ss})")

    def _dio_read(self, iocb, buf, st, verify=None):
        """``dio_rw`` of a read, registered against extent reuse until it completes (and,
        with ``verify=inode``, checked against the csum tree before it completes)."""
        dops = _ReadDops(self.sb, self.sb.read_begin(),
                         None if verify is None else (self, verify, st, buf))
        queued = False
        try:
            ret = dio_rw(iocb, buf, self.map_ops, dops, 0, st)
            queued = ret == EIOCBQUEUED     # end_io will run at completion, maybe elsewhere
            return ret
        finally:
            # no dio (nothing to read) or an error before any I/O: no end_io ran or will run
            if not queued and dops.epoch is not None:
                self.sb.read_end(dops.epoch)
                dops.epoch = None

    def read_locked(self, inode, pos, length):
        """The file bytes ``[pos, pos + length)`` (short at EOF), verified, as a memoryview of
        a private buffer; ``i_rwsem`` held."""
        size = inode.i_size
        if pos >= size or length <= 0:
            return b""
        ss = self.ss
        end = min(pos + length, size)
        a = pos // ss * ss
        b = (end + ss - 1) // ss * ss
        buf = aligned_buffer(b - a)
        st = _ReadState()
        n = self._dio_read(Kiocb(_Filp(inode), a, int(Iocb.DIRECT)), buf, st)
        if not inode.nodatasum:
            self._verify(inode, st, buf, a, n)
        n = min(end, a + n) - pos
        return memoryview(buf)[pos - a:pos - a + max(0, n)]      # no copy: buf is ours

    def read_iter(self, iocb, buf):
        inode = iocb.ki_filp.f_inode
        sem = inode.i_rwsem
        if iocb.ki_flags & Iocb.NOWAIT:
            if not sem.down_read_trylock():
                raise AgainError(_errno.EAGAIN, "i_rwsem busy")
        else:
            sem.down_read()
        try:
            pos = iocb.ki_pos
            mv = memoryview(buf).cast("B")
            ss = self.ss
            if iocb.ki_flags & Iocb.DIRECT and pos % ss == 0 and len(mv) % ss == 0:
                # sector-aligned O_DIRECT: straight into the caller's buffer, asynchronous
                # when the kiocb is, verified in end_io
                if inode.nodatasum:
                    return self._dio_read(iocb, mv, None)
                return self._dio_read(iocb, mv, _ReadState(), verify=inode)
            data = self.read_locked(inode, pos, len(mv))
            mv[:len(data)] = data
            iocb.ki_pos = pos + len(data)
            return len(data)
        finally:
            sem.up_read()

    # -- writes ------------------------------------------------------------------------------------
    def write_sectors_locked(self, inode, pos, data, size_end=None):
        """Write ``data`` at ``pos`` as whole sectors (read-modify-write of the edges) through
        the DIO path, synchronously; ``i_rwsem`` held exclusive.  Bytes past the old EOF in
        the edge sectors are written as zeros.  Returns the bytes of ``data`` written."""
        ss = self.ss
        n = len(data)
        if n == 0:
            return 0
        old = inode.i_size
        a = pos // ss * ss
        b = (pos + n + ss - 1) // ss * ss
        buf = aligned_buffer(b - a)
        mv = memoryview(buf)
        if a < pos and a < old:
            head = self.read_locked(inode, a, ss)
            mv[:len(head)] = head
        if b > pos + n and b - ss < old and (b - ss > a or not a < pos):
            tail = self.read_locked(inode, b - ss, ss)
            mv[b - ss - a:b - ss - a + len(tail)] = tail
        mv[pos - a:pos - a + n] = memoryview(data).cast("B")
        if size_end is None:
            size_end = pos + n
        return self._dio_write_sync(inode, a, buf, size_end, pos, n)

    def _dio_write_sync(self, inode, a, buf, size_end, pos, n):
        st = _WriteState(inode, a, size_end, not inode.nodatasum)
        dops = _CsumWriteDops(self, st) if st.sum else _WriteDops(self, st)
        flags = int(DioFlag.BOUNCE) if st.sum else 0
        kiocb = Kiocb(_Filp(inode), a, int(Iocb.DIRECT | Iocb.WRITE))
        try:
            done = dio_rw(kiocb, buf, self.map_ops, dops, flags, st)
        except BaseException:
            self._abort_write(st)
            raise
        return max(0, min(n, a + done - pos))

    def _has_data(self, inode, pos):
        """Is the byte at ``pos`` mapped by a written (regular) extent?"""
        with self.tm.lock:
            items = extent_items(self.tm.tree(inode.tree_id), inode.objectid, pos, pos + 1)
        return bool(items) and items[0][1].type == FILE_EXTENT_REG and bool(items[0][1].disk_bytenr)

    def zero_eof_tail_locked(self, inode):
        """Zero the bytes past EOF in the EOF sector before the file grows past it (they may
        hold old data from before a truncate)."""
        ss, size = self.ss, inode.i_size
        if size % ss == 0:
            return
        if self._has_data(inode, size):
            tail = (size + ss - 1) // ss * ss
            self.write_sectors_locked(inode, size, bytes(tail - size), size_end=size)

    def write_iter(self, iocb, data):
        inode = iocb.ki_filp.f_inode
        sem = inode.i_rwsem
        if iocb.ki_flags & Iocb.NOWAIT:
            if not sem.down_write_trylock():
                raise AgainError(_errno.EAGAIN, "i_rwsem busy")
        else:
            sem.down_write()
        locked = True
        try:
            count = ops.generic_write_checks(iocb, len(data), self.sb.s_maxbytes)
            if count == 0:
                return 0
            data = memoryview(data).cast("B")[:count]
            pos = iocb.ki_pos
            ss = self.ss
            if pos > inode.i_size:
                self.zero_eof_tail_locked(inode)
            if not (iocb.ki_flags & Iocb.DIRECT) or pos % ss or count % ss:
                if iocb.ki_flags & Iocb.NOWAIT:
                    raise AgainError(_errno.EAGAIN, "NOWAIT write needs read-modify-write")
                n = self.write_sectors_locked(inode, pos, data)
                iocb.ki_pos = pos + n
                sem.up_write()
                locked = False
                if n and iocb.ki_flags & Iocb.DSYNC:
                    iocb.ki_filp.vfs_fsync_range(pos, pos + n, not (iocb.ki_flags & Iocb.SYNC))
                return n
            locked = False              # _direct_write releases i_rwsem on every path
            return self._direct_write(iocb, inode, data, pos, count, sem)
        finally:
            if locked:
                sem.up_write()

    def _direct_write(self, iocb, inode, data, pos, count, sem):
        """The aligned O_DIRECT write, completed as ``dio_complete=`` says.  Called with
        ``i_rwsem`` held exclusive; releases it on every path (``unlocked`` before
        ``dio_complete``, the others after it)."""
        st = _WriteState(inode, pos, pos + count, not inode.nodatasum)
        dops = _CsumWriteDops(self, st) if st.sum else _WriteDops(self, st)
        flags = int(DioFlag.BOUNCE) if st.sum else 0
        mode = self.sb.opts.dio_complete
        locked = True
        try:
            try:
                if mode == "locked":
                    # the historical combined call: completion (and O_DSYNC's fsync) under
                    # i_rwsem
                    return dio_rw(iocb, data, self.map_ops, dops, flags, st)
                dio = dio_start(iocb, data, self.map_ops, dops, flags, st)
            except BaseException:
                self._abort_write(st)
                raise
            if dio is None:
                return 0
            if isinstance(dio, int):
                return dio              # EIOCBQUEUED: the completion worker syncs
            if mode == "marker":
                token = DIO_WRITE_MARKER.set(inode)
                try:
                    return dio_complete(dio)
                finally:
                    DIO_WRITE_MARKER.reset(token)
            sem.up_write()               # the seed: complete without i_rwsem
            locked = False
            return dio_complete(dio)
        finally:
            if locked:
                sem.up_write()

    # -- sync --------------------------------------------------------------------------------------
    def fsync(self, file, start, end, datasync):
        inode = file.f_inode
        skip_ilock = DIO_WRITE_MARKER.get() is inode
        if skip_ilock:
            if not inode.i_rwsem.is_write_locked():
                raise InvariantError("DIO write marker set without i_rwsem held")
        else:
            inode.i_rwsem.down_write()
        try:
            inode.i_mmap_lock.down_read()
        except BaseException:
            if not skip_ilock:
                inode.i_rwsem.up_write()
            raise
        held = True

        def unlock():
            # as btrfs: the inode locks keep the inode still while its log record is built;
            # the record's device I/O (or the cache flush) runs without them
            nonlocal held
            if held:
                held = False
                inode.i_mmap_lock.up_read()
                if not skip_ilock:
                    inode.i_rwsem.up_write()
        try:
            # one log record (flush + FUA write, or write + flush) or, for the cases the log
            # does not cover, a full commit (tree_log.py)
            tree_log.sync_inode(self.sb, inode, unlock)
        finally:
            unlock()

    # -- truncate / fallocate ----------------------------------------------------------------------
    def truncate_locked(self, inode, size):
        """Change the size of a regular file; ``i_rwsem`` held exclusive (setattr)."""
        inode.inode_dio_wait()
        ss = self.ss
        if size > inode.i_size:
            self.zero_eof_tail_locked(inode)
            with self.tm.lock:
                trans = self.sb.start()
                inode.i_size = inode.disk_size = size
                self.sb.write_inode(trans, inode)
            return
        with self.tm.lock:
            trans = self.sb.start()
            drop_extents(self.tm, trans, self.tm.tree(inode.tree_id), inode,
                         (size + ss - 1) // ss * ss, U64_MAX)
            inode.i_size = inode.disk_size = size
            self.sb.write_inode(trans, inode)
            self.sb.flush_freed(trans)

    def fallocate(self, inode, mode, pos, length):
        sem = inode.i_rwsem
        sem.down_write()
        try:
            inode.inode_dio_wait()
            ss, end = self.ss, pos + length
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                lim = inode.i_size
                a = (pos + ss - 1) // ss * ss
                b = end // ss * ss
                # partial sectors are zeroed in place (only where data is), whole ones unmapped
                edges = [(pos, end)] if a >= b else [(pos, a), (b, end)]
                for zlo, zhi in edges:
                    zhi = min(zhi, lim)
                    sect = zlo // ss * ss
                    while sect < zhi:
                        lo, hi = max(zlo, sect), min(zhi, sect + ss)
                        if lo < hi and self._has_data(inode, sect):
                            self.write_sectors_locked(inode, lo, bytes(hi - lo), size_end=lim)
                        sect += ss
                if a < b:
                    with self.tm.lock:
                        trans = self.sb.start()
                        drop_extents(self.tm, trans, self.tm.tree(inode.tree_id), inode, a, b)
                        self.sb.write_inode(trans, inode)
                        self.sb.flush_freed(trans)
            else:
                self._prealloc(inode, pos // ss * ss, (end + ss - 1) // ss * ss)
            if not mode & FALLOC_FL_KEEP_SIZE and end > inode.i_size:
                self.zero_eof_tail_locked(inode)
                with self.tm.lock:
                    trans = self.sb.start()
                    inode.i_size = inode.disk_size = end
                    self.sb.write_inode(trans, inode)
            with self.tm.lock:
                inode.i_ctime_ns = inode.i_mtime_ns = __import__("time").time_ns()
                self.sb.write_inode(self.sb.start(), inode)
        finally:
            sem.up_write()

    def _prealloc(self, inode, a, b):
        tm = self.tm
        with tm.lock:
            trans = self.sb.start()
            tree = tm.tree(inode.tree_id)
            cur = a
            gaps = []
            for kpos, fe in extent_items(tree, inode.objectid, a, b):
                if kpos > cur:
                    gaps.append((cur, kpos))
                cur = max(cur, kpos + extent_len(fe))
            if cur < b:
                gaps.append((cur, b))
            # all or nothing, as btrfs reserves the whole range before allocating: a
            # half-done preallocation that then fails would keep the space it took
            need = sum(hi - lo for lo, hi in gaps)
            if need > tm.extents.data_avail() and tm.extents.pinned_bytes:
                # space freed in this transaction comes back with a commit
                tm.commit()
                trans = self.sb.start()
                tree = tm.tree(inode.tree_id)
            if need > tm.extents.data_avail():
                raise NoSpaceError(f"fallocate needs {need} bytes, "
                                   f"{tm.extents.data_avail()} available")
            # The check above is not a reservation: the tree blocks the inserts copy-on-write
            # come out of the same free space, so an allocation can still fail part way.
            # Then the extents inserted so far are dropped again (all or nothing), and the
            # inode item is rewritten on every path: add_extent changed nbytes in memory.
            added = []
            try:
                for lo, hi in gaps:
                    while lo < hi:
                        n = min(hi - lo, MAX_EXTENT_BYTES)
                        while True:
                            try:
                                addr = tm.extents.alloc_data(trans, n)
                                break
                            except NoSpaceError:
                                if n <= self.ss:
                                    raise
                                n = max(self.ss, n // 2 // self.ss * self.ss)
                        add_extent(tm, trans, tree, inode, lo,
                                   new_reg_extent(trans.transid, addr, n, n, prealloc=True))
                        added.append((lo, lo + n))
                        lo += n
            except NoSpaceError:
                for lo, hi in added:
                    drop_extents(tm, trans, tree, inode, lo, hi)
                self.sb.write_inode(trans, inode)
                self.sb.flush_freed(trans)
                raise
            self.sb.write_inode(trans, inode)

    def seek_data_hole(self, inode, pos, whence):
        inode.i_rwsem.down_read()
        try:
            size = inode.i_size
            with self.tm.lock:
                items = extent_items(self.tm.tree(inode.tree_id), inode.objectid, pos, size)
            data = [(max(k, pos), k + extent_len(fe)) for k, fe in items
                    if fe.type == FILE_EXTENT_REG and fe.disk_bytenr]
            if whence == os.SEEK_DATA:
                for lo, _hi in data:
                    if lo < size:
                        return lo
                raise from_errno(_errno.ENXIO, "no data after the offset")
            cur = pos
            for lo, hi in data:
                if lo > cur:
                    break
                cur = max(cur, hi)
            return min(cur, size)
        finally:
            inode.i_rwsem.up_read()

    def open(self, inode, file):
        return None

    def release(self, inode, file):
        return None


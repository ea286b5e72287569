"""Reference direct-I/O engine: a slow, plain-Python second implementation of the DIO spec.

What it owns: ``dio_start``/``dio_complete``/``dio_rw`` and ``Dio`` with the same arguments and
results as ``ufs.iomap.dio`` (docs/CORE-API.md §4), written from reference/iomap-semantics.md
§2.7 and §3 only, never from the Cython engine.  Differential tests run one layout and one
operation sequence through both engines; a difference is a bug in one of them.

May import: ``ufs.iomap`` (types, flags, IovIter/Kiocb), ``ufs.errors``.  Nothing from ``ufs.vfs``
(the host is duck-typed, CORE-API §5).

How it differs from the real engine, on purpose (simple and obviously correct beats fast):
- I/O is done at "submission" time through the device's Python helpers (``pread``/``pwrite``
  with ``fua=``), one call per bio.  ``queue`` is accepted and ignored; ``DioOps.submit_io`` is
  not supported (bios are not ``BioRef`` objects here).
- Bio completion is modelled explicitly: each bio takes a reference and its end (error
  recording, reference drop) runs inline for waited dios.  For async dios the ends are
  deferred to a completion thread (standing in for the interrupt context), so the submitter
  can see in-flight bios and return ``EIOCBQUEUED`` exactly like the kernel does.
- An optional ``trace`` list records each significant step as a tuple, for debugging and for
  order assertions (sem §3.8).

Invariants (checked by construction): ``end_io`` once per dio and before post-invalidation;
``inode_dio_end`` exactly once per ``inode_dio_begin`` and before ``generic_write_sync``;
first error wins; ``ki_complete`` once per ``EIOCBQUEUED``; the dio is never touched by the
submitter after it returned ``EIOCBQUEUED``.

Locks: ``Dio._lock`` guards ``ref``/``error`` (the kernel's atomics/cmpxchg).
"""
from __future__ import annotations

import errno as _errno
import logging
import queue as _queue
import threading

from ufs.errors import (AgainError, InvariantError, NotBlockError, from_errno,
                        to_errno)
from ufs.iomap import (EIOCBQUEUED, DioFlag, Iocb, IovIter, IterFlag, MapFlag,
                       MapType)

__all__ = ["Dio", "dio_start", "dio_complete", "dio_rw", "generic_write_sync", "EIOCBQUEUED",
           "iomap_iterate"]

log = logging.getLogger(__name__)

# Private dio state bits (sem §3.3); kept apart from the public DioFlag values.
_NO_INVALIDATE = 1 << 25
_CALLER_COMP = 1 << 26
_INLINE_COMP = 1 << 27
_WRITE_THROUGH = 1 << 28
_NEED_SYNC = 1 << 29
_WRITE = 1 << 30

# One bio carries at most this much (the kernel: BIO_MAX_VECS pages).  Only the number of
# bios depends on it, never a result.
_BIO_MAX_BYTES = 256 * 4096
# The newest kernel zeroes with one shared buffer of this size; longer pads are -EINVAL.
_ZERO_MAX_BYTES = 64 * 1024


def _neg_errno(exc: BaseException) -> int:
    return to_errno(exc)


# --------------------------------------------------------------------------------------------
# the user buffer


class _UserBuf:
    """The caller's buffer as the engine sees it: an ``IovIter`` consumed as I/O is issued.

    Copies to/from the iter's current offset, stops short at a simulated non-resident page
    (``nofault`` + ``fault_at``), reverts; like the kernel, the iter is advanced by what the
    engine used (and rewound for a read past EOF).
    """

    def __init__(self, it, is_read: bool):
        if not isinstance(it, IovIter):
            it = IovIter(it, writable=True if is_read else None)
        if is_read and not it.writable:
            raise from_errno(_errno.EFAULT, "read into a read-only buffer")
        self.iov = it
        self.view = memoryview(it.buffer).cast("B")
        self.count = int(it.count)

    def avail(self) -> int:
        """Bytes usable from the cursor before the end or a simulated fault."""
        it = self.iov
        n = int(it.count)
        if it.nofault and it.fault_at is not None:
            n = min(n, max(0, int(it.fault_at) - int(it.offset)))
        return n

    def take(self, n: int) -> memoryview:
        off = int(self.iov.offset)
        self.iov.advance(n)
        return self.view[off:off + n]

    def revert(self, n: int) -> None:
        self.iov.revert(n)


# --------------------------------------------------------------------------------------------
# the iteration loop (sem §2.7, newest semantics)


class _Iter:
    """The state of one ``iomap_iter`` walk: pos/len, the current maps, progress."""

    def __init__(self, inode, pos, length, flags, ops, private):
        from ufs.iomap import IoMap
        self._IoMap = IoMap
        self.inode, self.pos, self.len, self.flags, self.ops, self.private = (
            inode, pos, length, flags, ops, private)
        self.iomap = None
        self.srcmap = None
        self.start_pos = pos
        self.status = 0
        self.processed = 0

    def length(self) -> int:
        """iomap_length(): usable bytes of this mapping from pos."""
        end = self.iomap.offset + self.iomap.length
        if self.srcmap is not None and self.srcmap.type != MapType.HOLE:
            end = min(end, self.srcmap.offset + self.srcmap.length)
        return max(0, min(self.len, end - self.pos))

    def advance(self, n: int) -> int:
        if n < 0 or n > self.length():
            raise InvariantError(f"iomap advance by {n} past the mapping")
        self.pos += n
        self.len -= n
        self.processed += n
        return 0

    def next(self, trace) -> int:
        """1: a new mapping is ready; 0: done; -errno: stop with that error."""
        if self.iomap is not None:
            stale = bool(self.iomap.flags & MapFlag.STALE)
            advanced = self.pos - self.start_pos
            olen = self.len + advanced
            end_err = 0
            end_fn = self.ops.iomap_end if getattr(self.ops, "has_iomap_end", True) else None
            if end_fn is not None:
                trimmed = max(0, min(olen, self.iomap.offset + self.iomap.length - self.start_pos))
                if trace is not None:
                    trace.append(("iomap_end", self.start_pos, trimmed, advanced))
                try:
                    r = end_fn(self.inode, self.start_pos, trimmed, advanced, self.flags,
                               self.iomap)
                    if isinstance(r, int) and r < 0:
                        end_err = r
                except OSError as e:
                    end_err = _neg_errno(e)
                # An iomap_end error counts only when this mapping made no progress.
                if end_err < 0 and not advanced:
                    return end_err
            if self.status > 0:
                self.status = -_errno.EIO
            if self.status < 0:
                return self.status
            if self.len == 0 or (not advanced and not stale):
                return 0
        # Fresh maps before every begin: HOLE, NULL address, zero length (sem §2.7).
        self.iomap = self._IoMap()
        self.srcmap = self._IoMap()
        # The iteration's private (the kernel's container_of(iomap, struct iomap_iter)).
        self.iomap.iter_private = self.srcmap.iter_private = self.private
        self.start_pos = self.pos
        self.status = 0
        if trace is not None:
            trace.append(("iomap_begin", self.pos, self.len, int(self.flags)))
        try:
            r = self.ops.iomap_begin(self.inode, self.pos, self.len, self.flags, self.iomap,
                                     self.srcmap)
            if isinstance(r, int) and r < 0:
                self.iomap = None
                return r
        except OSError as e:
            self.iomap = None
            return _neg_errno(e)
        m = self.iomap
        if trace is not None:
            trace.append(("map", int(m.type), m.offset, m.length, int(m.flags), m.addr))
        # STALE is the core's to set (the body, after begin); a filesystem returning it breaks
        # the contract like a mapping that does not cover pos (the kernel WARNs on both).
        if (m.length <= 0 or m.offset > self.pos or m.offset + m.length <= self.pos
                or m.flags & MapFlag.STALE):
            # A broken mapping: let the fs release it, then fail the walk with EIO.
            self.status = -_errno.EIO
            bad = self.iomap
            end_fn = self.ops.iomap_end if getattr(self.ops, "has_iomap_end", True) else None
            if end_fn is not None:
                try:
                    end_fn(self.inode, self.pos, max(0, m.offset + m.length - self.pos), 0,
                           self.flags, bad)
                except OSError:
                    pass
            self.iomap = None
            return -_errno.EIO
        return 1


def iomap_iterate(inode, pos, length, flags, ops, body, *, private=None, trace=None) -> int:
    """Run ``body(it)`` for each mapping of ``[pos, pos+length)``; return 0 or -errno.

    ``body`` returns 0 after advancing ``it`` itself, or -errno (stored as the status).
    """
    return _run(_Iter(inode, pos, length, flags, ops, private), body, trace)


def _run(it: _Iter, body, trace) -> int:
    while True:
        r = it.next(trace)
        if r <= 0:
            return r
        st = body(it)
        it.status = st if st is not None else 0


# --------------------------------------------------------------------------------------------
# the dio


class _IrqThread:
    """Stand-in for interrupt context: runs deferred bio completions in submission order."""

    def __init__(self):
        self._q = _queue.Queue()
        self._t = None
        self._lock = threading.Lock()

    def call(self, fn, *args):
        with self._lock:
            if self._t is None or not self._t.is_alive():
                self._t = threading.Thread(target=self._run, name="ufs-ref-irq", daemon=True)
                self._t.start()
        self._q.put((fn, args))

    def _run(self):
        while True:
            fn, args = self._q.get()
            try:
                fn(*args)
            except BaseException:  # pragma: no cover - a bug in a completion; keep the thread
                log.exception("reference engine: bio completion raised")


_irq = _IrqThread()


class Dio:
    """One direct I/O in flight (sem §3.4).  Owned by the engine until returned to the caller."""

    def __init__(self, iocb, dops, inode, done_before, trace):
        self.iocb = iocb
        self.dops = dops
        self.inode = inode
        self.i_size = int(inode.i_size)      # snapshot: reads are clamped to it
        self.size = 0                        # data bytes submitted (zero bios not counted)
        self.ref = 1                         # the submitter's reference
        self.flags = 0                       # public DioFlag bits + private state bits
        self.error = 0                       # first error wins
        self.done_before = done_before
        self.wait_for_completion = False
        self.trace = trace
        self.completed = False
        self.exc = None                      # exception from end_io/fsync behind the result
        self._lock = threading.Lock()
        self._done = threading.Event()       # the sync waiter (sem §3.8)

    def _t(self, *ev):
        if self.trace is not None:
            self.trace.append(ev)

    def set_error(self, err: int) -> None:
        with self._lock:
            if self.error == 0:
                self.error = err

    @property
    def is_write(self) -> bool:
        return bool(self.flags & _WRITE)

    def __repr__(self):
        return (f"<reference Dio {'write' if self.is_write else 'read'} pos={self.iocb.ki_pos} "
                f"size={self.size} ref={self.ref} error={self.error}>")


def _inode_of(iocb):
    return iocb.ki_filp.f_inode


def _bio_end(dio: Dio, err: int) -> None:
    """End of one bio: record the first error, drop its reference, finish on the last."""
    if err:
        dio.set_error(err)
    with dio._lock:
        dio.ref -= 1
        last = dio.ref == 0
    if last:
        _dio_done(dio)


def _dio_done(dio: Dio) -> None:
    """The last reference went away (sem §3.8)."""
    iocb = dio.iocb
    if dio.wait_for_completion:
        dio._t("wake")
        dio._done.set()
        return
    if dio.flags & (_INLINE_COMP | _CALLER_COMP):
        dio._t("complete_inline")
        res = _complete(dio)
        dio._t("ki_complete", res)
        iocb.ki_complete(iocb, res)
        return
    wq = _inode_of(iocb).i_sb.s_dio_done_wq
    dio._t("queue_work")

    def work():
        res = _complete(dio)
        dio._t("ki_complete", res)
        iocb.ki_complete(iocb, res)

    wq.queue_work(work)


def _submit(dio: Dio, op: str, addr: int, data, fua: bool, bdev, deferred: bool) -> None:
    """Issue one bio: take its reference, do the I/O, end it (inline or deferred)."""
    with dio._lock:
        dio.ref += 1
    dio._t("bio", op, addr, len(data), bool(fua))
    err = 0
    try:
        if op == "read":
            got = bdev.pread(len(data), addr)
            if len(got) != len(data):
                err = -_errno.EIO
            else:
                data[:] = got
        else:
            n = bdev.pwrite(data, addr, fua=fua)
            if n != len(data):
                err = -_errno.EIO
    except OSError as e:
        err = _neg_errno(e)
    if err:
        dio._t("bio_error", op, addr, len(data), err)
    if deferred:
        _irq.call(_bio_end, dio, err)
    else:
        _bio_end(dio, err)


def _can_use_fua(m, dio: Dio) -> bool:
    if m.flags & (MapFlag.SHARED | MapFlag.DIRTY):
        return False
    if not dio.flags & _WRITE_THROUGH:
        return False
    bdev = m.bdev
    return (not bdev.volatile_cache) or bool(bdev.fua)


def _zero(dio: Dio, it: _Iter, pos: int, length: int, deferred: bool) -> int:
    """A zeroing write bio for [pos, pos+length) of the current mapping (not counted in size)."""
    if length > _ZERO_MAX_BYTES:
        return -_errno.EINVAL
    m = it.iomap
    dio._t("zero", pos, length)
    _submit(dio, "write", m.addr + pos - m.offset, bytes(length), False, m.bdev, deferred)
    return 0


def _bio_iter(dio: Dio, it: _Iter, ub: _UserBuf, dio_flags: int, deferred: bool) -> int:
    """The bio path for MAPPED and UNWRITTEN mappings (sem §3.7)."""
    m = it.iomap
    inode = dio.inode
    pos = it.pos
    length = it.length()
    fs_block = 1 << int(inode.i_blkbits)
    if m.bdev is None:
        return -_errno.EIO
    align = fs_block if dio_flags & DioFlag.FSBLOCK_ALIGNED else int(m.bdev.logical_block_size)
    if (pos | length) & (align - 1):
        dio._t("misaligned", pos, length, align)
        return -_errno.EINVAL

    need_zeroout = False
    fua = False
    if dio.is_write:
        if m.type == MapType.UNWRITTEN:
            dio.flags |= DioFlag.UNWRITTEN
            need_zeroout = True
        if m.flags & MapFlag.SHARED:
            dio.flags |= DioFlag.COW
        if m.flags & MapFlag.NEW:
            need_zeroout = True
        elif m.type == MapType.MAPPED and _can_use_fua(m, dio):
            fua = True
        if not fua:
            dio.flags &= ~_WRITE_THROUGH
        # Completing in the caller is only for pure overwrites (sem §3.7).
        if (need_zeroout or pos >= int(inode.i_size)
                or (dio.flags & _NEED_SYNC and not fua)):
            dio.flags &= ~_CALLER_COMP

    ret = 0
    if need_zeroout:
        pad = pos & (fs_block - 1)
        if pad:
            ret = _zero(dio, it, pos - pad, pad, deferred)
            if ret:
                return ret

    copied = 0
    left = length
    while left > 0:
        if dio.error:
            # An earlier bio failed: undo this mapping's progress and stop quietly.
            ub.revert(copied)
            dio._t("stop_on_error", pos)
            return 0
        # "Pinning" the user pages: only what is resident, in whole alignment units.
        n = min(left, _BIO_MAX_BYTES, ub.avail())
        n -= n % align
        if n <= 0:
            ret = -_errno.EFAULT
            break
        chunk = ub.take(n)
        dio.size += n
        copied += n
        left -= n
        addr = m.addr + pos - m.offset
        if dio.is_write:
            _submit(dio, "write", addr, bytes(chunk), fua, m.bdev, deferred)
        else:
            _submit(dio, "read", addr, chunk, False, m.bdev, deferred)
        pos += n

    # Zero the rest of a sub-block write when the extent needs it or the write ends past EOF,
    # so that a short or extending write never exposes stale block tails.
    if need_zeroout or (dio.is_write and pos >= int(inode.i_size)):
        pad = pos & (fs_block - 1)
        if pad:
            r = _zero(dio, it, pos, fs_block - pad, deferred)
            if r:
                ret = r
    if copied:
        it.advance(copied)
        return 0
    return ret


def _hole_iter(dio: Dio, it: _Iter, ub: _UserBuf) -> int:
    length = it.length()
    n = min(length, ub.avail())
    if n > 0:
        v = ub.take(n)
        v[:] = bytes(n)
    dio._t("zero_fill", it.pos, n)
    dio.size += n
    if n == 0:
        return -_errno.EFAULT
    it.advance(n)
    return 0


def _inline_iter(dio: Dio, it: _Iter, ub: _UserBuf) -> int:
    m = it.iomap
    if m.inline_data is None:
        return -_errno.EIO
    data = memoryview(m.inline_data).cast("B")
    if len(data) < m.length:
        return -_errno.EIO
    pos = it.pos
    length = it.length()
    off = pos - m.offset
    n = min(length, ub.avail())
    if dio.is_write:
        inode = dio.inode
        size = int(inode.i_size)
        if pos > size and size >= m.offset:
            # Zero the gap between the old EOF and the write inside the inline area.
            data[size - m.offset:off] = bytes(off - (size - m.offset))
        if n:
            data[off:off + n] = ub.take(n)
            if pos + n > size:
                inode.i_size = pos + n
                dio._t("inline_i_size", pos + n)
            mark = getattr(inode, "mark_inode_dirty", None)
            if mark is not None:
                mark()
    elif n:
        ub.take(n)[:] = data[off:off + n]
    dio._t("inline", pos, n)
    dio.size += n
    if n == 0:
        return -_errno.EFAULT
    it.advance(n)
    return 0


def _dio_iter(dio: Dio, it: _Iter, ub: _UserBuf, dio_flags: int, deferred: bool) -> int:
    """Per-mapping dispatch (sem §3.6)."""
    t = it.iomap.type
    if t == MapType.HOLE:
        if dio.is_write:
            dio._t("warn", "write to a hole")
            return -_errno.EIO
        return _hole_iter(dio, it, ub)
    if t == MapType.UNWRITTEN:
        if not dio.is_write:
            return _hole_iter(dio, it, ub)
        return _bio_iter(dio, it, ub, dio_flags, deferred)
    if t == MapType.MAPPED:
        return _bio_iter(dio, it, ub, dio_flags, deferred)
    if t == MapType.INLINE:
        return _inline_iter(dio, it, ub)
    if t == MapType.DELALLOC:
        dio._t("warn", "direct I/O collision with buffered writes")
        return -_errno.EIO
    return -_errno.EIO


# --------------------------------------------------------------------------------------------
# completion


def _write_sync(iocb, count: int):
    """(count or -errno, the exception behind the error or None)."""
    flags = int(iocb.ki_flags)
    if flags & Iocb.DSYNC:
        end = int(iocb.ki_pos)
        datasync = not (flags & Iocb.SYNC)
        try:
            r = iocb.ki_filp.vfs_fsync_range(end - count, end, datasync)
        except OSError as e:
            return _neg_errno(e), e
        if isinstance(r, int) and r < 0:
            return r, None
    return count, None


def generic_write_sync(iocb, count: int) -> int:
    """Sync what a write of ``count`` bytes ending at ``ki_pos`` wrote; ``count`` or -errno."""
    return _write_sync(iocb, count)[0]


def _invalidate_after_write(dio: Dio) -> None:
    mapping = getattr(dio.inode, "i_mapping", None)
    if mapping is None or not getattr(mapping, "nrpages", 0):
        return
    pos = int(dio.iocb.ki_pos)
    try:
        mapping.invalidate_range(pos, pos + dio.size)
    except OSError as e:
        # Best effort: someone re-cached the range (sem §3.8 step 3).
        log.warning("reference dio: page cache invalidation failed after write at %d: %s", pos, e)
        dio._t("invalidate_failed", pos, dio.size)


def _complete(dio: Dio) -> int:
    """iomap_dio_complete, in the kernel's order (sem §3.8); bytes or -errno."""
    if dio.completed:
        raise InvariantError("dio_complete called twice for one dio")
    dio.completed = True
    iocb = dio.iocb
    ret = dio.error
    dops = dio.dops
    end_io = _dops_end_io(dops)
    if end_io is not None:
        dio._t("end_io", dio.size, ret, dio.flags & (DioFlag.UNWRITTEN | DioFlag.COW))
        try:
            r = end_io(iocb, dio.size, ret, DioFlag(dio.flags & (DioFlag.UNWRITTEN | DioFlag.COW)))
            if r is not None:
                ret = int(r)
        except OSError as e:
            ret = _neg_errno(e)
            dio.exc = e
    if ret == 0:
        ret = dio.size
        if not dio.is_write and int(iocb.ki_pos) + ret > dio.i_size:
            ret = dio.i_size - int(iocb.ki_pos)
    if not dio.error and dio.size and dio.is_write and not dio.flags & _NO_INVALIDATE:
        dio._t("invalidate_after")
        _invalidate_after_write(dio)
    dio._t("inode_dio_end")
    dio.inode.inode_dio_end()
    if ret > 0:
        iocb.ki_pos = int(iocb.ki_pos) + ret
        dio._t("ki_pos", int(iocb.ki_pos))
        if dio.flags & _NEED_SYNC:
            dio._t("sync", int(iocb.ki_pos) - ret, int(iocb.ki_pos))
            ret, exc = _write_sync(iocb, ret)
            if exc is not None:
                dio.exc = exc
            dio._t("sync_done", ret)
        if ret > 0:
            ret += dio.done_before
    dio._t("complete", ret)
    return ret


def _dops_end_io(dops):
    """The personality's end_io, or None when it keeps the base class's empty one."""
    if dops is None or not getattr(dops, "has_end_io", True):
        return None
    return dops.end_io


def dio_complete(dio: Dio) -> int:
    """Finish a dio returned by :func:`dio_start`: bytes done, or raise the error."""
    ret = _complete(dio)
    if ret < 0:
        # Keep the personality's own exception (its message names e.g. the lock) when it is
        # what decided the result.
        exc = dio.exc
        if isinstance(exc, OSError) and exc.errno == -ret:
            raise exc
        raise from_errno(-ret)
    return ret


# --------------------------------------------------------------------------------------------
# submission


def dio_start(iocb, iter, ops, dops=None, dio_flags=0, private=None, done_before=0, queue=None,
              *, trace=None):
    """__iomap_dio_rw: issue the I/O; return a Dio to complete, None, or EIOCBQUEUED.

    Raises ``ufs.errors`` exceptions for failures before any I/O.  ``queue`` is ignored
    (the reference does its I/O through the device's Python helpers).
    """
    dio_flags = int(dio_flags)
    flags = int(iocb.ki_flags)
    is_write = bool(flags & Iocb.WRITE)
    ub = _UserBuf(iter, not is_write)
    count = ub.count
    if trace is not None:
        trace.append(("dio_start", "write" if is_write else "read", int(iocb.ki_pos), count,
                      dio_flags))
    if count == 0:
        return None
    inode = _inode_of(iocb)
    pos = int(iocb.ki_pos)
    end = pos + count
    dio = Dio(iocb, dops, inode, done_before, trace)
    dio.flags = dio_flags & (DioFlag.FSBLOCK_ALIGNED | DioFlag.BOUNCE)
    wait = iocb.ki_complete is None or bool(dio_flags & DioFlag.FORCE_WAIT)
    iomap_flags = IterFlag.DIRECT
    if flags & Iocb.NOWAIT:
        iomap_flags |= IterFlag.NOWAIT
    mapping = getattr(inode, "i_mapping", None)
    cached = mapping is not None and getattr(mapping, "nrpages", 0)

    if not is_write:
        dio.flags |= _INLINE_COMP
        if pos >= dio.i_size:
            dio._t("read_past_eof")
            return None
        if cached:
            if flags & Iocb.NOWAIT:
                if mapping.has_dirty(pos, end):
                    raise AgainError("NOWAIT read needs page cache write-back")
            else:
                mapping.write_and_wait_range(pos, end)
    else:
        iomap_flags |= IterFlag.WRITE
        dio.flags |= _WRITE
        if not wait:
            dio.flags |= _CALLER_COMP
        if dio_flags & DioFlag.OVERWRITE_ONLY:
            if pos >= dio.i_size or end > dio.i_size:
                raise AgainError("OVERWRITE_ONLY write reaches past EOF")
            iomap_flags |= IterFlag.OVERWRITE_ONLY
        if flags & Iocb.ATOMIC:
            iomap_flags |= IterFlag.ATOMIC
        if flags & Iocb.DSYNC:
            dio.flags |= _NEED_SYNC
            if not flags & Iocb.SYNC:
                dio.flags |= _WRITE_THROUGH
        if cached:
            try:
                if flags & Iocb.NOWAIT:
                    if mapping.has_pages(pos, end):
                        raise AgainError("NOWAIT write over cached pages")
                else:
                    mapping.write_and_wait_range(pos, end)
                    mapping.invalidate_range(pos, end)
            except AgainError:
                raise
            except OSError as e:
                dio._t("invalidate_failed_before", pos, end, e.errno)
                if flags & Iocb.ATOMIC:
                    raise AgainError("page cache invalidation failed (atomic write)") from e
                raise NotBlockError("page cache invalidation failed; use buffered I/O") from e
        if not wait:
            # The superblock creates its completion workqueue on first use.
            _ = inode.i_sb.s_dio_done_wq

    dio._t("inode_dio_begin")
    inode.inode_dio_begin()
    deferred = not wait

    def body(it):
        return _dio_iter(dio, it, ub, dio_flags, deferred)

    it = _Iter(inode, pos, count, iomap_flags, ops, private)
    ret = _run(it, body, trace)
    dio._t("iter_done", ret, dio.size)
    if not is_write and it.pos >= dio.i_size:
        # Readers past EOF see the iter consumed only up to i_size.
        ub.revert(min(it.pos - dio.i_size, int(ub.iov.offset)))

    if ret == -_errno.EFAULT and dio.size and dio_flags & DioFlag.PARTIAL:
        if not flags & Iocb.NOWAIT:
            wait = True
        ret = 0
    if ret == -_errno.ENOTBLK:
        # A short result: the caller does the rest with buffered I/O.
        wait = True
        ret = 0
    if ret < 0:
        dio.set_error(ret)
    if dio.flags & _WRITE_THROUGH:
        dio.flags &= ~_NEED_SYNC
    dio.wait_for_completion = wait

    dio._t("submit_done", dio.size)
    with dio._lock:
        dio.ref -= 1
        last = dio.ref == 0
    if last:
        dio._t("submitter_last")
        return dio
    if not wait:
        # The dio may already be completing on another thread: hands off from here on.
        if trace is not None:
            trace.append(("queued",))
        return EIOCBQUEUED
    # Bios of a dio that was async while submitting may still end on the completion thread.
    dio._done.wait()
    return dio


def dio_rw(iocb, iter, ops, dops=None, dio_flags=0, private=None, done_before=0, queue=None,
           *, trace=None):
    """iomap_dio_rw: :func:`dio_start` then :func:`dio_complete`; bytes or EIOCBQUEUED."""
    d = dio_start(iocb, iter, ops, dops, dio_flags, private, done_before, queue, trace=trace)
    if d is None:
        return 0
    if d is EIOCBQUEUED or (isinstance(d, int) and d == EIOCBQUEUED):
        return EIOCBQUEUED
    return dio_complete(d)

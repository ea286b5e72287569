# cython: language_level=3
"""The direct-I/O engine: fs/iomap/direct-io.c in userspace (newest kernel semantics).

Owns: ``Dio`` (struct iomap_dio), ``dio_start`` (``__iomap_dio_rw``), ``dio_complete``
(``iomap_dio_complete``), ``dio_rw`` (``iomap_dio_rw``), ``generic_write_sync``, ``BioRef``
(a bio handed to ``DioOps.submit_io``) and ``DioBatch`` (many DIOs per device submission).
May import: ``ufs.errors``, ``ufs.iomap.bdev``, ``ufs.iomap.iomap``.  The host (inode, page
cache, superblock, file) is duck-typed as docs/CORE-API.md §5 describes and is read once per
dio, never per block.

Invariants (reference/iomap-semantics.md §3):
- ``st.ref`` = 1 (the submitter) + one per submitted bio, zero bios included.  Bios end on
  whatever thread reaps their queue, without the GIL: they record their error (CAS from 0:
  the first error wins), drop their bounce chunk and their reference.  Whoever drops the
  last reference completes the dio; a sync (or FORCE_WAIT) submitter reaps until only its
  own reference is left, so for it completion always happens in the caller.
- After ``dio_start`` returned ``EIOCBQUEUED`` nothing touches the dio but its bios and the
  completion path (which takes the GIL and holds the one extra reference taken for it).
- ``inode_dio_begin`` runs once before the first mapping; ``dio_complete`` runs exactly once
  per Dio and calls ``inode_dio_end`` exactly once, in the order: end_io -> size/clamp ->
  post-invalidate -> inode_dio_end -> ki_pos += -> generic_write_sync -> += done_before.
- The device never sees unaligned memory: user memory that is not aligned to the logical
  block size is bounced through a bounded ``BufPool`` (and always for ``DioFlag.BOUNCE``
  writes, which thereby write a stable copy).  Zero bios write one shared zeroed buffer.
- No stale bytes: sub-block heads and tails of NEW/UNWRITTEN mappings, and tails of writes at
  or past EOF, are zeroed, also when a write stops early (pin failure).
Locks: none of our own; the caller holds the inode's locks as its personality requires.
"""

cimport cython
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBuffer_FillInfo,
                             PyBUF_SIMPLE, PyBUF_WRITABLE)
from cpython.ref cimport Py_INCREF, Py_DECREF
from libc.stdint cimport uint64_t, int64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

from ufs.iomap.bdev cimport (bio_t, IoQueue, BlockDev, BufPool, AlignedBuffer,
                             BIO_READ, BIO_WRITE, BIO_FUA, BIO_SYNC)
from ufs.iomap.iomap cimport *

import errno as _errno
import logging
import time as _time

from ufs.errors import (AgainError, AlignmentError, FaultError, InvalidError, InvariantError,
                        NotBlockError, from_errno)
from ufs.iomap.bdev import BufPool as _PyBufPool, aligned_buffer as _aligned_buffer

__all__ = ["Dio", "BioRef", "DioBatch", "dio_start", "dio_complete", "dio_rw",
           "generic_write_sync", "EIOCBQUEUED", "BIO_MAX_BYTES", "ZERO_BUF_BYTES",
           "bounce_pool"]

log = logging.getLogger("ufs.iomap.dio")

cdef extern from *:
    """
    static inline int ufs_dio_add(int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
    static inline int ufs_dio_load(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline int ufs_dio_cas0(int *p, int v) {
        int expected = 0;
        return __atomic_compare_exchange_n(p, &expected, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline void ufs_dio_or(unsigned int *p, unsigned int v) { __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
    static inline void ufs_dio_andnot(unsigned int *p, unsigned int v) { __atomic_fetch_and(p, ~v, __ATOMIC_RELAXED); }
    static inline unsigned int ufs_dio_flags(const unsigned int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    """
    int ufs_dio_add(int* p, int v) noexcept nogil
    int ufs_dio_load(const int* p) noexcept nogil
    int ufs_dio_cas0(int* p, int v) noexcept nogil
    void ufs_dio_or(unsigned int* p, unsigned int v) noexcept nogil
    void ufs_dio_andnot(unsigned int* p, unsigned int v) noexcept nogil
    unsigned int ufs_dio_flags(const unsigned int* p) noexcept nogil

cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int nanosleep(const timespec* req, timespec* rem)

# Private dio flags; they share the word with the public DioFlag and end_io bits.
cdef enum:
    DIO_NO_INVALIDATE = 1 << 25
    DIO_CALLER_COMP = 1 << 26
    DIO_INLINE_COMP = 1 << 27
    DIO_WRITE_THROUGH = 1 << 28
    DIO_NEED_SYNC = 1 << 29
    DIO_WRITE = 1 << 30
    DIO_DIRTY = 1u << 31

cdef enum:
    _BIO_MAX = 1 << 20             # one bio carries at most 1 MiB (BIO_MAX_VECS pages)
    _ZERO_BYTES = 64 * 1024        # the shared zero buffer; bigger zeroing is -EINVAL
    _BOUNCE_CHUNK = 1 << 20
    _BOUNCE_CHUNKS = 32            # at most 32 MiB of bounce memory, whatever the I/O size

EIOCBQUEUED = -529
BIO_MAX_BYTES = _BIO_MAX
ZERO_BUF_BYTES = _ZERO_BYTES

cdef BufPool _pool = _PyBufPool(_BOUNCE_CHUNK, _BOUNCE_CHUNKS, 4096)
cdef AlignedBuffer _zero_buf = _aligned_buffer(_ZERO_BYTES, 4096)
cdef char* _zero_ptr = _zero_buf.ptr

bounce_pool = _pool

cdef double _last_delalloc_warn = -1e9


def _reset_warn_ratelimit():
    """Tests: let the next DELALLOC collision warning through."""
    global _last_delalloc_warn
    _last_delalloc_warn = -1e9


cdef inline int _exc_errno(object exc):
    if isinstance(exc, OSError) and (<object>exc).errno:
        return -<int>(<object>exc).errno
    return -_errno.EIO


# --------------------------------------------------------------------------------------------
# bio completion (no GIL)
# --------------------------------------------------------------------------------------------

cdef void _dio_bio_end_io(bio_t* b) noexcept nogil:
    cdef dio_bio* db = <dio_bio*>b
    cdef dio_state* st = <dio_state*>b.private
    if b.status != 0:
        ufs_dio_cas0(&st.error, b.status)
    if db.bounce != NULL:
        if b.status == 0 and db.user != NULL:
            memcpy(db.user, db.bounce, db.copy_len)
        _pool.put(db.bounce)
        db.bounce = NULL
    if db.embedded:
        # release: the submitter may reuse the embedded bio once it reads 0
        ufs_dio_add(&st.first_busy, -1)
    else:
        free(db)
    if ufs_dio_add(&st.ref, -1) == 0:
        _dio_done(st)


cdef void _dio_done(dio_state* st) noexcept nogil:
    """The last reference of an async dio went away: complete it (iomap_dio_done)."""
    with gil:
        _dio_done_gil(<object>st.owner)


cdef void _dio_done_gil(Dio dio):
    try:
        if dio.st.flags & (DIO_INLINE_COMP | DIO_CALLER_COMP):
            _complete_notify(dio)
        else:
            dio.wq.queue_work(_complete_and_notify, dio)
    except BaseException:
        log.exception("async DIO completion failed")
    finally:
        Py_DECREF(dio)          # the reference taken for the bios in flight


def _complete_and_notify(Dio dio):
    """Work item of s_dio_done_wq: ki_complete(iocb, dio_complete(dio))."""
    _complete_notify(dio)


cdef void _complete_notify(Dio dio):
    """ki_complete(iocb, dio_complete(dio)) with a negative errno on failure."""
    cdef object res
    iocb = dio.iocb
    try:
        res = _dio_complete(dio)
    except BaseException as e:
        if not isinstance(e, Exception):
            raise
        if not isinstance(e, OSError):
            log.exception("DIO completion raised")
        res = _exc_errno(e)
    try:
        iocb.ki_complete(iocb, res)
    except Exception:
        log.exception("ki_complete raised")


# --------------------------------------------------------------------------------------------
# Dio
# --------------------------------------------------------------------------------------------

@cython.freelist(64)
cdef class Dio:
    """struct iomap_dio.  Made by ``dio_start``; give it to ``dio_complete`` exactly once."""

    def __cinit__(self):
        self.st.ref = 1
        self.st.error = 0
        self.st.flags = 0
        self.st.owner = <void*>self
        self.st.first_busy = 0

    @property
    def error(self):
        return ufs_dio_load(&self.st.error)

    @property
    def flags(self):
        return ufs_dio_flags(&self.st.flags)

    @property
    def ref(self):
        return ufs_dio_load(&self.st.ref)

    @property
    def is_write(self):
        return (self.st.flags & DIO_WRITE) != 0

    def __repr__(self):
        return (f"<Dio size={self.size} error={self.error} flags={self.flags:#x} "
                f"ref={self.ref} completed={self.completed}>")

    cdef void set_error(self, int err, object exc):
        if ufs_dio_cas0(&self.st.error, err) and exc is not None:
            self.exc = exc
            self.exc_code = err

    cdef IoQueue queue_for(self, BlockDev bdev):
        """The queue bios for ``bdev`` go to: the caller's, if it is on that device, else
        the calling thread's queue of the device."""
        cdef IoQueue q
        if self.q0 is not None and self.q0.dev is bdev:
            return self.q0
        if self.req_queue is not None and self.req_queue.dev is bdev:
            q = self.req_queue
        else:
            q = bdev.queue()
        if self.q0 is None:
            self.q0 = q
        else:
            if self.queues is None:
                self.queues = []
            if q not in self.queues:
                self.queues.append(q)
        return q

    cdef int submit_bio(self, dio_bio* db, int64_t file_offset) except -1:
        """iomap_dio_submit_bio: take a reference, then the queue or DioOps.submit_io."""
        cdef BioRef ref
        db.b.private = &self.st
        db.b.end_io = _dio_bio_end_io
        db.b.next = NULL
        ufs_dio_add(&self.st.ref, 1)
        if self.dops is None or not self.dops.has_submit_io:
            self.cur_q.submit(&db.b)
            return 0
        ref = BioRef.__new__(BioRef)
        ref.db = db
        ref.dio = self
        ref.is_zero = db.b.buf == _zero_ptr
        ref.file_offset = file_offset
        try:
            self.dops.submit_io(self.cur_iter, ref, file_offset)
        except BaseException as e:
            if not isinstance(e, Exception):
                raise
            self.set_error(_exc_errno(e), e)
            if not ref.submitted:
                ref.submitted = True
                db.b.status = _exc_errno(e)
                _dio_bio_end_io(&db.b)
            return 0
        if not ref.submitted:
            # the contract: submit_io must submit the bio it was given
            ref.submitted = True
            self.set_error(-_errno.EIO, InvariantError("DioOps.submit_io returned without bio.submit()"))
            db.b.status = -_errno.EIO
            _dio_bio_end_io(&db.b)
        return 0


cdef class BioRef:
    """A bio given to ``DioOps.submit_io``: ``data`` (read-only memoryview for writes; for
    reads the memory the device fills), ``addr`` (device bytes; may be remapped before
    ``submit()``), ``length``, ``op`` (BIO_READ/BIO_WRITE), ``opf`` (BIO_FUA|BIO_SYNC),
    ``is_zero`` (a sub-block zeroing bio), ``file_offset``.  Call ``submit()`` exactly once,
    before ``submit_io`` returns."""

    def _check(self):
        if self.submitted:
            raise InvariantError("BioRef used after submit()")

    @property
    def addr(self):
        self._check()
        return self.db.b.addr

    @addr.setter
    def addr(self, uint64_t value):
        self._check()
        self.db.b.addr = value

    @property
    def length(self):
        self._check()
        return self.db.b.length

    @property
    def op(self):
        self._check()
        return self.db.b.op

    @property
    def opf(self):
        self._check()
        return self.db.b.opf

    @property
    def data(self):
        self._check()
        return memoryview(self)

    def __getbuffer__(self, Py_buffer* view, int flags):
        self._check()
        PyBuffer_FillInfo(view, self, self.db.b.buf, self.db.b.length,
                          self.db.b.op == BIO_WRITE, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self._exports -= 1

    def submit(self):
        """Hand the bio to the device queue (iomap's submit_bio)."""
        self._check()
        if self._exports:
            raise InvariantError("BioRef.submit() while its data memoryview is still exported")
        self.submitted = True
        self.dio.cur_q.submit(&self.db.b)


# --------------------------------------------------------------------------------------------
# Per-mapping work (iomap_dio_iter and friends).  Each returns the iteration status: 0 after
# advancing the iter, or -errno with it.error set.
# --------------------------------------------------------------------------------------------

cdef int _fail(IomapIter it, object exc) except -1000:
    it.error = exc
    return _exc_errno(exc)


cdef dio_bio* _alloc_bio(Dio dio) noexcept:
    cdef dio_bio* db
    if not ufs_dio_load(&dio.st.first_busy):
        ufs_dio_add(&dio.st.first_busy, 1)
        db = &dio.st.first
        memset(db, 0, sizeof(dio_bio))
        db.embedded = 1
        return db
    db = <dio_bio*>malloc(sizeof(dio_bio))
    if db != NULL:
        memset(db, 0, sizeof(dio_bio))
    return db


cdef int _hole_iter(Dio dio, IomapIter it) except -1000:
    """Read of a hole or unwritten extent: zero-fill the user buffer."""
    cdef IovIter iov = dio.iter
    cdef int64_t n = iov.usable(it.length_c())
    if n <= 0:
        return _fail(it, FaultError(_errno.EFAULT, "user buffer not resident"))
    memset(iov.base + iov.offset, 0, n)
    iov.offset += n
    iov.count -= n
    dio.size += n
    it.advance_c(n)
    return 0


cdef int _inline_iter(Dio dio, IomapIter it) except -1000:
    """INLINE: memcpy between the inline data and the user buffer; a write zeroes the gap
    after the old i_size and moves i_size (the only DIO that does)."""
    cdef IoMap iomap = it.iomap
    cdef IovIter iov = dio.iter
    cdef Py_buffer view
    cdef int64_t pos = it.pos, n = 0, isize, gap_start
    cdef bint write = (dio.st.flags & DIO_WRITE) != 0
    if iomap.inline_data is None:
        return _fail(it, InvariantError("INLINE mapping without inline_data"))
    PyObject_GetBuffer(iomap.inline_data, &view, PyBUF_WRITABLE if write else PyBUF_SIMPLE)
    try:
        if view.len < iomap.length:
            return _fail(it, InvariantError(
                f"inline_data holds {view.len} bytes, mapping needs {iomap.length}"))
        n = iov.usable(it.length_c())
        if write:
            isize = dio.inode.i_size
            if pos > isize:
                gap_start = isize if isize > iomap.offset else iomap.offset
                memset(<char*>view.buf + (gap_start - iomap.offset), 0, pos - gap_start)
            if n > 0:
                memcpy(<char*>view.buf + (pos - iomap.offset), iov.base + iov.offset, n)
                if pos + n > isize:
                    dio.inode.i_size = pos + n
                mark = getattr(dio.inode, "mark_inode_dirty", None)
                if mark is not None:
                    mark()
        elif n > 0:
            memcpy(iov.base + iov.offset, <char*>view.buf + (pos - iomap.offset), n)
    finally:
        PyBuffer_Release(&view)
    if n <= 0:
        return _fail(it, FaultError(_errno.EFAULT, "user buffer not resident"))
    iov.offset += n
    iov.count -= n
    dio.size += n
    it.advance_c(n)
    return 0


cdef int _zero_bio(Dio dio, IomapIter it, int64_t pos, int64_t length) except -1000:
    """iomap_dio_zero: write zeroes to [pos, pos+length) of the mapping (sub-block padding).

    Every zero bio writes the one shared zeroed buffer, so each is at most ZERO_BUF_BYTES.
    The kernel refuses (-EINVAL) padding beyond its 64 KiB zero folio; we send several zero
    bios instead, so fs blocks above 64 KiB never leave stale bytes."""
    cdef IoMap iomap = it.iomap
    cdef dio_bio* db
    cdef int64_t n
    if pos < iomap.offset:
        return _fail(it, InvariantError(f"zeroing at {pos} before the mapping at {iomap.offset}"))
    while length > 0:
        n = length if length < _ZERO_BYTES else _ZERO_BYTES
        db = _alloc_bio(dio)
        if db == NULL:
            return _fail(it, MemoryError())
        db.b.op = BIO_WRITE
        db.b.opf = BIO_SYNC
        db.b.addr = iomap.addr + <uint64_t>(pos - iomap.offset)
        db.b.buf = _zero_ptr
        db.b.length = n
        dio.submit_bio(db, pos)
        pos += n
        length -= n
    return 0


cdef char* _get_bounce(Dio dio) noexcept:
    """A bounce chunk; while the pool is empty, push and reap our own queues (our bios hold
    chunks), and block only when nothing of ours is in flight."""
    cdef char* c = _pool.try_get()
    cdef IoQueue q = dio.cur_q
    while c == NULL:
        with nogil:
            q.unplug()
            if q.inflight > 0:
                q.reap(1)
                c = _pool.try_get()
            else:
                c = _pool.get()
    return c


cdef int _bio_iter(Dio dio, IomapIter it) except -1000:
    """iomap_dio_bio_iter: the bios of one MAPPED/UNWRITTEN mapping."""
    cdef IoMap iomap = it.iomap
    cdef BlockDev bdev = iomap.bdev
    cdef IovIter iov = dio.iter
    cdef int64_t length = it.length_c()
    cdef int64_t pos = it.pos
    cdef int64_t copied = 0, n, pad, isize = 0
    cdef int64_t fsb = dio.fs_block_size
    cdef int64_t alignment, lbs
    cdef unsigned int flags = dio.st.flags
    cdef bint write = (flags & DIO_WRITE) != 0
    cdef bint need_zeroout = False, completion_work, bounce
    cdef int op = BIO_READ, opf = BIO_SYNC, ret = 0, r2
    cdef char* user
    cdef dio_bio* db
    cdef uint64_t mapaddr

    if bdev is None or iomap.addr == IOMAP_NULL_ADDR:
        return _fail(it, InvariantError(f"{iomap!r}: mapped extent without a device address"))
    lbs = bdev.logical_block_size
    alignment = fsb if (flags & IOMAP_DIO_FSBLOCK_ALIGNED) else lbs
    if (pos | length) & (alignment - 1):
        return _fail(it, AlignmentError(_errno.EINVAL,
                     f"direct I/O at {pos}+{length} is not aligned to {alignment} bytes"))
    if lbs > 4096:
        return _fail(it, InvalidError(_errno.EINVAL, f"logical block size {lbs} > bounce alignment"))
    dio.cur_q = dio.queue_for(bdev)

    if write:
        op = BIO_WRITE
        completion_work = iomap.type != IOMAP_MAPPED
        if iomap.type == IOMAP_UNWRITTEN:
            ufs_dio_or(&dio.st.flags, IOMAP_DIO_UNWRITTEN)
            need_zeroout = True
        if (iomap.flags & IOMAP_F_ATOMIC_BIO) and length != it.len:
            return _fail(it, InvalidError(_errno.EINVAL, "atomic write not covered by one mapping"))
        if iomap.flags & IOMAP_F_SHARED:
            completion_work = True
            ufs_dio_or(&dio.st.flags, IOMAP_DIO_COW)
        if iomap.flags & IOMAP_F_NEW:
            completion_work = True
            need_zeroout = True
        # FUA instead of a cache flush, for pure overwrites without metadata to commit
        if flags & DIO_WRITE_THROUGH:
            if (not completion_work and not (iomap.flags & IOMAP_F_DIRTY)
                    and (not bdev.volatile_cache or bdev.fua)):
                opf |= BIO_FUA
            else:
                ufs_dio_andnot(&dio.st.flags, DIO_WRITE_THROUGH)
        isize = dio.inode.i_size
        # completing in the reaping thread is only for pure overwrites inside EOF with
        # nothing to do at completion (no zeroing/conversion/COW, no size change, no flush)
        if (need_zeroout or (iomap.flags & IOMAP_F_SHARED) or pos + length > isize
                or ((flags & DIO_NEED_SYNC) and not (opf & BIO_FUA))):
            ufs_dio_andnot(&dio.st.flags, DIO_CALLER_COMP)

    if length <= 0 or iov.count == 0:
        return 0
    dio.cur_iter = it
    mapaddr = iomap.addr - <uint64_t>iomap.offset

    if need_zeroout:
        pad = pos & (fsb - 1)
        # Deviation from the kernel: never zero head bytes this dio itself wrote (a mapping
        # that starts mid-block right after a short earlier mapping, e.g. after a pin
        # failure); zeroing them would destroy data already counted in dio.size.
        if pad and pos - pad < dio.iocb.ki_pos:
            ret = _zero_bio(dio, it, pos - pad, pad)
            if ret:
                return ret

    while copied < length:
        if ufs_dio_load(&dio.st.error):
            # an earlier bio failed: stop, give back what this mapping took from the iter
            # (dio.size keeps counting it, as the kernel's does)
            iov.offset -= copied
            iov.count += copied
            return 0
        n = length - copied
        if n > _BIO_MAX:
            n = _BIO_MAX
        n = iov.usable(n)
        n &= ~(alignment - 1)
        if n <= 0:
            ret = _fail(it, FaultError(_errno.EFAULT, "user buffer not resident"))
            break
        if (iomap.flags & IOMAP_F_ATOMIC_BIO) and write and n != length:
            ret = _fail(it, InvalidError(_errno.EINVAL, "atomic write needs a single bio"))
            break
        user = iov.base + iov.offset
        bounce = ((<uintptr_t>user) & <uintptr_t>(lbs - 1)) != 0 or (
            write and (flags & IOMAP_DIO_BOUNCE) != 0)
        if bounce and n > _BOUNCE_CHUNK:
            n = _BOUNCE_CHUNK
        db = _alloc_bio(dio)
        if db == NULL:
            ret = _fail(it, MemoryError())
            break
        db.b.op = op
        db.b.opf = opf
        db.b.addr = mapaddr + <uint64_t>pos
        db.b.length = n
        if bounce:
            db.bounce = _get_bounce(dio)
            db.b.buf = db.bounce
            if write:
                if n >= 65536:
                    with nogil:
                        memcpy(db.bounce, user, n)
                else:
                    memcpy(db.bounce, user, n)
            else:
                db.user = user
                db.copy_len = n
        else:
            db.b.buf = user
        iov.offset += n
        iov.count -= n
        dio.size += n
        copied += n
        dio.submit_bio(db, pos)
        pos += n

    # zero the rest of the last block: NEW/UNWRITTEN, or a write ending at or past EOF
    if need_zeroout or (write and pos >= isize):
        pad = pos & (fsb - 1)
        if pad:
            r2 = _zero_bio(dio, it, pos, fsb - pad)
            if r2:
                ret = r2
    if copied:
        it.advance_c(copied)
        return 0
    return ret


cdef int _dio_iter(Dio dio, IomapIter it) except -1000:
    """iomap_dio_iter: dispatch on the mapping type."""
    cdef int t = it.iomap.type
    global _last_delalloc_warn
    if t == IOMAP_MAPPED:
        return _bio_iter(dio, it)
    if t == IOMAP_UNWRITTEN:
        if dio.st.flags & DIO_WRITE:
            return _bio_iter(dio, it)
        return _hole_iter(dio, it)
    if t == IOMAP_HOLE:
        if dio.st.flags & DIO_WRITE:
            return _fail(it, InvariantError(
                f"DIO write to a HOLE mapping at {it.pos}: iomap_begin must allocate for WRITE"))
        return _hole_iter(dio, it)
    if t == IOMAP_INLINE:
        return _inline_iter(dio, it)
    if t == IOMAP_DELALLOC:
        now = _time.monotonic()
        if now - _last_delalloc_warn > 5.0:
            _last_delalloc_warn = now
            log.warning("Direct I/O collision with buffered writes! File: %r pos %d",
                        dio.iocb.ki_filp, it.pos)
        return _fail(it, from_errno(-_errno.EIO, "Direct I/O collision with buffered writes"))
    return _fail(it, InvariantError(f"unknown mapping type {t}"))


# --------------------------------------------------------------------------------------------
# __iomap_dio_rw / iomap_dio_complete / iomap_dio_rw
# --------------------------------------------------------------------------------------------

# a waiting DIO's plug is flushed once this many bios are on it (BLK_MAX_REQUEST_COUNT)
cdef enum:
    _PLUG_FLUSH_BIOS = 32


cdef inline void _unplug_all(Dio dio, bint force):
    # force: the submitter is about to wait, so the bios must reach the device even
    # under the caller's start_plug() (the kernel flushes the plug when a task sleeps)
    cdef IoQueue q
    if dio.q0 is not None:
        q = dio.q0
        if force or q.plug_depth == 0:
            with nogil:
                q.unplug()
    if dio.queues is not None:
        for q in dio.queues:
            if force or q.plug_depth == 0:
                with nogil:
                    q.unplug()


cdef void _wait_for_bios(Dio dio):
    """Reap our queues (GIL released) until only the submitter's reference is left."""
    cdef IoQueue q0 = dio.q0
    cdef IoQueue q
    cdef int r
    cdef timespec ts
    ts.tv_sec = 0
    ts.tv_nsec = 20000
    if q0 is None:
        return
    while ufs_dio_load(&dio.st.ref) > 1:
        r = 0
        if dio.queues is None:
            with nogil:
                r = q0.reap(1)
        else:
            for q in [q0] + dio.queues:
                with nogil:
                    r += q.reap(1 if q.inflight > 0 else 0)
        if r <= 0 and ufs_dio_load(&dio.st.ref) > 1:
            # another thread reaps this queue (reaper queues): give it time
            with nogil:
                nanosleep(&ts, NULL)


cdef object _dio_start(Kiocb iocb, object iter, IomapOps ops, DioOps dops, unsigned int dio_flags,
                       object private, int64_t done_before, IoQueue queue, bint plugged):
    cdef IovIter iov
    cdef Dio dio
    cdef IomapIter it
    cdef int64_t count, pos, end, isize
    cdef unsigned int iomap_flags = IOMAP_DIRECT
    cdef int ki_flags = iocb.ki_flags
    cdef bint write = (ki_flags & IOCB_WRITE) != 0
    cdef bint wait
    cdef int ret = 0, r

    if type(iter) is IovIter:
        iov = <IovIter>iter
    elif write:
        iov = IovIter(iter, writable=False)
    else:
        try:
            iov = IovIter(iter, writable=True)
        except BufferError as e:
            raise FaultError(_errno.EFAULT, "read into a read-only buffer") from e
    count = iov.count
    if count == 0:
        return None
    if not write and not iov.writable:
        raise FaultError(_errno.EFAULT, "read into a read-only buffer")
    if ops is None:
        raise InvalidError(_errno.EINVAL, "dio_start needs IomapOps")

    inode = iocb.ki_filp.f_inode
    isize = inode.i_size
    pos = iocb.ki_pos
    end = pos + count
    if pos < 0:
        raise InvalidError(_errno.EINVAL, f"negative position {pos}")

    dio = Dio.__new__(Dio)
    dio.iocb = iocb
    dio.dops = dops
    dio.inode = inode
    dio.iter = iov
    dio.i_size = isize
    dio.done_before = done_before
    dio.req_queue = queue
    dio.plugged = plugged
    dio.fs_block_size = 1u << <int>inode.i_blkbits
    dio.st.flags = dio_flags & (IOMAP_DIO_FSBLOCK_ALIGNED | IOMAP_DIO_BOUNCE)
    wait = iocb.ki_complete is None or (dio_flags & IOMAP_DIO_FORCE_WAIT) != 0
    if ki_flags & IOCB_NOWAIT:
        iomap_flags |= IOMAP_NOWAIT
    mapping = inode.i_mapping
    dio.mapping = mapping

    if not write:
        dio.st.flags |= DIO_INLINE_COMP
        if pos >= isize:
            return None
        if mapping.nrpages:
            if ki_flags & IOCB_NOWAIT:
                if mapping.has_dirty(pos, end):
                    raise AgainError(_errno.EAGAIN, "cached pages need writeback")
            else:
                mapping.write_and_wait_range(pos, end)
    else:
        iomap_flags |= IOMAP_WRITE
        dio.st.flags |= DIO_WRITE | DIO_CALLER_COMP
        if dio_flags & IOMAP_DIO_OVERWRITE_ONLY:
            if pos >= isize or end > isize:
                raise AgainError(_errno.EAGAIN, "OVERWRITE_ONLY write not inside EOF")
            iomap_flags |= IOMAP_OVERWRITE_ONLY
        if ki_flags & IOCB_ATOMIC:
            iomap_flags |= IOMAP_ATOMIC
        if ki_flags & IOCB_DSYNC:
            dio.st.flags |= DIO_NEED_SYNC
            # datasync but not sync: try FUA writes and skip the flush
            if not (ki_flags & IOCB_SYNC):
                dio.st.flags |= DIO_WRITE_THROUGH
        if mapping.nrpages:
            # kiocb_invalidate_pages: the cache must not keep stale copies of what we write
            if ki_flags & IOCB_NOWAIT:
                if mapping.has_pages(pos, end):
                    raise AgainError(_errno.EAGAIN, "cached pages in the range")
            else:
                try:
                    mapping.write_and_wait_range(pos, end)
                    mapping.invalidate_range(pos, end)
                except OSError as e:
                    if e.errno == _errno.EAGAIN:
                        raise
                    if ki_flags & IOCB_ATOMIC:
                        raise AgainError(_errno.EAGAIN, f"page cache invalidation failed: {e}") from e
                    raise NotBlockError(_errno.ENOTBLK,
                                        f"page cache invalidation failed ({e}); use buffered I/O") from e
        if not wait:
            dio.wq = inode.i_sb.s_dio_done_wq

    dio.wait_for_completion = wait
    inode.inode_dio_begin()
    # From here on every path ends in dio_complete (which calls inode_dio_end).

    it = IomapIter.__new__(IomapIter, inode, pos, count, iomap_flags, ops, private)
    try:
        while True:
            ret = it.iterate()
            if ret <= 0:
                break
            r = _dio_iter(dio, it)
            if r:
                it.status = r
            # A DIO that will wait keeps its bios plugged across mappings (as the kernel's
            # __iomap_dio_rw plugs around its loop) so submission and the wait are one
            # io_uring_enter; a long one still goes out every _PLUG_FLUSH_BIOS bios so the
            # device works while the rest is mapped.
            if not plugged and dio.q0 is not None and (
                    not wait or dio.q0.plugged >= _PLUG_FLUSH_BIOS):
                _unplug_all(dio, False)
    except BaseException as e:
        # a bug or an interrupt in the middle of submission: fail the dio, but keep the
        # reference accounting intact (bios may be in flight)
        ret = _exc_errno(e)
        if it.error is None:
            it.error = e
        if not isinstance(e, Exception):
            log.error("DIO submission interrupted: %r", e)

    if not write and it.pos >= isize:
        # report only what lies below the i_size snapshot
        n = it.pos - isize
        if n > iov.offset:
            n = iov.offset
        iov.offset -= n
        iov.count += n

    if ret == -_errno.EFAULT and dio.size and (dio_flags & IOMAP_DIO_PARTIAL):
        if not (ki_flags & IOCB_NOWAIT):
            wait = True
        ret = 0
    if ret == -_errno.ENOTBLK:
        # the filesystem asked for the rest to go through the page cache: a short result
        wait = True
        ret = 0
    if ret < 0:
        dio.set_error(ret, it.error)

    if dio.st.flags & DIO_WRITE_THROUGH:
        dio.st.flags &= ~DIO_NEED_SYNC

    dio.wait_for_completion = wait
    dio.cur_iter = None
    if wait:
        # reaping the submitter's queue submits what is plugged on it and waits in one
        # io_uring_enter; other queues (rare: a mapping on another device) unplug first
        if dio.queues is not None or dio.q0 is None:
            _unplug_all(dio, True)
        _wait_for_bios(dio)
        ufs_dio_add(&dio.st.ref, -1)
        return dio
    if not plugged:
        _unplug_all(dio, False)
    Py_INCREF(dio)                      # owned by the bios in flight from now on
    if ufs_dio_add(&dio.st.ref, -1) == 0:
        Py_DECREF(dio)
        return dio
    return EIOCBQUEUED                  # never touch dio again


cdef object _dio_complete(Dio dio):
    cdef Kiocb iocb = dio.iocb
    cdef int64_t ret, size = dio.size
    cdef int error
    cdef unsigned int flags
    if dio.completed:
        raise InvariantError("dio_complete called twice for one Dio")
    dio.completed = True
    error = ufs_dio_load(&dio.st.error)
    flags = dio.st.flags
    exc = dio.exc if error != 0 and error == dio.exc_code else None
    ret = error

    if dio.dops is not None and dio.dops.has_end_io:
        try:
            r = dio.dops.end_io(iocb, size, error, flags & (IOMAP_DIO_UNWRITTEN | IOMAP_DIO_COW))
            if r is not None:
                ret = r
                if ret != error:
                    exc = None
        except Exception as e:
            ret = _exc_errno(e)
            exc = e

    if ret == 0:
        ret = size
        if not (flags & DIO_WRITE) and iocb.ki_pos + ret > dio.i_size:
            ret = dio.i_size - iocb.ki_pos

    # drop pages a buffered reader may have cached from the old blocks meanwhile; after
    # end_io, so nobody caches zeroes of a not yet converted unwritten extent
    if (error == 0 and size and (flags & DIO_WRITE) and not (flags & DIO_NO_INVALIDATE)
            and dio.mapping.nrpages):
        try:
            dio.mapping.invalidate_range(iocb.ki_pos, iocb.ki_pos + size)
        except OSError as e:
            log.warning("DIO write at %d+%d: page cache invalidation failed (%s); "
                        "cached data may be stale", iocb.ki_pos, size, e)

    dio.inode.inode_dio_end()

    if ret > 0:
        iocb.ki_pos += ret
        if flags & DIO_NEED_SYNC:
            try:
                ret = generic_write_sync(iocb, ret)
            except OSError as e:
                ret = _exc_errno(e)
                exc = e
        if ret > 0:
            ret += dio.done_before

    # release what the dio pinned (the user buffer, host objects)
    dio.iter = None
    dio.mapping = None
    dio.wq = None
    dio.q0 = None
    dio.queues = None
    dio.req_queue = None
    if ret < 0:
        if exc is not None:
            raise exc
        raise from_errno(ret)
    return ret


def dio_start(Kiocb iocb not None, iter, IomapOps ops not None, DioOps dops=None,
              unsigned int dio_flags=0, private=None, int64_t done_before=0, IoQueue queue=None):
    """__iomap_dio_rw: issue the direct I/O.

    Returns a ``Dio`` (all I/O ended; give it to ``dio_complete``), ``None`` (nothing to do:
    count 0, or a read at/after EOF), or ``EIOCBQUEUED`` (async kiocb, bios in flight;
    ``iocb.ki_complete(iocb, res)`` will be called).  Raises for errors before any I/O
    (EAGAIN, ENOTBLK, page-cache write-back errors, EFAULT for a read-only read buffer).
    """
    return _dio_start(iocb, iter, ops, dops, dio_flags, private, done_before, queue, False)


def dio_complete(Dio dio not None):
    """iomap_dio_complete: end_io, invalidate, inode_dio_end, ki_pos, sync; bytes or raises."""
    return _dio_complete(dio)


def dio_rw(Kiocb iocb not None, iter, IomapOps ops not None, DioOps dops=None,
           unsigned int dio_flags=0, private=None, int64_t done_before=0, IoQueue queue=None):
    """iomap_dio_rw: ``dio_start`` + ``dio_complete``.  Bytes (0 when there was nothing to
    do) or ``EIOCBQUEUED``; raises on error."""
    r = _dio_start(iocb, iter, ops, dops, dio_flags, private, done_before, queue, False)
    if r is None:
        return 0
    if type(r) is Dio:
        return _dio_complete(<Dio>r)
    return r


def generic_write_sync(Kiocb iocb not None, int64_t count):
    """After a successful write of ``count`` bytes ending at ``iocb.ki_pos``: with IOCB_DSYNC,
    ``ki_filp.vfs_fsync_range(ki_pos - count, ki_pos, datasync=not IOCB_SYNC)``.  Returns
    ``count``; raises the fsync error."""
    if count > 0 and (iocb.ki_flags & IOCB_DSYNC):
        iocb.ki_filp.vfs_fsync_range(iocb.ki_pos - count, iocb.ki_pos,
                                     not (iocb.ki_flags & IOCB_SYNC))
    return count


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

cdef class DioBatch:
    """Many DIOs sharing one queue and one device submission.

    ``DioBatch(queue)`` (a queue of the device, e.g. ``dev.new_queue(depth)``):

    - ``start(iocb, iter, ops, dops=None, dio_flags=0, private=None, done_before=0)``:
      ``dio_start`` on the batch's queue, except that an async kiocb's bios stay plugged
      until ``submit()``.  Same return values as ``dio_start``.
    - ``issue(...same...)``: like ``start``, but every outcome reaches ``iocb.ki_complete``
      exactly once: a returned ``Dio`` is completed here, ``None`` reports 0, an error raised
      before I/O reports its -errno.  For the async filesystem API.
    - ``submit()``: unplug (one io_uring_enter for everything started); returns the number
      of bios handed to the device.
    - ``wait(min_complete=1)``: reap at least that many bios (GIL released); completions
      call ``ki_complete`` on this thread (or queue work on ``s_dio_done_wq``).
    - ``inflight``: bios submitted and not yet ended.
    """

    def __init__(self, IoQueue queue not None):
        self.queue = queue

    def start(self, Kiocb iocb not None, iter, IomapOps ops not None, DioOps dops=None,
              unsigned int dio_flags=0, private=None, int64_t done_before=0):
        return _dio_start(iocb, iter, ops, dops, dio_flags, private, done_before, self.queue,
                          True)

    def issue(self, Kiocb iocb not None, iter, IomapOps ops not None, DioOps dops=None,
              unsigned int dio_flags=0, private=None, int64_t done_before=0):
        cdef object res
        if iocb.ki_complete is None:
            raise InvalidError(_errno.EINVAL, "DioBatch.issue needs an async kiocb (ki_complete)")
        try:
            r = _dio_start(iocb, iter, ops, dops, dio_flags, private, done_before, self.queue,
                           True)
            if r is None:
                res = 0
            elif type(r) is Dio:
                res = _dio_complete(<Dio>r)
            else:
                return
        except Exception as e:
            res = _exc_errno(e)
        iocb.ki_complete(iocb, res)

    def submit(self):
        cdef int n
        cdef IoQueue q = self.queue
        with nogil:
            n = q.unplug()
        return n

    def wait(self, int min_complete=1):
        cdef int n
        cdef IoQueue q = self.queue
        with nogil:
            n = q.reap(min_complete)
        if n < 0:
            raise from_errno(n)
        return n

    @property
    def inflight(self):
        return self.queue.inflight

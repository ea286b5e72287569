# cython: language_level=3
"""iomap types and the iteration loop (the kernel's include/linux/iomap.h + fs/iomap/iter.c).

Owns: the C enums (mirrored as IntFlags in ``ufs.iomap``), ``IoMap``, ``IomapOps``, ``DioOps``,
``Kiocb``, ``IovIter`` and ``IomapIter``.  Imports only ``ufs.errors`` and ``ufs.iomap.bdev``
(for the ``BlockDev`` type of ``IoMap.bdev``).

Invariants of the loop (newest kernel semantics, reference/iomap-semantics.md §2.7):
- before every ``iomap_begin`` the iomap and srcmap are reset (HOLE, NULL_ADDR, no flags);
- ``iomap_end(start_pos, trimmed_len, advanced)`` runs once per mapping that ``iomap_begin``
  returned, and its error counts only when that mapping made no progress;
- the loop goes on while ``status == 0``, bytes remain, and the mapping advanced (or is STALE);
- a mapping that breaks the contract (offset > pos, length <= 0, end <= pos, STALE set by the
  filesystem) ends the loop with ``InvariantError`` (EIO) after ``iomap_end`` was called for it.
No locks: an IomapIter belongs to one thread; an IovIter to one I/O at a time.
"""

cimport cython
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE,
                             PyBUF_WRITABLE)
from libc.stdint cimport uint64_t, int64_t

import errno as _errno

from ufs.errors import (InvariantError, NotSupportedError, FaultError, InvalidError,
                        from_errno)

EIOCBQUEUED = -529
IOMAP_NULL_ADDR_PY = 2 ** 64 - 1

# The C values, by IntFlag name, for the mirror check in ufs/iomap/__init__.py.
C_ENUMS = {
    "MapType": {"HOLE": IOMAP_HOLE, "DELALLOC": IOMAP_DELALLOC, "MAPPED": IOMAP_MAPPED,
                "UNWRITTEN": IOMAP_UNWRITTEN, "INLINE": IOMAP_INLINE},
    "MapFlag": {"NEW": IOMAP_F_NEW, "DIRTY": IOMAP_F_DIRTY, "SHARED": IOMAP_F_SHARED,
                "MERGED": IOMAP_F_MERGED, "BOUNDARY": IOMAP_F_BOUNDARY,
                "ATOMIC_BIO": IOMAP_F_ATOMIC_BIO, "SIZE_CHANGED": IOMAP_F_SIZE_CHANGED,
                "STALE": IOMAP_F_STALE, "PRIVATE": IOMAP_F_PRIVATE},
    "IterFlag": {"WRITE": IOMAP_WRITE, "ZERO": IOMAP_ZERO, "REPORT": IOMAP_REPORT,
                 "FAULT": IOMAP_FAULT, "DIRECT": IOMAP_DIRECT, "NOWAIT": IOMAP_NOWAIT,
                 "OVERWRITE_ONLY": IOMAP_OVERWRITE_ONLY, "UNSHARE": IOMAP_UNSHARE,
                 "ATOMIC": IOMAP_ATOMIC},
    "DioFlag": {"FORCE_WAIT": IOMAP_DIO_FORCE_WAIT, "OVERWRITE_ONLY": IOMAP_DIO_OVERWRITE_ONLY,
                "PARTIAL": IOMAP_DIO_PARTIAL, "FSBLOCK_ALIGNED": IOMAP_DIO_FSBLOCK_ALIGNED,
                "BOUNCE": IOMAP_DIO_BOUNCE, "UNWRITTEN": IOMAP_DIO_UNWRITTEN,
                "COW": IOMAP_DIO_COW},
    "Iocb": {"DSYNC": IOCB_DSYNC, "SYNC": IOCB_SYNC, "NOWAIT": IOCB_NOWAIT,
             "APPEND": IOCB_APPEND, "ATOMIC": IOCB_ATOMIC, "DIRECT": IOCB_DIRECT,
             "WRITE": IOCB_WRITE},
    "EIOCBQUEUED": EIOCBQUEUED_C,
    "IOMAP_NULL_ADDR": IOMAP_NULL_ADDR,
}


cdef inline int _exc_errno(object exc):
    """-errno for an exception (EIO for anything without an errno)."""
    if isinstance(exc, OSError) and (<object>exc).errno:
        return -<int>(<object>exc).errno
    return -_errno.EIO


# --------------------------------------------------------------------------------------------
@cython.freelist(32)
cdef class IoMap:
    """struct iomap: ``addr`` (device bytes), ``offset``/``length`` (file bytes), ``type``,
    ``flags``, ``bdev``, ``inline_data``, ``private``, ``validity_cookie``; plus
    ``iter_private`` (the ``private`` of the iteration this map belongs to)."""

    def __cinit__(self):
        self.addr = IOMAP_NULL_ADDR
        self.type = IOMAP_HOLE

    def __init__(self, *, offset=0, length=0, type=IOMAP_HOLE, flags=0,
                 addr=IOMAP_NULL_ADDR, bdev=None, inline_data=None, private=None,
                 validity_cookie=0):
        self.offset = offset
        self.length = length
        self.type = type
        self.flags = flags
        self.addr = addr
        self.bdev = bdev
        self.inline_data = inline_data
        self.private = private
        self.validity_cookie = validity_cookie

    cdef void _reset(self, object iter_private) noexcept:
        self.addr = IOMAP_NULL_ADDR
        self.offset = 0
        self.length = 0
        self.type = IOMAP_HOLE
        self.flags = 0
        self.bdev = None
        self.inline_data = None
        self.private = None
        self.validity_cookie = 0
        self.iter_private = iter_private

    cpdef reset(self):
        """Back to the state iomap_begin starts from: HOLE, NULL_ADDR, zero length/flags."""
        self._reset(self.iter_private)

    def __repr__(self):
        addr = "NULL" if self.addr == IOMAP_NULL_ADDR else hex(self.addr)
        return (f"IoMap(offset={self.offset}, length={self.length}, type={self.type}, "
                f"flags={self.flags:#x}, addr={addr})")


# --------------------------------------------------------------------------------------------
cdef dict _override_cache = {}


cdef bint _overrides(object obj, str name, type base):
    """True when type(obj) replaces base.name (a Python def or a Cython cpdef override)."""
    cls = type(obj)
    key = (cls, name)
    r = _override_cache.get(key)
    if r is None:
        r = getattr(cls, name) is not getattr(base, name)
        _override_cache[key] = r
    return r


cdef class IomapOps:
    """The filesystem's mapping operations.  Subclass and override ``iomap_begin`` (required)
    and ``iomap_end`` (optional).  Raise a ``ufs.errors`` exception (or return -errno) to fail."""

    def __cinit__(self, *args, **kwargs):
        self.has_iomap_end = _overrides(self, "iomap_end", IomapOps)

    cpdef iomap_begin(self, inode, int64_t pos, int64_t length, unsigned int flags,
                      IoMap iomap, IoMap srcmap):
        raise NotSupportedError(_errno.EOPNOTSUPP, "iomap_begin is not implemented")

    cpdef iomap_end(self, inode, int64_t pos, int64_t length, int64_t written,
                    unsigned int flags, IoMap iomap):
        return None


cdef class DioOps:
    """The filesystem's DIO operations: ``end_io(iocb, size, error, flags)`` and
    ``submit_io(iter, bio, file_offset)``, both optional (docs/CORE-API.md §3)."""

    def __cinit__(self, *args, **kwargs):
        self.has_end_io = _overrides(self, "end_io", DioOps)
        self.has_submit_io = _overrides(self, "submit_io", DioOps)

    cpdef end_io(self, iocb, int64_t size, int error, unsigned int flags):
        return None

    cpdef submit_io(self, iter, bio, int64_t file_offset):
        bio.submit()


# --------------------------------------------------------------------------------------------
@cython.freelist(64)
cdef class Kiocb:
    """struct kiocb: ``ki_filp``, ``ki_pos`` (bytes), ``ki_flags`` (Iocb), ``ki_complete``
    (None = synchronous), ``private``."""

    def __init__(self, filp, int64_t pos=0, int flags=0, complete=None, private=None):
        self.ki_filp = filp
        self.ki_pos = pos
        self.ki_flags = flags
        self.ki_complete = complete
        self.private = private

    def __repr__(self):
        return f"Kiocb(pos={self.ki_pos}, flags={self.ki_flags:#x}, async={self.ki_complete is not None})"


# --------------------------------------------------------------------------------------------
@cython.freelist(64)
cdef class IovIter:
    """A user buffer (struct iov_iter).  ``offset`` bytes were consumed, ``count`` remain.

    ``nofault`` + ``fault_at``: while ``nofault`` is set, bytes at buffer offsets >= ``fault_at``
    are "not resident" and touching them fails with EFAULT (the engine stops there);
    ``fault_in()`` makes every page resident again.
    """

    def __cinit__(self, buf, count=None, *, writable=None):
        self._fault_at = -1
        if writable is None:
            try:
                PyObject_GetBuffer(buf, &self.view, PyBUF_WRITABLE)
                self.writable = True
            except (BufferError, TypeError):
                PyObject_GetBuffer(buf, &self.view, PyBUF_SIMPLE)
                self.writable = False
        elif writable:
            PyObject_GetBuffer(buf, &self.view, PyBUF_WRITABLE)
            self.writable = True
        else:
            PyObject_GetBuffer(buf, &self.view, PyBUF_SIMPLE)
            self.writable = False
        self.has_view = True
        self.obj = buf
        self.base = <char*>self.view.buf
        self.offset = 0
        if count is None:
            self.count = self.view.len
        else:
            if count < 0 or count > self.view.len:
                raise InvalidError(_errno.EINVAL, f"count {count} outside a {self.view.len}-byte buffer")
            self.count = count

    def __dealloc__(self):
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False

    cdef int64_t usable(self, int64_t want) noexcept:
        cdef int64_t avail
        if want > self.count:
            want = self.count
        if self.nofault and self._fault_at >= 0:
            avail = self._fault_at - self.offset
            if avail < 0:
                avail = 0
            if avail < want:
                return avail
        return want

    @property
    def fault_at(self):
        return None if self._fault_at < 0 else self._fault_at

    @fault_at.setter
    def fault_at(self, value):
        self._fault_at = -1 if value is None else value

    @property
    def address(self):
        """Address of the next byte (alignment checks in tests)."""
        return <size_t>(self.base + self.offset)

    @property
    def buffer(self):
        return self.obj

    def fault_in(self):
        """Make the whole buffer resident (fault_in_iov_iter_*): no more EFAULT."""
        self._fault_at = -1

    def advance(self, int64_t n):
        if n < 0 or n > self.count:
            raise InvariantError(f"advance({n}) with {self.count} bytes left")
        self.offset += n
        self.count -= n

    def revert(self, int64_t n):
        if n < 0 or n > self.offset:
            raise InvariantError(f"revert({n}) with {self.offset} bytes consumed")
        self.offset -= n
        self.count += n

    def truncate(self, int64_t count):
        """Limit the remaining count (iov_iter_truncate); never grows it."""
        if 0 <= count < self.count:
            self.count = count

    def __len__(self):
        return self.count

    def __repr__(self):
        return f"IovIter(offset={self.offset}, count={self.count}, nofault={self.nofault}, fault_at={self.fault_at})"


# --------------------------------------------------------------------------------------------
@cython.freelist(16)
cdef class IomapIter:
    """The iteration loop (docs/CORE-API.md §3):

        it = IomapIter(inode, pos, length, IterFlag.WRITE, ops)
        while it.next():
            n = it.length            # usable bytes from it.pos in this mapping
            ...                      # it.iomap / it.srcmap
            it.advance(n)            # or less; or it.status = -errno
    """

    def __cinit__(self, inode, int64_t pos, int64_t length, unsigned int flags,
                  IomapOps ops not None, private=None):
        self.inode = inode
        self.pos = pos
        self.len = length
        self.start_pos = pos
        self.flags = flags
        self.ops = ops
        self.private = private
        # fresh maps are already HOLE/NULL_ADDR (IoMap.__cinit__)
        self.iomap = IoMap.__new__(IoMap)
        self.srcmap = IoMap.__new__(IoMap)
        self.iomap.iter_private = private
        self.srcmap.iter_private = private

    cdef int64_t length_c(self) noexcept:
        """iomap_length(): min(len, min(iomap end, srcmap end if not HOLE) - pos)."""
        cdef int64_t end = self.iomap.offset + self.iomap.length
        cdef int64_t send
        if self.srcmap.type != IOMAP_HOLE:
            send = self.srcmap.offset + self.srcmap.length
            if send < end:
                end = send
        end -= self.pos
        return end if end < self.len else self.len

    cdef int advance_c(self, int64_t count) noexcept:
        if count < 0 or count > self.length_c():
            return -_errno.EIO
        self.pos += count
        self.len -= count
        self.processed += count
        return 0

    cdef int _fail(self, object exc) except -1000:
        self.error = exc
        self.finished = True
        return _exc_errno(exc)

    cdef int _call_end(self, int64_t pos, int64_t length, int64_t written) except -1000:
        """iomap_end; 0 or -errno (exception kept in self.error)."""
        try:
            r = self.ops.iomap_end(self.inode, pos, length, written, self.flags, self.iomap)
        except BaseException as e:
            if not isinstance(e, Exception):
                raise
            self.error = e
            return _exc_errno(e)
        if r is not None and r < 0:
            self.error = from_errno(r)
            return r
        return 0

    cdef int iterate(self) except -1000:
        cdef int64_t advanced, olen, trimmed, end
        cdef int ret
        cdef bint stale
        if self.finished:
            return 0
        if self.started:
            # end the mapping the body just used
            stale = (self.iomap.flags & IOMAP_F_STALE) != 0
            advanced = self.pos - self.start_pos
            olen = self.len + advanced
            if self.ops.has_iomap_end:
                end = self.iomap.offset + self.iomap.length
                if self.srcmap.type != IOMAP_HOLE and self.srcmap.offset + self.srcmap.length < end:
                    end = self.srcmap.offset + self.srcmap.length
                trimmed = end - self.start_pos
                if trimmed > olen:
                    trimmed = olen
                body_error = self.error
                ret = self._call_end(self.start_pos, trimmed, advanced)
                if ret < 0:
                    if advanced == 0:
                        self.finished = True
                        return ret
                    self.error = body_error   # dropped: the mapping made progress (sem §2.6)
            if self.status > 0:
                self.status = -_errno.EIO
                self.error = InvariantError(f"iteration status {self.status} > 0")
            if self.status < 0:
                ret = self.status
                if self.error is None or _exc_errno(self.error) != ret:
                    self.error = from_errno(ret)
            elif self.len == 0 or (advanced == 0 and not stale):
                ret = 0
            else:
                ret = 1
            self.status = 0
            self.iomap._reset(self.private)
            self.srcmap._reset(self.private)
            if ret <= 0:
                self.finished = True
                return ret
        else:
            self.started = True
            if self.len <= 0:
                self.finished = True
                return 0

        # begin the next mapping
        try:
            r = self.ops.iomap_begin(self.inode, self.pos, self.len, self.flags,
                                     self.iomap, self.srcmap)
        except BaseException as e:
            if not isinstance(e, Exception):
                raise
            return self._fail(e)
        if r is not None and r < 0:
            return self._fail(from_errno(r))
        self.start_pos = self.pos
        if (self.iomap.offset > self.pos or self.iomap.length <= 0
                or self.iomap.offset + self.iomap.length <= self.pos
                or (self.iomap.flags & IOMAP_F_STALE)
                or (self.srcmap.type != IOMAP_HOLE
                    and (self.srcmap.offset > self.pos or self.srcmap.length <= 0
                         or self.srcmap.offset + self.srcmap.length <= self.pos))):
            # a broken mapping still gets its iomap_end (with nothing written), then EIO
            msg = (f"iomap_begin({self.pos}, {self.len}) returned {self.iomap!r}"
                   f" (srcmap {self.srcmap!r}): breaks the iomap_begin contract")
            if self.ops.has_iomap_end:
                self._call_end(self.pos, self.len, 0)
            return self._fail(InvariantError(msg))
        self.error = None
        return 1

    # ---- Python API ---------------------------------------------------------------------
    def next(self):
        """End the previous mapping, begin the next; False when done; raises the first error."""
        cdef int r = self.iterate()
        if r < 0:
            err = self.error if self.error is not None else from_errno(r)
            raise err
        return r == 1

    def advance(self, int64_t count):
        """iomap_iter_advance(): consume count (<= length) bytes of the current mapping."""
        if not self.started or self.finished:
            raise InvariantError("advance() outside an active mapping")
        if self.advance_c(count) < 0:
            raise InvariantError(f"advance({count}) beyond iomap_length {self.length_c()}")

    @property
    def length(self):
        """iomap_length(): bytes usable from pos in the current mapping."""
        return self.length_c() if (self.started and not self.finished) else 0

    @property
    def remaining(self):
        return self.len

    def __repr__(self):
        return (f"IomapIter(pos={self.pos}, len={self.len}, flags={self.flags:#x}, "
                f"processed={self.processed}, status={self.status})")

# cython: language_level=3
#
# iomap types: the C-level contract between the iteration loop, the DIO engine
# (dio.pyx) and personalities written in Cython.  See docs/CORE-API.md §3 and
# reference/iomap-semantics.md §2 for the semantics; values are ours, names are
# the kernel's.  The Python IntFlag mirrors live in ufs/iomap/__init__.py and a
# test checks they agree with these enums.

from libc.stdint cimport uint64_t, int64_t

from ufs.iomap.bdev cimport BlockDev

# ---- mapping types (struct iomap.type) --------------------------------------
cdef enum:
    IOMAP_HOLE = 0
    IOMAP_DELALLOC = 1
    IOMAP_MAPPED = 2
    IOMAP_UNWRITTEN = 3
    IOMAP_INLINE = 4

# ---- mapping flags (struct iomap.flags) -------------------------------------
# Set by the filesystem in iomap_begin:
cdef enum:
    IOMAP_F_NEW = 1 << 0
    IOMAP_F_DIRTY = 1 << 1
    IOMAP_F_SHARED = 1 << 2
    IOMAP_F_MERGED = 1 << 3
    IOMAP_F_BOUNDARY = 1 << 6
    IOMAP_F_ATOMIC_BIO = 1 << 8
    # set by the core (never by iomap_begin):
    IOMAP_F_SIZE_CHANGED = 1 << 9
    IOMAP_F_STALE = 1 << 10
    # 1 << 12 and above belong to the personality
    IOMAP_F_PRIVATE = 1 << 12

# ---- operation flags to iomap_begin/iomap_end (no flag = read) --------------
cdef enum:
    IOMAP_WRITE = 1 << 0
    IOMAP_ZERO = 1 << 1
    IOMAP_REPORT = 1 << 2
    IOMAP_FAULT = 1 << 3
    IOMAP_DIRECT = 1 << 4
    IOMAP_NOWAIT = 1 << 5
    IOMAP_OVERWRITE_ONLY = 1 << 6
    IOMAP_UNSHARE = 1 << 7
    IOMAP_ATOMIC = 1 << 9

# ---- public dio flags (dio_start's dio_flags) and end_io flags ---------------
# The private engine bits (1 << 25 and up) are defined in dio.pyx only.
cdef enum:
    IOMAP_DIO_FORCE_WAIT = 1 << 0
    IOMAP_DIO_OVERWRITE_ONLY = 1 << 1
    IOMAP_DIO_PARTIAL = 1 << 2
    IOMAP_DIO_FSBLOCK_ALIGNED = 1 << 3
    IOMAP_DIO_BOUNCE = 1 << 4
    # reported to DioOps.end_io
    IOMAP_DIO_UNWRITTEN = 1 << 8
    IOMAP_DIO_COW = 1 << 9

# ---- kiocb flags (Kiocb.ki_flags); DSYNC/SYNC/NOWAIT/APPEND/ATOMIC equal the
# RWF_* values so a pwritev2 flags word can be or-ed in directly ----------------
cdef enum:
    IOCB_DSYNC = 1 << 1
    IOCB_SYNC = 1 << 2
    IOCB_NOWAIT = 1 << 3
    IOCB_APPEND = 1 << 4
    IOCB_ATOMIC = 1 << 6
    IOCB_DIRECT = 1 << 17
    IOCB_WRITE = 1 << 18

cdef enum:
    EIOCBQUEUED_C = -529

cdef extern from *:
    """
    #define UFS_IOMAP_NULL_ADDR ((unsigned long long)-1)
    """
    unsigned long long IOMAP_NULL_ADDR "UFS_IOMAP_NULL_ADDR"


cdef class IoMap:
    """One mapping (struct iomap).  All attributes are public."""
    cdef public uint64_t addr            # device bytes; IOMAP_NULL_ADDR = none
    cdef public int64_t offset           # file bytes
    cdef public int64_t length           # bytes
    cdef public int type
    cdef public unsigned int flags
    cdef public BlockDev bdev            # required for MAPPED/UNWRITTEN
    cdef public object inline_data       # writable buffer covering [offset, offset+length)
    cdef public object private           # fs cookie, given back to iomap_end
    cdef public uint64_t validity_cookie
    cdef public object iter_private      # the iteration's `private` (container_of(iomap)->private)
    cpdef reset(self)
    cdef void _reset(self, object iter_private) noexcept


cdef class IomapOps:
    """iomap_begin / iomap_end; override the cpdef methods (Python or Cython)."""
    cdef readonly bint has_iomap_end     # iomap_end overridden (else never called)
    cpdef iomap_begin(self, inode, int64_t pos, int64_t length, unsigned int flags,
                      IoMap iomap, IoMap srcmap)
    cpdef iomap_end(self, inode, int64_t pos, int64_t length, int64_t written,
                    unsigned int flags, IoMap iomap)


cdef class DioOps:
    """end_io / submit_io of the DIO engine (both optional)."""
    cdef readonly bint has_end_io
    cdef readonly bint has_submit_io
    cpdef end_io(self, iocb, int64_t size, int error, unsigned int flags)
    cpdef submit_io(self, iter, bio, int64_t file_offset)


cdef class Kiocb:
    cdef public object ki_filp
    cdef public int64_t ki_pos
    cdef public int ki_flags
    cdef public object ki_complete       # None: synchronous kiocb
    cdef public object private


cdef class IovIter:
    """A user buffer as the engine sees it: a base pointer, a consumed offset,
    a remaining count, and the nofault/fault_at page-residency model."""
    cdef Py_buffer view
    cdef bint has_view
    cdef char* base
    cdef readonly bint writable          # the engine may store into it (a read target)
    cdef readonly int64_t offset         # bytes consumed from base
    cdef readonly int64_t count          # bytes remaining
    cdef public bint nofault
    cdef int64_t _fault_at               # -1 = every page is resident
    cdef object obj
    cdef int64_t usable(self, int64_t want) noexcept   # bytes touchable now (nofault rule)


cdef class IomapIter:
    """The iteration loop (struct iomap_iter + iomap_iter()).  cdef methods for
    the engine, next()/advance() for Python callers."""
    cdef readonly object inode
    cdef readonly int64_t pos            # current file position
    cdef readonly int64_t len            # bytes still to iterate
    cdef readonly int64_t start_pos      # position the current mapping started at
    cdef readonly int64_t processed      # total advanced since the loop started
    cdef readonly unsigned int flags
    cdef readonly IomapOps ops
    cdef readonly IoMap iomap
    cdef readonly IoMap srcmap
    cdef public object private
    cdef public int status               # 0 or -errno, set by the body
    cdef readonly object error           # exception behind the last negative return
    cdef bint started
    cdef bint finished

    cdef int _fail(self, object exc) except -1000
    cdef int _call_end(self, int64_t pos, int64_t length, int64_t written) except -1000
    cdef int iterate(self) except -1000   # 1 = body again, 0 = done, <0 = -errno (self.error set)
    cdef int advance_c(self, int64_t count) noexcept
    cdef int64_t length_c(self) noexcept

# cython: language_level=3
"""Block devices, bios and I/O queues: the bottom of the ufs I/O stack.

Owns: the ``bio``/``IoQueue``/``BlockDev`` contract of ``bdev.pxd`` and its devices:

- ``RamDev``: a strict in-memory device with a write-cache model (``crash()``).
- ``DirectDev`` (from ``open_device``): an image file or block device opened with
  ``O_DIRECT``; I/O through an io_uring ring driven by raw syscalls
  (``include/ufs_bdev.h``), or through a pthread pool doing ``preadv2``/``pwritev2``.
- ``FaultDev``: wraps any device, fails/corrupts/tears chosen bios, logs every bio.
- ``AlignedBuffer``/``aligned_buffer`` and ``BufPool`` (bounded bounce buffers).

May import: the standard library and ``ufs.errors`` only.

Invariants and locks:
- A submitted bio belongs to its queue until its ``end_io`` is called, exactly once,
  with ``status`` already set, by the thread that reaps the queue (``unplug``,
  ``reap``, ``wait``; the background reaper thread of a ``reaper=True`` queue),
  without the GIL.  ``submit()`` always takes the bio (it returns 0); a bio the
  device refuses (``check_bio``) is completed with its error at the next
  ``unplug``/``reap``.
- ``IoQueue.inflight`` counts submitted bios whose end_io has not been called
  (plugged ones included); ``plugged`` those not yet handed to the device.
  Both are decremented *before* end_io runs, since end_io may free the bio.
- A queue is used by one thread at a time; ``BlockDev.queue()`` gives each thread
  its own.  ``reaper=True`` queues guard submit/unplug with a pthread mutex.
- ``RamDev`` serialises data access with one pthread mutex per device.
- ``check_bio`` is the single alignment rule: addr, length and buffer address must
  be multiples of ``logical_block_size``; ``[addr, addr+length)`` must lie inside
  ``size``; writes on a read-only device fail with ``-EROFS``.
- io_uring: one ring per queue.  The calling thread's queue (``queue()``) is set
  up SINGLE_ISSUER|DEFER_TASKRUN|COOP_TASKRUN (only that thread submits and
  reaps); ``new_queue()`` rings use none of these, so they may be handed from
  thread to thread and reaped by a reaper thread.  Short transfers are resubmitted
  for the remainder; a transfer of 0 bytes ends the bio with ``-EIO``.
- Thread pool: one pool of ``UFS_IO_THREADS`` (default 16) pthreads per
  DirectDev, working on its own ``dup`` of the fd; queues hold a reference to it.
- Python helpers and ``_BioBatch``/``_run_bios``/``_bench_queue`` are for tools
  and tests; the engine talks to queues at the C level only.
"""

import errno as _errno
import os
import random as _random
import stat as _stat
import threading
import warnings
import weakref

from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo,
                             PyBuffer_Release, PyObject_GetBuffer)
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from ufs.errors import (AlignmentError, InvalidError, InvariantError, ReadOnlyError,
                        from_errno)

__all__ = ["BlockDev", "IoQueue", "RamDev", "DirectDev", "FaultDev", "AlignedBuffer",
           "BufPool", "aligned_buffer", "open_device", "BIO_READ", "BIO_WRITE", "BIO_FLUSH",
           "BIO_FUA", "BIO_SYNC"]

# The C enums of bdev.pxd, visible from Python under the same names.
globals().update(BIO_READ=BIO_READ, BIO_WRITE=BIO_WRITE, BIO_FLUSH=BIO_FLUSH,
                 BIO_FUA=BIO_FUA, BIO_SYNC=BIO_SYNC)

cdef extern from "<errno.h>" nogil:
    enum:
        EINVAL
        EROFS
        EIO
        EBADF
        EINTR
        EAGAIN
        EBUSY
        ENOMEM
        ENOSPC
        ETIME
    int errno

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef extern from "<sys/mman.h>" nogil:
    int madvise(void* addr, size_t length, int advice)
    enum:
        MADV_HUGEPAGE

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef unsigned long pthread_t
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)
    int pthread_cond_init(pthread_cond_t* c, void* attr)
    int pthread_cond_destroy(pthread_cond_t* c)
    int pthread_cond_wait(pthread_cond_t* c, pthread_mutex_t* m)
    int pthread_cond_signal(pthread_cond_t* c)
    int pthread_cond_broadcast(pthread_cond_t* c)
    int pthread_create(pthread_t* t, void* attr, void* (*fn)(void*) noexcept nogil, void* arg)
    int pthread_join(pthread_t t, void** ret)

cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char* mem, Py_ssize_t size, int flags)


# A thread that Python did not create (a libfuse worker, any C library's thread) gets a
# fresh Python thread state each time it takes the GIL and loses it when it lets go, and
# threading.local dies with it: its io_uring ring was set up and torn down per request
# (io_uring_setup + 3 mmaps + close per FUSE WRITE).  ufs_tstate_pin() keeps the calling
# foreign thread's state for the life of the OS thread (one extra PyGILState_Ensure); a
# pthread key destructor gives it back when the thread exits, which drops the thread's
# queue like any other thread-local.
cdef extern from *:
    """
    #include <pthread.h>
    static pthread_key_t ufs_tstate_key;
    static pthread_once_t ufs_tstate_once = PTHREAD_ONCE_INIT;
    static __thread int ufs_tstate_pinned;

    static void ufs_tstate_unpin(void *ts)
    {
        /* At thread exit glibc has already cleared CPython's own thread-state key (it
           clears every key's value as it walks them), so PyGILState_* cannot find this
           thread's state any more: use the one we stored and delete it by hand. */
        if (ts == NULL || !Py_IsInitialized() || _Py_IsFinalizing())
            return;
        PyEval_RestoreThread((PyThreadState *)ts);
        PyThreadState_Clear((PyThreadState *)ts);
        PyThreadState_DeleteCurrent();
    }

    static void ufs_tstate_mkkey(void)
    {
        pthread_key_create(&ufs_tstate_key, ufs_tstate_unpin);
    }

    /* Call with the GIL held, from a thread Python did not create. */
    static int ufs_tstate_pin(void)
    {
        if (ufs_tstate_pinned)
            return 0;
        if (pthread_once(&ufs_tstate_once, ufs_tstate_mkkey) != 0)
            return -1;
        if (pthread_setspecific(ufs_tstate_key, PyThreadState_Get()) != 0)
            return -1;
        PyGILState_Ensure();
        ufs_tstate_pinned = 1;
        return 0;
    }
    """
    int ufs_tstate_pin()


cdef long _thread_queues_made = 0


def thread_queues_made() -> int:
    """How many per-thread queues ``BlockDev.queue()`` has set up in this process (each is
    an io_uring ring with the io_uring backend): a figure that should follow the number of
    threads doing I/O, never the number of requests."""
    return _thread_queues_made


cdef extern from "ufs_bdev.h" nogil:
    int ufs_atomic_add(int* p, int v)
    int ufs_atomic_load(const int* p)
    void ufs_atomic_store(int* p, int v)
    uint64_t ufs_atomic_next_u64(uint64_t* p)
    double ufs_now()


# ---------------------------------------------------------------------------
# Aligned memory
# ---------------------------------------------------------------------------

cdef inline bint _is_pow2(size_t x) noexcept nogil:
    return x != 0 and (x & (x - 1)) == 0


cdef class AlignedBuffer:
    """``posix_memalign``'ed, zeroed memory exposed through the writable buffer protocol.

    ``AlignedBuffer(size, alignment=4096)``.  ``address`` is the memory's address.
    ``release()`` frees the memory early; it raises ``BufferError`` while a
    memoryview (or any other buffer export) is alive, so memory a device may still
    be reading or writing through an export is never freed under it.
    """

    def __cinit__(self, size_t size, size_t alignment=4096):
        cdef void* p = NULL
        if not _is_pow2(alignment) or alignment < sizeof(void*):
            raise InvalidError(_errno.EINVAL, f"alignment {alignment} is not a power of two >= {sizeof(void*)}")
        # size 0 still gets one aligned allocation so ptr is never NULL.
        if posix_memalign(&p, alignment, size if size else alignment) != 0:
            raise MemoryError(f"posix_memalign({alignment}, {size})")
        memset(p, 0, size if size else alignment)
        self.ptr = <char*>p
        self.size = size
        self.alignment = alignment
        self._exports = 0

    def __dealloc__(self):
        if self.ptr != NULL:
            free(self.ptr)
            self.ptr = NULL

    def __getbuffer__(self, Py_buffer* view, int flags):
        if self.ptr == NULL:
            raise BufferError("AlignedBuffer was released")
        PyBuffer_FillInfo(view, self, self.ptr, <Py_ssize_t>self.size, 0, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self._exports -= 1

    def __len__(self):
        return self.size

    @property
    def address(self):
        return <uintptr_t>self.ptr

    @property
    def exports(self):
        return self._exports

    def release(self):
        """Free the memory now.  Idempotent; ``BufferError`` while exported."""
        if self._exports > 0:
            raise BufferError(f"AlignedBuffer has {self._exports} live export(s)")
        if self.ptr != NULL:
            free(self.ptr)
            self.ptr = NULL
            self.size = 0

    def __repr__(self):
        return f"<AlignedBuffer size={self.size} alignment={self.alignment} at {self.address:#x}>"


def aligned_buffer(size_t size, size_t alignment=4096):
    """Return a zeroed ``AlignedBuffer`` of ``size`` bytes aligned to ``alignment``."""
    return AlignedBuffer(size, alignment)


cdef struct pool_impl:
    pthread_mutex_t lock
    pthread_cond_t freed          # signalled by put()
    char** free_chunks            # stack of chunks ready for reuse
    int nfree
    int allocated                 # chunks ever allocated (<= max_chunks)
    int waiters


cdef char* _pool_take(BufPool pool, bint block) noexcept nogil:
    cdef pool_impl* p = <pool_impl*>pool._impl
    cdef char* c = NULL
    cdef void* mem = NULL
    pthread_mutex_lock(&p.lock)
    while True:
        if p.nfree > 0:
            p.nfree -= 1
            c = p.free_chunks[p.nfree]
            break
        if p.allocated < pool.max_chunks:
            if posix_memalign(&mem, pool.alignment, pool.chunk_size) == 0:
                p.allocated += 1
                c = <char*>mem
            break
        if not block:
            break
        p.waiters += 1
        pthread_cond_wait(&p.freed, &p.lock)
        p.waiters -= 1
    pthread_mutex_unlock(&p.lock)
    return c


cdef class BufPool:
    """Bounded pool of aligned chunks (``chunk_size`` bytes, at most ``max_chunks``).

    Chunks are allocated lazily up to the bound and recycled by ``put``.  ``get``
    (C level) blocks on a pthread condition variable while every chunk is out;
    ``try_get`` returns NULL instead.  Python: ``acquire(blocking=True) -> int
    address | None``, ``release(address)``.  Chunks are not zeroed on reuse.
    """

    def __cinit__(self, size_t chunk_size, int max_chunks, size_t alignment=4096):
        cdef pool_impl* p
        if chunk_size == 0 or max_chunks <= 0:
            raise InvalidError(_errno.EINVAL, "chunk_size and max_chunks must be positive")
        if not _is_pow2(alignment) or alignment < sizeof(void*):
            raise InvalidError(_errno.EINVAL, f"alignment {alignment} is not a power of two")
        p = <pool_impl*>calloc(1, sizeof(pool_impl))
        if p == NULL:
            raise MemoryError()
        p.free_chunks = <char**>calloc(max_chunks, sizeof(char*))
        if p.free_chunks == NULL:
            free(p)
            raise MemoryError()
        pthread_mutex_init(&p.lock, NULL)
        pthread_cond_init(&p.freed, NULL)
        self._impl = p
        self.chunk_size = chunk_size
        self.alignment = alignment
        self.max_chunks = max_chunks

    def __dealloc__(self):
        cdef pool_impl* p = <pool_impl*>self._impl
        cdef int i
        if p == NULL:
            return
        # Chunks still out at this point are leaked rather than freed under a user.
        for i in range(p.nfree):
            free(p.free_chunks[i])
        free(p.free_chunks)
        pthread_cond_destroy(&p.freed)
        pthread_mutex_destroy(&p.lock)
        free(p)
        self._impl = NULL

    cdef char* get(self) noexcept nogil:
        return _pool_take(self, True)

    cdef char* try_get(self) noexcept nogil:
        return _pool_take(self, False)

    cdef void put(self, char* c) noexcept nogil:
        cdef pool_impl* p = <pool_impl*>self._impl
        if c == NULL:
            return
        pthread_mutex_lock(&p.lock)
        p.free_chunks[p.nfree] = c
        p.nfree += 1
        pthread_cond_signal(&p.freed)
        pthread_mutex_unlock(&p.lock)

    def acquire(self, bint blocking=True):
        """A chunk's address (int), or None when exhausted and not blocking."""
        cdef char* c
        with nogil:
            c = _pool_take(self, blocking)
        return None if c == NULL else <uintptr_t>c

    def release(self, uintptr_t address):
        """Return a chunk obtained from ``acquire``."""
        if address == 0:
            raise InvalidError(_errno.EINVAL, "NULL chunk")
        self.put(<char*>address)

    def view(self, uintptr_t address):
        """A writable memoryview of the chunk at ``address`` (valid until released)."""
        return PyMemoryView_FromMemory(<char*>address, <Py_ssize_t>self.chunk_size, 0x200)

    @property
    def allocated(self):
        return (<pool_impl*>self._impl).allocated

    @property
    def available(self):
        """Chunks obtainable without blocking (free + not yet allocated)."""
        cdef pool_impl* p = <pool_impl*>self._impl
        return p.nfree + self.max_chunks - p.allocated

    @property
    def waiters(self):
        return (<pool_impl*>self._impl).waiters



# ---------------------------------------------------------------------------
# Queues and devices: the common part
# ---------------------------------------------------------------------------

cdef inline void _complete(IoQueue q, bio_t* b, int status) noexcept nogil:
    """Hand a bio back to its owner: count it out of the queue, then end_io."""
    b.status = status
    ufs_atomic_add(&q.inflight, -1)
    b.end_io(b)


cdef class IoQueue:
    """A submission/completion queue on one device (see bdev.pxd).

    Base class: concrete queues are made by ``BlockDev.new_queue``/``queue``.
    """

    def __cinit__(self, *args, **kwargs):
        self.inflight = 0
        self.plugged = 0
        self.plug_depth = 0
        self.plug_head = NULL
        self.plug_tail = NULL
        self.closed = False

    cdef void plug_add(self, bio_t* b) noexcept nogil:
        # every queue keeps submitted bios in order on one list until unplug();
        # inflight counts them from here, so reap(n) sees them before the device does
        if self.plug_tail == NULL:
            self.plug_head = b
        else:
            self.plug_tail.next = b
        self.plug_tail = b
        self.plugged += 1
        ufs_atomic_add(&self.inflight, 1)

    def start_plug(self):
        """Begin a batch (blk_start_plug): asynchronous DIOs started by this thread keep
        their bios on the plug list until :meth:`finish_plug` (or a reap).  Nests."""
        self.plug_depth += 1

    def finish_plug(self):
        """End a batch (blk_finish_plug): at the outermost level, hand every plugged
        bio to the device in one submission.  Returns what unplug() completed inline."""
        cdef int r = 0
        if self.plug_depth <= 0:
            raise InvariantError("finish_plug() without start_plug()")
        self.plug_depth -= 1
        if self.plug_depth == 0 and self.plugged:
            with nogil:
                r = self.unplug()
            if r < 0:
                raise from_errno(-r)
        return r

    cdef int submit(self, bio_t* b) noexcept nogil:
        return -EINVAL

    cdef int unplug(self) noexcept nogil:
        return -EINVAL

    cdef int reap(self, int min_complete) noexcept nogil:
        return -EINVAL

    def wait(self, int min_complete=1):
        """Unplug, then process at least ``min_complete`` completions (capped at
        ``inflight``), releasing the GIL; returns how many were processed."""
        cdef int r
        with nogil:
            r = self.reap(min_complete)
        if r < 0:
            raise from_errno(-r)
        return r

    def close(self):
        """Drain (reap everything in flight) and release the queue's resources."""
        self.closed = True

    def __repr__(self):
        return (f"<{type(self).__name__} dev={self.dev!r} inflight={self.inflight} "
                f"plugged={self.plugged}>")


cdef void _sync_end_io(bio_t* b) noexcept nogil:
    (<int*>b.private)[0] = 1


cdef int _sync_bio(IoQueue q, bio_t* b) noexcept nogil:
    """Submit one bio on the calling thread's queue and reap until it ended.

    Other bios completing meanwhile on the same queue get their end_io too (this
    thread is that queue's reaper)."""
    cdef int done = 0
    cdef int r
    b.end_io = _sync_end_io
    b.private = &done
    b.next = NULL
    q.submit(b)
    r = q.unplug()
    while not done:
        r = q.reap(1)
        if r < 0 and not done:
            return r
    return b.status


cdef inline void _bio_prepare(BlockDev dev, bio_t* b) noexcept nogil:
    """Per-submit bookkeeping every queue does."""
    b.seq = ufs_atomic_next_u64(&dev.next_seq)
    b.done = 0
    b.next = NULL


cdef _check_open(BlockDev dev):
    if dev.closed:
        raise from_errno(_errno.EBADF, "device is closed", dev.path)


cdef _check_aligned(BlockDev dev, uint64_t addr, uint64_t length):
    if (addr | length) & (dev.logical_block_size - 1):
        raise AlignmentError(_errno.EINVAL,
                             f"addr {addr} / length {length} not aligned to "
                             f"{dev.logical_block_size}", dev.path)


cdef int _dev_io(BlockDev dev, int op, int opf, uint64_t addr, char* buf, size_t length) except -1:
    cdef bio_t b
    cdef int r
    cdef IoQueue q = dev.queue()
    memset(&b, 0, sizeof(bio_t))
    b.op = op
    b.opf = opf
    b.addr = addr
    b.buf = buf
    b.length = length
    with nogil:
        r = _sync_bio(q, &b)
    if r < 0:
        raise from_errno(-r, None, dev.path)
    return 0


cdef class BlockDev:
    """An opened device or image file (base class; see bdev.pxd for the fields).

    Python helpers (all devices): ``pread(length, addr)``, ``pread_into(buf, addr)``,
    ``pwrite(buf, addr, *, fua=False)``, ``flush()``, ``close()``, context manager.
    They go through the calling thread's queue, one bio per call, bouncing memory
    that is not aligned to ``logical_block_size`` through an aligned buffer.

    End of device (what Linux does for ``O_DIRECT`` on a block device):
    a read is clamped at ``size`` (a read at or after the end returns ``b""``/0);
    a write starting at or after the end raises ``NoSpaceError`` (ENOSPC) and a
    write crossing the end is truncated to it (the returned count says so).
    A misaligned ``addr`` or length raises ``AlignmentError`` (EINVAL); any write on
    a read-only device raises ``ReadOnlyError`` (EROFS); any call after ``close()``
    raises ``BadFdError`` (EBADF).  At the bio level there is no clamping: a bio
    past the end fails with ``-EINVAL`` (``check_bio``).
    """

    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.path = None
        self.backend = "none"
        self.closed = False
        self.next_seq = 1
        self._local = threading.local()
        self._queues = weakref.WeakSet()

    cpdef IoQueue queue(self):
        """The calling thread's queue, created on first use."""
        q = getattr(self._local, "q", None)
        if q is None:
            if self.closed:
                raise from_errno(_errno.EBADF, "device is closed")
            if isinstance(threading.current_thread(), threading._DummyThread):
                # a foreign thread: keep its thread state (and so this queue) for the
                # life of the OS thread, not of the current GIL section
                ufs_tstate_pin()
            q = self._new_thread_queue()
            self._local.q = q
            global _thread_queues_made
            _thread_queues_made += 1
        return <IoQueue>q

    def current_queue(self):
        """The calling thread's queue if it has one already, else None (never creates one:
        for callers that only need to drive I/O this thread has in flight)."""
        return getattr(self._local, "q", None)

    cpdef IoQueue new_queue(self, int depth=128, bint reaper=False):
        raise NotImplementedError

    def _new_thread_queue(self):
        """The queue queue() gives the calling thread (it will be used by that thread only)."""
        return self.new_queue()

    cdef int check_bio(self, bio_t* b) noexcept nogil:
        cdef uint64_t mask = self.logical_block_size - 1
        cdef uint64_t end
        if self.closed:
            return -EBADF
        if b.op == BIO_FLUSH:
            return 0
        if b.op != BIO_READ and b.op != BIO_WRITE:
            return -EINVAL
        if b.op == BIO_WRITE and self.read_only:
            return -EROFS
        if ((b.addr | <uint64_t>b.length) & mask) != 0 or b.length == 0:
            return -EINVAL
        if (<uintptr_t>b.buf & mask) != 0:
            return -EINVAL
        end = b.addr + b.length
        if end < b.addr or end > self.size:
            return -EINVAL
        return 0

    # -- Python helpers -------------------------------------------------------

    def pread(self, size_t length, uint64_t addr):
        """Read ``length`` bytes at device address ``addr`` (clamped at the end)."""
        _check_open(self)
        _check_aligned(self, addr, length)
        if addr >= self.size:
            return b""
        if length > self.size - addr:
            length = self.size - addr
        if length == 0:
            return b""
        cdef AlignedBuffer tmp = AlignedBuffer(length, max(self.logical_block_size, 4096))
        _dev_io(self, BIO_READ, 0, addr, tmp.ptr, length)
        return PyBytes_FromStringAndSize(tmp.ptr, length)

    def pread_into(self, buf, uint64_t addr):
        """Read into the writable buffer ``buf`` at ``addr``; returns bytes read."""
        cdef Py_buffer view
        cdef size_t length
        cdef AlignedBuffer tmp
        _check_open(self)
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        try:
            length = <size_t>view.len
            _check_aligned(self, addr, length)
            if addr >= self.size or length == 0:
                return 0
            if length > self.size - addr:
                length = self.size - addr
            if (<uintptr_t>view.buf) & (self.logical_block_size - 1):
                tmp = AlignedBuffer(length, max(self.logical_block_size, 4096))
                _dev_io(self, BIO_READ, 0, addr, tmp.ptr, length)
                memcpy(view.buf, tmp.ptr, length)
            else:
                _dev_io(self, BIO_READ, 0, addr, <char*>view.buf, length)
            return length
        finally:
            PyBuffer_Release(&view)

    def pwrite(self, buf, uint64_t addr, *, bint fua=False):
        """Write ``buf`` at ``addr`` (FUA: through the volatile cache); returns bytes."""
        cdef Py_buffer view
        cdef size_t length
        cdef AlignedBuffer tmp
        _check_open(self)
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            length = <size_t>view.len
            _check_aligned(self, addr, length)
            if self.read_only:
                raise ReadOnlyError(_errno.EROFS, "device is read-only", self.path)
            if length == 0:
                return 0
            if addr >= self.size:
                raise from_errno(_errno.ENOSPC, None, self.path)
            if length > self.size - addr:
                length = self.size - addr
            if (<uintptr_t>view.buf) & (self.logical_block_size - 1):
                tmp = AlignedBuffer(length, max(self.logical_block_size, 4096))
                memcpy(tmp.ptr, view.buf, length)
                _dev_io(self, BIO_WRITE, BIO_FUA if fua else 0, addr, tmp.ptr, length)
            else:
                _dev_io(self, BIO_WRITE, BIO_FUA if fua else 0, addr, <char*>view.buf, length)
            return length
        finally:
            PyBuffer_Release(&view)

    def flush(self):
        """Flush the device's volatile write cache (fdatasync)."""
        _check_open(self)
        _dev_io(self, BIO_FLUSH, 0, 0, NULL, 0)

    def _drain_queues(self, double timeout=5.0):
        """Reap this thread's queue; wait (up to ``timeout``) for other queues."""
        import time
        q = getattr(self._local, "q", None)
        if q is not None:
            while (<IoQueue>q).inflight:
                (<IoQueue>q).wait((<IoQueue>q).inflight)
        deadline = time.monotonic() + timeout
        for other in list(self._queues):
            if other is q:
                continue
            while (<IoQueue>other).inflight:
                if time.monotonic() > deadline:
                    raise from_errno(_errno.EBUSY, f"{(<IoQueue>other).inflight} bio(s) still in "
                                     f"flight on another thread's queue", self.path)
                time.sleep(0.001)

    def close(self):
        """Wait for in-flight I/O, then release the device.  Idempotent."""
        if self.closed:
            return
        self._drain_queues()
        for other in list(self._queues):
            other.close()
        self.closed = True
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else self.backend
        return (f"<{type(self).__name__} {self.path!r} size={self.size} "
                f"lbs={self.logical_block_size} {state}>")


# ---------------------------------------------------------------------------
# RamDev
# ---------------------------------------------------------------------------

cdef struct ram_write:
    uint64_t seq
    uint64_t addr
    size_t length
    bint fua
    char* data
    ram_write* next


cdef class RamQueue(IoQueue):
    """Completes every plugged bio inline at unplug()."""
    cdef RamDev rdev

    def __cinit__(self, RamDev dev):
        self.dev = dev
        self.rdev = dev

    cdef int submit(self, bio_t* b) noexcept nogil:
        _bio_prepare(self.dev, b)
        self.plug_add(b)
        return 0

    cdef int unplug(self) noexcept nogil:
        cdef bio_t* b = self.plug_head
        cdef bio_t* nxt
        cdef int n = 0
        self.plug_head = NULL
        self.plug_tail = NULL
        self.plugged = 0
        while b != NULL:
            nxt = b.next
            b.next = NULL
            _complete(self, b, self.rdev._do_bio(b))
            n += 1
            b = nxt
        return n

    cdef int reap(self, int min_complete) noexcept nogil:
        if self.plug_head != NULL:
            return self.unplug()
        return 0


cdef class RamDev(BlockDev):
    """A strict in-memory block device with a volatile write-cache model.

    ``RamDev(size, logical_block_size=512, *, volatile_cache=True, fua=True,
    read_only=False, physical_block_size=None, data=None)``.

    Strict: a bio whose addr, length or buffer address is not a multiple of
    ``logical_block_size``, or that runs past ``size``, fails with ``-EINVAL``; a
    write on a read-only RamDev fails with ``-EROFS``.  Bios complete inline at
    ``unplug()``.

    Write-cache model (``volatile_cache=True``): every write since the last flush
    is *volatile* unless it is FUA.  A flush makes every earlier write durable.  A
    FUA write on a device without FUA (``fua=False``) is done as the kernel does:
    write, then a full cache flush.  ``crash(seed=None, keep_probability=0.5)``
    returns the bytes a power cut could leave: the durable image at the last
    flush, then, in submission order, every write since then, each FUA write
    always and each volatile write independently kept with ``keep_probability``
    (a kept write lands whole: sector tearing is FaultDev's job).  ``durable()``
    is the image with every volatile write lost.  With ``volatile_cache=False``
    every write is durable at once and ``crash()`` == ``contents()``.
    """
    cdef char* mem
    cdef char* durable_mem
    cdef ram_write* wc_head
    cdef ram_write* wc_tail
    cdef int wc_count
    cdef pthread_mutex_t lock
    cdef bint lock_ready

    def __cinit__(self, uint64_t size, uint32_t logical_block_size=512, *, bint volatile_cache=True,
                  bint fua=True, bint read_only=False, physical_block_size=None, data=None):
        cdef uint32_t pbs
        if not _is_pow2(logical_block_size) or logical_block_size < 512 or logical_block_size > 65536:
            raise InvalidError(_errno.EINVAL, f"logical_block_size {logical_block_size} must be a "
                               "power of two in [512, 65536]")
        if size % logical_block_size:
            raise InvalidError(_errno.EINVAL, f"size {size} is not a multiple of {logical_block_size}")
        pbs = logical_block_size if physical_block_size is None else physical_block_size
        if not _is_pow2(pbs) or pbs < logical_block_size:
            raise InvalidError(_errno.EINVAL, f"physical_block_size {pbs} is invalid")
        self.mem = <char*>calloc(1, size if size else 1)
        if self.mem == NULL:
            raise MemoryError(f"RamDev of {size} bytes")
        if volatile_cache:
            self.durable_mem = <char*>calloc(1, size if size else 1)
            if self.durable_mem == NULL:
                raise MemoryError(f"RamDev of {size} bytes")
        pthread_mutex_init(&self.lock, NULL)
        self.lock_ready = True
        self.size = size
        self.logical_block_size = logical_block_size
        self.physical_block_size = pbs
        self.volatile_cache = volatile_cache
        self.fua = fua
        self.read_only = read_only
        self.is_blockdev = False
        self.direct = True
        self.backend = "memory"
        self.path = f"ram:{<uintptr_t><void*>self:#x}"
        if data is not None:
            mv = memoryview(data).cast("B")
            if len(mv) > size:
                raise InvalidError(_errno.EINVAL, f"data ({len(mv)} bytes) larger than size {size}")
            self._load(mv)

    def _load(self, const unsigned char[::1] data):
        if data.shape[0]:
            memcpy(self.mem, &data[0], data.shape[0])
            if self.durable_mem != NULL:
                memcpy(self.durable_mem, &data[0], data.shape[0])

    def __dealloc__(self):
        self._wc_clear()
        if self.mem != NULL:
            free(self.mem)
        if self.durable_mem != NULL:
            free(self.durable_mem)
        if self.lock_ready:
            pthread_mutex_destroy(&self.lock)

    cdef void _wc_clear(self) noexcept nogil:
        cdef ram_write* w = self.wc_head
        cdef ram_write* nxt
        while w != NULL:
            nxt = w.next
            free(w.data)
            free(w)
            w = nxt
        self.wc_head = NULL
        self.wc_tail = NULL
        self.wc_count = 0

    cdef void _wc_flush_locked(self) noexcept nogil:
        """Every cached write becomes durable, in submission order."""
        cdef ram_write* w = self.wc_head
        while w != NULL:
            memcpy(self.durable_mem + w.addr, w.data, w.length)
            w = w.next
        self._wc_clear()

    cdef int _do_bio(self, bio_t* b) noexcept nogil:
        cdef int r = self.check_bio(b)
        cdef ram_write* w
        if r < 0:
            return r
        pthread_mutex_lock(&self.lock)
        if b.op == BIO_READ:
            memcpy(b.buf, self.mem + b.addr, b.length)
        elif b.op == BIO_WRITE:
            memcpy(self.mem + b.addr, b.buf, b.length)
            if self.durable_mem != NULL:
                w = <ram_write*>malloc(sizeof(ram_write))
                if w != NULL:
                    w.data = <char*>malloc(b.length)
                if w == NULL or w.data == NULL:
                    free(w)
                    # Cannot model the cache any more: treat the write as durable.
                    memcpy(self.durable_mem + b.addr, b.buf, b.length)
                else:
                    memcpy(w.data, b.buf, b.length)
                    w.seq = b.seq
                    w.addr = b.addr
                    w.length = b.length
                    w.fua = (b.opf & BIO_FUA) != 0
                    w.next = NULL
                    if self.wc_tail == NULL:
                        self.wc_head = w
                    else:
                        self.wc_tail.next = w
                    self.wc_tail = w
                    self.wc_count += 1
                    if w.fua and not self.fua:
                        self._wc_flush_locked()
        else:
            if self.durable_mem != NULL:
                self._wc_flush_locked()
        pthread_mutex_unlock(&self.lock)
        b.done = b.length
        return 0

    cpdef IoQueue new_queue(self, int depth=128, bint reaper=False):
        if self.closed:
            raise from_errno(_errno.EBADF, "device is closed")
        q = RamQueue(self)
        self._queues.add(q)
        return q

    def contents(self):
        """The whole device as it reads now (bytes)."""
        cdef bytes out
        pthread_mutex_lock(&self.lock)
        try:
            out = PyBytes_FromStringAndSize(self.mem, self.size)
        finally:
            pthread_mutex_unlock(&self.lock)
        return out

    def durable(self):
        """The image if every volatile (unflushed, non-FUA) write were lost."""
        return self.crash(keep_probability=0.0)

    def crash(self, seed=None, double keep_probability=0.5):
        """Bytes of a possible post-power-cut image (see the class docstring)."""
        cdef ram_write* w
        cdef bytearray img
        cdef char* p
        if self.durable_mem == NULL:
            return self.contents()
        rng = _random.Random(seed)
        pthread_mutex_lock(&self.lock)
        try:
            img = bytearray(PyBytes_FromStringAndSize(self.durable_mem, self.size))
            p = img
            w = self.wc_head
            while w != NULL:
                if w.fua or (keep_probability > 0.0 and rng.random() < keep_probability):
                    memcpy(p + w.addr, w.data, w.length)
                w = w.next
        finally:
            pthread_mutex_unlock(&self.lock)
        return bytes(img)

    @property
    def cached_writes(self):
        """[(seq, addr, length, fua)] written since the last flush."""
        cdef ram_write* w
        out = []
        pthread_mutex_lock(&self.lock)
        w = self.wc_head
        while w != NULL:
            out.append((w.seq, w.addr, w.length, bool(w.fua)))
            w = w.next
        pthread_mutex_unlock(&self.lock)
        return out

    def snapshot(self):
        """A new RamDev with the same geometry and the current contents (cache empty)."""
        return RamDev(self.size, self.logical_block_size, volatile_cache=self.volatile_cache,
                      fua=self.fua, read_only=self.read_only,
                      physical_block_size=self.physical_block_size, data=self.contents())

    def close(self):
        if self.closed:
            return
        BlockDev.close(self)


# ---------------------------------------------------------------------------
# DirectDev: O_DIRECT image files and block devices
# ---------------------------------------------------------------------------

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    int dup(int fd)
    int fdatasync(int fd)
    ctypedef long ssize_t

cdef extern from "ufs_bdev.h" nogil:
    struct io_uring_sqe:
        pass
    struct ufs_ring:
        int fd
        unsigned features
        unsigned setup_flags
        unsigned sq_entries
        unsigned cq_entries
    enum:
        IORING_OP_READ
        IORING_OP_WRITE
        IORING_ENTER_GETEVENTS
        IORING_REGISTER_FILES
        IORING_SETUP_SUBMIT_ALL
        IORING_SETUP_CLAMP
        IORING_SETUP_COOP_TASKRUN
        IORING_SETUP_SINGLE_ISSUER
        IORING_SETUP_DEFER_TASKRUN
        RWF_DSYNC
    int ufs_ring_init(ufs_ring* r, unsigned entries, unsigned flags)
    void ufs_ring_exit(ufs_ring* r)
    io_uring_sqe* ufs_ring_get_sqe(ufs_ring* r)
    unsigned ufs_ring_flush(ufs_ring* r)
    int ufs_ring_pop_cqe(ufs_ring* r, uint64_t* user_data, int* res)
    unsigned ufs_ring_cq_ready(ufs_ring* r)
    int ufs_sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
    int ufs_sys_register(int fd, unsigned opcode, void* arg, unsigned nr)
    void ufs_prep_rw(io_uring_sqe* sqe, int op, int fd, int fixed, char* buf, unsigned length,
                     uint64_t off, int rw_flags, uint64_t user_data)
    void ufs_prep_fsync(io_uring_sqe* sqe, int fd, int fixed, uint64_t user_data)
    void ufs_prep_nop(io_uring_sqe* sqe, uint64_t user_data)
    ssize_t ufs_prw(int fd, int write, char* buf, size_t length, uint64_t off, int flags)
    int ufs_dio_align(int fd, unsigned* mem_align, unsigned* offset_align)
    int ufs_blk_geometry(int fd, uint64_t* size, int* lbs, unsigned* pbs)
    int ufs_blk_readonly(int fd)

cdef enum:
    # One SQE moves at most this much; a longer bio continues as a "short transfer".
    _SQE_MAX_LENGTH = 1 << 30

# Ring set-up flags tried first (SUBMIT_ALL: keep submitting past a failed SQE).
cdef unsigned _RING_FLAGS = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CLAMP


cdef inline int _enter(int ring_fd, unsigned to_submit, unsigned min_complete, unsigned flags) noexcept nogil:
    cdef int r
    while True:
        r = ufs_sys_enter(ring_fd, to_submit, min_complete, flags)
        if r != -EINTR:
            return r


cdef class UringQueue(IoQueue):
    """An io_uring ring on a DirectDev, driven by raw syscalls.

    Accounting: ``kinflight`` SQEs were handed to the ring and their CQE is not
    processed yet; at most ``cq_cap`` (the CQ size) so the CQ never overflows.
    Bios that do not fit stay plugged: unplug() reaps to make room (or, with a
    reaper, the reaper pushes them after each batch of completions).
    Reaper mode: ``lock`` guards the plug list, the SQ and ``kinflight``; the CQ is
    the reaper thread's alone; ``done_cond`` wakes wait()ers.
    """
    cdef ufs_ring ring
    cdef bint ring_ok
    cdef int sqe_fd
    cdef bint fixed
    cdef int kinflight
    cdef int cq_cap
    cdef bint has_reaper
    cdef bint stop
    cdef pthread_t reaper_thread
    cdef pthread_mutex_t lock
    cdef pthread_cond_t done_cond
    cdef long completed_total

    def __cinit__(self, DirectDev dev, int depth=128, bint reaper=False, bint single_issuer=False):
        cdef int r
        cdef int fd = dev.fd
        cdef unsigned flags = _RING_FLAGS
        self.dev = dev
        self.ring_ok = False
        if single_issuer and not reaper:
            # Only this thread will ever submit and reap: completions are run in
            # its own io_uring_enter instead of interrupting it (what fio does).
            # Never for a queue another thread may reap: completion task work
            # runs on the *submitting* task, and COOP/DEFER would leave it
            # pending while that task sleeps elsewhere.
            flags |= (IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER
                      | IORING_SETUP_DEFER_TASKRUN)
        r = ufs_ring_init(&self.ring, depth if depth > 0 else 1, flags)
        if r < 0:
            raise from_errno(-r, "io_uring_setup failed")
        self.ring_ok = True
        self.cq_cap = self.ring.cq_entries
        # A registered file saves an fget/fput per I/O and keeps the file alive
        # while the ring lives.
        if ufs_sys_register(self.ring.fd, IORING_REGISTER_FILES, &fd, 1) >= 0:
            self.fixed = True
            self.sqe_fd = 0
        else:
            self.fixed = False
            self.sqe_fd = dev.fd
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.done_cond, NULL)
        if reaper:
            self.has_reaper = True
            if pthread_create(&self.reaper_thread, NULL, _uring_reaper_main, <void*>self) != 0:
                self.has_reaper = False
                raise from_errno(_errno.EAGAIN, "cannot start the reaper thread")

    def __dealloc__(self):
        self._shutdown()
        pthread_cond_destroy(&self.done_cond)
        pthread_mutex_destroy(&self.lock)

    cdef void _shutdown(self) noexcept nogil:
        cdef io_uring_sqe* sqe
        if not self.ring_ok:
            return
        if self.has_reaper:
            # Completions must all be delivered before the reaper may stop.
            self.reap(self.inflight)
            pthread_mutex_lock(&self.lock)
            self.stop = True
            sqe = ufs_ring_get_sqe(&self.ring)
            while sqe == NULL:
                _enter(self.ring.fd, ufs_ring_flush(&self.ring), 0, 0)
                sqe = ufs_ring_get_sqe(&self.ring)
            ufs_prep_nop(sqe, 0)       # user_data 0: "stop" for the reaper
            self.kinflight += 1
            _enter(self.ring.fd, ufs_ring_flush(&self.ring), 0, 0)
            pthread_mutex_unlock(&self.lock)
            pthread_join(self.reaper_thread, NULL)
            self.has_reaper = False
        elif self.inflight > 0:
            self.reap(self.inflight)
        ufs_ring_exit(&self.ring)
        self.ring_ok = False
        self.closed = True

    def close(self):
        with nogil:
            self._shutdown()

    @property
    def ring_flags(self):
        """The IORING_SETUP_* flags the kernel accepted for this ring."""
        return self.ring.setup_flags

    @property
    def ring_entries(self):
        return (self.ring.sq_entries, self.ring.cq_entries)

    cdef int submit(self, bio_t* b) noexcept nogil:
        _bio_prepare(self.dev, b)
        b.owner = NULL
        b.status = -EBADF if not self.ring_ok else self.dev.check_bio(b)
        if self.has_reaper:
            pthread_mutex_lock(&self.lock)
        self.plug_add(b)
        if self.has_reaper:
            pthread_mutex_unlock(&self.lock)
        return 0

    cdef int _push(self, bio_t** failed, bint enter=True) noexcept nogil:
        """Turn plugged bios into SQEs and, if ``enter``, submit them (caller holds
        the lock in reaper mode).  Without ``enter`` the SQEs are only published:
        reap() hands them over in the same io_uring_enter that waits.  Bios refused
        by check_bio go to ``*failed`` to be completed after the lock is dropped.
        Stops early when the CQ budget is used up."""
        cdef bio_t* b
        cdef io_uring_sqe* sqe
        cdef unsigned length
        cdef int r = 0
        while self.plug_head != NULL:
            b = self.plug_head
            if b.status != 0:
                self.plug_head = b.next
                self.plugged -= 1
                b.next = failed[0]
                failed[0] = b
                continue
            if self.kinflight >= self.cq_cap:
                break
            sqe = ufs_ring_get_sqe(&self.ring)
            if sqe == NULL:
                r = _enter(self.ring.fd, ufs_ring_flush(&self.ring), 0, 0)
                if r < 0 and r != -EAGAIN and r != -EBUSY:
                    break
                sqe = ufs_ring_get_sqe(&self.ring)
                if sqe == NULL:
                    break
            self.plug_head = b.next
            self.plugged -= 1
            b.next = NULL
            if b.op == BIO_FLUSH:
                ufs_prep_fsync(sqe, self.sqe_fd, self.fixed, <uint64_t><uintptr_t>b)
            else:
                length = <unsigned>(b.length - b.done) if b.length - b.done < _SQE_MAX_LENGTH else _SQE_MAX_LENGTH
                ufs_prep_rw(sqe, IORING_OP_WRITE if b.op == BIO_WRITE else IORING_OP_READ,
                            self.sqe_fd, self.fixed, b.buf + b.done, length, b.addr + b.done,
                            RWF_DSYNC if (b.op == BIO_WRITE and (b.opf & BIO_FUA)) else 0,
                            <uint64_t><uintptr_t>b)
            self.kinflight += 1
        if self.plug_head == NULL:
            self.plug_tail = NULL
        if ufs_ring_flush(&self.ring) and enter:
            r = _enter(self.ring.fd, ufs_ring_flush(&self.ring), 0, 0)
        return r if r < 0 and r != -EAGAIN and r != -EBUSY else 0

    cdef int _collect(self, bio_t** done) noexcept nogil:
        """Consume every ready CQE (CQ side: one thread at a time).  Finished bios
        are pushed on ``*done``; short transfers go back to the plug list head."""
        cdef uint64_t ud
        cdef int res, n = 0
        cdef bio_t* b
        while ufs_ring_pop_cqe(&self.ring, &ud, &res):
            self.kinflight -= 1
            if ud == 0:
                continue                      # the stop NOP
            b = <bio_t*><uintptr_t>ud
            if b.op != BIO_FLUSH and res >= 0:
                if res == 0:
                    res = -EIO                # nothing moved: EOF of an image file
                else:
                    b.done += res
                    if b.done < b.length:
                        b.next = self.plug_head
                        self.plug_head = b
                        if self.plug_tail == NULL:
                            self.plug_tail = b
                        self.plugged += 1
                        continue
                    res = 0
            elif res == -EAGAIN or res == -EINTR:
                b.next = self.plug_head
                self.plug_head = b
                if self.plug_tail == NULL:
                    self.plug_tail = b
                self.plugged += 1
                continue
            b.status = res
            b.next = done[0]
            done[0] = b
            n += 1
        return n

    cdef int unplug(self) noexcept nogil:
        cdef bio_t* failed = NULL
        cdef bio_t* done = NULL
        cdef int r, n = 0
        if self.has_reaper:
            pthread_mutex_lock(&self.lock)
            r = self._push(&failed)
            pthread_mutex_unlock(&self.lock)
        else:
            r = self._push(&failed)
            # No room in the CQ for the rest: make some by reaping here.
            while r == 0 and self.plug_head != NULL and self.kinflight >= self.cq_cap:
                r = _enter(self.ring.fd, ufs_ring_flush(&self.ring), 1, IORING_ENTER_GETEVENTS)
                if r < 0 and r != -EAGAIN and r != -EBUSY and r != -ETIME:
                    break
                self._collect(&done)
                n += _complete_list(self, done)
                done = NULL
                r = self._push(&failed)
        n += _complete_list(self, failed)
        return r if r < 0 else n

    cdef int reap(self, int min_complete) noexcept nogil:
        cdef bio_t* done = NULL
        cdef bio_t* failed = NULL
        cdef int r = 0, n = 0, want
        cdef bint polled = False
        cdef long target
        if not self.ring_ok:
            return -EBADF
        if self.has_reaper:
            # The reaper delivers completions; wait for enough of them.
            if self.plug_head != NULL:
                r = self.unplug()
                if r < 0:
                    return r
            pthread_mutex_lock(&self.lock)
            if min_complete > self.inflight:
                min_complete = self.inflight
            target = self.completed_total + min_complete
            while self.completed_total < target and self.inflight > 0:
                pthread_cond_wait(&self.done_cond, &self.lock)
            n = <int>(self.completed_total - (target - min_complete))
            pthread_mutex_unlock(&self.lock)
            return n
        if min_complete > self.inflight:
            min_complete = self.inflight
        while True:
            if self.plug_head != NULL:
                r = self._push(&failed, False)
                if failed != NULL:
                    n += _complete_list(self, failed)
                    failed = NULL
                if r < 0:
                    return r
            self._collect(&done)
            if done != NULL:
                n += _complete_list(self, done)
                done = NULL
            if n >= min_complete and min_complete == 0 and not polled:
                # Completions may wait as task work (COOP/DEFER_TASKRUN): run it once.
                polled = True
                r = _enter(self.ring.fd, ufs_ring_flush(&self.ring), 0, IORING_ENTER_GETEVENTS)
                if r < 0 and r != -EAGAIN and r != -EBUSY and r != -ETIME:
                    return r
                continue
            if n >= min_complete:
                if ufs_ring_flush(&self.ring):
                    r = _enter(self.ring.fd, ufs_ring_flush(&self.ring), 0, 0)
                    if r < 0 and r != -EAGAIN and r != -EBUSY:
                        return r
                return n
            if self.kinflight == 0:
                if self.plug_head == NULL:
                    return n
                continue                      # resubmissions to push first
            want = min_complete - n
            if want > self.kinflight:
                want = self.kinflight
            if want <= 0:
                want = 1
            r = _enter(self.ring.fd, ufs_ring_flush(&self.ring), want, IORING_ENTER_GETEVENTS)
            if r < 0 and r != -EAGAIN and r != -EBUSY and r != -ETIME:
                return r

    cdef void _reaper_loop(self) noexcept nogil:
        cdef bio_t* done = NULL
        cdef bio_t* failed = NULL
        cdef int n
        while True:
            _enter(self.ring.fd, 0, 1, IORING_ENTER_GETEVENTS)
            pthread_mutex_lock(&self.lock)
            self._collect(&done)
            if self.plug_head != NULL:
                self._push(&failed)
            pthread_mutex_unlock(&self.lock)
            n = _complete_list(self, done) + _complete_list(self, failed)
            done = NULL
            failed = NULL
            pthread_mutex_lock(&self.lock)
            self.completed_total += n
            pthread_cond_broadcast(&self.done_cond)
            if self.stop and self.kinflight == 0:
                pthread_mutex_unlock(&self.lock)
                return
            pthread_mutex_unlock(&self.lock)


cdef void* _uring_reaper_main(void* arg) noexcept nogil:
    (<UringQueue>arg)._reaper_loop()
    return NULL


cdef int _complete_list(IoQueue q, bio_t* b) noexcept nogil:
    cdef bio_t* nxt
    cdef int n = 0
    while b != NULL:
        nxt = b.next
        b.next = NULL
        _complete(q, b, b.status)
        n += 1
        b = nxt
    return n


# -- thread-pool backend -------------------------------------------------------

cdef struct tp_pool:
    pthread_mutex_t lock
    pthread_cond_t work            # signalled when bios are queued or on stop
    bio_t* head
    bio_t* tail
    int fd                         # the pool's own dup of the device fd
    int nthreads
    pthread_t* threads
    bint stop
    int refs                       # the device + each queue


cdef struct tq_state:
    pthread_mutex_t lock
    pthread_cond_t cond            # a completion arrived
    bio_t* head                    # completed by workers, end_io not yet called
    bio_t* tail
    int pending                    # handed to the pool, not yet on the done list
    tp_pool* pool


cdef void _pool_do(tp_pool* p, bio_t* b) noexcept nogil:
    cdef ssize_t r
    cdef int flags
    if b.op == BIO_FLUSH:
        b.status = 0 if fdatasync(p.fd) == 0 else -errno
        return
    flags = RWF_DSYNC if (b.op == BIO_WRITE and (b.opf & BIO_FUA)) else 0
    b.status = 0
    while b.done < b.length:
        r = ufs_prw(p.fd, b.op == BIO_WRITE, b.buf + b.done, b.length - b.done, b.addr + b.done, flags)
        if r == -EINTR or r == -EAGAIN:
            continue
        if r < 0:
            b.status = <int>r
            return
        if r == 0:
            b.status = -EIO
            return
        b.done += r


cdef void* _pool_worker(void* arg) noexcept nogil:
    cdef tp_pool* p = <tp_pool*>arg
    cdef bio_t* b
    cdef tq_state* o
    while True:
        pthread_mutex_lock(&p.lock)
        while p.head == NULL and not p.stop:
            pthread_cond_wait(&p.work, &p.lock)
        b = p.head
        if b == NULL:
            pthread_mutex_unlock(&p.lock)
            return NULL
        p.head = b.next
        if p.head == NULL:
            p.tail = NULL
        pthread_mutex_unlock(&p.lock)
        b.next = NULL
        _pool_do(p, b)
        o = <tq_state*>b.owner
        pthread_mutex_lock(&o.lock)
        if o.tail == NULL:
            o.head = b
        else:
            o.tail.next = b
        o.tail = b
        o.pending -= 1
        pthread_cond_broadcast(&o.cond)
        pthread_mutex_unlock(&o.lock)


cdef tp_pool* _pool_create(int fd, int nthreads) noexcept nogil:
    cdef tp_pool* p = <tp_pool*>calloc(1, sizeof(tp_pool))
    cdef int i
    if p == NULL:
        return NULL
    p.threads = <pthread_t*>calloc(nthreads, sizeof(pthread_t))
    p.fd = dup(fd)
    if p.threads == NULL or p.fd < 0:
        if p.fd >= 0:
            close(p.fd)
        free(p.threads)
        free(p)
        return NULL
    pthread_mutex_init(&p.lock, NULL)
    pthread_cond_init(&p.work, NULL)
    p.refs = 1
    for i in range(nthreads):
        if pthread_create(&p.threads[i], NULL, _pool_worker, p) != 0:
            break
        p.nthreads += 1
    return p


cdef void _pool_put(tp_pool* p) noexcept nogil:
    cdef int i
    if p == NULL or ufs_atomic_add(&p.refs, -1) > 0:
        return
    pthread_mutex_lock(&p.lock)
    p.stop = True
    pthread_cond_broadcast(&p.work)
    pthread_mutex_unlock(&p.lock)
    for i in range(p.nthreads):
        pthread_join(p.threads[i], NULL)
    close(p.fd)
    pthread_cond_destroy(&p.work)
    pthread_mutex_destroy(&p.lock)
    free(p.threads)
    free(p)


cdef class ThreadQueue(IoQueue):
    """A queue whose bios are done by the device's pthread pool (preadv2/pwritev2).

    Workers put finished bios on this queue's done list; end_io runs on the thread
    that reaps (or on the reaper thread).  ``st.lock`` guards the done list and
    ``pending``; ``plug_lock`` guards the plug list in reaper mode.
    """
    cdef tq_state* st
    cdef bint has_reaper
    cdef bint stop
    cdef pthread_t reaper_thread
    cdef pthread_mutex_t plug_lock
    cdef pthread_cond_t done_cond     # reaper mode: completions delivered
    cdef long completed_total

    def __cinit__(self, DirectDev dev, int depth=128, bint reaper=False):
        self.dev = dev
        self.st = <tq_state*>calloc(1, sizeof(tq_state))
        if self.st == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.st.lock, NULL)
        pthread_cond_init(&self.st.cond, NULL)
        pthread_mutex_init(&self.plug_lock, NULL)
        pthread_cond_init(&self.done_cond, NULL)
        self.st.pool = <tp_pool*>dev.pool
        ufs_atomic_add(&self.st.pool.refs, 1)
        if reaper:
            self.has_reaper = True
            if pthread_create(&self.reaper_thread, NULL, _thread_reaper_main, <void*>self) != 0:
                self.has_reaper = False
                raise from_errno(_errno.EAGAIN, "cannot start the reaper thread")

    def __dealloc__(self):
        self._shutdown()
        if self.st != NULL:
            pthread_cond_destroy(&self.st.cond)
            pthread_mutex_destroy(&self.st.lock)
            free(self.st)
            self.st = NULL
        pthread_cond_destroy(&self.done_cond)
        pthread_mutex_destroy(&self.plug_lock)

    cdef void _shutdown(self) noexcept nogil:
        if self.st == NULL or self.st.pool == NULL:
            return
        if self.inflight > 0:
            self.reap(self.inflight)
        if self.has_reaper:
            pthread_mutex_lock(&self.st.lock)
            self.stop = True
            pthread_cond_broadcast(&self.st.cond)
            pthread_mutex_unlock(&self.st.lock)
            pthread_join(self.reaper_thread, NULL)
            self.has_reaper = False
        _pool_put(self.st.pool)
        self.st.pool = NULL
        self.closed = True

    def close(self):
        with nogil:
            self._shutdown()

    cdef int submit(self, bio_t* b) noexcept nogil:
        _bio_prepare(self.dev, b)
        b.owner = self.st
        b.status = -EBADF if self.st.pool == NULL else self.dev.check_bio(b)
        if self.has_reaper:
            pthread_mutex_lock(&self.plug_lock)
        self.plug_add(b)
        if self.has_reaper:
            pthread_mutex_unlock(&self.plug_lock)
        return 0

    cdef int unplug(self) noexcept nogil:
        cdef bio_t* b
        cdef bio_t* nxt
        cdef bio_t* failed = NULL
        cdef bio_t* head = NULL
        cdef bio_t* tail = NULL
        cdef int n = 0
        cdef tp_pool* p = self.st.pool
        if self.has_reaper:
            pthread_mutex_lock(&self.plug_lock)
        b = self.plug_head
        self.plug_head = NULL
        self.plug_tail = NULL
        self.plugged = 0
        if self.has_reaper:
            pthread_mutex_unlock(&self.plug_lock)
        while b != NULL:
            nxt = b.next
            if b.status != 0:
                b.next = failed
                failed = b
            else:
                b.next = NULL
                if tail == NULL:
                    head = b
                else:
                    tail.next = b
                tail = b
                n += 1
            b = nxt
        if head != NULL:
            pthread_mutex_lock(&self.st.lock)
            self.st.pending += n
            pthread_mutex_unlock(&self.st.lock)
            pthread_mutex_lock(&p.lock)
            if p.tail == NULL:
                p.head = head
            else:
                p.tail.next = head
            p.tail = tail
            if n == 1:
                pthread_cond_signal(&p.work)
            else:
                pthread_cond_broadcast(&p.work)
            pthread_mutex_unlock(&p.lock)
        if self.has_reaper and failed != NULL:
            # Keep end_io on the reaper thread: hand refused bios over as done.
            pthread_mutex_lock(&self.st.lock)
            b = failed
            while b != NULL:
                nxt = b.next
                b.next = NULL
                if self.st.tail == NULL:
                    self.st.head = b
                else:
                    self.st.tail.next = b
                self.st.tail = b
                b = nxt
            pthread_cond_broadcast(&self.st.cond)
            pthread_mutex_unlock(&self.st.lock)
            return 0
        return _complete_list(self, failed)

    cdef bio_t* _take_done(self, bint block) noexcept nogil:
        """Detach the done list, waiting for one completion if ``block``."""
        cdef bio_t* b
        pthread_mutex_lock(&self.st.lock)
        while block and self.st.head == NULL and self.st.pending > 0 and not self.stop:
            pthread_cond_wait(&self.st.cond, &self.st.lock)
        b = self.st.head
        self.st.head = NULL
        self.st.tail = NULL
        pthread_mutex_unlock(&self.st.lock)
        return b

    cdef int reap(self, int min_complete) noexcept nogil:
        cdef int n = 0, r
        cdef long target
        if self.st.pool == NULL:
            return -EBADF
        if self.plug_head != NULL:
            r = self.unplug()
            if r > 0:
                n += r
        if self.has_reaper:
            pthread_mutex_lock(&self.st.lock)
            if min_complete > self.inflight:
                min_complete = self.inflight
            target = self.completed_total + min_complete
            while self.completed_total < target and self.inflight > 0:
                pthread_cond_wait(&self.done_cond, &self.st.lock)
            n = <int>(self.completed_total - (target - min_complete))
            pthread_mutex_unlock(&self.st.lock)
            return n
        if min_complete > self.inflight + n:
            min_complete = self.inflight + n
        while True:
            n += _complete_list(self, self._take_done(n < min_complete))
            if n >= min_complete or self.inflight == 0:
                return n

    cdef void _reaper_loop(self) noexcept nogil:
        cdef int n
        cdef bio_t* b
        while True:
            pthread_mutex_lock(&self.st.lock)
            while self.st.head == NULL and not self.stop:
                pthread_cond_wait(&self.st.cond, &self.st.lock)
            b = self.st.head
            self.st.head = NULL
            self.st.tail = NULL
            if b == NULL and self.stop:
                pthread_mutex_unlock(&self.st.lock)
                return
            pthread_mutex_unlock(&self.st.lock)
            n = _complete_list(self, b)
            pthread_mutex_lock(&self.st.lock)
            self.completed_total += n
            pthread_cond_broadcast(&self.done_cond)
            pthread_mutex_unlock(&self.st.lock)


cdef void* _thread_reaper_main(void* arg) noexcept nogil:
    (<ThreadQueue>arg)._reaper_loop()
    return NULL


def _io_threads_default():
    try:
        return max(1, int(os.environ.get("UFS_IO_THREADS", "16")))
    except ValueError:
        return 16


def _read_sysfs(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _blk_queue_attrs(st_rdev):
    """(volatile_cache, fua) from sysfs for a block device (partitions use the
    whole disk's queue).  Unknown → (True, False): flush, never trust FUA."""
    base = f"/sys/dev/block/{os.major(st_rdev)}:{os.minor(st_rdev)}"
    for q in (base + "/queue", base + "/../queue"):
        wc = _read_sysfs(q + "/write_cache")
        if wc is not None:
            fua = _read_sysfs(q + "/fua")
            return wc == "write back", fua == "1"
    return True, False


cdef class DirectDev(BlockDev):
    """An image file or block device opened with ``O_DIRECT`` (see ``open_device``).

    Extra attributes: ``mem_align`` (the kernel's DIO memory alignment, for
    information: bios are still checked against ``logical_block_size``),
    ``raw_size`` (file/device size before rounding down).
    """
    cdef void* pool
    cdef readonly uint32_t mem_align
    cdef readonly uint64_t raw_size

    def __del__(self):
        # uvloop style: a leaked device is reported (the fd is closed in __dealloc__).
        if self.fd >= 0 and not self.closed:
            warnings.warn(f"unclosed device {self.path!r}", ResourceWarning, source=self)

    def __dealloc__(self):
        if self.pool != NULL:
            _pool_put(<tp_pool*>self.pool)
            self.pool = NULL
        if self.fd >= 0 and not self.closed:
            close(self.fd)
            self.fd = -1

    cpdef IoQueue new_queue(self, int depth=128, bint reaper=False):
        if self.closed:
            raise from_errno(_errno.EBADF, "device is closed", self.path)
        if self.backend == "io_uring":
            q = UringQueue(self, depth, reaper)
        else:
            q = ThreadQueue(self, depth, reaper)
        self._queues.add(q)
        return q

    def _new_thread_queue(self):
        if self.closed:
            raise from_errno(_errno.EBADF, "device is closed", self.path)
        if self.backend != "io_uring":
            return self.new_queue()
        q = UringQueue(self, 128, False, True)
        self._queues.add(q)
        return q

    def close(self):
        """Wait for in-flight I/O (see ``BlockDev.close``), stop the queues, close the fd."""
        if self.closed:
            return
        BlockDev.close(self)
        if self.pool != NULL:
            with nogil:
                _pool_put(<tp_pool*>self.pool)
            self.pool = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1


def _probe_io_uring():
    cdef ufs_ring r
    cdef int e = ufs_ring_init(&r, 4, _RING_FLAGS)
    if e < 0:
        return e
    ufs_ring_exit(&r)
    return 0


def open_device(path, *, bint read_only=False, bint direct=True, backend=None):
    """Open an image file or block device and return a ``DirectDev``.

    ``backend``: ``"io_uring"`` (raw-syscall ring per queue), ``"threads"``
    (pthread pool doing ``preadv2``/``pwritev2``), or None: the environment
    variable ``UFS_IO_BACKEND`` if set, else io_uring when ``io_uring_setup``
    works, else threads.

    Geometry.  Block device: ``BLKGETSIZE64``, ``BLKSSZGET`` (logical),
    ``BLKPBSZGET`` (physical); ``volatile_cache`` is sysfs ``queue/write_cache ==
    "write back"`` and ``fua`` sysfs ``queue/fua == 1``.  Regular file: ``st_size``;
    logical block size = ``statx`` ``stx_dio_offset_align`` (512 when the
    filesystem does not report it); physical = max(logical, ``st_blksize``);
    ``volatile_cache=True`` and ``fua=True`` (``RWF_DSYNC``).  A size that is not a
    multiple of the logical block size is **rounded down** (the tail is unusable;
    ``raw_size`` keeps the real size) rather than refused.

    Errors are those of ``open(2)`` (ENOENT, EACCES, EROFS, EISDIR); a writable
    open of a block device whose read-only flag is set (``BLKROGET``) raises
    ``ReadOnlyError`` (EROFS; Linux itself would open it and fail every write
    with EPERM); ``InvalidError`` (EINVAL) when the filesystem
    refuses ``O_DIRECT`` (pass ``direct=False`` to open without it), and
    ``NotBlockError`` (ENOTBLK) for anything that is neither a file nor a block
    device.
    """
    cdef DirectDev dev
    cdef int fd, r, lbs_i = 0
    cdef unsigned pbs = 0, mem_align = 0, off_align = 0
    cdef uint64_t size = 0
    if backend is None:
        backend = os.environ.get("UFS_IO_BACKEND") or None
    if backend not in (None, "io_uring", "threads"):
        raise InvalidError(_errno.EINVAL, f"unknown I/O backend {backend!r}")
    if backend is None:
        backend = "io_uring" if _probe_io_uring() == 0 else "threads"
    elif backend == "io_uring":
        r = _probe_io_uring()
        if r < 0:
            raise from_errno(-r, "io_uring is not available")
    path = os.fspath(path)
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == _errno.EINVAL and direct:
            raise InvalidError(_errno.EINVAL, "O_DIRECT is not supported here (use direct=False)",
                               path) from None
        raise from_errno(e.errno, None, path) from None
    try:
        st = os.fstat(fd)
        dev = DirectDev.__new__(DirectDev)
        dev.fd = fd
        dev.path = path
        dev.read_only = read_only
        dev.direct = direct
        if _stat.S_ISBLK(st.st_mode):
            r = ufs_blk_geometry(fd, &size, &lbs_i, &pbs)
            if r < 0:
                raise from_errno(-r, "block device geometry", path)
            dev.is_blockdev = True
            # Linux lets a read-only disk be opened for writing and fails each
            # write with EPERM; the contract refuses the open with EROFS instead.
            if not read_only and ufs_blk_readonly(fd) == 1:
                raise ReadOnlyError(_errno.EROFS, "block device is read-only", path)
            dev.logical_block_size = lbs_i
            dev.physical_block_size = max(pbs, <unsigned>lbs_i)
            dev.volatile_cache, dev.fua = _blk_queue_attrs(st.st_rdev)
            ufs_dio_align(fd, &mem_align, &off_align)
            dev.mem_align = mem_align if mem_align else lbs_i
        elif _stat.S_ISREG(st.st_mode):
            size = st.st_size
            ufs_dio_align(fd, &mem_align, &off_align)
            lbs = off_align if off_align else 512
            if not _is_pow2(lbs):
                lbs = 512
            dev.logical_block_size = lbs
            blksize = st.st_blksize if _is_pow2(st.st_blksize) else lbs
            dev.physical_block_size = max(lbs, blksize)
            dev.volatile_cache = True
            dev.fua = True
            dev.mem_align = mem_align if mem_align else lbs
        else:
            raise from_errno(_errno.ENOTBLK, "not a regular file or block device", path)
        dev.raw_size = size
        dev.size = size - size % dev.logical_block_size
        dev.backend = backend
        if backend == "threads":
            nthreads = _io_threads_default()
            dev.pool = _pool_create(fd, nthreads)
            if dev.pool == NULL:
                raise MemoryError("cannot start the I/O thread pool")
        return dev
    except BaseException:
        if dev is not None and dev.fd == fd:
            dev.fd = -1
        os.close(fd)
        raise


# ---------------------------------------------------------------------------
# FaultDev
# ---------------------------------------------------------------------------

cdef struct fault_shadow:
    bio_t b                      # what the inner device sees (first member)
    bio_t* orig                  # the submitter's bio
    void* fq                     # the FaultQueue (borrowed: it outlives its bios)
    Py_ssize_t log_index
    int64_t corrupt_off          # byte of orig.buf to flip after a good read, or -1
    bint torn                    # a torn write: report success whatever was kept


cdef void _fault_end_io(bio_t* sb) noexcept nogil:
    cdef fault_shadow* sh = <fault_shadow*>sb
    cdef bio_t* orig = sh.orig
    cdef void* fq = sh.fq
    with gil:
        (<FaultQueue>fq)._finish(sh)
    ufs_atomic_add(&(<FaultQueue>fq).inflight, -1)
    orig.end_io(orig)


cdef class FaultQueue(IoQueue):
    """Intercepts bios between the submitter and the inner device's queue.

    Rule matching and logging take the GIL (a test device: clarity over speed).
    Bios failed by a rule never reach the inner device; they complete at the next
    unplug/reap of this queue.
    """
    cdef IoQueue inner
    cdef FaultDev fdev
    cdef bio_t* local_head       # failed/dropped bios awaiting completion, in submission
    cdef bio_t* local_tail       # order (a device completes a plug's requests in order)

    def __cinit__(self, FaultDev dev, IoQueue inner):
        self.dev = dev
        self.fdev = dev
        self.inner = inner

    cdef int submit(self, bio_t* b) noexcept nogil:
        _bio_prepare(self.dev, b)
        ufs_atomic_add(&self.inflight, 1)
        with gil:
            self._intercept(b)
        return 0

    cdef void _intercept(self, bio_t* b):
        cdef fault_shadow* sh
        cdef int err
        cdef int64_t keep
        dev = self.fdev
        opname = ("read", "write", "flush")[b.op] if 0 <= b.op <= 2 else str(b.op)
        idx = len(dev._log)
        dev._log.append([b.seq, opname, b.addr, b.length, b.opf, None])
        err = dev._match_fail(opname, b.addr, b.length)
        keep = dev._match_torn(b.addr, b.length) if b.op == BIO_WRITE else -1
        if err or keep == 0:
            b.status = -err
            dev._log[idx][5] = -err
            self._hold(b)
            return
        sh = <fault_shadow*>calloc(1, sizeof(fault_shadow))
        if sh == NULL:
            b.status = -ENOMEM
            dev._log[idx][5] = -ENOMEM
            self._hold(b)
            return
        sh.b = b[0]
        sh.b.end_io = _fault_end_io
        sh.b.private = sh
        sh.b.next = NULL
        sh.orig = b
        sh.fq = <void*>self
        sh.log_index = idx
        sh.corrupt_off = dev._match_corrupt(b.addr, b.length) if b.op == BIO_READ else -1
        if keep > 0:
            sh.b.length = <size_t>keep
            sh.torn = True
        self.inner.submit(&sh.b)

    cdef void _hold(self, bio_t* b) noexcept nogil:
        b.next = NULL
        if self.local_tail == NULL:
            self.local_head = b
        else:
            self.local_tail.next = b
        self.local_tail = b
        self.plugged += 1

    cdef void _finish(self, fault_shadow* sh):
        cdef bio_t* orig = sh.orig
        cdef int status = sh.b.status
        if status == 0 and sh.corrupt_off >= 0:
            orig.buf[sh.corrupt_off] ^= 1
        orig.status = status
        orig.done = orig.length if status == 0 else sh.b.done
        self.fdev._log[sh.log_index][5] = status
        free(sh)

    cdef int _complete_local(self) noexcept nogil:
        cdef bio_t* b = self.local_head
        cdef bio_t* nxt
        cdef int n = 0
        self.local_head = NULL
        self.local_tail = NULL
        while b != NULL:
            nxt = b.next
            b.next = NULL
            self.plugged -= 1
            _complete(self, b, b.status)
            n += 1
            b = nxt
        return n

    cdef int unplug(self) noexcept nogil:
        cdef int n = self._complete_local()
        cdef int r = self.inner.unplug()
        if r < 0:
            return r
        return n + r

    cdef int reap(self, int min_complete) noexcept nogil:
        cdef int n = self._complete_local()
        cdef int r
        if n >= min_complete and self.inner.plugged == 0:
            return n
        r = self.inner.reap(min_complete - n if min_complete > n else 0)
        if r < 0:
            return r
        return n + r

    def close(self):
        self.inner.close()
        self.closed = True


_FAULT_OPS = ("read", "write", "flush", "any")


cdef class FaultDev(BlockDev):
    """Fault injection around any BlockDev; geometry and data are the inner device's.

    - ``fail(op, addr=0, length=None, errno=EIO, count=None)``: matching bios fail
      with ``-errno`` and never reach the inner device.  ``op`` is "read",
      "write", "flush" or "any"; a data bio matches when it overlaps
      ``[addr, addr+length)`` (``length=None``: the whole device); a FLUSH
      matches "flush" rules, and "any" rules with ``length=None``.
      ``count=None``: always; else only the next ``count`` matching bios.
    - ``corrupt_reads(addr, length)``: a successful read overlapping the range gets
      bit 0 of its first overlapping byte flipped after the inner read completes.
    - ``torn_writes(addr, length, keep_bytes, count=None)``: of a matching write only
      the first ``keep_bytes`` (rounded down to the logical block size: sectors are
      atomic) reach the inner device; the bio still reports success.
    - ``clear()`` drops every rule.  ``log``: ``[(seq, op, addr, length, opf,
      status)]`` for every bio in submission order (status None while in flight).
    ``close()`` closes this wrapper's queues, not the inner device.
    """
    cdef readonly BlockDev inner
    cdef object _log
    cdef list _fail_rules
    cdef list _corrupt_rules
    cdef list _torn_rules

    def __cinit__(self, BlockDev inner):
        self.inner = inner
        self._log = []
        self._fail_rules = []
        self._corrupt_rules = []
        self._torn_rules = []
        self.path = inner.path
        self.fd = inner.fd
        self.size = inner.size
        self.logical_block_size = inner.logical_block_size
        self.physical_block_size = inner.physical_block_size
        self.volatile_cache = inner.volatile_cache
        self.fua = inner.fua
        self.read_only = inner.read_only
        self.is_blockdev = inner.is_blockdev
        self.direct = inner.direct
        self.backend = "fault"

    cpdef IoQueue new_queue(self, int depth=128, bint reaper=False):
        if self.closed:
            raise from_errno(_errno.EBADF, "device is closed")
        q = FaultQueue(self, self.inner.new_queue(depth, reaper))
        self._queues.add(q)
        return q

    def fail(self, op, addr=0, length=None, errno=_errno.EIO, count=None):
        if op not in _FAULT_OPS:
            raise InvalidError(_errno.EINVAL, f"op must be one of {_FAULT_OPS}")
        if errno <= 0:
            raise InvalidError(_errno.EINVAL, "errno must be positive")
        self._fail_rules.append([op, addr, length, errno, count])

    def corrupt_reads(self, addr, length):
        self._corrupt_rules.append((addr, length))

    def torn_writes(self, addr, length, keep_bytes, count=None):
        keep = keep_bytes - keep_bytes % self.logical_block_size
        self._torn_rules.append([addr, length, keep, count])

    def clear(self):
        self._fail_rules.clear()
        self._corrupt_rules.clear()
        self._torn_rules.clear()

    @property
    def log(self):
        return [tuple(e) for e in self._log]

    def clear_log(self):
        self._log.clear()

    cdef int _match_fail(self, str op, uint64_t addr, uint64_t length):
        for rule in self._fail_rules:
            rop, raddr, rlen, err, count = rule
            if op == "flush":
                if not (rop == "flush" or (rop == "any" and rlen is None)):
                    continue
            else:
                if rop != op and rop != "any":
                    continue
                if rlen is not None and not (addr < raddr + rlen and raddr < addr + length):
                    continue
            if count is not None:
                rule[4] = count - 1
                if rule[4] <= 0:
                    self._fail_rules.remove(rule)
            return err
        return 0

    cdef int64_t _match_torn(self, uint64_t addr, uint64_t length):
        for rule in self._torn_rules:
            raddr, rlen, keep, count = rule
            if addr < raddr + rlen and raddr < addr + length:
                if count is not None:
                    rule[3] = count - 1
                    if rule[3] <= 0:
                        self._torn_rules.remove(rule)
                return min(keep, length) if keep < length else -1
        return -1

    cdef int64_t _match_corrupt(self, uint64_t addr, uint64_t length):
        for raddr, rlen in self._corrupt_rules:
            if addr < raddr + rlen and raddr < addr + length:
                return max(raddr, addr) - addr
        return -1


# ---------------------------------------------------------------------------
# Test and benchmark drivers (not part of the public API)
# ---------------------------------------------------------------------------

cdef struct _run_slot:
    int ended                 # end_io calls seen for this bio
    int status


cdef void _run_end_io(bio_t* b) noexcept nogil:
    cdef _run_slot* s = <_run_slot*>b.private
    s.status = b.status
    ufs_atomic_add(&s.ended, 1)


cdef class _BioBatch:
    """Raw bios built from Python (tests only): ``_BioBatch(reqs)`` with ``reqs`` a
    list of ``(op, opf, addr, buf, buf_offset, length)`` (``buf`` any buffer, None
    for FLUSH; the bio's memory is ``buf + buf_offset``, so a test can pass
    deliberately misaligned memory).  ``submit(q)`` submits them all (unplugging
    every ``unplug_every``, then at the end); ``wait(q)`` reaps ``q`` until every
    bio ended; ``results()`` gives ``[(status, end_io_calls, seq)]``.  The memory
    of bios a failed queue still owns is leaked, never freed under it."""
    cdef Py_ssize_t n
    cdef bio_t* bios
    cdef _run_slot* slots
    cdef Py_buffer* views
    cdef char* have_view
    cdef bint submitted

    def __cinit__(self, list reqs):
        cdef Py_ssize_t i, n = len(reqs)
        self.n = n
        self.bios = <bio_t*>calloc(n if n else 1, sizeof(bio_t))
        self.slots = <_run_slot*>calloc(n if n else 1, sizeof(_run_slot))
        self.views = <Py_buffer*>calloc(n if n else 1, sizeof(Py_buffer))
        self.have_view = <char*>calloc(n if n else 1, 1)
        if self.bios == NULL or self.slots == NULL or self.views == NULL or self.have_view == NULL:
            raise MemoryError()
        for i in range(n):
            op, opf, addr, buf, off, length = reqs[i]
            if buf is not None:
                PyObject_GetBuffer(buf, &self.views[i], PyBUF_SIMPLE)
                self.have_view[i] = 1
                self.bios[i].buf = <char*>self.views[i].buf + <Py_ssize_t>off
            self.bios[i].op = op
            self.bios[i].opf = opf
            self.bios[i].addr = addr
            self.bios[i].length = length
            self.bios[i].end_io = _run_end_io
            self.bios[i].private = &self.slots[i]

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.submitted and self._remaining():
            return                        # leak: a queue still owns some bios
        if self.have_view != NULL:
            for i in range(self.n):
                if self.have_view[i]:
                    PyBuffer_Release(&self.views[i])
        free(self.bios)
        free(self.slots)
        free(self.views)
        free(self.have_view)

    def remaining(self):
        """Bios whose end_io has not run yet."""
        return self._remaining()

    cdef int _remaining(self) noexcept nogil:
        cdef Py_ssize_t i
        cdef int left = 0
        for i in range(self.n):
            if ufs_atomic_load(&self.slots[i].ended) == 0:
                left += 1
        return left

    def submit(self, IoQueue q, int unplug_every=0, bint unplug=True):
        cdef Py_ssize_t i
        if self.submitted:
            raise InvalidError(_errno.EINVAL, "batch already submitted")
        self.submitted = True
        with nogil:
            for i in range(self.n):
                q.submit(&self.bios[i])
                if unplug_every > 0 and (i + 1) % unplug_every == 0:
                    q.unplug()
            if unplug:
                q.unplug()

    def wait(self, IoQueue q):
        cdef int r = 0, left
        with nogil:
            while True:
                left = self._remaining()
                if left == 0:
                    break
                r = q.reap(1)
                if r < 0:
                    break
        if left:
            raise from_errno(-r, f"queue failed with {left} bio(s) outstanding")

    def results(self):
        return [(self.slots[i].status, self.slots[i].ended, self.bios[i].seq) for i in range(self.n)]


def _run_bios(IoQueue q, list reqs, int unplug_every=0):
    """Submit raw bios on ``q`` and wait for all of them (tests only); see _BioBatch.
    Returns ``[(status, end_io_calls, seq)]`` in request order."""
    batch = _BioBatch(reqs)
    batch.submit(q, unplug_every)
    batch.wait(q)
    return batch.results()


def _bench_queue(BlockDev dev, str op, size_t bs, int qd, double seconds, uint64_t span,
                 single_issuer=True, bint submit_each=False, bint hugepages=False):
    """Raw queue throughput (benchmarks only): ``op`` in randread/randwrite/read/write,
    ``bs`` bytes per bio, ``qd`` bios in flight, for ``seconds`` over ``[0, span)``.
    Returns IOPS.  Runs entirely without the GIL on a private queue (io_uring:
    the calling thread's kind, single issuer, unless ``single_issuer=False``).
    ``submit_each``: unplug after each bio (fio's iodepth_batch_submit=1) instead
    of once per refill.  ``hugepages``: madvise(MADV_HUGEPAGE) the buffers (fewer,
    larger segments per bio; fio's default malloc'ed buffers do not get this)."""
    # The calling thread's kind of queue (single issuer on io_uring), sized for qd.
    cdef IoQueue q = (UringQueue(dev, max(2 * qd, 32), False, True)
                      if isinstance(dev, DirectDev) and dev.backend == "io_uring" and single_issuer
                      else dev.new_queue(max(2 * qd, 32), False))
    cdef bio_t* bios = <bio_t*>calloc(qd, sizeof(bio_t))
    cdef int* done = <int*>calloc(qd, sizeof(int))
    cdef char* mem = NULL
    cdef void* m
    cdef int i, r = 0, err = 0, bop
    cdef bint rand = op.startswith("rand")
    cdef uint64_t nblocks = span // bs, x = 0x9E3779B97F4A7C15, next_addr = 0, ios = 0
    cdef double t0, t1, deadline
    if op not in ("randread", "randwrite", "read", "write") or nblocks == 0 or qd <= 0:
        free(bios); free(done)
        raise InvalidError(_errno.EINVAL, "bad benchmark parameters")
    bop = BIO_WRITE if op.endswith("write") else BIO_READ
    if posix_memalign(&m, 2 << 20, bs * qd) != 0:
        free(bios); free(done)
        raise MemoryError()
    mem = <char*>m
    if hugepages:
        madvise(m, bs * qd, MADV_HUGEPAGE)
    for i in range(bs * qd):
        mem[i] = <char>(i * 131 + 7)
    with nogil:
        for i in range(qd):
            bios[i].op = bop
            bios[i].buf = mem + <size_t>i * bs
            bios[i].length = bs
            bios[i].end_io = _sync_end_io
            bios[i].private = &done[i]
        t0 = ufs_now()
        deadline = t0 + seconds
        t1 = t0
        for i in range(qd):
            done[i] = 1
        while True:
            for i in range(qd):
                if done[i]:
                    if bios[i].status < 0 and err == 0:
                        err = bios[i].status    # a failed I/O ends the run
                        t1 = deadline
                    if t1 >= deadline:
                        continue
                    done[i] = 0
                    if rand:
                        x ^= x << 13
                        x ^= x >> 7
                        x ^= x << 17
                        bios[i].addr = (x % nblocks) * bs
                    else:
                        bios[i].addr = next_addr
                        next_addr += bs
                        if next_addr + bs > span:
                            next_addr = 0
                    q.submit(&bios[i])
                    if submit_each:
                        q.unplug()
            if q.inflight == 0:
                break
            r = q.reap(1)            # unplugs: submit + wait in one io_uring_enter
            if r < 0:
                break
            ios += r
            if t1 < deadline:
                t1 = ufs_now()
    q.close()
    free(mem)
    free(bios)
    free(done)
    if r < 0 or err < 0:
        raise from_errno(-(r if r < 0 else err), "benchmark I/O failed")
    return ios / (t1 - t0)

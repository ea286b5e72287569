# cython: language_level=3
#
# Block devices and bios: the C-level contract between the DIO engine (dio.pyx)
# and the devices (bdev.pyx).  See docs/CORE-API.md §2 for the full contract.
#
# A bio is one contiguous device I/O.  The engine owns the bio memory; a queue
# owns it between submit() and the call of bio.end_io.  end_io is called exactly
# once per submitted bio, with bio.status already set (0, or -errno), from the
# thread that reaps the queue (reap/unplug/wait), WITHOUT the GIL.  An end_io
# that must run Python takes the GIL itself.

from libc.stdint cimport uint64_t, int64_t, uint32_t

cdef enum:
    BIO_READ = 0
    BIO_WRITE = 1
    BIO_FLUSH = 2          # device cache flush (fdatasync on a file or block device)

cdef enum:
    BIO_FUA = 1 << 0       # write through the volatile cache (RWF_DSYNC)
    BIO_SYNC = 1 << 1      # hint: a waiter is sleeping on this bio

cdef struct bio:
    int op                 # BIO_READ / BIO_WRITE / BIO_FLUSH
    int opf                # BIO_FUA | BIO_SYNC
    uint64_t addr          # device byte address; multiple of logical_block_size
    char* buf              # memory; aligned to logical_block_size (devices assert it)
    size_t length          # bytes; multiple of logical_block_size (0 for FLUSH)
    int status             # 0 or -errno; set by the device before end_io
    void (*end_io)(bio* b) noexcept nogil
    void* private          # owner cookie (the engine's dio)
    bio* next              # plug-list link; owned by the queue while submitted
    uint64_t seq           # device-assigned submission sequence (crash recorder, tracing)
    # Device-private (set by submit(), meaningless to the owner):
    size_t done            # bytes transferred so far (short transfers are resubmitted)
    void* owner            # the queue's completion state (thread-pool backend)

ctypedef bio bio_t


cdef class IoQueue:
    """A submission/completion queue on one device, used by one thread at a time.

    submit() only links the bio onto the plug list (no syscall) and always takes
    the bio (returns 0): a bio check_bio refuses is completed with its error at the
    next unplug()/reap().  unplug() hands every plugged bio to the device
    (io_uring_enter, a worker pool, or memory) and returns how many bios it
    completed itself (>= 0) or -errno.  reap(n) unplugs first (io_uring: submit
    and wait in one io_uring_enter), then waits until at least n completions
    were processed (end_io called; n is capped at inflight, reap(0) only polls)
    and returns how many were processed, or -errno if the queue itself failed.
    A RamDev queue completes everything at unplug().

    start_plug()/finish_plug() are the kernel's blk_start_plug/blk_finish_plug for
    the thread owning the queue: while plug_depth > 0 an asynchronous DIO leaves
    its bios on the plug list instead of unplugging after each one, so a batch of
    submissions costs one device submission (io_uring_enter) at finish_plug() or
    at the next reap/wait.  A synchronous DIO still unplugs before it waits (as
    the kernel flushes the plug when a task sleeps).
    """
    cdef readonly BlockDev dev
    cdef readonly int inflight          # submitted, end_io not yet called (plugged included)
    cdef readonly int plugged           # on the plug list
    cdef readonly int plug_depth        # start_plug() nesting (blk_start_plug): see below
    cdef readonly bint closed
    cdef bio_t* plug_head               # bios submitted, not yet handed to the device
    cdef bio_t* plug_tail
    cdef object __weakref__
    cdef void plug_add(self, bio_t* b) noexcept nogil   # caller holds the plug lock, if any
    cdef int submit(self, bio_t* b) noexcept nogil
    cdef int unplug(self) noexcept nogil
    cdef int reap(self, int min_complete) noexcept nogil


cdef class BlockDev:
    """An opened device or image file.

    Geometry and capabilities are fixed at open time.  Devices are thread-safe
    for queue() (each thread gets its own queue) and for the Python helpers.
    """
    cdef readonly object path
    cdef readonly int fd                    # -1 for memory devices
    cdef readonly uint64_t size             # bytes
    cdef readonly uint32_t logical_block_size
    cdef readonly uint32_t physical_block_size
    cdef readonly bint volatile_cache       # writes may sit in a cache until flush
    cdef readonly bint fua                  # FUA writes bypass that cache
    cdef readonly bint read_only
    cdef readonly bint is_blockdev
    cdef readonly bint direct               # opened with O_DIRECT
    cdef readonly str backend               # "io_uring", "threads", "memory"
    cdef readonly bint closed
    cdef object _local                      # threading.local holding each thread's queue
    cdef object _queues                     # WeakSet of every queue made on this device
    cdef uint64_t next_seq                  # bio.seq source (atomic)
    cdef object __weakref__

    cpdef IoQueue queue(self)               # the calling thread's queue (created lazily)
    cpdef IoQueue new_queue(self, int depth=*, bint reaper=*)   # a private queue (batch/async API)
    cdef int check_bio(self, bio_t* b) noexcept nogil   # 0 or -EINVAL/-EROFS/-ENOSPC...


cdef class AlignedBuffer:
    """posix_memalign'ed memory exposed through the buffer protocol."""
    cdef char* ptr
    cdef readonly size_t size
    cdef readonly size_t alignment
    cdef int _exports
    cdef object __weakref__


cdef class BufPool:
    """Bounded pool of aligned bounce buffers (chunk_size each, at most max_chunks)."""
    cdef readonly size_t chunk_size
    cdef readonly size_t alignment
    cdef readonly int max_chunks
    cdef void* _impl
    cdef char* get(self) noexcept nogil          # blocks while the pool is exhausted
    cdef char* try_get(self) noexcept nogil      # NULL when exhausted
    cdef void put(self, char* p) noexcept nogil

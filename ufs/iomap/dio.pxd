# cython: language_level=3
#
# The DIO engine's C-level state (fs/iomap/direct-io.c's struct iomap_dio).
# See dio.pyx for the rules; docs/CORE-API.md §4 for the Python contract.

from libc.stdint cimport int64_t

from ufs.iomap.bdev cimport bio_t, IoQueue, BlockDev
from ufs.iomap.iomap cimport IomapIter, IomapOps, DioOps, Kiocb, IovIter


cdef struct dio_bio:
    bio_t b                 # first member: the device only sees a bio_t*
    char* bounce            # BufPool chunk the device uses instead of user memory, or NULL
    char* user              # where a bounced read lands on success
    size_t copy_len
    int embedded            # the bio lives inside its dio (no free)


cdef struct dio_state:
    # Everything a bio end_io touches without the GIL.
    int ref                 # 1 (submitter) + one per bio in flight; atomics only
    int error               # 0 or the first -errno (CAS from 0)
    unsigned int flags      # DioFlag public + end_io + private bits
    void* owner             # the Dio object (borrowed; bios keep it alive through ref)
    dio_bio first           # the first bio of a dio needs no malloc
    int first_busy


cdef class Dio:
    cdef dio_state st
    cdef readonly Kiocb iocb
    cdef readonly DioOps dops
    cdef object inode
    cdef object mapping
    cdef object wq                      # s_dio_done_wq (async writes)
    cdef readonly IovIter iter
    cdef IoQueue q0                     # the queue bios go to (first device)
    cdef list queues                    # further queues (mappings on other devices)
    cdef IoQueue req_queue              # the caller's queue argument
    cdef readonly int64_t i_size        # snapshot at start (clamps reads)
    cdef readonly int64_t size          # bytes submitted (zero bios not counted)
    cdef readonly int64_t done_before
    cdef unsigned int fs_block_size
    cdef readonly bint wait_for_completion
    cdef readonly bint completed
    cdef bint plugged                   # batch mode: the caller unplugs
    cdef object exc                     # exception behind st.error, when one exists
    cdef int exc_code
    cdef IomapIter cur_iter
    cdef IoQueue cur_q

    cdef IoQueue queue_for(self, BlockDev bdev)
    cdef int submit_bio(self, dio_bio* db, int64_t file_offset) except -1
    cdef void set_error(self, int err, object exc)


cdef class BioRef:
    cdef dio_bio* db
    cdef Dio dio
    cdef readonly bint submitted
    cdef readonly bint is_zero
    cdef readonly int64_t file_offset
    cdef int _exports


cdef class DioBatch:
    cdef readonly IoQueue queue


cdef object _dio_start(Kiocb iocb, object iter, IomapOps ops, DioOps dops, unsigned int dio_flags,
                       object private, int64_t done_before, IoQueue queue, bint plugged)
cdef object _dio_complete(Dio dio)

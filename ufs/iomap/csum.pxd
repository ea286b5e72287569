# cython: language_level=3
#
# CRC-32C for other Cython modules (btrfslike's submit_io/end_io, the DIO
# engine's optional data checksums).  Both functions are pure computation on
# caller memory: no GIL, no allocation, callable from any thread once the
# ufs.iomap.csum module has been imported (cimport does that).
#
# Seeds chain like the Python API: crc32c_buf(crc32c_buf(s, a), b) equals the
# CRC of a followed by b.  Seed 0 gives the standard CRC-32C.

from libc.stdint cimport uint32_t

cdef uint32_t crc32c_buf(uint32_t seed, const unsigned char* buf, size_t length) noexcept nogil

# One CRC-32C (seed 0) per block_size bytes of buf into out[0 .. length // block_size).
# length must be a multiple of block_size and block_size > 0 (callers check).
cdef void block_csums_buf(const unsigned char* buf, size_t length, size_t block_size,
                          uint32_t* out) noexcept nogil

# Index of the first block whose CRC-32C differs from csums[i], or -1.
cdef Py_ssize_t verify_block_csums_buf(const unsigned char* buf, size_t length, size_t block_size,
                                       const uint32_t* csums) noexcept nogil

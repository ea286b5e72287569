# cython: language_level=3
"""CRC-32C (Castagnoli) checksums for ufs: whole buffers and per-block arrays.

Layer: ufs.iomap (Cython core).  Imports nothing from ufs but ``ufs.errors``.

Owns the one CRC-32C implementation of the project (``include/crc32c.h``): the
SSE4.2 ``crc32`` instruction when the CPU has it (checked once, at import, with
``__builtin_cpu_supports``), else slicing-by-8 tables.  Personalities checksum
whole extents with one call (never a Python loop over blocks); Cython modules
use the nogil functions declared in ``csum.pxd``.

Semantics: the standard CRC-32C (init ``~0``, reflected, final ``~``), so
``crc32c(b"123456789") == 0xE3069283``; ``seed`` is a previous result and
chains: ``crc32c(b, crc32c(a)) == crc32c(a + b)``.

Any C-contiguous buffer is accepted (bytes, bytearray, memoryview, mmap, array,
AlignedBuffer); its format is ignored, only its bytes count.  The GIL is
released while checksumming buffers of 4 KiB and more; below that releasing it
costs more than the work.  A buffer export is held across the computation, so
a bytearray cannot be resized under it.  No state is mutable after import.
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython cimport array
from libc.stdint cimport uint32_t

import array as _pyarray

from ufs.errors import InvalidError, NotSupportedError

__all__ = ["crc32c", "crc32c_sw", "crc32c_hw", "HAVE_HW_CRC32C", "block_csums",
           "verify_block_csums"]


cdef extern from "crc32c.h" nogil:
    void ufs_crc32c_init()
    int ufs_crc32c_use_hw
    int UFS_CRC32C_HAVE_HW_BUILD
    uint32_t ufs_crc32c_sw(uint32_t reg, const unsigned char* p, size_t length)
    uint32_t ufs_crc32c_hw(uint32_t reg, const unsigned char* p, size_t length)
    uint32_t ufs_crc32c_raw(uint32_t reg, const unsigned char* p, size_t length)


ufs_crc32c_init()

#: True when crc32c() uses the SSE4.2 instruction on this CPU.
HAVE_HW_CRC32C = bool(ufs_crc32c_use_hw)

cdef size_t _NOGIL_MIN = 4096
cdef array.array _U32_TEMPLATE = _pyarray.array("I")
assert _U32_TEMPLATE.itemsize == 4, "array('I') must hold 32-bit items"


# --- C API (csum.pxd) ---

cdef uint32_t crc32c_buf(uint32_t seed, const unsigned char* buf, size_t length) noexcept nogil:
    return ~ufs_crc32c_raw(~seed, buf, length)


cdef void block_csums_buf(const unsigned char* buf, size_t length, size_t block_size,
                          uint32_t* out) noexcept nogil:
    cdef size_t i, n = length // block_size
    for i in range(n):
        out[i] = ~ufs_crc32c_raw(0xFFFFFFFFu, buf + i * block_size, block_size)


cdef Py_ssize_t verify_block_csums_buf(const unsigned char* buf, size_t length, size_t block_size,
                                       const uint32_t* csums) noexcept nogil:
    cdef size_t i, n = length // block_size
    for i in range(n):
        if ~ufs_crc32c_raw(0xFFFFFFFFu, buf + i * block_size, block_size) != csums[i]:
            return <Py_ssize_t>i
    return -1


# --- Python API ---

cdef enum:
    _ENGINE_BEST = 0
    _ENGINE_SW = 1
    _ENGINE_HW = 2


cdef uint32_t _crc_engine(int engine, uint32_t seed, const unsigned char* p, size_t n) noexcept nogil:
    if engine == _ENGINE_SW:
        return ~ufs_crc32c_sw(~seed, p, n)
    if engine == _ENGINE_HW:
        return ~ufs_crc32c_hw(~seed, p, n)
    return ~ufs_crc32c_raw(~seed, p, n)


cdef object _crc32c(object data, uint32_t seed, int engine):
    cdef Py_buffer view
    cdef uint32_t crc
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if <size_t>view.len >= _NOGIL_MIN:
            with nogil:
                crc = _crc_engine(engine, seed, <const unsigned char*>view.buf, <size_t>view.len)
        else:
            crc = _crc_engine(engine, seed, <const unsigned char*>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return crc


def crc32c(data, uint32_t seed=0):
    """CRC-32C of ``data`` (any contiguous buffer), continuing from ``seed``.

    Uses the hardware instruction when available (see ``HAVE_HW_CRC32C``).
    ``crc32c(b"123456789") == 0xE3069283``.
    """
    return _crc32c(data, seed, _ENGINE_BEST)


def crc32c_sw(data, uint32_t seed=0):
    """Same result as :func:`crc32c`, always through the slicing-by-8 tables."""
    return _crc32c(data, seed, _ENGINE_SW)


def crc32c_hw(data, uint32_t seed=0):
    """Same result as :func:`crc32c`, always through the SSE4.2 instruction.

    Raises ``NotSupportedError`` (EOPNOTSUPP) on a CPU without SSE4.2.
    """
    if not ufs_crc32c_use_hw:
        raise NotSupportedError("crc32c_hw: this CPU has no SSE4.2 crc32 instruction")
    return _crc32c(data, seed, _ENGINE_HW)


cdef int _check_blocks(Py_ssize_t length, Py_ssize_t block_size) except -1:
    if block_size <= 0:
        raise InvalidError(f"block_size must be positive, got {block_size}")
    if length % block_size:
        raise InvalidError(f"buffer length {length} is not a multiple of block_size {block_size}")
    return 0


def block_csums(data, Py_ssize_t block_size):
    """One CRC-32C per ``block_size`` bytes of ``data``, as ``array('I')``.

    ``len(data)`` must be a multiple of ``block_size`` (else ``InvalidError``).
    """
    cdef Py_buffer view
    cdef array.array out
    cdef Py_ssize_t nblocks
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        _check_blocks(view.len, block_size)
        nblocks = view.len // block_size
        out = array.clone(_U32_TEMPLATE, nblocks, zero=False)
        if nblocks:
            with nogil:
                block_csums_buf(<const unsigned char*>view.buf, <size_t>view.len,
                                <size_t>block_size, out.data.as_uints)
    finally:
        PyBuffer_Release(&view)
    return out


def verify_block_csums(data, Py_ssize_t block_size, csums):
    """Index of the first block of ``data`` whose CRC-32C differs from ``csums``, or -1.

    ``csums`` is any buffer of native uint32 values (``array('I')`` from
    :func:`block_csums`) holding at least ``len(data) // block_size`` entries.
    """
    cdef Py_buffer view, cview
    cdef Py_ssize_t nblocks, bad = -1
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        _check_blocks(view.len, block_size)
        nblocks = view.len // block_size
        PyObject_GetBuffer(csums, &cview, PyBUF_SIMPLE)
        try:
            if cview.len < nblocks * 4:
                raise InvalidError(f"{cview.len // 4} checksums for {nblocks} blocks")
            with nogil:
                bad = verify_block_csums_buf(<const unsigned char*>view.buf, <size_t>view.len,
                                             <size_t>block_size, <const uint32_t*>cview.buf)
        finally:
            PyBuffer_Release(&cview)
    finally:
        PyBuffer_Release(&view)
    return bad

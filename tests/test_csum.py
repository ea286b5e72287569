"""CRC-32C (ufs.iomap.csum): known vectors, engine agreement, block arrays, throughput."""
import array
import os
import threading
import time
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ufs.errors import InvalidError
from ufs.iomap import csum
from ufs.iomap.csum import HAVE_HW_CRC32C, block_csums, crc32c, crc32c_sw, verify_block_csums

needs_hw = pytest.mark.skipif(not HAVE_HW_CRC32C, reason="CPU has no SSE4.2 crc32 instruction")


def crc32c_bitwise(data, seed=0):
    """Textbook one-bit-at-a-time CRC-32C: the independent oracle."""
    crc = ~seed & 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return ~crc & 0xFFFFFFFF


# Published CRC-32C check values (RFC 3720 appendix B.4 and the common check string).
VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"The quick brown fox jumps over the lazy dog", 0x22620404),
]


@pytest.mark.parametrize("data,want", VECTORS)
def test_csum_known_vectors(data, want):
    assert crc32c(data) == want
    assert crc32c_sw(data) == want
    assert crc32c_bitwise(data) == want
    if HAVE_HW_CRC32C:
        assert csum.crc32c_hw(data) == want


def test_csum_is_not_plain_crc32():
    # Guards against a table built from the wrong (IEEE) polynomial.
    assert crc32c(b"123456789") != zlib.crc32(b"123456789")


@needs_hw
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1), st.integers(0, 7))
def test_csum_hw_and_table_agree(data, seed, skip):
    # Slicing at `skip` exercises every start alignment of the 8-byte loops.
    view = memoryview(data)[skip:]
    assert csum.crc32c_hw(view, seed) == crc32c_sw(view, seed)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_csum_matches_bitwise_oracle_and_chains(a, b):
    assert crc32c(a) == crc32c_bitwise(a)
    assert crc32c(b, crc32c(a)) == crc32c(a + b)
    assert crc32c_sw(b, crc32c_sw(a)) == crc32c_bitwise(a + b)


def test_csum_accepts_any_contiguous_buffer():
    raw = os.urandom(10000)
    want = crc32c(raw)
    assert crc32c(bytearray(raw)) == want
    assert crc32c(memoryview(raw)) == want
    assert crc32c(array.array("I", raw[:9996])) == crc32c(raw[:9996])   # format ignored
    with pytest.raises(BufferError):
        crc32c(memoryview(raw)[::2])                                   # not contiguous
    with pytest.raises(TypeError):
        crc32c("text")


def test_csum_large_buffer_releases_gil():
    # A 64 MiB checksum in one thread must not stop another from running.
    data = os.urandom(1 << 20) * 64
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.0005)

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.01)
    try:
        before = len(ticks)
        for _ in range(4):
            crc32c_sw(data)          # the slower engine: a longer window
        during = len(ticks) - before
    finally:
        stop.set()
        t.join()
    assert during > 5


def test_csum_block_csums_and_verify():
    bs = 4096
    data = bytearray(os.urandom(bs * 16))
    sums = block_csums(data, bs)
    assert isinstance(sums, array.array) and sums.typecode == "I" and len(sums) == 16
    assert list(sums) == [crc32c(data[i:i + bs]) for i in range(0, len(data), bs)]
    assert verify_block_csums(data, bs, sums) == -1
    data[5 * bs + 17] ^= 0x01
    assert verify_block_csums(data, bs, sums) == 5
    assert len(block_csums(b"", bs)) == 0
    with pytest.raises(InvalidError):
        block_csums(data[:-1], bs)
    with pytest.raises(InvalidError):
        block_csums(data, 0)
    with pytest.raises(InvalidError):
        verify_block_csums(data, bs, sums[:3])


def test_csum_throughput(capsys):
    data = os.urandom(1 << 20) * 64          # 64 MiB
    results = {}
    engines = [("best", crc32c), ("table", crc32c_sw)]
    if HAVE_HW_CRC32C:
        engines.append(("sse4.2", csum.crc32c_hw))
    for name, fn in engines:
        best = None
        for _ in range(3):
            t0 = time.perf_counter()
            fn(data)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        results[name] = len(data) / best / 1e9
    t0 = time.perf_counter()
    block_csums(data, 4096)
    results["block_csums(4K)"] = len(data) / (time.perf_counter() - t0) / 1e9
    with capsys.disabled():
        print("\n[csum] " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in results.items()))
    # Loose floors: a byte-at-a-time or per-block-Python implementation is far below.
    assert results["table"] > 0.3
    if HAVE_HW_CRC32C:
        assert results["sse4.2"] > 1.0

"""Tests of ufs.iomap.bdev: RamDev, AlignedBuffer/BufPool, DirectDev (both backends), FaultDev.

DirectDev tests use an image file in a temporary directory on the host filesystem
(O_DIRECT must work there; the module skips them with the reason if it does not).
"""
import errno
import os
import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ufs import errors
from ufs.iomap import bdev

BIO_FLUSH, BIO_FUA, BIO_READ, BIO_WRITE = (bdev.BIO_FLUSH, bdev.BIO_FUA, bdev.BIO_READ, bdev.BIO_WRITE)


def run(q, reqs, **kw):
    return bdev._run_bios(q, reqs, **kw)


# ---------------------------------------------------------------------------
# RamDev
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("lbs", [512, 4096])
def test_ramdev_strict_alignment(lbs):
    dev = bdev.RamDev(64 * lbs, lbs)
    buf = bdev.aligned_buffer(8 * lbs, 65536)
    q = dev.queue()
    cases = [
        ((BIO_READ, 0, 0, buf, 0, lbs), 0),                       # aligned: fine
        ((BIO_READ, 0, lbs // 2, buf, 0, lbs), -errno.EINVAL),    # addr
        ((BIO_READ, 0, 0, buf, 0, lbs + 1), -errno.EINVAL),       # length
        ((BIO_READ, 0, 0, buf, 0, 0), -errno.EINVAL),             # empty data bio
        ((BIO_READ, 0, 0, buf, 8, lbs), -errno.EINVAL),           # memory
        ((BIO_WRITE, 0, 0, buf, lbs // 2, lbs), -errno.EINVAL),   # memory (write)
        ((BIO_READ, 0, 63 * lbs, buf, 0, 2 * lbs), -errno.EINVAL),  # crosses the end
        ((BIO_WRITE, 0, 64 * lbs, buf, 0, lbs), -errno.EINVAL),   # at the end
        ((BIO_READ, 0, 2**64 - lbs, buf, 0, 2 * lbs), -errno.EINVAL),  # wraps around
        ((7, 0, 0, buf, 0, lbs), -errno.EINVAL),                  # unknown op
        ((BIO_WRITE, BIO_FUA, 63 * lbs, buf, 0, lbs), 0),
        ((BIO_FLUSH, 0, 0, None, 0, 0), 0),
    ]
    res = run(q, [c for c, _ in cases])
    assert [s for s, _, _ in res] == [want for _, want in cases]
    assert all(n == 1 for _, n, _ in res), "end_io must run exactly once per bio"
    seqs = [seq for _, _, seq in res]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert q.inflight == 0 and q.plugged == 0


def test_ramdev_readonly():
    dev = bdev.RamDev(1 << 16, 512, read_only=True, data=b"\x5a" * 4096)
    buf = bdev.aligned_buffer(4096)
    res = run(dev.queue(), [(BIO_WRITE, 0, 0, buf, 0, 512), (BIO_READ, 0, 0, buf, 0, 4096),
                            (BIO_FLUSH, 0, 0, None, 0, 0)])
    assert [r[0] for r in res] == [-errno.EROFS, 0, 0]
    assert bytes(buf) == b"\x5a" * 4096
    with pytest.raises(errors.ReadOnlyError) as ei:
        dev.pwrite(b"x" * 512, 0)
    assert ei.value.errno == errno.EROFS


def test_ramdev_roundtrip_and_helpers():
    dev = bdev.RamDev(1 << 20, 4096)
    rng = random.Random(1)
    model = bytearray(1 << 20)
    for _ in range(50):
        blk = rng.randrange(256)
        n = rng.randint(1, 4)
        n = min(n, 256 - blk)
        data = rng.randbytes(n * 4096)
        assert dev.pwrite(data, blk * 4096, fua=rng.random() < 0.3) == len(data)
        model[blk * 4096:(blk + n) * 4096] = data
    assert dev.contents() == bytes(model)
    assert dev.pread(8192, 4096) == bytes(model[4096:12288])
    # unaligned memory is bounced; misaligned addr/length is an AlignmentError (EINVAL)
    big = bytearray(4096 + 3)
    mv = memoryview(big)[3:]
    assert dev.pread_into(mv, 8192) == 4096 and bytes(mv) == bytes(model[8192:12288])
    with pytest.raises(errors.AlignmentError) as ei:
        dev.pread(4096, 100)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(errors.AlignmentError):
        dev.pwrite(b"x" * 100, 0)
    # end of device: reads clamp, writes at/after the end are ENOSPC, crossing writes truncate
    end = dev.size
    assert dev.pread(4096, end) == b""
    assert len(dev.pread(8192, end - 4096)) == 4096
    with pytest.raises(errors.NoSpaceError):
        dev.pwrite(b"y" * 4096, end)
    assert dev.pwrite(b"z" * 8192, end - 4096) == 4096
    assert dev.contents()[-4096:] == b"z" * 4096
    dev.close()
    dev.close()
    with pytest.raises(OSError) as ei:
        dev.pread(4096, 0)
    assert ei.value.errno == errno.EBADF


def test_ramdev_constructor_validation():
    with pytest.raises(errors.InvalidError):
        bdev.RamDev(1000, 512)
    with pytest.raises(errors.InvalidError):
        bdev.RamDev(4096, 1000)
    with pytest.raises(errors.InvalidError):
        bdev.RamDev(4096, 256)
    d = bdev.RamDev(8192, 512, physical_block_size=4096)
    assert (d.logical_block_size, d.physical_block_size, d.fd, d.backend) == (512, 4096, -1, "memory")


def test_ramdev_crash_model():
    dev = bdev.RamDev(64 * 512, 512)
    a, b, c, d = (bytes([x]) * 512 for x in b"abcd")
    dev.pwrite(a, 0)
    dev.flush()
    assert dev.cached_writes == []
    dev.pwrite(b, 512)                 # volatile
    dev.pwrite(c, 1024, fua=True)      # durable at once
    dev.pwrite(d, 0)                   # volatile overwrite of a flushed block
    assert [(w[1], w[3]) for w in dev.cached_writes] == [(512, False), (1024, True), (0, False)]
    # contents() sees everything; durable() only what a flush or FUA promised
    assert dev.contents()[:1536] == d + b + c
    assert dev.durable()[:1536] == a + bytes(512) + c
    assert dev.crash(keep_probability=1.0)[:1536] == d + b + c
    seen = set()
    for seed in range(64):
        img = dev.crash(seed)
        assert img[1024:1536] == c, "a FUA write must survive every crash"
        assert img[:512] in (a, d) and img[512:1024] in (b, bytes(512))
        seen.add((img[:512], img[512:1024]))
        assert dev.crash(seed) == img, "the same seed gives the same image"
    assert len(seen) == 4, "each volatile write is kept or dropped independently"
    dev.flush()
    assert dev.crash(0) == dev.contents() == dev.durable()


def test_ramdev_crash_fua_ordering_and_no_fua_device():
    # A volatile write followed by a FUA write to the same block: the FUA data wins
    # whether or not the earlier volatile write is kept.
    dev = bdev.RamDev(8 * 512, 512)
    dev.pwrite(b"v" * 512, 0)
    dev.pwrite(b"F" * 512, 0, fua=True)
    for seed in range(8):
        assert dev.crash(seed)[:512] == b"F" * 512
    # A device without FUA: a FUA write is write + full flush (the kernel's emulation).
    nf = bdev.RamDev(8 * 512, 512, fua=False)
    nf.pwrite(b"1" * 512, 0)
    nf.pwrite(b"2" * 512, 512, fua=True)
    assert nf.cached_writes == [] and nf.durable()[:1024] == b"1" * 512 + b"2" * 512
    # No volatile cache: everything is durable at once.
    wt = bdev.RamDev(8 * 512, 512, volatile_cache=False)
    wt.pwrite(b"w" * 512, 0)
    assert wt.crash(0) == wt.contents() and wt.crash(0)[:512] == b"w" * 512


def test_ramdev_snapshot_and_data():
    dev = bdev.RamDev(4096, 512, data=b"q" * 1024)
    assert dev.contents()[:1025] == b"q" * 1024 + b"\0"
    assert dev.durable()[:1024] == b"q" * 1024
    snap = dev.snapshot()
    dev.pwrite(b"r" * 512, 0)
    assert snap.contents()[:512] == b"q" * 512


def test_ramdev_queue_per_thread_and_unplug_batching():
    dev = bdev.RamDev(1 << 16, 512)
    q = dev.queue()
    assert dev.queue() is q
    other = []
    t = threading.Thread(target=lambda: other.append(dev.queue()))
    t.start()
    t.join()
    assert other[0] is not q and other[0].dev is dev
    buf = bdev.aligned_buffer(4096)
    res = run(q, [(BIO_WRITE, 0, i * 512, buf, 0, 512) for i in range(8)], unplug_every=3)
    assert [r[0] for r in res] == [0] * 8
    assert q.wait(1) == 0  # nothing in flight: returns at once


# ---------------------------------------------------------------------------
# AlignedBuffer / BufPool
# ---------------------------------------------------------------------------

def test_aligned_buffer():
    b = bdev.aligned_buffer(10000, 8192)
    assert b.address % 8192 == 0 and len(b) == 10000 and bytes(b) == bytes(10000)
    m = memoryview(b)
    m[0:3] = b"abc"
    assert bytes(b)[:3] == b"abc"
    with pytest.raises(BufferError):
        b.release()
    m.release()
    b.release()
    b.release()
    with pytest.raises(BufferError):
        memoryview(b)
    with pytest.raises(errors.InvalidError):
        bdev.aligned_buffer(4096, 3000)


def test_bufpool_exhaustion_and_blocking_get():
    pool = bdev.BufPool(4096, 2, alignment=4096)
    a = pool.acquire()
    c = pool.acquire()
    assert a % 4096 == 0 and c % 4096 == 0 and a != c
    assert pool.acquire(blocking=False) is None
    assert pool.available == 0 and pool.allocated == 2
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire()))
    t.start()
    deadline = time.monotonic() + 5
    while pool.waiters == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert pool.waiters == 1 and not got, "get must block while the pool is exhausted"
    pool.release(c)
    t.join(5)
    assert got == [c] and pool.allocated == 2
    pool.view(a)[:4] = b"abcd"
    assert bytes(pool.view(a)[:4]) == b"abcd"
    pool.release(a)
    pool.release(c)
    assert pool.available == 2


# ---------------------------------------------------------------------------
# DirectDev on an image file (both backends)
# ---------------------------------------------------------------------------

BACKENDS = ["io_uring", "threads"]
MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "dev.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        os.close(fd)
    except OSError as e:
        pytest.skip(f"O_DIRECT does not work on {tmp_path}: {e}")
    return path


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "io_uring" and bdev._probe_io_uring() != 0:
        pytest.skip("io_uring_setup fails on this kernel")
    return request.param


def test_direct_geometry(image, backend):
    with bdev.open_device(image, backend=backend) as dev:
        assert dev.backend == backend and dev.direct and not dev.is_blockdev
        assert dev.size == 16 * MiB and dev.fd >= 0
        lbs = dev.logical_block_size
        assert lbs >= 512 and lbs & (lbs - 1) == 0
        assert dev.physical_block_size >= lbs
        assert dev.volatile_cache and dev.fua and not dev.read_only
    assert dev.closed and dev.fd == -1


def test_direct_size_rounded_down(tmp_path, backend):
    path = tmp_path / "odd.img"
    with open(path, "wb") as f:
        f.truncate(MiB + 100)
    with bdev.open_device(path, backend=backend) as dev:
        assert dev.raw_size == MiB + 100
        assert dev.size == MiB + 100 - (MiB + 100) % dev.logical_block_size


def test_direct_many_bios_in_flight(image, backend):
    rng = random.Random(7)
    n = 256
    with bdev.open_device(image, backend=backend) as dev:
        blocks = rng.sample(range(dev.size // 4096), n)
        src = bdev.aligned_buffer(n * 4096)
        memoryview(src)[:] = rng.randbytes(n * 4096)
        for q in (dev.queue(), dev.new_queue(depth=4), dev.new_queue(depth=16, reaper=True)):
            writes = [(BIO_WRITE, BIO_FUA if i % 5 == 0 else 0, b * 4096, src, i * 4096, 4096)
                      for i, b in enumerate(blocks)]
            res = run(q, writes)
            assert all(r[:2] == (0, 1) for r in res), res[:4]
            assert q.inflight == 0 and q.plugged == 0
            dst = bdev.aligned_buffer(n * 4096)
            res = run(q, [(BIO_READ, 0, b * 4096, dst, i * 4096, 4096) for i, b in enumerate(blocks)]
                      + [(BIO_FLUSH, 0, 0, None, 0, 0)])
            assert all(r[:2] == (0, 1) for r in res)
            assert bytes(dst) == bytes(src)
            # next round writes other data over the same blocks
            memoryview(src)[:] = rng.randbytes(n * 4096)
        for _i, b in enumerate(blocks[:8]):
            assert dev.pread(4096, b * 4096) != bytes(4096)


def test_direct_invalid_bios(image, backend):
    with bdev.open_device(image, backend=backend) as dev:
        lbs = dev.logical_block_size
        buf = bdev.aligned_buffer(4 * 4096, 65536)
        res = run(dev.queue(), [
            (BIO_READ, 0, lbs // 2, buf, 0, lbs),
            (BIO_READ, 0, 0, buf, 0, lbs - 1 if lbs > 1 else 3),
            (BIO_WRITE, 0, 0, buf, 1, lbs),
            (BIO_READ, 0, dev.size - lbs, buf, 0, 2 * lbs),
            (BIO_READ, 0, dev.size - lbs, buf, 0, lbs),
        ])
        assert [r[0] for r in res] == [-errno.EINVAL] * 4 + [0]
        assert all(r[1] == 1 for r in res)
        with pytest.raises(errors.AlignmentError):
            dev.pwrite(b"a" * 4096, lbs // 2)
        with pytest.raises(errors.AlignmentError):
            dev.pread(lbs + 1, 0)
        assert dev.pread(4096, dev.size) == b""
        with pytest.raises(errors.NoSpaceError):
            dev.pwrite(b"a" * lbs, dev.size)


def test_direct_eof_short_transfer_is_eio(image, backend):
    """A read crossing the image's EOF moves the first part (a short transfer),
    the retry of the remainder moves 0 bytes: the bio ends with -EIO."""
    with bdev.open_device(image, backend=backend) as dev:
        dev.pwrite(b"e" * 8192, 8 * MiB - 4096)
        os.truncate(image, 8 * MiB)          # behind the device's back
        buf = bdev.aligned_buffer(8192)
        res = run(dev.queue(), [(BIO_READ, 0, 8 * MiB - 4096, buf, 0, 8192),
                                (BIO_READ, 0, 12 * MiB, buf, 0, 4096)])
        assert [r[0] for r in res] == [-errno.EIO, -errno.EIO]
        assert bytes(buf)[:4096] == b"e" * 4096
        with pytest.raises(errors.IOFailure):
            dev.pread(4096, 12 * MiB)


def test_direct_helpers_bounce_and_large(image, backend):
    rng = random.Random(3)
    data = rng.randbytes(3 * MiB)
    with bdev.open_device(image, backend=backend) as dev:
        unaligned = memoryview(bytearray(len(data) + 1))[1:]
        unaligned[:] = data
        assert dev.pwrite(unaligned, MiB) == len(data)
        assert dev.pread(len(data), MiB) == data
        out = memoryview(bytearray(len(data) + 7))[7:]
        assert dev.pread_into(out, MiB) == len(data) and bytes(out) == data
        dev.flush()
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(len(data)) == data


def test_direct_threads_each_get_a_queue(image, backend):
    with bdev.open_device(image, backend=backend) as dev:
        errs, queues = [], []

        def worker(k):
            try:
                queues.append(dev.queue())
                rng = random.Random(k)
                for i in range(20):
                    blob = rng.randbytes(8192)
                    addr = (k * 64 + i * 2) * 4096
                    dev.pwrite(blob, addr)
                    assert dev.pread(8192, addr) == blob
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errs.append(e)

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errs, errs
        assert len({id(q) for q in queues}) == 4


def test_direct_read_only(image, backend):
    with bdev.open_device(image, backend=backend) as dev:
        dev.pwrite(b"R" * 4096, 0, fua=True)
    with bdev.open_device(image, read_only=True, backend=backend) as ro:
        assert ro.read_only
        assert ro.pread(4096, 0) == b"R" * 4096
        with pytest.raises(errors.ReadOnlyError) as ei:
            ro.pwrite(b"W" * 4096, 0)
        assert ei.value.errno == errno.EROFS
        buf = bdev.aligned_buffer(4096)
        assert run(ro.queue(), [(BIO_WRITE, 0, 0, buf, 0, 4096)])[0][0] == -errno.EROFS
        ro.flush()


def test_open_errors(tmp_path, image, backend):
    with pytest.raises(errors.NotFoundError):
        bdev.open_device(tmp_path / "missing.img", backend=backend)
    with pytest.raises(OSError) as ei:
        bdev.open_device(tmp_path, backend=backend)
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(errors.NotBlockError):
        bdev.open_device("/dev/null", backend=backend, direct=False)
    with pytest.raises(errors.InvalidError):
        bdev.open_device(image, backend="nonsense")


def test_backend_env(image, monkeypatch):
    monkeypatch.setenv("UFS_IO_BACKEND", "threads")
    with bdev.open_device(image) as dev:
        assert dev.backend == "threads"
        dev.pwrite(b"t" * 4096, 0)
        assert dev.pread(4096, 0) == b"t" * 4096


def test_direct_close_semantics(image, backend):
    dev = bdev.open_device(image, backend=backend)
    q = dev.new_queue(reaper=True)
    dev.pwrite(b"c" * 4096, 0)
    dev.close()
    dev.close()
    assert q.closed
    with pytest.raises(OSError) as ei:
        dev.pread(4096, 0)
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        dev.queue()
    assert ei.value.errno == errno.EBADF


def _leak_device(image, backend):
    import gc
    dev = bdev.open_device(image, backend=backend)
    dev.pread(4096, 0)          # its per-thread queue makes a reference cycle
    del dev
    gc.collect()


def test_direct_unclosed_warns(image, backend):
    import gc
    before = len(os.listdir("/proc/self/fd"))
    with pytest.warns(ResourceWarning, match="unclosed device") as record:
        _leak_device(image, backend)
    del record                  # the warning's ``source`` kept the device alive
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before, "the leaked device's fds must be closed"


def test_no_direct_open(image, backend):
    with bdev.open_device(image, direct=False, backend=backend) as dev:
        assert not dev.direct
        dev.pwrite(b"n" * 4096, 4096)
        assert dev.pread(4096, 4096) == b"n" * 4096


# ---------------------------------------------------------------------------
# FaultDev
# ---------------------------------------------------------------------------

def test_fault_fail_count_and_ranges():
    inner = bdev.RamDev(1 * MiB, 512, data=b"d" * 8192)
    fd = bdev.FaultDev(inner)
    assert (fd.size, fd.logical_block_size, fd.backend) == (inner.size, 512, "fault")
    fd.fail("read", 4096, 512, errno=errno.EIO, count=2)
    assert fd.pread(512, 0) == b"d" * 512                 # outside the range
    for _ in range(2):
        with pytest.raises(errors.IOFailure):
            fd.pread(1024, 3584)                           # overlaps
    assert fd.pread(1024, 3584) == b"d" * 1024            # count used up
    fd.fail("write", errno=errno.ENOSPC)                   # every write, forever
    for _ in range(3):
        with pytest.raises(errors.NoSpaceError):
            fd.pwrite(b"x" * 512, 0)
    assert inner.contents()[:512] == b"d" * 512, "a failed write must not reach the device"
    fd.fail("flush")
    with pytest.raises(errors.IOFailure):
        fd.flush()
    fd.clear()
    fd.pwrite(b"x" * 512, 0)
    fd.flush()
    assert inner.contents()[:512] == b"x" * 512 and inner.cached_writes == []
    log = fd.log
    assert [e[1] for e in log] == ["read", "read", "read", "read", "write", "write", "write",
                                   "flush", "write", "flush"]
    assert [e[5] for e in log] == [0, -errno.EIO, -errno.EIO, 0, -errno.ENOSPC, -errno.ENOSPC,
                                   -errno.ENOSPC, -errno.EIO, 0, 0]
    assert log[1][2:4] == (3584, 1024)
    assert [e[0] for e in log] == sorted(e[0] for e in log)


def test_fault_any_rule_and_strictness_passthrough():
    inner = bdev.RamDev(64 * 512, 512)
    fd = bdev.FaultDev(inner)
    fd.fail("any", 0, 512, errno=errno.EIO, count=1)
    buf = bdev.aligned_buffer(4096)
    res = run(fd.queue(), [(BIO_FLUSH, 0, 0, None, 0, 0),        # ranged "any" ignores flushes
                           (BIO_WRITE, 0, 0, buf, 0, 512),
                           (BIO_WRITE, 0, 0, buf, 0, 512),
                           (BIO_READ, 0, 0, buf, 3, 512)])      # inner device still strict
    assert [r[0] for r in res] == [0, -errno.EIO, 0, -errno.EINVAL]
    assert all(r[1] == 1 for r in res)


def test_fault_corrupt_reads():
    inner = bdev.RamDev(64 * 512, 512, data=bytes(range(256)) * 64)
    fd = bdev.FaultDev(inner)
    fd.corrupt_reads(1000, 10)
    good = inner.pread(2048, 0)
    bad = fd.pread(2048, 0)
    diff = [i for i in range(2048) if good[i] != bad[i]]
    assert diff == [1000] and bad[1000] == good[1000] ^ 1
    assert fd.pread(512, 0) == good[:512]                  # no overlap: intact
    assert inner.pread(2048, 0) == good                    # the device itself is fine


def test_fault_torn_writes():
    inner = bdev.RamDev(64 * 512, 512, data=b"o" * 8192)
    fd = bdev.FaultDev(inner)
    fd.torn_writes(0, 4096, keep_bytes=1100, count=1)      # rounded down to 1024
    assert fd.pwrite(b"n" * 4096, 0) == 4096               # still reports success
    assert inner.contents()[:4096] == b"n" * 1024 + b"o" * 3072
    fd.pwrite(b"m" * 4096, 0)                              # count used up: whole write
    assert inner.contents()[:4096] == b"m" * 4096
    fd.torn_writes(0, 512, keep_bytes=0)
    fd.pwrite(b"z" * 512, 0)
    assert inner.contents()[:512] == b"m" * 512
    assert fd.log[-1][5] == 0


def test_fault_over_direct(image, backend):
    with bdev.open_device(image, backend=backend) as dev:
        fd = bdev.FaultDev(dev)
        fd.fail("write", 8192, 4096, errno=errno.EIO)
        buf = bdev.aligned_buffer(16 * 4096)
        res = run(fd.queue(), [(BIO_WRITE, 0, i * 4096, buf, i * 4096, 4096) for i in range(16)])
        assert [r[0] for r in res] == [0, 0, -errno.EIO] + [0] * 13
        assert all(r[1] == 1 for r in res)
        res = run(fd.new_queue(reaper=True), [(BIO_READ, 0, i * 4096, buf, 0, 4096) for i in range(4)])
        assert [r[0] for r in res] == [0] * 4
        fd.close()


# ---------------------------------------------------------------------------
# Crash model against a per-block model (Hypothesis)
# ---------------------------------------------------------------------------

_ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 7), st.integers(1, 3), st.booleans(), st.integers(1, 255)),
    st.tuples(st.just("f"))), max_size=25)


@settings(max_examples=60, deadline=None)
@given(ops=_ops, seed=st.integers(0, 2**32 - 1), fua_dev=st.booleans())
def test_crash_images_only_hold_allowed_block_values(ops, seed, fua_dev):
    """Each block of a crash image holds its value at the last flush or a value
    written since, never one older than a FUA write (or a flush) made durable."""
    lbs = 512
    dev = bdev.RamDev(8 * lbs, lbs, fua=fua_dev)
    durable = [0] * 8            # value at the last point that made it durable
    since = [[] for _ in range(8)]  # values written since then, in order
    for op in ops:
        if op[0] == "f":
            dev.flush()
            for b in range(8):
                if since[b]:
                    durable[b] = since[b][-1]
                    since[b] = []
            continue
        _, blk, n, fua, val = op
        n = min(n, 8 - blk)
        dev.pwrite(bytes([val]) * (n * lbs), blk * lbs, fua=fua)
        for b in range(blk, blk + n):
            if fua:
                durable[b], since[b] = val, []
            else:
                since[b].append(val)
        if fua and not fua_dev:
            # emulated FUA = write + full flush
            for b in range(8):
                if since[b]:
                    durable[b] = since[b][-1]
                    since[b] = []
    img = dev.crash(seed)
    cur = dev.contents()
    for b in range(8):
        got = img[b * lbs]
        assert img[b * lbs:(b + 1) * lbs] == bytes([got]) * lbs
        assert got == durable[b] or got in since[b], (b, got, durable[b], since[b])
        assert cur[b * lbs] == (since[b][-1] if since[b] else durable[b])
    assert dev.durable() == b"".join(bytes([durable[b]]) * lbs for b in range(8))


def test_bench_queue_smoke():
    dev = bdev.RamDev(1 << 22, 4096)
    assert bdev._bench_queue(dev, "randwrite", 4096, 8, 0.05, 1 << 22) > 0
    with pytest.raises(errors.InvalidError):
        bdev._bench_queue(dev, "bogus", 4096, 8, 0.05, 1 << 22)


# ---------------------------------------------------------------------------
# Queue hand-over and reaper queues
# ---------------------------------------------------------------------------

def _reads(n, buf, stride=4096):
    return [(BIO_READ, 0, i * stride, buf, i * stride, stride) for i in range(n)]


def test_queue_handover_to_another_thread(image, backend):
    """A private queue submitted on one thread (which then sleeps or exits) and
    reaped on another: completions must still arrive."""
    with bdev.open_device(image, backend=backend) as dev:
        dev.pwrite(bytes(range(256)) * 16 * 32, 0)
        for then_exit in (False, True):
            q = dev.new_queue(depth=16)
            buf = bdev.aligned_buffer(32 * 4096)
            batch = bdev._BioBatch(_reads(32, buf))
            started = threading.Event()

            def submitter(batch=batch, q=q, started=started, then_exit=then_exit):
                batch.submit(q)
                started.set()
                if not then_exit:
                    time.sleep(0.3)

            t = threading.Thread(target=submitter)
            t.start()
            assert started.wait(5)
            if then_exit:
                t.join()
            batch.wait(q)
            t.join()
            assert [r[:2] for r in batch.results()] == [(0, 1)] * 32
            assert bytes(buf) == bytes(range(256)) * 16 * 32
            q.close()


def test_reaper_queue_completes_in_background(image, backend):
    with bdev.open_device(image, backend=backend) as dev:
        q = dev.new_queue(depth=8, reaper=True)
        buf = bdev.aligned_buffer(64 * 4096)
        batch = bdev._BioBatch(_reads(64, buf))
        batch.submit(q)
        deadline = time.monotonic() + 10
        while batch.remaining() and time.monotonic() < deadline:
            time.sleep(0.002)           # nobody reaps here: the reaper thread must
        assert batch.remaining() == 0 and q.inflight == 0
        assert [r[:2] for r in batch.results()] == [(0, 1)] * 64
        # submit/unplug from several threads at once (mutex-protected)
        batches = [bdev._BioBatch(_reads(32, bdev.aligned_buffer(32 * 4096))) for _ in range(4)]
        ts = [threading.Thread(target=b.submit, args=(q, 5)) for b in batches]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for b in batches:
            b.wait(q)
            assert [r[:2] for r in b.results()] == [(0, 1)] * 32
        assert q.wait(0) == 0
        q.close()
        assert q.closed

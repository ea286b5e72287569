"""`ufs demo`: the main job on a default image, narrated.

Layer: top (called by cli.py only).  Uses the public core (ufs.iomap, ufs.vfs) and the test kit's
`layoutfs` personality, because the real personalities are not finished yet; when they are, the
demo becomes mkfs -> mount-image -> copy a tree -> fio verify -> umount -> fsck (issue 5).

What it shows, each step checked (a mismatch raises, so the demo cannot "pass" silently):
1. an O_DIRECT image opened through io_uring (or the thread fallback), its geometry;
2. O_DIRECT|O_DSYNC writes into a hole: the layout allocates unwritten extents flagged NEW, the
   engine zeroes sub-block edges and end_io converts them; read back and compare;
3. asynchronous submission at queue depth 32 (DioBatch), every completion checked;
4. the seed: with lockdep on, a btrfs-like personality whose fsync takes i_rwsem gets EDEADLK
   from the combined dio_rw under i_rwsem, while dio_start + unlock + dio_complete syncs.
"""
from __future__ import annotations

import os
import random
import time

from ufs.errors import DeadlockError
from ufs.iomap import EIOCBQUEUED, Iocb, Kiocb, MapType
from ufs.iomap.bdev import aligned_buffer, open_device
from ufs.iomap.dio import DioBatch, dio_complete, dio_rw, dio_start
from ufs.testing.layoutfs import make_layout_file
from ufs.vfs import lockdep

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'256M' -> bytes (K/M/G/T, powers of two)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    n = t[:-1] if unit else t
    try:
        return int(float(n) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"bad size {text!r}: use a number with K, M, G or T") from None


def _pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def run(image: str | None = None, size: str = "256M", echo=print) -> None:
    nbytes = parse_size(size)
    if nbytes < 64 << 20:
        raise ValueError("the demo needs an image of at least 64M")
    own = image is None
    path = image or os.path.abspath("ufs-demo.img")
    with open(path, "ab") as f:
        f.truncate(nbytes)
    try:
        _run(path, nbytes, echo)
    finally:
        if own:
            os.unlink(path)


def _run(path: str, nbytes: int, echo) -> None:
    dev = open_device(path)
    try:
        echo(f"1. opened {path}: {nbytes >> 20} MiB, backend={dev.backend}, "
             f"logical block {dev.logical_block_size} B, volatile cache={bool(dev.volatile_cache)}, "
             f"FUA={bool(dev.fua)}")
        _hole_writes(dev, echo)
        _async_batch(dev, nbytes, echo)
        _seed(dev, echo)
    finally:
        dev.close()
    echo("done: every step was checked against what was written.")


def _hole_writes(dev, echo) -> None:
    # One 16 MiB file that starts as a hole; device space from 16 MiB on is the allocator's.
    f, ops, dops = make_layout_file(dev, [], 0, alloc_start=16 << 20)
    data = _pattern(1, 1 << 20)
    buf = aligned_buffer(len(data))
    memoryview(buf)[:] = data
    t0 = time.perf_counter()
    done = 0
    for i in range(4):
        iocb = Kiocb(f, i << 20, Iocb.DIRECT | Iocb.WRITE | Iocb.DSYNC)
        done += dio_rw(iocb, buf, ops, dops)
    dt = time.perf_counter() - t0
    types = sorted({MapType(e.type).name for e in f.layout.extents})
    back = bytearray(4 << 20)
    n = dio_rw(Kiocb(f, 0, Iocb.DIRECT), back, ops, dops)
    if n != 4 << 20 or bytes(back) != data * 4:
        raise AssertionError("read-back differs from what was written")
    echo(f"2. wrote {done >> 20} MiB O_DIRECT|O_DSYNC into a hole in {dt * 1e3:.0f} ms "
         f"({f.f_op.calls} fsyncs); extents now {types}; i_size={f.f_inode.i_size}; read back: equal")


def _async_batch(dev, nbytes, echo) -> None:
    span = 64 << 20
    f, ops, dops = make_layout_file(dev, [(0, span, MapType.MAPPED, 0, 64 << 20)], span)
    q = dev.new_queue(64)
    batch = DioBatch(q)
    bufs = [aligned_buffer(4096) for _ in range(32)]
    results = {}
    free = list(range(32))
    rnd = random.Random(7)
    written = {}

    def complete(iocb, res):
        results[iocb.ki_pos] = res
        free.append(iocb.private)

    t0 = time.perf_counter()
    issued = 0
    while issued < 4096:
        while free and issued < 4096:
            i = free.pop()
            pos = rnd.randrange(span // 4096) * 4096
            payload = _pattern(pos, 4096)
            memoryview(bufs[i])[:] = payload
            written[pos] = payload
            batch.issue(Kiocb(f, pos, Iocb.DIRECT | Iocb.WRITE, complete, i), bufs[i], ops, dops)
            issued += 1
        batch.submit()
        batch.wait(1)
    while q.inflight:
        batch.wait(1)
    dt = time.perf_counter() - t0
    bad = [p for p, r in results.items() if r != 4096]
    if bad:
        raise AssertionError(f"{len(bad)} async writes failed: {results[bad[0]]}")
    check = bytearray(4096)
    for pos, payload in written.items():
        dio_rw(Kiocb(f, pos, Iocb.DIRECT), check, ops, dops)
        if bytes(check) != payload:
            raise AssertionError(f"async write at {pos} reads back differently")
    echo(f"3. 4096 random 4 KiB writes at queue depth 32: {issued / dt:,.0f} IOPS; "
         f"{len(written)} distinct blocks read back: equal")


def _seed(dev, echo) -> None:
    # btrfs COW-writes into newly allocated blocks, so its mappings are NEW: no FUA shortcut,
    # and an O_DSYNC write must reach generic_write_sync -> fsync -> i_rwsem.  (A pure
    # overwrite on a FUA-capable device skips the sync entirely; the demo shows that too.)
    f, ops, dops = make_layout_file(dev, [], 0, alloc_start=128 << 20, fsync_takes_i_rwsem=True)
    inode = f.f_inode
    buf = aligned_buffer(4096)
    memoryview(buf)[:] = _pattern(3, 4096)
    flags = Iocb.DIRECT | Iocb.WRITE | Iocb.DSYNC
    with lockdep.checking(fresh=True):
        t0 = time.perf_counter()
        inode.i_rwsem.down_write()
        try:
            dio_rw(Kiocb(f, 0, flags), buf, ops, dops)
            raise AssertionError("the combined path under i_rwsem did not deadlock")
        except DeadlockError as e:
            first = str(e).splitlines()[0]
            echo(f"4. combined dio_rw under i_rwsem, O_DSYNC write into new blocks: EDEADLK after "
                 f"{(time.perf_counter() - t0) * 1e3:.1f} ms: {first}")
        finally:
            inode.i_rwsem.up_write()
        before = f.f_op.calls      # the failed attempt entered fsync once before EDEADLK
        inode.i_rwsem.down_write()
        try:
            dio = dio_start(Kiocb(f, 4096, flags), buf, ops, dops)
        finally:
            inode.i_rwsem.up_write()
        if dio is None or dio == EIOCBQUEUED:
            raise AssertionError(f"dio_start returned {dio!r} for a synchronous write")
        n = dio_complete(dio)
        syncs = f.f_op.calls
        if n != 4096 or syncs != before + 1:
            raise AssertionError(f"split path: {n} bytes, {syncs - before} fsyncs")
        echo(f"   split dio_start + unlock + dio_complete: {n} bytes written, fsync ran "
             f"(taking i_rwsem) once")
        # The same O_DSYNC write as a pure overwrite of written blocks: all bios go out FUA,
        # so no fsync is needed and none runs, even under the lock.
        inode.i_rwsem.down_write()
        try:
            n = dio_rw(Kiocb(f, 4096, flags), buf, ops, dops)
        finally:
            inode.i_rwsem.up_write()
        fua = bool(dev.fua) or not dev.volatile_cache
        if fua and f.f_op.calls != syncs:
            raise AssertionError("FUA overwrite still called fsync")
        echo(f"   O_DSYNC overwrite of written blocks under i_rwsem: {n} bytes, "
             f"{'FUA write, no fsync needed' if fua else 'fsync needed'}")

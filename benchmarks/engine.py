"""The ufs DIO engine on an identity-mapped file: the ufs side of the engine benchmark.

Owns: the identity personality (file offset == device address, one MAPPED extent over the
whole image), and the two drivers: the synchronous Python call (`dio_rw` per I/O, QD1) and the
asynchronous batch API (`DioBatch`, N in flight).  Uses the real VFS objects (Superblock, Inode,
File), so the per-dio host work is what a personality pays.
"""
from __future__ import annotations

import os
import random
import stat
import time

from ufs.iomap import Iocb, IomapOps, Kiocb, MapType
from ufs.iomap.bdev import aligned_buffer, open_device
from ufs.iomap.dio import DioBatch, dio_rw
from ufs.vfs import File, Inode, Superblock


class IdentityOps(IomapOps):
    """One MAPPED extent covering the whole device: the cheapest possible personality."""

    def __init__(self, dev):
        self.dev = dev
        self.size = dev.size

    def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
        iomap.offset = 0
        iomap.length = self.size
        iomap.type = MapType.MAPPED
        iomap.addr = 0
        iomap.bdev = self.dev


class _Fsync:
    """fsync of the identity file: flush the device (O_DSYNC without FUA needs it)."""

    def __init__(self, dev):
        self.dev = dev

    def fsync(self, file, start, end, datasync):
        self.dev.flush()
        return 0


class EngineTarget:
    """An opened image plus an identity file over it."""

    def __init__(self, path: str, backend: str | None = None):
        self.dev = open_device(path, backend=backend)
        self.sb = Superblock(self.dev, 4096)
        inode = Inode(self.sb, 1, stat.S_IFREG | 0o644, size=self.dev.size, blkbits=12)
        self.file = File(inode, os.O_RDWR | os.O_DIRECT, _Fsync(self.dev))
        self.ops = IdentityOps(self.dev)

    def close(self):
        self.sb.shutdown()
        self.dev.close()

    def run(self, w, span: int, runtime_s: float) -> dict:
        """Run workload `w` (benchmarks.fio.Workload) over [0, span) for runtime_s seconds."""
        if w.iodepth == 1:
            n, dt = self._sync(w, span, runtime_s)
        else:
            n, dt = self._batch(w, span, runtime_s)
        return {"iops": n / dt, "mib_s": n * w.bs / dt / (1 << 20)}

    def _flags(self, w) -> int:
        f = Iocb.DIRECT
        if w.is_write:
            f |= Iocb.WRITE
        if w.dsync:
            f |= Iocb.DSYNC
        return f

    def _positions(self, w, span):
        nblk = span // w.bs
        if w.is_random:
            rnd = random.Random(12345)
            while True:
                yield rnd.randrange(nblk) * w.bs
        pos = 0
        while True:
            yield pos
            pos = (pos + w.bs) % (nblk * w.bs)

    def _sync(self, w, span, runtime_s):
        buf = memoryview(aligned_buffer(w.bs))
        flags, ops, filp = self._flags(w), self.ops, self.file
        positions = self._positions(w, span)
        n = 0
        t0 = time.perf_counter()
        end = t0 + runtime_s
        while True:
            for _ in range(32):
                dio_rw(Kiocb(filp, next(positions), flags), buf, ops)
            n += 32
            if time.perf_counter() >= end:
                break
        return n, time.perf_counter() - t0

    def _batch(self, w, span, runtime_s):
        depth = w.iodepth
        # The calling thread's own queue: only this thread submits and reaps, so its ring is
        # set up SINGLE_ISSUER|DEFER_TASKRUN like fio's (completions run inside our own
        # io_uring_enter instead of interrupting us).
        q = self.dev.queue()
        batch = DioBatch(q)
        bufs = [memoryview(aligned_buffer(w.bs)) for _ in range(depth)]
        flags, ops, filp = self._flags(w), self.ops, self.file
        positions = self._positions(w, span)
        free = list(range(depth))
        errors = []
        done = 0

        def complete(iocb, res):
            nonlocal done
            if res != w.bs:
                errors.append(res)
            done += 1
            free.append(iocb.private)

        t0 = time.perf_counter()
        end = t0 + runtime_s
        while True:
            # Submit each I/O as soon as it is queued, as fio does by default
            # (iodepth_batch_submit=1): on virtio disks one io_uring_enter per refill
            # of the whole queue measured ~0.8 of fio, one per I/O ~0.98.
            while free:
                i = free.pop()
                batch.issue(Kiocb(filp, next(positions), flags, complete, i), bufs[i], ops)
                batch.submit()
            batch.wait(1)
            if time.perf_counter() >= end:
                break
        while q.inflight:
            batch.wait(1)
        dt = time.perf_counter() - t0
        if errors:
            raise RuntimeError(f"{len(errors)} I/Os failed in the benchmark, first: {errors[0]}")
        return done, dt

#!/usr/bin/env python3
"""The personalities against the kernel's filesystems, in one process run (issues 3 and 4).

    benchmarks/fs.py [--runtime S] [--rounds N] [--size 3G] [--file-size 1G] [--files N]
                     [--only xfslike|btrfslike] [--workload NAME] [--dir DIR] [--json F]

Owns: the ufs side of the personality benchmark (the public API, ``ufs.api``, driven in-process)
and the table.  Imports ``benchmarks.fio`` (fio, images, the kernel loop mount), ``ufs.api`` and
``ufs.iomap.bdev.aligned_buffer``.  Needs root (loop devices) and fio.

Three sides per (personality, workload), run back to back, ``--rounds`` times interleaved:

- ufs: the personality on its own image (opened O_DIRECT by ufs), through ``ufs.api``.  QD1 is
  the synchronous ``pwrite``/``preadinto`` on an O_DIRECT descriptor with an aligned buffer;
  deeper queues keep ``iodepth`` I/Os in flight with ``submit_pwrite``/``submit_preadinto``
  (one aligned buffer per I/O in flight) + ``reap``, each refill inside ``Filesystem.plug()``
  so it reaches the device in one submission, as fio's io_uring engine submits a refill.
- kernel: XFS (for xfslike) or btrfs (for btrfslike) on a loop device with ``--direct-io=on``,
  fio ``--direct=1 --ioengine=io_uring`` on a file in the mount; create+fsync is a Python loop of
  os.open/os.write/os.fsync/os.close in the mount.
- raw: fio on a preallocated raw image (the device limit; not applicable to create+fsync).

The ratio is the median of the per-round ufs/kernel ratios (this machine is shared and noisy).
Peak RSS is the process's high-water mark during each ufs run (VmHWM, reset through
/proc/self/clear_refs before the run, which on Linux resets ``getrusage``'s ``ru_maxrss`` as
well); the process-wide peak (the maximum over all runs) is printed at the end.
Without ``--only`` each personality runs in a child process of its own, so its peak RSS is
not inflated by the other's.  Every mount and loop device is released in ``finally`` (SIGTERM
and Ctrl-C included).

Workloads (the same for both personalities): 4 KiB random overwrite O_DIRECT at QD1/QD32 of a
fully written file; 4 KiB random writes into holes at QD1/QD32 (a fresh sparse file per round,
unlinked after it; with ``norandommap`` a later write may land on a block written earlier in the
same run, as for fio); 1 MiB sequential write (overwrite) and read at QD8; O_DSYNC 4 KiB random
overwrite at QD1; create+fsync of ``--files`` small files (4 KiB each, a new directory per
round).  btrfslike's O_DSYNC workload also runs once per ``dio_complete=`` strategy.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fio import (  # noqa: E402
    Workload,
    fio_run,
    have_fio,
    kernel_fs,
    machine_info,
    preallocate,
)

#: personality -> the kernel filesystem it is measured against
PAIRS = {"xfslike": "xfs", "btrfslike": "btrfs"}

CREATE = "create-fsync"

#: (kind, workload): "overwrite" runs on the prepared, fully written file; "holes" on a fresh
#: sparse file; "create" is the small-file loop (no fio workload).
WORKLOADS = [
    ("overwrite", Workload("overwrite-4k-qd1", "randwrite", 4096, 1)),
    ("overwrite", Workload("overwrite-4k-qd32", "randwrite", 4096, 32)),
    ("holes", Workload("holes-4k-qd1", "randwrite", 4096, 1)),
    ("holes", Workload("holes-4k-qd32", "randwrite", 4096, 32)),
    ("overwrite", Workload("write-1m-qd8", "write", 1 << 20, 8)),
    ("overwrite", Workload("read-1m-qd8", "read", 1 << 20, 8)),
    ("overwrite", Workload("dsync-4k-qd1", "randwrite", 4096, 1, dsync=True)),
    ("create", None),
]

#: minimum ufs/kernel ratio (issue 3: xfslike, issue 4: btrfslike)
TARGETS = {
    "xfslike": {"overwrite-4k-qd32": 0.8, "write-1m-qd8": 0.8, "read-1m-qd8": 0.8},
    "btrfslike": {"overwrite-4k-qd32": 1.0, "holes-4k-qd32": 1.0, "dsync-4k-qd1": 1.0},
}

#: btrfslike's O_DSYNC run once per completion strategy; ``locked`` is checked for its
#: documented deadlock instead (in a child process, with lockdep so it fails fast)
DIO_COMPLETE_MODES = ("unlocked", "marker")

FILE_PATH = "/bench"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.upper()
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def workload_name(kind: str, w: Workload | None) -> str:
    return CREATE if kind == "create" else w.name


# --- memory ---------------------------------------------------------------------------------------

_PROCESS_PEAK_MIB = 0.0


def _vm_hwm_mib() -> float | None:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    return None


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next read is this run's peak.

    On Linux ``getrusage(RUSAGE_SELF).ru_maxrss`` reads the same high-water mark, so it is
    reset too: the process-wide peak is kept here, from the readings before each reset."""
    global _PROCESS_PEAK_MIB
    _PROCESS_PEAK_MIB = max(_PROCESS_PEAK_MIB, process_peak_rss_mib())
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_rss_mib() -> float:
    """Peak RSS in MiB since the last ``reset_peak_rss`` (VmHWM; getrusage without /proc)."""
    hwm = _vm_hwm_mib()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def process_peak_rss_mib() -> float:
    """The process's peak RSS in MiB across resets."""
    return max(_PROCESS_PEAK_MIB, peak_rss_mib(),
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)


# --- I/O positions ----------------------------------------------------------------------------------

def positions(w: Workload, span: int, seed: int = 12345):
    """Byte offsets of workload `w` over [0, span): uniform random blocks or a wrapping sweep."""
    nblk = span // w.bs
    if w.is_random:
        rnd = random.Random(seed)
        rr = rnd.randrange
        while True:
            yield rr(nblk) * w.bs
    pos = 0
    while True:
        yield pos
        pos += w.bs
        if pos + w.bs > span:
            pos = 0


# --- the ufs side -------------------------------------------------------------------------------------

class UfsTarget:
    """A personality's image, formatted once and mounted through the public API."""

    def __init__(self, fstype: str, image: str, size: int, options: str | None = None):
        import ufs.api as api
        from ufs.iomap.bdev import aligned_buffer

        self.api = api
        self.aligned_buffer = aligned_buffer
        self.fstype = fstype
        self.image = image
        self.fs = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
        self.options = options
        try:
            api.mkfs(image, fstype, size=size)
            self.fs = api.mount(image, options)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(image)
            raise

    def remount(self, options: str | None) -> None:
        if options == self.options and self.fs is not None:
            return
        self.fs.unmount()
        self.fs = None
        self.fs = self.api.mount(self.image, options)
        self.options = options

    def close(self) -> None:
        try:
            if self.fs is not None:
                self.fs.unmount()
        finally:
            self.fs = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.image)

    # -- files ---------------------------------------------------------------------------------
    def prepare(self, path: str, span: int) -> None:
        """Write `path` sequentially in 1 MiB O_DIRECT pieces so overwrites find data."""
        fs = self.fs
        fd = fs.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        try:
            buf = memoryview(self.aligned_buffer(1 << 20))
            for pos in range(0, span, 1 << 20):
                n = fs.pwrite(fd, buf, pos)
                if n != len(buf):
                    raise OSError(f"short write {n} at {pos} while preparing {path}")
            fs.fsync(fd)
        finally:
            fs.close(fd)

    def sparse(self, path: str, span: int) -> None:
        fd = self.fs.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
        try:
            self.fs.ftruncate(fd, span)
        finally:
            self.fs.close(fd)

    def unlink(self, path: str) -> None:
        self.fs.unlink(path)
        self.fs.sync()

    # -- workloads -----------------------------------------------------------------------------
    def run(self, w: Workload, path: str, span: int, runtime_s: float) -> dict:
        flags = (os.O_RDWR if w.is_write else os.O_RDONLY) | os.O_DIRECT
        if w.dsync:
            flags |= os.O_DSYNC
        fd = self.fs.open(path, flags)
        try:
            reset_peak_rss()
            if w.iodepth == 1:
                n, dt = self._sync(fd, w, span, runtime_s)
            else:
                n, dt = self._async(fd, w, span, runtime_s)
            rss = peak_rss_mib()
        finally:
            self.fs.close(fd)
        return {"iops": n / dt, "mib_s": n * w.bs / dt / (1 << 20), "rss_mib": rss}

    def _sync(self, fd, w, span, runtime_s):
        fs, bs = self.fs, w.bs
        buf = memoryview(self.aligned_buffer(bs))
        pos_it = positions(w, span)
        n = 0
        t0 = time.perf_counter()
        end = t0 + runtime_s
        if w.is_write:
            pwrite = fs.pwrite
            while True:
                for _ in range(16):
                    got = pwrite(fd, buf, next(pos_it))
                    if got != bs:
                        raise OSError(f"short write: {got} of {bs}")
                n += 16
                if time.perf_counter() >= end:
                    break
        else:
            # into an aligned buffer, as fio reads: no allocation, no bounce copy
            preadinto = fs.preadinto
            while True:
                for _ in range(16):
                    got = preadinto(fd, buf, next(pos_it))
                    if got != bs:
                        raise OSError(f"short read: {got} of {bs}")
                n += 16
                if time.perf_counter() >= end:
                    break
        return n, time.perf_counter() - t0

    def _async(self, fd, w, span, runtime_s):
        """Keep `iodepth` I/Os in flight: refill after every reap, as fio does."""
        fs, bs, depth = self.fs, w.bs, w.iodepth
        # Writes share one aligned source buffer (its contents do not matter here).
        buf = memoryview(self.aligned_buffer(bs))
        pos_it = positions(w, span)
        submit = fs.submit_pwrite if w.is_write else None
        submit_read = fs.submit_preadinto
        # reads: one aligned buffer per I/O in flight (as fio's iodepth buffers), handed
        # back to the free list when the read completes
        free = [memoryview(self.aligned_buffer(bs)) for _ in range(0 if w.is_write else depth)]
        busy = {}
        reap = fs.reap
        inflight = done = 0
        errors = []

        def account(completions):
            nonlocal done
            for h, res in completions:
                if busy:
                    free.append(busy.pop(h))
                if isinstance(res, BaseException):
                    errors.append(res)
                elif (res if isinstance(res, int) else len(res)) != bs:
                    errors.append(OSError(f"short I/O: {res if isinstance(res, int) else len(res)}"))
                done += 1
            return len(completions)

        t0 = time.perf_counter()
        end = t0 + runtime_s
        plug = fs.plug
        while True:
            # one device submission per refill, as fio's io_uring engine submits the batch
            # it queued since the last reap in one io_uring_enter
            with plug():
                while inflight < depth:
                    if submit is not None:
                        submit(fd, buf, next(pos_it))
                    else:
                        rbuf = free.pop()
                        busy[submit_read(fd, rbuf, next(pos_it))] = rbuf
                    inflight += 1
            inflight -= account(reap(1))
            if errors or time.perf_counter() >= end:
                break
        while inflight:
            inflight -= account(reap(inflight, timeout=60.0))
        dt = time.perf_counter() - t0
        if errors:
            raise OSError(f"{len(errors)} I/Os failed, first: {errors[0]!r}")
        return done, dt

    def create_fsync(self, dirpath: str, nfiles: int) -> dict:
        fs = self.fs
        data = bytes(4096)
        fs.mkdir(dirpath)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        reset_peak_rss()
        t0 = time.perf_counter()
        for i in range(nfiles):
            fd = fs.open(f"{dirpath}/f{i}", flags, 0o644)
            fs.write(fd, data)
            fs.fsync(fd)
            fs.close(fd)
        dt = time.perf_counter() - t0
        return {"iops": nfiles / dt, "rss_mib": peak_rss_mib()}


# --- the kernel side ----------------------------------------------------------------------------------

def kernel_create_fsync(dirpath: str, nfiles: int) -> dict:
    data = bytes(4096)
    os.mkdir(dirpath)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    t0 = time.perf_counter()
    for i in range(nfiles):
        fd = os.open(f"{dirpath}/f{i}", flags, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
    dt = time.perf_counter() - t0
    return {"iops": nfiles / dt}


@contextlib.contextmanager
def kernel_mount(fstype: str, image_size: int, workdir: str):
    """``benchmarks.fio.kernel_fs`` plus a patient unmount: a fio killed mid-run (Ctrl-C,
    SIGTERM) leaves io_uring teardown pending for a moment, so the single ``umount`` in
    ``kernel_fs`` can fail with EBUSY.  Its ``losetup -d`` has then set autoclear on the loop
    device, so unmounting here (retrying, lazily as the last resort) also releases it."""
    mnt = None
    try:
        with kernel_fs(fstype, image_size, workdir) as mnt:
            yield mnt
    finally:
        if mnt is not None and os.path.ismount(mnt):
            for _ in range(50):
                if subprocess.run(["umount", mnt], capture_output=True).returncode == 0:
                    break
                time.sleep(0.2)
            else:
                subprocess.run(["umount", "-l", mnt], capture_output=True)
            with contextlib.suppress(OSError):
                os.rmdir(mnt)


def locked_dsync_check(image: str, size: int, timeout_s: float = 60.0) -> str:
    """What ``dio_complete=locked`` does with an O_DSYNC write, in a child process: it is
    expected to deadlock (lockdep turns the self-deadlock into EDEADLK)."""
    code = f"""
import errno, os, sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import ufs.api as api
from ufs.iomap.bdev import aligned_buffer
api.mkfs({image!r}, "btrfslike", size={size})
fs = api.mount({image!r}, "dio_complete=locked,lockdep")
try:
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | os.O_DIRECT | os.O_DSYNC, 0o644)
    try:
        fs.pwrite(fd, memoryview(aligned_buffer(4096)), 0)
        print("completed")
    except OSError as e:
        print("EDEADLK" if e.errno == errno.EDEADLK else f"error {{e!r}}")
finally:
    try:
        fs.unmount()
    except Exception:
        pass
"""
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"hung (no completion after {timeout_s:.0f} s): the deadlock, without lockdep"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
    out = (p.stdout.strip().splitlines() or [""])[-1]
    if out == "EDEADLK":
        return "deadlocks by design: lockdep reports EDEADLK on the first O_DSYNC write"
    if p.returncode != 0:
        return f"child failed rc={p.returncode}: {p.stderr.strip().splitlines()[-1:]}"
    return f"unexpected: {out}"


# --- the run ------------------------------------------------------------------------------------------

class Table:
    def __init__(self):
        self.rows = []
        print(f"{'personality':<11} {'workload':<34} {'ufs IOPS':>9} {'kernel':>9} {'raw fio':>9} "
              f"{'ratio':>6} {'target':>6}      {'ufs RSS':>8}  rounds (ufs/kernel)", flush=True)

    def add(self, pers, name, ufs, kern, raw, target, rss):
        ratios = [u / k for u, k in zip(ufs, kern)]
        ratio = statistics.median(ratios)
        mark = "" if target is None else ("ok" if ratio >= target else "MISS")
        raw_s = f"{statistics.median(raw):>9.0f}" if raw else f"{'-':>9}"
        print(f"{pers:<11} {name:<34} {statistics.median(ufs):>9.0f} {statistics.median(kern):>9.0f} "
              f"{raw_s} {ratio:>6.2f} {target if target else '-':>6} {mark:<4} {max(rss):>6.0f}MiB"
              f"  [{' '.join(f'{r:.2f}' for r in ratios)}]", flush=True)
        self.rows.append({"personality": pers, "workload": name, "ufs_iops": ufs,
                          "kernel_iops": kern, "raw_iops": raw, "ratios": ratios,
                          "median_ratio": ratio, "target": target, "ufs_peak_rss_mib": rss})

    def fail(self, pers, name, why):
        print(f"{pers:<11} {name:<34} FAILED: {why}", flush=True)
        self.rows.append({"personality": pers, "workload": name, "error": why})


def run_personality(pers: str, args, table: Table, raw_img: str) -> None:
    kfs = PAIRS[pers]
    span, rounds, rt = args.file_size, args.rounds, args.runtime
    targets = TARGETS.get(pers, {})
    image = os.path.join(args.dir, f"ufs-{pers}.img")
    ufs = None
    try:
        try:
            ufs = UfsTarget(pers, image, args.size)
        except Exception as e:          # noqa: BLE001 - a personality still being finished
            print(f"# {pers}: skipped: mkfs/mount failed: {e!r} "
                  f"(rerun later with --only {pers})", flush=True)
            return
        with kernel_mount(kfs, args.size, args.dir) as mnt:
            kfile = os.path.join(mnt, "bench")
            t0 = time.perf_counter()
            preallocate(kfile, span)
            t1 = time.perf_counter()
            ufs.prepare(FILE_PATH, span)
            t2 = time.perf_counter()
            print(f"# {pers}: prepared a {span >> 20} MiB file: kernel {kfs} {t1 - t0:.1f} s, "
                  f"ufs {t2 - t1:.1f} s", flush=True)
            for kind, w in WORKLOADS:
                name = workload_name(kind, w)
                if args.workload and args.workload not in name:
                    continue
                try:
                    _run_workload(pers, kind, w, ufs, mnt, kfile, raw_img, span, rounds, rt,
                                  args, table, targets.get(name))
                    # before create-fsync, whose thousands of inodes would weigh on the RSS
                    if pers == "btrfslike" and name == "dsync-4k-qd1":
                        _dio_complete_strategies(ufs, mnt, kfile, raw_img, span, rounds, rt,
                                                 args, table)
                except Exception as e:      # noqa: BLE001 - report and go on
                    why = repr(e)
                    if isinstance(e, subprocess.CalledProcessError) and e.stderr:
                        why = f"{e.cmd[0]} exited {e.returncode}: {str(e.stderr).strip()[-300:]}"
                    table.fail(pers, name, why)
    finally:
        if ufs is not None:
            ufs.close()


def _run_workload(pers, kind, w, ufs, mnt, kfile, raw_img, span, rounds, rt, args, table, tgt):
    ufs_v, kern_v, raw_v, rss_v = [], [], [], []
    for r in range(rounds):
        if kind == "create":
            kern_v.append(kernel_create_fsync(os.path.join(mnt, f"c{r}"), args.files)["iops"])
            u = ufs.create_fsync(f"/c{r}", args.files)
        else:
            raw_v.append(fio_run(raw_img, w, span, rt)["iops"])
            if kind == "holes":
                kpath, upath = os.path.join(mnt, "holes"), "/holes"
                with open(kpath, "wb") as f:
                    f.truncate(span)
                try:
                    kern_v.append(fio_run(kpath, w, span, rt)["iops"])
                finally:
                    os.unlink(kpath)
                ufs.sparse(upath, span)
                try:
                    u = ufs.run(w, upath, span, rt)
                finally:
                    ufs.unlink(upath)
            else:
                kern_v.append(fio_run(kfile, w, span, rt)["iops"])
                u = ufs.run(w, FILE_PATH, span, rt)
        ufs_v.append(u["iops"])
        rss_v.append(u["rss_mib"])
    table.add(pers, workload_name(kind, w), ufs_v, kern_v, raw_v, tgt, rss_v)


def _dio_complete_strategies(ufs, mnt, kfile, raw_img, span, rounds, rt, args, table):
    """O_DSYNC 4 KiB QD1 once per dio_complete= strategy, each beside kernel btrfs."""
    w = Workload("dsync-4k-qd1", "randwrite", 4096, 1, dsync=True)
    res = {m: [] for m in DIO_COMPLETE_MODES}
    rss = {m: [] for m in DIO_COMPLETE_MODES}
    kern_v, raw_v = [], []
    try:
        for _ in range(rounds):
            raw_v.append(fio_run(raw_img, w, span, rt)["iops"])
            kern_v.append(fio_run(kfile, w, span, rt)["iops"])
            for m in DIO_COMPLETE_MODES:
                ufs.remount(f"dio_complete={m}")
                u = ufs.run(w, FILE_PATH, span, rt)
                res[m].append(u["iops"])
                rss[m].append(u["rss_mib"])
        for m in DIO_COMPLETE_MODES:
            table.add("btrfslike", f"dsync-4k-qd1 dio_complete={m}", res[m], kern_v, raw_v,
                      TARGETS["btrfslike"]["dsync-4k-qd1"], rss[m])
    finally:
        ufs.remount(None)
    verdict = locked_dsync_check(os.path.join(args.dir, "ufs-locked-check.img"), 64 << 20)
    print(f"{'btrfslike':<11} {'dsync-4k-qd1 dio_complete=locked':<34} {verdict}", flush=True)
    table.rows.append({"personality": "btrfslike", "workload": "dsync-4k-qd1 dio_complete=locked",
                       "result": verdict})


def _on_signal(signum, _frame):
    """First SIGTERM/SIGINT: unwind through the finally blocks (umount, losetup -d); later
    ones are ignored so they cannot cut that cleanup short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    sys.exit(128 + signum)


def _child_argv(args, pers: str, json_path: str) -> list:
    argv = [sys.executable, os.path.abspath(__file__), "--runtime", str(args.runtime),
            "--rounds", str(args.rounds), "--size", str(args.size),
            "--file-size", str(args.file_size), "--files", str(args.files), "--dir", args.dir,
            "--only", pers, "--json", json_path, "--child"]
    if args.workload:
        argv += ["--workload", args.workload]
    return argv


def _run_child(argv) -> int:
    p = subprocess.Popen(argv)
    try:
        return p.wait()
    except KeyboardInterrupt:
        p.wait()                # the child got the same SIGINT and is cleaning up
        raise
    except BaseException:
        p.terminate()           # SIGTERM: the child unwinds through its finally blocks
        p.wait()
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per run (default 3)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--size", default="3G", help="ufs and kernel image size (default 3G)")
    ap.add_argument("--file-size", default="1G",
                    help="span of the benchmark file and of the raw image (default 1G)")
    ap.add_argument("--files", type=int, default=10000, help="files for create+fsync (10000)")
    ap.add_argument("--dir", default=os.path.join(os.getcwd(), ".bench"), help="work directory")
    ap.add_argument("--only", default=None, choices=sorted(PAIRS), help="one personality")
    ap.add_argument("--workload", default=None, help="run workloads whose name contains this")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.size, args.file_size = parse_size(args.size), parse_size(args.file_size)
    if not have_fio():
        print("fio is not installed (make installs it as root)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("needs root (loop devices for the kernel filesystems)", file=sys.stderr)
        return 2
    if args.file_size * 3 > args.size:
        # copy-on-write needs the room, and kernel btrfs's DUP metadata chunks take a lot
        # of a small image (a 128 MiB file in 512 MiB runs kernel btrfs out of space)
        print("--size must be at least 3 x --file-size", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    os.makedirs(args.dir, exist_ok=True)
    raw_img = os.path.join(args.dir, "raw.img")
    preallocate(raw_img, args.file_size)
    info = machine_info() | {"image_size": args.size, "file_size": args.file_size,
                             "runtime_s": args.runtime, "rounds": args.rounds,
                             "files": args.files, "kernel_loop": "--direct-io=on",
                             "fio": "--direct=1 --ioengine=io_uring"}
    if not args.child:
        print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    if args.only is None:
        # One child process per personality, so each one's peak RSS is its own (memory
        # freed by one personality is not returned to the OS before the next one runs).
        rows, rc = [], 0
        for pers in PAIRS:
            jpath = os.path.join(args.dir, f"fs-{pers}.json")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(jpath)
            rc = _run_child(_child_argv(args, pers, jpath)) or rc
            with contextlib.suppress(FileNotFoundError, ValueError):
                with open(jpath) as fh:
                    rows += json.load(fh)["results"]
                os.unlink(jpath)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"machine": info, "results": rows}, fh, indent=2)
        return rc
    table = Table()
    run_personality(args.only, args, table, raw_img)
    maxrss = process_peak_rss_mib()
    print(f"# {args.only}: process peak RSS: {maxrss:.0f} MiB", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "results": table.rows, "ru_maxrss_mib": maxrss}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`ufs demo`: the main job on a default image, narrated.

Layer: top (called by cli.py only).  Two flows, each step checked (a mismatch raises, so the
demo cannot "pass" silently):

The main job (when FUSE works here: root or fusermount3, /dev/fuse, pyfuse3), through the
public commands' functions:
1. mkfs a scratch image with a personality (default btrfslike) and show its geometry;
2. mount-image it through FUSE (a background daemon);
3. copy a tree in (the ufs sources) with ordinary file I/O and compare every file;
4. a short fio job with --direct=1 and --verify=crc32c through the mount (io_uring);
5. umount (waits for the image to be cleanly closed), then fsck: must be clean;
6. mount again read-only and compare the tree again.

The engine demonstration (fallback when FUSE is unavailable, or ``engine=True``): uses the
public core (ufs.iomap, ufs.vfs) and the test kit's `layoutfs` personality:
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


def run(image: str | None = None, size: str = "256M", echo=print, *, engine: bool = False,
        fstype: str = "btrfslike") -> None:
    nbytes = parse_size(size)
    if nbytes < 64 << 20:
        raise ValueError("the demo needs an image of at least 64M")
    why = None if not engine else "asked for the engine demonstration"
    if why is None:
        from ufs.fuse.mount import fuse_available
        why = fuse_available()
        if why is None and os.geteuid() != 0:
            why = "not root"
    own = image is None
    path = os.path.abspath(image or "ufs-demo.img")
    if why is None:
        if own and os.path.exists(path):
            os.unlink(path)
        try:
            _run_fuse(path, nbytes, fstype, echo)
        finally:
            if own and os.path.exists(path):
                os.unlink(path)
        return
    echo(f"(FUSE flow unavailable: {why}; running the engine demonstration)")
    with open(path, "ab") as f:
        f.truncate(nbytes)
    try:
        _run(path, nbytes, echo)
    finally:
        if own:
            os.unlink(path)


def _tree_digest(top: str) -> dict:
    import hashlib
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, top)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def _copy_tree(src: str, dst: str, echo) -> tuple[int, int]:
    """Copy ``src`` to ``dst`` file by file (progress bar on a terminal); (files, bytes)."""
    import shutil
    import sys

    files = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        files += [os.path.join(rel, n) for n in sorted(filenames)]
    total = 0

    def one(rel):
        nonlocal total
        s, d = os.path.join(src, rel), os.path.join(dst, rel)
        if os.path.islink(s):
            os.symlink(os.readlink(s), d)
        else:
            shutil.copy2(s, d)
            total += os.path.getsize(s)

    if sys.stdout.isatty():
        import click
        with click.progressbar(files, label="   copying") as bar:
            for rel in bar:
                one(rel)
    else:
        for rel in files:
            one(rel)
    return len(files), total


def _run_fuse(path: str, nbytes: int, fstype: str, echo) -> None:
    import json
    import shutil
    import subprocess
    import tempfile

    from ufs import api
    from ufs.fuse import mount as fmount

    api.mkfs(path, fstype, size=nbytes)
    with api.mount(path, readonly=True) as fs:
        st = fs.statvfs()
    echo(f"1. mkfs -t {fstype}: {path}, {nbytes >> 20} MiB, block size {st.f_bsize}, "
         f"{st.f_blocks} blocks ({st.f_bfree} free)")
    mp = tempfile.mkdtemp(prefix="ufs-demo-mnt-")
    mounted = False
    ok = False
    try:
        res = fmount.mount_image(path, mp)
        mounted = True
        info = fmount.find_mount(mp)
        echo(f"2. mount-image: {info['source']} on {mp} type {info['fstype']} "
             f"(daemon pid {res['pid']})")
        src = os.path.dirname(os.path.abspath(__file__))
        t0 = time.perf_counter()
        nfiles, nb = _copy_tree(src, os.path.join(mp, "ufs-src"), echo)
        dt = time.perf_counter() - t0
        want = _tree_digest(src)
        want = {k: v for k, v in want.items() if "__pycache__" not in k}
        got = _tree_digest(os.path.join(mp, "ufs-src"))
        if got != want:
            bad = sorted(set(got.items()) ^ set(want.items()))[:3]
            raise AssertionError(f"copied tree differs: {bad}")
        echo(f"3. copied {nfiles} files ({nb / 2**20:.1f} MiB) in {dt:.2f} s through the mount; "
             f"every file compared: equal")
        fio = shutil.which("fio")
        if fio:
            cmd = [fio, "--output-format=json", "--name=demo", "--filename=fio.dat",
                   "--size=16M", "--bs=4k", "--rw=randwrite", "--direct=1",
                   "--ioengine=io_uring", "--iodepth=32", "--verify=crc32c", "--do_verify=1"]
            r = subprocess.run(cmd, cwd=mp, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise AssertionError(f"fio failed: {r.stderr.strip()[-500:]}")
            job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
            if job["error"]:
                raise AssertionError(f"fio job error {job['error']}")
            echo(f"4. fio --direct=1 --ioengine=io_uring --iodepth=32 4k randwrite 16 MiB, "
                 f"verify=crc32c: write {job['write']['iops']:,.0f} IOPS, verify read "
                 f"{job['read']['iops']:,.0f} IOPS, no verify errors")
        else:
            echo("4. (fio not installed: direct-I/O verify job skipped)")
        u = fmount.umount(mp)
        mounted = False
        report = api.fsck(path, repair=False)
        if not report.clean:
            raise AssertionError(f"fsck found problems: {report.errors[:3]}")
        echo(f"5. umount: image closed cleanly in {u['seconds']:.2f} s; fsck -n: clean "
             f"({', '.join(f'{k}={v}' for k, v in report.stats.items() if not isinstance(v, (list, dict)))})")
        fmount.mount_image(path, mp, "ro")
        mounted = True
        again = _tree_digest(os.path.join(mp, "ufs-src"))
        if again != want:
            raise AssertionError("the tree differs after remount")
        fmount.umount(mp)
        mounted = False
        echo("6. mounted again read-only: the tree is identical")
        ok = True
    finally:
        if mounted:
            try:
                fmount.umount(mp, lazy=True, timeout=30)
            except OSError as e:
                echo(f"warning: cleanup unmount failed: {e}")
        try:
            os.rmdir(mp)
        except OSError:
            pass
        if ok:          # the daemon's log is only interesting when something went wrong
            try:
                os.unlink(fmount.default_log_path(mp))
            except OSError:
                pass
    echo("done: every step was checked against what was written.")


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

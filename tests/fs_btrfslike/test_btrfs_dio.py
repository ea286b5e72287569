"""btrfslike DIO: data checksums (EIO, never bad bytes; stable bounce copies), the seed's three
completion strategies (durability, the EDEADLK reproduction, the per-task fsync marker),
inode_dio_end before the dsync fsync (fallocate/truncate racing a completing write), O_APPEND
and asynchronous O_DSYNC writes.  Everything goes through ``ufs.api`` on RamDev/FaultDev.
"""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from ufs import api
from ufs.errors import DeadlockError
from ufs.fs_btrfslike import plugin
from ufs.fs_btrfslike.inode import extent_items
from ufs.iomap import FaultDev, RamDev
from ufs.vfs import lockdep

P = plugin.PERSONALITY
SIZE = 64 << 20
BS = 4096
DIO = os.O_RDWR | os.O_CREAT | os.O_DIRECT
DSYNC_DIO = DIO | os.O_DSYNC
STRATEGIES = ["unlocked", "locked", "marker"]


def _dev(fua=True):
    d = RamDev(SIZE, 512, fua=fua, volatile_cache=True)
    api.mkfs(d, personality=P)
    return d


def _pattern(n, seed):
    return bytes((i * 7 + seed) % 251 for i in range(n))


def _extents(fs, path):
    inode = fs.namei.lookup_path(path) if hasattr(fs.namei, "lookup_path") else None
    if inode is None:
        fd = fs.open(path, os.O_RDONLY)
        inode = fs.fdtable.get(fd).f_inode
        fs.close(fd)
    sb = fs.sb
    with sb.tm.lock:
        return [(p, fe) for p, fe in extent_items(sb.tm.tree(inode.tree_id), inode.objectid,
                                                  0, 1 << 62)]


def _mount_crashed(dev, **kw):
    img = dev.crash(keep_probability=0.0)          # every unflushed, non-FUA write lost
    return RamDev(SIZE, 512, data=img, **kw)


# --- checksums ------------------------------------------------------------------------------------

def test_flipped_bit_gives_eio_never_bad_data_and_fsck_names_it():
    ram = _dev()
    data = _pattern(4 * BS, 3)
    with api.mount(ram, personality=P) as fs:
        fd = fs.open("/f", DIO)
        assert fs.pwrite(fd, data, 0) == len(data)
        fs.close(fd)
        (_pos, fe), = _extents(fs, "/f")
    bad_addr = fe.disk_bytenr + 2 * BS + 100        # inside the third sector
    fdev = FaultDev(ram)
    fdev.corrupt_reads(bad_addr, 1)
    with api.mount(fdev, personality=P) as fs:
        for flags in (os.O_RDONLY, os.O_RDONLY | os.O_DIRECT):
            fd = fs.open("/f", flags)
            assert fs.pread(fd, BS, 0) == data[:BS]          # other sectors still readable
            with pytest.raises(OSError) as ei:
                fs.pread(fd, 4 * BS, 0)
            assert ei.value.errno == errno.EIO and f"{bad_addr - 100:#x}" in str(ei.value)
            with pytest.raises(OSError):
                fs.pread(fd, 10, 2 * BS + 5)                  # a sub-sector read of it too
            fs.close(fd)
    # the same flip on the image itself: fsck reports the sector's address
    img = bytearray(ram.contents())
    img[bad_addr] ^= 1
    rep = api.fsck(RamDev(SIZE, 512, data=bytes(img)), personality=P)
    assert not rep.clean
    assert any(f"{bad_addr - 100:#x}" in e and "crc32c" in e for e in rep.errors), rep.errors


def test_async_direct_reads_are_verified_before_they_complete():
    """Aligned O_DIRECT reads go straight into the caller's buffer, asynchronously; the
    csum check runs in the dio's end_io, so the reaped result of a read over the flipped
    sector is EIO (the other reads complete with their bytes)."""
    from ufs.iomap.bdev import aligned_buffer

    ram = _dev()
    data = _pattern(8 * BS, 5)
    with api.mount(ram, personality=P) as fs:
        fd = fs.open("/f", DIO)
        assert fs.pwrite(fd, data, 0) == len(data)
        fs.close(fd)
        (_pos, fe), = _extents(fs, "/f")
    fdev = FaultDev(ram)
    fdev.corrupt_reads(fe.disk_bytenr + 5 * BS + 7, 1)          # sector 5
    with api.mount(fdev, personality=P) as fs:
        fd = fs.open("/f", os.O_RDONLY | os.O_DIRECT)
        bufs = [aligned_buffer(BS) for _ in range(8)]
        with fs.plug():
            hs = {fs.submit_preadinto(fd, bufs[i], i * BS): i for i in range(8)}
        got = {}
        while len(got) < 8:
            for h, res in fs.reap(8 - len(got), timeout=10):
                got[hs[h]] = res
        for i in range(8):
            if i == 5:
                assert isinstance(got[i], OSError) and got[i].errno == errno.EIO, got[i]
            else:
                assert got[i] == BS and bytes(bufs[i]) == data[i * BS:(i + 1) * BS]
        # a multi-sector async read covering it fails whole
        big = aligned_buffer(8 * BS)
        h = fs.submit_preadinto(fd, big, 0)
        [(h2, res)] = fs.reap(1, timeout=10)
        assert h2 is h and isinstance(res, OSError) and res.errno == errno.EIO
        fs.close(fd)


def test_nodatasum_file_is_not_verified():
    ram = _dev()
    with api.mount(ram, personality=P, options="nodatasum") as fs:
        fd = fs.open("/f", DIO)
        fs.pwrite(fd, b"A" * BS, 0)
        fs.close(fd)
        (_, fe), = _extents(fs, "/f")
    fdev = FaultDev(ram)
    fdev.corrupt_reads(fe.disk_bytenr, 1)
    with api.mount(fdev, personality=P) as fs:
        fd = fs.open("/f", os.O_RDONLY | os.O_DIRECT)
        assert fs.pread(fd, BS, 0) == b"@" + b"A" * (BS - 1)    # 'A' ^ 1: no csum to catch it


def test_dio_write_checksums_the_stable_bounce_copy():
    """The caller scribbles over its buffer while the write is in flight (after the engine
    took its bounce copy): the checksum matches what reached the device, so no EIO later."""
    ram = _dev()
    with api.mount(ram, personality=P) as fs:
        fd = fs.open("/f", DIO)
        buf = bytearray(_pattern(2 * BS, 1))
        original = bytes(buf)
        fops = fs.sb.fops
        real = fops.map_ops.iomap_begin

        def scribble(*a):
            real(*a)
            buf[:] = b"\xee" * len(buf)     # after mapping, before/while bios are built
        fops.map_ops.iomap_begin = scribble
        try:
            n = fs.pwrite(fd, buf, 0)
        finally:
            del fops.map_ops.iomap_begin
        assert n == 2 * BS
        got = fs.pread(fd, 2 * BS, 0)       # verified read: no EIO
        assert got in (original, b"\xee" * (2 * BS))
        fs.close(fd)
    assert api.fsck(ram, personality=P).clean


# --- the seed: completion strategies -------------------------------------------------------------

@pytest.mark.parametrize("fua", [True, False])
@pytest.mark.parametrize("mode", ["unlocked", "marker"])
def test_odsync_dio_write_is_durable(mode, fua):
    ram = _dev(fua)
    data = _pattern(3 * BS, 9)
    with lockdep.checking(True, fresh=True):
        fs = api.mount(ram, personality=P, options=f"dio_complete={mode}")
        fd = fs.open("/f", DSYNC_DIO)
        assert fs.pwrite(fd, data, BS) == len(data)
        crashed = _mount_crashed(ram)           # power cut right after the write returned
        fs.close(fd)
        fs.unmount()
    assert api.fsck(crashed, personality=P).clean
    with api.mount(crashed, personality=P) as fs2:
        fd = fs2.open("/f", os.O_RDONLY)
        assert fs2.fstat(fd).st_size == 4 * BS
        assert fs2.pread(fd, 4 * BS, 0) == bytes(BS) + data


def test_locked_strategy_without_dsync_is_durable_after_fsync():
    ram = _dev()
    with lockdep.checking(True, fresh=True):
        fs = api.mount(ram, personality=P, options="dio_complete=locked")
        fd = fs.open("/f", DIO)
        fs.pwrite(fd, b"L" * BS, 0)
        fs.fsync(fd)
        crashed = _mount_crashed(ram)
        fs.close(fd)
        fs.unmount()
    with api.mount(crashed, personality=P) as fs2:
        assert fs2.pread(fs2.open("/f", os.O_RDONLY), BS, 0) == b"L" * BS


def test_locked_strategy_with_dsync_is_edeadlk_at_once_under_lockdep():
    ram = _dev()
    with lockdep.checking(True, fresh=True):
        fs = api.mount(ram, personality=P, options="dio_complete=locked,lockdep")
        try:
            fd = fs.open("/f", DSYNC_DIO)
            t0 = time.monotonic()
            with pytest.raises(DeadlockError) as ei:
                fs.pwrite(fd, b"D" * BS, 0)
            assert time.monotonic() - t0 < 2.0
            msg = str(ei.value)
            assert ei.value.errno == errno.EDEADLK and "inode.i_rwsem" in msg
            assert "write_iter" in msg and "fsync" in msg      # both acquisition sites
            assert not fs.fdtable.get(fd).f_inode.i_rwsem.is_locked()   # released on the way out
            fs.close(fd)
        finally:
            fs.unmount()
    assert api.fsck(ram, personality=P).clean


def test_locked_strategy_with_dsync_hangs_and_the_watchdog_reports_it():
    """lockdep off: the same self-deadlock is caught by the hung-task watchdog (panic mode
    turns the report into DeadlockError in the waiter, so the test ends)."""
    ram = _dev()
    with lockdep.checking(False), lockdep.hung_task(0.3, panic=True) as wd:
        fs = api.mount(ram, personality=P, options="dio_complete=locked")
        try:
            fd = fs.open("/f", DSYNC_DIO)
            before = wd.reports
            t0 = time.monotonic()
            with pytest.raises(DeadlockError) as ei:
                fs.pwrite(fd, b"H" * BS, 0)
            assert 0.25 < time.monotonic() - t0 < 5.0
            assert "inode.i_rwsem" in str(ei.value) and wd.reports > before
            fs.close(fd)
        finally:
            fs.unmount()


@pytest.mark.parametrize("mode", STRATEGIES)
def test_concurrent_dio_writes_and_fsyncs_on_one_file(mode):
    ram = _dev()
    nthreads, per = 4, 6
    errors = []
    dsync = mode != "locked"                     # locked + O_DSYNC is the deadlock above
    with lockdep.checking(True, fresh=True):
        fs = api.mount(ram, personality=P, options=f"dio_complete={mode}")
        fd = fs.open("/f", DSYNC_DIO if dsync else DIO)

        def writer(t):
            try:
                for i in range(per):
                    off = (t * per + i) * 2 * BS
                    assert fs.pwrite(fd, _pattern(2 * BS, t * 31 + i), off) == 2 * BS
                    if i % 2:
                        fs.fsync(fd)
            except BaseException as e:      # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert not any(th.is_alive() for th in threads), "writers hung"
        assert not errors, errors
        fs.fsync(fd)
        crashed = _mount_crashed(ram)
        fs.close(fd)
        fs.unmount()
    assert api.fsck(crashed, personality=P).clean
    with api.mount(crashed, personality=P) as fs2:
        fd = fs2.open("/f", os.O_RDONLY)
        for t in range(nthreads):
            for i in range(per):
                off = (t * per + i) * 2 * BS
                assert fs2.pread(fd, 2 * BS, off) == _pattern(2 * BS, t * 31 + i)


def test_marker_is_per_task_not_per_file():
    """While thread A completes its write under i_rwsem with the marker set, thread B's fsync
    on the *same file* must still wait for i_rwsem (a per-file flag would let it skip the lock
    and run concurrently with A's completion: btrfs cd9253c23aed)."""
    ram = _dev()
    with lockdep.checking(True, fresh=True):
        fs = api.mount(ram, personality=P, options="dio_complete=marker")
        fd = fs.open("/f", DSYNC_DIO)
        b_done = threading.Event()
        b_blocked = []

        def b_fsync():
            fs.fsync(fd)
            b_done.set()

        def in_completion(inode):
            fs.sb.fault_hooks.clear()
            tb = threading.Thread(target=b_fsync)
            tb.start()
            time.sleep(0.3)
            b_blocked.append(not b_done.is_set())
        fs.sb.fault_hooks["dio_end_io"] = in_completion
        assert fs.pwrite(fd, b"M" * BS, 0) == BS
        assert b_done.wait(10), "B's fsync never finished"
        assert b_blocked == [True], "B's fsync ran while A held i_rwsem (marker leaked)"
        fs.close(fd)
        fs.unmount()


@pytest.mark.parametrize("op", ["truncate", "fallocate"])
def test_truncate_or_fallocate_racing_a_completing_dsync_write(op):
    """unlocked strategy: A's completion runs end_io while B holds i_rwsem in inode_dio_wait;
    inode_dio_end comes before A's fsync takes i_rwsem, so both finish (sem §1 item 3)."""
    ram = _dev()
    with lockdep.checking(True, fresh=True):
        fs = api.mount(ram, personality=P, options="dio_complete=unlocked")
        fd = fs.open("/f", DSYNC_DIO)
        fs.pwrite(fd, b"0" * 4 * BS, 0)
        inode = fs.fdtable.get(fd).f_inode
        b_done = threading.Event()
        b_err = []

        def b_op():
            try:
                if op == "truncate":
                    fs.ftruncate(fd, 2 * BS)
                else:
                    fs.fallocate(fd, 0, 8 * BS, 4 * BS)
            except BaseException as e:      # noqa: BLE001
                b_err.append(e)
            b_done.set()

        def in_end_io(ino):
            fs.sb.fault_hooks.clear()
            threading.Thread(target=b_op).start()
            deadline = time.monotonic() + 5
            while not ino.i_rwsem.is_write_locked() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            assert ino.i_rwsem.is_write_locked() and not b_done.is_set()   # B waits for us
        fs.sb.fault_hooks["dio_end_io"] = in_end_io
        t0 = time.monotonic()
        assert fs.pwrite(fd, b"1" * BS, 0) == BS
        assert b_done.wait(10) and not b_err, b_err
        assert time.monotonic() - t0 < 10
        assert inode.i_dio_count == 0
        size = fs.fstat(fd).st_size
        assert size == (2 * BS if op == "truncate" else 12 * BS)
        assert fs.pread(fd, BS, 0) == b"1" * BS
        fs.close(fd)
        fs.unmount()
    assert api.fsck(ram, personality=P).clean


# --- O_APPEND and async ----------------------------------------------------------------------------

def test_o_append_dio_sizes_from_threads():
    ram = _dev()
    with api.mount(ram, personality=P) as fs:
        fd = fs.open("/log", DIO | os.O_APPEND)
        errs = []

        def appender(t):
            try:
                for _i in range(8):
                    assert fs.write(fd, bytes([65 + t]) * BS) == BS
            except BaseException as e:      # noqa: BLE001
                errs.append(e)
        ths = [threading.Thread(target=appender, args=(t,)) for t in range(3)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(30)
        assert not errs, errs
        assert fs.fstat(fd).st_size == 24 * BS
        body = fs.pread(fd, 24 * BS, 0)
        chunks = [body[i:i + BS] for i in range(0, len(body), BS)]
        assert all(c == c[:1] * BS for c in chunks)               # no torn/overlapped chunk
        assert sorted(c[0] for c in chunks) == sorted([65, 66, 67] * 8)
        # an O_APPEND DIO at an unaligned EOF goes through read-modify-write
        fs.write(fd, b"x" * 100)
        fs.write(fd, b"y" * BS)
        assert fs.fstat(fd).st_size == 25 * BS + 100
        assert fs.pread(fd, BS + 100, 24 * BS) == b"x" * 100 + b"y" * BS
    assert api.fsck(ram, personality=P).clean


def test_async_odsync_write_is_synced_by_the_completion():
    ram = _dev()
    fs = api.mount(ram, personality=P)
    try:
        fd = fs.open("/a", DSYNC_DIO)
        hs = [fs.submit_pwrite(fd, _pattern(BS, i), i * BS) for i in range(4)]
        done = []
        while len(done) < 4:
            done += fs.reap(1, timeout=10)
        assert sorted(r for _, r in done) == [BS] * 4
        crashed = _mount_crashed(ram)
        assert len(hs) == 4
        fs.close(fd)
    finally:
        fs.unmount()
    with api.mount(crashed, personality=P) as fs2:
        fd = fs2.open("/a", os.O_RDONLY)
        assert fs2.pread(fd, 4 * BS, 0) == b"".join(_pattern(BS, i) for i in range(4))


def test_failed_dio_write_gives_space_back_and_keeps_size():
    ram = _dev()
    fdev = FaultDev(ram)
    with api.mount(fdev, personality=P) as fs:
        fd = fs.open("/f", DIO)
        fs.pwrite(fd, b"k" * BS, 0)
        fs.fsync(fd)
        free = fs.statvfs("/").f_bfree
        fdev.fail("write", 0, None, errno.EIO, count=1)
        with pytest.raises(OSError) as ei:
            fs.pwrite(fd, b"n" * 4 * BS, BS)
        assert ei.value.errno == errno.EIO
        assert fs.fstat(fd).st_size == BS                 # the i_size raised at iomap_begin undone
        assert fs.statvfs("/").f_bfree == free            # the reservation came back
        assert fs.pread(fd, 2 * BS, 0) == b"k" * BS
    assert api.fsck(ram, personality=P).clean


def test_nowait_dio_write_eagain_unless_nocow_overwrite():
    ram = _dev()
    with api.mount(ram, personality=P) as fs:
        fd = fs.open("/cow", DIO)
        fs.pwrite(fd, b"c" * BS, 0)
        f = fs.fdtable.get(fd)
        free = fs.statvfs("/").f_bfree
        with pytest.raises(OSError) as ei:
            f.f_op.write_iter(f.kiocb(0, write=True, nowait=True), memoryview(b"N" * BS))
        assert ei.value.errno == errno.EAGAIN
        assert fs.pread(fd, BS, 0) == b"c" * BS and fs.statvfs("/").f_bfree == free
        fs.close(fd)
    with api.mount(ram, personality=P, options="nodatacow") as fs:
        fd = fs.open("/nocow", DIO)
        fs.pwrite(fd, b"o" * 2 * BS, 0)
        fs.fsync(fd)
        f = fs.fdtable.get(fd)
        n = f.f_op.write_iter(f.kiocb(BS, write=True, nowait=True), memoryview(b"N" * BS))
        assert n == BS and fs.pread(fd, 2 * BS, 0) == b"o" * BS + b"N" * BS
        fs.close(fd)
    assert api.fsck(ram, personality=P).clean


def test_eiocbqueued_odsync_writes_are_synced_by_the_completion_worker(tmp_path):
    """On an O_DIRECT image file (io_uring or threads) the writes really go asynchronous: the
    submitter gets EIOCBQUEUED and the dio completion workqueue runs end_io and the fsync
    (btrfs 8184620ae212: such writes were once never synced)."""
    from ufs.iomap import EIOCBQUEUED
    img = tmp_path / "b.img"
    api.mkfs(img, personality=P, size="64M")
    with api.mount(img, personality=P) as fs:
        rets, syncs = [], []
        fops = fs.sb.fops
        real_w, real_f = fops.write_iter, fops.fsync

        def write_iter(iocb, data):
            r = real_w(iocb, data)
            rets.append(r)
            return r

        def fsync(*a):
            syncs.append(threading.current_thread() is threading.main_thread())
            return real_f(*a)
        fops.write_iter, fops.fsync = write_iter, fsync
        fd = fs.open("/a", DSYNC_DIO)
        payload = [_pattern(256 * 1024, i) for i in range(6)]
        for i, p in enumerate(payload):
            fs.submit_pwrite(fd, p, i * len(p))
        done = []
        while len(done) < len(payload):
            done += fs.reap(1, timeout=10)
        assert [r for _, r in done] == [len(payload[0])] * len(payload)
        queued = rets.count(EIOCBQUEUED)
        if queued == 0:
            pytest.skip("the device completed every write inline (no EIOCBQUEUED)")
        assert syncs.count(False) >= queued        # one fsync per queued write, off-thread
        assert fs.pread(fd, 6 * 256 * 1024, 0) == b"".join(payload)
    assert api.fsck(img, personality=P).clean


def test_extent_freed_under_an_inflight_read_is_not_reused_until_it_ends():
    """unlocked strategy: an overwrite's completion runs without i_rwsem, so a direct read may
    have mapped the old extent X and still be reading it when end_io frees X.  X must not be
    handed to another write (the read would return another file's bytes) before the read ends."""
    ram = _dev()
    with api.mount(ram, personality=P, options="nodatasum") as fs:
        old = _pattern(4 * BS, 5)
        fd = fs.open("/f", DIO)
        fs.pwrite(fd, old, 0)
        (_pos, x), = _extents(fs, "/f")
        mapped, go = threading.Event(), threading.Event()
        fops = fs.sb.fops
        real = fops._map_read
        out = []

        def slow_map(*a):
            real(*a)
            mapped.set()
            assert go.wait(10)

        def reader():
            out.append(fs.pread(fd, 4 * BS, 0))

        def in_end_io(inode):             # W released i_rwsem; X is still mapped
            fs.sb.fault_hooks.clear()
            fops._map_read = slow_map
            threading.Thread(target=reader).start()
            assert mapped.wait(10)
            del fops._map_read
        fs.sb.fault_hooks["dio_end_io"] = in_end_io
        fs.pwrite(fd, b"\x99" * 4 * BS, 0)             # W: its end_io frees X (COW)
        g = fs.open("/g", DIO)
        fs.pwrite(g, b"\x77" * 4 * BS, 0)              # allocates: must not get X
        (_p, y), = _extents(fs, "/g")
        assert not (y.disk_bytenr < x.disk_bytenr + x.disk_num_bytes
                    and x.disk_bytenr < y.disk_bytenr + y.disk_num_bytes)
        assert fs.sb._quarantine                        # X waits for the reader
        go.set()
        deadline = time.monotonic() + 10
        while not out and time.monotonic() < deadline:
            time.sleep(0.01)
        assert out == [old]
        assert fs.sb._quarantine == [] and not fs.sb._reads_in_flight   # released at read end
    assert api.fsck(ram, personality=P).clean


@pytest.mark.parametrize("mode", STRATEGIES)
def test_mixed_threads_stress_stays_consistent(mode):
    """Six threads mixing DIO/buffered, O_DSYNC, reads, fsync, truncate, fallocate and punch on
    three files, lockdep on: no error, no hang, and fsck is clean afterwards."""
    import random
    ram = RamDev(128 << 20, 512)
    api.mkfs(ram, personality=P)
    errs = []
    with lockdep.checking(True, fresh=True):
        fs = api.mount(ram, personality=P, options=f"dio_complete={mode}")
        files = ["/a", "/b", "/c"]
        for f in files:
            fs.close(fs.open(f, os.O_CREAT | os.O_RDWR))
        stop = time.monotonic() + 1.5

        def worker(seed):
            rng = random.Random(seed)
            try:
                while time.monotonic() < stop:
                    dsync = rng.choice([0, os.O_DSYNC]) if mode != "locked" else 0
                    fd = fs.open(rng.choice(files),
                                 os.O_RDWR | rng.choice([0, os.O_DIRECT]) | dsync)
                    op = rng.randrange(8)
                    if op < 3:
                        fs.pwrite(fd, os.urandom(rng.choice([BS, 3 * BS, 100, 5000])),
                                  rng.randrange(64) * BS)
                    elif op < 5:
                        fs.pread(fd, rng.choice([BS, 8 * BS, 777]), rng.randrange(64) * BS)
                    elif op == 5:
                        fs.fsync(fd)
                    elif op == 6:
                        fs.ftruncate(fd, rng.randrange(64 * BS))
                    else:
                        fs.fallocate(fd, rng.choice([0, 3]), rng.randrange(64 * BS),
                                     rng.randrange(1, 8 * BS))
                    fs.close(fd)
            except BaseException as e:      # noqa: BLE001 - reported below
                errs.append(e)
        ths = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(30)
        assert not any(t.is_alive() for t in ths), "a worker hung"
        assert not errs, errs
        fs.unmount()
    rep = api.fsck(ram, personality=P)
    assert rep.clean, rep.errors

"""btrfslike fsync log (tree_log.py): fsync without a commit, crash, replay.

- fsync of a regular file writes one log record (no commit: the generation stays) made of a
  flush and one FUA write; after a power cut (volatile-cache RamDev, any subset of unflushed
  writes kept) mount replays the log: every byte, size and xattr fsync promised is there,
  nothing else changed by the unsynced tail is, fsck is clean;
- every prefix of the device writes of an fsync (flush + record) and a torn record give the
  state before or after that fsync, never garbage;
- a crash during replay (every prefix of the replay mount's writes) replays again to the same
  state: replay is idempotent;
- rename/unlink after an fsync and a crash: the fsynced state (a committed prefix);
  renames/links fall back to a full commit;
- a data extent only a log record references is not reused before the commit;
- long logs cross log areas (jump records); dio_complete=marker O_DSYNC writes use the log.
"""
from __future__ import annotations

import os
import random

import pytest

from ufs import api
from ufs.fs_btrfslike import format as fmt
from ufs.fs_btrfslike import plugin, tree_log
from ufs.fs_btrfslike.super import BtrfsSuper
from ufs.fs_btrfslike.transaction import TransactionManager
from ufs.iomap import RamDev, aligned_buffer

P = plugin.PERSONALITY
SIZE = 64 << 20
BS = 4096


class _Recorder:
    """Stands in for a device: records writes (and flushes) while ``log`` is a list."""

    def __init__(self, dev):
        self.dev = dev
        self.log = None

    def pwrite(self, buf, addr, *, fua=False):
        if self.log is not None:
            self.log.append((addr, bytes(buf)))
        return self.dev.pwrite(buf, addr, fua=fua)

    def flush(self):
        return self.dev.flush()

    def __getattr__(self, name):
        return getattr(self.dev, name)


def _image(base, writes):
    img = bytearray(base)
    for addr, data in writes:
        img[addr:addr + len(data)] = data
    return bytes(img)


def _new_fs(volatile=True, options=None):
    dev = RamDev(SIZE, 512, volatile_cache=volatile)
    api.mkfs(dev, personality=P)
    return dev, api.mount(dev, options, personality=P)


def _read(fs, path):
    fd = fs.open(path, os.O_RDONLY)
    try:
        return fs.pread(fd, fs.fstat(fd).st_size + 1, 0)
    finally:
        fs.close(fd)


def _write(fs, path, data, off, flags=0):
    fd = fs.open(path, os.O_CREAT | os.O_RDWR | flags)
    try:
        fs.pwrite(fd, data, off)
    finally:
        fs.close(fd)


def _fsync(fs, path):
    fd = fs.open(path, os.O_RDWR)
    try:
        fs.fsync(fd)
    finally:
        fs.close(fd)


def _mount_image(img, options=None):
    return api.mount(RamDev(SIZE, 512, data=img), options, personality=P)


def _check_clean_after_replay(img, expect):
    """Mount (replays), compare ``expect`` {path: bytes or None}, unmount, fsck clean."""
    dev = RamDev(SIZE, 512, data=img)
    with api.mount(dev, personality=P) as c:
        for path, data in expect.items():
            if data is None:
                assert not c.exists(path), path
            else:
                assert _read(c, path) == data, path
        replayed = c.sb.log_replayed
    rep = api.fsck(dev, personality=P)
    assert rep.clean, rep.errors
    assert rep.stats["log_records"] == 0
    return replayed


@pytest.mark.parametrize("nodatasum", [False, True])
def test_fsync_writes_a_log_record_not_a_commit(nodatasum):
    """Checksummed file: the record (VERIFY_DATA) then one flush.  nodatasum file: a flush (the
    data first), then the record with FUA.  Either way no commit and one device write."""
    dev, fs = _new_fs(options={"nodatasum": nodatasum})
    try:
        _write(fs, "/a", b"x" * 5000, 0)
        fs.sync()
        tm = fs.sb.tm
        gen, commits = tm.generation, tm.commits
        rec = _Recorder(tm.dev)
        tm.dev = rec
        rec.log = []
        events = []
        rec.flush = lambda: (events.append("flush"), rec.dev.flush())[1]
        real_pwrite = rec.pwrite

        def pwrite(buf, addr, *, fua=False):
            events.append("fua" if fua else "write")
            return real_pwrite(buf, addr, fua=fua)
        rec.pwrite = pwrite
        _write(fs, "/a", b"y" * 3000, 1000)
        _fsync(fs, "/a")
        assert tm.generation == gen and tm.commits == commits
        assert events == (["flush", "fua"] if nodatasum else ["write", "flush"])
        addr, buf = rec.log[0]
        assert addr == tm.sb.log_root and buf[8:16] == fmt.LOG_MAGIC
        flags = fmt.LOG_HEADER_L.unpack_from(buf)[-1]
        assert flags == (0 if nodatasum else fmt.LOG_VERIFY_DATA)
        assert tm.log.stats["records"] == 1
        img = dev.crash(seed=1, keep_probability=0.0)
        _check_clean_after_replay(img, {"/a": b"x" * 1000 + b"y" * 3000 + b"x" * 1000})
    finally:
        fs.unmount()


def test_verify_data_record_whose_data_did_not_reach_the_disk_ends_the_chain():
    """A VERIFY_DATA record durable without its data (the cut came between the writes and
    the flush): mount finds a checksum mismatch and replays only the records before it."""
    dev, fs = _new_fs(volatile=False)
    try:
        _write(fs, "/a", b"1" * BS, 0)
        fs.sync()
        _write(fs, "/a", b"2" * BS, 0, os.O_DIRECT)
        _fsync(fs, "/a")                        # record 0: complete
        tm = fs.sb.tm
        rec = _Recorder(tm.dev)
        tm.dev = rec
        _write(fs, "/a", b"3" * BS, 0, os.O_DIRECT)
        ino = fs._inode("/a")
        with tm.lock:
            from ufs.fs_btrfslike.inode import extent_items
            (_p, fe), = extent_items(tm.tree(ino.tree_id), ino.objectid, 0, BS)
        before_data = dev.contents()
        rec.log = []
        _fsync(fs, "/a")                        # record 1
        (addr, buf), = rec.log
        assert fmt.LOG_HEADER_L.unpack_from(buf)[-1] == fmt.LOG_VERIFY_DATA
        # the record without the sector of data it points at
        img = bytearray(_image(before_data, rec.log))
        img[fe.disk_bytenr:fe.disk_bytenr + BS] = b"\xee" * BS
        assert _check_clean_after_replay(bytes(img), {"/a": b"2" * BS}) == 1
        assert _check_clean_after_replay(dev.contents(), {"/a": b"3" * BS}) == 2
    finally:
        fs.unmount()


@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_power_cut_after_fsyncs_replays_promised_state(keep):
    dev, fs = _new_fs()
    rng = random.Random(3)
    try:
        fs.makedirs("/d")
        _write(fs, "/d/old", b"o" * 20000, 0)
        fs.sync()
        model = {"/d/old": b"o" * 20000}
        gen = fs.sb.tm.generation
        for i in range(6):
            # a checksummed file with DIO and unaligned writes, a truncate, xattrs
            data = bytes([97 + i]) * BS * rng.randint(1, 3)
            off = rng.randrange(0, 6) * BS
            _write(fs, "/d/old", data, off, os.O_DIRECT)
            cur = bytearray(model["/d/old"])
            cur[len(cur):off] = bytes(max(0, off - len(cur)))
            cur[off:off + len(data)] = data
            n = rng.randint(1, 9000)
            tail = bytes([65 + i]) * n
            _write(fs, "/d/old", tail, 3 * BS + 7)
            cur[len(cur):3 * BS + 7] = bytes(max(0, 3 * BS + 7 - len(cur)))
            cur[3 * BS + 7:3 * BS + 7 + n] = tail
            if i == 3:
                fd = fs.open("/d/old", os.O_RDWR)
                fs.ftruncate(fd, 10000)
                fs.close(fd)
                del cur[10000:]
            fs.setxattr("/d/old", "user.i", str(i).encode())
            # a new file in an old directory: its name comes with the log
            _write(fs, f"/d/new{i}", bytes([48 + i]) * (BS + i), 0)
            _fsync(fs, "/d/old")
            _fsync(fs, f"/d/new{i}")
            model["/d/old"] = bytes(cur)
            model[f"/d/new{i}"] = bytes([48 + i]) * (BS + i)
            assert fs.sb.tm.generation == gen, "fsync committed"
            # unsynced changes after the fsyncs: must not survive (not fsynced)
            _write(fs, f"/d/unsynced{i}", b"u" * 100, 0)
            _write(fs, "/d/old", b"Z" * BS, 0, os.O_DIRECT)
            img = dev.crash(seed=i, keep_probability=keep)
            c = _mount_image(img)
            try:
                assert c.sb.log_replayed >= 2
                for p, d in model.items():
                    assert _read(c, p) == d, (i, p)
                assert c.getxattr("/d/old", "user.i") == str(i).encode()
                assert not c.exists(f"/d/unsynced{i}")
                assert sorted(c.listdir("/d")) == sorted(p[3:] for p in model)
            finally:
                c.unmount()
            # sync the tail too, so the model stays simple
            _fsync(fs, "/d/old")
            _fsync(fs, f"/d/unsynced{i}")
            model["/d/old"] = b"Z" * BS + model["/d/old"][BS:]
            model[f"/d/unsynced{i}"] = b"u" * 100
        img = dev.crash(seed=99, keep_probability=keep)
        _write(fs, "/d/unsynced", b"u", 0)
        expect = dict(model, **{"/d/unsynced": None})
        assert _check_clean_after_replay(img, expect) > 0
        assert fs.sb.tm.generation == gen and not any(
            k.startswith("fallback") for k in fs.sb.tm.log.stats)
    finally:
        fs.unmount()


def test_every_prefix_of_an_fsync_and_a_torn_record():
    dev, fs = _new_fs(volatile=False)
    try:
        _write(fs, "/f", b"1" * 3 * BS, 0)
        fs.sync()
        tm = fs.sb.tm
        rec = _Recorder(tm.dev)
        tm.dev = rec
        states = [b"1" * 3 * BS]
        for i in range(3):
            _write(fs, "/f", bytes([50 + i]) * (BS + 100), i * 2000, os.O_SYNC)
            states.append(bytes(states[-1][:i * 2000]) + bytes([50 + i]) * (BS + 100)
                          + states[-1][i * 2000 + BS + 100:])
        # O_SYNC writes fsync: now record the writes of one more fsync'd write
        _write(fs, "/f", b"9" * 10, 5)
        base = dev.contents()
        rec.log = []
        _fsync(fs, "/f")
        writes, rec.log = rec.log, None
        new = states[-1][:5] + b"9" * 10 + states[-1][15:]
        assert len(writes) == 1
        addr, buf = writes[0]
        for k in range(len(writes) + 1):
            with _mount_image(_image(base, writes[:k])) as c:
                assert _read(c, "/f") == (new if k else states[-1])
        # a torn record (its first or last 512-byte sector old/other bytes) is ignored
        for cut in (512, len(buf) - 512):
            img = _image(base, [(addr, buf[:cut] + b"\xaa" * (len(buf) - cut))])
            with _mount_image(img) as c:
                assert _read(c, "/f") == states[-1]
        bad = bytearray(buf)
        bad[100] ^= 1
        with _mount_image(_image(base, [(addr, bytes(bad))])) as c:
            assert _read(c, "/f") == states[-1]
    finally:
        fs.unmount()


def test_replay_is_idempotent_across_a_crash_during_replay():
    dev, fs = _new_fs()
    try:
        fs.mkdir("/d")
        fs.sync()
        for i in range(4):
            _write(fs, f"/d/f{i}", bytes([65 + i]) * (3 * BS + i), 0, 0)
            _fsync(fs, f"/d/f{i}")
        _write(fs, "/d/f0", b"z" * BS, BS, os.O_DIRECT)
        _fsync(fs, "/d/f0")
        expect = {f"/d/f{i}": bytes([65 + i]) * (3 * BS + i) for i in range(4)}
        expect["/d/f0"] = b"A" * BS + b"z" * BS + b"A" * (BS)
        img = dev.crash(seed=1, keep_probability=0.0)
    finally:
        fs.unmount()
    # record every metadata write the replaying mount makes
    ram = RamDev(SIZE, 512, volatile_cache=False, data=img)
    tm = TransactionManager.mount(ram)
    rec = _Recorder(ram)
    rec.log = []
    tm.dev = rec
    sb = BtrfsSuper(ram, tm, None, False)
    assert sb.log_replayed == 5
    sb.put_super()
    writes = rec.log
    assert len(writes) >= 2
    for k in range(len(writes) + 1):
        assert _check_clean_after_replay(_image(img, writes[:k]), expect) in (0, 5)


def test_rename_and_unlink_after_fsync_then_crash_keep_the_fsynced_state():
    dev, fs = _new_fs()
    try:
        fs.mkdir("/d")
        _write(fs, "/d/keep", b"k" * 100, 0)
        fs.sync()
        gen = fs.sb.tm.generation
        _write(fs, "/d/a", b"a" * 6000, 0)
        _fsync(fs, "/d/a")
        _write(fs, "/d/keep", b"K" * 50, 0)
        _fsync(fs, "/d/keep")
        assert fs.sb.tm.generation == gen
        fs.rename("/d/a", "/d/b")
        fs.unlink("/d/keep")
        img = dev.crash(seed=5, keep_probability=0.5)
        _check_clean_after_replay(img, {"/d/a": b"a" * 6000, "/d/b": None,
                                        "/d/keep": b"K" * 50 + b"k" * 50})
        # fsync after a rename commits (the log does not carry name changes)
        _write(fs, "/d/b", b"b", 0)
        _fsync(fs, "/d/b")
        assert fs.sb.tm.generation == gen + 1
        assert fs.sb.tm.log.stats["fallback:name changed"] == 1
        img = dev.crash(seed=6, keep_probability=0.5)
        _check_clean_after_replay(img, {"/d/a": None, "/d/b": b"b" + b"a" * 5999,
                                        "/d/keep": None})
    finally:
        fs.unmount()


def test_new_file_in_new_directory_and_hard_link_fall_back_to_commit():
    dev, fs = _new_fs()
    try:
        fs.sync()
        tm = fs.sb.tm
        gen = tm.generation
        fs.mkdir("/n")
        _write(fs, "/n/f", b"f" * 10, 0)
        _fsync(fs, "/n/f")
        assert tm.generation == gen + 1 and tm.log.stats["fallback:new parent"] == 1
        fs.link("/n/f", "/n/g")
        _fsync(fs, "/n/f")
        assert tm.generation == gen + 2 and tm.log.stats["fallback:name changed"] == 1
        fs.unlink("/n/g")
        _write(fs, "/n/h", b"h", 0)
        _fsync(fs, "/n/h")
        assert tm.generation == gen + 3 and tm.log.stats["fallback:parent lost an entry"] == 1
        # a directory fsync commits
        fd = fs.open("/n", os.O_RDONLY | os.O_DIRECTORY)
        fs.fsync(fd)
        fs.close(fd)
        img = dev.crash(seed=2, keep_probability=0.0)
        _check_clean_after_replay(img, {"/n/f": b"f" * 10, "/n/h": b"h", "/n/g": None})
    finally:
        fs.unmount()


def test_extent_only_the_log_references_is_not_reused_before_commit():
    dev, fs = _new_fs()
    try:
        _write(fs, "/a", b"\0", 0)
        _write(fs, "/b", b"\0", 0)
        fs.sync()
        tm = fs.sb.tm
        gen = tm.generation
        first = os.urandom(BS)
        _write(fs, "/a", first, 0, os.O_DIRECT)
        _fsync(fs, "/a")
        ext = tm.extents
        with tm.lock:
            from ufs.fs_btrfslike.inode import extent_items
            ino = fs._inode("/a")
            (pos, fe), = extent_items(tm.tree(ino.tree_id), ino.objectid, 0, BS)
        logged = fe.disk_bytenr
        assert logged in ext.log_pinned
        # overwrite /a (the logged extent loses its last reference) and write /b a lot
        _write(fs, "/a", b"2" * BS, 0, os.O_DIRECT)
        assert not ext.free.overlaps(logged, BS)
        fd = fs.open("/b", os.O_RDWR | os.O_DIRECT)
        for i in range(64):
            fs.pwrite(fd, bytes([i]) * BS, i * BS)
            fs.fsync(fd)
        fs.close(fd)
        assert tm.generation == gen
        img = dev.crash(seed=3, keep_probability=1.0)
        _check_clean_after_replay(img, {"/a": first,
                                        "/b": b"".join(bytes([i]) * BS for i in range(64))})
        fs.sync()           # the commit ends the log: the extent is free again
        assert not ext.log_pinned and ext.free.contains(logged, BS)
    finally:
        fs.unmount()


def test_long_log_crosses_areas_with_jump_records():
    dev, fs = _new_fs()
    try:
        _write(fs, "/f", b"\0" * BS, 0)
        fs.sync()
        tm = fs.sb.tm
        gen = tm.generation
        n = tm.log.area_bytes // BS + 10
        fd = fs.open("/f", os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        buf = aligned_buffer(BS)
        want = bytearray(BS * 8)
        for i in range(n):
            b = bytes([i % 251]) * BS
            memoryview(buf)[:] = b
            pos = (i % 8) * BS
            fs.pwrite(fd, buf, pos)
            want[pos:pos + BS] = b
        fs.close(fd)
        assert tm.generation == gen and tm.log.stats["jumps"] >= 1
        img = dev.crash(seed=4, keep_probability=0.0)
        assert _check_clean_after_replay(img, {"/f": bytes(want)}) >= n
    finally:
        fs.unmount()


@pytest.mark.parametrize("mode", ["unlocked", "marker"])
def test_odsync_dio_writes_use_the_log_in_each_completion_mode(mode):
    dev, fs = _new_fs(options={"dio_complete": mode})
    try:
        _write(fs, "/f", b"\0", 0)
        fs.sync()
        tm = fs.sb.tm
        gen = tm.generation
        fd = fs.open("/f", os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        buf = aligned_buffer(BS)
        for i in range(5):
            memoryview(buf)[:] = bytes([i + 1]) * BS
            fs.pwrite(fd, buf, i * BS)
        fs.close(fd)
        assert tm.generation == gen and tm.log.stats["records"] == 5
        img = dev.crash(seed=8, keep_probability=0.0)
        _check_clean_after_replay(img, {"/f": b"".join(bytes([i + 1]) * BS for i in range(5))})
    finally:
        fs.unmount()


def test_nodatacow_overwrite_fsync_flushes_and_logs_size():
    dev, fs = _new_fs(options={"nodatacow": True})
    try:
        _write(fs, "/f", b"a" * 2 * BS, 0, os.O_DIRECT)
        fs.sync()
        gen = fs.sb.tm.generation
        _write(fs, "/f", b"b" * BS, 0, os.O_DIRECT)      # in place: no new extent
        _write(fs, "/f", b"c" * BS, 2 * BS, os.O_DIRECT)  # grows: a new extent + size
        _fsync(fs, "/f")
        assert fs.sb.tm.generation == gen
        img = dev.crash(seed=9, keep_probability=0.0)
        _check_clean_after_replay(img, {"/f": b"b" * BS + b"a" * BS + b"c" * BS})
    finally:
        fs.unmount()


def test_fsck_reports_pending_log_records_and_readonly_mount_sees_them():
    dev, fs = _new_fs()
    try:
        _write(fs, "/f", b"1", 0)
        fs.sync()
        _write(fs, "/f", b"2" * 10, 0)
        _fsync(fs, "/f")
        img = dev.crash(seed=10, keep_probability=0.0)
    finally:
        fs.unmount()
    ram = RamDev(SIZE, 512, data=img)
    rep = api.fsck(ram, personality=P)
    assert rep.clean and rep.stats["log_records"] == 1
    with api.mount(ram, readonly=True, personality=P) as c:
        assert _read(c, "/f") == b"2" * 10
    assert ram.contents() == img          # a read-only mount replays in memory only
    with api.mount(ram, personality=P) as c:
        assert c.sb.log_replayed == 1 and tree_log.read_log(c.sb.tm) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_ops_crash_after_each_fsync_matches_the_synced_model(seed):
    """Random writes (DIO and unaligned), truncates, fallocate and fsyncs on three files;
    after every fsync a power cut keeps a random subset of unflushed writes: each file reads
    back exactly as at its last fsync (files never fsynced since the commit: as committed)."""
    rng = random.Random(seed)
    dev, fs = _new_fs()
    names = ["/d/a", "/d/b", "/d/c"]
    try:
        fs.mkdir("/d")
        for p in names:
            _write(fs, p, b"\0" * 10, 0)
        fs.sync()
        live = {p: bytearray(b"\0" * 10) for p in names}
        synced = {p: bytes(v) for p, v in live.items()}
        for step in range(25):
            p = rng.choice(names)
            op = rng.random()
            cur = live[p]
            if op < 0.45:
                direct = rng.random() < 0.5
                off = rng.randrange(0, 12) * (BS if direct else 1000)
                n = rng.randint(1, 3) * BS if direct else rng.randint(1, 7000)
                data = bytes([rng.randrange(1, 256)]) * n
                _write(fs, p, data, off, os.O_DIRECT if direct else 0)
                if off > len(cur):
                    cur.extend(bytes(off - len(cur)))
                cur[off:off + n] = data
            elif op < 0.55:
                size = rng.randrange(0, 40000)
                fd = fs.open(p, os.O_RDWR)
                fs.ftruncate(fd, size)
                fs.close(fd)
                if size < len(cur):
                    del cur[size:]
                else:
                    cur.extend(bytes(size - len(cur)))
            elif op < 0.6:
                fd = fs.open(p, os.O_RDWR)
                fs.fallocate(fd, 0, rng.randrange(0, 8) * BS, BS * 2)
                end = fs.fstat(fd).st_size
                fs.close(fd)
                cur.extend(bytes(end - len(cur)))
            else:
                _fsync(fs, p)
                synced[p] = bytes(cur)
                img = dev.crash(seed=seed * 100 + step, keep_probability=rng.random())
                with _mount_image(img) as c:
                    for q in names:
                        assert _read(c, q) == synced[q], (step, q)
        assert not any(k.startswith("fallback") for k in fs.sb.tm.log.stats)
        img = dev.crash(seed=seed, keep_probability=0.5)
        _check_clean_after_replay(img, synced)
    finally:
        fs.unmount()


def test_concurrent_odsync_writers_on_two_files():
    import threading
    dev, fs = _new_fs()
    try:
        _write(fs, "/a", b"\0", 0)
        _write(fs, "/b", b"\0", 0)
        fs.sync()
        errors = []

        def writer(path, byte):
            try:
                fd = fs.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
                buf = aligned_buffer(BS)
                for i in range(40):
                    memoryview(buf)[:] = bytes([byte + i % 3]) * BS
                    fs.pwrite(fd, buf, (i % 10) * BS)
                fs.close(fd)
            except BaseException as e:      # noqa: BLE001 - reported below
                errors.append(e)

        ts = [threading.Thread(target=writer, args=(p, b)) for p, b in (("/a", 10), ("/b", 50))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors
        want = {p: b"".join(bytes([b + i % 3]) * BS for i in range(30, 40))
                for p, b in (("/a", 10), ("/b", 50))}
        img = dev.crash(seed=12, keep_probability=0.0)
        _check_clean_after_replay(img, want)
    finally:
        fs.unmount()


@pytest.mark.parametrize("flags", [0, os.O_DSYNC])
def test_overwrites_far_beyond_the_device_size_do_not_run_out_of_space(flags):
    """Copy-on-write overwrites free the old extents only at a commit, and fsyncs that write
    the log do not commit: a full device commits (write path) or fsync commits instead of
    logging (``space pinned``), so rewriting a file many times its device never fails."""
    size = 8 << 20
    dev = RamDev(size, 512)
    api.mkfs(dev, personality=P)
    chunk = 1 << 20
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/f", os.O_CREAT | os.O_RDWR | os.O_DIRECT | flags)
        buf = aligned_buffer(chunk)
        for i in range(4):                  # 4 MiB, committed: overwriting pins it all
            fs.pwrite(fd, buf, i * chunk)
        fs.sync()
        for i in range(12):                 # 12 MiB more through the 4 MiB file, 8 MiB device
            memoryview(buf)[:] = bytes([i + 1]) * chunk
            fs.pwrite(fd, buf, (i % 4) * chunk)
        fs.fsync(fd)
        fs.close(fd)
        img = dev.crash(seed=1, keep_probability=0.0)
    dev2 = RamDev(size, 512, data=img)
    with api.mount(dev2, personality=P) as c:
        assert _read(c, "/f") == b"".join(bytes([i + 1]) * chunk for i in range(8, 12))
    rep = api.fsck(dev2, personality=P)
    assert rep.clean, rep.errors


def test_odsync_fua_shortcut_only_for_in_place_nodatacow_overwrites():
    """Copy-on-write mappings are NEW|DIRTY, so an O_DSYNC write always runs fsync (a log
    record); an in-place NODATACOW overwrite inside the on-disk size changes no metadata the
    data needs, so the engine writes it FUA and skips fsync, and it still survives a cut."""
    dev, fs = _new_fs(options={"nodatacow": True})
    try:
        _write(fs, "/f", b"a" * 4 * BS, 0, os.O_DIRECT)
        fs.sync()
        log = fs.sb.tm.log
        fd = fs.open("/f", os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        buf = aligned_buffer(BS)
        memoryview(buf)[:] = b"b" * BS
        fs.pwrite(fd, buf, BS)
        assert log.stats["syncs"] == 0          # FUA, no fsync
        fs.pwrite(fd, buf, 4 * BS)              # grows the file: DIRTY, fsync runs
        assert log.stats["syncs"] == 1 and log.stats["records"] == 1
        fs.close(fd)
        img = dev.crash(seed=13, keep_probability=0.0)
        _check_clean_after_replay(img, {"/f": b"a" * BS + b"b" * BS + b"a" * 2 * BS + b"b" * BS})
    finally:
        fs.unmount()


def test_many_changed_ranges_are_merged_and_still_logged_exactly(monkeypatch):
    from ufs.fs_btrfslike import inode as inode_mod
    monkeypatch.setattr(inode_mod, "LOG_RANGES_MAX", 8)
    dev, fs = _new_fs()
    try:
        _write(fs, "/f", b"." * 64 * BS, 0)
        fs.sync()
        gen = fs.sb.tm.generation
        want = bytearray(b"." * 64 * BS)
        fd = fs.open("/f", os.O_RDWR | os.O_DIRECT)
        buf = aligned_buffer(BS)
        for i in range(20):
            pos = (i * 7 % 64) * BS if i % 2 else (i * 3 % 64) * BS
            memoryview(buf)[:] = bytes([65 + i]) * BS
            fs.pwrite(fd, buf, pos)
            want[pos:pos + BS] = bytes([65 + i]) * BS
        ino = fs._inode("/f")
        assert len(ino.log_ranges) <= 8
        fs.fsync(fd)
        fs.close(fd)
        assert fs.sb.tm.generation == gen
        img = dev.crash(seed=21, keep_probability=0.0)
        _check_clean_after_replay(img, {"/f": bytes(want)})
    finally:
        fs.unmount()

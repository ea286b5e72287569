"""xfslike data path: DIO into holes/unwritten extents/sub-block/extending, the end_io order
(conversion and size only after the data is on disk), XFS locking (shared aligned writes,
OVERWRITE_ONLY fast path, fsync without i_rwsem), O_DSYNC durability, async completion,
delayed allocation, fallocate modes and SEEK_DATA/SEEK_HOLE."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from ufs import api
from ufs.fs_xfslike import format as fmt
from ufs.fs_xfslike import plugin
from ufs.fs_xfslike.file import XfsFileOps
from ufs.iomap import MapFlag, MapType, RamDev
from ufs.vfs import lockdep
import xfsl_testdev
from xfsl_testdev import abuf

# shared fixtures (xfsl_testdev): a formatted RamDev, and it mounted (fsck clean after)
dev = xfsl_testdev.dev
fs = xfsl_testdev.fs

P = plugin.PERSONALITY
BS = 4096
O_DIRECT = os.O_DIRECT


def inode_of(fs, path):
    return fs.sb.iget(fs.stat(path).st_ino)


def extents(fs, path):
    ino = inode_of(fs, path)
    return list(fs.sb.bmap(ino).ext)


class MapRecorder:
    """Records (pos, type, flags) of every iomap_begin of a write."""

    def __init__(self, monkeypatch):
        self.maps = []
        orig = XfsFileOps.map_range
        rec = self

        def map_range(self_, inode, pos, length, flags, iomap):
            orig(self_, inode, pos, length, flags, iomap)
            rec.maps.append((pos, int(iomap.type), int(iomap.flags), int(flags)))
        monkeypatch.setattr(XfsFileOps, "map_range", map_range)


def test_dio_write_into_hole_allocates_unwritten_new_then_converts(fs, monkeypatch):
    rec = MapRecorder(monkeypatch)
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    assert fs.pwrite(fd, abuf(b"a" * 2 * BS), 0) == 2 * BS
    _pos, mtype, mflags, _ = rec.maps[0]
    assert mtype == MapType.UNWRITTEN and mflags & MapFlag.NEW and mflags & MapFlag.DIRTY
    ext = extents(fs, "/f")
    assert len(ext) == 1 and ext[0][2] == 2 and not ext[0][3] & fmt.EXT_UNWRITTEN
    assert fs.fstat(fd).st_size == 2 * BS
    assert fs.pread(fd, 2 * BS, 0) == b"a" * 2 * BS
    # an overwrite inside EOF maps the written extent, no NEW, no DIRTY
    rec.maps.clear()
    fs.pwrite(fd, abuf(b"b" * BS), 0)
    assert rec.maps[0][1] == MapType.MAPPED and not rec.maps[0][2] & (MapFlag.NEW | MapFlag.DIRTY)
    fs.close(fd)


def test_end_io_moves_size_only_after_data_and_conversion(fs, dev, monkeypatch):
    seen = []
    orig = XfsFileOps.convert_written

    def convert_written(self_, inode, pos, length, new_disk_size):
        # at completion the data is already on the device, the size not yet moved
        ext = self_.fs.bmap(inode).find(pos // BS)[0]
        addr = ext[1] * BS + (pos - ext[0] * BS)
        seen.append((inode.i_size, bytes(dev.pread(512, addr))[:4], ext[3]))
        orig(self_, inode, pos, length, new_disk_size)
    monkeypatch.setattr(XfsFileOps, "convert_written", convert_written)
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    fs.pwrite(fd, abuf(b"z" * BS), 3 * BS)
    assert seen == [(0, b"zzzz", fmt.EXT_UNWRITTEN)]
    assert fs.fstat(fd).st_size == 4 * BS
    assert fs.pread(fd, 3 * BS, 0) == bytes(3 * BS)      # the gap before it is a hole
    fs.close(fd)


def test_sub_block_dio_writes_zero_the_rest_of_new_and_unwritten_blocks(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    fs.pwrite(fd, abuf(b"q" * 512), 1024)                 # hole, extending, sub-block
    assert fs.fstat(fd).st_size == 1536
    assert fs.pread(fd, BS, 0) == bytes(1024) + b"q" * 512
    fs.fallocate(fd, api.FALLOC_FL_KEEP_SIZE, BS, 4 * BS)  # unwritten, size unchanged
    assert fs.fstat(fd).st_size == 1536
    assert any(e[3] & fmt.EXT_UNWRITTEN for e in extents(fs, "/f"))
    fs.pwrite(fd, abuf(b"u" * 512), 2 * BS + 512)         # into the unwritten extent
    assert fs.fstat(fd).st_size == 2 * BS + 1024
    data = fs.pread(fd, 3 * BS, 0)
    assert data[BS:2 * BS + 512] == bytes(BS + 512) and data[2 * BS + 512:2 * BS + 1024] == b"u" * 512
    fs.close(fd)


def test_misaligned_dio_is_einval(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    with pytest.raises(OSError) as ei:
        fs.pwrite(fd, abuf(b"x" * 100), 0)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        fs.pwrite(fd, abuf(b"x" * 512), 7)
    assert ei.value.errno == errno.EINVAL
    fs.close(fd)


def test_unaligned_overwrite_uses_shared_overwrite_only_fast_path(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    fs.pwrite(fd, abuf(b"a" * 4 * BS), 0)
    st = fs.sb.stats
    before = st["dio_overwrite_only_retry"]
    fs.pwrite(fd, abuf(b"b" * 512), BS + 512)             # written extent: fast path works
    assert st["dio_overwrite_only_retry"] == before
    fs.ftruncate(fd, 8 * BS)                               # blocks 4..7: hole inside EOF
    fs.pwrite(fd, abuf(b"c" * 512), 5 * BS + 512)         # needs allocation: retried exclusive
    assert st["dio_overwrite_only_retry"] == before + 1
    d = fs.pread(fd, 8 * BS, 0)
    assert d[BS + 512:BS + 1024] == b"b" * 512 and d[5 * BS:5 * BS + 512] == bytes(512)
    assert d[5 * BS + 512:5 * BS + 1024] == b"c" * 512
    fs.close(fd)


def test_fsync_never_takes_i_rwsem(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR, 0o644)
    fs.write(fd, b"x" * 10000)
    inode = inode_of(fs, "/f")
    with lockdep.checking(True):
        inode.i_rwsem.down_write()
        try:
            done = []
            t = threading.Thread(target=lambda: (fs.fsync(fd), done.append(1)))
            t.start()
            t.join(10)
            assert done == [1]
        finally:
            inode.i_rwsem.up_write()
    fs.close(fd)


def test_odsync_dio_and_buffered_writes_survive_a_power_cut():
    dev = RamDev(64 << 20, 512, volatile_cache=True)
    api.mkfs(dev, personality=P)
    fs = api.mount(dev, personality=P)
    fd = fs.open("/d", os.O_CREAT | os.O_RDWR | O_DIRECT | os.O_DSYNC, 0o644)
    fs.pwrite(fd, abuf(b"D" * 3 * BS), 0)                  # extending: size logged + forced
    fd2 = fs.open("/b", os.O_CREAT | os.O_RDWR | os.O_DSYNC, 0o644)
    fs.pwrite(fd2, b"B" * 5000, 0)                          # buffered + O_DSYNC
    for seed in range(4):
        img = RamDev(dev.size, 512, data=dev.crash(seed=seed))
        with api.mount(img, personality=P) as f2:
            assert f2.stat("/d").st_size == 3 * BS
            assert f2.pread(f2.open("/d", os.O_RDONLY), 3 * BS, 0) == b"D" * 3 * BS
            assert f2.pread(f2.open("/b", os.O_RDONLY), 5000, 0) == b"B" * 5000
        r = api.fsck(img, personality=P)
        assert r.clean, r.errors
    fs.unmount()


def test_async_dio_write_completes_through_reap(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    handles = [fs.submit_pwrite(fd, abuf(bytes([65 + i]) * BS), i * BS) for i in range(4)]
    results = {}
    while len(results) < 4:
        for h, res in fs.reap(1, timeout=10):
            results[h] = res
    assert all(results[h] == BS for h in handles)
    assert fs.fstat(fd).st_size == 4 * BS
    assert fs.pread(fd, 4 * BS, 0) == b"".join(bytes([65 + i]) * BS for i in range(4))
    fs.close(fd)


def test_buffered_writes_use_delayed_allocation(fs):
    free0 = fs.statvfs("/").f_bfree
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR, 0o644)
    fs.write(fd, b"w" * 10 * BS)
    inode = inode_of(fs, "/f")
    assert extents(fs, "/f") == [] and inode.delalloc == [[0, 10]]
    assert fs.statvfs("/").f_bfree == free0 - 10           # reserved, counted as used
    assert fs.fstat(fd).st_blocks == 10 * BS // 512
    fs.fsync(fd)
    ext = extents(fs, "/f")
    assert inode.delalloc == [] and sum(e[2] for e in ext) == 10
    assert all(not e[3] & fmt.EXT_UNWRITTEN for e in ext)
    assert inode.disk_size == 10 * BS
    fs.close(fd)


def test_fallocate_modes(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR, 0o644)
    fs.fallocate(fd, 0, 0, 8 * BS)                         # default: size grows
    assert fs.fstat(fd).st_size == 8 * BS
    assert all(e[3] & fmt.EXT_UNWRITTEN for e in extents(fs, "/f"))
    assert fs.pread(fd, 8 * BS, 0) == bytes(8 * BS)
    fs.pwrite(fd, b"x" * 8 * BS, 0)
    fs.fsync(fd)
    fs.fallocate(fd, api.FALLOC_FL_PUNCH_HOLE | api.FALLOC_FL_KEEP_SIZE, BS + 100, 2 * BS)
    d = fs.pread(fd, 8 * BS, 0)
    assert d[:BS + 100] == b"x" * (BS + 100) and d[BS + 100:3 * BS + 100] == bytes(2 * BS)
    assert d[3 * BS + 100:] == b"x" * (5 * BS - 100)
    assert fs.lseek(fd, 0, os.SEEK_HOLE) == 2 * BS         # block 2 fully punched
    assert fs.lseek(fd, 2 * BS, os.SEEK_DATA) == 3 * BS
    fs.fallocate(fd, api.FALLOC_FL_ZERO_RANGE, 4 * BS, 6 * BS)   # past EOF: size grows
    assert fs.fstat(fd).st_size == 10 * BS
    assert fs.lseek(fd, 4 * BS, os.SEEK_HOLE) == 4 * BS    # unwritten, nothing cached: hole
    assert fs.pread(fd, 6 * BS, 4 * BS) == bytes(6 * BS)
    fs.fallocate(fd, api.FALLOC_FL_KEEP_SIZE, 20 * BS, BS)
    assert fs.fstat(fd).st_size == 10 * BS
    with pytest.raises(OSError) as ei:
        fs.lseek(fd, 10 * BS - 1 + 1, os.SEEK_DATA)
    assert ei.value.errno == errno.ENXIO
    fs.close(fd)


def test_truncate_down_frees_and_zeroes_tail_then_extend_reads_zeros(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR, 0o644)
    fs.write(fd, b"y" * 5 * BS)
    fs.fsync(fd)
    free = fs.statvfs("/").f_bfree
    fs.ftruncate(fd, BS + 10)
    assert fs.statvfs("/").f_bfree == free + 3
    fs.ftruncate(fd, 3 * BS)
    assert fs.pread(fd, 3 * BS, 0) == b"y" * (BS + 10) + bytes(2 * BS - 10)
    fs.close(fd)


def test_many_extents_spill_into_bmbt_and_back(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    for i in range(0, 80, 2):                               # 40 separate extents
        fs.pwrite(fd, abuf(bytes([i]) * BS), i * BS)
    inode = inode_of(fs, "/f")
    assert inode.di.data_format == fmt.FMT_BTREE and inode.di.nextents == 40
    fs.close(fd)
    inode.bmap = None                                       # re-read the map from the bmbt
    fd = fs.open("/f", os.O_RDWR, 0)
    for i in range(0, 80, 2):
        assert fs.pread(fd, 1, i * BS) == bytes([i])
    fs.ftruncate(fd, 10 * BS)
    assert inode.di.data_format == fmt.FMT_EXTENTS and inode.di.nextents == 5
    fs.close(fd)


def test_concurrent_dio_writers_buffered_writers_and_fsync(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    fs.ftruncate(fd, 64 * BS)                               # all writes below are inside EOF
    errors = []

    def dio_writer(k):
        try:
            for i in range(k, 64, 4):
                fs.pwrite(fd, abuf(bytes([i + 1]) * BS), i * BS)
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(e)

    def buffered_writer(n):
        try:
            bfd = fs.open(f"/b{n}", os.O_CREAT | os.O_RDWR, 0o644)
            for i in range(40):
                fs.pwrite(bfd, bytes([n + 1]) * 3000, i * 3000)
                if i % 10 == 0:
                    fs.fsync(bfd)
            fs.close(bfd)
        except Exception as e:          # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=dio_writer, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=buffered_writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    data = fs.pread(fd, 64 * BS, 0)
    assert all(data[i * BS:(i + 1) * BS] == bytes([i + 1]) * BS for i in range(64))
    for n in range(2):
        assert fs.pread(fs.open(f"/b{n}", os.O_RDONLY), 120000, 0) == bytes([n + 1]) * 120000
    fs.close(fd)


def test_async_dio_on_an_image_file_returns_eiocbqueued_and_completes(tmp_path, monkeypatch):
    from ufs.iomap import EIOCBQUEUED
    img = tmp_path / "x.img"
    try:
        api.mkfs(str(img), personality=P, size="64M")
    except OSError as e:
        pytest.skip(f"O_DIRECT image files unsupported here: {e}")
    rets = []
    orig = XfsFileOps.write_iter

    def write_iter(self_, iocb, data):
        r = orig(self_, iocb, data)
        rets.append(r)
        return r
    monkeypatch.setattr(XfsFileOps, "write_iter", write_iter)
    with api.mount(str(img), personality=P) as fs:
        fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
        fs.ftruncate(fd, 32 * BS)
        hs = [fs.submit_pwrite(fd, abuf(bytes([i + 1]) * BS), i * BS) for i in range(32)]
        got = {}
        while len(got) < len(hs):
            for h, res in fs.reap(1, timeout=10):
                got[h] = res
        assert all(got[h] == BS for h in hs)
        # an extending async write completes on the workqueue and moves i_size there
        h = fs.submit_pwrite(fd, abuf(b"E" * BS), 40 * BS)
        while not h.done:
            fs.reap(1, timeout=10)
        assert h.result == BS and fs.fstat(fd).st_size == 41 * BS
        data = fs.pread(fd, 41 * BS, 0)
        assert all(data[i * BS:(i + 1) * BS] == bytes([i + 1]) * BS for i in range(32))
        assert data[40 * BS:] == b"E" * BS
        fs.close(fd)
    if EIOCBQUEUED not in rets:
        pytest.skip("the device completed every write inline (no EIOCBQUEUED path here)")
    assert api.fsck(str(img), personality=P).clean


def test_o_append_buffered_and_direct(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | os.O_APPEND, 0o644)
    fs.write(fd, b"a" * 100)
    fs.pwrite(fd, b"b" * 50, 0)                            # O_APPEND ignores the offset
    assert fs.pread(fd, 200, 0) == b"a" * 100 + b"b" * 50
    fs.ftruncate(fd, BS)
    fs.close(fd)
    fd = fs.open("/f", os.O_RDWR | os.O_APPEND | O_DIRECT | os.O_SYNC)
    assert fs.write(fd, abuf(b"c" * BS)) == BS
    assert fs.fstat(fd).st_size == 2 * BS
    assert fs.pread(fd, BS, BS) == b"c" * BS
    fs.close(fd)


def test_enospc_from_delalloc_and_dio_then_space_comes_back():
    dev = RamDev(16 << 20, 512)
    api.mkfs(dev, personality=P)
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/fill", os.O_CREAT | os.O_RDWR, 0o644)
        chunk = b"f" * (256 << 10)
        written = 0
        with pytest.raises(OSError) as ei:
            while True:
                written += fs.write(fd, chunk)
        assert ei.value.errno == errno.ENOSPC and written > 8 << 20
        fs.fsync(fd)                                       # every reservation can be allocated
        dfd = fs.open("/d", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
        with pytest.raises(OSError) as ei:
            for i in range(10000):
                fs.pwrite(dfd, abuf(b"d" * (64 << 10)), i * (64 << 10))
        assert ei.value.errno == errno.ENOSPC
        fs.close(dfd)
        fs.close(fd)
        fs.unlink("/fill")
        fd = fs.open("/again", os.O_CREAT | os.O_RDWR, 0o644)
        assert fs.write(fd, chunk * 8) == len(chunk) * 8
        fs.fsync(fd)
        fs.close(fd)
    r = api.fsck(dev, personality=P)
    assert r.clean, r.errors


def test_concurrent_sub_block_writes_to_one_new_block_lose_nothing(fs):
    """Unaligned writes into the same unallocated block: each zeroes the rest of the block
    it allocates, so without the exclusive lock + inode_dio_wait + FORCE_WAIT one would wipe
    the other's sector (the race XFS serialises)."""
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    fs.ftruncate(fd, 16 * BS)
    errors = []

    def writer(k):
        try:
            for blk in range(16):
                fs.pwrite(fd, abuf(bytes([k + 1]) * 512), blk * BS + k * 512)
        except Exception as e:          # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    data = fs.pread(fd, 16 * BS, 0)
    for blk in range(16):
        for k in range(8):
            off = blk * BS + k * 512
            assert data[off:off + 512] == bytes([k + 1]) * 512, (blk, k)
    fs.close(fd)


def test_nowait_dio_never_allocates_or_sleeps(fs):
    from ufs.vfs.file import File
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    fs.pwrite(fd, abuf(b"a" * 2 * BS), 0)
    fs.ftruncate(fd, 4 * BS)                                # blocks 2, 3: hole inside EOF
    inode = inode_of(fs, "/f")
    f = File(inode, os.O_RDWR | O_DIRECT, inode.i_fop)
    ok = f.kiocb(0, write=True, nowait=True)
    assert inode.i_fop.write_iter(ok, abuf(b"n" * BS)) == BS          # overwrite: fine
    hole = f.kiocb(2 * BS, write=True, nowait=True)
    with pytest.raises(OSError) as ei:
        inode.i_fop.write_iter(hole, abuf(b"n" * BS))                  # needs an allocation
    assert ei.value.errno == errno.EAGAIN
    with fs.sb.meta_lock:                                              # metadata busy elsewhere
        t = threading.Thread(target=lambda: errs.append(_try(inode, f)))
        errs = []
        t.start()
        t.join(10)
    assert errs == [errno.EAGAIN]
    assert fs.pread(fd, BS, 0) == b"n" * BS
    fs.close(fd)


def _try(inode, f):
    try:
        inode.i_fop.write_iter(f.kiocb(0, write=True, nowait=True), abuf(b"m" * BS))
    except OSError as e:
        return e.errno
    return 0


def test_enotblk_from_cache_invalidation_falls_back_to_buffered(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR, 0o644)
    fs.write(fd, b"c" * 4 * BS)                             # cached pages
    inode = inode_of(fs, "/f")
    inode.i_mapping.fail_invalidate = errno.EBUSY          # the engine turns this into ENOTBLK
    dfd = fs.open("/f", os.O_RDWR | O_DIRECT)
    assert fs.pwrite(dfd, abuf(b"d" * BS), BS) == BS
    assert fs.sb.stats["dio_buffered_fallback"] == 1
    inode.i_mapping.fail_invalidate = None
    assert fs.pread(fd, 4 * BS, 0) == b"c" * BS + b"d" * BS + b"c" * 2 * BS
    fs.close(dfd)
    fs.close(fd)

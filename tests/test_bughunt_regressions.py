"""Regression tests for bugs found by the long Hypothesis/crash/ENOSPC campaigns (bug hunt of
26 Nov).  Each test is the minimised reproducer of one bug, through the public API on a RamDev,
and fails without its fix."""
from __future__ import annotations

import errno
import os

import pytest

from ufs import api
from ufs.fs_btrfslike import plugin as btrfs_plugin
from ufs.iomap import RamDev, aligned_buffer

BTRFS = btrfs_plugin.PERSONALITY


def _fill_btrfs(fs):
    """Fill with 1 MiB buffered writes until ENOSPC: some space is left, less than 1 MiB."""
    fd = fs.open("/fill", os.O_CREAT | os.O_RDWR, 0o644)
    pos = 0
    with pytest.raises(OSError) as ei:
        while True:
            pos += fs.pwrite(fd, b"f" * (1 << 20), pos)
    assert ei.value.errno == errno.ENOSPC
    fs.fsync(fd)
    fs.close(fd)


def test_btrfs_dio_write_failing_with_enospc_leaves_i_size_unchanged():
    # The first mapping of the write got an extent, a later one hit ENOSPC: the error path
    # "undid" the raised i_size only down to the write's start offset, so a new file showed
    # 64 KiB of zeros that a remount then lost (fs_btrfslike/file.py _write_end_io).
    dev = RamDev(16 << 20, 512)
    api.mkfs(dev, personality=BTRFS)
    fs = api.mount(dev, personality=BTRFS)
    try:
        _fill_btrfs(fs)
        fd = fs.open("/g", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        with pytest.raises(OSError) as ei:
            fs.pwrite(fd, aligned_buffer(8 << 20), 65536)
        assert ei.value.errno == errno.ENOSPC
        assert fs.fstat(fd).st_size == 0
        fs.fsync(fd)
        fs.close(fd)
    finally:
        fs.unmount()
    with api.mount(dev, personality=BTRFS) as fs:
        assert fs.stat("/g").st_size == 0
    assert api.fsck(dev, personality=BTRFS).clean


def test_btrfs_fallocate_running_out_part_way_is_all_or_nothing_and_fsck_clean():
    # The up-front space check passed, the first gap got its extent, and the tree blocks its
    # insert copied on write ate the space the second gap needed: the ENOSPC left the first
    # extent in the tree and never rewrote the inode item (on-disk nbytes != extents: fsck
    # unclean after a clean unmount).  fs_btrfslike/file.py _prealloc.
    BS = 4096
    dev = RamDev(16 << 20, 512)
    api.mkfs(dev, personality=BTRFS)
    fs = api.mount(dev, personality=BTRFS)
    try:
        _fill_btrfs(fs)
        n = 0
        with pytest.raises(OSError):
            while True:                     # 4 KiB files until the device is full
                fd = fs.open(f"/s{n}", os.O_CREAT | os.O_RDWR, 0o644)
                n += 1
                try:
                    fs.pwrite(fd, b"s" * BS, 0)
                finally:
                    fs.close(fd)
        for i in range(0, n - 1, 2):
            fs.unlink(f"/s{i}")
        fd = fs.open("/p", os.O_CREAT | os.O_RDWR, 0o644)
        fs.pwrite(fd, b"p" * BS, 8 * BS)    # the range below has a gap on each side of it
        fs.sync()                           # the next change copies the tree path on write
        avail = fs.sb.tm.extents.data_avail()
        with pytest.raises(OSError) as ei:
            fs.fallocate(fd, api.FALLOC_FL_KEEP_SIZE, 0, avail + BS)
        assert ei.value.errno == errno.ENOSPC
        assert fs.fstat(fd).st_blocks == BS // 512          # nothing kept
        assert fs.pread(fd, 9 * BS, 0) == bytes(8 * BS) + b"p" * BS
        fs.close(fd)
    finally:
        fs.unmount()
    rep = api.fsck(dev, personality=BTRFS)
    assert rep.clean, rep.errors


def test_xfs_cancelled_allocation_leaves_no_stale_extent_in_memory():
    # A DIO write's transaction maps a new extent (ExtentMap.set_range changes the in-memory
    # list), then the bmbt spill needs a node and the device is full: the transaction is
    # cancelled (the block allocation is undone) but the inode was never joined to it, so
    # the in-memory map keeps the extent.  The unlink then frees those blocks a second time
    # (CorruptError "double free") and leaves an orphan on the unlinked list.
    from ufs.fs_xfslike import format as xfmt
    from ufs.fs_xfslike import plugin as xfs_plugin
    xfs = xfs_plugin.PERSONALITY
    BS = 4096
    dev = RamDev(16 << 20, 512)
    api.mkfs(dev, personality=xfs)
    fs = api.mount(dev, personality=xfs)
    try:
        cap = xfmt.DiskInode.fork_size(fs.sb.inode_size) // xfmt.EXTENT.size
        buf = aligned_buffer(BS)
        fd = fs.open("/f", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        for i in range(cap):                        # exactly a full fork: every other block
            fs.pwrite(fd, buf, 2 * i * BS)
        fill = fs.open("/fill", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        pos = 0
        with pytest.raises(OSError):
            while True:
                pos += fs.pwrite(fill, buf, pos)
        fs.ftruncate(fill, pos - BS)                # exactly one block free again
        fs.fsync(fill)
        fs.close(fill)
        with pytest.raises(OSError) as ei:
            fs.pwrite(fd, buf, 1000 * BS)           # one more extent: needs a bmbt node too
        assert ei.value.errno == errno.ENOSPC
        fs.close(fd)
        fs.unlink("/f")                             # CorruptError (double free) without the fix
    finally:
        fs.unmount()
    rep = api.fsck(dev, personality=xfs)
    assert rep.clean, rep.errors


def test_xfs_fallocate_growing_the_file_reads_zeros_past_the_old_eof():
    # A DIO write that fails with ENOSPC has already overwritten the EOF block in place,
    # bytes past EOF included (as on Linux).  Growing the file with fallocate (mode 0) then
    # exposed those bytes instead of zeros; ftruncate and pwrite past EOF zero them.
    from ufs.fs_xfslike import plugin as xfs_plugin
    xfs = xfs_plugin.PERSONALITY
    BS = 4096
    dev = RamDev(16 << 20, 512)
    api.mkfs(dev, personality=xfs)
    fs = api.mount(dev, personality=xfs)
    try:
        fd = fs.open("/f", os.O_CREAT | os.O_RDWR, 0o644)
        fs.pwrite(fd, b"a" * 10, 0)
        fs.fsync(fd)
        dfd = fs.open("/f", os.O_RDWR | os.O_DIRECT)
        fill = fs.open("/fill", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        buf = aligned_buffer(BS)
        pos = 0
        with pytest.raises(OSError):
            while True:
                pos += fs.pwrite(fill, buf, pos)
        two = aligned_buffer(2 * BS)
        memoryview(two)[:] = b"b" * (2 * BS)
        with pytest.raises(OSError) as ei:
            fs.pwrite(dfd, two, 0)          # block 0 overwritten in place, block 1: ENOSPC
        assert ei.value.errno == errno.ENOSPC
        assert fs.fstat(fd).st_size == 10
        fs.fallocate(fd, 0, 0, BS)           # grows to 4096 inside the allocated block
        assert fs.fstat(fd).st_size == BS
        assert not any(fs.pread(fd, BS, 0)[10:])
        for f in (fd, dfd, fill):
            fs.close(f)
    finally:
        fs.unmount()
    with api.mount(dev, personality=xfs) as fs:
        fd = fs.open("/f", os.O_RDONLY)
        assert not any(fs.pread(fd, BS, 0)[10:])


def test_xfs_crash_after_log_full_checkpoint_keeps_freed_dir_node_images():
    # Directory churn (creates, unlinks, renames, links) with crash images.  A transaction
    # freeing a dirbt node dropped the node's last image from the AIL at commit; a
    # checkpoint forced by a full log before the free reached the log then moved the tail
    # past the records holding that image without writing it in place.  A crash image with
    # the (unwritten) free lost had its directory pointing at a block holding a former
    # file's data: "dirbt node: bad magic" (fs_xfslike/log.py _commit/_push).  This is the
    # campaign workload of seed 64 (tools: /tmp/bughunt_dirs.py), which hit it reliably.
    import random
    from ufs.fs_xfslike import plugin as xfs_plugin
    xfs = xfs_plugin.PERSONALITY
    dirs = ["/d0", "/d1", "/d1/sub"]

    def tree(fs):
        out = set()
        for d in dirs:
            out |= {d + "/" + n for n in fs.listdir(d) if d + "/" + n not in dirs}
        return out

    r = random.Random(64)
    dev = RamDev(32 << 20, 512, volatile_cache=True)
    api.mkfs(dev, personality=xfs)
    fs = api.mount(dev, personality=xfs)
    model, images = {}, []
    try:
        for d in dirs:
            fs.mkdir(d, 0o755)
        fs.sync()
        for step in range(r.choice([300, 800])):
            k = r.randrange(100)
            d = r.choice(dirs)
            name = f"{d}/n{r.randrange(400):03d}_" + "x" * r.choice([0, 0, 30, 200])
            if k < 45:
                if name in model:
                    continue
                fd = fs.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                sz = r.choice([0, 0, 10, 5000])
                if sz:
                    fs.write(fd, b"z" * sz)
                fs.close(fd)
                model[name] = sz
            elif k < 70 and model:
                victim = r.choice(sorted(model))
                fs.unlink(victim)
                del model[victim]
            elif k < 85 and model:
                src = r.choice(sorted(model))
                if src != name:
                    fs.rename(src, name)
                    model[name] = model.pop(src)
            elif k < 92 and model:
                src = r.choice(sorted(model))
                if name not in model:
                    fs.link(src, name)
                    model[name] = model[src]
            elif k < 96:
                fs.sync()
                images.append((dev.crash(seed=step, keep_probability=r.choice([0.0, 1.0, 0.5])),
                               set(model)))
            else:
                images.append((dev.crash(seed=step, keep_probability=0.5), None))
    finally:
        fs.unmount()
    for img, want in images:
        d2 = RamDev(len(img), 512, data=img)
        with api.mount(d2, personality=xfs) as f2:
            got = tree(f2)
            if want is not None:
                assert got == want
        rep = api.fsck(d2, personality=xfs)
        assert rep.clean, rep.errors

"""btrfslike when data fills the device: ENOSPC at the call, never at the commit.

A commit copies tree nodes, so it needs free space however full the data is; the extent
tree keeps a metadata reserve data may not take (btrfs's global block reserve).  Whatever
fills the device (fallocate, buffered writes, O_DIRECT writes), the failing call gets
ENOSPC, nothing half-done is kept by an fallocate that fails, and unmount, fsck and the
next mount still work with every byte written before intact.
"""
from __future__ import annotations

import errno
import os

import pytest

from ufs import api
from ufs.iomap.bdev import aligned_buffer

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    img = str(tmp_path / "b.img")
    api.mkfs(img, "btrfslike", size=64 * MiB)
    yield img
    os.unlink(img)


def _fsck_clean(img):
    rep = api.fsck(img)
    assert rep.clean, rep.errors


def test_fallocate_beyond_the_device_is_enospc_and_takes_nothing(image):
    fs = api.mount(image)
    try:
        fd = fs.open("/f", os.O_RDWR | os.O_CREAT, 0o644)
        fs.pwrite(fd, b"x" * 8192, 0)
        before = fs.statvfs()
        with pytest.raises(OSError) as ei:
            fs.fallocate(fd, 0, 0, 1 << 30)
        assert ei.value.errno == errno.ENOSPC
        after = fs.statvfs()
        # nothing taken (a commit may even have returned space freed earlier)
        assert after.f_bfree >= before.f_bfree and fs.fstat(fd).st_size == 8192
        assert after.f_bavail < after.f_bfree       # the metadata reserve is not offered
        # a preallocation that fits still works, and fits below f_bavail
        fs.fallocate(fd, 0, 8192, 4 * MiB)
        assert fs.fstat(fd).st_size == 8192 + 4 * MiB
        fs.close(fd)
    finally:
        fs.unmount()
    _fsck_clean(image)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "odirect"])
def test_writes_until_enospc_then_unmount_and_remount(image, direct):
    fs = api.mount(image)
    chunk = 1 * MiB
    buf = memoryview(aligned_buffer(chunk))
    written = 0
    try:
        fd = fs.open("/fill", os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o644)
        while True:
            buf[:8] = written.to_bytes(8, "little")
            try:
                n = fs.pwrite(fd, buf, written)
                if not direct:
                    fs.fsync(fd)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
            assert n == chunk
            written += n
            assert written < 64 * MiB, "a 64 MiB device took more than 64 MiB of data"
        assert written >= 32 * MiB              # the reserve is a small part of the device
        assert fs.statvfs().f_bavail * 4096 < chunk
        fs.fsync(fd)
        fs.close(fd)
        fs.mkdir("/still-room-for-metadata")    # the commit path does not run dry either
    finally:
        fs.unmount()                             # must not fail: the reserve covers the commit
    _fsck_clean(image)
    fs = api.mount(image)
    try:
        fd = fs.open("/fill", os.O_RDONLY)
        assert fs.fstat(fd).st_size >= written
        for pos in range(0, written, chunk):
            assert int.from_bytes(fs.pread(fd, 8, pos), "little") == pos
        fs.close(fd)
    finally:
        fs.unmount()

"""xfslike space management: filling the device, and the fallocate modes it answers.

When data fills the device: ENOSPC at the call, never a lost write later.

Delayed allocation promises blocks at write time and allocates them at write-back; the
promise must count only blocks data can really get (not the AGFL or the reserve kept to
refill it), or write-back fails at unmount and the buffered data is lost.
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
    img = str(tmp_path / "x.img")
    api.mkfs(img, "xfslike", size=64 * MiB)
    yield img
    os.unlink(img)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "odirect"])
def test_fill_then_unmount_fsck_remount_and_free_again(image, direct):
    chunk = MiB
    buf = memoryview(aligned_buffer(chunk))
    written = 0
    fs = api.mount(image)
    try:
        fd = fs.open("/fill", os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o644)
        while True:
            buf[:8] = written.to_bytes(8, "little")
            try:
                assert fs.pwrite(fd, buf, written) == chunk
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
            written += chunk
            assert written <= 64 * MiB
        assert written >= 48 * MiB
        fs.close(fd)
    finally:
        fs.unmount()                    # write-back of everything accepted must succeed
    rep = api.fsck(image)
    assert rep.clean, rep.errors
    fs = api.mount(image)
    try:
        fd = fs.open("/fill", os.O_RDONLY)
        assert fs.fstat(fd).st_size == written
        for pos in range(0, written, chunk):
            assert int.from_bytes(fs.pread(fd, 8, pos), "little") == pos
        fs.close(fd)
        fs.unlink("/fill")              # a full filesystem can still free space
        fd = fs.open("/again", os.O_RDWR | os.O_CREAT, 0o644)
        assert fs.pwrite(fd, b"y" * chunk, 0) == chunk
        fs.fsync(fd)
        fs.close(fd)
    finally:
        fs.unmount()
    assert api.fsck(image).clean


@pytest.mark.parametrize("mode,name", [(0x08, "collapse"), (0x20, "insert")])
def test_collapse_and_insert_are_eopnotsupp_and_change_nothing(image, mode, name):
    with api.mount(image) as fs:
        fd = fs.open("/f", os.O_RDWR | os.O_CREAT, 0o644)
        fs.pwrite(fd, bytes(range(256)) * 256, 0)
        before = fs.fstat(fd)
        with pytest.raises(OSError) as ei:
            fs.fallocate(fd, mode, 0, 4096)
        assert ei.value.errno == errno.EOPNOTSUPP, name
        after = fs.fstat(fd)
        assert (after.st_size, after.st_blocks) == (before.st_size, before.st_blocks)
        assert fs.pread(fd, 65536, 0) == bytes(range(256)) * 256
        # unshare: nothing is shared in xfslike, so it preallocates like mode 0
        fs.fallocate(fd, 0x40, 65536, 65536)
        assert fs.fstat(fd).st_size == 131072 and fs.pread(fd, 16, 65536) == bytes(16)
        fs.close(fd)


def test_freeing_the_tail_of_the_unlinked_list_does_not_orphan_a_reused_inode(image):
    """Two files unlinked while open: closing the first frees the list's tail, whose
    next_unlinked is 0 and which is not the head.  It must leave the list, or the next
    file to reuse its number is freed by the next mount's orphan processing."""
    fs = api.mount(image)
    try:
        a = fs.open("/a", os.O_CREAT | os.O_RDWR, 0o644)
        b = fs.open("/b", os.O_CREAT | os.O_RDWR, 0o644)
        fs.unlink("/a")
        fs.unlink("/b")
        fs.close(a)
        n = fs.open("/new", os.O_CREAT | os.O_RDWR, 0o644)
        fs.pwrite(n, b"keep", 0)
        fs.close(n)
        fs.close(b)
    finally:
        fs.unmount()
    assert api.fsck(image).clean
    with api.mount(image) as fs:
        fd = fs.open("/new", os.O_RDONLY)
        assert fs.pread(fd, 4, 0) == b"keep"
        fs.close(fd)
    assert api.fsck(image).clean

"""btrfslike reflinks (clone_range) and snapshots: sharing through refcounts, COW isolation,
and space accounting after deletes (bytes_used / statvfs back to the baseline once the last
reference goes and the transaction commits).  fsck is clean after every step.
"""
from __future__ import annotations

import errno
import os

import pytest

from ufs import api
from ufs.fs_btrfslike import plugin
from ufs.fs_btrfslike.fsck import check_fs
from ufs.fs_btrfslike.inode import extent_items
from ufs.iomap import RamDev

P = plugin.PERSONALITY
SIZE = 64 << 20
BS = 4096
MB = 1 << 20


@pytest.fixture
def dev():
    d = RamDev(SIZE, 512)
    api.mkfs(d, personality=P)
    return d


def _write(fs, path, data, pos=0):
    fd = fs.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT)
    assert fs.pwrite(fd, data, pos) == len(data)
    fs.close(fd)


def _read(fs, path):
    fd = fs.open(path, os.O_RDONLY)
    try:
        return fs.pread(fd, fs.fstat(fd).st_size + 1, 0)
    finally:
        fs.close(fd)


def _used(fs):
    fs.sync()
    return fs.sb.tm.sb.bytes_used


def _clean(fs):
    """fsck of the committed state of a mounted filesystem (after a sync)."""
    fs.sync()
    problems, _stats = check_fs(fs.sb.tm, fs.sb.dev)
    assert problems == []


def test_reflink_shares_data_and_space_returns_after_both_deletes(dev):
    with api.mount(dev, personality=P) as fs:
        base = _used(fs)
        data = os.urandom(MB)
        _write(fs, "/a", data)
        after_a = _used(fs)
        assert after_a - base >= MB
        fs.close(fs.open("/b", os.O_CREAT | os.O_RDWR))
        fs.sb.clone_range(fs._inode("/a"), 0, fs._inode("/b"), 0, MB)
        after_clone = _used(fs)
        assert after_clone - after_a < 64 * 1024          # metadata only, no data copied
        assert _read(fs, "/b") == data
        a_ext = extent_items(fs.sb.tm.tree(5), fs._inode("/a").objectid, 0, MB)
        assert fs.sb.tm.extents.refs(a_ext[0][1].disk_bytenr) == 2
        _clean(fs)
        # COW: overwriting a's first half leaves b untouched and costs new space
        _write(fs, "/a", b"\x01" * (MB // 2))
        assert _read(fs, "/b") == data
        assert _read(fs, "/a") == b"\x01" * (MB // 2) + data[MB // 2:]
        assert _used(fs) - after_clone >= MB // 2
        _clean(fs)
        fs.unlink("/b")
        assert _used(fs) - after_clone >= MB // 2           # a still references the old extent
        fs.unlink("/a")
        assert _used(fs) - base < 64 * 1024                 # every data byte is back
        _clean(fs)
    assert api.fsck(dev, personality=P).clean


def test_reflink_rules(dev):
    with api.mount(dev, personality=P) as fs:
        _write(fs, "/a", b"a" * 3 * BS)
        fs.close(fs.open("/b", os.O_CREAT | os.O_RDWR))
        a, b = fs._inode("/a"), fs._inode("/b")
        with pytest.raises(OSError) as ei:
            fs.sb.clone_range(a, 100, b, 0, BS)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            fs.sb.clone_range(a, 0, a, BS, 2 * BS)        # overlapping, same file
        fs.sb.clone_range(a, 0, a, 3 * BS, 3 * BS)         # same file, disjoint: fine
        assert _read(fs, "/a") == b"a" * 6 * BS
        fs.sb.clone_range(a, BS, b, 8 * BS, BS)            # past b's EOF: a hole before
        assert _read(fs, "/b") == bytes(8 * BS) + b"a" * BS
        _clean(fs)


def test_snapshot_isolation_and_space_after_delete(dev):
    with api.mount(dev, personality=P) as fs:
        base = _used(fs)
        data = os.urandom(MB)
        fs.mkdir("/dir")
        _write(fs, "/dir/f", data)
        fs.symlink("dir/f", "/ln")
        after_f = _used(fs)
        root = fs._inode("/")
        tid = fs.sb.snapshot(root, root, "snap")
        assert tid >= 256
        assert sorted(fs.listdir("/snap")) == ["dir", "ln"]
        assert _read(fs, "/snap/dir/f") == data
        assert fs.readlink("/snap/ln") == "dir/f"
        assert _used(fs) - after_f < 64 * 1024               # a snapshot copies no data
        _clean(fs)
        # changes on either side stay on that side
        _write(fs, "/dir/f", b"\x02" * BS)
        _write(fs, "/snap/dir/new", b"n" * BS)
        fs.unlink("/ln")
        assert _read(fs, "/snap/dir/f") == data
        assert _read(fs, "/dir/f")[:BS] == b"\x02" * BS
        assert not fs.exists("/dir/new") and fs.exists("/snap/ln")
        _clean(fs)
        # the original's data stays while the snapshot references it
        before_unlink = _used(fs)
        fs.unlink("/dir/f")
        assert _used(fs) >= before_unlink - 2 * BS         # only the original's new 4 KiB goes
        assert _used(fs) - base >= MB
        fs.sb.delete_snapshot(root, "snap")
        assert not fs.exists("/snap")
        assert _used(fs) - base < 64 * 1024
        _clean(fs)
    assert api.fsck(dev, personality=P).clean
    with api.mount(dev, personality=P) as fs:
        assert fs.listdir("/") == ["dir"]


def test_snapshot_survives_remount(dev):
    with api.mount(dev, personality=P) as fs:
        _write(fs, "/f", b"v1" * BS)
        root = fs._inode("/")
        fs.sb.snapshot(root, root, "s1")
        _write(fs, "/f", b"v2" * BS)
    with api.mount(dev, personality=P) as fs:
        assert _read(fs, "/s1/f") == b"v1" * BS
        assert _read(fs, "/f") == b"v2" * BS
        st = fs.stat("/s1/f")
        assert st.st_ino != fs.stat("/f").st_ino             # one VFS inode space
        with pytest.raises(OSError) as ei:
            fs.rename("/s1/f", "/g")
        assert ei.value.errno == errno.EXDEV
    assert api.fsck(dev, personality=P).clean


def test_empty_subvolume_create_use_delete(dev):
    with api.mount(dev, personality=P) as fs:
        base = _used(fs)
        root = fs._inode("/")
        fs.sb.create_subvolume(root, "vol")
        assert fs.listdir("/vol") == [] and fs.stat("/vol").st_nlink == 2
        _write(fs, "/vol/f", b"v" * MB)
        fs.mkdir("/vol/d")
        _clean(fs)
        with pytest.raises(OSError) as ei:
            fs.link("/vol/f", "/outside")
        assert ei.value.errno == errno.EXDEV
        fs.sb.delete_snapshot(root, "vol")
        assert fs.listdir("/") == [] and _used(fs) - base < 64 * 1024
        _clean(fs)

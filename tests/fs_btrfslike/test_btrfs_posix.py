"""btrfslike through the public API: POSIX behaviour against memfs (the model), persistence
across remounts, xattrs/symlinks/hard links, inode flags, and fsck after every sequence.

The differential machine is ufs.testing.posix_ops.PosixMachine with memfs as the reference;
the allowed differences are those listed there (btrfslike reports directory nlink as
2 + subdirectories like memfs, so link counts are compared too).
"""
from __future__ import annotations

import errno
import os
import stat

import pytest
from hypothesis import HealthCheck, settings

from ufs import api
from ufs.fs_btrfslike import plugin
from ufs.iomap import RamDev
from ufs.testing import memfs
from ufs.testing.posix_ops import PosixMachine, UfsTarget

P = plugin.PERSONALITY
M = memfs.personality()


def _btrfs_dev(size=64 << 20):
    dev = RamDev(size, 512)
    api.mkfs(dev, personality=P)
    return dev


class _BtrfsTarget(UfsTarget):
    name = "btrfslike"

    def __init__(self):
        self.dev = _btrfs_dev()
        super().__init__(api.mount(self.dev, personality=P))

    def cleanup(self):
        self.fs.unmount()
        report = api.fsck(self.dev, personality=P)
        assert report.clean, report.errors


class MemfsVsBtrfs(PosixMachine):
    def make_targets(self):
        d = RamDev(1 << 20, 512)
        api.mkfs(d, personality=M)
        return [UfsTarget(api.mount(d, personality=M)), _BtrfsTarget()]


TestMemfsVsBtrfs = MemfsVsBtrfs.TestCase
TestMemfsVsBtrfs.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                     suppress_health_check=list(HealthCheck))


@pytest.fixture
def dev():
    return _btrfs_dev()


@pytest.fixture
def fs(dev):
    with api.mount(dev, personality=P) as f:
        yield f


def test_probe_finds_btrfslike(dev):
    with api.mount(dev) as fs:                  # no personality given: the registry probes
        assert fs.fstype == "btrfslike"


def test_namespace_survives_remount_and_fsck_is_clean(dev):
    with api.mount(dev, personality=P) as fs:
        fs.makedirs("/a/b/c")
        fd = fs.open("/a/b/c/f", os.O_CREAT | os.O_WRONLY, 0o640)
        assert fs.write(fd, b"x" * 10000) == 10000
        fs.close(fd)
        fs.link("/a/b/c/f", "/a/hard")
        fs.symlink("b/c/f", "/a/sym")
        fs.setxattr("/a/hard", "user.k", b"v" * 100)
        fs.rename("/a/b", "/a/b2")
        fs.mkdir("/gone")
        fs.rmdir("/gone")
    rep = api.fsck(dev, personality=P)
    assert rep.clean, rep.errors
    with api.mount(dev, personality=P) as fs:
        assert sorted(fs.listdir("/a")) == ["b2", "hard", "sym"]
        assert fs.readlink("/a/sym") == "b/c/f"
        st = fs.stat("/a/b2/c/f")
        assert st.st_nlink == 2 and st.st_size == 10000 and stat.S_IMODE(st.st_mode) == 0o640
        assert fs.stat("/a").st_nlink == 3 and fs.stat("/").st_nlink == 3
        assert fs.getxattr("/a/b2/c/f", "user.k") == b"v" * 100
        fd = fs.open("/a/hard", os.O_RDONLY)
        assert fs.pread(fd, 20000, 0) == b"x" * 10000
        fs.close(fd)


def test_unlinked_open_file_lives_until_close_then_space_returns(fs, dev):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR)
    fs.write(fd, os.urandom(1 << 20))
    fs.sync()
    used = fs.statvfs("/").f_bfree
    fs.unlink("/f")
    assert len(fs.pread(fd, 1 << 20, 0)) == 1 << 20
    fs.close(fd)
    fs.sync()
    assert fs.statvfs("/").f_bfree >= used + (1 << 20) // 4096


def test_orphan_left_by_a_crash_is_freed_at_mount():
    dev = RamDev(64 << 20, 512, volatile_cache=False)
    api.mkfs(dev, personality=P)
    fs = api.mount(dev, personality=P)
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR)
    fs.write(fd, b"a" * 8192)
    fs.unlink("/f")
    fs.sync()                                    # nlink 0 on disk, still open: a crash now
    img = dev.contents()
    fs.close(fd)
    fs.unmount()
    crashed = RamDev(64 << 20, 512, data=img)
    copy = RamDev(64 << 20, 512, data=img)
    rep = api.fsck(crashed, personality=P)
    assert rep.clean and len(rep.stats["orphans"]) == 1
    with api.mount(crashed, personality=P):
        pass
    rep = api.fsck(crashed, personality=P)
    assert rep.clean and rep.stats["orphans"] == []
    rep = api.fsck(copy, repair=True, personality=P)          # fsck --repair does the same
    assert rep.repaired and api.fsck(copy, personality=P).stats["orphans"] == []


def test_sparse_file_holes_and_seek(fs):
    fd = fs.open("/s", os.O_CREAT | os.O_RDWR)
    fs.pwrite(fd, b"d" * 4096, 1 << 20)
    assert fs.fstat(fd).st_size == (1 << 20) + 4096
    assert fs.pread(fd, 8, 4096) == bytes(8)
    assert fs.lseek(fd, 0, os.SEEK_DATA) == 1 << 20
    assert fs.lseek(fd, 0, os.SEEK_HOLE) == 0
    assert fs.lseek(fd, 1 << 20, os.SEEK_HOLE) == (1 << 20) + 4096


def test_truncate_down_then_up_reads_zeros(fs):
    fd = fs.open("/t", os.O_CREAT | os.O_RDWR)
    fs.write(fd, b"z" * 10000)
    fs.ftruncate(fd, 5000)
    fs.ftruncate(fd, 9000)
    assert fs.pread(fd, 10000, 0) == b"z" * 5000 + bytes(4000)
    fs.pwrite(fd, b"q", 20000)                  # grow by writing past EOF
    assert fs.pread(fd, 30000, 0) == b"z" * 5000 + bytes(15000) + b"q"


def test_fallocate_modes(fs):
    fd = fs.open("/p", os.O_CREAT | os.O_RDWR)
    fs.write(fd, b"a" * 16384)
    fs.fallocate(fd, api.FALLOC_FL_PUNCH_HOLE | api.FALLOC_FL_KEEP_SIZE, 1000, 9000)
    assert fs.pread(fd, 16384, 0) == b"a" * 1000 + bytes(9000) + b"a" * 6384
    fs.fallocate(fd, 0, 16384, 8192)
    st = fs.fstat(fd)
    assert st.st_size == 16384 + 8192
    assert fs.pread(fd, 8192, 16384) == bytes(8192)
    assert fs.lseek(fd, 16384, os.SEEK_HOLE) == 16384      # preallocated reads as a hole
    fs.fallocate(fd, api.FALLOC_FL_ZERO_RANGE, 20000, 10000)
    assert fs.fstat(fd).st_size == 30000


def test_nodatasum_and_nodatacow_inode_flags(dev):
    with api.mount(dev, personality=P, options="nodatacow") as fs:
        fd = fs.open("/c", os.O_CREAT | os.O_RDWR)
        fs.write(fd, b"1" * 8192)
        fs.fsync(fd)
        inode = fs.fdtable.get(fd).f_inode
        assert inode.nodatacow and inode.nodatasum
        addr_before = _extent_addrs(fs.sb, inode)
        fs.pwrite(fd, b"2" * 4096, 0)               # in place: same extent
        assert _extent_addrs(fs.sb, inode) == addr_before
        assert fs.pread(fd, 8192, 0) == b"2" * 4096 + b"1" * 4096
        fs.close(fd)
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/d", os.O_CREAT | os.O_RDWR)
        inode = fs.fdtable.get(fd).f_inode
        assert not inode.nodatasum
        fs.write(fd, b"1" * 8192)
        a = _extent_addrs(fs.sb, inode)
        fs.pwrite(fd, b"2" * 4096, 0)                   # COW: a new extent
        assert _extent_addrs(fs.sb, inode) != a
    assert api.fsck(dev, personality=P).clean


def _extent_addrs(sb, inode):
    from ufs.fs_btrfslike.inode import extent_items
    with sb.tm.lock:
        return [(p, fe.disk_bytenr) for p, fe in
                extent_items(sb.tm.tree(inode.tree_id), inode.objectid, 0, 1 << 62)]


def test_options_are_validated(dev):
    with pytest.raises(OSError) as ei:
        api.mount(dev, personality=P, options="dio_complete=sometimes")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        api.mount(dev, personality=P, options="nosuchoption")
    with api.mount(dev, personality=P, options="dio_complete=marker,nodatasum") as fs:
        assert fs.sb.opts.dio_complete == "marker" and fs.sb.opts.nodatasum


def test_readonly_mount_reads_and_refuses_writes(dev):
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/f", os.O_CREAT | os.O_WRONLY)
        fs.write(fd, b"ro")
        fs.close(fd)
    before = dev.contents()
    with api.mount(dev, personality=P, readonly=True) as fs:
        assert fs.pread(fs.open("/f", os.O_RDONLY), 10, 0) == b"ro"
        with pytest.raises(OSError) as ei:
            fs.mkdir("/x")
        assert ei.value.errno == errno.EROFS
    assert dev.contents() == before

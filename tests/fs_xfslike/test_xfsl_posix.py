"""xfslike through the public API: POSIX behaviour against memfs (the model) with the shared
differential state machine, persistence across remounts, and fsck after every sequence.

The allowed differences are ufs.testing.posix_ops.ALLOWED_DIFFERENCES (xfslike reports
directory nlink as 2 + subdirectories, like memfs, so link counts are compared too).
"""
from __future__ import annotations

import errno
import os
import stat

import pytest
from hypothesis import HealthCheck, settings

from ufs import api
from ufs.fs_xfslike import plugin
from ufs.iomap import RamDev
from ufs.testing import memfs
from ufs.testing.posix_ops import PosixMachine, UfsTarget

P = plugin.PERSONALITY
M = memfs.personality()


def xfs_dev(size=64 << 20, **kw):
    dev = RamDev(size, 512)
    api.mkfs(dev, personality=P, **kw)
    return dev


class _XfsTarget(UfsTarget):
    name = "xfslike"

    def __init__(self):
        self.dev = xfs_dev()
        super().__init__(api.mount(self.dev, personality=P))

    def cleanup(self):
        self.fs.unmount()
        report = api.fsck(self.dev, personality=P)
        assert report.clean, report.errors


class MemfsVsXfs(PosixMachine):
    def make_targets(self):
        d = RamDev(1 << 20, 512)
        api.mkfs(d, personality=M)
        return [UfsTarget(api.mount(d, personality=M)), _XfsTarget()]


TestMemfsVsXfs = MemfsVsXfs.TestCase
TestMemfsVsXfs.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                   suppress_health_check=list(HealthCheck))


@pytest.fixture
def dev():
    return xfs_dev()


def test_files_dirs_symlinks_persist_across_remount(dev):
    long_target = "t" * 3000                       # does not fit the inode: stored in a block
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/d", 0o750)
        fd = fs.open("/d/f", os.O_CREAT | os.O_RDWR, 0o640)
        assert fs.write(fd, b"abc" * 5000) == 15000
        fs.close(fd)
        fs.symlink("short", "/s")
        fs.symlink(long_target, "/l")
        fs.link("/d/f", "/hard")
        fs.setxattr("/d/f", "user.k", b"v1")
    with api.mount(dev, personality=P) as fs:
        st = fs.stat("/d/f")
        assert st.st_size == 15000 and st.st_nlink == 2 and stat.S_IMODE(st.st_mode) == 0o640
        assert fs.stat("/d").st_nlink == 2 and fs.stat("/").st_nlink == 3
        fd = fs.open("/hard", os.O_RDONLY)
        assert fs.pread(fd, 15000, 0) == b"abc" * 5000
        fs.close(fd)
        assert fs.readlink("/s") == "short" and fs.readlink("/l") == long_target
        assert fs.getxattr("/d/f", "user.k") == b"v1"
        assert sorted(fs.listdir("/")) == ["d", "hard", "l", "s"]
    assert api.fsck(dev, personality=P).clean


def test_unlinked_open_file_lives_until_close_and_orphan_freed_at_mount(dev):
    with api.mount(dev, personality=P) as fs:
        before = fs.statvfs("/").f_bfree
        fd = fs.open("/big", os.O_CREAT | os.O_RDWR, 0o600)
        fs.write(fd, b"x" * (1 << 20))
        fs.fsync(fd)
        fs.unlink("/big")
        assert fs.pread(fd, 4, 0) == b"xxxx"          # still readable through the fd
        fs.close(fd)
        assert fs.statvfs("/").f_bfree == before         # freed at last close
    assert api.fsck(dev, personality=P).clean


def test_rename_directory_between_parents_updates_dotdot_and_links(dev):
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/a", 0o755)
        fs.mkdir("/b", 0o755)
        fs.mkdir("/a/sub", 0o755)
        fs.rename("/a/sub", "/b/sub")
        assert fs.stat("/a").st_nlink == 2 and fs.stat("/b").st_nlink == 3
        fs.mkdir("/b/sub/deeper", 0o755)
        with pytest.raises(OSError) as ei:
            fs.rmdir("/b/sub")
        assert ei.value.errno == errno.ENOTEMPTY
    r = api.fsck(dev, personality=P)
    assert r.clean, r.errors


def test_registered_and_probed():
    from ufs.plugins import get_registry
    reg = get_registry()
    assert reg.personality("xfslike").name == "xfslike"
    d = xfs_dev(16 << 20)
    assert reg.probe(d).name == "xfslike"


def test_bad_option_is_einval():
    with pytest.raises(OSError) as ei:
        api.mkfs(RamDev(16 << 20, 512), personality=P, options="inode_size=300")
    assert ei.value.errno == errno.EINVAL

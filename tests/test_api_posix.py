"""ufs.api on memfs: mkfs/mount/fsck plumbing, the os-module-shaped results, async submit/reap.

The errno rules themselves are in tests/test_namei.py; agreement with the host kernel is in
tests/test_api_vs_kernel.py.
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
from ufs.iomap.bdev import RamDev

from ufs import api
from ufs.iomap import EIOCBQUEUED
from ufs.registry import OptionError
from ufs.testing import memfs
from ufs.vfs import lockdep

P = memfs.personality()


@pytest.fixture
def dev():
    d = RamDev(1 << 20, 512)
    api.mkfs(d, personality=P)
    return d


@pytest.fixture
def fs(dev):
    with lockdep.checking(True):
        with api.mount(dev, personality=P) as f:
            yield f


# --- mkfs / mount / fsck ------------------------------------------------------------------------

def test_image_file_mkfs_mount_remount_fsck(tmp_path):
    img = tmp_path / "m.img"
    with pytest.raises(OSError) as ei:
        api.mkfs(img, personality=P)                 # no size, no file
    assert ei.value.errno == errno.EINVAL
    api.mkfs(img, personality=P, size="1M")
    assert img.stat().st_size == 1 << 20
    with api.mount(str(img), personality=P) as fs:
        assert fs.mounted and fs.fstype == "memfs"
        fd = fs.open("/hello", os.O_CREAT | os.O_WRONLY, 0o640)
        fs.write(fd, b"world")
        fs.close(fd)
    assert not fs.mounted
    with api.mount(img, personality=P, readonly=True) as fs:
        assert fs.pread(fs.open("/hello", os.O_RDONLY), 10, 0) == b"world"
    report = api.fsck(img, personality=P)
    assert report.clean and report.fstype == "memfs" and report.stats["inodes"] == 2


def test_mount_of_unformatted_image_is_einval():
    with pytest.raises(OSError) as ei:
        api.mount(RamDev(1 << 20, 512), personality=P)
    assert ei.value.errno == errno.EINVAL


def test_size_parsing():
    assert api.parse_size("256M") == 256 << 20
    assert api.parse_size("4k") == 4096
    assert api.parse_size("1GiB") == 1 << 30
    assert api.parse_size(12345) == 12345
    with pytest.raises(OSError):
        api.parse_size("12X")


def test_options_are_validated(dev):
    with pytest.raises(OptionError) as ei:
        api.mount(dev, personality=P, options="nosuchopt=1")
    assert ei.value.errno == errno.EINVAL and "nosuchopt" in str(ei.value)
    with pytest.raises(OptionError):
        api.mount(dev, personality=P, options={"max_links": "many"})
    with lockdep.checking(False):
        with api.mount(dev, personality=P, options="lockdep") as fs:   # the VFS's own option
            assert lockdep.enabled() and fs.options["lockdep"] is True


def test_second_mount_from_another_process_is_ebusy(tmp_path):
    img = tmp_path / "busy.img"
    api.mkfs(img, personality=P, size="1M")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDONLY);"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)", str(img)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BlockingIOError) as ei:
            api.mount(img, personality=P)
        assert ei.value.errno == errno.EBUSY and "another process" in str(ei.value)
    finally:
        holder.kill()
        holder.wait()
    api.mount(img, personality=P).unmount()


def test_fsck_reports_damage(dev):
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/d")
        fs.close(fs.open("/d/f", os.O_CREAT | os.O_WRONLY))
        ino = fs.stat("/d/f").st_ino
        fs.sb.iget(ino).i_nlink = 5                  # damage behind the VFS's back
    report = api.fsck(dev, personality=P)
    assert not report.clean
    assert any(f"inode {ino}: i_nlink 5, expected 1" in e for e in report.errors)


def test_unmounted_filesystem_refuses_calls(dev):
    fs = api.mount(dev, personality=P)
    fd = fs.open("/x", os.O_CREAT | os.O_WRONLY)
    fs.unmount()
    fs.unmount()                                     # idempotent
    with pytest.raises(OSError) as ei:
        fs.stat("/x")
    assert ei.value.errno == errno.EINVAL
    with api.mount(dev, personality=P) as fs2:       # the open fd was closed by the unmount
        assert fs2.stat("/x").st_size == 0
        with pytest.raises(OSError) as ei:
            fs2.close(fd)
        assert ei.value.errno == errno.EBADF


# --- results shaped like the os module's -------------------------------------------------------------

def test_stat_result_is_os_stat_result(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR, 0o640)
    fs.write(fd, b"x" * 5000)
    st = fs.fstat(fd)
    assert isinstance(st, os.stat_result)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 5000 and st.st_nlink == 1 and st.st_blocks == 16
    assert st.st_blksize == 4096
    assert st.st_uid == os.geteuid() and st.st_gid == os.getegid()
    assert st.st_mtime_ns >= st.st_ctime_ns - 10**9 and isinstance(st.st_mtime, float)
    assert fs.stat(fd) == st                         # an int path is a descriptor, as in os
    before = st.st_mtime_ns
    time.sleep(0.002)
    fs.pwrite(fd, b"y", 0)
    assert fs.fstat(fd).st_mtime_ns > before
    fs.close(fd)


def test_statvfs(fs):
    v = fs.statvfs("/")
    assert isinstance(v, os.statvfs_result)
    assert v.f_bsize == 4096 and v.f_namemax == 255 and v.f_flag == 0
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR)
    fs.pwrite(fd, b"a" * 3 * 4096, 0)
    assert fs.statvfs("/").f_bfree == v.f_bfree - 3
    assert fs.statvfs("/").f_ffree == v.f_ffree - 1
    fs.close(fd)


def test_listdir_and_scandir(fs):
    fs.mkdir("/d")
    fs.close(fs.open("/d/f", os.O_CREAT | os.O_WRONLY))
    fs.symlink("/d", "/d/ld")
    fs.symlink("/nope", "/d/dangling")
    assert fs.listdir("/d") == ["f", "ld", "dangling"]              # creation (cookie) order
    with fs.scandir("/d") as it:
        entries = {e.name: e for e in it}
    assert entries["f"].path == "/d/f" and entries["f"].is_file() and not entries["f"].is_dir()
    assert entries["ld"].is_symlink() and entries["ld"].is_dir()
    assert not entries["ld"].is_dir(follow_symlinks=False)
    assert not entries["dangling"].is_dir() and not entries["dangling"].is_file()
    assert entries["f"].inode() == fs.stat("/d/f").st_ino
    assert entries["ld"].stat().st_ino == fs.stat("/d").st_ino
    assert stat.S_ISLNK(entries["ld"].stat(follow_symlinks=False).st_mode)
    assert os.fspath(entries["f"]) == "/d/f"
    with pytest.raises(NotADirectoryError):
        fs.listdir("/d/f")
    for i in range(50):
        fs.close(fs.open(f"/d/n{i:02d}", os.O_CREAT | os.O_WRONLY))
    assert len(fs.listdir("/d")) == 53


def test_makedirs_and_exists(fs):
    fs.makedirs("/a/b/c")
    assert fs.exists("/a/b/c") and not fs.exists("/a/b/x")
    fs.makedirs("/a/b/c", exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.makedirs("/a/b/c")


def test_read_write_positions(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR)
    assert fs.write(fd, b"abc") == 3 and fs.write(fd, b"def") == 3
    assert fs.lseek(fd, 0, os.SEEK_CUR) == 6
    assert fs.pread(fd, 2, 1) == b"bc"
    assert fs.lseek(fd, 0, os.SEEK_CUR) == 6                   # pread leaves f_pos alone
    fs.lseek(fd, 1, os.SEEK_SET)
    assert fs.read(fd, 100) == b"bcdef" and fs.read(fd, 100) == b""
    fs.pwrite(fd, b"Z", 10)                                    # a hole in between
    assert fs.pread(fd, 100, 0) == b"abcdef\0\0\0\0Z"
    assert fs.pread(fd, 0, 0) == b""
    fs.fsync(fd)
    fs.fdatasync(fd)
    assert fs.sb.fsync_calls == 2
    fs.close(fd)


def test_o_dsync_write_calls_fsync(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | os.O_DSYNC)
    fs.write(fd, b"x")
    assert fs.sb.fsync_calls == 1
    fs.close(fd)


# --- async submit / reap ---------------------------------------------------------------------------------

def test_async_submit_and_reap(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR)
    writes = [fs.submit_pwrite(fd, bytes([65 + i]) * 100, i * 100) for i in range(8)]
    assert fs.inflight == 8
    done = fs.reap(min_complete=8)
    assert {h for h, _ in done} == set(writes) and all(r == 100 for _, r in done)
    assert fs.inflight == 0 and all(h.done for h in writes)
    reads = [fs.submit_pread(fd, 100, i * 100) for i in range(8)]
    got = dict(fs.reap(8))
    assert [got[h] for h in reads] == [bytes([65 + i]) * 100 for i in range(8)]
    assert fs.reap(1, timeout=0.01) == []                     # nothing in flight: returns
    fs.close(fd)


def test_async_errors(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDONLY)
    with pytest.raises(OSError) as ei:
        fs.submit_pwrite(fd, b"x", 0)                          # argument errors raise at once
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        fs.submit_pread(999, 1, 0)
    assert ei.value.errno == errno.EBADF
    fs.close(fd)
    fs.sb.capacity_blk = fs.sb.used_blk                        # full: the I/O itself fails
    fd = fs.open("/g", os.O_CREAT | os.O_RDWR)
    h = fs.submit_pwrite(fd, b"x", 0)
    [(h2, res)] = fs.reap()
    assert h2 is h and isinstance(res, OSError) and res.errno == errno.ENOSPC
    fs.close(fd)


class _DeferredOps(memfs.MemOps):
    """memfs whose async I/O completes later on another thread (returns EIOCBQUEUED)."""

    def read_iter(self, iocb, buf):
        return self._defer(iocb, super().read_iter, buf)

    def write_iter(self, iocb, data):
        return self._defer(iocb, super().write_iter, bytes(data))

    def _defer(self, iocb, fn, arg):
        if iocb.ki_complete is None:
            return fn(iocb, arg)

        def later():
            time.sleep(0.02)
            try:
                res = fn(iocb, arg)
            except OSError as e:
                res = -e.errno
            iocb.ki_complete(iocb, res)
        threading.Thread(target=later).start()
        return EIOCBQUEUED


def test_async_completion_from_another_thread(fs):
    ops = _DeferredOps(fs.sb)
    fs.sb.ops = ops
    fs.sb.iget(fs.sb.root_ino).i_op = ops
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR)
    inode = fs.sb.iget(fs.fstat(fd).st_ino)
    inode.i_op = inode.i_fop = ops
    fs.fdtable.get(fd).f_op = ops
    hs = [fs.submit_pwrite(fd, b"q" * 10, i * 10) for i in range(4)]
    got = []
    while len(got) < 4:
        got += fs.reap(1, timeout=5)
    assert {h for h, _ in got} >= set(hs) and all(r == 10 for _, r in got)
    h = fs.submit_pread(fd, 40, 0)
    assert fs.reap(1, timeout=5) == [(h, b"q" * 40)]
    fs.close(fd)


def test_unmount_waits_for_async_io(dev):
    fs = api.mount(dev, personality=P)
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR)
    h = fs.submit_pwrite(fd, b"z" * 10, 0)
    fs.unmount()
    assert h.done and h.result == 10
    with api.mount(dev, personality=P) as fs:
        assert fs.stat("/f").st_size == 10

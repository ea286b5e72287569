"""The bounded inode cache (ufs.vfs.super): eviction is invisible, in both personalities.

Each test mounts a RamDev with ``inode_cache=64`` and pushes thousands of inodes through the
cache, then checks:
- the cache stays within its bound: LRU entries and, after ``gc.collect()``, the inode objects
  of the mount that are still alive (objects counted, not RSS);
- an evicted inode really left memory (a weak reference to it dies) and reading it back gives
  every file its data, size, mode, link count and xattrs (before and after a remount);
- dirty inodes are written back, never dropped (xfslike: delayed allocation and dirty pages);
- an open file pins its inode (same object, its data readable through the fd) and becomes
  evictable once closed; an unlinked open file survives the pressure and is freed on close;
- hard links and renames (over an existing file, of directories across parents) across
  evictions; several threads creating, rewriting and reading under eviction;
- btrfslike: an fsync after the inode was evicted and read back in the same transaction
  still makes everything durable (the fsync-log bookkeeping is rebuilt conservatively);
- every test ends with unmount and a clean fsck.
"""
from __future__ import annotations

import errno
import gc
import os
import stat
import weakref

import pytest

from ufs import api, plugins
from ufs.iomap import RamDev
from ufs.vfs.inode import Inode

BOUND = 64
SIZE = 128 << 20
PERSONALITIES = ["xfslike", "btrfslike"]
# inodes legitimately held beyond the LRU while a test runs: the root (Namei keeps it), the
# current directory on a walk stack, an open file
SLACK = 4


def _pers(name):
    return plugins.get_registry()[name]


class _Mount:
    """A personality on a RamDev with a small inode cache; remount and fsck helpers."""

    def __init__(self, name, *, volatile=False):
        self.pers = _pers(name)
        self.dev = RamDev(SIZE, 512, volatile_cache=volatile)
        api.mkfs(self.dev, personality=self.pers)
        self.fs = self.mount()

    def mount(self, dev=None):
        return api.mount(dev or self.dev, f"inode_cache={BOUND}", personality=self.pers)

    def remount(self):
        self.fs.unmount()
        self.fs = self.mount()
        return self.fs

    def close(self):
        if self.fs.mounted:
            self.fs.unmount()
        rep = api.fsck(self.dev, personality=self.pers)
        assert rep.clean, rep.errors


@pytest.fixture(params=PERSONALITIES)
def mnt(request):
    m = _Mount(request.param)
    try:
        yield m
    finally:
        m.close()


def _live_inodes(sb) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Inode) and o.i_sb is sb)


def _assert_bounded(fs):
    sb = fs.sb
    assert sb.icache_count() <= BOUND + SLACK, sb.icache_count()
    assert _live_inodes(sb) <= BOUND + SLACK


def _put(fs, path, data, mode=0o644):
    fd = fs.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)
    try:
        fs.write(fd, data)
    finally:
        fs.close(fd)


def _get(fs, path):
    fd = fs.open(path, os.O_RDONLY)
    try:
        return fs.read(fd, fs.fstat(fd).st_size + 1)
    finally:
        fs.close(fd)


def _pressure(fs, n=3 * BOUND, tag="p"):
    """Bring ``n`` fresh inodes through the cache (new empty files), evicting older ones."""
    d = f"/_{tag}"
    if not fs.exists(d):
        fs.mkdir(d)
    base = len(fs.listdir(d))
    for i in range(base, base + n):
        fs.close(fs.open(f"{d}/{i}", os.O_CREAT | os.O_WRONLY, 0o600))


def _data(d, i):
    return bytes([(d * 31 + i) % 251]) * ((d * 997 + i * 131) % 9000)


def _mode(i):
    return 0o600 | (i % 8) << 3


def _inode_ref(fs, path):
    return weakref.ref(fs._inode(path, follow_symlinks=False))


def test_cache_stays_bounded_and_evicted_files_keep_everything(mnt):
    """Thousands of files over several directories, links and xattrs on some: the cache
    stays within its bound throughout, inodes really leave memory, and every file reads back
    exactly, before and after a remount."""
    fs = mnt.fs
    sb = fs.sb
    ndirs, nfiles = 6, 350
    first = None
    for d in range(ndirs):
        fs.mkdir(f"/d{d}", 0o750)
        for i in range(nfiles):
            path = f"/d{d}/f{i}"
            _put(fs, path, _data(d, i), _mode(i))
            if i % 25 == 0:
                fs.setxattr(path, "user.tag", f"{d}:{i}".encode())
            if i % 40 == 0:
                fs.link(path, f"/d0/link-{d}-{i}")     # across directories but for d0
            if first is None:
                first = _inode_ref(fs, path)
        _assert_bounded(fs)
    # the first file's inode object is gone: it was evicted and nothing else held it
    gc.collect()
    assert first() is None
    assert sb.icache_stats["pruned"] >= ndirs * nfiles - 2 * BOUND
    if mnt.pers.name == "xfslike":
        # dirty inodes (delayed allocation) were written back to be evicted, not dropped
        assert sb.icache_stats["writeback"] > 0

    def check(fs):
        for d in range(ndirs):
            for i in range(nfiles):
                path = f"/d{d}/f{i}"
                st = fs.stat(path)
                want = _data(d, i)
                assert st.st_size == len(want), path
                assert stat.S_IMODE(st.st_mode) == _mode(i), path
                assert st.st_nlink == (2 if i % 40 == 0 else 1), path
                assert _get(fs, path) == want, path
                if i % 25 == 0:
                    assert fs.getxattr(path, "user.tag") == f"{d}:{i}".encode()
                else:
                    assert fs.listxattr(path) == []
            assert stat.S_IMODE(fs.stat(f"/d{d}").st_mode) == 0o750
        _assert_bounded(fs)

    check(fs)
    check(mnt.remount())


def test_open_file_pins_its_inode_and_is_evictable_after_close(mnt):
    fs = mnt.fs
    fd = fs.open("/open", os.O_CREAT | os.O_RDWR, 0o644)
    inode = fs.fdtable.get(fd).f_inode
    ref = weakref.ref(inode)
    ino = inode.i_ino
    del inode
    try:
        fs.pwrite(fd, b"pinned" * 1000, 0)
        _pressure(fs)
        gc.collect()
        assert ref() is not None
        # the same object for every path to it, and the fd's data
        assert fs.sb.s_op.iget(ino) is ref()
        assert fs._inode("/open") is ref()
        assert fs.pread(fd, 10000, 0) == b"pinned" * 1000
        fs.pwrite(fd, b"more", 6000)
        _assert_bounded(fs)
    finally:
        fs.close(fd)
    _pressure(fs)
    gc.collect()
    assert ref() is None
    assert _get(fs, "/open") == b"pinned" * 1000 + b"more"
    assert mnt.remount().stat("/open").st_size == 6004


def test_unlinked_open_file_survives_pressure_and_is_freed_on_close(mnt):
    fs = mnt.fs
    fd = fs.open("/doomed", os.O_CREAT | os.O_RDWR, 0o600)
    fs.pwrite(fd, b"z" * 300_000, 0)
    ino = fs.fstat(fd).st_ino
    fs.unlink("/doomed")
    try:
        _pressure(fs)
        gc.collect()
        st = fs.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == 300_000
        assert fs.pread(fd, 300_001, 0) == b"z" * 300_000
        assert not fs.exists("/doomed")
        fs.sync()
        free_open = fs.statvfs("/").f_bfree
    finally:
        fs.close(fd)
    # freed at close: the number is no longer an inode and its blocks came back
    with pytest.raises(OSError) as e:
        fs.sb.s_op.iget(ino)
    assert e.value.errno == errno.ENOENT
    fs.sync()
    assert fs.statvfs("/").f_bfree - free_open >= 300_000 // 4096
    mnt.remount()
    with pytest.raises(OSError) as e:
        mnt.fs.sb.s_op.iget(ino)
    assert e.value.errno == errno.ENOENT


def test_links_and_renames_across_evictions(mnt):
    fs = mnt.fs
    fs.mkdir("/x")
    fs.mkdir("/y")
    fs.mkdir("/x/sub")
    _put(fs, "/x/sub/a", b"A" * 5000)
    _put(fs, "/y/b", b"B" * 7000)
    fs.setxattr("/x/sub/a", "user.k", b"v")
    fs.link("/x/sub/a", "/y/c")
    ref_a = _inode_ref(fs, "/x/sub/a")
    _pressure(fs)
    gc.collect()
    assert ref_a() is None
    assert fs.stat("/x/sub/a").st_nlink == 2
    # rename over an existing file: b's inode loses its last link and is freed
    b_ino = fs.stat("/y/b").st_ino
    fs.rename("/y/c", "/y/b")
    with pytest.raises(OSError) as e:
        fs.sb.s_op.iget(b_ino)
    assert e.value.errno == errno.ENOENT
    _pressure(fs)
    assert fs.stat("/y/b").st_ino == fs.stat("/x/sub/a").st_ino
    assert fs.stat("/y/b").st_nlink == 2
    assert _get(fs, "/y/b") == b"A" * 5000
    assert fs.getxattr("/y/b", "user.k") == b"v"
    fs.unlink("/x/sub/a")
    _pressure(fs)
    assert fs.stat("/y/b").st_nlink == 1
    # a directory moved to another parent after both were evicted: its '..' follows
    fs.rename("/x/sub", "/y/sub")
    _pressure(fs)
    assert fs.stat("/y/sub/..").st_ino == fs.stat("/y").st_ino
    assert fs.stat("/x").st_nlink == 2 and fs.stat("/y").st_nlink == 3
    _put(fs, "/y/sub/new", b"N")
    fs = mnt.remount()
    assert fs.stat("/y/sub/..").st_ino == fs.stat("/y").st_ino
    assert fs.listdir("/y/sub") == ["new"]
    assert sorted(fs.listdir("/y")) == ["b", "sub"]
    assert _get(fs, "/y/b") == b"A" * 5000


@pytest.mark.parametrize("name", PERSONALITIES)
def test_inode_cache_option(name):
    pers = _pers(name)
    dev = RamDev(SIZE, 512)
    api.mkfs(dev, personality=pers)
    with pytest.raises(OSError) as e:
        api.mount(dev, "inode_cache=0", personality=pers)
    assert e.value.errno == errno.EINVAL
    with api.mount(dev, personality=pers) as fs:
        from ufs.vfs.super import DEFAULT_INODE_CACHE
        assert fs.sb.s_inode_cache_max == DEFAULT_INODE_CACHE
    with api.mount(dev, {"inode_cache": 5}, personality=pers) as fs:
        assert fs.sb.s_inode_cache_max == 5
    assert api.fsck(dev, personality=pers).clean


def test_btrfs_fsync_after_eviction_in_the_running_transaction():
    """Extents written back by the first copy of an inode, which was then evicted; the second
    copy appends and fsyncs: after a power cut both parts are there."""
    m = _Mount("btrfslike", volatile=True)
    try:
        fs = m.fs
        _put(fs, "/f", b"")
        fs.sync()                               # commit: /f exists on disk
        _put(fs, "/f", b"1" * 8192)             # in the running transaction only
        ref = _inode_ref(fs, "/f")
        _pressure(fs)
        gc.collect()
        assert ref() is None
        fd = fs.open("/f", os.O_WRONLY | os.O_APPEND)
        try:
            fs.write(fd, b"2" * 4096)
            fs.fsync(fd)
        finally:
            fs.close(fd)
        img = m.dev.crash(seed=3, keep_probability=0.0)
        fs.unmount()
        crashed = RamDev(SIZE, 512, data=img)
        with m.mount(crashed) as c:
            assert _get(c, "/f") == b"1" * 8192 + b"2" * 4096
        assert api.fsck(crashed, personality=m.pers).clean
    finally:
        m.close()


def test_threads_share_one_object_per_inode_under_pressure(mnt):
    """Four threads create, rewrite, stat and read files in shared directories while the cache
    evicts: no error, every file ends with its last contents, and two lookups of one name
    made while a thread holds the inode give the same object."""
    import threading

    fs = mnt.fs
    for d in range(3):
        fs.mkdir(f"/t{d}")
    errors = []

    def worker(k):
        try:
            for i in range(150):
                path = f"/t{i % 3}/w{k}-{i}"
                _put(fs, path, bytes([k]) * (i * 37 % 5000))
                held = fs._inode(path)
                assert fs._inode(path) is held
                if i % 3 == 0:
                    _put(fs, path, bytes([k + 100]) * 1000)
                if i >= 5:                  # an older file, likely evicted by now
                    assert fs.stat(f"/t{(i - 5) % 3}/w{k}-{i - 5}").st_nlink == 1
        except BaseException as e:          # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    for k in range(4):
        for i in range(150):
            want = bytes([k + 100]) * 1000 if i % 3 == 0 else bytes([k]) * (i * 37 % 5000)
            assert _get(fs, f"/t{i % 3}/w{k}-{i}") == want
    _assert_bounded(fs)

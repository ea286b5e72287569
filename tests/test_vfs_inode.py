"""ufs.vfs Inode (dio counter), Superblock (lazy completion workqueue), File (flags, kiocbs,
fsync) and generic_write_sync."""
from __future__ import annotations

import os
import stat
import threading

import pytest

from ufs.errors import BadFdError, InvalidError, InvariantError, IOFailure
from ufs.iomap import Iocb, Kiocb, RamDev
from ufs.vfs import (LLONG_MAX, File, Inode, RWSem, Superblock, WorkQueue, generic_write_sync,
                     lockdep)


@pytest.fixture
def sb():
    s = Superblock(None, 4096)
    yield s
    s.shutdown()


def test_inode_fields(sb):
    ino = Inode(sb, 5, stat.S_IFREG | 0o600, size=123)
    assert ino.i_size == ino.i_size_read() == 123
    ino.i_size_write(4096)
    assert ino.i_size == 4096
    assert ino.i_blkbits == 12 and ino.i_blocksize == 4096 and ino.i_sb is sb
    assert ino.is_reg() and not ino.is_dir() and ino.i_nlink == 1
    assert isinstance(ino.i_rwsem, RWSem) and ino.i_rwsem.name == "inode.i_rwsem"
    assert ino.i_mmap_lock.name == "inode.i_mmap_lock"
    assert ino.i_mapping.host is ino and ino.i_mapping.nrpages == 0
    sb2 = Superblock(None, 1024)
    assert Inode(sb2, 1).i_blkbits == 10
    assert Inode(sb2, 1, blkbits=16).i_mapping.page_size == 65536


def test_inode_dio_wait_wakes_at_zero(sb):
    ino = Inode(sb, 1)
    assert ino.inode_dio_wait(timeout=0)              # nothing in flight
    ino.inode_dio_begin()
    ino.inode_dio_begin()
    woke = threading.Event()
    t = threading.Thread(target=lambda: (ino.inode_dio_wait(), woke.set()), daemon=True)
    t.start()
    assert not woke.wait(0.1)
    ino.inode_dio_end()
    assert not woke.wait(0.1)                         # one still in flight
    ino.inode_dio_end()
    assert woke.wait(2)
    t.join(2)
    assert ino.i_dio_count == 0
    with pytest.raises(InvariantError):
        ino.inode_dio_end()                           # unbalanced
    ino.inode_dio_begin()
    assert ino.inode_dio_wait(timeout=0.05) is False
    ino.inode_dio_end()


def test_superblock_lazy_workqueue_created_once(sb):
    assert not sb.has_dio_done_wq
    seen = []
    barrier = threading.Barrier(8)

    def grab():
        barrier.wait()
        seen.append(sb.s_dio_done_wq)
    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(seen) == 8 and all(w is seen[0] for w in seen)
    assert isinstance(seen[0], WorkQueue)
    out = []
    seen[0].queue_work(out.append, 1)
    sb.shutdown()                                     # drains, then destroys
    assert out == [1] and not sb.has_dio_done_wq
    with pytest.raises(InvariantError):
        seen[0].queue_work(out.append, 2)
    with pytest.raises(InvalidError):
        Superblock(None, 3000)


def test_superblock_geometry():
    dev = RamDev(1 << 16)
    try:
        s = Superblock(dev, 65536, page_cache_cap=1 << 20)
        assert s.s_blocksize_bits == 16 and s.bdev is dev and s.s_page_budget.cap_bytes == 1 << 20
    finally:
        dev.close()


@pytest.mark.parametrize("flags,expect", [
    (os.O_RDONLY, 0),
    (os.O_RDWR | os.O_DIRECT, Iocb.DIRECT),
    (os.O_WRONLY | os.O_DSYNC, Iocb.DSYNC),
    (os.O_WRONLY | os.O_SYNC, Iocb.DSYNC | Iocb.SYNC),
    (os.O_WRONLY | os.O_APPEND, Iocb.APPEND),
    (os.O_RDWR | os.O_NONBLOCK, 0),                   # O_NONBLOCK is not NOWAIT
])
def test_file_kiocb_flags(sb, flags, expect):
    f = File(Inode(sb, 1), flags)
    f.f_pos = 77
    write = (flags & os.O_ACCMODE) != os.O_RDONLY
    k = f.kiocb(write=write)
    assert isinstance(k, Kiocb) and k.ki_filp is f and k.ki_pos == 77 and k.ki_complete is None
    want = int(expect) | (int(Iocb.WRITE) if write else 0)
    assert k.ki_flags == want
    k2 = f.kiocb(5, write=write, nowait=True, complete=print)
    assert k2.ki_pos == 5 and k2.ki_flags == want | Iocb.NOWAIT and k2.ki_complete is print


def test_file_access_mode(sb):
    ino = Inode(sb, 1)
    ro, wo = File(ino, os.O_RDONLY), File(ino, os.O_WRONLY)
    with pytest.raises(BadFdError):
        ro.kiocb(0, write=True)
    with pytest.raises(BadFdError):
        wo.kiocb(0)
    assert File(ino, os.O_RDWR).readable and File(ino, os.O_RDWR).writable


class RecordingFops:
    def __init__(self, fail=None, lock=False):
        self.calls, self.fail, self.lock = [], fail, lock

    def fsync(self, file, start, end, datasync):
        if self.lock:                                 # btrfs-like: fsync takes i_rwsem
            with file.f_inode.i_rwsem.write_locked():
                pass
        self.calls.append((start, end, datasync))
        if self.fail:
            raise self.fail


def test_vfs_fsync_range(sb):
    fops = RecordingFops()
    f = File(Inode(sb, 1), os.O_RDWR, fops)
    f.vfs_fsync_range(10, 20, True)
    f.vfs_fsync()
    assert fops.calls == [(10, 20, True), (0, LLONG_MAX, False)]
    with pytest.raises(InvalidError):
        File(Inode(sb, 2), os.O_RDWR).vfs_fsync()


@pytest.mark.parametrize("oflags,datasync", [(os.O_DSYNC, True), (os.O_SYNC, False), (0, None)])
def test_generic_write_sync(sb, oflags, datasync):
    fops = RecordingFops()
    f = File(Inode(sb, 1), os.O_WRONLY | oflags, fops)
    k = f.kiocb(4096 + 100, write=True)
    assert generic_write_sync(k, 100) == 100
    if datasync is None:
        assert fops.calls == []
    else:
        assert fops.calls == [(4096, 4196, datasync)]
    fops.fail = IOFailure("sync failed")
    if datasync is not None:
        with pytest.raises(IOFailure):
            generic_write_sync(k, 100)


def test_generic_write_sync_under_i_rwsem_is_the_seed_deadlock(sb):
    """With lockdep on, syncing while holding i_rwsem with a fsync that takes it fails fast."""
    fops = RecordingFops(lock=True)
    ino = Inode(sb, 1)
    f = File(ino, os.O_WRONLY | os.O_DSYNC, fops)
    with lockdep.checking(True, fresh=True):
        k = f.kiocb(100, write=True)
        with ino.i_rwsem.read_locked():
            with pytest.raises(Exception) as ei:
                generic_write_sync(k, 100)
        assert ei.value.errno == 35                   # EDEADLK
        assert generic_write_sync(k, 100) == 100      # after unlocking: fine
    assert fops.calls == [(0, 100, True)]

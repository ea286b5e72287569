"""The per-I/O fast paths of xfslike O_DIRECT writes and of the public async API keep their
semantics: timestamps on every write (persisted by fsync), O_APPEND/EFBIG on the async path,
the end_io shortcut only for written-block overwrites inside the on-disk size, the plain-int
``iocb_flags``, cross-thread completion wake-ups, and ``preadinto``/``submit_preadinto``
(reads into the caller's buffer, no copy).  RamDev images: no root needed."""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from ufs import api
from ufs.fs_xfslike import format as fmt
from ufs.fs_xfslike import plugin
from ufs.iomap import Iocb, Kiocb, RamDev, aligned_buffer
from ufs.testing import memfs
import xfsl_testdev
from xfsl_testdev import abuf
from ufs.vfs.file import File

# shared fixtures (xfsl_testdev): a formatted RamDev, and it mounted (fsck clean after)
dev = xfsl_testdev.dev
fs = xfsl_testdev.fs

P = plugin.PERSONALITY
BS = 4096
O_DIRECT = os.O_DIRECT


def reap_all(fs, n):
    out = {}
    while len(out) < n:
        for h, res in fs.reap(1, timeout=10):
            out[h] = res
    return out


def inode_of(fs, path):
    return fs.sb.iget(fs.stat(path).st_ino)


def test_iocb_flags_are_plain_ints_with_the_kernel_mapping():
    class _Inode:
        i_mapping = None

    cases = [
        (os.O_RDWR, 0),
        (os.O_RDWR | O_DIRECT, Iocb.DIRECT),
        (os.O_RDWR | os.O_DSYNC, Iocb.DSYNC),
        (os.O_RDWR | os.O_SYNC, Iocb.DSYNC | Iocb.SYNC),
        (os.O_WRONLY | os.O_APPEND | O_DIRECT, Iocb.APPEND | Iocb.DIRECT),
    ]
    for oflags, want in cases:
        f = File(_Inode(), oflags)
        got = f.iocb_flags()
        assert type(got) is int and got == int(want), (oflags, got, want)
        assert f.iocb_flags(write=True, nowait=True) == int(want | Iocb.WRITE | Iocb.NOWAIT)
    wr = File(_Inode(), os.O_WRONLY)
    assert wr.writable and not wr.readable
    with pytest.raises(OSError) as ei:
        wr.check_readable()
    assert ei.value.errno == errno.EBADF
    rd = File(_Inode(), os.O_RDONLY)
    with pytest.raises(OSError) as ei:
        rd.check_writable()
    assert ei.value.errno == errno.EBADF
    odd = File(_Inode(), os.O_ACCMODE)          # 3: neither readable nor writable
    assert not odd.readable and not odd.writable


def test_dio_overwrites_update_mtime_ctime_and_fsync_persists_them(dev):
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
        fs.pwrite(fd, abuf(b"a" * 4 * BS), 0)
        fs.fsync(fd)
        old = fs.fstat(fd)
        fs.utime("/f", ns=(10**18, 10**18))      # far in the past of any write below
        time.sleep(0.002)
        assert fs.pwrite(fd, abuf(b"b" * BS), BS) == BS          # sync, shared lock
        st1 = fs.fstat(fd)
        assert st1.st_mtime_ns > 10**18 and st1.st_ctime_ns >= st1.st_mtime_ns
        fs.utime("/f", ns=(10**18, 10**18))
        h = fs.submit_pwrite(fd, abuf(b"c" * BS), 2 * BS)        # async
        assert reap_all(fs, 1)[h] == BS
        st2 = fs.fstat(fd)
        assert st2.st_mtime_ns > 10**18
        assert st2.st_size == old.st_size == 4 * BS
        fs.fsync(fd)
        fs.close(fd)
    with api.mount(dev, personality=P) as fs:
        st = fs.stat("/f")
        assert st.st_mtime_ns == st2.st_mtime_ns
        fd = fs.open("/f", os.O_RDONLY)
        assert fs.pread(fd, 4 * BS, 0) == b"a" * BS + b"b" * BS + b"c" * BS + b"a" * BS
    assert api.fsck(dev, personality=P).clean


def test_async_dio_append_and_efbig(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_WRONLY | os.O_APPEND | O_DIRECT, 0o644)
    for i in range(3):
        # the offset is ignored on an O_APPEND descriptor, as pwrite(2) does on Linux
        h = fs.submit_pwrite(fd, abuf(bytes([48 + i]) * BS), 0)
        assert reap_all(fs, 1)[h] == BS
    assert fs.fstat(fd).st_size == 3 * BS
    rd = fs.open("/f", os.O_RDONLY)
    assert fs.pread(rd, 3 * BS, 0) == b"0" * BS + b"1" * BS + b"2" * BS
    big = fs.sb.s_maxbytes
    bd = fs.open("/b", os.O_CREAT | os.O_WRONLY, 0o644)           # generic_write_checks
    h = fs.submit_pwrite(bd, b"x" * BS, big)
    res = reap_all(fs, 1)[h]
    assert isinstance(res, OSError) and res.errno == errno.EFBIG
    with pytest.raises(OSError) as ei:
        fs.pwrite(bd, b"x", big)
    assert ei.value.errno == errno.EFBIG
    fd2 = fs.open("/g", os.O_CREAT | os.O_WRONLY | O_DIRECT, 0o644)
    h = fs.submit_pwrite(fd2, abuf(b"x" * BS), 100)                 # unaligned O_DIRECT
    res = reap_all(fs, 1)[h]
    assert isinstance(res, OSError) and res.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        fs.submit_pwrite(rd, abuf(b"x" * BS), 0)
    assert ei.value.errno == errno.EBADF


def test_end_io_still_converts_unwritten_and_moves_the_size(dev):
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
        fs.fallocate(fd, api.FALLOC_FL_KEEP_SIZE, 0, 4 * BS)
        fs.pwrite(fd, abuf(b"p" * 2 * BS), 0)            # overwrite of preallocated blocks
        inode = inode_of(fs, "/f")
        ext = list(fs.sb.bmap(inode).ext)
        written = [e for e in ext if not e[3] & fmt.EXT_UNWRITTEN]
        assert written and written[0][0] == 0 and written[0][2] == 2
        assert inode.i_size == inode.disk_size == 2 * BS
        h = fs.submit_pwrite(fd, abuf(b"q" * BS), 2 * BS)  # extending, unwritten
        assert reap_all(fs, 1)[h] == BS
        assert inode.i_size == inode.disk_size == 3 * BS
        h = fs.submit_pwrite(fd, abuf(b"r" * BS), 0)       # the shortcut: nothing to log
        assert reap_all(fs, 1)[h] == BS
        fs.close(fd)
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/f", os.O_RDONLY)
        assert fs.fstat(fd).st_size == 3 * BS
        assert fs.pread(fd, 4 * BS, 0) == b"r" * BS + b"p" * BS + b"q" * BS
    assert api.fsck(dev, personality=P).clean


def test_preadinto_fills_an_aligned_buffer_without_copy(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    data = bytes(range(256)) * (3 * BS // 256)
    fs.pwrite(fd, abuf(data), 0)
    buf = aligned_buffer(2 * BS)
    assert fs.preadinto(fd, buf, BS) == 2 * BS
    assert bytes(buf) == data[BS:3 * BS]
    buf2 = aligned_buffer(2 * BS)
    assert fs.preadinto(fd, buf2, 2 * BS) == BS              # short at EOF
    assert bytes(buf2)[:BS] == data[2 * BS:]
    assert fs.preadinto(fd, aligned_buffer(BS), 8 * BS) == 0  # past EOF
    # file-position variant advances f_pos
    fs.lseek(fd, BS, os.SEEK_SET)
    assert fs.readinto(fd, buf) == 2 * BS and fs.lseek(fd, 0, os.SEEK_CUR) == 3 * BS
    # async variant: the result is the count, the data is in the caller's buffer
    hs = {fs.submit_preadinto(fd, b, i * BS): (i, b)
          for i, b in enumerate(aligned_buffer(BS) for _ in range(3))}
    for h, res in reap_all(fs, 3).items():
        i, b = hs[h]
        assert res == BS and bytes(b) == data[i * BS:(i + 1) * BS]
    with pytest.raises(TypeError):
        fs.preadinto(fd, bytes(BS), 0)
    with pytest.raises(TypeError):
        fs.submit_preadinto(fd, bytes(BS), 0)
    h = fs.submit_preadinto(fd, aligned_buffer(BS), 100)       # unaligned O_DIRECT
    res = reap_all(fs, 1)[h]
    assert isinstance(res, OSError) and res.errno == errno.EINVAL
    wo = fs.open("/f", os.O_WRONLY)
    for call in (lambda: fs.preadinto(wo, bytearray(BS), 0),
                 lambda: fs.submit_preadinto(wo, bytearray(BS), 0)):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.EBADF
    # buffered descriptor, bytearray buffer
    bd = fs.open("/f", os.O_RDONLY)
    ba = bytearray(100)
    assert fs.preadinto(bd, ba, 10) == 100 and bytes(ba) == data[10:110]


def test_preadinto_on_a_directory_is_eisdir():
    dev = RamDev(1 << 20, 512)
    mp = memfs.personality()
    api.mkfs(dev, personality=mp)
    with api.mount(dev, personality=mp) as fs:
        fs.mkdir("/d")
        fd = fs.open("/d", os.O_RDONLY)
        with pytest.raises(OSError) as ei:
            fs.preadinto(fd, bytearray(10), 0)
        assert ei.value.errno == errno.EISDIR
        with pytest.raises(OSError) as ei:
            fs.submit_preadinto(fd, bytearray(10), 0)
        assert ei.value.errno == errno.EISDIR


def test_a_completion_posted_from_another_thread_reaches_a_sleeping_reaper():
    """What s_dio_done_wq does: ki_complete runs on a worker thread while the submitter sleeps
    in reap() (registered in ``_waiters``); the completion is delivered, with its result."""
    dev = RamDev(1 << 20, 512)
    mp = memfs.personality()
    api.mkfs(dev, personality=mp)
    with api.mount(dev, personality=mp) as fs:
        fd = fs.open("/f", os.O_CREAT | os.O_RDWR, 0o644)
        file = fs.fdtable.get(fd)
        h = api.AsyncHandle("pwrite", fd, 0, 5)
        with fs._cv:
            fs._inflight += 1                   # as _submit does before EIOCBQUEUED
        got = []
        t = threading.Thread(target=lambda: got.extend(fs.reap(1, timeout=10)))
        t.start()
        deadline = time.monotonic() + 10
        while not fs._waiters and time.monotonic() < deadline:
            time.sleep(0.001)
        assert fs._waiters == 1 and t.is_alive()
        iocb = Kiocb(file, 0, file.iocb_flags(write=True), fs._ki_complete, h)
        w = threading.Thread(target=iocb.ki_complete, args=(iocb, 5))
        w.start()
        w.join(10)
        t.join(10)
        assert not t.is_alive()
        assert got == [(h, 5)] and h.done and fs.inflight == 0 and fs._waiters == 0
        # and an error code becomes the errno's OSError
        h2 = api.AsyncHandle("pwrite", fd, 0, 5)
        with fs._cv:
            fs._inflight += 1
        fs._ki_complete(Kiocb(file, 0, 0, fs._ki_complete, h2), -errno.EIO)
        ((hh, res),) = fs.reap(1)
        assert hh is h2 and isinstance(res, OSError) and res.errno == errno.EIO

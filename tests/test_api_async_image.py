"""Asynchronous I/O of the public API on real O_DIRECT images, both personalities.

``Filesystem.plug()`` (blk_start_plug/blk_finish_plug): submissions inside the block stay
on the thread's plug list and reach the device together when it ends; the data and every
completion are the same as without it.  Waits that depend on the caller's own in-flight
I/O (truncate's inode_dio_wait, fsync, unmount) must drive the caller's queue instead of
sleeping forever: the calling thread is the only one that reaps its io_uring.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading

import pytest

from ufs import api
from ufs.iomap.bdev import aligned_buffer

PERSONALITIES = ["xfslike", "btrfslike"]
MiB = 1 << 20


@pytest.fixture(params=PERSONALITIES)
def fs(request, tmp_path):
    img = str(tmp_path / f"{request.param}.img")
    api.mkfs(img, request.param, size=128 * MiB)
    fs = api.mount(img)
    try:
        if not getattr(fs.sb.bdev, "direct", False):
            pytest.skip("the image's filesystem refuses O_DIRECT")
        yield fs
    finally:
        fs.unmount()
        os.unlink(img)


def _buf(fill: int, n: int = 4096):
    b = memoryview(aligned_buffer(n))
    b[:] = bytes([fill]) * n
    return b


def _hung(what: str) -> None:
    sys.stderr.write(f"\n{what} did not return in time: a wait that nobody can end; "
                     "stacks follow, the test process exits 97\n")
    faulthandler.dump_traceback(all_threads=True)
    os._exit(97)


def _run_with_timeout(fn, seconds=30.0):
    """Run fn in this thread; if it hangs (the bug these tests catch is a wait on the
    calling thread's own queue, which no other thread can end), dump every stack and end
    the process rather than hang the suite."""
    done = threading.Event()
    t = threading.Timer(seconds, lambda: done.is_set() or _hung(getattr(fn, "__name__", "call")))
    t.daemon = True
    t.start()
    try:
        return fn()
    finally:
        done.set()
        t.cancel()


def test_plug_batches_submissions_and_keeps_every_byte(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | os.O_DIRECT)
    fs.pwrite(fd, _buf(0, MiB), 0)                       # allocated and inside EOF
    q = fs.sb.bdev.queue()
    bufs = [_buf(i + 1) for i in range(32)]
    with fs.plug():
        handles = [fs.submit_pwrite(fd, bufs[i], i * 8192) for i in range(32)]
        # nothing has reached the device yet: every data bio is on the plug list
        assert q.plug_depth == 1 and q.plugged >= 32 - sum(h.done for h in handles)
    assert q.plug_depth == 0 and q.plugged == 0
    done = fs.reap(32, timeout=30)
    assert sorted(h.pos for h, _ in done) == [i * 8192 for i in range(32)]
    assert all(r == 4096 for _, r in done)
    for i in range(32):
        assert fs.pread(fd, 4096, i * 8192) == bytes([i + 1]) * 4096
        assert fs.pread(fd, 4096, i * 8192 + 4096) == bytes(4096)
    fs.close(fd)


def test_reap_inside_a_plug_submits_first(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | os.O_DIRECT)
    fs.pwrite(fd, _buf(0, MiB), 0)
    b = _buf(7)
    with fs.plug():
        h = fs.submit_pwrite(fd, b, 4096)
        [(h2, res)] = _run_with_timeout(lambda: fs.reap(1, timeout=30))
    assert h2 is h and res == 4096
    assert fs.pread(fd, 4096, 4096) == bytes([7]) * 4096
    fs.close(fd)


@pytest.mark.parametrize("plugged", [False, True])
def test_truncate_after_own_async_write_does_not_wait_forever(fs, plugged):
    """ftruncate waits for DIO in flight (inode_dio_wait); that DIO is on the caller's own
    queue, which only the caller reaps."""
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | os.O_DIRECT)
    fs.pwrite(fd, _buf(0, MiB), 0)
    b = _buf(5)

    def go():
        if plugged:
            with fs.plug():
                h = fs.submit_pwrite(fd, b, 8192)
                fs.ftruncate(fd, 12288)
        else:
            h = fs.submit_pwrite(fd, b, 8192)
            fs.ftruncate(fd, 12288)
        return h

    h = _run_with_timeout(go)
    [(h2, res)] = fs.reap(1, timeout=30)
    assert h2 is h and res == 4096
    assert fs.fstat(fd).st_size == 12288
    assert fs.pread(fd, 8192, 4096) == bytes(4096) + bytes([5]) * 4096
    fs.close(fd)

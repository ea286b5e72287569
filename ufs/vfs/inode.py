"""In-memory inode: the state the VFS, the DIO engine and the page cache share for one file.

Layer: vfs.  Imports ``ufs.vfs.locks``, ``ufs.vfs.pagecache``, ``ufs.errors`` and the standard
library.

Fields follow the kernel's ``struct inode`` (CORE-API §5): ``i_size`` (bytes; a plain attribute,
written under ``i_rwsem`` held exclusive or by the DIO completion that owns the extension),
``i_blkbits`` (log2 of the filesystem block size), ``i_sb``, ``i_mapping`` (the page cache),
``i_rwsem`` (lockdep class ``"inode.i_rwsem"``), ``i_mmap_lock`` (``"inode.i_mmap_lock"``, taken
inside ``i_rwsem``), mode/nlink/uid/gid/times.

DIO accounting (sem §6): ``inode_dio_begin`` raises ``i_dio_count`` before a dio issues I/O,
``inode_dio_end`` lowers it and wakes waiters at zero, ``inode_dio_wait`` sleeps until it is
zero.  The counter means "I/O in flight", not "durable".  As the kernel's atomic counter with
its wait bit, begin/end are an update under a plain lock (``_dio_lock``, a leaf), and the
Condition built on that lock is touched only when ``_dio_waiters`` says someone sleeps in
``inode_dio_wait``: waiters register and test the count under the same lock, so the drop to
zero either happens before a waiter tests (it does not sleep) or sees it registered (and wakes
it).
"""
from __future__ import annotations

import stat
import threading
import time

from ufs.errors import InvariantError
from ufs.vfs.locks import RWSem
from ufs.vfs.pagecache import PageCache

__all__ = ["Inode"]


class Inode:
    """One in-memory inode.  Personalities subclass it for their own fields."""

    # Class-level defaults: a personality may override them with properties.
    i_blocks = 0        # 512-byte units, as st_blocks
    i_op = None         # InodeOperations (ufs.vfs.ops)
    i_fop = None        # FileOperations for opens of this inode

    def __init__(self, sb, ino: int, mode: int = stat.S_IFREG | 0o644, *, size: int = 0,
                 blkbits: int | None = None, wb_ops=None, uid: int = 0, gid: int = 0,
                 nlink: int = 1):
        self.i_sb = sb
        self.i_ino = ino
        self.i_mode = mode
        self.i_nlink = nlink
        self.i_uid = uid
        self.i_gid = gid
        now = time.time_ns()
        self.i_atime_ns = self.i_mtime_ns = self.i_ctime_ns = now
        self.i_size = size
        if blkbits is None:
            blkbits = getattr(sb, "s_blocksize_bits", 12)
        self.i_blkbits = blkbits
        self.i_rwsem = RWSem("inode.i_rwsem")
        self.i_mmap_lock = RWSem("inode.i_mmap_lock")
        self._dio_lock = threading.Lock()
        self._dio_cv = threading.Condition(self._dio_lock)
        self._dio_waiters = 0           # threads in inode_dio_wait (under _dio_lock)
        self.i_dio_count = 0
        self.i_private = None
        if wb_ops is None:
            wb_ops = getattr(sb, "s_wb_ops", None)
        self.i_mapping = PageCache(self, a_ops=wb_ops,
                                   budget=getattr(sb, "s_page_budget", None))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} ino={self.i_ino} size={self.i_size}>"

    @property
    def i_blocksize(self) -> int:
        """Filesystem block size in bytes."""
        return 1 << self.i_blkbits

    # kernel names for readers of kernel code
    def i_size_read(self) -> int:
        return self.i_size

    def i_size_write(self, size: int) -> None:
        """Set i_size.  Callers hold i_rwsem exclusive or own the extending DIO completion."""
        self.i_size = size

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.i_mode)

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.i_mode)

    # --- DIO in-flight accounting ---
    def inode_dio_begin(self) -> None:
        lock = self._dio_lock
        lock.acquire()
        try:
            self.i_dio_count += 1
        finally:
            lock.release()

    def inode_dio_end(self) -> None:
        """Lower the counter; at zero wake every ``inode_dio_wait``."""
        lock = self._dio_lock
        lock.acquire()
        try:
            n = self.i_dio_count - 1
            if n < 0:
                raise InvariantError(f"inode_dio_end without inode_dio_begin on inode {self.i_ino}")
            self.i_dio_count = n
            if not n and self._dio_waiters:
                self._dio_cv.notify_all()
        finally:
            lock.release()

    def inode_dio_wait(self, timeout: float | None = None) -> bool:
        """Sleep until no DIO is in flight.  Returns False only if ``timeout`` expired.

        A DIO the calling thread submitted asynchronously completes only when this thread
        reaps its device queue (a ring is reaped by the thread that owns it; there is no
        interrupt to do it for us), so while that queue has I/O in flight the wait drives
        it instead of sleeping: truncate after one's own unreaped write must not hang."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._dio_cv:
            if not self.i_dio_count:
                return True
        q = self._own_queue()
        while q is not None and q.inflight > 0:
            if deadline is not None and time.monotonic() >= deadline:
                break
            q.wait(1)                       # our completions run here (GIL released)
            if not self.i_dio_count:
                return True
        with self._dio_cv:
            if not self.i_dio_count:
                return True
            self._dio_waiters += 1
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                return self._dio_cv.wait_for(lambda: self.i_dio_count == 0, left)
            finally:
                self._dio_waiters -= 1

    def _own_queue(self):
        """The calling thread's queue on this inode's device, if it has one."""
        bdev = getattr(self.i_sb, "bdev", None)
        current = getattr(bdev, "current_queue", None)
        return current() if current is not None else None

    def touch_mtime(self) -> None:
        """file_update_time(): mtime and ctime to now."""
        self.i_mtime_ns = self.i_ctime_ns = time.time_ns()

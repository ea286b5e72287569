"""A minimal host for DIO engine tests (docs/CORE-API.md §5), plus a layout-driven IomapOps.

Not ufs.vfs: just enough Inode/File/Superblock/PageCache/WorkQueue for the engine, with every
host call recorded in one shared ``events`` list so tests can check the completion order.
``NoReentryLock`` raises instead of deadlocking when the thread holding it takes it again
(the seed scenario: an fsync that takes i_rwsem, called while the DIO caller holds it).
"""
from __future__ import annotations

import queue
import threading

from ufs.errors import DeadlockError
from ufs.iomap import DioOps, IomapOps, Iocb, Kiocb, MapType


class NoReentryLock:
    def __init__(self, name):
        self.name = name
        self._lock = threading.Lock()
        self.owner = None

    def acquire(self):
        if self.owner == threading.get_ident():
            raise DeadlockError(f"{self.name} re-acquired by its holder (would deadlock)")
        self._lock.acquire()
        self.owner = threading.get_ident()

    def release(self):
        self.owner = None
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class PageCache:
    """Pages as {index: dirty}.  ``fail_invalidate``: an OSError to raise from invalidate."""

    def __init__(self, inode, events, page_size=4096):
        self.inode, self.events, self.page_size = inode, events, page_size
        self.pages = {}
        self.fail_invalidate = None
        self.fail_writeback = None

    @property
    def nrpages(self):
        return len(self.pages)

    def _idx(self, pos, end):
        return range(pos // self.page_size, (end + self.page_size - 1) // self.page_size)

    def add(self, pos, dirty=False):
        self.pages[pos // self.page_size] = dirty

    def has_pages(self, pos, end):
        return any(i in self.pages for i in self._idx(pos, end))

    def has_dirty(self, pos, end):
        return any(self.pages.get(i) for i in self._idx(pos, end))

    def write_and_wait_range(self, pos, end):
        self.events.append(("writeback", pos, end))
        if self.fail_writeback is not None:
            raise self.fail_writeback
        for i in self._idx(pos, end):
            if i in self.pages:
                self.pages[i] = False

    def invalidate_range(self, pos, end):
        self.events.append(("invalidate", pos, end))
        if self.fail_invalidate is not None:
            raise self.fail_invalidate
        for i in self._idx(pos, end):
            self.pages.pop(i, None)


class WorkQueue:
    def __init__(self, name, events):
        self.name, self.events = name, events
        self.q = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        self.threads = set()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            fn, args = item
            self.threads.add(threading.get_ident())
            try:
                fn(*args)
            finally:
                self.q.task_done()

    def queue_work(self, fn, *args):
        self.events.append(("queue_work",))
        self.q.put((fn, args))

    def flush(self):
        self.q.join()

    def destroy(self):
        self.q.put(None)
        self.thread.join()


class Superblock:
    def __init__(self, events, blocksize=4096):
        self.events = events
        self.s_blocksize = blocksize
        self._wq = None

    @property
    def s_dio_done_wq(self):
        if self._wq is None:
            self._wq = WorkQueue("dio/done", self.events)
        return self._wq


class Inode:
    def __init__(self, sb, size=0, blkbits=12):
        self.i_sb = sb
        self.events = sb.events
        self.i_size = size
        self.i_blkbits = blkbits
        self.i_rwsem = NoReentryLock("inode.i_rwsem")
        self.i_mapping = PageCache(self, sb.events)
        self.dio_count = 0
        self.dio_begins = 0
        self.dio_ends = 0
        self.dirtied = 0

    def inode_dio_begin(self):
        self.events.append(("dio_begin",))
        self.dio_count += 1
        self.dio_begins += 1

    def inode_dio_end(self):
        self.events.append(("dio_end",))
        assert self.dio_count > 0, "inode_dio_end without begin"
        self.dio_count -= 1
        self.dio_ends += 1

    def mark_inode_dirty(self):
        self.dirtied += 1


class File:
    """``fsync_takes_rwsem``: the personality's fsync takes i_rwsem (btrfs-like)."""

    def __init__(self, inode, fsync_takes_rwsem=False):
        self.f_inode = inode
        self.events = inode.events
        self.fsync_takes_rwsem = fsync_takes_rwsem
        self.fsync_error = None
        self.fsyncs = []

    def vfs_fsync_range(self, start, end, datasync):
        self.events.append(("fsync", start, end, bool(datasync)))
        if self.fsync_takes_rwsem:
            with self.f_inode.i_rwsem:
                pass
        if self.fsync_error is not None:
            raise self.fsync_error
        self.fsyncs.append((start, end, bool(datasync)))


class Host:
    """One superblock, inode and file with a shared event log."""

    def __init__(self, size=0, blkbits=12, fsync_takes_rwsem=False):
        self.events = []
        self.sb = Superblock(self.events, 1 << blkbits)
        self.inode = Inode(self.sb, size, blkbits)
        self.file = File(self.inode, fsync_takes_rwsem)

    def kiocb(self, pos, write=False, flags=0, complete=None):
        f = int(Iocb.DIRECT) | flags | (int(Iocb.WRITE) if write else 0)
        return RecordingKiocb(self, pos, f, complete)

    def close(self):
        if self.sb._wq is not None:
            self.sb._wq.destroy()


def RecordingKiocb(host, pos, flags, complete):
    return Kiocb(host.file, pos, flags, complete)


class LayoutOps(IomapOps):
    """iomap_begin from an explicit layout: [(file_offset, length, type, flags, addr)].

    Ranges not in the layout are holes (up to the next extent).  ``max_len`` caps each
    mapping; ``begin_errors``/``end_errors``: {call_number: exception} (0-based);
    ``extra``: a callable(iomap) run after filling (to break contracts, set inline data...).
    """

    def __init__(self, layout, bdev, *, max_len=None, events=None, extra=None):
        self.layout = sorted(layout)
        self.bdev = bdev
        self.max_len = max_len
        self.begin_calls = []
        self.end_calls = []
        self.begin_errors = {}
        self.end_errors = {}
        self.events = events
        self.extra = extra
        self.inline = {}

    def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
        n = len(self.begin_calls)
        self.begin_calls.append((pos, length, int(flags), iomap.type, iomap.addr, srcmap.type))
        if n in self.begin_errors:
            raise self.begin_errors[n]
        nxt = None
        for off, ln, typ, fl, addr in self.layout:
            if off <= pos < off + ln:
                iomap.offset, iomap.length, iomap.type, iomap.flags = off, ln, typ, fl
                if typ in (MapType.MAPPED, MapType.UNWRITTEN):
                    iomap.addr, iomap.bdev = addr, self.bdev
                elif typ == MapType.INLINE:
                    iomap.inline_data = self.inline[off]
                break
            if off > pos and nxt is None:
                nxt = off
        else:
            iomap.offset, iomap.type = pos, MapType.HOLE
            iomap.length = (nxt - pos) if nxt is not None else length
        if self.max_len is not None and iomap.offset + iomap.length > pos + self.max_len:
            cut = pos + self.max_len - iomap.offset
            iomap.length = cut
        if self.extra is not None:
            self.extra(iomap, srcmap, n)

    def iomap_end(self, inode, pos, length, written, flags, iomap):
        n = len(self.end_calls)
        self.end_calls.append((pos, length, written, int(flags)))
        if n in self.end_errors:
            raise self.end_errors[n]


class RecordingDioOps(DioOps):
    """end_io that records itself (with ki_pos at that moment) and may replace the result."""

    def __init__(self, events, result=None, raise_exc=None):
        self.events, self.result, self.raise_exc = events, result, raise_exc
        self.calls = []

    def end_io(self, iocb, size, error, flags):
        self.events.append(("end_io", iocb.ki_pos, size, error, int(flags)))
        self.calls.append((size, error, int(flags)))
        if self.raise_exc is not None:
            raise self.raise_exc
        return self.result

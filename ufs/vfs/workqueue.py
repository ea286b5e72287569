"""WorkQueue: a small pool of worker threads running queued callables in order of queueing.

Layer: vfs.  Imports ``ufs.errors`` and the standard library.

Used as the superblock's ``s_dio_done_wq``: the DIO engine queues the completion of async
writes that cannot finish in the reaping thread (sem §3.8).  Like the kernel's alloc_workqueue:
- at most ``max_active`` items run at once; workers start lazily, on demand;
- ``flush()`` waits until every item queued *before* the call has finished (later items may
  still run); flushing from inside an item of the same queue would wait for itself, so it
  raises DeadlockError, as lockdep reports flush_workqueue from its own worker;
- an exception in an item is logged on ``ufs.vfs.workqueue`` with its traceback and kept in
  ``errors`` (never lost silently); the queue goes on;
- ``destroy()`` drains everything queued, then stops the workers; queueing afterwards is a bug
  (InvariantError).

Locks: one private Condition guards the queue, the in-flight set and the worker count; work
items run without it.
"""
from __future__ import annotations

import collections
import logging
import threading

from ufs.errors import DeadlockError, InvariantError

__all__ = ["WorkQueue"]

log = logging.getLogger("ufs.vfs.workqueue")


class WorkQueue:
    """Run ``fn(*args)`` on up to ``max_active`` worker threads."""

    def __init__(self, name: str, max_active: int = 2):
        if max_active < 1:
            raise ValueError("max_active must be >= 1")
        self.name = name
        self.max_active = max_active
        self._cv = threading.Condition(threading.Lock())
        self._items: collections.deque = collections.deque()   # (seq, fn, args)
        self._running: set[int] = set()   # seqs being run
        self._seq = 0                     # last seq handed out
        self._workers: list[threading.Thread] = []
        self._idle = 0
        self._dead = False
        self._tls = threading.local()     # .seq of the item this worker runs
        self.errors: list[BaseException] = []   # exceptions raised by work items, oldest first
        self.completed = 0

    def __repr__(self) -> str:
        return (f"<WorkQueue {self.name} queued={len(self._items)} running={len(self._running)} "
                f"workers={len(self._workers)}>")

    def queue_work(self, fn, *args) -> None:
        """Queue ``fn(*args)``.  Thread-safe; callable from a work item."""
        with self._cv:
            if self._dead:
                raise InvariantError(f"queue_work on destroyed workqueue {self.name}")
            self._seq += 1
            self._items.append((self._seq, fn, args))
            if self._idle:
                self._cv.notify()
            elif len(self._workers) < self.max_active:
                t = threading.Thread(target=self._worker, name=f"{self.name}/{len(self._workers)}",
                                     daemon=True)
                self._workers.append(t)
                t.start()

    def _worker(self) -> None:
        cv = self._cv
        while True:
            with cv:
                while not self._items and not self._dead:
                    self._idle += 1
                    cv.wait()
                    self._idle -= 1
                if not self._items:
                    return          # destroyed and drained
                seq, fn, args = self._items.popleft()
                self._running.add(seq)
            self._tls.seq = seq
            try:
                fn(*args)
            except BaseException as e:   # noqa: BLE001 - a work item must never kill its worker
                log.error("workqueue %s: work item %r raised", self.name, fn, exc_info=True)
                with cv:
                    self.errors.append(e)
            finally:
                self._tls.seq = None
                with cv:
                    self._running.discard(seq)
                    self.completed += 1
                    cv.notify_all()

    def _oldest_pending(self) -> int | None:
        first = self._items[0][0] if self._items else None
        if self._running:
            low = min(self._running)
            first = low if first is None else min(first, low)
        return first

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for every item queued before this call.  Returns False on timeout."""
        with self._cv:
            target = self._seq
            mine = getattr(self._tls, "seq", None)
            if mine is not None and mine <= target:
                raise DeadlockError(f"flush of workqueue {self.name} from its own work item")
            return self._cv.wait_for(lambda: (self._oldest_pending() or target + 1) > target,
                                     timeout)

    def pending(self) -> int:
        """Items queued or running."""
        with self._cv:
            return len(self._items) + len(self._running)

    def destroy(self, timeout: float | None = None) -> None:
        """Drain the queue, then stop the workers (idempotent)."""
        self.flush(timeout)
        with self._cv:
            self._dead = True
            workers, self._workers = self._workers, []
            self._cv.notify_all()
        me = threading.current_thread()
        for t in workers:
            if t is not me:
                t.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

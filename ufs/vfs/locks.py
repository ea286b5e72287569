"""Sleeping locks of the VFS: :class:`Mutex` and the reader/writer semaphore :class:`RWSem`.

Layer: vfs.  Imports ``ufs.vfs.lockdep``, ``ufs.errors`` and the standard library.

Every lock has a lockdep class name (``"inode.i_rwsem"``) and a default nesting subclass; an
acquisition may pass another subclass (the kernel's ``down_write_nested``/``mutex_lock_nested``),
so a rename can hold the parent's and the child's ``i_rwsem`` at once.

With checking off (the default outside tests) an acquisition is a plain lock operation plus a
record of the owner and its caller frame (kept live, formatted only if someone reports it); a
waiter blocked longer than the hung-task timeout logs a report naming the lock, its own stack and
the holders' acquisition sites, and with ``hung_task_panic`` raises DeadlockError instead of
waiting on.  With checking on, every blocking acquisition is validated by
:func:`ufs.vfs.lockdep.check_acquire` *before* it may block.

RWSem rules (kernel rw_semaphore, writer-preferring):
- readers share; a writer excludes everyone;
- once a writer waits, new readers (and read trylocks) wait too, so readers cannot starve a
  writer; this is also why a thread must not take a read lock it already holds;
- ``downgrade_write`` turns the caller's write hold into a read hold without letting a writer in;
- releases must come from the acquiring thread, except ``*_non_owner`` acquisitions (which
  lockdep does not track).

Internal state of an RWSem is guarded by its private ``threading.Lock``; that lock is a leaf
(only held for bookkeeping and while waiting on its conditions).
"""
from __future__ import annotations

import sys
import threading
from time import monotonic

from ufs.errors import DeadlockError, InvariantError
from ufs.vfs import lockdep
from ufs.vfs.lockdep import READ, WRITE, capture_site, lock_class

__all__ = ["Mutex", "RWSem"]

_get_ident = threading.get_ident
_getframe = sys._getframe


def _timeouts(lock):
    wd = lockdep.watchdog
    timeout = wd.hung_task_timeout if lock.hung_task_timeout is None else lock.hung_task_timeout
    panic = wd.hung_task_panic if lock.hung_task_panic is None else lock.hung_task_panic
    return timeout, panic


class Mutex:
    """A sleeping mutex with an owner (kernel ``struct mutex``).  Not recursive.

    ``with m:`` locks and unlocks.  Callers must unlock from the locking thread.
    """

    __slots__ = ("name", "subclass", "hung_task_timeout", "hung_task_panic",
                 "_lock", "_owner", "_site", "_held", "__weakref__")

    def __init__(self, name: str, subclass: int = 0, *, hung_task_timeout: float | None = None,
                 hung_task_panic: bool | None = None):
        self.name = name
        self.subclass = subclass
        self.hung_task_timeout = hung_task_timeout
        self.hung_task_panic = hung_task_panic
        self._lock = threading.Lock()
        self._owner = 0
        self._site = None
        self._held = None

    def __repr__(self) -> str:
        return f"<Mutex {self.name} owner={self._owner or None}>"

    # --- acquisition ---
    def lock(self, subclass: int | None = None) -> None:
        """Acquire, sleeping as long as needed (see the module docstring for the watchdog)."""
        self._lock_at(_getframe(1), subclass)

    lock_nested = lock

    def _lock_at(self, frame, subclass) -> None:
        if lockdep._on:
            cls = lock_class(self.name, self.subclass if subclass is None else subclass)
            site = capture_site(frame)
            lockdep.check_acquire(self, cls, WRITE, site)
            if not self._lock.acquire(False):
                self._wait(frame)
            self._held = lockdep.acquired(self, cls, WRITE, site, False)
            self._site = site
        else:
            if not self._lock.acquire(False):
                self._wait(frame)
            self._held = None
            self._site = (frame, frame.f_lineno)
        self._owner = _get_ident()

    def _wait(self, frame) -> None:
        timeout, panic = _timeouts(self)
        if timeout and timeout > 0:
            start = monotonic()
            if self._lock.acquire(timeout=timeout):
                return
            owner, site = self._owner, self._site
            text = lockdep.hung_task_report(self, WRITE, monotonic() - start, frame,
                                            [(owner, WRITE, site)] if owner else [])
            if panic:
                raise DeadlockError(text)
        self._lock.acquire()

    def trylock(self, subclass: int | None = None) -> bool:
        """Acquire if free; never blocks, never raises for recursion, adds no dependency."""
        if not self._lock.acquire(False):
            return False
        frame = _getframe(1)
        if lockdep._on:
            cls = lock_class(self.name, self.subclass if subclass is None else subclass)
            site = capture_site(frame)
            self._held = lockdep.acquired(self, cls, WRITE, site, True)
            self._site = site
        else:
            self._held = None
            self._site = (frame, frame.f_lineno)
        self._owner = _get_ident()
        return True

    def unlock(self) -> None:
        """Release.  Raises InvariantError if the calling thread is not the owner."""
        if self._owner != _get_ident():
            raise InvariantError(f"mutex {self.name} unlocked by a thread that does not own it")
        held = self._held
        self._owner = 0
        self._site = None
        self._held = None
        self._lock.release()
        if held is not None:
            lockdep.released(held)

    def __enter__(self):
        self._lock_at(_getframe(1), None)
        return self

    def __exit__(self, *exc):
        self.unlock()

    # --- queries ---
    def is_locked(self) -> bool:
        return self._lock.locked()

    @property
    def owner(self) -> int:
        """Thread ident of the owner, 0 when free."""
        return self._owner

    def assert_held(self) -> None:
        """InvariantError unless the calling thread holds the mutex (lockdep_assert_held)."""
        if self._owner != _get_ident():
            raise InvariantError(f"{self.name} is not held by the calling thread")


class _Guard:
    __slots__ = ("sem", "write", "subclass")

    def __init__(self, sem, write, subclass):
        self.sem = sem
        self.write = write
        self.subclass = subclass

    def __enter__(self):
        if self.write:
            self.sem._down_write(_getframe(1), self.subclass)
        else:
            self.sem._down_read(_getframe(1), self.subclass)
        return self.sem

    def __exit__(self, *exc):
        if self.write:
            self.sem.up_write()
        else:
            self.sem.up_read()


def _live_site(frame, lasti) -> tuple:
    """The lockdep form ``(frame, lineno)`` of an acquisition recorded as ``(frame, f_lasti)``.

    The line is resolved only when someone reports the site: reading ``f_lasti`` costs less
    than ``f_lineno`` (a line-table walk) on every acquisition."""
    for start, end, line in frame.f_code.co_lines():
        if start <= lasti < end and line is not None:
            return (frame, line)
    return (frame, frame.f_lineno)


class RWSem:
    """Reader/writer semaphore (kernel ``struct rw_semaphore``), writer-preferring.

    Callers release from the acquiring thread; ``with sem.read_locked():`` and
    ``with sem.write_locked():`` pair the calls.

    Bookkeeping: every owned read hold is one entry ``(ident, site, lasti, held)`` in
    ``_rholders`` (a list: one reader entry is appended and popped per I/O, cheaper than a dict
    of per-thread lists).  With checking off, ``site`` is the caller's live frame and ``lasti``
    its ``f_lasti`` at the acquisition (turned into a line only for a report) and ``held`` is
    None; with checking on, ``site`` is the captured stack, ``lasti`` None and ``held`` the
    lockdep HeldLock.  The write hold keeps the same three in ``_wsite``/``_wlasti``/
    ``_wheld``.  ``_rwait`` counts readers sleeping on ``_rcond``, so a release only calls into
    the (pure Python) Condition when someone waits.

    ``down_read``/``up_read``/``down_write``/``up_write`` with checking off are the fast path:
    one acquire/release of the private lock, no lockdep call, no Condition unless contended.
    """

    __slots__ = ("name", "subclass", "hung_task_timeout", "hung_task_panic",
                 "_m", "_rcond", "_wcond", "_readers", "_anon_readers", "_writer", "_wsite",
                 "_wlasti", "_wheld", "_wwait", "_rwait", "_rholders", "__weakref__")

    def __init__(self, name: str, subclass: int = 0, *, hung_task_timeout: float | None = None,
                 hung_task_panic: bool | None = None):
        self.name = name
        self.subclass = subclass
        self.hung_task_timeout = hung_task_timeout
        self.hung_task_panic = hung_task_panic
        self._m = threading.Lock()
        self._rcond = threading.Condition(self._m)
        self._wcond = threading.Condition(self._m)
        self._readers = 0               # all read holds, owned or not
        self._anon_readers = 0          # read holds taken with down_read_non_owner
        self._writer = 0                # ident of the write holder, 0 when none
        self._wsite = None
        self._wlasti = None
        self._wheld = None
        self._wwait = 0                 # writers queued: new readers must wait behind them
        self._rwait = 0                 # readers sleeping on _rcond
        self._rholders: list[tuple] = []    # (ident, site, lasti, HeldLock|None), oldest first

    def __repr__(self) -> str:
        return (f"<RWSem {self.name} readers={self._readers} writer={self._writer or None} "
                f"waiting_writers={self._wwait}>")

    # --- read side ---
    def down_read(self, subclass: int | None = None) -> None:
        """Acquire shared; sleeps while a writer holds or waits."""
        frame = _getframe(1)
        if lockdep._on:
            self._down_read(frame, subclass)
            return
        # the unchecked fast path: _down_read without lockdep, inlined
        m = self._m
        m.acquire()
        try:
            if self._writer or self._wwait:
                self._wait_read(frame)
            self._readers += 1
            self._rholders.append((_get_ident(), frame, frame.f_lasti, None))
        finally:
            m.release()

    def down_read_nested(self, subclass: int) -> None:
        self._down_read(_getframe(1), subclass)

    def _down_read(self, frame, subclass) -> None:
        if lockdep._on:
            cls = lock_class(self.name, self.subclass if subclass is None else subclass)
            site = capture_site(frame)
            lockdep.check_acquire(self, cls, READ, site)
        else:
            cls = site = None
        m = self._m
        m.acquire()
        try:
            if self._writer or self._wwait:
                self._wait_read(frame)
            self._readers += 1
            if site is None:
                self._rholders.append((_get_ident(), frame, frame.f_lasti, None))
            else:
                held = lockdep.acquired(self, cls, READ, site, False)
                self._rholders.append((_get_ident(), site, None, held))
        finally:
            m.release()

    def down_read_trylock(self, subclass: int | None = None) -> bool:
        """Acquire shared if no writer holds or waits; never blocks or raises for recursion."""
        m = self._m
        with m:
            if self._writer or self._wwait:
                return False
            self._readers += 1
            frame = _getframe(1)
            if lockdep._on:
                cls = lock_class(self.name, self.subclass if subclass is None else subclass)
                site = capture_site(frame)
                held = lockdep.acquired(self, cls, READ, site, True)
                self._rholders.append((_get_ident(), site, None, held))
            else:
                self._rholders.append((_get_ident(), frame, frame.f_lasti, None))
            return True

    def up_read(self) -> None:
        """Release one read hold of the calling thread (InvariantError if it has none).

        The hold released is the calling thread's most recent one."""
        ident = _get_ident()
        m = self._m
        m.acquire()
        try:
            hs = self._rholders
            if hs and hs[-1][0] == ident:
                ent = hs.pop()
            else:
                ent = self._pop_reader(ident)
            n = self._readers - 1
            self._readers = n
            if not n and self._wwait:
                self._wcond.notify()
        finally:
            m.release()
        if ent[3] is not None:
            lockdep.released(ent[3])

    def _pop_reader(self, ident):
        """Remove and return the calling thread's newest read entry (self._m held)."""
        hs = self._rholders
        for i in range(len(hs) - 1, -1, -1):
            if hs[i][0] == ident:
                return hs.pop(i)
        raise InvariantError(f"up_read of {self.name}: not read-held by this thread")

    def down_read_non_owner(self) -> None:
        """Shared acquisition that another thread may release (not tracked by lockdep)."""
        with self._m:
            if self._writer or self._wwait:
                self._wait_read(_getframe(1))
            self._readers += 1
            self._anon_readers += 1

    def up_read_non_owner(self) -> None:
        with self._m:
            if not self._anon_readers:
                raise InvariantError(f"up_read_non_owner of {self.name} without a non-owner hold")
            self._anon_readers -= 1
            self._readers -= 1
            if self._readers == 0 and self._wwait:
                self._wcond.notify()

    # --- write side ---
    def down_write(self, subclass: int | None = None) -> None:
        """Acquire exclusive; sleeps while anyone holds the semaphore."""
        frame = _getframe(1)
        if lockdep._on:
            self._down_write(frame, subclass)
            return
        m = self._m
        m.acquire()
        try:
            if self._writer or self._readers:
                self._wait_write(frame)
            self._writer = _get_ident()
            self._wsite = frame
            self._wlasti = frame.f_lasti
            self._wheld = None
        finally:
            m.release()

    def down_write_nested(self, subclass: int) -> None:
        self._down_write(_getframe(1), subclass)

    def _down_write(self, frame, subclass) -> None:
        if lockdep._on:
            cls = lock_class(self.name, self.subclass if subclass is None else subclass)
            site = capture_site(frame)
            lockdep.check_acquire(self, cls, WRITE, site)
        else:
            cls = site = None
        m = self._m
        m.acquire()
        try:
            if self._writer or self._readers:
                self._wait_write(frame)
            self._writer = _get_ident()
            if site is None:
                self._wsite = frame
                self._wlasti = frame.f_lasti
                self._wheld = None
            else:
                self._wsite = site
                self._wlasti = None
                self._wheld = lockdep.acquired(self, cls, WRITE, site, False)
        finally:
            m.release()

    def _wait_write(self, frame) -> None:
        """Queue as a writer and sleep until the semaphore is free (self._m held)."""
        self._wwait += 1
        try:
            self._wait(self._wcond, self._write_blocked, WRITE, frame)
        except BaseException:
            self._wwait -= 1
            if not self._wwait and not self._writer and self._rwait:
                # this waiter may have been all that held new readers back
                self._rcond.notify_all()
            raise
        self._wwait -= 1

    def _wait_read(self, frame) -> None:
        """Sleep until no writer holds or waits (self._m held)."""
        self._rwait += 1
        try:
            self._wait(self._rcond, self._read_blocked, READ, frame)
        finally:
            self._rwait -= 1

    def down_write_trylock(self, subclass: int | None = None) -> bool:
        """Acquire exclusive if free; never blocks or raises for recursion."""
        with self._m:
            if self._writer or self._readers:
                return False
            frame = _getframe(1)
            if lockdep._on:
                cls = lock_class(self.name, self.subclass if subclass is None else subclass)
                site = capture_site(frame)
                self._wheld = lockdep.acquired(self, cls, WRITE, site, True)
                self._wsite = site
                self._wlasti = None
            else:
                self._wheld = None
                self._wsite = frame
                self._wlasti = frame.f_lasti
            self._writer = _get_ident()
            return True

    def up_write(self) -> None:
        """Release the write hold (InvariantError unless the calling thread holds it)."""
        m = self._m
        m.acquire()
        try:
            if self._writer != _get_ident():
                raise InvariantError(f"up_write of {self.name}: not write-held by this thread")
            held = self._wheld
            self._writer = 0
            self._wsite = None
            self._wheld = None
            # Writer preference: hand over to a queued writer before any reader.
            if self._wwait:
                self._wcond.notify()
            elif self._rwait:
                self._rcond.notify_all()
        finally:
            m.release()
        if held is not None:
            lockdep.released(held)

    def downgrade_write(self) -> None:
        """Turn the caller's write hold into a read hold atomically (XFS ILOCK demote)."""
        with self._m:
            ident = _get_ident()
            if self._writer != ident:
                raise InvariantError(f"downgrade_write of {self.name}: "
                                     "not write-held by this thread")
            held = self._wheld
            if held is not None:
                held.mode = READ
            self._rholders.append((ident, self._wsite, self._wlasti, held))
            self._writer = 0
            self._wsite = None
            self._wheld = None
            self._readers += 1
            if not self._wwait and self._rwait:
                self._rcond.notify_all()

    # --- guards ---
    def read_locked(self, subclass: int | None = None) -> _Guard:
        """``with sem.read_locked():`` — down_read/up_read."""
        return _Guard(self, False, subclass)

    def write_locked(self, subclass: int | None = None) -> _Guard:
        """``with sem.write_locked():`` — down_write/up_write."""
        return _Guard(self, True, subclass)

    # --- waiting ---
    def _read_blocked(self) -> bool:
        return bool(self._writer or self._wwait)

    def _write_blocked(self) -> bool:
        return bool(self._writer or self._readers)

    def _wait(self, cond, blocked, mode, frame) -> None:
        """Wait on ``cond`` (self._m held) until ``blocked()`` is false, with the watchdog."""
        timeout, panic = _timeouts(self)
        if not (timeout and timeout > 0):
            while blocked():
                cond.wait()
            return
        start = monotonic()
        reported = False
        while blocked():
            if reported:
                cond.wait()
                continue
            remaining = start + timeout - monotonic()
            if remaining > 0:
                cond.wait(remaining)
                continue
            reported = True
            text = lockdep.hung_task_report(self, mode, monotonic() - start, frame, self._holders())
            if panic:
                raise DeadlockError(text)

    def _holders(self) -> list:
        """``(ident, mode, site)`` of every owned hold, sites in lockdep's form."""
        out = []
        if self._writer:
            site, lasti = self._wsite, self._wlasti
            out.append((self._writer, WRITE, site if lasti is None else _live_site(site, lasti)))
        for ident, site, lasti, _ in self._rholders:
            out.append((ident, READ, site if lasti is None else _live_site(site, lasti)))
        return out

    # --- queries ---
    def is_locked(self) -> bool:
        return bool(self._writer or self._readers)

    def is_write_locked(self) -> bool:
        return bool(self._writer)

    @property
    def owner(self) -> int:
        """Ident of the write holder (0 when none)."""
        return self._writer

    @property
    def readers(self) -> int:
        return self._readers

    def held_by_me(self) -> int:
        """0, READ or WRITE: how the calling thread holds the semaphore."""
        ident = _get_ident()
        if self._writer == ident:
            return WRITE
        for ent in self._rholders:
            if ent[0] == ident:
                return READ
        return 0

    def assert_held(self, write: bool = False) -> None:
        """InvariantError unless the calling thread holds it (exclusively if ``write``)."""
        how = self.held_by_me()
        if not how or (write and how != WRITE):
            raise InvariantError(f"{self.name} is not {'write-' if write else ''}held by the "
                                 "calling thread")

"""RWSem fast paths (lockdep off) keep the semantics of the checked path: holder bookkeeping
and the acquisition sites the hung-task report names (resolved lazily from ``f_lasti``), waking
of sleeping readers/writers only when someone sleeps, writer preference, lockdep on/off
switching with holds taken in the other mode, and the cost bound."""
from __future__ import annotations

import logging
import sys
import threading
import time

import pytest

from ufs.errors import DeadlockError, InvariantError
from ufs.vfs import RWSem, lockdep
from ufs.vfs.lockdep import READ, WRITE, format_site

HERE = __file__.rsplit("/", 1)[-1]


@pytest.fixture
def checked():
    with lockdep.checking(True, fresh=True):
        yield


@pytest.fixture
def unchecked():
    with lockdep.checking(False):
        yield


def _lineno() -> int:
    """Line number of the caller's current line."""
    return sys._getframe(1).f_lineno


def _site_line(site) -> tuple[str, int]:
    """(function, line) of the innermost frame of a site, as format_site renders it."""
    first = format_site(site).splitlines()[0]
    line = int(first.split("line ")[1].split(",")[0])
    return first.rsplit(" in ", 1)[1], line


def _wait_until(pred, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _start(fn):
    box = {}

    def body():
        try:
            box["ret"] = fn()
        except BaseException as e:     # noqa: BLE001
            box["exc"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box


# --- uncontended ----------------------------------------------------------------------------

def test_uncontended_read_records_holder_and_exact_site(unchecked):
    sem = RWSem("test.fp.read")
    sem.down_read(); line = _lineno()            # noqa: E702  (site and line on one line)
    try:
        assert sem.readers == 1 and sem.held_by_me() == READ and sem.is_locked()
        sem.assert_held()
        holders = sem._holders()
        assert len(holders) == 1
        ident, mode, site = holders[0]
        assert ident == threading.get_ident() and mode == READ
        # the line of the acquisition, although this frame has moved on since
        assert _site_line(site) == ("test_uncontended_read_records_holder_and_exact_site", line)
    finally:
        sem.up_read()
    assert sem.readers == 0 and not sem.is_locked() and sem.held_by_me() == 0
    assert sem._holders() == [] and sem._rholders == []


def test_uncontended_write_records_site_and_releases(unchecked):
    sem = RWSem("test.fp.write")
    sem.down_write(); line = _lineno()           # noqa: E702
    assert sem.owner == threading.get_ident() and sem.held_by_me() == WRITE
    (ident, mode, site), = sem._holders()
    assert mode == WRITE
    assert _site_line(site) == ("test_uncontended_write_records_site_and_releases", line)
    sem.downgrade_write()                        # the write site becomes the read hold's site
    (ident, mode, site), = sem._holders()
    assert mode == READ and _site_line(site)[1] == line
    assert sem.down_read_trylock() is True       # a second hold of this thread (trylock)
    sem.up_read()
    sem.up_read()
    assert not sem.is_locked() and sem._rholders == []
    assert sem.down_write_trylock() is True
    sem.up_write()
    assert sem.owner == 0 and sem._wsite is None


def test_read_holds_of_several_threads_release_their_own(unchecked):
    sem = RWSem("test.fp.many")
    sem.down_read()
    got, release = threading.Event(), threading.Event()

    def other():
        sem.down_read()
        got.set()
        release.wait(5)
        sem.up_read()
    t = threading.Thread(target=other, daemon=True)
    t.start()
    assert got.wait(2)
    assert sem.readers == 2
    # the other thread's hold is the newest entry: this thread's release must find its own
    assert sem._rholders[-1][0] == t.ident
    sem.up_read()
    assert sem.readers == 1 and sem.held_by_me() == 0
    assert [h[0] for h in sem._holders()] == [t.ident]
    with pytest.raises(InvariantError):
        sem.up_read()                            # this thread holds nothing now
    assert sem.readers == 1                      # and the failed release changed nothing
    release.set()
    t.join(2)
    assert not sem.is_locked()


def test_up_without_hold_is_an_invariant_error(unchecked):
    sem = RWSem("test.fp.bad")
    with pytest.raises(InvariantError):
        sem.up_read()
    with pytest.raises(InvariantError):
        sem.up_write()
    sem.down_read()
    with pytest.raises(InvariantError):
        sem.up_write()
    sem.up_read()
    sem.down_write()                             # the private lock was not left held
    sem.up_write()


# --- contended ------------------------------------------------------------------------------

def test_sleeping_reader_is_woken_by_up_write(unchecked):
    sem = RWSem("test.fp.rwake")
    sem.down_write()
    t, box = _start(lambda: (sem.down_read(), sem.up_read()))
    assert _wait_until(lambda: sem._rwait == 1)
    assert "exc" not in box and t.is_alive()
    sem.up_write()
    t.join(2)
    assert not t.is_alive() and "exc" not in box
    assert sem._rwait == 0 and not sem.is_locked()


def test_readers_queue_behind_a_waiting_writer_then_all_wake(unchecked):
    sem = RWSem("test.fp.pref")
    order = []
    sem.down_read()
    w, wbox = _start(lambda: (sem.down_write(), order.append("w"), time.sleep(0.05),
                              sem.up_write()))
    assert _wait_until(lambda: sem._wwait == 1)
    readers = [_start(lambda: (sem.down_read(), order.append("r"), sem.up_read()))
               for _ in range(3)]
    assert _wait_until(lambda: sem._rwait == 3)    # new readers sleep behind the writer
    assert order == []
    sem.up_read()                                  # the writer goes first, then every reader
    for t, box in [(w, wbox)] + readers:
        t.join(2)
        assert not t.is_alive() and "exc" not in box
    assert order == ["w", "r", "r", "r"]
    assert sem._rwait == 0 and sem._wwait == 0 and not sem.is_locked()


def test_downgrade_wakes_sleeping_readers(unchecked):
    sem = RWSem("test.fp.down")
    sem.down_write()
    t, box = _start(lambda: (sem.down_read(), sem.up_read()))
    assert _wait_until(lambda: sem._rwait == 1)
    sem.downgrade_write()                          # readers may share with the demoted hold
    t.join(2)
    assert not t.is_alive() and "exc" not in box
    sem.up_read()
    assert not sem.is_locked()


def test_writer_giving_up_releases_readers_it_held_back(unchecked):
    """A queued writer that times out (hung-task panic) must wake the readers queued behind
    it: nobody else would."""
    sem = RWSem("test.fp.giveup", hung_task_timeout=0.5, hung_task_panic=True)
    sem.down_read()
    w, wbox = _start(sem.down_write)
    assert _wait_until(lambda: sem._wwait == 1)
    time.sleep(0.3)            # the reader's own watchdog ends 0.3 s after the writer's
    r, rbox = _start(lambda: (sem.down_read(), sem.up_read()))
    assert _wait_until(lambda: sem._rwait == 1)
    w.join(3)
    assert isinstance(wbox.get("exc"), DeadlockError)
    r.join(2)
    assert not r.is_alive() and "exc" not in rbox
    sem.up_read()
    assert not sem.is_locked() and sem._wwait == 0 and sem._rwait == 0


def test_hung_task_report_names_reader_and_writer_acquisition_lines(unchecked, caplog):
    sem = RWSem("test.fp.hung")
    lines = {}
    held, done = threading.Event(), threading.Event()

    def reader_holder():
        sem.down_read(); lines["r"] = _lineno()      # noqa: E702
        held.set()
        done.wait(10)
        sem.up_read()
    t = threading.Thread(target=reader_holder, daemon=True)
    t.start()
    assert held.wait(2)
    try:
        with lockdep.hung_task(0.2, panic=True), caplog.at_level(logging.ERROR,
                                                                 "ufs.vfs.lockdep"):
            with pytest.raises(DeadlockError) as ei:
                sem.down_write()
        msg = str(ei.value)
        assert f'{HERE}", line {lines["r"]}, in reader_holder' in msg
    finally:
        done.set()
        t.join(2)
    # and a write holder, seen by a sleeping reader
    held.clear()
    done.clear()

    def writer_holder():
        sem.down_write(); lines["w"] = _lineno()     # noqa: E702
        held.set()
        done.wait(10)
        sem.up_write()
    t = threading.Thread(target=writer_holder, daemon=True)
    t.start()
    assert held.wait(2)
    try:
        with lockdep.hung_task(0.2, panic=True):
            with pytest.raises(DeadlockError) as ei:
                sem.down_read()
        assert f'{HERE}", line {lines["w"]}, in writer_holder' in str(ei.value)
        assert sem._rwait == 0
    finally:
        done.set()
        t.join(2)
    assert not sem.is_locked()


# --- lockdep on and off ------------------------------------------------------------------------

def test_checked_reread_is_edeadlk_naming_both_sites(checked):
    sem = RWSem("test.fp.rec")
    sem.down_read(); first = _lineno()             # noqa: E702
    try:
        with pytest.raises(DeadlockError) as ei:
            sem.down_read(); second = _lineno()    # noqa: E702,F841
        assert ei.value.errno == 35                # EDEADLK
        msg = str(ei.value)
        assert "recursive locking" in msg and "test.fp.rec" in msg
        assert f"line {first}," in msg and f"line {first + 3}," in msg
        assert sem.readers == 1                    # the refused attempt took nothing
    finally:
        sem.up_read()
    assert lockdep.held_locks() == []


def test_unchecked_reread_is_allowed(unchecked):
    sem = RWSem("test.fp.reread")
    sem.down_read()
    sem.down_read()
    assert sem.readers == 2 and len(sem._rholders) == 2
    sem.up_read()
    sem.up_read()
    assert not sem.is_locked()


def test_holds_survive_switching_lockdep_either_way():
    sem = RWSem("test.fp.switch")
    with lockdep.checking(False):
        sem.down_read()                            # untracked hold
        sem.down_write_trylock()                   # refused: a reader holds it
    with lockdep.checking(True, fresh=True):
        assert lockdep.held_locks() == []
        sem.down_read_nested(1)                    # tracked hold of the same thread
        assert [str(h.cls) for h in lockdep.held_locks()] == ["test.fp.switch/1"]
        sem.up_read()                              # the newest: the tracked one
        assert lockdep.held_locks() == []
        sem.up_read()                              # the untracked one, with checking on
        assert not sem.is_locked()
        sem.down_write()                           # tracked write, released unchecked
        assert len(lockdep.held_locks()) == 1
    with lockdep.checking(False):
        sem.up_write()
    assert lockdep.held_locks() == []
    assert not sem.is_locked()


def test_checked_order_inversion_still_reported(checked):
    a, b = RWSem("test.fp.A"), RWSem("test.fp.B")
    with a.read_locked():
        with b.write_locked():
            pass
    with b.read_locked():
        with pytest.raises(DeadlockError, match="circular locking dependency"):
            a.down_read()
    assert not a.is_locked() and not b.is_locked()


@pytest.mark.parametrize("mode", ["checked", "unchecked"])
def test_fast_and_slow_paths_exclude_each_other(mode, request):
    """Readers (fast path, guards, trylocks) and writers (fast path, nested, trylock +
    downgrade) hammering one semaphore never overlap a writer with anyone."""
    request.getfixturevalue(mode)
    sem = RWSem("test.fp.stress")
    state = {"r": 0, "w": 0, "bad": 0}
    g = threading.Lock()
    errors = []

    def enter(write):
        with g:
            if write:
                state["w"] += 1
                state["bad"] += state["w"] != 1 or state["r"] != 0
            else:
                state["r"] += 1
                state["bad"] += state["w"] != 0

    def leave(write):
        with g:
            state["w" if write else "r"] -= 1

    def reader(k):
        for i in range(400):
            if i % 3 == 0:
                with sem.read_locked():
                    enter(False)
                    leave(False)
            elif i % 3 == 1 and sem.down_read_trylock():
                enter(False)
                leave(False)
                sem.up_read()
            else:
                sem.down_read()
                enter(False)
                leave(False)
                sem.up_read()

    def writer(k):
        for i in range(150):
            if i % 2:
                sem.down_write()
            else:
                sem.down_write_nested(0)
            enter(True)
            leave(True)
            sem.up_write()
            if sem.down_write_trylock():
                enter(True)
                leave(True)
                sem.downgrade_write()
                enter(False)
                leave(False)
                sem.up_read()

    def run(fn, k):
        try:
            fn(k)
        except BaseException as e:     # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=run, args=(reader, k)) for k in range(3)] + \
              [threading.Thread(target=run, args=(writer, k)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "hang"
    assert not errors, errors
    assert state["bad"] == 0
    assert not sem.is_locked() and sem._wwait == 0 and sem._rwait == 0 and sem._rholders == []


def test_unchecked_fast_path_is_cheap(unchecked):
    """The unchecked down_read+up_read pair stays well below the old slow path (a loose bound
    for a shared machine: the pair measured ~0.45 us, the old one ~0.7 us)."""
    sem = RWSem("test.fp.cost")
    n = 20000
    best = 1.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            sem.down_read()
            sem.up_read()
        best = min(best, (time.perf_counter() - t0) / n)
    assert best < 5e-6, best

"""ufs.vfs.locks + lockdep: recursion and ordering checks, trylock rules, downgrade, writer
preference, nesting subclasses, the hung-task watchdog, WorkQueue, and lock fast-path cost."""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from ufs.errors import DeadlockError, InvariantError
from ufs.vfs import Mutex, RWSem, WorkQueue, lockdep

HERE = os.path.basename(__file__)


@pytest.fixture
def checked():
    """Lockdep on, with a private dependency graph."""
    with lockdep.checking(True, fresh=True):
        yield


@pytest.fixture
def unchecked():
    with lockdep.checking(False):
        yield


def run_thread(fn, timeout=5.0):
    """Run fn in a thread; return its exception (or None); fail if it hangs."""
    box = {}

    def body():
        try:
            fn()
        except BaseException as e:     # noqa: BLE001
            box["exc"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "thread hung"
    return box.get("exc")


def site_lines(msg: str) -> list[int]:
    """Line numbers of this test file named in a lockdep message."""
    out = []
    for line in msg.splitlines():
        if HERE in line and "line " in line:
            out.append(int(line.split("line ")[1].split(",")[0]))
    return out


# --- recursion ----------------------------------------------------------------------------------

@pytest.mark.parametrize("first,second", [("read", "write"), ("read", "read"),
                                          ("write", "write"), ("write", "read")])
def test_lockdep_rwsem_recursion_fails_fast(checked, first, second):
    sem = RWSem("inode.i_rwsem")
    getattr(sem, f"down_{first}")()                 # the held site
    t0 = time.monotonic()
    with pytest.raises(DeadlockError) as ei:
        getattr(sem, f"down_{second}")()            # the re-acquire site
    assert time.monotonic() - t0 < 1.0
    assert ei.value.errno == errno.EDEADLK
    msg = str(ei.value)
    assert "inode.i_rwsem" in msg and "recursive locking" in msg
    assert f"({first})" in msg and f"({second})" in msg
    lines = site_lines(msg)
    assert len(set(lines)) >= 2, msg                # both acquisition sites are named
    getattr(sem, f"up_{first}")()
    assert not sem.is_locked()
    assert lockdep.held_locks() == []


def test_lockdep_mutex_recursion_and_same_class_instances(checked):
    m1, m2 = Mutex("test.mutex"), Mutex("test.mutex")
    with m1:
        with pytest.raises(DeadlockError, match="same lock"):
            m1.lock()
        # another lock of the same class without a subclass: the kernel reports it too
        with pytest.raises(DeadlockError, match="another lock of the same class"):
            m2.lock()
        m2.lock(subclass=1)
        m2.unlock()
        with pytest.raises(DeadlockError, match="same lock"):
            m1.lock(subclass=1)                 # a subclass does not make self-nesting legal
    assert not m1.is_locked() and not m2.is_locked()


def test_lockdep_seed_fsync_under_i_rwsem(checked):
    """The seed deadlock: completing an O_DSYNC write (whose fsync takes i_rwsem) under it."""
    i_rwsem = RWSem("inode.i_rwsem")

    def fsync():
        with i_rwsem.write_locked():
            pass

    with i_rwsem.read_locked():
        with pytest.raises(DeadlockError) as ei:
            fsync()
    assert "fsync" in str(ei.value)           # the re-acquire site is inside fsync
    fsync()                                   # fine once the caller dropped the lock


def test_lockdep_off_allows_shared_rereads(unchecked):
    sem = RWSem("test.plain")
    sem.down_read()
    sem.down_read()                           # no writer queued: succeeds without lockdep
    assert sem.readers == 2
    sem.up_read()
    sem.up_read()
    assert not sem.is_locked()


# --- ordering -----------------------------------------------------------------------------------

def test_lockdep_abba_across_threads_sequential(checked):
    a, b = Mutex("test.abba.A"), RWSem("test.abba.B")

    def a_then_b():
        with a:
            with b.write_locked():
                pass

    assert run_thread(a_then_b) is None
    with b.read_locked():
        with pytest.raises(DeadlockError) as ei:
            a.lock()
    msg = str(ei.value)
    assert "circular locking dependency" in msg
    assert "test.abba.A" in msg and "test.abba.B" in msg
    assert "a_then_b" in msg                  # the other thread's sites
    assert "test_lockdep_abba_across_threads_sequential" in msg   # ours
    assert not a.is_locked()


def test_lockdep_abba_real_race_reports_instead_of_hanging(checked):
    a, b = Mutex("test.race.A"), Mutex("test.race.B")
    both_hold_first = threading.Barrier(2, timeout=5)
    results = {}

    def worker(name, first, second):
        try:
            with first:
                both_hold_first.wait()
                # give the peer time to block on our lock when it comes first
                time.sleep(0.05 if name == "t2" else 0)
                with second:
                    pass
            results[name] = "ok"
        except DeadlockError as e:
            results[name] = e

    t1 = threading.Thread(target=worker, args=("t1", a, b), daemon=True)
    t2 = threading.Thread(target=worker, args=("t2", b, a), daemon=True)
    t1.start(), t2.start()
    t1.join(5), t2.join(5)
    assert not t1.is_alive() and not t2.is_alive(), "ABBA hung"
    errors = [v for v in results.values() if isinstance(v, DeadlockError)]
    assert len(errors) == 1 and "ok" in results.values(), results
    assert "worker" in str(errors[0]) and "circular" in str(errors[0])


def test_lockdep_transitive_cycle(checked):
    a, b, c = Mutex("test.tr.A"), Mutex("test.tr.B"), Mutex("test.tr.C")
    with a, b:
        pass
    with b, c:
        pass
    with c:
        with pytest.raises(DeadlockError) as ei:
            a.lock()
    msg = str(ei.value)
    assert "test.tr.A -> test.tr.B -> test.tr.C" in msg


def test_lockdep_nesting_subclasses(checked):
    parent, child = RWSem("test.nest.i_rwsem"), RWSem("test.nest.i_rwsem")
    with parent.write_locked():
        with child.write_locked(subclass=1):
            assert child.held_by_me() == lockdep.WRITE
    # reversed nesting roles are an inversion between the two subclasses
    with child.write_locked(subclass=1):
        with pytest.raises(DeadlockError, match="circular"):
            parent.down_write()
    assert lockdep.lock_class("test.nest.i_rwsem", 1).key == ("test.nest.i_rwsem", 1)


# --- trylocks -----------------------------------------------------------------------------------

def test_trylock_never_raises_and_adds_no_dependency(checked):
    a, b = RWSem("test.try.A"), RWSem("test.try.B")
    a.down_write()
    assert a.down_write_trylock() is False    # recursion: plain failure, no DeadlockError
    assert a.down_read_trylock() is False
    assert b.down_write_trylock() is True     # A held, B trylocked: no A->B edge
    b.up_write()
    a.up_write()
    with b.write_locked():
        a.down_write()                        # B->A is fine: nothing recorded A->B
        a.up_write()
    r = RWSem("test.try.R")
    r.down_read()
    assert r.down_read_trylock() is True      # shared trylock while holding shared
    r.up_read()
    r.up_read()


def test_trylocked_lock_still_orders_later_acquisitions(checked):
    a, b = Mutex("test.try2.A"), Mutex("test.try2.B")
    assert a.trylock()
    b.lock()                                  # records A->B
    b.unlock()
    a.unlock()
    with b:
        with pytest.raises(DeadlockError):
            a.lock()


# --- semantics: downgrade, writer preference, ownership -----------------------------------------

@pytest.mark.parametrize("mode", ["checked", "unchecked"])
def test_downgrade_write(mode, request):
    request.getfixturevalue(mode)
    sem = RWSem("test.downgrade")
    sem.down_write()
    sem.downgrade_write()
    assert not sem.is_write_locked() and sem.readers == 1
    assert run_thread(lambda: (sem.down_read(), sem.up_read())) is None   # readers share now
    got = threading.Event()

    def writer():
        sem.down_write()
        got.set()
        sem.up_write()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert not got.wait(0.1)                  # still excluded by our read hold
    sem.up_read()
    assert got.wait(2)
    t.join(2)
    with pytest.raises(InvariantError):
        sem.downgrade_write()                 # not write-held


def test_rwsem_writer_preference(unchecked):
    sem = RWSem("test.wpref")
    order = []
    sem.down_read()
    w = threading.Thread(target=lambda: (sem.down_write(), order.append("writer"), sem.up_write()),
                         daemon=True)
    w.start()
    deadline = time.monotonic() + 2
    while sem._wwait == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sem._wwait == 1
    assert sem.down_read_trylock() is False   # a queued writer blocks new readers
    r = threading.Thread(target=lambda: (sem.down_read(), order.append("reader"), sem.up_read()),
                         daemon=True)
    r.start()
    time.sleep(0.05)
    assert order == []
    sem.up_read()
    w.join(2), r.join(2)
    assert order == ["writer", "reader"]


def test_release_by_non_owner_is_a_bug(unchecked):
    sem, m = RWSem("test.owner"), Mutex("test.owner.m")
    sem.down_write()
    m.lock()
    exc = run_thread(sem.up_write)
    assert isinstance(exc, InvariantError)
    assert isinstance(run_thread(m.unlock), InvariantError)
    assert isinstance(run_thread(sem.up_read), InvariantError)
    sem.up_write()
    m.unlock()
    sem.down_read_non_owner()
    assert run_thread(sem.up_read_non_owner) is None
    assert not sem.is_locked()


def test_assert_held(unchecked):
    sem = RWSem("test.assert")
    with pytest.raises(InvariantError):
        sem.assert_held()
    with sem.read_locked():
        sem.assert_held()
        with pytest.raises(InvariantError):
            sem.assert_held(write=True)
    with sem.write_locked():
        sem.assert_held(write=True)


# --- watchdog -------------------------------------------------------------------------------------

def _hold_in_thread(acquire, release):
    held, done = threading.Event(), threading.Event()

    def holder_function():
        acquire()
        held.set()
        done.wait(10)
        release()
    t = threading.Thread(target=holder_function, daemon=True)
    t.start()
    assert held.wait(2)
    return t, done


def test_watchdog_panic_raises_with_holder_site(unchecked, caplog):
    sem = RWSem("test.hung")
    t, done = _hold_in_thread(sem.down_write, sem.up_write)
    try:
        with lockdep.hung_task(0.2, panic=True), caplog.at_level(logging.ERROR, "ufs.vfs.lockdep"):
            t0 = time.monotonic()
            with pytest.raises(DeadlockError) as ei:
                sem.down_read()
            waited = time.monotonic() - t0
        assert 0.15 <= waited < 2.0
        msg = str(ei.value)
        assert "test.hung" in msg and "blocked for more than" in msg
        assert "holder_function" in msg                     # where the holder took it
        assert "test_watchdog_panic_raises_with_holder_site" in msg   # the waiter's stack
        assert any("test.hung" in r.getMessage() for r in caplog.records)
        assert sem._wwait == 0 and sem.readers == 0
    finally:
        done.set()
        t.join(2)
    sem.down_write()                            # nothing left behind by the failed waiter
    sem.up_write()


def test_watchdog_reports_then_keeps_waiting(unchecked, caplog):
    m = Mutex("test.hung.mutex")
    t, done = _hold_in_thread(m.lock, m.unlock)
    reports = lockdep.watchdog.reports
    try:
        threading.Timer(0.4, done.set).start()
        with lockdep.hung_task(0.1, panic=False), caplog.at_level(logging.ERROR, "ufs.vfs.lockdep"):
            m.lock()                            # logged once, then acquired after release
        m.unlock()
    finally:
        done.set()
        t.join(2)
    assert lockdep.watchdog.reports == reports + 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "test.hung.mutex" in text and "holder_function" in text


def test_watchdog_per_lock_override(unchecked):
    sem = RWSem("test.hung.own", hung_task_timeout=0.1, hung_task_panic=True)
    t, done = _hold_in_thread(sem.down_read, sem.up_read)
    try:
        with pytest.raises(DeadlockError, match="test.hung.own"):
            sem.down_write()
    finally:
        done.set()
        t.join(2)


def test_lockdep_env_switch():
    code = ("from ufs.vfs import lockdep; from ufs.vfs.lockdep import watchdog as w;"
            "print(lockdep.enabled(), w.hung_task_timeout, w.hung_task_panic)")
    env = dict(os.environ, UFS_LOCKDEP="1", UFS_HUNG_TASK_TIMEOUT="7.5", UFS_HUNG_TASK_PANIC="1",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["True", "7.5", "True"], out.stderr


def test_lock_fast_path_cost(unchecked):
    """Uncontended acquire+release with lockdep off stays cheap (a loose bound, not a benchmark)."""
    sem, m = RWSem("test.cost"), Mutex("test.cost.m")
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        sem.down_read()
        sem.up_read()
    per_rw = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        m.lock()
        m.unlock()
    per_m = (time.perf_counter() - t0) / n
    assert per_rw < 20e-6 and per_m < 20e-6, (per_rw, per_m)


# --- WorkQueue ------------------------------------------------------------------------------------

def test_workqueue_flush_waits_for_queued_items():
    wq = WorkQueue("test.wq", max_active=2)
    done = []
    gate = threading.Event()
    try:
        wq.queue_work(lambda: (gate.wait(5), done.append(1)))
        wq.queue_work(done.append, 2)
        assert not wq.flush(timeout=0.1)        # item 1 blocked at the gate
        gate.set()
        assert wq.flush(timeout=5)
        assert sorted(done) == [1, 2]
        assert wq.completed == 2
    finally:
        gate.set()
        wq.destroy()
    assert all(not t.is_alive() for t in threading.enumerate() if t.name.startswith("test.wq/"))
    with pytest.raises(InvariantError):
        wq.queue_work(print)


def test_workqueue_errors_are_logged_and_kept(caplog):
    wq = WorkQueue("test.wq.err", max_active=1)
    after = []

    def boom():
        raise OSError(errno.EIO, "boom")
    with caplog.at_level(logging.ERROR, "ufs.vfs.workqueue"):
        wq.queue_work(boom)
        wq.queue_work(after.append, "next")
        assert wq.flush(5)
    wq.destroy()
    assert after == ["next"]                    # the queue survived the failure
    assert len(wq.errors) == 1 and wq.errors[0].errno == errno.EIO
    assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_workqueue_max_active_and_self_flush():
    wq = WorkQueue("test.wq.max", max_active=2)
    running = []
    peak = []
    lock = threading.Lock()
    release = threading.Event()

    def item():
        with lock:
            running.append(1)
            peak.append(len(running))
        release.wait(5)
        with lock:
            running.pop()
    for _ in range(5):
        wq.queue_work(item)
    time.sleep(0.1)
    release.set()
    assert wq.flush(5)
    assert max(peak) == 2
    errs = []
    wq.queue_work(lambda: errs.append(pytest.raises(DeadlockError, wq.flush)))
    assert wq.flush(5)
    assert len(errs) == 1 and errs[0].type is DeadlockError
    wq.destroy()


@pytest.mark.parametrize("mode", ["checked", "unchecked"])
def test_rwsem_exclusion_stress(mode, request):
    request.getfixturevalue(mode)
    sem = RWSem("test.stress")
    state = {"readers": 0, "writers": 0, "bad": 0, "writes": 0}
    guard = threading.Lock()

    def reader():
        for _ in range(300):
            with sem.read_locked():
                with guard:
                    state["readers"] += 1
                    state["bad"] += state["writers"] != 0
                with guard:
                    state["readers"] -= 1

    def writer():
        for _ in range(150):
            with sem.write_locked():
                with guard:
                    state["writers"] += 1
                    state["bad"] += state["writers"] != 1 or state["readers"] != 0
                    state["writes"] += 1
                with guard:
                    state["writers"] -= 1
            if sem.down_write_trylock():
                sem.downgrade_write()
                with guard:
                    state["bad"] += state["writers"] != 0
                sem.up_read()

    threads = [threading.Thread(target=reader) for _ in range(3)] + \
              [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "hang"
    assert state["bad"] == 0 and state["writes"] == 300
    assert not sem.is_locked() and sem._wwait == 0


def test_held_locks_stack(checked):
    a, b = Mutex("test.held.A"), RWSem("test.held.B")
    a.lock()
    b.down_read()
    held = lockdep.held_locks()
    assert [(str(h.cls), h.mode) for h in held] == [("test.held.A", lockdep.WRITE),
                                                   ("test.held.B", lockdep.READ)]
    assert "test_held_locks_stack" in lockdep.format_site(held[0].site)
    a.unlock()                                    # out of order release
    assert [str(h.cls) for h in lockdep.held_locks()] == ["test.held.B"]
    b.up_read()
    assert lockdep.held_locks() == []

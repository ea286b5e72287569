"""The inode DIO counter: begin/end are a counter under a plain lock and touch the Condition
only when someone sleeps in inode_dio_wait; waits wake exactly at zero, across threads, with
no lost wake-up when the last end races a new waiter."""
from __future__ import annotations

import random
import threading
import time

import pytest

from ufs.errors import InvariantError
from ufs.vfs import Inode, Superblock


@pytest.fixture
def inode():
    sb = Superblock(None, 4096)
    yield Inode(sb, 7)
    sb.shutdown()


class _TrapCondition:
    """Stands in for the inode's Condition: any use without a waiter is a failure."""

    def __init__(self, real):
        self.real = real
        self.notifies = 0

    def notify_all(self):
        self.notifies += 1
        self.real.notify_all()

    def __enter__(self):
        return self.real.__enter__()

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_begin_end_without_waiters_never_notify(inode):
    trap = _TrapCondition(inode._dio_cv)
    inode._dio_cv = trap
    for _ in range(100):
        inode.inode_dio_begin()
        inode.inode_dio_begin()
        inode.inode_dio_end()
        inode.inode_dio_end()
    assert inode.i_dio_count == 0 and trap.notifies == 0
    assert inode._dio_waiters == 0


def test_end_notifies_only_at_zero_and_only_with_a_waiter(inode):
    inode.inode_dio_begin()
    inode.inode_dio_begin()
    inode.inode_dio_begin()
    trap = _TrapCondition(inode._dio_cv)
    inode._dio_cv = trap
    woke = threading.Event()
    t = threading.Thread(target=lambda: (inode.inode_dio_wait(), woke.set()), daemon=True)
    t.start()
    deadline = time.monotonic() + 2
    while inode._dio_waiters == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert inode._dio_waiters == 1
    inode.inode_dio_end()
    inode.inode_dio_end()
    assert trap.notifies == 0 and not woke.wait(0.1)     # two in flight -> one
    inode.inode_dio_end()
    assert woke.wait(2) and trap.notifies == 1
    t.join(2)
    assert inode._dio_waiters == 0 and inode.i_dio_count == 0


def test_many_waiters_all_wake_at_zero_from_another_thread(inode):
    for _ in range(4):
        inode.inode_dio_begin()
    woke = []
    lock = threading.Lock()

    def waiter():
        assert inode.inode_dio_wait(5)
        with lock:
            woke.append(inode.i_dio_count)
    ws = [threading.Thread(target=waiter, daemon=True) for _ in range(5)]
    for w in ws:
        w.start()
    deadline = time.monotonic() + 2
    while inode._dio_waiters < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert inode._dio_waiters == 5
    # completions arrive on other threads, as the completion workqueue does
    enders = [threading.Thread(target=inode.inode_dio_end) for _ in range(4)]
    for e in enders[:3]:
        e.start()
        e.join(2)
    time.sleep(0.05)
    assert woke == []                                    # one still in flight
    enders[3].start()
    enders[3].join(2)
    for w in ws:
        w.join(3)
    assert woke == [0] * 5 and inode._dio_waiters == 0


def test_wait_timeout_and_immediate_return(inode):
    assert inode.inode_dio_wait(timeout=0) is True       # nothing in flight: no sleep
    assert inode._dio_waiters == 0
    inode.inode_dio_begin()
    t0 = time.monotonic()
    assert inode.inode_dio_wait(timeout=0.05) is False
    assert time.monotonic() - t0 >= 0.04
    assert inode._dio_waiters == 0                       # a timed-out waiter deregisters
    inode.inode_dio_end()
    assert inode.inode_dio_wait(timeout=0) is True


def test_unbalanced_end_raises_and_keeps_the_count(inode):
    with pytest.raises(InvariantError):
        inode.inode_dio_end()
    assert inode.i_dio_count == 0
    inode.inode_dio_begin()
    inode.inode_dio_end()                                # the lock was not left held
    assert inode.i_dio_count == 0


def test_no_lost_wakeup_when_the_last_end_races_a_new_waiter(inode):
    """The last inode_dio_end and a new inode_dio_wait on two threads, many times with
    jittered timing: the waiter always returns (the count reached zero) and never early."""
    rnd = random.Random(4)
    for _ in range(300):
        inode.inode_dio_begin()
        delay = rnd.random() * 2e-4
        early = []

        def ender(delay=delay):
            time.sleep(delay)
            inode.inode_dio_end()

        def waiter(early=early):
            ok = inode.inode_dio_wait(5)
            early.append((ok, inode.i_dio_count))
        te, tw = threading.Thread(target=ender), threading.Thread(target=waiter)
        if rnd.random() < 0.5:
            te.start()
            tw.start()
        else:
            tw.start()
            te.start()
        te.join(5)
        tw.join(5)
        assert not tw.is_alive(), "lost wake-up"
        assert early == [(True, 0)]
    assert inode._dio_waiters == 0


def test_concurrent_begin_end_keep_an_exact_count(inode):
    def worker():
        for _ in range(3000):
            inode.inode_dio_begin()
            inode.inode_dio_end()
    inode.inode_dio_begin()                  # keep one in flight while they run
    ts = [threading.Thread(target=worker) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert inode.i_dio_count == 1
    inode.inode_dio_end()
    assert inode.i_dio_count == 0 and inode.inode_dio_wait(0)

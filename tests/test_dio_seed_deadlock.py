"""The seed patch, reproduced: completing an O_DIRECT|O_DSYNC write under i_rwsem deadlocks a
filesystem whose fsync takes i_rwsem (btrfs), and the split API (dio_start, unlock,
dio_complete) fixes it (reference/seed-iomap-dio-complete-split.patch, sem §4.1).

With lockdep on, the deadlock is a ``DeadlockError`` (EDEADLK) raised at once, naming
``inode.i_rwsem``.  Run against both engines (Cython and the reference).  Also the ORDER fix
(sem §3.8 step 4): inode_dio_end runs before generic_write_sync, so a lock holder waiting in
inode_dio_wait (fallocate/truncate) cannot deadlock with a completing O_DSYNC write.
"""
from __future__ import annotations

import errno
import threading
import time

import pytest

from ufs.errors import DeadlockError
from ufs.iomap import EIOCBQUEUED, Iocb, Kiocb, MapType, RamDev
from ufs.testing import reference
from ufs.testing.layoutfs import make_layout_file
from ufs.vfs import lockdep

cydio = pytest.importorskip("ufs.iomap.dio", reason="the Cython DIO engine is not built")

ENGINES = [pytest.param(cydio, id="cython"), pytest.param(reference, id="reference")]
DSYNC_WRITE = int(Iocb.DIRECT | Iocb.WRITE | Iocb.DSYNC)
BS = 4096
PAYLOAD = bytes((i * 5 + 1) % 251 for i in range(2 * BS))


@pytest.fixture(autouse=True)
def _lockdep_on():
    with lockdep.checking(True, fresh=True):
        yield


def _file(fsync_takes_i_rwsem, **kw):
    # fua=False: an O_DSYNC write always needs the flush (no FUA shortcut to hide the sync).
    dev = RamDev(1 << 20, 512, fua=False, volatile_cache=True)
    f, ops, dops = make_layout_file(dev, [(0, 16 * BS, MapType.MAPPED, 0, 0)], 16 * BS,
                                    fsync_takes_i_rwsem=fsync_takes_i_rwsem, **kw)
    return dev, f, ops, dops


def _durable(dev, f, pos, n):
    """The file bytes [pos, pos+n) as a power cut right now would leave them."""
    ext = f.layout.extents[0]
    img = dev.durable()
    return img[ext.addr + pos - ext.offset:ext.addr + pos - ext.offset + n]


@pytest.mark.parametrize("eng", ENGINES)
def test_combined_path_under_i_rwsem_is_edeadlk(eng):
    """(a) btrfs-like fsync + dio_rw under i_rwsem + O_DSYNC: EDEADLK at once, naming i_rwsem."""
    dev, f, ops, dops = _file(True)
    inode = f.f_inode
    inode.i_rwsem.down_write()
    t0 = time.monotonic()
    try:
        with pytest.raises(DeadlockError) as ei:
            eng.dio_rw(Kiocb(f, BS, DSYNC_WRITE), PAYLOAD, ops, dops)
        elapsed = time.monotonic() - t0
    finally:
        inode.i_rwsem.up_write()
    assert elapsed < 2.0
    assert ei.value.errno == errno.EDEADLK
    assert "inode.i_rwsem" in str(ei.value)
    # fsync was entered (that is where it deadlocks), after the dio left the in-flight count.
    assert f.f_op.calls == 1
    assert f.f_op.log[0][4] == 0
    assert inode.i_dio_count == 0


@pytest.mark.parametrize("eng", ENGINES)
def test_split_path_unlocks_before_complete(eng):
    """(b)/(c) the seed's fix: dio_start under i_rwsem, unlock, dio_complete: fsync runs, data
    durable."""
    dev, f, ops, dops = _file(True)
    inode = f.f_inode
    k = Kiocb(f, BS, DSYNC_WRITE)
    inode.i_rwsem.down_write()
    try:
        dio = eng.dio_start(k, PAYLOAD, ops, dops)
    finally:
        inode.i_rwsem.up_write()
    assert dio is not None and dio != EIOCBQUEUED
    assert _durable(dev, f, BS, len(PAYLOAD)) != PAYLOAD     # not yet synced
    assert f.f_op.calls == 0
    assert eng.dio_complete(dio) == len(PAYLOAD)
    assert f.f_op.calls == 1
    assert f.f_op.log[0][1:3] == (BS, BS + len(PAYLOAD))
    assert k.ki_pos == BS + len(PAYLOAD)
    assert _durable(dev, f, BS, len(PAYLOAD)) == PAYLOAD
    assert inode.i_dio_count == 0


@pytest.mark.parametrize("eng", ENGINES)
def test_xfs_like_fsync_allows_combined_path(eng):
    """(d) fsync without i_rwsem (xfs): the combined call under i_rwsem is fine."""
    dev, f, ops, dops = _file(False)
    inode = f.f_inode
    inode.i_rwsem.down_write()
    try:
        n = eng.dio_rw(Kiocb(f, 0, DSYNC_WRITE), PAYLOAD, ops, dops)
    finally:
        inode.i_rwsem.up_write()
    assert n == len(PAYLOAD)
    assert f.f_op.calls == 1
    assert _durable(dev, f, 0, len(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize("eng", ENGINES)
def test_fua_write_needs_no_fsync_even_under_i_rwsem(eng):
    """O_DSYNC overwrite on a FUA device: every bio FUA, NEED_SYNC dropped (sem §3.5 step 8),
    so even the btrfs-like combined path cannot reach fsync."""
    dev = RamDev(1 << 20, 512, fua=True, volatile_cache=True)
    f, ops, dops = make_layout_file(dev, [(0, 16 * BS, MapType.MAPPED, 0, 0)], 16 * BS,
                                    fsync_takes_i_rwsem=True)
    f.f_inode.i_rwsem.down_write()
    try:
        n = eng.dio_rw(Kiocb(f, 0, DSYNC_WRITE), PAYLOAD, ops, dops)
    finally:
        f.f_inode.i_rwsem.up_write()
    assert n == len(PAYLOAD)
    assert f.f_op.calls == 0
    assert _durable(dev, f, 0, len(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize("eng", ENGINES)
def test_order_dio_end_before_sync_no_deadlock(eng):
    """(e) A thread holding i_rwsem waits in inode_dio_wait (like fallocate) while an async
    O_DSYNC write completes and its fsync needs i_rwsem.  inode_dio_end comes before
    generic_write_sync, so the waiter wakes, drops the lock, and fsync proceeds."""
    in_flight = threading.Event()
    waiter_ready = threading.Event()
    events = []
    ev_lock = threading.Lock()

    def note(what):
        with ev_lock:
            events.append((what, time.monotonic()))

    def on_begin(inode, pos, length, flags):
        # The dio is counted in i_dio_count now; let the lock holder start waiting on it.
        if not in_flight.is_set():
            in_flight.set()
            waiter_ready.wait(5)
            time.sleep(0.05)      # let it block inside inode_dio_wait

    dev, f, ops, dops = _file(True, on_begin=on_begin)
    inode = f.f_inode
    done = threading.Event()
    results = []

    def complete(iocb, res):
        note("ki_complete")
        results.append(res)
        done.set()

    holder_err = []

    def lock_holder():
        try:
            in_flight.wait(5)
            inode.i_rwsem.down_write()
            note("holder_locked")
            try:
                waiter_ready.set()
                ok = inode.inode_dio_wait(timeout=10)
                note("holder_dio_wait_done" if ok else "holder_dio_wait_TIMEOUT")
            finally:
                inode.i_rwsem.up_write()
                note("holder_unlocked")
        except BaseException as e:  # pragma: no cover - reported below
            holder_err.append(e)

    holder = threading.Thread(target=lock_holder, name="fallocate")
    holder.start()

    def submitter():
        k = Kiocb(f, 0, DSYNC_WRITE, complete)
        r = eng.dio_rw(k, PAYLOAD, ops, dops)
        note(f"dio_rw_returned {r}")
        if r != EIOCBQUEUED:
            results.append(r)
            done.set()

    sub = threading.Thread(target=submitter, name="aio-submit")
    sub.start()
    try:
        assert done.wait(15), f"O_DSYNC completion deadlocked: {events}"
        holder.join(15)
        sub.join(15)
        assert not holder.is_alive() and not sub.is_alive(), events
    finally:
        waiter_ready.set()
    assert not holder_err, holder_err
    assert results == [len(PAYLOAD)]
    names = [e[0] for e in events]
    assert "holder_dio_wait_done" in names, events
    # The scenario really happened: the completion's fsync had to wait for the lock holder,
    # which itself was waiting for the dio to leave i_dio_count.
    assert names.index("holder_locked") < names.index("holder_dio_wait_done") \
        < names.index("holder_unlocked") < names.index("ki_complete" if "ki_complete" in names
                                                        else [n for n in names
                                                              if n.startswith("dio_rw")][0]), events
    # fsync saw the dio already out of the in-flight count, and ran after the waiter let go.
    assert f.f_op.calls == 1
    assert f.f_op.log[0][4] == 0
    assert _durable(dev, f, 0, len(PAYLOAD)) == PAYLOAD
    if inode.i_sb.has_dio_done_wq:
        inode.i_sb.shutdown()


def test_reference_trace_orders_dio_end_before_sync():
    """The recorded order of the reference engine's completion (sem §3.8)."""
    dev, f, ops, dops = _file(False)
    trace = []
    reference.dio_rw(Kiocb(f, 0, DSYNC_WRITE), PAYLOAD, ops, dops, trace=trace)
    steps = [t[0] for t in trace]
    order = ["end_io", "invalidate_after", "inode_dio_end", "ki_pos", "sync", "complete"]
    assert all(s in steps for s in order), steps
    assert [steps.index(s) for s in order] == sorted(steps.index(s) for s in order)

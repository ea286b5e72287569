"""The differential check (Cython engine vs reference engine vs model) on real O_DIRECT devices.

- an image file opened with O_DIRECT through ``open_device``, for the io_uring and the thread
  backends (skipped, with the reason, where the filesystem refuses O_DIRECT);
- as root, a loop device with direct I/O on, at logical block sizes 4096 and 512, so the
  block-device paths (BLKSSZGET/BLKGETSIZE64, alignment, FUA/flush) run under the engine.

Each engine gets its own device, pre-filled with garbage, and a layoutfs file of the same
layout.  Async operations of the Cython engine go through a reaper queue, so bios really
complete on another thread and ``EIOCBQUEUED`` is exercised.
"""
from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ufs.iomap import open_device
from ufs.testing import reference
from ufs.testing.rig import GARBAGE, Rig, run_differential
from ufs.testing.strategies import Geometry, layouts, op_sequences

def _ex(n: int) -> int:
    """Example counts scale with UFS_DIO_EXAMPLES_SCALE (e.g. 20 for a bug-hunting run)."""
    return max(1, int(n * float(os.environ.get("UFS_DIO_EXAMPLES_SCALE", "1"))))


cydio = pytest.importorskip("ufs.iomap.dio", reason="the Cython DIO engine is not built")

IMAGE_SIZE = 2 << 20
SETTINGS = settings(max_examples=_ex(12), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def _odirect_dir():
    """A writable directory whose filesystem accepts O_DIRECT, or (None, reason)."""
    reasons = []
    for d in (os.environ.get("UFS_TEST_IMAGE_DIR"), "/work", tempfile.gettempdir()):
        if not d or not os.path.isdir(d) or not os.access(d, os.W_OK):
            continue
        p = os.path.join(d, f".ufs-odirect-probe-{os.getpid()}")
        try:
            fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
            try:
                buf = mmap.mmap(-1, 4096)
                os.pwrite(fd, buf, 0)
                return d, None
            finally:
                os.close(fd)
        except OSError as e:
            reasons.append(f"{d}: {e}")
        finally:
            try:
                os.unlink(p)
            except OSError:
                pass
    return None, "no directory accepts O_DIRECT (" + "; ".join(reasons) + ")"


def _fill(dev):
    dev.pwrite(bytes([GARBAGE]) * int(dev.size), 0)
    dev.flush()


class _Devs:
    """One device per engine, re-filled with garbage for every example."""

    def __init__(self, devs):
        self.devs = devs
        self.queues = {}

    def rigs(self, case):
        rigs = []
        for (name, eng), dev in zip((("cython", cydio), ("reference", reference)), self.devs):
            _fill(dev)
            q = None
            if eng is cydio:
                q = self.queues.get(name)
                if q is None:
                    q = self.queues[name] = dev.new_queue(128, True)
            rigs.append(Rig(eng, dev, case, name=f"{name}/{dev.backend}", queue=q))
        return rigs


QUEUED = {}


def _check_case(devs, case, data):
    seq = data.draw(op_sequences(case.geometry, case.span, max_size=6))
    rigs = devs.rigs(case)
    run_differential(rigs, seq)
    for r in rigs:
        QUEUED[r.name] = QUEUED.get(r.name, 0) + r.queued


# ---------------------------------------------------------------------------- image files

@pytest.fixture(scope="module", params=["io_uring", "threads"])
def image_devs(request):
    d, why = _odirect_dir()
    if d is None:
        pytest.skip(why)
    paths, devs = [], []
    try:
        for _i in range(2):
            fd, p = tempfile.mkstemp(prefix="ufs-dio-diff-", suffix=".img", dir=d)
            os.close(fd)
            paths.append(p)
            os.truncate(p, IMAGE_SIZE)
            try:
                devs.append(open_device(p, backend=request.param))
            except OSError as e:
                pytest.skip(f"{request.param} backend unavailable: {e}")
        if devs[0].backend != request.param:
            pytest.skip(f"asked for {request.param}, got {devs[0].backend}")
        yield _Devs(devs)
    finally:
        for dev in devs:
            dev.close()
        for p in paths:
            os.unlink(p)


@SETTINGS
@given(data=st.data())
def test_differential_on_image(image_devs, data):
    lbs = int(image_devs.devs[0].logical_block_size)
    bs = data.draw(st.sampled_from([b for b in (512, 4096) if b >= lbs]))
    case = data.draw(layouts(Geometry(bs, lbs), max_blocks=10))
    if case.dev_size > IMAGE_SIZE:
        case.dev_size = IMAGE_SIZE
    _check_case(image_devs, case, data)


def test_many_async_in_flight_on_image(image_devs):
    """16 async writes (overwrites, hole fills, O_DSYNC mixed) in flight at once, then 16
    async reads: every op completes exactly once (Rig.finish checks it), with the same results
    as synchronous runs and on both engines; the bytes read are the bytes written."""
    from ufs.iomap import MapType
    from ufs.testing.model import Op
    from ufs.testing.strategies import LayoutCase

    bs = 4096
    lbs = int(image_devs.devs[0].logical_block_size)
    case = LayoutCase(Geometry(bs, lbs), [(0, 8 * bs, MapType.MAPPED, 0, 0),
                                          (16 * bs, 8 * bs, MapType.UNWRITTEN, 0, 8 * bs)],
                      24 * bs, bytes((i % 250) + 1 for i in range(24 * bs)), IMAGE_SIZE, 16 * bs)
    writes = [Op("write", b * bs, bs, is_async=True, dsync=bool(b % 3 == 0), fill=b)
              for b in range(0, 32, 2)]
    reads = [Op("read", b * bs, bs, is_async=True) for b in range(0, 32, 2)]
    summary = []
    for rig in image_devs.rigs(case):
        hs = [rig.start(op) for op in writes]
        w = [rig.finish(h)[0] for h in hs]
        assert w == [("ok", bs)] * len(writes), (rig.name, w)
        hs = [rig.start(op) for op in reads]
        r = [rig.finish(h) for h in hs]
        for _op, wop, (res, data, _) in zip(reads, writes, r):
            assert res == ("ok", bs) and data == wop.data().replace(b"\xaa", b"\xab"), rig.name
        summary.append((w, [x[0] for x in r], rig.inode.i_size, rig.inode.i_dio_count))
        QUEUED[rig.name] = QUEUED.get(rig.name, 0) + rig.queued
        rig.close()
    assert summary[0] == summary[1]
    assert summary[0][2] == 31 * bs and summary[0][3] == 0


# ---------------------------------------------------------------------------- loop devices

def _loop_unavailable():
    if os.geteuid() != 0:
        return "needs root for losetup"
    if shutil.which("losetup") is None:
        return "losetup not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop driver not available)"
    return None


@pytest.fixture(scope="module", params=[4096, 512], ids=["sector4096", "sector512"])
def loop_devs(request):
    why = _loop_unavailable()
    if why:
        pytest.skip(why)
    d, why = _odirect_dir()
    if d is None:
        pytest.skip(why)
    sector = request.param
    paths, loops, devs = [], [], []
    try:
        for _i in range(2):
            fd, p = tempfile.mkstemp(prefix="ufs-dio-loop-", suffix=".img", dir=d)
            os.close(fd)
            paths.append(p)
            os.truncate(p, IMAGE_SIZE)
            r = subprocess.run(["losetup", "--find", "--show", "--direct-io=on",
                                "--sector-size", str(sector), p],
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                pytest.skip(f"losetup failed: {r.stderr.strip()}")
            loops.append(r.stdout.strip())
        for lp in loops:
            devs.append(open_device(lp))
        assert all(int(dev.logical_block_size) == sector for dev in devs), \
            [int(dev.logical_block_size) for dev in devs]
        assert all(dev.is_blockdev for dev in devs)
        yield _Devs(devs)
    finally:
        for dev in devs:
            dev.close()
        for lp in loops:
            subprocess.run(["losetup", "-d", lp], capture_output=True, timeout=30)
        for p in paths:
            os.unlink(p)


@SETTINGS
@given(data=st.data())
def test_differential_on_loop_device(loop_devs, data):
    lbs = int(loop_devs.devs[0].logical_block_size)
    bs = data.draw(st.sampled_from([b for b in (512, 4096) if b >= lbs]))
    case = data.draw(layouts(Geometry(bs, lbs), max_blocks=10))
    if case.dev_size > IMAGE_SIZE:
        case.dev_size = IMAGE_SIZE
    _check_case(loop_devs, case, data)


def test_async_really_queued_on_real_devices():
    """After the differential runs above: on a real device the Cython engine did return
    EIOCBQUEUED for async ops (bios completed on the reaper thread), and so did the
    reference (deferred bio ends)."""
    if not QUEUED:
        pytest.skip("no device test ran in this session")
    cy = {k: v for k, v in QUEUED.items() if k.startswith("cython/")}
    ref = {k: v for k, v in QUEUED.items() if k.startswith("reference/")}
    print("EIOCBQUEUED counts:", QUEUED)
    assert any(cy.values()), QUEUED
    assert any(ref.values()), QUEUED

"""The native FUSE engine (``-o fuse_native``) and its C O_DIRECT read fast path.

Every byte the fast path serves is compared with the library's own ``pread`` of the same
image (taken before the mount: the image is locked while mounted) at random offsets over
data, holes, unwritten extents and the unaligned EOF; then with writes, truncates and
overwrites racing the readers through the mount; misaligned O_DIRECT still gives the
library's EINVAL; btrfslike (data checksums) is never served by the fast path.  The daemon's
log reports the read-path counters at unmount, which shows which path served the reads.

Needs root, /dev/fuse and the built ``ufs.fuse._lowlevel`` (skips with the reason otherwise).
Every mount is unmounted in ``finally`` (killed and aborted if it misbehaves).
"""
from __future__ import annotations

import ast
import errno
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BS = 4096


def _skip_reason():
    if os.geteuid() != 0:
        return "needs root"
    from ufs.fuse.mount import fuse_available, native_available
    return fuse_available() or native_available()


_WHY = _skip_reason()
needs_native = pytest.mark.skipif(_WHY is not None, reason=f"native FUSE unavailable: {_WHY}")


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["UFS_STATE_DIR"] = str(tmp_path / "state")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("UFS_FUSE_ENGINE", None)
    old = os.environ.get("UFS_STATE_DIR")
    os.environ["UFS_STATE_DIR"] = e["UFS_STATE_DIR"]
    yield e
    if old is None:
        os.environ.pop("UFS_STATE_DIR", None)
    else:
        os.environ["UFS_STATE_DIR"] = old


def ufs(env, *args, check=True, timeout=60):
    r = subprocess.run([sys.executable, "-m", "ufs", *map(str, args)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"ufs {' '.join(map(str, args))} -> {r.returncode}\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


class NativeMount:
    """``ufs mount-image -o fuse_native`` in a context; ``stats`` (the daemon's read-path
    counters, from its log) after exit."""

    def __init__(self, env, image, mp, extra=""):
        self.env, self.image, self.mp = env, image, mp
        self.options = "fuse_native" + ("," + extra if extra else "")
        self.stats = None
        self.mode = None        # the fast path's mode the daemon logged: sync/async/off

    def __enter__(self):
        self.mp.mkdir(exist_ok=True)
        try:
            ufs(self.env, "mount-image", "-o", self.options, self.image, self.mp)
        except BaseException:
            self._force()
            raise
        return self.mp

    def _log(self):
        from ufs.fuse.mount import default_log_path
        return default_log_path(str(self.mp))

    def _force(self):
        from ufs.fuse.mount import find_mount, state_path
        try:
            import json
            with open(state_path(str(self.mp))) as f:
                os.kill(json.load(f)["pid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
        info = find_mount(str(self.mp))
        if info is not None:
            abort = Path(f"/sys/fs/fuse/connections/{info['conn']}/abort")
            try:
                abort.write_text("1")
            except OSError:
                pass
            subprocess.run(["umount", "-l", str(self.mp)], capture_output=True)

    def __exit__(self, *exc):
        try:
            ufs(self.env, "umount", self.mp)
        except BaseException:
            self._force()
            raise
        with open(self._log()) as f:
            for line in f:
                if "with the native engine (fast path " in line:
                    self.mode = line.split("(fast path ", 1)[1].split(")")[0]
                if "native engine: {" in line:
                    self.stats = ast.literal_eval(line[line.index("{"):].strip())
        return False


def aligned(n):
    return mmap.mmap(-1, max(n, BS))


def odirect_pread(path, length, offset):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = aligned(length)
        got = os.preadv(fd, [memoryview(buf)[:length]], offset)
        return bytes(buf[:got])
    finally:
        os.close(fd)


# --- the image the comparisons run on ----------------------------------------------------------

SIZE = 3 * (1 << 20) + 1234          # ends inside a block

def _make_image(img, fstype="xfslike"):
    """A file with data, holes and unwritten (fallocated, never written) ranges; returns the
    library's view of it as bytes."""
    from ufs import api
    api.mkfs(img, fstype, size="128M")
    fs = api.mount(img)
    try:
        fd = fs.open("/f", os.O_RDWR | os.O_CREAT, 0o644)
        rnd = random.Random(7)
        fs.ftruncate(fd, SIZE)
        for start, n in ((0, 64 << 10), (300 << 10, 8 << 10), (1 << 20, 200 << 10),
                         (SIZE - 5000, 5000)):
            fs.pwrite(fd, rnd.randbytes(n), start)
        try:
            fs.fallocate(fd, 0, 2 << 20, 256 << 10)          # unwritten extents
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
        fs.fsync(fd)
        if fstype == "xfslike":
            # the fixture really has the three kinds of range the fast path must tell apart
            from ufs.iomap import IoMap, IterFlag, MapType
            inode = fs.fdtable.get(fd).f_inode
            kinds = set()
            for pos in (0, 500 << 10, 2 << 20):
                m = IoMap()
                inode.i_fop.iomap_ops.iomap_begin(inode, pos, BS, IterFlag.DIRECT, m, IoMap())
                kinds.add(m.type)
            assert kinds == {MapType.MAPPED, MapType.HOLE, MapType.UNWRITTEN}, kinds
        want = fs.pread(fd, SIZE + BS, 0)
        fs.close(fd)
    finally:
        fs.unmount()
    assert len(want) == SIZE
    return want


def _offsets(rnd, n):
    out = [(0, BS), (SIZE // BS * BS, BS), (SIZE // BS * BS - BS, 2 * BS),
           (SIZE // BS * BS + BS, BS), ((2 << 20), 64 << 10), ((300 << 10) - BS, 3 * BS)]
    for _ in range(n):
        blk = rnd.randrange(0, SIZE // BS + 2)
        out.append((blk * BS, rnd.choice((1, 1, 2, 4, 16, 33)) * BS))
    return out


@pytest.fixture(params=["sync", "async"])
def io_mode(request, env):
    """The two ways the fast path reads the device: pread in the FUSE worker, or an io_uring
    reaper queue answering from its own thread ($UFS_FUSE_FAST_ASYNC=1)."""
    env["UFS_FUSE_FAST_ASYNC"] = "1" if request.param == "async" else "0"
    return request.param


@needs_native
def test_fast_path_matches_library_pread(env, io_mode, tmp_path):
    img = tmp_path / "x.img"
    want = _make_image(img)
    rnd = random.Random(11)
    m = NativeMount(env, img, tmp_path / "mnt")
    with m as mp:
        f = str(mp / "f")
        assert os.stat(f).st_size == SIZE
        for off, n in _offsets(rnd, 20):
            assert odirect_pread(f, n, off) == want[off:off + n], (off, n)
        # one descriptor: its extent cache is filled once per extent, then only hit
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = aligned(64 * BS)
            for off, n in _offsets(rnd, 300):
                got = os.preadv(fd, [memoryview(buf)[:n]], off)
                assert buf[:got] == want[off:off + n], (off, n)
        finally:
            os.close(fd)
        # buffered (page-cache) reads of the same file take the Python path and agree
        with open(f, "rb") as fh:
            assert fh.read() == want
    # the reads above were served by the C path (misses = map fetches, one per extent)
    assert m.mode == io_mode
    assert m.stats["fast_reads"] >= 320
    assert m.stats["fast_misses"] < 20 + 40


@needs_native
def test_misaligned_odirect_read_is_einval(env, tmp_path):
    img = tmp_path / "x.img"
    _make_image(img)
    with NativeMount(env, img, tmp_path / "mnt") as mp:
        fd = os.open(mp / "f", os.O_RDONLY | os.O_DIRECT)
        try:
            buf = aligned(BS)
            with pytest.raises(OSError) as ei:
                os.preadv(fd, [buf], 100)
            assert ei.value.errno == errno.EINVAL
            assert os.preadv(fd, [buf], (SIZE // BS + 10) * BS) == 0      # past EOF: nothing
        finally:
            os.close(fd)


@needs_native
def test_writes_truncates_and_races_are_seen(env, io_mode, tmp_path):
    img = tmp_path / "x.img"
    want = bytearray(_make_image(img))
    m = NativeMount(env, img, tmp_path / "mnt")
    with m as mp:
        f = str(mp / "f")
        # prime the extent cache, then change the file under it through the mount
        assert odirect_pread(f, 64 << 10, 0) == want[:64 << 10]
        assert odirect_pread(f, 16 * BS, 2 << 20) == want[2 << 20:(2 << 20) + 16 * BS]
        wfd = os.open(f, os.O_WRONLY | os.O_DIRECT)
        try:
            for off in (0, 2 << 20, 500 << 10):             # data, unwritten, hole
                data = bytes([off % 251 + 1]) * (4 * BS)
                buf = aligned(len(data))
                buf[:len(data)] = data
                assert os.pwritev(wfd, [buf], off) == len(data)
                want[off:off + len(data)] = data
                assert odirect_pread(f, 8 * BS, off - (off and BS)) == \
                    bytes(want[off - (off and BS):off - (off and BS) + 8 * BS])
        finally:
            os.close(wfd)

        # concurrent: writers flip whole blocks between two versions while readers read
        # them; every block a reader sees is one of the versions, and after the writers
        # stop every block is the last version written
        region = 1 << 20
        blocks = 32
        versions = {b: [bytes([b + 1]) * BS, bytes([200 - b]) * BS] for b in range(blocks)}
        last = {}
        stop = threading.Event()
        errors = []

        def writer():
            wfd = os.open(f, os.O_WRONLY | os.O_DIRECT)
            buf = aligned(BS)
            r = random.Random(3)
            try:
                for i in range(300):
                    b = r.randrange(blocks)
                    v = versions[b][i % 2]
                    buf[:BS] = v
                    os.pwritev(wfd, [buf], region + b * BS)
                    last[b] = v
            except BaseException as e:      # pragma: no cover - reported below
                errors.append(e)
            finally:
                os.close(wfd)
                stop.set()

        def reader():
            rfd = os.open(f, os.O_RDONLY | os.O_DIRECT)
            buf = aligned(BS)
            r = random.Random(threading.get_ident())
            try:
                while not stop.is_set():
                    b = r.randrange(blocks)
                    os.preadv(rfd, [buf], region + b * BS)
                    got = bytes(buf[:BS])
                    original = bytes(want[region + b * BS:region + (b + 1) * BS])
                    if got not in (versions[b][0], versions[b][1], original):
                        errors.append(AssertionError(f"block {b}: unexpected bytes"))
                        return
            except BaseException as e:      # pragma: no cover - reported below
                errors.append(e)
            finally:
                os.close(rfd)

        threads = [threading.Thread(target=writer)] + \
            [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for b, v in last.items():
            want[region + b * BS:region + (b + 1) * BS] = v
        assert odirect_pread(f, blocks * BS, region) == bytes(want[region:region + blocks * BS])

        # truncate down: the cached size and extents must go
        os.truncate(f, 10000)
        assert odirect_pread(f, 4 * BS, 0) == bytes(want[:10000])
        assert odirect_pread(f, BS, 3 * BS) == b""
        # and up again: the tail reads as zeros, not the old data
        os.truncate(f, 64 << 10)
        assert odirect_pread(f, 16 * BS, 0) == bytes(want[:10000]) + bytes((64 << 10) - 10000)
    assert m.mode == io_mode
    assert m.stats["fast_reads"] > 0
    assert m.stats["generation"] > 1


@needs_native
def test_checksummed_personality_is_never_fast(env, tmp_path):
    img = tmp_path / "b.img"
    want = _make_image(img, "btrfslike")
    m = NativeMount(env, img, tmp_path / "mnt")
    with m as mp:
        f = str(mp / "f")
        for off, n in _offsets(random.Random(5), 20):
            assert odirect_pread(f, n, off) == want[off:off + n], (off, n)
    assert m.mode == "off"
    assert m.stats["fast_reads"] == 0
    assert m.stats["slow_reads"] >= 20


def test_engine_options():
    from ufs.errors import InvalidError
    from ufs.fuse.mount import fuse_engine, split_options
    fuse, rest = split_options("fuse_native,ro,foo=1")
    assert fuse_engine(fuse) == "native" and rest == {"foo": "1"}
    assert fuse_engine(split_options("fuse_pyfuse3")[0]) == "pyfuse3"
    with pytest.raises(InvalidError):
        split_options("fuse_native,fuse_pyfuse3")
    with pytest.raises(InvalidError):
        split_options("fuse_native=1")

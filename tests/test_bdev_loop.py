"""DirectDev on real block devices: loop devices over a 64 MiB image (root only).

Checks the block-device path of open_device: geometry through ioctls (BLKSSZGET etc.),
volatile_cache/fua from sysfs, I/O with both backends, EINVAL for misaligned bios,
EROFS for a writable open of a read-only loop device.  Every loop device is
detached in a finally block.
"""
import errno
import os
import random
import shutil
import subprocess

import pytest

from ufs import errors
from ufs.iomap import bdev

BIO_FLUSH, BIO_READ, BIO_WRITE = (bdev.BIO_FLUSH, bdev.BIO_READ, bdev.BIO_WRITE)

MiB = 1 << 20


def _unavailable():
    if os.geteuid() != 0:
        return "needs root (losetup)"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control missing)"
    if shutil.which("losetup") is None:
        return "needs losetup (util-linux)"
    return None


pytestmark = [pytest.mark.root,
              pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))]

BACKENDS = ["io_uring", "threads"]


def _backend_ok(name):
    return name == "threads" or bdev._probe_io_uring() == 0


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "loop.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    return path


def _losetup(image, *extra):
    try:
        out = subprocess.run(["losetup", "--find", "--show", *extra, str(image)],
                             check=True, capture_output=True, text=True, timeout=30)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"losetup {' '.join(extra)} failed: {e.stderr.strip()}")
    return out.stdout.strip()


def _detach(loop):
    subprocess.run(["losetup", "-d", loop], check=False, capture_output=True, timeout=30)


def _sysfs(loop, attr):
    with open(f"/sys/block/{os.path.basename(loop)}/queue/{attr}") as f:
        return f.read().strip()


@pytest.mark.parametrize("sector", [4096, 512])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loop_geometry_and_io(image, sector, backend):
    if not _backend_ok(backend):
        pytest.skip("io_uring_setup fails on this kernel")
    loop = _losetup(image, "--direct-io=on", "--sector-size", str(sector))
    try:
        with bdev.open_device(loop, backend=backend) as dev:
            assert dev.is_blockdev and dev.direct and dev.backend == backend
            assert dev.size == 64 * MiB
            assert dev.logical_block_size == sector
            assert dev.physical_block_size >= sector
            assert dev.volatile_cache == (_sysfs(loop, "write_cache") == "write back")
            assert dev.fua == (_sysfs(loop, "fua") == "1")

            rng = random.Random(sector)
            n = 64
            blocks = rng.sample(range(dev.size // 4096), n)
            src = bdev.aligned_buffer(n * 4096)
            memoryview(src)[:] = rng.randbytes(n * 4096)
            res = bdev._run_bios(dev.queue(), [(BIO_WRITE, 0, b * 4096, src, i * 4096, 4096)
                                               for i, b in enumerate(blocks)]
                                 + [(BIO_FLUSH, 0, 0, None, 0, 0)])
            assert all(r[:2] == (0, 1) for r in res)
            dst = bdev.aligned_buffer(n * 4096)
            res = bdev._run_bios(dev.new_queue(depth=8, reaper=True),
                                 [(BIO_READ, 0, b * 4096, dst, i * 4096, 4096)
                                  for i, b in enumerate(blocks)])
            assert all(r[:2] == (0, 1) for r in res)
            assert bytes(dst) == bytes(src)

            # a bio aligned to 512 but not to the sector size is refused by check_bio
            if sector > 512:
                r = bdev._run_bios(dev.queue(), [(BIO_READ, 0, 512, dst, 0, 4096),
                                                 (BIO_READ, 0, 0, dst, 0, 512),
                                                 (BIO_READ, 0, 0, dst, 512, 4096)])
                assert [x[0] for x in r] == [-errno.EINVAL] * 3
                with pytest.raises(errors.AlignmentError):
                    dev.pread(512, 0)
            r = bdev._run_bios(dev.queue(), [(BIO_READ, 0, dev.size, dst, 0, sector)])
            assert r[0][0] == -errno.EINVAL
            assert dev.pread(4096, dev.size) == b""
            dev.pwrite(b"L" * 4096, 0, fua=True)
        # the data went through the loop device into the image
        with open(image, "rb") as f:
            assert f.read(4096) == b"L" * 4096
            f.seek(blocks[0] * 4096)
            assert f.read(4096) == bytes(src)[:4096]
    finally:
        _detach(loop)


def test_loop_read_only(image):
    with open(image, "r+b") as f:
        f.write(b"r" * 4096)
    loop = _losetup(image, "--direct-io=on", "--read-only")
    try:
        with pytest.raises(errors.ReadOnlyError) as ei:
            bdev.open_device(loop)
        assert ei.value.errno == errno.EROFS
        with bdev.open_device(loop, read_only=True) as dev:
            assert dev.read_only and dev.pread(4096, 0) == b"r" * 4096
            with pytest.raises(errors.ReadOnlyError):
                dev.pwrite(b"w" * 4096, 0)
    finally:
        _detach(loop)

"""Test devices for the xfslike metadata tests: a recording wrapper (crash images from any
prefix of the write stream under a volatile write-cache model) and a sparse-file device.

Not a test module (no ``test_`` prefix); imported by tests/fs_xfslike/test_*.py.
"""
from __future__ import annotations

import os
import random

import pytest

from ufs import api
from ufs.fs_xfslike import plugin
from ufs.iomap import RamDev
from ufs.vfs import lockdep


class RecordingDev:
    """Wraps a device; records every write and flush so crash images can be rebuilt.

    ``ops`` holds ("w", addr, bytes, fua), ("f",) and ("mark", value) entries.
    ``crash_image(cut, rng)``: the image a power cut right after ``ops[:cut]`` could leave:
    the base image, every write before the last flush in that prefix, every FUA write, and
    each other write of the prefix kept or lost at random (whole writes; the log's CRCs are
    what detect partial records).
    """

    def __init__(self, inner, base: bytes | None = None):
        self.inner = inner
        self.size = inner.size
        self.logical_block_size = inner.logical_block_size
        self.base = base if base is not None else inner.contents()
        self.ops: list[tuple] = []

    def pread(self, length, addr):
        return self.inner.pread(length, addr)

    def pwrite(self, buf, addr, *, fua=False):
        data = bytes(buf)
        self.ops.append(("w", addr, data, fua))
        return self.inner.pwrite(data, addr, fua=fua)

    def flush(self):
        self.ops.append(("f",))
        self.inner.flush()

    def mark(self, value):
        self.ops.append(("mark", value))

    def crash_image(self, cut: int, rng: random.Random, keep_probability: float = 0.5) -> bytes:
        img = bytearray(self.base)
        prefix = self.ops[:cut]
        last_flush = max((i for i, op in enumerate(prefix) if op[0] == "f"), default=-1)
        for i, op in enumerate(prefix):
            if op[0] != "w":
                continue
            _, addr, data, fua = op
            if i < last_flush or fua or rng.random() < keep_probability:
                img[addr:addr + len(data)] = data
        return bytes(img)

    def marks_before(self, cut: int) -> list:
        return [op[1] for op in self.ops[:cut] if op[0] == "mark"]


class SparseFileDev:
    """A buffered sparse image file with the device methods the metadata layer uses."""

    def __init__(self, path: str, size: int, logical_block_size: int = 512):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, size)
        self.size = size
        self.logical_block_size = logical_block_size

    def pread(self, length, addr):
        data = os.pread(self.fd, length, addr)
        if len(data) != length:
            raise OSError(5, "short read")
        return data

    def pwrite(self, buf, addr, *, fua=False):
        n = os.pwrite(self.fd, buf, addr)
        if fua:
            os.fdatasync(self.fd)
        return n

    def flush(self):
        os.fdatasync(self.fd)

    def close(self):
        os.close(self.fd)


def abuf(data: bytes):
    """An aligned buffer holding ``data`` (O_DIRECT writes without a bounce)."""
    from ufs.iomap import aligned_buffer

    b = aligned_buffer(len(data))
    memoryview(b)[:] = data
    return b


# Fixtures shared by the xfslike DIO tests; a test module imports them by name (pytest picks up
# fixtures from the module namespace).  Not a conftest.py: a second module named "conftest"
# would shadow tests/conftest.py, which test_sourcecode imports.

@pytest.fixture
def dev():
    """A 64 MiB strict RamDev formatted xfslike."""
    d = RamDev(64 << 20, 512)
    api.mkfs(d, personality=plugin.PERSONALITY)
    return d


@pytest.fixture
def fs(dev):
    """``dev`` mounted under lockdep; it must fsck clean after the test."""
    with lockdep.checking(True), api.mount(dev, personality=plugin.PERSONALITY) as f:
        yield f
    r = api.fsck(dev, personality=plugin.PERSONALITY)
    assert r.clean, r.errors

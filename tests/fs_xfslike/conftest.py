"""Fixtures shared by the xfslike tests: a formatted RamDev and a mounted filesystem that must
fsck clean after the test.  A test module may define its own ``dev``/``fs`` to override them."""
from __future__ import annotations

import pytest

from ufs import api
from ufs.fs_xfslike import plugin
from ufs.iomap import RamDev
from ufs.vfs import lockdep


@pytest.fixture
def dev():
    d = RamDev(64 << 20, 512)
    api.mkfs(d, personality=plugin.PERSONALITY)
    return d


@pytest.fixture
def fs(dev):
    with lockdep.checking(True), api.mount(dev, personality=plugin.PERSONALITY) as f:
        yield f
    r = api.fsck(dev, personality=plugin.PERSONALITY)
    assert r.clean, r.errors

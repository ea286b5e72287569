"""Differential test: the host kernel is the oracle for ufs's POSIX behaviour (memfs personality).

The same Hypothesis-generated operation sequence runs on a directory of the host kernel (ext4
or tmpfs under ``$UFS_KERNEL_ORACLE_DIR``, default the temp dir) through the ``os`` module,
and on memfs through ``ufs.api``; results, errno, bytes, sizes, listings, link counts,
permissions, xattrs and data/hole maps must match (``ufs.testing.posix_ops``).  The tolerated
differences are the commented ``posix_ops.ALLOWED_DIFFERENCES``.

Profiles: default (CI) 50 examples x 30 steps; ``UFS_HYPOTHESIS_PROFILE=campaign`` for long runs.
"""
from __future__ import annotations

import errno
import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from ufs.iomap.bdev import RamDev

from ufs import api
from ufs.testing import memfs, posix_ops
from ufs.testing.posix_ops import KernelTarget, PosixMachine, UfsTarget, outcome

P = memfs.personality()
UMASK = 0o022
ORACLE_DIR = os.environ.get("UFS_KERNEL_ORACLE_DIR") or tempfile.gettempdir()

_PROFILES = {
    "ci": settings(max_examples=50, stateful_step_count=30, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
    "campaign": settings(max_examples=5000, stateful_step_count=100, deadline=None,
                         suppress_health_check=list(HealthCheck)),
}
PROFILE = _PROFILES.get(os.environ.get("UFS_HYPOTHESIS_PROFILE", "ci"), _PROFILES["ci"])


def _host_has_zero_range() -> bool:
    fd, path = tempfile.mkstemp(dir=ORACLE_DIR)
    try:
        KernelTarget("").fallocate(fd, posix_ops.FALLOC_ZERO, 0, 4096)
        return True
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return False
        raise
    finally:
        os.close(fd)
        os.unlink(path)


def _host_has_user_xattrs() -> bool:
    fd, path = tempfile.mkstemp(dir=ORACLE_DIR)
    try:
        os.setxattr(path, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


HOST_ZERO_RANGE = _host_has_zero_range()

pytestmark = pytest.mark.skipif(not _host_has_user_xattrs(),
                                reason=f"{ORACLE_DIR} does not support user xattrs")


def _memfs_target() -> UfsTarget:
    dev = RamDev(1 << 20, 512)
    api.mkfs(dev, personality=P)
    fs = api.mount(dev, personality=P)
    fs.umask(UMASK)
    return UfsTarget(fs)


class KernelVsMemfs(PosixMachine):
    zero_range = HOST_ZERO_RANGE

    def make_targets(self):
        self._old_umask = os.umask(UMASK)
        root = tempfile.mkdtemp(prefix="ufs-oracle-", dir=ORACLE_DIR)
        os.chmod(root, 0o755)
        return [KernelTarget(root), _memfs_target()]

    def teardown(self):
        try:
            super().teardown()
        finally:
            os.umask(self._old_umask)


TestKernelVsMemfs = KernelVsMemfs.TestCase
TestKernelVsMemfs.settings = PROFILE


# --- the comparison itself can fail (a test of the test) --------------------------------------------

def test_machine_detects_a_wrong_errno(tmp_path):
    """A personality giving a different errno than the kernel must fail the comparison."""
    m = KernelVsMemfs()
    try:
        ufs = m.targets[1]
        real = ufs.fs.namei.rmdir

        def bad_rmdir(path):
            try:
                real(path)
            except OSError as e:
                raise OSError(errno.EPERM, "wrong") from e
        ufs.fs.namei.rmdir = bad_rmdir
        with pytest.raises(AssertionError, match="rmdir"):
            m.rmdir("/nope")
    finally:
        m.teardown()


def test_machine_detects_a_wrong_tree():
    m = KernelVsMemfs()
    try:
        m.mkdir("/a", 0o755)
        m.trees_match()
        m.targets[1].fs.chmod("/a", 0o700)         # behind the oracle's back
        with pytest.raises(AssertionError, match="tree differs"):
            m.trees_match()
    finally:
        m.teardown()


def test_machine_compares_data_maps():
    m = KernelVsMemfs()
    try:
        fd = m.open("/a", os.O_CREAT | os.O_RDWR, 0o644)
        m.pwrite(fd, 3 * 4096, 10, 1)
        m.ftruncate(fd, 6 * 4096)
        m.trees_match()
        snap = posix_ops.snapshot(m.targets[0])
        assert snap["/a"]["map"] == [(3 * 4096, 4 * 4096)]
        assert outcome(m.targets[1].lseek, fd[1], 0, os.SEEK_DATA) == ("ok", 3 * 4096)
        m.close(fd)
    finally:
        m.teardown()

"""Every personality, side by side, against the host kernel on the same generated sequences.

One Hypothesis state machine (ufs.testing.posix_ops.PosixMachine) drives, in lockstep:
the host kernel's filesystem under a temporary directory (the oracle), memfs (the model),
and every personality the plugin registry offers (xfslike, btrfslike, and any third-party
one that is installed), each on its own RamDev through the public API.  Every result, errno,
byte, size, listing, link count and data/hole map must be equal across all of them, except
the written, justified differences in posix_ops.ALLOWED_DIFFERENCES.  After each sequence
each personality is unmounted and fsck must find it clean.

This is the "one suite parametrised over personalities" of issue 4: adding a personality
to the registry adds it here with no test change.
"""
from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings

from ufs import api, plugins
from ufs.iomap import RamDev
from ufs.testing import memfs
from ufs.testing.posix_ops import KernelTarget, PosixMachine, UfsTarget

from test_api_vs_kernel import HOST_ZERO_RANGE, ORACLE_DIR, UMASK, _host_has_user_xattrs

pytestmark = pytest.mark.skipif(not _host_has_user_xattrs(),
                                reason=f"{ORACLE_DIR} does not support user xattrs")

_PERSONALITIES = sorted(plugins.get_registry().values(), key=lambda p: p.name)
_MEMFS = memfs.personality()


class _PersonalityTarget(UfsTarget):
    """A personality on its own RamDev; cleanup unmounts and requires a clean fsck."""

    def __init__(self, personality, size=64 << 20):
        self.personality = personality
        self.name = personality.name
        self.dev = RamDev(size, 512)
        api.mkfs(self.dev, personality=personality)
        fs = api.mount(self.dev, personality=personality)
        fs.umask(UMASK)
        super().__init__(fs)

    def cleanup(self):
        self.fs.unmount()
        if self.personality is _MEMFS:
            return
        report = api.fsck(self.dev, personality=self.personality)
        assert report.clean, f"{self.name}: fsck after the sequence: {report.errors}"


class AllPersonalities(PosixMachine):
    zero_range = HOST_ZERO_RANGE

    def make_targets(self):
        self._old_umask = os.umask(UMASK)
        root = tempfile.mkdtemp(prefix="ufs-oracle-", dir=ORACLE_DIR)
        os.chmod(root, 0o755)
        targets = [KernelTarget(root), _PersonalityTarget(_MEMFS, 1 << 20)]
        targets += [_PersonalityTarget(p) for p in _PERSONALITIES]
        return targets

    def teardown(self):
        try:
            super().teardown()
        finally:
            os.umask(self._old_umask)


def test_registry_offers_the_builtin_personalities():
    # If plugin loading silently lost a personality, the machine below would compare fewer
    # filesystems without saying so.
    names = {p.name for p in _PERSONALITIES}
    assert {"xfslike", "btrfslike"} <= names, names


TestAllPersonalities = AllPersonalities.TestCase
TestAllPersonalities.settings = settings(
    max_examples=int(os.environ.get("UFS_DIFF_EXAMPLES", "25")), stateful_step_count=25,
    deadline=None, suppress_health_check=list(HealthCheck))

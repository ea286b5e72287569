"""The btrfslike plugin: registers the personality with ufs (pluggy hook).

Layer: personality (plugin entry).  Imports ``ufs.hookspecs`` (hookimpl), ``ufs.registry``
(Personality, OptionSpec) and, lazily inside the callables, this package's mkfs/mount/fsck
(registration must stay cheap: no Cython engine import here).

Options (validated by ``ufs.registry.parse_options`` before ``mount`` sees them):
``dio_complete`` = ``unlocked`` (default) | ``locked`` | ``marker`` (how an O_DIRECT write is
completed relative to ``i_rwsem``; see ``file.py``), ``nodatasum``, ``nodatacow`` (defaults for
new files), ``lockdep`` (turn on lock checking for this mount), ``notreelog`` (fsync always
commits, no fsync log), ``inode_cache`` (the inode cache LRU bound, ``ufs.vfs.super``), and
for mkfs ``nodesize``.
"""
from __future__ import annotations

from ufs.hookspecs import hookimpl
from ufs.registry import VFS_OPTIONS, OptionSpec, Personality, int_option

__all__ = ["OPTIONS", "PERSONALITY", "ufs_register_personalities"]

MAGIC = b"UFSBTRL1"
PROBE_LABEL_ADDR = 60 * 1024      # format.PROBE_LABEL_ADDR (kept literal: no format import here)


def _mkfs(device, geometry, options):
    from .mkfs import mkfs
    mkfs(device, geometry, options)


def _mount(device, options, readonly=False):
    from .mkfs import mount
    opts = dict(options or {})
    if opts.get("lockdep"):
        from ufs.vfs import lockdep
        lockdep.enable()
    return mount(device, opts, readonly)


def _fsck(device, repair=False):
    from .fsck import fsck
    return fsck(device, repair)


OPTIONS = {
    "dio_complete": OptionSpec(str, "unlocked", choices=("unlocked", "locked", "marker"),
                               help="O_DIRECT write completion: after dropping i_rwsem (the "
                                    "seed), under it (O_DSYNC deadlocks), or under it with a "
                                    "per-task fsync marker (btrfs >= 6.11)"),
    "nodatasum": OptionSpec(bool, False, help="new files get no data checksums"),
    "nodatacow": OptionSpec(bool, False, help="new files are overwritten in place (implies "
                                              "nodatasum)"),
    "notreelog": OptionSpec(bool, False, help="fsync commits the whole transaction instead of "
                                              "writing an fsync log record (as btrfs)"),
    "nodesize": OptionSpec(int_option(1024, 65536, pow2=True), 16384,
                           help="mkfs: tree node size in bytes"),
    **VFS_OPTIONS,
}

PERSONALITY = Personality(
    name="btrfslike",
    description="btrfs-shaped copy-on-write filesystem: checksums, snapshots, reflinks",
    magic=MAGIC, magic_offset=PROBE_LABEL_ADDR,
    mkfs=_mkfs, mount=_mount, fsck=_fsck, options=OPTIONS, version="1")


@hookimpl
def ufs_register_personalities(register):
    register(PERSONALITY)

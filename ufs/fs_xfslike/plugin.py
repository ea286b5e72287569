"""The xfslike plugin: registers the personality with ufs (pluggy hook).

Layer: personality (plugin entry).  Imports ``ufs.hookspecs`` (hookimpl), ``ufs.registry``
(Personality, OptionSpec) and, lazily inside the callables, this package's mkfs/mount/fsck
(registration stays cheap: no Cython engine import here).

Options (validated by ``ufs.registry.parse_options``): mkfs ``inode_size`` (256..block size,
power of two), ``ag_count``, ``log_blocks``, ``label``; mount ``lockdep`` (lock checking),
``inode_cache`` (the inode cache LRU bound, ``ufs.vfs.super``).
"""
from __future__ import annotations

from ufs.hookspecs import hookimpl
from ufs.registry import VFS_OPTIONS, OptionSpec, Personality, int_option

__all__ = ["OPTIONS", "PERSONALITY", "ufs_register_personalities"]

MAGIC = b"XLSB"          # DiskBlockHeader.magic of the primary superblock, at byte 0


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


def _label(v):
    s = str(v)
    if len(s.encode()) > 32:
        raise ValueError("at most 32 bytes")
    return s


OPTIONS = {
    "inode_size": OptionSpec(int_option(256, 65536, pow2=True), 512, help="mkfs: bytes per on-disk inode"),
    "ag_count": OptionSpec(int_option(1), None, help="mkfs: number of allocation groups"),
    "log_blocks": OptionSpec(int_option(1), None, help="mkfs: journal size in blocks (>= 128)"),
    "label": OptionSpec(_label, "", help="mkfs: volume label"),
    **VFS_OPTIONS,
}

PERSONALITY = Personality(
    name="xfslike",
    description="XFS-shaped journaling filesystem: allocation groups, B+trees, extents, "
                "delayed allocation, unwritten extents",
    magic=MAGIC, magic_offset=0,
    mkfs=_mkfs, mount=_mount, fsck=_fsck, options=OPTIONS, version="1")


@hookimpl
def ufs_register_personalities(register):
    register(PERSONALITY)

"""ufs.vfs: the generic VFS layer personalities build on (DESIGN.md §4, CORE-API §5-6).

Layer: vfs.  May import ``ufs.iomap``, ``ufs.errors`` and the standard library only; nothing
here imports a personality, the API, the CLI or pluggy.

Modules (one concept each):
- ``lockdep``: lock classes, held-lock stacks, the dependency graph, the hung-task watchdog;
- ``locks``: ``Mutex`` and ``RWSem`` (checked by lockdep);
- ``pagecache``: ``PageCache`` (``inode.i_mapping``) and the per-superblock ``PageCacheBudget``;
- ``writeback``: ``WritebackOps`` and the write-back of dirty runs;
- ``inode``, ``file``, ``super``: ``Inode``, ``File``, ``Superblock``;
- ``workqueue``: ``WorkQueue`` (the superblock's DIO completion queue);
- ``sync``: ``generic_write_sync`` (the engine's, re-exported);
- ``buffered``: buffered read/write/zero through the page cache and ``IomapIter``.
"""
from ufs.vfs import lockdep
from ufs.vfs.buffered import (buffered_read, buffered_write, buffered_zero_range,
                              generic_file_read, generic_file_write, generic_write_checks)
from ufs.vfs.file import LLONG_MAX, File
from ufs.vfs.inode import Inode
from ufs.vfs.locks import Mutex, RWSem
from ufs.vfs.pagecache import DEFAULT_CAP_BYTES, Page, PageCache, PageCacheBudget
from ufs.vfs.super import Superblock
from ufs.vfs.sync import generic_write_sync
from ufs.vfs.workqueue import WorkQueue
from ufs.vfs.writeback import WritebackOps, writeback_run

__all__ = [
    "lockdep", "Mutex", "RWSem", "PageCache", "PageCacheBudget", "Page", "DEFAULT_CAP_BYTES",
    "WritebackOps", "writeback_run", "Inode", "File", "LLONG_MAX", "Superblock", "WorkQueue",
    "generic_write_sync", "buffered_read", "buffered_write", "buffered_zero_range",
    "generic_write_checks", "generic_file_write", "generic_file_read",
]

"""Superblock base: what every mounted filesystem instance shares with the VFS and the engine.

Layer: vfs.  Imports ``ufs.vfs.workqueue``, ``ufs.vfs.pagecache``, ``ufs.errors`` and the
standard library.

Owns (kernel ``struct super_block`` names): ``s_blocksize``/``s_blocksize_bits`` (bytes / log2),
``bdev`` (the data device), ``s_page_budget`` (the page-cache cap shared by this mount's inodes,
default 256 MiB), ``s_wb_ops`` (default write-back ops for new inodes' mappings) and
``s_dio_done_wq``: the DIO completion workqueue, created on first use (the kernel's
``sb_init_dio_done_wq``), exactly once even when two async writes race to create it.
``shutdown()`` destroys the workqueue after draining it.

Locks: ``_wq_lock`` (leaf) guards the lazy creation only.
"""
from __future__ import annotations

import threading

from ufs.errors import InvalidError
from ufs.vfs.pagecache import DEFAULT_CAP_BYTES, PageCacheBudget
from ufs.vfs.workqueue import WorkQueue

__all__ = ["Superblock"]


class Superblock:
    """Base class of a personality's superblock."""

    def __init__(self, bdev=None, blocksize: int = 4096, *, page_cache_cap: int = DEFAULT_CAP_BYTES,
                 wb_ops=None, dio_max_active: int = 2, name: str | None = None):
        if blocksize <= 0 or blocksize & (blocksize - 1):
            raise InvalidError(f"block size {blocksize} is not a power of two")
        self.bdev = bdev
        self.s_blocksize = blocksize
        self.s_blocksize_bits = blocksize.bit_length() - 1
        self.s_page_budget = PageCacheBudget(page_cache_cap)
        self.s_wb_ops = wb_ops
        self.s_id = name or (getattr(bdev, "path", None) or "ufs")
        self._dio_max_active = dio_max_active
        self._dio_done_wq: WorkQueue | None = None
        self._wq_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.s_id} bs={self.s_blocksize}>"

    @property
    def s_dio_done_wq(self) -> WorkQueue:
        """The DIO completion workqueue, created on first use."""
        wq = self._dio_done_wq
        if wq is None:
            with self._wq_lock:
                wq = self._dio_done_wq
                if wq is None:
                    wq = self._dio_done_wq = WorkQueue(f"dio/{self.s_id}", self._dio_max_active)
        return wq

    @property
    def has_dio_done_wq(self) -> bool:
        """Whether the workqueue was created (without creating it)."""
        return self._dio_done_wq is not None

    def shutdown(self) -> None:
        """Drain and destroy the completion workqueue (unmount).  Idempotent."""
        with self._wq_lock:
            wq, self._dio_done_wq = self._dio_done_wq, None
        if wq is not None:
            wq.destroy()

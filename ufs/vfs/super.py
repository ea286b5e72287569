"""Superblock base: what every mounted filesystem instance shares with the VFS and the engine.

Layer: vfs.  Imports ``ufs.vfs.workqueue``, ``ufs.vfs.pagecache``, ``ufs.errors`` and the
standard library.

Owns (kernel ``struct super_block`` names): ``s_blocksize``/``s_blocksize_bits`` (bytes / log2),
``bdev`` (the data device), ``s_page_budget`` (the page-cache cap shared by this mount's inodes,
default 256 MiB), ``s_wb_ops`` (default write-back ops for new inodes' mappings),
``s_dio_done_wq``: the DIO completion workqueue, created on first use (the kernel's
``sb_init_dio_done_wq``), exactly once even when two async writes race to create it, and the
inode cache (``fs/inode.c``'s hash + LRU, per superblock).  ``shutdown()`` destroys the
workqueue after draining it.

Inode cache (personalities call it from ``iget``/inode creation/freeing):
- ``_icache`` maps ino -> inode *weakly*: while anything holds an inode (an open File, a path
  walk in progress, a running transaction, the FUSE adapter's node table, a dirty list) every
  ``iget`` returns that same object, so identity-keyed tables (the fd table's open counts)
  stay right.  There is never a second object for one live inode.
- ``_inode_lru`` holds strong references to the ``s_inode_cache_max`` most recently used
  inodes (the kernel's ``s_inode_lru``; mount option ``inode_cache``, default
  :data:`DEFAULT_INODE_CACHE`).  An inode evicted from it lives on only as long as something
  else holds it; once nothing does, Python frees it and the next ``iget`` reads it back from
  disk.  Evicting an inode is therefore always safe for *identity*; for *state* the rule is
  the personality's: every inode with state not yet in its metadata (dirty pages, delayed
  allocation, an unlogged core, DIO in flight) must be held strongly by whatever records that
  state (the page cache budget's LRU holds dirty pages, which hold their mapping and its
  host; xfslike's dirty list; the DIO's kiocb holds its file).
- :meth:`prune_icache` (the shrinker, ``prune_icache_sb``): once the LRU passes its bound it
  takes a batch of the oldest entries and, for each that is not in use (no open file, as the
  VFS reports through ``s_inode_in_use``; no DIO in flight) and that the personality calls
  reclaimable (:meth:`inode_reclaimable`: nothing dirty), drops its clean cached pages (try
  locks only: a page in use keeps the inode) and its LRU reference.  Entries in use are
  rotated to the young end (``LRU_ROTATE``); dirty ones are put back at the old end and
  counted.  It does no I/O and never sleeps, so it runs inline when
  ``icache_add``/``icache_get`` push the LRU past the bound, whatever locks the caller
  holds.  With ``writeback=True`` (:meth:`balance_icache`, called by the VFS at the start of
  namespace operations, when the caller holds no lock, and doing nothing unless the LRU is
  over its bound or the last prune left dirty inodes at the old end) dirty victims are
  first written back through :meth:`writeback_inode` and then evicted, which is what bounds
  a workload that keeps writing new files (the kernel's flusher threads do this in the
  background).
- The bound is soft for inodes in use (they stay cached however many) and for dirty inodes
  between two balances (the LRU may exceed the bound by the dirty ones waiting at the old end;
  ~12% in ``benchmarks/scale.py``).
- An evicted inode is part of reference cycles (inode <-> its page cache, extent map,
  directory state), so Python frees it at the next cyclic garbage collection, not at once;
  the weak map forgets it then.

Locks: ``_wq_lock`` (leaf) guards the lazy creation of the workqueue.  ``_icache_lock`` (leaf)
guards ``_icache``/``_inode_lru``; nothing is called with it held.  ``_prune_lock`` makes one
thread prune at a time (taken with a try-lock only, before anything else the prune takes);
a prune then takes, one at a time and never nested: ``_icache_lock``, the VFS's in-use test
(the fd table's leaf lock), the personality's reclaimable test and, via
:meth:`ufs.vfs.pagecache.PageCache.release_clean_pages`, page try-locks and the page-cache
leaf locks.  The shrinker calls ``writeback_inode`` only from ``balance_icache``, with no
cache lock held, so it may take the locks write-back takes (page-cache locks, then the
personality's metadata lock).
"""
from __future__ import annotations

import collections
import logging
import threading
import weakref

from ufs.errors import InvalidError
from ufs.vfs.pagecache import DEFAULT_CAP_BYTES, PageCacheBudget
from ufs.vfs.workqueue import WorkQueue

__all__ = ["DEFAULT_INODE_CACHE", "Superblock"]

log = logging.getLogger("ufs.vfs.super")

#: inodes kept in the LRU by default: about 10 KiB of Python memory each (most of it the
#: Conditions behind the per-inode locks), ~17 KiB with a cached page, so ~140 MiB
DEFAULT_INODE_CACHE = 8192


class Superblock:
    """Base class of a personality's superblock."""

    def __init__(self, bdev=None, blocksize: int = 4096, *, page_cache_cap: int = DEFAULT_CAP_BYTES,
                 wb_ops=None, dio_max_active: int = 2, name: str | None = None,
                 inode_cache: int = DEFAULT_INODE_CACHE):
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
        # inode cache (see the module docstring)
        self._icache = weakref.WeakValueDictionary()
        self._inode_lru: collections.OrderedDict = collections.OrderedDict()
        self._icache_lock = threading.Lock()
        self._prune_lock = threading.Lock()
        self.s_inode_cache_max = 0
        self._prune_at = self._balance_at = 0
        self._nr_dirty_old = 0          # dirty inodes the last prune left at the old end
        self.set_inode_cache_max(inode_cache)
        #: callable(inode) -> bool, "an open file holds it" (set by the VFS's Namei)
        self.s_inode_in_use = None
        self.icache_stats = collections.Counter()

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

    # -- inode cache ------------------------------------------------------------------------
    def set_inode_cache_max(self, n: int) -> None:
        """Set the LRU bound (inodes, >= 1); prunes at the next insertion if it shrank."""
        n = int(n)
        if n < 1:
            raise InvalidError(f"inode cache bound {n} must be at least 1")
        self.s_inode_cache_max = n
        self._prune_at = self._balance_at = n

    def icache_get(self, ino: int):
        """The live inode ``ino`` or None; a hit becomes the youngest LRU entry (re-entering
        the LRU if it had been evicted from it while still in use)."""
        with self._icache_lock:
            inode = self._icache.get(ino)
            if inode is None:
                return None
            lru = self._inode_lru
            if ino in lru:
                lru.move_to_end(ino)
                return inode
            lru[ino] = inode
            over = len(lru) > self._prune_at
        if over:
            self.prune_icache()
        return inode

    def icache_add(self, inode, *, new: bool = False):
        """Insert an inode read from disk; returns the cached object, which is ``inode`` unless
        another thread inserted the same ino first (then use the returned one).  ``new``: a
        just-allocated inode, which replaces any object left under its number."""
        ino = inode.i_ino
        with self._icache_lock:
            cur = self._icache.get(ino)
            if cur is not None and not new:
                inode = cur
            else:
                self._icache[ino] = inode
            lru = self._inode_lru
            lru[ino] = inode
            lru.move_to_end(ino)
            over = len(lru) > self._prune_at
        if over:
            self.prune_icache()
        return inode

    def icache_forget(self, ino: int, inode=None) -> None:
        """Remove ``ino`` (only if it is ``inode`` when given): the inode was freed."""
        with self._icache_lock:
            cur = self._icache.get(ino)
            if inode is not None and cur is not inode:
                return
            self._icache.pop(ino, None)
            self._inode_lru.pop(ino, None)

    def icache_forget_if(self, pred) -> None:
        """Remove every cached inode number for which ``pred(ino)`` is true."""
        with self._icache_lock:
            for ino in [i for i in list(self._icache.keys()) if pred(i)]:
                self._icache.pop(ino, None)
                self._inode_lru.pop(ino, None)

    def icache_count(self) -> int:
        """Inodes the LRU holds (the bounded number)."""
        return len(self._inode_lru)

    def icache_live(self) -> int:
        """Inode objects still reachable by number (LRU + in use elsewhere + not yet freed)."""
        return len(self._icache)

    # hooks a personality may override --------------------------------------------------------
    def inode_reclaimable(self, inode) -> bool:
        """Whether dropping the cache's reference loses nothing (no dirty state).  Default: no
        dirty page."""
        return not inode.i_mapping.has_dirty_pages()

    def writeback_inode(self, inode) -> None:
        """Write ``inode``'s dirty state back so it becomes reclaimable (no lock held).
        Default: its dirty pages."""
        inode.i_mapping.write_and_wait_range(0, None)

    # the shrinker -------------------------------------------------------------------------------
    def _busy(self, inode) -> bool:
        if getattr(inode, "i_dio_count", 0):
            return True
        in_use = self.s_inode_in_use
        return in_use is not None and in_use(inode)

    def prune_icache(self, *, writeback: bool = False) -> int:
        """Evict the oldest unused clean inodes until the LRU is within its bound (less a
        sixteenth, so a prune is not needed at every insertion).  Returns how many left it.
        With ``writeback`` dirty victims are written back first (see the module docstring)."""
        if not self._prune_lock.acquire(False):
            return 0
        try:
            return self._prune(writeback)
        finally:
            self._prune_lock.release()

    def _prune(self, writeback: bool) -> int:
        limit = self.s_inode_cache_max
        with self._icache_lock:
            lru = self._inode_lru
            n = len(lru) - limit + (limit >> 4)
            if writeback:
                n = max(n, self._nr_dirty_old)
            if n <= 0:
                return 0
            victims = [lru.popitem(last=False)[1] for _ in range(min(n, len(lru)))]
        keep, keep_old, dirty = [], [], []
        in_use = 0
        freed = 0
        for inode in victims:
            if self._busy(inode):
                keep.append(inode)
                in_use += 1
            elif not self.inode_reclaimable(inode):
                # without write-back a dirty inode stays the oldest, for the next balance
                (dirty if writeback else keep_old).append(inode)
            elif inode.i_mapping.release_clean_pages():
                freed += 1
            else:
                keep.append(inode)
        for inode in dirty:
            try:
                self.writeback_inode(inode)
            except OSError:
                log.warning("inode cache: write-back of %r failed; it stays cached", inode,
                            exc_info=True)
                keep.append(inode)
                continue
            self.icache_stats["writeback"] += 1
            if (not self._busy(inode) and self.inode_reclaimable(inode)
                    and inode.i_mapping.release_clean_pages()):
                freed += 1
            else:
                keep.append(inode)
        with self._icache_lock:
            lru = self._inode_lru
            for inode in keep:
                ino = inode.i_ino
                if ino not in lru and self._icache.get(ino) is inode:
                    lru[ino] = inode            # rotated: now the youngest
            for inode in reversed(keep_old):
                ino = inode.i_ino
                if ino not in lru and self._icache.get(ino) is inode:
                    lru[ino] = inode
                    lru.move_to_end(ino, last=False)
            self._nr_dirty_old = len(keep_old)
            # kept entries raise the triggers so that a cache full of busy (or, between two
            # balances, dirty) inodes is not rescanned at every insertion
            self._prune_at = limit + len(keep) + len(keep_old)
            self._balance_at = limit + in_use
        self.icache_stats["pruned"] += freed
        self.icache_stats["rotated"] += len(keep)
        return freed

    def balance_icache(self) -> int:
        """The VFS's safe point (no lock held): prune with write-back when the LRU is over
        its bound.  Cheap when it is not."""
        if len(self._inode_lru) <= self._balance_at and not self._nr_dirty_old:
            return 0
        return self.prune_icache(writeback=True)

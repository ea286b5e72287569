"""The page cache of one inode (``PageCache``, the kernel's ``address_space``) and the
per-superblock memory budget that bounds all of them (``PageCacheBudget``).

Layer: vfs.  Imports ``ufs.vfs.locks``, ``ufs.vfs.writeback``, ``ufs.errors`` and the standard
library.

Model:
- a page is ``page_size`` bytes of file data at ``index * page_size`` (page_size = max(4096,
  fs block size) unless given), held in a ``bytearray``;
- state is tracked per fs block inside the page, as iomap's per-folio state does: ``uptodate``
  (the bytes equal the file's contents) and ``dirty`` (newer than the device) bitmasks.  Dirty
  blocks are always uptodate.  Bytes at or beyond ``i_size`` in a cached page are zero;
- write-back (``write_and_wait_range``) writes dirty blocks through ``a_ops``
  (:class:`ufs.vfs.writeback.WritebackOps`) and clamps to the block holding EOF, zeroing the
  page tail past EOF first (iomap_writepage_handle_eof).  A failed run is re-dirtied (a
  deviation: the kernel drops it and reports the error once through errseq) and the error is
  raised and kept in ``wb_err``;
- ``invalidate_range`` writes back dirty pages in the range, then drops every page overlapping
  it.  ``fail_invalidate`` (an errno, or a callable ``(pos, end) -> errno | None`` that may also
  raise) makes it fail instead, after the write-back, on every call (the engine only calls it
  when ``nrpages`` is non-zero), to test the DIO ENOTBLK fallback (sem §3.11);
- the budget (``PageCacheBudget``, shared per superblock) evicts clean, unlocked pages in LRU
  order across inodes once the cached bytes exceed its cap; when only dirty pages are left
  it writes them back first.  ``balance()`` runs between pages of an operation (every read
  window, every 64 written pages, at the end), never with a page locked.

Locks, outermost first:
1. ``invalidate_lock`` (RWSem, lockdep class ``"mapping.invalidate_lock"``, also ``lock``):
   taken shared by the buffered read path while it creates and fills pages; personalities take
   it exclusive around truncate/punch/collapse so no page is re-read meanwhile (the kernel's
   filemap_invalidate_lock).  Nothing in this module takes it exclusive, so
   ``invalidate_range``/``truncate_pages`` may be called with it held.
2. ``_wb_lock``: serialises write-back of this mapping across the device I/O, so a second
   ``write_and_wait_range`` returns only after the first one's I/O ended.
3. ``page.lock`` (one per page, like the kernel's folio lock): held while a page's bytes or
   state change (fill, copy-in, write-back snapshot, removal).  Several page locks are taken in
   ascending index order only.
4. ``_lock`` (mapping, leaf): the page dict.  ``PageCacheBudget._lock`` (leaf): the LRU.
Eviction (the budget's, and ``release_clean_pages`` when the inode cache drops an inode) only
*tries* page locks, so it never waits behind an operation and may run under any lock.

Lifetime: a cached page holds its mapping and the mapping its inode (``host``), so an inode
with pages in the budget's LRU stays alive; dirty pages thereby keep their inode (and its
unwritten state) in memory until they are written back.  The inode cache
(``ufs.vfs.super``) drops an evicted inode's clean pages so that nothing else pins it.
"""
from __future__ import annotations

import collections
import logging
import threading

import errno as _errno

from ufs.errors import InvalidError, InvariantError, from_errno
from ufs.vfs.locks import RWSem
from ufs.vfs.writeback import writeback_run

__all__ = ["Page", "PageCache", "PageCacheBudget", "DEFAULT_CAP_BYTES"]

log = logging.getLogger("ufs.vfs.pagecache")

DEFAULT_CAP_BYTES = 256 << 20


class Page:
    """One cached page.  ``data`` is ``page_size`` bytes; ``uptodate``/``dirty`` are block masks.

    ``mapping`` is None once the page left its cache (callers that looked a page up and then
    locked it re-check this, as the kernel re-checks ``folio->mapping``).
    """

    __slots__ = ("index", "pos", "data", "uptodate", "dirty", "lock", "mapping", "__weakref__")

    def __init__(self, mapping, index: int, page_size: int):
        self.index = index
        self.pos = index * page_size
        self.data = bytearray(page_size)
        self.uptodate = 0
        self.dirty = 0
        self.lock = threading.Lock()
        self.mapping = mapping

    def __repr__(self) -> str:
        return f"<Page {self.index} uptodate={self.uptodate:#x} dirty={self.dirty:#x}>"


# --- Budget ------------------------------------------------------------------------------------

class PageCacheBudget:
    """Bytes of page cache allowed for every mapping charged to it (one per superblock)."""

    def __init__(self, cap_bytes: int = DEFAULT_CAP_BYTES):
        self.cap_bytes = cap_bytes
        self.used_bytes = 0
        self.nr_evicted = 0             # pages dropped to stay under the cap
        self.nr_writeback = 0           # write-back passes forced by the cap
        self._lru: collections.OrderedDict = collections.OrderedDict()   # Page -> None, LRU first
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<PageCacheBudget used={self.used_bytes} cap={self.cap_bytes}>"

    def charge(self, page: Page) -> None:
        with self._lock:
            # a page removed between its insertion and this call stays uncharged (the
            # remover cleared page.mapping before its uncharge)
            if page.mapping is not None and page not in self._lru:
                self._lru[page] = None
                self.used_bytes += len(page.data)

    def uncharge(self, page: Page) -> None:
        with self._lock:
            if self._lru.pop(page, 0) is None:
                self.used_bytes -= len(page.data)

    def touch(self, page: Page) -> None:
        """Mark ``page`` most recently used."""
        with self._lock:
            if page in self._lru:
                self._lru.move_to_end(page)

    def over(self) -> bool:
        return self.used_bytes > self.cap_bytes

    def balance(self) -> int:
        """Evict until under the cap (or nothing more can go).  Returns pages evicted.

        Callers hold no page lock.  Clean pages go first, oldest first; if the cap is still
        exceeded, the mappings owning the oldest dirty pages are written back once and the
        now-clean pages evicted.
        """
        evicted = 0
        wrote_back = False
        while self.used_bytes > self.cap_bytes:
            victims = []
            dirty_owners = []
            need = self.used_bytes - self.cap_bytes
            with self._lock:
                for page in self._lru:
                    if page.dirty:
                        if page.mapping is not None and page.mapping not in dirty_owners:
                            dirty_owners.append(page.mapping)
                        continue
                    if page.lock.locked():
                        continue
                    victims.append(page)
                    need -= len(page.data)
                    if need <= 0:
                        break
            dropped = 0
            for page in victims:
                mapping = page.mapping
                if mapping is not None and mapping._try_evict(page):
                    dropped += 1
            evicted += dropped
            if dropped:
                continue
            if wrote_back or not dirty_owners:
                break
            wrote_back = True
            self.nr_writeback += 1
            for mapping in dirty_owners:
                try:
                    mapping.write_and_wait_range(0, None)
                except OSError:
                    log.warning("page cache budget: write-back of %r failed; pages stay dirty",
                                mapping.host, exc_info=True)
        self.nr_evicted += evicted
        return evicted


# --- PageCache ----------------------------------------------------------------------------------

class PageCache:
    """The cached pages of one inode (``inode.i_mapping``).  See the module docstring."""

    def __init__(self, inode, page_size: int | None = None, *, a_ops=None,
                 budget: PageCacheBudget | None = None):
        self.host = inode
        self._fixed_page_size = page_size
        self._geometry(inode.i_blkbits)
        self.a_ops = a_ops
        self.budget = budget if budget is not None else PageCacheBudget()
        self.fail_invalidate = None     # errno or callable(pos, end) -> errno|None; see docstring
        self.wb_err: BaseException | None = None
        self.nr_invalidate_failures = 0
        self.nr_written_back = 0        # bytes written back over the life of the mapping
        self._pages: dict[int, Page] = {}
        self._lock = threading.Lock()
        self._wb_lock = threading.Lock()
        self.invalidate_lock = RWSem("mapping.invalidate_lock")
        self.lock = self.invalidate_lock

    def _geometry(self, blkbits: int) -> None:
        bs = 1 << blkbits
        ps = self._fixed_page_size or max(4096, bs)
        if ps & (ps - 1) or ps < bs:
            raise InvalidError(f"page size {ps} must be a power of two >= block size {bs}")
        self.page_size = ps
        self.page_shift = ps.bit_length() - 1
        self.blkbits = blkbits
        self.block_size = bs
        self.blocks_per_page = ps >> blkbits
        self.full_mask = (1 << self.blocks_per_page) - 1

    def __repr__(self) -> str:
        return f"<PageCache of {self.host!r}: {len(self._pages)} pages>"

    # --- lookup ---
    @property
    def nrpages(self) -> int:
        return len(self._pages)

    @property
    def nrdirty(self) -> int:
        """Pages with at least one dirty block."""
        return sum(1 for p in list(self._pages.values()) if p.dirty)

    def has_dirty_pages(self) -> bool:
        """Any page with a dirty block (``mapping_tagged(DIRTY)``; stops at the first)."""
        if not self._pages:
            return False
        return any(p.dirty for p in list(self._pages.values()))

    def release_clean_pages(self) -> bool:
        """Drop every clean page nobody has locked (``invalidate_mapping_pages``, used when
        the inode cache evicts the inode).  Never waits.  True if no page is left."""
        if not self._pages:
            return True
        for page in list(self._pages.values()):
            self._try_evict(page)
        return not self._pages

    def find_page(self, index: int) -> Page | None:
        """The cached page at ``index`` (unlocked), or None."""
        return self._pages.get(index)

    def grab_page(self, index: int) -> Page:
        """Find or create the page at ``index`` and return it **locked** (find_or_create_page).

        Callers unlock with ``page.lock.release()`` and then call ``budget.balance()`` once they
        hold no page lock.
        """
        while True:
            page = self._pages.get(index)
            if page is None:
                if self.blkbits != self.host.i_blkbits and not self._pages:
                    self._geometry(self.host.i_blkbits)
                new = Page(self, index, self.page_size)
                with self._lock:
                    page = self._pages.get(index)
                    if page is None:
                        page = self._pages[index] = new
                if page is new:
                    self.budget.charge(page)
            else:
                self.budget.touch(page)
            page.lock.acquire()
            if page.mapping is self:
                return page
            page.lock.release()             # evicted between lookup and lock: look again

    def _remove_locked(self, page: Page) -> None:
        """Drop a page the caller has locked."""
        with self._lock:
            if self._pages.get(page.index) is page:
                del self._pages[page.index]
        page.mapping = None
        self.budget.uncharge(page)

    def _try_evict(self, page: Page) -> bool:
        """Drop a clean page if nobody uses it (budget eviction; never waits)."""
        if not page.lock.acquire(False):
            return False
        try:
            if page.mapping is not self or page.dirty:
                return False
            self._remove_locked(page)
            return True
        finally:
            page.lock.release()

    def _pages_in(self, pos: int, end: int) -> list:
        """Cached pages overlapping ``[pos, end)`` in index order (``end`` None = to the end)."""
        pages = self._pages
        if not pages:
            return []
        first = pos >> self.page_shift
        if end is None:
            return [p for _, p in sorted(list(pages.items())) if p.index >= first]
        if end <= pos:
            return []
        last = (end - 1) >> self.page_shift
        if last - first + 1 <= len(pages):
            out = []
            for i in range(first, last + 1):
                p = pages.get(i)
                if p is not None:
                    out.append(p)
            return out
        return [p for _, p in sorted(list(pages.items())) if first <= p.index <= last]

    def has_pages(self, pos: int, end: int) -> bool:
        """Any cached page overlapping ``[pos, end)``."""
        return bool(self._pages_in(pos, end))

    def has_dirty(self, pos: int, end: int) -> bool:
        """Any dirty block overlapping ``[pos, end)``."""
        bs = self.block_size
        for page in self._pages_in(pos, end):
            if page.dirty and self._block_mask(page, pos, end, bs, outer=True) & page.dirty:
                return True
        return False

    def _block_mask(self, page: Page, pos: int, end: int, bs: int, outer: bool) -> int:
        """Blocks of ``page`` overlapping (outer) or fully inside (not outer) ``[pos, end)``."""
        lo = max(pos, page.pos) - page.pos
        hi = min(end, page.pos + self.page_size) - page.pos
        if hi <= lo:
            return 0
        if outer:
            b0, b1 = lo // bs, (hi + bs - 1) // bs
        else:
            b0, b1 = (lo + bs - 1) // bs, hi // bs
        if b1 <= b0:
            return 0
        return ((1 << (b1 - b0)) - 1) << b0

    def dirty_ranges(self) -> list[tuple[int, int]]:
        """Dirty byte ranges ``(pos, end)``, merged, in order (for tests and fsync)."""
        out: list[list[int]] = []
        bs = self.block_size
        for page in self._pages_in(0, None):
            mask = page.dirty
            b = 0
            while mask:
                if mask & 1:
                    s = page.pos + b * bs
                    if out and out[-1][1] == s:
                        out[-1][1] = s + bs
                    else:
                        out.append([s, s + bs])
                mask >>= 1
                b += 1
        return [(s, e) for s, e in out]

    # --- simple helpers (tests; callers that manage i_size themselves) ---
    def read(self, pos: int, length: int) -> bytes | None:
        """Cached bytes ``[pos, pos+length)`` if every block is uptodate, else None."""
        out = bytearray()
        bs = self.block_size
        end = pos + length
        p = pos
        while p < end:
            page = self._pages.get(p >> self.page_shift)
            if page is None:
                return None
            need = self._block_mask(page, p, end, bs, outer=True)
            if page.uptodate & need != need:
                return None
            off = p - page.pos
            n = min(end - p, self.page_size - off)
            out += page.data[off:off + n]
            p += n
        return bytes(out)

    def write(self, pos: int, data, fill=None) -> int:
        """Copy ``data`` into the cache at ``pos`` and mark it dirty (no i_size change).

        A partly written block that is not uptodate is first filled by ``fill(block_pos,
        block_size) -> bytes`` (default: zeros, i.e. "the block is a hole").
        """
        view = memoryview(data).cast("B")
        bs = self.block_size
        end = pos + len(view)
        p = pos
        while p < end:
            page = self.grab_page(p >> self.page_shift)
            try:
                n = min(end - p, page.pos + self.page_size - p)
                self._prepare_partial(page, p, p + n, fill)
                off = p - page.pos
                page.data[off:off + n] = view[p - pos:p - pos + n]
                touched = self._block_mask(page, p, p + n, bs, outer=True)
                page.uptodate |= touched
                page.dirty |= touched
            finally:
                page.lock.release()
            p += n
        self.budget.balance()
        return len(view)

    def _prepare_partial(self, page: Page, pos: int, end: int, fill) -> None:
        """Make the head/tail blocks of a write ``[pos, end)`` into a locked page uptodate."""
        bs = self.block_size
        for edge in {pos - pos % bs, (end - 1) - (end - 1) % bs}:
            if edge >= pos and edge + bs <= end:
                continue                    # fully overwritten
            bit = 1 << ((edge - page.pos) // bs)
            if page.uptodate & bit:
                continue
            off = edge - page.pos
            old = fill(edge, bs) if fill is not None else None
            page.data[off:off + bs] = old if old is not None else bytes(bs)
            page.uptodate |= bit

    # --- write-back ---
    def write_and_wait_range(self, pos: int = 0, end: int | None = None) -> None:
        """Write back every dirty block of the pages overlapping ``[pos, end)`` and wait.

        ``end`` None means to the end of the file.  Raises the first write-back error (the
        failed bytes stay dirty).
        """
        if not self._pages:
            return
        with self._wb_lock:
            self._writeback_locked(pos, end)

    filemap_write_and_wait_range = write_and_wait_range

    def _writeback_locked(self, pos: int, end: int | None) -> None:
        host = self.host
        bs = self.block_size
        runs: list[list] = []           # [file pos, bytearray]
        for page in self._pages_in(pos, end):
            if not page.dirty:
                continue
            with page.lock:
                if page.mapping is not self or not page.dirty:
                    continue
                size = host.i_size
                eof_blk_end = -(-size // bs) * bs
                if page.pos + self.page_size > size:
                    tail = max(size - page.pos, 0)
                    page.data[tail:] = bytes(self.page_size - tail)
                mask = page.dirty
                page.dirty = 0
                b = 0
                while mask:
                    if mask & 1:
                        s = page.pos + b * bs
                        if s < eof_blk_end:     # dirty data past EOF is dropped, not written
                            chunk = page.data[b * bs:(b + 1) * bs]
                            if runs and runs[-1][0] + len(runs[-1][1]) == s:
                                runs[-1][1] += chunk
                            else:
                                runs.append([s, bytearray(chunk)])
                    mask >>= 1
                    b += 1
        if not runs:
            return
        if self.a_ops is None:
            for s, data in runs:
                self._redirty(s, s + len(data))
            raise InvariantError(f"dirty pages on {host!r} but its mapping has no write-back ops")
        first_err = None
        for s, data in runs:
            done, err = writeback_run(host, self.a_ops, s, data)
            self.nr_written_back += done
            if err is not None:
                self._redirty(s + done, s + len(data))
                if first_err is None:
                    first_err = err
        if first_err is not None:
            self.wb_err = first_err
            raise first_err

    def _redirty(self, pos: int, end: int) -> None:
        bs = self.block_size
        for page in self._pages_in(pos, end):
            with page.lock:
                if page.mapping is self:
                    page.dirty |= self._block_mask(page, pos, end, bs, outer=True) & page.uptodate

    # --- invalidation ---
    def invalidate_range(self, pos: int, end: int) -> None:
        """Write back, then drop, every page overlapping ``[pos, end)``.

        Raises the injected ``fail_invalidate`` error (EBUSY is what the kernel returns), or
        EBUSY if a page was re-dirtied while this ran.
        """
        if end <= pos:
            return
        # Like invalidate_inode_pages2_range this relies on page locks only: callers may hold
        # invalidate_lock (a punch hole does), so taking it here would self-deadlock.
        if self._pages:
            with self._wb_lock:
                self._writeback_locked(pos, end)
        fail = self.fail_invalidate
        if fail is not None:
            code = fail(pos, end) if callable(fail) else fail
            if code:
                self.nr_invalidate_failures += 1
                raise from_errno(code, f"page cache invalidation of [{pos}, {end}) failed")
        busy = False
        for page in self._pages_in(pos, end):
            with page.lock:
                if page.mapping is not self:
                    continue
                if page.dirty:
                    busy = True
                    continue
                self._remove_locked(page)
        if busy:
            raise from_errno(_errno.EBUSY, f"dirty page in [{pos}, {end}) during invalidation")

    invalidate_inode_pages2_range = invalidate_range

    def truncate_pages(self, new_size: int) -> None:
        """Drop pages past ``new_size`` and zero the tail of the page holding it.

        Callers hold ``i_rwsem`` exclusive and set ``i_size`` themselves (before or after).
        Blocks wholly past ``new_size`` lose their dirty bit; the zeroed tail is uptodate.
        """
        bs = self.block_size
        for page in self._pages_in(new_size - new_size % self.page_size, None):
            with page.lock:
                if page.mapping is not self:
                    continue
                if page.pos >= new_size:
                    page.dirty = 0
                    self._remove_locked(page)
                    continue
                off = new_size - page.pos
                page.data[off:] = bytes(self.page_size - off)
                beyond = self._block_mask(page, -(-new_size // bs) * bs, page.pos + self.page_size,
                                          bs, outer=True)
                page.dirty &= ~beyond
                page.uptodate |= beyond

    truncate_pagecache = truncate_pages

    def drop_all(self) -> None:
        """Forget every page, dirty or not (inode eviction after the data is gone or synced)."""
        for page in self._pages_in(0, None):
            with page.lock:
                if page.mapping is self:
                    page.dirty = 0
                    self._remove_locked(page)

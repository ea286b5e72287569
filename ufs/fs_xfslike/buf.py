"""xfslike metadata buffer cache: one ``Buf`` per metadata block, read and verified once.

Owns: the in-memory copies of metadata blocks (``Buf``), their verification on read, the
decoded in-memory form of a block (``Buf.obj``, e.g. a B+tree node or an AG header), pin
counts, the dirty state, and a capped LRU of clean buffers.

May import: ``ufs.errors``, ``.format``.  Talks to the device only through
``pread(length, addr)`` (reads; writes of metadata go through the log, ``log.py``).

Life of a buffer (xv6's bread/log_write, XFS's xfs_buf):

    buf = cache.read(blkno, magic, owner, decode)   # verified once, then cached
    tx.log_buf(buf)                                 # pins it; before-image kept for cancel
    ... change buf.obj (or buf.data) ...
    commit                                          # obj encoded into data, image logged;
                                                    #   buf becomes dirty (in the log, not in place)
    checkpoint                                      # image written in place; buf clean again

States and rules:
- *pinned* (``pin > 0``): joined to an open transaction; never evicted, never written in place.
- *dirty*: its latest committed image is in the log but not yet in place.  Dirty buffers are
  never evicted (a re-read from the device would miss the logged change); the log's size
  bounds how many there can be.  ``mark_clean`` is called by the checkpoint.
- *clean and unpinned*: on the LRU list; evicted oldest-first when the cache holds more than
  ``cap_blocks`` buffers, skipping buffers a caller still holds a reference to (an operation
  in progress).  Pinned, dirty and held buffers count towards the cap but the cap is soft
  for them.
- ``obj`` is the authoritative content while it is set: ``seal()`` (called at commit) encodes
  it into ``data``.  ``obj = None`` forces a re-decode from ``data`` on the next ``read``
  (transaction cancel restores ``data`` and drops ``obj``).

Locking: ``cache.lock`` protects the cache's maps and LRU and is held across the device read
of a miss (so two threads never read the same block twice).  Buffer *contents* are protected
by the lock of whatever owns the block (the AG lock for AG trees, the inode lock for extent
trees), which the caller holds for the whole transaction (``tx.lock``).
"""
from __future__ import annotations

import sys
import threading
from collections import OrderedDict

from ufs.errors import CorruptError, InvariantError

from . import format as fmt

__all__ = ["Buf", "BufCache"]


class Buf:
    """One cached metadata block."""

    __slots__ = ("before", "blkno", "cache", "data", "dirty", "magic", "obj", "owner", "pin", "tx")

    def __init__(self, cache, blkno: int, data: bytearray, magic: int | None, owner: int | None):
        self.cache = cache
        self.blkno = blkno
        self.data = data            # bytearray, block_size bytes
        self.obj = None             # decoded form with encode_into(data), or None
        self.magic = magic          # None: a raw block (no DiskBlockHeader), e.g. inode clusters
        self.owner = owner
        self.pin = 0
        self.dirty = False
        self.before = None          # (data, magic, owner) before the open transaction (None: new)
        self.tx = None              # the open transaction holding it

    def seal(self) -> None:
        """Bring ``data`` up to date with ``obj`` (called at commit)."""
        if self.obj is not None:
            self.obj.encode_into(self.data)

    def __repr__(self):
        kind = fmt.MAGIC_NAMES.get(self.magic, "raw") if self.magic is not None else "raw"
        return f"<Buf {kind} blk={self.blkno} pin={self.pin} dirty={self.dirty}>"


class BufCache:
    """Cache of metadata blocks of one filesystem.

    Args:
        dev: the device (``pread(length, addr)``).
        block_size: filesystem block size in bytes.
        uuid: filesystem UUID; blocks carrying another UUID are corrupt (stale).
        cap_blocks: soft cap on cached buffers (clean ones are evicted past it).
    """

    def __init__(self, dev, block_size: int, uuid: bytes, *, cap_blocks: int = 8192):
        self.dev = dev
        self.block_size = block_size
        self.uuid = uuid
        self.cap_blocks = cap_blocks
        self.lock = threading.RLock()
        self._bufs: dict[int, Buf] = {}
        self._lru: OrderedDict[int, Buf] = OrderedDict()     # clean, unpinned
        self.reads = 0          # device reads (misses), for tests and statistics
        self.hits = 0

    def __len__(self):
        return len(self._bufs)

    # -- lookup -----------------------------------------------------------------------

    def read(self, blkno: int, magic: int | None, owner: int | None = None, decode=None) -> Buf:
        """The verified buffer of ``blkno``; ``decode(buf)`` builds ``buf.obj`` if unset.

        ``magic=None`` reads a raw block (verification is the caller's, e.g. per inode).
        Raises CorruptError when the block is not a valid ``magic`` block of this filesystem
        at ``blkno`` owned by ``owner`` (owner ``None``: any).
        """
        with self.lock:
            buf = self._bufs.get(blkno)
            if buf is not None:
                self.hits += 1
                if buf.magic != magic:
                    # A block reused as another kind must have been forgotten when freed.
                    raise CorruptError(fmt.MAGIC_NAMES.get(magic, "metadata block"),
                                       fmt.where(blkno, self.block_size),
                                       f"cached as {fmt.MAGIC_NAMES.get(buf.magic, 'raw')}")
                if owner is not None and magic is not None and buf.owner != owner:
                    raise CorruptError(fmt.MAGIC_NAMES.get(magic, "metadata block"),
                                       fmt.where(blkno, self.block_size),
                                       f"owner {buf.owner}, expected {owner}")
                if buf.blkno in self._lru:
                    self._lru.move_to_end(blkno)
            else:
                self._check_range(blkno)
                data = bytearray(self.dev.pread(self.block_size, blkno * self.block_size))
                self.reads += 1
                if magic is not None:
                    h = fmt.check_block(data, magic, blkno, self.uuid, owner, self.block_size)
                    owner = h.owner
                buf = Buf(self, blkno, data, magic, owner)
                self._bufs[blkno] = buf
                self._lru[blkno] = buf
                self._shrink()
            if buf.obj is None and decode is not None:
                buf.obj = decode(buf)
            return buf

    def get_new(self, blkno: int, magic: int | None, owner: int) -> Buf:
        """A zeroed buffer for a newly allocated block (header stamped unless raw); no read.

        The caller joins it to its transaction right away (``tx.new_buf`` does both).
        """
        with self.lock:
            self._check_range(blkno)
            old = self._bufs.get(blkno)
            if old is not None:
                if old.pin:
                    raise InvariantError(f"block {blkno} reallocated while still in use ({old!r})")
                self._drop(blkno)
            if magic is None:
                data = bytearray(self.block_size)
            else:
                data = fmt.new_block(self.block_size, magic, blkno, owner, self.uuid)
            buf = Buf(self, blkno, data, magic, owner)
            self._bufs[blkno] = buf
            return buf

    def peek(self, blkno: int) -> Buf | None:
        return self._bufs.get(blkno)

    # -- state changes (called by the log) ------------------------------------------------

    def pin(self, buf: Buf) -> None:
        with self.lock:
            buf.pin += 1
            self._lru.pop(buf.blkno, None)

    def unpin(self, buf: Buf) -> None:
        with self.lock:
            if buf.pin <= 0:
                raise InvariantError(f"unpin of unpinned {buf!r}")
            buf.pin -= 1
            self._maybe_lru(buf)

    def mark_dirty(self, buf: Buf) -> None:
        with self.lock:
            buf.dirty = True
            self._lru.pop(buf.blkno, None)

    def mark_clean(self, blkno: int) -> None:
        with self.lock:
            buf = self._bufs.get(blkno)
            if buf is not None and buf.dirty:
                buf.dirty = False
                self._maybe_lru(buf)
                self._shrink()

    def forget(self, blkno: int) -> None:
        """Drop a freed block's buffer (it may be reused as another kind or as file data)."""
        with self.lock:
            self._drop(blkno)

    def invalidate_all(self) -> None:
        """Drop every buffer (after log recovery rewrote blocks under the cache)."""
        with self.lock:
            if any(b.pin for b in self._bufs.values()):
                raise InvariantError("invalidate_all with pinned buffers")
            self._bufs.clear()
            self._lru.clear()

    # -- internals --------------------------------------------------------------------

    def _check_range(self, blkno: int) -> None:
        if blkno < 0 or (blkno + 1) * self.block_size > self.dev.size:
            raise CorruptError("block pointer", fmt.where(blkno, self.block_size), "beyond the device")

    def _drop(self, blkno: int) -> None:
        buf = self._bufs.pop(blkno, None)
        self._lru.pop(blkno, None)
        if buf is not None:
            buf.obj = None

    def _maybe_lru(self, buf: Buf) -> None:
        if buf.pin == 0 and not buf.dirty and self._bufs.get(buf.blkno) is buf:
            self._lru[buf.blkno] = buf

    def _shrink(self) -> None:
        excess = len(self._bufs) - self.cap_blocks
        if excess <= 0 or not self._lru:
            return
        victims = []
        lru = self._lru
        for blkno in lru:
            # A buffer some caller still holds (a B+tree path in the middle of an operation)
            # is not evicted: the caller may join and change it, and a second Buf for the
            # same block would then hide that change.  Held = referenced beyond the cache's
            # two maps (CPython reference count; _UNHELD_REFS is calibrated at import).
            if sys.getrefcount(lru[blkno]) <= _UNHELD_REFS:
                victims.append(blkno)
                if len(victims) >= excess:
                    break
        for blkno in victims:
            del lru[blkno]
            del self._bufs[blkno]

    def adopt(self, buf: Buf) -> None:
        """Put back a buffer that was evicted while its holder still used it (log_buf of a
        buffer no longer cached).  A clean, unpinned copy read since is replaced."""
        with self.lock:
            cur = self._bufs.get(buf.blkno)
            if cur is buf:
                return
            if cur is not None:
                if cur.pin or cur.dirty:
                    raise InvariantError(f"two buffers for block {buf.blkno}: {cur!r} and {buf!r}")
                self._lru.pop(buf.blkno, None)
            self._bufs[buf.blkno] = buf
            self._maybe_lru(buf)


def _calibrate_unheld_refs() -> int:
    """The reference count _shrink sees for a buffer only the cache's maps refer to."""
    lru = OrderedDict()
    bufs = {}
    bufs[0] = lru[0] = Buf(None, 0, bytearray(0), None, None)
    for blkno in lru:
        return sys.getrefcount(lru[blkno])
    raise AssertionError


_UNHELD_REFS = _calibrate_unheld_refs()

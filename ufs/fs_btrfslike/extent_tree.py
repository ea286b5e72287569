"""Extent tree of btrfslike: allocation, reference counts, back-references, used bytes.

Layer: personality.  Imports ``ufs.errors``, ``.format`` and ``.ctree``.

What it owns:
- ``FreeSpace``: the in-memory free-space cache (sorted free byte ranges), rebuilt at mount
  from the extent tree as the complement of the EXTENT_ITEMs and the reserved ranges.
- ``ExtentTree``: every allocated extent, data or tree block, has one EXTENT_ITEM
  ``(bytenr, EXTENT_ITEM, num_bytes)`` holding its reference count and back-references:
  * tree blocks: refs = parent pointers + tree roots pointing at the block; the one inline
    TREE_BLOCK_REF names the tree that created it (its header owner; never changes);
  * data extents: refs = EXTENT_DATA items (in physical leaves, a leaf shared by snapshots
    counting once) pointing into the extent; back-references ``(root, objectid, offset)`` with a
    count: ``root`` owns the leaf holding the item, ``objectid`` is the inode, ``offset`` the
    file position of the extent's byte 0.  The first ``INLINE_DATA_REFS`` live in the item,
    the rest in EXTENT_DATA_REF items keyed by ``extent_data_ref_hash``.

Delayed references (why): changing the extent tree copies extent-tree nodes, which changes
reference counts, which changes the extent tree.  So during a transaction every change is only
recorded in memory (``pending``: bytenr -> ``DelayedRef`` with a refs delta and back-reference
deltas), and ``run_delayed_refs`` applies them at commit, looping until no new ones appear
(each node is copied at most once per transaction, so the loop ends).  ``refs()`` answers with
the committed count plus the pending delta.

Freeing (the crash-safety rule): an extent whose count reaches 0
- that was allocated in the running transaction (never committed, nothing durable points at
  it) goes back to the free-space cache at once;
- otherwise it is *pinned*: its address stays unusable until ``unpin()``, which the
  transaction manager calls after the commit that freed it is durable.  So a block the last
  committed generation references is never overwritten.

Metadata reserve (btrfs's global block reserve): a commit copies tree nodes, so it needs free
space however full the data is.  ``alloc_data`` refuses (ENOSPC) any data allocation that would
leave less than ``meta_reserve`` bytes free; only tree blocks may use that last part, so a
commit (and so an unmount) never fails for want of space after data filled the device.
``data_avail()`` is what data may still take; statfs reports it as ``f_bavail``.

Data reservations: ``alloc_data`` reserves space with 0 references.  The reservation survives
commits (an in-flight DIO write may span one) until the first ``inc_data_ref`` or
``release_data``; after a crash an unreferenced reservation is simply free space again.

Locking: none; the transaction manager serialises callers.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right

from ufs.errors import CorruptError, InvariantError, NoSpaceError

from . import format as fmt
from .ctree import BTree
from .format import (
    EXTENT_DATA_REF,
    EXTENT_FLAG_DATA,
    EXTENT_FLAG_TREE_BLOCK,
    EXTENT_ITEM,
    DiskExtentItem,
)

__all__ = ["INLINE_DATA_REFS", "DelayedRef", "ExtentTree", "FreeSpace"]

INLINE_DATA_REFS = 4     # data back-references kept inside the EXTENT_ITEM before overflowing


class FreeSpace:
    """Free byte ranges ``[start, start + length)``, sorted, never adjacent (always merged)."""

    def __init__(self):
        self._starts = []
        self._lens = {}
        self.free_bytes = 0
        self._cursor = {}

    def __len__(self):
        return len(self._starts)

    def ranges(self):
        return [(s, self._lens[s]) for s in self._starts]

    def add(self, addr, length):
        if length <= 0:
            return
        starts, lens = self._starts, self._lens
        i = bisect_left(starts, addr)
        if i < len(starts) and starts[i] < addr + length:
            raise InvariantError(f"free space: [{addr:#x}, +{length}) overlaps {starts[i]:#x}")
        if i > 0 and starts[i - 1] + lens[starts[i - 1]] > addr:
            raise InvariantError(f"free space: [{addr:#x}, +{length}) overlaps {starts[i - 1]:#x}")
        self.free_bytes += length
        # merge with the successor, then the predecessor
        if i < len(starts) and starts[i] == addr + length:
            length += lens.pop(starts[i])
            del starts[i]
        if i > 0 and starts[i - 1] + lens[starts[i - 1]] == addr:
            lens[starts[i - 1]] += length
            return
        starts.insert(i, addr)
        lens[addr] = length

    def remove(self, addr, length):
        """Take ``[addr, addr + length)``, which must be wholly free."""
        starts, lens = self._starts, self._lens
        i = bisect_right(starts, addr) - 1
        if i < 0 or starts[i] + lens[starts[i]] < addr + length:
            raise InvariantError(f"free space: [{addr:#x}, +{length}) is not free")
        s = starts[i]
        ln = lens.pop(s)
        del starts[i]
        self.free_bytes -= length
        tail_start, tail_len = addr + length, s + ln - addr - length
        if tail_len:
            starts.insert(i, tail_start)
            lens[tail_start] = tail_len
        if addr > s:
            starts.insert(i, s)
            lens[s] = addr - s

    def contains(self, addr, length):
        i = bisect_right(self._starts, addr) - 1
        return i >= 0 and self._starts[i] + self._lens[self._starts[i]] >= addr + length

    def overlaps(self, addr, length):
        i = bisect_right(self._starts, addr + length - 1) - 1
        return i >= 0 and self._starts[i] + self._lens[self._starts[i]] > addr

    def alloc(self, length, align, kind=None, start_hint=0):
        """Allocate ``length`` bytes aligned to ``align``: first fit from ``start_hint`` when
        ``kind`` is None, else next fit from that kind's cursor (starting at ``start_hint``)."""
        starts, lens = self._starts, self._lens
        cursor = start_hint if kind is None else self._cursor.get(kind, start_hint)
        n = len(starts)
        first = max(bisect_right(starts, cursor) - 1, 0)
        for j in range(n):
            s = starts[(first + j) % n]
            ln = lens[s]
            a = max(s, cursor) if j == 0 else s
            a = -(-a // align) * align
            if a + length <= s + ln:
                self.remove(a, length)
                if kind is not None:
                    self._cursor[kind] = a + length
                return a
        if cursor:
            # The pass from the cursor started mid-range; retry that range from its start.
            if kind is not None:
                self._cursor[kind] = 0
            return self.alloc(length, align, kind, 0)
        raise NoSpaceError(f"no free extent of {length} bytes")


class DelayedRef:
    """Pending changes to one extent in the running transaction."""

    __slots__ = (
        "data_refs",
        "freed",
        "generation",
        "level",
        "new",
        "num_bytes",
        "owner",
        "refs",
        "tree_block",
    )

    def __init__(self, num_bytes, tree_block, *, new=False, refs=0, level=0, owner=0,
                 generation=0):
        self.num_bytes, self.tree_block = num_bytes, tree_block
        self.level, self.owner, self.generation = level, owner, generation
        self.refs = refs              # delta (absolute count when ``new``)
        self.data_refs = {}           # (root, objectid, offset) -> count delta
        self.new = new                # allocated in this transaction: no EXTENT_ITEM yet
        self.freed = False


class ExtentTree:
    """Reference counts of every extent, stored in the extent tree ``btree``.

    ``fs`` provides ``nodesize``, ``sectorsize``, ``total_bytes`` and ``cache``.
    """

    def __init__(self, fs, btree: BTree, bytes_used):
        self.fs = fs
        self.btree = btree
        self.bytes_used = bytes_used       # committed + applied: sum of EXTENT_ITEM sizes
        self.free = FreeSpace()
        self.pending = {}
        self.pinned = []
        self.pinned_bytes = 0          # sum of the pinned lengths
        self.nodesize = fs.nodesize
        self.sectorsize = fs.sectorsize
        # fn(bytenr, num_bytes): a data extent lost its last reference (the layer above drops
        # the extent's checksums).  Called synchronously, possibly in the middle of a tree
        # operation, so it must only record the range.
        self.on_data_freed = None
        # fn(bytenr, num_bytes): decides when a freed data extent's space may be allocated
        # again (the layer above holds it back while direct reads that may still be reading
        # it are in flight) and then calls ``free.add`` itself.  None: at once (new extents)
        # or at ``unpin`` (committed ones).
        self.data_reuse_gate = None
        self._pinned_data = set()
        # Data extents allocated in the running transaction that a durable fsync log record
        # references (tree_log.py): freeing one pins it like a committed extent, since a
        # replay after a crash would point a file at it again.  Cleared when the commit that
        # ends the log is durable.
        self.log_pinned = set()

    # ------------------------------------------------------------------ free space

    def rebuild_free_space(self):
        """Free space = device - reserved ranges - EXTENT_ITEMs (at mount)."""
        total = self.fs.total_bytes
        used = sorted([(a, ln) for a, ln in fmt.reserved_ranges(total)])
        for key, _ in self.btree.items((0, EXTENT_ITEM, 0)):
            if key[1] == EXTENT_ITEM:
                used.append((key[0], key[2]))
        used.sort()
        free = FreeSpace()
        pos = 0
        for a, ln in used:
            if a > pos:
                free.add(pos, a - pos)
            elif a < pos and a + ln > pos and (a, ln) not in fmt.reserved_ranges(total):
                raise CorruptError("extent tree", f"{a:#x}", "extents overlap")
            pos = max(pos, a + ln)
        if pos < total:
            free.add(pos, total - pos)
        self.free = free

    def unpin(self):
        """After the commit that freed them is durable: pinned extents become allocatable."""
        gate = self.data_reuse_gate
        for a, ln in self.pinned:
            if gate is not None and a in self._pinned_data:
                gate(a, ln)
            else:
                self.free.add(a, ln)
        self.pinned = []
        self.pinned_bytes = 0
        self._pinned_data.clear()

    # ------------------------------------------------------------------ committed state

    def lookup(self, bytenr):
        """``(num_bytes, DiskExtentItem)`` as committed/applied (no pending deltas), or None."""
        hit = self.btree.next_item((bytenr, EXTENT_ITEM, 0))
        if hit is None or hit[0][0] != bytenr or hit[0][1] != EXTENT_ITEM:
            return None
        key, data = hit
        return key[2], DiskExtentItem.decode(data, f"extent item {bytenr:#x}")

    def data_backrefs(self, bytenr):
        """All back-references (inline + EXTENT_DATA_REF items) of a committed data extent."""
        found = self.lookup(bytenr)
        if found is None:
            return {}
        refs = dict(found[1].data_refs)
        for _key, data in self.btree.items((bytenr, EXTENT_DATA_REF, 0), (bytenr, EXTENT_DATA_REF + 1, 0)):
            for r, c in fmt.decode_extent_data_refs(data, f"extent data ref {bytenr:#x}").items():
                refs[r] = refs.get(r, 0) + c
        return refs

    def _committed_refs(self, bytenr):
        found = self.lookup(bytenr)
        return found[1].refs if found else 0

    def refs(self, bytenr):
        """Current reference count (committed + pending)."""
        d = self.pending.get(bytenr)
        if d is not None and d.new:
            return d.refs
        return self._committed_refs(bytenr) + (d.refs if d is not None else 0)

    tree_block_refs = refs

    def _delta(self, bytenr, num_bytes, tree_block):
        d = self.pending.get(bytenr)
        if d is None:
            # No pending change: the extent must be committed, so none of it is free space.
            if self.free.overlaps(bytenr, num_bytes):
                raise InvariantError(f"reference to {bytenr:#x}+{num_bytes}, which is free space")
            d = self.pending[bytenr] = DelayedRef(num_bytes, tree_block)
        elif d.freed:
            raise InvariantError(f"extent {bytenr:#x} used after it was freed")
        return d

    # ------------------------------------------------------------------ tree blocks

    def alloc_tree_block(self, trans, owner, level):
        # First fit: metadata stays packed at the low end and freed blocks are reused as soon
        # as the commit that freed them is durable.
        addr = self.free.alloc(self.nodesize, self.nodesize)
        if addr in self.pending:
            raise InvariantError(f"allocated {addr:#x} which has pending references")
        self.pending[addr] = DelayedRef(self.nodesize, True, new=True, refs=1, level=level,
                                        owner=owner, generation=trans.transid)
        return addr

    def inc_tree_ref(self, trans, bytenr):
        self._delta(bytenr, self.nodesize, True).refs += 1

    def dec_tree_ref(self, trans, bytenr):
        """Drop one reference; returns how many remain (0: the block is freed)."""
        left = self.refs(bytenr) - 1
        d = self._delta(bytenr, self.nodesize, True)
        d.refs -= 1
        if left < 0:
            raise InvariantError(f"tree block {bytenr:#x}: reference count below 0")
        if left == 0:
            self._release(bytenr, d)
        return left

    def free_tree_block(self, trans, bytenr):
        """Drop the only reference of a block known to be unshared (no lookup)."""
        d = self._delta(bytenr, self.nodesize, True)
        d.refs -= 1
        if d.new and d.refs != 0:
            raise InvariantError(f"tree block {bytenr:#x} freed with {d.refs} refs left")
        self._release(bytenr, d)

    def _release(self, bytenr, d):
        if not d.tree_block and self.on_data_freed is not None:
            self.on_data_freed(bytenr, d.num_bytes)
        if d.new and bytenr in self.log_pinned:
            # never committed, but a log record points here: keep it until the commit
            del self.pending[bytenr]
            self.pin(bytenr, d.num_bytes, data=True)
        elif d.new:
            # Never committed: nothing durable points here; reusable now.
            del self.pending[bytenr]
            if not d.tree_block and self.data_reuse_gate is not None:
                self.data_reuse_gate(bytenr, d.num_bytes)
            else:
                self.free.add(bytenr, d.num_bytes)
        else:
            d.freed = True
            self.pin(bytenr, d.num_bytes, data=not d.tree_block)

    def pin(self, bytenr, num_bytes, data=False):
        """Keep ``[bytenr, +num_bytes)`` from reuse until ``unpin`` (the next commit)."""
        self.pinned.append((bytenr, num_bytes))
        self.pinned_bytes += num_bytes
        if data:
            self._pinned_data.add(bytenr)

    # ------------------------------------------------------------------ data extents

    @property
    def meta_reserve(self):
        """Bytes only tree blocks may use: 1/64 of the device, at least 64 nodes (a commit
        of a deep tree), at most 512 MiB (btrfs caps its global reserve there too)."""
        total = self.fs.total_bytes
        return min(max(total // 64, 64 * self.nodesize), 512 << 20, total // 4)

    def data_avail(self):
        """Bytes data allocations may still take (free space beyond the metadata reserve)."""
        return max(0, self.free.free_bytes - self.meta_reserve)

    def alloc_data(self, trans, num_bytes):
        """Reserve ``num_bytes`` (a multiple of the sector size) for data; 0 references yet.
        NoSpaceError when that would eat into the metadata reserve."""
        if num_bytes <= 0 or num_bytes % self.sectorsize:
            raise InvariantError(f"data extent of {num_bytes} bytes")
        if num_bytes > self.data_avail():
            raise NoSpaceError(f"no room for {num_bytes} bytes of data "
                               f"({self.meta_reserve} bytes are kept for metadata)")
        addr = self.free.alloc(num_bytes, self.sectorsize, "data", self.fs.total_bytes // 8)
        self.pending[addr] = DelayedRef(num_bytes, False, new=True, refs=0,
                                        generation=trans.transid)
        return addr

    def claim_data(self, trans, bytenr, num_bytes):
        """Log replay: the data extent ``[bytenr, +num_bytes)`` a log record references.  A
        committed (or already claimed) extent is left alone; otherwise its space, which must
        be free, becomes a reservation of this transaction (0 references yet)."""
        d = self.pending.get(bytenr)
        if d is not None:
            if d.tree_block or d.num_bytes != num_bytes or d.freed:
                raise CorruptError("log", f"{bytenr:#x}", "data extent conflicts with another")
            return
        found = self.lookup(bytenr)
        if found is not None:
            if found[0] != num_bytes or found[1].is_tree_block:
                raise CorruptError("log", f"{bytenr:#x}", "data extent size differs from the "
                                   "extent tree")
            return
        if not self.free.contains(bytenr, num_bytes):
            raise CorruptError("log", f"{bytenr:#x}+{num_bytes}", "data extent overlaps "
                               "allocated space")
        self.free.remove(bytenr, num_bytes)
        self.pending[bytenr] = DelayedRef(num_bytes, False, new=True, refs=0,
                                          generation=trans.transid)

    def release_data(self, trans, bytenr):
        """Give back a reservation that never got a reference."""
        d = self.pending.get(bytenr)
        if d is None or not d.new or d.tree_block or d.refs:
            raise InvariantError(f"{bytenr:#x} is not an unreferenced data reservation")
        del self.pending[bytenr]
        self.free.add(bytenr, d.num_bytes)

    def inc_data_ref(self, trans, bytenr, num_bytes, root, objectid, offset, count=1):
        d = self._delta(bytenr, num_bytes, False)
        if d.tree_block or d.num_bytes != num_bytes:
            raise InvariantError(f"data ref to {bytenr:#x}+{num_bytes} mismatches {d.num_bytes}")
        d.refs += count
        ref = (root, objectid, offset)
        d.data_refs[ref] = d.data_refs.get(ref, 0) + count

    def dec_data_ref(self, trans, bytenr, num_bytes, root, objectid, offset, count=1):
        """Drop references; returns how many remain (0: the extent is freed)."""
        left = self.refs(bytenr) - count
        d = self._delta(bytenr, num_bytes, False)
        if d.tree_block or d.num_bytes != num_bytes:
            raise InvariantError(f"data ref to {bytenr:#x}+{num_bytes} mismatches {d.num_bytes}")
        if left < 0:
            raise InvariantError(f"data extent {bytenr:#x}: reference count below 0")
        d.refs -= count
        ref = (root, objectid, offset)
        d.data_refs[ref] = d.data_refs.get(ref, 0) - count
        if left == 0:
            self._release(bytenr, d)
        return left

    def move_data_ref(self, trans, bytenr, num_bytes, old_root, new_root, objectid, offset):
        """Re-own one back-reference (a leaf changed owner); the count is unchanged."""
        d = self._delta(bytenr, num_bytes, False)
        for root, delta in ((old_root, -1), (new_root, 1)):
            ref = (root, objectid, offset)
            d.data_refs[ref] = d.data_refs.get(ref, 0) + delta

    # ------------------------------------------------------------------ commit

    def run_delayed_refs(self, trans):
        """Apply every pending change to the extent tree (repeats until none are left).

        Unreferenced data reservations stay pending (see the module docstring).
        """
        kept = {}
        while self.pending:
            bytenr, d = self.pending.popitem()
            if d.new and not d.tree_block and d.refs == 0:
                kept[bytenr] = d
                continue
            self._apply(trans, bytenr, d)
        for bytenr, d in kept.items():
            d.generation = 0
            self.pending[bytenr] = d

    def has_pending(self):
        return any(not (d.new and not d.tree_block and d.refs == 0) for d in self.pending.values())

    def _apply(self, trans, bytenr, d):
        bt = self.btree
        where = f"extent {bytenr:#x}"
        found = None if d.new else self.lookup(bytenr)
        if found is None:
            if d.freed:
                raise InvariantError(f"{where}: freed but has no EXTENT_ITEM")
            if d.refs == 0 and not any(d.data_refs.values()):
                return
            if d.refs < 0:
                raise InvariantError(f"{where}: {d.refs} references to a missing extent")
            if d.tree_block:
                item = DiskExtentItem(d.refs, d.generation or trans.transid, EXTENT_FLAG_TREE_BLOCK,
                                      level=d.level, tree_block_owner=d.owner)
            else:
                item = DiskExtentItem(d.refs, d.generation or trans.transid, EXTENT_FLAG_DATA)
                self._apply_data_refs(trans, bytenr, item, d.data_refs, where)
            bt.insert(trans, (bytenr, EXTENT_ITEM, d.num_bytes), item.encode())
            self.bytes_used += d.num_bytes
            return
        num_bytes, item = found
        if d.refs == 0 and not any(d.data_refs.values()):
            return
        if num_bytes != d.num_bytes:
            raise CorruptError("extent tree", where, f"item covers {num_bytes} bytes, "
                               f"references use {d.num_bytes}")
        item.refs += d.refs
        if item.refs < 0:
            raise InvariantError(f"{where}: reference count below 0")
        if item.refs == 0:
            bt.delete(trans, (bytenr, EXTENT_ITEM, num_bytes))
            if not item.is_tree_block:
                bt.delete_range(trans, (bytenr, EXTENT_DATA_REF, 0), (bytenr, EXTENT_DATA_REF + 1, 0))
            self.bytes_used -= num_bytes
            return
        if d.data_refs:
            self._apply_data_refs(trans, bytenr, item, d.data_refs, where)
        bt.update(trans, (bytenr, EXTENT_ITEM, num_bytes), item.encode())

    def _apply_data_refs(self, trans, bytenr, item, deltas, where):
        """Apply back-reference count deltas: inline first, EXTENT_DATA_REF items for overflow."""
        bt = self.btree
        # decrements first, so that freed inline slots can take increments
        for ref, delta in sorted(deltas.items(), key=lambda kv: kv[1]):
            if delta == 0:
                continue
            if ref in item.data_refs:
                c = item.data_refs[ref] + delta
                if c > 0:
                    item.data_refs[ref] = c
                    continue
                del item.data_refs[ref]
                if c == 0:
                    continue
                delta = c        # the rest lives in the keyed item
            hkey = (bytenr, EXTENT_DATA_REF, fmt.extent_data_ref_hash(*ref))
            raw = bt.lookup(hkey)
            keyed = fmt.decode_extent_data_refs(raw, where) if raw is not None else {}
            if ref in keyed or delta < 0:
                c = keyed.get(ref, 0) + delta
                if c < 0:
                    raise InvariantError(f"{where}: back-reference {ref} count below 0")
                if c:
                    keyed[ref] = c
                else:
                    keyed.pop(ref, None)
            elif len(item.data_refs) < INLINE_DATA_REFS:
                item.data_refs[ref] = delta
                continue
            else:
                keyed[ref] = delta
            if keyed:
                bt.put(trans, hkey, fmt.encode_extent_data_refs(keyed))
            elif raw is not None:
                bt.delete(trans, hkey)

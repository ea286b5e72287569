"""xfslike free-space management: allocation groups, two free-space B+trees, AGFL, busy extents.

Owns: per-AG free space -- the by-block tree (``bnobt``: start -> length), the by-size tree
(``cntbt``: (length, start)), the AG header's counters (free blocks, longest free extent,
tree roots/levels) and its reserved free list (AGFL) from which both trees take their own
node blocks; busy extents (freed blocks that must not be reused for file data before the
freeing transaction is durable); the mkfs-time layout of every AG, of the log and of the
superblock copies (``mkfs_metadata``); and ``Metadata``, the bundle a mount builds
(superblock, cache, log, allocator) that later layers build on.

May import: ``ufs.errors``, ``.format``, ``.buf``, ``.log``, ``.btree``.

Block numbers: ``*_blk`` are filesystem-global (``agno * ag_blk + agbno``), ``*_agbno``
AG-relative.  An allocation never crosses an AG.

Invariants (``check()`` verifies them):
- the two trees hold the same set of extents; extents never overlap or touch (touching
  extents are always coalesced); none covers the AG's fixed headers (or the log in AG 0),
  an AGFL block, or a tree node;
- ``free_blk`` = sum of extent lengths, ``longest_free_blk`` = the largest;
- the AGFL holds between ``need`` and ``AGFL_SLOTS - reserve`` blocks after every operation,
  where ``need`` covers the worst-case node splits of one allocation or free in both trees
  and ``reserve`` the worst-case node frees (``_fix_freelist`` keeps it there first);
- allocations leave ``need + 3`` blocks free in the trees, so refilling the AGFL never runs
  out of space in the middle of an operation (frees need no reserve: they add space).

Errors: no AG has ``min_len`` contiguous free blocks -> NoSpaceError; freeing a range that
overlaps free space, an AGFL block, the headers, or runs out of the AG -> CorruptError.

Locking: one ``threading.Lock`` per AG, taken through ``tx.lock`` (so it is held until the
transaction commits, like XFS's AGF buffer lock).  AGs are locked in ascending order: an
allocation that already holds AG n only tries AGs >= n.
"""
from __future__ import annotations

import threading

from ufs.errors import CorruptError, InvalidError, InvariantError, NoSpaceError

from . import format as fmt
from .btree import Btree, Node
from .buf import BufCache
from .log import Log, mkfs_log

__all__ = ["AllocGroup", "Allocator", "Metadata", "mkfs_ag", "mkfs_metadata"]


def _agfl_bounds(levels: int) -> tuple[int, int]:
    """(need, high) for the AGFL given the taller tree's level.

    One allocation: bnobt update + insert, cntbt delete + two inserts: at most 3 split
    cascades of ``levels + 2`` blocks each.  One free: up to 4 deletes whose merges give
    back ``levels + 1`` blocks each.
    """
    need = 3 * (levels + 2)
    high = fmt.AGFL_SLOTS - 4 * (levels + 1)
    if high < need + 2:
        raise InvariantError(f"free-space trees of level {levels} exceed what the AGFL can cover")
    return need, high


class _TreeRoot:
    """Root holder of one AG tree: the fields live in the AG header."""

    __slots__ = ("ag", "which")

    def __init__(self, ag: AllocGroup, which: str):
        self.ag = ag
        self.which = which

    @property
    def root_blk(self) -> int:
        return getattr(self.ag.header(), f"{self.which}_root_blk")

    @property
    def level(self) -> int:
        return getattr(self.ag.header(), f"{self.which}_level")

    def set_root(self, tx, root_blk: int, level: int) -> None:
        agh = self.ag.header(tx)
        setattr(agh, f"{self.which}_root_blk", root_blk)
        setattr(agh, f"{self.which}_level", level)


class AllocGroup:
    """One allocation group's free space.  Methods taking ``tx`` lock the AG for it."""

    def __init__(self, allocator: Allocator, agno: int):
        self.allocator = allocator
        self.cache = allocator.cache
        self.agno = agno
        sb = allocator.sb
        self.start_blk = agno * sb.ag_blk
        self.length_blk = sb.ag_length_blk(agno)
        self.first_free_agbno = (sb.log_start_blk + sb.log_nblocks) if agno == 0 else fmt.AG_FIRST_FREE_AGBNO
        # Blocks that are never free space: superblock + AG header, and the log in AG 0.  (The
        # initial tree roots at agbno 2..4 are ordinary blocks once the trees move them.)
        self.fixed = [(0, fmt.AGH_AGBNO + 1)]
        if agno == 0:
            self.fixed.append((sb.log_start_blk, sb.log_start_blk + sb.log_nblocks))
        self.fixed_blk = sum(e - s for s, e in self.fixed)
        self.agh_blk = self.start_blk + fmt.AGH_AGBNO
        self.lock = threading.Lock()
        self.bno = Btree(self.cache, fmt.BNOBT, agno, _TreeRoot(self, "bno"), self._node_alloc,
                         self._node_free)
        self.cnt = Btree(self.cache, fmt.CNTBT, agno, _TreeRoot(self, "cnt"), self._node_alloc,
                         self._node_free)
        # Busy extents: [agbno, len_blk, commit seq or None while the freeing tx is open].
        self.busy: list[list] = []

    # -- header -----------------------------------------------------------------------

    def _decode_agh(self, buf):
        agh = fmt.DiskAgHeader.decode(buf.data, buf.blkno)
        if agh.agno != self.agno or agh.length_blk != self.length_blk:
            raise CorruptError("AG header", fmt.where(buf.blkno, self.cache.block_size),
                               f"describes AG {agh.agno} of {agh.length_blk} blocks")
        return agh

    def header(self, tx=None) -> fmt.DiskAgHeader:
        """The decoded AG header; with ``tx`` it is joined to the transaction for change."""
        buf = self.cache.read(self.agh_blk, fmt.AGH_MAGIC, self.agno, self._decode_agh)
        if tx is not None:
            tx.log_buf(buf)
        return buf.obj

    def lock_for(self, tx) -> None:
        if not tx.holds(self.lock):
            tx.lock(self.lock)

    # -- AGFL: the trees' own node blocks ----------------------------------------------

    def _node_alloc(self, tx) -> int:
        agh = self.header(tx)
        if not agh.agfl:
            raise InvariantError(f"AG {self.agno}: AGFL empty during a tree update")
        return self.start_blk + agh.agfl.pop()

    def _node_free(self, tx, blkno: int) -> None:
        agh = self.header(tx)
        if len(agh.agfl) >= fmt.AGFL_SLOTS:
            raise InvariantError(f"AG {self.agno}: AGFL full during a tree update")
        agh.agfl.append(blkno - self.start_blk)

    def _fix_freelist(self, tx) -> None:
        agh = self.header(tx)
        need, high = _agfl_bounds(max(agh.bno_level, agh.cnt_level))
        target = (need + high) // 2
        while len(agh.agfl) < need:
            want = target - len(agh.agfl)
            last = self.cnt.last()
            if last is None:
                raise NoSpaceError(f"AG {self.agno}: no space left to refill the AGFL")
            flen, fstart = last
            take = min(want, flen)
            self._remove_free(tx, fstart, take, (fstart, flen))
            agh.agfl.extend(range(fstart, fstart + take))
            agh.free_blk -= take
            need, high = _agfl_bounds(max(agh.bno_level, agh.cnt_level))
        while len(agh.agfl) > high:
            agbno = agh.agfl.pop(0)
            self._insert_free(tx, agbno, 1)
            agh.free_blk += 1
            need, high = _agfl_bounds(max(agh.bno_level, agh.cnt_level))
        self._update_longest(agh)

    def _update_longest(self, agh) -> None:
        last = self.cnt.last()
        agh.longest_free_blk = last[0] if last else 0

    # -- tree edits (AG locked, freelist fixed) ----------------------------------------

    def _remove_free(self, tx, agbno: int, len_blk: int, rec) -> None:
        """Take [agbno, agbno+len) out of the free extent ``rec`` = (start, len)."""
        fstart, flen = rec
        left = agbno - fstart
        right = fstart + flen - (agbno + len_blk)
        if left < 0 or right < 0:
            raise InvariantError("allocation outside its free extent")
        self.cnt.delete(tx, (flen, fstart))
        if left:
            self.bno.update(tx, (fstart, left))
            self.cnt.insert(tx, (left, fstart))
        else:
            self.bno.delete(tx, fstart)
        if right:
            self.bno.insert(tx, (agbno + len_blk, right))
            self.cnt.insert(tx, (right, agbno + len_blk))

    def _insert_free(self, tx, agbno: int, len_blk: int) -> None:
        """Add [agbno, agbno+len) to free space, coalescing; CorruptError on overlap."""
        end = agbno + len_blk
        loc = f"AG {self.agno} blocks [{agbno}, {end})"
        if self._hits_fixed(agbno, end) or end > self.length_blk or len_blk <= 0:
            raise CorruptError("free extent", loc, "outside the AG's free area")
        left = self.bno.lookup_le(agbno)
        if left is not None and left[0] + left[1] > agbno:
            raise CorruptError("free extent", loc, f"overlaps free extent {left} (double free)")
        right = self.bno.lookup_ge(agbno)
        if right is not None and right[0] < end:
            raise CorruptError("free extent", loc, f"overlaps free extent {right} (double free)")
        agfl = self.header().agfl
        for b in agfl:
            if agbno <= b < end:
                raise CorruptError("free extent", loc, f"overlaps AGFL block {b}")
        nstart, nlen = agbno, len_blk
        if left is not None and left[0] + left[1] == agbno:
            self.cnt.delete(tx, (left[1], left[0]))
            nstart, nlen = left[0], nlen + left[1]
        if right is not None and right[0] == end:
            self.cnt.delete(tx, (right[1], right[0]))
            self.bno.delete(tx, right[0])
            nlen += right[1]
        if nstart == agbno:
            self.bno.insert(tx, (nstart, nlen))
        else:
            self.bno.update(tx, (nstart, nlen))
        self.cnt.insert(tx, (nlen, nstart))
        self._mark_busy(tx, agbno, len_blk)

    def _hits_fixed(self, agbno: int, end: int) -> bool:
        return agbno < 0 or any(agbno < fe and fs < end for fs, fe in self.fixed)

    def _mark_busy(self, tx, agbno: int, len_blk: int) -> None:
        entry = [agbno, len_blk, None]
        self.busy.append(entry)

        def committed(seq, entry=entry):
            entry[2] = seq

        def aborted(entry=entry, busy=self.busy):
            if entry in busy:
                busy.remove(entry)
        tx.on_commit(committed)
        tx.on_abort(aborted)

    # -- allocation --------------------------------------------------------------------

    def _pick(self, near_agbno: int, min_len: int, max_len: int):
        """(agbno, len, free extent) of the best candidate, or None."""
        # 1. Right at the hint: the extent containing it, from the hint on.
        rec = self.bno.lookup_le(near_agbno)
        if rec is not None and rec[0] + rec[1] - near_agbno >= min_len:
            return near_agbno, min(max_len, rec[0] + rec[1] - near_agbno), rec
        # 2. The first extent after the hint that holds max_len.
        for rec in self.bno.iterate(near_agbno, near_agbno + 4 * max(max_len, 64)):
            if rec[1] >= max_len:
                return rec[0], max_len, rec
        # 3. The smallest extent that holds max_len (best fit), else the largest one.
        c = self.cnt.lookup_ge((max_len, 0))
        if c is None:
            c = self.cnt.last()
        if c is None or c[0] < min_len:
            return None
        return c[1], min(max_len, c[0]), (c[1], c[0])

    def _busy_conflicts(self, agbno: int, len_blk: int) -> list:
        end = agbno + len_blk
        return [b for b in self.busy if b[0] < end and agbno < b[0] + b[1]]

    def alloc(self, tx, near_agbno: int, min_len: int, max_len: int, userdata: bool):
        """Allocate in this AG; (agbno, len) or None when it has no fitting extent."""
        self.lock_for(tx)
        agh = self.header(tx)
        # Keep a reserve so the AGFL can always be refilled, even if this allocation makes
        # a tree one level taller (``need`` grows by 3 per level): then the refills below
        # cannot run out of space half-way through.
        need, _ = _agfl_bounds(max(agh.bno_level, agh.cnt_level))
        avail = agh.free_blk - (need + 3)
        if agh.longest_free_blk < min_len or avail < min_len:
            return None
        max_len = min(max_len, avail)
        self._fix_freelist(tx)
        near_agbno = min(max(near_agbno, self.first_free_agbno), self.length_blk - 1)
        pick = self._pick(near_agbno, min_len, max_len)
        if pick is None:
            return None
        agbno, len_blk, rec = pick
        if userdata:
            pick = self._avoid_busy(tx, agbno, len_blk, rec, min_len, max_len)
            if pick is None:
                return None
            agbno, len_blk, rec = pick
        self._remove_free(tx, agbno, len_blk, rec)
        agh.free_blk -= len_blk
        self._update_longest(agh)
        self._fix_freelist(tx)
        return agbno, len_blk

    def _avoid_busy(self, tx, agbno, len_blk, rec, min_len, max_len):
        """File data must not land on blocks whose free is not durable yet.

        Blocks freed by committed transactions: force the log (XFS's busy-extent reuse
        with a log force).  Blocks freed by this still-open transaction: take another
        piece of free space clear of them.
        """
        if len(self.busy) > 256:
            self.prune_busy()
        mine = sorted((b[0], b[0] + b[1]) for b in self.busy if b[2] is None)
        if mine and any(bs_ < agbno + len_blk and agbno < be for bs_, be in mine):
            pick = None
            for frec in self.bno.iterate():
                s, e = frec[0], frec[0] + frec[1]
                cur = s
                for bs_, be in mine:
                    if be <= cur:
                        continue
                    if bs_ >= e:
                        break
                    if bs_ - cur >= min_len:
                        pick = (cur, min(max_len, bs_ - cur), frec)
                        break
                    cur = max(cur, be)
                if pick is None and e - cur >= min_len:
                    pick = (cur, min(max_len, e - cur), frec)
                if pick is not None:
                    break
            if pick is None:
                return None
            agbno, len_blk, rec = pick
        seqs = [b[2] for b in self._busy_conflicts(agbno, len_blk) if b[2] is not None]
        if seqs:
            self.allocator.log.force(max(seqs))
            self.busy[:] = [b for b in self.busy if b[2] is None or b[2] > max(seqs)]
        return agbno, len_blk, rec

    def free(self, tx, agbno: int, len_blk: int) -> None:
        self.lock_for(tx)
        agh = self.header(tx)
        self._fix_freelist(tx)
        self._insert_free(tx, agbno, len_blk)
        agh.free_blk += len_blk
        self._update_longest(agh)
        self._fix_freelist(tx)

    def prune_busy(self) -> None:
        log = self.allocator.log
        self.busy[:] = [b for b in self.busy if b[2] is None or not log.is_durable(b[2])]

    # -- verification ------------------------------------------------------------------

    def check(self) -> dict:
        """Verify this AG's free space; return {'free_blk', 'extents', 'agfl'}."""
        agh = self.header()
        loc = f"AG {self.agno}"
        nb = self.bno.check()
        nc = self.cnt.check()
        by_bno = list(self.bno.iterate())
        by_cnt = sorted((s, l) for l, s in self.cnt.iterate())
        if nb != nc or by_bno != by_cnt:
            raise CorruptError("free-space trees", loc, "by-block and by-size trees differ")
        total = 0
        prev_end = -1
        longest = 0
        for s, l in by_bno:
            if l <= 0 or self._hits_fixed(s, s + l) or s + l > self.length_blk:
                raise CorruptError("free extent", f"{loc} block {s}", f"bad extent ({s}, {l})")
            if s <= prev_end:
                raise CorruptError("free extent", f"{loc} block {s}", "overlapping or uncoalesced")
            prev_end = s + l
            total += l
            longest = max(longest, l)
        if total != agh.free_blk or longest != agh.longest_free_blk:
            raise CorruptError("AG header", loc, f"counters free={agh.free_blk} longest={agh.longest_free_blk}, "
                               f"trees say {total}/{longest}")
        agfl = set(agh.agfl)
        if len(agfl) != len(agh.agfl):
            raise CorruptError("AGFL", loc, "duplicate entries")
        for s, l in by_bno:
            for b in agfl:
                if s <= b < s + l:
                    raise CorruptError("AGFL", loc, f"block {b} is also free space")
        return {"free_blk": total, "extents": nb, "agfl": len(agfl)}


class Allocator:
    """Free space of the whole filesystem: the AGs and AG choice."""

    def __init__(self, cache: BufCache, log: Log, sb: fmt.DiskSuperblock):
        self.cache = cache
        self.log = log
        self.sb = sb
        self.ags = [AllocGroup(self, agno) for agno in range(sb.ag_count)]

    def ag_of(self, blkno: int) -> tuple[int, int]:
        agno, agbno = divmod(blkno, self.sb.ag_blk)
        if agno >= self.sb.ag_count or blkno >= self.sb.total_blk:
            raise CorruptError("block number", f"block {blkno}", "beyond the filesystem")
        return agno, agbno

    def alloc(self, tx, near_blk: int, min_len: int, max_len: int, *,
              userdata: bool = False) -> tuple[int, int]:
        """Allocate ``min_len <= len <= max_len`` contiguous blocks near ``near_blk``.

        Returns ``(start_blk, len_blk)``.  Tries the hint's AG first, then the following AGs,
        then (unless the transaction already holds a higher AG) the lower ones.  ``userdata``
        allocations never return blocks whose free is not yet durable (see ``_avoid_busy``).
        Raises NoSpaceError when no AG can satisfy ``min_len``.
        """
        if min_len <= 0 or max_len < min_len:
            raise InvariantError(f"alloc({min_len}, {max_len})")
        max_len = min(max_len, self.sb.ag_blk)
        if near_blk >= self.sb.total_blk:
            near_blk = 0
        start_ag, near_agbno = divmod(near_blk, self.sb.ag_blk)
        held = [ag.agno for ag in self.ags if tx.holds(ag.lock)]
        floor = max(held) if held else 0
        order = list(range(start_ag, self.sb.ag_count)) + list(range(start_ag))
        for agno in order:
            if agno < floor:
                continue
            ag = self.ags[agno]
            if not tx.holds(ag.lock) and ag.header().longest_free_blk < min_len:
                continue                       # racy peek; alloc() re-checks under the lock
            got = ag.alloc(tx, near_agbno if agno == start_ag else 0, min_len, max_len, userdata)
            if got is not None:
                return ag.start_blk + got[0], got[1]
        raise NoSpaceError(f"no {min_len} contiguous free blocks")

    def free(self, tx, start_blk: int, len_blk: int) -> None:
        """Return ``[start_blk, start_blk + len_blk)`` (inside one AG) to free space."""
        agno, agbno = self.ag_of(start_blk)
        if len_blk <= 0 or agbno + len_blk > self.ags[agno].length_blk:
            raise CorruptError("free extent", f"block {start_blk}", f"length {len_blk} runs out of AG {agno}")
        self.ags[agno].free(tx, agbno, len_blk)

    def avail_blocks(self) -> int:
        """Blocks file data can still be given: per AG, the tree free space beyond what
        ``AllocGroup.alloc`` keeps back for AGFL refills (AGFL blocks never hold data).
        Delayed-allocation reservations are checked against this, not ``free_blocks``."""
        total = 0
        for ag in self.ags:
            agh = ag.header()
            need, _ = _agfl_bounds(max(agh.bno_level, agh.cnt_level))
            total += max(0, agh.free_blk - (need + 3))
        return total

    def free_blocks(self) -> int:
        """Free blocks for statfs: the trees plus the AGFLs (they are free, only reserved)."""
        total = 0
        for ag in self.ags:
            agh = ag.header()
            total += agh.free_blk + len(agh.agfl)
        return total

    def check(self) -> int:
        """Verify every AG; return the free block count of the trees."""
        return sum(ag.check()["free_blk"] for ag in self.ags)


# --- mkfs --------------------------------------------------------------------------------

def _node_block(geo, schema, blkno, owner, uuid, items) -> bytes:
    data = fmt.new_block(geo.block_size, schema.magic, blkno, owner, uuid)
    Node(schema, 0, list(items), None).encode_into(data)
    fmt.set_block_crc(data)
    return bytes(data)


def mkfs_ag(dev, geo: fmt.Geometry, uuid: bytes, agno: int) -> fmt.DiskAgHeader:
    """Write AG ``agno``'s header and empty-but-one-extent trees directly (no log).

    The AGFL is pre-filled from the start of the free area; the rest of the AG (past the
    fixed headers, and past the log in AG 0) is one free extent.  The superblock copy at
    agbno 0 is written by ``mkfs_metadata``.
    """
    bs = geo.block_size
    start = agno * geo.ag_blk
    length = geo.ag_length_blk(agno)
    first = geo.ag_first_free_agbno(agno)
    need, high = _agfl_bounds(0)
    nagfl = (need + high) // 2
    if length - first <= nagfl:
        raise InvalidError(f"AG {agno} too small")
    agfl = list(range(first, first + nagfl))
    free_start = first + nagfl
    free_len = length - free_start
    agh = fmt.DiskAgHeader(agno=agno, length_blk=length, free_blk=free_len, longest_free_blk=free_len,
                           bno_root_blk=start + fmt.BNO_ROOT_AGBNO, cnt_root_blk=start + fmt.CNT_ROOT_AGBNO,
                           ino_root_blk=start + fmt.INO_ROOT_AGBNO, agfl=agfl)
    data = fmt.new_block(bs, fmt.AGH_MAGIC, start + fmt.AGH_AGBNO, agno, uuid)
    agh.encode_into(data)
    fmt.set_block_crc(data)
    dev.pwrite(bytes(data), (start + fmt.AGH_AGBNO) * bs)
    dev.pwrite(_node_block(geo, fmt.BNOBT, start + fmt.BNO_ROOT_AGBNO, agno, uuid, [(free_start, free_len)]),
               (start + fmt.BNO_ROOT_AGBNO) * bs)
    dev.pwrite(_node_block(geo, fmt.CNTBT, start + fmt.CNT_ROOT_AGBNO, agno, uuid, [(free_len, free_start)]),
               (start + fmt.CNT_ROOT_AGBNO) * bs)
    dev.pwrite(_node_block(geo, fmt.INOBT, start + fmt.INO_ROOT_AGBNO, agno, uuid, []),
               (start + fmt.INO_ROOT_AGBNO) * bs)
    return agh


def mkfs_metadata(dev, geo: fmt.Geometry, *, uuid: bytes | None = None, label: bytes = b"",
                  root_ino: int = 0) -> fmt.DiskSuperblock:
    """Lay out an empty xfslike filesystem's metadata on ``dev``: log, every AG, superblock
    and its copies (written last, after a flush, so a half-made image has no valid primary).

    Inodes and the root directory are the inode layer's (it sets ``root_ino`` afterwards
    through a logged superblock update or passes it here).
    """
    if geo.total_blk * geo.block_size > dev.size:
        raise InvalidError(f"geometry of {geo.total_blk} blocks exceeds the device")
    if geo.block_size % dev.logical_block_size:
        raise InvalidError(f"block size {geo.block_size} is not a multiple of the device's "
                            f"logical block size {dev.logical_block_size}")
    sb = geo.superblock(uuid, label)
    sb.root_ino = root_ino
    mkfs_log(dev, geo.block_size, geo.log_start_blk, geo.log_nblocks, sb.uuid)
    free = 0
    for agno in range(geo.ag_count):
        agh = mkfs_ag(dev, geo, sb.uuid, agno)
        free += agh.free_blk + len(agh.agfl)
    sb.free_blk = free
    sb.state = fmt.SB_STATE_CLEAN
    dev.flush()
    for agno in range(geo.ag_count - 1, -1, -1):       # primary last
        dev.pwrite(sb.encode(agno), sb.sb_blkno(agno) * geo.block_size)
    dev.flush()
    return sb


def read_superblock(dev, *, agno: int = 0, block_size: int | None = None,
                    ag_blk: int | None = None) -> fmt.DiskSuperblock:
    """Read and verify the primary superblock (or the copy in ``agno``, which needs the
    geometry from elsewhere: ``block_size`` and ``ag_blk``)."""
    if agno == 0:
        probe = max(fmt.MIN_BLOCK_SIZE, dev.logical_block_size)
        head = dev.pread(probe, 0)
        bs = int.from_bytes(head[fmt.SB.table[4][0]:fmt.SB.table[4][0] + 4], "little")
        if not (fmt.MIN_BLOCK_SIZE <= bs <= fmt.MAX_BLOCK_SIZE) or bs & (bs - 1):
            fmt.check_block(head, fmt.SB_MAGIC, 0, None, 0, probe)   # reports magic/CRC first
            raise CorruptError("superblock", "block 0 (byte 0)", f"bad block size {bs}")
        return fmt.DiskSuperblock.decode(dev.pread(bs, 0), 0)
    if block_size is None or ag_blk is None:
        raise InvariantError("reading a superblock copy needs block_size and ag_blk")
    blkno = agno * ag_blk
    return fmt.DiskSuperblock.decode(dev.pread(block_size, blkno * block_size), agno, blkno)


class Metadata:
    """What a mount of xfslike builds first: superblock, buffer cache, recovered log,
    allocator.  The inode/directory layer builds on it.

    ``Metadata.open(dev)`` reads and verifies the superblock, replays the log and returns
    the bundle; ``close()`` checkpoints the log and writes the superblock clean.
    """

    def __init__(self, dev, sb: fmt.DiskSuperblock, *, cap_blocks: int = 8192, read_only: bool = False):
        self.dev = dev
        self.sb = sb
        self.read_only = read_only
        self.cache = BufCache(dev, sb.block_size, sb.uuid, cap_blocks=cap_blocks)
        self.log = Log(dev, self.cache, sb.log_start_blk, sb.log_nblocks)
        self.alloc = Allocator(self.cache, self.log, sb)
        self.replayed = 0

    @classmethod
    def open(cls, dev, *, cap_blocks: int = 8192, read_only: bool = False) -> Metadata:
        sb = read_superblock(dev)
        sb.check_features(read_only)
        if sb.total_blk * sb.block_size > dev.size:
            raise CorruptError("superblock", "block 0 (byte 0)", "filesystem larger than the device")
        md = cls(dev, sb, cap_blocks=cap_blocks, read_only=read_only)
        md.replayed = md.log.recover()
        if md.replayed:
            # The log may have rewritten the superblock (e.g. root_ino): read it again.  The
            # geometry cannot change through the log, so the objects built on it stay valid.
            md.sb = md.alloc.sb = read_superblock(dev)
        if not read_only:
            # Mark the filesystem dirty (mounted) before any transaction.
            md.sb.state &= ~fmt.SB_STATE_CLEAN
            md.sb.mount_generation += 1
            dev.pwrite(md.sb.encode(0), 0, fua=True)
        return md

    def transaction(self, sync: bool = False):
        return self.log.transaction(sync)

    def log_superblock(self, tx) -> fmt.DiskSuperblock:
        """Join the primary superblock to ``tx``; change the returned ``self.sb`` in place
        (e.g. ``root_ino``) and the change is logged with the transaction."""
        buf = self.cache.read(0, fmt.SB_MAGIC, 0, self._sb_obj)
        if buf.tx is not tx:
            tx.log_buf(buf)
            tx.on_abort(lambda: self._sb_obj(buf))      # bytes restored first, then this
        return buf.obj

    def _sb_obj(self, buf) -> fmt.DiskSuperblock:
        # The buffer's obj is self.sb itself; re-decoding (after a cancel) reloads its fields
        # from the restored bytes, so self.sb never keeps a cancelled change.
        self.sb.load_body(buf.data)
        return self.sb

    def close(self) -> None:
        """Checkpoint everything and write the superblock clean with fresh summary counters."""
        if self.read_only:
            return
        self.log.checkpoint()
        self.sb.free_blk = self.alloc.free_blocks()
        self.sb.state |= fmt.SB_STATE_CLEAN
        self.dev.pwrite(self.sb.encode(0), 0, fua=True)

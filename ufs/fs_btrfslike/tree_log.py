"""The fsync log of btrfslike: fsync of one inode without a transaction commit.

Layer: personality.  Imports ``ufs.errors``, ``.format`` and ``.inode`` (the file extent
helpers).  ``TreeLog`` (log space and records) is used by ``transaction.py``; ``sync_inode``
and ``replay`` by ``file.py`` / ``super.py``.

Why: a transaction commit rewrites every dirty path of every tree plus each superblock copy
(three serial FUA writes and a flush).  An fsync only has to make *one inode* durable, so it
writes what that inode needs (SPEC.md section 10) as one **log record** and costs two device
round trips: a cache flush (the data the record points at, written by DIO, becomes durable
first) and one FUA write of the record.  For a checksummed inode it costs one: the record
carries the checksum of every data sector it points at (``LOG_VERIFY_DATA``), so it is written
first and one flush makes record and data durable together; mount verifies those sectors and
treats a mismatch (record durable, data not: a crash before the flush) as the end of the log.

The log (btrfs's log tree, reshaped as a chain of records):
- every commit of generation ``G`` allocates a log area for transaction ``G + 1`` and names its
  first record address (``log_root``) and a fresh random ``log_id`` in the superblock; a full
  commit therefore drops the previous log (its records carry another ``log_id``/``transid``);
- a record repeats fsid, ``log_id``, ``transid``, its own address and a sequence number, and
  names the address of the next record (chosen when it is written: always space this log has
  already reserved, at least one sector).  A record that does not fit the rest of the log area
  goes to a new area, and a one-sector *jump* record (no entries) is written at the promised
  address.  Mount follows the chain from ``log_root`` while records verify and replays them in
  order (``replay``), then commits, which drops the log;
- log space and the data extents a record references are kept from reuse until the commit
  that ends the log is durable (``ExtentTree.log_pinned``; the areas go to the pinned list at
  commit, or wait for in-flight log writes);
- replay starts from the committed generation every time, so a crash during replay (before
  its commit's superblock) replays again from scratch: idempotent.  Log areas and the data
  extents the records reference are claimed from free space before anything is replayed, so
  replay's own tree blocks cannot overwrite them.

What a record holds for an inode (``_log_entries``): the ranges of file extent items changed
in the running transaction since the inode was last logged (a DROP of each range then its
current items, clipped to it), the checksums of the sectors those items reference, every
xattr, for an inode created in this transaction its names (DIR_INDEX payloads + INODE_REF),
and finally its INODE_ITEM as the tree holds it.  Replaying records in order reproduces the
inode as it was at the last fsync.

Falls back to a full commit (``FALLBACK_REASONS``): no usable log (after mkfs until the first
commit, after a failed log write, no space for a log area), not a regular file, a name of the
inode changed in this transaction (link, unlink, rename as source or target), a new inode
whose parent directory is new or lost an entry in this transaction, an inline extent, a record
too large, the log or the running transaction too large.

Locks: ``TreeLog.lock`` (one log writer at a time: a record's predecessor must be durable
before it returns) → ``tm.lock`` (held while gathering and placing a record, released for
the device I/O).  Commits run under ``tm.lock`` only; a log write in flight during a commit
keeps its (now dead) area from reuse until it finishes (``inflight``/``retired``).
"""
from __future__ import annotations

import os
import stat as _stat
import threading
from collections import Counter

from ufs.errors import CorruptError, NoSpaceError

from . import format as fmt
from .format import (
    DIR_INDEX,
    DIR_ITEM,
    EXTENT_DATA,
    FILE_EXTENT_INLINE,
    FILE_EXTENT_REG,
    INODE_ITEM,
    INODE_REF,
    LOG_CSUM,
    LOG_DEL_TYPE,
    LOG_DROP,
    LOG_EXTENT,
    LOG_INODE,
    LOG_NAME,
    LOG_PUT,
    XATTR_ITEM,
    DiskCsumItem,
    DiskFileExtent,
    DiskInodeItem,
    DiskLogRecord,
    LogEntry,
)

__all__ = ["FALLBACK_REASONS", "TreeLog", "read_log", "replay", "sync_inode"]


def _inode_helpers():
    # imported late: transaction.py imports this module and must not need the VFS layer
    from . import inode
    return inode

LOG_AREA_MAX = 4 << 20          # bytes reserved per log area (smaller on small devices)
LOG_BYTES_MAX = 64 << 20        # a log this large makes the next fsync commit instead
LOG_RECORD_SOFT_MAX = 4 << 20   # a record this large: commit instead
DIRTY_NODES_MAX = 4096          # dirty tree nodes in the running transaction: commit instead
MAX_RECORDS = 1 << 20           # mount stops following a chain after this many records
VERIFY_DATA = True              # checksummed inodes: record then one flush (LOG_VERIFY_DATA)

FALLBACK_REASONS = ("notreelog", "no log", "not a regular file", "name changed", "new parent",
                    "parent lost an entry", "inline extent", "record too large", "log full",
                    "transaction too large", "space pinned", "orphan")


class TreeLog:
    """The log of the running transaction: its areas, the next record's address, counters.

    Owned by the ``TransactionManager`` (``tm.log``); every method runs under ``tm.lock``.
    """

    def __init__(self, tm):
        self.tm = tm
        self.lock = threading.Lock()
        ss = tm.sectorsize
        self.area_bytes = max(4 * ss, min(LOG_AREA_MAX, tm.total_bytes // 64 // ss * ss))
        self.inflight = 0           # placed records whose write has not finished
        self.retired = []           # areas of dead logs waiting for ``inflight`` to reach 0
        self.stats = Counter()      # syncs, records, jumps, bytes, fallback:<reason>
        self._reset(tm.sb.log_root, tm.sb.log_id, tm.sb.generation + 1, [])
        self._next = None

    def _reset(self, root, log_id, transid, areas):
        self.root, self.log_id, self.transid = root, log_id, transid
        self.areas = areas          # [(addr, length)] reserved for this log
        self.cur = root             # where the next record goes (promised by its predecessor)
        self.avail_end = root + sum(ln for a, ln in areas if a == root)
        self.seq = 0
        self.bytes = 0
        self.usable = bool(root) and bool(areas)

    # -- mount ---------------------------------------------------------------------------------
    def reserve_root(self):
        """At mount: keep the committed superblock's log area (a commit allocates
        ``area_bytes`` there) out of free space, as the running filesystem did."""
        free = self.tm.extents.free
        ss = self.tm.sectorsize
        root = self.root
        self.areas = []
        for n in (self.area_bytes, ss):
            if root and root + n <= self.tm.total_bytes and free.contains(root, n):
                free.remove(root, n)
                self.areas = [(root, n)]
                break
        self.cur = root
        self.avail_end = root + (self.areas[0][1] if self.areas else 0)
        self.usable = bool(self.areas)

    def attach(self, records):
        """After ``read_log``: also reserve the records found outside the root area (replay
        reads them, and a crash during replay must find them again).  Returns the records
        kept: the chain is cut before a record whose space is not free (it cannot be part of
        this log).  A log with records is replayed and committed, so nothing is appended."""
        free = self.tm.extents.free
        kept = []
        for rec in records:
            addr, length = rec[0], rec[1]
            if not any(a <= addr and addr + length <= a + ln for a, ln in self.areas):
                if not free.contains(addr, length):
                    break
                free.remove(addr, length)
                self.areas.append((addr, length))
            kept.append(rec)
        if kept:
            self.usable = False
        return kept

    # -- commit hooks (tm.lock held, inside TransactionManager._commit) --------------------------
    def prepare_commit(self):
        """The ``(log_root, log_id)`` the committing superblock names: a new area for the
        next transaction's log (``(0, 0)`` without space)."""
        ext = self.tm.extents
        n = self.area_bytes
        try:
            addr = ext.free.alloc(n, self.tm.sectorsize, "log", self.tm.total_bytes // 2)
        except NoSpaceError:
            self._next = None
            return 0, 0
        log_id = int.from_bytes(os.urandom(8), "little") or 1
        self._next = (addr, n, log_id)
        return addr, log_id

    def commit_done(self, transid):
        """The superblock naming the new log is durable: the old log's areas may be reused
        (after ``unpin``, or when the last in-flight write to them ends)."""
        ext = self.tm.extents
        if self.inflight:
            self.retired += self.areas
        else:
            for a, ln in self.areas:
                ext.pin(a, ln)
        ext.log_pinned.clear()
        if self._next is None:
            self._reset(0, 0, transid + 1, [])
        else:
            addr, n, log_id = self._next
            self._reset(addr, log_id, transid + 1, [(addr, n)])
        self._next = None

    def abort_commit(self):
        if self._next is not None:
            addr, n, _ = self._next
            self.tm.extents.free.add(addr, n)
            self._next = None

    # -- placing records -----------------------------------------------------------------------
    def place(self, entries, flags=0):
        """Assign addresses to a record of ``entries``: returns ``[(buf, addr)]`` to write
        (a jump record first when the record goes to a new area).  ``inflight`` is raised;
        the caller calls ``write_done``.  Raises ``NoSpaceError`` (then nothing changed)."""
        tm = self.tm
        ss = tm.sectorsize
        body = DiskLogRecord.body_size(entries)
        length = -(-body // ss) * ss
        writes = []
        seq, at = self.seq, self.cur
        if at + length + ss > self.avail_end:
            # a new area holding this record and the sector its successor is promised
            n = max(self.area_bytes, length + ss)
            new = tm.extents.free.alloc(n, ss, "log", tm.total_bytes // 2)
            jump = DiskLogRecord(tm.fsid, self.log_id, self.transid, at, seq, new, [], flags)
            writes.append((jump.encode(ss), at))
            self.areas.append((new, n))
            self.stats["jumps"] += 1
            self.bytes += ss
            seq += 1
            at, self.avail_end = new, new + n
        rec = DiskLogRecord(tm.fsid, self.log_id, self.transid, at, seq, at + length, entries,
                            flags)
        buf = rec.encode(ss)
        writes.append((buf, at))
        self.seq, self.cur = seq + 1, at + length
        self.bytes += length
        self.inflight += 1
        self.stats["records"] += 1
        self.stats["bytes"] += length
        return writes

    def write_done(self, ok):
        self.inflight -= 1
        if not ok:
            # the chain may now end anywhere: no more records in this log
            self.usable = False
        if not self.inflight and self.retired:
            for a, ln in self.retired:
                self.tm.extents.free.add(a, ln)
            self.retired = []


# ---------------------------------------------------------------------------------------------
# fsync


def _merged(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return out


def _fallback_reason(sb, log, inode, trans):
    tm = sb.tm
    if sb.opts.notreelog:
        return "notreelog"
    if not log.usable or log.transid != trans.transid:
        return "no log"
    if not _stat.S_ISREG(inode.i_mode):
        return "not a regular file"
    if inode.i_nlink == 0:
        return "orphan"
    if inode.ns_trans == trans.transid:
        return "name changed"
    if log.bytes > LOG_BYTES_MAX:
        return "log full"
    if len(tm.cache.dirty) > DIRTY_NODES_MAX:
        return "transaction too large"
    ext = tm.extents
    if ext.pinned_bytes > max(ext.free.free_bytes // 4, 4 * log.area_bytes):
        # space freed in this transaction comes back only with a commit
        return "space pinned"
    return None


def _log_entries(sb, inode, trans):
    """``(entries, data extents referenced, verifiable)`` or ``(None, fallback reason, _)``.
    Verifiable: every data sector the entries reference has its checksum in them."""
    tm = sb.tm
    ss = sb.ss
    tid, oid = inode.tree_id, inode.objectid
    tree = tm.tree(tid)
    ih = _inode_helpers()
    extent_items, extent_len = ih.extent_items, ih.extent_len
    E = LogEntry
    ents, extents = [], []
    verify = VERIFY_DATA and not inode.nodatasum
    ranges = inode.log_ranges if inode.log_trans == trans.transid else []
    for s, e in _merged(ranges):
        ents.append(E(LOG_DROP, EXTENT_DATA, tid, oid, s, e, b""))
        for pos, fe in extent_items(tree, oid, s, e):
            if fe.type == FILE_EXTENT_INLINE:
                return None, "inline extent", False
            flen = extent_len(fe)
            lo, hi = max(pos, s), min(pos + flen, e)
            if lo != pos or hi != pos + flen:
                fe = DiskFileExtent(fe.type, fe.generation, fe.ram_bytes, fe.disk_bytenr,
                                    fe.disk_num_bytes, fe.offset + (lo - pos), hi - lo)
            ents.append(E(LOG_EXTENT, EXTENT_DATA, tid, oid, lo, 0, fe.encode()))
            if not fe.disk_bytenr:
                continue
            extents.append(fe.disk_bytenr)
            if fe.type != FILE_EXTENT_REG or inode.nodatasum:
                continue
            start = fe.disk_bytenr + fe.offset
            csums = sb.csum.lookup(start, -(-fe.num_bytes // ss))
            if None in csums:
                verify = False
            i = 0
            while i < len(csums):     # runs of present checksums
                if csums[i] is None:
                    i += 1
                    continue
                j = i
                while j < len(csums) and csums[j] is not None:
                    j += 1
                ents.append(E(LOG_CSUM, fmt.EXTENT_CSUM, fmt.CSUM_TREE_ID, 0, start + i * ss, 0,
                              DiskCsumItem.encode(csums[i:j])))
                i = j
    ents.append(E(LOG_DEL_TYPE, XATTR_ITEM, tid, oid, 0, 0, b""))
    for k, d in tree.items((oid, XATTR_ITEM, 0), (oid, XATTR_ITEM + 1, 0)):
        ents.append(E(LOG_PUT, XATTR_ITEM, tid, oid, k[2], 0, d))
    if inode.generation == trans.transid:
        # a new inode: its names, so that replay makes it reachable
        vfs_ino = ih.vfs_ino
        for k, d in tree.items((oid, INODE_REF, 0), (oid, INODE_REF + 1, 0)):
            parent = sb.iget(vfs_ino(tid, k[2]))
            if parent.generation == trans.transid:
                return None, "new parent", False
            if parent.rm_trans == trans.transid:
                return None, "parent lost an entry", False
            for idx, _name in fmt.decode_inode_refs(d, "inode ref"):
                raw = tree.lookup((k[2], DIR_INDEX, idx))
                if raw is None:
                    return None, "name changed", False
                ents.append(E(LOG_NAME, DIR_INDEX, tid, k[2], idx, 0, raw))
            ents.append(E(LOG_PUT, INODE_REF, tid, oid, k[2], 0, d))
    raw = tree.lookup((oid, INODE_ITEM, 0))
    ents.append(E(LOG_INODE, INODE_ITEM, tid, oid, 0, 0, raw))
    if DiskLogRecord.body_size(ents) > LOG_RECORD_SOFT_MAX:
        return None, "record too large", False
    return ents, extents, verify


def sync_inode(sb, inode, unlock=None):
    """Make ``inode`` durable: one log record (flush + FUA write, or write + flush), or a full
    commit.  ``unlock()`` (the caller's inode locks) is called once the record is built, before
    its device I/O.  Returns ``"log"``, ``"commit"`` or ``"flush"`` (nothing to log: only the
    cache flushed)."""
    tm = sb.tm
    log = tm.log
    with log.lock:
        with tm.lock:
            trans = tm.running
            log.stats["syncs"] += 1
            pending = inode.log_trans == (trans and trans.transid) and inode.log_ranges
            if trans is None or (inode.logged == (trans.transid, inode.sequence)
                                 and not pending):
                writes = None
            else:
                reason = _fallback_reason(sb, log, inode, trans)
                ents = None
                if reason is None:
                    ents, extents, verify = _log_entries(sb, inode, trans)
                    if ents is None:
                        reason = extents
                if reason is None:
                    try:
                        writes = log.place(ents, fmt.LOG_VERIFY_DATA if verify else 0)
                    except NoSpaceError:
                        reason = "no log"
                if reason is not None:
                    log.stats["fallback:" + reason] += 1
                    gen = tm.generation
                    tm.commit()
                    inode.logged = None
                    if tm.generation != gen:
                        return "commit"
                    writes = None
                else:
                    # data the record points at stays put until the log is dead
                    tm.extents.log_pinned.update(extents)
                    inode.log_ranges = []
                    seq_now = (trans.transid, inode.sequence)
        if unlock is not None:
            unlock()
        if writes is None:
            tm.dev.flush()          # in-place (NODATACOW) data has no metadata to log
            return "flush"
        ok = False
        try:
            if verify:
                # the record carries the checksums of the data it points at (mount verifies
                # them): record and data become durable with one flush, in any order
                for buf, addr in writes:
                    tm.dev.pwrite(buf, addr)
                tm.dev.flush()
            else:
                # the data (and any earlier log write) first, then the record, FUA
                tm.dev.flush()
                for buf, addr in writes:
                    tm.dev.pwrite(buf, addr, fua=True)
            ok = True
        finally:
            with tm.lock:
                log.write_done(ok)
                if ok:
                    inode.logged = seq_now
        return "log"


# ---------------------------------------------------------------------------------------------
# mount: read and replay


def read_log(tm):
    """The records of the committed superblock's log: ``[(addr, length, next, record)]``, in
    order, up to the first that does not verify."""
    sb = tm.sb
    out = []
    if not sb.log_root:
        return out
    ss = tm.sectorsize
    addr, seq = sb.log_root, 0
    dev = tm.dev
    while addr and len(out) < MAX_RECORDS and addr + ss <= tm.total_bytes:
        kw = dict(fsid=sb.fsid, log_id=sb.log_id, transid=sb.generation + 1, seq=seq,
                  sectorsize=ss)
        try:
            head = dev.pread(ss, addr)
            length = DiskLogRecord.decode_header(head, addr, **kw)
            if addr + length > tm.total_bytes:
                break
            buf = head if length == ss else dev.pread(length, addr)
            rec, length = DiskLogRecord.decode(buf, addr, **kw)
        except (CorruptError, OSError):
            break
        if rec.flags & fmt.LOG_VERIFY_DATA and not _data_matches(tm, rec):
            break                   # written before the data it points at was durable
        out.append((addr, length, rec.next, rec))
        addr, seq = rec.next, seq + 1
    return out


_HOLD_REF = (0, 0, 0)      # (root, objectid, offset) of replay's temporary references


def _data_matches(tm, rec):
    """Do the device sectors the record's LOG_CSUM entries cover match them?"""
    from ufs.iomap.csum import block_csums      # the Cython core; only mount needs it
    ss = tm.sectorsize
    for e in rec.entries:
        if e.op != LOG_CSUM:
            continue
        try:
            want = DiskCsumItem.decode(e.data, "log csum")
            if e.offset + len(want) * ss > tm.total_bytes:
                return False
            got = block_csums(tm.dev.pread(len(want) * ss, e.offset), ss)
        except (CorruptError, OSError):
            return False
        if list(got) != want:
            return False
    return True


class _ReplayInode:
    """What ``add_extent``/``drop_extents`` need of an inode during replay."""

    __slots__ = ("log_ranges", "log_trans", "nbytes", "objectid")

    def __init__(self, objectid):
        self.objectid, self.nbytes = objectid, 0
        self.log_trans, self.log_ranges = None, []


def replay(sb, commit=True):
    """Replay the committed superblock's log into the trees (then commit, which drops it).
    Returns the number of records replayed."""
    tm = sb.tm
    with tm.lock:
        recs = tm.log.attach(read_log(tm))
        if not recs:
            return 0
        ext = tm.extents
        trans = tm.start()
        # Claim every data extent the log references before any tree block is allocated, and
        # hold one extra reference on each while replaying: a DROP may release an extent's
        # last item before the record's EXTENT entries reference it again.  A record whose
        # extents cannot be claimed (space in use: not written by this log) ends the chain.
        held = {}
        for i, (addr, _l, _n, rec) in enumerate(recs):
            mine = {}
            try:
                for e in rec.entries:
                    if e.op != LOG_EXTENT:
                        continue
                    fe = DiskFileExtent.decode(e.data, f"log record {addr:#x}")
                    b = fe.disk_bytenr
                    if fe.type != FILE_EXTENT_INLINE and b and b not in held and b not in mine:
                        ext.claim_data(trans, b, fe.disk_num_bytes)
                        mine[b] = fe.disk_num_bytes
            except CorruptError:
                for b in mine:
                    if ext.pending.get(b) is not None and ext.pending[b].new:
                        ext.release_data(trans, b)
                recs = recs[:i]
                break
            for b, n in mine.items():
                ext.inc_data_ref(trans, b, n, *_HOLD_REF)
            held.update(mine)
        shims = {}
        for addr, _l, _n, rec in recs:
            for e in rec.entries:
                _replay_entry(sb, trans, e, shims, addr)
        for bytenr, n in held.items():
            ext.dec_data_ref(trans, bytenr, n, *_HOLD_REF)
        sb.flush_freed(trans)
        tm.log.stats["replayed"] += len(recs)
        if commit:
            tm.commit(trans)
        return len(recs)


def _replay_entry(sb, trans, e, shims, addr):
    tm = sb.tm
    ih = _inode_helpers()
    where = f"log record {addr:#x}"
    if e.op == LOG_CSUM:
        sb.csum.insert(trans, e.offset, DiskCsumItem.decode(e.data, where))
        return
    tree = tm.tree(e.tree)
    if e.op in (LOG_DROP, LOG_EXTENT):
        ino = shims.get((e.tree, e.objectid))
        if ino is None:
            ino = shims[(e.tree, e.objectid)] = _ReplayInode(e.objectid)
        if e.op == LOG_DROP:
            ih.drop_extents(tm, trans, tree, ino, e.offset, e.end)
        else:
            ih.add_extent(tm, trans, tree, ino, e.offset, DiskFileExtent.decode(e.data, where))
    elif e.op == LOG_INODE:
        DiskInodeItem.decode(e.data, where)
        tree.put(trans, (e.objectid, INODE_ITEM, 0), e.data)
    elif e.op == LOG_DEL_TYPE:
        tree.delete_range(trans, (e.objectid, e.key_type, 0), (e.objectid, e.key_type + 1, 0))
    elif e.op == LOG_PUT:
        tree.put(trans, (e.objectid, e.key_type, e.offset), e.data)
    elif e.op == LOG_NAME:
        (ent,) = fmt.decode_dir_entries(e.data, where)
        key = (e.objectid, DIR_ITEM, fmt.name_hash(ent.name))
        raw = tree.lookup(key)
        ents = fmt.decode_dir_entries(raw, where) if raw is not None else []
        if any(x.name == ent.name for x in ents):
            return                      # replayed before (an earlier record or replay)
        tree.put(trans, key, fmt.encode_dir_entries(ents + [ent]))
        tree.put(trans, (e.objectid, DIR_INDEX, e.offset), e.data)
        draw = tree.lookup((e.objectid, INODE_ITEM, 0))
        if draw is None:
            raise CorruptError("log record", where, f"name in missing directory {e.objectid}")
        d = DiskInodeItem.decode(draw, where)
        d.size += 2 * len(ent.name)
        tree.put(trans, (e.objectid, INODE_ITEM, 0), d.encode())
    else:
        raise CorruptError("log record", where, f"op {e.op}")


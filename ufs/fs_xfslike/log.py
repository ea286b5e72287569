"""xfslike write-ahead journal: atomic metadata transactions, group commit, recovery.

Owns: the log region (``log_start_blk`` .. ``+ log_nblocks`` in AG 0), transactions, the
committed-but-unwritten images (the CIL, as in XFS's delayed logging), the logged-but-not-
in-place images (the AIL), checkpoints and recovery.  The byte format is ``format.py``'s
(``DiskLogHeader``, ``DiskLogRecord``, ``DiskLogEntry``, ``DiskLogCommit``); SPEC.md
"Journal" gives the layout and the recovery rules.

May import: ``ufs.errors``, ``.format``, ``.buf``.  Device calls: ``pread``, ``pwrite(...,
fua=)``, ``flush``.

Physical logging: a record carries full images of every block the committed transactions
changed.  Life of a change:

1. ``with log.transaction() as tx:`` ... ``tx.log_buf(buf)`` before changing a buffer.
2. commit: every joined buffer is sealed and its image copied into the CIL (a later commit of
   the same block replaces the image; commits are atomic because an image is taken only at
   commit, never from a buffer an open transaction is changing).  Locks taken with
   ``tx.lock`` are released.  ``commit(sync=True)`` then forces the log.
3. push: the CIL becomes one record (header, entry table, images, commit block) written in
   one contiguous write; the images go to the AIL.  A push happens when the CIL grows past a
   quarter of the log, or on ``force``.
4. force: push, then ``flush`` -- every record up to the last one is durable when it returns.
5. checkpoint (when the log lacks room, or ``checkpoint()``): force; write every AIL image in
   place; flush; write the next log-header slot with the new tail (= head) with FUA.  Only
   then may the log blocks be reused.

Ordering rules that make this crash-safe: an image is written in place only after the record
holding it is durable (step 5 forces first); the tail moves only after the in-place writes
are durable (flush before the header write); a record is complete only if its commit block
says so (LSN, length, CRC over the whole record), so a torn record is never replayed.

Recovery (``recover()``, at mount, before anything reads metadata): pick the valid header slot
with the larger ``seq``; from its tail, accept records while each one is at the expected LSN
(same cycle, next block; or block 0 of the next cycle when the writer wrapped early), chains
to the previous one (``prev_lsn``) and is complete; stop at the first that is not.  Replay the
images in order, skipping any image older than a CANCEL of its block, flush, then restart the
log at block 0 of cycle ``last_cycle + 2`` -- higher than any cycle that can be on disk, so no
block left from before (a torn record, an old wrap) can ever match an expected LSN again.

Frees: ``tx.free_buf(blkno)`` logs a CANCEL entry for a freed metadata block: recovery will not
replay older images of it (the block may be file data by then), and its pending images are
dropped from the CIL/AIL so a checkpoint never writes it back.

Locking: ``self.lock`` (one lock) serialises commit, push, force, checkpoint and recovery.
Transactions themselves run concurrently; two open transactions must not join the same
buffer (the owner locks, taken through ``tx.lock``, prevent it; a violation raises
InvariantError).  Lock order: owner locks (AG ascending, inode) -> log lock -> cache lock.
"""
from __future__ import annotations

import struct
import threading

from ufs.errors import CorruptError, InvariantError

from . import format as fmt
from .buf import Buf, BufCache

__all__ = ["Log", "Transaction", "mkfs_log"]

_LSN_OFF = 24      # DiskBlockHeader.lsn


def mkfs_log(dev, block_size: int, log_start_blk: int, log_nblocks: int, uuid: bytes) -> None:
    """Write an empty log: both header slots, tail at (cycle 1, block 0).

    The data area is not zeroed: anything in it carries another UUID or a cycle below 1.
    """
    hdr = fmt.DiskLogHeader(seq=1, tail_lsn=fmt.make_lsn(1, 0), tail_prev_lsn=0, log_nblocks=log_nblocks)
    for slot in range(fmt.LOG_HEADER_SLOTS):
        blkno = log_start_blk + slot
        dev.pwrite(hdr.encode(block_size, blkno, uuid), blkno * block_size)


class Transaction:
    """An atomic set of metadata block changes.  Use through ``Log.transaction()``."""

    def __init__(self, log: Log, sync: bool = False):
        self.log = log
        self.sync = sync
        self.bufs: dict[int, Buf] = {}
        self.cancels: list[int] = []
        self._locks: list = []
        self._on_commit: list = []
        self._on_abort: list = []
        self.seq = None            # commit sequence once committed
        self.done = False

    # -- joining blocks ---------------------------------------------------------------

    def log_buf(self, buf: Buf) -> Buf:
        """Join ``buf``: call before changing it.  Idempotent within a transaction."""
        if self.done:
            raise InvariantError("log_buf on a finished transaction")
        if buf.tx is self:
            return buf
        if buf.tx is not None:
            raise InvariantError(f"{buf!r} already joined to another open transaction")
        # Outside a transaction obj and data agree (commit seals, cancel drops obj), so the
        # bytes are the before-image.
        buf.before = (bytes(buf.data), buf.magic, buf.owner)
        buf.tx = self
        if self.log.cache.peek(buf.blkno) is not buf:
            self.log.cache.adopt(buf)
        self.log.cache.pin(buf)
        self.bufs[buf.blkno] = buf
        return buf

    def new_buf(self, blkno: int, magic: int | None, owner: int) -> Buf:
        """A fresh buffer for a newly allocated block, joined to this transaction.

        A block freed earlier in this transaction may be reused: its CANCEL is withdrawn
        and the same ``Buf`` is re-initialised (so a cancel still restores the old block).
        """
        if blkno in self.cancels:
            self.cancels.remove(blkno)
        cache = self.log.cache
        old = cache.peek(blkno)
        if old is None:
            buf = cache.get_new(blkno, magic, owner)
            buf.before = None
            buf.tx = self
            cache.pin(buf)
            self.bufs[blkno] = buf
            return buf
        buf = self.log_buf(old)
        if magic is None:
            buf.data[:] = bytes(len(buf.data))
        else:
            buf.data[:] = fmt.new_block(len(buf.data), magic, blkno, owner, cache.uuid)
        buf.magic, buf.owner, buf.obj = magic, owner, None
        return buf

    def free_buf(self, blkno: int) -> None:
        """The metadata block ``blkno`` was freed: log a CANCEL; its buffer goes at commit.

        Recovery will not replay older images of the block, and a checkpoint will not write
        them back (the block may hold file data by then).
        """
        cached = self.log.cache.peek(blkno)
        if cached is not None and cached.tx is not None and cached.tx is not self:
            raise InvariantError(f"freeing block {blkno} joined to another transaction")
        if blkno not in self.cancels:
            self.cancels.append(blkno)

    def lock(self, lockobj) -> None:
        """Acquire ``lockobj`` and hold it until this transaction commits or cancels."""
        lockobj.acquire()
        self._locks.append(lockobj)

    def holds(self, lockobj) -> bool:
        return any(lk is lockobj for lk in self._locks)

    def on_commit(self, fn) -> None:
        """``fn(seq)`` runs after the commit (log lock not held)."""
        self._on_commit.append(fn)

    def on_abort(self, fn) -> None:
        """``fn()`` runs if the transaction is cancelled (last registered runs first)."""
        self._on_abort.append(fn)

    # -- ending -----------------------------------------------------------------------

    def commit(self, sync: bool | None = None) -> int:
        """Commit; with ``sync`` the changes are durable when this returns.  Returns the seq."""
        if self.done:
            raise InvariantError("transaction committed twice")
        try:
            self.log._check_fits(self)
        except BaseException:
            self.cancel()
            raise
        self.done = True
        try:
            seq = self.log._commit(self)
        finally:
            self._release()
        self.seq = seq
        for fn in self._on_commit:
            fn(seq)
        if self.sync if sync is None else sync:
            self.log.force(seq)
        return seq

    def cancel(self) -> None:
        """Undo every change of this transaction in memory; nothing reaches the log."""
        if self.done:
            return
        self.done = True
        cache = self.log.cache
        for blkno, buf in self.bufs.items():
            buf.tx = None
            cache.unpin(buf)
            if buf.before is None:
                cache.forget(blkno)
            else:
                buf.data[:], buf.magic, buf.owner = buf.before
                buf.before = None
                buf.obj = None                 # re-decoded from the restored bytes
        self.bufs.clear()
        self._release()
        for fn in reversed(self._on_abort):     # undo in reverse order of the changes
            fn()

    def _release(self) -> None:
        while self._locks:
            self._locks.pop().release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.cancel()
        return False


class _Record:
    __slots__ = ("entries", "images", "lsn", "nblocks", "prev_lsn")

    def __init__(self, lsn, prev_lsn, nblocks, entries, images):
        self.lsn, self.prev_lsn, self.nblocks = lsn, prev_lsn, nblocks
        self.entries, self.images = entries, images


class Log:
    """The journal of one mounted filesystem.

    Args:
        dev: device (``pread``, ``pwrite(buf, addr, fua=)``, ``flush``).
        cache: the filesystem's ``BufCache``.
        log_start_blk, log_nblocks: the log region (superblock fields).

    Call ``recover()`` before the first transaction (also on a freshly made filesystem).
    """

    def __init__(self, dev, cache: BufCache, log_start_blk: int, log_nblocks: int):
        self.dev = dev
        self.cache = cache
        self.bs = cache.block_size
        self.uuid = cache.uuid
        self.start_blk = log_start_blk
        self.nblocks = log_nblocks
        self.data_start_blk = log_start_blk + fmt.LOG_HEADER_SLOTS
        self.data_nblocks = log_nblocks - fmt.LOG_HEADER_SLOTS
        self.lock = threading.RLock()
        self.max_record_blk = self.data_nblocks // 2     # one transaction may not exceed this
        self.push_threshold_blk = max(8, self.data_nblocks // 4)
        self._recovered = False
        # Log position state (valid after recover()).
        self.hdr_seq = 0
        self.cycle = 0
        self.head_blk = 0
        self.tail_abs = 0
        self.last_lsn = 0               # LSN of the last record written
        self.durable_lsn = 0            # every record up to this one is durable
        # CIL: committed, not yet in a record.  blkno -> (image bytes, raw?)
        self._cil: dict[int, tuple[bytes, bool]] = {}
        self._cil_cancels: dict[int, None] = {}
        self.commit_seq = 0             # last commit sequence handed out
        self.pushed_seq = 0             # every commit <= this is in a written record
        self._push_seq_lsn: list[tuple[int, int]] = []
        # AIL: logged, not yet in place.  blkno -> image bytes
        self._ail: dict[int, bytes] = {}
        # statistics
        self.records_written = 0
        self.checkpoints = 0

    # -- public API -------------------------------------------------------------------

    def transaction(self, sync: bool = False) -> Transaction:
        if not self._recovered:
            raise InvariantError("log used before recover()")
        return Transaction(self, sync)

    def force(self, seq: int | None = None) -> None:
        """Make every commit up to ``seq`` (default: all) durable (XFS's log force)."""
        with self.lock:
            if seq is None or seq > self.pushed_seq:
                self._push()
            if self.durable_lsn != self.last_lsn:
                self.dev.flush()
                self.durable_lsn = self.last_lsn

    def log_force(self, seq: int | None = None) -> None:
        self.force(seq)

    def checkpoint(self) -> None:
        """Write every logged image in place and empty the log (advance the tail to the head)."""
        with self.lock:
            self._push()
            self._checkpoint()

    def is_durable(self, seq: int) -> bool:
        """Whether commit ``seq`` is on stable storage."""
        with self.lock:
            if seq > self.pushed_seq:
                return False
            if self.durable_lsn == self.last_lsn:
                return True
            for s, lsn in self._push_seq_lsn:
                if seq <= s:
                    return lsn <= self.durable_lsn
            return False            # too old to know: callers force, which is then cheap

    @property
    def used_blk(self) -> int:
        return self._head_abs() - self.tail_abs

    # -- commit / push ----------------------------------------------------------------

    def _check_fits(self, tx: Transaction) -> None:
        if 2 + len(tx.bufs) + fmt.DiskLogEntry.table_blocks(len(tx.bufs) + len(tx.cancels),
                                                            self.bs) > self.max_record_blk:
            raise InvariantError(f"transaction of {len(tx.bufs)} blocks does not fit the log "
                                 f"(at most {self.max_record_blk} blocks per record)")

    def _commit(self, tx: Transaction) -> int:
        cache = self.cache
        with self.lock:
            nimg = len(self._cil) + len(tx.bufs)
            if 2 + nimg + fmt.DiskLogEntry.table_blocks(nimg + len(self._cil_cancels) + len(tx.cancels),
                                                       self.bs) > self.max_record_blk:
                self._push()                 # the CIL plus this transaction would not fit
            for blkno in tx.cancels:
                # the block's last image stays in the AIL until the cancel is in a written
                # record (_push): a checkpoint before that (log full) moves the tail past
                # the records holding the image, so it must write the image in place while
                # the free is not in the log yet
                self._cil.pop(blkno, None)
                self._cil_cancels[blkno] = None
                buf = tx.bufs.pop(blkno, None)
                if buf is not None:
                    buf.tx = None
                    buf.before = None
                    cache.unpin(buf)
                cached = cache.peek(blkno)
                if cached is not None:
                    if cached.pin:
                        raise InvariantError(f"freed block {blkno} still pinned")
                    cached.dirty = False
                    cache.forget(blkno)
            for blkno, buf in tx.bufs.items():
                buf.seal()
                self._cil[blkno] = (bytes(buf.data), buf.magic is None)
                self._cil_cancels.pop(blkno, None)
                buf.tx = None
                buf.before = None
                cache.mark_dirty(buf)
                cache.unpin(buf)
            tx.bufs.clear()
            self.commit_seq += 1
            seq = self.commit_seq
            if self._cil_blocks() >= self.push_threshold_blk:
                self._push()
            return seq

    def _cil_blocks(self) -> int:
        n = len(self._cil)
        return 2 + n + fmt.DiskLogEntry.table_blocks(n + len(self._cil_cancels), self.bs)

    def _head_abs(self) -> int:
        return self.cycle * self.data_nblocks + self.head_blk

    def _push(self) -> None:
        """Write the CIL as one record (not forced to stable storage)."""
        if not self._cil and not self._cil_cancels:
            self.pushed_seq = self.commit_seq
            return
        bs = self.bs
        entries = []
        for blkno, (image, raw) in self._cil.items():
            entries.append((blkno, 0, image, raw))
        for blkno in self._cil_cancels:
            entries.append((blkno, fmt.LOGE_CANCEL, None, True))
        nent = len(entries)
        ntable = fmt.DiskLogEntry.table_blocks(nent, bs)
        nimg = len(self._cil)
        nblocks = 2 + ntable + nimg
        if nblocks > self.data_nblocks:
            raise InvariantError("log record larger than the log")
        # Room: the record must be contiguous; skip the end of the area when it does not fit.
        skip = self.data_nblocks - self.head_blk if self.head_blk + nblocks > self.data_nblocks else 0
        if self.used_blk + skip + nblocks > self.data_nblocks:
            self._checkpoint()
            skip = self.data_nblocks - self.head_blk if self.head_blk + nblocks > self.data_nblocks else 0
        if skip:
            self.cycle += 1
            self.head_blk = 0
        lsn = fmt.make_lsn(self.cycle, self.head_blk)
        dev_blk = self.data_start_blk + self.head_blk
        out = bytearray(nblocks * bs)
        table = []
        pos = (1 + ntable) * bs
        final = {}
        for blkno, flags, image, raw in entries:
            if flags & fmt.LOGE_CANCEL:
                table.append(fmt.DiskLogEntry(blkno, flags, 0))
                continue
            img = bytearray(image)
            if not raw:
                struct.pack_into("<Q", img, _LSN_OFF, lsn)
                fmt.set_block_crc(img)
            out[pos:pos + bs] = img
            pos += bs
            crc = fmt.crc32c(img)
            table.append(fmt.DiskLogEntry(blkno, 0, crc))
            final[blkno] = bytes(img)
        rec = fmt.DiskLogRecord(lsn=lsn, prev_lsn=self.last_lsn, nblocks=nblocks, nentries=nent,
                                ntable_blk=ntable)
        out[0:bs] = rec.encode(bs, dev_blk, self.uuid)
        out[bs:(1 + ntable) * bs] = fmt.DiskLogEntry.encode_table(table, bs)
        body_crc = fmt.crc32c(memoryview(out)[:(nblocks - 1) * bs])
        commit = fmt.DiskLogCommit(lsn=lsn, nblocks=nblocks, nentries=nent, body_crc=body_crc)
        out[(nblocks - 1) * bs:] = commit.encode(bs, dev_blk + nblocks - 1, self.uuid)
        self.dev.pwrite(bytes(out), dev_blk * bs)
        self.records_written += 1
        self.head_blk += nblocks
        if self.head_blk == self.data_nblocks:
            self.cycle += 1
            self.head_blk = 0
        self.last_lsn = lsn
        for blkno in self._cil_cancels:
            # the free is in the log now: the block's old image must never be written in
            # place again (the block may be reused for file data once this is durable)
            self._ail.pop(blkno, None)
        self._ail.update(final)
        self._cil.clear()
        self._cil_cancels.clear()
        self.pushed_seq = self.commit_seq
        self._push_seq_lsn.append((self.commit_seq, lsn))
        if len(self._push_seq_lsn) > 64:
            del self._push_seq_lsn[:32]

    def _checkpoint(self) -> None:
        # checkpoint() pushes the CIL first so the in-place writes cover everything
        # committed; a checkpoint requested by _push itself (log full) runs with that push's
        # CIL still pending, which is fine: its images are not in the AIL yet, and the tail
        # becomes the head where that record is written next.
        if self.durable_lsn != self.last_lsn:
            self.dev.flush()
            self.durable_lsn = self.last_lsn
        bs = self.bs
        for blkno in sorted(self._ail):
            self.dev.pwrite(self._ail[blkno], blkno * bs)
        if self._ail:
            self.dev.flush()
        for blkno in self._ail:
            # A block with a newer image still in the CIL (a push that ran out of room is
            # checkpointing before writing it) stays dirty: evicting it would lose that image.
            if blkno not in self._cil:
                self.cache.mark_clean(blkno)
        self._ail.clear()
        self._write_header(fmt.make_lsn(self.cycle, self.head_blk), self.last_lsn)
        self.tail_abs = self._head_abs()
        self.checkpoints += 1

    def _write_header(self, tail_lsn: int, tail_prev_lsn: int) -> None:
        self.hdr_seq += 1
        slot = self.hdr_seq % fmt.LOG_HEADER_SLOTS
        blkno = self.start_blk + slot
        hdr = fmt.DiskLogHeader(seq=self.hdr_seq, tail_lsn=tail_lsn, tail_prev_lsn=tail_prev_lsn,
                                log_nblocks=self.nblocks)
        self.dev.pwrite(hdr.encode(self.bs, blkno, self.uuid), blkno * self.bs, fua=True)

    # -- recovery ---------------------------------------------------------------------

    def read_header(self) -> fmt.DiskLogHeader:
        best = None
        errors = []
        for slot in range(fmt.LOG_HEADER_SLOTS):
            blkno = self.start_blk + slot
            try:
                h = fmt.DiskLogHeader.decode(self.dev.pread(self.bs, blkno * self.bs), blkno, self.uuid)
            except CorruptError as e:
                errors.append(e)
                continue
            if h.log_nblocks != self.nblocks:
                errors.append(CorruptError("log header", fmt.where(blkno, self.bs), "log size mismatch"))
                continue
            if best is None or h.seq > best.seq:
                best = h
        if best is None:
            raise errors[0]
        return best

    def recover(self) -> int:
        """Replay committed records after a crash; return how many were replayed.

        Must run before the first transaction, with an empty (or unused) buffer cache.
        """
        with self.lock:
            hdr = self.read_header()
            records = self._scan(hdr)
            bs = self.bs
            if records:
                last_cancel = {}
                for i, rec in enumerate(records):
                    for e in rec.entries:
                        if e.flags & fmt.LOGE_CANCEL:
                            last_cancel[e.blkno] = i
                final = {}
                for i, rec in enumerate(records):
                    img_iter = iter(rec.images)
                    for e in rec.entries:
                        if e.flags & fmt.LOGE_CANCEL:
                            final.pop(e.blkno, None)
                            continue
                        img = next(img_iter)
                        if last_cancel.get(e.blkno, -1) <= i:
                            final[e.blkno] = img
                for blkno in sorted(final):
                    self.dev.pwrite(final[blkno], blkno * bs)
                self.dev.flush()
                last_lsn = records[-1].lsn
                end_cycle = fmt.lsn_cycle(last_lsn) + (
                    1 if fmt.lsn_blk(last_lsn) + records[-1].nblocks >= self.data_nblocks else 0)
            else:
                last_lsn = hdr.tail_prev_lsn
                end_cycle = fmt.lsn_cycle(hdr.tail_lsn)
            self.cache.invalidate_all()
            # Restart two cycles up: a torn record past the end may have wrapped into
            # end_cycle + 1; nothing on disk can carry end_cycle + 2.
            self.hdr_seq = hdr.seq
            self.cycle = end_cycle + 2
            self.head_blk = 0
            self.last_lsn = last_lsn
            self.durable_lsn = last_lsn
            self._write_header(fmt.make_lsn(self.cycle, 0), last_lsn)
            self.tail_abs = self._head_abs()
            self._recovered = True
            self.replayed = len(records)
            return len(records)

    def _scan(self, hdr) -> list:
        records = []
        expected = hdr.tail_lsn
        prev = hdr.tail_prev_lsn
        scanned = 0
        while scanned < self.data_nblocks:
            rec = self._read_record(expected, prev)
            if rec is None and fmt.lsn_blk(expected) != 0:
                wrapped = fmt.make_lsn(fmt.lsn_cycle(expected) + 1, 0)
                rec = self._read_record(wrapped, prev)
                if rec is not None:
                    scanned += self.data_nblocks - fmt.lsn_blk(expected)
            if rec is None:
                break
            records.append(rec)
            scanned += rec.nblocks
            prev = rec.lsn
            end = fmt.lsn_blk(rec.lsn) + rec.nblocks
            if end >= self.data_nblocks:
                expected = fmt.make_lsn(fmt.lsn_cycle(rec.lsn) + 1, 0)
            else:
                expected = fmt.make_lsn(fmt.lsn_cycle(rec.lsn), end)
        return records

    def _read_record(self, lsn: int, prev_lsn: int):
        """The complete record at ``lsn`` chaining to ``prev_lsn``, or None."""
        bs = self.bs
        blk = fmt.lsn_blk(lsn)
        if blk >= self.data_nblocks - 1:
            return None
        dev_blk = self.data_start_blk + blk
        try:
            rec = fmt.DiskLogRecord.decode(self.dev.pread(bs, dev_blk * bs), dev_blk, self.uuid)
        except (CorruptError, OSError):
            return None
        if rec.lsn != lsn or rec.prev_lsn != prev_lsn:
            return None
        if rec.nblocks < 2 or blk + rec.nblocks > self.data_nblocks:
            return None
        if rec.ntable_blk != fmt.DiskLogEntry.table_blocks(rec.nentries, bs):
            return None
        try:
            body = self.dev.pread(rec.nblocks * bs, dev_blk * bs)
            commit = fmt.DiskLogCommit.decode(body[(rec.nblocks - 1) * bs:], dev_blk + rec.nblocks - 1,
                                              self.uuid)
        except (CorruptError, OSError):
            return None
        if commit.lsn != lsn or commit.nblocks != rec.nblocks or commit.nentries != rec.nentries:
            return None
        if commit.body_crc != fmt.crc32c(memoryview(body)[:(rec.nblocks - 1) * bs]):
            return None
        entries = fmt.DiskLogEntry.decode_table(body[bs:(1 + rec.ntable_blk) * bs], rec.nentries)
        nimg = sum(1 for e in entries if not e.flags & fmt.LOGE_CANCEL)
        if 2 + rec.ntable_blk + nimg != rec.nblocks:
            return None
        images = []
        pos = (1 + rec.ntable_blk) * bs
        for e in entries:
            if e.flags & fmt.LOGE_CANCEL:
                continue
            img = body[pos:pos + bs]
            if fmt.crc32c(img) != e.img_crc:
                return None
            images.append(img)
            pos += bs
        return _Record(lsn, prev_lsn, rec.nblocks, entries, images)

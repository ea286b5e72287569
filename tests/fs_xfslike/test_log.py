"""xfslike journal: atomic, durable-on-sync transactions; recovery after power cuts at any
point of the write stream (write-cache model), never replaying torn or stale records."""
from __future__ import annotations

import random
import struct
import uuid as _uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ufs.iomap.bdev import RamDev
from xfsl_testdev import RecordingDev

from ufs.errors import CorruptError, InvariantError
from ufs.fs_xfslike import format as fmt
from ufs.fs_xfslike.buf import BufCache
from ufs.fs_xfslike.log import Log, mkfs_log

UUID = _uuid.UUID(int=0x106).bytes
BS = 1024
LOG_START = 2
LOG_BLK = fmt.MIN_LOG_BLK          # small: records wrap and checkpoints happen often
NBLOCKS = 24
FIRST = LOG_START + LOG_BLK + 10
RAW_EVERY = 4                      # every 4th test block is a raw block (no header)
DEV_SIZE = 1 << 20


def blk_of(i):
    return FIRST + i


def is_raw(i):
    return i % RAW_EVERY == 3


def open_log(dev):
    cache = BufCache(dev, BS, UUID)
    log = Log(dev, cache, LOG_START, LOG_BLK)
    log.recover()
    return log


def read_block(log, i):
    b = blk_of(i)
    if is_raw(i):
        buf = log.cache.read(b, None)
        return struct.unpack_from("<Q", buf.data, 100)[0]
    buf = log.cache.read(b, fmt.BMBT_MAGIC, 1)
    return struct.unpack_from("<Q", buf.data, 100)[0]


def state(log):
    return tuple(read_block(log, i) for i in range(NBLOCKS))


def set_block(tx, log, i, value):
    b = blk_of(i)
    buf = log.cache.read(b, None if is_raw(i) else fmt.BMBT_MAGIC, None if is_raw(i) else 1)
    tx.log_buf(buf)
    struct.pack_into("<Q", buf.data, 100, value)
    # fill a stretch so images differ widely between versions
    buf.data[200:264] = bytes([value & 0xFF]) * 64


def fresh_dev():
    """A device with an empty log and the test blocks at value 0, all durable."""
    dev = RamDev(DEV_SIZE, 512)
    mkfs_log(dev, BS, LOG_START, LOG_BLK, UUID)
    log = open_log(dev)
    with log.transaction() as tx:
        for i in range(NBLOCKS):
            if is_raw(i):
                tx.new_buf(blk_of(i), None, 0)
            else:
                tx.new_buf(blk_of(i), fmt.BMBT_MAGIC, 1)
    log.checkpoint()
    dev.flush()
    return dev


def image_state(img):
    return state(open_log(RamDev(DEV_SIZE, 512, data=img)))


def run_txs(dev_or_rec, log, txs, first_id=1, models=None):
    """Apply txs = [(blocks, sync, checkpoint)]; return the model states after each."""
    models = models if models is not None else [state(log)]
    cur = list(models[-1])
    for n, (blocks, sync, ckpt) in enumerate(txs):
        tid = first_id + n
        with log.transaction(sync=sync) as tx:
            for i in sorted(set(blocks)):
                set_block(tx, log, i, tid)
        for i in set(blocks):
            cur[i] = tid
        models.append(tuple(cur))
        if isinstance(dev_or_rec, RecordingDev):
            dev_or_rec.mark(("durable" if sync else "commit", len(models) - 1))
        if ckpt:
            log.checkpoint()
            if isinstance(dev_or_rec, RecordingDev):
                dev_or_rec.mark(("durable", len(models) - 1))
    return models


def assert_prefix(got, models, lo, hi, what=""):
    """got must equal models[j] for some lo <= j <= hi."""
    matches = [j for j in range(len(models)) if models[j] == got]
    assert matches, f"{what}: recovered state is no prefix of the transactions (torn transaction)"
    assert any(lo <= j <= hi for j in matches), f"{what}: state {matches} outside [{lo}, {hi}]"
    return max(j for j in matches if lo <= j <= hi)


def bounds(rec, cut):
    marks = rec.marks_before(cut)
    durable = max([m[1] for m in marks if m[0] == "durable"], default=0)
    started = max([m[1] for m in marks], default=0) + 1
    return durable, started


tx_strategy = st.lists(
    st.tuples(st.lists(st.integers(0, NBLOCKS - 1), min_size=1, max_size=10),   # blocks changed
              st.booleans(),                                                     # sync commit
              st.integers(0, 9).map(lambda x: x == 0)),                          # checkpoint after
    min_size=1, max_size=25)


@given(tx_strategy, st.integers(0, 2**32))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_power_cut_anywhere_recovers_a_durable_prefix(txs, seed):
    dev = fresh_dev()
    rec = RecordingDev(dev)
    log = open_log(rec)
    models = run_txs(rec, log, txs)
    rng = random.Random(seed)
    cuts = sorted(set([len(rec.ops)] + [rng.randrange(len(rec.ops) + 1) for _ in range(6)]))
    for cut in cuts:
        durable, started = bounds(rec, cut)
        img = rec.crash_image(cut, rng)
        j1 = assert_prefix(image_state(img), models, durable, started, f"cut {cut}")
        # Second life on the recovered image: more transactions, another power cut.  Records of
        # the first life left in the log must never be replayed now.
        dev2 = RamDev(DEV_SIZE, 512, data=img)
        rec2 = RecordingDev(dev2, base=img)
        log2 = open_log(rec2)
        assert state(log2) == models[j1]
        more = [([(k * 7 + x) % NBLOCKS for x in range(3)], k % 2 == 0, False) for k in range(8)]
        models2 = run_txs(rec2, log2, more, first_id=1000, models=[models[j1]])
        for cut2 in sorted({len(rec2.ops), rng.randrange(len(rec2.ops) + 1)}):
            d2, s2 = bounds(rec2, cut2)
            assert_prefix(image_state(rec2.crash_image(cut2, rng)), models2, d2, s2, f"cut {cut}/{cut2}")


def test_sync_commit_is_durable_and_async_needs_force():
    dev = fresh_dev()
    log = open_log(dev)
    with log.transaction(sync=True) as tx:
        set_block(tx, log, 0, 11)
    assert image_state(dev.durable())[0] == 11
    with log.transaction() as tx:
        set_block(tx, log, 1, 12)
    assert image_state(dev.durable())[1] == 0          # committed, not forced: may be lost
    log.force(tx.seq)
    assert log.is_durable(tx.seq)
    assert image_state(dev.durable())[1] == 12


def test_torn_record_is_not_replayed():
    dev = fresh_dev()
    rec = RecordingDev(dev)
    log = open_log(rec)
    with log.transaction(sync=True) as tx:
        set_block(tx, log, 0, 5)
    with log.transaction(sync=True) as tx:
        set_block(tx, log, 1, 6)
        set_block(tx, log, 2, 6)
    # the last record write, with one block of it lost (a torn multi-block write)
    idx, (_, addr, data, _fua) = [(i, op) for i, op in enumerate(rec.ops) if op[0] == "w"][-1]
    img = bytearray(rec.crash_image(idx, random.Random(0), keep_probability=1.0))
    torn = bytearray(data)
    torn[2 * BS:3 * BS] = bytes(BS)
    img[addr:addr + len(torn)] = torn
    got = image_state(bytes(img))
    assert got[0] == 5 and got[1] == 0 and got[2] == 0


def test_stale_records_from_before_a_crash_are_never_replayed():
    """Records A, B, C written, B lost in the cache but C kept: recovery stops at B.  After
    new records fill the same positions, C (which chains to B) must stay dead."""
    dev = fresh_dev()
    rec = RecordingDev(dev)
    log = open_log(rec)
    for v, blocks in ((1, [0]), (2, [1]), (3, [2, 3])):
        with log.transaction() as tx:
            for i in blocks:
                set_block(tx, log, i, v)
        log.force()
    writes = [i for i, op in enumerate(rec.ops) if op[0] == "w"]
    assert len(writes) == 4                             # recovery's header write, A, B, C
    img = bytearray(rec.base)
    for i in (writes[0], writes[1], writes[3]):         # lose B
        _, addr, data, _ = rec.ops[i]
        img[addr:addr + len(data)] = data
    img = bytes(img)
    assert image_state(img)[:4] == (1, 0, 0, 0)
    dev2 = RamDev(DEV_SIZE, 512, data=img)
    log2 = open_log(dev2)
    for v in range(4):                                  # rewrite the log over the same area
        with log2.transaction(sync=True) as tx:
            set_block(tx, log2, 5 + v, 100 + v)
    got = image_state(dev2.durable())
    assert got[:4] == (1, 0, 0, 0) and got[5:9] == (100, 101, 102, 103)


def test_cancelled_block_is_not_replayed_over_file_data():
    dev = fresh_dev()
    log = open_log(dev)
    with log.transaction(sync=True) as tx:           # image in one record ...
        set_block(tx, log, 0, 77)
    with log.transaction() as tx:                    # ... its CANCEL in the next
        tx.free_buf(blk_of(0))
    log.force()
    assert log.cache.peek(blk_of(0)) is None
    user = b"U" * BS
    dev.pwrite(user, blk_of(0) * BS)                    # the block now holds file data
    dev.flush()
    log2 = open_log(RamDev(DEV_SIZE, 512, data=dev.durable()))
    assert log2.replayed == 2
    assert log2.dev.pread(BS, blk_of(0) * BS) == user
    # a checkpoint after the free does not write the old image either
    log.checkpoint()
    assert dev.pread(BS, blk_of(0) * BS) == user


def test_free_then_reuse_in_one_transaction_and_cancel_restores():
    dev = fresh_dev()
    log = open_log(dev)
    with log.transaction() as tx:
        set_block(tx, log, 1, 9)
    with pytest.raises(KeyError), log.transaction() as tx:
        set_block(tx, log, 1, 10)
        tx.free_buf(blk_of(1))
        tx.new_buf(blk_of(1), fmt.INOBT_MAGIC, 4)
        raise KeyError("abort")
    assert read_block(log, 1) == 9
    with log.transaction() as tx:
        tx.free_buf(blk_of(1))
        buf = tx.new_buf(blk_of(1), fmt.BMBT_MAGIC, 1)
        struct.pack_into("<Q", buf.data, 100, 55)
    log.checkpoint()
    assert image_state(dev.durable())[1] == 55


def test_header_slots_survive_one_corruption_and_fail_when_both_are_bad():
    dev = fresh_dev()
    log = open_log(dev)
    with log.transaction() as tx:
        set_block(tx, log, 2, 31)
    log.checkpoint()
    with log.transaction(sync=True) as tx:
        set_block(tx, log, 3, 32)
    newest = LOG_START + log.hdr_seq % fmt.LOG_HEADER_SLOTS
    img = bytearray(dev.durable())
    img[newest * BS + 60] ^= 1
    got = image_state(bytes(img))                       # older slot: older tail, same result
    assert got[2] == 31 and got[3] == 32
    other = LOG_START + (log.hdr_seq + 1) % fmt.LOG_HEADER_SLOTS
    img[other * BS + 60] ^= 1
    with pytest.raises(CorruptError, match="log header"):
        image_state(bytes(img))


def test_wrap_and_checkpoint_under_a_small_log():
    dev = fresh_dev()
    log = open_log(dev)
    models = run_txs(dev, log, [([k % NBLOCKS, (k * 5) % NBLOCKS], k % 3 == 0, False) for k in range(400)])
    assert log.checkpoints >= 3 and log.cycle >= 6         # wrapped several times
    log.force()
    assert image_state(dev.durable()) == models[-1]
    assert image_state(dev.crash(seed=1)) == models[-1]


def test_transaction_rules():
    dev = fresh_dev()
    log = open_log(dev)
    t1 = log.transaction()
    b = log.cache.read(blk_of(0), fmt.BMBT_MAGIC, 1)
    t1.log_buf(b)
    t2 = log.transaction()
    with pytest.raises(InvariantError, match="another open transaction"):
        t2.log_buf(b)
    t1.cancel()
    t2.cancel()
    with pytest.raises(InvariantError, match="does not fit"), log.transaction() as tx:
        for k in range(LOG_BLK):
            tx.new_buf(FIRST + 100 + k, fmt.BMBT_MAGIC, 1)
    assert log.cache.peek(FIRST + 100) is None            # the cancel dropped the new buffers
    with pytest.raises(InvariantError, match="before recover"):
        Log(dev, BufCache(dev, BS, UUID), LOG_START, LOG_BLK).transaction()


def test_buffer_cache_evicts_only_clean_unpinned_unheld_buffers():
    dev = fresh_dev()
    cache = BufCache(dev, BS, UUID, cap_blocks=4)
    log = Log(dev, cache, LOG_START, LOG_BLK)
    log.recover()
    with log.transaction() as tx:
        for i in (0, 1, 2):
            tx.log_buf(cache.read(blk_of(i), fmt.BMBT_MAGIC, 1))
        for i in (4, 5, 6, 8):
            cache.read(blk_of(i), fmt.BMBT_MAGIC, 1)
        assert len(cache) == 4                          # 3 pinned + the newest clean one
        assert all(cache.peek(blk_of(i)) for i in (0, 1, 2, 8))
    for i in (0, 1, 2):                                 # dirty (logged, not in place): kept
        assert cache.peek(blk_of(i)).dirty
    for i in (9, 10):
        cache.read(blk_of(i), fmt.BMBT_MAGIC, 1)
    assert all(cache.peek(blk_of(i)) for i in (0, 1, 2)) and len(cache) == 4
    log.checkpoint()                                    # in place: clean, evictable
    held = cache.read(blk_of(9), fmt.BMBT_MAGIC, 1)
    for i in (10, 12, 13, 14, 16):
        cache.read(blk_of(i), fmt.BMBT_MAGIC, 1)
    assert len(cache) == 4
    assert cache.peek(blk_of(0)) is None
    assert cache.peek(blk_of(9)) is held                # held by a caller: not evicted
    reads = cache.reads
    assert cache.read(blk_of(16), fmt.BMBT_MAGIC, 1) and cache.reads == reads   # a hit
    with pytest.raises(CorruptError, match="cached as"):
        cache.read(blk_of(16), fmt.INOBT_MAGIC)

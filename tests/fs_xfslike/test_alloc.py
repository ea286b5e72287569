"""xfslike free space: allocator vs an interval-set model, every block accounted for,
double frees caught, ENOSPC, busy extents, crash consistency, a 1 TiB sparse image."""
from __future__ import annotations

import itertools
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ufs.iomap.bdev import RamDev
from xfsl_testdev import SparseFileDev

from ufs.errors import CorruptError, InvalidError, NoSpaceError
from ufs.fs_xfslike import format as fmt
from ufs.fs_xfslike.alloc import Metadata, mkfs_metadata, read_superblock

BS = 1024


def make_fs(size=8 << 20, bs=BS, **geo_kw):
    dev = RamDev(size, 512)
    geo = fmt.Geometry.compute(size, bs, **geo_kw)
    mkfs_metadata(dev, geo)
    return dev, geo


def tree_blocks(tree) -> set:
    out = set()

    def walk(blk, level):
        out.add(blk)
        if level:
            node = tree.cache.read(blk, tree.schema.magic, tree.owner, tree._decode).obj
            for c in node.ptrs:
                walk(c, level - 1)
    walk(tree.root.root_blk, tree.root.level)
    return out


def shrink_nodes(md, leaf=8, node=6):
    """Tiny node capacities so a few hundred extents make deep trees (splits, merges, AGFL)."""
    for ag in md.alloc.ags:
        for t in (ag.bno, ag.cnt):
            t.max_leaf, t.max_node = leaf, node
            t.min_leaf, t.min_node = max(1, leaf // 3), max(2, node // 3)
    return md


def assert_accounting(md, allocated: dict):
    """Every block of every AG is exactly one of: fixed/log, free, AGFL, tree node, allocated."""
    assert md.alloc.check() >= 0
    for ag in md.alloc.ags:
        agh = ag.header()
        nodes = tree_blocks(ag.bno) | tree_blocks(ag.cnt) | {agh.ino_root_blk}
        agfl = {ag.start_blk + b for b in agh.agfl}
        mine = {s: n for s, n in allocated.items() if ag.start_blk <= s < ag.start_blk + ag.length_blk}
        used = sum(mine.values())
        assert not nodes & agfl
        for s, n in mine.items():
            assert not ag._hits_fixed(s - ag.start_blk, s - ag.start_blk + n)
            assert s + n <= ag.start_blk + ag.length_blk
            assert not any(s <= b < s + n for b in nodes | agfl)
        free_ext = list(ag.bno.iterate())
        for fs, fl in free_ext:
            a = ag.start_blk + fs
            assert not any(a <= b < a + fl for b in nodes | agfl)
        total = ag.fixed_blk + agh.free_blk + len(agfl) + len(nodes) + used
        assert total == ag.length_blk, (ag.agno, total, ag.length_blk)


def test_mkfs_then_open_and_close():
    dev, geo = make_fs()
    sb = read_superblock(dev)
    assert sb.state & fmt.SB_STATE_CLEAN and sb.ag_count == geo.ag_count == 2
    copy = read_superblock(dev, agno=1, block_size=BS, ag_blk=geo.ag_blk)
    assert (copy.uuid, copy.total_blk, copy.ag_blk) == (sb.uuid, sb.total_blk, sb.ag_blk)
    md = Metadata.open(dev)
    assert not read_superblock(dev).state & fmt.SB_STATE_CLEAN      # mounted: dirty
    assert md.alloc.free_blocks() == sb.free_blk
    assert_accounting(md, {})
    with md.transaction() as tx:
        s, n = md.alloc.alloc(tx, 0, 10, 10)
    assert n == 10 and s >= geo.ag_first_free_agbno(0)
    with pytest.raises(KeyError), md.transaction() as tx:
        md.log_superblock(tx).root_ino = 99
        raise KeyError
    assert md.sb.root_ino == 0                                     # the cancel undid it
    with md.transaction(sync=True) as tx:
        md.log_superblock(tx).root_ino = 4242
    crashed = Metadata.open(RamDev(dev.size, 512, data=dev.durable()))
    assert crashed.replayed == 1 and crashed.sb.root_ino == 4242
    md.close()
    sb2 = read_superblock(dev)
    assert sb2.state & fmt.SB_STATE_CLEAN and sb2.free_blk == sb.free_blk - 10
    assert sb2.mount_generation == 1 and sb2.root_ino == 4242


op_st = st.lists(st.tuples(st.sampled_from(["alloc", "alloc", "free", "freepart"]),
                           st.integers(0, 2**20), st.integers(1, 40), st.integers(0, 40), st.booleans()),
                 max_size=120)


@given(op_st)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_allocator_matches_interval_model(ops):
    dev, geo = make_fs(size=4 << 20)
    md = shrink_nodes(Metadata.open(dev))
    allocated: dict[int, int] = {}
    owned = set()
    for op, near, min_len, extra, userdata in ops:
        with md.transaction() as tx:
            if op == "alloc":
                near %= geo.total_blk
                try:
                    s, n = md.alloc.alloc(tx, near, min_len, min_len + extra, userdata=userdata)
                except NoSpaceError:
                    for ag in md.alloc.ags:             # no AG could have served it
                        h = ag.header()
                        reserve = 3 * (max(h.bno_level, h.cnt_level) + 2) + 3
                        assert h.longest_free_blk < min_len or h.free_blk - reserve < min_len
                    continue
                assert min_len <= n <= min_len + extra
                blocks = set(range(s, s + n))
                assert not blocks & owned, "allocated blocks that were already allocated"
                owned |= blocks
                allocated[s] = n
            elif allocated:
                s = sorted(allocated)[near % len(allocated)]
                n = allocated.pop(s)
                if op == "freepart" and n > 2:
                    # free the middle, keep both ends allocated
                    a, b = s + 1, s + n - 1
                    md.alloc.free(tx, a, b - a)
                    allocated[s] = 1
                    allocated[b] = 1
                    owned -= set(range(a, b))
                else:
                    md.alloc.free(tx, s, n)
                    owned -= set(range(s, s + n))
    assert_accounting(md, allocated)
    md.close()
    md2 = shrink_nodes(Metadata.open(dev))
    assert_accounting(md2, allocated)


def test_deep_free_space_trees_split_merge_and_coalesce():
    dev, geo = make_fs(size=4 << 20)
    md = shrink_nodes(Metadata.open(dev))
    initial = md.alloc.free_blocks()
    with md.transaction() as tx:
        s, n = md.alloc.alloc(tx, geo.ag_blk + 100, 1200, 1200)
    rng = random.Random(9)
    odd = list(range(s + 1, s + n, 2))
    rng.shuffle(odd)
    for b in odd:
        with md.transaction() as tx:
            md.alloc.free(tx, b, 1)
    ag = md.alloc.ags[1]
    agh = ag.header()
    assert agh.bno_level >= 3 and agh.cnt_level >= 3
    deep_level = agh.bno_level
    allocated = {b: 1 for b in range(s, s + n, 2)}
    assert_accounting(md, allocated)
    even = list(allocated)
    rng.shuffle(even)
    for b in even:
        with md.transaction() as tx:
            md.alloc.free(tx, b, 1)
    agh = ag.header()
    assert agh.bno_level < deep_level                 # merges shrank the trees
    # what stays apart are AGFL blocks and tree nodes (the AGFL trades blocks with the trees)
    pieces = list(ag.bno.iterate())
    held = set(agh.agfl) | {b - ag.start_blk for b in tree_blocks(ag.bno) | tree_blocks(ag.cnt)}
    for (s1, l1), (s2, _) in itertools.pairwise(pieces):
        assert set(range(s1 + l1, s2)) <= held
    nodes = len(tree_blocks(ag.bno) | tree_blocks(ag.cnt)) - 2
    assert md.alloc.free_blocks() == initial - nodes
    assert_accounting(md, {})


def test_double_free_overlap_and_bad_ranges_are_corruption():
    dev, geo = make_fs()
    md = Metadata.open(dev)
    with md.transaction() as tx:
        s, n = md.alloc.alloc(tx, 500, 20, 20)
    assert n == 20
    with md.transaction() as tx:
        md.alloc.free(tx, s + 5, 5)
    for start, length in ((s + 5, 5), (s + 3, 4), (s + 9, 3), (s - 1, 2)):
        with pytest.raises(CorruptError, match="double free|overlaps"), md.transaction() as tx:
            md.alloc.free(tx, start, length)
    with pytest.raises(CorruptError, match="outside the AG's free area"), md.transaction() as tx:
        md.alloc.free(tx, fmt.AGH_AGBNO, 1)                       # the AG header
    with pytest.raises(CorruptError, match="outside the AG's free area"), md.transaction() as tx:
        md.alloc.free(tx, geo.log_start_blk + 3, 1)               # the log
    agfl0 = md.alloc.ags[1].start_blk + md.alloc.ags[1].header().agfl[0]
    with pytest.raises(CorruptError, match="AGFL"), md.transaction() as tx:
        md.alloc.free(tx, agfl0, 1)
    with pytest.raises(CorruptError, match="beyond"), md.transaction() as tx:
        md.alloc.free(tx, geo.total_blk + 5, 1)
    # the failed transactions changed nothing
    assert_accounting(md, {s: 5, s + 10: 10})


def test_enospc_then_everything_comes_back():
    dev, geo = make_fs(size=2 << 20)
    md = Metadata.open(dev)
    initial = md.alloc.free_blocks()
    got = []
    rng = random.Random(3)
    with pytest.raises(NoSpaceError) as ei:
        while True:
            with md.transaction() as tx:
                got.append(md.alloc.alloc(tx, rng.randrange(geo.total_blk), 1, rng.randint(1, 7)))
    assert ei.value.errno == 28
    for ag in md.alloc.ags:                     # only the AGFL and the small reserve are left
        agh = ag.header()
        assert agh.free_blk <= 3 * (max(agh.bno_level, agh.cnt_level) + 2) + 3 + 7
    assert_accounting(md, dict(got))
    rng.shuffle(got)
    for s, n in got:
        with md.transaction() as tx:
            md.alloc.free(tx, s, n)
    assert md.alloc.free_blocks() == initial
    for ag in md.alloc.ags:
        assert ag.check()["extents"] == 1                          # fully coalesced again
    with md.transaction() as tx, pytest.raises(NoSpaceError):
        md.alloc.alloc(tx, 0, geo.ag_blk, geo.ag_blk)


def test_near_hint_is_honoured():
    dev, geo = make_fs()
    md = Metadata.open(dev)
    hint = geo.ag_blk + 3000
    with md.transaction() as tx:
        s, n = md.alloc.alloc(tx, hint, 8, 8)
    assert (s, n) == (hint, 8)
    with md.transaction() as tx:
        s2, _ = md.alloc.alloc(tx, hint, 8, 8)
    assert s2 == hint + 8                                          # next free after the hint


def test_busy_extents_force_the_log_or_are_avoided_for_file_data():
    dev, geo = make_fs()
    md = Metadata.open(dev)
    hint = geo.ag_blk + 2000
    with md.transaction() as tx:
        s, n = md.alloc.alloc(tx, hint, 16, 16)
    md.log.force()
    tx = md.transaction()
    md.alloc.free(tx, s, n)
    tx.commit()                                                    # not durable yet
    assert not md.log.is_durable(tx.seq)
    with md.transaction() as tx2:
        s2, n2 = md.alloc.alloc(tx2, hint, 16, 16, userdata=True)
    assert (s2, n2) == (s, n)                                      # reused ...
    assert md.log.is_durable(tx.seq)                               # ... after forcing the free
    # freed in the same, still open, transaction: file data must go elsewhere
    with md.transaction() as tx3:
        md.alloc.free(tx3, s2, n2)
        s3, n3 = md.alloc.alloc(tx3, hint, 16, 16, userdata=True)
        assert s3 + n3 <= s2 or s3 >= s2 + n2
        s4, _ = md.alloc.alloc(tx3, hint, 4, 4)                    # metadata may reuse them
        assert s2 <= s4 < s2 + n2
    assert_accounting(md, {s3: n3, s4: 4})


def test_crash_leaves_consistent_free_space():
    for seed in range(4):
        dev, geo = make_fs(size=4 << 20)
        md = Metadata.open(dev)
        rng = random.Random(seed)
        allocated = {}
        durable_alloc = None
        for k in range(150):
            with md.transaction(sync=k % 10 == 0) as tx:
                if allocated and rng.random() < 0.4:
                    s = rng.choice(sorted(allocated))
                    md.alloc.free(tx, s, allocated.pop(s))
                else:
                    s, n = md.alloc.alloc(tx, rng.randrange(geo.total_blk), 1, rng.randint(1, 30))
                    allocated[s] = n
            if k % 10 == 0:
                durable_alloc = dict(allocated)
        img = dev.crash(seed=seed)
        md2 = Metadata.open(RamDev(dev.size, 512, data=img))
        assert md2.replayed >= 1
        md2.alloc.check()
        # everything allocated at the last sync commit is still allocated (not free)
        for s, n in durable_alloc.items():
            if s in allocated:
                # no free extent may overlap any block of [s, s + n)
                agno, agbno = md2.alloc.ag_of(s)
                rec = md2.alloc.ags[agno].bno.lookup_le(agbno + n - 1)
                assert rec is None or rec[0] + rec[1] <= agbno


def test_mkfs_rejects_bad_geometry_for_the_device():
    dev = RamDev(1 << 20, 4096)
    with pytest.raises(InvalidError):
        mkfs_metadata(dev, fmt.Geometry.compute(1 << 20, 1024, sector_size=512))
    with pytest.raises(InvalidError):
        mkfs_metadata(RamDev(1 << 20, 512), fmt.Geometry.compute(2 << 20, 1024))


def test_one_tib_sparse_image(tmp_path):
    path = str(tmp_path / "big.img")
    size = 1 << 40
    try:
        from ufs.iomap.bdev import open_device
        with open(path, "wb") as f:
            f.truncate(size)
        dev = open_device(path)
    except (ImportError, OSError):
        dev = SparseFileDev(path, size)
    try:
        geo = fmt.Geometry.compute(size)
        sb = mkfs_metadata(dev, geo)
        assert (sb.total_blk, sb.ag_count, sb.log_nblocks) == (1 << 28, 4, fmt.MAX_LOG_BLK)
        md = Metadata.open(dev)
        assert md.alloc.free_blocks() == sb.free_blk > (1 << 28) - 40000
        with md.transaction() as tx:
            big = md.alloc.alloc(tx, 3 * geo.ag_blk + 12345, 1 << 20, 1 << 24, userdata=True)
            last = md.alloc.alloc(tx, geo.total_blk - 1, 1, 1)
        assert big == (3 * geo.ag_blk + 12345, 1 << 24)
        assert last[0] == geo.total_blk - 1
        md.close()
        md = Metadata.open(dev)
        assert md.alloc.free_blocks() == sb.free_blk - (1 << 24) - 1
        assert md.alloc.check() > 0
        md.close()
        assert os.stat(path).st_blocks * 512 < 64 << 20             # still sparse
    finally:
        dev.close()


def test_concurrent_transactions_in_several_ags():
    import threading
    dev, geo = make_fs(size=8 << 20, ag_count=4)
    md = Metadata.open(dev)
    results: list[dict] = [{} for _ in range(4)]
    errors = []

    def worker(w):
        rng = random.Random(w)
        mine = results[w]
        try:
            for _ in range(120):
                with md.transaction() as tx:
                    if mine and rng.random() < 0.4:
                        s = rng.choice(sorted(mine))
                        md.alloc.free(tx, s, mine.pop(s))
                    else:
                        s, n = md.alloc.alloc(tx, rng.randrange(geo.total_blk), 1, rng.randint(1, 9),
                                              userdata=rng.random() < 0.5)
                        mine[s] = n
        except BaseException as e:  # noqa: BLE001 -- reported below; a thread must not die silently
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    allocated = {}
    for r in results:
        for s, n in r.items():
            assert all(not (s < s2 + n2 and s2 < s + n) for s2, n2 in allocated.items())
            allocated[s] = n
    assert_accounting(md, allocated)
    md.close()
    assert_accounting(Metadata.open(dev), allocated)

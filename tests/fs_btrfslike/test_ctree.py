"""The COW B-tree against a sorted-dict model, across commits and remounts; structure checks."""
import random

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from ufs.errors import CorruptError, ExistsError, InvariantError, NotFoundError, InvalidError
from ufs.fs_btrfslike import format as fmt
from ufs.fs_btrfslike.transaction import TransactionManager
from ufs.iomap.bdev import RamDev

FS = fmt.FS_TREE_ID


def mkfs(size=16 << 20, nodesize=1024, sectorsize=512, **kw):
    dev = RamDev(size, 512)
    return dev, TransactionManager.mkfs(dev, nodesize=nodesize, sectorsize=sectorsize, **kw)


def assert_matches(tree, model):
    assert list(tree.items()) == sorted(model.items())


def assert_clean(tm):
    assert tm.check() == []


op_st = st.one_of(
    st.tuples(st.just("ins"), st.integers(0, 400), st.integers(0, 3), st.integers(0, 120)),
    st.tuples(st.just("del"), st.integers(0, 10**6)),
    st.tuples(st.just("upd"), st.integers(0, 10**6), st.integers(0, 300)),
    st.tuples(st.just("bulk_ins"), st.integers(0, 2**32), st.integers(1, 300)),
    st.tuples(st.just("bulk_del"), st.integers(0, 2**32), st.integers(1, 300)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("remount")),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, min_size=10, max_size=120))
def test_ctree_matches_model(ops):
    dev, tm = mkfs()
    model = {}
    trans = tm.start()
    for op in ops:
        tree = tm.tree(FS)
        if op[0] == "ins":
            key = (op[1], 1, op[2])
            data = bytes([op[1] & 0xFF]) * op[3]
            if key in model:
                with pytest.raises(ExistsError):
                    tree.insert(trans, key, data)
            else:
                tree.insert(trans, key, data)
                model[key] = data
        elif op[0] in ("del", "upd") and model:
            key = sorted(model)[op[1] % len(model)]
            if op[0] == "del":
                assert tree.delete(trans, key) == model.pop(key)
            else:
                model[key] = b"u" * op[2]
                tree.update(trans, key, model[key])
        elif op[0] == "bulk_ins":
            rng = random.Random(op[1])
            for _ in range(op[2]):
                key = (rng.randrange(3000), 1, rng.randrange(4))
                if key not in model:
                    model[key] = bytes([key[0] & 0xFF]) * rng.randrange(80)
                    tree.insert(trans, key, model[key])
        elif op[0] == "bulk_del" and model:
            rng = random.Random(op[1])
            for key in rng.sample(sorted(model), min(op[2], len(model))):
                tree.delete(trans, key)
                del model[key]
        elif op[0] == "commit":
            tm.commit()
            assert_clean(tm)
            trans = tm.start()
        elif op[0] == "remount":
            tm.commit()
            tm = TransactionManager.mount(dev)
            trans = tm.start()
        assert tree.lookup((7, 1, 0)) == model.get((7, 1, 0))
    tree = tm.tree(FS)
    assert_matches(tree, model)
    tm.commit()
    tm = TransactionManager.mount(dev)
    tree = tm.tree(FS)
    assert_matches(tree, model)
    tree.walk()
    assert_clean(tm)
    # point and neighbour queries against the model
    keys = sorted(model)
    for probe in [(0, 0, 0), (50, 1, 2), (200, 0, 0), (401, 0, 0)] + keys[:5]:
        le = [k for k in keys if k <= probe]
        ge = [k for k in keys if k >= probe]
        prev = tree.prev_item(probe)
        nxt = tree.next_item(probe)
        assert (prev[0] if prev else None) == (le[-1] if le else None)
        assert (nxt[0] if nxt else None) == (ge[0] if ge else None)
        assert [k for k, _ in tree.items(probe, (300, 0, 0))] == [k for k in ge if k < (300, 0, 0)]


def test_path_next_and_next_leaf_visit_every_item():
    dev, tm = mkfs()
    t = tm.start()
    tree = tm.tree(FS)
    for i in range(2000):
        tree.insert(t, (i, 1, 0), b"x" * 20)
    tm.commit()
    assert tree.level >= 2
    found, path = tree.search((0, 0, 0))
    assert not found and path.valid()
    seen = [path.key()]
    while path.next():
        seen.append(path.key())
    assert seen == [(i, 1, 0) for i in range(2000)]
    found, path = tree.search((0, 1, 0))
    leaves = 1
    while path.next_leaf():
        leaves += 1
    assert leaves == sum(1 for _ in iter_leaves(tree))


def iter_leaves(tree):
    out = []
    tree.walk(lambda n: out.append(n) if n.level == 0 else None)
    return out


def test_sequential_inserts_pack_leaves_full():
    dev, tm = mkfs()
    t = tm.start()
    tree = tm.tree(FS)
    for i in range(2000):
        tree.insert(t, (i, 1, 0), b"y" * 30)
    tm.commit()
    leaves = iter_leaves(tree)
    fill = sum(n.used for n in leaves) / (len(leaves) * tree.leaf_cap)
    assert fill > 0.9, fill


def test_random_inserts_keep_leaves_at_least_quarter_full_after_deletes():
    dev, tm = mkfs()
    t = tm.start()
    tree = tm.tree(FS)
    rng = random.Random(5)
    keys = rng.sample(range(100000), 3000)
    for k in keys:
        tree.insert(t, (k, 1, 0), b"z" * rng.randrange(60))
    for k in keys[:2500]:
        tree.delete(t, (k, 1, 0))
    tm.commit()
    assert_clean(tm)
    assert tree.count() == 500
    leaves = iter_leaves(tree)
    # every leaf but possibly a few that had no mergeable sibling stays reasonably used
    assert sum(n.used for n in leaves) / (len(leaves) * tree.leaf_cap) > 0.35


def test_big_items_split_three_ways_and_resize():
    dev, tm = mkfs()
    t = tm.start()
    tree = tm.tree(FS)
    big = tree.max_item
    tree.insert(t, (1, 1, 0), b"a" * 400)
    tree.insert(t, (3, 1, 0), b"c" * 400)
    tree.insert(t, (2, 1, 0), b"b" * big)      # does not fit beside either neighbour
    with pytest.raises(InvalidError):
        tree.insert(t, (4, 1, 0), b"d" * (big + 1))
    tm.commit()
    assert [len(d) for _, d in tree.items()] == [400, big, 400]
    assert len(iter_leaves(tree)) == 3
    t = tm.start()
    tree.update(t, (2, 1, 0), b"B" * 10)       # shrink: leaves merge again
    tree.update(t, (1, 1, 0), b"A" * 10)
    tm.commit()
    assert len(iter_leaves(tree)) == 1 and tree.level == 0
    assert dict(tree.items())[(2, 1, 0)] == b"B" * 10
    assert_clean(tm)


def test_delete_everything_frees_every_block():
    dev, tm = mkfs()
    base_used = tm.sb.bytes_used
    t = tm.start()
    tree = tm.tree(FS)
    for i in range(1500):
        tree.insert(t, (i, 1, 0), b"q" * 25)
    tm.commit()
    assert tree.level >= 2 and tm.sb.bytes_used > base_used
    t = tm.start()
    for i in range(1500):
        tree.delete(t, (i, 1, 0))
    with pytest.raises(NotFoundError):
        tree.delete(t, (3, 1, 0))
    tm.commit()
    assert tree.level == 0 and tree.count() == 0
    assert tm.sb.bytes_used == base_used
    assert_clean(tm)
    free_total = tm.extents.free.free_bytes
    tm2 = TransactionManager.mount(dev)
    assert tm2.extents.free.free_bytes == free_total


def test_modification_needs_running_transaction():
    dev, tm = mkfs()
    t = tm.start()
    tm.commit()
    with pytest.raises(InvariantError):
        tm.tree(FS).insert(t, (1, 1, 0), b"")
    assert tm.start() is not t


def test_node_cache_is_capped_and_reads_verify():
    dev, tm = mkfs()
    t = tm.start()
    tree = tm.tree(FS)
    for i in range(3000):
        tree.insert(t, (i, 1, 0), b"w" * 40)
    tm.commit()
    tm2 = TransactionManager.mount(dev, cache_nodes=16)
    tree2 = tm2.tree(FS)
    assert tree2.count() == 3000
    assert len(tm2.cache.clean) <= 16
    assert tm2.cache.reads > 100


def test_corrupt_leaf_reports_its_address():
    dev, tm = mkfs()
    t = tm.start()
    tree = tm.tree(FS)
    for i in range(800):
        tree.insert(t, (i, 1, 0), b"v" * 20)
    tm.commit()
    leaves = iter_leaves(tree)
    victim = leaves[len(leaves) // 2]
    vkey = victim.keys[0]
    raw = bytearray(dev.pread(512, victim.bytenr + 512))
    raw[100] ^= 0xFF
    dev.pwrite(bytes(raw), victim.bytenr + 512)
    tm2 = TransactionManager.mount(dev)
    with pytest.raises(CorruptError) as ei:
        tm2.tree(FS).lookup(vkey)
    assert ei.value.where == f"{victim.bytenr:#x}" and "checksum" in ei.value.detail
    assert tm2.tree(FS).lookup((0, 1, 0)) == b"v" * 20 or leaves[0] is victim
    problems = tm2.check()
    assert problems and f"{victim.bytenr:#x}" in problems[0]


def test_stale_block_at_right_address_is_detected_by_generation():
    """A node whose write was lost (an older valid node still at the address) is caught."""
    dev, tm = mkfs()
    t = tm.start()
    tree = tm.tree(FS)
    for i in range(300):
        tree.insert(t, (i, 1, 0), b"s" * 20)
    tm.commit()
    leaf = iter_leaves(tree)[0]
    old_image = dev.pread(1024, leaf.bytenr)
    # Forge: the same node re-signed with an older generation.
    n = fmt.decode_node(old_image, leaf.bytenr, fsid=tm.fsid, nodesize=1024)
    forged = fmt.encode_node(tm.fsid, 1024, leaf.bytenr, n.generation - 1 or 1, n.owner, 0,
                             n.keys, n.datas)
    if n.generation - 1 == 0:
        pytest.skip("leaf written by generation 1")
    dev.pwrite(forged, leaf.bytenr)
    tm2 = TransactionManager.mount(dev)
    with pytest.raises(CorruptError, match="generation"):
        tm2.tree(FS).lookup(n.keys[0])


def test_items_survive_modification_between_yields_and_delete_range():
    dev, tm = mkfs()
    t = tm.start()
    tree = tm.tree(FS)
    for i in range(1000):
        tree.insert(t, (i, 1, 0), b"r" * 15)
    seen = []
    for k, _ in tree.items((100, 0, 0), (900, 0, 0)):
        seen.append(k)
        if k[0] % 2 == 0:
            tree.delete(t, k)                  # changes leaves under the iterator
            tree.insert(t, (k[0], 2, 0), b"")  # after the current key: may or may not be seen
    assert [k for k in seen if k[1] == 1] == [(i, 1, 0) for i in range(100, 900)]
    assert seen == sorted(set(seen))           # in order, never twice
    assert tree.delete_range(t, (0, 0, 0), (500, 0, 0)) == 100 + 200 + 200
    tm.commit()
    assert tree.next_item((0, 0, 0))[0] == (500, 2, 0)
    assert tm.check() == []

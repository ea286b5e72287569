"""Extent tree: free-space cache, refcounts and back-references through snapshots, reflinks
and deletes, used-bytes accounting, data reservations."""
import random

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from ufs.errors import InvariantError, NoSpaceError
from ufs.fs_btrfslike import format as fmt
from ufs.fs_btrfslike.extent_tree import INLINE_DATA_REFS, FreeSpace
from ufs.fs_btrfslike.transaction import TransactionManager
from ufs.iomap.bdev import RamDev

FS = fmt.FS_TREE_ID
SIZE = 16 << 20


def mkfs():
    dev = RamDev(SIZE, 512)
    return dev, TransactionManager.mkfs(dev, nodesize=1024, sectorsize=512)


# --- the fs-tree side of a file extent, as the inode layer will do it: tree first, refs second

def add_extent(tm, t, tree, ino, pos, bytenr, disk_bytes, offset=0, num=None):
    num = num or disk_bytes - offset
    fe = fmt.DiskFileExtent(fmt.FILE_EXTENT_REG, t.transid, disk_bytes, bytenr, disk_bytes,
                            offset, num)
    tree.insert(t, (ino, fmt.EXTENT_DATA, pos), fe.encode())
    tm.extents.inc_data_ref(t, bytenr, disk_bytes, tree.tree_id, ino, pos - offset)


def set_extent(tm, t, tree, ino, pos, bytenr, disk_bytes):
    """Replace whatever maps ``pos``: the new reference is taken before the old one is dropped
    (they may be the same extent)."""
    old = tree.lookup((ino, fmt.EXTENT_DATA, pos))
    if old is not None:
        tree.delete(t, (ino, fmt.EXTENT_DATA, pos))
    add_extent(tm, t, tree, ino, pos, bytenr, disk_bytes)
    if old is not None:
        fe = fmt.DiskFileExtent.decode(old, "test")
        tm.extents.dec_data_ref(t, fe.disk_bytenr, fe.disk_num_bytes, tree.tree_id, ino,
                                pos - fe.offset)


def drop_extent(tm, t, tree, ino, pos):
    fe = fmt.DiskFileExtent.decode(tree.delete(t, (ino, fmt.EXTENT_DATA, pos)), "test")
    return tm.extents.dec_data_ref(t, fe.disk_bytenr, fe.disk_num_bytes, tree.tree_id, ino,
                                   pos - fe.offset)


def file_extents(tree):
    return [(k, fmt.DiskFileExtent.decode(d, "t")) for k, d in tree.items()
            if k[1] == fmt.EXTENT_DATA]


def test_free_space_add_remove_merge_alloc():
    fs = FreeSpace()
    fs.add(0, 4096)
    fs.add(8192, 4096)
    fs.add(4096, 4096)                    # bridges both: one range
    assert fs.ranges() == [(0, 12288)] and fs.free_bytes == 12288
    fs.remove(1024, 1024)
    assert fs.ranges() == [(0, 1024), (2048, 10240)]
    with pytest.raises(InvariantError):
        fs.remove(512, 1024)              # partly allocated
    with pytest.raises(InvariantError):
        fs.add(0, 512)                    # already free
    assert fs.alloc(4096, 4096) == 4096   # first fit, aligned
    assert fs.alloc(512, 512) == 0
    assert fs.alloc(1024, 1024, "data", 8192) == 8192       # next fit from the hint
    assert fs.alloc(1024, 1024, "data", 8192) == 9216
    assert fs.alloc(1024, 1024, "data", 8192) == 10240
    assert fs.alloc(1024, 1024, "data", 8192) == 11264
    assert fs.alloc(512, 512, "data") == 512                 # wraps around
    with pytest.raises(NoSpaceError):
        fs.alloc(4096, 512)
    assert fs.free_bytes == sum(ln for _, ln in fs.ranges())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 16), st.sampled_from([1, 2, 4])),
                max_size=60))
def test_free_space_matches_bitmap_model(ops):
    unit = 512
    fs = FreeSpace()
    fs.add(0, 64 * unit)
    free = [True] * 64
    held = []
    for is_alloc, n, align in ops:
        if is_alloc or not held:
            try:
                a = fs.alloc(n * unit, align * unit)
            except NoSpaceError:
                assert not any(all(free[i:i + n]) and i % align == 0 for i in range(65 - n))
                continue
            i = a // unit
            assert a % (align * unit) == 0 and all(free[i:i + n])
            free[i:i + n] = [False] * n
            held.append((a, n))
        else:
            a, n = held.pop(n % len(held))
            fs.add(a, n * unit)
            free[a // unit:a // unit + n] = [True] * n
    assert fs.free_bytes == sum(free) * unit
    for s, ln in fs.ranges():
        assert all(free[s // unit:(s + ln) // unit])


def test_snapshot_shares_then_cow_splits_refs_and_delete_returns_space():
    dev, tm = mkfs()
    base = tm.sb.bytes_used
    t = tm.start()
    fs = tm.tree(FS)
    exts = []
    for ino in range(256, 296):
        for j in range(8):
            b = tm.extents.alloc_data(t, 4096)
            add_extent(tm, t, fs, ino, j * 4096, b, 4096)
            exts.append(b)
    tm.commit()
    data_bytes = 40 * 8 * 4096
    meta_before = tm.sb.bytes_used - base - data_bytes
    assert tm.check() == []
    t = tm.start()
    tm.snapshot(t, FS, 300)
    assert tm.extents.refs(fs.root_bytenr) == 2
    tm.commit()
    assert tm.check() == []
    # a snapshot costs a few root/extent-tree nodes, not a copy of the fs tree
    fs_nodes = fs.walk()
    assert fs_nodes > 20
    assert tm.sb.bytes_used - base - data_bytes - meta_before <= 6 * tm.nodesize
    assert data_used(tm) == data_bytes
    assert all(tm.extents.refs(b) == 1 for b in exts)        # leaves shared: counted once
    t = tm.start()
    drop_extent(tm, t, fs, 256, 0)       # copies a shared leaf: its other extents gain a ref
    tm.commit()
    assert tm.check() == []
    assert tm.extents.refs(exts[0]) == 1                      # still in the snapshot
    assert tm.extents.refs(exts[1]) == 2                      # in two physical leaves now
    # Back-references name the leaf's owner: tree 5 made both the original leaf (now reached
    # only through the snapshot's shared root path) and its copy.
    assert tm.extents.data_backrefs(exts[1]) == {(FS, 256, 4096): 2}
    t = tm.start()
    tm.delete_tree(t, 300)
    tm.commit()
    assert tm.check() == []
    assert tm.extents.lookup(exts[0]) is None                # only the snapshot had it
    assert data_used(tm) == data_bytes - 4096
    assert tm.sb.bytes_used == data_used(tm) + tm_meta_used(tm)
    t = tm.start()
    for k, _fe in file_extents(fs):
        drop_extent(tm, t, fs, k[0], k[2])
    tm.commit()
    assert tm.check() == [] and tm.sb.bytes_used == base
    tm2 = TransactionManager.mount(dev)
    assert tm2.check() == [] and tm2.extents.free.free_bytes == tm.extents.free.free_bytes


def test_reflinks_count_and_overflow_backrefs_to_keyed_items():
    dev, tm = mkfs()
    base = tm.sb.bytes_used
    t = tm.start()
    fs = tm.tree(FS)
    b = tm.extents.alloc_data(t, 8192)
    n = INLINE_DATA_REFS + 6
    for ino in range(256, 256 + n):
        add_extent(tm, t, fs, ino, 0, b, 8192)
    # two items of one inode into the same extent (a split extent): one back-ref, count 2
    add_extent(tm, t, fs, 400, 0, b, 8192, offset=0, num=4096)
    add_extent(tm, t, fs, 400, 4096, b, 8192, offset=4096, num=4096)
    tm.commit()
    assert tm.check() == []
    num, item = tm.extents.lookup(b)
    assert num == 8192 and item.refs == n + 2
    assert len(item.data_refs) == INLINE_DATA_REFS
    back = tm.extents.data_backrefs(b)
    assert back[(FS, 400, 0)] == 2 and sum(back.values()) == n + 2
    keyed = [k for k, _ in tm.extents.btree.items((b, fmt.EXTENT_DATA_REF, 0), (b + 1, 0, 0))]
    assert keyed and all(k[1] == fmt.EXTENT_DATA_REF for k in keyed)
    t = tm.start()
    for ino in range(256, 256 + n):
        drop_extent(tm, t, fs, ino, 0)
    assert drop_extent(tm, t, fs, 400, 0) == 1
    tm.commit()
    assert tm.check() == [] and tm.extents.lookup(b)[1].refs == 1
    assert tm.extents.data_backrefs(b) == {(FS, 400, 0): 1}   # kept in its keyed item
    t = tm.start()
    assert drop_extent(tm, t, fs, 400, 4096) == 0
    tm.commit()
    assert tm.check() == [] and tm.sb.bytes_used == base
    assert not list(tm.extents.btree.items((b, 0, 0), (b + 1, 0, 0)))


def test_backrefs_move_when_a_tree_copies_a_leaf_another_tree_created():
    dev, tm = mkfs()
    t = tm.start()
    fs = tm.tree(FS)
    for ino in range(256, 266):
        add_extent(tm, t, fs, ino, 0, tm.extents.alloc_data(t, 512), 512)
    tm.commit()
    t = tm.start()
    tm.snapshot(t, FS, 500)
    tm.commit()
    t = tm.start()
    tm.delete_tree(t, FS)                # the snapshot is now the only holder of FS's leaves
    tm.commit()
    assert tm.check() == []
    snap = tm.tree(500)
    t = tm.start()
    drop_extent(tm, t, snap, 256, 0)     # copies leaves owned by tree 5 with refcount 1
    tm.commit()
    assert tm.check() == []
    for k, fe in file_extents(snap):
        assert tm.extents.data_backrefs(fe.disk_bytenr) == {(500, k[0], 0): 1}


def test_reference_to_freed_or_free_extent_is_refused():
    dev, tm = mkfs()
    t = tm.start()
    b = tm.extents.alloc_data(t, 512)
    add_extent(tm, t, tm.tree(FS), 256, 0, b, 512)
    assert drop_extent(tm, t, tm.tree(FS), 256, 0) == 0      # new extent: free again at once
    with pytest.raises(InvariantError):
        tm.extents.inc_data_ref(t, b, 512, FS, 257, 0)
    tm.commit()
    t = tm.start()
    b = tm.extents.alloc_data(t, 512)
    add_extent(tm, t, tm.tree(FS), 256, 0, b, 512)
    tm.commit()
    t = tm.start()
    assert drop_extent(tm, t, tm.tree(FS), 256, 0) == 0      # committed: pinned
    with pytest.raises(InvariantError, match="freed"):
        tm.extents.inc_data_ref(t, b, 512, FS, 257, 0)


def test_data_reservation_survives_commit_and_can_be_released():
    dev, tm = mkfs()
    base_free = tm.extents.free.free_bytes
    t = tm.start()
    b = tm.extents.alloc_data(t, 4096)
    tm.commit()                          # e.g. an async DIO write still in flight
    assert tm.extents.lookup(b) is None and not tm.extents.free.overlaps(b, 4096)
    t = tm.start()
    b2 = tm.extents.alloc_data(t, 4096)
    assert b2 != b
    add_extent(tm, t, tm.tree(FS), 256, 0, b, 4096)
    tm.extents.release_data(t, b2)
    tm.commit()
    assert tm.extents.lookup(b)[1].refs == 1 and tm.check() == []
    assert tm.extents.free.free_bytes == base_free - 4096 - (tm.sb.bytes_used - 4096
                                                             - tm_meta_used(tm))
    with pytest.raises(InvariantError):
        tm.extents.release_data(tm.start(), b)


def data_used(tm):
    return sum(k[2] for k, d in tm.extents.btree.items()
               if k[1] == fmt.EXTENT_ITEM and not fmt.DiskExtentItem.decode(d, "t").is_tree_block)


def tm_meta_used(tm):
    return sum(k[2] for k, d in tm.extents.btree.items()
               if k[1] == fmt.EXTENT_ITEM and fmt.DiskExtentItem.decode(d, "t").is_tree_block)


def test_tree_block_refcounts_through_nested_snapshots():
    dev, tm = mkfs()
    base = tm.sb.bytes_used
    t = tm.start()
    fs = tm.tree(FS)
    for i in range(1500):
        fs.insert(t, (i, 1, 0), b"k" * 20)
    tm.commit()
    t = tm.start()
    tm.snapshot(t, FS, 600)
    tm.snapshot(t, 600, 601)                 # snapshot of a snapshot, same transaction
    tm.tree(601).insert(t, (5000, 1, 0), b"new")
    fs.delete(t, (3, 1, 0))
    tm.commit()
    assert tm.check() == []
    assert tm.tree(600).count() == 1500 and tm.tree(601).count() == 1501 and fs.count() == 1499
    for tid in (FS, 600, 601):
        t = tm.start()
        tm.delete_tree(t, tid)
        tm.commit()
        assert tm.check() == []
    # back to the empty filesystem minus the fs tree's empty leaf
    assert tm.sb.bytes_used == base - tm.nodesize


ops_st = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 5), st.integers(256, 270), st.integers(0, 7),
              st.integers(1, 4)),
    st.tuples(st.just("reflink"), st.integers(0, 5), st.integers(256, 270), st.integers(0, 7),
              st.integers(0, 10**6)),
    st.tuples(st.just("punch"), st.integers(0, 5), st.integers(0, 10**6)),
    st.tuples(st.just("snapshot"), st.integers(0, 5)),
    st.tuples(st.just("delete_tree"), st.integers(0, 5)),
    st.tuples(st.just("bulk"), st.integers(0, 5), st.integers(0, 2**32)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("remount")),
), min_size=5, max_size=60)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_st)
def test_refcounts_stay_right_through_random_snapshot_reflink_delete(ops):
    """Random writes (new extents), reflinks, punches, snapshots and tree deletions; after each
    commit fsck agrees, and deleting everything returns bytes_used to the empty filesystem."""
    dev, tm = mkfs()
    empty_used = tm.sb.bytes_used
    trees = [FS]
    t = tm.start()
    next_id = [700]

    def pick(i):
        return tm.tree(trees[i % len(trees)])

    for op in ops:
        if op[0] == "write" and trees:
            tree = pick(op[1])
            b = tm.extents.alloc_data(t, op[4] * 512)
            set_extent(tm, t, tree, op[2], op[3] * 4096, b, op[4] * 512)
        elif op[0] == "reflink" and trees:
            src = [fe for tid in trees for _, fe in file_extents(tm.tree(tid))]
            if not src:
                continue
            fe = src[op[4] % len(src)]
            tree = pick(op[1])
            set_extent(tm, t, tree, op[2], op[3] * 4096, fe.disk_bytenr, fe.disk_num_bytes)
        elif op[0] == "punch" and trees:
            tree = pick(op[2])
            fes = file_extents(tree)
            if fes:
                k, _ = fes[op[1] % len(fes)]
                drop_extent(tm, t, tree, k[0], k[2])
        elif op[0] == "snapshot" and trees:
            src = trees[op[1] % len(trees)]
            tm.snapshot(t, src, next_id[0])
            trees.append(next_id[0])
            next_id[0] += 1
        elif op[0] == "delete_tree" and trees:
            tid = trees.pop(op[1] % len(trees))
            tm.delete_tree(t, tid)
        elif op[0] == "bulk" and trees:
            rng = random.Random(op[2])
            tree = pick(op[1])
            for _ in range(rng.randrange(50, 200)):
                ino, pos = rng.randrange(256, 300), rng.randrange(8) * 4096
                if tree.lookup((ino, fmt.EXTENT_DATA, pos)) is None:
                    add_extent(tm, t, tree, ino, pos, tm.extents.alloc_data(t, 512), 512)
        elif op[0] == "commit":
            tm.commit()
            assert tm.check() == []
            t = tm.start()
        elif op[0] == "remount":
            tm.commit()
            tm = TransactionManager.mount(dev)
            assert tm.check() == []
            t = tm.start()
    tm.commit()
    assert tm.check() == []
    t = tm.start()
    for tid in trees:
        tm.delete_tree(t, tid)
    tm.commit()
    assert tm.check() == []
    if FS in trees:
        empty_used -= tm.nodesize            # the fs tree's own empty leaf went too
    else:
        empty_used -= tm.nodesize
    assert tm.sb.bytes_used == empty_used
    assert TransactionManager.mount(dev).check() == []

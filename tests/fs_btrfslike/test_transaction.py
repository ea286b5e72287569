"""Transactions: crash consistency (power-cut images, write-sequence prefixes, torn writes),
superblock mirrors and the mount-time choice, aborted commits."""
import random

import pytest
from hypothesis import given, settings, strategies as st

from ufs.errors import CorruptError, IOFailure, ReadOnlyError
from ufs.fs_btrfslike import format as fmt
from ufs.fs_btrfslike.transaction import TransactionManager, fsck
from ufs.iomap.bdev import RamDev

FS = fmt.FS_TREE_ID
SIZE = 8 << 20


class RecDev:
    """Forwards to a RamDev, logging every write and flush; ``hook(kind)`` runs before each."""

    def __init__(self, inner):
        self.inner = inner
        self.size = inner.size
        self.logical_block_size = inner.logical_block_size
        self.log = []
        self.hook = None
        self.fail_after = None

    def pread(self, length, addr):
        return self.inner.pread(length, addr)

    def pwrite(self, buf, addr, *, fua=False):
        if self.hook:
            self.hook("write")
        if self.fail_after is not None:
            if self.fail_after == 0:
                raise IOFailure("injected write failure")
            self.fail_after -= 1
        self.log.append(("w", addr, bytes(buf), fua))
        return self.inner.pwrite(buf, addr, fua=fua)

    def flush(self):
        if self.hook:
            self.hook("flush")
        self.log.append(("f",))
        self.inner.flush()


def sb_generation(entry):
    """Generation of a superblock write in the log, else None."""
    _, addr, data, _ = entry
    if len(data) == fmt.SB_SIZE and addr in fmt.superblock_addrs(SIZE) and data[8:16] == fmt.SB_MAGIC:
        return fmt.DiskSuperblock.decode(data, addr).generation
    return None


def state_of(tm):
    return {tid: list(tm.tree(tid).items()) for tid in tm.tree_ids()
            if tid not in (fmt.EXTENT_TREE_ID,)}


def verify_image(img, models, expect_gen):
    dev = RamDev(SIZE, 512, data=img)
    tm = TransactionManager.mount(dev)
    assert tm.generation == expect_gen
    assert state_of(tm) == models[expect_gen]
    assert tm.check() == []
    return tm


def random_txn(tm, rng, snap_ids):
    """Random tree changes in one transaction: inserts, deletes, snapshots, snapshot drops."""
    t = tm.start()
    fs = tm.tree(FS)
    for _ in range(rng.randrange(1, 120)):
        r = rng.random()
        key = (rng.randrange(500), 1, rng.randrange(3))
        target = fs if r < 0.8 or not snap_ids else tm.tree(rng.choice(snap_ids))
        if target.lookup(key) is None:
            target.insert(t, key, bytes([rng.randrange(256)]) * rng.randrange(60))
        else:
            target.delete(t, key)
    r = rng.random()
    if r < 0.25:
        sid = 256 + len(snap_ids) + rng.randrange(10**6)
        tm.snapshot(t, FS, sid)
        snap_ids.append(sid)
    elif r < 0.4 and snap_ids:
        tm.delete_tree(t, snap_ids.pop(rng.randrange(len(snap_ids))))
    return t


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 2**32))
def test_crash_images_hold_last_or_previous_generation(seed):
    """Power cuts before every device operation of several commits: the image mounts as the
    generation whose superblock was durable, with exactly that generation's trees."""
    rng = random.Random(seed)
    ram = RamDev(SIZE, 512)
    dev = RecDev(ram)
    tm = TransactionManager.mkfs(dev, nodesize=1024, sectorsize=512)
    models = {tm.generation: state_of(tm)}
    snap_ids = []
    checked = 0
    for _ in range(5):
        random_txn(tm, rng, snap_ids)
        committing = tm.generation + 1
        sb_written = []
        images = []

        def hook(kind):
            # Before this operation: the image a power cut would leave now.
            if rng.random() < 0.35:
                images.append((ram.crash(seed=rng.randrange(2**32)), bool(sb_written)))  # noqa: B023

        def note_sb(orig=dev.pwrite):
            def pwrite(buf, addr, *, fua=False):
                r = orig(buf, addr, fua=fua)
                if fua and len(buf) == fmt.SB_SIZE:
                    sb_written.append(addr)  # noqa: B023
                return r
            return pwrite
        dev.pwrite = note_sb()
        dev.hook = hook
        tm.commit()
        dev.hook = None
        del dev.pwrite
        models[tm.generation] = state_of(tm)
        assert tm.generation == committing
        images.append((ram.crash(seed=1), True))
        for img, durable in images:
            verify_image(img, models, committing if durable else committing - 1)
            checked += 1
    assert checked >= 5


def test_every_prefix_of_the_write_sequence_mounts_consistently():
    """Replaying the first k writes (in order), and tearing write k in half: the image holds the
    newest generation one complete superblock copy names, else the one before."""
    rng = random.Random(7)
    ram = RamDev(SIZE, 512)
    dev = RecDev(ram)
    tm = TransactionManager.mkfs(dev, nodesize=1024, sectorsize=512)
    base = ram.contents()
    dev.log = []
    models = {tm.generation: state_of(tm)}
    snap_ids = []
    for _ in range(8):
        random_txn(tm, rng, snap_ids)
        tm.commit()
        models[tm.generation] = state_of(tm)
    img = bytearray(base)
    gen = min(models)
    writes = [e for e in dev.log if e[0] == "w"]
    mounted = 0
    for i, (_, addr, data, _fua) in enumerate(writes):
        g = sb_generation(writes[i])
        # Torn: only the start of this write reached the media.  Nodes tear at a sector
        # boundary; a superblock (whose fields all sit in its first sector) inside its first
        # 64 bytes, so the copy mixes old and new bytes and fails its checksum, unless the
        # bytes after the cut happen to be the same in both.
        torn = bytearray(img)
        cut = 64 if g is not None else ((len(data) // 2) // 512 * 512 or 512)
        torn[addr:addr + cut] = data[:cut]
        expect = gen
        if g is not None:
            try:
                fmt.DiskSuperblock.decode(bytes(torn[addr:addr + fmt.SB_SIZE]), addr)
                expect = max(gen, g)
            except CorruptError:
                pass
        verify_image(bytes(torn), models, expect)
        img[addr:addr + len(data)] = data
        if g is not None:
            gen = max(gen, g)
        verify_image(bytes(img), models, gen)
        mounted += 2
    assert gen == max(models) and mounted > 60


def test_blocks_freed_are_not_reused_before_the_commit_is_durable():
    ram = RamDev(SIZE, 512)
    tm = TransactionManager.mkfs(ram, nodesize=1024, sectorsize=512)
    t = tm.start()
    fs = tm.tree(FS)
    for i in range(400):
        fs.insert(t, (i, 1, 0), b"p" * 30)
    tm.commit()
    committed_blocks = set()
    fs.walk(lambda n: committed_blocks.add(n.bytenr))
    t = tm.start()
    for i in range(0, 400, 2):
        fs.delete(t, (i, 1, 0))
    for i in range(400, 800):
        fs.insert(t, (i, 1, 0), b"n" * 30)
    # every block of the committed generation is either still referenced or pinned
    assert not any(tm.extents.free.overlaps(b, 1024) for b in committed_blocks)
    new_blocks = set(tm.cache.dirty)
    assert not new_blocks & committed_blocks
    pinned = {a for a, _ in tm.extents.pinned}
    assert pinned and pinned <= committed_blocks
    tm.commit()
    assert all(tm.extents.free.contains(a, 1024) for a in pinned)


def test_mount_uses_mirror_when_primary_is_bad():
    ram = RamDev(SIZE, 512)
    tm = TransactionManager.mkfs(ram, nodesize=1024, sectorsize=512)
    t = tm.start()
    tm.tree(FS).insert(t, (1, 1, 0), b"hello")
    tm.commit()
    gen = tm.generation
    ram.pwrite(b"\xff" * 512, fmt.SB_PRIMARY_ADDR + 512)
    tm2 = TransactionManager.mount(ram)
    assert tm2.generation == gen and tm2.sb.bytenr == fmt.superblock_addrs(SIZE)[1]
    assert tm2.tree(FS).lookup((1, 1, 0)) == b"hello"
    # the next commit rewrites every copy
    t = tm2.start()
    tm2.tree(FS).insert(t, (2, 1, 0), b"")
    tm2.commit()
    for addr in fmt.superblock_addrs(SIZE):
        assert fmt.DiskSuperblock.decode(ram.pread(4096, addr), addr).generation == gen + 1
    for addr in fmt.superblock_addrs(SIZE):
        ram.pwrite(bytes(4096), addr)
    with pytest.raises(CorruptError) as ei:
        TransactionManager.mount(ram)
    assert ei.value.what == "superblock"
    assert fsck(ram) and "superblock" in fsck(ram)[0]


def test_newest_superblock_with_bad_root_falls_back_to_previous_generation():
    ram = RamDev(SIZE, 512)
    dev = RecDev(ram)
    tm = TransactionManager.mkfs(dev, nodesize=1024, sectorsize=512)
    t = tm.start()
    tm.tree(FS).insert(t, (1, 1, 0), b"one")
    tm.commit()
    before = ram.contents()
    dev.log = []
    t = tm.start()
    tm.tree(FS).insert(t, (2, 1, 0), b"two")
    tm.commit()
    # Crash after the first superblock copy of the new generation (mirror still old) ...
    img = bytearray(before)
    for e in dev.log:
        if e[0] != "w":
            continue
        img[e[1]:e[1] + len(e[2])] = e[2]
        if sb_generation(e):
            break
    # ... and the new root-tree root node is damaged.
    new_root = tm.sb.root
    img[new_root + 200] ^= 1
    tm2 = TransactionManager.mount(RamDev(SIZE, 512, data=bytes(img)))
    assert tm2.generation == tm.generation - 1
    assert list(tm2.tree(FS).items()) == [((1, 1, 0), b"one")]


@pytest.mark.parametrize("fail_at", ["first_write", "last_superblock"])
def test_failed_commit_aborts_and_leaves_a_whole_generation(fail_at):
    ram = RamDev(SIZE, 512)
    dev = RecDev(ram)
    tm = TransactionManager.mkfs(dev, nodesize=1024, sectorsize=512)
    t = tm.start()
    for i in range(100):
        tm.tree(FS).insert(t, (i, 1, 0), b"a" * 10)
    tm.commit()
    gen = tm.generation
    t = tm.start()
    for i in range(100, 300):
        tm.tree(FS).insert(t, (i, 1, 0), b"b" * 10)
    if fail_at == "first_write":
        dev.fail_after = 0
    else:
        def hook(kind, seen=[]):  # noqa: B006 - the list is the state across calls
            seen.append(kind)
            if kind == "flush":
                # after the flush: every superblock copy but the last may be written
                dev.fail_after = len(fmt.superblock_addrs(SIZE)) - 1
        dev.hook = hook
    with pytest.raises(IOFailure):
        tm.commit()
    assert tm.aborted
    with pytest.raises(ReadOnlyError):
        tm.start()
    tm2 = TransactionManager.mount(RamDev(SIZE, 512, data=ram.crash(seed=3)))
    if fail_at == "first_write":
        assert tm2.generation == gen and tm2.tree(FS).count() == 100
    else:     # the primary copy of the new generation is durable: it wins
        assert tm2.generation == gen + 1 and tm2.tree(FS).count() == 300
    assert tm2.check() == []


def test_empty_commit_writes_nothing():
    ram = RamDev(SIZE, 512)
    dev = RecDev(ram)
    tm = TransactionManager.mkfs(dev, nodesize=1024, sectorsize=512)
    dev.log = []
    gen = tm.generation
    tm.start()
    assert tm.commit() == gen and dev.log == []


def test_commit_order_nodes_flush_then_fua_superblocks():
    ram = RamDev(SIZE, 512)
    dev = RecDev(ram)
    tm = TransactionManager.mkfs(dev, nodesize=1024, sectorsize=512)
    dev.log = []
    t = tm.start()
    for i in range(300):
        tm.tree(FS).insert(t, (i, 1, 0), b"o" * 20)
    tm.commit()
    kinds = ["flush" if e[0] == "f" else ("sb" if sb_generation(e) else "node") for e in dev.log]
    nflush = kinds.index("flush")
    assert set(kinds[:nflush]) == {"node"} and kinds.count("flush") == 1
    assert kinds[nflush + 1:] == ["sb"] * len(fmt.superblock_addrs(SIZE))
    assert all(e[3] for e in dev.log[nflush + 1:]) and not any(e[3] for e in dev.log[:nflush])
    sb_addrs = [e[1] for e in dev.log[nflush + 1:]]
    assert sb_addrs == sorted(fmt.superblock_addrs(SIZE))


def test_pre_commit_hooks_run_inside_the_committing_transaction():
    ram = RamDev(SIZE, 512)
    tm = TransactionManager.mkfs(ram, nodesize=1024, sectorsize=512)
    calls = []

    def hook(trans):
        calls.append(trans.transid)
        tm.tree(FS).put(trans, (256, 1, 0), b"inode %d" % trans.transid)
    tm.pre_commit_hooks.append(hook)
    t = tm.start()
    tm.tree(FS).insert(t, (300, 1, 0), b"x")
    tm.commit()
    assert calls == [tm.generation]
    tm2 = TransactionManager.mount(ram)
    assert tm2.tree(FS).lookup((256, 1, 0)) == b"inode %d" % tm.generation

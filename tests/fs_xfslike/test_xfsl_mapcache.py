"""The xfslike mapping cache (``ExtentMap.last_found``) behind the overwrite fast path of
``iomap_begin``: after every kind of mapping change (allocation, merge on conversion, punch,
zero-range, preallocation, truncate, write-back allocation, a cancelled transaction, a map
re-read) ``iomap_begin`` answers exactly what the extent list says; a cache hit takes no
metadata lock, a NOWAIT lookup still fails while that lock is busy, and a lookup nested in a
transaction caches nothing.  RamDev images: no root needed."""
from __future__ import annotations

import errno
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ufs import api
from ufs.fs_xfslike import format as fmt
from ufs.iomap import IoMap, IterFlag, MapFlag, MapType
import xfsl_testdev
from xfsl_testdev import abuf

# shared fixtures (xfsl_testdev): a formatted RamDev, and it mounted (fsck clean after)
dev = xfsl_testdev.dev
fs = xfsl_testdev.fs

BS = 4096
O_DIRECT = os.O_DIRECT
RD = int(IterFlag.DIRECT)
WR = int(IterFlag.WRITE | IterFlag.DIRECT)
NOWAIT_WR = int(IterFlag.WRITE | IterFlag.DIRECT | IterFlag.NOWAIT)


def inode_of(fs, path):
    return fs.sb.iget(fs.stat(path).st_ino)


def probe(inode, pos, flags=RD):
    """What iomap_begin maps at ``pos`` for one block: (offset, length, type, addr, flags)."""
    m, src = IoMap(), IoMap()
    inode.i_fop.iomap_ops.iomap_begin(inode, pos, BS, flags, m, src)
    return (m.offset, m.length, int(m.type), m.addr if m.type in (MapType.MAPPED,
                                                                   MapType.UNWRITTEN) else None,
            int(m.flags))


def truth(fs, inode, blk):
    """The extent containing ``blk``, by a linear scan of the extent list (not ``find``)."""
    with fs.sb.meta_lock:
        for e in fs.sb.bmap(inode).ext:
            if e[0] <= blk < e[0] + e[2]:
                return e
    return None


def check_cache_invariant(fs, inode):
    bm = inode.bmap
    if bm is not None and bm.last_found is not None:
        assert bm.last_found in bm.ext, (bm.last_found, bm.ext)


def check_all(fs, inode, nblk):
    """Every block's read mapping (and write mapping inside extents) equals the extent list."""
    check_cache_invariant(fs, inode)
    for blk in range(nblk):
        e = truth(fs, inode, blk)
        if e is None:
            got = probe(inode, blk * BS)
            assert got[2] not in (MapType.MAPPED, MapType.UNWRITTEN), (blk, got)
            continue
        kind = MapType.UNWRITTEN if e[3] & fmt.EXT_UNWRITTEN else MapType.MAPPED
        want = (e[0] * BS, e[2] * BS, int(kind), e[1] * BS)
        for flags in (RD, WR):
            got = probe(inode, blk * BS, flags)
            assert got[:4] == want, (blk, flags, got, want)
            dirty = flags == WR and (blk + 1) * BS > inode.i_size
            assert bool(got[4] & MapFlag.DIRTY) == dirty, (blk, got)
            check_cache_invariant(fs, inode)


def warm(inode, blk):
    """Look ``blk`` up once so the cache holds its extent (when it has one)."""
    probe(inode, blk * BS)
    return inode.bmap.last_found


def test_hit_takes_no_metadata_lock_and_matches_the_map(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    fs.pwrite(fd, abuf(b"a" * 8 * BS), 0)
    inode = inode_of(fs, "/f")
    e = warm(inode, 3)
    assert e is not None and e == truth(fs, inode, 3)

    class CountingLock:
        def __init__(self, inner):
            self.inner, self.acquires = inner, 0

        def acquire(self, *a, **k):
            self.acquires += 1
            return self.inner.acquire(*a, **k)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    real = fs.sb.meta_lock
    counting = CountingLock(real)
    fs.sb.meta_lock = counting
    try:
        for blk in range(8):
            assert probe(inode, blk * BS, WR)[:2] == (0, 8 * BS)
        assert counting.acquires == 0                  # every lookup was a cache hit
        probe(inode, 9 * BS)                           # past the extent: the locked lookup
        assert counting.acquires == 1
    finally:
        fs.sb.meta_lock = real
    fs.close(fd)


def test_every_kind_of_map_change_invalidates(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    inode = inode_of(fs, "/f")
    n = 24
    # allocation next to a cached extent, then the conversion merges them
    fs.pwrite(fd, abuf(b"a" * 2 * BS), 0)
    assert warm(inode, 1) is not None
    fs.pwrite(fd, abuf(b"b" * BS), 2 * BS)
    assert truth(fs, inode, 0)[2] == 3                 # merged: one 3-block extent
    assert probe(inode, 0)[1] == 3 * BS                # not the cached 2-block one
    check_all(fs, inode, n)
    # extending write far away (exclusive path), leaving a hole
    fs.pwrite(fd, abuf(b"c" * 4 * BS), 10 * BS)
    check_all(fs, inode, n)
    # punch the middle of a cached extent: it splits
    warm(inode, 11)
    fs.fallocate(fd, api.FALLOC_FL_PUNCH_HOLE | api.FALLOC_FL_KEEP_SIZE, 11 * BS, BS)
    assert truth(fs, inode, 11) is None and probe(inode, 11 * BS)[2] == MapType.HOLE
    check_all(fs, inode, n)
    # zero-range turns written blocks unwritten
    warm(inode, 1)
    fs.fallocate(fd, api.FALLOC_FL_ZERO_RANGE | api.FALLOC_FL_KEEP_SIZE, 0, 2 * BS)
    assert probe(inode, 0)[2] == MapType.UNWRITTEN
    check_all(fs, inode, n)
    # a DIO write converts the cached unwritten extent back
    warm(inode, 0)
    fs.pwrite(fd, abuf(b"d" * BS), 0)
    assert probe(inode, 0)[2] == MapType.MAPPED
    check_all(fs, inode, n)
    # preallocation past EOF
    warm(inode, 12)
    fs.fallocate(fd, api.FALLOC_FL_KEEP_SIZE, 14 * BS, 4 * BS)
    check_all(fs, inode, n)
    # buffered write into a hole, written back by fsync (delalloc -> unwritten -> written)
    bfd = fs.open("/f", os.O_RDWR, 0)
    warm(inode, 2)
    fs.pwrite(bfd, b"e" * 2 * BS, 4 * BS)
    check_all(fs, inode, n)                            # delalloc over the hole
    fs.fsync(bfd)
    check_all(fs, inode, n)
    # truncate down through a cached extent, then up again
    warm(inode, 12)
    fs.ftruncate(fd, 11 * BS)
    assert truth(fs, inode, 12) is None and probe(inode, 12 * BS)[2] != MapType.MAPPED
    check_all(fs, inode, n)
    fs.ftruncate(fd, 20 * BS)
    check_all(fs, inode, n)
    # the map read again from disk (a new ExtentMap: no cache carried over)
    warm(inode, 0)
    inode.bmap = None
    check_all(fs, inode, n)
    fs.close(bfd)
    assert fs.pread(fd, BS, 0) == b"d" * BS
    fs.close(fd)


def test_cancelled_transaction_leaves_no_stale_cache(fs, monkeypatch):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    fs.pwrite(fd, abuf(b"a" * 6 * BS), 0)
    fs.fsync(fd)
    inode = inode_of(fs, "/f")
    assert warm(inode, 2) is not None
    sb = fs.sb
    real_log_inode = type(sb).log_inode

    def failing_log_inode(self, tx, ino):
        real_log_inode(self, tx, ino)               # joins the inode: a cancel reloads it
        raise OSError(errno.EIO, "injected")
    monkeypatch.setattr(type(sb), "log_inode", failing_log_inode)
    with pytest.raises(OSError):
        # the punch changes the map (set_range), then the transaction fails and is
        # cancelled: the inode is reloaded from disk
        fs.fallocate(fd, api.FALLOC_FL_PUNCH_HOLE | api.FALLOC_FL_KEEP_SIZE, 2 * BS, BS)
    monkeypatch.undo()
    assert truth(fs, inode, 2) is not None             # the punch did not happen
    check_all(fs, inode, 8)
    assert fs.pread(fd, 6 * BS, 0) == b"a" * 6 * BS
    fs.close(fd)


def test_nowait_still_fails_while_metadata_is_busy_even_when_cached(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    fs.pwrite(fd, abuf(b"a" * 2 * BS), 0)
    inode = inode_of(fs, "/f")
    assert warm(inode, 0) is not None
    out = []
    with fs.sb.meta_lock:                               # busy on this thread...
        def other():                                    # ...seen from another one
            try:
                probe(inode, 0, NOWAIT_WR)
                out.append(0)
            except OSError as e:
                out.append(e.errno)
        t = threading.Thread(target=other)
        t.start()
        t.join(10)
    assert out == [errno.EAGAIN]
    assert probe(inode, 0, NOWAIT_WR)[2] == MapType.MAPPED   # free again: maps
    fs.close(fd)


def test_lookup_inside_a_transaction_caches_nothing(fs):
    fd = fs.open("/f", os.O_CREAT | os.O_RDWR | O_DIRECT, 0o644)
    fs.pwrite(fd, abuf(b"a" * 2 * BS), 0)
    inode = inode_of(fs, "/f")
    inode.bmap.last_found = None
    with fs.sb.trans():
        assert probe(inode, 0)[2] == MapType.MAPPED
        assert inode.bmap.last_found is None
    assert probe(inode, 0)[2] == MapType.MAPPED          # outside: cached
    assert inode.bmap.last_found == truth(fs, inode, 0)
    fs.close(fd)


_OPS = st.lists(st.tuples(st.sampled_from(["dio", "buf", "punch", "zero", "prealloc",
                                           "trunc", "warm", "sync"]),
                          st.integers(0, 23), st.integers(1, 6)),
                min_size=1, max_size=12)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_random_map_changes_never_leave_a_stale_answer(fs, ops):
    path = "/h"
    fd = fs.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR | O_DIRECT, 0o644)
    bfd = fs.open(path, os.O_RDWR, 0)
    try:
        inode = inode_of(fs, path)
        fs.pwrite(fd, abuf(b"s" * 8 * BS), 4 * BS)
        for op, blk, n in ops:
            if op == "dio":
                fs.pwrite(fd, abuf(bytes([blk + 1]) * n * BS), blk * BS)
            elif op == "buf":
                fs.pwrite(bfd, bytes([blk + 1]) * n * BS, blk * BS)
            elif op == "punch":
                fs.fallocate(fd, api.FALLOC_FL_PUNCH_HOLE | api.FALLOC_FL_KEEP_SIZE,
                             blk * BS, n * BS)
            elif op == "zero":
                fs.fallocate(fd, api.FALLOC_FL_ZERO_RANGE, blk * BS, n * BS)
            elif op == "prealloc":
                fs.fallocate(fd, 0, blk * BS, n * BS)
            elif op == "trunc":
                fs.ftruncate(fd, blk * BS + n * 100)
            elif op == "sync":
                fs.fsync(bfd)
            else:
                warm(inode, blk)
            check_all(fs, inode, 32)
    finally:
        fs.close(bfd)
        fs.close(fd)
        fs.unlink(path)


def test_pwrite_takes_every_buffer_shape(fs):
    """FdTable.write uses a flat byte view as is and casts anything else, as before."""
    import array

    fd = fs.open("/v", os.O_CREAT | os.O_RDWR, 0o644)
    assert fs.pwrite(fd, memoryview(b"abcd"), 0) == 4             # flat view: as is
    assert fs.pwrite(fd, b"ef", 4) == 2                             # bytes
    assert fs.pwrite(fd, bytearray(b"gh"), 6) == 2
    ints = array.array("i", [1, 2])                                 # format "i": cast to bytes
    assert fs.pwrite(fd, memoryview(ints), 8) == ints.itemsize * 2
    two_d = memoryview(b"ijkl").cast("B", (2, 2))                   # 2-D: flattened
    assert fs.pwrite(fd, two_d, 16) == 4
    with pytest.raises(TypeError):
        fs.pwrite(fd, memoryview(b"abcdef")[::2], 20)               # not contiguous
    released = memoryview(b"zz")
    released.release()
    with pytest.raises(ValueError):
        fs.pwrite(fd, released, 20)
    assert fs.pread(fd, 20, 0) == b"abcdefgh" + ints.tobytes() + b"ijkl"
    assert fs.write(fd, memoryview(b"tail")) == 4                   # f_pos path too
    fs.close(fd)

"""ufs.vfs.buffered: buffered read/write through the page cache and IomapIter over a RamDev,
with a tiny extent-mapping filesystem ("minifs"): holes, DELALLOC reservations allocated at
write-back, UNWRITTEN extents converted in writeback_end, INLINE data, partial pages and
sub-page blocks, EOF handling, errors, O_APPEND/O_DSYNC, and a Hypothesis model check."""
from __future__ import annotations

import errno
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ufs.errors import IOFailure, NoSpaceError
from ufs.iomap import IoMap, IomapOps, IterFlag, MapFlag, MapType, RamDev
from ufs.vfs import (File, Inode, Superblock, WritebackOps, buffered_read, buffered_write,
                     buffered_zero_range, generic_file_read, generic_file_write, lockdep)

DEV_SIZE = 4 << 20
HOLE, DELALLOC, MAPPED, UNWRITTEN, INLINE = (int(t) for t in (
    MapType.HOLE, MapType.DELALLOC, MapType.MAPPED, MapType.UNWRITTEN, MapType.INLINE))


class MiniFs:
    """file block -> [type, device block or None]; a bump allocator for device blocks."""

    def __init__(self, dev, bs):
        self.dev, self.bs = dev, bs
        self.map: dict[int, list] = {}
        self.next_blk = 1               # device block 0 stays unused
        self.begins, self.ends = [], []
        self.fail_begin_at = None       # raise at the first begin at/after this pos
        self.inline = None              # bytearray: the whole file is INLINE when set

    def alloc(self, n):
        b = self.next_blk
        self.next_blk += n
        if self.next_blk * self.bs > self.dev.size:
            raise NoSpaceError("minifs full")
        return b

    def place(self, blk, typ, data=None):
        """Give file block ``blk`` a real block of type ``typ`` (MAPPED/UNWRITTEN) with data."""
        d = self.alloc(1)
        self.map[blk] = [typ, d]
        if data is not None:
            self.dev.pwrite(data, d * self.bs)


class MiniOps(IomapOps):
    def __init__(self, fs):
        self.fs = fs

    def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
        fs = self.fs
        fs.begins.append((pos, length, flags))
        if fs.fail_begin_at is not None and pos >= fs.fail_begin_at:
            raise IOFailure("injected iomap_begin failure")
        if fs.inline is not None:
            if pos < len(fs.inline):
                iomap.offset, iomap.length, iomap.type = 0, len(fs.inline), INLINE
                iomap.inline_data = fs.inline
            else:                                 # past the inline area: a hole
                iomap.offset, iomap.length, iomap.type = pos, length, HOLE
            return
        bs = fs.bs
        blk, last = pos // bs, (pos + length - 1) // bs
        if flags & IterFlag.WRITE and not flags & IterFlag.ZERO and blk not in fs.map:
            n = 1
            while blk + n <= last and blk + n not in fs.map:
                n += 1
            for b in range(blk, blk + n):
                fs.map[b] = [DELALLOC, None]      # reserve; allocate at write-back
        e = fs.map.get(blk)
        typ = HOLE if e is None else e[0]
        n = 1
        while blk + n <= last:
            f = fs.map.get(blk + n)
            if e is None:
                if f is not None:
                    break
            elif f is None or f[0] != typ or (e[1] is not None and f[1] != e[1] + n):
                break
            n += 1
        iomap.offset, iomap.length, iomap.type = blk * bs, n * bs, typ
        if typ in (MAPPED, UNWRITTEN):
            iomap.addr, iomap.bdev = e[1] * bs, fs.dev

    def iomap_end(self, inode, pos, length, written, flags, iomap):
        self.fs.ends.append((pos, length, written, flags, iomap.flags))


class MiniWb(WritebackOps):
    def __init__(self, fs):
        self.fs = fs
        self.calls = []

    def map_blocks(self, inode, pos, length):
        fs, bs = self.fs, self.fs.bs
        blk, last = pos // bs, (pos + length - 1) // bs
        e = fs.map.get(blk)
        if e is None or e[0] == DELALLOC:
            n = 1
            while blk + n <= last and (fs.map.get(blk + n) or [DELALLOC])[0] == DELALLOC:
                n += 1
            d = fs.alloc(n)
            for i in range(n):
                fs.map[blk + i] = [MAPPED, d + i]
            e = fs.map[blk]
        n = 1
        while blk + n <= last and fs.map.get(blk + n) == [e[0], e[1] + n]:
            n += 1
        self.calls.append(("map", pos, length, e[0]))
        return IoMap(offset=blk * bs, length=n * bs, type=e[0], addr=e[1] * bs, bdev=fs.dev)

    def writeback_end(self, inode, pos, length, error):
        self.calls.append(("end", pos, length, error))
        if error:
            return
        for b in range(pos // self.fs.bs, (pos + length) // self.fs.bs):
            if self.fs.map[b][0] == UNWRITTEN:
                self.fs.map[b][0] = MAPPED


class Fops:
    def __init__(self):
        self.syncs = []

    def fsync(self, file, start, end, datasync):
        # like btrfs: fsync takes i_rwsem, so it must not run under the writer's lock
        with file.f_inode.i_rwsem.write_locked():
            file.f_inode.i_mapping.write_and_wait_range(start, end)
        self.syncs.append((start, end, datasync))


class Env:
    def __init__(self, bs=4096, cap=256 << 20, flags=os.O_RDWR):
        self.dev = RamDev(DEV_SIZE, 512, volatile_cache=False)
        self.fs = MiniFs(self.dev, bs)
        self.ops = MiniOps(self.fs)
        self.wb = MiniWb(self.fs)
        self.sb = Superblock(self.dev, bs, page_cache_cap=cap, wb_ops=self.wb)
        self.inode = Inode(self.sb, 2)
        self.fops = Fops()
        self.file = File(self.inode, flags, self.fops)

    def write(self, pos, data, **kw):
        k = self.file.kiocb(pos, write=True, **kw)
        n = buffered_write(k, data, self.ops)
        assert k.ki_pos == pos + n
        return n

    def read(self, pos, length):
        k = self.file.kiocb(pos)
        out = buffered_read(k, length, self.ops)
        assert k.ki_pos == pos + len(out)
        return out

    def disk(self, pos, length):
        """File bytes as the device holds them (holes/unwritten/delalloc as zeros)."""
        bs = self.fs.bs
        out = bytearray()
        for b in range(pos // bs, (pos + length + bs - 1) // bs):
            e = self.fs.map.get(b)
            out += self.dev.pread(bs, e[1] * bs) if e and e[0] == MAPPED else bytes(bs)
        off = pos % bs
        return bytes(out[off:off + length])

    def close(self):
        self.sb.shutdown()
        self.dev.close()


@pytest.fixture(params=[4096, 1024], ids=["bs4k", "bs1k"])
def env(request):
    e = Env(request.param)
    yield e
    e.close()


def test_read_holes_and_eof(env):
    assert env.read(0, 100) == b""                    # empty file
    env.inode.i_size = 10000
    assert env.read(0, 100) == bytes(100)             # hole reads as zeros
    assert env.read(9990, 100) == bytes(10)           # clamped to i_size
    assert env.read(20000, 10) == b""
    buf = bytearray(b"\xee" * 50)
    k = env.file.kiocb(9980)
    assert buffered_read(k, buf, env.ops) == 20 and bytes(buf[:20]) == bytes(20)
    assert buf[20:] == b"\xee" * 30 and k.ki_pos == 10000
    assert all(flags == 0 for _, _, flags in env.fs.begins)   # reads pass no op flag
    # nothing asked of the fs past the block holding EOF
    assert all(p + n <= -(-10000 // env.fs.bs) * env.fs.bs for p, n, _ in env.fs.begins)


def test_read_mapped_unwritten_and_cache_hits(env):
    bs = env.fs.bs
    env.fs.place(0, MAPPED, b"A" * bs)
    env.fs.place(1, UNWRITTEN, b"B" * bs)             # stale bytes under an unwritten extent
    env.fs.place(2, MAPPED, b"C" * bs)
    env.inode.i_size = 3 * bs
    assert env.read(0, 3 * bs) == b"A" * bs + bytes(bs) + b"C" * bs
    n = len(env.fs.begins)
    assert env.read(10, bs) == (b"A" * bs + bytes(bs))[10:10 + bs]
    assert len(env.fs.begins) == n                    # served from the cache


def test_read_zeroes_bytes_past_eof_in_the_last_block(env):
    bs = env.fs.bs
    env.fs.place(0, MAPPED, b"Q" * bs)                # garbage past EOF on disk
    env.inode.i_size = 100
    assert env.read(0, bs) == b"Q" * 100
    env.inode.i_size = 300                            # extended without writing (e.g. setattr)
    assert env.read(0, 300) == b"Q" * 100 + bytes(200)


def test_partial_write_reads_old_block_first(env):
    bs = env.fs.bs
    env.fs.place(0, MAPPED, bytes(range(256)) * (bs // 256))
    env.inode.i_size = bs
    assert env.write(100, b"xyz") == 3
    expect = bytearray(bytes(range(256)) * (bs // 256))
    expect[100:103] = b"xyz"
    assert env.read(0, bs) == bytes(expect)
    assert env.inode.i_mapping.dirty_ranges() == [(0, bs)]
    env.inode.i_mapping.write_and_wait_range()
    assert env.disk(0, bs) == bytes(expect)
    assert env.wb.calls[0][3] == MAPPED               # overwrite in place


def test_extending_write_into_hole_delalloc_then_writeback(env):
    bs = env.fs.bs
    data = os.urandom(3 * bs + 123)
    assert env.write(bs + 7, data) == len(data)
    end = bs + 7 + len(data)
    assert env.inode.i_size == end
    # the write reserved DELALLOC blocks and set SIZE_CHANGED on the mapping it extended with
    assert env.fs.map[1][0] == DELALLOC
    assert any(f & MapFlag.SIZE_CHANGED for *_, f in env.fs.ends)
    assert all(flags & IterFlag.WRITE for _, _, flags in env.fs.begins)
    assert env.read(0, end + 10) == bytes(bs + 7) + data
    assert 0 not in env.fs.map                        # block 0 never written: stays a hole
    env.inode.i_mapping.write_and_wait_range()
    assert all(e[0] == MAPPED for e in env.fs.map.values())
    assert 0 not in env.fs.map
    assert env.disk(0, end) == bytes(bs + 7) + data
    # the EOF block on disk is zero past EOF
    eof_blk = end // bs
    assert env.disk(end, (eof_blk + 1) * bs - end) == bytes((eof_blk + 1) * bs - end)


def test_subpage_block_write_dirties_only_its_block():
    e = Env(bs=1024)
    try:
        e.inode.i_size = 8192
        assert e.write(2048 + 10, b"mid") == 3
        assert e.inode.i_mapping.dirty_ranges() == [(2048, 3072)]
        page = e.inode.i_mapping.find_page(0)
        assert page.uptodate == 0b0100                # the other blocks were never read
        e.inode.i_mapping.write_and_wait_range()
        assert sorted(e.fs.map) == [2]                # only that block got allocated
        assert e.read(0, 4096) == bytes(2058) + b"mid" + bytes(4096 - 2061)
    finally:
        e.close()


def test_unwritten_converted_at_writeback(env):
    bs = env.fs.bs
    env.fs.place(0, UNWRITTEN, b"S" * bs)             # stale data must never show
    env.inode.i_size = bs
    env.write(10, b"new")
    assert env.read(0, 20) == bytes(10) + b"new" + bytes(7)
    env.inode.i_mapping.write_and_wait_range()
    assert env.fs.map[0][0] == MAPPED
    assert ("end", 0, bs, 0) in env.wb.calls
    assert env.disk(0, bs) == bytes(10) + b"new" + bytes(bs - 13)


def test_inline_read_and_write(env):
    env.fs.inline = bytearray(b"inline-data" + bytes(100 - 11))
    env.inode.i_size = 11
    assert env.read(0, 100) == b"inline-data"
    assert env.write(7, b"DATA!") == 5
    assert env.inode.i_size == 12
    assert bytes(env.fs.inline[:12]) == b"inline-DATA!"   # written through
    assert env.inode.i_mapping.nrdirty == 0            # INLINE pages are not dirtied
    assert env.read(0, 100) == b"inline-DATA!"


def test_write_error_semantics(env):
    bs = env.fs.bs
    env.fs.place(0, MAPPED, b"a" * bs)
    env.fs.place(2, MAPPED, b"c" * bs)                # block 1 a hole: three mappings
    env.inode.i_size = 3 * bs
    env.fs.fail_begin_at = bs                         # the second mapping fails
    assert env.write(0, b"W" * 3 * bs) == bs          # short write, no exception
    env.fs.fail_begin_at = None
    assert env.read(0, 3 * bs) == b"W" * bs + bytes(bs) + b"c" * bs
    env.fs.fail_begin_at = 0
    with pytest.raises(IOFailure):                    # no progress: the error itself
        env.write(5, b"x")
    k = env.file.kiocb(5, write=True)
    with pytest.raises(IOFailure):
        buffered_write(k, b"x", env.ops)
    assert k.ki_pos == 5


def test_read_device_error_ends_mapping_and_raises(env):
    from ufs.iomap import FaultDev
    bs = env.fs.bs
    fdev = FaultDev(env.dev)
    try:
        env.fs.place(0, MAPPED, b"r" * bs)
        env.fs.dev = fdev
        env.fs.map[0] = [MAPPED, env.fs.map[0][1]]
        env.inode.i_size = bs
        fdev.fail("read", errno=errno.EIO)
        with pytest.raises(OSError) as ei:
            env.read(0, 10)
        assert ei.value.errno == errno.EIO
        assert env.fs.ends and env.fs.ends[-1][2] == 0   # iomap_end ran with nothing advanced
        fdev.clear()
        assert env.read(0, 10) == b"r" * 10
    finally:
        fdev.close()


def test_zero_range(env):
    bs = env.fs.bs
    env.fs.place(0, MAPPED, b"z" * bs)
    env.inode.i_size = 3 * bs
    begins = len(env.fs.begins)
    assert buffered_zero_range(env.inode, 100, 3 * bs - 100, env.ops) == 3 * bs - 100
    assert all(flags & IterFlag.ZERO for _, _, flags in env.fs.begins[begins:])
    assert 1 not in env.fs.map and 2 not in env.fs.map   # holes skipped, not allocated
    assert env.inode.i_size == 3 * bs
    assert env.read(0, 3 * bs) == b"z" * 100 + bytes(3 * bs - 100)
    env.inode.i_mapping.write_and_wait_range()
    assert env.disk(0, bs) == b"z" * 100 + bytes(bs - 100)


def test_generic_file_write_append_and_dsync_sync_after_unlock():
    e = Env(flags=os.O_RDWR | os.O_APPEND | os.O_DSYNC)
    try:
        with lockdep.checking(True, fresh=True):
            k = e.file.kiocb(0, write=True)
            assert generic_file_write(k, b"hello", e.ops) == 5
            k = e.file.kiocb(0, write=True)           # O_APPEND: position ignored
            assert generic_file_write(k, b" world", e.ops) == 6
            assert k.ki_pos == 11
        # fsync (which takes i_rwsem) ran after the write dropped it: no DeadlockError
        assert e.fops.syncs == [(0, 5, True), (5, 11, True)]
        assert e.inode.i_mapping.nrdirty == 0          # the fsync wrote the data back
        assert e.disk(0, 11) == b"hello world"
        k = e.file.kiocb(3)
        assert generic_file_read(k, 100, e.ops) == b"lo world"
    finally:
        e.close()


def test_eviction_under_cap_rereads_from_disk():
    e = Env(bs=4096, cap=4 * 4096)
    try:
        data = os.urandom(16 * 4096)
        e.write(0, data)
        assert e.sb.s_page_budget.used_bytes <= 4 * 4096
        assert e.read(0, len(data)) == data
        assert e.sb.s_page_budget.used_bytes <= 4 * 4096
        assert e.sb.s_page_budget.nr_evicted > 0
    finally:
        e.close()


ops_strategy = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 40000), st.binary(min_size=1, max_size=9000)),
    st.tuples(st.just("read"), st.integers(0, 45000), st.integers(0, 12000)),
    st.tuples(st.just("writeback")),
    st.tuples(st.just("drop")),
    st.tuples(st.just("truncate"), st.integers(0, 45000)),
), max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bs=st.sampled_from([1024, 4096]), cap_pages=st.sampled_from([3, 1000]), ops=ops_strategy)
def test_buffered_io_matches_model(bs, cap_pages, ops):
    e = Env(bs=bs, cap=cap_pages * 4096)
    model = bytearray()
    try:
        for op in ops:
            if op[0] == "write":
                _, pos, data = op
                assert e.write(pos, data) == len(data)
                if pos > len(model):
                    model += bytes(pos - len(model))
                model[pos:pos + len(data)] = data
            elif op[0] == "read":
                _, pos, n = op
                assert e.read(pos, n) == bytes(model[pos:pos + n])
            elif op[0] == "writeback":
                e.inode.i_mapping.write_and_wait_range()
            elif op[0] == "drop":
                e.inode.i_mapping.invalidate_range(0, 1 << 40)
                assert e.inode.i_mapping.nrpages == 0
            else:
                _, size = op
                if size < len(model):
                    # XFS-style: zero the partial EOF block, drop cached pages, free blocks
                    buffered_zero_range(e.inode, size, -(-size // bs) * bs - size, e.ops)
                    e.inode.i_size = size
                    e.inode.i_mapping.truncate_pages(size)
                    for b in [b for b in e.fs.map if b * bs >= size]:
                        del e.fs.map[b]
                    del model[size:]
                else:
                    e.inode.i_size = size
                    model += bytes(size - len(model))
            assert e.inode.i_size == len(model)
        assert e.read(0, len(model) + 10) == bytes(model)
        e.inode.i_mapping.write_and_wait_range()
        assert e.disk(0, len(model)) == bytes(model)
    finally:
        e.close()


class LockedOps(MiniOps):
    """MiniOps with an ILOCK-like lower lock (lockdep-checked) around the extent map."""

    def __init__(self, fs, ilock):
        super().__init__(fs)
        self.ilock = ilock

    def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
        with self.ilock:
            return MiniOps.iomap_begin(self, inode, pos, length, flags, iomap, srcmap)

    def iomap_end(self, inode, pos, length, written, flags, iomap):
        pass


class LockedWb(MiniWb):
    def __init__(self, fs, ilock):
        super().__init__(fs)
        self.ilock = ilock

    def map_blocks(self, inode, pos, length):
        with self.ilock:
            return MiniWb.map_blocks(self, inode, pos, length)

    def writeback_end(self, inode, pos, length, error):
        with self.ilock:
            return MiniWb.writeback_end(self, inode, pos, length, error)


def test_concurrent_writers_readers_writeback_under_lockdep():
    import threading

    from ufs.vfs import Mutex
    e = Env(bs=1024, cap=8 * 4096)
    ilock = Mutex("minifs.ilock")
    ops = LockedOps(e.fs, ilock)
    e.inode.i_mapping.a_ops = LockedWb(e.fs, ilock)
    chunk = 3000
    patterns = [bytes([65 + i]) * chunk for i in range(4)]
    errors = []
    stop = threading.Event()

    def writer(i):
        try:
            for _r in range(6):
                k = e.file.kiocb(i * chunk, write=True)
                assert generic_file_write(k, patterns[i], ops) == chunk
        except BaseException as x:  # noqa: BLE001
            errors.append(x)

    def reader():
        try:
            while not stop.is_set():
                k = e.file.kiocb(0)
                data = generic_file_read(k, 4 * chunk, ops)
                for i in range(4):
                    piece = data[i * chunk:(i + 1) * chunk]
                    # each write is atomic under i_rwsem: all of it or none of it
                    assert piece in (b"", patterns[i], bytes(chunk)), (i, set(piece))
        except BaseException as x:  # noqa: BLE001
            errors.append(x)

    def flusher():
        try:
            while not stop.is_set():
                e.inode.i_mapping.write_and_wait_range()
        except BaseException as x:  # noqa: BLE001
            errors.append(x)

    try:
        with lockdep.checking(True, fresh=True):
            ws = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
            side = [threading.Thread(target=reader), threading.Thread(target=flusher)]
            for t in ws + side:
                t.start()
            for t in ws:
                t.join(30)
            stop.set()
            for t in side:
                t.join(30)
            assert not any(t.is_alive() for t in ws + side), "hang"
        assert not errors, errors
        e.inode.i_mapping.write_and_wait_range()
        assert e.disk(0, 4 * chunk) == b"".join(patterns)
        assert e.read(0, 4 * chunk) == b"".join(patterns)
    finally:
        e.close()


def test_large_io_stays_near_the_cap():
    from ufs.vfs import buffered as bmod
    e = Env(bs=4096, cap=16 * 4096)
    budget = e.sb.s_page_budget
    peak = [0]
    charge = budget.charge

    def tracking_charge(page):
        charge(page)
        peak[0] = max(peak[0], budget.used_bytes)
    budget.charge = tracking_charge
    try:
        data = os.urandom(3 << 20)
        assert e.write(0, data) == len(data)
        slack = bmod.WRITE_BALANCE_PAGES * 4096
        assert peak[0] <= budget.cap_bytes + slack
        peak[0] = 0
        e.inode.i_mapping.invalidate_range(0, len(data))
        assert e.read(0, len(data)) == data
        assert peak[0] <= budget.cap_bytes + bmod.READ_WINDOW_BYTES
        assert budget.used_bytes <= budget.cap_bytes
    finally:
        e.close()


def test_zero_range_over_cached_hole_does_not_allocate(env):
    bs = env.fs.bs
    env.inode.i_size = 2 * bs
    assert env.read(0, 2 * bs) == bytes(2 * bs)       # caches zero pages over the hole
    env.fs.inline = None
    buffered_zero_range(env.inode, 10, 100, env.ops)
    assert env.inode.i_mapping.nrdirty == 0
    env.inode.i_mapping.write_and_wait_range()
    assert env.fs.map == {}                           # nothing allocated
    assert env.read(0, 2 * bs) == bytes(2 * bs)

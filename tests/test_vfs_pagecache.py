"""ufs.vfs.pagecache: dirty/clean tracking, write-back through WritebackOps, invalidation (and
its injected failure, as the DIO engine's ENOTBLK fallback sees it), truncation, and the
per-superblock budget's LRU eviction."""
from __future__ import annotations

import errno
import os

import pytest

from ufs.errors import FsError, InvariantError, NoSpaceError, NotBlockError
from ufs.iomap import FaultDev, IoMap, IomapOps, MapType, RamDev, dio_rw
from ufs.vfs import File, Inode, PageCacheBudget, Superblock, WritebackOps

DEV_SIZE = 1 << 20


class IdentityWb(WritebackOps):
    """File byte p lives at device byte ``base + p``; records every call."""

    def __init__(self, dev, base=0):
        self.dev, self.base = dev, base
        self.maps, self.ends = [], []
        self.fail_map = None

    def map_blocks(self, inode, pos, length):
        self.maps.append((pos, length))
        if self.fail_map:
            raise self.fail_map
        return IoMap(offset=pos, length=length, type=MapType.MAPPED, addr=self.base + pos,
                     bdev=self.dev)

    def writeback_end(self, inode, pos, length, error):
        self.ends.append((pos, length, error))


class IdentityOps(IomapOps):
    """Everything MAPPED at the same identity layout (for the DIO coherency checks)."""

    def __init__(self, dev):
        self.dev = dev

    def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
        iomap.offset, iomap.length, iomap.type = pos, length, MapType.MAPPED
        iomap.addr, iomap.bdev = pos, self.dev


@pytest.fixture
def dev():
    d = RamDev(DEV_SIZE, 512, volatile_cache=False)
    yield d
    d.close()


def make_inode(dev, *, blocksize=4096, cap=256 << 20, size=0, sb=None):
    sb = sb or Superblock(dev, blocksize, page_cache_cap=cap)
    wb = IdentityWb(dev)
    inode = Inode(sb, 1, size=size, wb_ops=wb)
    return sb, inode, wb


def test_dirty_tracking_and_writeback(dev):
    sb, inode, wb = make_inode(dev, size=3 * 4096)
    m = inode.i_mapping
    assert m.nrpages == 0 and not m.has_pages(0, 1 << 30)
    m.write(4096 + 100, b"x" * 200)
    assert m.nrpages == 1 and m.nrdirty == 1
    assert m.has_pages(4096, 4097) and not m.has_pages(0, 4096) and not m.has_pages(8192, 9000)
    assert m.has_dirty(4096, 8192) and not m.has_dirty(0, 4096)
    assert m.dirty_ranges() == [(4096, 8192)]
    assert m.read(4096 + 100, 200) == b"x" * 200
    assert m.read(0, 10) is None                      # not cached
    m.write_and_wait_range(0, 4096)                   # range without dirty pages: nothing
    assert wb.maps == [] and m.nrdirty == 1
    m.write_and_wait_range(4096, 4097)
    assert wb.maps == [(4096, 4096)] and wb.ends == [(4096, 4096, 0)]
    assert m.nrdirty == 0 and m.nrpages == 1 and not m.has_dirty(0, 1 << 30)
    assert dev.pread(4096, 4096) == bytes(100) + b"x" * 200 + bytes(4096 - 300)
    assert m.nr_written_back == 4096


def test_subpage_blocks_write_back_only_dirty_blocks(dev):
    sb, inode, wb = make_inode(dev, blocksize=1024, size=8192)
    m = inode.i_mapping
    assert m.page_size == 4096 and m.blocks_per_page == 4
    m.write(1024 + 10, b"a" * 10)                     # block 1
    m.write(3 * 1024, b"b" * 1024)                    # block 3, whole
    m.write(4096 + 2048, b"c")                        # page 1, block 2
    assert m.dirty_ranges() == [(1024, 2048), (3072, 4096), (6144, 7168)]
    m.write_and_wait_range()
    assert wb.maps == [(1024, 1024), (3072, 1024), (6144, 1024)]
    assert dev.pread(1024, 1024) == bytes(10) + b"a" * 10 + bytes(1004)
    assert dev.pread(1024, 0) == bytes(1024)          # block 0 never written
    assert dev.pread(1024, 3072) == b"b" * 1024


def test_writeback_clamps_to_eof_and_zeroes_tail(dev):
    sb, inode, wb = make_inode(dev, blocksize=1024, size=1500)
    m = inode.i_mapping
    dev.pwrite(b"\xff" * 8192, 0)
    m.write(0, b"d" * 4096)                           # dirties past EOF too
    m.write_and_wait_range()
    assert wb.maps == [(0, 2048)]                     # up to the block holding EOF
    assert dev.pread(2048, 0) == b"d" * 1500 + bytes(548)
    assert dev.pread(2048, 2048) == b"\xff" * 2048    # past-EOF blocks not written
    assert m.read(1500, 100) == bytes(100)            # the cached tail was zeroed too
    assert m.nrdirty == 0


def test_writeback_failure_keeps_pages_dirty(dev):
    sb, inode, wb = make_inode(dev, size=8192)
    m = inode.i_mapping
    m.write(0, b"e" * 8192)
    wb.fail_map = NoSpaceError("no space")
    with pytest.raises(NoSpaceError):
        m.write_and_wait_range()
    assert m.has_dirty(0, 8192) and m.dirty_ranges() == [(0, 8192)]
    assert isinstance(m.wb_err, NoSpaceError)
    wb.fail_map = None
    m.write_and_wait_range()
    assert m.nrdirty == 0 and dev.pread(8192, 0) == b"e" * 8192


def test_writeback_device_error(dev):
    fdev = FaultDev(dev)
    try:
        sb, inode, wb = make_inode(fdev, size=8192)
        m = inode.i_mapping
        m.write(0, b"f" * 8192)
        fdev.fail("write", 4096, 4096, errno=errno.EIO)
        with pytest.raises(OSError) as ei:
            m.write_and_wait_range()
        assert ei.value.errno == errno.EIO
        assert wb.ends[-1][2] == -errno.EIO
        assert m.has_dirty(0, 8192)                   # the failed run stays dirty
        fdev.clear()
        m.write_and_wait_range()
        assert dev.pread(8192, 0) == b"f" * 8192
    finally:
        fdev.close()


def test_writeback_without_ops_is_a_bug(dev):
    sb = Superblock(dev, 4096)
    inode = Inode(sb, 7, size=4096)
    inode.i_mapping.write(0, b"z")
    with pytest.raises(InvariantError):
        inode.i_mapping.write_and_wait_range()
    assert inode.i_mapping.has_dirty(0, 1)


def test_invalidate_writes_back_then_drops(dev):
    sb, inode, wb = make_inode(dev, size=4 * 4096)
    m = inode.i_mapping
    for i in range(4):
        m.write(i * 4096, bytes([i + 1]) * 4096)
    m.write_and_wait_range(0, 4096)                   # page 0 clean, 1..3 dirty
    m.invalidate_range(100, 8192 + 1)                 # overlaps pages 0, 1, 2
    assert m.nrpages == 1 and m.find_page(3) is not None
    assert not m.has_pages(0, 3 * 4096)
    assert dev.pread(3 * 4096, 0) == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096
    assert m.has_dirty(3 * 4096, 4 * 4096)            # outside the range: untouched
    m.invalidate_range(10, 10)                        # empty range: nothing
    assert m.nrpages == 1


@pytest.mark.parametrize("how", ["errno", "callable"])
def test_invalidate_injected_failure(dev, how):
    sb, inode, wb = make_inode(dev, size=8192)
    m = inode.i_mapping
    m.write(0, b"g" * 8192)
    seen = []
    if how == "errno":
        m.fail_invalidate = errno.EBUSY
    else:
        m.fail_invalidate = lambda pos, end: seen.append((pos, end)) or errno.EBUSY
    with pytest.raises(FsError) as ei:
        m.invalidate_range(0, 4096)
    assert ei.value.errno == errno.EBUSY
    assert m.nrpages == 2 and m.nr_invalidate_failures == 1
    assert not m.has_dirty(0, 4096)                   # written back before failing
    assert dev.pread(4096, 0) == b"g" * 4096
    if how == "callable":
        assert seen == [(0, 4096)]
        m.fail_invalidate = lambda pos, end: None     # a callable may also let it pass
    else:
        m.fail_invalidate = None
    m.invalidate_range(0, 4096)
    assert m.nrpages == 1


def test_dio_write_falls_back_with_enotblk_when_invalidation_fails(dev):
    """The engine turns a pre-write invalidation failure into NotBlockError (sem §3.11)."""
    sb, inode, wb = make_inode(dev, size=8192)
    m = inode.i_mapping
    f = File(inode, os.O_RDWR | os.O_DIRECT)
    m.write(0, b"h" * 4096)
    ops = IdentityOps(dev)
    # a DIO read sees the cached data: the engine writes it back first
    buf = bytearray(4096)
    assert dio_rw(f.kiocb(0), buf, ops) == 4096 and bytes(buf) == b"h" * 4096
    assert m.nrpages == 1 and not m.has_dirty(0, 8192)
    m.fail_invalidate = errno.EBUSY
    with pytest.raises(NotBlockError):
        dio_rw(f.kiocb(0, write=True), b"i" * 4096, ops)
    assert inode.i_dio_count == 0
    m.fail_invalidate = None
    assert dio_rw(f.kiocb(0, write=True), b"j" * 4096, ops) == 4096
    assert m.nrpages == 0                             # invalidated around the write
    assert dev.pread(4096, 0) == b"j" * 4096
    sb.shutdown()


def test_truncate_pages(dev):
    sb, inode, wb = make_inode(dev, blocksize=1024, size=3 * 4096)
    m = inode.i_mapping
    m.write(0, b"k" * (3 * 4096))
    inode.i_size = 4096 + 1500
    m.truncate_pages(4096 + 1500)
    assert m.nrpages == 2 and m.find_page(2) is None
    assert m.read(4096, 4096) == b"k" * 1500 + bytes(4096 - 1500)
    assert m.dirty_ranges() == [(0, 4096 + 2048)]     # blocks wholly past the size lost dirty
    m.truncate_pages(8192)                            # page-aligned: drops page 2 only (gone)
    assert m.nrpages == 2
    inode.i_size = 4096
    m.truncate_pages(4096)
    assert m.nrpages == 1 and m.dirty_ranges() == [(0, 4096)]


def test_budget_evicts_clean_pages_lru_across_inodes(dev):
    sb = Superblock(dev, 4096, page_cache_cap=4 * 4096)
    a = Inode(sb, 1, size=1 << 16, wb_ops=IdentityWb(dev))
    b = Inode(sb, 2, size=1 << 16, wb_ops=IdentityWb(dev, base=1 << 17))
    assert a.i_mapping.budget is b.i_mapping.budget is sb.s_page_budget
    for i in range(3):
        a.i_mapping.write(i * 4096, b"a" * 4096)
    a.i_mapping.write_and_wait_range()                # a's 3 pages clean
    b.i_mapping.write(0, b"b" * 4096)                 # 4 pages: at the cap
    assert sb.s_page_budget.used_bytes == 4 * 4096
    a.i_mapping.budget.touch(a.i_mapping.find_page(0))   # a/0 recently used
    b.i_mapping.write(4096, b"b" * 4096)              # 5th page: evict the LRU clean one
    assert sb.s_page_budget.used_bytes == 4 * 4096
    assert a.i_mapping.find_page(1) is None           # oldest clean page went
    assert a.i_mapping.find_page(0) is not None and a.i_mapping.find_page(2) is not None
    assert b.i_mapping.nrdirty == 2                   # dirty pages are never just dropped
    assert sb.s_page_budget.nr_evicted == 1


def test_budget_writes_back_dirty_pages_when_nothing_is_clean(dev):
    sb = Superblock(dev, 4096, page_cache_cap=2 * 4096)
    wb = IdentityWb(dev)
    a = Inode(sb, 1, size=1 << 16, wb_ops=wb)
    for i in range(4):
        a.i_mapping.write(i * 4096, bytes([65 + i]) * 4096)
    assert sb.s_page_budget.used_bytes <= 2 * 4096
    assert sb.s_page_budget.nr_writeback >= 1
    data = dev.pread(4 * 4096, 0)
    cached = {p.index for p in a.i_mapping._pages.values()}
    for i in range(4):                                # every page is on disk or still cached
        if i not in cached:
            assert data[i * 4096:(i + 1) * 4096] == bytes([65 + i]) * 4096


def test_budget_standalone_accounting():
    budget = PageCacheBudget(cap_bytes=8192)
    assert budget.balance() == 0 and not budget.over()

"""The Cython DIO engine (ufs.iomap.dio) on RamDev/FaultDev with a minimal recording host.

Every device is pre-filled with 0xAA garbage so a missing zeroing shows up as stale bytes.
Points covered follow reference/iomap-semantics.md §3 and docs/CORE-API.md §4-5.
"""
from __future__ import annotations

import errno
import logging
import threading

import pytest

from hoststub import Host, LayoutOps, RecordingDioOps
from ufs.errors import (AgainError, AlignmentError, DeadlockError, FaultError, InvariantError,
                        IOFailure, NoSpaceError, NotBlockError)
from ufs.iomap import (EIOCBQUEUED, BIO_FUA, DioBatch, DioFlag, DioOps, Iocb, IovIter, IterFlag,
                       Kiocb, MapFlag, MapType, RamDev, aligned_buffer, dio_complete, dio_rw,
                       dio_start, generic_write_sync)
from ufs.iomap import dio as cdio

try:
    from ufs.iomap import FaultDev
except ImportError:  # pragma: no cover - bdev without FaultDev
    FaultDev = None

MiB = 1 << 20
GARBAGE = 0xAA
M, U, H, N = MapType.MAPPED, MapType.UNWRITTEN, MapType.HOLE, MapFlag.NEW


def ramdev(size=8 * MiB, lbs=512, **kw):
    dev = RamDev(size, lbs, **kw)
    dev.pwrite(bytes([GARBAGE]) * size, 0)
    dev.flush()
    return dev


def abuf(n, fill=0):
    """n zeroed (or ``fill``ed) bytes of page-aligned memory, as a writable memoryview."""
    b = memoryview(aligned_buffer(n))
    if fill:
        b[:] = bytes([fill]) * n
    return b


def pattern(n, seed=1):
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture
def host():
    h = Host(size=0)
    yield h
    h.close()


def faultdev(**kw):
    if FaultDev is None:
        pytest.skip("FaultDev not available in ufs.iomap.bdev")
    return FaultDev(ramdev(**kw))


def data_bios(dev):
    """(op, addr, length, opf) of the logged bios."""
    return [(e[1], e[2], e[3], e[4]) for e in dev.log]


# ---- nothing to do / basic round trip -------------------------------------------------------

def test_zero_count_and_read_at_eof_do_nothing(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = 4096
    assert dio_start(host.kiocb(0, write=True), b"", ops) is None
    assert dio_start(host.kiocb(4096), bytearray(512), ops) is None
    assert dio_rw(host.kiocb(8192), bytearray(512), ops) == 0
    assert host.events == [] and ops.begin_calls == []


def test_write_then_read_roundtrip_and_ki_pos(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 64 * 1024)], dev)
    host.inode.i_size = MiB
    data = pattern(3 * 4096)
    k = host.kiocb(4096, write=True)
    assert dio_rw(k, data, ops) == len(data)          # bytes: unaligned memory, bounced
    assert k.ki_pos == 4096 + len(data)
    assert dev.pread(len(data), 64 * 1024 + 4096) == data
    out = abuf(len(data))
    k = host.kiocb(4096)
    assert dio_rw(k, out, ops) == len(data) and bytes(out) == data and k.ki_pos == 4096 + len(data)
    assert ops.begin_calls[0][2] == IterFlag.WRITE | IterFlag.DIRECT
    assert ops.begin_calls[-1][2] == IterFlag.DIRECT
    assert host.inode.dio_begins == host.inode.dio_ends == 2 and host.inode.dio_count == 0


def test_read_clamped_to_isize_snapshot_and_iter_reverted(host):
    dev = ramdev()
    ops = LayoutOps([(0, 4096, M, 0, 0)], dev)       # hole after 4096
    host.inode.i_size = 1536
    it = IovIter(abuf(8192, 0x55))
    k = host.kiocb(0)
    assert dio_rw(k, it, ops) == 1536 and k.ki_pos == 1536
    assert (it.offset, it.count) == (1536, 8192 - 1536)


# ---- per-type dispatch ---------------------------------------------------------------------

def test_hole_and_unwritten_reads_zero_fill(host):
    dev = ramdev()
    layout = [(0, 4096, M, 0, 0), (4096, 4096, U, 0, 4096)]   # then a hole
    ops = LayoutOps(layout, dev)
    host.inode.i_size = 16384
    out = abuf(16384, 0x55)
    assert dio_rw(host.kiocb(0), out, ops) == 16384
    assert bytes(out[:4096]) == bytes([GARBAGE]) * 4096     # mapped: the device bytes
    assert bytes(out[4096:]) == bytes(12288)                 # unwritten + hole: zeroes
    assert [c[0] for c in ops.begin_calls] == [0, 4096, 8192]


def test_hole_write_is_invariant_error(host):
    dev = ramdev()
    ops = LayoutOps([], dev)
    k = host.kiocb(0, write=True)
    with pytest.raises(InvariantError) as ei:
        dio_rw(k, abuf(4096), ops)
    assert ei.value.errno == errno.EIO and k.ki_pos == 0
    assert host.inode.dio_count == 0 and host.inode.dio_ends == 1


@pytest.mark.parametrize("write", [False, True])
def test_delalloc_is_eio_with_warning(host, caplog, write):
    dev = ramdev()
    ops = LayoutOps([(0, 8192, MapType.DELALLOC, 0, 0)], dev)
    host.inode.i_size = 8192
    cdio._reset_warn_ratelimit()
    k = host.kiocb(0, write=write)
    with caplog.at_level(logging.WARNING, logger="ufs.iomap.dio"):
        with pytest.raises(OSError) as ei:
            dio_rw(k, abuf(4096), ops)
    assert ei.value.errno == errno.EIO and k.ki_pos == 0
    assert "Direct I/O collision with buffered writes" in caplog.text
    assert host.inode.dio_count == 0 and dev.pread(4096, 0) == bytes([GARBAGE]) * 4096


def test_inline_read_and_write_zero_gap_and_move_isize(host):
    dev = ramdev()
    inline = bytearray(b"\xee" * 1024)
    ops = LayoutOps([(0, 1024, MapType.INLINE, 0, 0)], dev)
    ops.inline[0] = inline
    host.inode.i_size = 100
    k = host.kiocb(300, write=True)
    assert dio_rw(k, b"hello", ops) == 5                 # unaligned: inline needs none
    assert host.inode.i_size == 305 and host.inode.dirtied == 1
    assert inline[100:300] == bytes(200)                 # the gap after the old EOF
    assert inline[300:305] == b"hello" and inline[:100] == b"\xee" * 100
    out = bytearray(1024)
    assert dio_rw(host.kiocb(0), out, ops) == 305
    assert out[300:305] == b"hello"


# ---- alignment and bouncing ------------------------------------------------------------------

@pytest.mark.parametrize("pos,length", [(100, 512), (0, 700), (512, 1000)])
def test_unaligned_pos_or_length_is_einval(host, pos, length):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    k = host.kiocb(pos, write=True)
    with pytest.raises(AlignmentError) as ei:
        dio_rw(k, abuf(length), ops)
    assert ei.value.errno == errno.EINVAL and k.ki_pos == pos and host.inode.dio_count == 0
    assert dev.pread(4096, 0) == bytes([GARBAGE]) * 4096


def test_fsblock_aligned_uses_the_fs_block_size(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    assert dio_rw(host.kiocb(512, write=True), abuf(512), ops) == 512
    with pytest.raises(AlignmentError):
        dio_rw(host.kiocb(512, write=True), abuf(512), ops, dio_flags=DioFlag.FSBLOCK_ALIGNED)
    assert dio_rw(host.kiocb(4096, write=True), abuf(4096), ops,
                  dio_flags=DioFlag.FSBLOCK_ALIGNED) == 4096


def test_unaligned_memory_is_bounced_never_given_to_the_device(host):
    dev = faultdev()
    ops = LayoutOps([(0, 4 * MiB, M, 0, 0)], dev)
    host.inode.i_size = 4 * MiB
    raw = bytearray(3 * MiB + 1)
    view = memoryview(raw)[1:]                            # misaligned by one byte
    view[:] = pattern(3 * MiB, 3)
    assert dio_rw(host.kiocb(0, write=True), view, ops) == 3 * MiB
    assert dev.pread(3 * MiB, 0) == pattern(3 * MiB, 3)
    raw2 = bytearray(3 * MiB + 7)
    assert dio_rw(host.kiocb(0), memoryview(raw2)[7:], ops) == 3 * MiB
    assert bytes(raw2[7:]) == pattern(3 * MiB, 3)
    assert all(st == 0 for *_, st in dev.log)             # strict RamDev accepted every bio


def test_bounce_pool_stays_bounded_for_huge_unaligned_io(host):
    size = 40 * MiB
    dev = ramdev(size=size)
    ops = LayoutOps([(0, size, M, 0, 0)], dev)
    host.inode.i_size = size
    raw = bytearray(size + 1)
    data = memoryview(raw)[1:]
    data[:MiB] = pattern(MiB)
    assert dio_rw(host.kiocb(0, write=True), data, ops) == size
    assert cdio.bounce_pool.allocated <= cdio.bounce_pool.max_chunks
    assert dev.pread(MiB, 0) == pattern(MiB)


class MutatingSubmit(DioOps):
    """Scribbles on the user buffer before submitting: shows whether the device reads the
    user memory (no bounce) or a stable copy (BOUNCE)."""

    def __init__(self, user):
        self.user = user
        self.seen = []

    def submit_io(self, iter, bio, file_offset):
        self.seen.append((bio.op, bio.addr, bio.length, bio.opf, bio.is_zero, file_offset,
                          bytes(bio.data[:4])))
        self.user[:4] = b"XXXX"
        bio.submit()


def test_bounce_flag_writes_a_stable_copy(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    user = abuf(4096, 0x11)
    mv = user
    assert dio_rw(host.kiocb(0, write=True), user, ops, MutatingSubmit(mv),
                  dio_flags=DioFlag.BOUNCE) == 4096
    assert dev.pread(512, 0)[:4] == b"\x11" * 4                  # the copy taken before submit_io
    mv[:] = b"\x22" * 4096
    assert dio_rw(host.kiocb(0, write=True), user, ops, MutatingSubmit(mv)) == 4096
    assert dev.pread(512, 0)[:4] == b"XXXX"                      # zero-copy: device read user memory


# ---- bios ----------------------------------------------------------------------------------

def test_bios_are_contiguous_and_at_most_bio_max(host):
    dev = faultdev()
    ops = LayoutOps([(0, 4 * MiB, M, 0, MiB)], dev)
    host.inode.i_size = 4 * MiB
    assert dio_rw(host.kiocb(0, write=True), abuf(3 * MiB + 4096), ops) == 3 * MiB + 4096
    bios = data_bios(dev)
    assert [b[2] for b in bios] == [MiB, MiB, MiB, 4096]
    assert [b[1] for b in bios] == [MiB, 2 * MiB, 3 * MiB, 4 * MiB]
    assert all(b[0] == "write" for b in bios)


def test_submit_io_sees_every_bio_including_zero_bios(host):
    dev = ramdev()
    ops = LayoutOps([(0, 8192, M, N, 0)], dev)
    user = abuf(512, 0x33)
    dops = MutatingSubmit(abuf(4))
    host.inode.i_size = 8192
    assert dio_rw(host.kiocb(1024, write=True), user, ops, dops) == 512
    kinds = [(s[4], s[1], s[2], s[5]) for s in dops.seen]
    assert kinds == [(True, 0, 1024, 0), (False, 1024, 512, 1024), (True, 1536, 2560, 1536)]
    assert dops.seen[1][6] == b"\x33" * 4


def test_submit_io_that_does_not_submit_is_a_bug(host):
    class Lazy(DioOps):
        def submit_io(self, iter, bio, file_offset):
            pass
    dev = ramdev()
    ops = LayoutOps([(0, 8192, M, 0, 0)], dev)
    host.inode.i_size = 8192
    with pytest.raises(InvariantError):
        dio_rw(host.kiocb(0, write=True), abuf(4096), ops, Lazy())
    assert host.inode.dio_count == 0


# ---- zeroing: no stale bytes -----------------------------------------------------------------

@pytest.mark.parametrize("typ,flags", [(M, N), (U, 0)], ids=["new", "unwritten"])
def test_sub_block_write_zeroes_head_and_tail(host, typ, flags):
    dev = ramdev()
    ops = LayoutOps([(0, 8192, typ, flags, 0)], dev)
    host.inode.i_size = 8192
    assert dio_rw(host.kiocb(1024, write=True), abuf(512, 0x33), ops) == 512   # zero bios not counted
    blk = dev.pread(4096, 0)
    assert blk == bytes(1024) + b"\x33" * 512 + bytes(2560)
    assert dev.pread(4096, 4096) == bytes([GARBAGE]) * 4096


def test_overwrite_inside_eof_does_not_zero(host):
    dev = ramdev()
    ops = LayoutOps([(0, 8192, M, 0, 0)], dev)
    host.inode.i_size = 8192
    dio_rw(host.kiocb(1024, write=True), abuf(512, 0x33), ops)
    assert dev.pread(4096, 0) == b"\xaa" * 1024 + b"\x33" * 512 + b"\xaa" * 2560


def test_write_past_eof_zeroes_the_tail_only(host):
    dev = ramdev()
    ops = LayoutOps([(0, 8192, M, 0, 0)], dev)
    host.inode.i_size = 1024
    dio_rw(host.kiocb(1024, write=True), abuf(512, 0x33), ops)
    assert dev.pread(4096, 0) == b"\xaa" * 1024 + b"\x33" * 512 + bytes(2560)


def test_pin_failure_zeroes_tail_and_partial_returns_short(host):
    dev = ramdev()
    ops = LayoutOps([(0, 16384, M, N, 0)], dev)
    host.inode.i_size = 16384
    it = IovIter(abuf(8192, 0x44))
    it.nofault, it.fault_at = True, 2560
    k = host.kiocb(0, write=True, flags=Iocb.DSYNC)
    assert dio_rw(k, it, ops, dio_flags=DioFlag.PARTIAL) == 2560
    assert k.ki_pos == 2560 and it.offset == 2560
    assert dev.pread(4096, 0) == b"\x44" * 2560 + bytes(1536)       # tail of the block zeroed
    assert dev.pread(4096, 4096) == bytes([GARBAGE]) * 4096
    assert host.file.fsyncs == [(0, 2560, True)]
    # resume after faulting in: cumulative result through done_before
    it.fault_in()
    ops2 = LayoutOps([(0, 16384, M, 0, 0)], dev)
    assert dio_rw(k, it, ops2, dio_flags=DioFlag.PARTIAL, done_before=2560) == 8192
    assert k.ki_pos == 8192 and dev.pread(8192, 0) == b"\x44" * 8192


def test_pin_failure_without_partial_fails_whole_call_but_still_zeroes(host):
    dev = ramdev()
    ops = LayoutOps([(0, 16384, M, N, 0)], dev)
    host.inode.i_size = 16384
    it = IovIter(abuf(8192, 0x44))
    it.nofault, it.fault_at = True, 2560
    k = host.kiocb(0, write=True)
    with pytest.raises(FaultError):
        dio_rw(k, it, ops)
    assert k.ki_pos == 0
    assert dev.pread(4096, 0) == b"\x44" * 2560 + bytes(1536)


def test_partial_without_progress_is_efault(host):
    dev = ramdev()
    ops = LayoutOps([(0, 16384, M, 0, 0)], dev)
    host.inode.i_size = 16384
    it = IovIter(abuf(8192))
    it.nofault, it.fault_at = True, 0
    with pytest.raises(FaultError):
        dio_rw(host.kiocb(0), it, ops, dio_flags=DioFlag.PARTIAL)


def test_hole_read_nofault_partial(host):
    dev = ramdev()
    ops = LayoutOps([], dev)
    host.inode.i_size = 16384
    it = IovIter(abuf(8192, 0x55))
    it.nofault, it.fault_at = True, 1000
    assert dio_rw(host.kiocb(0), it, ops, dio_flags=DioFlag.PARTIAL) == 1000


# ---- FUA / sync --------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["dsync", "sync", "new", "dirty", "shared", "unwritten",
                                  "volatile-nofua", "novolatile-nofua", "nodsync"])
def test_fua_shortcut_decisions(host, case):
    kw = {}
    if case == "volatile-nofua":
        kw = dict(volatile_cache=True, fua=False)
    if case == "novolatile-nofua":
        kw = dict(volatile_cache=False, fua=False)
    dev = faultdev(**kw)
    mflags = {"new": N, "dirty": MapFlag.DIRTY, "shared": MapFlag.SHARED}.get(case, 0)
    typ = U if case == "unwritten" else M
    ops = LayoutOps([(0, MiB, typ, mflags, 0)], dev)
    dops = RecordingDioOps(host.events)
    host.inode.i_size = MiB
    iflags = {"sync": Iocb.DSYNC | Iocb.SYNC, "nodsync": 0}.get(case, Iocb.DSYNC)
    assert dio_rw(host.kiocb(0, write=True, flags=iflags), abuf(8192), ops, dops) == 8192
    fua_expected = case in ("dsync", "novolatile-nofua")
    bio_fua = [bool(b[3] & BIO_FUA) for b in data_bios(dev)]
    assert bio_fua == [fua_expected]
    if case == "nodsync" or fua_expected:
        assert host.file.fsyncs == []
    else:
        assert host.file.fsyncs == [(0, 8192, case != "sync")]
    expect_flags = {"shared": DioFlag.COW, "unwritten": DioFlag.UNWRITTEN}.get(case, 0)
    assert dops.calls == [(8192, 0, expect_flags)]


def test_one_non_fua_mapping_disables_the_shortcut(host):
    dev = faultdev()
    ops = LayoutOps([(0, 4096, M, 0, 0), (4096, 4096, M, N, 4096)], dev)
    host.inode.i_size = 8192
    dio_rw(host.kiocb(0, write=True, flags=Iocb.DSYNC), abuf(8192), ops)
    assert [bool(b[3] & BIO_FUA) for b in data_bios(dev)] == [True, False]
    assert host.file.fsyncs == [(0, 8192, True)]


def test_generic_write_sync_range(host):
    k = host.kiocb(10000, write=True, flags=Iocb.DSYNC | Iocb.SYNC)
    assert generic_write_sync(k, 1000) == 1000
    assert host.file.fsyncs == [(9000, 10000, False)]
    k = host.kiocb(10000, write=True)
    assert generic_write_sync(k, 1000) == 1000 and len(host.file.fsyncs) == 1


# ---- page cache ----------------------------------------------------------------------------

def test_no_cache_work_when_nrpages_is_zero(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    dio_rw(host.kiocb(0, write=True), abuf(4096), ops)
    dio_rw(host.kiocb(0), abuf(4096), ops)
    assert [e for e in host.events if e[0] in ("writeback", "invalidate")] == []


def test_read_writes_back_but_does_not_invalidate(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    host.inode.i_mapping.add(0, dirty=True)
    dio_rw(host.kiocb(0), abuf(8192), ops)
    assert [e for e in host.events if e[0] in ("writeback", "invalidate")] == [("writeback", 0, 8192)]
    assert host.inode.i_mapping.nrpages == 1


def test_write_invalidates_before_and_after(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    host.inode.i_mapping.add(0, dirty=True)
    host.inode.i_mapping.add(65536)                        # keeps nrpages > 0 after the range
    dio_rw(host.kiocb(0, write=True), abuf(8192), ops)
    cache = [e for e in host.events if e[0] in ("writeback", "invalidate", "dio_begin", "dio_end")]
    assert cache == [("writeback", 0, 8192), ("invalidate", 0, 8192), ("dio_begin",),
                     ("invalidate", 0, 8192), ("dio_end",)]


@pytest.mark.parametrize("what", ["invalidate", "writeback"])
def test_pre_write_cache_failure_is_enotblk(host, what):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    host.inode.i_mapping.add(0)
    setattr(host.inode.i_mapping, f"fail_{what}", OSError(errno.EBUSY, "busy"))
    k = host.kiocb(0, write=True)
    with pytest.raises(NotBlockError) as ei:
        dio_rw(k, abuf(4096), ops)
    assert ei.value.errno == errno.ENOTBLK and k.ki_pos == 0
    assert host.inode.dio_begins == 0 and ops.begin_calls == []


def test_post_write_invalidation_failure_is_logged_only(host, caplog):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    host.inode.i_mapping.add(65536)
    host.inode.i_mapping.fail_invalidate = OSError(errno.EBUSY, "busy")
    # the pre-write invalidation must pass: the failing page is outside the range, so make
    # the stub fail only on the second call
    pc = host.inode.i_mapping
    calls = []
    real = type(pc).invalidate_range

    def inval(pos, end):
        calls.append(pos)
        if len(calls) == 1:
            pc.events.append(("invalidate", pos, end))
            return
        real(pc, pos, end)
    pc.invalidate_range = inval
    with caplog.at_level(logging.WARNING, logger="ufs.iomap.dio"):
        assert dio_rw(host.kiocb(0, write=True), abuf(4096), ops) == 4096
    assert len(calls) == 2 and "stale" in caplog.text


def test_nowait_eagain_on_cached_pages(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    host.inode.i_mapping.add(4096)
    with pytest.raises(AgainError):
        dio_rw(host.kiocb(0, write=True, flags=Iocb.NOWAIT), abuf(8192), ops)
    # a read only cares about dirty pages
    assert dio_rw(host.kiocb(0, flags=Iocb.NOWAIT), abuf(8192), ops) == 8192
    assert ops.begin_calls[-1][2] == IterFlag.DIRECT | IterFlag.NOWAIT
    host.inode.i_mapping.add(4096, dirty=True)
    with pytest.raises(AgainError):
        dio_rw(host.kiocb(0, flags=Iocb.NOWAIT), abuf(8192), ops)
    assert host.inode.dio_count == 0 and "writeback" not in [e[0] for e in host.events]


def test_overwrite_only(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = 8192
    for pos, n in [(8192, 4096), (4096, 8192)]:
        with pytest.raises(AgainError):
            dio_rw(host.kiocb(pos, write=True), abuf(n), ops, dio_flags=DioFlag.OVERWRITE_ONLY)
    assert ops.begin_calls == []
    assert dio_rw(host.kiocb(0, write=True), abuf(8192), ops,
                  dio_flags=DioFlag.OVERWRITE_ONLY) == 8192
    assert ops.begin_calls[0][2] & IterFlag.OVERWRITE_ONLY


# ---- ENOTBLK mid-stream ------------------------------------------------------------------

def test_enotblk_from_begin_mid_stream_is_a_short_count(host):
    dev = ramdev()
    ops = LayoutOps([(0, 4096, M, 0, 0), (4096, 4096, M, 0, 4096)], dev)
    ops.begin_errors[1] = NotBlockError()
    host.inode.i_size = 8192
    k = host.kiocb(0, write=True)
    assert dio_rw(k, abuf(8192, 0x66), ops) == 4096 and k.ki_pos == 4096
    assert dev.pread(4096, 0) == b"\x66" * 4096 and dev.pread(4096, 4096) == b"\xaa" * 4096


def test_enotblk_on_first_mapping_returns_zero(host):
    dev = ramdev()
    ops = LayoutOps([(0, 8192, M, 0, 0)], dev)
    ops.begin_errors[0] = NotBlockError()
    host.inode.i_size = 8192
    k = host.kiocb(0, write=True)
    assert dio_rw(k, abuf(8192), ops, done_before=100) == 0
    assert k.ki_pos == 0 and host.inode.dio_count == 0


def test_iomap_end_enotblk_counts_only_without_progress(host):
    dev = ramdev()
    ops = LayoutOps([(0, 4096, M, 0, 0), (4096, 4096, M, 0, 4096)], dev)
    ops.end_errors[0] = NotBlockError()                    # progress made: dropped
    host.inode.i_size = 8192
    assert dio_rw(host.kiocb(0, write=True), abuf(8192), ops) == 8192
    ops = LayoutOps([(0, 4096, M, 0, 0), (4096, 4096, M, 0, 4096)], dev)
    ops.end_errors[1] = NotBlockError()
    it = IovIter(abuf(8192))
    it.nofault, it.fault_at = True, 4096                   # 2nd mapping makes no progress
    assert dio_rw(host.kiocb(0, write=True), it, ops) == 4096


def test_begin_error_fails_the_whole_call_even_after_io(host):
    dev = ramdev()
    ops = LayoutOps([(0, 4096, M, 0, 0), (4096, 4096, M, 0, 4096)], dev)
    ops.begin_errors[1] = NoSpaceError()
    host.inode.i_size = 8192
    k = host.kiocb(0, write=True, flags=Iocb.DSYNC)
    with pytest.raises(NoSpaceError):
        dio_rw(k, abuf(8192), ops)
    assert k.ki_pos == 0 and host.file.fsyncs == [] and host.inode.dio_count == 0


# ---- device errors ------------------------------------------------------------------------

def test_device_error_fails_call_first_error_wins(host):
    dev = faultdev()
    # two mappings, one plug (a waiting DIO submits all its mappings' bios together, as
    # __iomap_dio_rw plugs around its loop): the device completes them in order, so the
    # ENOSPC of the first mapping is the first error and wins over the later EIO
    ops = LayoutOps([(0, 2 * MiB, M, 0, 0), (2 * MiB, 2 * MiB, M, 0, 2 * MiB)], dev)
    dops = RecordingDioOps(host.events)
    host.inode.i_size = 4 * MiB
    dev.fail("write", MiB, 4096, errno=errno.ENOSPC)
    dev.fail("write", 2 * MiB, 4096, errno=errno.EIO)
    k = host.kiocb(0, write=True, flags=Iocb.DSYNC)
    with pytest.raises(NoSpaceError):
        dio_rw(k, abuf(3 * MiB), ops, dops)
    assert k.ki_pos == 0 and host.file.fsyncs == []
    assert dops.calls[0][1] == -errno.ENOSPC and dops.calls[0][0] == 3 * MiB
    assert [b[1] for b in data_bios(dev)] == [0, MiB, 2 * MiB]
    assert host.inode.dio_count == 0


def test_error_in_flight_revert_stops_submission(host):
    dev = faultdev()
    ops = LayoutOps([(0, 4 * MiB, M, 0, 0)], dev)
    host.inode.i_size = 4 * MiB
    dev.fail("write", 0, 4096)
    # one mapping: all three bios are issued before the first unplug; every one ends
    with pytest.raises(IOFailure):
        dio_rw(host.kiocb(0, write=True), abuf(3 * MiB), ops)
    assert len(data_bios(dev)) == 3 and host.inode.dio_count == 0


def test_read_device_error(host):
    dev = faultdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    dev.fail("read", 0, 512)
    with pytest.raises(IOFailure):
        dio_rw(host.kiocb(0), bytearray(4096), ops)        # bounced read: no copy on error


# ---- end_io and the completion order ------------------------------------------------------

def test_completion_order_contract(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, N, 0)], dev)              # NEW: no FUA, sync needed
    dops = RecordingDioOps(host.events)
    host.inode.i_size = MiB
    host.inode.i_mapping.add(MiB - 4096)                   # outside the range: nrpages stays > 0
    k = host.kiocb(8192, write=True, flags=Iocb.DSYNC)
    assert dio_rw(k, abuf(4096), ops, dops, done_before=1000) == 5096
    seq = [e[0] for e in host.events]
    assert seq == ["writeback", "invalidate", "dio_begin", "end_io", "invalidate", "dio_end", "fsync"]
    end_io = host.events[3]
    assert end_io[1] == 8192                               # ki_pos not yet advanced at end_io
    assert host.events[6] == ("fsync", 8192, 12288, True)  # ki_pos advanced before the sync
    assert k.ki_pos == 12288


@pytest.mark.parametrize("result,exc", [(-errno.ENOSPC, NoSpaceError), (None, None), (0, None)])
def test_end_io_result_replaces_error(host, result, exc):
    dev = faultdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    dev.fail("write", 0, 512)
    dops = RecordingDioOps(host.events, result=result)
    host.inode.i_size = MiB
    k = host.kiocb(0, write=True)
    if result is None:
        with pytest.raises(IOFailure):
            dio_rw(k, abuf(4096), ops, dops)
    elif exc:
        with pytest.raises(exc):
            dio_rw(k, abuf(4096), ops, dops)
    else:
        assert dio_rw(k, abuf(4096), ops, dops) == 4096 and k.ki_pos == 4096


def test_end_io_exception_becomes_the_result(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    dops = RecordingDioOps(host.events, raise_exc=NoSpaceError())
    host.inode.i_size = MiB
    k = host.kiocb(0, write=True)
    with pytest.raises(NoSpaceError):
        dio_rw(k, abuf(4096), ops, dops)
    assert k.ki_pos == 0 and host.inode.dio_count == 0


def test_dio_complete_exactly_once(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    d = dio_start(host.kiocb(0, write=True), abuf(4096), ops)
    assert isinstance(d, cdio.Dio) and d.ref == 0
    assert dio_complete(d) == 4096
    with pytest.raises(InvariantError):
        dio_complete(d)
    assert host.inode.dio_ends == 1


def test_read_into_readonly_buffer_is_efault(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    with pytest.raises(FaultError):
        dio_rw(host.kiocb(0), b"\0" * 4096, ops)


# ---- the seed: completing outside i_rwsem ---------------------------------------------------

def test_seed_dsync_write_under_rwsem_deadlocks_with_combined_call():
    h = Host(size=MiB, fsync_takes_rwsem=True)
    try:
        dev = ramdev()
        ops = LayoutOps([(0, MiB, M, N, 0)], dev)          # NEW: the sync cannot be skipped
        k = h.kiocb(0, write=True, flags=Iocb.DSYNC)
        with h.inode.i_rwsem:
            with pytest.raises(DeadlockError):
                dio_rw(k, abuf(4096), ops)
        assert h.inode.dio_count == 0                      # inode_dio_end ran before the sync
        # the split API: issue under the lock, complete after dropping it
        k = h.kiocb(0, write=True, flags=Iocb.DSYNC)
        with h.inode.i_rwsem:
            d = dio_start(k, abuf(4096), ops)
        assert dio_complete(d) == 4096
        assert h.file.fsyncs == [(0, 4096, True)] and k.ki_pos == 4096
    finally:
        h.close()


# ---- async completion ----------------------------------------------------------------------

def test_async_all_done_before_drop_returns_dio_and_no_ki_complete(host):
    dev = ramdev()                                          # completes at unplug
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    done = []
    k = host.kiocb(0, write=True, complete=lambda i, r: done.append(r))
    assert dio_rw(k, abuf(4096), ops) == 4096
    assert done == [] and k.ki_pos == 4096


def test_force_wait_never_queues(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    batch = DioBatch(dev.new_queue())
    k = host.kiocb(0, write=True, complete=lambda i, r: None)
    d = batch.start(k, abuf(4096), ops, dio_flags=DioFlag.FORCE_WAIT)
    assert isinstance(d, cdio.Dio) and dio_complete(d) == 4096


def test_async_batch_completions(host):
    dev = ramdev()
    # first half plain overwrites (complete inline), second half NEW (workqueue)
    ops = LayoutOps([(0, MiB, M, 0, 0), (MiB, MiB, M, N, MiB)], dev)
    dops = RecordingDioOps(host.events)
    host.inode.i_size = 2 * MiB
    batch = DioBatch(dev.new_queue())
    results, threads = {}, {}
    lock = threading.Lock()

    def complete(iocb, res):
        with lock:
            assert iocb.private not in results, "ki_complete called twice"
            results[iocb.private] = (res, iocb.ki_pos)
            threads[iocb.private] = threading.get_ident()

    bufs = [abuf(4096, i + 1) for i in range(64)]
    for i in range(64):
        pos = i * 4096 if i < 32 else MiB + (i - 32) * 4096
        k = Kiocb(host.file, pos, Iocb.DIRECT | Iocb.WRITE, complete, i)
        assert batch.start(k, bufs[i], ops, dops) == EIOCBQUEUED
    assert results == {} and batch.inflight == 64
    assert batch.submit() == 64
    host.sb.s_dio_done_wq.flush()
    assert sorted(results) == list(range(64))
    me = threading.get_ident()
    for i in range(64):
        pos = i * 4096 if i < 32 else MiB + (i - 32) * 4096
        assert results[i] == (4096, pos + 4096)
        assert (threads[i] == me) == (i < 32)               # NEW writes went to the workqueue
    assert host.inode.dio_count == 0 and host.inode.dio_ends == 64
    for i in (0, 40):
        pos = i * 4096 if i < 32 else MiB + (i - 32) * 4096
        assert dev.pread(4096, pos) == bytes([i + 1]) * 4096
    # reads: queued, then completed inline by the reaper of the batch
    out = [abuf(4096) for _ in range(8)]
    results.clear()
    for i in range(8):
        k = Kiocb(host.file, i * 4096, Iocb.DIRECT, complete, i)
        assert batch.start(k, out[i], ops) == EIOCBQUEUED
    batch.submit()
    assert sorted(results) == list(range(8))
    assert bytes(out[3]) == bytes([4]) * 4096


def test_async_errors_reach_ki_complete(host):
    dev = faultdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    dev.fail("write", 0, 4096)
    batch = DioBatch(dev.new_queue())
    got = []
    k = Kiocb(host.file, 0, Iocb.DIRECT | Iocb.WRITE, lambda i, r: got.append(r))
    assert batch.start(k, abuf(4096), ops) == EIOCBQUEUED
    batch.submit()
    host.sb.s_dio_done_wq.flush()
    assert got == [-errno.EIO] and k.ki_pos == 0 and host.inode.dio_count == 0


def test_batch_issue_reports_every_outcome_through_ki_complete(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    batch = DioBatch(dev.new_queue())
    got = []
    cb = lambda i, r: got.append((i.private, r))
    batch.issue(Kiocb(host.file, 2 * MiB, Iocb.DIRECT, cb, "eof"), abuf(4096), ops)
    batch.issue(Kiocb(host.file, 100, Iocb.DIRECT | Iocb.WRITE, cb, "einval"), abuf(4096), ops)
    batch.issue(Kiocb(host.file, 0, Iocb.DIRECT | Iocb.WRITE, cb, "ok"), abuf(4096), ops)
    batch.submit()
    assert got == [("eof", 0), ("einval", -errno.EINVAL), ("ok", 4096)]


def _direct_device(tmp_path, size):
    from ufs.iomap import bdev
    if not hasattr(bdev, "open_device"):
        pytest.skip("open_device not available yet")
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.truncate(size)
    try:
        return bdev.open_device(str(path))
    except OSError as e:
        pytest.skip(f"O_DIRECT not supported here: {e}")


def test_async_many_in_flight_on_a_real_queue(tmp_path, host):
    dev = _direct_device(tmp_path, 8 * MiB)
    try:
        ops = LayoutOps([(0, 8 * MiB, M, 0, 0)], dev)
        host.inode.i_size = 8 * MiB
        q = dev.new_queue(64)
        got = {}

        def complete(iocb, res):
            assert iocb.private not in got
            got[iocb.private] = res
        bufs = [abuf(4096, i + 1) for i in range(32)]
        queued = 0
        for i in range(32):
            k = Kiocb(host.file, i * 8192, Iocb.DIRECT | Iocb.WRITE, complete, i)
            r = dio_start(k, bufs[i], ops, queue=q)
            if r == EIOCBQUEUED:
                queued += 1
            else:
                got[i] = dio_complete(r)
        while len(got) < 32:
            q.wait(1)
        assert all(v == 4096 for v in got.values())
        assert queued > 0
        for i in (0, 17, 31):
            assert dev.pread(4096, i * 8192) == bytes([i + 1]) * 4096
        # sync reads through the same device
        out = abuf(4096)
        assert dio_rw(host.kiocb(17 * 8192), out, ops) == 4096 and bytes(out) == bytes([18]) * 4096
        assert host.inode.dio_count == 0
    finally:
        dev.close()


def test_mappings_on_two_devices(host):
    dev1, dev2 = ramdev(), ramdev()

    def other_device(iomap, srcmap, n):
        if iomap.offset >= 8192:
            iomap.bdev = dev2

    ops = LayoutOps([(0, 8192, M, 0, 0), (8192, 8192, M, 0, 0)], dev1, extra=other_device)
    host.inode.i_size = 16384
    assert dio_rw(host.kiocb(0, write=True), abuf(16384, 0x77), ops) == 16384
    assert dev1.pread(8192, 0) == b"\x77" * 8192 and dev2.pread(8192, 0) == b"\x77" * 8192
    out = abuf(16384)
    assert dio_rw(host.kiocb(0), out, ops) == 16384 and bytes(out) == b"\x77" * 16384


def test_sync_and_async_on_a_reaper_queue(tmp_path, host):
    dev = _direct_device(tmp_path, 4 * MiB)
    try:
        ops = LayoutOps([(0, 4 * MiB, M, 0, 0)], dev)
        host.inode.i_size = 4 * MiB
        q = dev.new_queue(32, reaper=True)
        # sync: the submitter waits while the reaper thread ends its bios
        assert dio_rw(host.kiocb(0, write=True), abuf(MiB, 0x21), ops, queue=q) == MiB
        out = abuf(MiB)
        assert dio_rw(host.kiocb(0), out, ops, queue=q) == MiB and bytes(out) == b"\x21" * MiB
        # async: completions arrive on the reaper thread
        ev = threading.Event()
        got = []

        def complete(iocb, res):
            got.append((res, threading.get_ident()))
            if len(got) == 16:
                ev.set()
        for i in range(16):
            r = dio_rw(Kiocb(host.file, i * 4096, Iocb.DIRECT, complete), abuf(4096), ops, queue=q)
            if r != EIOCBQUEUED:
                complete(None, r)
        assert ev.wait(10)
        assert [g[0] for g in got] == [4096] * 16
        assert host.inode.dio_count == 0
    finally:
        dev.close()


def test_concurrent_threads_share_a_device(tmp_path, host):
    dev = _direct_device(tmp_path, 8 * MiB)
    try:
        ops = LayoutOps([(0, 8 * MiB, M, 0, 0)], dev)
        host.inode.i_size = 8 * MiB
        errors = []

        def worker(t):
            try:
                for i in range(50):
                    pos = (t * 50 + i) * 4096
                    assert dio_rw(Kiocb(host.file, pos, Iocb.DIRECT | Iocb.WRITE),
                                  abuf(4096, t + 1), ops) == 4096
                    out = abuf(4096)
                    assert dio_rw(Kiocb(host.file, pos, Iocb.DIRECT), out, ops) == 4096
                    assert bytes(out) == bytes([t + 1]) * 4096
            except BaseException as e:          # reported in the main thread
                errors.append(e)
        ts = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert errors == []
    finally:
        dev.close()


def test_atomic_bio_mapping_must_cover_the_write(host):
    dev = ramdev()
    ops = LayoutOps([(0, 4096, M, MapFlag.ATOMIC_BIO, 0), (4096, 8192, M, MapFlag.ATOMIC_BIO, 4096)], dev)
    host.inode.i_size = 16384
    with pytest.raises(AlignmentError.__mro__[1]) as ei:    # InvalidError family: EINVAL
        dio_rw(host.kiocb(0, write=True, flags=Iocb.ATOMIC), abuf(8192), ops)
    assert ei.value.errno == errno.EINVAL
    assert ops.begin_calls[0][2] & IterFlag.ATOMIC
    assert dev.pread(8192, 0) == bytes([GARBAGE]) * 8192
    assert dio_rw(host.kiocb(4096, write=True, flags=Iocb.ATOMIC), abuf(8192), ops) == 8192


def test_zeroing_beyond_the_zero_buffer_uses_several_zero_bios(host):
    h = Host(size=1 << 20, blkbits=17)                     # 128 KiB fs blocks
    try:
        dev = faultdev()
        ops = LayoutOps([(0, 1 << 20, M, N, 0)], dev)
        assert dio_rw(h.kiocb(4096, write=True), abuf(4096, 0x12), ops) == 4096
        assert dev.pread(1 << 17, 0) == bytes(4096) + b"\x12" * 4096 + bytes((1 << 17) - 8192)
        assert max(b[2] for b in data_bios(dev) if b[0] == "write") <= cdio.ZERO_BUF_BYTES
        assert h.inode.dio_count == 0
    finally:
        h.close()


# ---- blk_start_plug / blk_finish_plug on the thread's queue ---------------------------------

def test_plug_holds_async_bios_until_finish_and_sync_dio_still_completes(host):
    dev = ramdev()
    ops = LayoutOps([(0, MiB, M, 0, 0)], dev)
    host.inode.i_size = MiB
    q = dev.queue()
    got = []
    cb = lambda i, r: got.append((i.private, r))
    q.start_plug()
    q.start_plug()                                   # nests
    for i in range(4):
        k = Kiocb(host.file, i * 4096, Iocb.DIRECT | Iocb.WRITE, cb, i)
        assert dio_rw(k, abuf(4096, i + 1), ops) == EIOCBQUEUED
    # nothing reached the device: every bio is still on the plug list
    assert q.plugged == 4 and q.inflight == 4 and got == []
    # a synchronous DIO under the plug flushes it before it waits (as schedule() does)
    k = host.kiocb(8 * 4096, write=True)
    assert dio_rw(k, abuf(4096, 9), ops) == 4096
    assert dev.pread(4096, 8 * 4096) == bytes([9]) * 4096
    q.finish_plug()                                  # inner level: no submission
    k = Kiocb(host.file, 5 * 4096, Iocb.DIRECT | Iocb.WRITE, cb, 5)
    assert dio_rw(k, abuf(4096, 6), ops) == EIOCBQUEUED
    assert q.plugged == 1
    q.finish_plug()                                  # outermost: one submission for all
    assert q.plugged == 0
    q.wait(q.inflight)
    assert sorted(got) == [(0, 4096), (1, 4096), (2, 4096), (3, 4096), (5, 4096)]
    for i in (0, 1, 2, 3):
        assert dev.pread(4096, i * 4096) == bytes([i + 1]) * 4096
    assert dev.pread(4096, 5 * 4096) == bytes([6]) * 4096
    assert host.inode.dio_count == 0
    with pytest.raises(InvariantError):
        q.finish_plug()
    # without a plug an async DIO reaches the device at once (a RamDev completes it
    # inside unplug(), so the call returns the result itself)
    k = Kiocb(host.file, 6 * 4096, Iocb.DIRECT | Iocb.WRITE, cb, 6)
    assert dio_rw(k, abuf(4096, 7), ops) == 4096
    assert q.plugged == 0 and q.inflight == 0
    assert dev.pread(4096, 6 * 4096) == bytes([7]) * 4096

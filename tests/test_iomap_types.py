"""ufs.iomap.iomap: enum mirrors, IoMap, Kiocb, IovIter and the IomapIter loop contract
(reference/iomap-semantics.md §2.6-2.7, docs/CORE-API.md §3)."""
from __future__ import annotations

import errno

import pytest

import ufs.iomap as ui
from ufs.errors import InvalidError, InvariantError, NotBlockError, NoSpaceError
from ufs.iomap import (C_ENUMS, IOMAP_NULL_ADDR, DioFlag, DioOps, IoMap, IomapIter, IomapOps,
                       Iocb, IovIter, IterFlag, Kiocb, MapFlag, MapType)


# ---- mirrors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [MapType, MapFlag, IterFlag, DioFlag, Iocb])
def test_intflag_mirrors_match_c_enums(cls):
    c = C_ENUMS[cls.__name__]
    assert {m.name: int(m) for m in cls} == c


def test_sentinels():
    assert ui.EIOCBQUEUED == C_ENUMS["EIOCBQUEUED"] == -529
    assert IOMAP_NULL_ADDR == C_ENUMS["IOMAP_NULL_ADDR"] == 2 ** 64 - 1


def test_private_dio_bits_do_not_overlap_public_ones():
    public = 0
    for m in DioFlag:
        assert public & m == 0
        public |= m
    assert public < (1 << 25)          # dio.pyx keeps its private bits at 1 << 25 and up
    assert MapFlag.STALE < MapFlag.PRIVATE and MapFlag.SIZE_CHANGED < MapFlag.PRIVATE


# ---- IoMap / Kiocb ----------------------------------------------------------------------------

def test_iomap_reset():
    m = IoMap(offset=4096, length=8192, type=MapType.MAPPED, flags=MapFlag.NEW, addr=1 << 20,
              private="x", validity_cookie=7)
    assert (m.offset, m.length, m.type, m.flags, m.addr) == (4096, 8192, 2, 1, 1 << 20)
    m.reset()
    assert (m.offset, m.length, m.type, m.flags, m.addr, m.private, m.validity_cookie,
            m.bdev, m.inline_data) == (0, 0, MapType.HOLE, 0, IOMAP_NULL_ADDR, None, 0, None, None)
    assert IoMap().addr == IOMAP_NULL_ADDR


def test_iomap_bdev_must_be_a_blockdev():
    with pytest.raises(TypeError):
        IoMap().bdev = object()


def test_kiocb_fields():
    k = Kiocb("f", 10, Iocb.DSYNC | Iocb.WRITE)
    assert (k.ki_filp, k.ki_pos, k.ki_flags, k.ki_complete, k.private) == ("f", 10, 2 | 1 << 18, None, None)
    k.ki_pos += 5
    assert k.ki_pos == 15


# ---- IovIter ---------------------------------------------------------------------------------

def test_iov_iter_wraps_buffers():
    assert not IovIter(b"abc").writable
    assert IovIter(bytearray(3)).writable
    it = IovIter(bytearray(100), 40)
    assert (it.count, it.offset) == (40, 0)
    it.advance(10)
    assert (it.count, it.offset) == (30, 10)
    it.revert(4)
    assert (it.count, it.offset) == (34, 6)
    with pytest.raises(InvariantError):
        it.advance(35)
    with pytest.raises(InvalidError):  # count beyond the buffer
        IovIter(bytearray(4), 5)


def test_iov_iter_fault_model():
    it = IovIter(bytearray(16384))
    it.fault_at = 8192
    assert it.fault_at == 8192 and not it.nofault
    it.nofault = True
    it.fault_in()
    assert it.fault_at is None


# ---- IomapIter -------------------------------------------------------------------------------

class Ops(IomapOps):
    """Fixed 4096-byte extents; scripted errors and contract breaks."""

    def __init__(self, ext=4096, begin_error=None, end_error=None, mangle=None, src=None):
        self.ext, self.begin_error, self.end_error, self.mangle, self.src = ext, begin_error, end_error, mangle, src
        self.begins, self.ends, self.seen_maps = [], [], []

    def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
        self.seen_maps.append((iomap.type, iomap.flags, iomap.length, srcmap.type, srcmap.length))
        self.begins.append((pos, length, flags))
        if self.begin_error and self.begin_error[0] == len(self.begins) - 1:
            raise self.begin_error[1]
        iomap.offset = pos - pos % self.ext
        iomap.length = self.ext
        iomap.type = MapType.MAPPED
        iomap.addr = iomap.offset
        if self.src is not None:
            srcmap.type, srcmap.offset, srcmap.length = MapType.MAPPED, *self.src
        if self.mangle:
            self.mangle(iomap, srcmap, len(self.begins) - 1)

    def iomap_end(self, inode, pos, length, written, flags, iomap):
        self.ends.append((pos, length, written))
        if self.end_error and self.end_error[0] == len(self.ends) - 1:
            raise self.end_error[1]


class NoEndOps(IomapOps):
    def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
        iomap.offset, iomap.length, iomap.type = pos, 1000, MapType.HOLE


def run(it, step=None):
    lens = []
    while it.next():
        n = it.length
        lens.append((it.pos, n))
        it.advance(n if step is None else min(step, n))
    return lens


def test_loop_walks_mappings_and_trims():
    ops = Ops()
    it = IomapIter(None, 1000, 9000, IterFlag.WRITE, ops)
    assert run(it) == [(1000, 3096), (4096, 4096), (8192, 1808)]
    assert it.processed == 9000 and it.pos == 10000 and it.remaining == 0
    # iomap_end gets the mapping's start pos and trimmed length, plus what was advanced
    assert ops.ends == [(1000, 3096, 3096), (4096, 4096, 4096), (8192, 1808, 1808)]
    assert all(b[2] == IterFlag.WRITE for b in ops.begins)
    assert not it.next()                           # stays done


def test_partial_advance_remaps_from_the_new_position():
    ops = Ops()
    it = IomapIter(None, 0, 4096, 0, ops)
    assert run(it, step=1024) == [(0, 4096), (1024, 3072), (2048, 2048), (3072, 1024)]
    assert [e[2] for e in ops.ends] == [1024] * 4


def test_no_progress_stops_with_zero_and_no_error():
    ops = Ops()
    it = IomapIter(None, 0, 8192, 0, ops)
    assert it.next()
    assert not it.next()                           # advanced nothing, not STALE
    assert ops.ends == [(0, 4096, 0)] and it.processed == 0


def test_stale_remaps_same_position():
    ops = Ops()
    it = IomapIter(None, 0, 8192, 0, ops)
    assert it.next()
    it.iomap.flags |= MapFlag.STALE
    assert it.next()                               # remapped without progress
    assert [b[0] for b in ops.begins] == [0, 0]
    it.advance(it.length)
    assert it.next() and it.pos == 4096


def test_maps_reset_before_each_begin():
    ops = Ops(src=(0, 2048))
    it = IomapIter(None, 0, 4096, 0, ops, private="P")
    assert it.next()
    assert it.length == 2048                       # min of iomap end and srcmap end
    assert it.iomap.iter_private == "P"
    it.iomap.flags |= MapFlag.NEW
    it.advance(2048)
    ops.src = None
    assert it.next()
    # the second begin saw a clean HOLE iomap and srcmap
    assert ops.seen_maps[1] == (MapType.HOLE, 0, 0, MapType.HOLE, 0)


def test_status_error_ends_loop_after_iomap_end():
    ops = Ops()
    it = IomapIter(None, 0, 8192, 0, ops)
    assert it.next()
    it.advance(100)
    it.status = -errno.ENOSPC
    with pytest.raises(NoSpaceError):
        it.next()
    assert ops.ends == [(0, 4096, 100)]
    assert it.processed == 100


def test_positive_status_is_a_bug():
    it = IomapIter(None, 0, 8192, 0, Ops())
    assert it.next()
    it.advance(10)
    it.status = 5
    with pytest.raises(InvariantError):
        it.next()


def test_begin_error_ends_without_iomap_end():
    ops = Ops(begin_error=(1, NoSpaceError()))
    it = IomapIter(None, 0, 8192, 0, ops)
    assert it.next()
    it.advance(4096)
    with pytest.raises(NoSpaceError):
        it.next()
    assert len(ops.ends) == 1                      # only the mapping that was returned


def test_begin_negative_return_is_an_error():
    class R(IomapOps):
        def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
            return -errno.ENOTBLK
    with pytest.raises(NotBlockError):
        IomapIter(None, 0, 10, 0, R()).next()


def test_iomap_end_error_counts_only_without_progress():
    ops = Ops(end_error=(0, NotBlockError()))
    it = IomapIter(None, 0, 8192, 0, ops)
    assert it.next()
    it.advance(512)
    assert it.next()                               # error dropped: progress was made
    assert (it.pos, it.length) == (512, 3584)
    it.advance(it.length)
    assert it.next() and it.pos == 4096
    it.advance(it.length)
    assert not it.next() and it.processed == 8192

    ops = Ops(end_error=(0, NotBlockError()))
    it = IomapIter(None, 0, 8192, 0, ops)
    assert it.next()
    with pytest.raises(NotBlockError):             # no progress: the error is the result
        it.next()


@pytest.mark.parametrize("mangle", [
    lambda m, s, n: setattr(m, "offset", 4096 + 201),              # offset > pos
    lambda m, s, n: setattr(m, "length", 0),                       # empty
    lambda m, s, n: (setattr(m, "offset", 0), setattr(m, "length", 100)),  # ends before pos
    lambda m, s, n: setattr(m, "flags", MapFlag.STALE),            # core-only flag
], ids=["offset-after-pos", "zero-length", "ends-before-pos", "stale-from-fs"])
def test_contract_violation_is_invariant_error_after_iomap_end(mangle):
    ops = Ops(mangle=mangle)
    it = IomapIter(None, 4096 + 200, 1000, 0, ops)
    with pytest.raises(InvariantError) as ei:
        it.next()
    assert ei.value.errno == errno.EIO
    assert ops.ends == [(4296, 1000, 0)]           # iomap_end ran for the broken mapping


def test_advance_beyond_length_is_invariant_error():
    it = IomapIter(None, 0, 8192, 0, Ops())
    assert it.next()
    with pytest.raises(InvariantError):
        it.advance(4097)


def test_iomap_end_not_overridden_is_not_called():
    ops = NoEndOps()
    assert not ops.has_iomap_end
    it = IomapIter(None, 0, 2500, 0, ops)
    assert run(it) == [(0, 1000), (1000, 1000), (2000, 500)]


def test_non_oserror_from_begin_propagates_as_is():
    class Bug(IomapOps):
        def iomap_begin(self, *a):
            raise KeyError("bug")
    with pytest.raises(KeyError):
        IomapIter(None, 0, 1, 0, Bug()).next()


def test_dioops_override_detection():
    class E(DioOps):
        def end_io(self, iocb, size, error, flags):
            return None

    class S(DioOps):
        def submit_io(self, iter, bio, file_offset):
            bio.submit()

    assert (DioOps().has_end_io, DioOps().has_submit_io) == (False, False)
    assert (E().has_end_io, E().has_submit_io) == (True, False)
    assert (S().has_end_io, S().has_submit_io) == (False, True)

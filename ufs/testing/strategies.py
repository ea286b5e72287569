"""Hypothesis strategies for DIO differential tests: file layouts and operation sequences.

What it owns: ``geometries()`` (fs block size and device logical block size, each in
{512, 4096}, lbs <= block size), ``layouts(geometry)`` (mixes of HOLE / MAPPED / UNWRITTEN /
INLINE extents with scattered device addresses, plus i_size and initial content) and
``ops(geometry, file_span)`` / ``op_sequences(...)`` (aligned, lbs-aligned and unaligned
reads and writes, optionally long ones of more than 1 MiB; O_DSYNC, O_SYNC, NOWAIT, async).
Device extents sometimes carry SHARED or DIRTY (both forbid the FUA shortcut).

May import: ``hypothesis``, ``ufs.iomap`` (MapType), ``ufs.testing.model`` (Op).

Generated layouts are what layoutfs accepts: extents are block aligned and do not overlap;
device extents do not overlap each other and leave room for allocation after them.
"""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from ufs.iomap import MapFlag, MapType
from ufs.testing.model import Op

__all__ = ["Geometry", "LayoutCase", "geometries", "layouts", "ops", "op_sequences"]


@dataclass(frozen=True)
class Geometry:
    block_size: int          # fs block (i_blkbits)
    lbs: int                 # device logical block size

    def __repr__(self):
        return f"Geometry(bs={self.block_size}, lbs={self.lbs})"


@dataclass
class LayoutCase:
    geometry: Geometry
    extents: list            # (offset, length, MapType, flags, addr)
    i_size: int
    content: bytes           # initial bytes [0, i_size) (ignored where the layout has none)
    dev_size: int            # bytes the device needs (extents + allocation room)
    alloc_start: int

    @property
    def span(self) -> int:
        ends = [o + n for o, n, *_ in self.extents]
        return max([self.i_size] + ends)


@st.composite
def geometries(draw, block_sizes=(512, 4096), lbs_choices=(512, 4096)):
    bs = draw(st.sampled_from(block_sizes))
    lbs = draw(st.sampled_from([x for x in lbs_choices if x <= bs]))
    return Geometry(bs, lbs)


_TYPES = [MapType.HOLE, MapType.MAPPED, MapType.UNWRITTEN]


@st.composite
def layouts(draw, geometry=None, max_blocks=12, inline=True, delalloc=False, room=0):
    """A ``LayoutCase``; ``room``: extra device bytes for allocation (long-I/O tests)."""
    g = geometry if geometry is not None else draw(geometries())
    bs = g.block_size
    nblk = draw(st.integers(1, max_blocks))
    types = list(_TYPES) + ([MapType.DELALLOC] if delalloc else [])
    segs = []
    blk = 0
    while blk < nblk:
        n = draw(st.integers(1, max(1, min(4, nblk - blk))))
        t = draw(st.sampled_from(types))
        segs.append((blk, n, t))
        blk += n
    # An INLINE tail extent, at most one block (btrfs/ext4 keep inline data small).
    if inline and draw(st.booleans()) and draw(st.booleans()):
        segs.append((blk, 1, MapType.INLINE))
        nblk += 1
    # Device addresses: the extents in a shuffled order with gaps, so that file order and
    # device order differ and contiguity across extents is not assumed.
    dev_exts = [s for s in segs if s[2] in (MapType.MAPPED, MapType.UNWRITTEN)]
    order = draw(st.permutations(list(range(len(dev_exts)))))
    addr_of = {}
    cursor = bs * draw(st.integers(0, 2))
    for k in order:
        addr_of[k] = cursor
        cursor += dev_exts[k][1] * bs + bs * draw(st.integers(0, 1))
    extents = []
    k = 0
    for b, n, t in segs:
        if t == MapType.HOLE:
            continue
        addr = (1 << 64) - 1
        flags = 0
        if t in (MapType.MAPPED, MapType.UNWRITTEN):
            addr = addr_of[k]
            k += 1
            # SHARED (COW: no FUA, DIO_COW to end_io) and DIRTY (metadata pending: no FUA).
            flags = draw(st.sampled_from([0, 0, 0, int(MapFlag.SHARED), int(MapFlag.DIRTY)]))
        extents.append((b * bs, n * bs, t, flags, addr))
    span = nblk * bs
    if segs[-1][2] == MapType.INLINE:
        # Inline data holds the file's tail: EOF lies inside it (as the kernel assumes).
        i_size = draw(st.integers((nblk - 1) * bs, span))
    else:
        i_size = draw(st.one_of(st.integers(0, span),
                                st.integers(0, nblk).map(lambda x: x * bs)))
    seed = draw(st.integers(0, 255))
    content = bytes(((i * 13 + seed) % 249) + 3 for i in range(i_size))
    alloc_start = -(-cursor // bs) * bs
    # Room to allocate: ops stay inside 2 * span + a few blocks of file space (+ room).
    dev_size = alloc_start + 4 * span + 8 * bs + room
    dev_size = -(-dev_size // 4096) * 4096
    return LayoutCase(g, extents, i_size, content, dev_size, alloc_start)


@st.composite
def ops(draw, geometry: Geometry, file_span: int, *, kinds=("read", "write"), flags=True,
        allow_async=True, unaligned=True, long_io=False):
    kind = draw(st.sampled_from(kinds))
    bs, lbs = geometry.block_size, geometry.lbs
    limit = max(file_span + 2 * bs, 2 * bs)
    styles = ["block", "lbs", "lbs", "any"] if unaligned else ["block", "lbs"]
    if long_io and draw(st.integers(0, 5)) == 0:
        styles = ["long"]
    style = draw(st.sampled_from(styles))
    if style == "block":
        pos = draw(st.integers(0, limit // bs)) * bs
        length = draw(st.integers(1, 4)) * bs
    elif style == "lbs":
        pos = draw(st.integers(0, limit // lbs)) * lbs
        length = draw(st.integers(1, max(1, 4 * bs // lbs))) * lbs
    elif style == "any":
        pos = draw(st.integers(0, limit))
        length = draw(st.integers(1, 3 * bs))
    else:
        # Long I/O: more than one bio's worth (the engines split at ~1 MiB).
        pos = draw(st.integers(0, limit // bs)) * bs
        length = draw(st.integers(256, 400)) * 4096
    dsync = sync = nowait = is_async = False
    if flags:
        if kind == "write":
            dsync = draw(st.booleans())
            sync = dsync and draw(st.booleans())
        nowait = draw(st.integers(0, 5)) == 0
    if allow_async:
        is_async = draw(st.booleans())
    fill = draw(st.integers(0, 255))
    return Op(kind, pos, length, dsync=dsync, sync=sync, nowait=nowait, is_async=is_async,
              fill=fill)


def op_sequences(geometry: Geometry, file_span: int, max_size=8, **kw):
    return st.lists(ops(geometry, file_span, **kw), min_size=1, max_size=max_size)

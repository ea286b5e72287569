"""Expected-state model of one file under direct I/O: what a user must be able to see.

What it owns: ``FileModel`` — the file's bytes and size as they should read back, plus the
"uncertain" bytes a failed write may or may not have changed (old, new, or zeros for blocks
that stayed unwritten) — and ``expect_errno``, the errno rules that follow from the layout
alone (sem §3.6/§3.7, §2.4): misaligned bio-path I/O → EINVAL, NOWAIT allocation → EAGAIN.

May import: ``ufs.iomap`` (MapType), ``ufs.errors``.  Pure data; no I/O, no locks.

Invariant the differential tests check with it: a read never returns a byte the model does
not allow; in particular never device garbage where the file should hold zeros.
"""
from __future__ import annotations

import errno as _errno

from ufs.iomap import MapType

__all__ = ["FileModel", "expect_errno", "Op"]


class Op:
    """One DIO operation of a generated sequence (plain record)."""

    __slots__ = ("kind", "pos", "length", "dsync", "sync", "nowait", "is_async", "fill")

    def __init__(self, kind, pos, length, *, dsync=False, sync=False, nowait=False,
                 is_async=False, fill=0):
        self.kind, self.pos, self.length = kind, pos, length
        self.dsync, self.sync, self.nowait, self.is_async, self.fill = (
            dsync, sync, nowait, is_async, fill)

    def data(self) -> bytes:
        """The bytes a write op writes: distinct per op and per position (catches shifts)."""
        f = self.fill & 0xFF
        return bytes(((i * 7 + f) % 251) + 1 for i in range(self.length))

    def __repr__(self):
        fl = [n for n in ("dsync", "sync", "nowait", "is_async") if getattr(self, n)]
        return f"Op({self.kind} {self.pos}+{self.length} {' '.join(fl)} fill={self.fill})"


class FileModel:
    """Bytes [0, i_size) a reader must see, plus bytes a failed write left uncertain."""

    def __init__(self, data: bytes, i_size: int):
        self.data = bytearray(data[:i_size].ljust(i_size, b"\0"))
        self.i_size = i_size
        self.maybe: dict[int, frozenset] = {}     # pos -> other allowed byte values
        self.size_choices: tuple | None = None

    def _ensure(self, end: int) -> None:
        if len(self.data) < end:
            self.data.extend(bytes(end - len(self.data)))

    def write_done(self, pos: int, data: bytes, n: int) -> None:
        """A write that returned ``n`` bytes: those bytes are now the file's."""
        if n <= 0:
            return
        self._ensure(pos + n)
        self.data[pos:pos + n] = data[:n]
        for p in range(pos, pos + n):
            self.maybe.pop(p, None)
        self.i_size = max(self.i_size, pos + n)

    def write_failed(self, pos: int, data: bytes) -> None:
        """A write that failed: each byte is old, new, or zero; the size may have grown."""
        end = pos + len(data)
        self._ensure(end)
        for i, p in enumerate(range(pos, end)):
            self.maybe[p] = self.maybe.get(p, frozenset()) | {data[i], 0, self.data[p]}
        # INLINE writes move i_size in the core as they copy, so any size in between is allowed.
        self.size_choices = (self.i_size, max(self.i_size, end))

    def expect_read(self, pos: int, length: int) -> bytes:
        end = min(pos + length, self.i_size)
        return bytes(self.data[pos:end]) if end > pos else b""

    def check_read(self, pos: int, got: bytes) -> list[int]:
        """Positions where ``got`` (read at ``pos``) is not allowed; resolves uncertain bytes."""
        end = pos + len(got)
        if got == bytes(self.data[pos:end]).ljust(len(got), b"\0"):
            if self.maybe:
                for p in range(pos, end):
                    self.maybe.pop(p, None)
            return []
        bad = []
        for i, b in enumerate(got):
            p = pos + i
            want = self.data[p] if p < len(self.data) else 0
            if b == want:
                self.maybe.pop(p, None)
                continue
            alts = self.maybe.get(p)
            if alts is not None and b in alts:
                self.data[p] = b
                del self.maybe[p]
                continue
            bad.append(p)
        return bad

    def adopt_size(self, i_size: int) -> bool:
        """Accept the file's size after uncertainty; False when it is not an allowed one."""
        if self.size_choices is not None:
            lo, hi = self.size_choices
            ok = lo <= i_size <= hi
            self.size_choices = None
            if ok:
                self._ensure(i_size)
                self.i_size = i_size
            return ok
        return i_size == self.i_size

    def image(self) -> bytes:
        return bytes(self.data[:self.i_size])


def expect_errno(op: Op, segments, *, lbs: int, i_size: int, bs: int = 0,
                 max_map_length: int | None = None) -> int:
    """The errno the layout dictates for ``op`` (0: success with the full/clamped count).

    ``segments``: list of (start, end, MapType) covering the op's range, before the op, as
    ``Layout.segments`` gives them (block-aligned boundaries).  Rules (sem §2.4, §3.6, §3.7):
    reads at/after EOF do nothing; a NOWAIT write needing allocation or more than one mapping
    is EAGAIN; DELALLOC is EIO; any bio-path mapping (reads: MAPPED; writes: everything but
    INLINE, holes being allocated) whose trimmed range is not logical-block aligned is EINVAL,
    and an error anywhere fails the whole call.
    """
    end = op.pos + op.length
    if op.length == 0:
        return 0
    if op.kind == "read" and op.pos >= i_size:
        return 0
    write = op.kind == "write"
    if write and op.nowait and segments:
        s, e, t = segments[0]
        if max_map_length:
            # layoutfs caps a mapping at max(start + cap, the block after pos).
            m_start = op.pos - op.pos % bs     # extents are block aligned, so never before
            e = min(e, max(m_start + max_map_length, -(-(op.pos + 1) // bs) * bs))
        if t == MapType.HOLE or e < end:
            return _errno.EAGAIN
    for s, e, t in segments:
        a, b = max(s, op.pos), min(e, end)
        if t == MapType.DELALLOC:
            return _errno.EIO
        bio = t != MapType.INLINE if write else t == MapType.MAPPED
        if bio and (a | (b - a)) % lbs:
            return _errno.EINVAL
    return 0

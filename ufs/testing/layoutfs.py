"""layoutfs: a test personality whose file layout is given explicitly.

What it owns: an in-memory description of one file's layout (``Layout``: sorted, non-
overlapping ``Extent`` records; anything between them is a HOLE) over a ``BlockDev``, and the
ops that expose it to the DIO engines:

- ``LayoutIomapOps``: returns mappings exactly as the layout says.  Test knobs: cap mapping
  length (short mappings), mark the first mapping STALE (a contract violation: the core owns
  that flag, so engines fail the call with EIO), fail with an errno at/after a position,
  return ENOTBLK at/after a position (mappings are cut there so the bytes before it are done
  first), an iomap_end that fails with an errno (which must count only for a mapping that
  made no progress, sem §2.6), and an ``on_begin`` hook for tests that need to pause a dio.
  Writes into holes allocate **UNWRITTEN + NEW** extents (xfs style) from a bump allocator;
  write mappings that reach past i_size carry ``DIRTY`` (sem §3.10).
- ``LayoutDioOps.end_io``: converts the written part of unwritten extents to MAPPED, then
  moves i_size, forward only (xfs_dio_write_end_io order: conversion before size).
- ``LayoutFileOps.fsync``: flushes the device; with ``takes_i_rwsem=True`` it takes
  ``inode.i_rwsem`` for write first, like btrfs_sync_file (the seed's deadlock, sem §4.1).
- ``make_layout_file(dev, layout, i_size, ...) -> (file, ops, dops)``.

May import: ``ufs.iomap``, ``ufs.vfs``, ``ufs.errors``.

Invariants: extents are block aligned (fs block) and never overlap; i_size only grows through
end_io (or the core's INLINE write); ``Layout._lock`` guards the extent list and the allocator
(the lower "ILOCK" analogue, never held across a call into the engine).
"""
from __future__ import annotations

import bisect
import errno as _errno
import os
import stat
import threading
from dataclasses import dataclass

from ufs.errors import AgainError, NoSpaceError, NotBlockError, from_errno
from ufs.iomap import (IOMAP_NULL_ADDR, DioFlag, DioOps, Iocb, IomapOps, IterFlag, MapFlag,
                       MapType)
from ufs.vfs import File, Inode, Superblock
from ufs.vfs.ops import FileOperations

__all__ = ["Extent", "Layout", "LayoutIomapOps", "LayoutDioOps", "LayoutFileOps",
           "make_layout_file", "initial_image"]

_FAR = 1 << 62          # "end of file address space" for the last hole


@dataclass
class Extent:
    """One extent: file bytes [offset, offset+length) of ``type`` at device ``addr``."""
    offset: int
    length: int
    type: MapType
    flags: int = 0
    addr: int = IOMAP_NULL_ADDR
    data: bytearray | None = None      # INLINE only: the inline bytes, len == length

    @property
    def end(self) -> int:
        return self.offset + self.length

    def copy(self) -> Extent:
        return Extent(self.offset, self.length, self.type, self.flags, self.addr,
                      None if self.data is None else bytearray(self.data))


def _as_extent(e) -> Extent:
    if isinstance(e, Extent):
        return e.copy()
    offset, length, typ, *rest = e
    flags = rest[0] if len(rest) > 0 else 0
    addr = rest[1] if len(rest) > 1 else IOMAP_NULL_ADDR
    return Extent(int(offset), int(length), MapType(typ), int(flags), int(addr))


class Layout:
    """Sorted extent list of one file.  HOLE extents are not stored."""

    def __init__(self, extents=(), block_size: int = 4096):
        self.block_size = block_size
        self._lock = threading.RLock()
        exts = sorted((_as_extent(e) for e in extents), key=lambda x: x.offset)
        exts = [e for e in exts if e.type != MapType.HOLE]
        for a, b in zip(exts, exts[1:]):
            if a.end > b.offset:
                raise ValueError(f"overlapping extents {a} {b}")
        for e in exts:
            if e.length <= 0 or e.offset % block_size or e.length % block_size:
                raise ValueError(f"extent not block aligned: {e}")
            if e.type == MapType.INLINE and e.data is None:
                e.data = bytearray(e.length)
        self.extents: list[Extent] = exts

    def _starts(self):
        return [e.offset for e in self.extents]

    def find(self, pos: int):
        """(extent or None, start, end): the extent holding ``pos`` or the hole around it."""
        with self._lock:
            starts = self._starts()
            i = bisect.bisect_right(starts, pos) - 1
            if i >= 0 and self.extents[i].end > pos:
                return self.extents[i], self.extents[i].offset, self.extents[i].end
            start = self.extents[i].end if i >= 0 else 0
            end = self.extents[i + 1].offset if i + 1 < len(self.extents) else _FAR
            return None, start, end

    def insert(self, ext: Extent) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts(), ext.offset)
            if i > 0 and self.extents[i - 1].end > ext.offset:
                raise ValueError("insert over an extent")
            if i < len(self.extents) and self.extents[i].offset < ext.end:
                raise ValueError("insert over an extent")
            self.extents.insert(i, ext)

    def _split_at(self, pos: int) -> None:
        e, start, end = self.find(pos)
        if e is None or start == pos or e.type == MapType.INLINE:
            # Inline data is never converted, and its buffer may be exported to an engine.
            return
        d = pos - e.offset
        tail = Extent(pos, e.end - pos, e.type, e.flags,
                      e.addr + d if e.addr != IOMAP_NULL_ADDR else e.addr,
                      None if e.data is None else e.data[d:])
        e.length = d
        if e.data is not None:
            del e.data[d:]
        i = self.extents.index(e)
        self.extents.insert(i + 1, tail)

    def convert_unwritten(self, pos: int, end: int) -> int:
        """UNWRITTEN -> MAPPED over [pos, end) (block rounded); returns bytes converted."""
        bs = self.block_size
        pos = pos - pos % bs
        end = -(-end // bs) * bs
        done = 0
        with self._lock:
            self._split_at(pos)
            self._split_at(end)
            for e in self.extents:
                if e.offset >= pos and e.end <= end and e.type == MapType.UNWRITTEN:
                    e.type = MapType.MAPPED
                    e.flags &= ~int(MapFlag.NEW)
                    done += e.length
        return done

    def snapshot(self) -> list[tuple]:
        with self._lock:
            return [(e.offset, e.length, int(e.type), int(e.flags), e.addr) for e in self.extents]

    def segments(self, pos: int, end: int):
        """Yield (start, end, type) covering [pos, end), holes included."""
        while pos < end:
            e, s, t = self.find(pos)
            t = min(t, end)
            yield pos, t, (MapType.HOLE if e is None else MapType(e.type))
            pos = t

    def __repr__(self):
        return f"Layout(bs={self.block_size}, {self.snapshot()})"


class LayoutIomapOps(IomapOps):
    """iomap_begin/iomap_end straight from a ``Layout`` (see the module docstring)."""

    def __init__(self, layout: Layout, bdev, *, alloc_start: int, alloc_end: int | None = None,
                 max_map_length: int | None = None, stale_once: bool = False,
                 fail_at: int | None = None, fail_errno: int = _errno.EIO,
                 enotblk_at: int | None = None, record: list | None = None, on_begin=None,
                 end_errno: int | None = None):
        self.layout = layout
        self.bdev = bdev
        self.next_addr = alloc_start
        self.alloc_end = int(bdev.size) if alloc_end is None else alloc_end
        self.max_map_length = max_map_length
        self.stale_once = stale_once
        self.fail_at = fail_at
        self.fail_errno = fail_errno
        self.enotblk_at = enotblk_at
        self.record = record if record is not None else []
        self.on_begin = on_begin          # test hook: on_begin(inode, pos, length, flags)
        self.end_errno = end_errno        # iomap_end fails with it (counts only w/o progress)
        self.begins = 0
        self.ends = 0

    def _alloc(self, length: int) -> int:
        if self.next_addr + length > self.alloc_end:
            raise NoSpaceError("layoutfs: allocator exhausted")
        a = self.next_addr
        self.next_addr += length
        return a

    def iomap_begin(self, inode, pos, length, flags, iomap, srcmap):
        pos, length, flags = int(pos), int(length), int(flags)
        self.begins += 1
        if self.on_begin is not None:
            self.on_begin(inode, pos, length, flags)
        bs = self.layout.block_size
        if self.fail_at is not None and pos >= self.fail_at:
            self.record.append(("begin_fail", pos, self.fail_errno))
            raise from_errno(self.fail_errno, f"layoutfs: injected failure at {pos}")
        if self.enotblk_at is not None and pos >= self.enotblk_at:
            self.record.append(("begin_enotblk", pos))
            raise NotBlockError("layoutfs: injected ENOTBLK")
        want_end = pos + length
        for cut in (self.fail_at, self.enotblk_at):
            if cut is not None and cut > pos:
                want_end = min(want_end, cut)
        write = bool(flags & IterFlag.WRITE)
        nowait = bool(flags & IterFlag.NOWAIT)
        overwrite_only = bool(flags & IterFlag.OVERWRITE_ONLY)
        mflags = 0
        with self.layout._lock:
            ext, start, end = self.layout.find(pos)
            if ext is None and write:
                if nowait or overwrite_only:
                    raise AgainError("layoutfs: allocation needed")
                a_start = pos - pos % bs
                a_end = min(-(-want_end // bs) * bs, end)
                if self.max_map_length:
                    a_end = min(a_end, max(a_start + self.max_map_length,
                                           -(-(pos + 1) // bs) * bs))
                ext = Extent(a_start, a_end - a_start, MapType.UNWRITTEN, 0,
                             self._alloc(a_end - a_start))
                self.layout.insert(ext)
                mflags |= MapFlag.NEW
                start, end = ext.offset, ext.end
                self.record.append(("alloc", ext.offset, ext.length, ext.addr))
            typ = MapType.HOLE if ext is None else MapType(ext.type)
            m_start, m_end = start, end
            if self.max_map_length:
                m_start = max(start, pos - pos % bs)
                m_end = min(end, max(m_start + self.max_map_length, -(-(pos + 1) // bs) * bs))
            # Injected failures are "at a position": no mapping reaches across one.
            m_end = min(m_end, max(want_end, pos + 1)) if want_end < pos + length else m_end
            if write:
                if overwrite_only and (typ not in (MapType.MAPPED, MapType.UNWRITTEN)
                                       or m_end < pos + length):
                    raise AgainError("layoutfs: not a pure overwrite")
                if overwrite_only and typ == MapType.UNWRITTEN and (pos | length) % bs:
                    raise AgainError("layoutfs: unaligned overwrite of an unwritten extent")
                if nowait and m_end < pos + length:
                    raise AgainError("layoutfs: NOWAIT write needs more than one mapping")
                # A write reaching past EOF changes metadata at completion: no FUA shortcut.
                if pos + length > int(inode.i_size):
                    mflags |= MapFlag.DIRTY
            iomap.offset = m_start
            iomap.length = (m_end if m_end < _FAR else max(pos + length, m_start + bs)) - m_start
            iomap.type = int(typ)
            if ext is not None:
                mflags |= ext.flags & ~int(MapFlag.NEW)
                if ext.type in (MapType.MAPPED, MapType.UNWRITTEN):
                    iomap.addr = ext.addr + (m_start - ext.offset)
                if ext.type == MapType.INLINE:
                    d = m_start - ext.offset
                    iomap.inline_data = memoryview(ext.data)[d:d + iomap.length]
            iomap.bdev = self.bdev
            if self.stale_once:
                self.stale_once = False
                mflags |= MapFlag.STALE
            iomap.flags = int(mflags)
        self.record.append(("begin", pos, length, flags, iomap.offset, iomap.length,
                            iomap.type, iomap.flags))
        return 0

    def iomap_end(self, inode, pos, length, written, flags, iomap):
        self.ends += 1
        self.record.append(("end", int(pos), int(length), int(written), int(flags)))
        if self.end_errno:
            raise from_errno(self.end_errno, "layoutfs: injected iomap_end failure")
        return 0


class LayoutDioOps(DioOps):
    """end_io: unwritten conversion, then i_size forward (xfs order, sem §3.10)."""

    def __init__(self, layout: Layout, record: list | None = None):
        self.layout = layout
        self.record = record if record is not None else []
        self.size_lock = threading.Lock()      # the i_flags_lock analogue

    def end_io(self, iocb, size, error, flags):
        size, error, flags = int(size), int(error), int(flags)
        self.record.append(("end_io", int(iocb.ki_pos), size, error, flags))
        if not int(iocb.ki_flags) & Iocb.WRITE or error or size == 0:
            return None
        pos = int(iocb.ki_pos)
        if flags & DioFlag.UNWRITTEN:
            self.layout.convert_unwritten(pos, pos + size)
        inode = iocb.ki_filp.f_inode
        with self.size_lock:
            if pos + size > int(inode.i_size):
                inode.i_size = pos + size
        return None


class LayoutFileOps(FileOperations):
    """File operations of a layoutfs file: fsync flushes the device.

    ``takes_i_rwsem=True`` makes fsync take ``inode.i_rwsem`` for write first, as
    btrfs_sync_file does; ``calls`` counts fsyncs and ``log`` records, per call, the range and
    the inode's in-flight DIO count seen on entry (the ORDER test reads it).
    """

    def __init__(self, dev, *, takes_i_rwsem: bool = False):
        self.dev = dev
        self.takes_i_rwsem = takes_i_rwsem
        self.calls = 0
        self.log: list[tuple] = []
        self._lock = threading.Lock()

    def fsync(self, file, start, end, datasync):
        inode = file.f_inode
        dio_count = _dio_count(inode)
        with self._lock:
            self.calls += 1
            self.log.append(("fsync", int(start), int(end), bool(datasync), dio_count,
                             threading.current_thread().name))
        if self.takes_i_rwsem:
            inode.i_rwsem.down_write()
            try:
                self.dev.flush()
            finally:
                inode.i_rwsem.up_write()
        else:
            self.dev.flush()
        return 0


def _dio_count(inode) -> int | None:
    for name in ("i_dio_count", "dio_count", "_dio_count"):
        v = getattr(inode, name, None)
        if v is not None:
            return int(v() if callable(v) else v)
    return None


def initial_image(layout: Layout, content: bytes, i_size: int) -> bytes:
    """The file's bytes [0, i_size) as a reader must see them: zeros in holes/unwritten."""
    out = bytearray(i_size)
    for s, t, typ in layout.segments(0, i_size):
        if typ in (MapType.MAPPED, MapType.INLINE):
            out[s:t] = content[s:t]
    return bytes(out)


def make_layout_file(dev, layout, i_size: int, *, content: bytes | None = None,
                     block_size: int | None = None, file_flags: int | None = None,
                     fsync_takes_i_rwsem: bool = False, alloc_start: int | None = None,
                     sb=None, ino: int = 1, **ops_kw):
    """A layoutfs file over ``dev``: returns ``(file, ops, dops)``.

    ``layout``: a ``Layout`` or a list of ``Extent``/tuples ``(offset, length, type[, flags[,
    addr]])``.  ``content`` (default zeros) is written into MAPPED extents and INLINE data for
    ``[0, i_size)``; the rest of those extents is zeroed, as a real filesystem keeps the EOF
    block tail.  UNWRITTEN extents and unallocated device space keep whatever the device held
    (tests fill it with garbage to catch stale-data exposure).  New extents are allocated from
    ``alloc_start`` (default: past the last extent).  Extra keywords go to LayoutIomapOps.
    """

    if not isinstance(layout, Layout):
        layout = Layout(layout, block_size or 4096)
    bs = layout.block_size
    if content is None:
        content = bytes(i_size)
    content = bytes(content).ljust(i_size, b"\0")
    top = 0
    for e in layout.extents:
        if e.type in (MapType.MAPPED, MapType.UNWRITTEN):
            top = max(top, e.addr + e.length)
        if e.type == MapType.MAPPED:
            img = bytearray(e.length)
            lo, hi = e.offset, min(e.end, i_size)
            if hi > lo:
                img[:hi - lo] = content[lo:hi]
            dev.pwrite(bytes(img), e.addr)
        elif e.type == MapType.INLINE:
            lo, hi = e.offset, min(e.end, i_size)
            e.data[:] = bytes(e.length)
            if hi > lo:
                e.data[:hi - lo] = content[lo:hi]
    if alloc_start is None:
        alloc_start = -(-top // bs) * bs
    if sb is None:
        sb = Superblock(dev, bs)
    inode = Inode(sb, ino, stat.S_IFREG | 0o644, size=i_size, blkbits=bs.bit_length() - 1)
    record = ops_kw.pop("record", None)
    ops = LayoutIomapOps(layout, dev, alloc_start=alloc_start, record=record, **ops_kw)
    dops = LayoutDioOps(layout, ops.record)
    fops = LayoutFileOps(dev, takes_i_rwsem=fsync_takes_i_rwsem)
    if file_flags is None:
        file_flags = os.O_RDWR | os.O_DIRECT
    f = File(inode, file_flags, fops)
    f.layout = layout          # tests inspect it; f.f_op is fops
    return f, ops, dops

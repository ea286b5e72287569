"""Buffered (page-cache) reads and writes driven by the iomap iteration loop.

Layer: vfs.  Imports ``ufs.iomap`` (IomapIter, MapType, MapFlag, IterFlag, Iocb), ``ufs.vfs``
(pagecache, sync), ``ufs.errors`` and the standard library.

This is the kernel's fs/iomap/buffered-io.c in the shape Python callers need (CORE-API §6):
- :func:`buffered_read` copies from the page cache; pages (or blocks of pages) that are not
  uptodate are filled first through ``IomapIter`` with no op flag (a read): MAPPED blocks from
  ``iomap.bdev``, HOLE/UNWRITTEN/DELALLOC (and NEW) as zeros, INLINE from ``inline_data``.
  Reads are clamped to ``i_size``; blocks past the block holding EOF are zero-filled without
  asking the filesystem, and bytes at or past EOF in a page are zero.
- :func:`buffered_write` runs ``IomapIter`` with ``IterFlag.WRITE``.  For every page it
  touches, a partly written block that is not uptodate is first read from ``srcmap`` (or from
  ``iomap`` when srcmap is a HOLE), unless that map is not MAPPED, is NEW, or the block starts
  at/after EOF: then it is zeroed (iomap_block_needs_zeroing).  The data is copied in, the
  blocks are marked dirty (INLINE mappings are written through to ``inline_data`` instead) and
  i_size moves when the write extends the file, setting ``MapFlag.SIZE_CHANGED`` on the
  mapping before its ``iomap_end``.  Any mapping type is accepted, DELALLOC included:
  allocation happens at write-back (:mod:`ufs.vfs.writeback`).
- :func:`buffered_zero_range` (iomap_zero_range): zero a range through the cache, skipping
  HOLE/UNWRITTEN extents that have no cached pages.
- :func:`generic_write_checks`, :func:`generic_file_write`, :func:`generic_file_read`: the
  VFS entry points for personalities without special locking.  ``generic_file_write`` takes
  ``i_rwsem`` exclusive around the write and runs ``generic_write_sync`` *after* unlocking,
  as the kernel's ``generic_file_write_iter`` does.

Errors: a failure after some bytes were copied returns the short count (the kernel's
``iter.pos > ki_pos ? written : ret``); with no progress the exception propagates.
``ki_pos`` advances by exactly the bytes returned.

Locks: callers hold ``i_rwsem`` (shared to read, exclusive to write) unless they use the
generic_* helpers.  Filling takes the mapping's ``invalidate_lock`` shared and page locks in
ascending order; no lock is held across ``iomap_begin``/``iomap_end`` except page-independent
ones the caller holds.  The budget is balanced at the end of each call, with no page locked.
"""
from __future__ import annotations

from ufs.errors import AgainError, InvalidError, InvariantError, to_errno
from ufs.iomap import Iocb, IomapIter, IterFlag, MapFlag, MapType
from ufs.vfs.ops import MAX_LFS_FILESIZE, generic_write_checks
from ufs.vfs.sync import generic_write_sync

__all__ = ["buffered_read", "buffered_write", "buffered_zero_range", "generic_write_checks",
           "generic_file_write", "generic_file_read", "MAX_LFS_FILESIZE"]

_HOLE = int(MapType.HOLE)
_MAPPED = int(MapType.MAPPED)
_INLINE = int(MapType.INLINE)
_UNWRITTEN = int(MapType.UNWRITTEN)
_NEW = int(MapFlag.NEW)
_SIZE_CHANGED = int(MapFlag.SIZE_CHANGED)

#: pages locked together for one device read while filling
FILL_BATCH_PAGES = 32
#: bytes a buffered read fills and copies before it lets the budget evict
READ_WINDOW_BYTES = 1 << 20
#: pages a buffered write dirties between two budget checks
WRITE_BALANCE_PAGES = 64


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


def _fail_mapping(it, exc: BaseException) -> None:
    """End the current mapping after its body raised: iomap_end still sees what advanced."""
    it.status = to_errno(exc)
    try:
        it.next()
    except Exception:                   # noqa: BLE001 - the body's exception is the one to raise
        pass


# --- Filling pages (read side) -----------------------------------------------------------------

def _missing_runs(mapping, start: int, stop: int) -> list[list[int]]:
    """Byte runs of not-uptodate blocks in the pages covering ``[start, stop)``."""
    bs = mapping.block_size
    ps = mapping.page_size
    full = mapping.full_mask
    runs: list[list[int]] = []
    pos = start
    while pos < stop:
        page = mapping.find_page(pos // ps)
        if page is None or page.uptodate != full:
            mask = page.uptodate if page is not None else 0
            for b in range(mapping.blocks_per_page):
                if not mask >> b & 1:
                    s = pos + b * bs
                    if runs and runs[-1][1] == s:
                        runs[-1][1] = s + bs
                    else:
                        runs.append([s, s + bs])
        pos += ps
    return runs


def _fill_piece(mapping, iomap, pos: int, end: int, size: int) -> None:
    """Fill the not-uptodate blocks of ``[pos, end)`` from one mapping (or zeros)."""
    bs = mapping.block_size
    ps = mapping.page_size
    mtype = _HOLE if iomap is None else iomap.type
    if mtype != _HOLE and iomap.flags & _NEW:
        mtype = _HOLE
    first = pos // ps
    last = (end - 1) // ps
    for batch_start in range(first, last + 1, FILL_BATCH_PAGES):
        pages = []
        try:
            for index in range(batch_start, min(batch_start + FILL_BATCH_PAGES, last + 1)):
                pages.append(mapping.grab_page(index))
            # the span of this batch that still needs data, block aligned
            lo = hi = None
            for page in pages:
                need = mapping._block_mask(page, pos, end, bs, outer=True) & ~page.uptodate
                if need:
                    b0 = (need & -need).bit_length() - 1
                    b1 = need.bit_length()
                    s, e = page.pos + b0 * bs, page.pos + b1 * bs
                    lo = s if lo is None else lo
                    hi = e
            if lo is None:
                continue
            lo, hi = max(lo, pos), min(hi, end)
            src = None
            if mtype == _MAPPED or mtype == _INLINE:
                rel = lo - iomap.offset
                if rel < 0:
                    raise InvariantError(f"mapping {iomap!r} does not cover {lo}")
                if mtype == _MAPPED:
                    src = iomap.bdev.pread(hi - lo, iomap.addr + rel)
                else:
                    inline = memoryview(iomap.inline_data).cast("B")
                    src = bytes(inline[rel:rel + (hi - lo)])
                    if len(src) < hi - lo:
                        src += bytes(hi - lo - len(src))
            for page in pages:
                need = mapping._block_mask(page, lo, hi, bs, outer=True) & ~page.uptodate
                b = 0
                while need >> b:
                    if need >> b & 1:
                        s = page.pos + b * bs
                        a, z = max(s, lo), min(s + bs, hi)
                        off = a - page.pos
                        if src is None:
                            page.data[off:off + (z - a)] = bytes(z - a)
                        else:
                            page.data[off:off + (z - a)] = src[a - lo:z - lo]
                        if s + bs > size:             # bytes at/after EOF read as zero
                            zoff = max(size, s) - page.pos
                            page.data[zoff:off + (z - a)] = bytes(off + (z - a) - zoff)
                        if a == s and (z == s + bs or z >= size):
                            page.uptodate |= 1 << b
                    b += 1
        finally:
            for page in pages:
                page.lock.release()


def _fill_range(inode, mapping, ops, pos: int, end: int) -> None:
    """Make every block of the pages covering ``[pos, end)`` uptodate."""
    ps = mapping.page_size
    runs = _missing_runs(mapping, pos - pos % ps, _round_up(end, ps))
    if not runs:
        return
    size = inode.i_size
    eof_blk = _round_up(size, mapping.block_size)
    with mapping.invalidate_lock.read_locked():
        for start, stop in runs:
            io_end = min(stop, eof_blk)
            if start < io_end:
                it = IomapIter(inode, start, io_end - start, 0, ops)
                while it.next():
                    n = it.length
                    try:
                        _fill_piece(mapping, it.iomap, it.pos, it.pos + n, size)
                    except Exception as e:
                        _fail_mapping(it, e)
                        raise
                    it.advance(n)
            zstart = max(start, eof_blk)
            if zstart < stop:
                _fill_piece(mapping, None, zstart, stop, size)


def _as_target(buf_or_length):
    if isinstance(buf_or_length, int):
        if buf_or_length < 0:
            raise InvalidError("negative read length")
        return None, buf_or_length
    view = memoryview(buf_or_length).cast("B")
    if view.readonly:
        raise InvalidError("read target buffer is read-only")
    return view, len(view)


def buffered_read(iocb, buf_or_length, ops):
    """Read at ``iocb.ki_pos`` through the page cache; advance ``ki_pos``.

    ``buf_or_length``: a writable buffer (returns the byte count) or an int (returns bytes).
    Callers hold ``i_rwsem`` shared (or use :func:`generic_file_read`).
    """
    view, length = _as_target(buf_or_length)
    inode = iocb.ki_filp.f_inode
    mapping = inode.i_mapping
    pos = iocb.ki_pos
    if pos < 0:
        raise InvalidError("negative file position")
    size = inode.i_size
    end = min(pos + length, size)
    out = bytearray() if view is None else None
    copied = 0
    ps = mapping.page_size
    bs = mapping.block_size
    p = pos
    while p < end:
        # one window at a time, so a huge read never holds more than a window over the cap
        wend = min(end, p - p % ps + READ_WINDOW_BYTES)
        _fill_range(inode, mapping, ops, p, wend)
        retries = 0
        while p < wend:
            page = mapping.find_page(p // ps)
            n = min(wend - p, page.pos + ps - p) if page is not None else 0
            if page is None or (page.uptodate & mapping._block_mask(page, p, p + n, bs, True)
                                != mapping._block_mask(page, p, p + n, bs, True)):
                # evicted by another thread's budget balance since the fill: fill again
                retries += 1
                if retries > 16:
                    raise InvariantError(f"page cache could not keep [{p}, {wend}) uptodate")
                _fill_range(inode, mapping, ops, p, wend)
                continue
            retries = 0
            off = p - page.pos
            if view is None:
                out += page.data[off:off + n]
            else:
                view[copied:copied + n] = page.data[off:off + n]
            mapping.budget.touch(page)
            copied += n
            p += n
        if mapping.budget.over():
            mapping.budget.balance()
    iocb.ki_pos = pos + copied
    mapping.budget.balance()
    return bytes(out) if view is None else copied


# --- Writing --------------------------------------------------------------------------------

def _prepare_block(mapping, page, blk_pos: int, src, size: int) -> None:
    """Bring one block of a locked page uptodate before a partial overwrite."""
    bs = mapping.block_size
    off = blk_pos - page.pos
    stype = src.type
    if blk_pos >= size or (src.flags & _NEW) or stype not in (_MAPPED, _INLINE):
        page.data[off:off + bs] = bytes(bs)
    else:
        rel = blk_pos - src.offset
        if rel < 0:
            raise InvariantError(f"source mapping {src!r} does not cover block at {blk_pos}")
        if stype == _MAPPED:
            page.data[off:off + bs] = src.bdev.pread(bs, src.addr + rel)
        else:
            inline = memoryview(src.inline_data).cast("B")
            chunk = bytes(inline[rel:rel + bs])
            page.data[off:off + bs] = chunk + bytes(bs - len(chunk))
        if blk_pos + bs > size:
            page.data[size - page.pos:off + bs] = bytes(blk_pos + bs - size)
    page.uptodate |= 1 << (off // bs)


def _write_piece(inode, mapping, it, length: int, get, extend: bool) -> None:
    """Copy ``length`` bytes (``get(p, stop)`` returns the bytes for file range ``[p, stop)``)
    into the cache for the current mapping, advancing the iterator page by page."""
    iomap = it.iomap
    src = it.srcmap if it.srcmap.type != _HOLE else iomap
    inline = iomap.type == _INLINE
    bs = mapping.block_size
    ps = mapping.page_size
    p = it.pos
    end = p + length
    since_balance = 0
    while p < end:
        page = mapping.grab_page(p // ps)
        try:
            stop = min(end, page.pos + ps)
            size = inode.i_size
            for edge in {p - p % bs, (stop - 1) - (stop - 1) % bs}:
                if edge >= p and edge + bs <= stop:
                    continue            # fully overwritten: nothing to read
                if not page.uptodate >> ((edge - page.pos) // bs) & 1:
                    _prepare_block(mapping, page, edge, src, size)
            off = p - page.pos
            chunk = get(p, stop)
            page.data[off:off + (stop - p)] = chunk
            touched = mapping._block_mask(page, p, stop, bs, outer=True)
            page.uptodate |= touched
            if inline:
                ibuf = memoryview(iomap.inline_data).cast("B")
                ibuf[p - iomap.offset:stop - iomap.offset] = chunk
            else:
                page.dirty |= touched
            if extend and stop > inode.i_size:
                inode.i_size = stop
                iomap.flags |= _SIZE_CHANGED
        finally:
            page.lock.release()
        it.advance(stop - p)
        p = stop
        since_balance += 1
        if since_balance >= WRITE_BALANCE_PAGES and mapping.budget.over():
            # balance_dirty_pages: no page is locked here
            mapping.budget.balance()
            since_balance = 0


def buffered_write(iocb, data, ops) -> int:
    """Write ``data`` at ``iocb.ki_pos`` into the page cache; advance ``ki_pos``; return bytes.

    Callers hold ``i_rwsem`` exclusive and have applied :func:`generic_write_checks`.
    The data reaches the device at write-back (``i_mapping.write_and_wait_range``) or fsync.
    """
    view = memoryview(data).cast("B")
    length = len(view)
    if length == 0:
        return 0
    inode = iocb.ki_filp.f_inode
    mapping = inode.i_mapping
    pos = iocb.ki_pos
    if pos < 0:
        raise InvalidError("negative file position")
    flags = IterFlag.WRITE
    if iocb.ki_flags & Iocb.NOWAIT:
        flags |= IterFlag.NOWAIT
    it = IomapIter(inode, pos, length, int(flags), ops)
    try:
        while it.next():
            try:
                _write_piece(inode, mapping, it, it.length,
                             lambda a, z: view[a - pos:z - pos], True)
            except Exception as e:
                _fail_mapping(it, e)
                raise
    except Exception:
        if it.processed == 0:
            raise
    written = it.processed
    iocb.ki_pos = pos + written
    if written:
        inode.touch_mtime()
    mapping.budget.balance()
    return written


def _zero_cached(mapping, pos: int, end: int) -> None:
    """Zero ``[pos, end)`` in the cached pages only (dirty state unchanged)."""
    for page in mapping._pages_in(pos, end):
        with page.lock:
            if page.mapping is not mapping:
                continue
            lo = max(pos, page.pos) - page.pos
            hi = min(end, page.pos + mapping.page_size) - page.pos
            page.data[lo:hi] = bytes(hi - lo)


def buffered_zero_range(inode, pos: int, length: int, ops) -> int:
    """Zero ``[pos, pos+length)`` through the page cache (iomap_zero_range); i_size unchanged.

    HOLE and UNWRITTEN extents (of srcmap when it is set) already read as zeros and are
    skipped unless pages are cached there.  Returns the bytes covered.
    """
    if length <= 0:
        return 0
    mapping = inode.i_mapping
    it = IomapIter(inode, pos, length, int(IterFlag.WRITE | IterFlag.ZERO), ops)
    zeros = bytes(mapping.page_size)
    while it.next():
        n = it.length
        src = it.srcmap if it.srcmap.type != _HOLE else it.iomap
        if src.type in (_HOLE, _UNWRITTEN):
            # already zero on disk: only cached copies need zeroing, and only dirty blocks
            # stay dirty (a clean block over a hole must not make write-back allocate)
            if mapping.has_pages(it.pos, it.pos + n):
                _zero_cached(mapping, it.pos, it.pos + n)
            it.advance(n)
            continue
        try:
            _write_piece(inode, mapping, it, n, lambda a, z: zeros[:z - a], False)
        except Exception as e:
            _fail_mapping(it, e)
            raise
    mapping.budget.balance()
    return it.processed


# --- VFS entry points ------------------------------------------------------------------------

def generic_file_write(iocb, data, ops, *, lock: bool = True) -> int:
    """Buffered write_iter: i_rwsem exclusive, checks, write, unlock, then generic_write_sync.

    With IOCB_NOWAIT the lock is only tried (EAGAIN if busy).
    """
    filp = iocb.ki_filp
    filp.check_writable()
    inode = filp.f_inode
    if lock:
        if iocb.ki_flags & Iocb.NOWAIT:
            if not inode.i_rwsem.down_write_trylock():
                raise AgainError("i_rwsem busy (NOWAIT)")
        else:
            inode.i_rwsem.down_write()
    try:
        view = memoryview(data).cast("B")
        count = generic_write_checks(iocb, len(view),
                                     getattr(inode.i_sb, "s_maxbytes", MAX_LFS_FILESIZE))
        written = buffered_write(iocb, view[:count], ops)
    finally:
        if lock:
            inode.i_rwsem.up_write()
    # The sync runs without i_rwsem: the personality's fsync may take it.
    if written > 0:
        written = generic_write_sync(iocb, written)
    return written


def generic_file_read(iocb, buf_or_length, ops, *, lock: bool = True):
    """Buffered read_iter under i_rwsem shared (trylock with IOCB_NOWAIT)."""
    filp = iocb.ki_filp
    filp.check_readable()
    inode = filp.f_inode
    if not lock:
        return buffered_read(iocb, buf_or_length, ops)
    if iocb.ki_flags & Iocb.NOWAIT:
        if not inode.i_rwsem.down_read_trylock():
            raise AgainError("i_rwsem busy (NOWAIT)")
    else:
        inode.i_rwsem.down_read()
    try:
        return buffered_read(iocb, buf_or_length, ops)
    finally:
        inode.i_rwsem.up_read()

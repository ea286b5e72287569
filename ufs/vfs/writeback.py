"""Write-back of dirty page-cache data to the device (the kernel's ``iomap_writepages``).

Layer: vfs.  Imports ``ufs.iomap`` (IoMap, MapType), ``ufs.errors`` and the standard library.

Owns :class:`WritebackOps`, the personality's side of write-back, and :func:`writeback_run`,
which writes one contiguous run of dirty file bytes:

1. ``map_blocks(inode, pos, length) -> IoMap`` maps the run's first byte (it may cover less
   than ``length``).  The personality allocates here for DELALLOC reservations and holes; the
   mapping returned must be MAPPED or UNWRITTEN with a ``bdev`` (anything else is a bug, EIO).
2. the covered bytes go to ``iomap.bdev.pwrite`` at ``addr + (pos - offset)``;
3. ``writeback_end(inode, pos, length, error)`` (optional) runs once per written piece, with
   ``error`` 0 or -errno: the place to convert UNWRITTEN extents (XFS ioend completion).

Runs are fs-block aligned (the page cache tracks dirtiness per block), so the device sees
block-aligned addresses as long as mappings are block aligned.  No locks of its own: the page
cache serialises write-back of one mapping with its ``_wb_lock`` and calls this without any
page or mapping lock held.
"""
from __future__ import annotations

from ufs.errors import InvariantError
from ufs.iomap import IoMap, MapType

__all__ = ["WritebackOps", "writeback_run"]


class WritebackOps:
    """The personality's write-back hooks (address_space_operations + iomap_writeback_ops)."""

    def map_blocks(self, inode, pos: int, length: int) -> IoMap:
        """Return a MAPPED/UNWRITTEN IoMap covering byte ``pos`` (maybe less than ``length``).

        Called once per extent of dirty data, without page locks.  May raise NoSpaceError or
        another ``ufs.errors`` exception: the run is then left dirty and the error reported.
        """
        raise NotImplementedError("WritebackOps.map_blocks")

    def writeback_end(self, inode, pos: int, length: int, error: int) -> None:
        """Optional: the bytes ``[pos, pos+length)`` reached the device (``error`` 0) or failed."""


def _errno_of(exc: BaseException) -> int:
    return -(exc.errno or 5) if isinstance(exc, OSError) else -5


def writeback_run(inode, ops: WritebackOps, pos: int, data) -> tuple[int, BaseException | None]:
    """Write ``data`` (file bytes ``[pos, pos+len(data))``) through ``ops``.

    Returns ``(bytes_written, error)``: on failure, bytes from ``pos + bytes_written`` on were
    not written (the caller re-dirties them) and ``error`` is the exception.
    """
    view = memoryview(data)
    total = len(view)
    done = 0
    while done < total:
        p = pos + done
        try:
            iomap = ops.map_blocks(inode, p, total - done)
            if (iomap is None or iomap.type not in (MapType.MAPPED, MapType.UNWRITTEN)
                    or iomap.bdev is None or iomap.offset > p or iomap.offset + iomap.length <= p):
                raise InvariantError(
                    f"writeback map_blocks({p}, {total - done}) returned {iomap!r}:"
                    " need a MAPPED/UNWRITTEN mapping with a bdev covering pos")
        except Exception as e:          # noqa: BLE001 - reported to the caller, never lost
            return done, e
        n = min(total - done, iomap.offset + iomap.length - p)
        try:
            iomap.bdev.pwrite(view[done:done + n], iomap.addr + (p - iomap.offset))
        except Exception as e:          # noqa: BLE001
            try:
                ops.writeback_end(inode, p, n, _errno_of(e))
            except Exception:           # noqa: BLE001 - the I/O error is the one to report
                pass
            return done, e
        try:
            ops.writeback_end(inode, p, n, 0)
        except Exception as e:          # noqa: BLE001 - the data is on disk but not reachable
            return done + n, e
        done += n
    return done, None

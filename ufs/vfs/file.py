"""Open files (``struct file``) and the kiocbs built from them.

Layer: vfs.  Imports ``ufs.iomap`` (Kiocb, Iocb), ``ufs.errors`` and the standard library.

A :class:`File` holds the inode, the open flags (``os.O_*``), the file position and the
personality's file operations ``fops`` (duck-typed; only ``fops.fsync(file, start, end,
datasync)`` is used here).  ``kiocb()`` turns the open flags into ``IOCB_*`` flags the way the
kernel's ``iocb_flags()`` does: O_DIRECT -> DIRECT, O_DSYNC -> DSYNC, O_SYNC -> DSYNC|SYNC,
O_APPEND -> APPEND.  O_NONBLOCK does *not* give NOWAIT: NOWAIT is per call (RWF_NOWAIT), so it
is the ``nowait=`` argument.  Ranges are half-open: ``vfs_fsync_range(start, end)`` syncs
``[start, end)`` (the kernel's inclusive end is ``end - 1``).

No locks: ``f_pos`` belongs to the caller (the API layer serialises calls on one open file).
"""
from __future__ import annotations

import os

from ufs.errors import BadFdError, InvalidError
from ufs.iomap import Iocb, Kiocb

# Plain ints: IntFlag arithmetic costs about a microsecond per operator, and iocb_flags() runs
# once per I/O.
_IOCB_DIRECT = int(Iocb.DIRECT)
_IOCB_DSYNC = int(Iocb.DSYNC)
_IOCB_SYNC = int(Iocb.SYNC)
_IOCB_APPEND = int(Iocb.APPEND)
_IOCB_NOWAIT = int(Iocb.NOWAIT)
_IOCB_WRITE = int(Iocb.WRITE)
_O_APPEND = os.O_APPEND
_O_ACCMODE = os.O_ACCMODE
_READ_MODES = (os.O_RDONLY, os.O_RDWR)
_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)

__all__ = ["File", "LLONG_MAX"]

#: exclusive end meaning "to the end of the file" (the kernel's LLONG_MAX)
LLONG_MAX = (1 << 63) - 1

_O_DIRECT = getattr(os, "O_DIRECT", 0o40000)
_O_DSYNC = getattr(os, "O_DSYNC", 0o10000)
_O_SYNC = getattr(os, "O_SYNC", 0o4010000)       # includes the O_DSYNC bit on Linux


class File:
    """An open file description."""

    def __init__(self, inode, flags: int = os.O_RDONLY, fops=None, *, path: str | None = None):
        self.f_inode = inode
        self.f_mapping = inode.i_mapping
        self.f_flags = flags
        self.f_op = fops
        self.f_pos = 0
        self.f_path = path
        self.private_data = None

    def __repr__(self) -> str:
        return f"<File {self.f_path or self.f_inode!r} flags={self.f_flags:#o} pos={self.f_pos}>"

    @property
    def fops(self):
        return self.f_op

    # --- access mode ---
    @property
    def readable(self) -> bool:
        return (self.f_flags & _O_ACCMODE) in _READ_MODES

    @property
    def writable(self) -> bool:
        return (self.f_flags & _O_ACCMODE) in _WRITE_MODES

    def check_readable(self) -> None:
        # inline of ``readable``: once or twice per I/O
        if (self.f_flags & _O_ACCMODE) not in _READ_MODES:
            raise BadFdError("file not open for reading")

    def check_writable(self) -> None:
        if (self.f_flags & _O_ACCMODE) not in _WRITE_MODES:
            raise BadFdError("file not open for writing")

    # --- sync ---
    def vfs_fsync_range(self, start: int, end: int, datasync: bool) -> None:
        """Call the personality's ``fsync(file, start, end, datasync)`` for ``[start, end)``.

        EINVAL if the file operations have no fsync (as the kernel's vfs_fsync_range).
        """
        fsync = getattr(self.f_op, "fsync", None)
        if fsync is None:
            raise InvalidError("fsync not supported by this file")
        fsync(self, start, end, bool(datasync))

    def vfs_fsync(self, datasync: bool = False) -> None:
        self.vfs_fsync_range(0, LLONG_MAX, datasync)

    # --- kiocbs ---
    def iocb_flags(self, *, write: bool = False, nowait: bool = False) -> int:
        """The IOCB_* flags an I/O on this file starts with."""
        f = self.f_flags
        flags = 0
        if f & _O_DIRECT:
            flags = _IOCB_DIRECT
        if f & _O_SYNC == _O_SYNC:
            flags |= _IOCB_DSYNC | _IOCB_SYNC
        elif f & _O_DSYNC:
            flags |= _IOCB_DSYNC
        if f & _O_APPEND:
            flags |= _IOCB_APPEND
        if nowait:
            flags |= _IOCB_NOWAIT
        if write:
            flags |= _IOCB_WRITE
        return flags

    def kiocb(self, pos: int | None = None, *, write: bool = False, nowait: bool = False,
              complete=None, private=None) -> Kiocb:
        """A Kiocb at ``pos`` (default ``f_pos``); EBADF if the file is not open for the op.

        ``complete(iocb, res)`` makes it asynchronous (None: synchronous).
        """
        if write:
            self.check_writable()
        else:
            self.check_readable()
        return Kiocb(self, self.f_pos if pos is None else pos,
                     self.iocb_flags(write=write, nowait=nowait), complete, private)

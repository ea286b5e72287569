"""File-descriptor table and the per-descriptor system calls (``fs/open.c``, ``read_write.c``).

Layer: vfs.  Imports ``ufs.vfs.file``, ``ufs.vfs.namei``, ``ufs.vfs.ops``, ``ufs.errors``.

What it owns:
- descriptors: small ints (lowest free, from 3 so they never look like stdio) mapping to
  ``ufs.vfs.file.File`` objects; an unknown or closed descriptor is EBADF;
- ``open``: the path part is ``Namei.open_inode`` (O_CREAT/O_EXCL/O_TRUNC/O_DIRECTORY/
  O_NOFOLLOW and may_open's EISDIR/ELOOP/EROFS); then the File, ``i_fop.open`` and the fd;
- read/write/pread/pwrite (EBADF for the wrong access mode, EISDIR reading a directory, EINVAL
  for a negative position, ``f_pos`` updated from ``ki_pos`` for read/write), lseek including
  SEEK_DATA/SEEK_HOLE (ENXIO at or past EOF), ftruncate (EINVAL on a descriptor not open for
  writing or not a regular file), fallocate (the mode rules of ``vfs_fallocate``), fsync;
- open counts per inode, so an unlinked inode is evicted when its last descriptor closes.

Locks: ``_lock`` (leaf) guards the table and the open counts.  Each File has ``f_pos_lock``
(the kernel's ``f_pos_lock``) held across a read/write/lseek that uses ``f_pos``; it is taken
before any inode lock.  No inode lock is held when the personality's ``read_iter``,
``write_iter``, ``fsync`` or ``fallocate`` runs.
"""
from __future__ import annotations

import errno as _errno
import os
import stat as _stat
import threading

from ufs.errors import (
    BadFdError,
    FileTooBigError,
    InvalidError,
    IsADirError,
    from_errno,
)
from ufs.vfs import ops
from ufs.vfs.file import LLONG_MAX, File
from ufs.vfs.namei import Namei

__all__ = ["FIRST_FD", "MAX_RW_COUNT", "FdTable", "writable_view"]

FIRST_FD = 3
#: the kernel caps one read/write at INT_MAX rounded down to a page
MAX_RW_COUNT = 0x7FFFF000


def writable_view(buf) -> memoryview:
    """A flat byte view of a writable buffer; TypeError (as ``os.readv``) if it is read-only."""
    view = memoryview(buf)
    if view.readonly:
        raise TypeError("readinto() argument must be read-write bytes-like object, "
                        f"not {type(buf).__name__}")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view

_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
_FALLOC_SUPPORTED = (ops.FALLOC_FL_KEEP_SIZE | ops.FALLOC_FL_PUNCH_HOLE
                     | ops.FALLOC_FL_COLLAPSE_RANGE | ops.FALLOC_FL_ZERO_RANGE
                     | ops.FALLOC_FL_INSERT_RANGE | ops.FALLOC_FL_UNSHARE_RANGE)


def _ebadf(fd) -> BadFdError:
    return BadFdError(_errno.EBADF, f"bad file descriptor {fd}")


class FdTable:
    """The descriptors of one mounted filesystem."""

    def __init__(self, namei: Namei):
        self.namei = namei
        self._lock = threading.Lock()
        self._files: dict[int, File] = {}
        self._open_count: dict[int, int] = {}     # id(inode) -> open files

    # -- table ---------------------------------------------------------------------------------
    def is_open(self, inode) -> bool:
        with self._lock:
            return self._open_count.get(id(inode), 0) > 0

    def get(self, fd) -> File:
        if not isinstance(fd, int):
            raise TypeError("file descriptor must be an int")
        f = self._files.get(fd)
        if f is None:
            raise _ebadf(fd)
        return f

    def _install(self, file: File) -> int:
        with self._lock:
            fd = FIRST_FD
            while fd in self._files:
                fd += 1
            self._files[fd] = file
            k = id(file.f_inode)
            self._open_count[k] = self._open_count.get(k, 0) + 1
            return fd

    def fds(self) -> list:
        with self._lock:
            return sorted(self._files)

    # -- open / close --------------------------------------------------------------------------
    def open(self, path, flags: int, mode: int = 0o777, umask: int = 0) -> int:
        inode, _created = self.namei.open_inode(path, flags, mode, umask)
        file = File(inode, flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC),
                    inode.i_fop, path=str(path))
        file.f_pos_lock = threading.Lock()
        fop_open = getattr(inode.i_fop, "open", None)
        if fop_open is not None:
            fop_open(inode, file)
        return self._install(file)

    def close(self, fd) -> None:
        with self._lock:
            file = self._files.pop(fd, None)
            if file is None:
                raise _ebadf(fd)
            k = id(file.f_inode)
            left = self._open_count[k] - 1
            if left:
                self._open_count[k] = left
            else:
                del self._open_count[k]
        inode = file.f_inode
        try:
            release = getattr(file.f_op, "release", None)
            if release is not None:
                release(inode, file)
        finally:
            if not left and inode.i_nlink == 0:
                self.namei.s_op.evict_inode(inode)

    def close_all(self) -> None:
        for fd in self.fds():
            try:
                self.close(fd)
            except OSError:
                pass

    # -- read / write --------------------------------------------------------------------------
    @staticmethod
    def _check_pos(pos: int) -> None:
        if pos < 0:
            raise InvalidError(_errno.EINVAL, "negative file position")

    def read(self, fd, length: int, pos: int | None = None, *, complete=None) -> bytes:
        """``read``/``pread``; ``pos`` None uses and advances ``f_pos``."""
        file = self.get(fd)
        if length < 0:
            raise InvalidError(_errno.EINVAL, "negative length")
        file.check_readable()
        if _stat.S_ISDIR(file.f_inode.i_mode):
            raise IsADirError(_errno.EISDIR, "is a directory")
        if pos is not None:
            self._check_pos(pos)
            return self._read_at(file, length, pos)
        with file.f_pos_lock:
            buf = bytearray(min(length, MAX_RW_COUNT))
            iocb = file.kiocb(file.f_pos)
            n = file.f_op.read_iter(iocb, buf) if buf else 0
            file.f_pos = iocb.ki_pos
            return bytes(buf[:n])

    @staticmethod
    def _read_at(file, length, pos) -> bytes:
        buf = bytearray(min(length, MAX_RW_COUNT))
        if not buf:
            return b""
        iocb = file.kiocb(pos)
        n = file.f_op.read_iter(iocb, buf)
        return bytes(buf[:n])

    def readinto(self, fd, buf, pos: int | None = None) -> int:
        """``readv``/``preadv`` into one writable buffer (no copy: O_DIRECT readers pass an
        aligned buffer); returns the bytes read.  ``pos`` None uses and advances ``f_pos``.
        TypeError for a read-only buffer, as ``os.preadv``."""
        file = self.get(fd)
        view = writable_view(buf)[:MAX_RW_COUNT]
        file.check_readable()
        if _stat.S_ISDIR(file.f_inode.i_mode):
            raise IsADirError(_errno.EISDIR, "is a directory")
        if pos is not None:
            self._check_pos(pos)
            if not len(view):
                return 0
            return file.f_op.read_iter(file.kiocb(pos), view)
        with file.f_pos_lock:
            if not len(view):
                return 0
            iocb = file.kiocb(file.f_pos)
            n = file.f_op.read_iter(iocb, view)
            file.f_pos = iocb.ki_pos
            return n

    def write(self, fd, data, pos: int | None = None) -> int:
        """``write``/``pwrite``; ``pos`` None uses and advances ``f_pos``.  As on Linux, a
        pwrite on an O_APPEND descriptor appends."""
        file = self.get(fd)
        file.check_writable()
        # a flat byte view (what the API passes) is used as is: no new views per write
        if not (type(data) is memoryview and data.format == "B" and data.ndim == 1
                and data.c_contiguous):
            data = memoryview(data).cast("B")
        if len(data) > MAX_RW_COUNT:
            data = data[:MAX_RW_COUNT]
        if pos is not None:
            self._check_pos(pos)
            if not len(data):
                return 0
            iocb = file.kiocb(pos, write=True)
            return file.f_op.write_iter(iocb, data)
        with file.f_pos_lock:
            if not len(data):
                return 0
            iocb = file.kiocb(file.f_pos, write=True)
            n = file.f_op.write_iter(iocb, data)
            file.f_pos = iocb.ki_pos
            return n

    # -- lseek ---------------------------------------------------------------------------------
    def lseek(self, fd, offset: int, whence: int) -> int:
        file = self.get(fd)
        inode = file.f_inode
        maxbytes = self.namei.s_maxbytes
        with file.f_pos_lock:
            if whence == os.SEEK_SET:
                new = offset
            elif whence == os.SEEK_CUR:
                new = file.f_pos + offset
            elif whence == os.SEEK_END and not _stat.S_ISDIR(inode.i_mode):
                new = inode.i_size + offset
            elif whence in (_SEEK_DATA, _SEEK_HOLE) and not _stat.S_ISDIR(inode.i_mode):
                if offset < 0 or offset >= inode.i_size:
                    raise from_errno(_errno.ENXIO, "no data or hole at or past EOF")
                new = inode.i_op.seek_data_hole(inode, offset, whence)
            else:
                raise InvalidError(_errno.EINVAL, "invalid whence")
            if new < 0 or new > maxbytes:
                raise InvalidError(_errno.EINVAL, "resulting offset is invalid")
            file.f_pos = new
            return new

    # -- size and space ------------------------------------------------------------------------
    def ftruncate(self, fd, length: int) -> None:
        if length < 0:
            raise InvalidError(_errno.EINVAL, "negative length")
        file = self.get(fd)
        inode = file.f_inode
        if not _stat.S_ISREG(inode.i_mode) or not file.writable:
            raise InvalidError(_errno.EINVAL, "not a regular file open for writing")
        self.namei.truncate_inode(inode, length)

    def fallocate(self, fd, mode: int, offset: int, length: int) -> None:
        """``vfs_fallocate``: generic checks in the kernel's order, then ``i_op.fallocate``."""
        file = self.get(fd)
        inode = file.f_inode
        if offset < 0 or length <= 0:
            raise InvalidError(_errno.EINVAL, "invalid offset or length")
        if mode & ~_FALLOC_SUPPORTED:
            raise from_errno(_errno.EOPNOTSUPP, "unknown fallocate mode")
        kind = mode & ~ops.FALLOC_FL_KEEP_SIZE
        if kind == ops.FALLOC_FL_PUNCH_HOLE:
            if not mode & ops.FALLOC_FL_KEEP_SIZE:
                raise from_errno(_errno.EOPNOTSUPP, "PUNCH_HOLE needs KEEP_SIZE")
        elif kind in (ops.FALLOC_FL_COLLAPSE_RANGE, ops.FALLOC_FL_INSERT_RANGE):
            if mode & ops.FALLOC_FL_KEEP_SIZE:
                raise from_errno(_errno.EOPNOTSUPP, "COLLAPSE/INSERT with KEEP_SIZE")
        elif kind not in (0, ops.FALLOC_FL_ZERO_RANGE, ops.FALLOC_FL_UNSHARE_RANGE):
            raise from_errno(_errno.EOPNOTSUPP, "invalid fallocate mode combination")
        if not file.writable:
            raise BadFdError(_errno.EBADF, "file not open for writing")
        if _stat.S_ISDIR(inode.i_mode):
            raise IsADirError(_errno.EISDIR, "is a directory")
        if not _stat.S_ISREG(inode.i_mode):
            raise from_errno(_errno.ENODEV, "not a regular file")
        if offset + length > self.namei.s_maxbytes:
            raise FileTooBigError(_errno.EFBIG, "range past the maximum file size")
        inode.i_op.fallocate(inode, mode, offset, length)

    def fsync(self, fd, datasync: bool = False) -> None:
        file = self.get(fd)
        file.vfs_fsync_range(0, LLONG_MAX, datasync)

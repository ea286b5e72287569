"""Exception hierarchy of ufs and the one place where errno values become exceptions.

Layer: bottom.  Imports only the standard library; every other ufs module may import it.

Rules (DESIGN.md §6, style-anchors §8.8):
- Errors that a kernel filesystem reports through errno are ``OSError`` subclasses that
  carry exactly that errno, and also derive from ``UfsError`` (dissect's dual-inheritance
  pattern), so callers may catch either the builtin (``FileNotFoundError``) or ours.
- C-level code returns ``-errno``; it is converted once, by :func:`from_errno`.
- A bad image is a :class:`CorruptError` (errno EUCLEAN, "Structure needs cleaning", as
  XFS and btrfs report it) that says what and where.
- A broken internal invariant is :class:`InvariantError` (errno EIO), the analogue of the
  kernel's ``WARN_ON_ONCE(...) -> -EIO``.
"""
from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "UfsError", "FsError", "CorruptError", "InvariantError", "PluginError", "DeadlockError",
    "NoSpaceError", "NotFoundError", "ExistsError", "NotADirError", "IsADirError",
    "NotEmptyError", "NameTooLongError", "InvalidError", "AlignmentError", "AgainError",
    "NotBlockError", "IOFailure", "ReadOnlyError", "BadFdError", "FileTooBigError",
    "CrossDeviceError", "PermissionDeniedError", "FaultError", "NotSupportedError",
    "from_errno", "raise_errno", "check",
]


class UfsError(Exception):
    """Base of every exception ufs raises on purpose."""


class FsError(UfsError, OSError):
    """An ``OSError`` with a fixed errno; subclasses pin the errno.

    Built like ``OSError(errno, strerror, filename)`` so ``e.errno``/``e.strerror``/
    ``e.filename`` behave as the ``os`` module's do.
    """

    errno_value: int = _errno.EIO

    def __init__(self, *args):
        if args and isinstance(args[0], int):
            super().__init__(*args)
        else:
            # FsError("message") or FsError() -> OSError(errno, message-or-strerror)
            msg = args[0] if args else os.strerror(self.errno_value)
            super().__init__(self.errno_value, msg, *args[1:])

    def __reduce__(self):  # keep errno across pickling (process pools, fuzz workers)
        return (type(self), tuple(a for a in (self.errno, self.strerror, self.filename) if a is not None))


def _fs_error(name: str, code: int, *bases: type, doc: str) -> type:
    cls = type(name, (FsError, *bases), {"errno_value": code, "__doc__": doc, "__module__": __name__})
    return cls


NoSpaceError = _fs_error("NoSpaceError", _errno.ENOSPC, doc="ENOSPC: no space left on device.")
NotFoundError = _fs_error("NotFoundError", _errno.ENOENT, FileNotFoundError, doc="ENOENT.")
ExistsError = _fs_error("ExistsError", _errno.EEXIST, FileExistsError, doc="EEXIST.")
NotADirError = _fs_error("NotADirError", _errno.ENOTDIR, NotADirectoryError, doc="ENOTDIR.")
IsADirError = _fs_error("IsADirError", _errno.EISDIR, IsADirectoryError, doc="EISDIR.")
NotEmptyError = _fs_error("NotEmptyError", _errno.ENOTEMPTY, doc="ENOTEMPTY.")
NameTooLongError = _fs_error("NameTooLongError", _errno.ENAMETOOLONG, doc="ENAMETOOLONG (name over 255 bytes).")
InvalidError = _fs_error("InvalidError", _errno.EINVAL, doc="EINVAL: bad argument.")
AlignmentError = _fs_error("AlignmentError", _errno.EINVAL, ValueError,
                           doc="EINVAL from misaligned O_DIRECT position or length.")
AgainError = _fs_error("AgainError", _errno.EAGAIN, BlockingIOError, doc="EAGAIN: would block (NOWAIT).")
NotBlockError = _fs_error("NotBlockError", _errno.ENOTBLK,
                          doc="ENOTBLK: direct I/O cannot be done here; fall back to buffered I/O.")
IOFailure = _fs_error("IOFailure", _errno.EIO, doc="EIO: the device or a checksum failed.")
ReadOnlyError = _fs_error("ReadOnlyError", _errno.EROFS, doc="EROFS: read-only filesystem or device.")
BadFdError = _fs_error("BadFdError", _errno.EBADF, doc="EBADF: bad file descriptor or wrong open mode.")
FileTooBigError = _fs_error("FileTooBigError", _errno.EFBIG, doc="EFBIG: file too large.")
CrossDeviceError = _fs_error("CrossDeviceError", _errno.EXDEV, doc="EXDEV: cross-device link or rename.")
PermissionDeniedError = _fs_error("PermissionDeniedError", _errno.EPERM, PermissionError, doc="EPERM.")
FaultError = _fs_error("FaultError", _errno.EFAULT, doc="EFAULT: the user buffer is not accessible.")
NotSupportedError = _fs_error("NotSupportedError", _errno.EOPNOTSUPP, doc="EOPNOTSUPP.")
DeadlockError = _fs_error("DeadlockError", _errno.EDEADLK,
                          doc="EDEADLK: lockdep saw an acquisition that would deadlock.")


class CorruptError(FsError):
    """The image is inconsistent: bad magic, checksum, key order, or structure.

    ``what`` names the structure, ``where`` its location (device byte address or a
    path inside the filesystem).  errno is EUCLEAN, as the kernel's XFS and btrfs
    report metadata corruption.
    """

    errno_value = _errno.EUCLEAN

    def __init__(self, what: str, where: object = None, detail: str | None = None):
        self.what, self.where, self.detail = what, where, detail
        msg = what if where is None else f"{what} at {where}"
        if detail:
            msg = f"{msg}: {detail}"
        super().__init__(_errno.EUCLEAN, msg)

    def __reduce__(self):
        return (type(self), (self.what, self.where, self.detail))


class InvariantError(FsError):
    """A broken internal invariant (the kernel's WARN_ON_ONCE -> -EIO).  Always a bug."""

    errno_value = _errno.EIO


class PluginError(UfsError):
    """Plugin registration or personality-option validation failed."""


_BY_ERRNO: dict[int, type] = {}
for _cls in (NoSpaceError, NotFoundError, ExistsError, NotADirError, IsADirError, NotEmptyError,
             NameTooLongError, InvalidError, AgainError, NotBlockError, IOFailure, ReadOnlyError,
             BadFdError, FileTooBigError, CrossDeviceError, PermissionDeniedError, FaultError,
             NotSupportedError, DeadlockError, CorruptError):
    _BY_ERRNO.setdefault(_cls.errno_value, _cls)
_BY_ERRNO[_errno.ENOTSUP] = NotSupportedError  # same value as EOPNOTSUPP on Linux


class _GenericFsError(FsError):
    """Any errno without a dedicated class."""


def from_errno(code: int, msg: str | None = None, filename: object = None) -> OSError:
    """Return the exception for ``code`` (positive or negative errno).

    The one conversion point from C-level ``-errno`` returns to exceptions.
    """
    code = -code if code < 0 else code
    if code == 0:
        raise InvariantError("from_errno(0): no error to convert")
    text = msg or os.strerror(code)
    cls = _BY_ERRNO.get(code)
    if cls is CorruptError:
        return CorruptError(text, filename)
    if cls is None:
        exc = _GenericFsError(code, text) if filename is None else _GenericFsError(code, text, filename)
        return exc
    return cls(code, text) if filename is None else cls(code, text, filename)


def raise_errno(code: int, msg: str | None = None, filename: object = None):
    """Raise :func:`from_errno` of ``code``."""
    raise from_errno(code, msg, filename)


def check(ret: int, msg: str | None = None, filename: object = None) -> int:
    """Return ``ret`` when it is >= 0, else raise the exception for ``-ret``."""
    if ret < 0:
        raise from_errno(-ret, msg, filename)
    return ret


def to_errno(exc: BaseException) -> int:
    """Negative errno for an exception (EIO for anything that is not an OSError)."""
    if isinstance(exc, OSError) and exc.errno:
        return -exc.errno
    return -_errno.EIO

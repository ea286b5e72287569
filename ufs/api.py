"""The public Python API: ``mkfs``, ``mount``, ``fsck`` and the mounted :class:`Filesystem`.

Layer: public API.  Imports ``ufs.vfs`` (namei, fdtable, ops), ``ufs.registry``/``ufs.plugins``
(personality lookup, mount/mount-time only), ``ufs.iomap.bdev`` (opening images), ``ufs.iomap``
(``Kiocb``, ``EIOCBQUEUED``: building async kiocbs) and ``ufs.errors``.  Personalities are
reached only through their ``Personality`` record and the contracts of ``ufs.vfs.ops``.

Contract (DESIGN.md §6): every method behaves as the ``os`` function of the same name does on a
Linux kernel filesystem — same flags (``os.O_*``, ``os.SEEK_*``), same return types
(``os.stat_result``, ``os.statvfs_result``, ``os.DirEntry``-like entries), same errno in the
raised ``OSError`` subclass (``ufs.errors``).  Paths are absolute inside the filesystem (a
relative path starts at its root).  What Linux has and ``os`` lacks is here with the kernel's
names: ``rename(src, dst, flags)`` with :data:`RENAME_NOREPLACE`/:data:`RENAME_EXCHANGE`,
``fallocate(fd, mode, offset, length)`` with the ``FALLOC_FL_*`` modes.

Differences from the ``os`` module, on purpose: a new file's mode is ``mode & ~umask`` with the
filesystem's own :meth:`Filesystem.umask` (0 by default, not the process's); descriptors are
ufs descriptors (small ints from 3), valid only on their Filesystem; ``link`` does not follow a
symlink source unless ``follow_symlinks=True`` (``link(2)``, what ``os.link`` does on Linux).

Exclusivity: an image is mounted once.  ``mount``/``mkfs``/``fsck`` take an exclusive
``flock`` on an image file or block device (another process holding it → EBUSY) and a
process-wide claim (a second mount in this process → EBUSY), both released at unmount.

Reading into a caller's buffer: ``readinto``/``preadinto`` (like ``os.readv``/``os.preadv``
with one buffer) fill a writable buffer and return the byte count, so an O_DIRECT reader can
use an aligned buffer (``ufs.iomap.bdev.aligned_buffer``) with no copy; ``read``/``pread``
allocate and return ``bytes``.

Asynchronous I/O: ``submit_pread``/``submit_preadinto``/``submit_pwrite`` start an I/O through
the personality's ``read_iter``/``write_iter`` with an async ``Kiocb`` and return an
:class:`AsyncHandle`; ``reap`` returns completions as ``(handle, result)`` pairs where
``result`` is the bytes read (``submit_pread``), the count read into the buffer
(``submit_preadinto``; the buffer must stay untouched until reaped), the count written, or the
``OSError``.  A personality that completes inline (memfs, buffered
I/O) has the completion ready at once; for ``EIOCBQUEUED`` the completion arrives from
``ki_complete`` — ``reap`` drives the calling thread's device queue while it waits, so reap on
the thread that submitted (as with io_uring).

Locks: ``Filesystem._cv`` (a leaf) guards ``_inflight`` and the reapers' waiting count; the
completion deque is appended to without it (``deque.append`` is atomic) and a completion only
notifies ``_cv`` when a reaper is waiting on it, so the common case (the reaping thread
completes its own I/O while driving the device queue) takes no lock per completion; the module's ``_CLAIMS_LOCK``
guards the process-wide set of claimed images.
"""
from __future__ import annotations

import collections
import contextlib
import errno as _errno
import fcntl
import os
import re
import stat as _stat
import threading
import time

from ufs.errors import FsError, InvalidError, NotSupportedError, from_errno
from ufs.iomap import EIOCBQUEUED, Kiocb
from ufs.vfs import ops
from ufs.vfs.fdtable import MAX_RW_COUNT, FdTable, writable_view
from ufs.vfs.namei import Namei, fspath
from ufs.vfs.ops import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE,
    FALLOC_FL_ZERO_RANGE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    XATTR_CREATE,
    XATTR_REPLACE,
    FsckReport,
    Geometry,
    Iattr,
)

__all__ = [
    "FALLOC_FL_COLLAPSE_RANGE",
    "FALLOC_FL_INSERT_RANGE",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_UNSHARE_RANGE",
    "FALLOC_FL_ZERO_RANGE",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "RENAME_WHITEOUT",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "AsyncHandle",
    "DirEntry",
    "Filesystem",
    "FsckReport",
    "ImageBusyError",
    "fsck",
    "mkfs",
    "mount",
    "parse_size",
]

#: options every personality gets from the VFS rather than from its own option table
_VFS_OPTIONS = ("lockdep",)

ST_RDONLY = getattr(os, "ST_RDONLY", 1)


class ImageBusyError(FsError, BlockingIOError):
    """EBUSY: the image is mounted (or being formatted/checked) already."""

    errno_value = _errno.EBUSY


# --- images: sizes, claims, devices ------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.I)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_size(size) -> int:
    """Bytes from an int or a string like ``"256M"``, ``"4k"``, ``"1GiB"`` (powers of 1024)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 0:
            raise InvalidError(_errno.EINVAL, f"negative size {size}")
        return size
    m = _SIZE_RE.match(str(size))
    if not m:
        raise InvalidError(_errno.EINVAL, f"bad size {size!r} (e.g. 4096, 64K, 256M, 1G)")
    return int(m.group(1)) << _SHIFT[m.group(2).lower()]


def _is_path(image) -> bool:
    return isinstance(image, (str, bytes, os.PathLike))


_CLAIMS: set = set()
_CLAIMS_LOCK = threading.Lock()


class _Claim:
    """An exclusive claim on an image: in this process (a set) and across processes (flock)."""

    def __init__(self, image, what: str):
        self.fd = -1
        self.key = None
        if _is_path(image):
            path = os.fsdecode(os.fspath(image))
            try:
                st = os.stat(path)
                key = ("inode", st.st_dev, st.st_ino)
            except FileNotFoundError:
                key = ("path", os.path.realpath(path))
            name = path
        else:
            key = ("object", id(image))
            name = repr(image)
        with _CLAIMS_LOCK:
            if key in _CLAIMS:
                raise ImageBusyError(_errno.EBUSY, f"{name} is in use (mounted) in this process; "
                                                   f"cannot {what}")
            _CLAIMS.add(key)
        self.key = key
        if _is_path(image) and key[0] == "inode":
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.release()
                raise ImageBusyError(_errno.EBUSY, f"{name} is in use by another process "
                                                   f"(exclusive lock held); cannot {what}") from None
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)          # drops the flock
            self.fd = -1
        if self.key is not None:
            with _CLAIMS_LOCK:
                _CLAIMS.discard(self.key)
            self.key = None


def _open_device(image, readonly: bool):
    """(device, owned): an image path is opened O_DIRECT; a device object is used as given."""
    if _is_path(image):
        from ufs.iomap.bdev import open_device
        return open_device(os.fsdecode(os.fspath(image)), read_only=readonly), True
    return image, False


def _registry():
    from ufs.plugins import get_registry
    return get_registry()


def _personality_by_name(fstype: str):
    return _registry().personality(fstype)


def _probe(device):
    pers = _registry().probe(device)
    if pers is None:
        raise InvalidError(_errno.EINVAL, "no ufs personality recognises this image "
                                          "(wrong filesystem type or not formatted)")
    return pers


def _parse_options(pers, options) -> tuple[dict, dict]:
    """(personality options, VFS options).  The VFS's own keys (``lockdep``) are taken out
    unless the personality declares them too."""
    from ufs.registry import parse_options

    if isinstance(options, str):
        items = {}
        for item in options.split(","):
            item = item.strip()
            if item:
                k, sep, v = item.partition("=")
                items[k.strip()] = v.strip() if sep else None
        options = items
    options = dict(options or {})
    vfs = {}
    for key in _VFS_OPTIONS:
        if key in options and key not in pers.options:
            v = options.pop(key)
            vfs[key] = v is None or (str(v).lower() in ("1", "true", "yes", "on")
                                     if isinstance(v, str) else bool(v))
    parsed = parse_options(pers, options)
    for key in _VFS_OPTIONS:
        if key in pers.options:
            vfs[key] = parsed.get(key)
    return parsed, vfs


# --- mkfs / mount / fsck -------------------------------------------------------------------------

def mkfs(image, fstype: str | None = None, size=None, block_size: int = 4096, options=None, *,
         personality=None) -> None:
    """Format ``image`` (a file path, block device path or device object) as ``fstype``.

    A missing image file is created with ``size`` bytes (required then); an existing regular
    file is resized to ``size`` when given.  ``options`` are the personality's mkfs options
    (``"a=1,b"`` or a mapping).  EBUSY if the image is mounted.
    """
    pers = personality or _personality_by_name(fstype)
    if pers.mkfs is None:
        raise NotSupportedError(_errno.EOPNOTSUPP, f"{pers.name} has no mkfs")
    if block_size <= 0 or block_size & (block_size - 1):
        raise InvalidError(_errno.EINVAL, f"block size {block_size} is not a power of two")
    opts, _vfs = _parse_options(pers, options)
    if _is_path(image):
        path = os.fsdecode(os.fspath(image))
        if not os.path.exists(path):
            if size is None:
                raise InvalidError(_errno.EINVAL, f"{path} does not exist: give a size to create it")
            with open(path, "wb") as f:
                f.truncate(parse_size(size))
        elif size is not None and _stat.S_ISREG(os.stat(path).st_mode):
            os.truncate(path, parse_size(size))
    claim = _Claim(image, "format it")
    try:
        dev, owned = _open_device(image, False)
        try:
            pers.mkfs(dev, Geometry(size=int(getattr(dev, "size", 0) or 0), block_size=block_size),
                      opts)
            dev.flush()
        finally:
            if owned:
                dev.close()
    finally:
        claim.release()


def mount(image, options=None, readonly: bool = False, *, personality=None) -> Filesystem:
    """Mount ``image``; returns a :class:`Filesystem` (a context manager that unmounts).

    The personality is found by probing the image (or given as ``personality=``, a
    ``ufs.registry.Personality``, for tests).  ``options`` are validated against the
    personality's option table (EINVAL naming a bad one); ``lockdep`` turns lock checking on.
    EBUSY (:class:`ImageBusyError`) if the image is already mounted.
    """
    claim = _Claim(image, "mount it")
    dev = None
    owned = False
    try:
        dev, owned = _open_device(image, readonly)
        pers = personality or _probe(dev)
        if pers.mount is None:
            raise NotSupportedError(_errno.EOPNOTSUPP, f"{pers.name} cannot be mounted")
        opts, vfs_opts = _parse_options(pers, options)
        if vfs_opts.get("lockdep"):
            from ufs.vfs import lockdep
            lockdep.enable()
        sb = pers.mount(dev, opts, readonly)
        return Filesystem(sb, personality=pers, device=dev if owned else None, claim=claim,
                          readonly=readonly, options=opts)
    except BaseException:
        if owned and dev is not None:
            dev.close()
        claim.release()
        raise


def fsck(image, repair: bool = False, *, personality=None) -> FsckReport:
    """Check ``image`` (and fix it when ``repair``); returns a :class:`FsckReport`.

    EBUSY if the image is mounted.  A personality's dict result is turned into a report.
    """
    claim = _Claim(image, "check it")
    try:
        dev, owned = _open_device(image, not repair)
        try:
            pers = personality or _probe(dev)
            if pers.fsck is None:
                raise NotSupportedError(_errno.EOPNOTSUPP, f"{pers.name} has no fsck")
            res = pers.fsck(dev, repair)
        finally:
            if owned:
                dev.close()
    finally:
        claim.release()
    if isinstance(res, FsckReport):
        return res
    if isinstance(res, dict):
        return FsckReport(pers.name, list(res.get("errors", [])), list(res.get("repaired", [])),
                          {k: v for k, v in res.items() if k not in ("errors", "repaired")})
    raise InvalidError(_errno.EINVAL, f"{pers.name}.fsck returned {type(res).__name__}, "
                                      "not an FsckReport")


# --- results ----------------------------------------------------------------------------------------

def _stat_result(inode, sb) -> os.stat_result:
    at, mt, ct = inode.i_atime_ns, inode.i_mtime_ns, inode.i_ctime_ns
    return os.stat_result((
        inode.i_mode, inode.i_ino, getattr(sb, "s_dev", 0), inode.i_nlink, inode.i_uid,
        inode.i_gid, inode.i_size, at // 10**9, mt // 10**9, ct // 10**9,
        at / 1e9, mt / 1e9, ct / 1e9, at, mt, ct,
        sb.s_blocksize, getattr(inode, "i_blocks", 0), getattr(inode, "i_rdev", 0)))


class DirEntry:
    """An entry of :meth:`Filesystem.scandir`, like ``os.DirEntry``."""

    __slots__ = ("name", "path", "_ino", "_dtype", "_fs", "_stat", "_lstat")

    def __init__(self, fs, dirpath: str, name: str, ino: int, dtype: int):
        self._fs = fs
        self.name = name
        self.path = dirpath.rstrip("/") + "/" + name if dirpath != "/" else "/" + name
        self._ino = ino
        self._dtype = dtype
        self._stat = self._lstat = None

    def __repr__(self) -> str:
        return f"<DirEntry {self.name!r}>"

    def __fspath__(self) -> str:
        return self.path

    def inode(self) -> int:
        return self._ino

    def is_symlink(self) -> bool:
        if self._dtype != ops.DT_UNKNOWN:
            return self._dtype == ops.DT_LNK
        return _stat.S_ISLNK(self.stat(follow_symlinks=False).st_mode)

    def _is(self, dt: int, test, follow_symlinks: bool) -> bool:
        if self._dtype != ops.DT_UNKNOWN and not (follow_symlinks and self._dtype == ops.DT_LNK):
            return self._dtype == dt
        try:
            return test(self.stat(follow_symlinks=follow_symlinks).st_mode)
        except FileNotFoundError:
            return False

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._is(ops.DT_DIR, _stat.S_ISDIR, follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._is(ops.DT_REG, _stat.S_ISREG, follow_symlinks)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if follow_symlinks:
            if self._stat is None:
                self._stat = self._fs.stat(self.path)
            return self._stat
        if self._lstat is None:
            self._lstat = self._fs.lstat(self.path)
        return self._lstat


class _ScandirIterator:
    """What :meth:`Filesystem.scandir` returns: an iterator and a context manager."""

    def __init__(self, entries):
        self._it = iter(entries)

    def __iter__(self):
        return self

    def __next__(self) -> DirEntry:
        return next(self._it)

    def close(self) -> None:
        self._it = iter(())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncHandle:
    """One submitted asynchronous I/O.  ``done`` turns True when it has been reaped."""

    __slots__ = ("op", "fd", "pos", "length", "done", "result", "_buf")

    def __init__(self, op: str, fd: int, pos: int, length: int):
        self.op, self.fd, self.pos, self.length = op, fd, pos, length
        self.done = False
        self.result = None
        self._buf = None

    def __repr__(self) -> str:
        state = "done" if self.done else "in flight"
        return f"<AsyncHandle {self.op} fd={self.fd} {self.pos}+{self.length} {state}>"


# --- the mounted filesystem ---------------------------------------------------------------------------

class Filesystem:
    """A mounted image: the ``os``-module calls, on ufs descriptors.  Thread-safe."""

    def __init__(self, sb, *, personality=None, device=None, claim=None, readonly=False,
                 options=None):
        self.sb = sb
        self.personality = personality
        self.fstype = getattr(personality, "name", None)
        self.readonly = readonly
        self.options = dict(options or {})
        self._device = device
        self._claim = claim
        self._umask = 0
        self._mounted = True
        self.namei = Namei(sb, readonly=readonly)
        self.fdtable = FdTable(self.namei)
        self.namei.is_open = self.fdtable.is_open
        self._cv_lock = threading.Lock()
        self._cv = threading.Condition(self._cv_lock)
        self._done: collections.deque = collections.deque()
        self._inflight = 0
        self._waiters = 0               # reapers sleeping on _cv

    def __repr__(self) -> str:
        state = "mounted" if self._mounted else "unmounted"
        return f"<Filesystem {self.fstype} {state}{' ro' if self.readonly else ''}>"

    # -- lifetime -----------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unmount()

    @property
    def mounted(self) -> bool:
        return self._mounted

    def unmount(self) -> None:
        """Wait for async I/O, close every descriptor, sync, ``put_super``, release the image.
        Idempotent."""
        if not self._mounted:
            return
        if self._inflight:
            self.reap(self._inflight, timeout=60.0)
            if self._inflight:
                raise from_errno(_errno.EBUSY, f"{self._inflight} asynchronous I/Os still in "
                                               "flight after 60 s; not unmounting")
        try:
            self.fdtable.close_all()
            s_op = self.sb.s_op
            if not self.readonly:
                s_op.sync_fs(True)
            s_op.put_super()
            shutdown = getattr(self.sb, "shutdown", None)
            if shutdown is not None:
                shutdown()
        finally:
            self._mounted = False
            if self._device is not None:
                self._device.close()
                self._device = None
            if self._claim is not None:
                self._claim.release()
                self._claim = None

    close_fs = unmount

    def _live(self) -> Namei:
        if not self._mounted:
            raise InvalidError(_errno.EINVAL, "filesystem is unmounted")
        return self.namei

    def umask(self, mask: int) -> int:
        """Set the mask applied to new files' and directories' modes; return the old one."""
        old, self._umask = self._umask, mask & 0o777
        return old

    def sync(self) -> None:
        """``syncfs``: make everything durable."""
        self._live()
        self.sb.s_op.sync_fs(True)

    # -- descriptors ----------------------------------------------------------------------------
    def open(self, path, flags: int, mode: int = 0o777) -> int:
        self._live()
        return self.fdtable.open(fspath(path), flags, mode, self._umask)

    def close(self, fd: int) -> None:
        self._live()
        self.fdtable.close(fd)

    def read(self, fd: int, length: int) -> bytes:
        self._live()
        return self.fdtable.read(fd, length)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        self._live()
        return self.fdtable.read(fd, length, offset)

    def readinto(self, fd: int, buf) -> int:
        """``os.readv(fd, [buf])``: read into the writable buffer ``buf`` at the file position
        (advancing it); returns the bytes read.  TypeError for a read-only buffer."""
        self._live()
        return self.fdtable.readinto(fd, buf)

    def preadinto(self, fd: int, buf, offset: int) -> int:
        """``os.preadv(fd, [buf], offset)``: read up to ``len(buf)`` bytes at ``offset`` into
        the writable buffer ``buf`` (no copy: pass an aligned buffer on an O_DIRECT descriptor);
        returns the bytes read (0 at EOF).  TypeError for a read-only buffer."""
        self._live()
        return self.fdtable.readinto(fd, buf, offset)

    def write(self, fd: int, data) -> int:
        self._live()
        return self.fdtable.write(fd, data)

    def pwrite(self, fd: int, data, offset: int) -> int:
        self._live()
        return self.fdtable.write(fd, data, offset)

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        self._live()
        return self.fdtable.lseek(fd, offset, whence)

    def fsync(self, fd: int) -> None:
        self._live()
        self.fdtable.fsync(fd, False)

    def fdatasync(self, fd: int) -> None:
        self._live()
        self.fdtable.fsync(fd, True)

    def ftruncate(self, fd: int, length: int) -> None:
        self._live()
        self.fdtable.ftruncate(fd, length)

    def truncate(self, path, length: int) -> None:
        """``truncate(2)``; an int ``path`` is a descriptor (``ftruncate``), as in ``os``."""
        if isinstance(path, int):
            return self.ftruncate(path, length)
        self._live().truncate(fspath(path), length)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)``: ``mode`` is 0 or FALLOC_FL_* (KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE,
        ZERO_RANGE[|KEEP_SIZE])."""
        self._live()
        self.fdtable.fallocate(fd, mode, offset, length)

    def posix_fallocate(self, fd: int, offset: int, length: int) -> None:
        self.fallocate(fd, 0, offset, length)

    # -- metadata -------------------------------------------------------------------------------
    def _inode(self, path, follow_symlinks: bool = True):
        if isinstance(path, int):
            return self.fdtable.get(path).f_inode
        return self._live().lookup_path(fspath(path), follow=follow_symlinks)

    def stat(self, path, *, follow_symlinks: bool = True) -> os.stat_result:
        """``os.stat``; an int ``path`` is a descriptor."""
        self._live()
        return _stat_result(self._inode(path, follow_symlinks), self.sb)

    def lstat(self, path) -> os.stat_result:
        return self.stat(path, follow_symlinks=False)

    def fstat(self, fd: int) -> os.stat_result:
        self._live()
        return _stat_result(self.fdtable.get(fd).f_inode, self.sb)

    def exists(self, path) -> bool:
        try:
            self.stat(path)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def chmod(self, path, mode: int, *, follow_symlinks: bool = True) -> None:
        nd = self._live()
        inode = self._inode(path, follow_symlinks)
        if _stat.S_ISLNK(inode.i_mode):
            raise NotSupportedError(_errno.EOPNOTSUPP, "cannot chmod a symbolic link")
        nd.setattr(inode, Iattr(mode=mode & 0o7777), fspath(path) if not isinstance(path, int) else None)

    def chown(self, path, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """``os.chown``; -1 leaves an id unchanged.  As on Linux, a non-directory loses its
        setuid bit, and its setgid bit when group-executable (``chown_common``)."""
        nd = self._live()
        inode = self._inode(path, follow_symlinks)
        attrs = Iattr(uid=None if uid == -1 else uid, gid=None if gid == -1 else gid)
        if not _stat.S_ISDIR(inode.i_mode) and not _stat.S_ISLNK(inode.i_mode):
            mode = _stat.S_IMODE(inode.i_mode)
            new = mode & ~_stat.S_ISUID
            if mode & _stat.S_ISGID and mode & _stat.S_IXGRP:
                new &= ~_stat.S_ISGID
            if new != mode:
                attrs.mode = new
        nd.setattr(inode, attrs, None if isinstance(path, int) else fspath(path))

    def lchown(self, path, uid: int, gid: int) -> None:
        self.chown(path, uid, gid, follow_symlinks=False)

    def utime(self, path, times=None, *, ns=None, follow_symlinks: bool = True) -> None:
        """``os.utime``: ``times`` (atime, mtime) in seconds or ``ns`` in nanoseconds; neither
        means now."""
        if times is not None and ns is not None:
            raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
        if ns is not None:
            at, mt = int(ns[0]), int(ns[1])
        elif times is not None:
            at, mt = (int(round(t * 1e9)) for t in times)
        else:
            at = mt = time.time_ns()
        nd = self._live()
        inode = self._inode(path, follow_symlinks)
        nd.setattr(inode, Iattr(atime_ns=at, mtime_ns=mt),
                   None if isinstance(path, int) else fspath(path))

    def statvfs(self, path="/") -> os.statvfs_result:
        self._live()
        self._inode(path)
        st = self.sb.s_op.statfs()
        frsize = st.f_frsize or st.f_bsize
        return os.statvfs_result((st.f_bsize, frsize, st.f_blocks, st.f_bfree, st.f_bavail,
                                  st.f_files, st.f_ffree, st.f_ffree,
                                  ST_RDONLY if self.readonly else 0, 255, st.f_fsid))

    # -- namespace --------------------------------------------------------------------------------
    def mkdir(self, path, mode: int = 0o777) -> None:
        self._live().mkdir(fspath(path), mode, self._umask)

    def makedirs(self, path, mode: int = 0o777, exist_ok: bool = False) -> None:
        parts = [p for p in fspath(path).split("/") if p]
        cur = ""
        for i, part in enumerate(parts):
            cur += "/" + part
            try:
                self.mkdir(cur, mode)
            except FileExistsError:
                last = i == len(parts) - 1
                if last and not exist_ok:
                    raise
                if last and not _stat.S_ISDIR(self.stat(cur).st_mode):
                    raise

    def rmdir(self, path) -> None:
        self._live().rmdir(fspath(path))

    def unlink(self, path) -> None:
        self._live().unlink(fspath(path))

    remove = unlink

    def rename(self, src, dst, flags: int = 0) -> None:
        """``renameat2``: ``flags`` 0, RENAME_NOREPLACE or RENAME_EXCHANGE."""
        self._live().rename(fspath(src), fspath(dst), flags)

    def replace(self, src, dst) -> None:
        self.rename(src, dst)

    def link(self, src, dst, *, follow_symlinks: bool = False) -> None:
        self._live().link(fspath(src), fspath(dst), follow_symlinks)

    def symlink(self, target, path) -> None:
        self._live().symlink(fspath(target), fspath(path))

    def readlink(self, path) -> str:
        return self._live().readlink(fspath(path))

    def listdir(self, path="/") -> list:
        """Names in the directory (no ``.``/``..``), in the personality's readdir order."""
        nd = self._live()
        return [n for n, _ino, _t in nd.readdir(self._inode(path))]

    def scandir(self, path="/") -> _ScandirIterator:
        nd = self._live()
        p = "/" if isinstance(path, int) else fspath(path)
        if not p.startswith("/"):
            p = "/" + p
        entries = [DirEntry(self, p, n, ino, t) for n, ino, t in nd.readdir(self._inode(path))]
        return _ScandirIterator(entries)

    # -- xattrs ------------------------------------------------------------------------------------
    def getxattr(self, path, attribute, *, follow_symlinks: bool = True) -> bytes:
        nd = self._live()
        attribute = nd.xattr_import(attribute)
        return nd.getxattr(self._inode(path, follow_symlinks), attribute)

    def setxattr(self, path, attribute, value, flags: int = 0, *, follow_symlinks: bool = True) -> None:
        nd = self._live()
        attribute, value = nd.setxattr_import(attribute, value, flags)
        nd.setxattr(self._inode(path, follow_symlinks), attribute, value, flags,
                    None if isinstance(path, int) else fspath(path))

    def listxattr(self, path="/", *, follow_symlinks: bool = True) -> list:
        nd = self._live()
        return nd.listxattr(self._inode(path, follow_symlinks))

    def removexattr(self, path, attribute, *, follow_symlinks: bool = True) -> None:
        nd = self._live()
        attribute = nd.xattr_import(attribute)
        nd.removexattr(self._inode(path, follow_symlinks), attribute,
                       None if isinstance(path, int) else fspath(path))

    # -- asynchronous I/O ------------------------------------------------------------------------
    @contextlib.contextmanager
    def plug(self):
        """Batch submissions, as the kernel's ``blk_start_plug``/``blk_finish_plug``.

        Inside ``with fs.plug():`` the asynchronous I/Os this thread submits keep their
        device requests queued, and leaving the block hands all of them to the device in
        one submission (one ``io_uring_enter`` instead of one per I/O).  Synchronous calls
        inside the block still complete before they return, and :meth:`reap` submits
        whatever is queued before it waits.  Blocks nest; only the outermost submits::

            with fs.plug():
                for off in offsets:
                    fs.submit_pwrite(fd, buf, off)
            done = fs.reap(len(offsets))
        """
        self._live()
        bdev = getattr(self.sb, "bdev", None)
        q = bdev.queue() if bdev is not None else None
        if q is None:
            yield self
            return
        q.start_plug()
        try:
            yield self
        finally:
            q.finish_plug()

    def submit_pread(self, fd: int, length: int, offset: int) -> AsyncHandle:
        """Start an asynchronous pread; its result (bytes) comes from :meth:`reap`.

        Argument errors (EBADF, EINVAL, EISDIR) raise here; I/O errors arrive as results."""
        if length < 0:
            self._live()
            self.fdtable.get(fd)
            raise InvalidError(_errno.EINVAL, "negative length")
        return self._submit("pread", fd, None, min(length, MAX_RW_COUNT), offset, False)

    def submit_preadinto(self, fd: int, buf, offset: int) -> AsyncHandle:
        """Start an asynchronous read of up to ``len(buf)`` bytes at ``offset`` into the
        writable buffer ``buf`` (no copy); its result (the bytes read, an int) comes from
        :meth:`reap`.  Do not touch ``buf`` until then.  TypeError for a read-only buffer."""
        view = writable_view(buf)[:MAX_RW_COUNT]
        return self._submit("preadinto", fd, view, len(view), offset, False)

    def submit_pwrite(self, fd: int, data, offset: int) -> AsyncHandle:
        """Start an asynchronous pwrite; its result (bytes written) comes from :meth:`reap`."""
        if type(data) is memoryview and data.format == "B" and data.ndim == 1 \
                and data.c_contiguous:
            buf = data
        else:
            buf = memoryview(data).cast("B")
        if len(buf) > MAX_RW_COUNT:
            buf = buf[:MAX_RW_COUNT]
        return self._submit("pwrite", fd, buf, len(buf), offset, True)

    def _submit(self, op, fd, buf, length, offset, write) -> AsyncHandle:
        """The per-I/O path of every submit_*: checks, one Kiocb (``private`` is the handle,
        ``ki_complete`` the bound :meth:`_ki_complete`), ``read_iter``/``write_iter``."""
        if not self._mounted:
            raise InvalidError(_errno.EINVAL, "filesystem is unmounted")
        file = self.fdtable.get(fd)
        if offset < 0:
            raise InvalidError(_errno.EINVAL, "negative file position")
        if write:
            file.check_writable()
        else:
            file.check_readable()
            if _stat.S_ISDIR(file.f_inode.i_mode):
                raise from_errno(_errno.EISDIR, "is a directory")
        h = AsyncHandle(op, fd, offset, length)
        if buf is None:
            buf = h._buf = bytearray(length)
        iocb = Kiocb(file, offset, file.iocb_flags(write=write), self._ki_complete, h)
        with self._cv_lock:
            self._inflight += 1
        try:
            if not length:
                ret = 0
            elif write:
                ret = file.f_op.write_iter(iocb, buf)
            else:
                ret = file.f_op.read_iter(iocb, buf)
        except OSError as e:
            self._post(h, e)
            return h
        if ret != EIOCBQUEUED:
            self._post(h, ret)
        return h

    def _ki_complete(self, iocb, res) -> None:
        self._post(iocb.private, res)

    def _post(self, h: AsyncHandle, res) -> None:
        """Record a completion (called inline or from ``ki_complete`` on any thread)."""
        if isinstance(res, BaseException):
            result = res
        elif res < 0:
            result = from_errno(-res)
        elif h._buf is not None:
            result = bytes(h._buf[:res])
        else:
            result = res
        h.result = result
        h._buf = None
        # the result is set before the handle is visible in _done; a reaper that counts
        # itself in _waiters re-checks _done under _cv before sleeping, so reading
        # _waiters after the append never misses it
        self._done.append(h)
        if self._waiters:
            with self._cv:
                self._cv.notify_all()

    @property
    def inflight(self) -> int:
        """Submitted I/Os not reaped yet."""
        return self._inflight

    def _drive(self) -> bool:
        """Reap the calling thread's device queue once if it has I/O in flight."""
        bdev = getattr(self.sb, "bdev", None)
        if bdev is None:
            return False
        try:
            q = bdev.queue()
        except (AttributeError, OSError):
            return False
        if getattr(q, "inflight", 0) <= 0:
            return False
        q.wait(1)
        return True

    def reap(self, min_complete: int = 1, timeout: float | None = None) -> list:
        """Wait for at least ``min_complete`` completions (fewer if fewer are in flight, or the
        timeout expires); return every completion available as ``(handle, result)`` pairs,
        ``result`` being bytes (pread), an int (preadinto, pwrite) or the OSError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self._done
        while True:
            with self._cv_lock:
                ready = len(done)
                if ready >= min_complete or ready >= self._inflight:
                    out = []
                    while done:
                        h = done.popleft()
                        h.done = True
                        out.append((h, h.result))
                    self._inflight -= len(out)
                    return out
                if deadline is not None and time.monotonic() >= deadline:
                    min_complete = 0
                    continue
            if not self._drive():
                with self._cv:
                    self._waiters += 1
                    try:
                        if len(done) < min_complete:
                            wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
                            self._cv.wait(wait)
                    finally:
                        self._waiters -= 1

"""The operation contracts a personality implements: super, inode and file operations.

Layer: vfs.  Imports ``ufs.errors`` and the standard library only.  Personalities subclass (or
duck-type) these classes; the generic VFS (``ufs.vfs.namei``, ``ufs.vfs.fdtable``, ``ufs.api``)
calls them.  Names are the kernel's (``struct super_operations``, ``inode_operations``,
``file_operations``); where Python lets us pass more than the kernel's dentry, we pass the name
and the inode(s) the VFS already looked up, so a personality never repeats a lookup.

Where the objects live (the kernel's pointers):
- ``sb.s_op``      the :class:`SuperOperations` of a mounted superblock (may be ``sb`` itself);
- ``inode.i_op``   the :class:`InodeOperations` of an inode (one object may serve all inodes);
- ``inode.i_fop``  the :class:`FileOperations` used by files opened on the inode.

Inode fields the generic VFS reads (a personality keeps them current; ``stat`` is built from
them with no call into the personality): ``i_ino``, ``i_mode`` (type and permission bits, as
``st_mode``), ``i_nlink``, ``i_uid``, ``i_gid``, ``i_size``, ``i_blocks`` (512-byte units, as
``st_blocks``), ``i_atime_ns``, ``i_mtime_ns``, ``i_ctime_ns``, ``i_sb``, ``i_rwsem``.
Superblock fields read: ``s_blocksize``, and optionally ``s_maxbytes`` (default 2**63 - 1),
``s_max_links`` (0 = no limit), ``s_dev`` (``st_dev``; default 0).

What the VFS has already done when a personality method runs (so personalities never repeat it):
names are validated (non-empty, no ``/``, not ``.``/``..``, at most NAME_MAX=255 UTF-8 bytes), the
read-only check (EROFS) is done, the existence and type rules of Linux's VFS are applied (EEXIST,
ENOENT, ENOTDIR, EISDIR, ENOTEMPTY, EPERM for links to directories, EINVAL for renaming a
directory under itself, EMLINK against ``s_max_links``), and the locks listed per method are held.
Errors a personality still raises are its own: ENOSPC, EIO, EUCLEAN (CorruptError), EFBIG,
EOPNOTSUPP for a feature it lacks.

Lock order (lockdep subclasses of ``inode.i_rwsem``, see ``ufs.vfs.namei``): parent directories
first (:data:`I_MUTEX_PARENT`, then :data:`I_MUTEX_PARENT2` for the second rename parent, the
one with the larger ``(i_ino, id)`` key unless it is the ancestor), then the child inodes
(:data:`I_MUTEX_NORMAL`, then :data:`I_MUTEX_NONDIR2`).  ``read_iter``/``write_iter``/
``fsync``/``fallocate``/``seek_data_hole`` are called with no VFS lock held: the personality
takes its own, as XFS and btrfs do.
"""
from __future__ import annotations

import dataclasses
import os
import stat as _stat

from ufs.errors import FileTooBigError, InvalidError, NotSupportedError

__all__ = [
    "DT_DIR",
    "DT_LNK",
    "DT_REG",
    "DT_UNKNOWN",
    "FALLOC_FL_COLLAPSE_RANGE",
    "FALLOC_FL_INSERT_RANGE",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_UNSHARE_RANGE",
    "FALLOC_FL_ZERO_RANGE",
    "FSYNC_END",
    "I_MUTEX_CHILD",
    "I_MUTEX_NONDIR2",
    "I_MUTEX_NORMAL",
    "I_MUTEX_PARENT",
    "I_MUTEX_PARENT2",
    "I_MUTEX_XATTR",
    "MAX_LFS_FILESIZE",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "RENAME_WHITEOUT",
    "XATTR_CREATE",
    "XATTR_LIST_MAX",
    "XATTR_NAME_MAX",
    "XATTR_REPLACE",
    "XATTR_SIZE_MAX",
    "FileOperations",
    "FsckReport",
    "Geometry",
    "Iattr",
    "InodeOperations",
    "KStatfs",
    "SuperOperations",
    "current_cred",
    "dirent_type",
    "generic_write_checks",
    "inode_init_owner",
    "setattr_copy",
]

# lockdep subclasses of inode.i_rwsem (the kernel's enum inode_i_mutex_lock_class).
I_MUTEX_NORMAL = 0
I_MUTEX_PARENT = 1
I_MUTEX_CHILD = 2
I_MUTEX_XATTR = 3
I_MUTEX_NONDIR2 = 4
I_MUTEX_PARENT2 = 5

# renameat2(2) flags (<linux/fs.h>); the os module has none of them.
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# fallocate(2) modes (<linux/falloc.h>).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40

# xattr limits and setxattr flags (<linux/xattr.h>, <linux/limits.h>).
XATTR_CREATE = 1
XATTR_REPLACE = 2
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536

# d_type values for readdir.
DT_UNKNOWN = 0
DT_DIR = 4
DT_REG = 8
DT_LNK = 10

MAX_LFS_FILESIZE = 2**63 - 1
#: ``end`` the VFS passes to ``fsync`` for "the whole file" (ufs.vfs.file.LLONG_MAX).
FSYNC_END = 2**63 - 1


def dirent_type(mode: int) -> int:
    """The d_type readdir reports for an inode mode (the kernel's ``fs_umode_to_dtype``)."""
    return _stat.S_IFMT(mode) >> 12


def current_cred() -> tuple[int, int]:
    """(fsuid, fsgid) of the caller: the process's effective ids."""
    return os.geteuid(), os.getegid()


def inode_init_owner(dir, mode: int) -> tuple[int, int, int]:
    """(uid, gid, mode) of a new inode created in ``dir`` (the kernel's ``inode_init_owner``).

    In a setgid directory the new inode takes the directory's group, and a new directory
    inherits the setgid bit; otherwise the caller's ids.  (The caller is treated as
    privileged: a setgid bit asked for is kept.)
    """
    uid, gid = current_cred()
    if dir is not None and dir.i_mode & _stat.S_ISGID:
        gid = dir.i_gid
        if _stat.S_ISDIR(mode):
            mode |= _stat.S_ISGID
    return uid, gid, mode


@dataclasses.dataclass
class Iattr:
    """Attribute changes for :meth:`InodeOperations.setattr` (the kernel's ``struct iattr``).

    A field left ``None`` is not changed.  ``size`` is a truncate (up or down) in bytes; times
    are nanoseconds since the epoch.  The VFS fills ``ctime_ns`` for every change, as
    ``notify_change`` does, and ``mtime_ns`` for truncates.
    """

    mode: int | None = None          # permission bits only (S_IMODE); the type never changes
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None


def setattr_copy(inode, attrs: Iattr) -> None:
    """Copy every non-size field of ``attrs`` into ``inode`` (the kernel's
    ``setattr_copy``); the personality truncates and logs the inode itself."""
    if attrs.mode is not None:
        inode.i_mode = _stat.S_IFMT(inode.i_mode) | _stat.S_IMODE(attrs.mode)
    if attrs.uid is not None:
        inode.i_uid = attrs.uid
    if attrs.gid is not None:
        inode.i_gid = attrs.gid
    if attrs.atime_ns is not None:
        inode.i_atime_ns = attrs.atime_ns
    if attrs.mtime_ns is not None:
        inode.i_mtime_ns = attrs.mtime_ns
    if attrs.ctime_ns is not None:
        inode.i_ctime_ns = attrs.ctime_ns


@dataclasses.dataclass
class KStatfs:
    """What :meth:`SuperOperations.statfs` returns (the kernel's ``struct kstatfs``).

    Counts are in units of ``f_frsize`` (default ``f_bsize``) for blocks and of inodes for
    files.  The VFS adds ``f_flag`` (ST_RDONLY for read-only mounts) and ``f_namemax``.
    """

    f_bsize: int
    f_blocks: int
    f_bfree: int
    f_bavail: int
    f_files: int = 0
    f_ffree: int = 0
    f_frsize: int | None = None
    f_fsid: int = 0


@dataclasses.dataclass
class Geometry:
    """What ``mkfs`` is asked to build: device size and filesystem block size, in bytes."""

    size: int
    block_size: int = 4096


@dataclasses.dataclass
class FsckReport:
    """What a personality's ``fsck(device, repair)`` returns (``ufs.fsck`` passes it on).

    ``errors`` are the problems found (one line each: what and where), ``repaired`` the ones
    fixed when ``repair`` was asked.  ``clean`` means nothing was found.  ``stats`` is free-form
    (inodes, blocks checked...).
    """

    fstype: str
    errors: list = dataclasses.field(default_factory=list)
    repaired: list = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.errors


class SuperOperations:
    """Superblock operations (``struct super_operations``), reachable as ``sb.s_op``.

    ``root_ino`` (attribute or property) is the inode number of the root directory.
    """

    root_ino: int = 1

    def iget(self, ino: int):
        """Return the in-memory inode for ``ino`` (cached: the same object for a live inode).

        Raises CorruptError for an inode the image cannot describe; NotFoundError (ENOENT)
        if ``ino`` is not allocated.
        """
        raise NotImplementedError

    def evict_inode(self, inode) -> None:
        """Free ``inode`` if its ``i_nlink`` is 0: called when its last name and last open file
        are gone (an unlinked file stays readable through open fds until then).

        Called with no lock held.  Default: nothing (the personality frees at unlink time).
        """

    def statfs(self) -> KStatfs:
        """Space and inode counts (statvfs).  No lock held."""
        raise NotImplementedError

    def sync_fs(self, wait: bool) -> None:
        """Make everything written so far durable (``syncfs``); ``wait`` False may only start it."""

    def put_super(self) -> None:
        """Clean unmount: write everything back, release the device.  Called once, last."""


class InodeOperations:
    """Inode operations (``struct inode_operations``), reachable as ``inode.i_op``.

    Directory methods receive the parent directory inode ``dir`` and the entry ``name`` (a
    ``str``; its on-disk form is ``os.fsencode(name)``).  Unless a method says otherwise the
    personality must update timestamps (mtime/ctime of a directory whose entries change, ctime of
    an inode whose link count or attributes change) and link counts (a directory's ``i_nlink``
    is 2 + its subdirectories, as ext4/XFS/tmpfs report; a personality that reports otherwise,
    as btrfs does with 1, says so in its allowed list).
    """

    # -- namespace --------------------------------------------------------------------------
    def lookup(self, dir, name: str):
        """Return the inode ``name`` names in ``dir``, or ``None``.

        Locks: ``dir.i_rwsem`` held shared.  Errors: CorruptError, IOFailure.
        """
        raise NotImplementedError

    def create(self, dir, name: str, mode: int):
        """Create a regular file; ``mode`` is ``S_IFREG | perm`` (umask already applied).

        Returns the new inode (``i_nlink`` 1, owner and setgid from :func:`inode_init_owner`).  Locks: ``dir`` held
        exclusive (I_MUTEX_PARENT); the VFS checked ``name`` is absent.  Errors: ENOSPC.
        """
        raise NotImplementedError

    def mkdir(self, dir, name: str, mode: int):
        """Create a directory; ``mode`` is ``S_IFDIR | perm``.  Returns the inode (``i_nlink``
        2); ``dir.i_nlink`` goes up by 1.  Locks and errors as :meth:`create`; the VFS checked
        EMLINK against ``s_max_links``."""
        raise NotImplementedError

    def symlink(self, dir, name: str, target: str):
        """Create a symlink holding ``target`` (non-empty, < PATH_MAX bytes, stored verbatim).
        ``i_size`` is its UTF-8 length; mode ``S_IFLNK | 0o777``.  Locks as :meth:`create`."""
        raise NotImplementedError

    def link(self, inode, dir, name: str) -> None:
        """Add ``name`` in ``dir`` for the existing non-directory ``inode`` (``i_nlink`` += 1).

        Locks: ``dir`` exclusive (I_MUTEX_PARENT), then ``inode`` exclusive (I_MUTEX_NORMAL).
        """
        raise NotImplementedError

    def unlink(self, dir, name: str, inode) -> None:
        """Remove the entry ``name`` (a non-directory ``inode``); ``i_nlink`` -= 1.  Do not free
        the inode: the VFS calls ``sb.s_op.evict_inode`` once no file holds it open.

        Locks: ``dir`` exclusive (I_MUTEX_PARENT), then ``inode`` exclusive (I_MUTEX_NORMAL).
        """
        raise NotImplementedError

    def rmdir(self, dir, name: str, inode) -> None:
        """Remove the empty directory ``inode`` (the VFS checked it is empty with both locks
        held, so it stays empty): its ``i_nlink`` goes to 0, ``dir.i_nlink`` -= 1.  Locks as
        :meth:`unlink`."""
        raise NotImplementedError

    def rename(self, old_dir, old_name: str, source, new_dir, new_name: str, target,
               flags: int) -> None:
        """Move ``old_dir/old_name`` (inode ``source``) to ``new_dir/new_name``.

        ``target`` is the inode currently at the new name or ``None``.  The VFS already applied
        every rule: NOREPLACE (EEXIST), EXCHANGE needs a target (ENOENT), type mismatches
        (EISDIR/ENOTDIR), a non-empty directory target (ENOTEMPTY), a directory moved under
        itself (EINVAL), ``source is target`` (done, never called).  Without EXCHANGE a
        ``target`` loses the name (``i_nlink`` -= 1, or to 0 for an empty directory); with
        EXCHANGE the two entries swap.  Directories moved between parents get a new ``..`` and
        the parents' ``i_nlink`` change.  ``flags`` is passed for information.

        Locks: both parents exclusive (one lock if equal; see the module docstring for the
        order), then ``source`` and ``target`` exclusive.  Errors: ENOSPC, EIO.
        """
        raise NotImplementedError

    def readlink(self, inode) -> str:
        """The target of the symlink ``inode``.  No lock held."""
        raise NotImplementedError

    def readdir(self, dir, pos: int):
        """Yield ``(name, ino, d_type, next_pos)`` for the entries of ``dir`` from cookie ``pos``.

        ``pos`` 0 is the start; ``next_pos`` is the cookie that resumes after this entry
        (strictly increasing, stable across other entries' insertions and removals, like
        ext4/XFS hash cookies).  ``.`` and ``..`` may be emitted or not: the VFS drops them.
        Locks: ``dir.i_rwsem`` held for the whole iteration (shared; exclusive when the VFS
        checks that a directory is empty before rmdir/rename).
        """
        raise NotImplementedError

    # -- attributes ---------------------------------------------------------------------------
    def setattr(self, inode, attrs: Iattr) -> None:
        """Apply ``attrs``.  A size change truncates or extends (zeroing the tail of the last
        block, freeing blocks past EOF, waiting for in-flight DIO with ``inode_dio_wait`` and
        dropping page-cache pages past the new size, as ``truncate_setsize`` does).

        Locks: ``inode.i_rwsem`` held exclusive (I_MUTEX_NORMAL).  The VFS checked EFBIG against
        ``s_maxbytes`` and that the inode is a regular file for size changes.
        """
        raise NotImplementedError

    def getxattr(self, inode, name: str) -> bytes:
        """Value of xattr ``name`` (full name with namespace, e.g. ``"user.x"``).  ENODATA if
        absent.  Locks: ``inode.i_rwsem`` held shared."""
        raise NotImplementedError

    def listxattr(self, inode) -> list:
        """All xattr names of ``inode``.  Locks: ``inode.i_rwsem`` held shared."""
        raise NotImplementedError

    def setxattr(self, inode, name: str, value: bytes, flags: int) -> None:
        """Set xattr ``name``.  The VFS validated the name (namespace, ERANGE), the size (E2BIG)
        and applied XATTR_CREATE (EEXIST) / XATTR_REPLACE (ENODATA).  ENOSPC if it cannot store
        it.  Locks: ``inode.i_rwsem`` held exclusive."""
        raise NotImplementedError

    def removexattr(self, inode, name: str) -> None:
        """Remove xattr ``name``; ENODATA if absent.  Locks: ``inode.i_rwsem`` exclusive."""
        raise NotImplementedError

    # -- data-space operations ---------------------------------------------------------------
    def fallocate(self, inode, mode: int, pos: int, length: int) -> None:
        """Preallocate (mode 0 or KEEP_SIZE), PUNCH_HOLE|KEEP_SIZE, or ZERO_RANGE [|KEEP_SIZE].

        The VFS checked pos >= 0, length > 0, the mode combination (EOPNOTSUPP), a regular file
        open for writing, and pos + length <= s_maxbytes (EFBIG).  Without KEEP_SIZE ``i_size``
        grows to ``pos + length``.  A personality without a mode raises NotSupportedError.
        No lock held: take ``i_rwsem`` exclusive and ``inode_dio_wait`` (sem §6).
        """
        raise NotSupportedError("fallocate not supported")

    def seek_data_hole(self, inode, pos: int, whence: int) -> int:
        """``lseek(SEEK_DATA/SEEK_HOLE)`` for ``0 <= pos < i_size`` (the VFS answers ENXIO
        otherwise): the first data (written) byte at or after ``pos``, or the first hole byte
        (``i_size`` counts as a hole).  Unwritten (preallocated, never written) ranges are holes
        unless the page cache holds data for them.  ENXIO when no data follows ``pos``.
        No lock held.  Default: the whole file is data.
        """
        if whence == os.SEEK_DATA:
            return pos
        return inode.i_size


class FileOperations:
    """File operations (``struct file_operations``), reachable as ``inode.i_fop``.

    A ``file`` is a ``ufs.vfs.file.File``; ``iocb`` a ``Kiocb`` whose ``ki_filp`` is the file,
    ``ki_pos`` the position and ``ki_flags`` the IOCB_* flags (IOCB_WRITE set for writes,
    IOCB_APPEND from O_APPEND, IOCB_DIRECT from O_DIRECT, IOCB_DSYNC/IOCB_SYNC from
    O_DSYNC/O_SYNC, IOCB_NOWAIT per call).
    """

    def open(self, inode, file) -> None:
        """Called once when ``file`` is opened (after the VFS's checks and O_TRUNC).  May raise
        (e.g. EINVAL for O_DIRECT on a personality without it)."""

    def release(self, inode, file) -> None:
        """Called once when the last descriptor of ``file`` is closed."""

    def read_iter(self, iocb, buf) -> int:
        """Read into the writable buffer ``buf`` at ``iocb.ki_pos``; return bytes read (0 at or
        past EOF) and advance ``iocb.ki_pos`` by them.  For an async ``iocb``
        (``ki_complete`` set) it may instead return ``EIOCBQUEUED`` and later call
        ``iocb.ki_complete(iocb, res)`` once (``res`` bytes or -errno).  No lock held."""
        raise NotImplementedError

    def write_iter(self, iocb, data) -> int:
        """Write ``data`` at ``iocb.ki_pos`` (or at EOF for IOCB_APPEND: use
        :func:`generic_write_checks`); return bytes written, advance ``ki_pos``, grow
        ``i_size``, update mtime/ctime, and honour IOCB_DSYNC/IOCB_SYNC (``generic_write_sync``).
        Async as :meth:`read_iter`.  No lock held: take ``i_rwsem`` as the personality's design
        says."""
        raise NotImplementedError

    def fsync(self, file, start: int, end: int, datasync: bool) -> None:
        """Make ``[start, end)`` of the file (``end`` may be :data:`FSYNC_END`) and the metadata
        needed to read it back durable; with ``datasync`` False also the other metadata."""
        raise NotImplementedError


_IOCB_APPEND = None


def generic_write_checks(iocb, count: int, s_maxbytes: int = MAX_LFS_FILESIZE) -> int:
    """Apply O_APPEND and the size limit to a write of ``count`` bytes; return the count to do.

    Call from ``write_iter`` with ``i_rwsem`` held (the kernel's ``generic_write_checks``):
    IOCB_APPEND moves ``iocb.ki_pos`` to ``i_size``; a write starting at or past
    ``s_maxbytes`` is EFBIG; one crossing it is shortened; a negative position is EINVAL.
    This is the only copy: buffered I/O and every personality call it.
    """
    global _IOCB_APPEND
    if _IOCB_APPEND is None:
        # deferred: importing ops must not need the compiled core; a plain int afterwards,
        # since IntFlag arithmetic costs about a microsecond on this per-I/O path
        from ufs.iomap import Iocb
        _IOCB_APPEND = int(Iocb.APPEND)

    if iocb.ki_flags & _IOCB_APPEND:
        iocb.ki_pos = iocb.ki_filp.f_inode.i_size
    if iocb.ki_pos < 0:
        raise InvalidError("negative file position")
    if count == 0:
        return 0
    if iocb.ki_pos >= s_maxbytes:
        raise FileTooBigError("write starts past the maximum file size")
    return min(count, s_maxbytes - iocb.ki_pos)

"""Path walk and the namespace operations Linux's VFS does before it calls a filesystem.

Layer: vfs.  Imports ``ufs.vfs.ops``, ``ufs.vfs.locks``, ``ufs.errors`` and the standard library.
Personalities are reached only through ``sb.s_op`` / ``inode.i_op`` (see ``ufs.vfs.ops``).

What it owns:
- the walk (``fs/namei.c``): paths are absolute inside the filesystem (a relative path starts at
  the root, there is no cwd); ``..`` of the root is the root; symlinks are followed with a budget
  of 40 per walk (ELOOP); NAME_MAX = 255 bytes per component (UTF-8 / ``os.fsencode`` length)
  and PATH_MAX = 4096 bytes per path, both ENAMETOOLONG; a trailing slash means "must be a
  directory" and makes a final symlink be followed;
- the generic checks of ``do_mkdirat``, ``do_rmdir``, ``do_unlinkat``, ``do_symlinkat``,
  ``do_linkat``, ``do_renameat2``, ``vfs_*`` and ``do_open``/``may_open``, *in the kernel's
  order*, so the errno matches Linux when several rules apply;
- the lock protocol of the namespace (``inode.i_rwsem`` with lockdep subclasses from ``ops``).

There is no dentry cache: a walk keeps the stack of directory inodes from the root (``..`` pops
it), which is the real ancestry because a directory has one parent.  ``s_vfs_rename_mutex``
serialises renames (the only operation that moves directories), so a stack computed under it is
stable for the rename's ancestry checks.  Every component is looked up by the personality
(``i_op.lookup``: an O(log n) directory B+tree/btree search plus ``iget``), so there are no
negative or unused dentries to keep or shrink; what memory a walk leaves behind is inodes, and
the bounded inode cache of ``ufs.vfs.super`` owns their lifetime.  Namei feeds that cache the
two things only the VFS knows: ``sb.s_inode_in_use`` (an open file holds the inode, from the
fd table's ``is_open``) and the safe point: :meth:`Namei._balance` runs
``sb.balance_icache()`` at the start of the namespace operations that create or remove
(open, mkdir, symlink, link, unlink, rmdir, rename; not plain lookups, which make nothing
dirty), when this thread holds no lock, so the cache may write dirty inodes back there to
stay within its bound.  Inodes are compared by identity (``is``) only within one operation,
whose walk stack holds them (so ``iget`` returns the same objects).

Lock order: ``s_vfs_rename_mutex`` → parent directory ``i_rwsem`` (I_MUTEX_PARENT, then
I_MUTEX_PARENT2) → child ``i_rwsem`` (I_MUTEX_NORMAL, then I_MUTEX_NONDIR2).  A walk takes each
directory's ``i_rwsem`` shared around one lookup and never holds two.  ``_balance`` (inode
cache write-back: page-cache locks, then the personality's metadata lock) runs before any of
these is taken.  A method called with a directory already locked uses
:meth:`Namei._lookup_locked`.
"""
from __future__ import annotations

import errno as _errno
import os
import stat as _stat
import threading
import time

from ufs.errors import (
    ExistsError,
    FileTooBigError,
    InvalidError,
    IsADirError,
    NameTooLongError,
    NotADirError,
    NotEmptyError,
    NotFoundError,
    PermissionDeniedError,
    ReadOnlyError,
    from_errno,
)
from ufs.vfs import ops
from ufs.vfs.locks import Mutex
from ufs.vfs.ops import (
    I_MUTEX_NONDIR2,
    I_MUTEX_NORMAL,
    I_MUTEX_PARENT,
    I_MUTEX_PARENT2,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    Iattr,
)

__all__ = [
    "LAST_DOT",
    "LAST_DOTDOT",
    "LAST_NORM",
    "LAST_ROOT",
    "MAXSYMLINKS",
    "NAME_MAX",
    "PATH_MAX",
    "Namei",
    "Parent",
    "check_name",
    "fspath",
]

NAME_MAX = 255
PATH_MAX = 4096
MAXSYMLINKS = 40

LAST_NORM, LAST_ROOT, LAST_DOT, LAST_DOTDOT = range(4)

_O_ACCMODE = os.O_ACCMODE
_O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


def _err(code: int, msg: str, path=None) -> OSError:
    return from_errno(code, msg, path)


def fspath(path) -> str:
    """A path argument (str, bytes or PathLike) as ``str`` (bytes via ``os.fsdecode``)."""
    p = os.fspath(path)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def _check_path(path: str) -> None:
    """``getname()``: empty → ENOENT; 4096 bytes or more (with the NUL: over PATH_MAX) →
    ENAMETOOLONG; an embedded NUL is ValueError, as in the ``os`` module."""
    if "\0" in path:
        raise ValueError("embedded null byte")
    if not path:
        raise NotFoundError(_errno.ENOENT, "empty path", path)
    if len(os.fsencode(path)) >= PATH_MAX:
        raise NameTooLongError(_errno.ENAMETOOLONG, "path longer than PATH_MAX", path)


def check_name(name: str) -> None:
    """A component over NAME_MAX bytes → ENAMETOOLONG (the check every Linux fs's lookup does;
    done once here so no personality can store an over-long entry)."""
    if len(os.fsencode(name)) > NAME_MAX:
        raise NameTooLongError(_errno.ENAMETOOLONG, "file name longer than 255 bytes", name)


def _is_dir(inode) -> bool:
    return _stat.S_ISDIR(inode.i_mode)


def _is_lnk(inode) -> bool:
    return _stat.S_ISLNK(inode.i_mode)


def _key(inode) -> tuple:
    return (inode.i_ino, id(inode))


class Parent:
    """Result of a parent walk (the kernel's nameidata after ``filename_parentat``).

    ``stack`` is the directory inodes from the root to the parent; ``name`` the last component,
    ``type`` one of LAST_NORM/LAST_ROOT/LAST_DOT/LAST_DOTDOT, ``trailing`` whether the path
    ended with ``/`` after the last component.
    """

    __slots__ = ("stack", "name", "type", "trailing", "path")

    def __init__(self, stack, name, type_, trailing, path):
        self.stack, self.name, self.type, self.trailing, self.path = stack, name, type_, trailing, path

    @property
    def dir(self):
        return self.stack[-1]


class _Walk:
    """Per-operation walk state: the symlink budget (``nd->total_link_count``)."""

    __slots__ = ("links",)

    def __init__(self):
        self.links = 0


def _now_ns() -> int:
    return time.time_ns()


class Namei:
    """The namespace of one mounted superblock: walks paths and runs the generic VFS rules.

    ``is_open(inode)`` (a callable, given by the fd table) says whether an open file still holds
    an inode, so an unlinked inode is evicted only once its last file is closed.
    """

    def __init__(self, sb, *, readonly: bool = False, is_open=None):
        self.sb = sb
        self.s_op = sb.s_op
        self.readonly = readonly
        self.is_open = is_open or (lambda inode: False)
        self.s_vfs_rename_mutex = Mutex("sb.s_vfs_rename_mutex")
        self._root = None
        self._root_lock = threading.Lock()
        # the inode cache's hooks (ufs.vfs.super); a superblock without one (a test host, a
        # personality not built on Superblock) has neither
        self._balance_icache = None
        if hasattr(sb, "s_inode_in_use"):
            sb.s_inode_in_use = self._inode_in_use
            self._balance_icache = getattr(sb, "balance_icache", None)

    def _inode_in_use(self, inode) -> bool:
        # read self.is_open at each call: the fd table installs it after construction
        return self.is_open(inode)

    def _balance(self) -> None:
        """The inode cache's safe point (no lock held by this thread; see the docstring)."""
        bal = self._balance_icache
        if bal is not None:
            bal()

    # -- limits ---------------------------------------------------------------------------
    @property
    def s_maxbytes(self) -> int:
        return getattr(self.sb, "s_maxbytes", ops.MAX_LFS_FILESIZE)

    @property
    def s_max_links(self) -> int:
        return getattr(self.sb, "s_max_links", 0) or 0

    def root(self):
        if self._root is None:
            with self._root_lock:
                if self._root is None:
                    self._root = self.s_op.iget(self.s_op.root_ino)
        return self._root

    def want_write(self, path=None) -> None:
        """``mnt_want_write``: EROFS on a read-only mount."""
        if self.readonly:
            raise ReadOnlyError(_errno.EROFS, "read-only file system", path)

    # -- lookups ---------------------------------------------------------------------------
    def _lookup_locked(self, dir, name: str):
        """``lookup_one``: ``dir.i_rwsem`` is held by the caller."""
        check_name(name)
        return dir.i_op.lookup(dir, name)

    def lookup_child(self, dir, name: str):
        """The inode ``name`` names in the directory inode ``dir``, or None (a negative
        entry); the name rules are the walk's (ENAMETOOLONG, EINVAL for "/" or NUL).  For
        inode-level callers such as the FUSE adapter, which get (parent, name) pairs."""
        return self._lookup(dir, name)

    def _lookup(self, dir, name: str):
        """A walk step's lookup under ``dir.i_rwsem`` shared."""
        check_name(name)
        dir.i_rwsem.down_read()
        try:
            return dir.i_op.lookup(dir, name)
        finally:
            dir.i_rwsem.up_read()

    def _readlink(self, inode) -> str:
        return inode.i_op.readlink(inode)

    def _follow(self, link, stack, nd: _Walk) -> Parent:
        """Count one symlink and return the parent walk of its body (relative to ``stack``)."""
        nd.links += 1
        if nd.links > MAXSYMLINKS:
            raise _err(_errno.ELOOP, "too many levels of symbolic links")
        body = self._readlink(link)
        if not body:
            raise NotFoundError(_errno.ENOENT, "empty symlink")
        return self._parent_walk(body, stack, nd)

    def _step(self, stack: list, name: str, nd: _Walk, path) -> list:
        """Walk one non-final component from ``stack[-1]``, following a symlink fully."""
        d = stack[-1]
        if not _is_dir(d):
            raise NotADirError(_errno.ENOTDIR, "not a directory", path)
        if name == ".":
            return stack
        if name == "..":
            return stack[:-1] if len(stack) > 1 else stack
        child = self._lookup(d, name)
        if child is None:
            raise NotFoundError(_errno.ENOENT, "no such file or directory", path)
        if _is_lnk(child):
            return self._last(self._follow(child, stack, nd), True, nd)
        return stack + [child]

    def _parent_walk(self, path: str, base: list, nd: _Walk) -> Parent:
        """``filename_parentat``: resolve every component but the last."""
        if path.startswith("/"):
            stack = [self.root()]
        else:
            stack = list(base)
        comps = [c for c in path.split("/") if c]
        if not comps:
            return Parent(stack[:1] if path.startswith("/") else stack, "", LAST_ROOT, False, path)
        for c in comps[:-1]:
            stack = self._step(stack, c, nd, path)
        if not _is_dir(stack[-1]):
            raise NotADirError(_errno.ENOTDIR, "not a directory", path)
        last = comps[-1]
        t = LAST_DOT if last == "." else LAST_DOTDOT if last == ".." else LAST_NORM
        return Parent(stack, last, t, path.endswith("/"), path)

    def _last(self, p: Parent, follow: bool, nd: _Walk) -> list:
        """``lookup_last``: the stack ending with the inode the parent walk's last names."""
        if p.type == LAST_ROOT:
            return p.stack[:1]
        if p.type == LAST_DOT:
            return p.stack
        if p.type == LAST_DOTDOT:
            return p.stack[:-1] if len(p.stack) > 1 else p.stack
        inode = self._lookup(p.dir, p.name)
        if inode is None:
            raise NotFoundError(_errno.ENOENT, "no such file or directory", p.path)
        if _is_lnk(inode) and (follow or p.trailing):
            q = self._follow(inode, p.stack, nd)
            q.trailing = q.trailing or p.trailing
            return self._last(q, True, nd)
        if p.trailing and not _is_dir(inode):
            raise NotADirError(_errno.ENOTDIR, "not a directory", p.path)
        return p.stack + [inode]

    def parent(self, path, nd: _Walk | None = None) -> Parent:
        path = fspath(path)
        _check_path(path)
        return self._parent_walk(path, [self.root()], nd or _Walk())

    def lookup_path(self, path, follow: bool = True):
        """The inode ``path`` names (``filename_lookup``); ``follow`` False is lstat's."""
        nd = _Walk()
        return self._last(self.parent(path, nd), follow, nd)[-1]

    # -- locking helpers -------------------------------------------------------------------
    @staticmethod
    def _lock(inode, subclass: int) -> None:
        inode.i_rwsem.down_write(subclass)

    @staticmethod
    def _unlock(inode) -> None:
        inode.i_rwsem.up_write()

    def _dead_dir(self, dir, path) -> None:
        """``IS_DEADDIR``: a directory removed after the walk accepts no new entries."""
        if dir.i_nlink == 0:
            raise NotFoundError(_errno.ENOENT, "directory was removed", path)

    def _evict_if_unused(self, inode) -> None:
        if inode is not None and inode.i_nlink == 0 and not self.is_open(inode):
            self.s_op.evict_inode(inode)

    def _is_empty_dir(self, dir) -> bool:
        for name, _ino, _t, _pos in dir.i_op.readdir(dir, 0):
            if name not in (".", ".."):
                return False
        return True

    # -- filename_create (mkdir, symlink, link's new name, mknod) --------------------------
    def _create_prepare(self, path, *, is_dir: bool, nd: _Walk | None = None):
        """Walk to the parent, lock it, check the name is free.  Returns (parent, dir) with
        ``dir.i_rwsem`` held for write (I_MUTEX_PARENT); the caller unlocks it."""
        p = self.parent(path, nd)
        if p.type != LAST_NORM:
            raise ExistsError(_errno.EEXIST, "file exists", p.path)
        d = p.dir
        self._lock(d, I_MUTEX_PARENT)
        try:
            if self._lookup_locked(d, p.name) is not None:
                raise ExistsError(_errno.EEXIST, "file exists", p.path)
            # "you had / on the end, you've been asking for a directory": only mkdir may
            if not is_dir and p.trailing:
                raise NotFoundError(_errno.ENOENT, "no such file or directory", p.path)
            self.want_write(p.path)
            self._dead_dir(d, p.path)
        except BaseException:
            self._unlock(d)
            raise
        return p, d

    def mkdir(self, path, mode: int, umask: int = 0) -> None:
        self._balance()
        p, d = self._create_prepare(path, is_dir=True)
        try:
            if self.s_max_links and d.i_nlink >= self.s_max_links:
                raise _err(_errno.EMLINK, "too many links", p.path)
            d.i_op.mkdir(d, p.name, _stat.S_IFDIR | (mode & 0o1777 & ~umask))
        finally:
            self._unlock(d)

    def symlink(self, target, path) -> None:
        target = fspath(target)
        _check_path(target)
        self._balance()
        p, d = self._create_prepare(path, is_dir=False)
        try:
            d.i_op.symlink(d, p.name, target)
        finally:
            self._unlock(d)

    def link(self, src, dst, follow_symlinks: bool = False) -> None:
        """``linkat``: ``follow_symlinks`` is AT_SYMLINK_FOLLOW (``link(2)`` does not follow)."""
        self._balance()
        inode = self.lookup_path(src, follow=follow_symlinks)
        p, d = self._create_prepare(dst, is_dir=False)
        try:
            if _is_dir(inode):
                raise PermissionDeniedError(_errno.EPERM, "hard link to a directory", fspath(src))
            self._lock(inode, I_MUTEX_NORMAL)
            try:
                if inode.i_nlink == 0:
                    raise NotFoundError(_errno.ENOENT, "source was unlinked", fspath(src))
                if self.s_max_links and inode.i_nlink >= self.s_max_links:
                    raise _err(_errno.EMLINK, "too many links", fspath(src))
                d.i_op.link(inode, d, p.name)
            finally:
                self._unlock(inode)
        finally:
            self._unlock(d)

    # -- removal ---------------------------------------------------------------------------
    def unlink(self, path) -> None:
        self._balance()
        p = self.parent(path)
        if p.type != LAST_NORM:
            raise IsADirError(_errno.EISDIR, "is a directory", p.path)
        self.want_write(p.path)
        d = p.dir
        victim = None
        self._lock(d, I_MUTEX_PARENT)
        try:
            victim = self._lookup_locked(d, p.name)
            if victim is None:
                raise NotFoundError(_errno.ENOENT, "no such file or directory", p.path)
            if _is_dir(victim):
                raise IsADirError(_errno.EISDIR, "is a directory", p.path)
            if p.trailing:
                raise NotADirError(_errno.ENOTDIR, "not a directory", p.path)
            self._lock(victim, I_MUTEX_NORMAL)
            try:
                d.i_op.unlink(d, p.name, victim)
            finally:
                self._unlock(victim)
        finally:
            self._unlock(d)
        self._evict_if_unused(victim)

    def rmdir(self, path) -> None:
        self._balance()
        p = self.parent(path)
        if p.type == LAST_DOTDOT:
            raise NotEmptyError(_errno.ENOTEMPTY, "directory not empty", p.path)
        if p.type == LAST_DOT:
            raise InvalidError(_errno.EINVAL, "invalid argument", p.path)
        if p.type == LAST_ROOT:
            raise _err(_errno.EBUSY, "device or resource busy", p.path)
        self.want_write(p.path)
        d = p.dir
        self._lock(d, I_MUTEX_PARENT)
        try:
            victim = self._lookup_locked(d, p.name)
            if victim is None:
                raise NotFoundError(_errno.ENOENT, "no such file or directory", p.path)
            if not _is_dir(victim):
                raise NotADirError(_errno.ENOTDIR, "not a directory", p.path)
            self._lock(victim, I_MUTEX_NORMAL)
            try:
                if not self._is_empty_dir(victim):
                    raise NotEmptyError(_errno.ENOTEMPTY, "directory not empty", p.path)
                d.i_op.rmdir(d, p.name, victim)
            finally:
                self._unlock(victim)
        finally:
            self._unlock(d)
        self._evict_if_unused(victim)

    # -- rename ----------------------------------------------------------------------------
    def rename(self, src, dst, flags: int = 0) -> None:
        """``renameat2`` with RENAME_NOREPLACE / RENAME_EXCHANGE (WHITEOUT is not supported:
        EINVAL)."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT):
            raise InvalidError(_errno.EINVAL, "unknown rename flags")
        if (flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)) and (flags & RENAME_EXCHANGE):
            raise InvalidError(_errno.EINVAL, "RENAME_EXCHANGE with NOREPLACE or WHITEOUT")
        if flags & RENAME_WHITEOUT:
            raise InvalidError(_errno.EINVAL, "RENAME_WHITEOUT is not supported")
        exchange = bool(flags & RENAME_EXCHANGE)
        self._balance()
        self.s_vfs_rename_mutex.lock()
        try:
            self._rename_locked(src, dst, flags, exchange)
        finally:
            self.s_vfs_rename_mutex.unlock()

    def _rename_locked(self, src, dst, flags, exchange):
        op = self.parent(src)
        np = self.parent(dst)
        if op.type != LAST_NORM:
            raise _err(_errno.EBUSY, "device or resource busy", op.path)
        if np.type != LAST_NORM:
            if flags & RENAME_NOREPLACE:
                raise ExistsError(_errno.EEXIST, "file exists", np.path)
            raise _err(_errno.EBUSY, "device or resource busy", np.path)
        self.want_write(op.path)
        old_dir, new_dir = op.dir, np.dir
        # lock_rename(): the ancestor first, else a stable order; "trap" is the child of the
        # ancestor on the way to the other parent: moving it there would make a loop.
        trap = None
        if old_dir is new_dir:
            first, second = old_dir, None
        elif any(x is new_dir for x in op.stack):
            i = next(i for i, x in enumerate(op.stack) if x is new_dir)
            trap = op.stack[i + 1]
            first, second = new_dir, old_dir
        elif any(x is old_dir for x in np.stack):
            i = next(i for i, x in enumerate(np.stack) if x is old_dir)
            trap = np.stack[i + 1]
            first, second = old_dir, new_dir
        else:
            first, second = sorted((old_dir, new_dir), key=_key)
        self._lock(first, I_MUTEX_PARENT)
        try:
            if second is not None:
                self._lock(second, I_MUTEX_PARENT2)
            try:
                victim = self._rename_checked(op, np, flags, exchange, trap)
            finally:
                if second is not None:
                    self._unlock(second)
        finally:
            self._unlock(first)
        self._evict_if_unused(victim)

    def _rename_checked(self, op: Parent, np: Parent, flags, exchange, trap):
        old_dir, new_dir = op.dir, np.dir
        source = self._lookup_locked(old_dir, op.name)
        if source is None:
            raise NotFoundError(_errno.ENOENT, "no such file or directory", op.path)
        target = self._lookup_locked(new_dir, np.name)
        if (flags & RENAME_NOREPLACE) and target is not None:
            raise ExistsError(_errno.EEXIST, "file exists", np.path)
        if exchange:
            if target is None:
                raise NotFoundError(_errno.ENOENT, "no such file or directory", np.path)
            if not _is_dir(target) and np.trailing:
                raise NotADirError(_errno.ENOTDIR, "not a directory", np.path)
        is_dir = _is_dir(source)
        if not is_dir:
            if op.trailing or (not exchange and np.trailing):
                raise NotADirError(_errno.ENOTDIR, "not a directory", op.path)
        if source is trap:
            raise InvalidError(_errno.EINVAL, "cannot move a directory under itself", op.path)
        if target is not None and target is trap:
            if exchange:
                raise InvalidError(_errno.EINVAL, "cannot exchange with an ancestor", np.path)
            raise NotEmptyError(_errno.ENOTEMPTY, "directory not empty", np.path)
        # vfs_rename()
        if source is target:
            return None
        self._dead_dir(new_dir, np.path)
        new_is_dir = target is not None and _is_dir(target)
        if target is not None and not exchange:
            # may_delete(new_dir, target, is_dir): the victim must have the source's type
            if is_dir and not new_is_dir:
                raise NotADirError(_errno.ENOTDIR, "not a directory", np.path)
            if not is_dir and new_is_dir:
                raise IsADirError(_errno.EISDIR, "is a directory", np.path)
        ml = self.s_max_links
        if ml and old_dir is not new_dir:
            if is_dir and not new_is_dir and new_dir.i_nlink >= ml:
                raise _err(_errno.EMLINK, "too many links", np.path)
            if exchange and not is_dir and new_is_dir and old_dir.i_nlink >= ml:
                raise _err(_errno.EMLINK, "too many links", op.path)
        children = [source] if target is None else sorted((source, target), key=_key)
        self._lock(children[0], I_MUTEX_NORMAL)
        try:
            if len(children) > 1:
                self._lock(children[1], I_MUTEX_NONDIR2)
            try:
                if (target is not None and not exchange and _is_dir(target)
                        and not self._is_empty_dir(target)):
                    raise NotEmptyError(_errno.ENOTEMPTY, "directory not empty", np.path)
                old_dir.i_op.rename(old_dir, op.name, source, new_dir, np.name, target, flags)
            finally:
                if len(children) > 1:
                    self._unlock(children[1])
        finally:
            self._unlock(children[0])
        return None if exchange else target

    # -- open --------------------------------------------------------------------------------
    def open_inode(self, path, flags: int, mode: int, umask: int = 0):
        """``path_openat`` up to ``may_open`` and O_TRUNC.  Returns ``(inode, created)``.

        The caller builds the File, calls ``i_fop.open`` and installs the descriptor.
        """
        if flags & _O_TMPFILE == _O_TMPFILE:
            raise from_errno(_errno.EOPNOTSUPP, "O_TMPFILE is not supported")
        creat = bool(flags & os.O_CREAT)
        if creat and flags & os.O_DIRECTORY:
            raise InvalidError(_errno.EINVAL, "O_CREAT with O_DIRECTORY")
        excl = creat and bool(flags & os.O_EXCL)
        # O_EXCL implies O_NOFOLLOW (build_open_flags)
        follow = not (flags & os.O_NOFOLLOW) and not excl
        acc = flags & _O_ACCMODE
        want_write = acc in (os.O_WRONLY, os.O_RDWR) or bool(flags & os.O_TRUNC)
        self._balance()
        nd = _Walk()
        p = self.parent(path, nd)
        directory = bool(flags & os.O_DIRECTORY)
        inode, created = self._open_last(p, flags, mode, umask, creat, excl, follow, nd)
        directory = directory or p.trailing
        # do_open()
        if excl and not created:
            raise ExistsError(_errno.EEXIST, "file exists", p.path)
        if creat and _is_dir(inode):
            raise IsADirError(_errno.EISDIR, "is a directory", p.path)
        if directory and not _is_dir(inode):
            raise NotADirError(_errno.ENOTDIR, "not a directory", p.path)
        if created:
            return inode, True
        # may_open()
        if _is_lnk(inode):
            raise _err(_errno.ELOOP, "too many levels of symbolic links", p.path)
        if _is_dir(inode) and want_write:
            raise IsADirError(_errno.EISDIR, "is a directory", p.path)
        if want_write:
            self.want_write(p.path)
        if flags & os.O_TRUNC and _stat.S_ISREG(inode.i_mode):
            self.truncate_inode(inode, 0)
        return inode, False

    def _open_last(self, p: Parent, flags, mode, umask, creat, excl, follow, nd):
        """``open_last_lookups``: returns (inode, created); follows a final symlink (also when
        creating: a dangling link creates its target)."""
        if p.type != LAST_NORM:
            return self._last(p, True, nd)[-1], False
        if not creat:
            return self._last(p, follow, nd)[-1], False
        if p.trailing:
            raise IsADirError(_errno.EISDIR, "is a directory", p.path)
        d = p.dir
        self._lock(d, I_MUTEX_PARENT)
        try:
            inode = self._lookup_locked(d, p.name)
            if inode is None:
                self.want_write(p.path)
                self._dead_dir(d, p.path)
                inode = d.i_op.create(d, p.name, _stat.S_IFREG | (mode & 0o7777 & ~umask))
                return inode, True
        finally:
            self._unlock(d)
        if _is_lnk(inode) and follow:
            q = self._follow(inode, p.stack, nd)
            return self._open_last(q, flags, mode, umask, creat, excl, follow, nd)
        return inode, False

    # -- attributes ---------------------------------------------------------------------------
    def setattr(self, inode, attrs: Iattr, path=None) -> None:
        """``notify_change``: EROFS, ctime, then ``i_op.setattr`` under ``i_rwsem``."""
        self.want_write(path)
        if attrs.ctime_ns is None:
            attrs.ctime_ns = _now_ns()
        self._lock(inode, I_MUTEX_NORMAL)
        try:
            inode.i_op.setattr(inode, attrs)
        finally:
            self._unlock(inode)

    def truncate_inode(self, inode, length: int, path=None) -> None:
        """``do_truncate`` on a regular file (checks done by the caller except EFBIG)."""
        if length > self.s_maxbytes:
            raise FileTooBigError(_errno.EFBIG, "file too large", path)
        now = _now_ns()
        self.setattr(inode, Iattr(size=length, mtime_ns=now, ctime_ns=now), path)

    def truncate(self, path, length: int) -> None:
        """``truncate(2)``."""
        if length < 0:
            raise InvalidError(_errno.EINVAL, "negative length")
        inode = self.lookup_path(path, follow=True)
        if _is_dir(inode):
            raise IsADirError(_errno.EISDIR, "is a directory", fspath(path))
        if not _stat.S_ISREG(inode.i_mode):
            raise InvalidError(_errno.EINVAL, "not a regular file", fspath(path))
        self.want_write(fspath(path))
        self.truncate_inode(inode, length, fspath(path))

    def readlink(self, path) -> str:
        inode = self.lookup_path(path, follow=False)
        if not _is_lnk(inode):
            raise InvalidError(_errno.EINVAL, "not a symbolic link", fspath(path))
        return self._readlink(inode)

    # -- xattrs ------------------------------------------------------------------------------
    # Order (fs/xattr.c): the name (ERANGE), flags (EINVAL) and size (E2BIG) are checked when
    # copied in, before the path walk; then EROFS, then xattr_permission (EPERM/ENODATA for
    # user.* on what is not a file or directory), then the namespace (EOPNOTSUPP, or EINVAL for
    # a bare prefix), then the filesystem.
    _XATTR_PREFIXES = ("user.", "trusted.", "security.", "system.")

    @staticmethod
    def xattr_import(name) -> str:
        """``import_xattr_name``: ERANGE for an empty name or one over 255 bytes."""
        name = fspath(name)
        n = len(os.fsencode(name))
        if n == 0 or n > ops.XATTR_NAME_MAX:
            raise _err(_errno.ERANGE, "invalid xattr name length")
        return name

    @classmethod
    def setxattr_import(cls, name, value, flags: int) -> tuple:
        """``setxattr_copy``: EINVAL for unknown flags, ERANGE, E2BIG over 64 KiB."""
        if flags & ~(ops.XATTR_CREATE | ops.XATTR_REPLACE):
            raise InvalidError(_errno.EINVAL, "unknown setxattr flags")
        name = cls.xattr_import(name)
        value = bytes(value)
        if len(value) > ops.XATTR_SIZE_MAX:
            raise _err(_errno.E2BIG, "xattr value too large")
        return name, value

    @classmethod
    def _xattr_resolve(cls, name: str) -> None:
        """``xattr_resolve_name``: EOPNOTSUPP for an unknown namespace, EINVAL for a bare one."""
        for pre in cls._XATTR_PREFIXES:
            if name.startswith(pre):
                if name == pre:
                    raise InvalidError(_errno.EINVAL, "empty xattr name after the namespace")
                return
        raise from_errno(_errno.EOPNOTSUPP, "unknown xattr namespace")

    @staticmethod
    def _xattr_permission(inode, name: str, write: bool) -> None:
        """``xattr_permission``: user.* only on regular files and directories."""
        if name.startswith("user.") and not (_stat.S_ISREG(inode.i_mode) or _is_dir(inode)):
            if write:
                raise PermissionDeniedError(_errno.EPERM, "user xattrs only on files and dirs")
            raise _err(_errno.ENODATA, "no data available")

    def getxattr(self, inode, name) -> bytes:
        name = self.xattr_import(name)
        self._xattr_permission(inode, name, False)
        self._xattr_resolve(name)
        inode.i_rwsem.down_read()
        try:
            return bytes(inode.i_op.getxattr(inode, name))
        finally:
            inode.i_rwsem.up_read()

    def listxattr(self, inode) -> list:
        inode.i_rwsem.down_read()
        try:
            return list(inode.i_op.listxattr(inode))
        finally:
            inode.i_rwsem.up_read()

    def setxattr(self, inode, name, value, flags: int = 0, path=None) -> None:
        name, value = self.setxattr_import(name, value, flags)
        self.want_write(path)
        self._xattr_permission(inode, name, True)
        self._xattr_resolve(name)
        self._lock(inode, I_MUTEX_NORMAL)
        try:
            if flags & (ops.XATTR_CREATE | ops.XATTR_REPLACE):
                try:
                    inode.i_op.getxattr(inode, name)
                    exists = True
                except OSError as e:
                    if e.errno != _errno.ENODATA:
                        raise
                    exists = False
                if flags & ops.XATTR_CREATE and exists:
                    raise ExistsError(_errno.EEXIST, "xattr exists")
                if flags & ops.XATTR_REPLACE and not exists:
                    raise _err(_errno.ENODATA, "no data available")
            inode.i_op.setxattr(inode, name, value, flags)
            inode.i_ctime_ns = _now_ns()
        finally:
            self._unlock(inode)

    def removexattr(self, inode, name, path=None) -> None:
        name = self.xattr_import(name)
        self.want_write(path)
        self._xattr_permission(inode, name, True)
        self._xattr_resolve(name)
        self._lock(inode, I_MUTEX_NORMAL)
        try:
            inode.i_op.removexattr(inode, name)
            inode.i_ctime_ns = _now_ns()
        finally:
            self._unlock(inode)

    # -- directories ---------------------------------------------------------------------------
    def readdir(self, dir) -> list:
        """All ``(name, ino, d_type)`` entries of ``dir`` but ``.`` and ``..`` (``getdents``)."""
        if not _is_dir(dir):
            raise NotADirError(_errno.ENOTDIR, "not a directory")
        dir.i_rwsem.down_read()
        try:
            return [(n, ino, t) for n, ino, t, _pos in dir.i_op.readdir(dir, 0)
                    if n not in (".", "..")]
        finally:
            dir.i_rwsem.up_read()


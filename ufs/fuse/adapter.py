"""The FUSE adapter: a mounted :class:`ufs.api.Filesystem` served through pyfuse3 (libfuse 3).

Layer: top (beside ``ufs.cli``).  Imports ``ufs.api`` (the Filesystem), ``ufs.vfs.ops``
(Iattr), ``ufs.errors`` and, lazily, ``pyfuse3``/``trio``.  Personalities are reached only
through the Filesystem and its Namei (the generic VFS rules live there, never here).

What it owns: the translation of the kernel's inode-based requests to the VFS.
- Inode numbers: FUSE's root is inode 1; every other FUSE inode is the filesystem's own
  inode number (the one ``stat`` shows), except that a filesystem inode numbered 1 that is
  not the root takes the root's number (a swap, so the map stays a bijection).
- Names: the kernel only names inodes it looked up.  For each looked-up inode the adapter
  keeps the (parent, name) pairs it was seen under, so a path can be rebuilt for the
  namespace operations of the VFS (which are path based and run Linux's checks in Linux's
  order).  A directory has one pair, so a path built from the pairs up to the root is the
  current one even after an ancestor was renamed.  Attribute, xattr and data requests use
  the VFS inode object directly (no path walk).
- Lookup counts: ``lookup``/``create``/``mkdir``/``symlink``/``link`` and each readdirplus
  entry add one; ``forget`` drops them; at zero the adapter forgets the inode (the root is
  never forgotten).
- Open files: a FUSE file handle is a ufs descriptor of the Filesystem.  An ``O_DIRECT``
  open keeps ``O_DIRECT`` on the ufs descriptor (the ufs DIO engine serves it) and sets
  ``direct_io`` so the kernel sends each I/O as issued, bypassing its page cache; other opens
  go through the personality's buffered path.
- Space and data-range requests (``fallocate``, ``lseek`` SEEK_DATA/SEEK_HOLE,
  ``copy_file_range``) run on the open descriptors through the public Filesystem calls.  Only
  the native engine delivers them: pyfuse3 3.x has no hooks for them, so under the pyfuse3
  engine the kernel keeps its own answers (EOPNOTSUPP for fallocate, "the whole file is data"
  for SEEK_DATA/SEEK_HOLE, a read/write copy for copy_file_range).

Errors: an ``OSError`` becomes ``FUSEError(errno)`` (the library already gives Linux's
errno).  Anything else is logged with its traceback and becomes EIO; the mount keeps serving.

Concurrency: pyfuse3 runs on trio with several tasks reading requests; every filesystem call
runs in a worker thread (``trio.to_thread.run_sync``) bounded by a ``CapacityLimiter`` so
several requests are in flight at once (the Filesystem is thread-safe).  ``_lock`` (a leaf,
never held across a filesystem call) guards the inode/name tables.  The native engine
(``ufs.fuse.native``) reuses these handlers unchanged but runs them inline in libfuse's
worker threads (its ``_run`` calls the filesystem directly), so handler bodies may run in
several threads at once: every shared table is changed under ``_lock`` only.
"""
from __future__ import annotations

import errno as _errno
import functools
import logging
import os
import stat as _stat
import threading

import pyfuse3
import trio

from ufs.errors import from_errno
from ufs.vfs.ops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Iattr,
)

__all__ = ["ROOT_ID", "UfsOperations"]

log = logging.getLogger("ufs.fuse")

ROOT_ID = pyfuse3.ROOT_INODE

#: how long the kernel may cache attributes and names (seconds): every change goes through
#: this mount, so a short cache is coherent and saves most getattr/lookup round trips
ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0

#: the fallocate modes the kernel's FUSE client forwards (fuse_file_fallocate answers
#: EOPNOTSUPP for any other bit itself)
FUSE_FALLOC_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
#: copy_file_range moves data in pieces of this size (bounded memory per request)
COPY_CHUNK = 1 << 20
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20)


def _acl_equiv_mode(value: bytes) -> int | None:
    """The permission bits a POSIX access ACL (xattr form: u32 version 2, then (u16 tag,
    u16 perm, u32 id) entries) is equivalent to, or None if it has named entries or is
    malformed."""
    if len(value) < 4 or (len(value) - 4) % 8 or int.from_bytes(value[:4], "little") != 2:
        return None
    perms = {}
    for off in range(4, len(value), 8):
        tag = int.from_bytes(value[off:off + 2], "little")
        perm = int.from_bytes(value[off + 2:off + 4], "little")
        if tag in (_ACL_USER, _ACL_GROUP) or tag in perms or perm & ~7:
            return None
        perms[tag] = perm
    if not all(t in perms for t in (_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_OTHER)):
        return None
    group = perms.get(_ACL_MASK, perms[_ACL_GROUP_OBJ])
    return perms[_ACL_USER_OBJ] << 6 | group << 3 | perms[_ACL_OTHER]


class _Node:
    """What the adapter knows about one kernel-visible inode."""

    __slots__ = ("fino", "inode", "names", "nlookup")

    def __init__(self, fino: int, inode):
        self.fino = fino
        self.inode = inode
        self.names: set = set()        # {(parent fino, name str)}
        self.nlookup = 0


class UfsOperations(pyfuse3.Operations):
    """pyfuse3 request handlers over a mounted :class:`ufs.api.Filesystem`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs, *, max_threads: int = 32):
        super().__init__()
        self.fs = fs
        self.namei = fs.namei
        self._root_ino = fs.sb.s_op.root_ino
        self._lock = threading.Lock()
        self._nodes: dict[int, _Node] = {}
        self._dentries: dict[tuple, int] = {}       # (parent fino, name) -> fino
        self._dirs: dict[int, tuple] = {}           # opendir handle -> (dir fino, entries)
        self._next_dirh = 1
        self._limiter = trio.CapacityLimiter(max_threads)
        self.requests_failed = 0
        self.inflight = 0              # filesystem calls running now (trio thread: no lock)
        self.max_inflight = 0
        root = self.namei.root()
        node = _Node(ROOT_ID, root)
        node.nlookup = 1
        self._nodes[ROOT_ID] = node

    # -- plumbing ------------------------------------------------------------------------------
    async def _run(self, fn, *args):
        """Run a blocking call in a worker thread; map its errors to FUSEError."""
        self.inflight += 1
        if self.inflight > self.max_inflight:
            self.max_inflight = self.inflight
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            code = e.errno if isinstance(e.errno, int) and e.errno > 0 else _errno.EIO
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            self.requests_failed += 1
            log.exception("unexpected error in %s; answering EIO", getattr(fn, "__name__", fn))
            raise pyfuse3.FUSEError(_errno.EIO) from None
        finally:
            self.inflight -= 1

    def _fino(self, ino: int) -> int:
        if ino == self._root_ino:
            return ROOT_ID
        if ino == ROOT_ID:
            return self._root_ino
        return ino

    def _node(self, fino: int) -> _Node:
        node = self._nodes.get(fino)
        if node is None:
            raise pyfuse3.FUSEError(_errno.ESTALE)
        return node

    def _path(self, fino: int, depth: int = 0) -> str:
        if fino == ROOT_ID:
            return "/"
        if depth > 4096:
            raise pyfuse3.FUSEError(_errno.ELOOP)
        with self._lock:
            node = self._nodes.get(fino)
            pair = next(iter(node.names), None) if node is not None else None
        if pair is None:
            raise pyfuse3.FUSEError(_errno.ESTALE)
        parent, name = pair
        base = self._path(parent, depth + 1)
        return base + name if base == "/" else base + "/" + name

    def _child(self, parent: int, name: str) -> str:
        base = self._path(parent)
        return base + name if base == "/" else base + "/" + name

    def _remember(self, parent: int, name: str, inode, count: int = 1) -> _Node:
        """Record that the kernel now knows ``name`` in ``parent`` as ``inode``."""
        fino = self._fino(inode.i_ino)
        with self._lock:
            node = self._nodes.get(fino)
            if node is None or node.inode is not inode:
                old = node
                node = _Node(fino, inode)
                if old is not None:
                    # same number, new object (the old one was evicted): keep the counts
                    node.nlookup = old.nlookup
                    node.names = old.names
                self._nodes[fino] = node
            prev = self._dentries.get((parent, name))
            if prev is not None and prev != fino:
                pn = self._nodes.get(prev)
                if pn is not None:
                    pn.names.discard((parent, name))
            self._dentries[(parent, name)] = fino
            node.names.add((parent, name))
            node.nlookup += count
        return node

    def _drop_name(self, parent: int, name: str) -> None:
        with self._lock:
            fino = self._dentries.pop((parent, name), None)
            if fino is not None:
                node = self._nodes.get(fino)
                if node is not None:
                    node.names.discard((parent, name))

    def _attrs(self, inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._fino(inode.i_ino)
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = inode.i_mode
        a.st_nlink = inode.i_nlink
        a.st_uid = inode.i_uid
        a.st_gid = inode.i_gid
        a.st_rdev = getattr(inode, "i_rdev", 0)
        a.st_size = inode.i_size
        a.st_blksize = self.fs.sb.s_blocksize
        a.st_blocks = getattr(inode, "i_blocks", 0)
        a.st_atime_ns = inode.i_atime_ns
        a.st_mtime_ns = inode.i_mtime_ns
        a.st_ctime_ns = inode.i_ctime_ns
        return a

    def _own(self, path: str, inode, ctx) -> None:
        """New inodes belong to the caller (the VFS creates them as the daemon's user)."""
        if ctx is None:
            return
        if inode.i_uid != ctx.uid or inode.i_gid != ctx.gid:
            self.fs.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)

    # -- lookups and attributes ----------------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        name = os.fsdecode(name)
        dir = self._node(parent_inode).inode

        def do():
            if name == ".":
                return dir
            if name == "..":
                return self.namei.lookup_path(self._path(parent_inode) + "/..", follow=False)
            if not _stat.S_ISDIR(dir.i_mode):
                raise pyfuse3.FUSEError(_errno.ENOTDIR)
            return self.namei.lookup_child(dir, name)

        inode = await self._run(do)
        if inode is None:
            # a negative entry the kernel may cache for ENTRY_TIMEOUT
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = ENTRY_TIMEOUT
            return a
        if name not in (".", ".."):
            self._remember(parent_inode, name, inode)
        else:
            with self._lock:
                n = self._nodes.get(self._fino(inode.i_ino))
                if n is None:
                    raise pyfuse3.FUSEError(_errno.ESTALE)
                n.nlookup += 1
        return self._attrs(inode)

    async def forget(self, inode_list):
        with self._lock:
            for fino, count in inode_list:
                node = self._nodes.get(fino)
                if node is None or fino == ROOT_ID:
                    continue
                node.nlookup -= count
                if node.nlookup <= 0:
                    for pair in node.names:
                        if self._dentries.get(pair) == fino:
                            del self._dentries[pair]
                    del self._nodes[fino]

    async def getattr(self, inode, ctx=None):
        return self._attrs(self._node(inode).inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)

        def do():
            ino = node.inode
            if fields.update_size:
                if fh is not None:
                    self.fs.ftruncate(fh, attr.st_size)
                else:
                    if _stat.S_ISDIR(ino.i_mode):
                        raise IsADirectoryError(_errno.EISDIR, "is a directory")
                    self.namei.truncate_inode(ino, attr.st_size)
            ia = Iattr()
            if fields.update_mode:
                ia.mode = _stat.S_IMODE(attr.st_mode)
            if fields.update_uid:
                ia.uid = attr.st_uid
            if fields.update_gid:
                ia.gid = attr.st_gid
            if fields.update_atime:
                ia.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                ia.mtime_ns = attr.st_mtime_ns
            if fields.update_ctime:
                ia.ctime_ns = attr.st_ctime_ns
            if any(v is not None for v in (ia.mode, ia.uid, ia.gid, ia.atime_ns, ia.mtime_ns,
                                          ia.ctime_ns)):
                self.namei.setattr(ino, ia)
            return ino

        return self._attrs(await self._run(do))

    async def readlink(self, inode, ctx):
        ino = self._node(inode).inode
        return os.fsencode(await self._run(self.namei._readlink, ino))

    async def statfs(self, ctx):
        st = await self._run(self.fs.statvfs)
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        s.f_files = st.f_files
        s.f_ffree = st.f_ffree
        s.f_favail = st.f_favail
        s.f_namemax = st.f_namemax
        return s

    # -- directories ---------------------------------------------------------------------------
    async def opendir(self, inode, ctx):
        dir = self._node(inode).inode
        entries = await self._run(self.namei.readdir, dir)
        with self._lock:
            fh = self._next_dirh
            self._next_dirh += 1
            self._dirs[fh] = (inode, entries)
        return fh

    async def readdir(self, fh, start_id, token):
        parent, entries = self._dirs[fh]
        iget = self.fs.sb.s_op.iget
        for i in range(start_id, len(entries)):
            name, ino, _dtype = entries[i]
            try:
                inode = await self._run(iget, ino)
            except pyfuse3.FUSEError:
                continue            # removed since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(inode), i + 1):
                break
            self._remember(parent, name, inode)

    async def releasedir(self, fh):
        with self._lock:
            self._dirs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        await self._run(self.fs.sync)

    async def mkdir(self, parent_inode, name, mode, ctx):
        name = os.fsdecode(name)

        def do():
            path = self._child(parent_inode, name)
            self.fs.mkdir(path, _stat.S_IMODE(mode))
            inode = self.namei.lookup_path(path, follow=False)
            self._own(path, inode, ctx)
            return inode

        inode = await self._run(do)
        self._remember(parent_inode, name, inode)
        return self._attrs(inode)

    async def rmdir(self, parent_inode, name, ctx):
        name = os.fsdecode(name)
        await self._run(lambda: self.fs.rmdir(self._child(parent_inode, name)))
        self._drop_name(parent_inode, name)

    async def unlink(self, parent_inode, name, ctx):
        name = os.fsdecode(name)
        await self._run(lambda: self.fs.unlink(self._child(parent_inode, name)))
        self._drop_name(parent_inode, name)

    async def symlink(self, parent_inode, name, target, ctx):
        name = os.fsdecode(name)
        target = os.fsdecode(target)

        def do():
            path = self._child(parent_inode, name)
            self.fs.symlink(target, path)
            inode = self.namei.lookup_path(path, follow=False)
            self._own(path, inode, ctx)
            return inode

        inode = await self._run(do)
        self._remember(parent_inode, name, inode)
        return self._attrs(inode)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        new_name = os.fsdecode(new_name)

        def do():
            dst = self._child(new_parent_inode, new_name)
            self.fs.link(self._path(inode), dst)
            return self.namei.lookup_path(dst, follow=False)

        ino = await self._run(do)
        self._remember(new_parent_inode, new_name, ino)
        return self._attrs(ino)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        name_old = os.fsdecode(name_old)
        name_new = os.fsdecode(name_new)
        await self._run(lambda: self.fs.rename(self._child(parent_inode_old, name_old),
                                               self._child(parent_inode_new, name_new), flags))
        old_key, new_key = (parent_inode_old, name_old), (parent_inode_new, name_new)
        with self._lock:
            moved = self._dentries.pop(old_key, None)
            target = self._dentries.pop(new_key, None)
            if target is not None and target in self._nodes:
                self._nodes[target].names.discard(new_key)
            if moved is not None and moved in self._nodes:
                self._nodes[moved].names.discard(old_key)
                self._nodes[moved].names.add(new_key)
                self._dentries[new_key] = moved
            if flags & pyfuse3.RENAME_EXCHANGE and target is not None and target in self._nodes:
                self._nodes[target].names.add(old_key)
                self._dentries[old_key] = target

    # -- files ---------------------------------------------------------------------------------
    @staticmethod
    def _open_flags(flags: int) -> int:
        # O_CREAT/O_EXCL were decided by the kernel (create) and O_TRUNC arrives as a setattr
        return flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC)

    def _fileinfo(self, fd: int, flags: int) -> pyfuse3.FileInfo:
        fi = pyfuse3.FileInfo()
        fi.fh = fd
        if flags & os.O_DIRECT:
            fi.direct_io = True
        else:
            fi.keep_cache = False
        return fi

    async def open(self, inode, flags, ctx):
        node = self._node(inode)

        def do():
            fl = self._open_flags(flags)
            try:
                path = self._path(inode)
            except pyfuse3.FUSEError:
                path = None
            if path is None:
                raise OSError(_errno.ESTALE, "inode has no name")
            fd = self.fs.open(path, fl)
            if self.fs.fdtable.get(fd).f_inode is not node.inode:
                # the name now points elsewhere (raced with a rename): refuse rather than
                # open the wrong file
                self.fs.close(fd)
                raise OSError(_errno.ESTALE, "name changed during open")
            if flags & os.O_TRUNC and _stat.S_ISREG(node.inode.i_mode):
                self.fs.ftruncate(fd, 0)
            return fd

        return self._fileinfo(await self._run(do), flags)

    async def create(self, parent_inode, name, mode, flags, ctx):
        name = os.fsdecode(name)

        def do():
            path = self._child(parent_inode, name)
            fd = self.fs.open(path, (flags | os.O_CREAT) & ~os.O_NOCTTY, _stat.S_IMODE(mode))
            try:
                inode = self.fs.fdtable.get(fd).f_inode
                self._own(path, inode, ctx)
            except BaseException:
                self.fs.close(fd)
                raise
            return fd, inode

        fd, inode = await self._run(do)
        self._remember(parent_inode, name, inode)
        return self._fileinfo(fd, flags), self._attrs(inode)

    async def read(self, fh, off, size):
        return await self._run(self.fs.pread, fh, size, off)

    async def write(self, fh, off, buf):
        return await self._run(self.fs.pwrite, fh, buf, off)

    async def flush(self, fh):
        # close(2) of one descriptor: nothing to write back beyond what fsync promises
        return None

    async def release(self, fh):
        await self._run(self.fs.close, fh)

    async def fsync(self, fh, datasync):
        await self._run(self.fs.fdatasync if datasync else self.fs.fsync, fh)

    # -- space and data ranges (native engine only: pyfuse3 3.x has no such hooks) ------------
    async def fallocate(self, fh, mode, offset, length):
        """``fallocate(2)`` on the open descriptor.  The kernel forwards only KEEP_SIZE,
        PUNCH_HOLE and ZERO_RANGE; anything else is answered EOPNOTSUPP here as the kernel's
        FUSE client would, before the library sees it."""
        if mode & ~FUSE_FALLOC_MODES:
            raise pyfuse3.FUSEError(_errno.EOPNOTSUPP)
        await self._run(self.fs.fallocate, fh, mode, offset, length)

    async def lseek(self, fh, offset, whence):
        """SEEK_DATA/SEEK_HOLE (the only whence the kernel sends; ENXIO at or past EOF as the
        library says).  The ufs descriptor's own position moves too: nothing uses it (every
        read and write of the adapter is positional)."""
        if whence not in (_SEEK_DATA, _SEEK_HOLE):
            raise pyfuse3.FUSEError(_errno.EINVAL)
        return await self._run(self.fs.lseek, fh, offset, whence)

    async def copy_file_range(self, fh_in, off_in, fh_out, off_out, length, flags):
        """Copy up to ``length`` bytes from ``fh_in`` at ``off_in`` to ``fh_out`` at
        ``off_out``; returns the bytes copied (short at the source's EOF)."""
        if flags:
            raise pyfuse3.FUSEError(_errno.EINVAL)
        return await self._run(self._copy_range, fh_in, off_in, fh_out, off_out, length)

    def _copy_range(self, fd_in, off_in, fd_out, off_out, length) -> int:
        """The copy, in COPY_CHUNK pieces of pread + pwrite.

        The kernel already ran generic_copy_file_checks (regular files, access modes, no
        O_APPEND, no overlap within one file, clamped to the source's EOF); they are repeated
        cheaply so a direct caller gets Linux's errno too.  O_DIRECT descriptors: a piece that
        is not block aligned is read as the aligned range around it and cut, and written
        through a buffered descriptor of the same inode (as the kernel copies through the
        page cache whatever the open flags), so any range works as on a local filesystem.
        An error after some bytes were copied ends the copy short (what was copied counts).
        """
        fdt = self.fs.fdtable
        fin, fout = fdt.get(fd_in), fdt.get(fd_out)
        src, dst = fin.f_inode, fout.f_inode
        if _stat.S_ISDIR(src.i_mode) or _stat.S_ISDIR(dst.i_mode):
            raise from_errno(_errno.EISDIR, "is a directory")
        if not _stat.S_ISREG(src.i_mode) or not _stat.S_ISREG(dst.i_mode):
            raise from_errno(_errno.EINVAL, "not a regular file")
        if not fin.readable or not fout.writable or fout.f_flags & os.O_APPEND:
            raise from_errno(_errno.EBADF, "bad descriptor for copy_file_range")
        if off_in < 0 or off_out < 0 or length < 0:
            raise from_errno(_errno.EINVAL, "negative offset or length")
        if src is dst and off_out + length > off_in and off_out < off_in + length:
            raise from_errno(_errno.EINVAL, "overlapping ranges in one file")
        bs = self.fs.sb.s_blocksize
        in_direct = bool(fin.f_flags & os.O_DIRECT)
        out_direct = bool(fout.f_flags & os.O_DIRECT)
        shadow = None
        done = 0
        try:
            while done < length:
                want = min(COPY_CHUNK, length - done)
                pos_in, pos_out = off_in + done, off_out + done
                try:
                    if in_direct and (pos_in | want) % bs:
                        a = pos_in - pos_in % bs
                        b = -(-(pos_in + want) // bs) * bs
                        data = self.fs.pread(fd_in, b - a, a)[pos_in - a:pos_in - a + want]
                    else:
                        data = self.fs.pread(fd_in, want, pos_in)
                    if not data:
                        break
                    wfd = fd_out
                    if out_direct and (pos_out | len(data)) % bs:
                        if shadow is None:
                            shadow = self._buffered_twin(fout)
                        wfd = shadow
                    view = memoryview(data)
                    put = 0
                    while put < len(view):
                        n = self.fs.pwrite(wfd, view[put:], pos_out + put)
                        if n <= 0:
                            raise from_errno(_errno.EIO, "short write")
                        put += n
                except OSError:
                    if done:
                        break           # a short copy, as the kernel returns it
                    raise
                done += len(data)
                if len(data) < want:
                    break               # the source's EOF
        finally:
            if shadow is not None:
                self.fs.close(shadow)
        return done

    def _buffered_twin(self, file) -> int:
        """A buffered (not O_DIRECT) write descriptor of ``file``'s inode, found by the name
        the kernel knows it under.  EOPNOTSUPP when it has none now (unlinked, raced with a
        rename): the kernel's FUSE client then copies through read/write itself."""
        inode = file.f_inode
        try:
            path = self._path(self._fino(inode.i_ino))
        except pyfuse3.FUSEError:
            path = None
        if path is None:
            raise from_errno(_errno.EOPNOTSUPP, "no name to reopen the destination by")
        keep = file.f_flags & (os.O_DSYNC | os.O_SYNC)
        fd = self.fs.open(path, os.O_WRONLY | keep)
        if self.fs.fdtable.get(fd).f_inode is not inode:
            self.fs.close(fd)
            raise from_errno(_errno.EOPNOTSUPP, "destination renamed during copy_file_range")
        return fd

    # -- xattrs --------------------------------------------------------------------------------
    async def getxattr(self, inode, name, ctx):
        ino = self._node(inode).inode
        name = os.fsdecode(name)
        if name in _ACL_XATTRS:
            raise pyfuse3.FUSEError(_errno.ENODATA)
        return await self._run(self.namei.getxattr, ino, name)

    async def setxattr(self, inode, name, value, ctx):
        ino = self._node(inode).inode
        name = os.fsdecode(name)
        if name in _ACL_XATTRS:
            mode = _acl_equiv_mode(bytes(value)) if name == "system.posix_acl_access" else None
            if mode is None:
                # no ACL support (as a kernel fs mounted noacl): tools fall back to chmod
                raise pyfuse3.FUSEError(_errno.EOPNOTSUPP)
            # an ACL that only restates the mode bits is a chmod (posix_acl_equiv_mode)
            keep = _stat.S_IMODE(ino.i_mode) & ~0o777
            await self._run(self.namei.setattr, ino, Iattr(mode=keep | mode))
            return
        await self._run(self.namei.setxattr, ino, name, bytes(value), 0)

    async def listxattr(self, inode, ctx):
        ino = self._node(inode).inode
        names = await self._run(self.namei.listxattr, ino)
        return [os.fsencode(n) for n in names if n not in _ACL_XATTRS]

    async def removexattr(self, inode, name, ctx):
        ino = self._node(inode).inode
        await self._run(self.namei.removexattr, ino, os.fsdecode(name))


def _guard(name: str, fn):
    """Wrap one request handler: its own (non-threaded) code must not kill the mount either
    (pyfuse3 ends the main loop on an exception that is not a FUSEError)."""

    @functools.wraps(fn)
    async def handler(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            code = e.errno if isinstance(e.errno, int) and e.errno > 0 else _errno.EIO
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            self.requests_failed += 1
            log.exception("unexpected error in %s; answering EIO", name)
            raise pyfuse3.FUSEError(_errno.EIO) from None

    return handler


_HANDLERS = ("lookup", "forget", "getattr", "setattr", "readlink", "statfs", "opendir",
             "readdir", "releasedir", "fsyncdir", "mkdir", "rmdir", "unlink", "symlink", "link",
             "rename", "open", "create", "read", "write", "flush", "release", "fsync",
             "fallocate", "lseek", "copy_file_range", "getxattr", "setxattr", "listxattr",
             "removexattr")
for _name in _HANDLERS:
    setattr(UfsOperations, _name, _guard(_name, getattr(UfsOperations, _name)))
del _name

"""The Python half of the native FUSE engine (``-o fuse_engine=native``).

Layer: top (beside ``ufs.fuse.adapter``).  Imports ``ufs.fuse.adapter`` (the request logic is
the adapter's, unchanged), ``ufs.iomap`` (IoMap, MapType, IterFlag for the fast-path map
fetch) and, lazily, the Cython session ``ufs.fuse._lowlevel``.

What it owns:
- :class:`NativeOperations`: the adapter's handlers run synchronously in the libfuse worker
  thread that read the request (no trio, no thread hop).  The adapter's handlers are
  coroutines that only ever await ``_run``; here ``_run`` calls the filesystem inline, so a
  handler never suspends and :meth:`call` drives it to completion with one ``send``.
- The flat conversions the C side wants (entry tuples, open results, readdir slices).
- readdirplus (``n_readdirplus*``): the entries with attributes; each entry the kernel
  receives counts as one lookup exactly as ``lookup`` counts it (``_remember``), and only
  those (see ``ll_readdirplus``).  The pyfuse3 engine does the same in the adapter's readdir.
- :meth:`NativeOperations.fast_map`: what the C read fast path asks once per extent: the
  file's size and its mapping as the personality's ``iomap_begin`` gives it for a DIO read.

The fast path applies only to regular files opened with ``O_DIRECT`` on personalities listed
in :data:`FASTPATH_FSTYPES` (no per-read data transforms: btrfslike verifies checksums on
every read, so it always takes the slow path) and only while the inode has no page-cache
pages.  Every decision about *whether* bytes may be served from a cached map is made in C
(``_lowlevel.pyx``: generation counter and freeze lock).
"""
from __future__ import annotations

import errno as _errno
import logging
import os
import stat as _stat
import threading
import time
from types import SimpleNamespace

import pyfuse3

from ufs.fuse.adapter import UfsOperations
from ufs.iomap import IoMap, IterFlag, MapType

__all__ = ["FASTPATH_FSTYPES", "NativeOperations", "entry_tuple"]

log = logging.getLogger("ufs.fuse")

#: personalities whose DIO read is "map, then read the device; holes and unwritten read as
#: zeros" with nothing else per read (no checksums, no compression, no inline data in use)
FASTPATH_FSTYPES = frozenset({"xfslike"})

# struct fuse_setattr to_set bits (fuse_lowlevel.h)
SET_MODE, SET_UID, SET_GID, SET_SIZE, SET_ATIME, SET_MTIME = 1, 2, 4, 8, 16, 32
SET_ATIME_NOW, SET_MTIME_NOW, SET_CTIME = 128, 256, 1024


def entry_tuple(a) -> tuple:
    """An ``EntryAttributes`` as the flat tuple the C side copies into ``fuse_entry_param``."""
    return (a.st_ino, a.generation, a.entry_timeout, a.attr_timeout, a.st_mode, a.st_nlink,
            a.st_uid, a.st_gid, a.st_rdev, a.st_size, a.st_blksize, a.st_blocks,
            a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns)


class NativeOperations(UfsOperations):
    """The adapter's handlers, run inline in the libfuse worker threads."""

    def __init__(self, fs, *, fastpath: bool = True):
        super().__init__(fs)
        self._count_lock = threading.Lock()     # leaf: the in-flight counters only
        self.fastpath = bool(fastpath) and fs.fstype in FASTPATH_FSTYPES
        dev = fs.sb.bdev
        self.dev = dev
        fd = getattr(dev, "fd", -1)
        if fd is None or fd < 0 or not getattr(dev, "direct", False):
            self.fastpath = False       # memory/fault devices: no fd to read
        self.dev_fd = fd if self.fastpath else -1
        self.dev_lbs = int(getattr(dev, "logical_block_size", 512) or 512)
        # By default each kernel-reader thread preads the device itself.  With
        # $UFS_FUSE_FAST_ASYNC=1 fast reads are submitted to an io_uring reaper queue whose
        # thread answers them (the reader goes back to /dev/fuse at once): measured no faster
        # on the 2-CPU development VM, so it is opt-in.
        self.fast_queue = None
        if self.fastpath and getattr(dev, "backend", None) == "io_uring" and \
                os.environ.get("UFS_FUSE_FAST_ASYNC") == "1":
            self.fast_queue = dev.new_queue(depth=256, reaper=True)
        self.fast_fetches = 0

    # -- plumbing ------------------------------------------------------------------------------
    async def _run(self, fn, *args):
        """Run a filesystem call inline; map its errors to FUSEError (as the adapter does)."""
        with self._count_lock:
            self.inflight += 1
            if self.inflight > self.max_inflight:
                self.max_inflight = self.inflight
        try:
            return fn(*args)
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
            with self._count_lock:
                self.inflight -= 1

    def call(self, name: str, *args):
        """Run one adapter handler to completion (it never suspends: ``_run`` is inline)."""
        coro = getattr(self, name)(*args)
        try:
            coro.send(None)
        except StopIteration as stop:
            return stop.value
        coro.close()
        raise RuntimeError(f"handler {name} suspended under the native engine")

    @staticmethod
    def ctx(uid: int, gid: int, pid: int, umask: int):
        return SimpleNamespace(uid=uid, gid=gid, pid=pid, umask=umask)

    # -- conversions for the C side --------------------------------------------------------------
    def n_entry(self, name: str, *args) -> tuple:
        return entry_tuple(self.call(name, *args))

    def n_setattr(self, ino, to_set, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, fh,
                  ctx) -> tuple:
        now = time.time_ns()
        attr = SimpleNamespace(st_mode=mode, st_uid=uid, st_gid=gid, st_size=size,
                               st_atime_ns=now if to_set & SET_ATIME_NOW else atime_ns,
                               st_mtime_ns=now if to_set & SET_MTIME_NOW else mtime_ns,
                               st_ctime_ns=ctime_ns)
        fields = SimpleNamespace(update_mode=bool(to_set & SET_MODE),
                                 update_uid=bool(to_set & SET_UID),
                                 update_gid=bool(to_set & SET_GID),
                                 update_size=bool(to_set & SET_SIZE),
                                 update_atime=bool(to_set & (SET_ATIME | SET_ATIME_NOW)),
                                 update_mtime=bool(to_set & (SET_MTIME | SET_MTIME_NOW)),
                                 update_ctime=bool(to_set & SET_CTIME))
        return entry_tuple(self.call("setattr", ino, attr, fields, fh, ctx))

    def _fast_ok(self, fd: int, flags: int) -> bool:
        if not self.fastpath or not flags & os.O_DIRECT:
            return False
        inode = self.fs.fdtable.get(fd).f_inode
        return _stat.S_ISREG(inode.i_mode)

    def n_open(self, ino, flags, ctx) -> tuple:
        fi = self.call("open", ino, flags, ctx)
        return (fi.fh, bool(fi.direct_io), bool(fi.keep_cache), self._fast_ok(fi.fh, flags))

    def n_create(self, parent, name, mode, flags, ctx) -> tuple:
        fi, attrs = self.call("create", parent, name, mode, flags, ctx)
        return (fi.fh, bool(fi.direct_io), bool(fi.keep_cache), self._fast_ok(fi.fh, flags),
                entry_tuple(attrs))

    def n_statfs(self, ctx) -> tuple:
        s = self.call("statfs", ctx)
        return (s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                s.f_favail, s.f_namemax)

    def n_listxattr(self, ino, ctx) -> bytes:
        return b"".join(n + b"\0" for n in self.call("listxattr", ino, ctx))

    def n_readdir(self, fh: int, start: int, max_n: int) -> list:
        """Entries ``start..`` of an open directory as ``(name bytes, fuse ino, d_type,
        next offset)``.  Plain readdir (not readdirplus): no lookup counts change."""
        with self._lock:
            _parent, entries = self._dirs[fh]
        out = []
        for i in range(start, min(len(entries), start + max_n)):
            name, ino, dtype = entries[i]
            out.append((os.fsencode(name), self._fino(ino), int(dtype or 0), i + 1))
        return out

    def n_readdirplus(self, fh: int, start: int, max_n: int) -> list:
        """Entries ``start..`` of an open directory with attributes, as ``(name bytes, entry
        tuple, next offset, key)``; ``key`` goes back to :meth:`n_readdirplus_count` for the
        entries the reply really holds.  Nothing is counted here: the C side decides how many
        fit.  An entry removed since opendir (its inode is gone) is left out."""
        with self._lock:
            _parent, entries = self._dirs[fh]
        iget = self.fs.sb.s_op.iget
        out = []
        i = start
        while i < len(entries) and len(out) < max_n:
            name, ino, _dtype = entries[i]
            i += 1
            try:
                inode = iget(ino)
            except OSError:
                continue
            out.append((os.fsencode(name), entry_tuple(self._attrs(inode)), i, (name, inode)))
        return out

    def n_readdirplus_count(self, fh: int, taken: list) -> None:
        """One lookup for each entry a readdirplus reply holds (as ``lookup`` would count
        it).  All or none: a failure part way takes back what it added."""
        with self._lock:
            parent, _entries = self._dirs[fh]
        done = []
        try:
            for name, inode in taken:
                self._remember(parent, name, inode)
                done.append((name, inode))
        except BaseException:
            self._uncount(done)
            raise

    def n_readdirplus_uncount(self, fh: int, taken: list) -> None:
        """The reply of :meth:`n_readdirplus_count`'s entries was not delivered: the kernel
        never saw them, so take the lookups back (a FORGET of one each)."""
        self._uncount(taken)

    def _uncount(self, taken: list) -> None:
        if taken:
            self.call("forget", [(self._fino(inode.i_ino), 1) for _name, inode in taken])

    # -- the fast path's map fetch -------------------------------------------------------------
    def fast_map(self, fd: int, pos: int, length: int):
        """``(i_size, [(offset, length, type, addr), ...])`` covering ``[pos, min(pos +
        length, i_size))`` as a DIO read would map it, or None when the fast path must not
        serve this file now (page-cache pages, delalloc/inline maps, another device)."""
        self.fast_fetches += 1
        file = self.fs.fdtable.get(fd)
        inode = file.f_inode
        ops = getattr(inode.i_fop, "iomap_ops", None)
        if ops is None or not _stat.S_ISREG(inode.i_mode):
            return None
        sem = inode.i_rwsem
        sem.down_read()
        try:
            if inode.i_mapping.nrpages:
                return None
            size = inode.i_size
            end = min(pos + length, size)
            out = []
            p = pos
            while p < end:
                m = IoMap()
                src = IoMap()
                ops.iomap_begin(inode, p, end - p, IterFlag.DIRECT, m, src)
                try:
                    if m.length <= 0 or m.offset > p or m.offset + m.length <= p:
                        return None
                    if m.type in (MapType.MAPPED, MapType.UNWRITTEN):
                        if m.bdev is not self.dev or m.flags & 0x4:      # MapFlag.SHARED
                            return None
                    elif m.type != MapType.HOLE:
                        return None
                    out.append((m.offset, m.length, int(m.type), m.addr))
                finally:
                    ops.iomap_end(inode, m.offset, m.length, 0, IterFlag.DIRECT, m)
                p = m.offset + m.length
            return size, out
        finally:
            sem.up_read()

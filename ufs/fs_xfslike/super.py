"""The mounted xfslike filesystem: superblock operations, namespace operations, inode life.

Layer: personality.  Imports ``ufs.vfs`` (Superblock, ops contracts), ``ufs.errors`` and this
package (``alloc.Metadata``, ``inode``, ``bmap``, ``dir``, ``file`` for the data path).

Owns:
- :class:`XfsSuper` (its own ``s_op``): ``iget`` (one live object per inode through the VFS
  inode cache of ``ufs.vfs.super``: a weak map plus a bounded LRU, mount option
  ``inode_cache``), the set of inodes with unwritten state (``_dirty``), transactions
  (``trans``: the metadata lock + one journal transaction), inode creation/freeing, the
  unlinked list (orphans, freed at mount), truncation of blocks, ``statfs``, ``sync_fs``,
  ``put_super``;
- :class:`XfsInodeOps` (``inode.i_op``): lookup/create/mkdir/symlink/link/unlink/rmdir/rename/
  readlink/readdir/setattr/xattrs, and fallocate/seek (delegated to ``file.py``).

Inode lifetime: the LRU's reference is only a cache.  State that is not in the log yet is
held by ``_dirty`` (delayed allocation, an unlogged core: ``core_dirty``; dirty pages are also
held by the page cache budget), so an inode leaves memory only once it is clean: then its
core is in the buffer cache/log and ``iget`` decodes the same inode again.  A logged change
needs no pin: it is in the metadata buffers (``read_dinode`` reads them) before the
transaction's lock is released.  The shrinker's test is :meth:`XfsSuper.inode_reclaimable`;
under pressure it calls :meth:`XfsSuper.writeback_inode` (what ``sync_fs`` does per inode).

Every metadata change is one journal transaction (atomic; durable at the next log force,
which fsync/sync_fs/O_DSYNC do).  Big frees (truncate, eviction) run as a sequence of
transactions of a bounded number of extents each, the inode staying consistent between them
(XFS's itruncate loop).

Locks (outermost first): VFS ``i_rwsem`` as ``ufs.vfs.ops`` documents → page-cache locks
(write-back) → ``meta_lock`` (an RLock serialising every metadata transaction and every read of
metadata; never held while calling into the page cache or waiting for data I/O) → the AG
locks / log lock of the foundation → the inode cache's ``_icache_lock`` and ``_dirty_lock``
(leaves).  The inline shrinker (``prune_icache`` from ``iget``/``new_inode``, possibly under
``meta_lock``) only try-locks pages and does no I/O; write-back under pressure
(``balance_icache``) runs from the VFS with no lock held.
"""
from __future__ import annotations

import collections
import errno as _errno
import os
import stat as _stat
import struct
import threading
import time
from contextlib import contextmanager

from ufs.errors import CorruptError, NoSpaceError, NotFoundError, from_errno
from ufs.vfs import ops
from ufs.vfs.ops import InodeOperations, KStatfs, SuperOperations
from ufs.vfs.super import DEFAULT_INODE_CACHE, Superblock

from . import format as fmt
from .bmap import ExtentMap
from .dir import DirState
from .inode import InodeAllocator, XfsInode, dinode_loc

__all__ = ["FREE_BATCH_EXTENTS", "XfsInodeOps", "XfsSuper"]

#: extents freed per transaction by truncate/evict (bounds the transaction's log size)
FREE_BATCH_EXTENTS = 8
#: file blocks past any real offset ("to the end of the file")
BLK_INF = 1 << 62

_XATTR_HDR = struct.Struct("<I")
_XATTR_ENT = struct.Struct("<BH")


def _now() -> int:
    return time.time_ns()


def _ftype(mode: int) -> int:
    return ops.dirent_type(mode)


class XfsSuper(Superblock, SuperOperations):
    """A mounted xfslike filesystem (``sb.s_op`` is itself)."""

    def __init__(self, dev, md, options=None, readonly=False):
        super().__init__(dev, md.sb.block_size, name=getattr(dev, "path", None) or "xfslike",
                         inode_cache=(options or {}).get("inode_cache") or DEFAULT_INODE_CACHE)
        from .file import (  # the data path needs the Cython engine
            XfsFileOps,
            XfsWritebackOps,
        )
        self.s_op = self
        self.vsb = self
        self.dev = dev
        self.md = md
        self.options = dict(options or {})
        self.readonly = readonly
        self.block_size = md.sb.block_size
        self.blkbits = self.block_size.bit_length() - 1
        self.inode_size = md.sb.inode_size
        self.ipb = self.block_size // self.inode_size
        self.s_maxbytes = min(ops.MAX_LFS_FILESIZE, (BLK_INF // 4) * self.block_size)
        self.s_max_links = 0xFFFF_FFFF
        self.s_dev = 0
        self.meta_lock = threading.RLock()
        self.ialloc = InodeAllocator(self)
        self.iops = XfsInodeOps(self)
        self.fops = XfsFileOps(self)
        self.wb_ops = XfsWritebackOps(self)
        self.s_wb_ops = self.wb_ops
        self._dirty: set = set()          # inodes with dirty pages, delalloc or a dirty core
        self._dirty_lock = threading.Lock()
        self.delalloc_blk = 0             # blocks reserved by delayed allocations
        self.stats = collections.Counter()
        if not readonly:
            self._process_orphans()

    @property
    def root_ino(self) -> int:
        return self.md.sb.root_ino

    # -- transactions ------------------------------------------------------------------------
    @contextmanager
    def trans(self):
        """One atomic metadata change under ``meta_lock``: commit on success, cancel (and undo
        in-memory inode state) on an exception."""
        if self.readonly:
            raise from_errno(_errno.EROFS, "read-only mount")
        with self.meta_lock:
            tx = self.md.transaction()
            tx.xfs_inodes = {}
            try:
                yield tx
            except BaseException:
                tx.cancel()
                raise
            tx.commit()
        self.stats["transactions"] += 1

    def log_inode(self, tx, inode) -> None:
        """Join ``inode``'s core to ``tx`` (encoded at once; call again after later changes)."""
        inode.store_core()
        inode.core_dirty = False
        self._write_dinode(tx, inode.di)
        self.join_inode(tx, inode)

    def join_inode(self, tx, inode) -> None:
        """Make ``tx`` undo ``inode``'s in-memory state if it is cancelled (xfs_trans_ijoin).
        Called before the first in-memory change of the inode in ``tx`` (``log_inode``, and
        ``ExtentMap.set_range``, which changes the extent list before the core is logged)."""
        if inode.i_ino not in tx.xfs_inodes:
            tx.xfs_inodes[inode.i_ino] = inode
            tx.on_abort(lambda inode=inode: self._reload(inode))

    def _write_dinode(self, tx, di) -> None:
        blk, off = dinode_loc(di.ino, self.ipb, self.inode_size)
        buf = self.md.cache.read(blk, None)
        tx.log_buf(buf)
        di.encode_into(buf.data, off, self.inode_size, self.md.sb.uuid)

    def read_dinode(self, ino: int) -> fmt.DiskInode:
        if ino <= 0 or ino // self.ipb >= self.md.sb.total_blk:
            raise CorruptError("inode number", f"inode {ino}", "outside the filesystem")
        blk, off = dinode_loc(ino, self.ipb, self.inode_size)
        buf = self.md.cache.read(blk, None)
        return fmt.DiskInode.decode(buf.data, off, self.inode_size, ino, self.md.sb.uuid,
                                    self.block_size)

    def _reload(self, inode) -> None:
        """A transaction touching ``inode`` was cancelled: back to what the disk says."""
        di = self.read_dinode(inode.i_ino)
        inode.di = di
        inode.bmap = None
        inode.dir = None
        size = inode.i_size
        inode.load_core()
        if inode.delalloc or inode.i_mapping.nrdirty:
            inode.i_size = max(size, inode.disk_size)

    # -- inode cache -------------------------------------------------------------------------
    def iget(self, ino: int):
        inode = self.icache_get(ino)
        if inode is not None:
            return inode
        with self.meta_lock:
            # a second reader of the same ino waits here and then finds the first one's object
            inode = self.icache_get(ino)
            if inode is not None:
                return inode
            di = self.read_dinode(ino)
            if di.mode == 0:
                raise NotFoundError(_errno.ENOENT, f"inode {ino} is not allocated")
            self.stats["iget_reads"] += 1
            return self.icache_add(XfsInode(self, di))

    def mark_dirty(self, inode) -> None:
        with self._dirty_lock:
            self._dirty.add(inode)

    def inode_reclaimable(self, inode) -> bool:
        """Nothing of ``inode`` lives only in memory (the inode cache may drop it)."""
        return (inode not in self._dirty and not inode.core_dirty and not inode.delalloc
                and not inode.i_mapping.has_dirty_pages())

    def writeback_inode(self, inode) -> None:
        """Write back the dirty pages (allocating delayed extents) and log an unlogged core;
        leaves ``_dirty`` once clean.  No lock held by the caller."""
        inode.i_mapping.write_and_wait_range(0, None)
        if inode.core_dirty and inode.i_nlink:
            with self.trans() as tx:
                self.log_inode(tx, inode)
        with self._dirty_lock:
            if not inode.i_mapping.nrdirty and not inode.delalloc and not inode.core_dirty:
                self._dirty.discard(inode)

    def bmap(self, inode) -> ExtentMap:
        if inode.bmap is None:
            inode.bmap = ExtentMap(self, inode)
        return inode.bmap

    def dstate(self, inode) -> DirState:
        if inode.dir is None:
            inode.dir = DirState(self, inode)
        return inode.dir

    def new_inode(self, tx, dir, mode: int, nlink: int = 1):
        uid, gid, mode = ops.inode_init_owner(dir, mode)
        near = self.ialloc.agno_of_ino(dir.i_ino) if dir is not None else 0
        if dir is not None and _stat.S_ISDIR(mode):
            near = (self.stats["mkdirs"] + near + 1) % self.md.sb.ag_count   # spread directories
            self.stats["mkdirs"] += 1
        ino = self.ialloc.alloc(tx, near)
        old = self.read_dinode(ino)
        if old.mode != 0:
            raise CorruptError("inode", f"inode {ino}", "inobt says free but the inode is in use")
        now = _now()
        if _stat.S_ISDIR(mode):
            dfmt = fmt.FMT_INLINE
        elif _stat.S_ISREG(mode) or _stat.S_ISLNK(mode):
            dfmt = fmt.FMT_EXTENTS
        else:
            dfmt = fmt.FMT_DEV
        di = fmt.DiskInode(ino=ino, mode=mode, data_format=dfmt, nlink=nlink, uid=uid, gid=gid,
                           generation=old.generation + 1, atime_ns=now, mtime_ns=now,
                           ctime_ns=now, crtime_ns=now)
        inode = XfsInode(self, di)
        inode.core_dirty = False
        if _stat.S_ISDIR(mode):
            di.fork = struct.pack("<Q", dir.i_ino if dir is not None else ino)
            di.inline_len = len(di.fork)
        self.log_inode(tx, inode)
        self.icache_add(inode, new=True)
        tx.on_abort(lambda: self._drop_cached(inode))
        return inode

    def _drop_cached(self, inode) -> None:
        """``inode`` is freed (or its creation undone): out of the cache and the dirty set."""
        self.icache_forget(inode.i_ino, inode)
        with self._dirty_lock:
            self._dirty.discard(inode)

    # -- unlinked list -----------------------------------------------------------------------
    def _inode_obj(self, ino: int):
        """The inode object of an unlinked-list member (under ``meta_lock``)."""
        inode = self.icache_get(ino)
        if inode is None:
            inode = self.icache_add(XfsInode(self, self.read_dinode(ino)))
        return inode

    def orphan_add(self, tx, inode) -> None:
        sbd = self.md.log_superblock(tx)
        inode.di.next_unlinked = sbd.unlinked_ino
        sbd.unlinked_ino = inode.i_ino

    def orphan_remove(self, tx, inode) -> None:
        sbd = self.md.log_superblock(tx)
        ino = inode.i_ino
        if sbd.unlinked_ino == ino:
            sbd.unlinked_ino = inode.di.next_unlinked
        else:
            cur = sbd.unlinked_ino
            seen = 0
            while cur:
                prev = self._inode_obj(cur)
                if prev.di.next_unlinked == ino:
                    prev.di.next_unlinked = inode.di.next_unlinked
                    self.log_inode(tx, prev)
                    break
                cur = prev.di.next_unlinked
                seen += 1
                if seen > 1 << 24:
                    raise CorruptError("unlinked list", f"inode {ino}", "loop in the list")
            else:
                raise CorruptError("unlinked list", f"inode {ino}", "inode not on the list")
        inode.di.next_unlinked = 0

    def _process_orphans(self) -> int:
        n = 0
        while self.md.sb.unlinked_ino:
            ino = self.md.sb.unlinked_ino
            inode = self._inode_obj(ino)
            inode.i_nlink = 0
            self.free_inode(inode)
            n += 1
        self.orphans_freed = n
        return n

    # -- freeing -----------------------------------------------------------------------------
    def free_blocks_from(self, inode, start_blk: int, new_size: int | None = None) -> None:
        """Unmap and free every block of ``inode`` at or past file block ``start_blk``, in
        bounded transactions; the last one also logs ``new_size`` when given."""
        bm = None
        while True:
            with self.trans() as tx:
                bm = self.bmap(inode)
                exts = [e for e in bm.ext if e[0] + e[2] > start_blk]
                batch = exts[-FREE_BATCH_EXTENTS:]
                if batch:
                    lo = max(start_blk, batch[0][0])
                    for piece in bm.set_range(tx, lo, BLK_INF, []):
                        self.md.alloc.free(tx, piece[1], piece[2])
                        inode.di.nblocks -= piece[2]
                done = len(exts) <= FREE_BATCH_EXTENTS
                if done and new_size is not None:
                    inode.disk_size = new_size
                if batch or (done and new_size is not None):
                    self.log_inode(tx, inode)
            if done:
                break
        self.drop_delalloc(inode, start_blk, BLK_INF)

    def drop_delalloc(self, inode, start: int, end: int) -> None:
        keep = []
        for s, n in inode.delalloc:
            e = s + n
            if e <= start or s >= end:
                keep.append([s, n])
                continue
            if s < start:
                keep.append([s, start - s])
            if e > end:
                keep.append([end, e - end])
            gone = min(e, end) - max(s, start)
            inode.delalloc_blk -= gone
            self.delalloc_blk -= gone
        inode.delalloc = keep

    def free_inode(self, inode) -> None:
        """Free an inode with no links: data, then the inode itself (and its orphan entry)."""
        inode.i_mapping.drop_all()
        if _stat.S_ISREG(inode.i_mode) or (_stat.S_ISLNK(inode.i_mode)
                                           and inode.di.data_format != fmt.FMT_INLINE):
            self.free_blocks_from(inode, 0)
        with self.trans() as tx:
            if _stat.S_ISDIR(inode.i_mode) and inode.di.data_format == fmt.FMT_BTREE:
                self.dstate(inode).free_all(tx)
            di = inode.di
            if di.xattr_blk != fmt.NULL_BLK:
                tx.free_buf(di.xattr_blk)
                self.md.alloc.free(tx, di.xattr_blk, 1)
                di.xattr_blk = fmt.NULL_BLK
            # every inode freed here is on the unlinked list (_drop_link put it there, or
            # mount's orphan processing took it from there); the tail of the list has
            # next_unlinked == 0 and is not the head, so test membership by removing
            self.orphan_remove(tx, inode)
            gen = di.generation
            self.ialloc.free(tx, inode.i_ino)
            inode.di = fmt.DiskInode(ino=inode.i_ino, generation=gen)
            self._write_dinode(tx, inode.di)
        self._drop_cached(inode)

    # -- super operations --------------------------------------------------------------------
    def evict_inode(self, inode) -> None:
        if inode.i_nlink != 0 or self.readonly:
            return
        inode.inode_dio_wait()
        self.free_inode(inode)

    def features(self) -> dict:
        """The on-disk format as the superblock describes it (``ufs info``)."""
        sb = self.md.sb
        return {"format": f"xfslike v{sb.version}", "metadata": "crc32c, self-describing",
                "journal": f"{sb.log_nblocks} blocks at {sb.log_start_blk}",
                "allocation_groups": f"{sb.ag_count} x {sb.ag_blk} blocks",
                "inode_size": sb.inode_size, "sector_size": sb.sector_size,
                "feature_bits": f"compat {sb.compat:#x}, ro_compat {sb.ro_compat:#x}, "
                                f"incompat {sb.incompat:#x}",
                "label": sb.label.rstrip(b"\0").decode("utf-8", "replace")
                if isinstance(sb.label, bytes) else sb.label}

    def statfs(self) -> KStatfs:
        with self.meta_lock:
            free = self.md.alloc.free_blocks()
            avail = self.md.alloc.avail_blocks()
            icount, ifree = self.ialloc.counts()
        free = max(0, free - self.delalloc_blk)
        # f_bavail: what data can still get (the AGFL and its refill reserve are free but
        # never become file data), as XFS leaves its set-aside blocks out
        avail = max(0, avail - self.delalloc_blk)
        sb = self.md.sb
        return KStatfs(f_bsize=self.block_size, f_blocks=sb.total_blk, f_bfree=free,
                       f_bavail=avail, f_files=icount + free * self.ipb,
                       f_ffree=ifree + free * self.ipb, f_fsid=int.from_bytes(sb.uuid[:8], "little"))

    def sync_fs(self, wait: bool = True) -> None:
        if self.readonly:
            return
        with self._dirty_lock:
            dirty = list(self._dirty)
        first_err = None
        for inode in dirty:
            try:
                self.writeback_inode(inode)
            except OSError as e:
                first_err = first_err or e
                continue
            # clean now: back on the LRU (if it had left it while busy) so the shrinker sees it
            self.icache_get(inode.i_ino)
        with self.meta_lock:
            self.md.log.force()
        self.dev.flush()
        if first_err is not None:
            raise first_err

    def put_super(self) -> None:
        if self.readonly:
            return
        self.sync_fs(True)
        with self.meta_lock:
            icount, ifree = self.ialloc.counts()
            self.md.sb.icount, self.md.sb.ifree = icount, ifree
            self.md.close()


class XfsInodeOps(InodeOperations):
    """``inode.i_op`` of every xfslike inode."""

    def __init__(self, fs: XfsSuper):
        self.fs = fs

    # -- namespace ---------------------------------------------------------------------------
    def lookup(self, dir, name: str):
        fs = self.fs
        with fs.meta_lock:
            hit = fs.dstate(dir).lookup(os.fsencode(name))
        if hit is None:
            return None
        return fs.iget(hit[0])

    def _touch_dir(self, dir, now) -> None:
        dir.i_mtime_ns = dir.i_ctime_ns = now

    def _create(self, dir, name: str, mode: int, nlink: int = 1, fill=None):
        fs = self.fs
        with fs.trans() as tx:
            inode = fs.new_inode(tx, dir, mode, nlink)
            if fill is not None:
                fill(tx, inode)
            fs.dstate(dir).add(tx, os.fsencode(name), inode.i_ino, _ftype(mode))
            if _stat.S_ISDIR(mode):
                dir.i_nlink += 1
            self._touch_dir(dir, inode.i_ctime_ns)
            fs.log_inode(tx, inode)
            fs.log_inode(tx, dir)
        return inode

    def create(self, dir, name: str, mode: int):
        return self._create(dir, name, mode)

    def mknod(self, dir, name: str, mode: int, rdev: int = 0):
        def fill(tx, inode):
            inode.di.rdev = inode.i_rdev = rdev
        return self._create(dir, name, mode, fill=fill)

    def mkdir(self, dir, name: str, mode: int):
        return self._create(dir, name, mode, nlink=2)

    def symlink(self, dir, name: str, target: str):
        fs = self.fs
        data = os.fsencode(target)

        def fill(tx, inode):
            inode.i_size = inode.disk_size = len(data)
            fork = fmt.DiskInode.fork_size(fs.inode_size)
            if len(data) <= fork:
                inode.di.data_format = fmt.FMT_INLINE
                inode.di.fork = data
                inode.di.inline_len = len(data)
                return
            nblk = -(-len(data) // fs.block_size)
            near = inode.i_ino // fs.ipb
            start, _got = fs.md.alloc.alloc(tx, near, nblk, nblk)
            for i in range(nblk):
                buf = tx.new_buf(start + i, None, inode.i_ino)
                chunk = data[i * fs.block_size:(i + 1) * fs.block_size]
                buf.data[:len(chunk)] = chunk
            fs.bmap(inode).set_range(tx, 0, nblk, [(0, start, nblk, 0)])
            inode.di.nblocks += nblk
        return self._create(dir, name, _stat.S_IFLNK | 0o777, fill=fill)

    def readlink(self, inode) -> str:
        fs = self.fs
        with fs.meta_lock:
            di = inode.di
            if di.data_format == fmt.FMT_INLINE:
                return os.fsdecode(bytes(di.fork[:di.inline_len]))
            out = bytearray()
            for _off, dev_blk, n, _f in fs.bmap(inode).ext:
                for i in range(n):
                    out += fs.md.cache.read(dev_blk + i, None).data
            return os.fsdecode(bytes(out[:inode.i_size]))

    def link(self, inode, dir, name: str) -> None:
        fs = self.fs
        with fs.trans() as tx:
            fs.dstate(dir).add(tx, os.fsencode(name), inode.i_ino, _ftype(inode.i_mode))
            now = _now()
            if inode.i_nlink == 0:
                fs.orphan_remove(tx, inode)      # linkat of an O_TMPFILE-like orphan
            inode.i_nlink += 1
            inode.i_ctime_ns = now
            self._touch_dir(dir, now)
            fs.log_inode(tx, inode)
            fs.log_inode(tx, dir)

    def _drop_link(self, tx, inode, now, whole_dir=False) -> None:
        fs = self.fs
        inode.i_nlink = 0 if whole_dir else inode.i_nlink - 1
        inode.i_ctime_ns = now
        if inode.i_nlink == 0:
            fs.orphan_add(tx, inode)
        fs.log_inode(tx, inode)

    def unlink(self, dir, name: str, inode) -> None:
        fs = self.fs
        with fs.trans() as tx:
            fs.dstate(dir).remove(tx, os.fsencode(name))
            now = _now()
            self._drop_link(tx, inode, now)
            self._touch_dir(dir, now)
            fs.log_inode(tx, dir)

    def rmdir(self, dir, name: str, inode) -> None:
        fs = self.fs
        with fs.trans() as tx:
            fs.dstate(dir).remove(tx, os.fsencode(name))
            now = _now()
            self._drop_link(tx, inode, now, whole_dir=True)
            dir.i_nlink -= 1
            self._touch_dir(dir, now)
            fs.log_inode(tx, dir)

    def rename(self, old_dir, old_name: str, source, new_dir, new_name: str, target,
               flags: int) -> None:
        fs = self.fs
        oname, nname = os.fsencode(old_name), os.fsencode(new_name)
        src_dir = _stat.S_ISDIR(source.i_mode)
        with fs.trans() as tx:
            now = _now()
            od, nd = fs.dstate(old_dir), fs.dstate(new_dir)
            if flags & ops.RENAME_EXCHANGE:
                tgt_dir = _stat.S_ISDIR(target.i_mode)
                od.retarget(tx, oname, target.i_ino, _ftype(target.i_mode))
                nd.retarget(tx, nname, source.i_ino, _ftype(source.i_mode))
                if old_dir is not new_dir:
                    if src_dir:
                        fs.dstate(source).set_parent(tx, new_dir.i_ino)
                        fs.log_inode(tx, source)
                    if tgt_dir:
                        fs.dstate(target).set_parent(tx, old_dir.i_ino)
                    if src_dir != tgt_dir:
                        delta = 1 if src_dir else -1
                        new_dir.i_nlink += delta
                        old_dir.i_nlink -= delta
                source.i_ctime_ns = target.i_ctime_ns = now
                fs.log_inode(tx, source)
                fs.log_inode(tx, target)
            else:
                if target is not None:
                    nd.retarget(tx, nname, source.i_ino, _ftype(source.i_mode))
                    if _stat.S_ISDIR(target.i_mode):
                        self._drop_link(tx, target, now, whole_dir=True)
                        new_dir.i_nlink -= 1
                    else:
                        self._drop_link(tx, target, now)
                else:
                    nd.add(tx, nname, source.i_ino, _ftype(source.i_mode))
                od.remove(tx, oname)
                if src_dir and old_dir is not new_dir:
                    fs.dstate(source).set_parent(tx, new_dir.i_ino)
                    old_dir.i_nlink -= 1
                    new_dir.i_nlink += 1
                source.i_ctime_ns = now
                fs.log_inode(tx, source)
            self._touch_dir(old_dir, now)
            self._touch_dir(new_dir, now)
            fs.log_inode(tx, old_dir)
            if new_dir is not old_dir:
                fs.log_inode(tx, new_dir)

    def readdir(self, dir, pos: int):
        fs = self.fs
        while True:
            with fs.meta_lock:
                batch = []
                for name, ino, ftype, nxt in fs.dstate(dir).iterate(pos):
                    batch.append((os.fsdecode(name), ino, ftype, nxt))
                    if len(batch) >= 256:
                        break
            yield from batch
            if len(batch) < 256:
                return
            pos = batch[-1][3]

    # -- attributes --------------------------------------------------------------------------
    def setattr(self, inode, attrs) -> None:
        fs = self.fs
        if attrs.size is not None and attrs.size != inode.i_size:
            from .file import truncate_locked
            truncate_locked(fs, inode, attrs.size)
        with fs.trans() as tx:
            ops.setattr_copy(inode, attrs)
            fs.log_inode(tx, inode)

    # -- xattrs: one raw block per inode -----------------------------------------------------
    def _xattrs(self, inode) -> dict:
        fs = self.fs
        blk = inode.di.xattr_blk
        if blk == fmt.NULL_BLK:
            return {}
        data = fs.md.cache.read(blk, None).data
        out = {}
        (count,) = _XATTR_HDR.unpack_from(data, 0)
        off = _XATTR_HDR.size
        for _ in range(count):
            if off + _XATTR_ENT.size > len(data):
                raise CorruptError("xattr block", fmt.where(blk, fs.block_size), "truncated")
            nlen, vlen = _XATTR_ENT.unpack_from(data, off)
            off += _XATTR_ENT.size
            name = bytes(data[off:off + nlen]).decode("utf-8", "surrogateescape")
            off += nlen
            out[name] = bytes(data[off:off + vlen])
            off += vlen
            if off > len(data):
                raise CorruptError("xattr block", fmt.where(blk, fs.block_size), "truncated")
        return out

    def _store_xattrs(self, tx, inode, attrs: dict) -> None:
        fs = self.fs
        di = inode.di
        if not attrs:
            if di.xattr_blk != fmt.NULL_BLK:
                tx.free_buf(di.xattr_blk)
                fs.md.alloc.free(tx, di.xattr_blk, 1)
                di.xattr_blk = fmt.NULL_BLK
                di.nblocks -= 1
            return
        parts = [_XATTR_HDR.pack(len(attrs))]
        for name, value in attrs.items():
            nb = name.encode("utf-8", "surrogateescape")
            parts.append(_XATTR_ENT.pack(len(nb), len(value)) + nb + bytes(value))
        raw = b"".join(parts)
        if len(raw) > fs.block_size:
            raise NoSpaceError(_errno.ENOSPC, "extended attributes do not fit their block")
        if di.xattr_blk == fmt.NULL_BLK:
            blk, _ = fs.md.alloc.alloc(tx, inode.i_ino // fs.ipb, 1, 1)
            buf = tx.new_buf(blk, None, inode.i_ino)
            di.xattr_blk = blk
            di.nblocks += 1
        else:
            buf = tx.log_buf(fs.md.cache.read(di.xattr_blk, None))
        buf.data[:] = raw.ljust(fs.block_size, b"\0")

    def getxattr(self, inode, name: str) -> bytes:
        with self.fs.meta_lock:
            attrs = self._xattrs(inode)
        if name not in attrs:
            raise from_errno(_errno.ENODATA, f"no attribute {name}")
        return attrs[name]

    def listxattr(self, inode) -> list:
        with self.fs.meta_lock:
            return list(self._xattrs(inode))

    def setxattr(self, inode, name: str, value: bytes, flags: int) -> None:
        fs = self.fs
        with fs.trans() as tx:
            attrs = self._xattrs(inode)
            attrs[name] = bytes(value)
            self._store_xattrs(tx, inode, attrs)
            inode.i_ctime_ns = _now()
            fs.log_inode(tx, inode)

    def removexattr(self, inode, name: str) -> None:
        fs = self.fs
        with fs.trans() as tx:
            attrs = self._xattrs(inode)
            if name not in attrs:
                raise from_errno(_errno.ENODATA, f"no attribute {name}")
            del attrs[name]
            self._store_xattrs(tx, inode, attrs)
            inode.i_ctime_ns = _now()
            fs.log_inode(tx, inode)

    # -- data-space operations (file.py) -----------------------------------------------------
    def fallocate(self, inode, mode: int, pos: int, length: int) -> None:
        from .file import fallocate
        fallocate(self.fs, inode, mode, pos, length)

    def seek_data_hole(self, inode, pos: int, whence: int) -> int:
        from .file import seek_data_hole
        return seek_data_hole(self.fs, inode, pos, whence)

"""The mounted btrfslike filesystem: superblock operations, namespace, snapshots, reflinks.

Layer: personality.  Imports ``ufs.vfs`` (Superblock, ops, Inode), ``ufs.iomap`` (via
``.file``), ``ufs.errors`` and this package's metadata modules.

What it owns:
- :class:`BtrfsSuper` (``sb.s_op`` is itself): ``iget`` (one live object per inode, through
  the bounded VFS inode cache of ``ufs.vfs.super``, mount option ``inode_cache``), inode
  allocation per fs tree, ``statfs``, ``sync_fs``/``put_super`` (a transaction commit), orphan
  cleanup at mount (inodes left with ``nlink == 0`` by a crash are freed), ``evict_inode``;
- :class:`BtrfsInodeOps` (``inode.i_op``): directories as DIR_ITEM (by name hash) + DIR_INDEX
  (readdir order, the cookie) + INODE_REF (the name in the parent: a directory's ``..``),
  symlinks as an inline extent, xattrs as XATTR_ITEMs, setattr/truncate, fallocate;
- snapshots: :meth:`BtrfsSuper.snapshot` makes a new fs tree sharing every node of a source
  tree (the foundation's COW + refcounts) and names it in a directory (DIR_ITEM pointing at
  the ROOT_ITEM, ROOT_REF/ROOT_BACKREF); :meth:`delete_snapshot` drops it;
- reflinks: :meth:`BtrfsSuper.clone_range` adds file extent items pointing at the source's
  data extents (one more reference each; no data copied).

Transactions: every operation joins the running transaction (``tm.start()``) and leaves it
open; ``sync_fs``, unmount, snapshot creation/deletion commit it (there is no periodic commit
yet); ``fsync`` writes a record of the fsync log (``tree_log``) or, for what the log does not
cover, commits.  Mount replays a log left by a crash (and commits) before the orphan cleanup.
So a crash loses the operations since the last commit that no fsync covered, never
consistency.  Namespace changes note, for the log, the transaction in which an inode's names
changed (``ns_trans``) and in which a directory lost an entry (``rm_trans``).

Inode lifetime: every change of an inode is put into the running transaction's tree at once
(``write_inode``), so the cache may drop a clean inode (no dirty page, no DIO in flight: the
default ``inode_reclaimable``) and ``iget`` decodes it again.  What is lost is the fsync log's
bookkeeping (``log_ranges``, ``ns_trans``, ``rm_trans``, ``logged``); an inode read back whose
item was written in the running transaction gets ``ns_trans = rm_trans = transid``, so an
fsync of it (or of a child it lost) commits instead of logging, as btrfs does after reading an
inode back (``btrfs_read_locked_inode`` is conservative about ``last_unlink_trans``).

Memory: the running transaction keeps every tree node it changed in memory until its commit,
and nothing commits on a timer, so :meth:`BtrfsSuper.balance_icache` (the VFS's safe point
before a namespace operation, no lock held) first commits when more than
``BALANCE_DIRTY_NODES`` nodes are dirty (the kernel's ``btrfs_btree_balance_dirty``), then
balances the inode cache.

Extent reuse against direct reads: a read maps an extent under ``tm.lock`` and reads it
without; a concurrent overwrite's completion (``dio_complete=unlocked`` runs it without
``i_rwsem``) may free that extent meanwhile.  Freed data extents therefore pass through
``_data_reuse_gate``: while reads are in flight they are quarantined with the current read
epoch and become allocatable only when every read of that epoch or older has ended.

Locks (outermost first): VFS ``i_rwsem`` locks as ``ufs.vfs.ops`` documents → ``tm.lock``
(an RLock, the transaction manager's, serialising every tree access; held only around
metadata work, never across device data I/O) → the inode cache's ``_icache_lock`` (leaf).  The
inline shrinker (from ``iget``/``new_inode``, possibly under ``tm.lock``) only try-locks pages;
write-back under inode-cache pressure runs from the VFS (``balance_icache``) with no lock held.
"""
from __future__ import annotations

import errno as _errno
import os
import stat as _stat
import time

from ufs.errors import (
    CorruptError,
    ExistsError,
    InvalidError,
    NameTooLongError,
    NoSpaceError,
    NotFoundError,
    NotSupportedError,
    from_errno,
)
from ufs.vfs import ops
from ufs.vfs.ops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    InodeOperations,
    KStatfs,
    SuperOperations,
)
from ufs.vfs.super import DEFAULT_INODE_CACHE, Superblock

from . import format as fmt
from . import tree_log
from .csum_tree import CsumTree
from .format import (
    DIR_INDEX,
    DIR_ITEM,
    EXTENT_DATA,
    FILE_EXTENT_INLINE,
    FIRST_FREE_OBJECTID,
    FS_TREE_ID,
    INODE_ITEM,
    INODE_REF,
    ROOT_BACKREF,
    ROOT_ITEM,
    ROOT_REF,
    U64_MAX,
    XATTR_ITEM,
    DiskDirEntry,
    DiskFileExtent,
    DiskInodeItem,
    DiskRootRef,
    name_hash,
)
from .inode import (
    INODE_NODATACOW,
    INODE_NODATASUM,
    BtrfsInode,
    add_extent,
    drop_extents,
    extent_items,
    extent_len,
    split_ino,
    vfs_ino,
)
from .transaction import TransactionManager

__all__ = ["BtrfsInodeOps", "BtrfsSuper", "MountOptions"]

FT_BY_MODE = {_stat.S_IFREG: 1, _stat.S_IFDIR: 2, _stat.S_IFCHR: 3, _stat.S_IFBLK: 4,
              _stat.S_IFIFO: 5, _stat.S_IFSOCK: 6, _stat.S_IFLNK: 7}
FT_DIR = 2
#: dirty tree nodes of the running transaction past which the next namespace operation
#: commits first: bounds the transaction's memory (measured ~65 KiB per dirty node with its
#: share of delayed references and checksum items, so ~65 MiB; one commit per ~30,000 small
#: files created)
BALANCE_DIRTY_NODES = 1024
DT_BY_FT = {1: ops.DT_REG, 2: ops.DT_DIR, 3: 2, 4: 6, 5: 1, 6: 12, 7: ops.DT_LNK}


class MountOptions:
    """Parsed mount options (``plugin.OPTIONS`` validates them)."""

    def __init__(self, options=None):
        o = dict(options or {})
        self.dio_complete = o.get("dio_complete") or "unlocked"
        if self.dio_complete not in ("unlocked", "locked", "marker"):
            raise InvalidError(_errno.EINVAL, f"dio_complete={self.dio_complete!r}")
        self.nodatasum = bool(o.get("nodatasum"))
        self.nodatacow = bool(o.get("nodatacow"))
        self.notreelog = bool(o.get("notreelog"))


def _now():
    return time.time_ns()


class BtrfsSuper(Superblock, SuperOperations):
    """A mounted btrfslike filesystem (its own ``s_op``)."""

    root_ino = FIRST_FREE_OBJECTID

    def __init__(self, dev, tm: TransactionManager, options=None, readonly=False):
        super().__init__(dev, tm.sectorsize, name=getattr(dev, "path", None) or "btrfslike",
                         inode_cache=(options or {}).get("inode_cache") or DEFAULT_INODE_CACHE)
        from .file import BtrfsFileOps  # the data path needs the Cython engine
        self.s_op = self
        self.tm = tm
        self.dev = dev
        self.opts = MountOptions(options)
        self.readonly = readonly
        self.s_maxbytes = ops.MAX_LFS_FILESIZE
        self.s_max_links = 65535
        self.s_dev = 0
        self.ss = tm.sectorsize
        self.csum = CsumTree(tm)
        self.iops = BtrfsInodeOps(self)
        self.fops = BtrfsFileOps(self)
        self._next_oid = {}
        self._freed_data = []
        self.fault_hooks = {}           # tests: name -> callable (e.g. "dio_end_io")
        tm.extents.on_data_freed = lambda b, n: self._freed_data.append((b, n))
        # Direct reads map an extent, then read it without tm.lock: a freed data extent must
        # not be reused (and rewritten) while a read that mapped it may still be reading it.
        # Reads register in the current epoch; a freed extent is quarantined with the epoch
        # of its free and released once no read of that epoch or older is in flight.
        self._read_epoch = 0
        self._reads_in_flight = {}          # epoch -> reads started in it, still running
        self._quarantine = []               # (epoch of the free, bytenr, num_bytes)
        tm.extents.data_reuse_gate = self._data_reuse_gate
        tm.pre_commit_hooks.append(self._pre_commit)
        # an fsync log left by a crash: replay it (and commit, dropping it) before anything
        # else allocates space
        self.log_replayed = tree_log.replay(self, commit=not readonly)
        if not readonly:
            self._orphan_cleanup()

    # -- extent reuse against in-flight reads (tm.lock held by every caller) ----------------------
    def _data_reuse_gate(self, bytenr, num_bytes):
        if not any(self._reads_in_flight.values()):
            self.tm.extents.free.add(bytenr, num_bytes)
            return
        self._quarantine.append((self._read_epoch, bytenr, num_bytes))
        self._read_epoch += 1

    def read_begin(self):
        """A direct read is about to map extents; returns its epoch for :meth:`read_end`."""
        with self.tm.lock:
            e = self._read_epoch
            self._reads_in_flight[e] = self._reads_in_flight.get(e, 0) + 1
            return e

    def read_end(self, epoch):
        with self.tm.lock:
            left = self._reads_in_flight[epoch] - 1
            if left:
                self._reads_in_flight[epoch] = left
                return
            del self._reads_in_flight[epoch]
            oldest = min(self._reads_in_flight, default=None)
            keep = []
            for e, b, n in self._quarantine:
                if oldest is not None and e >= oldest:
                    keep.append((e, b, n))
                else:
                    self.tm.extents.free.add(b, n)
            self._quarantine = keep

    # -- transactions --------------------------------------------------------------------------
    def start(self):
        return self.tm.start()

    def _pre_commit(self, trans):
        self.flush_freed(trans)

    def flush_freed(self, trans):
        """Drop the checksums of data extents that lost their last reference."""
        while self._freed_data:
            b, n = self._freed_data.pop()
            self.csum.delete(trans, b, n)

    def commit(self):
        """Commit the running transaction (everything done so far becomes durable)."""
        with self.tm.lock:
            return self.tm.commit()

    def balance_icache(self):
        """The VFS's safe point (no lock held): commit an oversized transaction, then let the
        inode cache shrink (see the module docstring)."""
        if (not self.readonly and not self.tm.aborted
                and len(self.tm.cache.dirty) > BALANCE_DIRTY_NODES):
            self.commit()
        return super().balance_icache()

    # -- inodes --------------------------------------------------------------------------------
    def iget(self, ino):
        inode = self.icache_get(ino)
        if inode is not None:
            return inode
        tree_id, oid = split_ino(ino)
        with self.tm.lock:
            # a second reader of the same ino waits here and then finds the first one's object
            inode = self.icache_get(ino)
            if inode is not None:
                return inode
            try:
                tree = self.tm.tree(tree_id)
            except NotFoundError:
                raise NotFoundError(_errno.ENOENT, f"no subvolume {tree_id}") from None
            raw = tree.lookup((oid, INODE_ITEM, 0))
            if raw is None:
                raise NotFoundError(_errno.ENOENT, f"no inode {oid} in tree {tree_id}")
            item = DiskInodeItem.decode(raw, f"inode {oid} of tree {tree_id}")
            inode = BtrfsInode(self, tree_id, oid, item)
            running = self.tm.running
            if running is not None and item.transid == running.transid:
                # changed in the running transaction by an evicted copy whose fsync-log
                # bookkeeping is gone: fsync must commit (see the module docstring)
                inode.ns_trans = inode.rm_trans = running.transid
            return self.icache_add(inode)

    def write_inode(self, trans, inode):
        inode.sequence += 1
        self.tm.tree(inode.tree_id).put(trans, inode.key(), inode.to_item(trans.transid).encode())

    def _alloc_oid(self, tree_id):
        nxt = self._next_oid.get(tree_id)
        if nxt is None:
            tree = self.tm.tree(tree_id)
            last = tree.prev_item((fmt.LAST_FREE_OBJECTID, 0, 0))
            nxt = max(FIRST_FREE_OBJECTID + 1, (last[0][0] + 1) if last else 0)
        if nxt > fmt.LAST_FREE_OBJECTID or nxt >= (1 << 40):
            raise NoSpaceError(_errno.ENOSPC, "no free inode numbers")
        self._next_oid[tree_id] = nxt + 1
        return nxt

    def new_inode(self, trans, dir, mode, nlink=1):
        uid, gid, mode = ops.inode_init_owner(dir, mode)
        tree_id = dir.tree_id if dir is not None else FS_TREE_ID
        oid = self._alloc_oid(tree_id)
        now = _now()
        t = (now // 1_000_000_000, now % 1_000_000_000)
        flags = 0
        if _stat.S_ISREG(mode):
            if self.opts.nodatacow or (dir is not None and dir.flags & INODE_NODATACOW):
                flags |= INODE_NODATACOW | INODE_NODATASUM
            elif self.opts.nodatasum or (dir is not None and dir.flags & INODE_NODATASUM):
                flags |= INODE_NODATASUM
        elif dir is not None:
            flags = dir.flags & (INODE_NODATASUM | INODE_NODATACOW)
        item = DiskInodeItem(trans.transid, trans.transid, 0, 0, nlink, uid, gid, mode, 0, flags,
                             0, t, t, t, t)
        inode = BtrfsInode(self, tree_id, oid, item)
        self.write_inode(trans, inode)
        self.icache_add(inode, new=True)
        return inode

    def set_inode_flags(self, inode, set_flags=0, clear_flags=0):
        """Change NODATASUM/NODATACOW of an empty regular file (chattr +C semantics: only
        while it has no data)."""
        with self.tm.lock:
            if _stat.S_ISREG(inode.i_mode) and inode.nbytes:
                raise InvalidError(_errno.EINVAL, "inode flags change on a file with data")
            inode.flags = (inode.flags | set_flags) & ~clear_flags
            if inode.flags & INODE_NODATACOW:
                inode.flags |= INODE_NODATASUM
            trans = self.start()
            self.write_inode(trans, inode)

    def evict_inode(self, inode):
        if inode.i_nlink != 0:
            return
        with self.tm.lock:
            trans = self.start()
            self._free_inode(trans, inode)
            self.flush_freed(trans)
        self.icache_forget(inode.i_ino, inode)

    def _free_inode(self, trans, inode):
        tree = self.tm.tree(inode.tree_id)
        oid = inode.objectid
        drop_extents(self.tm, trans, tree, inode, 0, U64_MAX)
        tree.delete_range(trans, (oid, 0, 0), (oid + 1, 0, 0))

    def _orphan_cleanup(self):
        """Free inodes a crash left with no name (nlink 0: unlinked while open)."""
        with self.tm.lock:
            orphans = []
            for tid in self.tm.tree_ids():
                ri = self.tm.root_item(tid)
                if not ri.root_dirid:
                    continue
                for k, d in self.tm.tree(tid).items():
                    if k[1] == INODE_ITEM and DiskInodeItem.decode(d, "inode").nlink == 0:
                        orphans.append(vfs_ino(tid, k[0]))
            for ino in orphans:
                inode = self.iget(ino)
                trans = self.start()
                self._free_inode(trans, inode)
                self.icache_forget(ino, inode)
            if orphans:
                self.flush_freed(self.start())
                self.tm.commit()

    # -- super operations ----------------------------------------------------------------------
    def features(self) -> dict:
        """The on-disk format as the superblock describes it (``ufs info``)."""
        tm = self.tm
        sb = tm.sb
        return {"format": "btrfslike v1", "checksums": "crc32c (metadata and data)",
                "nodesize": sb.nodesize, "sectorsize": sb.sectorsize,
                "metadata_reserve": f"{tm.extents.meta_reserve} bytes"}

    def statfs(self):
        tm = self.tm
        with tm.lock:
            free = tm.extents.free.free_bytes
            avail = tm.extents.data_avail()       # without the metadata reserve, as btrfs
        ss = self.ss
        return KStatfs(f_bsize=ss, f_blocks=tm.total_bytes // ss, f_bfree=free // ss,
                       f_bavail=avail // ss, f_files=0, f_ffree=0,
                       f_fsid=int.from_bytes(tm.fsid[:8], "little"))

    def sync_fs(self, wait):
        if not self.readonly:
            self.commit()

    def put_super(self):
        if not self.readonly and not self.tm.aborted:
            self.commit()

    # -- snapshots and reflinks -------------------------------------------------------------------
    def snapshot(self, src_dir, dir, name):
        """Snapshot the subvolume ``src_dir`` belongs to as ``dir/name`` (a new subvolume
        sharing every node).  Returns the new tree id.  Commits (as btrfs does)."""
        bname = os.fsencode(name)
        with self.tm.lock:
            if self._find_entry(dir, bname) is not None:
                raise ExistsError(_errno.EEXIST, f"{name} exists")
            trans = self.start()
            tid = max([FIRST_FREE_OBJECTID - 1, *self.tm.tree_ids()]) + 1
            self.tm.snapshot(trans, src_dir.tree_id, tid)
            self._link_subvolume(trans, dir, bname, tid)
            self.tm.commit()
            return tid

    def create_subvolume(self, dir, name, mode=0o755):
        """A new, empty subvolume (fs tree) named ``dir/name``; returns its tree id.
        Commits."""
        bname = os.fsencode(name)
        with self.tm.lock:
            if self._find_entry(dir, bname) is not None:
                raise ExistsError(_errno.EEXIST, f"{name} exists")
            trans = self.start()
            tid = max([FIRST_FREE_OBJECTID - 1, *self.tm.tree_ids()]) + 1
            tree = self.tm.create_tree(trans, tid, shareable=True, root_dirid=FIRST_FREE_OBJECTID)
            uid, gid, dmode = ops.inode_init_owner(dir, _stat.S_IFDIR | mode)
            now = _now()
            t = (now // 1_000_000_000, now % 1_000_000_000)
            item = DiskInodeItem(trans.transid, trans.transid, 0, 0, 2, uid, gid, dmode, 0,
                                 dir.flags, 0, t, t, t, t)
            tree.insert(trans, (FIRST_FREE_OBJECTID, INODE_ITEM, 0), item.encode())
            self._link_subvolume(trans, dir, bname, tid)
            self.tm.commit()
            return tid

    def _link_subvolume(self, trans, dir, bname, tid):
        idx = self.iops._add_entry(trans, dir, bname, (tid, ROOT_ITEM, U64_MAX), FT_DIR)
        ref = DiskRootRef(dir.objectid, idx, bname).encode()
        root = self.tm.root_tree
        root.insert(trans, (dir.tree_id, ROOT_REF, tid), ref)
        root.insert(trans, (tid, ROOT_BACKREF, dir.tree_id), ref)
        self.write_inode(trans, dir)

    def delete_snapshot(self, dir, name):
        """Remove the subvolume (or snapshot) entry ``dir/name`` and drop its tree (space comes
        back at the commit this makes).  Inodes of the subvolume must not be open."""
        bname = os.fsencode(name)
        with self.tm.lock:
            ent = self._find_entry(dir, bname)
            if ent is None or ent[0][1] != ROOT_ITEM:
                raise NotFoundError(_errno.ENOENT, f"{name} is not a subvolume")
            tid = ent[0][0]
            trans = self.start()
            self.iops._del_entry(trans, dir, bname, ent)
            dir.rm_trans = trans.transid
            root = self.tm.root_tree
            for k in ((dir.tree_id, ROOT_REF, tid), (tid, ROOT_BACKREF, dir.tree_id)):
                try:
                    root.delete(trans, k)
                except NotFoundError:
                    pass
            self.write_inode(trans, dir)
            self.icache_forget_if(lambda i: split_ino(i)[0] == tid)
            self.tm.delete_tree(trans, tid)
            self.flush_freed(trans)
            self.tm.commit()

    def clone_range(self, src, src_pos, dst, dst_pos, length):
        """Reflink ``[src_pos, +length)`` of ``src`` to ``dst_pos`` of ``dst`` (FICLONERANGE):
        positions and length sector-aligned (a length reaching the source EOF may end there).
        ``dst`` grows as needed.  Same-file overlapping ranges are EINVAL."""
        ss = self.ss
        if src_pos % ss or dst_pos % ss or length <= 0:
            raise InvalidError(_errno.EINVAL, "clone range not sector-aligned")
        if src_pos + length > src.i_size:
            raise InvalidError(_errno.EINVAL, "clone range past the source EOF")
        if length % ss and src_pos + length != src.i_size:
            raise InvalidError(_errno.EINVAL, "clone length not sector-aligned")
        if src is dst and src_pos < dst_pos + length and dst_pos < src_pos + length:
            raise InvalidError(_errno.EINVAL, "overlapping clone in one file")
        if src.nodatasum != dst.nodatasum:
            raise InvalidError(_errno.EINVAL, "clone between checksummed and nodatasum files")
        locks = sorted({id(src): src, id(dst): dst}.values(), key=lambda i: i.i_ino)
        for i in locks:
            i.i_rwsem.down_write(ops.I_MUTEX_NORMAL if i is locks[0] else ops.I_MUTEX_NONDIR2)
        try:
            for i in locks:
                i.inode_dio_wait()
            alen = (length + ss - 1) // ss * ss
            with self.tm.lock:
                trans = self.start()
                stree = self.tm.tree(src.tree_id)
                dtree = self.tm.tree(dst.tree_id)
                pieces = extent_items(stree, src.objectid, src_pos, src_pos + alen)
                if dst.i_size < dst_pos and dst.i_size % ss:
                    self.fops.zero_eof_tail_locked(dst)
                drop_extents(self.tm, trans, dtree, dst, dst_pos, dst_pos + alen)
                for pos, fe in pieces:
                    if fe.type == FILE_EXTENT_INLINE or not fe.disk_bytenr:
                        continue
                    lo, hi = max(pos, src_pos), min(pos + extent_len(fe), src_pos + alen)
                    nfe = DiskFileExtent(fe.type, trans.transid, fe.ram_bytes, fe.disk_bytenr,
                                         fe.disk_num_bytes, fe.offset + (lo - pos), hi - lo)
                    add_extent(self.tm, trans, dtree, dst, dst_pos + (lo - src_pos), nfe)
                end = dst_pos + length
                dst.i_size = max(dst.i_size, end)
                dst.disk_size = max(dst.disk_size, end)
                dst.i_mtime_ns = dst.i_ctime_ns = _now()
                self.write_inode(trans, dst)
                self.flush_freed(trans)
        finally:
            for i in reversed(locks):
                i.i_rwsem.up_write()

    # -- directory helpers ------------------------------------------------------------------------
    def _find_entry(self, dir, bname):
        """``(location, index_or_None, file_type)`` of ``bname`` in ``dir`` or None."""
        tree = self.tm.tree(dir.tree_id)
        raw = tree.lookup((dir.objectid, DIR_ITEM, name_hash(bname)))
        if raw is None:
            return None
        for e in fmt.decode_dir_entries(raw, f"dir {dir.i_ino} item"):
            if e.name == bname:
                return e.location, e.transid, e.file_type
        return None

    def inode_of_location(self, dir, loc):
        if loc[1] == ROOT_ITEM:
            return self.iget(vfs_ino(loc[0], FIRST_FREE_OBJECTID))
        return self.iget(vfs_ino(dir.tree_id, loc[0]))


class BtrfsInodeOps(InodeOperations):
    """``inode.i_op`` for every btrfslike inode."""

    def __init__(self, sb: BtrfsSuper):
        self.sb = sb
        self.tm = sb.tm

    # -- entries -----------------------------------------------------------------------------
    def _next_index(self, dir):
        if dir.next_index is None:
            tree = self.tm.tree(dir.tree_id)
            last = tree.prev_item((dir.objectid, DIR_INDEX, U64_MAX))
            if last is not None and last[0][0] == dir.objectid and last[0][1] == DIR_INDEX:
                dir.next_index = last[0][2] + 1
            else:
                dir.next_index = 2
        idx = dir.next_index
        dir.next_index += 1
        return idx

    def _add_entry(self, trans, dir, bname, location, ftype):
        """DIR_ITEM + DIR_INDEX (+ INODE_REF for an inode); returns the index."""
        tree = self.tm.tree(dir.tree_id)
        idx = self._next_index(dir)
        ent = DiskDirEntry(location, trans.transid, ftype, bname)
        key = (dir.objectid, DIR_ITEM, name_hash(bname))
        raw = tree.lookup(key)
        ents = fmt.decode_dir_entries(raw, "dir item") if raw is not None else []
        tree.put(trans, key, fmt.encode_dir_entries(ents + [ent]))
        # DIR_INDEX records the index as the entry's transid-independent position; the
        # entry's own ``transid`` field carries the index for the reverse lookup at unlink.
        tree.insert(trans, (dir.objectid, DIR_INDEX, idx),
                    fmt.encode_dir_entries([DiskDirEntry(location, trans.transid, ftype, bname)]))
        if location[1] == INODE_ITEM:
            rkey = (location[0], INODE_REF, dir.objectid)
            raw = tree.lookup(rkey)
            refs = fmt.decode_inode_refs(raw, "inode ref") if raw is not None else []
            tree.put(trans, rkey, fmt.encode_inode_refs(refs + [(idx, bname)]))
        dir.i_size += 2 * len(bname)
        dir.i_mtime_ns = dir.i_ctime_ns = _now()
        return idx

    def _entry_index(self, tree, dir, bname, location):
        if location[1] == INODE_ITEM:
            raw = tree.lookup((location[0], INODE_REF, dir.objectid))
            for idx, n in fmt.decode_inode_refs(raw, "inode ref") if raw else []:
                if n == bname:
                    return idx
            return None
        raw = self.tm.root_tree.lookup((dir.tree_id, ROOT_REF, location[0]))
        return DiskRootRef.decode(raw, "root ref").sequence if raw else None

    def _del_entry(self, trans, dir, bname, found):
        location = found[0]
        tree = self.tm.tree(dir.tree_id)
        key = (dir.objectid, DIR_ITEM, name_hash(bname))
        ents = [e for e in fmt.decode_dir_entries(tree.lookup(key), "dir item") if e.name != bname]
        if ents:
            tree.update(trans, key, fmt.encode_dir_entries(ents))
        else:
            tree.delete(trans, key)
        idx = self._entry_index(tree, dir, bname, location)
        if idx is not None:
            tree.delete(trans, (dir.objectid, DIR_INDEX, idx))
        if location[1] == INODE_ITEM:
            rkey = (location[0], INODE_REF, dir.objectid)
            refs = [r for r in fmt.decode_inode_refs(tree.lookup(rkey), "inode ref")
                    if r[1] != bname]
            if refs:
                tree.update(trans, rkey, fmt.encode_inode_refs(refs))
            else:
                tree.delete(trans, rkey)
        dir.i_size -= 2 * len(bname)
        dir.i_mtime_ns = dir.i_ctime_ns = _now()

    # -- namespace ------------------------------------------------------------------------------
    def lookup(self, dir, name):
        with self.tm.lock:
            found = self.sb._find_entry(dir, os.fsencode(name))
            if found is None:
                return None
            return self.sb.inode_of_location(dir, found[0])

    def _create(self, dir, name, mode, nlink=1, setup=None):
        with self.tm.lock:
            trans = self.sb.start()
            inode = self.sb.new_inode(trans, dir, mode, nlink)
            if setup is not None:
                setup(trans, inode)
            self._add_entry(trans, dir, os.fsencode(name), (inode.objectid, INODE_ITEM, 0),
                            FT_BY_MODE[_stat.S_IFMT(mode)])
            if _stat.S_ISDIR(mode):
                dir.i_nlink += 1
            self.sb.write_inode(trans, inode)
            self.sb.write_inode(trans, dir)
            return inode

    def create(self, dir, name, mode):
        return self._create(dir, name, mode)

    def mkdir(self, dir, name, mode):
        return self._create(dir, name, mode, nlink=2)

    def symlink(self, dir, name, target):
        data = os.fsencode(target)
        if len(data) + fmt.FILE_EXTENT_HEAD_L.size > fmt.max_item_size(self.tm.nodesize):
            raise NameTooLongError(_errno.ENAMETOOLONG, "symlink target too long for a node")

        def setup(trans, inode):
            fe = DiskFileExtent(FILE_EXTENT_INLINE, trans.transid, len(data), inline_data=data)
            self.tm.tree(inode.tree_id).insert(trans, (inode.objectid, EXTENT_DATA, 0),
                                               fe.encode())
            inode.i_size = inode.disk_size = len(data)
        return self._create(dir, name, _stat.S_IFLNK | 0o777, setup=setup)

    def link(self, inode, dir, name):
        with self.tm.lock:
            if inode.tree_id != dir.tree_id:
                raise from_errno(_errno.EXDEV, "link across subvolumes")
            trans = self.sb.start()
            self._add_entry(trans, dir, os.fsencode(name), (inode.objectid, INODE_ITEM, 0),
                            FT_BY_MODE[_stat.S_IFMT(inode.i_mode)])
            inode.ns_trans = trans.transid      # its names changed: fsync commits
            inode.i_nlink += 1
            inode.i_ctime_ns = _now()
            self.sb.write_inode(trans, inode)
            self.sb.write_inode(trans, dir)

    def _remove(self, dir, name, inode, isdir):
        bname = os.fsencode(name)
        with self.tm.lock:
            found = self.sb._find_entry(dir, bname)
            if found is None:
                raise NotFoundError(_errno.ENOENT, name)
            if found[0][1] == ROOT_ITEM:
                raise from_errno(_errno.EPERM, "a subvolume: use delete_snapshot")
            trans = self.sb.start()
            self._del_entry(trans, dir, bname, found)
            inode.ns_trans = dir.rm_trans = trans.transid
            if isdir:
                inode.i_nlink = 0
                dir.i_nlink -= 1
            else:
                inode.i_nlink -= 1
            inode.i_ctime_ns = _now()
            self.sb.write_inode(trans, inode)
            self.sb.write_inode(trans, dir)

    def unlink(self, dir, name, inode):
        self._remove(dir, name, inode, False)

    def rmdir(self, dir, name, inode):
        self._remove(dir, name, inode, True)

    def rename(self, old_dir, old_name, source, new_dir, new_name, target, flags):
        bold, bnew = os.fsencode(old_name), os.fsencode(new_name)
        with self.tm.lock:
            if old_dir.tree_id != new_dir.tree_id:
                raise from_errno(_errno.EXDEV, "rename across subvolumes")
            trans = self.sb.start()
            fo = self.sb._find_entry(old_dir, bold)
            fn = self.sb._find_entry(new_dir, bnew)
            src_dir = _stat.S_ISDIR(source.i_mode)
            now = _now()
            source.ns_trans = old_dir.rm_trans = trans.transid
            if target is not None:
                target.ns_trans = new_dir.rm_trans = trans.transid
            if flags & ops.RENAME_EXCHANGE:
                self._del_entry(trans, old_dir, bold, fo)
                self._del_entry(trans, new_dir, bnew, fn)
                self._add_entry(trans, old_dir, bold, fn[0], fn[2])
                self._add_entry(trans, new_dir, bnew, fo[0], fo[2])
                tgt_dir = _stat.S_ISDIR(target.i_mode)
                if old_dir is not new_dir and src_dir != tgt_dir:
                    delta = 1 if src_dir else -1
                    new_dir.i_nlink += delta
                    old_dir.i_nlink -= delta
                source.i_ctime_ns = target.i_ctime_ns = now
                for i in {id(x): x for x in (old_dir, new_dir, source, target)}.values():
                    self.sb.write_inode(trans, i)
                return
            if target is not None:
                self._del_entry(trans, new_dir, bnew, fn)
                if _stat.S_ISDIR(target.i_mode):
                    target.i_nlink = 0
                    new_dir.i_nlink -= 1
                else:
                    target.i_nlink -= 1
                target.i_ctime_ns = now
                self.sb.write_inode(trans, target)
            self._del_entry(trans, old_dir, bold, fo)
            self._add_entry(trans, new_dir, bnew, fo[0], fo[2])
            if src_dir and old_dir is not new_dir:
                old_dir.i_nlink -= 1
                new_dir.i_nlink += 1
            source.i_ctime_ns = now
            for i in {id(x): x for x in (old_dir, new_dir, source)}.values():
                self.sb.write_inode(trans, i)

    def readlink(self, inode):
        with self.tm.lock:
            raw = self.tm.tree(inode.tree_id).lookup((inode.objectid, EXTENT_DATA, 0))
        if raw is None:
            raise CorruptError("symlink", f"inode {inode.i_ino}", "no inline extent")
        return os.fsdecode(DiskFileExtent.decode(raw, f"symlink {inode.i_ino}").inline_data)

    def readdir(self, dir, pos):
        start = max(pos + 1, 2)
        with self.tm.lock:
            items = list(self.tm.tree(dir.tree_id).items(
                (dir.objectid, DIR_INDEX, start), (dir.objectid, DIR_INDEX + 1, 0)))
        for k, d in items:
            (e,) = fmt.decode_dir_entries(d, f"dir index {k}")
            if e.location[1] == ROOT_ITEM:
                ino = vfs_ino(e.location[0], FIRST_FREE_OBJECTID)
            else:
                ino = vfs_ino(dir.tree_id, e.location[0])
            yield os.fsdecode(e.name), ino, DT_BY_FT.get(e.file_type, ops.DT_UNKNOWN), k[2]

    # -- attributes ---------------------------------------------------------------------------
    def setattr(self, inode, attrs):
        if attrs.size is not None and attrs.size != inode.i_size:
            self.sb.fops.truncate_locked(inode, attrs.size)
        with self.tm.lock:
            trans = self.sb.start()
            ops.setattr_copy(inode, attrs)
            self.sb.write_inode(trans, inode)

    def _xattrs(self, tree, inode, bname):
        raw = tree.lookup((inode.objectid, XATTR_ITEM, name_hash(bname)))
        return fmt.decode_dir_entries(raw, "xattr", xattr=True) if raw is not None else []

    def getxattr(self, inode, name):
        b = os.fsencode(name)
        with self.tm.lock:
            for e in self._xattrs(self.tm.tree(inode.tree_id), inode, b):
                if e.name == b:
                    return e.data
        raise from_errno(_errno.ENODATA, f"no xattr {name}")

    def listxattr(self, inode):
        with self.tm.lock:
            out = []
            for _k, d in self.tm.tree(inode.tree_id).items(
                    (inode.objectid, XATTR_ITEM, 0), (inode.objectid, XATTR_ITEM + 1, 0)):
                out += [os.fsdecode(e.name) for e in fmt.decode_dir_entries(d, "xattr", xattr=True)]
            return out

    def setxattr(self, inode, name, value, flags):
        b = os.fsencode(name)
        value = bytes(value)
        with self.tm.lock:
            tree = self.tm.tree(inode.tree_id)
            ents = [e for e in self._xattrs(tree, inode, b) if e.name != b]
            trans = self.sb.start()
            ents.append(DiskDirEntry((0, 0, 0), trans.transid, fmt.FT_XATTR, b, value))
            payload = fmt.encode_dir_entries(ents)
            if len(payload) > fmt.max_item_size(self.tm.nodesize):
                raise NoSpaceError(_errno.ENOSPC, "xattr does not fit a tree node")
            tree.put(trans, (inode.objectid, XATTR_ITEM, name_hash(b)), payload)
            inode.i_ctime_ns = _now()
            self.sb.write_inode(trans, inode)

    def removexattr(self, inode, name):
        b = os.fsencode(name)
        with self.tm.lock:
            tree = self.tm.tree(inode.tree_id)
            old = self._xattrs(tree, inode, b)
            ents = [e for e in old if e.name != b]
            if len(ents) == len(old):
                raise from_errno(_errno.ENODATA, f"no xattr {name}")
            trans = self.sb.start()
            key = (inode.objectid, XATTR_ITEM, name_hash(b))
            if ents:
                tree.update(trans, key, fmt.encode_dir_entries(ents))
            else:
                tree.delete(trans, key)
            inode.i_ctime_ns = _now()
            self.sb.write_inode(trans, inode)

    # -- data space ---------------------------------------------------------------------------
    def fallocate(self, inode, mode, pos, length):
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise NotSupportedError(_errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        self.sb.fops.fallocate(inode, mode, pos, length)

    def seek_data_hole(self, inode, pos, whence):
        return self.sb.fops.seek_data_hole(inode, pos, whence)

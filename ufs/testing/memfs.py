"""memfs: an in-memory personality implementing ``ufs.vfs.ops`` — the POSIX model.

Layer: testing.  Imports ``ufs.vfs`` (Inode, Superblock, ops), ``ufs.registry`` (Personality,
OptionSpec) and ``ufs.errors``.

What it owns: a whole filesystem kept in Python objects, simple enough to be obviously right,
so the real personalities (and the kernel) can be compared with it through the public API:
- regular files are a ``bytearray`` (its length is ``i_size``) plus a block map at
  ``s_blocksize`` granularity: a block is absent (hole), UNWRITTEN (preallocated, reads zero)
  or WRITTEN.  SEEK_DATA finds WRITTEN blocks only, as ext4/XFS do for unwritten extents with
  no cached pages; ``i_blocks`` counts absent-or-not, in 512-byte units;
- fallocate: mode 0/KEEP_SIZE preallocates (holes become UNWRITTEN), PUNCH_HOLE zeroes the range
  and frees the blocks it covers entirely (ext4's EOF rule: nothing at or past EOF, a range
  crossing EOF is cut at the end of the block holding EOF), ZERO_RANGE zeroes it, turns whole blocks UNWRITTEN
  and allocates hole edge blocks UNWRITTEN (a WRITTEN edge block stays WRITTEN) — what ext4
  shows once the blocks are allocated (not delayed);
- directories map names to ``(ino, cookie)``; cookies grow, so readdir can resume;
  ``i_nlink`` of a directory is 2 + subdirectories; symlinks, hard links, xattrs;
- an unlinked inode lives until ``evict_inode`` (its last open file closed).

The device only identifies the image: ``mkfs`` writes a magic and a random id in block 0 and
keeps the filesystem in a process-wide table under that id, so ``mount`` after ``mkfs`` (and a
remount) finds it.  Contents are not written to the device.

Locks: directory operations run with the VFS's ``i_rwsem`` locks held (see ``ufs.vfs.ops``);
``read_iter`` takes ``i_rwsem`` shared, ``write_iter``/``fallocate`` exclusive.  ``MemSuper._lock``
(a leaf) guards the inode table and the space counters.
"""
from __future__ import annotations

import errno as _errno
import os
import stat as _stat
import threading
import time
import uuid

from ufs.errors import (
    CorruptError,
    InvalidError,
    NoSpaceError,
    NotFoundError,
    NotSupportedError,
    from_errno,
)
from ufs.registry import OptionSpec, Personality
from ufs.vfs import ops
from ufs.vfs.inode import Inode
from ufs.vfs.ops import FileOperations, FsckReport, Iattr, InodeOperations, KStatfs
from ufs.vfs.super import Superblock

__all__ = ["MAGIC", "UNWRITTEN", "WRITTEN", "MemInode", "MemOps", "MemSuper", "personality"]

MAGIC = b"UFSMEMFS"
UNWRITTEN = 1
WRITTEN = 2
ROOT_INO = 1

_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_IMAGES: dict[bytes, MemSuper] = {}
_IMAGES_LOCK = threading.Lock()


def _now() -> int:
    return time.time_ns()


class MemInode(Inode):
    """A memfs inode: the VFS inode plus its contents."""

    def __init__(self, sb, ino: int, mode: int, nlink: int, dir=None):
        uid, gid, mode = ops.inode_init_owner(dir, mode)
        super().__init__(sb, ino, mode, uid=uid, gid=gid, nlink=nlink)
        self.i_op = sb.ops
        self.i_fop = sb.ops
        self.data = bytearray()             # regular file bytes, len == i_size
        self.blocks: dict[int, int] = {}    # block index -> UNWRITTEN / WRITTEN
        self.entries: dict[str, tuple] = {}  # directory: name -> (ino, cookie)
        self.next_cookie = 1
        self.target = ""                    # symlink body
        self.xattrs: dict[str, bytes] = {}

    @property
    def i_blocks(self) -> int:
        return len(self.blocks) * (self.i_sb.s_blocksize // 512)


class MemSuper(Superblock):
    """A memfs instance; its own ``s_op``."""

    root_ino = ROOT_INO

    def __init__(self, block_size: int = 4096, *, capacity: int = 1 << 30, max_inodes: int = 1 << 20,
                 max_links: int = 0, name: str = "memfs"):
        super().__init__(None, block_size, name=name)
        self.s_op = self
        self.s_maxbytes = ops.MAX_LFS_FILESIZE
        self.s_max_links = max_links
        self.s_dev = 0
        self.capacity_blk = capacity // block_size
        self.max_inodes = max_inodes
        self.ops = MemOps(self)
        self._lock = threading.Lock()
        self._inodes: dict[int, MemInode] = {}
        self._next_ino = ROOT_INO
        self.used_blk = 0
        self.mounted = False
        self.fsync_calls = 0
        self.sync_fs_calls = 0
        root = self.new_inode(_stat.S_IFDIR | 0o755, nlink=2)
        root.i_size = block_size

    # -- inode table ---------------------------------------------------------------------------
    def new_inode(self, mode: int, nlink: int = 1, dir=None) -> MemInode:
        with self._lock:
            if len(self._inodes) >= self.max_inodes:
                raise NoSpaceError(_errno.ENOSPC, "no free inodes")
            ino = self._next_ino
            self._next_ino += 1
            inode = MemInode(self, ino, mode, nlink, dir)
            self._inodes[ino] = inode
            return inode

    def iget(self, ino: int) -> MemInode:
        inode = self._inodes.get(ino)
        if inode is None:
            raise NotFoundError(_errno.ENOENT, f"memfs: no inode {ino}")
        return inode

    def evict_inode(self, inode) -> None:
        if inode.i_nlink != 0:
            return
        with self._lock:
            if self._inodes.pop(inode.i_ino, None) is not None:
                self.used_blk -= len(inode.blocks)
        inode.blocks.clear()
        inode.data = bytearray()

    def charge(self, new_blocks: int) -> None:
        """Account ``new_blocks`` more blocks; ENOSPC (nothing charged) if the image is full."""
        if new_blocks <= 0:
            return
        with self._lock:
            if self.used_blk + new_blocks > self.capacity_blk:
                raise NoSpaceError(_errno.ENOSPC, "memfs is full")
            self.used_blk += new_blocks

    def uncharge(self, n: int) -> None:
        with self._lock:
            self.used_blk -= n

    # -- super operations --------------------------------------------------------------------
    def statfs(self) -> KStatfs:
        with self._lock:
            free = self.capacity_blk - self.used_blk
            return KStatfs(f_bsize=self.s_blocksize, f_blocks=self.capacity_blk, f_bfree=free,
                           f_bavail=free, f_files=self.max_inodes,
                           f_ffree=self.max_inodes - len(self._inodes))

    def sync_fs(self, wait: bool) -> None:
        self.sync_fs_calls += 1

    def put_super(self) -> None:
        # orphans (unlinked while open) die with the mount, as on a real filesystem's unmount
        for inode in [i for i in self._inodes.values() if i.i_nlink == 0]:
            self.evict_inode(inode)
        self.mounted = False

    # -- consistency (fsck) ---------------------------------------------------------------------
    def check(self) -> list:
        """Every violated invariant, one line each."""
        errs = []
        refs: dict[int, int] = {}
        subdirs: dict[int, int] = {}
        used = 0
        for ino, inode in self._inodes.items():
            used += len(inode.blocks)
            if _stat.S_ISDIR(inode.i_mode):
                for name, (child, _c) in inode.entries.items():
                    if not name or "/" in name or len(os.fsencode(name)) > 255 or name in (".", ".."):
                        errs.append(f"inode {ino}: bad entry name {name!r}")
                    c = self._inodes.get(child)
                    if c is None:
                        errs.append(f"inode {ino}: entry {name!r} -> missing inode {child}")
                        continue
                    refs[child] = refs.get(child, 0) + 1
                    if _stat.S_ISDIR(c.i_mode):
                        subdirs[ino] = subdirs.get(ino, 0) + 1
            elif _stat.S_ISREG(inode.i_mode) and len(inode.data) != inode.i_size:
                errs.append(f"inode {ino}: {len(inode.data)} bytes held, i_size {inode.i_size}")
        for ino, inode in self._inodes.items():
            if inode.i_nlink == 0:
                continue                    # an open orphan
            if _stat.S_ISDIR(inode.i_mode):
                want = 2 + subdirs.get(ino, 0)
                if refs.get(ino, 0) != (0 if ino == ROOT_INO else 1):
                    errs.append(f"directory inode {ino} has {refs.get(ino, 0)} names")
            else:
                want = refs.get(ino, 0)
            if inode.i_nlink != want:
                errs.append(f"inode {ino}: i_nlink {inode.i_nlink}, expected {want}")
        if used != self.used_blk:
            errs.append(f"space: {used} blocks used, counter says {self.used_blk}")
        return errs


class MemOps(InodeOperations, FileOperations):
    """Inode and file operations of memfs (one object per superblock)."""

    def __init__(self, sb: MemSuper):
        self.sb = sb

    # -- helpers ---------------------------------------------------------------------------------
    def _add_entry(self, dir: MemInode, name: str, inode: MemInode) -> None:
        dir.entries[name] = (inode.i_ino, dir.next_cookie)
        dir.next_cookie += 1
        dir.i_mtime_ns = dir.i_ctime_ns = _now()

    def _del_entry(self, dir: MemInode, name: str) -> None:
        del dir.entries[name]
        dir.i_mtime_ns = dir.i_ctime_ns = _now()

    def _drop_link(self, inode: MemInode) -> None:
        inode.i_nlink -= 1
        inode.i_ctime_ns = _now()

    # -- namespace -----------------------------------------------------------------------------
    def lookup(self, dir, name):
        e = dir.entries.get(name)
        return None if e is None else self.sb.iget(e[0])

    def create(self, dir, name, mode):
        inode = self.sb.new_inode(mode, nlink=1, dir=dir)
        self._add_entry(dir, name, inode)
        return inode

    def mkdir(self, dir, name, mode):
        inode = self.sb.new_inode(mode, nlink=2, dir=dir)
        inode.i_size = self.sb.s_blocksize
        self._add_entry(dir, name, inode)
        dir.i_nlink += 1
        return inode

    def symlink(self, dir, name, target):
        inode = self.sb.new_inode(_stat.S_IFLNK | 0o777, nlink=1, dir=dir)
        inode.target = target
        inode.i_size = len(os.fsencode(target))
        self._add_entry(dir, name, inode)
        return inode

    def link(self, inode, dir, name):
        self._add_entry(dir, name, inode)
        inode.i_nlink += 1
        inode.i_ctime_ns = _now()

    def unlink(self, dir, name, inode):
        self._del_entry(dir, name)
        self._drop_link(inode)

    def rmdir(self, dir, name, inode):
        self._del_entry(dir, name)
        inode.i_nlink = 0
        dir.i_nlink -= 1

    def rename(self, old_dir, old_name, source, new_dir, new_name, target, flags):
        src_is_dir = _stat.S_ISDIR(source.i_mode)
        if flags & ops.RENAME_EXCHANGE:
            tgt_is_dir = _stat.S_ISDIR(target.i_mode)
            old_dir.entries[old_name] = (target.i_ino, old_dir.next_cookie)
            old_dir.next_cookie += 1
            new_dir.entries[new_name] = (source.i_ino, new_dir.next_cookie)
            new_dir.next_cookie += 1
            if old_dir is not new_dir and src_is_dir != tgt_is_dir:
                delta = 1 if src_is_dir else -1       # new_dir gains source, loses target
                new_dir.i_nlink += delta
                old_dir.i_nlink -= delta
            now = _now()
            for i in (old_dir, new_dir):
                i.i_mtime_ns = i.i_ctime_ns = now
            source.i_ctime_ns = target.i_ctime_ns = now
            return
        if target is not None:
            if _stat.S_ISDIR(target.i_mode):
                target.i_nlink = 0
                new_dir.i_nlink -= 1
            else:
                self._drop_link(target)
            self._del_entry(new_dir, new_name)
        self._del_entry(old_dir, old_name)
        self._add_entry(new_dir, new_name, source)
        if src_is_dir and old_dir is not new_dir:
            old_dir.i_nlink -= 1
            new_dir.i_nlink += 1
        source.i_ctime_ns = _now()

    def readlink(self, inode):
        return inode.target

    def readdir(self, dir, pos):
        for name, (ino, cookie) in sorted(dir.entries.items(), key=lambda kv: kv[1][1]):
            if cookie > pos:
                child = self.sb._inodes.get(ino)
                dt = ops.dirent_type(child.i_mode) if child is not None else ops.DT_UNKNOWN
                yield name, ino, dt, cookie

    # -- attributes ----------------------------------------------------------------------------
    def setattr(self, inode, attrs: Iattr):
        if attrs.size is not None:
            self._truncate(inode, attrs.size)
        ops.setattr_copy(inode, attrs)

    def getxattr(self, inode, name):
        try:
            return inode.xattrs[name]
        except KeyError:
            raise from_errno(_errno.ENODATA, "no such xattr") from None

    def listxattr(self, inode):
        return list(inode.xattrs)

    def setxattr(self, inode, name, value, flags):
        if not name.startswith("user."):
            raise NotSupportedError(_errno.EOPNOTSUPP, "memfs stores user.* xattrs only")
        inode.xattrs[name] = bytes(value)

    def removexattr(self, inode, name):
        if inode.xattrs.pop(name, None) is None:
            raise from_errno(_errno.ENODATA, "no such xattr")

    # -- data ---------------------------------------------------------------------------------------
    def _bs(self) -> int:
        return self.sb.s_blocksize

    def _set_blocks(self, inode, first_blk: int, end_blk: int, state: int, *, only_holes=False):
        """Set blocks [first_blk, end_blk) to ``state`` (charging new ones)."""
        new = sum(1 for b in range(first_blk, end_blk) if b not in inode.blocks)
        self.sb.charge(new)
        for b in range(first_blk, end_blk):
            if only_holes and b in inode.blocks:
                continue
            inode.blocks[b] = state

    def _free_blocks(self, inode, first_blk: int, end_blk: int) -> None:
        gone = [b for b in inode.blocks if first_blk <= b < end_blk]
        for b in gone:
            del inode.blocks[b]
        self.sb.uncharge(len(gone))

    def _truncate(self, inode, size: int) -> None:
        """``truncate_setsize`` + block freeing: a truncate that does not grow the file frees
        every block past the new EOF, preallocated ones included (as ext4 does)."""
        bs = self._bs()
        old = inode.i_size
        if size <= old:
            del inode.data[size:]
            self._free_blocks(inode, -(-size // bs), 1 << 62)
        else:
            inode.data.extend(bytes(size - old))
        inode.i_size = size

    def _write(self, inode, pos: int, data) -> int:
        n = len(data)
        bs = self._bs()
        end = pos + n
        self._set_blocks(inode, pos // bs, -(-end // bs), WRITTEN)
        if end > len(inode.data):
            inode.data.extend(bytes(end - len(inode.data)))
        inode.data[pos:end] = data
        if end > inode.i_size:
            inode.i_size = end
        return n

    def fallocate(self, inode, mode, pos, length):
        bs = self._bs()
        end = pos + length
        keep = bool(mode & ops.FALLOC_FL_KEEP_SIZE)
        kind = mode & ~ops.FALLOC_FL_KEEP_SIZE
        inode.i_rwsem.down_write()
        try:
            inode.inode_dio_wait()
            if kind == 0:
                self._set_blocks(inode, pos // bs, -(-end // bs), UNWRITTEN, only_holes=True)
            elif kind == ops.FALLOC_FL_PUNCH_HOLE:
                # as ext4: nothing at or past EOF; a range crossing EOF ends with the block
                # holding EOF (so that block is freed when the range starts at its beginning)
                if pos < inode.i_size:
                    if end > inode.i_size:
                        end = -(-inode.i_size // bs) * bs
                    zend = min(end, inode.i_size)
                    inode.data[pos:zend] = bytes(zend - pos)
                    self._free_blocks(inode, -(-pos // bs), end // bs)
            elif kind == ops.FALLOC_FL_ZERO_RANGE:
                zend = min(end, inode.i_size)
                if zend > pos:
                    inode.data[pos:zend] = bytes(zend - pos)
                # whole blocks become unwritten; partial edge blocks keep their state (their
                # bytes were zeroed above), or are allocated unwritten if they were holes
                self._set_blocks(inode, pos // bs, -(-end // bs), UNWRITTEN, only_holes=True)
                for b in range(-(-pos // bs), end // bs):
                    inode.blocks[b] = UNWRITTEN
            else:
                raise NotSupportedError(_errno.EOPNOTSUPP, "memfs: unsupported fallocate mode")
            if not keep and end > inode.i_size:
                self._truncate(inode, end)
            inode.i_mtime_ns = inode.i_ctime_ns = _now()
        finally:
            inode.i_rwsem.up_write()

    def seek_data_hole(self, inode, pos, whence):
        bs = self._bs()
        inode.i_rwsem.down_read()
        try:
            size = inode.i_size
            if pos >= size:
                raise from_errno(_errno.ENXIO, "past EOF")
            last_blk = -(-size // bs)
            written = sorted(b for b, st in inode.blocks.items()
                             if st == WRITTEN and pos // bs <= b < last_blk)
            if whence == _SEEK_DATA:
                if not written:
                    raise from_errno(_errno.ENXIO, "no data after offset")
                return max(pos, written[0] * bs)
            b = pos // bs
            for w in written:
                if w != b:
                    break
                b += 1
            return min(size, max(pos, b * bs))
        finally:
            inode.i_rwsem.up_read()

    # -- file operations ---------------------------------------------------------------------------
    def read_iter(self, iocb, buf):
        inode = iocb.ki_filp.f_inode
        inode.i_rwsem.down_read()
        try:
            pos = iocb.ki_pos
            chunk = inode.data[pos:pos + len(buf)] if pos < inode.i_size else b""
            n = len(chunk)
            memoryview(buf).cast("B")[:n] = chunk
            iocb.ki_pos = pos + n
            inode.i_atime_ns = _now()
        finally:
            inode.i_rwsem.up_read()
        return n

    def write_iter(self, iocb, data):
        from ufs.iomap import Iocb

        inode = iocb.ki_filp.f_inode
        inode.i_rwsem.down_write()
        try:
            count = ops.generic_write_checks(iocb, len(data), self.sb.s_maxbytes)
            pos = iocb.ki_pos
            n = self._write(inode, pos, bytes(data[:count]))
            iocb.ki_pos = pos + n
            inode.i_mtime_ns = inode.i_ctime_ns = _now()
        finally:
            inode.i_rwsem.up_write()
        if n and iocb.ki_flags & Iocb.DSYNC:
            iocb.ki_filp.vfs_fsync_range(pos, pos + n, not (iocb.ki_flags & Iocb.SYNC))
        return n

    def fsync(self, file, start, end, datasync):
        self.sb.fsync_calls += 1


# --- the personality record -------------------------------------------------------------------

def _image_id(device) -> bytes | None:
    lbs = max(512, getattr(device, "logical_block_size", 512) or 512)
    try:
        buf = bytes(device.pread(lbs, 0))
    except OSError:
        return None
    if buf[:len(MAGIC)] != MAGIC:
        return None
    return buf[len(MAGIC):len(MAGIC) + 16]


def _mkfs(device, geometry, options):
    bs = geometry.block_size if geometry is not None else 4096
    sb = MemSuper(bs, capacity=options.get("capacity") or (1 << 30),
                  max_inodes=options.get("max_inodes") or (1 << 20),
                  max_links=options.get("max_links") or 0)
    ident = uuid.uuid4().bytes
    lbs = max(512, getattr(device, "logical_block_size", 512) or 512)
    device.pwrite((MAGIC + ident).ljust(lbs, b"\0"), 0)
    device.flush()
    with _IMAGES_LOCK:
        _IMAGES[ident] = sb
    return sb


def _mount(device, options, readonly=False):
    ident = _image_id(device)
    if ident is None:
        raise InvalidError(_errno.EINVAL, "not a memfs image (no magic in block 0)")
    with _IMAGES_LOCK:
        sb = _IMAGES.get(ident)
        if sb is None:
            raise CorruptError("memfs image", "block 0",
                               "formatted by another process: memfs contents live in memory")
        if sb.mounted:
            raise from_errno(_errno.EBUSY, "memfs image is already mounted")
        sb.mounted = True
    return sb


def _fsck(device, repair=False):
    ident = _image_id(device)
    report = FsckReport("memfs")
    sb = _IMAGES.get(ident) if ident is not None else None
    if sb is None:
        report.errors.append("block 0: no memfs image")
        return report
    report.errors.extend(sb.check())
    report.stats.update(inodes=len(sb._inodes), blocks=sb.used_blk)
    return report


def _probe(buf: bytes) -> bool:
    return buf[:len(MAGIC)] == MAGIC


_OPTIONS = {
    "capacity": OptionSpec(int, 1 << 30, help="bytes of data the image holds (ENOSPC after)"),
    "max_inodes": OptionSpec(int, 1 << 20, help="inode limit"),
    "max_links": OptionSpec(int, 0, help="s_max_links (0: no limit)"),
    "lockdep": OptionSpec(bool, False, help="check lock order (ufs.vfs.lockdep)"),
}

_PERSONALITY = Personality(
    name="memfs", description="in-memory POSIX model (ufs.testing.memfs)", probe=_probe,
    mkfs=_mkfs, mount=_mount, fsck=_fsck, options=_OPTIONS, version="1",
    source="ufs.testing.memfs")


def personality() -> Personality:
    """The memfs ``Personality`` record (register it, or pass it as ``personality=``)."""
    return _PERSONALITY

"""xfslike fsck: check every structure, account for every block, optionally repair.

Layer: personality.  Imports ``ufs.errors``, ``ufs.vfs.ops`` (FsckReport) and this package.

The check runs on an **overlay** of the device (writes kept in memory): the journal is
replayed into it, so a filesystem that crashed can be checked without changing the device; with
``repair=True`` the overlay (replayed journal + repairs + a clean unmount) is written back at
the end.

What is checked, in order (each problem is one line naming what and where):
1. the primary superblock (and with it the geometry), then journal recovery;
2. each AG: header, both free-space trees (order, fill, levels, equal contents, counters), the
   AGFL; the inobt (structure), every inode of every chunk (CRC, self number, free mask agrees
   with ``mode``), the AG's ``icount``/``ifree``;
3. every allocated inode: data fork (extent list / bmbt structure, extents inside the fs and
   one AG, ``nextents``, ``nblocks``), directories (short form / dirbt, entries naming allocated
   inodes, ``..`` naming the parent), symlinks;
4. link counts (entries naming an inode; directories 2 + subdirectories) and the unlinked list
   (exactly the inodes with no links);
5. space: every block of every AG is exactly one of free (bnobt), AG metadata (headers, log,
   AGFL, tree nodes, inode chunks), or owned by one inode (data, bmbt/dirbt nodes, xattr).

Repairs (``repair=True``) that lose nothing provably good: leaked blocks go back to free space;
blocks both in use and free are taken out of free space; wrong link counts are set to the
counted value; unreferenced inodes with no links (lost orphans) are freed; directory entries
naming free inodes are removed.
"""
from __future__ import annotations

import stat as _stat

from ufs.errors import CorruptError
from ufs.vfs.ops import FsckReport

from . import format as fmt
from .alloc import Metadata
from .bmap import ExtentMap
from .dir import DirState

__all__ = ["OverlayDev", "fsck"]


class OverlayDev:
    """A device whose writes stay in memory (per logical block) over a read-only base."""

    def __init__(self, base):
        self.base = base
        self.size = base.size
        self.logical_block_size = base.logical_block_size
        self.sectors: dict[int, bytes] = {}
        self.path = getattr(base, "path", None)

    def pread(self, length, addr):
        lbs = self.logical_block_size
        if not self.sectors:
            return self.base.pread(length, addr)
        out = bytearray(self.base.pread(length, addr))
        for i in range(0, length, lbs):
            s = self.sectors.get(addr + i)
            if s is not None:
                out[i:i + lbs] = s
        return bytes(out)

    def pwrite(self, buf, addr, *, fua=False):
        data = bytes(buf)
        lbs = self.logical_block_size
        for i in range(0, len(data), lbs):
            self.sectors[addr + i] = data[i:i + lbs]
        return len(data)

    def flush(self):
        pass

    def write_back(self) -> None:
        for addr in sorted(self.sectors):
            self.base.pwrite(self.sectors[addr], addr)
        self.base.flush()


def fsck(device, repair: bool = False) -> FsckReport:
    rep = FsckReport("xfslike")
    ov = OverlayDev(device)
    try:
        md = Metadata.open(ov, read_only=False)
    except (CorruptError, OSError) as e:
        rep.errors.append(f"cannot open the filesystem: {e}")
        return rep
    rep.stats["log_records_replayed"] = md.replayed
    from .super import XfsSuper
    fs = XfsSuper(ov, md, None, readonly=True)
    ck = _Checker(fs, rep, repair)
    ck.run()
    if repair:
        fs.readonly = False
        md.read_only = False
        try:
            ck.repair()
            fs.put_super()
        except (CorruptError, OSError) as e:
            rep.errors.append(f"repair failed: {e}")
            return rep
        ov.write_back()
    return rep


class _Checker:
    def __init__(self, fs, rep, repair):
        self.fs = fs
        self.md = fs.md
        self.sb = fs.md.sb
        self.rep = rep
        self.repair_wanted = repair
        self.used: list = []             # (start_blk, len_blk, owner description)
        self.free: list = []             # (start_blk, len_blk)
        self.inodes: dict = {}           # ino -> XfsInode (allocated)
        self.links: dict = {}            # ino -> entries naming it
        self.subdirs: dict = {}          # dir ino -> subdirectories
        self.parent_of: dict = {}        # dir ino -> the dir whose entry names it
        self.fix_nlink: list = []
        self.fix_free: list = []
        self.fix_entries: list = []
        self.fix_leaks: list = []
        self.fix_claims: list = []

    def err(self, msg: str) -> None:
        self.rep.errors.append(msg)

    def run(self) -> None:
        fs = self.fs
        bs = fs.block_size
        for ag in self.md.alloc.ags:
            self._check_ag(ag)
        for ino, inode in sorted(self.inodes.items()):
            try:
                self._check_inode(inode)
            except CorruptError as e:
                self.err(f"inode {ino}: {e}")
        self._check_links()
        self._check_space()
        self.rep.stats.update(inodes=len(self.inodes), block_size=bs,
                              total_blk=self.sb.total_blk,
                              used_blk=sum(n for _, n, _ in self.used),
                              free_blk=sum(n for _, n in self.free))

    # -- AGs -------------------------------------------------------------------------------
    def _tree_blocks(self, tree, what):
        for b in tree.node_blocks():
            self.used.append((b, 1, what))

    def _check_ag(self, ag) -> None:
        where = f"AG {ag.agno}"
        try:
            agh = ag.header()
        except CorruptError as e:
            self.err(f"{where}: {e}")
            return
        for s, e in ag.fixed:
            self.used.append((ag.start_blk + s, e - s, f"{where} fixed blocks"))
        for b in agh.agfl:
            self.used.append((ag.start_blk + b, 1, f"{where} AGFL"))
        try:
            ag.check()
        except CorruptError as e:
            self.err(f"{where} free space: {e}")
        try:
            for s, n in ag.bno.iterate():
                self.free.append((ag.start_blk + s, n))
            self._tree_blocks(ag.bno, f"{where} bnobt")
            self._tree_blocks(ag.cnt, f"{where} cntbt")
        except CorruptError as e:
            self.err(f"{where} free-space tree: {e}")
        ia = self.fs.ialloc
        tree = ia.trees[ag.agno]
        try:
            tree.check()
            self._tree_blocks(tree, f"{where} inobt")
            recs = list(tree.iterate())
        except CorruptError as e:
            self.err(f"{where} inobt: {e}")
            return
        icount = ifree = 0
        for start, mask in recs:
            blk0 = start // self.fs.ipb
            self.used.append((blk0, ia.chunk_blk, f"{where} inode chunk {start}"))
            icount += ia.chunk_inodes
            for i in range(ia.chunk_inodes):
                ino = start + i
                free = bool(mask >> i & 1)
                ifree += free
                try:
                    di = self.fs.read_dinode(ino)
                except CorruptError as e:
                    self.err(f"{e}")
                    continue
                if free != (di.mode == 0):
                    self.err(f"inode {ino}: inobt says {'free' if free else 'in use'}, "
                             f"mode is {di.mode:#o}")
                    continue
                if not free:
                    try:
                        self.inodes[ino] = self.fs._inode_obj(ino)
                    except CorruptError as e:
                        self.err(f"inode {ino}: {e}")
        if icount != agh.icount or ifree != agh.ifree:
            self.err(f"{where} header: icount/ifree {agh.icount}/{agh.ifree}, "
                     f"chunks say {icount}/{ifree}")

    # -- inodes ----------------------------------------------------------------------------
    def _extents(self, inode, what):
        fs = self.fs
        bm = ExtentMap(fs, inode)
        if bm.tree is not None:
            bm.tree.check()
            for b in bm.tree_blocks():
                self.used.append((b, 1, f"inode {inode.i_ino} bmbt"))
        data = 0
        for off, dev_blk, n, flags in bm.ext:
            agno = dev_blk // self.sb.ag_blk
            if (dev_blk + n > self.sb.total_blk or (dev_blk + n - 1) // self.sb.ag_blk != agno):
                self.err(f"inode {inode.i_ino}: {what} extent {(off, dev_blk, n, flags)} "
                         "outside the filesystem or across AGs")
                continue
            self.used.append((dev_blk, n, f"inode {inode.i_ino} {what}"))
            data += n
        return data + len(bm.tree_blocks())

    def _check_inode(self, inode) -> None:
        di = inode.di
        ino = di.ino
        mode = di.mode
        nblocks = 0
        if di.xattr_blk != fmt.NULL_BLK:
            self.used.append((di.xattr_blk, 1, f"inode {ino} xattrs"))
            nblocks += 1
        if _stat.S_ISREG(mode):
            if di.data_format not in (fmt.FMT_EXTENTS, fmt.FMT_BTREE):
                self.err(f"inode {ino}: regular file with data format {di.data_format}")
                return
            nblocks += self._extents(inode, "data")
        elif _stat.S_ISLNK(mode):
            if di.data_format == fmt.FMT_INLINE:
                if di.inline_len != di.size:
                    self.err(f"inode {ino}: inline symlink of {di.inline_len} bytes, size {di.size}")
            else:
                nblocks += self._extents(inode, "symlink")
        elif _stat.S_ISDIR(mode):
            d = DirState(self.fs, inode)
            if d.tree is not None:
                d.tree.check()
                for b in d.tree_blocks():
                    self.used.append((b, 1, f"inode {ino} dirbt"))
                nblocks += len(d.tree_blocks())
            n = 0
            for name, child, _ftype, _c in d.iterate(0):
                n += 1
                if child not in self.inodes:
                    self.err(f"directory {ino}: entry {name!r} names free inode {child}")
                    self.fix_entries.append((ino, name))
                    continue
                self.links[child] = self.links.get(child, 0) + 1
                if _stat.S_ISDIR(self.inodes[child].di.mode):
                    self.subdirs[ino] = self.subdirs.get(ino, 0) + 1
                    if child in self.parent_of:
                        self.err(f"directory {child} has two parents")
                    self.parent_of[child] = ino
            if n != di.nextents:
                self.err(f"directory {ino}: {n} entries, nextents says {di.nextents}")
            inode.fsck_parent = d.get_parent()
        elif di.data_format != fmt.FMT_DEV:
            self.err(f"inode {ino}: special file with data format {di.data_format}")
        if nblocks != di.nblocks:
            self.err(f"inode {ino}: nblocks {di.nblocks}, owns {nblocks}")

    def _check_links(self) -> None:
        root = self.sb.root_ino
        if root not in self.inodes or not _stat.S_ISDIR(self.inodes.get(root).di.mode):
            self.err(f"root inode {root} is not an allocated directory")
        orphans = []
        cur = self.sb.unlinked_ino
        seen = set()
        while cur:
            if cur in seen or cur not in self.inodes:
                self.err(f"unlinked list: bad inode {cur}")
                break
            seen.add(cur)
            orphans.append(cur)
            cur = self.inodes[cur].di.next_unlinked
        for ino, inode in self.inodes.items():
            di = inode.di
            if _stat.S_ISDIR(di.mode):
                want = 2 + self.subdirs.get(ino, 0) if (self.links.get(ino) or ino == root) else 0
                parent = getattr(inode, "fsck_parent", None)
                expect_parent = root if ino == root else self.parent_of.get(ino)
                if expect_parent is not None and parent != expect_parent:
                    self.err(f"directory {ino}: '..' is {parent}, parent is {expect_parent}")
            else:
                want = self.links.get(ino, 0)
            if di.nlink != want:
                if want == 0 and ino in seen:
                    continue          # open-unlinked: freed at the next mount
                if want == 0 and di.nlink:
                    self.err(f"inode {ino}: nlink {di.nlink} but no directory entry names it "
                             "(disconnected)")
                    continue
                self.err(f"inode {ino}: nlink {di.nlink}, counted {want}")
                if want:
                    self.fix_nlink.append((ino, want))
                else:
                    self.fix_free.append(ino)
            elif want == 0 and ino not in seen:
                self.err(f"inode {ino}: no links and not on the unlinked list (lost orphan)")
                self.fix_free.append(ino)
        for ino in seen:
            if self.inodes[ino].di.nlink and self.links.get(ino):
                self.err(f"inode {ino}: on the unlinked list but linked")

    # -- space -----------------------------------------------------------------------------
    def _check_space(self) -> None:
        sb = self.sb
        spans = [(s, n, o) for s, n, o in self.used] + [(s, n, "free space") for s, n in self.free]
        spans.sort()
        cur_end = 0
        cur_owner = None
        for s, n, o in spans:
            if s < cur_end:
                self.err(f"block {s} (byte {s * sb.block_size}): {o} overlaps {cur_owner}")
                # in use *and* free: take it out of free space (nothing is lost); two owners
                # of one block cannot be fixed without choosing whose data to lose
                if o == "free space" and cur_owner != "free space" or cur_owner == "free space" and o != "free space":
                    self.fix_claims.append((s, min(s + n, cur_end) - s))
            elif s > cur_end:
                self._gap(cur_end, s)
            if s + n > cur_end:
                cur_end, cur_owner = s + n, o
        self._gap(cur_end, sb.total_blk)

    def _gap(self, start: int, end: int) -> None:
        sb = self.sb
        while start < end:
            agno = start // sb.ag_blk
            ag_end = min(end, (agno + 1) * sb.ag_blk, sb.total_blk)
            self.err(f"blocks [{start}, {ag_end}) (AG {agno}) are neither free nor used (leaked)")
            self.fix_leaks.append((start, ag_end - start))
            start = ag_end

    # -- repair ----------------------------------------------------------------------------
    def repair(self) -> None:
        fs = self.fs
        rep = self.rep
        for dino, name in self.fix_entries:
            d = fs._inode_obj(dino)
            with fs.trans() as tx:
                fs.dstate(d).remove(tx, name)
                fs.log_inode(tx, d)
            rep.repaired.append(f"directory {dino}: removed entry {name!r} naming a free inode")
        for ino, want in self.fix_nlink:
            inode = fs._inode_obj(ino)
            with fs.trans() as tx:
                inode.i_nlink = want
                fs.log_inode(tx, inode)
            rep.repaired.append(f"inode {ino}: nlink set to {want}")
        for ino in self.fix_free:
            inode = fs._inode_obj(ino)
            inode.i_nlink = 0
            fs.free_inode(inode)
            rep.repaired.append(f"inode {ino}: unreferenced inode with no links freed")
        for start, n in self.fix_leaks:
            with fs.trans() as tx:
                fs.md.alloc.free(tx, start, n)
            rep.repaired.append(f"blocks [{start}, {start + n}) returned to free space")
        for start, n in self.fix_claims:
            with fs.trans() as tx:
                _claim(tx, fs.md.alloc, start, n)
            rep.repaired.append(f"blocks [{start}, {start + n}) in use: removed from free space")


def _claim(tx, allocator, start: int, n: int) -> None:
    """Take the blocks ``[start, start+n)`` out of the free-space trees (they are in use)."""
    agno, agbno = allocator.ag_of(start)
    ag = allocator.ags[agno]
    ag.lock_for(tx)
    agh = ag.header(tx)
    ag._fix_freelist(tx)
    end = agbno + n
    while agbno < end:
        rec = ag.bno.lookup_le(agbno)
        if rec is None or rec[0] + rec[1] <= agbno:
            nxt = ag.bno.lookup_ge(agbno)
            if nxt is None or nxt[0] >= end:
                break
            agbno = nxt[0]
            continue
        take = min(end, rec[0] + rec[1]) - agbno
        ag._remove_free(tx, agbno, take, rec)
        agh.free_blk -= take
        agbno += take
    ag._update_longest(agh)
    ag._fix_freelist(tx)

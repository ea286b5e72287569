"""xfslike fsck: check every structure, account for every block, and repair what can be repaired.

Layer: personality.  Imports ``ufs.errors``, ``ufs.vfs.ops`` (FsckReport, dirent_type) and this
package (``format``, ``alloc`` for the superblock reader / log set-up / AGFL bounds, ``btree``
for the salvage walk and the bulk builder, ``dir`` for the name hash and the short-form
layout).  It does not mount: it never goes through the buffer cache, transactions or the
inode layer, so a structure those would refuse (bad CRC, wrong owner) is just one more thing
to look at.

Everything runs on an **overlay** of the device (writes kept in memory): the journal is
replayed into it first, so a crashed filesystem is checked as a mount would see it without
changing the device.  A dirty journal that cannot be replayed makes ``repair`` refuse
(CorruptError, EUCLEAN: the CLI exits 8); a clean filesystem whose log header is damaged gets a
fresh one.  With ``repair=True`` the overlay (replay + repairs + a clean superblock) is written
back at the end, all at once; nothing is written when the repair is refused.

Phases, in the spirit of xfs_repair (each problem is one line naming what and where):

1. superblock (primary; the copies must repeat its geometry), journal replay;
2. per AG: header, AGFL, both free-space trees, inobt (``btree.salvage_walk``: every node
   verified, unreadable subtrees skipped), inode chunks and every inode in them (an inode that
   does not verify is cleared; the inobt free mask follows the inodes, not the other way).
   Inodes verify themselves, so the chunks under an unreadable inobt subtree are found again
   by reading the blocks of its key range, and an unreadable AG header is rebuilt (its trees
   come from the scan and from the used blocks) -- both up to ``SCAN_CAP_BLK`` blocks read;
3. per inode: data fork (extent array or bmbt: bad records, extents outside the filesystem or
   across AGs are dropped), directory entries (short form or dirbt), xattr block;
4. ownership of every block.  Claims are resolved in a fixed order, first owner wins: fixed
   AG blocks, inode chunks, AG tree nodes, inode tree nodes (bmbt/dirbt: all of these verify
   themselves), then xattr blocks and file data by inode number and file offset, the AGFL
   last (its blocks hold nothing).  The loser's pieces are dropped and reported with inode,
   file offset and the winner;
5. namespace: from the root (recreated empty, in its slot, when it is not a directory), entries
   naming free or invalid inodes are removed, a second entry
   naming a directory is removed, ``..`` is set to the real parent; inodes reachable from no
   directory go to ``/lost+found/<ino>`` (created, mode 0700, when missing) unless they have no
   links (lost orphans: freed); orphans on the unlinked list are freed (a crashed filesystem's
   pending orphans are recovery work, reported under ``stats["orphans"]``, not as problems);
   link counts become the counted entries (directories: 2 + subdirectories);
6. space: the free set is what nobody owns.  An AG whose free-space trees are corrupt or
   disagree with it gets both trees rebuilt from scratch (``btree.bulk_build``), its AGFL
   refilled to the middle of its bounds, and its header counters rewritten; trees that must
   change for other reasons (bmbt, dirbt, inobt) are rebuilt the same way in blocks taken
   from the free set.  The superblock's summary counters are checked when it says CLEAN and
   rewritten by every repair.

Repair rewrites only what must change (and the primary superblock, written clean), so a second
fsck after a repair is clean and every file whose blocks were not damaged reads back the same
bytes.  It refuses (the report says "repair not attempted", nothing is written) when a lost AG
header or inobt subtree would need a scan beyond ``SCAN_CAP_BLK`` blocks, or no inode can be
found for a new root or lost+found; it reports "repair failed" (nothing written) when the free
space cannot hold the rebuilt trees.

Public: ``fsck(device, repair=False) -> FsckReport``; ``OverlayDev`` (also the read-only
mount's overlay); ``LOST_FOUND``; ``SCAN_CAP_BLK``.  Locks: none (offline: ``ufs.api.fsck``
holds the image's exclusive claim).
"""
from __future__ import annotations

import collections
import stat as _stat
import struct
import time

from ufs.errors import CorruptError
from ufs.vfs.ops import FsckReport, dirent_type

from . import format as fmt
from .alloc import Metadata, _agfl_bounds, read_superblock
from .btree import bulk_build, bulk_level, bulk_nodes_needed, salvage_walk
from . import dir as _dir
from .dir import DOTDOT, DT_DIR

__all__ = ["LOST_FOUND", "SCAN_CAP_BLK", "OverlayDev", "fsck"]

#: name of the directory (in the root) that repair puts disconnected inodes in
LOST_FOUND = b"lost+found"

_SF_HDR = struct.Struct("<Q")
_SF_ENT = struct.Struct("<QIBB")          # dir.py's short-form entry: ino, coll, ftype, namelen
_FILE_TYPES = (_stat.S_IFREG, _stat.S_IFDIR, _stat.S_IFLNK, _stat.S_IFCHR, _stat.S_IFBLK,
               _stat.S_IFIFO, _stat.S_IFSOCK)

#: most blocks read to find the inode chunks of lost inobt subtrees (beyond: repair refuses)
SCAN_CAP_BLK = 1 << 18

# claim priorities (lower wins a block claimed twice): structures that verify themselves
# (headers, inodes, tree nodes with magic/owner/CRC) before file data, which cannot; the AGFL
# last, since an AGFL block holds nothing (giving it up loses no data)
_P_FIXED, _P_CHUNK, _P_AGTREE, _P_ITREE, _P_IDATA, _P_AGFL = range(6)


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
    """Check the xfslike filesystem on ``device``; with ``repair`` fix it (see the module doc).

    Returns the report; raises CorruptError (EUCLEAN) only when ``repair`` must refuse because
    the journal is dirty and cannot be replayed.
    """
    rep = FsckReport("xfslike")
    ov = OverlayDev(device)
    from_copy = False
    try:
        sb = _open_sb(ov, read_superblock(ov))
    except (CorruptError, OSError) as e:
        copy = _find_sb_copy(ov)
        if copy is None:
            rep.errors.append(f"cannot open the filesystem: {_msg(e)} (and no superblock copy found)")
            return rep
        rep.errors.append(f"superblock: {_msg(e)}")
        if repair:
            rep.repaired.append(f"primary superblock rewritten from the copy at block "
                                f"{copy.ag_blk}")
        # the copy's geometry and UUID; its counters, state and root are mkfs-time values
        sb, from_copy = copy, True
        sb.state &= ~fmt.SB_STATE_CLEAN
    was_clean = bool(sb.state & fmt.SB_STATE_CLEAN)
    md = Metadata(ov, sb)
    log_bad = None
    try:
        md.replayed = md.log.recover()
    except (CorruptError, OSError) as e:
        log_bad = e
    if log_bad is not None:
        if not was_clean:
            msg = (f"journal: the filesystem was not cleanly unmounted and its log cannot be "
                   f"replayed ({_msg(log_bad)})")
            if repair:
                raise CorruptError("journal", fmt.where(sb.log_start_blk, sb.block_size),
                                   "the log is dirty (not cleanly unmounted) and cannot be "
                                   f"replayed ({_msg(log_bad)}); refusing to repair: the changes it "
                                   "holds would be lost")
            rep.errors.append(msg)
        else:
            rep.errors.append(f"journal: log header unreadable ({_msg(log_bad)}); the log is empty "
                              "(cleanly unmounted)")
    elif md.replayed:
        try:
            sb = _open_sb(ov, read_superblock(ov))
            from_copy = False                  # the log held an image of the primary
        except (CorruptError, OSError):
            if not from_copy:
                raise
    rep.stats["log_records_replayed"] = md.replayed
    ck = _Checker(ov, sb, rep, repair, was_clean and not md.replayed, log_bad)
    ck.sb_from_copy = from_copy
    ck.run()
    if repair:
        try:
            ck.apply()
        except (CorruptError, OSError) as e:
            # nothing reaches the device: the overlay is dropped with every planned change
            rep.repaired.clear()
            rep.errors.append(f"repair failed: {_msg(e)}")
            return rep
        if ck.applied:
            ov.write_back()
    return rep


def _msg(e) -> str:
    """An OSError as one line without the ``[Errno N]`` prefix."""
    return getattr(e, "strerror", None) or str(e)


def _open_sb(ov, sb):
    sb.check_features(True)
    if sb.total_blk * sb.block_size > ov.size:
        raise CorruptError("superblock", "block 0 (byte 0)", "filesystem larger than the device")
    return sb


def _find_sb_copy(ov):
    """The superblock copy in AG 1 when the primary is unreadable, or None.

    Its place depends on the geometry it describes, so every AG size mkfs could have chosen
    for this device is tried (``ceil(blocks / ag_count)``, each block size): a copy verifies
    itself (magic, CRC, its own block number, owner 1), so a hit is the filesystem's.
    """
    lbs = ov.logical_block_size
    bs = fmt.MIN_BLOCK_SIZE
    while bs <= fmt.MAX_BLOCK_SIZE:
        if bs >= lbs and bs % lbs == 0:
            total = ov.size // bs
            cands = {min(-(-total // k), fmt.MAX_AG_BLK) for k in range(2, 129)}
            for ag_blk in sorted(cands, reverse=True):
                if (ag_blk + 1) * bs > ov.size:
                    continue
                try:
                    copy = fmt.DiskSuperblock.decode(ov.pread(bs, ag_blk * bs), 1, ag_blk)
                    if copy.block_size == bs and copy.ag_blk == ag_blk:
                        return _open_sb(ov, copy)
                except (CorruptError, OSError):
                    continue
        bs *= 2
    return None


# -- small interval helpers ------------------------------------------------------------------

def _merge(ivals) -> list:
    """Sorted, coalesced [(start, end)] of any (start, end) iterable."""
    out = []
    for s, e in sorted(ivals):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _subtract(a: list, b: list) -> list:
    """Intervals of ``a`` not covered by ``b`` (both sorted and coalesced)."""
    out = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def _resolve(claims: list) -> dict:
    """Give each block to the claim with the lowest priority.

    ``claims``: [(start, end, prio, owner)].  Returns {claim index: [(start, end, winner
    owner)]} for the pieces each losing claim does not get.  Sorted sweep: only clusters of
    overlapping claims are painted one by one.
    """
    order = sorted(range(len(claims)), key=lambda i: claims[i][0])
    losses: dict = {}

    def settle(cluster):
        if len(cluster) < 2:
            return
        painted: list = []                       # disjoint (s, e, owner)
        for i in sorted(cluster, key=lambda i: claims[i][2]):
            s, e, _p, owner = claims[i]
            hits = sorted((max(s, ps), min(e, pe), po) for ps, pe, po in painted
                          if ps < e and s < pe)
            if hits:
                losses[i] = hits
            for ws, we in _subtract([(s, e)], [(a, b) for a, b, _ in hits]):
                painted.append((ws, we, owner))

    cluster: list = []
    cend = -1
    for i in order:
        s, e = claims[i][0], claims[i][1]
        if s < cend:
            cluster.append(i)
            cend = max(cend, e)
        else:
            settle(cluster)
            cluster = [i]
            cend = e
    settle(cluster)
    return losses


class _Ag:
    """What fsck knows about one AG."""

    def __init__(self, sb, agno):
        self.agno = agno
        self.start = agno * sb.ag_blk
        self.length = sb.ag_length_blk(agno)
        self.fixed = [(0, fmt.AGH_AGBNO + 1)]
        if agno == 0:
            self.fixed.append((sb.log_start_blk, sb.log_start_blk + sb.log_nblocks))
        self.agh = None
        self.bno = self.cnt = self.ino = None          # (records, nodes, problems)
        self.chunks: dict = {}        # start_ino -> free mask (final)
        self.old_chunks: dict = {}    # start_ino -> free mask as the inobt has it
        self.agfl: list = []          # agbnos kept
        self.free: list = []          # final free extents, agbno (start, end)
        self.pending: list = []       # released extents not merged into ``free`` yet
        self.rebuild_ino = False
        self.header_rebuilt = False
        self.new_agh = None


class _Ino:
    """What fsck knows about one in-use inode."""

    def __init__(self, di):
        self.di = di
        self.ext: list = []           # data extents kept (file_off, dev_blk, len, flags)
        self.tree_nodes: list = []    # verified bmbt/dirbt nodes
        self.tree_bad = False         # the bmbt/dirbt must be rebuilt
        self.ext_changed = False
        self.xattr = di.xattr_blk
        self.entries: dict | None = None   # directories: key -> [name, ino, ftype]
        self.parent = 0
        self.dir_changed = False
        self.dirty = False            # core must be rewritten


def _new_dir(ino: int, perm: int, generation: int, parent: int) -> _Ino:
    """An empty directory repair creates (a new root, or lost+found): inline, two links,
    written with the rest of the repair."""
    now = time.time_ns()
    di = fmt.DiskInode(ino=ino, mode=_stat.S_IFDIR | perm, data_format=fmt.FMT_INLINE, nlink=2,
                       generation=generation, atime_ns=now, mtime_ns=now, ctime_ns=now,
                       crtime_ns=now)
    st = _Ino(di)
    st.entries = {}
    st.parent = parent
    st.dir_changed = st.dirty = True
    return st


class _Checker:
    def __init__(self, ov, sb, rep, repair, summaries_valid, log_bad):
        self.ov = ov
        self.sb = sb
        self.rep = rep
        self.repair_wanted = repair
        self.summaries_valid = summaries_valid
        self.log_bad = log_bad
        self.bs = sb.block_size
        self.isz = sb.inode_size
        self.ipb = self.bs // self.isz
        self.chunk_blk = max(1, fmt.INODES_PER_CHUNK // self.ipb)
        self.chunk_inodes = min(fmt.INODES_PER_CHUNK, self.ipb * self.chunk_blk)
        self.full_mask = (1 << self.chunk_inodes) - 1
        self.fork_size = fmt.DiskInode.fork_size(self.isz)
        self.ext_cap = self.fork_size // fmt.EXTENT.size
        self.cache: dict = {}
        self.out: dict = {}           # blkno -> new block image (repair)
        self.ags = [_Ag(sb, a) for a in range(sb.ag_count)]
        self.inodes: dict = {}        # ino -> _Ino (in use)
        self.freed: dict = {}         # ino -> generation of inodes repair frees (or rewrites free)
        self.fatal: list = []         # what makes repair refuse
        self.sb_copy_bad: list = []
        self.applied = False
        self.orphans_pending: list = []
        self.lf_ino = None            # lost+found
        self.new_lf = None
        self.new_root = None
        self.sb_from_copy = False
        self.dead: set = set()        # in-use inodes repair frees: their blocks become free
        self.added: list = []         # (dir, child) entries repair adds (lost+found)
        self.won_by_ino: dict = {}
        self.disk_used: list = []
        self.disk_free_blk = 0
        self.fs_disagree: set = set()

    # -- reporting ---------------------------------------------------------------------------
    def err(self, msg: str) -> None:
        self.rep.errors.append(msg)

    def fixed(self, msg: str) -> None:
        if self.repair_wanted:
            self.rep.repaired.append(msg)

    def read(self, blkno: int) -> bytes:
        data = self.cache.get(blkno)
        if data is None:
            if not 0 <= blkno < self.sb.total_blk:
                raise CorruptError("block pointer", f"block {blkno}", "outside the filesystem")
            data = self.ov.pread(self.bs, blkno * self.bs)
            self.cache[blkno] = data
        return data

    def where(self, blkno: int) -> str:
        return fmt.where(blkno, self.bs)

    def ag_of_blk(self, blkno: int) -> int:
        return blkno // self.sb.ag_blk

    def ag_of_ino(self, ino: int) -> int:
        return (ino // self.ipb) // self.sb.ag_blk

    # -- the whole check ---------------------------------------------------------------------
    def run(self) -> None:
        self._check_sb_copies()
        for ag in self.ags:
            self._scan_ag(ag)
        for ino in sorted(self.inodes):
            self._scan_inode(self.inodes[ino])
        self._claims()
        self._namespace()
        self._check_space_and_counters()
        sb = self.sb
        self.rep.stats.update(inodes=len(self.inodes), block_size=self.bs,
                              total_blk=sb.total_blk, free_blk=self.disk_free_blk,
                              used_blk=sb.total_blk - self.disk_free_blk,
                              orphans=len(self.orphans_pending))

    # -- superblock copies ---------------------------------------------------------------------
    _GEO = ("uuid", "block_size", "sector_size", "inode_size", "ag_count", "total_blk", "ag_blk",
            "log_start_blk", "log_nblocks", "version", "compat", "ro_compat", "incompat")

    def _check_sb_copies(self) -> None:
        sb = self.sb
        for agno in range(1, sb.ag_count):
            blk = sb.sb_blkno(agno)
            try:
                copy = fmt.DiskSuperblock.decode(self.read(blk), agno, blk)
                bad = [f for f in self._GEO if getattr(copy, f) != getattr(sb, f)]
                if bad:
                    raise CorruptError("superblock copy", self.where(blk),
                                       f"{', '.join(bad)} differ from the primary")
            except (CorruptError, OSError) as e:
                self.err(f"AG {agno} superblock copy: {_msg(e)}")
                self.sb_copy_bad.append(agno)
                self.fixed(f"AG {agno}: superblock copy rewritten from the primary")

    # -- AGs -----------------------------------------------------------------------------------
    def _walk(self, schema, root, level, owner):
        return salvage_walk(self.read, schema, root, level, owner, self.sb.uuid, self.bs,
                            self.sb.total_blk)

    def _scan_ag(self, ag: _Ag) -> None:
        where = f"AG {ag.agno}"
        blk = ag.start + fmt.AGH_AGBNO
        try:
            data = self.read(blk)
            fmt.check_block(data, fmt.AGH_MAGIC, blk, self.sb.uuid, ag.agno, self.bs)
            agh = fmt.DiskAgHeader.decode(data, blk)
            if agh.agno != ag.agno or agh.length_blk != ag.length:
                raise CorruptError("AG header", self.where(blk),
                                   f"describes AG {agh.agno} of {agh.length_blk} blocks")
        except (CorruptError, OSError) as e:
            self.err(f"{where}: {_msg(e)}")
            # everything in the header can be rebuilt but the tree roots; the free-space
            # trees come from the used blocks anyway, the inode chunks from a scan of the AG
            agh = None
            if ag.length > SCAN_CAP_BLK:
                self.fatal.append(f"{where} header unreadable (its inode chunks are unknown)")
                return
        if agh is None:
            self.fixed(f"{where}: header rebuilt (inode chunks found by scanning the AG)")
            ag.header_rebuilt = True
            agh = fmt.DiskAgHeader(agno=ag.agno, length_blk=ag.length)
            ag.agh = agh
            ag.bno = ag.cnt = ([], [], ["AG header unreadable"])
            ag.ino = (self._find_chunks(ag, [(None, None, None)], []), [], ["AG header unreadable"])
        else:
            ag.agh = agh
            self._scan_ag_trees(ag, agh)
        self._scan_ag_chunks(ag, agh)

    def _scan_ag_trees(self, ag: _Ag, agh) -> None:
        where = f"AG {ag.agno}"
        for name, schema, root, level in (("bno", fmt.BNOBT, agh.bno_root_blk, agh.bno_level),
                                          ("cnt", fmt.CNTBT, agh.cnt_root_blk, agh.cnt_level),
                                          ("ino", fmt.INOBT, agh.ino_root_blk, agh.ino_level)):
            recs, nodes, problems, lost = self._walk(schema, root, level, ag.agno)
            for p in problems:
                self.err(f"{where} {schema.name}: {p}")
            setattr(ag, name, (recs, nodes, problems))
            if name == "ino" and lost:
                # a subtree could not be read: find its chunks on the disk (inodes verify
                # themselves: magic, CRC, their own number, the UUID)
                recs.extend(self._find_chunks(ag, lost, recs))
        # AGFL: in the AG, outside the fixed blocks, no duplicates
        seen = set()
        for b in agh.agfl:
            if b >= ag.length or any(s <= b < e for s, e in ag.fixed) or b in seen:
                self.err(f"{where} AGFL: bad entry {b}")
                continue
            seen.add(b)
            ag.agfl.append(b)

    def _scan_ag_chunks(self, ag: _Ag, agh) -> None:
        where = f"AG {ag.agno}"
        recs, _nodes, problems = ag.ino
        if problems:
            ag.rebuild_ino = True
        icount = ifree = 0
        prev_end = 0
        for start, mask in sorted(recs):
            blk0, rem = divmod(start, self.ipb)
            agbno = blk0 - ag.start
            if (rem or start < prev_end or not 0 <= agbno < ag.length
                    or agbno + self.chunk_blk > ag.length
                    or any(agbno < e and s < agbno + self.chunk_blk for s, e in ag.fixed)
                    or mask & ~self.full_mask):
                self.err(f"{where} inobt: bad chunk record ({start}, {mask:#x}): dropped")
                self.fixed(f"{where} inobt: chunk record {start} dropped")
                ag.rebuild_ino = True
                continue
            ag.old_chunks[start] = mask
            prev_end = start + self.chunk_blk * self.ipb
            icount += self.chunk_inodes
            ifree += bin(mask).count("1")
            ag.chunks[start] = self._scan_chunk(ag, start, mask)
            if ag.chunks[start] != mask:
                ag.rebuild_ino = True
        if not ag.header_rebuilt and (icount != agh.icount or ifree != agh.ifree):
            self.err(f"{where} header: icount/ifree {agh.icount}/{agh.ifree}, "
                     f"chunks say {icount}/{ifree}")

    def _find_chunks(self, ag: _Ag, lost: list, recs: list) -> list:
        """Inode chunks in the key ranges of lost inobt subtrees, found by reading the blocks:
        ``[(start_ino, free_mask)]`` (a slot is free when its inode is free or unreadable)."""
        where = f"AG {ag.agno}"
        ag_end = ag.start + ag.length
        ranges = _merge((max(ag.start, lo[0] // self.ipb) if lo else ag.start,
                         min(ag_end, -(-hi[0] // self.ipb)) if hi else ag_end)
                        for _b, lo, hi in lost)
        if sum(e - s for s, e in ranges) > SCAN_CAP_BLK:
            self.fatal.append(f"{where} inobt has unreadable nodes over more than "
                              f"{SCAN_CAP_BLK} blocks (inode chunks may be lost)")
            return []
        taken = _merge([(st // self.ipb, st // self.ipb + self.chunk_blk) for st, _m in recs]
                       + [(ag.start + s, ag.start + e) for s, e in ag.fixed])
        found = []
        magic = struct.pack("<I", fmt.INODE_MAGIC)
        batch = 64
        for s, e in _subtract(ranges, taken):
            b = s
            while b < e:
                n = min(batch, e - b)
                data = self.ov.pread(n * self.bs, b * self.bs)
                step = 1
                for i in range(n):
                    if step > 1:
                        step -= 1
                        continue
                    blk = b + i
                    off = i * self.bs
                    if (data[off:off + 4] != magic
                            or int.from_bytes(data[off + 8:off + 16], "little") != blk * self.ipb
                            or blk + self.chunk_blk > ag_end
                            or any(blk < te and ts < blk + self.chunk_blk for ts, te in taken)):
                        continue
                    try:
                        fmt.DiskInode.decode(self.read(blk), 0, self.isz, blk * self.ipb,
                                             self.sb.uuid)
                    except (CorruptError, OSError):
                        continue
                    start = blk * self.ipb
                    mask = 0
                    for k in range(self.chunk_inodes):
                        cb, slot = divmod(start + k, self.ipb)
                        try:
                            di = fmt.DiskInode.decode(self.read(cb), slot * self.isz, self.isz,
                                                      start + k, self.sb.uuid)
                            free = di.mode == 0
                        except (CorruptError, OSError):
                            free = True        # cleared by the chunk scan that follows
                        mask |= free << k
                    self.err(f"{where} inobt: inode chunk {start} (block {blk}) is not in the "
                             "tree (found by scanning)")
                    self.fixed(f"{where} inobt: inode chunk {start} indexed again")
                    found.append((start, mask))
                    step = self.chunk_blk
                b += n
                # a chunk found at the end of a batch continues into the next one
                b += step - 1 if step > 1 else 0
        return found

    def _scan_chunk(self, ag, start: int, mask: int) -> int:
        """Read every inode of a chunk; return the free mask the inodes justify."""
        new = mask
        for i in range(self.chunk_inodes):
            ino = start + i
            free = bool(mask >> i & 1)
            blk, slot = divmod(ino, self.ipb)
            try:
                di = fmt.DiskInode.decode(self.read(blk), slot * self.isz, self.isz, ino,
                                          self.sb.uuid, self.bs)
                if di.mode and (_stat.S_IFMT(di.mode) not in _FILE_TYPES or di.data_format == 0):
                    raise CorruptError("inode", f"inode {ino}",
                                       f"bad mode {di.mode:#o} / data format {di.data_format}")
            except (CorruptError, OSError) as e:
                gen = 0
                if free:
                    self.err(f"{_msg(e)} (a free inode)")
                    self.fixed(f"inode {ino}: rewritten as a free inode")
                else:
                    self.err(f"{_msg(e)}: the inode cannot be trusted")
                    self.fixed(f"inode {ino}: cleared (freed)")
                self.freed[ino] = gen
                new |= 1 << i
                continue
            if free != (di.mode == 0):
                self.err(f"inode {ino}: inobt says {'free' if free else 'in use'}, "
                         f"mode is {di.mode:#o}")
                self.fixed(f"inode {ino}: inobt free mask set from the inode "
                           f"({'in use' if di.mode else 'free'})")
                if di.mode:
                    new &= ~(1 << i)
                else:
                    new |= 1 << i
            if di.mode:
                self.inodes[ino] = _Ino(di)
        return new

    # -- inodes --------------------------------------------------------------------------------
    def _ext_ok(self, ino, e, what="extent") -> bool:
        """An extent inside the filesystem and one AG (else reported and dropped)."""
        off, dev, n, _f = e
        sb = self.sb
        if n <= 0 or dev + n > sb.total_blk or self.ag_of_blk(dev) != self.ag_of_blk(dev + n - 1):
            self.err(f"inode {ino}: {what} at file block {off} (device blocks [{dev}, {dev + n})) "
                     "outside the filesystem or across AGs")
            self.fixed(f"inode {ino}: {what} at file block {off} dropped")
            return False
        return True

    def _scan_inode(self, st: _Ino) -> None:
        di = st.di
        ino = di.ino
        mode = di.mode
        if di.xattr_blk != fmt.NULL_BLK and not 0 <= di.xattr_blk < self.sb.total_blk:
            self.err(f"inode {ino}: xattr block {di.xattr_blk} outside the filesystem")
            self.fixed(f"inode {ino}: extended attributes dropped")
            st.xattr = fmt.NULL_BLK
            st.dirty = True
        if _stat.S_ISREG(mode) or (_stat.S_ISLNK(mode) and di.data_format != fmt.FMT_INLINE):
            if di.data_format not in (fmt.FMT_EXTENTS, fmt.FMT_BTREE):
                self.err(f"inode {ino}: {'regular file' if _stat.S_ISREG(mode) else 'symlink'} "
                         f"with data format {di.data_format}")
                self.fixed(f"inode {ino}: data fork reset to an empty extent list")
                st.ext_changed = True
                return
            self._scan_extents(st)
        elif _stat.S_ISLNK(mode):
            if di.inline_len != di.size:
                self.err(f"inode {ino}: inline symlink of {di.inline_len} bytes, size {di.size}")
                self.fixed(f"inode {ino}: symlink size set to {di.inline_len}")
                di.size = di.inline_len
                st.dirty = True
        elif _stat.S_ISDIR(mode):
            self._scan_dir(st)
        elif di.data_format != fmt.FMT_DEV:
            self.err(f"inode {ino}: special file with data format {di.data_format}")
            self.fixed(f"inode {ino}: data format set to device")
            di.data_format = fmt.FMT_DEV
            st.dirty = True

    def _scan_extents(self, st: _Ino) -> None:
        di = st.di
        ino = di.ino
        if di.data_format == fmt.FMT_BTREE:
            recs, nodes, problems, lost = self._walk(fmt.BMBT, di.bmbt_root_blk, di.bmbt_level, ino)
            for p in problems:
                self.err(f"inode {ino} extent tree: {p}")
            for blk, lo, hi in lost:
                lo_s = lo[0] if lo else 0
                hi_s = hi[0] if hi else "end"
                self.err(f"inode {ino}: mappings of file blocks [{lo_s}, {hi_s}) were under "
                         f"unreadable extent tree node {blk}")
                self.fixed(f"inode {ino}: file blocks [{lo_s}, {hi_s}) left unmapped (holes)")
            if problems:
                self.fixed(f"inode {ino}: extent tree rebuilt from its readable records")
                st.tree_bad = True
            st.tree_nodes = nodes
            recs.sort()
        else:
            n = min(di.nextents, self.ext_cap)
            recs = list(fmt.EXTENT.struct.iter_unpack(di.fork[:n * fmt.EXTENT.size]))
        kept = []
        prev_end = 0
        for e in recs:
            off, dev, n, flags = e
            if n == 0 or flags & ~fmt.EXT_UNWRITTEN or off < prev_end:
                self.err(f"inode {ino}: bad extent record {e} at file block {off}")
                self.fixed(f"inode {ino}: extent record at file block {off} dropped")
                st.ext_changed = True
                continue
            if not self._ext_ok(ino, e):
                st.ext_changed = True
                prev_end = off + n
                continue
            kept.append(e)
            prev_end = off + n
        if len(recs) != di.nextents and not st.tree_bad:
            self.err(f"inode {ino}: {len(recs)} extents, nextents says {di.nextents}")
            self.fixed(f"inode {ino}: nextents set to the extents kept")
            st.dirty = True
        st.ext = kept

    def _scan_dir(self, st: _Ino) -> None:
        di = st.di
        ino = di.ino
        ents: dict = {}
        if di.data_format == fmt.FMT_BTREE:
            recs, nodes, problems, _lost = self._walk(fmt.DIRBT, di.bmbt_root_blk, di.bmbt_level, ino)
            for p in problems:
                self.err(f"directory {ino} entry tree: {p}")
            if problems:
                self.fixed(f"directory {ino}: entry tree rebuilt from its readable records")
                st.tree_bad = st.dir_changed = True
            st.tree_nodes = nodes
            st.parent = None
            for h, coll, child, ftype, nlen, name in sorted(recs):
                name = bytes(name[:nlen])
                if (h, coll) == DOTDOT:
                    st.parent = child
                    continue
                if not nlen or h != _dir.dir_hash(name) or (h, coll) in ents:
                    self.err(f"directory {ino}: bad entry record {name!r} (hash {h}, coll {coll})")
                    self.fixed(f"directory {ino}: entry record {name!r} dropped")
                    st.dir_changed = True
                    continue
                ents[(h, coll)] = [name, child, ftype]
            if st.parent is None:
                self.err(f"directory {ino}: no '..' record")
                st.dir_changed = True         # (set to the real parent below)
        elif di.data_format == fmt.FMT_INLINE:
            data = di.fork[:di.inline_len]
            loc = f"directory {ino} (short form)"
            if len(data) < _SF_HDR.size:
                self.err(f"{loc}: short header")
                st.dir_changed = True
                data = b""
            else:
                st.parent = _SF_HDR.unpack_from(data, 0)[0]
            off = _SF_HDR.size
            while off < len(data):
                if off + _SF_ENT.size > len(data):
                    self.err(f"{loc}: truncated entry at byte {off}")
                    self.fixed(f"{loc}: entries from byte {off} on dropped")
                    st.dir_changed = True
                    break
                child, coll, ftype, nlen = _SF_ENT.unpack_from(data, off)
                off += _SF_ENT.size
                name = bytes(data[off:off + nlen])
                off += nlen
                if len(name) != nlen or not nlen:
                    self.err(f"{loc}: bad name length at byte {off - nlen}")
                    self.fixed(f"{loc}: entries from byte {off - nlen - _SF_ENT.size} on dropped")
                    st.dir_changed = True
                    break
                key = (_dir.dir_hash(name), coll)
                if key in ents:
                    self.err(f"{loc}: duplicate key {key} ({name!r})")
                    self.fixed(f"{loc}: duplicate entry {name!r} dropped")
                    st.dir_changed = True
                    continue
                ents[key] = [name, child, ftype]
        else:
            self.err(f"directory {ino}: data format {di.data_format}")
            self.fixed(f"directory {ino}: reset to an empty short-form directory")
            st.dir_changed = True
            st.parent = 0
        if len(ents) != di.nextents and not st.dir_changed:
            self.err(f"directory {ino}: {len(ents)} entries, nextents says {di.nextents}")
            self.fixed(f"directory {ino}: nextents set to {len(ents)}")
            st.dirty = True
        st.entries = ents

    # -- block ownership -----------------------------------------------------------------------
    def _claims(self) -> None:
        claims = []
        for ag in self.ags:
            if ag.agh is None:
                continue                  # unknown AG: repair refuses, nothing is given away
            for s, e in ag.fixed:
                claims.append((ag.start + s, ag.start + e, (_P_FIXED,),
                               f"AG {ag.agno} fixed blocks", None))
            for start in ag.old_chunks:
                b = start // self.ipb
                claims.append((b, b + self.chunk_blk, (_P_CHUNK, start),
                               f"AG {ag.agno} inode chunk {start}", None))
            for name in ("bno", "cnt", "ino"):
                for b in getattr(ag, name)[1]:
                    claims.append((b, b + 1, (_P_AGTREE, name, b), f"AG {ag.agno} {name}bt", None))
            for b in ag.agfl:
                claims.append((ag.start + b, ag.start + b + 1, (_P_AGFL, b), f"AG {ag.agno} AGFL",
                               ("agfl", ag, b)))
        for ino in sorted(self.inodes):
            st = self.inodes[ino]
            kind = "dirbt" if _stat.S_ISDIR(st.di.mode) else "bmbt"
            for b in st.tree_nodes:
                claims.append((b, b + 1, (_P_ITREE, ino, b), f"inode {ino} {kind}", ("tree", st, b)))
            if st.xattr != fmt.NULL_BLK:
                claims.append((st.xattr, st.xattr + 1, (_P_IDATA, ino, -1), f"inode {ino} xattrs",
                               ("xattr", st)))
            for e in st.ext:
                claims.append((e[1], e[1] + e[2], (_P_IDATA, ino, e[0]), f"inode {ino} data",
                               ("data", st, e)))
        losses = _resolve([c[:4] for c in claims])
        lost_data: dict = {}
        for i in sorted(losses):
            start, end, _p, owner, handle = claims[i]
            pieces = losses[i]
            for s, e, winner in pieces:
                self.err(f"blocks [{s}, {e}) ({self.where(s)}): {owner} cross-linked with {winner}")
            if handle is None:
                continue
            kind = handle[0]
            if kind == "agfl":
                _, ag, b = handle
                ag.agfl.remove(b)
                self.fixed(f"AG {ag.agno} AGFL: block {b} (owned by {pieces[0][2]}) removed")
            elif kind == "tree":
                st = handle[1]
                st.tree_nodes.remove(handle[2])
                st.tree_bad = True
                if st.entries is not None:
                    st.dir_changed = True
                self.fixed(f"inode {st.di.ino}: tree node {handle[2]} left to {pieces[0][2]}; "
                           "tree rebuilt")
            elif kind == "xattr":
                st = handle[1]
                st.xattr = fmt.NULL_BLK
                st.dirty = True
                self.fixed(f"inode {st.di.ino}: xattr block {start} left to {pieces[0][2]}; "
                           "extended attributes dropped")
            else:
                lost_data.setdefault(id(handle[1]), (handle[1], []))[1].append((handle[2], pieces))
        for st, items in lost_data.values():
            drop = {}
            for e, pieces in items:
                drop[e] = pieces
            new = []
            for e in st.ext:
                if e not in drop:
                    new.append(e)
                    continue
                off, dev, n, flags = e
                gone = _merge((s, t) for s, t, _w in drop[e])
                for s, t, w in drop[e]:
                    self.fixed(f"inode {st.di.ino}: file blocks [{off + s - dev}, {off + t - dev}) "
                               f"(device blocks [{s}, {t})) dropped; {w} keeps them")
                for ks, ke in _subtract([(dev, dev + n)], gone):
                    new.append((off + ks - dev, ks, ke - ks, flags))
            st.ext = sorted(new)
            st.ext_changed = True
        # what the disk says is in use (before any repair decision): for the space check
        won = []
        self.won_by_ino = {}
        for i, c in enumerate(claims):
            pieces = _merge((s, e) for s, e, _w in losses.get(i, ()))
            for s, e in _subtract([(c[0], c[1])], pieces):
                won.append((s, e, c[3]))
                if c[4] is not None and c[4][0] != "agfl":
                    self.won_by_ino.setdefault(c[4][1].di.ino, []).append((s, e))
        won.sort()
        self.disk_used = won
        self._check_nblocks()

    def _check_nblocks(self) -> None:
        for ino in sorted(self.inodes):
            st = self.inodes[ino]
            if st.ext_changed or st.tree_bad or st.dir_changed:
                continue                       # rewritten anyway, with the count it then has
            di = st.di
            nb = len(st.tree_nodes) + (st.xattr != fmt.NULL_BLK) + sum(e[2] for e in st.ext)
            if nb != di.nblocks:
                self.err(f"inode {ino}: nblocks {di.nblocks}, owns {nb}")
                self.fixed(f"inode {ino}: nblocks set to {nb}")
                st.dirty = True

    # -- namespace -----------------------------------------------------------------------------
    def _free_inode(self, ino: int, why: str) -> None:
        st = self.inodes.pop(ino)
        self.freed[ino] = st.di.generation
        self.dead.add(ino)
        ag = self.ags[self.ag_of_ino(ino)]
        for cs in ag.chunks:
            if cs <= ino < cs + self.chunk_inodes:
                ag.chunks[cs] |= 1 << (ino - cs)
                ag.rebuild_ino = True
        self.fixed(f"inode {ino}: {why}: freed")

    def _namespace(self) -> None:
        root = self.sb.root_ino
        inodes = self.inodes
        if self.sb_from_copy or root not in inodes or not _stat.S_ISDIR(inodes[root].di.mode):
            # the copies are mkfs's: the root is the directory whose '..' names itself
            found = sorted(i for i, st in inodes.items()
                           if st.entries is not None and st.parent == i)
            if self.sb_from_copy and found and found[0] != root:
                self.fixed(f"superblock: root directory is inode {found[0]} (its '..' names it)")
                root = self.sb.root_ino = found[0]
        if root not in inodes or not _stat.S_ISDIR(inodes[root].di.mode):
            self.err(f"root inode {root} is not an allocated directory")
            root = self._new_root()
            if root is None:
                return
        # the unlinked list
        on_list = []
        cur = self.sb.unlinked_ino
        seen = set()
        while cur:
            if cur in seen or cur not in inodes:
                self.err(f"unlinked list: bad inode {cur}")
                self.fixed("unlinked list: cut before the bad inode")
                break
            seen.add(cur)
            on_list.append(cur)
            cur = inodes[cur].di.next_unlinked
        for ino, st in inodes.items():
            if st.di.next_unlinked and ino not in seen:
                self.err(f"inode {ino}: next_unlinked {st.di.next_unlinked} but not on the "
                         "unlinked list")
                self.fixed(f"inode {ino}: next_unlinked cleared")
                st.di.next_unlinked = 0
                st.dirty = True
        parent_of = self.parent_of = {root: root}
        reach = self.reach = {root}
        self._bfs([root], parent_of, reach)
        # lost+found: an existing directory in the root is used
        rst = inodes[root]
        for name, child, _ft in rst.entries.values():
            if name == LOST_FOUND:
                if child in inodes and _stat.S_ISDIR(inodes[child].di.mode) and parent_of.get(child) == root:
                    self.lf_ino = child
        # disconnected inodes: free those without links, give the others to lost+found
        rest = set(inodes) - reach
        while rest:
            named = set()
            for d in rest:
                st = inodes[d]
                if st.entries is not None:
                    named.update(c for _n, c, _f in st.entries.values())
            tops = sorted(i for i in rest if i not in named)
            if not tops:
                tops = [min((i for i in rest if inodes[i].entries is not None), default=min(rest))]
            for ino in tops:
                if ino not in rest:
                    continue
                st = inodes[ino]
                rest.discard(ino)
                if st.di.nlink == 0:
                    if ino in seen:
                        if self.summaries_valid:
                            self.err(f"inode {ino}: on the unlinked list of a cleanly unmounted "
                                     "filesystem (orphan)")
                        else:
                            self.orphans_pending.append(ino)
                        self._free_inode(ino, "orphan (unlinked while open)")
                    else:
                        self.err(f"inode {ino}: no links and not on the unlinked list (lost orphan)")
                        self._free_inode(ino, "unreferenced inode with no links")
                    continue
                self.err(f"inode {ino}: nlink {st.di.nlink} but not reachable from the root "
                         "(disconnected)")
                lf = self._lost_found()
                if lf is None:
                    continue
                name = str(ino).encode()
                lst = inodes[lf]
                names = {n for n, _c, _f in lst.entries.values()}
                k = 0
                while name in names:
                    k += 1
                    name = f"{ino}.{k}".encode()
                self._add_entry(lst, name, ino)
                self.fixed(f"inode {ino}: moved to /lost+found/{name.decode()}")
                reach.add(ino)
                if st.entries is not None:
                    parent_of[ino] = lf
                    self._bfs([ino], parent_of, reach)
                rest -= reach
        # orphans that turned out to be linked
        for ino in on_list:
            if ino in inodes:
                self.err(f"inode {ino}: on the unlinked list but linked")
                self.fixed(f"inode {ino}: taken off the unlinked list")
        for ino in seen:
            st = inodes.get(ino)
            if st is not None and st.di.next_unlinked:
                st.di.next_unlinked = 0
                st.dirty = True
        # link counts and '..'
        links: dict = {}
        subdirs: dict = {}
        added_links: dict = {}
        added_subdirs: dict = {}
        for d, c in self.added:
            if c in inodes and d in inodes:
                added_links[c] = added_links.get(c, 0) + 1
                if inodes[c].entries is not None:
                    added_subdirs[d] = added_subdirs.get(d, 0) + 1
        for d, st in inodes.items():
            if st.entries is None:
                continue
            for _n, c, _f in st.entries.values():
                links[c] = links.get(c, 0) + 1
                if inodes[c].entries is not None:
                    subdirs[d] = subdirs.get(d, 0) + 1
        for ino in sorted(inodes):
            st = inodes[ino]
            di = st.di
            if st.entries is not None:
                want = 2 + subdirs.get(ino, 0)
                was = want - added_subdirs.get(ino, 0)
                parent = parent_of.get(ino, ino)
                if st.parent != parent:
                    if st.parent is not None:
                        self.err(f"directory {ino}: '..' is {st.parent}, parent is {parent}")
                    self.fixed(f"directory {ino}: '..' set to {parent}")
                    st.parent = parent
                    st.dir_changed = True
            else:
                want = links.get(ino, 0)
                was = want - added_links.get(ino, 0)
            if di.nlink != want:
                if ino not in (self.new_lf, self.new_root) and di.nlink != was:
                    # (a count that only changes because repair adds an entry is no problem)
                    self.err(f"inode {ino}: nlink {di.nlink}, counted {was}")
                self.fixed(f"inode {ino}: nlink set to {want}")
                di.nlink = want
                st.dirty = True

    def _new_root(self):
        """An empty root directory (in the old root's slot when a chunk holds it): what the
        old root named is then disconnected and goes to lost+found like anything else."""
        root = self.sb.root_ino
        if root in self.inodes:
            self._free_inode(root, "root inode is not a directory")
        ag = self.ags[self.ag_of_ino(root)] if root // self.ipb < self.sb.total_blk else None
        chunk = None
        if ag is not None:
            chunk = next((cs for cs in ag.chunks if cs <= root < cs + self.chunk_inodes), None)
        if chunk is not None:
            ag.chunks[chunk] &= ~(1 << (root - chunk))
            ag.rebuild_ino = True
            gen = self.freed.pop(root, 0)
        else:
            root = self._alloc_inode()
            if root is None:
                self.fatal.append("no root directory and no free inode for a new one")
                return None
            gen = self.freed.pop(root, 0)
            self.sb.root_ino = root
        self.inodes[root] = _new_dir(root, 0o755, gen + 1, root)
        self.new_root = root
        self.fixed(f"root directory recreated (inode {root}); what it named goes to lost+found")
        return root

    def _bfs(self, start: list, parent_of: dict, reach: set) -> None:
        """Walk directories from ``start``: drop bad entries, give each directory one parent."""
        inodes = self.inodes
        queue = collections.deque(start)
        while queue:
            d = queue.popleft()
            st = inodes[d]
            for key in sorted(st.entries):
                name, child, ftype = st.entries[key]
                cst = inodes.get(child)
                if cst is None:
                    self.err(f"directory {d}: entry {name!r} names free inode {child}")
                    self.fixed(f"directory {d}: entry {name!r} removed")
                    del st.entries[key]
                    st.dir_changed = True
                    continue
                if cst.entries is not None:
                    if child in parent_of:
                        self.err(f"directory {d}: entry {name!r} names directory {child}, which "
                                 f"already has parent {parent_of[child]}")
                        self.fixed(f"directory {d}: entry {name!r} removed")
                        del st.entries[key]
                        st.dir_changed = True
                        continue
                    parent_of[child] = d
                    queue.append(child)
                want = dirent_type(cst.di.mode)
                if ftype != want:
                    self.err(f"directory {d}: entry {name!r} has type {ftype}, inode {child} is {want}")
                    self.fixed(f"directory {d}: entry {name!r} type set to {want}")
                    st.entries[key][2] = want
                    st.dir_changed = True
                reach.add(child)

    def _add_entry(self, dst: _Ino, name: bytes, ino: int) -> None:
        h = _dir.dir_hash(name)
        coll = 0
        while (h, coll) in dst.entries:
            coll += 1
        dst.entries[(h, coll)] = [name, ino, dirent_type(self.inodes[ino].di.mode)]
        dst.dir_changed = True
        self.added.append((dst.di.ino, ino))

    def _lost_found(self):
        """The lost+found directory's inode, created (in memory) the first time it is needed."""
        if self.lf_ino is not None:
            return self.lf_ino
        inodes = self.inodes
        root = self.sb.root_ino
        rst = inodes[root]
        evicted = []
        for key, (name, child, _ft) in list(rst.entries.items()):
            if name == LOST_FOUND:
                # a lost+found that is not a directory: its entry moves into the new one
                self.err(f"directory {root}: entry 'lost+found' names a non-directory {child}")
                self.fixed(f"directory {root}: entry 'lost+found' moved to /lost+found/{child}")
                del rst.entries[key]
                rst.dir_changed = True
                evicted.append(child)
        ino = self._alloc_inode()
        if ino is None:
            self.err("lost+found: no free inode and no space for an inode chunk")
            self.fatal.append("cannot create lost+found")
            return None
        gen = self.freed.pop(ino, None)
        if gen is None:
            blk, slot = divmod(ino, self.ipb)
            try:
                gen = fmt.DiskInode.decode(self.read(blk), slot * self.isz, self.isz, ino,
                                           self.sb.uuid).generation
            except (CorruptError, OSError):
                gen = 0
        st = inodes[ino] = _new_dir(ino, 0o700, gen + 1, root)
        self._add_entry(rst, LOST_FOUND, ino)
        self.lf_ino = self.new_lf = ino
        self.parent_of[ino] = root
        self.reach.add(ino)
        for child in evicted:
            self._add_entry(st, str(child).encode(), child)
        self.fixed(f"lost+found created (inode {ino})")
        return ino

    def _alloc_inode(self):
        """Lowest free inode slot of an existing chunk, else a new chunk."""
        for ag in self.ags:
            if ag.agh is None:
                continue
            for start in sorted(ag.chunks):
                mask = ag.chunks[start]
                if mask:
                    bit = (mask & -mask).bit_length() - 1
                    ag.chunks[start] = mask & ~(1 << bit)
                    ag.rebuild_ino = True
                    return start + bit
        # a new chunk, from blocks nobody owns
        self._init_space()
        for ag in self.ags:
            if ag.agh is None:
                continue
            got = self._take(ag, self.chunk_blk, contiguous=True)
            if got is None:
                continue
            blk0 = ag.start + got[0]
            start = blk0 * self.ipb
            for i in range(self.chunk_blk):
                data = bytearray(self.bs)
                for slot in range(self.ipb):
                    fmt.DiskInode(ino=(blk0 + i) * self.ipb + slot).encode_into(
                        data, slot * self.isz, self.isz, self.sb.uuid)
                self.out[blk0 + i] = bytes(data)
                self.cache[blk0 + i] = bytes(data)
            ag.chunks[start] = self.full_mask & ~1
            ag.rebuild_ino = True
            self.fixed(f"AG {ag.agno}: new inode chunk {start} for lost+found")
            return start
        return None

    # -- space ---------------------------------------------------------------------------------
    def _init_space(self) -> None:
        """Free extents per AG = the blocks nobody owns (after the claims were resolved)."""
        if getattr(self, "space_ready", False):
            return
        self.space_ready = True
        per_ag: dict = {}
        for s, e, _o in self.disk_used:
            while s < e:
                agno = self.ag_of_blk(s)
                end = min(e, (agno + 1) * self.sb.ag_blk)
                per_ag.setdefault(agno, []).append((s - agno * self.sb.ag_blk, end - agno * self.sb.ag_blk))
                s = end
        for ag in self.ags:
            used = _merge(per_ag.get(ag.agno, []))
            ag.free = _subtract([(0, ag.length)], used) if ag.agh is not None else []

    def _release(self, ag: _Ag, agbnos) -> None:
        ag.pending.extend((b, b + 1) for b in agbnos)

    def _release_range(self, s: int, e: int) -> None:
        """Global blocks [s, e) are nobody's any more."""
        while s < e:
            ag = self.ags[self.ag_of_blk(s)]
            end = min(e, ag.start + ag.length)
            ag.pending.append((s - ag.start, end - ag.start))
            s = end

    @staticmethod
    def _norm(ag: _Ag) -> list:
        """The AG's free extents with every release so far merged in (batched: O(n log n))."""
        if ag.pending:
            ag.free = _merge(ag.free + ag.pending)
            ag.pending = []
        return ag.free

    def _take(self, ag: _Ag, n: int, contiguous: bool = False):
        """Take ``n`` blocks from the end of the AG's largest free extents: (agbno, n) when
        contiguous (None if no extent holds them), else a list of agbnos (None if short).
        Taking from an end never splits an extent, so the extent count cannot grow."""
        self._norm(ag)
        if contiguous:
            best = None
            for i, (s, e) in enumerate(ag.free):
                if e - s >= n and (best is None or e - s < ag.free[best][1] - ag.free[best][0]):
                    best = i
            if best is None:
                return None
            s, e = ag.free[best]
            if e - s == n:
                del ag.free[best]
            else:
                ag.free[best] = (s, e - n)
            return e - n, n
        if sum(e - s for s, e in ag.free) < n:
            return None
        out = []
        while len(out) < n:
            i = max(range(len(ag.free)), key=lambda j: ag.free[j][1] - ag.free[j][0])
            s, e = ag.free[i]
            k = min(n - len(out), e - s)
            out.extend(range(e - k, e))
            if k == e - s:
                del ag.free[i]
            else:
                ag.free[i] = (s, e - k)
        return out

    def _take_any(self, near_agno: int, n: int) -> list:
        """``n`` blocks (global numbers) for a rebuilt inode tree, near the inode's AG."""
        order = list(range(near_agno, len(self.ags))) + list(range(near_agno))
        for agno in order:
            ag = self.ags[agno]
            if ag.agh is None:
                continue
            got = self._take(ag, n)
            if got is not None:
                return [ag.start + b for b in got]
        raise CorruptError("repair", "free space", f"no room for {n} tree blocks")

    def _check_space_and_counters(self) -> None:
        """Compare the free-space trees with the blocks nobody owns (as the disk stands)."""
        self.disk_free_blk = 0
        per_ag: dict = {}
        for s, e, o in self.disk_used:
            while s < e:
                agno = self.ag_of_blk(s)
                end = min(e, (agno + 1) * self.sb.ag_blk)
                per_ag.setdefault(agno, []).append((s, end, o))
                s = end
        self.fs_disagree = set()
        total_free = 0
        summary_known = True
        for ag in self.ags:
            if ag.agh is None:
                continue
            where = f"AG {ag.agno}"
            agh = ag.agh
            used = per_ag.get(ag.agno, [])
            computed = _subtract([(ag.start, ag.start + ag.length)], _merge((s, e) for s, e, _ in used))
            bno_recs, _bn, bno_p = ag.bno
            cnt_recs, _cn, cnt_p = ag.cnt
            bno = sorted(set(bno_recs))
            cnt = sorted(set((s, n) for n, s in cnt_recs))
            if not bno_p and not cnt_p and bno != cnt:
                self.err(f"{where} free-space trees: by-block and by-size trees differ")
                self.fs_disagree.add(ag.agno)
            if bno_p or cnt_p:
                self.fs_disagree.add(ag.agno)
            recs = bno if not bno_p else (cnt if not cnt_p else None)
            agfl_n = len(agh.agfl)
            if recs is None:
                # no tree to compare with (nor a trustworthy summary to check against)
                total_free += sum(e - s for s, e in computed) + len(ag.agfl)
                summary_known = False
                continue
            tree_free = _merge((ag.start + s, ag.start + s + n) for s, n in recs)
            # tree records must be coalesced, inside the AG and off the fixed blocks
            prev = -1
            for s, n in recs:
                if n <= 0 or s + n > ag.length or s <= prev or any(
                        s < fe and fs_ < s + n for fs_, fe in ag.fixed):
                    self.err(f"{where} free extent ({s}, {n}): bad, overlapping or not coalesced")
                    self.fs_disagree.add(ag.agno)
                    break
                prev = s + n
            for s, e in _subtract(computed, tree_free):
                self.err(f"blocks [{s}, {e}) ({where}) are neither free nor used (leaked)")
                self.fixed(f"blocks [{s}, {e}) returned to free space")
                self.fs_disagree.add(ag.agno)
            for s, e in _subtract(tree_free, computed):
                owners = sorted({o for us, ue, o in used if us < e and s < ue})
                self.err(f"blocks [{s}, {e}) ({where}, {self.where(s)}): {', '.join(owners)} "
                         "overlaps free space")
                self.fixed(f"blocks [{s}, {e}) in use: removed from free space")
                self.fs_disagree.add(ag.agno)
            total = sum(n for _s, n in recs)
            longest = max((n for _s, n in recs), default=0)
            if total != agh.free_blk or longest != agh.longest_free_blk:
                self.err(f"{where} header: counters free={agh.free_blk} "
                         f"longest={agh.longest_free_blk}, trees say {total}/{longest}")
                self.fs_disagree.add(ag.agno)
            need, high = _agfl_bounds(max(agh.bno_level, agh.cnt_level))
            if not need <= agfl_n <= high:
                self.err(f"{where} AGFL: {agfl_n} blocks, outside [{need}, {high}]")
                self.fs_disagree.add(ag.agno)
            total_free += total + agfl_n
        self.disk_free_blk = total_free
        if self.summaries_valid and summary_known and not self.fatal:
            sb = self.sb
            icount = sum(len(ag.old_chunks) * self.chunk_inodes for ag in self.ags)
            ifree = sum(bin(m).count("1") for ag in self.ags for m in ag.old_chunks.values())
            if (sb.free_blk, sb.icount, sb.ifree) != (total_free, icount, ifree):
                self.err(f"superblock: summary free/icount/ifree {sb.free_blk}/{sb.icount}/"
                         f"{sb.ifree}, counted {total_free}/{icount}/{ifree}")
                self.fixed("superblock: summary counters rewritten")

    # -- repair --------------------------------------------------------------------------------
    def apply(self) -> None:
        if self.fatal:
            self.rep.repaired.clear()
            self.err("repair not attempted: " + "; ".join(self.fatal))
            return
        self._init_space()
        sb = self.sb
        uuid = sb.uuid
        inodes = self.inodes
        for ino in sorted(self.dead):
            for s, e in self.won_by_ino.get(ino, ()):
                self._release_range(s, e)
        # 1. inode trees: release the old nodes of every tree that changes, then rebuild
        rebuild = []
        for ino in sorted(inodes):
            st = inodes[ino]
            if st.entries is not None:
                if st.dir_changed or st.tree_bad:
                    rebuild.append(st)
            elif st.ext_changed or st.tree_bad:
                rebuild.append(st)
        for st in rebuild:
            for b in st.tree_nodes:
                self._release_range(b, b + 1)
            st.tree_nodes = []
        for st in rebuild:
            if st.entries is not None:
                self._write_dir(st)
            else:
                self._write_extents(st)
            st.dirty = True
        # 2. inobt of every AG whose chunks changed
        for ag in self.ags:
            if ag.rebuild_ino:
                for b in ag.ino[1]:
                    self._release_range(b, b + 1)
                recs = sorted(ag.chunks.items())
                blocks = self._take_any(ag.agno, bulk_nodes_needed(fmt.INOBT, self.bs, len(recs)))
                root, level, images = bulk_build(fmt.INOBT, recs, self.bs, blocks, ag.agno, uuid)
                self.out.update(images)
                ag.ino_root, ag.ino_level = root, level
                self.fixed(f"AG {ag.agno}: inode B+tree rebuilt ({len(recs)} chunks)")
            else:
                ag.ino_root, ag.ino_level = ag.agh.ino_root_blk, ag.agh.ino_level
        # 3. inodes
        for ino, gen in sorted(self.freed.items()):
            self._write_inode(fmt.DiskInode(ino=ino, generation=gen))
        for ino in sorted(inodes):
            st = inodes[ino]
            if st.dirty or st.ext_changed or st.dir_changed:
                self._finish_inode(st)
                self._write_inode(st.di)
        # 4. free space, AG headers
        for ag in self.ags:
            self._finish_ag(ag)
        # 5. superblock: summaries, no orphans, clean
        free = sum(ag.new_agh.free_blk + len(ag.new_agh.agfl) for ag in self.ags)
        sb.free_blk = free
        sb.icount = sum(ag.new_agh.icount for ag in self.ags)
        sb.ifree = sum(ag.new_agh.ifree for ag in self.ags)
        sb.unlinked_ino = 0
        sb.state |= fmt.SB_STATE_CLEAN
        self.out[0] = sb.encode(0)
        for agno in self.sb_copy_bad:
            self.out[sb.sb_blkno(agno)] = sb.encode(agno)
        if self.log_bad is not None:
            self._fresh_log()
        for blk in sorted(self.out):
            self.ov.pwrite(self.out[blk], blk * self.bs)
        self.applied = True

    def _write_inode(self, di) -> None:
        blk, slot = divmod(di.ino, self.ipb)
        data = bytearray(self.out.get(blk) or self.read(blk))
        di.encode_into(data, slot * self.isz, self.isz, self.sb.uuid)
        self.out[blk] = bytes(data)

    def _finish_inode(self, st: _Ino) -> None:
        di = st.di
        di.xattr_blk = st.xattr
        nb = len(st.tree_nodes) + (di.xattr_blk != fmt.NULL_BLK)
        if st.entries is not None:
            di.nextents = len(st.entries)
            di.size = 0
        elif di.data_format in (fmt.FMT_EXTENTS, fmt.FMT_BTREE):
            di.nextents = len(st.ext)
            nb += sum(e[2] for e in st.ext)
        if di.nblocks != nb:
            di.nblocks = nb

    def _write_extents(self, st: _Ino) -> None:
        di = st.di
        ext = st.ext
        if len(ext) <= self.ext_cap:
            di.data_format = fmt.FMT_EXTENTS
            di.fork = b"".join(fmt.EXTENT.struct.pack(*e) for e in ext)
            di.bmbt_root_blk, di.bmbt_level = fmt.NULL_BLK, 0
            return
        blocks = self._take_any(self.ag_of_ino(di.ino),
                                bulk_nodes_needed(fmt.BMBT, self.bs, len(ext)))
        root, level, images = bulk_build(fmt.BMBT, ext, self.bs, blocks, di.ino, self.sb.uuid)
        self.out.update(images)
        st.tree_nodes = blocks
        di.data_format = fmt.FMT_BTREE
        di.fork = b""
        di.bmbt_root_blk, di.bmbt_level = root, level

    def _write_dir(self, st: _Ino) -> None:
        di = st.di
        items = sorted(st.entries.items())
        sf_len = _SF_HDR.size + sum(_SF_ENT.size + len(n) for _k, (n, _c, _f) in items)
        if sf_len <= self.fork_size and di.data_format != fmt.FMT_BTREE:
            parts = [_SF_HDR.pack(st.parent)]
            for (_h, coll), (name, child, ftype) in items:
                parts.append(_SF_ENT.pack(child, coll, ftype, len(name)) + name)
            di.data_format = fmt.FMT_INLINE
            di.fork = b"".join(parts)
            di.inline_len = len(di.fork)
            di.bmbt_root_blk, di.bmbt_level = fmt.NULL_BLK, 0
            return
        recs = [DOTDOT + (st.parent, DT_DIR, 2, b"..")]
        recs += [(h, coll, child, ftype, len(name), name) for (h, coll), (name, child, ftype) in items]
        blocks = self._take_any(self.ag_of_ino(di.ino),
                                bulk_nodes_needed(fmt.DIRBT, self.bs, len(recs)))
        root, level, images = bulk_build(fmt.DIRBT, recs, self.bs, blocks, di.ino, self.sb.uuid)
        self.out.update(images)
        st.tree_nodes = blocks
        di.data_format = fmt.FMT_BTREE
        di.fork = b""
        di.inline_len = 0
        di.bmbt_root_blk, di.bmbt_level = root, level

    def _finish_ag(self, ag: _Ag) -> None:
        """Free-space trees (kept when they match), AGFL and header of one AG."""
        old = ag.agh
        agh = fmt.DiskAgHeader(agno=ag.agno, length_blk=ag.length, ino_root_blk=ag.ino_root,
                               ino_level=ag.ino_level)
        agh.icount = len(ag.chunks) * self.chunk_inodes
        agh.ifree = sum(bin(m).count("1") for m in ag.chunks.values())
        agfl = list(ag.agfl)
        bno_now = [(s, e - s) for s, e in self._norm(ag)]
        keep = (ag.agno not in self.fs_disagree and agfl == old.agfl
                and sorted(set(ag.bno[0])) == bno_now)
        if keep:
            agh.bno_root_blk, agh.bno_level = old.bno_root_blk, old.bno_level
            agh.cnt_root_blk, agh.cnt_level = old.cnt_root_blk, old.cnt_level
        else:
            # both trees from scratch: old nodes are free space again, then node blocks and
            # the AGFL are taken from the ends of the largest free extents
            for b in ag.bno[1] + ag.cnt[1]:
                self._release_range(b, b + 1)
            for _ in range(8):
                self._norm(ag)
                n = len(ag.free)
                need, high = _agfl_bounds(max(bulk_level(fmt.BNOBT, self.bs, n),
                                              bulk_level(fmt.CNTBT, self.bs, n)))
                if len(agfl) < need:
                    got = self._take(ag, (need + high) // 2 - len(agfl))
                    if got is None:
                        raise CorruptError("repair", f"AG {ag.agno}", "no room to refill the AGFL")
                    agfl.extend(got)
                elif len(agfl) > high:
                    surplus, agfl = agfl[:len(agfl) - high], agfl[len(agfl) - high:]
                    self._release(ag, surplus)
                    continue
                nodes = self._nodes_for(len(ag.free))
                blocks = self._take(ag, sum(nodes))
                if blocks is None:
                    raise CorruptError("repair", f"AG {ag.agno}", "no room for the free-space trees")
                # taking whole extents may leave fewer records, so fewer nodes: the blocks
                # left over go on the AGFL (the free set, hence the tree shape, stays put)
                nodes = self._nodes_for(len(ag.free))
                surplus = blocks[sum(nodes):]
                if len(agfl) + len(surplus) <= high:
                    agfl.extend(surplus)
                    blocks = blocks[:sum(nodes)]
                    break
                self._release(ag, blocks)
            else:
                raise CorruptError("repair", f"AG {ag.agno}", "free-space tree sizes do not settle")
            nb = nodes[0]
            bno = [(s, e - s) for s, e in ag.free]
            cnt = sorted((n, s) for s, n in bno)
            base = [ag.start + b for b in blocks]
            r1, l1, im1 = bulk_build(fmt.BNOBT, bno, self.bs, base[:nb], ag.agno, self.sb.uuid)
            r2, l2, im2 = bulk_build(fmt.CNTBT, cnt, self.bs, base[nb:], ag.agno, self.sb.uuid)
            self.out.update(im1)
            self.out.update(im2)
            agh.bno_root_blk, agh.bno_level, agh.cnt_root_blk, agh.cnt_level = r1, l1, r2, l2
            self.fixed(f"AG {ag.agno}: free-space trees rebuilt ({len(bno)} extents, "
                       f"{sum(n for _s, n in bno)} blocks free, {len(agfl)} on the AGFL)")
        agh.agfl = agfl
        agh.free_blk = sum(e - s for s, e in ag.free)
        agh.longest_free_blk = max((e - s for s, e in ag.free), default=0)
        ag.new_agh = agh
        if agh != old:
            blk = ag.start + fmt.AGH_AGBNO
            data = fmt.new_block(self.bs, fmt.AGH_MAGIC, blk, ag.agno, self.sb.uuid)
            agh.encode_into(data)
            fmt.set_block_crc(data)
            self.out[blk] = bytes(data)

    def _nodes_for(self, nrecs: int) -> tuple:
        return (bulk_nodes_needed(fmt.BNOBT, self.bs, nrecs),
                bulk_nodes_needed(fmt.CNTBT, self.bs, nrecs))

    def _fresh_log(self) -> None:
        """A clean filesystem's unreadable log header: a new empty log whose cycle is above
        every record left in the data area (so none of them can ever be replayed)."""
        sb = self.sb
        bs = self.bs
        top = 1
        for b in range(sb.log_start_blk + fmt.LOG_HEADER_SLOTS, sb.log_start_blk + sb.log_nblocks):
            data = self.read(b)
            if struct.unpack_from("<I", data, 0)[0] == fmt.LOGR_MAGIC:
                lsn = struct.unpack_from("<Q", data, 24)[0]
                top = max(top, fmt.lsn_cycle(lsn))
        tail = fmt.make_lsn(top + 2, 0)
        for slot in range(fmt.LOG_HEADER_SLOTS):
            blk = sb.log_start_blk + slot
            # seq parity picks the slot (log.py writes seq s into slot s % 2)
            hdr = fmt.DiskLogHeader(seq=fmt.LOG_HEADER_SLOTS - slot, tail_lsn=tail, tail_prev_lsn=0,
                                    log_nblocks=sb.log_nblocks)
            self.out[blk] = hdr.encode(bs, blk, sb.uuid)
        self.fixed("journal: empty log written (header slots rewritten)")


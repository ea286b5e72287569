"""fsck of btrfslike: the foundation's metadata check plus the filesystem layer's.

Layer: personality.  Imports ``ufs.errors``, ``ufs.iomap.csum``, ``ufs.vfs.ops`` (FsckReport)
and this package.

Checks, in order (each problem is one line naming what and where):
1. ``TransactionManager.check``: tree structure, key order, node checksums/fsid/address/
   generation/level, extent refcounts and back-references against the file extent items found,
   used bytes, overlaps with reserved ranges.
2. Per fs tree (top level and snapshots): every DIR_ITEM entry has its DIR_INDEX twin and an
   INODE_REF naming it in the child (or ROOT_REF for a subvolume); no dangling entries; link
   counts (non-directories: the number of names; directories: 2 + subdirectories, one
   parent); directory sizes (2 x name bytes); ``nbytes`` against the file extent items; file
   extent items do not overlap and belong to existing inodes.  Inodes with ``nlink == 0``
   (unlinked while open, then a crash) are reported in ``stats["orphans"]``, not as errors:
   mount frees them (``repair`` does exactly that).
3. The fsync log: ``stats["log_records"]`` is the number of records mount would replay (the
   log itself is not an error: mount replays it); ``log_root`` must not lie inside an extent.
4. The csum tree against the data: every checksummed sector lies inside a data extent and
   its CRC-32C matches the device (a mismatch is reported as a ``CorruptError`` message with
   the device address); every sector referenced by a checksummed inode's file extent item
   has a checksum.
"""
from __future__ import annotations

import stat as _stat

from ufs.errors import CorruptError
from ufs.iomap.csum import block_csums
from ufs.vfs.ops import FsckReport

from . import format as fmt
from . import tree_log
from .csum_tree import CsumTree
from .format import (
    DIR_INDEX,
    DIR_ITEM,
    EXTENT_DATA,
    EXTENT_ITEM,
    FILE_EXTENT_INLINE,
    FT_DIR,
    INODE_ITEM,
    INODE_REF,
    ROOT_ITEM,
    XATTR_ITEM,
    DiskExtentItem,
    DiskFileExtent,
    DiskInodeItem,
)
from .transaction import TransactionManager

__all__ = ["check_fs", "fsck"]


def _check_tree(tm, tid, problems, stats, sum_ranges):
    tree = tm.tree(tid)
    label = f"tree {tid}"
    inodes, refs, dir_items, dir_index, extents = {}, {}, {}, {}, {}
    for k, d in tree.items():
        oid, typ, off = k
        where = f"{label} key {fmt.key_str(k)}"
        try:
            if typ == INODE_ITEM:
                inodes[oid] = DiskInodeItem.decode(d, where)
            elif typ == INODE_REF:
                for idx, name in fmt.decode_inode_refs(d, where):
                    refs.setdefault(oid, []).append((off, idx, name))
            elif typ == DIR_ITEM:
                for e in fmt.decode_dir_entries(d, where):
                    if fmt.name_hash(e.name) != off:
                        problems.append(f"{where}: name {e.name!r} has another hash")
                    dir_items.setdefault(oid, {})[e.name] = e
            elif typ == DIR_INDEX:
                ents = fmt.decode_dir_entries(d, where)
                if len(ents) != 1:
                    problems.append(f"{where}: {len(ents)} entries in a DIR_INDEX")
                dir_index.setdefault(oid, {})[off] = ents[0]
            elif typ == EXTENT_DATA:
                extents.setdefault(oid, []).append((off, DiskFileExtent.decode(d, where)))
            elif typ == XATTR_ITEM:
                fmt.decode_dir_entries(d, where, xattr=True)
        except CorruptError as e:
            problems.append(str(e))
    root_dirid = tm.root_item(tid).root_dirid
    subdirs = {}
    for dirid, ents in dir_items.items():
        if dirid not in inodes or not _stat.S_ISDIR(inodes[dirid].mode):
            problems.append(f"{label}: entries in {dirid}, which is not a directory")
            continue
        by_name = {e.name: (idx, e) for idx, e in dir_index.get(dirid, {}).items()}
        for name, e in ents.items():
            where = f"{label}: entry {name!r} in directory {dirid}"
            twin = by_name.get(name)
            if twin is None or twin[1].location != e.location:
                problems.append(f"{where}: no matching DIR_INDEX")
            if e.location[1] == ROOT_ITEM:
                if e.location[0] not in tm.tree_ids():
                    problems.append(f"{where}: subvolume {e.location[0]} does not exist")
                continue
            child = e.location[0]
            if child not in inodes:
                problems.append(f"{where}: inode {child} does not exist")
                continue
            if twin is not None and (dirid, twin[0], name) not in refs.get(child, []):
                problems.append(f"{where}: inode {child} has no INODE_REF for it")
            if e.file_type == FT_DIR:
                subdirs[dirid] = subdirs.get(dirid, 0) + 1
    for dirid, idx_ents in dir_index.items():
        for idx, e in idx_ents.items():
            if e.name not in dir_items.get(dirid, {}):
                problems.append(f"{label}: DIR_INDEX {idx} of {dirid} ({e.name!r}) has no DIR_ITEM")
    orphans = []
    for oid, ino in inodes.items():
        where = f"{label}: inode {oid}"
        names = refs.get(oid, [])
        for parent, idx, name in names:
            e = dir_index.get(parent, {}).get(idx)
            if e is None or e.name != name or e.location[0] != oid:
                problems.append(f"{where}: INODE_REF {name!r} in {parent} has no entry")
        if ino.nlink == 0:
            orphans.append(oid)
            continue
        if _stat.S_ISDIR(ino.mode):
            want = 2 + subdirs.get(oid, 0)
            nparents = len(names)
            if (oid == root_dirid) != (nparents == 0) or nparents > 1:
                problems.append(f"{where}: directory with {nparents} parents")
            size = 2 * sum(len(n) for n in dir_items.get(oid, {}))
            if ino.size != size:
                problems.append(f"{where}: directory size {ino.size}, names say {size}")
        else:
            want = len(names)
        if ino.nlink != want:
            problems.append(f"{where}: nlink {ino.nlink}, found {want}")
        nbytes, prev_end = 0, 0
        for pos, fe in extents.get(oid, []):
            if pos < prev_end:
                problems.append(f"{where}: file extent at {pos} overlaps the previous one")
            ln = fe.ram_bytes if fe.type == FILE_EXTENT_INLINE else fe.num_bytes
            prev_end = pos + ln
            if fe.type != FILE_EXTENT_INLINE and fe.disk_bytenr:
                nbytes += fe.num_bytes
                if _stat.S_ISREG(ino.mode) and not ino.flags & fmt.INODE_NODATASUM \
                        and fe.type == fmt.FILE_EXTENT_REG:
                    sum_ranges.append((fe.disk_bytenr + fe.offset, fe.num_bytes,
                                       f"{where} pos {pos}"))
        if ino.nbytes != nbytes:
            problems.append(f"{where}: nbytes {ino.nbytes}, extents say {nbytes}")
    for oid in extents:
        if oid not in inodes:
            problems.append(f"{label}: file extents of missing inode {oid}")
    stats.setdefault("orphans", []).extend((tid, o) for o in orphans)
    stats["inodes"] = stats.get("inodes", 0) + len(inodes)


def check_fs(tm, device):
    """``(problems, stats)`` of a mounted TransactionManager (nothing is written)."""
    problems = list(tm.check())
    stats = {"generation": tm.generation, "bytes_used": tm.sb.bytes_used}
    if problems:
        return problems, stats
    # the fsync log (SPEC.md section 10): records mount would replay; the log area must be
    # free space in the committed generation
    stats["log_records"] = len(tree_log.read_log(tm))
    lr = tm.sb.log_root
    if lr:
        hit = tm.extents.btree.prev_item((lr, EXTENT_ITEM, fmt.U64_MAX))
        if hit is not None and hit[0][1] == EXTENT_ITEM and hit[0][0] + hit[0][2] > lr:
            problems.append(f"superblock log_root {lr:#x} lies inside extent {hit[0][0]:#x}")
    ss = tm.sectorsize
    sum_ranges = []
    for tid in tm.tree_ids():
        if tm.root_item(tid).root_dirid:
            _check_tree(tm, tid, problems, stats, sum_ranges)
    data_extents = []
    for (bytenr, _t, nbytes), raw in tm.extents.btree.items((0, EXTENT_ITEM, 0)):
        if _t == EXTENT_ITEM and not DiskExtentItem.decode(raw, "extent").is_tree_block:
            data_extents.append((bytenr, nbytes))
    data_extents.sort()
    import bisect
    starts = [b for b, _ in data_extents]
    have = set()
    nsect = 0
    for bytenr, csums in CsumTree(tm).items():
        i = bisect.bisect_right(starts, bytenr) - 1
        end = bytenr + len(csums) * ss
        if i < 0 or end > data_extents[i][0] + data_extents[i][1]:
            problems.append(f"csum item {bytenr:#x}+{len(csums)} sectors outside any data extent")
            continue
        data = device.pread(len(csums) * ss, bytenr)
        got = block_csums(data, ss)
        for j, c in enumerate(csums):
            have.add(bytenr + j * ss)
            nsect += 1
            if got[j] != c:
                problems.append(str(CorruptError(
                    "data sector", f"device {bytenr + j * ss:#x}",
                    f"crc32c {got[j]:#010x}, csum tree says {c:#010x}")))
    for addr, length, where in sum_ranges:
        for s in range(addr, addr + length, ss):
            if s not in have:
                problems.append(f"{where}: no checksum for device sector {s:#x}")
                break
    stats["csum_sectors"] = nsect
    return problems, stats


def fsck(device, repair=False):
    """Check ``device``; with ``repair``, free orphan inodes (what mount does).  Returns an
    ``FsckReport``."""
    report = FsckReport("btrfslike")
    try:
        tm = TransactionManager.mount(device)
    except CorruptError as e:
        report.errors.append(str(e))
        return report
    a = fmt.PROBE_LABEL_ADDR
    try:
        label = device.pread(4096, a)
        if label[:8] != fmt.SB_MAGIC or label[8:24] != tm.fsid:
            report.errors.append(f"probe label at {a:#x}: missing or another fsid")
    except OSError as e:
        report.errors.append(f"probe label at {a:#x}: {e}")
    problems, stats = check_fs(tm, device)
    report.errors.extend(problems)
    report.stats.update(stats)
    if repair and not problems and stats.get("orphans"):
        from .super import BtrfsSuper
        sb = BtrfsSuper(device, tm, None, False)     # orphan cleanup commits
        sb.put_super()
        report.repaired.append(f"freed {len(stats['orphans'])} orphan inodes")
    return report

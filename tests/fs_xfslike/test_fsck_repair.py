"""xfslike fsck repair: damage a clean image at places computed from its on-disk structures,
check the exact kinds of problems fsck reports, repair, check again (clean), and mount to verify
that every undamaged byte survived and disconnected files are in /lost+found.

Damage is done by rewriting blocks of the image with ``format``'s encoders (inodes and tree nodes
get valid CRCs unless the CRC is the damage), never through the mounted filesystem."""
from __future__ import annotations

import errno
import os
import re
import stat
import struct

import pytest
from click.testing import CliRunner

from ufs import api
from ufs.cli import cli
from ufs.errors import InvariantError
from ufs.fs_xfslike import format as fmt
from ufs.fs_xfslike import plugin
from ufs.fs_xfslike.alloc import read_superblock
from ufs.fs_xfslike.dir import dir_hash
from ufs.iomap import RamDev

import xfsl_testdev

P = plugin.PERSONALITY
_SF_ENT = struct.Struct("<QIBB")

# shared fixture (xfsl_testdev): a 64 MiB RamDev formatted xfslike
dev = xfsl_testdev.dev

# -- the image, block by block ------------------------------------------------------------------


class Img:
    """Raw access to an xfslike image (a RamDev or a SparseFileDev)."""

    def __init__(self, dev):
        self.dev = dev
        self.sb = read_superblock(dev)
        self.bs = self.sb.block_size
        self.isz = self.sb.inode_size
        self.ipb = self.bs // self.isz

    def block(self, blk: int) -> bytearray:
        return bytearray(self.dev.pread(self.bs, blk * self.bs))

    def put(self, blk: int, data) -> None:
        self.dev.pwrite(bytes(data), blk * self.bs)

    def agh(self, agno: int) -> fmt.DiskAgHeader:
        blk = agno * self.sb.ag_blk + fmt.AGH_AGBNO
        return fmt.DiskAgHeader.decode(self.block(blk), blk)

    def node(self, schema, blk: int):
        return schema.decode_node(self.block(blk), blk)

    def inode(self, ino: int) -> fmt.DiskInode:
        blk, slot = divmod(ino, self.ipb)
        return fmt.DiskInode.decode(self.block(blk), slot * self.isz, self.isz, ino, self.sb.uuid)

    def put_inode(self, di: fmt.DiskInode) -> None:
        blk, slot = divmod(di.ino, self.ipb)
        data = self.block(blk)
        di.encode_into(data, slot * self.isz, self.isz, self.sb.uuid)
        self.put(blk, data)

    def put_sb(self) -> None:
        self.dev.pwrite(self.sb.encode(0), 0)

    def restamp(self, blk: int, data: bytearray) -> None:
        """Write a metadata block with a fresh CRC (the damage is in its fields, not bits)."""
        fmt.set_block_crc(data)
        self.put(blk, data)


def extents(di) -> list:
    return [tuple(e) for e in fmt.EXTENT.struct.iter_unpack(di.fork[:di.nextents * fmt.EXTENT.size])]


def set_extents(di, ext) -> None:
    di.fork = b"".join(fmt.EXTENT.struct.pack(*e) for e in ext)
    di.nextents = len(ext)


def sf_entries(di):
    """(parent, [[ino, coll, ftype, name]]) of a short-form directory."""
    data = di.fork[:di.inline_len]
    parent = struct.unpack_from("<Q", data, 0)[0]
    out = []
    off = 8
    while off < len(data):
        ino, coll, ftype, nlen = _SF_ENT.unpack_from(data, off)
        off += _SF_ENT.size
        out.append([ino, coll, ftype, bytes(data[off:off + nlen])])
        off += nlen
    return parent, out


def set_sf(di, parent, ents) -> None:
    di.fork = struct.pack("<Q", parent) + b"".join(
        _SF_ENT.pack(ino, coll, ftype, len(name)) + name for ino, coll, ftype, name in ents)
    di.inline_len = len(di.fork)
    di.nextents = len(ents)


# -- problem kinds ------------------------------------------------------------------------------

KINDS = [
    ("journal", r"^journal:"),
    ("sb-summary", r"^superblock: summary"),
    ("superblock", r"^superblock: "),
    ("corrupt-inode", r"the inode cannot be trusted|\(a free inode\)"),
    ("inobt-mask", r"inobt says (free|in use), mode is"),
    ("chunk-scan", r"inobt: inode chunk \d+ \(block \d+\) is not in the tree"),
    ("root", r"^root inode \d+ is not an allocated directory"),
    ("corrupt-node", r"CRC mismatch|bad magic|owner \d+, expected"),
    ("lost-mappings", r"were under unreadable extent tree node"),
    ("cross-link", r"cross-linked with"),
    ("out-of-range", r"outside the filesystem or across AGs"),
    ("leaked", r"neither free nor used \(leaked\)"),
    ("in-use-free", r"overlaps free space"),
    ("disconnected", r"not reachable from the root \(disconnected\)"),
    ("dangling-entry", r"names free inode"),
    ("nlink", r"nlink \d+, counted \d+"),
    ("dotdot", r"'\.\.' is \d+, parent is|no '\.\.' record"),
    ("orphan", r"unlinked list"),
    ("ag-counters", r"header: counters"),
]


def kinds(report) -> set:
    out = set()
    for line in report.errors:
        for name, rx in KINDS:
            if re.search(rx, line):
                out.add(name)
                break
        else:
            out.add("other: " + line)
    return out


def repair_and_recheck(dev):
    fixed = api.fsck(dev, repair=True, personality=P)
    assert fixed.repaired, fixed.errors
    again = api.fsck(dev, personality=P)
    assert again.clean, again.errors
    return fixed


def mkdev(size=32 << 20, block_size=4096):
    d = RamDev(size, 512, volatile_cache=False)
    api.mkfs(d, personality=P, block_size=block_size)
    return d


def put_file(fs, path, data, offset=0):
    fd = fs.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    fs.pwrite(fd, data, offset)
    fs.fsync(fd)
    fs.close(fd)
    return fs.stat(path).st_ino


def read_file(fs, path) -> bytes:
    fd = fs.open(path, os.O_RDONLY)
    try:
        return fs.pread(fd, fs.fstat(fd).st_size, 0)
    finally:
        fs.close(fd)


# -- free-space trees ---------------------------------------------------------------------------

def test_corrupt_free_space_trees_are_rebuilt_from_the_used_blocks():
    dev = mkdev(16 << 20, block_size=1024)
    files = {}
    with api.mount(dev, personality=P) as fs:
        for i in range(400):                  # every other one-block file goes: ~200 holes
            files[f"/f{i}"] = bytes([i % 251 + 1]) * 1024
            put_file(fs, f"/f{i}", files[f"/f{i}"])
        for i in range(0, 400, 2):
            fs.unlink(f"/f{i}")
            del files[f"/f{i}"]
        free_before = fs.statvfs("/").f_bfree
    img = Img(dev)
    agh = img.agh(0)
    assert agh.bno_level >= 1, "the test needs a two-level by-block tree"
    _lvl, _keys, ptrs = img.node(fmt.BNOBT, agh.bno_root_blk)
    leaf = img.block(ptrs[1])
    leaf[200] ^= 0x5A                         # bit rot in a bnobt leaf: CRC mismatch
    img.put(ptrs[1], leaf)
    root = img.block(agh.cnt_root_blk)
    struct.pack_into("<Q", root, 16, 7)       # a cntbt root claiming to belong to AG 7
    img.restamp(agh.cnt_root_blk, root)

    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"corrupt-node"}, rep.errors
    assert any(f"block {ptrs[1]}" in e and "CRC mismatch" in e for e in rep.errors)
    assert any("owner 7, expected 0" in e for e in rep.errors)
    fixed = repair_and_recheck(dev)
    assert any("AG 0: free-space trees rebuilt" in r for r in fixed.repaired), fixed.repaired
    new = Img(dev).agh(0)
    assert new.bno_level >= 1 and new.cnt_level >= 1        # rebuilt as real multi-level trees
    with api.mount(dev, personality=P) as fs:
        fs.sb.md.alloc.check()                              # the allocator's own verifier
        # the free count only moves by the difference in tree node blocks
        assert abs(fs.statvfs("/").f_bfree - free_before) <= 4
        for path, data in files.items():
            assert read_file(fs, path) == data, path
        # the rebuilt trees allocate and free like the originals
        for i in range(50):
            put_file(fs, f"/new{i}", b"n" * 3000)
        for i in range(0, 50, 3):
            fs.unlink(f"/new{i}")
    assert api.fsck(dev, personality=P).clean


def test_data_blocks_marked_free_and_leaked_blocks():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        ino = put_file(fs, "/a", b"a" * 5 * 4096)
    img = Img(dev)
    (off, dev_blk, n, _f), = extents(img.inode(ino))
    agno = dev_blk // img.sb.ag_blk
    agh = img.agh(agno)
    assert agh.bno_level == 0
    # the by-block and by-size leaves both get the file's 5 blocks as one more free extent and
    # lose another extent (leaked); the header is rewritten to match, so only the space is off
    bno = img.node(fmt.BNOBT, agh.bno_root_blk)[1]
    victim = max(bno, key=lambda r: r[1])
    recs = sorted([r for r in bno if r != victim] + [(dev_blk - agno * img.sb.ag_blk, n)])
    for schema, root, rows in ((fmt.BNOBT, agh.bno_root_blk, recs),
                               (fmt.CNTBT, agh.cnt_root_blk, sorted((ln, s) for s, ln in recs))):
        data = img.block(root)
        schema.encode_node(data, 0, rows, None)
        img.restamp(root, data)
    agh.free_blk = sum(r[1] for r in recs)
    agh.longest_free_blk = max(r[1] for r in recs)
    blk = agno * img.sb.ag_blk + fmt.AGH_AGBNO
    data = img.block(blk)
    agh.encode_into(data)
    img.restamp(blk, data)

    rep = api.fsck(dev, personality=P)
    # (the superblock's summary, valid after a clean unmount, disagrees too)
    assert kinds(rep) == {"in-use-free", "leaked", "sb-summary"}, rep.errors
    assert any(f"inode {ino} data overlaps free space" in e for e in rep.errors), rep.errors
    repair_and_recheck(dev)
    with api.mount(dev, personality=P) as fs:
        assert read_file(fs, "/a") == b"a" * 5 * 4096


# -- inodes: cross-links, extents past the device, a corrupt extent tree -----------------------

def test_cross_linked_extent_first_owner_keeps_the_blocks(dev):
    with api.mount(dev, personality=P) as fs:
        ino_a = put_file(fs, "/a", b"A" * 4 * 4096)
        ino_b = put_file(fs, "/b", b"B" * 4 * 4096)
        put_file(fs, "/c", b"C" * 3 * 4096)
        free_before = fs.statvfs("/").f_bfree
    assert ino_a < ino_b
    img = Img(dev)
    (ea,) = extents(img.inode(ino_a))
    di_b = img.inode(ino_b)
    set_extents(di_b, [(0, ea[1], ea[2], 0)])          # b's map now points at a's blocks
    img.put_inode(di_b)

    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"cross-link", "leaked"}, rep.errors
    assert any(f"inode {ino_b} data cross-linked with inode {ino_a} data" in e for e in rep.errors)
    fixed = repair_and_recheck(dev)
    assert any(f"inode {ino_b}: file blocks [0, 4)" in r and f"inode {ino_a} data keeps them" in r
               for r in fixed.repaired), fixed.repaired
    with api.mount(dev, personality=P) as fs:
        assert read_file(fs, "/a") == b"A" * 4 * 4096
        assert read_file(fs, "/c") == b"C" * 3 * 4096
        st = fs.stat("/b")
        assert st.st_size == 4 * 4096 and st.st_blocks == 0          # size kept, a hole now
        assert read_file(fs, "/b") == bytes(4 * 4096)
        assert fs.statvfs("/").f_bfree == free_before + 4            # b's own blocks came back


def test_extent_past_the_end_of_the_device_is_dropped():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        ino = put_file(fs, "/f", b"x" * 2 * 4096)
        put_file(fs, "/f", b"y" * 2 * 4096, offset=10 * 4096)
    img = Img(dev)
    di = img.inode(ino)
    ext = extents(di)
    assert len(ext) == 2 and ext[1][0] == 10
    ext[1] = (10, img.sb.total_blk + 5, ext[1][2], 0)
    set_extents(di, ext)
    img.put_inode(di)

    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"out-of-range", "leaked"}, rep.errors
    assert any(f"inode {ino}: extent at file block 10 (device blocks [{img.sb.total_blk + 5}," in e
               for e in rep.errors), rep.errors
    fixed = repair_and_recheck(dev)
    assert any(f"inode {ino}: extent at file block 10 dropped" in r for r in fixed.repaired)
    with api.mount(dev, personality=P) as fs:
        assert fs.stat("/f").st_size == 12 * 4096
        assert read_file(fs, "/f") == b"x" * 8192 + bytes(8 * 4096) + bytes(8192)
        assert fs.stat("/f").st_blocks == 2 * 4096 // 512


def test_corrupt_extent_tree_leaf_keeps_the_other_leaves():
    dev = mkdev(16 << 20, block_size=1024)
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/sparse", os.O_CREAT | os.O_RDWR, 0o644)
        for i in range(100):                 # 100 one-block extents with holes between them
            fs.pwrite(fd, bytes([i + 1]) * 1024, 2 * i * 1024)
        fs.fsync(fd)
        fs.close(fd)
        ino = fs.stat("/sparse").st_ino
        keep = put_file(fs, "/other", b"o" * 7000)
    img = Img(dev)
    di = img.inode(ino)
    assert di.data_format == fmt.FMT_BTREE and di.bmbt_level == 1
    _lvl, keys, ptrs = img.node(fmt.BMBT, di.bmbt_root_blk)
    assert len(ptrs) >= 3
    lo, hi = keys[1][0], keys[2][0]
    leaf = img.block(ptrs[1])
    leaf[100] ^= 1
    img.put(ptrs[1], leaf)

    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"corrupt-node", "lost-mappings", "leaked"}, rep.errors
    assert any(f"inode {ino}: mappings of file blocks [{lo}, {hi})" in e for e in rep.errors)
    repair_and_recheck(dev)
    with api.mount(dev, personality=P) as fs:
        got = read_file(fs, "/sparse")
        assert len(got) == 199 * 1024
        for i in range(100):
            want = bytes(1024) if lo <= 2 * i < hi else bytes([i + 1]) * 1024
            assert got[2 * i * 1024:(2 * i + 1) * 1024] == want, i
        assert read_file(fs, "/other") == b"o" * 7000
        assert fs.stat("/other").st_ino == keep


# -- namespace: lost+found, dangling entries, link counts, '..' -------------------------------

def test_cleared_directory_entries_send_inodes_to_lost_found():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/d", 0o755)
        f_ino = put_file(fs, "/d/f", b"file data" * 1000)
        fs.mkdir("/d/sub", 0o750)
        put_file(fs, "/d/sub/g", b"g" * 5000)
        put_file(fs, "/d/stays", b"s" * 100)
        sub_ino = fs.stat("/d/sub").st_ino
        d_ino = fs.stat("/d").st_ino
        root_links = fs.stat("/").st_nlink
    img = Img(dev)
    di = img.inode(d_ino)
    parent, ents = sf_entries(di)
    names = {e[3] for e in ents}
    assert names == {b"f", b"sub", b"stays"}
    ents = [e for e in ents if e[3] == b"stays"]          # clear 'f' and 'sub'
    free_slot = max(f_ino, sub_ino) + 3                   # an unused slot of the same chunk
    assert img.inode(free_slot).mode == 0
    ents.append([free_slot, 0, 8, b"ghost"])              # and name a free inode
    assert dir_hash(b"ghost") != dir_hash(b"stays")
    set_sf(di, parent, ents)
    img.put_inode(di)

    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"disconnected", "dangling-entry", "nlink", "dotdot"}, rep.errors
    assert any(f"inode {f_ino}: nlink 1 but not reachable" in e for e in rep.errors)
    assert any(f"inode {sub_ino}: nlink 2 but not reachable" in e for e in rep.errors)
    assert any(f"directory {d_ino}: entry b'ghost' names free inode {free_slot}" in e
               for e in rep.errors)
    assert any(f"inode {d_ino}: nlink 3, counted 2" in e for e in rep.errors)
    fixed = repair_and_recheck(dev)
    assert any(f"/lost+found/{f_ino}" in r for r in fixed.repaired)
    with api.mount(dev, personality=P) as fs:
        lf = fs.stat("/lost+found")
        assert stat.S_ISDIR(lf.st_mode) and stat.S_IMODE(lf.st_mode) == 0o700
        assert sorted(fs.listdir("/lost+found")) == sorted([str(f_ino), str(sub_ino)])
        assert read_file(fs, f"/lost+found/{f_ino}") == b"file data" * 1000
        assert read_file(fs, f"/lost+found/{sub_ino}/g") == b"g" * 5000
        assert stat.S_IMODE(fs.stat(f"/lost+found/{sub_ino}").st_mode) == 0o750
        assert fs.listdir("/d") == ["stays"] and read_file(fs, "/d/stays") == b"s" * 100
        assert fs.stat("/d").st_nlink == 2 and lf.st_nlink == 3
        assert fs.stat("/").st_nlink == root_links + 1
        assert fs.stat(f"/lost+found/{f_ino}").st_nlink == 1
        # '..' of the moved directory is lost+found now: rename out and back works
        fs.rename(f"/lost+found/{sub_ino}", "/d/sub")
        assert fs.stat("/d").st_nlink == 3
    assert api.fsck(dev, personality=P).clean
    # a second disconnection reuses the existing lost+found
    with api.mount(dev, personality=P) as fs:
        h_ino = put_file(fs, "/d/h", b"h")
    img = Img(dev)
    di = img.inode(d_ino)
    parent, ents = sf_entries(di)
    set_sf(di, parent, [e for e in ents if e[3] != b"h"])
    img.put_inode(di)
    assert kinds(api.fsck(dev, personality=P)) == {"disconnected"}
    repair_and_recheck(dev)
    with api.mount(dev, personality=P) as fs:
        assert read_file(fs, f"/lost+found/{h_ino}") == b"h"
        assert len(fs.listdir("/lost+found")) == 2


def test_bumped_link_counts_are_set_to_the_counted_entries(dev):
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/d", 0o755)
        ino = put_file(fs, "/d/f", b"z" * 100)
        fs.link("/d/f", "/g")
        d_ino = fs.stat("/d").st_ino
    img = Img(dev)
    for i, n in ((ino, 9), (d_ino, 5)):
        di = img.inode(i)
        di.nlink = n
        img.put_inode(di)
    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"nlink"}, rep.errors
    assert any(f"inode {ino}: nlink 9, counted 2" in e for e in rep.errors)
    assert any(f"inode {d_ino}: nlink 5, counted 2" in e for e in rep.errors)
    repair_and_recheck(dev)
    with api.mount(dev, personality=P) as fs:
        assert fs.stat("/g").st_nlink == 2 and fs.stat("/d").st_nlink == 2
        fs.unlink("/g")
        fs.unlink("/d/f")                    # the last link really frees it now
        fs.rmdir("/d")
    assert api.fsck(dev, personality=P).clean


# -- orphans -------------------------------------------------------------------------------------

def test_orphan_left_by_a_crash_is_freed():
    dev = RamDev(32 << 20, 512, volatile_cache=True)
    api.mkfs(dev, personality=P)
    fs = api.mount(dev, personality=P)
    try:
        free_before = fs.statvfs("/").f_bfree
        fd = fs.open("/open-unlinked", os.O_CREAT | os.O_RDWR, 0o644)
        fs.write(fd, b"q" * 40960)
        fs.fsync(fd)
        fs.unlink("/open-unlinked")
        fs.fsync(fd)                          # the unlink is durable, the file still open
        img = dev.crash(keep_probability=0.0)
        fs.close(fd)
    finally:
        fs.unmount()
    d = RamDev(len(img), 512, volatile_cache=False, data=img)
    rep = api.fsck(d, personality=P)
    # pending orphans are recovery work (mount frees them too), not damage
    assert rep.clean and rep.stats["orphans"] == 1, rep
    fixed = repair_and_recheck(d)
    assert any("orphan (unlinked while open): freed" in r for r in fixed.repaired), fixed.repaired
    assert api.fsck(d, personality=P).stats["orphans"] == 0
    assert read_superblock(d).unlinked_ino == 0
    with api.mount(d, personality=P) as fs:
        assert fs.listdir("/") == [] and fs.statvfs("/").f_bfree == free_before


def test_orphan_on_a_cleanly_unmounted_filesystem_is_a_problem():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        ino = put_file(fs, "/gone", b"g" * 9000)
        put_file(fs, "/kept", b"k" * 9000)
        root = fs.stat("/").st_ino
        free_before = fs.statvfs("/").f_bfree
    img = Img(dev)
    di = img.inode(root)
    parent, ents = sf_entries(di)
    set_sf(di, parent, [e for e in ents if e[3] != b"gone"])
    img.put_inode(di)
    di = img.inode(ino)
    di.nlink = 0
    img.put_inode(di)
    img.sb.unlinked_ino = ino
    img.put_sb()
    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"orphan"}, rep.errors
    repair_and_recheck(dev)
    with api.mount(dev, personality=P) as fs:
        assert fs.listdir("/") == ["kept"] and read_file(fs, "/kept") == b"k" * 9000
        assert fs.statvfs("/").f_bfree == free_before + 3


def test_linked_inode_on_the_unlinked_list_is_taken_off_not_freed():
    """The list names a live, linked file (what freeing the list's tail without unlinking it
    leaves once the number is reused); mount would free that file."""
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        ino = put_file(fs, "/live", b"L" * 5000)
    img = Img(dev)
    img.sb.unlinked_ino = ino
    img.put_sb()
    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"orphan"}, rep.errors
    assert any(f"inode {ino}: on the unlinked list but linked" in e for e in rep.errors)
    repair_and_recheck(dev)
    assert read_superblock(dev).unlinked_ino == 0
    with api.mount(dev, personality=P) as fs:
        assert read_file(fs, "/live") == b"L" * 5000


# -- the journal, the CLI -------------------------------------------------------------------------

def _dirty_image_with_a_broken_log() -> bytes:
    dev = RamDev(32 << 20, 512, volatile_cache=True)
    api.mkfs(dev, personality=P)
    fs = api.mount(dev, personality=P)
    try:
        fs.mkdir("/x", 0o755)
        put_file(fs, "/x/f", b"f" * 5000)
        img = bytearray(dev.crash(keep_probability=0.0))
    finally:
        fs.unmount()
    sb = read_superblock(RamDev(len(img), 512, volatile_cache=False, data=bytes(img)))
    assert not sb.state & fmt.SB_STATE_CLEAN
    for slot in range(fmt.LOG_HEADER_SLOTS):             # both log header slots unreadable
        img[(sb.log_start_blk + slot) * sb.block_size + 60] ^= 0xFF
    return bytes(img)


def test_dirty_log_that_cannot_be_replayed_refuses_repair():
    img = _dirty_image_with_a_broken_log()
    d = RamDev(len(img), 512, volatile_cache=False, data=img)
    rep = api.fsck(d, personality=P)
    assert "journal" in kinds(rep)
    assert any("cannot be replayed" in e for e in rep.errors)
    with pytest.raises(OSError) as ei:
        api.fsck(d, repair=True, personality=P)
    assert ei.value.errno == errno.EUCLEAN and "refusing to repair" in str(ei.value)
    assert d.contents() == img                            # nothing written


def test_clean_filesystem_with_a_broken_log_header_gets_a_new_log():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        put_file(fs, "/f", b"F" * 7777)
    img = Img(dev)
    blk = img.sb.log_start_blk
    for slot in range(fmt.LOG_HEADER_SLOTS):
        data = img.block(blk + slot)
        data[60] ^= 0xFF
        img.put(blk + slot, data)
    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"journal"}, rep.errors
    repair_and_recheck(dev)
    with api.mount(dev, personality=P) as fs:
        assert read_file(fs, "/f") == b"F" * 7777
        put_file(fs, "/g", b"G" * 100)
    with api.mount(dev, personality=P) as fs:
        assert read_file(fs, "/g") == b"G" * 100
    assert api.fsck(dev, personality=P).clean


def test_cli_exit_codes(tmp_path):
    path = str(tmp_path / "img")
    api.mkfs(path, personality=P, size="32M")
    with api.mount(path, personality=P) as fs:
        ino = put_file(fs, "/f", b"c" * 100)
    dev = xfsl_testdev.SparseFileDev(path, os.path.getsize(path))
    try:
        img = Img(dev)
        di = img.inode(ino)
        di.nlink = 4
        img.put_inode(di)
    finally:
        dev.close()
    runner = CliRunner()
    r = runner.invoke(cli, ["fsck", "-n", path], catch_exceptions=False)
    assert r.exit_code == 1 and f"inode {ino}: nlink 4, counted 1" in r.output, r.output
    r = runner.invoke(cli, ["fsck", path], catch_exceptions=False)
    assert r.exit_code == 1 and "repaired:" in r.output, r.output
    r = runner.invoke(cli, ["fsck", path], catch_exceptions=False)
    assert r.exit_code == 0 and "clean" in r.output, r.output
    # a dirty log that cannot be replayed: operational error, nothing changed
    with open(path, "wb") as f:
        f.write(_dirty_image_with_a_broken_log())
    r = runner.invoke(cli, ["fsck", path], catch_exceptions=False)
    assert r.exit_code == 8 and "cannot be replayed" in r.output, r.output


# -- more damage: a corrupt inode, a corrupt directory tree, the AGFL, the inobt ----------------

def test_corrupt_inode_is_cleared_and_its_entry_removed():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        bad = put_file(fs, "/bad", b"b" * 3 * 4096)
        put_file(fs, "/good", b"g" * 3 * 4096)
        free_before = fs.statvfs("/").f_bfree
    img = Img(dev)
    blk, slot = divmod(bad, img.ipb)
    data = img.block(blk)
    data[slot * img.isz + 72] ^= 0xFF                     # the size field: CRC mismatch
    img.put(blk, data)
    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"corrupt-inode", "dangling-entry", "leaked"}, rep.errors
    repair_and_recheck(dev)
    with api.mount(dev, personality=P) as fs:
        assert fs.listdir("/") == ["good"] and read_file(fs, "/good") == b"g" * 3 * 4096
        assert fs.statvfs("/").f_bfree == free_before + 3
        assert put_file(fs, "/again", b"a") == bad          # the slot is free again
    assert api.fsck(dev, personality=P).clean


@pytest.mark.parametrize("which", ["leaf", "root"])
def test_corrupt_directory_tree_salvages_entries_and_lost_found_gets_the_rest(which):
    dev = mkdev()
    want = {}
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/big", 0o755)
        for i in range(300):
            want[f"n{i:03d}"] = f"content {i}".encode() * (i % 7 + 1)
            fd = fs.open(f"/big/n{i:03d}", os.O_CREAT | os.O_WRONLY, 0o644)
            fs.write(fd, want[f"n{i:03d}"])
            fs.close(fd)
        inos = {n: fs.stat(f"/big/{n}").st_ino for n in want}
        big = fs.stat("/big").st_ino
    img = Img(dev)
    di = img.inode(big)
    assert di.data_format == fmt.FMT_BTREE and di.bmbt_level >= 1
    _lvl, _keys, ptrs = img.node(fmt.DIRBT, di.bmbt_root_blk)
    victim = ptrs[3] if which == "leaf" else di.bmbt_root_blk
    data = img.block(victim)
    data[0] ^= 0xFF                                        # bad magic
    img.put(victim, data)
    rep = api.fsck(dev, personality=P)
    lost_dotdot = {"dotdot"} if which == "root" else set()          # '..' lived in the root
    assert kinds(rep) == {"corrupt-node", "disconnected", "leaked"} | lost_dotdot, rep.errors
    repair_and_recheck(dev)
    with api.mount(dev, personality=P) as fs:
        kept = set(fs.listdir("/big"))
        found = set(fs.listdir("/lost+found"))
        assert kept < set(want) and len(kept) + len(found) == 300
        assert (len(kept) == 0) == (which == "root")
        for name in kept:
            assert read_file(fs, f"/big/{name}") == want[name]
        for name in want:
            if name not in kept:
                assert str(inos[name]) in found
                assert read_file(fs, f"/lost+found/{inos[name]}") == want[name]
        lf = fs.sb.iget(fs.stat("/lost+found").st_ino)
        if which == "root":                                 # 300 entries: a rebuilt dirbt
            assert lf.di.data_format == fmt.FMT_BTREE
            assert fs.sb.dstate(lf).tree.check() == 301     # the entries and '..'
        # lost+found works as a directory afterwards (short form or a rebuilt tree)
        fs.rename(f"/lost+found/{inos['n001']}" if "n001" not in kept else "/big/n001", "/x")
        assert read_file(fs, "/x") == want["n001"]
    assert api.fsck(dev, personality=P).clean


def test_agfl_entry_on_file_data_is_dropped_from_the_agfl():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        ino = put_file(fs, "/f", b"d" * 4 * 4096)
    img = Img(dev)
    (_off, dev_blk, _n, _fl), = extents(img.inode(ino))
    agno, agbno = divmod(dev_blk, img.sb.ag_blk)
    agh = img.agh(agno)
    old = agh.agfl[-1]
    agh.agfl[-1] = agbno + 1                               # the AGFL now hands out file data
    blk = agno * img.sb.ag_blk + fmt.AGH_AGBNO
    data = img.block(blk)
    agh.encode_into(data)
    img.restamp(blk, data)
    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"cross-link", "leaked"}, rep.errors
    assert any(f"AG {agno} AGFL cross-linked with inode {ino} data" in e for e in rep.errors)
    assert any(f"blocks [{agno * img.sb.ag_blk + old}, " in e and "leaked" in e for e in rep.errors)
    repair_and_recheck(dev)
    assert agbno + 1 not in Img(dev).agh(agno).agfl
    with api.mount(dev, personality=P) as fs:
        for i in range(20):                                 # allocations must not hit /f
            put_file(fs, f"/n{i}", bytes([i]) * 5000)
        assert read_file(fs, "/f") == b"d" * 4 * 4096
    assert api.fsck(dev, personality=P).clean


def test_inobt_free_mask_follows_the_inodes():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        ino = put_file(fs, "/f", b"i" * 100)
    img = Img(dev)
    agno = (ino // img.ipb) // img.sb.ag_blk
    agh = img.agh(agno)
    assert agh.ino_level == 0
    data = img.block(agh.ino_root_blk)
    _lvl, recs, _p = fmt.INOBT.decode_node(data, agh.ino_root_blk)
    recs = [(s, m | (1 << (ino - s)) if s <= ino < s + 64 else m) for s, m in recs]
    fmt.INOBT.encode_node(data, 0, recs, None)             # inobt: "/f's inode is free"
    img.restamp(agh.ino_root_blk, data)
    agh.ifree += 1
    blk = agno * img.sb.ag_blk + fmt.AGH_AGBNO
    data = img.block(blk)
    agh.encode_into(data)
    img.restamp(blk, data)
    img.sb.ifree += 1
    img.put_sb()
    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"inobt-mask"}, rep.errors
    repair_and_recheck(dev)
    with api.mount(dev, personality=P) as fs:
        for i in range(5):
            assert put_file(fs, f"/n{i}", b"n") != ino        # not handed out again
        assert read_file(fs, "/f") == b"i" * 100
    assert api.fsck(dev, personality=P).clean


def test_extent_pointing_into_an_inode_chunk_loses_to_the_inodes():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        ino = put_file(fs, "/f", b"c" * 2 * 4096)
        other = put_file(fs, "/g", b"g" * 10)
    img = Img(dev)
    di = img.inode(ino)
    (e,) = extents(di)
    chunk_blk = ino // img.ipb
    set_extents(di, [(0, chunk_blk, 2, 0)])                 # "data" on the inode cluster
    img.put_inode(di)
    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"cross-link", "leaked"}, rep.errors
    assert any(f"inode {ino} data cross-linked with AG 0 inode chunk" in e for e in rep.errors)
    repair_and_recheck(dev)
    with api.mount(dev, personality=P) as fs:
        assert read_file(fs, "/f") == bytes(2 * 4096)
        assert read_file(fs, "/g") == b"g" * 10 and fs.stat("/g").st_ino == other
    assert e[1] != chunk_blk


# -- the offline B+tree builder and walker -------------------------------------------------------

@pytest.mark.parametrize("schema", [fmt.BNOBT, fmt.CNTBT, fmt.BMBT, fmt.DIRBT])
@pytest.mark.parametrize("n", [0, 1, 40, 41, 121, 122, 2000, 15000])
def test_bulk_build_round_trips_through_the_salvage_walk(schema, n):
    from ufs.fs_xfslike.btree import bulk_build, bulk_level, bulk_nodes_needed, salvage_walk
    bs, uuid, owner = 1024, b"u" * 16, 3
    if schema is fmt.DIRBT:
        recs = [(i + 1, 0, 100 + i, 8, 4, b"n%03d" % (i % 1000)) for i in range(n)]
    elif schema is fmt.BMBT:
        recs = [(3 * i, 1000 + 5 * i, 2, i & 1) for i in range(n)]
    else:
        recs = [(7 * i + 1, 3) for i in range(n)]
    need = bulk_nodes_needed(schema, bs, n)
    blocks = list(range(500, 500 + need))
    root, level, images = bulk_build(schema, recs, bs, blocks, owner, uuid)
    assert sorted(images) == blocks and root in images
    assert level == bulk_level(schema, bs, n) and (level == 0) == (need == 1)
    got, nodes, problems, lost = salvage_walk(lambda b: images[b], schema, root, level, owner,
                                              uuid, bs, 10 ** 6)
    assert not problems and not lost and sorted(nodes) == blocks
    want = [tuple(r) for r in recs]
    if schema is fmt.DIRBT:
        got = [r[:5] + (r[5][:r[4]],) for r in got]
    assert got == want
    with pytest.raises(InvariantError):
        bulk_build(schema, recs, bs, blocks + [9999], owner, uuid)      # wrong block count


# -- what has no second copy: the root inode, an AG header, the inode B+tree ---------------------

def test_corrupt_root_inode_gets_a_new_root_and_everything_in_lost_found():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        a = put_file(fs, "/a", b"a" * 6000)
        fs.mkdir("/d", 0o755)
        put_file(fs, "/d/b", b"b" * 6000)
        d = fs.stat("/d").st_ino
        root = fs.stat("/").st_ino
    img = Img(dev)
    blk, slot = divmod(root, img.ipb)
    data = img.block(blk)
    data[slot * img.isz + 160] ^= 0x10                     # inside the root's entries
    img.put(blk, data)
    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"corrupt-inode", "root", "disconnected", "dotdot"}, rep.errors
    fixed = repair_and_recheck(dev)
    assert any(f"root directory recreated (inode {root})" in r for r in fixed.repaired)
    with api.mount(dev, personality=P) as fs:
        assert fs.stat("/").st_ino == root and fs.listdir("/") == ["lost+found"]
        assert sorted(fs.listdir("/lost+found")) == sorted([str(a), str(d)])
        assert read_file(fs, f"/lost+found/{a}") == b"a" * 6000
        assert read_file(fs, f"/lost+found/{d}/b") == b"b" * 6000
        assert fs.stat("/").st_nlink == 3 and fs.stat("/lost+found").st_nlink == 3


@pytest.mark.parametrize("what", ["ag-header", "inobt-root"])
def test_inode_chunks_are_found_by_scanning_when_their_index_is_lost(what):
    dev = mkdev()
    want = {}
    with api.mount(dev, personality=P) as fs:
        for k in range(3):
            fs.mkdir(f"/d{k}", 0o755)
            for i in range(20):
                want[f"/d{k}/f{i}"] = f"{k}:{i}".encode() * 300
                put_file(fs, f"/d{k}/f{i}", want[f"/d{k}/f{i}"])
        some = fs.stat("/d1/f3").st_ino
    img = Img(dev)
    agno = (some // img.ipb) // img.sb.ag_blk
    agh = img.agh(agno)
    assert agh.icount >= 64
    victim = agno * img.sb.ag_blk + fmt.AGH_AGBNO if what == "ag-header" else agh.ino_root_blk
    data = img.block(victim)
    data[50] ^= 0x01
    img.put(victim, data)
    rep = api.fsck(dev, personality=P)
    # (the unreadable inobt node is nobody's block; a lost header hides the space check)
    leaked = {"leaked"} if what == "inobt-root" else set()
    assert kinds(rep) == {"corrupt-node", "chunk-scan"} | leaked, rep.errors
    assert any(f"AG {agno} inobt: inode chunk" in e for e in rep.errors)
    fixed = repair_and_recheck(dev)
    if what == "ag-header":
        assert any(f"AG {agno}: header rebuilt" in r for r in fixed.repaired)
    with api.mount(dev, personality=P) as fs:
        for path, data in want.items():
            assert read_file(fs, path) == data, path
        for k in range(3):                     # new inodes do not reuse the live ones
            put_file(fs, f"/d{k}/new", b"new")
        fs.sb.md.alloc.check()
        fs.sb.ialloc.trees[agno].check()
    assert api.fsck(dev, personality=P).clean


def test_corrupt_primary_superblock_is_rebuilt_from_its_copy():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        put_file(fs, "/f", b"p" * 9999)
        fs.mkdir("/d", 0o755)
        root = fs.stat("/").st_ino
        before = read_superblock(dev)
    data = bytearray(dev.pread(512, 0))
    data[70] ^= 0x01                                       # block size field: unreadable
    dev.pwrite(bytes(data), 0)
    with pytest.raises(OSError):
        api.mount(dev, personality=P)
    rep = api.fsck(dev, personality=P)
    assert kinds(rep) == {"superblock"}, rep.errors
    fixed = repair_and_recheck(dev)
    assert any("primary superblock rewritten from the copy" in r for r in fixed.repaired)
    sb = read_superblock(dev)
    assert sb.root_ino == root and sb.uuid == before.uuid and sb.state & fmt.SB_STATE_CLEAN
    with api.mount(dev, personality=P) as fs:
        assert read_file(fs, "/f") == b"p" * 9999 and sorted(fs.listdir("/")) == ["d", "f"]


# -- random damage: repair refuses with a reason, or leaves a clean, mountable filesystem -------

_FUZZ_BASE: dict = {}


def _fuzz_base():
    if not _FUZZ_BASE:
        d = mkdev(16 << 20, block_size=1024)
        with api.mount(d, personality=P) as fs:
            fs.mkdir("/d", 0o755)
            fs.mkdir("/d/e", 0o755)
            for i in range(80):
                put_file(fs, f"/d/f{i}", bytes([i + 1]) * (i * 37 % 3000 + 1))
            fd = fs.open("/sparse", os.O_CREAT | os.O_WRONLY, 0o644)
            for i in range(60):
                fs.pwrite(fd, b"s" * 1024, 2 * i * 1024)
            fs.fsync(fd)
            fs.close(fd)
            fs.symlink("x" * 2000, "/d/e/long")
            fs.setxattr("/d/f3", "user.a", b"v")
            for i in range(0, 80, 3):
                fs.unlink(f"/d/f{i}")
        img = d.contents()
        bs = 1024
        magics = {fmt.SB_MAGIC, fmt.AGH_MAGIC, fmt.BNOBT_MAGIC, fmt.CNTBT_MAGIC, fmt.INOBT_MAGIC,
                  fmt.BMBT_MAGIC, fmt.DIRBT_MAGIC, fmt.INODE_MAGIC}
        _FUZZ_BASE["img"] = img
        _FUZZ_BASE["meta"] = [b for b in range(len(img) // bs)
                              if int.from_bytes(img[b * bs:b * bs + 4], "little") in magics]
    return _FUZZ_BASE["img"], _FUZZ_BASE["meta"]


def _walk_all(fs):
    """Read every file, symlink and directory of a mounted filesystem."""
    stack = ["/"]
    while stack:
        path = stack.pop()
        for name in fs.listdir(path):
            q = path.rstrip("/") + "/" + name
            st = fs.lstat(q)
            if stat.S_ISDIR(st.st_mode):
                stack.append(q)
            elif stat.S_ISREG(st.st_mode):
                read_file(fs, q)
            elif stat.S_ISLNK(st.st_mode):
                fs.readlink(q)


@pytest.mark.parametrize("seed", range(16))
def test_random_metadata_damage_is_repaired_or_refused(seed):
    import random
    base, meta = _fuzz_base()
    rng = random.Random(seed)
    img = bytearray(base)
    bs = 1024
    for _ in range(rng.randint(1, 6)):
        b = rng.choice(meta)
        off = b * bs + rng.randrange(0, 400)
        img[off] ^= 1 << rng.randrange(8)
        if rng.random() < 0.5 and int.from_bytes(img[b * bs:b * bs + 4], "little") != fmt.INODE_MAGIC:
            fmt.set_block_crc(memoryview(img)[b * bs:(b + 1) * bs])   # wrong but "valid"
    d = RamDev(len(img), 512, volatile_cache=False, data=bytes(img))
    first = api.fsck(d, personality=P)
    fixed = api.fsck(d, repair=True, personality=P)
    refused = [e for e in fixed.errors if e.startswith(("repair not attempted", "repair failed"))]
    if refused:
        assert not fixed.repaired and d.contents() == bytes(img), refused
        return
    again = api.fsck(d, personality=P)
    assert again.clean, (first.errors[:5], again.errors[:5])
    with api.mount(d, personality=P) as fs:
        _walk_all(fs)
        fs.mkdir("/after", 0o755)
        for i in range(5):
            put_file(fs, f"/after/n{i}", b"z" * 3000)
    assert api.fsck(d, personality=P).clean

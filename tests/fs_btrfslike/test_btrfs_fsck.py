"""btrfslike fsck finds what it claims to check: each test breaks one rule in a committed
image (through the trees, committed properly, so only the broken rule is wrong) and expects a
report naming it; a healthy image is clean.  Also per-file inode flags (NODATACOW set on an
empty file, refused on a file with data).
"""
from __future__ import annotations

import errno
import os

import pytest

from ufs import api
from ufs.fs_btrfslike import format as fmt
from ufs.fs_btrfslike import plugin
from ufs.fs_btrfslike.csum_tree import CsumTree
from ufs.iomap import RamDev

P = plugin.PERSONALITY
SIZE = 64 << 20
BS = 4096


@pytest.fixture
def dev():
    d = RamDev(SIZE, 512)
    api.mkfs(d, personality=P)
    with api.mount(d, personality=P) as fs:
        fs.mkdir("/d")
        fd = fs.open("/d/f", os.O_CREAT | os.O_RDWR | os.O_DIRECT)
        fs.pwrite(fd, b"f" * 2 * BS, 0)
        fs.close(fd)
        fs.link("/d/f", "/h")
    return d


def _break(dev, fn):
    """Mount, let ``fn(sb, trans, tree)`` change the fs tree directly, commit, unmount."""
    fs = api.mount(dev, personality=P)
    try:
        sb = fs.sb
        with sb.tm.lock:
            fn(sb, sb.tm.start(), sb.tm.tree(fmt.FS_TREE_ID))
            sb.tm.commit()
    finally:
        fs.unmount()
    return api.fsck(dev, personality=P)


def _ino(dev, path):
    with api.mount(dev, personality=P) as fs:
        return fs.stat(path).st_ino


def test_healthy_image_is_clean(dev):
    rep = api.fsck(dev, personality=P)
    assert rep.clean and rep.stats["inodes"] == 3 and rep.stats["csum_sectors"] == 2


def test_wrong_link_count_is_reported(dev):
    ino = _ino(dev, "/d/f")

    def bump(sb, trans, tree):
        item = fmt.DiskInodeItem.decode(tree.lookup((ino, fmt.INODE_ITEM, 0)), "t")
        item.nlink = 5
        tree.update(trans, (ino, fmt.INODE_ITEM, 0), item.encode())
    rep = _break(dev, bump)
    assert any(f"inode {ino}: nlink 5, found 2" in e for e in rep.errors), rep.errors


def test_missing_dir_index_is_reported(dev):
    dino = _ino(dev, "/d")

    def drop(sb, trans, tree):
        (k, _d), = list(tree.items((dino, fmt.DIR_INDEX, 0), (dino, fmt.DIR_INDEX + 1, 0)))
        tree.delete(trans, k)
    rep = _break(dev, drop)
    assert any("no matching DIR_INDEX" in e for e in rep.errors), rep.errors


def test_missing_checksum_and_stray_checksum_are_reported(dev):
    def drop_csums(sb, trans, tree):
        cs = CsumTree(sb.tm)
        (b, _csums), = list(cs.items())
        cs.delete(trans, b, BS)                       # first sector loses its checksum
        cs.insert(trans, 1 << 25, [0])                # a checksum outside any extent
    rep = _break(dev, drop_csums)
    assert any("no checksum for device sector" in e for e in rep.errors), rep.errors
    assert any("outside any data extent" in e for e in rep.errors), rep.errors


def test_flipped_node_bit_is_reported(dev):
    with api.mount(dev, personality=P) as fs:
        tm = fs.sb.tm
        root = tm.root_item(fmt.FS_TREE_ID).bytenr
    img = bytearray(dev.contents())
    img[root + 200] ^= 0x10
    rep = api.fsck(RamDev(SIZE, 512, data=bytes(img)), personality=P)
    assert any(f"{root:#x}" in e for e in rep.errors), rep.errors


def test_per_file_nodatacow_flag(dev):
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/c", os.O_CREAT | os.O_RDWR | os.O_DIRECT)
        inode = fs.fdtable.get(fd).f_inode
        fs.sb.set_inode_flags(inode, fmt.INODE_NODATACOW)
        assert inode.nodatacow and inode.nodatasum
        fs.pwrite(fd, b"1" * BS, 0)
        fs.fsync(fd)
        with fs.sb.tm.lock:
            from ufs.fs_btrfslike.inode import extent_items
            before = extent_items(fs.sb.tm.tree(5), inode.objectid, 0, BS)[0][1].disk_bytenr
        fs.pwrite(fd, b"2" * BS, 0)
        with fs.sb.tm.lock:
            after = extent_items(fs.sb.tm.tree(5), inode.objectid, 0, BS)[0][1].disk_bytenr
        assert before == after                       # overwritten in place
        with pytest.raises(OSError) as ei:
            fs.sb.set_inode_flags(inode, clear_flags=fmt.INODE_NODATACOW)
        assert ei.value.errno == errno.EINVAL          # not on a file with data
        fs.close(fd)
    with api.mount(dev, personality=P) as fs:           # the flag is on disk
        fd = fs.open("/c", os.O_RDONLY)
        assert fs.fdtable.get(fd).f_inode.nodatacow
        assert fs.pread(fd, BS, 0) == b"2" * BS
    assert api.fsck(dev, personality=P).clean

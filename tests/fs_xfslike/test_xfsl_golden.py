"""The xfslike on-disk format pinned by a small compressed golden image made by our mkfs.

``tests/data/xfslike-v1.img.gz`` (4 MiB, 1 KiB blocks, 2 AGs) holds: a file with written and
unwritten extents, a file whose extents spill into a bmbt, a dirbt directory, a short-form
directory, short and long symlinks, a hard link and an xattr.  The test decodes it with the
current code: a format change that breaks old images fails here (regenerate with
``python tests/fs_xfslike/test_xfsl_golden.py`` only together with a FORMAT_VERSION bump)."""
from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

from ufs import api
from ufs.fs_xfslike import format as fmt
from ufs.fs_xfslike import plugin
from ufs.fs_xfslike.alloc import read_superblock
from ufs.iomap import RamDev, aligned_buffer

P = plugin.PERSONALITY
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "xfslike-v1.img.gz"
SIZE = 4 << 20
BS = 1024


def _content(i: int) -> bytes:
    return bytes((i * 7 + j) % 251 for j in range(BS))


def make_golden(path: Path) -> None:
    dev = RamDev(SIZE, 512)
    api.mkfs(dev, personality=P, block_size=BS, options="label=golden")
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/small", 0o755)
        fs.mkdir("/big", 0o700)
        for i in range(40):
            fs.close(fs.open(f"/big/entry-{i:03d}", os.O_CREAT | os.O_WRONLY, 0o600))
        fd = fs.open("/small/data", os.O_CREAT | os.O_RDWR, 0o644)
        fs.write(fd, b"golden data\n" * 300)
        fs.fallocate(fd, api.FALLOC_FL_KEEP_SIZE, 16 * BS, 4 * BS)
        fs.close(fd)
        fd = fs.open("/frag", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        for i in range(0, 64, 2):
            b = aligned_buffer(BS)
            memoryview(b)[:] = _content(i)
            fs.pwrite(fd, b, i * BS)
        fs.close(fd)
        fs.symlink("small/data", "/short-link")
        fs.symlink("L" * 1500, "/long-link")
        fs.link("/small/data", "/hard")
        fs.setxattr("/small/data", "user.golden", b"yes")
    raw = dev.contents()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(raw)


def _load() -> RamDev:
    with gzip.open(GOLDEN, "rb") as f:
        raw = f.read()
    assert len(raw) == SIZE
    return RamDev(SIZE, 512, data=raw)


def test_golden_superblock_decodes():
    dev = _load()
    sb = read_superblock(dev)
    assert sb.version == fmt.FORMAT_VERSION == 1
    assert (sb.block_size, sb.inode_size, sb.ag_count) == (BS, 512, 2)
    assert sb.label == b"golden" and sb.state & fmt.SB_STATE_CLEAN and sb.unlinked_ino == 0
    copy = read_superblock(dev, agno=1, block_size=sb.block_size, ag_blk=sb.ag_blk)
    assert copy.uuid == sb.uuid and copy.total_blk == sb.total_blk


def test_golden_tree_reads_back():
    dev = _load()
    rep = api.fsck(dev, personality=P)
    assert rep.clean, rep.errors
    with api.mount(dev, personality=P, readonly=True) as fs:
        assert sorted(fs.listdir("/")) == ["big", "frag", "hard", "long-link", "short-link", "small"]
        assert sorted(fs.listdir("/big")) == [f"entry-{i:03d}" for i in range(40)]
        big = fs.sb.iget(fs.stat("/big").st_ino)
        assert big.di.data_format == fmt.FMT_BTREE
        small = fs.sb.iget(fs.stat("/small").st_ino)
        assert small.di.data_format == fmt.FMT_INLINE
        assert fs.stat("/small/data").st_nlink == 2
        assert fs.pread(fs.open("/hard", os.O_RDONLY), 4000, 0) == (b"golden data\n" * 300)[:3600]
        assert fs.getxattr("/small/data", "user.golden") == b"yes"
        data = fs.sb.iget(fs.stat("/small/data").st_ino)
        assert any(e[3] & fmt.EXT_UNWRITTEN for e in fs.sb.bmap(data).ext)
        frag = fs.sb.iget(fs.stat("/frag").st_ino)
        assert frag.di.data_format == fmt.FMT_BTREE and frag.di.nextents == 32
        fd = fs.open("/frag", os.O_RDONLY)
        assert fs.fstat(fd).st_size == 63 * BS
        for i in range(63):
            assert fs.pread(fd, BS, i * BS) == (_content(i) if i % 2 == 0 else bytes(BS))
        assert fs.readlink("/short-link") == "small/data"
        assert fs.readlink("/long-link") == "L" * 1500


if __name__ == "__main__":
    make_golden(GOLDEN if len(sys.argv) < 2 else Path(sys.argv[1]))
    print("wrote", GOLDEN)

"""xfslike structures one by one: the extent map against a block model (fork <-> bmbt), hashed
directories with forced hash collisions, inode chunk allocation and reuse, corruption reported
with its location, and fsck finding and repairing damage."""
from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ufs import api
from ufs.fs_xfslike import dir as xdir
from ufs.fs_xfslike import format as fmt
from ufs.fs_xfslike import plugin
from ufs.fs_xfslike.inode import dinode_loc
from ufs.iomap import RamDev

P = plugin.PERSONALITY


def mkdev(size=32 << 20, **kw):
    d = RamDev(size, 512)
    api.mkfs(d, personality=P, **kw)
    return d


# -- extent map ------------------------------------------------------------------------------

ops_st = st.lists(st.tuples(st.sampled_from(["map", "unmap", "convert"]),
                            st.integers(0, 200), st.integers(1, 30)), min_size=1, max_size=40)


@settings(max_examples=20, deadline=None)
@given(ops_st)
def test_extent_map_matches_block_model_and_disk(ops):
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        sb = fs.sb
        fd = fs.open("/f", os.O_CREAT | os.O_RDWR, 0o644)
        inode = sb.iget(fs.fstat(fd).st_ino)
        model = {}                       # file block -> (dev block, flags)
        for op, start, n in ops:
            with sb.trans() as tx:
                bm = sb.bmap(inode)
                if op == "map":
                    new = []
                    blk = start
                    while blk < start + n:
                        if any(b in model for b in [blk]):
                            blk += 1
                            continue
                        dblk, got = sb.md.alloc.alloc(tx, 0, 1, 1)
                        new.append((blk, dblk, got, fmt.EXT_UNWRITTEN if blk % 2 else 0))
                        model[blk] = (dblk, new[-1][3])
                        blk += 1
                    for e in new:
                        bm.set_range(tx, e[0], e[0] + 1, [e])
                    inode.di.nblocks += len(new)
                elif op == "unmap":
                    for piece in bm.set_range(tx, start, start + n, []):
                        sb.md.alloc.free(tx, piece[1], piece[2])
                        inode.di.nblocks -= piece[2]
                    for b in range(start, start + n):
                        model.pop(b, None)
                else:
                    for e in bm.overlapping(start, start + n):
                        if e[3]:
                            a, b = max(start, e[0]), min(start + n, e[0] + e[2])
                            bm.set_range(tx, a, b, [(a, e[1] + a - e[0], b - a, 0)])
                            for x in range(a, b):
                                model[x] = (model[x][0], 0)
                sb.log_inode(tx, inode)
            got = {}
            for off, dblk, n2, fl in sb.bmap(inode).ext:
                for i in range(n2):
                    got[off + i] = (dblk + i, fl)
            assert got == model
            cap = fmt.DiskInode.fork_size(sb.inode_size) // fmt.EXTENT.size
            n_ext = len(sb.bmap(inode).ext)
            assert inode.di.nextents == n_ext
            assert inode.di.data_format == (fmt.FMT_BTREE if n_ext > cap else inode.di.data_format)
        inode.bmap = None                # decode again from the fork / bmbt
        again = {}
        for off, dblk, n2, fl in sb.bmap(inode).ext:
            for i in range(n2):
                again[off + i] = (dblk + i, fl)
        assert again == model
        fs.close(fd)
    r = api.fsck(dev, personality=P)
    assert r.clean, r.errors


# -- directories ------------------------------------------------------------------------------

def test_hash_collisions_get_distinct_keys_and_stable_cookies(monkeypatch):
    monkeypatch.setattr(xdir, "dir_hash", lambda name: (len(name) % 3) * 2 + 1)
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/d", 0o755)
        names = [f"name{i}" for i in range(120)]
        for n in names:
            fs.close(fs.open("/d/" + n, os.O_CREAT | os.O_WRONLY, 0o644))
        assert sorted(fs.listdir("/d")) == sorted(names)
        d = fs.sb.iget(fs.stat("/d").st_ino)
        assert d.di.data_format == fmt.FMT_BTREE
        ents = list(d.i_op.readdir(d, 0))
        cookies = [c for _n, _i, _t, c in ents]
        assert cookies == sorted(cookies) and len(set(cookies)) == len(cookies)
        # resume from the middle while entries before and after change
        mid = cookies[59]
        fs.unlink("/d/" + ents[10][0])
        fs.close(fs.open("/d/zz-new", os.O_CREAT | os.O_WRONLY, 0o644))
        rest = [n for n, _i, _t, _c in d.i_op.readdir(d, mid)]
        assert rest[:5] == [e[0] for e in ents[60:65]]
        gone = {ents[10][0]} | set(names[::2])
        for n in names[::2]:
            if n != ents[10][0]:
                fs.unlink("/d/" + n)
        assert sorted(fs.listdir("/d")) == sorted((set(names) - gone) | {"zz-new"})
        for n in sorted(set(names) - gone)[:10]:
            assert fs.stat("/d/" + n).st_nlink == 1
    r = api.fsck(dev, personality=P)
    assert r.clean, r.errors


def test_short_form_directory_converts_to_dirbt_with_same_cookies():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/d", 0o755)
        d = fs.sb.iget(fs.stat("/d").st_ino)
        for i in range(5):
            fs.mkdir(f"/d/s{i}", 0o755)
        assert d.di.data_format == fmt.FMT_INLINE
        before = {n: c for n, _i, _t, c in d.i_op.readdir(d, 0)}
        i = 0
        while d.di.data_format == fmt.FMT_INLINE:
            fs.close(fs.open(f"/d/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
            i += 1
        after = {n: c for n, _i, _t, c in d.i_op.readdir(d, 0)}
        assert all(after[n] == c for n, c in before.items())
        assert fs.stat("/d").st_nlink == 7
        assert d.i_op.lookup(d, "s3").i_ino == fs.stat("/d/s3").st_ino
    assert api.fsck(dev, personality=P).clean


# -- inodes ------------------------------------------------------------------------------------

def test_inode_chunks_allocated_on_demand_and_numbers_reused():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        ia = fs.sb.ialloc
        c0, f0 = ia.counts()
        for i in range(150):
            fs.close(fs.open(f"/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
        c1, f1 = ia.counts()
        assert c1 - c0 == 128 and (c1 - f1) - (c0 - f0) == 150
        ino = fs.stat("/f7").st_ino
        fs.unlink("/f7")
        fs.close(fs.open("/again", os.O_CREAT | os.O_WRONLY, 0o644))
        assert fs.stat("/again").st_ino == ino           # lowest free slot comes back
        blk, off = dinode_loc(ino, fs.sb.ipb, fs.sb.inode_size)
        assert blk * fs.sb.ipb + off // fs.sb.inode_size == ino
    assert api.fsck(dev, personality=P).clean


def test_corrupt_inode_is_reported_with_its_location():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        fs.close(fs.open("/victim", os.O_CREAT | os.O_WRONLY, 0o644))
        ino = fs.stat("/victim").st_ino
        ipb, isz, bs = fs.sb.ipb, fs.sb.inode_size, fs.sb.block_size
    blk, off = dinode_loc(ino, ipb, isz)
    addr = blk * bs + off + 72                            # inside the size field
    data = bytearray(dev.pread(512, addr - addr % 512))
    data[addr % 512] ^= 0xFF
    dev.pwrite(bytes(data), addr - addr % 512)
    with api.mount(dev, personality=P) as fs:
        with pytest.raises(OSError) as ei:
            fs.stat("/victim")
        assert ei.value.errno == errno.EUCLEAN and f"inode {ino}" in str(ei.value)
        assert "CRC" in str(ei.value)
    rep = api.fsck(dev, personality=P)
    assert not rep.clean and any(f"inode {ino}" in e for e in rep.errors)


def test_fsck_finds_and_repairs_leaked_blocks_and_bad_link_counts():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/a", os.O_CREAT | os.O_RDWR, 0o644)
        fs.write(fd, b"a" * 8192)
        fs.close(fd)
        fs.link("/a", "/b")
        sb = fs.sb
        inode = sb.iget(fs.stat("/a").st_ino)
        with sb.trans() as tx:
            sb.md.alloc.alloc(tx, 0, 3, 3)                # leak 3 blocks
            inode.i_nlink = 5                             # wrong count
            sb.log_inode(tx, inode)
    rep = api.fsck(dev, personality=P)
    assert any("leaked" in e for e in rep.errors)
    assert any("nlink 5, counted 2" in e for e in rep.errors)
    fixed = api.fsck(dev, personality=P, repair=True)
    assert fixed.repaired
    again = api.fsck(dev, personality=P)
    assert again.clean, again.errors
    with api.mount(dev, personality=P) as fs:
        assert fs.stat("/a").st_nlink == 2
        assert fs.pread(fs.open("/b", os.O_RDONLY), 8192, 0) == b"a" * 8192


def test_fsck_of_a_crashed_image_does_not_write_the_device():
    dev = RamDev(32 << 20, 512, volatile_cache=True)
    api.mkfs(dev, personality=P)
    fs = api.mount(dev, personality=P)
    fs.mkdir("/x", 0o755)
    fs.sync()
    img = dev.crash(seed=1)
    fs.unmount()
    d = RamDev(len(img), 512, data=img)
    rep = api.fsck(d, personality=P)
    assert rep.clean, rep.errors
    assert d.contents() == img                            # checked through the overlay


def test_one_tib_sparse_image(tmp_path):
    img = tmp_path / "big.img"
    api.mkfs(str(img), personality=P, size="1T")
    assert os.stat(img).st_blocks * 512 < 64 << 20        # sparse: only metadata written
    with api.mount(str(img), personality=P) as fs:
        assert fs.statvfs("/").f_blocks * 4096 == 1 << 40
        fd = fs.open("/far", os.O_CREAT | os.O_RDWR, 0o644)
        fs.pwrite(fd, b"end", (1 << 40) - (64 << 20))
        fs.fsync(fd)
        fs.close(fd)
    with api.mount(str(img), personality=P) as fs:
        assert fs.pread(fs.open("/far", os.O_RDONLY), 3, (1 << 40) - (64 << 20)) == b"end"
    rep = api.fsck(str(img), personality=P)
    assert rep.clean, rep.errors


def test_fsck_repairs_a_data_block_that_is_also_free_space():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        fd = fs.open("/precious", os.O_CREAT | os.O_RDWR, 0o644)
        fs.write(fd, b"p" * 3 * 4096)
        fs.fsync(fd)
        fs.close(fd)
        sb = fs.sb
        inode = sb.iget(fs.stat("/precious").st_ino)
        e = sb.bmap(inode).ext[0]
        with sb.trans() as tx:
            sb.md.alloc.free(tx, e[1] + 1, 1)             # damage: block 1 of the file is "free"
    rep = api.fsck(dev, personality=P)
    assert any("overlaps" in x for x in rep.errors), rep.errors
    fixed = api.fsck(dev, personality=P, repair=True)
    assert any("removed from free space" in x for x in fixed.repaired)
    again = api.fsck(dev, personality=P)
    assert again.clean, again.errors
    with api.mount(dev, personality=P) as fs:
        assert fs.pread(fs.open("/precious", os.O_RDONLY), 3 * 4096, 0) == b"p" * 3 * 4096


def test_corrupt_directory_block_is_reported_with_its_location():
    dev = mkdev()
    with api.mount(dev, personality=P) as fs:
        fs.mkdir("/d", 0o755)
        for i in range(60):
            fs.close(fs.open(f"/d/x{i}", os.O_CREAT | os.O_WRONLY, 0o644))
        d = fs.sb.iget(fs.stat("/d").st_ino)
        blk = d.di.bmbt_root_blk
        bs = fs.sb.block_size
    addr = blk * bs + 100
    sector = bytearray(dev.pread(512, addr - addr % 512))
    sector[addr % 512] ^= 0x55
    dev.pwrite(bytes(sector), addr - addr % 512)
    with api.mount(dev, personality=P) as fs:
        with pytest.raises(OSError) as ei:
            fs.listdir("/d")
        assert ei.value.errno == errno.EUCLEAN and f"block {blk}" in str(ei.value)
    rep = api.fsck(dev, personality=P)
    assert any(f"block {blk}" in x for x in rep.errors), rep.errors

"""xfslike on-disk format: SPEC.md matches format.py, codecs round-trip, corruption is caught."""
from __future__ import annotations

import re
import uuid as _uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ufs.errors import CorruptError, InvalidError, NotSupportedError, ReadOnlyError
from ufs.fs_xfslike import format as fmt

SPEC = Path(fmt.__file__).with_name("SPEC.md")
UUID = _uuid.UUID(int=0x1234).bytes


def spec_tables() -> dict[str, list[tuple[int, int, str, str]]]:
    """{section name: [(offset, size, field, type)]} from the '### Name' tables of SPEC.md."""
    out: dict[str, list] = {}
    current = None
    for line in SPEC.read_text().splitlines():
        m = re.match(r"^### (\S+)\s*$", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|", line)
        if m and current:
            out.setdefault(current, []).append((int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)))
    return out


def test_every_layout_is_in_spec_with_matching_fields():
    tables = spec_tables()
    missing = [name for name in fmt.LAYOUTS if name not in tables]
    assert not missing, f"structures missing from SPEC.md: {missing}"
    for name, lay in fmt.LAYOUTS.items():
        assert tables[name] == lay.table, f"SPEC.md table of {name} differs from format.py"
    extra = [name for name in tables if name not in fmt.LAYOUTS]
    assert not extra, f"SPEC.md describes structures format.py lacks: {extra}"


def test_every_disk_class_has_a_layout_and_fields_are_contiguous():
    disk_classes = [n for n in dir(fmt) if n.startswith("Disk") and isinstance(getattr(fmt, n), type)]
    assert set(disk_classes) <= set(fmt.LAYOUTS), set(disk_classes) - set(fmt.LAYOUTS)
    for lay in fmt.LAYOUTS.values():
        off = lay.base
        for o, size, _, _ in lay.table:
            assert o == off
            off += size
        assert off - lay.base == lay.size


def test_spec_tables_fit_the_smallest_block():
    for name, lay in fmt.LAYOUTS.items():
        assert lay.base + lay.size <= fmt.MIN_BLOCK_SIZE, name
    assert fmt.AGFL_OFFSET + 4 * fmt.AGFL_SLOTS <= fmt.MIN_BLOCK_SIZE


def test_spec_magic_values_match():
    text = SPEC.read_text()
    for tag in ("XLSB", "XLAG", "XLAB", "XLAC", "XLIB", "XLBM", "XLLH", "XLLR", "XLLC", "XLIN"):
        value = int.from_bytes(tag.encode(), "little")
        assert f"`{tag}` = `{value:#010x}`" in text
        assert value in fmt.MAGIC_NAMES


# --- superblock ----------------------------------------------------------------------

def make_sb(**kw):
    geo = fmt.Geometry.compute(64 << 20, 4096)
    sb = geo.superblock(UUID, b"lbl")
    for k, v in kw.items():
        setattr(sb, k, v)
    return sb


def test_superblock_round_trip_primary_and_copy():
    sb = make_sb(root_ino=128, free_blk=777, state=fmt.SB_STATE_CLEAN, mount_generation=3)
    assert fmt.DiskSuperblock.decode(sb.encode(0)) == sb
    copy = sb.encode(1)
    assert fmt.DiskSuperblock.decode(copy, agno=1) == sb
    with pytest.raises(CorruptError):
        fmt.DiskSuperblock.decode(copy, agno=0)       # copy at the wrong place: blkno/owner differ


@given(st.integers(0, 4095), st.integers(1, 255))
@settings(max_examples=60, deadline=None)
def test_superblock_any_byte_flip_is_detected(pos, xor):
    sb = make_sb()
    data = bytearray(sb.encode(0))
    data[pos] ^= xor
    with pytest.raises(CorruptError) as ei:      # the CRC covers padding too
        fmt.DiskSuperblock.decode(bytes(data))
    assert ei.value.errno == 117                # EUCLEAN


def test_superblock_geometry_validation_and_features():
    sb = make_sb()
    sb.log_start_blk = sb.ag_blk            # log outside AG 0
    with pytest.raises(CorruptError, match="log region"):
        fmt.DiskSuperblock.decode(sb.encode(0))
    sb = make_sb(incompat=1 << 5)
    with pytest.raises(NotSupportedError):
        sb.check_features(read_only=True)
    sb = make_sb(ro_compat=1 << 3)
    sb.check_features(read_only=True)
    with pytest.raises(ReadOnlyError):
        sb.check_features(read_only=False)
    make_sb(compat=1 << 7).check_features(read_only=False)


def test_geometry_rules():
    g = fmt.Geometry.compute(1 << 40)
    assert (g.block_size, g.ag_count, g.ag_blk, g.total_blk) == (4096, 4, 1 << 26, 1 << 28)
    assert g.log_nblocks == fmt.MAX_LOG_BLK
    small = fmt.Geometry.compute(4 << 20, 1024)
    assert small.ag_count == 2                   # always a superblock copy when possible
    assert small.ag_first_free_agbno(0) == fmt.AG_FIRST_FREE_AGBNO + small.log_nblocks
    # a runt last AG is dropped
    g = fmt.Geometry.compute((3 * 4000 + 10) * 4096, 4096, ag_count=3)
    assert (g.ag_count, g.ag_blk, g.total_blk) == (3, 4004, 12010)    # last AG 4002 blocks
    # AG size capped at MAX_AG_BLK: a third AG of 10 blocks would be a runt and is dropped
    g = fmt.Geometry.compute((2 * fmt.MAX_AG_BLK + 10) * 4096, 4096, ag_count=2)
    assert (g.ag_count, g.ag_blk, g.total_blk) == (2, fmt.MAX_AG_BLK, 2 * fmt.MAX_AG_BLK)
    with pytest.raises(InvalidError):
        fmt.Geometry.compute(100 << 10, 4096)
    with pytest.raises(InvalidError):
        fmt.Geometry.compute(64 << 20, 3000)
    with pytest.raises(InvalidError):
        fmt.Geometry.compute(64 << 20, 1024, sector_size=4096)
    g.superblock(UUID).validate()


# --- generic header ------------------------------------------------------------------

def test_block_header_checks_each_identity_field():
    data = fmt.new_block(1024, fmt.BNOBT_MAGIC, 77, 3, UUID, lsn=5)
    fmt.set_block_crc(data)
    h = fmt.check_block(data, fmt.BNOBT_MAGIC, 77, UUID, 3)
    assert (h.blkno, h.owner, h.lsn) == (77, 3, 5)
    with pytest.raises(CorruptError, match="bad magic"):
        fmt.check_block(data, fmt.CNTBT_MAGIC, 77, UUID, 3)
    with pytest.raises(CorruptError, match="claims to be block 77"):
        fmt.check_block(data, fmt.BNOBT_MAGIC, 78, UUID, 3)
    with pytest.raises(CorruptError, match="UUID"):
        fmt.check_block(data, fmt.BNOBT_MAGIC, 77, bytes(16), 3)
    with pytest.raises(CorruptError, match="owner"):
        fmt.check_block(data, fmt.BNOBT_MAGIC, 77, UUID, 4)
    data[500] ^= 1
    with pytest.raises(CorruptError, match="CRC") as ei:
        fmt.check_block(data, fmt.BNOBT_MAGIC, 77, UUID, 3)
    assert ei.value.where == "block 77 (byte 78848)"


# --- AG header, inode, extents -------------------------------------------------------

def test_ag_header_round_trip_and_range_checks():
    agh = fmt.DiskAgHeader(agno=2, length_blk=5000, free_blk=4000, longest_free_blk=3000,
                           bno_root_blk=10002, cnt_root_blk=10003, ino_root_blk=10004,
                           bno_level=1, cnt_level=2, ino_level=0, icount=64, ifree=63,
                           agfl=[5, 6, 9, 7])
    data = fmt.new_block(1024, fmt.AGH_MAGIC, 10001, 2, UUID)
    agh.encode_into(data)
    assert fmt.DiskAgHeader.decode(data, 10001) == agh
    agh.agfl.append(5001)                          # beyond the AG
    agh.encode_into(data)
    with pytest.raises(CorruptError):
        fmt.DiskAgHeader.decode(data, 10001)


@given(st.binary(max_size=512 - fmt.INODE_CORE_SIZE), st.integers(0, 2**63 - 1), st.integers(0, 0xFFFF))
@settings(max_examples=40, deadline=None)
def test_inode_round_trip(fork, size, mode):
    di = fmt.DiskInode(ino=4242, mode=mode, data_format=fmt.FMT_INLINE, nlink=2, uid=1000, gid=100,
                       size=size, mtime_ns=-5, crtime_ns=2**62, inline_len=len(fork),
                       fork=fork.ljust(512 - fmt.INODE_CORE_SIZE, b"\0"), generation=9)
    raw = di.encode(512, UUID)
    assert len(raw) == 512
    assert fmt.DiskInode.decode(raw, 0, 512, 4242, UUID) == di


def test_inode_corruption_is_located():
    di = fmt.DiskInode(ino=9, mode=0o100644, data_format=fmt.FMT_EXTENTS, nextents=1,
                       fork=fmt.DiskExtent.encode_array([fmt.DiskExtent(0, 100, 5)]))
    block = bytearray(2048)
    di.encode_into(block, 1024, 512, UUID)
    assert fmt.DiskInode.decode(block, 1024, 512, 9, UUID).nextents == 1
    with pytest.raises(CorruptError, match="inode 10"):
        fmt.DiskInode.decode(block, 1024, 512, 10, UUID)
    block[1024 + 300] ^= 0x40
    with pytest.raises(CorruptError, match="CRC"):
        fmt.DiskInode.decode(block, 1024, 512, 9, UUID)


def test_extent_array_round_trip_and_validation():
    exts = [fmt.DiskExtent(0, 1000, 8), fmt.DiskExtent(8, 5000, 3, fmt.EXT_UNWRITTEN),
            fmt.DiskExtent(100, 2**40, 2**31)]
    raw = fmt.DiskExtent.encode_array(exts)
    assert len(raw) == 3 * fmt.EXTENT.size
    assert fmt.DiskExtent.decode_array(raw, 3) == exts
    assert exts[1].unwritten and not exts[0].unwritten
    bad = fmt.DiskExtent.encode_array([fmt.DiskExtent(10, 1, 5), fmt.DiskExtent(12, 9, 1)])
    with pytest.raises(CorruptError, match="bad extent"):
        fmt.DiskExtent.decode_array(bad, 2)


# --- B+tree node codec ---------------------------------------------------------------

@given(st.lists(st.integers(0, 2**32 - 1), unique=True, max_size=120), st.booleans())
@settings(max_examples=50, deadline=None)
def test_btree_node_codec_round_trip(starts, leaf):
    schema = fmt.BNOBT
    starts.sort()
    data = fmt.new_block(1024, schema.magic, 9, 0, UUID)
    if leaf:
        recs = [(s, (s % 7) + 1) for s in starts]
        schema.encode_node(data, 0, recs)
        assert schema.decode_node(data, 9) == (0, recs, None)
    else:
        keys = [(s,) for s in starts[: schema.node_maxrecs(1024)]] or [(1,)]
        ptrs = list(range(100, 100 + len(keys)))
        schema.encode_node(data, 2, keys, ptrs)
        assert schema.decode_node(data, 9) == (2, keys, ptrs)


def test_btree_node_rejects_disorder_and_overflow():
    schema = fmt.CNTBT
    data = fmt.new_block(1024, schema.magic, 9, 0, UUID)
    schema.encode_node(data, 0, [(5, 1), (5, 1)])
    with pytest.raises(CorruptError, match="out of order"):
        schema.decode_node(data, 9)
    fmt.NODE.pack_into(data, (0, 5000, 0))
    with pytest.raises(CorruptError, match="too large"):
        schema.decode_node(data, 9)


# --- log structures ------------------------------------------------------------------

def test_log_structures_round_trip():
    h = fmt.DiskLogHeader(seq=7, tail_lsn=fmt.make_lsn(3, 40), tail_prev_lsn=fmt.make_lsn(3, 30),
                          log_nblocks=256)
    assert fmt.DiskLogHeader.decode(h.encode(1024, 6, UUID), 6, UUID) == h
    r = fmt.DiskLogRecord(lsn=fmt.make_lsn(5, 9), prev_lsn=fmt.make_lsn(5, 2), nblocks=5, nentries=3,
                          ntable_blk=1)
    assert fmt.DiskLogRecord.decode(r.encode(1024, 20, UUID), 20, UUID) == r
    c = fmt.DiskLogCommit(lsn=r.lsn, nblocks=5, nentries=3, body_crc=0xDEADBEEF)
    assert fmt.DiskLogCommit.decode(c.encode(1024, 24, UUID), 24, UUID) == c
    ents = [fmt.DiskLogEntry(i * 3, i & 1, i * 11) for i in range(70)]
    table = fmt.DiskLogEntry.encode_table(ents, 1024)
    assert len(table) == 2 * 1024
    assert fmt.DiskLogEntry.decode_table(table, 70) == ents
    assert fmt.lsn_cycle(r.lsn) == 5 and fmt.lsn_blk(r.lsn) == 9

"""btrfslike on-disk format: SPEC.md matches format.py, round trips, and corruption detection."""
import pathlib
import re
import struct

import pytest
from hypothesis import given, settings, strategies as st

from ufs.errors import CorruptError, InvariantError
from ufs.fs_btrfslike import format as fmt

SPEC = pathlib.Path(fmt.__file__).with_name("SPEC.md")
FSID = bytes(range(16))


def _spec_tables():
    """{layout name: [(offset, size, field)]} from the ``### `name` `` sections of SPEC.md."""
    tables, current = {}, None
    for line in SPEC.read_text().splitlines():
        m = re.match(r"^### `(\w+)`\s*$", line)
        if m:
            current = tables.setdefault(m.group(1), [])
            continue
        if line.startswith("#"):
            current = None
            continue
        if current is not None and line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0].isdigit():
                current.append((int(cells[0]), int(cells[1]), cells[3], cells[2]))
    return tables


_TYPE_SIZES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "s64": 8}


def test_spec_tables_match_layouts():
    tables = _spec_tables()
    assert set(tables) == set(fmt.LAYOUTS), "SPEC.md sections differ from format.LAYOUTS"
    for name, layout in fmt.LAYOUTS.items():
        spec = [(o, s, f) for o, s, f, _ in tables[name]]
        code = [(o, s, f) for f, o, s, _ in layout.fields]
        assert spec == code, f"SPEC.md table {name} differs from format.py"
        for (_o, s, f, typ), (_, _, _, sfmt) in zip(tables[name], layout.fields):
            if typ in _TYPE_SIZES:
                assert _TYPE_SIZES[typ] == s, f"{name}.{f}: type {typ} vs size {s}"
                assert sfmt in ("B", "H", "I", "Q", "q")
                assert (typ == "s64") == (sfmt == "q"), f"{name}.{f} signedness"
            else:
                assert typ == f"bytes[{s}]", f"{name}.{f}: {typ}"


def test_spec_key_types_table_matches_constants():
    text = SPEC.read_text()
    for value, name in fmt.KEY_TYPE_NAMES.items():
        assert re.search(rf"^\| {value} \| {name} \|", text, re.M), f"{name}={value} not in SPEC.md"


def test_crc32c_standard_value():
    assert fmt.crc32c(b"123456789") == 0xE3069283
    assert fmt.crc32c(b"6789", fmt.crc32c(b"12345")) == 0xE3069283


def test_superblock_addrs_always_two_copies_and_reserved():
    for size in (1 << 20, 3 << 20, 63 << 20, (64 << 20) + 4096, 1 << 30, (256 << 30) + 8192):
        addrs = fmt.superblock_addrs(size)
        assert len(addrs) >= 2 and addrs[0] == 64 * 1024
        assert all(a % 65536 == 0 and a + 4096 <= size for a in addrs)
        assert len(set(addrs)) == len(addrs)
        res = fmt.reserved_ranges(size)
        for a in addrs:
            assert any(r <= a and a + 4096 <= r + ln for r, ln in res)
    assert fmt.superblock_addrs(1 << 30) == [65536, 64 << 20]
    assert fmt.superblock_addrs(4 << 20) == [65536, 2 << 20]


def _sb(**kw):
    d = dict(fsid=FSID, generation=7, root=0x40000, root_level=1, total_bytes=8 << 20,
             bytes_used=12345, sectorsize=4096, nodesize=16384)
    d.update(kw)
    return fmt.DiskSuperblock(**d)


def test_superblock_roundtrip_and_self_address():
    sb = _sb()
    raw = sb.encode(2 << 20)
    assert len(raw) == fmt.SB_SIZE and raw[8:16] == fmt.SB_MAGIC
    back = fmt.DiskSuperblock.decode(raw, 2 << 20)
    assert (back.generation, back.root, back.root_level, back.bytes_used, back.bytenr) == \
        (7, 0x40000, 1, 12345, 2 << 20)
    with pytest.raises(CorruptError) as ei:
        fmt.DiskSuperblock.decode(raw, 65536)      # a copy read from the wrong place
    assert ei.value.where == "0x10000" and "claims" in ei.value.detail


@settings(max_examples=60, deadline=None)
@given(st.integers(0, fmt.SB_SIZE * 8 - 1))
def test_superblock_any_bit_flip_is_corrupt(bit):
    raw = bytearray(_sb().encode(65536))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptError) as ei:
        fmt.DiskSuperblock.decode(bytes(raw), 65536)
    assert ei.value.what == "superblock" and ei.value.where == "0x10000"


def test_superblock_rejects_bad_fields_even_with_good_crc():
    for kw in ({"nodesize": 3000}, {"sectorsize": 256}, {"root_level": 8},
               {"bytes_used": (8 << 20) + 1}, {"root": 4096}):
        sb = _sb(**kw)
        with pytest.raises(InvariantError):
            sb.encode(65536)                      # the encoder refuses what decode rejects
        body = bytearray(4096)
        vals = dict(zip(fmt.SUPERBLOCK.names, [0, 1, fmt.SB_MAGIC, 65536, FSID, sb.generation,
                                               sb.root, sb.total_bytes, sb.bytes_used,
                                               sb.sectorsize, sb.nodesize, sb.root_level,
                                               b"\0" * 3, 0, 0, 0]))
        body[:fmt.SUPERBLOCK.size] = fmt.SUPERBLOCK.pack(*vals.values())
        struct.pack_into("<I", body, 0, fmt.crc32c(bytes(body[4:])))
        with pytest.raises(CorruptError):
            fmt.DiskSuperblock.decode(bytes(body), 65536)


keys_st = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 255), st.integers(0, 2**64 - 1))


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(keys_st, st.binary(max_size=40), max_size=20))
def test_leaf_roundtrip(items):
    keys = sorted(items)
    datas = [items[k] for k in keys]
    raw = fmt.encode_node(FSID, 1024, 0x20000, 5, 256, 0, keys, datas)
    node = fmt.decode_node(raw, 0x20000, fsid=FSID, nodesize=1024, generation=5, level=0)
    assert node.keys == keys and node.datas == datas and node.owner == 256


def test_internal_roundtrip_and_limits():
    n = fmt.node_max_items(1024)
    keys = [(i, 1, 0) for i in range(n)]
    ptrs = [0x20000 + 1024 * i for i in range(n)]
    raw = fmt.encode_node(FSID, 1024, 0x40000, 9, 1, 2, keys, ptrs=ptrs, gens=[9] * n)
    node = fmt.decode_node(raw, 0x40000, fsid=FSID, nodesize=1024)
    assert node.level == 2 and node.ptrs == ptrs and node.gens == [9] * n
    with pytest.raises(InvariantError):
        fmt.encode_node(FSID, 1024, 0x40000, 9, 1, 2, keys + [(n, 1, 0)],
                        ptrs=ptrs + [0x90000], gens=[9] * (n + 1))
    with pytest.raises(InvariantError):
        fmt.encode_node(FSID, 1024, 0x40000, 9, 1, 0, [(1, 1, 1)], [b"x" * 1000])


def _resign(buf):
    buf = bytearray(buf)
    struct.pack_into("<I", buf, 0, fmt.crc32c(bytes(buf[4:])))
    return bytes(buf)


def test_node_corruption_reports_address():
    raw = fmt.encode_node(FSID, 1024, 0x30000, 3, 5, 0, [(1, 1, 0), (2, 1, 0)], [b"a", b"bb"])
    cases = []
    flipped = bytearray(raw)
    flipped[600] ^= 0x10
    cases.append((bytes(flipped), "checksum"))
    swapped = bytearray(raw)             # keys out of order (re-signed, so only order is wrong)
    struct.pack_into("<Q", swapped, 56, 9)
    cases.append((_resign(swapped), "out of order"))
    badpack = bytearray(raw)
    struct.pack_into("<I", badpack, 56 + 17, 1000)
    cases.append((_resign(badpack), "not packed"))
    cases.append((_resign(raw[:4] + bytes(16) + raw[20:]), "fsid"))
    for buf, word in cases:
        with pytest.raises(CorruptError) as ei:
            fmt.decode_node(buf, 0x30000, fsid=FSID, nodesize=1024)
        assert ei.value.where == "0x30000" and word in ei.value.detail
    with pytest.raises(CorruptError, match="generation"):
        fmt.decode_node(raw, 0x30000, fsid=FSID, nodesize=1024, generation=4)
    with pytest.raises(CorruptError, match="claims"):
        fmt.decode_node(raw, 0x30400, fsid=FSID, nodesize=1024)
    with pytest.raises(CorruptError, match="level"):
        fmt.decode_node(raw, 0x30000, fsid=FSID, nodesize=1024, level=1)


def test_payload_roundtrips():
    ri = fmt.DiskRootItem(0x40000, 3, 1, 2, fmt.ROOT_SHAREABLE, 256, 5)
    assert fmt.DiskRootItem.decode(ri.encode(), "x") == ri
    ino = fmt.DiskInodeItem(generation=1, transid=2, size=3, nbytes=4096, nlink=2, uid=1000,
                            gid=100, mode=0o100644, atime=(-5, 999_999_999), mtime=(7, 1))
    assert len(ino.encode()) == 120 and fmt.DiskInodeItem.decode(ino.encode(), "x") == ino
    refs = [(2, b"a"), (3, b"long name")]
    assert fmt.decode_inode_refs(fmt.encode_inode_refs(refs), "x") == refs
    ents = [fmt.DiskDirEntry((257, fmt.INODE_ITEM, 0), 4, fmt.FT_REG_FILE, b"f"),
            fmt.DiskDirEntry((258, fmt.INODE_ITEM, 0), 4, fmt.FT_DIR, b"g")]
    assert fmt.decode_dir_entries(fmt.encode_dir_entries(ents), "x") == ents
    xa = [fmt.DiskDirEntry((0, 0, 0), 1, fmt.FT_XATTR, b"user.a", b"value")]
    assert fmt.decode_dir_entries(fmt.encode_dir_entries(xa), "x", xattr=True) == xa
    for fe in (fmt.DiskFileExtent(fmt.FILE_EXTENT_REG, 1, 8192, 0x100000, 8192, 4096, 4096),
               fmt.DiskFileExtent(fmt.FILE_EXTENT_PREALLOC, 1, 4096, 0x100000, 4096, 0, 4096),
               fmt.DiskFileExtent(fmt.FILE_EXTENT_REG, 1, 4096, 0, 0, 0, 4096),   # hole
               fmt.DiskFileExtent(fmt.FILE_EXTENT_INLINE, 1, 3, inline_data=b"abc")):
        assert fmt.DiskFileExtent.decode(fe.encode(), "x") == fe
    assert len(fmt.DiskFileExtent(fmt.FILE_EXTENT_REG, 1, 1, 1, 1, 0, 1).encode()) == 53
    tb = fmt.DiskExtentItem(2, 5, fmt.EXTENT_FLAG_TREE_BLOCK, level=1, tree_block_owner=5)
    assert len(tb.encode()) == 34 and fmt.DiskExtentItem.decode(tb.encode(), "x") == tb
    de = fmt.DiskExtentItem(5, 5, fmt.EXTENT_FLAG_DATA, data_refs={(5, 257, 0): 2, (256, 257, 0): 1})
    assert fmt.DiskExtentItem.decode(de.encode(), "x") == de
    edr = {(5, 300, 0): 3}
    assert fmt.decode_extent_data_refs(fmt.encode_extent_data_refs(edr), "x") == edr
    assert fmt.DiskCsumItem.decode(fmt.DiskCsumItem.encode([1, 2, 2**32 - 1]), "x") == [1, 2, 2**32 - 1]
    rr = fmt.DiskRootRef(256, 3, b"snap")
    assert fmt.DiskRootRef.decode(rr.encode(), "x") == rr


@pytest.mark.parametrize("decoder,buf", [
    (lambda b: fmt.DiskRootItem.decode(b, "it"), b"\0" * 55),
    (lambda b: fmt.DiskInodeItem.decode(b, "it"), b"\0" * 119),
    (lambda b: fmt.DiskInodeItem.decode(b, "it"),
     fmt.DiskInodeItem(atime=(0, 10**9)).encode()),
    (lambda b: fmt.decode_inode_refs(b, "it"), fmt.INODE_REF_L.pack(2, 9) + b"short"),
    (lambda b: fmt.decode_inode_refs(b, "it"), fmt.INODE_REF_L.pack(2, 3) + b"a/b"),
    (lambda b: fmt.decode_dir_entries(b, "it"), b""),
    (lambda b: fmt.decode_dir_entries(b, "it"),
     fmt.DIR_ENTRY_L.pack(257, 1, 0, 1, 0, 1, 9) + b"x"),      # bad file type
    (lambda b: fmt.DiskFileExtent.decode(b, "it"),
     fmt.DiskFileExtent(fmt.FILE_EXTENT_REG, 1, 1, 4096, 4096, 4000, 200).encode()),
    (lambda b: fmt.DiskFileExtent.decode(b, "it"),
     fmt.FILE_EXTENT_HEAD_L.pack(1, 1, 1, 0, 0, 1) + bytes(32)),   # compressed
    (lambda b: fmt.DiskFileExtent.decode(b, "it"), fmt.FILE_EXTENT_HEAD_L.pack(1, 1, 0, 0, 0, 7)),
    (lambda b: fmt.DiskExtentItem.decode(b, "it"), fmt.EXTENT_ITEM_L.pack(0, 1, 1)),
    (lambda b: fmt.DiskExtentItem.decode(b, "it"), fmt.EXTENT_ITEM_L.pack(1, 1, 3)),
    (lambda b: fmt.DiskExtentItem.decode(b, "it"),
     fmt.DiskExtentItem(1, 1, fmt.EXTENT_FLAG_DATA, data_refs={(5, 1, 0): 2}).encode()),
    (lambda b: fmt.decode_extent_data_refs(b, "it"), b"\0" * 27),
    (lambda b: fmt.DiskCsumItem.decode(b, "it"), b"\0" * 6),
])
def test_bad_payloads_raise_corrupt_with_location(decoder, buf):
    with pytest.raises(CorruptError) as ei:
        decoder(buf)
    assert ei.value.where == "it"


def test_key_successor_orders():
    for k in [(0, 0, 0), (5, 1, 2**64 - 1), (5, 255, 2**64 - 1), (1, 2, 3)]:
        s = fmt.key_successor(k)
        assert s > k
    assert fmt.key_successor(fmt.KEY_MAX) is None
    assert fmt.key_successor((5, 1, 2**64 - 1)) == (5, 2, 0)

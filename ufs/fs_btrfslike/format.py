"""On-disk format of btrfslike: the ONE module that packs and unpacks its bytes.

Layer: personality (bottom of fs_btrfslike).  Imports ``struct``/``uuid``, ``ufs.errors`` and
``ufs.iomap.csum`` (crc32c).  Nothing else in fs_btrfslike calls ``struct``: every other
module works on the ``Disk*`` records and the plain ``(objectid, type, offset)`` key tuples
defined here.  ``SPEC.md`` beside this file describes every byte; ``LAYOUTS`` is the
machine-readable table a test compares against it, so a format change updates both.

Shape (btrfs-shaped, not btrfs-compatible):
- chunk-less: a "logical" address is the device byte address; there is one device;
- superblock copies at fixed addresses (``superblock_addrs``), each 4096 bytes, crc32c;
- every tree node is ``nodesize`` bytes, starts with a 56-byte header (crc32c, fsid, own
  address, generation, owner tree, item count, level), then an item array (leaves: key +
  data offset/size, data packed from the node's end) or key pointers (internal nodes);
- all integers little-endian; timestamps are signed seconds + nanoseconds.

Invariants: ``decode_*`` verify everything they can know (checksums, magic, self address,
sizes, key order, packing, field ranges) and raise ``CorruptError(what, where, detail)``,
never ``struct.error``/``IndexError``.  ``encode_*`` refuse (``InvariantError``) to write a
structure that its decoder would reject.  No state is mutable after import.
"""
from __future__ import annotations

import struct
import uuid as _uuid
from dataclasses import dataclass, field

from ufs.errors import CorruptError, InvariantError

try:  # the project's CRC-32C (SSE4.2 or slicing-by-8, GIL released)
    from ufs.iomap.csum import crc32c
except ImportError:  # pragma: no cover - only before the Cython core is built
    def _make_table():
        poly, table = 0x82F63B78, []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ poly if c & 1 else c >> 1
            table.append(c)
        return table

    _TABLE = _make_table()

    def crc32c(data, seed=0):
        """Standard CRC-32C; ``seed`` is a previous result (chains like zlib.crc32)."""
        crc = seed ^ 0xFFFFFFFF
        for b in bytes(data):
            crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF

__all__ = [
    "KEY_MAX",
    "KEY_MIN",
    "LAYOUTS",
    "DiskCsumItem",
    "DiskDirEntry",
    "DiskExtentDataRef",
    "DiskExtentItem",
    "DiskFileExtent",
    "DiskInodeItem",
    "DiskNode",
    "DiskRootItem",
    "DiskRootRef",
    "DiskSuperblock",
    "Key",
    "Layout",
    "crc32c",
    "decode_dir_entries",
    "decode_extent_data_refs",
    "decode_inode_refs",
    "decode_node",
    "encode_dir_entries",
    "encode_extent_data_refs",
    "encode_inode_refs",
    "encode_node",
    "extent_data_ref_hash",
    "key_successor",
    "leaf_data_capacity",
    "max_item_size",
    "name_hash",
    "node_max_items",
    "reserved_ranges",
    "superblock_addrs",
]

# ---------------------------------------------------------------------------------------------
# Constants

SB_MAGIC = b"UFSBTRL1"
SB_SIZE = 4096                      # bytes of every superblock copy
SB_PRIMARY_ADDR = 64 * 1024         # primary copy
SB_MIRROR_ADDRS = (64 * 1024 * 1024, 256 * 1024 ** 3)   # used when the device is big enough
SB_RESERVE = 64 * 1024              # bytes kept unallocated at each copy (keeps 64 KiB alignment)
RESERVED_HEAD = 128 * 1024          # [0, 128 KiB) is never allocated (primary copy inside)
MIN_DEVICE_SIZE = 1024 * 1024
CSUM_TYPE_CRC32C = 1
MAX_LEVEL = 8                       # levels 0..7; 7 levels of 1 KiB nodes already hold > 10^10 items
MIN_NODESIZE, MAX_NODESIZE = 1024, 64 * 1024
MIN_SECTORSIZE, MAX_SECTORSIZE = 512, 64 * 1024
NAME_MAX = 255
U64_MAX = 2 ** 64 - 1

# Key types (values follow btrfs's numbering so its documentation reads across; the
# payloads are our own).  Items of one object sort by type, then offset.
INODE_ITEM = 1
INODE_REF = 12
XATTR_ITEM = 24
DIR_ITEM = 84
DIR_INDEX = 96
EXTENT_DATA = 108
EXTENT_CSUM = 128
ROOT_ITEM = 132
ROOT_BACKREF = 144
ROOT_REF = 156
EXTENT_ITEM = 168
TREE_BLOCK_REF = 176
EXTENT_DATA_REF = 178

KEY_TYPE_NAMES = {
    INODE_ITEM: "INODE_ITEM", INODE_REF: "INODE_REF", XATTR_ITEM: "XATTR_ITEM",
    DIR_ITEM: "DIR_ITEM", DIR_INDEX: "DIR_INDEX", EXTENT_DATA: "EXTENT_DATA",
    EXTENT_CSUM: "EXTENT_CSUM", ROOT_ITEM: "ROOT_ITEM", ROOT_BACKREF: "ROOT_BACKREF",
    ROOT_REF: "ROOT_REF", EXTENT_ITEM: "EXTENT_ITEM", TREE_BLOCK_REF: "TREE_BLOCK_REF",
    EXTENT_DATA_REF: "EXTENT_DATA_REF",
}

# Tree ids (objectids of ROOT_ITEMs in the root tree).
ROOT_TREE_ID = 1
EXTENT_TREE_ID = 2
FS_TREE_ID = 5
CSUM_TREE_ID = 7
FIRST_FREE_OBJECTID = 256            # first inode number, first snapshot/subvolume tree id
LAST_FREE_OBJECTID = U64_MAX - 255
EXTENT_CSUM_OBJECTID = U64_MAX - 9   # objectid of every EXTENT_CSUM item

# ROOT_ITEM.flags
ROOT_SHAREABLE = 1 << 0              # an fs tree: may be snapshotted, so its nodes may be shared
ROOT_DEAD = 1 << 1                   # being dropped (snapshot deletion)

# EXTENT_ITEM.flags
EXTENT_FLAG_DATA = 1 << 0
EXTENT_FLAG_TREE_BLOCK = 1 << 1

# EXTENT_DATA.type
FILE_EXTENT_INLINE = 0
FILE_EXTENT_REG = 1
FILE_EXTENT_PREALLOC = 2

# Directory entry file types (DIR_ITEM/DIR_INDEX.file_type; XATTR_ITEM uses FT_XATTR).
FT_UNKNOWN, FT_REG_FILE, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK, FT_XATTR = range(9)

Key = tuple  # (objectid u64, type u8, offset u64); plain tuples sort as the tree does
KEY_MIN = (0, 0, 0)
KEY_MAX = (U64_MAX, 255, U64_MAX)


def key_successor(key):
    """The smallest key strictly greater than ``key`` (None after KEY_MAX)."""
    oid, typ, off = key
    if off < U64_MAX:
        return (oid, typ, off + 1)
    if typ < 255:
        return (oid, typ + 1, 0)
    if oid < U64_MAX:
        return (oid + 1, 0, 0)
    return None


def key_str(key):
    oid, typ, off = key
    return f"({oid} {KEY_TYPE_NAMES.get(typ, typ)} {off})"


# ---------------------------------------------------------------------------------------------
# Layouts: one table per fixed-size structure.  Every field yields a value (reserved bytes are
# "Ns" fields named reserved*) so the table is complete, and decoders can check them for zero.


class Layout:
    """A little-endian fixed layout: ``fields`` is ``[(name, offset, size, fmt)]``."""

    def __init__(self, name, fields):
        self.name = name
        self.fields = []
        off = 0
        for fname, fmt in fields:
            size = struct.calcsize("<" + fmt)
            self.fields.append((fname, off, size, fmt))
            off += size
        self.struct = struct.Struct("<" + "".join(f for _, f in fields))
        self.size = self.struct.size
        self.names = [f[0] for f in self.fields]

    def pack(self, *values):
        return self.struct.pack(*values)

    def unpack_from(self, buf, offset=0):
        return self.struct.unpack_from(buf, offset)


SUPERBLOCK = Layout("superblock", [
    ("csum", "I"), ("csum_type", "I"), ("magic", "8s"), ("bytenr", "Q"), ("fsid", "16s"),
    ("generation", "Q"), ("root", "Q"), ("total_bytes", "Q"), ("bytes_used", "Q"),
    ("sectorsize", "I"), ("nodesize", "I"), ("root_level", "B"), ("reserved0", "3s"),
    ("flags", "I"), ("log_root", "Q"), ("log_id", "Q"),
])
NODE_HEADER = Layout("node_header", [
    ("csum", "I"), ("fsid", "16s"), ("bytenr", "Q"), ("generation", "Q"), ("owner", "Q"),
    ("nritems", "I"), ("level", "B"), ("reserved", "7s"),
])
LEAF_ITEM = Layout("leaf_item", [
    ("objectid", "Q"), ("type", "B"), ("offset", "Q"), ("data_offset", "I"), ("data_size", "I"),
])
KEY_PTR = Layout("key_ptr", [
    ("objectid", "Q"), ("type", "B"), ("offset", "Q"), ("blockptr", "Q"), ("generation", "Q"),
])
ROOT_ITEM_L = Layout("root_item", [
    ("bytenr", "Q"), ("generation", "Q"), ("last_snapshot", "Q"), ("flags", "Q"),
    ("root_dirid", "Q"), ("source_tree", "Q"), ("level", "B"), ("reserved", "7s"),
])
ROOT_REF_L = Layout("root_ref", [("dirid", "Q"), ("sequence", "Q"), ("name_len", "H")])
INODE_ITEM_L = Layout("inode_item", [
    ("generation", "Q"), ("transid", "Q"), ("size", "Q"), ("nbytes", "Q"), ("nlink", "I"),
    ("uid", "I"), ("gid", "I"), ("mode", "I"), ("rdev", "Q"), ("flags", "Q"), ("sequence", "Q"),
    ("atime_sec", "q"), ("atime_nsec", "I"), ("ctime_sec", "q"), ("ctime_nsec", "I"),
    ("mtime_sec", "q"), ("mtime_nsec", "I"), ("otime_sec", "q"), ("otime_nsec", "I"),
])
INODE_REF_L = Layout("inode_ref", [("index", "Q"), ("name_len", "H")])
DIR_ENTRY_L = Layout("dir_entry", [
    ("location_objectid", "Q"), ("location_type", "B"), ("location_offset", "Q"),
    ("transid", "Q"), ("data_len", "H"), ("name_len", "H"), ("file_type", "B"),
])
FILE_EXTENT_HEAD_L = Layout("file_extent_head", [
    ("generation", "Q"), ("ram_bytes", "Q"), ("compression", "B"), ("encryption", "B"),
    ("other_encoding", "H"), ("type", "B"),
])
FILE_EXTENT_DISK_L = Layout("file_extent_disk", [
    ("disk_bytenr", "Q"), ("disk_num_bytes", "Q"), ("offset", "Q"), ("num_bytes", "Q"),
])
EXTENT_ITEM_L = Layout("extent_item", [("refs", "Q"), ("generation", "Q"), ("flags", "Q")])
TREE_BLOCK_INFO_L = Layout("tree_block_info", [("level", "B")])
INLINE_TREE_BLOCK_REF_L = Layout("inline_tree_block_ref", [("type", "B"), ("root", "Q")])
INLINE_DATA_REF_L = Layout("inline_extent_data_ref", [
    ("type", "B"), ("root", "Q"), ("objectid", "Q"), ("offset", "Q"), ("count", "I"),
])
EXTENT_DATA_REF_L = Layout("extent_data_ref", [
    ("root", "Q"), ("objectid", "Q"), ("offset", "Q"), ("count", "I"),
])
CSUM_L = Layout("csum_entry", [("crc32c", "I")])
PROBE_LABEL_L = Layout("probe_label", [("magic", "8s"), ("fsid", "16s"), ("reserved", "8s")])
LOG_HEADER_L = Layout("log_header", [
    ("csum", "I"), ("length", "I"), ("magic", "8s"), ("fsid", "16s"), ("log_id", "Q"),
    ("transid", "Q"), ("bytenr", "Q"), ("seq", "Q"), ("next", "Q"), ("nritems", "I"),
    ("flags", "I"),
])
LOG_ENTRY_L = Layout("log_entry", [
    ("op", "B"), ("key_type", "B"), ("reserved", "2s"), ("data_len", "I"), ("tree", "Q"),
    ("objectid", "Q"), ("offset", "Q"), ("end", "Q"),
])

PROBE_LABEL_ADDR = 60 * 1024        # inside the first 64 KiB the registry probes (SPEC.md §2)

# INODE_ITEM.flags (SPEC.md §6).
INODE_NODATASUM = 1 << 0            # data of this inode has no checksums
INODE_NODATACOW = 1 << 1            # overwrite unshared extents in place (implies NODATASUM)
INODE_FLAGS_KNOWN = INODE_NODATASUM | INODE_NODATACOW

LAYOUTS = {l.name: l for l in (
    SUPERBLOCK, NODE_HEADER, LEAF_ITEM, KEY_PTR, ROOT_ITEM_L, ROOT_REF_L, INODE_ITEM_L,
    INODE_REF_L, DIR_ENTRY_L, FILE_EXTENT_HEAD_L, FILE_EXTENT_DISK_L, EXTENT_ITEM_L,
    TREE_BLOCK_INFO_L, INLINE_TREE_BLOCK_REF_L, INLINE_DATA_REF_L, EXTENT_DATA_REF_L, CSUM_L,
    PROBE_LABEL_L, LOG_HEADER_L, LOG_ENTRY_L,
)}

HEADER_SIZE = NODE_HEADER.size      # 56
ITEM_SIZE = LEAF_ITEM.size          # 25
KEY_PTR_SIZE = KEY_PTR.size         # 33
assert (HEADER_SIZE, ITEM_SIZE, KEY_PTR_SIZE) == (56, 25, 33)


def _where(addr):
    return f"{addr:#x}" if isinstance(addr, int) else addr


def _corrupt(what, where, detail):
    return CorruptError(what, _where(where), detail)


def _is_pow2(n):
    return n > 0 and n & (n - 1) == 0


# ---------------------------------------------------------------------------------------------
# Superblock placement


def superblock_addrs(device_size):
    """Addresses of every superblock copy on a device of ``device_size`` bytes.

    The primary is at 64 KiB; mirrors at 64 MiB and 256 GiB when they fit whole.  A device
    smaller than 64 MiB + 4 KiB gets its one mirror at half its size, rounded down to 64 KiB,
    so every valid image has at least two copies.
    """
    if device_size < MIN_DEVICE_SIZE:
        return [SB_PRIMARY_ADDR]
    addrs = [SB_PRIMARY_ADDR]
    addrs += [a for a in SB_MIRROR_ADDRS if a + SB_SIZE <= device_size]
    if len(addrs) == 1:
        addrs.append((device_size // 2) // SB_RESERVE * SB_RESERVE)
    return addrs


def reserved_ranges(device_size):
    """``[(addr, length)]`` the allocator never hands out: the head and each mirror's 64 KiB."""
    out = [(0, RESERVED_HEAD)]
    for a in superblock_addrs(device_size)[1:]:
        out.append((a, min(SB_RESERVE, device_size - a)))
    return out


# ---------------------------------------------------------------------------------------------
# Superblock


@dataclass
class DiskSuperblock:
    fsid: bytes
    generation: int
    root: int                # root-tree root node address (bytes)
    root_level: int
    total_bytes: int
    bytes_used: int
    sectorsize: int
    nodesize: int
    flags: int = 0
    bytenr: int = SB_PRIMARY_ADDR   # address of the copy this record was read from / is for
    log_root: int = 0               # first log record of the log for generation + 1; 0 = none
    log_id: int = 0                 # random id every record of that log repeats

    def encode(self, bytenr=None):
        """The 4096-byte image of the copy at ``bytenr`` (default ``self.bytenr``)."""
        bytenr = self.bytenr if bytenr is None else bytenr
        self.check(bytenr, InvariantError)
        body = SUPERBLOCK.pack(0, CSUM_TYPE_CRC32C, SB_MAGIC, bytenr, self.fsid, self.generation,
                               self.root, self.total_bytes, self.bytes_used, self.sectorsize,
                               self.nodesize, self.root_level, b"\0" * 3, self.flags,
                               self.log_root, self.log_id)
        buf = bytearray(SB_SIZE)
        buf[:len(body)] = body
        struct.pack_into("<I", buf, 0, crc32c(memoryview(buf)[4:]))
        return bytes(buf)

    def check(self, where, exc=CorruptError):
        def bad(detail):
            if exc is CorruptError:
                return _corrupt("superblock", where, detail)
            return exc(f"superblock at {_where(where)}: {detail}")
        if not (_is_pow2(self.sectorsize) and MIN_SECTORSIZE <= self.sectorsize <= MAX_SECTORSIZE):
            raise bad(f"bad sectorsize {self.sectorsize}")
        if not (_is_pow2(self.nodesize) and MIN_NODESIZE <= self.nodesize <= MAX_NODESIZE):
            raise bad(f"bad nodesize {self.nodesize}")
        if self.total_bytes < MIN_DEVICE_SIZE or self.total_bytes % self.sectorsize:
            raise bad(f"bad total_bytes {self.total_bytes}")
        if self.generation < 1:
            raise bad("generation 0")
        if self.root % self.nodesize or self.root < RESERVED_HEAD \
                or self.root + self.nodesize > self.total_bytes:
            raise bad(f"root {self.root:#x} outside the device or misaligned")
        if self.root_level >= MAX_LEVEL:
            raise bad(f"root level {self.root_level}")
        if self.bytes_used > self.total_bytes:
            raise bad(f"bytes_used {self.bytes_used} > total_bytes {self.total_bytes}")
        if self.flags:
            raise bad(f"unknown flags {self.flags:#x}")
        if len(self.fsid) != 16:
            raise bad("fsid is not 16 bytes")
        if self.log_root and (self.log_root % self.sectorsize or self.log_root < RESERVED_HEAD
                              or self.log_root + self.sectorsize > self.total_bytes):
            raise bad(f"log_root {self.log_root:#x} outside the device or misaligned")

    @classmethod
    def decode(cls, buf, where):
        """Verify and decode the copy read from device address ``where``."""
        if len(buf) < SB_SIZE:
            raise _corrupt("superblock", where, f"short read ({len(buf)} bytes)")
        buf = memoryview(buf)[:SB_SIZE]
        (csum, csum_type, magic, bytenr, fsid, gen, root, total, used, sectorsize, nodesize,
         level, reserved0, flags, log_root, log_id) = SUPERBLOCK.unpack_from(buf)
        if magic != SB_MAGIC:
            raise _corrupt("superblock", where, f"bad magic {magic!r}")
        if csum_type != CSUM_TYPE_CRC32C:
            raise _corrupt("superblock", where, f"unknown csum type {csum_type}")
        if crc32c(buf[4:]) != csum:
            raise _corrupt("superblock", where, "checksum mismatch")
        if bytenr != where:
            raise _corrupt("superblock", where, f"copy claims address {bytenr:#x}")
        if reserved0 != b"\0" * 3 or any(buf[SUPERBLOCK.size:]):
            raise _corrupt("superblock", where, "reserved bytes not zero")
        sb = cls(fsid=bytes(fsid), generation=gen, root=root, root_level=level, total_bytes=total,
                 bytes_used=used, sectorsize=sectorsize, nodesize=nodesize, flags=flags,
                 bytenr=bytenr, log_root=log_root, log_id=log_id)
        sb.check(where)
        return sb

    @property
    def uuid(self):
        return _uuid.UUID(bytes=self.fsid)


# ---------------------------------------------------------------------------------------------
# Tree nodes


def node_max_items(nodesize):
    """Key pointers that fit in an internal node."""
    return (nodesize - HEADER_SIZE) // KEY_PTR_SIZE


def leaf_data_capacity(nodesize):
    """Bytes of a leaf available to item headers + item data."""
    return nodesize - HEADER_SIZE


def max_item_size(nodesize):
    """Largest item payload: one item alone in a leaf."""
    return nodesize - HEADER_SIZE - ITEM_SIZE


class DiskNode:
    """A decoded node.  Leaves: ``keys`` + ``datas`` (bytes); internal: ``keys`` + ``ptrs`` +
    ``gens`` (child address and the generation its parent recorded)."""

    __slots__ = ("bytenr", "datas", "fsid", "generation", "gens", "keys", "level", "owner", "ptrs")

    def __init__(self, bytenr, generation, owner, level, keys, datas=None, ptrs=None, gens=None,
                 fsid=None):
        self.bytenr, self.generation, self.owner, self.level = bytenr, generation, owner, level
        self.keys, self.datas, self.ptrs, self.gens, self.fsid = keys, datas, ptrs, gens, fsid


_ITEM_S = struct.Struct("<QBQII")
_PTR_S = struct.Struct("<QBQQQ")
_HDR_S = NODE_HEADER.struct


_ARRAY_STRUCTS = {}


def _array_struct(fmt_one, n):
    """A Struct packing ``n`` consecutive ``fmt_one`` records (cached)."""
    st = _ARRAY_STRUCTS.get((fmt_one, n))
    if st is None:
        st = _ARRAY_STRUCTS[(fmt_one, n)] = struct.Struct("<" + fmt_one * n)
    return st


def encode_node(fsid, nodesize, bytenr, generation, owner, level, keys, datas=None, ptrs=None,
                gens=None):
    """The ``nodesize``-byte image of a node, checksummed.

    Leaf data is packed from the end of the node: item 0's data ends at ``nodesize``, item
    ``i``'s ends where item ``i-1``'s begins.  Unused bytes are zero.
    """
    n = len(keys)
    buf = bytearray(nodesize)
    if level == 0:
        flat = []
        end = nodesize
        for k, d in zip(keys, datas):
            ln = len(d)
            end -= ln
            flat += (k[0], k[1], k[2], end, ln)
        if end < HEADER_SIZE + n * ITEM_SIZE:
            raise InvariantError(f"leaf {bytenr:#x} overflows: {n} items")
        if n:
            _array_struct("QBQII", n).pack_into(buf, HEADER_SIZE, *flat)
            buf[end:] = b"".join(reversed(datas))
    else:
        if n == 0 or HEADER_SIZE + n * KEY_PTR_SIZE > nodesize:
            raise InvariantError(f"internal node {bytenr:#x} with {n} pointers")
        flat = []
        for k, p, g in zip(keys, ptrs, gens):
            flat += (k[0], k[1], k[2], p, g)
        _array_struct("QBQQQ", n).pack_into(buf, HEADER_SIZE, *flat)
    _HDR_S.pack_into(buf, 0, 0, fsid, bytenr, generation, owner, n, level, b"\0" * 7)
    struct.pack_into("<I", buf, 0, crc32c(memoryview(buf)[4:]))
    return bytes(buf)


def decode_node(buf, bytenr, *, fsid, nodesize, generation=None, level=None, owner=None):
    """Verify and decode the node read at ``bytenr``.

    ``generation``/``level``/``owner``, when given, are what the parent pointer (or the
    superblock / ROOT_ITEM) says the node must have; a mismatch means a stale or misdirected
    block and is corruption like a bad checksum.
    """
    what = "tree node"
    if len(buf) != nodesize:
        raise _corrupt(what, bytenr, f"read {len(buf)} bytes, nodesize is {nodesize}")
    mv = memoryview(buf)
    (csum, nfsid, nbytenr, ngen, nowner, nritems, nlevel, reserved) = _HDR_S.unpack_from(mv)
    if crc32c(mv[4:]) != csum:
        raise _corrupt(what, bytenr, "checksum mismatch")
    if nfsid != fsid:
        raise _corrupt(what, bytenr, "fsid does not match the superblock")
    if nbytenr != bytenr:
        raise _corrupt(what, bytenr, f"node claims address {nbytenr:#x}")
    if reserved != b"\0" * 7:
        raise _corrupt(what, bytenr, "reserved header bytes not zero")
    if nlevel >= MAX_LEVEL:
        raise _corrupt(what, bytenr, f"level {nlevel}")
    if generation is not None and ngen != generation:
        raise _corrupt(what, bytenr, f"generation {ngen}, parent expects {generation}")
    if level is not None and nlevel != level:
        raise _corrupt(what, bytenr, f"level {nlevel}, parent expects {level}")
    if owner is not None and nowner != owner:
        raise _corrupt(what, bytenr, f"owner {nowner}, expected {owner}")
    if nlevel == 0:
        if HEADER_SIZE + nritems * ITEM_SIZE > nodesize:
            raise _corrupt(what, bytenr, f"{nritems} items do not fit")
        keys, datas = [], []
        end = nodesize
        prev = None
        limit = HEADER_SIZE + nritems * ITEM_SIZE
        for slot, (oid, typ, off, doff, dsize) in enumerate(
                _ITEM_S.iter_unpack(mv[HEADER_SIZE:limit])):
            if doff + dsize != end or doff < limit:
                raise _corrupt(what, bytenr, f"item {slot}: data [{doff}, +{dsize}) not packed")
            k = (oid, typ, off)
            if prev is not None and k <= prev:
                raise _corrupt(what, bytenr, f"item {slot}: key {key_str(k)} out of order")
            keys.append(k)
            datas.append(bytes(mv[doff:end]))
            end = doff
            prev = k
        return DiskNode(bytenr, ngen, nowner, 0, keys, datas=datas, fsid=nfsid)
    if nritems == 0 or HEADER_SIZE + nritems * KEY_PTR_SIZE > nodesize:
        raise _corrupt(what, bytenr, f"internal node with {nritems} pointers")
    keys, ptrs, gens = [], [], []
    prev = None
    for slot, (oid, typ, off, ptr, pgen) in enumerate(_PTR_S.iter_unpack(
            mv[HEADER_SIZE:HEADER_SIZE + nritems * KEY_PTR_SIZE])):
        k = (oid, typ, off)
        if prev is not None and k <= prev:
            raise _corrupt(what, bytenr, f"pointer {slot}: key {key_str(k)} out of order")
        if ptr % nodesize or ptr < RESERVED_HEAD:
            raise _corrupt(what, bytenr, f"pointer {slot}: bad child address {ptr:#x}")
        if pgen > ngen or pgen == 0:
            raise _corrupt(what, bytenr, f"pointer {slot}: child generation {pgen} > {ngen}")
        keys.append(k)
        ptrs.append(ptr)
        gens.append(pgen)
        prev = k
    return DiskNode(bytenr, ngen, nowner, nlevel, keys, ptrs=ptrs, gens=gens, fsid=nfsid)


# ---------------------------------------------------------------------------------------------
# Item payloads.  ``where`` in decoders names the item (e.g. "node 0x1c000 item 3").


def _need(buf, n, what, where):
    if len(buf) < n:
        raise _corrupt(what, where, f"item is {len(buf)} bytes, needs {n}")


def _exact(buf, n, what, where):
    if len(buf) != n:
        raise _corrupt(what, where, f"item is {len(buf)} bytes, expected {n}")


@dataclass
class DiskRootItem:
    """ROOT_ITEM (key ``(tree_id, ROOT_ITEM, 0)`` in the root tree)."""
    bytenr: int
    generation: int
    level: int
    last_snapshot: int = 0
    flags: int = 0
    root_dirid: int = 0
    source_tree: int = 0

    def encode(self):
        return ROOT_ITEM_L.pack(self.bytenr, self.generation, self.last_snapshot, self.flags,
                                self.root_dirid, self.source_tree, self.level, b"\0" * 7)

    @classmethod
    def decode(cls, buf, where):
        _exact(buf, ROOT_ITEM_L.size, "ROOT_ITEM", where)
        (bytenr, gen, last_snap, flags, dirid, source, level, reserved) = ROOT_ITEM_L.unpack_from(buf)
        if level >= MAX_LEVEL or reserved != b"\0" * 7 or flags & ~(ROOT_SHAREABLE | ROOT_DEAD):
            raise _corrupt("ROOT_ITEM", where, "bad level, flags or reserved bytes")
        if gen == 0 or bytenr < RESERVED_HEAD:
            raise _corrupt("ROOT_ITEM", where, f"bad root {bytenr:#x} generation {gen}")
        return cls(bytenr, gen, level, last_snap, flags, dirid, source)


def _check_name(name, what, where):
    if not 1 <= len(name) <= NAME_MAX or b"/" in name or b"\0" in name:
        raise _corrupt(what, where, f"bad name {bytes(name)[:32]!r}")


@dataclass
class DiskRootRef:
    """ROOT_REF ``(parent_tree, ROOT_REF, child_tree)`` / ROOT_BACKREF ``(child, ROOT_BACKREF, parent)``."""
    dirid: int
    sequence: int
    name: bytes

    def encode(self):
        return ROOT_REF_L.pack(self.dirid, self.sequence, len(self.name)) + self.name

    @classmethod
    def decode(cls, buf, where):
        _need(buf, ROOT_REF_L.size, "ROOT_REF", where)
        dirid, seq, nlen = ROOT_REF_L.unpack_from(buf)
        _exact(buf, ROOT_REF_L.size + nlen, "ROOT_REF", where)
        name = bytes(buf[ROOT_REF_L.size:])
        _check_name(name, "ROOT_REF", where)
        return cls(dirid, seq, name)


@dataclass
class DiskInodeItem:
    """INODE_ITEM (key ``(ino, INODE_ITEM, 0)``).  Times: ``(sec, nsec)``."""
    generation: int = 0
    transid: int = 0
    size: int = 0
    nbytes: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    mode: int = 0
    rdev: int = 0
    flags: int = 0
    sequence: int = 0
    atime: tuple = (0, 0)
    ctime: tuple = (0, 0)
    mtime: tuple = (0, 0)
    otime: tuple = (0, 0)

    def encode(self):
        return INODE_ITEM_L.pack(self.generation, self.transid, self.size, self.nbytes, self.nlink,
                                 self.uid, self.gid, self.mode, self.rdev, self.flags,
                                 self.sequence, *self.atime, *self.ctime, *self.mtime, *self.otime)

    @classmethod
    def decode(cls, buf, where):
        _exact(buf, INODE_ITEM_L.size, "INODE_ITEM", where)
        v = INODE_ITEM_L.unpack_from(buf)
        times = [(v[i], v[i + 1]) for i in (11, 13, 15, 17)]
        if any(ns >= 1_000_000_000 for _, ns in times):
            raise _corrupt("INODE_ITEM", where, "nanoseconds >= 10^9")
        return cls(*v[:11], *times)


def encode_inode_refs(refs):
    """INODE_REF payload (key ``(ino, INODE_REF, parent_ino)``): ``[(index, name)]``."""
    return b"".join(INODE_REF_L.pack(idx, len(name)) + name for idx, name in refs)


def decode_inode_refs(buf, where):
    out, pos, n = [], 0, len(buf)
    if n == 0:
        raise _corrupt("INODE_REF", where, "empty")
    while pos < n:
        _need(buf[pos:], INODE_REF_L.size, "INODE_REF", where)
        idx, nlen = INODE_REF_L.unpack_from(buf, pos)
        pos += INODE_REF_L.size
        if pos + nlen > n:
            raise _corrupt("INODE_REF", where, "name runs past the item")
        name = bytes(buf[pos:pos + nlen])
        _check_name(name, "INODE_REF", where)
        out.append((idx, name))
        pos += nlen
    return out


@dataclass
class DiskDirEntry:
    """One entry of DIR_ITEM ``(dir, DIR_ITEM, name_hash)``, DIR_INDEX ``(dir, DIR_INDEX, index)``
    or XATTR_ITEM ``(ino, XATTR_ITEM, name_hash)``; ``location`` is the target's key
    (``(ino, INODE_ITEM, 0)``, or ``(tree_id, ROOT_ITEM, U64_MAX)`` for a subvolume, zero for xattrs)."""
    location: tuple
    transid: int
    file_type: int
    name: bytes
    data: bytes = b""


def encode_dir_entries(entries):
    return b"".join(DIR_ENTRY_L.pack(*e.location, e.transid, len(e.data), len(e.name), e.file_type)
                    + e.name + e.data for e in entries)


def decode_dir_entries(buf, where, *, xattr=False):
    """A DIR_ITEM/DIR_INDEX/XATTR_ITEM payload: several entries when names collide on the hash."""
    what = "XATTR_ITEM" if xattr else "DIR_ITEM"
    out, pos, n = [], 0, len(buf)
    if n == 0:
        raise _corrupt(what, where, "empty")
    while pos < n:
        _need(buf[pos:], DIR_ENTRY_L.size, what, where)
        loid, ltyp, loff, transid, dlen, nlen, ftype = DIR_ENTRY_L.unpack_from(buf, pos)
        pos += DIR_ENTRY_L.size
        if pos + nlen + dlen > n:
            raise _corrupt(what, where, "name/data run past the item")
        name = bytes(buf[pos:pos + nlen])
        data = bytes(buf[pos + nlen:pos + nlen + dlen])
        pos += nlen + dlen
        if xattr:
            if ftype != FT_XATTR or not 1 <= nlen <= NAME_MAX or b"\0" in name:
                raise _corrupt(what, where, "bad xattr entry")
        else:
            _check_name(name, what, where)
            if dlen or not FT_UNKNOWN < ftype < FT_XATTR:
                raise _corrupt(what, where, f"bad file type {ftype} or data")
        out.append(DiskDirEntry((loid, ltyp, loff), transid, ftype, name, data))
    return out


@dataclass
class DiskFileExtent:
    """EXTENT_DATA (key ``(ino, EXTENT_DATA, file_pos)``).

    Regular/prealloc: the file bytes ``[file_pos, file_pos + num_bytes)`` are the extent's bytes
    ``[offset, offset + num_bytes)``; the extent is ``[disk_bytenr, disk_bytenr +
    disk_num_bytes)`` on the device (``disk_bytenr == 0``: a hole).  Inline: ``inline_data``.
    """
    type: int
    generation: int = 0
    ram_bytes: int = 0
    disk_bytenr: int = 0
    disk_num_bytes: int = 0
    offset: int = 0
    num_bytes: int = 0
    inline_data: bytes = b""

    def encode(self):
        head = FILE_EXTENT_HEAD_L.pack(self.generation, self.ram_bytes, 0, 0, 0, self.type)
        if self.type == FILE_EXTENT_INLINE:
            return head + self.inline_data
        return head + FILE_EXTENT_DISK_L.pack(self.disk_bytenr, self.disk_num_bytes, self.offset,
                                              self.num_bytes)

    @classmethod
    def decode(cls, buf, where):
        what = "EXTENT_DATA"
        _need(buf, FILE_EXTENT_HEAD_L.size, what, where)
        gen, ram, comp, enc, other, typ = FILE_EXTENT_HEAD_L.unpack_from(buf)
        if comp or enc or other:
            raise _corrupt(what, where, "compression/encryption not supported")
        hs = FILE_EXTENT_HEAD_L.size
        if typ == FILE_EXTENT_INLINE:
            data = bytes(buf[hs:])
            if ram != len(data):
                raise _corrupt(what, where, f"inline ram_bytes {ram} != {len(data)}")
            return cls(typ, gen, ram, inline_data=data)
        if typ not in (FILE_EXTENT_REG, FILE_EXTENT_PREALLOC):
            raise _corrupt(what, where, f"unknown type {typ}")
        _exact(buf, hs + FILE_EXTENT_DISK_L.size, what, where)
        dbytenr, dnum, off, num = FILE_EXTENT_DISK_L.unpack_from(buf, hs)
        if num == 0:
            raise _corrupt(what, where, "num_bytes is 0")
        if dbytenr and (dnum == 0 or off + num > dnum):
            raise _corrupt(what, where, f"[{off}, +{num}) outside the extent of {dnum} bytes")
        if typ == FILE_EXTENT_PREALLOC and not dbytenr:
            raise _corrupt(what, where, "prealloc extent without disk bytes")
        return cls(typ, gen, ram, dbytenr, dnum, off, num)


@dataclass
class DiskExtentItem:
    """EXTENT_ITEM (key ``(bytenr, EXTENT_ITEM, num_bytes)`` in the extent tree).

    ``refs``: references to the extent (tree blocks: parent pointers + roots pointing at it;
    data: file extent items in physical leaves).  ``tree_block_owner``: the tree that created the
    block (its inline TREE_BLOCK_REF).  ``data_refs``: inline back-references
    ``{(root, objectid, offset): count}``; more live in EXTENT_DATA_REF items.
    """
    refs: int
    generation: int
    flags: int
    level: int = 0
    tree_block_owner: int = 0
    data_refs: dict = field(default_factory=dict)

    @property
    def is_tree_block(self):
        return bool(self.flags & EXTENT_FLAG_TREE_BLOCK)

    def encode(self):
        out = [EXTENT_ITEM_L.pack(self.refs, self.generation, self.flags)]
        if self.is_tree_block:
            out.append(TREE_BLOCK_INFO_L.pack(self.level))
            out.append(INLINE_TREE_BLOCK_REF_L.pack(TREE_BLOCK_REF, self.tree_block_owner))
        else:
            for (root, oid, off), cnt in sorted(self.data_refs.items()):
                out.append(INLINE_DATA_REF_L.pack(EXTENT_DATA_REF, root, oid, off, cnt))
        return b"".join(out)

    @classmethod
    def decode(cls, buf, where):
        what = "EXTENT_ITEM"
        _need(buf, EXTENT_ITEM_L.size, what, where)
        refs, gen, flags = EXTENT_ITEM_L.unpack_from(buf)
        pos = EXTENT_ITEM_L.size
        if refs == 0:
            raise _corrupt(what, where, "refs is 0")
        if flags == EXTENT_FLAG_TREE_BLOCK:
            _exact(buf, pos + TREE_BLOCK_INFO_L.size + INLINE_TREE_BLOCK_REF_L.size, what, where)
            (level,) = TREE_BLOCK_INFO_L.unpack_from(buf, pos)
            typ, owner = INLINE_TREE_BLOCK_REF_L.unpack_from(buf, pos + 1)
            if typ != TREE_BLOCK_REF or level >= MAX_LEVEL:
                raise _corrupt(what, where, f"bad tree block ref type {typ} / level {level}")
            return cls(refs, gen, flags, level=level, tree_block_owner=owner)
        if flags != EXTENT_FLAG_DATA:
            raise _corrupt(what, where, f"bad flags {flags:#x}")
        rest = len(buf) - pos
        if rest % INLINE_DATA_REF_L.size:
            raise _corrupt(what, where, "inline refs are not whole records")
        data_refs, total, prev = {}, 0, None
        for typ, root, oid, off, cnt in INLINE_DATA_REF_L.struct.iter_unpack(buf[pos:]):
            k = (root, oid, off)
            if typ != EXTENT_DATA_REF or cnt == 0 or (prev is not None and k <= prev):
                raise _corrupt(what, where, "bad inline data ref")
            data_refs[k] = cnt
            total += cnt
            prev = k
        if total > refs:
            raise _corrupt(what, where, f"inline refs count {total} > refs {refs}")
        return cls(refs, gen, flags, data_refs=data_refs)


DiskExtentDataRef = tuple  # (root, objectid, offset, count)


def encode_extent_data_refs(refs):
    """EXTENT_DATA_REF payload (key ``(bytenr, EXTENT_DATA_REF, extent_data_ref_hash(...))``):
    ``{(root, objectid, offset): count}`` sharing one hash."""
    return b"".join(EXTENT_DATA_REF_L.pack(r, o, f, c) for (r, o, f), c in sorted(refs.items()))


def decode_extent_data_refs(buf, where):
    if not buf or len(buf) % EXTENT_DATA_REF_L.size:
        raise _corrupt("EXTENT_DATA_REF", where, f"size {len(buf)}")
    out = {}
    for r, o, f, c in EXTENT_DATA_REF_L.struct.iter_unpack(buf):
        if c == 0 or (r, o, f) in out:
            raise _corrupt("EXTENT_DATA_REF", where, "zero or duplicate ref")
        out[(r, o, f)] = c
    return out


class DiskCsumItem:
    """EXTENT_CSUM (key ``(EXTENT_CSUM_OBJECTID, EXTENT_CSUM, disk_bytenr)``): one crc32c per
    sector, for the sectors starting at ``disk_bytenr``."""

    @staticmethod
    def encode(csums):
        return struct.pack(f"<{len(csums)}I", *csums)

    @staticmethod
    def decode(buf, where):
        if not buf or len(buf) % 4:
            raise _corrupt("EXTENT_CSUM", where, f"size {len(buf)} is not a multiple of 4")
        return list(struct.unpack(f"<{len(buf) // 4}I", buf))


def name_hash(name):
    """DIR_ITEM / XATTR_ITEM key offset: crc32c of the name (seed 0), as u64."""
    return crc32c(name)


def extent_data_ref_hash(root, objectid, offset):
    """EXTENT_DATA_REF key offset: crc32c of the 24 little-endian bytes root|objectid|offset."""
    return crc32c(struct.pack("<QQQ", root, objectid, offset))


# ---------------------------------------------------------------------------------------------
# Log records (the fsync log, SPEC.md section 10)

LOG_MAGIC = b"UFSBTLG1"
LOG_RECORD_MAX = 16 << 20           # bytes; a longer record is rejected (fsync commits instead)
LOG_INODE, LOG_DROP, LOG_EXTENT, LOG_CSUM, LOG_DEL_TYPE, LOG_PUT, LOG_NAME = range(1, 8)
LOG_OPS = frozenset(range(1, 8))
# log_header.flags: written without a cache flush before it; replay verifies every LOG_CSUM
# entry against the device, and a mismatch ends the chain (SPEC.md section 10)
LOG_VERIFY_DATA = 1 << 0


@dataclass
class LogEntry:
    op: int
    key_type: int
    tree: int
    objectid: int
    offset: int
    end: int
    data: bytes


@dataclass
class DiskLogRecord:
    """One log record: a header (``log_header``) and ``entries``, padded with zeros to
    ``length`` (a multiple of the sector size)."""
    fsid: bytes
    log_id: int
    transid: int
    bytenr: int
    seq: int
    next: int
    entries: list = field(default_factory=list)
    flags: int = 0

    @staticmethod
    def body_size(entries):
        return LOG_HEADER_L.size + sum(LOG_ENTRY_L.size + len(e.data) for e in entries)

    def encode(self, sectorsize):
        parts = [b""]
        pack = LOG_ENTRY_L.struct.pack
        for e in self.entries:
            if e.op not in LOG_OPS:
                raise InvariantError(f"log entry op {e.op}")
            parts.append(pack(e.op, e.key_type, b"\0\0", len(e.data), e.tree, e.objectid,
                              e.offset, e.end))
            parts.append(e.data)
        used = LOG_HEADER_L.size + sum(map(len, parts))
        length = -(-used // sectorsize) * sectorsize
        if length > LOG_RECORD_MAX:
            raise InvariantError(f"log record of {length} bytes")
        parts[0] = LOG_HEADER_L.pack(0, length, LOG_MAGIC, self.fsid, self.log_id, self.transid,
                                     self.bytenr, self.seq, self.next, len(self.entries),
                                     self.flags)
        parts.append(bytes(length - used))
        buf = bytearray(b"".join(parts))
        struct.pack_into("<I", buf, 0, crc32c(memoryview(buf)[4:]))
        return buf

    @staticmethod
    def decode_header(buf, where, *, fsid, log_id, transid, seq, sectorsize):
        """``length`` of the record whose first sector is ``buf`` (read at ``where``), after
        checking every header field that does not need the rest of the record."""
        if len(buf) < LOG_HEADER_L.size:
            raise _corrupt("log record", where, "short read")
        (_c, length, magic, rfsid, rid, rtrans, bytenr, rseq, _n, _cnt,
         flags) = LOG_HEADER_L.unpack_from(buf)
        if magic != LOG_MAGIC:
            raise _corrupt("log record", where, "bad magic")
        if rfsid != fsid or rid != log_id or rtrans != transid:
            raise _corrupt("log record", where, "another log (fsid, log_id or transid)")
        if bytenr != where or rseq != seq:
            raise _corrupt("log record", where, f"address {bytenr:#x} / seq {rseq}, expected "
                                                 f"seq {seq}")
        if length < sectorsize or length % sectorsize or length > LOG_RECORD_MAX \
                or flags & ~LOG_VERIFY_DATA:
            raise _corrupt("log record", where, f"bad length {length} or flags {flags:#x}")
        return length

    @classmethod
    def decode(cls, buf, where, *, fsid, log_id, transid, seq, sectorsize):
        length = cls.decode_header(buf, where, fsid=fsid, log_id=log_id, transid=transid,
                                   seq=seq, sectorsize=sectorsize)
        if len(buf) < length:
            raise _corrupt("log record", where, "short read")
        buf = memoryview(buf)[:length]
        if crc32c(buf[4:]) != struct.unpack_from("<I", buf)[0]:
            raise _corrupt("log record", where, "checksum mismatch")
        (_c, _l, _m, _f, _i, _t, _b, _s, nxt, count, flags) = LOG_HEADER_L.unpack_from(buf)
        pos, entries = LOG_HEADER_L.size, []
        esz = LOG_ENTRY_L.size
        for _ in range(count):
            if pos + esz > length:
                raise _corrupt("log record", where, "entries past the record")
            op, kt, res, dlen, tree, oid, off, end = LOG_ENTRY_L.unpack_from(buf, pos)
            pos += esz
            if op not in LOG_OPS or res != b"\0\0" or pos + dlen > length:
                raise _corrupt("log record", where, f"bad entry at {pos - esz}")
            entries.append(LogEntry(op, kt, tree, oid, off, end, bytes(buf[pos:pos + dlen])))
            pos += dlen
        if any(buf[pos:]):
            raise _corrupt("log record", where, "padding not zero")
        rec = cls(bytes(_f), _i, _t, _b, _s, nxt, entries, flags)
        return rec, length


__all__ += ["DiskLogRecord", "LogEntry"]

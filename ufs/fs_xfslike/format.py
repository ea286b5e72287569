"""xfslike on-disk format: the one module that knows how bytes on the device are laid out.

Owns: every on-disk structure of xfslike (``Disk*`` classes and B+tree node codecs), the
magic numbers, feature bits, fixed block positions inside an allocation group, the
geometry rules of mkfs, LSN arithmetic and the metadata-block checksum/self-identification
rules.  ``SPEC.md`` beside this file describes every byte; ``LAYOUTS`` is the machine-readable
table that ``tests/fs_xfslike/test_format.py`` compares with the tables in ``SPEC.md``.

May import: the standard library, ``ufs.errors``, ``ufs.iomap.csum``.  Nothing here touches a
device: callers hand in and get back ``bytes``/``bytearray`` of one block.

Invariants:
- All integers are little-endian, all structures have fixed sizes (``struct`` with ``<``,
  no implicit padding).  Every unused byte of a metadata block is written as zero.
- Every metadata block starts with ``DiskBlockHeader`` (magic, CRC32C, self block number,
  owner, LSN, filesystem UUID).  Decoding verifies all of them and raises
  ``CorruptError(what, where)`` on any mismatch; ``where`` names the block number and the
  device byte address.
- Units are in names: ``*_blk`` / ``blkno`` are filesystem blocks, ``*_agbno`` blocks relative
  to the start of an allocation group, ``*_ns`` nanoseconds, ``size``/``*_bytes`` bytes.
"""
from __future__ import annotations

import itertools
import struct
import uuid as _uuid
from dataclasses import dataclass, field

from ufs.errors import CorruptError, InvalidError

try:
    from ufs.iomap.csum import crc32c
except ImportError:  # pragma: no cover - only before ufs.iomap.csum is built
    # Pure-Python CRC32C (Castagnoli, reflected 0x82F63B78), same results as ufs.iomap.csum.
    # Very slow (~1 ms per 4 KiB block): correctness fallback for an unbuilt tree only.
    _CRC_TABLE = []
    for _i in range(256):
        _c = _i
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _CRC_TABLE.append(_c)

    def crc32c(data, seed=0):
        crc = seed ^ 0xFFFFFFFF
        for b in bytes(data):
            crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF

__all__ = [
    "BMBT",
    "BNOBT",
    "CNTBT",
    "DIRBT",
    "FORMAT_VERSION",
    "INOBT",
    "LAYOUTS",
    "SCHEMAS",
    "BtreeSchema",
    "DiskAgHeader",
    "DiskBlockHeader",
    "DiskExtent",
    "DiskInode",
    "DiskLogCommit",
    "DiskLogEntry",
    "DiskLogHeader",
    "DiskLogRecord",
    "DiskSuperblock",
    "Geometry",
    "Layout",
    "block_crc",
    "check_block",
    "crc32c",
    "lsn_blk",
    "lsn_cycle",
    "make_lsn",
    "new_block",
    "set_block_crc",
    "stamp_header",
]

FORMAT_VERSION = 1


def _magic(tag: bytes) -> int:
    """A u32 magic whose little-endian bytes spell ``tag`` (so hexdumps show the tag)."""
    return int.from_bytes(tag, "little")


# Magic numbers, one per block kind (DiskBlockHeader.magic) and for inodes.
SB_MAGIC = _magic(b"XLSB")        # superblock (primary and copies)
AGH_MAGIC = _magic(b"XLAG")       # allocation group header
BNOBT_MAGIC = _magic(b"XLAB")     # free space by block B+tree node
CNTBT_MAGIC = _magic(b"XLAC")     # free space by size B+tree node
INOBT_MAGIC = _magic(b"XLIB")     # inode chunk B+tree node
BMBT_MAGIC = _magic(b"XLBM")      # file extent map B+tree node
LOGH_MAGIC = _magic(b"XLLH")      # log header slot
LOGR_MAGIC = _magic(b"XLLR")      # log record header
LOGC_MAGIC = _magic(b"XLLC")      # log record commit block
INODE_MAGIC = _magic(b"XLIN")     # on-disk inode
DIRBT_MAGIC = _magic(b"XLDR")     # directory entry B+tree node

MAGIC_NAMES = {
    SB_MAGIC: "superblock", AGH_MAGIC: "AG header", BNOBT_MAGIC: "bnobt node",
    CNTBT_MAGIC: "cntbt node", INOBT_MAGIC: "inobt node", BMBT_MAGIC: "bmbt node",
    LOGH_MAGIC: "log header", LOGR_MAGIC: "log record", LOGC_MAGIC: "log commit",
    INODE_MAGIC: "inode", DIRBT_MAGIC: "dirbt node",
}

# Owner ids for blocks that belong to no AG/inode.
OWNER_LOG = 0xFFFF_FFFF_FFFF_FFFE
NULL_BLK = 0xFFFF_FFFF_FFFF_FFFF      # "no block" in u64 block-number fields
NULL_AGBNO = 0xFFFF_FFFF

# Feature bits.  Rules (SPEC.md "Versions and features"): unknown incompat bits refuse the
# mount; unknown ro_compat bits allow only a read-only mount; unknown compat bits are ignored.
COMPAT_KNOWN = 0
RO_COMPAT_KNOWN = 0
INCOMPAT_KNOWN = 0

SB_STATE_CLEAN = 1 << 0           # cleanly unmounted: summary counters valid, log empty

# Geometry limits.
MIN_BLOCK_SIZE = 1024
MAX_BLOCK_SIZE = 65536
DEFAULT_BLOCK_SIZE = 4096
DEFAULT_INODE_SIZE = 512
MIN_INODE_SIZE = 256
MAX_AG_BLK = 1 << 31              # agbno fits in u32 with room for NULL_AGBNO
MIN_LOG_BLK = 128
MAX_LOG_BLK = 32768
AGFL_SLOTS = 64                   # reserved free-list entries in each AG header

# Fixed block positions inside every AG (agbno).  AG 0 additionally holds the log, starting
# at AG_FIRST_FREE_AGBNO; free space starts after it.
SB_AGBNO = 0                      # superblock: primary in AG 0, copies in every other AG
AGH_AGBNO = 1
BNO_ROOT_AGBNO = 2                # initial roots; they move when the trees grow or shrink
CNT_ROOT_AGBNO = 3
INO_ROOT_AGBNO = 4
AG_FIRST_FREE_AGBNO = 5
MIN_AG_FREE_BLK = 64              # an AG must have at least this many blocks past its headers

# Inode data-fork formats.
FMT_INLINE = 1                    # data lives in the fork area (small dirs, symlinks, files)
FMT_EXTENTS = 2                   # fork area holds an array of DiskExtent
FMT_BTREE = 3                     # extents live in a BMBT whose root is bmbt_root_blk
FMT_DEV = 4                       # device special file: no data (rdev holds the device)

DIR_NAME_MAX = 255                # bytes of a directory entry name
INODES_PER_CHUNK = 64             # inodes per inobt record (free_mask bits)

EXT_UNWRITTEN = 1 << 0            # DiskExtent.flags: allocated, reads as zeros

LOGE_CANCEL = 1 << 0              # DiskLogEntry.flags: block freed; no image, cancels older images


# --- LSNs --------------------------------------------------------------------------------

def make_lsn(cycle: int, blk: int) -> int:
    """LSN = cycle in the high 32 bits, block offset inside the log data area in the low 32."""
    return (cycle << 32) | blk


def lsn_cycle(lsn: int) -> int:
    return lsn >> 32


def lsn_blk(lsn: int) -> int:
    return lsn & 0xFFFF_FFFF


# --- layouts -----------------------------------------------------------------------------

_CODE_TYPES = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64", "q": "i64"}


class Layout:
    """A fixed-size little-endian record: fields, offsets, sizes and a ``struct.Struct``.

    ``base`` is the byte offset of the record inside its block (for SPEC tables).
    """

    def __init__(self, name: str, fields: list[tuple[str, str, str]], base: int = 0):
        self.name = name
        self.fields = fields
        self.base = base
        self.struct = struct.Struct("<" + "".join(code for _, code, _ in fields))
        self.size = self.struct.size
        self.names = [n for n, _, _ in fields]
        self.table = []              # [(offset, size, name, type)]
        off = base
        for fname, code, _doc in fields:
            sz = struct.calcsize("<" + code)
            typ = _CODE_TYPES.get(code, f"u8[{sz}]")
            self.table.append((off, sz, fname, typ))
            off += sz

    def pack_into(self, buf, values) -> None:
        self.struct.pack_into(buf, self.base, *values)

    def unpack_from(self, buf) -> tuple:
        return self.struct.unpack_from(buf, self.base)


LAYOUTS: dict[str, Layout] = {}


def _layout(name, fields, base=0) -> Layout:
    lay = Layout(name, fields, base)
    LAYOUTS[name] = lay
    return lay


HDR = _layout("DiskBlockHeader", [
    ("magic", "I", "block kind"),
    ("crc", "I", "CRC32C of the block, bytes 4..7 excluded"),
    ("blkno", "Q", "this block's own block number"),
    ("owner", "Q", "AG number, inode number, or OWNER_LOG"),
    ("lsn", "Q", "LSN of the log record that last wrote this block (0: never logged)"),
    ("uuid", "16s", "filesystem UUID"),
])
HDR_SIZE = HDR.size               # 48


# --- metadata block header ------------------------------------------------------------------

def block_crc(data) -> int:
    """CRC32C of a block with its crc field (bytes 4..7) left out."""
    mv = memoryview(data)
    return crc32c(mv[8:], crc32c(mv[:4]))


def set_block_crc(data: bytearray) -> None:
    struct.pack_into("<I", data, 4, block_crc(data))


def stamp_header(data: bytearray, magic: int, blkno: int, owner: int, lsn: int, uuid: bytes) -> None:
    HDR.pack_into(data, (magic, 0, blkno, owner, lsn, uuid))


def new_block(block_size: int, magic: int, blkno: int, owner: int, uuid: bytes, lsn: int = 0) -> bytearray:
    data = bytearray(block_size)
    stamp_header(data, magic, blkno, owner, lsn, uuid)
    return data


def where(blkno: int, block_size: int) -> str:
    return f"block {blkno} (byte {blkno * block_size})"


@dataclass
class DiskBlockHeader:
    magic: int
    crc: int
    blkno: int
    owner: int
    lsn: int
    uuid: bytes

    @classmethod
    def decode(cls, data) -> DiskBlockHeader:
        return cls(*HDR.unpack_from(data))


def check_block(data, magic: int, blkno: int, uuid: bytes | None, owner: int | None = None,
                block_size: int | None = None) -> DiskBlockHeader:
    """Verify a metadata block's header; raise CorruptError naming the block on mismatch.

    Order: magic first (so "not this kind of block" is reported as such), then CRC (torn or
    bit-flipped), then self-identification (a valid block written somewhere else, or one
    left by an older filesystem on the same device).
    """
    bs = block_size or len(data)
    what = MAGIC_NAMES.get(magic, f"metadata block {magic:#x}")
    if len(data) < HDR_SIZE:
        raise CorruptError(what, where(blkno, bs), "short block")
    h = DiskBlockHeader.decode(data)
    if h.magic != magic:
        found = MAGIC_NAMES.get(h.magic, f"{h.magic:#010x}")
        raise CorruptError(what, where(blkno, bs), f"bad magic (found {found})")
    if h.crc != block_crc(data):
        raise CorruptError(what, where(blkno, bs), "CRC mismatch")
    if h.blkno != blkno:
        raise CorruptError(what, where(blkno, bs), f"block claims to be block {h.blkno}")
    if uuid is not None and h.uuid != uuid:
        raise CorruptError(what, where(blkno, bs), "UUID of another filesystem")
    if owner is not None and h.owner != owner:
        raise CorruptError(what, where(blkno, bs), f"owner {h.owner}, expected {owner}")
    return h


# --- superblock --------------------------------------------------------------------------

SB = _layout("DiskSuperblock", [
    ("version", "I", "FORMAT_VERSION"),
    ("compat", "I", "compatible feature bits"),
    ("ro_compat", "I", "read-only-compatible feature bits"),
    ("incompat", "I", "incompatible feature bits"),
    ("block_size", "I", "bytes per filesystem block"),
    ("sector_size", "I", "device logical block size at mkfs, bytes"),
    ("inode_size", "I", "bytes per on-disk inode"),
    ("ag_count", "I", "number of allocation groups"),
    ("total_blk", "Q", "filesystem size in blocks"),
    ("ag_blk", "Q", "blocks per AG (the last AG may be shorter)"),
    ("log_start_blk", "Q", "first block of the log region"),
    ("log_nblocks", "I", "blocks in the log region"),
    ("state", "I", "SB_STATE_* bits"),
    ("root_ino", "Q", "root directory inode number (0: none yet)"),
    ("mount_generation", "Q", "incremented at every read-write mount"),
    ("free_blk", "Q", "free blocks summary (valid when CLEAN)"),
    ("icount", "Q", "allocated inodes summary (valid when CLEAN)"),
    ("ifree", "Q", "free inodes in allocated chunks summary (valid when CLEAN)"),
    ("label", "32s", "volume label, NUL padded"),
    ("unlinked_ino", "Q", "first inode of the unlinked-but-open list (0: empty)"),
], base=HDR_SIZE)


@dataclass
class DiskSuperblock:
    uuid: bytes
    block_size: int
    total_blk: int
    ag_blk: int
    ag_count: int
    log_start_blk: int
    log_nblocks: int
    sector_size: int = 512
    inode_size: int = DEFAULT_INODE_SIZE
    version: int = FORMAT_VERSION
    compat: int = 0
    ro_compat: int = 0
    incompat: int = 0
    state: int = 0
    root_ino: int = 0
    mount_generation: int = 0
    free_blk: int = 0
    icount: int = 0
    ifree: int = 0
    label: bytes = b""
    unlinked_ino: int = 0
    lsn: int = 0

    def ag_start_blk(self, agno: int) -> int:
        return agno * self.ag_blk

    def ag_length_blk(self, agno: int) -> int:
        return min(self.ag_blk, self.total_blk - agno * self.ag_blk)

    def sb_blkno(self, agno: int) -> int:
        return agno * self.ag_blk + SB_AGBNO

    def encode_into(self, data: bytearray) -> None:
        """Write the body (after the block header) into a superblock block buffer."""
        SB.pack_into(data, (self.version, self.compat, self.ro_compat, self.incompat,
                            self.block_size, self.sector_size, self.inode_size, self.ag_count,
                            self.total_blk, self.ag_blk, self.log_start_blk, self.log_nblocks,
                            self.state, self.root_ino, self.mount_generation, self.free_blk,
                            self.icount, self.ifree, self.label.ljust(32, b"\0")[:32],
                            self.unlinked_ino))

    def load_body(self, data) -> None:
        """Set the fields from a superblock block's body (no header checks: an in-memory
        buffer of an already verified block, e.g. after a transaction was cancelled)."""
        v = SB.unpack_from(data)
        (self.version, self.compat, self.ro_compat, self.incompat, self.block_size, self.sector_size,
         self.inode_size, self.ag_count, self.total_blk, self.ag_blk, self.log_start_blk,
         self.log_nblocks, self.state, self.root_ino, self.mount_generation, self.free_blk,
         self.icount, self.ifree, label, self.unlinked_ino) = v
        self.label = label.rstrip(b"\0")

    def encode(self, agno: int = 0) -> bytes:
        """The whole superblock block for the copy in AG ``agno`` (0 = primary)."""
        blkno = self.sb_blkno(agno)
        data = new_block(self.block_size, SB_MAGIC, blkno, agno, self.uuid, self.lsn)
        self.encode_into(data)
        set_block_crc(data)
        return bytes(data)

    @classmethod
    def decode(cls, data, agno: int = 0, blkno: int | None = None) -> DiskSuperblock:
        """Decode and verify a superblock block (the primary when ``agno == 0``)."""
        if len(data) < HDR_SIZE + SB.size:
            raise CorruptError("superblock", f"AG {agno}", "short read")
        v = SB.unpack_from(data)
        bs = v[4]
        if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise CorruptError("superblock", f"AG {agno}", f"bad block size {bs}")
        if len(data) < bs:
            raise CorruptError("superblock", f"AG {agno}", "short read")
        data = memoryview(data)[:bs]
        ag_blk = v[9]
        exp_blk = blkno if blkno is not None else agno * ag_blk
        h = check_block(data, SB_MAGIC, exp_blk, None, agno, bs)
        sb = cls(uuid=h.uuid, version=v[0], compat=v[1], ro_compat=v[2], incompat=v[3],
                 block_size=bs, sector_size=v[5], inode_size=v[6], ag_count=v[7], total_blk=v[8],
                 ag_blk=ag_blk, log_start_blk=v[10], log_nblocks=v[11], state=v[12], root_ino=v[13],
                 mount_generation=v[14], free_blk=v[15], icount=v[16], ifree=v[17],
                 label=v[18].rstrip(b"\0"), unlinked_ino=v[19], lsn=h.lsn)
        sb.validate(f"superblock in AG {agno}")
        return sb

    def validate(self, what: str = "superblock") -> None:
        """Geometry sanity: every field inside the limits mkfs could have produced."""
        loc = where(self.sb_blkno(0), self.block_size)
        if self.version != FORMAT_VERSION:
            raise CorruptError(what, loc, f"unsupported version {self.version}")
        if not (MIN_INODE_SIZE <= self.inode_size <= self.block_size) or self.inode_size & (self.inode_size - 1):
            raise CorruptError(what, loc, f"bad inode size {self.inode_size}")
        if self.sector_size < 512 or self.sector_size > self.block_size or self.sector_size & (self.sector_size - 1):
            raise CorruptError(what, loc, f"bad sector size {self.sector_size}")
        if not (0 < self.ag_blk <= MAX_AG_BLK) or self.ag_count < 1:
            raise CorruptError(what, loc, "bad AG geometry")
        if not ((self.ag_count - 1) * self.ag_blk < self.total_blk <= self.ag_count * self.ag_blk):
            raise CorruptError(what, loc, "total_blk does not match the AG geometry")
        if (self.log_nblocks < MIN_LOG_BLK or self.log_start_blk < AG_FIRST_FREE_AGBNO
                or self.log_start_blk + self.log_nblocks > min(self.ag_blk, self.total_blk)):
            raise CorruptError(what, loc, "log region outside AG 0")

    def check_features(self, read_only: bool) -> None:
        """Apply the feature rules; raise NotSupportedError for what this code cannot mount."""
        from ufs.errors import NotSupportedError, ReadOnlyError
        if self.incompat & ~INCOMPAT_KNOWN:
            raise NotSupportedError(f"unknown incompatible features {self.incompat & ~INCOMPAT_KNOWN:#x}")
        if not read_only and self.ro_compat & ~RO_COMPAT_KNOWN:
            raise ReadOnlyError(f"unknown ro-compatible features {self.ro_compat & ~RO_COMPAT_KNOWN:#x}: "
                                "read-only mount only")


# --- geometry (mkfs) ---------------------------------------------------------------------

@dataclass
class Geometry:
    """Where everything goes; computed once by mkfs and stored in the superblock."""
    block_size: int
    total_blk: int
    ag_blk: int
    ag_count: int
    log_start_blk: int
    log_nblocks: int
    inode_size: int = DEFAULT_INODE_SIZE
    sector_size: int = 512

    @classmethod
    def compute(cls, size: int, block_size: int = DEFAULT_BLOCK_SIZE, *, sector_size: int = 512,
                ag_count: int | None = None, log_nblocks: int | None = None,
                inode_size: int = DEFAULT_INODE_SIZE) -> Geometry:
        """Geometry for a device of ``size`` bytes; raises InvalidError when it cannot fit.

        Rules: AG size is ``ceil(total / ag_count)`` capped at MAX_AG_BLK (default ag_count:
        4, fewer when AGs would drop under 16 MiB, more when an AG would pass the cap); a last
        AG shorter than the headers + MIN_AG_FREE_BLK is cut off.  At least two AGs whenever
        the device allows it, so the superblock has a copy (block 0 of every AG but AG 0).  The log defaults to 1/128 of
        the filesystem, clamped to [MIN_LOG_BLK, MAX_LOG_BLK] blocks, and lives in AG 0.
        """
        if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise InvalidError(f"block size {block_size} is not a power of two in [1024, 65536]")
        if sector_size > block_size or sector_size < 512 or sector_size & (sector_size - 1):
            raise InvalidError(f"device sector size {sector_size} does not fit block size {block_size}")
        if inode_size < MIN_INODE_SIZE or inode_size > block_size or inode_size & (inode_size - 1):
            raise InvalidError(f"bad inode size {inode_size}")
        total_blk = size // block_size
        if log_nblocks is None:
            log_nblocks = max(MIN_LOG_BLK, min(MAX_LOG_BLK, total_blk // 128))
        if log_nblocks < MIN_LOG_BLK:
            raise InvalidError(f"log must have at least {MIN_LOG_BLK} blocks")
        min_ag = AG_FIRST_FREE_AGBNO + MIN_AG_FREE_BLK
        if ag_count is None:
            ag_count = max(1, min(4, total_blk // max(min_ag, (16 << 20) // block_size)))
            if ag_count == 1 and total_blk >= 2 * (min_ag + log_nblocks):
                ag_count = 2                   # so there is a superblock copy in AG 1
            ag_count = max(ag_count, -(-total_blk // MAX_AG_BLK))
        ag_blk = min(-(-total_blk // ag_count), MAX_AG_BLK)
        ag_count = -(-total_blk // ag_blk) if ag_blk else 0
        if ag_count and total_blk - (ag_count - 1) * ag_blk < min_ag:
            ag_count -= 1                      # runt last AG: give it up
            total_blk = ag_count * ag_blk
        if ag_count < 1 or ag_blk < min_ag + log_nblocks:
            raise InvalidError(f"device of {size} bytes is too small for xfslike "
                               f"(needs {(min_ag + log_nblocks) * block_size} bytes)")
        return cls(block_size=block_size, total_blk=total_blk, ag_blk=ag_blk, ag_count=ag_count,
                   log_start_blk=AG_FIRST_FREE_AGBNO, log_nblocks=log_nblocks,
                   inode_size=inode_size, sector_size=sector_size)

    def ag_length_blk(self, agno: int) -> int:
        return min(self.ag_blk, self.total_blk - agno * self.ag_blk)

    def ag_first_free_agbno(self, agno: int) -> int:
        """First agbno past the fixed headers (and, in AG 0, past the log)."""
        if agno == 0:
            return self.log_start_blk + self.log_nblocks
        return AG_FIRST_FREE_AGBNO

    def superblock(self, uuid: bytes | None = None, label: bytes = b"") -> DiskSuperblock:
        return DiskSuperblock(uuid=uuid or _uuid.uuid4().bytes, block_size=self.block_size,
                              total_blk=self.total_blk, ag_blk=self.ag_blk, ag_count=self.ag_count,
                              log_start_blk=self.log_start_blk, log_nblocks=self.log_nblocks,
                              sector_size=self.sector_size, inode_size=self.inode_size, label=label)


# --- AG header ---------------------------------------------------------------------------

AGH = _layout("DiskAgHeader", [
    ("agno", "I", "AG number (also the header owner)"),
    ("length_blk", "I", "blocks in this AG"),
    ("free_blk", "I", "free blocks recorded in the free-space trees (AGFL excluded)"),
    ("longest_free_blk", "I", "longest free extent, blocks"),
    ("bno_root_blk", "Q", "root block of the by-block free-space tree"),
    ("cnt_root_blk", "Q", "root block of the by-size free-space tree"),
    ("ino_root_blk", "Q", "root block of the inode-chunk tree"),
    ("bno_level", "H", "height - 1 of the by-block tree (0: root is a leaf)"),
    ("cnt_level", "H", "height - 1 of the by-size tree"),
    ("ino_level", "H", "height - 1 of the inode-chunk tree"),
    ("agfl_count", "H", "used entries of agfl"),
    ("icount", "Q", "inodes allocated in this AG"),
    ("ifree", "Q", "free inodes in allocated chunks of this AG"),
], base=HDR_SIZE)
AGFL_OFFSET = HDR_SIZE + AGH.size
LAYOUTS["DiskAgHeader.agfl"] = Layout("DiskAgHeader.agfl", [("agfl", f"{4 * AGFL_SLOTS}s",
                                      "AGFL_SLOTS x u32 agbno; first agfl_count are valid")],
                                      base=AGFL_OFFSET)
_AGFL = struct.Struct(f"<{AGFL_SLOTS}I")


@dataclass
class DiskAgHeader:
    agno: int
    length_blk: int
    free_blk: int = 0
    longest_free_blk: int = 0
    bno_root_blk: int = 0
    cnt_root_blk: int = 0
    ino_root_blk: int = 0
    bno_level: int = 0
    cnt_level: int = 0
    ino_level: int = 0
    icount: int = 0
    ifree: int = 0
    agfl: list = field(default_factory=list)      # agbno values, a stack (last = top)

    def encode_into(self, data: bytearray) -> None:
        if len(self.agfl) > AGFL_SLOTS:
            raise CorruptError("AG header", f"AG {self.agno}", "AGFL overflow")
        AGH.pack_into(data, (self.agno, self.length_blk, self.free_blk, self.longest_free_blk,
                             self.bno_root_blk, self.cnt_root_blk, self.ino_root_blk, self.bno_level,
                             self.cnt_level, self.ino_level, len(self.agfl), self.icount, self.ifree))
        _AGFL.pack_into(data, AGFL_OFFSET, *(self.agfl + [0] * (AGFL_SLOTS - len(self.agfl))))

    @classmethod
    def decode(cls, data, blkno: int) -> DiskAgHeader:
        """Decode a verified AG header block (header checks are the caller's: buf.py)."""
        v = AGH.unpack_from(data)
        n = v[10]
        if n > AGFL_SLOTS:
            raise CorruptError("AG header", where(blkno, len(data)), f"agfl_count {n}")
        agfl = list(_AGFL.unpack_from(data, AGFL_OFFSET)[:n])
        agh = cls(agno=v[0], length_blk=v[1], free_blk=v[2], longest_free_blk=v[3],
                  bno_root_blk=v[4], cnt_root_blk=v[5], ino_root_blk=v[6], bno_level=v[7],
                  cnt_level=v[8], ino_level=v[9], icount=v[11], ifree=v[12], agfl=agfl)
        if agh.free_blk > agh.length_blk or agh.longest_free_blk > agh.free_blk or any(
                b >= agh.length_blk for b in agfl):
            raise CorruptError("AG header", where(blkno, len(data)), "counters out of range")
        return agh


# --- inodes ------------------------------------------------------------------------------

INO = _layout("DiskInode", [
    ("magic", "I", "INODE_MAGIC"),
    ("crc", "I", "CRC32C of the inode_size bytes, bytes 4..7 excluded"),
    ("ino", "Q", "this inode's own number"),
    ("lsn", "Q", "LSN of the log record that last wrote the inode's block"),
    ("uuid", "16s", "filesystem UUID"),
    ("mode", "H", "file type and permission bits (0: free inode)"),
    ("data_format", "B", "FMT_* of the data fork (0 for a free inode)"),
    ("version", "B", "inode format version (1)"),
    ("nlink", "I", "hard links"),
    ("uid", "I", "owner"),
    ("gid", "I", "group"),
    ("rdev", "I", "device number for FMT_DEV (Linux new_encode_dev)"),
    ("flags", "I", "inode flags (reserved, 0)"),
    ("generation", "I", "incremented each time the inode number is reused"),
    ("nextents", "I", "extents in the data fork (array or tree)"),
    ("size", "Q", "file size, bytes"),
    ("nblocks", "Q", "blocks owned: data + BMBT nodes"),
    ("atime_ns", "q", "access time, ns since the epoch"),
    ("mtime_ns", "q", "modification time, ns"),
    ("ctime_ns", "q", "change time, ns"),
    ("crtime_ns", "q", "creation time, ns"),
    ("bmbt_root_blk", "Q", "FMT_BTREE: root block of the extent tree; else NULL_BLK"),
    ("bmbt_level", "H", "FMT_BTREE: height - 1 of the extent tree"),
    ("reserved", "H", "zero"),
    ("inline_len", "I", "FMT_INLINE: bytes of data used in the fork area"),
    ("next_unlinked", "Q", "next inode on the unlinked-but-open list (0: end)"),
    ("xattr_blk", "Q", "block holding the extended attributes (NULL_BLK: none)"),
])
INODE_CORE_SIZE = INO.size


@dataclass
class DiskInode:
    ino: int
    mode: int = 0
    data_format: int = 0
    nlink: int = 0
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    flags: int = 0
    generation: int = 0
    nextents: int = 0
    size: int = 0
    nblocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    crtime_ns: int = 0
    bmbt_root_blk: int = NULL_BLK
    bmbt_level: int = 0
    inline_len: int = 0
    next_unlinked: int = 0
    xattr_blk: int = NULL_BLK
    fork: bytes = b""            # the fork area (inode_size - INODE_CORE_SIZE bytes)
    lsn: int = 0
    version: int = 1

    @staticmethod
    def fork_size(inode_size: int) -> int:
        return inode_size - INODE_CORE_SIZE

    def encode_into(self, data, offset: int, inode_size: int, uuid: bytes) -> None:
        fsz = inode_size - INODE_CORE_SIZE
        if len(self.fork) > fsz:
            raise InvalidError(f"inode {self.ino}: fork of {len(self.fork)} bytes exceeds {fsz}")
        mv = memoryview(data)[offset:offset + inode_size]
        INO.struct.pack_into(mv, 0, INODE_MAGIC, 0, self.ino, self.lsn, uuid, self.mode,
                             self.data_format, self.version, self.nlink, self.uid, self.gid,
                             self.rdev, self.flags, self.generation, self.nextents, self.size,
                             self.nblocks, self.atime_ns, self.mtime_ns, self.ctime_ns,
                             self.crtime_ns, self.bmbt_root_blk, self.bmbt_level, 0,
                             self.inline_len, self.next_unlinked, self.xattr_blk)
        mv[INODE_CORE_SIZE:] = self.fork.ljust(fsz, b"\0")
        struct.pack_into("<I", mv, 4, block_crc(mv))

    def encode(self, inode_size: int, uuid: bytes) -> bytes:
        data = bytearray(inode_size)
        self.encode_into(data, 0, inode_size, uuid)
        return bytes(data)

    @classmethod
    def decode(cls, data, offset: int, inode_size: int, ino: int, uuid: bytes | None,
               block_size: int = 0) -> DiskInode:
        """Decode and verify the inode ``ino`` stored at ``data[offset:offset+inode_size]``."""
        mv = memoryview(data)[offset:offset + inode_size]
        loc = f"inode {ino}" + (f" (byte offset {offset} in its block)" if block_size else "")
        v = INO.struct.unpack_from(mv, 0)
        if v[0] != INODE_MAGIC:
            raise CorruptError("inode", loc, "bad magic")
        if v[1] != block_crc(mv):
            raise CorruptError("inode", loc, "CRC mismatch")
        if v[2] != ino:
            raise CorruptError("inode", loc, f"inode claims to be {v[2]}")
        if uuid is not None and v[4] != uuid:
            raise CorruptError("inode", loc, "UUID of another filesystem")
        fmt = v[6]
        if fmt not in (0, FMT_INLINE, FMT_EXTENTS, FMT_BTREE, FMT_DEV):
            raise CorruptError("inode", loc, f"bad data fork format {fmt}")
        di = cls(ino=v[2], lsn=v[3], mode=v[5], data_format=fmt, version=v[7], nlink=v[8],
                 uid=v[9], gid=v[10], rdev=v[11], flags=v[12], generation=v[13], nextents=v[14],
                 size=v[15], nblocks=v[16], atime_ns=v[17], mtime_ns=v[18], ctime_ns=v[19],
                 crtime_ns=v[20], bmbt_root_blk=v[21], bmbt_level=v[22], inline_len=v[24],
                 next_unlinked=v[25], xattr_blk=v[26], fork=bytes(mv[INODE_CORE_SIZE:]))
        if fmt == FMT_INLINE and di.inline_len > inode_size - INODE_CORE_SIZE:
            raise CorruptError("inode", loc, "inline_len past the fork area")
        if fmt == FMT_EXTENTS and di.nextents * EXTENT.size > inode_size - INODE_CORE_SIZE:
            raise CorruptError("inode", loc, "extent count past the fork area")
        return di


# --- extents -----------------------------------------------------------------------------

EXTENT = _layout("DiskExtent", [
    ("file_off_blk", "Q", "first file block mapped"),
    ("dev_blk", "Q", "first device (filesystem) block"),
    ("len_blk", "I", "length in blocks (> 0)"),
    ("flags", "I", "EXT_UNWRITTEN"),
])


@dataclass(frozen=True)
class DiskExtent:
    file_off_blk: int
    dev_blk: int
    len_blk: int
    flags: int = 0

    @property
    def unwritten(self) -> bool:
        return bool(self.flags & EXT_UNWRITTEN)

    def as_record(self) -> tuple:
        return (self.file_off_blk, self.dev_blk, self.len_blk, self.flags)

    @classmethod
    def from_record(cls, rec) -> DiskExtent:
        return cls(*rec)

    @staticmethod
    def encode_array(extents) -> bytes:
        """Pack extents for an inode's fork area (FMT_EXTENTS)."""
        return b"".join(EXTENT.struct.pack(*e.as_record()) for e in extents)

    @classmethod
    def decode_array(cls, data, count: int, where_: str = "inode") -> list:
        out = []
        prev_end = 0
        for rec in EXTENT.struct.iter_unpack(memoryview(data)[:count * EXTENT.size]):
            e = cls(*rec)
            if e.len_blk == 0 or e.file_off_blk < prev_end or e.flags & ~EXT_UNWRITTEN:
                raise CorruptError("extent list", where_, f"bad extent {rec}")
            prev_end = e.file_off_blk + e.len_blk
            out.append(e)
        return out


# --- B+tree nodes ------------------------------------------------------------------------

NODE = _layout("DiskBtreeNode", [
    ("level", "H", "0 = leaf; parent level = child level + 1"),
    ("nrecs", "H", "records (leaf) or key/pointer pairs (internal) in use"),
    ("reserved", "I", "zero"),
], base=HDR_SIZE)
NODE_HDR_SIZE = HDR_SIZE + NODE.size        # 56: leaf records / internal entries start here


class BtreeSchema:
    """Record shape of one kind of B+tree.

    A record is a tuple of ints packed with ``rec_codes``; its key is the first ``nkey``
    fields.  Keys are unique within a tree.  Internal entries are (key fields..., child u64).
    """

    def __init__(self, name: str, magic: int, rec_fields: list[tuple[str, str, str]], nkey: int):
        self.name = name
        self.magic = magic
        self.nkey = nkey
        self.rec_layout = _layout(f"{name}.rec", rec_fields, base=NODE_HDR_SIZE)
        key_fields = rec_fields[:nkey]
        self.ent_layout = _layout(f"{name}.entry", key_fields + [("child_blk", "Q", "child node block")],
                                  base=NODE_HDR_SIZE)
        self.rec_codes = "".join(c for _, c, _ in rec_fields)
        self.ent_codes = "".join(c for _, c, _ in key_fields) + "Q"
        self.rec_size = self.rec_layout.size
        self.ent_size = self.ent_layout.size
        self.rec_struct = self.rec_layout.struct
        self.ent_struct = self.ent_layout.struct
        self._packers: dict[tuple[bool, int], struct.Struct] = {}

    def leaf_maxrecs(self, block_size: int) -> int:
        return min((block_size - NODE_HDR_SIZE) // self.rec_size, 0xFFFF)

    def node_maxrecs(self, block_size: int) -> int:
        return min((block_size - NODE_HDR_SIZE) // self.ent_size, 0xFFFF)

    def _packer(self, leaf: bool, n: int) -> struct.Struct:
        s = self._packers.get((leaf, n))
        if s is None:
            s = struct.Struct("<" + (self.rec_codes if leaf else self.ent_codes) * n)
            self._packers[(leaf, n)] = s
        return s

    def encode_node(self, data: bytearray, level: int, items: list, ptrs: list | None = None) -> None:
        """Write the node body (after the block header) and zero the unused tail.

        Leaf: ``items`` are records.  Internal: ``items`` are keys, ``ptrs`` child blocks.
        """
        n = len(items)
        NODE.pack_into(data, (level, n, 0))
        if level == 0:
            flat = itertools.chain.from_iterable(items)
            size = n * self.rec_size
        else:
            flat = itertools.chain.from_iterable(k + (p,) for k, p in zip(items, ptrs))
            size = n * self.ent_size
        self._packer(level == 0, n).pack_into(data, NODE_HDR_SIZE, *flat)
        end = NODE_HDR_SIZE + size
        data[end:] = bytes(len(data) - end)

    def decode_node(self, data, blkno: int) -> tuple[int, list, list | None]:
        """(level, records) for a leaf, (level, keys, children) for an internal node.

        Verifies counts and key order (strictly ascending) but not the header (buf.py did).
        """
        level, n, _ = NODE.unpack_from(data)
        bs = len(data)
        mv = memoryview(data)
        loc = where(blkno, bs)
        if level == 0:
            if n > self.leaf_maxrecs(bs):
                raise CorruptError(f"{self.name} leaf", loc, f"nrecs {n} too large")
            recs = list(self.rec_struct.iter_unpack(mv[NODE_HDR_SIZE:NODE_HDR_SIZE + n * self.rec_size]))
            nk = self.nkey
            for i in range(1, n):
                if recs[i - 1][:nk] >= recs[i][:nk]:
                    raise CorruptError(f"{self.name} leaf", loc, f"keys out of order at record {i}")
            return 0, recs, None
        if n > self.node_maxrecs(bs) or n == 0:
            raise CorruptError(f"{self.name} node", loc, f"nrecs {n} out of range")
        ents = list(self.ent_struct.iter_unpack(mv[NODE_HDR_SIZE:NODE_HDR_SIZE + n * self.ent_size]))
        keys = [e[:-1] for e in ents]
        ptrs = [e[-1] for e in ents]
        for i in range(1, n):
            if keys[i - 1] >= keys[i]:
                raise CorruptError(f"{self.name} node", loc, f"keys out of order at entry {i}")
        return level, keys, ptrs


BNOBT = BtreeSchema("bnobt", BNOBT_MAGIC, [
    ("start_agbno", "I", "first free block, AG-relative"),
    ("len_blk", "I", "free blocks"),
], nkey=1)
CNTBT = BtreeSchema("cntbt", CNTBT_MAGIC, [
    ("len_blk", "I", "free blocks"),
    ("start_agbno", "I", "first free block, AG-relative"),
], nkey=2)
INOBT = BtreeSchema("inobt", INOBT_MAGIC, [
    ("start_ino", "Q", "first inode number of a chunk"),
    ("free_mask", "Q", "bit i set: inode start_ino + i is free"),
], nkey=1)
BMBT = BtreeSchema("bmbt", BMBT_MAGIC, EXTENT.fields, nkey=1)
DIRBT = BtreeSchema("dirbt", DIRBT_MAGIC, [
    ("hash", "I", "name hash (dir_hash); 0 only for the '..' record"),
    ("coll", "I", "collision index among names with this hash"),
    ("ino", "Q", "inode number the entry names"),
    ("ftype", "B", "d_type of the target (DT_*)"),
    ("namelen", "B", "bytes of name used"),
    ("name", f"{DIR_NAME_MAX}s", "the name, NUL padded"),
], nkey=2)
SCHEMAS = {s.name: s for s in (BNOBT, CNTBT, INOBT, BMBT, DIRBT)}


# --- log ---------------------------------------------------------------------------------

LOGH = _layout("DiskLogHeader", [
    ("seq", "Q", "header write sequence; the valid slot with the larger seq wins"),
    ("tail_lsn", "Q", "LSN where recovery starts (oldest record not yet checkpointed)"),
    ("tail_prev_lsn", "Q", "LSN of the record before tail_lsn (0: none)"),
    ("log_nblocks", "I", "blocks in the log region (both header slots included)"),
    ("reserved", "I", "zero"),
], base=HDR_SIZE)
LOGR = _layout("DiskLogRecord", [
    ("prev_lsn", "Q", "LSN of the previous record (0: none)"),
    ("nblocks", "I", "blocks in this record: header + table + images + commit"),
    ("nentries", "I", "DiskLogEntry entries"),
    ("ntable_blk", "I", "blocks of entry table following the header"),
    ("reserved", "I", "zero"),
], base=HDR_SIZE)
LOGE = _layout("DiskLogEntry", [
    ("blkno", "Q", "target block of the image"),
    ("flags", "I", "LOGE_CANCEL"),
    ("img_crc", "I", "CRC32C of the image block (0 for CANCEL)"),
])
LOGC = _layout("DiskLogCommit", [
    ("nblocks", "I", "same as the record header"),
    ("nentries", "I", "same as the record header"),
    ("body_crc", "I", "CRC32C of header block + table blocks + image blocks, in order"),
    ("reserved", "I", "zero"),
], base=HDR_SIZE)
LOG_HEADER_SLOTS = 2              # blocks 0 and 1 of the log region; data area follows


@dataclass
class DiskLogHeader:
    seq: int
    tail_lsn: int
    tail_prev_lsn: int
    log_nblocks: int

    def encode(self, block_size: int, blkno: int, uuid: bytes) -> bytes:
        data = new_block(block_size, LOGH_MAGIC, blkno, OWNER_LOG, uuid, self.tail_lsn)
        LOGH.pack_into(data, (self.seq, self.tail_lsn, self.tail_prev_lsn, self.log_nblocks, 0))
        set_block_crc(data)
        return bytes(data)

    @classmethod
    def decode(cls, data, blkno: int, uuid: bytes) -> DiskLogHeader:
        check_block(data, LOGH_MAGIC, blkno, uuid, OWNER_LOG)
        v = LOGH.unpack_from(data)
        return cls(seq=v[0], tail_lsn=v[1], tail_prev_lsn=v[2], log_nblocks=v[3])


@dataclass
class DiskLogRecord:
    lsn: int
    prev_lsn: int
    nblocks: int
    nentries: int
    ntable_blk: int

    def encode(self, block_size: int, blkno: int, uuid: bytes) -> bytearray:
        data = new_block(block_size, LOGR_MAGIC, blkno, OWNER_LOG, uuid, self.lsn)
        LOGR.pack_into(data, (self.prev_lsn, self.nblocks, self.nentries, self.ntable_blk, 0))
        set_block_crc(data)
        return data

    @classmethod
    def decode(cls, data, blkno: int, uuid: bytes) -> DiskLogRecord:
        h = check_block(data, LOGR_MAGIC, blkno, uuid, OWNER_LOG)
        v = LOGR.unpack_from(data)
        return cls(lsn=h.lsn, prev_lsn=v[0], nblocks=v[1], nentries=v[2], ntable_blk=v[3])


@dataclass(frozen=True)
class DiskLogEntry:
    blkno: int
    flags: int = 0
    img_crc: int = 0

    @staticmethod
    def table_blocks(nentries: int, block_size: int) -> int:
        return -(-nentries * LOGE.size // block_size)

    @staticmethod
    def encode_table(entries, block_size: int) -> bytes:
        raw = b"".join(LOGE.struct.pack(e.blkno, e.flags, e.img_crc) for e in entries)
        nblk = DiskLogEntry.table_blocks(len(entries), block_size)
        return raw.ljust(nblk * block_size, b"\0")

    @classmethod
    def decode_table(cls, data, nentries: int) -> list:
        return [cls(*v) for v in LOGE.struct.iter_unpack(memoryview(data)[:nentries * LOGE.size])]


@dataclass
class DiskLogCommit:
    lsn: int
    nblocks: int
    nentries: int
    body_crc: int

    def encode(self, block_size: int, blkno: int, uuid: bytes) -> bytearray:
        data = new_block(block_size, LOGC_MAGIC, blkno, OWNER_LOG, uuid, self.lsn)
        LOGC.pack_into(data, (self.nblocks, self.nentries, self.body_crc, 0))
        set_block_crc(data)
        return data

    @classmethod
    def decode(cls, data, blkno: int, uuid: bytes) -> DiskLogCommit:
        h = check_block(data, LOGC_MAGIC, blkno, uuid, OWNER_LOG)
        v = LOGC.unpack_from(data)
        return cls(lsn=h.lsn, nblocks=v[0], nentries=v[1], body_crc=v[2])

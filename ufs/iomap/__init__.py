"""ufs.iomap: the Cython core (devices, iomap types, the DIO engine), re-exported.

Owns the Python ``IntFlag``/``IntEnum`` mirrors of the C enums of ``iomap.pxd``:
``MapType``, ``MapFlag``, ``IterFlag``, ``DioFlag`` and ``Iocb``.  Their values must equal the
C ones (``ufs.iomap.iomap.C_ENUMS``); ``tests/test_iomap_types.py`` checks that.
May import: the compiled ``ufs.iomap.*`` modules and ``ufs.errors`` only.
"""
from __future__ import annotations

import enum

from ufs.iomap import bdev as _bdev
from ufs.iomap.iomap import (C_ENUMS, EIOCBQUEUED, DioOps, IoMap, IomapIter, IomapOps, IovIter,
                             Kiocb)
from ufs.iomap.dio import (BioRef, Dio, DioBatch, dio_complete, dio_rw, dio_start,
                           generic_write_sync)

IOMAP_NULL_ADDR = 2 ** 64 - 1


class MapType(enum.IntEnum):
    """struct iomap.type."""
    HOLE = 0
    DELALLOC = 1
    MAPPED = 2
    UNWRITTEN = 3
    INLINE = 4


class MapFlag(enum.IntFlag):
    """struct iomap.flags.  NEW..ATOMIC_BIO are set by iomap_begin; SIZE_CHANGED and STALE by
    the core (and STALE by a body that wants the same position remapped); PRIVATE and up belong
    to the personality."""
    NEW = 1 << 0
    DIRTY = 1 << 1
    SHARED = 1 << 2
    MERGED = 1 << 3
    BOUNDARY = 1 << 6
    ATOMIC_BIO = 1 << 8
    SIZE_CHANGED = 1 << 9
    STALE = 1 << 10
    PRIVATE = 1 << 12


class IterFlag(enum.IntFlag):
    """Operation flags given to iomap_begin/iomap_end; no flag means a read."""
    WRITE = 1 << 0
    ZERO = 1 << 1
    REPORT = 1 << 2
    FAULT = 1 << 3
    DIRECT = 1 << 4
    NOWAIT = 1 << 5
    OVERWRITE_ONLY = 1 << 6
    UNSHARE = 1 << 7
    ATOMIC = 1 << 9


class DioFlag(enum.IntFlag):
    """dio_start's dio_flags (FORCE_WAIT..BOUNCE) and the flags end_io receives
    (UNWRITTEN, COW)."""
    FORCE_WAIT = 1 << 0
    OVERWRITE_ONLY = 1 << 1
    PARTIAL = 1 << 2
    FSBLOCK_ALIGNED = 1 << 3
    BOUNCE = 1 << 4
    UNWRITTEN = 1 << 8
    COW = 1 << 9


class Iocb(enum.IntFlag):
    """Kiocb.ki_flags.  DSYNC/SYNC/NOWAIT/APPEND/ATOMIC have the RWF_* values."""
    DSYNC = 1 << 1
    SYNC = 1 << 2
    NOWAIT = 1 << 3
    APPEND = 1 << 4
    ATOMIC = 1 << 6
    DIRECT = 1 << 17
    WRITE = 1 << 18


# IOCB_* names as plain module constants too (kernel spelling)
IOCB_DSYNC, IOCB_SYNC, IOCB_NOWAIT, IOCB_APPEND = Iocb.DSYNC, Iocb.SYNC, Iocb.NOWAIT, Iocb.APPEND
IOCB_ATOMIC, IOCB_DIRECT, IOCB_WRITE = Iocb.ATOMIC, Iocb.DIRECT, Iocb.WRITE

_BDEV_NAMES = ("BlockDev", "IoQueue", "RamDev", "DirectDev", "FaultDev", "AlignedBuffer",
               "BufPool", "aligned_buffer", "open_device", "BIO_READ", "BIO_WRITE", "BIO_FLUSH",
               "BIO_FUA", "BIO_SYNC")
for _name in _BDEV_NAMES:
    if hasattr(_bdev, _name):
        globals()[_name] = getattr(_bdev, _name)

__all__ = ["MapType", "MapFlag", "IterFlag", "DioFlag", "Iocb", "IOMAP_NULL_ADDR", "EIOCBQUEUED",
           "IoMap", "IomapOps", "DioOps", "Kiocb", "IovIter", "IomapIter", "Dio", "BioRef",
           "DioBatch", "dio_start", "dio_complete", "dio_rw", "generic_write_sync",
           "IOCB_DSYNC", "IOCB_SYNC", "IOCB_NOWAIT", "IOCB_APPEND", "IOCB_ATOMIC", "IOCB_DIRECT",
           "IOCB_WRITE", "C_ENUMS"] + [n for n in _BDEV_NAMES if hasattr(_bdev, n)]

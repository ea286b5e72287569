"""generic_write_sync: make a just-written range durable when the kiocb asks for it.

Layer: vfs.  Imports ``ufs.iomap`` only.

The DIO engine owns the one implementation (``ufs.iomap.dio.generic_write_sync``, which
``dio_complete`` calls); the VFS re-exports it so buffered and direct writes sync alike:
with ``IOCB_DSYNC`` set, ``iocb.ki_filp.vfs_fsync_range(ki_pos - count, ki_pos,
datasync=not IOCB_SYNC)`` (``ki_pos`` has already moved past the written bytes); it returns
``count`` or raises the fsync error.
"""
from ufs.iomap.dio import generic_write_sync

__all__ = ["generic_write_sync"]

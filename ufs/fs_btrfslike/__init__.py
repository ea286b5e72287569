"""btrfslike: a btrfs-shaped (not btrfs-compatible) copy-on-write personality for ufs.

Layer: personality.  May import ``ufs.iomap``, ``ufs.vfs``, ``ufs.errors``, ``ufs.hookspecs``
and ``ufs.registry``; never ``cli``, ``fuse``, ``api``, ``plugins`` or another personality.

Modules, bottom-up (each imports only the ones above it):

- ``format``      the ONE owner of the on-disk format (``SPEC.md`` beside it describes every byte):
                  superblock, node header, leaf items, key types, item payloads.
- ``ctree``       the one copy-on-write B-tree (search, insert, delete, resize, iteration,
                  snapshots by shared refcounted subtrees) and the node cache.
- ``extent_tree`` free-space cache, delayed references, EXTENT_ITEMs with refcounts and
                  back-references, used-bytes accounting (stored in a ``ctree.BTree``; ctree
                  reaches it back only through ``fs.extents``, duck-typed).
- ``transaction`` ``TransactionManager``: mkfs, mount (newest valid superblock), start/commit
                  (nodes, flush, superblocks with FUA), deferred reuse of freed blocks, the
                  tree of trees (create, snapshot, delete) and the metadata fsck (``check``).
- ``tree_log``    the fsync log: ``TreeLog`` (log areas and records, named by each
                  superblock for the next transaction; used by ``transaction``), fsync of one
                  inode as one log record (``sync_inode``) and mount-time ``replay``; its
                  inode-level helpers are imported lazily from ``inode``.

Later modules (inodes, directories, file extents, checksums, DIO) build on these.
"""

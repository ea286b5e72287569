"""xfslike: an XFS-shaped personality (allocation groups, free-space B+trees, extent maps,
a write-ahead journal of physical block images).  Not XFS-compatible.

Modules, bottom up (each may import only those above it in this list, plus ``ufs.errors``
and ``ufs.iomap``):

- ``format``  every on-disk structure, constant and geometry rule (``SPEC.md`` describes each byte)
- ``buf``     metadata buffer cache: read + verify, LRU of clean buffers, pin counts
- ``log``     write-ahead journal: transactions, group commit, checkpoint, recovery
- ``btree``   generic on-disk B+tree over ``buf``/``log``
- ``alloc``   per-AG free space: two B+trees (by block, by size), AGFL, busy extents, mkfs of AGs
- ``inode``   inode chunks (inobt), inode allocation, the in-memory inode
- ``bmap``    per-inode extent map: in the inode fork, spilling into a bmbt
- ``dir``     directories: short form in the fork, hashed dirbt beyond
- ``super``   the mounted filesystem: transactions, iget, namespace ops, orphans, statfs
- ``file``    data path: iomap ops, DIO with XFS locking, delalloc write-back, fsync, fallocate
- ``mkfs``, ``fsck``, ``plugin``   format / check+repair / pluggy registration
"""

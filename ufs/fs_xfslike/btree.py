"""xfslike generic on-disk B+tree (free space by block/by size, inode chunks, extent maps).

Owns: the algorithms of one B+tree over fixed-size records (``format.BtreeSchema``):
lookup / lookup_ge / lookup_le / iterate, insert / delete / update with splits, merges and
redistribution, and a full structural check.  Node bytes are ``format``'s; nodes are cached
decoded (``Node`` as ``Buf.obj``) so an operation costs O(log n) node visits and a binary
search per node, never a decode of every record.

May import: ``ufs.errors``, ``.format``, ``.buf`` (it is handed a ``Transaction`` by callers).

Shape and invariants (checked by ``check()``):
- Leaves hold records sorted by key (the first ``schema.nkey`` fields), keys unique.
  Internal nodes hold (key, child) entries; ``keys[i]`` is a lower bound of every key under
  ``child[i]`` and greater than every key under ``child[i-1]``; ``keys[0]`` equals the
  separator of the node in its parent.  Deleting a node's smallest key leaves the separator
  as a (still valid) lower bound, as XFS does not bother to update it either.
- Every node but the root holds at least ``max // 3`` entries; a non-root underflow merges
  with a sibling when both fit in one node and otherwise evens the two out.  An internal
  root with one child is replaced by the child; an empty leaf root stays.
- Levels: leaves are 0; a child is exactly one level below its parent.

Block management is the owner's: ``alloc_block(tx) -> blkno`` and ``free_block(tx, blkno)``.
The free-space trees give callbacks that take from / return to their AG's reserved free list
(AGFL), so a tree never allocates through itself.  The root is held by the owner too
(``root``: an object with ``root_blk``, ``level`` and ``set_root(tx, root_blk, level)``).

Offline (fsck/repair), on raw block images instead of the cache and a transaction:
``salvage_walk`` reads a tree without trusting it (every node verified, unreadable subtrees
skipped and reported with their key range), ``bulk_build`` writes a whole tree over sorted
records into given blocks (``bulk_nodes_needed``/``bulk_level`` size it beforehand).

Locking: none here.  The caller holds the owner's lock (AG or inode) across the operation
and the transaction; ``iterate`` must not run across modifications of the same tree.
"""
from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right

from ufs.errors import CorruptError, ExistsError, InvariantError, NotFoundError

from . import format as fmt

__all__ = ["Btree", "Node", "bulk_build", "bulk_level", "bulk_nodes_needed", "salvage_walk"]


_INF = (float("inf"),)
_NRECS = struct.Struct("<H")
_NRECS_OFF = fmt.NODE.table[1][0]         # DiskBtreeNode.nrecs


class Node:
    """Decoded node: ``items`` are records (leaf) or keys (internal), ``ptrs`` children.

    ``data`` is the block's bytes.  Single-record leaf changes patch ``data`` in place (a
    memmove of the tail), so a commit does not re-encode the node; any other change sets
    ``stale`` and the node is re-encoded whole when the buffer is sealed.
    """

    __slots__ = ("data", "items", "level", "ptrs", "schema", "stale")

    def __init__(self, schema, level: int, items: list, ptrs: list | None, data: bytearray | None = None):
        self.schema = schema
        self.level = level
        self.items = items
        self.ptrs = ptrs
        self.data = data
        self.stale = data is None

    def encode_into(self, data: bytearray) -> None:
        if self.stale or data is not self.data:
            self.schema.encode_node(data, self.level, self.items, self.ptrs)
            self.data = data
            self.stale = False

    # In-place leaf edits: list and bytes together.
    def leaf_insert(self, pos: int, rec: tuple) -> None:
        items = self.items
        n = len(items)
        items.insert(pos, rec)
        d = self.data
        if self.stale or d is None:
            return
        rs = self.schema.rec_size
        end = fmt.NODE_HDR_SIZE + n * rs
        if end + rs > len(d):                  # over capacity: it splits, re-encode then
            self.stale = True
            return
        off = fmt.NODE_HDR_SIZE + pos * rs
        d[off + rs:end + rs] = d[off:end]
        self.schema.rec_struct.pack_into(d, off, *rec)
        _NRECS.pack_into(d, _NRECS_OFF, n + 1)

    def leaf_pop(self, pos: int) -> tuple:
        items = self.items
        n = len(items)
        rec = items.pop(pos)
        d = self.data
        if self.stale or d is None:
            return rec
        rs = self.schema.rec_size
        off = fmt.NODE_HDR_SIZE + pos * rs
        end = fmt.NODE_HDR_SIZE + n * rs
        d[off:end - rs] = d[off + rs:end]
        d[end - rs:end] = bytes(rs)
        _NRECS.pack_into(d, _NRECS_OFF, n - 1)
        return rec

    def leaf_set(self, pos: int, rec: tuple) -> None:
        self.items[pos] = rec
        if not self.stale and self.data is not None:
            self.schema.rec_struct.pack_into(self.data, fmt.NODE_HDR_SIZE + pos * self.schema.rec_size, *rec)


def _as_key(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


class Btree:
    """One B+tree.

    Args:
        cache: the ``BufCache``.
        schema: record shape and node magic.
        owner: owner id stamped in (and checked on) every node (AG number or inode number).
        root: holder of ``root_blk``/``level`` with ``set_root(tx, root_blk, level)``.
        alloc_block: ``(tx) -> blkno`` for a new node.
        free_block: ``(tx, blkno)`` when a node is no longer used.
        max_leaf, max_node: override node capacities (tests use tiny nodes to get deep trees).
    """

    def __init__(self, cache, schema: fmt.BtreeSchema, owner: int, root, alloc_block, free_block,
                 *, max_leaf: int | None = None, max_node: int | None = None):
        self.cache = cache
        self.schema = schema
        self.owner = owner
        self.root = root
        self.alloc_block = alloc_block
        self.free_block = free_block
        bs = cache.block_size
        self.max_leaf = min(max_leaf or schema.leaf_maxrecs(bs), schema.leaf_maxrecs(bs))
        self.max_node = min(max_node or schema.node_maxrecs(bs), schema.node_maxrecs(bs))
        if self.max_leaf < 3 or self.max_node < 3:
            raise InvariantError("B+tree nodes need room for at least 3 entries")
        self.min_leaf = max(1, self.max_leaf // 3)
        self.min_node = max(2, self.max_node // 3)
        nk = schema.nkey
        self._nk = nk
        self._kf = None if nk == len(schema.rec_layout.fields) else (lambda r: r[:nk])
        self._decode = self._decode_node

    # -- creation -----------------------------------------------------------------------

    @staticmethod
    def create_root(tx, schema: fmt.BtreeSchema, blkno: int, owner: int) -> None:
        """Write an empty leaf root at ``blkno`` (mkfs, or a new inode's extent tree)."""
        buf = tx.new_buf(blkno, schema.magic, owner)
        buf.obj = Node(schema, 0, [], None)

    # -- node access --------------------------------------------------------------------

    def _decode_node(self, buf) -> Node:
        level, items, ptrs = self.schema.decode_node(buf.data, buf.blkno)
        return Node(self.schema, level, items, ptrs, buf.data)

    def _node(self, blkno: int, level: int):
        buf = self.cache.read(blkno, self.schema.magic, self.owner, self._decode)
        node = buf.obj
        if node.level != level:
            raise CorruptError(f"{self.schema.name} node", fmt.where(blkno, self.cache.block_size),
                               f"level {node.level}, expected {level}")
        return buf, node

    def node_blocks(self) -> list:
        """Every node block of the tree, root first (for freeing a tree or checking space)."""
        out = []

        def walk(blkno, level):
            out.append(blkno)
            if level:
                _, node = self._node(blkno, level)
                for child in node.ptrs:
                    walk(child, level - 1)
        walk(self.root.root_blk, self.root.level)
        return out

    def _key(self, rec) -> tuple:
        return rec[:self._nk]

    def _descend(self, key: tuple, tx=None):
        """Path [(buf, node, idx)] from the root to the leaf where ``key`` belongs.

        With ``tx`` (insert), a key below a node's first key lowers that key, so keys[0]
        stays equal to the parent's separator along the leftmost path.
        """
        blkno, level = self.root.root_blk, self.root.level
        path = []
        while True:
            buf, node = self._node(blkno, level)
            if level == 0:
                path.append((buf, node, -1))
                return path
            keys = node.items
            idx = bisect_right(keys, key) - 1
            if idx < 0:
                idx = 0
                if tx is not None:
                    tx.log_buf(buf)
                    keys[0] = key
                    node.stale = True
            path.append((buf, node, idx))
            blkno = node.ptrs[idx]
            level -= 1

    def _leaf_pos(self, node, key, right=False) -> int:
        """First record whose key is >= ``key`` (``right``: > ``key``).

        Records compare as tuples, and a key is a prefix of its record, so a bare key sorts
        before every record with that key and ``key + (inf,)`` after all of them: both
        searches run on the records themselves, without a key function.
        """
        if not right:
            return bisect_left(node.items, key)
        if self._kf is None:
            return bisect_right(node.items, key)
        return bisect_right(node.items, key + _INF)

    def _step_leaf(self, path, forward: bool):
        """Move ``path`` to the next (or previous) leaf; False at the end of the tree."""
        depth = len(path) - 1
        # Find the lowest ancestor with a sibling in the wanted direction.
        while depth > 0:
            buf, node, idx = path[depth - 1]
            nidx = idx + 1 if forward else idx - 1
            if 0 <= nidx < len(node.ptrs):
                path[depth - 1] = (buf, node, nidx)
                break
            depth -= 1
        else:
            return False
        level = path[depth - 1][1].level - 1
        blkno = path[depth - 1][1].ptrs[path[depth - 1][2]]
        del path[depth:]
        while True:
            buf, node = self._node(blkno, level)
            if level == 0:
                path.append((buf, node, -1))
                return True
            idx = 0 if forward else len(node.ptrs) - 1
            path.append((buf, node, idx))
            blkno = node.ptrs[idx]
            level -= 1

    # -- queries ------------------------------------------------------------------------

    def lookup(self, key):
        """The record with exactly ``key``, or None."""
        key = _as_key(key)
        node = self._descend(key)[-1][1]
        pos = self._leaf_pos(node, key)
        if pos < len(node.items) and self._key(node.items[pos]) == key:
            return node.items[pos]
        return None

    def lookup_ge(self, key):
        """The record with the smallest key >= ``key``, or None."""
        key = _as_key(key)
        path = self._descend(key)
        while True:
            node = path[-1][1]
            pos = self._leaf_pos(node, key)
            if pos < len(node.items):
                return node.items[pos]
            if not self._step_leaf(path, True):
                return None
            key = ()                       # anything in the next leaf qualifies

    def lookup_le(self, key):
        """The record with the largest key <= ``key``, or None."""
        key = _as_key(key)
        path = self._descend(key)
        node = path[-1][1]
        pos = self._leaf_pos(node, key, right=True) - 1
        while pos < 0:
            if not self._step_leaf(path, False):
                return None
            node = path[-1][1]
            pos = len(node.items) - 1
        return node.items[pos]

    def lookup_lt(self, key):
        """The record with the largest key < ``key``, or None."""
        key = _as_key(key)
        path = self._descend(key)
        node = path[-1][1]
        pos = self._leaf_pos(node, key) - 1
        while pos < 0:
            if not self._step_leaf(path, False):
                return None
            node = path[-1][1]
            pos = len(node.items) - 1
        return node.items[pos]

    def iterate(self, lo=None, hi=None, *, reverse: bool = False):
        """Records with ``lo <= key < hi`` (either bound may be None), in key order
        (descending with ``reverse``).  Do not modify the tree while iterating."""
        lo = None if lo is None else _as_key(lo)
        hi = None if hi is None else _as_key(hi)
        if not reverse:
            path = self._descend(lo if lo is not None else ())
            pos = self._leaf_pos(path[-1][1], lo) if lo is not None else 0
            while True:
                items = path[-1][1].items
                for i in range(pos, len(items)):
                    rec = items[i]
                    if hi is not None and self._key(rec) >= hi:
                        return
                    yield rec
                if not self._step_leaf(path, True):
                    return
                pos = 0
        else:
            if hi is not None:
                path = self._descend(hi)
                pos = self._leaf_pos(path[-1][1], hi) - 1
            else:
                path = self._descend_last()
                pos = len(path[-1][1].items) - 1
            while True:
                items = path[-1][1].items
                for i in range(pos, -1, -1):
                    rec = items[i]
                    if lo is not None and self._key(rec) < lo:
                        return
                    yield rec
                if not self._step_leaf(path, False):
                    return
                pos = len(path[-1][1].items) - 1

    def _descend_last(self):
        blkno, level = self.root.root_blk, self.root.level
        path = []
        while True:
            buf, node = self._node(blkno, level)
            if level == 0:
                path.append((buf, node, -1))
                return path
            idx = len(node.ptrs) - 1
            path.append((buf, node, idx))
            blkno = node.ptrs[idx]
            level -= 1

    def first(self):
        return next(self.iterate(), None)

    def last(self):
        return next(self.iterate(reverse=True), None)

    def __iter__(self):
        return self.iterate()

    def count(self) -> int:
        return sum(1 for _ in self.iterate())

    # -- updates ------------------------------------------------------------------------

    def insert(self, tx, rec: tuple) -> None:
        """Insert ``rec``; ExistsError if its key is present."""
        key = self._key(rec)
        path = self._descend(key, tx)
        buf, node, _ = path[-1]
        pos = self._leaf_pos(node, key)
        if pos < len(node.items) and self._key(node.items[pos]) == key:
            raise ExistsError(f"{self.schema.name}: key {key} exists")
        tx.log_buf(buf)
        node.leaf_insert(pos, rec)
        if len(node.items) > self.max_leaf:
            self._split(tx, path)

    def update(self, tx, rec: tuple) -> tuple:
        """Replace the record with ``rec``'s key; return the old one (NotFoundError if none)."""
        key = self._key(rec)
        buf, node, _ = self._descend(key)[-1]
        pos = self._leaf_pos(node, key)
        if pos >= len(node.items) or self._key(node.items[pos]) != key:
            raise NotFoundError(f"{self.schema.name}: key {key} not found")
        tx.log_buf(buf)
        old = node.items[pos]
        node.leaf_set(pos, rec)
        return old

    def delete(self, tx, key) -> tuple:
        """Delete and return the record with ``key`` (NotFoundError if none)."""
        key = _as_key(key)
        path = self._descend(key)
        buf, node, _ = path[-1]
        pos = self._leaf_pos(node, key)
        if pos >= len(node.items) or self._key(node.items[pos]) != key:
            raise NotFoundError(f"{self.schema.name}: key {key} not found")
        tx.log_buf(buf)
        rec = node.leaf_pop(pos)
        self._rebalance(tx, path)
        return rec

    def _split(self, tx, path) -> None:
        depth = len(path) - 1
        while True:
            buf, node, _ = path[depth]
            n = len(node.items)
            limit = self.max_leaf if node.level == 0 else self.max_node
            if n <= limit:
                return
            half = n // 2
            new_blk = self.alloc_block(tx)
            nbuf = tx.new_buf(new_blk, self.schema.magic, self.owner)
            right = Node(self.schema, node.level, node.items[half:],
                         None if node.level == 0 else node.ptrs[half:])
            nbuf.obj = right
            del node.items[half:]
            if node.level:
                del node.ptrs[half:]
            node.stale = True
            sep = self._key(right.items[0]) if node.level == 0 else right.items[0]
            if depth == 0:
                # Root split: a new root above the two halves.
                left_key = self._key(node.items[0]) if node.level == 0 else node.items[0]
                if node.level == 0 and not node.items:
                    raise InvariantError("split of an empty leaf")
                root_blk = self.alloc_block(tx)
                rbuf = tx.new_buf(root_blk, self.schema.magic, self.owner)
                rbuf.obj = Node(self.schema, node.level + 1, [left_key, sep], [buf.blkno, new_blk])
                self.root.set_root(tx, root_blk, node.level + 1)
                return
            pbuf, parent, pidx = path[depth - 1]
            tx.log_buf(pbuf)
            parent.items.insert(pidx + 1, sep)
            parent.ptrs.insert(pidx + 1, new_blk)
            parent.stale = True
            depth -= 1

    def _rebalance(self, tx, path) -> None:
        depth = len(path) - 1
        while depth > 0:
            buf, node, _ = path[depth]
            leaf = node.level == 0
            minimum = self.min_leaf if leaf else self.min_node
            if len(node.items) >= minimum:
                return
            pbuf, parent, pidx = path[depth - 1]
            if pidx > 0:
                lidx = pidx - 1
                lblk = parent.ptrs[lidx]
                lbuf, left = self._node(lblk, node.level)
                rbuf, right, ridx = buf, node, pidx
            else:
                ridx = pidx + 1
                if ridx >= len(parent.ptrs):
                    return                   # only child of a non-root: fixed at the parent
                rbuf, right = self._node(parent.ptrs[ridx], node.level)
                lbuf, left, lidx = buf, node, pidx
            tx.log_buf(lbuf)
            tx.log_buf(rbuf)
            tx.log_buf(pbuf)
            left.stale = right.stale = parent.stale = True
            limit = self.max_leaf if leaf else self.max_node
            total = len(left.items) + len(right.items)
            if total <= limit:
                left.items.extend(right.items)
                if not leaf:
                    left.ptrs.extend(right.ptrs)
                right.items = []
                del parent.items[ridx]
                del parent.ptrs[ridx]
                tx.free_buf(rbuf.blkno)
                self.free_block(tx, rbuf.blkno)
                depth -= 1
                continue
            half = total // 2
            items = left.items + right.items
            left.items, right.items = items[:half], items[half:]
            if not leaf:
                ptrs = left.ptrs + right.ptrs
                left.ptrs, right.ptrs = ptrs[:half], ptrs[half:]
            parent.items[ridx] = self._key(right.items[0]) if leaf else right.items[0]
            return
        # At the root: an internal root with one child gives way to the child.
        buf, node, _ = path[0]
        while node.level > 0 and len(node.ptrs) == 1:
            child_blk = node.ptrs[0]
            child_level = node.level - 1
            tx.log_buf(buf)
            tx.free_buf(buf.blkno)
            self.free_block(tx, buf.blkno)
            self.root.set_root(tx, child_blk, child_level)
            buf, node = self._node(child_blk, child_level)

    # -- verification -------------------------------------------------------------------

    def check(self) -> int:
        """Verify the whole tree (order, bounds, levels, fill); return the record count."""
        seen = set()
        count = 0
        bs = self.cache.block_size

        def walk(blkno, level, lo, hi, is_root):
            nonlocal count
            if blkno in seen:
                raise CorruptError(f"{self.schema.name} node", fmt.where(blkno, bs), "block referenced twice")
            seen.add(blkno)
            _, node = self._node(blkno, level)
            loc = fmt.where(blkno, bs)
            keys = [self._key(r) for r in node.items] if level == 0 else node.items
            for k in keys:
                if (lo is not None and k < lo) or (hi is not None and k >= hi):
                    raise CorruptError(f"{self.schema.name} node", loc, f"key {k} outside [{lo}, {hi})")
            if not is_root:
                minimum = self.min_leaf if level == 0 else self.min_node
                if len(keys) < minimum:
                    raise CorruptError(f"{self.schema.name} node", loc, f"underfull ({len(keys)})")
            if level == 0:
                count += len(keys)
                return
            if lo is not None and keys[0] != lo:
                raise CorruptError(f"{self.schema.name} node", loc, "first key differs from the separator")
            for i, child in enumerate(node.ptrs):
                walk(child, level - 1, keys[i], keys[i + 1] if i + 1 < len(keys) else hi, False)

        walk(self.root.root_blk, self.root.level, None, None, True)
        return count


# -- offline construction and salvage (fsck/repair) ---------------------------------------------
#
# These work on raw block images, not through the buffer cache or a transaction: the repair
# tool decides every block's fate first and writes the results in one go.

def _split_even(items: list, nparts: int) -> list:
    """``items`` cut into ``nparts`` consecutive runs whose lengths differ by at most one."""
    q, r = divmod(len(items), nparts)
    out = []
    pos = 0
    for i in range(nparts):
        n = q + (1 if i < r else 0)
        out.append(items[pos:pos + n])
        pos += n
    return out


def _level_widths(schema: fmt.BtreeSchema, block_size: int, nrecs: int) -> list:
    """Nodes per level (leaves first) of a tree built by ``bulk_build`` over ``nrecs``."""
    max_leaf = schema.leaf_maxrecs(block_size)
    max_node = schema.node_maxrecs(block_size)
    widths = [max(1, -(-nrecs // max_leaf))]
    while widths[-1] > 1:
        widths.append(-(-widths[-1] // max_node))
    return widths


def bulk_nodes_needed(schema: fmt.BtreeSchema, block_size: int, nrecs: int) -> int:
    """Blocks ``bulk_build`` needs for ``nrecs`` records (at least one: an empty leaf root)."""
    return sum(_level_widths(schema, block_size, nrecs))


def bulk_level(schema: fmt.BtreeSchema, block_size: int, nrecs: int) -> int:
    """The root level (height - 1) of the tree ``bulk_build`` makes over ``nrecs`` records."""
    return len(_level_widths(schema, block_size, nrecs)) - 1


def bulk_build(schema: fmt.BtreeSchema, records: list, block_size: int, blocks: list,
               owner: int, uuid: bytes) -> tuple[int, int, dict]:
    """Build a whole tree over ``records`` (sorted, unique keys) in the given node blocks.

    ``blocks`` must hold exactly ``bulk_nodes_needed`` block numbers.  Nodes of one level
    share the records evenly (so every non-root node is at least half full, above the
    one-third minimum); the root is the single node of the top level.  Returns
    ``(root_blk, level, {blkno: block image})`` with headers stamped and CRCs set.
    """
    widths = _level_widths(schema, block_size, len(records))
    if len(blocks) != sum(widths):
        raise InvariantError(f"bulk_build of {len(records)} records needs {sum(widths)} blocks, "
                             f"got {len(blocks)}")
    nk = schema.nkey
    for i in range(1, len(records)):
        if tuple(records[i - 1][:nk]) >= tuple(records[i][:nk]):
            raise InvariantError(f"bulk_build: {schema.name} records not in key order at {i}")
    images = {}
    it = iter(blocks)
    # (first key, block) of every node of the level just built
    below = []
    for part in _split_even(list(records), widths[0]):
        blk = next(it)
        data = fmt.new_block(block_size, schema.magic, blk, owner, uuid)
        schema.encode_node(data, 0, [tuple(r) for r in part], None)
        fmt.set_block_crc(data)
        images[blk] = bytes(data)
        below.append((tuple(part[0][:nk]) if part else (), blk))
    level = 0
    for width in widths[1:]:
        level += 1
        nodes = []
        for part in _split_even(below, width):
            blk = next(it)
            data = fmt.new_block(block_size, schema.magic, blk, owner, uuid)
            schema.encode_node(data, level, [k for k, _ in part], [b for _, b in part])
            fmt.set_block_crc(data)
            images[blk] = bytes(data)
            nodes.append((part[0][0], blk))
        below = nodes
    return below[0][1], level, images


def salvage_walk(read_block, schema: fmt.BtreeSchema, root_blk: int, level: int, owner: int,
                 uuid: bytes, block_size: int, total_blk: int):
    """Walk a tree without trusting it: ``(records, node_blocks, problems)``.

    ``read_block(blkno) -> bytes``.  Every node is verified (header: magic, CRC, self
    number, UUID, owner; body: counts and key order; level; keys inside the bounds its
    parent gives; fill; no block reached twice).  A node failing the header or body checks
    is skipped with its whole subtree; records of nodes that verified are kept even when a
    bound or fill rule is broken (they are still this tree's records), in walk order: the
    caller sorts and removes duplicate keys.  ``node_blocks`` are the blocks that verified
    as this tree's nodes; ``problems`` one line each (empty: the tree is sound); ``lost``
    ``(blkno, lo_key, hi_key)`` for each skipped subtree (its records are missing; the keys
    bound them, None: unbounded).  Returns ``(records, node_blocks, problems, lost)``.
    """
    records: list = []
    nodes: list = []
    problems: list = []
    lost: list = []
    seen: set = set()
    max_leaf = schema.leaf_maxrecs(block_size)
    max_node = schema.node_maxrecs(block_size)
    nk = schema.nkey

    def walk(blkno, lvl, lo, hi, is_root):
        loc = fmt.where(blkno, block_size) if 0 <= blkno < total_blk else f"block {blkno}"
        if not 0 <= blkno < total_blk:
            problems.append(f"{schema.name} node at {loc}: pointer outside the filesystem")
            lost.append((blkno, lo, hi))
            return
        if blkno in seen:
            problems.append(f"{schema.name} node at {loc}: block referenced twice")
            return
        seen.add(blkno)
        try:
            data = read_block(blkno)
            fmt.check_block(data, schema.magic, blkno, uuid, owner, block_size)
            nlevel, items, ptrs = schema.decode_node(data, blkno)
        except (CorruptError, OSError) as e:
            problems.append(getattr(e, "strerror", None) or str(e))
            lost.append((blkno, lo, hi))
            return
        if nlevel != lvl:
            problems.append(f"{schema.name} node at {loc}: level {nlevel}, expected {lvl}")
            lost.append((blkno, lo, hi))
            return
        nodes.append(blkno)
        keys = [tuple(r[:nk]) for r in items] if lvl == 0 else [tuple(k) for k in items]
        bad = [k for k in keys if (lo is not None and k < lo) or (hi is not None and k >= hi)]
        if bad:
            problems.append(f"{schema.name} node at {loc}: key {bad[0]} outside [{lo}, {hi})")
        if not is_root:
            minimum = max(1, max_leaf // 3) if lvl == 0 else max(2, max_node // 3)
            if len(keys) < minimum:
                problems.append(f"{schema.name} node at {loc}: underfull ({len(keys)})")
        if lvl == 0:
            records.extend(tuple(r) for r in items)
            return
        if lo is not None and keys and keys[0] != lo:
            problems.append(f"{schema.name} node at {loc}: first key differs from the separator")
        for i, child in enumerate(ptrs):
            walk(child, lvl - 1, keys[i], keys[i + 1] if i + 1 < len(keys) else hi, False)

    walk(root_blk, level, None, None, True)
    return records, nodes, problems, lost

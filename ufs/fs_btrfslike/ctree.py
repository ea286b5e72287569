"""The copy-on-write B-tree of btrfslike, and its node cache.

Layer: personality.  Imports ``ufs.errors`` and ``.format`` only.  The block allocator and the
reference counts are reached through ``fs.extents`` (an ``extent_tree.ExtentTree``; duck-typed
so that this module does not import the module built on top of it).

One implementation serves every tree (root, extent, fs trees and snapshots, csum).  Keys are
``(objectid, type, offset)`` tuples; leaves hold opaque ``bytes`` payloads.

Copy-on-write (the "shadowing" scheme of Rodeh's *B-trees, Shadowing, and Clones*):
- Every node has a reference count kept by the extent tree: the number of parent pointers plus
  tree roots (ROOT_ITEM or superblock) that point at it.
- A node may be changed in place only if it was created in the running transaction
  (``generation == transid``) by this tree (``owner``) and is not shared.  Otherwise the first modification copies it to
  a new block (``_cow``) and the parent (itself already copied) is repointed:
  * refcount 1 (only this tree): the copy inherits the children, the old block's count drops
    to 0 and it is freed (its address becomes reusable once the commit is durable);
  * refcount > 1 (shared with a snapshot): the copy takes one new reference on every child
    (tree blocks) or every data extent its EXTENT_DATA items point at (leaves), and the old
    block loses the one reference this tree's parent held.
- A snapshot is a new tree whose root pointer is the source's root node, plus one reference.
  Dropping a tree (``drop``) removes one reference from its root; a node reaching 0 drops its
  children in turn, a leaf reaching 0 drops its data extents.
- Shortcut: a node can be shared only in a tree flagged shareable and only if it is not newer
  than the tree's ``last_snapshot`` generation; every other node is known to have refcount 1
  without asking the extent tree.
- Data back-references name the tree that owns the leaf holding the EXTENT_DATA item (the
  leaf's header owner).  When a tree copies a leaf that another tree created, the references
  move to the new owner.

Structure: leaves split when their items exceed the node, into balanced halves (or, when the
new item went to the end, a full left part and the new item alone: sequential inserts pack
leaves full); internal nodes likewise.  After a deletion a node under a quarter full is merged
into a sibling when both fit in one node; an empty node is removed; a root with one child is
replaced by the child.  A parent's key for child ``i`` always equals the child's first key.

Locking: none here.  The caller (the transaction manager's user) serialises modifications of
a tree; readers must not run concurrently with a writer of the same tree.

Node cache: ``NodeCache`` holds the running transaction's dirty nodes (pinned until commit
writes them) and an LRU of clean decoded nodes capped at ``max_nodes``.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import OrderedDict
from itertools import pairwise

from ufs.errors import (
    CorruptError,
    ExistsError,
    InvalidError,
    InvariantError,
    NotFoundError,
)

from . import format as fmt
from .format import (
    EXTENT_DATA,
    FILE_EXTENT_INLINE,
    HEADER_SIZE,
    ITEM_SIZE,
    KEY_MIN,
    key_successor,
)

__all__ = ["BTree", "Node", "NodeCache", "Path", "leaf_data_refs"]

U64_MASK = (1 << 64) - 1


class Node:
    """A tree node in memory.  Leaves use ``keys``/``datas``; internal nodes ``keys``/``ptrs``/
    ``gens``.  ``used`` is the leaf's item-header + data bytes."""

    __slots__ = ("bytenr", "datas", "generation", "gens", "keys", "level", "owner", "ptrs", "used")

    def __init__(self, bytenr, generation, owner, level, keys, datas=None, ptrs=None, gens=None):
        self.bytenr, self.generation, self.owner, self.level = bytenr, generation, owner, level
        self.keys = keys
        self.datas, self.ptrs, self.gens = datas, ptrs, gens
        self.used = ITEM_SIZE * len(keys) + sum(map(len, datas)) if level == 0 else 0

    def copy(self, bytenr, generation, owner):
        if self.level == 0:
            n = Node(bytenr, generation, owner, 0, list(self.keys), list(self.datas))
        else:
            n = Node(bytenr, generation, owner, self.level, list(self.keys),
                     ptrs=list(self.ptrs), gens=list(self.gens))
        return n

    @property
    def nritems(self):
        return len(self.keys)

    def encode(self, fsid, nodesize):
        return fmt.encode_node(fsid, nodesize, self.bytenr, self.generation, self.owner,
                               self.level, self.keys, self.datas, self.ptrs, self.gens)

    def __repr__(self):
        return (f"Node({self.bytenr:#x} gen={self.generation} owner={self.owner} "
                f"level={self.level} n={len(self.keys)})")


class NodeCache:
    """Decoded nodes by address: dirty ones (this transaction) and a capped LRU of clean ones."""

    def __init__(self, dev, fsid, nodesize, max_nodes=4096):
        self.dev, self.fsid, self.nodesize, self.max_nodes = dev, fsid, nodesize, max_nodes
        self.dirty = {}
        self.clean = OrderedDict()
        self.reads = 0

    def read(self, bytenr, generation, level, owner=None):
        """The node at ``bytenr``, verified against what its parent recorded."""
        node = self.dirty.get(bytenr)
        if node is None:
            node = self.clean.get(bytenr)
            if node is not None:
                self.clean.move_to_end(bytenr)
        if node is not None:
            if node.generation != generation or node.level != level:
                raise CorruptError("tree node", f"{bytenr:#x}",
                                   f"cached gen {node.generation} level {node.level}, parent "
                                   f"expects gen {generation} level {level}")
            return node
        buf = self.dev.pread(self.nodesize, bytenr)
        self.reads += 1
        d = fmt.decode_node(buf, bytenr, fsid=self.fsid, nodesize=self.nodesize,
                            generation=generation, level=level, owner=owner)
        node = Node(d.bytenr, d.generation, d.owner, d.level, d.keys, d.datas, d.ptrs, d.gens)
        self._insert_clean(node)
        return node

    def _insert_clean(self, node):
        self.clean[node.bytenr] = node
        if len(self.clean) > self.max_nodes:
            self.clean.popitem(last=False)

    def add_dirty(self, node):
        self.clean.pop(node.bytenr, None)
        self.dirty[node.bytenr] = node

    def forget(self, bytenr):
        """The block was freed: drop any decoded copy (its address will be reused)."""
        self.dirty.pop(bytenr, None)
        self.clean.pop(bytenr, None)

    def committed(self):
        """After the commit wrote them, dirty nodes become clean cache entries."""
        for node in self.dirty.values():
            self._insert_clean(node)
        self.dirty = {}

    def drop_all(self):
        self.dirty = {}
        self.clean.clear()


def leaf_data_refs(node):
    """``[(disk_bytenr, disk_num_bytes, objectid, extent_key_offset)]`` for each EXTENT_DATA item
    of leaf ``node`` that points at a data extent (regular or prealloc, not a hole).

    ``extent_key_offset`` is the back-reference offset: the file position where the extent's
    byte 0 would be (``key.offset - item.offset``), as btrfs does, so the items a split of one
    file extent produces share one back-reference.
    """
    out = []
    keys, datas = node.keys, node.datas
    for i, k in enumerate(keys):
        if k[1] != EXTENT_DATA:
            continue
        fe = fmt.DiskFileExtent.decode(datas[i], f"node {node.bytenr:#x} item {i}")
        if fe.type != FILE_EXTENT_INLINE and fe.disk_bytenr:
            # modulo 2^64: a reflinked piece may sit at a file position below its extent
            # offset (btrfs lets the u64 wrap the same way)
            out.append((fe.disk_bytenr, fe.disk_num_bytes, k[0], (k[2] - fe.offset) & U64_MASK))
    return out


class Path:
    """A root-to-leaf position: ``nodes[level]`` and ``slots[level]``, level 0 the leaf.

    A path read without a transaction stays valid only until the tree is modified.
    """

    __slots__ = ("nodes", "slots", "tree")

    def __init__(self, tree, nodes, slots):
        self.tree, self.nodes, self.slots = tree, nodes, slots

    @property
    def leaf(self):
        return self.nodes[0]

    @property
    def slot(self):
        return self.slots[0]

    def valid(self):
        return self.slots[0] < len(self.nodes[0].keys)

    def key(self):
        return self.nodes[0].keys[self.slots[0]]

    def data(self):
        return self.nodes[0].datas[self.slots[0]]

    def next_leaf(self):
        """Move to the first item of the next leaf; False at the end of the tree."""
        tree = self.tree
        level = 1
        top = len(self.nodes) - 1
        while level <= top:
            node = self.nodes[level]
            if self.slots[level] + 1 < len(node.keys):
                self.slots[level] += 1
                break
            level += 1
        else:
            self.slots[0] = len(self.nodes[0].keys)
            return False
        while level > 0:
            node = self.nodes[level]
            s = self.slots[level]
            child = tree._read_child(node, s)
            level -= 1
            self.nodes[level] = child
            self.slots[level] = 0
        return True

    def next(self):
        """Advance to the next item (crossing leaves); False at the end."""
        self.slots[0] += 1
        while self.slots[0] >= len(self.nodes[0].keys):
            if not self.next_leaf():
                return False
        return True


class BTree:
    """One copy-on-write B-tree.

    ``fs`` provides ``cache`` (NodeCache), ``extents`` (ExtentTree), ``nodesize``.
    ``root_bytenr``/``root_gen``/``level`` locate the root node; they change when the root is
    copied, split or collapsed (``root_changed`` is then set until the owner records it).
    """

    def __init__(self, fs, tree_id, root_bytenr, root_gen, level, *, shareable=False,
                 last_snapshot=0):
        self.fs = fs
        self.tree_id = tree_id
        self.root_bytenr, self.root_gen, self.level = root_bytenr, root_gen, level
        self.shareable = shareable
        self.last_snapshot = last_snapshot
        self.root_changed = False
        ns = fs.nodesize
        self.leaf_cap = ns - HEADER_SIZE
        self.max_ptrs = fmt.node_max_items(ns)
        self.max_item = fmt.max_item_size(ns)

    # ------------------------------------------------------------------ reading

    def root_node(self):
        return self.fs.cache.read(self.root_bytenr, self.root_gen, self.level)

    def _read_child(self, node, slot):
        return self.fs.cache.read(node.ptrs[slot], node.gens[slot], node.level - 1)

    def search(self, key):
        """``(found, path)``: the path to ``key``, or to where it would be inserted."""
        node = self.root_node()
        nodes = [None] * (node.level + 1)
        slots = [0] * (node.level + 1)
        cache_read = self.fs.cache.read
        while node.level:
            s = bisect_right(node.keys, key) - 1
            s = max(s, 0)
            nodes[node.level], slots[node.level] = node, s
            node = cache_read(node.ptrs[s], node.gens[s], node.level - 1)
        s = bisect_left(node.keys, key)
        nodes[0], slots[0] = node, s
        return s < len(node.keys) and node.keys[s] == key, Path(self, nodes, slots)

    def lookup(self, key):
        """The payload of ``key``, or None."""
        found, path = self.search(key)
        return path.data() if found else None

    def next_item(self, key):
        """``(key, data)`` of the first item with key >= ``key``, or None."""
        _found, path = self.search(key)
        if not path.valid() and not path.next_leaf():
            return None
        return path.key(), path.data()

    def prev_item(self, key):
        """``(key, data)`` of the last item with key <= ``key``, or None."""
        found, path = self.search(key)
        if found:
            return path.key(), path.data()
        leaf, s = path.leaf, path.slot
        if s > 0:
            return leaf.keys[s - 1], leaf.datas[s - 1]
        # The item before the first of this leaf lives in the previous leaf: search its last key.
        lvl = 1
        while lvl < len(path.nodes) and path.slots[lvl] == 0:
            lvl += 1
        if lvl >= len(path.nodes):
            return None
        node, s = path.nodes[lvl], path.slots[lvl] - 1
        while node.level:
            node = self._read_child(node, s)
            s = len(node.keys) - 1
        return (node.keys[s], node.datas[s]) if s >= 0 else None

    def items(self, start=KEY_MIN, end=None):
        """Yield ``(key, data)`` for ``start <= key < end`` in key order.

        Robust against modifications between yields: each leaf's items are copied, and the next
        leaf is found by a fresh search after the last key seen.  So every item present from
        start to end is yielded once, in order; one inserted meanwhile after the current key
        may or may not be; a deleted one may still be yielded if its leaf was already copied.
        """
        key = start
        while key is not None:
            _found, path = self.search(key)
            leaf, s = path.leaf, path.slot
            if s >= len(leaf.keys):
                if not path.next_leaf():
                    return
                leaf, s = path.leaf, 0
            keys = leaf.keys[s:]
            datas = leaf.datas[s:]
            for k, d in zip(keys, datas):
                if end is not None and k >= end:
                    return
                yield k, d
            key = key_successor(keys[-1])

    def count(self):
        return sum(1 for _ in self.items())

    # ------------------------------------------------------------------ copy-on-write

    def _is_shared(self, node):
        if not self.shareable or node.generation > self.last_snapshot:
            return False
        return self.fs.extents.tree_block_refs(node.bytenr) > 1

    def _cow(self, trans, node, parent, pslot):
        """The writable version of ``node`` (itself, or a copy repointed from ``parent``)."""
        shared = self._is_shared(node)
        # In place only if written in this transaction, by this tree, and not shared.  A node
        # another tree created is copied even when unshared, so that a leaf's owner is always
        # the tree that last changed it (callers name that tree in data back-references).
        if node.generation == trans.transid and node.owner == self.tree_id and not shared:
            return node
        ext = self.fs.extents
        new_bytenr = ext.alloc_tree_block(trans, self.tree_id, node.level)
        new = node.copy(new_bytenr, trans.transid, self.tree_id)
        if node.level == 0:
            new.used = node.used
        if shared:
            if node.level:
                for p in node.ptrs:
                    ext.inc_tree_ref(trans, p)
            else:
                for bytenr, nbytes, oid, off in leaf_data_refs(node):
                    ext.inc_data_ref(trans, bytenr, nbytes, self.tree_id, oid, off)
            ext.dec_tree_ref(trans, node.bytenr)
        else:
            if node.level == 0 and node.owner != self.tree_id:
                for bytenr, nbytes, oid, off in leaf_data_refs(node):
                    ext.move_data_ref(trans, bytenr, nbytes, node.owner, self.tree_id, oid, off)
            self._free_block(trans, node.bytenr)
        self.fs.cache.add_dirty(new)
        if parent is None:
            self._set_root(new)
        else:
            parent.ptrs[pslot] = new_bytenr
            parent.gens[pslot] = trans.transid
        return new

    def _free_block(self, trans, bytenr):
        """Drop the last reference of a block this tree owns alone (its children move on).

        No refcount lookup: the caller knows the block is unshared (it was just copied or is
        this transaction's own), which also keeps the extent tree from searching itself in
        the middle of its own modification.
        """
        self.fs.extents.free_tree_block(trans, bytenr)
        self.fs.cache.forget(bytenr)

    def _set_root(self, node):
        self.root_bytenr, self.root_gen, self.level = node.bytenr, node.generation, node.level
        self.root_changed = True

    def _new_node(self, trans, level, keys, datas=None, ptrs=None, gens=None):
        bytenr = self.fs.extents.alloc_tree_block(trans, self.tree_id, level)
        node = Node(bytenr, trans.transid, self.tree_id, level, keys, datas, ptrs, gens)
        self.fs.cache.add_dirty(node)
        return node

    def search_for_write(self, trans, key):
        """``(found, path)`` with every node of the path writable (copied as needed)."""
        self._check_trans(trans)
        node = self._cow(trans, self.root_node(), None, 0)
        nodes = [None] * (node.level + 1)
        slots = [0] * (node.level + 1)
        while node.level:
            s = bisect_right(node.keys, key) - 1
            s = max(s, 0)
            nodes[node.level], slots[node.level] = node, s
            node = self._cow(trans, self._read_child(node, s), node, s)
        s = bisect_left(node.keys, key)
        nodes[0], slots[0] = node, s
        return s < len(node.keys) and node.keys[s] == key, Path(self, nodes, slots)

    def _check_trans(self, trans):
        if trans is None or not trans.running:
            raise InvariantError(f"tree {self.tree_id}: modification outside a running transaction")

    # ------------------------------------------------------------------ item operations

    def insert(self, trans, key, data):
        """Insert a new item; ``ExistsError`` if ``key`` is present."""
        data = bytes(data)
        if len(data) > self.max_item:
            raise InvalidError(f"item of {len(data)} bytes > {self.max_item}")
        found, path = self.search_for_write(trans, key)
        if found:
            raise ExistsError(f"tree {self.tree_id}: key {fmt.key_str(key)} exists")
        leaf, s = path.leaf, path.slot
        leaf.keys.insert(s, key)
        leaf.datas.insert(s, data)
        leaf.used += ITEM_SIZE + len(data)
        if s == 0:
            self._fix_parent_keys(path, 0)
        if leaf.used > self.leaf_cap:
            self._split(trans, path, 0, s)

    def update(self, trans, key, data):
        """Replace the payload of an existing item (any new size: this is also item resize)."""
        data = bytes(data)
        if len(data) > self.max_item:
            raise InvalidError(f"item of {len(data)} bytes > {self.max_item}")
        found, path = self.search_for_write(trans, key)
        if not found:
            raise NotFoundError(f"tree {self.tree_id}: key {fmt.key_str(key)} not found")
        leaf, s = path.leaf, path.slot
        leaf.used += len(data) - len(leaf.datas[s])
        leaf.datas[s] = data
        if leaf.used > self.leaf_cap:
            self._split(trans, path, 0, s)
        else:
            self._rebalance(trans, path, 0)

    def put(self, trans, key, data):
        """Insert or replace."""
        try:
            self.insert(trans, key, data)
        except ExistsError:
            self.update(trans, key, data)

    def delete(self, trans, key):
        """Delete an item; ``NotFoundError`` if absent.  Returns the old payload."""
        found, path = self.search_for_write(trans, key)
        if not found:
            raise NotFoundError(f"tree {self.tree_id}: key {fmt.key_str(key)} not found")
        leaf, s = path.leaf, path.slot
        old = leaf.datas[s]
        del leaf.keys[s]
        del leaf.datas[s]
        leaf.used -= ITEM_SIZE + len(old)
        if s == 0 and leaf.keys:
            self._fix_parent_keys(path, 0)
        self._rebalance(trans, path, 0)
        return old

    def delete_range(self, trans, start, end):
        """Delete every item with ``start <= key < end``; returns how many."""
        n = 0
        for k, _ in list(self.items(start, end)):
            self.delete(trans, k)
            n += 1
        return n

    # ------------------------------------------------------------------ structure

    def _fix_parent_keys(self, path, level):
        """Make the parents' keys equal to the first key of ``path.nodes[level]``, upwards."""
        top = len(path.nodes) - 1
        while level < top:
            child = path.nodes[level]
            if not child.keys:
                return
            parent, ps = path.nodes[level + 1], path.slots[level + 1]
            if parent.keys[ps] == child.keys[0]:
                return
            parent.keys[ps] = child.keys[0]
            if ps != 0:
                return
            level += 1

    def _sizes(self, node):
        if node.level == 0:
            return [ITEM_SIZE + len(d) for d in node.datas]
        return [1] * len(node.keys)

    def _cap(self, level):
        return self.leaf_cap if level == 0 else self.max_ptrs

    def _partition(self, sizes, cap, hint):
        """Split points so that every part fits ``cap``: balanced halves, or all-but-last when
        the change was at the end (sequential inserts then fill nodes)."""
        n = len(sizes)
        total = sum(sizes)
        if total <= cap:
            return []
        if hint == n - 1 and total - sizes[-1] <= cap and n > 1:
            return [n - 1]
        best, best_i, acc = None, 1, 0
        for i in range(1, n):
            acc += sizes[i - 1]
            m = max(acc, total - acc)
            if best is None or m < best:
                best, best_i = m, i
        left = self._partition(sizes[:best_i], cap, -1)
        right = self._partition(sizes[best_i:], cap, -1)
        return left + [best_i] + [best_i + r for r in right]

    def _split(self, trans, path, level, hint):
        """``path.nodes[level]`` overflows: cut it into nodes that fit, add them to the parent."""
        node = path.nodes[level]
        cuts = self._partition(self._sizes(node), self._cap(level), hint)
        if not cuts:
            return
        bounds = [0] + cuts + [len(node.keys)]
        new_nodes = []
        for a, b in pairwise(bounds[1:]):
            if level == 0:
                nn = self._new_node(trans, 0, node.keys[a:b], node.datas[a:b])
            else:
                nn = self._new_node(trans, level, node.keys[a:b], ptrs=node.ptrs[a:b],
                                    gens=node.gens[a:b])
            new_nodes.append(nn)
        c0 = cuts[0]
        del node.keys[c0:]
        if level == 0:
            del node.datas[c0:]
            node.used = ITEM_SIZE * len(node.keys) + sum(map(len, node.datas))
        else:
            del node.ptrs[c0:]
            del node.gens[c0:]
        top = len(path.nodes) - 1
        if level == top:
            # The root split: a new root above it.
            allp = [node] + new_nodes
            root = self._new_node(trans, level + 1, [x.keys[0] for x in allp],
                                  ptrs=[x.bytenr for x in allp],
                                  gens=[x.generation for x in allp])
            self._set_root(root)
            if root.level >= fmt.MAX_LEVEL:
                raise InvariantError(f"tree {self.tree_id} deeper than {fmt.MAX_LEVEL} levels")
            return
        parent, ps = path.nodes[level + 1], path.slots[level + 1]
        for i, nn in enumerate(new_nodes, 1):
            parent.keys.insert(ps + i, nn.keys[0])
            parent.ptrs.insert(ps + i, nn.bytenr)
            parent.gens.insert(ps + i, nn.generation)
        if len(parent.keys) > self.max_ptrs:
            self._split(trans, path, level + 1, ps + len(new_nodes))

    def _underfull(self, node):
        if node.level == 0:
            return node.used < self.leaf_cap // 4
        return len(node.keys) < self.max_ptrs // 4

    def _fits_merged(self, a, b):
        if a.level == 0:
            return a.used + b.used <= self.leaf_cap
        return len(a.keys) + len(b.keys) <= self.max_ptrs

    def _rebalance(self, trans, path, level):
        """After items left ``path.nodes[level]``: remove it if empty, merge it if underfull."""
        top = len(path.nodes) - 1
        node = path.nodes[level]
        if level == top:
            # The root: an internal root with one child is replaced by that child.
            while node.level and len(node.keys) == 1:
                child = self._read_child(node, 0)
                self._set_root(child)
                self._free_block(trans, node.bytenr)
                node = child
            return
        parent, ps = path.nodes[level + 1], path.slots[level + 1]
        if not node.keys:
            self._free_block(trans, node.bytenr)
            del parent.keys[ps], parent.ptrs[ps], parent.gens[ps]
            if ps == 0 and parent.keys:
                self._fix_parent_keys(path, level + 1)
            self._rebalance(trans, path, level + 1)
            return
        if not self._underfull(node):
            return
        for sib_slot in (ps - 1, ps + 1):
            if not 0 <= sib_slot < len(parent.keys):
                continue
            sib = self._read_child(parent, sib_slot)
            if not self._fits_merged(node, sib):
                continue
            sib = self._cow(trans, sib, parent, sib_slot)
            left, right, rslot = (sib, node, ps) if sib_slot < ps else (node, sib, sib_slot)
            left.keys.extend(right.keys)
            if level == 0:
                left.datas.extend(right.datas)
                left.used += right.used
            else:
                left.ptrs.extend(right.ptrs)
                left.gens.extend(right.gens)
            self._free_block(trans, right.bytenr)
            del parent.keys[rslot], parent.ptrs[rslot], parent.gens[rslot]
            self._rebalance(trans, path, level + 1)
            return

    # ------------------------------------------------------------------ sharing

    def drop(self, trans):
        """Remove this tree's reference on its root; nodes reaching 0 release their children
        (and leaves their data extents).  The tree is unusable afterwards."""
        self._check_trans(trans)
        self._drop_ref(trans, self.root_bytenr, self.root_gen, self.level)
        self.root_bytenr = 0

    def _drop_ref(self, trans, bytenr, gen, level):
        ext = self.fs.extents
        if ext.dec_tree_ref(trans, bytenr) > 0:
            return
        # Last reference gone: the block is unreachable now but not yet reused (freed blocks
        # are reusable only after the commit), so it can still be read.
        node = self.fs.cache.read(bytenr, gen, level)
        if level:
            for p, g in zip(node.ptrs, node.gens):
                self._drop_ref(trans, p, g, level - 1)
        else:
            for dbytenr, nbytes, oid, off in leaf_data_refs(node):
                ext.dec_data_ref(trans, dbytenr, nbytes, node.owner, oid, off)
        self.fs.cache.forget(bytenr)

    # ------------------------------------------------------------------ verification

    def walk(self, visit=None):
        """Read every node, checking structure; returns the number of nodes.

        Checks (each a ``CorruptError`` with the node address): checksum, fsid, self address,
        level and generation against the parent pointer (done by the decoder); key order within
        a node; the parent's key equals the child's first key; every key of a child lies within
        its parent's bounds; non-root nodes are not empty.  ``visit(node)`` is called per node.
        """
        count = 0

        def rec(bytenr, gen, level, lo, hi, is_root):
            nonlocal count
            node = self.fs.cache.read(bytenr, gen, level)
            count += 1
            where = f"{bytenr:#x}"
            if not node.keys and not is_root:
                raise CorruptError("tree node", where, "empty non-root node")
            if node.keys:
                if node.keys[0] < lo or (hi is not None and node.keys[-1] >= hi):
                    raise CorruptError("tree node", where, "keys outside the parent's range")
                for a, b in zip(node.keys, node.keys[1:]):
                    if a >= b:
                        raise CorruptError("tree node", where, f"key order {fmt.key_str(a)}")
            if level == 0 and node.used > self.leaf_cap:
                raise CorruptError("tree node", where, "leaf overflows")
            if visit is not None:
                visit(node)
            if level:
                for i, (p, g) in enumerate(zip(node.ptrs, node.gens)):
                    child = self.fs.cache.read(p, g, level - 1)
                    if not child.keys or child.keys[0] != node.keys[i]:
                        raise CorruptError("tree node", f"{p:#x}",
                                           f"first key differs from parent {where} slot {i}")
                    nhi = node.keys[i + 1] if i + 1 < len(node.keys) else hi
                    rec(p, g, level - 1, node.keys[i], nhi, False)

        rec(self.root_bytenr, self.root_gen, self.level, KEY_MIN, None, True)
        return count

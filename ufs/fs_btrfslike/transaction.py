"""Transactions of btrfslike: mkfs, mount, start/commit, the tree of trees, metadata fsck.

Layer: personality.  Imports ``ufs.errors``, ``.format``, ``.ctree``, ``.extent_tree``,
``.tree_log`` (its ``TreeLog``: log space, no VFS).  The
device is duck-typed (``pread(length, addr)``, ``pwrite(buf, addr, *, fua=False)``,
``flush()``, ``size``, ``logical_block_size``), i.e. any ``ufs.iomap.bdev`` device.

Commit protocol (the only way anything reaches the device, data aside):
0. run ``pre_commit_hooks`` (the layer above writes its delayed inode/csum items);
1. loop until stable: write the ROOT_ITEM of every tree whose root moved (into the root tree),
   then apply the delayed references (which change the extent tree, whose root then moves);
2. write every dirty node (non-FUA; contiguous nodes coalesced into one write);
3. ``flush()`` the device: the whole new tree is durable before anything points at it;
4. write the superblock (generation = transid, root = the root tree's root, ``log_root``/
   ``log_id`` = a fresh area for the next transaction's fsync log, ``tree_log.TreeLog``) to
   each mirror in turn, each with FUA; this drops the previous fsync log;
5. only now return pinned (freed in this transaction) extents, and the dropped log's areas,
   to the free-space cache.
A crash before step 4 reaches any copy leaves the previous generation (its blocks were never
overwritten: step 5); after it, the new one (every node it reaches was flushed in step 3).  A
copy torn by the crash fails its checksum and mount takes the other copies.

Mount: read every superblock copy, try them newest generation first, keep the first whose
checksum verifies and whose root-tree root and extent-tree root nodes verify (checksum, fsid,
address, generation, level, owner).  A failed commit (any exception in steps 1-4) aborts the
manager: every later ``start``/``commit`` raises ``ReadOnlyError``; the device still holds the
last committed generation.

One transaction runs at a time: ``start()`` returns the running one (joining it) or opens the
next.  Locking: ``self.lock`` (an RLock) is held by ``commit``; callers that modify trees from
several threads hold it around their modifications too.
"""
from __future__ import annotations

import os
import threading

from ufs.errors import (
    CorruptError,
    ExistsError,
    InvalidError,
    InvariantError,
    NotFoundError,
    ReadOnlyError,
)

from . import format as fmt
from .ctree import BTree, NodeCache, leaf_data_refs
from .extent_tree import ExtentTree, FreeSpace
from .tree_log import TreeLog
from .format import (
    CSUM_TREE_ID,
    EXTENT_TREE_ID,
    FIRST_FREE_OBJECTID,
    FS_TREE_ID,
    ROOT_ITEM,
    ROOT_SHAREABLE,
    ROOT_TREE_ID,
    SB_SIZE,
    DiskRootItem,
    DiskSuperblock,
)

__all__ = ["Transaction", "TransactionManager", "fsck"]

WRITE_COALESCE_MAX = 1 << 20     # bytes per device write when flushing contiguous dirty nodes


class Transaction:
    """The running transaction: ``transid`` is the generation its commit will have."""

    __slots__ = ("manager", "running", "transid")

    def __init__(self, manager, transid):
        self.manager, self.transid, self.running = manager, transid, True

    def commit(self):
        return self.manager.commit(self)

    def __enter__(self):
        return self

    def __exit__(self, etype, exc, tb):
        if etype is None and self.running:
            self.manager.commit(self)

    def __repr__(self):
        return f"Transaction({self.transid}{'' if self.running else ', done'})"


class TransactionManager:
    """A mounted btrfslike metadata stack on one device.

    Attributes: ``dev``, ``sb`` (last committed ``DiskSuperblock``), ``generation``,
    ``nodesize``/``sectorsize``/``total_bytes``/``fsid``, ``cache`` (NodeCache), ``extents``
    (ExtentTree), ``root_tree`` (BTree), ``running`` (the open Transaction or None).
    """

    def __init__(self, dev, sb, *, cache_nodes=4096):
        self.dev = dev
        self.sb = sb
        self.generation = sb.generation
        self.nodesize, self.sectorsize = sb.nodesize, sb.sectorsize
        self.total_bytes, self.fsid = sb.total_bytes, sb.fsid
        self.cache = NodeCache(dev, sb.fsid, sb.nodesize, cache_nodes)
        self.lock = threading.RLock()
        self.running = None
        self.aborted = False
        self.trees = {}                 # tree id -> BTree (loaded or created), not the root tree
        self.root_items = {}            # tree id -> DiskRootItem as last written/read
        self.root_tree = BTree(self, ROOT_TREE_ID, sb.root, sb.generation, sb.root_level)
        self.extents = None
        self.commits = 0
        self.pre_commit_hooks = []      # fn(trans): last changes before the commit (inode layer)
        self.log = TreeLog(self)        # the fsync log of transaction generation + 1

    # ------------------------------------------------------------------ mkfs / mount

    @classmethod
    def mkfs(cls, dev, *, nodesize=16384, sectorsize=4096, fsid=None, cache_nodes=4096):
        """Write an empty filesystem: root, extent, fs (``FS_TREE_ID``, shareable, root dir
        objectid 256, no items yet) and csum trees, generation 1.  Returns it mounted."""
        lbs = getattr(dev, "logical_block_size", 512)
        total = dev.size // sectorsize * sectorsize
        if lbs > sectorsize or sectorsize % lbs or SB_SIZE % lbs:
            raise InvalidError(f"device block size {lbs} does not fit sectorsize {sectorsize}")
        if nodesize < sectorsize:
            raise InvalidError(f"nodesize {nodesize} < sectorsize {sectorsize}")
        sb = DiskSuperblock(fsid=fsid or os.urandom(16), generation=1, root=fmt.RESERVED_HEAD,
                            root_level=0, total_bytes=total, bytes_used=0,
                            sectorsize=sectorsize, nodesize=nodesize)
        sb.check("mkfs", InvalidError)
        sb.generation = 0
        tm = cls(dev, sb, cache_nodes=cache_nodes)
        # Stale superblocks at any place a copy could live would compete at mount.
        zero = bytes(SB_SIZE)
        for addr in {fmt.SB_PRIMARY_ADDR, *fmt.SB_MIRROR_ADDRS,
                     (dev.size // 2) // fmt.SB_RESERVE * fmt.SB_RESERVE}:
            if addr >= fmt.SB_PRIMARY_ADDR and addr + SB_SIZE <= dev.size:
                dev.pwrite(zero, addr)
        extent_bt = BTree(tm, EXTENT_TREE_ID, 0, 0, 0)
        tm.extents = ExtentTree(tm, extent_bt, 0)
        free = FreeSpace()
        free.add(0, total)
        for a, ln in fmt.reserved_ranges(total):
            free.remove(a, ln)
        tm.extents.free = free
        trans = tm.start()
        for bt in (tm.root_tree, extent_bt):
            node = bt._new_node(trans, 0, [], [])
            bt._set_root(node)
        tm.trees[EXTENT_TREE_ID] = extent_bt
        tm.root_items[EXTENT_TREE_ID] = DiskRootItem(extent_bt.root_bytenr, extent_bt.root_gen, 0)
        tm.create_tree(trans, FS_TREE_ID, shareable=True, root_dirid=FIRST_FREE_OBJECTID)
        tm.create_tree(trans, CSUM_TREE_ID)
        tm.commit(trans)
        return tm

    @classmethod
    def mount(cls, dev, *, cache_nodes=4096):
        """Open the newest generation whose superblock and root nodes verify."""
        errors, cands, tried = [], [], set()

        def probe(addrs):
            for addr in addrs:
                if addr in tried or addr + SB_SIZE > dev.size:
                    continue
                tried.add(addr)
                try:
                    cands.append(DiskSuperblock.decode(dev.pread(SB_SIZE, addr), addr))
                except CorruptError as e:
                    errors.append(str(e))
                except OSError as e:
                    errors.append(f"superblock at {addr:#x}: {e}")

        probe(fmt.superblock_addrs(dev.size))
        for sb in cands:
            probe(fmt.superblock_addrs(sb.total_bytes))
        cands.sort(key=lambda s: s.generation, reverse=True)
        for sb in cands:
            if sb.total_bytes > dev.size:
                errors.append(f"superblock at {sb.bytenr:#x}: fs of {sb.total_bytes} bytes on a "
                              f"{dev.size}-byte device")
                continue
            try:
                tm = cls(dev, sb, cache_nodes=cache_nodes)
                tm._load()
                return tm
            except CorruptError as e:
                errors.append(f"generation {sb.generation} (superblock {sb.bytenr:#x}): {e}")
        raise CorruptError("superblock", "every copy",
                           "no valid generation: " + "; ".join(errors))

    def _load(self):
        self.cache.read(self.sb.root, self.sb.generation, self.sb.root_level, owner=ROOT_TREE_ID)
        ext = self._load_tree(EXTENT_TREE_ID)
        ext.root_node()
        self.extents = ExtentTree(self, ext, self.sb.bytes_used)
        self.extents.rebuild_free_space()
        self.log.reserve_root()

    def _load_tree(self, tree_id):
        raw = self.root_tree.lookup((tree_id, ROOT_ITEM, 0))
        if raw is None:
            raise NotFoundError(f"tree {tree_id} does not exist")
        ri = DiskRootItem.decode(raw, f"ROOT_ITEM of tree {tree_id}")
        bt = BTree(self, tree_id, ri.bytenr, ri.generation, ri.level,
                   shareable=bool(ri.flags & ROOT_SHAREABLE), last_snapshot=ri.last_snapshot)
        self.cache.read(ri.bytenr, ri.generation, ri.level)
        self.root_items[tree_id] = ri
        self.trees[tree_id] = bt
        return bt

    # ------------------------------------------------------------------ trees

    def tree(self, tree_id):
        """The BTree of ``tree_id`` (``ROOT_TREE_ID`` gives the root tree)."""
        if tree_id == ROOT_TREE_ID:
            return self.root_tree
        bt = self.trees.get(tree_id)
        return bt if bt is not None else self._load_tree(tree_id)

    def tree_ids(self):
        """Ids of every tree with a ROOT_ITEM (committed or created in this transaction)."""
        ids = {k[0] for k, _ in self.root_tree.items((0, ROOT_ITEM, 0)) if k[1] == ROOT_ITEM}
        return sorted(ids | set(self.root_items))

    def root_item(self, tree_id):
        self.tree(tree_id)
        return self.root_items[tree_id]

    def create_tree(self, trans, tree_id, *, shareable=False, root_dirid=0):
        """A new empty tree (one empty leaf); its ROOT_ITEM is written at commit."""
        self._check(trans)
        if tree_id in self.trees or tree_id == ROOT_TREE_ID or \
                self.root_tree.lookup((tree_id, ROOT_ITEM, 0)) is not None:
            raise ExistsError(f"tree {tree_id} exists")
        bt = BTree(self, tree_id, 0, 0, 0, shareable=shareable)
        bt._set_root(bt._new_node(trans, 0, [], []))
        self.trees[tree_id] = bt
        self.root_items[tree_id] = DiskRootItem(
            bt.root_bytenr, bt.root_gen, 0, 0, ROOT_SHAREABLE if shareable else 0, root_dirid, 0)
        return bt

    def snapshot(self, trans, src_id, new_id):
        """A new tree sharing every node of ``src_id``: its root points at the source's root
        node, which gains one reference.  Both trees' ``last_snapshot`` becomes ``transid``."""
        self._check(trans)
        src = self.tree(src_id)
        if not src.shareable:
            raise InvalidError(f"tree {src_id} cannot be snapshotted")
        if new_id in self.trees or self.root_tree.lookup((new_id, ROOT_ITEM, 0)) is not None:
            raise ExistsError(f"tree {new_id} exists")
        self.extents.inc_tree_ref(trans, src.root_bytenr)
        src.last_snapshot = trans.transid
        src.root_changed = True
        snap = BTree(self, new_id, src.root_bytenr, src.root_gen, src.level, shareable=True,
                     last_snapshot=trans.transid)
        snap.root_changed = True
        sri = self.root_items[src_id]
        self.trees[new_id] = snap
        self.root_items[new_id] = DiskRootItem(snap.root_bytenr, snap.root_gen, snap.level,
                                               trans.transid, ROOT_SHAREABLE, sri.root_dirid,
                                               src_id)
        return snap

    def delete_tree(self, trans, tree_id):
        """Drop a tree (snapshot deletion): release its root, delete its ROOT_ITEM."""
        self._check(trans)
        if tree_id in (ROOT_TREE_ID, EXTENT_TREE_ID):
            raise InvalidError(f"tree {tree_id} cannot be deleted")
        bt = self.tree(tree_id)
        bt.drop(trans)
        del self.trees[tree_id]
        del self.root_items[tree_id]
        try:
            self.root_tree.delete(trans, (tree_id, ROOT_ITEM, 0))
        except NotFoundError:
            pass            # created in this transaction: never written

    # ------------------------------------------------------------------ transactions

    def _check(self, trans):
        if self.aborted:
            raise ReadOnlyError("transaction aborted earlier; filesystem is read-only")
        if trans is None or trans is not self.running:
            raise InvariantError("not the running transaction")

    def start(self):
        """The running transaction, or a new one with ``transid = generation + 1``."""
        with self.lock:
            if self.aborted:
                raise ReadOnlyError("transaction aborted earlier; filesystem is read-only")
            if self.running is None:
                self.running = Transaction(self, self.generation + 1)
            return self.running

    def commit(self, trans=None):
        """Commit the running transaction (see the module docstring); returns the generation
        now on disk.  Nothing to write: the transaction just ends."""
        with self.lock:
            trans = trans or self.running
            if trans is None:
                return self.generation
            self._check(trans)
            try:
                self._commit(trans)
            except BaseException:
                self.aborted = True
                self.log.abort_commit()
                trans.running = False
                self.running = None
                raise
            trans.running = False
            self.running = None
            return self.generation

    def _update_root_items(self, trans):
        changed = False
        for tid, bt in list(self.trees.items()):
            if not bt.root_changed:
                continue
            bt.root_changed = False
            old = self.root_items[tid]
            ri = DiskRootItem(bt.root_bytenr, bt.root_gen, bt.level, bt.last_snapshot, old.flags,
                              old.root_dirid, old.source_tree)
            self.root_items[tid] = ri
            self.root_tree.put(trans, (tid, ROOT_ITEM, 0), ri.encode())
            changed = True
        return changed

    def _commit(self, trans):
        ext = self.extents
        for hook in list(self.pre_commit_hooks):
            hook(trans)
        while True:
            changed = self._update_root_items(trans)
            if ext.has_pending():
                ext.run_delayed_refs(trans)
                changed = True
            if not changed:
                break
        dirty = self.cache.dirty
        if not dirty:
            return
        if self.root_tree.root_gen != trans.transid:
            raise InvariantError("commit with dirty nodes left the root tree unchanged")
        # 2. nodes, contiguous ones in one write
        fsid, ns = self.fsid, self.nodesize
        run_addr, run = None, []
        for bytenr in sorted(dirty):
            node = dirty[bytenr]
            if node.generation != trans.transid:
                raise InvariantError(f"dirty node {bytenr:#x} of generation {node.generation}")
            if run and (run_addr + len(run) * ns != bytenr or len(run) * ns >= WRITE_COALESCE_MAX):
                self.dev.pwrite(b"".join(run), run_addr)
                run = []
            if not run:
                run_addr = bytenr
            run.append(node.encode(fsid, ns))
        if run:
            self.dev.pwrite(b"".join(run), run_addr)
        # 3. barrier
        self.dev.flush()
        # 4. superblocks, naming a fresh area for the next transaction's fsync log (so the
        # previous log, whose records carry another log_id, is dropped with this write)
        log_root, log_id = self.log.prepare_commit()
        sb = DiskSuperblock(fsid=fsid, generation=trans.transid, root=self.root_tree.root_bytenr,
                            root_level=self.root_tree.level, total_bytes=self.total_bytes,
                            bytes_used=ext.bytes_used, sectorsize=self.sectorsize, nodesize=ns,
                            log_root=log_root, log_id=log_id)
        for addr in fmt.superblock_addrs(self.total_bytes):
            self.dev.pwrite(sb.encode(addr), addr, fua=True)
        # 5. the new generation is durable
        self.sb = sb
        self.generation = trans.transid
        self.commits += 1
        self.cache.committed()
        self.log.commit_done(trans.transid)
        ext.unpin()

    # ------------------------------------------------------------------ fsck

    def check(self):
        """Verify the committed metadata; returns a list of problems (empty: clean).

        Walks every tree from the superblock and the ROOT_ITEMs (node checksums, fsid, address,
        generation and level against the parent, key order, parent keys), then compares the
        extent tree with what the walk found: each tree block's refcount with its parent
        pointers + roots, its owner and level; each data extent's refcount and back-references
        with the EXTENT_DATA items in physical leaves; used bytes with the superblock; extents
        inside the device, aligned, not overlapping each other or the reserved ranges.
        """
        problems = []
        tree_refs = {}            # bytenr -> expected refs
        node_info = {}            # bytenr -> (owner, level)
        data_refs = {}            # bytenr -> {(root, oid, off): count}
        data_sizes = {}           # bytenr -> disk_num_bytes seen
        seen = set()

        def walk_tree(bt, label):
            tree_refs[bt.root_bytenr] = tree_refs.get(bt.root_bytenr, 0) + 1
            if bt.root_bytenr in seen:
                return
            stack = [(bt.root_bytenr, bt.root_gen, bt.level, fmt.KEY_MIN, None, True)]
            while stack:
                bytenr, gen, level, lo, hi, is_root = stack.pop()
                where = f"{bytenr:#x}"
                try:
                    node = self.cache.read(bytenr, gen, level)
                except CorruptError as e:
                    problems.append(f"{label}: {e}")
                    continue
                if bytenr in seen:
                    continue
                seen.add(bytenr)
                node_info[bytenr] = (node.owner, level)
                if gen > self.generation:
                    problems.append(f"{label}: node {where} newer than the superblock")
                if not node.keys and not is_root:
                    problems.append(f"{label}: empty non-root node {where}")
                if node.keys and (node.keys[0] < lo or (hi is not None and node.keys[-1] >= hi)):
                    problems.append(f"{label}: node {where} keys outside its parent's range")
                if level == 0:
                    try:
                        for dbytenr, nbytes, oid, off in leaf_data_refs(node):
                            refs = data_refs.setdefault(dbytenr, {})
                            r = (node.owner, oid, off)
                            refs[r] = refs.get(r, 0) + 1
                            if data_sizes.setdefault(dbytenr, nbytes) != nbytes:
                                problems.append(f"{label}: data extent {dbytenr:#x} referenced "
                                                f"with sizes {nbytes} and {data_sizes[dbytenr]}")
                    except CorruptError as e:
                        problems.append(f"{label}: {e}")
                    continue
                for i, (p, g) in enumerate(zip(node.ptrs, node.gens)):
                    tree_refs[p] = tree_refs.get(p, 0) + 1
                    try:
                        child = self.cache.read(p, g, level - 1)
                    except CorruptError as e:
                        problems.append(f"{label}: {e}")
                        continue
                    if not child.keys or child.keys[0] != node.keys[i]:
                        problems.append(f"{label}: node {p:#x} first key differs from parent "
                                        f"{where} slot {i}")
                    nhi = node.keys[i + 1] if i + 1 < len(node.keys) else hi
                    stack.append((p, g, level - 1, node.keys[i], nhi, False))

        walk_tree(self.root_tree, "root tree")
        try:
            ids = [k[0] for k, _ in self.root_tree.items((0, ROOT_ITEM, 0)) if k[1] == ROOT_ITEM]
        except CorruptError as e:
            problems.append(f"root tree: {e}")
            return problems
        for tid in ids:
            try:
                ri = DiskRootItem.decode(self.root_tree.lookup((tid, ROOT_ITEM, 0)),
                                         f"ROOT_ITEM of tree {tid}")
            except CorruptError as e:
                problems.append(str(e))
                continue
            walk_tree(BTree(self, tid, ri.bytenr, ri.generation, ri.level), f"tree {tid}")
        if problems:
            return problems
        # The extent tree against the walk.
        used = 0
        prev_end = 0
        reserved = fmt.reserved_ranges(self.total_bytes)
        bt = self.extents.btree
        try:
            items = [(k, d) for k, d in bt.items() if k[1] == fmt.EXTENT_ITEM]
        except CorruptError as e:
            return problems + [f"extent tree: {e}"]
        found_extents = set()
        for (bytenr, _, nbytes), raw in items:
            where = f"extent {bytenr:#x}+{nbytes}"
            found_extents.add(bytenr)
            used += nbytes
            if bytenr < prev_end:
                problems.append(f"{where} overlaps the previous extent")
            prev_end = bytenr + nbytes
            if bytenr + nbytes > self.total_bytes or bytenr % self.sectorsize or nbytes % self.sectorsize:
                problems.append(f"{where} outside the device or misaligned")
            for a, ln in reserved:
                if bytenr < a + ln and a < bytenr + nbytes:
                    problems.append(f"{where} overlaps the reserved range {a:#x}+{ln}")
            try:
                item = fmt.DiskExtentItem.decode(raw, where)
            except CorruptError as e:
                problems.append(str(e))
                continue
            if item.is_tree_block:
                if bytenr not in node_info:
                    problems.append(f"{where}: tree block not reachable from any tree (leaked)")
                    continue
                owner, level = node_info[bytenr]
                if nbytes != self.nodesize:
                    problems.append(f"{where}: tree block size is not the node size")
                if item.refs != tree_refs.get(bytenr, 0):
                    problems.append(f"{where}: refs {item.refs}, found {tree_refs.get(bytenr, 0)} "
                                    "pointers")
                if item.tree_block_owner != owner or item.level != level:
                    problems.append(f"{where}: backref owner/level {item.tree_block_owner}/"
                                    f"{item.level}, node says {owner}/{level}")
            else:
                expect = data_refs.get(bytenr)
                if expect is None:
                    problems.append(f"{where}: data extent without references (leaked)")
                    continue
                if data_sizes[bytenr] != nbytes:
                    problems.append(f"{where}: file extents say {data_sizes[bytenr]} bytes")
                if item.refs != sum(expect.values()):
                    problems.append(f"{where}: refs {item.refs}, found {sum(expect.values())} "
                                    "file extent items")
                try:
                    back = self.extents.data_backrefs(bytenr)
                except CorruptError as e:
                    problems.append(str(e))
                    continue
                if back != expect:
                    problems.append(f"{where}: back-references {sorted(back.items())}, "
                                    f"expected {sorted(expect.items())}")
        for bytenr in node_info:
            if bytenr not in found_extents:
                problems.append(f"tree block {bytenr:#x} has no EXTENT_ITEM")
        for bytenr in data_refs:
            if bytenr not in found_extents:
                problems.append(f"data extent {bytenr:#x} has no EXTENT_ITEM")
        if used != self.sb.bytes_used:
            problems.append(f"superblock bytes_used {self.sb.bytes_used}, extents sum to {used}")
        return problems


def fsck(dev, *, cache_nodes=4096):
    """Mount ``dev`` and check its metadata: a list of problems (a mount failure is one)."""
    try:
        tm = TransactionManager.mount(dev, cache_nodes=cache_nodes)
    except CorruptError as e:
        return [str(e)]
    return tm.check()

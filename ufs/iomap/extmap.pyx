# cython: language_level=3
"""ExtentMap: the ordered in-memory extent map of one file (or one address space).

Layer: ufs.iomap (Cython core).  Imports nothing from ufs but ``ufs.errors``.

An ExtentMap holds non-overlapping extents ``(offset, length, addr, type, flags)``
keyed by file offset (bytes; ranges half-open).  ``addr`` is a device byte
address or ``NULL_ADDR`` (2**64-1) for extents without one (holes, delalloc);
``type`` and ``flags`` are opaque integers to the map (personalities store
``MapType``/``MapFlag`` values).  It is the structure a personality's
``iomap_begin`` consults, and a mapping cache can be built on it.

Operations, n = number of extents, k = extents touched:
- ``lookup(pos)``          O(log n): the extent containing pos, or the hole up
                           to the next extent start (type HOLE, NULL_ADDR).
- ``insert(...)``          O(log n + k): replaces whatever overlaps, splitting
                           partly covered extents (a split tail keeps its bytes'
                           device addresses: addr advances with the offset), and
                           coalesces with a neighbour that is contiguous in the
                           file and on disk with equal type and flags.
- ``remove(pos, length)``  O(log n + k): punch a hole, splitting as above.
- ``extents(pos, end)``    iterate the extents overlapping a range.

Invariants (``check()`` verifies them): extents are sorted, non-overlapping and
non-empty; with ``merge=True`` no two neighbours are coalescible, so the list
of extents is a canonical function of the byte -> (addr, type, flags) mapping.

Structure: a treap (randomised balanced binary search tree; expected depth
O(log n) whatever the insertion order) whose nodes live in one C array grown
by doubling; links are indices, freed nodes go on a free list.  Range edits are
split/merge on the treap: cut out the nodes starting in the range, trim the
extent overlapping its head, re-insert a tail, join.

Locking: none inside.  Writers must be serialised against each other and
against readers by the caller (the inode's mapping lock); the nogil readers in
``extmap.pxd`` have the same rule.
"""
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
from libc.stdint cimport uint64_t, uint32_t, int32_t

from ufs.errors import InvalidError, InvariantError

__all__ = ["ExtentMap", "NULL_ADDR", "MAX_POS", "HOLE"]

cdef uint64_t _NULL_ADDR = 0xFFFFFFFFFFFFFFFFULL
# File offsets are loff_t: every extent ends at or before 2**63.
cdef uint64_t _MAX_POS = 0x8000000000000000ULL
cdef int32_t _NIL = -1
cdef int32_t _MAX_NODES = 0x7FFFFFF0

NULL_ADDR = _NULL_ADDR
MAX_POS = _MAX_POS
cdef uint32_t _HOLE = 0     # MapType.HOLE, the type of a synthesised gap
HOLE = _HOLE


cdef inline uint64_t _adj(uint64_t addr, uint64_t delta) noexcept nogil:
    # The device address of a byte delta bytes into an extent.
    return addr if addr == _NULL_ADDR else addr + delta


cdef inline bint _coalescible(const extent_t* a, const extent_t* b) noexcept nogil:
    # b directly follows a in the file; may they become one extent?
    if a.offset + a.length != b.offset or a.type != b.type or a.flags != b.flags:
        return False
    if a.addr == _NULL_ADDR or b.addr == _NULL_ADDR:
        return a.addr == b.addr
    return a.addr + a.length == b.addr


cdef inline tuple _ext_tuple(const extent_t* e):
    return (e.offset, e.length, e.addr, e.type, e.flags)


cdef class ExtentMap:
    """Ordered map of non-overlapping extents; see the module docstring.

    ``ExtentMap(merge=True)``: with ``merge=False`` inserted extents are kept as
    given (only split, never coalesced), for callers whose extents carry
    per-extent identity (reference counts, checksums) outside the map.
    """

    def __cinit__(self, bint merge=True):
        self._nodes = NULL
        self._cap = 0
        self._root = _NIL
        self._free = _NIL
        self._count = 0
        self._rng = 0x9E3779B97F4A7C15ULL
        self.merge = merge

    def __dealloc__(self):
        free(self._nodes)
        self._nodes = NULL

    # --- Node pool ---

    cdef int _reserve(self, int32_t want) except -1:
        # Make sure want nodes can be taken from the free list without a
        # realloc, so no node pointer is invalidated in the middle of an edit.
        cdef int32_t have = 0, i = self._free, newcap
        cdef _enode* p
        while i != _NIL and have < want:
            have += 1
            i = self._nodes[i].left
        if have >= want:
            return 0
        if self._cap >= _MAX_NODES - want:
            raise MemoryError("ExtentMap: too many extents")
        newcap = 64 if self._cap == 0 else self._cap * 2
        if newcap > _MAX_NODES or newcap < self._cap + want:
            newcap = max(self._cap + want, min(newcap, _MAX_NODES))
        p = <_enode*>realloc(self._nodes, <size_t>newcap * sizeof(_enode))
        if p == NULL:
            raise MemoryError()
        self._nodes = p
        for i in range(newcap - 1, self._cap - 1, -1):
            p[i].left = self._free
            self._free = i
        self._cap = newcap
        return 0

    cdef int32_t _alloc(self, uint64_t offset, uint64_t length, uint64_t addr,
                               uint32_t type, uint64_t flags) noexcept nogil:
        # Caller reserved the node.
        cdef int32_t i = self._free
        cdef _enode* n = &self._nodes[i]
        self._free = n.left
        n.ext.offset = offset
        n.ext.length = length
        n.ext.addr = addr
        n.ext.type = type
        n.ext.flags = flags
        # xorshift64*: priorities only need to be unpredictable to the key order.
        self._rng ^= self._rng >> 12
        self._rng ^= self._rng << 25
        self._rng ^= self._rng >> 27
        n.prio = <uint32_t>((self._rng * 0x2545F4914F6CDD1DULL) >> 32)
        n.left = _NIL
        n.right = _NIL
        self._count += 1
        return i

    cdef void _release(self, int32_t i) noexcept nogil:
        self._nodes[i].left = self._free
        self._free = i
        self._count -= 1

    # --- Treap primitives (indices; no allocation inside) ---

    cdef void _split(self, int32_t t, uint64_t key, int32_t* l, int32_t* r) noexcept nogil:
        # l <- nodes with offset < key, r <- the others.  Iterative: walk down,
        # hanging each node on the right spine of l or the left spine of r.
        cdef int32_t* lhook = l
        cdef int32_t* rhook = r
        while t != _NIL:
            if self._nodes[t].ext.offset < key:
                lhook[0] = t
                lhook = &self._nodes[t].right
                t = self._nodes[t].right
            else:
                rhook[0] = t
                rhook = &self._nodes[t].left
                t = self._nodes[t].left
        lhook[0] = _NIL
        rhook[0] = _NIL

    cdef int32_t _join(self, int32_t a, int32_t b) noexcept nogil:
        # Every key of a is below every key of b.  The higher priority becomes
        # the root at each level; iterative over the two facing spines.
        cdef int32_t root = _NIL
        cdef int32_t* hook = &root
        while a != _NIL and b != _NIL:
            if self._nodes[a].prio > self._nodes[b].prio:
                hook[0] = a
                hook = &self._nodes[a].right
                a = self._nodes[a].right
            else:
                hook[0] = b
                hook = &self._nodes[b].left
                b = self._nodes[b].left
        hook[0] = a if a != _NIL else b
        return root

    cdef int32_t _max(self, int32_t t) noexcept nogil:
        if t != _NIL:
            while self._nodes[t].right != _NIL:
                t = self._nodes[t].right
        return t

    cdef int32_t _min(self, int32_t t) noexcept nogil:
        if t != _NIL:
            while self._nodes[t].left != _NIL:
                t = self._nodes[t].left
        return t

    cdef int32_t _pop_min(self, int32_t t, int32_t* out) noexcept nogil:
        # Unlink the leftmost node of t (t non-empty); return the new root.
        cdef int32_t parent = _NIL, cur = t
        while self._nodes[cur].left != _NIL:
            parent = cur
            cur = self._nodes[cur].left
        out[0] = cur
        if parent == _NIL:
            return self._nodes[cur].right
        self._nodes[parent].left = self._nodes[cur].right
        return t

    cdef void _drop(self, int32_t t, uint64_t end, list pieces) except *:
        # Free subtree t (extents starting in the edited range), in order,
        # recording each one's part below end.  Depth is the treap depth.
        cdef extent_t e
        if t == _NIL:
            return
        self._drop(self._nodes[t].left, end, pieces)
        e = self._nodes[t].ext
        if pieces is not None:
            if e.offset + e.length > end:
                e.length = end - e.offset
            pieces.append(_ext_tuple(&e))
        right = self._nodes[t].right
        self._release(t)
        self._drop(right, end, pieces)

    cdef int _cut(self, uint64_t pos, uint64_t end, int32_t* left, int32_t* right,
                  list pieces) except -1:
        # Remove [pos, end) from the tree: on return *left holds the extents
        # ending at or before pos, *right those starting at or after end, and
        # the bytes in between (recorded in pieces) are gone.  Needs one
        # reserved node (the tail of an extent straddling end).
        cdef int32_t a, b, m, c, p, q, tail = _NIL
        cdef uint64_t pend, qend
        cdef extent_t e
        self._split(self._root, pos, &a, &b)
        self._root = _NIL
        p = self._max(a)
        if p != _NIL:
            e = self._nodes[p].ext
            pend = e.offset + e.length
            if pend > pos:
                if pieces is not None:
                    pieces.append((pos, min(pend, end) - pos, _adj(e.addr, pos - e.offset),
                                   e.type, e.flags))
                if pend > end:
                    tail = self._alloc(end, pend - end, _adj(e.addr, end - e.offset), e.type, e.flags)
                self._nodes[p].ext.length = pos - e.offset
        self._split(b, end, &m, &c)
        q = self._max(m)
        if q != _NIL:
            e = self._nodes[q].ext
            qend = e.offset + e.length
            if qend > end:
                tail = self._alloc(end, qend - end, _adj(e.addr, end - e.offset), e.type, e.flags)
        self._drop(m, end, pieces)
        if tail != _NIL:
            c = self._join(tail, c)
        left[0] = a
        right[0] = c
        return 0

    cdef int _check_range(self, object pos, object length) except -1:
        if pos < 0 or length < 0 or pos + length > _MAX_POS:
            raise InvalidError(f"extent [{pos}, {pos + length}) outside [0, 2**63)")
        return 0

    # --- Public edits ---

    def insert(self, pos, nbytes, uint64_t addr, uint32_t type=2,
               uint64_t flags=0, bint replaced=False):
        """Map ``[pos, pos+nbytes)`` to ``addr`` (bytes), replacing what overlaps.

        Partly covered extents are split; their surviving pieces keep the device
        address of their bytes.  With ``merge`` the new extent is coalesced with
        a neighbour contiguous in the file and on disk (or both without address)
        with the same type and flags.  ``addr`` is ``NULL_ADDR`` for extents
        without a device address.  Returns ``None``, or with ``replaced=True``
        the list of replaced pieces ``(offset, length, addr, type, flags)`` in
        order, clipped to the range (what a COW personality frees).

        Raises ``InvalidError`` for an empty or out-of-range extent, or one whose
        device range would wrap.
        """
        cdef list pieces = [] if replaced else None
        self._check_range(pos, nbytes)
        self._insert(pos, nbytes, addr, type, flags, pieces)
        return pieces

    cdef int insert_c(self, uint64_t offset, uint64_t length, uint64_t addr, uint32_t type,
                      uint64_t flags) except -1:
        return self._insert(offset, length, addr, type, flags, None)

    cdef int _insert(self, uint64_t offset, uint64_t length, uint64_t addr, uint32_t type,
                     uint64_t flags, list pieces) except -1:
        cdef int32_t a, c, p, r, cur = _NIL
        cdef extent_t e
        if length == 0:
            raise InvalidError("insert: empty extent")
        if offset > _MAX_POS or length > _MAX_POS - offset:
            raise InvalidError(f"extent [{offset}, {offset + length}) outside [0, 2**63)")
        if addr != _NULL_ADDR and length > _NULL_ADDR - addr:
            raise InvalidError(f"insert: device range at {addr:#x} + {length} wraps")
        self._reserve(2)
        self._cut(offset, offset + length, &a, &c, pieces)
        e.offset = offset
        e.length = length
        e.addr = addr
        e.type = type
        e.flags = flags
        if self.merge:
            p = self._max(a)
            if p != _NIL and _coalescible(&self._nodes[p].ext, &e):
                self._nodes[p].ext.length += length
                cur = p
        if cur == _NIL:
            cur = self._alloc(offset, length, addr, type, flags)
            a = self._join(a, cur)
        if self.merge and c != _NIL:
            r = self._min(c)
            if _coalescible(&self._nodes[cur].ext, &self._nodes[r].ext):
                c = self._pop_min(c, &r)
                self._nodes[cur].ext.length += self._nodes[r].ext.length
                self._release(r)
        self._root = self._join(a, c)
        return 0

    def remove(self, pos, nbytes, bint removed=False):
        """Punch ``[pos, pos+nbytes)``: afterwards no extent covers it.

        Straddling extents are split as for :meth:`insert`; nothing is merged.
        Returns ``None``, or with ``removed=True`` the removed pieces, clipped.
        A zero length is a no-op.
        """
        cdef list pieces = [] if removed else None
        self._check_range(pos, nbytes)
        self._remove(pos, nbytes, pieces)
        return pieces

    cdef int remove_c(self, uint64_t offset, uint64_t length) except -1:
        return self._remove(offset, length, None)

    cdef int _remove(self, uint64_t offset, uint64_t length, list pieces) except -1:
        cdef int32_t a, c
        if offset > _MAX_POS or length > _MAX_POS - offset:
            raise InvalidError(f"extent [{offset}, {offset + length}) outside [0, 2**63)")
        if length == 0:
            return 0
        self._reserve(1)
        self._cut(offset, offset + length, &a, &c, pieces)
        self._root = self._join(a, c)
        return 0

    def clear(self):
        """Remove every extent (keeps the node pool for reuse)."""
        cdef int32_t a, c
        if self._count:
            self._reserve(1)
            self._cut(0, _MAX_POS, &a, &c, None)
            self._root = self._join(a, c)

    # --- Lookups ---

    cdef int lookup_c(self, uint64_t pos, extent_t* out) noexcept nogil:
        cdef int32_t t = self._root, best = _NIL, succ = _NIL
        while t != _NIL:
            if self._nodes[t].ext.offset <= pos:
                best = t
                t = self._nodes[t].right
            else:
                succ = t
                t = self._nodes[t].left
        if best != _NIL and pos - self._nodes[best].ext.offset < self._nodes[best].ext.length:
            out[0] = self._nodes[best].ext
            return 1
        out.offset = pos
        out.length = (self._nodes[succ].ext.offset if succ != _NIL else _MAX_POS) - pos
        out.addr = _NULL_ADDR
        out.type = _HOLE
        out.flags = 0
        return 0

    cdef int next_c(self, uint64_t pos, extent_t* out) noexcept nogil:
        cdef int32_t t = self._root, best = _NIL, succ = _NIL
        while t != _NIL:
            if self._nodes[t].ext.offset <= pos:
                best = t
                t = self._nodes[t].right
            else:
                succ = t
                t = self._nodes[t].left
        if best != _NIL and pos - self._nodes[best].ext.offset < self._nodes[best].ext.length:
            out[0] = self._nodes[best].ext
            return 1
        if succ != _NIL:
            out[0] = self._nodes[succ].ext
            return 1
        return 0

    def lookup(self, uint64_t pos):
        """``(offset, length, addr, type, flags)`` of the extent containing ``pos``.

        In a gap, the hole from ``pos`` up to the next extent's start (or to
        ``MAX_POS`` after the last extent): ``(pos, length, NULL_ADDR, HOLE, 0)``,
        so a caller can fill an iomap from either without a second lookup.
        """
        cdef extent_t e
        if pos >= _MAX_POS:
            raise InvalidError(f"lookup: position {pos} beyond 2**63")
        self.lookup_c(pos, &e)
        return _ext_tuple(&e)

    def find(self, uint64_t pos):
        """The extent containing ``pos``, or ``None`` in a gap."""
        cdef extent_t e
        if pos < _MAX_POS and self.lookup_c(pos, &e):
            return _ext_tuple(&e)
        return None

    def next_extent(self, uint64_t pos):
        """The first extent ending after ``pos`` (containing it, or after it), or ``None``.

        ``SEEK_DATA`` is ``max(pos, next_extent(pos)[0])``.
        """
        cdef extent_t e
        if pos < _MAX_POS and self.next_c(pos, &e):
            return _ext_tuple(&e)
        return None

    def extents(self, uint64_t pos=0, end=None):
        """Iterate the extents overlapping ``[pos, end)`` (whole, not clipped), in order.

        Each step is an O(log n) lookup from where the previous extent ended, so
        editing the map between steps is allowed: the iteration continues after
        the last extent it yielded.
        """
        cdef extent_t e
        cdef uint64_t stop = _MAX_POS if end is None else end
        while pos < stop and self.next_c(pos, &e) and e.offset < stop:
            yield _ext_tuple(&e)
            pos = e.offset + e.length

    def __iter__(self):
        return iter(self.to_list())

    def __len__(self):
        return self._count

    def __bool__(self):
        return self._count != 0

    cdef void _collect(self, int32_t t, list out) except *:
        while t != _NIL:
            self._collect(self._nodes[t].left, out)
            out.append(_ext_tuple(&self._nodes[t].ext))
            t = self._nodes[t].right

    def to_list(self):
        """All extents in offset order as ``(offset, length, addr, type, flags)`` tuples."""
        cdef list out = []
        self._collect(self._root, out)
        return out

    def copy(self):
        """An independent copy (one memcpy of the node pool)."""
        cdef ExtentMap m = ExtentMap.__new__(ExtentMap, self.merge)
        if self._cap:
            m._nodes = <_enode*>realloc(NULL, <size_t>self._cap * sizeof(_enode))
            if m._nodes == NULL:
                raise MemoryError()
            memcpy(m._nodes, self._nodes, <size_t>self._cap * sizeof(_enode))
        m._cap = self._cap
        m._root = self._root
        m._free = self._free
        m._count = self._count
        m._rng = self._rng
        return m

    def __repr__(self):
        return f"<ExtentMap {self._count} extents>"

    # --- Self-check (tests, UFS_DEBUG callers) ---

    cdef Py_ssize_t _check_node(self, int32_t t, uint64_t lo, uint64_t hi, uint32_t prio_max,
                                int depth) except -1:
        # Keys of subtree t lie in [lo, hi); heap order on prio.
        cdef Py_ssize_t n
        if t == _NIL:
            return 0
        if depth > 10000:
            raise InvariantError("ExtentMap: tree deeper than 10000 (cycle?)")
        e = self._nodes[t].ext
        if not (lo <= e.offset < hi):
            raise InvariantError(f"ExtentMap: key {e.offset} outside its subtree range [{lo}, {hi})")
        if self._nodes[t].prio > prio_max:
            raise InvariantError(f"ExtentMap: heap order broken at {e.offset}")
        n = self._check_node(self._nodes[t].left, lo, e.offset, self._nodes[t].prio, depth + 1)
        n += self._check_node(self._nodes[t].right, e.offset + 1, hi, self._nodes[t].prio, depth + 1)
        return n + 1

    def check(self):
        """Verify every invariant; raise ``InvariantError`` naming the first broken one."""
        cdef Py_ssize_t n = self._check_node(self._root, 0, _MAX_POS, 0xFFFFFFFFu, 0)
        if n != self._count:
            raise InvariantError(f"ExtentMap: {n} nodes in the tree, count says {self._count}")
        prev = None
        for ext in self.to_list():
            off, length, addr, typ, flags = ext
            if length == 0 or off + length > _MAX_POS:
                raise InvariantError(f"ExtentMap: bad extent {ext}")
            if prev is not None:
                if prev[0] + prev[1] > off:
                    raise InvariantError(f"ExtentMap: {prev} overlaps {ext}")
                if self.merge and prev[0] + prev[1] == off and prev[3] == typ and prev[4] == flags and (
                        (prev[2] == _NULL_ADDR and addr == _NULL_ADDR) or
                        (prev[2] != _NULL_ADDR and addr != _NULL_ADDR and prev[2] + prev[1] == addr)):
                    raise InvariantError(f"ExtentMap: {prev} and {ext} should have been merged")
            prev = ext

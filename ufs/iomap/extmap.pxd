# cython: language_level=3
#
# ExtentMap: an ordered map of non-overlapping extents keyed by file offset.
# See extmap.pyx for the contract.  Cython callers (per-I/O mapping caches in
# personalities written in Cython) use lookup_c/next_c without the GIL; they
# must hold the same lock that serialises writers of the map (the inode's
# mapping lock), exactly as Python callers must.

from libc.stdint cimport uint64_t, uint32_t, int32_t

cdef struct extent_t:
    uint64_t offset        # file bytes
    uint64_t length        # bytes, > 0
    uint64_t addr          # device bytes, or EXTMAP_NULL_ADDR (hole/delalloc: no address)
    uint64_t flags         # MapFlag bits, opaque to the map
    uint32_t type          # MapType value, opaque to the map

# One treap node in the node pool; links are pool indices (-1 = none) so the
# pool can be realloc'ed without fixing pointers.
cdef struct _enode:
    extent_t ext
    uint32_t prio
    int32_t left
    int32_t right

cdef class ExtentMap:
    cdef _enode* _nodes
    cdef int32_t _cap          # slots in _nodes
    cdef int32_t _root
    cdef int32_t _free         # free-list head, linked through .left
    cdef Py_ssize_t _count     # extents in the tree
    cdef uint64_t _rng         # xorshift state for node priorities
    cdef readonly bint merge   # coalesce contiguous neighbours on insert

    # private: node pool and treap primitives (extmap.pyx)
    cdef int _reserve(self, int32_t want) except -1
    cdef int32_t _alloc(self, uint64_t offset, uint64_t length, uint64_t addr,
                        uint32_t type, uint64_t flags) noexcept nogil
    cdef void _release(self, int32_t i) noexcept nogil
    cdef void _split(self, int32_t t, uint64_t key, int32_t* l, int32_t* r) noexcept nogil
    cdef int32_t _join(self, int32_t a, int32_t b) noexcept nogil
    cdef int32_t _max(self, int32_t t) noexcept nogil
    cdef int32_t _min(self, int32_t t) noexcept nogil
    cdef int32_t _pop_min(self, int32_t t, int32_t* out) noexcept nogil
    cdef void _drop(self, int32_t t, uint64_t end, list pieces) except *
    cdef int _cut(self, uint64_t pos, uint64_t end, int32_t* left, int32_t* right,
                  list pieces) except -1
    cdef int _check_range(self, object pos, object length) except -1
    cdef int _insert(self, uint64_t offset, uint64_t length, uint64_t addr, uint32_t type,
                     uint64_t flags, list pieces) except -1
    cdef int _remove(self, uint64_t offset, uint64_t length, list pieces) except -1
    cdef void _collect(self, int32_t t, list out) except *
    cdef Py_ssize_t _check_node(self, int32_t t, uint64_t lo, uint64_t hi, uint32_t prio_max,
                                int depth) except -1

    # The Python insert()/remove() without building result lists; raise InvalidError
    # for a bad range exactly like them.  Need the GIL (they may grow the node pool).
    cdef int insert_c(self, uint64_t offset, uint64_t length, uint64_t addr, uint32_t type,
                      uint64_t flags) except -1
    cdef int remove_c(self, uint64_t offset, uint64_t length) except -1

    # 1: pos lies in an extent, *out is that extent.  0: pos is in a gap, *out is
    # the hole [pos, next extent start) (or to EXTMAP_MAX_POS), type 0, NULL addr.
    cdef int lookup_c(self, uint64_t pos, extent_t* out) noexcept nogil
    # 1: *out is the first extent ending after pos (containing pos or after it); 0: none.
    cdef int next_c(self, uint64_t pos, extent_t* out) noexcept nogil

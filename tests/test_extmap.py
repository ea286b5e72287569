"""ExtentMap (ufs.iomap.extmap) against a per-byte model, plus scale checks.

The model maps every byte to (device addr of that byte or NULL, type, flags);
an ExtentMap with merge=True must be exactly the coalesced form of the model,
so comparisons are on whole extent lists, not just lookups.
"""
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ufs.errors import InvalidError
from ufs.iomap.extmap import HOLE, MAX_POS, NULL_ADDR, ExtentMap

SPACE = 256            # model file size in bytes: small, so ranges collide often


# --- Model ---

def model_insert(model, offset, length, addr, typ, flags):
    for i in range(length):
        model[offset + i] = (NULL_ADDR if addr == NULL_ADDR else addr + i, typ, flags)


def model_remove(model, offset, length):
    for i in range(offset, offset + length):
        model.pop(i, None)


def coalesce(bytemap, merge=True):
    """Canonical extent list of a byte -> (addr, type, flags) dict."""
    out = []
    for pos in sorted(bytemap):
        addr, typ, flags = bytemap[pos]
        if out:
            o, ln, a, t, f = out[-1]
            if (merge and o + ln == pos and t == typ and f == flags and
                    ((a == NULL_ADDR and addr == NULL_ADDR) or
                     (a != NULL_ADDR and addr != NULL_ADDR and a + ln == addr))):
                out[-1] = (o, ln + 1, a, t, f)
                continue
        out.append((pos, 1, addr, typ, flags))
    return out


def expand(extents):
    """byte -> (addr, type, flags) of an extent list (checks non-overlap too)."""
    out = {}
    for off, length, addr, typ, flags in extents:
        assert length > 0
        for i in range(length):
            assert off + i not in out, f"overlap at {off + i}"
            out[off + i] = (NULL_ADDR if addr == NULL_ADDR else addr + i, typ, flags)
    return out


def model_lookup(model, pos):
    ext = next((e for e in coalesce(model) if e[0] <= pos < e[0] + e[1]), None)
    if ext is not None:
        return ext
    nxt = min((p for p in model if p > pos), default=MAX_POS)
    return (pos, nxt - pos, NULL_ADDR, HOLE, 0)


# --- Hypothesis: random edit sequences ---

ranges = st.tuples(st.integers(0, SPACE - 1), st.integers(1, 64)).map(
    lambda t: (t[0], min(t[1], SPACE - t[0])))
addrs = st.one_of(st.just(NULL_ADDR), st.sampled_from([0, 4096, 8192]).flatmap(
    lambda base: st.integers(base, base + 300)))
ops = st.one_of(
    st.tuples(st.just("insert"), ranges, addrs, st.integers(0, 3), st.sampled_from([0, 1, 1 << 12])),
    st.tuples(st.just("remove"), ranges),
    st.tuples(st.just("lookup"), st.integers(0, SPACE + 10)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40))
def test_extmap_matches_byte_model(seq):
    m, model = ExtentMap(), {}
    for op in seq:
        if op[0] == "insert":
            _, (off, length), addr, typ, flags = op
            before = {p: v for p, v in model.items() if off <= p < off + length}
            pieces = m.insert(off, length, addr, typ, flags, replaced=True)
            # Replaced pieces are exactly the old bytes of the range, in order.
            assert expand(pieces) == before
            assert [p[0] for p in pieces] == sorted(p[0] for p in pieces)
            model_insert(model, off, length, addr, typ, flags)
        elif op[0] == "remove":
            _, (off, length) = op
            before = {p: v for p, v in model.items() if off <= p < off + length}
            assert expand(m.remove(off, length, removed=True)) == before
            model_remove(model, off, length)
        else:
            assert m.lookup(op[1]) == model_lookup(model, op[1])
        m.check()
        assert m.to_list() == coalesce(model)
        assert len(m) == len(coalesce(model))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(ranges, addrs), max_size=25), st.integers(0, SPACE), st.integers(0, SPACE))
def test_extmap_no_merge_keeps_extents_and_range_iteration(inserts, lo, hi):
    m, model = ExtentMap(merge=False), {}
    for (off, length), addr in inserts:
        m.insert(off, length, addr)
        model_insert(model, off, length, addr, 2, 0)
        m.check()
    # Without merging the bytes still agree; extent boundaries are those inserted.
    assert expand(m.to_list()) == model
    assert len(m.to_list()) >= len(coalesce(model))
    got = list(m.extents(lo, hi))
    want = [e for e in m.to_list() if lo < hi and e[0] < hi and e[0] + e[1] > lo]
    assert got == want
    # next_extent and find agree with the list
    for pos in range(0, SPACE + 2, 7):
        lst = m.to_list()
        inside = [e for e in lst if e[0] <= pos < e[0] + e[1]]
        assert m.find(pos) == (inside[0] if inside else None)
        after = [e for e in lst if e[0] + e[1] > pos]
        assert m.next_extent(pos) == (after[0] if after else None)


# --- Directed cases ---

def test_extmap_split_tail_keeps_device_addresses():
    m = ExtentMap()
    m.insert(0, 1 << 20, 1 << 30, 2, 0)
    m.insert(4096, 4096, 7 << 30, 3, 1)         # overwrite the middle with another type
    assert m.to_list() == [(0, 4096, 1 << 30, 2, 0), (4096, 4096, 7 << 30, 3, 1),
                           (8192, (1 << 20) - 8192, (1 << 30) + 8192, 2, 0)]
    m.insert(4096, 4096, (1 << 30) + 4096, 2, 0)  # put the original back: all three merge
    assert m.to_list() == [(0, 1 << 20, 1 << 30, 2, 0)]


def test_extmap_hole_extents_without_address_merge_and_split():
    m = ExtentMap()
    m.insert(0, 100, NULL_ADDR, 1, 0)            # delalloc-like, no address
    m.insert(100, 100, NULL_ADDR, 1, 0)
    assert m.to_list() == [(0, 200, NULL_ADDR, 1, 0)]
    m.remove(50, 10)
    assert m.to_list() == [(0, 50, NULL_ADDR, 1, 0), (60, 140, NULL_ADDR, 1, 0)]


def test_extmap_lookup_gap_reports_next_start():
    m = ExtentMap()
    assert m.lookup(0) == (0, MAX_POS, NULL_ADDR, HOLE, 0)
    m.insert(1000, 10, 0)
    assert m.lookup(5) == (5, 995, NULL_ADDR, HOLE, 0)
    assert m.lookup(1009) == (1000, 10, 0, 2, 0)
    assert m.lookup(1010) == (1010, MAX_POS - 1010, NULL_ADDR, HOLE, 0)


def test_extmap_errors():
    m = ExtentMap()
    with pytest.raises(InvalidError):
        m.insert(0, 0, 0)
    with pytest.raises(InvalidError):
        m.insert(-1, 10, 0)
    with pytest.raises(InvalidError):
        m.insert(MAX_POS - 5, 10, 0)
    with pytest.raises(InvalidError):
        m.insert(0, 10, NULL_ADDR - 5)            # device range would wrap
    with pytest.raises(InvalidError):
        m.lookup(MAX_POS)
    assert m.remove(5, 0, removed=True) == []
    assert len(m) == 0 and not m


def test_extmap_copy_is_independent_and_clear():
    m = ExtentMap()
    for i in range(100):
        m.insert(i * 10, 5, i * 1000)
    c = m.copy()
    m.remove(0, 500)
    assert len(c) == 100 and len(m) == 50
    c.check()
    m.check()
    c.clear()
    assert c.to_list() == [] and len(m) == 50
    c.insert(0, 1, 0)
    assert c.to_list() == [(0, 1, 0, 2, 0)]


def test_extmap_extents_iteration_survives_edits():
    m = ExtentMap()
    for i in range(10):
        m.insert(i * 100, 50, i * 1000)
    seen = []
    for ext in m.extents():
        seen.append(ext[0])
        m.remove(ext[0] + 100, 50)               # punch the next one while iterating
    assert seen == [0, 200, 400, 600, 800]


# --- Scale ---

def test_extmap_scale_one_million_extents(capsys):
    """1,000,000 non-mergeable extents inserted in random order; ops stay O(log n)."""
    n = 1_000_000
    m = ExtentMap()
    order = list(range(n))
    random.Random(1).shuffle(order)
    ins = m.insert
    t0 = time.perf_counter()
    for i in order:
        ins(i * 8192, 4096, i * 8192 + 4096)     # gaps between extents: never merge
    t_ins = time.perf_counter() - t0
    assert len(m) == n

    probes = [random.Random(2).randrange(n * 8192) for _ in range(1)] + \
        [x * 4099 % (n * 8192) for x in range(200_000)]
    look = m.lookup
    t0 = time.perf_counter()
    for pos in probes:
        look(pos)
    t_look = time.perf_counter() - t0
    for pos in probes[:2000]:
        off, length, addr, typ, _ = look(pos)
        if pos % 8192 < 4096:
            assert (off, length, addr) == (pos - pos % 8192, 4096, pos - pos % 8192 + 4096)
        else:
            assert typ == HOLE and off == pos and off + length == pos - pos % 8192 + 8192

    # Punch 10,000 ranges each covering 3 extents (split at both ends).
    t0 = time.perf_counter()
    for k in range(10_000):
        base = k * 97 * 8192
        m.remove(base + 2048, 2 * 8192)
    t_rm = time.perf_counter() - t0
    us_ins, us_look, us_rm = (t_ins / n * 1e6, t_look / len(probes) * 1e6, t_rm / 10_000 * 1e6)
    with capsys.disabled():
        print(f"\n[extmap] 1M extents: insert {us_ins:.2f} us/op, lookup {us_look:.2f} us/op, "
              f"punch(3 extents) {us_rm:.2f} us/op")
    # Generous bounds (shared 2-core machine); an O(n) structure is ~1000x slower.
    assert us_look < 20 and us_ins < 40 and us_rm < 60
    assert len(m) == n - 10_000                  # each punch removed 1 whole extent, split 2

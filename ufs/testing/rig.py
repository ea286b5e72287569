"""A test rig: one layoutfs file on one device, driven through one DIO engine.

What it owns: ``Rig`` — builds a layoutfs file from a ``strategies.LayoutCase`` on a device,
runs ``model.Op`` operations through an engine module (``ufs.iomap.dio`` or
``ufs.testing.reference``: anything with ``dio_rw``), sync or async, and reports each result
as ``("ok", bytes_done)`` / ``("err", errno)`` plus the data read and the final ``ki_pos``.
``run_differential`` runs one case through several rigs and checks them against each other
and against ``model.FileModel``; the Hypothesis tests and the image/loop-device tests share it.

May import: ``ufs.iomap``, ``ufs.vfs``, ``ufs.errors``, ``ufs.testing.*``.

Async ops: ``ki_complete`` must be called exactly once when (and only when) the engine
returned ``EIOCBQUEUED``; ``Rig`` asserts it.
"""
from __future__ import annotations

import threading

from ufs.iomap import EIOCBQUEUED, Iocb, Kiocb, MapType, aligned_buffer
from ufs.testing.layoutfs import initial_image, make_layout_file
from ufs.testing.model import FileModel, Op, expect_errno

__all__ = ["GARBAGE", "Rig", "run_differential", "Mismatch"]

GARBAGE = 0xAA          # what unwritten/unallocated device space holds in tests
ASYNC_TIMEOUT_S = 20.0


class Mismatch(AssertionError):
    pass


def _no_garbage(b: bytes) -> bytes:
    return b.replace(bytes([GARBAGE]), bytes([GARBAGE + 1]))


class Rig:
    """One file, one device, one engine."""

    def __init__(self, engine, dev, case, *, name="", queue=None, engine_kw=None, **knobs):
        self.engine = engine
        self.name = name or getattr(engine, "__name__", "engine")
        self.dev = dev
        self.case = case
        self.queue = queue
        self.engine_kw = engine_kw or {}
        self.file, self.ops, self.dops = make_layout_file(
            dev, list(case.extents), case.i_size, content=_no_garbage(case.content),
            block_size=case.geometry.block_size, alloc_start=case.alloc_start, **knobs)
        self.inode = self.file.f_inode
        self.completions = 0        # ki_complete calls seen
        self.queued = 0             # ops that returned EIOCBQUEUED

    def close(self) -> None:
        """Drain and stop the superblock's completion workqueue."""
        sb = self.inode.i_sb
        if getattr(sb, "has_dio_done_wq", False):
            sb.shutdown()

    def initial_image(self) -> bytes:
        return initial_image(self.file.layout, _no_garbage(self.case.content), self.case.i_size)

    def durable_bytes(self, pos: int, n: int):
        """File bytes [pos, pos+n) as the device's durable image holds them (None where the
        layout has no MAPPED block, or when the device has no crash model)."""
        durable = getattr(self.dev, "durable", None)
        if durable is None:
            durable = getattr(getattr(self.dev, "inner", None), "durable", None)
        if durable is None:
            return None
        img = durable()
        out = []
        p, end = pos, pos + n
        while p < end:
            ext, s, e = self.file.layout.find(p)
            t = min(e, end)
            if ext is None or ext.type != MapType.MAPPED:
                out.append(None)
            else:
                a = ext.addr + p - ext.offset
                out.append(img[a:a + t - p])
            p = t
        if any(x is None for x in out):
            return None
        return b"".join(out)

    def segments(self, pos, end):
        return list(self.file.layout.segments(pos, end))

    def _flags(self, op: Op) -> int:
        f = int(Iocb.DIRECT)
        if op.kind == "write":
            f |= int(Iocb.WRITE)
            if op.dsync:
                f |= int(Iocb.DSYNC)
            if op.sync:
                f |= int(Iocb.DSYNC) | int(Iocb.SYNC)
        if op.nowait:
            f |= int(Iocb.NOWAIT)
        return f

    def start(self, op: Op, data: bytes | None = None, *, dio_flags: int = 0, iov=None,
              done_before: int = 0, pos: int | None = None):
        """Issue ``op``; returns a handle for :meth:`finish` (async ops stay in flight).

        ``iov``: an ``IovIter`` to use as the user buffer (nofault/fault_at tests); ``pos``
        overrides ``op.pos`` (resumed calls)."""
        h = {"op": op, "calls": [], "ev": threading.Event(), "buf": None}

        def complete(iocb, res):
            h["calls"].append(int(res))
            h["ev"].set()

        iocb = Kiocb(self.file, op.pos if pos is None else pos, self._flags(op),
                     complete if op.is_async else None)
        h["iocb"] = iocb
        if iov is not None:
            buf = iov
            h["buf"] = iov.buffer
        else:
            if op.kind == "write":
                buf = data if data is not None else _no_garbage(op.data())
            else:
                buf = bytearray(op.length)
            h["buf"] = buf
        kw = dict(self.engine_kw)
        if dio_flags:
            kw["dio_flags"] = dio_flags
        if done_before:
            kw["done_before"] = done_before
        if self.queue is not None:
            kw["queue"] = self.queue
        try:
            r = self.engine.dio_rw(iocb, buf, self.ops, self.dops, **kw)
            h["ret"] = ("ok", int(r))
        except OSError as e:
            h["ret"] = ("err", e.errno)
        return h

    def finish(self, h):
        """(result, data read or None, ki_pos) of an op, waiting for async completion."""
        kind, v = h["ret"]
        if kind == "ok" and v == EIOCBQUEUED:
            if not h["ev"].wait(ASYNC_TIMEOUT_S):
                raise Mismatch(f"{self.name}: ki_complete never called for {h['op']}")
            res = h["calls"][0]
            result = ("ok", res) if res >= 0 else ("err", -res)
        else:
            result = (kind, v)
        # Let a stray second call show up before counting.
        if h["calls"] and len(h["calls"]) != 1:
            raise Mismatch(f"{self.name}: ki_complete called {len(h['calls'])} times")
        if not (kind == "ok" and v == EIOCBQUEUED) and h["calls"]:
            raise Mismatch(f"{self.name}: ki_complete called for a dio that did not queue")
        self.completions += len(h["calls"])
        if kind == "ok" and v == EIOCBQUEUED:
            self.queued += 1
        data = None
        if h["op"].kind == "read" and result[0] == "ok":
            data = bytes(memoryview(h["buf"]).cast("B")[:result[1]])
        return result, data, int(h["iocb"].ki_pos)

    def run(self, op: Op, data: bytes | None = None, **kw):
        return self.finish(self.start(op, data, **kw))

    def read_back(self, length: int) -> bytes:
        """The file's bytes [0, length) through a plain aligned DIO read of this engine."""
        if length == 0:
            return b""
        lbs = int(self.dev.logical_block_size)
        n = -(-length // lbs) * lbs
        buf = aligned_buffer(n, max(lbs, 4096))
        iocb = Kiocb(self.file, 0, int(Iocb.DIRECT))
        got = self.engine.dio_rw(iocb, buf, self.ops, None, **self.engine_kw)
        return bytes(memoryview(buf)[:min(got, length)])


def _fmt(rig, op, res):
    return f"{rig.name}: {op} -> {res} (i_size={rig.inode.i_size}, layout={rig.file.layout})"


def run_differential(rigs, seq, *, check_model=True, predict_errno=True, allow_short=False,
                     final_read=True):
    """Run ``seq`` on every rig in lock-step; raise ``Mismatch`` on any difference.

    Checks per op: identical result (count or errno), identical data read where no model has
    uncertainty, identical i_size and ki_pos; against the model: reads return exactly the
    allowed bytes (never device garbage where zeros belong), successful writes return the full
    count unless a knob makes them short, and the errno the layout dictates.
    Returns the list of results of the first rig.
    """
    models = [FileModel(r.initial_image(), r.case.i_size) for r in rigs]
    lbs = int(rigs[0].dev.logical_block_size)
    results = []
    for op in seq:
        segs = rigs[0].segments(op.pos, op.pos + op.length)
        want_errno = expect_errno(op, segs, lbs=lbs, i_size=rigs[0].inode.i_size,
                                  bs=rigs[0].case.geometry.block_size,
                                  max_map_length=rigs[0].ops.max_map_length)
        size_before = rigs[0].inode.i_size
        outs = [r.run(op) for r in rigs]
        res0 = outs[0][0]
        for r, o in zip(rigs[1:], outs[1:]):
            if o[0] != res0:
                raise Mismatch(f"result differs: {_fmt(rigs[0], op, res0)} vs {_fmt(r, op, o[0])}")
            if o[2] != outs[0][2]:
                raise Mismatch(f"ki_pos differs for {op}: {outs[0][2]} vs {o[2]} ({r.name})")
            if r.file.f_op.calls != rigs[0].file.f_op.calls:
                raise Mismatch(f"fsync count differs after {op}: {rigs[0].file.f_op.calls} vs "
                               f"{r.file.f_op.calls} ({r.name})")
            if r.inode.i_size != rigs[0].inode.i_size:
                raise Mismatch(f"i_size differs after {op}: {rigs[0].inode.i_size} vs "
                               f"{r.inode.i_size} ({r.name})")
        results.append(res0)
        kind, v = res0
        if predict_errno and want_errno is not None:
            got = v if kind == "err" else 0
            if got != want_errno:
                raise Mismatch(f"{op}: expected errno {want_errno}, got {res0} "
                               f"(segments {segs}, i_size {size_before})")
        # ki_pos moves by exactly the bytes returned, never on error.
        want_pos = op.pos + (v if kind == "ok" else 0)
        if outs[0][2] != want_pos:
            raise Mismatch(f"{op}: ki_pos {outs[0][2]} != {want_pos} after {res0}")
        if not check_model:
            continue
        data = _no_garbage(op.data()) if op.kind == "write" else None
        for r, m, o in zip(rigs, models, outs):
            (k, n), got, _ = o
            if op.kind == "write":
                if k == "ok":
                    if n > op.length:
                        raise Mismatch(f"{r.name}: {op} returned {n} > length")
                    m.write_done(op.pos, data, n)
                    if (op.dsync or op.sync) and n:
                        # O_DSYNC returned: the data is on stable storage (FUA or flush).
                        got_d = r.durable_bytes(op.pos, n)
                        if got_d is not None and got_d != data[:n]:
                            raise Mismatch(f"{r.name}: {op} returned {n} but the data is not "
                                           f"durable (layout {r.file.layout})")
                else:
                    m.write_failed(op.pos, data)
                if not m.adopt_size(r.inode.i_size):
                    raise Mismatch(f"{r.name}: i_size {r.inode.i_size} not allowed after {op} "
                                   f"-> {o[0]} (model {m.i_size})")
            elif k == "ok":
                want = m.expect_read(op.pos, op.length)
                if allow_short and len(got) < len(want):
                    want = want[:len(got)]
                if len(got) != len(want):
                    raise Mismatch(f"{r.name}: {op} read {len(got)} bytes, model says "
                                   f"{len(want)} (i_size {m.i_size})")
                bad = m.check_read(op.pos, got)
                if bad:
                    p = bad[0]
                    raise Mismatch(f"{r.name}: {op}: byte {p} is {got[p - op.pos]:#x}, model "
                                   f"{m.data[p]:#x} ({len(bad)} bad; layout {r.file.layout})")
        if op.kind == "read" and kind == "ok":
            uncertain = set()
            for m in models:
                uncertain.update(m.maybe)
            g0 = outs[0][1]
            for r, o in zip(rigs[1:], outs[1:]):
                for i, (a, b) in enumerate(zip(g0, o[1])):
                    if a != b and (op.pos + i) not in uncertain:
                        raise Mismatch(f"read data differs at {op.pos + i}: {rigs[0].name} "
                                       f"{a:#x} vs {r.name} {b:#x}")
    # The whole file, read back through each engine, must be what its model says.
    finals = []
    for r, m in zip(rigs, models if final_read else ()):
        size = r.inode.i_size
        try:
            img = r.read_back(size)
        except OSError as e:
            finals.append(("err", e.errno))
            continue
        finals.append(("ok", len(img)))
        if len(img) != size and not allow_short:
            raise Mismatch(f"{r.name}: read back {len(img)} of {size} bytes")
        bad = m.check_read(0, img)
        if bad:
            p = bad[0]
            raise Mismatch(f"{r.name}: final image byte {p} is {img[p]:#x}, model "
                           f"{m.data[p]:#x} ({len(bad)} bad; layout {r.file.layout})")
    if len(set(finals)) > 1:
        raise Mismatch(f"final read-back differs: {finals}")
    for r in rigs:
        r.close()
    return results

"""btrfslike file data against a byte-array model: random sequences of O_DIRECT and buffered
writes, truncates, hole punches, preallocation, reflinks and syncs on two files, in a plain
and a nodatacow mount.  After every sequence: contents equal the model (also after a
remount), and fsck is clean (refcounts of split/cloned extents, nbytes, checksum coverage).
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ufs import api
from ufs.fs_btrfslike import plugin
from ufs.iomap import RamDev

P = plugin.PERSONALITY
BS = 4096
SPAN = 24 * BS

_pos = st.integers(0, SPAN)
_apos = st.integers(0, SPAN // BS).map(lambda b: b * BS)
_op = st.one_of(
    st.tuples(st.just("dio"), st.integers(0, 1), _apos, st.integers(1, 6).map(lambda n: n * BS),
              st.integers(0, 255)),
    st.tuples(st.just("buf"), st.integers(0, 1), _pos, st.integers(1, 3 * BS), st.integers(0, 255)),
    st.tuples(st.just("trunc"), st.integers(0, 1), _pos),
    st.tuples(st.just("punch"), st.integers(0, 1), _pos, st.integers(1, 4 * BS)),
    st.tuples(st.just("prealloc"), st.integers(0, 1), _pos, st.integers(1, 4 * BS)),
    st.tuples(st.just("clone"), st.integers(0, 1), _apos, _apos, st.integers(1, 4).map(lambda n: n * BS)),
    st.tuples(st.just("sync"),),
)


def _apply(fs, fds, model, op):
    kind = op[0]
    if kind == "sync":
        fs.sync()
        return
    i = op[1]
    m = model[i]
    if kind in ("dio", "buf"):
        _, _, pos, n, fill = op
        data = bytes([fill]) * n
        fd = fds[i][kind == "dio"]
        assert fs.pwrite(fd, data, pos) == n
        if pos > len(m):
            m.extend(bytes(pos - len(m)))
        m[pos:pos + n] = data
    elif kind == "trunc":
        fs.ftruncate(fds[i][0], op[2])
        del m[op[2]:]
        m.extend(bytes(op[2] - len(m)))
    elif kind == "punch":
        _, _, pos, n = op
        fs.fallocate(fds[i][0], api.FALLOC_FL_PUNCH_HOLE | api.FALLOC_FL_KEEP_SIZE, pos, n)
        end = min(pos + n, len(m))
        if pos < end:
            m[pos:end] = bytes(end - pos)
    elif kind == "prealloc":
        _, _, pos, n = op
        fs.fallocate(fds[i][0], 0, pos, n)
        if pos + n > len(m):
            m.extend(bytes(pos + n - len(m)))
    elif kind == "clone":
        _, _, spos, dpos, n = op
        src, dst = model[1 - i], m
        if spos + n > len(src):
            return
        sb = fs.sb
        sino = fs.fdtable.get(fds[1 - i][0]).f_inode
        dino = fs.fdtable.get(fds[i][0]).f_inode
        sb.clone_range(sino, spos, dino, dpos, n)
        if dpos > len(dst):
            dst.extend(bytes(dpos - len(dst)))
        dst[dpos:dpos + n] = src[spos:spos + n]


def _check(fs, fds, model):
    for i in (0, 1):
        fd = fds[i][0]
        assert fs.fstat(fd).st_size == len(model[i])
        assert fs.pread(fd, len(model[i]) + BS, 0) == bytes(model[i]), f"file {i}"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(_op, max_size=14), options=st.sampled_from(["", "nodatacow"]))
def test_data_ops_match_the_model_and_fsck_is_clean(ops, options):
    dev = RamDev(32 << 20, 512)
    api.mkfs(dev, personality=P)
    model = [bytearray(), bytearray()]
    with api.mount(dev, personality=P, options=options) as fs:
        fds = [(fs.open(f"/f{i}", os.O_CREAT | os.O_RDWR),
                fs.open(f"/f{i}", os.O_RDWR | os.O_DIRECT)) for i in (0, 1)]
        for op in ops:
            _apply(fs, fds, model, op)
            _check(fs, fds, model)
        for pair in fds:
            for fd in pair:
                fs.close(fd)
    rep = api.fsck(dev, personality=P)
    assert rep.clean, rep.errors
    with api.mount(dev, personality=P) as fs:
        for i in (0, 1):
            fd = fs.open(f"/f{i}", os.O_RDONLY)
            assert fs.pread(fd, len(model[i]) + BS, 0) == bytes(model[i])
            fs.close(fd)

"""POSIX operation sequences for differential tests: targets, strategies, a state machine.

Layer: testing.  Imports ``hypothesis``, ``ctypes`` (for ``renameat2``/``fallocate``, which
the ``os`` module lacks) and, for the ufs target, the public API object it is handed (never
``ufs.api`` itself, so a personality's tests can run this against any mounted Filesystem).

What it owns:
- :class:`KernelTarget`: operations on a host directory through the ``os`` module — the
  kernel is the oracle;
- :class:`UfsTarget`: the same operations on a mounted ``ufs.api.Filesystem``;
- :func:`outcome`: one call's result as ``("ok", value)`` or ``("err", "ENOENT")``;
- :func:`snapshot`: the user-visible state of a tree (types, permission bits, owners, link
  counts, sizes, bytes, symlink bodies, user xattrs, data/hole maps, hard-link classes);
- :class:`PosixMachine`: a Hypothesis ``RuleBasedStateMachine`` running the same generated
  sequence on several targets; any difference in a result, an errno or the snapshot fails,
  except the differences named in :data:`ALLOWED_DIFFERENCES`.

Generated paths stay inside the tree on the host too (the oracle cannot chroot): a ``..``
never climbs above the root by its position in the path, and symlink bodies are relative
names only (no ``..``, ``.`` or leading ``/``), so every name step goes one level down.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os
import shutil
import stat as _stat

from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

__all__ = [
    "ALLOWED_DIFFERENCES",
    "FALLOC_MODES",
    "NAMES",
    "OPEN_FLAGS",
    "KernelTarget",
    "PosixMachine",
    "UfsTarget",
    "outcome",
    "paths",
    "snapshot",
]

#: Every difference between a ufs personality and the kernel the comparison tolerates, and why.
ALLOWED_DIFFERENCES = {
    "st_ino/st_dev": "inode numbers and device ids are assigned independently; hard links are "
                     "compared as classes of paths sharing an inode instead",
    "timestamps": "atime/mtime/ctime depend on the clock and on each filesystem's update "
                  "rules (relatime, lazytime); not compared",
    "directory st_size": "ext4 reports allocated directory blocks, tmpfs 20 bytes per entry, "
                         "memfs one block; not compared for directories",
    "st_blocks": "ext4 adds extent-tree and xattr blocks and delalloc reservations; the "
                 "data/hole map (SEEK_DATA/SEEK_HOLE at block granularity) is compared instead",
    "readdir order": "hash order (ext4) vs creation order (memfs); listings compared sorted",
    "symlink bodies": "relative names only: the oracle runs in a host directory without chroot, "
                      "so absolute or '..' bodies could leave it (absolute ones are covered by "
                      "tests/test_namei.py)",
    "xattr sizes": "values <= 64 bytes, <= 4 names: ext4 stores xattrs in one block and gives "
                   "ENOSPC long before XATTR_SIZE_MAX",
    "O_DIRECT": "not generated: alignment rules of the host filesystem differ from memfs "
                "(which has no direct I/O); the DIO engine has its own differential tests",
    "lseek on directories": "not generated: ext4 hash-ordered directory offsets are opaque",
    "ENOSPC/EFBIG/EMLINK": "not generated: limits differ per filesystem (tests/test_namei.py)",
    "page cache": "ext4/XFS report clean cached pages over unwritten extents as data to "
                  "SEEK_DATA; the oracle drops clean pages (POSIX_FADV_DONTNEED) after every "
                  "read so the map reflects extents, which is what memfs models",
    "delalloc": "ext4 ZERO_RANGE keeps delayed-allocation (unsynced) blocks as data, and turns "
                "allocated ones into unwritten extents (holes); the oracle fsyncs before each "
                "fallocate so the extents are allocated, the case memfs models",
    "fallocate on tmpfs": "tmpfs lacks ZERO_RANGE (EOPNOTSUPP); when the oracle directory is on "
                          "tmpfs, ZERO_RANGE is not generated",
}

NAMES = ("a", "b", "c")
LONG_NAME = "n" * 256
BS = 4096

FALLOC_KEEP, FALLOC_PUNCH, FALLOC_ZERO = 0x01, 0x02, 0x10
FALLOC_MODES = (0, FALLOC_KEEP, FALLOC_PUNCH | FALLOC_KEEP, FALLOC_ZERO, FALLOC_ZERO | FALLOC_KEEP,
                FALLOC_PUNCH)       # the last one is EOPNOTSUPP everywhere
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2

OPEN_FLAGS = st.builds(
    lambda acc, extra: acc | extra,
    st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR]),
    st.lists(st.sampled_from([os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND, os.O_DIRECTORY,
                              os.O_NOFOLLOW, os.O_CREAT]), max_size=3).map(
        lambda fl: sum(set(fl))))
MODES = st.sampled_from([0o644, 0o755, 0o600, 0o777, 0o4755, 0o2755, 0o1777, 0o000])


@st.composite
def paths(draw):
    """An absolute path of 1-3 components over :data:`NAMES`, ``.`` and ``..`` that never
    climbs above the root; sometimes with a trailing slash, ``//``, or an over-long name."""
    comps = []
    depth = 0
    for _ in range(draw(st.integers(1, 3))):
        c = draw(st.sampled_from(NAMES + NAMES + (".", "..")))
        if c == "..":
            if depth == 0:
                c = draw(st.sampled_from(NAMES))
            else:
                depth -= 1
        if c in NAMES:
            depth += 1
        comps.append(c)
    if draw(st.integers(0, 40)) == 0:
        comps[-1] = LONG_NAME
    p = "/" + "/".join(comps)
    r = draw(st.integers(0, 12))
    if r == 0:
        p += "/"
    elif r == 1:
        p = p.replace("/", "//", 1)
    return p


SYMLINK_BODIES = st.lists(st.sampled_from(NAMES), min_size=1, max_size=2).map("/".join)
XATTR_NAMES = st.sampled_from(["user.x", "user.y", "user.zz", "user.", "foo"])
POSITIONS = st.one_of(st.sampled_from([0, 1, 100, BS - 1, BS, BS + 1, 2 * BS, 3 * BS + 7, 5 * BS]),
                      st.integers(0, 6 * BS))
LENGTHS = st.one_of(st.sampled_from([0, 1, 10, BS, BS + 1, 2 * BS]), st.integers(0, 3 * BS))


def _pattern(length: int, fill: int) -> bytes:
    return bytes(((i * 31 + fill) % 251) + 1 for i in range(length))


def outcome(fn, *args, **kw):
    """``("ok", value)`` or ``("err", "ERRNO")`` for one call."""
    try:
        return ("ok", fn(*args, **kw))
    except OSError as e:
        return ("err", _errno.errorcode.get(e.errno, str(e.errno)))


# --- targets ---------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_AT_FDCWD = -100


def _check_libc(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


class KernelTarget:
    """The operations on the host kernel, under directory ``root`` (no trailing slash)."""

    name = "kernel"

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def p(self, path: str) -> str:
        return self.root + path if path else ""

    def open(self, path, flags, mode):
        return os.open(self.p(path), flags, mode)

    def close(self, fd):
        os.close(fd)

    # A read leaves clean pages in the page cache, and ext4/XFS report cached pages over
    # unwritten extents as data to SEEK_DATA; the oracle drops them so the data/hole map
    # reflects the extents (see ALLOWED_DIFFERENCES["page cache"]).
    def pread(self, fd, n, pos):
        data = os.pread(fd, n, pos)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return data

    def pwrite(self, fd, data, pos):
        return os.pwrite(fd, data, pos)

    def read(self, fd, n):
        data = os.read(fd, n)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return data

    def write(self, fd, data):
        return os.write(fd, data)

    def lseek(self, fd, off, whence):
        return os.lseek(fd, off, whence)

    def ftruncate(self, fd, n):
        os.ftruncate(fd, n)

    def fsync(self, fd):
        os.fsync(fd)

    def fstat(self, fd):
        return os.fstat(fd)

    def fallocate(self, fd, mode, off, n):
        # ext4 ZERO_RANGE over delayed-allocation blocks leaves them as data until they are
        # written back; allocate them first (ALLOWED_DIFFERENCES["delalloc"])
        try:
            os.fsync(fd)
        except OSError:
            pass
        _check_libc(_libc.fallocate(fd, mode, off, n), "fallocate")

    def mkdir(self, path, mode):
        os.mkdir(self.p(path), mode)

    def rmdir(self, path):
        os.rmdir(self.p(path))

    def unlink(self, path):
        os.unlink(self.p(path))

    def rename(self, src, dst, flags):
        _check_libc(_libc.renameat2(_AT_FDCWD, os.fsencode(self.p(src)), _AT_FDCWD,
                                    os.fsencode(self.p(dst)), flags), "renameat2")

    def link(self, src, dst):
        os.link(self.p(src), self.p(dst))

    def symlink(self, body, path):
        os.symlink(body, self.p(path))

    def readlink(self, path):
        return os.readlink(self.p(path))

    def truncate(self, path, n):
        os.truncate(self.p(path), n)

    def chmod(self, path, mode):
        os.chmod(self.p(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self.p(path), uid, gid)

    def stat(self, path, follow=True):
        return os.stat(self.p(path), follow_symlinks=follow)

    def listdir(self, path):
        return os.listdir(self.p(path))

    def setxattr(self, path, name, value, flags, follow=True):
        os.setxattr(self.p(path), name, value, flags, follow_symlinks=follow)

    def getxattr(self, path, name, follow=True):
        return os.getxattr(self.p(path), name, follow_symlinks=follow)

    def listxattr(self, path, follow=True):
        return sorted(os.listxattr(self.p(path), follow_symlinks=follow))

    def removexattr(self, path, name, follow=True):
        os.removexattr(self.p(path), name, follow_symlinks=follow)

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)


class UfsTarget:
    """The operations on a mounted ``ufs.api.Filesystem``."""

    name = "ufs"

    def __init__(self, fs):
        self.fs = fs

    def __getattr__(self, op):
        return getattr(self.fs, op)

    def rename(self, src, dst, flags):
        self.fs.rename(src, dst, flags)

    def stat(self, path, follow=True):
        return self.fs.stat(path, follow_symlinks=follow)

    def setxattr(self, path, name, value, flags, follow=True):
        self.fs.setxattr(path, name, value, flags, follow_symlinks=follow)

    def getxattr(self, path, name, follow=True):
        return self.fs.getxattr(path, name, follow_symlinks=follow)

    def listxattr(self, path, follow=True):
        return sorted(self.fs.listxattr(path, follow_symlinks=follow))

    def removexattr(self, path, name, follow=True):
        self.fs.removexattr(path, name, follow_symlinks=follow)

    def cleanup(self):
        self.fs.unmount()


# --- snapshots -------------------------------------------------------------------------------------------

def _stat_view(st) -> tuple:
    """The compared part of a stat result (see ALLOWED_DIFFERENCES)."""
    size = None if _stat.S_ISDIR(st.st_mode) else st.st_size
    return (_stat.S_IFMT(st.st_mode), _stat.S_IMODE(st.st_mode), st.st_nlink, st.st_uid,
            st.st_gid, size)


def _data_map(t, path) -> list:
    """[(data_start, hole_start), ...] from SEEK_DATA/SEEK_HOLE."""
    fd = t.open(path, os.O_RDONLY | os.O_NOFOLLOW, 0)
    try:
        size = t.fstat(fd).st_size
        out = []
        pos = 0
        while pos < size:
            try:
                d = t.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == _errno.ENXIO:
                    break
                raise
            h = t.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h))
            pos = h
        return out
    finally:
        t.close(fd)


def _read_all(t, path) -> bytes:
    fd = t.open(path, os.O_RDONLY | os.O_NOFOLLOW, 0)
    try:
        return t.pread(fd, 1 << 24, 0)
    finally:
        t.close(fd)


def snapshot(t) -> dict:
    """``{path: description}`` for every name in the tree of target ``t``, plus
    ``"<links>"``: the hard-link classes (sets of paths sharing an inode)."""
    out = {}
    by_ino: dict = {}
    todo = ["/"]
    while todo:
        d = todo.pop()
        names = sorted(t.listdir(d))
        out[d + "<entries>"] = names
        for n in names:
            p = d.rstrip("/") + "/" + n
            st = t.stat(p, follow=False)
            desc = {"stat": _stat_view(st)}
            if _stat.S_ISDIR(st.st_mode):
                todo.append(p)
            elif _stat.S_ISLNK(st.st_mode):
                desc["body"] = t.readlink(p)
            elif _stat.S_ISREG(st.st_mode):
                desc["map"] = _data_map(t, p)
                desc["data"] = _read_all(t, p)
            if not _stat.S_ISLNK(st.st_mode):
                desc["xattrs"] = {x: t.getxattr(p, x, follow=False) for x in t.listxattr(p, follow=False)
                                  if x.startswith("user.")}
            out[p] = desc
            by_ino.setdefault(st.st_ino, set()).add(p)
    out["<links>"] = sorted(sorted(v) for v in by_ino.values() if len(v) > 1)
    return out


def _show(a, b) -> str:
    """A short description of how two snapshot entries differ (file bytes summarised)."""
    if isinstance(a, dict) and isinstance(b, dict):
        parts = []
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k), b.get(k)
            if x == y:
                continue
            if isinstance(x, bytes) and isinstance(y, bytes):
                first = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]),
                             min(len(x), len(y)))
                parts.append(f"{k}: {len(x)} vs {len(y)} bytes, first difference at {first}")
            else:
                parts.append(f"{k}: {x!r} vs {y!r}")
        return "; ".join(parts)
    return f"{a!r} vs {b!r}"


# --- the state machine ---------------------------------------------------------------------------------

class PosixMachine(RuleBasedStateMachine):
    """Runs each generated operation on every target in :meth:`make_targets` and compares.

    Subclasses define ``make_targets(self) -> list`` (the first is the reference) and may
    set ``zero_range = False`` (see ALLOWED_DIFFERENCES).  Each rule's result must be equal
    on all targets; after each step the snapshots and every open descriptor's offset must be.
    """

    zero_range = True
    fds = Bundle("fds")

    def __init__(self):
        super().__init__()
        self.targets = self.make_targets()
        self.open_pairs: list = []      # (fd on targets[0], fd on targets[1], ...)
        self.log: list = []

    def make_targets(self) -> list:
        raise NotImplementedError

    def teardown(self):
        for pair in self.open_pairs:
            for t, f in zip(self.targets, pair):
                outcome(t.close, f)
        for t in self.targets:
            t.cleanup()

    # -- comparison --
    def same(self, what, fn, key=lambda r: r):
        """Run ``fn(target)`` on every target; fail if the outcomes (seen through ``key``)
        differ."""
        res = [outcome(fn, t) for t in self.targets]
        self.log.append((what, res[0]))
        for t, r in zip(self.targets[1:], res[1:]):
            assert key(r) == key(res[0]), (f"{what}: {self.targets[0].name} gave {res[0]!r}, "
                                           f"{t.name} gave {r!r}")
        return res

    def fd_op(self, what, fdpair, fn):
        return self.same(what, lambda t: fn(t, fdpair[self.targets.index(t)]))

    @invariant()
    def trees_match(self):
        snaps = [snapshot(t) for t in self.targets]
        ref = snaps[0]
        for t, s in zip(self.targets[1:], snaps[1:]):
            if s != ref:
                keys = sorted(set(s) | set(ref))
                diff = [f"{k}: {_show(ref.get(k), s.get(k))}" for k in keys if s.get(k) != ref.get(k)]
                raise AssertionError(f"tree differs ({self.targets[0].name} vs {t.name}):\n  "
                                     + "\n  ".join(diff[:5]))

    @initialize()
    def seed_tree(self):
        """Start from /a/ (with /a/b), /b (8 KiB + 1 byte of data) and /c -> a, so early steps
        meet every file type."""
        self.same("seed", self._seed)

    @staticmethod
    def _seed(t):
        t.mkdir("/a", 0o755)
        t.mkdir("/a/b", 0o755)
        fd = t.open("/b", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            t.pwrite(fd, _pattern(2 * BS + 1, 7), 0)
        finally:
            t.close(fd)
        t.symlink("a", "/c")

    # -- descriptors --
    @rule(target=fds, path=paths(), flags=OPEN_FLAGS, mode=MODES)
    def open(self, path, flags, mode):
        res = self.same(f"open({path!r}, {flags:#o}, {mode:#o})",
                        lambda t: t.open(path, flags, mode),
                        key=lambda r: r if r[0] == "err" else "ok")     # fd numbers differ
        if res[0][0] != "ok":
            return multiple()
        pair = tuple(r[1] for r in res)
        self.open_pairs.append(pair)
        return pair

    @rule(fd=consumes(fds))
    def close(self, fd):
        self.open_pairs.remove(fd)
        self.fd_op("close", fd, lambda t, f: t.close(f))

    @rule(fd=fds, pos=POSITIONS, length=LENGTHS, fill=st.integers(0, 250))
    def pwrite(self, fd, pos, length, fill):
        data = _pattern(length, fill)
        self.fd_op(f"pwrite({pos}, {length})", fd, lambda t, f: t.pwrite(f, data, pos))

    @rule(fd=fds, length=LENGTHS, fill=st.integers(0, 250))
    def write(self, fd, length, fill):
        data = _pattern(length, fill)
        self.fd_op(f"write({length})", fd, lambda t, f: t.write(f, data))

    @rule(fd=fds, pos=POSITIONS, length=LENGTHS)
    def pread(self, fd, pos, length):
        self.fd_op(f"pread({pos}, {length})", fd, lambda t, f: t.pread(f, length, pos))

    @rule(fd=fds, length=LENGTHS)
    def read(self, fd, length):
        self.fd_op(f"read({length})", fd, lambda t, f: t.read(f, length))

    @rule(fd=fds, off=st.one_of(POSITIONS, st.integers(-BS, -1)),
          whence=st.sampled_from([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA,
                                  os.SEEK_HOLE]))
    def lseek(self, fd, off, whence):
        if _stat.S_ISDIR(self.targets[0].fstat(fd[0]).st_mode):
            return
        self.fd_op(f"lseek({off}, {whence})", fd, lambda t, f: t.lseek(f, off, whence))

    @rule(fd=fds, length=POSITIONS)
    def ftruncate(self, fd, length):
        self.fd_op(f"ftruncate({length})", fd, lambda t, f: t.ftruncate(f, length))

    @rule(fd=fds, mode=st.sampled_from(FALLOC_MODES), pos=POSITIONS, length=LENGTHS)
    def fallocate(self, fd, mode, pos, length):
        if mode & FALLOC_ZERO and not self.zero_range:
            return
        self.fd_op(f"fallocate({mode:#x}, {pos}, {length})", fd,
                   lambda t, f: t.fallocate(f, mode, pos, length))

    @rule(fd=fds)
    def fsync(self, fd):
        self.fd_op("fsync", fd, lambda t, f: t.fsync(f))

    @invariant()
    def offsets_match(self):
        for fd in self.open_pairs:
            res = [outcome(lambda t, f: t.lseek(f, 0, os.SEEK_CUR), t, f)
                   for t, f in zip(self.targets, fd)]
            assert all(r == res[0] for r in res), f"file offsets differ: {res}"

    # -- namespace --
    @rule(path=paths(), mode=MODES)
    def mkdir(self, path, mode):
        self.same(f"mkdir({path!r}, {mode:#o})", lambda t: t.mkdir(path, mode))

    @rule(path=paths())
    def rmdir(self, path):
        self.same(f"rmdir({path!r})", lambda t: t.rmdir(path))

    @rule(path=paths())
    def unlink(self, path):
        self.same(f"unlink({path!r})", lambda t: t.unlink(path))

    @rule(src=paths(), dst=paths(), flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE,
                                                          RENAME_NOREPLACE | RENAME_EXCHANGE]))
    def rename(self, src, dst, flags):
        self.same(f"rename({src!r}, {dst!r}, {flags})", lambda t: t.rename(src, dst, flags))

    @rule(src=paths(), dst=paths())
    def link(self, src, dst):
        self.same(f"link({src!r}, {dst!r})", lambda t: t.link(src, dst))

    @rule(body=SYMLINK_BODIES, path=paths())
    def symlink(self, body, path):
        self.same(f"symlink({body!r}, {path!r})", lambda t: t.symlink(body, path))

    @rule(path=paths())
    def readlink(self, path):
        self.same(f"readlink({path!r})", lambda t: t.readlink(path))

    @rule(path=paths(), follow=st.booleans())
    def stat(self, path, follow):
        self.same(f"stat({path!r}, follow={follow})", lambda t: _stat_view(t.stat(path, follow)))

    @rule(path=paths(), length=POSITIONS)
    def truncate(self, path, length):
        self.same(f"truncate({path!r}, {length})", lambda t: t.truncate(path, length))

    @rule(path=paths(), mode=MODES)
    def chmod(self, path, mode):
        self.same(f"chmod({path!r}, {mode:#o})", lambda t: t.chmod(path, mode))

    @precondition(lambda self: os.geteuid() == 0)
    @rule(path=paths(), uid=st.sampled_from([-1, 0, 1000]), gid=st.sampled_from([-1, 0, 1000]))
    def chown(self, path, uid, gid):
        self.same(f"chown({path!r}, {uid}, {gid})", lambda t: t.chown(path, uid, gid))

    @rule(path=paths())
    def listdir(self, path):
        self.same(f"listdir({path!r})", lambda t: sorted(t.listdir(path)))

    # -- xattrs --
    @rule(path=paths(), name=XATTR_NAMES, value=st.binary(max_size=64),
          flags=st.sampled_from([0, 0, 1, 2]), follow=st.booleans())
    def setxattr(self, path, name, value, flags, follow):
        self.same(f"setxattr({path!r}, {name!r}, flags={flags}, follow={follow})",
                  lambda t: t.setxattr(path, name, value, flags, follow))

    @rule(path=paths(), name=XATTR_NAMES, follow=st.booleans())
    def getxattr(self, path, name, follow):
        self.same(f"getxattr({path!r}, {name!r})", lambda t: t.getxattr(path, name, follow))

    @rule(path=paths(), name=XATTR_NAMES)
    def removexattr(self, path, name):
        self.same(f"removexattr({path!r}, {name!r})", lambda t: t.removexattr(path, name))


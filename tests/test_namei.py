"""The generic VFS rules of ufs.vfs.namei / fdtable, one errno rule per case, on memfs.

Every expected errno here is what Linux gives for the same call (checked against the host
kernel by tests/test_api_vs_kernel.py for the operations its state machine generates).
Lock checking (lockdep) is on for every test, so a wrong lock order fails as EDEADLK.
"""
from __future__ import annotations

import errno
import os
import stat
import threading

import pytest
from ufs.iomap.bdev import RamDev

from ufs import api
from ufs.api import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
)
from ufs.testing import memfs
from ufs.vfs import lockdep

P = memfs.personality()


def _new_fs(readonly=False, **mkfs_options):
    dev = RamDev(1 << 20, 512)
    api.mkfs(dev, personality=P, options=mkfs_options or None)
    return dev, api.mount(dev, personality=P, readonly=readonly)


def _populate(fs):
    """/d/{sub/,f} /f /e/ /l->/d /lf->/f /dangling->/nope /loop->/loop"""
    fs.mkdir("/d")
    fs.mkdir("/d/sub")
    fs.close(fs.open("/d/f", os.O_CREAT | os.O_WRONLY, 0o644))
    fd = fs.open("/f", os.O_CREAT | os.O_WRONLY, 0o644)
    fs.write(fd, b"0123456789")
    fs.close(fd)
    fs.mkdir("/e")
    fs.symlink("/d", "/l")
    fs.symlink("/f", "/lf")
    fs.symlink("/nope", "/dangling")
    fs.symlink("/loop", "/loop")


@pytest.fixture
def fs():
    with lockdep.checking(True):
        dev, f = _new_fs()
        with f:
            _populate(f)
            yield f
        assert api.fsck(dev, personality=P).errors == []       # after every test: consistent


def err(code, fn, *args, **kw):
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == code, f"{fn.__name__}{args}: got {errno.errorcode.get(ei.value.errno)}, " \
                                   f"want {errno.errorcode[code]}"
    return ei.value


# --- walk -----------------------------------------------------------------------------------

def test_walk_basic_and_dotdot_at_root(fs):
    assert fs.stat("/f").st_size == 10
    assert fs.stat("/..").st_ino == fs.stat("/").st_ino
    assert fs.stat("/../../f").st_ino == fs.stat("/f").st_ino
    assert fs.stat("/d/../f").st_ino == fs.stat("/f").st_ino
    assert fs.stat("f").st_ino == fs.stat("/f").st_ino          # relative = from the root
    # ".." after a symlink goes to the parent of the *target* (/l -> /d, /d/.. = /)
    assert fs.stat("/l/sub/../f").st_ino == fs.stat("/d/f").st_ino
    assert fs.stat("//d///f").st_ino == fs.stat("/d/f").st_ino


def test_walk_errors(fs):
    err(errno.ENOENT, fs.stat, "")
    err(errno.ENOENT, fs.stat, "/nope")
    err(errno.ENOENT, fs.stat, "/nope/x")
    err(errno.ENOTDIR, fs.stat, "/f/x")
    err(errno.ENOTDIR, fs.stat, "/f/")
    err(errno.ENOTDIR, fs.stat, "/f/.")
    err(errno.ENOTDIR, fs.stat, "/f/..")
    err(errno.ENOENT, fs.stat, "/dangling")
    assert stat.S_ISLNK(fs.lstat("/dangling").st_mode)
    err(errno.ELOOP, fs.stat, "/loop")
    assert stat.S_ISLNK(fs.lstat("/loop").st_mode)
    err(errno.ELOOP, fs.stat, "/loop/x")


def test_trailing_slash_follows_final_symlink(fs):
    assert stat.S_ISLNK(fs.lstat("/l").st_mode)
    assert stat.S_ISDIR(fs.lstat("/l/").st_mode)
    err(errno.ENOTDIR, fs.lstat, "/lf/")


def test_name_max_is_255_utf8_bytes(fs):
    err(errno.ENAMETOOLONG, fs.stat, "/" + "x" * 256)
    err(errno.ENOENT, fs.stat, "/" + "x" * 255)
    err(errno.ENAMETOOLONG, fs.stat, "/" + "x" * 256 + "/y")
    err(errno.ENAMETOOLONG, fs.mkdir, "/" + "é" * 128)             # 256 bytes, 128 chars
    fs.mkdir("/" + "é" * 127)                                      # 254 bytes
    fs.close(fs.open("/" + "y" * 255, os.O_CREAT | os.O_WRONLY))
    err(errno.ENAMETOOLONG, fs.open, "/" + "y" * 256, os.O_CREAT | os.O_WRONLY)
    err(errno.ENAMETOOLONG, fs.symlink, "t", "/" + "z" * 256)
    err(errno.ENAMETOOLONG, fs.rename, "/f", "/" + "z" * 256)
    err(errno.ENAMETOOLONG, fs.unlink, "/" + "z" * 256)
    assert sorted(len(os.fsencode(n)) for n in fs.listdir("/"))[-1] == 255


def test_path_max(fs):
    long_ok = "/" + "/".join(["a" * 200] * 20)                    # 4020 bytes: ENOENT
    assert len(long_ok) < 4096
    err(errno.ENOENT, fs.stat, long_ok)
    too_long = "/" + "a/" * 2048                                   # 4097 bytes
    err(errno.ENAMETOOLONG, fs.stat, too_long)
    err(errno.ENAMETOOLONG, fs.stat, "/" + "a/" * 2047 + "b")       # exactly 4096 bytes
    err(errno.ENAMETOOLONG, fs.symlink, "x" * 4096, "/s")


def test_symlink_budget_is_40(fs):
    # /c0 -> /c1 -> ... -> /cN -> /f : following /c0 takes N+1 links
    def chain(prefix, n):
        for i in range(n):
            fs.symlink(f"/{prefix}{i + 1}", f"/{prefix}{i}")
        fs.symlink("/f", f"/{prefix}{n}")
    chain("a", 39)          # 40 links
    chain("b", 40)          # 41 links
    assert fs.stat("/a0").st_ino == fs.stat("/f").st_ino
    err(errno.ELOOP, fs.stat, "/b0")
    assert fs.stat("/b1").st_ino == fs.stat("/f").st_ino


def test_relative_symlink_resolves_from_its_directory(fs):
    fs.symlink("sub", "/d/rs")
    fs.symlink("../f", "/d/up")
    assert fs.stat("/d/rs").st_ino == fs.stat("/d/sub").st_ino
    assert fs.stat("/d/up").st_ino == fs.stat("/f").st_ino
    assert fs.readlink("/d/up") == "../f"


# --- mkdir / rmdir / unlink ---------------------------------------------------------------------

def test_mkdir_rules(fs):
    err(errno.EEXIST, fs.mkdir, "/d")
    err(errno.EEXIST, fs.mkdir, "/f")
    err(errno.EEXIST, fs.mkdir, "/")
    err(errno.EEXIST, fs.mkdir, "/d/.")
    err(errno.EEXIST, fs.mkdir, "/d/..")
    err(errno.EEXIST, fs.mkdir, "/dangling")          # a dangling symlink is an existing name
    err(errno.ENOENT, fs.mkdir, "/nope/x")
    err(errno.ENOTDIR, fs.mkdir, "/f/x")
    fs.mkdir("/new/")                                  # mkdir accepts a trailing slash
    nlink = fs.stat("/").st_nlink
    fs.mkdir("/new2", 0o750)
    assert fs.stat("/").st_nlink == nlink + 1
    st = fs.stat("/new2")
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_nlink == 2


def test_rmdir_rules(fs):
    err(errno.ENOTEMPTY, fs.rmdir, "/d")
    err(errno.ENOTDIR, fs.rmdir, "/f")
    err(errno.ENOTDIR, fs.rmdir, "/l")                 # the symlink is not followed
    err(errno.EINVAL, fs.rmdir, "/e/.")
    err(errno.ENOTEMPTY, fs.rmdir, "/e/..")
    err(errno.EBUSY, fs.rmdir, "/")
    err(errno.ENOENT, fs.rmdir, "/nope")
    nlink = fs.stat("/").st_nlink
    fs.rmdir("/e/")
    assert fs.stat("/").st_nlink == nlink - 1
    err(errno.ENOENT, fs.stat, "/e")


def test_unlink_rules(fs):
    err(errno.EISDIR, fs.unlink, "/d")
    err(errno.EISDIR, fs.unlink, "/d/")
    err(errno.EISDIR, fs.unlink, "/")
    err(errno.EISDIR, fs.unlink, "/d/..")
    err(errno.ENOTDIR, fs.unlink, "/f/")
    err(errno.ENOENT, fs.unlink, "/nope")
    err(errno.ENOENT, fs.unlink, "/nope/")
    fs.unlink("/l")                                    # removes the link, not /d
    assert stat.S_ISDIR(fs.stat("/d").st_mode)
    err(errno.ENOENT, fs.lstat, "/l")


# --- link / symlink / readlink ----------------------------------------------------------------------

def test_link_rules(fs):
    err(errno.EPERM, fs.link, "/d", "/x")
    err(errno.EEXIST, fs.link, "/f", "/d/f")
    err(errno.ENOENT, fs.link, "/nope", "/x")
    err(errno.ENOENT, fs.link, "/f", "/x/")
    err(errno.ENOENT, fs.link, "/f", "/nope/x")
    err(errno.ENOTDIR, fs.link, "/f/", "/x")
    fs.link("/f", "/g")
    assert fs.stat("/f").st_nlink == 2 and fs.stat("/g").st_ino == fs.stat("/f").st_ino
    fs.link("/lf", "/lf2")                              # link(2) links the symlink itself
    assert stat.S_ISLNK(fs.lstat("/lf2").st_mode)
    fs.link("/lf", "/f3", follow_symlinks=True)         # AT_SYMLINK_FOLLOW
    assert fs.stat("/f").st_nlink == 3


def test_symlink_and_readlink_rules(fs):
    err(errno.ENOENT, fs.symlink, "", "/x")
    err(errno.EEXIST, fs.symlink, "t", "/f")
    err(errno.EEXIST, fs.symlink, "t", "/")
    err(errno.ENOENT, fs.symlink, "t", "/x/")
    err(errno.EINVAL, fs.readlink, "/f")
    err(errno.EINVAL, fs.readlink, "/l/")               # trailing slash follows: a directory
    err(errno.ENOENT, fs.readlink, "/nope")
    assert fs.readlink("/l") == "/d"
    assert fs.lstat("/l").st_size == 2


# --- rename -------------------------------------------------------------------------------------------

def test_rename_flag_rules(fs):
    err(errno.EINVAL, fs.rename, "/f", "/x", RENAME_NOREPLACE | RENAME_EXCHANGE)
    err(errno.EINVAL, fs.rename, "/f", "/x", 1 << 5)
    err(errno.EINVAL, fs.rename, "/f", "/x", RENAME_WHITEOUT | RENAME_EXCHANGE)
    err(errno.ENOENT, fs.rename, "/f", "/zz", RENAME_EXCHANGE)
    err(errno.EEXIST, fs.rename, "/f", "/d/f", RENAME_NOREPLACE)
    err(errno.EEXIST, fs.rename, "/f", "/d/..", RENAME_NOREPLACE)


def test_rename_errno_rules(fs):
    err(errno.EINVAL, fs.rename, "/d", "/d/sub/x")      # into its own subtree
    err(errno.EINVAL, fs.rename, "/d", "/d/x")
    err(errno.ENOTEMPTY, fs.rename, "/d/sub", "/d")     # over its own ancestor
    err(errno.EINVAL, fs.rename, "/d/sub", "/d", RENAME_EXCHANGE)
    err(errno.ENOTEMPTY, fs.rename, "/e", "/d")         # over a non-empty directory
    err(errno.ENOTDIR, fs.rename, "/e", "/f")           # directory over non-directory
    err(errno.EISDIR, fs.rename, "/f", "/e")            # non-directory over directory
    err(errno.ENOTDIR, fs.rename, "/f", "/x/")
    err(errno.ENOTDIR, fs.rename, "/f/", "/x")
    err(errno.ENOENT, fs.rename, "/nope", "/x")
    err(errno.ENOENT, fs.rename, "/f", "/nope/x")
    err(errno.EBUSY, fs.rename, "/", "/x")
    err(errno.EBUSY, fs.rename, "/d/.", "/x")
    err(errno.EBUSY, fs.rename, "/f", "/d/..")


def test_rename_moves_and_counts_links(fs):
    root_nlink, d_nlink = fs.stat("/").st_nlink, fs.stat("/d").st_nlink
    fs.rename("/d/sub", "/sub2")
    assert fs.stat("/").st_nlink == root_nlink + 1 and fs.stat("/d").st_nlink == d_nlink - 1
    fs.rename("/e", "/sub2")                            # empty dir over empty dir
    assert fs.stat("/").st_nlink == root_nlink
    assert sorted(fs.listdir("/")) == sorted(["d", "f", "l", "lf", "dangling", "loop", "sub2"])
    fs.rename("/f", "/d/f")                             # file over file
    assert fs.pread(fs.open("/d/f", os.O_RDONLY), 100, 0) == b"0123456789"
    fs.rename("/d/", "/d2/")                            # trailing slashes on directories are fine
    assert fs.listdir("/d2") == ["f"]


def test_rename_same_inode_is_a_noop(fs):
    fs.link("/f", "/g")
    fs.rename("/f", "/g")
    assert fs.stat("/f").st_nlink == 2 and fs.exists("/g")
    fs.rename("/f", "/f")
    assert fs.exists("/f")


def test_rename_exchange(fs):
    ino_f, ino_d = fs.stat("/f").st_ino, fs.stat("/d").st_ino
    root_nlink = fs.stat("/").st_nlink
    fs.rename("/f", "/d", RENAME_EXCHANGE)
    assert fs.stat("/f").st_ino == ino_d and fs.stat("/d").st_ino == ino_f
    assert fs.stat("/").st_nlink == root_nlink
    fs.rename("/e", "/f/sub", RENAME_EXCHANGE)           # across parents, dir <-> dir
    e_nlink = fs.stat("/").st_nlink
    assert e_nlink == root_nlink and fs.listdir("/f/sub") == []
    fs.rename("/d", "/f/sub", RENAME_EXCHANGE)           # file <-> dir across parents
    assert stat.S_ISREG(fs.stat("/f/sub").st_mode) and stat.S_ISDIR(fs.stat("/d").st_mode)
    # / gained a directory (/d), /f lost one (/f/sub is a file now)
    assert fs.stat("/").st_nlink == root_nlink + 1 and fs.stat("/f").st_nlink == 2


# --- open ---------------------------------------------------------------------------------------------

def test_open_rules(fs):
    err(errno.EEXIST, fs.open, "/f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    err(errno.EEXIST, fs.open, "/dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    err(errno.EEXIST, fs.open, "/", os.O_CREAT | os.O_EXCL | os.O_RDONLY)
    err(errno.EISDIR, fs.open, "/", os.O_CREAT | os.O_RDONLY)
    err(errno.EISDIR, fs.open, "/d", os.O_CREAT | os.O_RDONLY)
    err(errno.EISDIR, fs.open, "/x/", os.O_CREAT | os.O_WRONLY)
    err(errno.EINVAL, fs.open, "/x", os.O_CREAT | os.O_DIRECTORY | os.O_RDONLY)
    err(errno.ENOTDIR, fs.open, "/f", os.O_DIRECTORY | os.O_RDONLY)
    err(errno.ENOTDIR, fs.open, "/f/", os.O_RDONLY)
    err(errno.EISDIR, fs.open, "/d", os.O_WRONLY)
    err(errno.EISDIR, fs.open, "/d", os.O_RDWR)
    err(errno.EISDIR, fs.open, "/d", os.O_RDONLY | os.O_TRUNC)
    err(errno.ELOOP, fs.open, "/lf", os.O_RDONLY | os.O_NOFOLLOW)
    err(errno.ENOENT, fs.open, "/nope", os.O_RDONLY)
    fs.close(fs.open("/l/", os.O_RDONLY | os.O_NOFOLLOW))     # trailing slash follows anyway
    fs.close(fs.open("/d", os.O_RDONLY | os.O_DIRECTORY))


def test_open_creat_follows_dangling_symlink(fs):
    fs.symlink("/made", "/tomake")
    fd = fs.open("/tomake", os.O_CREAT | os.O_WRONLY, 0o600)
    fs.close(fd)
    assert stat.S_ISREG(fs.stat("/made").st_mode)
    assert stat.S_IMODE(fs.stat("/made").st_mode) == 0o600


def test_open_trunc_and_umask(fs):
    fs.close(fs.open("/f", os.O_RDONLY | os.O_TRUNC))         # Linux truncates even O_RDONLY
    assert fs.stat("/f").st_size == 0
    assert fs.umask(0o027) == 0
    fs.close(fs.open("/m", os.O_CREAT | os.O_WRONLY, 0o777))
    fs.mkdir("/md", 0o777)
    assert stat.S_IMODE(fs.stat("/m").st_mode) == 0o750
    assert stat.S_IMODE(fs.stat("/md").st_mode) == 0o750


def test_append(fs):
    fd = fs.open("/f", os.O_WRONLY | os.O_APPEND)
    assert fs.write(fd, b"ab") == 2
    assert fs.pwrite(fd, b"cd", 0) == 2                        # Linux: pwrite appends too
    fs.close(fd)
    fd = fs.open("/f", os.O_RDONLY)
    assert fs.read(fd, 100) == b"0123456789abcd"


# --- descriptors ------------------------------------------------------------------------------------------

def test_fd_rules(fs):
    err(errno.EBADF, fs.read, 1234, 1)
    fd = fs.open("/f", os.O_RDONLY)
    err(errno.EBADF, fs.write, fd, b"x")
    err(errno.EBADF, fs.pwrite, fd, b"x", 0)
    err(errno.EINVAL, fs.ftruncate, fd, 0)                      # not open for writing
    err(errno.EBADF, fs.fallocate, fd, 0, 0, 10)
    err(errno.EINVAL, fs.pread, fd, 1, -1)
    fs.close(fd)
    err(errno.EBADF, fs.close, fd)
    err(errno.EBADF, fs.pread, fd, 1, 0)
    fd = fs.open("/f", os.O_WRONLY)
    err(errno.EBADF, fs.read, fd, 1)
    fs.close(fd)
    fd = fs.open("/d", os.O_RDONLY)
    err(errno.EISDIR, fs.read, fd, 1)
    err(errno.EINVAL, fs.ftruncate, fd, 0)
    fs.close(fd)


def test_lseek_rules(fs):
    fd = fs.open("/f", os.O_RDWR)
    assert fs.lseek(fd, 0, os.SEEK_END) == 10
    assert fs.lseek(fd, -3, os.SEEK_CUR) == 7
    assert fs.read(fd, 10) == b"789"
    err(errno.EINVAL, fs.lseek, fd, -1, os.SEEK_SET)
    err(errno.EINVAL, fs.lseek, fd, -11, os.SEEK_END)
    err(errno.EINVAL, fs.lseek, fd, 0, 17)
    assert fs.lseek(fd, 0, os.SEEK_DATA) == 0
    assert fs.lseek(fd, 0, os.SEEK_HOLE) == 10
    err(errno.ENXIO, fs.lseek, fd, 10, os.SEEK_DATA)
    err(errno.ENXIO, fs.lseek, fd, 10, os.SEEK_HOLE)
    err(errno.ENXIO, fs.lseek, fd, -1, os.SEEK_DATA)
    fs.ftruncate(fd, 3 * 4096)
    fs.pwrite(fd, b"z", 2 * 4096 + 5)
    assert fs.lseek(fd, 100, os.SEEK_HOLE) == 4096
    assert fs.lseek(fd, 4096, os.SEEK_DATA) == 2 * 4096
    assert fs.lseek(fd, 2 * 4096 + 10, os.SEEK_HOLE) == 3 * 4096
    fs.close(fd)


def test_truncate_rules(fs):
    err(errno.EINVAL, fs.truncate, "/f", -1)
    err(errno.EISDIR, fs.truncate, "/d", 0)
    err(errno.ENOENT, fs.truncate, "/nope", 0)
    fs.truncate("/lf", 4)                                        # follows the symlink
    assert fs.stat("/f").st_size == 4
    fs.sb.s_maxbytes = 1 << 20
    err(errno.EFBIG, fs.truncate, "/f", (1 << 20) + 1)
    fd = fs.open("/f", os.O_WRONLY)
    err(errno.EFBIG, fs.pwrite, fd, b"x", 1 << 20)
    assert fs.pwrite(fd, b"xyz", (1 << 20) - 1) == 1              # shortened at the limit
    err(errno.EFBIG, fs.fallocate, fd, 0, (1 << 20) - 1, 2)
    fs.close(fd)


def test_fallocate_mode_rules(fs):
    fd = fs.open("/f", os.O_RDWR)
    err(errno.EINVAL, fs.fallocate, fd, 0, 0, 0)
    err(errno.EINVAL, fs.fallocate, fd, 0, -1, 10)
    err(errno.EOPNOTSUPP, fs.fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, 10)
    err(errno.EOPNOTSUPP, fs.fallocate, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE, 0, 10)
    err(errno.EOPNOTSUPP, fs.fallocate, fd, 0x1000, 0, 10)
    fs.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2, 3)
    assert fs.pread(fd, 20, 0) == b"01\0\0\x0056789"
    fs.fallocate(fd, FALLOC_FL_ZERO_RANGE, 8, 10)
    assert fs.fstat(fd).st_size == 18 and fs.pread(fd, 20, 0) == b"01\0\0\x00567" + bytes(10)
    fs.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 16)
    assert fs.fstat(fd).st_size == 18 and fs.fstat(fd).st_blocks == (1 << 16) // 512
    fs.fallocate(fd, 0, 0, 1 << 17)
    assert fs.fstat(fd).st_size == 1 << 17
    fs.close(fd)


# --- attributes and xattrs ---------------------------------------------------------------------------------

def test_chmod_chown_utime(fs):
    fs.chmod("/f", 0o6755)
    fs.chown("/f", -1, -1)                                       # clears setuid, and setgid+g+x
    assert stat.S_IMODE(fs.stat("/f").st_mode) == 0o755
    fs.chmod("/f", 0o6745)
    fs.chown("/f", 12, -1)
    st = fs.stat("/f")
    assert stat.S_IMODE(st.st_mode) == 0o2745 and st.st_uid == 12
    fs.chmod("/d", 0o6755)
    fs.chown("/d", -1, 7)                                        # directories keep them
    assert stat.S_IMODE(fs.stat("/d").st_mode) == 0o6755 and fs.stat("/d").st_gid == 7
    err(errno.EOPNOTSUPP, fs.chmod, "/lf", 0o700, follow_symlinks=False)
    fs.utime("/f", ns=(1_000_000_007, 2_000_000_009))
    st = fs.stat("/f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_007, 2_000_000_009)
    with pytest.raises(ValueError):
        fs.utime("/f", (1, 2), ns=(1, 2))


def test_xattr_rules(fs):
    err(errno.ENODATA, fs.getxattr, "/f", "user.none")
    err(errno.ERANGE, fs.setxattr, "/f", "", b"v")
    err(errno.ERANGE, fs.setxattr, "/f", "user." + "a" * 251, b"v")
    err(errno.EOPNOTSUPP, fs.setxattr, "/f", "foo", b"v")
    err(errno.EINVAL, fs.setxattr, "/f", "user.", b"v")
    err(errno.E2BIG, fs.setxattr, "/f", "user.big", b"v" * 65537)
    fs.setxattr("/f", "user." + "a" * 250, b"v")                   # 255 bytes: fine
    fs.setxattr("/f", "user.a", b"1")
    err(errno.EEXIST, fs.setxattr, "/f", "user.a", b"2", api.XATTR_CREATE)
    err(errno.ENODATA, fs.setxattr, "/f", "user.b", b"2", api.XATTR_REPLACE)
    fs.setxattr("/f", "user.a", b"2", api.XATTR_REPLACE)
    assert fs.getxattr("/lf", "user.a") == b"2"                  # follows the symlink
    assert sorted(fs.listxattr("/f")) == sorted(["user.a", "user." + "a" * 250])
    err(errno.EPERM, fs.setxattr, "/lf", "user.a", b"1", follow_symlinks=False)
    err(errno.ENODATA, fs.getxattr, "/lf", "user.a", follow_symlinks=False)
    fs.removexattr("/f", "user.a")
    err(errno.ENODATA, fs.removexattr, "/f", "user.a")
    # the kernel's order: name and size (before the walk), EROFS, permission, namespace
    err(errno.ERANGE, fs.setxattr, "/nope", "", b"v")
    err(errno.E2BIG, fs.setxattr, "/nope", "user.x", b"v" * 65537)
    err(errno.EINVAL, fs.setxattr, "/nope", "user.x", b"v", 4)
    err(errno.ENOENT, fs.setxattr, "/nope", "user.", b"v")
    err(errno.EPERM, fs.setxattr, "/lf", "user.", b"v", follow_symlinks=False)
    err(errno.ENODATA, fs.getxattr, "/lf", "user.", follow_symlinks=False)
    err(errno.EOPNOTSUPP, fs.setxattr, "/lf", "foo", b"v", follow_symlinks=False)
    fs.setxattr("/d", "user.dir", b"")
    assert fs.getxattr("/d", "user.dir") == b""


# --- limits: EMLINK, ENOSPC, EROFS, EBUSY --------------------------------------------------------------------

def test_emlink():
    with lockdep.checking(True):
        _dev, fs = _new_fs(max_links=3)
        with fs:
            fs.mkdir("/a")                                           # root nlink 2 -> 3
            err(errno.EMLINK, fs.mkdir, "/b")
            fs.close(fs.open("/f", os.O_CREAT | os.O_WRONLY))
            fs.link("/f", "/g")
            fs.link("/f", "/h")
            err(errno.EMLINK, fs.link, "/f", "/i")
            fs.mkdir("/a/x")
            err(errno.EMLINK, fs.rename, "/a/x", "/x")               # root is at the limit


def test_enospc():
    _dev, fs = _new_fs(capacity=4 * 4096)
    with fs:
        fd = fs.open("/f", os.O_CREAT | os.O_RDWR)
        assert fs.pwrite(fd, b"a" * 4096 * 4, 0) == 4096 * 4
        err(errno.ENOSPC, fs.pwrite, fd, b"b", 4096 * 4)
        assert fs.statvfs("/").f_bfree == 0
        fs.ftruncate(fd, 4096)
        assert fs.statvfs("/").f_bfree == 3
        fs.close(fd)


def test_readonly_mount_erofs():
    dev = RamDev(1 << 20, 512)
    api.mkfs(dev, personality=P)
    with api.mount(dev, personality=P) as fs:
        _populate(fs)
    with api.mount(dev, personality=P, readonly=True) as fs:
        assert fs.statvfs("/").f_flag & os.ST_RDONLY
        err(errno.EROFS, fs.mkdir, "/x")
        err(errno.EEXIST, fs.mkdir, "/d")                            # EEXIST wins over EROFS
        err(errno.EROFS, fs.open, "/f", os.O_WRONLY)
        err(errno.EROFS, fs.open, "/f", os.O_RDONLY | os.O_TRUNC)
        err(errno.EROFS, fs.open, "/new", os.O_CREAT | os.O_RDONLY)
        err(errno.EEXIST, fs.open, "/f", os.O_CREAT | os.O_EXCL | os.O_RDONLY)
        fs.close(fs.open("/f", os.O_CREAT | os.O_RDONLY))           # exists: nothing to create
        err(errno.EROFS, fs.unlink, "/nope")                         # before the lookup
        err(errno.EROFS, fs.rmdir, "/e")
        err(errno.EROFS, fs.rename, "/f", "/g")
        err(errno.EROFS, fs.symlink, "x", "/s")
        err(errno.EROFS, fs.link, "/f", "/g")
        err(errno.EROFS, fs.chmod, "/f", 0o600)
        err(errno.EROFS, fs.truncate, "/f", 0)
        err(errno.EROFS, fs.setxattr, "/f", "user.x", b"1")
        err(errno.ENOENT, fs.chmod, "/nope", 0o600)                  # the lookup comes first
        assert fs.pread(fs.open("/f", os.O_RDONLY), 4, 0) == b"0123"


def test_second_mount_is_ebusy():
    dev = RamDev(1 << 20, 512)
    api.mkfs(dev, personality=P)
    with api.mount(dev, personality=P):
        with pytest.raises(BlockingIOError) as ei:
            api.mount(dev, personality=P)
        assert ei.value.errno == errno.EBUSY and "in use" in str(ei.value)
        with pytest.raises(api.ImageBusyError):
            api.fsck(dev, personality=P)
    api.mount(dev, personality=P).unmount()                          # released at unmount


# --- orphans, locking ----------------------------------------------------------------------------------------

def test_unlinked_open_file_lives_until_close(fs):
    fd = fs.open("/f", os.O_RDWR)
    ino = fs.fstat(fd).st_ino
    fs.unlink("/f")
    assert fs.fstat(fd).st_nlink == 0
    fs.pwrite(fd, b"still", 0)
    assert fs.pread(fd, 5, 0) == b"still"
    assert fs.sb.iget(ino) is not None
    fs.close(fd)
    err(errno.ENOENT, fs.sb.iget, ino)                               # evicted at last close


def test_concurrent_cross_renames_do_not_deadlock(fs):
    """Two threads move entries between /d and /e in opposite directions under lockdep."""
    for i in range(20):
        fs.close(fs.open(f"/d/a{i}", os.O_CREAT | os.O_WRONLY))
        fs.close(fs.open(f"/e/b{i}", os.O_CREAT | os.O_WRONLY))
    errors = []

    def mover(src, dst, prefix):
        try:
            for i in range(20):
                fs.rename(f"{src}/{prefix}{i}", f"{dst}/{prefix}{i}")
                fs.stat(f"{dst}/{prefix}{i}")
        except BaseException as e:          # reported below
            errors.append(e)

    ts = [threading.Thread(target=mover, args=("/d", "/e", "a")),
          threading.Thread(target=mover, args=("/e", "/d", "b"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors, errors
    assert sorted(fs.listdir("/e")) == sorted(f"a{i}" for i in range(20))
    assert sorted(fs.listdir("/d")) == sorted(["f", "sub"] + [f"b{i}" for i in range(20)])

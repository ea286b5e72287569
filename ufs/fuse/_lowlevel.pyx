# cython: language_level=3
"""A native libfuse3 low-level session for ufs (``-o fuse_engine=native``).

Layer: top (beside ``ufs.fuse.adapter``).  Imports nothing from ufs at module level; the
session is given a :class:`ufs.fuse.native.NativeOperations` (the adapter's handlers, run
inline).  Links libfuse3.

Design:
- ``fuse_session_new`` + ``fuse_session_loop_mt`` with ``clone_fd``: several kernel-reader
  threads, each reading ``/dev/fuse`` through its own cloned descriptor and serving the
  request it read in the same thread.  No trio, no thread hand-off.
- Every request except READ takes the GIL and calls the Python handler inline.
- READ of a file opened ``O_DIRECT`` on a fast-path personality is served in C without the
  GIL: the extent cache of ``_fastread.h`` (filled through ``NativeOperations.fast_map``
  — the personality's ``iomap_begin`` — once per extent) gives the device addresses, the
  worker ``pread``s the image's O_DIRECT descriptor into its own aligned buffer, zero-fills
  holes and unwritten extents, clamps at EOF and replies with ``fuse_reply_buf``.  Anything
  the fast path does not handle (misaligned I/O, a page cache, delalloc, too many extents,
  a racing mapping change three times in a row) goes to the Python handler, which gives the
  library's exact answer (EINVAL for misaligned O_DIRECT, ...).
- Mapping generation and freeze lock: see ``_fastread.h``.  Requests that may change a
  mapping or size bump the generation before and after the Python call; those that may free
  blocks also hold the freeze lock exclusive around it.  fallocate is a freeze request (punch
  and zero-range free blocks, preallocation changes maps and size); copy_file_range writes
  the destination as write(2) does (bump); lseek SEEK_DATA/SEEK_HOLE is read-only.
- fallocate, lseek (SEEK_DATA/SEEK_HOLE) and copy_file_range reach the adapter's handlers of
  the same names; errors are the library's errno (never ENOSYS, which the kernel would cache
  as "not implemented" for the whole connection).
- readdirplus: names with attributes, so ``ls -l`` needs no LOOKUP per name.  Each entry in
  a reply is one lookup for the kernel; the adapter counts exactly those, before the reply is
  sent, and takes them back if the reply cannot be delivered (``ll_readdirplus``).
  ``$UFS_FUSE_READDIRPLUS=0`` leaves it out (plain readdir, a LOOKUP per name), for
  comparisons.  ``stats()`` reports LOOKUP/READDIRPLUS counts and the inodes the adapter still
  knew at close (the kernel forgets nothing at unmount).

Errors: a Python handler's ``FUSEError``/``OSError`` becomes its errno; anything else is logged
and answered EIO (the adapter's rule).  Signals: libfuse's handlers (SIGINT/SIGTERM/SIGHUP)
end the loop; the caller then unmounts.
"""
from libc.stdint cimport uint64_t, uint32_t, int64_t
from libc.string cimport memset, strlen
from libc.stdlib cimport calloc, free, malloc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from ufs.iomap.bdev cimport BIO_READ, IoQueue, bio_t

import errno as _errno
import logging
import os

cdef extern from "<sys/stat.h>":
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    cdef struct stat:
        unsigned long st_ino
        unsigned int st_mode
        unsigned long st_nlink
        unsigned int st_uid
        unsigned int st_gid
        unsigned long st_rdev
        long st_size
        long st_blksize
        long st_blocks
        timespec st_atim
        timespec st_mtim
        timespec st_ctim

cdef extern from "<sys/statvfs.h>":
    cdef struct statvfs:
        unsigned long f_bsize
        unsigned long f_frsize
        unsigned long f_blocks
        unsigned long f_bfree
        unsigned long f_bavail
        unsigned long f_files
        unsigned long f_ffree
        unsigned long f_favail
        unsigned long f_namemax

cdef extern from *:
    """
    #define FUSE_USE_VERSION 314
    #include <fuse_lowlevel.h>
    #include <signal.h>
    """
    ctypedef uint64_t fuse_ino_t
    ctypedef void* fuse_req_t
    struct fuse_session:
        pass
    struct fuse_loop_config:
        pass
    struct fuse_args:
        int argc
        char** argv
        int allocated
    struct fuse_file_info:
        int flags
        unsigned int direct_io
        unsigned int keep_cache
        uint64_t fh
    struct fuse_entry_param:
        fuse_ino_t ino
        uint64_t generation
        stat attr
        double attr_timeout
        double entry_timeout
    struct fuse_ctx:
        unsigned int uid
        unsigned int gid
        int pid
        unsigned int umask
    struct fuse_conn_info:
        unsigned int capable
        unsigned int want
        unsigned int max_write
        unsigned int max_readahead
        unsigned int max_background
        unsigned int congestion_threshold
    struct fuse_forget_data:
        uint64_t ino
        uint64_t nlookup
    struct fuse_lowlevel_ops:
        void (*init)(void*, fuse_conn_info*) noexcept
        void (*lookup)(fuse_req_t, fuse_ino_t, const char*) noexcept
        void (*forget)(fuse_req_t, fuse_ino_t, uint64_t) noexcept
        void (*getattr)(fuse_req_t, fuse_ino_t, fuse_file_info*) noexcept
        void (*setattr)(fuse_req_t, fuse_ino_t, stat*, int, fuse_file_info*) noexcept
        void (*readlink)(fuse_req_t, fuse_ino_t) noexcept
        void (*mkdir)(fuse_req_t, fuse_ino_t, const char*, unsigned int) noexcept
        void (*unlink)(fuse_req_t, fuse_ino_t, const char*) noexcept
        void (*rmdir)(fuse_req_t, fuse_ino_t, const char*) noexcept
        void (*symlink)(fuse_req_t, const char*, fuse_ino_t, const char*) noexcept
        void (*rename)(fuse_req_t, fuse_ino_t, const char*, fuse_ino_t, const char*,
                       unsigned int) noexcept
        void (*link)(fuse_req_t, fuse_ino_t, fuse_ino_t, const char*) noexcept
        void (*open)(fuse_req_t, fuse_ino_t, fuse_file_info*) noexcept
        void (*read)(fuse_req_t, fuse_ino_t, size_t, long, fuse_file_info*) noexcept nogil
        void (*write)(fuse_req_t, fuse_ino_t, const char*, size_t, long,
                      fuse_file_info*) noexcept
        void (*flush)(fuse_req_t, fuse_ino_t, fuse_file_info*) noexcept
        void (*release)(fuse_req_t, fuse_ino_t, fuse_file_info*) noexcept nogil
        void (*fsync)(fuse_req_t, fuse_ino_t, int, fuse_file_info*) noexcept
        void (*opendir)(fuse_req_t, fuse_ino_t, fuse_file_info*) noexcept
        void (*readdir)(fuse_req_t, fuse_ino_t, size_t, long, fuse_file_info*) noexcept
        void (*releasedir)(fuse_req_t, fuse_ino_t, fuse_file_info*) noexcept
        void (*fsyncdir)(fuse_req_t, fuse_ino_t, int, fuse_file_info*) noexcept
        void (*statfs)(fuse_req_t, fuse_ino_t) noexcept
        void (*setxattr)(fuse_req_t, fuse_ino_t, const char*, const char*, size_t,
                         int) noexcept
        void (*getxattr)(fuse_req_t, fuse_ino_t, const char*, size_t) noexcept
        void (*listxattr)(fuse_req_t, fuse_ino_t, size_t) noexcept
        void (*removexattr)(fuse_req_t, fuse_ino_t, const char*) noexcept
        void (*create)(fuse_req_t, fuse_ino_t, const char*, unsigned int,
                       fuse_file_info*) noexcept
        void (*forget_multi)(fuse_req_t, size_t, fuse_forget_data*) noexcept
        void (*fallocate)(fuse_req_t, fuse_ino_t, int, long, long, fuse_file_info*) noexcept
        void (*readdirplus)(fuse_req_t, fuse_ino_t, size_t, long, fuse_file_info*) noexcept
        void (*copy_file_range)(fuse_req_t, fuse_ino_t, long, fuse_file_info*, fuse_ino_t,
                                long, fuse_file_info*, size_t, int) noexcept
        void (*lseek)(fuse_req_t, fuse_ino_t, long, int, fuse_file_info*) noexcept

    int FUSE_SET_ATTR_SIZE
    int FUSE_ROOT_ID

    fuse_session* fuse_session_new(fuse_args* args, const fuse_lowlevel_ops* op,
                                   size_t op_size, void* userdata) nogil
    int fuse_session_mount(fuse_session* se, const char* mountpoint) nogil
    void fuse_session_unmount(fuse_session* se) nogil
    void fuse_session_destroy(fuse_session* se) nogil
    void fuse_session_exit(fuse_session* se) nogil
    int fuse_session_exited(fuse_session* se) nogil
    int fuse_session_fd(fuse_session* se) nogil
    int fuse_set_signal_handlers(fuse_session* se) nogil
    void fuse_remove_signal_handlers(fuse_session* se) nogil
    int fuse_session_loop_mt(fuse_session* se, fuse_loop_config* config) nogil
    fuse_loop_config* fuse_loop_cfg_create() nogil
    void fuse_loop_cfg_destroy(fuse_loop_config* c) nogil
    void fuse_loop_cfg_set_idle_threads(fuse_loop_config* c, unsigned int n) nogil
    void fuse_loop_cfg_set_max_threads(fuse_loop_config* c, unsigned int n) nogil
    void fuse_loop_cfg_set_clone_fd(fuse_loop_config* c, unsigned int v) nogil
    void fuse_opt_free_args(fuse_args* args) nogil

    const fuse_ctx* fuse_req_ctx(fuse_req_t req) nogil
    int fuse_reply_err(fuse_req_t req, int err) nogil
    void fuse_reply_none(fuse_req_t req) nogil
    int fuse_reply_entry(fuse_req_t req, const fuse_entry_param* e) nogil
    int fuse_reply_create(fuse_req_t req, const fuse_entry_param* e,
                          const fuse_file_info* fi) nogil
    int fuse_reply_attr(fuse_req_t req, const stat* attr, double attr_timeout) nogil
    int fuse_reply_readlink(fuse_req_t req, const char* link) nogil
    int fuse_reply_open(fuse_req_t req, const fuse_file_info* fi) nogil
    int fuse_reply_write(fuse_req_t req, size_t count) nogil
    int fuse_reply_buf(fuse_req_t req, const char* buf, size_t size) nogil
    int fuse_reply_statfs(fuse_req_t req, const statvfs* stbuf) nogil
    int fuse_reply_xattr(fuse_req_t req, size_t count) nogil
    int fuse_reply_lseek(fuse_req_t req, long off) nogil
    size_t fuse_add_direntry(fuse_req_t req, char* buf, size_t bufsize, const char* name,
                             const stat* stbuf, long off) nogil
    size_t fuse_add_direntry_plus(fuse_req_t req, char* buf, size_t bufsize, const char* name,
                                  const fuse_entry_param* e, long off) nogil

cdef extern from "_fastread.h" nogil:
    ctypedef struct ufs_ext:
        uint64_t off, len, addr
        int type
    ctypedef struct ufs_fh:
        int ufs_fd
        int fast
        uint64_t gen
        uint64_t nofast_gen
        int size_valid
        uint64_t i_size
    int UFS_PLAN_MAX
    uint64_t g_gen
    int g_dev_fd
    uint32_t g_lbs
    uint64_t g_fast_reads, g_fast_misses, g_slow_reads
    int ufs_fast_init()
    uint64_t ufs_gen_load()
    void ufs_gen_bump()
    void ufs_count(uint64_t* c)
    ufs_fh* ufs_fh_new(int fd, int fast)
    void ufs_fh_free(ufs_fh* f)
    void ufs_fh_sync_gen(ufs_fh* f, uint64_t g)
    void ufs_fh_insert(ufs_fh* f, const ufs_ext* e)
    int ufs_fh_plan(ufs_fh* f, uint64_t pos, uint64_t end, ufs_ext* plan)
    char* ufs_thread_buf(size_t size)
    int ufs_fast_io(const ufs_ext* plan, int n, uint64_t pos, uint64_t end, char* buf)
    int ufs_fast_enter(uint64_t g)
    void ufs_fast_exit()
    void ufs_freeze()
    void ufs_thaw()
    int ufs_dec_int(int* p)
    void ufs_set_err(int* p, int err)
    ctypedef struct pthread_mutex_t:
        pass

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** p, size_t alignment, size_t size)

cdef extern from *:
    """
    #define UFS_FH_LOCK(f) (&((ufs_fh *)(f))->lock)
    """
    pthread_mutex_t* UFS_FH_LOCK(ufs_fh* f) nogil

log = logging.getLogger("ufs.fuse")

cdef object _ops = None              # the NativeOperations being served (one session a process)
cdef object _FUSEError = None
cdef fuse_session* _se = NULL
cdef bint _inited = False
cdef object _nodes_at_close = None   # inodes the adapter still knew when the session ended
cdef uint64_t _n_lookups = 0         # LOOKUP requests (GIL held: plain increments)
cdef uint64_t _n_readdirplus = 0     # READDIRPLUS requests

cdef enum:
    _ENOMEM = 12
    _EIO = 5

cdef enum:
    CLS_READONLY = 0     # changes no mapping or size
    CLS_BUMP = 1         # may change a mapping/size: generation bumped around it
    CLS_FREEZE = 2       # may free blocks: also the freeze lock exclusive


# -- helpers (GIL held) ---------------------------------------------------------------------
cdef int _errno_of(BaseException e):
    if _FUSEError is not None and isinstance(e, _FUSEError):
        return e.errno
    if isinstance(e, OSError) and isinstance(e.errno, int) and e.errno > 0:
        return e.errno
    try:
        _ops.requests_failed += 1
    except Exception:
        pass
    log.error("unexpected error in a native FUSE handler; answering EIO", exc_info=e)
    return _errno.EIO


cdef object _ctx(fuse_req_t req):
    cdef const fuse_ctx* c = fuse_req_ctx(req)
    return _ops.ctx(c.uid, c.gid, c.pid, c.umask)


cdef void _fill_stat(stat* st, tuple t):
    # t: entry_tuple(): ino, gen, entry_to, attr_to, mode, nlink, uid, gid, rdev, size,
    #    blksize, blocks, atime_ns, mtime_ns, ctime_ns
    memset(st, 0, sizeof(stat))
    st.st_ino = t[0]
    st.st_mode = t[4]
    st.st_nlink = t[5]
    st.st_uid = t[6]
    st.st_gid = t[7]
    st.st_rdev = t[8]
    st.st_size = t[9]
    st.st_blksize = t[10]
    st.st_blocks = t[11]
    st.st_atim.tv_sec = t[12] // 1000000000
    st.st_atim.tv_nsec = t[12] % 1000000000
    st.st_mtim.tv_sec = t[13] // 1000000000
    st.st_mtim.tv_nsec = t[13] % 1000000000
    st.st_ctim.tv_sec = t[14] // 1000000000
    st.st_ctim.tv_nsec = t[14] % 1000000000


cdef void _fill_entry(fuse_entry_param* e, tuple t):
    memset(e, 0, sizeof(fuse_entry_param))
    e.ino = t[0]
    e.generation = t[1]
    e.entry_timeout = t[2]
    e.attr_timeout = t[3]
    _fill_stat(&e.attr, t)


cdef inline void _enter(int cls) noexcept nogil:
    if cls == CLS_FREEZE:
        ufs_freeze()
    if cls != CLS_READONLY:
        ufs_gen_bump()


cdef inline void _leave(int cls) noexcept nogil:
    if cls != CLS_READONLY:
        ufs_gen_bump()
    if cls == CLS_FREEZE:
        ufs_thaw()


cdef inline int _fd_of(fuse_file_info* fi) noexcept nogil:
    return (<ufs_fh*><size_t>fi.fh).ufs_fd


cdef object _fh_arg(fuse_file_info* fi):
    if fi == NULL or fi.fh == 0:
        return None
    return _fd_of(fi)


# -- entry-returning requests -----------------------------------------------------------------
cdef void _reply_entry_call(fuse_req_t req, int cls, str name, tuple args) noexcept:
    cdef fuse_entry_param e
    cdef int err = 0
    with nogil:
        _enter(cls)
    try:
        t = _ops.n_entry(name, *args)
        _fill_entry(&e, t)
    except BaseException as exc:
        err = _errno_of(exc)
    with nogil:
        _leave(cls)
        if err:
            fuse_reply_err(req, err)
        else:
            fuse_reply_entry(req, &e)


cdef void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept with gil:
    global _n_lookups
    _n_lookups += 1
    _reply_entry_call(req, CLS_READONLY, "lookup", (parent, <bytes>name, _ctx(req)))


cdef void ll_mkdir(fuse_req_t req, fuse_ino_t parent, const char* name,
                   unsigned int mode) noexcept with gil:
    _reply_entry_call(req, CLS_BUMP, "mkdir", (parent, <bytes>name, mode, _ctx(req)))


cdef void ll_symlink(fuse_req_t req, const char* link, fuse_ino_t parent,
                     const char* name) noexcept with gil:
    _reply_entry_call(req, CLS_BUMP, "symlink", (parent, <bytes>name, <bytes>link, _ctx(req)))


cdef void ll_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent,
                  const char* newname) noexcept with gil:
    _reply_entry_call(req, CLS_BUMP, "link", (ino, newparent, <bytes>newname, _ctx(req)))


cdef void ll_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept with gil:
    cdef stat st
    cdef double to = 0
    cdef int err = 0
    try:
        t = _ops.n_entry("getattr", ino, _ctx(req))
        _fill_stat(&st, t)
        to = t[3]
    except BaseException as exc:
        err = _errno_of(exc)
    with nogil:
        if err:
            fuse_reply_err(req, err)
        else:
            fuse_reply_attr(req, &st, to)


cdef void ll_setattr(fuse_req_t req, fuse_ino_t ino, stat* attr, int to_set,
                     fuse_file_info* fi) noexcept with gil:
    cdef stat st
    cdef double to = 0
    cdef int err = 0
    cdef int cls = CLS_FREEZE if to_set & FUSE_SET_ATTR_SIZE else CLS_BUMP
    with nogil:
        _enter(cls)
    try:
        t = _ops.n_setattr(
            ino, to_set, attr.st_mode, attr.st_uid, attr.st_gid, attr.st_size,
            attr.st_atim.tv_sec * 1000000000 + attr.st_atim.tv_nsec,
            attr.st_mtim.tv_sec * 1000000000 + attr.st_mtim.tv_nsec,
            attr.st_ctim.tv_sec * 1000000000 + attr.st_ctim.tv_nsec,
            # the kernel names a handle only for ftruncate (ATTR_FILE): a regular file's
            _fh_arg(fi) if to_set & FUSE_SET_ATTR_SIZE else None, _ctx(req))
        _fill_stat(&st, t)
        to = t[3]
    except BaseException as exc:
        err = _errno_of(exc)
    with nogil:
        _leave(cls)
        if err:
            fuse_reply_err(req, err)
        else:
            fuse_reply_attr(req, &st, to)


# -- requests answered with an errno only ---------------------------------------------------------
cdef void _reply_err_call(fuse_req_t req, int cls, str name, tuple args) noexcept:
    cdef int err = 0
    with nogil:
        _enter(cls)
    try:
        _ops.call(name, *args)
    except BaseException as exc:
        err = _errno_of(exc)
    with nogil:
        _leave(cls)
        fuse_reply_err(req, err)


cdef void ll_unlink(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept with gil:
    _reply_err_call(req, CLS_FREEZE, "unlink", (parent, <bytes>name, _ctx(req)))


cdef void ll_rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept with gil:
    _reply_err_call(req, CLS_BUMP, "rmdir", (parent, <bytes>name, _ctx(req)))


cdef void ll_rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
                    const char* newname, unsigned int flags) noexcept with gil:
    _reply_err_call(req, CLS_FREEZE, "rename",
                    (parent, <bytes>name, newparent, <bytes>newname, flags, _ctx(req)))


cdef void ll_flush(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept with gil:
    _reply_err_call(req, CLS_READONLY, "flush", (_fd_of(fi),))


cdef void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                   fuse_file_info* fi) noexcept with gil:
    _reply_err_call(req, CLS_BUMP, "fsync", (_fd_of(fi), bool(datasync)))


cdef void ll_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync,
                      fuse_file_info* fi) noexcept with gil:
    _reply_err_call(req, CLS_BUMP, "fsyncdir", (fi.fh, bool(datasync)))


cdef void ll_releasedir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept with gil:
    _reply_err_call(req, CLS_READONLY, "releasedir", (fi.fh,))


cdef void ll_setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value,
                      size_t size, int flags) noexcept with gil:
    _reply_err_call(req, CLS_BUMP, "setxattr", (ino, <bytes>name, value[:size], _ctx(req)))


cdef void ll_removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) noexcept with gil:
    _reply_err_call(req, CLS_BUMP, "removexattr", (ino, <bytes>name, _ctx(req)))


cdef void ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) noexcept with gil:
    try:
        _ops.call("forget", [(ino, nlookup)])
    except BaseException as exc:
        _errno_of(exc)
    fuse_reply_none(req)


cdef void ll_forget_multi(fuse_req_t req, size_t count,
                          fuse_forget_data* forgets) noexcept with gil:
    cdef size_t i
    try:
        _ops.call("forget", [(forgets[i].ino, forgets[i].nlookup) for i in range(count)])
    except BaseException as exc:
        _errno_of(exc)
    fuse_reply_none(req)


# -- data-returning requests ------------------------------------------------------------------
cdef void _reply_bytes(fuse_req_t req, object data, int err) noexcept with gil:
    if err:
        fuse_reply_err(req, err)
        return
    cdef bytes b = bytes(data)
    cdef const char* p = PyBytes_AS_STRING(b)
    cdef size_t n = PyBytes_GET_SIZE(b)
    with nogil:
        fuse_reply_buf(req, p, n)


cdef void ll_readlink(fuse_req_t req, fuse_ino_t ino) noexcept with gil:
    cdef bytes target
    cdef int err = 0
    try:
        target = bytes(_ops.call("readlink", ino, _ctx(req)))
    except BaseException as exc:
        err = _errno_of(exc)
    if err:
        fuse_reply_err(req, err)
    else:
        fuse_reply_readlink(req, target)


cdef void ll_statfs(fuse_req_t req, fuse_ino_t ino) noexcept with gil:
    cdef statvfs s
    cdef int err = 0
    memset(&s, 0, sizeof(statvfs))
    try:
        t = _ops.n_statfs(_ctx(req))
        (s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
         s.f_favail, s.f_namemax) = t
    except BaseException as exc:
        err = _errno_of(exc)
    if err:
        fuse_reply_err(req, err)
    else:
        fuse_reply_statfs(req, &s)


cdef void _reply_xattr(fuse_req_t req, object value, size_t size, int err) noexcept with gil:
    if err:
        fuse_reply_err(req, err)
        return
    cdef bytes b = bytes(value)
    if size == 0:
        fuse_reply_xattr(req, len(b))
    elif <size_t>len(b) > size:
        fuse_reply_err(req, _errno.ERANGE)
    else:
        fuse_reply_buf(req, b, len(b))


cdef void ll_getxattr(fuse_req_t req, fuse_ino_t ino, const char* name,
                      size_t size) noexcept with gil:
    cdef int err = 0
    value = b""
    try:
        value = _ops.call("getxattr", ino, <bytes>name, _ctx(req))
    except BaseException as exc:
        err = _errno_of(exc)
    _reply_xattr(req, value, size, err)


cdef void ll_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) noexcept with gil:
    cdef int err = 0
    value = b""
    try:
        value = _ops.n_listxattr(ino, _ctx(req))
    except BaseException as exc:
        err = _errno_of(exc)
    _reply_xattr(req, value, size, err)


# -- directories ------------------------------------------------------------------------------------
cdef void ll_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept with gil:
    cdef int err = 0
    try:
        fi.fh = _ops.call("opendir", ino, _ctx(req))
    except BaseException as exc:
        err = _errno_of(exc)
    if err:
        fuse_reply_err(req, err)
    else:
        fuse_reply_open(req, fi)


cdef void ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, long off,
                     fuse_file_info* fi) noexcept with gil:
    cdef stat st
    cdef char* buf = <char*>malloc(size)
    cdef size_t used = 0, need
    cdef int err = 0
    if buf == NULL:
        fuse_reply_err(req, _errno.ENOMEM)
        return
    try:
        # a 24-byte header and 8-byte padding per entry: never more than size // 32 fit
        for name, fino, dtype, nxt in _ops.n_readdir(fi.fh, off, max(1, size // 32)):
            memset(&st, 0, sizeof(stat))
            st.st_ino = fino
            st.st_mode = (<unsigned int>dtype) << 12
            need = fuse_add_direntry(req, buf + used, size - used, name, &st, nxt)
            if need > size - used:
                break
            used += need
    except BaseException as exc:
        err = _errno_of(exc)
    if err:
        fuse_reply_err(req, err)
    else:
        fuse_reply_buf(req, buf, used)
    free(buf)


cdef void ll_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, long off,
                         fuse_file_info* fi) noexcept with gil:
    """Entries with their attributes.  Lookup counts: every entry in the reply is one lookup
    for the kernel (it links each, or forgets it if it cannot), so exactly the entries that fit
    in the buffer are counted, before the reply goes out (a FORGET may follow it at once), and
    uncounted again if the reply could not be delivered (the kernel never saw them)."""
    cdef fuse_entry_param e
    cdef char* buf = <char*>malloc(size)
    cdef size_t used = 0, need
    cdef int err = 0, rc
    cdef list taken = []
    global _n_readdirplus
    _n_readdirplus += 1
    if buf == NULL:
        fuse_reply_err(req, _errno.ENOMEM)
        return
    try:
        # a 152-byte header (dirent + entry_out) and 8-byte padding per entry
        for name, t, nxt, key in _ops.n_readdirplus(fi.fh, off, size // 152 + 1):
            _fill_entry(&e, t)
            need = fuse_add_direntry_plus(req, buf + used, size - used, name, &e, nxt)
            if need > size - used:
                break                   # not written: not returned, not counted
            used += need
            taken.append(key)
        _ops.n_readdirplus_count(fi.fh, taken)
    except BaseException as exc:
        err = _errno_of(exc)
    if err:
        fuse_reply_err(req, err)
    else:
        with nogil:
            rc = fuse_reply_buf(req, buf, used)
        if rc != 0 and taken:
            try:
                _ops.n_readdirplus_uncount(fi.fh, taken)
            except BaseException as exc:
                _errno_of(exc)
    free(buf)


# -- files --------------------------------------------------------------------------------------------
cdef int _open_reply(fuse_req_t req, fuse_file_info* fi, tuple r,
                     fuse_entry_param* e) noexcept with gil:
    """Wrap the ufs descriptor in a ufs_fh; reply open or create.  0, or -ENOMEM."""
    cdef ufs_fh* f = ufs_fh_new(r[0], 1 if r[3] else 0)
    if f == NULL:
        return -_errno.ENOMEM
    fi.fh = <uint64_t><size_t>f
    fi.direct_io = 1 if r[1] else 0
    fi.keep_cache = 1 if r[2] else 0
    if e != NULL:
        fuse_reply_create(req, e, fi)
    else:
        fuse_reply_open(req, fi)
    return 0


cdef void ll_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept with gil:
    cdef int err = 0
    cdef int cls = CLS_FREEZE if fi.flags & os.O_TRUNC else CLS_READONLY
    cdef tuple r = None
    with nogil:
        _enter(cls)
    try:
        r = _ops.n_open(ino, fi.flags, _ctx(req))
    except BaseException as exc:
        err = _errno_of(exc)
    with nogil:
        _leave(cls)
    if not err:
        err = -_open_reply(req, fi, r, NULL)
        if err:
            _ops.call("release", r[0])
    if err:
        fuse_reply_err(req, err)


cdef void ll_create(fuse_req_t req, fuse_ino_t parent, const char* name, unsigned int mode,
                    fuse_file_info* fi) noexcept with gil:
    cdef int err = 0
    cdef fuse_entry_param e
    cdef tuple r = None
    with nogil:
        _enter(CLS_FREEZE)
    try:
        r = _ops.n_create(parent, <bytes>name, mode, fi.flags, _ctx(req))
        _fill_entry(&e, r[4])
    except BaseException as exc:
        err = _errno_of(exc)
    with nogil:
        _leave(CLS_FREEZE)
    if not err:
        err = -_open_reply(req, fi, r, &e)
        if err:
            _ops.call("release", r[0])
    if err:
        fuse_reply_err(req, err)


cdef void ll_release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept nogil:
    cdef ufs_fh* f = <ufs_fh*><size_t>fi.fh
    cdef int err = 0
    # the last close of an unlinked file frees its blocks
    _enter(CLS_FREEZE)
    with gil:
        try:
            _ops.call("release", f.ufs_fd)
        except BaseException as exc:
            err = _errno_of(exc)
    _leave(CLS_FREEZE)
    ufs_fh_free(f)
    fuse_reply_err(req, err)


cdef void _reply_write_call(fuse_req_t req, str name, tuple args) noexcept:
    # requests that write data (may allocate, never free): the bump class; the reply is
    # the byte count
    cdef int err = 0
    cdef size_t n = 0
    with nogil:
        _enter(CLS_BUMP)
    try:
        n = _ops.call(name, *args)
    except BaseException as exc:
        err = _errno_of(exc)
    with nogil:
        _leave(CLS_BUMP)
        if err:
            fuse_reply_err(req, err)
        else:
            fuse_reply_write(req, n)


cdef void ll_write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, long off,
                   fuse_file_info* fi) noexcept with gil:
    _reply_write_call(req, "write", (_fd_of(fi), off, buf[:size]))


cdef void ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, long offset, long length,
                       fuse_file_info* fi) noexcept with gil:
    # preallocation changes mappings (unwritten extents, i_size); PUNCH_HOLE and ZERO_RANGE
    # free blocks a fast read may have mapped: the freeze class, as truncate
    _reply_err_call(req, CLS_FREEZE, "fallocate", (_fd_of(fi), mode, offset, length))


cdef void ll_lseek(fuse_req_t req, fuse_ino_t ino, long off, int whence,
                   fuse_file_info* fi) noexcept with gil:
    cdef int err = 0
    cdef long pos = 0
    try:
        pos = _ops.call("lseek", _fd_of(fi), off, whence)
    except BaseException as exc:
        err = _errno_of(exc)
    with nogil:
        if err:
            fuse_reply_err(req, err)
        else:
            fuse_reply_lseek(req, pos)


cdef void ll_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, long off_in,
                             fuse_file_info* fi_in, fuse_ino_t ino_out, long off_out,
                             fuse_file_info* fi_out, size_t length, int flags) noexcept with gil:
    _reply_write_call(req, "copy_file_range",
                      (_fd_of(fi_in), off_in, _fd_of(fi_out), off_out, length, flags))


cdef void _slow_read(fuse_req_t req, int fd, size_t size, long off) noexcept with gil:
    cdef int err = 0
    data = b""
    try:
        data = _ops.call("read", fd, off, size)
    except BaseException as exc:
        err = _errno_of(exc)
    _reply_bytes(req, data, err)


cdef int _fetch(ufs_fh* f, uint64_t g, uint64_t pos, size_t size, ufs_ext* plan,
                int* nplan, uint64_t* i_size) noexcept with gil:
    """Ask the personality for the map of [pos, pos + size); fill plan and the cache.
    1 on success, 0 if the fast path must not serve this file now."""
    cdef ufs_ext e
    cdef int n = 0
    try:
        r = _ops.fast_map(f.ufs_fd, pos, size)
    except BaseException as exc:
        _errno_of(exc)
        return 0
    with nogil:
        pthread_mutex_lock(UFS_FH_LOCK(f))
        ufs_fh_sync_gen(f, g)
    try:
        if r is None:
            if ufs_gen_load() == g:
                f.nofast_gen = g + 1
            return 0
        size_now, exts = r
        if len(exts) > UFS_PLAN_MAX:
            return 0
        for off, length, typ, addr in exts:
            e.off = off
            e.len = length
            e.type = typ
            e.addr = addr if typ == 2 else 0
            plan[n] = e
            n += 1
            if ufs_gen_load() == g:
                ufs_fh_insert(f, &e)
        if ufs_gen_load() == g:
            f.i_size = size_now
            f.size_valid = 1
        nplan[0] = n
        i_size[0] = size_now
        return 1
    finally:
        pthread_mutex_unlock(UFS_FH_LOCK(f))


ctypedef struct fast_req:
    fuse_req_t req
    char* buf
    size_t len
    int pending             # bios not yet ended + 1 while the submitter still holds it
    int err                 # first -errno of a bio
    bio_t* bios


cdef IoQueue _fastq = None  # reaper queue on the image: fast reads complete on its thread


cdef void _fast_req_done(fast_req* r) noexcept nogil:
    if r.err:
        fuse_reply_err(r.req, -r.err)
    else:
        fuse_reply_buf(r.req, r.buf, r.len)
    free(r.buf)
    free(r.bios)
    free(r)
    ufs_fast_exit()
    ufs_count(&g_fast_reads)


cdef void _fast_end_io(bio_t* b) noexcept nogil:
    cdef fast_req* r = <fast_req*>b.private
    if b.status < 0:
        ufs_set_err(&r.err, b.status)
    if ufs_dec_int(&r.pending) == 0:
        _fast_req_done(r)


cdef int _fast_submit(fuse_req_t req, const ufs_ext* plan, int n, uint64_t off,
                      uint64_t end) noexcept nogil:
    """Start the device reads of one entered fast read on the reaper queue; the last bio
    to end replies.  0, or -ENOMEM (nothing started: the caller exits and falls back)."""
    cdef fast_req* r = <fast_req*>calloc(1, sizeof(fast_req))
    cdef void* mem = NULL
    cdef int i, nb = 0
    cdef uint64_t pos = off, seg_end, length, rlen
    cdef bio_t* b
    if r == NULL:
        return -_ENOMEM
    r.bios = <bio_t*>calloc(n if n > 0 else 1, sizeof(bio_t))
    if r.bios == NULL or posix_memalign(&mem, 4096, end - off + g_lbs) != 0:
        free(r.bios)
        free(r)
        return -_ENOMEM
    r.req = req
    r.buf = <char*>mem
    r.len = end - off
    for i in range(n):
        if pos >= end:
            break
        seg_end = plan[i].off + plan[i].len
        if seg_end > end:
            seg_end = end
        length = seg_end - pos
        if plan[i].type != 2:
            memset(r.buf + (pos - off), 0, length)     # hole or unwritten: zeros
        else:
            rlen = (length + g_lbs - 1) & ~(<uint64_t>g_lbs - 1)
            b = &r.bios[nb]
            nb += 1
            b.op = BIO_READ
            b.opf = 0
            b.addr = plan[i].addr + (pos - plan[i].off)
            b.buf = r.buf + (pos - off)
            b.length = rlen
            b.end_io = _fast_end_io
            b.private = <void*>r
            b.next = NULL
        pos = seg_end
    if pos < end:
        r.err = -_EIO
    r.pending = nb + 1
    for i in range(nb):
        _fastq.submit(&r.bios[i])
    if nb:
        _fastq.unplug()
    if ufs_dec_int(&r.pending) == 0:
        _fast_req_done(r)
    return 0


cdef int _fast_read(fuse_req_t req, ufs_fh* f, size_t size, long off) noexcept nogil:
    """Serve one O_DIRECT read without the GIL.  1 if answered (or started: the reaper
    thread answers), 0 to take the slow path."""
    cdef ufs_ext plan[64]
    cdef int n, attempt, rc
    cdef uint64_t g, i_size, end
    cdef char* buf
    if not f.fast or g_dev_fd < 0 or off < 0 or ((<uint64_t>off | size) & (g_lbs - 1)):
        return 0
    for attempt in range(3):
        g = ufs_gen_load()
        n = -1
        pthread_mutex_lock(UFS_FH_LOCK(f))
        ufs_fh_sync_gen(f, g)
        if f.nofast_gen == g + 1:
            pthread_mutex_unlock(UFS_FH_LOCK(f))
            return 0
        if f.size_valid:
            i_size = f.i_size
            end = <uint64_t>off + size
            if end > i_size:
                end = i_size
            n = ufs_fh_plan(f, off, end, plan) if <uint64_t>off < end else 0
        pthread_mutex_unlock(UFS_FH_LOCK(f))
        if n < 0:
            ufs_count(&g_fast_misses)
            if not _fetch(f, g, off, size, plan, &n, &i_size):
                return 0
        end = <uint64_t>off + size
        if end > i_size:
            end = i_size
        if <uint64_t>off >= end:
            fuse_reply_buf(req, NULL, 0)
            ufs_count(&g_fast_reads)
            return 1
        rc = ufs_fast_enter(g)
        if rc == 0:
            return 0                # a freeze is on: the library's locks decide
        if rc < 0:
            continue                # the mapping may have changed since it was learnt
        if _fastq is not None:
            if _fast_submit(req, plan, n, off, end) == 0:
                return 1
            ufs_fast_exit()
            return 0
        buf = ufs_thread_buf(size + g_lbs)
        if buf == NULL:
            ufs_fast_exit()
            return 0
        rc = ufs_fast_io(plan, n, off, end, buf)
        ufs_fast_exit()
        if rc < 0:
            fuse_reply_err(req, -rc)
        else:
            fuse_reply_buf(req, buf, end - <uint64_t>off)
        ufs_count(&g_fast_reads)
        return 1
    return 0


cdef void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, long off,
                  fuse_file_info* fi) noexcept nogil:
    cdef ufs_fh* f = <ufs_fh*><size_t>fi.fh
    if _fast_read(req, f, size, off):
        return
    ufs_count(&g_slow_reads)
    _slow_read(req, f.ufs_fd, size, off)


cdef unsigned int _max_background = 64


cdef void ll_init(void* userdata, fuse_conn_info* conn) noexcept:
    # What pyfuse3 negotiates for the adapter (no writeback cache, no POSIX ACLs: libfuse's
    # defaults), except the background limit: the kernel sends async O_DIRECT reads as
    # background requests and keeps at most max_background (default 12) of them at the
    # daemon, which would cap a QD32 reader at 12 in flight.
    if _max_background:
        conn.max_background = _max_background
        conn.congestion_threshold = _max_background * 3 // 4


# -- the session --------------------------------------------------------------------------------
cdef fuse_lowlevel_ops _llops


cdef void _build_ops():
    memset(&_llops, 0, sizeof(fuse_lowlevel_ops))
    _llops.init = ll_init
    _llops.lookup = ll_lookup
    _llops.forget = ll_forget
    _llops.forget_multi = ll_forget_multi
    _llops.getattr = ll_getattr
    _llops.setattr = ll_setattr
    _llops.readlink = ll_readlink
    _llops.mkdir = ll_mkdir
    _llops.unlink = ll_unlink
    _llops.rmdir = ll_rmdir
    _llops.symlink = ll_symlink
    _llops.rename = ll_rename
    _llops.link = ll_link
    _llops.open = ll_open
    _llops.read = ll_read
    _llops.write = ll_write
    _llops.flush = ll_flush
    _llops.release = ll_release
    _llops.fsync = ll_fsync
    _llops.opendir = ll_opendir
    _llops.readdir = ll_readdir
    _llops.releasedir = ll_releasedir
    _llops.fsyncdir = ll_fsyncdir
    _llops.statfs = ll_statfs
    _llops.setxattr = ll_setxattr
    _llops.getxattr = ll_getxattr
    _llops.listxattr = ll_listxattr
    _llops.removexattr = ll_removexattr
    _llops.create = ll_create
    _llops.fallocate = ll_fallocate
    _llops.lseek = ll_lseek
    _llops.copy_file_range = ll_copy_file_range


def stats() -> dict:
    """Counters of the read paths and the inodes known at close (for benchmarks and tests)."""
    return {"fast_reads": g_fast_reads, "fast_misses": g_fast_misses,
            "slow_reads": g_slow_reads, "generation": ufs_gen_load(),
            "lookups": _n_lookups, "readdirplus": _n_readdirplus, "nodes": _nodes_at_close}


def mount(ops, str mountpoint, options, unsigned int max_background=64) -> None:
    """Create the session for ``ops`` (a NativeOperations) and mount it at ``mountpoint``
    with the kernel mount ``options`` (an iterable of ``-o`` items); ``max_background``: how
    many background (async DIO) requests the kernel may have at the daemon (0: the kernel's
    default).  One per process."""
    global _ops, _FUSEError, _se, _inited, _max_background
    _max_background = max_background
    if _se != NULL:
        raise RuntimeError("a native FUSE session is already mounted in this process")
    import pyfuse3
    _FUSEError = pyfuse3.FUSEError
    if not _inited:
        if ufs_fast_init() != 0:
            raise OSError(_errno.ENOMEM, "cannot set up the fast path")
        _build_ops()
        _inited = True
    argv = [b"ufs", b"-o", ",".join(sorted(options)).encode()]
    cdef fuse_args args
    cdef char** cargv = <char**>malloc(len(argv) * sizeof(char*))
    for i, a in enumerate(argv):
        cargv[i] = <char*>a
    args.argc = len(argv)
    args.argv = cargv
    args.allocated = 0
    _ops = ops
    global _fastq
    _fastq = ops.fast_queue
    g_dev_fd_set(ops.dev_fd, ops.dev_lbs)
    # $UFS_FUSE_READDIRPLUS=0: plain readdir only (a LOOKUP per name; for comparisons)
    if os.environ.get("UFS_FUSE_READDIRPLUS") == "0":
        _llops.readdirplus = NULL
    else:
        _llops.readdirplus = ll_readdirplus
    se = fuse_session_new(&args, &_llops, sizeof(fuse_lowlevel_ops), NULL)
    free(cargv)
    if se == NULL:
        _ops = None
        _fastq = None
        raise OSError(_errno.EINVAL, "fuse_session_new failed (bad mount options?)")
    mp = os.fsencode(mountpoint)
    cdef const char* cmp = mp
    cdef int rc
    with nogil:
        rc = fuse_session_mount(se, cmp)
    if rc != 0:
        fuse_session_destroy(se)
        _ops = None
        _fastq = None
        raise OSError(_errno.EIO, f"fuse_session_mount failed at {mountpoint}")
    _se = se


cdef void g_dev_fd_set(int fd, uint32_t lbs):
    global g_dev_fd, g_lbs
    g_dev_fd = fd
    g_lbs = lbs


def loop(int max_threads=32, int idle_threads=16) -> int:
    """Serve until the kernel mount goes away or SIGINT/SIGTERM/SIGHUP; returns libfuse's
    status (0, -errno or the signal number).  Runs without the GIL."""
    if _se == NULL:
        raise RuntimeError("not mounted")
    cdef fuse_loop_config* cfg = fuse_loop_cfg_create()
    cdef int rc
    cdef fuse_session* se = _se
    fuse_loop_cfg_set_clone_fd(cfg, 1)
    fuse_loop_cfg_set_max_threads(cfg, max_threads)
    fuse_loop_cfg_set_idle_threads(cfg, idle_threads)
    if fuse_set_signal_handlers(se) != 0:
        fuse_loop_cfg_destroy(cfg)
        raise OSError(_errno.EIO, "cannot install the FUSE signal handlers")
    with nogil:
        rc = fuse_session_loop_mt(se, cfg)
    fuse_remove_signal_handlers(se)
    fuse_loop_cfg_destroy(cfg)
    return rc


def close(bint unmount=True) -> None:
    """Unmount (if asked) and destroy the session (no request is being served after it)."""
    global _se, _ops, _fastq, _nodes_at_close
    if _se == NULL:
        return
    cdef fuse_session* se = _se
    with nogil:
        if unmount:
            fuse_session_unmount(se)
        fuse_session_destroy(se)
    _se = NULL
    try:
        # lookups the kernel never forgot (it forgets nothing at unmount): the root, plus
        # whatever it still had cached; tests use it to check the lookup-count accounting
        _nodes_at_close = len(_ops._nodes)
    except Exception:
        _nodes_at_close = None
    _ops = None
    if _fastq is not None:
        _fastq.close()       # every fast read has completed: the loop has ended
        _fastq = None
    g_dev_fd_set(-1, 512)

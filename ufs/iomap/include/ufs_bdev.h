/*
 * C helpers for ufs/iomap/bdev.pyx: atomics, a raw-syscall io_uring ring, and
 * the Linux constants the device layer needs.  No liburing: the ring is set up
 * with io_uring_setup(2), mapped with mmap(2) and driven with io_uring_enter(2).
 *
 * Memory ordering (the io_uring ABI):
 *   - SQ: we own the tail, the kernel owns the head.  SQEs are written first,
 *     then the tail is published with a release store; the kernel's head is read
 *     with an acquire load before an SQE slot is reused.
 *   - CQ: the kernel owns the tail, we own the head.  The tail is read with an
 *     acquire load before a CQE is read; the head is advanced with a release
 *     store only after the CQE's fields were copied out.
 *
 * One ring is used by one submitter at a time (the caller serialises), and the
 * CQ by one reaper at a time.
 */
#ifndef UFS_BDEV_H
#define UFS_BDEV_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <linux/fs.h>
#include <linux/io_uring.h>

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif
#ifndef STATX_DIOALIGN
#define STATX_DIOALIGN 0x00002000U
#endif
#ifndef IORING_SETUP_SUBMIT_ALL
#define IORING_SETUP_SUBMIT_ALL (1U << 7)
#endif
#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8)
#endif
#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif
#define UFS_TASKRUN_FLAGS (IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN)

/* ---- atomics ---------------------------------------------------------- */

static inline int ufs_atomic_add(int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
static inline int ufs_atomic_load(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void ufs_atomic_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint64_t ufs_atomic_next_u64(uint64_t *p) { return __atomic_fetch_add(p, 1, __ATOMIC_RELAXED); }

static inline double ufs_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* preadv2/pwritev2 on one segment; returns bytes or -errno. */
static inline ssize_t ufs_prw(int fd, int write, char *buf, size_t len, uint64_t off, int flags)
{
    struct iovec iov;
    ssize_t r;
    iov.iov_base = buf;
    iov.iov_len = len;
    r = write ? pwritev2(fd, &iov, 1, (off_t)off, flags) : preadv2(fd, &iov, 1, (off_t)off, flags);
    return r < 0 ? -errno : r;
}

/* statx DIO alignment of an open fd: fills mem/offset alignment (0 = not reported). */
static inline int ufs_dio_align(int fd, unsigned *mem_align, unsigned *offset_align)
{
    struct statx stx;
    memset(&stx, 0, sizeof stx);
    *mem_align = 0;
    *offset_align = 0;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0)
        return -errno;
    if (stx.stx_mask & STATX_DIOALIGN) {
        *mem_align = stx.stx_dio_mem_align;
        *offset_align = stx.stx_dio_offset_align;
    }
    return 0;
}

static inline int ufs_blk_geometry(int fd, uint64_t *size, int *lbs, unsigned *pbs)
{
    if (ioctl(fd, BLKGETSIZE64, size) < 0) return -errno;
    if (ioctl(fd, BLKSSZGET, lbs) < 0) return -errno;
    if (ioctl(fd, BLKPBSZGET, pbs) < 0) return -errno;
    return 0;
}

static inline int ufs_blk_readonly(int fd)
{
    int ro = 0;
    if (ioctl(fd, BLKROGET, &ro) < 0) return -errno;
    return ro != 0;
}

/* ---- io_uring ring ---------------------------------------------------- */

struct ufs_ring {
    int fd;
    unsigned features;
    unsigned sq_entries, cq_entries;
    unsigned sq_mask, cq_mask;
    unsigned *sq_khead, *sq_ktail, *sq_kflags, *sq_array;
    unsigned *cq_khead, *cq_ktail;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    unsigned setup_flags;           /* the IORING_SETUP_* flags the kernel accepted */
    unsigned sqe_tail;              /* next SQE slot we fill; published at flush */
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len, sqes_len;
};

static inline int ufs_sys_setup(unsigned entries, struct io_uring_params *p)
{
    long r = syscall(__NR_io_uring_setup, entries, p);
    return r < 0 ? -errno : (int)r;
}

static inline int ufs_sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    long r = syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
    return r < 0 ? -errno : (int)r;
}

static inline int ufs_sys_register(int fd, unsigned opcode, void *arg, unsigned nr)
{
    long r = syscall(__NR_io_uring_register, fd, opcode, arg, nr);
    return r < 0 ? -errno : (int)r;
}

static inline void ufs_ring_exit(struct ufs_ring *r)
{
    if (r->sqes && r->sqes != MAP_FAILED) munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map && r->sq_map != MAP_FAILED) munmap(r->sq_map, r->sq_map_len);
    if (r->fd >= 0) close(r->fd);
    memset(r, 0, sizeof *r);
    r->fd = -1;
}

/* Set up a ring with `entries` SQEs (the kernel rounds up to a power of two and
 * gives twice as many CQEs).  flags are tried first, then without the optional
 * ones an older kernel refuses.  Returns 0 or -errno. */
static inline int ufs_ring_init(struct ufs_ring *r, unsigned entries, unsigned flags)
{
    struct io_uring_params p;
    int fd;
    unsigned i;
    char *sq;

    memset(r, 0, sizeof *r);
    r->fd = -1;
    /* Older kernels refuse newer flags with EINVAL: drop the task-run ones
     * first, then everything optional. */
    memset(&p, 0, sizeof p);
    p.flags = flags;
    fd = ufs_sys_setup(entries, &p);
    if (fd == -EINVAL && (flags & UFS_TASKRUN_FLAGS)) {
        memset(&p, 0, sizeof p);
        p.flags = flags & ~UFS_TASKRUN_FLAGS;
        fd = ufs_sys_setup(entries, &p);
    }
    if (fd == -EINVAL && flags) {
        memset(&p, 0, sizeof p);
        fd = ufs_sys_setup(entries, &p);
    }
    if (fd < 0) return fd;
    r->fd = fd;
    r->setup_flags = p.flags;
    r->features = p.features;
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;

    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_map_len > r->sq_map_len) r->sq_map_len = r->cq_map_len;
        r->cq_map_len = r->sq_map_len;
    }
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED) goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         fd, IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED) goto fail;
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) goto fail;

    sq = (char *)r->sq_map;
    r->sq_khead = (unsigned *)(sq + p.sq_off.head);
    r->sq_ktail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_kflags = (unsigned *)(sq + p.sq_off.flags);
    r->sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_khead = (unsigned *)((char *)r->cq_map + p.cq_off.head);
    r->cq_ktail = (unsigned *)((char *)r->cq_map + p.cq_off.tail);
    r->cq_mask = *(unsigned *)((char *)r->cq_map + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)((char *)r->cq_map + p.cq_off.cqes);
    /* SQE slot i is always described by array entry i: fill the indirection once. */
    for (i = 0; i < r->sq_entries; i++) r->sq_array[i] = i;
    r->sqe_tail = *r->sq_ktail;
    return 0;
fail:
    {
        int e = -errno;
        ufs_ring_exit(r);
        return e;
    }
}

/* A zeroed SQE slot, or NULL when the SQ is full (flush and enter first). */
static inline struct io_uring_sqe *ufs_ring_get_sqe(struct ufs_ring *r)
{
    unsigned head = __atomic_load_n(r->sq_khead, __ATOMIC_ACQUIRE);
    struct io_uring_sqe *sqe;
    if (r->sqe_tail - head >= r->sq_entries) return NULL;
    sqe = &r->sqes[r->sqe_tail & r->sq_mask];
    r->sqe_tail++;
    memset(sqe, 0, sizeof *sqe);
    return sqe;
}

/* Publish filled SQEs; returns how many the kernel has not consumed yet. */
static inline unsigned ufs_ring_flush(struct ufs_ring *r)
{
    __atomic_store_n(r->sq_ktail, r->sqe_tail, __ATOMIC_RELEASE);
    return r->sqe_tail - __atomic_load_n(r->sq_khead, __ATOMIC_ACQUIRE);
}

static inline unsigned ufs_ring_sq_space(struct ufs_ring *r)
{
    return r->sq_entries - (r->sqe_tail - __atomic_load_n(r->sq_khead, __ATOMIC_ACQUIRE));
}

/* Copy out the next CQE; returns 1 if there was one (and consumes it), else 0. */
static inline int ufs_ring_pop_cqe(struct ufs_ring *r, uint64_t *user_data, int *res)
{
    unsigned head = *r->cq_khead;
    struct io_uring_cqe *cqe;
    if (head == __atomic_load_n(r->cq_ktail, __ATOMIC_ACQUIRE)) return 0;
    cqe = &r->cqes[head & r->cq_mask];
    *user_data = cqe->user_data;
    *res = cqe->res;
    __atomic_store_n(r->cq_khead, head + 1, __ATOMIC_RELEASE);
    return 1;
}

static inline unsigned ufs_ring_cq_ready(struct ufs_ring *r)
{
    return __atomic_load_n(r->cq_ktail, __ATOMIC_ACQUIRE) - *r->cq_khead;
}

static inline void ufs_prep_rw(struct io_uring_sqe *sqe, int op, int fd, int fixed, char *buf,
                               unsigned len, uint64_t off, int rw_flags, uint64_t user_data)
{
    sqe->opcode = (unsigned char)op;
    sqe->fd = fd;
    if (fixed) sqe->flags |= IOSQE_FIXED_FILE;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = len;
    sqe->off = off;
    sqe->rw_flags = rw_flags;
    sqe->user_data = user_data;
}

static inline void ufs_prep_fsync(struct io_uring_sqe *sqe, int fd, int fixed, uint64_t user_data)
{
    sqe->opcode = IORING_OP_FSYNC;
    sqe->fd = fd;
    if (fixed) sqe->flags |= IOSQE_FIXED_FILE;
    sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    sqe->user_data = user_data;
}

static inline void ufs_prep_nop(struct io_uring_sqe *sqe, uint64_t user_data)
{
    sqe->opcode = IORING_OP_NOP;
    sqe->user_data = user_data;
}

#endif /* UFS_BDEV_H */

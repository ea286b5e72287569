/* The C half of the native engine's O_DIRECT read fast path (included by _lowlevel.pyx).
 *
 * Owns: the per-open-file extent cache (ufs_fh), the global mapping generation, the freeze
 * lock and the device reads.  Nothing here touches Python.
 *
 * Invariants:
 * - g_gen is bumped (before and after) around every request the Python side serves that may
 *   change a file's mapping or size.  A cached extent or size is used only while g_gen equals
 *   the generation it was filled under; the comparison is made after the read has entered
 *   (ufs_fast_enter), so a read that entered uses a mapping no request has changed since.
 * - Freeze: the requests that can free blocks (truncate, unlink, rename over a file, release
 *   of an unlinked file, fallocate) call ufs_freeze() first: it raises g_freezing and waits
 *   until no fast read is in flight (g_fast_inflight == 0: entered, device I/O not yet
 *   completed); reads that find g_freezing raised take the Python path (the library's own
 *   locks).  Both sides use sequentially consistent atomics (increment-then-check against
 *   set-then-check), so either the read sees the freeze or the freezer sees the read.
 *   ufs_thaw() ends it.  g_freeze_mutex serialises freezers only.
 * - fh->lock is a leaf, never held while the GIL is taken or a freeze is waited for.
 */
#ifndef UFS_FASTREAD_H
#define UFS_FASTREAD_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define UFS_EXT_HOLE 0
#define UFS_EXT_MAPPED 2
#define UFS_EXT_UNWRITTEN 3
#define UFS_FH_MAX_EXT 4096      /* cache entries per open file before it is reset */
#define UFS_PLAN_MAX 64          /* extents one request may span on the fast path */

typedef struct {
    uint64_t off, len, addr;     /* file bytes, bytes, device bytes */
    int type;
} ufs_ext;

typedef struct {
    int ufs_fd;                  /* the ufs descriptor the Python handlers take */
    int fast;                    /* O_DIRECT regular file of a fast-path personality */
    pthread_mutex_t lock;
    uint64_t gen;                /* g_gen the cache below was filled under */
    uint64_t nofast_gen;         /* g_gen + 1 at which the map fetch said "not now"; 0: none */
    int size_valid;
    uint64_t i_size;
    int n, cap;
    ufs_ext *ext;                /* sorted by off, non-overlapping */
} ufs_fh;

static uint64_t g_gen = 1;
static int g_freezing = 0;
static int64_t g_fast_inflight = 0;
static pthread_mutex_t g_freeze_mutex = PTHREAD_MUTEX_INITIALIZER;
static int g_dev_fd = -1;
static uint32_t g_lbs = 512;
static pthread_key_t g_buf_key;
static uint64_t g_fast_reads = 0, g_fast_misses = 0, g_slow_reads = 0;

static inline uint64_t ufs_gen_load(void) { return __atomic_load_n(&g_gen, __ATOMIC_SEQ_CST); }
static inline void ufs_gen_bump(void) { __atomic_add_fetch(&g_gen, 1, __ATOMIC_SEQ_CST); }
static inline void ufs_count(uint64_t *c) { __atomic_add_fetch(c, 1, __ATOMIC_RELAXED); }

static int ufs_fast_init(void)
{
    return pthread_key_create(&g_buf_key, free);
}

/* A fast read that learnt its mapping under generation g wants to use it: 1 go (call
 * ufs_fast_exit() once its I/O completed), 0 a freeze is on (take the Python path), -1 the
 * mapping changed since (learn it again). */
static inline int ufs_fast_enter(uint64_t g)
{
    __atomic_add_fetch(&g_fast_inflight, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&g_freezing, __ATOMIC_SEQ_CST)) {
        __atomic_sub_fetch(&g_fast_inflight, 1, __ATOMIC_SEQ_CST);
        return 0;
    }
    if (ufs_gen_load() != g) {
        __atomic_sub_fetch(&g_fast_inflight, 1, __ATOMIC_SEQ_CST);
        return -1;
    }
    return 1;
}

static inline void ufs_fast_exit(void)
{
    __atomic_sub_fetch(&g_fast_inflight, 1, __ATOMIC_SEQ_CST);
}

static void ufs_freeze(void)
{
    pthread_mutex_lock(&g_freeze_mutex);
    __atomic_store_n(&g_freezing, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&g_fast_inflight, __ATOMIC_SEQ_CST) > 0)
        usleep(20);
}

static void ufs_thaw(void)
{
    __atomic_store_n(&g_freezing, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&g_freeze_mutex);
}

static inline int ufs_dec_int(int *p) { return __atomic_sub_fetch(p, 1, __ATOMIC_SEQ_CST); }

/* first error wins */
static inline void ufs_set_err(int *p, int err)
{
    int zero = 0;
    __atomic_compare_exchange_n(p, &zero, err, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static ufs_fh *ufs_fh_new(int fd, int fast)
{
    ufs_fh *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    f->ufs_fd = fd;
    f->fast = fast;
    pthread_mutex_init(&f->lock, NULL);
    return f;
}

static void ufs_fh_free(ufs_fh *f)
{
    if (!f)
        return;
    pthread_mutex_destroy(&f->lock);
    free(f->ext);
    free(f);
}

/* fh->lock held: forget everything learnt under an older generation */
static void ufs_fh_sync_gen(ufs_fh *f, uint64_t g)
{
    if (f->gen != g) {
        f->gen = g;
        f->n = 0;
        f->size_valid = 0;
    }
}

/* fh->lock held: index of the extent containing pos, or -1 */
static int ufs_fh_find(ufs_fh *f, uint64_t pos)
{
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        ufs_ext *e = &f->ext[mid];
        if (pos < e->off)
            hi = mid - 1;
        else if (pos >= e->off + e->len)
            lo = mid + 1;
        else
            return mid;
    }
    return -1;
}

/* fh->lock held: add one extent.  Everything cached was learnt under the same generation, so
 * an overlap is the same mapping seen from another position (a read in a hole is mapped from
 * the position asked, not from the hole's start): the new extent replaces the overlapped
 * parts, the parts of older entries outside it stay. */
static void ufs_fh_insert(ufs_fh *f, const ufs_ext *e)
{
    int i, j, lo = 0;
    uint64_t e_end = e->off + e->len;
    if (f->n + 2 > UFS_FH_MAX_EXT)
        f->n = 0;
    if (f->n + 2 > f->cap) {
        int cap = f->cap ? f->cap * 2 : 16;
        ufs_ext *p = realloc(f->ext, cap * sizeof(*p));
        if (!p)
            return;
        f->ext = p;
        f->cap = cap;
    }
    /* first entry ending after e starts */
    while (lo < f->n && f->ext[lo].off + f->ext[lo].len <= e->off)
        lo++;
    /* entries [lo, j) overlap e */
    j = lo;
    while (j < f->n && f->ext[j].off < e_end)
        j++;
    if (j - lo == 1 && f->ext[lo].off == e->off && f->ext[lo].len == e->len)
        return;                                  /* already known */
    ufs_ext left, right;
    int have_left = 0, have_right = 0;
    if (j > lo && f->ext[lo].off < e->off) {
        left = f->ext[lo];
        left.len = e->off - left.off;
        have_left = 1;
    }
    if (j > lo && f->ext[j - 1].off + f->ext[j - 1].len > e_end) {
        right = f->ext[j - 1];
        uint64_t cut = e_end - right.off;
        right.off = e_end;
        right.len -= cut;
        if (right.type == UFS_EXT_MAPPED)
            right.addr += cut;
        have_right = 1;
    }
    /* replace [lo, j) by left? e right? */
    int add = have_left + 1 + have_right;
    int tail = f->n - j;
    memmove(&f->ext[lo + add], &f->ext[j], tail * sizeof(ufs_ext));
    i = lo;
    if (have_left)
        f->ext[i++] = left;
    f->ext[i++] = *e;
    if (have_right)
        f->ext[i++] = right;
    f->n = lo + add + tail;
}

/* fh->lock held: the extents covering [pos, end) into plan; count, or -1 if not all cached */
static int ufs_fh_plan(ufs_fh *f, uint64_t pos, uint64_t end, ufs_ext *plan)
{
    int n = 0;
    while (pos < end) {
        int i = ufs_fh_find(f, pos);
        if (i < 0 || n == UFS_PLAN_MAX)
            return -1;
        plan[n++] = f->ext[i];
        pos = f->ext[i].off + f->ext[i].len;
    }
    return n;
}

/* The calling thread's bounce buffer, at least size bytes, aligned for O_DIRECT. */
static char *ufs_thread_buf(size_t size)
{
    size_t *hdr = pthread_getspecific(g_buf_key);
    if (hdr && hdr[0] >= size)
        return (char *)hdr + 4096;
    free(hdr);
    pthread_setspecific(g_buf_key, NULL);
    size_t cap = size < (1u << 20) ? (1u << 20) : size;
    void *p = NULL;
    if (posix_memalign(&p, 4096, cap + 4096))
        return NULL;
    hdr = p;
    hdr[0] = cap;
    pthread_setspecific(g_buf_key, hdr);
    return (char *)p + 4096;
}

/* Read [pos, end) of the file into buf (buf[0] is file byte pos) following plan.
 * pos is lbs-aligned; the tail is read up to the next lbs boundary (buf has room).
 * Returns 0 or -errno.  Called between ufs_fast_enter() and ufs_fast_exit(). */
static int ufs_fast_io(const ufs_ext *plan, int n, uint64_t pos, uint64_t end, char *buf)
{
    int i;
    for (i = 0; i < n && pos < end; i++) {
        const ufs_ext *e = &plan[i];
        uint64_t seg_end = e->off + e->len < end ? e->off + e->len : end;
        uint64_t len = seg_end - pos;
        char *dst = buf;
        if (e->type != UFS_EXT_MAPPED) {
            memset(dst, 0, len);         /* hole or unwritten: zeros (sem: never stale data) */
        } else {
            uint64_t rlen = (len + g_lbs - 1) & ~(uint64_t)(g_lbs - 1);
            uint64_t addr = e->addr + (pos - e->off);
            uint64_t done = 0;
            while (done < rlen) {
                ssize_t r = pread(g_dev_fd, dst + done, rlen - done, (off_t)(addr + done));
                if (r < 0) {
                    if (errno == EINTR)
                        continue;
                    return -errno;
                }
                if (r == 0)
                    return -EIO;         /* past the end of the image: never zeros */
                done += (uint64_t)r;
            }
        }
        buf += len;
        pos = seg_end;
    }
    return pos < end ? -EIO : 0;
}

#endif

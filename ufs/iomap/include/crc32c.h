/*
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) for ufs.iomap.csum.
 *
 * Two engines with one contract, both operating on the *raw* CRC register
 * (no pre/post inversion; the caller does ~seed ... ~result once):
 *   ufs_crc32c_sw()  slicing-by-8 tables, any CPU;
 *   ufs_crc32c_hw()  the SSE4.2 crc32 instruction (x86-64 only), compiled with a
 *                    per-function target attribute so the module itself needs no
 *                    -msse4.2 and still loads on CPUs without it.
 * ufs_crc32c_init() must run once (module import) before either is used: it
 * fills the tables and decides, through __builtin_cpu_supports, whether the
 * hardware engine may be selected.  Everything here is pure computation on
 * caller memory, safe to run without the GIL and from many threads at once
 * once initialised.
 *
 * The header is private to csum.pyx; other Cython modules cimport the
 * functions declared in csum.pxd instead of including it (one copy of the
 * tables, one CPU check).
 */
#ifndef UFS_CRC32C_H
#define UFS_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define UFS_CRC32C_POLY 0x82F63B78u

#if defined(__x86_64__) && defined(__GNUC__)
#define UFS_CRC32C_HAVE_HW_BUILD 1
#else
#define UFS_CRC32C_HAVE_HW_BUILD 0
#endif

/* ufs_crc32c_tab[k][b]: the register after feeding byte b followed by k zero
 * bytes into a zero register.  Slicing-by-8 folds 8 input bytes with 8 lookups. */
static uint32_t ufs_crc32c_tab[8][256];
static int ufs_crc32c_use_hw;

static void ufs_crc32c_init(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t r = b;
        for (int bit = 0; bit < 8; bit++)
            r = (r >> 1) ^ ((r & 1u) ? UFS_CRC32C_POLY : 0u);
        ufs_crc32c_tab[0][b] = r;
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int k = 1; k < 8; k++) {
            uint32_t prev = ufs_crc32c_tab[k - 1][b];
            ufs_crc32c_tab[k][b] = (prev >> 8) ^ ufs_crc32c_tab[0][prev & 0xffu];
        }
#if UFS_CRC32C_HAVE_HW_BUILD
    __builtin_cpu_init();
    ufs_crc32c_use_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    ufs_crc32c_use_hw = 0;
#endif
}

static inline uint32_t ufs_crc32c_sw_byte(uint32_t reg, unsigned char c)
{
    return ufs_crc32c_tab[0][(reg ^ c) & 0xffu] ^ (reg >> 8);
}

static uint32_t ufs_crc32c_sw(uint32_t reg, const unsigned char *p, size_t length)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    /* Align first so the 8-byte loads below never straddle a cache line
     * more than they must; memcpy keeps them legal on strict-alignment CPUs. */
    while (length && ((uintptr_t)p & 7u)) {
        reg = ufs_crc32c_sw_byte(reg, *p++);
        length--;
    }
    while (length >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= reg;
        /* The first byte in memory has the most zero bytes after it in this
         * 8-byte group, hence the highest table. */
        reg = ufs_crc32c_tab[7][w & 0xffu] ^
              ufs_crc32c_tab[6][(w >> 8) & 0xffu] ^
              ufs_crc32c_tab[5][(w >> 16) & 0xffu] ^
              ufs_crc32c_tab[4][(w >> 24) & 0xffu] ^
              ufs_crc32c_tab[3][(w >> 32) & 0xffu] ^
              ufs_crc32c_tab[2][(w >> 40) & 0xffu] ^
              ufs_crc32c_tab[1][(w >> 48) & 0xffu] ^
              ufs_crc32c_tab[0][w >> 56];
        p += 8;
        length -= 8;
    }
#endif
    while (length--)
        reg = ufs_crc32c_sw_byte(reg, *p++);
    return reg;
}

#if UFS_CRC32C_HAVE_HW_BUILD
/*
 * One dependency chain through the crc32 instruction (3-cycle latency):
 * about 8 bytes per 3 cycles.  Three interleaved chains combined with a
 * carry-less multiply would go ~3x faster; not needed at today's device speeds.
 */
__attribute__((target("sse4.2")))
static uint32_t ufs_crc32c_hw(uint32_t reg, const unsigned char *p, size_t length)
{
    uint64_t r = reg;
    while (length && ((uintptr_t)p & 7u)) {
        r = __builtin_ia32_crc32qi((uint32_t)r, *p++);
        length--;
    }
    while (length >= 32) {
        uint64_t w0, w1, w2, w3;
        memcpy(&w0, p, 8);
        memcpy(&w1, p + 8, 8);
        memcpy(&w2, p + 16, 8);
        memcpy(&w3, p + 24, 8);
        r = __builtin_ia32_crc32di(r, w0);
        r = __builtin_ia32_crc32di(r, w1);
        r = __builtin_ia32_crc32di(r, w2);
        r = __builtin_ia32_crc32di(r, w3);
        p += 32;
        length -= 32;
    }
    while (length >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        r = __builtin_ia32_crc32di(r, w);
        p += 8;
        length -= 8;
    }
    while (length--)
        r = __builtin_ia32_crc32qi((uint32_t)r, *p++);
    return (uint32_t)r;
}
#else
static uint32_t ufs_crc32c_hw(uint32_t reg, const unsigned char *p, size_t length)
{
    return ufs_crc32c_sw(reg, p, length);   /* never selected: use_hw is 0 */
}
#endif

/* Raw register update through the best engine this CPU has. */
static inline uint32_t ufs_crc32c_raw(uint32_t reg, const unsigned char *p, size_t length)
{
    return ufs_crc32c_use_hw ? ufs_crc32c_hw(reg, p, length) : ufs_crc32c_sw(reg, p, length);
}

#endif /* UFS_CRC32C_H */

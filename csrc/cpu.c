/* cpu.c: which SIMD level this CPU and OS support, and which one the kernels use.
 * x86 asks cpuid for the instructions and xgetbv for the OS saving the wide registers, since a CPU flag
 * alone does not make AVX usable. AMX's 8 KiB of tile data is more: Linux saves it only for a process that
 * asked for it (arch_prctl ARCH_REQ_XCOMP_PERM), and a refusal leaves the AVX-512 kernels. FLASHLITE_SIMD=scalar|avx2|avx512|neon, read once, forces a level. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "flashlite.h"
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#endif

static pthread_once_t detect_once = PTHREAD_ONCE_INIT;
static int best_level;
static int vnni;
static int amx;    /* AMX-TILE and AMX-INT8 usable: CPU, XCR0 and the kernel's permission */
static int amx_on; /* atomically: fl_amx_set may race with kernels being picked */
static int level; /* read and written atomically: fl_simd_set may race with kernels picking a dot */

#if defined(__x86_64__)
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static void detect_x86(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx)
        return;
    uint64_t xcr0 = xgetbv0();
    int os_ymm = (xcr0 & 0x6) == 0x6;
    int os_zmm = (xcr0 & 0xe6) == 0xe6; /* also opmask and both halves of the upper 16 zmm */
    if (!os_ymm || __get_cpuid_max(0, NULL) < 7)
        return;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b >> 5) & 1;
    int avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    int avx512vnni = (c >> 11) & 1;
    int amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
    int os_tiles = (xcr0 & 0x60000) == 0x60000; /* XTILECFG and XTILEDATA */
    if (avx2 && fma && f16c)
        best_level = FL_SIMD_AVX2;
    if (best_level == FL_SIMD_AVX2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl) {
        best_level = FL_SIMD_AVX512;
        vnni = avx512vnni;
#if defined(__linux__)
        amx = vnni && amx_tile && amx_int8 && os_tiles &&
              syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
        (void)amx_tile, (void)amx_int8, (void)os_tiles;
#endif
    }
}
#endif

static int parse_level(const char *name) {
    static const char *const names[] = {"scalar", "avx2", "avx512", "neon"};
    for (int i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

static int supported(int lvl) {
    if (lvl == FL_SIMD_SCALAR)
        return 1;
    if (lvl == FL_SIMD_NEON)
        return best_level == FL_SIMD_NEON;
    return best_level != FL_SIMD_NEON && lvl <= best_level;
}

static void detect(void) {
    best_level = FL_SIMD_SCALAR;
#if defined(__x86_64__)
    detect_x86();
#elif defined(__aarch64__)
    best_level = FL_SIMD_NEON; /* Advanced SIMD is part of the AArch64 base */
#endif
    level = best_level;
    amx_on = amx;
    const char *forced = getenv("FLASHLITE_SIMD");
    if (forced && *forced) {
        int want = parse_level(forced);
        if (want >= 0 && supported(want))
            level = want;
        else
            fprintf(stderr, "flashlite: FLASHLITE_SIMD=%s is not supported on this CPU; using the best level\n",
                    forced);
    }
}

int fl_simd_best(void) {
    pthread_once(&detect_once, detect);
    return best_level;
}

int fl_simd_level(void) {
    pthread_once(&detect_once, detect);
    return __atomic_load_n(&level, __ATOMIC_RELAXED);
}

int fl_simd_set(int lvl) {
    pthread_once(&detect_once, detect);
    if (lvl < FL_SIMD_SCALAR || lvl > FL_SIMD_NEON || !supported(lvl))
        return FL_EINVAL;
    __atomic_store_n(&level, lvl, __ATOMIC_RELAXED);
    return FL_OK;
}

int fl_simd_has_vnni(void) {
    pthread_once(&detect_once, detect);
    return vnni;
}

int fl_simd_has_amx(void) {
    pthread_once(&detect_once, detect);
    return __atomic_load_n(&amx_on, __ATOMIC_RELAXED);
}

int fl_amx_set(int on) {
    pthread_once(&detect_once, detect);
    if (on && !amx)
        return FL_EINVAL;
    __atomic_store_n(&amx_on, on ? 1 : 0, __ATOMIC_RELAXED);
    return FL_OK;
}

/* avx2.c: the AVX2+FMA+F16C kernels: every vec_dot (dot_x86.h) and the 6x16 f32 GEMM tile.
 * Compiled for that target here, since the extension itself is built without -march flags. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#define FL_X86_VNNI 0
#define FL_X86_TABLE fl_dot_avx2
#include "dot_x86.h"

#define MR 6
#define NT 16

/* 6 weight rows broadcast against 16 tokens in two registers: 12 accumulators of the 16 ymm */
static void tile_avx2(int64_t kc, const float *w, const float *x, float *acc, int first) {
    __m256 c[MR][2];
    for (int i = 0; i < MR; i++) {
        c[i][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + i * NT);
        c[i][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + i * NT + 8);
    }
    for (int64_t k = 0; k < kc; k++, w += MR, x += NT) {
        __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
        for (int i = 0; i < MR; i++) {
            __m256 b = _mm256_broadcast_ss(w + i);
            c[i][0] = _mm256_fmadd_ps(b, x0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(b, x1, c[i][1]);
        }
    }
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(acc + i * NT, c[i][0]);
        _mm256_storeu_ps(acc + i * NT + 8, c[i][1]);
    }
}

const struct fl_gemm_kernel fl_gemm_avx2 = {MR, NT, tile_avx2};
#endif

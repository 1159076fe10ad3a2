/* avx512.c: the AVX-512 (F/DQ/BW/VL) kernels for CPUs without VNNI: the vec_dots of dot_x86.h, and the
 * 12x32 f32 GEMM tile that avx512_vnni.c shares, since VNNI does not speed up f32. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl")
#define FL_X86_VNNI 0
#define FL_X86_TABLE fl_dot_avx512
#include "dot_x86.h"

#define MR 12
#define NT 32

/* 12 weight rows broadcast against 32 tokens in two registers: 24 accumulators of the 32 zmm */
static void tile_avx512(int64_t kc, const float *w, const float *x, float *acc, int first) {
    __m512 c[MR][2];
    for (int i = 0; i < MR; i++) {
        c[i][0] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + i * NT);
        c[i][1] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + i * NT + 16);
    }
    for (int64_t k = 0; k < kc; k++, w += MR, x += NT) {
        __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
        for (int i = 0; i < MR; i++) {
            __m512 b = _mm512_set1_ps(w[i]);
            c[i][0] = _mm512_fmadd_ps(b, x0, c[i][0]);
            c[i][1] = _mm512_fmadd_ps(b, x1, c[i][1]);
        }
    }
    for (int i = 0; i < MR; i++) {
        _mm512_storeu_ps(acc + i * NT, c[i][0]);
        _mm512_storeu_ps(acc + i * NT + 16, c[i][1]);
    }
}

const struct fl_gemm_kernel fl_gemm_avx512 = {MR, NT, tile_avx512};
#endif

/* gemm_scalar.c: the plain-C GEMM tile of the prefill path, the reference for the SIMD tiles in arch/. */
#include "simd.h"

#define MR 4
#define NT 8

static void tile_scalar(int64_t kc, const float *w, const float *x, float *acc, int first) {
    float c[MR][NT] = {{0}};
    if (!first)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NT; j++)
                c[i][j] = acc[i * NT + j];
    for (int64_t k = 0; k < kc; k++)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NT; j++)
                c[i][j] += w[k * MR + i] * x[k * NT + j];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NT; j++)
            acc[i * NT + j] = c[i][j];
}

const struct fl_gemm_kernel fl_gemm_scalar = {MR, NT, tile_scalar};

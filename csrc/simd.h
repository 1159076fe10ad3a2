/* simd.h: what the per-architecture kernels in arch/ offer the dispatcher (dispatch.c).
 * Each level has a table of vec_dot kernels by weight type (NULL where it has none, so dispatch falls back
 * a level and finally to the generic one) and one f32 GEMM tile kernel for the prefill path of matmul.c. */
#ifndef FLASHLITE_SIMD_H
#define FLASHLITE_SIMD_H
#include <stdint.h>
#include "kernels.h"

/* acc[i][j] (+)= sum_{k < kc} w[k][i] * x[k][j] for i < mr rows and j < nt tokens:
 * w is packed kc x mr, x packed kc x nt, acc is mr x nt; first means acc starts at zero. */
typedef void (*fl_gemm_tile_fn)(int64_t kc, const float *w, const float *x, float *acc, int first);

struct fl_gemm_kernel {
    int mr; /* weight rows per tile */
    int nt; /* tokens per tile */
    fl_gemm_tile_fn tile;
};

/* the kernel set of one level; a NULL dot means "none at this level" */
fl_vec_dot_fn fl_dot_avx2(int type);
fl_vec_dot_fn fl_dot_avx512(int type);
fl_vec_dot_fn fl_dot_avx512_vnni(int type);
fl_vec_dot_fn fl_dot_neon(int type);
/* AVX-512 dequantizers for prefill (NULL for a type without one) */
fl_to_float_fn fl_to_float_avx512(int type);
/* the prepared-activation decode kernels of AVX512-VNNI CPUs with VBMI (NULL for a type without one) */
const struct fl_decode_kernel *fl_decode_avx512_vbmi(int type);
/* the same for the i-quants, which also need GFNI and BITALG (NULL for another type or a CPU without them) */
const struct fl_decode_kernel *fl_decode_avx512_vbmi_iq(int type);
extern const struct fl_gemm_kernel fl_gemm_scalar;
extern const struct fl_gemm_kernel fl_gemm_avx2;
extern const struct fl_gemm_kernel fl_gemm_avx512;
extern const struct fl_gemm_kernel fl_gemm_neon;

/* fl_matmul takes the prefill path (f32 activations, tiled GEMM) from this many tokens on: below it
 * one dot per row and token against quantized activations is faster */
#define FL_PREFILL_MIN_TOKENS 16

/* the dequantizer of a weight type at the level in use (falls back to the generic to_float) */
fl_to_float_fn fl_to_float(int type);

/* the GEMM tile kernel at the level in use */
const struct fl_gemm_kernel *fl_gemm_kernel(void);

#endif

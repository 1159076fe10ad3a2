/* simd.h: what the per-architecture kernels in arch/ offer the dispatcher (dispatch.c).
 * Each level has a table of vec_dot kernels by weight type (NULL where it has none, so dispatch falls back
 * a level and finally to the generic one). */
#ifndef FLASHLITE_SIMD_H
#define FLASHLITE_SIMD_H
#include <stdint.h>
#include "kernels.h"

/* the kernel set of one level; a NULL dot means "none at this level" */
fl_vec_dot_fn fl_dot_avx2(int type);
fl_vec_dot_fn fl_dot_avx512(int type);
fl_vec_dot_fn fl_dot_avx512_vnni(int type);
fl_vec_dot_fn fl_dot_neon(int type);
/* the token dot of a dot of that level's table (NULL where it has none) */
fl_vec_dot_tn_fn fl_tokens_avx2(fl_vec_dot_fn dot);
fl_vec_dot_tn_fn fl_tokens_avx512(fl_vec_dot_fn dot);
fl_vec_dot_tn_fn fl_tokens_avx512_vnni(fl_vec_dot_fn dot);
fl_vec_dot4_fn fl_rows_avx2(fl_vec_dot_fn dot);
fl_vec_dot4_fn fl_rows_avx512(fl_vec_dot_fn dot);
fl_vec_dot4_fn fl_rows_avx512_vnni(fl_vec_dot_fn dot);
/* the prepared-activation decode kernels of AVX512-VNNI CPUs with VBMI (NULL for a type without one) */
const struct fl_decode_kernel *fl_decode_avx512_vbmi(int type);
/* the same for the i-quants, which also need GFNI and BITALG (NULL for another type or a CPU without them) */
const struct fl_decode_kernel *fl_decode_avx512_vbmi_iq(int type);
/* the prefill kernels of some decode kernels of fl_decode_avx512_vbmi (avx512_vbmi_gemm.c) */
extern const struct fl_gemm_kernel fl_gemm_q8_0_vbmi, fl_gemm_mxfp4_vbmi, fl_gemm_q5_0_vbmi, fl_gemm_q2_K_vbmi,
    fl_gemm_q3_K_vbmi, fl_gemm_q4_K_vbmi, fl_gemm_q5_K_vbmi, fl_gemm_q6_K_vbmi;
/* the AMX-INT8 prefill kernel that replaces one of those, bitwise alike (amx_gemm.c), or NULL */
const struct fl_gemm_kernel *fl_gemm_amx(const struct fl_gemm_kernel *avx512);

#endif

/* quant_generic.h: the plain-C reference kernels of every block format, as ggml names them.
 * Per type: fl_dequantize_row_<t> (bit-exact with ggml and gguf-py), fl_quantize_row_<t>_ref (ggml's *_ref
 * algorithm, the one that writes model files), fl_quantize_<t> where the type has a search that weighs its error
 * by an importance vector (ggml's quantize_<t>: the _ref quantizer when importance is NULL) and
 * fl_vec_dot_<t>_<act>_generic (the dot the SIMD kernels must reproduce). n counts elements and is a multiple
 * of the block size; vy is already in the act type. */
#ifndef FLASHLITE_QUANT_GENERIC_H
#define FLASHLITE_QUANT_GENERIC_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "quants.h"

static inline int fl_clampi(int v, int lo, int hi) {
    return v < lo ? lo : v > hi ? hi : v;
}

/* round to nearest, ties away from zero on the float's own grid: ggml's nearest_int (valid for |x| < 2^22) */
static inline int fl_nearest_int(float x) {
    float shifted = x + 12582912.f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof(bits));
    return (bits & 0x007fffff) - 0x00400000;
}

/* the MXFP4 scale: 2^(e-127) / 2, so that the doubled e2m1 values come out right (subnormal for e < 2) */
static inline float fl_e8m0_to_fp32_half(uint8_t e) {
    uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

/* a UE4M3 scale byte of NVFP4, halved like fl_e8m0_to_fp32_half for the doubled e2m1 values: (1 + m/8) 2^(e-8),
 * or m 2^-10 for e = 0. The top bit is ignored, except that 0x7F (the E4M3 NaN) is read as 0 and 0xFF is not. */
static inline float fl_ue4m3_to_fp32_half(uint8_t x) {
    const uint32_t e = (x >> 3) & 15, m = x & 7;
    if (x == 0x7F)
        return 0.0f;
    if (e == 0)
        return (float)m * 0x1p-10f;
    uint32_t bits = (e + 119) << 23 | m << 20;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

/* ---------------------------------------------------------------- float formats (quant_float.c) */
void fl_dequantize_row_f32(const void *src, float *dst, int64_t n);
void fl_quantize_row_f32_ref(const float *src, void *dst, int64_t n);
void fl_dequantize_row_f16(const void *src, float *dst, int64_t n);
void fl_quantize_row_f16_ref(const float *src, void *dst, int64_t n);
void fl_dequantize_row_bf16(const void *src, float *dst, int64_t n);
void fl_quantize_row_bf16_ref(const float *src, void *dst, int64_t n);
void fl_vec_dot_f32_f32_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_vec_dot_f16_f32_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_vec_dot_bf16_f32_generic(int64_t n, float *s, const void *vx, const void *vy);

/* ---------------------------------------------------------------- 8-bit formats (quant_q8.c) */
void fl_dequantize_row_q8_0(const void *src, float *dst, int64_t n);
void fl_quantize_row_q8_0_ref(const float *src, void *dst, int64_t n);
void fl_vec_dot_q8_0_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_q8_1(const void *src, float *dst, int64_t n);
void fl_quantize_row_q8_1_ref(const float *src, void *dst, int64_t n);
void fl_dequantize_row_q8_K(const void *src, float *dst, int64_t n);
void fl_quantize_row_q8_K_ref(const float *src, void *dst, int64_t n);

/* ---------------------------------------------------------------- legacy formats (quant_legacy.c) */
void fl_dequantize_row_q4_0(const void *src, float *dst, int64_t n);
void fl_quantize_row_q4_0_ref(const float *src, void *dst, int64_t n);
void fl_quantize_q4_0(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_q4_0_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_q4_1(const void *src, float *dst, int64_t n);
void fl_quantize_row_q4_1_ref(const float *src, void *dst, int64_t n);
void fl_quantize_q4_1(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_q4_1_q8_1_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_q5_0(const void *src, float *dst, int64_t n);
void fl_quantize_row_q5_0_ref(const float *src, void *dst, int64_t n);
void fl_quantize_q5_0(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_q5_0_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_q5_1(const void *src, float *dst, int64_t n);
void fl_quantize_row_q5_1_ref(const float *src, void *dst, int64_t n);
void fl_quantize_q5_1(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_q5_1_q8_1_generic(int64_t n, float *s, const void *vx, const void *vy);

/* ---------------------------------------------------------------- MXFP4 (quant_mxfp4.c) */
extern const int8_t fl_kvalues_mxfp4[16];
/* the first of the 16 e2m1 codes closest to x at scale d (ties keep the lower code, as ggml and numpy's argmin
 * do; NaN gives code 0): the value search of MXFP4 and NVFP4. Its callers turn FMA contraction off before they
 * include this header, so that the product is rounded before the subtraction here too. */
static inline uint8_t fl_best_index_fp4(float x, float d) {
    uint8_t best = 0;
    float best_err = fabsf(fl_kvalues_mxfp4[0] * d - x);
    for (uint8_t i = 1; i < 16; i++) {
        float err = fabsf(fl_kvalues_mxfp4[i] * d - x);
        if (err < best_err) {
            best = i;
            best_err = err;
        }
    }
    return best;
}
void fl_dequantize_row_mxfp4(const void *src, float *dst, int64_t n);
void fl_quantize_row_mxfp4_ref(const float *src, void *dst, int64_t n);
void fl_vec_dot_mxfp4_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy);

/* ---------------------------------------------------------------- NVFP4, Q1_0, Q2_0, TQ1_0, TQ2_0 (quant_small.c) */
void fl_dequantize_row_nvfp4(const void *src, float *dst, int64_t n);
void fl_quantize_row_nvfp4_ref(const float *src, void *dst, int64_t n);
void fl_vec_dot_nvfp4_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_q1_0(const void *src, float *dst, int64_t n);
void fl_quantize_row_q1_0_ref(const float *src, void *dst, int64_t n);
void fl_vec_dot_q1_0_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_q2_0(const void *src, float *dst, int64_t n);
void fl_quantize_row_q2_0_ref(const float *src, void *dst, int64_t n);
void fl_vec_dot_q2_0_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_tq1_0(const void *src, float *dst, int64_t n);
void fl_quantize_row_tq1_0_ref(const float *src, void *dst, int64_t n);
void fl_vec_dot_tq1_0_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_tq2_0(const void *src, float *dst, int64_t n);
void fl_quantize_row_tq2_0_ref(const float *src, void *dst, int64_t n);
void fl_vec_dot_tq2_0_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);

/* ---------------------------------------------------------------- k-quants (quant_k.c) */
/* ggml's scale searches, shared with the legacy formats. fl_make_qx_quants: symmetric, L = level + nmax in
 * 0..2*nmax-1, weights qw or x^2 when NULL (make_qx_quants, rmse_type 1). fl_make_qkx3_quants: x ~ scale * L -
 * *the_min with L in 0..nmax under the given weights (make_qkx3_quants as the importance searches call it). */
float fl_make_qx_quants(int n, int nmax, const float *x, int8_t *L, const float *qw);
float fl_make_qkx3_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L, float *the_min,
                          uint8_t *Laux);
void fl_dequantize_row_q2_K(const void *src, float *dst, int64_t n);
void fl_quantize_row_q2_K_ref(const float *src, void *dst, int64_t n);
void fl_quantize_q2_K(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_q2_K_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_q3_K(const void *src, float *dst, int64_t n);
void fl_quantize_row_q3_K_ref(const float *src, void *dst, int64_t n);
void fl_quantize_q3_K(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_q3_K_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_q4_K(const void *src, float *dst, int64_t n);
void fl_quantize_row_q4_K_ref(const float *src, void *dst, int64_t n);
void fl_quantize_q4_K(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_q4_K_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_q5_K(const void *src, float *dst, int64_t n);
void fl_quantize_row_q5_K_ref(const float *src, void *dst, int64_t n);
void fl_quantize_q5_K(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_q5_K_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_q6_K(const void *src, float *dst, int64_t n);
void fl_quantize_row_q6_K_ref(const float *src, void *dst, int64_t n);
void fl_quantize_q6_K(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_q6_K_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
/* ggml's make_qp_quants (quant_k.c; IQ2_XXS uses it too): the n scales x >= 0 to levels L in 0..nmax against the
 * returned super-block scale, importance qw */
float fl_make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw);
/* the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes of q4_K / q5_K */
static inline void fl_get_scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* The 16 signed sub-block scales of a q3_K block: a 6-bit code minus 32, the low nibble of code j in byte j
 * (j < 8) or the high nibble of byte j - 8, its top two bits at bit 2 * (j / 4) of byte 8 + j % 4. */
static inline void fl_unpack_scales_q3_K(const uint8_t *packed, int *sc) {
    for (int j = 0; j < QK_K / 16; j++) {
        int low = j < 8 ? packed[j] & 0xF : packed[j - 8] >> 4;
        int high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        sc[j] = (low | (high << 4)) - 32;
    }
}

/* ---------------------------------------------------------------- i-quants
 * quant_iq.c (IQ4_NL, IQ4_XS, IQ2_XXS, IQ2_XS, IQ2_S), quant_iq3.c (IQ3_XXS, IQ3_S), quant_iq1.c (IQ1_S, IQ1_M);
 * grids in iq_grids.c, their search tables and shared searches in iq_lattice.c. fl_quantize_<t> is ggml's
 * quantize_<t>: rows with importance weights (n_per_row of them, or NULL), the traits' .quantize. For IQ2_XXS,
 * IQ2_XS and IQ1_S, which ggml only quantizes with an importance matrix, *_ref is that search with unit weights. */
extern const int8_t fl_kvalues_iq4nl[16];
extern const uint64_t fl_iq2xxs_grid[256];
extern const uint64_t fl_iq2xs_grid[512];
extern const uint64_t fl_iq2s_grid[1024];
extern const uint32_t fl_iq3xxs_grid[256];
extern const uint32_t fl_iq3s_grid[512];
extern const uint64_t fl_iq1s_grid[2048];
/* IQ1_M's super-block scale: an fp16 spread over the top nibbles of the four 16-bit sub-block scale words */
static inline fl_half fl_iq1_m_scale_bits(const uint16_t *sc) {
    return (fl_half)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000));
}
/* the 8 sign bits of 7 stored ones: the eighth makes the count of minus signs even (ggml's ksigns_iq2xs) */
static inline uint8_t fl_iq2_signs(uint32_t seven) {
    return (uint8_t)(seven | ((uint32_t)__builtin_parity(seven) << 7));
}
void fl_dequantize_row_iq4_nl(const void *src, float *dst, int64_t n);
void fl_quantize_row_iq4_nl_ref(const float *src, void *dst, int64_t n);
void fl_quantize_iq4_nl(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_iq4_nl_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_iq4_xs(const void *src, float *dst, int64_t n);
void fl_quantize_row_iq4_xs_ref(const float *src, void *dst, int64_t n);
void fl_quantize_iq4_xs(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_iq4_xs_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_iq2_xxs(const void *src, float *dst, int64_t n);
void fl_quantize_row_iq2_xxs_ref(const float *src, void *dst, int64_t n);
void fl_quantize_iq2_xxs(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_iq2_xxs_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_iq2_xs(const void *src, float *dst, int64_t n);
void fl_quantize_row_iq2_xs_ref(const float *src, void *dst, int64_t n);
void fl_quantize_iq2_xs(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_iq2_xs_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_iq2_s(const void *src, float *dst, int64_t n);
void fl_quantize_row_iq2_s_ref(const float *src, void *dst, int64_t n);
void fl_quantize_iq2_s(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_iq2_s_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_iq3_xxs(const void *src, float *dst, int64_t n);
void fl_quantize_row_iq3_xxs_ref(const float *src, void *dst, int64_t n);
void fl_quantize_iq3_xxs(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_iq3_xxs_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_iq3_s(const void *src, float *dst, int64_t n);
void fl_quantize_row_iq3_s_ref(const float *src, void *dst, int64_t n);
void fl_quantize_iq3_s(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_iq3_s_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_iq1_s(const void *src, float *dst, int64_t n);
void fl_quantize_row_iq1_s_ref(const float *src, void *dst, int64_t n);
void fl_quantize_iq1_s(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_iq1_s_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);
void fl_dequantize_row_iq1_m(const void *src, float *dst, int64_t n);
void fl_quantize_row_iq1_m_ref(const float *src, void *dst, int64_t n);
void fl_quantize_iq1_m(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance);
void fl_vec_dot_iq1_m_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy);

#endif

/* kernels.h: internal interface between the block formats, the SIMD kernels and the matmul driver.
 * Follows ggml's split: plain-C *_generic reference kernels per format (quant_*.c), SIMD versions of the
 * same names per architecture (arch/), and one traits table indexed by type (types.c) that matmul reads. */
#ifndef FLASHLITE_KERNELS_H
#define FLASHLITE_KERNELS_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "flashlite.h"
#include "quants.h"

typedef void (*fl_to_float_fn)(const void *src, float *dst, int64_t n);
typedef void (*fl_from_float_fn)(const float *src, void *dst, int64_t n);
/* n_rows rows of n_per_row elements with importance weights (n_per_row of them, or NULL): ggml's quantize_<type> */
typedef void (*fl_quantize_rows_fn)(const float *src, void *dst, int64_t n_rows, int64_t n_per_row,
                                    const float *importance);
/* s = dot(one weight row vx, one activation row vy), both n elements, vy in the type's act_type. */
typedef void (*fl_vec_dot_fn)(int64_t n, float *s, const void *vx, const void *vy);
/* s[0..3] = the dots of four weight rows vx[0..3] with one activation row, each bitwise as the one-row dot. */
typedef void (*fl_vec_dot4_fn)(int64_t n, float *s, const void *const *vx, const void *vy);
/* s[0..count-1] = the dots of one weight row with count (1..FL_DOT_TOKENS) activation rows vy[0..count-1], each
 * bitwise as the one-row dot, the row's weights unpacked once for all of them. */
typedef void (*fl_vec_dot_tn_fn)(int64_t n, float *s, const void *vx, const void *const *vy, int count);
/* the most tokens a token dot takes: a verified batch of drafts is 2..15 tokens, one or two calls */
#define FL_DOT_TOKENS 8

struct fl_type_traits {
    const char *name;
    int64_t blck;                  /* elements per block */
    int64_t bytes;                 /* bytes per block */
    fl_to_float_fn to_float;       /* dequantize */
    fl_from_float_fn from_float;   /* reference quantizer; NULL where the format has none */
    fl_quantize_rows_fn quantize;  /* the search with importance weights; NULL where importance changes nothing */
    int act_type;                  /* what activations are converted to before vec_dot: F32, Q8_0, Q8_1 or Q8_K */
    fl_vec_dot_fn vec_dot_generic; /* plain-C reference dot */
};

/* The traits of a type, or NULL for a type the core does not know. */
const struct fl_type_traits *fl_traits(int type);

/* The dot kernel of a weight type at the SIMD level in use (falls back to the generic one). */
fl_vec_dot_fn fl_vec_dot(int type);

/* The token dot made for `dot` (one returned by fl_vec_dot), whose results are bitwise its own, or NULL. */
fl_vec_dot_tn_fn fl_vec_dot_tn(fl_vec_dot_fn dot);
/* The four-row dot made for `dot` (one returned by fl_vec_dot), whose results are bitwise its own, or NULL. */
fl_vec_dot4_fn fl_vec_dot4(fl_vec_dot_fn dot);

/* how far ahead of the dot decode prefetches weights, into L2 */
#define FL_PREFETCH_BYTES 2048

/* A decode kernel that reads its activation row in a layout of its own (blocks regrouped for wide loads,
 * block sums and float scales precomputed): prep quantizes one f32 row of k elements exactly as the
 * act_type's reference quantizer does, into act_bytes(k) bytes of that layout, once per call; dot then
 * takes it in place of the act_type row. dot also prefetches FL_PREFETCH_BYTES ahead as it goes, past the
 * end of its row into the next, so the driver does not. */
struct fl_decode_kernel {
    size_t (*act_bytes)(int64_t k);
    void (*prep)(int64_t k, const float *x, void *out);
    fl_vec_dot_fn dot;
    fl_vec_dot4_fn dot4;   /* four rows at a time; NULL where not written */
    fl_vec_dot_tn_fn dot_tn; /* 1..FL_DOT_TOKENS tokens at a time (verification, short prefills) */
    const struct fl_gemm_kernel *gemm; /* many tokens at a time (prefill); NULL where not written */
};

/* A prefill kernel: many rows by many tokens, with accumulators for several rows x FL_PANEL tokens in registers,
 * each result bitwise the decode kernel's dot of the pair (the same integer sums, exact in any order, and the same
 * float steps). Tokens come FL_PANEL to a panel, their prepared activations interleaved so that one vector holds
 * the same four activation bytes of every token of the panel. */
#define FL_PANEL 16
struct fl_gemm_kernel {
    size_t (*panel_bytes)(int64_t k);
    /* token `lane` of a zeroed panel, from its activation row as the decode kernel's prep wrote it */
    void (*pack)(int64_t k, const void *prepared, void *panel, int lane);
    /* y[t * y_stride + r] for rows r < rows of w (w_row bytes apart) and tokens t < n_tok (at most
     * FL_GEMM_TOKENS) of consecutive panels */
    void (*run)(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok, float *y,
                int64_t y_stride);
    /* from this many tokens on the kernel beats the token dots: below, the empty lanes of a panel cost more
     * than it gains (its results are the same bits either way) */
    int64_t min_tokens;
};
/* the most tokens one run takes */
#define FL_GEMM_TOKENS 256

/* The prepared-activation decode kernel of a weight type at the SIMD level in use, or NULL (use fl_vec_dot). */
const struct fl_decode_kernel *fl_decode_kernel(int type);
/* The prefill kernel of a weight type at the SIMD level in use (AMX where it has one and is on), or NULL. */
const struct fl_gemm_kernel *fl_gemm_kernel(int type);

/* A float's bits and back, without breaking aliasing rules. */
static inline uint32_t fl_float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float fl_bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* half-precision conversions shared by every format */
float fl_fp16_to_fp32(fl_half h);
fl_half fl_fp32_to_fp16(float f);
float fl_bf16_to_fp32(uint16_t h);
uint16_t fl_fp32_to_bf16(float f);

#endif

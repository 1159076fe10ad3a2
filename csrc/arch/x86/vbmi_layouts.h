/* vbmi_layouts.h: what the decode kernels (avx512_vbmi.c) and their prefill kernels (avx512_vbmi_gemm.c) share:
 * the layouts of prepared activations, and the weights of a group or superblock unpacked as the decode dot
 * multiplies them, so that both multiply the same bytes and round alike. Include after the target pragma. */
#ifndef FLASHLITE_VBMI_LAYOUTS_H
#define FLASHLITE_VBMI_LAYOUTS_H
#include <immintrin.h>
#include <stdint.h>
#include "kernels.h"
#include "quants.h"

/* ---------------------------------------------------------------- Q8_0 activations, four blocks a group */
#define GROUP 4

/* lane b of every vector belongs to block b of the group; a missing block (past the row) is all zeros */
struct q8_group {
    int8_t lo[64]; /* elements 0..15 of each block */
    int8_t hi[64]; /* elements 16..31 */
    float d[16];   /* the block's scale, times the weight format's own factor, in all four dwords */
    union {
        int32_t base[16]; /* Q8_0: -offset * (sum of the block's quants) in the first dword: undoes the weight offset */
        float s[16];      /* Q8_1: the block's s, d * (sum of its quants) rounded to fp16, in the first dword */
    };
};

/* The float steps of the Q8_0, MXFP4 and Q5_0 dots, which their decode and prefill kernels both take: per block b of a
 * group, its exact integer sum converted to float, times (the weight's d times the activation's d), added by one
 * FMA to the running sum of the blocks at position b of their groups; the dot is (sum 0 + sum 1) + (sum 2 + sum 3). */

/* Group g of a Q8_0, MXFP4 or Q5_0 weight row of n elements as the decode dot multiplies it (avx512_vbmi.c): the quants
 * that meet struct q8_group's lo and hi, made unsigned, and each block's d (times the format's factor) in the four
 * dwords of its lane; out[r] for the rows r < rows at w + r * w_row. */
struct q8_group_weights {
    uint8_t lo[64], hi[64];
    float d[16];
};
void fl_vbmi_q8_0_groups(const uint8_t *w, size_t w_row, int rows, int64_t g, int64_t n, struct q8_group_weights *out);
void fl_vbmi_mxfp4_groups(const uint8_t *w, size_t w_row, int rows, int64_t g, int64_t n, struct q8_group_weights *out);
void fl_vbmi_q5_0_groups(const uint8_t *w, size_t w_row, int rows, int64_t g, int64_t n, struct q8_group_weights *out);

/* ---------------------------------------------------------------- k-quants on Q8_K activations */

/* One superblock of activations, regrouped to meet the k-quants' quant bytes: q[c] holds what one 64-byte
 * vector of a block's quants multiplies, two sub-blocks of 32 (numbered 0..7) in its two 256-bit halves, in
 * one of two orders:
 * - NIBBLES (Q4_K, Q5_K): the low (c even) or high (c odd) nibbles of quant bytes 64*(c/2) .. +63, i.e.
 *   sub-blocks (c/2)*4 + c%2 and +2; sums holds 0 in words 0..7, then the sum of each 32-sub-block (it meets
 *   the mins);
 * - BIT_PAIRS (Q2_K, Q3_K, Q6_K): bits 2c, 2c+1 of 64 quant bytes that hold four 2-bit fields each, i.e.
 *   sub-blocks c and c + 4; sums holds minus the sum of each 16-sub-block, minus Q8_K's bsums (it meets the
 *   mins, or undoes an offset as the seed of the sums it is subtracted from). */
enum q8k_order { NIBBLES, BIT_PAIRS };


struct q8k_sb {
    int8_t q[4][64];
    int16_t sums[16];
    float d;
    uint8_t pad[28];
};

/* the 32-sub-block of the 32 bytes h (0, 1) of vector c in the nibble order */
#define NIBBLE_SUB(c, h) (((c) / 2) * 4 + (c) % 2 + 2 * (h))
/* the 16-sub-block of 128-bit lane k of vector c in the bit-pair order */
#define BIT_PAIR_SUB(c, k) (2 * (c) + (k) % 2 + 8 * ((k) / 2))

/* the 12 bytes of 6-bit scales and mins -> bytes sc0..sc7, m0..m7 (fl_get_scale_min_k4, 4 at a time) */
static inline __m128i unpack_scales_mins(const uint8_t *packed) {
    __m128i t = _mm_loadu_si128((const __m128i *)packed); /* dwords w0 w1 w2 (+ 4 quant bytes, unused) */
    __m128i u = _mm_srlv_epi32(_mm_shuffle_epi32(t, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4));
    __m128i low = _mm_and_si128(u, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    __m128i top = _mm_slli_epi32(_mm_and_si128(_mm_srli_epi32(t, 6), _mm_set1_epi32(0x03030303)), 4);
    return _mm_or_si128(low, _mm_maskz_shuffle_epi32(0xA, top, _MM_SHUFFLE(1, 1, 0, 0)));
}

/* Q4_K's and Q5_K's 128 quant bytes as the nibble order's four vectors, values 0..15 */
static inline __attribute__((always_inline)) void nibble_quants(const uint8_t *qs, __m512i q[4]) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512i z0 = _mm512_loadu_si512(qs), z1 = _mm512_loadu_si512(qs + 64);
    q[0] = _mm512_and_si512(z0, m4);
    q[1] = _mm512_and_si512(_mm512_srli_epi16(z0, 4), m4);
    q[2] = _mm512_and_si512(z1, m4);
    q[3] = _mm512_and_si512(_mm512_srli_epi16(z1, 4), m4);
}

/* Q5_K: plus 16 where the fifth bit is set, its 32 qh bytes broadcast to both halves of a zmm and tested for the
 * bit each vector's half needs (values 0..31) */
static inline __attribute__((always_inline)) void add_fifth_bits(const uint8_t *qh, __m512i q[4]) {
    __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qh));
    for (int c = 0; c < 4; c++) {
        __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << NIBBLE_SUB(c, 0))),
                                         _mm256_set1_epi8((char)(1 << NIBBLE_SUB(c, 1))), 1);
        q[c] = _mm512_mask_add_epi8(q[c], _mm512_test_epi8_mask(h, bit), q[c], _mm512_set1_epi8(16));
    }
}

/* Q6_K, values 0..63: ql's low nibbles of bytes 0..31 and 64..95 (a), 32..63 and 96..127 (b) are values 0..31 and
 * 128..159, 32.. and 160..; their high nibbles values 64.., 192.. and 96.., 224..: the bit-pair order, with qh's
 * fields as the top two bits */
static inline __attribute__((always_inline)) void q6_K_quants(const block_q6_K *x, __m512i q[4]) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    __m512i z0 = _mm512_loadu_si512(x->ql), z1 = _mm512_loadu_si512(x->ql + 64), h = _mm512_loadu_si512(x->qh);
    __m512i a = _mm512_shuffle_i64x2(z0, z1, _MM_SHUFFLE(1, 0, 1, 0)), b = _mm512_shuffle_i64x2(z0, z1, _MM_SHUFFLE(3, 2, 3, 2));
    /* (low bits) | (qh's field, moved to bits 4-5) */
    q[0] = _mm512_ternarylogic_epi32(_mm512_and_si512(a, m4), _mm512_slli_epi16(h, 4), m30, 0xF8);
    q[1] = _mm512_ternarylogic_epi32(_mm512_and_si512(b, m4), _mm512_slli_epi16(h, 2), m30, 0xF8);
    q[2] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(a, 4), m4), h, m30, 0xF8);
    q[3] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(b, 4), m4), _mm512_srli_epi16(h, 2), m30, 0xF8);
}

/* Q2_K's quants times their 4-bit scales (0..45), in the bit-pair order of struct q8k_sb's q, as its decode dot
 * multiplies them (avx512_vbmi.c): 256 bytes at out + r * out_stride for the superblock i of each row r < rows at
 * w + r * w_row */
void fl_vbmi_q2_K_products(const uint8_t *w, size_t w_row, int rows, int64_t i, uint8_t *out, size_t out_stride);

/* Q3_K's values + 4 (0..7) in the bit-pair order, and its 16 scales minus 32 as words in sub-block order, as its
 * decode dot multiplies them (avx512_vbmi.c): 256 bytes at values + r * out_stride and 16 words at
 * scales + r * out_stride (in bytes) for the superblock i of each row r < rows at w + r * w_row */
void fl_vbmi_q3_K_values(const uint8_t *w, size_t w_row, int rows, int64_t i, uint8_t *values, int16_t *scales,
                         size_t out_stride);

/* A superblock of a panel of FL_PANEL tokens, the prefill kernels' activations (avx512_vbmi_gemm.c, amx_gemm.c):
 * dword j of y[j] holds bytes 4j..4j+3 of each token's prepared quants (struct q8k_sb's q, flat), word pairs of its
 * activation sums meet the weights' min (or scale) pairs, and d is each token's scale. */
struct panel_sb {
    int32_t y[64][FL_PANEL];
    int32_t sums[8][FL_PANEL];
    float d[FL_PANEL];
};
size_t fl_vbmi_panel_bytes(int64_t k);
/* token `lane` of a panel, from its prepared row: Q4_K's and Q5_K's 32-sub-block sums (four pairs), or Q2_K's and
 * Q6_K's negated 16-sub-block sums (eight pairs) */
void fl_vbmi_pack_nibbles(int64_t k, const void *prepared, void *panel, int lane);
void fl_vbmi_pack_bit_pairs(int64_t k, const void *prepared, void *panel, int lane);

/* Q3_K's prepared activations: the bit-pair layout, and per vector c the seeds of its dword sums, -4 * the sum of
 * the four activations that a dword of vpdpbusd multiplies */
struct q8k_seeded {
    struct q8k_sb sb;
    int32_t base[4][16];
};

/* The float steps of the k-quant dots (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), which their decode and prefill kernels both take so
 * that they round alike: per superblock, its exact integer sum (Q2_K, Q4_K, Q5_K: and its min-weighted activation sum)
 * converted to float, times (the weight's d (dmin) times the activation's d), added to the row's running sum
 * (running min sum) by one FMA each; the dot is the running sum minus the running min sum (Q2_K, whose min sums are
 * negated: plus). */

#endif

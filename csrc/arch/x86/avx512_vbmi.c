/* avx512_vbmi.c: the decode kernels of Q8_0, MXFP4 and Q4_K for CPUs with AVX512-VNNI and VBMI, each on an
 * activation row prepared once per call in a layout made for it (struct fl_decode_kernel).
 *
 * Why this shape: the ymm dots of dot_x86.h spent most of their instructions on per-block scalar work
 * (two scale conversions and a broadcast per 32 weights) and on the sign trick of signed x signed bytes.
 * Here byte permutes gather the quants of four Q8_0 / MXFP4 blocks into the four 128-bit lanes of a zmm
 * and their scales into the matching dwords, so all per-block work is vector work; the weights are made
 * unsigned by an offset (q + 128 for Q8_0, the e2m1 table + 12 for MXFP4), whose cost, offset * sum of the
 * activation block, is precomputed with the activation and seeds the vpdpbusd accumulator. Q4_K takes its
 * 128 quant bytes in two zmm loads, unpacks its 6-bit scales in one xmm and applies them with vpdpwssd.
 * The activations are quantized here too, vectorized, bit for bit as the reference quantizers do. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx512vbmi")
#include <float.h>
#include <immintrin.h>
#include <string.h>
#include "kernels.h"
#include "quant_generic.h"
#include "simd.h"
#include "vbmi_rows.h"
#include "vbmi_layouts.h"

static inline __mmask64 first_bytes(int64_t n) {
    return n >= 64 ? ~(__mmask64)0 : n <= 0 ? 0 : (((__mmask64)1 << n) - 1);
}

/* ROW_DOTS (vbmi_rows.h) makes each format's one-row and four-row dots from its step: reading four rows at once
 * took MXFP4 decode from memory 16.0 -> 18.6 GB/s on expert matrices, 19.0 -> 24.0 on wo_b. */

/* ---------------------------------------------------------------- Q8_0 activations, four blocks a group
 * (struct q8_group: vbmi_layouts.h) */

static size_t q8_group_bytes(int64_t k) {
    return (size_t)((k / QK8_0 + GROUP - 1) / GROUP) * sizeof(struct q8_group);
}

/* roundf (half away from zero) of every lane, exactly: the truncation plus one step where the dropped part
 * reaches a half */
static inline __m512i round_away(__m512 v) {
    __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m512 frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
    __m512 step = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(v, _mm512_set1_ps(-0.0f)));
    __mmask16 up = _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    return _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, step));
}

/* Quantizes x to Q8_0 (fl_quantize_row_q8_0_ref, bit for bit) straight into the group layout, with base for
 * weights stored with an offset; or, with_s, to Q8_1 (fl_quantize_row_q8_1_ref: Q8_0's quants and d, and s). A
 * block holding a NaN or infinity goes through the Q8_1 reference itself, whose wrapping the lanes do not copy. */
static void prep_q8_groups(int64_t k, const float *x, void *out, int offset, float factor, int with_s) {
    struct q8_group *g = out;
    int64_t nb = k / QK8_0;
    memset(out, 0, q8_group_bytes(k));
    for (int64_t i = 0; i < nb; i++) {
        struct q8_group *dst = &g[i / GROUP];
        int b = (int)(i % GROUP);
        __m512 v0 = _mm512_loadu_ps(x + i * QK8_0), v1 = _mm512_loadu_ps(x + i * QK8_0 + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        __m128i q0, q1;
        fl_half dh, sh = 0;
        int nan = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
        int finite = !nan && amax <= FLT_MAX;
        const float d = amax / 127;
        if (finite) {
            const __m512 id = _mm512_set1_ps(d ? 1.0f / d : 0.0f);
            __m512i r0 = round_away(_mm512_mul_ps(v0, id)), r1 = round_away(_mm512_mul_ps(v1, id));
            q0 = _mm512_cvtepi32_epi8(r0);
            q1 = _mm512_cvtepi32_epi8(r1);
            dh = fl_fp32_to_fp16(d);
        } else {
            block_q8_1 ref;
            fl_quantize_row_q8_1_ref(x + i * QK8_0, &ref, QK8_1);
            q0 = _mm_loadu_si128((const __m128i *)ref.qs);
            q1 = _mm_loadu_si128((const __m128i *)(ref.qs + 16));
            dh = ref.d;
            sh = ref.s;
        }
        _mm_storeu_si128((__m128i *)(dst->lo + 16 * b), q0);
        _mm_storeu_si128((__m128i *)(dst->hi + 16 * b), q1);
        int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_cvtepi8_epi32(q0), _mm512_cvtepi8_epi32(q1)));
        for (int j = 0; j < 4; j++)
            dst->d[4 * b + j] = fl_fp16_to_fp32(dh) * factor;
        if (with_s)
            dst->s[4 * b] = fl_fp16_to_fp32(finite ? fl_fp32_to_fp16(sum * d) : sh);
        else
            dst->base[4 * b] = -offset * sum;
    }
}

static void prep_q8_0(int64_t k, const float *x, void *out) {
    prep_q8_groups(k, x, out, 128, 1.0f, 0);
}

/* the 0.5: the doubled e2m1 table makes the block scale 2^(e-128), and the kernel builds 2^(e-127) */
static void prep_mxfp4(int64_t k, const float *x, void *out) {
    prep_q8_groups(k, x, out, 12, 0.5f, 0);
}

#define L16(b) b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7, b + 8, b + 9, b + 10, b + 11, b + 12, b + 13, b + 14, b + 15
#define D8(b) b, b + 1, b, b + 1, b, b + 1, b, b + 1
#define E16(b) b, 0, 0, 0, b, 0, 0, 0, b, 0, 0, 0, b, 0, 0, 0

/* Q8_0 weights, 34 bytes a block (fp16 d, 32 quants): byte offsets within a group of four */
static const uint8_t q8_lo_from_0[64] = {L16(2), L16(36), L16(70), L16(104)};  /* of bytes 0..127 */
static const uint8_t q8_hi_from_18[64] = {L16(0), L16(34), L16(68), L16(102)}; /* of bytes 18..145 */
static const uint8_t q8_d_from_0[64] = {D8(0), D8(34), D8(68), D8(102)};       /* words 4b..4b+3 = d_b */

/* Q8_0 and MXFP4: one running sum per block position of a group, in the dwords of its lane (vbmi_layouts.h) */
struct block_sums {
    __m512 acc;
};

STEP struct block_sums block_sums_init(void) { return (struct block_sums){_mm512_setzero_ps()}; }

STEP float block_sums_finish(const struct block_sums *st) {
    float lanes[16];
    _mm512_storeu_ps(lanes, st->acc);
    return (lanes[0] + lanes[4]) + (lanes[8] + lanes[12]);
}

/* one accumulator: four rows already give the four-row dot four FMA chains */
struct acc1 {
    __m512 acc;
};

STEP struct acc1 acc1_init(void) { return (struct acc1){_mm512_setzero_ps()}; }

STEP float acc1_finish(const struct acc1 *st) { return _mm512_reduce_add_ps(st->acc); }

struct q8_0_consts {
    __m512i idx_lo, idx_hi, idx_d, bias;
};

STEP struct q8_0_consts dot_q8_0_groups_consts(void) {
    return (struct q8_0_consts){_mm512_loadu_si512(q8_lo_from_0), _mm512_loadu_si512(q8_hi_from_18),
                                _mm512_loadu_si512(q8_d_from_0), _mm512_set1_epi8((char)0x80)};
}

#define dot_q8_0_groups_init block_sums_init
#define dot_q8_0_groups_finish block_sums_finish

STEP int64_t q8_0_groups(int64_t n) { return (n / QK8_0 + GROUP - 1) / GROUP; }

/* a group's weights as the Q8_0 group layout's lanes take them: quants 0..15 and 16..31 of its four blocks made
 * unsigned, and their scales (times the format's factor) */
struct q8_weights {
    __m512i lo, hi;
    __m512 d;
};

/* the activation half of a step on a group of Q8_0 activations, shared by the formats whose weights come to
 * struct q8_weights (a four-token dot computes the weight half once for its four tokens) */
STEP void q8_group_acc(struct block_sums *st, const struct q8_weights *w, int64_t g, const void *vy) {
    const struct q8_group *y = (const struct q8_group *)vy + g;
    __m512i sum = _mm512_dpbusd_epi32(_mm512_loadu_si512(y->base), w->lo, _mm512_loadu_si512(y->lo));
    sum = _mm512_dpbusd_epi32(sum, w->hi, _mm512_loadu_si512(y->hi));
    /* each block's total in all four dwords of its lane */
    sum = _mm512_add_epi32(sum, _mm512_shuffle_epi32(sum, _MM_PERM_BADC));
    sum = _mm512_add_epi32(sum, _mm512_shuffle_epi32(sum, _MM_PERM_CDAB));
    st->acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(w->d, _mm512_loadu_ps(y->d)), st->acc);
}

STEP struct q8_weights dot_q8_0_groups_weights(const void *vx, int64_t g, int64_t n, const struct q8_0_consts *k) {
    const int64_t off = g * GROUP * (int64_t)sizeof(block_q8_0), left = n / QK8_0 * (int64_t)sizeof(block_q8_0) - off;
    const uint8_t *p = (const uint8_t *)vx + off;
    prefetch_ahead(p, GROUP * (int)sizeof(block_q8_0));
    __m512i a, b, c, e;
    if (left >= GROUP * (int64_t)sizeof(block_q8_0)) {
        a = _mm512_loadu_si512(p);
        b = _mm512_loadu_si512(p + 64);
        c = _mm512_loadu_si512(p + 18);
        e = _mm512_maskz_loadu_epi8(first_bytes(136 - 82), p + 82);
    } else {
        a = _mm512_maskz_loadu_epi8(first_bytes(left), p);
        b = _mm512_maskz_loadu_epi8(first_bytes(left - 64), p + 64);
        c = _mm512_maskz_loadu_epi8(first_bytes(left - 18), p + 18);
        e = _mm512_maskz_loadu_epi8(first_bytes(left - 82), p + 82);
    }
    return (struct q8_weights){_mm512_xor_si512(_mm512_permutex2var_epi8(a, k->idx_lo, b), k->bias),
                               _mm512_xor_si512(_mm512_permutex2var_epi8(c, k->idx_hi, e), k->bias),
                               _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(a, k->idx_d, b)))};
}

STEP void dot_q8_0_groups_step(struct block_sums *st, const void *vx, int64_t g, int64_t n, const void *vy,
                               const struct q8_0_consts *k) {
    struct q8_weights w = dot_q8_0_groups_weights(vx, g, n, k);
    q8_group_acc(st, &w, g, vy);
}

ROW_DOTS_SPLIT(dot_q8_0_groups, struct q8_0_consts, struct block_sums, q8_0_groups, struct q8_weights, q8_group_acc)

/* MXFP4 weights, 17 bytes a block (e8m0 exponent, 16 bytes of nibbles) */
static const uint8_t mx_q_from_0[64] = {L16(1), L16(18), L16(35)};
static const uint8_t mx_e_from_0[64] = {E16(0), E16(17), E16(34), E16(51)};

struct mxfp4_consts {
    __m512i values, idx_q, idx_e;
};

STEP struct mxfp4_consts dot_mxfp4_groups_consts(void) {
    /* vpermb reads 6 bits of each index: with the table repeated four times, the high nibble's bits 4-5
     * (or whatever the 16-bit shift moved there) need no masking */
    int8_t shifted[16];
    for (int j = 0; j < 16; j++)
        shifted[j] = (int8_t)(fl_kvalues_mxfp4[j] + 12);
    return (struct mxfp4_consts){_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)shifted)),
                                 _mm512_loadu_si512(mx_q_from_0), _mm512_loadu_si512(mx_e_from_0)};
}

#define dot_mxfp4_groups_init block_sums_init
#define dot_mxfp4_groups_finish block_sums_finish

STEP int64_t mxfp4_groups(int64_t n) { return (n / QK_MXFP4 + GROUP - 1) / GROUP; }

STEP struct q8_weights dot_mxfp4_groups_weights(const void *vx, int64_t g, int64_t n, const struct mxfp4_consts *c) {
    const int64_t off = g * GROUP * (int64_t)sizeof(block_mxfp4);
    const int64_t left = n / QK_MXFP4 * (int64_t)sizeof(block_mxfp4) - off;
    const uint8_t *p = (const uint8_t *)vx + off;
    prefetch_ahead(p, GROUP * (int)sizeof(block_mxfp4));
    /* blocks 0-2 lie within the first 64 bytes, gathered by vpermb; block 3's quants end at byte 67 and
     * are inserted from their own load (vpermt2b, or a masked load into lane 3, measured slower) */
    __m512i a;
    __m128i last;
    if (left >= GROUP * (int64_t)sizeof(block_mxfp4)) {
        a = _mm512_loadu_si512(p);
        last = _mm_loadu_si128((const __m128i *)(p + 3 * sizeof(block_mxfp4) + 1));
    } else {
        a = _mm512_maskz_loadu_epi8(first_bytes(left), p);
        last = _mm_setzero_si128();
    }
    __m512i q = _mm512_inserti32x4(_mm512_permutexvar_epi8(c->idx_q, a), last, 3);
    /* e << 23 is the float 2^(e-127) (0 for e = 0, against a subnormal 2^-128 in the reference) */
    return (struct q8_weights){_mm512_permutexvar_epi8(q, c->values),
                               _mm512_permutexvar_epi8(_mm512_srli_epi16(q, 4), c->values),
                               _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_maskz_permutexvar_epi8(0x1111111111111111ull, c->idx_e, a), 23))};
}

STEP void dot_mxfp4_groups_step(struct block_sums *st, const void *vx, int64_t g, int64_t n, const void *vy,
                                const struct mxfp4_consts *c) {
    struct q8_weights w = dot_mxfp4_groups_weights(vx, g, n, c);
    q8_group_acc(st, &w, g, vy);
}

ROW_DOTS_SPLIT(dot_mxfp4_groups, struct mxfp4_consts, struct block_sums, mxfp4_groups, struct q8_weights, q8_group_acc)

STEP void store_q8_weights(const struct q8_weights *w, struct q8_group_weights *out) {
    _mm512_storeu_si512(out->lo, w->lo);
    _mm512_storeu_si512(out->hi, w->hi);
    _mm512_storeu_ps(out->d, w->d);
}

void fl_vbmi_q8_0_groups(const uint8_t *w, size_t w_row, int rows, int64_t g, int64_t n, struct q8_group_weights *out) {
    const struct q8_0_consts c = dot_q8_0_groups_consts();
    for (int r = 0; r < rows; r++) {
        const struct q8_weights q = dot_q8_0_groups_weights(w + r * w_row, g, n, &c);
        store_q8_weights(&q, &out[r]);
    }
}

void fl_vbmi_mxfp4_groups(const uint8_t *w, size_t w_row, int rows, int64_t g, int64_t n, struct q8_group_weights *out) {
    const struct mxfp4_consts c = dot_mxfp4_groups_consts();
    for (int r = 0; r < rows; r++) {
        const struct q8_weights q = dot_mxfp4_groups_weights(w + r * w_row, g, n, &c);
        store_q8_weights(&q, &out[r]);
    }
}

/* ---------------------------------------------------------------- Q4_0, Q4_1, Q5_0, Q5_1 on the same groups
 * Their quants are gathered four blocks to a zmm as Q8_0's are, low nibbles against lo and high nibbles against
 * hi, and stay unsigned: Q4_0 and Q5_0's offsets (8, 16) come back through base, Q4_1 and Q5_1's min m meets
 * the activation's s. Q5's fifth bits become byte masks (vptestmb of each qh byte against the bit it holds for
 * that byte) that add 16 where set. Blocks of 18 and 20 bytes lie within one 64-byte load but for the last
 * block's quants, inserted from their own 16-byte load as MXFP4 does; blocks of 22 and 24 bytes take two loads
 * and two-source byte permutes. */
struct nibble_consts {
    __m512i m4, sixteen, bit_of_byte, idx_q, idx_d, idx_hlo, idx_hhi;
};

/* byte j of each lane tests bit j % 8 of the qh byte gathered for it */
#define BITS8 1, 2, 4, 8, 16, 32, 64, 128
#define BITS16 BITS8, BITS8
#define R8(b) b, b, b, b, b, b, b, b
/* the qh bytes of elements 0..15 (lo) or 16..31 (hi) of a block whose qh is at b */
#define QH_LO(b) R8(b), R8(b + 1)
#define QH_HI(b) R8(b + 2), R8(b + 3)

static const uint8_t bits_of_bytes[64] = {BITS16, BITS16, BITS16, BITS16};

/* Q4_0, 18 bytes a block (fp16 d, 16 bytes of nibbles), x = d * (q - 8) */
static const uint8_t q4_0_q_from_0[64] = {L16(2), L16(20), L16(38)};
static const uint8_t q4_0_d_from_0[64] = {D8(0), D8(18), D8(36), D8(54)};
/* Q4_1, 20 bytes (fp16 d and m, nibbles), x = d * q + m: d in the low 32 bytes, m in the high */
static const uint8_t q4_1_q_from_0[64] = {L16(4), L16(24), L16(44)};
static const uint8_t q4_1_dm_from_0[64] = {D8(0), D8(20), D8(40), D8(60), D8(2), D8(22), D8(42), D8(62)};
/* Q5_0, 22 bytes (d, qh, nibbles), x = d * (q - 16): of bytes 0..63 (indices < 64) and 24..87 */
static const uint8_t q5_0_q_from_0_24[64] = {L16(6), L16(28), L16(64 + 26), L16(64 + 48)};
static const uint8_t q5_0_d_from_0_24[64] = {D8(0), D8(22), D8(44), D8(64 + 42)};
static const uint8_t q5_0_hlo_from_0_24[64] = {QH_LO(2), QH_LO(24), QH_LO(46), QH_LO(64 + 44)};
static const uint8_t q5_0_hhi_from_0_24[64] = {QH_HI(2), QH_HI(24), QH_HI(46), QH_HI(64 + 44)};
/* Q5_1, 24 bytes (d, m, qh, nibbles), x = d * q + m: of bytes 0..63 and 32..95 */
static const uint8_t q5_1_q_from_0_32[64] = {L16(8), L16(32), L16(64 + 24), L16(64 + 48)};
static const uint8_t q5_1_dm_from_0_32[64] = {D8(0), D8(24), D8(48), D8(64 + 40), D8(2), D8(26), D8(50), D8(64 + 42)};
static const uint8_t q5_1_hlo_from_0_32[64] = {QH_LO(4), QH_LO(28), QH_LO(52), QH_LO(64 + 44)};
static const uint8_t q5_1_hhi_from_0_32[64] = {QH_HI(4), QH_HI(28), QH_HI(52), QH_HI(64 + 44)};

STEP struct nibble_consts nibble_consts(const uint8_t *q, const uint8_t *d, const uint8_t *hlo, const uint8_t *hhi) {
    return (struct nibble_consts){_mm512_set1_epi8(0x0f),          _mm512_set1_epi8(16),
                                  _mm512_loadu_si512(bits_of_bytes), _mm512_loadu_si512(q),
                                  _mm512_loadu_si512(d),             hlo ? _mm512_loadu_si512(hlo) : _mm512_setzero_si512(),
                                  hhi ? _mm512_loadu_si512(hhi) : _mm512_setzero_si512()};
}

STEP struct nibble_consts dot_q4_0_groups_consts(void) {
    return nibble_consts(q4_0_q_from_0, q4_0_d_from_0, NULL, NULL);
}
STEP struct nibble_consts dot_q4_1_groups_consts(void) {
    return nibble_consts(q4_1_q_from_0, q4_1_dm_from_0, NULL, NULL);
}
STEP struct nibble_consts dot_q5_0_groups_consts(void) {
    return nibble_consts(q5_0_q_from_0_24, q5_0_d_from_0_24, q5_0_hlo_from_0_24, q5_0_hhi_from_0_24);
}
STEP struct nibble_consts dot_q5_1_groups_consts(void) {
    return nibble_consts(q5_1_q_from_0_32, q5_1_dm_from_0_32, q5_1_hlo_from_0_32, q5_1_hhi_from_0_32);
}

#define dot_q4_0_groups_init acc1_init
#define dot_q4_0_groups_finish acc1_finish
#define dot_q4_1_groups_init acc1_init
#define dot_q4_1_groups_finish acc1_finish
/* Q5_0's weights come to struct q8_weights and take Q8_0's float steps, as its prefill kernel does */
#define dot_q5_0_groups_init block_sums_init
#define dot_q5_0_groups_finish block_sums_finish
#define dot_q5_1_groups_init acc1_init
#define dot_q5_1_groups_finish acc1_finish

/* every legacy format has blocks of 32 */
STEP int64_t legacy_groups(int64_t n) { return (n / 32 + GROUP - 1) / GROUP; }

/* The bytes of group g of a row of blocks of `bytes` each: one 64-byte load, and the 16 bytes at `tail` (the
 * last block's quants), or a second 64-byte load at `tail`; zeros past the row's end. */
STEP void group_bytes(const void *vx, int64_t g, int64_t n, int bytes, int tail, int wide, __m512i *a, __m512i *b) {
    const int64_t off = g * GROUP * bytes, left = n / 32 * bytes - off;
    const uint8_t *p = (const uint8_t *)vx + off;
    prefetch_ahead(p, GROUP * bytes);
    if (left >= GROUP * bytes) {
        *a = _mm512_loadu_si512(p);
        *b = wide ? _mm512_loadu_si512(p + tail) : _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + tail)));
    } else {
        /* at most three blocks: a partial group's last quants never come from the 16-byte tail load */
        *a = _mm512_maskz_loadu_epi8(first_bytes(left), p);
        *b = wide ? _mm512_maskz_loadu_epi8(first_bytes(left - tail), p + tail) : _mm512_setzero_si512();
    }
}

/* the quants of blocks 0-2 from a, block 3's from the 16 bytes in b */
STEP __m512i gather_q4(__m512i a, __m512i b, const struct nibble_consts *c) {
    return _mm512_inserti32x4(_mm512_permutexvar_epi8(c->idx_q, a), _mm512_castsi512_si128(b), 3);
}

/* the low nibbles (elements 0..15 of each block) and high nibbles (16..31), plus 16 where qh has the fifth bit */
STEP void nibbles(__m512i q, __m512i a, __m512i b, int five, const struct nibble_consts *c, __m512i *lo, __m512i *hi) {
    *lo = _mm512_and_si512(q, c->m4);
    *hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), c->m4);
    if (five) {
        __mmask64 klo = _mm512_test_epi8_mask(_mm512_permutex2var_epi8(a, c->idx_hlo, b), c->bit_of_byte);
        __mmask64 khi = _mm512_test_epi8_mask(_mm512_permutex2var_epi8(a, c->idx_hhi, b), c->bit_of_byte);
        *lo = _mm512_mask_add_epi8(*lo, klo, *lo, c->sixteen);
        *hi = _mm512_mask_add_epi8(*hi, khi, *hi, c->sixteen);
    }
}

/* Q4_0: sum of (q - offset) * y through base, times d_x * d_y */
STEP void offset_groups_acc(struct acc1 *st, int64_t g, __m512i lo, __m512i hi, __m512 d, const void *vy) {
    const struct q8_group *y = (const struct q8_group *)vy + g;
    __m512i sum = _mm512_dpbusd_epi32(_mm512_loadu_si512(y->base), lo, _mm512_loadu_si512(y->lo));
    sum = _mm512_dpbusd_epi32(sum, hi, _mm512_loadu_si512(y->hi));
    st->acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_loadu_ps(y->d)), st->acc);
}

/* Q4_1 and Q5_1: sum of q * y times d_x * d_y, plus m * s; dm holds d's halfs in the low 256 bits, m's above */
STEP void min_groups_acc(struct acc1 *st, int64_t g, __m512i lo, __m512i hi, __m512i dm, const void *vy) {
    const struct q8_group *y = (const struct q8_group *)vy + g;
    __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(y->lo));
    sum = _mm512_dpbusd_epi32(sum, hi, _mm512_loadu_si512(y->hi));
    __m512 d = _mm512_cvtph_ps(_mm512_castsi512_si256(dm)), m = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(dm, 1));
    __m512 acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_loadu_ps(y->d)), st->acc);
    st->acc = _mm512_fmadd_ps(m, _mm512_loadu_ps(y->s), acc);
}

STEP void dot_q4_0_groups_step(struct acc1 *st, const void *vx, int64_t g, int64_t n, const void *vy,
                               const struct nibble_consts *c) {
    __m512i a, b, lo, hi;
    group_bytes(vx, g, n, sizeof(block_q4_0), 3 * sizeof(block_q4_0) + 2, 0, &a, &b);
    nibbles(gather_q4(a, b, c), a, b, 0, c, &lo, &hi);
    __m512 d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi8(c->idx_d, a)));
    offset_groups_acc(st, g, lo, hi, d, vy);
}

STEP void dot_q4_1_groups_step(struct acc1 *st, const void *vx, int64_t g, int64_t n, const void *vy,
                               const struct nibble_consts *c) {
    __m512i a, b, lo, hi;
    group_bytes(vx, g, n, sizeof(block_q4_1), 3 * sizeof(block_q4_1) + 4, 0, &a, &b);
    nibbles(gather_q4(a, b, c), a, b, 0, c, &lo, &hi);
    min_groups_acc(st, g, lo, hi, _mm512_permutexvar_epi8(c->idx_d, a), vy);
}

/* Q5_0: its quants 0..31 (the offset 16 comes back through the activation's base) and d, as Q8_0's weights */
STEP struct q8_weights dot_q5_0_groups_weights(const void *vx, int64_t g, int64_t n, const struct nibble_consts *c) {
    __m512i a, b, lo, hi;
    group_bytes(vx, g, n, sizeof(block_q5_0), 24, 1, &a, &b);
    nibbles(_mm512_permutex2var_epi8(a, c->idx_q, b), a, b, 1, c, &lo, &hi);
    return (struct q8_weights){lo, hi, _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(a, c->idx_d, b)))};
}

STEP void dot_q5_0_groups_step(struct block_sums *st, const void *vx, int64_t g, int64_t n, const void *vy,
                               const struct nibble_consts *c) {
    struct q8_weights w = dot_q5_0_groups_weights(vx, g, n, c);
    q8_group_acc(st, &w, g, vy);
}

STEP void dot_q5_1_groups_step(struct acc1 *st, const void *vx, int64_t g, int64_t n, const void *vy,
                               const struct nibble_consts *c) {
    __m512i a, b, lo, hi;
    group_bytes(vx, g, n, sizeof(block_q5_1), 32, 1, &a, &b);
    nibbles(_mm512_permutex2var_epi8(a, c->idx_q, b), a, b, 1, c, &lo, &hi);
    min_groups_acc(st, g, lo, hi, _mm512_permutex2var_epi8(a, c->idx_d, b), vy);
}

ROW_DOTS(dot_q4_0_groups, struct nibble_consts, struct acc1, legacy_groups)
ROW_DOTS(dot_q4_1_groups, struct nibble_consts, struct acc1, legacy_groups)
ROW_DOTS_SPLIT(dot_q5_0_groups, struct nibble_consts, struct block_sums, legacy_groups, struct q8_weights, q8_group_acc)
ROW_DOTS(dot_q5_1_groups, struct nibble_consts, struct acc1, legacy_groups)

void fl_vbmi_q5_0_groups(const uint8_t *w, size_t w_row, int rows, int64_t g, int64_t n, struct q8_group_weights *out) {
    const struct nibble_consts c = dot_q5_0_groups_consts();
    for (int r = 0; r < rows; r++) {
        const struct q8_weights q = dot_q5_0_groups_weights(w + r * w_row, g, n, &c);
        store_q8_weights(&q, &out[r]);
    }
}

static void prep_q4_0(int64_t k, const float *x, void *out) {
    prep_q8_groups(k, x, out, 8, 1.0f, 0);
}

static void prep_q5_0(int64_t k, const float *x, void *out) {
    prep_q8_groups(k, x, out, 16, 1.0f, 0);
}

static void prep_q8_1(int64_t k, const float *x, void *out) {
    prep_q8_groups(k, x, out, 0, 1.0f, 1);
}

/* ---------------------------------------------------------------- k-quants on Q8_K activations */

static size_t q8k_sb_bytes(int64_t k) {
    return (size_t)(k / QK_K) * sizeof(struct q8k_sb);
}

/* where 32-sub-block s goes: vector and half */
static inline int8_t *q8k_dst(struct q8k_sb *sb, int s, enum q8k_order order) {
    return order == NIBBLES ? sb->q[(s / 4) * 2 + s % 2] + 32 * ((s % 4) / 2) : sb->q[s % 4] + 32 * (s / 4);
}

/* Quantizes one superblock to Q8_K (fl_quantize_row_q8_K_ref, bit for bit: the same single product per value,
 * rounded to nearest even as its magic-number rounding does) straight into the regrouped layout. Returns 0,
 * leaving the rest to the reference, for a block with a NaN or an infinity. */
static int prep_q8k_sb(const float *x, struct q8k_sb *sb, enum q8k_order order) {
    __m512 v[16];
    float iscale = 0.0f; /* set whenever q8k_load_scale returns 1 */
    int scaled = q8k_load_scale(x, v, &iscale);
    if (scaled < 0)
        return 0;
    memset(sb, 0, sizeof(*sb));
    if (scaled == 0)
        return 1;
    const __m512 vs = _mm512_set1_ps(iscale);
    for (int s = 0; s < 8; s++) {
        int8_t *dst = q8k_dst(sb, s, order);
        __m512i q0 = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v[2 * s], vs)), _mm512_set1_epi32(127));
        __m512i q1 = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v[2 * s + 1], vs)), _mm512_set1_epi32(127));
        _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(dst + 16), _mm512_cvtepi32_epi8(q1));
        if (order == NIBBLES) {
            sb->sums[8 + s] = (int16_t)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        } else {
            sb->sums[2 * s] = (int16_t)-_mm512_reduce_add_epi32(q0);
            sb->sums[2 * s + 1] = (int16_t)-_mm512_reduce_add_epi32(q1);
        }
    }
    sb->d = 1 / iscale;
    return 1;
}

static void prep_q8k(int64_t k, const float *x, void *out, enum q8k_order order) {
    struct q8k_sb *sb = out;
    for (int64_t i = 0; i < k / QK_K; i++) {
        if (prep_q8k_sb(x + i * QK_K, &sb[i], order))
            continue;
        block_q8_K y[1];
        fl_quantize_row_q8_K_ref(x + i * QK_K, y, QK_K);
        memset(&sb[i], 0, sizeof(sb[i]));
        for (int s = 0; s < 8; s++)
            memcpy(q8k_dst(&sb[i], s, order), y->qs + 32 * s, 32);
        for (int j = 0; j < 16; j++)
            if (order == NIBBLES)
                sb[i].sums[8 + j / 2] = (int16_t)(sb[i].sums[8 + j / 2] + y->bsums[j]);
            else
                sb[i].sums[j] = (int16_t)-y->bsums[j];
        sb[i].d = y->d;
    }
}

/* Q3_K's activations (struct q8k_seeded): seeds that undo the offset 4 of its values, so that the dwords need no
 * zeroed registers and the sums no correction (+5-8% in cache) */

static size_t q8k_seeded_bytes(int64_t k) {
    return (size_t)(k / QK_K) * sizeof(struct q8k_seeded);
}

static void prep_q3_K(int64_t k, const float *x, void *out) {
    struct q8k_seeded *s = out;
    for (int64_t i = 0; i < k / QK_K; i++) {
        prep_q8k(QK_K, x + i * QK_K, &s[i].sb, BIT_PAIRS);
        for (int c = 0; c < 4; c++) {
            __m512i sum4 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), _mm512_loadu_si512(s[i].sb.q[c]));
            _mm512_storeu_si512(s[i].base[c], _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum4, 2)));
        }
    }
}

static void prep_q8k_nibbles(int64_t k, const float *x, void *out) {
    prep_q8k(k, x, out, NIBBLES);
}

static void prep_q8k_bit_pairs(int64_t k, const float *x, void *out) {
    prep_q8k(k, x, out, BIT_PAIRS);
}

STEP int64_t superblocks(int64_t n) { return n / QK_K; }

static inline float half_to_float(fl_half h) {
    return _cvtsh_ss(h);
}

/* v, stored where the FMAs that scale by its floats take them as broadcasts from memory, loads, instead of by
 * shuffles on the port that the kernels' permutes keep busy: Q2_K +10%, Q3_K +6% in cache. The empty asm keeps
 * the compiler from forwarding the stored floats in registers. */
STEP void floats_in_memory(float dst[4], __m128 v) {
    _mm_storeu_ps(dst, v);
    __asm__("" : "+m"(*(float(*)[4])dst));
}

/* ---------------------------------------------------------------- Q4_K and Q5_K, the nibble order
 * Q4_K loads its 128 quant bytes as two zmm; Q5_K adds 16 where the fifth bit is set (vbmi_layouts.h). Both apply the
 * 6-bit scales with vpdpwssd and meet the mins with the activation's sums in one vpmaddwd; a superblock's sums
 * are added up to one integer each and scaled in floats as vbmi_layouts.h says, as the prefill kernels do. */

struct q4_K_consts {
    __m512i pick[4]; /* per quant vector c: the scale of its first sub-block in words 0..15, the second's in 16..31 */
};

STEP struct q4_K_consts dot_q4_K_sb_consts(void) {
    struct q4_K_consts k;
    for (int c = 0; c < 4; c++)
        k.pick[c] = _mm512_inserti64x4(_mm512_set1_epi16((short)NIBBLE_SUB(c, 0)),
                                       _mm256_set1_epi16((short)NIBBLE_SUB(c, 1)), 1);
    return k;
}

#define dot_q5_K_sb_consts dot_q4_K_sb_consts

/* the running sums of a k-quant dot (vbmi_layouts.h): d-scaled in lane 0, dmin-scaled in lane 1 */
struct ksb_state {
    __m128 acc;
};

STEP struct ksb_state dot_q4_K_sb_init(void) { return (struct ksb_state){_mm_setzero_ps()}; }

STEP float dot_q4_K_sb_finish(const struct ksb_state *st) {
    return _mm_cvtss_f32(st->acc) - _mm_cvtss_f32(_mm_movehdup_ps(st->acc));
}

#define dot_q5_K_sb_init dot_q4_K_sb_init
#define dot_q5_K_sb_finish dot_q4_K_sb_finish

/* a Q4_K / Q5_K superblock unpacked, what every token's products share: quants q[c], the scale words each quant
 * pair of vector c meets, the scales and mins as words and d, dmin */
struct k4_weights {
    __m512i q[4], scales[4];
    __m256i sm;
    __m128 dm;
};

STEP struct k4_weights k4_weights(const void *head, const __m512i q[4], const struct q4_K_consts *k) {
    struct k4_weights w;
    w.sm = _mm256_cvtepu8_epi16(unpack_scales_mins((const uint8_t *)head + 4)); /* words sc0..7, m0..7 */
    for (int c = 0; c < 4; c++) {
        w.q[c] = q[c];
        w.scales[c] = _mm512_permutexvar_epi16(k->pick[c], _mm512_castsi256_si512(w.sm));
    }
    uint32_t dd;
    memcpy(&dd, head, sizeof(dd));
    w.dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dd)); /* d, dmin */
    return w;
}

/* the totals of the 16 dwords of sumi and of the 8 of mins, in dwords 0 and 1 */
STEP __m128i two_totals(__m512i sumi, __m256i mins) {
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(sumi), _mm512_extracti64x4_epi64(sumi, 1));
    h = _mm256_hadd_epi32(h, mins);
    h = _mm256_hadd_epi32(h, h);
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* a Q4_K / Q5_K superblock's products with one token: the unsigned quants times the activations, each pair times
 * its 16-bit scale, the mins with the activation's sums in one vpmaddwd */
STEP void k4_sb_acc(struct ksb_state *st, const struct k4_weights *w, int64_t i, const void *vy) {
    const struct q8k_sb *y = (const struct q8k_sb *)vy + i;
    __m512i sumi = _mm512_setzero_si512();
    for (int c = 0; c < 4; c++)
        sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(w->q[c], _mm512_loadu_si512(y->q[c])), w->scales[c]);
    __m128i totals = two_totals(sumi, _mm256_madd_epi16(w->sm, _mm256_loadu_si256((const __m256i *)y->sums)));
    st->acc = _mm_fmadd_ps(_mm_mul_ps(w->dm, _mm_set1_ps(y->d)), _mm_cvtepi32_ps(totals), st->acc);
}

STEP struct k4_weights dot_q4_K_sb_weights(const void *vx, int64_t i, int64_t n, const struct q4_K_consts *k) {
    (void)n;
    const block_q4_K *x = (const block_q4_K *)vx + i;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_q4_K));
    __m512i q[4];
    nibble_quants(x->qs, q);
    return k4_weights(x, q, k);
}

STEP struct k4_weights dot_q5_K_sb_weights(const void *vx, int64_t i, int64_t n, const struct q4_K_consts *k) {
    (void)n;
    const block_q5_K *x = (const block_q5_K *)vx + i;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_q5_K));
    __m512i q[4];
    nibble_quants(x->qs, q);
    add_fifth_bits(x->qh, q);
    return k4_weights(x, q, k);
}

STEP void dot_q4_K_sb_step(struct ksb_state *st, const void *vx, int64_t i, int64_t n, const void *vy,
                           const struct q4_K_consts *k) {
    const struct k4_weights w = dot_q4_K_sb_weights(vx, i, n, k);
    k4_sb_acc(st, &w, i, vy);
}

STEP void dot_q5_K_sb_step(struct ksb_state *st, const void *vx, int64_t i, int64_t n, const void *vy,
                           const struct q4_K_consts *k) {
    const struct k4_weights w = dot_q5_K_sb_weights(vx, i, n, k);
    k4_sb_acc(st, &w, i, vy);
}

ROW_DOTS_SPLIT(dot_q4_K_sb, struct q4_K_consts, struct ksb_state, superblocks, struct k4_weights, k4_sb_acc)
ROW_DOTS_SPLIT(dot_q5_K_sb, struct q4_K_consts, struct ksb_state, superblocks, struct k4_weights, k4_sb_acc)

/* ---------------------------------------------------------------- Q2_K, Q3_K and Q6_K, the bit-pair order
 * Their quant bytes hold four 2-bit fields (Q2_K, Q3_K's low bits, Q6_K's high bits) of values 32 apart; one
 * 64-byte vector per field meets one activation vector, each 128-bit lane one 16-sub-block.
 * - Q2_K: a field times its 4-bit scale fits a byte (<= 45): vpshufb looks the product up in a table of each
 *   lane's four sub-blocks' multiples 0..3 x scale (one table per superblock, by vpermb and vpmullw), indexed
 *   by the field + 4 * vector (vpermb lookups give both at once), and vpdpbusd adds it up. The mins meet the
 *   activation sums as Q4_K's do.
 * - Q3_K, Q6_K (6-bit scales): vpdpbusd sums four products a dword, few enough (|sum| <= 4 * 63 * 127) that
 *   two vectors' dwords pack into one vector of words, which one vpdpwssd scales, two vectors' scales gathered
 *   by one vpermw. Q3_K's offset of 4 comes back through the seeds of the dwords (struct q8k_seeded), Q6_K's of
 *   32 as 32 times the scale-weighted activation sums, the seed of the scaled sums. */
struct bit_pair_consts {
    __m512i field[3]; /* vpermb tables (the index's bits 6-7 are ignored): fields 1-3 (see bit_pair_table) */
    __m512i pick[2];  /* Q2_K: the scale of each byte of the lookup table; Q3_K, Q6_K: per pair of vectors 2p,
                         2p+1, the scales of lane k's words 0-3 (2p) and 4-7 (2p+1) */
    __m512i m3, m4, m7;
    __m512i sel[3];   /* Q3_K: bits 1, 2 and 3, where its third bits go into the index */
    __m512i half4;    /* Q3_K: the hmask shifted by 0 (low half) and 4 (high half) */
};

/* Field f (1..3) of index i (f = 3 after a shift of the quant bytes by 2): Q2_K, plus 4f, its product's place in
 * a lane of the lookup table; Q3_K, with its third bit (at bit f of the index) as bit 2 */
static uint8_t bit_pair_table(int q3, int f, int i) {
    return (uint8_t)(((i >> (f == 1 ? 2 : 4)) & 3) | (q3 ? ((i >> f) & 1) << 2 : 4 * f));
}

STEP struct bit_pair_consts bit_pair_consts(int q3) {
    struct bit_pair_consts k = {.m3 = _mm512_set1_epi8(3), .m4 = _mm512_set1_epi8(0x0f),
                                .m7 = _mm512_set1_epi8(7),
                                .half4 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1)};
    uint8_t table[64];
    for (int f = 0; f < 3; f++) {
        for (int i = 0; i < 64; i++)
            table[i] = bit_pair_table(q3, f + 1, i);
        k.field[f] = _mm512_loadu_si512(table);
        k.sel[f] = _mm512_set1_epi8((char)(2 << f));
    }
    for (int p = 0; p < 2; p++) {
        int16_t pick[32];
        for (int w = 0; w < 32; w++)
            pick[w] = (int16_t)BIT_PAIR_SUB(2 * p + (w % 8) / 4, w / 8);
        k.pick[p] = _mm512_loadu_si512(pick);
    }
    if (!q3) {
        /* the byte scale of byte b of lane k (entry b of its table): vector b / 4's, in the low byte of a word */
        uint8_t bytes[64] = {0};
        for (int b = 0; b < 64; b += 2)
            bytes[b] = (uint8_t)BIT_PAIR_SUB((b % 16) / 4, b / 16);
        k.pick[0] = _mm512_loadu_si512(bytes);
    }
    return k;
}

STEP struct bit_pair_consts dot_q2_K_sb_consts(void) { return bit_pair_consts(0); }
STEP struct bit_pair_consts dot_q3_K_sb_consts(void) { return bit_pair_consts(1); }
#define dot_q6_K_sb_consts dot_q3_K_sb_consts

/* the sums of vector c's products with the activations, four a dword; two vectors' dwords packed to words and
 * scaled by their 16-bit scales */
STEP __m512i packed_sums(__m512i seed, const __m512i q[4], const struct q8k_sb *y, const __m512i picked[2]) {
    __m512i d[4], sumi = seed;
    for (int c = 0; c < 4; c++)
        d[c] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[c], _mm512_loadu_si512(y->q[c]));
    for (int p = 0; p < 2; p++)
        sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(d[2 * p], d[2 * p + 1]), picked[p]);
    return sumi;
}

/* offset times the scale-weighted activation sums, negative (the activation keeps its sums negated) */
STEP __m512i offset_seed(__m256i scales, const struct q8k_sb *y, int log2_offset) {
    __m256i off = _mm256_madd_epi16(scales, _mm256_loadu_si256((const __m256i *)y->sums));
    return _mm512_zextsi256_si512(_mm256_slli_epi32(off, log2_offset));
}

/* Q2_K's quants times their 4-bit scales, the bit-pair order's four vectors */
STEP void q2_K_products(const block_q2_K *x, const struct bit_pair_consts *k, __m512i p[4]) {
    __m512i z = _mm512_loadu_si512(x->qs);
    __m512i at[4] = {_mm512_and_si512(z, k->m3), _mm512_permutexvar_epi8(z, k->field[0]),
                     _mm512_permutexvar_epi8(z, k->field[1]), _mm512_permutexvar_epi8(_mm512_srli_epi16(z, 2), k->field[2])};
    /* scales in the low nibbles, mins in the high ones; entry 4c + t of lane k's table: t * its scale */
    const __m128i packed = _mm_loadu_si128((const __m128i *)x->scales);
    __m512i table = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, k->pick[0],
                                                  _mm512_castsi128_si512(_mm_and_si128(packed, _mm512_castsi512_si128(k->m4))));
    table = _mm512_mullo_epi16(table, _mm512_set1_epi32(0x03020100));
    for (int c = 0; c < 4; c++)
        p[c] = _mm512_shuffle_epi8(table, at[c]);
}

#define dot_q2_K_sb_init dot_q4_K_sb_init

/* the running sums hold the negated min sums: the dot is their sum */
STEP float dot_q2_K_sb_finish(const struct ksb_state *st) {
    return _mm_cvtss_f32(st->acc) + _mm_cvtss_f32(_mm_movehdup_ps(st->acc));
}

STEP void dot_q2_K_sb_step(struct ksb_state *st, const void *vx, int64_t i, int64_t n, const void *vy,
                           const struct bit_pair_consts *k) {
    (void)n;
    const block_q2_K *x = (const block_q2_K *)vx + i;
    const struct q8k_sb *y = (const struct q8k_sb *)vy + i;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_q2_K));
    __m512i p[4];
    q2_K_products(x, k, p);
    __m512i sumi = _mm512_setzero_si512();
    for (int c = 0; c < 4; c++)
        sumi = _mm512_dpbusd_epi32(sumi, p[c], _mm512_loadu_si512(y->q[c]));
    const __m128i packed = _mm_loadu_si128((const __m128i *)x->scales);
    __m256i mins = _mm256_madd_epi16(_mm256_srli_epi16(_mm256_cvtepu8_epi16(packed), 4),
                                     _mm256_loadu_si256((const __m256i *)y->sums));
    uint32_t dd;
    memcpy(&dd, &x->d, sizeof(dd));
    __m128 f = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int)dd)), _mm_set1_ps(y->d)); /* d, dmin */
    st->acc = _mm_fmadd_ps(f, _mm_cvtepi32_ps(two_totals(sumi, mins)), st->acc);
}

void fl_vbmi_q2_K_products(const uint8_t *w, size_t w_row, int rows, int64_t i, uint8_t *out, size_t out_stride) {
    const struct bit_pair_consts k = dot_q2_K_sb_consts();
    for (int r = 0; r < rows; r++) {
        __m512i p[4];
        q2_K_products((const block_q2_K *)(w + r * w_row) + i, &k, p);
        for (int c = 0; c < 4; c++)
            _mm512_storeu_si512(out + r * out_stride + 64 * c, p[c]);
    }
}

/* the 16 6-bit scale codes of a Q3_K block minus 32, as words: the low nibbles of bytes 0..7, then their high
 * nibbles, the top two bits of code j at bit 2 * (j / 4) of byte 8 + j % 4 (fl_unpack_scales_q3_K). Put together in
 * general registers, whose ports the vector work leaves free. */
static inline __m256i q3_K_scales(const uint8_t *scales) {
    const uint64_t nibbles = 0x0f0f0f0f0f0f0f0full, pairs = 0x03030303u;
    uint64_t low;
    uint32_t top;
    memcpy(&low, scales, sizeof(low));
    memcpy(&top, scales + 8, sizeof(top));
    uint64_t top0 = (top & pairs) | (uint64_t)((top >> 2) & pairs) << 32;        /* codes 0..7 */
    uint64_t top8 = ((top >> 4) & pairs) | (uint64_t)((top >> 6) & pairs) << 32; /* codes 8..15 */
    __m128i codes = _mm_set_epi64x((long long)(((low >> 4) & nibbles) | top8 << 4), (long long)((low & nibbles) | top0 << 4));
    return _mm256_cvtepi8_epi16(_mm_sub_epi8(codes, _mm_set1_epi8(32)));
}

/* Q3_K: value + 4 = (low two bits) + 4 * (the hmask bit), 0..7. The hmask bit of vector c (bit c of the low
 * half's bytes, c + 4 of the high half's) is shifted to bit c of both halves and merged into a bit of the index
 * that the vector's lookup does not otherwise read. */
struct q3_K_state {
    __m128 acc;     /* the running sum in lane 0 (vbmi_layouts.h) */
    __m256i scales; /* the next superblock's */
};

STEP struct q3_K_state dot_q3_K_sb_init(void) { return (struct q3_K_state){_mm_setzero_ps(), _mm256_setzero_si256()}; }

STEP float dot_q3_K_sb_finish(const struct q3_K_state *st) { return _mm_cvtss_f32(st->acc); }

/* Q3_K's values + 4 (0..7), the bit-pair order's four vectors */
STEP void q3_K_values(const block_q3_K *x, const struct bit_pair_consts *k, __m512i q[4]) {
    __m512i z = _mm512_loadu_si512(x->qs);
    __m512i hm = _mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x->hmask)), k->half4);
    /* ternary logic 0xD8: the bits of sel from the hmask, the others from the quants */
    q[0] = _mm512_and_si512(_mm512_ternarylogic_epi32(z, _mm512_slli_epi16(hm, 2), k->sel[1], 0xD8), k->m7);
    q[1] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(z, hm, k->sel[0], 0xD8), k->field[0]);
    q[2] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(z, hm, k->sel[1], 0xD8), k->field[1]);
    q[3] = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(_mm512_srli_epi16(z, 2), hm, k->sel[2], 0xD8), k->field[2]);
}

/* The scales of superblock i + 1 are put together during step i, so that their long chain of dependent
 * operations overlaps a step's worth of other work (+8% in cache). */
STEP void dot_q3_K_sb_step(struct q3_K_state *st, const void *vx, int64_t i, int64_t n, const void *vy,
                           const struct bit_pair_consts *k) {
    const block_q3_K *x = (const block_q3_K *)vx + i;
    const struct q8k_seeded *ys = (const struct q8k_seeded *)vy + i;
    const struct q8k_sb *y = &ys->sb;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_q3_K));
    __m512i q[4];
    q3_K_values(x, k, q);
    __m256i scales = i == 0 ? q3_K_scales(x->scales) : st->scales;
    if (i + 1 < n / QK_K)
        st->scales = q3_K_scales(x[1].scales);
    __m512i d[4], sumi = _mm512_setzero_si512();
    for (int c = 0; c < 4; c++)
        d[c] = _mm512_dpbusd_epi32(_mm512_loadu_si512(ys->base[c]), q[c], _mm512_loadu_si512(y->q[c]));
    for (int p = 0; p < 2; p++)
        sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(d[2 * p], d[2 * p + 1]),
                                   _mm512_permutexvar_epi16(k->pick[p], _mm512_castsi256_si512(scales)));
    __m128 f = _mm_set_ss(half_to_float(x->d) * y->d);
    st->acc = _mm_fmadd_ss(f, _mm_cvtsi32_ss(_mm_setzero_ps(), _mm512_reduce_add_epi32(sumi)), st->acc);
}

void fl_vbmi_q3_K_values(const uint8_t *w, size_t w_row, int rows, int64_t i, uint8_t *values, int16_t *scales,
                         size_t out_stride) {
    const struct bit_pair_consts k = dot_q3_K_sb_consts();
    for (int r = 0; r < rows; r++) {
        const block_q3_K *x = (const block_q3_K *)(w + r * w_row) + i;
        __m512i q[4];
        q3_K_values(x, &k, q);
        for (int c = 0; c < 4; c++)
            _mm512_storeu_si512(values + r * out_stride + 64 * c, q[c]);
        _mm256_storeu_si256((__m256i *)((uint8_t *)scales + r * out_stride), q3_K_scales(x->scales));
    }
}

/* a Q6_K superblock unpacked, what every token's products share: quants q[c], its scales as words and as the scale
 * words each pair of vectors meets (bit_pair_consts' pick), d */
struct q6_weights {
    __m512i q[4], picked[2];
    __m256i scales;
    float d;
};

STEP struct q6_weights dot_q6_K_sb_weights(const void *vx, int64_t i, int64_t n, const struct bit_pair_consts *k) {
    (void)n;
    const block_q6_K *x = (const block_q6_K *)vx + i;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_q6_K));
    struct q6_weights w;
    q6_K_quants(x, w.q);
    w.scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x->scales));
    for (int p = 0; p < 2; p++)
        w.picked[p] = _mm512_permutexvar_epi16(k->pick[p], _mm512_castsi256_si512(w.scales));
    w.d = half_to_float(x->d);
    return w;
}

STEP void q6_K_sb_acc(struct ksb_state *st, const struct q6_weights *w, int64_t i, const void *vy) {
    const struct q8k_sb *y = (const struct q8k_sb *)vy + i;
    __m512i sumi = packed_sums(offset_seed(w->scales, y, 5), w->q, y, w->picked);
    __m128 f = _mm_set_ss(w->d * y->d);
    st->acc = _mm_fmadd_ss(f, _mm_cvtsi32_ss(_mm_setzero_ps(), _mm512_reduce_add_epi32(sumi)), st->acc);
}

/* Q6_K (quants: vbmi_layouts.h): a superblock's sums added up to one integer and scaled in floats as vbmi_layouts.h says */
STEP void dot_q6_K_sb_step(struct ksb_state *st, const void *vx, int64_t i, int64_t n, const void *vy,
                           const struct bit_pair_consts *k) {
    const struct q6_weights w = dot_q6_K_sb_weights(vx, i, n, k);
    q6_K_sb_acc(st, &w, i, vy);
}

#define dot_q6_K_sb_init dot_q4_K_sb_init
#define dot_q6_K_sb_finish dot_q4_K_sb_finish

ROW_DOTS(dot_q2_K_sb, struct bit_pair_consts, struct ksb_state, superblocks)
ROW_DOTS(dot_q3_K_sb, struct bit_pair_consts, struct q3_K_state, superblocks)
ROW_DOTS_SPLIT(dot_q6_K_sb, struct bit_pair_consts, struct ksb_state, superblocks, struct q6_weights, q6_K_sb_acc)

static const struct fl_decode_kernel q8_0_kernel = {q8_group_bytes, prep_q8_0, dot_q8_0_groups, dot_q8_0_groups_x4,
                                                    dot_q8_0_groups_tn, &fl_gemm_q8_0_vbmi};
static const struct fl_decode_kernel mxfp4_kernel = {q8_group_bytes, prep_mxfp4, dot_mxfp4_groups, dot_mxfp4_groups_x4,
                                                     dot_mxfp4_groups_tn, &fl_gemm_mxfp4_vbmi};
static const struct fl_decode_kernel q4_K_kernel = {q8k_sb_bytes, prep_q8k_nibbles, dot_q4_K_sb, dot_q4_K_sb_x4,
                                                    dot_q4_K_sb_tn, &fl_gemm_q4_K_vbmi};
static const struct fl_decode_kernel q5_K_kernel = {q8k_sb_bytes, prep_q8k_nibbles, dot_q5_K_sb, dot_q5_K_sb_x4,
                                                    dot_q5_K_sb_tn, &fl_gemm_q5_K_vbmi};
static const struct fl_decode_kernel q2_K_kernel = {q8k_sb_bytes, prep_q8k_bit_pairs, dot_q2_K_sb, dot_q2_K_sb_x4,
                                                    dot_q2_K_sb_tn, &fl_gemm_q2_K_vbmi};
static const struct fl_decode_kernel q3_K_kernel = {q8k_seeded_bytes, prep_q3_K, dot_q3_K_sb, dot_q3_K_sb_x4,
                                                    dot_q3_K_sb_tn, &fl_gemm_q3_K_vbmi};
static const struct fl_decode_kernel q6_K_kernel = {q8k_sb_bytes, prep_q8k_bit_pairs, dot_q6_K_sb, dot_q6_K_sb_x4,
                                                    dot_q6_K_sb_tn, &fl_gemm_q6_K_vbmi};
static const struct fl_decode_kernel q4_0_kernel = {q8_group_bytes, prep_q4_0, dot_q4_0_groups, dot_q4_0_groups_x4,
                                                    dot_q4_0_groups_tn};
static const struct fl_decode_kernel q4_1_kernel = {q8_group_bytes, prep_q8_1, dot_q4_1_groups, dot_q4_1_groups_x4,
                                                    dot_q4_1_groups_tn};
static const struct fl_decode_kernel q5_0_kernel = {q8_group_bytes, prep_q5_0, dot_q5_0_groups, dot_q5_0_groups_x4,
                                                    dot_q5_0_groups_tn, &fl_gemm_q5_0_vbmi};
static const struct fl_decode_kernel q5_1_kernel = {q8_group_bytes, prep_q8_1, dot_q5_1_groups, dot_q5_1_groups_x4,
                                                    dot_q5_1_groups_tn};

const struct fl_decode_kernel *fl_decode_avx512_vbmi(int type) {
    switch (type) {
    case FL_TYPE_Q8_0: return &q8_0_kernel;
    case FL_TYPE_MXFP4: return &mxfp4_kernel;
    case FL_TYPE_Q4_K: return &q4_K_kernel;
    case FL_TYPE_Q5_K: return &q5_K_kernel;
    case FL_TYPE_Q2_K: return &q2_K_kernel;
    case FL_TYPE_Q3_K: return &q3_K_kernel;
    case FL_TYPE_Q6_K: return &q6_K_kernel;
    case FL_TYPE_Q4_0: return &q4_0_kernel;
    case FL_TYPE_Q4_1: return &q4_1_kernel;
    case FL_TYPE_Q5_0: return &q5_0_kernel;
    case FL_TYPE_Q5_1: return &q5_1_kernel;
    default: return NULL;
    }
}
#endif

/* avx512_vbmi_gemm.c: prefill kernels (struct fl_gemm_kernel) of Q8_0, MXFP4, Q5_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K on
 * AVX512-VNNI, each result bitwise its decode kernel's dot (avx512_vbmi.c).
 *
 * Why this shape: the decode dot of a token makes each weight row's quants once and spends two instructions
 * (vpmaddubsw, vpdpwssd) per 64 products plus the float steps of every superblock; four tokens at a time share
 * the weight work but not that. Here the lanes of a vector are FL_PANEL tokens instead: one vpdpbusd multiplies
 * four quants of one row, broadcast from an L1 buffer of unpacked weights, by the same four activations of each of
 * 16 tokens (the panel, interleaved once per call), so one instruction makes 64 products, each activation vector
 * serves ROWS rows, and a sub-block's scale is applied once for 16 tokens (vpmulld), the float steps likewise.
 * The integer sum of a superblock is exact in any order, and the float steps are the decode dot's (vbmi_layouts.h),
 * so the results are the decode dot's bits. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx512vbmi")
#include <immintrin.h>
#include <string.h>
#include "kernels.h"
#include "simd.h"
#include "vbmi_layouts.h"

#define STEP static inline __attribute__((always_inline))
/* rows whose accumulators a kernel keeps in registers, two vectors each (a sub-block's sum and the superblock's) */
#define ROWS 8

size_t fl_vbmi_panel_bytes(int64_t k) {
    return (size_t)(k / QK_K) * sizeof(struct panel_sb);
}

/* token `lane` of a panel's superblock, with the activation sums its weights meet as word pairs: Q4_K's and Q5_K's
 * 32-sub-block sums (words 8..15 of struct q8k_sb's sums, four pairs), Q2_K's, Q3_K's and Q6_K's negated
 * 16-sub-block sums (all sixteen words, eight pairs) */
static void pack_sb(const struct q8k_sb *sb, struct panel_sb *p, int lane, int first_sum, int pairs) {
    int32_t q[64];
    memcpy(q, sb->q, sizeof(q));
    for (int j = 0; j < 64; j++)
        p->y[j][lane] = q[j];
    for (int j = 0; j < pairs; j++)
        p->sums[j][lane] = (int32_t)((uint16_t)sb->sums[first_sum + 2 * j] | (uint32_t)(uint16_t)sb->sums[first_sum + 2 * j + 1] << 16);
    p->d[lane] = sb->d;
}

void fl_vbmi_pack_nibbles(int64_t k, const void *prepared, void *panel, int lane) {
    for (int64_t i = 0; i < k / QK_K; i++)
        pack_sb((const struct q8k_sb *)prepared + i, (struct panel_sb *)panel + i, lane, 8, 4);
}

void fl_vbmi_pack_bit_pairs(int64_t k, const void *prepared, void *panel, int lane) {
    for (int64_t i = 0; i < k / QK_K; i++)
        pack_sb((const struct q8k_sb *)prepared + i, (struct panel_sb *)panel + i, lane, 0, 8);
}

/* Q3_K's: the same, from its seeded superblocks (the kernel applies the offset through the sums instead) */
static void pack_seeded(int64_t k, const void *prepared, void *panel, int lane) {
    for (int64_t i = 0; i < k / QK_K; i++)
        pack_sb(&((const struct q8k_seeded *)prepared + i)->sb, (struct panel_sb *)panel + i, lane, 0, 8);
}

/* A superblock of one weight row, unpacked: its quants in the order of struct q8k_sb's q (values >= 0), the scale of
 * each run of 32 (Q4_K, Q5_K) or 16 (Q3_K, Q6_K) of them (Q2_K: one run, already scaled), the word pairs that meet
 * the panel's sums, d and dmin. */
struct weights_sb {
    uint8_t q[256];
    int32_t scale[16];
    int32_t pairs[8];
    float d, dmin;
};

/* the byte index of each 32-quant run's scale in unpack_scales_mins' sc0..sc7: the runs are in the nibble order */
#define NIBBLE_RUN_SCALES 0, 2, 1, 3, 4, 6, 5, 7

static void unpack_nibbles(const void *head, const __m512i q[4], struct weights_sb *w) {
    for (int c = 0; c < 4; c++)
        _mm512_storeu_si512(w->q + 64 * c, q[c]);
    const __m128i sm = unpack_scales_mins((const uint8_t *)head + 4); /* sc0..7, m0..7 */
    const __m128i runs = _mm_setr_epi8(NIBBLE_RUN_SCALES, -1, -1, -1, -1, -1, -1, -1, -1);
    _mm256_storeu_si256((__m256i *)w->scale, _mm256_cvtepu8_epi32(_mm_shuffle_epi8(sm, runs)));
    _mm_storeu_si128((__m128i *)w->pairs, _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8))); /* words m0..m7 */
    uint32_t dm;
    memcpy(&dm, head, sizeof(dm));
    _mm_storel_pi((__m64 *)&w->d, _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm))); /* d, dmin */
}

static void unpack_q4_K(const uint8_t *w, size_t w_row, int rows, int64_t i, struct weights_sb *out) {
    for (int r = 0; r < rows; r++) {
        const block_q4_K *x = (const block_q4_K *)(w + r * w_row) + i;
        __m512i q[4];
        nibble_quants(x->qs, q);
        unpack_nibbles(x, q, &out[r]);
    }
}

static void unpack_q5_K(const uint8_t *w, size_t w_row, int rows, int64_t i, struct weights_sb *out) {
    for (int r = 0; r < rows; r++) {
        const block_q5_K *x = (const block_q5_K *)(w + r * w_row) + i;
        __m512i q[4];
        nibble_quants(x->qs, q);
        add_fifth_bits(x->qh, q);
        unpack_nibbles(x, q, &out[r]);
    }
}

/* Q2_K: its quants already times their scales (one run of 256 at scale 1), the mins as word pairs */
static void unpack_q2_K(const uint8_t *w, size_t w_row, int rows, int64_t i, struct weights_sb *out) {
    fl_vbmi_q2_K_products(w, w_row, rows, i, out[0].q, sizeof(struct weights_sb));
    for (int r = 0; r < rows; r++) {
        const block_q2_K *x = (const block_q2_K *)(w + r * w_row) + i;
        const __m128i packed = _mm_loadu_si128((const __m128i *)x->scales);
        out[r].scale[0] = 1;
        _mm256_storeu_si256((__m256i *)out[r].pairs, _mm256_srli_epi16(_mm256_cvtepu8_epi16(packed), 4));
        uint32_t dm;
        memcpy(&dm, &x->d, sizeof(dm));
        _mm_storel_pi((__m64 *)&out[r].d, _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm))); /* d, dmin */
    }
}

/* the 16-sub-block of each 16-quant run in the bit-pair order: BIT_PAIR_SUB(c, l) for run 4c + l */
#define BIT_PAIR_RUN_SCALES 0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15

static void unpack_q6_K_row(const block_q6_K *x, struct weights_sb *w) {
    __m512i q[4];
    q6_K_quants(x, q);
    for (int c = 0; c < 4; c++)
        _mm512_storeu_si512(w->q + 64 * c, q[c]);
    const __m128i scales = _mm_loadu_si128((const __m128i *)x->scales);
    const __m128i runs = _mm_setr_epi8(BIT_PAIR_RUN_SCALES);
    _mm512_storeu_si512(w->scale, _mm512_cvtepi8_epi32(_mm_shuffle_epi8(scales, runs)));
    _mm256_storeu_si256((__m256i *)w->pairs, _mm256_cvtepi8_epi16(scales)); /* words s0..s15 */
    w->d = _cvtsh_ss(x->d);
    w->dmin = 0.0f;
}

/* Q3_K: values 0..7 (the offset 4 comes back through the activation sums), its scales - 32 as pairs and per run */
static void unpack_q3_K(const uint8_t *w, size_t w_row, int rows, int64_t i, struct weights_sb *out) {
    fl_vbmi_q3_K_values(w, w_row, rows, i, out[0].q, (int16_t *)out[0].pairs, sizeof(struct weights_sb));
    static const uint8_t runs[16] = {BIT_PAIR_RUN_SCALES};
    for (int r = 0; r < rows; r++) {
        const block_q3_K *x = (const block_q3_K *)(w + r * w_row) + i;
        int16_t words[16];
        memcpy(words, out[r].pairs, sizeof(words));
        for (int j = 0; j < 16; j++)
            out[r].scale[j] = words[runs[j]];
        out[r].d = _cvtsh_ss(x->d);
        out[r].dmin = 0.0f;
    }
}

static void unpack_q6_K(const uint8_t *w, size_t w_row, int rows, int64_t i, struct weights_sb *out) {
    for (int r = 0; r < rows; r++)
        unpack_q6_K_row((const block_q6_K *)(w + r * w_row) + i, &out[r]);
}

/* The exact integer sums of superblock p of `rows` weight rows w[r] with the panel's 16 tokens: each run of `run`
 * quants (32, 16, or Q2_K's 256 already scaled) summed by vpdpbusd, times its scale, added up; plus the pairs (mins, or Q6_K's scales) times
 * the activation sums, into sums[r] (Q6_K, Q3_K: shifted left by 5 or 2, the offset 32 or 4 of their quants, into the
 * main sum). */
STEP void sb_sums(int rows, int run, int n_pairs, int offset_shift, const struct weights_sb *w,
                  const struct panel_sb *p, __m512i main[ROWS], __m512i pairs[ROWS]) {
    for (int r = 0; r < rows; r++)
        main[r] = pairs[r] = _mm512_setzero_si512();
    for (int s = 0; s < 256 / run; s++) {
        __m512i part[ROWS];
        for (int r = 0; r < rows; r++)
            part[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int jj = 0; jj < run / 4; jj++) {
            const int j = s * run / 4 + jj;
            const __m512i y = _mm512_load_si512(p->y[j]);
            for (int r = 0; r < rows; r++) {
                int32_t q4;
                memcpy(&q4, w[r].q + 4 * j, sizeof(q4));
                part[r] = _mm512_dpbusd_epi32(part[r], _mm512_set1_epi32(q4), y);
            }
        }
        for (int r = 0; r < rows; r++)
            main[r] = _mm512_add_epi32(main[r], _mm512_mullo_epi32(part[r], _mm512_set1_epi32(w[r].scale[s])));
    }
    for (int j = 0; j < n_pairs; j++) {
        const __m512i sums = _mm512_load_si512(p->sums[j]);
        for (int r = 0; r < rows; r++)
            pairs[r] = _mm512_dpwssd_epi32(pairs[r], _mm512_set1_epi32(w[r].pairs[j]), sums);
    }
    if (offset_shift)
        for (int r = 0; r < rows; r++) {
            main[r] = _mm512_add_epi32(main[r], _mm512_slli_epi32(pairs[r], offset_shift));
            pairs[r] = _mm512_setzero_si512();
        }
}

/* The decode dot's float steps (vbmi_layouts.h) for `rows` rows and a panel's tokens: acc[r] (dmin sums in acc_m[r]). */
STEP void sb_floats(int rows, const struct weights_sb *w, const struct panel_sb *p, const __m512i main[ROWS],
                    const __m512i pairs[ROWS], float *acc, float *acc_m, int64_t stride, int with_mins) {
    const __m512 yd = _mm512_load_ps(p->d);
    for (int r = 0; r < rows; r++) {
        __m512 a = _mm512_loadu_ps(acc + r * stride);
        a = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(w[r].d), yd), _mm512_cvtepi32_ps(main[r]), a);
        _mm512_storeu_ps(acc + r * stride, a);
        if (with_mins) {
            __m512 m = _mm512_loadu_ps(acc_m + r * stride);
            m = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(w[r].dmin), yd), _mm512_cvtepi32_ps(pairs[r]), m);
            _mm512_storeu_ps(acc_m + r * stride, m);
        }
    }
}

typedef void (*unpack_fn)(const uint8_t *w, size_t w_row, int rows, int64_t i, struct weights_sb *out);

/* `rows` (<= ROWS) rows by the tokens of n_panels panels: superblock by superblock, the rows' weights unpacked once
 * into L1 and run against every panel, the running float sums in acc[r * stride + t] (and acc_m). */
STEP void row_block(int rows, int64_t k, const uint8_t *w, size_t w_row, const struct panel_sb *panels,
                    int64_t n_panels, float *acc, float *acc_m, int64_t stride, unpack_fn unpack, int run,
                    int n_pairs, int offset_shift) {
    const int64_t n_sb = k / QK_K;
    struct weights_sb ws[ROWS];
    for (int64_t i = 0; i < n_sb; i++) {
        unpack(w, w_row, rows, i, ws);
        for (int64_t pn = 0; pn < n_panels; pn++) {
            __m512i main[ROWS], pairs[ROWS];
            sb_sums(rows, run, n_pairs, offset_shift, ws, panels + pn * n_sb + i, main, pairs);
            sb_floats(rows, ws, panels + pn * n_sb + i, main, pairs, acc + pn * FL_PANEL, acc_m + pn * FL_PANEL,
                      stride, !offset_shift);
        }
    }
}

STEP void run_rows(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                   float *y, int64_t y_stride, unpack_fn unpack, int run, int n_pairs, int offset_shift,
                   int negated_mins) {
    const int64_t n_panels = (n_tok + FL_PANEL - 1) / FL_PANEL, stride = n_panels * FL_PANEL;
    float acc[ROWS * FL_GEMM_TOKENS], acc_m[ROWS * FL_GEMM_TOKENS];
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        int n = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
        memset(acc, 0, sizeof(float) * (size_t)(n * stride));
        memset(acc_m, 0, sizeof(float) * (size_t)(n * stride));
        const uint8_t *wr = (const uint8_t *)w + r0 * w_row;
        /* a constant row count per call, so the kernel's accumulators stay in registers */
        switch (n) {
#define ROW_CASE(R)                                                                                                  \
    case R:                                                                                                          \
        row_block(R, k, wr, w_row, panels, n_panels, acc, acc_m, stride, unpack, run, n_pairs, offset_shift);        \
        break;
            ROW_CASE(1) ROW_CASE(2) ROW_CASE(3) ROW_CASE(4) ROW_CASE(5) ROW_CASE(6) ROW_CASE(7) ROW_CASE(8)
#undef ROW_CASE
        }
        /* token by token: a token's rows are neighbours in y (rows outside cost a TLB miss per store) */
        for (int64_t t = 0; t < n_tok; t++)
            for (int r = 0; r < n; r++)
                y[t * y_stride + r0 + r] = negated_mins ? acc[r * stride + t] + acc_m[r * stride + t]
                                                        : acc[r * stride + t] - acc_m[r * stride + t];
    }
}

static void run_q2_K(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride) {
    run_rows(k, w, w_row, rows, panels, n_tok, y, y_stride, unpack_q2_K, 256, 8, 0, 1);
}

static void run_q3_K(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride) {
    run_rows(k, w, w_row, rows, panels, n_tok, y, y_stride, unpack_q3_K, 16, 8, 2, 0);
}

static void run_q4_K(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride) {
    run_rows(k, w, w_row, rows, panels, n_tok, y, y_stride, unpack_q4_K, 32, 4, 0, 0);
}

static void run_q5_K(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride) {
    run_rows(k, w, w_row, rows, panels, n_tok, y, y_stride, unpack_q5_K, 32, 4, 0, 0);
}

static void run_q6_K(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride) {
    run_rows(k, w, w_row, rows, panels, n_tok, y, y_stride, unpack_q6_K, 16, 8, 5, 0);
}

/* ---------------------------------------------------------------- Q8_0, MXFP4 and Q5_0 on Q8_0 activations */

/* A group of four blocks of a panel: dword j of lo[j] (hi[j]) holds bytes 4j..4j+3 of each token's struct q8_group
 * lo (hi), so that lo[4b..4b+3] and hi[4b..4b+3] are block b; base[b] seeds block b's sums, d[b] is its scale. */
struct panel_group {
    int32_t lo[16][FL_PANEL], hi[16][FL_PANEL];
    int32_t base[GROUP][FL_PANEL];
    float d[GROUP][FL_PANEL];
};

static size_t group_panel_bytes(int64_t k) {
    return (size_t)((k / QK8_0 + GROUP - 1) / GROUP) * sizeof(struct panel_group);
}

static void pack_groups(int64_t k, const void *prepared, void *panel, int lane) {
    for (int64_t g = 0; g < (k / QK8_0 + GROUP - 1) / GROUP; g++) {
        const struct q8_group *y = (const struct q8_group *)prepared + g;
        struct panel_group *p = (struct panel_group *)panel + g;
        int32_t lo[16], hi[16];
        memcpy(lo, y->lo, sizeof(lo));
        memcpy(hi, y->hi, sizeof(hi));
        for (int j = 0; j < 16; j++) {
            p->lo[j][lane] = lo[j];
            p->hi[j][lane] = hi[j];
        }
        for (int b = 0; b < GROUP; b++) {
            p->base[b][lane] = y->base[4 * b];
            p->d[b][lane] = y->d[4 * b];
        }
    }
}

typedef void (*group_fn)(const uint8_t *w, size_t w_row, int rows, int64_t g, int64_t n, struct q8_group_weights *out);

/* group g of `rows` rows by a panel: acc[(r * GROUP + b) * stride + t] are the running sums of block position b */
STEP void group_step(int rows, const struct q8_group_weights *w, const struct panel_group *p, float *acc,
                     int64_t stride) {
    for (int b = 0; b < GROUP; b++) {
        __m512i part[ROWS];
        for (int r = 0; r < rows; r++)
            part[r] = _mm512_load_si512(p->base[b]);
#pragma GCC unroll 4
        for (int jj = 0; jj < 4; jj++) {
            const int j = 4 * b + jj;
            const __m512i lo = _mm512_load_si512(p->lo[j]), hi = _mm512_load_si512(p->hi[j]);
            for (int r = 0; r < rows; r++) {
                int32_t q_lo, q_hi;
                memcpy(&q_lo, w[r].lo + 4 * j, sizeof(q_lo));
                memcpy(&q_hi, w[r].hi + 4 * j, sizeof(q_hi));
                part[r] = _mm512_dpbusd_epi32(part[r], _mm512_set1_epi32(q_lo), lo);
                part[r] = _mm512_dpbusd_epi32(part[r], _mm512_set1_epi32(q_hi), hi);
            }
        }
        const __m512 yd = _mm512_load_ps(p->d[b]);
        for (int r = 0; r < rows; r++) {
            float *a = acc + (r * GROUP + b) * stride;
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[r]), _mm512_mul_ps(_mm512_set1_ps(w[r].d[4 * b]), yd),
                                                _mm512_loadu_ps(a)));
        }
    }
}

STEP void group_rows(int rows, int64_t k, const uint8_t *w, size_t w_row, const struct panel_group *panels,
                     int64_t n_panels, float *acc, int64_t stride, group_fn unpack) {
    const int64_t n_groups = (k / QK8_0 + GROUP - 1) / GROUP;
    struct q8_group_weights ws[ROWS];
    for (int64_t g = 0; g < n_groups; g++) {
        unpack(w, w_row, rows, g, k, ws);
        for (int64_t pn = 0; pn < n_panels; pn++)
            group_step(rows, ws, panels + pn * n_groups + g, acc + pn * FL_PANEL, stride);
    }
}

static void run_groups(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                       float *y, int64_t y_stride, group_fn unpack) {
    const int64_t n_panels = (n_tok + FL_PANEL - 1) / FL_PANEL, stride = n_panels * FL_PANEL;
    float acc[ROWS * GROUP * FL_GEMM_TOKENS];
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        int n = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
        memset(acc, 0, sizeof(float) * (size_t)(n * GROUP * stride));
        const uint8_t *wr = (const uint8_t *)w + r0 * w_row;
        switch (n) {
#define ROW_CASE(R)                                                                                                  \
    case R:                                                                                                          \
        group_rows(R, k, wr, w_row, panels, n_panels, acc, stride, unpack);                                         \
        break;
            ROW_CASE(1) ROW_CASE(2) ROW_CASE(3) ROW_CASE(4) ROW_CASE(5) ROW_CASE(6) ROW_CASE(7) ROW_CASE(8)
#undef ROW_CASE
        }
        for (int64_t t = 0; t < n_tok; t++) /* token by token, as run_rows */
            for (int r = 0; r < n; r++) {
                const float *a = acc + r * GROUP * stride;
                y[t * y_stride + r0 + r] = (a[t] + a[stride + t]) + (a[2 * stride + t] + a[3 * stride + t]);
            }
    }
}

static void run_q8_0(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride) {
    run_groups(k, w, w_row, rows, panels, n_tok, y, y_stride, fl_vbmi_q8_0_groups);
}

static void run_q5_0(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride) {
    run_groups(k, w, w_row, rows, panels, n_tok, y, y_stride, fl_vbmi_q5_0_groups);
}

static void run_mxfp4(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                      float *y, int64_t y_stride) {
    run_groups(k, w, w_row, rows, panels, n_tok, y, y_stride, fl_vbmi_mxfp4_groups);
}

/* from 10 tokens on, below the token dots (tools/bench_batch_cost.py, one thread, time of n tokens over one token's,
 * Q8_0, MXFP4, Q4_K, Q6_K): with weights from memory, as V4-Flash's are, the token dots cost 2.3-3.9 at 8 tokens and
 * these kernels 2.8-6.1 (empty lanes, rows without prefetch), at 12 tokens 3.4-7.9 against 3.0-5.7; in cache these
 * win from 7-8 tokens (8: 3.1-4.4 against 4.0-5.4) */
#define MIN_TOKENS 10

const struct fl_gemm_kernel fl_gemm_q8_0_vbmi = {group_panel_bytes, pack_groups, run_q8_0, MIN_TOKENS};
const struct fl_gemm_kernel fl_gemm_mxfp4_vbmi = {group_panel_bytes, pack_groups, run_mxfp4, MIN_TOKENS};
const struct fl_gemm_kernel fl_gemm_q5_0_vbmi = {group_panel_bytes, pack_groups, run_q5_0, MIN_TOKENS};
const struct fl_gemm_kernel fl_gemm_q2_K_vbmi = {fl_vbmi_panel_bytes, fl_vbmi_pack_bit_pairs, run_q2_K, MIN_TOKENS};
const struct fl_gemm_kernel fl_gemm_q3_K_vbmi = {fl_vbmi_panel_bytes, pack_seeded, run_q3_K, MIN_TOKENS};
const struct fl_gemm_kernel fl_gemm_q4_K_vbmi = {fl_vbmi_panel_bytes, fl_vbmi_pack_nibbles, run_q4_K, MIN_TOKENS};
const struct fl_gemm_kernel fl_gemm_q5_K_vbmi = {fl_vbmi_panel_bytes, fl_vbmi_pack_nibbles, run_q5_K, MIN_TOKENS};
const struct fl_gemm_kernel fl_gemm_q6_K_vbmi = {fl_vbmi_panel_bytes, fl_vbmi_pack_bit_pairs, run_q6_K, MIN_TOKENS};
#endif

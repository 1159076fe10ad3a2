/* amx_gemm.c: prefill kernels (struct fl_gemm_kernel) of Q4_K, Q5_K and Q6_K on AMX-INT8, each result bitwise its
 * decode kernel's dot (avx512_vbmi.c), as the AVX-512 prefill kernels are (avx512_vbmi_gemm.c).
 *
 * Why this shape: one TDPBUSD multiplies a tile of 16 weight rows x 64 quants by 64 activations of 16 tokens (16384
 * products, about 16 cycles: some 16x the rate of vpdpbusd), but it adds all 64 products of a (row, token) pair
 * into one dword, so a k-quant's sub-block scales cannot be applied between runs of 32 (or 16) quants. They go into
 * the weight bytes instead, cut into digits small enough that quant times digit still fits the unsigned byte
 * TDPBUSD takes (vpmullw makes both bytes of a word at once, neither product reaching 256):
 * - Q4_K, Q5_K (quants 0..15, 0..31; scales 0..63): scale = lo + 8 hi with lo, hi in 0..7, two tiles of products
 *   per superblock, sum = C(lo) + 8 C(hi);
 * - Q6_K (quants 0..63; scales -128..127): scale + 128 = d0 + 4 d1 + 16 d2 + 64 d3 with digits 0..3, plus the plain
 *   quants, sum = C(d0) + 4 C(d1) + 16 C(d2) + 64 C(d3) - 128 C(plain).
 * The superblock's integer sum is then the decode dot's exactly (integer sums are exact in any order, and wrap
 * alike), the mins (Q6_K: the offset 32) meet the activation sums through vpdpwssd as in the AVX-512 kernel, and
 * the float steps are the decode dot's (vbmi_layouts.h). The activations are the AVX-512 kernel's panels unchanged:
 * 16 rows of a panel's y (dword j: bytes 4j..4j+3 of each token) are TDPBUSD's second tile as it is.
 *
 * Each run loads the tile configuration of its thread and releases the tiles at the end, so a thread that ran
 * one holds no tile state between calls. The process asks Linux for the tile data once (cpu.c). */
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 11) /* GCC has AMX intrinsics from 11 on */
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx512vbmi,amx-tile,amx-int8")
#include <immintrin.h>
#include <string.h>
#include "kernels.h"
#include "simd.h"
#include "vbmi_layouts.h"

#define STEP static inline __attribute__((always_inline))
/* rows of a weight tile, and tokens of a panel: TDPBUSD's 16 x 16 dwords */
#define TILE_ROWS 16
/* weight tiles per superblock at most: Q6_K's four digits and its plain quants */
#define MAX_PASSES 5

/* 16 rows of one superblock, unpacked: q[pass][r] the quants of row r times the pass's digits of their scales, in
 * the order of struct q8k_sb's q; pairs the words that meet the panel's sums; d and dmin per row */
struct amx_weights {
    uint8_t q[MAX_PASSES][TILE_ROWS][QK_K];
    int32_t pairs[TILE_ROWS][8];
    float d[TILE_ROWS], dmin[TILE_ROWS];
};

/* LDTILECFG's 64 bytes: palette 1, every tile 16 rows of 64 bytes */
struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static void load_tiles(void) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = TILE_ROWS;
    }
    _tile_loadconfig(&cfg);
}

/* vpermb's index that spreads a 16-byte table of digits, one per sub-block, over the words of vector c of a
 * superblock's quants (nibble order: 32-sub-blocks by 256-bit half; bit-pair order: 16-sub-blocks by 128-bit lane):
 * each even byte takes the digit of its word's sub-block, the odd bytes are zeroed by the mask */
static __m512i digit_index(int c, int nibble_order) {
    uint8_t idx[64];
    for (int b = 0; b < 64; b++) {
        int word = b / 2;
        idx[b] = (uint8_t)(nibble_order ? NIBBLE_SUB(c, word / 16) : BIT_PAIR_SUB(c, word / 8));
    }
    return _mm512_loadu_si512(idx);
}
#define EVEN_BYTES 0x5555555555555555ULL

/* quants times a digit per sub-block (digits: 16 bytes, one per sub-block; 0..7 for the nibble order's 32-sub-blocks,
 * 0..3 for the bit-pair order's 16): both bytes of a word at once, since no product reaches 256 */
STEP __m512i times_digits(__m512i q, __m128i digits, __m512i index) {
    return _mm512_mullo_epi16(q, _mm512_maskz_permutexvar_epi8(EVEN_BYTES, index, _mm512_broadcast_i32x4(digits)));
}

/* Q4_K and Q5_K: quants (nibble order) times the low and high three bits of their 6-bit scales; the mins as pairs */
STEP void unpack_nibble_row(const void *head, const __m512i q[4], struct amx_weights *w, int r, const __m512i idx[4]) {
    const __m128i sm = unpack_scales_mins((const uint8_t *)head + 4); /* sc0..7, m0..7 */
    const __m128i seven = _mm_set1_epi8(7);
    const __m128i lo = _mm_and_si128(sm, seven), hi = _mm_and_si128(_mm_srli_epi16(sm, 3), seven);
    for (int c = 0; c < 4; c++) {
        _mm512_storeu_si512(w->q[0][r] + 64 * c, times_digits(q[c], lo, idx[c]));
        _mm512_storeu_si512(w->q[1][r] + 64 * c, times_digits(q[c], hi, idx[c]));
    }
    _mm_storeu_si128((__m128i *)w->pairs[r], _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8))); /* words m0..m7 */
    uint32_t dm;
    memcpy(&dm, head, sizeof(dm));
    const __m128 d_dmin = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm));
    w->d[r] = _mm_cvtss_f32(d_dmin);
    w->dmin[r] = _mm_cvtss_f32(_mm_shuffle_ps(d_dmin, d_dmin, 1));
}

static void unpack_q4_K(const uint8_t *w, size_t w_row, int rows, int64_t i, struct amx_weights *out,
                        const __m512i idx[4]) {
    for (int r = 0; r < rows; r++) {
        const block_q4_K *x = (const block_q4_K *)(w + r * w_row) + i;
        __m512i q[4];
        nibble_quants(x->qs, q);
        unpack_nibble_row(x, q, out, r, idx);
    }
}

static void unpack_q5_K(const uint8_t *w, size_t w_row, int rows, int64_t i, struct amx_weights *out,
                        const __m512i idx[4]) {
    for (int r = 0; r < rows; r++) {
        const block_q5_K *x = (const block_q5_K *)(w + r * w_row) + i;
        __m512i q[4];
        nibble_quants(x->qs, q);
        add_fifth_bits(x->qh, q);
        unpack_nibble_row(x, q, out, r, idx);
    }
}

/* Q6_K: the plain quants (bit-pair order, 0..63), then the quants times each base-4 digit of scale + 128; its scales
 * as pairs (they meet the negated 16-sub-block sums: the offset 32) */
static void unpack_q6_K(const uint8_t *w, size_t w_row, int rows, int64_t i, struct amx_weights *out,
                        const __m512i idx[4]) {
    const __m128i three = _mm_set1_epi8(3);
    for (int r = 0; r < rows; r++) {
        const block_q6_K *x = (const block_q6_K *)(w + r * w_row) + i;
        __m512i q[4];
        q6_K_quants(x, q);
        const __m128i scales = _mm_loadu_si128((const __m128i *)x->scales);
        const __m128i biased = _mm_xor_si128(scales, _mm_set1_epi8((char)0x80)); /* scale + 128, 0..255 */
        for (int c = 0; c < 4; c++)
            _mm512_storeu_si512(out->q[0][r] + 64 * c, q[c]);
        for (int j = 0; j < 4; j++) {
            const __m128i digit = _mm_and_si128(_mm_srli_epi16(biased, 2 * j), three);
            for (int c = 0; c < 4; c++)
                _mm512_storeu_si512(out->q[1 + j][r] + 64 * c, times_digits(q[c], digit, idx[c]));
        }
        _mm256_storeu_si256((__m256i *)out->pairs[r], _mm256_cvtepi8_epi16(scales)); /* words s0..s15 */
        out->d[r] = _cvtsh_ss(x->d);
        out->dmin[r] = 0.0f;
    }
}

/* The integer sums of 16 rows' superblock (passes lo, hi) with one or two panels: C[p][pass][r][t] */
static void tiles_nibbles(const struct amx_weights *w, const struct panel_sb *p0, const struct panel_sb *p1,
                          int32_t c[2][2][TILE_ROWS][FL_PANEL]) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kc = 0; kc < 4; kc++) {
        _tile_loadd(4, w->q[0][0] + 64 * kc, QK_K);
        _tile_loadd(5, w->q[1][0] + 64 * kc, QK_K);
        _tile_loadd(6, p0->y[16 * kc], 64);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 5, 6);
        if (p1) {
            _tile_loadd(7, p1->y[16 * kc], 64);
            _tile_dpbusd(2, 4, 7);
            _tile_dpbusd(3, 5, 7);
        }
    }
    _tile_stored(0, c[0][0], 64);
    _tile_stored(1, c[0][1], 64);
    if (p1) {
        _tile_stored(2, c[1][0], 64);
        _tile_stored(3, c[1][1], 64);
    }
}

/* Q6_K's five passes with one panel: C[pass][r][t] */
static void tiles_q6_K(const struct amx_weights *w, const struct panel_sb *p, int32_t c[MAX_PASSES][TILE_ROWS][FL_PANEL]) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    for (int kc = 0; kc < 4; kc++) {
        _tile_loadd(5, p->y[16 * kc], 64);
        _tile_loadd(6, w->q[0][0] + 64 * kc, QK_K);
        _tile_dpbusd(0, 6, 5);
        _tile_loadd(7, w->q[1][0] + 64 * kc, QK_K);
        _tile_dpbusd(1, 7, 5);
        _tile_loadd(6, w->q[2][0] + 64 * kc, QK_K);
        _tile_dpbusd(2, 6, 5);
        _tile_loadd(7, w->q[3][0] + 64 * kc, QK_K);
        _tile_dpbusd(3, 7, 5);
        _tile_loadd(6, w->q[4][0] + 64 * kc, QK_K);
        _tile_dpbusd(4, 6, 5);
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    _tile_stored(4, c[4], 64);
}

/* pairs of row r times the panel's activation sums (n_pairs word pairs), as the AVX-512 kernel adds them */
STEP __m512i pair_sums(const struct amx_weights *w, int r, const struct panel_sb *p, int n_pairs) {
    __m512i s = _mm512_setzero_si512();
    for (int j = 0; j < n_pairs; j++)
        s = _mm512_dpwssd_epi32(s, _mm512_set1_epi32(w->pairs[r][j]), _mm512_load_si512(p->sums[j]));
    return s;
}

/* The decode dot's float steps (vbmi_layouts.h) for row r and a panel: acc (and the dmin sums in acc_m) */
STEP void float_steps(const struct amx_weights *w, int r, __m512 yd, __m512i main, __m512i mins, float *acc,
                      float *acc_m, int with_mins) {
    _mm512_storeu_ps(acc, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(w->d[r]), yd), _mm512_cvtepi32_ps(main),
                                          _mm512_loadu_ps(acc)));
    if (with_mins)
        _mm512_storeu_ps(acc_m, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(w->dmin[r]), yd),
                                                _mm512_cvtepi32_ps(mins), _mm512_loadu_ps(acc_m)));
}

static void sb_nibbles(int rows, const struct amx_weights *w, const struct panel_sb *panels, int64_t n_sb,
                       int64_t n_panels, float *acc, float *acc_m, int64_t stride) {
    int32_t c[2][2][TILE_ROWS][FL_PANEL] __attribute__((aligned(64)));
    for (int64_t pn = 0; pn < n_panels; pn += 2) {
        const int two = pn + 1 < n_panels;
        tiles_nibbles(w, panels + pn * n_sb, two ? panels + (pn + 1) * n_sb : NULL, c);
        for (int h = 0; h <= two; h++) {
            const struct panel_sb *p = panels + (pn + h) * n_sb;
            const __m512 yd = _mm512_load_ps(p->d);
            for (int r = 0; r < rows; r++) {
                const __m512i main = _mm512_add_epi32(_mm512_load_si512(c[h][0][r]),
                                                      _mm512_slli_epi32(_mm512_load_si512(c[h][1][r]), 3));
                float_steps(w, r, yd, main, pair_sums(w, r, p, 4), acc + r * stride + (pn + h) * FL_PANEL,
                            acc_m + r * stride + (pn + h) * FL_PANEL, 1);
            }
        }
    }
}

static void sb_q6_K(int rows, const struct amx_weights *w, const struct panel_sb *panels, int64_t n_sb,
                    int64_t n_panels, float *acc, float *acc_m, int64_t stride) {
    int32_t c[MAX_PASSES][TILE_ROWS][FL_PANEL] __attribute__((aligned(64)));
    (void)acc_m;
    for (int64_t pn = 0; pn < n_panels; pn++) {
        const struct panel_sb *p = panels + pn * n_sb;
        tiles_q6_K(w, p, c);
        const __m512 yd = _mm512_load_ps(p->d);
        for (int r = 0; r < rows; r++) {
            /* sum over runs of scale x run = sum_j 4^j C(d_j) - 128 C(plain); the offset 32 through the pairs */
            __m512i main = _mm512_add_epi32(_mm512_load_si512(c[1][r]), _mm512_slli_epi32(_mm512_load_si512(c[2][r]), 2));
            main = _mm512_add_epi32(main, _mm512_slli_epi32(_mm512_load_si512(c[3][r]), 4));
            main = _mm512_add_epi32(main, _mm512_slli_epi32(_mm512_load_si512(c[4][r]), 6));
            main = _mm512_sub_epi32(main, _mm512_slli_epi32(_mm512_load_si512(c[0][r]), 7));
            main = _mm512_add_epi32(main, _mm512_slli_epi32(pair_sums(w, r, p, 8), 5));
            float_steps(w, r, yd, main, main, acc + r * stride + pn * FL_PANEL, NULL, 0);
        }
    }
}

/* an unpacker and the order of its quants (1: nibbles, 0: bit pairs), for its digit indices */
/* y[t * y_stride + r] = acc - acc_m of rows r < n by tokens t < n_tok, 16 tokens at a time: the 16 rows x 16 tokens
 * transposed in registers, so that a token's rows, neighbours in y, go out as one store (row by row, each store
 * landed on a page of its own: 15% of a prefill) */
static void store_tokens(const float *acc, const float *acc_m, int64_t stride, int n, int64_t n_tok, float *y,
                         int64_t y_stride) {
    const __mmask16 rows = (__mmask16)((1u << n) - 1);
    for (int64_t t0 = 0; t0 < n_tok; t0 += FL_PANEL) {
        __m512 r[16], a[16], b[16];
        for (int i = 0; i < 16; i++)
            r[i] = i < n ? _mm512_sub_ps(_mm512_loadu_ps(acc + i * stride + t0), _mm512_loadu_ps(acc_m + i * stride + t0))
                         : _mm512_setzero_ps();
        for (int i = 0; i < 8; i++) { /* per 128-bit lane: pairs of rows, element by element */
            a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 4; i++) { /* b[4i + m], lane l: rows 4i..4i+3 of token 4l + m */
            b[4 * i] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0x44);
            b[4 * i + 1] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0xEE);
            b[4 * i + 2] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0x44);
            b[4 * i + 3] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0xEE);
        }
        for (int m = 0; m < 4; m++) { /* token 4l + m: lane l of b[m], b[4 + m], b[8 + m], b[12 + m] */
            const __m512 c0 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0x88), c1 = _mm512_shuffle_f32x4(b[m], b[4 + m], 0xDD);
            const __m512 c2 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0x88), c3 = _mm512_shuffle_f32x4(b[8 + m], b[12 + m], 0xDD);
            const __m512 out[4] = {_mm512_shuffle_f32x4(c0, c2, 0x88), _mm512_shuffle_f32x4(c1, c3, 0x88),
                                   _mm512_shuffle_f32x4(c0, c2, 0xDD), _mm512_shuffle_f32x4(c1, c3, 0xDD)};
            for (int l = 0; l < 4; l++)
                if (t0 + 4 * l + m < n_tok)
                    _mm512_mask_storeu_ps(y + (t0 + 4 * l + m) * y_stride, rows, out[l]);
        }
    }
}

typedef void (*unpack_fn)(const uint8_t *w, size_t w_row, int rows, int64_t i, struct amx_weights *out,
                          const __m512i idx[4]);
typedef void (*sb_fn)(int rows, const struct amx_weights *w, const struct panel_sb *panels, int64_t n_sb,
                      int64_t n_panels, float *acc, float *acc_m, int64_t stride);

/* 16 rows at a time: superblock by superblock, the rows' weights unpacked once into L1 and run against every panel,
 * the running float sums in acc[r * stride + t] (and acc_m); rows past the last of a block are zero weights */
static void run_rows(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride, unpack_fn unpack, int nibble_order, sb_fn sb) {
    const int64_t n_panels = (n_tok + FL_PANEL - 1) / FL_PANEL, stride = n_panels * FL_PANEL, n_sb = k / QK_K;
    float acc[TILE_ROWS * FL_GEMM_TOKENS], acc_m[TILE_ROWS * FL_GEMM_TOKENS];
    struct amx_weights ws __attribute__((aligned(64)));
    __m512i idx[4];
    for (int c = 0; c < 4; c++)
        idx[c] = digit_index(c, nibble_order);
    load_tiles();
    for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
        const int n = rows - r0 < TILE_ROWS ? (int)(rows - r0) : TILE_ROWS;
        memset(acc, 0, sizeof(float) * (size_t)(n * stride));
        memset(acc_m, 0, sizeof(float) * (size_t)(n * stride));
        if (n < TILE_ROWS)
            for (int pass = 0; pass < MAX_PASSES; pass++)
                memset(ws.q[pass][n], 0, (size_t)(TILE_ROWS - n) * QK_K);
        const uint8_t *wr = (const uint8_t *)w + r0 * w_row;
        for (int64_t i = 0; i < n_sb; i++) {
            unpack(wr, w_row, n, i, &ws, idx);
            sb(n, &ws, (const struct panel_sb *)panels + i, n_sb, n_panels, acc, acc_m, stride);
        }
        store_tokens(acc, acc_m, stride, n, n_tok, y + r0, y_stride);
    }
    _tile_release();
}

static void run_q4_K(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride) {
    run_rows(k, w, w_row, rows, panels, n_tok, y, y_stride, unpack_q4_K, 1, sb_nibbles);
}

static void run_q5_K(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride) {
    run_rows(k, w, w_row, rows, panels, n_tok, y, y_stride, unpack_q5_K, 1, sb_nibbles);
}

static void run_q6_K(int64_t k, const void *w, size_t w_row, int64_t rows, const void *panels, int64_t n_tok,
                     float *y, int64_t y_stride) {
    run_rows(k, w, w_row, rows, panels, n_tok, y, y_stride, unpack_q6_K, 0, sb_q6_K);
}

/* From how many tokens on each beats the token dots (struct fl_decode_kernel dot_tn), one thread, time with AMX over
 * time without, median of 7 alternated pairs. Weights from memory (4096 x 4096, as V4-Flash's are): Q4_K 3 tokens 2.27,
 * 6: 1.53, 8: 1.25, 9: 0.98; Q6_K 6 tokens 1.83, 8: 1.52, 9: 1.17 (the AVX-512 kernel takes over from 10). In cache
 * (4096 x 256) AMX wins from 3 tokens (Q4_K 0.85, at 8 0.37): a few tokens leave the tiles waiting on rows that the
 * token dots stream with prefetches, so the threshold is the one for weights from memory. */
#define AMX_MIN_NIBBLES 9
#define AMX_MIN_Q6 10
static const struct fl_gemm_kernel gemm_q4_K = {fl_vbmi_panel_bytes, fl_vbmi_pack_nibbles, run_q4_K, AMX_MIN_NIBBLES};
static const struct fl_gemm_kernel gemm_q5_K = {fl_vbmi_panel_bytes, fl_vbmi_pack_nibbles, run_q5_K, AMX_MIN_NIBBLES};
static const struct fl_gemm_kernel gemm_q6_K = {fl_vbmi_panel_bytes, fl_vbmi_pack_bit_pairs, run_q6_K, AMX_MIN_Q6};

const struct fl_gemm_kernel *fl_gemm_amx(const struct fl_gemm_kernel *avx512) {
    if (avx512 == &fl_gemm_q4_K_vbmi)
        return &gemm_q4_K;
    if (avx512 == &fl_gemm_q5_K_vbmi)
        return &gemm_q5_K;
    if (avx512 == &fl_gemm_q6_K_vbmi)
        return &gemm_q6_K;
    return NULL;
}
#elif defined(__x86_64__)
#include "simd.h"

/* built without AMX intrinsics: the AVX-512 kernels stay */
const struct fl_gemm_kernel *fl_gemm_amx(const struct fl_gemm_kernel *avx512) {
    (void)avx512;
    return NULL;
}
#endif

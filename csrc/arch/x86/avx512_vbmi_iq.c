/* avx512_vbmi_iq.c: the decode kernels of the i-quants for CPUs with AVX512-VNNI, VBMI, IFMA, GFNI and BITALG, each on
 * a Q8_K activation row prepared once per call in a layout made for it (struct fl_decode_kernel).
 *
 * Why this shape: an i-quant spends its time turning grid indices into weights. ggml's x86 dots look each grid point up
 * with scalar loads and insert it into a vector, and vpgatherqq measures no better here (~4 cycles for 8 points, and it
 * holds the shuffle port), where a 2-bit type has to turn out ~8 weights a cycle to keep up with memory. So the lattice
 * types whose grids are small enough look their points up in registers instead: a table of 256 bytes is four zmm, and
 * vpermi2b reads 128 of them for 64 indices at a time (IQ2_S's 1024-byte tables are read from memory the same way; only
 * the 2048-point grids of IQ1_S and IQ1_M are gathered). The byte looked up is not the weights but a code of their
 * levels, 2 bits a coordinate (IQ2_XXS, IQ2_XS, IQ2_S: four coordinates a byte, two tables) or 3 bits (IQ3: two a
 * byte). Which coordinate of which grid point each output byte holds is fixed by the lookups, so the activations are
 * prepared in that same order, and so that the four bytes of every dword belong to one sub-block: vpdpbusd's sums
 * then need one scale per dword. The IQ2 types and IQ3_XXS look their weights up from the codes already signed: one
 * bit select merges a coordinate's level code and sign bit (or two coordinates', IQ2) into the low 6 bits of a byte,
 * and a vpermb on a 64-byte table yields the signed weight offset to an unsigned byte, the offset undone by a sum
 * prepared with the activations; the parity sign (the eighth, not stored) is one gf2p8affineqb. IQ3_S's levels 1, 3,
 * .., 15 let one gf2p8affineqb per 64 weights do it instead: offset by 16, a weight's negative is its XOR with 0x1e,
 * and over GF(2) the level -> magnitude map is affine in the level's bits, so its signs join the codes and the affine
 * map yields signed weights (unsigned bytes 1..31), the offset undone by a precomputed sum. IQ4_XS needs no grid:
 * its 16 values are a vpermb lookup, offset to unsigned bytes (+128) whose cost is precomputed with the activations,
 * as avx512_vbmi.c does for MXFP4.
 *
 * The activations are quantized here, vectorized, bit for bit as fl_quantize_row_q8_K_ref does. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512bitalg,avx512ifma", \
                     "gfni")
#include <float.h>
#include <immintrin.h>
#include <pthread.h>
#include <string.h>
#include "kernels.h"
#include "quant_generic.h"
#include "simd.h"
#include "vbmi_rows.h"

/* ---------------------------------------------------------------- Q8_K activations */

/* One block of x quantized to Q8_K, its quants in element order into q, returning d: bit for bit
 * fl_quantize_row_q8_K_ref (the same single product per value, rounded to nearest even as its magic-number
 * rounding does). A block with a NaN or an infinity goes through the reference itself. */
static float q8k_block(const float *x, int8_t *q) {
    __m512 v[16];
    float iscale = 0.0f; /* set whenever q8k_load_scale returns 1 */
    int scaled = q8k_load_scale(x, v, &iscale);
    if (scaled < 0) {
        block_q8_K ref;
        fl_quantize_row_q8_K_ref(x, &ref, QK_K);
        memcpy(q, ref.qs, QK_K);
        return ref.d;
    }
    if (scaled == 0) {
        memset(q, 0, QK_K);
        return 0.0f;
    }
    const __m512 vs = _mm512_set1_ps(iscale);
    for (int j = 0; j < 16; j++) {
        __m512i r = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v[j], vs)), _mm512_set1_epi32(127));
        _mm_storeu_si128((__m128i *)(q + 16 * j), _mm512_cvtepi32_epi8(r));
    }
    return 1 / iscale;
}

/* ---------------------------------------------------------------- grid codes, built once */

/* IQ2_XXS: bits 2f, 2f+1 of iq2xxs_hi[i] are the level (0, 1, 2 for 0x08, 0x19, 0x2b) of coordinate 4 + f of
 * grid point i; iq2xxs_lo[i] holds those of coordinates 2, 3, 0, 1 in that order (iq2_signed_weights) */
static uint8_t iq2xxs_lo[256] __attribute__((aligned(64))), iq2xxs_hi[256] __attribute__((aligned(64)));
/* IQ2_XS and IQ2_S: the same codes for their 512 and 1024 points */
static uint8_t iq2xs_lo[512] __attribute__((aligned(64))), iq2xs_hi[512] __attribute__((aligned(64)));
static uint8_t iq2s_lo[1024] __attribute__((aligned(64))), iq2s_hi[1024] __attribute__((aligned(64)));
/* IQ3_XXS: the levels k (0..7 for 4, 12, .., 52, 62) of coordinates 0 and 1 (iq3xxs_code[0]) or 2 and 3
 * (iq3xxs_code[1]) of grid point i, each coordinate c's three bits at iq3xxs_level_bits[c] (lowest first), so that
 * its sign can take bit c (dot_iq3_xxs_sb_step) */
static uint8_t iq3xxs_code[2][256] __attribute__((aligned(64)));
static const int iq3xxs_level_bits[4][3] = {{1, 2, 3}, {0, 4, 5}, {0, 1, 3}, {2, 4, 5}};
/* IQ3_XXS's signed weights, 62 + the weight (an unsigned byte 0..124 for vpdpbusd, the offset undone by the
 * activations' base), looked up by vpermb for coordinate c from a byte with its sign in bit c and its level at
 * iq3xxs_level_bits[c] */
static uint8_t iq3xxs_weight[4][64] __attribute__((aligned(64)));
/* IQ3_S: coordinates 0 and 1 (iq3s_code[0]) or 2 and 3 (iq3s_code[1]) of its 512 points, as the levels k of
 * 1 + 2k in bits 0..2 and 3..5; bits 6 and 7 are left for the two coordinates' signs */
static uint8_t iq3s_code[2][512] __attribute__((aligned(64)));

/* IQ1_S and IQ1_M: byte j of iq1s_pairs[i] holds coordinates 2 j (low nibble) and 2 j + 1 (high nibble) of grid
 * point i, each + 1 (0, 1, 2 for -1, 0, 1) */
static uint32_t iq1s_pairs[2048] __attribute__((aligned(64)));
/* byte i of their activations' a[r] (struct q8k_ilv) is element ilv_pick[r][i] of the superblock, less 128 for
 * i >= 32, whose elements come from the second 128 (prep_ilv) */
static uint8_t ilv_pick[4][64] __attribute__((aligned(64)));

/* the levels (0, 1, 2 for 0x08, 0x19, 0x2b) of n grid points, 2 bits each: of coordinates 2, 3, 0, 1 in lo, of
 * 4..7 in hi (the order iq2_signed_weights takes) */
static void build_iq2_codes(const uint64_t *grid, int n, uint8_t *lo, uint8_t *hi) {
    static const int lo_slot[4] = {2, 3, 0, 1}; /* coordinate f's bit pair in lo */
    for (int i = 0; i < n; i++) {
        lo[i] = hi[i] = 0;
        for (int f = 0; f < 4; f++) {
            lo[i] |= (uint8_t)((((grid[i] >> (8 * f)) & 0xff) - 0x08) / 17 << (2 * lo_slot[f]));
            hi[i] |= (uint8_t)((((grid[i] >> (8 * (f + 4))) & 0xff) - 0x08) / 17 << (2 * f));
        }
    }
}

/* The IQ2 types' signed weights come from vpermb lookups on a byte that holds two coordinates' levels and signs
 * in its low 6 bits (the bits vpermb reads): 43 + the weight, an unsigned byte 0..86 for vpdpbusd and
 * vpmaddubsw, the offset undone by a sum prepared with the activations. Of the four such bytes a position has,
 * two put the signs in bits 0 and 1 and the levels in bits 2..5 (layout P), two the levels in bits 0..3 and the
 * signs in bits 4 and 5 (layout Q): table[n] of the layout is the first coordinate's weight (n = 0) or the
 * second's (n = 1). */
static uint8_t iq2_weight_p[2][64] __attribute__((aligned(64))), iq2_weight_q[2][64] __attribute__((aligned(64)));

static void build_iq2_weights(void) {
    static const int level[4] = {0x08, 0x19, 0x2b, 0x2b}; /* code 3 is never looked up */
    for (int x = 0; x < 64; x++)
        for (int n = 0; n < 2; n++) {
            int p_level = level[x >> (2 + 2 * n) & 3], p_sign = x >> n & 1;
            int q_level = level[x >> (2 * n) & 3], q_sign = x >> (4 + n) & 1;
            iq2_weight_p[n][x] = (uint8_t)(43 + (p_sign ? -p_level : p_level));
            iq2_weight_q[n][x] = (uint8_t)(43 + (q_sign ? -q_level : q_level));
        }
}

static void build_codes(void) {
    for (int i = 0; i < 2048; i++) {
        uint32_t v = 0;
        for (int c = 0; c < 8; c++)
            v |= (uint32_t)((int8_t)(fl_iq1s_grid[i] >> (8 * c)) + 1) << (8 * (c / 2) + 4 * (c % 2));
        iq1s_pairs[i] = v;
    }
    for (int e = 0; e < QK_K; e++) { /* struct q8k_ilv's order */
        int s = e / 32, z = e % 32 / 8, c = e % 8;
        ilv_pick[2 * (z % 2) + c % 2][4 * (2 * s + z / 2) + c / 2] = (uint8_t)(e % 128);
    }
    static const int iq3xxs_levels[8] = {0x04, 0x0c, 0x14, 0x1c, 0x24, 0x2c, 0x34, 0x3e};
    for (int i = 0; i < 256; i++)
        for (int h = 0; h < 2; h++) {
            uint8_t code = 0;
            for (int c = 2 * h; c < 2 * h + 2; c++) {
                int k = (int)(((fl_iq3xxs_grid[i] >> (8 * c)) & 0xff) - 0x04) / 8;
                for (int j = 0; j < 3; j++)
                    code |= (uint8_t)((k >> j & 1) << iq3xxs_level_bits[c][j]);
            }
            iq3xxs_code[h][i] = code;
        }
    for (int c = 0; c < 4; c++)
        for (int x = 0; x < 64; x++) {
            int k = 0;
            for (int j = 0; j < 3; j++)
                k |= (x >> iq3xxs_level_bits[c][j] & 1) << j;
            iq3xxs_weight[c][x] = (uint8_t)(62 + (x >> c & 1 ? -iq3xxs_levels[k] : iq3xxs_levels[k]));
        }
    build_iq2_weights();
    build_iq2_codes(fl_iq2xxs_grid, 256, iq2xxs_lo, iq2xxs_hi);
    build_iq2_codes(fl_iq2xs_grid, 512, iq2xs_lo, iq2xs_hi);
    build_iq2_codes(fl_iq2s_grid, 1024, iq2s_lo, iq2s_hi);
    for (int i = 0; i < 512; i++)
        for (int h = 0; h < 2; h++) {
            uint8_t code = 0;
            for (int c = 0; c < 2; c++)
                code |= (uint8_t)((((fl_iq3s_grid[i] >> (8 * (2 * h + c))) & 0xff) - 1) / 2 << (3 * c));
            iq3s_code[h][i] = code;
        }
}

/* gf2p8affineqb's matrix: output bit i is the parity of (input & row i), row i in byte 7 - i */
#define AFFINE(r0, r1, r2, r3, r4, r5, r6, r7)                                                                   \
    ((long long)((uint64_t)(r0) << 56 | (uint64_t)(r1) << 48 | (uint64_t)(r2) << 40 | (uint64_t)(r3) << 32 |     \
                 (uint64_t)(r4) << 24 | (uint64_t)(r5) << 16 | (uint64_t)(r6) << 8 | (uint64_t)(r7)))
/* bits 0..6 kept, bit 7 their parity: the eighth sign of IQ2_XXS / IQ3_XXS (fl_iq2_signs) */
#define PARITY_SIGN AFFINE(0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x7f)
/* IQ3_S: level k at bit 3h, sign bit at 6 + h -> 16 + 1 + 2k (0x11 ^ 2k) if the sign bit is clear, 16 - 1 - 2k
 * (0x0f ^ 2k) if set: a signed weight offset to an unsigned byte, its sign one XOR (0x1e), so one
 * gf2p8affineqb applies sign and magnitude (with the constant 0x11) */
#define IQ3S_SIGNED(h)                                                                                           \
    AFFINE(0, (1 << (3 * (h))) | (0x40 << (h)), (2 << (3 * (h))) | (0x40 << (h)), (4 << (3 * (h))) | (0x40 << (h)), \
           0x40 << (h), 0, 0, 0)

/* a qword of 8 control bytes j -> b[j], repeated: for vpmultishiftqb and vpshufbitqmb */
#define BYTES8(b0, b1, b2, b3, b4, b5, b6, b7)                                                                   \
    ((long long)((uint64_t)(b0) | (uint64_t)(b1) << 8 | (uint64_t)(b2) << 16 | (uint64_t)(b3) << 24 |           \
                 (uint64_t)(b4) << 32 | (uint64_t)(b5) << 40 | (uint64_t)(b6) << 48 | (uint64_t)(b7) << 56))

/* t[idx] for 64 byte indices from a 256-byte table in four zmm: vpermi2b reads 7 bits, bit 7 (top) picks the half */
static inline __m512i lookup256(__m512i idx, __mmask64 top, const __m512i *t) {
    return _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(t[0], idx, t[1]),
                                  _mm512_permutex2var_epi8(t[2], idx, t[3]));
}

/* the product of a weight block's fp16 d and the activation block's d, in every lane */
static inline __m512 d_times(fl_half dx, float dy) {
    return _mm512_set1_ps(_cvtsh_ss(dx) * dy);
}

/* Loads that stand in for shuffles: IQ3_XXS and IQ3_S are bound by the shuffle port, where a broadcast from a
 * register and vpinsrw go; a broadcast from memory takes a load port instead, and vcvtph2ps from memory needs no
 * vpinsrw. Compilers keep a value just computed in a register, so the memory operands are asked for in assembly
 * (a store and its reload cost no vector port). */
static inline __m512 broadcast32_from(const void *p) {
    __m512 lanes;
    __asm__("vbroadcastss %1, %0" : "=v"(lanes) : "m"(*(const float *)p));
    return lanes;
}

/* the four fp16 values of the qword at p as floats */
static inline __m128 halves_from(const void *p) {
    __m128 f;
    __asm__("vcvtph2ps %1, %0" : "=v"(f) : "m"(*(const uint64_t *)p));
    return f;
}

/* d_times for a weight d in memory (halves_from reads it and the 6 bytes after it: every block's fields follow
 * d), with no shuffle-port uop; the product is the same single rounding, so the same bits */
static inline __m512 d_times_mem(const fl_half *dx, const float *dy) {
    float product = _mm_cvtss_f32(halves_from(dx)) * *dy;
    return broadcast32_from(&product);
}

/* one float accumulator; the sums are per-block floats, so one FMA a block */
struct acc1 {
    __m512 acc;
};

STEP struct acc1 acc1_init(void) { return (struct acc1){_mm512_setzero_ps()}; }

STEP float acc1_finish(const struct acc1 *st) { return _mm512_reduce_add_ps(st->acc); }

/* for the types whose integer sums are 8 times the products (IQ2: scales 2 s + 1 for (0.5 + s) / 4; IQ1) */
STEP float eighth_finish(const struct acc1 *st) { return 0.125f * _mm512_reduce_add_ps(st->acc); }

STEP int64_t superblocks(int64_t n) { return n / QK_K; }

/* ---------------------------------------------------------------- IQ4_XS */

/* One superblock of activations in the order of IQ4_XS's quant bytes: lo[z] byte 16 s + j is element
 * 32 (4 z + s) + j, what the low nibble of quant byte 64 z + 16 s + j multiplies; hi[z] the element 16 further,
 * for the high nibble. base[z] dword d: -128 * the sum of the eight activations the dword's lo and hi bytes hold,
 * which undoes the weights' offset of 128 and seeds the sums. */
struct iq4xs_sb {
    int8_t lo[2][64];
    int8_t hi[2][64];
    int32_t base[2][16];
    float d;
    uint8_t pad[60];
};

static size_t iq4xs_bytes(int64_t k) { return (size_t)(k / QK_K) * sizeof(struct iq4xs_sb); }

static void prep_iq4_xs(int64_t k, const float *x, void *out) {
    struct iq4xs_sb *sb = out;
    for (int64_t i = 0; i < k / QK_K; i++) {
        int8_t q[QK_K];
        memset(&sb[i], 0, sizeof(sb[i]));
        sb[i].d = q8k_block(x + i * QK_K, q);
        for (int z = 0; z < 2; z++)
            for (int b = 0; b < 64; b++) {
                int e = 32 * (4 * z + b / 16) + b % 16;
                sb[i].lo[z][b] = q[e];
                sb[i].hi[z][b] = q[e + 16];
                sb[i].base[z][b / 4] -= 128 * (q[e] + q[e + 16]);
            }
    }
}

struct iq4xs_consts {
    __m512i values;   /* kvalues_iq4nl + 128, repeated: vpermb reads 6 bits, so the nibble needs no masking */
    __m512i pick[2];  /* dword d of half z: the sub-block 4 z + d / 4 it belongs to */
    __m256i shift_lo, shift_hi;
};

STEP struct iq4xs_consts dot_iq4_xs_sb_consts(void) {
    uint8_t v[16];
    for (int j = 0; j < 16; j++)
        v[j] = (uint8_t)(fl_kvalues_iq4nl[j] + 128);
    return (struct iq4xs_consts){_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)v)),
                                 {_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                  _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7)},
                                 _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28),
                                 _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)};
}

#define dot_iq4_xs_sb_init acc1_init
#define dot_iq4_xs_sb_finish acc1_finish

STEP void dot_iq4_xs_sb_step(struct acc1 *st, const void *vx, int64_t i, int64_t n, const void *vy,
                             const struct iq4xs_consts *c) {
    (void)n;
    const block_iq4_xs *x = (const block_iq4_xs *)vx + i;
    const struct iq4xs_sb *y = (const struct iq4xs_sb *)vy + i;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_iq4_xs));
    /* the 8 sub-block scales ls - 32: low 4 bits from scales_l, the top 2 from scales_h */
    uint32_t lo;
    memcpy(&lo, x->scales_l, sizeof(lo));
    __m256i ls = _mm256_or_si256(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)lo), c->shift_lo), _mm256_set1_epi32(15)),
        _mm256_slli_epi32(
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(x->scales_h), c->shift_hi), _mm256_set1_epi32(3)),
            4));
    __m512i ls32 = _mm512_castsi256_si512(_mm256_sub_epi32(ls, _mm256_set1_epi32(32)));
    __m512i sum = _mm512_setzero_si512();
    for (int z = 0; z < 2; z++) {
        __m512i q = _mm512_loadu_si512(x->qs + 64 * z);
        __m512i lo_w = _mm512_permutexvar_epi8(q, c->values);
        __m512i hi_w = _mm512_permutexvar_epi8(_mm512_srli_epi16(q, 4), c->values);
        __m512i s = _mm512_dpbusd_epi32(_mm512_load_si512(y->base[z]), lo_w, _mm512_load_si512(y->lo[z]));
        s = _mm512_dpbusd_epi32(s, hi_w, _mm512_load_si512(y->hi[z]));
        sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(s, _mm512_permutexvar_epi32(c->pick[z], ls32)));
    }
    st->acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d_times(x->d, y->d), st->acc);
}

ROW_DOTS(dot_iq4_xs_sb, struct iq4xs_consts, struct acc1, superblocks)

/* ---------------------------------------------------------------- IQ2_XXS, two superblocks a step */

/* Position i = 4 j + l of a pair stands for grid index l of sub-block s of superblock b (8 weights), where dword j
 * is the one vshufps puts sub-block s's index dword in: in 128-bit lane j / 4, superblock b = j % 4 / 2's
 * sub-block s = 2 (j / 4) + j % 2 (iq2xxs_pair_dword). a[c] byte i is the activation of its coordinate c,
 * element 32 s + 8 l + c of superblock b. base dword j: -43 times the sum of its sub-block, which takes out the
 * offset of 43 that the signed weights carry (iq2_signed_weights) and seeds the sums; d: superblock b's d in
 * dword j. A missing second superblock (an odd count) is all zeros. */
struct iq2xxs_pair {
    int8_t a[8][64];
    int32_t base[16];
    float d[16];
};

/* the dword of a pair that holds sub-block s of superblock b (struct iq2xxs_pair) */
static int iq2xxs_pair_dword(int b, int s) { return 4 * (s / 2) + 2 * b + s % 2; }

static size_t iq2xxs_bytes(int64_t k) { return (size_t)((k / QK_K + 1) / 2) * sizeof(struct iq2xxs_pair); }

static void prep_iq2_xxs(int64_t k, const float *x, void *out) {
    struct iq2xxs_pair *p = out;
    memset(out, 0, iq2xxs_bytes(k));
    for (int64_t i = 0; i < k / QK_K; i++) {
        int8_t q[QK_K];
        struct iq2xxs_pair *dst = &p[i / 2];
        int b = (int)(i % 2);
        float d = q8k_block(x + i * QK_K, q);
        for (int s = 0; s < 8; s++) {
            int j = iq2xxs_pair_dword(b, s);
            dst->d[j] = d;
            for (int l = 0; l < 4; l++)
                for (int c = 0; c < 8; c++) {
                    dst->a[c][4 * j + l] = q[32 * s + 8 * l + c];
                    dst->base[j] -= 43 * q[32 * s + 8 * l + c];
                }
        }
    }
}

/* the weight tables of layouts P and Q (iq2_weight_p, iq2_weight_q) */
struct iq2_weight_tables {
    __m512i p[2], q[2];
};

STEP struct iq2_weight_tables iq2_weight_tables(void) {
    struct iq2_weight_tables t;
    for (int n = 0; n < 2; n++) {
        t.p[n] = _mm512_load_si512(iq2_weight_p[n]);
        t.q[n] = _mm512_load_si512(iq2_weight_q[n]);
    }
    return t;
}

/* w[c]: 43 + the signed weight of coordinate c of the 64 positions, from their level codes (lo: coordinates 2, 3,
 * 0, 1 in its bit pairs, hi: 4..7) and signs (raw: s0, s1 in bits 0, 1 and s4, s5 in bits 4, 5; moved: s6, s7
 * in bits 0, 1 and s2, s3 in bits 4, 5). The four bytes looked up each hold two coordinates' levels and signs:
 * coordinates 0, 1 and 6, 7 in layout P, 2, 3 and 4, 5 in layout Q. */
STEP void iq2_signed_weights(__m512i lo, __m512i hi, __m512i raw, __m512i moved, const struct iq2_weight_tables *t,
                             __m512i w[8]) {
    const __m512i bits01 = _mm512_set1_epi8(0x03), bits45 = _mm512_set1_epi8(0x30);
    __m512i x01 = _mm512_ternarylogic_epi64(bits01, raw, _mm512_srli_epi16(lo, 2), 0xca); /* A ? B : C */
    __m512i x23 = _mm512_ternarylogic_epi64(bits45, moved, lo, 0xca);
    __m512i x45 = _mm512_ternarylogic_epi64(bits45, raw, hi, 0xca);
    __m512i x67 = _mm512_ternarylogic_epi64(bits01, moved, _mm512_srli_epi16(hi, 2), 0xca);
    for (int n = 0; n < 2; n++) {
        w[n] = _mm512_permutexvar_epi8(x01, t->p[n]);
        w[2 + n] = _mm512_permutexvar_epi8(x23, t->q[n]);
        w[4 + n] = _mm512_permutexvar_epi8(x45, t->q[n]);
        w[6 + n] = _mm512_permutexvar_epi8(x67, t->p[n]);
    }
}

struct iq2xxs_consts {
    const __m512i *lo, *hi; /* the code tables */
    struct iq2_weight_tables weights;
};

STEP struct iq2xxs_consts dot_iq2_xxs_pair_consts(void) {
    struct iq2xxs_consts c;
    c.lo = (const __m512i *)iq2xxs_lo;
    c.hi = (const __m512i *)iq2xxs_hi;
    c.weights = iq2_weight_tables();
    return c;
}

#define dot_iq2_xxs_pair_init acc1_init

/* the lanes put back in the order of sub-block s of superblock b in lane 2 s + b before they are added, the order
 * IQ2_XS and IQ2_S sum in (the same bits as when IQ2_XXS's pairs had that layout too) */
STEP float dot_iq2_xxs_pair_finish(const struct acc1 *st) {
    __m512 lanes = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15),
                                         st->acc);
    return 0.125f * _mm512_reduce_add_ps(lanes);
}

STEP int64_t superblock_pairs(int64_t n) { return (n / QK_K + 1) / 2; }

/* the pair's sums times their superblock's d, dword j's the fp16 d in half j of d_halves (0 for a missing
 * superblock), and times the activations' d (dword j of yd) */
STEP void pair_accumulate(struct acc1 *st, __m512i sum, __m256i d_halves, const float *yd) {
    __m512 dx = _mm512_cvtph_ps(d_halves);
    st->acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dx, _mm512_load_ps(yd)), st->acc);
}

/* the sign bits 7 j .. 7 j + 6 of a sub-block's word -> s0..s6 in bits 0..6 of byte j (bit 7 is not a sign) */
#define IQ2XXS_SIGN_SHIFTS BYTES8(0, 7, 14, 21, 32, 39, 46, 53)
/* bits 0..6 the signs s0..s6 -> s6 in bit 0, the parity sign s7 in bit 1, s2 and s3 in bits 4 and 5 */
#define IQ2XXS_SIGNS_MOVED AFFINE(0x40, 0x7f, 0, 0, 0x04, 0x08, 0, 0)

STEP void dot_iq2_xxs_pair_step(struct acc1 *st, const void *vx, int64_t g, int64_t n, const void *vy,
                                const struct iq2xxs_consts *c) {
    const block_iq2_xxs *x = (const block_iq2_xxs *)vx + 2 * g;
    const struct iq2xxs_pair *y = (const struct iq2xxs_pair *)vy + g;
    const int two = n / QK_K - 2 * g >= 2;
    prefetch_ahead((const uint8_t *)x, 2 * (int)sizeof(block_iq2_xxs));
    /* qs dword 2 s: the grid indices of sub-block s, 2 s + 1 its word of 4 x 7 sign bits and the scale on top */
    __m512i q0 = _mm512_loadu_si512(x[0].qs), q1 = two ? _mm512_loadu_si512(x[1].qs) : _mm512_setzero_si512();
    /* one vshufps each (a shift and a bit select each took two uops): in each 128-bit lane, the index dwords
     * (words) of sub-blocks 2 k, 2 k + 1 of superblock 0, then of superblock 1 (iq2xxs_pair_dword) */
    __m512i idx = _mm512_castps_si512(
        _mm512_shuffle_ps(_mm512_castsi512_ps(q0), _mm512_castsi512_ps(q1), _MM_SHUFFLE(2, 0, 2, 0)));
    __m512i words = _mm512_castps_si512(
        _mm512_shuffle_ps(_mm512_castsi512_ps(q0), _mm512_castsi512_ps(q1), _MM_SHUFFLE(3, 1, 3, 1)));
    __mmask64 top = _mm512_movepi8_mask(idx);
    __m512i lo = lookup256(idx, top, c->lo), hi = lookup256(idx, top, c->hi);
    /* byte i: the signs of position i, s0..s6 in bits 0..6 (raw), and moved with the parity sign (moved) */
    __m512i raw = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(IQ2XXS_SIGN_SHIFTS), words);
    __m512i moved = _mm512_gf2p8affine_epi64_epi8(raw, _mm512_set1_epi64(IQ2XXS_SIGNS_MOVED), 0);
    __m512i w[8];
    iq2_signed_weights(lo, hi, raw, moved, &c->weights, w);
    __m512i sum0 = _mm512_load_si512(y->base), sum1 = _mm512_setzero_si512();
    for (int f = 0; f < 8; f += 2) {
        sum0 = _mm512_dpbusd_epi32(sum0, w[f], _mm512_load_si512(y->a[f]));
        sum1 = _mm512_dpbusd_epi32(sum1, w[f + 1], _mm512_load_si512(y->a[f + 1]));
    }
    /* each dword holds one sub-block: times its 2 scale + 1, (word >> 27) | 1 */
    __m512i ls = _mm512_or_si512(_mm512_srli_epi32(words, 27), _mm512_set1_epi32(1));
    fl_half d1 = two ? x[1].d : 0;
    pair_accumulate(st, _mm512_mullo_epi32(_mm512_add_epi32(sum0, sum1), ls),
                    _mm256_set1_epi64x((long long)(x[0].d * 0x10001ull | d1 * 0x1000100000000ull)), y->d);
}

ROW_DOTS(dot_iq2_xxs_pair, struct iq2xxs_consts, struct acc1, superblock_pairs)

/* ---------------------------------------------------------------- IQ2_XS and IQ2_S, two superblocks a step */

/* Both take IQ2_XXS's signed weights (iq2_signed_weights); position 8 s + 4 b + l is grid point 4 s + l of superblock
 * b, picked by vpermt2b from the two blocks' qs (pair_pick). Their scales are per 16 weights, two positions, so the
 * products go through vpmaddubsw (adjacent positions 2 j, 2 j + 1 share a scale) and vpdpwssd applies the scales a
 * word at a time, one coordinate at a time (two coordinates' word sums of offset weights could overflow). The
 * activations: a[c] byte i, coordinate c of position i, element 32 s + 8 l + c of superblock b; base word j: minus the
 * sum of the 16 activations of positions 2 j and 2 j + 1, which times 43 and the scales takes out the weights' offset;
 * d: superblock b's d in the dwords 2 s + b. A missing second superblock is all zeros. */
struct iq2_pair {
    int8_t a[8][64];
    int16_t base[32];
    float d[16];
};

static size_t iq2_bytes(int64_t k) { return (size_t)((k / QK_K + 1) / 2) * sizeof(struct iq2_pair); }

static void prep_iq2(int64_t k, const float *x, void *out) {
    struct iq2_pair *p = out;
    memset(out, 0, iq2_bytes(k));
    for (int64_t i = 0; i < k / QK_K; i++) {
        int8_t q[QK_K];
        struct iq2_pair *dst = &p[i / 2];
        int b = (int)(i % 2);
        float d = q8k_block(x + i * QK_K, q);
        for (int s = 0; s < 8; s++) {
            dst->d[2 * s + b] = d;
            for (int l = 0; l < 4; l++)
                for (int c = 0; c < 8; c++) {
                    dst->a[c][8 * s + 4 * b + l] = q[32 * s + 8 * l + c];
                    dst->base[(8 * s + 4 * b + l) / 2] = (int16_t)(dst->base[(8 * s + 4 * b + l) / 2] -
                                                                   q[32 * s + 8 * l + c]);
                }
        }
    }
}

/* word j of the result, positions 2 j and 2 j + 1 (sub-block j / 4 of superblock j / 2 % 2): 2 s + 1 of its scale
 * nibble j % 2. Qword s holds the two superblocks' scale bytes s, which vpmultishiftqb shifts to each word's
 * nibble, one bit up. sc1: NULL for a missing second superblock. */
STEP __m512i iq2_pair_scales(const uint8_t *sc0, const uint8_t *sc1) {
    __m128i sc = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)sc0),
                                   sc1 ? _mm_loadl_epi64((const __m128i *)sc1) : _mm_setzero_si128());
    return _mm512_ternarylogic_epi64(
        _mm512_multishift_epi64_epi8(_mm512_set1_epi64(BYTES8(63, 0, 3, 0, 7, 0, 11, 0)), _mm512_cvtepu16_epi64(sc)),
        _mm512_set1_epi16(0x1e), _mm512_set1_epi16(1), 0xea); /* (A & B) | C */
}

/* The sums of a pair's weights (w: iq2_signed_weights) times activations times scales ls: dword 2 s + b,
 * sub-block s of superblock b. A coordinate's word sums stay below 2 * 86 * 127 in magnitude; the offset's
 * share, 43 times the scales times the base, is one vpmaddwd (43 * 31 * 2032 < 2^31). */
STEP __m512i iq2_pair_sums(const __m512i w[8], __m512i ls, const struct iq2_pair *y) {
    __m512i sum0 = _mm512_madd_epi16(_mm512_mullo_epi16(ls, _mm512_set1_epi16(43)), _mm512_load_si512(y->base));
    __m512i sum1 = _mm512_setzero_si512();
    for (int f = 0; f < 8; f += 2) {
        sum0 = _mm512_dpwssd_epi32(sum0, _mm512_maddubs_epi16(w[f], _mm512_load_si512(y->a[f])), ls);
        sum1 = _mm512_dpwssd_epi32(sum1, _mm512_maddubs_epi16(w[f + 1], _mm512_load_si512(y->a[f + 1])), ls);
    }
    return _mm512_add_epi32(sum0, sum1);
}

/* byte i: position i's index in the 128 bytes of two blocks' fields read as one table, position 8 s + 4 b + l at
 * byte 64 b + stride (4 s + l) + offset */
static inline __m512i pair_pick(int stride, int offset) {
    uint8_t pick[64];
    for (int i = 0; i < 64; i++)
        pick[i] = (uint8_t)(64 * (i / 4 % 2) + stride * (4 * (i / 8) + i % 4) + offset);
    return _mm512_loadu_si512(pick);
}

/* d0 in the even halves, d1 in the odd: dword 2 s + b of the pair's sums is superblock b's */
STEP __m256i iq2_pair_d(fl_half d0, fl_half d1) { return _mm256_set1_epi32((int)(d0 | (uint32_t)d1 << 16)); }

/* IQ2_XS: qs word 4 s + l of superblock b is grid point 4 s + l, its low byte the low 8 bits of a 9-bit index,
 * its high byte the ninth bit and 7 signs */
struct iq2xs_consts {
    const __m512i *lo, *hi;      /* the code tables, read where they are (see IQ2_S) */
    __m512i pick_low, pick_high; /* the low and high bytes of the positions' qs words */
    struct iq2_weight_tables weights;
};

STEP struct iq2xs_consts dot_iq2_xs_pair_consts(void) {
    struct iq2xs_consts c;
    c.lo = (const __m512i *)iq2xs_lo;
    c.hi = (const __m512i *)iq2xs_hi;
    c.pick_low = pair_pick(2, 0);
    c.pick_high = pair_pick(2, 1);
    c.weights = iq2_weight_tables();
    return c;
}

#define dot_iq2_xs_pair_init acc1_init
#define dot_iq2_xs_pair_finish eighth_finish

/* the high byte of an IQ2_XS qs word (the ninth index bit, then s0..s6) -> s6 in bit 0, the parity sign s7 in
 * bit 1, s2 and s3 in bits 4 and 5 */
#define IQ2XS_SIGNS_MOVED AFFINE(0x80, 0xfe, 0, 0, 0x08, 0x10, 0, 0)

STEP void dot_iq2_xs_pair_step(struct acc1 *st, const void *vx, int64_t g, int64_t n, const void *vy,
                               const struct iq2xs_consts *c) {
    const block_iq2_xs *x = (const block_iq2_xs *)vx + 2 * g;
    const struct iq2_pair *y = (const struct iq2_pair *)vy + g;
    const int two = n / QK_K - 2 * g >= 2;
    prefetch_ahead((const uint8_t *)x, 2 * (int)sizeof(block_iq2_xs));
    __m512i q0 = _mm512_loadu_si512(x[0].qs), q1 = two ? _mm512_loadu_si512(x[1].qs) : _mm512_setzero_si512();
    __m512i idx = _mm512_permutex2var_epi8(q0, c->pick_low, q1);
    __m512i high = _mm512_permutex2var_epi8(q0, c->pick_high, q1);
    __mmask64 top = _mm512_movepi8_mask(idx), ninth = _mm512_test_epi8_mask(high, _mm512_set1_epi8(1));
    __m512i lo = _mm512_mask_blend_epi8(ninth, lookup256(idx, top, c->lo), lookup256(idx, top, c->lo + 4));
    __m512i hi = _mm512_mask_blend_epi8(ninth, lookup256(idx, top, c->hi), lookup256(idx, top, c->hi + 4));
    /* the signs, raw: s_f in bit f (a shift past the ninth bit), moved: as iq2_signed_weights wants them */
    __m512i raw = _mm512_srli_epi16(high, 1);
    __m512i moved = _mm512_gf2p8affine_epi64_epi8(high, _mm512_set1_epi64(IQ2XS_SIGNS_MOVED), 0);
    __m512i w[8];
    iq2_signed_weights(lo, hi, raw, moved, &c->weights, w);
    __m512i ls = iq2_pair_scales(x[0].scales, two ? x[1].scales : NULL);
    pair_accumulate(st, iq2_pair_sums(w, ls, y), iq2_pair_d(x[0].d, two ? x[1].d : 0), y->d);
}

ROW_DOTS(dot_iq2_xs_pair, struct iq2xs_consts, struct acc1, superblock_pairs)

/* IQ2_S: qs byte 4 s + l the low 8 bits of grid point 4 s + l's 10-bit index, bits 2 l, 2 l + 1 of qh byte s
 * the top two, qs byte 32 + 4 s + l its 8 signs. Its code tables are 16 zmm each, too many to hold in registers
 * with the rest: the lookups read them where they are (a copy in the consts cost every row 64 more moves). */
struct iq2s_consts {
    const __m512i *lo, *hi;
    __m512i pick_low, pick_signs, pick_qh; /* bytes from the two blocks' qs, and from their qh side by side */
    struct iq2_weight_tables weights;
};

STEP struct iq2s_consts dot_iq2_s_pair_consts(void) {
    struct iq2s_consts c;
    c.lo = (const __m512i *)iq2s_lo;
    c.hi = (const __m512i *)iq2s_hi;
    c.pick_low = pair_pick(1, 0);
    c.pick_signs = pair_pick(1, 32);
    uint8_t pick[64];
    for (int i = 0; i < 64; i++)
        pick[i] = (uint8_t)(8 * (i / 4 % 2) + i / 8);
    c.pick_qh = _mm512_loadu_si512(pick);
    c.weights = iq2_weight_tables();
    return c;
}

#define dot_iq2_s_pair_init acc1_init
#define dot_iq2_s_pair_finish eighth_finish

/* an IQ2_S sign byte (s0..s7) -> s6, s7 in bits 0, 1 and s2, s3 in bits 4, 5 */
#define IQ2S_SIGNS_MOVED AFFINE(0x40, 0x80, 0, 0, 0x04, 0x08, 0, 0)

/* t[idx] for 64 10-bit indices, bits 0..6 in idx, bit 7 in top, 8 and 9 in b8 and b9, from a 1024-byte table */
static inline __m512i lookup1024(__m512i idx, __mmask64 top, __mmask64 b8, __mmask64 b9, const __m512i *t) {
    return _mm512_mask_blend_epi8(b9, _mm512_mask_blend_epi8(b8, lookup256(idx, top, t), lookup256(idx, top, t + 4)),
                                  _mm512_mask_blend_epi8(b8, lookup256(idx, top, t + 8), lookup256(idx, top, t + 12)));
}

STEP void dot_iq2_s_pair_step(struct acc1 *st, const void *vx, int64_t g, int64_t n, const void *vy,
                              const struct iq2s_consts *c) {
    const block_iq2_s *x = (const block_iq2_s *)vx + 2 * g;
    const struct iq2_pair *y = (const struct iq2_pair *)vy + g;
    const int two = n / QK_K - 2 * g >= 2;
    prefetch_ahead((const uint8_t *)x, 2 * (int)sizeof(block_iq2_s));
    __m512i q0 = _mm512_loadu_si512(x[0].qs), q1 = two ? _mm512_loadu_si512(x[1].qs) : _mm512_setzero_si512();
    __m512i idx = _mm512_permutex2var_epi8(q0, c->pick_low, q1);
    __m512i signs = _mm512_permutex2var_epi8(q0, c->pick_signs, q1);
    /* byte i: qh byte s of superblock b, whose bits 2 l, 2 l + 1 are position i's index bits 8 and 9 */
    __m128i qh = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)x[0].qh),
                                    two ? _mm_loadl_epi64((const __m128i *)x[1].qh) : _mm_setzero_si128());
    __m512i qhv = _mm512_permutexvar_epi8(c->pick_qh, _mm512_castsi128_si512(qh));
    __mmask64 top = _mm512_movepi8_mask(idx);
    __mmask64 b8 = _mm512_test_epi8_mask(qhv, _mm512_set1_epi32(0x40100401));
    __mmask64 b9 = _mm512_test_epi8_mask(qhv, _mm512_set1_epi32((int)0x80200802u));
    __m512i lo = lookup1024(idx, top, b8, b9, c->lo), hi = lookup1024(idx, top, b8, b9, c->hi);
    __m512i w[8];
    iq2_signed_weights(lo, hi, signs, _mm512_gf2p8affine_epi64_epi8(signs, _mm512_set1_epi64(IQ2S_SIGNS_MOVED), 0),
                       &c->weights, w);
    __m512i ls = iq2_pair_scales(x[0].scales, two ? x[1].scales : NULL);
    pair_accumulate(st, iq2_pair_sums(w, ls, y), iq2_pair_d(x[0].d, two ? x[1].d : 0), y->d);
}

ROW_DOTS(dot_iq2_s_pair, struct iq2s_consts, struct acc1, superblock_pairs)

/* ---------------------------------------------------------------- IQ3_XXS and IQ3_S */

/* One superblock of activations for IQ3_XXS: position i (0..63) stands for grid index i (4 weights,
 * sub-block i / 8), a[c] byte i is the activation of its coordinate c, element 4 i + c; base dword d: -62 times
 * the sum of the 16 activations dword d of the four a[c] holds, which takes out the offset of 62 the signed
 * weights carry (iq3xxs_weight) and seeds the sums */
struct iq3xxs_sb {
    int8_t a[4][64];
    int32_t base[16];
    float d;
    uint8_t pad[60];
};

static size_t iq3xxs_bytes(int64_t k) { return (size_t)(k / QK_K) * sizeof(struct iq3xxs_sb); }

static void prep_iq3_xxs(int64_t k, const float *x, void *out) {
    struct iq3xxs_sb *sb = out;
    for (int64_t i = 0; i < k / QK_K; i++) {
        int8_t q[QK_K];
        memset(&sb[i], 0, sizeof(sb[i]));
        sb[i].d = q8k_block(x + i * QK_K, q);
        for (int p = 0; p < 64; p++)
            for (int c = 0; c < 4; c++) {
                sb[i].a[c][p] = q[4 * p + c];
                sb[i].base[p / 4] -= 62 * q[4 * p + c];
            }
    }
}

struct iq3xxs_consts {
    const __m512i *code[2];
    __m512i weight[4];
};

STEP struct iq3xxs_consts dot_iq3_xxs_sb_consts(void) {
    struct iq3xxs_consts c;
    c.code[0] = (const __m512i *)iq3xxs_code[0];
    c.code[1] = (const __m512i *)iq3xxs_code[1];
    for (int j = 0; j < 4; j++)
        c.weight[j] = _mm512_load_si512(iq3xxs_weight[j]);
    return c;
}

#define dot_iq3_xxs_sb_init acc1_init

STEP float dot_iq3_xxs_sb_finish(const struct acc1 *st) { return 0.25f * _mm512_reduce_add_ps(st->acc); }

STEP void dot_iq3_xxs_sb_step(struct acc1 *st, const void *vx, int64_t i, int64_t n, const void *vy,
                              const struct iq3xxs_consts *c) {
    (void)n;
    const block_iq3_xxs *x = (const block_iq3_xxs *)vx + i;
    const struct iq3xxs_sb *y = (const struct iq3xxs_sb *)vy + i;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_iq3_xxs));
    __m512i idx = _mm512_loadu_si512(x->qs);
    __mmask64 top = _mm512_movepi8_mask(idx);
    __m512i code01 = lookup256(idx, top, c->code[0]), code23 = lookup256(idx, top, c->code[1]);
    /* qword s: sub-block s's word of 4 x 7 sign bits and the scale on top -> bytes 0..3: its four sign bytes, with
     * parity -> byte p: the low nibble of sign byte p / 2 (p even) or its high nibble (p odd), the signs of
     * position p's four coordinates in bits 0..3 */
    __m512i words = _mm512_cvtepu32_epi64(_mm256_loadu_si256((const __m256i *)(x->qs + QK_K / 4)));
    __m512i sign_bytes = _mm512_gf2p8affine_epi64_epi8(
        _mm512_multishift_epi64_epi8(_mm512_set1_epi64(BYTES8(0, 7, 14, 21, 0, 0, 0, 0)), words),
        _mm512_set1_epi64(PARITY_SIGN), 0);
    __m512i signs = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(BYTES8(0, 4, 8, 12, 16, 20, 24, 28)), sign_bytes);
    /* coordinate c: its sign in bit c beside its level (iq3xxs_level_bits), looked up as a signed weight; dword d
     * sums sub-block d / 2's positions 4 d .. 4 d + 3 */
    __m512i sum0 = _mm512_load_si512(y->base), sum1 = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
        __m512i byte = _mm512_ternarylogic_epi64(_mm512_set1_epi8((char)(1 << j)), signs, j < 2 ? code01 : code23, 0xca);
        __m512i w = _mm512_permutexvar_epi8(byte, c->weight[j]);
        if (j % 2)
            sum1 = _mm512_dpbusd_epi32(sum1, w, _mm512_load_si512(y->a[j]));
        else
            sum0 = _mm512_dpbusd_epi32(sum0, w, _mm512_load_si512(y->a[j]));
    }
    __m512i sum = _mm512_add_epi32(sum0, sum1);
    /* dword d: sub-block d / 2, times 2 scale + 1. Qword s of words is word s, its scale in bits 28..31: one
     * vpmadd52luq makes 2 scale + 1 in both dwords, (2 scale) (2^32 + 1) + (2^32 + 1), two uops off the shuffle
     * port where a vpermd spread the words */
    const __m512i both = _mm512_set1_epi64((long long)0x100000001ull);
    __m512i ls = _mm512_madd52lo_epu64(both, _mm512_srli_epi64(words, 28), _mm512_add_epi64(both, both));
    st->acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_mullo_epi32(sum, ls)), d_times_mem(&x->d, &y->d), st->acc);
}

ROW_DOTS(dot_iq3_xxs_sb, struct iq3xxs_consts, struct acc1, superblocks)

/* One superblock of activations for IQ3_S: a[c] byte i the activation of coordinate c of position i, element
 * 4 i + c, as for IQ3_XXS; base dword d: -16 times the sum of the 16 activations dword d of the four a[c] holds,
 * which takes out the offset of 16 the signed weights carry (IQ3S_SIGNED) and seeds the sums */
struct iq3s_sb {
    int8_t a[4][64];
    int32_t base[16];
    float d;
    uint8_t pad[60];
};

static size_t iq3s_bytes(int64_t k) { return (size_t)(k / QK_K) * sizeof(struct iq3s_sb); }

static void prep_iq3_s(int64_t k, const float *x, void *out) {
    struct iq3s_sb *sb = out;
    for (int64_t i = 0; i < k / QK_K; i++) {
        int8_t q[QK_K];
        memset(&sb[i], 0, sizeof(sb[i]));
        sb[i].d = q8k_block(x + i * QK_K, q);
        for (int p = 0; p < 64; p++)
            for (int c = 0; c < 4; c++) {
                sb[i].a[c][p] = q[4 * p + c];
                sb[i].base[p / 4] -= 16 * q[4 * p + c];
            }
    }
}

struct iq3s_consts {
    const __m512i *code[2];
};

STEP struct iq3s_consts dot_iq3_s_sb_consts(void) {
    struct iq3s_consts c;
    c.code[0] = (const __m512i *)iq3s_code[0];
    c.code[1] = (const __m512i *)iq3s_code[1];
    return c;
}

#define dot_iq3_s_sb_init acc1_init
#define dot_iq3_s_sb_finish acc1_finish

STEP void dot_iq3_s_sb_step(struct acc1 *st, const void *vx, int64_t i, int64_t n, const void *vy,
                            const struct iq3s_consts *c) {
    (void)n;
    const block_iq3_s *x = (const block_iq3_s *)vx + i;
    const struct iq3s_sb *y = (const struct iq3s_sb *)vy + i;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_iq3_s));
    /* 9-bit indices: the low 8 in qs, the ninth of index i bit i of qh read as one 64-bit mask */
    __m512i idx = _mm512_loadu_si512(x->qs);
    __mmask64 top = _mm512_movepi8_mask(idx), ninth;
    memcpy(&ninth, x->qh, sizeof(ninth));
    __m512i code01 = _mm512_mask_blend_epi8(ninth, lookup256(idx, top, c->code[0]), lookup256(idx, top, c->code[0] + 4));
    __m512i code23 = _mm512_mask_blend_epi8(ninth, lookup256(idx, top, c->code[1]), lookup256(idx, top, c->code[1] + 4));
    /* qword s: the 32 sign bits of sub-block s, bit 4 p + c that of coordinate c of its position p (byte p of
     * the qword) -> byte p: the signs of coordinates 2 h, 2 h + 1 in bits 6 and 7, beside their levels */
    __m512i sign_bits = _mm512_cvtepu32_epi64(_mm256_loadu_si256((const __m256i *)x->signs));
    const __m512i level_bits = _mm512_set1_epi8(0x3f);
    __m512i s01 = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(BYTES8(58, 62, 2, 6, 10, 14, 18, 22)), sign_bits);
    __m512i s23 = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(BYTES8(60, 0, 4, 8, 12, 16, 20, 24)), sign_bits);
    code01 = _mm512_ternarylogic_epi64(level_bits, code01, s01, 0xca); /* A ? B : C */
    code23 = _mm512_ternarylogic_epi64(level_bits, code23, s23, 0xca);
    /* dword d: sub-block d / 2 (positions 4 d .. 4 d + 3), the sum of its signed weights times the activations */
    __m512i sum0 = _mm512_dpbusd_epi32(_mm512_load_si512(y->base),
                                       _mm512_gf2p8affine_epi64_epi8(code01, _mm512_set1_epi64(IQ3S_SIGNED(0)), 0x11),
                                       _mm512_load_si512(y->a[0]));
    __m512i sum1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                       _mm512_gf2p8affine_epi64_epi8(code01, _mm512_set1_epi64(IQ3S_SIGNED(1)), 0x11),
                                       _mm512_load_si512(y->a[1]));
    sum0 = _mm512_dpbusd_epi32(sum0, _mm512_gf2p8affine_epi64_epi8(code23, _mm512_set1_epi64(IQ3S_SIGNED(0)), 0x11),
                               _mm512_load_si512(y->a[2]));
    sum1 = _mm512_dpbusd_epi32(sum1, _mm512_gf2p8affine_epi64_epi8(code23, _mm512_set1_epi64(IQ3S_SIGNED(1)), 0x11),
                               _mm512_load_si512(y->a[3]));
    __m512i sum = _mm512_add_epi32(sum0, sum1);
    /* dword d: sub-block d / 2, times 2 scale + 1, the scale nibble d / 2 of the 32-bit scales */
    uint32_t scales;
    memcpy(&scales, x->scales, sizeof(scales));
    __m512i nib = _mm512_srlv_epi32(_mm512_set1_epi32((int)scales),
                                    _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28));
    __m512i ls = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(nib, _mm512_set1_epi32(15)), 1),
                                 _mm512_set1_epi32(1));
    /* |sum| <= 16 * 15 * 127 fits its low word, so vpmaddwd multiplies it exactly: one uop, vpmulld's two */
    st->acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(sum, ls)), d_times_mem(&x->d, &y->d), st->acc);
}

ROW_DOTS(dot_iq3_s_sb, struct iq3s_consts, struct acc1, superblocks)

/* ---------------------------------------------------------------- IQ1_S, IQ1_M: gathered grids */

/* Grids of 2048 points do not fit in registers (IQ2_S's 1024 fill them): their points are gathered, and the
 * gathers bound these types, so each point is gathered as a dword of two coordinates a byte (iq1s_pairs), 16
 * points a vpgatherdd, which measured 1.7 ns where two vpgatherqq of 8 points as bytes took 2.4; a mask and a
 * gf2p8affineqb split the nibbles into two vectors of weights. A superblock is two gathers: dword 2 q + h of gather b
 * is grid point z = 2 h + b of sub-block q, so that each qword of either belongs to one sub-block and each dword
 * to one pair of points that share IQ1_M's scale (z = 0, 1 or 2, 3): one scale vector serves all. One
 * superblock of activations in that order: a[2 b + n] byte 4 (2 q + h) + j is element 32 q + 8 (2 h + b) + 2 j
 * + n, what nibble n of byte j of that dword multiplies; bsn dword 2 q: minus the sum of sub-block q's 32
 * elements (0 in the odd dwords); sum8: the sums of each 8 elements, in element order. */
struct q8k_ilv {
    int8_t a[4][64];
    int32_t bsn[16];
    int16_t sum8[32];
    float d;
    uint8_t pad[60];
};

static size_t ilv_bytes(int64_t k) { return (size_t)(k / QK_K) * sizeof(struct q8k_ilv); }

/* The activations in a superblock's order by two vpermt2b each (the first 32 bytes of every a[r] come from the
 * first 128 elements, the rest from the second), and the sums of 8 by vpsadbw on the elements + 128: a loop of
 * scattered byte stores had made this prep 3-4 times the other i-quants' (the same integers either way). */
static void prep_ilv(int64_t k, const float *x, void *out) {
    struct q8k_ilv *sb = out;
    for (int64_t i = 0; i < k / QK_K; i++) {
        int8_t q[QK_K] __attribute__((aligned(64)));
        memset(&sb[i], 0, sizeof(sb[i]));
        sb[i].d = q8k_block(x + i * QK_K, q);
        __m512i v[4];
        for (int j = 0; j < 4; j++)
            v[j] = _mm512_load_si512(q + 64 * j);
        for (int r = 0; r < 4; r++) {
            __m512i pick = _mm512_load_si512(ilv_pick[r]);
            _mm512_store_si512(sb[i].a[r], _mm512_mask_blend_epi8(0xffffffff00000000ull,
                                                                  _mm512_permutex2var_epi8(v[0], pick, v[1]),
                                                                  _mm512_permutex2var_epi8(v[2], pick, v[3])));
        }
        for (int j = 0; j < 4; j++) {
            /* qword m: the sum of elements 64 j + 8 m .. + 7, each + 128 */
            __m512i sums =
                _mm512_sad_epu8(_mm512_xor_si512(v[j], _mm512_set1_epi8((char)0x80)), _mm512_setzero_si512());
            _mm_storeu_si128((__m128i *)(sb[i].sum8 + 8 * j),
                             _mm512_cvtepi64_epi16(_mm512_sub_epi64(sums, _mm512_set1_epi64(8 * 128))));
        }
        const int16_t *sum8 = sb[i].sum8;
        for (int s = 0; s < 8; s++)
            sb[i].bsn[2 * s] = -(sum8[4 * s] + sum8[4 * s + 1] + sum8[4 * s + 2] + sum8[4 * s + 3]);
    }
}

/* The two gathers' indices: low 8 bits from qs byte 4 q + z of dword 2 q + h (z = 2 h + b), zero-extended, by
 * vpermb; the top 3 bits from the word of each sub-block (IQ1_S: qh[q], IQ1_M: its two qh bytes) in the high
 * half of every dword (`words`), shifted down by shift[b] */
struct iq1_consts {
    __m512i pick[2];  /* for vpermb, bytes 4 q + 2 h + b of qs in the low bytes of dwords, the rest zeroed */
    __m512i spread;   /* for vpermw: word q of the sub-block words in the high half of dword 2 q + h */
    __m512i coef;     /* IQ1_M: word s + 8 n, -(2 s + 1) (7 + 2 n), the coefficient of a shift (below) */
};

STEP struct iq1_consts iq1_consts(void) {
    struct iq1_consts c;
    uint8_t pick[2][64];
    int16_t spread[32];
    for (int d = 0; d < 16; d++) {
        for (int b = 0; b < 2; b++) {
            pick[b][4 * d] = (uint8_t)(4 * (d / 2) + 2 * (d % 2) + b);
            pick[b][4 * d + 1] = pick[b][4 * d + 2] = pick[b][4 * d + 3] = 0x80; /* any byte: masked off */
        }
        spread[2 * d] = 0;
        spread[2 * d + 1] = (int16_t)(d / 2);
    }
    c.pick[0] = _mm512_loadu_si512(pick[0]);
    c.pick[1] = _mm512_loadu_si512(pick[1]);
    c.spread = _mm512_loadu_si512(spread);
    int16_t coef[32] = {0};
    for (int t = 0; t < 16; t++)
        coef[t] = (int16_t)(-(2 * (t % 8) + 1) * (7 + 2 * (t / 8)));
    c.coef = _mm512_loadu_si512(coef);
    return c;
}

/* a byte's high nibble, moved to the low one: one uop where a shift and a mask are two */
#define HIGH_NIBBLE AFFINE(0x10, 0x20, 0x40, 0x80, 0, 0, 0, 0)

STEP void iq1_gather(const uint8_t *qs, __m512i words, __m512i shift0, __m512i shift1, const struct iq1_consts *c,
                     __m512i g[4]) {
    __m512i q = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)qs));
    for (int b = 0; b < 2; b++) {
        __m512i low = _mm512_maskz_permutexvar_epi8(0x1111111111111111ull, c->pick[b], q);
        __m512i idx = _mm512_ternarylogic_epi32(low, _mm512_srlv_epi32(words, b ? shift1 : shift0),
                                                _mm512_set1_epi32(0x700), 0xf8); /* A | (B & C) */
        __m512i pairs = _mm512_i32gather_epi32(idx, (const void *)iq1s_pairs, 4);
        g[2 * b] = _mm512_and_si512(pairs, _mm512_set1_epi8(0x0f));
        g[2 * b + 1] = _mm512_gf2p8affine_epi64_epi8(pairs, _mm512_set1_epi64(HIGH_NIBBLE), 0);
    }
}

/* IQ1_S and IQ1_M: the grid's -1, 0, 1 are gathered + 1, as 0, 1, 2; with ls the scale and delta = +-1 the sign
 * of the shift, 8 times a run of weights contributes ls (8 (sum of (g + 1) q) - (8 - delta) (sum of q)), whose
 * second part goes through the prepared sums. */
#define dot_iq1_s_sb_consts iq1_consts
#define dot_iq1_s_sb_init acc1_init
#define dot_iq1_s_sb_finish eighth_finish
#define dot_iq1_m_sb_consts iq1_consts
#define dot_iq1_m_sb_init acc1_init
#define dot_iq1_m_sb_finish eighth_finish

/* A superblock of IQ1_S unpacked: its grid points + 1 (in the order of struct q8k_ilv), the scale times 8 in the
 * low word of each dword of qword q (sub-block q), the scale times 8 - delta in each qword, and d. A four-token dot
 * unpacks it once for its four tokens: the gathers are most of the work. */
struct iq1s_weights {
    __m512i g[4], ls8, shift;
    fl_half d;
};

STEP struct iq1s_weights dot_iq1_s_sb_weights(const void *vx, int64_t i, int64_t n, const struct iq1_consts *c) {
    (void)n;
    const block_iq1_s *x = (const block_iq1_s *)vx + i;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_iq1_s));
    struct iq1s_weights w;
    /* qh[q]: the top 3 bits of the four indices of sub-block q (point z at bit 3 z), its scale in bits 12..14, its
     * shift's sign on top; in the high half of dwords 2 q, 2 q + 1 */
    __m512i words = _mm512_maskz_permutexvar_epi16(0xaaaaaaaau, c->spread,
                                                   _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)x->qh)));
    iq1_gather(x->qs, words, _mm512_set_epi32(14, 8, 14, 8, 14, 8, 14, 8, 14, 8, 14, 8, 14, 8, 14, 8),
               _mm512_set_epi32(17, 11, 17, 11, 17, 11, 17, 11, 17, 11, 17, 11, 17, 11, 17, 11), c, w.g);
    __m512i qh = _mm512_srli_epi32(words, 16);
    __m512i ls = _mm512_ternarylogic_epi32(_mm512_srli_epi32(qh, 11), _mm512_set1_epi32(14), _mm512_set1_epi32(1),
                                           0xea); /* (A & B) | C: 2 s + 1 */
    __m512i eight_minus_delta = _mm512_add_epi32(_mm512_slli_epi32(_mm512_srli_epi32(qh, 15), 1), _mm512_set1_epi32(7));
    w.ls8 = _mm512_slli_epi32(ls, 3);
    /* in the low dword of each qword only: bsn's odd dwords are 0 but vpdpwssd reads both */
    w.shift = _mm512_mul_epu32(ls, eight_minus_delta);
    w.d = x->d;
    return w;
}

STEP void iq1s_acc(struct acc1 *st, const struct iq1s_weights *w, int64_t i, const void *vy) {
    const struct q8k_ilv *y = (const struct q8k_ilv *)vy + i;
    __m512i sum = _mm512_setzero_si512();
    for (int z = 0; z < 4; z++)
        sum = _mm512_dpbusd_epi32(sum, w->g[z], _mm512_load_si512(y->a[z]));
    sum = _mm512_dpwssd_epi32(_mm512_setzero_si512(), sum, w->ls8);
    sum = _mm512_dpwssd_epi32(sum, _mm512_load_si512(y->bsn), w->shift);
    st->acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d_times(w->d, y->d), st->acc);
}

STEP void dot_iq1_s_sb_step(struct acc1 *st, const void *vx, int64_t i, int64_t n, const void *vy,
                            const struct iq1_consts *c) {
    struct iq1s_weights w = dot_iq1_s_sb_weights(vx, i, n, c);
    iq1s_acc(st, &w, i, vy);
}

ROW_DOTS_SPLIT(dot_iq1_s_sb, struct iq1_consts, struct acc1, superblocks, struct iq1s_weights, iq1s_acc)

/* A superblock of IQ1_M unpacked: the coefficients of its shifts on the sums of 8 activations, its grid points + 1,
 * the scale times 8 of each dword's pair of points and d; unpacked once for four tokens */
struct iq1m_weights {
    __m512i coef, g[4], mul;
    fl_half d;
};

STEP struct iq1m_weights dot_iq1_m_sb_weights(const void *vx, int64_t i, int64_t n, const struct iq1_consts *c) {
    (void)n;
    const block_iq1_m *x = (const block_iq1_m *)vx + i;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_iq1_m));
    struct iq1m_weights w;
    uint16_t sc[4];
    memcpy(sc, x->scales, sizeof(sc));
    /* word l (grid point l, weights 8 l .. 8 l + 7): the scale 2 s + 1 of its 16, s bits 3 (l / 2 % 4) of word
     * l / 8, and its qh nibble, whose bit 3 is the sign of its shift */
    __m512i sw = _mm512_permutexvar_epi16(
        _mm512_setr_epi32(0, 0, 0, 0, 0x10001, 0x10001, 0x10001, 0x10001, 0x20002, 0x20002, 0x20002, 0x20002, 0x30003,
                          0x30003, 0x30003, 0x30003),
        _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)sc)));
    __m512i s3 = _mm512_and_si512(
        _mm512_srlv_epi16(sw, _mm512_setr_epi32(0, 0x30003, 0x60006, 0x90009, 0, 0x30003, 0x60006, 0x90009, 0,
                                                0x30003, 0x60006, 0x90009, 0, 0x30003, 0x60006, 0x90009)),
        _mm512_set1_epi16(7));
    /* word l = qh[l / 2], its nibble's bit 3 (bit 3 for even l, bit 7 for odd) at bit 3 */
    __m512i qhw = _mm512_permutexvar_epi16(
        _mm512_setr_epi32(0, 0x10001, 0x20002, 0x30003, 0x40004, 0x50005, 0x60006, 0x70007, 0x80008, 0x90009, 0xa000a,
                          0xb000b, 0xc000c, 0xd000d, 0xe000e, 0xf000f),
        _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)x->qh))));
    __m512i neg8 = _mm512_srlv_epi16(qhw, _mm512_set1_epi32(0x40000));
    /* ls (delta - 8) = -(2 s + 1) (7 + 2 [negative]) on each grid point's sum of 8 activations, looked up by
     * s + 8 [negative] */
    w.coef = _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(s3, neg8, _mm512_set1_epi16(8), 0xf8), /* A | (B & C) */
                                      c->coef);
    /* the two qh bytes of sub-block q, nibble z for point z, in the high half of dwords 2 q, 2 q + 1 */
    __m512i words = _mm512_maskz_permutexvar_epi16(0xaaaaaaaau, c->spread,
                                                   _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)x->qh)));
    iq1_gather(x->qs, words, _mm512_set_epi32(16, 8, 16, 8, 16, 8, 16, 8, 16, 8, 16, 8, 16, 8, 16, 8),
               _mm512_set_epi32(20, 12, 20, 12, 20, 12, 20, 12, 20, 12, 20, 12, 20, 12, 20, 12), c, w.g);
    /* dword 2 q + h: points 4 q + 2 h and 4 q + 2 h + 1, one 16 of one scale, its s in word 2 (2 q + h) of s3,
     * the dword's low word */
    w.mul = _mm512_ternarylogic_epi32(_mm512_slli_epi16(s3, 4), _mm512_set1_epi32(8), _mm512_set1_epi32(0xffff),
                                      0xec); /* (A & C) | B: 8 (2 s + 1) */
    w.d = (fl_half)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000));
    return w;
}

STEP void iq1m_acc(struct acc1 *st, const struct iq1m_weights *w, int64_t i, const void *vy) {
    const struct q8k_ilv *y = (const struct q8k_ilv *)vy + i;
    /* a dword's 16 products of at most 2 * 127 are well within 16 bits */
    __m512i dot = _mm512_setzero_si512();
    for (int z = 0; z < 4; z++)
        dot = _mm512_dpbusd_epi32(dot, w->g[z], _mm512_load_si512(y->a[z]));
    __m512i sum = _mm512_dpwssd_epi32(_mm512_madd_epi16(w->coef, _mm512_load_si512(y->sum8)), dot, w->mul);
    st->acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d_times(w->d, y->d), st->acc);
}

STEP void dot_iq1_m_sb_step(struct acc1 *st, const void *vx, int64_t i, int64_t n, const void *vy,
                            const struct iq1_consts *c) {
    struct iq1m_weights w = dot_iq1_m_sb_weights(vx, i, n, c);
    iq1m_acc(st, &w, i, vy);
}

ROW_DOTS_SPLIT(dot_iq1_m_sb, struct iq1_consts, struct acc1, superblocks, struct iq1m_weights, iq1m_acc)

struct none {
    char unused;
};

STEP struct none no_consts(void) { return (struct none){0}; }

/* ---------------------------------------------------------------- TQ2_0 */

/* One superblock of activations in the order of TQ2_0's fields: a[n] byte m is element 128 (m / 32) + 32 n +
 * m % 32, what the 2-bit field n of quant byte m multiplies; base dword d: minus the sum of the 16 activations
 * its four a[n] dwords hold, which turns sum t q into sum (t - 1) q */
struct tq2_sb {
    int8_t a[4][64];
    int32_t base[16];
    float d;
    uint8_t pad[60];
};

static size_t tq2_bytes(int64_t k) { return (size_t)(k / QK_K) * sizeof(struct tq2_sb); }

static void prep_tq2(int64_t k, const float *x, void *out) {
    struct tq2_sb *sb = out;
    for (int64_t i = 0; i < k / QK_K; i++) {
        int8_t q[QK_K];
        memset(&sb[i], 0, sizeof(sb[i]));
        sb[i].d = q8k_block(x + i * QK_K, q);
        for (int n = 0; n < 4; n++)
            for (int m = 0; m < 64; m++) {
                sb[i].a[n][m] = q[128 * (m / 32) + 32 * n + m % 32];
                sb[i].base[m / 4] -= sb[i].a[n][m];
            }
    }
}

#define dot_tq2_0_sb_consts no_consts
#define dot_tq2_0_sb_init acc1_init
#define dot_tq2_0_sb_finish acc1_finish

STEP void dot_tq2_0_sb_step(struct acc1 *st, const void *vx, int64_t i, int64_t n, const void *vy,
                            const struct none *c) {
    (void)n, (void)c;
    const block_tq2_0 *x = (const block_tq2_0 *)vx + i;
    const struct tq2_sb *y = (const struct tq2_sb *)vy + i;
    prefetch_ahead((const uint8_t *)x, (int)sizeof(block_tq2_0));
    __m512i q = _mm512_loadu_si512(x->qs), sum = _mm512_load_si512(y->base);
    for (int f = 0; f < 4; f++)
        sum = _mm512_dpbusd_epi32(sum, _mm512_and_si512(_mm512_srli_epi16(q, 2 * f), _mm512_set1_epi8(3)),
                                  _mm512_load_si512(y->a[f]));
    st->acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d_times(x->d, y->d), st->acc);
}

ROW_DOTS(dot_tq2_0_sb, struct none, struct acc1, superblocks)

/* ---------------------------------------------------------------- the table */

static const struct fl_decode_kernel iq4_xs_kernel = {iq4xs_bytes, prep_iq4_xs, dot_iq4_xs_sb, dot_iq4_xs_sb_x4,
                                                      dot_iq4_xs_sb_tn};
static const struct fl_decode_kernel iq2_xxs_kernel = {iq2xxs_bytes, prep_iq2_xxs, dot_iq2_xxs_pair,
                                                       dot_iq2_xxs_pair_x4, dot_iq2_xxs_pair_tn};
static const struct fl_decode_kernel iq3_xxs_kernel = {iq3xxs_bytes, prep_iq3_xxs, dot_iq3_xxs_sb, dot_iq3_xxs_sb_x4,
                                                       dot_iq3_xxs_sb_tn};
static const struct fl_decode_kernel iq3_s_kernel = {iq3s_bytes, prep_iq3_s, dot_iq3_s_sb, dot_iq3_s_sb_x4,
                                                     dot_iq3_s_sb_tn};
static const struct fl_decode_kernel iq2_xs_kernel = {iq2_bytes, prep_iq2, dot_iq2_xs_pair,
                                                      dot_iq2_xs_pair_x4, dot_iq2_xs_pair_tn};
static const struct fl_decode_kernel iq2_s_kernel = {iq2_bytes, prep_iq2, dot_iq2_s_pair,
                                                     dot_iq2_s_pair_x4, dot_iq2_s_pair_tn};
static const struct fl_decode_kernel iq1_s_kernel = {ilv_bytes, prep_ilv, dot_iq1_s_sb, dot_iq1_s_sb_x4,
                                                     dot_iq1_s_sb_tn};
static const struct fl_decode_kernel tq2_0_kernel = {tq2_bytes, prep_tq2, dot_tq2_0_sb, dot_tq2_0_sb_x4,
                                                     dot_tq2_0_sb_tn};
static const struct fl_decode_kernel iq1_m_kernel = {ilv_bytes, prep_ilv, dot_iq1_m_sb, dot_iq1_m_sb_x4,
                                                     dot_iq1_m_sb_tn};

static pthread_once_t codes_once = PTHREAD_ONCE_INIT;

const struct fl_decode_kernel *fl_decode_avx512_vbmi_iq(int type) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("gfni") || !__builtin_cpu_supports("avx512bitalg") ||
        !__builtin_cpu_supports("avx512ifma"))
        return NULL;
    pthread_once(&codes_once, build_codes);
    switch (type) {
    case FL_TYPE_IQ4_XS: return &iq4_xs_kernel;
    case FL_TYPE_IQ2_XXS: return &iq2_xxs_kernel;
    case FL_TYPE_IQ3_XXS: return &iq3_xxs_kernel;
    case FL_TYPE_IQ3_S: return &iq3_s_kernel;
    case FL_TYPE_IQ2_XS: return &iq2_xs_kernel;
    case FL_TYPE_IQ2_S: return &iq2_s_kernel;
    case FL_TYPE_IQ1_S: return &iq1_s_kernel;
    case FL_TYPE_IQ1_M: return &iq1_m_kernel;
    case FL_TYPE_TQ2_0: return &tq2_0_kernel;
    default: return NULL;
    }
}
#endif

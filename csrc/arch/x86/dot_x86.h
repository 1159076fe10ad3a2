/* dot_x86.h: the 256-bit vec_dot kernels of every weight format, included by avx2.c, avx512.c and
 * avx512_vnni.c, which compile it for their own target. FL_X86_VNNI picks vpdpbusd over the
 * maddubs+madd pair; FL_X86_TABLE names the level's lookup function, FL_X86_TOKENS its token dots'.
 * Each kernel computes what its fl_vec_dot_<t>_<act>_generic computes, up to float rounding. */
#include <immintrin.h>
#include <string.h>
#include "kernels.h"
#include "quant_generic.h"
#include "simd.h"

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float half(fl_half h) {
    return _cvtsh_ss(h);
}

/* sums of four products of unsigned bytes u and signed bytes s, as 8 int32; u * s pairs stay below 2^15 */
static inline __m256i dot_u8i8(__m256i u, __m256i s) {
#if FL_X86_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* signed x signed through the unsigned form: |x| * (y with the sign of x); y is never -128 */
static inline __m256i dot_i8i8(__m256i x, __m256i y) {
    return dot_u8i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
}

/* u8 x i8 products summed in pairs, then times a 16-bit scale per 128-bit half, as 8 int32 */
static inline __m256i dot_u8i8_scaled(__m256i u, __m256i s, __m256i scales16) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), scales16);
}

static inline __m256i scales16_pair(int lo, int hi) {
    return _mm256_set_m128i(_mm_set1_epi16((short)hi), _mm_set1_epi16((short)lo));
}

/* 16 packed nibbles -> 32 bytes: low nibbles first (elements 0..15), then the high ones (16..31) */
static inline __m256i nibbles_lo_hi(const uint8_t *q) {
    __m128i b = _mm_loadu_si128((const __m128i *)q);
    __m128i m4 = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
}

static inline __m256i load256(const void *p) {
    return _mm256_loadu_si256((const __m256i *)p);
}

/* ---------------------------------------------------------------- float formats, f32 activations */
#define FLOAT_DOT(name, LOAD8, scalar)                                                                   \
    static void name(int64_t n, float *s, const void *vx, const void *vy) {                             \
        const uint8_t *x = vx;                                                                         \
        const float *y = vy;                                                                           \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                    \
        int64_t i = 0;                                                                                 \
        for (; i + 32 <= n; i += 32) {                                                                 \
            a0 = _mm256_fmadd_ps(LOAD8(x, i), _mm256_loadu_ps(y + i), a0);                             \
            a1 = _mm256_fmadd_ps(LOAD8(x, i + 8), _mm256_loadu_ps(y + i + 8), a1);                     \
            a2 = _mm256_fmadd_ps(LOAD8(x, i + 16), _mm256_loadu_ps(y + i + 16), a2);                   \
            a3 = _mm256_fmadd_ps(LOAD8(x, i + 24), _mm256_loadu_ps(y + i + 24), a3);                   \
        }                                                                                              \
        for (; i + 8 <= n; i += 8)                                                                     \
            a0 = _mm256_fmadd_ps(LOAD8(x, i), _mm256_loadu_ps(y + i), a0);                             \
        float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));              \
        for (; i < n; i++)                                                                             \
            sum += scalar(x, i) * y[i];                                                                \
        *s = sum;                                                                                      \
    }

#define LOAD8_F32(x, i) _mm256_loadu_ps((const float *)(x) + (i))
#define LOAD8_F16(x, i) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(x) + (i))))
#define LOAD8_BF16(x, i)                                                                                 \
    _mm256_castsi256_ps(                                                                               \
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)(x) + (i)))), 16))
#define SCALAR_F32(x, i) (((const float *)(x))[i])
#define SCALAR_F16(x, i) half(((const uint16_t *)(x))[i])
#define SCALAR_BF16(x, i) fl_bf16_to_fp32(((const uint16_t *)(x))[i])

/* The token dot of the float formats (kernels.h's fl_vec_dot_tn_fn): one weight row against 1..FL_DOT_TOKENS
 * activation rows, a weight vector (converted once) meeting every token, one load per FMA where the one-row dot
 * needs two. Each token keeps the one-row dot's four accumulators (a0..a3, elements i..i+7, ..., i+24..i+31 of each
 * 32) and its tail and sum, so its result is the one-row dot's bits. With AVX-512 two of them go side by side in a
 * zmm (a0|a1, a2|a3), whose lanes run the same FMAs at half the instructions, and 8 tokens' accumulators fit the 32
 * registers; with AVX2's 16, tokens go 4 at a time. The dot prefetches its row FL_PREFETCH_BYTES ahead as it goes,
 * into L2: matmul.c's few_tokens reads four rows far apart, and without it 2 tokens cost 1.6x one token's time
 * (BF16 from memory) where with it 1.2x. */
#if defined(__AVX512F__)
typedef __m512 ps16;
#define PASS_TOKENS 8
static inline ps16 ps16_zero(void) { return _mm512_setzero_ps(); }
static inline ps16 ps16_fmadd(ps16 a, ps16 b, ps16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline ps16 ps16_load_f32(const void *x, int64_t i) { return _mm512_loadu_ps((const float *)x + i); }
static inline ps16 ps16_load_f16(const void *x, int64_t i) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i)));
}
static inline ps16 ps16_load_bf16(const void *x, int64_t i) {
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m256 ps16_lo(ps16 v) { return _mm512_castps512_ps256(v); }
static inline __m256 ps16_hi(ps16 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
#else
typedef struct {
    __m256 lo, hi;
} ps16;
#define PASS_TOKENS 4
static inline ps16 ps16_zero(void) { return (ps16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline ps16 ps16_fmadd(ps16 a, ps16 b, ps16 c) {
    return (ps16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline ps16 ps16_load_f32(const void *x, int64_t i) { return (ps16){LOAD8_F32(x, i), LOAD8_F32(x, i + 8)}; }
static inline ps16 ps16_load_f16(const void *x, int64_t i) { return (ps16){LOAD8_F16(x, i), LOAD8_F16(x, i + 8)}; }
static inline ps16 ps16_load_bf16(const void *x, int64_t i) { return (ps16){LOAD8_BF16(x, i), LOAD8_BF16(x, i + 8)}; }
static inline __m256 ps16_lo(ps16 v) { return v.lo; }
static inline __m256 ps16_hi(ps16 v) { return v.hi; }
#endif

/* name_tokens with count a constant of each call site (name_tn), so that the accumulators stay in registers */
#define FLOAT_DOT_TN(name, LOAD16, LOAD8, scalar, elem_bytes)                                                        \
    static inline __attribute__((always_inline)) void name##_tokens(int count, int64_t n, float *s,    \
                                                                    const void *vx, const void *const *vy) { \
        ps16 a[FL_DOT_TOKENS][2]; /* token t's a0|a1 and a2|a3 */                                      \
        for (int t = 0; t < count; t++)                                                                \
            a[t][0] = a[t][1] = ps16_zero();                                                           \
        int64_t i = 0;                                                                                 \
        for (; i + 32 <= n; i += 32) {                                                                 \
            const ps16 w0 = LOAD16(vx, i), w1 = LOAD16(vx, i + 16);                                    \
            for (int line = 0; line < 32 * elem_bytes; line += 64)                                     \
                _mm_prefetch((const char *)vx + i * elem_bytes + FL_PREFETCH_BYTES + line, _MM_HINT_T1); \
            for (int t = 0; t < count; t++) {                                                          \
                a[t][0] = ps16_fmadd(w0, ps16_load_f32(vy[t], i), a[t][0]);                            \
                a[t][1] = ps16_fmadd(w1, ps16_load_f32(vy[t], i + 16), a[t][1]);                       \
            }                                                                                          \
        }                                                                                              \
        for (int t = 0; t < count; t++) {                                                              \
            const float *y = vy[t];                                                                    \
            __m256 a0 = ps16_lo(a[t][0]), a1 = ps16_hi(a[t][0]), a2 = ps16_lo(a[t][1]), a3 = ps16_hi(a[t][1]); \
            int64_t e = i;                                                                             \
            for (; e + 8 <= n; e += 8)                                                                 \
                a0 = _mm256_fmadd_ps(LOAD8(vx, e), _mm256_loadu_ps(y + e), a0);                        \
            float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));          \
            for (; e < n; e++)                                                                         \
                sum += scalar(vx, e) * y[e];                                                           \
            s[t] = sum;                                                                                \
        }                                                                                              \
    }                                                                                                  \
    static void name##_tn(int64_t n, float *s, const void *vx, const void *const *vy, int count) {     \
        for (int t = 0; t < count; t += PASS_TOKENS) {                                                 \
            int c = count - t < PASS_TOKENS ? count - t : PASS_TOKENS;                                 \
            switch (c) { /* no case above PASS_TOKENS is reached */                                    \
            case 1: name(n, s + t, vx, vy[t]); break;                                                  \
            case 2: name##_tokens(2, n, s + t, vx, vy + t); break;                                     \
            case 3: name##_tokens(3, n, s + t, vx, vy + t); break;                                     \
            case 4: name##_tokens(4, n, s + t, vx, vy + t); break;                                     \
            case 5: name##_tokens(5, n, s + t, vx, vy + t); break;                                     \
            case 6: name##_tokens(6, n, s + t, vx, vy + t); break;                                     \
            case 7: name##_tokens(7, n, s + t, vx, vy + t); break;                                     \
            default: name##_tokens(PASS_TOKENS, n, s + t, vx, vy + t); break;                          \
            }                                                                                          \
        }                                                                                              \
    }

/* The same dot of four weight rows with one activation row (decode): each row's accumulators, tail and sum exactly
 * as FLOAT_DOT's, so each result is bitwise the one-row dot's. The driver takes the four rows from four quarters of
 * its range, so four streams are read at once: a BF16 head row is 8 KB, and one row at a time read 63% of the
 * memory's rate where the block formats, four rows at a time, read all of it. */
#define FLOAT_DOT4(name, LOAD8, scalar)                                                                  \
    static void name##_r4(int64_t n, float *s, const void *const *vx, const void *vy) {                \
        const float *y = vy;                                                                           \
        __m256 a[4][4];                                                                                \
        for (int r = 0; r < 4; r++)                                                                    \
            for (int j = 0; j < 4; j++)                                                                \
                a[r][j] = _mm256_setzero_ps();                                                         \
        int64_t i = 0;                                                                                 \
        for (; i + 32 <= n; i += 32)                                                                   \
            for (int r = 0; r < 4; r++)                                                                \
                for (int j = 0; j < 4; j++)                                                            \
                    a[r][j] = _mm256_fmadd_ps(LOAD8(vx[r], i + 8 * j), _mm256_loadu_ps(y + i + 8 * j), a[r][j]); \
        for (; i + 8 <= n; i += 8)                                                                     \
            for (int r = 0; r < 4; r++)                                                                \
                a[r][0] = _mm256_fmadd_ps(LOAD8(vx[r], i), _mm256_loadu_ps(y + i), a[r][0]);          \
        for (int r = 0; r < 4; r++) {                                                                  \
            __m256 a01 = _mm256_add_ps(a[r][0], a[r][1]), a23 = _mm256_add_ps(a[r][2], a[r][3]);       \
            float sum = hsum_ps(_mm256_add_ps(a01, a23));                                              \
            for (int64_t e = i; e < n; e++)                                                            \
                sum += scalar(vx[r], e) * y[e];                                                        \
            s[r] = sum;                                                                                \
        }                                                                                              \
    }

FLOAT_DOT(dot_f32, LOAD8_F32, SCALAR_F32)
FLOAT_DOT(dot_f16, LOAD8_F16, SCALAR_F16)
FLOAT_DOT(dot_bf16, LOAD8_BF16, SCALAR_BF16)
FLOAT_DOT_TN(dot_f32, ps16_load_f32, LOAD8_F32, SCALAR_F32, 4)
FLOAT_DOT_TN(dot_f16, ps16_load_f16, LOAD8_F16, SCALAR_F16, 2)
FLOAT_DOT_TN(dot_bf16, ps16_load_bf16, LOAD8_BF16, SCALAR_BF16, 2)
FLOAT_DOT4(dot_f32, LOAD8_F32, SCALAR_F32)
FLOAT_DOT4(dot_f16, LOAD8_F16, SCALAR_F16)
FLOAT_DOT4(dot_bf16, LOAD8_BF16, SCALAR_BF16)

/* ---------------------------------------------------------------- Q8_0 and MXFP4, Q8_0 activations */
static void dot_q8_0(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q8_0 *x = vx;
    const block_q8_0 *y = vy;
    int64_t nb = n / QK8_0, i = 0;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    for (; i + 2 <= nb; i += 2) {
        __m256i p0 = dot_i8i8(load256(x[i].qs), load256(y[i].qs));
        __m256i p1 = dot_i8i8(load256(x[i + 1].qs), load256(y[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * half(y[i].d)), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i + 1].d) * half(y[i + 1].d)), _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++) {
        __m256i p = dot_i8i8(load256(x[i].qs), load256(y[i].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * half(y[i].d)), _mm256_cvtepi32_ps(p), acc0);
    }
    *s = hsum_ps(_mm256_add_ps(acc0, acc1));
}

static void dot_mxfp4(int64_t n, float *s, const void *vx, const void *vy) {
    const block_mxfp4 *x = vx;
    const block_q8_0 *y = vy;
    const __m256i values = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)fl_kvalues_mxfp4));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_MXFP4; i++) {
        __m256i q = _mm256_shuffle_epi8(values, nibbles_lo_hi(x[i].qs));
        __m256i p = dot_i8i8(q, load256(y[i].qs));
        float d = fl_e8m0_to_fp32_half(x[i].e) * half(y[i].d);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum_ps(acc);
}

/* ---------------------------------------------------------------- legacy formats, Q8_0 / Q8_1 activations */

/* the 32 bits at qh as 32 bytes, 0xFF where bit j of byte j's is set */
static inline __m256i bytes_from_bits(const uint8_t *qh) {
    uint32_t bits;
    memcpy(&bits, qh, sizeof(bits));
    const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

static void dot_q4_0(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q4_0 *x = vx;
    const block_q8_0 *y = vy;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK4_0; i++) {
        __m256i q = _mm256_sub_epi8(nibbles_lo_hi(x[i].qs), _mm256_set1_epi8(8));
        __m256i p = dot_i8i8(q, load256(y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * half(y[i].d)), _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum_ps(acc);
}

/* q - 16 = the nibble, or the nibble - 16 (its bits 4-7 set) where the fifth bit is clear */
static void dot_q5_0(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q5_0 *x = vx;
    const block_q8_0 *y = vy;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK5_0; i++) {
        __m256i q = _mm256_or_si256(nibbles_lo_hi(x[i].qs),
                                    _mm256_andnot_si256(bytes_from_bits(x[i].qh), _mm256_set1_epi8((char)0xF0)));
        __m256i p = dot_i8i8(q, load256(y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * half(y[i].d)), _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum_ps(acc);
}

/* Q4_1 and Q5_1: sum (d q + m) y = d d_y sum q q_y + m s, s = d_y sum q_y as the activation block keeps it */
static void dot_q4_1(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q4_1 *x = vx;
    const block_q8_1 *y = vy;
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t i = 0; i < n / QK4_1; i++) {
        __m256i p = dot_u8i8(nibbles_lo_hi(x[i].qs), load256(y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * half(y[i].d)), _mm256_cvtepi32_ps(p), acc);
        mins += half(x[i].m) * half(y[i].s);
    }
    *s = hsum_ps(acc) + mins;
}

static void dot_q5_1(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q5_1 *x = vx;
    const block_q8_1 *y = vy;
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t i = 0; i < n / QK5_1; i++) {
        __m256i q = _mm256_or_si256(nibbles_lo_hi(x[i].qs), _mm256_and_si256(bytes_from_bits(x[i].qh), _mm256_set1_epi8(16)));
        __m256i p = dot_u8i8(q, load256(y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * half(y[i].d)), _mm256_cvtepi32_ps(p), acc);
        mins += half(x[i].m) * half(y[i].s);
    }
    *s = hsum_ps(acc) + mins;
}

/* ---------------------------------------------------------------- k-quants, Q8_K activations */
static void dot_q4_K(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q4_K *x = vx;
    const block_q8_K *y = vy;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        uint8_t sc[8], m[8];
        int summ = 0;
        for (int j = 0; j < 8; j++) {
            fl_get_scale_min_k4(j, x[i].scales, &sc[j], &m[j]);
            summ += m[j] * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i q4 = load256(x[i].qs + 32 * j);
            __m256i lo = _mm256_and_si256(q4, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            sumi = _mm256_add_epi32(sumi, dot_u8i8_scaled(lo, load256(y[i].qs + 64 * j), _mm256_set1_epi16(sc[2 * j])));
            sumi = _mm256_add_epi32(sumi,
                                    dot_u8i8_scaled(hi, load256(y[i].qs + 64 * j + 32), _mm256_set1_epi16(sc[2 * j + 1])));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d * half(x[i].d)), _mm256_cvtepi32_ps(sumi), acc);
        mins += y[i].d * half(x[i].dmin) * (float)summ;
    }
    *s = hsum_ps(acc) - mins;
}

static void dot_q5_K(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q5_K *x = vx;
    const block_q8_K *y = vy;
    const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        uint8_t sc[8], m[8];
        int summ = 0;
        for (int j = 0; j < 8; j++) {
            fl_get_scale_min_k4(j, x[i].scales, &sc[j], &m[j]);
            summ += m[j] * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        const __m256i qh = load256(x[i].qh);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i q4 = load256(x[i].qs + 32 * j);
            __m256i h_lo = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4);
            __m256i h_hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4);
            __m256i lo = _mm256_or_si256(_mm256_and_si256(q4, m4), h_lo);
            __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), h_hi);
            sumi = _mm256_add_epi32(sumi, dot_u8i8_scaled(lo, load256(y[i].qs + 64 * j), _mm256_set1_epi16(sc[2 * j])));
            sumi = _mm256_add_epi32(sumi,
                                    dot_u8i8_scaled(hi, load256(y[i].qs + 64 * j + 32), _mm256_set1_epi16(sc[2 * j + 1])));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d * half(x[i].d)), _mm256_cvtepi32_ps(sumi), acc);
        mins += y[i].d * half(x[i].dmin) * (float)summ;
    }
    *s = hsum_ps(acc) - mins;
}

static void dot_q6_K(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q6_K *x = vx;
    const block_q8_K *y = vy;
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const int8_t *sc = x[i].scales;
        int offset = 0; /* the -32 of every weight, applied through the block sums of the activations */
        for (int j = 0; j < 16; j++)
            offset += sc[j] * y[i].bsums[j];
        __m256i sumi = _mm256_setzero_si256();
        for (int half_block = 0; half_block < 2; half_block++) {
            const uint8_t *ql = x[i].ql + 64 * half_block;
            const int8_t *q8 = y[i].qs + 128 * half_block;
            const int8_t *s8 = sc + 8 * half_block;
            __m256i qh = load256(x[i].qh + 32 * half_block);
            __m256i ql0 = load256(ql), ql1 = load256(ql + 32);
            __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4)),
            };
            for (int j = 0; j < 4; j++)
                sumi = _mm256_add_epi32(sumi, dot_u8i8_scaled(q[j], load256(q8 + 32 * j),
                                                              scales16_pair(s8[2 * j], s8[2 * j + 1])));
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(32 * offset, 0, 0, 0, 0, 0, 0, 0));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d * half(x[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps(acc);
}

static void dot_q2_K(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q2_K *x = vx;
    const block_q8_K *y = vy;
    const __m256i m2 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *sc = x[i].scales;
        int summ = 0;
        for (int j = 0; j < 16; j++)
            summ += (sc[j] >> 4) * y[i].bsums[j];
        __m256i sumi = _mm256_setzero_si256();
        for (int half_block = 0; half_block < 2; half_block++) {
            __m256i qs = load256(x[i].qs + 32 * half_block);
            const int8_t *q8 = y[i].qs + 128 * half_block;
            for (int j = 0; j < 4; j++) {
                int sb = 8 * half_block + 2 * j;
                __m256i q = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * j), m2);
                sumi = _mm256_add_epi32(sumi, dot_u8i8_scaled(q, load256(q8 + 32 * j),
                                                              scales16_pair(sc[sb] & 15, sc[sb + 1] & 15)));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d * half(x[i].d)), _mm256_cvtepi32_ps(sumi), acc);
        mins += y[i].d * half(x[i].dmin) * (float)summ;
    }
    *s = hsum_ps(acc) - mins;
}

/* values q + 4 = (low two bits) + 4 * (hmask bit) in 0..7, as q2_K's; the offset 4 through the block sums */
static void dot_q3_K(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q3_K *x = vx;
    const block_q8_K *y = vy;
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        int sc[QK_K / 16], offset = 0;
        fl_unpack_scales_q3_K(x[i].scales, sc);
        for (int j = 0; j < 16; j++)
            offset += sc[j] * y[i].bsums[j];
        const __m256i hm = load256(x[i].hmask);
        __m256i sumi = _mm256_setzero_si256();
        for (int half_block = 0; half_block < 2; half_block++) {
            __m256i qs = load256(x[i].qs + 32 * half_block);
            const int8_t *q8 = y[i].qs + 128 * half_block;
            for (int j = 0; j < 4; j++) {
                int sb = 8 * half_block + 2 * j;
                __m256i third = _mm256_and_si256(_mm256_srli_epi16(hm, 4 * half_block + j), one);
                __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qs, 2 * j), m3), _mm256_slli_epi16(third, 2));
                sumi = _mm256_add_epi32(sumi, dot_u8i8_scaled(q, load256(q8 + 32 * j), scales16_pair(sc[sb], sc[sb + 1])));
            }
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(4 * offset, 0, 0, 0, 0, 0, 0, 0));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d * half(x[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps(acc);
}

/* ---------------------------------------------------------------- i-quants, Q8_K activations */
static void dot_iq4_xs(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq4_xs *x = vx;
    const block_q8_K *y = vy;
    const __m256i values = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)fl_kvalues_iq4nl));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        __m256i sumi = _mm256_setzero_si256();
        for (int ib = 0; ib < QK_K / 32; ib++) {
            int ls = ((x[i].scales_l[ib / 2] >> 4 * (ib % 2)) & 0xf) | (((x[i].scales_h >> 2 * ib) & 3) << 4);
            __m256i q = _mm256_shuffle_epi8(values, nibbles_lo_hi(x[i].qs + 16 * ib));
            __m256i p = dot_i8i8(q, load256(y[i].qs + 32 * ib));
            sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p, _mm256_set1_epi32(ls - 32)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d * half(x[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps(acc);
}

#include "dot_x86_iq.h"

fl_vec_dot_fn FL_X86_TABLE(int type) {
    switch (type) {
    case FL_TYPE_F32: return dot_f32;
    case FL_TYPE_F16: return dot_f16;
    case FL_TYPE_BF16: return dot_bf16;
    case FL_TYPE_Q8_0: return dot_q8_0;
    case FL_TYPE_MXFP4: return dot_mxfp4;
    case FL_TYPE_Q4_0: return dot_q4_0;
    case FL_TYPE_Q4_1: return dot_q4_1;
    case FL_TYPE_Q5_0: return dot_q5_0;
    case FL_TYPE_Q5_1: return dot_q5_1;
    case FL_TYPE_Q2_K: return dot_q2_K;
    case FL_TYPE_Q3_K: return dot_q3_K;
    case FL_TYPE_Q4_K: return dot_q4_K;
    case FL_TYPE_Q5_K: return dot_q5_K;
    case FL_TYPE_Q6_K: return dot_q6_K;
    case FL_TYPE_IQ4_XS: return dot_iq4_xs;
    default: return dot_x86_iq(type);
    }
}

/* the token dot of one of this table's dots (NULL: it has none) */
fl_vec_dot_tn_fn FL_X86_TOKENS(fl_vec_dot_fn dot) {
    return dot == dot_f32 ? dot_f32_tn : dot == dot_f16 ? dot_f16_tn : dot == dot_bf16 ? dot_bf16_tn : NULL;
}

/* the four-row dot of one of this table's dots (NULL: it has none) */
fl_vec_dot4_fn FL_X86_ROWS(fl_vec_dot_fn dot) {
    return dot == dot_f32 ? dot_f32_r4 : dot == dot_f16 ? dot_f16_r4 : dot == dot_bf16 ? dot_bf16_r4 : NULL;
}

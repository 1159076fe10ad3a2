/* kv_pack.c: DeepSeek V4 cache rows packed on the grids the reference rounds them to (architecture notes 2, 5, 8).
 * FP8 rows: the last rope_dim dims as bf16, then the first dim - rope_dim dims as e4m3 with one ue8m0 scale per 64.
 * FP4 rows: e2m1 pairs (element 2i in the low nibble) with one e8m0 scale per 32.
 * Packing rounds to nearest even after the reference's scale choice, 2^ceil(log2(max(amax, floor) * (1/M)));
 * a row already on the grid packs to the same values, so unpack(pack(row)) == row bit for bit. */
#include <math.h>
#include <string.h>

#include "kernels.h"

#define FP8_BLOCK 64
#define FP4_BLOCK 32

/* The exponent e of the scale 2^e: ceil(log2(t)) read off t's bits, t = max(amax, floor) * recip in float32. */
static int scale_exp(float amax, float floor_, float recip) {
    float t = (amax > floor_ ? amax : floor_) * recip;
    uint32_t u = fl_float_bits(t);
    int e = (int)((u >> 23) & 0xff) - 127 + ((u & 0x7fffffu) != 0);
    return e < -127 ? -127 : e > 127 ? 127 : e;
}

static float block_amax(const float *x, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        if (a > m) m = a;
    }
    return m;
}

/* e4m3 (bias 7, no infinities, max 448) of v, saturated, rounded to nearest even. */
static uint8_t e4m3_encode(float v) {
    uint8_t sign = signbit(v) ? 0x80 : 0;
    float a = fabsf(v);
    if (!(a <= 448.0f)) a = 448.0f;
    if (a < 0.015625f) return sign | (uint8_t)nearbyintf(a * 512.0f); /* subnormals step by 2^-9; 8 is 2^-6 */
    uint32_t u = fl_float_bits(a);
    u += 0x7ffffu + ((u >> 20) & 1);
    int exp = (int)(u >> 23) - 127 + 7;
    return sign | (uint8_t)(exp << 3) | (uint8_t)((u >> 20) & 7);
}

/* Branch-free so that the unpack loop vectorises: a normal code's exponent and mantissa move into float32
 * position with the bias moved from 7 to 127; subnormal codes are mant * 2^-9. */
static inline float e4m3_decode(uint8_t c) {
    uint32_t mag = c & 0x7fu;
    float normal = fl_bits_float((mag << 20) + (120u << 23));
    float sub = (float)(mag & 7) * 0x1p-9f;
    return fl_bits_float(fl_float_bits(mag >= 8 ? normal : sub) | (uint32_t)(c & 0x80) << 24);
}

/* e2m1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}; halfway cases go to the even code. */
static uint8_t e2m1_encode(float v) {
    uint8_t sign = signbit(v) ? 8 : 0;
    float a = fabsf(v);
    uint8_t c = a <= 0.25f ? 0 : a < 0.75f ? 1 : a <= 1.25f ? 2 : a < 1.75f ? 3
              : a <= 2.5f ? 4 : a < 3.5f ? 5 : a <= 5.0f ? 6 : 7;
    return sign | c;
}

static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* 2^e as a float for -127 <= e <= 127: multiplying by it is exact wherever the product is a normal float. */
static inline float pow2(int e) {
    return e > -127 ? fl_bits_float((uint32_t)(e + 127) << 23) : fl_bits_float(1u << 22);
}

static inline float bf16_value(uint16_t h) {
    return fl_bits_float((uint32_t)h << 16);
}

int64_t fl_kv_row_bytes(int kind, int64_t dim, int64_t rope_dim) {
    if (kind == FL_KV_FP8) {
        int64_t nope = dim - rope_dim;
        if (rope_dim < 0 || nope <= 0 || nope % FP8_BLOCK) return -1;
        return 2 * rope_dim + nope + nope / FP8_BLOCK;
    }
    if (kind == FL_KV_FP4) {
        if (rope_dim != 0 || dim <= 0 || dim % FP4_BLOCK) return -1;
        return dim / 2 + dim / FP4_BLOCK;
    }
    return -1;
}

static void pack_fp8_row(const float *x, int64_t dim, int64_t rope_dim, uint8_t *dst) {
    int64_t nope = dim - rope_dim;
    uint8_t *q = dst + 2 * rope_dim, *scales = q + nope;
    for (int64_t i = 0; i < rope_dim; i++) {
        uint16_t h = fl_fp32_to_bf16(x[nope + i]);
        memcpy(dst + 2 * i, &h, 2);
    }
    for (int64_t b = 0; b < nope / FP8_BLOCK; b++) {
        const float *xb = x + b * FP8_BLOCK;
        int e = scale_exp(block_amax(xb, FP8_BLOCK), 1e-4f, 1.0f / 448.0f);
        float inv = pow2(-e);
        scales[b] = (uint8_t)(e + 127);
        for (int64_t i = 0; i < FP8_BLOCK; i++) q[b * FP8_BLOCK + i] = e4m3_encode(xb[i] * inv);
    }
}

static void unpack_fp8_row(const uint8_t *src, int64_t dim, int64_t rope_dim, float *y) {
    int64_t nope = dim - rope_dim;
    const uint8_t *q = src + 2 * rope_dim, *scales = q + nope;
    for (int64_t i = 0; i < rope_dim; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        y[nope + i] = bf16_value(h);
    }
    for (int64_t b = 0; b < nope / FP8_BLOCK; b++) {
        float s = pow2((int)scales[b] - 127);
        for (int64_t i = 0; i < FP8_BLOCK; i++) y[b * FP8_BLOCK + i] = e4m3_decode(q[b * FP8_BLOCK + i]) * s;
    }
}

static void pack_fp4_row(const float *x, int64_t dim, uint8_t *dst) {
    uint8_t *scales = dst + dim / 2;
    for (int64_t b = 0; b < dim / FP4_BLOCK; b++) {
        const float *xb = x + b * FP4_BLOCK;
        int e = scale_exp(block_amax(xb, FP4_BLOCK), 6.0f * 0x1p-126f, 1.0f / 6.0f);
        float inv = pow2(-e);
        scales[b] = (uint8_t)(e + 127);
        for (int64_t i = 0; i < FP4_BLOCK; i += 2) {
            uint8_t lo = e2m1_encode(xb[i] * inv), hi = e2m1_encode(xb[i + 1] * inv);
            dst[(b * FP4_BLOCK + i) / 2] = (uint8_t)(lo | hi << 4);
        }
    }
}

static void unpack_fp4_row(const uint8_t *src, int64_t dim, float *y) {
    const uint8_t *scales = src + dim / 2;
    for (int64_t b = 0; b < dim / FP4_BLOCK; b++) {
        float s = pow2((int)scales[b] - 127);
        for (int64_t i = 0; i < FP4_BLOCK; i += 2) {
            uint8_t c = src[(b * FP4_BLOCK + i) / 2];
            y[b * FP4_BLOCK + i] = E2M1[c & 15] * s;
            y[b * FP4_BLOCK + i + 1] = E2M1[c >> 4] * s;
        }
    }
}

int fl_kv_pack(int kind, int64_t n_rows, int64_t dim, int64_t rope_dim, const float *src, uint8_t *dst) {
    int64_t row_bytes = fl_kv_row_bytes(kind, dim, rope_dim);
    if (row_bytes < 0 || n_rows < 0 || (n_rows && (!src || !dst))) return FL_EINVAL;
    for (int64_t r = 0; r < n_rows; r++) {
        if (kind == FL_KV_FP8)
            pack_fp8_row(src + r * dim, dim, rope_dim, dst + r * row_bytes);
        else
            pack_fp4_row(src + r * dim, dim, dst + r * row_bytes);
    }
    return FL_OK;
}

int fl_kv_unpack(int kind, int64_t n_rows, int64_t dim, int64_t rope_dim, const uint8_t *src, int64_t n_src,
                 const int32_t *idx, float *dst) {
    int64_t row_bytes = fl_kv_row_bytes(kind, dim, rope_dim);
    if (row_bytes < 0 || n_rows < 0 || n_src < 0 || (n_rows && (!src || !dst))) return FL_EINVAL;
    for (int64_t r = 0; r < n_rows; r++) {
        int64_t from = idx ? idx[r] : r;
        if (from < 0 || from >= n_src) return FL_EINVAL;
    }
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *row = src + (idx ? idx[r] : r) * row_bytes;
        if (kind == FL_KV_FP8)
            unpack_fp8_row(row, dim, rope_dim, dst + r * dim);
        else
            unpack_fp4_row(row, dim, dst + r * dim);
    }
    return FL_OK;
}

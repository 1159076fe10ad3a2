/* quants.h: the block layouts of every quantized type, byte-compatible with ggml/GGUF.
 * One struct per type with its block size, a static size check, and the value formula. */
#ifndef FLASHLITE_QUANTS_H
#define FLASHLITE_QUANTS_H
#include <stdint.h>

typedef uint16_t fl_half;  /* IEEE binary16 bits */

#define QK4_0 32
/* x = d * (q - 8), q = qs[j] & 15 for j < 16 and qs[j-16] >> 4 above; 4.5 bpw */
typedef struct {
    fl_half d;
    uint8_t qs[QK4_0 / 2];
} block_q4_0;
_Static_assert(sizeof(block_q4_0) == 2 + QK4_0 / 2, "wrong q4_0 block size");

#define QK4_1 32
/* x = d * q + m, q in 0..15 packed as in q4_0; 5 bpw */
typedef struct {
    fl_half d;
    fl_half m;
    uint8_t qs[QK4_1 / 2];
} block_q4_1;
_Static_assert(sizeof(block_q4_1) == 2 * 2 + QK4_1 / 2, "wrong q4_1 block size");

#define QK5_0 32
/* x = d * (q - 16): q4_0's nibbles plus a fifth bit per weight, bit j of the little-endian qh for weight j; 5.5 bpw */
typedef struct {
    fl_half d;
    uint8_t qh[4];
    uint8_t qs[QK5_0 / 2];
} block_q5_0;
_Static_assert(sizeof(block_q5_0) == 2 + 4 + QK5_0 / 2, "wrong q5_0 block size");

#define QK5_1 32
/* x = d * q + m, q in 0..31 stored as in q5_0; 6 bpw */
typedef struct {
    fl_half d;
    fl_half m;
    uint8_t qh[4];
    uint8_t qs[QK5_1 / 2];
} block_q5_1;
_Static_assert(sizeof(block_q5_1) == 2 * 2 + 4 + QK5_1 / 2, "wrong q5_1 block size");

#define QK8_0 32
/* x = d * qs[i]; 8.5 bits per weight */
typedef struct {
    fl_half d;
    int8_t qs[QK8_0];
} block_q8_0;
_Static_assert(sizeof(block_q8_0) == 2 + QK8_0, "wrong q8_0 block size");

#define QK8_1 32
/* activations for q4_1 / q5_1: x = d * qs[i]; s = d * (sum of qs), rounded to half, carries the weights' min term */
typedef struct {
    fl_half d;
    fl_half s;
    int8_t qs[QK8_1];
} block_q8_1;
_Static_assert(sizeof(block_q8_1) == 2 * 2 + QK8_1, "wrong q8_1 block size");

#define QK_MXFP4 32
/* x = kvalues_mxfp4[q] * 2^(e-127) / 2, q = qs[j] & 15 for j < 16 and qs[j-16] >> 4 above; 4.25 bpw */
typedef struct {
    uint8_t e;
    uint8_t qs[QK_MXFP4 / 2];
} block_mxfp4;
_Static_assert(sizeof(block_mxfp4) == 1 + QK_MXFP4 / 2, "wrong mxfp4 block size");

#define QK1_0 128
/* one sign bit per weight: x = bit j of qs[j / 8] ? d : -d; 1.125 bpw */
typedef struct {
    fl_half d;
    uint8_t qs[QK1_0 / 8];
} block_q1_0;
_Static_assert(sizeof(block_q1_0) == 2 + QK1_0 / 8, "wrong q1_0 block size");

#define QK2_0 64
/* x = d * (q - 1), q = (qs[j / 4] >> 2 * (j % 4)) & 3: the values -d, 0, d, 2d; 2.25 bpw */
typedef struct {
    fl_half d;
    uint8_t qs[QK2_0 / 4];
} block_q2_0;
_Static_assert(sizeof(block_q2_0) == 2 + QK2_0 / 4, "wrong q2_0 block size");

#define QK_NVFP4 64
#define QK_NVFP4_SUB 16
/* NVIDIA's FP4: 4 sub-blocks of 16 e2m1 values, each with a UE4M3 scale byte d[s] (4 exponent bits, bias 7,
 * 3 mantissa bits; the top bit unused): x = kvalues_mxfp4[q] * ue4m3(d[s]) / 2, q = qs[8s + j] & 15 for
 * element 16s + j and qs[8s + j] >> 4 for element 16s + 8 + j (j < 8); 4.5 bpw */
typedef struct {
    uint8_t d[QK_NVFP4 / QK_NVFP4_SUB];
    uint8_t qs[QK_NVFP4 / 2];
} block_nvfp4;
_Static_assert(sizeof(block_nvfp4) == QK_NVFP4 / QK_NVFP4_SUB + QK_NVFP4 / 2, "wrong nvfp4 block size");

#define QK_K 256
#define K_SCALE_SIZE 12

/* 16 sub-blocks of 16: x = d * (scales[i] & 15) * q - dmin * (scales[i] >> 4), q in 0..3; 2.625 bpw */
typedef struct {
    uint8_t scales[QK_K / 16];
    uint8_t qs[QK_K / 4];
    fl_half d;
    fl_half dmin;
} block_q2_K;
_Static_assert(sizeof(block_q2_K) == 2 * 2 + QK_K / 16 + QK_K / 4, "wrong q2_K block size");

/* 16 sub-blocks of 16 with 6-bit signed scales: x = d * (sc - 32) * (q - 4), the low 2 bits of q in qs, the third
 * in hmask (set: no offset); the scales' low nibbles fill bytes 0..7, their top 2 bits bytes 8..11; 3.4375 bpw */
typedef struct {
    uint8_t hmask[QK_K / 8];
    uint8_t qs[QK_K / 4];
    uint8_t scales[K_SCALE_SIZE];
    fl_half d;
} block_q3_K;
_Static_assert(sizeof(block_q3_K) == 2 + QK_K / 8 + QK_K / 4 + K_SCALE_SIZE, "wrong q3_K block size");

/* 8 sub-blocks of 32, 6-bit scales and mins packed in 12 bytes: x = d * sc * q - dmin * m, q in 0..15; 4.5 bpw */
typedef struct {
    fl_half d;
    fl_half dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qs[QK_K / 2];
} block_q4_K;
_Static_assert(sizeof(block_q4_K) == 2 * 2 + K_SCALE_SIZE + QK_K / 2, "wrong q4_K block size");

/* as q4_K with a fifth bit per weight in qh: q in 0..31; 5.5 bpw */
typedef struct {
    fl_half d;
    fl_half dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
} block_q5_K;
_Static_assert(sizeof(block_q5_K) == 2 * 2 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2, "wrong q5_K block size");

/* 16 sub-blocks of 16 with int8 scales: x = d * scales[i] * (q - 32), q in 0..63 (4 low bits in ql, 2 in qh); 6.5625 bpw */
typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    fl_half d;
} block_q6_K;
_Static_assert(sizeof(block_q6_K) == 2 + QK_K / 16 + 3 * QK_K / 4, "wrong q6_K block size");

/* ternary, x = d * (t - 1) with trits t in 0..2: bytes hold 5 trits (qh: 4) as ceil(v * 256 / 243) of their
 * base-3 number v, first trit most significant; qs[0..32) hold elements 32n + m (trit n of byte m), qs[32..48)
 * elements 160 + 16n + m, qh elements 240 + 4n + m; 1.6875 bpw */
typedef struct {
    uint8_t qs[(QK_K - 4 * QK_K / 64) / 5];
    uint8_t qh[QK_K / 64];
    fl_half d;
} block_tq1_0;
_Static_assert(sizeof(block_tq1_0) == 2 + QK_K / 64 + (QK_K - 4 * QK_K / 64) / 5, "wrong tq1_0 block size");

/* ternary, x = d * (t - 1), t = (qs[32g + m] >> 2n) & 3 for element 128g + 32n + m; 2.0625 bpw */
typedef struct {
    uint8_t qs[QK_K / 4];
    fl_half d;
} block_tq2_0;
_Static_assert(sizeof(block_tq2_0) == 2 + QK_K / 4, "wrong tq2_0 block size");

/* activations for the k-quants: x = d * qs[i]; bsums[j] = sum of qs over the j-th group of 16 */
typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} block_q8_K;
_Static_assert(sizeof(block_q8_K) == 4 + QK_K + QK_K / 16 * 2, "wrong q8_K block size");

/* 8 groups of 32; each group is 4 grid indices (8 bits into iq2xxs_grid) and 4x7 sign bits + a 4-bit scale; 2.0625 bpw */
typedef struct {
    fl_half d;
    uint16_t qs[QK_K / 8];
} block_iq2_xxs;
_Static_assert(sizeof(block_iq2_xxs) == 2 + QK_K / 8 * 2, "wrong iq2_xxs block size");

/* 8 sub-blocks of 32 with 6-bit scales: x = d * (ls - 32) * kvalues_iq4nl[q]; 4.25 bpw */
typedef struct {
    fl_half d;
    uint16_t scales_h;
    uint8_t scales_l[QK_K / 64];
    uint8_t qs[QK_K / 2];
} block_iq4_xs;
_Static_assert(sizeof(block_iq4_xs) == 2 + 2 + QK_K / 64 + QK_K / 2, "wrong iq4_xs block size");

/* 8 groups of 32, each of two halves of 16 with a 4-bit scale (scales[i] & 15, then >> 4): x = d * (0.5 + s) / 4 *
 * grid * sign, each 8 weights one qs word of a 9-bit iq2xs_grid index and 7 sign bits (the eighth by parity);
 * 2.3125 bpw */
typedef struct {
    fl_half d;
    uint16_t qs[QK_K / 8];
    uint8_t scales[QK_K / 32];
} block_iq2_xs;
_Static_assert(sizeof(block_iq2_xs) == 2 + QK_K / 8 * 2 + QK_K / 32, "wrong iq2_xs block size");

/* as iq2_xs with 10-bit iq2s_grid indices (low 8 bits in qs[0..31], 2 high bits per index in qh) and all 8 sign
 * bits stored (qs[32..63]); 2.5625 bpw */
typedef struct {
    fl_half d;
    uint8_t qs[QK_K / 4];
    uint8_t qh[QK_K / 32];
    uint8_t scales[QK_K / 32];
} block_iq2_s;
_Static_assert(sizeof(block_iq2_s) == 2 + QK_K / 4 + QK_K / 16, "wrong iq2_s block size");

/* 8 groups of 32: 8 indices into iq3xxs_grid (4 magnitudes each) in qs[0..63], then per group a 32-bit word of
 * 4x7 sign bits and a 4-bit scale on top: x = d * (0.5 + s) / 2 * grid * sign; 3.0625 bpw */
typedef struct {
    fl_half d;
    uint8_t qs[3 * QK_K / 8];
} block_iq3_xxs;
_Static_assert(sizeof(block_iq3_xxs) == 2 + 3 * (QK_K / 8), "wrong iq3_xxs block size");

/* 8 groups of 32: 9-bit iq3s_grid indices (low 8 bits in qs, the ninth in qh), 8 stored sign bits per 8 weights,
 * a 4-bit scale per group (two per byte): x = d * (1 + 2 s) * grid * sign; 3.4375 bpw */
#define IQ3S_N_SCALE (QK_K / 64)
typedef struct {
    fl_half d;
    uint8_t qs[QK_K / 4];
    uint8_t qh[QK_K / 32];
    uint8_t signs[QK_K / 8];
    uint8_t scales[IQ3S_N_SCALE];
} block_iq3_s;
_Static_assert(sizeof(block_iq3_s) == 2 + 13 * (QK_K / 32) + IQ3S_N_SCALE, "wrong iq3_s block size");

/* 8 groups of 32, each 4 x 8 weights from iq1s_grid (-1, 0, 1; 11-bit index: 8 bits in qs, 3 in qh), a 3-bit
 * scale and a shift sign in qh's top bits: x = d * (2 s + 1) * (grid +- IQ1S_DELTA); 1.5625 bpw */
#define IQ1S_DELTA 0.125f
typedef struct {
    fl_half d;
    uint8_t qs[QK_K / 8];
    uint16_t qh[QK_K / 32];
} block_iq1_s;
_Static_assert(sizeof(block_iq1_s) == 2 + QK_K / 8 + QK_K / 16, "wrong iq1_s block size");

/* 16 groups of 16 with 3-bit scales, 8 weights from iq1s_grid with their own shift sign in qh; the fp16 super-block
 * scale d lives in the top 4 bits of the four 16-bit words of scales: x = d * (2 s + 1) * (grid +- IQ1M_DELTA);
 * 1.75 bpw */
#define IQ1M_DELTA 0.125f
typedef struct {
    uint8_t qs[QK_K / 8];
    uint8_t qh[QK_K / 16];
    uint8_t scales[QK_K / 32];
} block_iq1_m;
_Static_assert(sizeof(block_iq1_m) == QK_K / 8 + QK_K / 16 + QK_K / 32, "wrong iq1_m block size");

#define QK4_NL 32
/* x = d * kvalues_iq4nl[q], q = qs[j] & 15 for j < 16 and qs[j-16] >> 4 above; 4.5 bpw */
typedef struct {
    fl_half d;
    uint8_t qs[QK4_NL / 2];
} block_iq4_nl;
_Static_assert(sizeof(block_iq4_nl) == 2 + QK4_NL / 2, "wrong iq4_nl block size");

#endif

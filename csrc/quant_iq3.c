/* quant_iq3.c: the 3-bit lattice i-quants, IQ3_XXS (4 weights from a 256-point grid, 7 stored sign bits per 8)
 * and IQ3_S (512-point grid, 8 stored sign bits), paired with Q8_K activations. The quantizers are ggml's searches
 * (quantize_iq3_xxs / quantize_iq3_s, with importance weights where given), kept in ggml's order of float
 * operations so that files match what llama.cpp writes; the dequantizers are bit-exact with gguf-py. */
#include <math.h>
#include "iq_lattice.h"
#include "kernels.h"
#include "quant_generic.h"

/* ggml's results depend on every product being rounded before it is added: no FMA contraction, whatever
 * -march the extension is built with */
#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif

#define GROUP_MAX_EPS_IQ3_XXS 1e-8f

static inline uint8_t grid_byte(uint32_t entry, int j) {
    return (uint8_t)(entry >> (8 * j));
}

/* ---------------------------------------------------------------- IQ3_XXS */

/* qs: 64 grid indices, then per group of 32 a word of 4x7 sign bits with a 4-bit scale on top */
void fl_dequantize_row_iq3_xxs(const void *src, float *dst, int64_t n) {
    const block_iq3_xxs *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        const uint8_t *qs = x[i].qs;
        for (int ib = 0; ib < QK_K / 32; ib++, qs += 8) {
            uint32_t aux;
            memcpy(&aux, x[i].qs + QK_K / 4 + 4 * ib, sizeof(aux));
            const float db = d * (0.5f + (aux >> 28)) * 0.5f;
            for (int l = 0; l < 4; l++, y += 8) {
                const uint8_t signs = fl_iq2_signs((aux >> (7 * l)) & 127);
                const uint32_t grid1 = fl_iq3xxs_grid[qs[2 * l]], grid2 = fl_iq3xxs_grid[qs[2 * l + 1]];
                for (int j = 0; j < 4; j++) {
                    y[j] = db * grid_byte(grid1, j) * (signs & (1u << j) ? -1.f : 1.f);
                    y[j + 4] = db * grid_byte(grid2, j) * (signs & (1u << (j + 4)) ? -1.f : 1.f);
                }
            }
        }
    }
}

/* the dot of 8 weights (two grid points) under signs with 8 activations */
static inline int32_t signed_grid_dot(uint32_t grid1, uint32_t grid2, uint8_t signs, const int8_t *q8) {
    int32_t sum = 0;
    for (int j = 0; j < 4; j++) {
        sum += grid_byte(grid1, j) * q8[j] * (signs & (1u << j) ? -1 : 1);
        sum += grid_byte(grid2, j) * q8[j + 4] * (signs & (1u << (j + 4)) ? -1 : 1);
    }
    return sum;
}

void fl_vec_dot_iq3_xxs_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq3_xxs *x = vx;
    const block_q8_K *y = vy;
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d) * y[i].d;
        const uint8_t *q3 = x[i].qs;
        const int8_t *q8 = y[i].qs;
        int32_t bsum = 0;
        for (int ib = 0; ib < QK_K / 32; ib++, q3 += 8) {
            uint32_t aux;
            memcpy(&aux, x[i].qs + QK_K / 4 + 4 * ib, sizeof(aux));
            const uint32_t ls = 2 * (aux >> 28) + 1;
            int32_t sumi = 0;
            for (int l = 0; l < 4; l++, q8 += 8)
                sumi += signed_grid_dot(fl_iq3xxs_grid[q3[2 * l]], fl_iq3xxs_grid[q3[2 * l + 1]],
                                        fl_iq2_signs((aux >> (7 * l)) & 127), q8);
            bsum += sumi * (int32_t)ls;
        }
        sumf += d * bsum;
    }
    *s = 0.25f * sumf;
}

/* ---------------------------------------------------------------- IQ3_S */

/* the 9-bit grid index of the k-th 4 weights (0..63) of a block: 8 bits in qs, the ninth in qh */
static inline int iq3_s_index(const block_iq3_s *b, int k) {
    return b->qs[k] | ((b->qh[k / 8] >> (k % 8)) & 1) << 8;
}

void fl_dequantize_row_iq3_s(const void *src, float *dst, int64_t n) {
    const block_iq3_s *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const float db = d * (1 + 2 * ((x[i].scales[ib / 2] >> (4 * (ib % 2))) & 0xf));
            for (int l = 0; l < 4; l++, y += 8) {
                const uint32_t grid1 = fl_iq3s_grid[iq3_s_index(&x[i], 8 * ib + 2 * l)];
                const uint32_t grid2 = fl_iq3s_grid[iq3_s_index(&x[i], 8 * ib + 2 * l + 1)];
                const uint8_t signs = x[i].signs[4 * ib + l];
                for (int j = 0; j < 4; j++) {
                    y[j] = db * grid_byte(grid1, j) * (signs & (1u << j) ? -1.f : 1.f);
                    y[j + 4] = db * grid_byte(grid2, j) * (signs & (1u << (j + 4)) ? -1.f : 1.f);
                }
            }
        }
    }
}

void fl_vec_dot_iq3_s_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq3_s *x = vx;
    const block_q8_K *y = vy;
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d) * y[i].d;
        const int8_t *q8 = y[i].qs;
        int32_t bsum = 0;
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const uint32_t ls = 2 * ((x[i].scales[ib / 2] >> (4 * (ib % 2))) & 0xf) + 1;
            int32_t sumi = 0;
            for (int l = 0; l < 4; l++, q8 += 8)
                sumi += signed_grid_dot(fl_iq3s_grid[iq3_s_index(&x[i], 8 * ib + 2 * l)],
                                        fl_iq3s_grid[iq3_s_index(&x[i], 8 * ib + 2 * l + 1)], x[i].signs[4 * ib + l],
                                        q8);
            bsum += sumi * (int32_t)ls;
        }
        sumf += d * bsum;
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- quantization */

/* The error weights of a group of 32: qw * sqrt(2 mean x^2 + x^2) with importance qw, else x^2. */
static void group_weights(const float *xb, const float *qw, float sigma2, float *weight, float *waux) {
    for (int i = 0; i < 32; i++) {
        weight[i] = qw ? qw[i] * sqrtf(sigma2 + xb[i] * xb[i]) : xb[i] * xb[i];
        waux[i] = sqrtf(weight[i]);
    }
}

/* ggml's quantize_row_iq3_xxs_impl for one super-block: signs split off in groups of 8 (7 stored, an odd count of
 * minus signs flips the weight with the least weight * x^2), 31 scale tries per group of 32, group scales to
 * 4 bits against max_scale / 31, stored d = max_scale / 31 * 1.0125 */
static void quantize_block_iq3_xxs(const struct fl_lattice *lat, const float *x, const float *qw, void *dst) {
    block_iq3_xxs *y = dst;
    float scales[QK_K / 32], weight[32], waux[32], xval[32];
    int8_t L[32];
    uint8_t block_signs[4];
    uint8_t q3[3 * (QK_K / 8)] = {0};
    uint32_t signs_scales[QK_K / 32] = {0};
    y->d = fl_fp32_to_fp16(0.f);
    float max_scale = 0;
    float sumx2 = 0;
    for (int i = 0; i < QK_K; i++)
        sumx2 += x[i] * x[i];
    const float sigma2 = 2 * sumx2 / QK_K;
    for (int ib = 0; ib < QK_K / 32; ib++) {
        const float *xb = x + 32 * ib;
        group_weights(xb, qw ? qw + 32 * ib : NULL, sigma2, weight, waux);
        fl_lattice_split_signs(xb, weight, 4, 1, xval, block_signs);
        float max = xval[0];
        for (int i = 1; i < 32; i++)
            max = max > xval[i] ? max : xval[i];
        if (max < GROUP_MAX_EPS_IQ3_XXS) {
            scales[ib] = 0;
            continue;
        }
        float scale = fl_lattice_search(lat, 32, xval, weight, waux, 8, 15, 0.2f, 0, L);
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 4; k++)
                block_signs[k] = (~block_signs[k]) & 127;
        }
        for (int k = 0; k < 8; k++)
            q3[8 * ib + k] = (uint8_t)fl_lattice_final_index(lat, L + 4 * k);
        signs_scales[ib] = block_signs[0] | (block_signs[1] << 7) | (block_signs[2] << 14) | (block_signs[3] << 21);
        scales[ib] = scale;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale) {
        memset(y->qs, 0, sizeof(y->qs));
        return;
    }
    float d = max_scale / 31;
    y->d = fl_fp32_to_fp16(d * 1.0125f);
    float id = 1 / d;
    for (int ib = 0; ib < QK_K / 32; ib++) {
        int l = fl_lattice_scale4(id, scales[ib]);
        signs_scales[ib] |= (uint32_t)l << 28;
    }
    memcpy(y->qs, q3, QK_K / 4);
    memcpy(y->qs + QK_K / 4, signs_scales, sizeof(signs_scales));
}

/* ggml's quantize_row_iq3_s_impl for one super-block: all 8 signs of each group of 8 stored, 19 scale tries per
 * group of 32 (a group that is exactly zero is skipped), group scales to 4 bits against max_scale / 31, stored
 * d = max_scale / 31 * 1.033 */
static void quantize_block_iq3_s(const struct fl_lattice *lat, const float *x, const float *qw, void *dst) {
    block_iq3_s *y = dst;
    float scales[QK_K / 32], weight[32], waux[32], xval[32];
    int8_t L[32];
    memset(y, 0, sizeof(*y));
    /* ggml moves its write positions in qs and signs past a group only when it quantized it, so after a group
     * that is exactly zero the later groups' indices and signs land one group early (and come back from the file
     * as other values than the search chose); qh and the scales keep their places. Kept for the bytes. */
    int n_done = 0;
    float max_scale = 0;
    float sumx2 = 0;
    for (int i = 0; i < QK_K; i++)
        sumx2 += x[i] * x[i];
    const float sigma2 = 2 * sumx2 / QK_K;
    for (int ib = 0; ib < QK_K / 32; ib++) {
        const float *xb = x + 32 * ib;
        group_weights(xb, qw ? qw + 32 * ib : NULL, sigma2, weight, waux);
        uint8_t block_signs[4];
        fl_lattice_split_signs(xb, weight, 4, 0, xval, block_signs);
        float max = xval[0];
        for (int i = 1; i < 32; i++)
            max = max > xval[i] ? max : xval[i];
        if (!max) {
            scales[ib] = 0;
            continue;
        }
        float scale = fl_lattice_search(lat, 32, xval, weight, waux, 8, 9, 0.2f, 1, L);
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 4; k++)
                block_signs[k] = (uint8_t)~block_signs[k];
        }
        for (int k = 0; k < 8; k++) {
            const int index = fl_lattice_final_index(lat, L + 4 * k);
            y->qs[8 * n_done + k] = (uint8_t)(index & 255);
            y->qh[ib] |= (uint8_t)((index >> 8) << k);
        }
        memcpy(y->signs + 4 * n_done, block_signs, 4);
        n_done++;
        scales[ib] = scale;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale)
        return;
    float d = max_scale / 31;
    y->d = fl_fp32_to_fp16(d * 1.033f);
    float id = 1 / d;
    for (int ib = 0; ib < QK_K / 32; ib += 2) {
        int l1 = fl_lattice_scale4(id, scales[ib]);
        int l2 = fl_lattice_scale4(id, scales[ib + 1]);
        y->scales[ib / 2] = (uint8_t)(l1 | (l2 << 4));
    }
}

/* quantize_iq3_xxs; without importance it is quantize_row_iq3_xxs_ref */
void fl_quantize_iq3_xxs(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    fl_lattice_quantize_rows(FL_LATTICE_IQ3XXS, quantize_block_iq3_xxs, sizeof(block_iq3_xxs), src, dst, n_rows,
                             n_per_row, importance);
}

void fl_quantize_row_iq3_xxs_ref(const float *src, void *dst, int64_t n) {
    fl_quantize_iq3_xxs(src, dst, 1, n, NULL);
}

/* quantize_iq3_s; without importance it is quantize_row_iq3_s_ref */
void fl_quantize_iq3_s(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    fl_lattice_quantize_rows(FL_LATTICE_IQ3S, quantize_block_iq3_s, sizeof(block_iq3_s), src, dst, n_rows, n_per_row,
                             importance);
}

void fl_quantize_row_iq3_s_ref(const float *src, void *dst, int64_t n) {
    fl_quantize_iq3_s(src, dst, 1, n, NULL);
}

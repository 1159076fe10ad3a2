/* quant_iq.c: the i-quants with non-linear 4-bit values, IQ4_NL (blocks of 32, Q8_0 activations) and IQ4_XS
 * (6-bit sub-block scales), and the 2-bit lattice ones, IQ2_XXS, IQ2_XS and IQ2_S: 8 weights from a grid of
 * magnitudes (256, 512 or 1024 points) with 7 or 8 stored sign bits, Q8_K activations. The quantizers are ggml's
 * searches (quantize_<t>, with importance weights where given), kept in ggml's order of float operations so that
 * files match what llama.cpp writes; the dequantizers are bit-exact with gguf-py. */
#include <float.h>
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

#define GROUP_MAX_EPS 1e-15f
#define GROUP_MAX_EPS_IQ2_S 1e-8f

const int8_t fl_kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static inline uint8_t grid_byte(uint64_t entry, int j) {
    return (uint8_t)(entry >> (8 * j));
}

/* ---------------------------------------------------------------- IQ4_NL and IQ4_XS */

void fl_dequantize_row_iq4_nl(const void *src, float *dst, int64_t n) {
    const block_iq4_nl *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK4_NL; i++, y += QK4_NL) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK4_NL / 2; j++) {
            y[j] = d * fl_kvalues_iq4nl[x[i].qs[j] & 0xf];
            y[j + QK4_NL / 2] = d * fl_kvalues_iq4nl[x[i].qs[j] >> 4];
        }
    }
}

void fl_dequantize_row_iq4_xs(const void *src, float *dst, int64_t n) {
    const block_iq4_xs *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *qs = x[i].qs;
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int ib = 0; ib < QK_K / 32; ib++, y += 32, qs += 16) {
            const int ls = ((x[i].scales_l[ib / 2] >> 4 * (ib % 2)) & 0xf) | (((x[i].scales_h >> 2 * ib) & 3) << 4);
            const float dl = d * (ls - 32);
            for (int j = 0; j < 16; j++) {
                y[j] = dl * fl_kvalues_iq4nl[qs[j] & 0xf];
                y[j + 16] = dl * fl_kvalues_iq4nl[qs[j] >> 4];
            }
        }
    }
}

/* the index of the table value nearest to x (table sorted ascending; ties go up) */
static inline int best_index_iq4nl(float x) {
    const int8_t *val = fl_kvalues_iq4nl;
    if (x <= val[0])
        return 0;
    if (x >= val[15])
        return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (x < val[mid])
            hi = mid;
        else
            lo = mid;
    }
    return x - val[hi - 1] < val[hi] - x ? hi - 1 : hi;
}

/* ggml's quantize_row_iq4_nl_impl for one block of `super` values (32 for IQ4_NL, 256 for IQ4_XS) in sub-blocks
 * of 32. The error weights are qw * sqrt(sigma2 + x^2) with importance qw, else x^2. Per sub-block the scale is
 * the best of 2 ntry + 1 tries near -max/127 by weighted least squares (ntry < 0: only the first guess, at
 * +max/-127, as ggml's IQ4_NL reference quantizer has it). IQ4_XS then quantizes the sub-block scales to 6 bits
 * against d = -max_scale/32 and requantizes every value against its rounded scale; IQ4_NL stores its scale as it
 * is and, searching (ntry > 0), requantizes against it. L (super levels) is the caller's: a sub-block that is all
 * but zero keeps the levels L had from the block before, as ggml's reused array does, where nothing rewrites them
 * (the IQ4_NL reference; its scale is 0 then, so only the bytes, not the values, depend on it). */
static void quantize_iq4(int super, const float *x, const float *qw, int ntry, fl_half *dh, uint8_t *q4,
                         uint16_t *scales_h, uint8_t *scales_l, uint8_t *L) {
    const int8_t *values = fl_kvalues_iq4nl;
    float scales[QK_K / 32], weight[32];
    float sigma2 = 0;
    for (int j = 0; j < super; j++)
        sigma2 += x[j] * x[j];
    sigma2 *= 2.f / super;
    float max_scale = 0, amax_scale = 0;
    for (int ib = 0; ib < super / 32; ib++) {
        const float *xb = x + 32 * ib;
        uint8_t *Lb = L + 32 * ib;
        for (int j = 0; j < 32; j++)
            weight[j] = qw ? qw[32 * ib + j] * sqrtf(sigma2 + xb[j] * xb[j]) : xb[j] * xb[j];
        float amax = 0, max = 0;
        for (int j = 0; j < 32; j++) {
            if (fabsf(xb[j]) > amax) {
                amax = fabsf(xb[j]);
                max = xb[j];
            }
        }
        if (amax < GROUP_MAX_EPS) {
            scales[ib] = 0;
            continue;
        }
        float d = ntry > 0 ? -max / values[0] : max / values[0];
        float id = 1 / d;
        float sumqx = 0, sumq2 = 0;
        for (int j = 0; j < 32; j++) {
            int l = best_index_iq4nl(id * xb[j]);
            Lb[j] = (uint8_t)l;
            float q = values[l];
            sumqx += weight[j] * q * xb[j];
            sumq2 += weight[j] * q * q;
        }
        d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
        float best = d * sumqx;
        for (int itry = -ntry; itry <= ntry; itry++) {
            id = (itry + values[0]) / max;
            sumqx = sumq2 = 0;
            for (int j = 0; j < 32; j++) {
                float q = values[best_index_iq4nl(id * xb[j])];
                sumqx += weight[j] * q * xb[j];
                sumq2 += weight[j] * q * q;
            }
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scales[ib] = d;
        if (fabsf(d) > amax_scale) {
            amax_scale = fabsf(d);
            max_scale = d;
        }
    }
    if (super > 32) {
        *scales_h = 0;
        float d = -max_scale / 32;
        *dh = fl_fp32_to_fp16(d);
        float id = d ? 1 / d : 0.f;
        for (int ib = 0; ib < super / 32; ib++) {
            int l = fl_clampi(fl_nearest_int(id * scales[ib]), -32, 31);
            float dl = d * l;
            float idl = dl ? 1 / dl : 0.f;
            for (int j = 0; j < 32; j++)
                L[32 * ib + j] = (uint8_t)best_index_iq4nl(idl * x[32 * ib + j]);
            l += 32;
            if (ib % 2 == 0)
                scales_l[ib / 2] = (uint8_t)(l & 0xf);
            else
                scales_l[ib / 2] |= (uint8_t)((l & 0xf) << 4);
            *scales_h |= (uint16_t)((l >> 4) << (2 * ib));
        }
    } else {
        *dh = fl_fp32_to_fp16(scales[0]);
        if (ntry > 0) {
            float id = scales[0] ? 1 / scales[0] : 0;
            for (int j = 0; j < 32; j++)
                L[j] = (uint8_t)best_index_iq4nl(id * x[j]);
        }
    }
    for (int i = 0; i < super / 32; i++)
        for (int j = 0; j < 16; j++)
            q4[16 * i + j] = L[32 * i + j] | (uint8_t)(L[32 * i + 16 + j] << 4);
}

/* quantize_row_iq4_nl_ref: the first guess of each block's scale, error weights x^2 */
void fl_quantize_row_iq4_nl_ref(const float *src, void *dst, int64_t n) {
    block_iq4_nl *y = dst;
    uint8_t L[QK4_NL] = {0};
    for (int64_t i = 0; i < n / QK4_NL; i++)
        quantize_iq4(QK4_NL, src + i * QK4_NL, NULL, -1, &y[i].d, y[i].qs, NULL, NULL, L);
}

/* quantize_iq4_nl: the full search, weighted by importance or, without, by x^2 (what llama.cpp writes) */
void fl_quantize_iq4_nl(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    block_iq4_nl *y = dst;
    uint8_t L[QK4_NL] = {0};
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t i = 0; i < n_per_row / QK4_NL; i++, y++)
            quantize_iq4(QK4_NL, src + r * n_per_row + i * QK4_NL, importance ? importance + i * QK4_NL : NULL, 7,
                         &y->d, y->qs, NULL, NULL, L);
}

void fl_quantize_iq4_xs(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    block_iq4_xs *y = dst;
    uint8_t L[QK_K];
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t i = 0; i < n_per_row / QK_K; i++, y++)
            quantize_iq4(QK_K, src + r * n_per_row + i * QK_K, importance ? importance + i * QK_K : NULL, 7, &y->d,
                         y->qs, &y->scales_h, y->scales_l, L);
}

/* quantize_row_iq4_xs_ref is quantize_iq4_xs without importance */
void fl_quantize_row_iq4_xs_ref(const float *src, void *dst, int64_t n) {
    fl_quantize_iq4_xs(src, dst, 1, n, NULL);
}

void fl_vec_dot_iq4_nl_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq4_nl *x = vx;
    const block_q8_0 *y = vy;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK4_NL; i++) {
        const float d = fl_fp16_to_fp32(y[i].d) * fl_fp16_to_fp32(x[i].d);
        int sumi1 = 0, sumi2 = 0;
        for (int j = 0; j < QK4_NL / 2; j++) {
            sumi1 += y[i].qs[j] * fl_kvalues_iq4nl[x[i].qs[j] & 0xf];
            sumi2 += y[i].qs[j + QK4_NL / 2] * fl_kvalues_iq4nl[x[i].qs[j] >> 4];
        }
        sumf += d * (sumi1 + sumi2);
    }
    *s = sumf;
}

void fl_vec_dot_iq4_xs_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq4_xs *x = vx;
    const block_q8_K *y = vy;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d4d8 = fl_fp16_to_fp32(x[i].d) * y[i].d;
        const uint8_t *qs = x[i].qs;
        const int8_t *q8 = y[i].qs;
        for (int ib = 0; ib < QK_K / 32; ib++, qs += 16, q8 += 32) {
            const int ls = ((x[i].scales_l[ib / 2] >> 4 * (ib % 2)) & 0xf) | (((x[i].scales_h >> 2 * ib) & 3) << 4);
            int sumi1 = 0, sumi2 = 0;
            for (int j = 0; j < 16; j++) {
                sumi1 += q8[j] * fl_kvalues_iq4nl[qs[j] & 0xf];
                sumi2 += q8[j + 16] * fl_kvalues_iq4nl[qs[j] >> 4];
            }
            sumf += d4d8 * (ls - 32) * (sumi1 + sumi2);
        }
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- IQ2_XXS, IQ2_XS, IQ2_S */

/* Each group of 32 is two 32-bit words: grid indices in the bytes of the first; in the second, 4x7 sign bits
 * and a 4-bit scale on top, giving the group scale d * (0.5 + s) / 4. */
void fl_dequantize_row_iq2_xxs(const void *src, float *dst, int64_t n) {
    const block_iq2_xxs *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int ib = 0; ib < QK_K / 32; ib++) {
            uint32_t aux[2];
            memcpy(aux, x[i].qs + 4 * ib, sizeof(aux));
            const float db = d * (0.5f + (aux[1] >> 28)) * 0.25f;
            for (int l = 0; l < 4; l++, y += 8) {
                const uint64_t grid = fl_iq2xxs_grid[(aux[0] >> (8 * l)) & 0xff];
                const uint8_t signs = fl_iq2_signs((aux[1] >> (7 * l)) & 127);
                for (int j = 0; j < 8; j++)
                    y[j] = db * grid_byte(grid, j) * (signs & (1u << j) ? -1.f : 1.f);
            }
        }
    }
}

/* each 16-bit qs word: a 9-bit grid index and 7 sign bits; each half group of 16 its own 4-bit scale */
void fl_dequantize_row_iq2_xs(const void *src, float *dst, int64_t n) {
    const block_iq2_xs *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const float db[2] = {d * (0.5f + (x[i].scales[ib] & 0xf)) * 0.25f, d * (0.5f + (x[i].scales[ib] >> 4)) * 0.25f};
            for (int l = 0; l < 4; l++, y += 8) {
                const uint16_t q = x[i].qs[4 * ib + l];
                const uint64_t grid = fl_iq2xs_grid[q & 511];
                const uint8_t signs = fl_iq2_signs(q >> 9);
                for (int j = 0; j < 8; j++)
                    y[j] = db[l / 2] * grid_byte(grid, j) * (signs & (1u << j) ? -1.f : 1.f);
            }
        }
    }
}

/* the 10-bit grid index of 8 weights l (0..3) of group ib: 8 bits in qs, 2 in qh[ib] */
static inline int iq2_s_index(const block_iq2_s *b, int ib, int l) {
    return b->qs[4 * ib + l] | ((b->qh[ib] << (8 - 2 * l)) & 0x300);
}

void fl_dequantize_row_iq2_s(const void *src, float *dst, int64_t n) {
    const block_iq2_s *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        const uint8_t *signs = x[i].qs + QK_K / 8;
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const float db[2] = {d * (0.5f + (x[i].scales[ib] & 0xf)) * 0.25f, d * (0.5f + (x[i].scales[ib] >> 4)) * 0.25f};
            for (int l = 0; l < 4; l++, y += 8) {
                const uint64_t grid = fl_iq2s_grid[iq2_s_index(&x[i], ib, l)];
                for (int j = 0; j < 8; j++)
                    y[j] = db[l / 2] * grid_byte(grid, j) * (signs[4 * ib + l] & (1u << j) ? -1.f : 1.f);
            }
        }
    }
}

/* the dot of 8 grid magnitudes under signs with 8 activations */
static inline int32_t signed_grid_dot(uint64_t grid, uint8_t signs, const int8_t *q8) {
    int32_t sum = 0;
    for (int j = 0; j < 8; j++)
        sum += grid_byte(grid, j) * q8[j] * (signs & (1u << j) ? -1 : 1);
    return sum;
}

void fl_vec_dot_iq2_xxs_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq2_xxs *x = vx;
    const block_q8_K *y = vy;
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d) * y[i].d;
        const int8_t *q8 = y[i].qs;
        int32_t bsum = 0;
        for (int ib = 0; ib < QK_K / 32; ib++) {
            uint32_t aux[2];
            memcpy(aux, x[i].qs + 4 * ib, sizeof(aux));
            const int32_t ls = 2 * (int32_t)(aux[1] >> 28) + 1;
            int32_t sumi = 0;
            for (int l = 0; l < 4; l++, q8 += 8)
                sumi += signed_grid_dot(fl_iq2xxs_grid[(aux[0] >> (8 * l)) & 0xff],
                                        fl_iq2_signs((aux[1] >> (7 * l)) & 127), q8);
            bsum += sumi * ls;
        }
        sumf += d * bsum;
    }
    *s = 0.125f * sumf;
}

void fl_vec_dot_iq2_xs_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq2_xs *x = vx;
    const block_q8_K *y = vy;
    float sumf = 0.f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d) * y[i].d;
        const int8_t *q8 = y[i].qs;
        int32_t bsum = 0;
        for (int ib = 0; ib < QK_K / 32; ib++) {
            for (int h = 0; h < 2; h++) {
                const int32_t ls = 2 * ((x[i].scales[ib] >> (4 * h)) & 0xf) + 1;
                int32_t sumi = 0;
                for (int l = 2 * h; l < 2 * h + 2; l++, q8 += 8) {
                    const uint16_t q = x[i].qs[4 * ib + l];
                    sumi += signed_grid_dot(fl_iq2xs_grid[q & 511], fl_iq2_signs(q >> 9), q8);
                }
                bsum += sumi * ls;
            }
        }
        sumf += d * bsum;
    }
    *s = 0.125f * sumf;
}

void fl_vec_dot_iq2_s_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq2_s *x = vx;
    const block_q8_K *y = vy;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d) * y[i].d;
        const int8_t *q8 = y[i].qs;
        const uint8_t *signs = x[i].qs + QK_K / 8;
        int bsum = 0;
        for (int ib = 0; ib < QK_K / 32; ib++) {
            int sumi[2] = {0, 0};
            for (int l = 0; l < 4; l++, q8 += 8)
                sumi[l / 2] += signed_grid_dot(fl_iq2s_grid[iq2_s_index(&x[i], ib, l)], signs[4 * ib + l], q8);
            bsum += (1 + 2 * (x[i].scales[ib] & 0xf)) * sumi[0] + (1 + 2 * (x[i].scales[ib] >> 4)) * sumi[1];
        }
        sumf += d * bsum;
    }
    *s = 0.125f * sumf;
}

/* ggml's quantize_row_iq2_xxs_impl for one super-block: per group of 32, signs split off, make_qp_quants' scale
 * refined over 13 tries, groups of 8 rounded to the grid; error weights qw * sqrt(mean x^2 + x^2), qw the
 * importance or (ggml insists on one; its quantizer without is this one) 1. */
static void quantize_block_iq2_xxs(const struct fl_lattice *lat, const float *x, const float *qw, void *dst) {
    block_iq2_xxs *y = dst;
    const int kMaxQ = 3;
    float scales[QK_K / 32], weight[32], waux[32], xval[32];
    int8_t L[32], Laux[32];
    uint8_t block_signs[4];
    uint32_t q2[2 * (QK_K / 32)] = {0};
    float max_scale = 0;
    y->d = fl_fp32_to_fp16(0.f);
    float sumx2 = 0;
    for (int i = 0; i < QK_K; i++)
        sumx2 += x[i] * x[i];
    const float sigma2 = sumx2 / QK_K;
    for (int ib = 0; ib < QK_K / 32; ib++) {
        const float *xb = x + 32 * ib;
        for (int i = 0; i < 32; i++) {
            weight[i] = (qw ? qw[32 * ib + i] : 1.f) * sqrtf(sigma2 + xb[i] * xb[i]);
            waux[i] = sqrtf(weight[i]);
        }
        fl_lattice_split_signs(xb, weight, 4, 1, xval, block_signs);
        float max = xval[0];
        for (int i = 1; i < 32; i++)
            max = max > xval[i] ? max : xval[i];
        if (max < GROUP_MAX_EPS) {
            scales[ib] = 0;
            continue;
        }
        float scale = fl_make_qp_quants(32, kMaxQ + 1, xval, (uint8_t *)L, weight);
        float eff_max = scale * kMaxQ;
        if (eff_max <= 0) {
            scales[ib] = 0;
            continue;
        }
        float best = 0;
        for (int is = -6; is <= 6; is++) {
            float id = (2 * kMaxQ - 1 + is * 0.1f) / eff_max;
            float this_scale = 1 / id;
            for (int k = 0; k < 4; k++)
                fl_lattice_round(lat, xval + 8 * k, waux + 8 * k, id, this_scale, Laux + 8 * k, NULL);
            float sumqx, sumq2;
            fl_lattice_lsq_sums(32, xval, weight, Laux, &sumqx, &sumq2);
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                memcpy(L, Laux, 32);
            }
        }
        if (scale > 0) {
            float id = 1 / scale;
            for (int k = 0; k < 4; k++)
                fl_lattice_round(lat, xval + 8 * k, waux + 8 * k, id, scale, L + 8 * k, NULL);
            float sumqx, sumq2;
            fl_lattice_lsq_sums(32, xval, weight, L, &sumqx, &sumq2);
            if (sumq2 > 0)
                scale = sumqx / sumq2;
        }
        if (scale < 0) { /* the scale is stored unsigned: flip it and every sign with it */
            scale = -scale;
            for (int k = 0; k < 4; k++)
                block_signs[k] = (~block_signs[k]) & 127;
        }
        for (int k = 0; k < 4; k++) {
            q2[2 * ib] |= (uint32_t)fl_lattice_final_index(lat, L + 8 * k) << (8 * k);
            q2[2 * ib + 1] |= (uint32_t)block_signs[k] << (7 * k);
        }
        scales[ib] = scale;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale) {
        memset(y->qs, 0, sizeof(y->qs));
        return;
    }
    float d = max_scale / 31;
    y->d = fl_fp32_to_fp16(d);
    float id = 1 / d;
    for (int ib = 0; ib < QK_K / 32; ib++) {
        int l = fl_lattice_scale4(id, scales[ib]);
        q2[2 * ib + 1] |= (uint32_t)l << 28;
    }
    memcpy(y->qs, q2, sizeof(y->qs));
}

/* ggml's quantize_row_iq2_xs_impl for one super-block: half groups of 16 searched on their own, error weights as
 * IQ2_XXS's; each half group's scale to 4 bits against max_scale / 31 */
static void quantize_block_iq2_xs(const struct fl_lattice *lat, const float *x, const float *qw, void *dst) {
    block_iq2_xs *y = dst;
    float scales[QK_K / 16], weight[16], waux[16], xval[16];
    int8_t L[16];
    uint8_t block_signs[2];
    uint16_t q2[QK_K / 8] = {0};
    y->d = fl_fp32_to_fp16(0.f);
    memset(y->scales, 0, sizeof(y->scales));
    float max_scale = 0;
    float sumx2 = 0;
    for (int i = 0; i < QK_K; i++)
        sumx2 += x[i] * x[i];
    const float sigma2 = sumx2 / QK_K;
    for (int ib = 0; ib < QK_K / 16; ib++) {
        const float *xb = x + 16 * ib;
        for (int i = 0; i < 16; i++) {
            weight[i] = (qw ? qw[16 * ib + i] : 1.f) * sqrtf(sigma2 + xb[i] * xb[i]);
            waux[i] = sqrtf(weight[i]);
        }
        fl_lattice_split_signs(xb, weight, 2, 1, xval, block_signs);
        float max = xval[0];
        for (int i = 1; i < 16; i++)
            max = max > xval[i] ? max : xval[i];
        if (max < GROUP_MAX_EPS) {
            scales[ib] = 0;
            continue;
        }
        float scale = fl_lattice_search(lat, 16, xval, weight, waux, 3, 9, 0.1f, 0, L);
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 2; k++)
                block_signs[k] = (~block_signs[k]) & 127;
        }
        for (int k = 0; k < 2; k++)
            q2[2 * ib + k] = (uint16_t)(fl_lattice_final_index(lat, L + 8 * k) | (block_signs[k] << 9));
        scales[ib] = scale;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale) {
        memset(y->qs, 0, sizeof(y->qs));
        return;
    }
    float d = max_scale / 31;
    y->d = fl_fp32_to_fp16(d);
    float id = 1 / d;
    for (int ib = 0; ib < QK_K / 16; ib++) {
        int l = fl_lattice_scale4(id, scales[ib]);
        if (ib % 2 == 0)
            y->scales[ib / 2] = (uint8_t)l;
        else
            y->scales[ib / 2] |= (uint8_t)(l << 4);
    }
    memcpy(y->qs, q2, sizeof(y->qs));
}

/* ggml's quantize_row_iq2_s_impl for one super-block: as IQ2_XS with all 8 sign bits stored, error weights
 * qw * sqrt(2 mean x^2 + x^2), or without importance x^2 + mean x^2 / 2; the super-block scale d * 0.9875 */
static void quantize_block_iq2_s(const struct fl_lattice *lat, const float *x, const float *qw, void *dst) {
    block_iq2_s *y = dst;
    float scales[QK_K / 16], weight[16], waux[16], xval[16];
    int8_t L[16];
    uint8_t block_signs[2];
    memset(y, 0, sizeof(*y));
    float max_scale = 0;
    float sumx2 = 0;
    for (int i = 0; i < QK_K; i++)
        sumx2 += x[i] * x[i];
    const float sigma2 = 2 * sumx2 / QK_K;
    for (int ib = 0; ib < QK_K / 16; ib++) {
        const float *xb = x + 16 * ib;
        for (int i = 0; i < 16; i++) {
            weight[i] = qw ? qw[16 * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]) : 0.25f * sigma2 + xb[i] * xb[i];
            waux[i] = sqrtf(weight[i]);
        }
        fl_lattice_split_signs(xb, weight, 2, 0, xval, block_signs);
        float max = xval[0];
        for (int i = 1; i < 16; i++)
            max = max > xval[i] ? max : xval[i];
        if (max < GROUP_MAX_EPS_IQ2_S) {
            scales[ib] = 0;
            continue;
        }
        float scale = fl_lattice_search(lat, 16, xval, weight, waux, 3, 9, 0.1f, 0, L);
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 2; k++)
                block_signs[k] = (uint8_t)~block_signs[k];
        }
        for (int k = 0; k < 2; k++) {
            const int i8 = 2 * ib + k, index = fl_lattice_final_index(lat, L + 8 * k);
            y->qs[i8] = (uint8_t)(index & 255);
            y->qh[i8 / 4] |= (uint8_t)((index >> 8) << 2 * (i8 % 4));
            y->qs[QK_K / 8 + i8] = block_signs[k];
        }
        scales[ib] = scale;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale)
        return;
    float d = max_scale / 31;
    y->d = fl_fp32_to_fp16(d * 0.9875f);
    float id = 1 / d;
    for (int ib = 0; ib < QK_K / 16; ib++) {
        int l = fl_lattice_scale4(id, scales[ib]);
        if (ib % 2 == 0)
            y->scales[ib / 2] = (uint8_t)l;
        else
            y->scales[ib / 2] |= (uint8_t)(l << 4);
    }
}

/* ggml only quantizes IQ2_XXS and IQ2_XS with an importance matrix (ggml_quantize_requires_imatrix; its
 * ggml_quantize_chunk asserts one is given): without, these run its search with every importance 1 */
void fl_quantize_iq2_xxs(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    fl_lattice_quantize_rows(FL_LATTICE_IQ2XXS, quantize_block_iq2_xxs, sizeof(block_iq2_xxs), src, dst, n_rows,
                             n_per_row, importance);
}

void fl_quantize_row_iq2_xxs_ref(const float *src, void *dst, int64_t n) {
    fl_quantize_iq2_xxs(src, dst, 1, n, NULL);
}

void fl_quantize_iq2_xs(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    fl_lattice_quantize_rows(FL_LATTICE_IQ2XS, quantize_block_iq2_xs, sizeof(block_iq2_xs), src, dst, n_rows, n_per_row,
                             importance);
}

void fl_quantize_row_iq2_xs_ref(const float *src, void *dst, int64_t n) {
    fl_quantize_iq2_xs(src, dst, 1, n, NULL);
}

/* quantize_iq2_s, and without importance quantize_row_iq2_s_ref */
void fl_quantize_iq2_s(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    fl_lattice_quantize_rows(FL_LATTICE_IQ2S, quantize_block_iq2_s, sizeof(block_iq2_s), src, dst, n_rows, n_per_row,
                             importance);
}

void fl_quantize_row_iq2_s_ref(const float *src, void *dst, int64_t n) {
    fl_quantize_iq2_s(src, dst, 1, n, NULL);
}

/* quant_iq1.c: the 1.5- and 1.75-bit i-quants IQ1_S and IQ1_M: 8 weights from a 2048-point grid of -1, 0, +1,
 * shifted by +-IQ1S_DELTA, paired with Q8_K activations. The quantizers are ggml's exhaustive searches
 * (quantize_iq1_s / quantize_iq1_m, with importance weights where given), kept in ggml's order of float
 * operations so that files match what llama.cpp writes; the dequantizers are bit-exact with gguf-py. */
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

#define GROUP_MAX_EPS_IQ1_S 1e-12f
#define GROUP_MAX_EPS_IQ1_M 1e-7f
#define NGRID_IQ1S 2048

static inline int8_t grid_value(uint64_t entry, int j) {
    return (int8_t)(entry >> (8 * j));
}

/* ---------------------------------------------------------------- IQ1_S */

/* qh[ib]: the high 3 bits of the 4 grid indices of group ib, its 3-bit scale in bits 12..14 and the sign of its
 * shift in bit 15 */
void fl_dequantize_row_iq1_s(const void *src, float *dst, int64_t n) {
    const block_iq1_s *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const uint16_t qh = x[i].qh[ib];
            const float dl = d * (2 * ((qh >> 12) & 7) + 1);
            const float delta = qh & 0x8000 ? -IQ1S_DELTA : IQ1S_DELTA;
            for (int l = 0; l < 4; l++, y += 8) {
                const uint64_t grid = fl_iq1s_grid[x[i].qs[4 * ib + l] | (((qh >> (3 * l)) & 7) << 8)];
                for (int j = 0; j < 8; j++)
                    y[j] = dl * (grid_value(grid, j) + delta);
            }
        }
    }
}

static inline int32_t grid_dot(uint64_t grid, const int8_t *q8) {
    int32_t sum = 0;
    for (int j = 0; j < 8; j++)
        sum += q8[j] * grid_value(grid, j);
    return sum;
}

/* the shifts go through the activations' block sums: sum (grid + delta) q = sum grid q + delta * bsum */
void fl_vec_dot_iq1_s_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq1_s *x = vx;
    const block_q8_K *y = vy;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const int8_t *q8 = y[i].qs;
        int sumi = 0, sumi1 = 0;
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const uint16_t qh = x[i].qh[ib];
            const int ls = 2 * ((qh >> 12) & 7) + 1;
            const int delta = qh & 0x8000 ? -1 : 1;
            int lsum = 0;
            for (int l = 0; l < 4; l++, q8 += 8)
                lsum += grid_dot(fl_iq1s_grid[x[i].qs[4 * ib + l] | (((qh >> (3 * l)) & 7) << 8)], q8);
            sumi += ls * lsum;
            sumi1 += ls * delta * (y[i].bsums[2 * ib] + y[i].bsums[2 * ib + 1]);
        }
        sumf += fl_fp16_to_fp32(x[i].d) * y[i].d * (sumi + IQ1S_DELTA * sumi1);
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- IQ1_M */

/* the fp16 super-block scale, spread over the top 4 bits of the four 16-bit scale words */
static inline float iq1_m_scale(const uint16_t *sc) {
    return fl_fp16_to_fp32(fl_iq1_m_scale_bits(sc));
}

/* the 11-bit grid index of the l-th 8 weights (0..31) of a block, and the sign of their shift */
static inline int iq1_m_index(const block_iq1_m *b, int l) {
    return b->qs[l] | ((b->qh[l / 2] >> (4 * (l % 2))) & 7) << 8;
}

static inline int iq1_m_negative(const block_iq1_m *b, int l) {
    return (b->qh[l / 2] >> (4 * (l % 2))) & 8;
}

void fl_dequantize_row_iq1_m(const void *src, float *dst, int64_t n) {
    const block_iq1_m *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        uint16_t sc[4];
        memcpy(sc, x[i].scales, sizeof(sc));
        const float d = iq1_m_scale(sc);
        for (int ib = 0; ib < QK_K / 16; ib++) {
            const float dl = d * (2 * ((sc[ib / 4] >> (3 * (ib % 4))) & 7) + 1);
            for (int l = 2 * ib; l < 2 * ib + 2; l++, y += 8) {
                const uint64_t grid = fl_iq1s_grid[iq1_m_index(&x[i], l)];
                const float delta = iq1_m_negative(&x[i], l) ? -IQ1M_DELTA : IQ1M_DELTA;
                for (int j = 0; j < 8; j++)
                    y[j] = dl * (grid_value(grid, j) + delta);
            }
        }
    }
}

void fl_vec_dot_iq1_m_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq1_m *x = vx;
    const block_q8_K *y = vy;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        uint16_t sc[4];
        memcpy(sc, x[i].scales, sizeof(sc));
        const int8_t *q8 = y[i].qs;
        int sumi1 = 0, sumi2 = 0;
        for (int ib = 0; ib < QK_K / 16; ib++) {
            const int ls = 2 * ((sc[ib / 4] >> (3 * (ib % 4))) & 7) + 1;
            int sum1 = 0, sum2 = 0;
            for (int l = 2 * ib; l < 2 * ib + 2; l++, q8 += 8) {
                int lsum2 = 0;
                for (int j = 0; j < 8; j++)
                    lsum2 += q8[j];
                sum1 += grid_dot(fl_iq1s_grid[iq1_m_index(&x[i], l)], q8);
                sum2 += lsum2 * (iq1_m_negative(&x[i], l) ? -1 : 1);
            }
            sumi1 += sum1 * ls;
            sumi2 += sum2 * ls;
        }
        sumf += iq1_m_scale(sc) * y[i].d * (sumi1 + IQ1M_DELTA * sumi2);
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- quantization */

/* The order of x[0..n-1] ascending, ties in index order: what ggml's qsort of (value, index) pairs gives with
 * glibc, whose qsort merge-sorts arrays this small (stably). NaNs end up somewhere, harmlessly. */
static void sort_order(const float *x, int n, int *idx) {
    for (int j = 0; j < n; j++) {
        int k = j;
        while (k > 0 && x[j] < x[idx[k - 1]]) {
            idx[k] = idx[k - 1];
            k--;
        }
        idx[k] = j;
    }
}

/* ggml's iq1_find_best_neighbour2: among the neighbours of an off-grid key, the grid point whose values xg (the
 * shifted -1, 0, 1) at `scale` are nearest to x under the weights; L gets its levels. Where no distance is below
 * FLT_MAX (non-finite input) ggml falls back to the whole grid, there indexing x by the grid index, past the
 * group, and then aborts: here the fallback compares x[j], and the first neighbour stands when that finds none. */
static int iq1_best_neighbour(const struct fl_lattice *lat, const uint16_t *list, const float *x, const float *w,
                              float scale, const float *xg, int8_t *L) {
    float best = FLT_MAX;
    int index = -1;
    for (int k = 1; k <= list[0]; k++) {
        const int8_t *g = lat->pos + 8 * list[k];
        float d2 = 0;
        for (int j = 0; j < 8; j++) {
            float diff = scale * xg[(g[j] - 1) / 2] - x[j];
            d2 += w[j] * diff * diff;
        }
        if (d2 < best) {
            best = d2;
            index = list[k];
        }
    }
    for (int i = 0; index < 0 && i < NGRID_IQ1S; i++) {
        const int8_t *g = lat->pos + 8 * i;
        float d2 = 0;
        for (int j = 0; j < 8; j++) {
            float diff = scale * xg[(g[j] - 1) / 2] - x[j];
            d2 += w[j] * diff * diff;
        }
        if (d2 < best) {
            best = d2;
            index = i;
        }
    }
    if (index < 0)
        index = list[1];
    const int8_t *g = lat->pos + 8 * index;
    for (int j = 0; j < 8; j++)
        L[j] = (int8_t)((g[j] - 1) / 2);
    return index;
}

/* the grid index of the 8 levels L (0, 1, 2 for xg[0..2]), rounded to the nearest neighbour when off the grid;
 * returns whether they were on it */
static int iq1_index(const struct fl_lattice *lat, const float *x, const float *w, float scale, const float *xg,
                     int8_t *L, uint16_t *index) {
    const int u = fl_lattice_key(lat, L);
    if (lat->map[u] >= 0) {
        *index = (uint16_t)lat->map[u];
        return 1;
    }
    *index = (uint16_t)iq1_best_neighbour(lat, lat->neighbours - lat->map[u] - 1, x, w, scale, xg, L);
    return 0;
}

/* ggml's quantize_row_iq1_s_impl for one super-block. Per group of 32 the exact weighted least-squares split of
 * the sorted values into -1, 0, +1 (two boundaries over 33 x 34 / 2 pairs, shifted by +IQ1S_DELTA or -), the
 * groups of 8 then rounded to the grid; error weights qw * sqrt(2 mean x^2 + x^2), qw the importance or (ggml
 * insists on one; its quantizer without is this one) 1. Group scales to 3 bits against max_scale / 15, stored
 * d = max_scale / 15 * 1.125. */
static void quantize_block_iq1_s(const struct fl_lattice *lat, const float *x, const float *qw, void *dst) {
    block_iq1_s *y = dst;
    const float x_p[3] = {-1 + IQ1S_DELTA, IQ1S_DELTA, 1 + IQ1S_DELTA};
    const float x_m[3] = {-1 - IQ1S_DELTA, -IQ1S_DELTA, 1 - IQ1S_DELTA};
    float scales[QK_K / 32], weight[32], sumx[33], sumw[33];
    int idx[32];
    int8_t L[32], shifts[QK_K / 32];
    uint16_t index[4];
    y->d = fl_fp32_to_fp16(0.f);
    memset(y->qs, 0, sizeof(y->qs));
    memset(y->qh, 0, sizeof(y->qh));
    float max_scale = 0;
    float sumx2 = 0;
    for (int i = 0; i < QK_K; i++)
        sumx2 += x[i] * x[i];
    const float sigma2 = 2 * sumx2 / QK_K;
    for (int ib = 0; ib < QK_K / 32; ib++) {
        const float *xb = x + 32 * ib;
        for (int i = 0; i < 32; i++)
            weight[i] = (qw ? qw[32 * ib + i] : 1.f) * sqrtf(sigma2 + xb[i] * xb[i]);
        float max = fabsf(xb[0]);
        for (int i = 1; i < 32; i++)
            max = max > fabsf(xb[i]) ? max : fabsf(xb[i]);
        if (max < GROUP_MAX_EPS_IQ1_S) {
            scales[ib] = 0;
            shifts[ib] = 1;
            continue;
        }
        sort_order(xb, 32, idx);
        sumx[0] = sumw[0] = 0;
        for (int j = 0; j < 32; j++) {
            sumx[j + 1] = sumx[j] + weight[idx[j]] * xb[idx[j]];
            sumw[j + 1] = sumw[j] + weight[idx[j]];
        }
        float best_score = -FLT_MAX, scale = max;
        int besti1 = -1, besti2 = -1, best_shift = 0;
        for (int i1 = 0; i1 <= 32; i1++) {
            for (int i2 = i1; i2 <= 32; i2++) {
                float sumqx = (sumx[i1] - sumx[0]) * x_p[0] + (sumx[i2] - sumx[i1]) * x_p[1] +
                              (sumx[32] - sumx[i2]) * x_p[2];
                float sumq2 = (sumw[i1] - sumw[0]) * x_p[0] * x_p[0] + (sumw[i2] - sumw[i1]) * x_p[1] * x_p[1] +
                              (sumw[32] - sumw[i2]) * x_p[2] * x_p[2];
                if (sumq2 > 0 && sumqx * sumqx > best_score * sumq2) {
                    scale = sumqx / sumq2;
                    best_score = scale * sumqx;
                    besti1 = i1, besti2 = i2, best_shift = 1;
                }
                sumqx = (sumx[i1] - sumx[0]) * x_m[0] + (sumx[i2] - sumx[i1]) * x_m[1] +
                        (sumx[32] - sumx[i2]) * x_m[2];
                sumq2 = (sumw[i1] - sumw[0]) * x_m[0] * x_m[0] + (sumw[i2] - sumw[i1]) * x_m[1] * x_m[1] +
                        (sumw[32] - sumw[i2]) * x_m[2] * x_m[2];
                if (sumq2 > 0 && sumqx * sumqx > best_score * sumq2) {
                    scale = sumqx / sumq2;
                    best_score = scale * sumqx;
                    besti1 = i1, besti2 = i2, best_shift = -1;
                }
            }
        }
        if (besti1 < 0 || besti2 < 0 || best_shift == 0) {
            scales[ib] = 0;
            shifts[ib] = 1;
            continue;
        }
        for (int j = 0; j < 32; j++)
            L[idx[j]] = (int8_t)(j < besti1 ? 0 : j < besti2 ? 1 : 2);
        if (scale < 0) {
            for (int j = 0; j < 32; j++)
                L[j] = (int8_t)(2 - L[j]);
            scale = -scale;
            best_shift = -best_shift;
        }
        const float *xx = best_shift == 1 ? x_p : x_m;
        int all_on_grid = 1;
        for (int k = 0; k < 4; k++)
            all_on_grid &= iq1_index(lat, xb + 8 * k, weight + 8 * k, scale, xx, L + 8 * k, &index[k]);
        if (!all_on_grid) {
            float sumqx = 0, sumq2 = 0;
            for (int k = 0; k < 4; k++) {
                const int8_t *g = lat->pos + 8 * index[k];
                for (int j = 0; j < 8; j++) {
                    float w = weight[8 * k + j];
                    float q = xx[(g[j] - 1) / 2];
                    sumqx += w * q * xb[8 * k + j];
                    sumq2 += w * q * q;
                }
            }
            if (sumqx > 0 && sumq2 > 0)
                scale = sumqx / sumq2;
        }
        uint16_t h = 0;
        for (int k = 0; k < 4; k++) {
            y->qs[4 * ib + k] = (uint8_t)(index[k] & 255);
            h |= (uint16_t)((index[k] >> 8) << (3 * k));
        }
        y->qh[ib] = h;
        scales[ib] = scale;
        shifts[ib] = (int8_t)best_shift;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale)
        return;
    float d = max_scale / 15;
    y->d = fl_fp32_to_fp16(d * 1.125f);
    float id = 1 / d;
    for (int ib = 0; ib < QK_K / 32; ib++) {
        int l = fl_clampi(fl_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 7);
        if (shifts[ib] == -1)
            l |= 8;
        y->qh[ib] |= (uint16_t)(l << 12);
    }
}

/* ggml's quantize_row_iq1_m_impl for one super-block: as IQ1_S in groups of 16 whose two halves of 8 each pick
 * their shift's sign (4 combinations per split, from prefix sums kept per half), error weights
 * qw * sqrt(2 mean x^2 + x^2) with importance qw, else x^2. The super-block scale is then refitted by least
 * squares over the rounded group scales and stored as d * 1.1125. */
static void quantize_block_iq1_m(const struct fl_lattice *lat, const float *x, const float *qw, void *dst) {
    block_iq1_m *y = dst;
    const float x_p[3] = {-1 + IQ1M_DELTA, IQ1M_DELTA, 1 + IQ1M_DELTA};
    const float x_m[3] = {-1 - IQ1M_DELTA, -IQ1M_DELTA, 1 - IQ1M_DELTA};
    const uint8_t masks[4] = {0x00, 0x80, 0x08, 0x88};
    float scales[QK_K / 16], weight[16], sumqx[4], sumq2[4];
    int idx[16];
    int8_t L[16], shifts[QK_K / 16];
    uint16_t index[2];
    memset(y, 0, sizeof(*y));
    float max_scale = 0;
    float sumx2 = 0;
    for (int i = 0; i < QK_K; i++)
        sumx2 += x[i] * x[i];
    const float sigma2 = 2 * sumx2 / QK_K;
    for (int ib = 0; ib < QK_K / 16; ib++) {
        const float *xb = x + 16 * ib;
        for (int i = 0; i < 16; i++)
            weight[i] = qw ? qw[16 * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]) : xb[i] * xb[i];
        float max = fabsf(xb[0]);
        for (int i = 1; i < 16; i++)
            max = max > fabsf(xb[i]) ? max : fabsf(xb[i]);
        if (max < GROUP_MAX_EPS_IQ1_M) {
            scales[ib] = 0;
            shifts[ib] = 0;
            continue;
        }
        sort_order(xb, 16, idx);
        float best_score = -FLT_MAX, scale = max;
        int besti1 = -1, besti2 = -1, best_k = -1;
        /* k: 0 both halves +, 1 first + second -, 2 first - second +, 3 both -. With v0 - v1 = v1 - v2 = -1 for
         * either shift, a split's sum of q x per half is T v2 - px[i1] - px[i2] */
        float px[2][17], pw[2][17];
        px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0;
        for (int j = 0; j < 16; j++) {
            const int i = idx[j], h = i < 8 ? 0 : 1;
            px[h][j + 1] = px[h][j] + weight[i] * xb[i];
            px[1 - h][j + 1] = px[1 - h][j];
            pw[h][j + 1] = pw[h][j] + weight[i];
            pw[1 - h][j + 1] = pw[1 - h][j];
        }
        const float txs[2] = {px[0][16], px[1][16]}, tws[2] = {pw[0][16], pw[1][16]};
        const float p2 = x_p[2], m2 = x_m[2];
        const float cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1], cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2];
        const float cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1], cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2];
        for (int i1 = 0; i1 <= 16; i1++) {
            for (int i2 = i1; i2 <= 16; i2++) {
                float qx_p[2], qx_m[2], q2_p[2], q2_m[2];
                for (int h = 0; h < 2; h++) {
                    const float sx = px[h][i1] + px[h][i2];
                    qx_p[h] = txs[h] * p2 - sx;
                    qx_m[h] = txs[h] * m2 - sx;
                    q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                    q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
                }
                sumqx[0] = qx_p[0] + qx_p[1];
                sumqx[1] = qx_p[0] + qx_m[1];
                sumqx[2] = qx_m[0] + qx_p[1];
                sumqx[3] = qx_m[0] + qx_m[1];
                sumq2[0] = q2_p[0] + q2_p[1];
                sumq2[1] = q2_p[0] + q2_m[1];
                sumq2[2] = q2_m[0] + q2_p[1];
                sumq2[3] = q2_m[0] + q2_m[1];
                for (int k = 0; k < 4; k++) {
                    if (sumq2[k] > 0 && sumqx[k] * sumqx[k] > best_score * sumq2[k]) {
                        scale = sumqx[k] / sumq2[k];
                        best_score = scale * sumqx[k];
                        besti1 = i1, besti2 = i2, best_k = k;
                    }
                }
            }
        }
        if (besti1 < 0 || besti2 < 0 || best_k < 0) {
            scales[ib] = 0;
            shifts[ib] = 0;
            continue;
        }
        for (int j = 0; j < 16; j++)
            L[idx[j]] = (int8_t)(j < besti1 ? 0 : j < besti2 ? 1 : 2);
        if (scale < 0) {
            for (int j = 0; j < 16; j++)
                L[j] = (int8_t)(2 - L[j]);
            scale = -scale;
            best_k = 3 - best_k;
        }
        const float *xx[2] = {best_k < 2 ? x_p : x_m, best_k % 2 == 0 ? x_p : x_m};
        int all_on_grid = 1;
        for (int k = 0; k < 2; k++)
            all_on_grid &= iq1_index(lat, xb + 8 * k, weight + 8 * k, scale, xx[k], L + 8 * k, &index[k]);
        if (!all_on_grid) {
            float sqx = 0, sq2 = 0;
            for (int k = 0; k < 2; k++) {
                const int8_t *g = lat->pos + 8 * index[k];
                for (int j = 0; j < 8; j++) {
                    float w = weight[8 * k + j];
                    float q = xx[k][(g[j] - 1) / 2];
                    sqx += w * q * xb[8 * k + j];
                    sq2 += w * q * q;
                }
            }
            if (sqx > 0 && sq2 > 0)
                scale = sqx / sq2;
        }
        y->qs[2 * ib] = (uint8_t)(index[0] & 255);
        y->qs[2 * ib + 1] = (uint8_t)(index[1] & 255);
        y->qh[ib] = (uint8_t)((index[0] >> 8) | ((index[1] >> 8) << 4));
        scales[ib] = scale;
        shifts[ib] = (int8_t)best_k;
        max_scale = max_scale > scale ? max_scale : scale;
    }
    if (!max_scale)
        return;
    uint16_t sc[4] = {0, 0, 0, 0};
    float d = max_scale / 15;
    float id = 1 / d;
    float sqx = 0, sq2 = 0;
    for (int ib = 0; ib < QK_K / 16; ib++) {
        int l = fl_clampi(fl_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 7);
        sc[ib / 4] |= (uint16_t)(l << (3 * (ib % 4)));
        y->qh[ib] |= masks[shifts[ib]];
        const float *xb = x + 16 * ib;
        for (int i = 0; i < 16; i++)
            weight[i] = qw ? qw[16 * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]) : xb[i] * xb[i];
        for (int k = 0; k < 2; k++) {
            const float *xx = k == 0 ? (shifts[ib] < 2 ? x_p : x_m) : (shifts[ib] % 2 == 0 ? x_p : x_m);
            const int8_t *g = lat->pos + 8 * iq1_m_index(y, 2 * ib + k);
            for (int j = 0; j < 8; j++) {
                float w = weight[8 * k + j];
                float q = xx[(g[j] - 1) / 2] * (2 * l + 1);
                sqx += w * q * xb[8 * k + j];
                sq2 += w * q * q;
            }
        }
    }
    if (sq2 > 0)
        d = sqx / sq2;
    const fl_half h = fl_fp32_to_fp16(d * 1.1125f);
    sc[0] |= (uint16_t)((h & 0x000f) << 12);
    sc[1] |= (uint16_t)((h & 0x00f0) << 8);
    sc[2] |= (uint16_t)((h & 0x0f00) << 4);
    sc[3] |= (uint16_t)(h & 0xf000);
    memcpy(y->scales, sc, sizeof(sc));
}

/* ggml only quantizes IQ1_S with an importance matrix (ggml_quantize_requires_imatrix; its ggml_quantize_chunk
 * asserts one is given): without, this runs its search with every importance 1 */
void fl_quantize_iq1_s(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    fl_lattice_quantize_rows(FL_LATTICE_IQ1S, quantize_block_iq1_s, sizeof(block_iq1_s), src, dst, n_rows, n_per_row,
                             importance);
}

void fl_quantize_row_iq1_s_ref(const float *src, void *dst, int64_t n) {
    fl_quantize_iq1_s(src, dst, 1, n, NULL);
}

/* IQ1_M is not among ggml_quantize_requires_imatrix's types (it is commented out there): ggml_quantize_chunk
 * without an importance matrix runs quantize_iq1_m with error weights x^2, and so does this. (llama.cpp's
 * quantize tool refuses IQ1_M without an imatrix, but that is the tool's rule, not the format's.) */
void fl_quantize_iq1_m(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    fl_lattice_quantize_rows(FL_LATTICE_IQ1S, quantize_block_iq1_m, sizeof(block_iq1_m), src, dst, n_rows, n_per_row,
                             importance);
}

void fl_quantize_row_iq1_m_ref(const float *src, void *dst, int64_t n) {
    fl_quantize_iq1_m(src, dst, 1, n, NULL);
}

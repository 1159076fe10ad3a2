/* quant_k.c: the k-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (super-blocks of 256 with quantized sub-block scales),
 * paired with Q8_K activations. The quantizers are ggml's: quantize_row_*_ref, and quantize_* with an importance
 * vector (fl_quantize_<t>), kept in ggml's order of float operations so that files match what llama.cpp writes;
 * the dequantizers are bit-exact with gguf-py. The scale searches here serve the legacy formats too. */
#include <math.h>
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

/* ---------------------------------------------------------------- scale searches */

/* Asymmetric n-value quantization of x[0..n) to L in 0..nmax: x ~ scale * L - the_min.
 * Starts from the min/max grid, then tries nstep+1 stretched grids, each refit by weighted least squares
 * for scale and min, keeping the one with the least weighted error (absolute when use_mad). */
static float make_qkx2_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L, float *the_min,
                              uint8_t *Laux, float rmin, float rdelta, int nstep, int use_mad) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min)
            min = x[i];
        if (x[i] > max)
            max = x[i];
        float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0)
        min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; i++) {
        int l = fl_nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)fl_clampi(l, 0, nmax);
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_error += weights[i] * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = fl_clampi(fl_nearest_int(iscale * (x[i] - min)), 0, nmax);
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                cur_error += weights[i] * diff;
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* Symmetric quantization of x[0..n) to L in 0..2*nmax-1 (stored with +nmax): x ~ scale * (L - nmax).
 * The largest magnitude maps to -nmax; 18 nearby scales are tried and the one with the best weighted
 * least-squares fit wins, weights qw or, without them, x^2 (ggml's make_qx_quants with rmse_type 1). */
float fl_make_qx_quants(int n, int nmax, const float *x, int8_t *L, const float *qw) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = fl_clampi(fl_nearest_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)(l + nmax);
        float w = qw ? qw[i] : x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0)
            continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = fl_clampi(fl_nearest_int(iscale * x[i]), -nmax, nmax - 1);
            float w = qw ? qw[i] : x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++)
                L[i] = (int8_t)(nmax + fl_clampi(fl_nearest_int(iscale * x[i]), -nmax, nmax - 1));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Symmetric quantization to L in 0..2*nmax-1 for q3_K's reference: the max-magnitude grid, then up to 5 sweeps
 * that move single values to the level that improves the x^2-weighted fit (ggml's make_q3_quants). */
static float make_q3_quants(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = fl_clampi(fl_nearest_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int n_changed = 0;
        for (int i = 0; i < n; i++) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int new_l = fl_clampi(fl_nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed++;
                    }
                }
            }
        }
        if (!n_changed)
            break;
    }
    for (int i = 0; i < n; i++)
        L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* The asymmetric search of the importance-weighted quantizers (ggml's make_qkx3_quants as they all call it:
 * 37 stretched grids from rmin -0.9 in steps of 0.05, squared error): x ~ scale * L - the_min, L in 0..nmax. */
float fl_make_qkx3_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L, float *the_min,
                          uint8_t *Laux) {
    const float rmin = -0.9f, rdelta = 0.05f;
    const int nstep = 36;
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min)
            min = x[i];
        if (x[i] > max)
            max = x[i];
        float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0)
        min = 0;
    if (max <= min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; i++) {
        int l = fl_nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)fl_clampi(l, 0, nmax);
        float diff = scale * L[i] + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = fl_clampi(fl_nearest_int(iscale * (x[i] - min)), 0, nmax);
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* Quantizes the n positive sub-block scales (or mins) x to L in 0..nmax against one super-block scale, the
 * returned value: 9 grids around nmax/max scored by qw-weighted squared error, then up to 5 sweeps moving single
 * levels to improve the weighted fit (ggml's make_qp_quants). L stays uint8 as in ggml, wrapping where a level
 * comes out negative, since the packing that follows depends on those bits. */
float fl_make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0;
    for (int i = 0; i < n; i++)
        max = max > x[i] ? max : x[i];
    if (max < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; i++)
        L[i] = (uint8_t)fl_nearest_int(iscale * x[i]);
    float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; i++) {
        float diff = x[i] - scale * L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; is++) {
        if (is == 0)
            continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; i++) {
            int l = fl_nearest_int(iscale_is * x[i]);
            l = l < nmax ? l : nmax;
            float diff = x[i] - scale_is * l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = fl_nearest_int(iscale * x[i]);
        l = l < nmax ? l : nmax;
        L[i] = (uint8_t)l;
        float w = qw[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int n_changed = 0;
        for (int i = 0; i < n; i++) {
            float w = qw[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = fl_nearest_int(x[i] * sl2 / slx);
                new_l = new_l < nmax ? new_l : nmax;
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed++;
                    }
                }
            }
        }
        if (!n_changed)
            break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* sum of squares of a super-block, the base of the importance weights qw * sqrt(sigma2 + x^2) */
static float sum_squares(const float *x, int n) {
    float s = 0;
    for (int i = 0; i < n; i++)
        s += x[i] * x[i];
    return s;
}

/* ---------------------------------------------------------------- Q2_K */
void fl_dequantize_row_q2_K(const void *src, float *dst, int64_t n) {
    const block_q2_K *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        const float min = fl_fp16_to_fp32(x[i].dmin);
        const uint8_t *q = x[i].qs;
        int is = 0;
        for (int half = 0; half < QK_K; half += 128) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int part = 0; part < 32; part += 16) {
                    uint8_t sc = x[i].scales[is++];
                    const float dl = d * (sc & 0xF), ml = min * (sc >> 4);
                    for (int l = 0; l < 16; l++)
                        *y++ = dl * ((q[part + l] >> shift) & 3) - ml;
                }
            }
            q += 32;
        }
    }
}

/* Requantizes every value against the rounded scales and mins, which is what dequantization will use, and packs
 * the 2-bit levels; L holds the first pass's levels, kept where a sub-block's scale rounded to zero. */
static void finish_q2_K(const float *x, uint8_t *L, block_q2_K *y) {
    const float dh = fl_fp16_to_fp32(y->d), mh = fl_fp16_to_fp32(y->dmin);
    for (int j = 0; j < QK_K / 16; j++) {
        const float d = dh * (y->scales[j] & 0xF);
        if (!d)
            continue;
        const float dm = mh * (y->scales[j] >> 4);
        for (int l = 0; l < 16; l++)
            L[16 * j + l] = (uint8_t)fl_clampi(fl_nearest_int((x[16 * j + l] + dm) / d), 0, 3);
    }
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; l++)
            y->qs[j / 4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6);
}

void fl_quantize_row_q2_K_ref(const float *src, void *dst, int64_t n) {
    block_q2_K *y = dst;
    uint8_t L[QK_K], Laux[16];
    float weights[16], mins[QK_K / 16], scales[QK_K / 16];
    const float q4scale = 15.f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float *x = src + i * QK_K;
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < QK_K / 16; j++) {
            for (int l = 0; l < 16; l++)
                weights[l] = fabsf(x[16 * j + l]);
            scales[j] = make_qkx2_quants(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, 1);
            if (scales[j] > max_scale)
                max_scale = scales[j];
            if (mins[j] > max_min)
                max_min = mins[j];
        }
        if (max_scale > 0) {
            float iscale = q4scale / max_scale;
            for (int j = 0; j < QK_K / 16; j++)
                y[i].scales[j] = (uint8_t)fl_nearest_int(iscale * scales[j]);
            y[i].d = fl_fp32_to_fp16(max_scale / q4scale);
        } else {
            memset(y[i].scales, 0, sizeof(y[i].scales));
            y[i].d = fl_fp32_to_fp16(0.f);
        }
        if (max_min > 0) {
            float iscale = q4scale / max_min;
            for (int j = 0; j < QK_K / 16; j++)
                y[i].scales[j] |= (uint8_t)((unsigned)fl_nearest_int(iscale * mins[j]) << 4);
            y[i].dmin = fl_fp32_to_fp16(max_min / q4scale);
        } else {
            y[i].dmin = fl_fp32_to_fp16(0.f);
        }
        finish_q2_K(x, L, &y[i]);
    }
}

/* One super-block with importance qw (ggml's quantize_row_q2_K_impl): each sub-block of 16 fit by the weighted
 * asymmetric search, weights qw * sqrt(mean x^2 + x^2); the 4-bit scales and mins then fit as a set, each
 * sub-block counting by its total weight. */
static void quantize_block_q2_K_weighted(const float *x, const float *qw, void *dst) {
    block_q2_K *y = dst;
    uint8_t L[QK_K], Laux[16], Ls[QK_K / 16], Lm[QK_K / 16];
    float weight[16], sw[QK_K / 16], mins[QK_K / 16], scales[QK_K / 16];
    const float sigma2 = sum_squares(x, QK_K) / QK_K;
    for (int j = 0; j < QK_K / 16; j++) {
        sw[j] = 0;
        for (int l = 0; l < 16; l++)
            weight[l] = qw[16 * j + l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
        for (int l = 0; l < 16; l++)
            sw[j] += weight[l];
        scales[j] = fl_make_qkx3_quants(16, 3, x + 16 * j, weight, L + 16 * j, &mins[j], Laux);
    }
    y->d = fl_fp32_to_fp16(fl_make_qp_quants(QK_K / 16, 15, scales, Ls, sw));
    y->dmin = fl_fp32_to_fp16(fl_make_qp_quants(QK_K / 16, 15, mins, Lm, sw));
    for (int j = 0; j < QK_K / 16; j++)
        y->scales[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
    finish_q2_K(x, L, y);
}

/* ggml's quantize_<type> for the k-quants: the reference quantizer without importance, else the weighted search
 * block by block, importance indexed by the position in the row */
static void quantize_k_rows(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance,
                            size_t block_bytes, void (*ref)(const float *, void *, int64_t),
                            void (*weighted)(const float *, const float *, void *)) {
    if (!importance) {
        ref(src, dst, n_rows * n_per_row);
        return;
    }
    uint8_t *y = dst;
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t b = 0; b < n_per_row / QK_K; b++, y += block_bytes)
            weighted(src + r * n_per_row + b * QK_K, importance + b * QK_K, y);
}

void fl_quantize_q2_K(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    quantize_k_rows(src, dst, n_rows, n_per_row, importance, sizeof(block_q2_K), fl_quantize_row_q2_K_ref,
                    quantize_block_q2_K_weighted);
}

void fl_vec_dot_q2_K_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q2_K *x = vx;
    const block_q8_K *y = vy;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *q2 = x[i].qs;
        const int8_t *q8 = y[i].qs;
        const uint8_t *sc = x[i].scales;
        int summs = 0;
        for (int j = 0; j < 16; j++)
            summs += y[i].bsums[j] * (sc[j] >> 4);
        const float dall = y[i].d * fl_fp16_to_fp32(x[i].d);
        const float dmin = y[i].d * fl_fp16_to_fp32(x[i].dmin);
        int isum = 0, is = 0;
        for (int half = 0; half < QK_K / 128; half++) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int part = 0; part < 32; part += 16) {
                    int isuml = 0;
                    for (int l = part; l < part + 16; l++)
                        isuml += q8[l] * ((q2[l] >> shift) & 3);
                    isum += (sc[is++] & 0xF) * isuml;
                }
                q8 += 32;
            }
            q2 += 32;
        }
        sumf += dall * isum - dmin * summs;
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- Q3_K */

/* code l (0..63) of scale j into the packed bytes, which start zeroed */
static void pack_scale_q3_K(uint8_t *packed, int j, int l) {
    if (j < 8)
        packed[j] = (uint8_t)(l & 0xF);
    else
        packed[j - 8] |= (uint8_t)((l & 0xF) << 4);
    packed[8 + j % 4] |= (uint8_t)((unsigned)(l >> 4) << (2 * (j / 4)));
}

void fl_dequantize_row_q3_K(const void *src, float *dst, int64_t n) {
    const block_q3_K *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        int sc[QK_K / 16];
        fl_unpack_scales_q3_K(x[i].scales, sc);
        const uint8_t *q = x[i].qs;
        const uint8_t *hm = x[i].hmask;
        uint8_t m = 1;
        int is = 0;
        for (int half = 0; half < QK_K; half += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                for (int part = 0; part < 32; part += 16) {
                    const float dl = d * sc[is++];
                    for (int l = part; l < part + 16; l++)
                        *y++ = dl * (((q[l] >> shift) & 3) - (hm[l] & m ? 0 : 4));
                }
            }
        }
    }
}

/* Requantizes every value against the rounded scales and packs it: the high bit of value j goes to bit j / 32
 * of hmask[j % 32], the low two as in q2_K. L holds the first pass's levels (0..7), kept where a scale is 0. */
static void finish_q3_K(const float *x, int8_t *L, block_q3_K *y) {
    int sc[QK_K / 16];
    fl_unpack_scales_q3_K(y->scales, sc);
    const float dh = fl_fp16_to_fp32(y->d);
    for (int j = 0; j < QK_K / 16; j++) {
        const float d = dh * sc[j];
        if (!d)
            continue;
        for (int l = 0; l < 16; l++)
            L[16 * j + l] = (int8_t)(fl_clampi(fl_nearest_int(x[16 * j + l] / d), -4, 3) + 4);
    }
    memset(y->hmask, 0, sizeof(y->hmask));
    for (int j = 0; j < QK_K; j++) {
        if (L[j] > 3) {
            y->hmask[j % (QK_K / 8)] |= (uint8_t)(1u << (j / (QK_K / 8)));
            L[j] -= 4;
        }
    }
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; l++)
            y->qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

void fl_quantize_row_q3_K_ref(const float *src, void *dst, int64_t n) {
    block_q3_K *y = dst;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float *x = src + i * QK_K;
        float max_scale = 0, amax = 0;
        for (int j = 0; j < QK_K / 16; j++) {
            scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
            if (fabsf(scales[j]) > amax) {
                amax = fabsf(scales[j]);
                max_scale = scales[j];
            }
        }
        memset(y[i].scales, 0, sizeof(y[i].scales));
        if (max_scale) {
            /* the scale of largest magnitude maps to code -32; ggml keeps the rounded code in an int8 */
            const float iscale = -32.f / max_scale;
            for (int j = 0; j < QK_K / 16; j++) {
                int l = (int8_t)(uint8_t)fl_nearest_int(iscale * scales[j]);
                pack_scale_q3_K(y[i].scales, j, fl_clampi(l, -32, 31) + 32);
            }
            y[i].d = fl_fp32_to_fp16(1 / iscale);
        } else {
            y[i].d = fl_fp32_to_fp16(0.f);
        }
        finish_q3_K(x, L, &y[i]);
    }
}

/* One super-block with importance qw (ggml's quantize_row_q3_K_impl): each sub-block of 16 by the weighted
 * symmetric search, weights qw * sqrt(2 mean x^2 + x^2); the 6-bit scales by the same search over the set,
 * each weighted by its sub-block's total weight. */
static void quantize_block_q3_K_weighted(const float *x, const float *qw, void *dst) {
    block_q3_K *y = dst;
    int8_t L[QK_K], Ls[QK_K / 16];
    float weight[16], sw[QK_K / 16], scales[QK_K / 16];
    const float sigma2 = 2 * sum_squares(x, QK_K) / QK_K;
    for (int j = 0; j < QK_K / 16; j++) {
        for (int l = 0; l < 16; l++)
            weight[l] = qw[16 * j + l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
        float sumw = 0;
        for (int l = 0; l < 16; l++)
            sumw += weight[l];
        sw[j] = sumw;
        scales[j] = fl_make_qx_quants(16, 4, x + 16 * j, L + 16 * j, weight);
    }
    memset(y->scales, 0, sizeof(y->scales));
    const float d_block = fl_make_qx_quants(QK_K / 16, 32, scales, Ls, sw);
    for (int j = 0; j < QK_K / 16; j++)
        pack_scale_q3_K(y->scales, j, Ls[j]);
    y->d = fl_fp32_to_fp16(d_block);
    finish_q3_K(x, L, y);
}

void fl_quantize_q3_K(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    quantize_k_rows(src, dst, n_rows, n_per_row, importance, sizeof(block_q3_K), fl_quantize_row_q3_K_ref,
                    quantize_block_q3_K_weighted);
}

/* ggml's generic q3_K dot: widen the 3-bit values to int8, accumulate each group of 8 lanes per sub-block scale */
void fl_vec_dot_q3_K_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q3_K *x = vx;
    const block_q8_K *y = vy;
    int8_t aux8[QK_K];
    float sums[8] = {0};
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *q3 = x[i].qs;
        const uint8_t *hm = x[i].hmask;
        int8_t *a = aux8;
        uint8_t m = 1;
        for (int j = 0; j < QK_K; j += 128, q3 += 32)
            for (int shift = 0; shift < 8; shift += 2, m <<= 1, a += 32)
                for (int l = 0; l < 32; l++)
                    a[l] = (int8_t)(((q3[l] >> shift) & 3) - (hm[l] & m ? 0 : 4));
        int sc[QK_K / 16];
        fl_unpack_scales_q3_K(x[i].scales, sc);
        int32_t aux32[8] = {0};
        const int8_t *q8 = y[i].qs;
        a = aux8;
        for (int j = 0; j < QK_K / 16; j++)
            for (int k = 0; k < 16; k += 8, q8 += 8, a += 8)
                for (int l = 0; l < 8; l++)
                    aux32[l] += sc[j] * (int16_t)(q8[l] * a[l]);
        const float d = fl_fp16_to_fp32(x[i].d) * y[i].d;
        for (int l = 0; l < 8; l++)
            sums[l] += d * aux32[l];
    }
    float sumf = 0;
    for (int l = 0; l < 8; l++)
        sumf += sums[l];
    *s = sumf;
}

/* ---------------------------------------------------------------- Q4_K and Q5_K share their scales */

/* The 8 sub-block scale codes ls and min codes lm of a q4_K/q5_K block packed into 12 bytes. Codes are 0..63;
 * a larger one (q4_K's weighted search does not clamp them, as in ggml) spills into the neighbouring bits
 * exactly as ggml's packing lets it. */
static void pack_scales_k4(uint8_t *packed, const uint8_t *ls, const uint8_t *lm) {
    for (int j = 0; j < QK_K / 32; j++) {
        if (j < 4) {
            packed[j] = ls[j];
            packed[j + 4] = lm[j];
        } else {
            packed[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            packed[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            packed[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
}

/* Requantizes every value against the rounded scales and mins, which is what dequantization will use; L holds
 * the first pass's levels, kept where a sub-block's scale rounded to zero. */
static void requantize_k4(const float *x, int nmax, const uint8_t *packed, fl_half dh, fl_half dmh, uint8_t *L) {
    for (int j = 0; j < QK_K / 32; j++) {
        uint8_t sc, m;
        fl_get_scale_min_k4(j, packed, &sc, &m);
        const float d = fl_fp16_to_fp32(dh) * sc;
        if (!d)
            continue;
        const float dm = fl_fp16_to_fp32(dmh) * m;
        for (int l = 0; l < 32; l++)
            L[32 * j + l] = (uint8_t)fl_clampi(fl_nearest_int((x[32 * j + l] + dm) / d), 0, nmax);
    }
}

/* First pass of q4_K/q5_K's reference: per sub-block of 32, a weighted asymmetric fit (weights sqrt(mean x^2) +
 * |x|); the scales and mins become codes against the largest of each, then every value is requantized. */
static void quantize_block_k4(const float *x, int nmax, float rmin, int nstep, uint8_t *packed, fl_half *dh,
                              fl_half *dmh, uint8_t *L) {
    uint8_t Laux[32], ls[QK_K / 32], lm[QK_K / 32];
    float weights[32], mins[QK_K / 32], scales[QK_K / 32];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; j++) {
        float av_x = sqrtf(sum_squares(x + 32 * j, 32) / 32);
        for (int l = 0; l < 32; l++)
            weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f, nstep, 0);
        if (scales[j] > max_scale)
            max_scale = scales[j];
        if (mins[j] > max_min)
            max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / 32; j++) {
        ls[j] = (uint8_t)fl_nearest_int(inv_scale * scales[j]);
        lm[j] = (uint8_t)fl_nearest_int(inv_min * mins[j]);
        ls[j] = ls[j] < 63 ? ls[j] : 63;
        lm[j] = lm[j] < 63 ? lm[j] : 63;
    }
    pack_scales_k4(packed, ls, lm);
    *dh = fl_fp32_to_fp16(max_scale / 63.f);
    *dmh = fl_fp32_to_fp16(max_min / 63.f);
    requantize_k4(x, nmax, packed, *dh, *dmh, L);
}

/* The same with importance qw (ggml's quantize_row_q4_K_impl / q5_K_impl): weights qw * sqrt(2 mean x^2 + x^2)
 * over the super-block, the wider search per sub-block, and the 6-bit scales and mins fit as sets, each
 * sub-block counting by its total weight. clamp63: q5_K clamps the codes to 63, q4_K does not. */
static void quantize_block_k4_weighted(const float *x, const float *qw, int nmax, int clamp63, uint8_t *packed,
                                       fl_half *dh, fl_half *dmh, uint8_t *L) {
    uint8_t Laux[32], ls[QK_K / 32], lm[QK_K / 32];
    float weights[32], sw[QK_K / 32], mins[QK_K / 32], scales[QK_K / 32];
    const float sigma2 = 2 * sum_squares(x, QK_K) / QK_K;
    for (int j = 0; j < QK_K / 32; j++) {
        for (int l = 0; l < 32; l++)
            weights[l] = qw[32 * j + l] * sqrtf(sigma2 + x[32 * j + l] * x[32 * j + l]);
        float sumw = 0;
        for (int l = 0; l < 32; l++)
            sumw += weights[l];
        sw[j] = sumw;
        scales[j] = fl_make_qkx3_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux);
    }
    const float d_block = fl_make_qp_quants(QK_K / 32, 63, scales, ls, sw);
    const float m_block = fl_make_qp_quants(QK_K / 32, 63, mins, lm, sw);
    if (clamp63) {
        for (int j = 0; j < QK_K / 32; j++) {
            ls[j] = ls[j] < 63 ? ls[j] : 63;
            lm[j] = lm[j] < 63 ? lm[j] : 63;
        }
    }
    pack_scales_k4(packed, ls, lm);
    *dh = fl_fp32_to_fp16(d_block);
    *dmh = fl_fp32_to_fp16(m_block);
    requantize_k4(x, nmax, packed, *dh, *dmh, L);
}

/* ggml's generic k4 dot: widen the quants to int8, accumulate per sub-block scale, subtract the mins through bsums */
static float dot_k4_block(const int8_t *a, const uint8_t *packed, const block_q8_K *y, fl_half dh, fl_half dmh,
                          float *sums) {
    uint8_t scales[8], mins[8];
    for (int j = 0; j < 8; j++)
        fl_get_scale_min_k4(j, packed, &scales[j], &mins[j]);
    int sumi = 0;
    for (int j = 0; j < QK_K / 16; j++)
        sumi += y->bsums[j] * mins[j / 2];
    int32_t aux32[8] = {0};
    const int8_t *q8 = y->qs;
    for (int j = 0; j < QK_K / 32; j++)
        for (int k = 0; k < 32; k += 8, q8 += 8, a += 8)
            for (int l = 0; l < 8; l++)
                aux32[l] += scales[j] * (int16_t)(q8[l] * a[l]);
    const float d = fl_fp16_to_fp32(dh) * y->d;
    for (int l = 0; l < 8; l++)
        sums[l] += d * aux32[l];
    return fl_fp16_to_fp32(dmh) * y->d * sumi;
}

/* ---------------------------------------------------------------- Q4_K */
void fl_dequantize_row_q4_K(const void *src, float *dst, int64_t n) {
    const block_q4_K *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        const float min = fl_fp16_to_fp32(x[i].dmin);
        const uint8_t *q = x[i].qs;
        for (int j = 0; j < QK_K / 32; j += 2, q += 32) {
            uint8_t sc, m;
            fl_get_scale_min_k4(j, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            fl_get_scale_min_k4(j + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (q[l] >> 4) - m2;
        }
    }
}

/* 4-bit levels: sub-blocks 2k and 2k+1 share 32 bytes, low and high nibbles */
static void pack_q4_K(const uint8_t *L, block_q4_K *y) {
    uint8_t *q = y->qs;
    for (int j = 0; j < QK_K; j += 64, q += 32)
        for (int l = 0; l < 32; l++)
            q[l] = L[j + l] | (L[j + l + 32] << 4);
}

void fl_quantize_row_q4_K_ref(const float *src, void *dst, int64_t n) {
    block_q4_K *y = dst;
    uint8_t L[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        quantize_block_k4(src + i * QK_K, 15, -1.f, 20, y[i].scales, &y[i].d, &y[i].dmin, L);
        pack_q4_K(L, &y[i]);
    }
}

static void quantize_block_q4_K_weighted(const float *x, const float *qw, void *dst) {
    block_q4_K *y = dst;
    uint8_t L[QK_K];
    quantize_block_k4_weighted(x, qw, 15, 0, y->scales, &y->d, &y->dmin, L);
    pack_q4_K(L, y);
}

void fl_quantize_q4_K(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    quantize_k_rows(src, dst, n_rows, n_per_row, importance, sizeof(block_q4_K), fl_quantize_row_q4_K_ref,
                    quantize_block_q4_K_weighted);
}

void fl_vec_dot_q4_K_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q4_K *x = vx;
    const block_q8_K *y = vy;
    int8_t aux8[QK_K];
    float sums[8] = {0};
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *q4 = x[i].qs;
        int8_t *a = aux8;
        for (int j = 0; j < QK_K / 64; j++, q4 += 32) {
            for (int l = 0; l < 32; l++)
                *a++ = (int8_t)(q4[l] & 0xF);
            for (int l = 0; l < 32; l++)
                *a++ = (int8_t)(q4[l] >> 4);
        }
        sumf -= dot_k4_block(aux8, x[i].scales, &y[i], x[i].d, x[i].dmin, sums);
    }
    for (int l = 0; l < 8; l++)
        sumf += sums[l];
    *s = sumf;
}

/* ---------------------------------------------------------------- Q5_K */
void fl_dequantize_row_q5_K(const void *src, float *dst, int64_t n) {
    const block_q5_K *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        const float min = fl_fp16_to_fp32(x[i].dmin);
        const uint8_t *ql = x[i].qs;
        const uint8_t *qh = x[i].qh;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0; j < QK_K / 32; j += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
            uint8_t sc, m;
            fl_get_scale_min_k4(j, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            fl_get_scale_min_k4(j + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
    }
}

/* 5-bit levels: the low nibbles as in q4_K, the fifth bit of value 64k + l at bit 2k of qh[l], of 64k + 32 + l
 * at bit 2k + 1 */
static void pack_q5_K(const uint8_t *L, block_q5_K *y) {
    uint8_t *qh = y->qh;
    uint8_t *ql = y->qs;
    memset(qh, 0, QK_K / 8);
    uint8_t m1 = 1, m2 = 2;
    for (int j = 0; j < QK_K; j += 64, ql += 32, m1 <<= 2, m2 <<= 2) {
        for (int l = 0; l < 32; l++) {
            int l1 = L[j + l], l2 = L[j + l + 32];
            if (l1 > 15) {
                l1 -= 16;
                qh[l] |= m1;
            }
            if (l2 > 15) {
                l2 -= 16;
                qh[l] |= m2;
            }
            ql[l] = (uint8_t)(l1 | (l2 << 4));
        }
    }
}

void fl_quantize_row_q5_K_ref(const float *src, void *dst, int64_t n) {
    block_q5_K *y = dst;
    uint8_t L[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        quantize_block_k4(src + i * QK_K, 31, -0.5f, 15, y[i].scales, &y[i].d, &y[i].dmin, L);
        pack_q5_K(L, &y[i]);
    }
}

static void quantize_block_q5_K_weighted(const float *x, const float *qw, void *dst) {
    block_q5_K *y = dst;
    uint8_t L[QK_K];
    quantize_block_k4_weighted(x, qw, 31, 1, y->scales, &y->d, &y->dmin, L);
    pack_q5_K(L, y);
}

void fl_quantize_q5_K(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    quantize_k_rows(src, dst, n_rows, n_per_row, importance, sizeof(block_q5_K), fl_quantize_row_q5_K_ref,
                    quantize_block_q5_K_weighted);
}

void fl_vec_dot_q5_K_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q5_K *x = vx;
    const block_q8_K *y = vy;
    int8_t aux8[QK_K];
    float sums[8] = {0};
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *q4 = x[i].qs;
        const uint8_t *hm = x[i].qh;
        int8_t *a = aux8;
        uint8_t m = 1;
        for (int j = 0; j < QK_K / 64; j++, q4 += 32) {
            for (int l = 0; l < 32; l++)
                *a++ = (int8_t)((q4[l] & 0xF) + (hm[l] & m ? 16 : 0));
            m <<= 1;
            for (int l = 0; l < 32; l++)
                *a++ = (int8_t)((q4[l] >> 4) + (hm[l] & m ? 16 : 0));
            m <<= 1;
        }
        sumf -= dot_k4_block(aux8, x[i].scales, &y[i], x[i].d, x[i].dmin, sums);
    }
    for (int l = 0; l < 8; l++)
        sumf += sums[l];
    *s = sumf;
}

/* ---------------------------------------------------------------- Q6_K */
void fl_dequantize_row_q6_K(const void *src, float *dst, int64_t n) {
    const block_q6_K *x = src;
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        const uint8_t *ql = x[i].ql;
        const uint8_t *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        for (int half = 0; half < QK_K; half += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

/* One q6_K block: each sub-block of 16 by the symmetric search, weighted by qw or, without it, by x^2 (ggml's
 * reference and its quantize_row_q6_K_impl differ in nothing else); the int8 scales map the largest to -128. */
static void quantize_block_q6_K(const float *x, const float *qw, block_q6_K *y) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < QK_K / 16; ib++) {
        scales[ib] = fl_make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib, qw ? qw + 16 * ib : NULL);
        if (fabsf(scales[ib]) > max_abs_scale) {
            max_abs_scale = fabsf(scales[ib]);
            max_scale = scales[ib];
        }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {
        memset(y, 0, sizeof(*y));
        return;
    }
    float iscale = -128.f / max_scale;
    y->d = fl_fp32_to_fp16(1 / iscale);
    for (int ib = 0; ib < QK_K / 16; ib++) {
        int l = fl_nearest_int(iscale * scales[ib]);
        y->scales[ib] = (int8_t)(l < 127 ? l : 127);
    }
    for (int j = 0; j < QK_K / 16; j++) {
        const float d = fl_fp16_to_fp32(y->d) * y->scales[j];
        if (!d)
            continue;
        for (int l = 0; l < 16; l++)
            L[16 * j + l] = (int8_t)(fl_clampi(fl_nearest_int(x[16 * j + l] / d), -32, 31) + 32);
    }
    uint8_t *ql = y->ql;
    uint8_t *qh = y->qh;
    for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
        for (int l = 0; l < 32; l++) {
            const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF;
            const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
            ql[l] = q1 | (uint8_t)(q3 << 4);
            ql[l + 32] = q2 | (uint8_t)(q4 << 4);
            qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                              ((L[j + l + 96] >> 4) << 6));
        }
    }
}

void fl_quantize_row_q6_K_ref(const float *src, void *dst, int64_t n) {
    block_q6_K *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++)
        quantize_block_q6_K(src + i * QK_K, NULL, &y[i]);
}

static void quantize_block_q6_K_weighted(const float *x, const float *qw, void *dst) {
    quantize_block_q6_K(x, qw, dst);
}

void fl_quantize_q6_K(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    quantize_k_rows(src, dst, n_rows, n_per_row, importance, sizeof(block_q6_K), fl_quantize_row_q6_K_ref,
                    quantize_block_q6_K_weighted);
}

void fl_vec_dot_q6_K_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q6_K *x = vx;
    const block_q8_K *y = vy;
    int8_t aux8[QK_K];
    float sums[8] = {0};
    float sumf = 0;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *ql = x[i].ql;
        const uint8_t *qh = x[i].qh;
        int8_t *a = aux8;
        for (int j = 0; j < QK_K; j += 128, a += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; l++) {
                a[l] = (int8_t)(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
                a[l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                a[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                a[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
        }
        int32_t aux32[8] = {0};
        const int8_t *q8 = y[i].qs;
        a = aux8;
        for (int j = 0; j < QK_K / 16; j++)
            for (int k = 0; k < 16; k += 8, q8 += 8, a += 8)
                for (int l = 0; l < 8; l++)
                    aux32[l] += x[i].scales[j] * (int16_t)(q8[l] * a[l]);
        const float d = fl_fp16_to_fp32(x[i].d) * y[i].d;
        for (int l = 0; l < 8; l++)
            sums[l] += d * aux32[l];
    }
    for (int l = 0; l < 8; l++)
        sumf += sums[l];
    *s = sumf;
}

/* quant_iq.c: the i-quants IQ4_XS (non-linear 4-bit values, 6-bit sub-block scales) and IQ2_XXS (8 weights
 * from a 256-entry lattice grid plus 7 stored sign bits per 8), both paired with Q8_K activations. */
#include <float.h>
#include <math.h>
#include <pthread.h>
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

const int8_t fl_kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* byte j of entry i is the magnitude of weight j (0x08, 0x19 or 0x2b), for the grid index stored in qs */
const uint64_t fl_iq2xxs_grid[256] = {
    0x0808080808080808, 0x080808080808082b, 0x0808080808081919, 0x0808080808082b08,
    0x0808080808082b2b, 0x0808080808190819, 0x0808080808191908, 0x08080808082b0808,
    0x08080808082b082b, 0x08080808082b2b08, 0x08080808082b2b2b, 0x0808080819080819,
    0x0808080819081908, 0x0808080819190808, 0x0808080819192b08, 0x08080808192b0819,
    0x08080808192b1908, 0x080808082b080808, 0x080808082b08082b, 0x080808082b082b2b,
    0x080808082b2b082b, 0x0808081908080819, 0x0808081908081908, 0x0808081908190808,
    0x0808081908191919, 0x0808081919080808, 0x080808192b081908, 0x080808192b192b08,
    0x0808082b08080808, 0x0808082b0808082b, 0x0808082b082b082b, 0x0808082b2b08082b,
    0x0808190808080819, 0x0808190808081908, 0x0808190808190808, 0x08081908082b0819,
    0x08081908082b1908, 0x0808190819080808, 0x080819081908082b, 0x0808190819082b08,
    0x08081908192b0808, 0x080819082b080819, 0x080819082b081908, 0x080819082b190808,
    0x080819082b2b1908, 0x0808191908080808, 0x080819190808082b, 0x0808191908082b08,
    0x08081919082b0808, 0x080819191908192b, 0x08081919192b2b19, 0x080819192b080808,
    0x080819192b190819, 0x0808192b08082b19, 0x0808192b08190808, 0x0808192b19080808,
    0x0808192b2b081908, 0x0808192b2b2b1908, 0x08082b0808080808, 0x08082b0808081919,
    0x08082b0808082b08, 0x08082b0808191908, 0x08082b08082b2b08, 0x08082b0819080819,
    0x08082b0819081908, 0x08082b0819190808, 0x08082b081919082b, 0x08082b082b082b08,
    0x08082b1908081908, 0x08082b1919080808, 0x08082b2b0808082b, 0x08082b2b08191908,
    0x0819080808080819, 0x0819080808081908, 0x0819080808190808, 0x08190808082b0819,
    0x0819080819080808, 0x08190808192b0808, 0x081908082b081908, 0x081908082b190808,
    0x081908082b191919, 0x0819081908080808, 0x0819081908082b08, 0x08190819082b0808,
    0x0819081919190808, 0x0819081919192b2b, 0x081908192b080808, 0x0819082b082b1908,
    0x0819082b19081919, 0x0819190808080808, 0x0819190808082b08, 0x08191908082b0808,
    0x08191908082b1919, 0x0819190819082b19, 0x081919082b080808, 0x0819191908192b08,
    0x08191919192b082b, 0x0819192b08080808, 0x0819192b0819192b, 0x08192b0808080819,
    0x08192b0808081908, 0x08192b0808190808, 0x08192b0819080808, 0x08192b082b080819,
    0x08192b1908080808, 0x08192b1908081919, 0x08192b192b2b0808, 0x08192b2b19190819,
    0x082b080808080808, 0x082b08080808082b, 0x082b080808082b2b, 0x082b080819081908,
    0x082b0808192b0819, 0x082b08082b080808, 0x082b08082b08082b, 0x082b0819082b2b19,
    0x082b081919082b08, 0x082b082b08080808, 0x082b082b0808082b, 0x082b190808080819,
    0x082b190808081908, 0x082b190808190808, 0x082b190819080808, 0x082b19081919192b,
    0x082b191908080808, 0x082b191919080819, 0x082b1919192b1908, 0x082b192b2b190808,
    0x082b2b0808082b08, 0x082b2b08082b0808, 0x082b2b082b191908, 0x082b2b2b19081908,
    0x1908080808080819, 0x1908080808081908, 0x1908080808190808, 0x1908080808192b08,
    0x19080808082b0819, 0x19080808082b1908, 0x1908080819080808, 0x1908080819082b08,
    0x190808081919192b, 0x19080808192b0808, 0x190808082b080819, 0x190808082b081908,
    0x190808082b190808, 0x1908081908080808, 0x19080819082b0808, 0x19080819192b0819,
    0x190808192b080808, 0x190808192b081919, 0x1908082b08080819, 0x1908082b08190808,
    0x1908082b19082b08, 0x1908082b1919192b, 0x1908082b192b2b08, 0x1908190808080808,
    0x1908190808082b08, 0x19081908082b0808, 0x190819082b080808, 0x190819082b192b19,
    0x190819190819082b, 0x19081919082b1908, 0x1908192b08080808, 0x19082b0808080819,
    0x19082b0808081908, 0x19082b0808190808, 0x19082b0819080808, 0x19082b0819081919,
    0x19082b1908080808, 0x19082b1919192b08, 0x19082b19192b0819, 0x19082b192b08082b,
    0x19082b2b19081919, 0x19082b2b2b190808, 0x1919080808080808, 0x1919080808082b08,
    0x1919080808190819, 0x1919080808192b19, 0x19190808082b0808, 0x191908082b080808,
    0x191908082b082b08, 0x1919081908081908, 0x191908191908082b, 0x191908192b2b1908,
    0x1919082b2b190819, 0x191919082b190808, 0x191919082b19082b, 0x1919191908082b2b,
    0x1919192b08080819, 0x1919192b19191908, 0x19192b0808080808, 0x19192b0808190819,
    0x19192b0808192b19, 0x19192b08192b1908, 0x19192b1919080808, 0x19192b2b08082b08,
    0x192b080808081908, 0x192b080808190808, 0x192b080819080808, 0x192b0808192b2b08,
    0x192b081908080808, 0x192b081919191919, 0x192b082b08192b08, 0x192b082b192b0808,
    0x192b190808080808, 0x192b190808081919, 0x192b191908190808, 0x192b19190819082b,
    0x192b19192b081908, 0x192b2b081908082b, 0x2b08080808080808, 0x2b0808080808082b,
    0x2b08080808082b2b, 0x2b08080819080819, 0x2b0808082b08082b, 0x2b08081908081908,
    0x2b08081908192b08, 0x2b08081919080808, 0x2b08082b08190819, 0x2b08190808080819,
    0x2b08190808081908, 0x2b08190808190808, 0x2b08190808191919, 0x2b08190819080808,
    0x2b081908192b0808, 0x2b08191908080808, 0x2b0819191908192b, 0x2b0819192b191908,
    0x2b08192b08082b19, 0x2b08192b19080808, 0x2b08192b192b0808, 0x2b082b080808082b,
    0x2b082b1908081908, 0x2b082b2b08190819, 0x2b19080808081908, 0x2b19080808190808,
    0x2b190808082b1908, 0x2b19080819080808, 0x2b1908082b2b0819, 0x2b1908190819192b,
    0x2b1908192b080808, 0x2b19082b19081919, 0x2b19190808080808, 0x2b191908082b082b,
    0x2b19190819081908, 0x2b19191919190819, 0x2b192b082b080819, 0x2b192b19082b0808,
    0x2b2b08080808082b, 0x2b2b080819190808, 0x2b2b08082b081919, 0x2b2b081908082b19,
    0x2b2b082b08080808, 0x2b2b190808192b08, 0x2b2b2b0819190808, 0x2b2b2b1908081908
};

static inline uint8_t grid_byte(uint64_t entry, int j) {
    return (uint8_t)(entry >> (8 * j));
}

static inline int clampi(int v, int lo, int hi) {
    return v < lo ? lo : v > hi ? hi : v;
}

/* ---------------------------------------------------------------- IQ4_XS */
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

/* ggml's quantize_row_iq4_nl_impl for one super-block of 256 without importance weights (weights x^2):
 * per sub-block of 32, the best of 15 scales near -max/127 by weighted least squares, then the scales
 * quantized to 6 bits against the super-block scale and every value requantized against its rounded scale. */
static void quantize_block_iq4_xs(const float *x, block_iq4_xs *y) {
    const int ntry = 7;
    const int8_t *values = fl_kvalues_iq4nl;
    float scales[QK_K / 32];
    uint8_t L[QK_K];
    float max_scale = 0, amax_scale = 0;
    memset(y->qs, 0, sizeof(y->qs));
    for (int ib = 0; ib < QK_K / 32; ib++) {
        const float *xb = x + 32 * ib;
        uint8_t *Lb = L + 32 * ib;
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
        float d = -max / values[0];
        float id = 1 / d;
        float sumqx = 0, sumq2 = 0;
        for (int j = 0; j < 32; j++) {
            int l = best_index_iq4nl(id * xb[j]);
            Lb[j] = (uint8_t)l;
            float q = values[l];
            float w = xb[j] * xb[j];
            sumqx += w * q * xb[j];
            sumq2 += w * q * q;
        }
        d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
        float best = d * sumqx;
        for (int itry = -ntry; itry <= ntry; itry++) {
            id = (itry + values[0]) / max;
            sumqx = sumq2 = 0;
            for (int j = 0; j < 32; j++) {
                float q = values[best_index_iq4nl(id * xb[j])];
                float w = xb[j] * xb[j];
                sumqx += w * q * xb[j];
                sumq2 += w * q * q;
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
    y->scales_h = 0;
    float d = -max_scale / 32;
    y->d = fl_fp32_to_fp16(d);
    float id = d ? 1 / d : 0.f;
    for (int ib = 0; ib < QK_K / 32; ib++) {
        int l = clampi(fl_nearest_int(id * scales[ib]), -32, 31);
        float dl = d * l;
        float idl = dl ? 1 / dl : 0.f;
        for (int j = 0; j < 32; j++)
            L[32 * ib + j] = (uint8_t)best_index_iq4nl(idl * x[32 * ib + j]);
        l += 32;
        if (ib % 2 == 0)
            y->scales_l[ib / 2] = (uint8_t)(l & 0xf);
        else
            y->scales_l[ib / 2] |= (uint8_t)((l & 0xf) << 4);
        y->scales_h |= (uint16_t)((l >> 4) << (2 * ib));
    }
    for (int ib = 0; ib < QK_K / 32; ib++)
        for (int j = 0; j < 16; j++)
            y->qs[16 * ib + j] = L[32 * ib + j] | (uint8_t)(L[32 * ib + 16 + j] << 4);
}

void fl_quantize_row_iq4_xs_ref(const float *src, void *dst, int64_t n) {
    block_iq4_xs *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++)
        quantize_block_iq4_xs(src + i * QK_K, &y[i]);
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

/* ---------------------------------------------------------------- IQ2_XXS */

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
            for (int l = 0; l < 4; l++, q8 += 8) {
                const uint64_t grid = fl_iq2xxs_grid[(aux[0] >> (8 * l)) & 0xff];
                const uint8_t signs = fl_iq2_signs((aux[1] >> (7 * l)) & 127);
                for (int j = 0; j < 8; j++)
                    sumi += grid_byte(grid, j) * q8[j] * (signs & (1u << j) ? -1 : 1);
            }
            bsum += sumi * ls;
        }
        sumf += d * bsum;
    }
    *s = 0.125f * sumf;
}

/* ---------------------------------------------------------------- IQ2_XXS quantization
 * ggml's quantize_row_iq2_xxs_impl with unit importance weights (ggml insists on an imatrix; without one
 * every weight counts as 1, so the error weights are sqrt(mean x^2 + x^2)). Each group of 8 is matched to
 * the grid through a map from its 8 two-bit levels to a grid index, or, off the grid, to the nearest points. */

#define IQ2_MAP_SIZE 43692     /* one past the largest key, level 2 in all 8 positions (0xAAAA) */
#define IQ2_NEIGHBOURS 417400  /* off-grid keys plus their shell members, a fact of the grid (ggml counts it too) */

static struct {
    int8_t pos[256][8];        /* grid point i as odd levels 1, 3, 5 */
    int32_t map[IQ2_MAP_SIZE]; /* key (8 two-bit levels) -> grid index, or -(1 + offset into neighbours) */
    uint16_t neighbours[IQ2_NEIGHBOURS]; /* per off-grid key: a count, then the two nearest shells of grid points */
} iq2;
static pthread_once_t iq2_once = PTHREAD_ONCE_INIT;

/* Lists, for every key off the grid, the grid points at the two smallest squared distances, by distance then
 * index: the order ggml's qsort leaves them in, which decides ties in iq2_best_neighbour. */
static void iq2_init(void) {
    for (int i = 0; i < 256; i++)
        for (int j = 0; j < 8; j++)
            iq2.pos[i][j] = (int8_t)(2 * ((grid_byte(fl_iq2xxs_grid[i], j) - 0x08) / 17) + 1);
    for (int u = 0; u < IQ2_MAP_SIZE; u++)
        iq2.map[u] = -1;
    for (int i = 0; i < 256; i++) {
        int u = 0;
        for (int j = 0; j < 8; j++)
            u |= ((iq2.pos[i][j] - 1) / 2) << (2 * j);
        iq2.map[u] = i;
    }
    int at = 0;
    for (int u = 0; u < IQ2_MAP_SIZE; u++) {
        if (iq2.map[u] >= 0)
            continue;
        int d2[256], first = INT32_MAX, second = INT32_MAX;
        for (int i = 0; i < 256; i++) {
            d2[i] = 0;
            for (int j = 0; j < 8; j++) {
                int diff = iq2.pos[i][j] - (2 * ((u >> (2 * j)) & 3) + 1);
                d2[i] += diff * diff;
            }
            if (d2[i] < first) {
                second = first;
                first = d2[i];
            } else if (d2[i] > first && d2[i] < second) {
                second = d2[i];
            }
        }
        int n = 0;
        for (int i = 0; i < 256; i++)
            n += d2[i] <= second;
        if (at + 1 + n > IQ2_NEIGHBOURS) /* unreachable with this grid: a wrong count must not write past */
            return;
        iq2.map[u] = -(at + 1);
        uint16_t *list = iq2.neighbours + at;
        list[0] = (uint16_t)n;
        for (int shell = 0, k = 1; shell < 2; shell++)
            for (int i = 0; i < 256; i++)
                if (d2[i] == (shell ? second : first))
                    list[k++] = (uint16_t)i;
        at += n + 1;
    }
}

/* the grid point among the neighbours of an off-grid key closest to xval at this scale; writes its levels */
static int iq2_best_neighbour(const uint16_t *neighbours, const float *xval, const float *weight, float scale,
                              int8_t *L) {
    float best_d2 = FLT_MAX;
    int best = neighbours[1];
    for (int j = 1; j <= neighbours[0]; j++) {
        float d2 = 0;
        for (int i = 0; i < 8; i++) {
            float diff = scale * iq2.pos[neighbours[j]][i] - xval[i];
            d2 += weight[i] * diff * diff;
        }
        if (d2 < best_d2) {
            best_d2 = d2;
            best = neighbours[j];
        }
    }
    for (int i = 0; i < 8; i++)
        L[i] = (int8_t)((iq2.pos[best][i] - 1) / 2);
    return best;
}

/* the grid index of the 8 levels at 0.5 * (id * x - 1), snapped to the nearest grid point when off the grid */
static int iq2_grid_index(const float *xval, const float *waux, float id, float scale, int8_t *L) {
    int u = 0;
    for (int i = 0; i < 8; i++) {
        L[i] = (int8_t)clampi(fl_nearest_int(0.5f * (id * xval[i] - 1)), 0, 2);
        u |= L[i] << (2 * i);
    }
    int index = iq2.map[u];
    if (index < 0)
        index = iq2_best_neighbour(iq2.neighbours - iq2.map[u] - 1, xval, waux, scale, L);
    return index;
}

/* ggml's make_qp_quants: x >= 0 to levels 0..nmax, a scale search and a few rounds of coordinate descent */
static float make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *w) {
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
        best_mse += w[i] * diff * diff;
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
            mse += w[i] * diff * diff;
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
        sumlx += w[i] * x[i] * l;
        suml2 += w[i] * l * l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int n_changed = 0;
        for (int i = 0; i < n; i++) {
            float slx = sumlx - w[i] * x[i] * L[i];
            float sl2 = suml2 - w[i] * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = fl_nearest_int(x[i] * sl2 / slx);
                new_l = new_l < nmax ? new_l : nmax;
                if (new_l != L[i]) {
                    slx += w[i] * x[i] * new_l;
                    sl2 += w[i] * new_l * new_l;
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

static void quantize_block_iq2_xxs(const float *x, block_iq2_xxs *y) {
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
            weight[i] = sqrtf(sigma2 + xb[i] * xb[i]);
            waux[i] = sqrtf(weight[i]);
        }
        /* magnitudes go to the grid, signs to 7 bits per 8: an odd count of minus signs flips the cheapest one */
        for (int k = 0; k < 4; k++) {
            int nflip = 0;
            uint8_t s = 0;
            for (int i = 0; i < 8; i++) {
                if (xb[8 * k + i] >= 0) {
                    xval[8 * k + i] = xb[8 * k + i];
                } else {
                    xval[8 * k + i] = -xb[8 * k + i];
                    nflip++;
                    s |= (uint8_t)(1 << i);
                }
            }
            if (nflip % 2) {
                int imin = 0;
                float min = weight[8 * k] * xb[8 * k] * xb[8 * k];
                for (int i = 1; i < 8; i++) {
                    float ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                    if (ax < min) {
                        min = ax;
                        imin = i;
                    }
                }
                xval[8 * k + imin] = -xval[8 * k + imin];
                s ^= (uint8_t)(1 << imin);
            }
            block_signs[k] = s & 127;
        }
        float max = xval[0];
        for (int i = 1; i < 32; i++)
            max = max > xval[i] ? max : xval[i];
        if (max < GROUP_MAX_EPS) {
            scales[ib] = 0;
            continue;
        }
        float scale = make_qp_quants(32, kMaxQ + 1, xval, (uint8_t *)L, weight);
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
                iq2_grid_index(xval + 8 * k, waux + 8 * k, id, this_scale, Laux + 8 * k);
            float sumqx = 0, sumq2 = 0;
            for (int i = 0; i < 32; i++) {
                float q = 2 * Laux[i] + 1;
                sumqx += weight[i] * xval[i] * q;
                sumq2 += weight[i] * q * q;
            }
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                memcpy(L, Laux, 32);
            }
        }
        if (scale > 0) {
            float id = 1 / scale;
            for (int k = 0; k < 4; k++) {
                int index = iq2_grid_index(xval + 8 * k, waux + 8 * k, id, scale, L + 8 * k);
                for (int i = 0; i < 8; i++)
                    L[8 * k + i] = (int8_t)((iq2.pos[index][i] - 1) / 2);
            }
            float sumqx = 0, sumq2 = 0;
            for (int i = 0; i < 32; i++) {
                float q = 2 * L[i] + 1;
                sumqx += weight[i] * xval[i] * q;
                sumq2 += weight[i] * q * q;
            }
            if (sumq2 > 0)
                scale = sumqx / sumq2;
        }
        if (scale < 0) { /* the scale is stored unsigned: flip it and every sign with it */
            scale = -scale;
            for (int k = 0; k < 4; k++)
                block_signs[k] = (~block_signs[k]) & 127;
        }
        /* the levels are on the grid here for any finite input; non-finite input can leave make_qp_quants' levels,
         * where ggml aborts and we clamp and fall back to grid point 0 */
        for (int k = 0; k < 4; k++) {
            int u = 0;
            for (int i = 0; i < 8; i++)
                u |= clampi(L[8 * k + i], 0, 2) << (2 * i);
            const int index = iq2.map[u] >= 0 ? iq2.map[u] : 0;
            q2[2 * ib] |= (uint32_t)index << (8 * k);
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
        int l = clampi(fl_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15);
        q2[2 * ib + 1] |= (uint32_t)l << 28;
    }
    memcpy(y->qs, q2, sizeof(y->qs));
}

void fl_quantize_row_iq2_xxs_ref(const float *src, void *dst, int64_t n) {
    pthread_once(&iq2_once, iq2_init);
    block_iq2_xxs *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++)
        quantize_block_iq2_xxs(src + i * QK_K, &y[i]);
}

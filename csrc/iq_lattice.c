/* iq_lattice.c: the key maps and neighbour lists of the i-quant grids, built once per process into static
 * storage (nothing to free at exit), as ggml's iq2xs_init_impl / iq3xs_init_impl build theirs. */
#include <float.h>
#include <pthread.h>
#include "iq_lattice.h"
#include "kernels.h"
#include "quant_generic.h"

/* the distances are integers, but fl_lattice_round's are floats whose every product ggml rounds before adding */
#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif

#define MAP2 43692 /* ggml's kmap_size for 8 levels of 2 bits: every key of levels 0..2 (at most 0xAAAA) is below */
#define MAP3 4096  /* 4 levels of 3 bits */

/* Entries of each neighbour table: one count per off-grid key plus the members of its shells. Facts of the grids
 * (ggml counts them the same way at init); a build that would pass them stops early instead of writing past. */
#define NB_IQ2XXS 417400
#define NB_IQ2XS 551722
#define NB_IQ2S 209100
#define NB_IQ1S 1375339
#define NB_IQ3XXS 22825
#define NB_IQ3S 28317

static int8_t pos_iq2xxs[256 * 8], pos_iq2xs[512 * 8], pos_iq2s[1024 * 8], pos_iq1s[2048 * 8];
static int8_t pos_iq3xxs[256 * 4], pos_iq3s[512 * 4];
static int32_t map_iq2xxs[MAP2], map_iq2xs[MAP2], map_iq2s[MAP2], map_iq1s[MAP2], map_iq3xxs[MAP3], map_iq3s[MAP3];
static uint16_t nb_iq2xxs[NB_IQ2XXS], nb_iq2xs[NB_IQ2XS], nb_iq2s[NB_IQ2S], nb_iq1s[NB_IQ1S];
static uint16_t nb_iq3xxs[NB_IQ3XXS], nb_iq3s[NB_IQ3S];

struct lattice_def {
    int dim, bits, n_grid, n_shells, map_size, capacity;
    int8_t *pos;
    int32_t *map;
    uint16_t *neighbours;
};

static const struct lattice_def defs[FL_LATTICE_COUNT] = {
    [FL_LATTICE_IQ2XXS] = {8, 2, 256, 2, MAP2, NB_IQ2XXS, pos_iq2xxs, map_iq2xxs, nb_iq2xxs},
    [FL_LATTICE_IQ2XS] = {8, 2, 512, 2, MAP2, NB_IQ2XS, pos_iq2xs, map_iq2xs, nb_iq2xs},
    [FL_LATTICE_IQ2S] = {8, 2, 1024, 1, MAP2, NB_IQ2S, pos_iq2s, map_iq2s, nb_iq2s},
    [FL_LATTICE_IQ1S] = {8, 2, 2048, 3, MAP2, NB_IQ1S, pos_iq1s, map_iq1s, nb_iq1s},
    [FL_LATTICE_IQ3XXS] = {4, 3, 256, 2, MAP3, NB_IQ3XXS, pos_iq3xxs, map_iq3xxs, nb_iq3xxs},
    [FL_LATTICE_IQ3S] = {4, 3, 512, 3, MAP3, NB_IQ3S, pos_iq3s, map_iq3s, nb_iq3s},
};

static struct fl_lattice lattices[FL_LATTICE_COUNT];

/* the level (0, 1, 2, ...) of coordinate j of grid point i, read from the table the dequantizers use */
static int grid_level(int id, int i, int j) {
    switch (id) {
    case FL_LATTICE_IQ2XXS: return ((int)((fl_iq2xxs_grid[i] >> (8 * j)) & 0xff) - 0x08) / 17; /* 0x08 0x19 0x2b */
    case FL_LATTICE_IQ2XS: return ((int)((fl_iq2xs_grid[i] >> (8 * j)) & 0xff) - 0x08) / 17;
    case FL_LATTICE_IQ2S: return ((int)((fl_iq2s_grid[i] >> (8 * j)) & 0xff) - 0x08) / 17;
    case FL_LATTICE_IQ1S: return (int8_t)(fl_iq1s_grid[i] >> (8 * j)) + 1; /* -1 0 +1 */
    case FL_LATTICE_IQ3XXS: return ((int)((fl_iq3xxs_grid[i] >> (8 * j)) & 0xff) - 0x04) / 8; /* 0x04..0x34, 0x3e */
    default: return ((int)((fl_iq3s_grid[i] >> (8 * j)) & 0xff) - 0x01) / 2; /* 0x01..0x0f */
    }
}

/* Lists, for every key off the grid, the grid points at its n_shells smallest squared distances, by distance
 * then index: the order ggml's qsort of (distance, index) pairs leaves them in, which decides the ties of
 * fl_lattice_round and the IQ1 searches. */
static void build(int id) {
    const struct lattice_def *def = &defs[id];
    const int dim = def->dim, bits = def->bits, n_grid = def->n_grid;
    for (int i = 0; i < n_grid; i++)
        for (int j = 0; j < dim; j++)
            def->pos[dim * i + j] = (int8_t)(2 * grid_level(id, i, j) + 1);
    for (int u = 0; u < def->map_size; u++)
        def->map[u] = -1;
    for (int i = 0; i < n_grid; i++) {
        int u = 0;
        for (int j = 0; j < dim; j++)
            u |= ((def->pos[dim * i + j] - 1) / 2) << (bits * j);
        def->map[u] = i;
    }
    int d2[2048];
    int at = 0;
    for (int u = 0; u < def->map_size; u++) {
        if (def->map[u] >= 0)
            continue;
        int8_t p[8];
        for (int j = 0; j < dim; j++)
            p[j] = (int8_t)(2 * ((u >> (bits * j)) & ((1 << bits) - 1)) + 1);
        int shell[3], n_found = 0; /* the smallest distinct distances, ascending */
        for (int i = 0; i < n_grid; i++) {
            const int8_t *g = def->pos + dim * i;
            int d = 0;
            for (int j = 0; j < dim; j++)
                d += (g[j] - p[j]) * (g[j] - p[j]);
            d2[i] = d;
            int s = n_found;
            while (s > 0 && d < shell[s - 1])
                s--;
            if ((s > 0 && shell[s - 1] == d) || s == def->n_shells)
                continue;
            for (int t = (n_found < def->n_shells ? n_found : def->n_shells - 1); t > s; t--)
                shell[t] = shell[t - 1];
            shell[s] = d;
            if (n_found < def->n_shells)
                n_found++;
        }
        int n = 0;
        for (int i = 0; i < n_grid; i++)
            n += d2[i] <= shell[n_found - 1];
        if (at + 1 + n > def->capacity) /* unreachable with these grids */
            break;
        def->map[u] = -(at + 1);
        uint16_t *list = def->neighbours + at;
        list[0] = (uint16_t)n;
        for (int s = 0, k = 1; s < n_found; s++)
            for (int i = 0; i < n_grid; i++)
                if (d2[i] == shell[s])
                    list[k++] = (uint16_t)i;
        at += n + 1;
    }
    lattices[id] = (struct fl_lattice){dim, bits, bits == 2 ? 2 : 7, def->pos, def->map, def->neighbours};
}

static void build_iq2xxs(void) { build(FL_LATTICE_IQ2XXS); }
static void build_iq2xs(void) { build(FL_LATTICE_IQ2XS); }
static void build_iq2s(void) { build(FL_LATTICE_IQ2S); }
static void build_iq1s(void) { build(FL_LATTICE_IQ1S); }
static void build_iq3xxs(void) { build(FL_LATTICE_IQ3XXS); }
static void build_iq3s(void) { build(FL_LATTICE_IQ3S); }

static pthread_once_t once[FL_LATTICE_COUNT] = {PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT,
                                                PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT};
static void (*const builders[FL_LATTICE_COUNT])(void) = {build_iq2xxs, build_iq2xs, build_iq2s,
                                                         build_iq1s,   build_iq3xxs, build_iq3s};

const struct fl_lattice *fl_lattice(int id) {
    pthread_once(&once[id], builders[id]);
    return &lattices[id];
}

int fl_lattice_key(const struct fl_lattice *lat, const int8_t *L) {
    int u = 0;
    for (int i = 0; i < lat->dim; i++) {
        int l = L[i] < 0 ? 0 : L[i] > lat->max_level ? lat->max_level : L[i];
        u |= l << (lat->bits * i);
    }
    return u;
}

int fl_lattice_round(const struct fl_lattice *lat, const float *xval, const float *w, float id, float scale,
                     int8_t *L, int *on_grid) {
    const int dim = lat->dim;
    int u = 0;
    for (int i = 0; i < dim; i++) {
        int l = fl_nearest_int(0.5f * (id * xval[i] - 1));
        l = l < 0 ? 0 : l > lat->max_level ? lat->max_level : l;
        L[i] = (int8_t)l;
        u |= l << (lat->bits * i);
    }
    int index = lat->map[u];
    if (on_grid)
        *on_grid = index >= 0;
    if (index >= 0)
        return index;
    /* the neighbour at the smallest weighted distance, the first of equals; none when every distance is NaN or
     * not below FLT_MAX (non-finite input, where ggml aborts): then the first in the list */
    const uint16_t *list = lat->neighbours - index - 1;
    float best_d2 = FLT_MAX;
    index = list[1];
    for (int k = 1; k <= list[0]; k++) {
        const int8_t *g = lat->pos + dim * list[k];
        float d2 = 0;
        for (int i = 0; i < dim; i++) {
            float diff = scale * g[i] - xval[i];
            d2 += w[i] * diff * diff;
        }
        if (d2 < best_d2) {
            best_d2 = d2;
            index = list[k];
        }
    }
    const int8_t *g = lat->pos + dim * index;
    for (int i = 0; i < dim; i++)
        L[i] = (int8_t)((g[i] - 1) / 2);
    return index;
}

void fl_lattice_lsq_sums(int n, const float *xval, const float *weight, const int8_t *L, float *sumqx, float *sumq2) {
    float sx = 0, s2 = 0;
    for (int i = 0; i < n; i++) {
        float q = 2 * L[i] + 1;
        sx += weight[i] * xval[i] * q;
        s2 += weight[i] * q * q;
    }
    *sumqx = sx;
    *sumq2 = s2;
}

float fl_lattice_search(const struct fl_lattice *lat, int n, const float *xval, const float *weight,
                        const float *waux, int max_q, int tries, float step, int redo_all, int8_t *L) {
    const int dim = lat->dim, n_groups = n / dim;
    int8_t Laux[32];
    int on_grid[8], on_aux[8];
    float max = xval[0];
    for (int i = 1; i < n; i++)
        max = max > xval[i] ? max : xval[i];
    memset(L, 0, (size_t)n);
    float best = 0;
    float scale = max / (2 * max_q - 1);
    for (int k = 0; k < n_groups; k++)
        on_grid[k] = !redo_all;
    for (int is = -tries; is <= tries; is++) {
        float id = (2 * max_q - 1 + is * step) / max;
        float this_scale = 1 / id;
        for (int k = 0; k < n_groups; k++)
            fl_lattice_round(lat, xval + dim * k, waux + dim * k, id, this_scale, Laux + dim * k, &on_aux[k]);
        float sumqx, sumq2;
        fl_lattice_lsq_sums(n, xval, weight, Laux, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, (size_t)n);
            memcpy(on_grid, on_aux, sizeof(on_grid[0]) * (size_t)n_groups);
        }
    }
    int n_off = 0;
    for (int k = 0; k < n_groups; k++)
        n_off += !on_grid[k];
    if (n_off > 0 && scale > 0) {
        float id = 1 / scale;
        for (int k = 0; k < n_groups; k++)
            if (redo_all || !on_grid[k])
                fl_lattice_round(lat, xval + dim * k, waux + dim * k, id, scale, L + dim * k, NULL);
        float sumqx, sumq2;
        fl_lattice_lsq_sums(n, xval, weight, L, &sumqx, &sumq2);
        if (sumq2 > 0)
            scale = sumqx / sumq2;
    }
    return scale;
}

void fl_lattice_split_signs(const float *xb, const float *weight, int n_groups, int parity, float *xval,
                            uint8_t *signs) {
    for (int k = 0; k < n_groups; k++) {
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
        if (parity && nflip % 2) {
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
        signs[k] = parity ? s & 127 : s;
    }
}

int fl_lattice_scale4(float id, float scale) {
    return fl_clampi(fl_nearest_int(0.5f * (id * scale - 1)), 0, 15);
}

void fl_lattice_quantize_rows(int lattice, fl_lattice_block_fn block, size_t block_bytes, const float *src, void *dst,
                              int64_t n_rows, int64_t n_per_row, const float *importance) {
    const struct fl_lattice *lat = fl_lattice(lattice);
    uint8_t *y = dst;
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t i = 0; i < n_per_row / QK_K; i++, y += block_bytes)
            block(lat, src + r * n_per_row + i * QK_K, importance ? importance + i * QK_K : NULL, y);
}

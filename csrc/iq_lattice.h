/* iq_lattice.h: the grid lookups the i-quant quantizers share (ggml's iq2xs_init_impl / iq3xs_init_impl).
 * A group of 8 weights (4 for the 3-bit types) rounded to per-weight levels forms a key; the key's map entry is the
 * grid point with exactly those levels, or, off the grid, a list of the grid points in the nearest few squared
 * distance shells, among which the quantizer picks the one that fits its weights best. */
#ifndef FLASHLITE_IQ_LATTICE_H
#define FLASHLITE_IQ_LATTICE_H
#include <stddef.h>
#include <stdint.h>

enum fl_lattice_id {
    FL_LATTICE_IQ2XXS, /* iq2xxs_grid: 256 points, 8 levels of 0..2, neighbours in 2 shells */
    FL_LATTICE_IQ2XS,  /* iq2xs_grid: 512 points, 2 shells */
    FL_LATTICE_IQ2S,   /* iq2s_grid: 1024 points, 1 shell */
    FL_LATTICE_IQ1S,   /* iq1s_grid (IQ1_S and IQ1_M): 2048 points, 3 shells */
    FL_LATTICE_IQ3XXS, /* iq3xxs_grid: 256 points, 4 levels of 0..7, 2 shells */
    FL_LATTICE_IQ3S,   /* iq3s_grid: 512 points, 3 shells */
    FL_LATTICE_COUNT
};

struct fl_lattice {
    int dim;                    /* coordinates per grid point: 8, or 4 for the 3-bit grids */
    int bits;                   /* bits per level in a key: 2, or 3 */
    int max_level;              /* the largest level the quantizers round to: 2, or 7 */
    const int8_t *pos;          /* pos[dim * i + j]: coordinate j of grid point i as the odd number 2 * level + 1 */
    const int32_t *map;         /* key -> grid index, or -(1 + offset of the key's list in neighbours) */
    const uint16_t *neighbours; /* per off-grid key: a count, then grid indices by distance, ties by index */
};

/* The lattice, built on first use from the grid table (thread-safe, once per process; static storage). */
const struct fl_lattice *fl_lattice(int id);

/* The key of dim levels, each clamped to 0..max_level first (levels outside it only come from non-finite input). */
int fl_lattice_key(const struct fl_lattice *lat, const int8_t *L);

/* The grid index of a key; off the grid (or for a key no grid point has), `fallback`. */
static inline int fl_lattice_index_or(const struct fl_lattice *lat, int key, int fallback) {
    return lat->map[key] >= 0 ? lat->map[key] : fallback;
}

/* ggml's rounding of dim magnitudes xval to the grid at inverse scale id: levels 0.5 * (id * x - 1) rounded and
 * clamped to 0..max_level; off the grid, the neighbour closest to xval at `scale` under the weights w
 * (iq2_find_best_neighbour / iq3_find_best_neighbour). Writes the chosen point's levels to L and returns its
 * index; *on_grid (may be NULL) says whether the rounded levels were a grid point. */
int fl_lattice_round(const struct fl_lattice *lat, const float *xval, const float *w, float id, float scale,
                     int8_t *L, int *on_grid);

/* The grid index of the levels a search settled on. For finite input they are on the grid; non-finite input can
 * leave others (where ggml aborts): they are clamped, and a key off the grid takes grid point 0. */
static inline int fl_lattice_final_index(const struct fl_lattice *lat, const int8_t *L) {
    return fl_lattice_index_or(lat, fl_lattice_key(lat, L), 0);
}

/* sum w x q and sum w q^2 over the odd values q = 2 L + 1 of n magnitudes xval: the weighted least-squares scale is
 * their ratio */
void fl_lattice_lsq_sums(int n, const float *xval, const float *weight, const int8_t *L, float *sumqx, float *sumq2);

/* ggml's scale search of the lattice quantizers for n (16 or 32) magnitudes in groups of dim: 2 tries + 1 inverse
 * scales (2 max_q - 1 + is step) / max, every group rounded to the grid, the least-squares best kept; then the
 * groups rounded again at the best scale, all of them (redo_all, IQ3_S) or those whose rounding fell off the grid
 * (groups count as off it before any try was taken when redo_all, else as on it). Returns the scale (it may be
 * negative), levels in L. */
float fl_lattice_search(const struct fl_lattice *lat, int n, const float *xval, const float *weight,
                        const float *waux, int max_q, int tries, float step, int redo_all, int8_t *L);

/* Magnitudes of n_groups groups of 8 weights xb to xval, their sign bits (set: negative) to signs. With parity
 * (7 stored bits, the eighth is the parity of the seven) an odd count of minus signs flips the sign of the weight
 * with the least weight * x^2, and signs keeps the low 7 bits; without, all 8 bits. */
void fl_lattice_split_signs(const float *xb, const float *weight, int n_groups, int parity, float *xval,
                            uint8_t *signs);

/* A group's scale as the 4-bit code l of (2 l + 1) d against the super-block's d = 1 / id: clamped to 0..15 */
int fl_lattice_scale4(float id, float scale);

/* One super-block of QK_K weights x (importance qw or NULL) to its block at y */
typedef void (*fl_lattice_block_fn)(const struct fl_lattice *lat, const float *x, const float *qw, void *y);

/* Rows of n_per_row weights (whole super-blocks) quantized block by block on the lattice of the given id, the
 * importance per column or NULL: ggml's quantize_<t> for the lattice types */
void fl_lattice_quantize_rows(int lattice, fl_lattice_block_fn block, size_t block_bytes, const float *src, void *dst,
                              int64_t n_rows, int64_t n_per_row, const float *importance);

#endif

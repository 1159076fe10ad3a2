/* moe.h: the routed-expert computation shared by the memory-mapped and the disk-cached paths of moe.c and
 * expert_cache.c. Only where an expert's matrices come from differs between them. */
#ifndef FL_MOE_H
#define FL_MOE_H
#include <stdint.h>

/* try_acquire: the expert is not at hand yet (not an error) */
#define FL_BUSY 1

struct moe_source {
    int type[3];  /* gate, up, down */
    void *ctx;
    /* Point w[0..2] at expert e's gate, up and down matrices, waiting for them if need be. */
    int (*acquire)(void *ctx, int32_t e, const void *w[3]);
    /* The same without waiting: FL_BUSY when expert e is not at hand yet. */
    int (*try_acquire)(void *ctx, int32_t e, const void *w[3]);
    void (*release)(void *ctx, int32_t e);
};

/* The experts listed in `order` (each expert of idx once, in the order to compute them) add into out in
 * ascending expert id, whatever that order, so every order gives bitwise the same out. */
int moe_run(const struct moe_source *src, const int32_t *order, int64_t n_order, int64_t n_tok, int64_t dim,
            int64_t inter, int64_t n_used, int64_t n_expert, const float *x, const int32_t *idx,
            const float *weights, float limit, float *out);

/* g[i] = silu(min(g[i], limit)) * clamp(u[i], -limit, limit) for the n gate and up outputs of an expert. */
void moe_swiglu(int64_t n, float *g, const float *u, float limit);

/* FL_OK when the sizes are positive, the pointers set and every route an expert id below n_expert. */
int moe_check_routes(int64_t n_tok, int64_t dim, int64_t inter, int64_t n_used, int64_t n_expert,
                     const float *x, const int32_t *idx, const float *weights, const float *out);

#endif

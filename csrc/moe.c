/* moe.c: dispatch of DeepSeek V4's routed experts: gather each expert's tokens, SwiGLU with the asymmetric clamp
 * (gate clamped above, up both ways), the down projection, then out[token] += weight * y. The sums into out run
 * in ascending expert id, as the oracle's index_add does, after all experts are computed, so that the disk cache
 * may compute the resident experts before the ones still being read. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flashlite.h"
#include "moe.h"

static int expert_ffn(const struct moe_source *src, int32_t e, const float *xs, int64_t n, int64_t dim,
                      int64_t inter, float limit, float *g, float *u, float *y) {
    const void *w[3];
    int status = src->acquire(src->ctx, e, w);
    if (status != FL_OK) return status;
    status = fl_matmul(src->type[0], w[0], inter, dim, xs, n, g);
    if (status == FL_OK) status = fl_matmul(src->type[1], w[1], inter, dim, xs, n, u);
    if (status == FL_OK) {
        for (int64_t i = 0; i < n * inter; i++) {
            float gi = g[i] < limit ? g[i] : limit;
            float ui = u[i] < -limit ? -limit : (u[i] > limit ? limit : u[i]);
            g[i] = gi / (1.0f + expf(-gi)) * ui;
        }
        status = fl_matmul(src->type[2], w[2], dim, inter, g, n, y);
    }
    src->release(src->ctx, e);
    return status;
}

int moe_run(const struct moe_source *src, const int32_t *order, int64_t n_order, int64_t n_tok, int64_t dim,
            int64_t inter, int64_t n_used, int64_t n_expert, const float *x, const int32_t *idx,
            const float *weights, float limit, float *out) {
    int64_t cap = n_tok * n_used;
    /* Pairs (token, k) grouped by expert, tokens ascending within an expert: first[e] .. first[e + 1]. */
    int64_t *first = calloc((size_t)n_expert + 1, sizeof(int64_t));
    int64_t *tok = malloc(sizeof(int64_t) * (size_t)(cap + 1));
    float *w = malloc(sizeof(float) * (size_t)(cap + 1));
    float *xs = malloc(sizeof(float) * (size_t)(cap * dim + 1));
    float *y = malloc(sizeof(float) * (size_t)(cap * dim + 1));
    int64_t most = 0;
    int status = (first && tok && w && xs && y) ? FL_OK : FL_ENOMEM;
    if (status == FL_OK) {
        for (int64_t i = 0; i < cap; i++) first[idx[i] + 1]++;
        for (int64_t e = 0; e < n_expert; e++) {
            if (first[e + 1] > most) most = first[e + 1];
            first[e + 1] += first[e];
        }
        int64_t *fill = malloc(sizeof(int64_t) * (size_t)(n_expert + 1));
        if (!fill) status = FL_ENOMEM;
        for (int64_t e = 0; e < n_expert && fill; e++) fill[e] = first[e];
        for (int64_t t = 0; t < n_tok && fill; t++)
            for (int64_t k = 0; k < n_used; k++) {
                int64_t p = fill[idx[t * n_used + k]]++;
                tok[p] = t;
                w[p] = weights[t * n_used + k];
                memcpy(xs + p * dim, x + t * dim, sizeof(float) * (size_t)dim);
            }
        free(fill);
    }
    float *g = status == FL_OK ? malloc(sizeof(float) * (size_t)(most * inter + 1)) : NULL;
    float *u = status == FL_OK ? malloc(sizeof(float) * (size_t)(most * inter + 1)) : NULL;
    if (status == FL_OK && (!g || !u)) status = FL_ENOMEM;
    for (int64_t i = 0; i < n_order && status == FL_OK; i++) {
        int32_t e = order[i];
        int64_t lo = first[e], n = first[e + 1] - lo;
        if (n) status = expert_ffn(src, e, xs + lo * dim, n, dim, inter, limit, g, u, y + lo * dim);
    }
    for (int64_t p = 0; p < cap && status == FL_OK; p++)
        for (int64_t c = 0; c < dim; c++) out[tok[p] * dim + c] += y[p * dim + c] * w[p];
    free(first);
    free(tok);
    free(w);
    free(xs);
    free(y);
    free(g);
    free(u);
    return status;
}

struct mapped_experts {
    const char *base[3];
    int64_t stride[3];
};

static int mapped_acquire(void *ctx, int32_t e, const void *w[3]) {
    const struct mapped_experts *m = ctx;
    for (int i = 0; i < 3; i++) w[i] = m->base[i] + e * m->stride[i];
    return FL_OK;
}

static void mapped_release(void *ctx, int32_t e) {
    (void)ctx;
    (void)e;
}

int moe_check_routes(int64_t n_tok, int64_t dim, int64_t inter, int64_t n_used, int64_t n_expert,
                     const float *x, const int32_t *idx, const float *weights, const float *out) {
    if (n_tok < 0 || dim <= 0 || inter <= 0 || n_used <= 0 || n_expert <= 0) return FL_EINVAL;
    if (!x || !idx || !weights || !out) return FL_EINVAL;
    for (int64_t i = 0; i < n_tok * n_used; i++)
        if (idx[i] < 0 || idx[i] >= n_expert) return FL_EINVAL;
    return FL_OK;
}

int fl_moe_experts(int64_t n_tok, int64_t dim, int64_t inter, int64_t n_used, int64_t n_expert,
                   const float *x, const int32_t *idx, const float *weights,
                   int gate_type, const void *gate_w, int64_t gate_stride,
                   int up_type, const void *up_w, int64_t up_stride,
                   int down_type, const void *down_w, int64_t down_stride,
                   float limit, float *out) {
    int status = moe_check_routes(n_tok, dim, inter, n_used, n_expert, x, idx, weights, out);
    if (status != FL_OK) return status;
    if (!gate_w || !up_w || !down_w) return FL_EINVAL;
    struct mapped_experts m = {{gate_w, up_w, down_w}, {gate_stride, up_stride, down_stride}};
    struct moe_source src = {{gate_type, up_type, down_type}, &m, mapped_acquire, mapped_release};
    int32_t *order = malloc(sizeof(int32_t) * (size_t)n_expert);
    if (!order) return FL_ENOMEM;
    for (int32_t e = 0; e < n_expert; e++) order[e] = e;
    status = moe_run(&src, order, n_expert, n_tok, dim, inter, n_used, n_expert, x, idx, weights, limit, out);
    free(order);
    return status;
}

/* moe.c: dispatch of DeepSeek V4's routed experts: gather each expert's tokens, SwiGLU with the asymmetric clamp
 * (gate clamped above, up both ways), the down projection, then out[token] += weight * y. The sums into out run
 * in ascending expert id, as the oracle's index_add does, after all experts are computed, so that the disk cache
 * may compute the resident experts before the ones still being read. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flashlite.h"
#include "moe.h"

void moe_swiglu(int64_t n, float *g, const float *u, float limit) {
    for (int64_t r = 0; r < n; r++) {
        float gi = g[r] < limit ? g[r] : limit;
        float ui = u[r] < -limit ? -limit : (u[r] > limit ? limit : u[r]);
        g[r] = gi / (1.0f + expf(-gi)) * ui;
    }
}

int moe_run(const struct moe_source *src, const int32_t *order, int64_t n_order, int64_t n_tok, int64_t dim,
            int64_t inter, int64_t n_used, int64_t n_expert, const float *x, const int32_t *idx,
            const float *weights, float limit, float *out) {
    int64_t cap = n_tok * n_used;
    /* Pairs (token, k) grouped by expert, tokens ascending within an expert: first[e] .. first[e + 1]. */
    int64_t *first = calloc((size_t)n_expert + 1, sizeof(int64_t));
    int64_t *fill = malloc(sizeof(int64_t) * (size_t)(n_expert + 1));
    int64_t *tok = malloc(sizeof(int64_t) * (size_t)(cap + 1));
    float *w = malloc(sizeof(float) * (size_t)(cap + 1));
    float *xs = malloc(sizeof(float) * (size_t)(cap * dim + 1));
    float *y = malloc(sizeof(float) * (size_t)(cap * dim + 1));
    float *g = malloc(sizeof(float) * (size_t)(cap * inter + 1));
    float *u = malloc(sizeof(float) * (size_t)(cap * inter + 1));
    struct fl_matmul_item *items = malloc(sizeof(*items) * (size_t)(2 * n_order + 1));
    int32_t *wave = malloc(sizeof(int32_t) * (size_t)(n_order + 1));
    const void *(*wts)[3] = malloc(sizeof(*wts) * (size_t)(n_order + 1));
    int status = first && fill && tok && w && xs && y && g && u && items && wave && wts ? FL_OK : FL_ENOMEM;
    if (status == FL_OK) {
        for (int64_t i = 0; i < cap; i++) first[idx[i] + 1]++;
        for (int64_t e = 0; e < n_expert; e++) first[e + 1] += first[e];
        memcpy(fill, first, sizeof(int64_t) * (size_t)n_expert);
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t k = 0; k < n_used; k++) {
                int64_t p = fill[idx[t * n_used + k]]++;
                tok[p] = t;
                w[p] = weights[t * n_used + k];
                memcpy(xs + p * dim, x + t * dim, sizeof(float) * (size_t)dim);
            }
    }
    /* Waves: the next expert in order, waited for, and every following one already at hand; each wave's
     * matrices run as one batch, so that small expert matrices stream like one large one. */
    for (int64_t i = 0; i < n_order && status == FL_OK;) {
        int64_t n_wave = 0;
        while (i < n_order && status == FL_OK) {
            int32_t e = order[i];
            if (first[e + 1] == first[e]) {
                i++;
                continue;
            }
            int got = n_wave ? src->try_acquire(src->ctx, e, wts[n_wave]) : src->acquire(src->ctx, e, wts[n_wave]);
            if (got == FL_BUSY)
                break;
            status = got;
            if (status == FL_OK) wave[n_wave++] = e;
            i++;
        }
        for (int64_t j = 0; j < n_wave; j++) {
            int64_t lo = first[wave[j]], n = first[wave[j] + 1] - lo;
            items[2 * j] = (struct fl_matmul_item){src->type[0], wts[j][0], inter, dim, xs + lo * dim, n,
                                                   g + lo * inter};
            items[2 * j + 1] = (struct fl_matmul_item){src->type[1], wts[j][1], inter, dim, xs + lo * dim, n,
                                                       u + lo * inter};
        }
        if (status == FL_OK) status = fl_matmul_batch(2 * n_wave, items);
        for (int64_t j = 0; j < n_wave && status == FL_OK; j++) {
            int64_t lo = first[wave[j]], n = first[wave[j] + 1] - lo;
            moe_swiglu(n * inter, g + lo * inter, u + lo * inter, limit);
            items[j] = (struct fl_matmul_item){src->type[2], wts[j][2], dim, inter, g + lo * inter, n, y + lo * dim};
        }
        if (status == FL_OK) status = fl_matmul_batch(n_wave, items);
        for (int64_t j = 0; j < n_wave; j++) src->release(src->ctx, wave[j]);
    }
    for (int64_t p = 0; p < cap && status == FL_OK; p++)
        for (int64_t c = 0; c < dim; c++) out[tok[p] * dim + c] += y[p * dim + c] * w[p];
    free(first);
    free(fill);
    free(tok);
    free(w);
    free(xs);
    free(y);
    free(g);
    free(u);
    free(items);
    free(wave);
    free(wts);
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

static int mapped_try_acquire(void *ctx, int32_t e, const void *w[3]) { return mapped_acquire(ctx, e, w); }

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
    struct moe_source src = {{gate_type, up_type, down_type}, &m, mapped_acquire, mapped_try_acquire, mapped_release};
    int32_t *order = malloc(sizeof(int32_t) * (size_t)n_expert);
    if (!order) return FL_ENOMEM;
    for (int32_t e = 0; e < n_expert; e++) order[e] = e;
    status = moe_run(&src, order, n_expert, n_tok, dim, inter, n_used, n_expert, x, idx, weights, limit, out);
    free(order);
    return status;
}

/* moe.c: dispatch of DeepSeek V4's routed experts: gather each expert's tokens, SwiGLU with the asymmetric clamp
 * (gate clamped above, up both ways), the down projection, then out[token] += weight * y. Experts run in
 * ascending id order and add into out one after another, as the oracle's index_add does. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flashlite.h"

int fl_moe_experts(int64_t n_tok, int64_t dim, int64_t inter, int64_t n_used, int64_t n_expert,
                   const float *x, const int32_t *idx, const float *weights,
                   int gate_type, const void *gate_w, int64_t gate_stride,
                   int up_type, const void *up_w, int64_t up_stride,
                   int down_type, const void *down_w, int64_t down_stride,
                   float limit, float *out) {
    if (n_tok < 0 || dim <= 0 || inter <= 0 || n_used <= 0 || n_expert <= 0) return FL_EINVAL;
    if (!x || !idx || !weights || !gate_w || !up_w || !down_w || !out) return FL_EINVAL;
    for (int64_t i = 0; i < n_tok * n_used; i++)
        if (idx[i] < 0 || idx[i] >= n_expert) return FL_EINVAL;
    int64_t cap = n_tok * n_used;
    int64_t *tok = malloc(sizeof(int64_t) * (size_t)(cap + 1));
    float *w = malloc(sizeof(float) * (size_t)(cap + 1));
    float *xs = malloc(sizeof(float) * (size_t)(cap * dim + 1));
    float *g = malloc(sizeof(float) * (size_t)(cap * inter + 1));
    float *u = malloc(sizeof(float) * (size_t)(cap * inter + 1));
    float *y = malloc(sizeof(float) * (size_t)(cap * dim + 1));
    int status = (tok && w && xs && g && u && y) ? FL_OK : FL_ENOMEM;
    for (int64_t e = 0; e < n_expert && status == FL_OK; e++) {
        int64_t n = 0;
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t k = 0; k < n_used; k++)
                if (idx[t * n_used + k] == e) {
                    tok[n] = t;
                    w[n] = weights[t * n_used + k];
                    memcpy(xs + n * dim, x + t * dim, sizeof(float) * (size_t)dim);
                    n++;
                }
        if (!n) continue;
        status = fl_matmul(gate_type, (const char *)gate_w + e * gate_stride, inter, dim, xs, n, g);
        if (status == FL_OK) status = fl_matmul(up_type, (const char *)up_w + e * up_stride, inter, dim, xs, n, u);
        if (status != FL_OK) break;
        for (int64_t i = 0; i < n * inter; i++) {
            float gi = g[i] < limit ? g[i] : limit;
            float ui = u[i] < -limit ? -limit : (u[i] > limit ? limit : u[i]);
            g[i] = gi / (1.0f + expf(-gi)) * ui;
        }
        status = fl_matmul(down_type, (const char *)down_w + e * down_stride, dim, inter, g, n, y);
        for (int64_t i = 0; i < n && status == FL_OK; i++)
            for (int64_t c = 0; c < dim; c++) out[tok[i] * dim + c] += y[i * dim + c] * w[i];
    }
    free(tok);
    free(w);
    free(xs);
    free(g);
    free(u);
    free(y);
    return status;
}

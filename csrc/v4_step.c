/* v4_step.c: the MoE routing of a DeepSeek V4 layer, and the CPU backend's fused decode of a layer's MoE sublayer:
 * hyper-connection collapse, norm, router, routed and shared experts, expansion, in one call on a plan built once
 * at load. The Python model (flashlite/models/deepseek_v4.py) is the definition; this runs the same C operations
 * it calls, in the same order, so a fused step is bitwise what the unfused one gives (tests/test_decode_step.py). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flashlite.h"
#include "moe.h"

int fl_moe_route(int64_t n_tok, int64_t n_expert, int64_t n_used, const float *logits, const float *bias,
                 const int32_t *tid2eid, int64_t vocab, const int64_t *token_ids, float route_scale, float *weights,
                 int32_t *idx) {
    if (n_tok < 0 || n_expert <= 0 || n_used <= 0 || n_used > n_expert || n_used > 64 || !logits || !weights ||
        !idx || (!tid2eid && !bias) || (tid2eid && (!token_ids || vocab <= 0)))
        return FL_EINVAL;
    float *scores = malloc(sizeof(float) * (size_t)n_expert);
    if (!scores) return FL_ENOMEM;
    int status = FL_OK;
    for (int64_t t = 0; t < n_tok && status == FL_OK; t++) {
        const float *l = logits + t * n_expert;
        for (int64_t e = 0; e < n_expert; e++) /* sqrt(softplus), linear above 20 as torch's softplus */
            scores[e] = sqrtf(l[e] > 20.0f ? l[e] : log1pf(expf(l[e])));
        int32_t *it = idx + t * n_used;
        if (tid2eid) {
            if (token_ids[t] < 0 || token_ids[t] >= vocab) {
                status = FL_EINVAL;
                break;
            }
            for (int64_t k = 0; k < n_used; k++) {
                it[k] = tid2eid[token_ids[t] * n_used + k];
                if (it[k] < 0 || it[k] >= n_expert) status = FL_EINVAL;
            }
        } else {
            /* the n_used largest scores + bias (the bias only selects), best first, ties to the lower id */
            for (int64_t k = 0; k < n_used; k++) {
                int32_t best = -1;
                float best_v = 0.0f;
                for (int64_t e = 0; e < n_expert; e++) {
                    int taken = 0;
                    for (int64_t j = 0; j < k && !taken; j++) taken = it[j] == e;
                    float v = scores[e] + bias[e];
                    if (!taken && (best < 0 || v > best_v)) {
                        best = (int32_t)e;
                        best_v = v;
                    }
                }
                it[k] = best;
            }
        }
        if (status != FL_OK) break;
        float sum = 0.0f, *wt = weights + t * n_used;
        for (int64_t k = 0; k < n_used; k++) sum += scores[it[k]];
        sum += 1e-20f;
        for (int64_t k = 0; k < n_used; k++) wt[k] = scores[it[k]] / sum * route_scale;
    }
    free(scores);
    return status;
}

int fl_v4_ffn(const struct fl_v4_ffn *p, int64_t n_tok, const float *h, const int64_t *token_ids, float *h_out) {
    if (!p || n_tok < 0 || !h || !h_out || !token_ids || p->dim <= 0 || p->hc <= 0 || p->n_used <= 0 ||
        p->n_used > p->n_expert || p->shared_inter <= 0)
        return FL_EINVAL;
    if (n_tok == 0) return FL_OK;
    int64_t dim = p->dim, hc = p->hc, used = n_tok * p->n_used, si = p->shared_inter;
    /* every buffer of the sublayer in one allocation, each on its own cache lines */
    int64_t sizes[] = {
        n_tok * dim, n_tok * dim, n_tok * dim,  /* x: the collapse; xn: normed; out: the experts' sum */
        n_tok * hc, n_tok * hc * hc,            /* post, comb */
        n_tok * p->n_expert, used, used,        /* the router's logits; the routes' weights and expert ids */
        n_tok * si, n_tok * si, n_tok * dim,    /* the shared expert's gate, up and down outputs */
    };
    enum { N_BUF = sizeof(sizes) / sizeof(sizes[0]) };
    float *buf[N_BUF];
    int64_t total = 0;
    for (int i = 0; i < N_BUF; i++) total += (sizes[i] + 15) & ~(int64_t)15;
    float *mem = malloc(sizeof(float) * (size_t)total);
    if (!mem) return FL_ENOMEM;
    for (int64_t i = 0, off = 0; i < N_BUF; off += (sizes[i] + 15) & ~(int64_t)15, i++) buf[i] = mem + off;
    float *x = buf[0], *xn = buf[1], *out = buf[2], *post = buf[3], *comb = buf[4], *logits = buf[5];
    float *weights = buf[6], *sg = buf[8], *su = buf[9], *ys = buf[10];
    int32_t *idx = (int32_t *)buf[7];
    memset(out, 0, sizeof(float) * (size_t)(n_tok * dim));
    int status = fl_hc_pre(n_tok, hc, dim, h, p->hc_fn_type, p->hc_fn, p->hc_base, p->hc_scale, p->sinkhorn_iters,
                           p->hc_eps, p->norm_eps, x, post, comb);
    if (status == FL_OK) status = fl_rms_norm(n_tok, dim, x, p->norm, p->norm_eps, xn);
    /* the router and the shared expert's gate and up read the same normed rows: one run of the core */
    struct fl_matmul_item first[3] = {{p->gate_type, p->gate_w, p->n_expert, dim, xn, n_tok, logits},
                                      {p->shared_type[0], p->shared_w[0], si, dim, xn, n_tok, sg},
                                      {p->shared_type[1], p->shared_w[1], si, dim, xn, n_tok, su}};
    if (status == FL_OK) status = fl_matmul_batch(3, first);
    if (status == FL_OK)
        status = fl_moe_route(n_tok, p->n_expert, p->n_used, logits, p->bias, p->tid2eid, p->vocab, token_ids,
                              p->route_scale, weights, idx);
    if (status == FL_OK)
        status = p->cache ? fl_moe_experts_cached(p->cache, p->cache_layer, n_tok, dim, p->inter, p->n_used, xn, idx,
                                                  weights, p->limit, out)
                          : fl_moe_experts(n_tok, dim, p->inter, p->n_used, p->n_expert, xn, idx, weights,
                                           p->exp_type[0], p->exp_w[0], p->exp_stride[0], p->exp_type[1],
                                           p->exp_w[1], p->exp_stride[1], p->exp_type[2], p->exp_w[2],
                                           p->exp_stride[2], p->limit, out);
    if (status == FL_OK) {
        /* the shared expert: every token, weight 1 (exact), added after the routed ones as the definition does */
        moe_swiglu(n_tok * si, sg, su, p->shared_limit);
        status = fl_matmul(p->shared_type[2], p->shared_w[2], dim, si, sg, n_tok, ys);
    }
    if (status == FL_OK) {
        for (int64_t i = 0; i < n_tok * dim; i++) out[i] += ys[i];
        status = fl_hc_post(n_tok, hc, dim, out, h, post, comb, h_out);
    }
    free(mem);
    return status;
}

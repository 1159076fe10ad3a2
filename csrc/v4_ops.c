/* v4_ops.c: the small per-token operations of a DeepSeek V4 layer, each one call instead of a dozen numpy ones:
 * RMS norm, and the manifold-constrained hyper-connections around a sublayer (the collapse of the hc streams into
 * the sublayer's input with its Sinkhorn-projected mixing matrix, and the expansion of the output back into the
 * streams). At decode these are microseconds of arithmetic on 4 x 4 matrices and vectors of thousands, where the
 * Python calls around them cost most of a layer. Float32 throughout, in the order of operations of the oracle
 * (transformers' DeepseekV4): normalise then scale, softmax less its max, sums over the streams in stream order. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flashlite.h"
#include "threadpool.h"

/* fn(ctx, lo, hi) over rows [lo, hi) of n rows that each cost about row_floats: on the caller alone for a decode
 * step's few rows (waking the pool costs more), else in parts across the core's threads. Rows are independent, so
 * the split changes no bit. */
typedef void (*rows_fn)(void *ctx, int64_t lo, int64_t hi);
struct rows_job {
    rows_fn fn;
    void *ctx;
    int64_t n, per_task;
};

static void rows_task(void *ctx, int64_t task, int thread) {
    (void)thread;
    const struct rows_job *j = ctx;
    int64_t lo = task * j->per_task, hi = lo + j->per_task < j->n ? lo + j->per_task : j->n;
    j->fn(j->ctx, lo, hi);
}

static void for_rows(int64_t n, int64_t row_floats, rows_fn fn, void *ctx) {
    enum { PARALLEL_FLOATS = 1 << 16, TASKS_PER_THREAD = 4 };
    int threads = n < 2 || n * row_floats < PARALLEL_FLOATS ? 1 : fl_pool_width();
    if (threads <= 1) {
        fn(ctx, 0, n);
        return;
    }
    int64_t tasks = (int64_t)threads * TASKS_PER_THREAD < n ? (int64_t)threads * TASKS_PER_THREAD : n;
    struct rows_job j = {fn, ctx, n, (n + tasks - 1) / tasks};
    fl_parallel_for((n + j.per_task - 1) / j.per_task, 0, rows_task, &j);
}

struct norm_job {
    int64_t dim;
    const float *x, *weight;
    float eps, *y;
};

/* Each row's mean of squares in double (one rounding, whatever the row's length), summed in order; four rows at a
 * time, so that their four chains of dependent additions overlap (one chain alone waits on each add). */
static void norm_rows(void *ctx, int64_t lo, int64_t hi) {
    const struct norm_job *j = ctx;
    const int64_t dim = j->dim;
    for (int64_t r = lo; r < hi; r += 4) {
        const int64_t n = hi - r < 4 ? hi - r : 4;
        const float *x = j->x + r * dim;
        double acc[4] = {0.0, 0.0, 0.0, 0.0};
        if (n == 4) {
            const float *x1 = x + dim, *x2 = x1 + dim, *x3 = x2 + dim;
            double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
            for (int64_t i = 0; i < dim; i++) {
                a0 += (double)x[i] * x[i];
                a1 += (double)x1[i] * x1[i];
                a2 += (double)x2[i] * x2[i];
                a3 += (double)x3[i] * x3[i];
            }
            acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
        } else {
            for (int64_t k = 0; k < n; k++)
                for (int64_t i = 0; i < dim; i++) acc[k] += (double)x[k * dim + i] * x[k * dim + i];
        }
        for (int64_t k = 0; k < n; k++) {
            const float *xk = x + k * dim, *w = j->weight;
            float *y = j->y + (r + k) * dim, inv = 1.0f / sqrtf((float)(acc[k] / (double)dim) + j->eps);
            for (int64_t i = 0; i < dim; i++) y[i] = w ? w[i] * (xk[i] * inv) : xk[i] * inv;
        }
    }
}

int fl_rms_norm(int64_t rows, int64_t dim, const float *x, const float *weight, float eps, float *y) {
    if (rows < 0 || dim <= 0 || (rows && (!x || !y)) || !(eps >= 0.0f)) return FL_EINVAL;
    struct norm_job j = {dim, x, weight, eps, y};
    for_rows(rows, dim, norm_rows, &j);
    return FL_OK;
}

struct rope_job {
    int64_t n_rows, dim, rope_dim;
    const float *cos, *sin;
    int inverse;
    float *x;
};

/* tokens [lo, hi): pairs (2i, 2i+1) of the last rope_dim dims of each row, e * c - o * s, o * c + e * s */
static void rope_tokens(void *ctx, int64_t lo, int64_t hi) {
    const struct rope_job *j = ctx;
    const int64_t half = j->rope_dim / 2;
    for (int64_t t = lo; t < hi; t++) {
        const float *c = j->cos + t * half, *sn = j->sin + t * half;
        for (int64_t r = 0; r < j->n_rows; r++) {
            float *v = j->x + (t * j->n_rows + r) * j->dim + j->dim - j->rope_dim;
            for (int64_t i = 0; i < half; i++) {
                float s = j->inverse ? -sn[i] : sn[i], e = v[2 * i], o = v[2 * i + 1];
                v[2 * i] = e * c[i] - o * s;
                v[2 * i + 1] = o * c[i] + e * s;
            }
        }
    }
}

int fl_rope(int64_t n_tok, int64_t n_rows, int64_t dim, int64_t rope_dim, const float *cos, const float *sin,
            int inverse, float *x) {
    if (n_tok < 0 || n_rows < 0 || rope_dim < 0 || rope_dim % 2 || rope_dim > dim ||
        (n_tok && n_rows && rope_dim && (!cos || !sin || !x)))
        return FL_EINVAL;
    struct rope_job j = {n_rows, dim, rope_dim, cos, sin, inverse, x};
    for_rows(n_tok, n_rows * rope_dim, rope_tokens, &j);
    return FL_OK;
}

static float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

typedef float v4f __attribute__((vector_size(16)));

/* The rounds of sinkhorn() for hc = 4 on rows of four lanes: the same sums, in the same order, and the same
 * divisions, so the same bits (each lane's arithmetic is the scalar code's for its column). */
static void sinkhorn4(float *comb, int iters, float eps) {
    v4f r[4];
    memcpy(r, comb, sizeof(r));
    for (int round = 0; round < iters; round++) {
        if (round > 0)
            for (int a = 0; a < 4; a++) {
                float d = ((((0.0f + r[a][0]) + r[a][1]) + r[a][2]) + r[a][3]) + eps;
                r[a] = r[a] / (v4f){d, d, d, d};
            }
        v4f d = ((((v4f){0.0f, 0.0f, 0.0f, 0.0f} + r[0]) + r[1]) + r[2]) + r[3] + (v4f){eps, eps, eps, eps};
        for (int a = 0; a < 4; a++) r[a] = r[a] / d;
    }
    memcpy(comb, r, sizeof(r));
}

/* comb [hc][hc] (comb[a][b]: from stream a to stream b): softmax over b, plus eps; one column normalisation, then
 * iters - 1 rounds of row then column normalisation, each dividing by the sum plus eps (it ends on a column step) */
static void sinkhorn(float *comb, int64_t hc, int iters, float eps) {
    for (int64_t a = 0; a < hc; a++) {
        float *row = comb + a * hc, m = row[0], sum = 0.0f;
        for (int64_t b = 1; b < hc; b++) m = row[b] > m ? row[b] : m;
        for (int64_t b = 0; b < hc; b++) {
            row[b] = expf(row[b] - m);
            sum += row[b];
        }
        for (int64_t b = 0; b < hc; b++) row[b] = row[b] / sum + eps;
    }
    if (hc == 4) { /* V4's four streams: a row of comb in one vector, each column's division in one instruction */
        sinkhorn4(comb, iters, eps);
        return;
    }
    for (int round = 0; round < iters; round++) {
        if (round > 0)
            for (int64_t a = 0; a < hc; a++) {
                float sum = 0.0f;
                for (int64_t b = 0; b < hc; b++) sum += comb[a * hc + b];
                for (int64_t b = 0; b < hc; b++) comb[a * hc + b] /= sum + eps;
            }
        for (int64_t b = 0; b < hc; b++) {
            float sum = 0.0f;
            for (int64_t a = 0; a < hc; a++) sum += comb[a * hc + b];
            for (int64_t a = 0; a < hc; a++) comb[a * hc + b] /= sum + eps;
        }
    }
}

struct hc_pre_job {
    int64_t hc, dim, n_mix;
    int head, sinkhorn_iters;
    float hc_eps;
    const float *h, *mixes, *base, *scale;
    float *x, *post, *comb;
};

/* tokens [lo, hi) of fl_hc_pre past its matmul: the weights from the mixes, then the weighted sum of the streams */
static void hc_pre_tokens(void *ctx, int64_t lo, int64_t hi) {
    const struct hc_pre_job *j = ctx;
    const int64_t hc = j->hc, dim = j->dim, n_mix = j->n_mix;
    const float *base = j->base, *scale = j->scale;
    for (int64_t t = lo; t < hi; t++) {
        const float *mix = j->mixes + t * n_mix, *ht = j->h + t * hc * dim;
        float pre[64];
        for (int64_t a = 0; a < hc; a++) pre[a] = sigmoidf(mix[a] * scale[0] + base[a]) + j->hc_eps;
        if (!j->head) {
            for (int64_t a = 0; a < hc; a++) j->post[t * hc + a] = 2.0f * sigmoidf(mix[hc + a] * scale[1] + base[hc + a]);
            float *c = j->comb + t * hc * hc;
            for (int64_t i = 0; i < hc * hc; i++) c[i] = mix[2 * hc + i] * scale[2] + base[2 * hc + i];
            sinkhorn(c, hc, j->sinkhorn_iters, j->hc_eps);
        }
        float *xt = j->x + t * dim;
        for (int64_t d = 0; d < dim; d++) xt[d] = pre[0] * ht[d];
        for (int64_t a = 1; a < hc; a++)
            for (int64_t d = 0; d < dim; d++) xt[d] += pre[a] * ht[a * dim + d];
    }
}

int fl_hc_pre(int64_t n_tok, int64_t hc, int64_t dim, const float *h, int fn_type, const void *fn_w,
              const float *base, const float *scale, int sinkhorn_iters, float hc_eps, float norm_eps, float *x,
              float *post, float *comb) {
    int head = post == NULL; /* the model's last collapse: pre weights only */
    int64_t n_mix = head ? hc : (2 + hc) * hc, width = hc * dim;
    if (n_tok < 0 || hc <= 0 || hc > 64 || dim <= 0 || !h || !fn_w || !base || !scale || !x || (!head && !comb) ||
        sinkhorn_iters < 1 || sinkhorn_iters > 1000)
        return FL_EINVAL;
    if (n_tok == 0) return FL_OK;
    float *normed = malloc(sizeof(float) * (size_t)(n_tok * width));
    float *mixes = malloc(sizeof(float) * (size_t)(n_tok * n_mix));
    int status = normed && mixes ? FL_OK : FL_ENOMEM;
    if (status == FL_OK) status = fl_rms_norm(n_tok, width, h, NULL, norm_eps, normed);
    if (status == FL_OK) status = fl_matmul(fn_type, fn_w, n_mix, width, normed, n_tok, mixes);
    if (status == FL_OK) {
        struct hc_pre_job j = {hc, dim, n_mix, head, sinkhorn_iters, hc_eps, h, mixes, base, scale, x, post, comb};
        for_rows(n_tok, width, hc_pre_tokens, &j);
    }
    free(normed);
    free(mixes);
    return status;
}

struct hc_post_job {
    int64_t hc, dim;
    const float *out, *residual, *post, *comb;
    float *h;
};

static void hc_post_tokens(void *ctx, int64_t lo, int64_t hi) {
    const struct hc_post_job *j = ctx;
    const int64_t hc = j->hc, dim = j->dim;
    for (int64_t t = lo; t < hi; t++)
        for (int64_t b = 0; b < hc; b++) {
            float *hb = j->h + (t * hc + b) * dim;
            const float *o = j->out + t * dim, *c = j->comb + t * hc * hc, *res = j->residual + t * hc * dim;
            float p = j->post[t * hc + b];
            for (int64_t d = 0; d < dim; d++) hb[d] = c[b] * res[d];
            for (int64_t a = 1; a < hc; a++)
                for (int64_t d = 0; d < dim; d++) hb[d] += c[a * hc + b] * res[a * dim + d];
            for (int64_t d = 0; d < dim; d++) hb[d] += p * o[d];
        }
}

int fl_hc_post(int64_t n_tok, int64_t hc, int64_t dim, const float *out, const float *residual, const float *post,
               const float *comb, float *h) {
    if (n_tok < 0 || hc <= 0 || dim <= 0 || (n_tok && (!out || !residual || !post || !comb || !h)))
        return FL_EINVAL;
    struct hc_post_job j = {hc, dim, out, residual, post, comb, h};
    for_rows(n_tok, hc * dim, hc_post_tokens, &j);
    return FL_OK;
}

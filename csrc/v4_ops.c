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

static void rms_norm_row(const float *x, const float *weight, int64_t dim, float eps, float *y) {
    double acc = 0.0; /* the mean of squares in double: one rounding, whatever the row's length */
    for (int64_t i = 0; i < dim; i++) acc += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(acc / (double)dim) + eps);
    for (int64_t i = 0; i < dim; i++) y[i] = weight ? weight[i] * (x[i] * inv) : x[i] * inv;
}

int fl_rms_norm(int64_t rows, int64_t dim, const float *x, const float *weight, float eps, float *y) {
    if (rows < 0 || dim <= 0 || (rows && (!x || !y)) || !(eps >= 0.0f)) return FL_EINVAL;
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * dim, weight, dim, eps, y + r * dim);
    return FL_OK;
}

static float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

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
    for (int64_t t = 0; t < n_tok && status == FL_OK; t++) {
        const float *mix = mixes + t * n_mix, *ht = h + t * width;
        float pre[64];
        for (int64_t a = 0; a < hc; a++) pre[a] = sigmoidf(mix[a] * scale[0] + base[a]) + hc_eps;
        if (!head) {
            for (int64_t a = 0; a < hc; a++) post[t * hc + a] = 2.0f * sigmoidf(mix[hc + a] * scale[1] + base[hc + a]);
            float *c = comb + t * hc * hc;
            for (int64_t i = 0; i < hc * hc; i++) c[i] = mix[2 * hc + i] * scale[2] + base[2 * hc + i];
            sinkhorn(c, hc, sinkhorn_iters, hc_eps);
        }
        float *xt = x + t * dim;
        for (int64_t d = 0; d < dim; d++) xt[d] = pre[0] * ht[d];
        for (int64_t a = 1; a < hc; a++)
            for (int64_t d = 0; d < dim; d++) xt[d] += pre[a] * ht[a * dim + d];
    }
    free(normed);
    free(mixes);
    return status;
}

int fl_hc_post(int64_t n_tok, int64_t hc, int64_t dim, const float *out, const float *residual, const float *post,
               const float *comb, float *h) {
    if (n_tok < 0 || hc <= 0 || dim <= 0 || (n_tok && (!out || !residual || !post || !comb || !h)))
        return FL_EINVAL;
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t b = 0; b < hc; b++) {
            float *hb = h + (t * hc + b) * dim;
            const float *o = out + t * dim, *c = comb + t * hc * hc;
            float p = post[t * hc + b];
            for (int64_t d = 0; d < dim; d++) hb[d] = c[b] * residual[t * hc * dim + d];
            for (int64_t a = 1; a < hc; a++)
                for (int64_t d = 0; d < dim; d++) hb[d] += c[a * hc + b] * residual[(t * hc + a) * dim + d];
            for (int64_t d = 0; d < dim; d++) hb[d] += p * o[d];
        }
    return FL_OK;
}

/* attention.c: DeepSeek V4 attention over a sliding window plus selected compressed rows, with a per-head sink,
 * and the compressor's per-channel softmax pooling. Float32 throughout, the order of operations of the oracle
 * (transformers' eager attention): scores scaled after the dot, softmax over [scores, sink] less their max,
 * probabilities normalised before they weight the rows. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flashlite.h"
#include "vec_f32.h"

static void axpy_f32(float *y, const float *x, float a, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* ---------------------------------------------------------------- sparse attention with sink */

int fl_attn_sink(int64_t n_tok, int64_t n_head, int64_t head_dim, const float *q,
                 const float *win, int64_t n_win, const int32_t *win_range,
                 const float *cmp, int64_t n_cmp, const int32_t *cmp_idx, int64_t k_cmp,
                 const float *sinks, float scale, float *out) {
    if (n_tok < 0 || n_head <= 0 || head_dim <= 0 || n_win < 0 || n_cmp < 0 || k_cmp < 0) return FL_EINVAL;
    if (!q || !sinks || !out || !win_range || (n_win && !win) || (k_cmp && (!cmp_idx || (n_cmp && !cmp))))
        return FL_EINVAL;
    for (int64_t t = 0; t < n_tok; t++) {
        int32_t lo = win_range[2 * t], hi = win_range[2 * t + 1];
        if (lo < 0 || hi < lo || hi > n_win) return FL_EINVAL;
        for (int64_t j = 0; j < k_cmp; j++) {
            int32_t r = cmp_idx[t * k_cmp + j];
            if (r < -1 || r >= n_cmp) return FL_EINVAL;
        }
    }
    int64_t max_seen = n_win + k_cmp;
    float *p = malloc(sizeof(float) * (size_t)(max_seen + 1));
    const float **rows = malloc(sizeof(float *) * (size_t)(max_seen + 1));
    if (!p || !rows) {
        free(p);
        free(rows);
        return FL_ENOMEM;
    }
    for (int64_t t = 0; t < n_tok; t++) {
        int64_t n = 0;
        for (int32_t r = win_range[2 * t]; r < win_range[2 * t + 1]; r++) rows[n++] = win + (int64_t)r * head_dim;
        for (int64_t j = 0; j < k_cmp; j++) {
            int32_t r = cmp_idx[t * k_cmp + j];
            if (r >= 0) rows[n++] = cmp + (int64_t)r * head_dim;
        }
        for (int64_t h = 0; h < n_head; h++) {
            const float *qh = q + (t * n_head + h) * head_dim;
            float *o = out + (t * n_head + h) * head_dim;
            float m = sinks[h];
            for (int64_t i = 0; i < n; i++) {
                p[i] = fl_dot_f32(qh, rows[i], head_dim) * scale;
                if (p[i] > m) m = p[i];
            }
            float sum = expf(sinks[h] - m);
            for (int64_t i = 0; i < n; i++) {
                p[i] = expf(p[i] - m);
                sum += p[i];
            }
            memset(o, 0, sizeof(float) * (size_t)head_dim);
            for (int64_t i = 0; i < n; i++) axpy_f32(o, rows[i], p[i] / sum, head_dim);
        }
    }
    free(p);
    free(rows);
    return FL_OK;
}

/* ---------------------------------------------------------------- compressor pooling */

int fl_compress_pool(int64_t n_rows, int64_t ratio, int64_t d, int overlap, int has_prev,
                     const float *kv, const float *score, float *out) {
    int64_t width = overlap ? 2 * d : d;
    int64_t slots = overlap ? 2 * ratio : ratio;
    if (n_rows < 0 || ratio <= 0 || d <= 0 || slots > 256 || !kv || !score || !out) return FL_EINVAL;
    /* With overlap, row j pools the first d features of window j-1 and the last d of window j; the logs start at
     * the window before the first row when has_prev, else at the first row's window (its missing half is empty). */
    int64_t base = overlap && has_prev ? ratio : 0;
    float *e = malloc(sizeof(float) * (size_t)slots);
    if (!e) return FL_ENOMEM;
    for (int64_t j = 0; j < n_rows; j++) {
        for (int64_t c = 0; c < d; c++) {
            const float *sv[256];
            const float *kvv[256];
            int64_t n = 0;
            int64_t w0 = base + j * ratio; /* first token of window j in the logs */
            if (overlap && (j > 0 || has_prev))
                for (int64_t s = 0; s < ratio; s++) {
                    sv[n] = score + (w0 - ratio + s) * width + c;
                    kvv[n++] = kv + (w0 - ratio + s) * width + c;
                }
            for (int64_t s = 0; s < ratio; s++) {
                sv[n] = score + (w0 + s) * width + (overlap ? d : 0) + c;
                kvv[n++] = kv + (w0 + s) * width + (overlap ? d : 0) + c;
            }
            float m = -INFINITY;
            for (int64_t i = 0; i < n; i++)
                if (*sv[i] > m) m = *sv[i];
            float sum = 0.0f;
            for (int64_t i = 0; i < n; i++) {
                e[i] = expf(*sv[i] - m);
                sum += e[i];
            }
            float acc = 0.0f;
            for (int64_t i = 0; i < n; i++) acc += *kvv[i] * (e[i] / sum);
            out[j * d + c] = acc;
        }
    }
    free(e);
    return FL_OK;
}

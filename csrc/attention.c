/* attention.c: DeepSeek V4 attention over a sliding window plus selected compressed rows, with a per-head sink,
 * and the compressor's per-channel softmax pooling. Float32 throughout, the order of operations of the oracle
 * (transformers' eager attention): scores scaled after the dot, softmax over [scores, sink] less their max,
 * probabilities normalised before they weight the rows. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flashlite.h"
#include "threadpool.h"
#include "vec_f32.h"

/* ---------------------------------------------------------------- sparse attention with sink */

/* One task: the heads [h0, h0 + n) of token t. Each task owns its outputs, so the split (and the thread count)
 * changes no bit of them. */
struct attn_job {
    int64_t n_tok, n_head, head_dim, heads_per_task, tasks_per_tok, max_seen, heads_per_group;
    const float *q, *win, *cmp, *sinks;
    const int32_t *win_range, *cmp_idx;
    int64_t k_cmp;
    float scale;
    float *out;
    const struct fl_f32_kernels *kernels;
    char *scratch; /* per thread: max_seen row pointers, then heads_per_task x max_seen probabilities */
    size_t scratch_bytes;
};

static void attn_task(void *ctx, int64_t task, int thread) {
    const struct attn_job *a = ctx;
    const int64_t hd = a->head_dim, t = task / a->tasks_per_tok, h0 = task % a->tasks_per_tok * a->heads_per_task;
    const int64_t nh = a->n_head - h0 < a->heads_per_task ? a->n_head - h0 : a->heads_per_task;
    const float **rows = (const float **)(a->scratch + (size_t)thread * a->scratch_bytes);
    float *p = (float *)(rows + a->max_seen);
    int64_t n = 0;
    for (int32_t r = a->win_range[2 * t]; r < a->win_range[2 * t + 1]; r++) rows[n++] = a->win + (int64_t)r * hd;
    for (int64_t j = 0; j < a->k_cmp; j++) {
        int32_t r = a->cmp_idx[t * a->k_cmp + j];
        if (r >= 0) rows[n++] = a->cmp + (int64_t)r * hd;
    }
    a->kernels->scores(nh, a->q + (t * a->n_head + h0) * hd, n, rows, hd, a->scale, p);
    for (int64_t h = 0; h < nh; h++) { /* softmax over [scores, sink] less their max, normalised */
        float *ph = p + h * n, sink = a->sinks[h0 + h], m = sink;
        for (int64_t i = 0; i < n; i++)
            if (ph[i] > m) m = ph[i];
        float sum = expf(sink - m);
        for (int64_t i = 0; i < n; i++) {
            ph[i] = expf(ph[i] - m);
            sum += ph[i];
        }
        for (int64_t i = 0; i < n; i++) ph[i] = ph[i] / sum;
    }
    /* each run of heads that stays within one output group is contiguous in out: [group][token][head][dim] */
    const int64_t hg = a->heads_per_group;
    for (int64_t h = h0; h < h0 + nh;) {
        const int64_t g = h / hg, end = (g + 1) * hg < h0 + nh ? (g + 1) * hg : h0 + nh;
        a->kernels->mix(end - h, p + (h - h0) * n, n, rows, hd, a->out + ((g * a->n_tok + t) * hg + h % hg) * hd);
        h = end;
    }
}

int fl_attn_sink(int64_t n_tok, int64_t n_head, int64_t head_dim, const float *q,
                 const float *win, int64_t n_win, const int32_t *win_range,
                 const float *cmp, int64_t n_cmp, const int32_t *cmp_idx, int64_t k_cmp,
                 const float *sinks, float scale, float *out) {
    return fl_attn_sink_grouped(n_tok, n_head, head_dim, q, win, n_win, win_range, cmp, n_cmp, cmp_idx, k_cmp, sinks,
                                scale, 1, out);
}

int fl_attn_sink_grouped(int64_t n_tok, int64_t n_head, int64_t head_dim, const float *q,
                         const float *win, int64_t n_win, const int32_t *win_range,
                         const float *cmp, int64_t n_cmp, const int32_t *cmp_idx, int64_t k_cmp,
                         const float *sinks, float scale, int64_t n_group, float *out) {
    if (n_tok < 0 || n_head <= 0 || head_dim <= 0 || n_win < 0 || n_cmp < 0 || k_cmp < 0) return FL_EINVAL;
    if (n_group <= 0 || n_head % n_group || (n_group > 1 && out == q)) return FL_EINVAL;
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
    if (!n_tok) return FL_OK;
    /* a token's heads in one task while there are tokens enough for every thread, else in parts of at least four
     * heads (the kernels' block) so that a decode step's one token still spreads */
    int threads = fl_threads_get();
    int64_t per_task = n_head;
    while (per_task > 4 && n_tok * ((n_head + per_task - 1) / per_task) < 4 * (int64_t)threads)
        per_task = (per_task / 2 + 3) & ~(int64_t)3;
    struct attn_job a = {n_tok, n_head, head_dim, per_task, (n_head + per_task - 1) / per_task, n_win + k_cmp + 1,
                         n_head / n_group, q, win, cmp, sinks, win_range, cmp_idx, k_cmp, scale, out,
                         fl_f32_kernels(), NULL, 0};
    a.scratch_bytes = ((sizeof(float *) + sizeof(float) * (size_t)per_task) * (size_t)a.max_seen + 63) & ~(size_t)63;
    a.scratch = malloc(a.scratch_bytes * (size_t)threads);
    if (!a.scratch) return FL_ENOMEM;
    fl_parallel_for(n_tok * a.tasks_per_tok, threads, attn_task, &a);
    free(a.scratch);
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

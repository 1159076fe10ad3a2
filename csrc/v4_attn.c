/* v4_attn.c: the CPU backend's fused attention sublayer of DeepSeek V4 for a decode step or a short batch (a
 * verified draft), and the two operations of it that the model also calls on its own: the Hadamard rotation and
 * the indexer's top-k.
 *
 * fl_v4_attn runs, for the n tokens at positions pos..: hyper-connection collapse, norm, the projections of q (low
 * rank, per-head norm, RoPE) and of the shared KV row (norm, RoPE), then token by token the row's store into the
 * window log, the compressor (and the indexer's compressor) update with a pooled row when a window closes, the
 * indexer's picks and attention with sink over the window and the picked compressed rows, then the rotation
 * undone, the grouped output projection, expansion. These are the C operations the Python definition
 * (flashlite/models/deepseek_v4.py: Attention, Compressor, Indexer) calls, in its order; the products take the
 * batch's tokens together, which gives each token the bits it gets alone (matmul.c), so a batch is bitwise n
 * one-token steps and those are bitwise the definition. The logs are the caller's (flashlite/kv_cache.py): it
 * reserves room for the rows a step may append; this appends them and moves each log's end. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flashlite.h"
#include "threadpool.h"
#include "vec_f32.h"

int fl_hadamard(int64_t n_rows, int64_t dim, const float *x, float *y) {
    if (n_rows < 0 || dim <= 0 || (dim & (dim - 1)) || (n_rows && (!x || !y))) return FL_EINVAL;
    float s = (float)(1.0 / sqrt((double)dim));
    for (int64_t r = 0; r < n_rows; r++) {
        float *v = y + r * dim;
        if (v != x + r * dim) memcpy(v, x + r * dim, sizeof(float) * (size_t)dim);
        /* the butterflies of the Sylvester matrix, natural order: entry (i, j) is (-1)^popcount(i & j) */
        for (int64_t len = 1; len < dim; len *= 2)
            for (int64_t i = 0; i < dim; i += 2 * len)
                for (int64_t j = i; j < i + len; j++) {
                    float a = v[j], b = v[j + len];
                    v[j] = a + b;
                    v[j + len] = a - b;
                }
        for (int64_t i = 0; i < dim; i++) v[i] *= s;
    }
    return FL_OK;
}

/* One task: one query's scores of its visible rows, KEY_BLOCK rows at a time through the blocked f32 kernels,
 * then its picks. Each task owns its outputs, so the thread count changes no bit. */
enum { KEY_BLOCK = 128 };
struct topk_job {
    int64_t n_heads, head_dim, n_keys, topk;
    const float *q, *head_weights, *keys;
    const int32_t *visible;
    float scale;
    int32_t *picks;
    const struct fl_f32_kernels *kernels;
    char *scratch; /* per thread: n_keys totals, KEY_BLOCK row pointers, n_heads x KEY_BLOCK dots, n_keys rows */
    size_t scratch_bytes;
};

struct scored {
    float score;
    int32_t row;
};

static int best_first(const void *pa, const void *pb) {
    const struct scored *a = pa, *b = pb;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    return (a->row > b->row) - (a->row < b->row);
}

static void topk_task(void *ctx, int64_t t, int thread) {
    const struct topk_job *j = ctx;
    const int64_t H = j->n_heads, n = j->visible[t];
    float *total = (float *)(j->scratch + (size_t)thread * j->scratch_bytes);
    const float **rows = (const float **)(total + ((j->n_keys + 2) & ~(int64_t)1));
    float *dots = (float *)(rows + KEY_BLOCK);
    for (int64_t k0 = 0; k0 < n; k0 += KEY_BLOCK) {
        int64_t nk = n - k0 < KEY_BLOCK ? n - k0 : KEY_BLOCK;
        for (int64_t k = 0; k < nk; k++) rows[k] = j->keys + (k0 + k) * j->head_dim;
        j->kernels->scores(H, j->q + t * H * j->head_dim, nk, rows, j->head_dim, 1.0f, dots);
        for (int64_t k = 0; k < nk; k++) {
            float s = 0.0f;
            for (int64_t h = 0; h < H; h++) {
                float d = dots[h * nk + k];
                s += (d > 0.0f ? d : 0.0f) * j->scale * j->head_weights[t * H + h];
            }
            total[k0 + k] = s;
        }
    }
    /* best first, ties to the lower row (a total order, so any sort gives the same picks); NaN scores never
     * picked; -1 past the visible rows */
    struct scored *order = (struct scored *)(dots + H * KEY_BLOCK);
    int64_t m = 0;
    for (int64_t k = 0; k < n; k++)
        if (total[k] == total[k]) order[m++] = (struct scored){total[k], (int32_t)k};
    qsort(order, (size_t)m, sizeof(*order), best_first);
    int32_t *out = j->picks + t * j->topk;
    for (int64_t p = 0; p < j->topk; p++) out[p] = p < m ? order[p].row : -1;
}

int fl_indexer_topk(int64_t n_tok, int64_t n_heads, int64_t head_dim, const float *q, const float *head_weights,
                    const float *keys, int64_t n_keys, const int32_t *visible, int64_t topk, float scale,
                    int32_t *picks) {
    if (n_tok < 0 || n_heads <= 0 || head_dim <= 0 || n_keys < 0 || topk <= 0 || !picks ||
        (n_tok && (!q || !head_weights || !visible)) || (n_keys && !keys))
        return FL_EINVAL;
    for (int64_t t = 0; t < n_tok; t++)
        if (visible[t] < 0 || visible[t] > n_keys) return FL_EINVAL;
    if (!n_tok) return FL_OK;
    int threads = fl_threads_get();
    struct topk_job j = {n_heads, head_dim, n_keys, topk, q, head_weights, keys, visible, scale, picks,
                         fl_f32_kernels(), NULL, 0};
    j.scratch_bytes = (sizeof(float) * (size_t)((n_keys + 2) & ~(int64_t)1) + sizeof(float *) * KEY_BLOCK +
                       sizeof(float) * (size_t)(n_heads * KEY_BLOCK) + sizeof(struct scored) * (size_t)n_keys + 63) &
                      ~(size_t)63;
    j.scratch = malloc(j.scratch_bytes * (size_t)threads);
    if (!j.scratch) return FL_ENOMEM;
    fl_parallel_for(n_tok, threads, topk_task, &j);
    free(j.scratch);
    return FL_OK;
}

/* rotate the last rope_dim dims of each of n rows of dim by cs (cos then sin, rope_dim / 2 each), as fl_rope */
static void rope_rows(float *x, int64_t n, int64_t dim, int64_t rope_dim, const float *cs, int inverse) {
    fl_rope(1, n, dim, rope_dim, cs, cs + rope_dim / 2, inverse, x);
}

static uint8_t *log_row(const struct fl_row_log *log, int64_t pos, int64_t row_bytes) {
    return log->buf + (pos - log->start) * row_bytes;
}

/* store n rows (f32 [n, dim]) at the end of log in format kind (0: f32) */
static int log_append(struct fl_row_log *log, int kind, int64_t dim, int64_t rope_dim, const float *rows,
                      int64_t n) {
    if (log->end + n > log->start + log->cap) return FL_EINVAL;
    int status = FL_OK;
    if (kind)
        status = fl_kv_pack(kind, n, dim, rope_dim, rows, log_row(log, log->end, fl_kv_row_bytes(kind, dim, rope_dim)));
    else
        memcpy(log_row(log, log->end, dim * 4), rows, sizeof(float) * (size_t)(n * dim));
    if (status == FL_OK) log->end += n;
    return status;
}

/* rows [lo, hi) of log as f32: a pointer into an f32 log, else unpacked into scratch */
static const float *log_rows(const struct fl_row_log *log, int kind, int64_t dim, int64_t rope_dim, int64_t lo,
                             int64_t hi, float *scratch, int *status) {
    if (lo < log->start || hi > log->end || lo > hi) {
        *status = FL_EINVAL;
        return NULL;
    }
    if (!kind) return (const float *)log_row(log, lo, dim * 4);
    if (hi > lo)
        *status = fl_kv_unpack(kind, hi - lo, dim, rope_dim, log_row(log, lo, fl_kv_row_bytes(kind, dim, rope_dim)),
                               hi - lo, NULL, scratch);
    return scratch;
}

/* A compressor's step: the token's kv and score (+ ape of its slot) into the state logs, and when its window
 * closes the pooled row, normed, rotated by RoPE at the row's first position (cs_row), Hadamard-rotated if
 * asked, into the row log. */
static int compressor_step(const struct fl_v4_compressor *c, int64_t ratio, int64_t rope_dim, float norm_eps,
                           int64_t pos, const float *kv, float *score, const float *cs_row, struct fl_row_log *lkv,
                           struct fl_row_log *lscore, struct fl_row_log *lrows, float *scratch) {
    int64_t d = c->head_dim, width = c->overlap ? 2 * d : d;
    const float *ape = c->ape + (pos % ratio) * width;
    for (int64_t i = 0; i < width; i++) score[i] += ape[i];
    int status = log_append(lkv, 0, width, 0, kv, 1);
    if (status == FL_OK) status = log_append(lscore, 0, width, 0, score, 1);
    int64_t first = lrows->end, last = (pos + 1) / ratio;
    if (status != FL_OK || last <= first) return status;
    if (last - first != 1 || !cs_row) return FL_EINVAL;
    int has_prev = c->overlap && first > 0;
    int64_t lo = has_prev ? (first - 1) * ratio : first * ratio;
    if (lo < lkv->start) return FL_EINVAL;
    float *pooled = scratch, *row = scratch + d;
    status = fl_compress_pool(1, ratio, d, c->overlap, has_prev, (const float *)log_row(lkv, lo, width * 4),
                              (const float *)log_row(lscore, lo, width * 4), pooled);
    if (status == FL_OK) status = fl_rms_norm(1, d, pooled, c->norm, norm_eps, row);
    if (status != FL_OK) return status;
    rope_rows(row, 1, d, rope_dim, cs_row, 0);
    if (c->rotated) status = fl_hadamard(1, d, row, row);
    return status == FL_OK ? log_append(lrows, c->row_kind, d, c->row_rope_dim, row, 1) : status;
}

/* The buffers of one step: the batch's rows, and scratch one token at a time reuses. */
struct step_bufs {
    float *q, *kv, *ckv, *cscore, *ikv, *iscore, *ihw, *iq, *iqr, *pool, *win, *rows, *o;
    int32_t *picks;
};

/* The part of the attention that runs token by token, for the token at position pos (row t of the batch's
 * buffers): RoPE on its query, its KV row into the window log, the compressors' update, the indexer's picks and
 * attention over the window and the picked rows, its rotation undone. The rows a token stores are there for the
 * batch's next token, as in sequential decode. */
static int token_attention(const struct fl_v4_attn *p, struct fl_v4_attn_cache *cache, int64_t pos, int64_t t,
                           const float *cs_tok, const float *cs_row, const struct step_bufs *b) {
    const int64_t H = p->n_heads, hd = p->head_dim, rd = p->rope_dim, r = p->ratio;
    const int64_t IH = p->index_heads, ID = p->index_dim;
    const int64_t cw = r ? p->comp.head_dim * (p->comp.overlap ? 2 : 1) : 0, iw = r == 4 ? 2 * ID : 0;
    const int64_t n_rows = r ? (pos + 1) / r : 0;
    const int crowded = r == 4 && n_rows > p->index_topk;
    float *q = b->q + t * H * hd, *kv = b->kv + t * hd, *o = b->o + t * H * hd;
    int32_t *picks = b->picks;
    rope_rows(q, H, hd, rd, cs_tok, 0);
    rope_rows(kv, 1, hd, rd, cs_tok, 0);
    int status = log_append(&cache->kv, p->kv_kind, hd, rd, kv, 1);
    if (status == FL_OK && r)
        status = compressor_step(&p->comp, r, rd, p->norm_eps, pos, b->ckv + t * cw, b->cscore + t * cw, cs_row,
                                 &cache->ckv, &cache->cscore, &cache->crows, b->pool);
    int64_t k_cmp = 0;
    if (status == FL_OK && r == 4) {
        status = compressor_step(&p->icomp, r, rd, p->norm_eps, pos, b->ikv + t * iw, b->iscore + t * iw, cs_row,
                                 &cache->ikv, &cache->iscore, &cache->irows, b->pool);
        k_cmp = n_rows < p->index_topk ? n_rows : p->index_topk;
        for (int64_t j = 0; j < k_cmp; j++) picks[j] = (int32_t)j;
        if (status == FL_OK && crowded) {
            float *iq = b->iq + t * IH * ID, *ihw = b->ihw + t * IH;
            rope_rows(iq, IH, ID, rd, cs_tok, 0);
            if (p->icomp.rotated) {
                /* the queries rounded as the rows are stored: Hadamard, then the row format's grid */
                status = fl_hadamard(IH, ID, iq, iq);
                uint8_t *packed = (uint8_t *)b->iqr; /* a packed row is smaller than its floats */
                if (status == FL_OK) status = fl_kv_pack(p->icomp.row_kind, IH, ID, 0, iq, packed);
                if (status == FL_OK) status = fl_kv_unpack(p->icomp.row_kind, IH, ID, 0, packed, IH, NULL, iq);
            }
            for (int64_t i = 0; i < IH; i++) ihw[i] *= p->index_weight_scale;
            const float *keys = status == FL_OK ? log_rows(&cache->irows, p->icomp.row_kind, ID, 0, 0, n_rows,
                                                           b->rows, &status) : NULL;
            int32_t visible = (int32_t)n_rows;
            if (status == FL_OK)
                status = fl_indexer_topk(1, IH, ID, iq, ihw, keys, n_rows, &visible, p->index_topk,
                                         p->index_score_scale, picks);
        }
    } else if (status == FL_OK && r) {
        k_cmp = n_rows;
        for (int64_t j = 0; j < k_cmp; j++) picks[j] = (int32_t)j;
    }
    /* attention over the window rows and the picked compressed rows, each as stored */
    int64_t lo = pos - p->window + 1 > 0 ? pos - p->window + 1 : 0;
    const float *window = status == FL_OK ? log_rows(&cache->kv, p->kv_kind, hd, rd, lo, pos + 1, b->win, &status)
                                          : NULL;
    const float *cmp = b->rows;
    int64_t n_cmp = 0;
    if (status == FL_OK && k_cmp) {
        if (p->kv_kind) { /* unpack the picked rows, in pick order */
            for (int64_t j = 0; j < k_cmp && status == FL_OK; j++) {
                if (picks[j] < 0) continue;
                status = fl_kv_unpack(p->kv_kind, 1, hd, rd, cache->crows.buf, cache->crows.end - cache->crows.start,
                                      &picks[j], b->rows + n_cmp * hd);
                picks[j] = (int32_t)n_cmp++;
            }
        } else {
            cmp = log_rows(&cache->crows, 0, hd, rd, 0, cache->crows.end, NULL, &status);
            n_cmp = cache->crows.end;
        }
    }
    int32_t range[2] = {0, (int32_t)(pos + 1 - lo)};
    if (status == FL_OK)
        status = fl_attn_sink(1, H, hd, q, window, pos + 1 - lo, range, cmp, n_cmp, picks, k_cmp, p->sinks,
                              p->attn_scale, o);
    if (status == FL_OK) rope_rows(o, H, hd, rd, cs_tok, 1);
    return status;
}

int fl_v4_attn(const struct fl_v4_attn *p, struct fl_v4_attn_cache *cache, int64_t pos, int64_t n_tok,
               const float *cs_tok, const float *cs_row, const float *h, float *h_out) {
    if (!p || !cache || pos < 0 || n_tok <= 0 || !cs_tok || !h || !h_out || p->dim <= 0 || p->hc <= 0 ||
        p->n_heads <= 0 || p->head_dim <= 0 || p->o_groups <= 0 || p->n_heads % p->o_groups || p->window <= 0)
        return FL_EINVAL;
    const int64_t n = n_tok, dim = p->dim, hc = p->hc, H = p->n_heads, hd = p->head_dim, rd = p->rope_dim;
    const int64_t r = p->ratio, IH = p->index_heads, ID = p->index_dim, G = p->o_groups;
    /* the batch's last token sees the most compressed rows: the scratch is sized for it */
    const int64_t n_win_max = p->window, n_rows = r ? (pos + n) / r : 0;
    const int crowded = r == 4 && n_rows > p->index_topk; /* some token of the batch runs the indexer */
    const int64_t cw = r ? p->comp.head_dim * (p->comp.overlap ? 2 : 1) : 0, iw = r == 4 ? 2 * ID : 0;
    const int64_t k_group = H / G * hd;
    /* rows unpacked from packed logs: the attention's picks, the indexer's keys */
    const int64_t att_rows = p->kv_kind && r ? (r == 4 && n_rows > p->index_topk ? p->index_topk : n_rows) : 0;
    const int64_t key_floats = crowded && p->icomp.row_kind ? n_rows * ID : 0;
    /* every buffer of the step in one allocation */
    int64_t sizes[] = {
        n * dim,                          /* x: the collapse */
        n * (hc + hc * hc),               /* post, comb */
        n * dim,                          /* xa: normed */
        n * p->q_rank, n * p->q_rank,     /* qa, qr */
        n * hd,                           /* kv */
        n * cw, n * cw, n * iw, n * iw, n * IH, /* compressor kv, score; indexer kv, score; indexer head weights */
        n * H * hd, n * H * hd,           /* q, attention output */
        n * IH * ID, IH * ID,             /* indexer queries; one token's rounded */
        4 * hd + 4 * ID,                  /* a pooled row and its normed form, for either compressor */
        p->kv_kind ? n_win_max * hd : 0,  /* one token's window rows unpacked */
        att_rows * hd > key_floats ? att_rows * hd : key_floats, /* one token's compressed rows unpacked */
        n * H * hd,                       /* the attention output by group: [G, n, H / G * hd] */
        n * G * p->o_rank, n * G * p->o_rank, /* the grouped output by group [G, n, o_rank], and by token */
        n * dim,                          /* the sublayer's output */
    };
    enum { N_BUF = sizeof(sizes) / sizeof(sizes[0]) };
    float *buf[N_BUF];
    int64_t total = 0;
    for (int i = 0; i < N_BUF; i++) total += (sizes[i] + 15) & ~(int64_t)15;
    float *mem = malloc(sizeof(float) * (size_t)total);
    int32_t *picks = malloc(sizeof(int32_t) * (size_t)(n_rows + p->index_topk + 1));
    struct fl_matmul_item *items = malloc(sizeof(*items) * (size_t)(G > 8 ? G : 8));
    if (!mem || !picks || !items) {
        free(mem);
        free(picks);
        free(items);
        return FL_ENOMEM;
    }
    for (int64_t i = 0, off = 0; i < N_BUF; off += (sizes[i] + 15) & ~(int64_t)15, i++) buf[i] = mem + off;
    float *x = buf[0], *post = buf[1], *comb = buf[1] + n * hc, *xa = buf[2], *qa = buf[3], *qr = buf[4];
    float *by_group = buf[18], *y_group = buf[19], *grouped = buf[20], *out = buf[21];
    struct step_bufs b = {.q = buf[11], .kv = buf[5], .ckv = buf[6], .cscore = buf[7], .ikv = buf[8],
                          .iscore = buf[9], .ihw = buf[10], .iq = buf[13], .iqr = buf[14], .pool = buf[15],
                          .win = buf[16], .rows = buf[17], .o = buf[12], .picks = picks};

    /* the batch's rows through the products at once (a token's results are the same bits alone or batched) */
    int status = fl_hc_pre(n, hc, dim, h, p->hc_fn_type, p->hc_fn, p->hc_base, p->hc_scale, p->sinkhorn_iters,
                           p->hc_eps, p->norm_eps, x, post, comb);
    if (status == FL_OK) status = fl_rms_norm(n, dim, x, p->attn_norm, p->norm_eps, xa);
    /* the products of xa in one run of the core, then those of the query latent */
    int m = 0;
    if (status == FL_OK) {
        items[m++] = (struct fl_matmul_item){p->wq_a.type, p->wq_a.w, p->q_rank, dim, xa, n, qa};
        items[m++] = (struct fl_matmul_item){p->wkv.type, p->wkv.w, hd, dim, xa, n, b.kv};
        if (r) {
            items[m++] = (struct fl_matmul_item){p->comp.wkv.type, p->comp.wkv.w, cw, dim, xa, n, b.ckv};
            items[m++] = (struct fl_matmul_item){p->comp.wgate.type, p->comp.wgate.w, cw, dim, xa, n, b.cscore};
        }
        if (r == 4) {
            items[m++] = (struct fl_matmul_item){p->icomp.wkv.type, p->icomp.wkv.w, iw, dim, xa, n, b.ikv};
            items[m++] = (struct fl_matmul_item){p->icomp.wgate.type, p->icomp.wgate.w, iw, dim, xa, n, b.iscore};
            if (crowded) items[m++] = (struct fl_matmul_item){p->iproj.type, p->iproj.w, IH, dim, xa, n, b.ihw};
        }
        status = fl_matmul_batch(m, items);
    }
    if (status == FL_OK) status = fl_rms_norm(n, p->q_rank, qa, p->q_norm, p->norm_eps, qr);
    if (status == FL_OK) {
        m = 0;
        items[m++] = (struct fl_matmul_item){p->wq_b.type, p->wq_b.w, H * hd, p->q_rank, qr, n, b.q};
        if (crowded) items[m++] = (struct fl_matmul_item){p->iq_b.type, p->iq_b.w, IH * ID, p->q_rank, qr, n, b.iq};
        status = fl_matmul_batch(m, items);
    }
    if (status == FL_OK) status = fl_rms_norm(n * H, hd, b.q, NULL, p->norm_eps, b.q);
    if (status == FL_OK) status = fl_rms_norm(n, hd, b.kv, p->kv_norm, p->norm_eps, b.kv);
    for (int64_t t = 0; t < n && status == FL_OK; t++)
        status = token_attention(p, cache, pos + t, t, cs_tok + t * rd, cs_row ? cs_row + t * rd : NULL, &b);
    if (status == FL_OK) {
        /* group g (heads g*H/G..) through its own o_rank rows of wo_a, the batch's rows of a group together */
        int64_t row_bytes = fl_row_bytes(p->wo_a.type, k_group);
        for (int64_t g = 0; g < G; g++) {
            for (int64_t t = 0; t < n; t++)
                memcpy(by_group + (g * n + t) * k_group, b.o + t * H * hd + g * k_group,
                       sizeof(float) * (size_t)k_group);
            items[g] = (struct fl_matmul_item){p->wo_a.type, (const uint8_t *)p->wo_a.w + g * p->o_rank * row_bytes,
                                               p->o_rank, k_group, by_group + g * n * k_group, n,
                                               y_group + g * n * p->o_rank};
        }
        status = fl_matmul_batch(G, items);
        for (int64_t g = 0; g < G && status == FL_OK; g++)
            for (int64_t t = 0; t < n; t++)
                memcpy(grouped + (t * G + g) * p->o_rank, y_group + (g * n + t) * p->o_rank,
                       sizeof(float) * (size_t)p->o_rank);
    }
    if (status == FL_OK) status = fl_matmul(p->wo_b.type, p->wo_b.w, dim, G * p->o_rank, grouped, n, out);
    if (status == FL_OK) status = fl_hc_post(n, hc, dim, out, h, post, comb, h_out);
    free(mem);
    free(picks);
    free(items);
    return status;
}

int fl_v4_layer(const struct fl_v4_attn *attn, struct fl_v4_attn_cache *cache, const struct fl_v4_ffn *ffn,
                int64_t pos, int64_t n_tok, const int64_t *tokens, const float *cs_tok, const float *cs_row,
                const float *h, float *h_out) {
    if (!attn || !ffn || !tokens || n_tok <= 0 || attn->dim != ffn->dim || attn->hc != ffn->hc || attn->dim <= 0 ||
        attn->hc <= 0)
        return FL_EINVAL;
    float *mid = malloc(sizeof(float) * (size_t)(n_tok * attn->hc * attn->dim));
    if (!mid) return FL_ENOMEM;
    int status = fl_v4_attn(attn, cache, pos, n_tok, cs_tok, cs_row, h, mid);
    if (status == FL_OK) status = fl_v4_ffn(ffn, n_tok, mid, tokens, h_out);
    free(mid);
    return status;
}

/* whether log has room for n more rows */
static int has_room(const struct fl_row_log *log, int64_t n) { return log->end + n <= log->start + log->cap; }

int64_t fl_v4_step_short(int64_t n_layers, const struct fl_v4_step_layer *layers, int64_t n_tok, int8_t *short_of) {
    if (n_layers < 0 || n_tok < 0 || (n_layers && (!layers || !short_of))) return FL_EINVAL;
    int64_t n_short = 0;
    for (int64_t i = 0; i < n_layers; i++) {
        const struct fl_v4_attn *p = layers[i].attn;
        const struct fl_v4_attn_cache *c = layers[i].cache;
        if (!p || !c) return FL_EINVAL;
        /* the logs a step appends to: the window's; a compressor's kv, score and (at most n_tok) rows */
        int room = has_room(&c->kv, n_tok);
        if (p->ratio)
            room = room && has_room(&c->ckv, n_tok) && has_room(&c->cscore, n_tok) && has_room(&c->crows, n_tok);
        if (p->ratio == 4)
            room = room && has_room(&c->ikv, n_tok) && has_room(&c->iscore, n_tok) && has_room(&c->irows, n_tok);
        short_of[i] = (int8_t)!room;
        n_short += !room;
    }
    return n_short;
}

int fl_v4_step(int64_t n_layers, const struct fl_v4_step_layer *layers, int64_t pos, int64_t n_tok,
               const int64_t *tokens, const float *const *cs_tok, const float *const *cs_row, const float *h,
               float *h_out) {
    if (n_layers <= 0 || !layers || n_tok <= 0 || !cs_tok || !h || !h_out || !layers[0].attn) return FL_EINVAL;
    for (int64_t i = 0; i < n_layers; i++) /* every layer checked before the first one writes its logs */
        if (!layers[i].attn || layers[i].attn->hc != layers[0].attn->hc || layers[i].attn->dim != layers[0].attn->dim ||
            layers[i].table < 0)
            return FL_EINVAL;
    /* the streams between layers go back and forth between two buffers, the last layer writes h_out */
    size_t bytes = sizeof(float) * (size_t)(n_tok * layers[0].attn->hc * layers[0].attn->dim);
    float *mid[2] = {malloc(bytes), malloc(bytes)};
    int status = mid[0] && mid[1] ? FL_OK : FL_ENOMEM;
    const float *in = h;
    for (int64_t i = 0; i < n_layers && status == FL_OK; i++) {
        const struct fl_v4_step_layer *l = &layers[i];
        float *out = i == n_layers - 1 ? h_out : mid[i & 1];
        status = fl_v4_layer(l->attn, l->cache, l->ffn, pos, n_tok, tokens, cs_tok[l->table],
                             cs_row ? cs_row[l->table] : NULL, in, out);
        in = out;
    }
    free(mid[0]);
    free(mid[1]);
    return status;
}

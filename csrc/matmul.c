/* matmul.c: Y = X W^T for any weight format, split across the thread pool.
 * One arithmetic for any number of tokens: the activations are quantized once per call to the format's act
 * type (as ggml pairs them; float formats read them as f32), and every (row, token) pair goes through the
 * format's SIMD dot. So a token's outputs are the same bits whether it arrives alone, in a chunk or in a
 * prefill, and a cache filled by a prefill continues exactly as one filled token by token.
 * One token streams each weight row once through the dot, bound by memory bandwidth. Many tokens are cut in
 * tiles of rows x tokens: a group of rows that fits L1 meets, up to FL_DOT_TOKENS tokens at a time, every token of a
 * tile whose activations fit L2, so a weight row comes from memory once per tile of tokens, the dots run from cache
 * (ggml's mul_mat blocks its vec_dots the same way), and a token dot unpacks a row's weights once for all of its
 * tokens. */
#include <stdlib.h>
#include <string.h>
#include "flashlite.h"
#include "kernels.h"
#include "threadpool.h"

/* A task takes at least this many weight bytes (and rows), enough for four long read streams. A batch that reads
 * fewer weight bytes (times tokens) runs on the caller alone: handing a worker part of it and waiting for the last
 * task costs about what the split saves (a 256 x 256 Q8_0 product of 68 KB takes 3 us on one thread and no less on
 * two), a worker woken for it spins on afterwards while another program may need its core, and a worker whose core
 * another program holds can stall the job. Every decode product of a full-width V4 reads more than this; a tiny
 * model's read less, so its decode steps never wake the pool. */
#define TASK_BYTES (512 << 10)
#define TASK_ROWS 64
/* weight rows multiplied together by each token of a tile: they stay in L1 (48 KiB on the CPUs measured) */
#define GROUP_BYTES (32 << 10)
/* a tile's prepared activations: they stay in L2 (1-2 MiB) while every group of rows passes over them */
#define TILE_ACT_BYTES (512 << 10)
/* tokens whose activations one preparation task quantizes */
#define PREP_TOKENS 8
/* below this many tokens to quantize in all, the caller quantizes them alone */
#define PREP_INLINE_TOKENS 32

struct matmul_job {
    fl_vec_dot_fn dot;
    fl_vec_dot4_fn dot4;
    fl_vec_dot_tn_fn dot_tn;
    const struct fl_gemm_kernel *gemm; /* many tokens through the prefill kernel: x_row is then a panel's bytes */
    const uint8_t *w;
    size_t w_row;
    const uint8_t *xq;
    size_t x_row;
    int64_t rows, k, n_tok;
    int64_t chunk;       /* rows per task */
    int64_t tile;        /* tokens per task */
    int64_t group;       /* rows per L1 group */
    float *y;
    int dot_prefetches;  /* the dot streams its own prefetches (struct fl_decode_kernel) */
    /* the activations to quantize into xq (NULL: already there, shared or f32) */
    const float *x;
    const struct fl_decode_kernel *dk;
    fl_from_float_fn from_float;
};

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static int64_t row_chunks(const struct matmul_job *j) { return (j->rows + j->chunk - 1) / j->chunk; }
static int64_t token_tiles(const struct matmul_job *j) { return (j->n_tok + j->tile - 1) / j->tile; }
static int64_t job_tasks(const struct matmul_job *j) { return row_chunks(j) * token_tiles(j); }

/* One token: rows from four quarters of the range at once where the format has a four-row dot. Four streams
 * far apart keep more reads in flight than one, which the hardware prefetcher follows page by page. */
static void one_token(const struct matmul_job *j, int64_t r0, int64_t r1) {
    if (j->dot4) {
        int64_t q = (r1 - r0) / 4;
        float s[4];
        for (int64_t i = 0; i < q; i++) {
            const void *rows[4];
            for (int v = 0; v < 4; v++)
                rows[v] = j->w + (r0 + v * q + i) * j->w_row;
            j->dot4(j->k, s, rows, j->xq);
            for (int v = 0; v < 4; v++)
                j->y[r0 + v * q + i] = s[v];
        }
        r0 += 4 * q;
    }
    /* the compute-heavy dots keep few loads in flight, so fetch the row FL_PREFETCH_BYTES ahead by hand, into
     * L2 (T1): a non-temporal hint, which skips L2, halved the decode rate of every format measured. A dot
     * that prefetches as it goes does better still: 5-25% faster for Q8_0 and Q4_K than this burst per row */
    int64_t ahead = (FL_PREFETCH_BYTES + (int64_t)j->w_row - 1) / (int64_t)j->w_row;
    for (int64_t r = r0; r < r1; r++) {
        if (!j->dot_prefetches && r + ahead < r1) {
            const uint8_t *next = j->w + (r + ahead) * j->w_row;
            for (size_t off = 0; off < j->w_row; off += 64)
                __builtin_prefetch(next + off, 0, 2);
        }
        j->dot(j->k, &j->y[r], j->w + r * j->w_row, j->xq);
    }
}

/* Up to FL_DOT_TOKENS tokens t0..t1 by rows r0..r1 through the token dot, which reads each row once for all of them:
 * rows from four quarters of the range in turn, four streams far apart as one_token reads them, where one row after
 * another kept one stream in flight and cost 1.6x one token's time at 2 tokens (BF16 from memory). */
static void few_tokens(const struct matmul_job *j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    int count = (int)(t1 - t0);
    const void *xs[FL_DOT_TOKENS];
    float s[FL_DOT_TOKENS];
    for (int c = 0; c < count; c++)
        xs[c] = j->xq + (t0 + c) * j->x_row;
    int64_t q = (r1 - r0) / 4;
    for (int64_t i = 0; i < (r1 - r0); i++) {
        /* rows r0 + v q + i' for v = 0..3 in turn, then the last (r1 - r0) % 4 in order */
        int64_t r = i < 4 * q ? r0 + (i % 4) * q + i / 4 : r0 + i;
        j->dot_tn(j->k, s, j->w + r * j->w_row, xs, count);
        for (int c = 0; c < count; c++)
            j->y[(t0 + c) * j->rows + r] = s[c];
    }
}

/* Tokens t0..t1 by rows r0..r1, a group of rows at a time: up to FL_DOT_TOKENS tokens at once through the format's
 * token dot where it has one, else four rows at once through its four-row dot. Each
 * result of either is bitwise the one-row dot's, so the grouping changes no output. */
static void token_tile(const struct matmul_job *j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    for (int64_t g0 = r0; g0 < r1; g0 += j->group) {
        int64_t g1 = min64(g0 + j->group, r1);
        if (!j->dot_prefetches) /* the next group, while this one is multiplied */
            for (const uint8_t *p = j->w + g1 * j->w_row, *end = j->w + min64(g1 + j->group, r1) * j->w_row; p < end;
                 p += 64)
                __builtin_prefetch(p, 0, 2);
        int64_t t = t0;
        while (j->dot_tn && t < t1) {
            /* chunks as even as FL_DOT_TOKENS allows: 9 tokens go as 5 + 4, not as 8 and a lone one */
            int64_t chunks = (t1 - t + FL_DOT_TOKENS - 1) / FL_DOT_TOKENS;
            int count = (int)((t1 - t + chunks - 1) / chunks);
            const void *xs[FL_DOT_TOKENS];
            float s[FL_DOT_TOKENS];
            for (int c = 0; c < count; c++)
                xs[c] = j->xq + (t + c) * j->x_row;
            for (int64_t r = g0; r < g1; r++) {
                j->dot_tn(j->k, s, j->w + r * j->w_row, xs, count);
                for (int c = 0; c < count; c++)
                    j->y[(t + c) * j->rows + r] = s[c];
            }
            t += count;
        }
        for (; t < t1; t++) {
            const uint8_t *xt = j->xq + t * j->x_row;
            float *yt = j->y + t * j->rows;
            int64_t r = g0;
            if (j->dot4)
                for (; r + 4 <= g1; r += 4) {
                    const void *rows[4] = {j->w + r * j->w_row, j->w + (r + 1) * j->w_row,
                                           j->w + (r + 2) * j->w_row, j->w + (r + 3) * j->w_row};
                    j->dot4(j->k, yt + r, rows, xt);
                }
            for (; r < g1; r++)
                j->dot(j->k, yt + r, j->w + r * j->w_row, xt);
        }
    }
}

static void matmul_task(const struct matmul_job *j, int64_t task) {
    int64_t chunk = task / token_tiles(j), tile = task % token_tiles(j);
    int64_t r0 = chunk * j->chunk, r1 = min64(r0 + j->chunk, j->rows);
    int64_t t0 = tile * j->tile, t1 = min64(t0 + j->tile, j->n_tok);
    if (j->gemm) /* a tile is whole panels */
        j->gemm->run(j->k, j->w + r0 * j->w_row, j->w_row, r1 - r0, j->xq + t0 / FL_PANEL * j->x_row, t1 - t0,
                     j->y + t0 * j->rows + r0, j->rows);
    else if (j->n_tok == 1)
        one_token(j, r0, r1);
    else if (j->dot_tn && t1 - t0 <= FL_DOT_TOKENS)
        few_tokens(j, r0, r1, t0, t1);
    else
        token_tile(j, r0, r1, t0, t1);
}

/* The prefill kernel that a product of n_tok tokens by weights of wtype takes, or NULL. */
static const struct fl_gemm_kernel *gemm_kernel(int wtype, int64_t n_tok) {
    const struct fl_gemm_kernel *gemm = fl_gemm_kernel(wtype);
    return gemm && n_tok >= gemm->min_tokens ? gemm : NULL;
}

/* Fill the job for W (rows x k) by the n_tok rows of x into y. Activations of a quantized act type are read
 * from `shared` where it already holds them prepared for the same x and kernel; otherwise the job names what
 * to quantize (x, dk, from_float), for the caller to do into n_tok rows of x_row bytes at xq (with a prefill
 * kernel, into panels of FL_PANEL tokens of x_row bytes each). */
static int matmul_setup(struct matmul_job *job, const struct fl_matmul_item *it, const uint8_t *shared, int64_t threads) {
    const struct fl_type_traits *wt = fl_traits(it->wtype);
    const struct fl_decode_kernel *dk = fl_decode_kernel(it->wtype);
    int64_t k = it->k;
    *job = (struct matmul_job){.dot = dk ? dk->dot : fl_vec_dot(it->wtype), .dot4 = dk ? dk->dot4 : fl_vec_dot4(fl_vec_dot(it->wtype)),
                               .dot_tn = dk ? dk->dot_tn : fl_vec_dot_tn(fl_vec_dot(it->wtype)),
                               .w = it->w, .w_row = (size_t)fl_row_bytes(it->wtype, k),
                               .xq = (const uint8_t *)it->x, .x_row = (size_t)k * sizeof(float),
                               .rows = it->rows, .k = k, .n_tok = it->n_tok, .y = it->y,
                               .dot_prefetches = dk != NULL, .gemm = gemm_kernel(it->wtype, it->n_tok)};
    if (wt->act_type != FL_TYPE_F32) {
        const struct fl_type_traits *at = fl_traits(wt->act_type);
        if (!at || !at->from_float)
            return FL_ETYPE;
        /* prepared rows go on whole cache lines */
        job->x_row = job->gemm ? job->gemm->panel_bytes(k)
                     : dk  ? (dk->act_bytes(k) + 63) & ~(size_t)63
                           : (size_t)fl_row_bytes(wt->act_type, k);
        job->xq = shared;
        if (!shared) {
            job->x = it->x;
            job->dk = dk;
            job->from_float = at->from_float;
        }
    }
    /* tasks of at most about TASK_BYTES of weights, as many as a multiple of the threads that will run them and of
     * equal rows: with tasks of the full size and a short last one, one thread could be left finishing a full task
     * while the others wait (Q2_K expert_down, 4096 rows in 6 tasks: 5 x 780 + 196, the slower thread 14% over
     * the mean). Many tokens already make many tasks, one per tile of tokens, so the rows are not cut finer.
     * threads: those that will run the batch (fl_matmul_batch). */
    int64_t round = threads * TASK_BYTES;
    int64_t tasks = threads * (((int64_t)job->w_row * job->rows + round - 1) / round);
    int64_t per_thread = (job->rows + threads - 1) / threads, even = (job->rows + tasks - 1) / tasks;
    if (even < TASK_ROWS)
        even = TASK_ROWS;
    job->chunk = per_thread < even ? per_thread : even;
    job->tile = (int64_t)(TILE_ACT_BYTES / job->x_row);
    if (job->gemm) /* whole panels, as many as the kernel takes */
        job->tile = min64(job->tile < 1 ? FL_PANEL : job->tile * FL_PANEL, FL_GEMM_TOKENS);
    job->tile = job->tile < 1 ? 1 : min64(job->tile, job->n_tok);
    job->group = (int64_t)(GROUP_BYTES / job->w_row);
    job->group = job->group < 4 ? (job->group < 1 ? 1 : job->group) : job->group & ~(int64_t)3;
    return FL_OK;
}

/* ---------------------------------------------------------------- several products in one parallel run */

/* Tasks numbered across jobs: first[i] is the index of job i's first task, first[n] all of them. */
struct batch_job {
    struct matmul_job *jobs;
    const int64_t *first;
    int64_t n;
};

static int64_t job_of(const struct batch_job *b, int64_t task) {
    int64_t lo = 0, hi = b->n - 1;
    while (lo < hi) { /* the last job whose first task is <= task */
        int64_t mid = (lo + hi + 1) / 2;
        if (b->first[mid] <= task)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static void batch_task(void *ctx, int64_t task, int thread) {
    const struct batch_job *b = ctx;
    (void)thread;
    int64_t i = job_of(b, task);
    matmul_task(&b->jobs[i], task - b->first[i]);
}

/* tokens whose activations one preparation task quantizes: a prefill kernel's panel, or PREP_TOKENS */
static int64_t tokens_per_prep(const struct matmul_job *j) { return j->gemm ? FL_PANEL : PREP_TOKENS; }

/* bytes of a job's prepared activations: the kernel's rows or panels; with panels, then one prepared row per panel
 * for the decode kernel's prep to write before it is packed */
static size_t prepared_bytes(const struct matmul_job *j) {
    if (!j->gemm)
        return j->x_row * (size_t)j->n_tok;
    return (j->x_row + ((j->dk->act_bytes(j->k) + 63) & ~(size_t)63)) * (size_t)((j->n_tok + FL_PANEL - 1) / FL_PANEL);
}

/* quantizes one panel's tokens into it, through the decode kernel's row and the prefill kernel's packing */
static void prep_panel(const struct matmul_job *j, int64_t panel) {
    int64_t n_panels = (j->n_tok + FL_PANEL - 1) / FL_PANEL;
    uint8_t *dst = (uint8_t *)j->xq + panel * j->x_row;
    uint8_t *row = (uint8_t *)j->xq + n_panels * j->x_row + panel * ((j->dk->act_bytes(j->k) + 63) & ~(size_t)63);
    memset(dst, 0, j->x_row); /* tokens past the last stay zero: their results are not stored */
    for (int64_t t = panel * FL_PANEL; t < min64((panel + 1) * FL_PANEL, j->n_tok); t++) {
        j->dk->prep(j->k, j->x + t * j->k, row);
        j->gemm->pack(j->k, row, dst, (int)(t % FL_PANEL));
    }
}

/* quantizes tokens_per_prep() tokens of a job's activations */
static void prep_task(void *ctx, int64_t task, int thread) {
    const struct batch_job *b = ctx;
    (void)thread;
    int64_t i = job_of(b, task);
    const struct matmul_job *j = &b->jobs[i];
    if (j->gemm) {
        prep_panel(j, task - b->first[i]);
        return;
    }
    int64_t t0 = (task - b->first[i]) * PREP_TOKENS, t1 = min64(t0 + PREP_TOKENS, j->n_tok);
    uint8_t *xq = (uint8_t *)j->xq;
    for (int64_t t = t0; t < t1; t++) {
        if (j->dk)
            j->dk->prep(j->k, j->x + t * j->k, xq + t * j->x_row);
        else
            j->from_float(j->x + t * j->k, xq + t * j->x_row, j->k);
    }
}

/* What turns f32 activations into the form a weight type's dots read (NULL: they read f32): two types with
 * the same preparation (and, for many tokens, the same packing into panels) can share it. */
static const void *activation_prep(int wtype) {
    const struct fl_decode_kernel *dk = fl_decode_kernel(wtype);
    if (dk)
        return (const void *)dk->prep;
    const struct fl_type_traits *at = fl_traits(fl_traits(wtype)->act_type);
    return fl_traits(wtype)->act_type == FL_TYPE_F32 || !at ? NULL : (const void *)at->from_float;
}

static int check_item(const struct fl_matmul_item *it) {
    const struct fl_type_traits *wt = fl_traits(it->wtype);
    if (!wt || !wt->vec_dot_generic)
        return FL_ETYPE;
    if (!it->w || !it->x || !it->y || it->rows <= 0 || it->k <= 0 || it->n_tok < 0 || it->k % wt->blck)
        return FL_EINVAL;
    return FL_OK;
}

int fl_matmul(int wtype, const void *w, int64_t rows, int64_t k, const float *x, int64_t n_tok, float *y) {
    struct fl_matmul_item item = {wtype, w, rows, k, x, n_tok, y};
    return fl_matmul_batch(1, &item);
}

/* products a batch describes on the stack (a decode step's are 1-8); more take the heap */
#define LOCAL_ITEMS 16
/* prepared activations a batch keeps on the stack (a decode step's few rows); more take the heap */
#define LOCAL_PREP_BYTES 16384

int fl_matmul_batch(int64_t n, const struct fl_matmul_item *items) {
    if (n < 0 || (n && !items))
        return FL_EINVAL;
    int64_t work = 0; /* weight bytes times tokens */
    for (int64_t i = 0; i < n; i++) {
        int status = check_item(&items[i]);
        if (status != FL_OK)
            return status;
        if (work < TASK_BYTES) /* and no further: no overflow */
            work += fl_row_bytes(items[i].wtype, items[i].k) * items[i].rows * items[i].n_tok;
    }
    int threads = work < TASK_BYTES ? 1 : fl_pool_width();
    /* per job: its description, its first task and preparation task, its x, its activations' preparation, and
     * where its prepared activations are: at an offset >= 0 into one buffer for all jobs, those of job j for
     * -2 - j, or (-1) its x itself, read as f32 */
    struct matmul_job local_jobs[LOCAL_ITEMS];
    int64_t local_first[LOCAL_ITEMS + 1], local_first_prep[LOCAL_ITEMS + 1], local_at[LOCAL_ITEMS];
    const float *local_x_of[LOCAL_ITEMS];
    const void *local_prep_of[LOCAL_ITEMS];
    _Alignas(64) uint8_t local_prep[LOCAL_PREP_BYTES];
    int heap = n > LOCAL_ITEMS;
    struct matmul_job *jobs = heap ? malloc(sizeof(*jobs) * (size_t)n) : local_jobs;
    int64_t *first = heap ? malloc(sizeof(int64_t) * (size_t)(n + 1)) : local_first;
    int64_t *first_prep = heap ? malloc(sizeof(int64_t) * (size_t)(n + 1)) : local_first_prep;
    int64_t *at = heap ? malloc(sizeof(int64_t) * (size_t)n) : local_at;
    const float **x_of = heap ? malloc(sizeof(float *) * (size_t)n) : local_x_of;
    const void **prep_of = heap ? malloc(sizeof(void *) * (size_t)n) : local_prep_of;
    uint8_t *prepared = NULL;
    int status = jobs && first && first_prep && at && x_of && prep_of ? FL_OK : FL_ENOMEM;
    int64_t n_jobs = 0, prep_tokens = 0;
    size_t prep_bytes = 0;
    if (status == FL_OK)
        first[0] = first_prep[0] = 0;
    for (int64_t i = 0; i < n && status == FL_OK; i++) {
        const struct fl_matmul_item *it = &items[i];
        if (it->n_tok == 0)
            continue;
        /* products by the same activations share their quantized form */
        int64_t shared = -1;
        prep_of[n_jobs] = activation_prep(it->wtype);
        const struct fl_gemm_kernel *gemm = gemm_kernel(it->wtype, it->n_tok);
        for (int64_t j = 0; j < n_jobs && shared < 0 && prep_of[n_jobs]; j++)
            if (x_of[j] == it->x && prep_of[j] == prep_of[n_jobs] && jobs[j].k == it->k && jobs[j].n_tok == it->n_tok &&
                (jobs[j].gemm ? jobs[j].gemm->pack : NULL) == (gemm ? gemm->pack : NULL))
                shared = j;
        x_of[n_jobs] = it->x;
        struct matmul_job *job = &jobs[n_jobs];
        /* it->x stands for the shared activations until every job's are placed */
        status = matmul_setup(job, it, shared >= 0 ? (const uint8_t *)it->x : NULL, threads);
        if (status == FL_OK) {
            at[n_jobs] = job->x ? (int64_t)prep_bytes : shared >= 0 ? -2 - shared : -1;
            if (job->x)
                prep_bytes += (prepared_bytes(job) + 63) & ~(size_t)63;
            first[n_jobs + 1] = first[n_jobs] + job_tasks(job);
            first_prep[n_jobs + 1] = first_prep[n_jobs] + (job->x ? (job->n_tok + tokens_per_prep(job) - 1) / tokens_per_prep(job) : 0);
            prep_tokens += job->x ? job->n_tok : 0;
            n_jobs++;
        }
    }
    if (status == FL_OK && prep_bytes) {
        prepared = prep_bytes <= LOCAL_PREP_BYTES ? local_prep : aligned_alloc(64, prep_bytes);
        if (!prepared)
            status = FL_ENOMEM;
    }
    for (int64_t j = 0; j < n_jobs && status == FL_OK; j++) /* a job shares an earlier one's, placed before it */
        if (at[j] != -1)
            jobs[j].xq = at[j] >= 0 ? prepared + at[j] : jobs[-2 - at[j]].xq;
    if (status == FL_OK && n_jobs) {
        struct batch_job prep = {jobs, first_prep, n_jobs}, run = {jobs, first, n_jobs};
        if (prep_tokens < PREP_INLINE_TOKENS) /* a decode's few rows: cheaper here than waking the pool */
            for (int64_t task = 0; task < first_prep[n_jobs]; task++)
                prep_task(&prep, task, 0);
        else
            fl_parallel_for(first_prep[n_jobs], threads, prep_task, &prep);
        fl_parallel_for(first[n_jobs], threads, batch_task, &run);
    }
    if (prepared != local_prep)
        free(prepared);
    if (heap) {
        free(jobs);
        free(first);
        free(first_prep);
        free(at);
        free(x_of);
        free(prep_of);
    }
    return status;
}

/* matmul.c: Y = X W^T for any weight format, split across the thread pool.
 * Decode (few tokens) streams each weight row once through the format's SIMD dot, against activations
 * quantized once per call to the format's act type, as ggml pairs them. It is bound by memory bandwidth.
 * Prefill (many tokens) is bound by arithmetic instead: each block of weight rows is dequantized once to
 * f32 and multiplied by every token with a register-tiled FMA kernel, the way ggml's BLAS path does, so
 * the cost of unpacking a format is spread over all the tokens. */
#include <stdlib.h>
#include <string.h>
#include "flashlite.h"
#include "kernels.h"
#include "simd.h"
#include "threadpool.h"

/* k per GEMM tile call: keeps a tile's slice of weights and tokens in L1 */
#define KC 256
/* weight rows dequantized together, in tiles: each dequantized slice is reused by every token block */
#define TILES_PER_BLOCK 4
/* a decode task takes at least this many weight bytes (and rows), enough for four long read streams */
#define DECODE_TASK_BYTES (512 << 10)
#define DECODE_TASK_ROWS 64

struct decode_job {
    fl_vec_dot_fn dot;
    fl_vec_dot4_fn dot4;
    const uint8_t *w;
    size_t w_row;
    const uint8_t *xq;
    size_t x_row;
    int64_t rows, k, n_tok, chunk;
    float *y;
    int dot_prefetches; /* the dot streams its own prefetches (struct fl_decode_kernel) */
};

static void decode_task(void *ctx, int64_t task, int thread) {
    const struct decode_job *j = ctx;
    (void)thread;
    int64_t r0 = task * j->chunk;
    int64_t r1 = r0 + j->chunk < j->rows ? r0 + j->chunk : j->rows;
    if (j->dot4 && j->n_tok == 1) {
        /* rows from four quarters of the range at once: four streams far apart keep more reads in flight
         * than one, which the hardware prefetcher follows page by page */
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
        for (int64_t t = 0; t < j->n_tok; t++)
            j->dot(j->k, &j->y[t * j->rows + r], j->w + r * j->w_row, j->xq + t * j->x_row);
    }
}

/* Fill job for a decode of W (rows x k) by the n_tok rows of x into y, quantizing the activations into *xq
 * (which the caller frees) unless `shared` already holds them prepared for the same x and kernel. */
static int decode_setup(struct decode_job *job, int wtype, const struct fl_type_traits *wt, const void *w,
                        int64_t rows, int64_t k, const float *x, int64_t n_tok, float *y, const uint8_t *shared,
                        uint8_t **xq) {
    const struct fl_decode_kernel *dk = fl_decode_kernel(wtype);
    *job = (struct decode_job){dk ? dk->dot : fl_vec_dot(wtype), dk ? dk->dot4 : NULL, w,
                               (size_t)fl_row_bytes(wtype, k), (const uint8_t *)x, (size_t)k * sizeof(float),
                               rows, k, n_tok, 0, y, dk != NULL};
    *xq = NULL;
    if (wt->act_type != FL_TYPE_F32) {
        const struct fl_type_traits *at = fl_traits(wt->act_type);
        if (!at || !at->from_float)
            return FL_ETYPE;
        /* prepared rows go on whole cache lines */
        job->x_row = dk ? (dk->act_bytes(k) + 63) & ~(size_t)63 : (size_t)fl_row_bytes(wt->act_type, k);
        if (shared) {
            job->xq = shared;
        } else {
            *xq = aligned_alloc(64, (job->x_row * (size_t)n_tok + 63) & ~(size_t)63);
            if (!*xq)
                return FL_ENOMEM;
            for (int64_t t = 0; t < n_tok; t++) {
                if (dk)
                    dk->prep(k, x + t * k, *xq + t * job->x_row);
                else
                    at->from_float(x + t * k, *xq + t * job->x_row, k);
            }
            job->xq = *xq;
        }
    }
    /* tasks of at most about DECODE_TASK_BYTES, as many as a multiple of the threads and of equal rows: with
     * tasks of the full size and a short last one, one thread could be left finishing a full task while the
     * others wait (Q2_K expert_down, 4096 rows in 6 tasks: 5 x 780 + 196, the slower thread 14% over the mean) */
    int64_t threads = fl_threads_get(), round = threads * DECODE_TASK_BYTES;
    int64_t tasks = threads * (((int64_t)job->w_row * rows + round - 1) / round);
    int64_t per_thread = (rows + threads - 1) / threads, even = (rows + tasks - 1) / tasks;
    if (even < DECODE_TASK_ROWS)
        even = DECODE_TASK_ROWS;
    job->chunk = per_thread < even ? per_thread : even;
    return FL_OK;
}

static int64_t decode_tasks(const struct decode_job *job) { return (job->rows + job->chunk - 1) / job->chunk; }

struct prefill_job {
    fl_to_float_fn to_float;
    const struct fl_gemm_kernel *gk;
    const uint8_t *w;
    size_t w_row;
    int64_t rows, k, n_tok;
    int64_t n_tb;        /* token blocks of gk->nt */
    int64_t block_rows;  /* gk->mr * TILES_PER_BLOCK */
    const float *x;
    float *xp;           /* tokens packed per block: [n_tb][k][nt], zero past n_tok */
    float *scratch;      /* per thread: one row, the packed weight block, its accumulators */
    size_t scratch_floats;
    float *y;
};

static void pack_tokens_task(void *ctx, int64_t tb, int thread) {
    const struct prefill_job *j = ctx;
    (void)thread;
    int nt = j->gk->nt;
    float *dst = j->xp + tb * j->k * nt;
    for (int c = 0; c < nt; c++) {
        int64_t t = tb * nt + c;
        if (t < j->n_tok) {
            const float *src = j->x + t * j->k;
            for (int64_t kk = 0; kk < j->k; kk++)
                dst[kk * nt + c] = src[kk];
        } else {
            for (int64_t kk = 0; kk < j->k; kk++)
                dst[kk * nt + c] = 0.0f;
        }
    }
}

static void prefill_block_task(void *ctx, int64_t block, int thread) {
    const struct prefill_job *j = ctx;
    const int mr = j->gk->mr, nt = j->gk->nt;
    const int64_t k = j->k, n_tb = j->n_tb;
    float *row = j->scratch + (size_t)thread * j->scratch_floats;
    float *wpack = row + k;                     /* [tile][k][mr] */
    float *acc = wpack + j->block_rows * k;     /* [tile][tb][mr][nt] */
    int64_t r0 = block * j->block_rows;
    int64_t n_rows = j->rows - r0 < j->block_rows ? j->rows - r0 : j->block_rows;
    int n_tiles = (int)((n_rows + mr - 1) / mr);

    for (int i = 0; i < n_tiles * mr; i++) {
        if (i < n_rows)
            j->to_float(j->w + (r0 + i) * j->w_row, row, k);
        else
            memset(row, 0, (size_t)k * sizeof(float));
        float *dst = wpack + (int64_t)(i / mr) * mr * k + i % mr;
        for (int64_t kk = 0; kk < k; kk++)
            dst[kk * mr] = row[kk];
    }
    for (int64_t kb = 0; kb < k; kb += KC) {
        int64_t kc = k - kb < KC ? k - kb : KC;
        for (int64_t tb = 0; tb < n_tb; tb++)
            for (int tile = 0; tile < n_tiles; tile++)
                j->gk->tile(kc, wpack + tile * mr * k + kb * mr, j->xp + tb * k * nt + kb * nt,
                            acc + (tile * n_tb + tb) * mr * nt, kb == 0);
    }
    for (int64_t t = 0; t < j->n_tok; t++) {
        int64_t tb = t / nt;
        int c = (int)(t % nt);
        float *yt = j->y + t * j->rows + r0;
        for (int64_t i = 0; i < n_rows; i++)
            yt[i] = acc[((i / mr) * n_tb + tb) * mr * nt + (i % mr) * nt + c];
    }
}

static void *alloc_floats(size_t n) {
    size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes ? bytes : 64);
}

static int prefill(int wtype, const void *w, int64_t rows, int64_t k, const float *x, int64_t n_tok, float *y) {
    const struct fl_gemm_kernel *gk = fl_gemm_kernel();
    struct prefill_job job = {fl_to_float(wtype), gk, w, (size_t)fl_row_bytes(wtype, k), rows, k, n_tok,
                              (n_tok + gk->nt - 1) / gk->nt, (int64_t)gk->mr * TILES_PER_BLOCK, x,
                              NULL, NULL, 0, y};
    int threads = fl_threads_get();
    job.scratch_floats = (size_t)(k + job.block_rows * k + job.block_rows * job.n_tb * gk->nt);
    job.scratch_floats = (job.scratch_floats + 15) & ~(size_t)15; /* each thread's part on its own lines */
    job.xp = alloc_floats((size_t)job.n_tb * gk->nt * k);
    job.scratch = alloc_floats(job.scratch_floats * threads);
    if (!job.xp || !job.scratch) {
        free(job.xp);
        free(job.scratch);
        return FL_ENOMEM;
    }
    fl_parallel_for(job.n_tb, 0, pack_tokens_task, &job);
    fl_parallel_for((rows + job.block_rows - 1) / job.block_rows, threads, prefill_block_task, &job);
    free(job.xp);
    free(job.scratch);
    return FL_OK;
}

static int check_args(int wtype, const void *w, int64_t rows, int64_t k, const float *x, int64_t n_tok,
                      const float *y) {
    const struct fl_type_traits *wt = fl_traits(wtype);
    if (!wt || !wt->vec_dot_generic || !wt->to_float)
        return FL_ETYPE;
    if (!w || !x || !y || rows <= 0 || k <= 0 || n_tok < 0 || k % wt->blck)
        return FL_EINVAL;
    return FL_OK;
}

int fl_matmul(int wtype, const void *w, int64_t rows, int64_t k, const float *x, int64_t n_tok, float *y) {
    struct fl_matmul_item item = {wtype, w, rows, k, x, n_tok, y};
    return fl_matmul_batch(1, &item);
}

/* ---------------------------------------------------------------- several decodes in one parallel run */

struct batch_job {
    const struct decode_job *jobs;
    const int64_t *first; /* task index where each job starts; first[n] = all tasks */
    int64_t n;
};

static void batch_task(void *ctx, int64_t task, int thread) {
    const struct batch_job *b = ctx;
    int64_t lo = 0, hi = b->n - 1;
    while (lo < hi) { /* the last job whose first task is <= task */
        int64_t mid = (lo + hi + 1) / 2;
        if (b->first[mid] <= task)
            lo = mid;
        else
            hi = mid - 1;
    }
    decode_task((void *)&b->jobs[lo], task - b->first[lo], thread);
}

/* What turns f32 activations into the form a weight type's decode dots read (NULL: they read f32): two types
 * with the same preparation can share it. */
static const void *activation_prep(int wtype) {
    const struct fl_decode_kernel *dk = fl_decode_kernel(wtype);
    if (dk)
        return (const void *)dk->prep;
    const struct fl_type_traits *at = fl_traits(fl_traits(wtype)->act_type);
    return fl_traits(wtype)->act_type == FL_TYPE_F32 || !at ? NULL : (const void *)at->from_float;
}

int fl_matmul_batch(int64_t n, const struct fl_matmul_item *items) {
    if (n < 0 || (n && !items))
        return FL_EINVAL;
    for (int64_t i = 0; i < n; i++) {
        const struct fl_matmul_item *it = &items[i];
        int status = check_args(it->wtype, it->w, it->rows, it->k, it->x, it->n_tok, it->y);
        if (status != FL_OK)
            return status;
    }
    struct decode_job *jobs = malloc(sizeof(*jobs) * (size_t)(n + 1));
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(n + 1));
    uint8_t **owned = calloc((size_t)n + 1, sizeof(uint8_t *));
    const float **x_of = malloc(sizeof(float *) * (size_t)(n + 1));
    const void **prep_of = malloc(sizeof(void *) * (size_t)(n + 1));
    int status = jobs && first && owned && x_of && prep_of ? FL_OK : FL_ENOMEM;
    int64_t n_jobs = 0;
    if (first)
        first[0] = 0;
    for (int64_t i = 0; i < n && status == FL_OK; i++) {
        const struct fl_matmul_item *it = &items[i];
        if (it->n_tok == 0)
            continue;
        if (it->n_tok >= FL_PREFILL_MIN_TOKENS) { /* arithmetic-bound: nothing to win by sharing a run */
            status = prefill(it->wtype, it->w, it->rows, it->k, it->x, it->n_tok, it->y);
            continue;
        }
        /* matrices multiplied by the same activations share their quantized form */
        const uint8_t *shared = NULL;
        prep_of[n_jobs] = activation_prep(it->wtype);
        for (int64_t j = 0; j < n_jobs && !shared && prep_of[n_jobs]; j++)
            if (x_of[j] == it->x && prep_of[j] == prep_of[n_jobs] && jobs[j].k == it->k && jobs[j].n_tok == it->n_tok)
                shared = jobs[j].xq;
        x_of[n_jobs] = it->x;
        status = decode_setup(&jobs[n_jobs], it->wtype, fl_traits(it->wtype), it->w, it->rows, it->k, it->x,
                              it->n_tok, it->y, shared, &owned[n_jobs]);
        if (status == FL_OK) {
            first[n_jobs + 1] = first[n_jobs] + decode_tasks(&jobs[n_jobs]);
            n_jobs++;
        }
    }
    if (status == FL_OK && n_jobs) {
        struct batch_job b = {jobs, first, n_jobs};
        fl_parallel_for(first[n_jobs], 0, batch_task, &b);
    }
    for (int64_t j = 0; j < n_jobs; j++)
        free(owned[j]);
    free(jobs);
    free(first);
    free(owned);
    free(x_of);
    free(prep_of);
    return status;
}

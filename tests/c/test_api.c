/* test_api.c: the entry points of flashlite.h that tests/c/test_core.c does not drive, under the sanitizers
 * (tests/test_c_sanitizers.py builds both): the attention with sink and the compressor's pooling against a double
 * precision reference, the KV row packing round trip, the type table's names and flags, the reference dots, the
 * row quantizer's checks, the expert cache's usage counters and the page-cache probe, V4's hyper-connections and
 * RMS norm against double precision, the non-finite data check, the router and the fused MoE sublayer against
 * their op-by-op sequence, the Hadamard rotation and the indexer's top-k against double precision, the fused
 * attention step's logs, and each one's errors.
 * Prints one line per failure and exits non-zero if there was any. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "flashlite.h"
#include "check.h"

static uint64_t rng_state = 0x2545f4914f6cdd1dULL;

static float uniform(void) { /* in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((double)(rng_state >> 32) / 2147483648.0 - 1.0);
}

static void fill(float *x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) x[i] = scale * uniform();
}

/* ---------------------------------------------------------------- attention with sink */

#define TOK 5
#define HEADS 3
#define HD 40
#define WIN 9
#define CMP 6
#define KCMP 4

static void test_attn_sink(void) {
    float q[TOK * HEADS * HD], win[WIN * HD], cmp[CMP * HD], sinks[HEADS], out[TOK * HEADS * HD];
    int32_t range[2 * TOK], idx[TOK * KCMP];
    fill(q, TOK * HEADS * HD, 1.0f);
    fill(win, WIN * HD, 1.0f);
    fill(cmp, CMP * HD, 1.0f);
    fill(sinks, HEADS, 2.0f);
    for (int t = 0; t < TOK; t++) {
        range[2 * t] = t, range[2 * t + 1] = t + 5; /* windows of 5 rows, sliding */
        for (int j = 0; j < KCMP; j++) idx[t * KCMP + j] = j < t ? (t * 7 + j * 3) % CMP : -1;
    }
    float scale = 0.125f;
    int status = fl_attn_sink(TOK, HEADS, HD, q, win, WIN, range, cmp, CMP, idx, KCMP, sinks, scale, out);
    CHECK(status == FL_OK, "fl_attn_sink: status %d", status);
    double worst = 0;
    for (int t = 0; t < TOK; t++)
        for (int h = 0; h < HEADS; h++) {
            const float *rows[WIN + KCMP];
            int n = 0;
            for (int r = range[2 * t]; r < range[2 * t + 1]; r++) rows[n++] = win + r * HD;
            for (int j = 0; j < KCMP; j++)
                if (idx[t * KCMP + j] >= 0) rows[n++] = cmp + idx[t * KCMP + j] * HD;
            double s[WIN + KCMP], m = sinks[h], sum;
            for (int i = 0; i < n; i++) {
                s[i] = 0;
                for (int d = 0; d < HD; d++) s[i] += (double)q[(t * HEADS + h) * HD + d] * rows[i][d];
                s[i] *= scale;
                if (s[i] > m) m = s[i];
            }
            sum = exp(sinks[h] - m);
            for (int i = 0; i < n; i++) sum += exp(s[i] - m);
            for (int d = 0; d < HD; d++) {
                double o = 0;
                for (int i = 0; i < n; i++) o += exp(s[i] - m) / sum * rows[i][d];
                double err = fabs(o - out[(t * HEADS + h) * HD + d]);
                if (err > worst) worst = err;
            }
        }
    CHECK(worst < 1e-5, "fl_attn_sink: %.3g from the double-precision softmax with sink", worst);
    int32_t bad_range[2 * TOK];
    memcpy(bad_range, range, sizeof range);
    bad_range[3] = WIN + 1;
    CHECK(fl_attn_sink(TOK, HEADS, HD, q, win, WIN, bad_range, cmp, CMP, idx, KCMP, sinks, scale, out) == FL_EINVAL,
          "fl_attn_sink: a window past its rows is accepted");
    int32_t bad_idx[TOK * KCMP];
    memcpy(bad_idx, idx, sizeof idx);
    bad_idx[5] = CMP;
    CHECK(fl_attn_sink(TOK, HEADS, HD, q, win, WIN, range, cmp, CMP, bad_idx, KCMP, sinks, scale, out) == FL_EINVAL,
          "fl_attn_sink: a compressed row index past the rows is accepted");
    CHECK(fl_attn_sink(TOK, 0, HD, q, win, WIN, range, cmp, CMP, idx, KCMP, sinks, scale, out) == FL_EINVAL,
          "fl_attn_sink: zero heads accepted");
}

/* fl_attn_sink split across threads (tokens x blocks of heads) and blocked at each SIMD level: every level and
 * thread count gives the bits of the plain loops on one thread, for a prefill-sized call and a one-token call
 * (whose heads are split), with head counts and dims off the kernels' blocks of 4 queries, 2 rows and 16 lanes. */
static void test_attn_sink_split(void) {
    enum { T = 6, H = 9, D = 53, NW = 11, NC = 7, K = 5 };
    uint64_t later_tests_draws = rng_state; /* the tests after this one keep the data they were written for */
    float *q = malloc(sizeof(float) * T * H * D), *win = malloc(sizeof(float) * NW * D);
    float *cmp = malloc(sizeof(float) * NC * D), *want = malloc(sizeof(float) * T * H * D);
    float *got = malloc(sizeof(float) * T * H * D), sinks[H];
    int32_t range[2 * T], idx[T * K];
    fill(q, T * H * D, 1.0f);
    fill(win, NW * D, 1.0f);
    fill(cmp, NC * D, 1.0f);
    fill(sinks, H, 2.0f);
    for (int t = 0; t < T; t++) {
        range[2 * t] = t % 3, range[2 * t + 1] = NW - t; /* odd and even row counts */
        for (int j = 0; j < K; j++) idx[t * K + j] = j <= t ? (t * 5 + j * 3) % NC : -1;
    }
    int best = fl_simd_level(), threads = fl_threads_get();
    for (int n_tok = 1; n_tok <= T; n_tok += T - 1) {
        fl_simd_set(FL_SIMD_SCALAR);
        fl_threads_set(1);
        CHECK(fl_attn_sink(n_tok, H, D, q, win, NW, range, cmp, NC, idx, K, sinks, 0.1f, want) == FL_OK,
              "fl_attn_sink: plain, one thread");
        for (int level = FL_SIMD_SCALAR; level <= FL_SIMD_NEON; level++) {
            if (fl_simd_set(level) != FL_OK) continue;
            for (int th = 1; th <= 3; th++) {
                fl_threads_set(th);
                memset(got, 0xff, sizeof(float) * T * H * D);
                CHECK(fl_attn_sink(n_tok, H, D, q, win, NW, range, cmp, NC, idx, K, sinks, 0.1f, got) == FL_OK,
                      "fl_attn_sink: level %d, %d threads", level, th);
                CHECK(memcmp(want, got, sizeof(float) * (size_t)(n_tok * H * D)) == 0,
                      "fl_attn_sink: level %d with %d threads differs from the plain loops (%d tokens)", level, th,
                      n_tok);
                /* by 3 groups of 3 heads (a task's heads cross group ends): each output row where its group puts it */
                memset(got, 0xff, sizeof(float) * T * H * D);
                CHECK(fl_attn_sink_grouped(n_tok, H, D, q, win, NW, range, cmp, NC, idx, K, sinks, 0.1f, 3, got) ==
                          FL_OK, "fl_attn_sink_grouped: level %d, %d threads", level, th);
                int moved = 0;
                for (int t = 0; t < n_tok; t++)
                    for (int h = 0; h < H; h++)
                        moved |= memcmp(want + (t * H + h) * D, got + ((h / 3 * n_tok + t) * 3 + h % 3) * D,
                                        sizeof(float) * D);
                CHECK(!moved, "fl_attn_sink_grouped: level %d with %d threads differs from fl_attn_sink (%d tokens)",
                      level, th, n_tok);
            }
        }
    }
    CHECK(fl_attn_sink_grouped(T, H, D, q, win, NW, range, cmp, NC, idx, K, sinks, 0.1f, 2, got) == FL_EINVAL,
          "fl_attn_sink_grouped: 2 groups of 9 heads accepted");
    CHECK(fl_attn_sink_grouped(T, H, D, q, win, NW, range, cmp, NC, idx, K, sinks, 0.1f, 3, q) == FL_EINVAL,
          "fl_attn_sink_grouped: grouped output in place of q accepted");
    fl_simd_set(best);
    fl_threads_set(threads);
    free(q), free(win), free(cmp), free(want), free(got);
    rng_state = later_tests_draws;
}

/* ---------------------------------------------------------------- compressor pooling */

static void test_compress_pool(void) {
    enum { D = 8, ROWS = 3 };
    for (int overlap = 0; overlap <= 1; overlap++)
        for (int has_prev = 0; has_prev <= overlap; has_prev++) {
            int64_t ratio = overlap ? 4 : 8, width = overlap ? 2 * D : D;
            int64_t tokens = (ROWS + has_prev) * ratio;
            float *kv = malloc(sizeof(float) * (size_t)(tokens * width));
            float *score = malloc(sizeof(float) * (size_t)(tokens * width));
            float out[ROWS * D];
            fill(kv, tokens * width, 1.0f);
            fill(score, tokens * width, 3.0f);
            int status = fl_compress_pool(ROWS, ratio, D, overlap, has_prev, kv, score, out);
            CHECK(status == FL_OK, "fl_compress_pool: status %d", status);
            double worst = 0;
            int64_t base = has_prev ? ratio : 0;
            for (int j = 0; j < ROWS; j++)
                for (int c = 0; c < D; c++) {
                    double s[16], v[16], m = -INFINITY, sum = 0, acc = 0;
                    int n = 0;
                    int64_t w0 = base + j * ratio;
                    if (overlap && (j > 0 || has_prev))
                        for (int k = 0; k < ratio; k++) {
                            s[n] = score[(w0 - ratio + k) * width + c];
                            v[n++] = kv[(w0 - ratio + k) * width + c];
                        }
                    for (int k = 0; k < ratio; k++) {
                        s[n] = score[(w0 + k) * width + (overlap ? D : 0) + c];
                        v[n++] = kv[(w0 + k) * width + (overlap ? D : 0) + c];
                    }
                    for (int i = 0; i < n; i++) m = s[i] > m ? s[i] : m;
                    for (int i = 0; i < n; i++) sum += exp(s[i] - m);
                    for (int i = 0; i < n; i++) acc += exp(s[i] - m) / sum * v[i];
                    double err = fabs(acc - out[j * D + c]);
                    worst = err > worst ? err : worst;
                }
            CHECK(worst < 1e-6, "fl_compress_pool (overlap %d, has_prev %d): %.3g from the reference", overlap,
                  has_prev, worst);
            CHECK(fl_compress_pool(ROWS, 0, D, overlap, has_prev, kv, score, out) == FL_EINVAL,
                  "fl_compress_pool: ratio 0 accepted");
            CHECK(fl_compress_pool(ROWS, 300, D, overlap, has_prev, kv, score, out) == FL_EINVAL,
                  "fl_compress_pool: more slots than it pools accepted");
            free(kv);
            free(score);
        }
}

/* ---------------------------------------------------------------- KV rows */

static void test_kv_pack(void) {
    enum { ROWS = 7, DIM = 192, ROPE = 64 };
    int64_t fp8 = fl_kv_row_bytes(FL_KV_FP8, DIM, ROPE), fp4 = fl_kv_row_bytes(FL_KV_FP4, 128, 0);
    /* fp8 rows: bf16 rope dims, e4m3 rest with a ue8m0 scale per 64 */
    CHECK(fp8 == 2 * ROPE + (DIM - ROPE) + (DIM - ROPE) / 64, "fl_kv_row_bytes fp8: %lld", (long long)fp8);
    CHECK(fp4 == 128 / 2 + 128 / 32, "fl_kv_row_bytes fp4: %lld", (long long)fp4);
    CHECK(fl_kv_row_bytes(FL_KV_FP8, 100, 64) == -1 && fl_kv_row_bytes(FL_KV_FP4, 128, 64) == -1 &&
              fl_kv_row_bytes(99, 128, 0) == -1,
          "fl_kv_row_bytes: a shape its blocks do not fit accepted");
    float src[ROWS * DIM], back[ROWS * DIM];
    fill(src, ROWS * DIM, 4.0f);
    uint8_t *packed = malloc((size_t)(ROWS * fp8));
    CHECK(fl_kv_pack(FL_KV_FP8, ROWS, DIM, ROPE, src, packed) == FL_OK, "fl_kv_pack failed");
    CHECK(fl_kv_unpack(FL_KV_FP8, ROWS, DIM, ROPE, packed, ROWS, NULL, back) == FL_OK, "fl_kv_unpack failed");
    double worst = 0;
    for (int r = 0; r < ROWS; r++)
        for (int i = 0; i < DIM; i++) {
            /* e4m3 keeps 3 mantissa bits (half a step: 2^-4 relative) under a power-of-two scale of the block's
             * largest; bf16 7 bits */
            double rel = fabs(back[r * DIM + i] - src[r * DIM + i]) / 4.0;
            worst = rel > worst ? rel : worst;
        }
    CHECK(worst <= 0.0625, "fp8 KV round trip: %.3g of the range", worst);
    int32_t idx[3] = {6, 0, 3};
    float picked[3 * DIM];
    CHECK(fl_kv_unpack(FL_KV_FP8, 3, DIM, ROPE, packed, ROWS, idx, picked) == FL_OK, "fl_kv_unpack idx failed");
    CHECK(!memcmp(picked, back + 6 * DIM, sizeof(float) * DIM) && !memcmp(picked + DIM, back, sizeof(float) * DIM) &&
              !memcmp(picked + 2 * DIM, back + 3 * DIM, sizeof(float) * DIM),
          "fl_kv_unpack: idx picks other rows");
    int32_t bad[1] = {ROWS};
    CHECK(fl_kv_unpack(FL_KV_FP8, 1, DIM, ROPE, packed, ROWS, bad, picked) == FL_EINVAL,
          "fl_kv_unpack: a row past the source accepted");
    bad[0] = -1;
    CHECK(fl_kv_unpack(FL_KV_FP8, 1, DIM, ROPE, packed, ROWS, bad, picked) == FL_EINVAL,
          "fl_kv_unpack: a negative row accepted");
    CHECK(fl_kv_pack(FL_KV_FP8, -1, DIM, ROPE, src, packed) == FL_EINVAL, "fl_kv_pack: -1 rows accepted");
    free(packed);
}

/* ---------------------------------------------------------------- type table, dots, row quantizer */

static void test_types(void) {
    CHECK(!strcmp(fl_type_name(FL_TYPE_Q4_K), "q4_K") && !strcmp(fl_type_name(FL_TYPE_IQ2_XXS), "iq2_xxs") &&
              !strcmp(fl_type_name(FL_TYPE_I32), "i32") && fl_type_name(4) == NULL &&
              fl_type_name(-1) == NULL && fl_type_name(FL_TYPE_COUNT) == NULL,
          "fl_type_name");
    CHECK(fl_type_flags(FL_TYPE_Q4_K) == (FL_CAN_DEQUANTIZE | FL_CAN_QUANTIZE | FL_CAN_MATMUL),
          "fl_type_flags q4_K: %d", fl_type_flags(FL_TYPE_Q4_K));
    CHECK(fl_type_flags(FL_TYPE_Q8_K) == (FL_CAN_DEQUANTIZE | FL_CAN_QUANTIZE), "fl_type_flags q8_K (activations)");
    CHECK(fl_type_flags(FL_TYPE_I32) == 0 && fl_type_flags(4) == 0 && fl_type_flags(12345) == 0,
          "fl_type_flags of a storage or unknown type");
    CHECK(fl_type_act_type(FL_TYPE_Q4_K) == FL_TYPE_Q8_K && fl_type_act_type(FL_TYPE_Q4_0) == FL_TYPE_Q8_0 &&
              fl_type_act_type(FL_TYPE_Q4_1) == FL_TYPE_Q8_1 && fl_type_act_type(FL_TYPE_F16) == FL_TYPE_F32 &&
              fl_type_act_type(999) == -1,
          "fl_type_act_type");
    int level = fl_simd_level();
    CHECK(level >= FL_SIMD_SCALAR && level <= fl_simd_best(), "fl_simd_level %d above the best %d", level,
          fl_simd_best());

    enum { N = 512 };
    float w[N], x[N], wf[N], xf[N];
    fill(w, N, 1.0f);
    fill(x, N, 1.0f);
    uint8_t wq[N * 2], xq[N * 2];
    float s;
    CHECK(fl_quantize(FL_TYPE_Q4_K, w, wq, N) == FL_OK && fl_quantize(FL_TYPE_Q8_K, x, xq, N) == FL_OK,
          "quantize for the dot");
    CHECK(fl_vec_dot_ref(FL_TYPE_Q4_K, wq, xq, N, &s) == FL_OK, "fl_vec_dot_ref q4_K");
    fl_dequantize(FL_TYPE_Q4_K, wq, wf, N);
    fl_dequantize(FL_TYPE_Q8_K, xq, xf, N);
    double exact = 0, mag = 0;
    for (int i = 0; i < N; i++) exact += (double)wf[i] * xf[i], mag += fabs((double)wf[i] * xf[i]);
    CHECK(fabs(s - exact) <= 2e-7 * mag, "fl_vec_dot_ref q4_K: %g against %g", s, exact);
    CHECK(fl_vec_dot_ref(FL_TYPE_Q8_K, wq, xq, N, &s) == FL_ETYPE, "fl_vec_dot_ref of an activation-only type");
    CHECK(fl_vec_dot_ref(FL_TYPE_Q4_K, wq, xq, N, NULL) == FL_EINVAL, "fl_vec_dot_ref without an output");

    /* rows: without importance, the reference quantizer row by row; with it, a search that weighs each column */
    float rows[2 * N], imp[N];
    fill(rows, 2 * N, 1.0f);
    for (int i = 0; i < N; i++) imp[i] = 1.0f + (float)(i % 7);
    uint8_t a[4 * N], b[4 * N];
    CHECK(fl_quantize_rows(FL_TYPE_Q8_0, rows, a, 2, N, imp) == FL_OK && fl_quantize(FL_TYPE_Q8_0, rows, b, 2 * N) ==
              FL_OK && !memcmp(a, b, (size_t)fl_row_bytes(FL_TYPE_Q8_0, 2 * N)),
          "fl_quantize_rows q8_0 ignores importance, as ggml");
    CHECK(fl_quantize_rows(FL_TYPE_Q4_K, rows, a, 2, N, imp) == FL_OK, "fl_quantize_rows q4_K with importance");
    CHECK(fl_quantize_rows(FL_TYPE_Q4_K, rows, a, 2, N - 1, NULL) == FL_EINVAL, "rows of a partial block accepted");
    CHECK(fl_quantize_rows(FL_TYPE_Q4_K, rows, a, -1, N, NULL) == FL_EINVAL, "-1 rows accepted");
    CHECK(fl_quantize_rows(FL_TYPE_Q4_K, NULL, a, 2, N, NULL) == FL_EINVAL, "no source accepted");
    CHECK(fl_quantize_rows(FL_TYPE_I32, rows, a, 2, N, NULL) == FL_ETYPE, "a type without a quantizer accepted");
    CHECK(fl_quantize_rows(4, rows, a, 2, N, NULL) == FL_ETYPE, "an unknown type accepted");
    CHECK(fl_dequantize(FL_TYPE_I32, a, wf, 4) == FL_ETYPE, "dequantizing a storage-only type accepted");
}

/* ---------------------------------------------------------------- expert cache usage, page-cache probe */

static void test_expert_usage(void) {
    enum { DIM = 64, INTER = 64, EXPERTS = 4, TOKENS = 3, USED = 2 };
    int64_t mat = (int64_t)INTER * DIM * 4;
    char path[] = "/tmp/fl_test_usage_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp failed");
    if (fd < 0)
        return;
    float *w = malloc((size_t)(3 * mat * EXPERTS));
    fill(w, 3 * (mat / 4) * EXPERTS, 0.05f);
    CHECK(write(fd, w, (size_t)(3 * mat * EXPERTS)) == (ssize_t)(3 * mat * EXPERTS), "write failed");
    close(fd);
    struct fl_expert_layer layer = {{0, mat * EXPERTS, 2 * mat * EXPERTS}, {mat, mat, mat},
                                    {FL_TYPE_F32, FL_TYPE_F32, FL_TYPE_F32}, {0, 0, 0}};
    const char *paths[1] = {path};
    fl_expert_cache *c = NULL;
    int64_t slot = fl_expert_cache_slot_bytes(1, &layer);
    CHECK(slot >= 3 * mat, "slot bytes %lld for 3 matrices of %lld", (long long)slot, (long long)mat);
    if (fl_expert_cache_open(paths, 1, 1, EXPERTS, &layer, 2 * slot, FL_EXPERT_LFU, 1, 0, &c) != FL_OK) {
        CHECK(0, "fl_expert_cache_open failed");
    } else {
        float x[TOKENS * DIM], out[TOKENS * DIM], wts[TOKENS * USED] = {1, 1, 1, 1, 1, 1};
        int32_t idx[TOKENS * USED] = {0, 3, 3, 1, 3, 0};
        fill(x, TOKENS * DIM, 1.0f);
        memset(out, 0, sizeof out);
        CHECK(fl_moe_experts_cached(c, 0, TOKENS, DIM, INTER, USED, x, idx, wts, 10.0f, out) == FL_OK,
              "fl_moe_experts_cached failed");
        int64_t counts[EXPERTS];
        CHECK(fl_expert_cache_usage(c, counts) == FL_OK, "fl_expert_cache_usage failed");
        /* demanded once per call each: 0, 1 and 3 */
        CHECK(counts[0] == 1 && counts[1] == 1 && counts[2] == 0 && counts[3] == 1, "usage %lld %lld %lld %lld",
              (long long)counts[0], (long long)counts[1], (long long)counts[2], (long long)counts[3]);
        struct fl_expert_stats st;
        fl_expert_cache_stats(c, &st);
        CHECK(st.misses == 3 && st.bytes_read >= 3 * 3 * mat, "stats before the reset: %lld misses",
              (long long)st.misses);
        fl_expert_cache_reset_stats(c);
        fl_expert_cache_stats(c, &st);
        CHECK(st.hits == 0 && st.misses == 0 && st.bytes_read == 0 && st.slots == 2,
              "fl_expert_cache_reset_stats left counts");
        CHECK(fl_expert_cache_usage(c, counts) == FL_OK && counts[3] == 1, "reset_stats cleared the usage history");
        fl_expert_cache_close(c);
    }
    int64_t cached = fl_file_cached_bytes(path, 0, 3 * mat * EXPERTS);
    CHECK(cached >= 0 && cached <= 3 * mat * EXPERTS, "fl_file_cached_bytes: %lld", (long long)cached);
    CHECK(fl_file_cached_bytes("/nonexistent/flashlite", 0, 4096) == -1, "fl_file_cached_bytes of no file");
    unlink(path);
    free(w);
}

/* ---------------------------------------------------------------- hyper-connections and RMS norm */

static double sigmoid_d(double v) { return 1.0 / (1.0 + exp(-v)); }

/* V4's collapse, mixing and expansion of the hc streams in double precision from the formulas, for fl_hc_pre /
 * fl_hc_post and fl_rms_norm at hc = 4, dim = 24, 3 tokens */
static void test_hyper_connections(void) {
    enum { T = 3, HC = 4, D = 24, MIX = (2 + HC) * HC, ITERS = 20 };
    const float hc_eps = 1e-6f, norm_eps = 1e-6f;
    float h[T * HC * D], fn[MIX * HC * D], base[MIX], scale[3] = {0.7f, 1.3f, 0.9f}, weight[D];
    float x[T * D], post[T * HC], comb[T * HC * HC], out[T * D], h2[T * HC * D], normed[T * D];
    fill(h, T * HC * D, 2.0f);
    fill(fn, MIX * HC * D, 0.3f);
    fill(base, MIX, 1.0f);
    fill(weight, D, 1.5f);
    fill(out, T * D, 1.0f);
    CHECK(fl_hc_pre(T, HC, D, h, FL_TYPE_F32, fn, base, scale, ITERS, hc_eps, norm_eps, x, post, comb) == FL_OK,
          "fl_hc_pre failed");
    CHECK(fl_hc_post(T, HC, D, out, h, post, comb, h2) == FL_OK, "fl_hc_post failed");
    CHECK(fl_rms_norm(T, D, x, weight, norm_eps, normed) == FL_OK, "fl_rms_norm failed");
    double worst = 0;
    for (int t = 0; t < T; t++) {
        const float *ht = h + t * HC * D;
        double ss = 0, mix[MIX], pre[HC], pst[HC], c[HC][HC];
        for (int i = 0; i < HC * D; i++) ss += (double)ht[i] * ht[i];
        double inv = 1.0 / sqrt(ss / (HC * D) + norm_eps);
        for (int m = 0; m < MIX; m++) {
            mix[m] = 0;
            for (int i = 0; i < HC * D; i++) mix[m] += (double)fn[m * HC * D + i] * ht[i] * inv;
        }
        for (int a = 0; a < HC; a++) {
            pre[a] = sigmoid_d(mix[a] * scale[0] + base[a]) + hc_eps;
            pst[a] = 2 * sigmoid_d(mix[HC + a] * scale[1] + base[HC + a]);
        }
        for (int a = 0; a < HC; a++) { /* softmax over the destination stream, plus eps */
            double m = -INFINITY, sum = 0;
            for (int b = 0; b < HC; b++) {
                c[a][b] = mix[2 * HC + a * HC + b] * scale[2] + base[2 * HC + a * HC + b];
                m = c[a][b] > m ? c[a][b] : m;
            }
            for (int b = 0; b < HC; b++) sum += c[a][b] = exp(c[a][b] - m);
            for (int b = 0; b < HC; b++) c[a][b] = c[a][b] / sum + hc_eps;
        }
        for (int round = 0; round < ITERS; round++) { /* column sums to 1, then rows and columns in turn */
            if (round > 0)
                for (int a = 0; a < HC; a++) {
                    double sum = 0;
                    for (int b = 0; b < HC; b++) sum += c[a][b];
                    for (int b = 0; b < HC; b++) c[a][b] /= sum + hc_eps;
                }
            for (int b = 0; b < HC; b++) {
                double sum = 0;
                for (int a = 0; a < HC; a++) sum += c[a][b];
                for (int a = 0; a < HC; a++) c[a][b] /= sum + hc_eps;
            }
        }
        double xs[D], xss = 0;
        for (int d = 0; d < D; d++) {
            xs[d] = 0;
            for (int a = 0; a < HC; a++) xs[d] += pre[a] * ht[a * D + d];
            xss += xs[d] * xs[d];
        }
        for (int d = 0; d < D; d++) {
            double err = fabs(x[t * D + d] - xs[d]) / (1 + fabs(xs[d]));
            worst = err > worst ? err : worst;
            double n = weight[d] * xs[d] / sqrt(xss / D + norm_eps);
            err = fabs(normed[t * D + d] - n) / (1 + fabs(n));
            worst = err > worst ? err : worst;
        }
        for (int a = 0; a < HC; a++) {
            worst = fmax(worst, fabs(post[t * HC + a] - pst[a]));
            for (int b = 0; b < HC; b++) worst = fmax(worst, fabs(comb[(t * HC + a) * HC + b] - c[a][b]));
        }
        for (int b = 0; b < HC; b++)
            for (int d = 0; d < D; d++) {
                double e = pst[b] * out[t * D + d];
                for (int a = 0; a < HC; a++) e += c[a][b] * ht[a * D + d];
                worst = fmax(worst, fabs(h2[(t * HC + b) * D + d] - e) / (1 + fabs(e)));
            }
    }
    CHECK(worst < 1e-5, "hyper-connections: worst relative error %g against double precision", worst);
    /* the Sinkhorn rounds past the first in float32, as the core's generic code runs them (sums in order, one
     * division each), from the core's first round: the bits the four-stream path gives */
    float comb1[T * HC * HC], post1[T * HC];
    CHECK(fl_hc_pre(T, HC, D, h, FL_TYPE_F32, fn, base, scale, 1, hc_eps, norm_eps, x, post1, comb1) == FL_OK,
          "fl_hc_pre with one Sinkhorn round failed");
    for (int t = 0; t < T; t++) {
        float *c = comb1 + t * HC * HC;
        for (int round = 1; round < ITERS; round++) {
            for (int a = 0; a < HC; a++) {
                float sum = 0.0f;
                for (int b = 0; b < HC; b++) sum += c[a * HC + b];
                for (int b = 0; b < HC; b++) c[a * HC + b] /= sum + hc_eps;
            }
            for (int b = 0; b < HC; b++) {
                float sum = 0.0f;
                for (int a = 0; a < HC; a++) sum += c[a * HC + b];
                for (int a = 0; a < HC; a++) c[a * HC + b] /= sum + hc_eps;
            }
        }
    }
    CHECK(memcmp(comb1, comb, sizeof comb) == 0, "four-stream Sinkhorn differs from the rounds in float32 order");
    /* the final collapse: pre weights only, the same x from the first HC rows of fn */
    float x_head[T * D];
    CHECK(fl_hc_pre(T, HC, D, h, FL_TYPE_F32, fn, base, scale, 1, hc_eps, norm_eps, x_head, NULL, NULL) == FL_OK,
          "fl_hc_pre (head) failed");
    CHECK(memcmp(x_head, x, sizeof x) == 0, "the head's collapse differs from the layer's");
    CHECK(fl_hc_pre(T, 65, D, h, FL_TYPE_F32, fn, base, scale, ITERS, hc_eps, norm_eps, x, post, comb) == FL_EINVAL,
          "fl_hc_pre accepted 65 streams");
    CHECK(fl_hc_pre(T, HC, D, h, FL_TYPE_F32, fn, base, scale, 0, hc_eps, norm_eps, x, post, comb) == FL_EINVAL,
          "fl_hc_pre accepted 0 Sinkhorn iterations");
    CHECK(fl_hc_pre(T, HC, D, h, FL_TYPE_F32, fn, base, scale, ITERS, hc_eps, norm_eps, x, post, NULL) == FL_EINVAL,
          "fl_hc_pre accepted post without comb");
    CHECK(fl_hc_post(T, HC, D, out, h, NULL, comb, h2) == FL_EINVAL, "fl_hc_post accepted no post");
    CHECK(fl_rms_norm(T, D, x, NULL, -1.0f, normed) == FL_EINVAL, "fl_rms_norm accepted a negative eps");
    CHECK(fl_rms_norm(T, 0, x, NULL, norm_eps, normed) == FL_EINVAL, "fl_rms_norm accepted dim 0");
}

/* fl_indexer_topk split across threads (one query per task) and scored through the blocked kernels at each SIMD
 * level: the picks of the plain loops on one thread, with more keys than one block, duplicated keys (ties go to the
 * lower row) and a NaN score (never picked). */
static void test_indexer_split(void) {
    enum { T = 5, IH = 6, ID = 21, KEYS = 300, TOPK = 40 };
    uint64_t later_tests_draws = rng_state; /* the tests after this one keep the data they were written for */
    float *q = malloc(sizeof(float) * T * IH * ID), *keys = malloc(sizeof(float) * KEYS * ID), hw[T * IH];
    int32_t visible[T] = {KEYS, 1, 0, 200, 137}, want[T * TOPK], got[T * TOPK];
    fill(q, T * IH * ID, 1.0f);
    fill(keys, KEYS * ID, 1.0f);
    fill(hw, T * IH, 1.0f);
    for (int h = 0; h < IH; h++) hw[h] = fabsf(hw[h]);
    for (int d = 0; d < ID; d++) { /* rows 3 and 7 tie, at the top for query 0 */
        keys[3 * ID + d] = 0.0f;
        for (int h = 0; h < IH; h++) keys[3 * ID + d] += 3.0f * q[h * ID + d];
    }
    memcpy(keys + 7 * ID, keys + 3 * ID, sizeof(float) * ID);
    keys[11 * ID] = NAN;                                      /* row 11 scores NaN */
    int best = fl_simd_level(), threads = fl_threads_get();
    fl_simd_set(FL_SIMD_SCALAR);
    fl_threads_set(1);
    CHECK(fl_indexer_topk(T, IH, ID, q, hw, keys, KEYS, visible, TOPK, 0.3f, want) == FL_OK, "fl_indexer_topk");
    int pos3 = -1, pos7 = -1, nan_picked = 0;
    for (int t = 0; t < T; t++)
        for (int p = 0; p < TOPK; p++) {
            int32_t r = want[t * TOPK + p];
            nan_picked |= r == 11;
            if (t == 0 && r == 3) pos3 = p;
            if (t == 0 && r == 7) pos7 = p;
        }
    CHECK(!nan_picked, "fl_indexer_topk picked a row that scores NaN");
    CHECK(pos3 >= 0 && pos3 + 1 == pos7, "fl_indexer_topk: tied rows 3, 7 at picks %d, %d", pos3, pos7);
    CHECK(want[1 * TOPK] == 0 && want[1 * TOPK + 1] == -1 && want[2 * TOPK] == -1,
          "fl_indexer_topk: one visible row then -1, none visible all -1");
    for (int level = FL_SIMD_SCALAR; level <= FL_SIMD_NEON; level++) {
        if (fl_simd_set(level) != FL_OK) continue;
        for (int th = 1; th <= 3; th++) {
            fl_threads_set(th);
            CHECK(fl_indexer_topk(T, IH, ID, q, hw, keys, KEYS, visible, TOPK, 0.3f, got) == FL_OK,
                  "fl_indexer_topk: level %d, %d threads", level, th);
            CHECK(memcmp(want, got, sizeof want) == 0, "fl_indexer_topk: level %d with %d threads differs", level, th);
        }
    }
    fl_simd_set(best);
    fl_threads_set(threads);
    free(q), free(keys);
    rng_state = later_tests_draws;
}

/* ---------------------------------------------------------------- RoPE, and the row operations split across threads */

/* fl_rope against a double-precision rotation and back; then fl_rope, fl_rms_norm, fl_hc_pre and fl_hc_post on
 * prefill-sized inputs (split across the pool) bitwise as on one thread. */
static void test_rope_and_rows_split(void) {
    enum { T = 70, R = 64, D = 48, RD = 16, HC = 4, W = 256 }; /* big enough to split */
    uint64_t later_tests_draws = rng_state; /* the tests after this one keep the data they were written for */
    float *x = malloc(sizeof(float) * T * R * D), *y = malloc(sizeof(float) * T * R * D);
    float cs[T * RD / 2], sn[T * RD / 2];
    fill(x, T * R * D, 1.0f);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < RD / 2; i++) {
            double angle = t * pow(10000.0, -2.0 * i / RD);
            cs[t * RD / 2 + i] = (float)cos(angle), sn[t * RD / 2 + i] = (float)sin(angle);
        }
    memcpy(y, x, sizeof(float) * T * R * D);
    CHECK(fl_rope(T, R, D, RD, cs, sn, 0, y) == FL_OK, "fl_rope failed");
    double worst = 0;
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++)
            for (int d = 0; d < D; d++) {
                const float *v = x + (t * R + r) * D;
                double want = v[d];
                if (d >= D - RD) {
                    int i = (d - (D - RD)) / 2, even = (d - (D - RD)) % 2 == 0;
                    double c = cs[t * RD / 2 + i], s = sn[t * RD / 2 + i], e = v[d - !even], o = v[d + even];
                    want = even ? e * c - o * s : o * c + e * s;
                }
                double err = fabs(want - y[(t * R + r) * D + d]);
                worst = err > worst ? err : worst;
            }
    CHECK(worst < 1e-5, "fl_rope: %.3g from the double-precision rotation", worst);
    CHECK(fl_rope(T, R, D, RD, cs, sn, 1, y) == FL_OK, "fl_rope inverse failed");
    worst = 0;
    for (int i = 0; i < T * R * D; i++) worst = fabs((double)x[i] - y[i]) > worst ? fabs((double)x[i] - y[i]) : worst;
    CHECK(worst < 1e-5, "fl_rope: the inverse is %.3g from the input", worst);
    CHECK(fl_rope(T, R, D, RD + 1, cs, sn, 0, y) == FL_EINVAL, "fl_rope accepted an odd rope_dim");
    CHECK(fl_rope(T, R, D, D + 2, cs, sn, 0, y) == FL_EINVAL, "fl_rope accepted rope_dim > dim");

    /* the same calls on one thread and on three */
    float *h = malloc(sizeof(float) * T * HC * W), *fn = malloc(sizeof(float) * (2 + HC) * HC * HC * W);
    float *out = malloc(sizeof(float) * T * W), base[(2 + HC) * HC], scale[3] = {0.5f, 0.7f, 0.9f}, weight[W];
    float *got[2][6];
    fill(h, T * HC * W, 1.0f);
    fill(fn, (2 + HC) * HC * HC * W, 0.05f);
    fill(out, T * W, 1.0f);
    fill(base, (2 + HC) * HC, 1.0f);
    fill(weight, W, 1.0f);
    int threads = fl_threads_get();
    for (int run = 0; run < 2; run++) {
        fl_threads_set(run ? 3 : 1);
        float **g = got[run];
        g[0] = malloc(sizeof(float) * T * R * D);
        memcpy(g[0], x, sizeof(float) * T * R * D);
        g[1] = malloc(sizeof(float) * T * HC * W);
        g[2] = malloc(sizeof(float) * T * W);
        g[3] = malloc(sizeof(float) * T * HC);
        g[4] = malloc(sizeof(float) * T * HC * HC);
        g[5] = malloc(sizeof(float) * T * HC * W);
        CHECK(fl_rope(T, R, D, RD, cs, sn, 0, g[0]) == FL_OK, "fl_rope failed");
        CHECK(fl_rms_norm(T * HC, W, h, weight, 1e-6f, g[1]) == FL_OK, "fl_rms_norm failed");
        CHECK(fl_hc_pre(T, HC, W, h, FL_TYPE_F32, fn, base, scale, 20, 1e-6f, 1e-6f, g[2], g[3], g[4]) == FL_OK,
              "fl_hc_pre failed");
        CHECK(fl_hc_post(T, HC, W, out, h, g[3], g[4], g[5]) == FL_OK, "fl_hc_post failed");
    }
    static const char *const names[6] = {"fl_rope", "fl_rms_norm", "fl_hc_pre x", "fl_hc_pre post",
                                         "fl_hc_pre comb", "fl_hc_post"};
    static const int64_t sizes[6] = {T * R * D, T * HC * W, T * W, T * HC, T * HC * HC, T * HC * W};
    for (int k = 0; k < 6; k++) {
        CHECK(memcmp(got[0][k], got[1][k], sizeof(float) * (size_t)sizes[k]) == 0,
              "%s: three threads differ from one", names[k]);
        free(got[0][k]), free(got[1][k]);
    }
    fl_threads_set(threads);
    free(x), free(y), free(h), free(fn), free(out);
    rng_state = later_tests_draws;
}

/* ---------------------------------------------------------------- non-finite data (--check-tensors) */

/* For every type the core converts: a sound row passes, and with two bytes of block 1 set to 0xff (each offset in
 * turn) fl_find_nonfinite names block 1 exactly when the row then decodes to Inf or NaN there: the checked fields
 * are the ones through which a block can decode to a non-finite value (fp16 scales cannot overflow their products).
 * MXFP4's NaN scale (0xff) is checked apart: it decodes as 2^127 in the core, as in ggml; so is Q8_K's f32 scale,
 * whose finite values near FLT_MAX overflow when multiplied. */
static void test_find_nonfinite(void) {
    enum { N = 512 };
    float x[N], y[N];
    uint8_t row[4 * N], bad[4 * N];
    fill(x, N, 1.0f);
    for (int t = 0; t < FL_TYPE_COUNT; t++) {
        int flags = fl_type_flags(t);
        if (!(flags & FL_CAN_QUANTIZE) || !(flags & FL_CAN_DEQUANTIZE))
            continue;
        int64_t blck = fl_type_block_elems(t), bytes = fl_type_block_bytes(t), nb = N / blck;
        CHECK(fl_quantize(t, x, row, N) == FL_OK, "%s: fl_quantize failed", fl_type_name(t));
        CHECK(fl_find_nonfinite(t, row, nb) == nb, "%s: a sound row flagged", fl_type_name(t));
        for (int64_t off = 0; off + 1 < bytes; off++) {
            memcpy(bad, row, (size_t)(nb * bytes));
            bad[bytes + off] = bad[bytes + off + 1] = 0xff;
            int64_t found = fl_find_nonfinite(t, bad, nb);
            CHECK(fl_dequantize(t, bad, y, N) == FL_OK, "%s: fl_dequantize failed", fl_type_name(t));
            int nonfinite = 0;
            for (int64_t i = blck; i < 2 * blck; i++)
                nonfinite |= !isfinite(y[i]);
            if (t == FL_TYPE_MXFP4)
                CHECK(found == (off == 0 ? 1 : nb), "mxfp4: byte %lld: found %lld", (long long)off, (long long)found);
            else if (t == FL_TYPE_Q8_K) /* a finite f32 scale near FLT_MAX times the values can still overflow */
                CHECK(found == nb || (found == 1 && nonfinite), "q8_K: bytes %lld..: found %lld", (long long)off,
                      (long long)found);
            else
                CHECK(found == (nonfinite ? 1 : nb), "%s: bytes %lld..%lld set: found %lld, decodes %s",
                      fl_type_name(t), (long long)off, (long long)off + 1, (long long)found,
                      nonfinite ? "non-finite" : "finite");
        }
    }
    CHECK(fl_find_nonfinite(FL_TYPE_I32, row, 4) == 4, "i32 flagged");
    CHECK(fl_find_nonfinite(5, row, 4) == FL_ETYPE, "unknown type 5 accepted");
    CHECK(fl_find_nonfinite(FL_TYPE_Q8_0, NULL, 4) == FL_EINVAL, "no data accepted");
    CHECK(fl_find_nonfinite(FL_TYPE_Q8_0, row, -1) == FL_EINVAL, "n_blocks -1 accepted");
}

/* ---------------------------------------------------------------- MoE routing and the fused MoE sublayer */

/* a score-routed MoE plan of dim 32 and 2 streams, for test_fused_attention's whole layer */
static struct fl_v4_ffn layer_ffn;

/* fl_v4_ffn against the calls it is made of, made one by one: bitwise, score-routed and hash-routed; and
 * fl_moe_route's order and errors */
static void test_fused_ffn(void) {
    enum { T = 2, HC = 2, D = 32, INTER = 16, NE = 4, USED = 2, VOCAB = 5, MIX = (2 + HC) * HC };
    static float h[T * HC * D], fn[MIX * HC * D], base[MIX], scale[3], norm[D], gate[NE * D], bias[NE];
    static float exps[3][NE * INTER * D], shared[3][INTER * D], fused[T * HC * D], want[T * HC * D];
    int32_t table[VOCAB * USED] = {0, 1, 2, 3, 3, 0, 1, 1, 2, 0};
    int64_t tokens[T] = {4, 1};
    fill(h, T * HC * D, 1.0f);
    fill(fn, MIX * HC * D, 0.1f);
    fill(base, MIX, 0.5f);
    fill(scale, 3, 1.0f);
    fill(norm, D, 1.0f);
    fill(gate, NE * D, 0.3f);
    fill(bias, NE, 0.1f);
    for (int m = 0; m < 3; m++) {
        fill(exps[m], NE * INTER * D, 0.2f);
        fill(shared[m], INTER * D, 0.2f);
    }
    int64_t stride = (int64_t)INTER * D * 4;
    struct fl_v4_ffn p = {D, HC, INTER, INTER, NE, USED, 0, 20, 1e-6f, 1e-6f, FL_TYPE_F32, fn, base, scale, norm,
                          FL_TYPE_F32, gate, bias, NULL, 1.5f, 7.0f, 9.0f,
                          {FL_TYPE_F32, FL_TYPE_F32, FL_TYPE_F32}, {exps[0], exps[1], exps[2]},
                          {stride, stride, stride}, NULL, 0,
                          {FL_TYPE_F32, FL_TYPE_F32, FL_TYPE_F32}, {shared[0], shared[1], shared[2]}};
    layer_ffn = p;
    for (int hashed = 0; hashed < 2; hashed++) {
        if (hashed) {
            p.bias = NULL;
            p.tid2eid = table;
            p.vocab = VOCAB;
        }
        CHECK(fl_v4_ffn(&p, T, h, tokens, fused) == FL_OK, "fl_v4_ffn failed (hashed %d)", hashed);
        float x[T * D], xn[T * D], out[T * D] = {0}, post[T * HC], comb[T * HC * HC], logits[T * NE];
        float wts[T * USED], one[T] = {1, 1};
        int32_t idx[T * USED], zero[T] = {0, 0};
        int ok = fl_hc_pre(T, HC, D, h, FL_TYPE_F32, fn, base, scale, 20, 1e-6f, 1e-6f, x, post, comb) == FL_OK &&
                 fl_rms_norm(T, D, x, norm, 1e-6f, xn) == FL_OK &&
                 fl_matmul(FL_TYPE_F32, gate, NE, D, xn, T, logits) == FL_OK &&
                 fl_moe_route(T, NE, USED, logits, p.bias, p.tid2eid, p.vocab, tokens, 1.5f, wts, idx) == FL_OK &&
                 fl_moe_experts(T, D, INTER, USED, NE, xn, idx, wts, FL_TYPE_F32, exps[0], stride, FL_TYPE_F32,
                                exps[1], stride, FL_TYPE_F32, exps[2], stride, 7.0f, out) == FL_OK &&
                 fl_moe_experts(T, D, INTER, 1, 1, xn, zero, one, FL_TYPE_F32, shared[0], 0, FL_TYPE_F32, shared[1],
                                0, FL_TYPE_F32, shared[2], 0, 9.0f, out) == FL_OK &&
                 fl_hc_post(T, HC, D, out, h, post, comb, want) == FL_OK;
        CHECK(ok, "the op-by-op sequence failed (hashed %d)", hashed);
        CHECK(memcmp(fused, want, sizeof want) == 0, "fl_v4_ffn differs from its op-by-op sequence (hashed %d)",
              hashed);
        if (hashed)
            CHECK(idx[0] == 2 && idx[1] == 0 && idx[2] == 2 && idx[3] == 3, "hash routes %d %d %d %d", idx[0],
                  idx[1], idx[2], idx[3]);
    }
    /* the biased top-k, best first, with ties to the lower id; weights the picked scores renormalised */
    float logits[NE] = {1.0f, 3.0f, 2.0f, 3.0f}, zeros[NE] = {0}, w[USED];
    int32_t idx[USED];
    CHECK(fl_moe_route(1, NE, USED, logits, zeros, NULL, 0, NULL, 2.0f, w, idx) == FL_OK && idx[0] == 1 &&
          idx[1] == 3 && fabsf(w[0] - 1.0f) < 1e-6f && fabsf(w[1] - 1.0f) < 1e-6f,
          "route of a tie: %d %d %g %g", idx[0], idx[1], w[0], w[1]);
    int64_t bad = VOCAB;
    CHECK(fl_moe_route(1, NE, USED, logits, NULL, table, VOCAB, &bad, 1.0f, w, idx) == FL_EINVAL,
          "a token id past the table accepted");
    table[0] = NE;
    tokens[0] = 0;
    CHECK(fl_v4_ffn(&p, 1, h, tokens, fused) == FL_EINVAL, "a table entry past the experts accepted");
    CHECK(fl_moe_route(1, NE, NE + 1, logits, zeros, NULL, 0, NULL, 1.0f, w, idx) == FL_EINVAL,
          "more experts used than exist accepted");
}

/* ---------------------------------------------------------------- Hadamard, indexer top-k, fused attention */

static void test_hadamard_and_indexer(void) {
    enum { R = 3, N = 16, T = 2, IH = 3, ID = 8, KEYS = 7, TOPK = 4 };
    float x[R * N], y[R * N];
    fill(x, R * N, 1.0f);
    CHECK(fl_hadamard(R, N, x, y) == FL_OK, "fl_hadamard failed");
    double err = 0;
    for (int r = 0; r < R; r++)
        for (int j = 0; j < N; j++) {
            double want = 0;
            for (int i = 0; i < N; i++) want += x[r * N + i] * (__builtin_popcount(i & j) % 2 ? -1.0 : 1.0);
            err = fmax(err, fabs(want / sqrt((double)N) - y[r * N + j]));
        }
    CHECK(err < 1e-5, "fl_hadamard off the Sylvester product by %g", err);
    CHECK(fl_hadamard(R, N, y, y) == FL_OK && fabsf(y[5] - x[5]) < 1e-5f, "fl_hadamard in place is not its inverse");
    CHECK(fl_hadamard(1, 12, x, y) == FL_EINVAL, "fl_hadamard accepted 12 dims");

    float q[T * IH * ID], hw[T * IH], keys[KEYS * ID];
    int32_t visible[T] = {KEYS, 2}, picks[T * TOPK];
    fill(q, T * IH * ID, 1.0f);
    fill(hw, T * IH, 1.0f);
    fill(keys, KEYS * ID, 1.0f);
    CHECK(fl_indexer_topk(T, IH, ID, q, hw, keys, KEYS, visible, TOPK, 0.5f, picks) == FL_OK, "fl_indexer_topk");
    for (int t = 0; t < T; t++) {
        double score[KEYS];
        for (int k = 0; k < visible[t]; k++) {
            score[k] = 0;
            for (int h = 0; h < IH; h++) {
                double d = 0;
                for (int i = 0; i < ID; i++) d += (double)q[(t * IH + h) * ID + i] * keys[k * ID + i];
                score[k] += fmax(d, 0.0) * 0.5 * hw[t * IH + h];
            }
        }
        for (int j = 0; j < TOPK; j++) {
            int32_t pk = picks[t * TOPK + j];
            if (j >= visible[t]) {
                CHECK(pk == -1, "query %d pick %d: %d past the visible rows", t, j, pk);
                continue;
            }
            int better = 0; /* rows scoring clearly above the j-th pick: exactly j of them */
            for (int k = 0; k < visible[t]; k++) better += score[k] > score[pk] + 1e-6;
            CHECK(pk >= 0 && pk < visible[t] && better == j, "query %d pick %d: row %d with %d better", t, j, pk,
                  better);
        }
    }
    visible[1] = KEYS + 1;
    CHECK(fl_indexer_topk(T, IH, ID, q, hw, keys, KEYS, visible, TOPK, 0.5f, picks) == FL_EINVAL,
          "fl_indexer_topk accepted more visible rows than keys");
}

/* fl_v4_attn over 12 positions of a ratio-4 layer with fp8 rows (compressor, indexer from position 8 on), in
 * logs the test owns: the rows land where they should, the output is finite, and batches of 5 and 7 tokens (windows
 * closing inside them, the indexer starting inside the second) give the bits and the logs of one token at a time;
 * and the errors of a log without room and of a closing window without its RoPE. Bitwise agreement with the Python
 * definition is tests/test_decode_step.py's. */
static void test_fused_attention(void) {
    enum { D = 32, HC = 2, H = 2, AHD = 80, RD = 16, QR = 32, G = 2, OR = 16, AWIN = 4, IH = 2, ID = 32, TOPK = 1,
           MIX = (2 + HC) * HC, POS = 12 };
    static float hc_fn[MIX * HC * D], hc_base[MIX], hc_scale[3], attn_norm[D], q_norm[QR], kv_norm[AHD], sinks[H];
    static float wq_a[QR * D], wq_b[H * AHD * QR], wkv[AHD * D], wo_a[G * OR * (H / G * AHD)], wo_b[D * G * OR];
    static float iq_b[IH * ID * QR], iproj[IH * D], ckv[2 * AHD * D], cgate[2 * AHD * D], cape[4 * 2 * AHD], cnorm[AHD];
    static float ikv[2 * ID * D], igate[2 * ID * D], iape[4 * 2 * ID], inorm[ID];
    static float hs[POS * HC * D], h_out[HC * D], cs[POS * RD], cs_rows[POS * RD];
    static float one[POS * HC * D], batched[POS * HC * D];
    float *h = hs;
    float *all[] = {hc_fn, hc_base, hc_scale, attn_norm, q_norm, kv_norm, sinks, wq_a, wq_b, wkv, wo_a, wo_b, iq_b,
                    iproj, ckv, cgate, cape, cnorm, ikv, igate, iape, inorm, hs, cs, cs_rows};
    int64_t counts[] = {MIX * HC * D, MIX, 3, D, QR, AHD, H, QR * D, H * AHD * QR, AHD * D, G * OR * (H / G * AHD),
                        D * G * OR, IH * ID * QR, IH * D, 2 * AHD * D, 2 * AHD * D, 4 * 2 * AHD, AHD, 2 * ID * D,
                        2 * ID * D, 4 * 2 * ID, ID, POS * HC * D, POS * RD, POS * RD};
    for (int i = 0; i < (int)(sizeof(counts) / sizeof(counts[0])); i++) fill(all[i], counts[i], 0.3f);
    int64_t kv_bytes = fl_kv_row_bytes(FL_KV_FP8, AHD, RD), idx_bytes = fl_kv_row_bytes(FL_KV_FP4, ID, 0);
    struct fl_v4_attn p = {0};
    p.dim = D, p.hc = HC, p.n_heads = H, p.head_dim = AHD, p.rope_dim = RD, p.q_rank = QR, p.o_groups = G;
    p.o_rank = OR, p.window = AWIN, p.ratio = 4, p.index_heads = IH, p.index_dim = ID, p.index_topk = TOPK;
    p.sinkhorn_iters = 20, p.hc_eps = 1e-6f, p.norm_eps = 1e-6f, p.hc_fn_type = FL_TYPE_F32, p.hc_fn = hc_fn;
    p.hc_base = hc_base, p.hc_scale = hc_scale, p.attn_norm = attn_norm, p.q_norm = q_norm, p.kv_norm = kv_norm;
    p.sinks = sinks;
    p.wq_a = (struct fl_v4_weight){FL_TYPE_F32, wq_a}, p.wq_b = (struct fl_v4_weight){FL_TYPE_F32, wq_b};
    p.wkv = (struct fl_v4_weight){FL_TYPE_F32, wkv}, p.wo_a = (struct fl_v4_weight){FL_TYPE_F32, wo_a};
    p.wo_b = (struct fl_v4_weight){FL_TYPE_F32, wo_b}, p.iq_b = (struct fl_v4_weight){FL_TYPE_F32, iq_b};
    p.iproj = (struct fl_v4_weight){FL_TYPE_F32, iproj};
    p.attn_scale = 0.125f, p.index_score_scale = 0.17f, p.index_weight_scale = 0.7f, p.kv_kind = FL_KV_FP8;
    p.comp = (struct fl_v4_compressor){AHD, RD, 1, 0, FL_KV_FP8, {FL_TYPE_F32, ckv}, {FL_TYPE_F32, cgate}, cape,
                                       cnorm};
    p.icomp = (struct fl_v4_compressor){ID, 0, 1, 1, FL_KV_FP4, {FL_TYPE_F32, ikv}, {FL_TYPE_F32, igate}, iape,
                                        inorm};
    /* two sets of logs: one filled a token at a time, one by batches */
    size_t sizes[7] = {POS * (size_t)kv_bytes, 2 * POS * 2 * AHD * 4, 2 * POS * 2 * AHD * 4, POS * (size_t)kv_bytes,
                       2 * POS * 2 * ID * 4, 2 * POS * 2 * ID * 4, POS * (size_t)idx_bytes};
    uint8_t *logs[2][7];
    struct fl_v4_attn_cache caches[2];
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < 7; i++) logs[k][i] = calloc(1, sizes[i]);
        caches[k] = (struct fl_v4_attn_cache){{logs[k][0], 0, 0, POS}, {logs[k][1], 0, 0, POS},
                                              {logs[k][2], 0, 0, POS}, {logs[k][3], 0, 0, POS},
                                              {logs[k][4], 0, 0, POS}, {logs[k][5], 0, 0, POS},
                                              {logs[k][6], 0, 0, POS}};
    }
    struct fl_v4_attn_cache c = caches[0];
    int finite = 1;
    for (int64_t pos = 0; pos < POS; pos++) {
        CHECK(fl_v4_attn(&p, &c, pos, 1, cs + pos * RD, cs_rows + pos * RD, hs + pos * HC * D,
                         one + pos * HC * D) == FL_OK, "fl_v4_attn at %lld", (long long)pos);
        for (int i = 0; i < HC * D; i++) finite &= isfinite(one[pos * HC * D + i]) != 0;
    }
    CHECK(finite, "fl_v4_attn gave a non-finite output");
    CHECK(c.kv.end == POS && c.ckv.end == POS && c.cscore.end == POS && c.crows.end == POS / 4 &&
              c.irows.end == POS / 4,
          "log ends %lld %lld %lld %lld", (long long)c.kv.end, (long long)c.ckv.end, (long long)c.crows.end,
          (long long)c.irows.end);
    struct fl_v4_attn_cache cb = caches[1];
    CHECK(fl_v4_attn(&p, &cb, 0, 5, cs, cs_rows, hs, batched) == FL_OK &&
              fl_v4_attn(&p, &cb, 5, 7, cs + 5 * RD, cs_rows + 5 * RD, hs + 5 * HC * D, batched + 5 * HC * D) == FL_OK,
          "fl_v4_attn on batches failed");
    CHECK(memcmp(batched, one, sizeof one) == 0, "batches of 5 and 7 tokens differ from one token at a time");
    CHECK(cb.kv.end == c.kv.end && cb.ckv.end == c.ckv.end && cb.crows.end == c.crows.end &&
              cb.irows.end == c.irows.end, "batched log ends differ");
    for (int i = 0; i < 7; i++) CHECK(memcmp(logs[0][i], logs[1][i], sizes[i]) == 0, "batched log %d differs", i);
    CHECK(fl_v4_attn(&p, &c, POS, 1, cs, cs, h, h_out) == FL_EINVAL, "a log without room accepted");
    CHECK(fl_v4_attn(&p, &c, POS - 1, 0, cs, cs, h, h_out) == FL_EINVAL, "an empty batch accepted");
    /* a whole layer: the attention step, then the MoE sublayer on its result */
    static float mid[HC * D], want[HC * D];
    c.kv.end = c.ckv.end = c.cscore.end = c.ikv.end = c.iscore.end = POS - 2;
    c.crows.end = c.irows.end = (POS - 2) / 4;
    int64_t token = 3;
    CHECK(fl_v4_attn(&p, &c, POS - 2, 1, cs, cs, h, mid) == FL_OK &&
              fl_v4_ffn(&layer_ffn, 1, mid, &token, want) == FL_OK,
          "the layer's two sublayers failed");
    c.kv.end = c.ckv.end = c.cscore.end = c.ikv.end = c.iscore.end = POS - 2;
    CHECK(fl_v4_layer(&p, &c, &layer_ffn, POS - 2, 1, &token, cs, cs, h, h_out) == FL_OK &&
              memcmp(h_out, want, sizeof want) == 0,
          "fl_v4_layer differs from fl_v4_attn then fl_v4_ffn");
    CHECK(fl_v4_layer(&p, &c, NULL, POS - 2, 1, &token, cs, cs, h, h_out) == FL_EINVAL, "a layer without its MoE plan");
    /* a whole step of two layers (the same plans over the two sets of logs): the two layer calls, in one */
    static float stepped[HC * D];
    struct fl_v4_attn_cache *two[2] = {&c, &cb};
    for (int k = 0; k < 2; k++) {
        two[k]->kv.end = two[k]->ckv.end = two[k]->cscore.end = two[k]->ikv.end = two[k]->iscore.end = POS - 2;
        two[k]->crows.end = two[k]->irows.end = (POS - 2) / 4;
    }
    CHECK(fl_v4_layer(&p, &c, &layer_ffn, POS - 2, 1, &token, cs, cs, h, mid) == FL_OK &&
              fl_v4_layer(&p, &cb, &layer_ffn, POS - 2, 1, &token, cs, cs, mid, want) == FL_OK,
          "two layer calls failed");
    for (int k = 0; k < 2; k++) {
        two[k]->kv.end = two[k]->ckv.end = two[k]->cscore.end = two[k]->ikv.end = two[k]->iscore.end = POS - 2;
        two[k]->crows.end = two[k]->irows.end = (POS - 2) / 4;
    }
    struct fl_v4_step_layer layers[2] = {{&p, &layer_ffn, &c, 0}, {&p, &layer_ffn, &cb, 0}};
    const float *tables[1] = {cs};
    int8_t short_of[2] = {1, 1};
    CHECK(fl_v4_step_short(2, layers, 2, short_of) == 0 && !short_of[0] && !short_of[1],
          "logs with room for two rows reported short");
    CHECK(fl_v4_step(2, layers, POS - 2, 1, &token, tables, tables, h, stepped) == FL_OK &&
              memcmp(stepped, want, sizeof want) == 0,
          "fl_v4_step differs from its layer calls");
    CHECK(c.kv.end == POS - 1 && cb.kv.end == POS - 1, "fl_v4_step log ends %lld %lld", (long long)c.kv.end,
          (long long)cb.kv.end);
    c.kv.cap = POS - 1;
    CHECK(fl_v4_step_short(2, layers, 1, short_of) == 1 && short_of[0] && !short_of[1], "a full window log not short");
    c.kv.cap = POS;
    layers[1].table = -1;
    CHECK(fl_v4_step(2, layers, POS - 1, 1, &token, tables, tables, h, stepped) == FL_EINVAL, "a bad table accepted");
    c.kv.cap = c.ckv.cap = c.cscore.cap = c.ikv.cap = c.iscore.cap = POS + 1;
    c.kv.end = c.ckv.end = c.cscore.end = c.ikv.end = c.iscore.end = POS - 1;
    c.crows.end = c.irows.end = (POS - 1) / 4;
    CHECK(fl_v4_attn(&p, &c, POS - 1, 1, cs, NULL, h, h_out) == FL_EINVAL, "a closing window without its RoPE");
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < 7; i++) free(logs[k][i]);
}

int main(void) {
    test_attn_sink();
    test_attn_sink_split();
    test_rope_and_rows_split();
    test_indexer_split();
    test_compress_pool();
    test_kv_pack();
    test_types();
    test_expert_usage();
    test_hyper_connections();
    test_find_nonfinite();
    test_fused_ffn();
    test_hadamard_and_indexer();
    test_fused_attention(); /* after test_fused_ffn, whose plan it reuses */
    printf("ok: %d failure(s)\n", failures);
    return failures ? 1 : 0;
}

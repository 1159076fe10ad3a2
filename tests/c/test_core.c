/* test_core.c: the C core on its own, built with the sanitizers by tests/test_c_sanitizers.py.
 * Every SIMD kernel table this CPU can run against the generic reference dot, fl_matmul at every level,
 * thread count and odd shape against a double-precision product of the dequantized operands, the pool,
 * and the error codes. Prints one line per failure and exits non-zero if there was any. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "flashlite.h"
#include "check.h"
#include "kernels.h"
#include "simd.h"
#include "threadpool.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint32_t rng_u32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}

static float rng_uniform(void) { /* in [-1, 1) */
    return (float)((double)rng_u32() / 2147483648.0 - 1.0);
}

static const int formats[] = {FL_TYPE_F32,    FL_TYPE_F16,    FL_TYPE_BF16,   FL_TYPE_Q8_0,   FL_TYPE_MXFP4,
                              FL_TYPE_NVFP4,  FL_TYPE_Q1_0,   FL_TYPE_Q2_0,   FL_TYPE_Q4_0,   FL_TYPE_Q4_1,
                              FL_TYPE_Q5_0,   FL_TYPE_Q5_1,   FL_TYPE_Q2_K,   FL_TYPE_Q3_K,   FL_TYPE_Q4_K,
                              FL_TYPE_Q5_K,   FL_TYPE_Q6_K,   FL_TYPE_TQ1_0,  FL_TYPE_TQ2_0,  FL_TYPE_IQ2_XXS,
                              FL_TYPE_IQ4_XS, FL_TYPE_IQ4_NL, FL_TYPE_IQ2_XS, FL_TYPE_IQ2_S,  FL_TYPE_IQ3_XXS,
                              FL_TYPE_IQ3_S,  FL_TYPE_IQ1_S,  FL_TYPE_IQ1_M};
#define N_FORMATS (int)(sizeof(formats) / sizeof(formats[0]))

/* formats with no SIMD dot yet: every level must fall back to the generic one (dispatch.c) */
static int generic_only(int type) {
    return type == FL_TYPE_NVFP4 || type == FL_TYPE_Q1_0 || type == FL_TYPE_Q2_0 || type == FL_TYPE_TQ1_0;
}

static void put_half(uint8_t *p, float v) {
    fl_half h = fl_fp32_to_fp16(v);
    memcpy(p, &h, sizeof(h));
}

/* random bits in every block, with each scale field set to a small positive half so values stay finite */
static void random_weights(int type, uint8_t *w, int64_t rows, int64_t k) {
    int64_t n = rows * k;
    if (type == FL_TYPE_F32 || type == FL_TYPE_F16 || type == FL_TYPE_BF16) {
        for (int64_t i = 0; i < n; i++) {
            float v = rng_uniform();
            if (type == FL_TYPE_F32)
                memcpy(w + 4 * i, &v, 4);
            else if (type == FL_TYPE_F16)
                put_half(w + 2 * i, v);
            else {
                uint16_t b = fl_fp32_to_bf16(v);
                memcpy(w + 2 * i, &b, 2);
            }
        }
        return;
    }
    int64_t bytes = fl_type_block_bytes(type), blocks = n / fl_type_block_elems(type);
    for (int64_t b = 0; b < blocks; b++) {
        uint8_t *blk = w + b * bytes;
        for (int64_t i = 0; i < bytes; i++)
            blk[i] = (uint8_t)rng_u32();
        float d = 0.005f + 0.01f * (rng_uniform() + 1.0f);
        switch (type) {
        case FL_TYPE_MXFP4: blk[0] = (uint8_t)(118 + rng_u32() % 9); break;
        case FL_TYPE_NVFP4: /* four UE4M3 scale bytes, 2^-4..2^-1 */
            for (int s = 0; s < 4; s++)
                blk[s] = (uint8_t)(0x18 + rng_u32() % 32);
            break;
        case FL_TYPE_TQ1_0: put_half(blk + 52, d); break;
        case FL_TYPE_TQ2_0: put_half(blk + 64, d); break;
        case FL_TYPE_Q2_K: put_half(blk + 80, d); put_half(blk + 82, d); break;
        case FL_TYPE_Q3_K: put_half(blk + 108, d); break;
        case FL_TYPE_Q4_1:
        case FL_TYPE_Q5_1:
        case FL_TYPE_Q4_K:
        case FL_TYPE_Q5_K: put_half(blk, d); put_half(blk + 2, d); break;
        case FL_TYPE_Q6_K: put_half(blk + 208, d); break;
        case FL_TYPE_IQ1_M: { /* d in the top 4 bits of the four 16-bit scale words */
            fl_half h = fl_fp32_to_fp16(d);
            for (int i = 0; i < 4; i++)
                blk[48 + 2 * i + 1] = (uint8_t)((blk[48 + 2 * i + 1] & 0x0f) | (((h >> (4 * i)) & 0xf) << 4));
            break;
        }
        default: put_half(blk, d); break; /* Q8_0, Q4_0, Q5_0, Q1_0, Q2_0 and the IQ types but IQ1_M: d leads */
        }
    }
}

/* the activations as the dot sees them: quantized to the act type (or copied), and dequantized back */
static void act_roundtrip(int type, const float *x, int64_t k, uint8_t *xq, float *xd) {
    const struct fl_type_traits *t = fl_traits(type);
    const struct fl_type_traits *a = fl_traits(t->act_type);
    a->from_float(x, xq, k);
    a->to_float(xq, xd, k);
}

/* Q4_1 / Q5_1 dots add each weight block's min m times the activation block's s = d * sum(q) rounded to half,
 * where the double product of the dequantized rows has the exact sum: the difference, to add to that product */
static double q8_1_min_term(int type, const uint8_t *w, const uint8_t *xq, int64_t k) {
    if (fl_traits(type)->act_type != FL_TYPE_Q8_1)
        return 0;
    const block_q8_1 *a = (const block_q8_1 *)xq;
    double term = 0;
    for (int64_t b = 0; b < k / QK8_1; b++) {
        fl_half mh;
        memcpy(&mh, w + b * fl_type_block_bytes(type) + 2, sizeof(mh)); /* m follows d in both */
        int sum = 0;
        for (int j = 0; j < QK8_1; j++)
            sum += a[b].qs[j];
        term += fl_fp16_to_fp32(mh) * (fl_fp16_to_fp32(a[b].s) - (double)fl_fp16_to_fp32(a[b].d) * sum);
    }
    return term;
}

static double dot_double(const float *a, const float *b, int64_t k, double *abs_sum) {
    double s = 0, m = 0;
    for (int64_t i = 0; i < k; i++) {
        s += (double)a[i] * b[i];
        m += fabs((double)a[i] * b[i]);
    }
    *abs_sum = m;
    return s;
}

struct table {
    const char *name;
    fl_vec_dot_fn (*lookup)(int type);
    int runs_here;
};

static void test_vec_dots(void) {
    struct table tables[] = {
#if defined(__x86_64__)
        {"avx2", fl_dot_avx2, fl_simd_best() >= FL_SIMD_AVX2},
        {"avx512", fl_dot_avx512, fl_simd_best() >= FL_SIMD_AVX512},
        {"avx512_vnni", fl_dot_avx512_vnni, fl_simd_best() >= FL_SIMD_AVX512 && fl_simd_has_vnni()},
#elif defined(__aarch64__)
        {"neon", fl_dot_neon, 1},
#endif
        {"none", NULL, 0},
    };
    for (int f = 0; f < N_FORMATS; f++) {
        int type = formats[f];
        const struct fl_type_traits *t = fl_traits(type);
        for (int level = 0; generic_only(type) && level < 4; level++)
            if (fl_simd_set(level) == FL_OK)
                CHECK(fl_vec_dot(type) == t->vec_dot_generic, "%s: level %d does not fall back to the generic dot",
                      t->name, level);
        fl_simd_set(fl_simd_best());
        int64_t ks[] = {t->blck, 2 * t->blck, t->blck == 1 ? 37 : 5 * t->blck};
        for (int ki = 0; ki < 3; ki++) {
            int64_t k = ks[ki];
            uint8_t *w = malloc((size_t)fl_row_bytes(type, k));
            float *x = malloc((size_t)k * sizeof(float)), *xd = malloc((size_t)k * sizeof(float));
            float *wd = malloc((size_t)k * sizeof(float));
            uint8_t *xq = malloc((size_t)fl_row_bytes(t->act_type, k));
            random_weights(type, w, 1, k);
            for (int64_t i = 0; i < k; i++)
                x[i] = rng_uniform();
            act_roundtrip(type, x, k, xq, xd);
            t->to_float(w, wd, k);
            double mag, want = dot_double(wd, xd, k, &mag) + q8_1_min_term(type, w, xq, k);
            float ref;
            t->vec_dot_generic(k, &ref, w, xq);
            CHECK(fabs(ref - want) <= 1e-5 * mag + 1e-6, "%s k=%ld generic %g vs double %g", t->name, (long)k, ref,
                  want);
            for (int l = 0; tables[l].lookup; l++) {
                if (!tables[l].runs_here || generic_only(type))
                    continue;
                fl_vec_dot_fn dot = tables[l].lookup(type);
                CHECK(dot != NULL, "%s has no %s kernel", tables[l].name, t->name);
                if (!dot)
                    continue;
                float got;
                dot(k, &got, w, xq);
                CHECK(fabs(got - ref) <= 1e-5 * mag + 1e-6, "%s %s k=%ld: %g vs generic %g", tables[l].name,
                      t->name, (long)k, got, ref);
            }
            free(w), free(x), free(xd), free(wd), free(xq);
        }
    }
}

/* the formats without SIMD dots get the generic one at every level this CPU runs */
static void test_generic_fallback(void) {
    for (int level = 0; level < 4; level++) {
        if (fl_simd_set(level) != FL_OK)
            continue;
        for (int f = 0; f < N_FORMATS; f++) {
            const struct fl_type_traits *t = fl_traits(formats[f]);
            if (generic_only(formats[f]))
                CHECK(fl_vec_dot(formats[f]) == t->vec_dot_generic, "level %d: %s dot is not the generic one",
                      level, t->name);
        }
    }
    fl_simd_set(fl_simd_best());
}

/* every quantizer, with and without importance, on rows of NaN, infinities, float32 extremes, subnormals and
 * zeros, importance with zeros and extremes: the sanitizers see no undefined behaviour and no stray access
 * (the i-quants' grid searches and their tables built on first use included) */
static void test_quantize_garbage(void) {
    enum { N = 512, ROWS = 6 };
    static const float specials[] = {NAN, INFINITY, -INFINITY, 3.4e38f, -3.4e38f, 1e-45f, -1e-45f, 0.0f, -0.0f};
    float *x = malloc(sizeof(float) * N * ROWS), *y = malloc(sizeof(float) * N * ROWS);
    float *imp = malloc(sizeof(float) * N);
    uint8_t *q = malloc((size_t)N * ROWS * 4);
    for (int64_t i = 0; i < (int64_t)N * ROWS; i++) {
        int64_t r = i / N;
        x[i] = r == 0 ? rng_uniform() : r < 4 && rng_u32() % 3 ? specials[rng_u32() % 9] : specials[r % 9];
    }
    for (int i = 0; i < N; i++)
        imp[i] = i % 5 == 0 ? 0.0f : i % 7 == 0 ? 3e38f : i % 11 == 0 ? 1e-45f : rng_uniform() + 1.0f;
    int extra[] = {FL_TYPE_Q8_1, FL_TYPE_Q8_K};
    for (int f = 0; f < N_FORMATS + 2; f++) {
        int type = f < N_FORMATS ? formats[f] : extra[f - N_FORMATS];
        const struct fl_type_traits *t = fl_traits(type);
        for (int weighted = 0; weighted < 2; weighted++) {
            CHECK(fl_quantize_rows(type, x, q, ROWS, N, weighted ? imp : NULL) == FL_OK, "quantize %s", t->name);
            CHECK(fl_dequantize(type, q, y, (int64_t)N * ROWS) == FL_OK, "dequantize %s", t->name);
        }
        CHECK(fl_quantize(type, x, q, (int64_t)N * ROWS) == FL_OK, "reference quantize %s", t->name);
    }
    free(x), free(imp), free(y), free(q);
}

/* fl_matmul against the double product of the weights with the activations as the format quantizes them, and
 * each token's row bitwise what a call with that token alone gives (one arithmetic for any number of tokens) */
static void check_matmul(int type, int64_t rows, int64_t k, int64_t n_tok, const char *level, int threads) {
    const struct fl_type_traits *t = fl_traits(type);
    size_t row_bytes = (size_t)fl_row_bytes(type, k);
    uint8_t *w = malloc(row_bytes * rows);
    float *x = malloc(sizeof(float) * k * n_tok), *y = malloc(sizeof(float) * rows * n_tok);
    float *wd = malloc(sizeof(float) * k * rows), *xd = malloc(sizeof(float) * k), *alone = malloc(sizeof(float) * rows);
    uint8_t *xq = malloc((size_t)fl_row_bytes(t->act_type, k));
    random_weights(type, w, rows, k);
    for (int64_t i = 0; i < k * n_tok; i++)
        x[i] = rng_uniform();
    t->to_float(w, wd, k * rows);
    CHECK(fl_matmul(type, w, rows, k, x, n_tok, y) == FL_OK, "fl_matmul %s", t->name);
    for (int64_t tk = 0; tk < n_tok; tk++) {
        CHECK(fl_matmul(type, w, rows, k, x + tk * k, 1, alone) == FL_OK, "fl_matmul %s", t->name);
        CHECK(memcmp(alone, y + tk * rows, sizeof(float) * rows) == 0,
              "matmul %s %s threads=%d rows=%ld k=%ld n_tok=%ld: token %ld differs from its call alone", level, t->name,
              threads, (long)rows, (long)k, (long)n_tok, (long)tk);
        act_roundtrip(type, x + tk * k, k, xq, xd);
        for (int64_t r = 0; r < rows; r++) {
            double mag, want = dot_double(wd + r * k, xd, k, &mag);
            want += q8_1_min_term(type, w + r * row_bytes, xq, k);
            float got = y[tk * rows + r];
            if (!(fabs(got - want) <= 1e-5 * mag + 1e-6)) {
                CHECK(0, "matmul %s %s threads=%d rows=%ld k=%ld n_tok=%ld: y[%ld,%ld] = %g, want %g", level,
                      t->name, threads, (long)rows, (long)k, (long)n_tok, (long)tk, (long)r, got, want);
                tk = n_tok;
                break;
            }
        }
    }
    free(w), free(x), free(y), free(wd), free(xd), free(xq), free(alone);
}

static void test_matmul(void) {
    static const char *names[] = {"scalar", "avx2", "avx512", "neon"};
    const int64_t rows_list[] = {1, 7, 37};
    const int64_t tok_list[] = {1, 3, 17, 45};
    const int amx = fl_simd_has_amx();
    CHECK(amx || fl_amx_set(1) == FL_EINVAL, "AMX turned on where the CPU or OS lacks it");
    for (int level = 0; level < 4; level++) {
        if (fl_simd_set(level) != FL_OK)
            continue;
        /* at AVX-512 also the AMX prefill kernels where offered; first the AVX-512 ones, which CPUs without AMX run */
        for (int use_amx = 0; use_amx <= (level == FL_SIMD_AVX512 && amx); use_amx++) {
            CHECK(fl_amx_set(use_amx) == FL_OK && fl_simd_has_amx() == use_amx, "AMX %s", use_amx ? "on" : "off");
            for (int threads = 1; threads <= 3; threads++) {
                CHECK(fl_threads_set(threads) == FL_OK && fl_threads_get() == threads, "threads %d", threads);
                for (int f = 0; f < N_FORMATS; f++) {
                    const struct fl_type_traits *t = fl_traits(formats[f]);
                    int64_t k = t->blck == 1 ? 33 : t->blck == 32 ? 96 : 256;
                    for (int ri = 0; ri < 3; ri++)
                        for (int ti = 0; ti < 4; ti++)
                            check_matmul(formats[f], rows_list[ri], k, tok_list[ti], use_amx ? "amx" : names[level],
                                         threads);
                }
            }
        }
    }
    fl_amx_set(amx);
    fl_simd_set(fl_simd_best());
}

static void test_matmul_errors(void) {
    float x[256] = {0}, y[4];
    uint8_t w[1024] = {0};
    CHECK(fl_matmul(999, w, 1, 32, x, 1, y) == FL_ETYPE, "unknown type");
    CHECK(fl_matmul(FL_TYPE_Q8_K, w, 1, 256, x, 1, y) == FL_ETYPE, "Q8_K is no weight format");
    CHECK(fl_matmul(FL_TYPE_Q4_K, w, 1, 100, x, 1, y) == FL_EINVAL, "k not whole blocks");
    CHECK(fl_matmul(FL_TYPE_Q8_0, w, 0, 32, x, 1, y) == FL_EINVAL, "no rows");
    CHECK(fl_matmul(FL_TYPE_Q8_0, NULL, 1, 32, x, 1, y) == FL_EINVAL, "no weights");
    CHECK(fl_matmul(FL_TYPE_Q8_0, w, 1, 32, x, -1, y) == FL_EINVAL, "negative tokens");
    CHECK(fl_matmul(FL_TYPE_Q8_0, w, 1, 32, x, 0, y) == FL_OK, "zero tokens");
    CHECK(fl_simd_set(99) == FL_EINVAL, "unknown level");
#if defined(__x86_64__)
    CHECK(fl_simd_set(FL_SIMD_NEON) == FL_EINVAL, "neon on x86");
#endif
}

static int pool_threads;

static void count_task(void *ctx, int64_t task, int thread) {
    int64_t *hits = ctx;
    /* a thread index out of range counts as a second visit */
    __atomic_fetch_add(&hits[task], thread < pool_threads ? 1 : 2, __ATOMIC_RELAXED);
}

static void test_pool(void) {
    int64_t hits[1000];
    for (int n = 1; n <= 4; n++) {
        fl_threads_set(n);
        for (int max = 0; max <= 2; max++) {
            memset(hits, 0, sizeof(hits));
            pool_threads = max > 0 && max < n ? max : n;
            fl_parallel_for(1000, max, count_task, hits);
            int ok = 1;
            for (int i = 0; i < 1000; i++)
                ok &= hits[i] == 1;
            CHECK(ok, "every task exactly once with %d threads, max %d", n, max);
        }
    }
    CHECK(fl_threads_set(100000) == FL_EINVAL, "absurd thread count");
    fl_threads_set(0);
    CHECK(fl_threads_default() >= 1 && fl_threads_get() == fl_threads_default(), "default pool %d of default %d",
          fl_threads_get(), fl_threads_default());
}

/* The disk-cached MoE against the in-memory one on the same bytes: bitwise equal outputs for every budget from
 * one slot per layer up to all experts, LRU and LFU, with prefetches and pins in the way; hit and miss counts
 * add up to the experts demanded. */
static void test_expert_cache(void) {
    enum { LAYERS = 3, EXPERTS = 8, DIM = 64, INTER = 32, TOK = 5, USED = 3 };
    int64_t mat_bytes[3] = {fl_row_bytes(FL_TYPE_Q8_0, DIM) * INTER, fl_row_bytes(FL_TYPE_Q8_0, DIM) * INTER,
                            fl_row_bytes(FL_TYPE_Q8_0, INTER) * DIM};
    char path[] = "/tmp/fl_test_experts_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) { CHECK(0, "expert cache: %s", "mkstemp failed"); return; }
    struct fl_expert_layer layers[LAYERS];
    uint8_t *blob[LAYERS][3];
    int64_t offset = 800; /* 32-aligned, as GGUF aligns tensors, but not to the 4 KiB of a direct read */
    uint8_t pad[800] = {0};
    if (write(fd, pad, sizeof pad) != (ssize_t)sizeof pad) CHECK(0, "expert cache: %s", "write failed");
    for (int l = 0; l < LAYERS; l++)
        for (int m = 0; m < 3; m++) {
            int64_t rows = m < 2 ? INTER : DIM, k = m < 2 ? DIM : INTER;
            blob[l][m] = malloc((size_t)(mat_bytes[m] * EXPERTS));
            random_weights(FL_TYPE_Q8_0, blob[l][m], rows * EXPERTS, k);
            if (write(fd, blob[l][m], (size_t)(mat_bytes[m] * EXPERTS)) != (ssize_t)(mat_bytes[m] * EXPERTS))
                CHECK(0, "expert cache: %s", "write failed");
            layers[l].offset[m] = offset;
            layers[l].bytes[m] = mat_bytes[m];
            layers[l].type[m] = FL_TYPE_Q8_0;
            layers[l].file[m] = l % 2; /* the second file, a copy, stands for another shard of a split model */
            offset += mat_bytes[m] * EXPERTS;
        }
    close(fd);
    char path2[] = "/tmp/fl_test_experts_XXXXXX";
    int fd2 = mkstemp(path2);
    FILE *src = fopen(path, "rb");
    uint8_t *copy = malloc((size_t)offset);
    if (fd2 < 0 || !src || !copy || fread(copy, 1, (size_t)offset, src) != (size_t)offset ||
        write(fd2, copy, (size_t)offset) != (ssize_t)offset)
        CHECK(0, "expert cache: %s", "copying the file failed");
    free(copy);
    if (src) fclose(src);
    if (fd2 >= 0) close(fd2);
    const char *paths[2] = {path, path2};
    float x[TOK * DIM], w[TOK * USED], want[TOK * DIM], got[TOK * DIM];
    int32_t idx[TOK * USED];
    for (int i = 0; i < TOK * DIM; i++) x[i] = rng_uniform();
    for (int i = 0; i < TOK * USED; i++) {
        idx[i] = (int32_t)(rng_u32() % EXPERTS);
        w[i] = rng_uniform();
    }
    int64_t slot = fl_expert_cache_slot_bytes(LAYERS, layers);
    fl_expert_cache *c = NULL;
    if (fl_expert_cache_open(paths, 2, LAYERS, EXPERTS, layers, slot * LAYERS - 1, FL_EXPERT_LRU, 1, 1, &c) !=
        FL_EINVAL)
        CHECK(0, "expert cache: %s", "a budget under one slot per layer is accepted");
    for (int policy = 0; policy < 2; policy++)
        for (int per_layer = 1; per_layer <= EXPERTS; per_layer += 3) {
            if (fl_expert_cache_open(paths, 2, LAYERS, EXPERTS, layers, slot * LAYERS * per_layer, policy, 2,
                                     per_layer % 2, &c)) {
                CHECK(0, "expert cache: %s", "open failed");
                continue;
            }
            int32_t pin[1] = {idx[0]};
            if (per_layer > 1 && fl_expert_cache_pin(c, 1, pin, 1)) CHECK(0, "expert cache: %s", "pin failed");
            int64_t demanded = 0;
            for (int round = 0; round < 3; round++)
                for (int l = 0; l < LAYERS; l++) {
                    int32_t guess[4] = {0, 3, 5, 7};
                    fl_expert_cache_prefetch(c, (l + 1) % LAYERS, guess, 4);
                    memset(want, 0, sizeof want);
                    memset(got, 0, sizeof got);
                    fl_moe_experts(TOK, DIM, INTER, USED, EXPERTS, x, idx, w, FL_TYPE_Q8_0, blob[l][0], mat_bytes[0],
                                   FL_TYPE_Q8_0, blob[l][1], mat_bytes[1], FL_TYPE_Q8_0, blob[l][2], mat_bytes[2],
                                   4.0f, want);
                    if (fl_moe_experts_cached(c, l, TOK, DIM, INTER, USED, x, idx, w, 4.0f, got))
                        CHECK(0, "expert cache: %s", "fl_moe_experts_cached failed");
                    if (memcmp(want, got, sizeof want)) CHECK(0, "expert cache: %s", "cached MoE differs from mapped MoE");
                    uint8_t seen[EXPERTS] = {0};
                    for (int i = 0; i < TOK * USED; i++) demanded += !seen[idx[i]]++;
                }
            struct fl_expert_stats st;
            fl_expert_cache_stats(c, &st);
            if (st.hits + st.misses != demanded || st.slots != LAYERS * per_layer)
                CHECK(0, "expert cache: %s", "hits + misses differ from the experts demanded");
            fl_expert_cache_close(c);
        }
    /* A prefetch keeps the resident experts it names: with 2 slots, after {0} and {1}, prefetching {0, 2} must
     * evict 1, so that {0, 2} then reads nothing. */
    if (fl_expert_cache_open(paths, 1, 1, EXPERTS, layers, slot * 2, FL_EXPERT_LRU, 1, 1, &c) == FL_OK) {
        int32_t one[1][TOK * USED], guess[2] = {0, 2};
        float tiny_w[TOK * USED];
        for (int i = 0; i < TOK * USED; i++) tiny_w[i] = 1.0f;
        int32_t calls[3][2] = {{0, 0}, {1, 1}, {0, 2}};
        for (int call = 0; call < 3; call++) {
            if (call == 2) {
                fl_expert_cache_prefetch(c, 0, guess, 2);
                struct fl_expert_stats st = {0};
                for (int spin = 0; spin < 5000 && st.prefetches < 1; spin++) {
                    fl_expert_cache_stats(c, &st);
                    usleep(1000);
                }
            }
            for (int i = 0; i < TOK * USED; i++) one[0][i] = calls[call][i % 2];
            memset(got, 0, sizeof got);
            if (fl_moe_experts_cached(c, 0, TOK, DIM, INTER, USED, x, one[0], tiny_w, 4.0f, got))
                CHECK(0, "expert cache: %s", "fl_moe_experts_cached failed");
        }
        struct fl_expert_stats st;
        fl_expert_cache_stats(c, &st);
        CHECK(st.misses == 2 && st.prefetches == 1 && st.hits == 2,
              "expert cache: prefetch evicted a predicted expert (misses %ld, prefetches %ld, hits %ld)",
              (long)st.misses, (long)st.prefetches, (long)st.hits);
        fl_expert_cache_close(c);
    }
    unlink(path);
    unlink(path2);
    for (int l = 0; l < LAYERS; l++)
        for (int m = 0; m < 3; m++) free(blob[l][m]);
}

/* fl_matmul_batch: every item bitwise as fl_matmul computes it alone, with activations shared between items of the
 * same and of different types, decode- and prefill-sized items mixed, an empty item, and a bad item refused. */
static void test_matmul_batch(void) {
    enum { K = 256, ROWS = 37, N = 7 };
    static const int types[N] = {FL_TYPE_Q8_0, FL_TYPE_Q8_0, FL_TYPE_MXFP4, FL_TYPE_Q4_K, FL_TYPE_F32,
                                 FL_TYPE_Q6_K, FL_TYPE_Q8_0};
    static const int64_t toks[N] = {1, 1, 1, 3, 2, 0, 20};
    uint8_t *w[N];
    float *x = malloc(sizeof(float) * K * 20), *x2 = malloc(sizeof(float) * K * 20);
    float *want[N], *got[N];
    struct fl_matmul_item items[N];
    for (int i = 0; i < K * 20; i++) x[i] = rng_uniform(), x2[i] = rng_uniform();
    for (int i = 0; i < N; i++) {
        w[i] = malloc((size_t)fl_row_bytes(types[i], K) * ROWS);
        random_weights(types[i], w[i], ROWS, K);
        want[i] = calloc((size_t)ROWS * 20, sizeof(float));
        got[i] = calloc((size_t)ROWS * 20, sizeof(float));
        const float *xi = i == 3 ? x2 : x; /* item 3 alone reads other activations */
        items[i] = (struct fl_matmul_item){types[i], w[i], ROWS, K, xi, toks[i], got[i]};
        if (toks[i]) CHECK(fl_matmul(types[i], w[i], ROWS, K, xi, toks[i], want[i]) == FL_OK, "fl_matmul %d", i);
    }
    CHECK(fl_matmul_batch(N, items) == FL_OK, "fl_matmul_batch");
    for (int i = 0; i < N; i++) {
        CHECK(memcmp(want[i], got[i], sizeof(float) * ROWS * 20) == 0, "fl_matmul_batch item %d differs", i);
    }
    items[2].k = K + 1;
    CHECK(fl_matmul_batch(N, items) == FL_EINVAL, "fl_matmul_batch accepts a k off the block size");
    for (int i = 0; i < N; i++) free(w[i]), free(want[i]), free(got[i]);
    free(x), free(x2);
}

int main(void) {
    test_pool();
    test_vec_dots();
    test_generic_fallback();
    test_quantize_garbage();
    test_matmul();
    test_matmul_errors();
    test_matmul_batch();
    test_expert_cache();
    printf("%s: %d failure(s), best level %d, vnni %d\n", failures ? "FAILED" : "ok", failures, fl_simd_best(),
           fl_simd_has_vnni());
    return failures ? 1 : 0;
}

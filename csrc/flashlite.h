/* flashlite.h: the whole ABI of the flashlite C core, and the source of the cffi cdef.
 * cdef does not preprocess, so every preprocessor line stands alone and is dropped by the build;
 * declarations below use only fixed-width integers, opaque handles and int error codes. */
#ifndef FLASHLITE_H
#define FLASHLITE_H
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- errors */
enum fl_status {
    FL_OK = 0,
    FL_EINVAL = -1,  /* an argument is out of range or inconsistent */
    FL_ETYPE = -2,   /* the tensor type is unknown or not supported by this call */
    FL_ENOMEM = -3,  /* an allocation failed */
    FL_EIO = -4      /* a read or write failed */
};

/* ---------------------------------------------------------------- tensor types (ggml/GGUF ids) */
enum fl_type {
    FL_TYPE_F32 = 0,
    FL_TYPE_F16 = 1,
    FL_TYPE_Q4_0 = 2,
    FL_TYPE_Q4_1 = 3,
    FL_TYPE_Q5_0 = 6,
    FL_TYPE_Q5_1 = 7,
    FL_TYPE_Q8_0 = 8,
    FL_TYPE_Q8_1 = 9,
    FL_TYPE_Q2_K = 10,
    FL_TYPE_Q3_K = 11,
    FL_TYPE_Q4_K = 12,
    FL_TYPE_Q5_K = 13,
    FL_TYPE_Q6_K = 14,
    FL_TYPE_Q8_K = 15,
    FL_TYPE_IQ2_XXS = 16,
    FL_TYPE_IQ2_XS = 17,
    FL_TYPE_IQ3_XXS = 18,
    FL_TYPE_IQ1_S = 19,
    FL_TYPE_IQ4_NL = 20,
    FL_TYPE_IQ3_S = 21,
    FL_TYPE_IQ2_S = 22,
    FL_TYPE_IQ4_XS = 23,
    FL_TYPE_I8 = 24,
    FL_TYPE_I16 = 25,
    FL_TYPE_I32 = 26,
    FL_TYPE_I64 = 27,
    FL_TYPE_F64 = 28,
    FL_TYPE_IQ1_M = 29,
    FL_TYPE_BF16 = 30,
    FL_TYPE_TQ1_0 = 34,
    FL_TYPE_TQ2_0 = 35,
    FL_TYPE_MXFP4 = 39,
    FL_TYPE_NVFP4 = 40,
    FL_TYPE_Q1_0 = 41,
    FL_TYPE_Q2_0 = 42
};
/* One past the largest type id the core may know (ggml's GGML_TYPE_COUNT of the llama.cpp it follows). */
enum { FL_TYPE_COUNT = 43 };

/* Elements per block and bytes per block of a type; 0 for a type the core does not know. The integer and F64
 * types are known for their sizes only (a GGUF may store them: tid2eid is I32); they have no conversions. */
int64_t fl_type_block_elems(int type);
/* ggml's name of a type ("q4_K", "iq2_xxs", "i32"), or NULL for a type the core does not know. */
const char *fl_type_name(int type);
/* What the core can do with a type: FL_CAN_* bits, 0 for an unknown type. */
enum {
    FL_CAN_DEQUANTIZE = 1, /* fl_dequantize */
    FL_CAN_QUANTIZE = 2,   /* fl_quantize, fl_quantize_rows */
    FL_CAN_MATMUL = 4      /* a weight type of fl_matmul (and of fl_vec_dot_ref) */
};
int fl_type_flags(int type);
/* llama.cpp's check of tensor data (ggml_validate_row_data, --check-tensors): the index of the first of n_blocks
 * blocks (elements, for the float types) of `type` at data whose values or scales are Inf or NaN, or n_blocks
 * when there is none; FL_ETYPE for a type the core does not know, FL_EINVAL for n_blocks < 0 or no data. Types
 * without such fields (NVFP4, the integers) pass. */
int64_t fl_find_nonfinite(int type, const void *data, int64_t n_blocks);
int64_t fl_type_block_bytes(int type);
/* Bytes of one row of n elements (n must be a multiple of the block size), or -1. */
int64_t fl_row_bytes(int type, int64_t n);

/* n elements, n a multiple of the block size. quantize uses the reference (ggml *_ref) algorithm. */
int fl_dequantize(int type, const void *src, float *dst, int64_t n);
int fl_quantize(int type, const float *src, void *dst, int64_t n);
/* n_rows rows of n_per_row elements, as llama.cpp's quantizer writes them (ggml_quantize_chunk): with importance
 * (n_per_row weights, an importance matrix's row for this tensor) the search of each type weighs its error by it,
 * as ggml's quantize_<type> does; importance NULL is fl_quantize row by row, except for IQ4_NL (ggml runs its full
 * search with error weights x^2 here, where its reference quantizer keeps the first scale it finds) and for the
 * types whose search ggml only runs with weights (IQ2_XXS, IQ2_XS, IQ1_S: ggml_quantize_requires_imatrix), which
 * then weigh every element alike. Types without a search (F32, F16, BF16, Q8_0, MXFP4, ...) ignore importance,
 * as ggml does. */
int fl_quantize_rows(int type, const float *src, void *dst, int64_t n_rows, int64_t n_per_row,
                     const float *importance);

/* ---------------------------------------------------------------- CPU features and kernel level */
enum fl_simd {
    FL_SIMD_SCALAR = 0,
    FL_SIMD_AVX2 = 1,
    FL_SIMD_AVX512 = 2,
    FL_SIMD_NEON = 3
};
/* The best level this CPU supports, and the level in use (FLASHLITE_SIMD=scalar|avx2|avx512|neon forces it). */
int fl_simd_best(void);
int fl_simd_level(void);
/* Select a level; FL_EINVAL when the CPU lacks it. */
int fl_simd_set(int level);
/* 1 when the AVX-512 path uses VNNI instructions on this CPU. */
int fl_simd_has_vnni(void);
/* 1 when the AVX-512 prefill kernels of Q4_K, Q5_K and Q6_K run on AMX-INT8 tiles: the CPU has them, Linux granted
 * the tile data (once, at the first call) and fl_amx_set did not turn them off. Results are the same bits either way. */
int fl_simd_has_amx(void);
/* Turn the AMX kernels on (1) or off (0); FL_EINVAL to turn them on where the CPU or the OS lacks them. */
int fl_amx_set(int on);

/* ---------------------------------------------------------------- threads */
/* The persistent pool of the core; n <= 0 means fl_threads_default(). */
int fl_threads_set(int n);
int fl_threads_get(void);
/* One thread per physical performance core this process may run on, one fewer from 8 up (room for the caller). */
int fl_threads_default(void);

/* ---------------------------------------------------------------- matmul */
/* Y[t, r] = sum_k W[r, k] * X[t, k] for t < n_tok, r < rows.
 * W: rows x k elements of type wtype, row-major, each row fl_row_bytes(wtype, k) bytes.
 * X: n_tok x k float32, row-major; Y: n_tok x rows float32, row-major.
 * Quantized weights meet activations quantized on the fly (Q8_0, Q8_1 or Q8_K, as ggml pairs them; float weights
 * meet f32 activations), in the same arithmetic for any n_tok: each token's row of Y is bitwise what a call with
 * that token alone gives. */
int fl_matmul(int wtype, const void *w, int64_t rows, int64_t k, const float *x, int64_t n_tok, float *y);

/* One product of a batch: y = x W^T as fl_matmul computes it. */
struct fl_matmul_item {
    int wtype;
    const void *w;
    int64_t rows, k;
    const float *x;
    int64_t n_tok;
    float *y;
};
/* Each item as fl_matmul computes it (bitwise the same y), with every decode-sized item in one parallel run that
 * quantizes an activation shared by several items once: many small matrices then stream like one large one. */
int fl_matmul_batch(int64_t n, const struct fl_matmul_item *items);

/* ---------------------------------------------------------------- block formats: reference dots */
/* The type activations are converted to before a dot with weights of this type (F32, Q8_0, Q8_1 or Q8_K), or -1. */
int fl_type_act_type(int type);
/* *s = the plain-C reference dot of one weight row vx (n elements of type) and one activation row vy already
 * in fl_type_act_type(type): what every SIMD kernel must reproduce. FL_ETYPE for a type without a dot. */
int fl_vec_dot_ref(int type, const void *vx, const void *vy, int64_t n, float *s);

/* ---------------------------------------------------------------- DeepSeek V4 forward (attention.c, moe.c) */
/* out[t, h] = sum_i softmax_i([q[t,h].row_i * scale]_i ++ [sinks[h]])_i * row_i, over the rows each query t sees:
 * win rows [win_range[2t], win_range[2t+1]) and the cmp rows listed in cmp_idx[t, :k_cmp] (-1 = none).
 * q, out: [n_tok, n_head, head_dim]; win: [n_win, head_dim]; cmp: [n_cmp, head_dim]; all float32. out may be q
 * (each query's output then replaces it). */
int fl_attn_sink(int64_t n_tok, int64_t n_head, int64_t head_dim, const float *q,
                 const float *win, int64_t n_win, const int32_t *win_range,
                 const float *cmp, int64_t n_cmp, const int32_t *cmp_idx, int64_t k_cmp,
                 const float *sinks, float scale, float *out);
/* fl_attn_sink with out laid out by the n_group groups of consecutive heads that the output projection takes
 * apart: out[g, t, h - g * n_head / n_group] = the above's out[t, h], each group a contiguous [n_tok, n_head /
 * n_group, head_dim] (n_group divides n_head; with n_group > 1 out may not be q). The same bits as fl_attn_sink. */
int fl_attn_sink_grouped(int64_t n_tok, int64_t n_head, int64_t head_dim, const float *q,
                         const float *win, int64_t n_win, const int32_t *win_range,
                         const float *cmp, int64_t n_cmp, const int32_t *cmp_idx, int64_t k_cmp,
                         const float *sinks, float scale, int64_t n_group, float *out);
/* Compressor rows before their norm: out[j, c] = sum_s softmax_s(score[s, c]) * kv[s, c] over the slots of row j.
 * Token logs kv, score: [tokens, width], width = 2d with overlap (ratio 4) and d without. Without overlap row j
 * pools tokens [j*ratio, (j+1)*ratio). With overlap it pools features [0, d) of the window before and [d, 2d) of
 * its own; has_prev says the logs start one window early, else the first row's earlier half is empty. */
int fl_compress_pool(int64_t n_rows, int64_t ratio, int64_t d, int overlap, int has_prev,
                     const float *kv, const float *score, float *out);
/* out[t] += sum_k weights[t, k] * down_e(silu(min(gate_e x, limit)) * clamp(up_e x, +-limit)), e = idx[t, k],
 * over experts in ascending order. Expert e's matrices start at gate_w + e * gate_stride bytes (likewise up,
 * down): gate, up [inter, dim] and down [dim, inter] rows of their types. x, out: [n_tok, dim] float32. */
int fl_moe_experts(int64_t n_tok, int64_t dim, int64_t inter, int64_t n_used, int64_t n_expert,
                   const float *x, const int32_t *idx, const float *weights,
                   int gate_type, const void *gate_w, int64_t gate_stride,
                   int up_type, const void *up_w, int64_t up_stride,
                   int down_type, const void *down_w, int64_t down_stride,
                   float limit, float *out);

/* ---------------------------------------------------------------- per-token layer operations (v4_ops.c) */
/* y[r] = x[r] * rsqrt(mean(x[r]^2) + eps), times weight (dim floats, after the normalisation) unless NULL. */
int fl_rms_norm(int64_t rows, int64_t dim, const float *x, const float *weight, float eps, float *y);
/* RoPE in place: for x [n_tok, n_rows, dim], pairs (2i, 2i+1) of the last rope_dim dims of each row of token t
 * rotated by cos, sin [n_tok, rope_dim / 2] (by -angle when inverse): e * c - o * s, o * c + e * s. */
int fl_rope(int64_t n_tok, int64_t n_rows, int64_t dim, int64_t rope_dim, const float *cos, const float *sin,
            int inverse, float *x);
/* The hyper-connection collapse before a sublayer, for h [n_tok, hc, dim]: mixes = fn(rms_norm(h flattened))
 * (fn: (2 + hc) * hc rows of hc * dim elements of fn_type, or hc rows for the model's final collapse, which passes
 * post = comb = NULL); pre = sigmoid(mix * scale[0] + base) + hc_eps; post = 2 sigmoid(...scale[1]...) [n_tok, hc];
 * comb [n_tok, hc, hc] (comb[a][b] from stream a to b) the Sinkhorn projection of mix * scale[2] + base;
 * x [n_tok, dim] = sum over streams a of pre[a] * h[a]. */
int fl_hc_pre(int64_t n_tok, int64_t hc, int64_t dim, const float *h, int fn_type, const void *fn_w,
              const float *base, const float *scale, int sinkhorn_iters, float hc_eps, float norm_eps, float *x,
              float *post, float *comb);
/* The expansion after it: h[t, b] = sum over a of comb[t, a, b] * residual[t, a] + post[t, b] * out[t]. */
int fl_hc_post(int64_t n_tok, int64_t hc, int64_t dim, const float *out, const float *residual, const float *post,
               const float *comb, float *h);

/* ---------------------------------------------------------------- routed experts read from disk (expert_cache.c) */
/* The experts of every MoE layer stay in the GGUF file; a cache of fixed-size slots, split evenly between the
 * layers, holds the ones in use. A read is one aligned pread per matrix, O_DIRECT where the file system allows
 * (else buffered, with the pages dropped after the read), done by background I/O threads: demand reads first,
 * prefetches after them. */
typedef struct fl_expert_cache fl_expert_cache;

enum fl_expert_policy {
    FL_EXPERT_LRU = 0,  /* evict the slot of the layer used longest ago */
    FL_EXPERT_LFU = 1   /* evict the slot of the layer whose expert was demanded least often (then LRU) */
};

/* Where one layer's stacked expert matrices lie: expert e of matrix m starts at offset[m] + e * bytes[m] of
 * file file[m] (an index into the paths given to open: a split model has several); m = 0 gate, 1 up, 2 down;
 * type[m] is its fl_type. */
struct fl_expert_layer {
    int64_t offset[3];
    int64_t bytes[3];
    int type[3];
    int file[3];
};

struct fl_expert_stats {
    int64_t hits;              /* demanded experts found in a slot (or already being read by a prefetch) */
    int64_t misses;            /* demanded experts that had to be read */
    int64_t bytes_read;        /* bytes read from the file, alignment padding included */
    int64_t prefetches;        /* prefetch reads done */
    int64_t prefetch_hits;     /* prefetched experts later demanded before their eviction */
    int64_t prefetch_dropped;  /* prefetches skipped: no evictable slot, or their layer was demanded first */
    double io_seconds;         /* time the I/O threads spent reading */
    double stall_seconds;      /* time the computing thread waited for a read */
    int64_t slots;             /* slots in the cache */
    int64_t slot_bytes;        /* bytes of one slot */
    int direct_io;             /* 1 when reads bypass the page cache with O_DIRECT */
    int64_t populated_bytes;   /* slot bytes faulted in ahead of their first read (a background thread) */
};

/* Open the n_files files `paths` for n_layer MoE layers of n_expert experts each, with budget_bytes of slots
 * (at least one slot per layer, else FL_EINVAL) and io_threads background readers (>= 1); direct_io 0 reads
 * through the page cache (dropping what it read) even where O_DIRECT works. */
int fl_expert_cache_open(const char *const *paths, int n_files, int n_layer, int n_expert,
                         const struct fl_expert_layer *layers, int64_t budget_bytes, int policy, int io_threads,
                         int direct_io, fl_expert_cache **out);
void fl_expert_cache_close(fl_expert_cache *c);
/* Bytes of one slot for these layers (the size a budget is counted in). */
int64_t fl_expert_cache_slot_bytes(int n_layer, const struct fl_expert_layer *layers);
/* Read the experts now and keep them for good; a layer keeps at least one slot unpinned (else FL_EINVAL). */
int fl_expert_cache_pin(fl_expert_cache *c, int layer, const int32_t *experts, int n);
/* Queue background reads of experts the layer is expected to need; returns at once. */
int fl_expert_cache_prefetch(fl_expert_cache *c, int layer, const int32_t *experts, int n);
int fl_expert_cache_stats(const fl_expert_cache *c, struct fl_expert_stats *out);
void fl_expert_cache_reset_stats(fl_expert_cache *c);
/* counts[layer * n_expert + e] = how often expert e of the layer was demanded since open. */
int fl_expert_cache_usage(const fl_expert_cache *c, int64_t *counts);
/* fl_moe_experts for MoE layer `layer` with its experts taken from the cache: the resident experts are computed
 * while the missing ones are read; the sum into out keeps ascending expert order, so out is bitwise the same as
 * fl_moe_experts over the memory-mapped file. */
int fl_moe_experts_cached(fl_expert_cache *c, int layer, int64_t n_tok, int64_t dim, int64_t inter, int64_t n_used,
                          const float *x, const int32_t *idx, const float *weights, float limit, float *out);
/* Bytes of [offset, offset + len) of the file now in the page cache (mincore), or -1. */
int64_t fl_file_cached_bytes(const char *path, int64_t offset, int64_t len);

/* ---------------------------------------------------------------- MoE routing and the fused decode step (v4_step.c) */
/* DeepSeek V4's router on the gate's logits [n_tok, n_expert]: scores sqrt(softplus(logit)); idx [n_tok, n_used]
 * the token's row of tid2eid ([vocab, n_used], hash-routed layers: bias NULL) or else the n_used largest
 * scores + bias (the bias only selects; best first, ties to the lower id); weights [n_tok, n_used] the picked
 * scores over their sum + 1e-20, times route_scale. FL_EINVAL for a token id outside 0..vocab-1 or a table entry
 * outside 0..n_expert-1. */
int fl_moe_route(int64_t n_tok, int64_t n_expert, int64_t n_used, const float *logits, const float *bias,
                 const int32_t *tid2eid, int64_t vocab, const int64_t *token_ids, float route_scale, float *weights,
                 int32_t *idx);
/* A layer's MoE sublayer with its hyper-connection, planned once at load: what fl_v4_ffn reads. */
struct fl_v4_ffn {
    int64_t dim, hc, inter, shared_inter, n_expert, n_used, vocab;
    int sinkhorn_iters;
    float hc_eps, norm_eps;
    int hc_fn_type;
    const void *hc_fn;             /* [(2 + hc) * hc, hc * dim] */
    const float *hc_base, *hc_scale;
    const float *norm;             /* ffn_norm [dim] */
    int gate_type;
    const void *gate_w;            /* the router [n_expert, dim] */
    const float *bias;             /* exp_probs_b [n_expert], NULL on hash-routed layers */
    const int32_t *tid2eid;        /* [vocab, n_used] on hash-routed layers, else NULL */
    float route_scale, limit, shared_limit;
    int exp_type[3];               /* routed experts gate, up, down: expert e at exp_w[m] + e * exp_stride[m] */
    const void *exp_w[3];
    int64_t exp_stride[3];
    fl_expert_cache *cache;        /* when set, the routed experts come from this cache (layer cache_layer) */
    int cache_layer;
    int shared_type[3];
    const void *shared_w[3];
};
/* h_out [n_tok, hc, dim] = h + the MoE sublayer of h (the token ids route hash layers): fl_hc_pre, fl_rms_norm
 * with the ffn norm, the router's fl_matmul, fl_moe_route, the routed experts (fl_moe_experts or, with a cache,
 * fl_moe_experts_cached), the shared expert, fl_hc_post: the calls of the Python definition, their sums in its
 * order (the shared expert's gate and up products run with the router's, which changes no bit). */
int fl_v4_ffn(const struct fl_v4_ffn *p, int64_t n_tok, const float *h, const int64_t *token_ids, float *h_out);

/* The Walsh-Hadamard rotation of each of n_rows rows of dim (a power of two) floats, natural (Sylvester) order,
 * scaled by dim^-1/2 so that it is orthogonal; y may be x. The reference rotates FP4 indexer rows with it. */
int fl_hadamard(int64_t n_rows, int64_t dim, const float *x, float *y);
/* The lightning indexer's picks: for each query t (q [n_tok, n_heads, head_dim], head_weights [n_tok, n_heads])
 * and each of the first visible[t] of the n_keys rows keys [n_keys, head_dim], the score
 * sum_h relu(q[t, h] . key) * scale * head_weights[t, h]; picks [n_tok, topk] the best rows, best first, ties to
 * the lower row, -1 past the visible ones. */
int fl_indexer_topk(int64_t n_tok, int64_t n_heads, int64_t head_dim, const float *q, const float *head_weights,
                    const float *keys, int64_t n_keys, const int32_t *visible, int64_t topk, float scale,
                    int32_t *picks);
/* A weight matrix of a plan: its fl_type and data. */
struct fl_v4_weight {
    int type;
    const void *w;
};
/* A log of stored rows of positions [start, end) (flashlite/kv_cache.py's RowLog): buf holds the row of
 * position start, with room up to position start + cap; a step appends at end and moves it. */
struct fl_row_log {
    uint8_t *buf;
    int64_t start, end, cap;
};
/* A compressor of the attention (or of its indexer): rows of head_dim, ratio from the layer; row_kind the
 * fl_kv_kind its pooled rows are stored in (0: float32) with row_rope_dim bf16 dims; rotated: a Hadamard
 * rotation before they are stored. ape [ratio, width], width 2 * head_dim with overlap, else head_dim. */
struct fl_v4_compressor {
    int64_t head_dim, row_rope_dim;
    int overlap, rotated, row_kind;
    struct fl_v4_weight wkv, wgate;
    const float *ape, *norm;
};
/* A layer's attention sublayer with its hyper-connection, planned once at load: what fl_v4_attn reads. */
struct fl_v4_attn {
    int64_t dim, hc, n_heads, head_dim, rope_dim, q_rank, o_groups, o_rank, window, ratio;
    int64_t index_heads, index_dim, index_topk;
    int sinkhorn_iters;
    float hc_eps, norm_eps;
    int hc_fn_type;
    const void *hc_fn;
    const float *hc_base, *hc_scale, *attn_norm, *q_norm, *kv_norm, *sinks;
    struct fl_v4_weight wq_a, wq_b, wkv, wo_a, wo_b, iq_b, iproj;
    float attn_scale, index_score_scale, index_weight_scale;
    int kv_kind;                   /* how window and compressed rows are stored: 0 float32, else an fl_kv_kind */
    struct fl_v4_compressor comp;  /* ratio 4 and 128 */
    struct fl_v4_compressor icomp; /* the indexer's, ratio 4 */
};
/* The logs of a layer: window rows; compressor kv, score and rows; the indexer's. */
struct fl_v4_attn_cache {
    struct fl_row_log kv, ckv, cscore, crows, ikv, iscore, irows;
};
/* h_out [n_tok, hc, dim] = h + the attention sublayer of the n_tok tokens at positions pos.., each seeing the
 * rows of the ones before it (causal), with the rows they store appended to the logs: cs_tok [n_tok, rope_dim]
 * the cos then sin [rope_dim / 2 each] of the layer's RoPE at each token's position; cs_row [n_tok, rope_dim] the
 * same at pos + t + 1 - ratio, read for the tokens t at which a compressor window closes (NULL when none does).
 * The C operations of the Python definition, in its order: bitwise its result, and bitwise n_tok one-token calls.
 * FL_EINVAL when a log lacks room or rows a step reads. */
int fl_v4_attn(const struct fl_v4_attn *p, struct fl_v4_attn_cache *cache, int64_t pos, int64_t n_tok,
               const float *cs_tok, const float *cs_row, const float *h, float *h_out);
/* Whole decode layers for the n_tok tokens `tokens` at positions pos..: fl_v4_attn, then fl_v4_ffn on its result
 * (a decode step, or the batch that verifies a draft). */
int fl_v4_layer(const struct fl_v4_attn *attn, struct fl_v4_attn_cache *cache, const struct fl_v4_ffn *ffn,
                int64_t pos, int64_t n_tok, const int64_t *tokens, const float *cs_tok, const float *cs_row,
                const float *h, float *h_out);
/* A layer of a whole step: its plans, its logs, and which of the step's RoPE tables it reads (layers of one RoPE
 * and compress ratio share them). */
struct fl_v4_step_layer {
    const struct fl_v4_attn *attn;
    const struct fl_v4_ffn *ffn;
    struct fl_v4_attn_cache *cache;
    int table;
};
/* The layers whose logs lack room for n_tok more rows each (the caller grows them, then steps): short[i] = 1 for
 * such a layer i, else 0; returns how many. FL_EINVAL for bad arguments. */
int64_t fl_v4_step_short(int64_t n_layers, const struct fl_v4_step_layer *layers, int64_t n_tok, int8_t *short_of);
/* A whole decode step (or a verified draft's batch): fl_v4_layer for each of the n_layers layers in turn, from
 * h [n_tok, hc, dim] to h_out, with no caller code in between. Layer i reads cs_tok[layers[i].table] and
 * cs_row[layers[i].table] (each as fl_v4_attn's; cs_row may be NULL or hold NULLs). Bitwise the layer calls. */
int fl_v4_step(int64_t n_layers, const struct fl_v4_step_layer *layers, int64_t pos, int64_t n_tok,
               const int64_t *tokens, const float *const *cs_tok, const float *const *cs_row, const float *h,
               float *h_out);

/* ---------------------------------------------------------------- KV cache rows (kv_pack.c) */
enum fl_kv_kind {
    FL_KV_FP8 = 1,  /* bf16 last rope_dim dims, then e4m3 first dims with a ue8m0 scale per 64 */
    FL_KV_FP4 = 2   /* e2m1 with an e8m0 scale per 32; rope_dim must be 0 */
};
/* Bytes of one packed row of dim floats, or -1 when dim, rope_dim do not fit the kind's blocks. */
int64_t fl_kv_row_bytes(int kind, int64_t dim, int64_t rope_dim);
/* Round n_rows float32 rows [n_rows, dim] onto the kind's grid (the reference's scales, nearest even) and pack. */
int fl_kv_pack(int kind, int64_t n_rows, int64_t dim, int64_t rope_dim, const float *src, uint8_t *dst);
/* dst[r] = packed row idx[r] (r when idx is NULL) of the n_src rows at src, as float32 [n_rows, dim];
 * FL_EINVAL for an index outside 0..n_src-1. */
int fl_kv_unpack(int kind, int64_t n_rows, int64_t dim, int64_t rope_dim, const uint8_t *src, int64_t n_src,
                 const int32_t *idx, float *dst);

#endif

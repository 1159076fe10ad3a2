/* types.c: the traits table of every tensor type the core knows, indexed by its ggml/GGUF id, and the public
 * block-format entry points, which validate their arguments before touching memory. */
#include "kernels.h"
#include "quant_generic.h"

/* One entry per type: .quantize is the search with importance weights (NULL where the type has none and the
 * row quantizer serves); .vec_dot_generic is NULL for activation-only types. */
static const struct fl_type_traits traits[FL_TYPE_COUNT] = {
    [FL_TYPE_F32] = {.name = "f32", .blck = 1, .bytes = 4,
                     .to_float = fl_dequantize_row_f32, .from_float = fl_quantize_row_f32_ref,
                     .act_type = FL_TYPE_F32, .vec_dot_generic = fl_vec_dot_f32_f32_generic},
    [FL_TYPE_F16] = {.name = "f16", .blck = 1, .bytes = 2,
                     .to_float = fl_dequantize_row_f16, .from_float = fl_quantize_row_f16_ref,
                     .act_type = FL_TYPE_F32, .vec_dot_generic = fl_vec_dot_f16_f32_generic},
    [FL_TYPE_BF16] = {.name = "bf16", .blck = 1, .bytes = 2,
                     .to_float = fl_dequantize_row_bf16, .from_float = fl_quantize_row_bf16_ref,
                     .act_type = FL_TYPE_F32, .vec_dot_generic = fl_vec_dot_bf16_f32_generic},
    [FL_TYPE_Q4_0] = {.name = "q4_0", .blck = QK4_0, .bytes = sizeof(block_q4_0),
                     .to_float = fl_dequantize_row_q4_0, .from_float = fl_quantize_row_q4_0_ref,
                     .quantize = fl_quantize_q4_0,
                     .act_type = FL_TYPE_Q8_0, .vec_dot_generic = fl_vec_dot_q4_0_q8_0_generic},
    [FL_TYPE_Q4_1] = {.name = "q4_1", .blck = QK4_1, .bytes = sizeof(block_q4_1),
                     .to_float = fl_dequantize_row_q4_1, .from_float = fl_quantize_row_q4_1_ref,
                     .quantize = fl_quantize_q4_1,
                     .act_type = FL_TYPE_Q8_1, .vec_dot_generic = fl_vec_dot_q4_1_q8_1_generic},
    [FL_TYPE_Q5_0] = {.name = "q5_0", .blck = QK5_0, .bytes = sizeof(block_q5_0),
                     .to_float = fl_dequantize_row_q5_0, .from_float = fl_quantize_row_q5_0_ref,
                     .quantize = fl_quantize_q5_0,
                     .act_type = FL_TYPE_Q8_0, .vec_dot_generic = fl_vec_dot_q5_0_q8_0_generic},
    [FL_TYPE_Q5_1] = {.name = "q5_1", .blck = QK5_1, .bytes = sizeof(block_q5_1),
                     .to_float = fl_dequantize_row_q5_1, .from_float = fl_quantize_row_q5_1_ref,
                     .quantize = fl_quantize_q5_1,
                     .act_type = FL_TYPE_Q8_1, .vec_dot_generic = fl_vec_dot_q5_1_q8_1_generic},
    [FL_TYPE_Q8_0] = {.name = "q8_0", .blck = QK8_0, .bytes = sizeof(block_q8_0),
                     .to_float = fl_dequantize_row_q8_0, .from_float = fl_quantize_row_q8_0_ref,
                     .act_type = FL_TYPE_Q8_0, .vec_dot_generic = fl_vec_dot_q8_0_q8_0_generic},
    [FL_TYPE_Q8_1] = {.name = "q8_1", .blck = QK8_1, .bytes = sizeof(block_q8_1),
                     .to_float = fl_dequantize_row_q8_1, .from_float = fl_quantize_row_q8_1_ref,
                     .act_type = FL_TYPE_Q8_1, .vec_dot_generic = NULL},
    [FL_TYPE_MXFP4] = {.name = "mxfp4", .blck = QK_MXFP4, .bytes = sizeof(block_mxfp4),
                     .to_float = fl_dequantize_row_mxfp4, .from_float = fl_quantize_row_mxfp4_ref,
                     .act_type = FL_TYPE_Q8_0, .vec_dot_generic = fl_vec_dot_mxfp4_q8_0_generic},
    [FL_TYPE_NVFP4] = {.name = "nvfp4", .blck = QK_NVFP4, .bytes = sizeof(block_nvfp4),
                     .to_float = fl_dequantize_row_nvfp4, .from_float = fl_quantize_row_nvfp4_ref,
                     .act_type = FL_TYPE_Q8_0, .vec_dot_generic = fl_vec_dot_nvfp4_q8_0_generic},
    [FL_TYPE_Q1_0] = {.name = "q1_0", .blck = QK1_0, .bytes = sizeof(block_q1_0),
                     .to_float = fl_dequantize_row_q1_0, .from_float = fl_quantize_row_q1_0_ref,
                     .act_type = FL_TYPE_Q8_0, .vec_dot_generic = fl_vec_dot_q1_0_q8_0_generic},
    [FL_TYPE_Q2_0] = {.name = "q2_0", .blck = QK2_0, .bytes = sizeof(block_q2_0),
                     .to_float = fl_dequantize_row_q2_0, .from_float = fl_quantize_row_q2_0_ref,
                     .act_type = FL_TYPE_Q8_0, .vec_dot_generic = fl_vec_dot_q2_0_q8_0_generic},
    [FL_TYPE_TQ1_0] = {.name = "tq1_0", .blck = QK_K, .bytes = sizeof(block_tq1_0),
                     .to_float = fl_dequantize_row_tq1_0, .from_float = fl_quantize_row_tq1_0_ref,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_tq1_0_q8_K_generic},
    [FL_TYPE_TQ2_0] = {.name = "tq2_0", .blck = QK_K, .bytes = sizeof(block_tq2_0),
                     .to_float = fl_dequantize_row_tq2_0, .from_float = fl_quantize_row_tq2_0_ref,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_tq2_0_q8_K_generic},
    [FL_TYPE_Q2_K] = {.name = "q2_K", .blck = QK_K, .bytes = sizeof(block_q2_K),
                     .to_float = fl_dequantize_row_q2_K, .from_float = fl_quantize_row_q2_K_ref,
                     .quantize = fl_quantize_q2_K,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_q2_K_q8_K_generic},
    [FL_TYPE_Q3_K] = {.name = "q3_K", .blck = QK_K, .bytes = sizeof(block_q3_K),
                     .to_float = fl_dequantize_row_q3_K, .from_float = fl_quantize_row_q3_K_ref,
                     .quantize = fl_quantize_q3_K,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_q3_K_q8_K_generic},
    [FL_TYPE_Q4_K] = {.name = "q4_K", .blck = QK_K, .bytes = sizeof(block_q4_K),
                     .to_float = fl_dequantize_row_q4_K, .from_float = fl_quantize_row_q4_K_ref,
                     .quantize = fl_quantize_q4_K,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_q4_K_q8_K_generic},
    [FL_TYPE_Q5_K] = {.name = "q5_K", .blck = QK_K, .bytes = sizeof(block_q5_K),
                     .to_float = fl_dequantize_row_q5_K, .from_float = fl_quantize_row_q5_K_ref,
                     .quantize = fl_quantize_q5_K,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_q5_K_q8_K_generic},
    [FL_TYPE_Q6_K] = {.name = "q6_K", .blck = QK_K, .bytes = sizeof(block_q6_K),
                     .to_float = fl_dequantize_row_q6_K, .from_float = fl_quantize_row_q6_K_ref,
                     .quantize = fl_quantize_q6_K,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_q6_K_q8_K_generic},
    [FL_TYPE_Q8_K] = {.name = "q8_K", .blck = QK_K, .bytes = sizeof(block_q8_K),
                     .to_float = fl_dequantize_row_q8_K, .from_float = fl_quantize_row_q8_K_ref,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = NULL},
    [FL_TYPE_IQ2_XXS] = {.name = "iq2_xxs", .blck = QK_K, .bytes = sizeof(block_iq2_xxs),
                     .to_float = fl_dequantize_row_iq2_xxs, .from_float = fl_quantize_row_iq2_xxs_ref,
                     .quantize = fl_quantize_iq2_xxs,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_iq2_xxs_q8_K_generic},
    [FL_TYPE_IQ2_XS] = {.name = "iq2_xs", .blck = QK_K, .bytes = sizeof(block_iq2_xs),
                     .to_float = fl_dequantize_row_iq2_xs, .from_float = fl_quantize_row_iq2_xs_ref,
                     .quantize = fl_quantize_iq2_xs,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_iq2_xs_q8_K_generic},
    [FL_TYPE_IQ3_XXS] = {.name = "iq3_xxs", .blck = QK_K, .bytes = sizeof(block_iq3_xxs),
                     .to_float = fl_dequantize_row_iq3_xxs, .from_float = fl_quantize_row_iq3_xxs_ref,
                     .quantize = fl_quantize_iq3_xxs,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_iq3_xxs_q8_K_generic},
    [FL_TYPE_IQ1_S] = {.name = "iq1_s", .blck = QK_K, .bytes = sizeof(block_iq1_s),
                     .to_float = fl_dequantize_row_iq1_s, .from_float = fl_quantize_row_iq1_s_ref,
                     .quantize = fl_quantize_iq1_s,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_iq1_s_q8_K_generic},
    [FL_TYPE_IQ4_NL] = {.name = "iq4_nl", .blck = QK4_NL, .bytes = sizeof(block_iq4_nl),
                     .to_float = fl_dequantize_row_iq4_nl, .from_float = fl_quantize_row_iq4_nl_ref,
                     .quantize = fl_quantize_iq4_nl,
                     .act_type = FL_TYPE_Q8_0, .vec_dot_generic = fl_vec_dot_iq4_nl_q8_0_generic},
    [FL_TYPE_IQ3_S] = {.name = "iq3_s", .blck = QK_K, .bytes = sizeof(block_iq3_s),
                     .to_float = fl_dequantize_row_iq3_s, .from_float = fl_quantize_row_iq3_s_ref,
                     .quantize = fl_quantize_iq3_s,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_iq3_s_q8_K_generic},
    [FL_TYPE_IQ2_S] = {.name = "iq2_s", .blck = QK_K, .bytes = sizeof(block_iq2_s),
                     .to_float = fl_dequantize_row_iq2_s, .from_float = fl_quantize_row_iq2_s_ref,
                     .quantize = fl_quantize_iq2_s,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_iq2_s_q8_K_generic},
    [FL_TYPE_IQ4_XS] = {.name = "iq4_xs", .blck = QK_K, .bytes = sizeof(block_iq4_xs),
                     .to_float = fl_dequantize_row_iq4_xs, .from_float = fl_quantize_row_iq4_xs_ref,
                     .quantize = fl_quantize_iq4_xs,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_iq4_xs_q8_K_generic},
    [FL_TYPE_IQ1_M] = {.name = "iq1_m", .blck = QK_K, .bytes = sizeof(block_iq1_m),
                     .to_float = fl_dequantize_row_iq1_m, .from_float = fl_quantize_row_iq1_m_ref,
                     .quantize = fl_quantize_iq1_m,
                     .act_type = FL_TYPE_Q8_K, .vec_dot_generic = fl_vec_dot_iq1_m_q8_K_generic},
    /* storage only: sizes for reading a file, no conversions */
    [FL_TYPE_I8] = {.name = "i8", .blck = 1, .bytes = 1, .act_type = -1},
    [FL_TYPE_I16] = {.name = "i16", .blck = 1, .bytes = 2, .act_type = -1},
    [FL_TYPE_I32] = {.name = "i32", .blck = 1, .bytes = 4, .act_type = -1},
    [FL_TYPE_I64] = {.name = "i64", .blck = 1, .bytes = 8, .act_type = -1},
    [FL_TYPE_F64] = {.name = "f64", .blck = 1, .bytes = 8, .act_type = -1},
};

const struct fl_type_traits *fl_traits(int type) {
    if (type < 0 || type >= FL_TYPE_COUNT || !traits[type].name)
        return NULL;
    return &traits[type];
}

int64_t fl_type_block_elems(int type) {
    const struct fl_type_traits *t = fl_traits(type);
    return t ? t->blck : 0;
}

const char *fl_type_name(int type) {
    const struct fl_type_traits *t = fl_traits(type);
    return t ? t->name : NULL;
}

int fl_type_flags(int type) {
    const struct fl_type_traits *t = fl_traits(type);
    if (!t)
        return 0;
    return (t->to_float ? FL_CAN_DEQUANTIZE : 0) | (t->from_float || t->quantize ? FL_CAN_QUANTIZE : 0) |
           (t->to_float && t->vec_dot_generic ? FL_CAN_MATMUL : 0);
}

int64_t fl_type_block_bytes(int type) {
    const struct fl_type_traits *t = fl_traits(type);
    return t ? t->bytes : 0;
}

int64_t fl_row_bytes(int type, int64_t n) {
    const struct fl_type_traits *t = fl_traits(type);
    if (!t || n < 0 || n % t->blck)
        return -1;
    return n / t->blck * t->bytes;
}

/* FL_ETYPE for an unknown type, FL_EINVAL for a count that is negative, not whole blocks, or missing buffers */
static int check_args(const struct fl_type_traits *t, const void *src, const void *dst, int64_t n) {
    if (!t)
        return FL_ETYPE;
    if (n < 0 || n % t->blck || (n > 0 && (!src || !dst)))
        return FL_EINVAL;
    return FL_OK;
}

int fl_dequantize(int type, const void *src, float *dst, int64_t n) {
    const struct fl_type_traits *t = fl_traits(type);
    int status = check_args(t, src, dst, n);
    if (status != FL_OK)
        return status;
    if (!t->to_float)
        return FL_ETYPE;
    if (n > 0)
        t->to_float(src, dst, n);
    return FL_OK;
}

int fl_quantize(int type, const float *src, void *dst, int64_t n) {
    const struct fl_type_traits *t = fl_traits(type);
    int status = check_args(t, src, dst, n);
    if (status != FL_OK)
        return status;
    if (!t->from_float)
        return FL_ETYPE;
    if (n > 0)
        t->from_float(src, dst, n);
    return FL_OK;
}

int fl_quantize_rows(int type, const float *src, void *dst, int64_t n_rows, int64_t n_per_row,
                     const float *importance) {
    const struct fl_type_traits *t = fl_traits(type);
    if (!t)
        return FL_ETYPE;
    if (n_rows < 0 || n_per_row < 0 || n_per_row % t->blck || (n_rows && n_per_row && (!src || !dst)))
        return FL_EINVAL;
    if (!t->from_float && !t->quantize)
        return FL_ETYPE;
    if (n_rows == 0 || n_per_row == 0)
        return FL_OK;
    if (t->quantize) {
        t->quantize(src, dst, n_rows, n_per_row, importance);
        return FL_OK;
    }
    size_t row = (size_t)(n_per_row / t->blck * t->bytes);
    for (int64_t r = 0; r < n_rows; r++)
        t->from_float(src + r * n_per_row, (uint8_t *)dst + r * row, n_per_row);
    return FL_OK;
}

int fl_type_act_type(int type) {
    const struct fl_type_traits *t = fl_traits(type);
    return t ? t->act_type : -1;
}

int fl_vec_dot_ref(int type, const void *vx, const void *vy, int64_t n, float *s) {
    const struct fl_type_traits *t = fl_traits(type);
    int status = check_args(t, vx, vy, n);
    if (status != FL_OK)
        return status;
    if (!t->vec_dot_generic)
        return FL_ETYPE;
    if (!s)
        return FL_EINVAL;
    if (n == 0)
        *s = 0.0f;
    else
        t->vec_dot_generic(n, s, vx, vy);
    return FL_OK;
}

/* types.c: the traits table of every tensor type the core knows, indexed by its ggml/GGUF id, and the public
 * block-format entry points, which validate their arguments before touching memory. */
#include "kernels.h"
#include "quant_generic.h"

#define FL_TYPE_MAX 40

static const struct fl_type_traits traits[FL_TYPE_MAX] = {
    [FL_TYPE_F32] = {"f32", 1, 4, fl_dequantize_row_f32, fl_quantize_row_f32_ref, FL_TYPE_F32,
                     fl_vec_dot_f32_f32_generic},
    [FL_TYPE_F16] = {"f16", 1, 2, fl_dequantize_row_f16, fl_quantize_row_f16_ref, FL_TYPE_F32,
                     fl_vec_dot_f16_f32_generic},
    [FL_TYPE_BF16] = {"bf16", 1, 2, fl_dequantize_row_bf16, fl_quantize_row_bf16_ref, FL_TYPE_F32,
                      fl_vec_dot_bf16_f32_generic},
    [FL_TYPE_Q8_0] = {"q8_0", QK8_0, sizeof(block_q8_0), fl_dequantize_row_q8_0, fl_quantize_row_q8_0_ref,
                      FL_TYPE_Q8_0, fl_vec_dot_q8_0_q8_0_generic},
    [FL_TYPE_MXFP4] = {"mxfp4", QK_MXFP4, sizeof(block_mxfp4), fl_dequantize_row_mxfp4, fl_quantize_row_mxfp4_ref,
                       FL_TYPE_Q8_0, fl_vec_dot_mxfp4_q8_0_generic},
    [FL_TYPE_Q2_K] = {"q2_K", QK_K, sizeof(block_q2_K), fl_dequantize_row_q2_K, fl_quantize_row_q2_K_ref,
                      FL_TYPE_Q8_K, fl_vec_dot_q2_K_q8_K_generic},
    [FL_TYPE_Q4_K] = {"q4_K", QK_K, sizeof(block_q4_K), fl_dequantize_row_q4_K, fl_quantize_row_q4_K_ref,
                      FL_TYPE_Q8_K, fl_vec_dot_q4_K_q8_K_generic},
    [FL_TYPE_Q5_K] = {"q5_K", QK_K, sizeof(block_q5_K), fl_dequantize_row_q5_K, fl_quantize_row_q5_K_ref,
                      FL_TYPE_Q8_K, fl_vec_dot_q5_K_q8_K_generic},
    [FL_TYPE_Q6_K] = {"q6_K", QK_K, sizeof(block_q6_K), fl_dequantize_row_q6_K, fl_quantize_row_q6_K_ref,
                      FL_TYPE_Q8_K, fl_vec_dot_q6_K_q8_K_generic},
    /* activations only: no dot of their own */
    [FL_TYPE_Q8_K] = {"q8_K", QK_K, sizeof(block_q8_K), fl_dequantize_row_q8_K, fl_quantize_row_q8_K_ref,
                      FL_TYPE_Q8_K, NULL},
    [FL_TYPE_IQ2_XXS] = {"iq2_xxs", QK_K, sizeof(block_iq2_xxs), fl_dequantize_row_iq2_xxs,
                         fl_quantize_row_iq2_xxs_ref, FL_TYPE_Q8_K, fl_vec_dot_iq2_xxs_q8_K_generic},
    [FL_TYPE_IQ4_XS] = {"iq4_xs", QK_K, sizeof(block_iq4_xs), fl_dequantize_row_iq4_xs, fl_quantize_row_iq4_xs_ref,
                        FL_TYPE_Q8_K, fl_vec_dot_iq4_xs_q8_K_generic},
};

const struct fl_type_traits *fl_traits(int type) {
    if (type < 0 || type >= FL_TYPE_MAX || !traits[type].name)
        return NULL;
    return &traits[type];
}

int64_t fl_type_block_elems(int type) {
    const struct fl_type_traits *t = fl_traits(type);
    return t ? t->blck : 0;
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

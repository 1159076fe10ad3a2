/* validate.c: fl_find_nonfinite, llama.cpp's ggml_validate_row_data (its --check-tensors): the values of the float
 * types and the scales of the block types, the only fields through which a block can decode to Inf or NaN. A
 * quantized block's integer fields always decode to finite multiples of its scales. */
#include <math.h>
#include <stddef.h>
#include "kernels.h"
#include "quant_generic.h"

static int half_ok(fl_half h) {
    return (h & 0x7c00) != 0x7c00; /* exponent all ones: Inf or NaN */
}

static int bf16_ok(uint16_t h) {
    return (h & 0x7f80) != 0x7f80;
}

/* the first of n blocks of `bytes` bytes whose fp16 at offset `first` (and at `second` unless negative) is not
 * finite, or n */
static int64_t first_bad_half(const uint8_t *p, int64_t n, size_t bytes, ptrdiff_t first, ptrdiff_t second) {
    for (int64_t i = 0; i < n; i++, p += bytes) {
        fl_half a, b = 0;
        memcpy(&a, p + first, sizeof(a));
        if (second >= 0)
            memcpy(&b, p + second, sizeof(b));
        if (!half_ok(a) || !half_ok(b))
            return i;
    }
    return n;
}

#define D_ONLY(T) first_bad_half(data, n_blocks, sizeof(T), offsetof(T, d), -1)
#define D_AND(T, m) first_bad_half(data, n_blocks, sizeof(T), offsetof(T, d), offsetof(T, m))

int64_t fl_find_nonfinite(int type, const void *data, int64_t n_blocks) {
    if (fl_type_block_elems(type) == 0)
        return FL_ETYPE;
    if (n_blocks < 0 || (n_blocks && !data))
        return FL_EINVAL;
    const uint8_t *bytes = data;
    switch (type) {
    case FL_TYPE_F32:
    case FL_TYPE_F64:
        for (int64_t i = 0; i < n_blocks; i++) {
            double v;
            if (type == FL_TYPE_F32) {
                float f;
                memcpy(&f, bytes + 4 * i, 4);
                v = f;
            } else {
                memcpy(&v, bytes + 8 * i, 8);
            }
            if (!isfinite(v))
                return i;
        }
        return n_blocks;
    case FL_TYPE_F16:
    case FL_TYPE_BF16:
        for (int64_t i = 0; i < n_blocks; i++) {
            uint16_t h;
            memcpy(&h, bytes + 2 * i, 2);
            if (type == FL_TYPE_F16 ? !half_ok(h) : !bf16_ok(h))
                return i;
        }
        return n_blocks;
    case FL_TYPE_Q4_0: return D_ONLY(block_q4_0);
    case FL_TYPE_Q4_1: return D_AND(block_q4_1, m);
    case FL_TYPE_Q5_0: return D_ONLY(block_q5_0);
    case FL_TYPE_Q5_1: return D_AND(block_q5_1, m);
    case FL_TYPE_Q8_0: return D_ONLY(block_q8_0);
    case FL_TYPE_Q8_1: return D_ONLY(block_q8_1); /* s only restates d times the sum of qs */
    case FL_TYPE_Q1_0: return D_ONLY(block_q1_0);
    case FL_TYPE_Q2_0: return D_ONLY(block_q2_0);
    case FL_TYPE_Q2_K: return D_AND(block_q2_K, dmin);
    case FL_TYPE_Q3_K: return D_ONLY(block_q3_K);
    case FL_TYPE_Q4_K: return D_AND(block_q4_K, dmin);
    case FL_TYPE_Q5_K: return D_AND(block_q5_K, dmin);
    case FL_TYPE_Q6_K: return D_ONLY(block_q6_K);
    case FL_TYPE_TQ1_0: return D_ONLY(block_tq1_0);
    case FL_TYPE_TQ2_0: return D_ONLY(block_tq2_0);
    case FL_TYPE_IQ2_XXS: return D_ONLY(block_iq2_xxs);
    case FL_TYPE_IQ2_XS: return D_ONLY(block_iq2_xs);
    case FL_TYPE_IQ2_S: return D_ONLY(block_iq2_s);
    case FL_TYPE_IQ3_XXS: return D_ONLY(block_iq3_xxs);
    case FL_TYPE_IQ3_S: return D_ONLY(block_iq3_s);
    case FL_TYPE_IQ1_S: return D_ONLY(block_iq1_s);
    case FL_TYPE_IQ4_NL: return D_ONLY(block_iq4_nl);
    case FL_TYPE_IQ4_XS: return D_ONLY(block_iq4_xs);
    case FL_TYPE_Q8_K:
        for (int64_t i = 0; i < n_blocks; i++) {
            float d;
            memcpy(&d, bytes + i * sizeof(block_q8_K) + offsetof(block_q8_K, d), sizeof(d));
            if (!isfinite(d))
                return i;
        }
        return n_blocks;
    case FL_TYPE_IQ1_M:
        for (int64_t i = 0; i < n_blocks; i++) {
            uint16_t sc[4];
            memcpy(sc, bytes + i * sizeof(block_iq1_m) + offsetof(block_iq1_m, scales), sizeof(sc));
            if (!half_ok(fl_iq1_m_scale_bits(sc)))
                return i;
        }
        return n_blocks;
    case FL_TYPE_MXFP4: /* e = 0xff is E8M0's NaN */
        for (int64_t i = 0; i < n_blocks; i++)
            if (bytes[i * sizeof(block_mxfp4) + offsetof(block_mxfp4, e)] == 0xff)
                return i;
        return n_blocks;
    default: /* NVFP4 (every UE4M3 byte is a finite scale) and the integer types */
        return n_blocks;
    }
}

/* halfs.c: IEEE binary16 and bfloat16 conversions in portable bit code.
 * Every finite value, subnormal and infinity converts as F16C and numpy do (round to nearest even).
 * A NaN keeps its sign and its top payload bits unquieted, as numpy's float16 casts do, so that F16 tensors
 * round-trip bit for bit against gguf-py; F16C would set the quiet bit instead. */
#include <string.h>
#include "kernels.h"

float fl_fp16_to_fp32(fl_half h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0x1f)
        return fl_bits_float(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0)
            return fl_bits_float(sign);
        /* subnormal: shift the leading one up to the implicit bit, lowering the exponent per step */
        exp = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        return fl_bits_float(sign | (exp << 23) | ((mant & 0x3ff) << 13));
    }
    return fl_bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

fl_half fl_fp32_to_fp16(float f) {
    uint32_t u = fl_float_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) { /* NaN: a payload living only in the dropped bits must not turn it into infinity */
        uint16_t mant = (uint16_t)((u >> 13) & 0x3ff);
        return sign | 0x7c00 | (mant ? mant : 1);
    }
    if (u >= 0x477ff000u) /* 65520 and up round to infinity */
        return sign | 0x7c00;
    if (u >= 0x38800000u) { /* normal half: rebias the exponent, round the 13 dropped bits to even */
        uint32_t r = u + 0xfffu + ((u >> 13) & 1);
        return sign | (uint16_t)((r - 0x38000000u) >> 13);
    }
    if (u <= 0x33000000u) /* at most 2^-25: the tie at 2^-25 goes to the even zero */
        return sign;
    /* subnormal half, in units of 2^-24 */
    uint32_t exp = u >> 23;
    uint32_t mant = (u & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exp;
    uint32_t q = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1)))
        q++;
    return sign | (uint16_t)q;
}

float fl_bf16_to_fp32(uint16_t h) {
    return fl_bits_float((uint32_t)h << 16);
}

uint16_t fl_fp32_to_bf16(float f) {
    uint32_t u = fl_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet, since truncation could empty the payload */
        return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

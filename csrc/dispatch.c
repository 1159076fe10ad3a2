/* dispatch.c: picks the kernels of the SIMD level in use (cpu.c). A level without a kernel for a type
 * falls back to the level below it and finally to the plain-C reference of the type's traits. */
#include "flashlite.h"
#include "kernels.h"
#include "simd.h"

fl_vec_dot_fn fl_vec_dot(int type) {
    const struct fl_type_traits *traits = fl_traits(type);
    if (!traits)
        return NULL;
    fl_vec_dot_fn dot = NULL;
    switch (fl_simd_level()) {
#if defined(__x86_64__)
    case FL_SIMD_AVX512:
        dot = fl_simd_has_vnni() ? fl_dot_avx512_vnni(type) : fl_dot_avx512(type);
        if (dot)
            break;
        /* fall through */
    case FL_SIMD_AVX2:
        dot = fl_dot_avx2(type);
        break;
#elif defined(__aarch64__)
    case FL_SIMD_NEON:
        dot = fl_dot_neon(type);
        break;
#endif
    default:
        break;
    }
    return dot ? dot : traits->vec_dot_generic;
}

fl_vec_dot_tn_fn fl_vec_dot_tn(fl_vec_dot_fn dot) {
    fl_vec_dot_tn_fn tn = NULL;
#if defined(__x86_64__)
    if (!(tn = fl_tokens_avx512_vnni(dot)) && !(tn = fl_tokens_avx512(dot)))
        tn = fl_tokens_avx2(dot);
#else
    (void)dot;
#endif
    return tn;
}

fl_vec_dot4_fn fl_vec_dot4(fl_vec_dot_fn dot) {
    fl_vec_dot4_fn r4 = NULL;
#if defined(__x86_64__)
    if (!(r4 = fl_rows_avx512_vnni(dot)) && !(r4 = fl_rows_avx512(dot)))
        r4 = fl_rows_avx2(dot);
#else
    (void)dot;
#endif
    return r4;
}

const struct fl_decode_kernel *fl_decode_kernel(int type) {
#if defined(__x86_64__)
    /* the AVX-512 level already vouches for the OS saving zmm state; VBMI is one more cpuid bit */
    __builtin_cpu_init();
    if (fl_simd_level() == FL_SIMD_AVX512 && fl_simd_has_vnni() && __builtin_cpu_supports("avx512vbmi")) {
        const struct fl_decode_kernel *dk = fl_decode_avx512_vbmi(type);
        return dk ? dk : fl_decode_avx512_vbmi_iq(type);
    }
#endif
    (void)type;
    return NULL;
}

const struct fl_gemm_kernel *fl_gemm_kernel(int type) {
    const struct fl_decode_kernel *dk = fl_decode_kernel(type);
    const struct fl_gemm_kernel *gemm = dk ? dk->gemm : NULL;
#if defined(__x86_64__)
    /* the AMX kernels replace AVX-512 ones, so they run only where those would */
    const struct fl_gemm_kernel *amx = gemm && fl_simd_has_amx() ? fl_gemm_amx(gemm) : NULL;
    if (amx)
        return amx;
#endif
    return gemm;
}

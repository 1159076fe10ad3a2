/* avx512_vnni.c: the vec_dots of dot_x86.h with vpdpbusd doing the byte products (AVX512-VNNI on ymm). */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl,avx512vnni")
#define FL_X86_VNNI 1
#define FL_X86_TABLE fl_dot_avx512_vnni
#include "dot_x86.h"
#endif

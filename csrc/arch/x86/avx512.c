/* avx512.c: the AVX-512 (F/DQ/BW/VL) kernels for CPUs without VNNI: the vec_dots of dot_x86.h. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl")
#define FL_X86_VNNI 0
#define FL_X86_TABLE fl_dot_avx512
#define FL_X86_TOKENS fl_tokens_avx512
#define FL_X86_ROWS fl_rows_avx512
#include "dot_x86.h"
#endif

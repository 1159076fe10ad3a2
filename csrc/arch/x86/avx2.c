/* avx2.c: the AVX2+FMA+F16C kernels: every vec_dot (dot_x86.h).
 * Compiled for that target here, since the extension itself is built without -march flags. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#define FL_X86_VNNI 0
#define FL_X86_TABLE fl_dot_avx2
#define FL_X86_TOKENS fl_tokens_avx2
#define FL_X86_ROWS fl_rows_avx2
#include "dot_x86.h"
#endif

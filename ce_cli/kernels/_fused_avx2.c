/* The row kernel (_fused_row.h) for AVX2: x86-64-v3, 4 lanes; GCC >= 12 on x86-64, else this
 * translation unit is empty (see _fused.h). */
#include "_fused.h"

#ifdef CE_HAVE_X86_V3_V4
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define CE_W 4
#define CE_SFX avx2
/* GCC 12 converts 4 floats in two 128-bit halves: one vcvtps2pd ymm instead */
#define CE_CVT_PS_PD(f) _mm256_cvtps_pd((__m128)(f))
#define CE_ANY(m) (!_mm256_testz_si256((__m256i)(m), (__m256i)(m)))
#define CE_MAXPD(a, b) _mm256_max_pd((__m256d)(a), (__m256d)(b))
#define CE_ALL_LT2(d, a, b)                                                         \
    (_mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd((__m256d)(d), (__m256d)(a), _CMP_LT_OQ), \
                                      _mm256_cmp_pd((__m256d)(d), (__m256d)(b), _CMP_LT_OQ))) == 15)
#include "_fused_row.h"
#pragma GCC pop_options
#else
typedef int ce_no_avx2;  /* ISO C: a translation unit declares something */
#endif

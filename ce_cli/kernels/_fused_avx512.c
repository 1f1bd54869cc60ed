/* The row kernel (_fused_row.h) for AVX-512: x86-64-v4, 8 lanes; GCC >= 12 on x86-64, else
 * this translation unit is empty (see _fused.h). */
#include "_fused.h"

#ifdef CE_HAVE_X86_V3_V4
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define CE_W 8
#define CE_SFX avx512
/* one vcvtps2pd zmm (see _fused_avx2.c) */
#define CE_CVT_PS_PD(f) _mm512_cvtps_pd((__m256)(f))
#define CE_ANY(m) (_mm512_test_epi64_mask((__m512i)(m), (__m512i)(m)) != 0)
#define CE_MAXPD(a, b) _mm512_max_pd((__m512d)(a), (__m512d)(b))
#define CE_ALL_LT2(d, a, b)                                                              \
    (_mm512_mask_cmp_pd_mask(_mm512_cmp_pd_mask((__m512d)(d), (__m512d)(a), _CMP_LT_OQ), \
                             (__m512d)(d), (__m512d)(b), _CMP_LT_OQ) == 0xff)
#include "_fused_row.h"
#pragma GCC pop_options
#else
typedef int ce_no_avx512;  /* ISO C: a translation unit declares something */
#endif

/* The row kernel (_fused_row.h) for the 2-lane baseline of this CPU family: SSE2 on x86-64, NEON
 * on AArch64 (nothing elsewhere: the scalar target, _fused_scalar.c, runs there). */
#include "_fused.h"

#if defined(CE_HAVE_SSE2)
#define CE_W 2
#define CE_SFX sse2
#include "_fused_row.h"
#elif defined(CE_HAVE_NEON)
#define CE_W 2
#define CE_SFX neon
#include "_fused_row.h"
#else
typedef int ce_no_base;  /* ISO C: a translation unit declares something */
#endif

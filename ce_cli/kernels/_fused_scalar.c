/* The row kernel (_fused_row.h) for one lane: any CPU and C compiler with GNU C vector
 * extensions. */
#include "_fused.h"

#define CE_W 1
#define CE_SFX scalar
#include "_fused_row.h"

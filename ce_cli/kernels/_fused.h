/* What _fused.c (dispatch, threads, exports) and the per-target translation units share: the
 * argument block, the row-function type, the constants of the row kernel and the declarations of
 * each target's entry points. Each target is its own translation unit, compiled in parallel
 * (setup.py) and linked into one shared object:
 *   _fused_avx512.c, _fused_avx2.c   GCC >= 12 on x86-64 (`#pragma GCC target`), else empty
 *   _fused_base.c                    sse2 (x86-64) or neon (AArch64), else empty
 *   _fused_scalar.c                  scalar, everywhere
 * Each includes _fused_row.h once per target; the entry points are extern but hidden (not
 * exported from the shared object).
 */
#ifndef CE_FUSED_H
#define CE_FUSED_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 128  /* entries per block of the row sums */

typedef struct {
    int64_t n_rows, n_cols;
    const void *z;            /* (R, C) row-major logits, float32 or float64 */
    int64_t z_is_f32;
    const void *g;            /* (R, C) row-major user gradient, or NULL */
    int64_t g_is_f32;
    const double *alpha;      /* (R,) (1 - eps) * w_y, 0 for ignored rows */
    const double *beta;       /* (R,) eps / C, 0 for ignored rows */
    const int64_t *ys;        /* (R,) target class (0 for ignored rows) */
    const uint8_t *active;    /* (R,) row contributes */
    const double *w;          /* (C,) class weights, or NULL */
    double w_sum;             /* sum of w, or C */
    double scale;             /* d(reduced loss)/d(loss_n) */
    double rtol, abs_tol;     /* tolerance: rtol * |ref| + abs_tol + floor */
    double floor_coef;        /* k * eps */
    double lse_weight;        /* the softmax floor's |lse| term's weight (tolerance.py) */
    double *loss, *row_max, *log1p_s1;        /* (R,) outputs */
    double *ratio_max, *max_abs, *max_rel;    /* (R,) outputs when g is given */
    int64_t *mismatches, *nonfinite;          /* (R,) outputs when g is given */
    double *out_ref, *out_floor;              /* (R, C) reference gradient and floor, or NULL */
    double *out_tol, *out_ratio;              /* (R, C) allowed error and |err| / allowed, or NULL */
    double *work;                             /* (WORK_SIZE(C),) scratch of the first thread */
    int64_t n_threads;                        /* threads to split the rows over; <= 1: this one */
    /* softmax with probability targets: q (R, C) dense target weights (float32 when q_is_f32,
     * else float64), q_total (R,) their sums, numpy's pairwise row sums: given, or written here
     * when q_sum_here (alpha, beta, ys unused); NULL for index targets */
    const void *q;
    double *q_total;
    /* sigmoid BCE (ce_bce_rows): labels (R, C), weights (R, C) or NULL, pos_weight (C,) or NULL;
     * outputs: per-element losses and |coef w| (R, C) or NULL, their row sums in loss, total_w */
    const void *y_bin;        /* float32 when y_is_f32, else float64 */
    const double *w_bin, *pos_w;
    double *out_items, *out_item_w, *total_w;
    int64_t y_is_f32;
    int64_t q_is_f32, q_sum_here;
    double *row_min;          /* (R,) ce_scan_rows_on's row minima */
    /* softmax training-code terms (numpy_softmax.semantic_rows) when ext: logits z = x_scale x,
     * z-loss coefficient z_loss, sample weights s_w (R,) or NULL (1); outputs total_w (R,)
     * s (Q + 2 z_loss v lse) and row_zabs (R,) the largest finite |z| */
    int64_t ext;
    double x_scale, z_loss;
    const double *s_w;
    double *row_zabs;
    double softcap;           /* ext: z = softcap tanh(x_scale x / softcap) when > 0 */
    double *row_qabs, *row_qsum;  /* ext, probability targets: (R,) max |q|, sum |q| */
    /* sigmoid BCE on z = T(x) (ext with x_scale, softcap): (R,) sum |coef w|, sum g1 */
    double *row_mag, *row_g1;
    /* softmax rows for finite differences: row r with its entry pert_col[r] replaced by
     * pert_val[r] (the raw logit, before any transform), or NULL; and, when pick_cols is given
     * ((R, n_picks) columns, -1 for none), the reference gradient and floor at those columns
     * only, to pick_g and pick_fl (R, n_picks), instead of a pass over every entry */
    const int64_t *pert_col;
    const double *pert_val;
    int64_t n_picks;
    const int64_t *pick_cols;
    double *pick_g, *pick_fl;
    /* finite differences on softmax rows: row r's loss with its raw logit step_cols[r, j]
     * set to step_vals[r, j] (in float64), j < n_steps, to step_loss (R, n_steps), from the
     * row's own exps and block sums; NaN where not taken (column -1, the arg-max, a logit not
     * below the row's maximum: the caller evaluates those rows whole) */
    int64_t n_steps;
    const int64_t *step_cols;
    const double *step_vals;
    double *step_loss;
    /* flush-to-zero, when flushed is given (verify/allowance.py, RowAllowance.flushed_entries):
     * an entry failing the rule (|error| / allowed > 1) whose reference is below flush_min in
     * size and yours 0, or whose error is at most flush_partial, passes with error 0; flushed
     * (R,) counts those whose |reference| exceeds flush_tiny */
    double flush_min, flush_partial, flush_tiny;
    int64_t *flushed;
} ce_args;

/* doubles of scratch per thread: the row's exp (C + 8 for the last group), two block sums, a
 * soft-capped row's z and dz (2 C), a perturbed row (C), and for finite-difference steps the
 * two block sums kept and one to sum (STEP_SCRATCH) */
#define STEP_SCRATCH(C) (4 * (C) + 8 + 2 * ((C) / BLOCK + 1))
#define WORK_SIZE(C) (STEP_SCRATCH(C) + 3 * ((C) / BLOCK + 1))
/* numpy_softmax.SOFTCAP_DERIV_ERR: the floor's S |dl/dz| term of a soft-cap, times this (the
 * framework's tanh errs T' = S (1 - t^2) by up to ~2 S dt: XLA's float32 tanh, 4.75 eps) */
#define CE_SOFTCAP_DERIV_ERR 2.0

/* Rows [r0, r1) with scratch `work`: 0, or 1 + the first bad row; stops early once *stop (1 +
 * a bad row found by another thread) is at or before the current row. */
typedef int64_t (*rows_fn)(const ce_args *, double *, int64_t, int64_t, int64_t *);

/* ---------------------------------------------------------------- the targets built */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define CE_HAVE_X86_V3_V4 1  /* avx2 (x86-64-v3) and avx512 (x86-64-v4) */
#endif
#if defined(__x86_64__) && defined(__SSE2__)
#define CE_HAVE_SSE2 1
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define CE_HAVE_NEON 1
#endif

#define CE_ENTRY __attribute__((visibility("hidden")))
/* A target's entry points (defined by _fused_row.h): softmax rows, sigmoid BCE rows, the
 * input checks' scan, and exp/log1p and the soft-cap's tanh/sech^2 for the tests. */
#define CE_DECLARE_TARGET(sfx)                                                                 \
    CE_ENTRY int64_t rows_##sfx(const ce_args *, double *, int64_t, int64_t, int64_t *);     \
    CE_ENTRY int64_t bce_rows_##sfx(const ce_args *, double *, int64_t, int64_t, int64_t *); \
    CE_ENTRY int64_t scan_rows_##sfx(const ce_args *, double *, int64_t, int64_t, int64_t *); \
    CE_ENTRY void unit_funcs_##sfx(const double *, double *, double *, int64_t);             \
    CE_ENTRY void cap_funcs_##sfx(const double *, double, double *, double *, int64_t)

CE_DECLARE_TARGET(scalar);
#ifdef CE_HAVE_SSE2
CE_DECLARE_TARGET(sse2);
#endif
#ifdef CE_HAVE_NEON
CE_DECLARE_TARGET(neon);
#endif
#ifdef CE_HAVE_X86_V3_V4
CE_DECLARE_TARGET(avx2);
CE_DECLARE_TARGET(avx512);
#endif

/* ---------------------------------------------------------------- for _fused_row.h */

#if defined(__GNUC__) && !defined(__clang__)
#define CE_HAVE_SHUFFLE 1  /* __builtin_shuffle with variable indices */
#else
#define CE_HAVE_SHUFFLE 0
#endif

/* 2^(j/8), j = 0..7, as hi + lo (the pair carries ~106 bits) */
__attribute__((unused)) static const double CE_EXP2_HI[8] = {
    0x1.0000000000000p+0, 0x1.172b83c7d517bp+0, 0x1.306fe0a31b715p+0, 0x1.4bfdad5362a27p+0,
    0x1.6a09e667f3bcdp+0, 0x1.8ace5422aa0dbp+0, 0x1.ae89f995ad3adp+0, 0x1.d5818dcfba487p+0};
__attribute__((unused)) static const double CE_EXP2_LO[8] = {
    0x0.0p+0, -0x1.19041b9d78a76p-55, 0x1.6f46ad23182e4p-55, 0x1.d4397afec42e2p-56,
    -0x1.bdd3413b26456p-54, 0x1.6e9f156864b27p-54, 0x1.7a1cd345dcc81p-54, 0x1.2ed02d75b3707p-55};

/* Pairwise sum of b[0..n), in place (baseline code: included before any target pragma). */
__attribute__((unused)) static double ce_pairwise(double *b, int64_t n) {
    if (n == 0) return 0.0;
    while (n > 1) {
        int64_t h = n / 2;
        for (int64_t i = 0; i < h; i++) b[i] = b[2 * i] + b[2 * i + 1];
        if (n % 2) b[h] = b[n - 1];
        n -= h;
    }
    return b[0];
}

#endif

/* Fused softmax cross-entropy pass: loss, gradient, error floor and comparison of row chunks in
 * one sweep per row, with no (R, C) temporaries. The numpy kernels (ce_cli/kernels/numpy_softmax.py,
 * numpy_sigmoid.py) are the reference; this computes the same formulas in the same order, except
 * exp and log1p (below, < 1 ulp) and the order of the row sums. ce_cli/kernels/compiled.py loads
 * it with ctypes.
 *
 * Index targets (class weights, ignore_index and label smoothing included) and probability
 * targets, -inf logits (masks) included, with z-loss, sample weights, logit scale and softcap
 * (ce_args.ext: numpy_softmax.semantic_rows' formulas); sigmoid BCE (ce_bce_rows_on; with ext,
 * on z = T(x): numpy_sigmoid's transformed formulas); the row
 * scan of the input checks (ce_scan_rows_on). Rows with NaN, +inf or nothing but -inf are handed back to the numpy
 * kernel, which reports them.
 *
 * Built without -ffast-math and with -ffp-contract=off: every operation is IEEE-rounded, so a
 * row computed twice (once for statistics, once for its worst entries) gives the same bits.
 *
 * One row kernel (_fused_row.h), compiled once per target and chosen at run time:
 *   avx512  x86-64-v4, 8 lanes      avx2  x86-64-v3, 4 lanes      (GCC >= 12 on x86-64)
 *   sse2    x86-64 baseline, 2 lanes          neon  AArch64 baseline, 2 lanes
 *   scalar  1 lane, any CPU and C compiler
 * Every target gives the same bits (see _fused_row.h). Each target is a translation unit of its
 * own (_fused_avx512.c, _fused_avx2.c, _fused_base.c, _fused_scalar.c; setup.py compiles them in
 * parallel and links them with this file, which holds the dispatch, the threads and the exported
 * functions, into one shared object). ce_select_target picks a target by name, the best this
 * CPU runs by default; ce_softmax_rows calls it through a function pointer and splits the rows
 * over ce_args.n_threads threads.
 */
#include <pthread.h>

#include "_fused.h"

/* a thread gets at least this many entries (fewer threads for small calls) */
#define MIN_ENTRIES_PER_THREAD (1 << 14)
#define CLAIM_ENTRIES (1 << 16)  /* rows a thread claims at once: about this many entries */

/* ---------------------------------------------------------------- dispatch */

typedef struct {
    const char *name;
    rows_fn fn, bce, scan;    /* softmax rows, sigmoid BCE rows, target scan */
    void (*funcs)(const double *, double *, double *, int64_t);  /* unit_funcs */
    void (*cap)(const double *, double, double *, double *, int64_t);  /* cap_funcs */
    int (*runs)(void);  /* this CPU runs it */
} ce_target_t;

static int ce_always(void) { return 1; }
#ifdef CE_HAVE_X86_V3_V4
static int ce_cpu_v3(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v3");
}
static int ce_cpu_v4(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4");
}
#endif

/* best first */
static const ce_target_t TARGETS[] = {
#ifdef CE_HAVE_X86_V3_V4
    {"avx512", rows_avx512, bce_rows_avx512, scan_rows_avx512, unit_funcs_avx512,
     cap_funcs_avx512, ce_cpu_v4},
    {"avx2", rows_avx2, bce_rows_avx2, scan_rows_avx2, unit_funcs_avx2,
     cap_funcs_avx2, ce_cpu_v3},
#endif
#ifdef CE_HAVE_SSE2
    {"sse2", rows_sse2, bce_rows_sse2, scan_rows_sse2, unit_funcs_sse2,
     cap_funcs_sse2, ce_always},
#endif
#ifdef CE_HAVE_NEON
    {"neon", rows_neon, bce_rows_neon, scan_rows_neon, unit_funcs_neon,
     cap_funcs_neon, ce_always},
#endif
    {"scalar", rows_scalar, bce_rows_scalar, scan_rows_scalar, unit_funcs_scalar,
     cap_funcs_scalar, ce_always},
};
#define N_TARGETS ((int64_t)(sizeof TARGETS / sizeof TARGETS[0]))

static const ce_target_t *selected;  /* NULL until the first ce_select_target */

/* Names of the targets built in, best first, "|"-separated; ce_target_runs tells which run. */
const char *ce_targets(void) {
    static char names[128];
    if (!names[0]) {
        char buf[128] = "";
        for (int64_t i = 0; i < N_TARGETS; i++) {
            if (i) strcat(buf, "|");
            strcat(buf, TARGETS[i].name);
        }
        memcpy(names, buf, sizeof buf);
    }
    return names;
}

static const ce_target_t *ce_find(const char *name) {
    for (int64_t i = 0; i < N_TARGETS; i++)
        if (!strcmp(TARGETS[i].name, name)) return &TARGETS[i];
    return NULL;
}

/* 1 when target `name` is built in and this CPU runs it, else 0. */
int64_t ce_target_runs(const char *name) {
    const ce_target_t *t = ce_find(name);
    return t && t->runs();
}

/* Use target `name`, or the best this CPU runs when name is NULL or "": 1, or 0 (and no change)
 * when it is not built in or this CPU does not run it. */
int64_t ce_select_target(const char *name) {
    if (!name || !*name) {
        for (int64_t i = 0; i < N_TARGETS; i++)
            if (TARGETS[i].runs()) {
                selected = &TARGETS[i];
                return 1;
            }
        return 0;
    }
    const ce_target_t *t = ce_find(name);
    if (!t || !t->runs()) return 0;
    selected = t;
    return 1;
}

/* The name of the target ce_softmax_rows runs. */
const char *ce_target(void) {
    if (!selected) ce_select_target(NULL);
    return selected->name;
}

/* 1 when this CPU runs a target (always: scalar runs everywhere). */
int64_t ce_supported(void) { return 1; }

/* ---------------------------------------------------------------- threads */

typedef struct {
    const ce_args *a;
    rows_fn fn;
    double *work;
    int64_t *next, step, result;  /* the next unclaimed row (shared), rows per claim */
    int64_t *stop;
    pthread_t id;
    int started;
} ce_job;

/* Claims `step` rows at a time until none is left (or a bad row before them was found), so
 * threads that run slower (page faults, a busy core) take fewer rows instead of holding up the
 * rest at the join. */
static void *ce_run_job(void *p) {
    ce_job *j = p;
    const int64_t R = j->a->n_rows;
    for (;;) {
        const int64_t r0 = __atomic_fetch_add(j->next, j->step, __ATOMIC_RELAXED);
        if (r0 >= R || __atomic_load_n(j->stop, __ATOMIC_RELAXED) <= r0) break;
        const int64_t r1 = R - r0 > j->step ? r0 + j->step : R;
        const int64_t result = j->fn(j->a, j->work, r0, r1, j->stop);
        if (!result) continue;
        j->result = result;  /* later rows need not run: publish it as the stop */
        int64_t seen = __atomic_load_n(j->stop, __ATOMIC_RELAXED);
        while (result < seen &&
               !__atomic_compare_exchange_n(j->stop, &seen, result, 0, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED)) {
        }
        break;
    }
    return NULL;
}

/* Rows [0, n_rows) with `fn` over n_threads threads, each claiming blocks of rows in turn with
 * its own scratch; every output is written by row index, so the results do not depend on the
 * thread count or on which thread ran a row. Returns 0, or 1 + the first row with a NaN or +inf
 * logit or only -inf (outputs are then incomplete: the caller discards them): every row before
 * it has run, since blocks are claimed in row order. */
static int64_t ce_run(const ce_args *a, rows_fn fn) {
    const int64_t R = a->n_rows, C = a->n_cols;
    int64_t n = a->n_threads;
    const int64_t by_size = R * C / MIN_ENTRIES_PER_THREAD;
    if (n > by_size) n = by_size;
    if (n > R) n = R;
    if (n > 256) n = 256;
    int64_t stop = INT64_MAX;
    double *extra = NULL;
    if (n > 1) {
        extra = malloc(sizeof(double) * (size_t)WORK_SIZE(C) * (size_t)(n - 1));
        if (!extra) n = 1;
    }
    if (n <= 1) return fn(a, a->work, 0, R, &stop);

    int64_t next = 0;
    const int64_t step = C > 0 && CLAIM_ENTRIES / C > 1 ? CLAIM_ENTRIES / C : 1;
    ce_job jobs[256];
    for (int64_t i = 0; i < n; i++) {
        ce_job *j = &jobs[i];
        j->a = a;
        j->fn = fn;
        j->work = i ? extra + (size_t)WORK_SIZE(C) * (size_t)(i - 1) : a->work;
        j->next = &next;
        j->step = step;
        j->result = 0;
        j->stop = &stop;
        j->started = 0;
    }
    for (int64_t i = 1; i < n; i++)
        jobs[i].started = pthread_create(&jobs[i].id, NULL, ce_run_job, &jobs[i]) == 0;
    ce_run_job(&jobs[0]);
    for (int64_t i = 1; i < n; i++)
        if (jobs[i].started) pthread_join(jobs[i].id, NULL);
    /* a thread that did not start claimed nothing: the others took its rows */
    free(extra);
    int64_t first = 0;
    for (int64_t i = 0; i < n; i++)
        if (jobs[i].result && (!first || jobs[i].result < first)) first = jobs[i].result;
    return first;
}

/* The rows on the selected target (the best this CPU runs unless ce_select_target chose). */
int64_t ce_softmax_rows(const ce_args *a) {
    if (!selected) ce_select_target(NULL);
    return ce_run(a, selected->fn);
}

/* The rows on target `name`; -1 (and nothing done) when it is not built in or this CPU does not
 * run it. */
int64_t ce_softmax_rows_on(const ce_args *a, const char *name) {
    const ce_target_t *t = ce_find(name);
    if (!t || !t->runs()) return -1;
    return ce_run(a, t->fn);
}

/* Sigmoid BCE rows on target `name` (see bce_kernel in _fused_row.h); -1 when it is not built
 * in or this CPU does not run it, else as ce_softmax_rows_on. */
int64_t ce_bce_rows_on(const ce_args *a, const char *name) {
    const ce_target_t *t = ce_find(name);
    if (!t || !t->runs()) return -1;
    return ce_run(a, t->bce);
}

/* Row sums (numpy's pairwise order), minima and maxima of a->q on target `name` (see
 * scan_rows in _fused_row.h); -1 when it is not built in or this CPU does not run it, else 0. */
int64_t ce_scan_rows_on(const ce_args *a, const char *name) {
    const ce_target_t *t = ce_find(name);
    if (!t || !t->runs()) return -1;
    return ce_run(a, t->scan);
}

/* exp(-|x|) and log1p of it as the row kernels of target `name` compute them, lane 0 of a
 * vector per entry (for the tests); -1 when the target is not built in or does not run here. */
int64_t ce_unit_funcs_on(const char *name, const double *x, double *out_exp, double *out_log1p,
                         int64_t n) {
    const ce_target_t *t = ce_find(name);
    if (!t || !t->runs()) return -1;
    t->funcs(x, out_exp, out_log1p, n);
    return 0;
}

/* ---------------------------------------------------------------- float16 and bfloat16 rows */

typedef struct {
    const uint16_t *src;
    float *dst;
    int64_t n;
    int bf16;  /* the bits are bfloat16's, not binary16's */
    pthread_t id;
    int started;
} ce_widen_job;

/* 16-byte vectors: a register on every SIMD CPU (wider ones are split element by element) */
typedef uint16_t ce_h4 __attribute__((vector_size(8)));
typedef uint32_t ce_u4 __attribute__((vector_size(16)));
typedef int32_t ce_i4 __attribute__((vector_size(16)));
typedef float ce_f4 __attribute__((vector_size(16)));

/* The float32 bits of the values of 4 binary16 bits, exactly: the exponent rebiased (normal),
 * the integer significand times 2^-24 (subnormal, 0), the payload kept (inf, NaN); masks for
 * the choices. Integer operations and one exact conversion: the same bits on every CPU. */
static inline void ce_half_bits4(const uint16_t *src, uint32_t *out) {
    ce_h4 h;
    memcpy(&h, src, sizeof h);
    const ce_i4 w = __builtin_convertvector(h, ce_i4);
    const ce_i4 sign = (ce_i4)((ce_u4)(w & 0x8000) << 16);  /* unsigned: no shift into the sign */
    const ce_i4 em = w & 0x7fff;  /* compared signed (SSE2 has no unsigned comparison) */
    const ce_f4 f = __builtin_convertvector(em, ce_f4) * 0x1p-24f;
    ce_i4 small;
    memcpy(&small, &f, sizeof small);
    const ce_i4 special = em >= 0x7c00, normal = em >= 0x0400;  /* -1 or 0 */
    const ce_i4 big = (((em << 13) + (112 << 23)) & ~special) | (((em << 13) | 0x7f800000) & special);
    const ce_i4 bits = sign | (big & normal) | (small & ~normal);
    memcpy(out, &bits, sizeof bits);
}

/* The float32 bits of 4 bfloat16 bits: the high half of each (the value, exactly). */
static inline void ce_bf16_bits4(const uint16_t *src, uint32_t *out) {
    ce_h4 h;
    memcpy(&h, src, sizeof h);
    const ce_u4 bits = __builtin_convertvector(h, ce_u4) << 16;
    memcpy(out, &bits, sizeof bits);
}

/* entries [0, n) of src into out by `four`; the last 1-3 through a padded vector */
#define CE_WIDEN_LOOP(four)                                                  \
    do {                                                                    \
        int64_t i = 0;                                                      \
        for (; i + 4 <= n; i += 4) four(src + i, out + i);                  \
        if (i < n) {                                                        \
            uint16_t h[4] = {0};                                            \
            uint32_t o[4];                                                  \
            memcpy(h, src + i, sizeof h[0] * (size_t)(n - i));              \
            four(h, o);                                                     \
            memcpy(out + i, o, sizeof o[0] * (size_t)(n - i));              \
        }                                                                   \
    } while (0)

static void *ce_widen_part(void *p) {
    const ce_widen_job *j = p;
    const uint16_t *src = j->src;
    uint32_t *out = (uint32_t *)(void *)j->dst;
    const int64_t n = j->n;
    if (j->bf16) CE_WIDEN_LOOP(ce_bf16_bits4);
    else CE_WIDEN_LOOP(ce_half_bits4);
    return NULL;
}

/* 16-bit float values (their bits src[0..n), bfloat16's when bf16) widened exactly to float32
 * dst[0..n) over n_threads threads (each at least MIN_ENTRIES_PER_THREAD entries). */
static void ce_widen(const uint16_t *src, float *dst, int64_t n, int64_t n_threads, int bf16) {
    int64_t t = n_threads;
    if (t > n / MIN_ENTRIES_PER_THREAD) t = n / MIN_ENTRIES_PER_THREAD;
    if (t > 256) t = 256;
    if (t < 1) t = 1;
    ce_widen_job jobs[256];
    const int64_t part = (n / t + 63) / 64 * 64;  /* whole cache lines of the output */
    for (int64_t i = 0; i < t; i++) {
        const int64_t lo = i * part < n ? i * part : n, hi = lo + part < n ? lo + part : n;
        jobs[i] = (ce_widen_job){src + lo, dst + lo, hi - lo, bf16, 0, 0};
    }
    for (int64_t i = 1; i < t; i++)
        jobs[i].started = pthread_create(&jobs[i].id, NULL, ce_widen_part, &jobs[i]) == 0;
    ce_widen_part(&jobs[0]);
    for (int64_t i = 1; i < t; i++) {
        if (jobs[i].started) pthread_join(jobs[i].id, NULL);
        else ce_widen_part(&jobs[i]);  /* not started: this thread does its part */
    }
}

/* float16 rows for the compiled kernel: numpy's astype(float32), which runs on one core at
 * ~1.7 ns an entry */
void ce_widen_f16(const uint16_t *src, float *dst, int64_t n, int64_t n_threads) {
    ce_widen(src, dst, n, n_threads, 0);
}

/* bfloat16 rows (a Bfloat16Rows input's bits) for the compiled kernel: numpy's shift runs on one core */
void ce_widen_bf16(const uint16_t *src, float *dst, int64_t n, int64_t n_threads) {
    ce_widen(src, dst, n, n_threads, 1);
}

/* cap tanh(x / cap) and sech^2(x / cap) as the row kernels of target `name` compute them (for
 * the tests); -1 when the target is not built in or does not run here. */
int64_t ce_cap_funcs_on(const char *name, const double *x, double cap, double *out_z,
                        double *out_dz, int64_t n) {
    const ce_target_t *t = ce_find(name);
    if (!t || !t->runs()) return -1;
    t->cap(x, cap, out_z, out_dz, n);
    return 0;
}

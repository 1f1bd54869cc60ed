/* Fused softmax cross-entropy pass: loss, gradient, error floor and comparison of row chunks in
 * one sweep per row, with no (R, C) temporaries. The numpy kernel in softmax_ce.py is the
 * reference; this computes the same formulas in the same order (see SoftmaxCE._evaluate_rows),
 * except exp (below, < 1 ulp) and the order of the row sums. ce_cli/fused.py loads it with ctypes.
 *
 * Index targets only (class weights, ignore_index and label smoothing included), -inf logits
 * (masks) included; rows with NaN, +inf or nothing but -inf are handed back to the numpy kernel,
 * which reports them.
 *
 * Built without -ffast-math and with -ffp-contract=off: every operation is IEEE-rounded, so a
 * row computed twice (once for statistics, once for its worst entries) gives the same bits.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define W 8  /* lanes: one AVX-512 register */
#define BLOCK 128  /* entries per block of the row sums */
typedef double vd __attribute__((vector_size(W * 8)));
typedef int64_t vl __attribute__((vector_size(W * 8)));
typedef uint64_t vu __attribute__((vector_size(W * 8)));
typedef float vf __attribute__((vector_size(W * 4)));

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
    double *loss, *row_max, *log1p_s1;        /* (R,) outputs */
    double *ratio_max, *max_abs, *max_rel;    /* (R,) outputs when g is given */
    int64_t *mismatches, *nonfinite;          /* (R,) outputs when g is given */
    double *out_ref, *out_floor;              /* (R, C) reference gradient and floor, or NULL */
    double *out_tol, *out_ratio;              /* (R, C) allowed error and |err| / allowed, or NULL */
    double *work;                             /* (C + W + 2 (C / BLOCK + 1),) scratch */
} ce_args;

/* AVX-512 only (x86-64-v4): a 4-lane AVX2 build measured only 12% faster than the numpy kernel,
 * so other CPUs use the numpy kernel; ce_supported() tells which. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")

#define sel(mask, a, b) ((vd)(((vl)(a) & (mask)) | ((vl)(b) & ~(mask))))
#define vabs(x) ((vd)((vl)(x) & ((vl){0} + INT64_MAX)))
#define splat(x) ((vd){0} + (double)(x))
#define ALL ((vl){-1, -1, -1, -1, -1, -1, -1, -1})
#define LIVE(c) (IOTA < (vl){0} + (C - (c)))  /* lanes inside the row */

static const vl IOTA = {0, 1, 2, 3, 4, 5, 6, 7};

/* 2^(j/8), j = 0..7, as hi + lo (the pair carries ~106 bits) */
static const vd EXP2_HI = {0x1.0000000000000p+0, 0x1.172b83c7d517bp+0, 0x1.306fe0a31b715p+0,
                           0x1.4bfdad5362a27p+0, 0x1.6a09e667f3bcdp+0, 0x1.8ace5422aa0dbp+0,
                           0x1.ae89f995ad3adp+0, 0x1.d5818dcfba487p+0};
static const vd EXP2_LO = {0x0.0p+0, -0x1.19041b9d78a76p-55, 0x1.6f46ad23182e4p-55,
                           0x1.d4397afec42e2p-56, -0x1.bdd3413b26456p-54, 0x1.6e9f156864b27p-54,
                           0x1.7a1cd345dcc81p-54, 0x1.2ed02d75b3707p-55};

static inline __attribute__((always_inline)) vd table8(vd table, vl j) {
    return __builtin_shuffle(table, j);
}

/* exp(x) for x <= 0 (-inf too when not `normal`). x = (8e + j) ln2/8 + r with |r| <= ln2/16;
 * exp(x) = 2^e (T[j] + T[j] q(r)), q(r) = exp(r) - 1 to r^8 (remainder < 2e-18 relative),
 * T[j] = 2^(j/8) as hi + lo. Error below one ulp, like numpy's exp. `normal` (a constant):
 * the caller knows x >= -708, so the result is normal and 2^e one multiplication; otherwise
 * 2^e is applied in two steps (a subnormal result rounds once) and x < -745.2 gives 0. */
static inline __attribute__((always_inline)) vd vexp_neg(vd x, int normal) {
    const vd shift = splat(0x1.8p52);
    vd xc = normal ? x : sel(x < splat(-746.0), splat(-746.0), x);
    vd t = xc * splat(0x1.71547652b82fep+3) + shift;   /* 8 / ln2 */
    vd kd = t - shift;
    vd r = (xc - kd * splat(0x1.62e42fee00000p-4)) - kd * splat(0x1.a39ef35793c76p-36);
    vd r2 = r * r, r4 = r2 * r2;
    vd a1 = splat(1.0 / 2) + splat(1.0 / 6) * r;
    vd a2 = splat(1.0 / 24) + splat(1.0 / 120) * r;
    vd a3 = splat(1.0 / 720) + splat(1.0 / 5040) * r + splat(1.0 / 40320) * r2;
    vd q = r + r2 * ((a1 + a2 * r2) + a3 * r4);
    /* k = 8e + j in [-8612, 0], from t's low bits; the shifts act on k + 2^14 >= 0 */
    vu k = (vu)t - (vu)shift + (1 << 14);
    vl j = (vl)(k & 7);
    vd hi = table8(EXP2_HI, j);
    vd p = hi + (table8(EXP2_LO, j) + hi * q);
    vu e = (k >> 3) - (1 << 11) + 1023;  /* biased exponent of 2^e */
    if (normal) return p * (vd)(e << 52);
    vu e1 = (e + 1024) >> 1;             /* 2^ceil(e/2), biased: both factors stay normal */
    vd s1 = (vd)(e1 << 52);
    vd s2 = (vd)((e - e1 + 1023) << 52);
    return sel(x < splat(-745.2), splat(0.0), (p * s1) * s2);
}

/* Lanes [c0, c0 + n) of a row as doubles; the rest repeat the first lane (callers mask them). */
static inline __attribute__((always_inline)) vd load_row(const void *base, int is_f32, int64_t c0, int64_t n) {
    vd v;
    if (is_f32) {
        const float *p = (const float *)base + c0;
        if (n == W) {
            vf f;
            memcpy(&f, p, sizeof f);
            return __builtin_convertvector(f, vd);
        }
        for (int i = 0; i < W; i++) v[i] = p[i < n ? i : 0];
    } else {
        const double *p = (const double *)base + c0;
        if (n == W) {
            memcpy(&v, p, sizeof v);
            return v;
        }
        for (int i = 0; i < W; i++) v[i] = p[i < n ? i : 0];
    }
    return v;
}

/* The first n lanes of v to p[0..n). */
static inline __attribute__((always_inline)) void store(double *p, vd v, int64_t n) {
    if (n == W) memcpy(p, &v, sizeof v);
    else for (int i = 0; i < n; i++) p[i] = v[i];
}

/* pairwise: ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)) */
static inline __attribute__((always_inline)) double hsum(vd v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* Pairwise sum of b[0..n), in place. */
static double pairwise(double *b, int64_t n) {
    if (n == 0) return 0.0;
    while (n > 1) {
        int64_t h = n / 2;
        for (int64_t i = 0; i < h; i++) b[i] = b[2 * i] + b[2 * i + 1];
        if (n % 2) b[h] = b[n - 1];
        n -= h;
    }
    return b[0];
}

static inline __attribute__((always_inline)) double hmax(vd v) {
    double m = v[0];
    for (int i = 1; i < W; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* One row. Returns 0, or 1 when the row holds a NaN or +inf logit or is all -inf (the numpy
 * kernel reports those); -inf entries (masks) are served. z32/g32 are constants at
 * each call site, so the loops are compiled once per dtype pair; the last, partial vector of a
 * row goes through the same code with a lane mask. */
static inline __attribute__((always_inline)) int row_kernel(const ce_args *a, int64_t r, int z32, int g32) {
    const int64_t C = a->n_cols;
    const int64_t body = C - C % W;
    const int64_t tail = C - body;
    const void *z = (const char *)a->z + (size_t)(r * C) * (z32 ? 4 : 8);
    double *e_row = a->work;

    /* pass 1: max, min and first arg-max per lane; z - z is NaN at NaN and +-inf, and -inf
     * (a mask) is let through */
    const vd neg_inf = splat(-INFINITY);
    vd vmax = splat(-INFINITY), vmin = splat(INFINITY), vbad = splat(0.0);
    vl vidx = (vl){0};
#define PASS1(c, live, nn) do {                                                  \
        vd v = load_row(z, z32, c, (nn));                                     \
        vbad += sel((live) & (v != neg_inf), v - v, splat(0.0));              \
        vl gt = (live) & (v > vmax);                                          \
        vmax = sel(gt, v, vmax);                                              \
        vmin = sel((live) & (v < vmin), v, vmin);                             \
        vidx = (vl)sel(gt, (vd)(IOTA + (c)), (vd)vidx);                       \
    } while (0)
    for (int64_t c = 0; c < body; c += W) PASS1(c, ALL, W);
    if (tail) PASS1(body, LIVE(body), tail);
    if (hsum(vbad) != 0.0) return 1;
    const double m = hmax(vmax);
    if (m == -INFINITY) return 1;
    double lo = vmin[0];
    for (int i = 1; i < W; i++) lo = vmin[i] < lo ? vmin[i] : lo;
    const int normal = lo - m >= -708.0;  /* every exp(z - m) is a normal number */
    int64_t am = C;
    for (int i = 0; i < W; i++)
        if (vmax[i] == m && vidx[i] < am) am = vidx[i];

    const double alpha = a->alpha[r], beta = a->beta[r];
    const int64_t y = a->ys[r];
    const double *w = a->w;
    const vd vm = splat(m);
    const vl vam = (vl){0} + am;
    /* pass 2: e = exp(z - m) (0 at the arg-max), s1 = sum e; sum (z - m) w for smoothing.
     * Summed as numpy does: 8 lanes over blocks of 128 entries, then pairwise over blocks. */
    vd acc_e = splat(0.0), acc_z = splat(0.0);
    double *blk_e = e_row + C + W, *blk_z = blk_e + C / BLOCK + 1;
    int64_t nb = 0;
#define PASS2(c, live, nn, nrm) do {                                         \
        vd zs = load_row(z, z32, c, nn) - vm;                                 \
        vd e = sel(live, vexp_neg(zs, nrm), splat(0.0));                      \
        memcpy(e_row + (c), &e, sizeof e);                                    \
        acc_e += e;                                                           \
        if (beta != 0.0) {                                                    \
            vd wv = w ? load_row(w, 0, c, nn) : splat(1.0);                  \
            vd wz = sel(wv != 0, wv * zs, splat(0.0));  /* 0 * -inf: 0 */     \
            acc_z += sel(live, wz, splat(0.0));                               \
        }                                                                     \
    } while (0)
    /* the arg-max's block masks its lane out of the sum; every other full block needs no mask */
    const int64_t am_blk = am - am % W;
#define PASS2_ROW(nrm) do {                                                  \
        for (int64_t c = 0; c < body; c += W) {                                \
            if (c == am_blk) PASS2(c, IOTA + c != vam, W, nrm);                \
            else PASS2(c, ALL, W, nrm);                                        \
            if ((c & (BLOCK - 1)) == BLOCK - W) {                              \
                blk_e[nb] = hsum(acc_e);                                       \
                blk_z[nb++] = hsum(acc_z);                                     \
                acc_e = acc_z = splat(0.0);                                    \
            }                                                                  \
        }                                                                      \
        if (tail) PASS2(body, LIVE(body) & (IOTA + body != vam), tail, nrm);   \
    } while (0)
    if (normal) PASS2_ROW(1);
    else PASS2_ROW(0);
    if (C % BLOCK) {
        blk_e[nb] = hsum(acc_e);
        blk_z[nb++] = hsum(acc_z);
    }
    const double sum_e = pairwise(blk_e, nb), sum_z = beta != 0.0 ? pairwise(blk_z, nb) : 0.0;
    e_row[am] = 1.0;
    const double s1 = sum_e, s = 1.0 + s1, l1 = log1p(s1), lse = m + l1;
    const double Q = alpha + beta * a->w_sum;
    const double zy = (z32 ? (double)((const float *)z)[y] : ((const double *)z)[y]) - m;
    double qz = alpha != 0.0 ? alpha * zy : 0.0;
    if (beta != 0.0) qz = qz + beta * sum_z;
    a->loss[r] = a->active[r] ? Q * l1 - qz : 0.0;
    a->row_max[r] = m;
    a->log1p_s1[r] = l1;
    if (!a->g && !a->out_ref && !a->out_floor) return 0;

    /* pass 3: reference gradient, floor, comparison, in the numpy kernel's operation order:
     *   g = e * (Q scale / s) - (beta scale) w - [c = y] alpha scale
     *   floor = ((1 + l1 + |lse|) - zs) e (k eps scale |Q| / s) + (k eps scale |beta|) |w|
     *           + [c = y] k eps scale |alpha|
     * and at a confident row's arg-max (s1 <= 1) g = scale (rest - Q s1 / s). */
    const double scale = a->scale, coef = a->floor_coef;
    const double k_g = Q * scale / s, k_b = beta * scale, k_a = alpha * scale;
    const double k_f = coef * scale * fabs(Q) / s, k_fb = coef * scale * fabs(beta);
    const double k_fa = coef * scale * fabs(alpha), big_a = (1.0 + l1) + fabs(lse);
    const double w_am = w ? w[am] : 1.0;
    const double rest = (am != y ? alpha : 0.0) + beta * (a->w_sum - w_am);
    const double g_am = scale * (rest - Q * s1 / s);
    const int sure = s1 <= 1.0;
    const vl vy = (vl){0} + y;
    const vd rtol = splat(a->rtol), abs_tol = splat(a->abs_tol), one = splat(1.0);
    vd v_ratio = splat(0.0), v_abs = splat(0.0), v_rel = splat(0.0);
    vl v_mis = (vl){0}, v_nf = (vl){0};
    const void *gu = a->g ? (const char *)a->g + (size_t)(r * C) * (g32 ? 4 : 8) : NULL;
#define PASS3(c, live, nn, spec) do {                                        \
        const int64_t n = (nn);                                              \
        vl ids = IOTA + (c);                                                  \
        vd e, wv = w ? load_row(w, 0, c, n) : one;                            \
        memcpy(&e, e_row + (c), sizeof e);                                    \
        vd zs = load_row(z, z32, c, n) - vm;                                  \
        vd g = e * splat(k_g);                                                \
        if (k_b != 0.0) g = g - splat(k_b) * wv;                              \
        if (spec) g = sel(ids == vy, g - splat(k_a), g);                      \
        if (spec && sure) g = sel(ids == vam, splat(g_am), g);                \
        vd fl = ((splat(big_a) - zs) * e) * splat(k_f);                       \
        if (!normal) fl = sel(e == 0, splat(0.0), fl);  /* inf * 0 at -inf */  \
        if (k_fb != 0.0) fl = fl + splat(k_fb) * vabs(wv);                    \
        if (spec) fl = sel(ids == vy, fl + splat(k_fa), fl);                  \
        vd absg = vabs(g);                                                    \
        vd tol = (absg * rtol + abs_tol) + fl;                                \
        if (a->out_ref) store(a->out_ref + r * C + (c), g, n);                \
        if (a->out_floor) store(a->out_floor + r * C + (c), fl, n);           \
        if (a->out_tol) store(a->out_tol + r * C + (c), tol, n);              \
        if (gu) {                                                             \
            vd d = vabs(load_row(gu, g32, c, n) - g);                         \
            vl odd = (live) & ~(d <= splat(1.7976931348623157e308));          \
            vd ratio = sel(odd, splat(INFINITY), d / tol);                    \
            ratio = sel(live, ratio, splat(0.0));                             \
            v_nf -= odd;                                                      \
            v_mis -= (live) & (ratio > one);                                  \
            v_ratio = sel(ratio > v_ratio, ratio, v_ratio);                   \
            vd rel = sel((live) & (d == d) & (g != 0), d / absg, splat(0.0)); \
            v_rel = sel(rel > v_rel, rel, v_rel);                             \
            v_abs = sel((live) & (d > v_abs), d, v_abs);                      \
            if (a->out_ratio) store(a->out_ratio + r * C + (c), ratio, n);    \
        }                                                                     \
    } while (0)
    /* only the target's and the arg-max's blocks need the per-entry corrections */
    const int64_t y_blk = y - y % W;
    for (int64_t c = 0; c < body; c += W) {
        if (c == y_blk || c == am_blk) PASS3(c, ALL, W, 1);
        else PASS3(c, ALL, W, 0);
    }
    if (tail) PASS3(body, LIVE(body), tail, 1);
    if (!gu) return 0;
    int64_t mis = 0, nf = 0;
    for (int i = 0; i < W; i++) {
        mis += v_mis[i];
        nf += v_nf[i];
    }
    a->ratio_max[r] = hmax(v_ratio);
    a->max_abs[r] = hmax(v_abs);
    a->max_rel[r] = hmax(v_rel);
    a->mismatches[r] = mis;
    a->nonfinite[r] = nf;
    return 0;
}

#undef PASS1
#undef PASS2
#undef PASS2_ROW
#undef PASS3

/* Rows [0, n_rows): 0, or 1 + the first row with a NaN or +inf logit or only -inf (nothing
 * after it is written). */
int64_t ce_softmax_rows(const ce_args *a) {
    for (int64_t r = 0; r < a->n_rows; r++) {
        int bad;
        if (a->z_is_f32)
            bad = a->g_is_f32 ? row_kernel(a, r, 1, 1) : row_kernel(a, r, 1, 0);
        else
            bad = a->g_is_f32 ? row_kernel(a, r, 0, 1) : row_kernel(a, r, 0, 0);
        if (bad) return r + 1;
    }
    return 0;
}
#pragma GCC pop_options

/* 1 when this CPU runs the kernel, else 0 (and ce_softmax_rows must not be called). */
int64_t ce_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") ? 1 : 0;
}
#else  /* another compiler or architecture: no kernel */
int64_t ce_supported(void) { return 0; }
#endif

/* The row kernel, written once over a lane count. Each target's translation unit (_fused_avx512.c,
 * _fused_avx2.c, _fused_base.c, _fused_scalar.c) includes _fused.h, then this file once per target
 * with CE_W (lanes: 8, 4, 2 or 1) and CE_SFX (a name suffix) defined, inside that target's
 * `#pragma GCC target` region; it defines rows_, bce_rows_, scan_rows_, unit_funcs_ and
 * cap_funcs_<CE_SFX> (softmax rows, sigmoid BCE rows, the input checks' scan, exp/log1p and the
 * soft-cap's tanh/sech^2 for the tests; extern, declared in _fused.h) and nothing else that
 * outlives the inclusion.
 *
 * Same bits on every target: every operation is an IEEE-rounded double operation on one entry,
 * in the same order for every lane count, and the only sums across entries (s1 and the label
 * smoothing sum) always use 8 accumulators, entry c going to accumulator c % 8, whatever W is
 * (W = 4: two vectors, W = 1: eight scalars). Maxima and counts do not depend on the order.
 */
#ifndef CE_W
#error "define CE_W and CE_SFX before including _fused_row.h"
#endif

#define CE_CAT2(a, b) a##_##b
#define CE_CAT(a, b) CE_CAT2(a, b)
#define T(name) CE_CAT(name, CE_SFX)
#define W CE_W
#define G (8 / CE_W)        /* vectors per group of 8 accumulators */
#define AI static inline __attribute__((always_inline))

typedef double T(vd) __attribute__((vector_size(W * 8)));
typedef int64_t T(vl) __attribute__((vector_size(W * 8)));
typedef uint64_t T(vu) __attribute__((vector_size(W * 8)));
typedef float T(vf) __attribute__((vector_size(W * 4)));
typedef float T(vf2) __attribute__((vector_size(W * 8)));     /* 2W floats: pass 1 on float32 */
typedef int32_t T(vi2) __attribute__((vector_size(W * 8)));
#define vd T(vd)
#define vl T(vl)
#define vu T(vu)
#define vf T(vf)
#define vf2 T(vf2)
#define vi2 T(vi2)

#define sel(mask, a, b) ((vd)(((vl)(a) & (mask)) | ((vl)(b) & ~(mask))))
#define vabs(x) ((vd)((vl)(x) & ((vl){0} + INT64_MAX)))
#define splat(x) ((vd){0} + (double)(x))
#define ALL ((vl){0} - 1)
#define LIVE(c) (IOTA < (vl){0} + (C - (c)))  /* lanes inside the row */

#if W == 8
#define IOTA ((vl){0, 1, 2, 3, 4, 5, 6, 7})
#elif W == 4
#define IOTA ((vl){0, 1, 2, 3})
#elif W == 2
#define IOTA ((vl){0, 1})
#else
#define IOTA ((vl){0})
#endif

/* table[j] lane by lane, table of 8 (see CE_EXP2_HI) */
AI vd T(table8)(const double *table, vl j) {
#if W == 8
    vd t;
    memcpy(&t, table, sizeof t);
    return __builtin_shuffle(t, j);
#elif W == 4 && defined(__AVX2__)
    /* vpermps on the 32-bit halves: dwords (2 j, 2 j + 1) (mod 8) of both 4-entry halves, then
     * vblendvpd takes the upper half where j >= 4 (bit 2 of j shifted to the sign bit); the
     * same index work serves CE_EXP2_HI and CE_EXP2_LO */
    __m256i dup = _mm256_shuffle_epi32((__m256i)j, 0xA0);  /* j's low dword, twice */
    __m256i idx = _mm256_add_epi32(_mm256_add_epi32(dup, dup),
                                   _mm256_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1));
    __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps((const float *)table), idx);
    __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps((const float *)(table + 4)), idx);
    return (vd)_mm256_blendv_pd(_mm256_castps_pd(lo), _mm256_castps_pd(hi),
                                _mm256_castsi256_pd(_mm256_slli_epi64((__m256i)j, 61)));
#elif W == 4 && CE_HAVE_SHUFFLE
    vd t0, t1;
    memcpy(&t0, table, sizeof t0);
    memcpy(&t1, table + 4, sizeof t1);
    return __builtin_shuffle(t0, t1, j);
#else
    vd v;
    for (int i = 0; i < W; i++) v[i] = table[j[i]];
    return v;
#endif
}

/* exp(x) for x <= 0 (-inf too when not `normal`). x = (8e + j) ln2/8 + r with |r| <= ln2/16;
 * exp(x) = 2^e (T[j] + T[j] q(r)), q(r) = exp(r) - 1 to r^8 (remainder < 2e-18 relative),
 * T[j] = 2^(j/8) as hi + lo. Error below one ulp, like numpy's exp. `normal` (a constant):
 * the caller knows x >= -708, so the result is normal and 2^e one multiplication; otherwise
 * 2^e is applied in two steps (a subnormal result rounds once) and x < -745.2 gives 0.
 * No double <-> integer conversion: k comes from the bits of t (the 1.5 * 2^52 shifter) and
 * 2^e is built by integer operations on the exponent field, so every ISA keeps it in vectors. */
AI void T(vexp_neg_n)(vd *x, const int n, int normal) {
    /* n (a constant, 1 or 2) vectors in place, statement by statement: with 32 registers
     * (AVX-512) two independent chains keep twice the work in flight */
    const vd shift = splat(0x1.8p52);
    vd xc[2], t[2], r[2], r2[2], q[2], p[2];
    vu k[2], e[2];
#define EACH for (int i = 0; i < n; i++)
    EACH xc[i] = normal ? x[i] : sel(x[i] < splat(-746.0), splat(-746.0), x[i]);
    EACH t[i] = xc[i] * splat(0x1.71547652b82fep+3) + shift;   /* 8 / ln2 */
    EACH {
        vd kd = t[i] - shift;
        r[i] = (xc[i] - kd * splat(0x1.62e42fee00000p-4)) - kd * splat(0x1.a39ef35793c76p-36);
    }
    EACH r2[i] = r[i] * r[i];
    EACH {
        vd r4 = r2[i] * r2[i];
        vd a1 = splat(1.0 / 2) + splat(1.0 / 6) * r[i];
        vd a2 = splat(1.0 / 24) + splat(1.0 / 120) * r[i];
        vd a3 = splat(1.0 / 720) + splat(1.0 / 5040) * r[i] + splat(1.0 / 40320) * r2[i];
        q[i] = r[i] + r2[i] * ((a1 + a2 * r2[i]) + a3 * r4);
    }
    /* k = 8e + j in [-8612, 0], from t's low bits; the shifts act on k + 2^14 >= 0 */
    EACH k[i] = (vu)t[i] - (vu)shift + (1 << 14);
    EACH {
        vl j = (vl)(k[i] & 7);
        vd hi = T(table8)(CE_EXP2_HI, j);
        p[i] = hi + (T(table8)(CE_EXP2_LO, j) + hi * q[i]);
    }
    EACH e[i] = (k[i] >> 3) - (1 << 11) + 1023;  /* biased exponent of 2^e */
    if (normal) {
        EACH x[i] = p[i] * (vd)(e[i] << 52);
        return;
    }
    EACH {
        vu e1 = (e[i] + 1024) >> 1;  /* 2^ceil(e/2), biased: both factors stay normal */
        vd s1 = (vd)(e1 << 52);
        vd s2 = (vd)((e[i] - e1 + 1023) << 52);
        x[i] = sel(x[i] < splat(-745.2), splat(0.0), (p[i] * s1) * s2);
    }
#undef EACH
}

AI vd T(vexp_neg)(vd x, int normal) {
    T(vexp_neg_n)(&x, 1, normal);
    return x;
}

/* Lanes [c0, c0 + n) of a row as doubles, 1 <= n <= W; the rest repeat the first lane
 * (callers mask them). */
AI vd T(load_row)(const void *base, int is_f32, int64_t c0, int64_t n) {
    vd v;
    if (is_f32) {
        const float *p = (const float *)base + c0;
        if (n == W) {
            vf f;
            memcpy(&f, p, sizeof f);
#ifdef CE_CVT_PS_PD
            return (vd)CE_CVT_PS_PD(f);
#else
            return __builtin_convertvector(f, vd);
#endif
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
AI void T(store)(double *p, vd v, int64_t n) {
    if (n == W) memcpy(p, &v, sizeof v);
    else for (int i = 0; i < n; i++) p[i] = v[i];
}

/* The 8 accumulators acc[0..G), lane i of acc[k] being accumulator k W + i, pairwise:
 * ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) */
AI double T(hsum8)(const vd *acc) {
    double v[8];
    memcpy(v, acc, sizeof v);
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* 1 when any lane of mask m is set (CE_ANY: the target's own test instruction) */
AI int T(any)(vl m) {
#ifdef CE_ANY
    return CE_ANY(m);
#elif W == 1
    return m[0] != 0;
#else
    int64_t bits = 0;
    for (int i = 0; i < W; i++) bits |= m[i];
    return bits != 0;
#endif
}

/* a > b ? a : b lane by lane (CE_MAXPD: the target's max instruction, which is exactly that) */
AI vd T(vmax)(vd a, vd b) {
#ifdef CE_MAXPD
    return (vd)CE_MAXPD(a, b);
#else
    return sel(a > b, a, b);
#endif
}

/* 1 when d < a and d < b in every lane (CE_ALL_LT2: the target's own mask test) */
AI int T(all_lt2)(vd d, vd a, vd b) {
#ifdef CE_ALL_LT2
    return CE_ALL_LT2(d, a, b);
#else
    return !T(any)(~((d < a) & (d < b)));
#endif
}

AI double T(hmax)(vd v) {
    double m = v[0];
    for (int i = 1; i < W; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* The comparison with the user's gradient row (a->g), shared by the row kernels: BEGIN sets
 * up row r's state, CE_COMPARE(c, live, n, g, fl) stores the reference g, its floor fl and the
 * allowed error tol = (|g| rtol + abs_tol) + fl of lanes [c, c + n) and folds |got - g| / tol
 * into the row's statistics, END writes them (numpy's Comparison.update, entry by entry). */
#define CE_COMPARE_BEGIN                                                         \
    const vd rtol = splat(a->rtol), abs_tol = splat(a->abs_tol), one = splat(1.0); \
    vd v_ratio = splat(0.0), v_abs = splat(0.0), v_rel = splat(0.0), v_lim = v_ratio; \
    vl v_mis = (vl){0}, v_nf = (vl){0}, v_fl = (vl){0};                         \
    const vd v_fmin = splat(a->flush_min), v_fpart = splat(a->flush_partial);   \
    const vd v_ftiny = splat(a->flush_tiny);                                    \
    const void *gu = a->g ? (const char *)a->g + (size_t)(r * C) * (g32 ? 4 : 8) : NULL
#define CE_COMPARE(c, live, n, g, fl) do {                                   \
        vd absg = vabs(g);                                                    \
        vd tol = (absg * rtol + abs_tol) + (fl);                              \
        if (a->out_ref) T(store)(a->out_ref + r * C + (c), g, n);             \
        if (a->out_floor) T(store)(a->out_floor + r * C + (c), fl, n);        \
        if (a->out_tol) T(store)(a->out_tol + r * C + (c), tol, n);           \
        if (gu) CE_COMPARE_FOLD(c, live, n, g, absg, tol, a->out_ratio);       \
    } while (0)
/* The statistics part of CE_COMPARE (gu given): want_ratio, a constant 0 when no ratios are
 * stored, lets a specialised loop drop that test.
 * Only lanes whose divisions can change the row's statistics need them: odd ones, and those
 * where d / tol may exceed v_lim = min(v_ratio, 1) (a new maximum or a mismatch) or d / |g|
 * may exceed v_rel. Both divisions round monotonically and v_lim, v_rel are doubles, so
 * d < fl(v_lim tol) gives v_lim tol > d, d / tol <= v_lim and fl(d / tol) <= v_lim: the
 * division cannot change anything (likewise for rel); it also says d is finite and tol > 0.
 * A vector where every lane (live or not) passes both tests skips the divisions; any other
 * (a NaN product included) is computed exactly as before. */
#define CE_COMPARE_FOLD(c, live, n, g, absg, tol, want_ratio) do {            \
        vd yours = T(load_row)(gu, g32, c, n), d = vabs(yours - (g));         \
        if ((want_ratio) || !T(all_lt2)(d, v_lim * (tol), v_rel * (absg))) {  \
            vl odd = (live) & ~(d <= splat(1.7976931348623157e308));          \
            vd ratio = sel(odd, splat(INFINITY), d / (tol));                  \
            if (a->flushed) {  /* flush-to-zero: see ce_args.flush_min */     \
                vl fl = (live) & (ratio > one)                                \
                        & ((((absg) < v_fmin) & (yours == splat(0.0))) | (d <= v_fpart)); \
                v_fl -= fl & ((absg) > v_ftiny);                              \
                d = sel(fl, splat(0.0), d);                                   \
                ratio = sel(fl, splat(0.0), ratio);                           \
            }                                                                 \
            ratio = sel(live, ratio, splat(0.0));                             \
            v_nf -= odd;                                                      \
            v_mis -= (live) & (ratio > one);                                  \
            v_ratio = sel(ratio > v_ratio, ratio, v_ratio);                   \
            v_lim = sel(v_ratio < one, v_ratio, one);                         \
            vd rel = sel((live) & (d == d) & ((g) != 0), d / (absg), splat(0.0)); \
            v_rel = sel(rel > v_rel, rel, v_rel);                             \
            if (want_ratio) T(store)(a->out_ratio + r * C + (c), ratio, n);   \
        }                                                                     \
        v_abs = sel(live, T(vmax)(d, v_abs), v_abs);                          \
    } while (0)
#define CE_COMPARE_END do {                                                  \
        if (!gu) return 0;                                                    \
        int64_t mis = 0, nf = 0, nfl = 0;                                     \
        for (int i = 0; i < W; i++) {                                         \
            mis += v_mis[i];                                                  \
            nf += v_nf[i];                                                    \
            nfl += v_fl[i];                                                   \
        }                                                                     \
        if (a->flushed) a->flushed[r] = nfl;                                  \
        a->ratio_max[r] = T(hmax)(v_ratio);                                   \
        a->max_abs[r] = T(hmax)(v_abs);                                       \
        a->max_rel[r] = T(hmax)(v_rel);                                       \
        a->mismatches[r] = mis;                                               \
        a->nonfinite[r] = nf;                                                 \
    } while (0)

/* log1p(e) for 0 <= e <= 1, fdlibm's log1p (error below 1 ulp) without its branches, given
 * u = 1 + e (rounded) and r = 1 / u (rounded; the sigmoids' division, shared):
 * 1 + e = 2^k (1 + f) with k = [u >= sqrt 2], f exact (f = e, or u/2 - 1 by Sterbenz), and
 * c/u (c = e - (u - 1), exact: the rounding of 1 + e) as c r when k = 1 (c r is below
 * ulp(log1p(e)) / 2, so r's rounding moves it by less than 2^-53 of that); with
 * s = f / (2 + f), log1p(f) = f - f^2/2 + s (f^2/2 + R(s^2)), R fdlibm's minimax polynomial
 * (error < 2^-58), and ln 2 in two parts. */
AI vd T(vlog1p_ur)(vd e, vd u, vd r) {
    vl k = u >= splat(0x1.6a09e667f3bcdp+0);
    vd f = sel(k, u * splat(0.5) - splat(1.0), e);
    vd c = sel(k, (e - (u - splat(1.0))) * r, splat(0.0));
    vd kd = sel(k, splat(1.0), splat(0.0));
    vd s = f / (splat(2.0) + f);
    vd z = s * s, w = z * z;
    vd t1 = w * (splat(3.999999999940941908e-01) + w * (splat(2.222219843214978396e-01)
                 + w * splat(1.531383769920937332e-01)));
    vd t2 = z * (splat(6.666666666666735130e-01) + w * (splat(2.857142874366239149e-01)
                 + w * (splat(1.818357216161805012e-01) + w * splat(1.479819860511658591e-01))));
    vd R = t2 + t1, hfsq = splat(0.5) * f * f;
    return kd * splat(6.93147180369123816490e-01)
           - ((hfsq - (s * (hfsq + R) + (kd * splat(1.90821492927058770002e-10) + c))) - f);
}

/* log1p(e) for 0 <= e <= 1 (vlog1p_ur with its own u and r) */
AI vd T(vlog1p_unit)(vd e) {
    vd u = splat(1.0) + e;
    return T(vlog1p_ur)(e, u, splat(1.0) / u);
}

/* numpy's pairwise sum of a row of n entries (float32 widened when is_f32), in numpy's order
 * (loops_utils.h: n < 8 from 0 one by one; n <= 128 eight accumulators, entry i into i % 8,
 * combined ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)), then the rest one by one; else
 * the halves at n/2 rounded down to a multiple of 8), so the bits are np.sum(row)'s; with
 * `absv`, np.abs(row).sum()'s. */
static double T(np_pairwise)(const void *base, int is_f32, int64_t c0, int64_t n, int absv) {
#define LOAD_AT(c, nn) (absv ? vabs(T(load_row)(base, is_f32, c, nn))                 \
                            : T(load_row)(base, is_f32, c, nn))
    if (n < 8) {
        double res = 0.0;
        for (int64_t i = 0; i < n; i++) res += LOAD_AT(c0 + i, 1)[0];
        return res;
    }
    if (n <= 128) {
        vd acc[G];
        for (int k = 0; k < G; k++) acc[k] = LOAD_AT(c0 + k * W, W);
        int64_t i = 8;
        for (; i < n - n % 8; i += 8)
            for (int k = 0; k < G; k++) acc[k] += LOAD_AT(c0 + i + k * W, W);
        double res = T(hsum8)(acc);
        for (; i < n; i++) res += LOAD_AT(c0 + i, 1)[0];
        return res;
    }
#undef LOAD_AT
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return T(np_pairwise)(base, is_f32, c0, n2, absv)
           + T(np_pairwise)(base, is_f32, c0 + n2, n - n2, absv);
}

/* expm1(x) and exp(x) for x <= 0 (-inf too), from one argument reduction as in vexp_neg:
 * exp(x) = s (T + T q) with s = 2^e, T = hi + lo; expm1(x) = (s hi - 1) + s (lo + hi q), where
 * s hi - 1 is exact for s hi in [1/2, 2] (Sterbenz) and the rest is small next to the result,
 * so no cancellation near 0 (k = 0: expm1 = q). expm1 is -1 below -40 (exp(-40) < ulp(1)/2),
 * exp takes vexp_neg's two-step scaling (subnormal results, 0 below -745.2). */
AI void T(vexpm1_exp_neg)(vd x, vd *em, vd *ex) {
    const vd shift = splat(0x1.8p52);
    vd xc = sel(x < splat(-746.0), splat(-746.0), x);
    vd t = xc * splat(0x1.71547652b82fep+3) + shift;
    vd kd = t - shift;
    vd r = (xc - kd * splat(0x1.62e42fee00000p-4)) - kd * splat(0x1.a39ef35793c76p-36);
    vd r2 = r * r, r4 = r2 * r2;
    vd a1 = splat(1.0 / 2) + splat(1.0 / 6) * r;
    vd a2 = splat(1.0 / 24) + splat(1.0 / 120) * r;
    vd a3 = splat(1.0 / 720) + splat(1.0 / 5040) * r + splat(1.0 / 40320) * r2;
    vd q = r + r2 * ((a1 + a2 * r2) + a3 * r4);
    vu k = (vu)t - (vu)shift + (1 << 14);
    vl j = (vl)(k & 7);
    vd hi = T(table8)(CE_EXP2_HI, j), lo = T(table8)(CE_EXP2_LO, j);
    vd p = hi + (lo + hi * q);
    vu e = (k >> 3) - (1 << 11) + 1023;
    vd s = (vd)(e << 52);  /* 2^e, normal where x >= -708 */
    if (T(any)(x < splat(-708.0))) {  /* subnormal or 0 somewhere: in two steps, as vexp_neg */
        vu e1 = (e + 1024) >> 1;
        vd s1 = (vd)(e1 << 52), s2 = (vd)((e - e1 + 1023) << 52);
        *ex = sel(x < splat(-745.2), splat(0.0), (p * s1) * s2);
    } else {
        *ex = p * s;  /* the same bits: the result is normal */
    }
    *em = sel(x < splat(-40.0), splat(-1.0), (s * hi - splat(1.0)) + s * (lo + hi * q));
}

/* Soft-capping of raw logits x (numpy_softmax.transform): u = x (S / cap) (numpy: (S x) / cap,
 * within an ulp; a division saved), z = cap tanh(u), dz = S sech^2(u), with e = expm1(-2|u|),
 * t = exp(-2|u|): tanh|u| = -e / (2 + e) and sech^2 = 4 t / (2 + e)^2 (2 + e = 1 + t), no
 * cancellation at any |u|; -inf gives z = -cap, dz = 0, as numpy's tanh and cosh do. */
AI void T(vsoftcap)(vd x, vd vs, vd cap, vd s_cap, vd *z, vd *dz) {
    vd u = x * s_cap;
    vd em, t;
    T(vexpm1_exp_neg)(splat(-2.0) * vabs(u), &em, &t);
    vd inv = splat(1.0) / (splat(2.0) + em);
    vd th = -em * inv;
    *z = cap * sel(u < splat(0.0), -th, th);
    *dz = vs * ((splat(4.0) * t) * (inv * inv));
}

/* Lanes [c, c + n) of softcap_row (n a constant W in the body: whole-vector loads and stores). */
AI void T(softcap_step)(const void *x, int x32, int64_t c, int64_t n, vd vs, vd vcap, vd s_cap,
                        double *zb, double *db, vl *bad, vl *fin) {
    vd v = T(load_row)(x, x32, c, n), z, dz;
    *bad |= (v != splat(-INFINITY)) & ~(v - v == splat(0.0));
    *fin |= v != splat(-INFINITY);
    T(vsoftcap)(v, vs, vcap, s_cap, &z, &dz);
    T(store)(zb + c, z, n);
    T(store)(db + c, dz, n);
}

/* Row r's raw logits x through the soft-cap into zb (z) and db (dz), C entries: 1 when the row
 * holds a NaN or +inf or only -inf (handed back, as the numpy kernel reports those). */
static int T(softcap_row)(const void *x, int x32, int64_t C, double S, double cap, double *zb,
                          double *db) {
    const vd vs = splat(S), vcap = splat(cap), s_cap = splat(S / cap);
    vl bad = (vl){0}, fin = (vl){0};
    const int64_t body = C - C % W;
    if (x32) {
        for (int64_t c = 0; c < body; c += W)
            T(softcap_step)(x, 1, c, W, vs, vcap, s_cap, zb, db, &bad, &fin);
    } else {
        for (int64_t c = 0; c < body; c += W)
            T(softcap_step)(x, 0, c, W, vs, vcap, s_cap, zb, db, &bad, &fin);
    }
    if (body < C) T(softcap_step)(x, x32, body, C - body, vs, vcap, s_cap, zb, db, &bad, &fin);
    return T(any)(bad) || !T(any)(fin);
}

/* z = cap tanh(x / cap) and sech^2(x / cap) (S = 1) as the row kernels compute them, for the
 * tests' ulp measurement against numpy. */
CE_ENTRY void T(cap_funcs)(const double *x, double cap, double *out_z, double *out_dz, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        vd z, dz;
        T(vsoftcap)(splat(x[i]), splat(1.0), splat(cap), splat(1.0 / cap), &z, &dz);
        out_z[i] = z[0];
        out_dz[i] = dz[0];
    }
}

/* out[i] = exp(-|x[i]|) and log1p of it, the row kernels' own functions (for the tests). */
CE_ENTRY void T(unit_funcs)(const double *x, double *out_exp, double *out_log1p, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        vd e = T(vexp_neg)(-vabs(splat(x[i])), 0);
        out_exp[i] = e[0];
        out_log1p[i] = T(vlog1p_unit)(e)[0];
    }
}

/* Pass 1 of a float32 row in float32 lanes (2W per vector; comparisons are exact in float32):
 * over the first entries [0, returned count), a multiple of 2W, the maximum *mx, its first
 * index *am, the minimum *mn, and *bad = 1 when one of them is NaN or +inf. */
static inline int64_t T(scan_f32)(const float *zf, int64_t C, double *mx, double *mn,
                                  int64_t *am, int *bad) {
    const int64_t body = C < INT32_MAX ? C - C % (2 * W) : 0;
    vf2 fmax = (vf2){0} - INFINITY, fmin = (vf2){0} + INFINITY;
    vi2 nan = (vi2){0}, fidx = (vi2){0}, cur;
    for (int i = 0; i < 2 * W; i++) cur[i] = i;
    for (int64_t c = 0; c < body; c += 2 * W) {
        vf2 v;
        memcpy(&v, zf + c, sizeof v);
        nan |= v != v;
        vi2 gt = v > fmax;
        vi2 lt = v < fmin;
        fmax = (vf2)(((vi2)v & gt) | ((vi2)fmax & ~gt));
        fidx = (cur & gt) | (fidx & ~gt);
        fmin = (vf2)(((vi2)v & lt) | ((vi2)fmin & ~lt));
        cur += 2 * W;
    }
    float m = -INFINITY, lo = INFINITY;
    int32_t any_nan = 0;
    for (int i = 0; i < 2 * W; i++) {
        m = fmax[i] > m ? fmax[i] : m;
        lo = fmin[i] < lo ? fmin[i] : lo;
        any_nan |= nan[i];
    }
    int64_t first = 0;
    if (m > -INFINITY) {
        first = C;
        for (int i = 0; i < 2 * W; i++)
            if (fmax[i] == m && fidx[i] < first) first = fidx[i];
    }
    *mx = m;
    *mn = lo;
    *am = first;
    *bad = any_nan != 0 || m == INFINITY;
    return body;
}

/* Row r's loss with raw logit c set to x, for each of its steps (ce_args.step_cols,
 * step_vals), from the row's logits z (transformed: ext), exps e_row and block sums keep (nb
 * of exp, then nb of the z sum): v = T(x) as row_ext_x makes it, c's block summed again in pass
 * 2's order (accumulator c % 8, the arg-max left out, the order within a block does not depend
 * on the target), the pairwise sum over blocks, and the loss as row_body forms it. When v < m
 * and c is not the arg-max, the row with x in place has the same maximum, arg-max and other
 * exps (a non-normal exp takes the two-step path, which gives the same bits for normal
 * results), so these are the bits row_pert gives; NaN for the other steps. */
static __attribute__((noinline)) void T(row_steps)(
        const ce_args *a, int64_t r, const void *z, int z32, const double *e_row,
        double *keep, int64_t nb, double m, int64_t am, int64_t y, double alpha,
        double beta, const void *qrow, int q32, double Q, int ext) {
    const int64_t C = a->n_cols, K = a->n_steps;
    const double *w = a->w;
    const double S = a->x_scale, cap = a->softcap;
    double *tmp = keep + 2 * nb;  /* after the kept sums: a copy the pairwise sum works in */
    const int zsum = qrow || beta != 0.0;
    for (int64_t k = r * K; k < (r + 1) * K; k++) {
        const int64_t c = a->step_cols[k];
        double v = a->step_vals[k];
        if (ext && cap != 0.0) {
            vd zc, dz;
            T(vsoftcap)(splat(v), splat(S), splat(cap), splat(S / cap), &zc, &dz);
            v = zc[0];
        } else if (ext && S != 1.0) {
            v = v * S;
        }
        if (c < 0 || c == am || !(v < m)) {
            a->step_loss[k] = NAN;
            continue;
        }
        const double ec = T(vexp_neg)(splat(v - m), 0)[0];
        const int64_t b = c / BLOCK, b1 = (b + 1) * BLOCK < C ? (b + 1) * BLOCK : C;
        double acc_e[8] = {0.0}, acc_z[8] = {0.0};
        for (int64_t cc = b * BLOCK; cc < b1; cc++) {
            if (cc == am) continue;
            acc_e[cc & 7] += cc == c ? ec : e_row[cc];
            if (!zsum) continue;
            const double zs = cc == c ? v - m : T(load_row)(z, z32, cc, 1)[0] - m;
            const double qw = qrow ? T(load_row)(qrow, q32, cc, 1)[0] : w ? w[cc] : 1.0;
            acc_z[cc & 7] += qw != 0.0 ? qw * zs : 0.0;  /* 0 * -inf: 0 */
        }
        memcpy(tmp, keep, (size_t)nb * sizeof *tmp);
        tmp[b] = ((acc_e[0] + acc_e[1]) + (acc_e[2] + acc_e[3]))
                 + ((acc_e[4] + acc_e[5]) + (acc_e[6] + acc_e[7]));
        const double l1 = log1p(ce_pairwise(tmp, nb));
        double sum_z = 0.0;
        if (zsum) {
            memcpy(tmp, keep + nb, (size_t)nb * sizeof *tmp);
            tmp[b] = ((acc_z[0] + acc_z[1]) + (acc_z[2] + acc_z[3]))
                     + ((acc_z[4] + acc_z[5]) + (acc_z[6] + acc_z[7]));
            sum_z = ce_pairwise(tmp, nb);
        }
        const double zy = (c == y ? v : T(load_row)(z, z32, y, 1)[0]) - m;
        double qz = alpha != 0.0 ? alpha * zy : 0.0;
        if (beta != 0.0) qz = qz + beta * sum_z;
        if (qrow) qz = sum_z;
        if (!ext) {
            a->step_loss[k] = a->active[r] ? Q * l1 - qz : 0.0;
            continue;
        }
        const double lse = m + l1;
        double loss_z = (Q * l1 - qz) + 0.0 * m;
        if (a->z_loss != 0.0) loss_z = loss_z + a->z_loss * (a->active[r] ? 1.0 : 0.0) * lse * lse;
        a->step_loss[k] = a->active[r] ? (a->s_w ? a->s_w[r] : 1.0) * loss_z : 0.0;
    }
}

/* One row. Returns 0, or 1 when the row holds a NaN or +inf logit or is all -inf (the numpy
 * kernel reports those); -inf entries (masks) are served. z32/g32 are constants at
 * each call site, so the loops are compiled once per dtype pair; the last, partial vector of a
 * row goes through the same code with a lane mask. `work`: this thread's ce_args.work. */
AI int T(row_body)(const ce_args *a, double *work, int64_t r, int z32, int g32, int ext,
                  int buf, const double *zrow, const double *dzrow) {
    const int64_t C = a->n_cols;
    const int64_t body = C - C % W, tail = C - body;      /* vectors of W */
    const int64_t body8 = C - C % 8, tail8 = C - body8;   /* groups of 8 accumulators */
    /* Constants: ext, a row with training-code terms (a->ext); buf, the row's z in doubles
     * (zrow) made by row_ext, z = S x or soft-capped with dz/dx (dzrow), which the passes below
     * read as they read the logits otherwise. The plain row (neither) keeps none of their code
     * in its loops. */
    const void *z = buf ? (const void *)zrow
                        : (const char *)a->z + (size_t)(r * C) * (z32 ? 4 : 8);
    double *e_row = work;

    /* pass 1: max, min and first arg-max per lane; z - z is NaN at NaN and +-inf, and -inf
     * (a mask) is let through */
    const vd neg_inf = splat(-INFINITY);
    vd vmax = splat(-INFINITY), vmin = splat(INFINITY), vbad = splat(0.0);
    vl vidx = (vl){0};
    int64_t c1 = 0;  /* float32 rows: the body in float32 lanes, then the rest as below */
    if (z32) {
        double f_max, f_min;
        int64_t f_am;
        int f_bad;
        c1 = T(scan_f32)((const float *)z, C, &f_max, &f_min, &f_am, &f_bad);
        if (f_bad) return 1;
        vmax = splat(f_max);  /* every lane holds the state so far; later entries win */
        vmin = splat(f_min);  /* only when strictly greater, so ties keep f_am */
        vidx = (vl){0} + f_am;
    }
#define PASS1(c, live, nn) do {                                                  \
        vd v = T(load_row)(z, z32, c, (nn));                                  \
        vbad += sel((live) & (v != neg_inf), v - v, splat(0.0));              \
        vl gt = (live) & (v > vmax);                                          \
        vmax = sel(gt, v, vmax);                                              \
        vmin = sel((live) & (v < vmin), v, vmin);                             \
        vidx = (vl)sel(gt, (vd)(IOTA + (c)), (vd)vidx);                       \
    } while (0)
    for (int64_t c = c1; c < body; c += W) PASS1(c, ALL, W);
    if (tail) PASS1(body, LIVE(body), tail);
    double bad = vbad[0];
    for (int i = 1; i < W; i++) bad += vbad[i];
    if (bad != 0.0) return 1;
    const double vm_max = T(hmax)(vmax);
    if (vm_max == -INFINITY) return 1;
    double lo = vmin[0];
    for (int i = 1; i < W; i++) lo = vmin[i] < lo ? vmin[i] : lo;
    int64_t am = C;
    for (int i = 0; i < W; i++)
        if (vmax[i] == vm_max && vidx[i] < am) am = vidx[i];
    /* the first maximal entry itself: the sign of a zero maximum does not depend on W */
    const double m = z32 ? (double)((const float *)z)[am] : ((const double *)z)[am];
    const int normal = lo - m >= -708.0;  /* every exp(z - m) is a normal number */
    /* ext: the largest |z| over the finite entries (numpy: where(isfinite(z), |z|, 0).max) */
    if (ext && lo > -INFINITY) {
        a->row_zabs[r] = fabs(m) > fabs(lo) ? fabs(m) : fabs(lo);
    } else if (ext) {
        double zabs = 0.0;
        for (int64_t c = 0; c < C; c++) {
            const double v = T(load_row)(z, z32, c, 1)[0];
            if (v != -INFINITY && fabs(v) > zabs) zabs = fabs(v);
        }
        a->row_zabs[r] = zabs;
    }

    /* probability targets: q (dense, alpha = beta = 0, y = 0); else index targets */
    const int q32 = (int)a->q_is_f32;
    const void *qrow = a->q ? (const char *)a->q + (size_t)(r * C) * (q32 ? 4 : 8) : NULL;
    const double alpha = qrow ? 0.0 : a->alpha[r], beta = qrow ? 0.0 : a->beta[r];
    const int64_t y = qrow ? 0 : a->ys[r];
    const double *w = a->w;
    const vd vm = splat(m);
    const vl vam = (vl){0} + am;
    /* pass 2: e = exp(z - m) (0 at the arg-max), s1 = sum e; sum (z - m) w for smoothing.
     * 8 accumulators over blocks of 128 entries (entry c in accumulator c % 8), then pairwise
     * over blocks. */
    vd acc_e[G], acc_z[G];
    for (int k = 0; k < G; k++) acc_e[k] = acc_z[k] = splat(0.0);
    double *blk_e = e_row + C + 8, *blk_z = blk_e + C / BLOCK + 1;
    /* pass 2 computes while the memory is idle: it brings the row of g (read in pass 3) into
     * the caches, 64 bytes (one line) per group of 8 entries at most */
    const char *g_pf = a->g ? (const char *)a->g + (size_t)(r * C) * (g32 ? 4 : 8) : NULL;
    int64_t nb = 0;
#define PASS2(k, c, live, nn, nrm, zm) do {                                  \
        vd zs = T(load_row)(z, z32, c, nn);                                   \
        zs = zs - vm;                                                         \
        PASS2_ACC(k, c, live, nn, zm, T(vexp_neg)(zs, nrm), zs);              \
    } while (0)
/* e = exp(zs) of lanes [c, c + nn) (0 where not live) to e_row and the sums */
#define PASS2_ACC(k, c, live, nn, zm, ex, zs) do {                            \
        vd e = sel(live, ex, splat(0.0));                                     \
        memcpy(e_row + (c), &e, sizeof e);                                    \
        acc_e[k] += e;                                                        \
        if ((zm) == 1) {  /* probability targets: q . (z - m), 0 * -inf: 0 */ \
            vd qv = T(load_row)(qrow, q32, c, nn);                            \
            acc_z[k] += sel((live) & (qv != 0), qv * zs, splat(0.0));         \
        } else if ((zm) == 2) {  /* smoothing: w . (z - m) */                 \
            vd wv = w ? T(load_row)(w, 0, c, nn) : splat(1.0);               \
            vd wz = sel(wv != 0, wv * zs, splat(0.0));  /* 0 * -inf: 0 */     \
            acc_z[k] += sel(live, wz, splat(0.0));                            \
        }                                                                     \
    } while (0)
    /* the arg-max's group masks its lane out of the sum; every other full group needs no mask */
    const int64_t am_grp = am - am % 8;
#define PASS2_BLOCK(c) do {  /* after group c: a block's sums */              \
        if (((c) & (BLOCK - 1)) == BLOCK - 8) {                                \
            blk_e[nb] = T(hsum8)(acc_e);                                       \
            blk_z[nb++] = T(hsum8)(acc_z);                                     \
            for (int k = 0; k < G; k++) acc_e[k] = acc_z[k] = splat(0.0);      \
        }                                                                      \
    } while (0)
#define PASS2_ROW(nrm, zm) do {                                              \
        int64_t c = 0;                                                         \
        /* one vector per group (AVX-512): two groups' exps at once, in order after */ \
        for (; G == 1 && c + 16 <= body8; c += 16) {                           \
            vd xs[2], zs2[2];                                                  \
            for (int h = 0; h < 2; h++) {                                      \
                if (g_pf) __builtin_prefetch(g_pf + (c + 8 * h) * (g32 ? 4 : 8)); \
                xs[h] = T(load_row)(z, z32, c + 8 * h, W);                     \
                xs[h] = zs2[h] = xs[h] - vm;                                   \
            }                                                                  \
            T(vexp_neg_n)(xs, 2, nrm);                                         \
            for (int h = 0; h < 2; h++) {                                      \
                const int64_t ch = c + 8 * h;                                  \
                if (ch == am_grp) PASS2_ACC(0, ch, IOTA + ch != vam, W, zm, xs[h], zs2[h]); \
                else PASS2_ACC(0, ch, ALL, W, zm, xs[h], zs2[h]);              \
                PASS2_BLOCK(ch);                                               \
            }                                                                  \
        }                                                                      \
        for (; c < body8; c += 8) {                                            \
            if (g_pf) __builtin_prefetch(g_pf + c * (g32 ? 4 : 8));           \
            if (c == am_grp) {                                                 \
                for (int k = 0; k < G; k++)                                    \
                    PASS2(k, c + k * W, IOTA + (c + k * W) != vam, W, nrm, zm); \
            } else {                                                           \
                for (int k = 0; k < G; k++) PASS2(k, c + k * W, ALL, W, nrm, zm); \
            }                                                                  \
            PASS2_BLOCK(c);                                                    \
        }                                                                      \
        for (int k = 0; k < G && k * W < tail8; k++) {                         \
            const int64_t c = body8 + k * W;                                   \
            PASS2(k, c, LIVE(c) & (IOTA + c != vam),                           \
                  tail8 - k * W < W ? tail8 - k * W : W, nrm, zm);             \
        }                                                                      \
    } while (0)
    /* the kind of z sum (none, q, w) as one integer: GCC moves its test out of the loop */
    const int zmode = qrow ? 1 : beta != 0.0 ? 2 : 0;
    if (normal) PASS2_ROW(1, zmode);
    else PASS2_ROW(0, zmode);
    if (C % BLOCK) {
        blk_e[nb] = T(hsum8)(acc_e);
        blk_z[nb++] = T(hsum8)(acc_z);
    }
    /* the row's finite-difference steps start from its block sums, which the pairwise sums
     * below overwrite: kept apart */
    double *keep = a->step_cols ? e_row + STEP_SCRATCH(C) : NULL;
    if (keep) {
        memcpy(keep, blk_e, (size_t)nb * sizeof *keep);
        memcpy(keep + nb, blk_z, (size_t)nb * sizeof *keep);
    }
    const double sum_e = ce_pairwise(blk_e, nb);
    const double sum_z = beta != 0.0 || qrow ? ce_pairwise(blk_z, nb) : 0.0;
    e_row[am] = 1.0;
    const double s1 = sum_e, s = 1.0 + s1, l1 = log1p(s1), lse = m + l1;
    double Q = alpha + beta * a->w_sum;
    /* numpy's reduction adds the sum to its identity, +0: a row of -0 sums to +0 */
    if (qrow && a->q_sum_here) a->q_total[r] = 0.0 + T(np_pairwise)(qrow, q32, 0, C, 0);
    if (ext && qrow) {  /* row_terms' max |q| and sum |q| (numpy's np.abs(q).sum's bits) */
        vd qmax = splat(0.0);
        for (int64_t c = 0; c < C; c += W)
            qmax = T(vmax)(vabs(T(load_row)(qrow, q32, c, C - c < W ? C - c : W)), qmax);
        a->row_qabs[r] = T(hmax)(qmax);
        a->row_qsum[r] = 0.0 + T(np_pairwise)(qrow, q32, 0, C, 1);
    }
    if (qrow) Q = a->q_total[r];
    const double zy = (z32 ? (double)((const float *)z)[y] : ((const double *)z)[y]) - m;
    double qz = alpha != 0.0 ? alpha * zy : 0.0;
    if (beta != 0.0) qz = qz + beta * sum_z;
    if (qrow) qz = sum_z;
    /* ext (semantic_rows): s (Q l1 - q.zs + zeta v lse^2), Qe = Q + 2 zeta v lse what
     * multiplies a in the gradient */
    double Qe = Q, sw = 1.0;
    if (ext) {
        const double v = a->active[r] ? 1.0 : 0.0;
        double loss_z = (Q * l1 - qz) + 0.0 * m;  /* numpy's + rest m, rest = 0 without shards */
        if (a->z_loss != 0.0) {
            loss_z = loss_z + a->z_loss * v * lse * lse;
            Qe = Q + 2.0 * a->z_loss * v * lse;
        }
        sw = a->s_w ? a->s_w[r] : 1.0;
        a->loss[r] = a->active[r] ? sw * loss_z : 0.0;
        a->total_w[r] = sw * Qe;
    } else {
        a->loss[r] = a->active[r] ? Q * l1 - qz : 0.0;
    }
    a->row_max[r] = m;
    a->log1p_s1[r] = l1;
    if (keep) T(row_steps)(a, r, z, z32, e_row, keep, nb, m, am, y, alpha, beta, qrow, q32, Q, ext);
    if (!a->g && !a->out_ref && !a->out_floor && !a->pick_cols) return 0;

    /* pass 3: reference gradient, floor, comparison, in the numpy kernel's operation order:
     *   g = e * (Q scale / s) - (beta scale) w - [c = y] alpha scale
     *   floor = ((1 + l1 + lam |lse|) - zs) e (k eps scale |Q| / s) + (k eps scale |beta|) |w|
     *           + [c = y] k eps scale |alpha|
     * and at a confident row's arg-max (s1 <= 1) g = scale (rest - Q s1 / s).
     * ext (numpy_softmax._semantic_grad_z, _semantic_floor): every term times s scale S,
     * Q / s -> Qe exp(-l1), the floor's log a term plus |z|, and at a confident row's arg-max
     * (l1 <= log 2) g = (Qe expm1(-l1) + rest) s scale S. */
    const int cap = buf && a->softcap != 0.0;  /* per-entry dz (it holds S) */
    const double coef = a->floor_coef, gS = cap ? 1.0 : a->x_scale;
    const double scale = ext ? sw * a->scale * gS : a->scale;
    const double fscale = ext ? coef * fabs(sw * a->scale) * gS : coef * a->scale;
    const double k_fcap = coef * a->x_scale * CE_SOFTCAP_DERIV_ERR;
    const double ex = ext ? exp(-l1) : 0.0;
    const double k_g = ext ? Qe * ex * scale : Q * scale / s;
    const double k_b = beta * scale, k_a = alpha * scale;
    const double k_f = ext ? fscale * fabs(Qe) * ex : fscale * fabs(Q) / s;
    const double k_fb = fscale * fabs(beta);
    const double k_fa = fscale * fabs(alpha), big_a = (1.0 + l1) + a->lse_weight * fabs(lse);
    const double w_am = w ? w[am] : 1.0;
    const double rest_q = qrow ? Qe - T(load_row)(qrow, q32, am, 1)[0]
                               : (am != y ? alpha : 0.0) + beta * (a->w_sum - w_am);
    const double rest = ext && !qrow ? rest_q + (Qe - Q) : rest_q;
    const double k_fq = fscale;
    const double g_am = ext ? (Qe * expm1(-l1) + rest) * scale : scale * (rest - Q * s1 / s);
    const int sure = ext ? l1 <= 0x1.62e42fefa39efp-1 : s1 <= 1.0;  /* log 2 */
    const vl vy = (vl){0} + y;
    const vd vk_g = splat(k_g), vbig_a = splat(big_a), vk_f = splat(k_f);
    const vd vscale = splat(scale), vk_fq = splat(k_fq);  /* not remade in the loops */
    const vd vk_b = splat(k_b), vk_fb = splat(k_fb), vk_fcap = splat(k_fcap);
    CE_COMPARE_BEGIN;
/* g and fl of lanes [c, c + n). qq (probability targets), q32c (their width), kw (k_b or k_fb
 * may be nonzero), nrm (normal) and xt (ext) are loop invariants: constants in the specialised
 * loops. */
#define PASS3_GF(c, n, spec, qq, q32c, kw, nrm, xt)                            \
        vl ids = IOTA + (c);                                                  \
        vd e, qv = splat(0.0), wv = (kw) && w ? T(load_row)(w, 0, c, n) : one; \
        memcpy(&e, e_row + (c), sizeof e);                                    \
        vd zz = T(load_row)(z, z32, c, n);                                    \
        vd zs = zz - vm;                                                      \
        vd g = e * vk_g;                                                      \
        if ((kw) && k_b != 0.0) g = g - vk_b * wv;                            \
        if (qq) qv = T(load_row)(qrow, q32c, c, n);                           \
        if (qq) g = g - qv * vscale;                                          \
        if ((spec) && !(qq)) g = sel(ids == vy, g - splat(k_a), g);           \
        if ((spec) && sure) g = sel(ids == vam, splat(g_am), g);              \
        vd fl = (xt) ? (((vbig_a - zs) + vabs(zz)) * e) * vk_f                \
                     : ((vbig_a - zs) * e) * vk_f;                            \
        if (!(nrm)) fl = sel(e == 0, splat(0.0), fl);  /* inf * 0 at -inf */  \
        if ((kw) && k_fb != 0.0) fl = fl + vk_fb * vabs(wv);                  \
        if (qq) fl = fl + vk_fq * vabs(qv);                                   \
        if ((spec) && !(qq)) fl = sel(ids == vy, fl + splat(k_fa), fl);        \
        if ((xt) == 2) {  /* soft-cap: times dz, and the floor's S |g_z| term */ \
            vd dzv = T(load_row)(dzrow, 0, c, n);                             \
            fl = fl * vabs(dzv) + vk_fcap * vabs(g);                          \
            g = g * dzv;                                                      \
        }                                                                     \
        do {} while (0)
#define PASS3(c, live, nn, spec, xt) do {                                    \
        const int64_t n = (nn);                                              \
        PASS3_GF(c, n, spec, qrow != NULL, q32, 1, normal, xt);               \
        CE_COMPARE(c, live, n, g, fl);                                        \
    } while (0)
    /* only the target's and the arg-max's vectors need the per-entry corrections */
    const int64_t y_blk = y - y % W, am_blk = am - am % W;
    /* the common case (a gradient to compare, nothing stored, no smoothing or class weight
     * terms): a loop without the invariant tests, one per kind of target and `normal` */
#define PASS3_FAST(qq, q32c, nrm, xt) do {                                   \
        for (int64_t c = 0; c < body; c += W) {                               \
            const int spec = c == y_blk || c == am_blk;                       \
            PASS3_GF(c, W, spec, qq, q32c, 0, nrm, xt);                       \
            vd absg = vabs(g);                                                \
            vd tol = (absg * rtol + abs_tol) + fl;                            \
            CE_COMPARE_FOLD(c, ALL, W, g, absg, tol, 0);                      \
        }                                                                     \
    } while (0)
#define PASS3_ALL(xt) do {                                                   \
        for (int64_t c = 0; c < body; c += W) {                               \
            if (c == y_blk || c == am_blk) PASS3(c, ALL, W, 1, xt);           \
            else PASS3(c, ALL, W, 0, xt);                                     \
        }                                                                     \
    } while (0)
#define PASS3_FAST_ALL(xt) do {                                              \
        if (!qrow) {                                                          \
            if (normal) PASS3_FAST(0, 0, 1, xt);                              \
            else PASS3_FAST(0, 0, 0, xt);                                     \
        } else if (q32) {                                                     \
            if (normal) PASS3_FAST(1, 1, 1, xt);                              \
            else PASS3_FAST(1, 1, 0, xt);                                     \
        } else {                                                              \
            if (normal) PASS3_FAST(1, 0, 1, xt);                              \
            else PASS3_FAST(1, 0, 0, xt);                                     \
        }                                                                     \
    } while (0)
    /* the picked columns only: each one's vector through pass 3's formulas (the same bits) */
#define PICKS(xt) do {                                                       \
        for (int64_t k = r * a->n_picks; k < (r + 1) * a->n_picks; k++) {    \
            const int64_t col = a->pick_cols[k];                              \
            if (col < 0) continue;                                            \
            const int64_t c0 = col - col % W;                                 \
            PASS3_GF(c0, C - c0 < W ? C - c0 : W, 1, qrow != NULL, q32, 1, normal, xt); \
            a->pick_g[k] = g[col - c0];                                       \
            a->pick_fl[k] = fl[col - c0];                                     \
        }                                                                     \
    } while (0)
    /* the floor's |z| term: transformed logits only (z = S x rounded); a z-loss or sample
     * weights alone leave z = x */
    const int zt = ext && (a->softcap != 0.0 || a->x_scale != 1.0);
    if (a->pick_cols) {
        if (cap) PICKS(2);
        else if (zt) PICKS(1);
        else PICKS(0);
        return 0;
    }
    if (!gu || a->out_ref || a->out_floor || a->out_tol || a->out_ratio || k_b != 0.0
        || k_fb != 0.0) {
        if (cap) PASS3_ALL(2);
        else if (zt) PASS3_ALL(1);
        else PASS3_ALL(0);
    } else if (cap) {
        PASS3_FAST_ALL(2);
    } else if (zt) {
        PASS3_FAST_ALL(1);
    } else {
        PASS3_FAST_ALL(0);
    }
    if (tail && cap) PASS3(body, LIVE(body), tail, 1, 2);
    else if (tail && zt) PASS3(body, LIVE(body), tail, 1, 1);
    else if (tail) PASS3(body, LIVE(body), tail, 1, 0);
    CE_COMPARE_END;
    return 0;
}

/* Rows with training-code terms (a->ext: z-loss, sample weights, logit scale, softcap), few
 * specialisations for all (they are rare: no loop per dtype pair). float32 rows with z-loss and
 * sample weights only: the row kernel on x itself. Otherwise the row kernel on z in doubles:
 * x itself (float64 rows without a scale) or z in the scratch after the row's exp and block
 * sums (see WORK_SIZE), z = S x (numpy: x * scale) or, soft-capped, z and dz (numpy's arg-max is
 * z's: rounding may tie entries x does not). */
static __attribute__((noinline)) int T(row_ext_x)(const ce_args *a, double *work, int64_t r,
                                                   const void *x, int z32, int g32) {
    const int64_t C = a->n_cols;
    const double S = a->x_scale;
    /* float32 x is always row r of a->z itself (a perturbed row is in doubles) */
    if (z32 && S == 1.0 && a->softcap == 0.0) return T(row_body)(a, work, r, 1, g32, 1, 0, NULL, NULL);
    double *zb = work + C + 8 + 2 * (C / BLOCK + 1), *db = zb + C;
    if (a->softcap != 0.0) {
        if (T(softcap_row)(x, z32, C, S, a->softcap, zb, db)) return 1;
    } else if (z32 || S != 1.0) {  /* NaN and +inf: row_body's pass 1 finds them in z */
        for (int64_t c = 0; c < C; c += W) {
            const int64_t n = C - c < W ? C - c : W;
            T(store)(zb + c, T(load_row)(x, z32, c, n) * splat(S), n);
        }
    } else {
        zb = (double *)x;
    }
    return T(row_body)(a, work, r, 0, g32, 1, 1, zb, db);
}

/* Row r of a->z through row_ext_x. */
AI int T(row_ext)(const ce_args *a, double *work, int64_t r, int z32, int g32) {
    const void *x = (const char *)a->z + (size_t)(r * a->n_cols) * (z32 ? 4 : 8);
    return T(row_ext_x)(a, work, r, x, z32, g32);
}

/* Row r with its entry pert_col[r] replaced by pert_val[r]: the row in doubles in the scratch
 * (see WORK_SIZE), then as a float64 row (row_ext_x, or row_body on it): the bits of a float64
 * copy of the row with that entry set, evaluated as the logits. */
static __attribute__((noinline)) int T(row_pert)(const ce_args *a, double *work, int64_t r,
                                                  int z32, int g32) {
    const int64_t C = a->n_cols;
    double *xb = work + 3 * C + 8 + 2 * (C / BLOCK + 1);
    const void *x = (const char *)a->z + (size_t)(r * C) * (z32 ? 4 : 8);
    for (int64_t c = 0; c < C; c += W) {
        const int64_t n = C - c < W ? C - c : W;
        T(store)(xb + c, T(load_row)(x, z32, c, n), n);
    }
    xb[a->pert_col[r]] = a->pert_val[r];
    if (a->ext) return T(row_ext_x)(a, work, r, xb, 0, g32);
    return T(row_body)(a, work, r, 0, g32, 0, 1, xb, NULL);
}

/* One row of softmax cross-entropy without training-code terms. */
AI int T(row_kernel)(const ce_args *a, double *work, int64_t r, int z32, int g32) {
    return T(row_body)(a, work, r, z32, g32, 0, 0, NULL, NULL);
}

/* |x| where x is finite, else 0 (numpy_sigmoid._finite_abs) */
AI vd T(fin_abs)(vd x) {
    vd ax = vabs(x);
    return sel(ax <= splat(1.7976931348623157e308), ax, splat(0.0));
}

/* One row of sigmoid BCE (kernels/numpy_sigmoid.py's formulas in its order, but for e/(1 + e)), per
 * element with label y, weight w (a->w_bin, or 1) and pos_weight pw (a->pos_w, or none):
 *   e = exp(-|x|), t = log1p(e), pos = pw y, coef = 1 + (pw - 1) y
 *   item = [pos != 0] pos (max(-x, 0) + t) + [y != 1] (1 - y)(max(x, 0) + t), times w
 *   s(x), s(-x) = r and e r (by the sign of x), r = 1/(1 + e): numpy's e/(1 + e) with one
 *   more rounding (within 3 ulp of the exact sigmoid, 2.6 measured; numpy's 2.4), one
 *   division shared with log1p instead of three
 *   g = ((1 - y) s(x) - pos s(-x)) (w scale),
 *   floor = (k eps scale)(c' s(x) + |pos| + |1 - y|) |w|
 *   (c' = 1 + |pos| with pos_weight, else 1: PyTorch's 1 + pw y rounds at eps (1 + |pw y|);
 *   |1 - y|: MLX's s(x) = 1 - s(-x) is exact to eps/2 absolute)
 * loss = sum of items and Q = sum |coef| |w| in the kernel's order (8 accumulators, blocks of
 * 128, pairwise over blocks). Returns 1 when the row holds a NaN or +inf logit (handed back).
 * The row goes in steps of BCE_STEP entries, BCE_STEP / W vectors at a time, each stage
 * (exp, log1p, the sums, the gradient) over all of them before the next: independent chains
 * side by side, which the CPU overlaps (one vector's exp -> log1p -> division chain is long).
 * Four vectors at a time (eight scalars) measured fastest on avx512 and avx2: more spill
 * registers, fewer wait on the divisions. The step does not change any bit. */
#define BCE_STEP (W >= 4 ? 4 * W : 8)
/* NV vectors from entry c0 (a multiple of 8 plus k0 W), the last with n_last lanes (the
 * rest masked); vector u feeds accumulator (k0 + u) % G */
#define BCE(c0, k0, NV, n_last) do {                                         \
        vd x[NV], yv[NV];                                                     \
        vl live[NV], far = (vl){0};                                          \
        for (int u = 0; u < NV; u++) {                                        \
            const int64_t cc = (c0) + u * W, n = u == NV - 1 ? (n_last) : W;  \
            live[u] = n == W ? ALL : LIVE(cc);                                 \
            x[u] = T(load_row)(z, z32, cc, n);                                 \
            yv[u] = T(load_row)(yrow, y32, cc, n);                             \
            far |= ~(vabs(x[u]) <= splat(708.0));  /* exp(-|x|) subnormal or 0 */ \
        }                                                                     \
        if (T(any)(far)) BCE_REST(c0, k0, NV, n_last, 0);                     \
        else BCE_REST(c0, k0, NV, n_last, 1);                                 \
    } while (0)
/* The rest of BCE; NEAR (a constant): every |x| <= 708, so exp takes its normal path (the
 * same bits in fewer steps) and the items need no guards (finite logits: the products are
 * those 0s already, numpy_sigmoid._items' finite path) */
#define BCE_REST(c0, k0, NV, n_last, NEAR) do {                               \
        vd e[NV], t[NV], rcp[NV];                                             \
        /* NaN or +inf (-inf is served; xt: the raw logits were checked) */   \
        for (int u = 0; !(NEAR) && !xt && u < NV; u++)                        \
            vbad |= live[u] & ~(x[u] <= splat(1.7976931348623157e308));       \
        for (int u = 0; u < NV; u++) e[u] = T(vexp_neg)(-vabs(x[u]), NEAR);   \
        for (int u = 0; u < NV; u++) {  /* 1 / (1 + e): log1p's and the sigmoids' */ \
            vd d1 = one + e[u];                                                \
            rcp[u] = one / d1;                                                \
            t[u] = T(vlog1p_ur)(e[u], d1, rcp[u]);                            \
        }                                                                     \
        for (int u = 0; u < NV; u++) {                                        \
            const int64_t cc = (c0) + u * W, n = u == NV - 1 ? (n_last) : W;  \
            const int k = ((k0) + u) % G;                                     \
            vd wv = wrow ? T(load_row)(wrow, 0, cc, n) : one;                  \
            vd pwv = pw ? T(load_row)(pw, 0, cc, n) : one;                     \
            vd pos = pw ? pwv * yv[u] : yv[u], omy = one - yv[u];             \
            vd sp_neg = T(vmax)(-x[u], splat(0.0)) + t[u];                    \
            vd sp_pos = T(vmax)(x[u], splat(0.0)) + t[u];                     \
            vd item = NEAR ? pos * sp_neg + omy * sp_pos                      \
                           : sel(pos != 0, pos * sp_neg, splat(0.0))          \
                             + sel(yv[u] != one, omy * sp_pos, splat(0.0));   \
            vd cf = pw ? vabs(one + (pwv - one) * yv[u]) : one;               \
            vd mag = wrow ? cf * vabs(wv) : cf;                               \
            if (wrow) item = sel(wv != 0, item * wv, splat(0.0));             \
            acc_l[k] += sel(live[u], item, splat(0.0));                       \
            if (!unit_w) acc_w[k] += sel(live[u], mag, splat(0.0));           \
            if (xt) {  /* g1 = (|1 - y| + |pos|) |w|; item weight |coef w| + g1 |z| */ \
                vd g1 = vabs(omy) + vabs(pos);                                \
                if (wrow) g1 = g1 * vabs(wv);                                 \
                mag = mag + g1 * T(fin_abs)(x[u]);                            \
                acc_g[k] += sel(live[u], g1, splat(0.0));                     \
                acc_i[k] += sel(live[u], mag, splat(0.0));                    \
            }                                                                 \
            if (a->out_items) T(store)(a->out_items + r * C + cc, item, n);   \
            if (a->out_item_w) T(store)(a->out_item_w + r * C + cc, mag, n);  \
            if (!per_entry) continue;                                         \
            /* s(x) = 1/(1 + e) or e/(1 + e) by the sign of x, s(-x) the other: r and e r \
             * (r = 1/(1 + e), log1p's division) */                           \
            vl nonneg = x[u] >= splat(0.0);                                   \
            vd small = e[u] * rcp[u];                                         \
            vd s_pos = sel(nonneg, rcp[u], small), s_neg = sel(nonneg, small, rcp[u]); \
            vd g_z = omy * s_pos - pos * s_neg;                               \
            vd g = g_z * (wrow ? wv * v_scale : v_scale);                     \
            vd cs = pw ? (one + vabs(pos)) * s_pos : s_pos;                   \
            vd fl;                                                            \
            if (xt) {  /* _transformed_floor; dz = T' */                      \
                vd dz = xt == 2 ? T(load_row)(db, 0, cc, n) : vs;             \
                g = g * dz;                                                   \
                fl = (cs * (one + s_neg * T(fin_abs)(x[u])) + vabs(pos) + vabs(omy)) * vabs(dz); \
                if (xt == 2) fl = fl + vs_abs * vabs(g_z);                    \
                fl = fl * v_kf;                                               \
            } else {                                                          \
                fl = v_kf * (cs + vabs(pos) + vabs(omy));                     \
            }                                                                 \
            if (wrow) fl = fl * vabs(wv);                                     \
            CE_COMPARE(cc, live[u], n, g, fl);                                \
        }                                                                     \
    } while (0)
/* The row function `name` with parameters `params`, its first statements __VA_ARGS__ (they
 * define xt, zb, db): bce_kernel has xt a constant 0 in its own text, so the plain row's
 * code is the one it had before the transformed rows shared it (a parameter folded after
 * inlining gave other register allocation and spills: ~1% slower on avx2). */
#define BCE_ROW_FN(name, params, ...)                                                      \
    AI int T(name) params {                                                              \
        __VA_ARGS__;                                                                     \
    const int64_t C = a->n_cols;                                                    \
    const int64_t body = C - C % BCE_STEP, tail = C - body;                         \
    const void *z = xt ? (const void *)zb : (const char *)a->z + (size_t)(r * C) * (z32 ? 4 : 8); \
    const int y32 = (int)a->y_is_f32;                                               \
    const void *yrow = (const char *)a->y_bin + (size_t)(r * C) * (y32 ? 4 : 8);    \
    const double *wrow = a->w_bin ? a->w_bin + r * C : NULL;                        \
    const double *pw = a->pos_w;                                                    \
    const double scale = a->scale, k_f = a->floor_coef * scale;                     \
    const vd v_scale = splat(scale), v_kf = splat(k_f);                             \
    const int per_entry = a->g || a->out_ref || a->out_floor;                       \
    const int unit_w = !pw && !wrow;  /* |coef w| = 1: Q = C, exactly, in any order */ \
    vd acc_l[G], acc_w[G], acc_g[G], acc_i[G];                                      \
    vl vbad = (vl){0};                                                              \
    for (int k = 0; k < G; k++) acc_l[k] = acc_w[k] = splat(0.0);                   \
    if (xt)                                                                         \
        for (int k = 0; k < G; k++) acc_g[k] = acc_i[k] = splat(0.0);               \
    double *blk_l = work, *blk_w = work + C / BLOCK + 1;                            \
    double *blk_g = blk_w + C / BLOCK + 1, *blk_i = blk_g + C / BLOCK + 1;  /* xt only */ \
    const vd vs = splat(a->x_scale), vs_abs = vabs(vs) * splat(CE_SOFTCAP_DERIV_ERR); \
    int64_t nb = 0;                                                                 \
    CE_COMPARE_BEGIN;                                                               \
    for (int64_t c = 0; c < body; c += BCE_STEP) {                                  \
        BCE(c, 0, BCE_STEP / W, W);                                                 \
        if ((c & (BLOCK - 1)) == BLOCK - BCE_STEP) {                                \
            if (xt) {                                                               \
                blk_g[nb] = T(hsum8)(acc_g);                                        \
                blk_i[nb] = T(hsum8)(acc_i);                                        \
                for (int k = 0; k < G; k++) acc_g[k] = acc_i[k] = splat(0.0);       \
            }                                                                       \
            blk_l[nb] = T(hsum8)(acc_l);                                            \
            blk_w[nb++] = T(hsum8)(acc_w);                                          \
            for (int k = 0; k < G; k++) acc_l[k] = acc_w[k] = splat(0.0);           \
        }                                                                           \
    }                                                                               \
    for (int64_t i = 0; i * W < tail; i++) {                                        \
        const int64_t c = body + i * W;                                             \
        BCE(c, i, 1, tail - i * W < W ? tail - i * W : W);                          \
    }                                                                               \
    if (C % BLOCK) {                                                                \
        if (xt) {                                                                   \
            blk_g[nb] = T(hsum8)(acc_g);                                            \
            blk_i[nb] = T(hsum8)(acc_i);                                            \
        }                                                                           \
        blk_l[nb] = T(hsum8)(acc_l);                                                \
        blk_w[nb++] = T(hsum8)(acc_w);                                              \
    }                                                                               \
    if (T(any)(vbad)) return 1;                                                     \
    a->loss[r] = ce_pairwise(blk_l, nb);                                            \
    if (xt) {  /* row_terms: sum |coef w|, sum g1; total_w: sum of the item weights */ \
        a->row_mag[r] = unit_w ? (double)C : ce_pairwise(blk_w, nb);                \
        a->row_g1[r] = ce_pairwise(blk_g, nb);                                      \
        a->total_w[r] = ce_pairwise(blk_i, nb);                                     \
    } else {                                                                        \
        a->total_w[r] = unit_w ? (double)C : ce_pairwise(blk_w, nb);                \
    }                                                                               \
    if (per_entry) CE_COMPARE_END;                                                  \
    return 0;                                                                       \
    }
BCE_ROW_FN(bce_kernel, (const ce_args *a, double *work, int64_t r, int z32, int g32),
           enum { xt = 0 }; const double *zb = NULL, *db = NULL)
/* xt 1: a logit scale (dz = S), 2: a softcap (dz in db); z in doubles in zb */
BCE_ROW_FN(bce_body, (const ce_args *a, double *work, int64_t r, int z32, int g32, int xt,
                      const double *zb, const double *db), (void)0)

/* Lanes [c, c + n) of bce_zrow with a logit scale only: z = S x (numpy: x * scale). */
AI void T(bce_scale_step)(const void *x, int x32, int64_t c, int64_t n, vd vs, double *zb,
                          vl *bad) {
    vd v = T(load_row)(x, x32, c, n);
    *bad |= (v != splat(-INFINITY)) & ~(v - v == splat(0.0));
    T(store)(zb + c, v * vs, n);
}

/* Row r's raw logits x of sigmoid BCE through T into zb (z) and, with a softcap, db (dz):
 * 1 when the row holds a NaN or +inf raw logit (handed back; unlike softmax, a row of -inf
 * only is served). */
static int T(bce_zrow)(const ce_args *a, const void *x, int x32, double *zb, double *db) {
    const int64_t C = a->n_cols, body = C - C % W;
    const double S = a->x_scale, cap = a->softcap;
    const vd vs = splat(S), vcap = splat(cap), s_cap = splat(cap != 0.0 ? S / cap : 0.0);
    vl bad = (vl){0}, fin = (vl){0};
#define BCE_ZROW(xx32) do {                                                  \
        for (int64_t c = 0; c < body; c += W) {                               \
            if (cap != 0.0) T(softcap_step)(x, xx32, c, W, vs, vcap, s_cap, zb, db, &bad, &fin); \
            else T(bce_scale_step)(x, xx32, c, W, vs, zb, &bad);              \
        }                                                                     \
    } while (0)
    if (x32) BCE_ZROW(1);
    else BCE_ZROW(0);
#undef BCE_ZROW
    if (body < C && cap != 0.0)
        T(softcap_step)(x, x32, body, C - body, vs, vcap, s_cap, zb, db, &bad, &fin);
    else if (body < C)
        T(bce_scale_step)(x, x32, body, C - body, vs, zb, &bad);
    return T(any)(bad);
}

/* One row of sigmoid BCE on z = T(x) (a logit scale or softcap, numpy_sigmoid.sigmoid_rows
 * with model.transformed): z (and dz) into the scratch after the block sums, then bce_body on
 * z in doubles; the gradient takes the factor dz = T', the floor _transformed_floor's terms,
 * and the item weights g1 |z|. Apart from the plain kernel (not inlined into its loops). */
static __attribute__((noinline)) int T(bce_row_transformed)(const ce_args *a, double *work,
                                                             int64_t r, int z32, int g32) {
    const int64_t C = a->n_cols;
    double *zb = work + C + 8 + 2 * (C / BLOCK + 1), *db = zb + C;
    const void *x = (const char *)a->z + (size_t)(r * C) * (z32 ? 4 : 8);
    if (T(bce_zrow)(a, x, z32, zb, db)) return 1;
    /* the gradient's width is tested per load: not worth a copy of the loop (rare rows) */
    if (a->softcap != 0.0) return T(bce_body)(a, work, r, 0, g32, 2, zb, db);
    return T(bce_body)(a, work, r, 0, g32, 1, zb, NULL);
}

/* Target rows [r0, r1) of a->q (probability targets, binary labels; float32 when a->q_is_f32):
 * the row's minimum and maximum into row_min and row_max (NaN as the maximum when the row holds
 * one) and, when q_total is given, numpy's pairwise row sum there (np.sum's bits, as the row
 * kernel's Q). One pass over the inputs, for the checks made before the stream. */
CE_ENTRY int64_t T(scan_rows)(const ce_args *a, double *work, int64_t r0, int64_t r1, int64_t *stop) {
    (void)work;
    (void)stop;
    const int64_t C = a->n_cols;
    const int q32 = (int)a->q_is_f32;
    for (int64_t r = r0; r < r1; r++) {
        const void *row = (const char *)a->q + (size_t)(r * C) * (q32 ? 4 : 8);
        double lo = INFINITY, hi = -INFINITY;
        int64_t c0 = 0;
        int bad = 0;  /* scan_f32: NaN or +inf; +inf is the maximum anyway */
        if (q32) {
            int64_t am;
            c0 = T(scan_f32)((const float *)row, C, &hi, &lo, &am, &bad);
        }
        vd mn = splat(lo), mx = splat(hi);
        vl nan = (vl){0};
        for (int64_t c = c0; c < C; c += W) {
            vd v = T(load_row)(row, q32, c, C - c < W ? C - c : W);  /* a short load repeats entry c */
            nan |= v != v;
            mn = sel(v < mn, v, mn);
            mx = sel(v > mx, v, mx);
        }
        for (int i = 0; i < W; i++) {
            lo = mn[i] < lo ? mn[i] : lo;
            hi = mx[i] > hi ? mx[i] : hi;
            bad |= nan[i] != 0;
        }
        a->row_min[r] = lo;
        a->row_max[r] = bad && hi != INFINITY ? NAN : hi;
        if (a->q_total) a->q_total[r] = 0.0 + T(np_pairwise)(row, q32, 0, C, 0);
    }
    return 0;
}

/* Rows [r0, r1) of `kernel` with scratch `work`: 0, or 1 + the first bad row (see
 * ce_softmax_rows). Stops early once another thread has found a bad row before the current one
 * (*stop, 1 + row). The dtype pair picks one of four specialisations of the kernel. */
#define ROWS_LOOP(kernel)                                                                     \
    for (int64_t r = r0; r < r1; r++) {                                                       \
        if (__atomic_load_n(stop, __ATOMIC_RELAXED) <= r) return 0;                           \
        int bad;                                                                              \
        if (a->z_is_f32)                                                                      \
            bad = a->g_is_f32 ? kernel(a, work, r, 1, 1) : kernel(a, work, r, 1, 0);          \
        else                                                                                  \
            bad = a->g_is_f32 ? kernel(a, work, r, 0, 1) : kernel(a, work, r, 0, 0);          \
        if (bad) return r + 1;                                                                \
    }                                                                                         \
    return 0;

static __attribute__((noinline)) int64_t T(bce_transformed_rows)(const ce_args *a, double *work,
                                                                  int64_t r0, int64_t r1,
                                                                  int64_t *stop) {
    ROWS_LOOP(T(bce_row_transformed))
}

static __attribute__((noinline)) int64_t T(bce_plain_rows)(const ce_args *a, double *work,
                                                            int64_t r0, int64_t r1,
                                                            int64_t *stop) {
    ROWS_LOOP(T(bce_kernel))
}

/* Sigmoid BCE rows: plain ones and those on z = T(x) (a->ext with a scale or softcap) in
 * functions apart (the plain loop's code is the one it had alone). */
CE_ENTRY int64_t T(bce_rows)(const ce_args *a, double *work, int64_t r0, int64_t r1, int64_t *stop) {
    if (a->ext && (a->softcap != 0.0 || a->x_scale != 1.0))
        return T(bce_transformed_rows)(a, work, r0, r1, stop);
    return T(bce_plain_rows)(a, work, r0, r1, stop);
}

static __attribute__((noinline)) int64_t T(ext_rows)(const ce_args *a, double *work, int64_t r0,
                                                      int64_t r1, int64_t *stop) {
    ROWS_LOOP(T(row_ext))
}

static __attribute__((noinline)) int64_t T(pert_rows)(const ce_args *a, double *work, int64_t r0,
                                                       int64_t r1, int64_t *stop) {
    ROWS_LOOP(T(row_pert))
}

/* Softmax rows; perturbed ones and those with training-code terms in loops of their own
 * (functions apart, so the plain loop's code and registers stay as they were). */
CE_ENTRY int64_t T(rows)(const ce_args *a, double *work, int64_t r0, int64_t r1, int64_t *stop) {
    if (a->pert_col) return T(pert_rows)(a, work, r0, r1, stop);
    if (a->ext) return T(ext_rows)(a, work, r0, r1, stop);
    ROWS_LOOP(T(row_kernel))
}

#undef ROWS_LOOP
#undef PASS1
#undef CE_COMPARE_BEGIN
#undef CE_COMPARE
#undef CE_COMPARE_END
#undef CE_COMPARE_FOLD
#undef CE_ALL_LT2
#undef CE_MAXPD
#undef BCE
#undef BCE_REST
#undef BCE_ROW_FN
#undef BCE_STEP
#undef PASS2
#undef PASS2_ROW
#undef PASS2_ACC
#undef PASS2_BLOCK
#undef PASS3
#undef PASS3_GF
#undef PASS3_FAST
#undef PASS3_ALL
#undef PASS3_FAST_ALL
#undef PICKS
#undef sel
#undef vabs
#undef splat
#undef ALL
#undef LIVE
#undef IOTA
#undef vd
#undef vl
#undef vu
#undef vf
#undef vf2
#undef vi2
#undef AI
#undef G
#undef W
#undef T
#undef CE_CAT
#undef CE_CAT2
#undef CE_W
#undef CE_SFX
#undef CE_CVT_PS_PD
#undef CE_ANY

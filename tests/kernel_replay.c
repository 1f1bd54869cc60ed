/* Replays recorded calls of the compiled kernel on one target, for tests/test_kernel_replay.py:
 * the same source built by another compiler (clang) or for another CPU (AArch64 NEON, run under
 * qemu-user) must give the bits the host's GCC build gives.
 *
 *   kernel_replay TARGET RECORDS OUTPUTS
 *
 * RECORDS holds calls one after another, little-endian int64 fields:
 *   kind 0 softmax rows, 1 sigmoid BCE rows, 2 input scan: sizeof(ce_args), the ce_args bytes
 *     (n_threads is set to 1, work to fresh scratch), then each pointer field of PTR_FIELDS in
 *     order: its byte count (-1: NULL) and bytes; OUTPUTS gets the return value and every
 *     pointer field's bytes after the call, in the same order.
 *   kind 3 exp/log1p: n and n doubles; OUTPUTS gets the return value, exp and log1p (n each).
 *   kind 4 soft-cap: n, cap (a double) and n doubles; OUTPUTS gets the return value, z, dz.
 *   kind 5 float16 widening: n and n binary16 values; OUTPUTS gets n float32 (ce_widen_f16 on
 *     2 threads).
 * ce_args has one layout on every LP64 target (int64, double and pointers, 8 bytes each).
 */
#include <stddef.h>
#include <stdio.h>

#include "../ce_cli/kernels/_fused.h"

int64_t ce_softmax_rows_on(const ce_args *a, const char *name);
int64_t ce_bce_rows_on(const ce_args *a, const char *name);
int64_t ce_scan_rows_on(const ce_args *a, const char *name);
int64_t ce_unit_funcs_on(const char *name, const double *x, double *out_exp, double *out_log1p,
                         int64_t n);
int64_t ce_cap_funcs_on(const char *name, const double *x, double cap, double *out_z,
                        double *out_dz, int64_t n);
void ce_widen_f16(const uint16_t *src, float *dst, int64_t n, int64_t n_threads);

#define PTR_FIELDS                                                                            \
    X(z) X(g) X(alpha) X(beta) X(ys) X(active) X(w) X(loss) X(row_max) X(log1p_s1)          \
    X(ratio_max) X(max_abs) X(max_rel) X(mismatches) X(nonfinite) X(out_ref) X(out_floor)     \
    X(out_tol) X(out_ratio) X(work) X(q) X(q_total) X(y_bin) X(w_bin) X(pos_w) X(out_items)  \
    X(out_item_w) X(total_w) X(row_min) X(s_w) X(row_zabs) X(row_qabs) X(row_qsum) X(row_mag) \
    X(row_g1) X(pert_col) X(pert_val) X(pick_cols) X(pick_g) X(pick_fl) X(step_cols)         \
    X(step_vals) X(step_loss) X(flushed)

static const size_t OFFSETS[] = {
#define X(f) offsetof(ce_args, f),
    PTR_FIELDS
#undef X
};
#define N_PTRS (sizeof OFFSETS / sizeof OFFSETS[0])

static void fail(const char *what) {
    fprintf(stderr, "kernel_replay: %s\n", what);
    exit(2);
}

static int64_t get_i64(FILE *f) {
    int64_t v;
    if (fread(&v, sizeof v, 1, f) != 1) fail("truncated record");
    return v;
}

static void *get_bytes(FILE *f, int64_t n) {
    void *p = malloc(n > 0 ? (size_t)n : 1);
    if (!p) fail("out of memory");
    if (n > 0 && fread(p, 1, (size_t)n, f) != (size_t)n) fail("truncated record");
    return p;
}

static void put(FILE *f, const void *p, size_t n) {
    if (n && fwrite(p, 1, n, f) != n) fail("cannot write");
}

static void replay_rows(FILE *in, FILE *out, int64_t kind, const char *target) {
    if (get_i64(in) != (int64_t)sizeof(ce_args)) fail("ce_args differs in size");
    ce_args a;
    if (fread(&a, sizeof a, 1, in) != 1) fail("truncated record");
    void *blob[N_PTRS];
    int64_t size[N_PTRS];
    for (size_t i = 0; i < N_PTRS; i++) {
        size[i] = get_i64(in);
        blob[i] = size[i] < 0 ? NULL : get_bytes(in, size[i]);
        memcpy((char *)&a + OFFSETS[i], &blob[i], sizeof(void *));
    }
    a.n_threads = 1;
    int64_t rc = kind == 0 ? ce_softmax_rows_on(&a, target)
               : kind == 1 ? ce_bce_rows_on(&a, target) : ce_scan_rows_on(&a, target);
    put(out, &rc, sizeof rc);
    for (size_t i = 0; i < N_PTRS; i++) {
        if (size[i] > 0) put(out, blob[i], (size_t)size[i]);
        free(blob[i]);
    }
}

static void replay_funcs(FILE *in, FILE *out, int64_t kind, const char *target) {
    int64_t n = get_i64(in);
    double cap = 0.0;
    if (kind == 4 && fread(&cap, sizeof cap, 1, in) != 1) fail("truncated record");
    double *x = get_bytes(in, n * 8);
    double *o1 = malloc((size_t)(n > 0 ? n : 1) * 8), *o2 = malloc((size_t)(n > 0 ? n : 1) * 8);
    if (!o1 || !o2) fail("out of memory");
    int64_t rc = kind == 3 ? ce_unit_funcs_on(target, x, o1, o2, n)
                           : ce_cap_funcs_on(target, x, cap, o1, o2, n);
    put(out, &rc, sizeof rc);
    put(out, o1, (size_t)n * 8);
    put(out, o2, (size_t)n * 8);
    free(x);
    free(o1);
    free(o2);
}

static void replay_widen(FILE *in, FILE *out) {
    int64_t n = get_i64(in);
    uint16_t *h = get_bytes(in, n * 2);
    float *f = malloc((size_t)(n > 0 ? n : 1) * 4);
    if (!f) fail("out of memory");
    ce_widen_f16(h, f, n, 2);
    put(out, f, (size_t)n * 4);
    free(h);
    free(f);
}

int main(int argc, char **argv) {
    if (argc != 4) fail("usage: kernel_replay TARGET RECORDS OUTPUTS");
    FILE *in = fopen(argv[2], "rb"), *out = fopen(argv[3], "wb");
    if (!in || !out) fail("cannot open the files");
    int64_t kind;
    while (fread(&kind, sizeof kind, 1, in) == 1) {
        if (kind >= 0 && kind <= 2) replay_rows(in, out, kind, argv[1]);
        else if (kind == 3 || kind == 4) replay_funcs(in, out, kind, argv[1]);
        else if (kind == 5) replay_widen(in, out);
        else fail("unknown record kind");
    }
    return fclose(out) ? 2 : 0;
}

/*
 * reprod.diff._kernel: every statistic of a float32/float64 array pair in one pass.
 *
 * The compiled twin of the numpy path in reprod/diff/metrics.py, with the same semantics:
 * |o - r| and everything else in float64, NaN and Inf counted and handled by the pass rule,
 * the first position of the largest difference. It reads each element once, so it runs at
 * memory speed, and it releases the GIL, so metrics.py runs two chunks on two cores.
 *
 * A block is first run through a branch-free vector loop that assumes every value is finite;
 * when the block holds a NaN or an Inf, its vector results are dropped and a scalar loop with
 * the masks redoes the block. Blocks are read in place, even unaligned (memcpy loads).
 *
 * Built with -ffp-contract=off: a fused multiply-add would round atol + rtol*|r| differently
 * from numpy.isclose and change which elements count as mismatched.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int64_t counted;
    double total, total_rel, dot, rr, oo;
    double max_abs;
    int64_t worst;
    double min_abs, max_rel;
    int64_t mismatched, ref_nan, ref_inf, other_nan, other_inf, nan_unmatched, inf_unmatched;
} acc_t;

typedef struct {
    int check_close, equal_nan;
    double atol, rtol;
} opts_t;

static inline double load_f(const char *p, Py_ssize_t i) {
    float v;
    memcpy(&v, p + 4 * i, 4);
    return (double)v;
}

static inline double load_d(const char *p, Py_ssize_t i) {
    double v;
    memcpy(&v, p + 8 * i, 8);
    return v;
}

#define LOAD(kind, p, i) ((kind) == 'f' ? load_f((p), (i)) : load_d((p), (i)))

/* The exact per-element rule, for blocks holding a non-finite value (and for short tails). */
static inline void scalar_range(const char *rp, char rk, const char *op, char ok, Py_ssize_t lo,
                                Py_ssize_t hi, const opts_t *o, acc_t *a) {
    for (Py_ssize_t i = lo; i < hi; i++) {
        double r = LOAD(rk, rp, i), x = LOAD(ok, op, i);
        int rn = isnan(r), xn = isnan(x), ri = isinf(r), xi = isinf(x);
        a->ref_nan += rn;
        a->other_nan += xn;
        a->ref_inf += ri;
        a->other_inf += xi;
        double d, rel;
        if (rn || xn) {
            if (!(o->equal_nan && rn && xn)) {
                a->nan_unmatched++;
                a->mismatched += o->check_close;
            }
            continue;
        }
        if (ri || xi) {
            if (r == x) continue; /* matched Inf: left out of every statistic */
            a->inf_unmatched++;
            a->mismatched += o->check_close;
            d = fabs(x - r);
            rel = INFINITY;
        } else {
            d = fabs(x - r);
            double ar = fabs(r);
            rel = d == 0.0 ? 0.0 : d / ar;
            if (o->check_close && d > o->atol + o->rtol * ar) a->mismatched++;
        }
        a->counted++;
        a->total += d;
        a->total_rel += rel;
        if (d > a->max_abs) {
            a->max_abs = d;
            a->worst = i;
        }
        if (d < a->min_abs) a->min_abs = d;
        if (rel > a->max_rel) a->max_rel = rel;
        a->dot += r * x;
        a->rr += r * r;
        a->oo += x * x;
    }
}

#if defined(__GNUC__) || defined(__clang__)
#define HAVE_VECTORS 1
#define W 4 /* float64 lanes of one vector */
typedef double vd __attribute__((vector_size(8 * W)));
typedef int64_t vi __attribute__((vector_size(8 * W)));
typedef float vf __attribute__((vector_size(4 * W)));

static inline vd vload(const char *p, char kind, Py_ssize_t i) {
    if (kind == 'f') {
        vf f;
        memcpy(&f, p + 4 * i, sizeof f);
        return __builtin_convertvector(f, vd);
    }
    vd v;
    memcpy(&v, p + 8 * i, sizeof v);
    return v;
}

static inline vd vabs(vd v) {
    const vi mask = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    return (vd)((vi)v & mask);
}

static inline vd vselect(vi m, vd a, vd b) { /* m ? a : b, lane-wise */
    return (vd)(((vi)a & m) | ((vi)b & ~m));
}

static inline double hsum(vd v) {
    double s = 0.0;
    for (int l = 0; l < W; l++) s += v[l];
    return s;
}

/* One block assuming finite values; returns 0 (and changes nothing) when that was wrong. */
static inline int vector_block(const char *rp, char rk, const char *op, char ok, Py_ssize_t lo,
                               Py_ssize_t hi, const opts_t *o, acc_t *a) {
    const vd zero = {0}, vatol = {o->atol, o->atol, o->atol, o->atol},
             vrtol = {o->rtol, o->rtol, o->rtol, o->rtol};
    vd s_d = zero, s_rel = zero, s_dot = zero, s_rr = zero, s_oo = zero, nonfinite = zero;
    vd vmax = zero - 1.0, vmin = zero + INFINITY, vmaxrel = zero - 1.0;
    vi outside = {0};
    Py_ssize_t n = (hi - lo) / W * W;
    for (Py_ssize_t i = lo; i < lo + n; i += W) {
        vd r = vload(rp, rk, i), x = vload(op, ok, i);
        vd d = vabs(x - r);
        nonfinite += d * 0.0; /* NaN as soon as d is NaN or Inf */
        s_d += d;
        vmax = vselect(d > vmax, d, vmax);
        vmin = vselect(d < vmin, d, vmin);
        vd ar = vabs(r);
        vd rel = (vd)((vi)(d / ar) & (d != 0.0)); /* 0/0 = 0; x/0 = inf */
        s_rel += rel;
        vmaxrel = vselect(rel > vmaxrel, rel, vmaxrel);
        s_dot += r * x;
        s_rr += r * r;
        s_oo += x * x;
        if (o->check_close) outside += (d > vatol + vrtol * ar); /* true lanes are -1 */
    }
    if (hsum(nonfinite) != 0.0) return 0; /* NaN: a value is not finite (or a difference overflows) */
    acc_t t = *a; /* update a copy, so a rejected block could not leave half its results */
    t.total += hsum(s_d);
    t.total_rel += hsum(s_rel);
    t.dot += hsum(s_dot);
    t.rr += hsum(s_rr);
    t.oo += hsum(s_oo);
    double bmax = -1.0, bmin = INFINITY, bmr = -1.0;
    for (int l = 0; l < W; l++) {
        if (vmax[l] > bmax) bmax = vmax[l];
        if (vmin[l] < bmin) bmin = vmin[l];
        if (vmaxrel[l] > bmr) bmr = vmaxrel[l];
        t.mismatched -= outside[l];
    }
    t.counted += n;
    if (n > 0) {
        if (bmax > t.max_abs) { /* rare after the first blocks: find the first position */
            for (Py_ssize_t j = lo; j < lo + n; j++) {
                if (fabs(LOAD(ok, op, j) - LOAD(rk, rp, j)) == bmax) {
                    t.worst = j;
                    break;
                }
            }
            t.max_abs = bmax;
        }
        if (bmin < t.min_abs) t.min_abs = bmin;
        if (bmr > t.max_rel) t.max_rel = bmr;
    }
    *a = t;
    scalar_range(rp, rk, op, ok, lo + n, hi, o, a); /* the tail, all finite */
    return 1;
}
#endif

static void run(const char *rp, char rk, const char *op, char ok, Py_ssize_t n, Py_ssize_t block,
                const opts_t *o, acc_t *a) {
    for (Py_ssize_t lo = 0; lo < n; lo += block) {
        Py_ssize_t hi = lo + block < n ? lo + block : n;
#ifdef HAVE_VECTORS
        if (vector_block(rp, rk, op, ok, lo, hi, o, a)) continue;
#endif
        scalar_range(rp, rk, op, ok, lo, hi, o, a);
    }
}

/* One specialised copy per dtype pair, so the loads are decided at compile time. */
#define SPECIALISE(RK, OK, NAME)                                                                  \
    static void NAME(const char *rp, const char *op, Py_ssize_t n, Py_ssize_t block,             \
                     const opts_t *o, acc_t *a) {                                                \
        run(rp, RK, op, OK, n, block, o, a);                                                     \
    }
SPECIALISE('f', 'f', run_ff)
SPECIALISE('f', 'd', run_fd)
SPECIALISE('d', 'f', run_df)
SPECIALISE('d', 'd', run_dd)

PyDoc_STRVAR(stats_doc,
             "stats(ref, rkind, other, okind, block, check_close, atol, rtol, equal_nan) -> tuple\n\n"
             "Statistics of two equally long contiguous buffers of float32 ('f') or float64 ('d'),\n"
             "in the field order of reprod.diff.metrics._FIELDS; worst is -1 when nothing was counted.");

static PyObject *stats(PyObject *self, PyObject *args) {
    Py_buffer rb, ob;
    int rk, ok, check_close, equal_nan;
    Py_ssize_t block;
    double atol, rtol;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Cy*Cnpddp", &rb, &rk, &ob, &ok, &block, &check_close, &atol,
                          &rtol, &equal_nan))
        return NULL;
    Py_ssize_t rsize = rk == 'f' ? 4 : rk == 'd' ? 8 : 0, osize = ok == 'f' ? 4 : ok == 'd' ? 8 : 0;
    if (!rsize || !osize || rb.len % rsize || ob.len % osize || rb.len / rsize != ob.len / osize ||
        block < 1) {
        PyBuffer_Release(&rb);
        PyBuffer_Release(&ob);
        PyErr_SetString(PyExc_ValueError, "stats: bad kinds, lengths or block");
        return NULL;
    }
    Py_ssize_t n = rb.len / rsize;
    opts_t o = {check_close, equal_nan, atol, rtol};
    acc_t a;
    memset(&a, 0, sizeof a);
    a.max_abs = -1.0;
    a.max_rel = -1.0;
    a.min_abs = INFINITY;
    a.worst = -1;
    const char *rp = rb.buf, *op = ob.buf;
    Py_BEGIN_ALLOW_THREADS
    if (rk == 'f' && ok == 'f') run_ff(rp, op, n, block, &o, &a);
    else if (rk == 'f') run_fd(rp, op, n, block, &o, &a);
    else if (ok == 'f') run_df(rp, op, n, block, &o, &a);
    else run_dd(rp, op, n, block, &o, &a);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&rb);
    PyBuffer_Release(&ob);
    return Py_BuildValue("(LddddddLddLLLLLLL)", (long long)a.counted, a.total, a.total_rel, a.dot,
                         a.rr, a.oo, a.max_abs, (long long)a.worst, a.min_abs, a.max_rel,
                         (long long)a.mismatched, (long long)a.ref_nan, (long long)a.ref_inf,
                         (long long)a.other_nan, (long long)a.other_inf,
                         (long long)a.nan_unmatched, (long long)a.inf_unmatched);
}

static PyMethodDef methods[] = {
    {"stats", stats, METH_VARARGS, stats_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernel", "One-pass comparison statistics (see metrics.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }

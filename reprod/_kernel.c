/*
 * reprod._kernel: every statistic of a float32/float64 array pair in one pass.
 *
 * The compiled twin of the numpy path in reprod/diff/metrics.py, with the same semantics:
 * |o - r| and everything else in float64, NaN and Inf counted and handled by the pass rule,
 * the first position of the largest difference. It reads each element once, so it runs at
 * memory speed, and it releases the GIL, so metrics.py runs two chunks on two cores.
 *
 * A block is first run through a branch-free vector loop that assumes every value is finite;
 * when the block holds a NaN or an Inf, its vector results are dropped and a scalar loop with
 * the masks redoes the block. Buffers are read in place, even unaligned (unaligned loads ran
 * at 98 % of the aligned speed; copying blocks to aligned scratch first cost 15 %).
 *
 * Built with -ffp-contract=off: a fused multiply-add would round atol + rtol*|r| differently
 * from numpy.isclose and change which elements count as mismatched.
 *
 * stats3 adds a key's noise (ref against its float64 run, for calibrated verdicts) to the same
 * pass. Every call that reads caller buffers is guarded against SIGBUS (a mapped dump truncated
 * meanwhile): see "The SIGBUS guard" below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

typedef struct {
    int64_t counted;
    double total, total_rel, dot, rr, oo;
    double max_abs;
    int64_t worst;
    double min_abs, max_rel;
    int64_t mismatched, ref_nan, ref_inf, other_nan, other_inf, nan_unmatched, inf_unmatched;
    double dd, max_ref; /* sum of squared differences and max |ref|: rel_l2 and max_scaled */
} acc_t;

typedef struct {
    int check_close, equal_nan;
    double atol, rtol;
} opts_t;

/* the noise pass's options: no element-wise rule, NaN never equal (calibrate's compute_stats) */
static const opts_t no_check = {0, 0, 0.0, 0.0};

/* nothing counted yet: maxima below any |difference|, the minimum above, no worst position */
static void acc_init(acc_t *a) {
    memset(a, 0, sizeof *a);
    a->max_abs = -1.0;
    a->max_rel = -1.0;
    a->min_abs = INFINITY;
    a->worst = -1;
}

INLINE double load_f(const char *p, Py_ssize_t i) {
    float v;
    memcpy(&v, p + 4 * i, 4);
    return (double)v;
}

INLINE double load_d(const char *p, Py_ssize_t i) {
    double v;
    memcpy(&v, p + 8 * i, 8);
    return v;
}

#define LOAD(kind, p, i) ((kind) == 'f' ? load_f((p), (i)) : load_d((p), (i)))

/* The exact per-element rule, for blocks holding a non-finite value (and for short tails). */
INLINE void scalar_range(const char *rp, char rk, const char *op, char ok, Py_ssize_t lo,
                         Py_ssize_t hi, const opts_t *o, acc_t *a) {
    for (Py_ssize_t i = lo; i < hi; i++) {
        double r = LOAD(rk, rp, i), x = LOAD(ok, op, i);
        /* != 0: glibc's isinf(-inf) is -1 */
        int rn = isnan(r) != 0, xn = isnan(x) != 0, ri = isinf(r) != 0, xi = isinf(x) != 0;
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
        a->dd += d * d;
        if (fabs(r) > a->max_ref) a->max_ref = fabs(r);
    }
}

#if defined(__GNUC__) || defined(__clang__)
#define HAVE_VECTORS 1
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* m ? a : b, lane-wise: the portable spelling of max/min where no instruction is named below */
#define VSELECT(VD, VI, m, a, b) ((VD)(((VI)(a) & (m)) | ((VI)(b) & ~(m))))

/*
 * The vector loop, instantiated below for 2 lanes (SSE2 or any GNU C target) and, on x86-64,
 * for 4 lanes (AVX2, chosen at run time). MAX(a, b) must be `a > b ? a : b` and MIN(a, b)
 * `a < b ? a : b` lane-wise (what MAXPD/MINPD do). A block is assumed finite; when the sum of
 * its differences is not finite, the block is left untouched and 0 returned. Its lanes
 * (NAME##_sums), one step and the merge into acc_t are apart so that stats3's fused loop
 * (DEFINE_FUSED_BLOCK) adds the same terms in the same lanes and order as this loop. The loop
 * prefetches as stats3's does (FUSED_AHEAD, below): a core alone kept too few cache misses in
 * flight to stream even two arrays behind the division (from memory, 0.58x the time for float64
 * and 0.78x for float32 with the prefetches; benchmarks/README.md, issue 23).
 */
#define DEFINE_VECTOR_BLOCK(NAME, ATTR, W, VD, VI, LOADF, LOADD, MAX, MIN)                        \
    ATTR INLINE VD NAME##_load(const char *p, char kind, Py_ssize_t i) {                         \
        return kind == 'f' ? LOADF(p + 4 * i) : LOADD(p + 8 * i);                                \
    }                                                                                            \
    ATTR INLINE double NAME##_hsum(VD v) {                                                       \
        double s = 0.0;                                                                          \
        for (int l = 0; l < W; l++) s += v[l];                                                   \
        return s;                                                                                \
    }                                                                                            \
    typedef struct {                                                                             \
        VD vatol, vrtol, s_d, s_rel, s_dot, s_rr, s_oo, s_dd, vmax, vmin, vmaxrel, vmaxref;      \
        VI outside;                                                                              \
    } NAME##_sums;                                                                               \
    ATTR INLINE void NAME##_start(NAME##_sums *s, const opts_t *o) {                             \
        const VD zero = {0};                                                                     \
        s->vatol = zero + o->atol, s->vrtol = zero + o->rtol;                                    \
        s->s_d = s->s_rel = s->s_dot = s->s_rr = s->s_oo = s->s_dd = zero;                       \
        s->vmax = zero - 1.0, s->vmin = zero + INFINITY, s->vmaxrel = zero - 1.0;                \
        s->vmaxref = zero;                                                                       \
        s->outside = (VI){0};                                                                    \
    }                                                                                            \
    ATTR INLINE void NAME##_step(NAME##_sums *s, VD r, VD x, int check_close) {                  \
        const VI absmask = (VI){0} + INT64_MAX;                                                  \
        VD d = (VD)((VI)(x - r) & absmask);                                                      \
        VD ar = (VD)((VI)r & absmask);                                                           \
        VD rel = (VD)((VI)(d / ar) & (d != 0.0)); /* 0/0 = 0; x/0 = inf */                       \
        s->s_d += d;                                                                             \
        s->s_rel += rel;                                                                         \
        s->vmax = MAX(d, s->vmax);                                                               \
        s->vmin = MIN(d, s->vmin);                                                               \
        s->vmaxrel = MAX(rel, s->vmaxrel);                                                       \
        s->s_dot += r * x;                                                                       \
        s->s_rr += r * r;                                                                        \
        s->s_oo += x * x;                                                                        \
        s->s_dd += d * d;                                                                        \
        s->vmaxref = MAX(ar, s->vmaxref);                                                        \
        if (check_close) s->outside += (d > s->vatol + s->vrtol * ar); /* true lanes are -1 */   \
    }                                                                                            \
    /* the n elements from lo that the loop ran, then the tail up to hi by the scalar rule */    \
    ATTR INLINE int NAME##_merge(const NAME##_sums *s, const char *rp, char rk, const char *op,  \
                                 char ok, Py_ssize_t lo, Py_ssize_t n, Py_ssize_t hi,            \
                                 const opts_t *o, acc_t *a) {                                    \
        double total = NAME##_hsum(s->s_d);                                                      \
        if (!isfinite(total)) return 0; /* a NaN or Inf (or a huge difference): redo exactly */  \
        acc_t t = *a;                                                                            \
        t.total += total;                                                                        \
        t.total_rel += NAME##_hsum(s->s_rel);                                                    \
        t.dot += NAME##_hsum(s->s_dot);                                                          \
        t.rr += NAME##_hsum(s->s_rr);                                                            \
        t.oo += NAME##_hsum(s->s_oo);                                                            \
        t.dd += NAME##_hsum(s->s_dd);                                                            \
        double bmax = -1.0, bmin = INFINITY, bmr = -1.0;                                         \
        for (int l = 0; l < W; l++) {                                                            \
            if (s->vmaxref[l] > t.max_ref) t.max_ref = s->vmaxref[l];                            \
            if (s->vmax[l] > bmax) bmax = s->vmax[l];                                            \
            if (s->vmin[l] < bmin) bmin = s->vmin[l];                                            \
            if (s->vmaxrel[l] > bmr) bmr = s->vmaxrel[l];                                        \
            t.mismatched -= s->outside[l];                                                       \
        }                                                                                        \
        t.counted += n;                                                                          \
        if (n > 0) {                                                                             \
            if (bmax > t.max_abs) { /* rare after the first blocks: find the first position */   \
                for (Py_ssize_t j = lo; j < lo + n; j++) {                                       \
                    if (fabs(LOAD(ok, op, j) - LOAD(rk, rp, j)) == bmax) {                       \
                        t.worst = j;                                                             \
                        break;                                                                   \
                    }                                                                            \
                }                                                                                \
                t.max_abs = bmax;                                                                \
            }                                                                                    \
            if (bmin < t.min_abs) t.min_abs = bmin;                                              \
            if (bmr > t.max_rel) t.max_rel = bmr;                                                \
        }                                                                                        \
        *a = t;                                                                                  \
        scalar_range(rp, rk, op, ok, lo + n, hi, o, a); /* the tail */                           \
        return 1;                                                                                \
    }                                                                                            \
    /* len: the buffers' length in elements, which the prefetches stay within */                \
    ATTR INLINE int NAME(const char *rp, char rk, const char *op, char ok, Py_ssize_t lo,         \
                         Py_ssize_t hi, Py_ssize_t len, const opts_t *o, acc_t *a) {             \
        NAME##_sums s;                                                                           \
        NAME##_start(&s, o);                                                                     \
        int check_close = o->check_close;                                                        \
        Py_ssize_t n = (hi - lo) / W * W, i = lo;                                                \
        for (; i + FUSED_GROUP <= lo + n; i += FUSED_GROUP) {                                    \
            Py_ssize_t ahead = i + FUSED_AHEAD;                                                  \
            if (ahead > len - FUSED_GROUP) ahead = len - FUSED_GROUP;                            \
            prefetch_group(rp, rk, ahead);                                                       \
            prefetch_group(op, ok, ahead);                                                       \
            for (int u = 0; u < FUSED_GROUP; u += W)                                             \
                NAME##_step(&s, NAME##_load(rp, rk, i + u), NAME##_load(op, ok, i + u),          \
                            check_close);                                                        \
        }                                                                                        \
        for (; i < lo + n; i += W)                                                               \
            NAME##_step(&s, NAME##_load(rp, rk, i), NAME##_load(op, ok, i), check_close);        \
        return NAME##_merge(&s, rp, rk, op, ok, lo, n, hi, o, a);                                \
    }

/*
 * The noise's step of stats3 (hi against ref): the lines of the vector loop's step that the
 * calibration reads (the sums of differences, of squared differences and of squared hi, the
 * largest difference and |hi|, the count), in the same lanes and order, so each of these sums
 * is bit-identical to the whole loop's; no division, no relative error, no worst position. The
 * sum of differences stays for the finiteness test: a block that is not all finite is left to
 * the caller's scalar_range, as above. PAIR names the vector loop whose loads it shares.
 */
#define DEFINE_NOISE_STEP(NAME, ATTR, W, VD, VI, PAIR, MAX)                                       \
    typedef struct {                                                                             \
        VD s_d, s_rr, s_dd, vmax, vmaxref;                                                       \
    } NAME##_sums;                                                                               \
    ATTR INLINE void NAME##_start(NAME##_sums *s) {                                              \
        const VD zero = {0};                                                                     \
        s->s_d = s->s_rr = s->s_dd = s->vmaxref = zero;                                          \
        s->vmax = zero - 1.0;                                                                    \
    }                                                                                            \
    ATTR INLINE void NAME##_step(NAME##_sums *s, VD r, VD x) {                                   \
        const VI absmask = (VI){0} + INT64_MAX;                                                  \
        VD d = (VD)((VI)(x - r) & absmask);                                                      \
        VD ar = (VD)((VI)r & absmask);                                                           \
        s->s_d += d;                                                                             \
        s->vmax = MAX(d, s->vmax);                                                               \
        s->s_rr += r * r;                                                                        \
        s->s_dd += d * d;                                                                        \
        s->vmaxref = MAX(ar, s->vmaxref);                                                        \
    }                                                                                            \
    ATTR INLINE int NAME##_merge(const NAME##_sums *s, const char *rp, char rk, const char *op,  \
                                 char ok, Py_ssize_t lo, Py_ssize_t n, Py_ssize_t hi,            \
                                 acc_t *a) {                                                     \
        double total = PAIR##_hsum(s->s_d);                                                      \
        if (!isfinite(total)) return 0;                                                          \
        acc_t t = *a;                                                                            \
        t.total += total;                                                                        \
        t.rr += PAIR##_hsum(s->s_rr);                                                            \
        t.dd += PAIR##_hsum(s->s_dd);                                                            \
        double bmax = -1.0;                                                                      \
        for (int l = 0; l < W; l++) {                                                            \
            if (s->vmaxref[l] > t.max_ref) t.max_ref = s->vmaxref[l];                            \
            if (s->vmax[l] > bmax) bmax = s->vmax[l];                                            \
        }                                                                                        \
        t.counted += n;                                                                          \
        if (n > 0 && bmax > t.max_abs) t.max_abs = bmax;                                         \
        *a = t;                                                                                  \
        scalar_range(rp, rk, op, ok, lo + n, hi, &no_check, a); /* the tail */                   \
        return 1;                                                                                \
    }

/*
 * stats3's loop over one block: each W elements of ref, other and hi are loaded once and go
 * through both steps, the pair's (ref, other) and the noise's (hi, ref), each into its own
 * lanes; a side whose block is not all finite is redone by scalar_range, that side only.
 * One sweep over the three arrays, not a pair's loop and then a noise loop over each block:
 * from memory (a dump read once) the one sweep with its prefetches took 0.6x the time of the
 * two loops; from cache (a key compared again) 1.05-1.1x: the noise's vector operations are
 * the same, and of the 15 sums a few live on the stack (AVX2 has 16 vector registers).
 *
 * The prefetches: without them one core kept too few cache misses in flight to stream three
 * arrays (the fused loop took 1.6x the time of the same loop prefetching, on mapped dumps of
 * 2 x float32 and a float64; of 256 to 2048 elements ahead, 512 ran best or as well as any:
 * benchmarks/README.md, issue 23). One prefetch per line (FUSED_GROUP elements: one line of
 * float32, two of float64), the distance clamped to the buffers (len elements) so that no
 * address past them is formed.
 */
#define FUSED_AHEAD 512
#define FUSED_GROUP 16
INLINE void prefetch_group(const char *p, char kind, Py_ssize_t i) {
    __builtin_prefetch(kind == 'f' ? p + 4 * i : p + 8 * i);
    if (kind == 'd') __builtin_prefetch(p + 8 * i + 64);
}
#define DEFINE_FUSED_BLOCK(NAME, ATTR, W, VD, PAIR, NOISE)                                        \
    ATTR INLINE void NAME(const char *rp, char rk, const char *op, char ok, const char *hp,      \
                          char hk, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t len,                 \
                          const opts_t *o, acc_t *a, acc_t *na) {                                \
        PAIR##_sums s;                                                                           \
        NOISE##_sums q;                                                                          \
        PAIR##_start(&s, o);                                                                     \
        NOISE##_start(&q);                                                                       \
        int check_close = o->check_close;                                                        \
        Py_ssize_t n = (hi - lo) / W * W, i = lo;                                                \
        for (; i + FUSED_GROUP <= lo + n; i += FUSED_GROUP) {                                    \
            Py_ssize_t ahead = i + FUSED_AHEAD;                                                  \
            if (ahead > len - FUSED_GROUP) ahead = len - FUSED_GROUP;                            \
            prefetch_group(rp, rk, ahead);                                                       \
            prefetch_group(op, ok, ahead);                                                       \
            prefetch_group(hp, hk, ahead);                                                       \
            for (int u = 0; u < FUSED_GROUP; u += W) {                                           \
                VD r = PAIR##_load(rp, rk, i + u);                                               \
                PAIR##_step(&s, r, PAIR##_load(op, ok, i + u), check_close);                     \
                NOISE##_step(&q, PAIR##_load(hp, hk, i + u), r);                                 \
            }                                                                                    \
        }                                                                                        \
        for (; i < lo + n; i += W) {                                                             \
            VD r = PAIR##_load(rp, rk, i);                                                       \
            PAIR##_step(&s, r, PAIR##_load(op, ok, i), check_close);                             \
            NOISE##_step(&q, PAIR##_load(hp, hk, i), r);                                         \
        }                                                                                        \
        if (!PAIR##_merge(&s, rp, rk, op, ok, lo, n, hi, o, a))                                  \
            scalar_range(rp, rk, op, ok, lo, hi, o, a);                                          \
        if (!NOISE##_merge(&q, hp, hk, rp, rk, lo, n, hi, na))                                   \
            scalar_range(hp, hk, rp, rk, lo, hi, &no_check, na);                                 \
    }

typedef double vd2 __attribute__((vector_size(16)));
typedef int64_t vi2 __attribute__((vector_size(16)));
typedef float vf2 __attribute__((vector_size(8)));
#if defined(__SSE2__)
#define MAX2(a, b) ((vd2)_mm_max_pd((a), (b)))
#define MIN2(a, b) ((vd2)_mm_min_pd((a), (b)))
#define LOADF2(p) ((vd2)_mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(p)))))
#define LOADD2(p) ((vd2)_mm_loadu_pd((const double *)(p)))
#else
#define MAX2(a, b) VSELECT(vd2, vi2, (a) > (b), (a), (b))
#define MIN2(a, b) VSELECT(vd2, vi2, (a) < (b), (a), (b))
INLINE vd2 LOADF2(const char *p) {
    vf2 f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, vd2);
}
INLINE vd2 LOADD2(const char *p) {
    vd2 v;
    memcpy(&v, p, sizeof v);
    return v;
}
#endif
DEFINE_VECTOR_BLOCK(block2, , 2, vd2, vi2, LOADF2, LOADD2, MAX2, MIN2)
DEFINE_NOISE_STEP(noise2, , 2, vd2, vi2, block2, MAX2)
DEFINE_FUSED_BLOCK(fused2, , 2, vd2, block2, noise2)

#if defined(__x86_64__) && (defined(__linux__) || defined(__APPLE__))
#define HAVE_AVX2 1
#define AVX2 __attribute__((target("avx2")))
typedef double vd4 __attribute__((vector_size(32)));
typedef int64_t vi4 __attribute__((vector_size(32)));
#define MAX4(a, b) ((vd4)_mm256_max_pd((a), (b)))
#define MIN4(a, b) ((vd4)_mm256_min_pd((a), (b)))
#define LOADF4(p) ((vd4)_mm256_cvtps_pd(_mm_loadu_ps((const float *)(p))))
#define LOADD4(p) ((vd4)_mm256_loadu_pd((const double *)(p)))
DEFINE_VECTOR_BLOCK(block4, AVX2, 4, vd4, vi4, LOADF4, LOADD4, MAX4, MIN4)
DEFINE_NOISE_STEP(noise4, AVX2, 4, vd4, vi4, block4, MAX4)
DEFINE_FUSED_BLOCK(fused4, AVX2, 4, vd4, block4, noise4)
#endif
#endif /* vectors */

/*
 * Blocks through the vector loop, or the exact scalar rule where a block is not all finite.
 * Elements [start, n) in blocks starting at start, positions counted from the buffers' start.
 */
#define DEFINE_RUN(NAME, ATTR, VECTOR_BLOCK)                                                      \
    ATTR INLINE void NAME(const char *rp, char rk, const char *op, char ok, Py_ssize_t start,    \
                          Py_ssize_t n, Py_ssize_t block, const opts_t *o, acc_t *a) {           \
        for (Py_ssize_t lo = start; lo < n; lo += block) {                                       \
            Py_ssize_t hi = lo + block < n ? lo + block : n;                                     \
            if (VECTOR_BLOCK(rp, rk, op, ok, lo, hi, n, o, a)) continue;                         \
            scalar_range(rp, rk, op, ok, lo, hi, o, a);                                          \
        }                                                                                        \
    }

INLINE int no_vectors(const char *rp, char rk, const char *op, char ok, Py_ssize_t lo,
                      Py_ssize_t hi, Py_ssize_t len, const opts_t *o, acc_t *a) {
    (void)rp, (void)rk, (void)op, (void)ok, (void)lo, (void)hi, (void)len, (void)o, (void)a;
    return 0;
}

#ifdef HAVE_VECTORS
DEFINE_RUN(run2, , block2)
#else
DEFINE_RUN(run2, , no_vectors)
#endif
#ifdef HAVE_AVX2
DEFINE_RUN(run4, AVX2, block4)
#endif

/* One copy per dtype pair and instruction set, so the loads are decided at compile time. */
typedef void (*run_fn)(const char *, const char *, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                       const opts_t *, acc_t *);
#define SPECIALISE(NAME, ATTR, RUN, RK, OK)                                                       \
    ATTR static void NAME(const char *rp, const char *op, Py_ssize_t start, Py_ssize_t n,        \
                          Py_ssize_t block, const opts_t *o, acc_t *a) {                         \
        RUN(rp, RK, op, OK, start, n, block, o, a);                                              \
    }
SPECIALISE(base_ff, , run2, 'f', 'f')
SPECIALISE(base_fd, , run2, 'f', 'd')
SPECIALISE(base_df, , run2, 'd', 'f')
SPECIALISE(base_dd, , run2, 'd', 'd')
static const run_fn base_table[4] = {base_ff, base_fd, base_df, base_dd};
#ifdef HAVE_AVX2
SPECIALISE(avx2_ff, AVX2, run4, 'f', 'f')
SPECIALISE(avx2_fd, AVX2, run4, 'f', 'd')
SPECIALISE(avx2_df, AVX2, run4, 'd', 'f')
SPECIALISE(avx2_dd, AVX2, run4, 'd', 'd')
static const run_fn avx2_table[4] = {avx2_ff, avx2_fd, avx2_df, avx2_dd};
#endif

static const run_fn *table = base_table;
static const char *isa = "base";

/* stats3's blocks, per (ref, other, hi) kind triple and loop width: the width must be the one
 * `table` runs, or the pair's sums would be rounded differently from stats()' */
typedef void (*fused_fn)(const char *, const char *, const char *, Py_ssize_t, Py_ssize_t,
                         const opts_t *, acc_t *, acc_t *);
#define SPECIALISE_FUSED(NAME, ATTR, FUSED_BLOCK, RK, OK, HK)                                     \
    ATTR static void NAME(const char *rp, const char *op, const char *hp, Py_ssize_t n,          \
                          Py_ssize_t block, const opts_t *o, acc_t *a, acc_t *na) {              \
        for (Py_ssize_t lo = 0; lo < n; lo += block) {                                           \
            Py_ssize_t hi = lo + block < n ? lo + block : n;                                     \
            FUSED_BLOCK(rp, RK, op, OK, hp, HK, lo, hi, n, o, a, na);                            \
        }                                                                                        \
    }
#ifdef HAVE_VECTORS
#define FUSED_BASE fused2
#else
#define FUSED_BASE no_fused_vectors
INLINE void no_fused_vectors(const char *rp, char rk, const char *op, char ok, const char *hp,
                             char hk, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t len,
                             const opts_t *o, acc_t *a, acc_t *na) {
    (void)len;
    scalar_range(rp, rk, op, ok, lo, hi, o, a);
    scalar_range(hp, hk, rp, rk, lo, hi, &no_check, na);
}
#endif
SPECIALISE_FUSED(fused_base_fff, , FUSED_BASE, 'f', 'f', 'f')
SPECIALISE_FUSED(fused_base_ffd, , FUSED_BASE, 'f', 'f', 'd')
SPECIALISE_FUSED(fused_base_fdf, , FUSED_BASE, 'f', 'd', 'f')
SPECIALISE_FUSED(fused_base_fdd, , FUSED_BASE, 'f', 'd', 'd')
SPECIALISE_FUSED(fused_base_dff, , FUSED_BASE, 'd', 'f', 'f')
SPECIALISE_FUSED(fused_base_dfd, , FUSED_BASE, 'd', 'f', 'd')
SPECIALISE_FUSED(fused_base_ddf, , FUSED_BASE, 'd', 'd', 'f')
SPECIALISE_FUSED(fused_base_ddd, , FUSED_BASE, 'd', 'd', 'd')
static const fused_fn fused_base_table[8] = {fused_base_fff, fused_base_ffd, fused_base_fdf,
                                             fused_base_fdd, fused_base_dff, fused_base_dfd,
                                             fused_base_ddf, fused_base_ddd};
#ifdef HAVE_AVX2
SPECIALISE_FUSED(fused_avx2_fff, AVX2, fused4, 'f', 'f', 'f')
SPECIALISE_FUSED(fused_avx2_ffd, AVX2, fused4, 'f', 'f', 'd')
SPECIALISE_FUSED(fused_avx2_fdf, AVX2, fused4, 'f', 'd', 'f')
SPECIALISE_FUSED(fused_avx2_fdd, AVX2, fused4, 'f', 'd', 'd')
SPECIALISE_FUSED(fused_avx2_dff, AVX2, fused4, 'd', 'f', 'f')
SPECIALISE_FUSED(fused_avx2_dfd, AVX2, fused4, 'd', 'f', 'd')
SPECIALISE_FUSED(fused_avx2_ddf, AVX2, fused4, 'd', 'd', 'f')
SPECIALISE_FUSED(fused_avx2_ddd, AVX2, fused4, 'd', 'd', 'd')
static const fused_fn fused_avx2_table[8] = {fused_avx2_fff, fused_avx2_ffd, fused_avx2_fdf,
                                             fused_avx2_fdd, fused_avx2_dff, fused_avx2_dfd,
                                             fused_avx2_ddf, fused_avx2_ddd};
#endif

/*
 * The SIGBUS guard. Arrays are read where the dumps are mapped; when another process truncates
 * a mapped file, reading a page past its new end raises SIGBUS, which kills the process without
 * a word. Each call that reads caller-given buffers (stats, stats3, stats_many, crc32) arms a
 * guard around its loops: a sigsetjmp point on its own stack, published in a thread-local
 * pointer (threads run these loops at once with the GIL released, each with its own guard). The
 * handler, installed once by the first guarded call (with the GIL held) and left installed,
 * jumps back there when the fault hits an armed thread; the call then raises MappedReadError
 * (an OSError) saying which buffer faulted, and the caller names the file and key. A fault
 * anywhere else goes to the handler found at installation (SIG_DFL: the old death by SIGBUS).
 *
 * Nothing inside a guarded region allocates, takes a lock or calls Python: the jump leaves
 * nothing half done but the statistics, which are dropped. POSIX with GNU C only (thread-local
 * storage, atomics); elsewhere the macros below compile to the unguarded loops.
 */
#if (defined(__unix__) || defined(__APPLE__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_BUS_GUARD 1
#include <setjmp.h>
#include <signal.h>

typedef struct bus_guard {
    sigjmp_buf jmp;
    void *volatile addr; /* the faulting address, set by the handler */
    struct bus_guard *outer;
} bus_guard_t;

/* this thread's armed guard. An armed thread has written it, so the handler's read of it there
 * never makes the dynamic TLS model allocate (which is not signal-safe); a thread that never
 * armed one reads it only for a fault that is not ours while another thread is armed. */
static __thread bus_guard_t *bus_current;
/* guards armed in all threads: a fault while none is armed chains without reading the TLS */
static int bus_armed;
static struct sigaction bus_previous;
static int bus_installed; /* changed with the GIL held only */

static void bus_handler(int sig, siginfo_t *info, void *ctx) {
    if (__atomic_load_n(&bus_armed, __ATOMIC_SEQ_CST) > 0) {
        bus_guard_t *g = bus_current;
        if (g != NULL) {
            g->addr = info != NULL ? info->si_addr : NULL;
            siglongjmp(g->jmp, 1);
        }
    }
    /* not a read of ours: what would have happened without this handler */
    if (bus_previous.sa_flags & SA_SIGINFO) {
        bus_previous.sa_sigaction(sig, info, ctx);
    } else if (bus_previous.sa_handler != SIG_DFL && bus_previous.sa_handler != SIG_IGN) {
        bus_previous.sa_handler(sig);
    } else {
        /* the default action: returning re-runs the faulting load, which now kills the process
         * as before; a SIGBUS sent by kill() is sent again (an ignored fault kills too) */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(SIGBUS, &dfl, NULL);
        if (info == NULL || info->si_code <= 0) raise(sig);
    }
}

/* Called with the GIL held before a guarded region; 0, or -1 with an exception set. */
static int bus_install(void) {
    if (bus_installed) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = bus_handler;
    /* SA_NODEFER: SIGBUS stays deliverable in the handler, so a fault while chaining to the
     * previous handler still kills instead of hanging on a blocked signal */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &bus_previous) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    bus_installed = 1;
    return 0;
}

static void bus_arm(bus_guard_t *g) {
    g->addr = NULL;
    g->outer = bus_current;
    bus_current = g;
    __atomic_add_fetch(&bus_armed, 1, __ATOMIC_SEQ_CST);
}

static void bus_disarm(bus_guard_t *g) {
    __atomic_sub_fetch(&bus_armed, 1, __ATOMIC_SEQ_CST);
    bus_current = g->outer;
}

/* `if (BUS_GUARDED(g)) { bus_arm(&g); reads; } else { faulted }; bus_disarm(&g);`: sigsetjmp
 * must be called in the frame it returns to, so this is a macro. The signal mask is saved and
 * restored by the jump (the handler may run with signals blocked by a chained handler). */
#define BUS_GUARDED(g) (sigsetjmp((g).jmp, 1) == 0)
#else
typedef struct {
    void *addr;
} bus_guard_t;
static int bus_install(void) { return 0; }
static void bus_arm(bus_guard_t *g) { g->addr = NULL; }
static void bus_disarm(bus_guard_t *g) { (void)g; }
#define BUS_GUARDED(g) 1
#endif

static PyObject *MappedReadError;

/* Which of the n buffers holds addr (-1: none, or the fault carried no address). */
static int bus_which(void *addr, Py_buffer *const *bufs, int n) {
    for (int i = 0; i < n; i++) {
        const char *b = bufs[i]->buf;
        if (addr != NULL && (const char *)addr >= b && (const char *)addr < b + bufs[i]->len)
            return i;
    }
    return -1;
}

/* Raise MappedReadError; argument: which buffer (0-based in the call's arguments, -1 unknown),
 * job: the stats_many row being computed (-1 elsewhere). */
static PyObject *bus_raise(int argument, Py_ssize_t job) {
    PyObject *exc = PyObject_CallFunction(
        MappedReadError, "s",
        "SIGBUS: the mapped file was truncated or could not be read");
    if (exc == NULL) return NULL;
    PyObject *a = PyLong_FromLong(argument), *j = PyLong_FromSsize_t(job);
    if (a != NULL && j != NULL && PyObject_SetAttrString(exc, "argument", a) == 0 &&
        PyObject_SetAttrString(exc, "job", j) == 0)
        PyErr_SetObject(MappedReadError, exc);
    Py_XDECREF(a);
    Py_XDECREF(j);
    Py_DECREF(exc);
    return NULL;
}

PyDoc_STRVAR(stats_doc,
    "stats(ref, rkind, other, okind, block, check_close, atol, rtol, equal_nan) -> tuple\n\n"
    "Statistics of two equally long contiguous buffers of float32 ('f') or float64 ('d'),\n"
    "in the field order of reprod.diff.metrics._FIELDS; worst is -1 if nothing was counted.\n"
    "A SIGBUS while reading (a mapped file truncated meanwhile) raises MappedReadError.");

static Py_ssize_t kind_size(int k) { return k == 'f' ? 4 : k == 'd' ? 8 : 0; }

static PyObject *acc_tuple(const acc_t *a) {
    return Py_BuildValue("(LddddddLddLLLLLLLdd)", (long long)a->counted, a->total, a->total_rel,
                         a->dot, a->rr, a->oo, a->max_abs, (long long)a->worst, a->min_abs,
                         a->max_rel, (long long)a->mismatched, (long long)a->ref_nan,
                         (long long)a->ref_inf, (long long)a->other_nan, (long long)a->other_inf,
                         (long long)a->nan_unmatched, (long long)a->inf_unmatched, a->dd,
                         a->max_ref);
}

static PyObject *stats(PyObject *self, PyObject *args) {
    Py_buffer rb, ob;
    int rk, ok, check_close, equal_nan;
    Py_ssize_t block;
    double atol, rtol;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Cy*Cnpddp", &rb, &rk, &ob, &ok, &block, &check_close, &atol,
                          &rtol, &equal_nan))
        return NULL;
    Py_ssize_t rsize = kind_size(rk), osize = kind_size(ok);
    if (!rsize || !osize || rb.len % rsize || ob.len % osize || rb.len / rsize != ob.len / osize ||
        block < 1) {
        PyBuffer_Release(&rb);
        PyBuffer_Release(&ob);
        PyErr_SetString(PyExc_ValueError, "stats: bad kinds, lengths or block");
        return NULL;
    }
    if (bus_install() < 0) {
        PyBuffer_Release(&rb);
        PyBuffer_Release(&ob);
        return NULL;
    }
    Py_ssize_t n = rb.len / rsize;
    opts_t o = {check_close, equal_nan, atol, rtol};
    acc_t a;
    acc_init(&a);
    const char *rp = rb.buf, *op = ob.buf;
    bus_guard_t g;
    int faulted = 0;
    Py_BEGIN_ALLOW_THREADS
    if (BUS_GUARDED(g)) {
        bus_arm(&g);
        table[(rk == 'd') * 2 + (ok == 'd')](rp, op, 0, n, block, &o, &a);
    } else {
        faulted = 1;
    }
    bus_disarm(&g);
    Py_END_ALLOW_THREADS
    Py_buffer *bufs[2] = {&rb, &ob};
    int which = faulted ? bus_which(g.addr, bufs, 2) : -1;
    PyBuffer_Release(&rb);
    PyBuffer_Release(&ob);
    if (faulted) return bus_raise(which, -1);
    return acc_tuple(&a);
}

PyDoc_STRVAR(stats3_doc,
    "stats3(ref, rkind, other, okind, hi, hkind, block, check_close, atol, rtol, equal_nan)\n"
    "    -> (tuple, tuple)\n\n"
    "stats(ref, rkind, other, okind, block, check_close, atol, rtol, equal_nan), and what the\n"
    "calibration reads of stats(hi, hkind, ref, rkind, block, False, 0.0, 0.0, False) (the noise\n"
    "of ref against its high-precision run, reprod.diff.noise), in one pass: each element of ref\n"
    "is loaded once for both. The first tuple is bit-identical to stats()'; of the\n"
    "second, counted, total, rr, dd, max_abs, max_ref and the NaN/Inf counts are bit-identical\n"
    "to stats()' (the same blocks, lanes and order); total_rel, dot, oo, min_abs and max_rel are\n"
    "NaN, worst is -1 and mismatched 0 (not computed: no division in the noise pass).");

static PyObject *stats3(PyObject *self, PyObject *args) {
    Py_buffer rb, ob, hb;
    int rk, ok, hk, check_close, equal_nan;
    Py_ssize_t block;
    double atol, rtol;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Cy*Cy*Cnpddp", &rb, &rk, &ob, &ok, &hb, &hk, &block,
                          &check_close, &atol, &rtol, &equal_nan))
        return NULL;
    Py_ssize_t rsize = kind_size(rk), osize = kind_size(ok), hsize = kind_size(hk);
    const char *bad = NULL;
    if (!rsize || !osize || !hsize || rb.len % rsize || ob.len % osize || hb.len % hsize ||
        rb.len / rsize != ob.len / osize || rb.len / rsize != hb.len / hsize || block < 1)
        bad = "stats3: bad kinds, lengths or block";
    if (bad || bus_install() < 0) {
        PyBuffer_Release(&rb);
        PyBuffer_Release(&ob);
        PyBuffer_Release(&hb);
        if (bad) PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    Py_ssize_t n = rb.len / rsize;
    opts_t o = {check_close, equal_nan, atol, rtol};
    acc_t a, na;
    acc_init(&a);
    acc_init(&na);
    const char *rp = rb.buf, *op = ob.buf, *hp = hb.buf;
    const fused_fn *fused_table = fused_base_table;
#ifdef HAVE_AVX2
    if (table == avx2_table) fused_table = fused_avx2_table;
#endif
    fused_fn fused = fused_table[(rk == 'd') * 4 + (ok == 'd') * 2 + (hk == 'd')];
    bus_guard_t g;
    int faulted = 0;
    Py_BEGIN_ALLOW_THREADS
    if (BUS_GUARDED(g)) {
        bus_arm(&g);
        fused(rp, op, hp, n, block, &o, &a, &na);
    } else {
        faulted = 1;
    }
    bus_disarm(&g);
    Py_END_ALLOW_THREADS
    Py_buffer *bufs[3] = {&rb, &ob, &hb};
    int which = faulted ? bus_which(g.addr, bufs, 3) : -1;
    PyBuffer_Release(&rb);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&hb);
    if (faulted) return bus_raise(which, -1);
    /* the fields the noise pass leaves out (the scalar blocks computed some: dropped too) */
    na.total_rel = na.dot = na.oo = na.min_abs = na.max_rel = NAN;
    na.worst = -1;
    na.mismatched = 0;
    PyObject *first = acc_tuple(&a), *second = first ? acc_tuple(&na) : NULL;
    if (second == NULL) {
        Py_XDECREF(first);
        return NULL;
    }
    return Py_BuildValue("(NN)", first, second);
}


/*
 * moments: the sum, the sum of |x|, the least and the largest element of one float32/float64
 * buffer, in float64, in one pass. The pairing by call order fingerprints every capture by its
 * mean, mean |x| and max |x| (reprod/capture/_values.py: stats); numpy took an |x| copy and
 * three reductions, 5x a read of the capture (ResNet-50's captures at batch 8: 1.0 s of the
 * 1.3 s the pairing took). Two vectors of lanes a step, so that two independent additions are in
 * flight. A NaN makes the sums NaN (what the caller tests); the least and largest skip it.
 */
#ifdef HAVE_VECTORS
#define DEFINE_MOMENTS(NAME, ATTR, W, VD, VI, LOAD, SIZE, MAX, MIN)                               \
    ATTR static void NAME(const char *p, Py_ssize_t n, double out[4]) {                         \
        const VI absmask = (VI){0} + INT64_MAX;                                                  \
        const VD zero = {0};                                                                     \
        VD s0 = zero, s1 = zero, a0 = zero, a1 = zero;                                           \
        VD lo0 = zero + INFINITY, lo1 = lo0, hi0 = zero - INFINITY, hi1 = hi0;                   \
        Py_ssize_t i = 0, m = n / (2 * W) * (2 * W);                                             \
        for (; i < m; i += 2 * W) {                                                              \
            VD x = LOAD(p + SIZE * i), y = LOAD(p + SIZE * (i + W));                             \
            s0 += x;                                                                             \
            s1 += y;                                                                             \
            a0 += (VD)((VI)x & absmask);                                                         \
            a1 += (VD)((VI)y & absmask);                                                         \
            lo0 = MIN(x, lo0);                                                                   \
            lo1 = MIN(y, lo1);                                                                   \
            hi0 = MAX(x, hi0);                                                                   \
            hi1 = MAX(y, hi1);                                                                   \
        }                                                                                        \
        double s = 0.0, a = 0.0, lo = INFINITY, hi = -INFINITY;                                  \
        for (int l = 0; l < W; l++) {                                                            \
            s += s0[l] + s1[l];                                                                  \
            a += a0[l] + a1[l];                                                                  \
            if (lo0[l] < lo) lo = lo0[l];                                                        \
            if (lo1[l] < lo) lo = lo1[l];                                                        \
            if (hi0[l] > hi) hi = hi0[l];                                                        \
            if (hi1[l] > hi) hi = hi1[l];                                                        \
        }                                                                                        \
        for (; i < n; i++) {                                                                     \
            double v = SIZE == 4 ? load_f(p, i) : load_d(p, i);                                  \
            s += v;                                                                              \
            a += fabs(v);                                                                        \
            if (v < lo) lo = v;                                                                  \
            if (v > hi) hi = v;                                                                  \
        }                                                                                        \
        out[0] = s, out[1] = a, out[2] = lo, out[3] = hi;                                        \
    }
DEFINE_MOMENTS(moments2_f, , 2, vd2, vi2, LOADF2, 4, MAX2, MIN2)
DEFINE_MOMENTS(moments2_d, , 2, vd2, vi2, LOADD2, 8, MAX2, MIN2)
#ifdef HAVE_AVX2
DEFINE_MOMENTS(moments4_f, AVX2, 4, vd4, vi4, LOADF4, 4, MAX4, MIN4)
DEFINE_MOMENTS(moments4_d, AVX2, 4, vd4, vi4, LOADD4, 8, MAX4, MIN4)
#endif
#endif /* HAVE_VECTORS */

#ifndef HAVE_VECTORS
static void moments_scalar(const char *p, char kind, Py_ssize_t n, double out[4]) {
    double s = 0.0, a = 0.0, lo = INFINITY, hi = -INFINITY;
    for (Py_ssize_t i = 0; i < n; i++) {
        double v = LOAD(kind, p, i);
        s += v;
        a += fabs(v);
        if (v < lo) lo = v;
        if (v > hi) hi = v;
    }
    out[0] = s, out[1] = a, out[2] = lo, out[3] = hi;
}
#endif

PyDoc_STRVAR(moments_doc,
    "moments(buf, kind) -> (sum, sum_abs, min, max)\n\n"
    "Of a contiguous buffer of float32 ('f') or float64 ('d'), summed in float64, in one pass.\n"
    "A NaN makes both sums NaN; min and max skip NaNs (inf and -inf where nothing is counted).\n"
    "A SIGBUS while reading raises MappedReadError.");

static PyObject *moments(PyObject *self, PyObject *args) {
    Py_buffer b;
    int k;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*C", &b, &k)) return NULL;
    Py_ssize_t size = kind_size(k);
    if (!size || b.len % size) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "moments: bad kind or length");
        return NULL;
    }
    if (bus_install() < 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    Py_ssize_t n = b.len / size;
    double out[4];
    const char *p = b.buf;
    bus_guard_t g;
    int faulted = 0;
    Py_BEGIN_ALLOW_THREADS
    if (BUS_GUARDED(g)) {
        bus_arm(&g);
#ifdef HAVE_VECTORS
#ifdef HAVE_AVX2
        if (table == avx2_table) {
            if (k == 'f') moments4_f(p, n, out);
            else moments4_d(p, n, out);
        } else
#endif
        if (k == 'f') moments2_f(p, n, out);
        else moments2_d(p, n, out);
#else
        moments_scalar(p, (char)k, n, out);
#endif
    } else {
        faulted = 1;
    }
    bus_disarm(&g);
    Py_END_ALLOW_THREADS
    Py_buffer *bufs[1] = {&b};
    int which = faulted ? bus_which(g.addr, bufs, 1) : -1;
    PyBuffer_Release(&b);
    if (faulted) return bus_raise(which, -1);
    return Py_BuildValue("(dddd)", out[0], out[1], out[2], out[3]);
}


PyDoc_STRVAR(same_bytes_doc,
    "same_bytes(a, b) -> bool\n\n"
    "Whether two contiguous buffers hold the same bytes (memcmp). A SIGBUS while reading raises\n"
    "MappedReadError, its argument the buffer that faulted (0 or 1).");

static PyObject *same_bytes(PyObject *self, PyObject *args) {
    Py_buffer a, b;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*", &a, &b)) return NULL;
    if (a.len != b.len) {
        PyBuffer_Release(&a);
        PyBuffer_Release(&b);
        Py_RETURN_FALSE;
    }
    if (bus_install() < 0) {
        PyBuffer_Release(&a);
        PyBuffer_Release(&b);
        return NULL;
    }
    int same = 1, faulted = 0;
    bus_guard_t g;
    Py_BEGIN_ALLOW_THREADS
    if (BUS_GUARDED(g)) {
        bus_arm(&g);
        same = a.len == 0 || memcmp(a.buf, b.buf, (size_t)a.len) == 0;
    } else {
        faulted = 1;
    }
    bus_disarm(&g);
    Py_END_ALLOW_THREADS
    Py_buffer *bufs[2] = {&a, &b};
    int which = faulted ? bus_which(g.addr, bufs, 2) : -1;
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    if (faulted) return bus_raise(which, -1);
    return PyBool_FromLong(same);
}

/*
 * CRC-32 (zlib's: reflected polynomial 0xEDB88320), for the checksums of .npz members.
 * Bytes 16 at a time are folded with carry-less multiplication where the CPU has PCLMULQDQ
 * (Gopal et al., "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ", Intel 2009;
 * the constants are the paper's for this polynomial, as in Linux's crc32-pclmul and
 * Chromium's zlib), the rest by a table. zlib.crc32 ran at ~1.5 GB/s on the many small
 * members of a dump; tests/diff/test_batch_paths.py compares the two on every length and offset.
 */
static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static uint32_t crc_bytes(uint32_t c, const unsigned char *p, size_t len) {
    while (len--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_PCLMUL 1
#include <wmmintrin.h>
#include <smmintrin.h>

/* c is the running (inverted) CRC; len a multiple of 16, at least 64 */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_fold(uint32_t c, const unsigned char *buf,
                                                                  size_t len) {
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);
    const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);
    const __m128i mask32 = _mm_setr_epi32(~0, 0, ~0, 0);
    __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8;
    x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
    x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
    x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
    x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)c));
    x0 = k1k2;
    buf += 64;
    len -= 64;
    while (len >= 64) { /* four lanes of 128 bits folded 512 bits forward */
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
        x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
        x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
        x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
        x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)(buf + 0x00)));
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128((const __m128i *)(buf + 0x10)));
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128((const __m128i *)(buf + 0x20)));
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128((const __m128i *)(buf + 0x30)));
        buf += 64;
        len -= 64;
    }
    x0 = k3k4; /* the four lanes into one */
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);
    while (len >= 16) {
        x2 = _mm_loadu_si128((const __m128i *)buf);
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
        buf += 16;
        len -= 16;
    }
    /* 128 bits to 64, then Barrett reduction to 32 */
    x2 = _mm_clmulepi64_si128(x1, x0, 0x10);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2);
    x0 = k5k0;
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, mask32);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    x0 = poly;
    x2 = _mm_and_si128(x1, mask32);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
    x2 = _mm_and_si128(x2, mask32);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}
#endif

static int use_pclmul = 0;

/* zlib's crc32(crc, p, len) */
static uint32_t crc32_of(uint32_t crc, const unsigned char *p, size_t len) {
    uint32_t c = ~crc;
#ifdef HAVE_PCLMUL
    if (use_pclmul && len >= 64) {
        size_t chunk = len & ~(size_t)15;
        c = crc_fold(c, p, chunk);
        p += chunk;
        len -= chunk;
    }
#endif
    return ~crc_bytes(c, p, len);
}

PyDoc_STRVAR(crc32_doc,
    "crc32(data, value=0, fold=True) -> int\n\n"
    "zlib.crc32's result, computed here (folded with PCLMULQDQ where the CPU has it unless\n"
    "fold is false). Releases the GIL for long inputs.");

static PyObject *crc32_py(PyObject *self, PyObject *args) {
    Py_buffer b;
    unsigned int value = 0;
    int fold = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*|Ip", &b, &value, &fold)) return NULL;
    if (bus_install() < 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    int saved = use_pclmul;
    if (!fold) use_pclmul = 0;
    uint32_t c = 0;
    bus_guard_t g;
    int faulted = 0;
    if (b.len > 65536 && fold) {
        Py_BEGIN_ALLOW_THREADS
        if (BUS_GUARDED(g)) {
            bus_arm(&g);
            c = crc32_of(value, b.buf, (size_t)b.len);
        } else {
            faulted = 1;
        }
        bus_disarm(&g);
        Py_END_ALLOW_THREADS
    } else {
        if (BUS_GUARDED(g)) {
            bus_arm(&g);
            c = crc32_of(value, b.buf, (size_t)b.len);
        } else {
            faulted = 1;
        }
        bus_disarm(&g);
    }
    use_pclmul = saved;
    PyBuffer_Release(&b);
    if (faulted) return bus_raise(0, -1);
    return PyLong_FromUnsignedLong(c);
}

PyDoc_STRVAR(stats_many_doc,
    "stats_many(ref, other, jobs, tols, out, block, equal_nan) -> None\n\n"
    "stats() of many pairs viewed in two buffers, in one call (dumps of thousands of small keys\n"
    "spent more time calling stats() than in it). jobs: int64 rows of MANY_JOB: ref byte\n"
    "offset, other byte offset, element count, kinds 0-3 for ff fd df dd, check_close, then\n"
    "for ref and for other the (start, length, expected CRC32) of a zip member to check before\n"
    "its statistics (length -1: none); tols: float64 rows of (atol, rtol); out: writable\n"
    "float64 rows named by ROW_COLUMNS: the fields of stats(), the ref and other values at worst\n"
    "(NaN when worst is -1), then per side 1 (CRC matches), 0 (it does not) or -1 (not checked).\n"
    "Every range is checked against its buffer before anything is read.");

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

#define MANY_JOB 11
#define MANY_FIELDS 23

/* stats_many's rows, in one guarded region; *at: the row being computed */
static void many_rows(const char *rbase, const char *obase, const int64_t *jobs,
                      const double *tols, double *out, Py_ssize_t n, Py_ssize_t block,
                      int equal_nan, volatile Py_ssize_t *at) {
    for (Py_ssize_t j = 0; j < n; j++) {
        *at = j;
        const int64_t *job = jobs + j * MANY_JOB;
        int kinds = (int)job[3];
        const char *rp = rbase + job[0], *op = obase + job[1];
        double *row = out + j * MANY_FIELDS;
        /* the member's checksum first: its bytes are then in cache for the statistics */
        for (int side = 0; side < 2; side++) {
            const int64_t *c = job + 5 + 3 * side;
            const char *base = side ? obase : rbase;
            row[21 + side] = c[1] == -1 ? -1.0 :
                crc32_of(0, (const unsigned char *)base + c[0], (size_t)c[1]) == (uint32_t)c[2];
        }
        opts_t o = {(int)job[4], equal_nan, tols[2 * j], tols[2 * j + 1]};
        acc_t a;
        acc_init(&a);
        table[kinds](rp, op, 0, (Py_ssize_t)job[2], block, &o, &a);
        row[0] = (double)a.counted;
        row[1] = a.total;
        row[2] = a.total_rel;
        row[3] = a.dot;
        row[4] = a.rr;
        row[5] = a.oo;
        row[6] = a.max_abs;
        row[7] = (double)a.worst;
        row[8] = a.min_abs;
        row[9] = a.max_rel;
        row[10] = (double)a.mismatched;
        row[11] = (double)a.ref_nan;
        row[12] = (double)a.ref_inf;
        row[13] = (double)a.other_nan;
        row[14] = (double)a.other_inf;
        row[15] = (double)a.nan_unmatched;
        row[16] = (double)a.inf_unmatched;
        row[17] = a.dd;
        row[18] = a.max_ref;
        if (a.worst >= 0) {
            row[19] = kinds & 2 ? load_d(rp, a.worst) : load_f(rp, a.worst);
            row[20] = kinds & 1 ? load_d(op, a.worst) : load_f(op, a.worst);
        } else {
            row[19] = row[20] = NAN;
        }
    }
}

static PyObject *stats_many(PyObject *self, PyObject *args) {
    Py_buffer rb, ob, jb, tb, outb;
    Py_ssize_t block;
    int equal_nan;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*np", &rb, &ob, &jb, &tb, &outb, &block, &equal_nan))
        return NULL;
    Py_ssize_t n = jb.len / (Py_ssize_t)(MANY_JOB * sizeof(int64_t));
    const char *bad = NULL;
    if (block < 1 || jb.len % (MANY_JOB * sizeof(int64_t)) || tb.len != n * 2 * (Py_ssize_t)sizeof(double) ||
        outb.len != n * MANY_FIELDS * (Py_ssize_t)sizeof(double))
        bad = "stats_many: jobs, tols and out do not describe the same number of pairs";
    const int64_t *jobs = jb.buf;
    for (Py_ssize_t j = 0; !bad && j < n; j++) {
        const int64_t *job = jobs + j * MANY_JOB;
        int64_t count = job[2], kinds = job[3];
        int64_t rs = kinds & 2 ? 8 : 4, os = kinds & 1 ? 8 : 4;
        if (kinds < 0 || kinds > 3 || count < 0 || count > (INT64_MAX >> 4) || job[0] < 0 ||
            job[1] < 0 || job[0] > rb.len || job[1] > ob.len || count * rs > rb.len - job[0] ||
            count * os > ob.len - job[1])
            bad = "stats_many: a job reaches outside its buffer";
        for (int side = 0; side < 2 && !bad; side++) {
            const int64_t *c = job + 5 + 3 * side;
            Py_ssize_t len = side ? ob.len : rb.len;
            if (c[1] == -1) continue;
            if (c[0] < 0 || c[1] < 0 || c[1] > UINT32_MAX || c[0] > len || c[1] > len - c[0])
                bad = "stats_many: a checksum range reaches outside its buffer";
        }
    }
    if (bad) {
        PyBuffer_Release(&rb);
        PyBuffer_Release(&ob);
        PyBuffer_Release(&jb);
        PyBuffer_Release(&tb);
        PyBuffer_Release(&outb);
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    if (bus_install() < 0) {
        PyBuffer_Release(&rb);
        PyBuffer_Release(&ob);
        PyBuffer_Release(&jb);
        PyBuffer_Release(&tb);
        PyBuffer_Release(&outb);
        return NULL;
    }
    const double *tols = tb.buf;
    double *out = outb.buf;
    const char *rbase = rb.buf, *obase = ob.buf;
    bus_guard_t g;
    int faulted = 0;
    volatile Py_ssize_t at = -1; /* the row being computed, for the error */
    Py_BEGIN_ALLOW_THREADS
    if (BUS_GUARDED(g)) {
        bus_arm(&g);
        many_rows(rbase, obase, jobs, tols, out, n, block, equal_nan, &at);
    } else {
        faulted = 1;
    }
    bus_disarm(&g);
    Py_END_ALLOW_THREADS
    Py_buffer *bufs[2] = {&rb, &ob};
    int which = faulted ? bus_which(g.addr, bufs, 2) : -1;
    PyBuffer_Release(&rb);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&jb);
    PyBuffer_Release(&tb);
    PyBuffer_Release(&outb);
    if (faulted) return bus_raise(which, at);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(scan_items_doc,
    "scan_items(buf, pos, end, limit) -> list\n\n"
    "Byte patterns of reprod.storage.legacy's pickle walker, matched in C: from pos, up to limit\n"
    "consecutive dict items of the exact form numpy's pickler writes for `key: ndarray`\n"
    "(SHORT_BINUNICODE key MEMOIZE, then the opcodes _PickleWalker._fast_array documents).\n"
    "Each item is (start, key_start, key_len, rec, nd, third, dims, shape_memo, dtype, fortran,\n"
    "data_at, n, end, steps): memo indices and offsets only. Nothing is interpreted: the walker\n"
    "checks the memo entries and commits each item as its generic loop would, and walks\n"
    "anything else itself. The scan stops at the first byte that does not fit.");

static PyObject *scan_items(PyObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t pos, end, limit;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnn", &b, &pos, &end, &limit)) return NULL;
    if (end > b.len) end = b.len;
    PyObject *items = PyList_New(0);
    if (!items) {
        PyBuffer_Release(&b);
        return NULL;
    }
    const unsigned char *u = b.buf;
    while (PyList_GET_SIZE(items) < limit && pos >= 0) {
        Py_ssize_t q = pos;
        /* the key: SHORT_BINUNICODE len bytes MEMOIZE, then BINGET (the array's first opcode) */
        if (q + 2 > end || u[q] != 0x8C) break;
        Py_ssize_t klen = u[q + 1], kstart = q + 2;
        q = kstart + klen;
        if (q + 2 > end || u[q] != 0x94 || u[q + 1] != 0x68) break;
        Py_ssize_t p = q + 2; /* after the BINGET opcode, as _fast_array starts */
        if (p + 17 > end || u[p + 1] != 0x68 || memcmp(u + p + 3, "K\x00\x85\x94h", 5) != 0 ||
            memcmp(u + p + 9, "\x87\x94R\x94(K\x01", 7) != 0)
            break;
        long rec = u[p], nd = u[p + 2], third = u[p + 8];
        q = p + 16;
        long long dims[4];
        int ndims = 0, too_many = 0;
        while (q + 5 <= end) {
            long long d;
            if (u[q] == 0x4B) {
                d = u[q + 1];
                q += 2;
            } else if (u[q] == 0x4D) {
                d = u[q + 1] | (u[q + 2] << 8);
                q += 3;
            } else if (u[q] == 0x4A) {
                d = (int32_t)le32(u + q + 1); /* signed, little-endian as pickle writes it */
                q += 5;
            } else {
                break;
            }
            if (ndims == 3) {
                too_many = 1; /* TUPLE1-3 take at most three: not this form */
                break;
            }
            dims[ndims++] = d;
        }
        if (too_many || q + 4 > end) break;
        int shape_memo, steps = 11 + ndims;
        if (u[q] == 0x29 && ndims == 0) {
            shape_memo = 0;
            q += 1;
            steps += 1;
        } else if (ndims && u[q] - 0x84 == ndims && u[q + 1] == 0x94) {
            shape_memo = 1;
            q += 2;
            steps += 2;
        } else {
            break;
        }
        if (q + 4 > end || u[q] != 0x68 || (u[q + 2] != 0x88 && u[q + 2] != 0x89)) break;
        long dtype = u[q + 1];
        int fortran = u[q + 2] == 0x88;
        unsigned char c = u[q + 3];
        q += 4;
        unsigned long long n;
        if (c == 0x43) {
            if (q + 1 > end) break;
            n = u[q];
            q += 1;
        } else if (c == 0x42) {
            if (q + 4 > end) break;
            n = le32(u + q);
            q += 4;
        } else if (c == 0x8E) {
            if (q + 8 > end) break;
            n = (uint64_t)le32(u + q) | (uint64_t)le32(u + q + 4) << 32;
            q += 8;
        } else {
            break;
        }
        Py_ssize_t data_at = q;
        if (n > (unsigned long long)(end - q)) break;
        q += (Py_ssize_t)n;
        steps += 3;
        if (q + 9 <= end && u[q] == 0x95) {
            q += 9;
            steps += 1;
        }
        if (q + 4 > end || memcmp(u + q, "\x94t\x94" "b", 4) != 0) break;
        q += 4;
        steps += 4;
        PyObject *shape = PyTuple_New(ndims);
        if (!shape) goto fail;
        for (int i = 0; i < ndims; i++) {
            PyObject *v = PyLong_FromLongLong(dims[i]);
            if (!v) {
                Py_DECREF(shape);
                goto fail;
            }
            PyTuple_SET_ITEM(shape, i, v);
        }
        PyObject *item = Py_BuildValue("(nnnlllNilinnni)", pos, kstart, klen, rec, nd, third, shape,
                                       shape_memo, dtype, fortran, data_at, (Py_ssize_t)n, q,
                                       steps + 3 /* SHORT_BINUNICODE, MEMOIZE, BINGET */);
        if (!item) goto fail;
        int err = PyList_Append(items, item);
        Py_DECREF(item);
        if (err) goto fail;
        pos = q;
    }
    PyBuffer_Release(&b);
    return items;
fail:
    Py_DECREF(items);
    PyBuffer_Release(&b);
    return NULL;
}

PyDoc_STRVAR(zip_central_doc,
    "zip_central(buf, pos, end, size, limit) -> (pos, bytes) or None\n\n"
    "reprod.storage.npz_directory._fast_directory's loop over a zip's central directory, in C:\n"
    "from pos (< end), up to limit entries of the plain kind (stored, no flag but UTF-8, sizes\n"
    "equal, at most the one padding extra field, the local header naming the member alike, all\n"
    "inside size bytes) with ASCII names holding no NUL. Returns where it stopped and, per entry,\n"
    "seven int64s: name offset, name length, UTF-8 flag, data start, size, CRC-32, hash(name).\n"
    "None as soon as an entry is of any other kind: the Python loop then reads the directory.");

static PyObject *zip_central(PyObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t pos, end, size, limit;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnn", &b, &pos, &end, &size, &limit)) return NULL;
    if (end > b.len || size > b.len || pos < 0 || limit < 0) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "zip_central: range outside the buffer");
        return NULL;
    }
    const unsigned char *u = b.buf;
    Py_ssize_t cap = 1024, n_out = 0;
    int64_t *rec = PyMem_Malloc((size_t)cap * 7 * sizeof(int64_t));
    if (!rec) {
        PyBuffer_Release(&b);
        return PyErr_NoMemory();
    }
    int plain = 1;
    while (pos < end && n_out < limit) {
        if (pos + 46 > end) { plain = 0; break; }
        const unsigned char *c = u + pos;
        if (memcmp(c, "PK\x01\x02", 4) != 0) { plain = 0; break; }
        unsigned version = c[6];
        unsigned flags = c[8] | (c[9] << 8), method = c[10] | (c[11] << 8);
        uint32_t crc = le32(c + 16), csize = le32(c + 20), usize = le32(c + 24);
        Py_ssize_t n = c[28] | (c[29] << 8), e = c[30] | (c[31] << 8), cm = c[32] | (c[33] << 8);
        uint32_t off = le32(c + 42);
        if (version > 63 || (flags & ~0x800u) || method) { plain = 0; break; }
        Py_ssize_t p = pos + 46;
        Py_ssize_t next = p + n + e + cm;
        if (next > end) { plain = 0; break; }
        /* one extra field exactly filling e, no zip64 marker: the Python loop walks the rest */
        if (e && (e < 4 || (Py_ssize_t)(u[p + n + 2] | (u[p + n + 3] << 8)) + 4 != e ||
                  usize == 0xFFFFFFFFu || csize == 0xFFFFFFFFu || off == 0xFFFFFFFFu)) {
            plain = 0;
            break;
        }
        if (csize != usize || (Py_ssize_t)off + 30 > size) { plain = 0; break; }
        const unsigned char *l = u + off;
        Py_ssize_t ln = l[26] | (l[27] << 8), le = l[28] | (l[29] << 8);
        Py_ssize_t start = (Py_ssize_t)off + 30 + ln + le;
        if (memcmp(l, "PK\x03\x04", 4) != 0 || ln != n || start + (Py_ssize_t)usize > size ||
            memcmp(l + 30, u + p, (size_t)n) != 0) {
            plain = 0;
            break;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            if (u[p + i] >= 0x80 || u[p + i] == 0) { plain = 0; break; }
        }
        if (!plain) break;
        PyObject *name = PyUnicode_FromStringAndSize((const char *)u + p, n);
        if (!name) {
            PyMem_Free(rec);
            PyBuffer_Release(&b);
            return NULL;
        }
        Py_hash_t h = PyObject_Hash(name);
        Py_DECREF(name);
        if (h == -1 && PyErr_Occurred()) {
            PyMem_Free(rec);
            PyBuffer_Release(&b);
            return NULL;
        }
        if (n_out == cap) {
            int64_t *more = PyMem_Realloc(rec, (size_t)cap * 2 * 7 * sizeof(int64_t));
            if (!more) {
                PyMem_Free(rec);
                PyBuffer_Release(&b);
                return PyErr_NoMemory();
            }
            rec = more;
            cap *= 2;
        }
        int64_t *r = rec + n_out * 7;
        r[0] = p;
        r[1] = n;
        r[2] = (flags & 0x800u) ? 1 : 0;
        r[3] = start;
        r[4] = usize;
        r[5] = crc;
        r[6] = (int64_t)h;
        n_out++;
        pos = next;
    }
    PyBuffer_Release(&b);
    if (!plain) {
        PyMem_Free(rec);
        Py_RETURN_NONE;
    }
    PyObject *out = PyBytes_FromStringAndSize((const char *)rec, n_out * 7 * (Py_ssize_t)sizeof(int64_t));
    PyMem_Free(rec);
    if (!out) return NULL;
    return Py_BuildValue("(nN)", pos, out);
}

/*
 * The native .npz writer's batch of plain members (reprod/storage/npz_writer.py,
 * NpzWriter.add_mapping): for a run of (key, array) pairs, every byte _write_small and
 * _KeyLog.put would make, in one call. Python's per-member work (name, header, records, JSON
 * text, CRC, two struct packs) was ~6 us a member, most of a 5,000-key save.
 *
 * Phase one (the GIL held, Python objects touched) takes pairs while each is plain: a str key
 * of ASCII characters, an exact ndarray whose dtype object is one of the writer's, C-contiguous
 * by numpy's own rule (a PyBUF_ND export is refused otherwise), header and data under _ONE_WRITE,
 * the offset within the zip64 limit, the key not logged yet and no source dtype for it. It
 * lays out each member, stores its metadata text (in the key log's dict, or as rows for its
 * SQLite part) and keeps the buffer. Phase two (pack_flush), every few hundred members,
 * guarded against SIGBUS and calling no Python, copies headers and data into one chunk and
 * computes the CRCs; the chunk goes to the file's write and the directory entries onto the
 * writer's bytearray. The memory touched stays a few hundred KiB however many members (on a
 * VM a fresh page cost ~3 us: a whole batch's output and layout in fresh memory was a third
 * of its time). The first pair that does not fit ends the batch, and the writer's Python path
 * takes it, so the order of members is kept.
 */
#define PACK_MAX_DIMS 64
#ifdef _WIN32
#define PACK_CREATE_SYSTEM 0 /* zipfile's create_system: 0 on Windows, 3 (Unix) elsewhere */
#else
#define PACK_CREATE_SYSTEM 3
#endif

typedef struct {
    Py_buffer view;
    PyObject *key;        /* a reference held until the members are written */
    PyObject *header;     /* the .npy header (bytes), a reference */
    uint32_t header_crc;
    Py_ssize_t name_len;  /* of the member's name */
    int clean;            /* the name is the key + ".npy", else numbered (the array may move) */
    char numbered[40];
    unsigned long long offset;
    int pad;
    unsigned dos_time, dos_date;
} pack_member_t;

/* _SAFE_MEMBER.match(key) for a key with no "/" (re's "$" also matches before a final "\n") */
static int pack_clean(const unsigned char *k, Py_ssize_t n, Py_ssize_t max_clean) {
    if (n == 0 || n > max_clean) return 0;
    if (n >= 8 && memcmp(k, "__reprod", 8) == 0) return 0;
    Py_ssize_t end = n;
    if (n >= 2 && k[n - 1] == '\n') end = n - 1;
    for (Py_ssize_t i = 0; i < end; i++) {
        unsigned char c = k[i];
        int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 c == '_' || (i > 0 && (c == '.' || c == '-'));
        if (!ok) return 0;
    }
    return 1;
}

/* json.encoder.encode_basestring of an ASCII string, without its quotes; out holds 6 * n */
static Py_ssize_t pack_json(char *out, const unsigned char *k, Py_ssize_t n) {
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = k[i];
        switch (c) {
        case '"': *o++ = '\\'; *o++ = '"'; break;
        case '\\': *o++ = '\\'; *o++ = '\\'; break;
        case '\n': *o++ = '\\'; *o++ = 'n'; break;
        case '\r': *o++ = '\\'; *o++ = 'r'; break;
        case '\t': *o++ = '\\'; *o++ = 't'; break;
        case '\b': *o++ = '\\'; *o++ = 'b'; break;
        case '\f': *o++ = '\\'; *o++ = 'f'; break;
        default:
            if (c >= 0x20) {
                *o++ = (char)c;
            } else {
                *o++ = '\\'; *o++ = 'u'; *o++ = '0'; *o++ = '0';
                *o++ = hex[c >> 4]; *o++ = hex[c & 15];
            }
        }
    }
    return o - out;
}

/* "__reprod_<counter>.npy" (snprintf was a tenth of the batch's time); returns its length */
static Py_ssize_t pack_numbered(char *out, unsigned long long counter) {
    char digits[24];
    int nd = 0;
    do {
        digits[nd++] = (char)('0' + counter % 10);
        counter /= 10;
    } while (counter);
    memcpy(out, "__reprod_", 9);
    for (int j = 0; j < nd; j++) out[9 + j] = digits[nd - 1 - j];
    memcpy(out + 9 + nd, ".npy", 4);
    return 13 + nd;
}

static void put16(unsigned char *p, unsigned v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, unsigned long long v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* the member's DOS time and date as zipfile writes them (local time, 2-second steps), as
 * npz_members._dos_now takes them: each member reads the clock */
static void pack_dos_now(unsigned *dos_time, unsigned *dos_date) {
    static time_t cached = (time_t)-1;
    static unsigned ct, cd;
    time_t now = time(NULL);
    if (now != cached) {
        struct tm tm;
#ifdef _WIN32
        localtime_s(&tm, &now);
#else
        localtime_r(&now, &tm);
#endif
        int y = tm.tm_year + 1900 - 1980;
        ct = (unsigned)(tm.tm_hour << 11 | tm.tm_min << 5 | tm.tm_sec / 2);
        cd = (unsigned)((y > 0 ? y : 0) << 9 | (tm.tm_mon + 1) << 5 | tm.tm_mday);
        cached = now;
    }
    *dos_time = ct;
    *dos_date = cd;
}

#define PACK_PLAN 512 /* members laid out before they are copied and written */

typedef struct {
    PyObject *write;      /* the file's write */
    PyObject *central;    /* the writer's directory entries (bytearray), appended to */
    pack_member_t *plan;
    Py_ssize_t n;         /* members laid out */
    size_t bytes, cbytes; /* their bytes in the file and in the directory */
    unsigned long long written;
} pack_out_t;

/* The chunks handed to write: a few bytearrays kept for the process and used again once nobody
 * else holds them (their write is done: the helper thread and the pipe drop them then). A fresh
 * chunk was fresh pages: in a process's first save of 5,000 small keys, ~1,200 of its ~2,700
 * page faults (~2 us each on this project's VM) were the copy into new chunks. Under the GIL;
 * a free-threaded build, whose reference counts say nothing alone, takes a new one each time. */
#define PACK_CHUNKS 4
static PyObject *pack_chunks[PACK_CHUNKS];

static PyObject *pack_chunk(Py_ssize_t n) {
#ifndef Py_GIL_DISABLED
    /* where a new chunk is kept: an empty slot, else a free smaller chunk's, else, where every
       slot is busy, a busy one's.
       A chunk held elsewhere for good (a write that keeps it, a failed write's traceback waiting
       for the cycle collector) would otherwise pin its slot, and with all of them pinned every
       later chunk was fresh pages; the holder keeps the one given up alive. */
    int slot = -1, busy = -1, all_busy = 1;
    static int next_busy = 0;
    for (int i = 0; i < PACK_CHUNKS; i++) {
        PyObject *c = pack_chunks[i];
        if (c == NULL) {
            slot = i;
            continue;
        }
        if (Py_REFCNT(c) != 1) {  /* still being written */
            if (busy < 0 || i == next_busy) busy = i;
            continue;
        }
        all_busy = 0;
        PyByteArrayObject *b = (PyByteArrayObject *)c;
        /* bytearray's resize only sets the size for one of at least half of what it holds */
        if (n + 1 <= b->ob_alloc && n >= b->ob_alloc / 2 && b->ob_start == b->ob_bytes) {
            if (PyByteArray_Resize(c, n) < 0) return NULL;
            Py_INCREF(c);
            return c;
        }
        if (b->ob_alloc <= n && (slot < 0 || pack_chunks[slot] != NULL)) slot = i;
    }
    /* room to grow by an eighth (the next chunk's last member) and still be taken again */
    PyObject *c = PyByteArray_FromStringAndSize(NULL, n + (n >> 3) + 64);
    if (c == NULL || PyByteArray_Resize(c, n) < 0) {
        Py_XDECREF(c);
        return NULL;
    }
    if (slot < 0 && busy >= 0 && all_busy) {
        slot = busy;  /* round the busy slots, so that one just taken is not the next given up */
        next_busy = (busy + 1) % PACK_CHUNKS;
    }
    if (slot >= 0) {
        Py_XSETREF(pack_chunks[slot], c);
        Py_INCREF(c);
    }
    return c;
#else
    return PyByteArray_FromStringAndSize(NULL, n);
#endif
}

/* Phase two: the members laid out, copied (guarded against SIGBUS, no Python called) into one
 * chunk (a bytearray) handed to write, their directory entries onto central; their buffers and
 * references released either way. 0, or -1 with an exception set. */
static int pack_flush(pack_out_t *out) {
    int rc = -1;
    PyObject *chunk = NULL;
    if (out->n == 0) return 0;
    Py_ssize_t old = PyByteArray_GET_SIZE(out->central);
    chunk = pack_chunk((Py_ssize_t)out->bytes);
    if (chunk == NULL || PyByteArray_Resize(out->central, old + (Py_ssize_t)out->cbytes) < 0) goto release;
    {
        unsigned char *o = (unsigned char *)PyByteArray_AS_STRING(chunk);
        unsigned char *c = (unsigned char *)PyByteArray_AS_STRING(out->central) + old;
        int faulted = 0;
        bus_guard_t g;
        /* below, only the new chunk and this writer's directory are written, and the plan holds
           references to what is read: with the GIL released, a thread writing the last chunk
           runs beside this one's copy */
        PyThreadState *ts = out->bytes >= 65536 ? PyEval_SaveThread() : NULL;
        if (BUS_GUARDED(g)) {
            bus_arm(&g);
            for (Py_ssize_t j = 0; j < out->n; j++) {
                pack_member_t *m = &out->plan[j];
                const unsigned char *hb = (const unsigned char *)PyBytes_AS_STRING(m->header);
                size_t hl = (size_t)PyBytes_GET_SIZE(m->header), dl = (size_t)m->view.len;
                uint32_t size = (uint32_t)(hl + dl);
                unsigned n = (unsigned)m->name_len, e = 4 + (unsigned)m->pad;
                unsigned char *data = o + 30 + n + e + hl;
                /* the copy first, the CRC over it: memcpy streams the scattered small arrays from
                   memory faster than the fold's loads, which then find the bytes in cache */
                if (dl) memcpy(data, m->view.buf, dl);
                uint32_t crc = dl ? crc32_of(m->header_crc, data, dl) : m->header_crc;
                memcpy(o, "PK\x03\x04", 4);
                put16(o + 4, 20);
                put16(o + 6, 0);
                put16(o + 8, 0);
                put16(o + 10, m->dos_time);
                put16(o + 12, m->dos_date);
                put32(o + 14, crc);
                put32(o + 18, size);
                put32(o + 22, size);
                put16(o + 26, n);
                put16(o + 28, e);
                unsigned char *nm = o + 30;
                if (m->clean) {
                    memcpy(nm, PyUnicode_1BYTE_DATA(m->key), n - 4);
                    memcpy(nm + n - 4, ".npy", 4);
                } else {
                    memcpy(nm, m->numbered, n);
                }
                unsigned char *ex = nm + n;
                put16(ex, 0xD935);
                put16(ex + 2, (unsigned)m->pad);
                memset(ex + 4, 0, (size_t)m->pad);
                memcpy(ex + e, hb, hl);
                memcpy(c, "PK\x01\x02", 4);
                c[4] = 20;
                c[5] = (unsigned char)PACK_CREATE_SYSTEM;
                c[6] = 20;
                c[7] = 0;
                put16(c + 8, 0);
                put16(c + 10, 0);
                put16(c + 12, m->dos_time);
                put16(c + 14, m->dos_date);
                put32(c + 16, crc);
                put32(c + 20, size);
                put32(c + 24, size);
                put16(c + 28, n);
                put16(c + 30, e);
                put16(c + 32, 0);
                put16(c + 34, 0);
                put16(c + 36, 0);
                put32(c + 38, 0600u << 16);
                put32(c + 42, (uint32_t)m->offset);
                memcpy(c + 46, nm, (size_t)n + e);
                o = ex + e + hl + dl;
                c += 46 + n + e;
            }
        } else {
            faulted = 1;
        }
        bus_disarm(&g);
        if (ts != NULL) PyEval_RestoreThread(ts);
        if (faulted) {
            bus_raise(-1, -1);
            goto release;
        }
    }
    PyObject *r = PyObject_CallOneArg(out->write, chunk);
    if (r == NULL) goto release;
    Py_DECREF(r);
    out->written += out->bytes;
    rc = 0;
release:
    Py_XDECREF(chunk);
    for (Py_ssize_t j = 0; j < out->n; j++) {
        PyBuffer_Release(&out->plan[j].view);
        Py_DECREF(out->plan[j].key);
        Py_DECREF(out->plan[j].header);
    }
    out->n = 0;
    out->bytes = out->cbytes = 0;
    return rc;
}

/* numpy's version 1.0 .npy header of a C-ordered array with this descr and shape, as
 * numpy.lib.format._write_array_header lays it out (the dict's text, 21 spaces less the first
 * axis's digits for it to grow into, padded with spaces and a newline to a multiple of 64), with
 * its CRC-32, as (bytes, int); NULL without an exception where numpy would need version 2.0. The
 * caller hands a descr only where storage/npz_members.py found this text equal to numpy's. */
static PyObject *npy_header_entry(PyObject *descr, int ndim, const Py_ssize_t *shape) {
    char text[160 + 22 * PACK_MAX_DIMS];
    Py_ssize_t dl = PyBytes_GET_SIZE(descr);
    if (dl > 32) return NULL;
    int n = snprintf(text, 40, "{'descr': '");
    memcpy(text + n, PyBytes_AS_STRING(descr), (size_t)dl);
    n += (int)dl;
    n += snprintf(text + n, 40, "', 'fortran_order': False, 'shape': (");
    int first = 0;
    for (int d = 0; d < ndim; d++) {
        int w = snprintf(text + n, 24, d ? ", %lld" : "%lld", (long long)shape[d]);
        if (d == 0) first = w;
        n += w;
    }
    if (ndim == 1) text[n++] = ',';
    n += snprintf(text + n, 8, "), }");
    if (ndim > 0)
        for (int k = first; k < 21; k++) text[n++] = ' ';
    Py_ssize_t hlen = n + 1, total = hlen + 64 - (10 + hlen) % 64;
    if (total > 0xFFFF) return NULL;
    PyObject *header = PyBytes_FromStringAndSize(NULL, 10 + total);
    if (header == NULL) return NULL;
    unsigned char *h = (unsigned char *)PyBytes_AS_STRING(header);
    memcpy(h, "\x93NUMPY\x01\x00", 8);
    put16(h + 8, (unsigned)total);
    memcpy(h + 10, text, (size_t)n);
    memset(h + 10 + n, ' ', (size_t)(total - hlen));
    h[10 + total - 1] = '\n';
    PyObject *crc = PyLong_FromUnsignedLong(crc32_of(0, h, (size_t)(10 + total)));
    PyObject *entry = crc ? PyTuple_Pack(2, header, crc) : NULL;
    Py_DECREF(header);
    Py_XDECREF(crc);
    return entry;
}

PyDoc_STRVAR(npz_pack_doc,
    "npz_pack(items, start, ndarray, dtypes, headers, make_header, source_dtypes, mem, room,\n"
    "         pos, central, central_base, counter, zip64_limit, one_write, max_clean, max_key,\n"
    "         chunk, spilled, clock, write, descrs=None) -> (next, written, count, rows, texts)\n\n"
    "The members of items[start:] (a list of (key, value) tuples) up to the first pair the\n"
    "writer's Python path must take (see the comment above): their bytes (local headers,\n"
    "names, padding, .npy headers, data), from file offset pos, handed to write a chunk of\n"
    "about chunk bytes at a time (written in all), their directory entries appended to the\n"
    "bytearray central (whose first byte is at directory position central_base), count pairs\n"
    "taken, numbered names from counter. dtypes: the dtype objects taken (by identity);\n"
    "headers: a dict the call caches (header, header CRC) in, by dtype and shape, calling\n"
    "make_header(array) -> (header, crc) for one it lacks. Each key's metadata text (JSON,\n"
    "NUL, the member's record as latin-1) goes into mem (a dict) while room lasts; with mem\n"
    "None, rows is a list of (key bytes, position from spilled, record) and texts the\n"
    "length-prefixed texts, for the key log's SQLite part and side file. clock: None (each\n"
    "member reads the clock) or a fixed (DOS time, DOS date).");

static PyObject *npz_pack(PyObject *self, PyObject *args) {
    PyObject *items, *ndarray, *dtypes, *headers, *make_header, *source_dtypes, *mem, *central,
        *clock, *write;
    Py_ssize_t start, room, max_clean, max_key, chunk, spilled;
    unsigned long long pos, central_base, counter, zip64_limit, one_write;
    unsigned fixed_time = 0, fixed_date = 0;
    (void)self;
    PyObject *descrs = Py_None;
    if (!PyArg_ParseTuple(args, "O!nO!O!O!OOOnKO!KKKKnnnnOO|O", &PyList_Type, &items, &start,
                          &PyType_Type, &ndarray, &PyTuple_Type, &dtypes, &PyDict_Type, &headers,
                          &make_header, &source_dtypes, &mem, &room, &pos, &PyByteArray_Type,
                          &central, &central_base, &counter, &zip64_limit, &one_write, &max_clean,
                          &max_key, &chunk, &spilled, &clock, &write, &descrs))
        return NULL;
    if (descrs != Py_None && !PyList_Check(descrs)) {
        PyErr_SetString(PyExc_TypeError, "npz_pack: descrs must be a list or None");
        return NULL;
    }
    if (clock != Py_None && !PyArg_ParseTuple(clock, "II;npz_pack: clock must be None or (time, date)",
                                              &fixed_time, &fixed_date))
        return NULL;
    if (mem != Py_None && !PyDict_Check(mem)) {
        PyErr_SetString(PyExc_TypeError, "npz_pack: mem must be a dict or None");
        return NULL;
    }
    if (source_dtypes != Py_None && !PyDict_Check(source_dtypes)) {
        PyErr_SetString(PyExc_TypeError, "npz_pack: source_dtypes must be a dict or None");
        return NULL;
    }
    if (max_key < 0 || max_key > (1 << 20) || max_clean < 0 || max_clean > 60000) {
        PyErr_SetString(PyExc_ValueError, "npz_pack: key lengths out of range");
        return NULL;
    }
    if (start < 0 || start > PyList_GET_SIZE(items)) {
        PyErr_SetString(PyExc_IndexError, "npz_pack: start out of range");
        return NULL;
    }
    if (bus_install() < 0) return NULL;
    static PyObject *s_dtype = NULL;
    if (s_dtype == NULL && (s_dtype = PyUnicode_InternFromString("dtype")) == NULL) return NULL;

    Py_ssize_t n_items = PyList_GET_SIZE(items), count = 0, i = start;
    unsigned long long cpos = central_base + (unsigned long long)PyByteArray_GET_SIZE(central);
    pack_out_t out = {write, central, NULL, 0, 0, 0, 0};
    char *text = NULL;
    PyObject *rows = NULL, *texts = NULL, *result = NULL;
    unsigned char *blob = NULL;
    Py_ssize_t blob_len = 0, blob_cap = 0;
    /* the last header looked up: runs of one shape skip the dict */
    unsigned char last_key[2 + 8 * PACK_MAX_DIMS];
    Py_ssize_t last_len = -1;
    PyObject *last_header = NULL;
    uint32_t last_crc = 0;

    out.plan = PyMem_Malloc(PACK_PLAN * sizeof *out.plan);
    text = PyMem_Malloc((size_t)(6 * max_key + 64 + 40 + 24 + 6 * max_clean));
    if (out.plan == NULL || text == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (mem == Py_None && (rows = PyList_New(0)) == NULL) goto done;

    for (; i < n_items; i++) {
        if ((out.n == PACK_PLAN || out.bytes >= (size_t)chunk) && pack_flush(&out) < 0) goto done;
        PyObject *item = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) break;
        PyObject *key = PyTuple_GET_ITEM(item, 0), *val = PyTuple_GET_ITEM(item, 1);
        if (!PyUnicode_CheckExact(key) || !PyUnicode_IS_ASCII(key) ||
            PyUnicode_GET_LENGTH(key) > max_key || (PyObject *)Py_TYPE(val) != ndarray)
            break;
        if (mem != Py_None) {
            if (room <= 0) break;
            int seen = PyDict_Contains(mem, key);
            if (seen < 0) goto done;
            if (seen) break; /* a re-added key: its old members are superseded */
        }
        if (source_dtypes != Py_None) {
            PyObject *src = PyDict_GetItemWithError(source_dtypes, key);
            if (src == NULL && PyErr_Occurred()) goto done;
            if (src != NULL && src != Py_None) break;
        }
        PyObject *dt = PyObject_GetAttr(val, s_dtype);
        if (dt == NULL) goto done;
        Py_ssize_t which = -1;
        for (Py_ssize_t d = 0; d < PyTuple_GET_SIZE(dtypes); d++) {
            if (PyTuple_GET_ITEM(dtypes, d) == dt) {
                which = d;
                break;
            }
        }
        Py_DECREF(dt);
        if (which < 0 || which > 255) break;
        pack_member_t *m = &out.plan[out.n];
        /* PyBUF_ND without PyBUF_STRIDES: numpy refuses (ValueError) an array that is not
         * C-contiguous by its own flag; the Python path takes it, as it takes one without a
         * buffer (_write_small's exceptions) */
        if (PyObject_GetBuffer(val, &m->view, PyBUF_ND) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_ValueError) &&
                !PyErr_ExceptionMatches(PyExc_TypeError))
                goto done;
            PyErr_Clear();
            break;
        }
        int ndim = m->view.ndim;
        if (ndim > PACK_MAX_DIMS || (ndim > 0 && m->view.shape == NULL)) {
            PyBuffer_Release(&m->view);
            break;
        }
        unsigned char hkey[2 + 8 * PACK_MAX_DIMS];
        Py_ssize_t hlen = 2 + 8 * (Py_ssize_t)ndim;
        hkey[0] = (unsigned char)which;
        hkey[1] = (unsigned char)ndim;
        for (int d = 0; d < ndim; d++) put64(hkey + 2 + 8 * d, (unsigned long long)m->view.shape[d]);
        PyObject *header;
        uint32_t hcrc;
        if (hlen == last_len && memcmp(hkey, last_key, (size_t)hlen) == 0) {
            header = last_header;
            hcrc = last_crc;
        } else {
            PyObject *kb = PyBytes_FromStringAndSize((const char *)hkey, hlen);
            PyObject *entry = kb ? PyDict_GetItemWithError(headers, kb) : NULL;
            if (entry != NULL) {
                Py_INCREF(entry);
            } else if (kb != NULL && !PyErr_Occurred()) {
                PyObject *descr = descrs != Py_None && which < PyList_GET_SIZE(descrs)
                                      ? PyList_GET_ITEM(descrs, which) : Py_None;
                entry = PyBytes_Check(descr) ? npy_header_entry(descr, ndim, m->view.shape) : NULL;
                if (entry == NULL && !PyErr_Occurred()) entry = PyObject_CallOneArg(make_header, val);
                /* past 4096 shapes the dict stops growing: the header is made each time */
                if (entry != NULL && PyDict_GET_SIZE(headers) < 4096 &&
                    PyDict_SetItem(headers, kb, entry) < 0)
                    Py_CLEAR(entry);
            }
            Py_XDECREF(kb);
            unsigned long c = 0;
            if (entry != NULL) {
                if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2 ||
                    !PyBytes_Check(PyTuple_GET_ITEM(entry, 0))) {
                    PyErr_SetString(PyExc_TypeError, "npz_pack: a header must be (bytes, int)");
                    Py_CLEAR(entry);
                } else {
                    c = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(entry, 1));
                    if (c == (unsigned long)-1 && PyErr_Occurred()) Py_CLEAR(entry);
                }
            }
            if (entry == NULL) {
                PyBuffer_Release(&m->view);
                goto done;
            }
            header = PyTuple_GET_ITEM(entry, 0);
            hcrc = (uint32_t)c;
            Py_INCREF(header);
            Py_DECREF(entry);
            Py_XDECREF(last_header);
            last_header = header;
            memcpy(last_key, hkey, (size_t)hlen);
            last_len = hlen;
            last_crc = hcrc;
        }
        unsigned long long size = (unsigned long long)PyBytes_GET_SIZE(header) +
                                  (unsigned long long)m->view.len;
        if (size >= one_write || pos > zip64_limit || size > zip64_limit) {
            PyBuffer_Release(&m->view);
            break;
        }
        /* from here the pair is taken */
        const unsigned char *k = PyUnicode_1BYTE_DATA(key);
        Py_ssize_t klen = PyUnicode_GET_LENGTH(key);
        m->clean = pack_clean(k, klen, max_clean);
        if (m->clean)
            m->name_len = klen + 4;
        else
            m->name_len = pack_numbered(m->numbered, counter);
        counter++;
        Py_INCREF(key);
        m->key = key;
        Py_INCREF(header);
        m->header = header;
        m->header_crc = hcrc;
        m->offset = pos;
        if (clock == Py_None) {
            pack_dos_now(&m->dos_time, &m->dos_date);
        } else {
            m->dos_time = fixed_time;
            m->dos_date = fixed_date;
        }
        m->pad = (int)((64 - (pos + 34 + (unsigned long long)m->name_len) % 64) % 64);
        out.n++;
        count++;
        unsigned long long length = 30 + (unsigned long long)m->name_len + 4 + (unsigned)m->pad + size;
        unsigned long long clength = 46 + (unsigned long long)m->name_len + 4 + (unsigned)m->pad;
        /* the key's metadata text, then NUL and the record (offset, length, directory position) */
        char *t = text;
        memcpy(t, "{\"path\": [\"", 11);
        t += 11;
        t += pack_json(t, k, klen);
        memcpy(t, "\"], \"member\": \"", 15);
        t += 15;
        if (m->clean) { /* a clean name may end in "\n" (see pack_clean): escaped as the key */
            t += pack_json(t, k, klen);
            memcpy(t, ".npy", 4);
            t += 4;
        } else {
            memcpy(t, m->numbered, (size_t)m->name_len);
            t += m->name_len;
        }
        memcpy(t, "\"}", 2);
        t += 2;
        Py_ssize_t json_len = t - text;
        *t++ = '\0';
        put64((unsigned char *)t, pos);
        put64((unsigned char *)t + 8, length);
        put64((unsigned char *)t + 16, cpos);
        t += 24;
        if (mem != Py_None) {
            PyObject *s = PyUnicode_DecodeLatin1(text, t - text, NULL);
            if (s == NULL) goto done;
            int err = PyDict_SetItem(mem, key, s);
            Py_DECREF(s);
            if (err < 0) goto done;
            room--;
        } else {
            PyObject *row = Py_BuildValue("(y#ny#)", (const char *)k, klen, spilled + count - 1,
                                          t - 24, (Py_ssize_t)24);
            if (row == NULL) goto done;
            int err = PyList_Append(rows, row);
            Py_DECREF(row);
            if (err < 0) goto done;
            if (blob_len + 4 + json_len > blob_cap) {
                Py_ssize_t ncap = blob_cap ? 2 * blob_cap : 65536;
                while (ncap < blob_len + 4 + json_len) ncap *= 2;
                unsigned char *nb = PyMem_Realloc(blob, (size_t)ncap);
                if (nb == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                blob = nb;
                blob_cap = ncap;
            }
            put32(blob + blob_len, (uint32_t)json_len);
            memcpy(blob + blob_len + 4, text, (size_t)json_len);
            blob_len += 4 + json_len;
        }
        out.bytes += (size_t)length;
        out.cbytes += (size_t)clength;
        pos += length;
        cpos += clength;
    }
    if (pack_flush(&out) < 0) goto done;
    if (mem == Py_None && (texts = PyBytes_FromStringAndSize((const char *)blob, blob_len)) == NULL)
        goto done;
    result = Py_BuildValue("(nKnOO)", i, out.written, count, rows ? rows : Py_None,
                           texts ? texts : Py_None);
done:
    if (out.plan != NULL) {
        for (Py_ssize_t j = 0; j < out.n; j++) { /* laid out, never written: an error */
            PyBuffer_Release(&out.plan[j].view);
            Py_DECREF(out.plan[j].key);
            Py_DECREF(out.plan[j].header);
        }
    }
    PyMem_Free(out.plan);
    PyMem_Free(text);
    PyMem_Free(blob);
    Py_XDECREF(last_header);
    Py_XDECREF(rows);
    Py_XDECREF(texts);
    return result;
}

PyDoc_STRVAR(join_texts_doc,
    "join_texts(texts) -> bytes | None\n\n"
    "b', '.join of the non-empty t.partition('\\0')[0] of the strs in the list texts, UTF-8\n"
    "encoded (the key log's metadata texts, a NUL and their records after each): the metadata\n"
    "member's keys, without a Python step per key. None where a text cannot be UTF-8 (a lone\n"
    "surrogate): the caller then writes JSON's ASCII escapes.");

static PyObject *join_texts(PyObject *self, PyObject *args) {
    PyObject *list;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &list)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(list), total = 0;
    /* sized first: a 1-byte text's characters take one UTF-8 byte, or two past 0x7F */
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *t = PyList_GET_ITEM(list, j);
        if (!PyUnicode_Check(t)) {
            PyErr_SetString(PyExc_TypeError, "join_texts: texts must be str");
            return NULL;
        }
        Py_ssize_t len = PyUnicode_GET_LENGTH(t);
        if (PyUnicode_KIND(t) == PyUnicode_1BYTE_KIND) {
            const unsigned char *d = PyUnicode_1BYTE_DATA(t), *z = memchr(d, 0, (size_t)len);
            Py_ssize_t cut = z ? z - d : len;
            if (!PyUnicode_IS_ASCII(t))
                for (Py_ssize_t c = 0; c < cut; c++) total += d[c] >> 7;
            total += cut + 2;
        } else {
            total += 4 * len + 2;
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) return NULL;
    char *o = PyBytes_AS_STRING(out), *start = o;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *t = PyList_GET_ITEM(list, j);
        Py_ssize_t len = PyUnicode_GET_LENGTH(t);
        if (PyUnicode_KIND(t) == PyUnicode_1BYTE_KIND) {
            const unsigned char *d = PyUnicode_1BYTE_DATA(t), *z = memchr(d, 0, (size_t)len);
            Py_ssize_t cut = z ? z - d : len;
            if (cut == 0) continue;
            if (o != start) {
                memcpy(o, ", ", 2);
                o += 2;
            }
            if (PyUnicode_IS_ASCII(t)) {
                memcpy(o, d, (size_t)cut);
                o += cut;
            } else {
                for (Py_ssize_t c = 0; c < cut; c++) {
                    if (d[c] < 0x80) {
                        *o++ = (char)d[c];
                    } else {
                        *o++ = (char)(0xC0 | d[c] >> 6);
                        *o++ = (char)(0x80 | (d[c] & 0x3F));
                    }
                }
            }
        } else {
            Py_ssize_t cut = PyUnicode_FindChar(t, 0, 0, len, 1);
            if (cut == -2) goto fail;
            if (cut < 0) cut = len;
            if (cut == 0) continue;
            PyObject *sub = PyUnicode_Substring(t, 0, cut);
            if (sub == NULL) goto fail;
            Py_ssize_t ulen;
            const char *u = PyUnicode_AsUTF8AndSize(sub, &ulen);
            if (u == NULL) {
                Py_DECREF(sub);
                if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) goto fail;
                PyErr_Clear();
                Py_DECREF(out);
                Py_RETURN_NONE;
            }
            if (o != start) {
                memcpy(o, ", ", 2);
                o += 2;
            }
            memcpy(o, u, (size_t)ulen); /* at most 4 bytes a character: sized above */
            o += ulen;
            Py_DECREF(sub);
        }
    }
    if (_PyBytes_Resize(&out, o - start) < 0) return NULL;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/*
 * npy_pack: the common case of the .npy dict writer's per-key step (storage/_npy_writer.py,
 * _Writer.item), for a run of a mapping's items: a str key, then an exact ndarray, C-contiguous
 * by numpy's rule, of 2 bytes to frame-1, whose dtype is memoised already and which is not.
 * The opcodes are item()'s, byte for byte: the key's SHORT_BINUNICODE/BINUNICODE/
 * BINUNICODE8 and MEMOIZE (or its BINGET/LONG_BINGET where the key object is memoised), the
 * array's reduce (the writer's head, the shape, the dtype's BINGET, NEWFALSE, the payload's
 * SHORT_BINBYTES/BINBYTES), MEMOIZE TUPLE MEMOIZE BUILD; the memo dict (id -> index) and the
 * counter n move as item() moves them, and the frame is committed where item() commits it
 * (before a key, once it holds frame bytes or more). The first pair it does not take (anything
 * else: a nested dict, a dtype not seen yet, a tiny, large, non-contiguous or memoised array, a
 * subclass) is handed back untouched for item().
 *
 * The frame is the writer's bytearray, grown here in steps (its size is its capacity until the
 * call returns); payloads are copied into it a plan at a time under the SIGBUS guard, so an
 * array viewing a mapped file truncated meanwhile raises MappedReadError instead of killing the
 * process.
 */
#define NPY_PLAN 256       /* payloads laid out before they are copied */
#define NPY_MAX_DIMS 64
#define NPY_COPY_FREE (64 << 10) /* a plan of this many bytes is copied without the GIL */

typedef struct {
    Py_buffer view;
    Py_ssize_t at; /* where the payload goes in the frame */
} npy_copy_t;

typedef struct {
    PyObject *out;    /* the frame (bytearray, a reference) */
    Py_ssize_t used;  /* its bytes written so far; its size is its capacity meanwhile */
    Py_ssize_t frame; /* the frame size target */
    PyObject *write;
    npy_copy_t plan[NPY_PLAN];
    int n_plan;
} npy_out_t;

static void npy_release(npy_out_t *o) {
    for (int j = 0; j < o->n_plan; j++) PyBuffer_Release(&o->plan[j].view);
    o->n_plan = 0;
}

/* the laid-out payloads into the frame; 0, or -1 with MappedReadError set */
static int npy_copy(npy_out_t *o) {
    if (o->n_plan == 0) return 0;
    char *base = PyByteArray_AS_STRING(o->out);
    int faulted = 0;
    Py_ssize_t total = 0;
    for (int j = 0; j < o->n_plan; j++) total += o->plan[j].view.len;
    /* the .npy writer's helper thread writes the last frames meanwhile (_pipe.WritevPipe); a
     * smaller plan is not worth the GIL's hand-over */
    PyThreadState *ts = total >= NPY_COPY_FREE ? PyEval_SaveThread() : NULL;
    bus_guard_t g;
    if (BUS_GUARDED(g)) {
        bus_arm(&g);
        for (int j = 0; j < o->n_plan; j++)
            memcpy(base + o->plan[j].at, o->plan[j].view.buf, (size_t)o->plan[j].view.len);
    } else {
        faulted = 1;
    }
    bus_disarm(&g);
    if (ts != NULL) PyEval_RestoreThread(ts);
    npy_release(o);
    if (faulted) {
        bus_raise(-1, -1);
        return -1;
    }
    return 0;
}

/* room for extra more bytes. Past the first frame-and-a-quarter the capacity doubles: growing by
 * each payload was a realloc a key; under 128 KiB the buffer stays out of malloc's mmap range,
 * where each new frame's pages would be fresh ones. */
static int npy_fit(npy_out_t *o, Py_ssize_t extra) {
    Py_ssize_t cap = PyByteArray_GET_SIZE(o->out);
    if (extra > PY_SSIZE_T_MAX / 2 - o->used) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t need = o->used + extra;
    if (need <= cap) return 0;
    Py_ssize_t want = cap < PY_SSIZE_T_MAX / 4 ? 2 * cap : need;
    Py_ssize_t first = o->frame + o->frame / 4;
    if (want < first) want = first;
    if (want < need) want = need;
    return PyByteArray_Resize(o->out, want);
}

/* the frame's bytes as the writer's out holds them: its size cut back to what was written */
static int npy_settle(npy_out_t *o) {
    if (npy_copy(o) < 0) return -1;
    return PyByteArray_Resize(o->out, o->used);
}

/* _Writer.commit: FRAME and its length (for 4 bytes or more), the frame, a new bytearray */
static int npy_commit(npy_out_t *o) {
    if (npy_settle(o) < 0) return -1;
    if (o->used == 0) return 0;
    PyObject *r;
    if (o->used >= 4) {
        unsigned char head[9];
        head[0] = 0x95;
        put64(head + 1, (unsigned long long)o->used);
        PyObject *h = PyBytes_FromStringAndSize((const char *)head, 9);
        if (h == NULL) return -1;
        r = PyObject_CallOneArg(o->write, h);
        Py_DECREF(h);
        if (r == NULL) return -1;
        Py_DECREF(r);
    }
    r = PyObject_CallOneArg(o->write, o->out);
    if (r == NULL) return -1;
    Py_DECREF(r);
    PyObject *fresh = PyByteArray_FromStringAndSize(NULL, 0);
    if (fresh == NULL) return -1;
    Py_SETREF(o->out, fresh);
    o->used = 0;
    return 0;
}

/* memo[id(obj)]: its index; -1 where obj is not memoised; -2 with an exception set; -3 an index
 * the opcodes here cannot get (negative, or past LONG_BINGET's 32 bits) */
static long long npy_memo(PyObject *memo, PyObject *obj) {
    PyObject *id = PyLong_FromVoidPtr(obj);
    if (id == NULL) return -2;
    PyObject *v = PyDict_GetItemWithError(memo, id);
    Py_DECREF(id);
    if (v == NULL) return PyErr_Occurred() ? -2 : -1;
    if (!PyLong_Check(v)) return -3;
    int overflow;
    long long i = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (i == -1 && PyErr_Occurred()) return -2;
    if (overflow || i < 0 || i > 0xFFFFFFFFLL) return -3;
    return i;
}

/* memo[id(obj)] = i; 0 or -1 */
static int npy_memoize(PyObject *memo, PyObject *obj, Py_ssize_t i) {
    PyObject *id = PyLong_FromVoidPtr(obj), *v = id ? PyLong_FromSsize_t(i) : NULL;
    int rc = v ? PyDict_SetItem(memo, id, v) : -1;
    Py_XDECREF(id);
    Py_XDECREF(v);
    return rc;
}

/* _get(i): BINGET / LONG_BINGET */
static unsigned char *npy_get(unsigned char *p, long long i) {
    if (i < 256) {
        *p++ = 'h';
        *p++ = (unsigned char)i;
    } else {
        *p++ = 'j';
        put32(p, (uint32_t)i);
        p += 4;
    }
    return p;
}

PyDoc_STRVAR(npy_pack_doc,
    "npy_pack(items, count, out, memo, n, ndarray, head, write, frame)\n"
    "    -> (taken, n, out, pending)\n\n"
    "_Writer.item(k, v) of up to count pairs drawn from the iterator items, while they are the\n"
    "common case (see the comment above): their opcodes appended to the frame out (a\n"
    "bytearray), frames committed through write as _Writer.commit does (a new bytearray after\n"
    "each), memo (id -> index) and the counter n updated. head: the opcodes that start every\n"
    "array (_Prefix.head); frame: the frame size target, also the payloads' bound. Returns the\n"
    "pairs taken, the counter, the frame (out or its successor) and the first pair drawn and\n"
    "not taken (None when there was none): the caller writes it with item().");

static PyObject *npy_pack(PyObject *self, PyObject *args) {
    PyObject *items, *out_in, *memo, *ndarray, *head, *write;
    Py_ssize_t count, n, frame;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnO!O!nO!O!On", &items, &count, &PyByteArray_Type, &out_in,
                          &PyDict_Type, &memo, &n, &PyType_Type, &ndarray, &PyBytes_Type, &head,
                          &write, &frame))
        return NULL;
    if (!PyIter_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "npy_pack: items must be an iterator");
        return NULL;
    }
    if (frame < 4 || frame > ((Py_ssize_t)1 << 30) || n < 0) {
        PyErr_SetString(PyExc_ValueError, "npy_pack: frame or n out of range");
        return NULL;
    }
    if (bus_install() < 0) return NULL;
    static PyObject *s_dtype = NULL;
    if (s_dtype == NULL && (s_dtype = PyUnicode_InternFromString("dtype")) == NULL) return NULL;

    npy_out_t *o = PyMem_Malloc(sizeof *o);
    if (o == NULL) return PyErr_NoMemory();
    Py_INCREF(out_in);
    o->out = out_in;
    o->used = PyByteArray_GET_SIZE(out_in);
    o->frame = frame;
    o->write = write;
    o->n_plan = 0;
    const unsigned char *hb = (const unsigned char *)PyBytes_AS_STRING(head);
    Py_ssize_t hl = PyBytes_GET_SIZE(head), taken = 0;
    PyObject *pending = NULL, *result = NULL;

    while (taken < count) {
        PyObject *item = PyIter_Next(items);
        if (item == NULL) {
            if (PyErr_Occurred()) goto fail;
            break; /* ended early: the caller's next() says so */
        }
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            pending = item;
            break;
        }
        /* item() commits first thing, whether this pair is taken here or handed back */
        if (o->used >= frame && npy_commit(o) < 0) {
            Py_DECREF(item);
            goto fail;
        }
        PyObject *key = PyTuple_GET_ITEM(item, 0), *val = PyTuple_GET_ITEM(item, 1);
        if (!PyUnicode_CheckExact(key) || (PyObject *)Py_TYPE(val) != ndarray) {
            pending = item;
            break;
        }
        PyObject *dt = PyObject_GetAttr(val, s_dtype);
        if (dt == NULL) {
            Py_DECREF(item);
            goto fail;
        }
        long long dti = npy_memo(memo, dt);
        Py_DECREF(dt);
        long long vi = dti >= 0 ? npy_memo(memo, val) : 0;
        if (dti == -2 || vi == -2) {
            Py_DECREF(item);
            goto fail;
        }
        if (dti < 0 || vi != -1) {
            pending = item;
            break;
        }
        if (o->n_plan == NPY_PLAN && npy_copy(o) < 0) {
            Py_DECREF(item);
            goto fail;
        }
        npy_copy_t *c = &o->plan[o->n_plan];
        /* PyBUF_ND without PyBUF_STRIDES: numpy refuses (ValueError) an array that is not
         * C-contiguous by its own flag, the rule of item()'s memoryview test */
        if (PyObject_GetBuffer(val, &c->view, PyBUF_ND) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_ValueError) &&
                !PyErr_ExceptionMatches(PyExc_TypeError)) {
                Py_DECREF(item);
                goto fail;
            }
            PyErr_Clear();
            pending = item;
            break;
        }
        Py_ssize_t nbytes = c->view.len;
        int ndim = c->view.ndim, ok = nbytes > 1 && nbytes < frame && ndim <= NPY_MAX_DIMS &&
                                      (ndim == 0 || c->view.shape != NULL);
        for (int d = 0; ok && d < ndim; d++) ok = c->view.shape[d] >= 0 && c->view.shape[d] < 0x80000000LL;
        if (!ok) {
            PyBuffer_Release(&c->view);
            pending = item;
            break;
        }
        long long ki = npy_memo(memo, key);
        if (ki == -2 || ki == -3) {
            PyBuffer_Release(&c->view);
            if (ki == -3) {
                pending = item;
                break;
            }
            Py_DECREF(item);
            goto fail;
        }
        /* from here the pair is taken */
        PyObject *enc = NULL;
        const char *kb = NULL;
        Py_ssize_t kl = 0;
        if (ki < 0) {
            if (PyUnicode_IS_ASCII(key)) {
                kb = (const char *)PyUnicode_1BYTE_DATA(key);
                kl = PyUnicode_GET_LENGTH(key);
            } else {
                enc = PyUnicode_AsEncodedString(key, "utf-8", "surrogatepass");
                if (enc == NULL) {
                    PyBuffer_Release(&c->view);
                    Py_DECREF(item);
                    goto fail;
                }
                kb = PyBytes_AS_STRING(enc);
                kl = PyBytes_GET_SIZE(enc);
            }
        }
        if (npy_fit(o, kl + 10 + hl + 2 + 5 * (Py_ssize_t)ndim + 2 + 5 + 6 + nbytes + 4) < 0) {
            Py_XDECREF(enc);
            PyBuffer_Release(&c->view);
            Py_DECREF(item);
            goto fail;
        }
        unsigned char *base = (unsigned char *)PyByteArray_AS_STRING(o->out), *p = base + o->used;
        if (ki >= 0) {
            p = npy_get(p, ki);
        } else {
            if (kl < 256) {
                *p++ = 0x8c;
                *p++ = (unsigned char)kl;
            } else if ((unsigned long long)kl < 0x100000000ULL) {
                *p++ = 'X';
                put32(p, (uint32_t)kl);
                p += 4;
            } else {
                *p++ = 0x8d;
                put64(p, (unsigned long long)kl);
                p += 8;
            }
            memcpy(p, kb, (size_t)kl);
            p += kl;
            *p++ = 0x94;
            Py_XDECREF(enc);
            if (npy_memoize(memo, key, n) < 0) {
                PyBuffer_Release(&c->view);
                Py_DECREF(item);
                goto fail;
            }
            n++;
        }
        if (npy_memoize(memo, val, n + 2) < 0) {
            PyBuffer_Release(&c->view);
            Py_DECREF(item);
            goto fail;
        }
        memcpy(p, hb, (size_t)hl);
        p += hl;
        if (ndim == 0) {
            *p++ = ')';
        } else {
            if (ndim > 3) *p++ = '(';
            for (int d = 0; d < ndim; d++) {
                Py_ssize_t v = c->view.shape[d];
                if (v < 256) {
                    *p++ = 'K';
                    *p++ = (unsigned char)v;
                } else if (v < 65536) {
                    *p++ = 'M';
                    put16(p, (unsigned)v);
                    p += 2;
                } else {
                    *p++ = 'J';
                    put32(p, (uint32_t)v);
                    p += 4;
                }
            }
            if (ndim > 3) {
                *p++ = 't';
            } else {
                *p++ = (unsigned char)(0x84 + ndim);
            }
            *p++ = 0x94;
        }
        p = npy_get(p, dti);
        *p++ = 0x89;
        if (nbytes < 256) {
            *p++ = 'C';
            *p++ = (unsigned char)nbytes;
        } else {
            *p++ = 'B';
            put32(p, (uint32_t)nbytes);
            p += 4;
        }
        c->at = p - base;
        o->n_plan++;
        p += nbytes;
        memcpy(p, "\x94t\x94" "b", 4);
        p += 4;
        o->used = p - base;
        n += ndim ? 6 : 5;
        taken++;
        Py_DECREF(item);
    }
    if (npy_settle(o) < 0) goto fail;
    result = Py_BuildValue("(nnOO)", taken, n, o->out, pending ? pending : Py_None);
fail:
    npy_release(o);
    Py_XDECREF(pending);
    Py_DECREF(o->out);
    PyMem_Free(o);
    return result;
}

PyDoc_STRVAR(npy_check_doc,
    "npy_check(tree, ndarray, dtypes) -> bool\n\n"
    "_npy_writer._check(tree, dtypes) without a Python step per key: whether tree (a dict) holds\n"
    "only str keys of exact ndarrays of kind b, i, u, f or c and exact dicts of the same, nested\n"
    "200 deep at most; the distinct dtype objects go into dtypes (id -> dtype) as _check puts\n"
    "them.");

/* 1, 0 (something _check refuses), -1 with an exception set */
static int npy_check_dict(PyObject *tree, PyObject *ndarray, PyObject *dtypes, int depth,
                          PyObject **last) {
    static PyObject *s_dtype = NULL, *s_kind = NULL;
    if (s_dtype == NULL && (s_dtype = PyUnicode_InternFromString("dtype")) == NULL) return -1;
    if (s_kind == NULL && (s_kind = PyUnicode_InternFromString("kind")) == NULL) return -1;
    if (depth > 200) return 0;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(tree, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k)) return 0;
        if ((PyObject *)Py_TYPE(v) == ndarray) {
            PyObject *dt = PyObject_GetAttr(v, s_dtype);
            if (dt == NULL) return -1;
            /* runs of one dtype: its kind was checked and it is in dtypes (kept alive there) */
            if (dt == *last) {
                Py_DECREF(dt);
                continue;
            }
            PyObject *kind = PyObject_GetAttr(dt, s_kind);
            if (kind == NULL) {
                Py_DECREF(dt);
                return -1;
            }
            Py_UCS4 c = PyUnicode_Check(kind) && PyUnicode_GET_LENGTH(kind) == 1
                            ? PyUnicode_READ_CHAR(kind, 0) : 0;
            int ok = c == 'b' || c == 'i' || c == 'u' || c == 'f' || c == 'c';
            Py_DECREF(kind);
            if (!ok) {
                Py_DECREF(dt);
                return 0;
            }
            PyObject *id = PyLong_FromVoidPtr(dt);
            int err = id ? PyDict_SetItem(dtypes, id, dt) : -1;
            Py_XDECREF(id);
            Py_DECREF(dt);
            if (err < 0) return -1;
            *last = dt;
        } else if (PyDict_CheckExact(v)) {
            int r = npy_check_dict(v, ndarray, dtypes, depth + 1, last);
            if (r <= 0) return r;
        } else {
            return 0;
        }
    }
    return 1;
}

static PyObject *npy_check(PyObject *self, PyObject *args) {
    PyObject *tree, *ndarray, *dtypes, *last = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyDict_Type, &tree, &PyType_Type, &ndarray, &PyDict_Type,
                          &dtypes))
        return NULL;
    int r = npy_check_dict(tree, ndarray, dtypes, 0, &last);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

/*
 * float_texts: float.__repr__ of a column of floats, for the report writers (JSON, CSV, log),
 * whose ~11 statistics a key spent half their time in CPython's bignum dtoa. The digits and
 * their layout are _float_text.h's; the GIL stays held, as every item becomes a str.
 */
#include "_float_text.h"

PyDoc_STRVAR(float_texts_doc,
    "float_texts(col) -> list[str]\n\n"
    "[float.__repr__(x) for x in col], the same texts byte for byte (the shortest decimal that\n"
    "reads back as x, in repr's layout; 'nan' for every NaN), at ~10x the speed. col is a\n"
    "sequence of exact floats; any other item raises TypeError.");

static PyObject *float_texts(PyObject *self, PyObject *args) {
    PyObject *col;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &col)) return NULL;
    PyObject *seq = PySequence_Fast(col, "float_texts: col must be a sequence of floats");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    if (out == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyFloat_CheckExact(v)) {
            /* a subclass too: its __repr__ may differ, and the callers pass exact floats */
            PyErr_Format(PyExc_TypeError, "float_texts: item %zd is of type %.200s, not float", i,
                         Py_TYPE(v)->tp_name);
            goto fail;
        }
        char text[FT_TEXT_MAX];
        int len = ft_format(PyFloat_AS_DOUBLE(v), text);
        PyObject *s = PyUnicode_New(len, 127);
        if (s == NULL) goto fail;
        memcpy(PyUnicode_1BYTE_DATA(s), text, (size_t)len);
        PyList_SET_ITEM(out, i, s);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static int avx2_supported(void) {
#ifdef HAVE_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

PyDoc_STRVAR(set_isa_doc,
    "set_isa(name) -> str\n\n"
    "Use the 'avx2' (4 lanes) or 'base' (2 lanes, or scalar without GNU C) loop; 'best'\n"
    "picks the widest this CPU runs. Returns the previous name. Results are the same to\n"
    "float64 rounding; this exists for tests and benchmarks.");

static PyObject *set_isa(PyObject *self, PyObject *args) {
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const char *previous = isa;
    int want_avx2 = strcmp(name, "avx2") == 0 || (strcmp(name, "best") == 0 && avx2_supported());
    if (want_avx2) {
#ifdef HAVE_AVX2
        if (!avx2_supported()) {
            PyErr_SetString(PyExc_ValueError, "set_isa: this CPU has no AVX2");
            return NULL;
        }
        table = avx2_table;
        isa = "avx2";
#else
        PyErr_SetString(PyExc_ValueError, "set_isa: built without AVX2 support");
        return NULL;
#endif
    } else if (strcmp(name, "base") == 0 || strcmp(name, "best") == 0) {
        table = base_table;
        isa = "base";
    } else {
        PyErr_SetString(PyExc_ValueError, "set_isa: name must be 'best', 'avx2' or 'base'");
        return NULL;
    }
    return PyUnicode_FromString(previous);
}

static PyObject *get_isa(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyUnicode_FromString(isa);
}

/*
 * rename_exchange: renameat2(a, b, RENAME_EXCHANGE), the two names swapped in one step. AtomicFile
 * replaces an earlier dump so: a rename over an existing file makes ext4 (auto_da_alloc) allocate
 * and start writing the new file's data inside the rename (170 ms for 256 MiB here), and the old
 * file's blocks are freed there too; an exchange does neither, and the old file is removed after.
 */
#if defined(__linux__)
#include <errno.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif
#endif

PyDoc_STRVAR(rename_exchange_doc,
    "rename_exchange(a, b) -> None\n\n"
    "Swap the files (or other entries) named a and b, atomically (Linux's renameat2 with\n"
    "RENAME_EXCHANGE); OSError where the system or the file system cannot (ENOSYS, EINVAL).");

static PyObject *rename_exchange(PyObject *self, PyObject *args) {
    PyObject *a, *b;
    (void)self;
    if (!PyArg_ParseTuple(args, "O&O&", PyUnicode_FSConverter, &a, PyUnicode_FSConverter, &b))
        return NULL;
    int rc, err;
#if defined(__linux__) && defined(SYS_renameat2)
    const char *pa = PyBytes_AS_STRING(a), *pb = PyBytes_AS_STRING(b);
    Py_BEGIN_ALLOW_THREADS
    rc = (int)syscall(SYS_renameat2, AT_FDCWD, pa, AT_FDCWD, pb, RENAME_EXCHANGE);
    err = errno;
    Py_END_ALLOW_THREADS
#else
    rc = -1;
    err = ENOSYS;
#endif
    if (rc != 0) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObjects(PyExc_OSError, a, b);
    }
    Py_DECREF(a);
    Py_DECREF(b);
    if (rc != 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"stats", stats, METH_VARARGS, stats_doc},
    {"stats3", stats3, METH_VARARGS, stats3_doc},
    {"moments", moments, METH_VARARGS, moments_doc},
    {"same_bytes", same_bytes, METH_VARARGS, same_bytes_doc},
    {"stats_many", stats_many, METH_VARARGS, stats_many_doc},
    {"scan_items", scan_items, METH_VARARGS, scan_items_doc},
    {"zip_central", zip_central, METH_VARARGS, zip_central_doc},
    {"crc32", crc32_py, METH_VARARGS, crc32_doc},
    {"npz_pack", npz_pack, METH_VARARGS, npz_pack_doc},
    {"join_texts", join_texts, METH_VARARGS, join_texts_doc},
    {"npy_pack", npy_pack, METH_VARARGS, npy_pack_doc},
    {"npy_check", npy_check, METH_VARARGS, npy_check_doc},
    {"float_texts", float_texts, METH_VARARGS, float_texts_doc},
    {"set_isa", set_isa, METH_VARARGS, set_isa_doc},
    {"rename_exchange", rename_exchange, METH_VARARGS, rename_exchange_doc},
    {"isa", get_isa, METH_NOARGS, "isa() -> str: the loop in use ('avx2' or 'base')."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernel", "One-pass comparison statistics (see metrics.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernel(void) {
    crc_init();
#ifdef HAVE_PCLMUL
    __builtin_cpu_init();
    use_pclmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#endif
#ifdef HAVE_AVX2
    if (avx2_supported()) {
        table = avx2_table;
        isa = "avx2";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    /* an OSError: where the kernel is not built the same reads raise nothing of the kind, and
     * the readers' handlers of OSError already turn it into a one-line DumpFormatError */
    MappedReadError = PyErr_NewExceptionWithDoc(
        "reprod._kernel.MappedReadError",
        "A SIGBUS while the kernel read a buffer: the file mapped under it was truncated (or could\n"
        "not be read) meanwhile. argument: which buffer argument faulted (0-based, -1 unknown);\n"
        "job: the stats_many row being computed (-1 elsewhere).",
        PyExc_OSError, NULL);
    if (MappedReadError == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(MappedReadError); /* the module's reference; the static one is kept (3.9: no AddObjectRef) */
    if (PyModule_AddObject(m, "MappedReadError", MappedReadError) < 0) {
        Py_DECREF(MappedReadError);
        Py_DECREF(m);
        return NULL;
    }
    /* the one list of the row's columns: metrics.py reads its indices from here */
    PyObject *cols = Py_BuildValue(
        "(sssssssssssssssssssssss)", "counted", "total", "total_rel", "dot", "rr", "oo", "max_abs",
        "worst", "min_abs", "max_rel", "mismatched", "ref_nan", "ref_inf", "other_nan", "other_inf",
        "nan_unmatched", "inf_unmatched", "dd", "max_ref", "worst_ref", "worst_other", "crc_ref",
        "crc_other");
    if (cols == NULL || PyModule_AddObject(m, "ROW_COLUMNS", cols) < 0) {
        Py_XDECREF(cols);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

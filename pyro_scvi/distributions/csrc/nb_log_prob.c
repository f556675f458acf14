/*
 * Fused log-density and partial derivatives of the negative binomial (NB) and zero-inflated
 * negative binomial (ZINB) of scVI, in one call over the count matrix.
 *
 * Built on first use by pyro_scvi/distributions/fused.py and loaded with ctypes; the plain torch
 * formula in pyro_scvi/distributions/negative_binomial.py is the reference, and tests/test_fused.py
 * checks values and gradients against it in float64.
 *
 * Per entry (cell n, gene g), with eps = 1e-8 as in scvi-tools:
 *
 *   a     = log(theta + mu + eps)
 *   lz    = theta * (log(theta + eps) - a)                            log NB(0)
 *   nb    = lz + x * (log(mu + eps) - a) + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
 *   ZINB:   x < eps: softplus(lz - l) - softplus(-l)
 *           else:    nb - softplus(-l) - l                            (l: zero-inflation logit)
 *
 * and the derivatives of the result with respect to mu, theta and l.
 *
 * How it is fast on any compiler and CPU. At a zero count the lgamma and digamma terms cancel,
 * and UMI matrices are mostly zeros. So each row takes two passes:
 *
 *   1. the dense pass, over every entry: everything that does not vanish at x = 0. It is float32
 *      only, with no table look-ups, no calls into libm and no branches: logarithms and
 *      exponentials are the inline functions below, written so that gcc and clang vectorise the
 *      loop with whatever vectors the CPU has (SSE, AVX2, AVX-512, NEON) and without -ffast-math
 *      (checked with gcc 11 and 12, clang 14 and 16: benchmarks/kernel_toolchains.py);
 *   2. the count pass, over the non-zero entries only, gathered into contiguous buffers: the
 *      terms in x, with lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) in double precision (it
 *      cancels to a small number from terms near x log x, so float32 would lose digits on large
 *      counts) and digamma(x + theta) - digamma(theta), then added into place.
 *
 * The build is checked with the compiler's vectorisation report (pyro-scvi info --kernel):
 * the loops marked "vector loop" below must be reported as vectorised.
 * Rows are split over OpenMP threads when built with OpenMP; in a process running torch,
 * libgomp.so.1 is torch's own runtime.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EPS 1e-8f
#define HALF_LOG_2PI 0.91893853320467274
/* lgamma and digamma shift their argument up to SHIFT, where six terms of the Stirling series
 * leave an error below 1e-10 */
#define SHIFT 4
#define LOG_FACTORIAL_SIZE 1024

#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

/* ---------------------------------------------------------------------------------------------
 * Vectorisable float32 and float64 elementary functions (plain arithmetic, bit casts, selects).
 * log: v = 2^e * m with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m - 1) / (m + 1),
 * |s| < 0.172, by its odd series. exp: 2^k * exp(r) with |r| <= log(2) / 2, by Taylor.
 * ------------------------------------------------------------------------------------------- */

#define LN2_HI 0.693145751953125f          /* log 2 = LN2_HI + LN2_LO, LN2_HI with 12 bits */
#define LN2_LO 1.428606765330187e-06f

INLINE int32_t float_bits(float v) { int32_t i; memcpy(&i, &v, sizeof i); return i; }
INLINE float bits_float(int32_t i) { float v; memcpy(&v, &i, sizeof v); return v; }
INLINE uint64_t double_bits(double v) { uint64_t i; memcpy(&i, &v, sizeof i); return i; }
INLINE double bits_double(uint64_t i) { double v; memcpy(&v, &i, sizeof v); return v; }

/* log(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1], float32 (the polynomial of log_f). */
INLINE float log1p_reduced_f(float f)
{
    const float f2 = f * f;
    const float p = 0.33333331f + f * (-0.25000820f + f * (0.20001227f + f * (-0.16623357f + f * (0.14201759f
                    + f * (-0.13160183f + f * (0.12761575f + f * -0.07634493f))))));
    return f + (f * f2 * p - 0.5f * f2);
}

/* log(v) for positive normal v, float32, within 1 ulp; NaN, negative -> NaN, 0 (and subnormals) ->
 * -inf, +inf -> +inf.
 * log(1 + f) = f - f^2/2 + f^3 P(f) with P of degree 7 fitted for minimal relative error on
 * [sqrt(1/2) - 1, sqrt(2) - 1] (0.82 ulp at most over 2e6 arguments). */
INLINE float log_f(float v)
{
    const int32_t bits = float_bits(v);
    int32_t exponent = ((bits >> 23) & 0xff) - 127;
    float m = bits_float((bits & 0x007fffff) | 0x3f800000); /* [1, 2) */
    const int high = m > 1.41421356f;
    m = high ? 0.5f * m : m;
    exponent += high;
    const float e = (float)exponent;
    const float result = e * LN2_HI + (log1p_reduced_f(m - 1.0f) + e * LN2_LO);
    /* v not a positive normal number: 0 and subnormals -> -inf, negative -> NaN; +inf, NaN -> v */
    const float finite = v >= 1.17549435e-38f ? result : (v >= 0.0f ? -INFINITY : NAN);
    return v < INFINITY ? finite : v;
}

/* exp(t) for t <= 0 (NaN -> NaN), float32, within about 1 ulp; 0 below -87.3 (where it would be
 * subnormal). */
INLINE float exp_nonpositive_f(float t)
{
    const float round = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const float t_clamped = t < -87.3f ? -87.3f : t;
    const float k = (t_clamped * 1.44269504f + round) - round;
    const float r = (t_clamped - k * LN2_HI) - k * LN2_LO;
    const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6.0f + r * (1.0f / 24.0f
                    + r * (1.0f / 120.0f + r * (1.0f / 720.0f + r * (1.0f / 5040.0f)))))));
    const float scale = bits_float(((int32_t)k + 127) << 23);
    return t < -87.3f ? 0.0f : p * scale;
}

/* softplus(u) = log(1 + e^u) and sigmoid(u), from one e = e^-|u| in [0, 1]: log(1 + e) is
 * log1p_reduced_f(e), or above sqrt(2) - 1, log 2 + log1p_reduced_f((e - 1) / 2) (both exact
 * reductions, so 1 + e is never rounded). */
INLINE void softplus_sigmoid(float u, float *softplus, float *sigmoid)
{
    const float e = exp_nonpositive_f(-fabsf(u));
    const int high = e > 0.41421356f;
    const float log1p_e = log1p_reduced_f(high ? 0.5f * (e - 1.0f) : e) + (high ? LN2_HI + LN2_LO : 0.0f);
    const float r = 1.0f / (1.0f + e);
    *softplus = (u > 0.0f ? u : 0.0f) + log1p_e;
    *sigmoid = u >= 0.0f ? r : e * r;
}

/* log(v) for finite v > 0 in double precision (relative error about 1e-16); NaN -> NaN. */
INLINE double log_d(double v)
{
    const uint64_t bits = double_bits(v);
    /* exponent field as a double without an int64 -> double conversion (none in AVX2); unsigned,
     * as AVX2 has no arithmetic shift of 64-bit lanes */
    const double exponent_field = bits_double(((bits >> 52) & 0x7ff) | 0x4330000000000000ULL) - 4503599627370496.0;
    double m = bits_double((bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);
    const int high = m > 1.4142135623730951;
    m = high ? 0.5 * m : m;
    const double e = exponent_field - 1023.0 + (high ? 1.0 : 0.0);
    const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
    const double series = s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11
                          + s2 * (1.0 / 13 + s2 * (1.0 / 15 + s2 * (1.0 / 17 + s2 * (1.0 / 19)))))))));
    const double result = e * 0.6931471805599453 + 2.0 * s * (1.0 + series);
    return v == v ? result : v;
}

/* lgamma(y) for y > 0, double precision: the recurrence up to z >= SHIFT, then Stirling. */
INLINE double log_gamma_d(double y)
{
    double product = 1.0, z = y;
    for (int j = 0; j < SHIFT; ++j) {
        const int shift = z < (double)SHIFT;
        product = shift ? product * z : product;
        z = shift ? z + 1.0 : z;
    }
    const double inv = 1.0 / z, inv2 = inv * inv;
    const double series = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 * (1.0 / 1680.0
                          - inv2 * (1.0 / 1188.0 - inv2 * (691.0 / 360360.0))))));
    return (z - 0.5) * log_d(z) - z + HALF_LOG_2PI + series - log_d(product);
}

/* digamma(y) for y > 0, float32 (the shift's sum of reciprocals as one fraction: one division). */
INLINE float digamma_f(float y)
{
    float numerator = 0.0f, denominator = 1.0f, z = y;
    for (int j = 0; j < SHIFT; ++j) {
        const int shift = z < (float)SHIFT;
        numerator = shift ? numerator * z + denominator : numerator;
        denominator = shift ? denominator * z : denominator;
        z = shift ? z + 1.0f : z;
    }
    const float inv = 1.0f / z, inv2 = inv * inv;
    const float series = inv2 * (1.0f / 12.0f - inv2 * (1.0f / 120.0f - inv2 * (1.0f / 252.0f - inv2 * (1.0f / 240.0f
                         - inv2 * (1.0f / 132.0f - inv2 * (691.0f / 32760.0f))))));
    return log_f(z) - 0.5f * inv - series - numerator / denominator;
}

/* log k! for whole counts k < LOG_FACTORIAL_SIZE (filled on the first call) */
static double log_factorial[LOG_FACTORIAL_SIZE];
static int log_factorial_ready = 0;

static void fill_log_factorial(void)
{
    double sum = 0.0;
    for (int k = 0; k < LOG_FACTORIAL_SIZE; ++k) {
        sum += k > 0 ? log((double)k) : 0.0;
        log_factorial[k] = sum;
    }
    log_factorial_ready = 1;
}

/* ---------------------------------------------------------------------------------------------
 * The two passes over one row.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    int64_t n_rows, n_cols;
    const float *x;      /* (n, G) counts */
    const float *mu;     /* (n, G) NB mean */
    const float *theta;  /* (G,) when theta_row_stride == 0, else (n, G) */
    int64_t theta_row_stride;
    const float *logits; /* (n, G) zero-inflation logits, NULL for NB */
    float *log_prob;     /* (n, G) out */
    float *d_mu, *d_theta, *d_logits; /* (n, G) out, or all NULL: values only */
    /* per-gene terms when theta_row_stride == 0: log(theta + eps), 1/(theta + eps), lgamma, digamma */
    const float *gene_log_theta, *gene_inv_theta, *gene_digamma;
    const double *gene_lgamma;
} Job;

/* Per-thread buffers of the count pass over the non-zero entries of one row. */
typedef struct {
    int32_t *index;                 /* (G,) column of each non-zero entry */
    float *x, *mu, *theta;          /* (G,) their counts and parameters, gathered */
    double *counts;                 /* (G,) lgamma(x + theta) [- lgamma(theta) for theta per entry] */
    float *x_term, *d_mu, *d_theta; /* (G,) x log(mu / (theta + mu)) and the derivatives' x terms */
} Workspace;

/* Pass 1 over all G entries of a row: everything that does not vanish at x = 0, which is the
 * complete result at the zero counts. The flags are compile-time constants at each call site, so
 * each combination is its own branch-free loop. */
INLINE void dense_pass(int64_t G, const float *restrict x, const float *restrict mu,
                       const float *restrict theta, const float *restrict logits, float *restrict lp,
                       float *restrict d_mu, float *restrict d_theta, float *restrict d_logits,
                       const float *restrict gene_log_theta, const float *restrict gene_inv_theta,
                       const int per_gene, const int zero_inflated, const int with_grad)
{
    for (int64_t g = 0; g < G; ++g) { /* vector loop: dense */
        const float m = mu[g], th = theta[g];
        const float log_th = per_gene ? gene_log_theta[g] : log_f(th + EPS);
        const float inv_th = per_gene ? gene_inv_theta[g] : 1.0f / (th + EPS);
        const float inv_thm = 1.0f / (th + m + EPS);
        const float log_ratio = log_th - log_f(th + m + EPS);
        const float lz = th * log_ratio;                      /* log NB(0) */
        const float dlz_dmu = -th * inv_thm;
        const float dlz_dth = log_ratio + th * (inv_th - inv_thm);
        if (zero_inflated) {
            const float l = logits[g];
            float sp_neg, sig_neg, sp_zero, sig_zero;
            softplus_sigmoid(-l, &sp_neg, &sig_neg);
            softplus_sigmoid(lz - l, &sp_zero, &sig_zero);
            const int zero = x[g] < EPS;
            lp[g] = zero ? sp_zero - sp_neg : lz - sp_neg - l;
            if (with_grad) {
                d_mu[g] = zero ? sig_zero * dlz_dmu : dlz_dmu;
                d_theta[g] = zero ? sig_zero * dlz_dth : dlz_dth;
                d_logits[g] = zero ? sig_neg - sig_zero : sig_neg - 1.0f;
            }
        } else {
            lp[g] = lz;
            if (with_grad) {
                d_mu[g] = dlz_dmu;
                d_theta[g] = dlz_dth;
            }
        }
    }
}

/* Pass 2 over the n gathered non-zero entries of a row: the terms in x, as two loops of one precision
 * each (lgamma in double, the rest in float32) over contiguous arrays only, which every compiler
 * vectorises (gathers through indices it may not: gcc 12 refuses them for AMD Zen). Terms per gene
 * (lgamma, digamma of a per-gene theta) and log x! are subtracted when the results are put back. */
INLINE void count_pass(int64_t n, const float *restrict x, const float *restrict mu, const float *restrict theta,
                       double *restrict counts, float *restrict x_term, float *restrict d_mu,
                       float *restrict d_theta, const int per_gene, const int with_grad)
{
    for (int64_t c = 0; c < n; ++c) /* vector loop: lgamma */
        counts[c] = log_gamma_d((double)x[c] + (double)theta[c]) - (per_gene ? 0.0 : log_gamma_d(theta[c]));
    for (int64_t c = 0; c < n; ++c) { /* vector loop: x terms */
        const float inv_thm = 1.0f / (theta[c] + mu[c] + EPS);
        x_term[c] = x[c] * log_f((mu[c] + EPS) * inv_thm);
        if (with_grad) {
            d_mu[c] = x[c] * (1.0f / (mu[c] + EPS) - inv_thm);
            d_theta[c] = digamma_f(x[c] + theta[c]) - (per_gene ? 0.0f : digamma_f(theta[c])) - x[c] * inv_thm;
        }
    }
}

/* lgamma(x + 1) = log x!: from the table for whole counts below its size, else by the series. */
static inline double log_factorial_of(float x)
{
    const int whole = (int)x; /* clamped as an integer: NaN or huge x must not index outside */
    const int k = whole < 0 ? 0 : (whole > LOG_FACTORIAL_SIZE - 1 ? LOG_FACTORIAL_SIZE - 1 : whole);
    return (float)k == x ? log_factorial[k] : log_gamma_d((double)x + 1.0);
}

/* Find the entries of a row whose x terms do not vanish (x != 0; for ZINB x >= eps, where the NB
 * branch is taken), gather them, run the count pass and add its results into place. */
INLINE void count_terms(const Job *job, int64_t G, const float *restrict x, const float *restrict mu,
                        const float *restrict theta, float *restrict lp, float *restrict d_mu,
                        float *restrict d_theta, const Workspace *ws, const int per_gene,
                        const int zero_inflated, const int with_grad)
{
    int32_t *restrict index = ws->index;
    int64_t n = 0;
    for (int64_t g = 0; g < G; ++g) { /* branch-free compaction of the column indices */
        index[n] = (int32_t)g;
        n += zero_inflated ? !(x[g] < EPS) : (x[g] != 0.0f);
    }
    for (int64_t c = 0; c < n; ++c) {
        const int32_t g = index[c];
        ws->x[c] = x[g];
        ws->mu[c] = mu[g];
        ws->theta[c] = theta[g];
    }
    count_pass(n, ws->x, ws->mu, ws->theta, ws->counts, ws->x_term, ws->d_mu, ws->d_theta, per_gene, with_grad);
    for (int64_t c = 0; c < n; ++c) {
        const int32_t g = index[c];
        const double per_gene_lgamma = per_gene ? job->gene_lgamma[g] : 0.0;
        lp[g] += ws->x_term[c] + (float)(ws->counts[c] - per_gene_lgamma - log_factorial_of(ws->x[c]));
        if (with_grad) {
            d_mu[g] += ws->d_mu[c];
            d_theta[g] += ws->d_theta[c] - (per_gene ? job->gene_digamma[g] : 0.0f);
        }
    }
}

INLINE void row(const Job *job, int64_t n, const Workspace *ws, const int per_gene, const int zero_inflated,
                const int with_grad)
{
    const int64_t G = job->n_cols;
    const float *x = job->x + n * G, *mu = job->mu + n * G;
    const float *theta = job->theta + n * job->theta_row_stride;
    const float *logits = zero_inflated ? job->logits + n * G : NULL;
    float *lp = job->log_prob + n * G;
    float *d_mu = with_grad ? job->d_mu + n * G : NULL;
    float *d_theta = with_grad ? job->d_theta + n * G : NULL;
    float *d_logits = with_grad && zero_inflated ? job->d_logits + n * G : NULL;
    dense_pass(G, x, mu, theta, logits, lp, d_mu, d_theta, d_logits, job->gene_log_theta, job->gene_inv_theta,
               per_gene, zero_inflated, with_grad);
    count_terms(job, G, x, mu, theta, lp, d_mu, d_theta, ws, per_gene, zero_inflated, with_grad);
}

static void run_rows(const Job *job, int64_t begin, int64_t end, const Workspace *ws)
{
    const int per_gene = job->theta_row_stride == 0;
    const int zero_inflated = job->logits != NULL;
    const int with_grad = job->d_mu != NULL;
    for (int64_t n = begin; n < end; ++n) {
        switch (per_gene * 4 + zero_inflated * 2 + with_grad) {
        case 0: row(job, n, ws, 0, 0, 0); break;
        case 1: row(job, n, ws, 0, 0, 1); break;
        case 2: row(job, n, ws, 0, 1, 0); break;
        case 3: row(job, n, ws, 0, 1, 1); break;
        case 4: row(job, n, ws, 1, 0, 0); break;
        case 5: row(job, n, ws, 1, 0, 1); break;
        case 6: row(job, n, ws, 1, 1, 0); break;
        default: row(job, n, ws, 1, 1, 1); break;
        }
    }
}

/* Rows [begin, end) with a workspace of its own; -1 when memory ran out. */
static int run_block(const Job *job, int64_t begin, int64_t end)
{
    const size_t G = (size_t)(job->n_cols > 0 ? job->n_cols : 1);
    char *memory = malloc(G * (sizeof(double) + 6 * sizeof(float) + sizeof(int32_t)));
    if (memory == NULL)
        return -1;
    Workspace ws;
    ws.counts = (double *)memory;
    ws.x = (float *)(ws.counts + G);
    ws.mu = ws.x + G;
    ws.theta = ws.mu + G;
    ws.x_term = ws.theta + G;
    ws.d_mu = ws.x_term + G;
    ws.d_theta = ws.d_mu + G;
    ws.index = (int32_t *)(ws.d_theta + G);
    run_rows(job, begin, end, &ws);
    free(memory);
    return 0;
}

#ifndef PYRO_SCVI_BUILD_FLAGS
#define PYRO_SCVI_BUILD_FLAGS "unknown"
#endif

/* The compiler flags this library was built with (set by the build). */
const char *nb_log_prob_build_flags(void) { return PYRO_SCVI_BUILD_FLAGS; }

/* Whether this build runs rows on several threads (1) or one (0). */
int nb_log_prob_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/*
 * Entry point. Arrays are C-contiguous float32. d_mu, d_theta and d_logits are all NULL (values
 * only) or all given (d_logits may be NULL for NB). Returns 0, or -1 when memory ran out.
 */
int nb_log_prob(int64_t n_rows, int64_t n_cols, const float *x, const float *mu, const float *theta,
                int64_t theta_row_stride, const float *logits, float *log_prob, float *d_mu,
                float *d_theta, float *d_logits, int n_threads)
{
    if (!log_factorial_ready)
        fill_log_factorial();
    void *gene_terms = NULL;
    Job job = {n_rows, n_cols, x, mu, theta, theta_row_stride, logits, log_prob, d_mu, d_theta,
               d_logits, NULL, NULL, NULL, NULL};
    if (theta_row_stride == 0) { /* one theta per gene: its own terms once per gene */
        gene_terms = malloc(sizeof(double) * 4 * (size_t)(n_cols > 0 ? n_cols : 1));
        if (gene_terms == NULL)
            return -1;
        double *lgamma_th = (double *)gene_terms;
        float *log_th = (float *)(lgamma_th + n_cols), *inv_th = log_th + n_cols, *digamma_th = inv_th + n_cols;
        for (int64_t g = 0; g < n_cols; ++g) {
            log_th[g] = log_f(theta[g] + EPS);
            inv_th[g] = 1.0f / (theta[g] + EPS);
            lgamma_th[g] = log_gamma_d(theta[g]);
            digamma_th[g] = digamma_f(theta[g]);
        }
        job.gene_log_theta = log_th;
        job.gene_inv_theta = inv_th;
        job.gene_lgamma = lgamma_th;
        job.gene_digamma = digamma_th;
    }
    if (n_threads < 1)
        n_threads = 1;
    if (n_threads > n_rows)
        n_threads = n_rows > 0 ? (int)n_rows : 1;
    int status = 0;
    /* Rows in static blocks, one per thread. */
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(| : status)
    for (int64_t block = 0; block < n_threads; ++block)
        status |= 0 != run_block(&job, n_rows * block / n_threads, n_rows * (block + 1) / n_threads);
    free(gene_terms);
    return status ? -1 : 0;
}

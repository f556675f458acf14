/*
 * Fused log-density and partial derivatives of the negative binomial (NB) and zero-inflated
 * negative binomial (ZINB) of scVI, in one pass over the count matrix.
 *
 * Built on first use by pyro_scvi/fused.py (cc -O3 -march=native -ffast-math, vectorised with
 * glibc's libmvec) and loaded with ctypes; the plain torch formula in pyro_scvi/distributions.py
 * is the reference, and tests/test_fused.py checks values and gradients against it.
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
 * lgamma (in double precision) and digamma are evaluated by the recurrence up to z >= SHIFT and the
 * Stirling series there (truncation error below 3e-10), branch-free so that the loop vectorises;
 * lgamma(x + 1) = log x! is read from a table for whole counts below LOG_FACTORIAL_SIZE, and a
 * scalar pass redoes the log-density of the rare other entries (larger or fractional counts).
 * Rows are split over OpenMP threads; in a process running torch, libgomp.so.1 is torch's.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define EPS 1e-8f
#define HALF_LOG_2PI 0.91893853320467274
/* lgamma and digamma shift their argument up to SHIFT, where six terms of the Stirling series
 * leave an error below 1e-10 */
#define SHIFT 4
#define LOG_FACTORIAL_SIZE 1024

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

/* lgamma(y) for y > 0, in double precision: lgamma(x + θ) − lgamma(θ) − lgamma(x + 1) cancels
 * to a small number from terms near x·log x, so float32 would lose digits on large counts. */
static inline double log_gamma(float y)
{
    double product = 1.0, z = y;
    for (int j = 0; j < SHIFT; ++j) { /* z <- y + k with k the smallest shift giving z >= SHIFT */
        const int shift = z < (double)SHIFT;
        product = shift ? product * z : product;
        z = shift ? z + 1.0 : z;
    }
    const double inv = 1.0 / z, inv2 = inv * inv;
    const double series = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 * (1.0 / 1680.0
                          - inv2 * (1.0 / 1188.0 - inv2 * (691.0 / 360360.0))))));
    return (z - 0.5) * log(z) - z + HALF_LOG_2PI + series - log(product);
}

/* digamma(y) for y > 0 (the shift's sum of reciprocals as one fraction: one division). */
static inline float digamma(float y)
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
    return logf(z) - 0.5f * inv - series - numerator / denominator;
}

/* softplus(u) = log(1 + e^u) and sigmoid(u), sharing one exp. */
static inline void softplus_sigmoid(float u, float *softplus_out, float *sigmoid_out)
{
    const float e = expf(-fabsf(u));
    *softplus_out = fmaxf(u, 0.0f) + log1pf(e);
    const float r = 1.0f / (1.0f + e);
    *sigmoid_out = u >= 0.0f ? r : e * r;
}

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
    int64_t row_begin, row_end;
} Job;

/* The log-density of one entry with lgamma(x + 1) by the series: for the entries the table
 * does not cover (counts above its size or fractional). */
static float entry_log_prob(float xv, float m, float th, float log_th, double lgamma_th, const float *logit)
{
    const float a = logf(th + m + EPS);
    const float lz = th * (log_th - a);
    const float counts = (float)(log_gamma(xv + th) - lgamma_th - log_gamma(xv + 1.0f));
    const float nb = lz + xv * (logf(m + EPS) - a) + counts;
    if (logit == NULL)
        return nb;
    float sp_neg, sig_neg, sp_u, sig_u;
    softplus_sigmoid(-*logit, &sp_neg, &sig_neg);
    softplus_sigmoid(lz - *logit, &sp_u, &sig_u);
    return xv < EPS ? sp_u - sp_neg : nb - sp_neg - *logit;
}

static inline int in_log_factorial_table(float xv)
{
    return (xv <= (float)(LOG_FACTORIAL_SIZE - 1)) & (xv == floorf(xv));
}

/*
 * One row (cell) of G entries. The flags are compile-time constants at each call site, so every
 * combination is its own branch-free loop that the compiler vectorises. log x! comes from the
 * table; a scalar pass then redoes the log-density of the entries outside it, if any (their
 * derivatives do not involve log x!).
 */
static inline __attribute__((always_inline)) void
row_kernel(int64_t G, const float *restrict x, const float *restrict mu, const float *restrict theta,
           const float *restrict logits, float *restrict lp, float *restrict d_mu,
           float *restrict d_theta, float *restrict d_logits, const float *restrict gene_log_theta,
           const float *restrict gene_inv_theta, const double *restrict gene_lgamma,
           const float *restrict gene_digamma, const int per_gene, const int zero_inflated,
           const int with_grad)
{
    for (int64_t g = 0; g < G; ++g) {
        const float xv = x[g], m = mu[g], th = theta[g];
        float log_th, inv_th, digamma_th;
        double lgamma_th;
        if (per_gene) {
            log_th = gene_log_theta[g];
            inv_th = gene_inv_theta[g];
            lgamma_th = gene_lgamma[g];
            digamma_th = gene_digamma[g];
        } else {
            log_th = logf(th + EPS);
            inv_th = 1.0f / (th + EPS);
            lgamma_th = log_gamma(th);
            digamma_th = digamma(th);
        }
        const float inv_thm = 1.0f / (th + m + EPS);
        const float a = logf(th + m + EPS);
        const float lz = th * (log_th - a);
        /* table index, clamped as an integer: a negative, huge or NaN x must not index out of
         * the table (those entries are redone or are NaN anyway) */
        const int whole = (int)xv;
        const int k = whole < 0 ? 0 : (whole > LOG_FACTORIAL_SIZE - 1 ? LOG_FACTORIAL_SIZE - 1 : whole);
        const float counts = (float)(log_gamma(xv + th) - lgamma_th - log_factorial[k]);
        const float nb = lz + xv * (logf(m + EPS) - a) + counts;
        const float dlz_dmu = -th * inv_thm;
        const float dlz_dth = (log_th - a) + th * (inv_th - inv_thm);
        const float dnb_dmu = dlz_dmu + xv * (1.0f / (m + EPS) - inv_thm);
        const float dnb_dth = dlz_dth - xv * inv_thm + digamma(xv + th) - digamma_th;
        if (zero_inflated) {
            const float l = logits[g];
            float sp_neg, sig_neg, sp_u, sig_u;
            softplus_sigmoid(-l, &sp_neg, &sig_neg);
            softplus_sigmoid(lz - l, &sp_u, &sig_u);
            const int zero = xv < EPS;
            lp[g] = zero ? sp_u - sp_neg : nb - sp_neg - l;
            if (with_grad) {
                d_mu[g] = zero ? sig_u * dlz_dmu : dnb_dmu;
                d_theta[g] = zero ? sig_u * dlz_dth : dnb_dth;
                d_logits[g] = zero ? sig_neg - sig_u : sig_neg - 1.0f;
            }
        } else {
            lp[g] = nb;
            if (with_grad) {
                d_mu[g] = dnb_dmu;
                d_theta[g] = dnb_dth;
            }
        }
    }
    int outside_table = 0;
    for (int64_t g = 0; g < G; ++g)
        outside_table |= !in_log_factorial_table(x[g]);
    if (!outside_table)
        return;
    for (int64_t g = 0; g < G; ++g) {
        if (in_log_factorial_table(x[g]))
            continue;
        const float th = theta[g];
        const float log_th = per_gene ? gene_log_theta[g] : logf(th + EPS);
        const double lgamma_th = per_gene ? gene_lgamma[g] : log_gamma(th);
        lp[g] = entry_log_prob(x[g], mu[g], th, log_th, lgamma_th, zero_inflated ? logits + g : NULL);
    }
}

#define ROW(PER_GENE, ZI, GRAD)                                                                   \
    row_kernel(G, x, mu, theta, logits, lp, d_mu, d_theta, d_logits, job->gene_log_theta,          \
               job->gene_inv_theta, job->gene_lgamma, job->gene_digamma, PER_GENE, ZI, GRAD)

static void run_rows(const Job *job)
{
    const int64_t G = job->n_cols;
    const int per_gene = job->theta_row_stride == 0;
    const int zero_inflated = job->logits != NULL;
    const int with_grad = job->d_mu != NULL;
    const int variant = per_gene * 4 + zero_inflated * 2 + with_grad;
    for (int64_t n = job->row_begin; n < job->row_end; ++n) {
        const float *x = job->x + n * G, *mu = job->mu + n * G;
        const float *theta = job->theta + n * job->theta_row_stride;
        const float *logits = zero_inflated ? job->logits + n * G : NULL;
        float *lp = job->log_prob + n * G;
        float *d_mu = with_grad ? job->d_mu + n * G : NULL;
        float *d_theta = with_grad ? job->d_theta + n * G : NULL;
        float *d_logits = with_grad && zero_inflated ? job->d_logits + n * G : NULL;
        switch (variant) {
        case 0: ROW(0, 0, 0); break;
        case 1: ROW(0, 0, 1); break;
        case 2: ROW(0, 1, 0); break;
        case 3: ROW(0, 1, 1); break;
        case 4: ROW(1, 0, 0); break;
        case 5: ROW(1, 0, 1); break;
        case 6: ROW(1, 1, 0); break;
        default: ROW(1, 1, 1); break;
        }
    }
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
    Job base = {n_rows, n_cols, x, mu, theta, theta_row_stride, logits, log_prob, d_mu, d_theta,
                d_logits, NULL, NULL, NULL, NULL, 0, n_rows};
    if (theta_row_stride == 0) { /* one theta per gene: its own terms once per gene */
        gene_terms = malloc(sizeof(double) * 4 * (size_t)(n_cols > 0 ? n_cols : 1));
        if (gene_terms == NULL) return -1;
        double *lgamma_th = (double *)gene_terms;
        float *log_th = (float *)(lgamma_th + n_cols), *inv_th = log_th + n_cols, *digamma_th = inv_th + n_cols;
        for (int64_t g = 0; g < n_cols; ++g) {
            log_th[g] = logf(theta[g] + EPS);
            inv_th[g] = 1.0f / (theta[g] + EPS);
            lgamma_th[g] = log_gamma(theta[g]);
            digamma_th[g] = digamma(theta[g]);
        }
        base.gene_log_theta = log_th;
        base.gene_inv_theta = inv_th;
        base.gene_lgamma = lgamma_th;
        base.gene_digamma = digamma_th;
    }
    if (n_threads < 1) n_threads = 1;
    /* Rows in static blocks on OpenMP threads. Loaded into a process that runs torch, libgomp.so.1
     * is torch's own runtime, so this reuses torch's thread pool instead of competing with it. */
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t block = 0; block < n_threads; ++block) {
        Job job = base;
        job.row_begin = n_rows * block / n_threads;
        job.row_end = n_rows * (block + 1) / n_threads;
        run_rows(&job);
    }
    free(gene_terms);
    return 0;
}

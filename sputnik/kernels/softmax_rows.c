/* Row-wise softmax statistics and their gradient for the policy's token log-probs (losses.token_logprobs),
   fp32, one pass per row over logits that stay in L1 or L2 (a row of a 32k vocabulary is 128 KB; of the
   benchmark's 4096, 16 KB):

       forward   lse_n = log sum_v exp(z_nv),  logp_n = z_{n,t_n} - lse_n,
                 H_n = -sum_v p_nv log p_nv = lse_n - sum_v p_nv z_nv          (p = exp(z - lse))
       backward  g_nv = -p_nv (gl_n + ge_n (log p_nv + H_n)) + [v = t_n] gl_n

   gl and ge are the incoming gradients of logp and H per row (the 1/tau of the scaled logits
   already folded in by the caller). What this replaces is five to seven ATen passes over the [N, V]
   logits (log_softmax, gather, exp, multiply, sum in forward; exp, multiply, add, scatter in
   backward), each reading and writing the whole block through L3; here each row is read twice and
   the gradient written once.

   exp is a branch-free polynomial the compiler vectorises (fast_exp.h: Cody-Waite reduction to
   [-ln2/2, ln2/2], degree-6 Taylor form, ~1e-7 relative error there); log p is clamped at -87 (e^-87 ~ 1.6e-38,
   about the smallest normal float), so a token with no mass gets ~1e-38 instead of 0, and a -inf
   logit gives finite statistics.
   Rows run in parallel under OpenMP (torch's libgomp); each row is summed by one thread in a fixed
   order, so results do not depend on the thread count. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

/* forward: z [N, V] row-major, t [N] in [0, V) (ignored rows carry any valid index) -> logp, lse, H [N].
   Returns -1 if a target is out of range (nothing written for that row), else 0. */
int softmax_rows_forward(const float *z, const int64_t *t, int64_t N, int64_t V, float *logp, float *lse,
                         float *ent, int nthreads) {
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(| : bad)
    for (int64_t n = 0; n < N; ++n) {
        const float *zn = z + n * V;
        if (t[n] < 0 || t[n] >= V) {
            bad = 1;
            continue;
        }
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t v = 0; v < V; ++v) m = zn[v] > m ? zn[v] : m;
        float s = 0.0f, sy = 0.0f;
#pragma omp simd reduction(+ : s, sy)
        for (int64_t v = 0; v < V; ++v) {
            const float y = clamp_lo(zn[v] - m);
            const float e = exp_neg(y);
            s += e;
            sy += e * y;
        }
        const float log_s = logf(s);
        lse[n] = m + log_s;
        logp[n] = zn[t[n]] - lse[n];
        ent[n] = log_s - sy / s; /* H = lse - sum p z = log s - sum p (z - m) */
    }
    return bad ? -1 : 0;
}

/* one row of the backward: gradient gn from logits zn (gn may be zn) */
static void backward_row(const float *zn, float *gn, int64_t V, float cn, float gln, const float *ge, float entn) {
    if (ge) {
        const float gen = *ge, base = gln + gen * entn;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
            const float lp = clamp_lo(zn[v] - cn);
            gn[v] = -exp_neg(lp) * (base + gen * lp);
        }
    } else {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) gn[v] = -exp_neg(clamp_lo(zn[v] - cn)) * gln;
    }
}

/* backward: g [N, V] from z [N, V] (logits; g may be z itself, for in place); c [N] is what to
   subtract for log p (lse, or 0 when z already holds log-probs); gl [N] the gradient of logp; ge [N]
   of H, or NULL. */
int softmax_rows_backward(const float *z, float *g, const float *c, const int64_t *t, const float *ent, const float *gl,
                          const float *ge, int64_t N, int64_t V, int nthreads) {
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(| : bad)
    for (int64_t n = 0; n < N; ++n) {
        if (t[n] < 0 || t[n] >= V) {
            bad = 1;
            continue;
        }
        backward_row(z + n * V, g + n * V, V, c[n], gl[n], ge ? ge + n : 0, ent[n]);
        g[n * V + t[n]] += gl[n];
    }
    return bad ? -1 : 0;
}

/* Sampling one token per row of softmax(z / temperature) by inverse CDF, with the row's uniform u in
   [0, 1): the first token whose cumulative mass exceeds u times the row's total, as
   sampling.pick_from_probs does (searchsorted, right); logp its log-probability under softmax(z /
   temperature). temperature 0: the first argmax. -inf logits (sampling.mask_vocab) have exactly no
   mass. What this replaces at batch 32 and a 49k vocabulary is log_softmax, exp, cumsum and a search
   over [32, 49152] (~3-6 ms a decode step); here the row is read twice and the exps of the second
   pass stop at the sampled token, one block of SAMPLE_BLOCK at a time.
   Returns 0, or -1 when a row's mass is not finite and positive (NaN or all -inf logits: nothing
   written for that row; the caller keeps its torch path). */
#define SAMPLE_BLOCK 256

static inline float mass(float z, float m, float inv_t) {
    return z == -INFINITY ? 0.0f : exp_neg(clamp_lo((z - m) * inv_t));
}

/* the mass of tokens b0 .. b0 + SAMPLE_BLOCK - 1 (fewer at the end) */
static float block_mass(const float *zn, int64_t b0, int64_t V, float m, float inv_t) {
    const int64_t b1 = b0 + SAMPLE_BLOCK < V ? b0 + SAMPLE_BLOCK : V;
    float bs = 0.0f;
#pragma omp simd reduction(+ : bs)
    for (int64_t v = b0; v < b1; ++v) bs += mass(zn[v], m, inv_t);
    return bs;
}

int sample_rows(const float *z, const float *u, int64_t N, int64_t V, float temperature, int64_t *tok, float *logp,
                int nthreads) {
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(| : bad)
    for (int64_t n = 0; n < N; ++n) {
        const float *zn = z + n * V;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t v = 0; v < V; ++v) m = zn[v] > m ? zn[v] : m;
        const float inv_t = temperature > 0.0f ? 1.0f / temperature : 1.0f;
        double s = 0.0; /* block by block, in double, as the search below sums it */
        for (int64_t b0 = 0; b0 < V; b0 += SAMPLE_BLOCK) s += block_mass(zn, b0, V, m, inv_t);
        if (!(s > 0.0f) || !isfinite(s) || !isfinite(m)) {
            bad = 1;
            continue;
        }
        int64_t t = -1;
        if (temperature == 0.0f) {
            for (int64_t v = 0; v < V && t < 0; ++v)
                if (zn[v] == m) t = v;
        } else {
            const double target = (double)u[n] * s; /* in double: over 150k tokens a float running sum
                                                     drifts by more than a small token's mass */
            double c = 0.0;
            for (int64_t b0 = 0; b0 < V && t < 0; b0 += SAMPLE_BLOCK) {
                const int64_t b1 = b0 + SAMPLE_BLOCK < V ? b0 + SAMPLE_BLOCK : V;
                const double bs = block_mass(zn, b0, V, m, inv_t);
                if (c + bs <= target) {
                    c += bs;
                    continue;
                }
                for (int64_t v = b0; v < b1; ++v) {
                    c += mass(zn[v], m, inv_t);
                    if (c > target) {
                        t = v;
                        break;
                    }
                }
            }
            if (t < 0) /* the block sums rounded past the target: the last token with mass */
                for (int64_t v = V - 1; v >= 0 && t < 0; --v)
                    if (zn[v] != -INFINITY) t = v;
        }
        tok[n] = t;
        logp[n] = clamp_lo((zn[t] - m) * inv_t) - (float)log(s);
    }
    return bad ? -1 : 0;
}

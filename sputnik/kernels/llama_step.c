/* One decode step of the dense Llama family (model/llama.py: Llama, Mistral, Qwen2/2.5, Qwen3, SmolLM2)
   in one call, fp32: embedding, every layer, final norm, LM head -> logits of the next token of each row.

   for each layer:  h = rmsnorm(x) * ln1
                    q = Wq h + bq,  k = Wk h + bk,  v = Wv h + bv          (per head; Qwen3: rmsnorm of q, k)
                    q, k rotated by RoPE at the row's position (rotate_half: dim j pairs with j + C/2)
                    k, v written into the row's cache slot; o = softmax(q k_s^T / sqrt(C)) v_s over the
                    visible slots s (s <= pos, and s > pos - window with Mistral's sliding window);
                    query head h reads key/value head h / (H/K) (GQA)
                    x += Wo o + bo;   h = rmsnorm(x) * ln2;   x += Wd (silu(Wg h) * (Wu h))
   logits = W_head rmsnorm(x) * norm

   Why one call: the same step through torch is ~200 ATen ops and ~60 kernel calls, a few
   microseconds of dispatch each; at batch 1 their sum is a third of the step, whose floor is reading
   the weights once (LOG.md stop 29: the linear layers alone ran at 1.03x that floor, the step at 1.7x).
   Here the step is one OpenMP parallel region: each stage an `omp for` closed by a barrier, the
   linear layers the loops of rows_gemm.h (the weights as the model holds them, read once at the
   bandwidth at a few rows; a copy packed in strips from ~8 rows on, where arithmetic bounds the step), attention one (row, head) pair per iteration with an
   online softmax (one pass over the slots, no score buffer). Every output is computed by one thread
   in a fixed order, so the result does not depend on the thread count; it equals the torch path's
   up to rounding (tests/test_llama_step.py). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "rows_gemm.h"

#define MAX_HEAD_DIM 512

typedef struct {            /* one decoder layer's weights; a NULL bias or q/k norm is absent */
    const float *ln1, *ln2; /* [D] */
    const float *wq, *bq;   /* [H*C, D], [H*C] */
    const float *wk, *bk;   /* [K*C, D], [K*C] */
    const float *wv, *bv;   /* [K*C, D], [K*C] */
    const float *wo, *bo;   /* [D, H*C], [D] */
    const float *qn, *kn;   /* [C] (Qwen3) */
    const float *wg, *wu;   /* [F, D] */
    const float *wd;        /* [D, F] */
} Layer;

typedef struct {
    int64_t L, D, H, K, C, F, V, P, window; /* P rows of the RoPE tables; window 0 = full attention */
    int64_t packed;         /* 1: every projection and the head packed in strips (rows_gemm.h), else [O, I] */
    float eps;
    const float *embed;     /* [V, D] */
    const float *norm;      /* [D] */
    const float *head;      /* [V, D] (the embedding when tied), or its packed strips */
    const float *cos, *sin; /* [P, C] */
    const Layer *layers;    /* [L] */
} Model;

int llama_step_pack_cols(void) { return PACK_COLS; }

static void linear(const Model *m, const float *x, const float *w, const float *bias, float *y, int64_t N, int64_t O,
                   int64_t I, int accumulate) {
    if (m->packed)
        gemm_packed(x, w, bias, y, N, O, I, accumulate);
    else
        gemm_rows(x, w, bias, y, N, O, I, accumulate);
}

static void rmsnorm(const float *x, const float *restrict w, float *y, int64_t n, float eps) { /* y may be x */
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* in place: (x_j, x_{j+C/2}) -> (x_j cos_j - x_{j+C/2} sin_j, x_{j+C/2} cos_{j+C/2} + x_j sin_{j+C/2}) */
static void rope(float *restrict x, const float *restrict cos, const float *restrict sin, int64_t C) {
    const int64_t F = C / 2;
    for (int64_t j = 0; j < F; j++) {
        const float a = x[j], b = x[j + F];
        x[j] = a * cos[j] - b * sin[j];
        x[j + F] = b * cos[j + F] + a * sin[j + F];
    }
}

/* o[C] = softmax_s(q . k_s * scale) v_s over slots lo..hi of one key/value head, in one pass: the running
   maximum m, the running sum l of exp(score - m), and the accumulator rescaled when m grows. */
static void attend(const float *restrict q, const float *restrict k, const float *restrict v, float *restrict o,
                   int64_t lo, int64_t hi, int64_t C, float scale) {
    float acc[MAX_HEAD_DIM];
    float m = -INFINITY, l = 0.f;
    for (int64_t c = 0; c < C; c++) acc[c] = 0.f;
    for (int64_t s = lo; s <= hi; s++) {
        const float score = dot(q, k + s * C, C) * scale;
        if (score > m) {
            const float shrink = expf(m - score); /* 0 at the first slot (m = -inf) */
            l *= shrink;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) acc[c] *= shrink;
            m = score;
        }
        const float p = expf(score - m);
        l += p;
        const float *vs = v + s * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) acc[c] += p * vs[c];
    }
    for (int64_t c = 0; c < C; c++) o[c] = acc[c] / l;
}

/* tok[B], pos[B]: each row's input token and its position (= the cache slot it writes);
   k_cache, v_cache: [L, B, K, S, C]; logits: [B, V].
   Returns 0; -1 for a token outside [0, V), -2 for a position outside [0, min(S, P)), -3 for a head
   dimension over MAX_HEAD_DIM, -4 out of memory. Nothing is written before the checks pass. */
int llama_step(const Model *m, const int64_t *tok, const int64_t *pos, int64_t B, float *k_cache, float *v_cache,
               int64_t S, float *logits, int nthreads) {
    const int64_t D = m->D, H = m->H, K = m->K, C = m->C, F = m->F, group = m->H / m->K;
    if (C > MAX_HEAD_DIM || C % 2) return -3;
    for (int64_t b = 0; b < B; b++) {
        if (tok[b] < 0 || tok[b] >= m->V) return -1;
        if (pos[b] < 0 || pos[b] >= S || pos[b] >= m->P) return -2;
    }
    int64_t width = D > F ? D : F; /* h holds a normed x [B, D], the attention output [B, H*C] or silu(g)*u [B, F] */
    width = width > H * C ? width : H * C;
    float *x = malloc(sizeof(float) * B * D), *h = malloc(sizeof(float) * B * width);
    float *q = malloc(sizeof(float) * B * H * C), *kv = malloc(sizeof(float) * 2 * B * K * C);
    float *g = malloc(sizeof(float) * 2 * B * F);
    if (!x || !h || !q || !kv || !g) {
        free(x); free(h); free(q); free(kv); free(g);
        return -4;
    }
    float *kn = kv, *vn = kv + B * K * C, *up = g + B * F, *att = h; /* att and h are never live together */
    const float scale = 1.0f / sqrtf((float)C);

#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < D; i++) x[b * D + i] = m->embed[tok[b] * D + i];
        for (int64_t l = 0; l < m->L; l++) {
            const Layer *w = m->layers + l;
            float *kc = k_cache + l * B * K * S * C, *vc = v_cache + l * B * K * S * C;
            /* --- attention */
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) rmsnorm(x + b * D, w->ln1, h + b * D, D, m->eps);
            linear(m, h, w->wq, w->bq, q, B, H * C, D, 0);
            linear(m, h, w->wk, w->bk, kn, B, K * C, D, 0);
            linear(m, h, w->wv, w->bv, vn, B, K * C, D, 0);
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * (H + K); bh++) { /* q/k norm and RoPE per head; new k, v into the cache */
                const int64_t b = bh / (H + K), j = bh % (H + K);
                const float *cs = m->cos + pos[b] * C, *sn = m->sin + pos[b] * C;
                float *head = j < H ? q + (b * H + j) * C : kn + (b * K + j - H) * C;
                const float *norm_w = j < H ? w->qn : w->kn;
                if (norm_w) rmsnorm(head, norm_w, head, C, m->eps);
                rope(head, cs, sn, C);
                if (j >= H) {
                    const int64_t slot = ((b * K + j - H) * S + pos[b]) * C;
                    for (int64_t c = 0; c < C; c++) {
                        kc[slot + c] = head[c];
                        vc[slot + c] = vn[(b * K + j - H) * C + c];
                    }
                }
            }
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * H; bh++) {
                const int64_t b = bh / H, j = bh % H, base = (b * K + j / group) * S * C;
                const int64_t lo = m->window && pos[b] - m->window + 1 > 0 ? pos[b] - m->window + 1 : 0;
                attend(q + bh * C, kc + base, vc + base, att + bh * C, lo, pos[b], C, scale);
            }
            linear(m, att, w->wo, w->bo, x, B, D, H * C, 1);
            /* --- feed-forward */
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) rmsnorm(x + b * D, w->ln2, h + b * D, D, m->eps);
            linear(m, h, w->wg, NULL, g, B, F, D, 0);
            linear(m, h, w->wu, NULL, up, B, F, D, 0);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < B * F; i++) h[i] = g[i] / (1.0f + expf(-g[i])) * up[i];
            linear(m, h, w->wd, NULL, x, B, D, F, 1);
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) rmsnorm(x + b * D, m->norm, h + b * D, D, m->eps);
        linear(m, h, m->head, NULL, logits, B, m->V, D, 0);
    }
    free(x); free(h); free(q); free(kv); free(g);
    return 0;
}

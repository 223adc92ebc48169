/* The dense Llama family's forward over a KV cache (model/llama.py: Llama, Mistral, Qwen2/2.5, Qwen3,
   SmolLM2) in one call, fp32: embedding, every layer, final norm, LM head, for a decode step (one new
   token per row) or a prefill (a row's prompt tokens at once).

   for each layer:  h = rmsnorm(x) * ln1
                    q = Wq h + bq,  k = Wk h + bk,  v = Wv h + bv          (per head; Qwen3: rmsnorm of q, k)
                    q, k rotated by RoPE at the row's position (rotate_half: dim j pairs with j + C/2)
                    k, v written into the row's cache slot; o = softmax(q k_s^T / sqrt(C)) v_s over the
                    visible slots s (s <= pos, and s > pos - window with Mistral's sliding window);
                    query head h reads key/value head h / (H/K) (GQA)
                    x += Wo o + bo;   h = rmsnorm(x) * ln2;   x += Wd (silu(Wg h) * (Wu h))
                    (Qwen3-MoE's sparse layers instead: p = softmax(W_router h), the top-k experts,
                    gates p_e, renormalised over them with norm_topk_prob; x += sum_k p_k FFN_k(h)
                    through routed_experts.h)
   logits = W_head rmsnorm(x) * norm

   Why one call: a decode step through torch is ~200 ATen ops and ~60 kernel calls, a few
   microseconds of dispatch each; at batch 1 their sum is a third of the step, whose floor is reading
   the weights once (LOG.md stop 29: the linear layers alone ran at 1.03x that floor, the step at 1.7x).
   Here the step is one OpenMP parallel region: each stage an `omp for` closed by a barrier, the
   linear layers the loops of rows_gemm.h (the weights as the model holds them, read once at the
   bandwidth at a few rows; a copy packed in strips from ~8 rows on, where arithmetic bounds the step), attention one (row, head) pair per iteration with an
   online softmax (one pass over the slots, no score buffer). Every output is computed by one thread
   in a fixed order, so the result does not depend on the thread count; it equals the torch path's
   up to rounding (tests/test_llama_decode.py). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "fast_exp.h"
#include "routed_experts.h"
#include "rows_gemm.h"

#define MAX_HEAD_DIM 512

typedef struct {            /* one decoder layer's weights; a NULL bias or q/k norm is absent */
    const float *ln1, *ln2; /* [D] */
    const float *wq, *bq;   /* [H*C, D], [H*C] */
    const float *wk, *bk;   /* [K*C, D], [K*C] */
    const float *wv, *bv;   /* [K*C, D], [K*C] */
    const float *wo, *bo;   /* [D, H*C], [D] */
    const float *qn, *kn;   /* [C] (Qwen3) */
    const float *wg, *wu;   /* [F, D] (NULL in a sparse layer) */
    const float *wd;        /* [D, F] */
    const float *router;    /* [E, D]: a sparse layer (Qwen3-MoE) when set, else NULL */
    const float *experts_gu, *experts_down; /* routed_experts.h's packed layouts */
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
    int64_t E, topk, I, norm_topk; /* sparse layers: experts, chosen per token, expert width, renormalise */
} Model;

int llama_step_pack_cols(void) { return PACK_COLS; }

/* What linear() reads for the input x [N, I]: x itself, or with packed weights x regrouped into xp. */
static const float *linear_input(const Model *m, const float *x, float *xp, int64_t N, int64_t I) {
    if (!m->packed) return x;
    interleave_rows(x, xp, N, I);
    return xp;
}

static void linear(const Model *m, const float *in, const float *w, const float *bias, float *y, int64_t N, int64_t O,
                   int64_t I, int accumulate) { /* in: from linear_input */
    if (m->packed)
        gemm_packed(in, w, bias, y, N, O, I, accumulate);
    else
        gemm_rows(in, w, bias, y, N, O, I, accumulate);
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

/* Qwen3-MoE's router for one token (model/llama.py SoftmaxMoE): p = softmax(logits), the k largest
   (ties: the lowest index), gates p_e or p_e / sum over the chosen. */
static void route_softmax(const float *logits, int64_t E, int64_t k_top, int norm, float *p, int64_t *idx,
                          float *wgt) {
    float top = -INFINITY, sum = 0.f, chosen = 0.f;
    for (int64_t e = 0; e < E; e++) top = logits[e] > top ? logits[e] : top;
    for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(logits[e] - top));
    for (int64_t e = 0; e < E; e++) p[e] /= sum;
    top_k(p, E, k_top, idx);
    for (int64_t k = 0; k < k_top; k++) chosen += (wgt[k] = p[idx[k]]);
    if (norm)
        for (int64_t k = 0; k < k_top; k++) wgt[k] /= chosen;
}

/* N tokens, each into its own cache row and position: tok[n], row[n] in [0, R), pos[n] = the slot it
   writes; a token attends to its row's slots up to its position, those written by the tokens before
   it in this call included (a decode step: one token per row; a prefill: a row's prompt, all at once).
   k_cache, v_cache: [L, R, K, S, C]; logits [M, V] of the tokens out[0..M) (the last prompt token of
   each row, or every token).
   Returns 0; -1 for a token outside [0, V), -2 for a row or position outside the cache or the RoPE
   tables, -3 for a head dimension over MAX_HEAD_DIM (or a top-k outside [1, E]), -4 out of memory, -5 for an output index outside
   [0, N). Nothing is written before the checks pass. */
int llama_forward(const Model *m, const int64_t *tok, const int64_t *row, const int64_t *pos, int64_t N,
                  float *k_cache, float *v_cache, int64_t R, int64_t S, const int64_t *out, int64_t M,
                  float *logits, int nthreads) {
    const int64_t D = m->D, H = m->H, K = m->K, C = m->C, F = m->F, group = m->H / m->K;
    if (C > MAX_HEAD_DIM || C % 2) return -3;
    for (int64_t n = 0; n < N; n++) {
        if (tok[n] < 0 || tok[n] >= m->V) return -1;
        if (row[n] < 0 || row[n] >= R || pos[n] < 0 || pos[n] >= S || pos[n] >= m->P) return -2;
    }
    for (int64_t j = 0; j < M; j++)
        if (out[j] < 0 || out[j] >= N) return -5;
    int64_t width = D > F ? D : F; /* h holds a normed x [N, D], the attention output [N, H*C] or silu(g)*u [N, F] */
    width = width > H * C ? width : H * C;
    if (m->E && (m->topk < 1 || m->topk > m->E)) return -3;
    const int64_t slots = N * m->topk, expert_scratch = TILE_ROWS * 2 * m->I; /* sparse layers only */
    float *x = malloc(sizeof(float) * N * D), *h = malloc(sizeof(float) * N * width);
    float *q = malloc(sizeof(float) * N * H * C), *kv = malloc(sizeof(float) * 2 * N * K * C);
    float *g = malloc(sizeof(float) * N * (2 * F > 2 * m->E ? 2 * F : 2 * m->E));
    float *xp = m->packed ? malloc(sizeof(float) * N * width) : NULL;
    float *moe_f = m->E ? malloc(sizeof(float) * (slots + nthreads * expert_scratch + slots * D)) : NULL;
    int64_t *moe_i = m->E ? malloc(sizeof(int64_t) * (slots + 2 * (m->E + 1) + 2 * slots + m->E + 1)) : NULL;
    if (!x || !h || !q || !kv || !g || (m->packed && !xp) || (m->E && (!moe_f || !moe_i))) {
        free(x); free(h); free(q); free(kv); free(g); free(xp); free(moe_f); free(moe_i);
        return -4;
    }
    float *wgt = moe_f, *expert_h = m->E ? moe_f + slots : NULL, *slot_out = m->E ? expert_h + nthreads * expert_scratch : NULL;
    int64_t *idx = moe_i, *plan = m->E ? moe_i + slots : NULL, *order = NULL, *tile_start = NULL, *start = NULL;
    int64_t num_tiles = 0;
    float *kn = kv, *vn = kv + N * K * C, *up = g + N * F, *att = h; /* att and h are never live together */
    const float scale = 1.0f / sqrtf((float)C);
    const int64_t layer_stride = R * K * S * C;

#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t i = 0; i < D; i++) x[n * D + i] = m->embed[tok[n] * D + i];
        for (int64_t l = 0; l < m->L; l++) {
            const Layer *w = m->layers + l;
            float *kc = k_cache + l * layer_stride, *vc = v_cache + l * layer_stride;
            /* --- attention */
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) rmsnorm(x + n * D, w->ln1, h + n * D, D, m->eps);
            const float *in = linear_input(m, h, xp, N, D);
            linear(m, in, w->wq, w->bq, q, N, H * C, D, 0);
            linear(m, in, w->wk, w->bk, kn, N, K * C, D, 0);
            linear(m, in, w->wv, w->bv, vn, N, K * C, D, 0);
#pragma omp for schedule(static)
            for (int64_t nh = 0; nh < N * (H + K); nh++) { /* q/k norm and RoPE per head; new k, v into the cache */
                const int64_t n = nh / (H + K), j = nh % (H + K);
                const float *cs = m->cos + pos[n] * C, *sn = m->sin + pos[n] * C;
                float *head = j < H ? q + (n * H + j) * C : kn + (n * K + j - H) * C;
                const float *norm_w = j < H ? w->qn : w->kn;
                if (norm_w) rmsnorm(head, norm_w, head, C, m->eps);
                rope(head, cs, sn, C);
                if (j >= H) {
                    const int64_t slot = ((row[n] * K + j - H) * S + pos[n]) * C;
                    for (int64_t c = 0; c < C; c++) {
                        kc[slot + c] = head[c];
                        vc[slot + c] = vn[(n * K + j - H) * C + c];
                    }
                }
            }
#pragma omp for schedule(dynamic, 4) /* a prefill's tokens attend over different lengths */
            for (int64_t nh = 0; nh < N * H; nh++) {
                const int64_t n = nh / H, j = nh % H, base = (row[n] * K + j / group) * S * C;
                const int64_t lo = m->window && pos[n] - m->window + 1 > 0 ? pos[n] - m->window + 1 : 0;
                attend(q + nh * C, kc + base, vc + base, att + nh * C, lo, pos[n], C, scale);
            }
            linear(m, linear_input(m, att, xp, N, H * C), w->wo, w->bo, x, N, D, H * C, 1);
            /* --- feed-forward */
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) rmsnorm(x + n * D, w->ln2, h + n * D, D, m->eps);
            in = linear_input(m, h, xp, N, D);
            if (w->router) { /* a sparse layer: router, then the chosen experts over the normed rows h */
                float *logits = g, *probs = g + N * m->E;
                linear(m, in, w->router, NULL, logits, N, m->E, D, 0);
#pragma omp for schedule(static)
                for (int64_t n = 0; n < N; n++)
                    route_softmax(logits + n * m->E, m->E, m->topk, (int)m->norm_topk, probs + n * m->E,
                                  idx + n * m->topk, wgt + n * m->topk);
#pragma omp single
                num_tiles = routed_experts_plan(idx, slots, m->E, plan, &order, &tile_start, &start);
                routed_experts_tiles(h, D, idx, wgt, w->experts_gu, w->experts_down, x, 1, N, m->topk, D, m->I, order,
                                     tile_start, start, num_tiles, expert_h, slot_out, expert_scratch);
                continue;
            }
            linear(m, in, w->wg, NULL, g, N, F, D, 0);
            linear(m, in, w->wu, NULL, up, N, F, D, 0);
#pragma omp for simd schedule(static)
            for (int64_t i = 0; i < N * F; i++) h[i] = g[i] / (1.0f + exp_any(-g[i])) * up[i]; /* SiLU(g) * u */
            linear(m, linear_input(m, h, xp, N, F), w->wd, NULL, x, N, D, F, 1);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < M; j++) rmsnorm(x + out[j] * D, m->norm, h + j * D, D, m->eps);
        linear(m, linear_input(m, h, xp, M, D), m->head, NULL, logits, M, m->V, D, 0);
    }
    free(x); free(h); free(q); free(kv); free(g); free(xp); free(moe_f); free(moe_i);
    return 0;
}

/* Our DeepSeek-V3's forward over its latent MLA cache (model/transformer.py; inference/deepseek.py is the
   torch form of the same sums) in one call, fp32: embedding, every layer, final norm, LM head, for a
   decode step (one new token per row) or a prefill (a row's prompt tokens at once).

   for each layer:  h = rmsnorm(x) * ln1
                    [q_in | c | k_R | swap(k_R)] = W_a h;   q_in = rmsnorm(q_in) * qa_norm (q_lora_rank > 0)
                    [q~_h | swap(q_R,h)] = W_q q_in    (per head: W_UK folded in, q~_h = [W_UK,h^T q_C,h ; q_R,h];
                    where folding would grow W_q, as at V2-Lite's or V3's sizes, W_q gives q_nope and q~ is
                    computed per token)
                    q_R,h and k_R rotated by RoPE at the row's position (x cos + swap(x) sin: the pair split
                    is a permutation of weight rows, done when the weights were derived, mla_decode.py)
                    [rmsnorm(c) * kv_norm | k_R] written into the row's cache slot (one latent row per token)
                    z_h = sum_s softmax_s(scale q~_h . row_s) c_s over the visible slots s <= pos
                    x += W_o [z_1 .. z_H]   (W_UV folded into W_o; else x += W_o [W_UV,1 z_1 .. W_UV,H z_H])
                    h = rmsnorm(x) * ln2
                    dense layer: x += W_d (silu(W_g h) * (W_u h))
                    MoE layer:   [logits | g_s | u_s] = W_rs h  (router and shared expert in one product)
                                 experts chosen by the router's rule (moe.py Router.route: V3's biased sigmoid
                                 selection, node-limited groups, renormalised gates; or V2's softmax)
                                 x += W_sd (silu(g_s) * u_s) + sum_k FFN_{idx_k}(h) w_k   (routed_experts.h)
   logits = W_head rmsnorm(x) * norm

   Why one call: a batch-32 decode step of the tiny model through torch is ~20 small matmuls, ~150
   other ATen ops and 3 expert-kernel calls; eagerly their dispatch and the per-op passes over [32, 256]
   rows are most of the step, and the compiled step still pays a graph call, its guards and the opaque
   kernels. Here the step is one OpenMP parallel region, each stage an `omp for` closed by a barrier; every
   product is rows_gemm.h's packed loop over weights packed once in column strips (at one row it reads
   them at the bandwidth). Every output is computed by one thread in a fixed order, so the result does not
   depend on the thread count; it equals the torch path's up to rounding (tests/test_deepseek_decode.py). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"
#include "routed_experts.h"
#include "rows_gemm.h"

#define MAX_EXPERTS 1024
#define MAX_TOPK 64

typedef struct {                   /* one layer's weights, packed in strips unless said otherwise */
    const float *ln1, *ln2;        /* [D] */
    const float *wa;               /* A = Q + C + 2R outputs, from D */
    const float *qa_norm;          /* [Q], NULL without a q low-rank */
    const float *kv_norm;          /* [C] */
    const float *wq;               /* Z = H*(C+R) + H*R outputs, from Q (or D) */
    const float *wo;               /* D outputs, from H*C */
    int64_t moe;                   /* 0: dense */
    const float *wgu, *wd;         /* dense: 2F outputs from D ([gate | up]), D from F */
    const float *wrs;              /* MoE: E + 2*Is outputs from D ([router | shared gate | shared up]) */
    const float *bias;             /* [E] selection bias (sigmoid rule), NULL with softmax */
    const float *wsd;              /* D from Is, NULL without shared experts */
    const float *experts_gu;       /* [E, strips, D, COLS] routed_experts.h's layout */
    const float *experts_down;     /* [E, strips, I, COLS] */
    const float *w_uk, *w_uv;      /* [H, Nq, C], [H, Vd, C]: W_UK and W_UV where they are not folded in */
} Layer;

typedef struct {
    int64_t L, D, H, C, R, Q, V, P, F;  /* Q = 0: no q low-rank; P rows of the RoPE tables */
    int64_t E, K, I, Is, G, TG;         /* experts, chosen per token, expert width, shared width, groups, groups kept */
    int64_t softmax, norm_topk;         /* router rule */
    float eps, scale, route_scale;
    const float *embed;                 /* [V, D], row-major (an embedding is read by rows) */
    const float *norm;                  /* [D] */
    const float *head;                  /* V outputs from D */
    const float *cos, *sin;             /* [P, R]: [cos; cos] and [-sin; sin] (mla_decode's rotation) */
    const Layer *layers;
    int64_t Nq, Vd, absorb_q, absorb_o; /* nope and value head dims; W_UK / W_UV folded into W_q / W_o */
} Model;

int deepseek_step_pack_cols(void) { return PACK_COLS; }
int deepseek_step_expert_cols(void) { return COLS; }

/* y [N, O] (+)= x [N, I] W^T, W packed; xp is scratch for x regrouped (see interleave_rows). */
static void linear(const float *x, float *xp, const float *w, float *y, int64_t N, int64_t O, int64_t I, int acc) {
    interleave_rows(x, xp, N, I);
    gemm_packed(xp, w, NULL, y, N, O, I, acc);
}

/* z_h[C] = sum_s softmax_s(q_h . row_s * scale) row_s[0:C] for the H heads of one token over slots 0..hi
   of its cache row (rows X floats apart, heads' queries q_stride apart): every head reads the same
   latent rows (MLA is multi-query over them), so each row is read once for all heads. Two passes: the
   scores into p [H, hi + 1], then each head's softmax and the weighted sum. */
static void attend_latent(const float *restrict q, int64_t q_stride, const float *restrict kv, float *restrict z,
                          int64_t H, int64_t hi, int64_t X, int64_t C, float scale, float *restrict p) {
    const int64_t n = hi + 1;
    for (int64_t s = 0; s < n; s++) {
        const float *row = kv + s * X;
        for (int64_t h = 0; h < H; h++) p[h * n + s] = dot(q + h * q_stride, row, X) * scale;
    }
    for (int64_t h = 0; h < H; h++) {
        float *ph = p + h * n, top = -INFINITY, sum = 0.f;
        for (int64_t s = 0; s < n; s++) top = ph[s] > top ? ph[s] : top;
#pragma omp simd
        for (int64_t s = 0; s < n; s++) ph[s] = exp_any(ph[s] - top);
        for (int64_t s = 0; s < n; s++) sum += ph[s];
        const float inv = 1.f / sum;
        for (int64_t s = 0; s < n; s++) ph[s] *= inv;
        float *zh = z + h * C;
        for (int64_t c = 0; c < C; c++) zh[c] = 0.f;
    }
    for (int64_t s = 0; s < n; s++) {
        const float *row = kv + s * X;
        for (int64_t h = 0; h < H; h++) {
            const float w = p[h * n + s];
            float *zh = z + h * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) zh[c] += w * row[c];
        }
    }
}

/* Router.route for one token: logits [E] -> idx [K], weights [K]. choice: scratch [E]. */
static void route(const Model *m, const float *bias, const float *logits, float *choice, int64_t *idx, float *wgt) {
    const int64_t E = m->E, K = m->K, G = m->G, per = E / G;
    float scores[MAX_EXPERTS];
    if (m->softmax) {
        float top = -INFINITY, sum = 0.f;
        for (int64_t e = 0; e < E; e++) top = logits[e] > top ? logits[e] : top;
        for (int64_t e = 0; e < E; e++) sum += (scores[e] = expf(logits[e] - top));
        for (int64_t e = 0; e < E; e++) choice[e] = (scores[e] /= sum);
    } else {
        for (int64_t e = 0; e < E; e++) {
            scores[e] = 1.f / (1.f + expf(-logits[e]));
            choice[e] = scores[e] + bias[e];
        }
    }
    if (G > 1) { /* keep the TG best groups: by their best score (softmax) or the sum of their best two */
        float group[MAX_EXPERTS];
        for (int64_t g = 0; g < G; g++) {
            float a = -INFINITY, b = -INFINITY;
            for (int64_t e = g * per; e < (g + 1) * per; e++) {
                if (choice[e] > a) b = a, a = choice[e];
                else if (choice[e] > b) b = choice[e];
            }
            group[g] = m->softmax ? a : a + b;
        }
        for (int64_t t = 0; t < G - m->TG; t++) { /* drop the G - TG worst groups */
            int64_t worst = -1;
            for (int64_t g = 0; g < G; g++)
                if (group[g] != INFINITY && (worst < 0 || group[g] < group[worst])) worst = g;
            group[worst] = INFINITY; /* marks a dropped group */
            for (int64_t e = worst * per; e < (worst + 1) * per; e++) choice[e] = m->softmax ? 0.f : -INFINITY;
        }
    }
    float total = 0.f;
    top_k(choice, E, K, idx);
    for (int64_t k = 0; k < K; k++) total += (wgt[k] = scores[idx[k]]);
    const float norm = !m->softmax && m->norm_topk ? 1.f / (total + 1e-20f) : 1.f;
    for (int64_t k = 0; k < K; k++) wgt[k] = (m->softmax ? wgt[k] : wgt[k] * norm) * m->route_scale;
}

/* N tokens, each into its own cache row and position: tok[n], row[n] in [0, R), pos[n] = the slot it
   writes; a token attends to its row's slots up to its position, those written by the tokens before it
   in this call included. caches: L pointers to [R, S, C + R] buffers (MLACache.kv_BSX); logits [M, V] of
   the tokens out[0..M); routes (NULL: none) [N, MoE layers, K] the experts each token was routed to,
   layer after layer (RL's routing replay records them). Returns 0; -1 for a token outside [0, V), -2 for a row or position outside the
   cache or the RoPE tables, -3 for sizes the fixed buffers cannot hold, -4 out of memory, -5 for an output
   index outside [0, N). Nothing is written before the checks pass. */
int deepseek_forward(const Model *m, const int64_t *tok, const int64_t *row, const int64_t *pos, int64_t N,
                     float *const *caches, int64_t R, int64_t S, const int64_t *out, int64_t M, float *logits,
                     int nthreads, int64_t *routes) {
    const int64_t D = m->D, H = m->H, C = m->C, Rd = m->R, X = C + Rd, Q = m->Q, E = m->E, K = m->K, I = m->I;
    const int64_t Y = m->absorb_q ? X : m->Nq + Rd; /* a head's query from W_q: [q~ | q_R], or [q_nope | q_R] */
    const int64_t A = Q + C + 2 * Rd, Z = H * Y + H * Rd, HC = H * C, Is = m->Is, RS = E + 2 * Is, F = m->F;
    const int64_t QI = Q ? Q : D, HV = m->absorb_o ? HC : H * m->Vd; /* W_q's and W_o's input widths */
    if (E > MAX_EXPERTS || K > MAX_TOPK || K > E || m->G < 1 || E % m->G || m->TG > m->G || m->TG < 1) return -3;
    for (int64_t n = 0; n < N; n++) {
        if (tok[n] < 0 || tok[n] >= m->V) return -1;
        if (row[n] < 0 || row[n] >= R || pos[n] < 0 || pos[n] >= S || pos[n] >= m->P) return -2;
    }
    for (int64_t j = 0; j < M; j++)
        if (out[j] < 0 || out[j] >= N) return -5;
    if (nthreads < 1) nthreads = 1;
    const int64_t inputs[] = {D, Q, HC, HV, F, Is};
    int64_t width = 0; /* the widest input of a product: xp holds it regrouped */
    for (int i = 0; i < 6; i++) width = inputs[i] > width ? inputs[i] : width;
    const int64_t wide = 2 * F > RS ? 2 * F : RS, hidden = F > Is ? F : Is, slots = N * K;
    /* per thread: an expert tile's hidden; attention's probabilities; the queries with W_UK applied */
    const int64_t per_thread = TILE_ROWS * 2 * I + H * S + H * X;
    float *x = malloc(sizeof(float) * N * D), *h = malloc(sizeof(float) * N * D);
    float *xp = malloc(sizeof(float) * N * width), *a = malloc(sizeof(float) * N * A);
    float *qin = malloc(sizeof(float) * N * (Q ? Q : 1)), *qz = malloc(sizeof(float) * N * Z);
    float *zb = malloc(sizeof(float) * N * HC), *g = malloc(sizeof(float) * N * wide);
    float *ob = m->absorb_o ? zb : malloc(sizeof(float) * N * HV); /* W_o's input */
    float *u = malloc(sizeof(float) * N * (hidden ? hidden : 1));
    float *fl = malloc(sizeof(float) * (slots + N * E + nthreads * per_thread + (E ? slots * D : 0)));
    int64_t *idx = malloc(sizeof(int64_t) * (slots ? slots : 1));
    int64_t *ints = malloc(sizeof(int64_t) * (2 * (E + 1) + 2 * slots + E + 1));
    if (!x || !h || !xp || !a || !qin || !qz || !zb || !ob || !g || !u || !fl || !idx || !ints) {
        free(x); free(h); free(xp); free(a); free(qin); free(qz); free(zb); free(g); free(u); free(fl); free(idx); free(ints);
        if (ob != zb) free(ob);
        return -4;
    }
    float *wgt = fl, *choice = wgt + slots, *scratch = choice + N * E, *slot_out = scratch + nthreads * per_thread;
    int64_t *order = NULL, *tile_start = NULL, *start = NULL, num_tiles = 0, moe_layers = 0;
    for (int64_t l = 0; l < m->L; l++) moe_layers += m->layers[l].moe != 0;

#pragma omp parallel num_threads(nthreads)
    {
        int64_t moe_index = 0; /* this MoE layer's place among them (routes) */
        float *probs = scratch + (int64_t)omp_get_thread_num() * per_thread + TILE_ROWS * 2 * I, *qt = probs + H * S;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) memcpy(x + n * D, m->embed + tok[n] * D, sizeof(float) * D);
        for (int64_t l = 0; l < m->L; l++) {
            const Layer *w = m->layers + l;
            float *kv = caches[l];
            /* --- attention */
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) rmsnorm(x + n * D, w->ln1, h + n * D, D, m->eps);
            linear(h, xp, w->wa, a, N, A, D, 0);
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) { /* q_in's norm; the new latent row, normed and rotated, into the cache */
                const float *an = a + n * A, *kr = an + Q + C, *ks = kr + Rd;
                const float *cs = m->cos + pos[n] * Rd, *sn = m->sin + pos[n] * Rd;
                float *dst = kv + (row[n] * S + pos[n]) * X;
                if (Q) rmsnorm(an, w->qa_norm, qin + n * Q, Q, m->eps);
                rmsnorm(an + Q, w->kv_norm, dst, C, m->eps);
                for (int64_t r = 0; r < Rd; r++) dst[C + r] = kr[r] * cs[r] + ks[r] * sn[r];
            }
            linear(Q ? qin : h, xp, w->wq, qz, N, Z, QI, 0);
#pragma omp for schedule(dynamic, 2) /* a prefill's tokens attend over different lengths */
            for (int64_t n = 0; n < N; n++) {
                const float *cs = m->cos + pos[n] * Rd, *sn = m->sin + pos[n] * Rd;
                for (int64_t j = 0; j < H; j++) { /* each head's q_R rotated: x cos + swap(x) sin */
                    float *qr = qz + n * Z + j * Y + Y - Rd;
                    const float *swap = qz + n * Z + H * Y + j * Rd;
                    for (int64_t r = 0; r < Rd; r++) qr[r] = qr[r] * cs[r] + swap[r] * sn[r];
                }
                const float *q = qz + n * Z;
                if (!m->absorb_q) { /* q~_h = W_UK,h^T q_nope,h, then q_R,h: the absorbed query, per token */
                    for (int64_t j = 0; j < H; j++) {
                        const float *qn = q + j * Y, *wk = w->w_uk + j * m->Nq * C;
                        float *qh = qt + j * X;
                        for (int64_t c = 0; c < C; c++) qh[c] = 0.f;
                        for (int64_t i = 0; i < m->Nq; i++) {
                            const float v = qn[i], *wi = wk + i * C;
#pragma omp simd
                            for (int64_t c = 0; c < C; c++) qh[c] += v * wi[c];
                        }
                        memcpy(qh + C, qn + m->Nq, sizeof(float) * Rd);
                    }
                    q = qt;
                }
                attend_latent(q, X, kv + row[n] * S * X, zb + n * HC, H, pos[n], X, C, m->scale, probs);
                if (!m->absorb_o) /* o_h = W_UV,h z_h, W_o's input */
                    for (int64_t j = 0; j < H; j++)
                        for (int64_t v = 0; v < m->Vd; v++)
                            ob[n * HV + j * m->Vd + v] = dot(w->w_uv + (j * m->Vd + v) * C, zb + n * HC + j * C, C);
            }
            linear(ob, xp, w->wo, x, N, D, HV, 1);
            /* --- feed-forward */
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) rmsnorm(x + n * D, w->ln2, h + n * D, D, m->eps);
            if (!w->moe) {
                linear(h, xp, w->wgu, g, N, 2 * F, D, 0);
#pragma omp for schedule(static)
                for (int64_t n = 0; n < N; n++)
                    for (int64_t i = 0; i < F; i++) {
                        const float gi = g[n * 2 * F + i];
                        u[n * F + i] = gi / (1.0f + exp_any(-gi)) * g[n * 2 * F + F + i]; /* SiLU(g) * u */
                    }
                linear(u, xp, w->wd, x, N, D, F, 1);
                continue;
            }
            linear(h, xp, w->wrs, g, N, RS, D, 0);
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) { /* the router's choice; the shared expert's hidden */
                const float *gn = g + n * RS;
                route(m, w->bias, gn, choice + n * E, idx + n * K, wgt + n * K);
                if (routes) memcpy(routes + (n * moe_layers + moe_index) * K, idx + n * K, sizeof(int64_t) * K);
                for (int64_t i = 0; i < Is; i++)
                    u[n * Is + i] = gn[E + i] / (1.0f + exp_any(-gn[E + i])) * gn[E + Is + i];
            }
            if (Is) linear(u, xp, w->wsd, x, N, D, Is, 1);
#pragma omp single
            num_tiles = routed_experts_plan(idx, slots, E, ints, &order, &tile_start, &start);
            routed_experts_tiles(h, D, idx, wgt, w->experts_gu, w->experts_down, x, 1, N, K, D, I, order, tile_start,
                                 start, num_tiles, scratch, slot_out, per_thread);
            moe_index++;
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < M; j++) rmsnorm(x + out[j] * D, m->norm, h + j * D, D, m->eps);
        linear(h, xp, m->head, logits, M, m->V, D, 0);
    }
    free(x); free(h); free(xp); free(a); free(qin); free(qz); free(zb); free(g); free(u); free(fl); free(idx); free(ints);
    if (ob != zb) free(ob);
    return 0;
}

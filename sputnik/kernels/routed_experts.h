/* Routed experts over a few token rows (DeepSeekMoE), fp32: the loops shared by routed_ffn.c (one MoE
   layer per call) and deepseek_step.c (a whole decode step in one call). See routed_ffn.c for the
   layouts and why they are hand-written.

       out[n] = sum_k FFN_{idx[n,k]}(x[n]),   FFN_e(x) = (silu(x G_e) * (x U_e * w[n,k])) W_e

   routed_experts_plan (one thread) groups the N*K slots by expert into tiles of at most TILE_ROWS slots;
   routed_experts_tiles runs the tiles as an orphaned `omp for` (called inside a parallel region they
   are shared among its threads) and sums each token's K slots in slot order into out (or onto it). */
#ifndef SPUTNIK_ROUTED_EXPERTS_H
#define SPUTNIK_ROUTED_EXPERTS_H
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define ROWS 4       /* rows of one register block */
#define TILE_ROWS 16 /* slots of one work item (one expert): its weights are read once per tile */
#if defined(__AVX512F__)
#define COLS 32 /* 4 rows x 2 zmm = 8 accumulators */
#else
#define COLS 16 /* 4 rows x 2 ymm = 8 accumulators (AVX2 has 16 vector registers) */
#endif

/* acc[r][0:COLS] = sum_k a[r][k] * strip[k][0:COLS] for r < m; inlined with a constant m (see
   rows_times), so the compiler unrolls the rows and keeps the m x COLS accumulators in registers. */
static inline __attribute__((always_inline)) void block(const int m, const float *const *a, int64_t kdim,
                                                         const float *strip, float acc[ROWS][COLS]) {
    for (int64_t k = 0; k < kdim; ++k) {
        const float *wk = strip + k * COLS;
        float ak[ROWS];
        for (int r = 0; r < m; ++r) ak[r] = a[r][k];
        for (int j = 0; j < COLS; ++j) {
            const float wj = wk[j];
            for (int r = 0; r < m; ++r) acc[r][j] += ak[r] * wj;
        }
    }
}

/* c[r][0:n] = sum_k a[r][k] * w[k][0:n] for r < nr, with w packed in column strips: strip q is
   [kdim, COLS] contiguous (columns q*COLS ..., zero past n), so a strip streams from memory in order
   and stays in L1 (32 KB at kdim 256) while every group of ROWS rows passes over it: w is read once
   however many rows there are. */
static void rows_times(int nr, const float *const *a, int64_t kdim, const float *w, int64_t n, float *const *c) {
    for (int64_t j0 = 0; j0 < n; j0 += COLS) {
        const float *strip = w + (j0 / COLS) * kdim * COLS;
        const int64_t width = n - j0 < COLS ? n - j0 : COLS;
        for (int r0 = 0; r0 < nr; r0 += ROWS) {
            const int m = nr - r0 < ROWS ? nr - r0 : ROWS;
            float acc[ROWS][COLS];
            memset(acc, 0, sizeof acc);
            switch (m) { /* ROWS == 4 */
                case 4: block(4, a + r0, kdim, strip, acc); break;
                case 3: block(3, a + r0, kdim, strip, acc); break;
                case 2: block(2, a + r0, kdim, strip, acc); break;
                default: block(1, a + r0, kdim, strip, acc);
            }
            for (int r = 0; r < m; ++r) memcpy(c[r0 + r] + j0, acc[r], (size_t)width * sizeof(float));
        }
    }
}

static int64_t expert_strips(int64_t n) { return (n + COLS - 1) / COLS; }

/* idx[0..K) = the indices of the K largest of v[0..E), largest first (ties: the lowest index): a
   router's choice, K passes over E (both small). */
static void top_k(const float *v, int64_t E, int64_t K, int64_t *idx) {
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t j = 0; j < k; j++) taken |= idx[j] == e;
            if (!taken && (best < 0 || v[e] > v[best])) best = e;
        }
        idx[k] = best;
    }
}

/* The slots grouped by expert: order[] (stable), tile_start[] (runs of <= TILE_ROWS slots of one expert).
   ints: 2 * (E + 1) + 2 * S + E + 1 int64s. Returns the tile count, or -1 for an expert index outside [0, E). */
static int64_t routed_experts_plan(const int64_t *idx, int64_t S, int64_t E, int64_t *ints, int64_t **order_out,
                                   int64_t **tile_start_out, int64_t **start_out) {
    int64_t *start = ints, *fill = start + E + 1, *order = fill + E + 1, *tile_start = order + S;
    for (int64_t s = 0; s < S; ++s)
        if (idx[s] < 0 || idx[s] >= E) return -1;
    memset(start, 0, (size_t)(E + 1) * sizeof(int64_t));
    for (int64_t s = 0; s < S; ++s) start[idx[s] + 1]++;
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    memcpy(fill, start, (size_t)E * sizeof(int64_t));
    for (int64_t s = 0; s < S; ++s) order[fill[idx[s]]++] = s;
    int64_t num_tiles = 0;
    for (int64_t e = 0; e < E; ++e)
        for (int64_t p = start[e]; p < start[e + 1]; p += TILE_ROWS) tile_start[num_tiles++] = p;
    *order_out = order, *tile_start_out = tile_start, *start_out = start;
    return num_tiles;
}

/* The tiles of a plan, then out[n] (+)= the sum of token n's K slots. x [N, D] (row n at x + n * x_stride);
   scratch: TILE_ROWS * 2I floats per thread, scratch_stride apart; slot_out: S * D floats. */
static void routed_experts_tiles(const float *x, int64_t x_stride, const int64_t *idx, const float *wgt,
                                 const float *gate_up, const float *down, float *out, int accumulate, int64_t N,
                                 int64_t K, int64_t D, int64_t I, const int64_t *order, const int64_t *tile_start,
                                 const int64_t *start, int64_t num_tiles, float *scratch, float *slot_out,
                                 int64_t scratch_stride) {
    const int64_t I2 = 2 * I;
    float *h = scratch + (int64_t)omp_get_thread_num() * scratch_stride; /* gate | up, then the hidden */
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tiles; ++t) {
        const int64_t p0 = tile_start[t], e = idx[order[p0]];
        const float *xr[TILE_ROWS];
        float *hr[TILE_ROWS], *yr[TILE_ROWS];
        int nr = 0;
        for (; nr < TILE_ROWS && p0 + nr < start[e + 1]; ++nr) {
            const int64_t s = order[p0 + nr];
            xr[nr] = x + (s / K) * x_stride;
            hr[nr] = h + nr * I2;
            yr[nr] = slot_out + s * D;
        }
        rows_times(nr, xr, D, gate_up + e * D * expert_strips(I2) * COLS, I2, hr);
        for (int r = 0; r < nr; ++r) {
            const float ws = wgt[order[p0 + r]];
            float *g = hr[r], *u = hr[r] + I;
            for (int64_t i = 0; i < I; ++i) g[i] = g[i] / (1.f + expf(-g[i])) * (u[i] * ws);
        }
        rows_times(nr, (const float *const *)hr, I, down + e * I * expert_strips(D) * COLS, D, yr);
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) { /* the K slots of a token, summed in slot order */
        float *o = out + n * D;
        const float *y0 = slot_out + n * K * D;
        if (accumulate)
            for (int64_t d = 0; d < D; ++d) o[d] += y0[d];
        else
            memcpy(o, y0, (size_t)D * sizeof(float));
        for (int64_t k = 1; k < K; ++k) {
            const float *y = slot_out + (n * K + k) * D;
            for (int64_t d = 0; d < D; ++d) o[d] += y[d];
        }
    }
}
#endif

/* Routed experts of a DeepSeekMoE layer for a few tokens on a CPU (decode steps), fp32:

       out[n] = sum_k FFN_{idx[n,k]}(x[n]),   FFN_e(x) = (silu(x G_e) * (x U_e * w[n,k])) W_e

   The hidden is weighted before the down projection, as moe.py's grouped path does. Weights come
   input-major and packed in column strips of COLS (cpu_kernels.pack_strips): gate|up [E, S1, D, COLS]
   (the columns [G_e | U_e], 2I of them, S1 = ceil(2I / COLS) strips), down [E, S2, I, COLS].

   Why hand-written: at 32 tokens a decode step of the tiny model routes 64 (token, expert) slots to
   16 experts, ~4 per expert. Inductor's per-slot gathered reduction reads an expert's weights once
   per slot; a grouped GEMM runs 32 tiny library matmuls. Here the slots are bucketed by expert and
   an expert's weights stream once per tile of up to TILE_ROWS slots, through register blocks of ROWS x
   COLS accumulators (broadcast an input, multiply a contiguous strip row): no horizontal sums. At
   these sizes the weights come from L3, and reading each once is most of what there is to gain
   (LOG.md, stop 20). Tiles run in parallel under OpenMP with torch's libgomp (same soname: the
   loader reuses the copy torch loaded), so this shares torch's threads. Each output is summed in a
   fixed order by one thread: results do not depend on the thread count.

   Plain C, no torch headers: kernels/cpu.py builds it with cc -O3 -march=native in about a second. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
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

static int64_t strips(int64_t n) { return (n + COLS - 1) / COLS; }

/* The strip width the weights must be packed with (cpu_kernels.pack_strips). */
int routed_ffn_cols(void) { return COLS; }

/* x [N, D]; idx, wgt [N, K]; gate_up, down packed (see the top); out [N, D].
   Returns 0, -1 when an expert index is out of range (out untouched), -2 when out of memory. */
int routed_ffn(const float *x, const int64_t *idx, const float *wgt, const float *gate_up, const float *down,
               float *out, int64_t N, int64_t K, int64_t E, int64_t D, int64_t I, int nthreads) {
    const int64_t S = N * K, I2 = 2 * I;
    if (nthreads < 1) nthreads = 1;
    for (int64_t s = 0; s < S; ++s)
        if (idx[s] < 0 || idx[s] >= E) return -1;
    /* start[e]: first position of expert e in `order` (slots grouped by expert, stable); tiles: runs of
       <= TILE_ROWS positions of one expert */
    int64_t *ints = malloc((size_t)(2 * (E + 1) + 2 * S + E + 1) * sizeof(int64_t));
    float *floats = malloc((size_t)(nthreads * TILE_ROWS * I2 + S * D) * sizeof(float));
    if (!ints || !floats) {
        free(ints); free(floats);
        return -2;
    }
    int64_t *start = ints, *fill = start + E + 1, *order = fill + E + 1, *tile_start = order + S;
    float *scratch = floats, *slot_out = floats + nthreads * TILE_ROWS * I2; /* per thread: gate | up, then the hidden */
    memset(start, 0, (size_t)(E + 1) * sizeof(int64_t));
    for (int64_t s = 0; s < S; ++s) start[idx[s] + 1]++;
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    memcpy(fill, start, (size_t)E * sizeof(int64_t));
    for (int64_t s = 0; s < S; ++s) order[fill[idx[s]]++] = s;
    int64_t num_tiles = 0;
    for (int64_t e = 0; e < E; ++e)
        for (int64_t p = start[e]; p < start[e + 1]; p += TILE_ROWS) tile_start[num_tiles++] = p;

#pragma omp parallel num_threads(nthreads)
    {
        float *h = scratch + (int64_t)omp_get_thread_num() * TILE_ROWS * I2;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < num_tiles; ++t) {
            const int64_t p0 = tile_start[t], e = idx[order[p0]];
            const float *xr[TILE_ROWS];
            float *hr[TILE_ROWS], *yr[TILE_ROWS];
            int nr = 0;
            for (; nr < TILE_ROWS && p0 + nr < start[e + 1]; ++nr) {
                const int64_t s = order[p0 + nr];
                xr[nr] = x + (s / K) * D;
                hr[nr] = h + nr * I2;
                yr[nr] = slot_out + s * D;
            }
            rows_times(nr, xr, D, gate_up + e * D * strips(I2) * COLS, I2, hr);
            for (int r = 0; r < nr; ++r) {
                const float ws = wgt[order[p0 + r]];
                float *g = hr[r], *u = hr[r] + I;
                for (int64_t i = 0; i < I; ++i) g[i] = g[i] / (1.f + expf(-g[i])) * (u[i] * ws);
            }
            rows_times(nr, (const float *const *)hr, I, down + e * I * strips(D) * COLS, D, yr);
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) { /* the K slots of a token, summed in slot order */
            float *o = out + n * D;
            memcpy(o, slot_out + n * K * D, (size_t)D * sizeof(float));
            for (int64_t k = 1; k < K; ++k) {
                const float *y = slot_out + (n * K + k) * D;
                for (int64_t d = 0; d < D; ++d) o[d] += y[d];
            }
        }
    }
    free(ints); free(floats);
    return 0;
}

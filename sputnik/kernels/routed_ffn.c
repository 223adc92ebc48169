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

#include "routed_experts.h"

/* The strip width the weights must be packed with (cpu_kernels.pack_strips). */
int routed_ffn_cols(void) { return COLS; }

/* x [N, D]; idx, wgt [N, K]; gate_up, down packed (see the top); out [N, D].
   Returns 0, -1 when an expert index is out of range (out untouched), -2 when out of memory. */
int routed_ffn(const float *x, const int64_t *idx, const float *wgt, const float *gate_up, const float *down,
               float *out, int64_t N, int64_t K, int64_t E, int64_t D, int64_t I, int nthreads) {
    const int64_t S = N * K;
    if (nthreads < 1) nthreads = 1;
    int64_t *ints = malloc((size_t)(2 * (E + 1) + 2 * S + E + 1) * sizeof(int64_t));
    float *floats = malloc((size_t)(nthreads * TILE_ROWS * 2 * I + S * D) * sizeof(float));
    if (!ints || !floats) {
        free(ints); free(floats);
        return -2;
    }
    int64_t *order, *tile_start, *start;
    const int64_t num_tiles = routed_experts_plan(idx, S, E, ints, &order, &tile_start, &start);
    if (num_tiles < 0) {
        free(ints); free(floats);
        return -1;
    }
#pragma omp parallel num_threads(nthreads)
    routed_experts_tiles(x, D, idx, wgt, gate_up, down, out, 0, N, K, D, I, order, tile_start, start, num_tiles,
                         floats, floats + nthreads * TILE_ROWS * 2 * I, TILE_ROWS * 2 * I);
    free(ints); free(floats);
    return 0;
}

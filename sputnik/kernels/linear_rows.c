/* y = x W^T (+ b) for a few rows of x: the linear layers of decode steps and short prefills, fp32
   (the loops and their layout: rows_gemm.h).

   One row: ATen's GEMV reads W at ~12-15 GB/s on 2 threads of this machine where a plain sum of a
   large tensor reads at ~21-30 GB/s; the row loop reads at 22-30 GB/s. At 16-64 rows the 2 x 4 tiles
   run at 100-130 GFLOP/s where MKL's small-M GEMM gives 40-100 (its LM-head GEMM at 32 rows: ~60;
   benchmarks/bench_families.py, LOG.md stop 25). Results differ from ATen's by rounding only. */
#include "rows_gemm.h"

#define MAX_ROWS 64

int linear_rows_max(void) { return MAX_ROWS; }

int linear_rows(const float *restrict x, const float *restrict w, const float *restrict bias, float *restrict y,
                int64_t N, int64_t O, int64_t I, int nthreads) {
    if (N < 1 || N > MAX_ROWS) return -1;
#pragma omp parallel num_threads(nthreads)
    gemm_rows(x, w, bias, y, N, O, I, 0);
    return 0;
}

/* y = x W^T (+ b) with W pre-packed into strips (rows_gemm.h's gemm_packed; pack with
   kernels/cpu.py pack_strips at linear_packed_cols() columns): the register-blocked product of
   llama_step.c for any linear layer. xp: scratch [N, I] for x regrouped by interleave_rows. */
int linear_packed(const float *restrict x, const float *restrict wp, const float *restrict bias, float *restrict y,
                  float *restrict xp, int64_t N, int64_t O, int64_t I, int nthreads) {
    if (N < 1) return -1;
#pragma omp parallel num_threads(nthreads)
    {
        interleave_rows(x, xp, N, I); /* an omp for: its barrier ends before the product reads xp */
        gemm_packed(xp, wp, bias, y, N, O, I, 0);
    }
    return 0;
}

int linear_packed_cols(void) { return gemm_packed_cols(); }

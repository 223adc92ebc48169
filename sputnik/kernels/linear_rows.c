/* y = x W^T (+ b) for a few rows of x: the linear layers of a decode step, fp32.

       y[n, o] = sum_i x[n, i] * w[o, i] + bias[o],     n < N <= 8 rows, W [O, I] row-major

   At one to a few tokens a step, a linear layer is a matrix-vector product: each weight is read once
   and used for N multiply-adds, so its time is the bytes of W over the memory bandwidth. ATen's
   GEMV reaches ~12-15 GB/s on 2 threads of this machine where a plain sum of a large tensor reads at
   ~21-30 GB/s; this loop streams W row by row (one thread owns a contiguous block of output rows,
   the hardware prefetcher follows), keeps the N input rows in L1 and reaches 22-27 GB/s
   (benchmarks/bench_families.py, LOG.md stop 25).
   Each output is summed by one thread in a fixed order (vector lanes, then the lanes' sum), so the
   result does not depend on the thread count; it differs from ATen's by rounding only. */
#include <omp.h>
#include <stdint.h>

#define MAX_ROWS 8

int linear_rows_max(void) { return MAX_ROWS; }

int linear_rows(const float *restrict x, const float *restrict w, const float *restrict bias, float *restrict y,
                int64_t N, int64_t O, int64_t I, int nthreads) {
    if (N < 1 || N > MAX_ROWS) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const float *wr = w + o * I;
        for (int64_t n = 0; n < N; n++) {
            const float *xr = x + n * I;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < I; i++) s += xr[i] * wr[i];
            y[n * O + o] = s + (bias ? bias[o] : 0.f);
        }
    }
    return 0;
}

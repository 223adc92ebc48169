/* y = x W^T (+ b) over a few rows of x, fp32: the shared inner loops of linear_rows.c (one linear layer
   per call) and llama_step.c (a whole decode step in one call).

       y[n, o] = (accumulate ? y[n, o] : 0) + sum_i x[n, i] * w[o, i] + bias[o],    W [O, I] row-major

   One row is a matrix-vector product bound by reading W: the loop streams W one output row at a time,
   each thread owning a contiguous block of rows (the hardware prefetcher follows), at close to the
   machine's read bandwidth. From two rows on, outputs are computed in tiles of 2 x-rows by 4 W-rows:
   8 accumulators vectorised over i, 6 loads for 8 fused multiply-adds, each W row read from memory
   once and the x rows from L1/L2. Each output is summed by one thread in a fixed order (vector lanes,
   then the lanes' sum), so results do not depend on the thread count.

   gemm_packed computes the same from W packed in column strips (pack_strips in kernels/cpu.py: strip s
   is [I, PACK_COLS] contiguous, output columns s*PACK_COLS..., zero past O) and x regrouped in row
   blocks (interleave_rows): per input i, a strip row
   of PACK_COLS weights times PACK_ROWS broadcast x values into PACK_ROWS x PACK_COLS accumulators
   held in registers, so there are no horizontal sums and each weight loaded is used PACK_ROWS times.
   At 32 rows it runs ~1.5-2x the dot tiles (LOG.md stop 30); at one row both read W at the bandwidth.

   Both hold an orphaned `omp for` (with its closing barrier): called inside a parallel region they
   share the outputs among the region's threads; outside one they run on the calling thread. */
#ifndef SPUTNIK_ROWS_GEMM_H
#define SPUTNIK_ROWS_GEMM_H
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>

static inline float dot(const float *restrict a, const float *restrict b, int64_t I) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < I; i++) s += a[i] * b[i];
    return s;
}

static inline void store(float *y, float v, int accumulate) { *y = accumulate ? *y + v : v; }

/* y = w * x / rms(x) over one row of n (RMSNorm; the one-call decode steps' norms); y may be x. */
static void rmsnorm(const float *x, const float *restrict w, float *y, int64_t n, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

static void gemm_rows(const float *restrict x, const float *restrict w, const float *restrict bias, float *restrict y,
                      int64_t N, int64_t O, int64_t I, int accumulate) {
    if (N == 1) {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < O; o++) store(y + o, dot(x, w + o * I, I) + (bias ? bias[o] : 0.f), accumulate);
        return;
    }
    const int64_t blocks = (O + 3) / 4;
#pragma omp for schedule(static)
    for (int64_t ob = 0; ob < blocks; ob++) {
        const int64_t o = ob * 4;
        if (o + 4 > O) { /* the last, partial block: one output at a time */
            for (int64_t oo = o; oo < O; oo++)
                for (int64_t n = 0; n < N; n++)
                    store(y + n * O + oo, dot(x + n * I, w + oo * I, I) + (bias ? bias[oo] : 0.f), accumulate);
            continue;
        }
        const float *w0 = w + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
        const float b0 = bias ? bias[o] : 0.f, b1 = bias ? bias[o + 1] : 0.f;
        const float b2 = bias ? bias[o + 2] : 0.f, b3 = bias ? bias[o + 3] : 0.f;
        int64_t n = 0;
        for (; n + 2 <= N; n += 2) {
            const float *x0 = x + n * I, *x1 = x0 + I;
            float a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13)
            for (int64_t i = 0; i < I; i++) {
                const float u = x0[i], v = x1[i];
                a00 += u * w0[i]; a01 += u * w1[i]; a02 += u * w2[i]; a03 += u * w3[i];
                a10 += v * w0[i]; a11 += v * w1[i]; a12 += v * w2[i]; a13 += v * w3[i];
            }
            float *y0 = y + n * O + o, *y1 = y0 + O;
            store(y0, a00 + b0, accumulate); store(y0 + 1, a01 + b1, accumulate);
            store(y0 + 2, a02 + b2, accumulate); store(y0 + 3, a03 + b3, accumulate);
            store(y1, a10 + b0, accumulate); store(y1 + 1, a11 + b1, accumulate);
            store(y1 + 2, a12 + b2, accumulate); store(y1 + 3, a13 + b3, accumulate);
        }
        if (n < N) { /* an odd row count: the last row against the 4 W rows */
            const float *x0 = x + n * I;
            float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int64_t i = 0; i < I; i++) {
                const float u = x0[i];
                a0 += u * w0[i]; a1 += u * w1[i]; a2 += u * w2[i]; a3 += u * w3[i];
            }
            float *y0 = y + n * O + o;
            store(y0, a0 + b0, accumulate); store(y0 + 1, a1 + b1, accumulate);
            store(y0 + 2, a2 + b2, accumulate); store(y0 + 3, a3 + b3, accumulate);
        }
    }
}

#if defined(__AVX512F__)
#define PACK_COLS 32 /* 2 zmm per row */
#define PACK_ROWS 12 /* 24 accumulators of 32 registers */
#else
#define PACK_COLS 16 /* 2 ymm per row */
#define PACK_ROWS 6  /* 12 accumulators of 16 registers */
#endif

/* Rows in the register block that starts with `left` rows still to do: PACK_ROWS, then 8, 4, 2, 1. */
static inline int block_rows(int64_t left) {
    return left >= PACK_ROWS ? PACK_ROWS : PACK_ROWS > 8 && left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

/* xp = x [N, I] regrouped as gemm_packed reads it: block after block of block_rows() rows, each block
   [I, m] (the m rows' values of input i side by side), block n0 at xp + n0 * I. Read in place, the m rows
   lie I floats apart, and when 4·I is a multiple of 4 KiB (Qwen3's 1024, 2048, 3072) they all fall in
   one L1 set: a 12-row block then misses L1 on every broadcast (~35% of the rate, LOG.md stop 31).
   An orphaned `omp for`, as the products below. */
static void interleave_rows(const float *restrict x, float *restrict xp, int64_t N, int64_t I) {
    const int64_t full = N / PACK_ROWS * PACK_ROWS;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int64_t n0 = n / PACK_ROWS * PACK_ROWS;
        int m = PACK_ROWS;
        if (n >= full) /* the tail: 8, 4, 2, 1 rows, in that order */
            for (n0 = full, m = block_rows(N - n0); n >= n0 + m; n0 += m, m = block_rows(N - n0)) {}
        float *block = xp + n0 * I;
        const float *xn = x + n * I;
        for (int64_t i = 0; i < I; i++) block[i * m + (n - n0)] = xn[i];
    }
}

/* acc[r][:] = sum_i xb[i][r] * strip[i][:] for r < m (xb: one block of interleave_rows); inlined with a
   constant m, so the compiler unrolls the rows and keeps the m x PACK_COLS accumulators in registers. */
static inline __attribute__((always_inline)) void strip_block(const int m, const float *restrict xb, int64_t I,
                                                               const float *restrict strip, const float *next,
                                                               float acc[][PACK_COLS]) {
    for (int r = 0; r < m; r++)
        for (int j = 0; j < PACK_COLS; j++) acc[r][j] = 0.f;
    for (int64_t i = 0; i < I; i++) {
        const float *wi = strip + i * PACK_COLS, *xi = xb + i * m;
        if (next) /* the next strip, from memory while this one is multiplied (~10% on a 49k-row LM head) */
            for (int j = 0; j < PACK_COLS; j += 16) __builtin_prefetch(next + i * PACK_COLS + j, 0, 1);
        for (int j = 0; j < PACK_COLS; j++) {
            const float wj = wi[j];
            for (int r = 0; r < m; r++) acc[r][j] += xi[r] * wj;
        }
    }
}

/* xp: x regrouped by interleave_rows. */
static void gemm_packed(const float *restrict xp, const float *restrict wp, const float *restrict bias,
                        float *restrict y, int64_t N, int64_t O, int64_t I, int accumulate) {
    const int64_t strips = (O + PACK_COLS - 1) / PACK_COLS;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; s++) {
        const float *strip = wp + s * I * PACK_COLS;
        const int64_t o0 = s * PACK_COLS, width = O - o0 < PACK_COLS ? O - o0 : PACK_COLS;
        const float *next = s + 1 < strips ? strip + I * PACK_COLS : NULL;
        float acc[PACK_ROWS][PACK_COLS];
        for (int64_t n = 0; n < N;) {
            const int64_t left = N - n;
            const float *pf = n == 0 ? next : NULL; /* prefetch during the first pass over the strip only */
            const int m = block_rows(left);
            const float *xb = xp + n * I;
            switch (m) { /* a constant row count per call: see strip_block */
                case PACK_ROWS: strip_block(PACK_ROWS, xb, I, strip, pf, acc); break;
#if PACK_ROWS > 8
                case 8: strip_block(8, xb, I, strip, pf, acc); break;
#endif
                case 4: strip_block(4, xb, I, strip, pf, acc); break;
                case 2: strip_block(2, xb, I, strip, pf, acc); break;
                default: strip_block(1, xb, I, strip, pf, acc);
            }
            for (int r = 0; r < m; r++)
                for (int64_t j = 0; j < width; j++)
                    store(y + (n + r) * O + o0 + j, acc[r][j] + (bias ? bias[o0 + j] : 0.f), accumulate);
            n += m;
        }
    }
}

static inline int gemm_packed_cols(void) { return PACK_COLS; }
#endif

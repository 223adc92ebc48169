/* e^x without libm, in a form the compiler vectorises: shared by softmax_rows.c and llama_step.c.
   Cody-Waite reduction to [-ln2/2, ln2/2] and a degree-6 Taylor form, ~1e-7 relative error there. */
#ifndef SPUTNIK_FAST_EXP_H
#define SPUTNIK_FAST_EXP_H
#include <stdint.h>
#include <string.h>

static inline float clamp_lo(float x) { return x < -87.0f ? -87.0f : x; }

/* e^x for x in [-87, 88]; callers clamp the low end (clamp_lo), log-probs never exceed ~0 */
static inline float exp_neg(float x) {
    x = x > 88.0f ? 88.0f : x;
    /* n = round(x / ln2) by the 1.5 * 2^23 trick (floorf does not vectorise without -ffast-math) */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* ln2 split: hi exact in 9 bits */
    float q = 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n as a float's exponent field */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return q * scale;
}

/* e^x for any float x: clamped to [-87, 88] first (e^-87 ~ 1.6e-38, about the smallest normal float) */
static inline float exp_any(float x) { return exp_neg(clamp_lo(x)); }
#endif

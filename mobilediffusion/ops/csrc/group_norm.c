/* GroupNorm with per-channel affine, then optionally SiLU, of channels_last maps, for x86 CPUs with AVX-512
   (fp32) and AVX512-BF16 (bf16).

   x is (n, hw, c) in memory (an NCHW tensor in channels_last layout): per sample and group of c / g
   channels, y = (x - mean) / sqrt(var + eps) * weight + bias, then y * sigmoid(y) if silu.

   Compiled with attention.c into one library by mobilediffusion/ops/cpu_kernel.py. Two passes over x per
   sample: per-channel sums of x and x^2 (double accumulators, per thread over a run of pixels, then added),
   combined per group in double; then every element once, x * a + s with a = weight * rstd and
   s = bias - mean * a per channel, the SiLU in fp32 and one rounding to the output dtype. y may be x
   (in place): the second pass reads each element before writing it. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

typedef uint16_t bf16;

static inline float scalar_f32(float v) { return v; }
static inline float scalar_bf16(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline __m512 load_f32(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline void store_f32(float *p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
static inline __m512 load_bf16(const bf16 *p, __mmask16 m) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#ifdef __AVX512BF16__
static inline void store_bf16(bf16 *p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
#endif

/* y * sigmoid(y) = y / (1 + 2^(-y log2 e)); exp2_ps's degree-5 polynomial (1.1e-7 relative). */
static inline __m512 silu_ps(__m512 y) {
    __m512 e = exp2_ps(_mm512_mul_ps(y, _mm512_set1_ps(-1.44269504088896341f)), 5);
    return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* Per-channel sums of x and x^2 over pixels [p0, p1) of one sample (rows of c elements), added into
   acc[0 .. cp) and acc[cp .. 2 cp) (cp = c rounded up to 16). */
#define SUMS(NAME, T, LOAD)                                                                                   \
static void NAME(const T *x, int64_t p0, int64_t p1, int64_t c, int64_t cp, double *acc) {                    \
    for (int64_t p = p0; p < p1; p++) {                                                                       \
        const T *row = x + p * c;                                                                             \
        for (int64_t j = 0; j < c; j += NB) {                                                                 \
            __m512 v = LOAD(row + j, tail_mask(c - j));                                                       \
            __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));                                          \
            __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));                                       \
            double *s1 = acc + j, *s2 = acc + cp + j;                                                         \
            _mm512_storeu_pd(s1, _mm512_add_pd(_mm512_loadu_pd(s1), lo));                                     \
            _mm512_storeu_pd(s1 + 8, _mm512_add_pd(_mm512_loadu_pd(s1 + 8), hi));                             \
            _mm512_storeu_pd(s2, _mm512_fmadd_pd(lo, lo, _mm512_loadu_pd(s2)));                               \
            _mm512_storeu_pd(s2 + 8, _mm512_fmadd_pd(hi, hi, _mm512_loadu_pd(s2 + 8)));                       \
        }                                                                                                     \
    }                                                                                                         \
}

/* y = x * a + s per channel (then SiLU) over pixels [p0, p1). */
#define APPLY(NAME, T, LOAD, STORE)                                                                           \
static void NAME(const T *x, T *y, int64_t p0, int64_t p1, int64_t c, const float *a, const float *s,         \
                 int silu) {                                                                                  \
    for (int64_t p = p0; p < p1; p++) {                                                                       \
        const T *row = x + p * c;                                                                             \
        T *out = y + p * c;                                                                                   \
        for (int64_t j = 0; j < c; j += NB) {                                                                 \
            __mmask16 m = tail_mask(c - j);                                                                   \
            __m512 v = _mm512_fmadd_ps(LOAD(row + j, m), _mm512_loadu_ps(a + j), _mm512_loadu_ps(s + j));     \
            STORE(out + j, m, silu ? silu_ps(v) : v);                                                         \
        }                                                                                                     \
    }                                                                                                         \
}

/* Entry points: x, y (n, hw, c); weight, bias: c elements of T (the module's own parameters, as they are)
   or NULL; g divides c. Returns 0, or 1 if scratch memory could not be allocated (y is then unchanged). */
#define ENTRY(NAME, T, SCALAR, SUMFN, APPLYFN)                                                                \
int NAME(const T *x, T *y, int64_t n, int64_t hw, int64_t c, int64_t g, const T *weight, const T *bias,       \
         float eps, int silu, int threads) {                                                                  \
    const int64_t cp = round_up(c, NB), cg = c / g;                                                           \
    if (threads < 1) threads = 1;                                                                             \
    double *acc = (double *)alloc64((size_t)(threads * 2 * cp) * sizeof(double));                            \
    float *a = (float *)alloc64((size_t)cp * sizeof(float)), *s = (float *)alloc64((size_t)cp * sizeof(float)); \
    if (!acc || !a || !s) {                                                                                   \
        free(acc); free(a); free(s);                                                                          \
        return 1;                                                                                             \
    }                                                                                                         \
    memset(a, 0, (size_t)cp * sizeof(float));                                                                \
    memset(s, 0, (size_t)cp * sizeof(float));                                                                 \
    for (int64_t b = 0; b < n; b++) {                                                                         \
        const T *xb = x + b * hw * c;                                                                         \
        T *yb = y + b * hw * c;                                                                               \
        memset(acc, 0, (size_t)(threads * 2 * cp) * sizeof(double));                                          \
        _Pragma("omp parallel num_threads(threads)")                                                          \
        {                                                                                                     \
            int t = omp_get_thread_num(), nt = omp_get_num_threads();                                         \
            SUMFN(xb, hw * t / nt, hw * (t + 1) / nt, c, cp, acc + t * 2 * cp);                               \
        }                                                                                                     \
        for (int64_t t = 1; t < threads; t++)                                                                 \
            for (int64_t j = 0; j < 2 * cp; j++) acc[j] += acc[t * 2 * cp + j];                               \
        for (int64_t k = 0; k < g; k++) {                                                                     \
            double s1 = 0.0, s2 = 0.0, count = (double)hw * (double)cg;                                       \
            for (int64_t j = k * cg; j < (k + 1) * cg; j++) { s1 += acc[j]; s2 += acc[cp + j]; }             \
            double mean = s1 / count, var = s2 / count - mean * mean;                                         \
            double rstd = 1.0 / sqrt((var > 0.0 ? var : 0.0) + (double)eps);                                  \
            for (int64_t j = k * cg; j < (k + 1) * cg; j++) {                                                 \
                double aj = rstd * (weight ? (double)SCALAR(weight[j]) : 1.0);                                \
                a[j] = (float)aj;                                                                             \
                s[j] = (float)((bias ? (double)SCALAR(bias[j]) : 0.0) - mean * aj);                           \
            }                                                                                                 \
        }                                                                                                     \
        _Pragma("omp parallel num_threads(threads)")                                                          \
        {                                                                                                     \
            int t = omp_get_thread_num(), nt = omp_get_num_threads();                                         \
            APPLYFN(xb, yb, hw * t / nt, hw * (t + 1) / nt, c, a, s, silu);                                   \
        }                                                                                                     \
    }                                                                                                         \
    free(acc); free(a); free(s);                                                                              \
    return 0;                                                                                                 \
}

SUMS(sums_f32, float, load_f32)
APPLY(apply_f32, float, load_f32, store_f32)
ENTRY(md_group_norm_f32, float, scalar_f32, sums_f32, apply_f32)
#ifdef __AVX512BF16__
SUMS(sums_bf16, bf16, load_bf16)
APPLY(apply_bf16, bf16, load_bf16, store_bf16)
ENTRY(md_group_norm_bf16, bf16, scalar_bf16, sums_bf16, apply_bf16)
#endif

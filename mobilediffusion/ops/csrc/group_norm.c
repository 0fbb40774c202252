/* GroupNorm with per-channel affine, then optionally SiLU, of channels_last maps, for x86 CPUs with AVX-512
   (fp32) and AVX512-BF16 (bf16).

   x is (n, hw, c) in memory (an NCHW tensor in channels_last layout): per sample and group of c / g
   channels, y = (x - mean) / sqrt(var + eps) * weight + bias, then y * sigmoid(y) if silu.

   Compiled with attention.c into one library by mobilediffusion/ops/cpu_kernel.py. Two passes over x per
   sample: per-channel sums of x and x^2 (double accumulators, per thread over a run of pixels, then added),
   combined per group in double; then every element once, x * a + s with a = weight * rstd and
   s = bias - mean * a per channel, the SiLU in fp32 and one rounding to the output dtype. y may be x
   (in place): the second pass reads each element before writing it.

   md_group_norm_u8_bf16 writes the result as uint8 for an int8 convolution next (ops/int8.py): with the given
   (scale, zero point), or, if none is given, with the range of the output bounded from each channel's smallest and
   largest input (gathered in the first pass; the affine map is monotone per channel and SiLU's extremes on an
   interval are at its ends or its minimum), so no pass over the output is needed to find its range. */
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
#ifdef __AVX512BF16__
/* sums_bf16, and each channel's smallest and largest element into mn[0 .. cp), mx[0 .. cp). */
static void sums_range_bf16(const bf16 *x, int64_t p0, int64_t p1, int64_t c, int64_t cp, double *acc, float *mn,
                            float *mx) {
    for (int64_t p = p0; p < p1; p++) {
        const bf16 *row = x + p * c;
        for (int64_t j = 0; j < c; j += NB) {
            __mmask16 m = tail_mask(c - j);
            __m512 v = load_bf16(row + j, m);
            __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
            double *s1 = acc + j, *s2 = acc + cp + j;
            _mm512_storeu_pd(s1, _mm512_add_pd(_mm512_loadu_pd(s1), lo));
            _mm512_storeu_pd(s1 + 8, _mm512_add_pd(_mm512_loadu_pd(s1 + 8), hi));
            _mm512_storeu_pd(s2, _mm512_fmadd_pd(lo, lo, _mm512_loadu_pd(s2)));
            _mm512_storeu_pd(s2 + 8, _mm512_fmadd_pd(hi, hi, _mm512_loadu_pd(s2 + 8)));
            _mm512_storeu_ps(mn + j, _mm512_mask_min_ps(_mm512_loadu_ps(mn + j), m, _mm512_loadu_ps(mn + j), v));
            _mm512_storeu_ps(mx + j, _mm512_mask_max_ps(_mm512_loadu_ps(mx + j), m, _mm512_loadu_ps(mx + j), v));
        }
    }
}

/* uint8 of (x * a + s per channel, then SiLU) with 1 / scale and zero point, over pixels [p0, p1). */
static void apply_u8_bf16(const bf16 *x, uint8_t *y, int64_t p0, int64_t p1, int64_t c, const float *a,
                          const float *s, int silu, float inv, int zp) {
    const __m512 vinv = _mm512_set1_ps(inv), vzp = _mm512_set1_ps((float)zp);
    const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
    for (int64_t p = p0; p < p1; p++) {
        const bf16 *row = x + p * c;
        uint8_t *out = y + p * c;
        for (int64_t j = 0; j < c; j += NB) {
            __mmask16 m = tail_mask(c - j);
            __m512 v = _mm512_fmadd_ps(load_bf16(row + j, m), _mm512_loadu_ps(a + j), _mm512_loadu_ps(s + j));
            if (silu) v = silu_ps(v);
            __m512i q = _mm512_cvtps_epi32(_mm512_fmadd_ps(v, vinv, vzp));
            q = _mm512_min_epi32(_mm512_max_epi32(q, zero), top);
            _mm_mask_storeu_epi8(out + j, m, _mm512_cvtepi32_epi8(q));
        }
    }
}

static inline float silu_f(float v) { return v / (1.0f + expf(-v)); }

/* x (n, hw, c) bf16 -> y uint8; qp: (scale, zero point) in, or qp[0] <= 0 to bound the range here; out: the
   (scale, zero point) used. Returns 0, or 1 if scratch memory could not be allocated (y is then unchanged). */
int md_group_norm_u8_bf16(const bf16 *x, uint8_t *y, int64_t n, int64_t hw, int64_t c, int64_t g,
                          const bf16 *weight, const bf16 *bias, float eps, int silu, int threads, float *qp) {
    const int64_t cp = round_up(c, NB), cg = c / g;
    if (threads < 1) threads = 1;
    double *acc = (double *)alloc64((size_t)(threads * 2 * cp) * sizeof(double));
    float *mn = (float *)alloc64((size_t)(threads * cp) * sizeof(float));
    float *mx = (float *)alloc64((size_t)(threads * cp) * sizeof(float));
    float *a = (float *)alloc64((size_t)(n * cp) * sizeof(float)), *s = (float *)alloc64((size_t)(n * cp) * sizeof(float));
    if (!acc || !mn || !mx || !a || !s) {
        free(acc); free(mn); free(mx); free(a); free(s);
        return 1;
    }
    memset(a, 0, (size_t)(n * cp) * sizeof(float));
    memset(s, 0, (size_t)(n * cp) * sizeof(float));
    const int bound = !(qp[0] > 0.0f);
    float lo = 0.0f, hi = 0.0f;  /* the output range, with 0 in it */
    for (int64_t b = 0; b < n; b++) {
        const bf16 *xb = x + b * hw * c;
        float *ab = a + b * cp, *sb = s + b * cp;
        memset(acc, 0, (size_t)(threads * 2 * cp) * sizeof(double));
        for (int64_t i = 0; i < threads * cp; i++) { mn[i] = __builtin_inff(); mx[i] = -__builtin_inff(); }
        #pragma omp parallel num_threads(threads)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            sums_range_bf16(xb, hw * t / nt, hw * (t + 1) / nt, c, cp, acc + t * 2 * cp, mn + t * cp, mx + t * cp);
        }
        for (int64_t t = 1; t < threads; t++) {
            for (int64_t j = 0; j < 2 * cp; j++) acc[j] += acc[t * 2 * cp + j];
            for (int64_t j = 0; j < cp; j++) {
                mn[j] = mn[t * cp + j] < mn[j] ? mn[t * cp + j] : mn[j];
                mx[j] = mx[t * cp + j] > mx[j] ? mx[t * cp + j] : mx[j];
            }
        }
        for (int64_t k = 0; k < g; k++) {
            double s1 = 0.0, s2 = 0.0, count = (double)hw * (double)cg;
            for (int64_t j = k * cg; j < (k + 1) * cg; j++) { s1 += acc[j]; s2 += acc[cp + j]; }
            double mean = s1 / count, var = s2 / count - mean * mean;
            double rstd = 1.0 / sqrt((var > 0.0 ? var : 0.0) + (double)eps);
            for (int64_t j = k * cg; j < (k + 1) * cg; j++) {
                double aj = rstd * (weight ? (double)scalar_bf16(weight[j]) : 1.0);
                ab[j] = (float)aj;
                sb[j] = (float)((bias ? (double)scalar_bf16(bias[j]) : 0.0) - mean * aj);
                if (!bound) continue;
                float e0 = ab[j] * mn[j] + sb[j], e1 = ab[j] * mx[j] + sb[j];
                float plo = e0 < e1 ? e0 : e1, phi = e0 < e1 ? e1 : e0, flo = plo, fhi = phi;
                if (silu) {  /* SiLU on [plo, phi]: largest at an end, smallest at an end or at -1.2785 */
                    float f0 = silu_f(plo), f1 = silu_f(phi);
                    fhi = f0 > f1 ? f0 : f1;
                    flo = (plo < -1.2784645f && phi > -1.2784645f) ? -0.27846454f : (f0 < f1 ? f0 : f1);
                }
                lo = flo < lo ? flo : lo;
                hi = fhi > hi ? fhi : hi;
            }
        }
    }
    if (bound) {
        if (!(isfinite(lo) && isfinite(hi)) || hi - lo < 1e-12f) { qp[0] = 1.0f; qp[1] = 128.0f; }
        else {
            float scale = (hi - lo) / 254.0f, z = 1.0f + nearbyintf(-lo / scale);
            qp[0] = scale;
            qp[1] = z < 1.0f ? 1.0f : (z > 255.0f ? 255.0f : z);
        }
    }
    const float inv = 1.0f / qp[0];
    const int zp = (int)qp[1];
    for (int64_t b = 0; b < n; b++) {
        #pragma omp parallel num_threads(threads)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            apply_u8_bf16(x + b * hw * c, y + b * hw * c, hw * t / nt, hw * (t + 1) / nt, c, a + b * cp, s + b * cp,
                          silu, inv, zp);
        }
    }
    free(acc); free(mn); free(mx); free(a); free(s);
    return 0;
}
#endif
APPLY(apply_f32, float, load_f32, store_f32)
ENTRY(md_group_norm_f32, float, scalar_f32, sums_f32, apply_f32)
#ifdef __AVX512BF16__
SUMS(sums_bf16, bf16, load_bf16)
APPLY(apply_bf16, bf16, load_bf16, store_bf16)
ENTRY(md_group_norm_bf16, bf16, scalar_bf16, sums_bf16, apply_bf16)
#endif

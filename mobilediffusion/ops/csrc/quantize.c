/* Activations to uint8 for the int8 convolutions and linears (mobilediffusion/ops/int8.py), for x86 CPUs with
   AVX-512 (fp32 inputs) and AVX512-BF16 (bf16 inputs; reading bf16 needs only AVX-512, the flag keeps the two
   builds alike).

   md_quantize_u8_*: y = clamp(round_half_even(x * inv_scale) + zp, 0, 255) over n contiguous elements: one read of
   x and one write of y (torch's quantize_per_tensor + int_repr make two passes and a quantized tensor, which torch
   deprecates). md_minmax_*: the smallest and largest element (NaNs are skipped), for scales computed per call.

   Compiled with attention.c and group_norm.c into one library by mobilediffusion/ops/cpu_kernel.py; each thread
   takes one contiguous run of the elements (64-element aligned). */
#include <immintrin.h>
#include <float.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

typedef uint16_t bf16;

static inline __m512 q_load_f32(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 q_load_bf16(const bf16 *p, __mmask16 m) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* [start, end) of thread t of nt over n elements, in runs of 64 */
static inline void q_range(int64_t n, int t, int nt, int64_t *start, int64_t *end) {
    int64_t blocks = (n + 63) / 64;
    *start = min64(n, blocks * t / nt * 64);
    *end = min64(n, blocks * (t + 1) / nt * 64);
}

#define QUANTIZE(NAME, T, LOAD)                                                                               \
int NAME(const T *x, uint8_t *y, int64_t n, float inv_scale, int zp, int threads) {                            \
    if (threads < 1) threads = 1;                                                                             \
    const __m512 s = _mm512_set1_ps(inv_scale);                                                               \
    const __m512i z = _mm512_set1_epi32(zp), lo = _mm512_setzero_si512();                                     \
    _Pragma("omp parallel num_threads(threads)")                                                              \
    {                                                                                                         \
        int64_t i0, i1;                                                                                       \
        q_range(n, omp_get_thread_num(), omp_get_num_threads(), &i0, &i1);                                    \
        for (int64_t i = i0; i < i1; i += NB) {                                                               \
            __mmask16 m = tail_mask(i1 - i);                                                                  \
            __m512i r = _mm512_cvt_roundps_epi32(_mm512_mul_ps(LOAD(x + i, m), s),                            \
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);              \
            r = _mm512_max_epi32(_mm512_add_epi32(r, z), lo); /* then unsigned saturation to 255 */            \
            _mm_mask_storeu_epi8(y + i, m, _mm512_cvtusepi32_epi8(r));                                        \
        }                                                                                                     \
    }                                                                                                         \
    return 0;                                                                                                 \
}

#define MINMAX(NAME, T, LOAD)                                                                                 \
int NAME(const T *x, int64_t n, float *out, int threads) {                                                    \
    if (threads < 1) threads = 1;                                                                             \
    float mins[256], maxs[256];                                                                               \
    if (threads > 256) threads = 256;                                                                         \
    int used = 1;                                                                                             \
    _Pragma("omp parallel num_threads(threads)")                                                              \
    {                                                                                                         \
        int t = omp_get_thread_num(), nt = omp_get_num_threads();                                            \
        int64_t i0, i1;                                                                                       \
        q_range(n, t, nt, &i0, &i1);                                                                          \
        __m512 vmin = _mm512_set1_ps(FLT_MAX), vmax = _mm512_set1_ps(-FLT_MAX);                               \
        for (int64_t i = i0; i < i1; i += NB) {                                                               \
            __mmask16 m = tail_mask(i1 - i);                                                                  \
            __m512 v = LOAD(x + i, m);                                                                        \
            __mmask16 ok = m & _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q); /* not NaN */                              \
            vmin = _mm512_mask_min_ps(vmin, ok, vmin, v);                                                     \
            vmax = _mm512_mask_max_ps(vmax, ok, vmax, v);                                                     \
        }                                                                                                     \
        mins[t] = _mm512_reduce_min_ps(vmin);                                                                 \
        maxs[t] = _mm512_reduce_max_ps(vmax);                                                                 \
        if (t == 0) used = nt;                                                                                \
    }                                                                                                         \
    out[0] = mins[0];                                                                                         \
    out[1] = maxs[0];                                                                                         \
    for (int t = 1; t < used; t++) {                                                                          \
        if (mins[t] < out[0]) out[0] = mins[t];                                                               \
        if (maxs[t] > out[1]) out[1] = maxs[t];                                                               \
    }                                                                                                         \
    return 0;                                                                                                 \
}

QUANTIZE(md_quantize_u8_f32, float, q_load_f32)
MINMAX(md_minmax_f32, float, q_load_f32)
#ifdef __AVX512BF16__
QUANTIZE(md_quantize_u8_bf16, bf16, q_load_bf16)
MINMAX(md_minmax_bf16, bf16, q_load_bf16)
#endif

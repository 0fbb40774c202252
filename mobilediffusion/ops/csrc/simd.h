/* What the CPU kernels share (attention.c, group_norm.c): small helpers and a vector exp2.
   NB (elements per 512-bit fp32 vector) is defined here. */
#ifndef MD_SIMD_H
#define MD_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define NB 16       /* fp32 elements per vector */

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static void *alloc64(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 64) ? NULL : p;
}

static inline __mmask16 tail_mask(int64_t n) { return n >= NB ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

/* 2^t for finite t (large negative t gives 0): 2^n 2^f with n = round(t), |f| <= 1/2 and 2^f by a
   polynomial fitted on [-1/2, 1/2]: degree 5 (relative error 1.1e-7, for fp32) or 3 (1.1e-4, for
   probabilities that are rounded to bf16 next, a relative step of 2^-8). */
static inline __m512 exp2_ps(__m512 t, int deg) {
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n), p;
    if (deg >= 5) {
        p = _mm512_fmadd_ps(_mm512_set1_ps(1.3400432e-3f), f, _mm512_set1_ps(9.6760371e-3f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503272e-2f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022107e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314721e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
    } else {
        p = _mm512_fmadd_ps(_mm512_set1_ps(5.5922036e-2f), f, _mm512_set1_ps(2.4264008e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9312103e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9992448e-1f));
    }
    return _mm512_scalef_ps(p, n);
}

#endif

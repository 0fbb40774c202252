/* Scaled dot-product attention without mask for x86 CPUs with AVX-512 (fp32) and AVX512-BF16 (bf16).

   out[b, h, i, :] = sum_j softmax_j(scale * q[b, h, i, :] . k[b, h, j, :]) v[b, h, j, :]

   Compiled on the user's machine at first use by mobilediffusion/ops/cpu_kernel.py and called through ctypes.
   Every tensor is addressed by (batch, head, token) strides in elements; the head dim is contiguous.

   Method: FlashAttention's tiling on CPU registers and caches. Per batch and head, K and V are packed
   once into the layouts the micro-kernels stream (bf16: pairs of head-dim / key elements interleaved,
   the operand layout of vdpbf16ps). Queries are taken in blocks of QB rows and keys in blocks of KB, so
   a key block's K and V stay in L1/L2 while every MR-row register tile of the query block uses them.
   Per key block: S = Q K^T (fp32 accumulation in MR x 16*NV register tiles, which also keep each row's
   block maximum), the running row maximum m updated, the numerators P = exp(scale * (S - m)) stored
   (bf16 for bf16 inputs, else fp32) and summed, and the fp32 output accumulator O rescaled by
   exp(scale * (m_old - m)) and increased by P V (fp32 accumulation). At the end O is divided by the sum
   and written in the input dtype. Threads (OpenMP) take contiguous runs of (batch, head, query block),
   so a thread keeps one head's packed K and V in its cache. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define MR 8        /* query rows per register tile */
/* NB (simd.h): keys (or output columns) per vector */
#ifndef QB
#define QB 32       /* query rows per block (a multiple of MR and of 16) */
#endif
#ifndef KB
#define KB 384      /* keys per block (a multiple of 3 * NB) */
#endif

typedef uint16_t bf16;

/* Micro-kernels stay separate functions (each call does hundreds of cycles of work; profiles name them);
   their loops over tile rows and vectors are unrolled, so the accumulators stay in registers. */
#define KERNEL static __attribute__((noinline))
#define UNROLL _Pragma("GCC unroll 8")

/* The per-head state of the online softmax for one query block. */
typedef struct {
    float m[QB];          /* running maximum of the raw scores of each row */
    float alpha[QB];      /* exp(scale * (m_old - m_new)) of the last key block, the factor for O */
    float mx[QB * NB];    /* per row, the lane-wise maximum of the current key block's scores (from QK) */
    float l[QB * NB];     /* per row, the lane-wise running sum of the numerators */
} Softmax;

/* The online-softmax step of one key block for all QB rows: s holds the raw scores (row stride KB),
   keys < valid are real and valid..kn are padding (scores of zero keys, excluded here). Writes the
   numerators into p (row stride KB; padding zero) with STORE(pointer, fp32 vector) and adds them to
   sm->l. first: the first key block of the query block. DEG: degree of the exp polynomial. */
#define SOFTMAX_BLOCK(STORE_T, STORE, DEG)                                                                    \
    const float c = scale * 1.44269504088896341f; /* scores to base-2 exponents */                            \
    float arg[QB];                                                                                            \
    for (int r = 0; r < QB; r++) {                                                                            \
        __m512 vmax = _mm512_loadu_ps(sm->mx + r * NB);                                                       \
        if (valid < kn) { /* padding in this block: the maximum over the real keys only */                    \
            const float *srow = s + (int64_t)r * KB;                                                          \
            vmax = _mm512_set1_ps(-__builtin_inff());                                                         \
            for (int64_t j = 0; j < valid; j += NB)                                                           \
                vmax = _mm512_mask_max_ps(vmax, tail_mask(valid - j), vmax, _mm512_loadu_ps(srow + j));       \
        }                                                                                                     \
        float bm = _mm512_reduce_max_ps(vmax), m_new = first || bm > sm->m[r] ? bm : sm->m[r];                \
        arg[r] = first ? 0.0f : (sm->m[r] - m_new) * c;                                                       \
        sm->m[r] = m_new;                                                                                     \
    }                                                                                                         \
    for (int r = 0; r < QB; r += NB)                                                                          \
        _mm512_storeu_ps(sm->alpha + r, first ? _mm512_setzero_ps() : exp2_ps(_mm512_loadu_ps(arg + r), 5));  \
    const __m512 vc = _mm512_set1_ps(c);                                                                      \
    for (int r = 0; r < QB; r++) {                                                                            \
        const float *srow = s + (int64_t)r * KB;                                                              \
        STORE_T *prow = p + (int64_t)r * KB;                                                                  \
        const __m512 vm = _mm512_set1_ps(sm->m[r] * c);                                                       \
        __m512 vsum = _mm512_setzero_ps(), vsum2 = _mm512_setzero_ps();                                       \
        int64_t j = 0;                                                                                        \
        for (; j + 2 * NB <= valid; j += 2 * NB) { /* two vectors of real keys: two sums in flight */         \
            __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(srow + j), vc, vm), DEG);                      \
            __m512 e2 = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(srow + j + NB), vc, vm), DEG);                \
            STORE(prow + j, e);                                                                               \
            STORE(prow + j + NB, e2);                                                                         \
            vsum = _mm512_add_ps(vsum, e);                                                                    \
            vsum2 = _mm512_add_ps(vsum2, e2);                                                                 \
        }                                                                                                     \
        for (; j < kn; j += NB) { /* the rest, padding masked to zero */                                      \
            __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(srow + j), vc, vm), DEG);                      \
            if (j + NB > valid) e = _mm512_maskz_mov_ps(j < valid ? tail_mask(valid - j) : 0, e);             \
            STORE(prow + j, e);                                                                               \
            vsum = _mm512_add_ps(vsum, e);                                                                    \
        }                                                                                                     \
        vsum = _mm512_add_ps(vsum, vsum2);                                                                    \
        __m512 lv = _mm512_loadu_ps(sm->l + r * NB);                                                          \
        _mm512_storeu_ps(sm->l + r * NB, _mm512_fmadd_ps(lv, _mm512_set1_ps(sm->alpha[r]), vsum));            \
        _mm512_storeu_ps(sm->mx + r * NB, _mm512_set1_ps(-__builtin_inff()));                                 \
    }

/* The end of a query block: rows < rows of O (row stride ldo, fp32) divided by their sums, stored with
   STORE16(pointer, mask, fp32 vector) to out (row stride ldout). */
#define STORE_ROWS(T, STORE16)                                                                                \
    for (int r = 0; r < rows; r++) {                                                                          \
        __m512 w = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(sm->l + r * NB)));              \
        for (int64_t c = 0; c < d; c += NB) {                                                                 \
            __m512 y = _mm512_mul_ps(_mm512_loadu_ps(o + r * ldo + c), w);                                    \
            STORE16(out + r * ldout + c, tail_mask(d - c), y);                                                \
        }                                                                                                     \
    }

/* Both micro-kernels: MR x NV accumulators; the QK one keeps each row's lane-wise maximum in mx. */
#define QK_EPILOGUE(NV)                                                                                       \
    UNROLL for (int r = 0; r < MR; r++) {                                                                     \
        __m512 t = _mm512_loadu_ps(mx + r * NB);                                                              \
        UNROLL for (int n = 0; n < NV; n++) {                                                                 \
            _mm512_storeu_ps(s + r * KB + n * NB, acc[r][n]);                                                 \
            t = _mm512_max_ps(t, acc[r][n]);                                                                  \
        }                                                                                                     \
        _mm512_storeu_ps(mx + r * NB, t);                                                                     \
    }
#define PV_PROLOGUE(NV)                                                                                       \
    __m512 acc[MR][NV];                                                                                       \
    UNROLL for (int r = 0; r < MR; r++) {                                                                     \
        __m512 a = _mm512_set1_ps(alpha[r]);                                                                  \
        UNROLL for (int n = 0; n < NV; n++) acc[r][n] = _mm512_mul_ps(a, _mm512_loadu_ps(o + r * ldo + n * NB)); \
    }
#define PV_EPILOGUE(NV)                                                                                       \
    UNROLL for (int r = 0; r < MR; r++)                                                                       \
        UNROLL for (int n = 0; n < NV; n++) _mm512_storeu_ps(o + r * ldo + n * NB, acc[r][n]);

/* ------------------------------------------------------------------------------------------ bf16 */
#ifdef __AVX512BF16__
static inline __m512bh bcast_pair(const bf16 *p) {  /* two bf16 as one 32-bit lane, broadcast */
    int32_t w;
    memcpy(&w, p, 4);
    return (__m512bh)_mm512_set1_epi32(w);
}

/* K (tk x d, row stride ldk) -> kp: per block of 16 keys, per pair c of head-dim elements, one vector of
   16 (k[j, 2c], k[j, 2c+1]) pairs; keys past tk and the odd head-dim element are zero. */
KERNEL void pack_k_bf16(const bf16 *k, int64_t ldk, int64_t tk, int64_t d, bf16 *kp) {
    const int64_t dp = (d + 1) / 2, tkp = round_up(tk, NB);
    memset(kp, 0, (size_t)(tkp * dp * 2) * sizeof(bf16));
    for (int64_t j = 0; j < tk; j++) {
        bf16 *dst = kp + (j / NB) * dp * 2 * NB + (j % NB) * 2;
        for (int64_t c = 0; c < d; c++) dst[(c / 2) * 2 * NB + (c & 1)] = k[j * ldk + c];
    }
}

/* V (tk x d, row stride ldv) -> vp: per pair of keys, per block of 16 output columns, one vector of 16
   (v[2j, c], v[2j+1, c]) pairs; keys past tk and columns past d are zero. */
KERNEL void pack_v_bf16(const bf16 *v, int64_t ldv, int64_t tk, int64_t d, bf16 *vp) {
    const int64_t nc = (d + NB - 1) / NB, tkp = round_up(tk, NB);
    memset(vp, 0, (size_t)(tkp * nc * NB) * sizeof(bf16));
    for (int64_t j = 0; j < tk; j++) {
        bf16 *dst = vp + (j / 2) * nc * 2 * NB + (j & 1);
        for (int64_t c = 0; c < d; c++) dst[c * 2] = v[j * ldv + c];  /* = (c / 16) * 32 + (c % 16) * 2 */
    }
}

/* S[MR x 16*NV] = Q K^T for NV blocks of 16 keys; qs: MR rows of 2*dp bf16, kp: the first key block. */
#define QK_BF16(NV)                                                                                           \
KERNEL void qk_bf16_##NV(const bf16 *qs, int64_t dp, const bf16 *kp, float *s, float *mx) {                   \
    __m512 acc[MR][NV];                                                                                       \
    UNROLL for (int r = 0; r < MR; r++)                                                                       \
        UNROLL for (int n = 0; n < NV; n++) acc[r][n] = _mm512_setzero_ps();                                  \
    for (int64_t c = 0; c < dp; c++) {                                                                        \
        __m512bh kv[NV];                                                                                      \
        UNROLL for (int n = 0; n < NV; n++) kv[n] = (__m512bh)_mm512_loadu_si512(kp + (n * dp + c) * 2 * NB); \
        UNROLL for (int r = 0; r < MR; r++) {                                                                 \
            __m512bh qv = bcast_pair(qs + r * 2 * dp + 2 * c);                                                \
            UNROLL for (int n = 0; n < NV; n++) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], qv, kv[n]);           \
        }                                                                                                     \
    }                                                                                                         \
    QK_EPILOGUE(NV)                                                                                           \
}
QK_BF16(1)
QK_BF16(2)
QK_BF16(3)

/* O[MR x 16*NV] = alpha * O + P V over kn keys (even); p rows of stride KB, vp: the block's first key
   pair at this chunk's first column block, nc column blocks per key pair, o rows of stride ldo. */
#define PV_BF16(NV)                                                                                           \
KERNEL void pv_bf16_##NV(const bf16 *p, int64_t kn, const bf16 *vp, int64_t nc, const float *alpha,           \
                         float *o, int64_t ldo) {                                                             \
    PV_PROLOGUE(NV)                                                                                           \
    for (int64_t j = 0; j < kn; j += 2) {                                                                     \
        const bf16 *vrow = vp + (j / 2) * nc * 2 * NB;                                                        \
        __m512bh vv[NV];                                                                                      \
        UNROLL for (int n = 0; n < NV; n++) vv[n] = (__m512bh)_mm512_loadu_si512(vrow + n * 2 * NB);          \
        UNROLL for (int r = 0; r < MR; r++) {                                                                 \
            __m512bh pv = bcast_pair(p + r * KB + j);                                                         \
            UNROLL for (int n = 0; n < NV; n++) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], pv, vv[n]);           \
        }                                                                                                     \
    }                                                                                                         \
    PV_EPILOGUE(NV)                                                                                           \
}
PV_BF16(1)
PV_BF16(2)
PV_BF16(3)

/* The same for NV column blocks and 8 more columns (the last half block of d = 16 k + 8, e.g. 40): the
   half is a 256-bit vdpbf16ps, half the work of a padded 512-bit one. */
#define PV_BF16_HALF(NV)                                                                                      \
KERNEL void pv_bf16_##NV##h(const bf16 *p, int64_t kn, const bf16 *vp, int64_t nc, const float *alpha,        \
                            float *o, int64_t ldo) {                                                          \
    PV_PROLOGUE(NV)                                                                                           \
    __m256 acch[MR];                                                                                          \
    UNROLL for (int r = 0; r < MR; r++)                                                                       \
        acch[r] = _mm256_mul_ps(_mm256_set1_ps(alpha[r]), _mm256_loadu_ps(o + r * ldo + NV * NB));            \
    for (int64_t j = 0; j < kn; j += 2) {                                                                     \
        const bf16 *vrow = vp + (j / 2) * nc * 2 * NB;                                                        \
        __m512bh vv[NV];                                                                                      \
        UNROLL for (int n = 0; n < NV; n++) vv[n] = (__m512bh)_mm512_loadu_si512(vrow + n * 2 * NB);          \
        __m256bh vh = (__m256bh)_mm256_loadu_si256((const __m256i *)(vrow + NV * 2 * NB));                    \
        UNROLL for (int r = 0; r < MR; r++) {                                                                 \
            __m512bh pv = bcast_pair(p + r * KB + j);                                                         \
            UNROLL for (int n = 0; n < NV; n++) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], pv, vv[n]);           \
            acch[r] = _mm256_dpbf16_ps(acch[r], (__m256bh)_mm512_castsi512_si256((__m512i)pv), vh);           \
        }                                                                                                     \
    }                                                                                                         \
    PV_EPILOGUE(NV)                                                                                           \
    UNROLL for (int r = 0; r < MR; r++) _mm256_storeu_ps(o + r * ldo + NV * NB, acch[r]);                     \
}
PV_BF16_HALF(1)
PV_BF16_HALF(2)

/* bf16 numerators (their rounding, unbiased, is left out of the fp32 sum). */
#define STORE_P_BF16(ptr, e) _mm256_storeu_si256((__m256i *)(ptr), (__m256i)_mm512_cvtneps_pbh(e))
KERNEL void softmax_bf16(const float *s, int64_t valid, int64_t kn, float scale, int first, bf16 *p,
                         Softmax *sm) {
    SOFTMAX_BLOCK(bf16, STORE_P_BF16, 3)
}

#define STORE16_BF16(ptr, mask, y) _mm256_mask_storeu_epi16((ptr), (mask), (__m256i)_mm512_cvtneps_pbh(y))
KERNEL void store_rows_bf16(const float *o, int64_t ldo, const Softmax *sm, int rows, int64_t d, bf16 *out,
                            int64_t ldout) {
    STORE_ROWS(bf16, STORE16_BF16)
}
#endif  /* __AVX512BF16__ */

/* ------------------------------------------------------------------------------------------ fp32 */
/* K (tk x d) -> kp: per block of 16 keys, per head-dim element c, the 16 k[j, c]; keys past tk zero. */
KERNEL void pack_k_f32(const float *k, int64_t ldk, int64_t tk, int64_t d, float *kp) {
    const int64_t tkp = round_up(tk, NB);
    memset(kp, 0, (size_t)(tkp * d) * sizeof(float));
    for (int64_t j = 0; j < tk; j++) {
        float *dst = kp + (j / NB) * d * NB + j % NB;
        for (int64_t c = 0; c < d; c++) dst[c * NB] = k[j * ldk + c];
    }
}

/* V (tk x d) -> vp: rows of v padded with zeros to nc * 16 columns; keys past tk zero. */
KERNEL void pack_v_f32(const float *v, int64_t ldv, int64_t tk, int64_t d, float *vp) {
    const int64_t nc = (d + NB - 1) / NB, tkp = round_up(tk, NB);
    memset(vp, 0, (size_t)(tkp * nc * NB) * sizeof(float));
    for (int64_t j = 0; j < tk; j++) memcpy(vp + j * nc * NB, v + j * ldv, (size_t)d * sizeof(float));
}

#define QK_F32(NV)                                                                                            \
KERNEL void qk_f32_##NV(const float *qs, int64_t d, const float *kp, float *s, float *mx) {                   \
    __m512 acc[MR][NV];                                                                                       \
    UNROLL for (int r = 0; r < MR; r++)                                                                       \
        UNROLL for (int n = 0; n < NV; n++) acc[r][n] = _mm512_setzero_ps();                                  \
    for (int64_t c = 0; c < d; c++) {                                                                         \
        __m512 kv[NV];                                                                                        \
        UNROLL for (int n = 0; n < NV; n++) kv[n] = _mm512_loadu_ps(kp + (n * d + c) * NB);                   \
        UNROLL for (int r = 0; r < MR; r++) {                                                                 \
            __m512 qv = _mm512_set1_ps(qs[r * d + c]);                                                        \
            UNROLL for (int n = 0; n < NV; n++) acc[r][n] = _mm512_fmadd_ps(qv, kv[n], acc[r][n]);            \
        }                                                                                                     \
    }                                                                                                         \
    QK_EPILOGUE(NV)                                                                                           \
}
QK_F32(1)
QK_F32(2)
QK_F32(3)

#define PV_F32(NV)                                                                                            \
KERNEL void pv_f32_##NV(const float *p, int64_t kn, const float *vp, int64_t nc, const float *alpha,          \
                        float *o, int64_t ldo) {                                                              \
    PV_PROLOGUE(NV)                                                                                           \
    for (int64_t j = 0; j < kn; j++) {                                                                        \
        const float *vrow = vp + j * nc * NB;                                                                 \
        __m512 vv[NV];                                                                                        \
        UNROLL for (int n = 0; n < NV; n++) vv[n] = _mm512_loadu_ps(vrow + n * NB);                           \
        UNROLL for (int r = 0; r < MR; r++) {                                                                 \
            __m512 pv = _mm512_set1_ps(p[r * KB + j]);                                                        \
            UNROLL for (int n = 0; n < NV; n++) acc[r][n] = _mm512_fmadd_ps(pv, vv[n], acc[r][n]);            \
        }                                                                                                     \
    }                                                                                                         \
    PV_EPILOGUE(NV)                                                                                           \
}
PV_F32(1)
PV_F32(2)
PV_F32(3)

#define PV_F32_HALF(NV)                                                                                       \
KERNEL void pv_f32_##NV##h(const float *p, int64_t kn, const float *vp, int64_t nc, const float *alpha,       \
                           float *o, int64_t ldo) {                                                           \
    PV_PROLOGUE(NV)                                                                                           \
    __m256 acch[MR];                                                                                          \
    UNROLL for (int r = 0; r < MR; r++)                                                                       \
        acch[r] = _mm256_mul_ps(_mm256_set1_ps(alpha[r]), _mm256_loadu_ps(o + r * ldo + NV * NB));            \
    for (int64_t j = 0; j < kn; j++) {                                                                        \
        const float *vrow = vp + j * nc * NB;                                                                 \
        __m512 vv[NV];                                                                                        \
        UNROLL for (int n = 0; n < NV; n++) vv[n] = _mm512_loadu_ps(vrow + n * NB);                           \
        __m256 vh = _mm256_loadu_ps(vrow + NV * NB);                                                          \
        UNROLL for (int r = 0; r < MR; r++) {                                                                 \
            __m512 pv = _mm512_set1_ps(p[r * KB + j]);                                                        \
            UNROLL for (int n = 0; n < NV; n++) acc[r][n] = _mm512_fmadd_ps(pv, vv[n], acc[r][n]);            \
            acch[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(pv), vh, acch[r]);                               \
        }                                                                                                     \
    }                                                                                                         \
    PV_EPILOGUE(NV)                                                                                           \
    UNROLL for (int r = 0; r < MR; r++) _mm256_storeu_ps(o + r * ldo + NV * NB, acch[r]);                     \
}
PV_F32_HALF(1)
PV_F32_HALF(2)

KERNEL void softmax_f32(const float *s, int64_t valid, int64_t kn, float scale, int first, float *p,
                        Softmax *sm) {
    SOFTMAX_BLOCK(float, _mm512_storeu_ps, 5)
}

#define STORE16_F32(ptr, mask, y) _mm512_mask_storeu_ps((ptr), (mask), (y))
KERNEL void store_rows_f32(const float *o, int64_t ldo, const Softmax *sm, int rows, int64_t d, float *out,
                           int64_t ldout) {
    STORE_ROWS(float, STORE16_F32)
}

/* ------------------------------------------------------------------------------------------ driver */
/* Output column blocks in chunks of at most 3 vectors, balanced (10 -> 3 3 2 2, 4 -> 2 2). */
static inline int64_t chunk(int64_t left) { return left <= 3 ? left : (left == 4 ? 2 : 3); }

/* One query block (rows <= QB real rows) of one head against all keys. Scratch: qs (QB x QW), s (QB x KB
   fp32), p (QB x KB), o (QB x nc*16 fp32), sm. QW: the packed query row (bf16: 2 * dp, fp32: d); KD: the
   micro-kernels' reduction steps (bf16: pairs); KSTEP / VSTEP: elements of the K / V pack per key; VCB:
   elements of one column block in a V pack row. */
#define BLOCK(NAME, T, PT, QW, KD, KSTEP, VSTEP, VCB, QK, PV, SOFTMAX, STORE)                                 \
static void NAME(const T *q, int64_t ldq, int rows, int64_t d, const T *kp, const T *vp, int64_t tk,          \
                 float scale, T *out, int64_t ldout, T *qs, float *s, PT *p, float *o, Softmax *sm) {         \
    const int64_t tkp = round_up(tk, NB), nc = (d + NB - 1) / NB, qw = (QW), ldo = nc * NB;                   \
    memset(qs, 0, (size_t)(QB * qw) * sizeof(T));                                                             \
    for (int r = 0; r < rows; r++) memcpy(qs + r * qw, q + r * ldq, (size_t)d * sizeof(T));                   \
    memset(o, 0, (size_t)(QB * ldo) * sizeof(float));                                                         \
    memset(sm->l, 0, sizeof(sm->l));                                                                          \
    for (int i = 0; i < QB * NB; i++) sm->mx[i] = -__builtin_inff();                                          \
    for (int64_t j0 = 0; j0 < tkp; j0 += KB) {                                                                \
        const int64_t kn = min64(tkp - j0, KB), valid = min64(tk - j0, kn);                                   \
        const T *kb = kp + j0 * (KSTEP), *vb = vp + j0 * (VSTEP);                                             \
        for (int64_t jb = 0; jb < kn;) {  /* key vectors in groups of up to 3 */                              \
            int64_t nv = min64((kn - jb) / NB, 3);                                                            \
            for (int r0 = 0; r0 < QB; r0 += MR) {                                                             \
                const T *qr = qs + r0 * qw, *kj = kb + jb * (KSTEP);                                          \
                float *sr = s + r0 * KB + jb, *mr = sm->mx + r0 * NB;                                         \
                if (nv == 3) QK##3(qr, (KD), kj, sr, mr);                                                     \
                else if (nv == 2) QK##2(qr, (KD), kj, sr, mr);                                                \
                else QK##1(qr, (KD), kj, sr, mr);                                                             \
            }                                                                                                 \
            jb += nv * NB;                                                                                    \
        }                                                                                                     \
        SOFTMAX(s, valid, kn, scale, j0 == 0, p, sm);                                                         \
        for (int64_t cb = 0; cb < nc;) {                                                                      \
            const int64_t nv = chunk(nc - cb);                                                                \
            const int half = cb + nv == nc && nv > 1 && d - (nc - 1) * NB <= NB / 2; /* 8 columns left */     \
            for (int r0 = 0; r0 < QB; r0 += MR) {                                                             \
                const PT *pr = p + r0 * KB;                                                                   \
                float *orow = o + r0 * ldo + cb * NB;                                                         \
                const T *vc = vb + cb * (VCB);                                                                \
                if (half && nv == 3) PV##2h(pr, kn, vc, nc, sm->alpha + r0, orow, ldo);                       \
                else if (half) PV##1h(pr, kn, vc, nc, sm->alpha + r0, orow, ldo);                             \
                else if (nv == 3) PV##3(pr, kn, vc, nc, sm->alpha + r0, orow, ldo);                           \
                else if (nv == 2) PV##2(pr, kn, vc, nc, sm->alpha + r0, orow, ldo);                           \
                else PV##1(pr, kn, vc, nc, sm->alpha + r0, orow, ldo);                                        \
            }                                                                                                 \
            cb += nv;                                                                                         \
        }                                                                                                     \
    }                                                                                                         \
    STORE(o, ldo, sm, rows, d, out, ldout);                                                                   \
}

/* Entry points. Strides are in elements, three per tensor: batch, head, token (the head dim has stride
   1); scale > 0. Returns 0, or 1 if scratch memory could not be allocated (out is then incomplete). */
#define ENTRY(NAME, T, PT, QW, KSZ, VSZ, PACK_K, PACK_V, BLOCKFN)                                             \
int NAME(const T *q, const T *k, const T *v, T *out, int64_t nb, int64_t nh, int64_t tq, int64_t tk,          \
         int64_t d, const int64_t *sq, const int64_t *sk, const int64_t *sv, const int64_t *so,               \
         float scale, int threads) {                                                                          \
    const int64_t tkp = round_up(tk, NB), nc = (d + NB - 1) / NB, heads = nb * nh;                            \
    const int64_t ksz = (KSZ), vsz = (VSZ), blocks = (tq + QB - 1) / QB, qw = (QW);                           \
    T *packs = (T *)alloc64((size_t)(heads * (ksz + vsz)) * sizeof(T));                                       \
    if (!packs) return 1;                                                                                     \
    int failed = 0;                                                                                           \
    _Pragma("omp parallel num_threads(threads)")                                                              \
    {                                                                                                         \
        _Pragma("omp for schedule(static)")                                                                   \
        for (int64_t bh = 0; bh < heads; bh++) {                                                              \
            int64_t b = bh / nh, h = bh % nh;                                                                 \
            PACK_K(k + b * sk[0] + h * sk[1], sk[2], tk, d, packs + bh * (ksz + vsz));                        \
            PACK_V(v + b * sv[0] + h * sv[1], sv[2], tk, d, packs + bh * (ksz + vsz) + ksz);                  \
        }                                                                                                     \
        T *qs = (T *)alloc64((size_t)(QB * qw) * sizeof(T));                                                  \
        float *s = (float *)alloc64((size_t)(QB * KB) * sizeof(float));                                       \
        PT *p = (PT *)alloc64((size_t)(QB * KB) * sizeof(PT));                                                \
        float *o = (float *)alloc64((size_t)(QB * nc * NB) * sizeof(float));                                  \
        Softmax *sm = (Softmax *)alloc64(sizeof(Softmax));                                                    \
        if (!qs || !s || !p || !o || !sm) {                                                                   \
            _Pragma("omp atomic write")                                                                       \
            failed = 1;                                                                                       \
        }                                                                                                     \
        _Pragma("omp barrier")                                                                                \
        if (!failed) {                                                                                        \
            _Pragma("omp for schedule(static)")                                                               \
            for (int64_t task = 0; task < heads * blocks; task++) {                                           \
                int64_t bh = task / blocks, i0 = (task % blocks) * QB, b = bh / nh, h = bh % nh;              \
                const T *kp = packs + bh * (ksz + vsz);                                                       \
                BLOCKFN(q + b * sq[0] + h * sq[1] + i0 * sq[2], sq[2], (int)min64(tq - i0, QB), d, kp,        \
                        kp + ksz, tk, scale, out + b * so[0] + h * so[1] + i0 * so[2], so[2], qs, s, p, o, sm); \
            }                                                                                                 \
        }                                                                                                     \
        free(qs); free(s); free(p); free(o); free(sm);                                                        \
    }                                                                                                         \
    free(packs);                                                                                              \
    return failed;                                                                                            \
}

BLOCK(block_f32, float, float, d, d, d, nc * NB, NB, qk_f32_, pv_f32_, softmax_f32, store_rows_f32)
ENTRY(md_attention_f32, float, float, d, tkp * d, tkp * nc * NB, pack_k_f32, pack_v_f32, block_f32)
#ifdef __AVX512BF16__
BLOCK(block_bf16, bf16, bf16, 2 * ((d + 1) / 2), (d + 1) / 2, 2 * ((d + 1) / 2), nc * NB, 2 * NB, qk_bf16_,
      pv_bf16_, softmax_bf16, store_rows_bf16)
ENTRY(md_attention_bf16, bf16, bf16, 2 * ((d + 1) / 2), tkp * 2 * ((d + 1) / 2), tkp * nc * NB, pack_k_bf16,
      pack_v_bf16, block_bf16)
#endif

/* The version of the entry points of this file, group_norm.c and quantize.c (the loader checks it), and whether
   the bf16 ones (md_attention_bf16, md_group_norm_bf16, md_group_norm_u8_bf16, md_quantize_u8_bf16, md_minmax_bf16)
   exist. */
int md_attention_abi(void) { return 4; }
int md_attention_has_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

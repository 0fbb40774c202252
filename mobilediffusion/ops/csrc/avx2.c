/* fp32 kernels for x86 CPUs with AVX2 + FMA and no AVX-512 (an AMD Zen 2, say): linear layers and attention.

   Built on its own, with -mavx2 -mfma, by mobilediffusion/ops/cpu_kernel.py, where the AVX-512 kernels of
   attention.c cannot run. There torch's fp32 linear (MKL's sgemm, or oneDNN's inner product on a packed weight)
   ran SD1.5's shapes at 60-75% of the machine's fp32 peak (OpenVINO's MLAS at 92%), and torch's flash attention
   SD1.5's 4096-token heads at about half of it.

   Both run one register tile, 6 rows x 16 columns (12 ymm accumulators; per reduction step two loads of a packed
   row of 16, six broadcasts, twelve FMAs), on operands packed into panels of 16 columns, K rows of 16 floats:
   p[(j / 16) * K * 16 + k * 16 + j % 16] = w[j][k], zeros past N.

   md_linear_f32: y (M, N) = x (M, K) w^T + bias on a weight packed once (md_linear_pack_f32), over the whole K, so
   each output is written once, with the bias. Work: even blocks of at most 256 rows by chunks of panels, split over
   the threads; a thread runs one panel (in L1 up to K = 512) down all the tiles of its row block. On a Zen 2 (2
   threads, fp32 peak 200 GFLOP/s) this ran SD1.5's and MobileDiffusion's shapes at 178-205 GFLOP/s; blocking K as
   well (256 or 512 rows of a panel) and blocks of 96 or 192 rows measured slower.

   md_attention_f32: softmax(scale q k^T) v with attention.c's arguments and FlashAttention's tiling: per head, K
   packed as the panels of 16 keys (K = head dim) and V as panels of 16 head-dim columns (K = keys); per block of
   AQB queries and AKB keys, S = Q K^T by tiles, the online softmax (running maximum and sum per row, exp2 by a
   degree-5 polynomial), then O = alpha O + P V by tiles (alpha: the rescale of the rows' earlier sums). */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 6
#define NR 16
#ifndef MC
#define MC 256 /* rows per block at most */
#endif

static inline int64_t g_min(int64_t a, int64_t b) { return a < b ? a : b; }

static inline __m256i g_mask(int n) { /* the first n of 8 lanes */
    const int32_t idx[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_loadu_si256((const __m256i *)idx));
}

/* rows [0, mr) of x (row stride ldx) times one panel p (K x 16) into y (row stride ldy), its first nc columns:
   plus bias (16 floats, or NULL), or, where alpha is given, plus alpha[i] times what row i of y holds (all 16
   columns; the attention's output rows) */
static inline __attribute__((always_inline)) void g_tile(const int mr, const float *x, int64_t ldx, const float *p,
                                                         int64_t K, const float *bias, const float *alpha,
                                                         float *y, int64_t ldy, int nc) {
    __m256 c[MR][2];
    if (alpha) {
        for (int i = 0; i < mr; i++) {
            const __m256 a = _mm256_set1_ps(alpha[i]);
            c[i][0] = _mm256_mul_ps(a, _mm256_loadu_ps(y + i * ldy));
            c[i][1] = _mm256_mul_ps(a, _mm256_loadu_ps(y + i * ldy + 8));
        }
    } else {
        const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
        const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
        for (int i = 0; i < mr; i++) { c[i][0] = b0; c[i][1] = b1; }
    }
    const float *xr[MR];
    for (int i = 0; i < mr; i++) xr[i] = x + i * ldx;
    for (int64_t k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(p + k * NR), w1 = _mm256_loadu_ps(p + k * NR + 8);
        _mm_prefetch((const char *)(p + (k + 8) * NR), _MM_HINT_T0);
        for (int i = 0; i < mr; i++) {
            const __m256 a = _mm256_broadcast_ss(xr[i] + k);
            c[i][0] = _mm256_fmadd_ps(a, w0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(a, w1, c[i][1]);
        }
    }
    if (nc == NR) {
        for (int i = 0; i < mr; i++) {
            _mm256_storeu_ps(y + i * ldy, c[i][0]);
            _mm256_storeu_ps(y + i * ldy + 8, c[i][1]);
        }
    } else {
        const __m256i m0 = g_mask(nc), m1 = g_mask(nc - 8);
        for (int i = 0; i < mr; i++) {
            _mm256_maskstore_ps(y + i * ldy, m0, c[i][0]);
            _mm256_maskstore_ps(y + i * ldy + 8, m1, c[i][1]);
        }
    }
}

/* g_tile down `rows` rows: whole tiles, then one of the rows left (its height a constant, so unrolled) */
static void g_rows(int64_t rows, const float *x, int64_t ldx, const float *p, int64_t K, const float *bias,
                   const float *alpha, float *y, int64_t ldy, int nc) {
    int64_t i = 0;
#define G_TILE(H) g_tile(H, x + i * ldx, ldx, p, K, bias, alpha ? alpha + i : NULL, y + i * ldy, ldy, nc)
    for (; i + MR <= rows; i += MR) G_TILE(MR);
    switch (rows - i) {
    case 1: G_TILE(1); break;
    case 2: G_TILE(2); break;
    case 3: G_TILE(3); break;
    case 4: G_TILE(4); break;
    case 5: G_TILE(5); break;
    default: break;
    }
#undef G_TILE
}

/* w (N x K, row stride ldw) -> p (ceil(N / 16) panels of K x 16), zeros past N */
static void g_pack(const float *w, int64_t ldw, int64_t N, int64_t K, float *p) {
    const int64_t panels = (N + NR - 1) / NR;
    for (int64_t q = 0; q < panels; q++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < NR; j++) {
                const int64_t n = q * NR + j;
                p[(q * K + k) * NR + j] = n < N ? w[n * ldw + k] : 0.0f;
            }
}

/* a linear's weight w (N, K) row-major -> its panels */
int md_linear_pack_f32(const float *w, float *p, int64_t N, int64_t K) {
    g_pack(w, K, N, K, p);
    return 0;
}

/* y (M, N), row stride ldy = x (M, K), row stride ldx, times the packed weight, plus bias (N floats padded to a
   multiple of 16, or NULL) */
int md_linear_f32(const float *x, int64_t ldx, const float *p, const float *bias, float *y, int64_t ldy, int64_t M,
                  int64_t N, int64_t K, int threads) {
    if (threads < 1) threads = 1;
    if (M <= 0 || N <= 0) return 0;
    const int64_t panels = (N + NR - 1) / NR;
    const int64_t row_blocks = (M + MC - 1) / MC; /* blocks of at most MC rows, as even as whole tiles make them */
    const int64_t mc = ((M + row_blocks - 1) / row_blocks + MR - 1) / MR * MR;
    /* panels per chunk: enough tasks for every thread, at most 8 panels (128 columns) */
    int64_t pc = 8;
    while (pc > 1 && row_blocks * ((panels + pc - 1) / pc) < 4 * threads) pc /= 2;
    const int64_t chunks = (panels + pc - 1) / pc, tasks = row_blocks * chunks;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t rb = t / chunks, ch = t % chunks;
        const int64_t r0 = rb * mc, rows = g_min(mc, M - r0);
        for (int64_t q = ch * pc; q < g_min(panels, (ch + 1) * pc); q++) {
            const int nc = (int)g_min(NR, N - q * NR);
            g_rows(rows, x + r0 * ldx, ldx, p + q * K * NR, K, bias ? bias + q * NR : NULL, NULL,
                   y + r0 * ldy + q * NR, ldy, nc);
        }
    }
    return 0;
}


/* ------------------------------------------------------------------------------------------ attention */
#ifndef AQB
#define AQB 48  /* queries per block (a multiple of MR) */
#endif
#ifndef AKB
#define AKB 256 /* keys per block (a multiple of NR) */
#endif

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

static inline float hsum8(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
}

/* 2^t, t <= 0 here (below -126: 2^-126, nothing beside the row's 1): 2^n 2^f, n = round(t), 2^f by a degree-5
   polynomial on [-1/2, 1/2] (relative error 1.1e-7; attention.c's) */
static inline __m256 exp2_avx2(__m256 t) {
    t = _mm256_max_ps(t, _mm256_set1_ps(-126.0f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.3400432e-3f), f, _mm256_set1_ps(9.6760371e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5503272e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022107e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314721e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0000001f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* K (tk x d, row stride ldk) -> panels of 16 keys (tkp / 16 panels of d x 16, as a linear's weight); V (tk x d)
   -> panels of 16 head-dim columns (nc panels of tkp x 16); zeros past tk and d */
static void a_pack(const float *k, int64_t ldk, const float *v, int64_t ldv, int64_t tk, int64_t tkp, int64_t d,
                   int64_t nc, float *kp, float *vp) {
    g_pack(k, ldk, tk, d, kp);
    memset(vp, 0, (size_t)(nc * tkp * NR) * sizeof(float));
    for (int64_t j = 0; j < tk; j++)
        for (int64_t c = 0; c < d; c++) vp[((c / NR) * tkp + j) * NR + c % NR] = v[j * ldv + c];
}

/* the online-softmax step of one key block for rows [0, rows): s (row stride AKB) holds the raw scores of kn keys,
   the first `valid` real; turned into the numerators in place (padding zero), m, l and alpha updated */
static void a_softmax(float *s, int rows, int64_t valid, int64_t kn, float c, int first, float *m, float *l,
                      float *alpha) {
    for (int r = 0; r < rows; r++) {
        float *row = s + (int64_t)r * AKB;
        __m256 vmax = _mm256_set1_ps(-__builtin_inff());
        int64_t j = 0;
        for (; j + 8 <= valid; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(row + j));
        float bm = hmax8(vmax);
        for (; j < valid; j++) bm = row[j] > bm ? row[j] : bm;
        const float m_new = first || bm > m[r] ? bm : m[r];
        alpha[r] = first ? 0.0f : exp2_avx2(_mm256_set1_ps((m[r] - m_new) * c))[0];
        m[r] = m_new;
        const __m256 vc = _mm256_set1_ps(c), vm = _mm256_set1_ps(m_new * c);
        __m256 vsum = _mm256_setzero_ps();
        for (j = 0; j + 8 <= valid; j += 8) {
            const __m256 e = exp2_avx2(_mm256_fmsub_ps(_mm256_loadu_ps(row + j), vc, vm));
            _mm256_storeu_ps(row + j, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum8(vsum);
        for (; j < valid; j++) {
            row[j] = exp2_avx2(_mm256_set1_ps(row[j] * c - m_new * c))[0];
            sum += row[j];
        }
        for (; j < kn; j++) row[j] = 0.0f;
        l[r] = l[r] * alpha[r] + sum;
    }
}

/* Arguments as attention.c's md_attention_f32: strides in elements, three per tensor (batch, head, token), the
   head dim contiguous; scale > 0. Returns 0, or 1 if scratch memory could not be allocated. */
int md_attention_f32(const float *q, const float *k, const float *v, float *out, int64_t nb, int64_t nh, int64_t tq,
                     int64_t tk, int64_t d, const int64_t *sq, const int64_t *sk, const int64_t *sv,
                     const int64_t *so, float scale, int threads) {
    if (threads < 1) threads = 1;
    const int64_t tkp = (tk + NR - 1) / NR * NR, nc = (d + NR - 1) / NR, heads = nb * nh;
    const int64_t ksz = tkp * d, vsz = nc * tkp * NR, blocks = (tq + AQB - 1) / AQB, ldo = nc * NR;
    const float c = scale * 1.44269504088896341f; /* scores to base-2 exponents */
    float *packs = (float *)aligned_alloc(64, (size_t)((heads * (ksz + vsz) + 15) / 16 * 16) * sizeof(float));
    if (!packs) return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < heads; bh++) {
            const int64_t b = bh / nh, h = bh % nh;
            float *kp = packs + bh * (ksz + vsz);
            a_pack(k + b * sk[0] + h * sk[1], sk[2], v + b * sv[0] + h * sv[1], sv[2], tk, tkp, d, nc, kp, kp + ksz);
        }
        float *s = (float *)aligned_alloc(64, (size_t)(AQB * AKB) * sizeof(float));
        float *o = (float *)aligned_alloc(64, (size_t)(AQB * ldo) * sizeof(float));
        float m[AQB], l[AQB], alpha[AQB];
        if (!s || !o) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < heads * blocks; task++) {
                const int64_t bh = task / blocks, i0 = (task % blocks) * AQB, b = bh / nh, h = bh % nh;
                const int rows = (int)g_min(tq - i0, AQB);
                const float *qb = q + b * sq[0] + h * sq[1] + i0 * sq[2], *kp = packs + bh * (ksz + vsz);
                const float *vp = kp + ksz;
                memset(o, 0, (size_t)(AQB * ldo) * sizeof(float));
                for (int r = 0; r < rows; r++) l[r] = 0.0f;
                for (int64_t j0 = 0; j0 < tkp; j0 += AKB) {
                    const int64_t kn = g_min(tkp - j0, AKB), valid = g_min(tk - j0, kn);
                    for (int64_t jb = 0; jb < kn; jb += NR) /* S = Q K^T, one panel of 16 keys at a time */
                        g_rows(rows, qb, sq[2], kp + (j0 + jb) * d, d, NULL, NULL, s + jb, AKB, NR);
                    a_softmax(s, rows, valid, kn, c, j0 == 0, m, l, alpha);
                    for (int64_t cb = 0; cb < nc; cb++) /* O = alpha O + P V, one panel of 16 columns at a time */
                        g_rows(rows, s, AKB, vp + (cb * tkp + j0) * NR, kn, NULL, alpha, o + cb * NR, ldo, NR);
                }
                float *ob = out + b * so[0] + h * so[1] + i0 * so[2];
                for (int r = 0; r < rows; r++) {
                    const float w = 1.0f / l[r];
                    for (int64_t col = 0; col < d; col++) ob[r * so[2] + col] = o[r * ldo + col] * w;
                }
            }
        }
        free(s);
        free(o);
    }
    free(packs);
    return failed;
}

int md_avx2_abi(void) { return 1; }

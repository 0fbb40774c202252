/* fp32 linear layers for x86 CPUs with AVX2 + FMA (mobilediffusion/packed.py): y (M, N) = x (M, K) w^T + bias.

   Built on its own, with -mavx2 -mfma, by mobilediffusion/ops/cpu_kernel.py, for CPUs without AVX-512 (an AMD
   Zen 2, say), where torch's fp32 linear (MKL's sgemm, or oneDNN's inner product on a packed weight) ran SD1.5's
   shapes at 60-75% of the machine's fp32 peak and OpenVINO's at 92%.

   The weight is packed once (md_linear_pack_f32) into panels of NR = 16 output columns, each K rows of 16 floats:
   p[(j / 16) * K * 16 + k * 16 + j % 16] = w[j][k], zeros past N. The product runs 6 x 16 register tiles (12 ymm
   accumulators; per k: two loads of the panel's row, six broadcasts of x, twelve FMAs), over the whole K, so each
   output is written once, with the bias. Work: even blocks of at most 256 rows by chunks of panels, split over the
   threads; a thread runs one panel (in L1 up to K = 512) down all the tiles of its row block. On a Zen 2 (2
   threads, fp32 peak 200 GFLOP/s) this ran SD1.5's and MobileDiffusion's shapes at 178-205 GFLOP/s; blocking K as
   well (256 or 512 rows of a panel) and blocks of 96 or 192 rows measured slower. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

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

/* rows [0, mr) of x (row stride ldx) times one panel p (K x 16) plus bias (16 floats, or NULL) into y (row stride
   ldy), its first nc columns */
static inline __attribute__((always_inline)) void g_tile(const int mr, const float *x, int64_t ldx, const float *p,
                                                         int64_t K, const float *bias, float *y, int64_t ldy, int nc) {
    __m256 c[MR][2];
    __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    for (int i = 0; i < mr; i++) { c[i][0] = b0; c[i][1] = b1; }
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

static void g_rows(int64_t rows, const float *x, int64_t ldx, const float *p, int64_t K, const float *bias,
                   float *y, int64_t ldy, int nc) {
    int64_t i = 0;
    for (; i + MR <= rows; i += MR) g_tile(MR, x + i * ldx, ldx, p, K, bias, y + i * ldy, ldy, nc);
    switch (rows - i) { /* the last rows: a tile of that height (constant, so unrolled) */
    case 1: g_tile(1, x + i * ldx, ldx, p, K, bias, y + i * ldy, ldy, nc); break;
    case 2: g_tile(2, x + i * ldx, ldx, p, K, bias, y + i * ldy, ldy, nc); break;
    case 3: g_tile(3, x + i * ldx, ldx, p, K, bias, y + i * ldy, ldy, nc); break;
    case 4: g_tile(4, x + i * ldx, ldx, p, K, bias, y + i * ldy, ldy, nc); break;
    case 5: g_tile(5, x + i * ldx, ldx, p, K, bias, y + i * ldy, ldy, nc); break;
    default: break;
    }
}

/* w (N, K) row-major -> p (ceil(N / 16) panels of K x 16) */
int md_linear_pack_f32(const float *w, float *p, int64_t N, int64_t K) {
    const int64_t panels = (N + NR - 1) / NR;
    for (int64_t q = 0; q < panels; q++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < NR; j++) {
                const int64_t n = q * NR + j;
                p[(q * K + k) * NR + j] = n < N ? w[n * K + k] : 0.0f;
            }
    return 0;
}

/* y (M, N), row stride ldy = x (M, K), row stride ldx, times the packed weight, plus bias (N floats padded to a
   multiple of 16, or NULL) */
int md_linear_f32(const float *x, int64_t ldx, const float *p, const float *bias, float *y, int64_t ldy, int64_t M,
                  int64_t N, int64_t K, int threads) {
    if (threads < 1) threads = 1;
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
            g_rows(rows, x + r0 * ldx, ldx, p + q * K * NR, K, bias ? bias + q * NR : NULL, y + r0 * ldy + q * NR,
                   ldy, nc);
        }
    }
    return 0;
}

int md_linear_abi(void) { return 1; }

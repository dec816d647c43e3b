/* The int8 LM head: logits = (x as two int8 levels) . (int8 weight codes) * per-row scale.

   torch's int8 weight-only kernels (aten._weight_int8pack_mm, fbgemm's dynamic linear, _int_mm)
   take ~12 ms for Gemma 3's 262,144 x 640 head on a 2-core AVX-512 EPYC at one row, and they and
   the bf16 head grow with the rows (bf16 F.linear: 20 ms at 1 row, 42 at 30). This kernel
   multiplies with AVX512-VNNI (vpdpbusd, 64 multiply-adds per instruction) against the
   activations split in two int8 levels (x ~= s1*q1 + s2*q2, relative error <= 2**-16). The codes
   are stored in the order it reads them, tiles of 16 vocabulary rows x 4 columns (one int32 lane
   per vocabulary row), so a register accumulates 16 logits at once and is reused for up to 6
   activation rows: no horizontal sums; a tile comes from memory once, then from L1 for every
   further 6 rows. One row: memory-bound, ~4 ms; 30 rows ~26 ms (a layout with a horizontal sum
   per logit takes 46).

   Built by generation/kernels/build.py (-O3 -march=native -fopenmp); bound in int8_head.py. */

#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <immintrin.h>

#define NB 16       /* vocabulary rows per tile: one int32 lane each */
#define PF 4096     /* prefetch distance, bytes */

/* x (M, K) fp32 -> two signed int8 levels: x ~= s1 * q1 + s2 * q2, s2 = s1 / 254; qsum = their sums.
   The levels go straight into the kernel's read order xp (K/4, M, 2, 4): for each group of 4
   columns, every row's 4 level-1 bytes then its 4 level-2 bytes. */
static void split_rows(int64_t M, int64_t K, const float *x, int8_t *xp, float *xs, int32_t *qsum) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xr[k]));
        float s1 = amax > 0.f ? amax / 127.f : 1.f, s2 = s1 / 254.f;
        int32_t c1 = 0, c2 = 0;
        for (int64_t k = 0; k < K; k++) {
            float a = fminf(fmaxf(nearbyintf(xr[k] / s1), -127.f), 127.f);
            float b = fminf(fmaxf(nearbyintf((xr[k] - a * s1) / s2), -127.f), 127.f);
            int8_t *q = xp + ((k / 4) * M + m) * 8 + k % 4;
            q[0] = (int8_t)a;
            q[4] = (int8_t)b;
            c1 += (int32_t)a;
            c2 += (int32_t)b;
        }
        xs[2 * m] = s1;
        xs[2 * m + 1] = s2;
        qsum[2 * m] = c1;
        qsum[2 * m + 1] = c2;
    }
}

/* One tile of 16 vocabulary rows (K/4 groups of 16 x 4 codes) against R activation rows from m0
   (R <= 6: 12 accumulators stay in registers). xp: the activations packed as (K/4, M, 2, 4) bytes. */
#define TILE_ROWS_FN(R) \
static void tile_rows_##R(int64_t K, int64_t M, int64_t N, int64_t n, int64_t m0, const int8_t *tile, \
                          const int8_t *xp, const float *xs, const int32_t *qsum, const float *wscale, float *out, \
                          __mmask16 valid) { \
    const __m512i flip = _mm512_set1_epi8((char)0x80); \
    __m512i a10 = _mm512_setzero_si512(), a20 = a10, a11 = a10, a21 = a10, a12 = a10, a22 = a10, \
            a13 = a10, a23 = a10, a14 = a10, a24 = a10, a15 = a10, a25 = a10; \
    const int8_t *p = xp + m0 * 8; \
    for (int64_t g = 0; g < K / 4; g++, p += M * 8) { \
        _mm_prefetch((const char *)(tile + 64 * g + PF), _MM_HINT_T0); \
        __m512i wv = _mm512_xor_si512(_mm512_loadu_si512((const void *)(tile + 64 * g)), flip); \
        FOR_ROWS(STEP, R) \
    } \
    __m512 ws = _mm512_maskz_loadu_ps(valid, wscale + n); \
    FOR_ROWS(FINISH, R) \
}
/* OP(row, its level-1 accumulator, its level-2 accumulator) for the first R rows */
#define FOR_ROWS(OP, R) \
    OP(0, a10, a20) if (R > 1) OP(1, a11, a21) if (R > 2) OP(2, a12, a22) \
    if (R > 3) OP(3, a13, a23) if (R > 4) OP(4, a14, a24) if (R > 5) OP(5, a15, a25)
#define STEP(r, x1, x2) { \
    x1 = _mm512_dpbusd_epi32(x1, wv, _mm512_set1_epi32(*(const int32_t *)(p + 8 * r))); \
    x2 = _mm512_dpbusd_epi32(x2, wv, _mm512_set1_epi32(*(const int32_t *)(p + 8 * r + 4))); }
/* vpdpbusd multiplies unsigned by signed bytes: the codes go in as w + 128 (the sign bit
   flipped), so sum (w + 128) q = sum w q + 128 sum q; the correction is exact in int32 (K <=
   16384: |sum (w + 128) q| <= K * 255 * 127 < 2**31), and for K <= 1024 |sum w q| <= K * 127 * 127
   < 2**24 makes the float conversion exact too (above, it rounds once: relative 2**-24, which
   QuantizedHead.error_bound counts). Only the `valid` lanes are written (the last tile of a
   vocabulary that is not a multiple of 16). */
#define FINISH(r, x1, x2) { \
    int64_t m = m0 + r; \
    __m512 v1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(x1, _mm512_set1_epi32(128 * qsum[2 * m]))); \
    __m512 v2 = _mm512_cvtepi32_ps(_mm512_sub_epi32(x2, _mm512_set1_epi32(128 * qsum[2 * m + 1]))); \
    __m512 s = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(xs[2 * m]), v1), \
                             _mm512_mul_ps(_mm512_set1_ps(xs[2 * m + 1]), v2)); \
    _mm512_mask_storeu_ps(out + m * N + n, valid, _mm512_mul_ps(ws, s)); }
TILE_ROWS_FN(1)
TILE_ROWS_FN(2)
TILE_ROWS_FN(3)
TILE_ROWS_FN(4)
TILE_ROWS_FN(5)
TILE_ROWS_FN(6)

/* out[m*N + n] = wscale[n] * sum_k xhat[m, k] * w[n, k]
   w: int8 tiles (ceil(N/16), K/4, 16, 4), the rows past N zero; K % 4 == 0, K <= 16384 (so that
   the int32 sums above cannot overflow). */
int int8_head(int64_t M, int64_t N, int64_t K, const float *x, const int8_t *w, const float *wscale,
               float *out, int nthreads) {
    size_t qbytes = ((size_t)(M * 2 * K) + 127) / 64 * 64;
    int8_t *xp = (int8_t *)aligned_alloc(64, qbytes);
    float *xs = (float *)malloc(sizeof(float) * 2 * M);
    int32_t *qsum = (int32_t *)malloc(sizeof(int32_t) * 2 * M);
    if (!xp || !xs || !qsum) { free(xp); free(xs); free(qsum); return -1; }
    split_rows(M, K, x, xp, xs, qsum);
    int64_t ntiles = (N + NB - 1) / NB;
    /* ~10 MB of codes a chunk (long streams for the prefetchers), the chunks shared out evenly */
    int64_t target = (10 << 20) / (NB * K), threads = nthreads > 0 ? nthreads : 1;
    if (target < 1) target = 1;
    int64_t rounds = (ntiles + threads * target - 1) / (threads * target);
    int chunk = (int)((ntiles + threads * rounds - 1) / (threads * rounds));
    #pragma omp parallel for schedule(static, chunk) num_threads(nthreads)
    for (int64_t t = 0; t < ntiles; t++) {
        const int8_t *tile = w + t * NB * K;
        int64_t n = t * NB;
        __mmask16 v = N - n >= NB ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1u);
        int64_t m0 = 0;
        for (; m0 + 6 <= M; m0 += 6) tile_rows_6(K, M, N, n, m0, tile, xp, xs, qsum, wscale, out, v);
        switch (M - m0) {
            case 5: tile_rows_5(K, M, N, n, m0, tile, xp, xs, qsum, wscale, out, v); break;
            case 4: tile_rows_4(K, M, N, n, m0, tile, xp, xs, qsum, wscale, out, v); break;
            case 3: tile_rows_3(K, M, N, n, m0, tile, xp, xs, qsum, wscale, out, v); break;
            case 2: tile_rows_2(K, M, N, n, m0, tile, xp, xs, qsum, wscale, out, v); break;
            case 1: tile_rows_1(K, M, N, n, m0, tile, xp, xs, qsum, wscale, out, v); break;
            default: break;
        }
    }
    free(xp);
    free(xs);
    free(qsum);
    return 0;
}

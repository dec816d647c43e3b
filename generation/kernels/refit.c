/* The matrices of the block-scale refit (generation/rounding/nf4grid.py, refit_scales).

   For one output row with code values c (n,) in blocks of `blk` and the input Hessian H (n, n),
   the least-squares block scales solve A s = b with
       A[g][h] = sum_i c[g*blk + i] * sum_j H[g*blk + i][h*blk + j] * c[h*blk + j],
   a (G, G) matrix per row, G = n / blk. torch forms it as an einsum whose (rows, G, G, blk)
   intermediate is larger than the caches; here each tile of TILE rows keeps its codes, transposed
   so that one vector holds the tile's rows, and sums straight into A, only for h >= g (A is
   symmetric: the lower half is the upper half's copy).

   The sums run in a fixed order: over j first, then over i, each in increasing order. With
   fused multiply-adds where the CPU has them they may differ from torch's last bits; refit.py
   checks the difference against the rounding-error bound of such sums before it uses this. */

#include <stdint.h>
#include <stdlib.h>

#define TILE 16 /* rows per tile: one vector of 16 floats (one AVX-512 register, two AVX2 ones) */
#define WAYS 8  /* rows of H summed side by side: independent chains for the FMA units */

typedef float vec __attribute__((vector_size(TILE * sizeof(float)))); /* GCC/Clang vector extension */

int block_gram(int64_t rows, int64_t n, int64_t blk, const float *c, const float *h, float *a) {
    if (blk % WAYS != 0 || n % blk != 0) return 1;
    const int64_t g = n / blk;
    const int64_t tiles = (rows + TILE - 1) / TILE;
    int failed = 0;
#pragma omp parallel
    {
        float *ct = aligned_alloc(sizeof(vec), (size_t)n * sizeof(vec)); /* ct[k * TILE + lane] = c[row lane][k] */
        if (ct == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < tiles; t++) {
            if (ct == NULL) continue;
            const int64_t r0 = t * TILE;
            const int64_t nr = rows - r0 < TILE ? rows - r0 : TILE;
            for (int64_t k = 0; k < n; k++) {
                for (int64_t l = 0; l < TILE; l++) ct[k * TILE + l] = l < nr ? c[(r0 + l) * n + k] : 0.0f;
            }
            const vec *cv = (const vec *)ct;
            for (int64_t hb = 0; hb < g; hb++) {
                const vec *cth = cv + hb * blk;
                for (int64_t gb = 0; gb <= hb; gb++) {
                    vec s = {0};
                    for (int64_t i0 = 0; i0 < blk; i0 += WAYS) {
                        vec v[WAYS] = {{0}};
                        const float *hr = h + (gb * blk + i0) * n + hb * blk; /* H[gb*blk + i0][hb*blk] */
                        for (int64_t j = 0; j < blk; j++) {
                            const vec cj = cth[j];
                            for (int w = 0; w < WAYS; w++) v[w] += hr[w * n + j] * cj;
                        }
                        for (int w = 0; w < WAYS; w++) s += cv[gb * blk + i0 + w] * v[w];
                    }
                    for (int64_t l = 0; l < nr; l++) {
                        a[((r0 + l) * g + gb) * g + hb] = s[l];
                        a[((r0 + l) * g + hb) * g + gb] = s[l];
                    }
                }
            }
        }
        free(ct);
    }
    return failed ? 2 : 0;
}

/* One lazy batch of GPTQ on the NF4 grid (generation/rounding/nf4grid.py, gptq_nf4).

   The weight's columns are stored as rows: wb (bn, out) holds the batch's bn columns, each a row
   of `out` values, one per output row of the weight. For each column j in turn, every value is
   divided by its block scale, clamped to [-1, 1], rounded to the nearest NF4 code (the index is
   the number of midpoints below it, as torch.bucketize), and its rounding error, divided by the
   Cholesky factor's diagonal, is taken off the batch's later columns in proportion to the factor's
   row. Output rows are independent problems, so the threads split them.

   The operations and their order are torch's in gptq_nf4's Python loop (a division, a clamp, a
   count, a product, a difference and a division per value; then w - u * e, the product rounded
   before the difference): compiled with -ffp-contract=off, the indices are torch's bit for bit.
   gptq.py checks that on random problems before it uses this, and falls back to torch where not. */

#include <stdint.h>

void gptq_nf4_batch(int64_t bn, int64_t out, float *wb, const float *scale, const float *ub, int64_t ld_u,
                    const float *code, const float *mid, int64_t *index, float *err) {
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < out; c0 += 64) {
        const int64_t c1 = c0 + 64 < out ? c0 + 64 : out;
        for (int64_t j = 0; j < bn; j++) {
            float *col = wb + j * out;
            const float *s = scale + j * out;
            const float d = ub[j * ld_u + j];
            float *e = err + j * out;
            int64_t *idx = index + j * out;
            for (int64_t i = c0; i < c1; i++) {
                float x = col[i] / s[i];
                x = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
                int64_t k = 0;
                while (k < 15 && mid[k] < x) k++;
                idx[i] = k;
                const float q = code[k] * s[i];
                e[i] = (col[i] - q) / d;
            }
            for (int64_t r = j + 1; r < bn; r++) {
                const float u = ub[j * ld_u + r];
                float *row = wb + r * out;
                for (int64_t i = c0; i < c1; i++) row[i] = row[i] - u * e[i];
            }
        }
    }
}

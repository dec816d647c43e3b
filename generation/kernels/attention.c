/* One decode step's attention for every row of the chat engine's batch, in one call.
 *
 * Row b's query heads that share key/value head g (G of them, as grouped-query attention packs
 * them) attend over the row's keys [first[b], end[b]) of head g:
 *
 *   s_ij = scale * (q_i . k_j)        fp32 sums of the bf16 inputs' exact products
 *   p_ij = exp(s_ij - max_j s_ij)     fp32
 *   o_i  = bf16(sum_j p_ij v_j / sum_j p_ij)
 *
 * One task per (row, key/value head), spread over the threads: a torch sdpa call per row costs
 * more to set up than a short row's arithmetic, and runs each row on one thread. The bf16
 * inputs widen exactly to fp32, and nothing rounds to bf16 before the output, so the result is the
 * exact attention within fp32 rounding (bounded in attention.py's check) and one bf16 rounding.
 *
 * Tensors: q (n, KV * G, hd) with row stride q_row; keys/values with strides (row, head,
 * position) and contiguous head_dim; out (n, KV * G, hd) contiguous. Returns 0, or -1 where a
 * task's scratch memory could not be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v = { (uint32_t)x << 16 };
    return v.f;
}

/* Round to nearest, ties to even: torch's float -> bfloat16 conversion (NaN kept a quiet NaN). */
static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

static int one_task(int64_t G, int64_t hd, const uint16_t *q, const uint16_t *k, const uint16_t *v,
                    int64_t k_pos, int64_t v_pos, int64_t len, float scale, uint16_t *out) {
    float *qf = malloc(sizeof(float) * (size_t)(G * hd * 2 + G * len));
    if (qf == NULL) return -1;
    float *acc = qf + G * hd;       /* (G, hd) */
    float *s = acc + G * hd;        /* (G, len) */
    for (int64_t i = 0; i < G * hd; i++) qf[i] = bf16_to_f32(q[i]);
    memset(acc, 0, sizeof(float) * (size_t)(G * hd));
    for (int64_t j = 0; j < len; j++) {
        const uint16_t *kj = k + j * k_pos;
        for (int64_t i = 0; i < G; i++) {
            const float *qi = qf + i * hd;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < hd; d++) dot += qi[d] * bf16_to_f32(kj[d]);
            s[i * len + j] = dot * scale;
        }
    }
    for (int64_t i = 0; i < G; i++) {
        float *si = s + i * len;
        float m = -INFINITY;
        for (int64_t j = 0; j < len; j++) m = si[j] > m ? si[j] : m;
        float sum = 0.0f;
        for (int64_t j = 0; j < len; j++) {
            si[j] = expf(si[j] - m);
            sum += si[j];
        }
        float *ai = acc + i * hd;
        for (int64_t j = 0; j < len; j++) {
            const uint16_t *vj = v + j * v_pos;
            const float p = si[j];
#pragma omp simd
            for (int64_t d = 0; d < hd; d++) ai[d] += p * bf16_to_f32(vj[d]);
        }
        for (int64_t d = 0; d < hd; d++) out[i * hd + d] = f32_to_bf16(ai[d] / sum);
    }
    free(qf);
    return 0;
}

int attention_rows(int64_t n, int64_t kv, int64_t G, int64_t hd, const uint16_t *q, int64_t q_row,
                   const uint16_t *keys, int64_t k_row, int64_t k_head, int64_t k_pos,
                   const uint16_t *values, int64_t v_row, int64_t v_head, int64_t v_pos,
                   const int64_t *first, const int64_t *end, float scale, uint16_t *out, int nthreads) {
    int failed = 0;
    const int64_t tasks = n * kv;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (tasks > 1 && nthreads > 1) \
    reduction(| : failed)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t b = t / kv, g = t % kv;
        const int64_t lo = first[b];
        failed |= one_task(G, hd, q + b * q_row + g * G * hd, keys + b * k_row + g * k_head + lo * k_pos,
                           values + b * v_row + g * v_head + lo * v_pos, k_pos, v_pos, end[b] - lo, scale,
                           out + (b * kv + g) * G * hd);
    }
    return failed ? -1 : 0;
}

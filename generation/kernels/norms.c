/* The decode step's small per-layer maths (RMSNorms, residual adds, q/k norms and RoPE), giving
   torch's own bits, in the two forms transformers writes its RMSNorms:
   form 0 (Gemma 3): y = bf16((x * r) * w) with w = 1 + weight in fp32 (one rounding);
   form 1 (Llama, Qwen2/3, Mistral): y = bf16(bf16(x * r) * w), w the bf16 weight (rounded to bf16
   before the weight, as `weight * x.to(bf16)` does).

   Every step is one IEEE operation in torch's order: the sum of squares as ATen's vectorized
   inner sum adds them (8 lanes, 4 accumulators, its cascade of levels, then the lanes in
   order), mean = sum / d, 1 / sqrt(mean + eps), then (x * r) * w, and every bf16 result
   rounded to nearest even as c10::BFloat16 does. That order is ATen's implementation, not its
   contract: norms.py checks these kernels against torch before they are used. Compiled with
   -ffp-contract=off: a fused multiply-add would round once where torch rounds twice.

   Built by generation/kernels/build.py; bound in norms.py. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define LANES 8
#define ILP 4
#define LEVELS 4

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t b = 0; uint64_t v = (uint64_t)(x - 1);
    while (v) { b++; v >>= 1; }
    return b;
}

/* ATen's float sum of a contiguous row: vectors of LANES, ILP rows of a cascade (multi_row_sum). */
static float row_sum(const float *x, int64_t d) {
    const int64_t nvec = d / LANES, size = nvec / ILP;
    int64_t power = ceil_log2(size) / LEVELS;
    if (power < 4) power = 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    float acc[LEVELS][ILP][LANES];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < LANES; l++) acc[0][k][l] += x[(i * ILP + k) * LANES + l];
        for (int j = 1; j < LEVELS; j++) {
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < LANES; l++) { acc[j][k][l] += acc[j - 1][k][l]; acc[j - 1][k][l] = 0.f; }
            if ((i & (mask << (j * power))) != 0) break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < LANES; l++) acc[0][k][l] += x[(i * ILP + k) * LANES + l];
    for (int j = 1; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < LANES; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t v = size * ILP; v < nvec; v++)
        for (int l = 0; l < LANES; l++) acc[0][0][l] += x[v * LANES + l];
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < LANES; l++) acc[0][0][l] += acc[0][k][l];
    float f = 0.f;
    for (int64_t t = nvec * LANES; t < d; t++) f += x[t];
    for (int l = 0; l < LANES; l++) f += acc[0][0][l];
    return f;
}

/* r = 1 / sqrt(mean(xf^2) + eps); form 0: y = (xf * r) * w in fp32, F.rms_norm(x.float(), (d,), w,
   eps); form 1: y = bf16(xf * r) * w (exact in fp32: two bf16 values); w NULL: no weight, y = xf * r.
   sq: d floats of scratch */
static void rms_f32(const float *xf, int64_t d, const float *w, float eps, float *y, float *sq, int form) {
    for (int64_t j = 0; j < d; j++) sq[j] = xf[j] * xf[j];
    const float mean = row_sum(sq, d) / (float)d;
    const float r = 1.0f / sqrtf(mean + eps);
    if (!w) for (int64_t j = 0; j < d; j++) y[j] = xf[j] * r;
    else if (form == 0) for (int64_t j = 0; j < d; j++) y[j] = (xf[j] * r) * w[j];
    else for (int64_t j = 0; j < d; j++) y[j] = bf2f(f2bf(xf[j] * r)) * w[j];
}

/* out[b] = bf16(rms(x[b]) * w) for n rows of d (row strides in elements) */
int rms_rows(int64_t n, int64_t d, const uint16_t *x, int64_t xs, const float *w, float eps,
              uint16_t *out, int64_t os, int form) {
    float *xf = malloc(3 * d * sizeof(float)), *y = xf + d, *sq = y + d;  /* heap: any thread's stack */
    if (!xf) return -1;
    for (int64_t b = 0; b < n; b++) {
        for (int64_t j = 0; j < d; j++) xf[j] = bf2f(x[b * xs + j]);
        rms_f32(xf, d, w, eps, y, sq, form);
        for (int64_t j = 0; j < d; j++) out[b * os + j] = f2bf(y[j]);
    }
    free(xf);
    return 0;
}

/* x[b] = bf16(x[b] + bf16(rms(o[b]) * w1)) (w1 NULL: x[b] = bf16(x[b] + o[b]), a residual add
   without a post-norm); h[b] = bf16(rms(x[b]) * w2); x, h: (n, d) contiguous */
int add_rms_rows(int64_t n, int64_t d, uint16_t *x, const uint16_t *o, int64_t ostride, const float *w1,
                  const float *w2, float eps, uint16_t *h, int form) {
    float *xf = malloc(3 * d * sizeof(float)), *y = xf + d, *sq = y + d;
    if (!xf) return -1;
    for (int64_t b = 0; b < n; b++) {
        for (int64_t j = 0; j < d; j++) xf[j] = bf2f(o[b * ostride + j]);
        if (w1) rms_f32(xf, d, w1, eps, y, sq, form);
        else memcpy(y, xf, d * sizeof(float));  /* bf16 values: f2bf below gives them back */
        for (int64_t j = 0; j < d; j++) {
            const uint16_t v = f2bf(bf2f(x[b * d + j]) + bf2f(f2bf(y[j])));
            x[b * d + j] = v;
            xf[j] = bf2f(v);
        }
        rms_f32(xf, d, w2, eps, y, sq, form);
        for (int64_t j = 0; j < d; j++) h[b * d + j] = f2bf(y[j]);
    }
    free(xf);
    return 0;
}

/* In place, row b's `heads` heads of hd at qk + b * qs: y = bf16(rms(head) * w[head]) in the given
   form (form 0: no weight inside the norm, w after it, as transformers' Gemma3RMSNorm over q/k;
   w NULL: no q/k norm, y = the head itself), then RoPE at position pos[b]:
   bf16(bf16(y * cos) + bf16(roll(y, hd / 2) * sin_signed)), cos/sin rows of (len, hd). */
int qk_norm_rope(int64_t n, int64_t heads, int64_t hd, uint16_t *qk, int64_t qs, const float *w, float eps,
                  const uint16_t *cos, const uint16_t *sin, const int64_t *pos, int form) {
    float *xf = malloc(3 * hd * sizeof(float)), *y = xf + hd, *sq = y + hd;
    if (!xf) return -1;
    const int64_t half = hd / 2;
    for (int64_t b = 0; b < n; b++) {
        const uint16_t *c = cos + pos[b] * hd, *s = sin + pos[b] * hd;
        for (int64_t hh = 0; hh < heads; hh++) {
            uint16_t *p = qk + b * qs + hh * hd;
            const float *wh = w ? w + hh * hd : NULL;
            for (int64_t j = 0; j < hd; j++) xf[j] = bf2f(p[j]);
            if (w) {
                rms_f32(xf, hd, wh, eps, y, sq, form);
                for (int64_t j = 0; j < hd; j++) xf[j] = bf2f(f2bf(y[j]));
            }
            for (int64_t j = 0; j < hd; j++) {
                const float a = bf2f(f2bf(xf[j] * bf2f(c[j])));
                const float r = bf2f(f2bf(xf[(j + half) % hd] * bf2f(s[j])));
                p[j] = f2bf(a + r);
            }
        }
    }
    free(xf);
    return 0;
}

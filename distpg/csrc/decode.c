/* CPU kernels for distpg's decode step (see distpg/kernels.py, which compiles and loads this file).
 *
 * PyTorch runs the one-query decode attention as several elementwise passes with temporaries the size of the
 * cache, and its CPU tanh is scalar; these are single passes the compiler vectorises (no intrinsics, so any
 * C99 compiler builds them; -march=native picks the vector width). Each function has a float32 and a
 * bfloat16 version; bfloat16 values are widened to float32 for every sum, as PyTorch does.
 *
 * decode_attention: softmax(q . k_s / sqrt(D)) . v_s over the S cached positions, for each row b and head h.
 *   q (B, H, D) with element strides qb (row), qh (head) and D contiguous; k, v: element strides ss
 *   (position), sb (row), sh (head), D contiguous. The cache is batch-major (ss = D): each (row, head) pair's
 *   keys, then its values, are one contiguous stream, read once; for D = 16, 32, 64 or 128 a group of pairs'
 *   queries, then output sums, stay in vector registers meanwhile (any other layout or D is also correct);
 *   mask: NULL or bytes with row stride msb, 0 = a padding slot never attended to; out (B, H, D) contiguous;
 *   scratch: 16 S + 2 D floats (a group's scores, or one pair's scores, query and sums);
 *   knew: 0, or the new token's key and value are first copied into position S - 1 from q + knew and
 *   q + 2 knew (element offsets from each row's and head's query: a fused qkv row has knew = H D).
 * gelu_tanh: GPT-2's tanh GELU, in place, written as x * sigmoid(2u) = x * (1 + tanh u) / 2.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline float from_bf16(bf16 x) {
    const uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 to_bf16(float f) { /* round to nearest even, as PyTorch's conversion (no NaN inputs here) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float from_f32(float x) { return x; }
static inline float to_f32(float x) { return x; }

/* exp for float32, vectorisable (Cephes' expf polynomial, within 2 ulp over the clamped range) */
static inline float vexp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Vectors of 16 floats in the compiler's vector extension (GCC and Clang), which lowers them to the widest
   registers the target has (one AVX-512 register, two AVX2 ones, four NEON ones). The attention's dot
   products and weighted sums run on whole vectors over D's multiples of 16, on single values for the rest. */
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

static inline vf load_f32(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; }
static inline vf load_bf16(const bf16 *p) {
    vh h;
    memcpy(&h, p, sizeof h);
#if defined(__clang__) || __GNUC__ >= 9
    vu u = __builtin_convertvector(h, vu) << 16;
#else /* older GCC: the same widening, element by element */
    vu u;
    for (int i = 0; i < 16; i++) u[i] = (uint32_t)h[i] << 16;
#endif
    vf x;
    memcpy(&x, &u, sizeof x);
    return x;
}
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

static inline float hsum(vf x) { /* halving tree: three vector additions, then four values */
    vf8 a, b;
    memcpy(&a, &x, sizeof a);
    memcpy(&b, (const char *)&x + sizeof a, sizeof b);
    a += b;
    vf4 c, d;
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (const char *)&a + sizeof c, sizeof d);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* softmax over positions in place, the slots where mask is 0 excluded (mask NULL: none) */
static inline void softmax_row(float *sc, int64_t S, const uint8_t *m) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        if (m && !m[s]) sc[s] = -INFINITY;
        mx = sc[s] > mx ? sc[s] : mx;
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s < S; s++) {
        float e = sc[s] == -INFINITY ? 0.0f : vexp(sc[s] - mx);
        sc[s] = e;
        total += e;
    }
    const float inv = 1.0f / total;
    /* probabilities under 1e-30 become 0: they change no sum in float32, and their products with the values
       would be denormal numbers, which cost x86 CPUs a microcode assist each (peaked attention, where scores
       span more than ~70 nats, ran 2x slower) */
#pragma omp simd
    for (int64_t s = 0; s < S; s++) sc[s] = sc[s] * inv < 1e-30f ? 0.0f : sc[s] * inv;
}

/* The (row, head) pairs' vectors held in registers at a time: 16 of 16 floats where the target has 32 vector
   registers of 16 floats (AVX-512), 4 elsewhere (AVX2 and NEON split each into 2 or 4 registers). */
#if defined(__AVX512F__)
#define GROUP_VECS 16
#else
#define GROUP_VECS 4
#endif

#define DECODE_ATTENTION(NAME, T, LOAD, VLOAD, STORE)                                                                \
    /* D = 16, 32, 64, 128: G = max(1, GROUP_VECS / (D / 16)) pairs at a time, their scaled queries, then their      \
       output sums, in registers while their keys, then their values, stream in position by position. Pairs past     \
       the end of the last group repeat its first pair. The same operations in the same order as the generic         \
       path below, so the same results. */                                                                           \
    static inline __attribute__((always_inline)) void NAME##_grouped(                                                \
        const T *q, int64_t qb, int64_t qh, const T *k, const T *v, T *out, int64_t B, int64_t H,                    \
        const int64_t D, int64_t S,                                                                                  \
        int64_t ss, int64_t sb, int64_t sh, const uint8_t *mask, int64_t msb, float scale, float *scores) {          \
        const int64_t BH = B * H, DC = D / 16, G = DC < GROUP_VECS ? GROUP_VECS / DC : 1;                            \
        for (int64_t i0 = 0; i0 < BH; i0 += G) {                                                                     \
            const int64_t n = BH - i0 < G ? BH - i0 : G;                                                             \
            int64_t off[GROUP_VECS], pair[GROUP_VECS];                                                               \
            vf acc[GROUP_VECS < 8 ? 8 : GROUP_VECS];                                                                 \
            for (int64_t j = 0; j < G; j++) {                                                                        \
                pair[j] = i0 + (j < n ? j : 0);                                                                      \
                const int64_t b = pair[j] / H, h = pair[j] % H;                                                      \
                off[j] = b * sb + h * sh;                                                                            \
                for (int64_t c = 0; c < DC; c++) {                                                                   \
                    vf x;                                                                                            \
                    for (int e = 0; e < 16; e++) x[e] = LOAD(q[b * qb + h * qh + 16 * c + e]) * scale;               \
                    acc[j * DC + c] = x; /* the scaled queries, for the scores */                                    \
                }                                                                                                    \
            }                                                                                                        \
            for (int64_t s = 0; s < S; s++)                                                                          \
                for (int64_t j = 0; j < G; j++) {                                                                    \
                    const T *kk = k + s * ss + off[j];                                                               \
                    vf dv = {0};                                                                                     \
                    for (int64_t c = 0; c < DC; c++) dv += acc[j * DC + c] * VLOAD(kk + 16 * c);                     \
                    scores[j * S + s] = hsum(dv);                                                                    \
                }                                                                                                    \
            for (int64_t j = 0; j < G; j++)                                                                          \
                softmax_row(scores + j * S, S, mask ? mask + (pair[j] / H) * msb : NULL);                            \
            for (int64_t i = 0; i < G * DC; i++) acc[i] = (vf){0};                                                   \
            for (int64_t s = 0; s < S; s++)                                                                          \
                for (int64_t j = 0; j < G; j++) {                                                                    \
                    const T *vv = v + s * ss + off[j];                                                               \
                    const float p = scores[j * S + s];                                                               \
                    for (int64_t c = 0; c < DC; c++) acc[j * DC + c] = acc[j * DC + c] + p * VLOAD(vv + 16 * c);     \
                }                                                                                                    \
            for (int64_t j = 0; j < n; j++)                                                                          \
                for (int64_t c = 0; c < DC; c++)                                                                     \
                    for (int e = 0; e < 16; e++) out[(i0 + j) * D + 16 * c + e] = STORE(acc[j * DC + c][e]);         \
        }                                                                                                            \
    }                                                                                                                \
    static inline __attribute__((always_inline)) void NAME##_body(                                                   \
        const T *q, int64_t qb, int64_t qh, T *k, T *v, T *out, int64_t B, int64_t H,                                \
        const int64_t D, int64_t S,                                                                                  \
        int64_t ss, int64_t sb, int64_t sh, const uint8_t *mask, int64_t msb, float scale, float *scratch,           \
        int64_t knew) {                                                                                              \
        const int64_t BH = B * H, DV = D - D % 16; /* DV: the part of D done in vectors */                           \
        if (knew) /* the new position's key and value, into the caches */                                            \
            for (int64_t b = 0; b < B; b++)                                                                          \
                for (int64_t h = 0; h < H; h++) {                                                                    \
                    const T *src = q + b * qb + h * qh;                                                              \
                    memcpy(k + (S - 1) * ss + b * sb + h * sh, src + knew, sizeof(T) * D);                           \
                    memcpy(v + (S - 1) * ss + b * sb + h * sh, src + 2 * knew, sizeof(T) * D);                       \
                }                                                                                                    \
        if (D % 16 == 0 && D <= 128) { /* a constant in each case of the switch below */                             \
            NAME##_grouped(q, qb, qh, k, v, out, B, H, D, S, ss, sb, sh, mask, msb, scale, scratch);                 \
            return;                                                                                                  \
        }                                                                                                            \
        /* any other D: one (row, head) pair at a time, its keys, then its values, read position by position */      \
        float *scores = scratch;       /* (S) */                                                                     \
        float *qq = scratch + S;       /* (D): q as float32 times the scale, once */                                 \
        float *acc = scratch + S + D;  /* (D) */                                                                     \
        for (int64_t i = 0; i < BH; i++) {                                                                           \
            const int64_t b = i / H, h = i % H;                                                                      \
            for (int64_t d = 0; d < D; d++) qq[d] = LOAD(q[b * qb + h * qh + d]) * scale;                            \
            for (int64_t s = 0; s < S; s++) {                                                                        \
                const T *kk = k + s * ss + b * sb + h * sh;                                                          \
                vf dv = {0};                                                                                         \
                for (int64_t d = 0; d < DV; d += 16) dv += load_f32(qq + d) * VLOAD(kk + d);                         \
                float dot = hsum(dv);                                                                                \
                for (int64_t d = DV; d < D; d++) dot += qq[d] * LOAD(kk[d]);                                         \
                scores[s] = dot;                                                                                     \
            }                                                                                                        \
            softmax_row(scores, S, mask ? mask + b * msb : NULL);                                                    \
            memset(acc, 0, sizeof(float) * D);                                                                       \
            for (int64_t s = 0; s < S; s++) {                                                                        \
                const T *vv = v + s * ss + b * sb + h * sh;                                                          \
                const float p = scores[s];                                                                           \
                for (int64_t d = 0; d < DV; d += 16) {                                                               \
                    vf x = load_f32(acc + d) + p * VLOAD(vv + d);                                                    \
                    memcpy(acc + d, &x, sizeof x);                                                                   \
                }                                                                                                    \
                for (int64_t d = DV; d < D; d++) acc[d] += p * LOAD(vv[d]);                                          \
            }                                                                                                        \
            _Pragma("omp simd") for (int64_t d = 0; d < D; d++) out[i * D + d] = STORE(acc[d]);                      \
        }                                                                                                            \
    }                                                                                                                \
    void NAME(const T *q, int64_t qb, int64_t qh, T *k, T *v, T *out, int64_t B, int64_t H,                          \
              int64_t D, int64_t S,                                                                                  \
              int64_t ss, int64_t sb, int64_t sh, const uint8_t *mask, int64_t msb, float scale,                     \
              float *scratch, int64_t knew) {                                                                        \
        switch (D) { /* D a constant for the usual head sizes: the vector loops unroll whole */                      \
        case 16: NAME##_body(q, qb, qh, k, v, out, B, H, 16, S, ss, sb, sh, mask, msb, scale, scratch, knew); break; \
        case 32: NAME##_body(q, qb, qh, k, v, out, B, H, 32, S, ss, sb, sh, mask, msb, scale, scratch, knew); break; \
        case 64: NAME##_body(q, qb, qh, k, v, out, B, H, 64, S, ss, sb, sh, mask, msb, scale, scratch, knew); break; \
        case 128:                                                                                                    \
            NAME##_body(q, qb, qh, k, v, out, B, H, 128, S, ss, sb, sh, mask, msb, scale, scratch, knew);            \
            break;                                                                                                   \
        default: NAME##_body(q, qb, qh, k, v, out, B, H, D, S, ss, sb, sh, mask, msb, scale, scratch, knew);         \
        }                                                                                                            \
    }

DECODE_ATTENTION(distpg_decode_attention_f32, float, from_f32, load_f32, to_f32)
DECODE_ATTENTION(distpg_decode_attention_bf16, bf16, from_bf16, load_bf16, to_bf16)

#define GELU_TANH(NAME, T, LOAD, STORE)                                                                              \
    void NAME(T *x, int64_t n) {                                                                                     \
        _Pragma("omp simd") for (int64_t i = 0; i < n; i++) {                                                        \
            const float v = LOAD(x[i]);                                                                              \
            const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);                                       \
            x[i] = STORE(v / (1.0f + vexp(-2.0f * u)));                                                              \
        }                                                                                                            \
    }

GELU_TANH(distpg_gelu_tanh_f32, float, from_f32, to_f32)
GELU_TANH(distpg_gelu_tanh_bf16, bf16, from_bf16, to_bf16)

/* A float32 GPT-2 decode step (distpg.model.decode_step) in one call, for the sampler's per-token loop: the
 * embeddings, every block (layer norm, qkv product, decode attention writing the new key and value, output
 * product and residual, layer norm, c_fc product and GELU, c_proj product and residual) and the final layer
 * norm, without a return to Python between them. The products are the BLAS's: `gemm` is PyTorch's own sgemm
 * (Fortran interface, 32-bit integers; distpg/kernels.py finds it), called as torch.addmm calls it, so each
 * product is bitwise PyTorch's. Layer norms are computed here in float32 (mean, then the mean squared
 * deviation).
 *   tok, pos (B,): token and position ids; wte (V, C), wpe (n_positions, C);
 *   params: n_layer * 12 addresses per block: ln_1 weight, bias; c_attn (C, 3C) transposed copy, bias;
 *     attention c_proj (C, C) transposed, bias; ln_2 weight, bias; c_fc (C, 4C) transposed, bias; MLP c_proj
 *     (4C, C) transposed, bias (a NULL bias: none);
 *   k, v: layer 0's cache with the attention's strides (position ss, row sb, head sh), layer l at + l * sl;
 *     the new token goes to position S - 1; mask, msb: as decode_attention;
 *   x, a, b (B, C), qkv (B, 3C), hid (B, 4C), scratch (16 S + 2 D): work space; the final layer norm's
 *   output (the output layer's input) is left in a. */
typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                        const float *, const int *, const float *, const int *, const float *, float *, const int *);

/* y (B, N) = bias + x (B, K) w (K, N), row-major; in the BLAS's column-major terms y^T = w^T x^T */
static void linear_f32(sgemm_t gemm, const float *x, const float *w, const float *bias, float *y, int B, int K,
                       int N) {
    for (int b = 0; b < B; b++) {
        if (bias) memcpy(y + (int64_t)b * N, bias, sizeof(float) * N);
    }
    const float one = 1.0f, beta = bias ? 1.0f : 0.0f;
    gemm("N", "N", &N, &B, &K, &one, w, &N, x, &K, &beta, y, &N);
}

static void layer_norm_f32(const float *x, const float *w, const float *bias, float *out, int64_t B, int64_t C,
                           float eps) {
    for (int64_t r = 0; r < B; r++) {
        const float *xr = x + r * C;
        float *o = out + r * C, sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < C; c++) sum += xr[c];
        const float mean = sum / (float)C;
#pragma omp simd reduction(+ : sq)
        for (int64_t c = 0; c < C; c++) sq += (xr[c] - mean) * (xr[c] - mean);
        const float rstd = 1.0f / sqrtf(sq / (float)C + eps);
#pragma omp simd
        for (int64_t c = 0; c < C; c++) o[c] = (xr[c] - mean) * rstd * w[c] + bias[c];
    }
}

static void add_f32(float *x, const float *y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

void distpg_decode_step_f32(sgemm_t gemm, const int64_t *tok, const int64_t *pos, int64_t B, const float *wte,
                            const float *wpe, int64_t C, int64_t H, int64_t n_layer, const int64_t *params, float *k,
                            float *v, int64_t sl, int64_t ss, int64_t sb, int64_t sh, int64_t S, const uint8_t *mask,
                            int64_t msb, float eps, const float *lnf_w, const float *lnf_b, float *x, float *a,
                            float *b, float *qkv, float *hid, float *scratch) {
    const int64_t D = C / H;
    const int nb = (int)B, c1 = (int)C, c3 = (int)(3 * C), c4 = (int)(4 * C);
    for (int64_t r = 0; r < B; r++) {
        const float *e = wte + tok[r] * C, *p = wpe + pos[r] * C;
        float *xr = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) xr[c] = e[c] + p[c];
    }
    for (int64_t l = 0; l < n_layer; l++) {
        const float *w[12];
        for (int i = 0; i < 12; i++) w[i] = (const float *)(intptr_t)params[12 * l + i];
        layer_norm_f32(x, w[0], w[1], a, B, C, eps);
        linear_f32(gemm, a, w[2], w[3], qkv, nb, c1, c3);
        distpg_decode_attention_f32(qkv, 3 * C, D, k + l * sl, v + l * sl, b, B, H, D, S, ss, sb, sh, mask, msb,
                                    (float)(1.0 / sqrt((double)D)), scratch, C);
        linear_f32(gemm, b, w[4], w[5], a, nb, c1, c1);
        add_f32(x, a, B * C);
        layer_norm_f32(x, w[6], w[7], a, B, C, eps);
        linear_f32(gemm, a, w[8], w[9], hid, nb, c1, c4);
        distpg_gelu_tanh_f32(hid, B * 4 * C);
        linear_f32(gemm, hid, w[10], w[11], a, nb, c4, c1);
        add_f32(x, a, B * C);
    }
    layer_norm_f32(x, lnf_w, lnf_b, a, B, C, eps);
}

/* transpose_f32: dst (cols, rows) = src (rows, cols) transposed, both contiguous; in 32 x 32 tiles, so that a
   tile's reads and writes stay in the L1 cache (PyTorch's copy of a transposed view is about twice as slow
   on the sampler's weight matrices). */
#define TRANSPOSE_TILE 32
void distpg_transpose_f32(const float *restrict src, float *restrict dst, int64_t rows, int64_t cols) {
    for (int64_t r0 = 0; r0 < rows; r0 += TRANSPOSE_TILE) {
        const int64_t r1 = r0 + TRANSPOSE_TILE < rows ? r0 + TRANSPOSE_TILE : rows;
        for (int64_t c0 = 0; c0 < cols; c0 += TRANSPOSE_TILE) {
            const int64_t c1 = c0 + TRANSPOSE_TILE < cols ? c0 + TRANSPOSE_TILE : cols;
            for (int64_t c = c0; c < c1; c++) {
                float *d = dst + c * rows;
                const float *s = src + c;
                for (int64_t r = r0; r < r1; r++) d[r] = s[r * cols];
            }
        }
    }
}

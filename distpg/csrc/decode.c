/* CPU kernels for distpg's decode step (see distpg/kernels.py, which compiles and loads this file).
 *
 * PyTorch runs the one-query decode attention as several elementwise passes with temporaries the size of the
 * cache, and its CPU tanh is scalar; these are single passes the compiler vectorises (no intrinsics, so any
 * C99 compiler builds them; -march=native picks the vector width). Each function has a float32 and a
 * bfloat16 version; bfloat16 values are widened to float32 for every sum, as PyTorch does.
 *
 * decode_attention: softmax(q . k_s / sqrt(D)) . v_s over the S cached positions, for each row b and head h.
 *   q (B, H, D) with element strides qb (row), qh (head) and D contiguous; k, v: element strides ss
 *   (position), sb (row), sh (head), D contiguous;
 *   mask: NULL or bytes with row stride msb, 0 = a padding slot never attended to; out (B, H, D) contiguous;
 *   scratch: B * H * (S + 2 D) floats;
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

#define DECODE_ATTENTION(NAME, T, LOAD, VLOAD, STORE)                                                                \
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
        float *scores = scratch;  /* (B * H, S) */                                                                   \
        float *acc = scratch + BH * S;  /* (B * H, D) */                                                             \
        /* q as float32 times the scale, once, instead of at every position */                                       \
        float *qs = scratch + BH * (S + D); /* (B * H, D) */                                                         \
        for (int64_t b = 0; b < B; b++)                                                                              \
            for (int64_t h = 0; h < H; h++)                                                                          \
                for (int64_t d = 0; d < D; d++) qs[(b * H + h) * D + d] = LOAD(q[b * qb + h * qh + d]) * scale;      \
        /* scores: the keys are read once, position by position, in memory order */                                  \
        for (int64_t s = 0; s < S; s++)                                                                              \
            for (int64_t b = 0; b < B; b++)                                                                          \
                for (int64_t h = 0; h < H; h++) {                                                                    \
                    const T *kk = k + s * ss + b * sb + h * sh;                                                      \
                    const float *qq = qs + (b * H + h) * D;                                                          \
                    vf dv = {0};                                                                                     \
                    for (int64_t d = 0; d < DV; d += 16) dv += load_f32(qq + d) * VLOAD(kk + d);                     \
                    float dot = hsum(dv);                                                                            \
                    for (int64_t d = DV; d < D; d++) dot += qq[d] * LOAD(kk[d]);                                     \
                    scores[(b * H + h) * S + s] = dot;                                                               \
                }                                                                                                    \
        /* softmax over positions, padding slots excluded */                                                         \
        for (int64_t i = 0; i < BH; i++) {                                                                           \
            float *sc = scores + i * S;                                                                              \
            const uint8_t *m = mask ? mask + (i / H) * msb : NULL;                                                   \
            float mx = -INFINITY;                                                                                    \
            for (int64_t s = 0; s < S; s++) {                                                                        \
                if (m && !m[s]) sc[s] = -INFINITY;                                                                   \
                mx = sc[s] > mx ? sc[s] : mx;                                                                        \
            }                                                                                                        \
            float total = 0.0f;                                                                                      \
            _Pragma("omp simd reduction(+ : total)") for (int64_t s = 0; s < S; s++) {                               \
                float e = sc[s] == -INFINITY ? 0.0f : vexp(sc[s] - mx);                                              \
                sc[s] = e;                                                                                           \
                total += e;                                                                                          \
            }                                                                                                        \
            const float inv = 1.0f / total;                                                                          \
            _Pragma("omp simd") for (int64_t s = 0; s < S; s++) sc[s] *= inv;                                        \
        }                                                                                                            \
        /* output: the probability-weighted sum of the values, read once in memory order */                          \
        memset(acc, 0, sizeof(float) * BH * D);                                                                      \
        for (int64_t s = 0; s < S; s++)                                                                              \
            for (int64_t b = 0; b < B; b++)                                                                          \
                for (int64_t h = 0; h < H; h++) {                                                                    \
                    const T *vv = v + s * ss + b * sb + h * sh;                                                      \
                    float *o = acc + (b * H + h) * D;                                                                \
                    const float p = scores[(b * H + h) * S + s];                                                     \
                    for (int64_t d = 0; d < DV; d += 16) {                                                           \
                        vf x = load_f32(o + d) + p * VLOAD(vv + d);                                                  \
                        memcpy(o + d, &x, sizeof x);                                                                 \
                    }                                                                                                \
                    for (int64_t d = DV; d < D; d++) o[d] += p * LOAD(vv[d]);                                        \
                }                                                                                                    \
        _Pragma("omp simd") for (int64_t i = 0; i < BH * D; i++) out[i] = STORE(acc[i]);                             \
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

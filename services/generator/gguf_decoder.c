/* One decode step of a Llama-architecture model whose weights stay in their GGUF blocks (Q4_1 and
 * Q8_0), dequantized to fp32 inside the registers: the same weights and fp32 activations as the
 * ONNX fp32 model, with a seventh of its bytes to read per token.
 *
 * A product takes one of three paths by the number of rows: one row dequantizes in registers as
 * it streams the weights (memory-bound: prefetched ahead), a few rows share each dequantized block,
 * many rows run tiles of TILE_ROWS over a dequantized chunk (compute-bound). On every path each
 * output element is one fused multiply-add chain over the inner dimension, in order, however the
 * work is split between threads: a row's logits do not depend on the rows decoded beside it.
 * Built by gguf_decoder.py with the machine's C compiler (AVX2, FMA, OpenMP, glibc's libmvec); no
 * -ffast-math, which would let the compiler reorder those chains. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { KIND_Q4_1 = 0, KIND_Q8_0 = 1 };
#define BLOCK 32   /* weights per GGUF block, along the inner dimension */
#define OCTET 8    /* output rows interleaved in one packed group: one AVX2 vector */
#define SPAN 8     /* octets one small-batch task accumulates at once (8 vectors) */
#define TILE_ROWS 5
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define FEW_ROWS 16  /* up to this many rows share each dequantized span block; more take tiles */
/* How far ahead of a one-row product the weights are fetched: the hardware prefetchers alone left
 * it waiting on memory (a decode step of SmolLM2-135M took 17-22 ms without, 10-11 ms with). */
#define PREFETCH 2048
#define CHUNK 128  /* inputs dequantized at once for a many-row product: 8 KiB of floats */

/* A matrix [n, k] (n outputs, k inputs), packed so that a one-row product reads it front to back:
 * in spans of SPAN octets (64 output rows), each span block by block; a span's block holds, for
 * every pair of inputs (2p, 2p+1) in turn, the SPAN octets' values one octet after another, then
 * each octet's 8 float scales (and for Q4_1 8 float minimums):
 *   Q4_1: 16 pairs x 8 octets x 8 bytes (row r's byte: input 2p's 4-bit value in the low half,
 *         2p+1's in the high half), 8 x 8 scales, 8 x 8 minimums (w = scale * q + minimum)
 *   Q8_0: 16 pairs x 8 octets x 16 signed bytes (input 2p's 8 rows, then 2p+1's), 8 x 8 scales
 *         (w = scale * q) */
typedef struct {
    int kind, n, k;
    const uint8_t *data;
} Matrix;

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, inter, vocab, max_pos;
    float eps, scale;
    const float *cos_cache, *sin_cache; /* [max_pos, head_dim / 2] */
    Matrix embed;                       /* [vocab, hidden], also the output head */
    const float *final_norm;
    Matrix *qkv, *out, *gate_up, *down; /* per layer; qkv and gate_up fused along n */
    const float **attn_norm, **ffn_norm;
} Model;

/* Bytes of one pair of inputs for one octet, and of all a span block's values. */
static inline size_t pair_bytes(int kind) { return kind == KIND_Q4_1 ? 8 : 16; }
static inline size_t values_bytes(int kind) { return (BLOCK / 2) * SPAN * pair_bytes(kind); }
static inline size_t span_block_bytes(int kind) {
    return values_bytes(kind) + (size_t)SPAN * OCTET * sizeof(float) * (kind == KIND_Q4_1 ? 2 : 1);
}

static inline const uint8_t *span_block(const Matrix *w, int span, int block) {
    return w->data + ((size_t)span * (size_t)(w->k / BLOCK) + (size_t)block) * span_block_bytes(w->kind);
}

/* Octet t's weights at inputs 2p and 2p+1 of a span block, as floats: exactly the dequantized
 * values (scale * q is exact in fp32, so the fused add rounds once, as scale * q + minimum does). */
ALWAYS_INLINE void weights_q4(const uint8_t *base, int t, int pair, __m256 *even, __m256 *odd) {
    const size_t values = values_bytes(KIND_Q4_1);
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(base + ((size_t)pair * SPAN + t) * 8)));
    __m256 scale = _mm256_loadu_ps((const float *)(base + values) + t * OCTET);
    __m256 minimum = _mm256_loadu_ps((const float *)(base + values) + (SPAN + t) * OCTET);
    *even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15))), scale, minimum);
    *odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), scale, minimum);
}

ALWAYS_INLINE void weights_q8(const uint8_t *base, int t, int pair, __m256 *even, __m256 *odd) {
    const uint8_t *values = base + ((size_t)pair * SPAN + t) * 16;
    __m256 scale = _mm256_loadu_ps((const float *)(base + values_bytes(KIND_Q8_0)) + t * OCTET);
    __m256i q0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)values));
    __m256i q1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(values + 8)));
    *even = _mm256_mul_ps(_mm256_cvtepi32_ps(q0), scale);
    *odd = _mm256_mul_ps(_mm256_cvtepi32_ps(q1), scale);
}

ALWAYS_INLINE void weights_at(int kind, const uint8_t *base, int t, int pair, __m256 *even, __m256 *odd) {
    if (kind == KIND_Q4_1)
        weights_q4(base, t, pair, even, odd);
    else
        weights_q8(base, t, pair, even, odd);
}

/* y[n] = x[k] . w^T for one row and the SPAN octets from `first`, dequantizing in registers: a
 * lone row reads each weight once from memory, PREFETCH bytes ahead. */
ALWAYS_INLINE void span_one_row(int kind, const Matrix *w, const float *x, float *y, int first) {
    const int blocks = w->k / BLOCK;
    __m256 acc[SPAN];
    for (int t = 0; t < SPAN; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        const uint8_t *base = span_block(w, first / SPAN, b);
        for (int p = 0; p < BLOCK / 2; p++) {
            __m256 x0 = _mm256_broadcast_ss(x + b * BLOCK + 2 * p), x1 = _mm256_broadcast_ss(x + b * BLOCK + 2 * p + 1);
            _mm_prefetch((const char *)base + PREFETCH + (size_t)p * span_block_bytes(kind) / (BLOCK / 2), _MM_HINT_T0);
#pragma GCC unroll 8
            for (int t = 0; t < SPAN; t++) {
                __m256 even, odd;
                weights_at(kind, base, t, p, &even, &odd);
                acc[t] = _mm256_fmadd_ps(x1, odd, _mm256_fmadd_ps(x0, even, acc[t]));
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < SPAN; t++) _mm256_storeu_ps(y + (size_t)first * OCTET + 8 * t, acc[t]);
}

/* The same products for a few rows: each span block is dequantized once into `scratch` (8 KiB)
 * for every row, whose sums wait in `partial` between blocks, unchanged (the same chains as above). */
ALWAYS_INLINE void span_few(int kind, const Matrix *w, const float *x, int rows, float *y, int first, float *scratch) {
    const int blocks = w->k / BLOCK;
    const size_t bytes = span_block_bytes(kind);
    float *partial = scratch + (BLOCK / 2) * SPAN * 16;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *base = span_block(w, first / SPAN, b);
        for (size_t at = 0; at < bytes; at += 64) _mm_prefetch((const char *)base + PREFETCH + at, _MM_HINT_T0);
        for (int p = 0; p < BLOCK / 2; p++)
            for (int t = 0; t < SPAN; t++) {
                __m256 even, odd;
                weights_at(kind, base, t, p, &even, &odd);
                _mm256_storeu_ps(scratch + (size_t)(p * SPAN + t) * 16, even);
                _mm256_storeu_ps(scratch + (size_t)(p * SPAN + t) * 16 + 8, odd);
            }
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * w->k + b * BLOCK;
            float *sums = partial + (size_t)r * SPAN * OCTET;
            __m256 acc[SPAN];
#pragma GCC unroll 8
            for (int t = 0; t < SPAN; t++) acc[t] = b == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(sums + t * OCTET);
            for (int p = 0; p < BLOCK / 2; p++) {
                __m256 x0 = _mm256_broadcast_ss(xr + 2 * p), x1 = _mm256_broadcast_ss(xr + 2 * p + 1);
                const float *wp = scratch + (size_t)p * SPAN * 16;
#pragma GCC unroll 8
                for (int t = 0; t < SPAN; t++)
                    acc[t] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(wp + t * 16 + 8),
                                             _mm256_fmadd_ps(x0, _mm256_loadu_ps(wp + t * 16), acc[t]));
            }
#pragma GCC unroll 8
            for (int t = 0; t < SPAN; t++) _mm256_storeu_ps(sums + t * OCTET, acc[t]);
        }
    }
    for (int r = 0; r < rows; r++)
        memcpy(y + (size_t)r * w->n + (size_t)first * OCTET, partial + (size_t)r * SPAN * OCTET, sizeof(float) * SPAN * OCTET);
}

/* The same products for many rows: two octets' weights are dequantized CHUNK inputs at a time
 * into `scratch` ([CHUNK][16] floats, within the L1 cache) and every tile of TILE_ROWS rows
 * continues its sums from there; between chunks the sums wait in `partial` unchanged, so each is
 * still one chain in input order. `x` holds whole tiles (rows past `rows` are dropped). */
ALWAYS_INLINE void pair_tiled(int kind, const Matrix *w, const float *x, int rows, float *y, int octet, float *scratch) {
    const int k = w->k;
    float *partial = scratch + CHUNK * 16;
    for (int k0 = 0; k0 < k; k0 += CHUNK) {
        const int width = k - k0 < CHUNK ? k - k0 : CHUNK;
        for (int c = 0; c < 2; c++)
            for (int b = 0; b < width / BLOCK; b++) {
                const uint8_t *base = span_block(w, (octet + c) / SPAN, k0 / BLOCK + b);
                for (int p = 0; p < BLOCK / 2; p++) {
                    __m256 even, odd;
                    weights_at(kind, base, (octet + c) % SPAN, p, &even, &odd);
                    _mm256_storeu_ps(scratch + (size_t)(b * BLOCK + 2 * p) * 16 + c * 8, even);
                    _mm256_storeu_ps(scratch + (size_t)(b * BLOCK + 2 * p + 1) * 16 + c * 8, odd);
                }
            }
        for (int r0 = 0; r0 < rows; r0 += TILE_ROWS) {
            float *sums = partial + (size_t)r0 * 16;
            __m256 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41;
            if (k0 == 0) {
                a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = _mm256_setzero_ps();
            } else {
                a00 = _mm256_loadu_ps(sums), a01 = _mm256_loadu_ps(sums + 8);
                a10 = _mm256_loadu_ps(sums + 16), a11 = _mm256_loadu_ps(sums + 24);
                a20 = _mm256_loadu_ps(sums + 32), a21 = _mm256_loadu_ps(sums + 40);
                a30 = _mm256_loadu_ps(sums + 48), a31 = _mm256_loadu_ps(sums + 56);
                a40 = _mm256_loadu_ps(sums + 64), a41 = _mm256_loadu_ps(sums + 72);
            }
            const float *x0 = x + (size_t)r0 * k + k0;
            for (int i = 0; i < width; i++) {
                __m256 w0 = _mm256_loadu_ps(scratch + (size_t)i * 16), w1 = _mm256_loadu_ps(scratch + (size_t)i * 16 + 8);
                __m256 xi = _mm256_broadcast_ss(x0 + i);
                a00 = _mm256_fmadd_ps(xi, w0, a00);
                a01 = _mm256_fmadd_ps(xi, w1, a01);
                xi = _mm256_broadcast_ss(x0 + k + i);
                a10 = _mm256_fmadd_ps(xi, w0, a10);
                a11 = _mm256_fmadd_ps(xi, w1, a11);
                xi = _mm256_broadcast_ss(x0 + 2 * k + i);
                a20 = _mm256_fmadd_ps(xi, w0, a20);
                a21 = _mm256_fmadd_ps(xi, w1, a21);
                xi = _mm256_broadcast_ss(x0 + 3 * k + i);
                a30 = _mm256_fmadd_ps(xi, w0, a30);
                a31 = _mm256_fmadd_ps(xi, w1, a31);
                xi = _mm256_broadcast_ss(x0 + 4 * k + i);
                a40 = _mm256_fmadd_ps(xi, w0, a40);
                a41 = _mm256_fmadd_ps(xi, w1, a41);
            }
            _mm256_storeu_ps(sums, a00), _mm256_storeu_ps(sums + 8, a01);
            _mm256_storeu_ps(sums + 16, a10), _mm256_storeu_ps(sums + 24, a11);
            _mm256_storeu_ps(sums + 32, a20), _mm256_storeu_ps(sums + 40, a21);
            _mm256_storeu_ps(sums + 48, a30), _mm256_storeu_ps(sums + 56, a31);
            _mm256_storeu_ps(sums + 64, a40), _mm256_storeu_ps(sums + 72, a41);
        }
    }
    for (int r = 0; r < rows; r++) {
        float *yr = y + (size_t)r * w->n + (size_t)octet * OCTET;
        _mm256_storeu_ps(yr, _mm256_loadu_ps(partial + (size_t)r * 16));
        _mm256_storeu_ps(yr + 8, _mm256_loadu_ps(partial + (size_t)r * 16 + 8));
    }
}

/* Called inside a parallel region by every thread; the work is split by octets (n is a multiple
 * of SPAN * OCTET, checked when the weights are packed). */
static void matmul(const Matrix *w, const float *x, int rows, float *y, float *scratch) {
    int octets = w->n / OCTET;
    if (rows == 1) {
#pragma omp for schedule(static)
        for (int s = 0; s < octets; s += SPAN) {
            if (w->kind == KIND_Q4_1)
                span_one_row(KIND_Q4_1, w, x, y, s);
            else
                span_one_row(KIND_Q8_0, w, x, y, s);
        }
    } else if (rows <= FEW_ROWS) {
#pragma omp for schedule(static)
        for (int s = 0; s < octets; s += SPAN) {
            if (w->kind == KIND_Q4_1)
                span_few(KIND_Q4_1, w, x, rows, y, s, scratch);
            else
                span_few(KIND_Q8_0, w, x, rows, y, s, scratch);
        }
    } else {
#pragma omp for schedule(static)
        for (int o = 0; o < octets; o += 2) {
            if (w->kind == KIND_Q4_1)
                pair_tiled(KIND_Q4_1, w, x, rows, y, o, scratch);
            else
                pair_tiled(KIND_Q8_0, w, x, rows, y, o, scratch);
        }
    }
}

/* A thread's scratch: a chunk or span block of weights (2048 floats either way) and sums of
 * `padded` rows (16 per row for pair_tiled, SPAN * OCTET for span_few). */
static size_t scratch_floats_for(int padded) { return (size_t)CHUNK * 16 + (size_t)padded * SPAN * OCTET; }

static float dequantized(const Matrix *w, int row, int col) {
    const uint8_t *base = span_block(w, row / (SPAN * OCTET), col / BLOCK);
    int t = row / OCTET % SPAN, r = row % OCTET, pair = col % BLOCK / 2, odd = col % 2;
    const float *scales = (const float *)(base + values_bytes(w->kind)) + t * OCTET;
    const uint8_t *values = base + ((size_t)pair * SPAN + t) * pair_bytes(w->kind);
    if (w->kind == KIND_Q8_0) return (float)(int8_t)values[odd * OCTET + r] * scales[r];
    int q = (values[r] >> (4 * odd)) & 15;
    return fmaf((float)q, scales[r], scales[SPAN * OCTET + r]);
}

/* x . y over n (a multiple of 8) in 8 lanes, then the lanes in a fixed order. */
static inline float sum_lanes(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_hadd_ps(half, half);
    return _mm_cvtss_f32(_mm_hadd_ps(half, half));
}

static float dot(const float *x, const float *y, int n) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc);
    return sum_lanes(acc);
}

/* scores[t] = q . keys[t] * scale for t < total; four positions at a time (four independent
 * chains), each the same chain as dot() so that a score does not depend on its neighbours. */
static void scores_of(const float *q, const float *keys, int total, int hd, float scale, float *scores) {
    int t = 0;
    for (; t + 4 <= total; t += 4) {
        const float *k = keys + (size_t)t * hd;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < hd; i += 8) {
            __m256 qi = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + i), a0);
            a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + hd + i), a1);
            a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 2 * hd + i), a2);
            a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 3 * hd + i), a3);
        }
        scores[t] = sum_lanes(a0) * scale;
        scores[t + 1] = sum_lanes(a1) * scale;
        scores[t + 2] = sum_lanes(a2) * scale;
        scores[t + 3] = sum_lanes(a3) * scale;
    }
    for (; t < total; t++) scores[t] = dot(q, keys + (size_t)t * hd, hd) * scale;
}

/* glibc's vector expf (libmvec, AVX2). */
__m256 _ZGVdN8v_expf(__m256 x);

/* v[i] = exp(v[i] - shift) over n values, 8 lanes at a time. */
static void exp_shifted(float *v, int n, float shift) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(v + i, _ZGVdN8v_expf(_mm256_sub_ps(_mm256_loadu_ps(v + i), _mm256_set1_ps(shift))));
    for (; i < n; i++) v[i] = expf(v[i] - shift);
}

static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    float sum = dot(x, x, n);
    float inverse = 1.0f / sqrtf(sum / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inverse);
}

static void rotate(float *v, const float *cosines, const float *sines, int half) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cosines[i] - b * sines[i];
        v[i + half] = b * cosines[i] + a * sines[i];
    }
}

/* Activations of `rows` rows (padded to whole tiles), then attention weights up to `capacity`. */
static size_t activation_floats(const Model *m, int rows) {
    size_t padded = (size_t)((rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS);
    size_t qkv = (size_t)(m->heads + 2 * m->kv_heads) * m->head_dim;
    size_t widest = (size_t)(m->hidden > m->inter ? m->hidden : m->inter);
    return padded * ((size_t)m->hidden * 3 + qkv + 2 * (size_t)m->inter + widest);
}

size_t workspace_floats(const Model *m, int rows, int capacity) {
    return activation_floats(m, rows) + (size_t)rows * m->heads * capacity;
}

/* One token for each of `rows` rows: embeds tokens[r] at position lengths[r], appends its keys and
 * values at that position of the row's cache ([buffer_rows, kv_heads, capacity, head_dim] per
 * layer, keys then values), attends over positions 0..lengths[r], and writes the next logits
 * [rows, vocab]. `work` holds workspace_floats(rows, capacity) floats. */
void decode(const Model *m, int rows, const int64_t *tokens, const int64_t *lengths, float *const *keys,
            float *const *values, int capacity, float *logits, float *work, int threads) {
    int padded = (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    int hd = m->head_dim, half = hd / 2, group = m->heads / m->kv_heads;
    int qkv_width = (m->heads + 2 * m->kv_heads) * hd, widest = m->hidden > m->inter ? m->hidden : m->inter;
    float *x = work, *h = x + (size_t)padded * m->hidden, *attn = h + (size_t)padded * m->hidden;
    float *qkv = attn + (size_t)padded * m->hidden, *gu = qkv + (size_t)padded * qkv_width;
    float *act = gu + (size_t)padded * 2 * m->inter;
    float *probs = act + (size_t)padded * widest;
    /* The tiles read the padding rows too (and drop their sums): zeros keep NaNs and slow
     * denormals out of them. */
    memset(work, 0, activation_floats(m, rows) * sizeof(float));
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < m->hidden; i++) x[(size_t)r * m->hidden + i] = dequantized(&m->embed, (int)tokens[r], i);
    size_t scratch_floats = scratch_floats_for(padded);
#pragma omp parallel num_threads(threads)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats);
        for (int l = 0; l < m->layers; l++) {
            size_t plane = (size_t)capacity * hd;
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++)
                rms_norm(x + (size_t)r * m->hidden, m->attn_norm[l], m->hidden, m->eps, h + (size_t)r * m->hidden);
            matmul(&m->qkv[l], h, rows, qkv, scratch);
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++) {
                float *q = qkv + (size_t)r * qkv_width, *k = q + m->heads * hd, *v = k + m->kv_heads * hd;
                int pos = (int)lengths[r];
                const float *c = m->cos_cache + (size_t)pos * half, *s = m->sin_cache + (size_t)pos * half;
                for (int head = 0; head < m->heads; head++) rotate(q + head * hd, c, s, half);
                for (int head = 0; head < m->kv_heads; head++) {
                    rotate(k + head * hd, c, s, half);
                    size_t at = ((size_t)r * m->kv_heads + head) * plane + (size_t)pos * hd;
                    memcpy(keys[l] + at, k + head * hd, sizeof(float) * hd);
                    memcpy(values[l] + at, v + head * hd, sizeof(float) * hd);
                }
            }
#pragma omp for schedule(static) collapse(2)
            for (int r = 0; r < rows; r++)
                for (int head = 0; head < m->heads; head++) {
                    const float *q = qkv + (size_t)r * qkv_width + head * hd;
                    size_t base = ((size_t)r * m->kv_heads + head / group) * plane;
                    const float *kk = keys[l] + base, *vv = values[l] + base;
                    float *p = probs + ((size_t)r * m->heads + head) * capacity;
                    int total = (int)lengths[r] + 1;
                    float top = -INFINITY, sum = 0.0f;
                    scores_of(q, kk, total, hd, m->scale, p);
                    for (int t = 0; t < total; t++) top = p[t] > top ? p[t] : top;
                    exp_shifted(p, total, top);
                    for (int t = 0; t < total; t++) sum += p[t];
                    float *o = attn + (size_t)r * m->hidden + head * hd;
                    for (int i = 0; i < hd; i++) o[i] = 0.0f;
                    for (int t = 0; t < total; t++) {
                        __m256 weight = _mm256_set1_ps(p[t] / sum);
                        const float *v = vv + (size_t)t * hd;
                        for (int i = 0; i < hd; i += 8)
                            _mm256_storeu_ps(o + i, _mm256_fmadd_ps(weight, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
                    }
                }
            matmul(&m->out[l], attn, rows, act, scratch);
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++) {
                float *xr = x + (size_t)r * m->hidden;
                for (int i = 0; i < m->hidden; i++) xr[i] += act[(size_t)r * m->hidden + i];
                rms_norm(xr, m->ffn_norm[l], m->hidden, m->eps, h + (size_t)r * m->hidden);
            }
            matmul(&m->gate_up[l], h, rows, gu, scratch);
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++) {
                const float *g = gu + (size_t)r * 2 * m->inter, *u = g + m->inter;
                float *a = act + (size_t)r * m->inter;
                for (int i = 0; i < m->inter; i += 8) {  /* silu(gate) * up */
                    __m256 gate = _mm256_loadu_ps(g + i);
                    __m256 e = _ZGVdN8v_expf(_mm256_sub_ps(_mm256_setzero_ps(), gate));
                    __m256 silu = _mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
                    _mm256_storeu_ps(a + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
                }
            }
            matmul(&m->down[l], act, rows, attn, scratch);
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++) {
                float *xr = x + (size_t)r * m->hidden;
                for (int i = 0; i < m->hidden; i++) xr[i] += attn[(size_t)r * m->hidden + i];
            }
        }
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++)
            rms_norm(x + (size_t)r * m->hidden, m->final_norm, m->hidden, m->eps, h + (size_t)r * m->hidden);
        matmul(&m->embed, h, rows, logits, scratch);
        free(scratch);
    }
}

/* Y[rows, n] = X[rows, k] . W^T alone, for tests and benchmarks of the kernel. */
void matmul_only(const Matrix *w, const float *x, int rows, float *y, int threads) {
    int padded = (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    float *whole_tiles = calloc((size_t)padded * w->k, sizeof(float));
    memcpy(whole_tiles, x, sizeof(float) * (size_t)rows * w->k);
#pragma omp parallel num_threads(threads)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats_for(padded));
        matmul(w, whole_tiles, rows, y, scratch);
        free(scratch);
    }
    free(whole_tiles);
}

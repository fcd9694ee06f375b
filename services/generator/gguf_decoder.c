/* Prompts and decode steps of a Llama-architecture model whose weights stay in their GGUF blocks
 * (Q4_1 and Q8_0), with fp32 or 8-bit activations; a row's logits do not depend on the rows
 * computed beside it. Called through gguf_decoder.py, which checks abi_entry() at load; the design
 * and its measurements are in docs/gguf-decoder.md. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Raised with any change gguf_decoder.py must follow that abi_entry()'s sizes and constants do not
 * show (an entry point's arguments, the meaning of a packed byte); it continues the numbering of
 * the packed layout's former version. */
#define ABI_VERSION 4
/* The instructions this build was compiled for: 0 AVX2 and FMA, 1 AVX-512 (F, BW, VL) with VNNI.
 * gguf_decoder.py compiles the source once per ISA and checks that the library it loads reports
 * the ISA it asked for. Both builds read the same packed layout and compute the same numbers, bit
 * for bit: integer sums are exact and every float sum keeps its order and its fused steps. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define DECODE_ISA 1
#else
#define DECODE_ISA 0
#endif
enum { KIND_Q4_1 = 0, KIND_Q8_0 = 1, KIND_Q4_1_INT8 = 2, KIND_Q8_0_INT8 = 3 };
#define BLOCK 32   /* weights per GGUF block, along the inner dimension */
#define OCTET 8    /* output rows interleaved in one packed group: one AVX2 vector */
#define SPAN 8     /* octets one small-batch task accumulates at once (8 vectors) */
#if DECODE_ISA
#define TILE_ROWS 8  /* rows of a many-row tile: one 16-float vector (two octets) each */
#else
#define TILE_ROWS 5
#endif
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define FEW_ROWS 16  /* up to this many rows share each dequantized span block; more take tiles */
/* How far ahead of a one-row product the weights are fetched (docs/gguf-decoder.md). */
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
    Matrix embed;                       /* [vocab, hidden] */
    Matrix head;                        /* the same weights as the output head, perhaps repacked */
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
#if DECODE_ISA
        /* A row's two octets are one 16-float vector: TILE_ROWS independent chains per input. */
        for (int r0 = 0; r0 < rows; r0 += TILE_ROWS) {
            float *sums = partial + (size_t)r0 * 16;
            __m512 acc[TILE_ROWS];
#pragma GCC unroll 8
            for (int r = 0; r < TILE_ROWS; r++) acc[r] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + r * 16);
            const float *x0 = x + (size_t)r0 * k + k0;
            for (int i = 0; i < width; i++) {
                __m512 wi = _mm512_loadu_ps(scratch + (size_t)i * 16);
#pragma GCC unroll 8
                for (int r = 0; r < TILE_ROWS; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x0[(size_t)r * k + i]), wi, acc[r]);
            }
#pragma GCC unroll 8
            for (int r = 0; r < TILE_ROWS; r++) _mm512_storeu_ps(sums + r * 16, acc[r]);
        }
#else
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
#endif
    }
    for (int r = 0; r < rows; r++) {
        float *yr = y + (size_t)r * w->n + (size_t)octet * OCTET;
        _mm256_storeu_ps(yr, _mm256_loadu_ps(partial + (size_t)r * 16));
        _mm256_storeu_ps(yr + 8, _mm256_loadu_ps(partial + (size_t)r * 16 + 8));
    }
}

/* With 8-bit activations (KIND_Q4_1_INT8), as llama.cpp multiplies Q4_1 blocks: each row's inputs
 * are quantized 32 at a time (x ~ d * q, q in [-127, 127], with s = d * sum(q); d and s stay fp32
 * where llama.cpp rounds them to fp16), and a block's
 * product is d_w * d * sum(q_w * q) + m_w * s, its integer sum exact (maddubs pairs, 16-bit sums
 * of 16 products each, at most 16 * 15 * 127 < 2^15). Packed per octet and block, one 192-byte record: four 32-byte
 * vectors of 4-bit values (vector h: byte 4 * lane + j holds input 8h + j of that lane's output in
 * its low half and input 8h + 4 + j in its high half), then the octet's 8 scales and 8 minimums. */
#define INT8_RECORD 192
#if DECODE_ISA
#define INT8_ROWS 4    /* rows of one tile (the tile shape: docs/gguf-decoder.md) */
#else
#define INT8_ROWS 3
#endif
#define INT8_OCTETS 4  /* octets of one tile: n is a multiple of 64, so octets of 4 */

typedef struct {
    int8_t *q;     /* [rows, k] */
    float *d, *s;  /* [rows, k / BLOCK] */
} Quantized;

/* The rows' inputs quantized per block of 32 (round to nearest even, as llama.cpp's AVX2 code). */
static void quantize_row(const float *x, int k, int8_t *q, float *d, float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < k / BLOCK; b++) {
        __m256 v[4], top = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + b * BLOCK + 8 * j);
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 half = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        half = _mm_max_ps(half, _mm_movehl_ps(half, half));
        half = _mm_max_ss(half, _mm_movehdup_ps(half));
        float amax = _mm_cvtss_f32(half), scale = amax / 127.0f, inverse = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m256i n[4];
        for (int j = 0; j < 4; j++)
            n[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(inverse)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_hadd_epi32(t, t);
        t = _mm_hadd_epi32(t, t);
        /* packs interleave the 128-bit lanes; the permute puts the 32 values back in order */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
        packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * BLOCK), packed);
        d[b] = scale;
        s[b] = scale * (float)_mm_cvtsi128_si32(t);
    }
}

/* Four quantized inputs in every 32-bit lane. */
ALWAYS_INLINE __m256i four_inputs(const int8_t *q) {
    int32_t four;
    memcpy(&four, q, sizeof four);
    return _mm256_set1_epi32(four);
}

/* y for R rows from r0 and G octets from o0: per block, the integer sums of every (row, octet),
 * then two fused multiply-adds into its float sum, in block order whatever R and G are. */
ALWAYS_INLINE void int8_tile(const Matrix *w, const Quantized *x, int R, int G, int r0, int o0, float *y) {
    const int k = w->k, blocks = k / BLOCK;
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 sum[INT8_ROWS][INT8_OCTETS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < G; c++) sum[r][c] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        __m256i acc[INT8_ROWS][INT8_OCTETS];
        for (int h = 0; h < 4; h++)
            for (int c = 0; c < G; c++) {
                __m256i nibbles = _mm256_loadu_si256((const __m256i *)(w->data + ((size_t)(o0 + c) * blocks + b) * INT8_RECORD + 32 * h));
                __m256i first = _mm256_and_si256(nibbles, low), second = _mm256_and_si256(_mm256_srli_epi16(nibbles, 4), low);
                for (int r = 0; r < R; r++) {
                    const int8_t *q = x->q + (size_t)(r0 + r) * k + b * BLOCK + 8 * h;
                    __m256i part = _mm256_add_epi16(_mm256_maddubs_epi16(first, four_inputs(q)),
                                                    _mm256_maddubs_epi16(second, four_inputs(q + 4)));
                    acc[r][c] = h == 0 ? part : _mm256_add_epi16(acc[r][c], part);
                }
            }
        for (int c = 0; c < G; c++) {
            const float *scales = (const float *)(w->data + ((size_t)(o0 + c) * blocks + b) * INT8_RECORD + 128);
            __m256 scale = _mm256_loadu_ps(scales), minimum = _mm256_loadu_ps(scales + OCTET);
            for (int r = 0; r < R; r++) {
                size_t at = (size_t)(r0 + r) * blocks + b;
                __m256 products = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][c], ones));
                sum[r][c] = _mm256_fmadd_ps(products, _mm256_mul_ps(scale, _mm256_broadcast_ss(x->d + at)), sum[r][c]);
                sum[r][c] = _mm256_fmadd_ps(minimum, _mm256_broadcast_ss(x->s + at), sum[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < G; c++) _mm256_storeu_ps(y + (size_t)(r0 + r) * w->n + (size_t)(o0 + c) * OCTET, sum[r][c]);
}

/* With 8-bit activations (KIND_Q8_0_INT8), as llama.cpp multiplies Q8_0 blocks: the inputs
 * quantized as above, a block's product is d_w * d * sum(q_w * q), its integer sum exact (maddubs
 * of |q_w| and q signed by q_w: pairs of at most 2 * 128 * 127 < 2^15, then 32-bit sums). Packed
 * per octet and block, one 288-byte record: eight 32-byte vectors of signed values (vector h: byte
 * 4 * lane + j holds input 4h + j of that lane's output), then the octet's 8 scales. */
#define Q8_INT8_RECORD 288

ALWAYS_INLINE void q8_int8_tile(const Matrix *w, const Quantized *x, int R, int G, int r0, int o0, float *y) {
    const int k = w->k, blocks = k / BLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 sum[INT8_ROWS][INT8_OCTETS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < G; c++) sum[r][c] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        __m256i acc[INT8_ROWS][INT8_OCTETS];
        for (int h = 0; h < 8; h++)
            for (int c = 0; c < G; c++) {
                __m256i values = _mm256_loadu_si256((const __m256i *)(w->data + ((size_t)(o0 + c) * blocks + b) * Q8_INT8_RECORD + 32 * h));
                __m256i magnitudes = _mm256_abs_epi8(values);
                for (int r = 0; r < R; r++) {
                    const int8_t *q = x->q + (size_t)(r0 + r) * k + b * BLOCK + 4 * h;
                    __m256i signed_inputs = _mm256_sign_epi8(four_inputs(q), values);
                    __m256i part = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, signed_inputs), ones);
                    acc[r][c] = h == 0 ? part : _mm256_add_epi32(acc[r][c], part);
                }
            }
        for (int c = 0; c < G; c++) {
            __m256 scale = _mm256_loadu_ps((const float *)(w->data + ((size_t)(o0 + c) * blocks + b) * Q8_INT8_RECORD + 256));
            for (int r = 0; r < R; r++) {
                __m256 products = _mm256_cvtepi32_ps(acc[r][c]);
                sum[r][c] = _mm256_fmadd_ps(products, _mm256_mul_ps(scale, _mm256_broadcast_ss(x->d + (size_t)(r0 + r) * blocks + b)), sum[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < G; c++) _mm256_storeu_ps(y + (size_t)(r0 + r) * w->n + (size_t)(o0 + c) * OCTET, sum[r][c]);
}

#if DECODE_ISA
/* The int8 tiles with AVX-512 VNNI: two octets' 32-byte vectors side by side in one 64-byte
 * register, and vpdpbusd summing four unsigned-by-signed byte products straight into 32 bits.
 * The integer sums are the AVX2 tiles' (exact either way) and each lane's float steps the same
 * ones in the same order, so the logits are theirs bit for bit. */
#define INT8_PAIRS (INT8_OCTETS / 2)

/* 32 bytes at `first` and 32 at `first + stride`, as one vector. */
ALWAYS_INLINE __m512i two_octets(const uint8_t *first, size_t stride) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)first)),
                              _mm256_loadu_si256((const __m256i *)(first + stride)), 1);
}

ALWAYS_INLINE __m512 two_octets_ps(const float *first, size_t stride_floats) {
    __m512d low = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(first)));
    return _mm512_castpd_ps(_mm512_insertf64x4(low, _mm256_castps_pd(_mm256_loadu_ps(first + stride_floats)), 1));
}

ALWAYS_INLINE __m512i four_inputs_512(const int8_t *q) {
    int32_t four;
    memcpy(&four, q, sizeof four);
    return _mm512_set1_epi32(four);
}

ALWAYS_INLINE void int8_tile_512(const Matrix *w, const Quantized *x, int R, int r0, int o0, float *y) {
    const int k = w->k, blocks = k / BLOCK;
    const size_t stride = (size_t)blocks * INT8_RECORD;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 sum[INT8_ROWS][INT8_PAIRS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < INT8_PAIRS; c++) sum[r][c] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        __m512i acc[INT8_ROWS][INT8_PAIRS];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < INT8_PAIRS; c++) acc[r][c] = _mm512_setzero_si512();
        for (int h = 0; h < 4; h++)
            for (int c = 0; c < INT8_PAIRS; c++) {
                __m512i nibbles = two_octets(w->data + ((size_t)(o0 + 2 * c) * blocks + b) * INT8_RECORD + 32 * h, stride);
                __m512i first = _mm512_and_si512(nibbles, low), second = _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low);
                for (int r = 0; r < R; r++) {
                    const int8_t *q = x->q + (size_t)(r0 + r) * k + b * BLOCK + 8 * h;
                    acc[r][c] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][c], first, four_inputs_512(q)), second, four_inputs_512(q + 4));
                }
            }
        for (int c = 0; c < INT8_PAIRS; c++) {
            const float *scales = (const float *)(w->data + ((size_t)(o0 + 2 * c) * blocks + b) * INT8_RECORD + 128);
            __m512 scale = two_octets_ps(scales, stride / sizeof(float)), minimum = two_octets_ps(scales + OCTET, stride / sizeof(float));
            for (int r = 0; r < R; r++) {
                size_t at = (size_t)(r0 + r) * blocks + b;
                __m512 products = _mm512_cvtepi32_ps(acc[r][c]);
                sum[r][c] = _mm512_fmadd_ps(products, _mm512_mul_ps(scale, _mm512_set1_ps(x->d[at])), sum[r][c]);
                sum[r][c] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(x->s[at]), sum[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < INT8_PAIRS; c++) _mm512_storeu_ps(y + (size_t)(r0 + r) * w->n + (size_t)(o0 + 2 * c) * OCTET, sum[r][c]);
}

/* Q8_0: vpdpbusd takes unsigned bytes first, so |w| by the inputs carrying w's sign (as llama.cpp;
 * the inputs are within [-127, 127], so negating one never overflows). */
ALWAYS_INLINE void q8_int8_tile_512(const Matrix *w, const Quantized *x, int R, int r0, int o0, float *y) {
    const int k = w->k, blocks = k / BLOCK;
    const size_t stride = (size_t)blocks * Q8_INT8_RECORD;
    __m512 sum[INT8_ROWS][INT8_PAIRS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < INT8_PAIRS; c++) sum[r][c] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        __m512i acc[INT8_ROWS][INT8_PAIRS];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < INT8_PAIRS; c++) acc[r][c] = _mm512_setzero_si512();
        for (int h = 0; h < 8; h++)
            for (int c = 0; c < INT8_PAIRS; c++) {
                __m512i values = two_octets(w->data + ((size_t)(o0 + 2 * c) * blocks + b) * Q8_INT8_RECORD + 32 * h, stride);
                __m512i magnitudes = _mm512_abs_epi8(values);
                __mmask64 negative = _mm512_movepi8_mask(values);
                for (int r = 0; r < R; r++) {
                    const int8_t *q = x->q + (size_t)(r0 + r) * k + b * BLOCK + 4 * h;
                    __m512i inputs = four_inputs_512(q);
                    __m512i signed_inputs = _mm512_mask_sub_epi8(inputs, negative, _mm512_setzero_si512(), inputs);
                    acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], magnitudes, signed_inputs);
                }
            }
        for (int c = 0; c < INT8_PAIRS; c++) {
            __m512 scale = two_octets_ps((const float *)(w->data + ((size_t)(o0 + 2 * c) * blocks + b) * Q8_INT8_RECORD + 256), stride / sizeof(float));
            for (int r = 0; r < R; r++) {
                __m512 products = _mm512_cvtepi32_ps(acc[r][c]);
                sum[r][c] = _mm512_fmadd_ps(products, _mm512_mul_ps(scale, _mm512_set1_ps(x->d[(size_t)(r0 + r) * blocks + b])), sum[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < INT8_PAIRS; c++) _mm512_storeu_ps(y + (size_t)(r0 + r) * w->n + (size_t)(o0 + 2 * c) * OCTET, sum[r][c]);
}
#endif

/* One tile of R rows and INT8_OCTETS octets of either int8 kind (a constant where inlined). */
ALWAYS_INLINE void int8_tile_of(int kind, const Matrix *w, const Quantized *x, int R, int r0, int o0, float *y) {
#if DECODE_ISA
    if (kind == KIND_Q4_1_INT8)
        int8_tile_512(w, x, R, r0, o0, y);
    else
        q8_int8_tile_512(w, x, R, r0, o0, y);
#else
    if (kind == KIND_Q4_1_INT8)
        int8_tile(w, x, R, INT8_OCTETS, r0, o0, y);
    else
        q8_int8_tile(w, x, R, INT8_OCTETS, r0, o0, y);
#endif
}

/* Every tile of INT8_OCTETS octets from o0, rows in tiles of INT8_ROWS and one tile of the rest. */
ALWAYS_INLINE void int8_octets(int kind, const Matrix *w, const Quantized *x, int rows, int o0, float *y) {
    int r0 = 0;
    for (; r0 + INT8_ROWS <= rows; r0 += INT8_ROWS) int8_tile_of(kind, w, x, INT8_ROWS, r0, o0, y);
    switch (rows - r0) {
#if INT8_ROWS > 3
        case 3: int8_tile_of(kind, w, x, 3, r0, o0, y); break;
#endif
        case 2: int8_tile_of(kind, w, x, 2, r0, o0, y); break;
        case 1: int8_tile_of(kind, w, x, 1, r0, o0, y); break;
        default: break;
    }
}

/* Called inside a parallel region by every thread; the work is split by octets (n is a multiple
 * of SPAN * OCTET, checked when the weights are packed). */
static void matmul(const Matrix *w, const float *x, int rows, float *y, float *scratch, const Quantized *quantized) {
    int octets = w->n / OCTET;
    if (w->kind == KIND_Q4_1_INT8 || w->kind == KIND_Q8_0_INT8) {
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++)
            quantize_row(x + (size_t)r * w->k, w->k, quantized->q + (size_t)r * w->k, quantized->d + (size_t)r * (w->k / BLOCK),
                         quantized->s + (size_t)r * (w->k / BLOCK));
#pragma omp for schedule(static)
        for (int o = 0; o < octets; o += INT8_OCTETS) {
            if (w->kind == KIND_Q4_1_INT8)
                int8_octets(KIND_Q4_1_INT8, w, quantized, rows, o, y);
            else
                int8_octets(KIND_Q8_0_INT8, w, quantized, rows, o, y);
        }
    } else if (rows == 1) {
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

/* Room for `rows` rows of k inputs quantized to 8 bits, with their scales and sums, in floats. */
static size_t quantized_floats(int rows, int k) { return (size_t)rows * ((size_t)k / 4 + 2 * (size_t)(k / BLOCK)); }

static Quantized quantized_in(float *room, int rows, int k) {
    Quantized quantized = {(int8_t *)room, room + (size_t)rows * k / 4, room + (size_t)rows * k / 4 + (size_t)rows * (k / BLOCK)};
    return quantized;
}

/* The workspace of forward(): activations of `rows` rows (padded to whole tiles) and their 8-bit
 * copies. */
size_t workspace_floats(const Model *m, int rows) {
    size_t padded = (size_t)((rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS);
    size_t qkv = (size_t)(m->heads + 2 * m->kv_heads) * m->head_dim;
    int widest = m->hidden > m->inter ? m->hidden : m->inter;
    return padded * ((size_t)m->hidden * 3 + qkv + 2 * (size_t)m->inter + (size_t)widest) + quantized_floats(rows, widest);
}


/* One token for each of `rows` rows: row r embeds tokens[r] at position positions[r] of cache row
 * cache_rows[r] ([buffer_rows, kv_heads, capacity, head_dim] per layer, keys then values), appends
 * its keys and values there and attends over positions 0..positions[r] of that cache row, and the
 * rows listed in output_rows write their next logits [outputs, vocab]. A decode step is one row per
 * sequence; a prompt is one row per token on its sequence's cache row (every row's keys and values
 * are written before any row attends, so its tokens see each other causally), with logits for its
 * last token. `work` holds workspace_floats(rows) floats. */
void forward(const Model *m, int rows, const int64_t *tokens, const int64_t *positions, const int64_t *cache_rows,
             float *const *keys, float *const *values, int capacity, int outputs, const int64_t *output_rows,
             float *logits, float *work, int threads) {
    int padded = (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    int hd = m->head_dim, half = hd / 2, group = m->heads / m->kv_heads;
    int qkv_width = (m->heads + 2 * m->kv_heads) * hd, widest = m->hidden > m->inter ? m->hidden : m->inter;
    float *x = work, *h = x + (size_t)padded * m->hidden, *attn = h + (size_t)padded * m->hidden;
    float *qkv = attn + (size_t)padded * m->hidden, *gu = qkv + (size_t)padded * qkv_width;
    float *act = gu + (size_t)padded * 2 * m->inter;
    Quantized quantized = quantized_in(act + (size_t)padded * widest, rows, widest);
    /* The tiles read the padding rows too (and drop their sums): zeros keep NaNs and slow
     * denormals out of them. */
    memset(work, 0, workspace_floats(m, rows) * sizeof(float));
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < m->hidden; i++) x[(size_t)r * m->hidden + i] = dequantized(&m->embed, (int)tokens[r], i);
    size_t scratch_floats = scratch_floats_for(padded);
#pragma omp parallel num_threads(threads)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats);
        float *probs = malloc(sizeof(float) * (size_t)capacity);
        for (int l = 0; l < m->layers; l++) {
            size_t plane = (size_t)capacity * hd;
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++)
                rms_norm(x + (size_t)r * m->hidden, m->attn_norm[l], m->hidden, m->eps, h + (size_t)r * m->hidden);
            matmul(&m->qkv[l], h, rows, qkv, scratch, &quantized);
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++) {
                float *q = qkv + (size_t)r * qkv_width, *k = q + m->heads * hd, *v = k + m->kv_heads * hd;
                int pos = (int)positions[r];
                const float *c = m->cos_cache + (size_t)pos * half, *s = m->sin_cache + (size_t)pos * half;
                for (int head = 0; head < m->heads; head++) rotate(q + head * hd, c, s, half);
                for (int head = 0; head < m->kv_heads; head++) {
                    rotate(k + head * hd, c, s, half);
                    size_t at = ((size_t)cache_rows[r] * m->kv_heads + head) * plane + (size_t)pos * hd;
                    memcpy(keys[l] + at, k + head * hd, sizeof(float) * hd);
                    memcpy(values[l] + at, v + head * hd, sizeof(float) * hd);
                }
            }
#pragma omp for schedule(static) collapse(2)
            for (int r = 0; r < rows; r++)
                for (int head = 0; head < m->heads; head++) {
                    const float *q = qkv + (size_t)r * qkv_width + head * hd;
                    size_t base = ((size_t)cache_rows[r] * m->kv_heads + head / group) * plane;
                    const float *kk = keys[l] + base, *vv = values[l] + base;
                    float *p = probs;
                    int total = (int)positions[r] + 1;
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
            matmul(&m->out[l], attn, rows, act, scratch, &quantized);
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++) {
                float *xr = x + (size_t)r * m->hidden;
                for (int i = 0; i < m->hidden; i++) xr[i] += act[(size_t)r * m->hidden + i];
                rms_norm(xr, m->ffn_norm[l], m->hidden, m->eps, h + (size_t)r * m->hidden);
            }
            matmul(&m->gate_up[l], h, rows, gu, scratch, &quantized);
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
            matmul(&m->down[l], act, rows, attn, scratch, &quantized);
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++) {
                float *xr = x + (size_t)r * m->hidden;
                for (int i = 0; i < m->hidden; i++) xr[i] += attn[(size_t)r * m->hidden + i];
            }
        }
        /* The head runs on the output rows only, gathered into h's first rows (zeros after them up
         * to a whole tile, as above). */
        int padded_outputs = (outputs + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
#pragma omp for schedule(static)
        for (int i = 0; i < padded_outputs; i++) {
            float *out = h + (size_t)i * m->hidden;
            if (i < outputs)
                rms_norm(x + (size_t)output_rows[i] * m->hidden, m->final_norm, m->hidden, m->eps, out);
            else
                memset(out, 0, sizeof(float) * m->hidden);
        }
        if (outputs > 0) /* the same on every thread, so the worksharing inside stays collective */
            matmul(&m->head, h, outputs, logits, scratch, &quantized);
        free(probs);
        free(scratch);
    }
}

/* Y[rows, n] = X[rows, k] . W^T alone, for tests and benchmarks of the kernel. */
void matmul_only(const Matrix *w, const float *x, int rows, float *y, int threads) {
    int padded = (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    float *whole_tiles = calloc((size_t)padded * w->k, sizeof(float));
    memcpy(whole_tiles, x, sizeof(float) * (size_t)rows * w->k);
    float *room = malloc(sizeof(float) * quantized_floats(rows, w->k));
    Quantized quantized = quantized_in(room, rows, w->k);
#pragma omp parallel num_threads(threads)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats_for(padded));
        matmul(w, whole_tiles, rows, y, scratch, &quantized);
        free(scratch);
    }
    free(room);
    free(whole_tiles);
}

/* Bytes of a packed matrix [n, k] of `kind` as the kernel reads them, or 0 for a kind or shape it
 * does not take. */
size_t matrix_bytes(int kind, int n, int k) {
    if (n <= 0 || k <= 0 || n % (SPAN * OCTET) || k % BLOCK) return 0;
    size_t blocks = (size_t)(k / BLOCK);
    switch (kind) {
        case KIND_Q4_1:
        case KIND_Q8_0: return (size_t)(n / (SPAN * OCTET)) * blocks * span_block_bytes(kind);
        case KIND_Q4_1_INT8: return (size_t)(n / OCTET) * blocks * INT8_RECORD;
        case KIND_Q8_0_INT8: return (size_t)(n / OCTET) * blocks * Q8_INT8_RECORD;
        default: return 0;
    }
}

/* What the Python binding mirrors: the ABI version, the constants and each struct's size and its
 * fields' offsets and sizes. */
#define CONSTANT(name) {#name, name}
#define FIELD(type, field) {"offsetof(" #type ", " #field ")", offsetof(type, field)}, \
                           {"sizeof(" #type "." #field ")", sizeof(((type *)0)->field)}
static const struct {
    const char *name;
    int64_t value;
} ABI[] = {
    CONSTANT(ABI_VERSION), CONSTANT(DECODE_ISA), CONSTANT(BLOCK), CONSTANT(OCTET), CONSTANT(SPAN),
    CONSTANT(KIND_Q4_1), CONSTANT(KIND_Q8_0), CONSTANT(KIND_Q4_1_INT8), CONSTANT(KIND_Q8_0_INT8),
    {"sizeof(Matrix)", sizeof(Matrix)},
    FIELD(Matrix, kind), FIELD(Matrix, n), FIELD(Matrix, k), FIELD(Matrix, data),
    {"sizeof(Model)", sizeof(Model)},
    FIELD(Model, layers), FIELD(Model, hidden), FIELD(Model, heads), FIELD(Model, kv_heads),
    FIELD(Model, head_dim), FIELD(Model, inter), FIELD(Model, vocab), FIELD(Model, max_pos),
    FIELD(Model, eps), FIELD(Model, scale), FIELD(Model, cos_cache), FIELD(Model, sin_cache),
    FIELD(Model, embed), FIELD(Model, head), FIELD(Model, final_norm), FIELD(Model, qkv),
    FIELD(Model, out), FIELD(Model, gate_up), FIELD(Model, down), FIELD(Model, attn_norm),
    FIELD(Model, ffn_norm),
};

/* Entry i of that table: its name, with its value in *value; NULL past the last. */
const char *abi_entry(int i, int64_t *value) {
    if (i < 0 || (size_t)i >= sizeof ABI / sizeof ABI[0]) return NULL;
    *value = ABI[i].value;
    return ABI[i].name;
}

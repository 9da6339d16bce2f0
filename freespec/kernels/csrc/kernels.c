/* Batch-invariant kernels for decoding and tree verification: see freespec/kernels/ and freespec.h.
 *
 * y[M, N] = x[M, K] @ w[N, K]^T for fp32 with few rows M (decode and tree verification).
 *
 * Why not BLAS: for M = 1..16 the stock kernels here either run far below memory bandwidth
 * (M = 1) or pick poor blockings (M = 2..16). This kernel streams every weight row from memory
 * once and multiplies it with all M input rows while it sits in cache, so its cost stays close to
 * the time needed to read the weights until M reaches about 8.
 *
 * Batch invariance: every output y[m, n] is computed by the same arithmetic whatever M is and
 * whichever register tile it lands in: LANES lane-wise FMA partial sums over k in steps of LANES
 * (16 with AVX-512, else 8), one fixed horizontal sum, then the k % LANES tail added in order. So
 * a token's logits are bit-identical whether it is verified alone or inside a tree of 80 tokens,
 * which is what makes speculative decoding reproduce plain decoding exactly. Compile without
 * -ffast-math.
 */
#include "freespec.h"

#include <immintrin.h>
#include <omp.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 64-byte aligned scratch: a vector load that straddles two cache lines costs two. */
static float *scratch(int64_t floats) {
    return aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
}

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* The vector the linear kernels accumulate in: 16 lanes where the CPU has AVX-512 (the build
 * defines FREESPEC_AVX512), else 8. A build uses one width for every call, so the per-output
 * arithmetic stays the same across calls; two builds give slightly different (equally exact)
 * sums. vec_sum is the one fixed horizontal sum of a build. */
#ifdef FREESPEC_AVX512
typedef __m512 vec;
#define LANES 16
#define vec_load _mm512_loadu_ps
#define vec_fma _mm512_fmadd_ps
#define vec_mul _mm512_mul_ps
#define vec_zero _mm512_setzero_ps
#define vec_set1 _mm512_set1_ps
#define vec_store _mm512_storeu_ps
#define vec_add _mm512_add_ps
#define vec_sub _mm512_sub_ps
#define vec_greater_mask(a, b) ((int)_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ)) /* bit l: lane l of a > b */
static inline float vec_sum(vec v) {
    return horizontal_sum(_mm256_add_ps(_mm512_castps512_ps256(v),
                                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
#else
typedef __m256 vec;
#define LANES 8
#define vec_load _mm256_loadu_ps
#define vec_fma _mm256_fmadd_ps
#define vec_mul _mm256_mul_ps
#define vec_zero _mm256_setzero_ps
#define vec_set1 _mm256_set1_ps
#define vec_store _mm256_storeu_ps
#define vec_add _mm256_add_ps
#define vec_sub _mm256_sub_ps
#define vec_greater_mask(a, b) _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ))
#define vec_sum horizontal_sum
#endif
#define STEPS (32 / LANES) /* vectors per block of 32 quantized weights */

/* sums[o] = vec_sum(v[o]) for o < count <= LANES, bit for bit: the same pairs of lanes are added
 * in the same grouping, but LANES vectors share each add (a transpose as it goes), which costs
 * about a third of LANES separate horizontal sums. Missing vectors are zeros, never read back. */
#ifdef FREESPEC_AVX512
/* The LANES sums as one vector, element 4i + j holding output 4j + i. */
static inline vec vec_sums_vector(const vec *v, int count) {
    vec in[16], a[8], b[4], c[2];
    for (int o = 0; o < 16; o++) in[o] = o < count ? v[o] : vec_zero();
    for (int p = 0; p < 8; p++) /* 16 -> 8 lanes each: [out 2p | out 2p+1] */
        a[p] = _mm512_add_ps(_mm512_shuffle_f32x4(in[2 * p], in[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(in[2 * p], in[2 * p + 1], 0xEE));
    for (int p = 0; p < 4; p++) /* 8 -> 4: [4p | 4p+1 | 4p+2 | 4p+3] */
        b[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xDD));
    for (int p = 0; p < 2; p++) /* 4 -> 2: 128-bit lane i holds outputs 8p + i and 8p + 4 + i */
        c[p] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * p], b[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * p], b[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* 2 -> 1: element 4i + j is output 4j + i */
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

static inline void vec_sums(const vec *v, int count, float *sums) {
    float out[16];
    _mm512_storeu_ps(out, vec_sums_vector(v, count));
    for (int o = 0; o < count; o++) sums[o] = out[(o % 4) * 4 + o / 4];
}
#else
/* The LANES sums as one vector, element 4i + j holding output 2j + i. */
static inline vec vec_sums_vector(const vec *v, int count) {
    vec in[8], a[4], b[2];
    for (int o = 0; o < 8; o++) in[o] = o < count ? v[o] : vec_zero();
    for (int p = 0; p < 4; p++) /* 8 -> 4 lanes each: [out 2p | out 2p+1] */
        a[p] = _mm256_add_ps(_mm256_permute2f128_ps(in[2 * p], in[2 * p + 1], 0x20),
                             _mm256_permute2f128_ps(in[2 * p], in[2 * p + 1], 0x31));
    for (int p = 0; p < 2; p++) /* 4 -> 2: 128-bit lane i holds outputs 4p + i and 4p + 2 + i */
        b[p] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* 2 -> 1: element 4i + j is output 2j + i */
    return _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm256_shuffle_ps(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

static inline void vec_sums(const vec *v, int count, float *sums) {
    float out[8];
    _mm256_storeu_ps(out, vec_sums_vector(v, count));
    for (int o = 0; o < count; o++) sums[o] = out[(o % 2) * 4 + o / 2];
}
#endif

/* Asks for the cache lines of [start, start + bytes) ahead of use. The hardware prefetcher follows
 * demand reads, so while a tile computes on weights already in L1 it fetches nothing and memory
 * sits idle; announcing the next weight block here overlaps its reads with this block's FMAs
 * (14-21% off a decoding step of 4-bit weights, 13-24% off verifying 3-16 tokens). The register
 * tiles of most formats spread theirs instead: prefetch_rows. */
static inline void prefetch(const char *start, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(start + offset, _MM_HINT_T0);
}

/* The weights' prefetches: rows far ahead (prefetch_rows: two blocks of rows and more), into L2 but not L1
 * (T1) in the AVX-512 build. Asked into L1 (T0), the lines of the next dozen rows evicted the
 * input rows and the weights in use from a 32 KB L1 (Zen 4); the core's own L1 prefetcher then
 * brings each line the short way from L2. Zen 4 VM, two threads streaming 240-390 MB of 1536 x 8960 layers, GB/s T0 ->
 * T1: Q4_K 17.0-17.2 -> 20.9-21.4 at one input row, Q6_K 17.7 -> 23.1-24.2, Q8_0 24.6 -> 30.4-33.3,
 * Q5_0 17.9-19.1 -> 19.5-19.6, Q4_1 17.0-17.6 -> 18.7-19.9; two and four rows and the 16-bit formats
 * even or faster (BF16 at four rows 1.3x). Attention's and the greedy head's near prefetches keep T0. */
#ifdef FREESPEC_AVX512
#define WEIGHTS_HINT _MM_HINT_T1
#else /* the AVX2 build on the Zen 4 VM: Q4_K and Q4_1 5-7% slower with T1 (Q8_0 1.2x faster); its
       * own machines, with a slower core, were tuned with T0: it stays */
#define WEIGHTS_HINT _MM_HINT_T0
#endif
static inline void prefetch_weights(const char *start, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(start + offset, WEIGHTS_HINT);
}

/* y[j * N + i] = vec_sum(acc[i * cols_max + j]) for the live outputs of a ROWS x cols tile. */
static inline void tile_sums(const vec *acc, int rows, int cols_max, int cols, float *y, int64_t N) {
    const int count = rows * cols_max;
    float sums[count];
    if (rows * cols * 2 < LANES) { /* few live outputs: separate sums are cheaper */
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j++) y[j * N + i] = vec_sum(acc[i * cols_max + j]);
        return;
    }
    if (cols_max == LANES / 4) { /* four weight rows a batched sum, whose element 4j + i is
                                  * y[j * N + r0 + i]: one store a row of four (before: scalar
                                  * copies through an array) */
        for (int r0 = 0; r0 < rows; r0 += 4) {
            const int live = rows - r0 < 4 ? rows - r0 : 4;
            float out[LANES];
            vec_store(out, vec_sums_vector(acc + r0 * cols_max, live * cols_max));
            for (int j = 0; j < cols; j++) {
                if (live == 4) _mm_storeu_ps(y + j * N + r0, _mm_loadu_ps(out + 4 * j));
                else for (int i = 0; i < live; i++) y[j * N + r0 + i] = out[4 * j + i];
            }
        }
        return;
    }
    for (int o = 0; o < count; o += LANES) vec_sums(acc + o, count - o < LANES ? count - o : LANES, sums + o);
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) y[j * N + i] = sums[i * cols_max + j];
}

/* How far ahead: AVX-512 (whose far prefetches go to L2) two blocks of rows, or 4 KB where rows
 * are shorter than 342 bytes; the AVX2 build at least 16 KB (Zen 5's tuning, with T0). On the Zen
 * 4 VM, SmolLM2-135M's decoding step (rows of 360-960 bytes: 12 rows ahead instead of 17-46) with
 * 16 KB against 4 KB, both builds in one process (benchmarks/kernel_ab.py, 30 rounds, the same
 * bits): 1.048x at one token, 1.026x at two, 1.014x at four, 0.99x at eight; Gemma-3-270M and a
 * 1.5B Q4_K_M file within 0.98-1.02x; 32 KB 0.94-0.99x. */
#ifdef FREESPEC_AVX512
#define PREFETCH_BYTES 4096
#else
#define PREFETCH_BYTES 16384
#endif
#define PREFETCH_MIN_ROWS 12 /* two blocks of BUFFER_ROWS */
/* The register tiles of the quantized and 16-bit formats ask for the weights `prefetch_rows`
 * rows below as they reach them (two blocks of six rows, at least PREFETCH_BYTES ahead), spread
 * over the tile's work, where asking for a whole block of rows at its start queued hundreds of
 * requests at once (one per cache line; 13 KB for six rows of 2048 Q8_0 weights) and left memory
 * idle for the rest of the block. Measured on Zen 5, streaming 60 MB of 576-8960 x 1536
 * matrices, one and two threads: Q8_0 1.6-2.3x at M = 1 to 4, Q5_0 1.35-1.5x, Q6_K 1.1-1.3x,
 * Q4_K 1.0-1.08x, packed Q8 1.06-1.7x, F16/BF16 1.1-1.6x at M = 2 to 4; where a tile is bound by
 * its arithmetic and short rows leave it a few requests to hide, the tests cost more than they
 * gave (packed Q4 0.87-0.91x at K = 576, 16-bit formats 0.95x at M = 1): those keep the block's
 * prefetch. A prefetch past the end of a matrix is harmless: prefetches do not fault. */
static inline int64_t prefetch_rows(int64_t row_bytes) {
    const int64_t rows = (PREFETCH_BYTES + row_bytes - 1) / row_bytes;
    return rows > PREFETCH_MIN_ROWS ? rows : PREFETCH_MIN_ROWS;
}

/* One register tile: ROWS weight rows times up to COLS input rows (cols <= COLS live). Weights
 * of another TYPE are widened to fp32 exactly by LOAD (LANES of them) and SCALAR (one). */
#define DEFINE_TILE(ROWS, COLS) DEFINE_LOAD_TILE(tile_##ROWS##x##COLS, ROWS, COLS, float, vec_load, , 0)
/* One column step k of a ROWS x COLS tile: ROWS weight vectors (LOAD widens them to fp32) times
 * the live inputs, into acc[ROWS][COLS]. The whole-row tiles and the chunked ones share it. */
#define TILE_STEP(ROWS, COLS, LOAD, acc, x, w, K, k, cols)                                       \
    do {                                                                                         \
        vec wv[ROWS];                                                                            \
        _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++) wv[i] = LOAD((w) + i * (K) + (k)); \
        _Pragma("GCC unroll 8") for (int j = 0; j < COLS; j++) {                                 \
            if (j < (cols)) {                                                                    \
                const vec xv = vec_load((x) + j * (K) + (k));                                    \
                _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                           \
                    acc[i][j] = vec_fma(wv[i], xv, acc[i][j]);                                   \
            }                                                                                    \
        }                                                                                        \
    } while (0)
/* The K % LANES tail of a tile's outputs y[j * N + i], in order, after its horizontal sums. */
#define TILE_TAIL(ROWS, SCALAR, x, w, y, N, K, kv, cols)                                         \
    for (int64_t k = (kv); k < (K); k++)                                                         \
        for (int i = 0; i < ROWS; i++)                                                           \
            for (int64_t j = 0; j < (cols); j++) (y)[j * (N) + i] += SCALAR((w)[i * (K) + k]) * (x)[j * (K) + k]

#define DEFINE_LOAD_TILE(NAME, ROWS, COLS, TYPE, LOAD, SCALAR, SPREAD)                           \
    static inline void NAME(const float *x, const TYPE *w, float *y, int64_t N, int64_t K,      \
                            int64_t kv, int64_t cols) {                                          \
        vec acc[ROWS][COLS];                                                                     \
        _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                                   \
            _Pragma("GCC unroll 8") for (int j = 0; j < COLS; j++) acc[i][j] = vec_zero();      \
        const int64_t ahead = prefetch_rows(K * (int64_t)sizeof(TYPE));                        \
        for (int64_t k = 0; k < kv; k += LANES) {                                                \
            if (SPREAD && ((k * (int64_t)sizeof(TYPE)) & 63) == 0)                               \
                _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                           \
                    _mm_prefetch((const char *)(w + (i + ahead) * K + k), WEIGHTS_HINT);         \
            TILE_STEP(ROWS, COLS, LOAD, acc, x, w, K, k, cols);                                  \
        }                                                                                        \
        tile_sums(&acc[0][0], ROWS, COLS, cols, y, N);                                           \
        TILE_TAIL(ROWS, SCALAR, x, w, y, N, K, kv, cols);                                        \
    }

/* Blocks [first, end) of ROWS weight rows (of N / ROWS + 1: the last holds the N % ROWS rows
 * left); a thread's share of the work (see linear_then). Output row m starts at y + m * ldy (ldy >= N:
 * a stacked matrix's part writes its columns of a wider y). */
#define DEFINE_LINEAR(ROWS, COLS)                                                                \
    static void linear_##ROWS##x##COLS(const float *x, const float *w, float *y, int64_t M,     \
                                       int64_t N, int64_t K, int64_t ldy, int64_t first, int64_t end) { \
        const int64_t kv = K & ~(int64_t)(LANES - 1);                                            \
        const int64_t blocks = N / ROWS;                                                         \
        for (int64_t b = first; b < end; b++) {                                                  \
            int64_t n = b * ROWS;                                                                \
            if (b + 1 < blocks) prefetch_weights((const char *)(w + (n + ROWS) * K), ROWS * K * (int64_t)sizeof(float)); \
            if (b < blocks) {                                                                    \
                for (int64_t m = 0; m < M; m += COLS)                                            \
                    tile_##ROWS##x##COLS(x + m * K, w + n * K, y + m * ldy + n, ldy, K, kv,      \
                                         M - m < COLS ? M - m : COLS);                           \
            } else {                                                                             \
                for (; n < N; n++)                                                               \
                    for (int64_t m = 0; m < M; m++)                                              \
                        tile_1x1(x + m * K, w + n * K, y + m * ldy + n, ldy, K, kv, 1);          \
            }                                                                                    \
        }                                                                                        \
    }

DEFINE_TILE(1, 1)
#ifdef FREESPEC_AVX512 /* 32 registers: wider tiles */
#define SMALL_ROWS 6
#define SMALL_COLS 4
#define LARGE_ROWS 4
#define LARGE_COLS 6
#define WIDE_COLS 4 /* up to this many input rows, block weights are decoded in registers */
#define ONE_ROWS 6  /* weight rows per register tile for 1, 2, 3 and 4 input rows */
#define TWO_ROWS 6
#define THREE_ROWS 3
#define FOUR_ROWS 3
#define FOUR_ROW_TILES(TILE, ROW_BYTES, ROW_SCALES) \
    else REGISTER_TILES(TILE##_four, FOUR_ROWS, 4, ROW_BYTES, ROW_SCALES);
#else
#define SMALL_ROWS 3 /* 12 accumulators + 3 weights + 1 input: 16 registers (6 x 2 spilled) */
#define SMALL_COLS 4
#define LARGE_ROWS 4
#define LARGE_COLS 3
#define WIDE_COLS 3
#define ONE_ROWS 3
#define TWO_ROWS 2
#define THREE_ROWS 2
#define FOUR_ROW_TILES(TILE, ROW_BYTES, ROW_SCALES) /* four input rows take the buffer */
#endif
#define TILE_NAME(R, C) tile_##R##x##C
#define LINEAR_NAME(R, C) linear_##R##x##C
#define EXPAND(MACRO, R, C) MACRO(R, C)
EXPAND(DEFINE_TILE, SMALL_ROWS, SMALL_COLS)
EXPAND(DEFINE_TILE, LARGE_ROWS, LARGE_COLS)
EXPAND(DEFINE_LINEAR, SMALL_ROWS, SMALL_COLS)
EXPAND(DEFINE_LINEAR, LARGE_ROWS, LARGE_COLS)

/* fp32 weights [N, K] (any K; a GGML F32 matrix is the same layout): SMALL tiles up to
 * F32_SMALL_M input rows, LARGE ones beyond. */
#define F32_SMALL_M 12
static int64_t f32_block_rows(int64_t M) { return M <= F32_SMALL_M ? SMALL_ROWS : LARGE_ROWS; }

static void f32_linear(const Matrix *matrix, const float *x, float *y, int64_t M, int64_t ldy, int64_t first,
                       int64_t end) {
    if (M <= F32_SMALL_M)
        EXPAND(LINEAR_NAME, SMALL_ROWS, SMALL_COLS)(x, matrix->data, y, M, matrix->N, matrix->K, ldy, first, end);
    else
        EXPAND(LINEAR_NAME, LARGE_ROWS, LARGE_COLS)(x, matrix->data, y, M, matrix->N, matrix->K, ldy, first, end);
}

static int64_t f32_row_bytes(const Matrix *matrix) { return matrix->K * (int64_t)sizeof(float); }

static void f32_row(const Matrix *matrix, int64_t r, float *out) {
    memcpy(out, (const float *)matrix->data + r * matrix->K, matrix->K * sizeof(float));
}

/* The same linear layer over weights stored as 4-bit or 8-bit blocks, dequantized in registers.
 *
 * Many models ship quantized (GGUF Q4_1, Q8_0) and are run in fp32 after dequantization, so their
 * fp32 weights are exactly d * q + m (Q4_1) or d * q (Q8_0) per block of 32. Reading the blocks
 * instead of the fp32 values cuts the bytes streamed per forward pass by 4-6x. The products
 * d * q are exact in fp32 (an fp16 scale times a small integer), so fma(d, q, m) rounds once,
 * like the fp32 dequantization did: every register holds exactly the fp32 weight the plain
 * kernel would load, and the FMA sequence per output is the plain kernel's. The results are
 * therefore bit-identical to the fp32 kernel's on the dequantized weights.
 *
 * Q4: nibbles [N, K/2] uint8; per block of 32 weights, byte j holds weights j (low nibble) and
 * 16 + j (high), as in GGUF's Q4_0/Q4_1 blocks. scales [N, K/32, 2]: (d, m) as fp32.
 * Q8: values [N, K] int8; scales [N, K/32]: d as fp32. K must be a multiple of 32.
 * q4_weights / q8_weights return the LANES weights of vector `step` (0 .. STEPS-1) of a block. */

#ifdef FREESPEC_AVX512
static inline vec q4_weights(const uint8_t *nibbles, const float *scales, int64_t block, int step) {
    /* step s holds weights 16s .. 16s+15: the low nibbles of the block's 16 bytes, then their
     * high nibbles. The block's 16 possible weights d * q + m form a table and each lane picks its
     * entry (the permute reads only the index's low 4 bits, so the nibbles need no masking). */
    const __m128i bytes = _mm_loadu_si128((const __m128i *)(nibbles + block * 16));
    const __m128i lanes = step ? _mm_srli_epi16(bytes, 4) : bytes;
    const __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(scales[2 * block]),
                                         _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_ps(scales[2 * block + 1]));
    return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lanes), table);
}

static inline vec q8_weights(const int8_t *values, const float *scales, int64_t block, int step) {
    __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(values + block * 32 + step * 16)));
    return _mm512_mul_ps(_mm512_set1_ps(scales[block]), _mm512_cvtepi32_ps(q));
}
#else
static inline vec q4_weights(const uint8_t *nibbles, const float *scales, int64_t block, int step) {
    __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(nibbles + block * 16 + (step & 1) * 8)));
    q = (step >> 1) ? _mm256_srli_epi32(q, 4) : _mm256_and_si256(q, _mm256_set1_epi32(15));
    return _mm256_fmadd_ps(_mm256_set1_ps(scales[2 * block]), _mm256_cvtepi32_ps(q), _mm256_set1_ps(scales[2 * block + 1]));
}

static inline vec q8_weights(const int8_t *values, const float *scales, int64_t block, int step) {
    __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(values + block * 32 + step * 8)));
    return _mm256_mul_ps(_mm256_set1_ps(scales[block]), _mm256_cvtepi32_ps(q));
}
#endif

/* ROWS weight rows times up to COLS input rows; LOAD(row, scales, block, step) dequantizes. */
#define DEFINE_QUANT_TILE(NAME, ROWS, COLS, TYPE, ROW_BYTES, ROW_SCALES, LOAD, SPREAD)            \
    static inline void NAME(const float *x, const TYPE *q, const float *scales, float *y, int64_t N, \
                            int64_t K, int64_t cols) {                                           \
        vec acc[ROWS][COLS];                                                                     \
        _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                                   \
            _Pragma("GCC unroll 8") for (int j = 0; j < COLS; j++) acc[i][j] = vec_zero();      \
        const int64_t blocks = K / 32;                                                           \
        /* bytes of codes and of scales per block (q4: 16, 8; q8: 32, 4) */                     \
        const int64_t code_step = (ROW_BYTES) * (int64_t)sizeof(TYPE) / blocks;                  \
        const int64_t scale_step = (ROW_SCALES) * (int64_t)sizeof(float) / blocks;               \
        const int64_t ahead = prefetch_rows((ROW_BYTES) * (int64_t)sizeof(TYPE));               \
        for (int64_t block = 0; block < blocks; block++) {                                       \
            const int64_t code_at = block * code_step, scale_at = block * scale_step;            \
            if (SPREAD && (code_at & 63) < code_step) /* the block starts a cache line */       \
                _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                           \
                    _mm_prefetch((const char *)(q + (i + ahead) * (ROW_BYTES)) + code_at, WEIGHTS_HINT); \
            if (SPREAD && (scale_at & 63) < scale_step)                                          \
                _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                           \
                    _mm_prefetch((const char *)(scales + (i + ahead) * (ROW_SCALES)) + scale_at, WEIGHTS_HINT); \
            _Pragma("GCC unroll 4") for (int step = 0; step < STEPS; step++) {                   \
                vec wv[ROWS];                                                                    \
                _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                           \
                    wv[i] = LOAD(q + i * (ROW_BYTES), scales + i * (ROW_SCALES), block, step);   \
                const int64_t k = block * 32 + step * LANES;                                     \
                _Pragma("GCC unroll 8") for (int j = 0; j < COLS; j++) {                         \
                    if (j < cols) {                                                              \
                        vec xv = vec_load(x + j * K + k);                                        \
                        _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                   \
                            acc[i][j] = vec_fma(wv[i], xv, acc[i][j]);                           \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        tile_sums(&acc[0][0], ROWS, COLS, cols, y, N);                                           \
    }

/* Few input rows (M <= WIDE_COLS: decoding, verifying small drafts): decode the block weights in
 * registers, one pass over them, with a tile of exactly M input rows (a column left idle costs
 * its registers: 11% at M = 3) and as many weight rows as the registers hold without spilling.
 * Measured per build on the decoder's matmuls and the Q8_0 lm_head (median forward pass of
 * SmolLM2-135M with 300 cached tokens):
 *   AVX-512 (32 registers): 6 weight rows for M = 1 and 2 (enough independent FMA chains to
 *     hide the FMA latency, and each input load serves six rows: 7% off M = 1, 16% off the
 *     lm_head at M = 2), 3 for M = 3 and 4 (six gained nothing at M = 3).
 *   AVX2 (16 registers): 3 rows for M = 1, 2 for M = 2 and 3 (a 3 x 2 tile spilled and three
 *     rows were buffered: pass + logits 6.3 -> 5.0 ms at M = 2, 7.5 -> 5.8 ms at M = 3); M = 4
 *     is buffered.
 * More rows: dequantize BUFFER_ROWS weight rows into a buffer that stays in L1 and run the plain
 * fp32 tiles on it, so each weight is decoded once per call whatever M is. The few weight rows
 * of a last partial block go one at a time. Every tile computes each output with the same FMA
 * sequence and the same horizontal sum, so the choice of tile never changes a bit. */
#define BUFFER_ROWS 6 /* weight rows per block: a multiple of every tile's rows */
_Static_assert(PREFETCH_MIN_ROWS == 2 * BUFFER_ROWS, "the tiles prefetch two blocks ahead");

/* The SMALL_ROWS x SMALL_COLS tile over k in [k0, k1) only, its accumulators carried in
 * `acc_store` from the chunk before (zeros for the first): an accumulator stored and loaded keeps its bits,
 * so the lanes' FMA sequences are the whole tile's. */
static inline void chunk_tile(const float *x, const float *w, vec *acc_store, int64_t K, int64_t k0, int64_t k1,
                              int first, int64_t cols) {
    vec acc[SMALL_ROWS][SMALL_COLS];
    _Pragma("GCC unroll 8") for (int i = 0; i < SMALL_ROWS; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < SMALL_COLS; j++)
            acc[i][j] = first ? vec_zero() : acc_store[i * SMALL_COLS + j];
    for (int64_t k = k0; k < k1; k += LANES) TILE_STEP(SMALL_ROWS, SMALL_COLS, vec_load, acc, x, w, K, k, cols);
    _Pragma("GCC unroll 8") for (int i = 0; i < SMALL_ROWS; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < SMALL_COLS; j++) acc_store[i * SMALL_COLS + j] = acc[i][j];
}

#define CHUNK_K 512       /* columns per chunk of a long row: 6 weight rows and 4 inputs of it fit L1 */
#define CHUNK_INPUTS 64   /* input rows whose accumulators wait in memory between chunks (24 KB) */
#define CHUNK_MIN_INPUTS 16 /* fewer inputs read each weight row too few times to pay for the waits */
#ifdef FREESPEC_AVX512
#define CHUNK_MIN_K 1024  /* shorter rows fit L1 beside the inputs */
#else
#define CHUNK_MIN_K 4096  /* the 12-accumulator tile's waits cost more: 576 columns -10%, 1536 even, 8960 +15% */
#endif
/* y[m, r] (at y + m * ldy + r) = x[m] . w[r] for the BUFFER_ROWS fp32 rows w [BUFFER_ROWS, K]
 * (decoded weights, or an fp32 matrix's rows) and M input rows, in SMALL_ROWS x SMALL_COLS tiles.
 * With CHUNK_MIN_INPUTS inputs or more, rows longer than CHUNK_MIN_K go in chunks of CHUNK_K
 * columns, every tile of CHUNK_INPUTS input rows taking a chunk before the next: whole rows did
 * not fit L1 beside the inputs from about 1,500 columns on (AVX-512, Q4_1 and Q8_0, 576 x 1536
 * and 1536 x 8960: 1.1-1.4x from 24 to 200 inputs, even at 16, 0.9x at 8). The
 * same FMAs per lane in the same order and the same sums (tile_sums, then the K % LANES tail in
 * order): the bits of the whole-row tiles. */
/* TILE(cols) for each group of SMALL_COLS inputs m in [m0, m1). AVX-512 calls the groups whose
 * inputs are all live with the constant, so that the tiles' per-column tests fold away, and the
 * last partial group on its own: SmolLM2-135M's 232-token prefill, builds alternating, 901-927 ->
 * 1023-1036 tokens/s (1.12x; a loop for the last group instead of one call compiled otherwise and
 * gained nothing). The AVX2 build's 3 x 4 tiles lost 2-3% that way (650 / 644 against 634 / 627
 * tokens/s) and keep one call for all. */
#ifdef FREESPEC_AVX512
#define FOR_INPUT_GROUPS(m, m0, m1, TILE)                                                        \
    do {                                                                                         \
        int64_t m = (m0);                                                                        \
        for (; m + SMALL_COLS <= (m1); m += SMALL_COLS) TILE(SMALL_COLS);                        \
        if (m < (m1)) TILE((m1) - m);                                                            \
    } while (0)
#else
#define FOR_INPUT_GROUPS(m, m0, m1, TILE)                                                        \
    for (int64_t m = (m0); m < (m1); m += SMALL_COLS) TILE((m1) - m < SMALL_COLS ? (m1) - m : SMALL_COLS)
#endif
static void buffered_tiles(const float *x, const float *w, float *y, int64_t ldy, int64_t M, int64_t K) {
    const int64_t kv = K & ~(int64_t)(LANES - 1);
    if (kv <= CHUNK_MIN_K || M < CHUNK_MIN_INPUTS) {
#define WHOLE_ROW_TILE(cols) \
    EXPAND(TILE_NAME, SMALL_ROWS, SMALL_COLS)(x + m * K, w + r * K, y + m * ldy + r, ldy, K, kv, cols)
        for (int64_t r = 0; r < BUFFER_ROWS; r += SMALL_ROWS) FOR_INPUT_GROUPS(m, 0, M, WHOLE_ROW_TILE);
#undef WHOLE_ROW_TILE
        return;
    }
    vec acc[CHUNK_INPUTS / SMALL_COLS][SMALL_ROWS * SMALL_COLS];
    for (int64_t r = 0; r < BUFFER_ROWS; r += SMALL_ROWS)
        for (int64_t m0 = 0; m0 < M; m0 += CHUNK_INPUTS) {
            const int64_t m1 = m0 + CHUNK_INPUTS < M ? m0 + CHUNK_INPUTS : M;
            for (int64_t k0 = 0; k0 < kv; k0 += CHUNK_K) {
                const int64_t k1 = k0 + CHUNK_K < kv ? k0 + CHUNK_K : kv;
#define CHUNK_TILE(cols) chunk_tile(x + m * K, w + r * K, acc[(m - m0) / SMALL_COLS], K, k0, k1, k0 == 0, cols)
                FOR_INPUT_GROUPS(m, m0, m1, CHUNK_TILE);
#undef CHUNK_TILE
            }
            for (int64_t m = m0; m < m1; m += SMALL_COLS) {
                const int64_t cols = m1 - m < SMALL_COLS ? m1 - m : SMALL_COLS;
                float *out = y + m * ldy + r;
                tile_sums(acc[(m - m0) / SMALL_COLS], SMALL_ROWS, SMALL_COLS, cols, out, ldy);
                TILE_TAIL(SMALL_ROWS, , x + m * K, w + r * K, out, ldy, K, kv, cols);
            }
        }
}

#define REGISTER_TILES(TILE, ROWS, M, ROW_BYTES, ROW_SCALES)                                     \
    for (int64_t r = 0; r < BUFFER_ROWS; r += ROWS)                                              \
        TILE(x, block_q + r * (ROW_BYTES), block_scales + r * (ROW_SCALES), y + n + r, ldy, K, M)
/* NAME(matrix, x, y, M, ldy): the linear layer (output row m at y + m * ldy); NAME##_row(matrix,
 * r, out): weight row r as fp32 [K], the same values the tiles multiply. */
#define DEFINE_QUANT_LINEAR(NAME, TILE, TYPE, ROW_BYTES, ROW_SCALES, LOAD, SPREAD)               \
    static void NAME##_decode_row(const TYPE *q, const float *scales, int64_t K, float *out) {  \
        for (int64_t block = 0; block < K / 32; block++)                                         \
            for (int step = 0; step < STEPS; step++)                                             \
                vec_store(out + block * 32 + step * LANES, LOAD(q, scales, block, step));        \
    }                                                                                            \
    static int64_t NAME##_row_bytes(const Matrix *matrix) { /* the codes' (the scales aside) */  \
        const int64_t K = matrix->K;                                                             \
        return (ROW_BYTES) * (int64_t)sizeof(TYPE);                                              \
    }                                                                                            \
    static void NAME##_row(const Matrix *matrix, int64_t r, float *out) {                        \
        const int64_t K = matrix->K;                                                             \
        NAME##_decode_row((const TYPE *)matrix->data + r * (ROW_BYTES), matrix->scales + r * (ROW_SCALES), K, out); \
    }                                                                                            \
    static void NAME(const Matrix *matrix, const float *x, float *y, int64_t M, int64_t ldy,    \
                     int64_t first, int64_t end) {                                               \
        const TYPE *q = matrix->data;                                                            \
        const float *scales = matrix->scales;                                                    \
        const int64_t N = matrix->N, K = matrix->K;                                              \
        const int64_t blocks = N / BUFFER_ROWS, ahead = M <= WIDE_COLS ? 2 : 1;                  \
        for (int64_t b = first; b < end; b++) {                                                  \
            const int64_t n = b * BUFFER_ROWS, rows = b < blocks ? BUFFER_ROWS : N - n;          \
            if (b + ahead < blocks && !(SPREAD && M <= WIDE_COLS)) { /* else the tiles do */     \
                prefetch_weights((const char *)(q + (n + ahead * BUFFER_ROWS) * (ROW_BYTES)),    \
                         BUFFER_ROWS * (ROW_BYTES) * (int64_t)sizeof(TYPE));                     \
                prefetch_weights((const char *)(scales + (n + ahead * BUFFER_ROWS) * (ROW_SCALES)), \
                         BUFFER_ROWS * (ROW_SCALES) * (int64_t)sizeof(float));                   \
            }                                                                                    \
            if (rows < BUFFER_ROWS) {                                                            \
                for (int64_t r = 0; r < rows; r++)                                               \
                    for (int64_t m = 0; m < M; m++)                                              \
                        TILE##_1x1(x + m * K, q + (n + r) * (ROW_BYTES), scales + (n + r) * (ROW_SCALES), \
                                   y + m * ldy + n + r, ldy, K, 1);                              \
                continue;                                                                        \
            }                                                                                    \
            if (M <= WIDE_COLS) {                                                                \
                const TYPE *block_q = q + n * (ROW_BYTES);                                       \
                const float *block_scales = scales + n * (ROW_SCALES);                           \
                if (M == 1) REGISTER_TILES(TILE##_one, ONE_ROWS, 1, ROW_BYTES, ROW_SCALES);      \
                else if (M == 2) REGISTER_TILES(TILE##_two, TWO_ROWS, 2, ROW_BYTES, ROW_SCALES); \
                else if (M == 3) REGISTER_TILES(TILE##_three, THREE_ROWS, 3, ROW_BYTES, ROW_SCALES); \
                FOUR_ROW_TILES(TILE, ROW_BYTES, ROW_SCALES)                                      \
                continue;                                                                        \
            }                                                                                    \
            float w[BUFFER_ROWS * K] __attribute__((aligned(64)));                               \
            for (int64_t r = 0; r < BUFFER_ROWS; r++)                                            \
                NAME##_decode_row(q + (n + r) * (ROW_BYTES), scales + (n + r) * (ROW_SCALES), K, w + r * K); \
            buffered_tiles(x, w, y + n, ldy, M, K);                                              \
        }                                                                                        \
    }

DEFINE_QUANT_TILE(q4_tile_one, ONE_ROWS, 1, uint8_t, K / 2, K / 16, q4_weights, 0)
DEFINE_QUANT_TILE(q4_tile_two, TWO_ROWS, 2, uint8_t, K / 2, K / 16, q4_weights, 0)
DEFINE_QUANT_TILE(q4_tile_three, THREE_ROWS, 3, uint8_t, K / 2, K / 16, q4_weights, 0)
DEFINE_QUANT_TILE(q4_tile_1x1, 1, 1, uint8_t, K / 2, K / 16, q4_weights, 0)
DEFINE_QUANT_TILE(q8_tile_one, ONE_ROWS, 1, int8_t, K, K / 32, q8_weights, 1)
DEFINE_QUANT_TILE(q8_tile_two, TWO_ROWS, 2, int8_t, K, K / 32, q8_weights, 1)
DEFINE_QUANT_TILE(q8_tile_three, THREE_ROWS, 3, int8_t, K, K / 32, q8_weights, 1)
DEFINE_QUANT_TILE(q8_tile_1x1, 1, 1, int8_t, K, K / 32, q8_weights, 1)
#ifdef FREESPEC_AVX512 /* four input rows in registers */
DEFINE_QUANT_TILE(q4_tile_four, FOUR_ROWS, 4, uint8_t, K / 2, K / 16, q4_weights, 0)
DEFINE_QUANT_TILE(q8_tile_four, FOUR_ROWS, 4, int8_t, K, K / 32, q8_weights, 1)
#endif
DEFINE_QUANT_LINEAR(packed_q4_linear, q4_tile, uint8_t, K / 2, K / 16, q4_weights, 0)
DEFINE_QUANT_LINEAR(packed_q8_linear, q8_tile, int8_t, K, K / 32, q8_weights, 1)

/* GGUF/safetensors tensors read in their own layout (Q4_0 .. Q6_K, F16, BF16): formats.h */
#include "formats.h"

/* ---------------------------------------------------------------------------------------------
 * Any weight matrix (freespec.h's Matrix): what each kind does, in one table.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    /* y[m * ldy + j] = x[m] . row j, for m < M and the rows j of blocks [first, end) */
    void (*linear)(const Matrix *matrix, const float *x, float *y, int64_t M, int64_t ldy, int64_t first,
                   int64_t end);
    /* the rows of a block for M input rows: `linear` splits N rows into N / block_rows + 1 blocks,
     * the last holding the N % block_rows rows left */
    int64_t (*block_rows)(int64_t M);
    /* the bytes of one row (a packed kind's codes; its scales aside) */
    int64_t (*row_bytes)(const Matrix *matrix);
    /* out[K] = row r as fp32 */
    void (*row)(const Matrix *matrix, int64_t r, float *out);
} KindOps;

static int64_t buffer_rows(int64_t M) { /* the block formats', whatever M */
    (void)M;
    return BUFFER_ROWS;
}

static void stacked_row(const Matrix *matrix, int64_t r, float *out);

/* The operations of a kind, or NULL for a kind the kernels do not read. */
static const KindOps *kind_ops(int64_t kind) {
#define BLOCK_KIND(NAME) {NAME##_linear, buffer_rows, NAME##_linear_row_bytes, NAME##_linear_row}
    static const KindOps f32 = {f32_linear, f32_block_rows, f32_row_bytes, f32_row}, f16 = BLOCK_KIND(f16),
                         bf16 = BLOCK_KIND(bf16),
                         q4_0 = BLOCK_KIND(q4_0), q4_1 = BLOCK_KIND(q4_1), q5_0 = BLOCK_KIND(q5_0),
                         q5_1 = BLOCK_KIND(q5_1), q8_0 = BLOCK_KIND(q8_0), q4_k = BLOCK_KIND(q4_k),
                         q5_k = BLOCK_KIND(q5_k), q6_k = BLOCK_KIND(q6_k), q2_k = BLOCK_KIND(q2_k),
                         q3_k = BLOCK_KIND(q3_k), iq4_nl = BLOCK_KIND(iq4_nl), iq4_xs = BLOCK_KIND(iq4_xs),
                         iq3_xxs = BLOCK_KIND(iq3_xxs), iq3_s = BLOCK_KIND(iq3_s), iq2_xxs = BLOCK_KIND(iq2_xxs),
                         iq2_xs = BLOCK_KIND(iq2_xs), iq2_s = BLOCK_KIND(iq2_s), iq1_s = BLOCK_KIND(iq1_s),
                         iq1_m = BLOCK_KIND(iq1_m), tq1_0 = BLOCK_KIND(tq1_0), tq2_0 = BLOCK_KIND(tq2_0),
                         packed_q4 = BLOCK_KIND(packed_q4),
                         packed_q8 = BLOCK_KIND(packed_q8),
                         stacked = {NULL, NULL, NULL, stacked_row}; /* its parts' linears run as one: linear_then */
#undef BLOCK_KIND
    switch (kind) {
    case GGML_F32: return &f32;
    case GGML_F16: return &f16;
    case GGML_BF16: return &bf16;
    case GGML_Q4_0: return &q4_0;
    case GGML_Q4_1: return &q4_1;
    case GGML_Q5_0: return &q5_0;
    case GGML_Q5_1: return &q5_1;
    case GGML_Q8_0: return &q8_0;
    case GGML_Q4_K: return &q4_k;
    case GGML_Q5_K: return &q5_k;
    case GGML_Q6_K: return &q6_k;
    case GGML_Q2_K: return &q2_k;
    case GGML_Q3_K: return &q3_k;
    case GGML_IQ4_NL: return &iq4_nl;
    case GGML_IQ4_XS: return &iq4_xs;
    case GGML_IQ3_XXS: return &iq3_xxs;
    case GGML_IQ3_S: return &iq3_s;
    case GGML_IQ2_XXS: return &iq2_xxs;
    case GGML_IQ2_XS: return &iq2_xs;
    case GGML_IQ2_S: return &iq2_s;
    case GGML_IQ1_S: return &iq1_s;
    case GGML_IQ1_M: return &iq1_m;
    case GGML_TQ1_0: return &tq1_0;
    case GGML_TQ2_0: return &tq2_0;
    case FREESPEC_PACKED_Q4: return &packed_q4;
    case FREESPEC_PACKED_Q8: return &packed_q8;
    case FREESPEC_STACKED: return &stacked;
    default: return NULL;
    }
}

static void stacked_row(const Matrix *matrix, int64_t r, float *out) {
    int64_t p = 0;
    for (; r >= matrix->parts[p].N; p++) r -= matrix->parts[p].N;
    kind_ops(matrix->parts[p].kind)->row(matrix->parts + p, r, out);
}

/* Whether the kernels read this matrix: a known kind, and for a stacked one, known unstacked
 * parts with its K whose rows add up to its N. (Sizes and pointers are the caller's to check.) */
static int matrix_ok(const Matrix *matrix) {
    if (!kind_ops(matrix->kind)) return 0;
    if (matrix->kind != FREESPEC_STACKED) return 1;
    if (!matrix->parts || matrix->num_parts < 1) return 0;
    int64_t rows = 0;
    for (int64_t p = 0; p < matrix->num_parts; p++) {
        const Matrix *part = matrix->parts + p;
        if (part->kind == FREESPEC_STACKED || !kind_ops(part->kind) || part->K != matrix->K || part->bias) return 0;
        rows += part->N;
    }
    return rows == matrix->N;
}

/* w's parts: a stacked matrix's, or w itself as its one part. */
static inline const Matrix *parts_of(const Matrix *w) { return w->kind == FREESPEC_STACKED ? w->parts : w; }
static inline int64_t part_count(const Matrix *w) { return w->kind == FREESPEC_STACKED ? w->num_parts : 1; }

/* Where each part's blocks start in the whole, for M input rows: part p's blocks are
 * [starts[p], starts[p + 1]) (starts: part_count(w) + 1 entries). */
static void block_starts(const Matrix *w, int64_t M, int64_t *starts) {
    const Matrix *parts = parts_of(w);
    starts[0] = 0;
    for (int64_t p = 0; p < part_count(w); p++)
        starts[p + 1] = starts[p] + parts[p].N / kind_ops(parts[p].kind)->block_rows(M) + 1;
}

/* Asks for the first rows of thread t's run of w (as linear_then splits it for M inputs): the
 * rows a tile reaches before its own prefetching, PREFETCH_MIN_ROWS ahead, has any in flight. */
static void prefetch_run(const Matrix *w, int64_t M, int64_t t, int64_t threads) {
    const Matrix *parts = parts_of(w);
    const int64_t count = part_count(w);
    int64_t starts[count + 1];
    block_starts(w, M, starts);
    const int64_t first = starts[count] * t / threads;
    int64_t p = 0;
    while (p + 1 < count && starts[p + 1] <= first) p++;
    const Matrix *part = parts + p;
    const KindOps *ops = kind_ops(part->kind);
    const int64_t row = (first - starts[p]) * ops->block_rows(M), bytes = ops->row_bytes(part);
    const int64_t rows = part->N - row < PREFETCH_MIN_ROWS ? part->N - row : PREFETCH_MIN_ROWS;
    if (rows > 0) prefetch_weights((const char *)part->data + row * bytes, rows * bytes);
}

#define STEAL_MIN_BLOCKS 2 /* the smallest chunk of a run a thread takes (see linear_then) */
/* A thread's run of a matrix's blocks, [next, end): taken a chunk at a time by its owner, then by
 * threads done with their own (each run on its own cache line). */
typedef struct {
    _Alignas(64) int64_t next;
    int64_t end;
} Run;

/* Blocks [lo, hi) of w's parts (the whole's numbering), side by side in y. */
static inline void linear_blocks(const Matrix *w, const int64_t *starts, const float *x, float *y, int64_t M,
                                 int64_t lo, int64_t hi) {
    const Matrix *parts = parts_of(w);
    for (int64_t p = 0, column = 0; p < part_count(w); column += parts[p++].N) {
        const int64_t a = lo > starts[p] ? lo : starts[p], b = hi < starts[p + 1] ? hi : starts[p + 1];
        if (a < b) kind_ops(parts[p].kind)->linear(parts + p, x, y + column, M, w->N, a - starts[p], b - starts[p]);
    }
}

/* y[M, N] = x @ w^T + bias, every kind's linear layer behind one call (see freespec.h); then, when
 * `next` is the matrix the pass multiplies next, each thread asks for the start of its run of it.
 *
 * One parallel region splits the blocks of rows of all of w's parts (a stacked matrix's, side by
 * side in y: each output has the arithmetic of its part alone, so the bits of one matrix of all
 * the rows) into one contiguous run per thread, in order, as a static schedule would. A region
 * per part cost SmolLM2-135M's decoding step 5% (q, k and v of 576, 192 and 192 rows: each call
 * starts cold and waits for its slower thread); the next matrix's first rows, asked for while
 * the other thread finishes (and attention runs), take another 3% off. A thread takes its run a
 * chunk at a time (a quarter of what is left, at least STEAL_MIN_BLOCKS blocks) and, done with
 * it, takes chunks of the others' runs: on a 2-core Xeon VM the threads of an even split waited
 * for each other a sixth of a decoding step (perf: 18% of the samples in libgomp's spin), and
 * taking over the slower one's last chunks made SmolLM2-135M's plain decoding 1.05x as fast
 * (AVX2 build 1.03-1.04x, a 232-token prefill 1.03x, 0.5B Q4_K_M 1.0-1.04x). Which thread
 * computes a row never changes its bits. */
static void linear_then(const Matrix *w, const float *x, float *y, int64_t M, const Matrix *next) {
    const int64_t count = part_count(w);
    int64_t starts[count + 1];
    block_starts(w, M, starts);
    const int64_t total = starts[count], threads = omp_get_max_threads();
    Run runs[threads];
    for (int64_t t = 0; t < threads; t++) runs[t].next = total * t / threads, runs[t].end = total * (t + 1) / threads;
    #pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
        for (int64_t v = 0; v < threads; v++) {
            Run *run = runs + (t + v) % threads;
            for (;;) {
                const int64_t left = run->end - __atomic_load_n(&run->next, __ATOMIC_RELAXED);
                const int64_t size = left / 4 > STEAL_MIN_BLOCKS ? left / 4 : STEAL_MIN_BLOCKS;
                const int64_t lo = __atomic_fetch_add(&run->next, size, __ATOMIC_RELAXED);
                if (lo >= run->end) break;
                linear_blocks(w, starts, x, y, M, lo, lo + size < run->end ? lo + size : run->end);
            }
        }
        if (next) prefetch_run(next, M, t, team);
    }
    if (w->bias)
        for (int64_t r = 0; r < M; r++)
            for (int64_t j = 0; j < w->N; j++) y[r * w->N + j] += w->bias[j];
}

static void linear(const Matrix *w, const float *x, float *y, int64_t M) { linear_then(w, x, y, M, NULL); }

int freespec_linear(const Matrix *w, const float *x, float *y, int64_t M) {
    if (!matrix_ok(w)) return FREESPEC_BAD_MATRIX;
    if (M > 0) linear(w, x, y, M);
    return FREESPEC_OK;
}

int freespec_rows(const Matrix *w, const int64_t *tokens, int64_t n, float *out) {
    if (!matrix_ok(w)) return FREESPEC_BAD_MATRIX;
    const KindOps *ops = kind_ops(w->kind);
    for (int64_t i = 0; i < n; i++) ops->row(w, tokens[i], out + i * w->K);
    return FREESPEC_OK;
}

/* exp(x) for x <= 0 (Cephes-style range reduction and polynomial, ~2 ulp), on the W-bit vectors
 * of the intrinsics with prefix P: exp_nonpositive (8 lanes: attention's softmax) and
 * vec_exp_nonpositive on a build's vec (top_k's normalizer, which needs no bit promise across
 * builds; with AVX-512, 16 lanes).
 * Elementwise, so a value's result never depends on its neighbours. */
#define DEFINE_EXP_NONPOSITIVE(NAME, P, W, FLOOR)                                                         \
    static inline __m##W NAME(__m##W x) {                                                                \
        x = P##max_ps(x, P##set1_ps(-87.3f));                                                            \
        __m##W fx = FLOOR(P##fmadd_ps(x, P##set1_ps(1.44269504088896341f), P##set1_ps(0.5f)));            \
        x = P##fnmadd_ps(fx, P##set1_ps(0.693359375f), x);                                               \
        x = P##fnmadd_ps(fx, P##set1_ps(-2.12194440e-4f), x);                                            \
        __m##W y = P##set1_ps(1.9875691500e-4f);                                                         \
        y = P##fmadd_ps(y, x, P##set1_ps(1.3981999507e-3f));                                             \
        y = P##fmadd_ps(y, x, P##set1_ps(8.3334519073e-3f));                                             \
        y = P##fmadd_ps(y, x, P##set1_ps(4.1665795894e-2f));                                             \
        y = P##fmadd_ps(y, x, P##set1_ps(1.6666665459e-1f));                                             \
        y = P##fmadd_ps(y, x, P##set1_ps(5.0000001201e-1f));                                             \
        y = P##fmadd_ps(y, P##mul_ps(x, x), P##add_ps(x, P##set1_ps(1.0f)));                             \
        __m##W##i exponent = P##slli_epi32(P##add_epi32(P##cvtps_epi32(fx), P##set1_epi32(127)), 23);      \
        return P##mul_ps(y, P##castsi##W##_ps(exponent));                                                \
    }
DEFINE_EXP_NONPOSITIVE(exp_nonpositive, _mm256_, 256, _mm256_floor_ps)
#ifdef FREESPEC_AVX512
#define FLOOR16(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
DEFINE_EXP_NONPOSITIVE(vec_exp_nonpositive, _mm512_, 512, FLOOR16)
#else
#define vec_exp_nonpositive exp_nonpositive
#endif

/* p[c] = scale * (vec_sum(acc[c]) + the D % LANES tail of rows[c] . query), for c < count. */
static inline void finish_scores(const vec *acc, const float *const *rows, int count, const float *query,
                                 int64_t dv, int64_t D, float scale, float *p) {
    float sums[LANES];
    vec_sums(acc, count, sums);
    for (int c = 0; c < count; c++) {
        float sum = sums[c];
        for (int64_t d = dv; d < D; d++) sum += rows[c][d] * query[d];
        p[c] = sum * scale;
    }
}

/* p[c] = scale * (query . rows[c]) for c < count, each dot product computed exactly as
 * the fp32 linear kernel computes it (LANES-wide FMAs over D, vec_sum, then the D % LANES tail);
 * LANES rows at a time share one batched horizontal sum. */
static void row_scores(const float *query, const float *const *rows, int64_t count, int64_t D, float scale,
                       float *p) {
    const int64_t dv = D & ~(int64_t)(LANES - 1);
    for (int64_t c0 = 0; c0 < count; c0 += LANES) {
        const int live = count - c0 < LANES ? (int)(count - c0) : LANES;
        vec acc[LANES];
        for (int c = 0; c < live; c++) acc[c] = vec_zero();
        for (int64_t d = 0; d < dv; d += LANES) {
            const vec qv = vec_load(query + d);
            for (int c = 0; c < live; c++) acc[c] = vec_fma(vec_load(rows[c0 + c] + d), qv, acc[c]);
        }
        finish_scores(acc, rows + c0, live, query, dv, D, scale, p + c0);
    }
}

/* p[t] = exp(p[t] - max(p)) in place for t < total, summed lane-wise by logical index (the tail
 * zero-padded), so the sum depends only on the values and their logical order. Returns 1 / sum. */
static float softmax_unnormalized(float *p, int64_t total) {
    __m256 top_lanes = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= total; t += 8) top_lanes = _mm256_max_ps(top_lanes, _mm256_loadu_ps(p + t));
    float lane_tops[8], top = -INFINITY;
    _mm256_storeu_ps(lane_tops, top_lanes);
    for (int k = 0; k < 8; k++) top = lane_tops[k] > top ? lane_tops[k] : top;
    for (; t < total; t++) top = p[t] > top ? p[t] : top;
    const __m256 top_v = _mm256_set1_ps(top);
    __m256 lanes = _mm256_setzero_ps();
    for (t = 0; t + 8 <= total; t += 8) {
        __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + t), top_v));
        _mm256_storeu_ps(p + t, e);
        lanes = _mm256_add_ps(lanes, e);
    }
    if (t < total) {
        float padded[8] = {0};
        for (int64_t j = t; j < total; j++) padded[j - t] = p[j] - top;
        __m256 e = exp_nonpositive(_mm256_loadu_ps(padded));
        e = _mm256_blendv_ps(e, _mm256_setzero_ps(),
                             _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_ps((float)(total - t)), _CMP_GE_OQ));
        _mm256_storeu_ps(padded, e);
        for (int64_t j = t; j < total; j++) p[j] = padded[j - t];
        lanes = _mm256_add_ps(lanes, e);
    }
    return 1.0f / horizontal_sum(lanes);
}

/* Tree attention whose result depends only on the *logical* key sequence of each query.
 *
 * Query i attends to cache rows [0, past) and then to the new rows past + key_nodes[i, 0..count[i]):
 * its ancestors in depth order, then itself. Plain decoding sees the same keys in the same
 * order at other cache rows, so every reduction below runs identically in both modes: scores
 * are the batch-invariant linear kernel's dot products; the softmax and P·V run over the
 * logical sequence.
 *
 * A sliding window (a layer of Gemma, Mistral, Phi-3) shortens that sequence at its start: a
 * key at position p is visible to a query at position q iff q - p < window (transformers'
 * sliding-window mask). Committed row t holds position t; new token j holds positions[j]. So
 * query i reads the cache rows from max(0, positions[i] - window + 1) on and the tree rows
 * within the window; rows before the window are never read. The logical sequence (and so the
 * softmax's lane-wise sums, which run from the first visible key) is the same in every mode.
 *
 * Every query of a KV head reads the same `past` committed keys and values, so those are read
 * once for all of them: the prefix scores come from the linear kernel's tiles (keys as weight
 * rows, queries as inputs), and P·V walks the value rows once per block of queries. Only the
 * few tree rows are visited per query. Results are bit-identical to one query at a time.
 *
 * `causal` says the new rows form a chain (key_nodes[i] = 0..i, as in a prefill chunk). From
 * CAUSAL_ROWS rows on, they then join the shared prefix, since each query's logical sequence is
 * cache rows [first, past + i]: query i takes tile scores and shared P·V passes up to its own row
 * instead of visiting up to n rows one at a time (the same dot products, sums and order, so
 * the same bits; a 1,500-token prefill 12% faster). Work then grows with i, so key blocks are
 * taken in an order that splits it evenly and query blocks are dealt out round-robin.
 *
 * q: [KV, n * group, D] (query heads grouped by their KV head: row i * group + h % group);
 * keys/values: [KV, capacity, D] of one layer; out: [n, H, D];
 * probs: [KV, n * group, past + n] floats of scratch.
 */
/* Score tiles: 4 keys x LANES / 4 queries, whose outputs fill one batched horizontal sum and
 * leave each query's four scores side by side (tile_sums stores them at once), where the linear
 * kernel's 6 x 4 tile left a third of its second sum empty; with D = 64 a tile does only four
 * FMA steps, so its sums weigh as much as its FMAs. */
#define SCORE_KEYS 4
#ifdef FREESPEC_AVX512
#define SCORE_QUERIES 4
#else
#define SCORE_QUERIES 2
#endif
EXPAND(DEFINE_TILE, SCORE_KEYS, SCORE_QUERIES)
#define PV_ROWS (LANES == 16 ? 6 : 3) /* queries sharing a P·V pass: 6 x 64 / LANES accumulators */
#define CAUSAL_ROWS 32 /* causal chains of at least this many new rows (prefill chunks) take the causal
                        * path; verifying a few tokens keeps the tree path, whose prefix is read in order */

/* One call's arguments, shared by its blocks of work (see freespec_window_attention). */
typedef struct {
    const float *q, *keys, *values;
    const int64_t *key_nodes, *count, *positions;
    int64_t capacity, past, n, H, D, group, rows, width, window;
    float scale, softcap;
    int causal;
    float *out, *probs;
} AttentionCall;

/* The first cache row query i reads: the window's start, at most its last shared row. */
static inline int64_t first_row(const AttentionCall *a, int64_t i) {
    const int64_t seen = a->causal ? a->past + i + 1 : a->past;
    const int64_t first = a->window > 0 ? a->positions[i] - a->window + 1 : 0;
    return first < 0 ? 0 : first > seen ? seen : first;
}

/* Whether query i sees new token `node` (one of its key_nodes) inside the window. */
static inline int tree_visible(const AttentionCall *a, int64_t i, int64_t node) {
    return a->window <= 0 || a->positions[i] - a->positions[node] < a->window;
}

/* Raw scores of the key block [t0, t0 + SCORE_KEYS) of KV head g (clipped to `shared` rows) for
 * every query that sees it: with causal rows, only queries i >= t0 - past see row t0, and with a
 * window only those whose window starts before the block ends. */
static inline void block_scores(const AttentionCall *a, int64_t g, int64_t t0, int64_t shared) {
    const int64_t D = a->D, rows = a->rows, width = a->width, group = a->group, past = a->past;
    const int64_t dv = D & ~(int64_t)(LANES - 1);
    const int64_t first = t0 > past ? (t0 - past) * group : 0; /* earlier queries end before t0 */
    int64_t end = rows;
    if (a->causal && a->window > 0) { /* query i's window starts at past + i - window + 1 */
        const int64_t tokens = t0 + SCORE_KEYS + a->window - 1 - past;
        end = tokens < 0 ? 0 : tokens * group < rows ? tokens * group : rows;
    }
    const float *head_queries = a->q + g * rows * D, *head_keys = a->keys + (g * a->capacity + t0) * D;
    float *head_probs = a->probs + g * rows * width + t0;
    if (t0 + 5 * SCORE_KEYS <= shared) /* cache rows come from memory: ask 4 blocks ahead */
        prefetch((const char *)(head_keys + 4 * SCORE_KEYS * D), SCORE_KEYS * D * (int64_t)sizeof(float));
    if (t0 + SCORE_KEYS <= shared) {
        for (int64_t j = first; j < end; j += SCORE_QUERIES)
            EXPAND(TILE_NAME, SCORE_KEYS, SCORE_QUERIES)(head_queries + j * D, head_keys, head_probs + j * width, width,
                                                      D, dv, end - j < SCORE_QUERIES ? end - j : SCORE_QUERIES);
    } else {
        for (int64_t t = 0; t < shared - t0; t++)
            for (int64_t j = first; j < end; j++)
                tile_1x1(head_queries + j * D, head_keys + t * D, head_probs + j * width + t, width, D, dv, 1);
    }
}

/* Softmax and P·V for the queries j0 .. j0 + live - 1 (live <= PV_ROWS) of KV head g. Query j
 * (token i = j / group) reads shared rows [start, seen): seen is past, or past + i + 1 when
 * causal; its visible tree rows beyond them get their scores here, one at a time. */
static inline void block_attend(const AttentionCall *a, int64_t g, int64_t j0, int64_t live) {
    const int64_t D = a->D, n = a->n, past = a->past, rows = a->rows, width = a->width, group = a->group;
    const float *v_head = a->values + g * a->capacity * D;
    float inverse[PV_ROWS];
    int64_t start[PV_ROWS], seen[PV_ROWS], earliest = INT64_MAX, longest = 0;
    for (int64_t r = 0; r < live; r++) {
        const int64_t j = j0 + r, i = j / group;
        float *p = a->probs + (g * rows + j) * width;
        seen[r] = a->causal ? past + i + 1 : past;
        start[r] = first_row(a, i);
        earliest = start[r] < earliest ? start[r] : earliest;
        longest = seen[r] > longest ? seen[r] : longest;
        int64_t t = start[r];
        for (; t + LANES <= seen[r]; t += LANES) vec_store(p + t, vec_mul(vec_load(p + t), vec_set1(a->scale)));
        for (; t < seen[r]; t++) p[t] *= a->scale;
        const int64_t candidates = a->causal ? 0 : a->count[i]; /* causal: every key is a shared row */
        const float *tree_rows[candidates > 0 ? candidates : 1];
        int64_t own = 0;
        for (int64_t c = 0; c < candidates; c++) {
            const int64_t node = a->key_nodes[i * n + c];
            if (tree_visible(a, i, node)) tree_rows[own++] = a->keys + (g * a->capacity + past + node) * D;
        }
        row_scores(a->q + (g * rows + j) * D, tree_rows, own, D, a->scale, p + seen[r]);
        if (a->softcap > 0) /* Gemma 2: scores become softcap * tanh(score / softcap) */
            for (t = start[r]; t < seen[r] + own; t++) p[t] = a->softcap * tanhf(p[t] / a->softcap);
        inverse[r] = softmax_unnormalized(p + start[r], seen[r] + own - start[r]);
    }
    /* out = sum_t p_t v_t in logical order (shared rows, then tree rows), then normalise */
    if (D == 64 || (D % 64 == 0 && live > 1)) {
        /* the common head sizes (64, 128, 256): accumulate in registers, 64 columns at a time
         * (each output is its own chain over the keys: the same bits); for a wider head and a
         * single query the loop below is faster (D = 256: its 64-column passes 0.8x) */
        const float *row_probs[PV_ROWS];
        int64_t common_start = earliest, common_end = longest; /* rows every query reads */
        for (int64_t r = 0; r < live; r++) {
            row_probs[r] = a->probs + (g * rows + j0 + r) * width;
            common_start = start[r] > common_start ? start[r] : common_start;
            common_end = seen[r] < common_end ? seen[r] : common_end;
        }
        if (common_start > common_end) common_start = common_end = longest;
        for (int64_t column = 0; column < D; column += 64) {
            vec acc[PV_ROWS][64 / LANES];
            for (int64_t r = 0; r < live; r++)
                for (int d = 0; d < 64 / LANES; d++) acc[r][d] = vec_zero();
            /* each query's FMAs run over t in order whichever loop takes t: the rows all live
             * queries read without a test per query, the others with one; the number of live
             * queries is a constant of each loop (a decoding step's three queries a KV head had
             * run the tested loop over every row, six queries' tests each) */
#define PV_STEP(t, ROWS, CHECK)                                                                               \
    do {                                                                                                      \
        const float *v = v_head + (t) * D + column;                                                           \
        if ((t) + 16 < longest) prefetch((const char *)(v + 16 * D), 64 * sizeof(float)); /* 16 rows ahead */ \
        vec value[64 / LANES];                                                                                \
        for (int d = 0; d < 64 / LANES; d++) value[d] = vec_load(v + LANES * d);                              \
        _Pragma("GCC unroll 6") for (int r = 0; r < (ROWS); r++) {                                            \
            if (!(CHECK) || (start[r] <= (t) && (t) < seen[r])) {                                             \
                const vec pv = vec_set1(row_probs[r][t]);                                                     \
                for (int d = 0; d < 64 / LANES; d++) acc[r][d] = vec_fma(pv, value[d], acc[r][d]);            \
            }                                                                                                 \
        }                                                                                                     \
    } while (0)
#define PV_KEYS(ROWS)                                                                                         \
    do {                                                                                                      \
        for (int64_t t = earliest; t < common_start; t++) PV_STEP(t, ROWS, 1);                                \
        for (int64_t t = common_start; t < common_end; t++) PV_STEP(t, ROWS, 0);                              \
        for (int64_t t = common_end; t < longest; t++) PV_STEP(t, ROWS, 1);                                   \
    } while (0)
            switch (live) {
            case 1: PV_KEYS(1); break;
            case 2: PV_KEYS(2); break;
#ifdef FREESPEC_AVX512 /* PV_ROWS 6 */
            case 3: PV_KEYS(3); break;
            case 4: PV_KEYS(4); break;
            case 5: PV_KEYS(5); break;
#endif
            default: PV_KEYS(PV_ROWS);
            }
#undef PV_KEYS
#undef PV_STEP
            for (int64_t r = 0; r < live; r++) {
                const int64_t j = j0 + r, i = j / group;
                const float *p = a->probs + (g * rows + j) * width + seen[r];
                for (int64_t c = 0, own = 0; c < (a->causal ? 0 : a->count[i]); c++) {
                    const int64_t node = a->key_nodes[i * n + c];
                    if (!tree_visible(a, i, node)) continue;
                    const vec pv = vec_set1(p[own++]);
                    const float *v = v_head + (past + node) * D + column;
                    for (int d = 0; d < 64 / LANES; d++) acc[r][d] = vec_fma(pv, vec_load(v + LANES * d), acc[r][d]);
                }
                float *o = a->out + (i * a->H + g * group + j % group) * D + column;
                const vec inverse_v = vec_set1(inverse[r]);
                for (int d = 0; d < 64 / LANES; d++) vec_store(o + LANES * d, vec_mul(acc[r][d], inverse_v));
            }
        }
    } else {
        for (int64_t r = 0; r < live; r++) {
            const int64_t j = j0 + r, i = j / group;
            const float *p = a->probs + (g * rows + j) * width;
            float *o = a->out + (i * a->H + g * group + j % group) * D;
            for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            for (int64_t t = start[r], c = 0, own = 0; t < seen[r] || c < (a->causal ? 0 : a->count[i]); ) {
                float pt;
                const float *v;
                if (t < seen[r]) { /* shared rows, then the visible tree rows */
                    pt = p[t], v = v_head + t * D, t++;
                } else {
                    const int64_t node = a->key_nodes[i * n + c++];
                    if (!tree_visible(a, i, node)) continue;
                    pt = p[seen[r] + own++], v = v_head + (past + node) * D;
                }
                const __m256 pv = _mm256_set1_ps(pt);
                int64_t d = 0;
                for (; d + 8 <= D; d += 8)
                    _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + d), _mm256_loadu_ps(o + d)));
                for (; d < D; d++) o[d] += pt * v[d];
            }
            for (int64_t d = 0; d < D; d++) o[d] *= inverse[r];
        }
    }
}

int64_t freespec_tree_layout(const uint8_t *tree_mask, int64_t n, int64_t *key_nodes, int64_t *count) {
    int64_t causal = 1;
    for (int64_t i = 0; i < n; i++) {
        count[i] = 0;
        for (int64_t j = 0; j < n; j++)
            if (tree_mask[i * n + j]) key_nodes[i * n + count[i]++] = j;
        for (int64_t j = count[i]; j < n; j++) key_nodes[i * n + j] = n;
        causal = causal && count[i] == i + 1 && key_nodes[i * n + i] == i; /* sees exactly 0..i */
    }
    return causal;
}

void freespec_window_attention(const float *q, const float *keys, const float *values, int64_t capacity,
                               const int64_t *key_nodes, const int64_t *count, int64_t past, int64_t n, int64_t H,
                               int64_t KV, int64_t D, float scale, int64_t causal, const int64_t *positions,
                               int64_t window, float softcap, float *out, float *probs) {
    window = positions ? window : 0;
    causal = causal && n >= CAUSAL_ROWS;
    for (int64_t i = 0; causal && window > 0 && i < n; i++) /* chain rows join the prefix: rows are positions */
        causal = positions[i] == past + i;
    const int64_t group = H / KV, rows = n * group, shared = causal ? past + n : past;
    const AttentionCall call = {q, keys, values, key_nodes, count, positions, capacity, past, n, H, D, group, rows,
                                past + n, window, scale, softcap, (int)causal, out, probs};
    const AttentionCall *a = &call;
    int64_t start = shared; /* the first shared row any query reads: none before it is read */
    for (int64_t i = 0; i < n; i++) {
        const int64_t first = first_row(a, i);
        start = first < start ? first : start;
    }
    const int64_t key_blocks = (shared - start + SCORE_KEYS - 1) / SCORE_KEYS;
    /* queries per P·V task: up to PV_ROWS, fewer when that leaves under one task a thread (each
     * task reads its head's value rows: a decoding step's three queries a head in two tasks read
     * them twice, t(1) at 3,000 cached rows 9.7 against 8.9 ms) */
    const int64_t threads = omp_get_max_threads();
    int64_t per_task = KV * rows / threads;
    per_task = per_task < 1 ? 1 : per_task > PV_ROWS ? PV_ROWS : per_task;
    const int64_t query_blocks = (rows + per_task - 1) / per_task;
#define SCORES(item, block) block_scores(a, (item) / key_blocks, start + (block) * SCORE_KEYS, shared)
#define ATTEND(task)                                                                                           \
    do {                                                                                                       \
        const int64_t j0 = ((task) % query_blocks) * per_task;                                                 \
        block_attend(a, (task) / query_blocks, j0, rows - j0 < per_task ? rows - j0 : per_task);               \
    } while (0)
    #pragma omp parallel
    {
        /* phase 1: probs[g, j, t] = q[g, j] . keys[g, t] for the shared rows t; phase 2: tree
         * scores, softmax and P·V per block of queries of one KV head */
        if (causal) {
            /* key block b is seen by the queries from token b * SCORE_KEYS - past on: take the
             * blocks of a head in the order 0, last, 1, last - 1, ... so that both halves of the
             * items hold equal work while each thread still writes whole runs of score columns
             * (alternate blocks would share cache lines between the threads) */
            #pragma omp for schedule(static)
            for (int64_t item = 0; item < KV * key_blocks; item++) {
                const int64_t s = item % key_blocks;
                SCORES(item, s % 2 ? key_blocks - 1 - s / 2 : s / 2);
            }
            #pragma omp for schedule(static, 1)
            for (int64_t task = 0; task < KV * query_blocks; task++) ATTEND(task);
        } else {
            #pragma omp for schedule(static)
            for (int64_t item = 0; item < KV * key_blocks; item++) SCORES(item, item % key_blocks);
            #pragma omp for schedule(static)
            for (int64_t task = 0; task < KV * query_blocks; task++) ATTEND(task);
        }
    }
#undef SCORES
#undef ATTEND
}

void freespec_tree_attention(const float *q, const float *keys, const float *values, int64_t capacity,
                             const int64_t *key_nodes, const int64_t *count, int64_t past, int64_t n,
                             int64_t H, int64_t KV, int64_t D, float scale, int64_t causal, float *out, float *probs) {
    freespec_window_attention(q, keys, values, capacity, key_nodes, count, past, n, H, KV, D, scale, causal, NULL, 0,
                              0.0f, out, probs);
}

/* A pass's row-wise operations (norms, activation, residual adds) split their rows over the
 * threads from this many floats on (a prefill chunk), where the work outweighs a parallel
 * region's start (a few microseconds); a decoding step's few rows stay on one thread. Each row is
 * computed the same way either way, so the split changes no bit. */
#define PARALLEL_FLOATS (1 << 15)
static inline int split_rows(int64_t floats) { return floats >= PARALLEL_FLOATS && !omp_in_parallel(); }
/* for (var = 0; var < count; var++) { body }, split over the threads if split_rows(floats); no
 * parallel region at all otherwise (an inactive one still costs its start) */
#define FOR_ROWS(floats, var, count, ...)                                                        \
    do {                                                                                         \
        if (split_rows(floats)) {                                                                \
            _Pragma("omp parallel for schedule(static)") for (int64_t var = 0; var < (count); var++) { __VA_ARGS__ } \
        } else {                                                                                 \
            for (int64_t var = 0; var < (count); var++) { __VA_ARGS__ }                          \
        }                                                                                        \
    } while (0)

/* Rotary embedding of one layer's fresh q and k, plus the cache writes, in one pass.
 * qkv: [n, (H + 2 KV) D] from the fused projection; cos, sin: [n, D] (NULL: no rotary, GPT-2);
 * keys/values: [KV, capacity, D], rows start..start+n are written; q_out: [KV, n * group, D],
 * the layout freespec_tree_attention reads. out[d] = x[d] cos[d] + rotate_half(x)[d] sin[d]. */
static inline void rotate(const float *x, const float *cos, const float *sin, float *out, int64_t D) {
    const int64_t half = D / 2;
    if (!cos) {
        for (int64_t d = 0; d < D; d++) out[d] = x[d];
        return;
    }
    for (int64_t d = 0; d < half; d++) {
        float a = x[d] * cos[d], b = x[d + half] * sin[d];
        out[d] = a - b;
    }
    for (int64_t d = half; d < D; d++) {
        float a = x[d] * cos[d], b = x[d - half] * sin[d];
        out[d] = a + b;
    }
}

void freespec_rope_store(const float *qkv, const float *cos, const float *sin, float *keys, float *values,
                         int64_t capacity, int64_t start, int64_t n, int64_t H, int64_t KV, int64_t D,
                         float *q_out) {
    const int64_t group = H / KV, width = (H + 2 * KV) * D;
    FOR_ROWS(n * width, i, n,
        const float *row = qkv + i * width;
        const float *c = cos ? cos + i * D : 0, *s = sin ? sin + i * D : 0;
        for (int64_t h = 0; h < H; h++)
            rotate(row + h * D, c, s, q_out + ((h / group) * n * group + i * group + h % group) * D, D);
        for (int64_t g = 0; g < KV; g++) {
            rotate(row + (H + g) * D, c, s, keys + (g * capacity + start + i) * D, D);
            const float *v = row + (H + KV + g) * D;
            float *v_out = values + (g * capacity + start + i) * D;
            for (int64_t d = 0; d < D; d++) v_out[d] = v[d];
        });
}

/* ---------------------------------------------------------------------------------------------
 * A whole Llama-style decoder forward in one call (decoding and verification).
 *
 * Between the matmuls a layer does a dozen small operations (norms, residual adds, SiLU, rotary);
 * as torch calls they cost more than the matmuls of a 4-bit model on this CPU. Here they run
 * in C on the rows in place. Every operation is row-wise (norms) or element-wise (activation,
 * residual), so a token's result still does not depend on which other tokens share the pass.
 * ------------------------------------------------------------------------------------------- */

/* The first `heads` heads of D values in a row of qkv, from llama.cpp's interleaved rotary order
 * (value 2i of a head is transformers' i, 2i + 1 its i + D/2) to transformers' order, in place. */
static void rotate_half_order(float *row, int64_t heads, int64_t D) {
    float interleaved[D];
    for (int64_t head = 0; head < heads; head++) {
        float *values = row + head * D;
        memcpy(interleaved, values, D * sizeof(float));
        for (int64_t i = 0; i < D / 2; i++) {
            values[i] = interleaved[2 * i];
            values[D / 2 + i] = interleaved[2 * i + 1];
        }
    }
}

/* out = weight * (x / sqrt(mean(x^2) + eps)) for one row of width n. */
static void rms_norm_row(const float *x, const float *weight, float eps, float *out, int64_t n) {
    __m256 lanes = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        lanes = _mm256_fmadd_ps(v, v, lanes);
    }
    float sum = horizontal_sum(lanes);
    for (; i < n; i++) sum += x[i] * x[i];
    const float inverse = 1.0f / sqrtf(sum / (float)n + eps);
    for (i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inverse);
}

/* rms_norm_row for each of the rows of width n. */
static void rms_norm(const float *x, const float *weight, float eps, float *out, int64_t rows, int64_t n) {
    FOR_ROWS(rows * n, r, rows, rms_norm_row(x + r * n, weight, eps, out + r * n, n););
}

/* h += delta over `floats` values (the residual stream). */
static void add_in_place(float *h, const float *delta, int64_t floats) {
    FOR_ROWS(floats, i, floats, h[i] += delta[i];);
}

/* act = silu(gate) * up for one row, where gate_up is [gate | up]. */
static void silu_mul_row(const float *gate_up, float *act, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    const float *gate = gate_up, *up = gate + n;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        /* sigmoid(g) from e = exp(-|g|) <= 1: 1 / (1 + e) for g >= 0, e / (1 + e) below */
        __m256 e = exp_nonpositive(_mm256_or_ps(g, sign));
        __m256 numerator = _mm256_blendv_ps(one, e, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
        __m256 sigmoid = _mm256_div_ps(numerator, _mm256_add_ps(one, e));
        _mm256_storeu_ps(act + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) {
        float g = gate[i], e = expf(-fabsf(g));
        act[i] = g * ((g < 0 ? e : 1.0f) / (1.0f + e)) * up[i];
    }
}

/* Gemma's GeGLU for one row: act = gelu(gate) * up with the tanh approximation,
 * 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))); tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|). */
static void gelu_tanh_mul_row(const float *gate_up, float *act, int64_t n) {
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    const __m256 k0 = _mm256_set1_ps(0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f);
    const float *gate = gate_up, *up = gate + n;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 u = _mm256_mul_ps(k0, _mm256_fmadd_ps(_mm256_mul_ps(k1, g), _mm256_mul_ps(g, g), g));
        const __m256 e = exp_nonpositive(_mm256_or_ps(_mm256_add_ps(u, u), sign)); /* exp(-2 |u|) */
        const __m256 magnitude = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
        const __m256 tanh_u = _mm256_or_ps(magnitude, _mm256_and_ps(u, sign));
        const __m256 gelu = _mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_add_ps(one, tanh_u));
        _mm256_storeu_ps(act + i, _mm256_mul_ps(gelu, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) {
        const float g = gate[i];
        act[i] = 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * up[i];
    }
}

/* The gated activation of each of the rows: act [rows, n] from gate_up [rows, 2 n]. */
static void gated_activation(int64_t activation, const float *gate_up, float *act, int64_t rows, int64_t n) {
    void (*row_fn)(const float *, float *, int64_t) = activation == FREESPEC_GELU_TANH ? gelu_tanh_mul_row : silu_mul_row;
    FOR_ROWS(rows * n, r, rows, row_fn(gate_up + r * 2 * n, act + r * n, n););
}

/* Whether the kernels read every matrix of the model. */
static int matrices_ok(const DecoderPass *pass) {
    if (!matrix_ok(&pass->embed)) return 0;
    for (int64_t l = 0; l < pass->num_layers; l++) {
        const DecoderLayer *layer = pass->layers + l;
        if (!matrix_ok(&layer->qkv) || !matrix_ok(&layer->o) || !matrix_ok(&layer->gate_up) || !matrix_ok(&layer->down))
            return 0;
    }
    return 1;
}

/* Tokens to final hidden states in one call, so a decoding step pays no per-operation overhead
 * outside C (see DecoderPass in freespec.h). The pass's rows belong to its sequences in order:
 * norms, matmuls, the activation and residuals run over all rows at once (each row's result is
 * the same bits whatever rows share the call), rotary, cache writes and attention per sequence
 * over its own cache. Layers with skip[l] set are the identity and write no cache rows. All
 * scratch is allocated before the first layer: on failure nothing is written. */
int freespec_forward_llama(const DecoderPass *pass) {
    if (!matrices_ok(pass)) return FREESPEC_BAD_MATRIX;
    const int64_t n = pass->n, hidden = pass->hidden, intermediate = pass->intermediate;
    const int64_t H = pass->H, KV = pass->KV, D = pass->D, S = pass->num_sequences;
    const DecoderSequence *sequences = pass->sequences;
    const int64_t qkv_width = (H + 2 * KV) * D;
    int64_t layouts = 0, probs_floats = 0, small = 0; /* key_nodes entries, scores of all sequences */
    for (int64_t s = 0; s < S; s++) {
        const int64_t rows = sequences[s].n;
        layouts += rows * rows;
        probs_floats += rows * H * (sequences[s].past + rows);
        small += rows < CAUSAL_ROWS;
    }
    float *h = scratch(n * hidden);
    float *cos[2], *sin[2];
    int tables_ok = 1;
    for (int r = 0; r < 2; r++) {
        cos[r] = pass->cos_tables[r] ? scratch(n * D) : NULL, sin[r] = pass->sin_tables[r] ? scratch(n * D) : NULL;
        tables_ok = tables_ok && (!pass->cos_tables[r] || cos[r]) && (!pass->sin_tables[r] || sin[r]);
    }
    int64_t *key_nodes = malloc((layouts ? layouts : 1) * sizeof(int64_t)), *count = malloc(n * sizeof(int64_t));
    int64_t *causal = malloc((S ? S : 1) * 4 * sizeof(int64_t)); /* per sequence: causal, first row, layout, scores */
    float *normed = scratch(n * hidden);
    float *qkv = scratch(n * qkv_width);
    float *queries = scratch(n * H * D);
    float *attended = scratch(n * H * D);
    float *projected = scratch(n * (2 * intermediate > hidden ? 2 * intermediate : hidden));
    float *act = scratch(n * intermediate);
    float *probs = scratch(probs_floats);
    int status = FREESPEC_OK;
    if (!h || !tables_ok || !key_nodes || !count || !causal || !normed ||
        !qkv || !queries || !attended || !projected || !act || !probs) {
        status = FREESPEC_OUT_OF_MEMORY;
        goto done;
    }
    freespec_rows(&pass->embed, pass->tokens, n, h);
    if (pass->embed_scale != 1.0f)
        for (int64_t i = 0; i < n * hidden; i++) h[i] *= pass->embed_scale;
    for (int r = 0; r < 2; r++)
        for (int64_t i = 0; i < n; i++) {
            if (cos[r]) memcpy(cos[r] + i * D, pass->cos_tables[r] + pass->rope_rows[r][i] * D, D * sizeof(float));
            if (sin[r]) memcpy(sin[r] + i * D, pass->sin_tables[r] + pass->rope_rows[r][i] * D, D * sizeof(float));
        }
    int64_t *first_row = causal + S, *first_layout = causal + 2 * S, *first_score = causal + 3 * S;
    for (int64_t s = 0, row = 0, layout = 0, score = 0; s < S; s++) {
        const int64_t rows = sequences[s].n;
        causal[s] = freespec_tree_layout(sequences[s].tree_mask, rows, key_nodes + layout, count + row);
        first_row[s] = row, first_layout[s] = layout, first_score[s] = score;
        row += rows, layout += rows * rows, score += rows * H * (sequences[s].past + rows);
    }
    for (int64_t l = 0; l < pass->num_layers; l++) {
        if (pass->skip && pass->skip[l]) continue; /* a skipped layer is the identity and writes no cache rows */
        const DecoderLayer *layer = pass->layers + l;
        rms_norm(h, layer->attn_norm, layer->attn_eps, normed, n, hidden);
        linear_then(&layer->qkv, normed, qkv, n, &layer->o);
        if (layer->interleaved_qk) FOR_ROWS(n * qkv_width, i, n, rotate_half_order(qkv + i * qkv_width, H + KV, D););
        if (layer->q_norm)
            FOR_ROWS(n * qkv_width, i, n,
                float *row = qkv + i * qkv_width;
                for (int64_t head = 0; head < H; head++)
                    rms_norm_row(row + head * D, layer->q_norm, layer->q_eps, row + head * D, D);
                for (int64_t head = H; head < H + KV; head++)
                    rms_norm_row(row + head * D, layer->k_norm, layer->k_eps, row + head * D, D););
        /* each sequence over its own cache: the few rows of decoding steps a sequence per thread
         * (a nested region runs on its one thread; the kernel's bits do not depend on threads),
         * then prefill chunks with every thread on each */
#define ATTEND(s)                                                                                              \
    do {                                                                                                       \
        const DecoderSequence *seq = sequences + (s);                                                          \
        const int64_t row = first_row[s], rows = seq->n, capacity = seq->capacity, past = seq->past;           \
        float *layer_keys = seq->keys + l * KV * capacity * D;                                                 \
        float *layer_values = seq->values + l * KV * capacity * D;                                             \
        const float *layer_cos = cos[layer->rotary], *layer_sin = sin[layer->rotary];                          \
        freespec_rope_store(qkv + row * qkv_width, layer_cos ? layer_cos + row * D : NULL,                     \
                            layer_sin ? layer_sin + row * D : NULL, layer_keys, layer_values, capacity, past,  \
                            rows, H, KV, D, queries + row * H * D);                                            \
        freespec_window_attention(queries + row * H * D, layer_keys, layer_values, capacity,                   \
                                  key_nodes + first_layout[s], count + row, past, rows, H, KV, D, pass->scale, \
                                  causal[s], pass->positions + row, layer->window, pass->softcap,              \
                                  attended + row * H * D, probs + first_score[s]);                             \
    } while (0)
        if (small > 1) {
            #pragma omp parallel for schedule(dynamic, 1)
            for (int64_t s = 0; s < S; s++)
                if (sequences[s].n < CAUSAL_ROWS) ATTEND(s);
        }
        /* no enclosing region otherwise (an inactive `if (0)` region made a single request's
         * attention nest inside it, on one thread, with the other spinning: 3x slower passes) */
        for (int64_t s = 0; s < S; s++)
            if (small <= 1 || sequences[s].n >= CAUSAL_ROWS) ATTEND(s);
#undef ATTEND
        linear_then(&layer->o, attended, projected, n, &layer->gate_up);
        if (layer->post_attn_norm) rms_norm(projected, layer->post_attn_norm, layer->post_attn_eps, projected, n, hidden);
        add_in_place(h, projected, n * hidden);
        rms_norm(h, layer->mlp_norm, layer->mlp_eps, normed, n, hidden);
        linear_then(&layer->gate_up, normed, projected, n, &layer->down);
        gated_activation(pass->activation, projected, act, n, intermediate);
        linear_then(&layer->down, act, projected, n, l + 1 < pass->num_layers ? &(layer + 1)->qkv : NULL);
        if (layer->post_mlp_norm) rms_norm(projected, layer->post_mlp_norm, layer->post_mlp_eps, projected, n, hidden);
        add_in_place(h, projected, n * hidden);
    }
    rms_norm(h, pass->final_norm, pass->final_eps, pass->out, n, hidden);
done:
    free(normed); free(qkv); free(queries); free(attended); free(projected); free(act); free(probs);
    free(h); free(cos[0]); free(sin[0]); free(cos[1]); free(sin[1]); free(key_nodes); free(count); free(causal);
    return status;
}

/* Per row of logits [rows, V]: the k largest values in descending order with their ids (ties:
 * the lower id first, so ids[0] is the first maximum, like torch.argmax) and, unless
 * log_normalizer is NULL, log(sum(exp(row))). One vectorised pass finds candidates above the
 * current k-th value; a second sums exp. */
void freespec_top_k(const float *logits, int64_t rows, int64_t V, int64_t k, float *values, int64_t *ids,
                    float *log_normalizer) {
    #pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = logits + r * V;
        float *top = values + r * k;
        int64_t *top_ids = ids + r * k, filled = 0;
        for (int64_t j = 0; j < k; j++) top[j] = -INFINITY, top_ids[j] = -1;
        int64_t v = 0;
        for (; v < V; v += LANES) {
            const int64_t lanes = V - v < LANES ? V - v : LANES;
            int mask = ((1 << LANES) - 1) >> (LANES - lanes);
            if (lanes == LANES && filled == k) mask = vec_greater_mask(vec_load(row + v), vec_set1(top[k - 1]));
            for (; mask; mask &= mask - 1) {
                const int64_t index = v + __builtin_ctz(mask);
                const float x = row[index];
                if (filled == k && !(x > top[k - 1])) continue;
                int64_t at = filled < k ? filled++ : k - 1;
                while (at > 0 && x > top[at - 1]) {
                    top[at] = top[at - 1], top_ids[at] = top_ids[at - 1];
                    at--;
                }
                top[at] = x, top_ids[at] = index;
            }
        }
        if (!log_normalizer) continue;
        const vec largest = vec_set1(top[0]);
        vec sum = vec_zero();
        for (v = 0; v + LANES <= V; v += LANES)
            sum = vec_add(sum, vec_exp_nonpositive(vec_sub(vec_load(row + v), largest)));
        float total = vec_sum(sum);
        for (; v < V; v++) total += expf(row[v] - top[0]);
        log_normalizer[r] = top[0] + logf(total);
    }
}

/* ---------------------------------------------------------------------------------------------
 * The exact greedy head: each input row's argmax over a Q8_0 head (GGUF blocks, or the packed kind
 * the AVX2 build makes of them) or a Q6_K one (the output head of llama.cpp's Q4_K_M and Q5_K_M
 * files) without computing every logit.
 *
 * Greedy decoding reads only the first maximum of a row of logits. Each input row x is quantized
 * to int16 codes with one scale (s = max|x| / 32767), every head row's approximate logit is s
 * times a sum over blocks of d (q . codes) (the dot product exact in int32; Q6_K: over half
 * blocks of 128, each code q - 32 times its block of 16's int8 scale first), and its distance to
 * the logit freespec_linear computes is bounded by C L1[r], with L1[r] = sum |w_r|
 * (freespec_head_bounds, once per head) and C from x alone:
 *   - the codes' error: sum_b d sum_i q e_i, |.| <= L1 max|e| (e = x - s code, computed in double);
 *   - the approximation's fp32 arithmetic (one FMA a block a lane, B of them, and the lanes' sum;
 *     the product with s is exact in double): gamma(B + 3) of sum |d s q code| <= L1 max|x| (1 + u);
 *   - the exact logit's own rounding from the real sum (an FMA chain of at most K terms and a
 *     tree of the lanes): gamma(K) of sum |w x| <= L1 max|x|;
 * times 1.01 of margin (gamma(n) = n u / (1 - n u), u = 2^-24), plus 2^-149 for every fp32
 * operation on a row's path (4K + 64 of them at most), which bounds what underflow adds. (A scale
 * per 32-block would not tighten C: the codes' error is bounded by its largest block's.)
 *
 * One pass over the head (threads take chunks of HEAD_CHUNK_ROWS rows) computes a chunk's
 * approximations for up to HEAD_ROWS_AT_ONCE input rows from each head row's widened codes, raises
 * a running best lower bound per input row by the chunk's, then lists the chunk's rows whose upper
 * bound reaches it (one dispatch and one pass of bookkeeping a chunk, not a row: Gemma-3-270M's
 * greedy head 5.5-6.7 -> 5.4-5.9 ms at one row, 9.0-9.5 -> 8.6-9.2 at four, Zen 4); the
 * listed rows whose upper bound reaches the final best lower bound are the only ones that can
 * hold the maximum. They are computed by freespec_linear's own arithmetic (any tile gives a row
 * the same bits) and the first maximum among them is the whole head's. Measured on real hidden
 * states: 1-5 such rows of 262,144 (benchmarks/head_bounds.py). */

#define HEAD_CODE_MAX 32767
#define HEAD_ROWS_AT_ONCE 8
#define HEAD_CHUNK_ROWS 512
/* Bytes ahead of its reads that the head's integer pass asks for its codes, a cache line per block
 * of 32 (the pass reads each head row once, so the hardware prefetcher alone left memory idle
 * between its demand misses). Zen 4 VM, Gemma-3-270M's Q8_0 head (178 MB), 2 threads, three
 * rounds of benchmarks/head_speed.py alternating builds: 1 row 5.5-5.9 -> 4.7-5.7 ms, 2 rows
 * 6.8-7.3 -> 5.8-6.2 ms at 8 KB; 4 KB about as fast at 2 rows, 16-64 KB slower. */
#define HEAD_PREFETCH 8192

static double rounding_gamma(double n) {
    const double u = 0x1p-24;
    return n * u / (1.0 - n * u);
}

/* A head the greedy head reads: Q8_0, GGUF blocks (f16 d, 32 int8 codes) or the packed kind (codes
 * [N, K], fp32 d [N, K/32]); or GGUF Q6_K blocks. */
static int is_greedy_head(const Matrix *w) {
    if (w->bias) return 0;
    if (w->kind == GGML_Q8_0 || w->kind == FREESPEC_PACKED_Q8) return w->K % 32 == 0;
    return w->kind == GGML_Q6_K && w->K % 256 == 0;
}

/* The roundings a term of a head row's approximation goes through in its lane before the lanes'
 * sum (B above): one FMA per block of 32 (Q8_0), or per half block of 128 (Q6_K) plus the
 * conversion of its int32 sum, which may round. */
static int64_t head_lane_terms(const Matrix *w) { return w->kind == GGML_Q6_K ? w->K / 128 + 1 : w->K / 32; }

/* The 128 codes q - 32 of half `half` of a Q6_K block as four int8 vectors of 32 (elements 32 i ..
 * 32 i + 31 of the half): formats.h's group_codes for each quarter (low nibbles of ql[0..31],
 * ql[32..63], then their high nibbles; qh's bit pairs 0-1, 2-3, 4-5, 6-7 as bits 4-5), minus 32. */
static inline __attribute__((always_inline)) void q6_k_quarters(const uint8_t *block, int half, __m256i quarters[4]) {
    for (int quarter = 0; quarter < 4; quarter++)
        quarters[quarter] = _mm256_sub_epi8(group_codes(block + 64 * half + (quarter & 1) * 32, quarter >= 2,
                                                        block + 128 + 32 * half, 2 * quarter, 0x30),
                                            _mm256_set1_epi8(32));
}

/* Row r's block b: its 32 codes, and its d in *d (PACKED: the packed kind's layout; a constant
 * where the loops below call it, so each loop is compiled for one layout). */
static inline __attribute__((always_inline)) const int8_t *head_block(const Matrix *w, int PACKED, int64_t r,
                                                                      int64_t b, float *d) {
    const int64_t B = w->K / 32;
    if (PACKED) {
        *d = w->scales[r * B + b];
        return (const int8_t *)w->data + r * w->K + b * 32;
    }
    const uint8_t *block = (const uint8_t *)w->data + (r * B + b) * Q8_0_BYTES;
    *d = f16_at(block);
    return (const int8_t *)(block + 2);
}

static inline __attribute__((always_inline)) void head_bounds(const Matrix *w, int PACKED, float *row_l1) {
    const int64_t B = w->K / 32;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < w->N; r++) {
        double total = 0.0;
        for (int64_t b = 0; b < B; b++) {
            float d;
            const int8_t *q = head_block(w, PACKED, r, b, &d);
            int64_t codes = 0;
            for (int i = 0; i < 32; i++) codes += abs((int)q[i]);
            total += fabs((double)d) * (double)codes;
        }
        row_l1[r] = nextafterf((float)total, INFINITY); /* rounded to nearest, then one step up: >= total */
    }
}

/* Q6_K: per block, sum over its blocks of 16 of |d scale| sum |q - 32| (byte sums by vpsadbw) */
static void q6_k_head_bounds(const Matrix *w, float *row_l1) {
    const int64_t units = w->K / 256;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < w->N; r++) {
        double total = 0.0;
        for (int64_t u = 0; u < units; u++) {
            const uint8_t *block = (const uint8_t *)w->data + (r * units + u) * Q6_K_BYTES;
            const int8_t *block_scales = (const int8_t *)(block + 192);
            int64_t codes = 0; /* sum of |scale| |q - 32| */
            for (int half = 0; half < 2; half++) {
                __m256i quarters[4];
                q6_k_quarters(block, half, quarters);
                for (int quarter = 0; quarter < 4; quarter++) {
                    int64_t sums[4]; /* |q - 32| summed over 8 bytes each: blocks of 16 are lanes 0-1, 2-3 */
                    _mm256_storeu_si256((__m256i *)sums, _mm256_sad_epu8(_mm256_abs_epi8(quarters[quarter]), _mm256_setzero_si256()));
                    const int8_t *scale = block_scales + 8 * half + 2 * quarter;
                    codes += abs((int)scale[0]) * (sums[0] + sums[1]) + abs((int)scale[1]) * (sums[2] + sums[3]);
                }
            }
            total += fabs((double)f16_at(block + 208)) * (double)codes;
        }
        row_l1[r] = nextafterf((float)total, INFINITY);
    }
}

int freespec_head_bounds(const Matrix *w, float *row_l1) {
    if (!is_greedy_head(w)) return FREESPEC_BAD_MATRIX;
    if (w->kind == GGML_Q6_K) q6_k_head_bounds(w, row_l1);
    else if (w->kind == FREESPEC_PACKED_Q8) head_bounds(w, 1, row_l1);
    else head_bounds(w, 0, row_l1);
    return FREESPEC_OK;
}

/* sums[j] = sum over the blocks of d (q . codes[j]) for head row r and `count` input rows (codes
 * [count, K]), in 8 fp32 lanes each; a block's codes are widened once for all of them. Both builds
 * run these 256-bit integer instructions (AVX2's). A lane's integer sum of four products stays
 * below 2^24 (4 x 127 x 32767), so its conversion to fp32 is exact. Inlined with constants PACKED
 * and count: one loop per layout and count, its accumulators in registers. */
static inline __attribute__((always_inline)) void q8_rows_approx(const Matrix *w, int PACKED, int64_t r,
                                                                 const int16_t *codes, int count, float *sums) {
    const int64_t K = w->K;
    __m256 acc[HEAD_ROWS_AT_ONCE];
    for (int j = 0; j < count; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        float scale;
        const int8_t *q = head_block(w, PACKED, r, k / 32, &scale);
        _mm_prefetch((const char *)q + HEAD_PREFETCH, _MM_HINT_T0);
        if (PACKED && k % 512 == 0) _mm_prefetch((const char *)(w->scales + r * (K / 32) + k / 32) + HEAD_PREFETCH / 8, _MM_HINT_T0);
        const __m256i low = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
        const __m256i high = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
        const __m256 d = _mm256_set1_ps(scale);
        for (int j = 0; j < count; j++) {
            const int16_t *c = codes + j * K + k;
            const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(low, _mm256_loadu_si256((const __m256i *)c)),
                                                 _mm256_madd_epi16(high, _mm256_loadu_si256((const __m256i *)(c + 16))));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[j]);
        }
    }
    for (int j = 0; j < count; j++) sums[j] = horizontal_sum(acc[j]);
}

/* The same over a Q6_K head row: per half of a block (128 weights), its codes times their block of
 * 16's int8 scale as int16 ((q - 32) scale, |.| <= 4096), made once for all input rows; an input
 * row's 128 products summed in 8 int32 lanes (16 each, at most 16 x 4096 x 32767 < 2^31: exact),
 * converted to fp32 (rounded: the bound counts it, head_lane_terms) and times d by an FMA. */
static inline __attribute__((always_inline)) void q6_k_rows_approx(const Matrix *w, int64_t r, const int16_t *codes,
                                                                   int count, float *sums) {
    const int64_t K = w->K, units = K / 256;
    const uint8_t *row = (const uint8_t *)w->data + r * units * Q6_K_BYTES;
    __m256 acc[HEAD_ROWS_AT_ONCE];
    for (int j = 0; j < count; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t u = 0; u < units; u++) {
        const uint8_t *block = row + u * Q6_K_BYTES;
        prefetch((const char *)block + HEAD_PREFETCH, Q6_K_BYTES);
        int16_t block_scales[16];
        _mm256_storeu_si256((__m256i *)block_scales, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(block + 192))));
        const __m256 d = _mm256_set1_ps(f16_at(block + 208));
        for (int half = 0; half < 2; half++) {
            __m256i quarters[4], weights[8]; /* weights: (q - 32) scale as int16, |.| <= 4096, blocks of 16 */
            q6_k_quarters(block, half, quarters);
            for (int quarter = 0; quarter < 4; quarter++) {
                const int16_t *scale = block_scales + 8 * half + 2 * quarter;
                weights[2 * quarter] = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(quarters[quarter])),
                                                          _mm256_set1_epi16(scale[0]));
                weights[2 * quarter + 1] = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(quarters[quarter], 1)),
                                                              _mm256_set1_epi16(scale[1]));
            }
            const int64_t k = u * 256 + half * 128;
            for (int j = 0; j < count; j++) {
                const int16_t *c = codes + j * K + k;
                __m256i dot = _mm256_madd_epi16(weights[0], _mm256_loadu_si256((const __m256i *)c));
                for (int i = 1; i < 8; i++)
                    dot = _mm256_add_epi32(dot, _mm256_madd_epi16(weights[i], _mm256_loadu_si256((const __m256i *)(c + 16 * i))));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[j]);
            }
        }
    }
    for (int j = 0; j < count; j++) sums[j] = horizontal_sum(acc[j]);
}

/* sums[(r - r0) * count + j] for head rows r0 .. r1 - 1 and `count` input rows: q8_rows_approx or
 * q6_k_rows_approx with constant arguments for the layout and up to HEAD_ROWS_AT_ONCE input rows,
 * one dispatch for the whole run of rows */
static void head_rows_approx(const Matrix *w, int64_t r0, int64_t r1, const int16_t *codes, int count,
                             float *sums) {
#define HEAD_APPROX(CALL)                                                   \
    switch (count) {                                                        \
    case 1: CALL(1); break;                                                 \
    case 2: CALL(2); break;                                                 \
    case 3: CALL(3); break;                                                 \
    case 4: CALL(4); break;                                                 \
    case 5: CALL(5); break;                                                 \
    case 6: CALL(6); break;                                                 \
    case 7: CALL(7); break;                                                 \
    default: CALL(8); break;                                                \
    }
#define PACKED_Q8(COUNT) for (int64_t r = r0; r < r1; r++) q8_rows_approx(w, 1, r, codes, COUNT, sums + (r - r0) * COUNT)
#define GGUF_Q8(COUNT) for (int64_t r = r0; r < r1; r++) q8_rows_approx(w, 0, r, codes, COUNT, sums + (r - r0) * COUNT)
#define GGUF_Q6_K(COUNT) for (int64_t r = r0; r < r1; r++) q6_k_rows_approx(w, r, codes, COUNT, sums + (r - r0) * COUNT)
    if (w->kind == FREESPEC_PACKED_Q8) HEAD_APPROX(PACKED_Q8)
    else if (w->kind == GGML_Q6_K) HEAD_APPROX(GGUF_Q6_K)
    else HEAD_APPROX(GGUF_Q8)
#undef HEAD_APPROX
#undef PACKED_Q8
#undef GGUF_Q8
#undef GGUF_Q6_K
}

/* Int8 codes of a head of any kind, for heads whose own blocks the greedy head does not read (the
 * 16- and 32-bit ones): per block of 32 of a row's fp32 weights (the kind's `row`), d = max |w| /
 * 127 and q = round(w / d), in the packed Q8 layout (codes [N, K], scales [N, K/32]). The
 * approximation then runs on the weights d q, and freespec_head_argmax adds what they differ by:
 * row_error[r] >= sum |w - d q|; row_l1[r] >= sum |d q| + row_error[r], which bounds sum |w| too. */
int freespec_head_codes(const Matrix *w, int8_t *codes, float *scales, float *row_l1, float *row_error) {
    const KindOps *ops = kind_ops(w->kind);
    if (!ops || w->kind == FREESPEC_STACKED || w->K % 32 || w->bias) return FREESPEC_BAD_MATRIX;
    const int64_t N = w->N, K = w->K, B = K / 32;
    int missing = 0, not_finite = 0;
    #pragma omp parallel reduction(| : missing, not_finite)
    {
        float *values = scratch(K);
        missing |= !values;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            if (!values) continue;
            ops->row(w, r, values);
            double l1 = 0.0, error = 0.0;
            for (int64_t b = 0; b < B; b++) {
                const float *v = values + b * 32;
                float top = 0.0f;
                for (int i = 0; i < 32; i++) {
                    const float a = fabsf(v[i]);
                    not_finite |= !(a <= FLT_MAX);
                    top = a > top ? a : top;
                }
                const float d = top / 127.0f;
                scales[r * B + b] = d;
                for (int i = 0; i < 32; i++) {
                    long q = d > 0.0f ? lrintf(v[i] / d) : 0;
                    q = q > 127 ? 127 : q < -127 ? -127 : q;
                    codes[r * K + b * 32 + i] = (int8_t)q;
                    l1 += fabs((double)d * (double)q);
                    error += fabs((double)v[i] - (double)d * (double)q);
                }
            }
            row_error[r] = nextafterf((float)error, INFINITY);
            row_l1[r] = nextafterf((float)(l1 + (double)row_error[r]), INFINITY);
        }
        free(values);
    }
    return missing ? FREESPEC_OUT_OF_MEMORY : not_finite ? FREESPEC_NOT_BOUNDED : FREESPEC_OK;
}

typedef struct {
    int64_t row;  /* a head row */
    double upper; /* its logit's upper bound */
} HeadCandidate;

/* Whether (value, id) comes before (other, other_id) in the top-k's order: larger values first,
 * the lower id first among equal ones (a total order: the merged result does not depend on which
 * thread saw which rows). */
static inline int ranks_before(float value, int64_t id, float other, int64_t other_id) {
    return value > other || (value == other && id < other_id);
}

/* Insert (value, id) into the sorted top-k list (values, ids) if it belongs there. */
static inline void top_k_insert(float *values, int64_t *ids, int64_t k, float value, int64_t id) {
    if (!ranks_before(value, id, values[k - 1], ids[k - 1])) return;
    int64_t at = k - 1;
    for (; at > 0 && ranks_before(value, id, values[at - 1], ids[at - 1]); at--)
        values[at] = values[at - 1], ids[at] = ids[at - 1];
    values[at] = value, ids[at] = id;
}

/* One chunk's approximate logits of one input row (fp32: its scale times column j of the integer
 * sums) into the thread's top-k of that row, and the chunk's max and sum of exp(a - max) into its
 * partials
 * (8-lane exp in both builds: the same normalizer whatever the build). */
static void chunk_top_k(const float *sums, int count, int j, double scale, int64_t r0, int64_t r1,
                        int64_t k, float *values, int64_t *ids, double *chunk_max, double *chunk_sum) {
    float approx[HEAD_CHUNK_ROWS] __attribute__((aligned(32)));
    const int64_t rows = r1 - r0;
    float largest = -INFINITY;
    for (int64_t i = 0; i < rows; i++) {
        approx[i] = (float)(scale * (double)sums[i * count + j]);
        largest = approx[i] > largest ? approx[i] : largest;
        top_k_insert(values, ids, k, approx[i], r0 + i);
    }
    const __m256 top = _mm256_set1_ps(largest);
    __m256 total = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= rows; i += 8) total = _mm256_add_ps(total, exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(approx + i), top)));
    double sum = horizontal_sum(total);
    for (; i < rows; i++) sum += exp((double)approx[i] - (double)largest);
    *chunk_max = largest, *chunk_sum = sum;
}

int freespec_head_argmax(const Matrix *w, const float *row_l1, const float *x, int64_t M, int64_t *out,
                         const Matrix *exact, const float *row_error, int64_t k, float *top_values, int64_t *top_ids,
                         float *log_normalizer) {
    if (!is_greedy_head(w) || (exact && (!row_error || exact->N != w->N || exact->K != w->K || exact->bias ||
                                         !kind_ops(exact->kind) || exact->kind == FREESPEC_STACKED)) ||
        k < 0 || k > w->N || (k && (!top_values || !top_ids || !log_normalizer)))
        return FREESPEC_BAD_MATRIX;
    const Matrix *target = exact ? exact : w; /* the head whose logits are the answer */
    const int64_t N = w->N, K = w->K, B = head_lane_terms(w);
    int16_t *codes = malloc(M * K * sizeof(int16_t));
    HeadCandidate *candidates = malloc(M * N * sizeof(HeadCandidate)); /* [M, N]: pages touched as used */
    double *scale = malloc(M * sizeof(double)), *margin = malloc(M * sizeof(double));
    double *error_factor = malloc(M * sizeof(double)); /* times row_error[r]: what the codes' weights add */
    double *lower = malloc(M * sizeof(double));
    int64_t *listed = calloc(M, sizeof(int64_t));
    const int64_t chunks = (N + HEAD_CHUNK_ROWS - 1) / HEAD_CHUNK_ROWS;
    double *partials = k ? malloc(2 * M * chunks * sizeof(double)) : NULL; /* [M, chunks] max, then sum */
    const double underflow = (4.0 * (double)K + 64.0) * 0x1p-149; /* what denormal results can add, per row */
    int status = codes && candidates && scale && margin && error_factor && lower && listed && (!k || partials)
                     ? FREESPEC_OK : FREESPEC_OUT_OF_MEMORY;
    for (int64_t i = 0; i < M * k; i++) top_values[i] = -INFINITY, top_ids[i] = N;
    double x_max_all = 0.0; /* the largest |x| of any input row: with a row's L1 norm, its logits' bound */
    for (int64_t m = 0; status == FREESPEC_OK && m < M; m++) {
        const float *xm = x + m * K;
        float x_max = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            const float a = fabsf(xm[k]);
            if (!(a <= FLT_MAX)) status = FREESPEC_NOT_BOUNDED; /* inf or NaN: the full head decides */
            x_max = a > x_max ? a : x_max;
        }
        const float s = x_max / (float)HEAD_CODE_MAX;
        double error_max = 0.0;
        for (int64_t k = 0; k < K; k++) {
            long code = s > 0.0f ? lrintf(xm[k] / s) : 0;
            code = code > HEAD_CODE_MAX ? HEAD_CODE_MAX : code < -HEAD_CODE_MAX ? -HEAD_CODE_MAX : code;
            codes[m * K + k] = (int16_t)code;
            const double e = fabs((double)xm[k] - (double)s * (double)code);
            error_max = e > error_max ? e : error_max;
        }
        const double gammas = rounding_gamma((double)K) + rounding_gamma((double)(B + 3)) + 0x1p-22;
        scale[m] = s;
        margin[m] = 1.01 * (error_max + gammas * (1.0 + 0x1p-20) * x_max);
        error_factor[m] = exact ? 1.01 * (1.0 + 0x1p-20) * x_max : 0.0;
        lower[m] = -INFINITY;
        x_max_all = x_max > x_max_all ? x_max : x_max_all;
    }
    int overflow = 0; /* some row's logits could overflow: the full head decides */
    if (status == FREESPEC_OK) {
        #pragma omp parallel reduction(| : overflow)
        {
            double own_lower[M]; /* this thread's best lower bound per input row so far */
            for (int64_t m = 0; m < M; m++) own_lower[m] = -INFINITY;
            float own_values[M * k + 1]; /* this thread's top-k per input row (with k) */
            int64_t own_ids[M * k + 1];
            for (int64_t i = 0; i < M * k; i++) own_values[i] = -INFINITY, own_ids[i] = N;
            float sums[HEAD_CHUNK_ROWS * HEAD_ROWS_AT_ONCE]; /* [rows of the chunk, count]: a group's own stride */
            #pragma omp for schedule(dynamic, 1)
            for (int64_t r0 = 0; r0 < N; r0 += HEAD_CHUNK_ROWS) {
                const int64_t r1 = r0 + HEAD_CHUNK_ROWS < N ? r0 + HEAD_CHUNK_ROWS : N;
                float l1_max = 0.0f;
                for (int64_t r = r0; r < r1; r++) l1_max = row_l1[r] > l1_max ? row_l1[r] : l1_max;
                overflow |= !((double)l1_max * x_max_all < 1e37);
                for (int64_t m0 = 0; m0 < M; m0 += HEAD_ROWS_AT_ONCE) {
                    const int count = M - m0 < HEAD_ROWS_AT_ONCE ? (int)(M - m0) : HEAD_ROWS_AT_ONCE;
                    head_rows_approx(w, r0, r1, codes + m0 * K, count, sums);
                    for (int j = 0; j < count; j++) {
                        /* the chunk's best lower bound first, then the rows whose upper bound
                         * reaches it: fewer listed than row by row, never one that could win */
                        const int64_t m = m0 + j;
                        double best = own_lower[m];
                        double slack[HEAD_CHUNK_ROWS];
                        for (int64_t r = r0; r < r1; r++)
                            slack[r - r0] = margin[m] * (double)row_l1[r] + underflow +
                                            (exact ? error_factor[m] * (double)row_error[r] : 0.0);
                        for (int64_t r = r0; r < r1; r++) {
                            const double low = scale[m] * (double)sums[(r - r0) * count + j] - slack[r - r0];
                            best = low > best ? low : best;
                        }
                        own_lower[m] = best;
                        if (k)
                            chunk_top_k(sums, count, j, scale[m], r0, r1, k, own_values + m * k, own_ids + m * k,
                                        partials + m * chunks + r0 / HEAD_CHUNK_ROWS,
                                        partials + (M + m) * chunks + r0 / HEAD_CHUNK_ROWS);
                        for (int64_t r = r0; r < r1; r++) {
                            const double upper = scale[m] * (double)sums[(r - r0) * count + j] + slack[r - r0];
                            if (upper >= best) {
                                const int64_t at = __atomic_fetch_add(listed + m, 1, __ATOMIC_RELAXED);
                                candidates[m * N + at] = (HeadCandidate){r, upper};
                            }
                        }
                    }
                }
            }
            #pragma omp critical
            for (int64_t m = 0; m < M; m++) {
                lower[m] = own_lower[m] > lower[m] ? own_lower[m] : lower[m];
                for (int64_t i = 0; i < k; i++)
                    top_k_insert(top_values + m * k, top_ids + m * k, k, own_values[m * k + i], own_ids[m * k + i]);
            }
        }
        if (overflow) status = FREESPEC_NOT_BOUNDED;
    }
    if (status == FREESPEC_OK) {
        for (int64_t m = 0; m < M; m++) {
            int64_t best = -1;
            float best_logit = 0.0f;
            for (int64_t i = 0; i < listed[m]; i++) {
                const HeadCandidate c = candidates[m * N + i];
                if (c.upper < lower[m]) continue;
                Matrix one = *target; /* row c.row alone */
                one.N = 1;
                one.data = (const uint8_t *)target->data + c.row * kind_ops(target->kind)->row_bytes(target);
                if (target->scales) one.scales = target->scales + c.row * (K / 32); /* the packed kinds' */
                float logit;
                kind_ops(target->kind)->linear(&one, x + m * K, &logit, 1, 1, 0, 1); /* a block of its own: any tile's bits */
                if (best < 0 || logit > best_logit || (logit == best_logit && c.row < best)) best = c.row, best_logit = logit;
            }
            out[m] = best;
            if (k) { /* the chunks' partials in chunk order: the same sum whichever thread took which */
                const double *chunk_max = partials + m * chunks, *chunk_sum = partials + (M + m) * chunks;
                double largest = -INFINITY, total = 0.0;
                for (int64_t c = 0; c < chunks; c++) largest = chunk_max[c] > largest ? chunk_max[c] : largest;
                for (int64_t c = 0; c < chunks; c++) total += chunk_sum[c] * exp(chunk_max[c] - largest);
                log_normalizer[m] = (float)(largest + log(total));
            }
        }
    }
    free(partials);
    free(codes); free(candidates); free(scale); free(margin); free(error_factor); free(lower); free(listed);
    return status;
}

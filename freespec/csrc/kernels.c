/* Batch-invariant kernels for decoding and tree verification: see freespec/kernels.py.
 *
 * y[M, N] = x[M, K] @ w[N, K]^T for fp32 with few rows M (decode and tree verification).
 *
 * Why not BLAS: for M = 1..16 the stock kernels here either run far below memory bandwidth
 * (M = 1) or pick poor blockings (M = 2..16). This kernel streams every weight row from memory
 * once and multiplies it with all M input rows while it sits in cache, so its cost stays close to
 * the time needed to read the weights until M reaches about 8.
 *
 * Batch invariance: every output y[m, n] is computed by the same arithmetic whatever M is and
 * whichever register tile it lands in: 8 lane-wise FMA partial sums over k in steps of 8, one fixed
 * horizontal sum, then the k % 8 tail added in order. So a token's logits are bit-identical whether
 * it is verified alone or inside a tree of 80 tokens, which is what makes speculative decoding
 * reproduce plain decoding exactly. Compile without -ffast-math.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline float finish(__m256 acc, const float *w, const float *x, int64_t k8, int64_t K) {
    float s = horizontal_sum(acc);
    for (int64_t k = k8; k < K; k++) s += w[k] * x[k];
    return s;
}

/* One register tile: ROWS weight rows times up to COLS input rows (cols <= COLS live). */
#define DEFINE_TILE(ROWS, COLS)                                                                  \
    static inline void tile_##ROWS##x##COLS(const float *x, const float *w, float *y, int64_t N, \
                                            int64_t K, int64_t k8, int64_t cols) {               \
        __m256 acc[ROWS][COLS];                                                                  \
        _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                                   \
            _Pragma("GCC unroll 8") for (int j = 0; j < COLS; j++) acc[i][j] = _mm256_setzero_ps(); \
        for (int64_t k = 0; k < k8; k += 8) {                                                    \
            __m256 wv[ROWS];                                                                     \
            _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++) wv[i] = _mm256_loadu_ps(w + i * K + k); \
            _Pragma("GCC unroll 8") for (int j = 0; j < COLS; j++) {                             \
                if (j < cols) {                                                                  \
                    __m256 xv = _mm256_loadu_ps(x + j * K + k);                                  \
                    _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                       \
                        acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);                       \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                                   \
            _Pragma("GCC unroll 8") for (int j = 0; j < COLS; j++)                               \
                if (j < cols) y[j * N + i] = finish(acc[i][j], w + i * K, x + j * K, k8, K);    \
    }

DEFINE_TILE(6, 2)
DEFINE_TILE(4, 3)
DEFINE_TILE(1, 1)

/* Splits the weight rows over the threads of torch's own OpenMP pool (libgomp is shared). */
#define DEFINE_LINEAR(ROWS, COLS)                                                                \
    static void linear_##ROWS##x##COLS(const float *x, const float *w, float *y, int64_t M,     \
                                       int64_t N, int64_t K) {                                   \
        const int64_t k8 = K & ~(int64_t)7;                                                      \
        const int64_t blocks = N / ROWS;                                                         \
        _Pragma("omp parallel for schedule(static)")                                             \
        for (int64_t b = 0; b <= blocks; b++) {                                                  \
            int64_t n = b * ROWS;                                                                \
            if (b < blocks) {                                                                    \
                for (int64_t m = 0; m < M; m += COLS)                                            \
                    tile_##ROWS##x##COLS(x + m * K, w + n * K, y + m * N + n, N, K, k8,          \
                                         M - m < COLS ? M - m : COLS);                           \
            } else {                                                                             \
                for (; n < N; n++)                                                               \
                    for (int64_t m = 0; m < M; m++)                                              \
                        tile_1x1(x + m * K, w + n * K, y + m * N + n, N, K, k8, 1);              \
            }                                                                                    \
        }                                                                                        \
    }

DEFINE_LINEAR(6, 2)
DEFINE_LINEAR(4, 3)

void freespec_linear(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K) {
    if (M <= 12) linear_6x2(x, w, y, M, N, K);
    else linear_4x3(x, w, y, M, N, K);
}

/* exp(x) for x <= 0 on 8 lanes (Cephes-style range reduction and polynomial, ~2 ulp).
 * Elementwise, so a value's result never depends on its neighbours. */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}

/* Tree attention whose result depends only on the *logical* key sequence of each query.
 *
 * Query i attends to cache rows [0, past) and then to the new rows past + key_nodes[i, 0..count[i]):
 * its ancestors in depth order, then itself. Plain decoding sees the same keys in the same
 * order at other cache rows, so every reduction below runs identically in both modes:
 * scores come from the batch-invariant linear kernel; the softmax and P·V run over the
 * logical sequence.
 * q: [kv_heads, n * group, D] (query heads grouped by their KV head); keys/values:
 * [kv_heads, capacity, D] of one layer; out: [n, H, D];
 * scores: [kv_heads, n * group, past + n] and probs: [n * H, past + n] floats of scratch.
 */
void freespec_tree_attention(const float *q, const float *keys, const float *values, int64_t capacity,
                             const int64_t *key_nodes, const int64_t *count, int64_t past, int64_t n,
                             int64_t H, int64_t KV, int64_t D, float scale, float *out, float *scores,
                             float *probs) {
    const int64_t group = H / KV, width = past + n;
    for (int64_t g = 0; g < KV; g++)
        freespec_linear(q + g * n * group * D, keys + g * capacity * D, scores + g * n * group * width,
                        n * group, width, D);
    #pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < n * H; task++) {
        const int64_t i = task / H, h = task % H, g = h / group;
        const float *score_row = scores + (g * n * group + i * group + h % group) * width;
        const float *v_head = values + g * capacity * D;
        const int64_t total = past + count[i];
        float *p = probs + task * width;
        #define ROW(t) ((t) < past ? (t) : past + key_nodes[i * n + (t) - past])
        float top = -INFINITY;
        for (int64_t t = 0; t < total; t++) {
            p[t] = score_row[ROW(t)] * scale;
            top = p[t] > top ? p[t] : top;
        }
        /* p = exp(score - top), summed lane-wise by logical index; the tail is zero-padded */
        const __m256 top_v = _mm256_set1_ps(top);
        __m256 lanes = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= total; t += 8) {
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
        const float inverse = 1.0f / horizontal_sum(lanes);
        /* out = sum_t p_t v_t in logical order, then normalise */
        float *o = out + (i * H + h) * D;
        if (D == 64) {  /* the common head size: accumulate in registers */
            __m256 acc[8];
            for (int d = 0; d < 8; d++) acc[d] = _mm256_setzero_ps();
            for (int64_t t2 = 0; t2 < total; t2++) {
                const __m256 pv = _mm256_set1_ps(p[t2]);
                const float *v = v_head + ROW(t2) * D;
                for (int d = 0; d < 8; d++) acc[d] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8 * d), acc[d]);
            }
            const __m256 inverse_v = _mm256_set1_ps(inverse);
            for (int d = 0; d < 8; d++) _mm256_storeu_ps(o + 8 * d, _mm256_mul_ps(acc[d], inverse_v));
        } else {
            for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            for (int64_t t2 = 0; t2 < total; t2++) {
                const float pt = p[t2];
                const float *v = v_head + ROW(t2) * D;
                const __m256 pv = _mm256_set1_ps(pt);
                int64_t d = 0;
                for (; d + 8 <= D; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + d), _mm256_loadu_ps(o + d)));
                for (; d < D; d++) o[d] += pt * v[d];
            }
            for (int64_t d = 0; d < D; d++) o[d] *= inverse;
        }
        #undef ROW
    }
}

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
    for (int64_t i = 0; i < n; i++) {
        const float *row = qkv + i * width;
        const float *c = cos ? cos + i * D : 0, *s = sin ? sin + i * D : 0;
        for (int64_t h = 0; h < H; h++)
            rotate(row + h * D, c, s, q_out + ((h / group) * n * group + i * group + h % group) * D, D);
        for (int64_t g = 0; g < KV; g++) {
            rotate(row + (H + g) * D, c, s, keys + (g * capacity + start + i) * D, D);
            const float *v = row + (H + KV + g) * D;
            float *v_out = values + (g * capacity + start + i) * D;
            for (int64_t d = 0; d < D; d++) v_out[d] = v[d];
        }
    }
}

/* The C interface of the freespec kernels: every exported function and struct, declared once.
 *
 * freespec/kernels/abi.py mirrors this file for ctypes (same names, same field order); change
 * both together. All arrays are row-major and contiguous; shapes are given in brackets. The
 * Python side checks every array's dtype, shape and contiguity before a call (abi.address), so
 * nothing here re-checks them.
 */
#ifndef FREESPEC_H
#define FREESPEC_H

#include <stdint.h>

/* What a call that can fail returns. */
enum { FREESPEC_OK = 0, FREESPEC_OUT_OF_MEMORY = 1, FREESPEC_BAD_MATRIX = 2,
       FREESPEC_NOT_BOUNDED = 3 /* freespec_head_argmax: an input the bound does not cover */ };

/* The kinds of weight matrix: a ggml type id, for a matrix stored in that type (ggml.h's ids:
 * F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q2_K 10, Q3_K 11, Q4_K 12, Q5_K 13, Q6_K 14,
 * IQ2_XXS 16, IQ2_XS 17, IQ3_XXS 18, IQ1_S 19, IQ4_NL 20, IQ3_S 21, IQ2_S 22, IQ4_XS 23, IQ1_M 29, BF16 30,
 * TQ1_0 34, TQ2_0 35;
 * data holds its N rows of blocks exactly as a GGUF file stores
 * them, a bf16/f16/f32 safetensors tensor being the same bytes; K a multiple of the type's block
 * size), or one of these. */
enum {
    FREESPEC_PACKED_Q4 = 1004, /* data: nibbles [N, K/2] (see kernels.c), scales [N, K/32, 2] = (d, m) */
    FREESPEC_PACKED_Q8 = 1008, /* data: int8 [N, K], scales [N, K/32] = d */
    FREESPEC_STACKED = 1100,   /* parts: the rows of num_parts matrices of K columns, stacked in order */
};

/* A weight matrix [N, K]. */
typedef struct Matrix {
    int64_t kind;              /* see above */
    int64_t N, K;
    const void *data;          /* the weights (NULL when stacked) */
    const float *scales;       /* packed kinds' block scales, else NULL */
    const float *bias;         /* [N] or NULL (a stacked matrix's parts have none) */
    const struct Matrix *parts; /* stacked: num_parts matrices, none of them stacked */
    int64_t num_parts;
} Matrix;

/* y[M, N] = x[M, K] @ w[N, K]^T + bias. Every output has the same arithmetic whatever M is (a row's
 * result has the same bits in a call of 1 or of 64 rows), and every kind gives the same bits as
 * the fp32 kind on its weights dequantized by ggml's formulas (gguf.quants.dequantize). Returns
 * FREESPEC_OK, or FREESPEC_BAD_MATRIX (an unknown kind, or parts that do not make the matrix:
 * nothing written). */
int freespec_linear(const Matrix *w, const float *x, float *y, int64_t M);

/* The exact greedy head (see kernels.c). freespec_head_bounds: row_l1[N] >= sum |w[r]| for a Q8_0
 * (GGUF or packed) or Q6_K matrix without bias, else FREESPEC_BAD_MATRIX. freespec_head_codes: for
 * a head of another kind (K % 32 == 0, no bias), int8 codes [N, K] and scales [N, K/32] in the
 * packed Q8 layout, row_l1[N] and row_error[N] (what the codes' weights differ from w's by);
 * FREESPEC_NOT_BOUNDED if a weight is not finite. freespec_head_argmax: out[M] = each row of x
 * [M, K]'s first maximum over freespec_linear's outputs for w, or for `exact` where it is not NULL
 * (then w holds exact's codes and row_error comes with them; row_l1 from the call that made w's
 * bounds), computing in fp32 only the outputs the bound cannot rule out; returns FREESPEC_OK,
 * FREESPEC_BAD_MATRIX, FREESPEC_OUT_OF_MEMORY or FREESPEC_NOT_BOUNDED (x not finite, or logits
 * that could overflow): then out is not written and the caller computes the whole head. With k > 0
 * the same pass also gives each row's k best outputs by their integer approximation (not exact:
 * for drafters), top_values[M, k] and top_ids[M, k] (larger first, the lower id first among
 * equal values), and log_normalizer[M] = log sum exp over all approximations. */
int freespec_head_bounds(const Matrix *w, float *row_l1);
int freespec_head_codes(const Matrix *w, int8_t *codes, float *scales, float *row_l1, float *row_error);
int freespec_head_argmax(const Matrix *w, const float *row_l1, const float *x, int64_t M, int64_t *out,
                         const Matrix *exact, const float *row_error, int64_t k, float *top_values, int64_t *top_ids,
                         float *log_normalizer);

/* out[i, K] = row tokens[i] of w as fp32 (an embedding lookup), the values ggml's formulas give.
 * Returns FREESPEC_OK or FREESPEC_BAD_MATRIX. */
int freespec_rows(const Matrix *w, const int64_t *tokens, int64_t n, float *out);

/* The form the attention kernel reads a tree mask in: for tree_mask [n, n] (1 = token i sees new
 * token j), key_nodes [n, n] lists each row's visible tokens in ascending (= depth) order padded
 * with n, and count [n] says how many there are. Returns 1 if the mask is causal (row i sees
 * exactly 0..i: a prefill chunk), else 0. */
int64_t freespec_tree_layout(const uint8_t *tree_mask, int64_t n, int64_t *key_nodes, int64_t *count);

/* Attention of n new tokens over `past` cached rows plus their tree rows (see kernels.c).
 * q [KV, n * H / KV, D]; keys, values [KV, capacity, D]; key_nodes, count from
 * freespec_tree_layout; out [n, H * D]; probs [KV, n * H / KV, past + n] scratch. */
void freespec_tree_attention(const float *q, const float *keys, const float *values, int64_t capacity,
                             const int64_t *key_nodes, const int64_t *count, int64_t past, int64_t n, int64_t H,
                             int64_t KV, int64_t D, float scale, int64_t causal, float *out, float *probs);

/* The same for a layer with a sliding window or soft-capped scores (Gemma, Mistral, Phi-3): a key
 * at position p is visible to a query at position q iff q - p < window (committed row t holds
 * position t, new token j positions[j] [n]); window 0 or positions NULL: no window. softcap > 0:
 * each scaled score s becomes softcap * tanh(s / softcap). Rows outside a query's window are
 * never read. */
void freespec_window_attention(const float *q, const float *keys, const float *values, int64_t capacity,
                               const int64_t *key_nodes, const int64_t *count, int64_t past, int64_t n, int64_t H,
                               int64_t KV, int64_t D, float scale, int64_t causal, const int64_t *positions,
                               int64_t window, float softcap, float *out, float *probs);

/* Rotary embedding of one layer's fresh queries and keys, and the cache writes: qkv
 * [n, (H + 2 KV) D]; cos, sin [n, D] or NULL (no rotary); rows start .. start + n of keys and
 * values [KV, capacity, D] are written; q_out [KV, n * H / KV, D]. */
void freespec_rope_store(const float *qkv, const float *cos, const float *sin, float *keys, float *values,
                         int64_t capacity, int64_t start, int64_t n, int64_t H, int64_t KV, int64_t D,
                         float *q_out);

/* One Llama-style decoder layer: RMSNorms (weight [hidden], or per head [D]) and its matrices,
 * with Gemma's and Mistral's additions where set. */
typedef struct {
    const float *attn_norm, *mlp_norm, *q_norm, *k_norm; /* q_norm, k_norm: per-head [D] or NULL */
    float attn_eps, mlp_eps, q_eps, k_eps;
    Matrix qkv;     /* [(H + 2 KV) D, hidden] */
    Matrix o;       /* [hidden, H D] */
    Matrix gate_up; /* [2 intermediate, hidden]: rows [gate | up] */
    Matrix down;    /* [hidden, intermediate] */
    const float *post_attn_norm, *post_mlp_norm; /* [hidden] or NULL: Gemma 2/3 norm each block's output */
    float post_attn_eps, post_mlp_eps;
    int64_t window; /* sliding window: a query at position p sees keys at p - window + 1 .. p; 0: all */
    int64_t rotary; /* the rotary table it rotates with: 0 or 1 (Gemma 3: one for local, one for global layers) */
    int64_t interleaved_qk; /* 1: qkv's query and key heads come in llama.cpp's interleaved rotary order (a GGUF
                             * llama file read in place: value 2i of a head is transformers' i, 2i + 1 its
                             * i + D/2); they are put back in transformers' order before anything reads them */
} DecoderLayer;

enum { FREESPEC_SILU = 0, FREESPEC_GELU_TANH = 1 }; /* the gated MLP's activation: act(gate) * up */

/* One sequence of a decoder pass: a request's own KV cache and the rows of the pass that are its. */
typedef struct {
    float *keys, *values;     /* [num_layers, KV, capacity, D]: rows past .. past + n are written */
    int64_t capacity, past;
    int64_t n;                /* its rows: the next n rows of the pass, after the earlier sequences' */
    const uint8_t *tree_mask; /* [n, n]: 1 = its token i sees its new token j; all see its `past` rows */
} DecoderSequence;

/* Everything one pass of freespec_forward_llama reads and writes: the model (set once), then
 * the pass's tokens, rotary rows, sequences and output. A pass carries several sequences (the
 * requests of a batch, each over its own cache): the matmuls run over all their rows at once,
 * attention per sequence over its own cache only. One sequence is the single-request case. */
typedef struct {
    const DecoderLayer *layers;
    int64_t num_layers, hidden, intermediate;
    Matrix embed;            /* [vocab, hidden] */
    const float *final_norm; /* [hidden] */
    float final_eps, scale;  /* scale: of the attention scores */
    int64_t H, KV, D;        /* query heads, key/value heads, head size */
    float embed_scale;       /* embeddings are multiplied by it (Gemma: sqrt(hidden)); 1: not scaled */
    float softcap;           /* scores s become softcap * tanh(s / softcap) (Gemma 2); 0: not capped */
    int64_t activation;      /* FREESPEC_SILU or FREESPEC_GELU_TANH */

    const int64_t *tokens;    /* [n], each in 0 .. vocab - 1 */
    int64_t n;                /* rows of the pass: the sum of the sequences' n */
    const int64_t *positions; /* [n]: each token's position (sliding windows) */
    const float *cos_tables[2]; /* [*, D] each: a layer with rotary r rotates token i by row rope_rows[r][i] */
    const float *sin_tables[2];
    const int64_t *rope_rows[2]; /* [n] each; table 1 only where a layer uses it */
    const DecoderSequence *sequences; /* [num_sequences] */
    int64_t num_sequences;
    const uint8_t *skip;      /* [num_layers]: 1 = leave the layer out; NULL: none */
    float *out;               /* [n, hidden]: final hidden states, after the final norm */
} DecoderPass;

/* Tokens to final hidden states through every decoder layer in one call. Returns FREESPEC_OK,
 * or FREESPEC_OUT_OF_MEMORY (nothing written to out). */
int freespec_forward_llama(const DecoderPass *pass);

/* Per row of logits [rows, V]: the k largest values [rows, k] in descending order with their ids
 * [rows, k] (ties: the lower id first) and, unless log_normalizer is NULL, logsumexp [rows]. */
void freespec_top_k(const float *logits, int64_t rows, int64_t V, int64_t k, float *values, int64_t *ids,
                    float *log_normalizer);

#endif

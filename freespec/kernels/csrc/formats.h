/* The linear layer over matrices stored in a ggml type, read in place (a memory-mapped GGUF or
 * safetensors file needs no copy): y[M, N] = x[M, K] @ W[N, K]^T, where each row of W is K / block
 * weights' blocks exactly as ggml stores them (ggml-common.h), or K 16-bit floats. For each type
 * TYPE_linear(matrix, x, y, M, ldy) and TYPE_row(matrix, r, out) (one row as fp32), which
 * kernels.c's table of matrix kinds dispatches to. See freespec/kernels/formats.py.
 *
 * Included once by kernels.c, after the machinery it shares with the other linear kernels (vec,
 * LANES, tile_sums, the fp32 tiles, DEFINE_LOAD_TILE, BUFFER_ROWS, prefetch); needs F16C (-mf16c).
 *
 * Same bits as the fp32 kernel: each decoder below returns, for vector `step` of a group of 32
 * weights, exactly the fp32 weights gguf.quants.dequantize computes, and the tiles multiply them
 * with the fp32 kernel's FMA sequence and horizontal sum (see the Q4/Q8 note in kernels.c). Every
 * format's weight is scale * code + offset with per-group constants, and every product in ggml's
 * formulas is exact in fp32: an fp16 d (11 significant bits) times a K-quant sub-block scale (Q4_K,
 * Q5_K, Q3_K, IQ4_XS: 6 bits; Q2_K: 4; Q6_K: |sc| <= 127 or 128, 7 bits) times a code (at most 6
 * bits, or one of IQ4's grid values, 7) needs at most 24 bits, and so do d * 8, d * 16, 32 * d * sc.
 * So the only rounding is the one addition of an offset (Q4_1, Q5_1: + m; Q2_K, Q4_K, Q5_K:
 * - dmin * m), and fma(scale, code, offset) rounds the same exact
 * sum once, as ggml's separate multiply and add do; Q4_0's d * (q - 8) equals fma(d, q, -8 d)
 * exactly (but for the sign of a zero weight, which no sum sees: an FMA chain that starts at +0
 * never holds -0). The tests check every format bit for bit.
 */

/* ggml_type ids (ggml.h) and the bytes of one block of each */
enum {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8,
    GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14, GGML_IQ2_XXS = 16,
    GGML_IQ2_XS = 17, GGML_IQ3_XXS = 18, GGML_IQ1_S = 19, GGML_IQ4_NL = 20, GGML_IQ3_S = 21, GGML_IQ2_S = 22,
    GGML_IQ4_XS = 23, GGML_IQ1_M = 29, GGML_BF16 = 30, GGML_TQ1_0 = 34, GGML_TQ2_0 = 35,
};
#define Q4_0_BYTES 18  /* f16 d; qs[16]: element j < 16 is the low nibble of qs[j], 16 + j the high */
#define Q4_1_BYTES 20  /* f16 d, f16 m; qs[16] */
#define Q5_0_BYTES 22  /* f16 d; u32 qh (fifth bit of element j: bit j); qs[16] */
#define Q5_1_BYTES 24  /* f16 d, f16 m; u32 qh; qs[16] */
#define Q8_0_BYTES 34  /* f16 d; i8 qs[32] */
#define Q4_K_BYTES 144 /* 256 weights: f16 d, f16 dmin; scales[12] (6-bit sc, m per 32); qs[128] */
#define Q5_K_BYTES 176 /* 256: d, dmin, scales[12]; qh[32] (fifth bit of element l of group j: bit j of qh[l]); qs[128] */
#define Q6_K_BYTES 210 /* 256: ql[128], qh[64], i8 scales[16] (one per 16), f16 d */
#define Q2_K_BYTES 84  /* 256: scales[16] (4-bit sc | 4-bit m << 4, one per 16), qs[64] (2-bit codes), f16 d, f16 dmin */
#define Q3_K_BYTES 110 /* 256: hmask[32] (third bit of element l of group j: bit j of hmask[l]), qs[64], scales[12], f16 d */
#define IQ4_NL_BYTES 18 /* f16 d; qs[16]: 4-bit indices into the 16 IQ4 values, laid out as Q4_0's codes */
#define IQ4_XS_BYTES 136 /* 256: f16 d, u16 scales_h, scales_l[4] (6-bit scales per 32), qs[128] (16 per group) */
#define IQ3_XXS_BYTES 98 /* 256: f16 d; qs[64] (grid indices, 4 weights each); u32 [8] (per 32: four 7-bit sign indices, a 4-bit scale in bits 28-31) */
#define IQ3_S_BYTES 110 /* 256: f16 d; qs[64] (grid indices' low 8 bits); qh[8] (their ninth bits); signs[32] (a bit a weight); scales[4] (4 bits per 32) */
#define IQ2_XXS_BYTES 66 /* 256: f16 d; per 32: 4 grid indices (8 weights each), u32: four 7-bit sign indices, a 4-bit scale in bits 28-31 */
#define IQ2_XS_BYTES 74 /* 256: f16 d; u16 qs[32] (9-bit grid index, 7-bit sign index); scales[8] (4 bits per 16) */
#define IQ2_S_BYTES 82 /* 256: f16 d; qs[32] (grid indices' low 8 bits); signs[32]; qh[8] (their bits 8-9); scales[8] (4 bits per 16) */
#define IQ1_S_BYTES 50 /* 256: f16 d; qs[32] (grid indices' low 8 bits); u16 qh[8] (per 32: four 3-bit index high parts, a 3-bit scale in bits 12-14, the delta's sign in bit 15) */
#define TQ1_0_BYTES 54 /* 256: qs[48] (5 base-3 digits a byte), qh[4] (4 a byte), f16 d */
#define TQ2_0_BYTES 66 /* 256: qs[64] (2-bit codes: weight 128 h + 32 k + j in bits 2k of qs[32 h + j]), f16 d */
#define IQ1_M_BYTES 56 /* 256: qs[32]; qh[16] (a nibble per 8 weights: 3 index bits, the delta's sign in bit 3); u16 scales[4] (3 bits per 16 weights at bits 0, 3, 6, 9; the f16 d in their bits 12-15) */

/* Integer vectors of LANES 32-bit codes, in the build's width. */
#ifdef FREESPEC_AVX512
typedef __m512i ivec;
#define ivec_set1 _mm512_set1_epi32
#define ivec_and _mm512_and_si512
#define ivec_or _mm512_or_si512
#define ivec_srlv _mm512_srlv_epi32
#define ivec_add _mm512_add_epi32
#define ivec_to_vec _mm512_cvtepi32_ps
#define LANE_INDEX _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
static inline ivec widen_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline ivec widen_i8(const uint8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline ivec ivec_shr4(ivec v) { return _mm512_srli_epi32(v, 4); }
#define ivec_srli _mm512_srli_epi32
/* 16-bit floats to fp32: exact */
static inline vec load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vec load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#else
typedef __m256i ivec;
#define ivec_set1 _mm256_set1_epi32
#define ivec_and _mm256_and_si256
#define ivec_or _mm256_or_si256
#define ivec_srlv _mm256_srlv_epi32
#define ivec_add _mm256_add_epi32
#define ivec_to_vec _mm256_cvtepi32_ps
#define LANE_INDEX _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
static inline ivec widen_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline ivec widen_i8(const uint8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline ivec ivec_shr4(ivec v) { return _mm256_srli_epi32(v, 4); }
#define ivec_srli _mm256_srli_epi32
static inline vec load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline vec load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof(h));
    return _cvtsh_ss(h);
}

static inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

static inline float f16_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* The LANES 4-bit codes in bytes [p, p + LANES): low nibbles, or high ones if `high`. */
static inline ivec nibbles(const uint8_t *p, int high) {
    const ivec q = widen_u8(p);
    return high ? ivec_shr4(q) : ivec_and(q, ivec_set1(15));
}

/* The fifth bits of the LANES codes from element e of a Q5_0/Q5_1 block, as 16 or 0: bit e + l
 * of qh shifted to bit 4 of lane l (from qh << 4 for the first vector). The broadcast of qh is the
 * same for every vector of a block, and the shift counts are constants. */
static inline ivec fifth_bits(const uint8_t *qh_bytes, int e) {
    uint32_t qh;
    memcpy(&qh, qh_bytes, sizeof(qh));
    const ivec counts = ivec_add(LANE_INDEX, ivec_set1(e >= 4 ? e - 4 : 0));
    return ivec_and(ivec_srlv(ivec_set1((int)(e >= 4 ? qh : qh << 4)), counts), ivec_set1(16));
}

/* A format reads a row in units of GROUPS groups of 32 weights (one block; a K-quant's 256-weight
 * super-block is 8 groups). PREPARE(unit, params) computes a unit's per-group constants once per
 * row, DECODE(unit, params, group, step) returns the group's weights e .. e + LANES - 1, e = step *
 * LANES: weight = scale * code + offset. A block's constants are two vectors (BlockParams); a
 * K-quant's are floats in memory, which the decoders broadcast as a group needs them: Q4_K's and
 * Q5_K's scale[g], offset[g] for group g (KParams: both arrays one vector, which k_prepare
 * stores at once), Q6_K's for 16 weights each (UnitParams: i = 2 group + e / 16). */
typedef struct {
    vec scale, offset;
} BlockParams;

typedef struct {
    float scale[8], offset[8];
} KParams;

typedef struct {
    float scale[16], offset[16];
} UnitParams;

/* scale * codes + offset, scale and offset broadcast from a unit's params */
static inline vec scaled_codes(float scale, float offset, ivec codes) {
    return vec_fma(vec_set1(scale), ivec_to_vec(codes), vec_set1(offset));
}

/* Lane `lane` of v in every lane; AVX-512 broadcasts lane 0 by vbroadcastss, without an index
 * vector (a register more for the tiles: Q4_0 and Q5_0 13-20% faster at four input rows). */
static inline vec broadcast_lane(__m128 v, int lane) {
#ifdef FREESPEC_AVX512
    return lane ? _mm512_permutexvar_ps(_mm512_set1_epi32(lane), _mm512_castps128_ps512(v)) : _mm512_broadcastss_ps(v);
#else
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_set1_epi32(lane));
#endif
}

/* The block's first `fields` fp16 values (d; d and m) in fp32, lanes 0 and 1: one conversion for
 * both, where converting each on its own cost twice the vector work. AVX-512 converts straight
 * from memory, 8 bytes (every block is longer): the lanes after the fields hold the block's next
 * bytes and are never read. (The AVX2 build measured Q4_0 17% slower so: it keeps the scalar load.) */
static inline __m128 block_halves(const uint8_t *b, int fields) {
#ifdef FREESPEC_AVX512
    (void)fields;
    return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)b));
#else
    uint32_t bits = 0;
    memcpy(&bits, b, 2 * fields);
    return _mm_cvtph_ps(_mm_cvtsi32_si128((int)bits));
#endif
}

/* scale d, offset factor * d (d * (q - 8) = fma(d, q, -8 d) exactly, see the top) */
static inline void d_prepare(const uint8_t *b, BlockParams *p, float factor) {
    p->scale = broadcast_lane(block_halves(b, 1), 0);
    p->offset = vec_mul(p->scale, vec_set1(factor));
}

/* scale d, offset m */
static inline void dm_prepare(const uint8_t *b, BlockParams *p) {
    const __m128 dm = block_halves(b, 2);
    p->scale = broadcast_lane(dm, 0);
    p->offset = broadcast_lane(dm, 1);
}

static inline vec block_codes(const BlockParams *p, ivec codes) {
    return vec_fma(p->scale, ivec_to_vec(codes), p->offset);
}

/* The LANES weights scale * q + offset of 4-bit codes q (low nibbles of [p, p + LANES), or high
 * ones if `high`). AVX-512 decodes them by table: the 16 weights the codes can stand for,
 * fma(scale, q, offset) for q = 0 .. 15 (the same arithmetic, so the same bits), in one vector,
 * from which vpermps picks each lane's by the low 4 bits of its code; one FMA per group builds it
 * (the compiler shares it between a group's vectors), where converting and scaling cost a
 * conversion and an FMA per vector. AVX2's vpermps holds only 8 values. */
#ifdef FREESPEC_AVX512
#define NIBBLE_VALUES _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
/* table[q] for the 4-bit codes q of [p, p + LANES) (high nibbles if `high`) */
static inline vec nibble_lookup(const uint8_t *p, int high, vec table) {
    const ivec q = widen_u8(p); /* vpermps reads bits 0-3 of each index: no mask needed */
    return _mm512_permutexvar_ps(high ? ivec_shr4(q) : q, table);
}
#endif
static inline vec nibble_codes(const uint8_t *p, int high, vec scale, vec offset) {
#ifdef FREESPEC_AVX512
    return nibble_lookup(p, high, vec_fma(scale, NIBBLE_VALUES, offset));
#else
    return vec_fma(scale, ivec_to_vec(nibbles(p, high)), offset);
#endif
}

/* the 32-weight blocks: element j < 16 is the low nibble of qs[j], 16 + j its high nibble */
static inline void q4_0_prepare(const uint8_t *b, BlockParams *p) { d_prepare(b, p, -8.0f); } /* d * (q - 8) */
static inline vec q4_0_decode(const uint8_t *b, const BlockParams *p, int group, int step) {
    (void)group;
    const int e = step * LANES;
#ifdef FREESPEC_AVX512 /* ggml's fl((q - 8) d), a product: the table without an offset */
    const vec values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    return nibble_lookup(b + 2 + e % 16, e >= 16, vec_mul(p->scale, values));
#else
    return nibble_codes(b + 2 + e % 16, e >= 16, p->scale, p->offset);
#endif
}

#define q4_1_prepare dm_prepare /* d * q + m */
static inline vec q4_1_decode(const uint8_t *b, const BlockParams *p, int group, int step) {
    (void)group;
    const int e = step * LANES;
    return nibble_codes(b + 4 + e % 16, e >= 16, p->scale, p->offset);
}

/* The LANES weights of a Q5_0/Q5_1 block from element e = step * LANES: qs at `qs`, qh at `qh`.
 * AVX-512 decodes by table, like nibble_codes, and the step's 16 fifth bits (bits e .. e + 15 of
 * qh) are a lane mask. Q5_0's weight fl((q - 16) d) is exact (an fp16 d times a 5-bit integer
 * fits fp32's 24 bits), so vpermps picks d (q4 - 16) from 16 values by the low nibble q4 alone
 * and the lanes with a fifth bit add 16 d, exactly (for finite d): one vector operation a step
 * fewer than a 32-value table. Q5_1's fl(d q + m) is rounded: there the fifth bit sets bit 4 of
 * the index into a 32-value table (vpermt2ps). */
static inline vec five_bit_codes(const uint8_t *qs, const uint8_t *qh_bytes, int step, const BlockParams *p,
                                 int centered) {
#ifdef FREESPEC_AVX512
    uint32_t qh;
    memcpy(&qh, qh_bytes, sizeof(qh));
    const __mmask16 fifth = (__mmask16)(step ? qh >> 16 : qh);
    const ivec q = widen_u8(qs);
    if (centered) { /* Q5_0: scale d, offset -16 d */
        const vec low = _mm512_setr_ps(-16, -15, -14, -13, -12, -11, -10, -9, -8, -7, -6, -5, -4, -3, -2, -1);
        const vec w = _mm512_permutexvar_ps(step ? ivec_shr4(q) : q, vec_mul(p->scale, low));
        return _mm512_mask_sub_ps(w, fifth, w, p->offset);
    }
    const ivec four = step ? ivec_shr4(q) : ivec_and(q, ivec_set1(15));
    const ivec index = _mm512_mask_or_epi32(four, fifth, four, ivec_set1(16));
    const vec low = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const vec high = _mm512_setr_ps(16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
    return _mm512_permutex2var_ps(vec_fma(p->scale, low, p->offset), index, vec_fma(p->scale, high, p->offset));
#else
    (void)centered;
    const int e = step * LANES;
    return block_codes(p, ivec_or(nibbles(qs + e % 16, e >= 16), fifth_bits(qh_bytes, e)));
#endif
}

static inline void q5_0_prepare(const uint8_t *b, BlockParams *p) { d_prepare(b, p, -16.0f); } /* d * (q - 16) */
static inline vec q5_0_decode(const uint8_t *b, const BlockParams *p, int group, int step) {
    (void)group;
    return five_bit_codes(b + 6, b + 2, step, p, 1);
}

#define q5_1_prepare dm_prepare /* d * q + m */
static inline vec q5_1_decode(const uint8_t *b, const BlockParams *p, int group, int step) {
    (void)group;
    return five_bit_codes(b + 8, b + 4, step, p, 0);
}

static inline void q8_0_prepare(const uint8_t *b, BlockParams *p) { /* d * q */
    p->scale = broadcast_lane(block_halves(b, 1), 0);
}
static inline vec q8_0_decode(const uint8_t *b, const BlockParams *p, int group, int step) {
    (void)group;
    return vec_mul(p->scale, ivec_to_vec(widen_i8(b + 2 + step * LANES)));
}

/* Q4_K, Q5_K: scale[j] = d * sc_j, offset[j] = -(dmin * m_j), with the 6-bit sc_j, m_j of
 * ggml's get_scale_min_k4 unpacked for all eight groups at once (as ggml's own kernels do): bytes
 * [sc 0-3, sc 4-7, m 0-3, m 4-7] in 32-bit lanes. AVX-512 unpacks them in a vector register and
 * scales all sixteen in one vector (4-14% faster than the scalar words below at M = 1 to 4),
 * stored at once (an extract and a second store cost the Zen 4 one-input tile 4%); in the AVX2
 * build that cost 10% at M = 4. */
static inline void k_prepare(const uint8_t *b, KParams *p) {
#ifdef FREESPEC_AVX512
    const __m128i q = _mm_loadu_si128((const __m128i *)(b + 4)); /* scale words q0 q1 q2, 4 bytes of qs */
    const __m128i low = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(q, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4)),
                                      _mm_setr_epi32(0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F));
    const __m128i high = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(q, _MM_SHUFFLE(1, 1, 0, 0)), 2),
                                       _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    /* d in lanes 0-7, -dmin in 8-15 (negating is exact), times sc and m */
    const __m128 dm = _mm_xor_ps(block_halves(b, 2), _mm_setr_ps(0.0f, -0.0f, 0.0f, 0.0f));
    const __m512 factors = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                                 _mm512_castps128_ps512(dm));
    const __m512 constants = _mm512_mul_ps(factors, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_or_si128(low, high))));
    _mm512_storeu_ps(p->scale, constants); /* scale[8], then offset[8] */
#else
    uint32_t words[3];
    memcpy(words, b + 4, sizeof(words));
    const uint32_t low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu, bits45 = 0x30303030u;
    const __m128i packed = _mm_setr_epi32((int)(words[0] & low6), (int)((words[2] & low4) | ((words[0] >> 2) & bits45)),
                                          (int)(words[1] & low6),
                                          (int)(((words[2] >> 4) & low4) | ((words[1] >> 2) & bits45)));
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(packed));
    const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(packed, packed)));
    _mm256_storeu_ps(p->scale, _mm256_mul_ps(_mm256_set1_ps(f16_at(b)), sc));
    _mm256_storeu_ps(p->offset, _mm256_mul_ps(_mm256_set1_ps(-f16_at(b + 2)), m));
#endif
}

/* 64-weight chunks: 32 low nibbles of qs, then the same 32 bytes' high nibbles. AVX-512 builds
 * the group's table as scale * q + offset by a multiply and an add that read scale and offset
 * from the params by embedded broadcast: the same bits as the FMA (the product is exact, see the
 * top), but no broadcast into a register, which is a shuffle and shares the one 512-bit shuffle
 * unit of a Zen 4 core with vpermps and vpmovzxbd (benchmarks/vector_ports.py; with the one
 * store of k_prepare, the one-input tile 1.14x faster there, 1.10x at two inputs). */
static inline vec q4_k_decode(const uint8_t *b, const KParams *p, int group, int step) {
#ifdef FREESPEC_AVX512
    const vec table = vec_add(vec_mul(NIBBLE_VALUES, vec_set1(p->scale[group])), vec_set1(p->offset[group]));
    return nibble_lookup(b + 16 + (group >> 1) * 32 + step * LANES, group & 1, table);
#else
    return nibble_codes(b + 16 + (group >> 1) * 32 + step * LANES, group & 1, vec_set1(p->scale[group]),
                        vec_set1(p->offset[group]));
#endif
}

/* The codes of vector `step` of a group whose 32 codes are the bytes of `codes`. */
static inline ivec step_codes(__m256i codes, int step) {
#ifdef FREESPEC_AVX512
    return _mm512_cvtepu8_epi32(step ? _mm256_extracti128_si256(codes, 1) : _mm256_castsi256_si128(codes));
#else
    const __m128i half = step >= 2 ? _mm256_extracti128_si256(codes, 1) : _mm256_castsi256_si128(codes);
    return _mm256_cvtepu8_epi32(step & 1 ? _mm_unpackhi_epi64(half, half) : half);
#endif
}

/* A group's 32 codes as bytes: nibbles of qs (high ones if `high`) with two more bits taken from
 * qh at bit `shift` and placed at bits 4 (and 5: `mask` 0x30) - computed once per group, shared by
 * its vectors; byte-wise shifts through 16-bit lanes, the mask drops what crosses bytes. */
static inline __m256i group_codes(const uint8_t *qs, int high, const uint8_t *qh, int shift, int mask) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), q = _mm256_loadu_si256((const __m256i *)qs);
    const __m256i nib = _mm256_and_si256(high ? _mm256_srli_epi16(q, 4) : q, low4);
    const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
    const __m256i bits = shift <= 4 ? _mm256_slli_epi16(h, 4 - shift) : _mm256_srli_epi16(h, shift - 4);
    return _mm256_or_si256(nib, _mm256_and_si256(bits, _mm256_set1_epi8((char)mask)));
}

static inline vec q5_k_decode(const uint8_t *b, const KParams *p, int group, int step) {
    /* fifth bit of element l of group j: bit j of qh[l] */
    const __m256i codes = group_codes(b + 48 + (group >> 1) * 32, group & 1, b + 16, group, 0x10);
    return scaled_codes(p->scale[group], p->offset[group], step_codes(codes, step));
}

/* Q6_K: (d sc_i) (q - 32) for the 16 weights of i, ggml's fl(fl(d sc_i) (q - 32)): AVX2 as
 * fma(d sc_i, q, -32 d sc_i) (the product is exact inside the FMA, so it rounds the same once),
 * AVX-512 as (d sc_i / 4) times the signed byte 4 (q - 32), one broadcast a vector fewer: both
 * products are exact and equal, so the bits are ggml's.
 * Each 128-weight half: low nibbles of ql[0..63], then their high nibbles; the two high bits of
 * its group `quarter` are bits 2 quarter and 2 quarter + 1 of qh[l]. AVX-512 assembles all 256
 * codes as bytes once per unit, two groups a vector, and each vector widens its 16 bytes from
 * there. A code's byte holds q in bits 2-7 with bit 7 flipped, which reads as the signed 4 (q - 32):
 * four operations a vector (two shifts, a ternary logic to merge, one to clear bits 0-1 and flip
 * bit 7), where q - 32 in bits 0-5 took nine (Zen 4, one input row, resident: 3.9 -> 3.3 cycles
 * per 16 weights). */
typedef struct {
    UnitParams unit;
#ifdef FREESPEC_AVX512
    uint8_t codes[256] __attribute__((aligned(64)));
#endif
} Q6KParams;

static inline void q6_k_prepare(const uint8_t *b, Q6KParams *p) {
    const __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192));
#ifdef FREESPEC_AVX512
    const __m256 d = _mm256_set1_ps(f16_at(b + 208) * 0.25f); /* exact: the codes are 4 (q - 32) */
#else
    const __m256 d = _mm256_set1_ps(f16_at(b + 208));
#endif
    const __m256 low = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
    const __m256 high = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(sc, sc))));
    _mm256_storeu_ps(p->unit.scale, low);
    _mm256_storeu_ps(p->unit.scale + 8, high);
#ifdef FREESPEC_AVX512
    /* nibbles to bits 2-5 (shifts through 32-bit lanes: what crosses bytes is masked off), qh bits
     * 0-1, 2-3 (quarters 0, 1) and 4-5, 6-7 (quarters 2, 3) to bits 6-7 */
    const __m512i nibble_bits = _mm512_set1_epi8(0x3C), keep = _mm512_set1_epi8((char)0xFC),
                  top = _mm512_set1_epi8((char)0x80);
    const __m512i first_up = _mm512_setr_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4);
    const __m512i second_up = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int half = 0; half < 2; half++) {
        const __m512i ql = _mm512_loadu_si512(b + half * 64);
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + half * 32)));
        /* 0xE4: a where the mask is set, else b; 0x6A: (a & b) ^ c */
        const __m512i first = _mm512_ternarylogic_epi32(_mm512_slli_epi32(ql, 2), _mm512_sllv_epi32(qh, first_up), nibble_bits, 0xE4);
        const __m512i second = _mm512_ternarylogic_epi32(_mm512_srli_epi32(ql, 2), _mm512_sllv_epi32(qh, second_up), nibble_bits, 0xE4);
        _mm512_store_si512(p->codes + half * 128, _mm512_ternarylogic_epi32(first, keep, top, 0x6A));
        _mm512_store_si512(p->codes + half * 128 + 64, _mm512_ternarylogic_epi32(second, keep, top, 0x6A));
    }
    /* the decoders widen from memory (a load and one shuffle), where the compiler would otherwise
     * keep the codes in registers and extract each 16 bytes with a second shuffle */
    __asm__("" : "+m"(p->codes));
#else
    const __m256 minus32 = _mm256_set1_ps(-32.0f);
    _mm256_storeu_ps(p->unit.offset, _mm256_mul_ps(minus32, low));
    _mm256_storeu_ps(p->unit.offset + 8, _mm256_mul_ps(minus32, high));
#endif
}

static inline vec q6_k_decode(const uint8_t *b, const Q6KParams *p, int group, int step) {
#ifdef FREESPEC_AVX512
    (void)b;
    const ivec codes = widen_i8(p->codes + group * 32 + step * LANES); /* q - 32 */
    return vec_mul(vec_set1(p->unit.scale[2 * group + step]), ivec_to_vec(codes));
#else
    const int half = group >> 2, quarter = group & 3;
    const ivec codes = step_codes(group_codes(b + half * 64 + (quarter & 1) * 32, quarter >= 2, b + 128 + half * 32, 2 * quarter, 0x30), step);
    const int index = 2 * group + step * LANES / 16;
    return scaled_codes(p->unit.scale[index], p->unit.offset[index], codes);
#endif
}

/* The 2-bit and 3-bit K-quants: a weight is (d sc_i) q - dmin m_i (Q2_K) or (d (sc_i - 32)) (q - 4)
 * (Q3_K, q of 3 bits: a code of 2 bits with its third bit from hmask), with 16 sub-blocks of 16
 * weights, one vector's worth in the AVX-512 build. Both products are exact (at most 11 + 6 + 3
 * bits), so Q2_K's one rounding is the offset's addition, fma(scale, q, offset), and Q3_K's weight
 * is a product. Group g of 32 weights has its two low bits in bits 2 (g % 4) of the 32 bytes of qs
 * at 32 (g / 4); a widening of 16 qs bytes serves four groups. The AVX-512 build decodes by table
 * (vpermps reads an index's bits 0-3, so the 4 or 8 weights a sub-block's codes stand for are
 * repeated to 16 and no mask is needed): Zen 4, one thread, resident, G weights/s at one and four
 * input rows, Q2_K 12.8 / 7.9 -> 16.6 / 9.0 against its codes assembled as bytes once per unit
 * and converted, Q3_K 13.8 / 7.8 -> 14.5 / 8.8 (Q4_K 19.1 / 9.8). The AVX2 build converts Q2_K's
 * codes, and assembles Q3_K's as signed bytes q - 4 once per unit. */
typedef struct {
    float scale[16], offset[16];
} Q2KParams;

typedef struct {
    float scale[16];
#ifndef FREESPEC_AVX512
    int8_t codes[256] __attribute__((aligned(32)));
#endif
} Q3KParams;

#ifndef FREESPEC_AVX512
/* the 2-bit codes of group g: bits 2 (g % 4) of the 32 bytes at qs + 32 (g / 4), as bytes */
static inline __m256i two_bit_codes(const uint8_t *qs, int g) {
    const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * (g >> 2)));
    return _mm256_and_si256(_mm256_srli_epi16(q, 2 * (g & 3)), _mm256_set1_epi8(3));
}
#endif

/* 16 floats factor * value[i] of 16 bytes, into out[16] */
static inline void scaled_bytes(__m128i bytes, float factor, int is_signed, float *out) {
    const __m256 f = _mm256_set1_ps(factor);
    const __m128i upper = _mm_unpackhi_epi64(bytes, bytes);
    const __m256i low = is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
    const __m256i high = is_signed ? _mm256_cvtepi8_epi32(upper) : _mm256_cvtepu8_epi32(upper);
    _mm256_storeu_ps(out, _mm256_mul_ps(f, _mm256_cvtepi32_ps(low)));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(f, _mm256_cvtepi32_ps(high)));
}

static inline void q2_k_prepare(const uint8_t *b, Q2KParams *p) {
    const __m128i sc = _mm_loadu_si128((const __m128i *)b), low4 = _mm_set1_epi8(0x0F);
    scaled_bytes(_mm_and_si128(sc, low4), f16_at(b + 80), 0, p->scale);
    scaled_bytes(_mm_and_si128(_mm_srli_epi16(sc, 4), low4), -f16_at(b + 82), 0, p->offset); /* negating is exact */
}

static inline vec q2_k_decode(const uint8_t *b, const Q2KParams *p, int group, int step) {
    const int i = 2 * group + step * LANES / 16; /* the sub-block of 16 */
    const ivec q = widen_u8(b + 16 + 32 * (group >> 2) + step * LANES);
#ifdef FREESPEC_AVX512
    const vec values = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
    const vec table = vec_add(vec_mul(values, vec_set1(p->scale[i])), vec_set1(p->offset[i]));
    return _mm512_permutexvar_ps(ivec_srli(q, 2 * (group & 3)), table);
#else
    return scaled_codes(p->scale[i], p->offset[i], ivec_and(ivec_srli(q, 2 * (group & 3)), ivec_set1(3)));
#endif
}

/* Q3_K's 16 scales sc_i - 32: the low 4 bits of sub-block i are nibble i / 8 of scales[i % 8], the
 * high 2 bits are bits 2 (i / 4) of scales[8 + i % 4] (ggml's dequantize_row_q3_K). */
static inline void q3_k_prepare(const uint8_t *b, Q3KParams *p) {
    const uint8_t *scales = b + 96;
    const __m128i l8 = _mm_loadl_epi64((const __m128i *)scales), low4 = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(l8, low4), _mm_and_si128(_mm_srli_epi16(l8, 4), low4));
    uint32_t h;
    memcpy(&h, scales + 8, sizeof(h));
    const __m128i high = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)h), _mm_setr_epi32(0, 2, 4, 6)),
                                       _mm_set1_epi8(3));
    const __m128i sc = _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi32(high, 4)), _mm_set1_epi8(32));
    scaled_bytes(sc, f16_at(b + 108), 1, p->scale);
#ifndef FREESPEC_AVX512
    const __m256i hmask = _mm256_loadu_si256((const __m256i *)b), one = _mm256_set1_epi8(1);
    for (int g = 0; g < 8; g++) { /* q - 4 = low bits + 4 (third bit) - 4 */
        const __m256i third = _mm256_and_si256(_mm256_srli_epi16(hmask, g), one);
        const __m256i q = _mm256_or_si256(two_bit_codes(b + 32, g), _mm256_slli_epi16(third, 2));
        _mm256_store_si256((__m256i *)(p->codes + 32 * g), _mm256_sub_epi8(q, _mm256_set1_epi8(4)));
    }
    __asm__("" : "+m"(p->codes));
#endif
}

static inline vec q3_k_decode(const uint8_t *b, const Q3KParams *p, int group, int step) {
    const float scale = p->scale[2 * group + step * LANES / 16];
#ifdef FREESPEC_AVX512
    /* vpermps by bits 0-3: the two low bits of the code (bits 2 (g % 4) of its qs byte), its third
     * bit (bit g of its hmask byte) moved to bit 2, whatever is above; the 8 weights
     * d (sc - 32) (q - 4) twice */
    const vec values = _mm512_setr_ps(-4, -3, -2, -1, 0, 1, 2, 3, -4, -3, -2, -1, 0, 1, 2, 3);
    const ivec low = ivec_srli(widen_u8(b + 32 + 32 * (group >> 2) + step * LANES), 2 * (group & 3));
    const ivec h = widen_u8(b + step * LANES);
    const ivec third = group >= 2 ? ivec_srli(h, group - 2) : _mm512_slli_epi32(h, 2 - group);
    const ivec index = _mm512_ternarylogic_epi32(low, third, ivec_set1(3), 0xE4); /* low where 3 is set, else third */
    return _mm512_permutexvar_ps(index, vec_mul(values, vec_set1(scale)));
#else
    (void)b;
    const ivec codes = widen_i8((const uint8_t *)p->codes + 32 * group + step * LANES); /* q - 4 */
    return vec_mul(vec_set1(scale), ivec_to_vec(codes));
#endif
}

/* IQ4_NL and IQ4_XS: a weight is d kvalue[q] (IQ4_XS: (d (ls - 32)) kvalue[q], with a 6-bit ls per
 * group of 32) for 4-bit indices q into 16 fixed int8 values; both products exact (at most 11 + 6
 * + 7 bits). A group's 32 indices are the low nibbles of its 16 bytes, then their high nibbles,
 * as Q4_0's codes. AVX-512 decodes by table (the 16 weights scale * kvalue[q] in one vector, as
 * nibble_lookup); AVX2 looks the int8 values up by byte shuffle and scales them. */
#ifdef FREESPEC_AVX512
#define IQ4_VALUES _mm512_setr_ps(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
#else
/* kvalue[q] for the 8 indices of element e of a group whose 16 index bytes are at p: low nibbles
 * for e < 16, high ones after. The 16 values of a half are looked up at once, shared by its two
 * vectors. */
static inline ivec iq4_values(const uint8_t *p, int e) {
    const __m128i table = _mm_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
    const __m128i q = _mm_loadu_si128((const __m128i *)p);
    const __m128i values = _mm_shuffle_epi8(table, _mm_and_si128(e >= 16 ? _mm_srli_epi16(q, 4) : q, _mm_set1_epi8(15)));
    return _mm256_cvtepi8_epi32(e % 16 ? _mm_unpackhi_epi64(values, values) : values);
}
#endif

#define iq4_nl_prepare q8_0_prepare /* d * kvalue[q] */
static inline vec iq4_nl_decode(const uint8_t *b, const BlockParams *p, int group, int step) {
    (void)group;
    const int e = step * LANES;
#ifdef FREESPEC_AVX512
    return nibble_lookup(b + 2 + e % 16, e >= 16, vec_mul(p->scale, IQ4_VALUES));
#else
    return vec_mul(p->scale, ivec_to_vec(iq4_values(b + 2, e)));
#endif
}

typedef struct {
    float scale[8]; /* d (ls_g - 32) */
} IQ4XSParams;

/* ls_g: bits 4 g .. 4 g + 3 of scales_l (as one little-endian word), and bits 2 g, 2 g + 1 of scales_h as its bits 4-5 */
static inline void iq4_xs_prepare(const uint8_t *b, IQ4XSParams *p) {
    uint16_t high;
    uint32_t low;
    memcpy(&high, b + 2, sizeof(high));
    memcpy(&low, b + 4, sizeof(low));
    const __m256i ls = _mm256_or_si256(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)low), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                         _mm256_set1_epi32(15)),
        _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(high), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                           _mm256_set1_epi32(3)), 4));
    const __m256 centered = _mm256_cvtepi32_ps(_mm256_sub_epi32(ls, _mm256_set1_epi32(32)));
    _mm256_storeu_ps(p->scale, _mm256_mul_ps(_mm256_set1_ps(f16_at(b)), centered));
}
static inline vec iq4_xs_decode(const uint8_t *b, const IQ4XSParams *p, int group, int step) {
#ifdef FREESPEC_AVX512
    return nibble_lookup(b + 8 + 16 * group, step, vec_mul(IQ4_VALUES, vec_set1(p->scale[group])));
#else
    const int e = step * LANES;
    return vec_mul(vec_set1(p->scale[group]), ivec_to_vec(iq4_values(b + 8 + 16 * group, e)));
#endif
}

/* The grid types IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S: each 4 weights (IQ3) or 8 (IQ2) are one
 * entry of a fixed grid (iq_grids.h: 256 to 1024 entries of small positive integers), each weight
 * has a sign bit, and each 32 (IQ3, IQ2_XXS) or 16 weights a scale: the weight is db * grid * sign
 * with db = d (0.5 + s) / 2 (IQ3_XXS), d (1 + 2 s) (IQ3_S) or d (0.5 + s) / 4 (IQ2); IQ3_XXS's,
 * IQ2_XXS's and IQ2_XS's 8 signs come from a 7-bit index, the eighth bit the parity. Every product
 * is exact (at most 11 + 5 + 6 bits), so db times the signed grid value is gguf's weight. A unit's
 * 256 signed values are assembled once as bytes, and each vector widens, converts and scales its
 * LANES of them. The AVX2 build and IQ3_XXS (whose byte indices need no arithmetic) assemble eight
 * bytes at a time in a 64-bit word (table lookups); the AVX-512 build gathers IQ3_S's and the IQ2
 * types' entries 64 weights at a time (store_signed). Zen 4, one thread, resident, G weights/s at
 * one / four input rows, words -> gathers: IQ3_S 4.5 / 3.5 -> 6.2 / 4.7, IQ2_XXS 5.8 / 4.4 ->
 * 6.6 / 4.8, IQ2_S 4.5 / 3.6 -> 5.1 / 4.2, IQ2_XS 4.8 / 3.9 -> 4.8 / 4.6; IQ3_XXS gathered ran
 * 5.2 / 4.2 against its words' 5.8 / 4.5, so it keeps them. Assembling the words and then negating
 * them 64 at a time read each 64 bytes right after eight 8-byte stores, which the store buffer
 * cannot forward: IQ3_XXS 3.6. */
#include "iq_grids.h"

typedef struct {
    float scale[16]; /* per 16 weights */
    int8_t codes[256] __attribute__((aligned(64)));
} GridParams;

/* the 8 signs of a 7-bit sign index: the eighth is its parity */
static inline unsigned parity_signs(unsigned k) { return k | (unsigned)__builtin_parity(k) << 7; }

/* The eight bytes of v, byte j negated where bit j of `signs` is set. No byte of v is 0 (grid
 * values are at least 1), so (v ^ 0xff) + 1 negates a byte without carrying into the next. */
static inline uint64_t signed_bytes(uint64_t v, unsigned signs) {
    const uint64_t mask = iq_sign_masks[signs];
    return (v ^ mask) + (mask & 0x0101010101010101ull);
}

#ifdef FREESPEC_AVX512
/* AVX-512 assembles a unit's codes 64 at a time: grid entries gathered (two 8-lane gathers: on
 * Zen 4 faster than one of 16 lanes and than scalar loads), the bytes negated where their bit of
 * `negative` is set (one masked subtraction), stored. */
static inline void store_signed(int8_t *codes, __m512i magnitudes, uint64_t negative) {
    _mm512_store_si512(codes, _mm512_mask_sub_epi8(magnitudes, (__mmask64)negative, _mm512_setzero_si512(), magnitudes));
}
/* the 16 four-byte entries of an IQ3 grid at `index` */
static inline __m512i iq3_entries(const uint32_t *grid, __m512i index) {
    const __m256i low = _mm256_i32gather_epi32((const int *)grid, _mm512_castsi512_si256(index), 4);
    const __m256i high = _mm256_i32gather_epi32((const int *)grid, _mm512_extracti64x4_epi64(index, 1), 4);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}
/* the 8 eight-byte entries of an IQ2 grid at `index` */
static inline __m512i iq2_entries(const uint64_t *grid, __m256i index) {
    const __m256i low = _mm256_i32gather_epi64((const long long *)grid, _mm256_castsi256_si128(index), 8);
    const __m256i high = _mm256_i32gather_epi64((const long long *)grid, _mm256_extracti128_si256(index, 1), 8);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}
/* The four sign bytes of the 7-bit sign indices at bits 0, 7, 14 and 21 of `aux`, each with its
 * parity as bit 7 (parity_signs four at a time: the fields spread to bytes, each byte's bits
 * folded onto its bit 0, which no other byte's bits reach). */
static inline uint32_t parity_sign_bytes(uint32_t aux) {
    const uint32_t k = (aux & 0x7Fu) | ((aux << 1) & 0x7F00u) | ((aux << 2) & 0x7F0000u) | ((aux << 3) & 0x7F000000u);
    uint32_t t = k ^ (k >> 4);
    t ^= t >> 2;
    t ^= t >> 1;
    return k | (t & 0x01010101u) << 7;
}
#endif

static inline void iq3_xxs_prepare(const uint8_t *b, GridParams *p) {
    const float d = f16_at(b);
    for (int g = 0; g < 8; g++) {
        uint32_t aux;
        memcpy(&aux, b + 66 + 4 * g, sizeof(aux));
        p->scale[2 * g] = p->scale[2 * g + 1] = d * (0.5f + (float)(aux >> 28)) * 0.5f;
        for (int l = 0; l < 4; l++) { /* 8 weights: two grid entries, a sign index */
            const uint8_t *qs = b + 2 + 8 * g + 2 * l;
            const uint64_t r = signed_bytes(iq3xxs_grid[qs[0]] | (uint64_t)iq3xxs_grid[qs[1]] << 32,
                                            parity_signs((aux >> (7 * l)) & 127));
            memcpy(p->codes + 32 * g + 8 * l, &r, sizeof(r));
        }
    }
    __asm__("" : "+m"(p->codes)); /* widened from memory (see q6_k_prepare) */
}

static inline void iq3_s_prepare(const uint8_t *b, GridParams *p) {
    const float d = f16_at(b);
    const uint8_t *qs = b + 2, *signs = b + 74, *scales = b + 106;
    uint64_t ninth; /* bit c: index c's bit 8 */
    memcpy(&ninth, b + 66, sizeof(ninth));
    for (int g = 0; g < 8; g++)
        p->scale[2 * g] = p->scale[2 * g + 1] = d * (float)(1 + 2 * ((scales[g / 2] >> (4 * (g % 2))) & 15));
#ifdef FREESPEC_AVX512
    for (int j = 0; j < 4; j++) { /* entries 16 j .. 16 j + 15: index bits 0-7 in qs, bit 8 in qh */
        const __m512i ninths = _mm512_srlv_epi32(_mm512_set1_epi32((int)(ninth >> (16 * j))), LANE_INDEX);
        const __m512i index = _mm512_or_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16 * j))),
                                              _mm512_slli_epi32(_mm512_and_si512(ninths, _mm512_set1_epi32(1)), 8));
        uint64_t negative; /* a bit a weight */
        memcpy(&negative, signs + 8 * j, sizeof(negative));
        store_signed(p->codes + 64 * j, iq3_entries(iq3s_grid, index), negative);
    }
#else
    for (int g = 0; g < 8; g++)
        for (int l = 0; l < 4; l++) {
            const int c = 8 * g + 2 * l; /* the group's 4-weight entries c and c + 1: index bits 0-7 in qs, bit 8 in qh */
            const unsigned first = qs[c] | (unsigned)((ninth >> c) & 1) << 8;
            const unsigned second = qs[c + 1] | (unsigned)((ninth >> (c + 1)) & 1) << 8;
            const uint64_t r = signed_bytes(iq3s_grid[first] | (uint64_t)iq3s_grid[second] << 32, signs[4 * g + l]);
            memcpy(p->codes + 32 * g + 8 * l, &r, sizeof(r));
        }
#endif
    __asm__("" : "+m"(p->codes));
}

/* d (0.5 + s) / 4 for the 16 4-bit scales s of `scales` (IQ2_XS, IQ2_S: one per 16 weights) */
static inline void iq2_scales(const uint8_t *scales, float d, GridParams *p) {
    for (int i = 0; i < 16; i++) p->scale[i] = d * (0.5f + (float)((scales[i / 2] >> (4 * (i % 2))) & 15)) * 0.25f;
}

/* an IQ2_XXS group's scale d (0.5 + s) / 4, s in bits 28-31 of its sign word */
static inline float iq2_xxs_scale(float d, uint32_t aux) { return d * (0.5f + (float)(aux >> 28)) * 0.25f; }

static inline void iq2_xxs_prepare(const uint8_t *b, GridParams *p) {
    const float d = f16_at(b);
#ifdef FREESPEC_AVX512
    uint32_t aux[8]; /* after each group's four grid indices: four 7-bit sign indices, the scale in bits 28-31 */
    for (int g = 0; g < 8; g++) {
        memcpy(aux + g, b + 2 + 8 * g + 4, sizeof(aux[g]));
        p->scale[2 * g] = p->scale[2 * g + 1] = iq2_xxs_scale(d, aux[g]);
    }
    for (int j = 0; j < 4; j++) { /* groups 2j, 2j + 1: their indices are bytes 0-3 of each 8 */
        uint64_t bytes;
        memcpy(&bytes, b + 2 + 16 * j, sizeof(bytes)); /* group 2j's 8 bytes; 2j + 1's indices follow at 8 */
        uint32_t second;
        memcpy(&second, b + 2 + 16 * j + 8, sizeof(second));
        const __m256i index = _mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)second, (int)(uint32_t)bytes));
        store_signed(p->codes + 64 * j, iq2_entries(iq2xxs_grid, index),
                     parity_sign_bytes(aux[2 * j]) | (uint64_t)parity_sign_bytes(aux[2 * j + 1]) << 32);
    }
#else /* one group at a time (an array of the eight sign words made this loop 7% slower) */
    for (int g = 0; g < 8; g++) {
        uint32_t aux; /* after the group's four grid indices */
        memcpy(&aux, b + 2 + 8 * g + 4, sizeof(aux));
        p->scale[2 * g] = p->scale[2 * g + 1] = iq2_xxs_scale(d, aux);
        for (int l = 0; l < 4; l++) {
            const uint64_t r = signed_bytes(iq2xxs_grid[b[2 + 8 * g + l]], parity_signs((aux >> (7 * l)) & 127));
            memcpy(p->codes + 32 * g + 8 * l, &r, sizeof(r));
        }
    }
#endif
    __asm__("" : "+m"(p->codes));
}

static inline void iq2_xs_prepare(const uint8_t *b, GridParams *p) {
    iq2_scales(b + 66, f16_at(b), p);
#ifdef FREESPEC_AVX512
    for (int h = 0; h < 2; h++) { /* entries 16 h .. 16 h + 15: u16 each, bits 0-8 the grid index, 9-15 the sign index */
        const __m512i q = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + 2 + 32 * h)));
        const __m512i k = _mm512_srli_epi32(q, 9); /* parity_signs sixteen at a time */
        __m512i t = _mm512_xor_si512(k, _mm512_srli_epi32(k, 4));
        t = _mm512_xor_si512(t, _mm512_srli_epi32(t, 2));
        t = _mm512_xor_si512(t, _mm512_srli_epi32(t, 1));
        const __m128i sign_bytes = _mm512_cvtepi32_epi8(_mm512_or_si512(k, _mm512_slli_epi32(_mm512_and_si512(t, _mm512_set1_epi32(1)), 7)));
        const __m512i index = _mm512_and_si512(q, _mm512_set1_epi32(511));
        store_signed(p->codes + 128 * h, iq2_entries(iq2xs_grid, _mm512_castsi512_si256(index)), (uint64_t)_mm_cvtsi128_si64(sign_bytes));
        store_signed(p->codes + 128 * h + 64, iq2_entries(iq2xs_grid, _mm512_extracti64x4_epi64(index, 1)),
                     (uint64_t)_mm_extract_epi64(sign_bytes, 1));
    }
#else
    for (int c = 0; c < 32; c++) { /* 8 weights: bits 0-8 the grid index, 9-15 the sign index */
        uint16_t q;
        memcpy(&q, b + 2 + 2 * c, sizeof(q));
        const uint64_t r = signed_bytes(iq2xs_grid[q & 511], parity_signs(q >> 9));
        memcpy(p->codes + 8 * c, &r, sizeof(r));
    }
#endif
    __asm__("" : "+m"(p->codes));
}

/* the indices of eight grid entries: low 8 bits the bytes at `low`, the bits above from lane k of
 * `high` (masked by `mask`) */
static inline __m256i eight_indices(const uint8_t *low, __m256i high, int mask) {
    return _mm256_or_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)low)),
                           _mm256_slli_epi32(_mm256_and_si256(high, _mm256_set1_epi32(mask)), 8));
}

static inline void iq2_s_prepare(const uint8_t *b, GridParams *p) {
    const uint8_t *qs = b + 2, *signs = b + 34, *qh = b + 66;
    iq2_scales(b + 74, f16_at(b), p);
#ifdef FREESPEC_AVX512
    for (int j = 0; j < 4; j++) { /* entries 8 j .. 8 j + 7: index bits 0-7 in qs, 8-9 in qh (2 bits an entry) */
        uint16_t high;
        memcpy(&high, qh + 2 * j, sizeof(high));
        const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        const __m256i index = eight_indices(qs + 8 * j, _mm256_srlv_epi32(_mm256_set1_epi32(high), shifts), 3);
        uint64_t negative; /* a bit a weight */
        memcpy(&negative, signs + 8 * j, sizeof(negative));
        store_signed(p->codes + 64 * j, iq2_entries(iq2s_grid, index), negative);
    }
#else
    for (int c = 0; c < 32; c++) { /* 8 weights: index bits 0-7 in qs, 8-9 in qh */
        const uint64_t r = signed_bytes(iq2s_grid[qs[c] | ((qh[c / 4] >> (2 * (c % 4))) & 3u) << 8], signs[c]);
        memcpy(p->codes + 8 * c, &r, sizeof(r));
    }
#endif
    __asm__("" : "+m"(p->codes));
}

/* IQ1_S, IQ1_M: each 8 weights an entry of a grid of -1, 0, 1 (11-bit index), a delta of +-1/8 per
 * 32 (IQ1_S) or 8 weights (IQ1_M), and a 3-bit scale s per 32 or 16: the weight is
 * d (2 s + 1) (grid + delta), all exact (11 + 4 + 4 bits). Stored as the grid's values times 8
 * (iq1s_grid_x8) and the scale over 8, a weight is scale * code with the byte code 8 grid + 1 or
 * 8 grid - 1: 8 grid | 1 (its bit 0 is clear), or its bytes less 1. Eight entries at a time: `low`
 * their indices' low 8 bits, `high` the 3 bits above each, `negative` bit k for entry k's delta. */
static inline void iq1_entries(int8_t *codes, const uint8_t *low, __m256i high, unsigned negative) {
    const __m256i index = eight_indices(low, high, 7);
#ifdef FREESPEC_AVX512
    const __m512i entries = iq2_entries(iq1s_grid_x8, index), ones = _mm512_set1_epi8(1);
    _mm512_store_si512(codes, _mm512_mask_blend_epi64((__mmask8)negative, _mm512_or_si512(entries, ones),
                                                      _mm512_sub_epi8(entries, ones)));
#else
    uint32_t at[8];
    _mm256_storeu_si256((__m256i *)at, index);
    for (int half = 0; half < 2; half++) { /* four entries (32 bytes) from registers, not read back from memory */
        const uint32_t *i = at + 4 * half;
        const __m256i entries = _mm256_setr_epi64x((long long)iq1s_grid_x8[i[0]], (long long)iq1s_grid_x8[i[1]],
                                                   (long long)iq1s_grid_x8[i[2]], (long long)iq1s_grid_x8[i[3]]);
        const unsigned n = negative >> (4 * half);
        const __m256i delta = _mm256_setr_epi64x(n & 1 ? -1 : 0x0101010101010101ll, n & 2 ? -1 : 0x0101010101010101ll,
                                                 n & 4 ? -1 : 0x0101010101010101ll, n & 8 ? -1 : 0x0101010101010101ll);
        _mm256_store_si256((__m256i *)(codes + 32 * half), _mm256_add_epi8(entries, delta));
    }
#endif
}

static inline void iq1_s_prepare(const uint8_t *b, GridParams *p) {
    const float d = f16_at(b);
    uint16_t qh[8];
    memcpy(qh, b + 34, sizeof(qh));
    for (int g = 0; g < 8; g++) p->scale[2 * g] = p->scale[2 * g + 1] = d * (float)(2 * ((qh[g] >> 12) & 7) + 1) * 0.125f;
    for (int j = 0; j < 4; j++) { /* groups 2j, 2j + 1 */
        const __m256i high = _mm256_srlv_epi32(_mm256_setr_epi32(qh[2 * j], qh[2 * j], qh[2 * j], qh[2 * j], qh[2 * j + 1],
                                                                 qh[2 * j + 1], qh[2 * j + 1], qh[2 * j + 1]),
                                               _mm256_setr_epi32(0, 3, 6, 9, 0, 3, 6, 9));
        iq1_entries(p->codes + 64 * j, b + 2 + 8 * j, high, (qh[2 * j] >> 15) * 0x0Fu | (qh[2 * j + 1] >> 15) * 0xF0u);
    }
    __asm__("" : "+m"(p->codes));
}

static inline void iq1_m_prepare(const uint8_t *b, GridParams *p) {
    uint16_t sc[4];
    memcpy(sc, b + 48, sizeof(sc));
    const float d = f16_to_float((uint16_t)((sc[0] >> 12) | ((sc[1] >> 8) & 0xF0) | ((sc[2] >> 4) & 0xF00) | (sc[3] & 0xF000)));
    for (int i = 0; i < 16; i++) p->scale[i] = d * (float)(2 * ((sc[i / 4] >> (3 * (i % 4))) & 7) + 1) * 0.125f;
    for (int j = 0; j < 4; j++) { /* entries 8 j .. 8 j + 7: nibble k of the 4 qh bytes at 4 j */
        uint32_t nibbles;
        memcpy(&nibbles, b + 32 + 4 * j, sizeof(nibbles));
        const __m256i all = _mm256_set1_epi32((int)nibbles);
        const __m256i high = _mm256_srlv_epi32(all, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        /* each nibble's bit 3 shifted to bit 31: the sign bits movemask gathers */
        const __m256i delta = _mm256_sllv_epi32(all, _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
        iq1_entries(p->codes + 64 * j, b + 8 * j, high, (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(delta)));
    }
    __asm__("" : "+m"(p->codes));
}

/* The ternary types TQ1_0 and TQ2_0: the weight d (q - 1), q in 0 .. 2 (TQ2_0's 2 bits may also
 * hold 3), a product. TQ1_0 packs 5 base-3 digits a byte (4 in qh's bytes): digit n of byte b is
 * ((b 3^n mod 256) 3) >> 8 (ggml's), computed in 16-bit lanes; a unit's 256 codes q - 1 are
 * assembled once as bytes, as the grid types', and decoded by grid_decode with every scale d. */
static inline void ternary_scales(float d, GridParams *p) {
    for (int i = 0; i < 16; i++) p->scale[i] = d;
}

/* the digits n of the 16 bytes at `bytes`, minus 1, as 16 bytes */
static inline __m128i ternary_digits(__m128i bytes, int n) {
    static const short powers[5] = {1, 3, 9, 27, 81};
    const __m256i wide = _mm256_cvtepu8_epi16(bytes);
    const __m256i low = _mm256_and_si256(_mm256_mullo_epi16(wide, _mm256_set1_epi16(powers[n])), _mm256_set1_epi16(255));
    const __m256i digit = _mm256_srli_epi16(_mm256_mullo_epi16(low, _mm256_set1_epi16(3)), 8);
    const __m128i packed = _mm_packus_epi16(_mm256_castsi256_si128(digit), _mm256_extracti128_si256(digit, 1));
    return _mm_sub_epi8(packed, _mm_set1_epi8(1));
}

static inline void tq1_0_prepare(const uint8_t *b, GridParams *p) {
    ternary_scales(f16_at(b + 52), p);
    const __m128i first = _mm_loadu_si128((const __m128i *)b), second = _mm_loadu_si128((const __m128i *)(b + 16));
    const __m128i third = _mm_loadu_si128((const __m128i *)(b + 32));
    for (int n = 0; n < 5; n++) { /* weights 32 n + j from bytes j < 32, 160 + 16 n + j from bytes 32 + j */
        _mm_store_si128((__m128i *)(p->codes + 32 * n), ternary_digits(first, n));
        _mm_store_si128((__m128i *)(p->codes + 32 * n + 16), ternary_digits(second, n));
        _mm_store_si128((__m128i *)(p->codes + 160 + 16 * n), ternary_digits(third, n));
    }
    uint32_t bits; /* weights 240 + 4 n + j: digit n of qh[j] */
    memcpy(&bits, b + 48, sizeof(bits));
    const __m128i high = _mm_cvtsi32_si128((int)bits);
    const __m128i tail = _mm_unpacklo_epi32(_mm_unpacklo_epi32(ternary_digits(high, 0), ternary_digits(high, 1)),
                                            _mm_unpacklo_epi32(ternary_digits(high, 2), ternary_digits(high, 3)));
    _mm_store_si128((__m128i *)(p->codes + 240), _mm_shuffle_epi32(tail, _MM_SHUFFLE(3, 1, 2, 0)));
    __asm__("" : "+m"(p->codes));
}

/* TQ2_0. AVX-512 decodes it in place, as Q2_K: a unit's one d makes its table once (vpermps reads
 * bits 0-3 of the shifted codes, so the four values d (q - 1) repeat four times). Zen 4, one
 * thread, resident: 17.0 -> 23.9 G weights/s at one input row against its codes assembled as
 * bytes, which the AVX2 build keeps (converting the codes in place, fma(d, q, -d): 8.0 against
 * 14.7 there). */
#ifdef FREESPEC_AVX512
typedef struct {
    vec table;
} TQ2Params;

static inline void tq2_0_prepare(const uint8_t *b, TQ2Params *p) {
    p->table = vec_mul(vec_set1(f16_at(b + 64)), _mm512_setr_ps(-1, 0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2));
}

static inline vec tq2_0_decode(const uint8_t *b, const TQ2Params *p, int group, int step) {
    const ivec q = widen_u8(b + 32 * (group >> 2) + step * LANES);
    return _mm512_permutexvar_ps(ivec_srli(q, 2 * (group & 3)), p->table);
}
#else
typedef GridParams TQ2Params;
#define tq2_0_decode grid_decode

static inline void tq2_0_prepare(const uint8_t *b, GridParams *p) {
    ternary_scales(f16_at(b + 64), p);
    for (int h = 0; h < 2; h++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 32 * h));
        for (int k = 0; k < 4; k++) { /* bits 2k of each byte: through 16-bit lanes, the mask drops what crosses bytes */
            const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(q, 2 * k), _mm256_set1_epi8(3));
            _mm256_store_si256((__m256i *)(p->codes + 128 * h + 32 * k), _mm256_sub_epi8(codes, _mm256_set1_epi8(1)));
        }
    }
    __asm__("" : "+m"(p->codes));
}
#endif

static inline vec grid_decode(const uint8_t *b, const GridParams *p, int group, int step) {
    (void)b;
    const ivec codes = widen_i8((const uint8_t *)p->codes + 32 * group + step * LANES);
    return vec_mul(vec_set1(p->scale[2 * group + step * LANES / 16]), ivec_to_vec(codes));
}

/* Inside a tile's loop over units u of its ROWS rows at w (row_bytes apart): each row's unit
 * (unit[r]), its bytes `ahead` rows below asked for as the tile reaches it (prefetch_rows in
 * kernels.c), and its constants (params[r], read through param[r]). With OPAQUE the compiler
 * cannot see through param[r] (an empty asm), so a K-quant's sixteen constants are broadcast
 * straight from the stack, a load each, where it would keep them in registers and broadcast
 * them by shuffles that compete with the decoding's own (vpermps, vpmovzxbd). Zen 5, AVX-512: the one-input-row tile 12-31% faster, two inputs
 * (Q4_K, Q6_K) 1.10-1.14x, the MANY tiles Q4_K 1.10-1.15x at M = 2-8 and Q5_K 1.14-1.19x at
 * M = 2-3; the AVX2 build even at one input, mixed at two (kept in registers there). Laundering
 * each constant's own pointer instead cost three scalar instructions a vector (1.07-1.10x
 * slower); an asm reading the constant as a memory operand made GCC store every accumulator back
 * to the stack after each FMA (Q4_K 1.35x, Q5_K and Q6_K 1.17x slower). */
#define PREPARE_UNITS(ROWS, UNIT_BYTES, PARAMS, PREPARE, OPAQUE)                                 \
    const uint8_t *unit[ROWS];                                                                   \
    PARAMS params[ROWS];                                                                         \
    const PARAMS *param[ROWS];                                                                   \
    _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                     \
        unit[r] = w + r * row_bytes + u * UNIT_BYTES;                                            \
        prefetch_weights((const char *)unit[r] + ahead * row_bytes, UNIT_BYTES);                 \
        PREPARE(unit[r], &params[r]);                                                            \
        param[r] = &params[r];                                                                   \
        if (OPAQUE) __asm__("" : "+r"(param[r]));                                                \
    }
/* NAME over BUFFER_ROWS weight rows as BUFFER_ROWS / ROWS tiles of NAME##_rows */
#define DEFINE_BLOCK_OF_TILES(NAME, ROWS, GROUPS, UNIT_BYTES)                                    \
    static inline void NAME(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t K) { \
        const int64_t row_bytes = K / (32 * GROUPS) * UNIT_BYTES;                                \
        for (int r = 0; r < BUFFER_ROWS; r += ROWS) NAME##_rows(x, w + r * row_bytes, y + r, ldy, K); \
    }
/* ROWS weight rows times COLS input rows, decoded in registers with every accumulator in a
 * register, unit after unit. The per-output arithmetic is the fp32 kernel's: one FMA chain over
 * k in steps of LANES, in order, then tile_sums; the two orders of a step only schedule it:
 * - inputs first (STEP_INPUTS_FIRST): the step's COLS input vectors loaded, then each weight row
 *   decoded and multiplied into them: the tile for 1 and 2 input rows (and 3 in AVX2), with as
 *   many weight rows as the packed q4/q8 tiles hold (ONE_ROWS, TWO_ROWS, THREE_ROWS: see
 *   kernels.c). Measured on Zen 3 (AVX2) against the unit-major tile below: 14-16% faster for
 *   the K-quants at one row, 5-15% for the 32-weight blocks at 2 and 3 rows, the same otherwise.
 * - decoding first (STEP_DECODE_FIRST): the rows' vectors decoded, then the inputs met one at a
 *   time (each input load feeds ROWS FMAs, and no input waits in a register): the MANY tiles
 *   below. */
/* Step (g, s) of a tile in its two orders (see DEFINE_FORMAT_TILE), into acc[ROWS][COLS]. */
#define STEP_INPUTS_FIRST(ROWS, COLS, DECODE, g, s)                                              \
    do {                                                                                         \
        vec xv[COLS];                                                                            \
        _Pragma("GCC unroll 4") for (int j = 0; j < COLS; j++) xv[j] = vec_load(xu + j * K + (g) * 32 + (s) * LANES); \
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                 \
            const vec wv = DECODE(unit[r], param[r], g, s);                                      \
            _Pragma("GCC unroll 4") for (int j = 0; j < COLS; j++) acc[r][j] = vec_fma(wv, xv[j], acc[r][j]); \
        }                                                                                        \
    } while (0)
#define STEP_DECODE_FIRST(ROWS, COLS, DECODE, g, s)                                              \
    do {                                                                                         \
        vec wv[ROWS];                                                                            \
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) wv[r] = DECODE(unit[r], param[r], g, s); \
        _Pragma("GCC unroll 8") for (int j = 0; j < COLS; j++) {                                 \
            const vec xv = vec_load(xu + j * K + (g) * 32 + (s) * LANES);                        \
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) acc[r][j] = vec_fma(wv[r], xv, acc[r][j]); \
        }                                                                                        \
    } while (0)
#define DEFINE_FORMAT_TILE(NAME, ROWS, COLS, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE, OPAQUE, STEP) \
    static inline void NAME##_rows(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t K) { \
        const int64_t units = K / (32 * GROUPS), row_bytes = units * UNIT_BYTES;                 \
        const int64_t ahead = prefetch_rows(row_bytes);                                          \
        vec acc[ROWS][COLS];                                                                     \
        _Pragma("GCC unroll 8") for (int i = 0; i < ROWS; i++)                                   \
            _Pragma("GCC unroll 8") for (int j = 0; j < COLS; j++) acc[i][j] = vec_zero();      \
        for (int64_t u = 0; u < units; u++) {                                                    \
            const float *xu = x + u * GROUPS * 32;                                               \
            PREPARE_UNITS(ROWS, UNIT_BYTES, PARAMS, PREPARE, OPAQUE)                             \
            _Pragma("GCC unroll 8") for (int g = 0; g < GROUPS; g++)                             \
                _Pragma("GCC unroll 4") for (int s = 0; s < STEPS; s++) {                        \
                    STEP(ROWS, COLS, DECODE, g, s);                                              \
                }                                                                                \
        }                                                                                        \
        tile_sums(&acc[0][0], ROWS, COLS, COLS, y, ldy);                                         \
    }                                                                                            \
    DEFINE_BLOCK_OF_TILES(NAME, ROWS, GROUPS, UNIT_BYTES)
#define DEFINE_FORMAT_REGISTER_TILE(NAME, ROWS, COLS, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE, OPAQUE) \
    DEFINE_FORMAT_TILE(NAME, ROWS, COLS, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE, OPAQUE, STEP_INPUTS_FIRST)

#ifdef FREESPEC_AVX512
#define DEFINE_FORMAT_THREE_TILE(NAME, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)              \
    DEFINE_FORMAT_MANY_TILE(NAME, 3, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)
#define DEFINE_FORMAT_FOUR_TILE(NAME, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)               \
    DEFINE_FORMAT_MANY_TILE(NAME, 4, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)
#else
#define DEFINE_FORMAT_THREE_TILE(NAME, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)              \
    DEFINE_FORMAT_REGISTER_TILE(NAME, THREE_ROWS, 3, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE, 0)
/* AVX2, four input rows: BUFFER_ROWS weight rows visited unit-major, one row's unit at a time,
 * its accumulators loaded from and stored back to a small array in L1. Four inputs and four
 * accumulators per row beside the decoding fill AVX2's 16 registers, so a register tile of even
 * one row spills; here the out-of-order core overlaps one row's FMA chains (4 cycles an FMA) with
 * the next row's decoding. On Zen 3: 5-10% faster than a one-row register tile, and than
 * decoding into an fp32 buffer first (a store per vector). The per-output arithmetic is the fp32
 * kernel's (a round trip through memory leaves a value's bits alone). */
#define DEFINE_FORMAT_FOUR_TILE(NAME, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)               \
    static inline void NAME(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t K) { \
        const int64_t units = K / (32 * GROUPS), row_bytes = units * UNIT_BYTES;                 \
        const int64_t ahead = prefetch_rows(row_bytes);                                          \
        vec acc[BUFFER_ROWS][4];                                                                 \
        for (int i = 0; i < BUFFER_ROWS; i++)                                                    \
            for (int j = 0; j < 4; j++) acc[i][j] = vec_zero();                                  \
        for (int64_t u = 0; u < units; u++) {                                                    \
            const float *xu = x + u * GROUPS * 32;                                               \
            _Pragma("GCC unroll 1") for (int i = 0; i < BUFFER_ROWS; i++) {                      \
                const uint8_t *unit = w + i * row_bytes + u * UNIT_BYTES;                        \
                prefetch_weights((const char *)unit + ahead * row_bytes, UNIT_BYTES);            \
                PARAMS params;                                                                   \
                PREPARE(unit, &params);                                                          \
                vec a[4];                                                                        \
                _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) a[j] = acc[i][j];            \
                _Pragma("GCC unroll 8") for (int g = 0; g < GROUPS; g++)                         \
                    _Pragma("GCC unroll 4") for (int s = 0; s < STEPS; s++) {                    \
                        const vec wv = DECODE(unit, &params, g, s);                              \
                        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)                      \
                            a[j] = vec_fma(wv, vec_load(xu + j * K + g * 32 + s * LANES), a[j]); \
                    }                                                                            \
                _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[i][j] = a[j];            \
            }                                                                                    \
        }                                                                                        \
        tile_sums(&acc[0][0], BUFFER_ROWS, 4, 4, y, ldy);                                        \
    }
#endif
/* The MANY tiles: MANY_ROWS weight rows times COLS input rows, decoding first (see
 * DEFINE_FORMAT_TILE), the K-quants' params read opaquely. For 5 to MANY_COLS inputs
 * (a draft tree's verification, a batch of decoding requests), where decoding BUFFER_ROWS rows into
 * an fp32 buffer for the plain tiles took about twice four inputs' time. Zen 5, streaming
 * 1536 x 8960 matrices, two threads, one process, µs at M = 5: Q4_K 859 -> 560, Q6_K 1355 -> 681,
 * Q5_0 1072 -> 599, Q8_0 1268 -> 502, F16 (8960 x 1536) 1130 -> 581; 1.1-1.9x at M = 8;
 * SmolLM2's lm_head (49152 x 576 Q8_0) 2199 -> 1140 at M = 5. AVX-512 takes 3 and 4 inputs this
 * way too (K-quants 1.13-1.27x at M = 4, the 32-weight blocks even). AVX2's 16 registers hold
 * one weight row's accumulators (three rows spilled, 0.5-0.7x): 1.23-1.56x at M = 5, 0.93-1.15x
 * at M = 8, on Zen 5. */
#ifdef FREESPEC_AVX512
#define MANY_ROWS 3
/* Two inputs: six weight rows, the K-quants' params read opaquely (Q4_K 1.10x, Q6_K 1.14x over
 * the MANY order, which was 1.11x and 1.02x over six rows with their params in registers); Q5_K
 * takes the MANY order (TWO_UNITS: 1.41x; 0.88x with six opaque rows); the 32-weight blocks keep
 * six rows in registers (0.82-0.86x in the MANY order). The AVX2 build keeps its two rows. */
#define TWO_OPAQUE 1
#define TWO_BY_UNITS 1
#else
#define MANY_ROWS 1
#define TWO_OPAQUE 0
#define TWO_BY_UNITS 0
#endif
#define MANY_COLS 8
#define DEFINE_FORMAT_MANY_TILE(NAME, COLS, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)         \
    DEFINE_FORMAT_TILE(NAME, MANY_ROWS, COLS, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE, GROUPS > 1, STEP_DECODE_FIRST)
#define DEFINE_FORMAT_MANY_TILES(NAME, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)              \
    DEFINE_FORMAT_MANY_TILE(NAME##_5, 5, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)            \
    DEFINE_FORMAT_MANY_TILE(NAME##_6, 6, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)            \
    DEFINE_FORMAT_MANY_TILE(NAME##_7, 7, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)            \
    DEFINE_FORMAT_MANY_TILE(NAME##_8, 8, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)
/* More input rows than MANY_COLS take an fp32 buffer of BUFFER_ROWS decoded rows and the plain
 * tiles, which decodes each weight once whatever M is (two passes of the MANY tiles over 9 to 24
 * inputs: Q8_0 and Q5_0 faster, the K-quants from 12 inputs and Q4_1 at 576 columns slower). */

/* Decodes `rows` weight rows into buffer [rows, K] (fp32). */
#define DEFINE_FORMAT_DECODE_ROWS(NAME, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)                     \
    static void NAME(const uint8_t *w, int64_t rows, int64_t K, float *buffer) {                 \
        const int64_t units = K / (32 * GROUPS), row_bytes = units * UNIT_BYTES;                 \
        for (int64_t r = 0; r < rows; r++)                                                       \
            for (int64_t u = 0; u < units; u++) {                                                \
                const uint8_t *unit = w + r * row_bytes + u * UNIT_BYTES;                        \
                PARAMS params;                                                                   \
                PREPARE(unit, &params);                                                          \
                _Pragma("GCC unroll 8") for (int g = 0; g < GROUPS; g++)                         \
                    _Pragma("GCC unroll 4") for (int s = 0; s < STEPS; s++)                      \
                        vec_store(buffer + r * K + (u * GROUPS + g) * 32 + s * LANES, DECODE(unit, &params, g, s)); \
            }                                                                                    \
    }

/* Blocks of BUFFER_ROWS weight rows split over the threads, like DEFINE_QUANT_LINEAR: register
 * tiles up to MANY_COLS input rows, else the rows decoded into an fp32 buffer (in cache)
 * for the plain tiles; the rows of a last partial block likewise, one plain 1 x 1 tile each.
 * NAME(matrix, x, y, M, ldy): output row m at y + m * ldy; NAME##_row: weight row r as fp32.
 * A K-quant's (GROUPS > 1) register tiles read its params opaquely (see above); TWO_UNITS: two
 * inputs in the MANY order (AVX-512; see TWO_OPAQUE). */
#define DEFINE_FORMAT_LINEAR(NAME, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE, TWO_UNITS)               \
    DEFINE_FORMAT_REGISTER_TILE(NAME##_one, ONE_ROWS, 1, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE, GROUPS > 1) \
    DEFINE_FORMAT_REGISTER_TILE(NAME##_two, TWO_ROWS, 2, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE, TWO_OPAQUE && GROUPS > 1) \
    DEFINE_FORMAT_MANY_TILE(NAME##_two_units, 2, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)           \
    DEFINE_FORMAT_THREE_TILE(NAME##_three, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)                 \
    DEFINE_FORMAT_FOUR_TILE(NAME##_four, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)                   \
    DEFINE_FORMAT_MANY_TILES(NAME##_many, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)                  \
    DEFINE_FORMAT_DECODE_ROWS(NAME##_decode_rows, GROUPS, UNIT_BYTES, PARAMS, PREPARE, DECODE)           \
    static int64_t NAME##_row_bytes(const Matrix *matrix) { return matrix->K / (32 * GROUPS) * UNIT_BYTES; } \
    static void NAME##_row(const Matrix *matrix, int64_t r, float *out) {                        \
        NAME##_decode_rows((const uint8_t *)matrix->data + r * NAME##_row_bytes(matrix), 1, matrix->K, out); \
    }                                                                                            \
    /* one block of BUFFER_ROWS weight rows times `cols` (1 to MANY_COLS) input rows */         \
    static inline void NAME##_tiles(const float *x, const uint8_t *block, float *y, int64_t ldy, int64_t K, \
                                    int64_t cols) {                                              \
        switch (cols) {                                                                          \
        case 1: NAME##_one(x, block, y, ldy, K); break;                                          \
        case 2:                                                                                  \
            if (TWO_BY_UNITS && TWO_UNITS) NAME##_two_units(x, block, y, ldy, K);                \
            else NAME##_two(x, block, y, ldy, K);                                                \
            break;                                                                               \
        case 3: NAME##_three(x, block, y, ldy, K); break;                                        \
        case 4: NAME##_four(x, block, y, ldy, K); break;                                         \
        case 5: NAME##_many_5(x, block, y, ldy, K); break;                                       \
        case 6: NAME##_many_6(x, block, y, ldy, K); break;                                       \
        case 7: NAME##_many_7(x, block, y, ldy, K); break;                                       \
        default: NAME##_many_8(x, block, y, ldy, K);                                             \
        }                                                                                        \
    }                                                                                            \
    static void NAME(const Matrix *matrix, const float *x, float *y, int64_t M, int64_t ldy,    \
                     int64_t first, int64_t end) {                                               \
        const uint8_t *w = matrix->data;                                                         \
        const int64_t N = matrix->N, K = matrix->K, row_bytes = NAME##_row_bytes(matrix);        \
        const int64_t blocks = N / BUFFER_ROWS;                                                  \
        for (int64_t b = first; b < end; b++) {                                                  \
            const int64_t n = b * BUFFER_ROWS, rows = b < blocks ? BUFFER_ROWS : N - n;          \
            const uint8_t *block = w + n * row_bytes;                                            \
            if (rows == BUFFER_ROWS && M <= MANY_COLS) { /* the tiles prefetch */                \
                NAME##_tiles(x, block, y + n, ldy, K, M);                                        \
                continue;                                                                        \
            }                                                                                    \
            if (rows == 0) continue;                                                             \
            if (b + 1 < blocks) prefetch_weights((const char *)(block + BUFFER_ROWS * row_bytes), BUFFER_ROWS * row_bytes); \
            float buffer[BUFFER_ROWS * K] __attribute__((aligned(64)));                          \
            NAME##_decode_rows(block, rows, K, buffer);                                          \
            if (rows < BUFFER_ROWS) {                                                            \
                for (int64_t r = 0; r < rows; r++)                                               \
                    for (int64_t m = 0; m < M; m++)                                              \
                        tile_1x1(x + m * K, buffer + r * K, y + m * ldy + n + r, ldy, K, K, 1);  \
                continue;                                                                        \
            }                                                                                    \
            buffered_tiles(x, buffer, y + n, ldy, M, K);                                         \
        }                                                                                        \
    }

DEFINE_FORMAT_LINEAR(q4_0_linear, 1, Q4_0_BYTES, BlockParams, q4_0_prepare, q4_0_decode, 0)
DEFINE_FORMAT_LINEAR(q4_1_linear, 1, Q4_1_BYTES, BlockParams, q4_1_prepare, q4_1_decode, 0)
DEFINE_FORMAT_LINEAR(q5_0_linear, 1, Q5_0_BYTES, BlockParams, q5_0_prepare, q5_0_decode, 0)
DEFINE_FORMAT_LINEAR(q5_1_linear, 1, Q5_1_BYTES, BlockParams, q5_1_prepare, q5_1_decode, 0)
DEFINE_FORMAT_LINEAR(q8_0_linear, 1, Q8_0_BYTES, BlockParams, q8_0_prepare, q8_0_decode, 0)
DEFINE_FORMAT_LINEAR(q4_k_linear, 8, Q4_K_BYTES, KParams, k_prepare, q4_k_decode, 0)
DEFINE_FORMAT_LINEAR(q5_k_linear, 8, Q5_K_BYTES, KParams, k_prepare, q5_k_decode, 1)
DEFINE_FORMAT_LINEAR(q6_k_linear, 8, Q6_K_BYTES, Q6KParams, q6_k_prepare, q6_k_decode, 0)
DEFINE_FORMAT_LINEAR(q2_k_linear, 8, Q2_K_BYTES, Q2KParams, q2_k_prepare, q2_k_decode, 0)
DEFINE_FORMAT_LINEAR(q3_k_linear, 8, Q3_K_BYTES, Q3KParams, q3_k_prepare, q3_k_decode, 0)
DEFINE_FORMAT_LINEAR(iq4_nl_linear, 1, IQ4_NL_BYTES, BlockParams, iq4_nl_prepare, iq4_nl_decode, 0)
DEFINE_FORMAT_LINEAR(iq4_xs_linear, 8, IQ4_XS_BYTES, IQ4XSParams, iq4_xs_prepare, iq4_xs_decode, 0)
DEFINE_FORMAT_LINEAR(iq3_xxs_linear, 8, IQ3_XXS_BYTES, GridParams, iq3_xxs_prepare, grid_decode, 0)
DEFINE_FORMAT_LINEAR(iq3_s_linear, 8, IQ3_S_BYTES, GridParams, iq3_s_prepare, grid_decode, 0)
DEFINE_FORMAT_LINEAR(iq2_xxs_linear, 8, IQ2_XXS_BYTES, GridParams, iq2_xxs_prepare, grid_decode, 0)
DEFINE_FORMAT_LINEAR(iq2_xs_linear, 8, IQ2_XS_BYTES, GridParams, iq2_xs_prepare, grid_decode, 0)
DEFINE_FORMAT_LINEAR(iq2_s_linear, 8, IQ2_S_BYTES, GridParams, iq2_s_prepare, grid_decode, 0)
DEFINE_FORMAT_LINEAR(iq1_s_linear, 8, IQ1_S_BYTES, GridParams, iq1_s_prepare, grid_decode, 0)
DEFINE_FORMAT_LINEAR(iq1_m_linear, 8, IQ1_M_BYTES, GridParams, iq1_m_prepare, grid_decode, 0)
DEFINE_FORMAT_LINEAR(tq1_0_linear, 8, TQ1_0_BYTES, GridParams, tq1_0_prepare, grid_decode, 0)
DEFINE_FORMAT_LINEAR(tq2_0_linear, 8, TQ2_0_BYTES, TQ2Params, tq2_0_prepare, tq2_0_decode, 0)

/* 16-bit weights [N, K], any K: the fp32 kernel's tiles (DEFINE_LOAD_TILE) with a converting load
 * (16-bit floats widen to fp32 exactly), so the arithmetic, the K % LANES tail included, is the
 * fp32 kernel's. Register tiles up to MANY_COLS input rows (the MANY_ROWS x MANY_COLS one from 4
 * inputs in AVX2, 5 in AVX-512: 1.15-1.9x over the buffer), else BUFFER_ROWS rows widened into
 * an fp32 buffer for the plain tiles; the rows of a last partial block one at a time. */
#define WIDEN_TILES(TILE, ROWS, M)                                                               \
    for (int64_t r = 0; r < BUFFER_ROWS; r += ROWS) TILE(x, w + (n + r) * K, y + n + r, ldy, K, kv, M)
#ifdef FREESPEC_AVX512 /* four input rows in registers */
#define WIDEN_FOUR_TILE(NAME, LOAD, SCALAR) DEFINE_LOAD_TILE(NAME##_tile_four, FOUR_ROWS, 4, uint16_t, LOAD, SCALAR, 1)
#define WIDEN_FOUR_TILES(NAME) else if (M == 4) WIDEN_TILES(NAME##_tile_four, FOUR_ROWS, 4);
#else /* four input rows take the buffer */
#define WIDEN_FOUR_TILE(NAME, LOAD, SCALAR)
#define WIDEN_FOUR_TILES(NAME)
#endif
#define DEFINE_WIDEN_LINEAR(NAME, LOAD, SCALAR)                                                  \
    DEFINE_LOAD_TILE(NAME##_tile_one, ONE_ROWS, 1, uint16_t, LOAD, SCALAR, 0)                    \
    DEFINE_LOAD_TILE(NAME##_tile_two, TWO_ROWS, 2, uint16_t, LOAD, SCALAR, 1)                    \
    DEFINE_LOAD_TILE(NAME##_tile_three, THREE_ROWS, 3, uint16_t, LOAD, SCALAR, 1)                \
    WIDEN_FOUR_TILE(NAME, LOAD, SCALAR)                                                          \
    DEFINE_LOAD_TILE(NAME##_tile_many, MANY_ROWS, MANY_COLS, uint16_t, LOAD, SCALAR, 1)          \
    DEFINE_LOAD_TILE(NAME##_tile_1x1, 1, 1, uint16_t, LOAD, SCALAR, 0)                           \
    static void NAME##_widen_row(const uint16_t *row, int64_t K, float *out) {                   \
        const int64_t kv = K & ~(int64_t)(LANES - 1);                                            \
        for (int64_t k = 0; k < kv; k += LANES) vec_store(out + k, LOAD(row + k));               \
        for (int64_t k = kv; k < K; k++) out[k] = SCALAR(row[k]);                                \
    }                                                                                            \
    static int64_t NAME##_row_bytes(const Matrix *matrix) { return matrix->K * (int64_t)sizeof(uint16_t); } \
    static void NAME##_row(const Matrix *matrix, int64_t r, float *out) {                        \
        NAME##_widen_row((const uint16_t *)matrix->data + r * matrix->K, matrix->K, out);        \
    }                                                                                            \
    static void NAME(const Matrix *matrix, const float *x, float *y, int64_t M, int64_t ldy,    \
                     int64_t first, int64_t end) {                                              \
        const uint16_t *w = matrix->data;                                                        \
        const int64_t N = matrix->N, K = matrix->K, kv = K & ~(int64_t)(LANES - 1);              \
        const int64_t blocks = N / BUFFER_ROWS, ahead = M <= MANY_COLS ? 2 : 1;                  \
        for (int64_t b = first; b < end; b++) {                                                  \
            const int64_t n = b * BUFFER_ROWS, rows = b < blocks ? BUFFER_ROWS : N - n;          \
            if (b + ahead < blocks && (M == 1 || M > MANY_COLS)) /* else the tiles do */         \
                prefetch_weights((const char *)(w + (n + ahead * BUFFER_ROWS) * K),              \
                         BUFFER_ROWS * K * (int64_t)sizeof(uint16_t));                           \
            if (rows < BUFFER_ROWS) {                                                            \
                for (int64_t r = 0; r < rows; r++)                                               \
                    for (int64_t m = 0; m < M; m++)                                              \
                        NAME##_tile_1x1(x + m * K, w + (n + r) * K, y + m * ldy + n + r, ldy, K, kv, 1); \
                continue;                                                                        \
            }                                                                                    \
            if (M == 1) WIDEN_TILES(NAME##_tile_one, ONE_ROWS, 1);                               \
            else if (M == 2) WIDEN_TILES(NAME##_tile_two, TWO_ROWS, 2);                          \
            else if (M == 3) WIDEN_TILES(NAME##_tile_three, THREE_ROWS, 3);                      \
            WIDEN_FOUR_TILES(NAME)                                                               \
            else if (M <= MANY_COLS) WIDEN_TILES(NAME##_tile_many, MANY_ROWS, M);                \
            else {                                                                               \
                float buffer[BUFFER_ROWS * K] __attribute__((aligned(64)));                      \
                for (int64_t r = 0; r < BUFFER_ROWS; r++) NAME##_widen_row(w + (n + r) * K, K, buffer + r * K); \
                buffered_tiles(x, buffer, y + n, ldy, M, K);                                     \
            }                                                                                    \
        }                                                                                        \
    }

DEFINE_WIDEN_LINEAR(f16_linear, load_f16, f16_to_float)
DEFINE_WIDEN_LINEAR(bf16_linear, load_bf16, bf16_to_float)

/* Fused scoring, top-n and exploration slates for factor policies (see rec/native/__init__.py).
 *
 * For each user row u (D factors) and the services' factors stored transposed (D x W, W the
 * padded width), the logit of service j is cap * tanh(u . v_j / cap) and its softmax weight
 * exp(logit). The blocks are those of rec/topn.py: block b holds the columns b, b + W/16,
 * b + 2W/16, ..., so a vector of LANES consecutive columns holds one service of each of
 * LANES consecutive blocks, and per-block maxima and sums are plain vector maxima and sums.
 *
 * A group of ROWS users is scored against SPAN vectors of services at a time with the partial
 * sums held in registers, visiting the 16 vectors of a group of blocks in turn, so that each
 * row's block maxima come out of the same registers. The raw dot products then sit in a
 * per-group buffer that fits in L1/L2. From the block maxima follows a threshold no larger
 * than the row's n-th best dot product (the logit is monotone in it); one more pass computes
 * every weight, sums the weights below the threshold per block and collects the few services
 * above it, of which the n best are the candidates.
 *
 * rec_candidates writes what rec.topn.Candidates holds; rec_rank also fills the n slots of
 * every row with the procedure of rec.topn.select, consuming the same uniform numbers, so
 * both produce the same slates as the torch implementation up to float rounding.
 * rec_user_factors runs a tanh MLP (the two-tower policy's user tower) on many users.
 *
 * Plain C with GCC vector extensions, 16-float vectors and AVX-512 mask operations where the
 * compiler targets AVX-512, 8-float vectors otherwise; built by rec/native/__init__.py with
 * -O3 -march=native.
 *
 * Limitation: every weight needs a tanh and an exp (12 to 14 vector operations per LANES
 * services, against 17 multiply-adds for a rank-17 dot product), and the exploration draws
 * (a few hundred cycles each) and the candidates add work per row. bench/kernel_phases.py
 * prints the cycles of each phase; on a Sapphire Rapids core (2026-12-04), per row of 2,000
 * services: dot products 1,350-1,650, weights 1,300-1,450, exploration slates about 950,
 * threshold 300, ranking the candidates 330. The weights alone cost about as much as the dot
 * products, so half of torch's matmul throughput is out of reach there while every weight is
 * computed exactly.
 * Limitation: rows with more than FOUND services at or above the threshold (exact ties over
 * a large share of the catalogue) fall back to a slower running insertion.
 */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif
#ifdef __AVX512F__
#define LANES 16
#define SPAN 4 /* vectors of services per row in the dot product tile: 24 accumulators */
#else
#define LANES 8
#define SPAN 2 /* 12 accumulators, 2 services and a broadcast fit AVX2's 16 registers */
#endif

#define BLOCK 16
#define ROWS 6
#define MAX_DIM 256
#define MAX_N 512
#define FOUND 256 /* services above the threshold that are ranked by counting */

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef float vf_unaligned __attribute__((vector_size(4 * LANES), aligned(4)));
typedef uint32_t lane_bits; /* bit i stands for lane i */

static inline vf load(const float *p) { return *(const vf_unaligned *)p; }
static inline void store(float *p, vf v) { *(vf_unaligned *)p = v; }
static inline vf splat(float x) { return x - (vf){0}; } /* x - 0 is x, even for x = -0 */

/* lane_mask: which lanes pass a comparison, in the form the target tests cheaply (a mask
 * register with AVX-512, all-ones lanes of a vector otherwise). */
#if LANES == 16
typedef __mmask16 lane_mask;
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
static inline vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
static inline lane_mask mask_at_least(vf v, vf limit) {
    return _mm512_cmp_ps_mask((__m512)v, (__m512)limit, _CMP_GE_OQ);
}
static inline lane_bits bits_of(lane_mask mask) { return mask; }
#else
typedef vi lane_mask;
#ifdef __AVX__
/* maxps returns its second operand unless the first is greater: a > b ? a : b. */
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
static inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
static inline lane_bits bits_of(lane_mask mask) {
    return (lane_bits)_mm256_movemask_ps((__m256)mask);
}
#else
static inline vf vmax(vf a, vf b) {
    vi keep = a > b;
    return (vf)(((vi)a & keep) | ((vi)b & ~keep));
}
static inline vf vmin(vf a, vf b) {
    vi keep = a < b;
    return (vf)(((vi)a & keep) | ((vi)b & ~keep));
}
static inline lane_bits bits_of(lane_mask mask) {
    lane_bits bits = 0;
    for (int lane = 0; lane < LANES; ++lane) bits |= (lane_bits)(mask[lane] & 1) << lane;
    return bits;
}
#endif
static inline lane_mask mask_at_least(vf v, vf limit) { return v >= limit; }
#endif

/* count + 1 in the lanes where a >= b. */
static inline vi count_at_least(vi count, vf a, vf b) {
#if LANES == 16
    __mmask16 at_least = _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GE_OQ);
    return (vi)_mm512_mask_add_epi32((__m512i)count, at_least, (__m512i)count,
                                     _mm512_set1_epi32(1));
#else
    return count - (a >= b);
#endif
}

/* sum + v in the lanes outside mask. */
static inline vf add_outside(vf sum, vf v, lane_mask mask) {
#if LANES == 16
    return (vf)_mm512_mask_add_ps((__m512)sum, (__mmask16)~mask, (__m512)sum, (__m512)v);
#else
    return sum + (vf)((vi)v & ~mask);
#endif
}

/* Lanes of v whose column (first + lane) is past the catalogue set to `fill`. */
static inline vf fill_padding(vf v, int first, int n_items, float fill) {
    for (int lane = 0; lane < LANES; ++lane)
        if (first + lane >= n_items) v[lane] = fill;
    return v;
}

/* 2^r for |r| <= 1/2, relative error below 2e-7 (a degree-5 fit). */
static inline vf exp2_reduced(vf r) {
    vf p = splat(0.0013276470f);
    p = p * r + splat(0.0096755410f);
    p = p * r + splat(0.0555071346f);
    p = p * r + splat(0.2402212024f);
    p = p * r + splat(0.6931469440f);
    return p * r + splat(1.0000001192f);
}

/* 2^t for t in [-126, 126]: t = k + r with k an integer, k goes into the exponent. */
static inline vf exp2_unclamped(vf t) {
#if LANES == 16
    __m512 k = _mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return (vf)_mm512_scalef_ps((__m512)exp2_reduced(t - (vf)k), k);
#else
    const vf shifter = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf shifted = t + shifter;
    vf k = shifted - shifter;
    /* k sits in the low mantissa bits of shifted; the shift drops the shifter's own bits */
    return (vf)((vi)exp2_reduced(t - k) + ((vi)shifted << 23));
#endif
}

static inline vf exp2_clamped(vf t) {
    return exp2_unclamped(vmin(vmax(t, splat(-126.0f)), splat(126.0f)));
}

/* tanh(y) / y as a polynomial in y^2, fitted (relative error weighted Chebyshev fits, close
 * to minimax) for |y| up to SERIES_REACH[k]: 3 terms to 1/8 (relative error 1.4e-8),
 * 4 terms to 0.35 (8.8e-8), 5 terms to 1/2 (1.3e-8). A row takes the shortest that holds
 * for all its dot products: for typical factor norms the 4-term one, a vector operation less
 * per LANES services than the 5-term one. */
#define SERIES_FORMS 3
static const int SERIES_TERMS[SERIES_FORMS] = {3, 4, 5};
static const double SERIES_REACH[SERIES_FORMS] = {0.125, 0.35, 0.5};
static const double SERIES[SERIES_FORMS][5] = {
    {0.9999999955774345, -0.33332739092501673, 0.13219067605646603},
    {0.9999999753555419, -0.3333261047021445, 0.13300697438474712, -0.04926613106501381},
    {0.9999999868717725, -0.3333306939324604, 0.1332477930215749, -0.05298607430507045,
     0.01713500466523066},
};

typedef struct {
    float cap;
    float fast_limit;   /* |x| up to which the polynomial forms of the logit hold */
    /* log2(e) * SERIES[form][k] / cap^(2k): log2 weight = x * P(x^2), terms 3, 4, 5 */
    vf weight_series[SERIES_FORMS][5];
    vf logit_series[5];  /* SERIES[2][k] / cap^(2k): logit = x * P(x^2) */
    vf to_exp2_arg;      /* 2 log2(e) / cap */
    vf cap_v, two_cap, log2e;
} Transform;

static void transform_init(Transform *tf, float cap) {
    tf->cap = cap;
    /* there the log2 weight stays within log2(e) cap tanh(1/2) < 126: no clamping needed */
    tf->fast_limit = cap < 150.0f ? 0.5f * cap : 0.0f;
    for (int form = 0; form < SERIES_FORMS; ++form) {
        double scale = 1.0;
        for (int k = 0; k < SERIES_TERMS[form]; ++k) {
            tf->weight_series[form][k] = splat((float)(1.4426950408889634 * SERIES[form][k]
                                                       * scale));
            if (form == SERIES_FORMS - 1) tf->logit_series[k] = splat((float)(SERIES[form][k]
                                                                               * scale));
            scale /= (double)cap * (double)cap;
        }
    }
    tf->to_exp2_arg = splat((float)(2.0 * 1.4426950408889634 / cap));
    tf->cap_v = splat(cap);
    tf->two_cap = splat(2.0f * cap);
    tf->log2e = splat(1.4426950408889634f);
}

/* x * P(x^2), P given by its first `terms` coefficients (a constant where inlined). */
static inline __attribute__((always_inline)) vf odd_series(const vf *series, vf x,
                                                           const int terms) {
    vf z = x * x;
    vf p = series[terms - 1];
    for (int k = terms - 2; k >= 0; --k) p = p * z + series[k];
    return x * p;
}

/* exp(cap * tanh(x / cap)): with terms 3, 4 or 5 by that series (every |x| of the row
 * within its reach), with 0 through exp. */
static inline __attribute__((always_inline)) vf weights(const Transform *tf, vf x,
                                                        const int terms) {
    if (terms) return exp2_unclamped(odd_series(tf->weight_series[terms - 3], x, terms));
    vf e = exp2_clamped(x * tf->to_exp2_arg); /* exp(2x / cap) */
    vf logit = tf->cap_v - tf->two_cap / (e + splat(1.0f));
    return exp2_clamped(logit * tf->log2e);
}

/* The services' factors rearranged for dot_rows: for each tile of SPAN vectors of services
 * (block group b, blocks k .. k + SPAN - 1), its dim x SPAN vectors one after another, so
 * that the tile's loads run through memory in order instead of striding by width. */
static void pack_items(const float *items_t, int dim, int width, float *panels) {
    const int blocks = width / BLOCK;
    float *out = panels;
    for (int b = 0; b < blocks; b += LANES)
        for (int k = 0; k < BLOCK; k += SPAN)
            for (int d = 0; d < dim; ++d)
                for (int s = 0; s < SPAN; ++s, out += LANES)
                    memcpy(out, items_t + (size_t)d * width + (k + s) * blocks + b,
                           sizeof(float) * LANES);
}

/* Raw dot products x (ROWS x width) of `rows` (<= ROWS) users with all width services, and
 * each row's block maxima (ROWS x blocks); columns past the catalogue hold -inf. `panels` is
 * the services' factors as pack_items lays them out. */
static void dot_rows(const float *users, int rows, int dim, const float *panels, int width,
                     int n_items, float *x, float *block_max) {
    float user[ROWS * MAX_DIM];
    for (int r = 0; r < ROWS; ++r)
        for (int d = 0; d < dim; ++d) user[r * dim + d] = r < rows ? users[r * dim + d] : 0.0f;
    const int blocks = width / BLOCK;
    const float *v = panels;

    for (int b = 0; b < blocks; b += LANES) {
        vf top[ROWS];
        for (int r = 0; r < ROWS; ++r) top[r] = splat(-INFINITY);
        for (int k = 0; k < BLOCK; k += SPAN) {
            vf acc[ROWS][SPAN];
            for (int r = 0; r < ROWS; ++r)
                for (int s = 0; s < SPAN; ++s) acc[r][s] = splat(0.0f);
            for (int d = 0; d < dim; ++d, v += SPAN * LANES) {
                vf service[SPAN];
                for (int s = 0; s < SPAN; ++s) service[s] = load(v + s * LANES);
                for (int r = 0; r < ROWS; ++r) {
                    vf ud = splat(user[r * dim + d]);
                    for (int s = 0; s < SPAN; ++s) acc[r][s] += ud * service[s];
                }
            }
            for (int s = 0; s < SPAN; ++s) {
                int first = (k + s) * blocks + b;
                for (int r = 0; r < ROWS; ++r) {
                    vf value = acc[r][s];
                    if (first + LANES > n_items)
                        value = fill_padding(value, first, n_items, -INFINITY);
                    store(x + r * width + first, value);
                    top[r] = vmax(top[r], value);
                }
            }
        }
        for (int r = 0; r < ROWS; ++r) store(block_max + r * blocks + b, top[r]);
    }
}

/* Does candidate (x, j) rank above (y, i)? Larger dot product first, then lower column. */
static inline int beats(float x, int j, float y, int i) { return x > y || (x == y && j < i); }

typedef struct {
    Transform tf;
    int n, n_items, width, blocks;
    int terms; /* the row's form of the weights: series_terms() */
    double user_norm, max_item_norm;
    /* per row */
    float *x, *w, *block_max;
    double *tail;
    float cand_x[MAX_N + 1], cand_score[MAX_N + LANES]; /* + 1: a scratch slot */
    float found_x[FOUND + 2 * LANES] __attribute__((aligned(64)));
    int found_j[FOUND + 2 * LANES] __attribute__((aligned(64)));
    int cand_index[MAX_N + 1];
    double cand_weight[MAX_N];
} Row;

/* A value no larger than the row's n-th largest dot product, from the block maxima: the
 * n-th largest of each lane's ceil(n / LANES) + 1 best maxima, which are distinct services
 * (one more than needed makes the bound tighter, so fewer services pass it). */
static float threshold_of(const Row *row) {
    int per_lane = (row->n + LANES - 1) / LANES + 1;
    if (row->blocks < LANES * per_lane) --per_lane;
    if (row->blocks < LANES * per_lane || per_lane > 8) return -INFINITY;
    vf top[8];
    for (int k = 0; k < per_lane; ++k) top[k] = splat(-INFINITY);
    for (int b = 0; b < row->blocks; b += LANES) {
        vf value = load(row->block_max + b);
        for (int k = 0; k < per_lane; ++k) {
            vf higher = vmax(top[k], value);
            value = vmin(top[k], value);
            top[k] = higher;
        }
    }
    float values[8 * LANES] __attribute__((aligned(64)));
    for (int k = 0; k < per_lane; ++k) store(values + k * LANES, top[k]);
    vf best = splat(-INFINITY);
    for (int k = 0; k < per_lane; ++k) {
        vi at_least = {0}; /* how many of the values are >= each lane's */
        for (int other = 0; other < per_lane * LANES; ++other)
            at_least = count_at_least(at_least, splat(values[other]), top[k]);
        vi enough = at_least >= (vi){0} + row->n;
        best = vmax(best, (vf)(((vi)top[k] & enough) | ((vi)splat(-INFINITY) & ~enough)));
    }
    float threshold = best[0];
    for (int lane = 1; lane < LANES; ++lane)
        threshold = best[lane] > threshold ? best[lane] : threshold;
    return threshold;
}

/* Keep (value, column) among the row's n best so far (sorted, best first). */
static inline void offer(Row *row, int *count, float value, int column) {
    const int n = row->n;
    if (*count == n && !beats(value, column, row->cand_x[n - 1], row->cand_index[n - 1])) return;
    int at = *count < n ? (*count)++ : n - 1;
    while (at > 0 && beats(value, column, row->cand_x[at - 1], row->cand_index[at - 1])) {
        row->cand_x[at] = row->cand_x[at - 1];
        row->cand_index[at] = row->cand_index[at - 1];
        --at;
    }
    row->cand_x[at] = value;
    row->cand_index[at] = column;
}

/* Appends the columns first + lane of the lanes in bits at row->found_j[found...] and
 * returns the new count. With AVX-512 it stores a whole packed vector at a position clamped
 * to FOUND, whether or not any lane passed: no branch on the data, whose outcome no
 * predictor can learn (a mispredicted branch here throws away the long chains of the
 * weights in flight). Past FOUND the count stays right while the stored columns do not. */
static inline int append_found(Row *row, int found, lane_mask mask, int first) {
#if LANES == 16
    const __m512i lane_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                 13, 14, 15);
    __m512i column = _mm512_add_epi32(lane_index, _mm512_set1_epi32(first));
    int at = found < FOUND ? found : FOUND;
    _mm512_storeu_si512(row->found_j + at, _mm512_maskz_compress_epi32(mask, column));
    return found + __builtin_popcount((unsigned)mask);
#else
    lane_bits bits = bits_of(mask);
    while (bits) {
        int lane = __builtin_ctz(bits);
        bits &= bits - 1;
        if (found < FOUND) row->found_j[found] = first + lane;
        ++found;
    }
    return found;
#endif
}

/* Every weight of the row into row->w (0 past the catalogue), the summed weights of the
 * services below `limit` per block into row->tail, and the columns of the services at or
 * above it into row->found_j; returns how many those are. `terms` picks the form of the
 * weights (see weights()); a constant wherever this is inlined. */
static inline __attribute__((always_inline)) int weigh(Row *row, vf limit, const int terms) {
    const Transform *tf = &row->tf;
    const int blocks = row->blocks, n_items = row->n_items;
    const float *x = row->x;
    float *w = row->w;
    int found = 0;
    for (int b = 0; b < blocks; b += LANES) {
        vf below = splat(0.0f);
        for (int k = 0; k < BLOCK; ++k) {
            int first = k * blocks + b;
            vf v = load(x + first);
            vf weight = weights(tf, v, terms);
            if (first + LANES > n_items) weight = fill_padding(weight, first, n_items, 0.0f);
            store(w + first, weight);
            lane_mask at_least = mask_at_least(v, limit);
            below = add_outside(below, weight, at_least);
            found = append_found(row, found, at_least, first);
        }
        for (int lane = 0; lane < LANES; ++lane) row->tail[b + lane] = (double)below[lane];
    }
    return found;
}

/* weigh() with the row's form of the weights (row->terms), each form compiled on its own. */
static int weigh_row(Row *row, vf limit) {
    switch (row->terms) {
    case 3: return weigh(row, limit, 3);
    case 4: return weigh(row, limit, 4);
    case 5: return weigh(row, limit, 5);
    default: return weigh(row, limit, 0);
    }
}

/* The block of column j: j mod blocks (a mask where blocks is a power of 2). */
static inline int block_of(const Row *row, int j) {
    return row->blocks & (row->blocks - 1) ? j % row->blocks : j & (row->blocks - 1);
}

/* The n best of the `found` services above the threshold (columns in row->found_j), by
 * counting for each how many
 * others beat it (no branches on the data, unlike an insertion sort); the weights of the
 * others go back into their blocks' tail masses. */
static void rank_found(Row *row, int found) {
    float *found_x = row->found_x;
    int *found_j = row->found_j;
    int padded = (found + LANES - 1) / LANES * LANES;
    for (int i = 0; i < found; ++i) found_x[i] = row->x[found_j[i]];
    for (int i = found; i < padded; ++i) {
        found_x[i] = -INFINITY;
        found_j[i] = INT32_MAX;
    }
    int32_t rank[FOUND + 2 * LANES] __attribute__((aligned(64)));
    for (int i = 0; i < padded; i += LANES) {
        vf xi = load(found_x + i);
        vi ji = *(const vi *)(found_j + i);
        vi above = {0};
        for (int k = 0; k < found; ++k) {
            vf xk = splat(found_x[k]);
            vi jk = (vi){0} + found_j[k];
            above -= (xk > xi) | ((xk == xi) & (jk < ji));
        }
        *(vi *)(rank + i) = above;
    }
    const int n = row->n;
    for (int i = 0; i < found; ++i) { /* branch-free: slot n takes what is no candidate */
        int candidate = rank[i] < n, slot = candidate ? rank[i] : n;
        row->cand_x[slot] = found_x[i];
        row->cand_index[slot] = found_j[i];
        row->tail[block_of(row, found_j[i])] += candidate ? 0.0 : (double)row->w[found_j[i]];
    }
}

/* How many terms of the series the row's weights take (3, 4 or 5), or 0 where some dot
 * product lies beyond the reach of every series form. */
static int series_terms(const Row *row) {
    const float limit = row->tf.fast_limit;
    /* |u . v| <= |u| max |v|: most rows need no pass to know it. */
    double bound = row->user_norm * row->max_item_norm;
    for (int form = 0; form < SERIES_FORMS && limit > 0.0f; ++form)
        if (bound <= 0.999 * SERIES_REACH[form] * row->tf.cap) return SERIES_TERMS[form];
    vf high = splat(-INFINITY), low = splat(INFINITY);
    for (int b = 0; b < row->blocks; b += LANES) high = vmax(high, load(row->block_max + b));
    int j = 0;
    for (; j + LANES <= row->n_items; j += LANES) low = vmin(low, load(row->x + j));
    int holds = 1;
    for (; j < row->n_items; ++j) holds &= row->x[j] >= -limit;
    for (int lane = 0; lane < LANES; ++lane) holds &= low[lane] >= -limit && high[lane] <= limit;
    return holds ? 5 : 0;
}

/* The row's candidates (x, index, score, weight, best first) and tail masses; leaves the
 * weights of the other services in row->w (candidates and padding zeroed). */
static void summarise_row(Row *row) {
    const int n = row->n;
    const int terms = series_terms(row);
    row->terms = terms;

    /* Every one of the n best is >= threshold; padding (-inf) never is. */
    float threshold = threshold_of(row);
    if (threshold < -FLT_MAX) threshold = -FLT_MAX;
    vf limit = splat(threshold);
    int found = weigh_row(row, limit);
    if (found <= FOUND) {
        rank_found(row, found);
    } else { /* many ties or a loose threshold: keep a running top n */
        int count = 0;
        for (int j = 0; j < row->n_items; ++j)
            if (row->x[j] >= threshold) offer(row, &count, row->x[j], j);
    }
    for (int i = 0; i < n; ++i) {
        row->cand_weight[i] = (double)row->w[row->cand_index[i]];
        row->w[row->cand_index[i]] = 0.0f;
    }
    if (found > FOUND) /* the tails left out every service above the threshold */
        for (int b = 0; b < row->blocks; ++b) {
            double sum = 0.0;
            for (int k = 0; k < BLOCK; ++k) sum += row->w[k * row->blocks + b];
            row->tail[b] = sum;
        }

    if (!terms) { /* rare: tanhf is exact to float rounding where the exp form is not */
        for (int i = 0; i < n; ++i)
            row->cand_score[i] = row->tf.cap * tanhf(row->cand_x[i] / row->tf.cap);
        return;
    }
    float cand_x[MAX_N + LANES];
    memcpy(cand_x, row->cand_x, sizeof(float) * (size_t)n);
    for (int i = n; i < n + LANES; ++i) cand_x[i] = 0.0f;
    for (int i = 0; i < n; i += LANES)
        store(row->cand_score + i, odd_series(row->tf.logit_series, load(cand_x + i), 5));
}

typedef double vd __attribute__((vector_size(64)));
typedef double vd_unaligned __attribute__((vector_size(64), aligned(8)));

/* Sum of 16 numbers as a tree: a short chain of dependent additions. */
static inline double sum16(const double *values) {
    vd a = *(const vd_unaligned *)values + *(const vd_unaligned *)(values + 8);
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

/* First position whose running sum of mass exceeds target (clamped to the last), as
 * rec.topn._draw does on the cumulative sums; total is the sum of mass. */
static int draw_within(const double *mass, int size, double target, double total) {
    double limit = total * (1.0 - 1e-12);
    if (target > limit) target = limit;
    double running = 0.0;
    for (int i = 0; i < size; ++i) {
        running += mass[i];
        if (running > target) return i;
    }
    return size - 1;
}

/* draw_within, the total summed here. */
static int draw(const double *mass, int size, double target) {
    double part[4] = {0.0, 0.0, 0.0, 0.0}; /* four chains: the sum is not one long one */
    int i = 0;
    for (; i + 4 <= size; i += 4)
        for (int k = 0; k < 4; ++k) part[k] += mass[i + k];
    double total = (part[0] + part[1]) + (part[2] + part[3]);
    for (; i < size; ++i) total += mass[i];
    return draw_within(mass, size, target, total);
}

/* Sum of size (a multiple of LANES) numbers, in LANES interleaved partial sums. */
static double sum_of(const double *values, int size) {
    double part[LANES] = {0};
    for (int i = 0; i < size; i += LANES)
        for (int lane = 0; lane < LANES; ++lane) part[lane] += values[i + lane];
    double total = 0.0;
    for (int lane = 0; lane < LANES; ++lane) total += part[lane];
    return total;
}

/* draw() over the tail blocks, whose total is known, in chunks of 16; also returns the mass
 * before the chosen block. */
static int draw_block(const double *mass, int size, double target, double total,
                      double *before) {
    double limit = total * (1.0 - 1e-12);
    if (target > limit) target = limit;
    double running = 0.0;
    int i = 0;
    for (; i + 16 < size; i += 16) {
        double chunk = sum16(mass + i);
        if (running + chunk > target) break;
        running += chunk;
    }
    for (; i < size; ++i) {
        if (running + mass[i] > target) break;
        running += mass[i];
    }
    if (i == size) {
        i = size - 1;
        running -= mass[i];
    }
    *before = running;
    return i;
}

/* cap * tanh(x / cap) of one dot product of the row: by the series where the row's weights
 * took one (it holds there), else through tanhf. */
static inline float logit_of(const Row *row, float x) {
    if (!row->terms) return row->tf.cap * tanhf(x / row->tf.cap);
    float z = x * x, p = row->tf.logit_series[4][0];
    for (int k = 3; k >= 0; --k) p = p * z + row->tf.logit_series[k][0];
    return x * p;
}

/* The n slots of one row, as rec.topn.select fills them (see there), from its n uniforms. */
static void select_row(Row *row, double exploration, const double *uniform, int32_t *index,
                       float *score, float *propensity) {
    const int n = row->n, blocks = row->blocks;
    unsigned char taken[MAX_N];
    memset(taken, 0, (size_t)n);
    double free_weight[MAX_N];
    double cand_mass = 0.0, tail_mass = 0.0;
    for (int i = 0; i < n; ++i) cand_mass += row->cand_weight[i];
    tail_mass = sum_of(row->tail, blocks);
    int pointer = 0;

    for (int slot = 0; slot < n; ++slot) {
        double total = cand_mass + tail_mass;
        int position = pointer;
        int from_tail = 0;
        double u = uniform ? uniform[slot] : 1.0;
        if (u < exploration) {
            double target = u / exploration * total;
            if (target < cand_mass) {
                for (int i = 0; i < n; ++i) free_weight[i] = taken[i] ? 0.0 : row->cand_weight[i];
                position = draw(free_weight, n, target);
            } else {
                double inside = target - cand_mass;
                double before;
                int block = draw_block(row->tail, blocks, inside, tail_mass, &before);
                double mass = row->tail[block];
                double fraction = 0.0;
                if (mass > 0.0) {
                    fraction = (inside - before) / mass;
                    fraction = fraction < 0.0 ? 0.0 : (fraction > 1.0 ? 1.0 : fraction);
                }
                double weight[BLOCK];
                for (int k = 0; k < BLOCK; ++k) weight[k] = (double)row->w[block + k * blocks];
                double sum = sum16(weight);
                int k = draw_within(weight, BLOCK, fraction * sum, sum);
                int column = block + k * blocks;
                double picked = weight[k];
                weight[k] = 0.0;
                double rest = sum16(weight);
                row->w[column] = 0.0f;
                /* the total follows the one block that changed (summing all blocks again
                 * gives the same to double rounding, at 16 times the cost) */
                tail_mass += rest - row->tail[block];
                if (tail_mass < 0.0) tail_mass = 0.0;
                row->tail[block] = rest;
                index[slot] = column;
                score[slot] = logit_of(row, row->x[column]);
                double p = exploration * picked / total;
                propensity[slot] = (float)(p < 1.0 ? p : 1.0);
                from_tail = 1;
            }
        }
        if (!from_tail) {
            int at = position < n - 1 ? position : n - 1;
            double weight = row->cand_weight[at];
            double greedy = position == pointer ? 1.0 - exploration : 0.0;
            double p = greedy + exploration * weight / total;
            index[slot] = row->cand_index[at];
            score[slot] = row->cand_score[at];
            propensity[slot] = (float)(p < 1.0 ? p : 1.0);
            taken[at] = 1;
            cand_mass = cand_mass - weight;
            if (cand_mass < 0.0) cand_mass = 0.0;
        }
        while (pointer < n && taken[pointer]) ++pointer;
    }
}

typedef void (*RowSink)(Row *row, int64_t user, void *context);

static int for_each_row(const float *users, int64_t n_users, int dim, const float *items_t,
                        int width, int n_items, float cap, int n, RowSink sink,
                        void *context) {
    if (n < 1 || n > MAX_N || n > n_items || n_items > width || width % (BLOCK * BLOCK) ||
        dim < 1 || dim > MAX_DIM)
        return -1;
    const int blocks = width / BLOCK;
    Row *row = aligned_alloc(64, (sizeof(Row) + 63) / 64 * 64); /* holds vectors */
    float *x = aligned_alloc(64, sizeof(float) * ROWS * (size_t)width);
    float *w = aligned_alloc(64, sizeof(float) * (size_t)width);
    float *block_max = aligned_alloc(64, sizeof(float) * ROWS * (size_t)blocks);
    double *tail = aligned_alloc(64, sizeof(double) * (size_t)blocks);
    float *panels = aligned_alloc(64, sizeof(float) * (size_t)dim * (size_t)width);
    int status = 0;
    if (!row || !x || !w || !block_max || !tail || !panels) {
        status = -2;
        goto done;
    }
    row->n = n;
    row->n_items = n_items;
    row->width = width;
    row->blocks = blocks;
    transform_init(&row->tf, cap);
    row->w = w;
    row->tail = tail;
    row->max_item_norm = 0.0;
    for (int j = 0; j < n_items; ++j) {
        double norm = 0.0;
        for (int d = 0; d < dim; ++d) norm += (double)items_t[d * width + j] * items_t[d * width + j];
        row->max_item_norm = norm > row->max_item_norm ? norm : row->max_item_norm;
    }
    row->max_item_norm = sqrt(row->max_item_norm);
    pack_items(items_t, dim, width, panels);

    for (int64_t start = 0; start < n_users; start += ROWS) {
        int rows = n_users - start < ROWS ? (int)(n_users - start) : ROWS;
        dot_rows(users + start * dim, rows, dim, panels, width, n_items, x, block_max);
        for (int r = 0; r < rows; ++r) {
            row->x = x + (size_t)r * width;
            row->block_max = block_max + (size_t)r * blocks;
            const float *user = users + (start + r) * dim;
            double norm = 0.0;
            for (int d = 0; d < dim; ++d) norm += (double)user[d] * user[d];
            row->user_norm = sqrt(norm);
            summarise_row(row);
            sink(row, start + r, context);
        }
    }
done:
    free(row);
    free(x);
    free(w);
    free(block_max);
    free(tail);
    free(panels);
    return status;
}

typedef struct {
    int64_t *index;
    float *score;
    double *weight, *tail;
} CandidateOut;

static void keep_candidates(Row *row, int64_t user, void *context) {
    CandidateOut *out = context;
    const int n = row->n;
    for (int i = 0; i < n; ++i) {
        out->index[user * n + i] = row->cand_index[i];
        out->score[user * n + i] = row->cand_score[i];
        out->weight[user * n + i] = row->cand_weight[i];
    }
    memcpy(out->tail + user * row->blocks, row->tail, sizeof(double) * (size_t)row->blocks);
}

/* Candidates of every user: index, score (n_users x n), weight (n_users x n) and tail
 * (n_users x width / 16). Returns 0, or a negative number for bad sizes (-1) or no memory. */
int rec_candidates(const float *users, int64_t n_users, int dim, const float *items_t,
                   int width, int n_items, float cap, int n, int64_t *index, float *score,
                   double *weight, double *tail) {
    CandidateOut out = {index, score, weight, tail};
    return for_each_row(users, n_users, dim, items_t, width, n_items, cap, n, keep_candidates,
                        &out);
}

typedef struct {
    double exploration;
    const double *uniform;
    int32_t *index;
    float *score, *propensity;
    int use_counter;
    uint64_t base;
    int64_t first_row;
} SlateOut;

/* splitmix64's output function (Steele, Lea and Flood 2014): a bijective 64-bit mixer. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The uniform number of counter c under a key's base: what rec.topn.CounterUniforms gives. */
static inline double counter_uniform(uint64_t base, uint64_t c) {
    return (double)(mix64(base + 0x9E3779B97F4A7C15ull * (c + 1)) >> 11) * 0x1.0p-53;
}

static void fill_slate(Row *row, int64_t user, void *context) {
    SlateOut *out = context;
    const int64_t at = user * row->n;
    const double *uniform = out->uniform ? out->uniform + at : NULL;
    double own[MAX_N];
    if (out->use_counter) {
        const uint64_t first = (uint64_t)(out->first_row + user) * (uint64_t)row->n;
        for (int slot = 0; slot < row->n; ++slot)
            own[slot] = counter_uniform(out->base, first + (uint64_t)slot);
        uniform = own;
    }
    select_row(row, out->exploration, uniform, out->index + at, out->score + at,
               out->propensity + at);
}

/* Every user's n slots with exploration: index (int32), score, propensity (n_users x n).
 * uniform holds n_users x n numbers in [0, 1) (NULL when exploration is 0 or with
 * use_counter); with use_counter, each row's numbers are computed from (base, row, slot)
 * instead, row counting from first_row (rec.topn.CounterUniforms). */
int rec_rank(const float *users, int64_t n_users, int dim, const float *items_t, int width,
             int n_items, float cap, int n, double exploration, const double *uniform,
             int use_counter, uint64_t base, int64_t first_row,
             int32_t *index, float *score, float *propensity) {
    SlateOut out = {exploration, uniform, index, score, propensity, use_counter, base,
                    first_row};
    return for_each_row(users, n_users, dim, items_t, width, n_items, cap, n, fill_slate, &out);
}

/* tanh to about 1e-7 absolute (not relative: near 0 the form below cancels, harmless for
 * hidden units): 1 - 2 / (e^2|y| + 1) with the sign of y. */
static inline vf tanh_v(vf y) {
    const vi sign_bit = (vi){0} + (int32_t)0x80000000u;
    vf magnitude = (vf)((vi)y & ~sign_bit);
    vf e = exp2_unclamped(vmin(magnitude, splat(40.0f)) * splat(2.0f * 1.4426950408889634f));
    return (vf)((vi)(splat(1.0f) - splat(2.0f) / (e + splat(1.0f))) | ((vi)y & sign_bit));
}

#define TOWER_ROWS 6

/* Outputs o.. o + span * LANES of `dense`, the partial sums of all rows in registers. */
static inline __attribute__((always_inline)) void dense_tile(
        const float *in, int in_dim, const float *weight_t, const float *bias, int out_dim,
        int squash, float *out, int o, const int span) {
    vf acc[TOWER_ROWS][4];
    for (int r = 0; r < TOWER_ROWS; ++r)
        for (int s = 0; s < span; ++s) acc[r][s] = load(bias + o + s * LANES);
    for (int i = 0; i < in_dim; ++i) {
        vf column[4];
        for (int s = 0; s < span; ++s)
            column[s] = load(weight_t + (size_t)i * out_dim + o + s * LANES);
        for (int r = 0; r < TOWER_ROWS; ++r) {
            vf value = splat(in[r * in_dim + i]);
            for (int s = 0; s < span; ++s) acc[r][s] += value * column[s];
        }
    }
    for (int r = 0; r < TOWER_ROWS; ++r)
        for (int s = 0; s < span; ++s)
            store(out + r * out_dim + o + s * LANES, squash ? tanh_v(acc[r][s]) : acc[r][s]);
}

/* out (rows x out_dim) = in (rows x in_dim) @ weight_t (in_dim x out_dim) + bias, tanh'd
 * when squash; out_dim is a multiple of LANES. */
static void dense(const float *in, int in_dim, const float *weight_t, const float *bias,
                  int out_dim, int squash, float *out) {
    int o = 0;
    for (; o + 4 * LANES <= out_dim; o += 4 * LANES)
        dense_tile(in, in_dim, weight_t, bias, out_dim, squash, out, o, 4);
    for (; o < out_dim; o += LANES)
        dense_tile(in, in_dim, weight_t, bias, out_dim, squash, out, o, 1);
}

/* A tanh MLP on every user: layer k maps sizes[k] to sizes[k + 1] features with weight_t[k]
 * (sizes[k] x sizes[k + 1], transposed) and bias[k], tanh between layers, none after the
 * last. Sizes past the first are multiples of 16 (zero-padded units); at most 1024. out is
 * n_users x out_stride: the first out_dim outputs, then a 1 when out_stride > out_dim.
 * Returns 0, or -1 for bad sizes, -2 without memory. */
int rec_user_factors(const float *features, int64_t n_users, int n_layers, const int *sizes,
                     const float *const *weight_t, const float *const *bias, int out_dim,
                     int out_stride, float *out) {
    if (n_layers < 1 || n_layers > 8 || out_dim > sizes[n_layers] || out_stride < out_dim ||
        out_stride > out_dim + 1)
        return -1;
    for (int k = 0; k <= n_layers; ++k)
        if (sizes[k] < 1 || sizes[k] > 1024 || (k > 0 && sizes[k] % BLOCK)) return -1;
    float *buffer[2] = {aligned_alloc(64, sizeof(float) * TOWER_ROWS * 1024),
                        aligned_alloc(64, sizeof(float) * TOWER_ROWS * 1024)};
    if (!buffer[0] || !buffer[1]) {
        free(buffer[0]);
        free(buffer[1]);
        return -2;
    }
    for (int64_t start = 0; start < n_users; start += TOWER_ROWS) {
        int rows = n_users - start < TOWER_ROWS ? (int)(n_users - start) : TOWER_ROWS;
        float *in = buffer[0];
        memset(in, 0, sizeof(float) * TOWER_ROWS * (size_t)sizes[0]);
        memcpy(in, features + start * sizes[0], sizeof(float) * (size_t)(rows * sizes[0]));
        for (int k = 0; k < n_layers; ++k) {
            float *next = buffer[(k + 1) % 2];
            dense(in, sizes[k], weight_t[k], bias[k], sizes[k + 1], k + 1 < n_layers, next);
            in = next;
        }
        for (int r = 0; r < rows; ++r) {
            float *user = out + (start + r) * out_stride;
            memcpy(user, in + r * sizes[n_layers], sizeof(float) * (size_t)out_dim);
            if (out_stride > out_dim) user[out_dim] = 1.0f;
        }
    }
    free(buffer[0]);
    free(buffer[1]);
    return 0;
}

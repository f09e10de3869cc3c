/* Fused scoring, top-n and exploration slates for factor policies (see rec/native/__init__.py).
 *
 * For each user row u (D factors) and the services' factors stored transposed (D x W, W the
 * padded width), the logit of service j is cap * tanh(u . v_j / cap) and its softmax weight
 * exp(logit). A group of ROWS users is scored against 16 services at a time with the partial
 * sums held in registers; the raw dot products of each row then sit in a per-row buffer that
 * fits in L1/L2, where the row's n best services (ranked by the dot product, which the logit
 * is monotone in), the weights and the per-block tail masses are found in short passes. The
 * blocks are those of rec/topn.py: block b holds the columns b, b + W/16, b + 2W/16, ...
 *
 * rec_candidates writes what rec.topn.Candidates holds; rec_rank also fills the n slots of
 * every row with the procedure of rec.topn.select, consuming the same uniform numbers, so
 * both produce the same slates as the torch implementation up to float rounding.
 *
 * Plain C with GCC vector extensions; built by rec/native/__init__.py with -O3 -march=native.
 *
 * Limitation: written for 8-float vectors (AVX2); AVX-512 machines run it at the same width.
 * Every weight needs an exp (17 vector operations per 8 services, as many as the rank-17 dot
 * products), so a row costs about 2.5-3 times the bare matmul of the same logits, not 2.
 * Limitation: rows with more than FOUND services at or above the threshold (exact ties over
 * a large share of the catalogue) fall back to a slower running insertion.
 */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16
#define ROWS 4
#define LANES 8
#define MAX_N 512
#define FOUND 256 /* services above the threshold that are ranked by counting */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4)));

static inline v8f load8(const float *p) { return *(const v8f_unaligned *)p; }
static inline void store8(float *p, v8f v) { *(v8f_unaligned *)p = v; }
static inline v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

#ifdef __AVX__
static inline v8f vmax(v8f a, v8f b) { return __builtin_ia32_maxps256(a, b); }
static inline v8f vmin(v8f a, v8f b) { return __builtin_ia32_minps256(a, b); }
#else
static inline v8f vmax(v8f a, v8f b) {
    v8i keep = a > b;
    return (v8f)(((v8i)a & keep) | ((v8i)b & ~keep));
}

static inline v8f vmin(v8f a, v8f b) {
    v8i keep = a < b;
    return (v8f)(((v8i)a & keep) | ((v8i)b & ~keep));
}
#endif

/* Bit i set where lane i of v is >= limit. */
static inline unsigned lanes_at_least(v8f v, v8f limit) {
#ifdef __AVX__
    return (unsigned)__builtin_ia32_movmskps256((v8f)(v >= limit));
#else
    unsigned bits = 0;
    for (int lane = 0; lane < LANES; ++lane) bits |= (unsigned)(v[lane] >= limit[lane]) << lane;
    return bits;
#endif
}

/* 2^t for t in [-126, 126] (clamped), relative error below 2e-7: t = k + r, |r| <= 1/2, and a
 * degree-5 polynomial fitted to 2^r; k goes into the exponent bits. */
static inline v8f exp2_unclamped(v8f t) {
    const v8f shifter = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v8f shifted = t + shifter;
    v8f k = shifted - shifter;
    v8f r = t - k;
    v8f p = splat(0.0013276470f);
    p = p * r + splat(0.0096755410f);
    p = p * r + splat(0.0555071346f);
    p = p * r + splat(0.2402212024f);
    p = p * r + splat(0.6931469440f);
    p = p * r + splat(1.0000001192f);
    /* k sits in the low mantissa bits of shifted; the shift drops the shifter's own bits */
    v8i exponent = (v8i)shifted << 23;
    return (v8f)((v8i)p + exponent);
}

static inline v8f exp2_approx(v8f t) {
    return exp2_unclamped(vmin(vmax(t, splat(-126.0f)), splat(126.0f)));
}

/* Coefficients of tanh(y) / y as a polynomial in y^2 for |y| <= 1/2 (relative error 1.3e-8). */
static const double TANH_SERIES[5] = {0.9999999868717725, -0.3333306939324604,
                                      0.1332477930215749, -0.05298607430507045,
                                      0.01713500466523066};

typedef struct {
    float cap;
    float fast_limit;  /* |x| up to which the polynomial form of the logit holds */
    v8f series[5];     /* log2(e) * TANH_SERIES[k] / cap^(2k): log2 weight = x * P(x^2) */
    v8f to_exp2_arg;   /* 2 log2(e) / cap */
    v8f cap_v, two_cap, log2e;
} Transform;

static void transform_init(Transform *tf, float cap) {
    double scale = 1.4426950408889634; /* log2(e) */
    tf->cap = cap;
    /* there the log2 weight stays within log2(e) cap tanh(1/2) < 126: no clamping needed */
    tf->fast_limit = cap < 150.0f ? 0.5f * cap : 0.0f;
    for (int k = 0; k < 5; ++k) {
        tf->series[k] = splat((float)(scale * TANH_SERIES[k]));
        scale /= (double)cap * (double)cap;
    }
    tf->to_exp2_arg = splat((float)(2.0 * 1.4426950408889634 / cap));
    tf->cap_v = splat(cap);
    tf->two_cap = splat(2.0f * cap);
    tf->log2e = splat(1.4426950408889634f);
}

/* Raw dot products of `rows` (<= ROWS) users with all width services: out is ROWS x width. */
static void dot_rows(const float *users, int rows, int dim, const float *items_t, int width,
                     float *out) {
    float u[ROWS * 64];
    float *heap = NULL;
    float *user = u;
    if (dim > 64) {
        heap = malloc(sizeof(float) * ROWS * (size_t)dim);
        user = heap;
    }
    for (int r = 0; r < ROWS; ++r)
        for (int d = 0; d < dim; ++d) user[r * dim + d] = r < rows ? users[r * dim + d] : 0.0f;

    for (int c = 0; c < width; c += 2 * LANES) {
        v8f acc[ROWS][2];
        for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = splat(0.0f);
        const float *v = items_t + c;
        for (int d = 0; d < dim; ++d, v += width) {
            v8f v0 = load8(v), v1 = load8(v + LANES);
            for (int r = 0; r < ROWS; ++r) {
                float ud = user[r * dim + d];
                acc[r][0] += ud * v0;
                acc[r][1] += ud * v1;
            }
        }
        for (int r = 0; r < ROWS; ++r) {
            store8(out + r * width + c, acc[r][0]);
            store8(out + r * width + c + LANES, acc[r][1]);
        }
    }
    free(heap);
}

/* Does candidate (x, j) rank above (y, i)? Larger dot product first, then lower column. */
static inline int beats(float x, int j, float y, int i) { return x > y || (x == y && j < i); }

typedef struct {
    int n, n_items, width, blocks;
    double user_norm, max_item_norm;
    Transform tf;
    /* per row */
    float *x, *w, *block_max;
    double *tail;
    float cand_x[MAX_N], cand_score[MAX_N];
    float found_x[FOUND + LANES] __attribute__((aligned(32)));
    int found_j[FOUND + LANES] __attribute__((aligned(32)));
    int cand_index[MAX_N];
    double cand_weight[MAX_N];
} Row;

/* A value no larger than the row's n-th largest dot product, from the block maxima: the
 * n-th largest of each lane's ceil(n / 8) best maxima, which are distinct services. */
static float threshold_of(const Row *row) {
    int per_lane = (row->n + LANES - 1) / LANES;
    if (row->blocks < LANES * per_lane || per_lane > 8) return -INFINITY;
    v8f top[8];
    for (int k = 0; k < per_lane; ++k) top[k] = splat(-INFINITY);
    for (int b = 0; b < row->blocks; b += LANES) {
        v8f value = load8(row->block_max + b);
        for (int k = 0; k < per_lane; ++k) {
            v8f higher = vmax(top[k], value);
            value = vmin(top[k], value);
            top[k] = higher;
        }
    }
    float best = -INFINITY;
    for (int k = 0; k < per_lane; ++k)
        for (int lane = 0; lane < LANES; ++lane) {
            v8f value = splat(top[k][lane]);
            v8i at_least = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int other = 0; other < per_lane; ++other) at_least -= top[other] >= value;
            int count = 0;
            for (int i = 0; i < LANES; ++i) count += at_least[i];
            if (count >= row->n && top[k][lane] > best) best = top[k][lane];
        }
    return best;
}

/* cap * tanh(x / cap) to float precision: the odd series near 0, tanhf beyond. */
static inline float logit_of(const Transform *tf, float x) {
    if (x < -tf->fast_limit || x > tf->fast_limit) return tf->cap * tanhf(x / tf->cap);
    double y = (double)x / tf->cap, z = y * y, p = TANH_SERIES[4];
    for (int k = 3; k >= 0; --k) p = p * z + TANH_SERIES[k];
    return (float)(tf->cap * y * p);
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

/* Where lanes of v at columns j.. are >= limit, append them to the row's found services. */
static inline int find(Row *row, int found, v8f v, v8f limit, int j) {
    unsigned bits = lanes_at_least(v, limit);
    while (bits) {
        int lane = __builtin_ctz(bits);
        bits &= bits - 1;
        if (found < FOUND) {
            row->found_x[found] = v[lane];
            row->found_j[found] = j + lane;
        }
        ++found;
    }
    return found;
}

/* Softmax weights exp(cap * tanh(x / cap)) of the row's dot products into row->w, and the
 * services with x >= limit into row->found_*; returns how many those are. */
static int weigh_and_find(Row *row, int fast, v8f limit) {
    const Transform *tf = &row->tf;
    const float *x = row->x;
    float *w = row->w;
    int found = 0;
    if (fast) {
        for (int j = 0; j < row->width; j += LANES) {
            v8f v = load8(x + j);
            v8f z = v * v;
            v8f p = tf->series[4];
            p = p * z + tf->series[3];
            p = p * z + tf->series[2];
            p = p * z + tf->series[1];
            p = p * z + tf->series[0];
            store8(w + j, exp2_unclamped(v * p));
            found = find(row, found, v, limit, j);
        }
        return found;
    }
    for (int j = 0; j < row->width; j += LANES) {
        v8f v = load8(x + j);
        v8f e = exp2_approx(v * tf->to_exp2_arg); /* exp(2x / cap) */
        v8f logit = tf->cap_v - tf->two_cap / (e + splat(1.0f));
        store8(w + j, exp2_approx(logit * tf->log2e));
        found = find(row, found, v, limit, j);
    }
    return found;
}

/* The n best of the `found` services above the threshold, by counting for each how many
 * others beat it: no branches on the data, unlike an insertion sort. */
static void rank_found(Row *row, int found) {
    float *found_x = row->found_x;
    int *found_j = row->found_j;
    int padded = (found + LANES - 1) / LANES * LANES;
    for (int i = found; i < padded; ++i) {
        found_x[i] = -INFINITY;
        found_j[i] = INT32_MAX;
    }
    for (int i = 0; i < found; ++i) {
        v8f xi = splat(found_x[i]);
        v8i ji = {found_j[i], found_j[i], found_j[i], found_j[i],
                  found_j[i], found_j[i], found_j[i], found_j[i]};
        v8i above = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int k = 0; k < padded; k += LANES) {
            v8f xk = load8(found_x + k);
            v8i jk = *(const v8i *)(found_j + k);
            above -= (xk > xi) | ((xk == xi) & (jk < ji));
        }
        int rank = 0;
        for (int lane = 0; lane < LANES; ++lane) rank += above[lane];
        if (rank < row->n) {
            row->cand_x[rank] = found_x[i];
            row->cand_index[rank] = found_j[i];
        }
    }
}

/* The row's candidates (x, index, score, weight, best first) and tail masses; leaves the
 * weights of the other services in row->w (candidates and padding zeroed). */
static void summarise_row(Row *row) {
    const int n = row->n, n_items = row->n_items, width = row->width, blocks = row->blocks;
    float *x = row->x;
    /* |u . v| <= |u| max |v|: most rows need no pass to know the polynomial form holds. */
    int fast = row->user_norm * row->max_item_norm <= 0.999 * row->tf.fast_limit;
    if (!fast) {
        v8f low = splat(INFINITY), high = splat(-INFINITY);
        for (int j = 0; j < width; j += LANES) { /* padding holds 0: harmless here */
            v8f v = load8(x + j);
            low = vmin(low, v);
            high = vmax(high, v);
        }
        fast = 1;
        for (int lane = 0; lane < LANES; ++lane)
            fast &= low[lane] >= -row->tf.fast_limit && high[lane] <= row->tf.fast_limit;
    }
    for (int j = n_items; j < width; ++j) x[j] = -INFINITY;

    float *block_max = row->block_max;
    for (int b = 0; b < blocks; b += LANES) {
        v8f top = load8(x + b);
        for (int k = 1; k < BLOCK; ++k) top = vmax(top, load8(x + k * blocks + b));
        store8(block_max + b, top);
    }

    /* Every one of the n best is >= threshold; padding (-inf) never is. */
    float threshold = threshold_of(row);
    if (threshold < -FLT_MAX) threshold = -FLT_MAX;
    v8f limit = splat(threshold);
    int found = weigh_and_find(row, fast, limit);
    if (found <= FOUND) {
        rank_found(row, found);
    } else { /* many ties or a loose threshold: keep a running top n instead */
        int count = 0;
        for (int j = 0; j < n_items; ++j)
            if (x[j] >= threshold) offer(row, &count, x[j], j);
    }

    float cand_score[MAX_N + LANES], cand_weight[MAX_N + LANES];
    for (int i = 0; i < n; ++i) cand_score[i] = logit_of(&row->tf, row->cand_x[i]);
    for (int i = n; i < n + LANES; ++i) cand_score[i] = 0.0f;
    for (int i = 0; i < n; i += LANES)
        store8(cand_weight + i, exp2_approx(load8(cand_score + i) * row->tf.log2e));
    for (int i = 0; i < n; ++i) {
        row->cand_score[i] = cand_score[i];
        row->cand_weight[i] = (double)cand_weight[i];
    }

    float *w = row->w;
    for (int j = n_items; j < width; ++j) w[j] = 0.0f;
    for (int i = 0; i < n; ++i) w[row->cand_index[i]] = 0.0f;

    for (int b = 0; b < blocks; b += LANES) {
        v8f sum = load8(w + b);
        for (int k = 1; k < BLOCK; ++k) sum += load8(w + k * blocks + b);
        for (int lane = 0; lane < LANES; ++lane) row->tail[b + lane] = (double)sum[lane];
    }
}

/* First position whose running sum of mass exceeds target (clamped to the last), as
 * rec.topn._draw does on the cumulative sums. */
static int draw(const double *mass, int size, double target) {
    double total = 0.0;
    for (int i = 0; i < size; ++i) total += mass[i];
    double limit = total * (1.0 - 1e-12);
    if (target > limit) target = limit;
    double running = 0.0;
    for (int i = 0; i < size; ++i) {
        running += mass[i];
        if (running > target) return i;
    }
    return size - 1;
}

/* Sum of size (a multiple of 8) numbers, in 8 interleaved partial sums. */
static double sum_of(const double *values, int size) {
    double part[LANES] = {0};
    for (int i = 0; i < size; i += LANES)
        for (int lane = 0; lane < LANES; ++lane) part[lane] += values[i + lane];
    double total = 0.0;
    for (int lane = 0; lane < LANES; ++lane) total += part[lane];
    return total;
}

/* draw() over the tail blocks, whose total is known, in chunks of 8; also returns the mass
 * before the chosen block. */
static int draw_block(const double *mass, int size, double target, double total,
                      double *before) {
    double limit = total * (1.0 - 1e-12);
    if (target > limit) target = limit;
    double running = 0.0;
    int i = 0;
    for (; i + LANES < size; i += LANES) {
        double chunk = 0.0;
        for (int lane = 0; lane < LANES; ++lane) chunk += mass[i + lane];
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
                double weight[BLOCK], sum = 0.0;
                for (int k = 0; k < BLOCK; ++k) {
                    weight[k] = (double)row->w[block + k * blocks];
                    sum += weight[k];
                }
                int k = draw(weight, BLOCK, fraction * sum);
                int column = block + k * blocks;
                double picked = weight[k], rest = 0.0;
                weight[k] = 0.0;
                for (int i = 0; i < BLOCK; ++i) rest += weight[i];
                row->w[column] = 0.0f;
                row->tail[block] = rest;
                tail_mass = sum_of(row->tail, blocks);
                index[slot] = column;
                score[slot] = row->tf.cap * tanhf(row->x[column] / row->tf.cap);
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
    if (n < 1 || n > MAX_N || n > n_items || n_items > width || width % (BLOCK * LANES))
        return -1;
    Row *row = aligned_alloc(64, (sizeof(Row) + 63) / 64 * 64); /* holds vectors */
    float *x = aligned_alloc(64, sizeof(float) * ROWS * (size_t)width);
    float *w = aligned_alloc(64, sizeof(float) * (size_t)width);
    float *block_max = malloc(sizeof(float) * (size_t)width / BLOCK);
    double *tail = malloc(sizeof(double) * (size_t)width / BLOCK);
    int status = 0;
    if (!row || !x || !w || !block_max || !tail) {
        status = -2;
        goto done;
    }
    row->n = n;
    row->n_items = n_items;
    row->width = width;
    row->blocks = width / BLOCK;
    transform_init(&row->tf, cap);
    row->w = w;
    row->block_max = block_max;
    row->tail = tail;
    row->max_item_norm = 0.0;
    for (int j = 0; j < n_items; ++j) {
        double norm = 0.0;
        for (int d = 0; d < dim; ++d) norm += (double)items_t[d * width + j] * items_t[d * width + j];
        row->max_item_norm = norm > row->max_item_norm ? norm : row->max_item_norm;
    }
    row->max_item_norm = sqrt(row->max_item_norm);

    for (int64_t start = 0; start < n_users; start += ROWS) {
        int rows = n_users - start < ROWS ? (int)(n_users - start) : ROWS;
        dot_rows(users + start * dim, rows, dim, items_t, width, x);
        for (int r = 0; r < rows; ++r) {
            row->x = x + (size_t)r * width;
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
} SlateOut;

static void fill_slate(Row *row, int64_t user, void *context) {
    SlateOut *out = context;
    const int64_t at = user * row->n;
    select_row(row, out->exploration, out->uniform ? out->uniform + at : NULL, out->index + at,
               out->score + at, out->propensity + at);
}

/* Every user's n slots with exploration: index (int32), score, propensity (n_users x n).
 * uniform holds n_users x n numbers in [0, 1) (NULL when exploration is 0). */
int rec_rank(const float *users, int64_t n_users, int dim, const float *items_t, int width,
             int n_items, float cap, int n, double exploration, const double *uniform,
             int32_t *index, float *score, float *propensity) {
    SlateOut out = {exploration, uniform, index, score, propensity};
    return for_each_row(users, n_users, dim, items_t, width, n_items, cap, n, fill_slate, &out);
}

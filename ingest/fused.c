/* One pass over a hooked CPU activation [rows, seq, width] (float32, contiguous).
 *
 * For every token: its top-k units (values descending, ties to the lower unit index,
 * NaN ranked highest as torch.topk does). For every (row, unit), over the row's valid
 * tokens: sum, sum of |a|, sums of a^2, a^3, a^4 and max(a, 0), count above the
 * threshold, min, max and the first position reaching the max. whq_histogram adds
 * each valid value to its unit's fixed-bin histogram (the bins: capture.py); whq_extremes finds
 * each unit's top and bottom examples of a batch, ties to the first token in document order.
 * whq_sparse_pass is whq_site_pass and whq_histogram on a sparse code, from each token's
 * listed units alone; whq_topk is a row's top-k, with a dictionary encoder's bias added in
 * cache where given. Rows run in parallel on torch's own OpenMP pool (this
 * library links the libgomp that torch has already loaded), so it adds no threads.
 *
 * Top-k without sorting the row: split the row into k interleaved sets; the smallest
 * of the k set maxima is a lower bound on the k-th largest value (k disjoint sets each
 * hold a value at least that large). Only values at or above the bound are collected,
 * the same bound over the collected values tightens it once more, and the survivors
 * (about 1.5k of them) are insertion-sorted in unit order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Histogram grid (capture.py HIST_*): 96 quarter-octave steps from 2^-12 (float exponent 115 = 460 / 4). */
#define WHQ_HIST_LOW 460
#define WHQ_HIST_STEPS 96
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* a ranks above b: larger, or NaN against a number */
static inline int above(float a, float b) { return a > b || (a != a && b == b); }
/* a ranks below b: smaller, or NaN against a number (NaN sticks, as in torch.amin) */
static inline int below(float a, float b) { return a < b || (a != a && b == b); }

static inline void insert(float *vals, int32_t *ids, int64_t filled, float value, int32_t id) {
    int64_t p = filled - 1;
    while (p > 0 && above(value, vals[p - 1])) {
        vals[p] = vals[p - 1];
        ids[p] = ids[p - 1];
        p--;
    }
    vals[p] = value;
    ids[p] = id;
}

/* The smallest of the maxima of k interleaved sets of v[0 .. n) (n a multiple of k, n >= k). */
static float set_floor(const float *restrict v, int64_t n, int64_t k, float *restrict set_max) {
    for (int64_t s = 0; s < k; s++) set_max[s] = v[s];
    for (int64_t i = k; i + k <= n; i += k)
        for (int64_t s = 0; s < k; s++) set_max[s] = v[i + s] > set_max[s] ? v[i + s] : set_max[s];
    float floor_ = set_max[0];
    for (int64_t s = 1; s < k; s++) floor_ = set_max[s] < floor_ ? set_max[s] : floor_;
    return floor_;
}

/* Keeps v[j] unless it is below the floor (NaN is kept); returns how many were kept. */
static int64_t collect(const float *restrict v, int64_t width, float floor_, float *restrict cv, int32_t *restrict ci) {
    int64_t n = 0, j = 0;
#ifdef __AVX512F__
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 bound = _mm512_set1_ps(floor_);
    for (; j + 16 <= width; j += 16) {
        __m512 chunk = _mm512_loadu_ps(v + j);
        __mmask16 keep = _mm512_cmp_ps_mask(chunk, bound, _CMP_NLT_UQ);
        /* compress in registers, then a plain store: the memory form of compress is slow on some cores */
        _mm512_storeu_ps(cv + n, _mm512_maskz_compress_ps(keep, chunk));
        _mm512_storeu_si512(ci + n, _mm512_maskz_compress_epi32(keep, _mm512_add_epi32(_mm512_set1_epi32((int32_t)j), lane)));
        n += __builtin_popcount(keep);
    }
#endif
    for (; j < width; j++) {
        cv[n] = v[j];
        ci[n] = (int32_t)j;
        n += !(v[j] < floor_);
    }
    return n;
}

/* Per-thread buffers for topk_row; + 16: the vector collect stores a whole register past the last kept value. */
typedef struct {
    float *values;
    int32_t *ids;
    float *set_max;
} Scratch;

static int scratch_alloc(Scratch *s, int64_t width, int64_t k) {
    s->values = malloc(sizeof(float) * (width + 16));
    s->ids = malloc(sizeof(int32_t) * (width + 16));
    s->set_max = malloc(sizeof(float) * k);
    return s->values && s->ids && s->set_max;
}

static void scratch_free(Scratch *s) {
    free(s->values);
    free(s->ids);
    free(s->set_max);
}

/* set_floor of v + bias, the sum stored in row on the way (the whole width, tail included): one read of v. */
static float set_floor_biased(const float *restrict v, const float *restrict bias, int64_t width, int64_t k,
                              float *restrict set_max, float *restrict row) {
    int64_t n = width - width % k;
    for (int64_t s = 0; s < k; s++) set_max[s] = row[s] = v[s] + bias[s];
    for (int64_t i = k; i + k <= n; i += k)
        for (int64_t s = 0; s < k; s++) {
            float a = row[i + s] = v[i + s] + bias[i + s];
            set_max[s] = a > set_max[s] ? a : set_max[s];
        }
    for (int64_t j = n; j < width; j++) row[j] = v[j] + bias[j];
    float floor_ = set_max[0];
    for (int64_t s = 1; s < k; s++) floor_ = set_max[s] < floor_ ? set_max[s] : floor_;
    return floor_;
}

/* The top-k of v (+ bias where given, summed into row). */
static void topk_row(const float *restrict v, const float *restrict bias, float *restrict row, int64_t width, int64_t k,
                     float *restrict vals, int32_t *restrict ids, const Scratch *scratch) {
    float *restrict cv = scratch->values, *restrict set_max = scratch->set_max;
    int32_t *restrict ci = scratch->ids;
    float bound = bias ? set_floor_biased(v, bias, width, k, set_max, row) : set_floor(v, width - width % k, k, set_max);
    int64_t n = collect(bias ? row : v, width, bound, cv, ci);
    if (n >= 2 * k) {
        float floor_ = set_floor(cv, n - n % k, k, set_max);
        int64_t kept = 0;
        for (int64_t c = 0; c < n; c++) {
            cv[kept] = cv[c];
            ci[kept] = ci[c];
            kept += !(cv[c] < floor_);
        }
        n = kept;
    }
    int64_t filled = 0;
    for (int64_t c = 0; c < n; c++) {
        if (filled < k) insert(vals, ids, ++filled, cv[c], ci[c]);
        else if (above(cv[c], vals[k - 1])) insert(vals, ids, k, cv[c], ci[c]);
    }
}

/* Per-row partial sums of a unit: a, a^2, a^3, a^4, max(a, 0); and its min. */
typedef struct {
    float *sum, *sq, *cube, *quad, *pos, *min;
} Partials;

static void accumulate(const float *restrict v, int64_t width, float threshold, int32_t t, const Partials *p,
                       int32_t *restrict f, float *restrict m, int32_t *restrict am) {
    float *restrict s = p->sum, *restrict q = p->sq, *restrict c = p->cube, *restrict h = p->quad, *restrict ps = p->pos,
          *restrict mn = p->min;
    for (int64_t j = 0; j < width; j++) {
        float vj = v[j], sq = vj * vj;
        s[j] += vj;
        q[j] += sq;
        c[j] += sq * vj;
        h[j] += sq * sq;
        ps[j] += vj > 0 ? vj : 0.0f;
        mn[j] = below(vj, mn[j]) ? vj : mn[j];
        f[j] += vj > threshold;
        int up = vj > m[j] || (vj != vj && m[j] == m[j]); /* NaN wins and sticks, as in torch.amax */
        m[j] = up ? vj : m[j];
        am[j] = up ? t : am[j];
    }
}

static void accumulate_abs(const float *restrict v, int64_t width, float *restrict a) {
    for (int64_t j = 0; j < width; j++) a[j] += fabsf(v[j]);
}

/* Row r's partials (every row's start at `rows`, r's at `offset`), cleared for its first token, with its
 * fired counts, max (-inf), argmax and |a| sums (where kept). */
static Partials start_row(const Partials *rows, int64_t offset, int64_t width, int32_t *f, float *m, int32_t *am,
                          float *a) {
    const Partials p = {rows->sum + offset, rows->sq + offset,  rows->cube + offset,
                        rows->quad + offset, rows->pos + offset, rows->min + offset};
    for (int64_t j = 0; j < width; j++) {
        p.sum[j] = p.sq[j] = p.cube[j] = p.quad[j] = p.pos[j] = 0;
        p.min[j] = INFINITY;
        f[j] = 0;
        m[j] = -INFINITY;
        am[j] = 0;
    }
    if (a)
        for (int64_t j = 0; j < width; j++) a[j] = 0;
    return p;
}

/* Called by every thread of a parallel region once it allocated its scratch (ok = 0: it could not): after
 * the barrier every thread sees *failed set if any one failed, and skips the work. */
static void settle_allocations(int ok, int *failed) {
    if (!ok) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
}

/* The running stats of a site layer [width], updated in place. */
typedef struct {
    int64_t *n_fired;
    double *sum, *sum_sq, *sum_cube, *sum_quad, *sum_pos;
    float *min, *max;
    int64_t *max_doc, *max_pos;
} Running;

/* Folds the per-row partials of unit j into the running stats: sums in float64, the min,
 * and the max with its first token in document order (rows visited in document order,
 * first position within the row), replacing the running max only when larger, or equal and earlier. */
static void fold_unit(int64_t j, int64_t rows, int64_t width, const Partials *p, const int32_t *row_fired,
                      const float *row_max, const int32_t *row_argmax, const int64_t *row_order, const int64_t *row_doc,
                      const int64_t *row_start, const Running *run) {
    double s = 0, q = 0, c = 0, h = 0, ps = 0;
    float mn = INFINITY;
    int64_t f = 0;
    for (int64_t r = 0; r < rows; r++) {
        s += p->sum[r * width + j];
        q += p->sq[r * width + j];
        c += p->cube[r * width + j];
        h += p->quad[r * width + j];
        ps += p->pos[r * width + j];
        mn = below(p->min[r * width + j], mn) ? p->min[r * width + j] : mn;
        f += row_fired[r * width + j];
    }
    run->sum[j] += s;
    run->sum_sq[j] += q;
    run->sum_cube[j] += c;
    run->sum_quad[j] += h;
    run->sum_pos[j] += ps;
    run->n_fired[j] += f;
    run->min[j] = below(mn, run->min[j]) ? mn : run->min[j];
    float *max = run->max;
    int64_t *max_doc = run->max_doc, *max_pos = run->max_pos;
    int64_t best = row_order[0];
    for (int64_t i = 1; i < rows; i++) {
        int64_t r = row_order[i];
        if (above(row_max[r * width + j], row_max[best * width + j])) best = r;
    }
    float m = row_max[best * width + j];
    int64_t doc = row_doc[best], pos = row_start[best] + row_argmax[best * width + j];
    if (above(m, max[j]) || (m == max[j] && (doc < max_doc[j] || (doc == max_doc[j] && pos < max_pos[j])))) {
        max[j] = m;
        max_doc[j] = doc;
        max_pos[j] = pos;
    }
}

/* Returns 0, or -1 when scratch memory could not be allocated. k = 0: no top-k;
 * mask = NULL: every token valid; row_abs = NULL: no |a| sums. The row_* buffers are
 * [rows, width] outputs (sums and |a| sums are kept for document means and NAG);
 * n_fired .. max_pos are the site layer's running stats [width], updated in place. */
int whq_site_pass(const float *x, int64_t rows, int64_t seq, int64_t width, const uint8_t *mask, float threshold,
                  int64_t k, float *topk_values, int32_t *topk_ids, float *row_sum, float *row_abs, float *row_sq,
                  float *row_cube, float *row_quad, float *row_pos, float *row_min, int32_t *row_fired,
                  float *row_max, int32_t *row_argmax, const int64_t *row_order, const int64_t *row_doc,
                  const int64_t *row_start, int64_t *n_fired, double *sum, double *sum_sq, double *sum_cube,
                  double *sum_quad, double *sum_pos, float *min, float *max, int64_t *max_doc, int64_t *max_pos) {
    int failed = 0;
    const Partials partials = {row_sum, row_sq, row_cube, row_quad, row_pos, row_min};
    const Running running = {n_fired, sum, sum_sq, sum_cube, sum_quad, sum_pos, min, max, max_doc, max_pos};
#pragma omp parallel
    {
        Scratch scratch = {NULL, NULL, NULL};
        settle_allocations(!k || scratch_alloc(&scratch, width, k), &failed);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            float *m = row_max + r * width, *a = row_abs ? row_abs + r * width : NULL;
            int32_t *f = row_fired + r * width, *am = row_argmax + r * width;
            const Partials p = start_row(&partials, r * width, width, f, m, am, a);
            for (int64_t t = 0; t < seq; t++) {
                const float *v = x + (r * seq + t) * width;
                if (k) topk_row(v, NULL, NULL, width, k, topk_values + (r * seq + t) * k, topk_ids + (r * seq + t) * k, &scratch);
                if (mask && !mask[r * seq + t]) continue;
                accumulate(v, width, threshold, (int32_t)t, &p, f, m, am);
                if (a) accumulate_abs(v, width, a);
            }
        }
        scratch_free(&scratch);
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < width; j++)
                fold_unit(j, rows, width, &partials, row_fired, row_max, row_argmax, row_order, row_doc, row_start,
                          &running);
        }
    }
    return failed ? -1 : 0;
}

/* Top-k of each row of x [rows, width], plus bias [width] where given (else NULL): a dictionary encoder's
 * pre-activations arrive from the product without their bias, so the sum is formed row by row in cache
 * instead of as a second [rows, width] tensor, each value as torch's add rounds it. Values descending,
 * ties to the lower index. */
int whq_topk(const float *x, int64_t rows, int64_t width, const float *bias, int64_t k, float *values, int32_t *ids) {
    int failed = 0;
#pragma omp parallel
    {
        Scratch scratch;
        float *row = bias ? malloc(sizeof(float) * width) : NULL;
        settle_allocations(scratch_alloc(&scratch, width, k) && (!bias || row), &failed);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            topk_row(x + r * width, bias, row, width, k, values + r * k, ids + r * k, &scratch);
        }
        scratch_free(&scratch);
        free(row);
    }
    return failed ? -1 : 0;
}

/* The histogram bin of a value (capture.py documents the bins): the float's exponent and
 * its top two mantissa bits, so each bin spans a quarter of an octave, with 2^-12 <= |a| < 2^12
 * binned and everything smaller or larger in the bins at either end. */
static inline int32_t hist_bin(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    int32_t k = (int32_t)((bits & 0x7FFFFFFFu) >> 21) - WHQ_HIST_LOW;
    if ((bits >> 31) || bits == 0) return k < 0 ? WHQ_HIST_STEPS + 1 : k >= WHQ_HIST_STEPS ? 0 : WHQ_HIST_STEPS - k;
    return k < 0 ? WHQ_HIST_STEPS + 2 : k >= WHQ_HIST_STEPS ? 2 * WHQ_HIST_STEPS + 3 : WHQ_HIST_STEPS + 3 + k;
}

/* Adds every valid value of x [rows, seq, width] to counts [width, bins] (mask = NULL: all
 * valid). Threads own disjoint blocks of units, so the counts need no atomics. */
void whq_histogram(const float *x, int64_t rows, int64_t seq, int64_t width, const uint8_t *mask, int64_t *counts) {
    const int64_t block = 64, bins = 2 * WHQ_HIST_STEPS + 4;
#pragma omp parallel for schedule(static)
    for (int64_t j0 = 0; j0 < width; j0 += block) {
        int64_t j1 = j0 + block < width ? j0 + block : width;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t t = 0; t < seq; t++) {
                if (mask && !mask[r * seq + t]) continue;
                const float *v = x + (r * seq + t) * width;
                for (int64_t j = j0; j < j1; j++) counts[j * bins + hist_bin(v[j])]++;
            }
    }
}

/* A sparse code: token i of [rows, seq] holds units ids[i * n + c] (distinct, 0 <= id < width) with
 * values vals[i * n + c], c < n, and +0.0 at every other unit. */

/* a (value, unit) goes before b in a top-k: ranks above, or ties (neither above) at a lower unit */
static inline int goes_before(float a, int32_t ia, float b, int32_t ib) {
    return above(a, b) || (!above(b, a) && ia < ib);
}

/* The top-k of one token of a sparse code, as topk_row gives it for the dense row: its n entries in
 * top-k order, merged with the units it leaves at +0.0 (lowest unit first). mark [width] is all 0
 * on entry and on return; sv, si [n] scratch. */
static void sparse_topk(const int32_t *ids, const float *vals, int64_t n, int64_t width, int64_t k, float *out_v,
                        int32_t *out_i, float *sv, int32_t *si, uint8_t *mark) {
    for (int64_t c = 0; c < n; c++) {
        int64_t p = c;
        while (p > 0 && goes_before(vals[c], ids[c], sv[p - 1], si[p - 1])) {
            sv[p] = sv[p - 1];
            si[p] = si[p - 1];
            p--;
        }
        sv[p] = vals[c];
        si[p] = ids[c];
        mark[ids[c]] = 1;
    }
    int64_t e = 0, z = 0;
    while (z < width && mark[z]) z++;
    for (int64_t o = 0; o < k; o++) {
        if (e < n && (z >= width || goes_before(sv[e], si[e], 0.0f, (int32_t)z))) {
            out_v[o] = sv[e];
            out_i[o] = si[e++];
        } else {
            out_v[o] = 0.0f;
            out_i[o] = (int32_t)z++;
            while (z < width && mark[z]) z++;
        }
    }
    for (int64_t c = 0; c < n; c++) mark[ids[c]] = 0;
}

/* A unit's +0.0 at token t, as accumulate sees it: sums gain nothing (they start at +0.0 and never
 * hold -0.0, so adding +0.0 leaves them unchanged); min and max may change. */
static inline void implicit_zero(int64_t j, int32_t t, float *restrict mn, float *restrict m, int32_t *restrict am) {
    if (below(0.0f, mn[j])) mn[j] = 0.0f;
    if (0.0f > m[j]) {
        m[j] = 0.0f;
        am[j] = t;
    }
}

/* whq_site_pass on a sparse code instead of the dense activation it stands for (ids, vals [rows, seq, n]):
 * the same top-k rows, row partials, running stats and histogram (hist = NULL: none), bit for bit,
 * from the n entries of each token. A unit's +0.0s are visited where accumulate would first meet
 * them (the first valid token of each run of tokens that do not list it), so min, max and its
 * first position come out as the dense pass gives them; counts of +0.0 are derived. */
int whq_sparse_pass(const int32_t *ids, const float *vals, int64_t rows, int64_t seq, int64_t n, int64_t width,
                    const uint8_t *mask, float threshold, int64_t k, float *topk_values, int32_t *topk_ids,
                    float *row_sum, float *row_abs, float *row_sq, float *row_cube, float *row_quad, float *row_pos,
                    float *row_min, int32_t *row_fired, float *row_max, int32_t *row_argmax, int32_t *row_zeros,
                    const int64_t *row_order, const int64_t *row_doc, const int64_t *row_start, int64_t *n_fired,
                    double *sum, double *sum_sq, double *sum_cube, double *sum_quad, double *sum_pos, float *min,
                    float *max, int64_t *max_doc, int64_t *max_pos, int64_t *hist) {
    const int64_t bins = 2 * WHQ_HIST_STEPS + 4;
    const int zero_fires = 0.0f > threshold;
    int failed = 0;
    const Partials partials = {row_sum, row_sq, row_cube, row_quad, row_pos, row_min};
    const Running running = {n_fired, sum, sum_sq, sum_cube, sum_quad, sum_pos, min, max, max_doc, max_pos};
#pragma omp parallel
    {
        /* per token: valid tokens before it, and the first valid token at or after it */
        int32_t *before = malloc(sizeof(int32_t) * (seq + 1)), *next = malloc(sizeof(int32_t) * (seq + 1));
        int32_t *last = malloc(sizeof(int32_t) * width), *si = malloc(sizeof(int32_t) * (n + 1));
        float *sv = malloc(sizeof(float) * (n + 1));
        uint8_t *mark = calloc(width, 1);
        settle_allocations(before && next && last && si && sv && mark, &failed);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            float *m = row_max + r * width, *a = row_abs ? row_abs + r * width : NULL;
            int32_t *f = row_fired + r * width, *am = row_argmax + r * width, *listed = row_zeros + r * width;
            const Partials p = start_row(&partials, r * width, width, f, m, am, a);
            float *s = p.sum, *q = p.sq, *c = p.cube, *h = p.quad, *ps = p.pos, *mn = p.min;
            for (int64_t j = 0; j < width; j++) {
                listed[j] = 0;
                last[j] = -1;
            }
            before[0] = 0;
            for (int64_t t = 0; t < seq; t++) before[t + 1] = before[t] + (!mask || mask[r * seq + t]);
            next[seq] = (int32_t)seq;
            for (int64_t t = seq - 1; t >= 0; t--) next[t] = (!mask || mask[r * seq + t]) ? (int32_t)t : next[t + 1];
            for (int64_t t = 0; t < seq; t++) {
                const int32_t *ti = ids + (r * seq + t) * n;
                const float *tv = vals + (r * seq + t) * n;
                if (k)
                    sparse_topk(ti, tv, n, width, k, topk_values + (r * seq + t) * k, topk_ids + (r * seq + t) * k, sv,
                                si, mark);
                if (mask && !mask[r * seq + t]) continue;
                for (int64_t e = 0; e < n; e++) {
                    int64_t j = ti[e];
                    float v = tv[e], sq = v * v;
                    if (before[t] > before[last[j] + 1]) implicit_zero(j, next[last[j] + 1], mn, m, am);
                    s[j] += v;
                    q[j] += sq;
                    c[j] += sq * v;
                    h[j] += sq * sq;
                    ps[j] += v > 0 ? v : 0.0f;
                    if (a) a[j] += fabsf(v);
                    mn[j] = below(v, mn[j]) ? v : mn[j];
                    f[j] += v > threshold;
                    if (v > m[j] || (v != v && m[j] == m[j])) {
                        m[j] = v;
                        am[j] = (int32_t)t;
                    }
                    listed[j]++;
                    last[j] = (int32_t)t;
                }
            }
            /* the +0.0s after each unit's last listed token; then listed becomes the count of +0.0s */
            for (int64_t j = 0; j < width; j++) {
                if (before[seq] > before[last[j] + 1]) implicit_zero(j, next[last[j] + 1], mn, m, am);
                listed[j] = before[seq] - listed[j];
                if (zero_fires) f[j] += listed[j];
            }
        }
        free(before);
        free(next);
        free(last);
        free(si);
        free(sv);
        free(mark);
        if (!failed && hist) {
#pragma omp single
            for (int64_t i = 0; i < rows * seq; i++) {
                if (mask && !mask[i]) continue;
                for (int64_t e = 0; e < n; e++) hist[ids[i * n + e] * bins + hist_bin(vals[i * n + e])]++;
            }
        }
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < width; j++) {
                fold_unit(j, rows, width, &partials, row_fired, row_max, row_argmax, row_order, row_doc, row_start,
                          &running);
                if (hist) {
                    int64_t zeros = 0;
                    for (int64_t r = 0; r < rows; r++) zeros += row_zeros[r * width + j];
                    hist[j * bins + hist_bin(0.0f)] += zeros;
                }
            }
        }
    }
    return failed ? -1 : 0;
}

/* a ranks below b for the bottom examples: smaller, or a number against NaN (NaN ranks last, as NaN
 * ranks first for the top ones) */
static inline int lower(float a, float b) { return a < b || (a == a && b != b); }

/* Insert (value, token) into column j of a ranked buffer [n][block] holding `filled` entries, after
 * every entry it does not beat: equal values keep the order they came in. */
#define WHQ_INSERT(BEATS, vals, ids, block, j, filled, value, token)                        \
    do {                                                                                     \
        int64_t p_ = (filled);                                                               \
        while (p_ > 0 && BEATS((value), (vals)[(p_ - 1) * (block) + (j)])) {               \
            (vals)[p_ * (block) + (j)] = (vals)[(p_ - 1) * (block) + (j)];                   \
            (ids)[p_ * (block) + (j)] = (ids)[(p_ - 1) * (block) + (j)];                     \
            p_--;                                                                            \
        }                                                                                    \
        (vals)[p_ * (block) + (j)] = (value);                                                \
        (ids)[p_ * (block) + (j)] = (token);                                                 \
    } while (0)

/* Per unit of x [rows, seq, width], the n tokens of largest value (top) and the n of smallest
 * (bottom), each ranked best first, as flat token indices r * seq + t into [n, width]. Tokens are
 * visited in document order (rows in row_order, positions ascending) and a token enters only when it
 * beats the n-th kept one, so a tie goes to the first token in document order. Padding (mask 0)
 * competes as -inf for the top and +inf for the bottom, as the torch path sees it. n <= rows * seq.
 * Threads own disjoint blocks of units. Returns 0, or -1 when scratch memory could not be allocated. */
int whq_extremes(const float *x, int64_t rows, int64_t seq, int64_t width, const uint8_t *mask,
                 const int64_t *row_order, int64_t n, int64_t *top, int64_t *bottom) {
    const int64_t block = 16;
    int failed = 0;
#pragma omp parallel
    {
        float *top_vals = malloc(sizeof(float) * n * block), *bottom_vals = malloc(sizeof(float) * n * block);
        int64_t *top_ids = malloc(sizeof(int64_t) * n * block), *bottom_ids = malloc(sizeof(int64_t) * n * block);
        settle_allocations(top_vals && bottom_vals && top_ids && bottom_ids, &failed);
#pragma omp for schedule(static)
        for (int64_t j0 = 0; j0 < width; j0 += block) {
            if (failed) continue;
            int64_t units = j0 + block < width ? block : width - j0, filled = 0;
            for (int64_t i = 0; i < rows; i++) {
                int64_t r = row_order[i];
                for (int64_t t = 0; t < seq; t++) {
                    int64_t token = r * seq + t;
                    const float *v = x + token * width + j0;
                    int valid = !mask || mask[token];
                    if (filled < n) {
                        for (int64_t j = 0; j < units; j++) {
                            float high = valid ? v[j] : -INFINITY, low = valid ? v[j] : INFINITY;
                            WHQ_INSERT(above, top_vals, top_ids, block, j, filled, high, token);
                            WHQ_INSERT(lower, bottom_vals, bottom_ids, block, j, filled, low, token);
                        }
                        filled++;
                        continue;
                    }
                    /* most tokens beat no kept entry of any unit: test the whole block first (vectorised) */
                    const float *top_last = top_vals + (n - 1) * block, *bottom_last = bottom_vals + (n - 1) * block;
                    int beats = 0;
                    for (int64_t j = 0; j < units; j++) {
                        float high = valid ? v[j] : -INFINITY, low = valid ? v[j] : INFINITY;
                        beats |= above(high, top_last[j]) | lower(low, bottom_last[j]);
                    }
                    if (!beats) continue;
                    for (int64_t j = 0; j < units; j++) {
                        float high = valid ? v[j] : -INFINITY, low = valid ? v[j] : INFINITY;
                        if (above(high, top_vals[(n - 1) * block + j]))
                            WHQ_INSERT(above, top_vals, top_ids, block, j, n - 1, high, token);
                        if (lower(low, bottom_vals[(n - 1) * block + j]))
                            WHQ_INSERT(lower, bottom_vals, bottom_ids, block, j, n - 1, low, token);
                    }
                }
            }
            for (int64_t p = 0; p < n; p++)
                for (int64_t j = 0; j < units; j++) {
                    top[p * width + j0 + j] = top_ids[p * block + j];
                    bottom[p * width + j0 + j] = bottom_ids[p * block + j];
                }
        }
        free(top_vals);
        free(bottom_vals);
        free(top_ids);
        free(bottom_ids);
    }
    return failed ? -1 : 0;
}

/* The sample key of (doc, pos, unit): reductions.sample_keys, in uint64 so the wrap-around is defined. */
static inline int64_t sample_key(uint64_t token_part, int64_t unit) {
    uint64_t k = (token_part + (uint64_t)unit * 0xC2B2AE3Dull) & 0x7FFFFFFFull;
    k = ((k ^ (k >> 15)) * 0x2C1B3C6Dull) & 0x7FFFFFFFull;
    k = ((k ^ (k >> 15)) * 0x297A2D39ull) & 0x7FFFFFFFull;
    return (int64_t)(k ^ (k >> 13));
}

/* Sift the root of a max-heap of `size` keys (column j of [n][block] buffers) down to its place. */
static void sift_down(int64_t *keys, int64_t *ids, int64_t block, int64_t j, int64_t size) {
    int64_t p = 0;
    for (;;) {
        int64_t c = 2 * p + 1;
        if (c >= size) break;
        if (c + 1 < size && keys[(c + 1) * block + j] > keys[c * block + j]) c++;
        if (keys[c * block + j] <= keys[p * block + j]) break;
        int64_t tk = keys[p * block + j], ti = ids[p * block + j];
        keys[p * block + j] = keys[c * block + j];
        ids[p * block + j] = ids[c * block + j];
        keys[c * block + j] = tk;
        ids[c * block + j] = ti;
        p = c;
    }
}

/* Per unit of x [rows, seq, width], the n smallest sample keys of its firing tokens (value above the
 * threshold, mask 1) that are below bound[unit] (the largest key a unit's kept sample holds: no larger
 * one could enter it), smallest first, as keys and flat token indices r * seq + t into [n, width];
 * the rest of a column holds key no_key and token 0. The same entries as reductions.sample_keys'
 * bottom-n, less those that cannot enter the kept sample, for tokens with distinct keys. Threads own
 * disjoint blocks of units. Returns 0, or -1 when scratch memory could not be allocated. */
int whq_sample(const float *x, int64_t rows, int64_t seq, int64_t width, const uint8_t *mask, float threshold,
               const int64_t *row_doc, const int64_t *row_pos, const int64_t *bound, int64_t n, int64_t no_key,
               int64_t *out_keys, int64_t *out_ids) {
    const int64_t block = 16;
    int failed = 0;
#pragma omp parallel
    {
        int64_t *keys = malloc(sizeof(int64_t) * n * block), *ids = malloc(sizeof(int64_t) * n * block);
        settle_allocations(keys && ids, &failed);
#pragma omp for schedule(static)
        for (int64_t j0 = 0; j0 < width; j0 += block) {
            if (failed) continue;
            int64_t units = j0 + block < width ? block : width - j0;
            int64_t size[16] = {0}, limit[16];
            for (int64_t j = 0; j < units; j++) limit[j] = bound[j0 + j];
            for (int64_t token = 0; token < rows * seq; token++) {
                if (mask && !mask[token]) continue;
                const float *v = x + token * width + j0;
                uint64_t token_part = (uint64_t)row_doc[token] * 0x9E3779B1ull + (uint64_t)row_pos[token] * 0x85EBCA77ull;
                for (int64_t j = 0; j < units; j++) {
                    if (!(v[j] > threshold)) continue;
                    int64_t key = sample_key(token_part, j0 + j);
                    if (key >= limit[j]) continue;
                    if (size[j] < n) { /* sift up */
                        int64_t p = size[j]++;
                        while (p > 0 && keys[((p - 1) / 2) * block + j] < key) {
                            keys[p * block + j] = keys[((p - 1) / 2) * block + j];
                            ids[p * block + j] = ids[((p - 1) / 2) * block + j];
                            p = (p - 1) / 2;
                        }
                        keys[p * block + j] = key;
                        ids[p * block + j] = token;
                        if (size[j] == n && keys[j] < limit[j]) limit[j] = keys[j];
                    } else { /* replace the largest */
                        keys[j] = key;
                        ids[j] = token;
                        sift_down(keys, ids, block, j, n);
                        limit[j] = keys[j];
                    }
                }
            }
            for (int64_t j = 0; j < units; j++) {
                /* heap sort: the largest goes last */
                for (int64_t s = size[j]; s > 1; s--) {
                    int64_t tk = keys[j], ti = ids[j];
                    keys[j] = keys[(s - 1) * block + j];
                    ids[j] = ids[(s - 1) * block + j];
                    keys[(s - 1) * block + j] = tk;
                    ids[(s - 1) * block + j] = ti;
                    sift_down(keys, ids, block, j, s - 1);
                }
                for (int64_t p = 0; p < n; p++) {
                    out_keys[p * width + j0 + j] = p < size[j] ? keys[p * block + j] : no_key;
                    out_ids[p * width + j0 + j] = p < size[j] ? ids[p * block + j] : 0;
                }
            }
        }
        free(keys);
        free(ids);
    }
    return failed ? -1 : 0;
}

/* float to float16 bits, rounding to nearest even as torch's .to(torch.float16) */
static inline uint16_t to_half(float v) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#else
    _Float16 h = (_Float16)v;
    uint16_t bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
#endif
}

/* The windows of m example tokens: for each, unit units[i]'s own values (as float16 bits) from
 * `before` tokens before to `after` after flat token where[i] of x [rows, seq, width], NaN outside
 * the token's row or past its valid length, written to slot slots[i] of store [size, width, window]. */
void whq_windows(const float *x, int64_t seq, int64_t width, const int64_t *lengths, int64_t m,
                 const int64_t *where, const int64_t *units, const int64_t *slots, int64_t before, int64_t after,
                 uint16_t *store) {
    const int64_t window = before + 1 + after;
    const uint16_t nan_bits = to_half(NAN);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m; i++) {
        int64_t row = where[i] / seq, t = where[i] % seq, unit = units[i], length = lengths[row];
        uint16_t *out = store + (slots[i] * width + unit) * window;
        const float *column = x + row * seq * width + unit;
        for (int64_t o = -before; o <= after; o++) {
            int64_t at = t + o;
            out[o + before] = at >= 0 && at < length ? to_half(column[at * width]) : nan_bits;
        }
    }
}

/* A dictionary's reconstruction quality over the valid tokens of recon and target [rows, d] (mask
 * NULL: all valid), added in double: *sq_error += sum |r - t|^2, *target_sq += sum |t|^2, *cosine_sum +=
 * sum cos(r, t) (torch's cosine_similarity: r.t / sqrt(max(|r|^2 |t|^2, 1e-16))), target_sum[j] += sum t_j.
 * One thread, in token order, eight lanes a row: the sums do not depend on the thread count, and the
 * pass costs a tenth of the torch ops it replaces (which widened every element to double first). */
void whq_recon_sums(const float *recon, const float *target, int64_t rows, int64_t d, const uint8_t *mask,
                    double *sq_error, double *target_sq, double *cosine_sum, double *target_sum) {
    double err_total = 0, sq_total = 0, cos_total = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (mask && !mask[r]) continue;
        const float *a = recon + r * d, *b = target + r * d;
        double err[8] = {0}, tt[8] = {0}, rt[8] = {0}, rr[8] = {0};
        int64_t j = 0;
        for (; j + 8 <= d; j += 8)
            for (int l = 0; l < 8; l++) {
                double x = a[j + l], y = b[j + l], diff = x - y;
                err[l] += diff * diff;
                tt[l] += y * y;
                rt[l] += x * y;
                rr[l] += x * x;
                target_sum[j + l] += y;
            }
        for (; j < d; j++) {
            double x = a[j], y = b[j], diff = x - y;
            err[0] += diff * diff;
            tt[0] += y * y;
            rt[0] += x * y;
            rr[0] += x * x;
            target_sum[j] += y;
        }
        double e = 0, t2 = 0, dot = 0, r2 = 0;
        for (int l = 0; l < 8; l++) {
            e += err[l];
            t2 += tt[l];
            dot += rt[l];
            r2 += rr[l];
        }
        double norms = r2 * t2;
        err_total += e;
        sq_total += t2;
        cos_total += dot / sqrt(norms > 1e-16 ? norms : 1e-16);
    }
    *sq_error += err_total;
    *target_sq += sq_total;
    *cosine_sum += cos_total;
}

/* A TopK code's activity over its valid tokens (ids, vals [rows, k], mask NULL: all valid): *l0_sum +=
 * the non-zero values, n_active[id] += 1 for each. */
void whq_active_counts(const int32_t *ids, const float *vals, int64_t rows, int64_t k, const uint8_t *mask,
                       int64_t *l0_sum, int64_t *n_active) {
    int64_t l0 = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (mask && !mask[r]) continue;
        for (int64_t i = r * k; i < (r + 1) * k; i++)
            if (vals[i] != 0) {
                l0++;
                n_active[ids[i]]++;
            }
    }
    *l0_sum += l0;
}

-- Unit data for unit pages: moments, per-unit histograms, token search, similar units.
--
-- Same conventions as neurons.sql: every macro checks its run and site first, and every
-- column inside a macro body is qualified with its table's alias. Polars twins:
-- queries/unit_frames.py. The histogram grid is fixed (ingest/reductions.py, HIST_*):
-- quarter-octave bins for 2^-12 <= |value| < 2^12, a near-zero bin on either side of 0 and
-- an end bin beyond -4096 / 4096 on either side.

CREATE OR REPLACE MACRO whq_hist_edge(i) AS (pow(2.0, -12 + i // 4) * (1 + (i % 4) / 4));
COMMENT ON MACRO whq_hist_edge IS 'Edge i (0..96) of the histogram grid on |value|: 2^(-12 + i // 4) * (1 + (i % 4) / 4), from 2^-12 to 2^12.';

CREATE OR REPLACE MACRO whq_hist_lo(b) AS (
    CASE WHEN b = 0 THEN -'inf'::DOUBLE
         WHEN b <= 96 THEN -whq_hist_edge(97 - b)
         WHEN b = 97 THEN -whq_hist_edge(0)
         WHEN b = 98 THEN 0.0
         WHEN b <= 194 THEN whq_hist_edge(b - 99)
         ELSE 4096.0 END
);
COMMENT ON MACRO whq_hist_lo IS 'Lower edge of histogram bin b: bins 98..195 hold lo < value < hi for bin 98 and lo <= value < hi above it; bins 0..97 hold lo < value <= hi.';

CREATE OR REPLACE MACRO whq_hist_hi(b) AS (
    CASE WHEN b = 0 THEN -4096.0
         WHEN b <= 96 THEN -whq_hist_edge(96 - b)
         WHEN b = 97 THEN 0.0
         WHEN b = 98 THEN whq_hist_edge(0)
         WHEN b <= 194 THEN whq_hist_edge(b - 98)
         ELSE 'inf'::DOUBLE END
);
COMMENT ON MACRO whq_hist_hi IS 'Upper edge of histogram bin b (see whq_hist_lo).';

CREATE OR REPLACE MACRO unit_stats(run, site, layer) AS TABLE
WITH m AS (
    SELECT s.neuron, s.n_tokens, s.n_fired, s.min, s.max,
           s.sum / s.n_tokens AS mean, s.sum_sq / s.n_tokens AS m2,
           s.sum_cube / s.n_tokens AS m3, s.sum_quad / s.n_tokens AS m4
    FROM neuron_stats s
    WHERE whq_known_site(run, site) AND s.run_id = run AND s.site = site AND s.layer = layer
),
central AS (
    SELECT m.*, m.m2 - m.mean * m.mean AS var,
           m.m3 - 3 * m.mean * m.m2 + 2 * m.mean * m.mean * m.mean AS c3,
           m.m4 - 4 * m.mean * m.m3 + 6 * m.mean * m.mean * m.m2 - 3 * m.mean * m.mean * m.mean * m.mean AS c4
    FROM m
)
SELECT c.neuron, c.n_fired / c.n_tokens AS rate, c.mean, sqrt(greatest(c.var, 0)) AS std, c.min, c.max,
       CASE WHEN c.var > 0 THEN c.c3 / pow(c.var, 1.5) END AS skewness,
       CASE WHEN c.var > 0 THEN c.c4 / (c.var * c.var) - 3 END AS kurtosis
FROM central c
ORDER BY c.neuron;
COMMENT ON MACRO TABLE unit_stats IS 'Per unit, exact over all tokens (neuron_stats): rate, mean, std (population), min, max, skewness and excess kurtosis (Fisher: 0 for a normal distribution, as scipy.stats.kurtosis), from the running sums of value^1..4; skewness and kurtosis are NULL where the variance is 0 or the run predates them. Example: SELECT * FROM unit_stats(''demo'', ''mlp.act'', 3) ORDER BY kurtosis DESC LIMIT 10';

CREATE OR REPLACE MACRO whq_has_hist(run, site_name) AS (
    SELECT CASE WHEN NOT whq_known_site(run, site_name) THEN false
        WHEN bool_or(regexp_matches(s.reductions, '(^|,)hist(,|$)')) THEN true
        ELSE error('site ''' || site_name || ''' of run ''' || run || ''' kept no histograms: re-ingest with --site '
            || site_name || ':' || coalesce(nullif(s.reductions, '') || ',', '') || 'hist') END
    FROM sites s WHERE s.run_id = run AND s.site = site_name
    GROUP BY s.reductions
);
COMMENT ON MACRO whq_has_hist IS 'true if the site captured histograms (reduction hist); otherwise fails with an error naming the fix.';

CREATE OR REPLACE MACRO unit_histogram(run, site, layer, unit) AS TABLE
WITH h AS (
    SELECT CAST(u.bin AS INTEGER) AS bin, u.count
    FROM unit_histograms u
    WHERE whq_has_hist(run, site) AND u.run_id = run AND u.site = site AND u.layer = layer AND u.neuron = unit
),
span AS (SELECT min(h.bin) AS first_bin, max(h.bin) AS last_bin FROM h)
SELECT CAST(g.bin AS INTEGER) AS bin, whq_hist_lo(g.bin) AS lo, whq_hist_hi(g.bin) AS hi, coalesce(h.count, 0) AS count
FROM span sp
CROSS JOIN range(0, 196) g(bin)  -- the whole fixed grid, cut to the unit's span: portable to Spark SQL
LEFT JOIN h ON h.bin = g.bin
WHERE g.bin BETWEEN sp.first_bin AND sp.last_bin
ORDER BY g.bin;
COMMENT ON MACRO TABLE unit_histogram IS 'One unit''s exact activation histogram over all tokens (reduction hist): every bin from its lowest to its highest non-empty one, with edges lo/hi (fixed grid: quarter-octave bins, each hi / lo <= 1.25, for 2^-12 <= |value| < 2^12; bin 97 = (-2^-12, 0], bin 98 = (0, 2^-12)) and count. Example: SELECT * FROM unit_histogram(''demo'', ''mlp.act'', 3, 42)';

CREATE OR REPLACE MACRO whq_token_key(token) AS (
    CASE WHEN starts_with(lower(trim(token)), '##') AND length(trim(token)) > 2 THEN substr(lower(trim(token)), 3)
         ELSE lower(trim(token)) END
);
COMMENT ON MACRO whq_token_key IS 'What token search compares: the text lower-cased, without surrounding spaces and without the ## that WordPiece (BERT, MiniLM) puts before a piece continuing a word, so ''ing'' finds both ''ing'' and ''##ing''.';

CREATE OR REPLACE MACRO units_for_token(run, site, text) AS TABLE
WITH indexed AS (  -- the run's token index (token_units, vocabulary; warehouse/indexes.py) covers the site
    SELECT count(*) > 0 AS yes
    FROM (SELECT 1 FROM token_units u WHERE whq_known_site(run, site) AND u.run_id = run AND u.site = site LIMIT 1) u
),
-- the run on the path that answers, NULL on the other: a join on NULL leaves that path's tables unread
source AS (
    SELECT CASE WHEN i.yes THEN run END AS indexed_run, CASE WHEN NOT i.yes THEN run END AS scanned_run,
           whq_token_key(text) AS key
    FROM indexed i
),
wanted AS (  -- the token ids whose text matches, from the run's vocabulary
    SELECT w.token_id, w.n_tokens
    FROM vocabulary w JOIN source x ON w.run_id = x.indexed_run
    WHERE whq_token_key(coalesce(w.text, w.piece)) = whq_token_key(text)
),
matched AS (  -- runs without the index: the matching tokens themselves
    SELECT t.doc, t.pos
    FROM tokens t JOIN source x ON t.run_id = x.scanned_run AND whq_token_key(coalesce(t.text, t.piece)) = x.key
),
occurrences AS (SELECT CAST((SELECT coalesce(sum(w.n_tokens), 0) FROM wanted w) + (SELECT count(*) FROM matched) AS BIGINT) AS n),
threshold AS (SELECT s.threshold FROM sites s WHERE s.run_id = run AND s.site = site),
firings AS (
    SELECT u.layer, u.neuron, u.n_fired, u.value_sum
    FROM token_units u JOIN wanted w ON u.token_id = w.token_id
    WHERE u.run_id = run AND u.site = site
    UNION ALL
    SELECT v.layer, v.neuron, 1 AS n_fired, v.value AS value_sum
    FROM matched m
    JOIN token_neurons v ON v.run_id = run AND v.site = site AND v.doc = m.doc AND v.pos = m.pos
    CROSS JOIN threshold th
    WHERE v.value > th.threshold
)
SELECT f.layer, f.neuron, CAST(sum(f.n_fired) AS BIGINT) AS n_fired, o.n AS n_occurrences, sum(f.n_fired) / o.n AS share,
       sum(f.value_sum) / sum(f.n_fired) AS mean_value
FROM firings f
CROSS JOIN occurrences o
GROUP BY f.layer, f.neuron, o.n
ORDER BY n_fired DESC, mean_value DESC, f.layer, f.neuron;
COMMENT ON MACRO TABLE units_for_token IS 'Token search: the units (every layer of the site) stored in token_neurons above the site threshold at the tokens whose decoded text (tokens.text, as the tokenizer decodes the token alone; piece for older runs) matches `text` by whq_token_key (case, surrounding spaces and WordPiece''s leading ## ignored: ''ing'' finds ''ing'' and ''##ing''), with n_fired, n_occurrences of the matching tokens, share = n_fired / n_occurrences and mean_value over those firings; most firings first. topk captures only count a unit where it was in the token''s top-k. Reads the token index written at commit (token_units, vocabulary); runs written before it scan tokens and token_neurons. Example: SELECT * FROM units_for_token(''demo'', ''mlp.act'', ''speak'') LIMIT 10';

CREATE OR REPLACE MACRO whq_similar_units(run, site, layer, unit, k) AS TABLE
WITH thr AS (SELECT s.threshold FROM sites s WHERE whq_known_site(run, site) AND s.run_id = run AND s.site = site),
kept AS (
    SELECT coalesce(max(c.kept), 0) AS kept
    FROM (SELECT c.kept FROM unit_coactivations c, thr
          WHERE c.run_id = run AND c.site = site AND c.layer = layer LIMIT 1) c
),
-- the run when the layer's stored co-activations cannot answer (none stored, or k above the K kept): they are then
-- computed from token_neurons; NULL otherwise, which leaves token_neurons unread
live AS (SELECT CASE WHEN kp.kept < k THEN run END AS run_id FROM kept kp),
fired AS (
    SELECT v.neuron, v.doc, v.pos
    FROM token_neurons v, thr, live l
    WHERE v.run_id = l.run_id AND v.site = site AND v.layer = layer AND v.value > thr.threshold
),
mine AS (SELECT f.neuron AS of_unit, f.doc, f.pos FROM fired f WHERE unit IS NULL OR f.neuron = unit),
shared AS (
    SELECT m.of_unit, f.neuron, count(*) AS n_shared
    FROM fired f JOIN mine m ON m.doc = f.doc AND m.pos = f.pos
    WHERE f.neuron <> m.of_unit
    GROUP BY m.of_unit, f.neuron
),
sizes AS (
    SELECT f.neuron, count(*) AS n FROM fired f
    WHERE f.neuron IN (SELECT sh.neuron FROM shared sh UNION ALL SELECT sh.of_unit FROM shared sh)
    GROUP BY f.neuron
),
coactivation AS (
    SELECT c.neuron AS of_unit, 'coactivation' AS kind, c.other AS neuron, c.jaccard AS similarity, c.n_shared
    FROM unit_coactivations c, live l
    WHERE l.run_id IS NULL AND c.run_id = run AND c.site = site AND c.layer = layer AND (unit IS NULL OR c.neuron = unit)
    UNION ALL
    SELECT sh.of_unit, 'coactivation' AS kind, sh.neuron, sh.n_shared / (mz.n + sz.n - sh.n_shared) AS similarity,
           sh.n_shared
    FROM shared sh JOIN sizes sz ON sz.neuron = sh.neuron JOIN sizes mz ON mz.neuron = sh.of_unit
),
decoder AS (
    SELECT d.neuron AS of_unit, 'decoder' AS kind, d.other AS neuron, CAST(d.cosine AS DOUBLE) AS similarity,
           CAST(NULL AS BIGINT) AS n_shared
    FROM unit_neighbors d
    WHERE d.run_id = run AND d.site = site AND d.layer = layer AND (unit IS NULL OR d.neuron = unit)
),
ranked AS (
    SELECT x.*, row_number() OVER (PARTITION BY x.of_unit, x.kind ORDER BY x.similarity DESC, x.neuron) - 1 AS rank
    FROM (SELECT * FROM decoder UNION ALL SELECT * FROM coactivation) x
)
SELECT r.of_unit, r.kind, CAST(r.rank AS INTEGER) AS rank, r.neuron, r.similarity, r.n_shared
FROM ranked r
WHERE r.rank < k
ORDER BY r.of_unit, r.kind DESC, r.rank;
COMMENT ON MACRO TABLE whq_similar_units IS 'similar_units with an of_unit column (the unit each row is like), for one unit or (unit NULL) every unit of the layer in one statement (the static export reads a layer at once).';

CREATE OR REPLACE MACRO similar_units(run, site, layer, unit, k := 10) AS TABLE
SELECT s.kind, s.rank, s.neuron, s.similarity, s.n_shared
FROM whq_similar_units(run, site, layer, unit, k) s
WHERE s.of_unit = unit  -- one unit: a NULL unit answers no rows, as before the layer-wide form existed
ORDER BY s.kind DESC, s.rank;
COMMENT ON MACRO TABLE similar_units IS 'The k units most like one unit of the same layer, two ways: kind decoder = cosine of their output directions (rows of the down projection, W_down[:, n]; stored at ingest by reduction similar for MLP unit sites), kind coactivation = Jaccard index of the sets of tokens where each is stored in token_neurons above the site threshold (n_shared: tokens in both). The co-activations are read from unit_coactivations (each unit''s top 32, precomputed at commit); for k above what it kept, or a run or layer without it, they are computed from token_neurons (the same figures, slower). Example: SELECT * FROM similar_units(''demo'', ''mlp.act'', 3, 42)';

CREATE OR REPLACE MACRO whq_quantile_bins(run, site_name, layer_index, unit) AS TABLE
WITH capture AS (
    SELECT s.threshold,
           CAST(nullif(regexp_extract(s.reductions, '(^|,)quantiles=([0-9]+)', 2), '') AS INTEGER) AS q
    FROM sites s
    WHERE whq_known_site(run, site_name) AND s.run_id = run AND s.site = site_name
),
checked AS (
    SELECT c.threshold, CASE WHEN c.q IS NULL THEN error('site ''' || site_name || ''' of run ''' || run
        || ''' kept no quantile examples: re-ingest with --site ' || site_name || ':examples=20,hist,quantiles=10')
        ELSE c.q END AS q
    FROM capture c
),
firing AS (
    SELECT u.neuron, CAST(u.bin AS INTEGER) AS bin, u.count
    FROM unit_histograms u, checked c
    WHERE u.run_id = run AND u.site = site_name AND u.layer = layer_index AND (unit IS NULL OR u.neuron = unit)
      AND whq_hist_hi(u.bin) > c.threshold
),
cumulative AS (
    SELECT f.neuron, f.bin, f.count, sum(f.count) OVER (PARTITION BY f.neuron ORDER BY f.bin) - f.count AS before,
           sum(f.count) OVER (PARTITION BY f.neuron) AS total
    FROM firing f
),
binned AS (
    SELECT CAST(least(c.q - 1, floor(c.q * (x.before + x.count / 2) / x.total)) AS INTEGER) AS quantile, x.*
    FROM cumulative x, checked c
)
SELECT b.neuron, b.quantile, min(whq_hist_lo(b.bin)) AS lo, max(whq_hist_hi(b.bin)) AS hi,
       min(b.before) / max(b.total) AS share_lo, max(b.before + b.count) / max(b.total) AS share_hi,
       CAST(sum(b.count) AS BIGINT) AS n_tokens
FROM binned b
GROUP BY b.neuron, b.quantile
ORDER BY b.neuron, b.quantile;
COMMENT ON MACRO TABLE whq_quantile_bins IS 'The quantile bins of one unit, or of every unit of the layer when unit is NULL (quantiles=Q): over its histogram bins above the site threshold, each histogram bin goes to bin floor(Q * (tokens below it + its count / 2) / firing tokens), at most Q - 1; lo/hi are value edges, share_lo/share_hi the exact shares of firing tokens below and up to the bin, n_tokens its firing tokens.';

CREATE OR REPLACE MACRO whq_quantile_examples(run, site, layer, unit, before, after) AS TABLE
WITH bins AS (SELECT * FROM whq_quantile_bins(run, site, layer, unit)),
examples AS (
    -- the run itself, not a guarded expression: a constant run lets DuckDB prune the scans' partitions
    -- (a CASE around it took 30 ms a unit page); whq_examples_by_kind fails where the site kept no quantiles
    SELECT * FROM whq_examples_by_kind(run, site, layer, unit, MAP(['quantile'], [2147483647]), before, after, 0)
)
SELECT x.neuron, x.quantile, b.lo, b.hi, b.share_lo, b.share_hi,
       CAST(x.rank - min(x.rank) OVER (PARTITION BY x.neuron, x.quantile) AS INTEGER) AS rank,
       x.doc_id, x.pos, x.value, x.context, x.tokens
FROM examples x
JOIN bins b ON b.neuron = x.neuron AND b.quantile = x.quantile
ORDER BY x.neuron, x.quantile, rank;
COMMENT ON MACRO TABLE whq_quantile_examples IS 'quantile_examples with a neuron column, for one unit or (unit NULL) every unit of the layer in one statement (the static export reads a layer at once).';

CREATE OR REPLACE MACRO quantile_examples(run, site, layer, unit, before := 50, after := 20) AS TABLE
SELECT q.quantile, q.lo, q.hi, q.share_lo, q.share_hi, q.rank, q.doc_id, q.pos, q.value, q.context, q.tokens
FROM whq_quantile_examples(run, site, layer, unit, before, after) q
WHERE q.neuron = unit  -- one unit: a NULL unit answers no rows, as before the layer-wide form existed
ORDER BY q.quantile, q.rank;
COMMENT ON MACRO TABLE quantile_examples IS 'Examples across one unit''s whole activation range (examples=N,hist,quantiles=Q): per quantile bin (0 = lowest firing values) up to N firing tokens sampled uniformly from the bin, with the same context and tokens columns as top_contexts. Bins are whole histogram bins (quarter octaves), so they are not exact Q-quantiles: each row says exactly which values (lo <= value < hi) and which shares of the firing tokens (share_lo .. share_hi; the true bin would be q/Q .. (q+1)/Q) its bin covers; a histogram bin holding more than 1/Q of the firings makes a wider bin and leaves some bin numbers unused. The uniform sample comes from a pool of the 2QN smallest sample keys, so a bin with few pooled firings can hold fewer than N. Example: SELECT quantile, share_lo, share_hi, value, context FROM quantile_examples(''demo'', ''mlp.act'', 3, 42)';

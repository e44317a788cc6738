-- Neuron-level analyses (BDH's analyze.py, transcoder-adapters' feature examples).
--
-- Every macro checks its run (and site) first, so a typo is an error, not an empty
-- result. Inside macro bodies every column is qualified with its table's alias: an
-- unqualified name equal to a parameter (site, layer, neuron, ...) means the parameter.
-- Rates, frequencies and selectivity come from neuron_stats (exact over all tokens);
-- examples from neuron_examples (examples=N) or from token_neurons where a threshold
-- capture holds every firing. Polars twins: queries/neuron_frames.py.

-- A reproducible pseudo-random key in [0, 2^31) for (seed, neuron, doc, pos): integer
-- multiply/xor/shift steps every engine computes identically (Polars twin: _sample_key).
CREATE OR REPLACE MACRO whq_mix(h, v) AS ((xor(CAST(h AS BIGINT), CAST(v AS BIGINT)) * 2654435761) & 2147483647);
COMMENT ON MACRO whq_mix IS 'One step of whq_sample_key: (h xor v) * 2654435761 mod 2^31 (h, v non-negative, below 2^31).';
CREATE OR REPLACE MACRO whq_fold(h, s) AS (xor(h, h >> s));
COMMENT ON MACRO whq_fold IS 'h xor (h >> s): the shift-fold step of whq_sample_key.';
CREATE OR REPLACE MACRO whq_avalanche(h, m) AS ((whq_fold(h, 15) * m) & 2147483647);
COMMENT ON MACRO whq_avalanche IS 'One finalising step of whq_sample_key: (h xor h >> 15) * m mod 2^31.';
CREATE OR REPLACE MACRO whq_sample_key(seed, neuron, doc, pos) AS (
    whq_fold(whq_avalanche(whq_avalanche(whq_mix(whq_mix(whq_mix(whq_mix(0, seed & 2147483647), neuron), doc), pos), 739982445), 695872825), 13)
);
COMMENT ON MACRO whq_sample_key IS 'Reproducible pseudo-random key in [0, 2^31) of (seed, neuron, doc, pos); random_examples keeps the n smallest keys, a uniform sample.';

CREATE OR REPLACE MACRO firing_rate(run, site, layer) AS TABLE
SELECT s.neuron, s.n_tokens, s.n_fired, s.n_fired / s.n_tokens AS rate
FROM neuron_stats s
WHERE whq_known_site(run, site) AND s.run_id = run AND s.site = site AND s.layer = layer
ORDER BY s.neuron;
COMMENT ON MACRO TABLE firing_rate IS 'Per unit of one layer: n_tokens, n_fired (value > the site threshold) and rate = n_fired / n_tokens, exact over all tokens (neuron_stats). Example: SELECT * FROM firing_rate(''demo'', ''mlp.act'', 3)';

CREATE OR REPLACE MACRO layer_summary(run, site) AS TABLE
SELECT s.layer, count(*) AS n_neurons,
       avg(s.n_fired / s.n_tokens) AS mean_rate,
       median(s.n_fired / s.n_tokens) AS median_rate,
       count(*) FILTER (WHERE s.n_fired / s.n_tokens < 0.01) / count(*) AS rare_share,
       count(*) FILTER (WHERE s.n_fired = 0) / count(*) AS dead_share
FROM neuron_stats s
WHERE whq_known_site(run, site) AND s.run_id = run AND s.site = site
GROUP BY s.layer
ORDER BY s.layer;
COMMENT ON MACRO TABLE layer_summary IS 'Per layer: n_neurons, mean and median firing rate, rare_share (rate < 0.01, dead units included) and dead_share (rate = 0), as in BDH analyze.py. Example: SELECT * FROM layer_summary(''demo'', ''mlp.act'')';

CREATE OR REPLACE MACRO selectivity(run, site, layer) AS TABLE
SELECT s.neuron, s.n_fired / s.n_tokens AS rate, s.sum / s.n_tokens AS mean, s.max,
       CASE WHEN coalesce(s.sum_pos, s.sum) = 0 THEN NULL ELSE s.max / (coalesce(s.sum_pos, s.sum) / s.n_tokens) END AS selectivity
FROM neuron_stats s
WHERE whq_known_site(run, site) AND s.run_id = run AND s.site = site AND s.layer = layer
ORDER BY selectivity DESC NULLS LAST, s.neuron;
COMMENT ON MACRO TABLE selectivity IS 'Per unit: rate, mean (over all tokens, zeros included), max and selectivity = max / mean positive part, the mean of max(value, 0) over all tokens (neuron_stats.sum_pos; NULL where it is 0), most selective first. Where a site''s values are non-negative that is BDH''s max / mean; on signed units (GELU, SiLU) it keeps negative values from cancelling the mean and inflating the ratio. Runs captured before sum_pos was kept use max / mean. Example: SELECT * FROM selectivity(''demo'', ''mlp.act'', 3) LIMIT 10';

CREATE OR REPLACE MACRO rate_histogram(run, site, layer, bins := 50) AS TABLE
WITH st AS (
    SELECT s.n_fired, s.n_tokens FROM neuron_stats s
    WHERE whq_known_site(run, site) AND s.run_id = run AND s.site = site AND s.layer = layer
),
scale AS (SELECT max(st.n_tokens) AS n_tokens FROM st),
binned AS (
    SELECT CASE WHEN st.n_fired = 0 THEN 0
                WHEN st.n_tokens <= 1 THEN bins
                ELSE least(bins, 1 + CAST(floor(bins * ln(st.n_fired) / ln(st.n_tokens)) AS INTEGER)) END AS bin
    FROM st
),
counts AS (SELECT b.bin, count(*) AS n_neurons FROM binned b GROUP BY b.bin)
SELECT CAST(g.bin AS INTEGER) AS bin,
       CASE WHEN g.bin = 0 THEN 0.0 ELSE power(CAST(sc.n_tokens AS DOUBLE), (g.bin - 1) / bins - 1) END AS lo,
       CASE WHEN g.bin = 0 THEN 0.0 ELSE power(CAST(sc.n_tokens AS DOUBLE), g.bin / bins - 1) END AS hi,
       coalesce(c.n_neurons, 0) AS n_neurons
FROM range(0, bins + 1) g(bin)
CROSS JOIN scale sc
LEFT JOIN counts c ON c.bin = g.bin
WHERE sc.n_tokens IS NOT NULL
ORDER BY g.bin;
COMMENT ON MACRO TABLE rate_histogram IS 'Histogram of firing rates: bin 0 holds the dead units (rate = 0, lo = hi = 0); bins 1..bins are log-spaced over [1 / n_tokens, 1], bin i covering lo <= rate < hi (the last includes 1); every bin is listed. Example: SELECT * FROM rate_histogram(''demo'', ''mlp.act'', 3, bins := 20)';

CREATE OR REPLACE MACRO selectivity_histogram(run, site, layer, bins := 50, log := false) AS TABLE
WITH sel AS (
    -- log := true bins ln(selectivity): selectivity is heavy-tailed (>= 1 where defined, up to ~10^4
    -- for units that almost never fire), so linear bins put nearly every unit in the first one; a run
    -- captured before sum_pos can have a negative max / mean, which has no logarithm: bin 0 with NULL
    SELECT CASE WHEN log THEN ln(CASE WHEN x.selectivity > 0 THEN x.selectivity END) ELSE x.selectivity END AS t
    FROM selectivity(run, site, layer) x
),
span AS (SELECT min(x.t) AS lo, max(x.t) AS hi FROM sel x),
binned AS (
    SELECT CASE WHEN x.t IS NULL THEN 0
                WHEN sp.hi = sp.lo THEN 1
                ELSE least(bins, 1 + CAST(floor((x.t - sp.lo) / (sp.hi - sp.lo) * bins) AS INTEGER)) END AS bin
    FROM sel x CROSS JOIN span sp
),
counts AS (SELECT b.bin, count(*) AS n_neurons FROM binned b GROUP BY b.bin),
edges AS (
    SELECT g.bin,
           CASE WHEN g.bin > 0 THEN sp.lo + (sp.hi - sp.lo) * (g.bin - 1) / bins END AS t_lo,
           CASE WHEN g.bin > 0 THEN sp.lo + (sp.hi - sp.lo) * g.bin / bins END AS t_hi
    FROM range(0, bins + 1) g(bin) CROSS JOIN span sp
    WHERE EXISTS (SELECT 1 FROM sel)
)
SELECT CAST(e.bin AS INTEGER) AS bin,
       CASE WHEN log THEN exp(e.t_lo) ELSE e.t_lo END AS lo,
       CASE WHEN log THEN exp(e.t_hi) ELSE e.t_hi END AS hi,
       coalesce(c.n_neurons, 0) AS n_neurons
FROM edges e
LEFT JOIN counts c ON c.bin = e.bin
ORDER BY e.bin;
COMMENT ON MACRO TABLE selectivity_histogram IS 'Histogram of selectivity (see selectivity: max / mean positive part): bin 0 holds the units whose selectivity is NULL (mean 0, e.g. dead; with log := true also a negative one; lo = hi = NULL); bins 1..bins are linear over [min, max] or, with log := true, log-spaced (linear in ln(selectivity)), bin i covering lo <= selectivity < hi (the last includes max). Example: SELECT * FROM selectivity_histogram(''demo'', ''mlp.act'', 3, log := true)';

-- The examples behind top_contexts / bottom_contexts / random_examples / quantile_examples, for one
-- unit or (neuron NULL) every unit, before their windows (whq_examples_by_kind adds them; explain draws
-- its examples from these keys first, so it builds the windows of the few it shows only), for several
-- kinds at once: `kinds` maps each kind to its k (a unit page binds one statement, not one per kind:
-- binding and planning the macro costs more than running it). Source, per kind: neuron_examples when
-- the site captured examples=N and either k <= N, or it holds no threshold capture, or the kind is
-- quantile, bottom or nonfiring; otherwise token_neurons of a threshold capture (every firing, values
-- stored as FLOAT16; it holds no negative values to rank, so kind bottom needs examples=N); otherwise an
-- error naming the fix (kind quantile: an error unless the site kept quantiles=Q). `units`, a list of
-- units, narrows the scan to them when neuron is NULL; `before` and `after` are whq_examples_by_kind's
-- window, checked here first.
CREATE OR REPLACE MACRO whq_example_keys_by_kind(run, site, layer, neuron, kinds, seed, units := NULL, before := 0, after := 0) AS TABLE
WITH capture AS (
    SELECT regexp_matches(s.reductions, '(^|,)threshold=') AS has_threshold,
           regexp_matches(s.reductions, '(^|,)quantiles=') AS has_quantiles,
           CAST(nullif(regexp_extract(s.reductions, '(^|,)examples=([0-9]+)', 2), '') AS INTEGER) AS n_examples
    FROM sites s
    WHERE whq_known_site(run, site) AND s.run_id = run AND s.site = site
),
asked AS (
    SELECT a.kind, CAST(kinds AS MAP(VARCHAR, INTEGER))[a.kind] AS k
    FROM (SELECT unnest(map_keys(CAST(kinds AS MAP(VARCHAR, INTEGER)))) AS kind) a
),
source AS (
    SELECT a.kind, a.k, CASE
        -- whq_examples_by_kind's window, checked first: a window of a billion tokens would list a
        -- billion positions per example and exhaust memory
        WHEN NOT (before BETWEEN 0 AND 100000 AND after BETWEEN 0 AND 100000)
            THEN error('before := ' || CAST(before AS VARCHAR) || ', after := ' || CAST(after AS VARCHAR)
            || ': a context reaches 0 to 100000 tokens on each side of its token')
        WHEN a.kind = 'quantile' AND NOT c.has_quantiles THEN error('site ''' || site || ''' of run ''' || run
            || ''' kept no quantile examples: re-ingest with --site ' || site || ':examples=20,hist,quantiles=10')
        WHEN c.n_examples IS NOT NULL AND (a.k <= c.n_examples OR NOT c.has_threshold OR a.kind IN ('quantile', 'bottom', 'nonfiring'))
            THEN 'examples'
        WHEN a.kind = 'bottom' THEN error('site ''' || site || ''' of run ''' || run || ''' kept no examples=N, which the '
            || 'most negative examples come from: re-ingest with --site ' || site || ':examples=20')
        WHEN c.has_threshold THEN 'firings'
        ELSE error('site ''' || site || ''' of run ''' || run || ''' kept neither examples=N nor a threshold capture: '
            || 're-ingest with --site ' || site || ':examples=20 (or :threshold=0)') END AS source
    FROM capture c, asked a
),
candidates AS (
    SELECT x.kind, x.k, e.neuron, e.doc, e.pos, e.value, e.rank AS stored_rank, e.quantile, e.window_values AS windows
    FROM neuron_examples e
    JOIN source x ON x.kind = e.kind
    WHERE x.source = 'examples' AND e.run_id = run AND e.site = site AND e.layer = layer
      AND (neuron IS NULL OR e.neuron = neuron)
      AND (units IS NULL OR list_contains(CAST(units AS INTEGER[]), e.neuron))
    UNION ALL
    SELECT x.kind, x.k, t.neuron, t.doc, t.pos, t.value, NULL AS stored_rank, NULL AS quantile, NULL::FLOAT[] AS windows
    FROM token_neurons t, source x
    WHERE x.source = 'firings' AND t.run_id = run AND t.site = site AND t.layer = layer
      AND (neuron IS NULL OR t.neuron = neuron)
      AND (units IS NULL OR list_contains(CAST(units AS INTEGER[]), t.neuron))
),
ranked AS (
    SELECT c.kind, c.k, c.neuron, c.doc, c.pos, c.value, c.quantile, c.windows,
           row_number() OVER (PARTITION BY c.kind, c.neuron ORDER BY
               CASE WHEN c.kind = 'random' THEN whq_sample_key(seed, c.neuron, c.doc, c.pos) END,
               c.stored_rank, c.value DESC, c.doc, c.pos) - 1 AS rank
    FROM candidates c
)
SELECT r.kind, r.neuron, CAST(r.rank AS INTEGER) AS rank, r.doc, r.pos, r.value, r.quantile, r.windows
FROM ranked r
WHERE r.rank < r.k;
COMMENT ON MACRO TABLE whq_example_keys_by_kind IS 'The examples whq_examples_by_kind shows, without their windows: kind, neuron, rank, doc (ordinal), pos, value, quantile (kind quantile) and windows (the values captured with each, neuron_examples.window_values), for kinds := MAP([kind, ..], [k, ..]); units := [..] narrows neuron NULL to those units. Example: SELECT * FROM whq_example_keys_by_kind(''demo'', ''mlp.act'', 3, 42, MAP([''top'', ''random''], [5, 3]), 0)';

-- A window token's value: the one captured with the example (neuron_examples.window_values, 50
-- tokens before to 20 after, within the example's model window), else token_neurons'. `picks`, a
-- list of {'kind', 'neuron', 'rank'}, keeps those examples alone (with units := their units).
CREATE OR REPLACE MACRO whq_examples_by_kind(run, site, layer, neuron, kinds, before, after, seed, units := NULL, picks := NULL) AS TABLE
WITH picked AS (
    SELECT p.kind, p.neuron, p.rank, p.doc, p.pos, p.value, p.quantile, p.windows
    FROM whq_example_keys_by_kind(run, site, layer, neuron, kinds, seed, units := units, before := before, after := after) p
    WHERE picks IS NULL
       OR list_contains(CAST(picks AS STRUCT(kind VARCHAR, neuron INTEGER, rank INTEGER)[]), {'kind': p.kind, 'neuron': p.neuron, 'rank': p.rank})
),
-- The tokens and texts of the examples' documents only: joined on the few documents alone (a small
-- build side), DuckDB passes them to the scans as an IN filter, which skips every other document.
picked_docs AS (SELECT DISTINCT p.doc FROM picked p),
doc_tokens AS (
    SELECT t.doc, t.pos, t.piece, t.text, t.char_start, t.char_end, t.special
    FROM tokens t
    JOIN picked_docs pd ON pd.doc = t.doc
    WHERE t.run_id = run
),
doc_texts AS (
    SELECT d.doc, d.doc_id, d.text
    FROM documents d
    JOIN picked_docs pd ON pd.doc = d.doc
    WHERE d.run_id = run
),
spread AS (
    SELECT p.kind, p.neuron, p.rank, p.doc, p.pos AS at_pos, p.value AS at_value, p.quantile, p.windows,
           unnest(generate_series(p.pos - before, p.pos + after)) AS wpos
    FROM picked p
),
-- Each window token's value: the example's own at its token, else the one captured with it; only the
-- tokens neither holds (outside the captured window, or runs without window values) look in token_neurons.
valued AS (
    SELECT w.kind, w.neuron, w.rank, w.doc, w.at_pos, w.at_value, w.quantile, w.wpos,
           CASE WHEN w.wpos = w.at_pos THEN w.at_value
                WHEN w.wpos - w.at_pos BETWEEN -50 AND 20 THEN w.windows[w.wpos - w.at_pos + 51] END AS known
    FROM spread w
),
filled AS (
    SELECT v.kind, v.neuron, v.rank, v.doc, v.at_pos, v.at_value, v.quantile, v.wpos, v.known AS value
    FROM valued v WHERE v.known IS NOT NULL
    UNION ALL
    SELECT v.kind, v.neuron, v.rank, v.doc, v.at_pos, v.at_value, v.quantile, v.wpos, tn.value
    FROM valued v
    LEFT JOIN token_neurons tn ON tn.run_id = run AND tn.site = site AND tn.layer = layer
        AND (neuron IS NULL OR tn.neuron = neuron) AND tn.doc = v.doc AND tn.pos = v.wpos AND tn.neuron = v.neuron
    WHERE v.known IS NULL
),
window_tokens AS (
    SELECT f.kind, f.neuron, f.rank, f.doc, f.at_pos, f.at_value, f.quantile, f.wpos, t.piece,
           coalesce(t.text, t.piece) AS text, t.char_start, t.char_end, t.special, f.value
    FROM filled f
    JOIN doc_tokens t ON t.doc = f.doc AND t.pos = f.wpos
),
spans AS (
    SELECT x.kind, x.neuron, x.rank, x.doc, x.at_pos, x.at_value, x.quantile,
           min(x.char_start) AS first_start, max(x.char_end) AS last_end,
           max(CASE WHEN x.wpos < x.at_pos THEN x.char_end END) AS end_before,
           bool_or(x.wpos = x.at_pos AND x.special) AS at_special,
           max(CASE WHEN x.wpos = x.at_pos THEN x.piece END) AS at_piece,
           max(CASE WHEN x.wpos = x.at_pos THEN x.char_start END) AS at_start,
           max(CASE WHEN x.wpos = x.at_pos THEN x.char_end END) AS at_end,
           list({'piece': x.piece, 'text': x.text, 'value': x.value} ORDER BY x.wpos) AS tokens,
           list({'char_start': CASE WHEN NOT x.special THEN x.char_start END, 'char_end': x.char_end} ORDER BY x.wpos) AS spans
    FROM window_tokens x
    GROUP BY x.kind, x.neuron, x.rank, x.doc, x.at_pos, x.at_value, x.quantile
),
marked AS (
    SELECT sp.*,
           CASE WHEN sp.at_special THEN coalesce(sp.end_before, sp.first_start, 0) ELSE sp.at_start END AS mark_start,
           CASE WHEN sp.at_special THEN coalesce(sp.end_before, sp.first_start, 0) ELSE sp.at_end END AS mark_end
    FROM spans sp
)
SELECT m.kind, m.neuron, CAST(m.rank AS INTEGER) AS rank, d.doc_id, m.at_pos AS pos, m.at_value AS value, m.quantile,
       substr(d.text, coalesce(m.first_start, m.mark_start) + 1, m.mark_start - coalesce(m.first_start, m.mark_start))
           || '«' || CASE WHEN m.at_special THEN m.at_piece ELSE substr(d.text, m.mark_start + 1, m.mark_end - m.mark_start) END || '»'
           || substr(d.text, m.mark_end + 1, coalesce(m.last_end, m.mark_end) - m.mark_end) AS context,
       m.tokens, m.spans, m.first_start AS window_start,
       substr(d.text, m.first_start + 1, m.last_end - m.first_start) AS window_text
FROM marked m
JOIN doc_texts d ON d.doc = m.doc
ORDER BY m.kind, m.neuron, m.rank;
COMMENT ON MACRO TABLE whq_examples_by_kind IS 'whq_examples for several kinds at once (kinds := MAP([kind, ..], [k, ..])), with a leading kind column, the quantile bin of kind quantile and, to spell the window as its document does, spans (each window token''s characters, [{char_start (NULL for a special token), char_end}]) and window_text (the document''s characters from window_start on, to the window''s last): what a unit page reads in one statement. units := [..] narrows neuron NULL to those units and picks := [{''kind'': .., ''neuron'': n, ''rank'': r}, ..] to those examples (what explain reads the windows of its drawn examples with). Example: SELECT kind, rank, context FROM whq_examples_by_kind(''demo'', ''mlp.act'', 3, 42, MAP([''top'', ''random''], [5, 3]), 24, 8, 0)';

CREATE OR REPLACE MACRO whq_examples(run, site, layer, neuron, kind, k, before, after, seed) AS TABLE
SELECT x.neuron, x.rank, x.doc_id, x.pos, x.value, x.context, x.tokens
FROM whq_examples_by_kind(run, site, layer, neuron, MAP([kind], [k]), before, after, seed) x
ORDER BY x.neuron, x.rank;
COMMENT ON MACRO TABLE whq_examples IS 'The rows of top_contexts (kind top), bottom_contexts (kind bottom) or random_examples (kind random) with a leading neuron column, for one unit or, with neuron NULL, every unit of the layer (what whq export features reads).';

CREATE OR REPLACE MACRO top_contexts(run, site, layer, neuron, k := 20, before := 50, after := 20) AS TABLE
SELECT x.rank, x.doc_id, x.pos, x.value, x.context, x.tokens
FROM whq_examples(run, site, layer, neuron, 'top', k, before, after, 0) x
WHERE neuron IS NOT NULL
ORDER BY x.rank;
COMMENT ON MACRO TABLE top_contexts IS 'The k strongest activations of one unit over ALL tokens (rank 0 = strongest; from neuron_examples for examples=N captures, capped at N, else every firing of a threshold capture), with context = the text from `before` tokens before to `after` tokens after (each 0 to 100000), the firing token marked «like this», and tokens = [{piece, text (as decoded, tokens.text; the piece in older runs), value}] across the window (value: the unit''s exact value captured with the example (neuron_examples.window_values, 50 before to 20 after, FLOAT16) where the capture kept examples, else token_neurons'' value, NULL where neither holds it; the firing token carries the example''s value). Example: SELECT * FROM top_contexts(''demo'', ''mlp.act'', 3, 42, k := 5)';

CREATE OR REPLACE MACRO bottom_contexts(run, site, layer, neuron, k := 20, before := 50, after := 20) AS TABLE
SELECT x.rank, x.doc_id, x.pos, x.value, x.context, x.tokens
FROM whq_examples(run, site, layer, neuron, 'bottom', k, before, after, 0) x
WHERE neuron IS NOT NULL
ORDER BY x.rank;
COMMENT ON MACRO TABLE bottom_contexts IS 'The k most negative activations of one unit over ALL tokens (rank 0 = most negative, ties to the first token in document order), from the examples=N capture (capped at N; only values < 0 are kept, so a non-negative unit such as a ReLU or an SAE latent has none, and so do runs from before bottom examples). Same columns as top_contexts. Example: SELECT * FROM bottom_contexts(''demo'', ''mlp.act'', 3, 42, k := 5)';

CREATE OR REPLACE MACRO random_examples(run, site, layer, neuron, n := 10, seed := 0) AS TABLE
SELECT x.rank, x.doc_id, x.pos, x.value, x.context, x.tokens
FROM whq_examples(run, site, layer, neuron, 'random', n, 50, 20, seed) x
WHERE neuron IS NOT NULL
ORDER BY x.rank;
COMMENT ON MACRO TABLE random_examples IS 'A reproducible uniform sample of n tokens where one unit fired: the n smallest whq_sample_key(seed, ...) among the capture''s uniform examples=N sample, or among every firing of a threshold capture. Same columns as top_contexts (window 50 before, 20 after). Example: SELECT * FROM random_examples(''demo'', ''mlp.act'', 3, 42, n := 5, seed := 1)';

CREATE OR REPLACE MACRO activation_frequency(run, site) AS TABLE
SELECT s.layer, s.neuron, s.n_fired / s.n_tokens AS frequency
FROM neuron_stats s
WHERE whq_known_site(run, site) AND s.run_id = run AND s.site = site
ORDER BY s.layer, s.neuron;
COMMENT ON MACRO TABLE activation_frequency IS 'Per layer and unit: frequency = share of all tokens where the unit fired (exact, neuron_stats). Example: SELECT * FROM activation_frequency(''demo'', ''mlp.act'') WHERE frequency > 0.5';

CREATE OR REPLACE MACRO activation_frequency_by_dataset(run, site) AS TABLE
WITH capture AS (
    SELECT s.threshold, regexp_matches(s.reductions, '(^|,)threshold=') AS has_threshold
    FROM sites s
    WHERE whq_known_site(run, site) AND s.run_id = run AND s.site = site
),
dataset_tokens AS (
    SELECT d.dataset, CAST(sum(d.n_tokens) AS BIGINT) AS n_tokens FROM documents d WHERE d.run_id = run GROUP BY d.dataset
),
fired AS (
    SELECT t.layer, t.neuron, d.dataset, count(*) AS n_fired
    FROM token_neurons t
    JOIN documents d ON d.run_id = run AND d.doc = t.doc
    CROSS JOIN capture c
    WHERE t.run_id = run AND t.site = site AND (c.has_threshold OR t.value > c.threshold)
    GROUP BY t.layer, t.neuron, d.dataset
)
SELECT f.layer, f.neuron, f.dataset, dt.n_tokens, f.n_fired, f.n_fired / dt.n_tokens AS density,
       f.n_fired / sum(f.n_fired) OVER (PARTITION BY f.layer, f.neuron) AS fraction
FROM fired f
JOIN dataset_tokens dt ON dt.dataset IS NOT DISTINCT FROM f.dataset
ORDER BY f.layer, f.neuron, f.dataset NULLS LAST;
COMMENT ON MACRO TABLE activation_frequency_by_dataset IS 'Per layer, unit and dataset where it fired: the dataset''s tokens, n_fired, density = n_fired / the dataset''s tokens and fraction = n_fired / the unit''s firings over all datasets. Counted from token_neurons: exact for threshold captures; for topk captures it counts the tokens where the unit fired AND was in the token''s top-k. Example: SELECT * FROM activation_frequency_by_dataset(''demo'', ''mlp.act'') WHERE neuron = 42';

CREATE OR REPLACE MACRO neuron_contexts_bytes(run, site, layer, neuron, before := 24, after := 4) AS TABLE
WITH strongest AS (
    SELECT s.max_doc AS doc, s.max_pos AS pos, s.max AS value
    FROM neuron_stats s
    WHERE whq_known_site(run, site) AND s.run_id = run AND s.site = site AND s.layer = layer
      AND s.neuron = neuron AND s.max_doc IS NOT NULL
)
SELECT d.doc_id, x.pos, x.value,
       string_agg(CASE WHEN t.pos = x.pos THEN '[' || t.piece || ']' ELSE t.piece END, '' ORDER BY t.pos) AS context
FROM strongest x
JOIN tokens t ON t.run_id = run AND t.doc = x.doc AND t.pos BETWEEN x.pos - before AND x.pos + after
JOIN documents d ON d.run_id = run AND d.doc = x.doc
GROUP BY d.doc_id, x.pos, x.value;
COMMENT ON MACRO TABLE neuron_contexts_bytes IS 'For byte-level models (BDH): the window of token pieces around a unit''s strongest activation over all tokens (neuron_stats max), `before` bytes, the byte itself in [brackets], `after` bytes. Example: SELECT * FROM neuron_contexts_bytes(''bdh'', ''xy_sparse'', 2, 1234)';

CREATE OR REPLACE MACRO neuron_logit_lens(run, site, layer, neuron) AS TABLE
SELECT g.direction, g.rank, g.token_id, g.token, g.logit
FROM neuron_logits g
WHERE whq_known_site(run, site) AND g.run_id = run AND g.site = site AND g.layer = layer AND g.neuron = neuron
ORDER BY g.direction DESC, g.rank;
COMMENT ON MACRO TABLE neuron_logit_lens IS 'The tokens a unit''s output direction promotes (direction top) and suppresses (bottom) through the unembedding, W_U . W_down[:, n] (ingest --logit-lens). Example: SELECT * FROM neuron_logit_lens(''t'', ''mlp.act'', 0, 7)';

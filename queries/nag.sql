-- NAG: target-oriented data selection by neuron-activated graphs (Wang et al., 2026).
--
-- doc_neurons holds, per document and layer, the K units of highest impact, one row
-- per rank. The target profile weights unit n of layer l by the number of target
-- documents whose top-K contains it, normalised per layer; a pool document's
-- similarity is the sum of the weights of its top-K units over the layers used,
-- divided by their number L, and distance = 1 - similarity.
--
-- Similarities are computed so that equal values come out bit-identical in every
-- engine (the Polars twins in queries/nag_frames.py do the same), whatever order rows
-- arrive in, and ties are broken by doc_id. With power 1 (and the same number of target
-- documents at every layer, as a capture gives) the weights are n_docs / (n_targets * K),
-- so a document's sum is an integer count times one factor: summed exactly. Otherwise
-- each weight is summed as a whole number of 2^-40 (floor(weight * 2^40), exact in a
-- DOUBLE; error below 1e-10). Divisions by a constant are written as products with its
-- reciprocal, which is what Polars computes for them. The profile is joined on one
-- INTEGER key, layer * width + unit: on queries/nag_bench.py's 1M-document pool that
-- took 2.5x less CPU than a BIGINT key (layer * 2^32 + unit), which itself took 8x less
-- than joining on the two columns.

-- Inside macro bodies every column is qualified: an unqualified name equal to a
-- parameter (site, layers, ...) means the parameter.

CREATE OR REPLACE MACRO whq_nag_site(run, site_name) AS (
    SELECT CASE
        WHEN NOT whq_known_run(run) THEN false
        WHEN count(*) = 0 THEN error('run ''' || run || ''' has no NAG site ''' || site_name
            || ''': capture one with --site ' || site_name || ':nag=20, or list the sites with SELECT site, reductions FROM sites WHERE run_id = ''' || run || '''')
        ELSE true END
    FROM sites s WHERE s.run_id = run AND s.site = site_name AND s.reductions LIKE '%nag%'
);
COMMENT ON MACRO whq_nag_site IS 'true if the run is committed and captured NAG (nag=K) at the site; otherwise fails with an error naming the fix.';

CREATE OR REPLACE MACRO whq_nag_documents(run, dataset_name, role_name) AS (
    SELECT CASE
        WHEN dataset_name IS NOT NULL AND count(*) FILTER (WHERE d.dataset = dataset_name) = 0
            THEN error('run ''' || run || ''' has no documents of dataset ''' || dataset_name
                || ''': list them with SELECT dataset, count(*) FROM documents WHERE run_id = ''' || run || ''' GROUP BY ALL')
        WHEN role_name IS NOT NULL AND count(*) FILTER (WHERE d.role = role_name) = 0
            THEN error('run ''' || run || ''' has no documents of role ''' || role_name
                || ''': list them with SELECT role, count(*) FROM documents WHERE run_id = ''' || run || ''' GROUP BY ALL')
        ELSE true END
    FROM documents d WHERE d.run_id = run
);
COMMENT ON MACRO whq_nag_documents IS 'true if the run has documents of the dataset and role (NULL: any); otherwise fails with an error naming the fix.';

CREATE OR REPLACE MACRO whq_nag_layers(run, site_name, wanted) AS (
    SELECT CASE
        WHEN wanted IS NULL THEN true
        WHEN len(CAST(wanted AS INTEGER[])) = 0 THEN error('layers := [] selects no layer: give at least one, or NULL for all')
        WHEN len(list_filter(CAST(wanted AS INTEGER[]), lambda x: NOT list_contains(s.layers, x))) > 0
            THEN error('layers ' || CAST(list_filter(CAST(wanted AS INTEGER[]), lambda x: NOT list_contains(s.layers, x)) AS VARCHAR)
                || ' are not layers of site ''' || site_name || ''' in run ''' || run || ''' (it has '
                || CAST(list_min(s.layers) AS VARCHAR) || '-' || CAST(list_max(s.layers) AS VARCHAR) || '): pick layers from that range')
        ELSE true END
    FROM sites s WHERE s.run_id = run AND s.site = site_name
);
COMMENT ON MACRO whq_nag_layers IS 'true if every wanted layer (NULL: all) is a layer of the site in the run; otherwise fails with an error naming the fix.';

CREATE OR REPLACE MACRO whq_nag_fraction(fraction) AS (
    CASE WHEN fraction > 0 AND fraction <= 1 THEN true
         ELSE error('fraction must be in (0, 1], got ' || CAST(fraction AS VARCHAR) || ': e.g. fraction := 0.2 keeps a fifth of the pool''s tokens') END
);
COMMENT ON MACRO whq_nag_fraction IS 'true if 0 < fraction <= 1; otherwise fails with an error naming the fix.';

CREATE OR REPLACE MACRO nag_profile(target_run, site, target_dataset := NULL, layers := NULL, power := 1.0,
                                    target_role := NULL) AS TABLE
WITH targets AS (
    SELECT d.doc FROM documents d
    WHERE d.run_id = target_run
      AND (target_dataset IS NULL OR d.dataset = target_dataset)
      AND (target_role IS NULL OR d.role = target_role)
), counts AS (
    SELECT n.layer, n.neuron, count(*) AS n_docs
    FROM doc_neurons n SEMI JOIN targets t ON t.doc = n.doc
    WHERE n.run_id = target_run AND n.site = site
      AND (layers IS NULL OR list_contains(CAST(layers AS INTEGER[]), n.layer))
    GROUP BY n.layer, n.neuron
)
SELECT c.layer, c.neuron, c.n_docs,
       pow(c.n_docs, power) / sum(pow(c.n_docs, power)) OVER (PARTITION BY c.layer) AS weight
FROM counts c
WHERE whq_nag_site(target_run, site) AND whq_nag_documents(target_run, target_dataset, target_role)
  AND whq_nag_layers(target_run, site, layers)
ORDER BY c.layer, c.neuron;
COMMENT ON MACRO TABLE nag_profile IS 'NAG target profile: per layer and unit, n_docs = target documents whose top-K contains the unit, weight = n_docs^power / its sum over the layer''s units. Example: SELECT * FROM nag_profile(''demo'', ''mlp.up'', target_dataset := ''MENENIUS'') ORDER BY weight DESC LIMIT 10';

CREATE OR REPLACE MACRO whq_nag_stride(target_run, pool_run, site_name) AS (
    SELECT max(s.width) FROM sites s
    WHERE s.site = site_name AND (s.run_id = target_run OR s.run_id = pool_run)
);
COMMENT ON MACRO whq_nag_stride IS 'The widest width of the site in the two runs: unit_key = layer * stride + unit is then one INTEGER per (layer, unit).';

CREATE OR REPLACE VIEW whq_nag_no_weights AS
SELECT CAST(NULL AS INTEGER) AS unit_key, CAST(NULL AS DOUBLE) AS weight_units, CAST(NULL AS DOUBLE) AS per_unit
WHERE false;
COMMENT ON VIEW whq_nag_no_weights IS 'Empty stand-in that nag_distance reads when it is not given a weights table.';
COMMENT ON COLUMN whq_nag_no_weights.unit_key IS 'layer * stride + unit, as in nag_unit_weights.';
COMMENT ON COLUMN whq_nag_no_weights.weight_units IS 'The unit''s weight in whole units, as in nag_unit_weights.';
COMMENT ON COLUMN whq_nag_no_weights.per_unit IS 'The similarity of one unit, as in nag_unit_weights.';

CREATE OR REPLACE MACRO nag_unit_weights(target_run, pool_run, site, target_dataset := NULL, layers := NULL,
                                         power := 1.0, target_role := NULL) AS TABLE
WITH profile AS (
    SELECT p.layer, p.neuron, p.n_docs, p.weight,
           sum(pow(p.n_docs, power)) OVER (PARTITION BY p.layer) AS layer_total
    FROM nag_profile(target_run, site, target_dataset := target_dataset, layers := layers, power := power,
                     target_role := target_role) p
), scale AS (
    SELECT coalesce(power = 1 AND min(p.layer_total) = max(p.layer_total), false) AS exact,
           max(p.layer_total) AS layer_total
    FROM profile p
), used AS (
    SELECT 1.0::DOUBLE / (CASE WHEN sc.exact THEN sc.layer_total ELSE 1099511627776.0::DOUBLE END
                          * coalesce(len(list_distinct(CAST(layers AS INTEGER[]))), len(s.layers))) AS per_unit
    FROM sites s CROSS JOIN scale sc WHERE s.run_id = pool_run AND s.site = site
)
SELECT p.layer * whq_nag_stride(target_run, pool_run, site) + p.neuron AS unit_key,
       CASE WHEN sc.exact THEN p.n_docs ELSE floor(p.weight * 1099511627776.0::DOUBLE) END AS weight_units,
       u.per_unit
FROM profile p CROSS JOIN scale sc CROSS JOIN used u
ORDER BY unit_key;
COMMENT ON MACRO TABLE nag_unit_weights IS 'The target profile as nag_distance sums it: unit_key = layer * stride + unit, weight_units = the weight in whole units, per_unit = the similarity of one unit (1 / (units per layer * L)). Stage it in a table for pools of millions of documents: CREATE TEMP TABLE w AS SELECT * FROM nag_unit_weights(''t'', ''pool'', ''mlp.up''); SELECT * FROM nag_select(''t'', ''pool'', ''mlp.up'', weights := ''w'')';

CREATE OR REPLACE MACRO nag_distance(target_run, pool_run, site, target_dataset := NULL, pool_dataset := NULL,
                                     layers := NULL, power := 1.0, target_role := NULL, pool_role := NULL,
                                     weights := NULL) AS TABLE
WITH keyed AS (
    SELECT w.unit_key, w.weight_units, w.per_unit
    FROM nag_unit_weights(target_run, pool_run, site, target_dataset := target_dataset, layers := layers,
                          power := power, target_role := target_role) w
    WHERE weights IS NULL
    UNION ALL
    SELECT w.unit_key, w.weight_units, w.per_unit
    FROM query_table(coalesce(weights, 'whq_nag_no_weights')) w
    WHERE weights IS NOT NULL
), stride AS (
    SELECT whq_nag_stride(target_run, pool_run, site) AS width
), hits AS (
    SELECT n.doc, sum(k.weight_units) AS units
    FROM doc_neurons n CROSS JOIN stride w JOIN keyed k ON k.unit_key = n.layer * w.width + n.neuron
    WHERE n.run_id = pool_run AND n.site = site
      AND (layers IS NULL OR list_contains(CAST(layers AS INTEGER[]), n.layer))
    GROUP BY n.doc
), used AS (
    -- Without a profile row every sum is 0, and so is every similarity.
    SELECT coalesce(max(k.per_unit), 0) AS per_unit FROM keyed k
)
SELECT d.doc, d.doc_id, d.dataset, d.n_tokens,
       coalesce(h.units, 0) * u.per_unit AS similarity,
       1 - coalesce(h.units, 0) * u.per_unit AS distance
FROM documents d CROSS JOIN used u LEFT JOIN hits h ON h.doc = d.doc
WHERE whq_nag_site(pool_run, site) AND whq_nag_documents(pool_run, pool_dataset, pool_role)
  AND whq_nag_layers(pool_run, site, layers)
  AND d.run_id = pool_run
  AND (pool_dataset IS NULL OR d.dataset = pool_dataset)
  AND (pool_role IS NULL OR d.role = pool_role);
COMMENT ON MACRO TABLE nag_distance IS 'NAG similarity of every pool document to the target profile: similarity = (1/L) * sum over the L layers used of the weights of the document''s top-K units; distance = 1 - similarity (documents without tokens have similarity 0). Target and pool may be one run, split by dataset or role. weights := the name of a table holding nag_unit_weights of the same arguments makes big pools faster (DuckDB then joins by array lookup). Example: SELECT doc_id, dataset, distance FROM nag_distance(''demo'', ''demo'', ''mlp.up'', target_dataset := ''MENENIUS'') ORDER BY distance LIMIT 5';

CREATE OR REPLACE MACRO nag_select(target_run, pool_run, site, target_dataset := NULL, pool_dataset := NULL,
                                   layers := NULL, power := 1.0, fraction := 0.2, target_role := NULL,
                                   pool_role := NULL, weights := NULL) AS TABLE
WITH ranked AS (
    SELECT r.*, row_number() OVER w AS rank,
           CAST(sum(r.n_tokens) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS BIGINT) AS cum_tokens,
           CAST(sum(r.n_tokens) OVER () AS BIGINT) AS pool_tokens
    FROM nag_distance(target_run, pool_run, site, target_dataset := target_dataset, pool_dataset := pool_dataset,
                      layers := layers, power := power, target_role := target_role, pool_role := pool_role,
                      weights := weights) r
    WINDOW w AS (ORDER BY r.distance, r.doc_id, r.doc)
)
SELECT x.doc, x.doc_id, x.dataset, x.n_tokens, x.similarity, x.distance, x.rank, x.cum_tokens
FROM ranked x
WHERE whq_nag_fraction(fraction) AND (x.cum_tokens <= floor(fraction * x.pool_tokens) OR x.rank = 1)
ORDER BY x.rank;
COMMENT ON MACRO TABLE nag_select IS 'NAG selection with a token budget: pool documents sorted by (distance, doc_id), kept while their cumulative tokens <= floor(fraction * pool tokens); the first is always kept. Example: SELECT doc_id, distance FROM nag_select(''demo'', ''demo'', ''mlp.up'', target_dataset := ''MENENIUS'', fraction := 0.2)';

CREATE OR REPLACE MACRO whq_minmax(x, low, high) AS (
    CASE WHEN high > low THEN (x - low) * (1.0 / (high - low)) ELSE 0 END
);
COMMENT ON MACRO whq_minmax IS 'x scaled to [0, 1] by the range [low, high]; 0 when the range is empty. The division is a product with the reciprocal, as Polars computes it.';

CREATE OR REPLACE MACRO nag_quality(target_run, pool_run, site, quality_column, target_dataset := NULL,
                                    pool_dataset := NULL, layers := NULL, power := 1.0, fraction := 0.2,
                                    invert := false, target_role := NULL, pool_role := NULL, weights := NULL) AS TABLE
WITH scored AS (
    SELECT r.*, TRY_CAST(json_extract_string(d.meta, '$.' || quality_column) AS DOUBLE) AS quality
    FROM nag_distance(target_run, pool_run, site, target_dataset := target_dataset, pool_dataset := pool_dataset,
                      layers := layers, power := power, target_role := target_role, pool_role := pool_role,
                      weights := weights) r
    JOIN documents d ON d.run_id = pool_run AND d.doc = r.doc
), bounds AS (
    SELECT min(s.distance) AS d_min, max(s.distance) AS d_max, min(s.quality) AS q_min, max(s.quality) AS q_max
    FROM scored s
), mixed AS (
    SELECT s.*,
           whq_minmax(s.distance, b.d_min, b.d_max)
           + CASE WHEN s.quality IS NULL THEN 1
                  WHEN invert THEN 1 - whq_minmax(s.quality, b.q_min, b.q_max)
                  ELSE whq_minmax(s.quality, b.q_min, b.q_max) END AS score
    FROM scored s CROSS JOIN bounds b
    WHERE CASE WHEN b.q_max IS NULL THEN error('no pool document has a number under ''' || quality_column
        || ''' in its meta: quality columns are the source''s extra columns (SELECT meta FROM documents WHERE run_id = ''' || pool_run || ''' LIMIT 1)')
        ELSE true END
), ranked AS (
    SELECT m.*, row_number() OVER w AS rank,
           CAST(sum(m.n_tokens) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS BIGINT) AS cum_tokens,
           CAST(sum(m.n_tokens) OVER () AS BIGINT) AS pool_tokens
    FROM mixed m
    WINDOW w AS (ORDER BY m.score, m.doc_id, m.doc)
)
SELECT x.doc, x.doc_id, x.dataset, x.n_tokens, x.similarity, x.distance, x.quality, x.score, x.rank, x.cum_tokens
FROM ranked x
WHERE whq_nag_fraction(fraction) AND (x.cum_tokens <= floor(fraction * x.pool_tokens) OR x.rank = 1)
ORDER BY x.rank;
COMMENT ON MACRO TABLE nag_quality IS 'NAG mixed with a quality signal: score = minmax(distance) + minmax(quality) (1 - minmax(quality) with invert := true, for higher-is-better scores; a document without the value scores 1), selected by (score, doc_id) under the token budget like nag_select. quality_column names a key of documents.meta. Example: SELECT * FROM nag_quality(''t'', ''pool'', ''mlp.up'', ''edu_score'', invert := true)';

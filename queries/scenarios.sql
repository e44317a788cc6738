-- Chat scenarios (Activation Lab's comparisons): reference similarity, drift, run
-- comparison, cross-layer cosine, neuron trajectories, residual decomposition.
--
-- States are the last-token vectors a scenario ingest writes (vectors.pool = 'last',
-- site = the source: hidden_in, hidden_out, attn_out, mlp_out), one per document,
-- step and layer. Metrics between two states s1, s2 of one layer (H units):
--   cosine  = s1.s2 / max(|s1| |s2|, 1e-8)
--   mae     = mean |s1 - s2|
--   jaccard = |top(s1) & top(s2)| / |top(s1) | top(s2)|, top(s) = the indices of the
--             k = max(1, H // 100) largest |s| (ties: the lower index first).
-- The array math is DuckDB's list functions in DOUBLE. Every column inside a macro is
-- qualified (an unqualified name equal to a parameter means the parameter).
-- Polars twins: queries/scenario_frames.py.

CREATE OR REPLACE MACRO whq_cosine(a, b) AS (
    list_dot_product(a, b) / greatest(sqrt(list_dot_product(a, a)) * sqrt(list_dot_product(b, b)), 1e-8)
);
COMMENT ON MACRO whq_cosine IS 'Cosine of two DOUBLE[] vectors: a.b / max(|a| |b|, 1e-8).';

CREATE OR REPLACE MACRO whq_mae(a, b) AS (list_avg(list_transform(a, lambda x, i: abs(x - b[i]))));
COMMENT ON MACRO whq_mae IS 'Mean absolute difference of two DOUBLE[] vectors of one length.';

CREATE OR REPLACE MACRO whq_jaccard(a, b) AS (
    len(list_intersect(a, b)) / (len(a) + len(b) - len(list_intersect(a, b)))
);
COMMENT ON MACRO whq_jaccard IS 'Jaccard index |a & b| / |a | b| of two lists of distinct ids.';

CREATE OR REPLACE MACRO whq_scenario_vectors(run) AS TABLE
SELECT v.site AS source, v.layer, v.doc, v.step, v.pos, d.doc_id, d.role, d.message_index, d.message_role, d.label,
       max(v.step) OVER (PARTITION BY v.doc) AS last_step,
       v.vec::DOUBLE[] AS vec, sqrt(list_dot_product(v.vec::DOUBLE[], v.vec::DOUBLE[])) AS norm
FROM vectors v
JOIN documents d ON d.run_id = v.run_id AND d.doc = v.doc
WHERE whq_known_run(run) AND v.run_id = run AND v.pool = 'last' AND v.step IS NOT NULL
  AND d.role IN ('message', 'generated', 'reference');
COMMENT ON MACRO TABLE whq_scenario_vectors IS 'A scenario run''s last-token states: source, layer, doc, step, pos, the document''s ids and roles, the doc''s last step, vec as DOUBLE[] and its norm.';

CREATE OR REPLACE MACRO whq_scenario_states(run) AS TABLE
WITH elements AS (
    SELECT v.source, v.layer, v.doc, v.step, len(v.vec) AS h,
           unnest(v.vec) AS x, generate_subscripts(v.vec, 1) AS i
    FROM whq_scenario_vectors(run) v
), ranked AS (
    SELECT e.source, e.layer, e.doc, e.step, e.h, e.i,
           row_number() OVER (PARTITION BY e.source, e.layer, e.doc, e.step ORDER BY abs(e.x) DESC, e.i) AS r
    FROM elements e
), tops AS (
    SELECT k.source, k.layer, k.doc, k.step, list(k.i - 1 ORDER BY k.i) AS top
    FROM ranked k
    WHERE k.r <= greatest(1, floor(k.h / 100))
    GROUP BY k.source, k.layer, k.doc, k.step
)
SELECT v.*, t.top
FROM whq_scenario_vectors(run) v
JOIN tops t ON t.source = v.source AND t.layer = v.layer AND t.doc = v.doc AND t.step = v.step;
COMMENT ON MACRO TABLE whq_scenario_states IS 'whq_scenario_vectors plus top: the 0-based indices of the k = max(1, H // 100) largest |values| (ties: lower index), ascending.';

CREATE OR REPLACE MACRO whq_ref_pairs(run) AS TABLE
WITH states AS (SELECT * FROM whq_scenario_states(run)),
turns AS (
    SELECT s.* FROM states s
    WHERE s.role = 'message' OR (s.role = 'generated' AND s.step = s.last_step)
)
SELECT m.source, m.doc, r.doc AS ref_doc, m.doc_id,
       CASE WHEN m.role = 'message' THEN m.message_role ELSE m.role END AS role,
       m.role = 'message' AS is_message, m.message_index, r.label, m.layer,
       whq_cosine(m.vec, r.vec) AS cosine, whq_mae(m.vec, r.vec) AS mae, whq_jaccard(m.top, r.top) AS jaccard
FROM turns m
JOIN states r ON r.role = 'reference' AND r.source = m.source AND r.layer = m.layer;
COMMENT ON MACRO TABLE whq_ref_pairs IS 'Every conversation state (each message snapshot; the generation''s final step) against every reference state, per source and layer.';

CREATE OR REPLACE MACRO ref_similarity(run, source := 'hidden_out') AS TABLE
SELECT p.doc_id, p.role, p.message_index, p.label, p.layer, p.cosine, p.mae, p.jaccard
FROM whq_ref_pairs(run) p
WHERE whq_known_site(run, source) AND p.source = source
ORDER BY p.doc, p.ref_doc, p.layer;
COMMENT ON MACRO TABLE ref_similarity IS 'Each conversation snapshot (role system/user/assistant; the generation''s final step as role generated) vs each reference label, per layer of one source: cosine, MAE, Jaccard of the top-1% |values|. Example: SELECT * FROM ref_similarity(''emo'', source := ''hidden_out'')';

CREATE OR REPLACE MACRO ref_summary(run) AS TABLE
SELECT p.label, p.source,
       avg(p.cosine) AS mean_cosine, stddev_pop(p.cosine) AS std_cosine, median(p.cosine) AS median_cosine,
       avg(p.mae) AS mean_mae, stddev_pop(p.mae) AS std_mae, median(p.mae) AS median_mae,
       avg(p.jaccard) AS mean_jaccard, stddev_pop(p.jaccard) AS std_jaccard, median(p.jaccard) AS median_jaccard
FROM whq_ref_pairs(run) p
WHERE p.is_message
GROUP BY p.ref_doc, p.label, p.source
ORDER BY p.ref_doc, p.source;
COMMENT ON MACRO TABLE ref_summary IS 'Per reference label and source: mean, population std and median of cosine, MAE and Jaccard over all message snapshots and layers. Example: SELECT * FROM ref_summary(''emo'')';

CREATE OR REPLACE MACRO ref_by_role(run) AS TABLE
SELECT p.role, p.label, p.source, count(DISTINCT p.doc) AS n_messages,
       avg(p.cosine) AS mean_cosine, avg(p.mae) AS mean_mae, avg(p.jaccard) AS mean_jaccard
FROM whq_ref_pairs(run) p
GROUP BY p.role, p.ref_doc, p.label, p.source
ORDER BY p.role, p.ref_doc, p.source;
COMMENT ON MACRO TABLE ref_by_role IS 'Per message role (system, user, assistant; generated = the generation''s final step), reference label and source: snapshots averaged, mean cosine, MAE and Jaccard over them and all layers. Example: SELECT * FROM ref_by_role(''emo'') WHERE role IN (''user'', ''assistant'')';

CREATE OR REPLACE MACRO drift(run) AS TABLE
WITH states AS (SELECT * FROM whq_scenario_states(run) s WHERE s.role = 'generated'),
pairs AS (
    SELECT a.doc, a.doc_id, a.source, a.layer,
           whq_cosine(a.vec, b.vec) AS cosine, whq_mae(a.vec, b.vec) AS mae, whq_jaccard(a.top, b.top) AS jaccard
    FROM states a
    JOIN states b ON b.doc = a.doc AND b.source = a.source AND b.layer = a.layer AND b.step = b.last_step
    WHERE a.step = 0
)
SELECT p.doc_id, p.source, p.layer, p.cosine, p.mae, p.jaccard,
       first_value(p.layer) OVER (PARTITION BY p.doc, p.source ORDER BY p.cosine, p.layer) AS most_divergent_layer
FROM pairs p
ORDER BY p.doc, p.source, p.layer;
COMMENT ON MACRO TABLE drift IS 'Intra-run drift of each generation: the prefill''s last token (step 0) vs the final decode step, per source and layer; most_divergent_layer has the lowest cosine. Example: SELECT * FROM drift(''emo'')';

CREATE OR REPLACE MACRO run_compare(run_a, run_b) AS TABLE
WITH a AS (
    SELECT s.* FROM whq_scenario_states(run_a) s
    WHERE s.role = 'generated' AND s.doc = (SELECT max(d.doc) FROM documents d WHERE d.run_id = run_a AND d.role = 'generated')
), b AS (
    SELECT s.* FROM whq_scenario_states(run_b) s
    WHERE s.role = 'generated' AND s.doc = (SELECT max(d.doc) FROM documents d WHERE d.run_id = run_b AND d.role = 'generated')
), states AS (
    SELECT 'initial' AS state, 0 AS state_order, a.source, a.layer, a.vec AS vec_a, b.vec AS vec_b, a.top AS top_a, b.top AS top_b
    FROM a JOIN b ON b.source = a.source AND b.layer = a.layer AND b.step = 0 WHERE a.step = 0
    UNION ALL
    SELECT 'final', 1, a.source, a.layer, a.vec, b.vec, a.top, b.top
    FROM a JOIN b ON b.source = a.source AND b.layer = a.layer AND b.step = b.last_step WHERE a.step = a.last_step
)
SELECT s.state, s.source, s.layer, whq_cosine(s.vec_a, s.vec_b) AS cosine, whq_mae(s.vec_a, s.vec_b) AS mae,
       whq_jaccard(s.top_a, s.top_b) AS jaccard
FROM states s
ORDER BY s.state_order, s.source, s.layer;
COMMENT ON MACRO TABLE run_compare IS 'Inter-run comparison of two scenario runs'' (last) generations: initial states (prefill, last prompt token) and final states (last decode step), per source and layer. Example: SELECT * FROM run_compare(''emo'', ''emo2'')';

CREATE OR REPLACE MACRO cross_layer_cosine(run, doc_id, source := 'hidden_out', step := NULL) AS TABLE
WITH states AS (
    SELECT v.layer, v.vec FROM whq_scenario_vectors(run) v
    WHERE whq_known_site(run, source) AND v.doc_id = doc_id AND v.source = source
      AND v.step = coalesce(step, v.last_step)
)
SELECT a.layer AS layer_a, b.layer AS layer_b, whq_cosine(a.vec, b.vec) AS cosine
FROM states a CROSS JOIN states b
ORDER BY a.layer, b.layer;
COMMENT ON MACRO TABLE cross_layer_cosine IS 'Layer x layer cosine of one document''s last-token states of one source (at step, default the document''s last step). Example: SELECT * FROM cross_layer_cosine(''emo'', ''generated:09:user'', ''hidden_out'')';

CREATE OR REPLACE MACRO neuron_trajectory(run, site, layer, neuron) AS TABLE
WITH fed AS (
    SELECT st.doc, st.step, st.input_tokens[len(st.input_tokens)] AS input_token, st.generated_token,
           CAST(sum(len(st.input_token_ids)) OVER (PARTITION BY st.doc ORDER BY st.step) - 1 AS INTEGER) AS pos
    FROM steps st
    WHERE whq_known_site(run, site) AND st.run_id = run
)
SELECT d.doc_id, f.step, f.pos, f.input_token, f.generated_token,
       coalesce(v.vec[neuron + 1], tn.value) AS value
FROM fed f
JOIN documents d ON d.run_id = run AND d.doc = f.doc
LEFT JOIN vectors v ON v.run_id = run AND v.site = site AND v.layer = layer AND v.pool = 'last'
    AND v.doc = f.doc AND v.step = f.step
LEFT JOIN token_neurons tn ON tn.run_id = run AND tn.site = site AND tn.layer = layer
    AND tn.doc = f.doc AND tn.pos = f.pos AND tn.neuron = neuron
ORDER BY f.doc, f.step;
COMMENT ON MACRO TABLE neuron_trajectory IS 'One unit over a scenario''s generation steps: its value at the step''s last token, from a source''s vectors (hidden_out, ...) or a sparse site''s token_neurons (NULL where the unit was not kept). Example: SELECT * FROM neuron_trajectory(''emo'', ''hidden_out'', 3, 7)';

CREATE OR REPLACE MACRO residual_decomposition(run) AS TABLE
WITH v AS (SELECT * FROM whq_scenario_vectors(run))
SELECT i.doc_id, i.role, i.step, i.layer,
       i.norm AS hidden_in_norm, a.norm AS attn_out_norm, m.norm AS mlp_out_norm, o.norm AS hidden_out_norm,
       whq_cosine(a.vec, list_transform(o.vec, lambda x, j: x - i.vec[j])) AS attn_cosine,
       whq_cosine(m.vec, list_transform(o.vec, lambda x, j: x - i.vec[j])) AS mlp_cosine
FROM v i
JOIN v a ON a.source = 'attn_out' AND a.doc = i.doc AND a.step = i.step AND a.layer = i.layer
JOIN v m ON m.source = 'mlp_out' AND m.doc = i.doc AND m.step = i.step AND m.layer = i.layer
JOIN v o ON o.source = 'hidden_out' AND o.doc = i.doc AND o.step = i.step AND o.layer = i.layer
WHERE i.source = 'hidden_in'
ORDER BY i.doc, i.step, i.layer;
COMMENT ON MACRO TABLE residual_decomposition IS 'Per document, step and layer: the norms of hidden_in, attn_out, mlp_out, hidden_out and the cosines of attn_out and mlp_out with the block''s update hidden_out - hidden_in. Example: SELECT * FROM residual_decomposition(''emo'') WHERE role = ''generated''';

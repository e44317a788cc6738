-- Explanations and scores (whq explain / whq score; docs/explain.md). Polars twins: queries/explanation_frames.py.

CREATE OR REPLACE MACRO explanation_scores(run, site, layer) AS TABLE
SELECT e.neuron, e.explanation_id, e.explainer, e.model, e.text,
       max(CASE WHEN s.scorer = 'detection' AND s.metric = 'balanced_accuracy' THEN s.value END) AS detection,
       max(CASE WHEN s.scorer = 'fuzz' AND s.metric = 'balanced_accuracy' THEN s.value END) AS fuzz,
       max(CASE WHEN s.scorer = 'simulation' AND s.metric = 'ev_correlation' THEN s.value END) AS simulation,
       max(CASE WHEN s.scorer = 'embedding' AND s.metric = 'auc' THEN s.value END) AS embedding,
       max(CASE WHEN s.scorer = 'intruder' AND s.metric = 'accuracy' THEN s.value END) AS intruder
FROM explanations e
LEFT JOIN scores s ON s.run_id = e.run_id AND s.site = e.site AND s.layer = e.layer
    AND s.explanation_id = e.explanation_id
WHERE whq_known_site(run, site) AND e.run_id = run AND e.site = site AND e.layer = layer
GROUP BY e.neuron, e.explanation_id, e.explainer, e.model, e.text
ORDER BY e.neuron, e.explainer, e.model, e.explanation_id;
COMMENT ON MACRO TABLE explanation_scores IS 'One row per explanation of a layer''s units (whq explain) with each scorer''s headline figure (whq score): detection and fuzz = balanced accuracy, simulation = ev_correlation (Pearson r of true and expected values, non-activating examples as zeros), embedding = ROC AUC, intruder = accuracy; NULL where not scored (several judge models: the highest). Example: SELECT * FROM explanation_scores(''demo'', ''mlp.act'', 3) ORDER BY detection DESC LIMIT 10';

CREATE OR REPLACE MACRO whq_auc_input(run, site) AS TABLE
SELECT x.scorer, x.model, x.truth,
       CASE WHEN x.scorer = 'embedding' THEN x.prediction ELSE x.probability END AS score
FROM explanation_examples x
WHERE x.run_id = run AND x.site = site AND x.scorer IN ('detection', 'fuzz', 'embedding')
  AND (CASE WHEN x.scorer = 'embedding' THEN x.prediction ELSE x.probability END) IS NOT NULL;
COMMENT ON MACRO TABLE whq_auc_input IS 'The (truth, score) pairs a pooled ROC AUC is computed over: detection/fuzz probabilities, embedding similarities.';

CREATE OR REPLACE MACRO scorer_summary(run, site) AS TABLE
WITH x AS (
    SELECT ee.* FROM explanation_examples ee
    WHERE whq_known_site(run, site) AND ee.run_id = run AND ee.site = site AND ee.scorer IS NOT NULL
),
conf AS (
    SELECT x.scorer, x.model,
           count(*) FILTER (WHERE x.parsed AND x.truth AND x.prediction >= 0.5) AS tp,
           count(*) FILTER (WHERE x.parsed AND NOT x.truth AND x.prediction < 0.5) AS tn,
           count(*) FILTER (WHERE x.parsed AND NOT x.truth AND x.prediction >= 0.5) AS fp,
           count(*) FILTER (WHERE x.parsed AND x.truth) AS pos,
           count(*) FILTER (WHERE x.parsed AND NOT x.truth) AS neg
    FROM x WHERE x.scorer IN ('detection', 'fuzz') GROUP BY x.scorer, x.model
),
classification AS (
    SELECT c.scorer, c.model, 'balanced_accuracy' AS metric,
           CASE WHEN c.pos + c.neg > 0 THEN ((CASE WHEN c.pos > 0 THEN c.tp / c.pos ELSE 0 END)
               + (CASE WHEN c.neg > 0 THEN c.tn / c.neg ELSE 0 END)) / 2 END AS value
    FROM conf c
    UNION ALL
    SELECT c.scorer, c.model, 'precision',
           CASE WHEN c.pos + c.neg > 0 THEN (CASE WHEN c.tp + c.fp > 0 THEN c.tp / (c.tp + c.fp) ELSE 0 END) END
    FROM conf c
    UNION ALL
    SELECT c.scorer, c.model, 'recall', CASE WHEN c.pos + c.neg > 0 THEN (CASE WHEN c.pos > 0 THEN c.tp / c.pos ELSE 0 END) END
    FROM conf c
    UNION ALL
    SELECT c.scorer, c.model, 'f1',
           CASE WHEN c.pos + c.neg > 0 THEN (CASE WHEN c.tp > 0 THEN 2 * c.tp / (2 * c.tp + c.fp + (c.pos - c.tp)) ELSE 0 END) END
    FROM conf c
),
ranked AS (
    SELECT a.scorer, a.model, a.truth,
           rank() OVER (PARTITION BY a.scorer, a.model ORDER BY a.score)
             + (count(*) OVER (PARTITION BY a.scorer, a.model, a.score) - 1) / 2.0 AS r
    FROM whq_auc_input(run, site) a
),
auc AS (
    SELECT rk.scorer, rk.model, 'auc' AS metric,
           CASE WHEN count(*) FILTER (WHERE rk.truth) > 0 AND count(*) FILTER (WHERE NOT rk.truth) > 0 THEN
               (sum(rk.r) FILTER (WHERE rk.truth)
                 - count(*) FILTER (WHERE rk.truth) * (count(*) FILTER (WHERE rk.truth) + 1) / 2.0)
               / (count(*) FILTER (WHERE rk.truth) * count(*) FILTER (WHERE NOT rk.truth)) END AS value
    FROM ranked rk GROUP BY rk.scorer, rk.model
),
intruder AS (
    SELECT x.scorer, x.model, 'accuracy' AS metric, avg(coalesce(x.correct, false)::INTEGER) AS value
    FROM x WHERE x.scorer = 'intruder' AND x.role = 'non-activating' GROUP BY x.scorer, x.model
),
simulated AS (
    SELECT z.scorer, z.model, z.true_values[z.i] AS t, z.predicted_values[z.i] AS p
    FROM (SELECT x.scorer, x.model, x.true_values, x.predicted_values,
                 unnest(generate_series(1, len(x.true_values))) AS i
          FROM x WHERE x.scorer = 'simulation' AND x.parsed) z
),
simulation AS (
    SELECT s.scorer, s.model, 'ev_correlation' AS metric, corr(s.t, s.p) AS value
    FROM simulated s GROUP BY s.scorer, s.model
),
pooled AS (
    SELECT * FROM classification UNION ALL SELECT * FROM auc UNION ALL SELECT * FROM intruder
    UNION ALL SELECT * FROM simulation
),
per_unit AS (
    SELECT sc.scorer, sc.model, sc.metric, avg(sc.value) AS per_unit_mean, count(sc.value) AS n_units,
           sum(sc.n_examples) AS n_examples, sum(sc.n_unparsable) AS n_unparsable
    FROM scores sc WHERE sc.run_id = run AND sc.site = site
    GROUP BY sc.scorer, sc.model, sc.metric
)
SELECT u.scorer, u.model, u.metric, p.value AS pooled, u.per_unit_mean, u.n_units,
       CAST(u.n_examples AS BIGINT) AS n_examples, CAST(u.n_unparsable AS BIGINT) AS n_unparsable
FROM per_unit u
LEFT JOIN pooled p ON p.scorer = u.scorer AND p.model = u.model AND p.metric = u.metric
ORDER BY u.scorer, u.model, u.metric;
COMMENT ON MACRO TABLE scorer_summary IS 'Each scorer''s metrics over a site, both ways the field reports them: pooled = over every scored example of every unit at once (delphi''s log/result_analysis: one confusion matrix, one ROC AUC; simulation: Pearson r over all concatenated values; intruder: share of trials whose intruder was found, unparsable trials wrong), per_unit_mean = the mean of the per-unit values in scores (Neuronpedia, SAEBench), over n_units units with a value; n_examples and n_unparsable summed over units. Pooled is NULL for per-group metrics (ev_correlation_q<N>, ...). Example: SELECT * FROM scorer_summary(''demo'', ''mlp.act'')';

CREATE OR REPLACE MACRO search_explanations(run, site, query, query_embedding := NULL) AS TABLE
WITH matched AS (
    SELECT e.layer, e.neuron, e.explanation_id, e.explainer, e.model, e.text,
           CASE WHEN query_embedding IS NOT NULL
                THEN list_cosine_similarity(e.embedding, CAST(query_embedding AS FLOAT[])) END AS similarity,
           contains(lower(e.text), lower(query)) AS text_match
    FROM explanations e
    WHERE whq_known_site(run, site) AND e.run_id = run AND e.site = site AND e.parsed
)
SELECT m.*, coalesce(m.similarity, 0) + CASE WHEN m.text_match THEN 1 ELSE 0 END AS score
FROM matched m
WHERE m.text_match OR m.similarity IS NOT NULL
ORDER BY score DESC, m.layer, m.neuron, m.explanation_id;
COMMENT ON MACRO TABLE search_explanations IS 'Units found by what their explanation says: text_match = the explanation contains `query` (case ignored); with query_embedding (the MiniLM embedding of the query, 384 floats, which SQL cannot compute: explain.search and the Polars twin pass it) also similarity = its cosine with the stored embedding of the explanation; ranked by score = similarity + 1 for a text match. Without query_embedding only text matches are returned. Example: SELECT * FROM search_explanations(''demo'', ''mlp.act'', ''plural'') LIMIT 10';

CREATE OR REPLACE MACRO scorer_verdicts(run, site, layer, unit) AS TABLE
SELECT x.explanation_id, x.scorer, x.model, x.role, x.source, d.doc_id, x.doc, x.pos, x.quantile, x.truth,
       x.value, x.prediction, x.probability, x.correct, x.parsed,
       CASE WHEN NOT x.parsed THEN 'unparsable' WHEN x.correct THEN 'right' WHEN NOT x.correct THEN 'wrong' END
           AS verdict
FROM explanation_examples x
JOIN documents d ON d.run_id = x.run_id AND d.doc = x.doc
WHERE whq_known_site(run, site) AND x.run_id = run AND x.site = site AND x.layer = layer AND x.neuron = unit
  AND x.scorer IS NOT NULL
ORDER BY x.explanation_id, x.scorer, x.model, x.role, x.doc, x.pos;
COMMENT ON MACRO TABLE scorer_verdicts IS 'Every test and non-activating example the scorers judged for one unit, with the verdict: right, wrong (detection/fuzz: prediction differs from truth; intruder: the intruder was missed), unparsable (the answer was out of form), or NULL where a scorer gives no yes/no verdict (embedding, simulation: see prediction). Example: SELECT * FROM scorer_verdicts(''demo'', ''mlp.act'', 3, 42) WHERE verdict = ''wrong''';

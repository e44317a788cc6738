-- BDH's interpretability report (pathwaycom/bdh PR #10, analyze.py) from a warehouse, in the
-- neuron macros of queries/neurons.sql. Run it in the DuckDB shell:
--
--     duckdb -readonly bdh-wh/whq.duckdb -f examples/bdh/analyze.sql
--
-- or through analyze.py, which sets the variables from its arguments, runs each named
-- query below and draws the two histograms.

SET VARIABLE run = 'bdh';
SET VARIABLE site = 'xy_sparse';
SET VARIABLE top = 10;        -- selective units to list
SET VARIABLE min_fired = 5;   -- rank only units that fired on at least this many tokens
SET VARIABLE bins = 40;       -- histogram bins

-- name: layer_summary
-- Per layer: mean / median firing rate (a > 0), rare share (rate < 1%, dead included), dead share.
SELECT * FROM layer_summary(getvariable('run'), getvariable('site'));

-- name: overall
SELECT avg(s.mean_rate) AS mean_rate, avg(s.rare_share) AS rare_share, avg(s.dead_share) AS dead_share
FROM layer_summary(getvariable('run'), getvariable('site')) s;

-- name: top_selective
-- The most selective units (max / mean over all tokens) with the bytes around their strongest
-- activation. A unit firing once has selectivity = n_tokens, hence the min_fired floor.
WITH layers AS (
    SELECT unnest(s.layers) AS layer FROM sites s
    WHERE s.run_id = getvariable('run') AND s.site = getvariable('site')
),
ranked AS (
    SELECT l.layer, x.neuron, x.selectivity, f.n_fired, x.rate, x.max
    FROM layers l,
         LATERAL selectivity(getvariable('run'), getvariable('site'), l.layer) x,
         LATERAL firing_rate(getvariable('run'), getvariable('site'), l.layer) f
    WHERE f.neuron = x.neuron AND f.n_fired >= getvariable('min_fired') AND x.selectivity IS NOT NULL
    ORDER BY x.selectivity DESC, x.max DESC, l.layer, x.neuron
    LIMIT getvariable('top')
)
SELECT r.layer, r.neuron, r.selectivity, r.n_fired, r.rate, r.max, c.doc_id, c.pos, c.context
FROM ranked r, LATERAL neuron_contexts_bytes(getvariable('run'), getvariable('site'), r.layer, r.neuron) c
ORDER BY r.selectivity DESC, r.max DESC, r.layer, r.neuron;

-- name: rate_histogram
SELECT l.layer, h.*
FROM (SELECT unnest(s.layers) AS layer FROM sites s WHERE s.run_id = getvariable('run') AND s.site = getvariable('site')) l,
     LATERAL rate_histogram(getvariable('run'), getvariable('site'), l.layer, bins := getvariable('bins')) h
ORDER BY l.layer, h.bin;

-- name: selectivity_histogram
SELECT l.layer, h.*
FROM (SELECT unnest(s.layers) AS layer FROM sites s WHERE s.run_id = getvariable('run') AND s.site = getvariable('site')) l,
     LATERAL selectivity_histogram(getvariable('run'), getvariable('site'), l.layer, bins := getvariable('bins')) h
ORDER BY l.layer, h.bin;

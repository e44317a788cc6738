-- Dictionary analyses: how well an SAE or transcoder captured at a dictionary site
-- (`resid.out[6]+sae=PATH`) reconstructs its target and how its latents fire.
-- The sums come from the dictionaries table (exact over all tokens, accumulated on the device);
-- the latents themselves are units like neurons, so every neuron macro works on the site.
-- Polars twin: queries/dictionary_frames.py.

CREATE OR REPLACE MACRO dictionary_quality(run) AS TABLE
SELECT q.site, q.layer, q.d_in, q.d_sae, q.n_tokens,
       q.l0_sum / q.n_tokens AS mean_l0,
       q.n_dead / q.d_sae AS dead_share,
       q.n_dense / q.d_sae AS dense_share,
       q.sq_error / (q.n_tokens * q.d_out) AS mse,
       CASE WHEN q.total_variance > 0 THEN q.sq_error / q.total_variance END AS fvu,
       q.cosine_sum / q.n_tokens AS mean_cosine,
       q.ce_clean_sum / q.n_predicted AS ce_clean,
       q.ce_spliced_sum / q.n_predicted AS ce_spliced,
       (q.ce_spliced_sum - q.ce_clean_sum) / q.n_predicted AS delta_loss
FROM dictionaries q
WHERE whq_known_run(run) AND q.run_id = run AND q.n_tokens > 0
ORDER BY q.site, q.layer;
COMMENT ON MACRO TABLE dictionary_quality IS 'Per dictionary site and layer, exact over all tokens: mean_l0 (non-zero latents per token), dead_share (never active), dense_share (active on > 10% of tokens), mse (mean squared error per element), fvu (fraction of variance unexplained = squared error / total variance of the target) and mean_cosine of reconstruction to target (a transcoder''s target is the MLP output); with --splice, ce_clean, ce_spliced and delta_loss = their difference, the mean next-token cross-entropy with the reconstruction spliced in minus clean (NULL without --splice); mse, fvu and mean_cosine are NULL where no decoder ran (an encode_only site, an adapter without decode). Example: SELECT * FROM dictionary_quality(''demo'')';

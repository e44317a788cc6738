-- whq schema: the tables every warehouse has.
--
-- This file is the single source of the tables' columns and types. The catalog
-- (whq.duckdb) turns each CREATE TABLE below into a view of the same name over the
-- committed Parquet parts, cast to these types; a table that no run has written yet
-- is an empty view with these columns. Parquet files may store narrower physical
-- types (SMALLINT neuron ids, FLOAT16 values) that the views widen to these.
--
-- Columns `run_id`, `site` and `layer` are hive partitions: data/<table>/run_id=<id>/
-- [site=<site>/layer=<n>/]part-<rank>-<seq>.parquet. `doc` is the document's ordinal
-- in its run (documents maps it to the user's doc_id); `pos` counts every token the
-- model saw, special tokens included, continuing across windows.

CREATE TABLE runs (
    run_id VARCHAR,
    model_id VARCHAR,
    model_revision VARCHAR,
    model_class VARCHAR,
    dtype VARCHAR,
    device VARCHAR,
    n_layers INTEGER,
    sites VARCHAR[],
    n_documents BIGINT,
    n_tokens BIGINT,
    config JSON,
    created_at TIMESTAMP,
    status VARCHAR
);
COMMENT ON TABLE runs IS 'One row per committed run: model id/revision/dtype, layers, sites, the whole ingest config as JSON.';
COMMENT ON COLUMN runs.run_id IS 'Run identifier (partition key of every table).';
COMMENT ON COLUMN runs.model_id IS 'Model path or hub id the run was captured from.';
COMMENT ON COLUMN runs.model_revision IS 'Commit hash or revision of the model, when known.';
COMMENT ON COLUMN runs.model_class IS 'Python class of the model (e.g. BertModel, Qwen3ForCausalLM).';
COMMENT ON COLUMN runs.dtype IS 'Dtype the model ran in.';
COMMENT ON COLUMN runs.device IS 'Device the model ran on.';
COMMENT ON COLUMN runs.n_layers IS 'Number of transformer blocks of the model.';
COMMENT ON COLUMN runs.sites IS 'SPECs of the captured sites.';
COMMENT ON COLUMN runs.n_documents IS 'Documents captured.';
COMMENT ON COLUMN runs.n_tokens IS 'Token positions the model saw (special tokens included).';
COMMENT ON COLUMN runs.config IS 'The full ingest configuration and model config as JSON.';
COMMENT ON COLUMN runs.created_at IS 'UTC time the run started.';
COMMENT ON COLUMN runs.status IS 'committed (readers never see any other).';

CREATE TABLE sites (
    run_id VARCHAR,
    site VARCHAR,
    module_glob VARCHAR,
    hook_point VARCHAR,
    modules VARCHAR[],
    layers INTEGER[],
    width INTEGER,
    reductions VARCHAR,
    threshold DOUBLE
);
COMMENT ON TABLE sites IS 'One row per captured site of a run: where the hook sits and which reductions ran.';
COMMENT ON COLUMN sites.site IS 'Site name: an alias (mlp.up, mlp.act, resid.out, ...) or a sanitised module glob.';
COMMENT ON COLUMN sites.module_glob IS 'Glob over model.named_modules() the site resolved to.';
COMMENT ON COLUMN sites.hook_point IS 'in (module input) or out (module output).';
COMMENT ON COLUMN sites.modules IS 'The matched module paths, one per layer.';
COMMENT ON COLUMN sites.layers IS 'Layer index of each matched module.';
COMMENT ON COLUMN sites.width IS 'Number of units (neurons) at the site.';
COMMENT ON COLUMN sites.reductions IS 'Reductions as written in the SPEC (topk=20,nag=20,...).';
COMMENT ON COLUMN sites.threshold IS 'Firing threshold: a unit fires when value > threshold (default 0).';

CREATE TABLE documents (
    run_id VARCHAR,
    doc INTEGER,
    doc_id VARCHAR,
    dataset VARCHAR,
    role VARCHAR,
    label VARCHAR,
    message_index INTEGER,
    message_role VARCHAR,
    n_tokens INTEGER,
    n_windows INTEGER,
    text VARCHAR,
    meta JSON
);
COMMENT ON TABLE documents IS 'One row per captured document: its ids, labels, token count and text.';
COMMENT ON COLUMN documents.doc IS 'Ordinal of the document in its run; the key used by every other table.';
COMMENT ON COLUMN documents.doc_id IS 'The document id from the source (doc_id/docid column, or <file stem>:<index>).';
COMMENT ON COLUMN documents.dataset IS 'Dataset label (--dataset, or the source''s dataset column).';
COMMENT ON COLUMN documents.role IS 'pool, target, reference, message or generated.';
COMMENT ON COLUMN documents.label IS 'Free label (a reference state''s label, a class, ...).';
COMMENT ON COLUMN documents.message_index IS 'For chat snapshots: index of the last message included.';
COMMENT ON COLUMN documents.message_role IS 'For chat snapshots: system, user or assistant.';
COMMENT ON COLUMN documents.n_tokens IS 'Token positions the model saw for this document (special tokens included).';
COMMENT ON COLUMN documents.n_windows IS 'Windows of --max-length the document was processed in.';
COMMENT ON COLUMN documents.text IS 'The document text.';
COMMENT ON COLUMN documents.meta IS 'Other source columns, as JSON.';

CREATE TABLE tokens (
    run_id VARCHAR,
    doc INTEGER,
    pos INTEGER,
    "window" INTEGER,
    token_id INTEGER,
    piece VARCHAR,
    char_start INTEGER,
    char_end INTEGER,
    special BOOLEAN,
    text VARCHAR,
    context INTEGER,
    context_pos INTEGER
);
COMMENT ON TABLE tokens IS 'Every token position the model saw: re-running the model on token_id grouped by (doc, window) reproduces the stored activations.';
COMMENT ON COLUMN tokens.pos IS 'Position in the document, continuing across windows, special tokens included.';
COMMENT ON COLUMN tokens."window" IS 'Index of the --max-length window the token was seen in.';
COMMENT ON COLUMN tokens.token_id IS 'Vocabulary id fed to the model.';
COMMENT ON COLUMN tokens.piece IS 'The token as text (tokenizer.convert_ids_to_tokens).';
COMMENT ON COLUMN tokens.char_start IS 'Start offset of the token in documents.text (NULL for special tokens).';
COMMENT ON COLUMN tokens.char_end IS 'End offset (exclusive) in documents.text (NULL for special tokens).';
COMMENT ON COLUMN tokens.special IS 'True for tokens the tokenizer added ([CLS], [SEP], BOS, ...).';
COMMENT ON COLUMN tokens.context IS 'Packed runs (--pack): ordinal in the run of the packed context the token was computed in; NULL when each window is its own model input.';
COMMENT ON COLUMN tokens.context_pos IS 'Position of the token in the model input it was computed in (the packed context, or its window): 0 is the first position the model saw.';
COMMENT ON COLUMN tokens.text IS 'The token as the tokenizer decodes it alone (tokenizer.decode([token_id]): '' ass'', not ''Ġass''), for display; NULL in runs captured before it was kept.';

CREATE TABLE token_neurons (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    doc INTEGER,
    pos INTEGER,
    neuron INTEGER,
    value FLOAT
);
COMMENT ON TABLE token_neurons IS 'Sparse per-token activations: the top-k units of each token (topk/abstopk) or every unit above a threshold (threshold).';
COMMENT ON COLUMN token_neurons.neuron IS 'Unit index at the site (stored as SMALLINT where the width allows).';
COMMENT ON COLUMN token_neurons.value IS 'Activation value (stored as FLOAT16).';
COMMENT ON COLUMN token_neurons.pos IS 'Token position in the document (see tokens.pos).';

CREATE TABLE doc_neurons (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    doc INTEGER,
    rank INTEGER,
    neuron INTEGER,
    impact FLOAT
);
COMMENT ON TABLE doc_neurons IS 'NAG: per document and layer, the K units of highest impact = mean over the document''s tokens of |value|, one row per rank (ties: lower unit id first).';
COMMENT ON COLUMN doc_neurons.rank IS 'Rank of the unit in the document''s top-K: 0 is the highest impact (stored as SMALLINT).';
COMMENT ON COLUMN doc_neurons.neuron IS 'Unit index at the site (stored as SMALLINT where the width allows).';
COMMENT ON COLUMN doc_neurons.impact IS 'The unit''s impact: mean |value| over the document''s tokens.';

CREATE TABLE neuron_stats (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    neuron INTEGER,
    n_tokens BIGINT,
    n_fired BIGINT,
    sum DOUBLE,
    sum_sq DOUBLE,
    max FLOAT,
    max_doc INTEGER,
    max_pos INTEGER,
    min FLOAT,
    sum_cube DOUBLE,
    sum_quad DOUBLE,
    sum_pos DOUBLE
);
COMMENT ON TABLE neuron_stats IS 'Exact aggregates over ALL tokens of the run, computed from the dense activation on the device.';
COMMENT ON COLUMN neuron_stats.n_tokens IS 'Token positions seen (padding excluded).';
COMMENT ON COLUMN neuron_stats.neuron IS 'Unit index at the site.';
COMMENT ON COLUMN neuron_stats.n_fired IS 'Tokens where value > the site''s threshold.';
COMMENT ON COLUMN neuron_stats.sum IS 'Sum of values over all tokens.';
COMMENT ON COLUMN neuron_stats.sum_sq IS 'Sum of squared values over all tokens.';
COMMENT ON COLUMN neuron_stats.max IS 'Largest value.';
COMMENT ON COLUMN neuron_stats.max_doc IS 'Document of the largest value (first in document order on ties).';
COMMENT ON COLUMN neuron_stats.max_pos IS 'Position of the largest value.';
COMMENT ON COLUMN neuron_stats.min IS 'Smallest value (NULL in runs captured before it was kept).';
COMMENT ON COLUMN neuron_stats.sum_cube IS 'Sum of value^3 over all tokens (third moment; unit_stats gives the skewness).';
COMMENT ON COLUMN neuron_stats.sum_quad IS 'Sum of value^4 over all tokens (fourth moment; unit_stats gives the kurtosis).';
COMMENT ON COLUMN neuron_stats.sum_pos IS 'Sum of max(value, 0) over all tokens: the positive part, selectivity''s denominator.';

CREATE TABLE unit_histograms (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    neuron INTEGER,
    bin SMALLINT,
    count BIGINT
);
COMMENT ON TABLE unit_histograms IS 'Per unit (reduction hist), exact counts of its values over ALL tokens on one fixed grid: quarter-octave bins for 2^-12 <= |value| < 2^12 plus end and near-zero bins (edges: whq_hist_lo/whq_hist_hi in queries/units.sql); empty bins are not stored.';
COMMENT ON COLUMN unit_histograms.neuron IS 'Unit index at the site.';
COMMENT ON COLUMN unit_histograms.bin IS 'Bin 0..195 in value order: 97 holds (-2^-12, 0], 98 holds (0, 2^-12); 0 and 195 the values beyond -4096 / 4096.';
COMMENT ON COLUMN unit_histograms.count IS 'Tokens whose value falls in the bin (padding excluded).';

CREATE TABLE neuron_examples (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    neuron INTEGER,
    kind VARCHAR,
    rank INTEGER,
    doc INTEGER,
    pos INTEGER,
    value FLOAT,
    quantile INTEGER,
    window_values FLOAT[]
);
COMMENT ON TABLE neuron_examples IS 'Per unit, exact over all tokens: the N strongest activations (kind top), the N most negative (kind bottom), a uniform sample of N firing tokens (kind random), a uniform sample of N 71-token windows where it never fires (kind nonfiring) and, with quantiles=Q, a uniform sample of up to N firing tokens from each of Q bins of its value distribution (kind quantile).';
COMMENT ON COLUMN neuron_examples.kind IS 'top (strongest first), bottom (most negative first; only values < 0, so a non-negative unit has none, nor do runs from before it), random (uniform sample of firing tokens), nonfiring (uniform sample, without replacement, of windows holding no firing of the unit: each model window''s tokens cut into 71-token blocks, the last block ending at its end; pos is the token 50 into the block, or the window''s last token in a shorter one, so window_values covers exactly the block) or quantile (uniform samples per quantile bin).';
COMMENT ON COLUMN neuron_examples.rank IS 'Order within kind: 0 is the strongest (kind bottom: the most negative; ties to the first token in document order) / first sampled; kind quantile runs through the bins in order.';
COMMENT ON COLUMN neuron_examples.window_values IS 'The unit''s own value at every token from 50 before to 20 after the example (71 values, stored as FLOAT16), captured with it; NULL where a token lies outside the example''s model window. NULL for older runs (and kind quantile of runs before quantile windows were kept).';
COMMENT ON COLUMN neuron_examples.quantile IS 'Kind quantile: the quantile bin (0 = lowest values; see quantile_examples); NULL for the other kinds.';
COMMENT ON COLUMN neuron_examples.neuron IS 'Unit index at the site.';
COMMENT ON COLUMN neuron_examples.pos IS 'Token position of the example in its document.';
COMMENT ON COLUMN neuron_examples.value IS 'The unit''s activation at that token.';

CREATE TABLE neuron_logits (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    neuron INTEGER,
    direction VARCHAR,
    rank INTEGER,
    token_id INTEGER,
    token VARCHAR,
    logit FLOAT,
    text VARCHAR
);
COMMENT ON TABLE neuron_logits IS 'Logit lens of each MLP unit''s output direction W_U . W_down[:, n], or of a dictionary latent''s decoder row W_U . (g * W_dec[n]) with g the final norm''s weight: top and bottom tokens.';
COMMENT ON COLUMN neuron_logits.direction IS 'top (most promoted) or bottom (most suppressed).';
COMMENT ON COLUMN neuron_logits.neuron IS 'Unit index at the site.';
COMMENT ON COLUMN neuron_logits.rank IS '0 is the most promoted (top) or most suppressed (bottom) token.';
COMMENT ON COLUMN neuron_logits.token_id IS 'Vocabulary id.';
COMMENT ON COLUMN neuron_logits.token IS 'The token as text.';
COMMENT ON COLUMN neuron_logits.text IS 'The token as the tokenizer decodes it alone (see tokens.text), for display.';
COMMENT ON COLUMN neuron_logits.logit IS 'Logit contribution of a unit activation of 1 (W_U . W_down[:, n]).';

CREATE TABLE unit_neighbors (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    neuron INTEGER,
    rank INTEGER,
    other INTEGER,
    cosine FLOAT
);
COMMENT ON TABLE unit_neighbors IS 'Per MLP unit (reduction similar=K): the K other units of its layer whose output directions (columns of the down projection W_down[:, n]) have the highest cosine with its own.';
COMMENT ON COLUMN unit_neighbors.neuron IS 'Unit index at the site.';
COMMENT ON COLUMN unit_neighbors.rank IS '0 is the most similar unit (ties: lower unit id first).';
COMMENT ON COLUMN unit_neighbors.other IS 'The similar unit''s index.';
COMMENT ON COLUMN unit_neighbors.cosine IS 'Cosine of the two units'' output directions.';

CREATE TABLE unit_coactivations (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    neuron INTEGER,
    rank INTEGER,
    other INTEGER,
    n_shared BIGINT,
    jaccard DOUBLE,
    kept INTEGER
);
COMMENT ON TABLE unit_coactivations IS 'Precomputed at commit from token_neurons (warehouse/indexes.py): per unit, the K other units of its layer with the highest Jaccard index of the sets of tokens where each is stored above the site threshold (similar_units, kind coactivation, reads them). A layer whose stored rows average more than 64 units a token (a threshold capture of a dense site) keeps none.';
COMMENT ON COLUMN unit_coactivations.neuron IS 'Unit index at the site.';
COMMENT ON COLUMN unit_coactivations.rank IS '0 is the most similar unit (ties: lower unit id first); only units sharing at least one token are kept.';
COMMENT ON COLUMN unit_coactivations.other IS 'The co-activating unit''s index.';
COMMENT ON COLUMN unit_coactivations.n_shared IS 'Tokens where both are stored above the threshold.';
COMMENT ON COLUMN unit_coactivations.jaccard IS 'n_shared / (tokens of the unit + tokens of the other - n_shared).';
COMMENT ON COLUMN unit_coactivations.kept IS 'K: how many were kept per unit (a unit sharing tokens with fewer units has fewer rows).';

CREATE TABLE token_units (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    token_id INTEGER,
    neuron INTEGER,
    n_fired BIGINT,
    value_sum DOUBLE
);
COMMENT ON TABLE token_units IS 'Token index, precomputed at commit from tokens and token_neurons (warehouse/indexes.py): per token id and unit, its rows above the site threshold at the tokens with that id (units_for_token reads it).';
COMMENT ON COLUMN token_units.token_id IS 'Vocabulary id (see tokens.token_id, vocabulary).';
COMMENT ON COLUMN token_units.neuron IS 'Unit index at the site.';
COMMENT ON COLUMN token_units.n_fired IS 'Tokens with this id where the unit is stored above the threshold.';
COMMENT ON COLUMN token_units.value_sum IS 'Sum of the unit''s values there.';

CREATE TABLE vocabulary (
    run_id VARCHAR,
    token_id INTEGER,
    piece VARCHAR,
    text VARCHAR,
    n_tokens BIGINT
);
COMMENT ON TABLE vocabulary IS 'Precomputed at commit from tokens (warehouse/indexes.py): one row per token id the run saw.';
COMMENT ON COLUMN vocabulary.token_id IS 'Vocabulary id.';
COMMENT ON COLUMN vocabulary.piece IS 'The token as text (see tokens.piece).';
COMMENT ON COLUMN vocabulary.text IS 'The token as the tokenizer decodes it alone (see tokens.text); NULL in runs captured before it was kept.';
COMMENT ON COLUMN vocabulary.n_tokens IS 'Token positions of the run with this id.';

CREATE TABLE vectors (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    doc INTEGER,
    step INTEGER,
    pos INTEGER,
    pool VARCHAR,
    vec FLOAT[]
);
COMMENT ON TABLE vectors IS 'Dense vectors: the document mean (pool mean), the last token (pool last) or every token (pool token, opt-in via dense).';
COMMENT ON COLUMN vectors.step IS 'Generation step for scenario captures (0 = prefill); NULL for plain documents.';
COMMENT ON COLUMN vectors.pos IS 'Token position (last token for pool last; NULL for pool mean).';
COMMENT ON COLUMN vectors.pool IS 'mean, last or token.';
COMMENT ON COLUMN vectors.vec IS 'The vector, one value per unit of the site.';

CREATE TABLE steps (
    run_id VARCHAR,
    doc INTEGER,
    step INTEGER,
    kind VARCHAR,
    input_token_ids INTEGER[],
    input_tokens VARCHAR[],
    generated_token_id INTEGER,
    generated_token VARCHAR,
    argmax_id INTEGER,
    argmax_logprob FLOAT,
    top_ids INTEGER[],
    top_tokens VARCHAR[],
    top_logprobs FLOAT[]
);
COMMENT ON TABLE steps IS 'Generation: one row per forward pass (step 0 = prefill), with the chosen token and the top-k candidates.';
COMMENT ON COLUMN steps.kind IS 'prefill or decode.';
COMMENT ON COLUMN steps.argmax_logprob IS 'Log-probability of the argmax token.';
COMMENT ON COLUMN steps.step IS 'Forward pass number: 0 is the prefill over the prompt, then one per generated token.';
COMMENT ON COLUMN steps.input_token_ids IS 'Token ids fed to this forward pass.';
COMMENT ON COLUMN steps.input_tokens IS 'The same tokens as text.';
COMMENT ON COLUMN steps.generated_token_id IS 'Token chosen at this step (sampled or greedy).';
COMMENT ON COLUMN steps.generated_token IS 'The chosen token as text.';
COMMENT ON COLUMN steps.argmax_id IS 'Most probable next token.';
COMMENT ON COLUMN steps.top_ids IS 'Top-k candidate token ids, most probable first.';
COMMENT ON COLUMN steps.top_tokens IS 'Top-k candidates as text.';
COMMENT ON COLUMN steps.top_logprobs IS 'Log-probabilities of the top-k candidates.';

CREATE TABLE logit_lens (
    run_id VARCHAR,
    doc INTEGER,
    step INTEGER,
    pos INTEGER,
    layer INTEGER,
    top_ids INTEGER[],
    top_tokens VARCHAR[],
    top_logprobs FLOAT[],
    argmax_logprob FLOAT,
    kl_from_final DOUBLE
);
COMMENT ON TABLE logit_lens IS 'Each layer''s residual stream through the final norm and unembedding: top tokens and KL(final || layer).';
COMMENT ON COLUMN logit_lens.kl_from_final IS 'KL divergence of this layer''s next-token distribution from the final layer''s.';
COMMENT ON COLUMN logit_lens.step IS 'Generation step (0 = prefill).';
COMMENT ON COLUMN logit_lens.pos IS 'Token position read (the last token of the step).';
COMMENT ON COLUMN logit_lens.top_ids IS 'Top-k token ids of this layer''s distribution.';
COMMENT ON COLUMN logit_lens.top_tokens IS 'Top-k tokens as text.';
COMMENT ON COLUMN logit_lens.top_logprobs IS 'Their log-probabilities.';
COMMENT ON COLUMN logit_lens.argmax_logprob IS 'Log-probability of this layer''s argmax token.';

CREATE TABLE dictionaries (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    path VARCHAR,
    kind VARCHAR,
    format VARCHAR,
    architecture VARCHAR,
    encode_dtype VARCHAR,
    sha256 VARCHAR,
    d_in INTEGER,
    d_sae INTEGER,
    d_out INTEGER,
    n_tokens BIGINT,
    l0_sum BIGINT,
    n_dead INTEGER,
    n_dense INTEGER,
    sq_error DOUBLE,
    total_variance DOUBLE,
    cosine_sum DOUBLE,
    n_predicted BIGINT,
    ce_clean_sum DOUBLE,
    ce_spliced_sum DOUBLE
);
COMMENT ON TABLE dictionaries IS 'One row per layer of each dictionary site (SITE+sae=PATH, named KIND.SITE): which dictionary encoded it, and exact sums over ALL tokens of the run (accumulated on the device) that dictionary_quality(run) turns into L0, dead/dense share, MSE, FVU, cosine and delta loss.';
COMMENT ON COLUMN dictionaries.path IS 'This layer''s dictionary: its folder or file (an adapter: dict.py[:checkpoint]).';
COMMENT ON COLUMN dictionaries.kind IS 'sae (reconstructs its input) or transcoder (reads mlp.in, reconstructs the MLP output).';
COMMENT ON COLUMN dictionaries.format IS 'saelens, sparsify, gemmascope or adapter.';
COMMENT ON COLUMN dictionaries.architecture IS 'How latents are encoded: relu, gated, jumprelu (SAELens batchtopk included) or topk; an adapter''s own name.';
COMMENT ON COLUMN dictionaries.encode_dtype IS 'Dtype the dictionary ran in on the device: float32, or the site''s encode_dtype (bfloat16, float16).';
COMMENT ON COLUMN dictionaries.sha256 IS 'sha256 of the weights file (an adapter: of its .py file).';
COMMENT ON COLUMN dictionaries.d_in IS 'Width of the activation the dictionary encodes.';
COMMENT ON COLUMN dictionaries.d_sae IS 'Number of latents.';
COMMENT ON COLUMN dictionaries.d_out IS 'Width of the reconstruction target (d_in for an SAE, the MLP output for a transcoder).';
COMMENT ON COLUMN dictionaries.n_tokens IS 'Token positions encoded (padding excluded).';
COMMENT ON COLUMN dictionaries.l0_sum IS 'Non-zero latents summed over all tokens.';
COMMENT ON COLUMN dictionaries.n_dead IS 'Latents never non-zero on any token.';
COMMENT ON COLUMN dictionaries.n_dense IS 'Latents non-zero on more than 10% of tokens.';
COMMENT ON COLUMN dictionaries.sq_error IS 'Sum over tokens of |reconstruction - target|^2 (NULL for an adapter without decode or an encode_only site, as are total_variance and cosine_sum).';
COMMENT ON COLUMN dictionaries.total_variance IS 'Sum over tokens of |target - mean target|^2.';
COMMENT ON COLUMN dictionaries.cosine_sum IS 'Sum over tokens of the cosine of reconstruction to target.';
COMMENT ON COLUMN dictionaries.n_predicted IS '--splice: next-token predictions scored (both tokens real); NULL without --splice.';
COMMENT ON COLUMN dictionaries.ce_clean_sum IS '--splice: summed next-token cross-entropy of the unchanged model.';
COMMENT ON COLUMN dictionaries.ce_spliced_sum IS '--splice: the same with this layer''s reconstruction in place of its activation (a transcoder''s: of the MLP output).';

-- Explanations and scores (explain/, docs/explain.md): committed into the unit's run, atomically,
-- by `whq explain` / `whq score`; removed with the run.

CREATE TABLE explanations (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    neuron INTEGER,
    explanation_id VARCHAR,
    explainer VARCHAR,
    model VARCHAR,
    text VARCHAR,
    parsed BOOLEAN,
    settings JSON,
    prompt_hash VARCHAR,
    embedding FLOAT[],
    created_at TIMESTAMP
);
COMMENT ON TABLE explanations IS 'One row per explained unit and recipe (whq explain): the explanation text, which explainer and model wrote it, with which settings; its examples are in explanation_examples (scorer NULL).';
COMMENT ON COLUMN explanations.neuron IS 'Unit index at the site.';
COMMENT ON COLUMN explanations.explanation_id IS 'sha256 (16 hex digits) of run, site, layer, unit, explainer, model and settings: the same recipe gives the same id.';
COMMENT ON COLUMN explanations.explainer IS 'delphi (delphi''s default), contrastive (delphi''s, with non-activating examples), openai (OpenAI''s token-activation pairs), top-tokens (no model), or neuronpedia:<typeName> (read by whq import explanations from Neuronpedia''s export; its fields kept in settings.neuronpedia).';
COMMENT ON COLUMN explanations.model IS 'The model that wrote it: openai:MODEL, hf:PATH_OR_CONFIG or top-tokens (never a URL''s credentials or a key).';
COMMENT ON COLUMN explanations.text IS 'The explanation; NULL when the answer was out of form (see parsed; the answer is in model_calls).';
COMMENT ON COLUMN explanations.parsed IS 'false when the model''s answer held no [EXPLANATION]: line (the explanation is not scored).';
COMMENT ON COLUMN explanations.settings IS 'The recipe''s settings as JSON: example counts, seed, normalisation (ceil = delphi, floor = OpenAI), non-activating sources, sampling.';
COMMENT ON COLUMN explanations.prompt_hash IS 'request_hash of the model call (model_calls) that wrote it; NULL for top-tokens.';
COMMENT ON COLUMN explanations.embedding IS 'MiniLM (all-MiniLM-L6-v2) sentence embedding of the text, L2-normalised: search_explanations ranks by its cosine with a query''s.';
COMMENT ON COLUMN explanations.created_at IS 'UTC time the explanation was committed.';

CREATE TABLE explanation_examples (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    neuron INTEGER,
    explanation_id VARCHAR,
    scorer VARCHAR,
    model VARCHAR,
    role VARCHAR,
    source VARCHAR,
    doc INTEGER,
    pos INTEGER,
    quantile INTEGER,
    truth BOOLEAN,
    value FLOAT,
    prediction DOUBLE,
    probability DOUBLE,
    correct BOOLEAN,
    parsed BOOLEAN,
    request_hash VARCHAR,
    true_values FLOAT[],
    predicted_values FLOAT[]
);
COMMENT ON TABLE explanation_examples IS 'Every example an explanation was written from (scorer NULL, role explain or non-activating) and every example a scorer tested it on, with the verdict: explanation and test examples of a unit are disjoint by construction (a query can check it).';
COMMENT ON COLUMN explanation_examples.neuron IS 'Unit index at the site.';
COMMENT ON COLUMN explanation_examples.explanation_id IS 'The explanation (explanations.explanation_id).';
COMMENT ON COLUMN explanation_examples.scorer IS 'NULL for the explainer''s own examples; else detection, fuzz, simulation, embedding or intruder.';
COMMENT ON COLUMN explanation_examples.model IS 'The model that judged (as scores.model); NULL for the explainer''s examples.';
COMMENT ON COLUMN explanation_examples.role IS 'explain (shown to the explainer), test (an activating held-out example) or non-activating.';
COMMENT ON COLUMN explanation_examples.source IS 'Where the window came from: top, quantile, random (the unit''s stored examples), non-firing, neighbours or similar (non-activating; similar = MiniLM-nearest to the top examples; a trailing ~ marks a top-k capture where the unit may fire unstored).';
COMMENT ON COLUMN explanation_examples.doc IS 'Document of the example (documents.doc).';
COMMENT ON COLUMN explanation_examples.pos IS 'The example token''s position (the firing token; for a non-activating window its centre).';
COMMENT ON COLUMN explanation_examples.quantile IS 'Quantile bin of a kind-quantile example; NULL otherwise.';
COMMENT ON COLUMN explanation_examples.truth IS 'true for an activating example, false for a non-activating one.';
COMMENT ON COLUMN explanation_examples.value IS 'The unit''s value at pos (0 for non-activating windows).';
COMMENT ON COLUMN explanation_examples.prediction IS 'The scorer''s verdict: detection/fuzz 1 or 0; embedding the cosine similarity; intruder 1 where the model picked this window as the intruder; simulation the predicted value at pos; NULL when unparsable or for the explainer''s examples.';
COMMENT ON COLUMN explanation_examples.probability IS 'detection/fuzz: P(1)/(P(0)+P(1)) from the answer''s log-probabilities, where the backend returned them; NULL otherwise.';
COMMENT ON COLUMN explanation_examples.correct IS 'Whether the verdict was right (detection/fuzz: prediction = truth; intruder: the trial''s intruder was found); NULL when unparsable or not a yes/no verdict.';
COMMENT ON COLUMN explanation_examples.parsed IS 'false when the model''s answer for this example was out of form (stored and counted, never guessed).';
COMMENT ON COLUMN explanation_examples.request_hash IS 'The model call that judged it (model_calls.request_hash); NULL for embedding and the explainer''s examples.';
COMMENT ON COLUMN explanation_examples.true_values IS 'simulation: the unit''s true value at each shown token (non-activating windows: 0).';
COMMENT ON COLUMN explanation_examples.predicted_values IS 'simulation: the expected value over the answers 0..10 at each shown token.';

CREATE TABLE scores (
    run_id VARCHAR,
    site VARCHAR,
    layer INTEGER,
    neuron INTEGER,
    explanation_id VARCHAR,
    scorer VARCHAR,
    model VARCHAR,
    metric VARCHAR,
    value DOUBLE,
    n_examples INTEGER,
    n_unparsable INTEGER,
    settings JSON,
    created_at TIMESTAMP
);
COMMENT ON TABLE scores IS 'One row per explanation, scorer and metric (whq score), computed per unit from its rows in explanation_examples as delphi and OpenAI define them.';
COMMENT ON COLUMN scores.neuron IS 'Unit index at the site.';
COMMENT ON COLUMN scores.explanation_id IS 'The explanation scored (explanations.explanation_id).';
COMMENT ON COLUMN scores.scorer IS 'detection, fuzz, simulation, embedding or intruder; neuronpedia:<explanationScoreTypeName> for a score read by whq import explanations (metric value).';
COMMENT ON COLUMN scores.model IS 'The model that judged (embedding: minilm).';
COMMENT ON COLUMN scores.metric IS 'detection/fuzz: balanced_accuracy, precision, recall, f1, auc; simulation: ev_correlation (all examples, non-activating as zeros) and ev_correlation_q<N> / ev_correlation_top / ev_correlation_random (activating examples of one group); embedding: auc; intruder: accuracy.';
COMMENT ON COLUMN scores.value IS 'The metric''s value (NULL where undefined: an AUC without both classes or without probabilities).';
COMMENT ON COLUMN scores.n_examples IS 'Examples (intruder: trials) the metric was computed over, unparsable ones excluded.';
COMMENT ON COLUMN scores.n_unparsable IS 'Examples whose answer was out of form.';
COMMENT ON COLUMN scores.settings IS 'The scorer''s settings as JSON (examples per prompt, counts, seed, normalisation).';
COMMENT ON COLUMN scores.created_at IS 'UTC time the score was committed.';

CREATE TABLE model_calls (
    run_id VARCHAR,
    request_hash VARCHAR,
    model VARCHAR,
    request JSON,
    response JSON,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_s DOUBLE,
    created_at TIMESTAMP
);
COMMENT ON TABLE model_calls IS 'The model-call cache: every request whq explain/score sent, with its answer; a rerun or a resumed run answers from here and pays nothing. Never holds an API key.';
COMMENT ON COLUMN model_calls.request_hash IS 'sha256 of the canonical request JSON (model, messages, sampling settings, seed): the cache key.';
COMMENT ON COLUMN model_calls.model IS 'The model asked (as in explanations.model).';
COMMENT ON COLUMN model_calls.request IS 'The canonical request JSON: exactly what was asked.';
COMMENT ON COLUMN model_calls.response IS 'The answer: text, and where returned the tokens with their log-probabilities (or the distributions at a forced answer''s places).';
COMMENT ON COLUMN model_calls.prompt_tokens IS 'Prompt tokens as the backend counted them.';
COMMENT ON COLUMN model_calls.completion_tokens IS 'Generated tokens.';
COMMENT ON COLUMN model_calls.latency_s IS 'Seconds the call took, retries excluded.';
COMMENT ON COLUMN model_calls.created_at IS 'UTC time of the call.';

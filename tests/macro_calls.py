"""Calls of every table macro on two warehouses, shared by the engine parity tests.

MINILM_CALLS run on the minilm_wh fixture (run 'r': mlp.act topk=8,examples=5; mlp.up nag=6;
resid.out last), TINY_CALLS on the warehouse `build_tiny_warehouse` writes. Placeholders in
braces are filled from `placeholder_values`.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import dictionaries
from .scenario_yaml import scenario_dict, write_yaml

MINILM_CALLS = {
    "firing_rate": ["SELECT * FROM firing_rate('r', 'mlp.act', 3)"],
    "layer_summary": ["SELECT * FROM layer_summary('r', 'mlp.act')", "SELECT * FROM layer_summary('r', 'mlp.up')"],
    "selectivity": ["SELECT * FROM selectivity('r', 'mlp.act', 3)"],
    "rate_histogram": ["SELECT * FROM rate_histogram('r', 'mlp.act', 3, bins := 10)"],
    "selectivity_histogram": [
        "SELECT * FROM selectivity_histogram('r', 'mlp.act', 5)",
        "SELECT * FROM selectivity_histogram('r', 'mlp.act', 5, bins := 12, log := true)",
    ],
    "top_contexts": ["SELECT * FROM top_contexts('r', 'mlp.act', 3, {neuron}, k := 3)"],
    "bottom_contexts": ["SELECT * FROM bottom_contexts('r', 'mlp.act', 3, {neuron}, k := 3)"],
    "random_examples": ["SELECT * FROM random_examples('r', 'mlp.act', 3, {neuron}, n := 4, seed := 1)"],
    "whq_examples": ["SELECT * FROM whq_examples('r', 'mlp.act', 2, NULL, 'top', 2, 3, 2, 0)"],
    "whq_examples_by_kind": [
        "SELECT * FROM whq_examples_by_kind('r', 'mlp.act', 2, NULL, MAP(['top', 'random'], [2, 3]), 3, 2, 0)"
    ],
    "activation_frequency": ["SELECT * FROM activation_frequency('r', 'mlp.act')"],
    "activation_frequency_by_dataset": ["SELECT * FROM activation_frequency_by_dataset('r', 'mlp.act')"],
    "neuron_contexts_bytes": ["SELECT * FROM neuron_contexts_bytes('r', 'mlp.act', 3, {neuron})"],
}
TINY_CALLS = {
    "whq_scenario_vectors": ["SELECT * EXCLUDE (vec) FROM whq_scenario_vectors('chat')"],
    "whq_scenario_states": ["SELECT source, layer, doc, step, top FROM whq_scenario_states('chat')"],
    "whq_ref_pairs": ["SELECT * FROM whq_ref_pairs('chat')"],
    "ref_similarity": [
        "SELECT * FROM ref_similarity('chat')",
        "SELECT * FROM ref_similarity('chat', source := 'mlp_out')",
    ],
    "ref_summary": ["SELECT * FROM ref_summary('chat')"],
    "ref_by_role": ["SELECT * FROM ref_by_role('chat')"],
    "drift": ["SELECT * FROM drift('chat')"],
    "run_compare": ["SELECT * FROM run_compare('chat', 'again')"],
    "cross_layer_cosine": ["SELECT * FROM cross_layer_cosine('chat', '{doc_id}')"],
    "neuron_trajectory": [
        "SELECT * FROM neuron_trajectory('chat', 'hidden_out', 1, 7)",
        "SELECT * FROM neuron_trajectory('chat', 'mlp.act', 0, {chat_neuron})",
    ],
    "residual_decomposition": ["SELECT * FROM residual_decomposition('chat')"],
    "neuron_logit_lens": ["SELECT * FROM neuron_logit_lens('lm2', 'mlp.act', 1, 5)"],
    "nag_profile": [
        "SELECT * FROM nag_profile('lm2', 'mlp.up', target_dataset := 'animals', layers := [1, 3], power := 0.5)"
    ],
    "nag_unit_weights": [
        "SELECT * FROM nag_unit_weights('lm2', 'lm2', 'mlp.up', target_dataset := 'animals', power := 0.5)"
    ],
    "nag_distance": [
        "SELECT * FROM nag_distance('lm2', 'lm2', 'mlp.up', target_dataset := 'animals', pool_dataset := 'finance')",
        "SELECT * FROM nag_distance('lm2', 'lm2', 'mlp.up', layers := [0, 0, 2])",
    ],
    "nag_select": ["SELECT * FROM nag_select('lm2', 'lm2', 'mlp.up', target_dataset := 'finance', fraction := 0.5)"],
    "nag_quality": [
        "SELECT * FROM nag_quality('lm2', 'lm2', 'mlp.up', 'score', target_dataset := 'animals', fraction := 0.6, invert := true)"
    ],
    "dictionary_quality": ["SELECT * FROM dictionary_quality('lm2')"],
    "unit_stats": ["SELECT * FROM unit_stats('lm2', 'mlp.act', 1)"],
    "unit_histogram": ["SELECT * FROM unit_histogram('lm2', 'mlp.act', 1, 5)"],
    "units_for_token": ["SELECT * FROM units_for_token('lm2', 'mlp.act', 't')"],
    "similar_units": [
        "SELECT * FROM similar_units('lm2', 'mlp.act', 1, 5)",
        "SELECT * FROM similar_units('lm2', 'mlp.act', 1, 5, k := 40)",  # above the 32 stored: computed
    ],
    "quantile_examples": ["SELECT * FROM quantile_examples('lm2', 'mlp.act', 1, 5)"],
}


def build_tiny_warehouse(folder: Path, tiny_lm_dir: Path) -> Path:
    """The tiny causal LM: two greedy runs of a short chat scenario ('chat', 'again') and a plain
    run 'lm2' over two datasets with a numeric meta column, NAG, the neuron logit lens, unit data (hist, quantiles,
    similar) and an SAE site; returns the warehouse folder (folder/wh)."""
    from ingest.chat import run_scenario
    from ingest.pipeline import ingest

    path = write_yaml(
        folder / "s.yaml",
        scenario_dict(
            str(tiny_lm_dir),
            name="spark_parity",
            generation={"max_new_tokens": 3, "do_sample": False, "seed": 7},
            capture={"top_k_probs": 3, "sites": ["mlp.act:topk=8"]},
        ),
    )
    for run_id in ("chat", "again"):
        run_scenario(folder / "wh", path, run_id=run_id, progress=False)

    texts = [
        "The cat sat on the mat.",
        "Dogs bark at night.",
        "Stocks fell sharply today.",
        "The market rallied.",
        "A cat and a dog.",
        "Bonds and stocks.",
        "",
        "Night falls on the city.",
    ]
    with open(folder / "pool.jsonl", "w") as fh:
        for i, text in enumerate(texts):
            record = {"doc_id": f"x{i}", "text": text, "dataset": "animals" if i % 2 == 0 else "finance"}
            if i != 3:  # one document without a quality score
                record["score"] = round(0.1 * i + 0.05, 2)
            fh.write(json.dumps(record) + "\n")
    sae = dictionaries.sparsify(folder / "sae" / "layers.1", k=4)
    ingest(
        folder / "wh",
        str(tiny_lm_dir),
        [str(folder / "pool.jsonl")],
        ["mlp.act:topk=8,examples=5,hist,quantiles=4,similar=5", "mlp.up:nag=6", f"resid.out+sae={sae.parent}:topk=4"],
        run_id="lm2",
        logit_lens=True,
        device="cpu",
        progress=False,
    )
    return folder / "wh"


def placeholder_values(wh, tiny_wh) -> dict:
    """A unit with stored examples (layer 3 of run 'r'), a generated document of run 'chat', and
    a unit in the top-k of the generation's last token in run 'chat' (so its trajectory has a value)."""
    neuron = wh.sql(
        "SELECT min(neuron) FROM neuron_examples WHERE run_id = 'r' AND layer = 3 AND kind = 'random'"
    ).fetchall()[0][0]
    doc_id = tiny_wh.sql("SELECT min(doc_id) FROM documents WHERE run_id = 'chat' AND role = 'generated'").fetchall()[
        0
    ][0]
    chat_neuron = tiny_wh.sql(
        "SELECT t.neuron FROM token_neurons t JOIN documents d ON d.run_id = t.run_id AND d.doc = t.doc WHERE t.run_id = 'chat' "
        "AND t.site = 'mlp.act' AND t.layer = 0 AND d.role = 'generated' ORDER BY t.pos DESC, t.neuron LIMIT 1"
    ).fetchall()[0][0]
    return {"neuron": neuron, "doc_id": doc_id, "chat_neuron": chat_neuron}

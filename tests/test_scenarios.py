"""Chat scenarios: parsing errors, the capture against plain hooks, metrics against numpy, SQL = Polars."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import warehouse
from queries import scenario_frames as sf
from warehouse.schema import SCENARIO_SOURCES as SOURCES

from . import dictionaries as dicts
from .cli_runner import run_cli
from .scenario_yaml import scenario_dict, write_yaml
from .test_dictionaries import _quality
from .test_unit_data import reference_hist

HIDDEN = 256  # k = H // 100 = 2 top units, so Jaccard is not trivially 0 or 1


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from ingest.models import tiny_causal_lm_dir

    return tiny_causal_lm_dir(tmp_path_factory.mktemp("models") / "tiny-qwen3-256", hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def scenario_wh(tmp_path_factory, lm_dir):
    """Two greedy runs of one scenario ('chat', 'again') and a shorter conversation ('short')."""
    from ingest.chat import run_scenario

    folder = tmp_path_factory.mktemp("scenario")
    root = folder / "wh"
    path = write_yaml(folder / "s.yaml", scenario_dict(str(lm_dir)))
    run_scenario(root, path, run_id="chat", progress=False)
    run_scenario(root, path, run_id="again", progress=False)
    short = scenario_dict(str(lm_dir))
    short["prompt"]["messages"] = short["prompt"]["messages"][:2]
    run_scenario(root, write_yaml(folder / "short.yaml", short), run_id="short", progress=False)
    return root


# -- parsing ---------------------------------------------------------------------


def _edit(data: dict, change) -> dict:
    change(data)
    return data


BAD_SCENARIOS = [
    (lambda d: d["prompt"]["messages"][1].update(role="robot"), "prompt.messages[1].role 'robot' is not a chat role"),
    (lambda d: d["reference_states"][1].pop("label"), "reference_states[1] has no label"),
    (lambda d: d["reference_states"][0].update(label="joy/bliss"), "no spaces or slashes"),
    (lambda d: d["reference_states"][2].update(label="joy"), "used twice"),
    (lambda d: d["generation"].update(max_new_tokens=0), "generation.max_new_tokens must be at least 1"),
    (lambda d: d["generation"].update(do_sample=True, temperature=0), "must be > 0 when do_sample"),
    (lambda d: d["generation"].update(top_p=1.5), "generation.top_p 1.5 must be in (0, 1]"),
    (lambda d: d["generation"].update(seed="abc"), "generation.seed must be a whole number"),
    (lambda d: d["capture"].update(store_dtype="int8"), "capture.store_dtype is 'int8'"),
    (lambda d: d["capture"].update(sources=["hidden_mid"]), "capture.sources has 'hidden_mid'"),
    (lambda d: d["capture"].update(layers=[0, 99]), "capture.layers has layer 99"),
    (lambda d: d["capture"].update(sites=["mlp.act:tpk=3"]), "did you mean 'topk'"),
    (lambda d: d["capture"].update(sites=["attn.q:topk=3,similar=2"]), "similar=K compares output directions"),
    (lambda d: d.update(generaton={}), "unknown key 'generaton': did you mean 'generation'?"),
    (lambda d: d.pop("name"), "missing 'name'"),
    (lambda d: d["prompt"].update(messages=[]), "prompt.messages must be a non-empty list"),
]


@pytest.mark.parametrize("change,message", BAD_SCENARIOS, ids=[m[:30] for _, m in BAD_SCENARIOS])
def test_bad_scenario_is_one_clear_line(change, message, tmp_path, capsys, monkeypatch):
    path = write_yaml(tmp_path / "bad.yaml", _edit(scenario_dict("config:qwen3-tiny"), change))
    code, _, err = run_cli(capsys, monkeypatch, "ingest", tmp_path / "wh", "--scenario", path, "-q", "--device", "cpu")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert message in lines[0], lines[0]


def test_bad_yaml_and_missing_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken.yaml").write_text("name: x\nprompt: [unclosed\n")
    for path, message in ((tmp_path / "broken.yaml", "not valid YAML"), (tmp_path / "nope.yaml", "does not exist")):
        code, _, err = run_cli(capsys, monkeypatch, "ingest", tmp_path / "wh", "--scenario", path, "-q")
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_activation_lab_defaults_and_flags():
    from ingest.scenario import parse

    spec = parse(
        {
            "name": "n",
            "model": {"id": "m"},
            "prompt": [{"messages": [{"role": "user", "content": "hi"}]}],
            "capture": {"qkv": False, "sources": None},
        }
    )
    assert spec.model.dtype == "float16" and spec.generation.max_new_tokens == 8 and spec.generation.seed == 42
    assert spec.capture.sources == ("hidden_in", "hidden_out", "mlp_out")
    assert spec.capture.store_dtype == "float16" and spec.capture.top_k_probs == 20 and spec.capture.layers is None
    assert parse(
        {
            "name": "n",
            "model": "m",
            "prompt": {"messages": [{"role": "user", "content": "hi"}]},
            "capture": {"sources": ["mlp_down_out"]},
        }
    ).capture.sources == ("mlp_out",)


# -- what the ingest wrote ---------------------------------------------------------
def test_documents_steps_and_sites(scenario_wh):
    wh = warehouse.open(scenario_wh)
    docs = wh.pl(
        "SELECT doc, doc_id, role, label, message_index, message_role FROM documents WHERE run_id = 'chat' ORDER BY doc"
    )
    assert docs["role"].to_list() == ["message"] * 4 + ["generated"] + ["reference"] * 3
    assert docs["message_role"].to_list()[:5] == ["system", "user", "assistant", "user", "user"]
    assert docs["label"].to_list()[5:] == ["joy", "fear", "calm"]
    steps = wh.pl("SELECT * FROM steps WHERE run_id = 'chat' ORDER BY step")
    assert steps["step"].to_list() == list(range(5)) and steps["kind"].to_list() == ["prefill"] + ["decode"] * 4
    assert steps["generated_token_id"].to_list() == steps["argmax_id"].to_list()  # greedy
    assert steps["input_token_ids"].to_list()[1:] == [[t] for t in steps["generated_token_id"].to_list()[:-1]]
    assert all(len(t) == 5 for t in steps["top_ids"].to_list())
    assert np.allclose(steps["argmax_logprob"].to_numpy(), [lp[0] for lp in steps["top_logprobs"].to_list()])
    sites = wh.pl("SELECT site, reductions, width FROM sites WHERE run_id = 'chat' ORDER BY site")
    assert set(sites["site"]) == {*SOURCES, "mlp.act"}
    counts = wh.pl("SELECT site, count(*) AS n FROM vectors WHERE run_id = 'chat' GROUP BY site")
    n_states = 4 + 5 + 3  # snapshots, generation steps, references
    assert dict(counts.iter_rows()) == {s: n_states * 4 for s in SOURCES}  # 4 layers each
    sparse_docs = wh.pl("SELECT DISTINCT doc FROM token_neurons WHERE run_id = 'chat' ORDER BY doc")["doc"].to_list()
    assert sparse_docs == [4, 5, 6, 7]  # the whole conversation and the references


def test_greedy_generation_is_reproducible(scenario_wh):
    wh = warehouse.open(scenario_wh)
    for table in ("steps", "vectors", "logit_lens", "token_neurons", "tokens", "documents"):
        a = wh.pl(f"SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = 'chat'")
        b = wh.pl(f"SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = 'again'")
        sortable = [c for c, t in a.schema.items() if not t.is_nested()]
        assert_frame_equal(a.sort(sortable), b.sort(sortable))


def test_seeded_sampling_is_reproducible(tmp_path, lm_dir):
    from ingest.chat import run_scenario

    data = scenario_dict(
        str(lm_dir),
        generation={"max_new_tokens": 6, "do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "seed": 3},
    )
    data["reference_states"], data["capture"] = [], {"sources": ["hidden_out"], "logit_lens": 0, "top_k_probs": 3}
    path = write_yaml(tmp_path / "sample.yaml", data)
    for run in ("s1", "s2"):
        run_scenario(tmp_path / "wh", path, run_id=run, progress=False)
    wh = warehouse.open(tmp_path / "wh")
    tokens = [
        wh.pl(f"SELECT generated_token_id FROM steps WHERE run_id = '{r}' ORDER BY step")[
            "generated_token_id"
        ].to_list()
        for r in ("s1", "s2")
    ]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 6
    assert wh.sql("SELECT count(*) FROM logit_lens").fetchall()[0][0] == 0


def test_vectors_match_plain_hooks(scenario_wh, lm_dir):
    """Snapshots and references: the stored last-token vectors are the model's, rounded to float16."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.reference import dense_activations

    wh = warehouse.open(scenario_wh)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    ids = wh.pl("SELECT doc, list(token_id ORDER BY pos) AS ids FROM tokens WHERE run_id = 'chat' GROUP BY doc")
    windows = {doc: [tokens] for doc, tokens in ids.iter_rows() if doc != 4}
    modules = {
        "hidden_in": ("model.layers.{}", "in"),
        "hidden_out": ("model.layers.{}", "out"),
        "attn_out": ("model.layers.{}.self_attn.o_proj", "out"),
        "mlp_out": ("model.layers.{}.mlp.down_proj", "out"),
    }
    stored = wh.pl("SELECT site, layer, doc, vec FROM vectors WHERE run_id = 'chat' AND step = 0")
    checked = 0
    for source, (name, hook) in modules.items():
        for layer in (0, 3):
            dense = dense_activations(model, name.format(layer), hook, windows)
            rows = stored.filter((stored["site"] == source) & (stored["layer"] == layer))
            for doc, vec in zip(rows["doc"], rows["vec"]):
                if doc in dense:
                    expected = torch.tensor(dense[doc][-1]).to(torch.float16).float().numpy()
                    np.testing.assert_allclose(np.array(vec), expected, rtol=2e-3, atol=1e-5)
                    checked += 1
    assert checked == 2 * 4 * 7


def test_logit_lens_final_layer_matches_the_steps(scenario_wh):
    wh = warehouse.open(scenario_wh)
    lens = wh.pl(
        "SELECT step, top_ids[1] AS top, argmax_logprob, kl_from_final FROM logit_lens "
        "WHERE run_id = 'chat' AND doc = 4 AND layer = 3 ORDER BY step"
    )
    steps = wh.pl("SELECT argmax_id, argmax_logprob FROM steps WHERE run_id = 'chat' ORDER BY step")
    assert lens["top"].to_list() == steps["argmax_id"].to_list()
    np.testing.assert_allclose(lens["argmax_logprob"].to_numpy(), steps["argmax_logprob"].to_numpy(), rtol=1e-4)
    assert lens["kl_from_final"].max() < 1e-5
    assert wh.sql("SELECT min(kl_from_final) >= 0, count(*) FROM logit_lens WHERE run_id = 'chat'").fetchall()[0] == (
        True,
        (4 + 5 + 3) * 4,
    )


# -- metrics against numpy -----------------------------------------------------------
def _numpy_states(root, run: str) -> dict:
    """{(source, layer, doc, step): float64 vector} from the raw Parquet parts."""
    wh = warehouse.open(root)
    states = {}
    for path in wh.files("vectors", run):
        source = path.parent.parent.name.split("=", 1)[1]
        layer = int(path.parent.name.split("=", 1)[1])
        table = pq.read_table(path).to_pydict()
        for doc, step, vec in zip(table["doc"], table["step"], table["vec"]):
            states[(source, layer, doc, step)] = np.asarray(vec, dtype=np.float64)
    return states


def cosine(a, b):
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


def mae(a, b):
    return float(np.abs(a - b).mean())


def jaccard(a, b):
    k = max(1, len(a) // 100)
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def test_ref_similarity_matches_numpy(scenario_wh):
    wh = warehouse.open(scenario_wh)
    states = _numpy_states(scenario_wh, "chat")
    docs = {doc_id: doc for doc, doc_id in wh.sql("SELECT doc, doc_id FROM documents WHERE run_id = 'chat'").fetchall()}
    refs = {label: docs[f"reference:{label}"] for label in ("joy", "fear", "calm")}
    for source in SOURCES:
        got = wh.pl(f"SELECT * FROM ref_similarity('chat', source := '{source}')")
        assert got.height == (4 + 1) * 3 * 4  # (snapshots + the generation's final step) x references x layers
        for row in got.iter_rows(named=True):
            doc = docs[row["doc_id"]]
            step = 4 if row["role"] == "generated" else 0
            a, b = states[(source, row["layer"], doc, step)], states[(source, row["layer"], refs[row["label"]], 0)]
            np.testing.assert_allclose(
                [row["cosine"], row["mae"], row["jaccard"]], [cosine(a, b), mae(a, b), jaccard(a, b)], rtol=1e-6
            )
    jaccards = wh.pl("SELECT DISTINCT jaccard FROM ref_similarity('chat')")["jaccard"].to_list()
    assert set(jaccards) <= {0.0, 1 / 3, 1.0} and len(jaccards) > 1


def test_summaries_drift_and_decomposition_match_numpy(scenario_wh):
    wh = warehouse.open(scenario_wh)
    states = _numpy_states(scenario_wh, "chat")
    sim = wh.pl("SELECT * FROM ref_similarity('chat', source := 'attn_out')").filter(
        ~wh.pl("SELECT role = 'generated' AS g FROM ref_similarity('chat', source := 'attn_out')")["g"]
    )
    summary = wh.pl("SELECT * FROM ref_summary('chat') WHERE source = 'attn_out' AND label = 'fear'").row(0, named=True)
    values = sim.filter(sim["label"] == "fear")
    for metric in ("cosine", "mae", "jaccard"):
        column = values[metric].to_numpy()
        np.testing.assert_allclose(
            [summary[f"mean_{metric}"], summary[f"std_{metric}"], summary[f"median_{metric}"]],
            [column.mean(), column.std(), np.median(column)],
            rtol=1e-6,
            atol=1e-12,
        )
    drift = wh.pl("SELECT * FROM drift('chat') WHERE source = 'hidden_out' ORDER BY layer")
    expected = [cosine(states[("hidden_out", layer, 4, 0)], states[("hidden_out", layer, 4, 4)]) for layer in range(4)]
    np.testing.assert_allclose(drift["cosine"].to_numpy(), expected, rtol=1e-6)
    assert drift["most_divergent_layer"].unique().to_list() == [int(np.argmin(expected))]
    rd = wh.pl(
        "SELECT * FROM residual_decomposition('chat') WHERE doc_id = 'generated:03:user' AND step = 2 ORDER BY layer"
    )
    for row in rd.iter_rows(named=True):
        key = lambda s, layer=row["layer"]: states[(s, layer, 4, 2)]  # noqa: E731
        update = key("hidden_out") - key("hidden_in")
        np.testing.assert_allclose(
            [
                row["hidden_in_norm"],
                row["attn_out_norm"],
                row["mlp_out_norm"],
                row["hidden_out_norm"],
                row["attn_cosine"],
                row["mlp_cosine"],
            ],
            [np.linalg.norm(key(s)) for s in SOURCES[:1] + ("attn_out", "mlp_out", "hidden_out")]
            + [cosine(key("attn_out"), update), cosine(key("mlp_out"), update)],
            rtol=1e-6,
        )
    cross = wh.pl("SELECT * FROM cross_layer_cosine('chat', 'reference:joy', 'hidden_out')")
    assert cross.height == 16
    for row in cross.iter_rows(named=True):
        expected = cosine(states[("hidden_out", row["layer_a"], 5, 0)], states[("hidden_out", row["layer_b"], 5, 0)])
        np.testing.assert_allclose(row["cosine"], expected, rtol=1e-6)


def test_run_compare_and_trajectory(scenario_wh):
    wh = warehouse.open(scenario_wh)
    same = wh.pl("SELECT * FROM run_compare('chat', 'again')")
    assert same.height == 2 * 4 * 4 and np.allclose(same["cosine"], 1.0) and (same["mae"] == 0).all()
    states, short = _numpy_states(scenario_wh, "chat"), _numpy_states(scenario_wh, "short")
    other = wh.pl(
        "SELECT * FROM run_compare('chat', 'short') WHERE source = 'mlp_out' AND state = 'final' ORDER BY layer"
    )
    np.testing.assert_allclose(
        other["mae"].to_numpy(),
        [mae(states[("mlp_out", layer, 4, 4)], short[("mlp_out", layer, 2, 4)]) for layer in range(4)],
        rtol=1e-6,
    )
    trajectory = wh.pl("SELECT * FROM neuron_trajectory('chat', 'hidden_out', 2, 17)")
    np.testing.assert_allclose(
        trajectory["value"].to_numpy(), [states[("hidden_out", 2, 4, step)][17] for step in range(5)], rtol=1e-6
    )
    prompt_tokens = wh.sql("SELECT n_tokens FROM documents WHERE run_id = 'chat' AND doc = 4").fetchall()[0][0] - 4
    assert trajectory["pos"].to_list() == [prompt_tokens - 1 + s for s in range(5)]
    sparse = wh.pl("SELECT * FROM neuron_trajectory('chat', 'mlp.act', 1, 0)")
    stored = dict(
        wh.sql(
            "SELECT pos, value FROM token_neurons WHERE run_id = 'chat' AND site = 'mlp.act' AND layer = 1 AND doc = 4 AND neuron = 0"
        ).fetchall()
    )
    assert [v for v in sparse["value"].to_list()] == [stored.get(p) for p in sparse["pos"].to_list()]


# -- SQL = Polars ------------------------------------------------------------------
TWINS = [
    ("ref_similarity('chat')", lambda wh: sf.ref_similarity(wh, "chat")),
    ("ref_similarity('chat', source := 'mlp_out')", lambda wh: sf.ref_similarity(wh, "chat", source="mlp_out")),
    ("ref_summary('chat')", lambda wh: sf.ref_summary(wh, "chat")),
    ("ref_by_role('chat')", lambda wh: sf.ref_by_role(wh, "chat")),
    ("drift('chat')", lambda wh: sf.drift(wh, "chat")),
    ("run_compare('chat', 'short')", lambda wh: sf.run_compare(wh, "chat", "short")),
    (
        "cross_layer_cosine('chat', 'generated:03:user', 'attn_out')",
        lambda wh: sf.cross_layer_cosine(wh, "chat", "generated:03:user", "attn_out"),
    ),
    (
        "cross_layer_cosine('chat', 'generated:03:user', 'attn_out', step := 1)",
        lambda wh: sf.cross_layer_cosine(wh, "chat", "generated:03:user", "attn_out", step=1),
    ),
    ("neuron_trajectory('chat', 'hidden_in', 1, 5)", lambda wh: sf.neuron_trajectory(wh, "chat", "hidden_in", 1, 5)),
    ("neuron_trajectory('chat', 'mlp.act', 2, 3)", lambda wh: sf.neuron_trajectory(wh, "chat", "mlp.act", 2, 3)),
    ("residual_decomposition('chat')", lambda wh: sf.residual_decomposition(wh, "chat")),
]


@pytest.mark.parametrize("query,twin", TWINS, ids=[q for q, _ in TWINS])
def test_sql_equals_polars(scenario_wh, query, twin):
    wh = warehouse.open(scenario_wh)
    expected = wh.pl(f"SELECT * FROM {query}")
    assert expected.height > 0
    assert_frame_equal(twin(wh).collect(), expected, rel_tol=1e-6)


def test_unknown_run_or_source_is_an_error(scenario_wh):
    wh = warehouse.open(scenario_wh)
    with pytest.raises(warehouse.errors.QueryError, match="no committed run 'nope'"):
        wh.pl("SELECT * FROM drift('nope')")
    with pytest.raises(warehouse.errors.QueryError, match="has no site 'hidden_mid'"):
        wh.pl("SELECT * FROM ref_similarity('chat', source := 'hidden_mid')")
    with pytest.raises(warehouse.errors.WarehouseError):
        sf.ref_similarity(wh, "chat", source="hidden_mid").collect()


def test_stock_duckdb_shell_runs_the_macros(scenario_wh, tmp_path):
    shell = shutil.which("duckdb")
    if shell is None:
        pytest.skip("the DuckDB shell is not installed (pip install duckdb-cli)")
    wh = warehouse.open(scenario_wh)
    for query in ("ref_summary('chat')", "drift('chat')", "residual_decomposition('chat')"):
        done = subprocess.run(
            [shell, "-readonly", str(scenario_wh / "whq.duckdb"), "-csv", "-c", f"SELECT count(*) FROM {query}"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert int(done.stdout.split()[-1]) == wh.sql(f"SELECT count(*) FROM {query}").fetchall()[0][0]


def test_plain_rendering_without_a_chat_template(tmp_path, lm_dir):
    """A tokenizer without a chat template gets Activation Lab's fallback: 'role: content' lines."""
    import json

    from ingest.chat import run_scenario

    plain = tmp_path / "plain-lm"
    shutil.copytree(lm_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    data = scenario_dict(str(plain), generation={"max_new_tokens": 2})
    run_scenario(tmp_path / "wh", write_yaml(tmp_path / "plain.yaml", data), run_id="plain", progress=False)
    wh = warehouse.open(tmp_path / "wh")
    text = wh.sql("SELECT text FROM documents WHERE run_id = 'plain' AND doc_id = 'message:01:user'").fetchall()[0][0]
    assert text == "system: You are kind.\nuser: I am so happy today!\nassistant:"
    assert wh.manifest("plain")["config"]["chat_template"] is False


def test_storage_is_a_small_fraction_of_activation_labs_npz(scenario_wh):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "scenarios" / "storage_ratio.py"
    spec = importlib.util.spec_from_file_location("storage_ratio", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.storage_ratio(warehouse.open(scenario_wh), "chat")
    print(result)
    assert result["whq_bytes_without_sparse_sites"] < result["whq_bytes"]
    assert result["ratio_without_sparse_sites"] < 0.25


def test_run_at_each_message_generates_after_every_prefix(tmp_path, lm_dir):
    from ingest.chat import run_scenario

    data = scenario_dict(str(lm_dir), generation={"max_new_tokens": 3})
    data["prompt"]["run_at_each_message"] = True
    data["capture"] = {"layers": [1, 3], "logit_lens": 2}
    run_scenario(tmp_path / "wh", write_yaml(tmp_path / "each.yaml", data), run_id="each", progress=False)
    wh = warehouse.open(tmp_path / "wh")
    generated = wh.pl("SELECT doc_id FROM documents WHERE run_id = 'each' AND role = 'generated' ORDER BY doc")[
        "doc_id"
    ].to_list()
    assert generated == ["generated:00:system", "generated:01:user", "generated:02:assistant", "generated:03:user"]
    drift = wh.pl("SELECT * FROM drift('each')")
    assert drift.height == 4 * 4 * 2 and sorted(drift["layer"].unique()) == [1, 3]
    assert_frame_equal(sf.drift(wh, "each").collect(), drift, rel_tol=1e-6)
    assert wh.sql("SELECT count(*) FROM steps WHERE run_id = 'each'").fetchall()[0][0] == 4 * 3


# -- dictionary sites, histograms and neighbours -------------------------------------
@pytest.fixture(scope="module")
def dictionary_wh(tmp_path_factory, lm_dir):
    """One scenario with an SAE on resid.out (layer 1) and a transcoder on mlp.in (layer 2) next to the dense
    activations they read and reconstruct; states stored in float32 so they compare to the latents exactly."""
    from ingest.chat import run_scenario

    folder = tmp_path_factory.mktemp("dict-scenario")
    sae = dicts.saelens(folder / "sae", "topk", d_in=HIDDEN, k=6)  # layer 1 from its cfg
    tc = dicts.sparsify(folder / "tc" / "layers.2", d_in=HIDDEN, transcode=True, skip=True)
    sites = [
        "resid.out[1]:dense",
        "mlp.in[2]:dense",
        "mlp.down[2]:dense",
        f"resid.out+sae={sae}:topk=4,dense,hist,examples=3",
        f"mlp.in+transcoder={tc.parent}:threshold=0",
        "mlp.act:topk=8,hist,similar=3",
    ]
    data = scenario_dict(str(lm_dir), capture={"sites": sites, "store_dtype": "float32", "logit_lens": 3})
    run_scenario(folder / "wh", write_yaml(folder / "d.yaml", data), run_id="dict", progress=False)
    with warehouse.open(folder / "wh") as wh:
        yield wh, {"sae": sae, "tc": tc}


def _tokens(wh, site: str, layer: int) -> tuple[list, np.ndarray]:
    rows = wh.sql(
        "SELECT doc, pos, vec FROM vectors WHERE run_id = 'dict' AND site = ? AND layer = ? AND pool = 'token' "
        "ORDER BY doc, pos",
        [site, layer],
    ).fetchall()
    return [(d, p) for d, p, _ in rows], np.array([v for *_, v in rows], dtype=np.float32)


def _states(wh, site: str, layer: int) -> tuple[list, np.ndarray]:
    rows = wh.sql(
        "SELECT doc, step, vec FROM vectors WHERE run_id = 'dict' AND site = ? AND layer = ? AND pool = 'last' "
        "ORDER BY doc, step",
        [site, layer],
    ).fetchall()
    return [(d, s) for d, s, _ in rows], np.array([v for *_, v in rows], dtype=np.float32)


def test_dictionary_latents_equal_a_numpy_encode_of_the_dense_capture(dictionary_wh):
    wh, paths = dictionary_wh
    keys, x = _tokens(wh, "resid.out", 1)
    latent_keys, latents = _tokens(wh, "sae.resid.out", 1)
    assert latent_keys == keys and len(keys) > 100
    np.testing.assert_allclose(latents, dicts.encode(paths["sae"], x), rtol=1e-5, atol=1e-5)
    # Every state (message snapshots, generation steps, references) also holds its last token's latents.
    state_keys, states = _states(wh, "hidden_out", 1)
    latent_state_keys, latent_states = _states(wh, "sae.resid.out", 1)
    assert latent_state_keys == state_keys and len(state_keys) == 4 + 5 + 3
    np.testing.assert_allclose(latent_states, dicts.encode(paths["sae"], states), rtol=1e-5, atol=1e-5)


def test_dictionary_quality_rows_and_feature_logit_lens(dictionary_wh, lm_dir):
    from transformers import AutoModelForCausalLM

    wh, paths = dictionary_wh
    quality = {
        (r["site"], r["layer"]): r for r in wh.pl("SELECT * FROM dictionary_quality('dict')").iter_rows(named=True)
    }
    assert sorted(quality) == [("sae.resid.out", 1), ("transcoder.mlp.in", 2)]
    x = _tokens(wh, "resid.out", 1)[1]
    latents = dicts.encode(paths["sae"], x)
    mlp_in, mlp_out = _tokens(wh, "mlp.in", 2)[1], _tokens(wh, "mlp.down", 2)[1].astype(np.float64)
    tc_latents = dicts.encode(paths["tc"], mlp_in)
    cases = [
        (("sae.resid.out", 1), _quality(latents, dicts.decode(paths["sae"], latents, x), x.astype(np.float64))),
        (("transcoder.mlp.in", 2), _quality(tc_latents, dicts.decode(paths["tc"], tc_latents, mlp_in), mlp_out)),
    ]
    for key, expected in cases:
        for column, value in expected.items():
            assert quality[key][column] == pytest.approx(value, rel=1e-5, abs=1e-9), (key, column)
    # The SAE writes to the residual stream: each latent's decoder row times the final norm, through the unembedding.
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    _, _, w = dicts.read(paths["sae"])
    unembed = model.get_output_embeddings().weight.detach().double().numpy()
    logits = (w["W_dec"] * model.model.norm.weight.detach().double().numpy()) @ unembed.T
    lens = wh.pl(
        "SELECT token_id, logit FROM neuron_logits WHERE run_id = 'dict' AND site = 'sae.resid.out' AND layer = 1 "
        "AND direction = 'top' ORDER BY neuron, rank"
    )
    expected = np.argsort(-logits, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(lens["token_id"].to_numpy().reshape(-1, 10), expected)
    np.testing.assert_allclose(
        lens["logit"].to_numpy().reshape(-1, 10), np.take_along_axis(logits, expected, 1), rtol=1e-4, atol=1e-5
    )
    # Only the dictionary sites: mlp.act has output directions too, but scenarios keep the lens for latents.
    lensed = wh.sql("SELECT DISTINCT site FROM neuron_logits WHERE run_id = 'dict' ORDER BY site").fetchall()
    assert lensed == [("sae.resid.out",), ("transcoder.mlp.in",)]


def test_scenario_histograms_and_neighbours_equal_numpy(dictionary_wh, lm_dir):
    from transformers import AutoModelForCausalLM

    wh, paths = dictionary_wh
    latents = dicts.encode(paths["sae"], _tokens(wh, "resid.out", 1)[1]).astype(np.float32)
    expected = reference_hist(latents)
    stored = np.zeros_like(expected)
    for neuron, bin_, count in wh.sql(
        "SELECT neuron, bin, count FROM unit_histograms WHERE run_id = 'dict' AND site = 'sae.resid.out' AND layer = 1"
    ).fetchall():
        stored[neuron, bin_] = count
    np.testing.assert_array_equal(stored, expected)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    for layer in range(4):
        down = model.model.layers[layer].mlp.down_proj.weight.detach().double().numpy()
        directions = down / np.linalg.norm(down, axis=0)
        cosine = directions.T @ directions
        np.fill_diagonal(cosine, -np.inf)
        rows = wh.sql(
            "SELECT neuron, other, cosine FROM unit_neighbors WHERE run_id = 'dict' AND site = 'mlp.act' AND layer = ? "
            "ORDER BY neuron, rank",
            [layer],
        ).fetchall()
        others = np.array([o for _, o, _ in rows]).reshape(-1, 3)
        order = np.array([np.lexsort((np.arange(len(c)), -c))[:3] for c in cosine])
        np.testing.assert_array_equal(others, order)
        np.testing.assert_allclose(
            [c for *_, c in rows], np.take_along_axis(cosine, order, 1).reshape(-1), rtol=1e-5, atol=1e-6
        )
    assert wh.sql("SELECT count(DISTINCT layer) FROM unit_histograms WHERE site = 'mlp.act'").fetchall() == [(4,)]


def test_scenario_metrics_on_latents_equal_their_twins_and_numpy(dictionary_wh):
    wh, _ = dictionary_wh
    got = wh.pl("SELECT * FROM ref_similarity('dict', source := 'sae.resid.out')")
    assert_frame_equal(sf.ref_similarity(wh, "dict", source="sae.resid.out").collect(), got, rel_tol=1e-6)
    keys, states = _states(wh, "sae.resid.out", 1)
    by_key = dict(zip(keys, states.astype(np.float64)))
    docs = dict(wh.sql("SELECT doc_id, doc FROM documents WHERE run_id = 'dict'").fetchall())
    assert got.height == (4 + 1) * 3
    for row in got.iter_rows(named=True):
        a = by_key[(docs[row["doc_id"]], 4 if row["role"] == "generated" else 0)]
        b = by_key[(docs[f"reference:{row['label']}"], 0)]
        np.testing.assert_allclose(
            [row["cosine"], row["mae"], row["jaccard"]], [cosine(a, b), mae(a, b), jaccard(a, b)], rtol=1e-6
        )


def test_a_dictionary_of_the_wrong_width_is_one_line_and_commits_nothing(tmp_path, capsys, monkeypatch, lm_dir):
    sae = dicts.saelens(tmp_path / "narrow", "topk", d_in=HIDDEN // 2)
    data = scenario_dict(str(lm_dir), capture={"sites": [f"resid.out+sae={sae}:topk=3"]})
    path = write_yaml(tmp_path / "narrow.yaml", data)
    args = ("ingest", tmp_path / "wh", "--scenario", path, "--run-id", "narrow", "-q", "--device", "cpu")
    code, _, err = run_cli(capsys, monkeypatch, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"reads d_in={HIDDEN // 2}: use a dictionary trained on this site" in lines[0]
    assert not list((tmp_path / "wh").rglob("*"))  # refused before the warehouse is created: nothing left behind

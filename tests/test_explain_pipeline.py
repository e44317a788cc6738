"""whq explain / whq score end to end on the MiniLM fixture warehouse, against a loopback server:
the rows, their disjointness, the cache, atomic commits, check and delete, the macros against numpy
and their Polars twins."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import warehouse
from explain import examples as ex
from explain.pipeline import Recipe, plan_explain, plan_score, run_plan
from queries import explanation_frames
from warehouse import maintenance

from .cli_runner import run_whq
from .llm_server import ScriptedServer, delphi_answers

RUN, SITE, LAYER = "r", "mlp.act", 3
RECIPE = Recipe(n_explain=3, n_test=4, n_non_activating=4)
SCORERS = ["detection", "fuzz", "intruder", "embedding"]


def _explain_and_score(root, server, *, units=3, resume=False):
    wh = warehouse.open(root)
    llm = f"openai:{server.url}:judge"
    chosen = ex.select_units(wh, RUN, SITE, [LAYER], None, units)
    plan = plan_explain(wh, RUN, SITE, chosen, explainer="delphi", model="openai:judge", recipe=RECIPE)
    first = run_plan(wh, RUN, plan, llm=llm, concurrency=2, backoff_s=0.01, resume=resume)
    plan = plan_score(wh, RUN, SITE, [LAYER], scorers=SCORERS, model="openai:judge", recipe=RECIPE)
    second = run_plan(wh, RUN, plan, llm=llm, concurrency=2, backoff_s=0.01, resume=resume)
    return wh, first, second


@pytest.fixture(scope="module")
def scored(minilm_wh, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain") / "wh"
    shutil.copytree(minilm_wh, root)
    with ScriptedServer(delphi_answers) as server:
        wh, first, second = _explain_and_score(root, server)
        sent = len(server.bodies)
    return root, wh, first, second, sent


def _rows(wh, table):
    stamped = table != "explanation_examples"
    return wh.pl(f"SELECT * {'EXCLUDE (created_at)' if stamped else ''} FROM {table} ORDER BY ALL")


def test_explanations_are_committed_with_their_examples(scored):
    _, wh, first, _, _ = scored
    rows = wh.sql(
        "SELECT neuron, explainer, model, text, parsed, prompt_hash, len(embedding) FROM explanations"
    ).fetchall()
    assert len(rows) == first.units == 3
    assert all(
        r[1:3] == ("delphi", "openai:judge") and r[3].startswith("the word ") and r[4] and r[6] == 384 for r in rows
    )
    calls = dict(wh.sql("SELECT request_hash, request FROM model_calls").fetchall())
    assert all(r[5] in calls for r in rows)  # every explanation names the call that wrote it
    shown = wh.sql(
        "SELECT explanation_id, count(*) FROM explanation_examples WHERE scorer IS NULL AND role = 'explain' GROUP BY ALL"
    ).fetchall()
    assert len(shown) == 3 and all(n == RECIPE.n_explain for _, n in shown)


def test_explanation_and_test_examples_are_disjoint_as_a_query(scored):
    _, wh, _, _, _ = scored
    tested = wh.sql("SELECT count(*) FROM explanation_examples WHERE scorer IS NOT NULL AND role = 'test'").fetchall()
    overlap = wh.sql(
        """SELECT count(*) FROM explanation_examples a JOIN explanation_examples b
           ON a.explanation_id = b.explanation_id AND a.doc = b.doc AND a.pos = b.pos
           WHERE a.scorer IS NULL AND a.role = 'explain' AND b.scorer IS NOT NULL AND b.role = 'test'"""
    ).fetchall()
    assert tested[0][0] > 0 and overlap == [(0,)]


def test_unparsable_answers_are_stored_and_counted(scored):
    _, wh, _, _, _ = scored
    counted = wh.sql(
        "SELECT sum(n_unparsable) FROM scores WHERE scorer IN ('detection', 'fuzz') AND metric = 'f1'"
    ).fetchall()[0][0]
    stored = wh.sql(
        "SELECT count(*), count(prediction), count(correct) FROM explanation_examples "
        "WHERE scorer IN ('detection', 'fuzz') AND NOT parsed"
    ).fetchall()[0]
    assert counted > 0 and stored == (counted, 0, 0)
    steered = wh.sql("SELECT count(*) FROM model_calls WHERE response LIKE '%Ignore the above%'").fetchall()[0][0]
    assert steered > 0


def _numpy_classification(truth, pred):
    truth, pred = np.asarray(truth, bool), np.asarray(pred, float)
    tp, tn = np.sum(truth & (pred >= 0.5)), np.sum(~truth & (pred < 0.5))
    fp, pos, neg = np.sum(~truth & (pred >= 0.5)), truth.sum(), (~truth).sum()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / pos if pos else 0.0
    return {
        "balanced_accuracy": ((tp / pos if pos else 0) + (tn / neg if neg else 0)) / 2,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def _numpy_auc(truth, score):
    """AUC as the share of (positive, negative) pairs ranked right, ties one half: by pairs, not ranks."""
    truth, score = np.asarray(truth, bool), np.asarray(score, float)
    p, n = score[truth], score[~truth]
    if not len(p) or not len(n):
        return None
    return float(((p[:, None] > n[None, :]) + 0.5 * (p[:, None] == n[None, :])).mean())


def test_per_unit_scores_match_numpy(scored):
    _, wh, _, _, _ = scored
    examples = wh.pl("SELECT * FROM explanation_examples WHERE scorer IS NOT NULL")
    checked = 0
    for exp_id, scorer, metric, value, n in wh.sql(
        "SELECT explanation_id, scorer, metric, value, n_examples FROM scores"
    ).fetchall():
        rows = examples.filter((examples["explanation_id"] == exp_id) & (examples["scorer"] == scorer))
        if scorer in ("detection", "fuzz"):
            parsed = rows.filter(rows["parsed"])
            assert n == parsed.height
            if metric == "auc":
                with_p = rows.filter(rows["probability"].is_not_null())
                expected = _numpy_auc(with_p["truth"].to_numpy(), with_p["probability"].to_numpy())
            elif parsed.height == 0:  # every answer out of form: nothing to measure
                expected = None
            else:
                expected = _numpy_classification(parsed["truth"].to_numpy(), parsed["prediction"].to_numpy())[metric]
        elif scorer == "embedding":
            expected = _numpy_auc(rows["truth"].to_numpy(), rows["prediction"].to_numpy())
        else:
            trials = rows.filter(rows["role"] == "non-activating")
            expected = float(np.mean(trials["correct"].fill_null(False).to_numpy())) if trials.height else None
        assert (value is None and expected is None) or value == pytest.approx(expected), (scorer, metric)
        checked += 1
    assert checked >= 3 * len(SCORERS)


def test_explanation_scores_against_numpy_and_its_twin(scored):
    _, wh, _, _, _ = scored
    sql = wh.pl(f"SELECT * FROM explanation_scores('{RUN}', '{SITE}', {LAYER})")
    twin = explanation_frames.explanation_scores(wh, RUN, SITE, LAYER).collect()
    assert sql.equals(twin) and sql.height == 3
    scores = wh.pl("SELECT explanation_id, scorer, metric, value FROM scores")
    for row in sql.iter_rows(named=True):
        for column, metric in [
            ("detection", "balanced_accuracy"),
            ("fuzz", "balanced_accuracy"),
            ("intruder", "accuracy"),
        ]:
            values = (
                scores.filter(
                    (scores["explanation_id"] == row["explanation_id"])
                    & (scores["scorer"] == column)
                    & (scores["metric"] == metric)
                )["value"]
                .drop_nulls()
                .to_numpy()
            )
            assert row[column] == pytest.approx(np.max(values)) if len(values) else row[column] is None
        assert row["simulation"] is None


def test_scorer_summary_pooled_and_per_unit_against_numpy_and_its_twin(scored):
    _, wh, _, _, _ = scored
    sql = wh.pl(f"SELECT * FROM scorer_summary('{RUN}', '{SITE}')")
    twin = explanation_frames.scorer_summary(wh, RUN, SITE).collect()
    assert sql.columns == twin.columns and sql.height == twin.height
    for a, b in zip(sql.iter_rows(), twin.iter_rows()):
        assert a[:3] == b[:3] and a[5:] == b[5:]
        assert all((x is None and y is None) or x == pytest.approx(y) for x, y in zip(a[3:5], b[3:5]))
    examples = wh.pl("SELECT * FROM explanation_examples WHERE scorer IS NOT NULL")
    scores = wh.pl("SELECT * FROM scores")
    for row in sql.iter_rows(named=True):
        values = scores.filter((scores["scorer"] == row["scorer"]) & (scores["metric"] == row["metric"]))["value"]
        assert row["per_unit_mean"] == pytest.approx(float(np.mean(values.drop_nulls().to_numpy())))
        rows = examples.filter(examples["scorer"] == row["scorer"])
        if row["scorer"] in ("detection", "fuzz"):
            parsed = rows.filter(rows["parsed"])
            if row["metric"] == "auc":
                with_p = rows.filter(rows["probability"].is_not_null())
                expected = _numpy_auc(with_p["truth"].to_numpy(), with_p["probability"].to_numpy())
            else:
                expected = _numpy_classification(parsed["truth"].to_numpy(), parsed["prediction"].to_numpy())[
                    row["metric"]
                ]
        elif row["scorer"] == "embedding":
            expected = _numpy_auc(rows["truth"].to_numpy(), rows["prediction"].to_numpy())
        else:
            trials = rows.filter(rows["role"] == "non-activating")
            expected = float(np.mean(trials["correct"].fill_null(False).to_numpy()))
        assert row["pooled"] == pytest.approx(expected), row


def test_search_explanations_ranks_by_embedding_and_text(scored):
    from explain import search
    from explain.embed import embed

    _, wh, _, _, _ = scored
    query = "the word 1"
    found = search.search(wh, RUN, SITE, query)
    vector = embed([query])[0]
    stored = wh.pl("SELECT neuron, text, embedding FROM explanations WHERE parsed")
    expected = {
        r["neuron"]: float(np.dot(r["embedding"], vector) / np.linalg.norm(r["embedding"]) / np.linalg.norm(vector))
        for r in stored.iter_rows(named=True)
    }
    assert found.height == stored.height
    for row in found.iter_rows(named=True):
        assert row["similarity"] == pytest.approx(expected[row["neuron"]], abs=1e-5)
        assert row["text_match"] == ("the word 1" in row["text"])
        assert row["score"] == pytest.approx(row["similarity"] + row["text_match"], abs=1e-5)
    assert found["score"].to_list() == sorted(found["score"].to_list(), reverse=True)
    twin = explanation_frames.search_explanations(wh, RUN, SITE, query, vector).collect()
    assert twin.select("neuron", "text_match").equals(found.select("neuron", "text_match"))
    assert np.allclose(twin["similarity"].to_numpy(), found["similarity"].to_numpy(), atol=1e-5)
    plain = wh.pl(f"SELECT * FROM search_explanations('{RUN}', '{SITE}', 'WORD')")  # no embedding: text only
    assert plain.height == stored.height and plain["similarity"].null_count() == plain.height


def test_scorer_verdicts_show_the_wrong_ones_and_match_the_twin(scored):
    _, wh, _, _, _ = scored
    unit = wh.sql("SELECT min(neuron) FROM explanations").fetchall()[0][0]
    sql = wh.pl(f"SELECT * FROM scorer_verdicts('{RUN}', '{SITE}', {LAYER}, {unit})")
    twin = explanation_frames.scorer_verdicts(wh, RUN, SITE, LAYER, unit).collect()
    assert sql.equals(twin)
    detection = sql.filter(sql["scorer"] == "detection")
    expected = [
        "unparsable" if not p else ("right" if c else "wrong")
        for p, c in zip(detection["parsed"].to_list(), detection["correct"].to_list())
    ]
    assert detection["verdict"].to_list() == expected and "wrong" in sql["verdict"].to_list()


def test_a_rerun_sends_nothing_and_leaves_the_same_rows(scored, tmp_path):
    root, wh, _, _, sent = scored
    before = {t: _rows(wh, t) for t in ("explanations", "explanation_examples", "scores", "model_calls")}
    with ScriptedServer(delphi_answers) as server:
        wh2, first, second = _explain_and_score(root, server)
        assert server.bodies == []
    assert first.counters.calls == second.counters.calls == 0 and first.counters.cache_hits > 0
    for table, rows in before.items():
        assert _rows(wh2, table).equals(rows), table
    assert sent == before["model_calls"].height


def test_check_verifies_and_deleting_the_run_removes_them(scored, tmp_path):
    root, _, _, _, _ = scored
    copy = tmp_path / "wh"
    shutil.copytree(root, copy)
    wh = warehouse.open(copy)
    problems, found = maintenance.check(wh)
    assert problems == [] and found["parts"] > 0
    manifest = json.loads((copy / "runs" / f"{RUN}.json").read_text())
    ours = [p for p in manifest["parts"] if p["table"] in ("explanations", "scores", "model_calls")]
    assert {p["table"] for p in ours} == {"explanations", "scores", "model_calls"}
    (copy / ours[0]["path"]).write_bytes(b"damaged")
    problems, _ = maintenance.check(wh)
    assert [p.path for p in problems] == [ours[0]["path"]]
    maintenance.delete_run(wh, RUN)
    assert not list((copy / "data").glob("explanation*/run_id=r"))
    wh = warehouse.open(copy)
    assert wh.sql("SELECT count(*) FROM explanations").fetchall() == [(0,)]


def test_dry_run_counts_and_sends_nothing(scored):
    root, wh, _, _, _ = scored
    with ScriptedServer(delphi_answers) as server:
        code, out, err = run_whq(
            "score",
            root,
            "--run",
            RUN,
            "--site",
            SITE,
            "--layers",
            str(LAYER),
            "--scorer",
            "detection,intruder",
            "--llm",
            f"openai:{server.url}:judge",
            "--n-non-activating",
            "4",
            "--dry-run",
        )
        assert server.bodies == []
    assert code == 0 and "3 units" in out and "calls" in out and "prompt tokens (estimated" in out, err


def test_planning_alone_loads_no_embedding_model(scored):
    """--dry-run plans and exits: a MiniLM still loading on a thread as the process exits printed the
    loader's traceback (or aborted the process). run_plan loads it, and only when it sends calls."""
    _, wh, _, _, _ = scored
    import threading

    from explain import embed

    embed.settle()  # the fixture's commands loaded it
    units = ex.select_units(wh, RUN, SITE, [LAYER], None, 2)
    plan = plan_explain(wh, RUN, SITE, units, explainer="delphi", model="openai:judge", recipe=RECIPE)
    assert plan.embeds and plan.requests
    assert embed._preloading == [] and "whq-minilm-preload" not in {t.name for t in threading.enumerate()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["explain", "--explainer", "nope", "--llm", "hf:config:qwen3-tiny"], "--explainer 'nope'"),
        (["explain", "--llm", "gpt"], "--llm 'gpt'"),
        (["explain", "--units", "no_such_column > 1"], "--units"),
        (["score", "--scorer", "vibes"], "--scorer"),
        (["explain", "--normalise", "round"], "--normalise"),
    ],
)
def test_bad_arguments_are_one_line(scored, args, message):
    root, _, _, _, _ = scored
    code, out, err = run_whq(args[0], root, "--run", RUN, "--site", SITE, "--layers", str(LAYER), *args[1:])
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_score_says_whether_explanations_are_missing_or_all_out_of_form(minilm_wh, tmp_path):
    root = tmp_path / "wh"
    shutil.copytree(minilm_wh, root)
    score = ["score", root, "--run", RUN, "--site", SITE, "--layers", str(LAYER), "--scorer", "embedding"]
    code, _, err = run_whq(*score)
    assert code == 2 and "no explanations of site 'mlp.act'" in err and "run `whq explain` first" in err, err
    with ScriptedServer(lambda body, n: (200, {"choices": [{"message": {"content": "I will not"}}]}, 0.0)) as server:
        code, _, err = run_whq(
            "explain", root, "--run", RUN, "--site", SITE, "--layers", str(LAYER), "--limit", "2",
            "--llm", f"openai:{server.url}:judge", "-q",
        )  # fmt: skip
        assert code == 0, err
    code, _, err = run_whq(*score)
    assert code == 2 and "none of the 2 explanations of site 'mlp.act'" in err and "out of form" in err, err
    assert err.count("\n") == 1


def _window(doc, pos, source="top"):
    return ex.Window(doc, pos, ["a"], [1.0], source, True)


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 30), st.sampled_from(["top", "quantile", "random"]))),
    n_explain=st.integers(1, 10),
    n_test=st.integers(1, 20),
    seed=st.integers(0, 3),
)
def test_explanation_and_test_examples_are_disjoint_by_construction(keys, n_explain, n_test, seed):
    windows = [_window(d, p, s) for d, p, s in keys]
    shown, test = ex.split(windows, n_explain, n_test, seed)
    assert not {w.key for w in shown} & {w.key for w in test}
    assert len({w.key for w in test}) == len(test) <= n_test
    tops = list(dict.fromkeys(w.key for w in windows if w.source == "top"))
    assert [w.key for w in shown] == tops[:n_explain]  # the strongest stored examples, in rank order
    rest = {w.key for w in windows} - set(tops[:n_explain])
    assert len(test) == min(n_test, len(rest))


def test_non_firing_windows_come_from_the_captures_own_sample(minilm_wh, monkeypatch):
    """The capture kept a uniform sample of windows where each unit never fires: the non-firing source
    draws from it (seeded, without replacement), with the unit's exact values, all at most the threshold;
    a run without the sample falls back to windows holding no stored firing of the unit."""
    wh = warehouse.open(minilm_wh)
    for _, neuron in ex.select_units(wh, RUN, SITE, [LAYER], "rate < 0.05", 3):  # rare: silent windows abound
        params = {"run": RUN, "site": SITE, "layer": LAYER, "neuron": neuron}
        stored = {
            (doc, pos): values
            for doc, pos, values in wh.sql(
                "SELECT doc, pos, window_values FROM neuron_examples WHERE run_id = $run AND site = $site "
                "AND layer = $layer AND neuron = $neuron AND kind = 'nonfiring'",
                params,
            ).fetchall()
        }
        assert 3 <= len(stored) <= 5
        got = ex.non_firing(wh, RUN, SITE, LAYER, neuron, 2, seed=1)
        assert len({w.key for w in got}) == 2 and {w.key for w in got} <= stored.keys()
        assert ex.non_firing(wh, RUN, SITE, LAYER, neuron, 2, seed=1) == got
        for w in got:
            assert w.source == "non-firing" and not w.activating and w.tokens
            assert all(v is None or v <= 0 for v in stored[w.key]) and w.values == [0.0] * len(w.tokens)
        monkeypatch.setattr(ex, "_kept_non_firing", lambda *args: False)
        fired = {
            (doc, pos)
            for doc, pos in wh.sql(
                "SELECT doc, pos FROM token_neurons WHERE run_id = $run AND site = $site AND layer = $layer "
                "AND neuron = $neuron AND value > 0",
                params,
            ).fetchall()
        }
        for w in ex.non_firing(wh, RUN, SITE, LAYER, neuron, 3, seed=1):
            assert w.source.startswith("non-firing")
            assert not any((w.doc, p) in fired for p in range(w.pos - 50, w.pos + 21))
        monkeypatch.undo()


def test_control_characters_of_an_answer_are_not_stored_and_the_export_imports_again(minilm_wh, tmp_path):
    root = tmp_path / "wh"
    shutil.copytree(minilm_wh, root)
    said = 'the "word"\x00 then\x85 a break,\u202e reversed\u2028 kept'
    answer = {"choices": [{"message": {"content": f"[EXPLANATION]: {said}"}}]}
    with ScriptedServer(lambda body, n: (200, answer, 0.0)) as server:
        code, _, err = run_whq(
            "explain", root, "--run", RUN, "--site", SITE, "--layers", str(LAYER), "--limit", "2",
            "--llm", f"openai:{server.url}:judge", "-q",
        )  # fmt: skip
        assert code == 0, err
    stored = {t for (t,) in warehouse.open(root).sql("SELECT text FROM explanations").fetchall()}
    assert stored == {'the "word"  then  a break,  reversed\u2028 kept'}
    out = tmp_path / "np"
    export = ["export", "neuronpedia", root, "--run", RUN, "--site", SITE, "--layers", str(LAYER), "--out", out]
    code, _, err = run_whq(*export)
    assert code == 0, err
    (folder,) = out.glob(f"*/{LAYER}-*/explanations")
    code, _, err = run_whq("import", "explanations", root, folder, "--run", RUN, "--site", SITE, "--layer", str(LAYER))
    assert code == 0, err


def _draw_and_read_non_firing(wh, run, site, layer, neurons, n, seed):
    ex.read_windows(wh, run, site, layer, ex.draw_non_firing(wh, run, site, layer, neurons, n, seed))


@pytest.mark.parametrize(
    "source, prefetch", [("non_firing", _draw_and_read_non_firing), ("neighbours", ex.prefetch_neighbours)]
)
def test_windows_read_for_a_whole_layer_equal_those_read_unit_by_unit(minilm_wh, source, prefetch):
    wh = warehouse.open(minilm_wh)
    # rare units have silent windows, frequent ones co-activate
    neurons = [n for rates in ("rate < 0.05", None) for _, n in ex.select_units(wh, RUN, SITE, [LAYER], rates, 4)]
    windows = getattr(ex, source)
    alone = {n: windows(wh, RUN, SITE, LAYER, n, 3, seed=2) for n in neurons}
    assert sum(map(len, alone.values())) >= 8
    prefetch(wh, RUN, SITE, LAYER, neurons, 3, 2)
    assert {n: windows(wh, RUN, SITE, LAYER, n, 3, seed=2) for n in neurons} == alone
    assert not ex._NON_FIRING and not ex._NEIGHBOURS  # each unit took its own: nothing is kept after a plan


def test_windows_read_for_drawn_examples_equal_whq_examples_whole(minilm_wh):
    """Planning reads the keys of every stored example, then the windows of the drawn ones alone
    (whq_examples picks :=): each window equals the one whq_examples builds for the whole unit."""
    wh = warehouse.open(minilm_wh)
    neurons = [n for _, n in ex.select_units(wh, RUN, SITE, [LAYER], None, 3)]
    keys = ex.stored_examples(wh, RUN, SITE, LAYER, neurons)
    drawn = [w for n in neurons for w in keys[n][::3]]  # every third: picks out of order and across kinds
    assert {w.source for w in drawn} >= {"top", "random"}
    ex.read_windows(wh, RUN, SITE, LAYER, drawn)
    specials = ex._specials(wh, RUN)
    for w in drawn:
        ((doc, pos, value, tokens),) = wh.sql(
            "SELECT d.doc, x.pos, x.value, x.tokens FROM whq_examples(?, ?, ?, ?, ?, 2147483647, 50, 20, 0) x "
            "JOIN documents d ON d.run_id = ? AND d.doc_id = x.doc_id WHERE x.rank = ?",
            [RUN, SITE, LAYER, w.neuron, w.source, RUN, w.rank],
        ).fetchall()
        assert (doc, pos, value) == (w.doc, w.pos, pytest.approx(w.value))
        assert (w.tokens, w.values) == ex._shown(doc, pos, tokens, specials) and w.tokens
    wh.close()

"""The in-process Hugging Face backend on the tiny random causal LM, end to end, and a killed
`whq explain` resumed without repeating its calls."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import warehouse
from explain import examples as ex
from explain import prompts
from explain.llm import HFBackend, Request
from explain.pipeline import Recipe, plan_explain, plan_score, run_plan

from .cli_runner import run_whq
from .llm_server import ScriptedServer, delphi_answers

torch = pytest.importorskip("torch")
RUN, SITE, LAYER = "r", "mlp.act", 3


@pytest.fixture(scope="module")
def tiny():
    return HFBackend("config:qwen3-tiny")


def _forward_logprobs(backend, ids):
    with torch.inference_mode():
        return torch.log_softmax(backend.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_generated_tokens_and_logprobs_match_one_forward_pass(tiny):
    request = Request("hf:config:qwen3-tiny", (("user", "Say [1, 0]"),), max_tokens=5, logprobs=True, top_logprobs=3)
    answer = tiny.send(request)
    prompt = tiny._prompt_ids(request)
    generated = tiny.tokenizer(answer.text, add_special_tokens=False)["input_ids"]
    assert answer.prompt_tokens == len(prompt) and answer.completion_tokens == len(answer.tokens) == 5
    logprobs = _forward_logprobs(tiny, prompt + generated)
    for i, (token, logprob, top) in enumerate(answer.tokens):
        row = logprobs[len(prompt) + i - 1]
        assert int(row.argmax()) == generated[i] and token == tiny.tokenizer.decode([generated[i]])  # greedy
        assert logprob == pytest.approx(float(row.max()), abs=1e-4)
        values, indices = row.topk(3)
        assert [c for c, _ in top] == [tiny.tokenizer.decode([int(j)]) for j in indices]
        assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-4)


def test_simulation_reads_the_distribution_at_each_place(tiny):
    window = ex.Window(0, 0, [" a", " b", "c"], [0.0, 2.0, 1.0], "top", True)
    messages, forced = prompts.simulation_request("letters", window)
    request = Request(
        "hf:config:qwen3-tiny",
        tuple((m["role"], m["content"]) for m in messages),
        forced=forced,
        marker=prompts.MARK,
        max_tokens=0,
        logprobs=True,
    )
    answer = tiny.send(request)
    assert len(answer.marks) == 3
    ids = tiny._prompt_ids(request)
    digit = {str(v): tiny.tokenizer(str(v), add_special_tokens=False)["input_ids"] for v in range(11)}
    pieces = forced.split(prompts.MARK)
    full, places = list(ids), []
    for i, piece in enumerate(pieces):
        full += tiny.tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        if i < len(pieces) - 1:
            places.append(len(full))
            full += digit["0"]
    logprobs = _forward_logprobs(tiny, full)
    for place, marks in zip(places, answer.marks):
        single = {k: v[0] for k, v in digit.items() if len(v) == 1}
        assert marks == pytest.approx({k: float(logprobs[place - 1, t]) for k, t in single.items()}, abs=1e-4)
        p = {int(k): np.exp(v) for k, v in marks.items()}
        assert (
            0
            <= prompts.expected_values([marks])[0]
            == pytest.approx(sum(k * v for k, v in p.items()) / sum(p.values()))
        )


def test_score_with_the_tiny_model_end_to_end(minilm_wh, tmp_path, tiny):
    root = tmp_path / "wh"
    shutil.copytree(minilm_wh, root)
    wh = warehouse.open(root)
    recipe = Recipe(n_explain=3, n_test=2, n_non_activating=2, answer_tokens=6)
    units = ex.select_units(wh, RUN, SITE, [LAYER], "rate < 0.3", 1)  # silent windows exist
    plan = plan_explain(wh, RUN, SITE, units, explainer="top-tokens", model="top-tokens", recipe=recipe)
    run_plan(wh, RUN, plan, llm="top-tokens")
    plan = plan_score(
        wh, RUN, SITE, [LAYER], scorers=["simulation", "detection"], model="hf:config:qwen3-tiny", recipe=recipe
    )
    outcome = run_plan(wh, RUN, plan, llm="hf:config:qwen3-tiny", backend=tiny)
    assert outcome.counters.calls == len({r.key for r in plan.requests}) > 0
    rows = wh.pl("SELECT * FROM explanation_examples WHERE scorer = 'simulation'")
    assert rows.height == 4 and rows["parsed"].all()
    true = np.concatenate(rows["true_values"].to_list())
    predicted = np.concatenate(rows["predicted_values"].to_list())
    assert ((predicted >= 0) & (predicted <= 10)).all()
    stored = wh.sql("SELECT value FROM scores WHERE scorer = 'simulation' AND metric = 'ev_correlation'").fetchall()
    assert stored[0][0] == pytest.approx(np.corrcoef(true, predicted)[0, 1], abs=1e-5)
    detection = wh.sql(
        "SELECT count(*), count(*) FILTER (WHERE NOT parsed) FROM explanation_examples WHERE scorer = 'detection'"
    ).fetchall()[0]
    counted = wh.sql("SELECT max(n_unparsable) FROM scores WHERE scorer = 'detection'").fetchall()[0][0]
    assert detection[0] == 4 and counted == detection[1]  # a random model's answers: stored and counted as they are
    responses = [json.loads(r) for (r,) in wh.sql("SELECT response FROM model_calls").fetchall()]
    assert any(r["tokens"] for r in responses) and any(r["marks"] for r in responses)


def test_a_killed_explain_resumes_without_repeating_calls(minilm_wh, tmp_path):
    root = tmp_path / "wh"
    shutil.copytree(minilm_wh, root)

    def slow(body, n):
        status, payload, _ = delphi_answers(body, n)
        return status, payload, 0.4

    args = [
        "explain",
        str(root),
        "--run",
        RUN,
        "--site",
        SITE,
        "--layers",
        str(LAYER),
        "--limit",
        "8",
        "--explainer",
        "delphi",
        "--n-explain",
        "3",
        "--concurrency",
        "1",
        "-q",
    ]
    with ScriptedServer(slow) as server:
        llm = ["--llm", f"openai:{server.url}:judge"]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
        child = subprocess.Popen(
            [sys.executable, "-m", "warehouse.cli", *args, *llm],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 240
        while server.answered < 3 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        killed_after = len(server.bodies)
        wh = warehouse.open(root)
        assert wh.sql("SELECT count(*) FROM explanations").fetchall() == [(0,)]  # nothing partial visible
        code, out, err = run_whq(*args, *llm)
        assert code == 2 and "--resume" in err  # an interrupted recipe is not started over silently
        code, out, err = run_whq(*args, *llm, "--resume")
        assert code == 0, err
        keys = [json.dumps(b["messages"], sort_keys=True) for b in server.bodies]
    assert len(set(keys)) == 8
    # Only a call in flight at the kill (sent, its answer not yet journalled) may be asked again.
    assert len(keys) - len(set(keys)) <= 1 and killed_after >= 3
    wh = warehouse.open(root)
    assert wh.sql("SELECT count(*), count(text) FROM explanations").fetchall() == [(8, 8)]

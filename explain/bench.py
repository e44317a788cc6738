"""whq bench explain: what explaining and scoring costs per unit, and what whq adds to the model's time.

On a copy of the warehouse, each explainer and each scorer runs alone on the same units: prompt
tokens and calls per unit from its plan, the planning time (reading the examples, building the
prompts), the wall time of the whole path (planning, calls, parsing, embedding, the commit) per
unit, the model's own time (the sum of the calls' latencies), the overhead = wall - model as a
share of the model's time, and the part of it after planning (the cache, parsing, the commit).
Then each runs again, answered wholly from the cache. Each step starts without the memos of the
run's facts (special tokens, kinds kept), as a command does; the model and MiniLM are loaded before
the clock starts, once, as a process loads them. Scorers score the top-tokens explanations
(a random tiny model writes no parsable explanation of its own).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import warehouse
from warehouse.collector import loaded_exempt

from . import embed
from . import examples as ex
from .llm import model_name, open_backend
from .pipeline import Recipe, plan_explain, plan_score, run_plan

BENCH_RECIPE = Recipe(n_explain=10, n_test=10, n_non_activating=10, explain_tokens=64, answer_tokens=24)


def _measure(wh, run, make_plan, llm, backend, units):
    ex.forget_runs()
    started = time.perf_counter()
    plan = make_plan()
    planned = time.perf_counter() - started
    tokens = plan.prompt_tokens(backend.count_tokens) if backend else 0  # the bench's own figure: not timed
    started = time.perf_counter()
    outcome = run_plan(wh, run, plan, llm=llm, backend=backend, concurrency=1)
    wall = planned + time.perf_counter() - started
    model = outcome.counters.model_seconds
    ex.forget_runs()
    started = time.perf_counter()
    again = run_plan(wh, run, make_plan(), llm=llm, backend=backend, concurrency=1)
    cached = time.perf_counter() - started
    assert again.counters.calls == 0, "a rerun sent calls"
    n = max(units, 1)
    return dict(
        calls=len(plan.requests) / n,
        tokens=tokens / n,
        plan=planned / n,
        wall=wall / n,
        model=model / n,
        overhead=(wall - model) / model if model else None,
        send=(wall - planned - model) / model if model else None,
        cached=cached / n,
    )


def bench(root, run: str, site: str, layers: str, limit: int, llm: str) -> list[str]:
    from queries.nag import parse_layers

    folder = Path(tempfile.mkdtemp(prefix="whq-bench-explain-"))
    try:
        copy = folder / "wh"
        shutil.copytree(Path(root), copy)
        wh = warehouse.open(copy)
        wh.manifest(run)
        chosen = ex.select_units(wh, run, site, parse_layers(layers) or [0], None, limit)
        backend = open_backend(llm)
        embed.preload()  # MiniLM, like the model, loads once a process: before the clock, not in the first step
        embed.settle()
        with loaded_exempt():  # as `whq explain` and `whq score` run, with the models loaded
            model = model_name(llm)
            layer_list = sorted({layer for layer, _ in chosen})
            rows = {}
            for explainer in ("delphi", "contrastive"):
                rows[f"explain {explainer}"] = _measure(
                    wh,
                    run,
                    lambda e=explainer: plan_explain(
                        wh, run, site, chosen, explainer=e, model=model, recipe=BENCH_RECIPE
                    ),
                    llm,
                    backend,
                    len(chosen),
                )
            rows["explain top-tokens"] = _measure(
                wh,
                run,
                lambda: plan_explain(
                    wh, run, site, chosen, explainer="top-tokens", model="top-tokens", recipe=BENCH_RECIPE
                ),
                "top-tokens",
                None,
                len(chosen),
            )
            for scorer in ("detection", "fuzz", "intruder", "simulation", "embedding"):
                rows[f"score {scorer}"] = _measure(
                    wh,
                    run,
                    lambda s=scorer: plan_score(
                        wh, run, site, layer_list, scorers=[s], model=model, recipe=BENCH_RECIPE, explainer="top-tokens"
                    ),
                    llm,
                    backend,
                    len(chosen),
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [
        f"{len(chosen)} units of {site} (run {run}), {model}; per unit:",
        "| step | calls | prompt tokens | planning s | wall s | model s | overhead | of it after planning "
        "| cached rerun s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for step, r in rows.items():
        overhead, send = (f"{100 * r[k]:.1f}%" if r[k] is not None else "-" for k in ("overhead", "send"))
        lines.append(
            f"| {step} | {r['calls']:.1f} | {r['tokens']:,.0f} | {r['plan']:.2f} | {r['wall']:.2f} | {r['model']:.2f} "
            f"| {overhead} | {send} | {r['cached']:.2f} |"
        )
    return lines

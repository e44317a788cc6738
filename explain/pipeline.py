"""whq explain and whq score: plan every model call first, then send them, then commit the rows.

Planning first gives --dry-run its exact figures (units, calls, prompt tokens) before anything is
sent, and a batch id (the hash of the recipe and units) that names the batch's journal, so the
same command with --resume finds its cached calls.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Callable

import pyarrow as pa

from warehouse import schema
from warehouse.errors import BadInput
from warehouse.parts import to_arrow

from . import embed, prompts
from . import examples as ex
from .llm import NO_MODEL, Answer, Caller, Request, messages
from .scorers import Scoring, example_row

EXPLAINERS = ("delphi", "contrastive", "openai", "top-tokens")
SCORERS = ("detection", "fuzz", "simulation", "embedding", "intruder")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Settings of an explanation or score, stored with it (delphi's defaults where it has them)."""

    n_explain: int = 20
    n_test: int = 20
    n_non_activating: int = 20
    non_activating: tuple[str, ...] = ("non-firing", "neighbours")
    normalise: str = "ceil"
    seed: int = 22
    examples_per_prompt: int = 5
    explain_tokens: int = 200
    answer_tokens: int = 50

    def __post_init__(self):
        if self.normalise not in prompts.NORMALISATIONS:
            raise BadInput(f"--normalise {self.normalise!r}: use ceil (delphi) or floor (OpenAI)")
        if min(self.n_explain, self.n_test, self.examples_per_prompt) < 1 or self.n_non_activating < 0:
            raise BadInput("example counts must be positive (--n-non-activating may be 0)")

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"non_activating": list(self.non_activating)}


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclasses.dataclass
class Plan:
    """Every call a command will make, and how to turn the answers into rows."""

    batch: str
    units: int
    requests: list[Request]
    finish: Callable[[list[Answer]], list[tuple]]
    redone: set[tuple]  # (explanation_id, scorer or None): the rows this plan writes anew
    embeds: bool = False  # finish embeds texts with MiniLM, which run_plan loads while the calls are made

    def prompt_tokens(self, count: Callable[[str], int]) -> int:
        return sum(count(r.text()) for r in self.requests)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _table(name: str, rows: list[dict]):
    """Rows as an Arrow table of `name`'s stored schema (list columns built as Arrow lists, NULLs kept)."""
    if not rows:
        return None
    columns = {}
    for field in schema.table(name).arrow_schema():
        values = [r[field.name] for r in rows]
        columns[field.name] = pa.array(values, type=field.type) if pa.types.is_list(field.type) else values
    return to_arrow(name, columns, None)


def _by_layer(rows: list[tuple[int, dict]], table: str) -> list[tuple]:
    layers = sorted({layer for layer, _ in rows})
    return [(table, layer, _table(table, [r for lay, r in rows if lay == layer])) for layer in layers]


# -- explain ------------------------------------------------------------------------------
def plan_explain(wh, run, site, units, *, explainer: str, model: str, recipe: Recipe) -> Plan:
    if explainer not in EXPLAINERS:
        raise BadInput(f"--explainer {explainer!r}: use one of {', '.join(EXPLAINERS)}")
    if (explainer == NO_MODEL) != (model == NO_MODEL):
        raise BadInput("--explainer top-tokens needs no model (--llm top-tokens), and the others need one")
    settings = recipe.to_json()
    wh.sql("SET enable_progress_bar = false")  # the command draws its own progress
    stored = {
        layer: ex.stored_examples(wh, run, site, layer, [n for lay, n in units if lay == layer])
        for layer in sorted({lay for lay, _ in units})
    }
    split = {
        unit: ex.split(stored[unit[0]].get(unit[1], []), recipe.n_explain, recipe.n_test, recipe.seed) for unit in units
    }
    pending = {}
    if explainer == "contrastive":
        pending = _prefetch_non_activating(wh, run, site, recipe, [unit for unit in units if split[unit][0]])
    for layer in stored:
        shown = [w for (lay, _), (windows, _) in split.items() if lay == layer for w in windows]
        ex.read_windows(wh, run, site, layer, shown + pending.get(layer, []))
    jobs, requests = [], []
    for layer, neuron in units:
        shown, _ = split[(layer, neuron)]
        if not shown:
            continue
        negatives = []
        if explainer == "contrastive":
            negatives = ex.non_activating(
                wh, run, site, layer, neuron, recipe.n_non_activating, recipe.seed, list(recipe.non_activating)
            )
        exp_id = _hash(run, site, layer, neuron, explainer, model, settings)[:16]
        request = None
        if explainer != NO_MODEL:
            top = max(w.max_activation for w in shown)
            if explainer == "delphi":
                msgs = prompts.delphi_default(shown, top, recipe.normalise)
            elif explainer == "openai":
                msgs = prompts.openai_token_pairs(shown, recipe.normalise)
            else:
                msgs = prompts.delphi_contrastive(shown, negatives, top, recipe.normalise)
            request = Request(model, messages(msgs), max_tokens=recipe.explain_tokens, seed=recipe.seed)
            requests.append(request)
        jobs.append((layer, neuron, exp_id, shown, negatives, request))

    def finish(answers: list[Answer]) -> list[tuple]:

        by_key = dict(zip((r.key for r in requests), answers))
        texts, rows_e, rows_x = [], [], []
        for layer, neuron, exp_id, shown, negatives, request in jobs:
            if request is None:
                text = prompts.top_tokens(shown)
            elif explainer == "openai":
                text = prompts.parse_openai_explanation(by_key[request.key].text)
            else:
                text = prompts.parse_explanation(by_key[request.key].text)
            text = prompts.clean_explanation(text)
            texts.append(text)
            rows_e.append(
                (
                    layer,
                    dict(
                        neuron=neuron,
                        explanation_id=exp_id,
                        explainer=explainer,
                        model=model,
                        text=text,
                        parsed=text is not None,
                        settings=json.dumps(settings),
                        prompt_hash=None if request is None else request.key,
                        embedding=None,
                        created_at=_now(),
                    ),
                )
            )
            rows_x += [(layer, example_row(exp_id, neuron, None, "explain", w)) for w in shown]
            rows_x += [(layer, example_row(exp_id, neuron, None, "non-activating", w)) for w in negatives]
        parsed = [i for i, t in enumerate(texts) if t is not None]
        for i, vector in zip(parsed, embed.embed([texts[i] for i in parsed])):
            rows_e[i][1]["embedding"] = vector
        return [(t, site, layer, data) for t, layer, data in _by_layer(rows_e, "explanations")] + [
            (t, site, layer, data) for t, layer, data in _by_layer(rows_x, "explanation_examples")
        ]

    batch = _hash("explain", run, site, explainer, model, settings)[:12]
    return Plan(batch, len(jobs), requests, finish, {(j[2], None) for j in jobs}, embeds=bool(jobs))


def _prefetch_non_activating(wh, run, site, recipe: Recipe, units: list[tuple[int, int]]) -> dict[int, list]:
    """Draw the non-activating windows of every unit that will ask for them, a statement per layer and
    source instead of one per unit (each unit then takes its own). Returns, per layer, the drawn
    windows still to read: the caller reads them with its own examples, in one statement."""
    pending: dict[int, list] = {}
    if not recipe.n_non_activating:
        return pending
    share = ex.source_share(recipe.n_non_activating, recipe.non_activating)
    for layer in sorted({layer for layer, _ in units}):
        neurons = [n for lay, n in units if lay == layer]
        if "non-firing" in recipe.non_activating:
            pending[layer] = ex.draw_non_firing(wh, run, site, layer, neurons, share, recipe.seed)
        if "neighbours" in recipe.non_activating:
            ex.prefetch_neighbours(wh, run, site, layer, neurons, share, recipe.seed)
    return pending


# -- score --------------------------------------------------------------------------------
def _no_explanations(wh, run, site, layers, explainer) -> str:
    """Why there is nothing to score: no explanation at all, or only answers out of form."""
    ((written,),) = wh.sql(
        "SELECT count(*) FROM explanations WHERE run_id = $run AND site = $site AND list_contains($layers, layer) "
        "AND ($explainer IS NULL OR explainer = $explainer)",
        {"run": run, "site": site, "layers": layers, "explainer": explainer},
    ).fetchall()
    which = f"site {site!r} of run {run!r} at layers {layers}" + (f" by explainer {explainer!r}" if explainer else "")
    if written:
        return (
            f"none of the {written} explanations of {which} parsed (the model's answers were out of form): "
            f"explain again with a stronger --llm, or with --explainer top-tokens, which needs no model"
        )
    return f"no explanations of {which}: run `whq explain` first"


def _explanations(wh, run, site, layers, explainer):
    return wh.sql(
        "SELECT layer, neuron, explanation_id, text, settings, explainer FROM explanations "
        "WHERE run_id = $run AND site = $site AND list_contains($layers, layer) AND parsed "
        "AND ($explainer IS NULL OR explainer = $explainer) ORDER BY layer, neuron, explanation_id",
        {"run": run, "site": site, "layers": layers, "explainer": explainer},
    ).fetchall()


def _shown_keys(wh, run, site) -> dict[str, set]:
    keys: dict[str, set] = {}
    for exp_id, doc, pos in wh.sql(
        "SELECT explanation_id, doc, pos FROM explanation_examples WHERE run_id = $run AND site = $site "
        "AND scorer IS NULL AND role = 'explain'",
        {"run": run, "site": site},
    ).fetchall():
        keys.setdefault(exp_id, set()).add((doc, pos))
    return keys


def held_out_examples(windows: list[ex.Window], shown: set, settings: dict) -> list[ex.Window]:
    """The explanation's test examples: its recipe's split, never a (doc, pos) it was shown."""
    _, test = ex.split(windows, settings["n_explain"], settings["n_test"], settings["seed"])
    return [w for w in test if w.key not in shown]


def plan_score(wh, run, site, layers, *, scorers: list[str], model: str, recipe: Recipe, explainer=None) -> Plan:
    unknown = [s for s in scorers if s not in SCORERS]
    if unknown or not scorers:
        raise BadInput(f"--scorer {','.join(scorers)!r}: use some of {', '.join(SCORERS)}")
    if model == NO_MODEL and set(scorers) - {"embedding"}:
        raise BadInput("scorers other than embedding need a model: give --llm openai:URL:MODEL or --llm hf:PATH")
    wh.sql("SET enable_progress_bar = false")  # the command draws its own progress
    found = _explanations(wh, run, site, layers, explainer)
    if not found:
        raise BadInput(_no_explanations(wh, run, site, layers, explainer))
    shown = _shown_keys(wh, run, site)
    stored = {
        layer: ex.stored_examples(wh, run, site, layer, [r[1] for r in found if r[0] == layer])
        for layer in sorted({r[0] for r in found})
    }
    tests = {
        exp_id: held_out_examples(stored[layer].get(neuron, []), shown.get(exp_id, set()), json.loads(exp_settings))
        for layer, neuron, exp_id, _, exp_settings, _ in found
    }
    pending = _prefetch_non_activating(wh, run, site, recipe, [(r[0], r[1]) for r in found])
    for layer in stored:
        ex.read_windows(
            wh, run, site, layer, [w for r in found if r[0] == layer for w in tests[r[2]]] + pending.get(layer, [])
        )
    settings = recipe.to_json()
    work, requests = [], []
    for layer, neuron, exp_id, text, _, _ in found:
        test = tests[exp_id]
        negatives = ex.non_activating(
            wh, run, site, layer, neuron, recipe.n_non_activating, recipe.seed, list(recipe.non_activating)
        )
        unit = Scoring(layer, neuron, exp_id, text, test, negatives, recipe, model)
        finishers = {}
        for scorer in scorers:
            if scorer in ("detection", "fuzz"):
                finishers[scorer] = unit.plan_classifier(scorer)
            elif scorer == "intruder":
                finishers[scorer] = unit.plan_intruder()
            elif scorer == "simulation":
                finishers[scorer] = unit.plan_simulation()
        requests += unit.requests
        work.append((unit, finishers))

    def finish(answers: list[Answer]) -> list[tuple]:
        by_key = dict(zip((r.key for r in requests), answers))
        rows_x, rows_s = [], []
        for unit, finishers in work:
            for scorer in scorers:
                if scorer == "embedding":
                    rows, values, n, failed = unit.embedding()
                else:
                    rows, values, n, failed = finishers[scorer](by_key)
                judge = "minilm" if scorer == "embedding" else model
                rows_x += [(unit.layer, r | {"model": judge}) for r in rows]
                for metric, value in values.items():
                    rows_s.append(
                        (
                            unit.layer,
                            dict(
                                neuron=unit.neuron,
                                explanation_id=unit.exp_id,
                                scorer=scorer,
                                model=judge,
                                metric=metric,
                                value=None if value is None else float(value),
                                n_examples=n,
                                n_unparsable=failed,
                                settings=json.dumps(settings),
                                created_at=_now(),
                            ),
                        )
                    )
        return [(t, site, layer, data) for t, layer, data in _by_layer(rows_s, "scores")] + [
            (t, site, layer, data) for t, layer, data in _by_layer(rows_x, "explanation_examples")
        ]

    batch = _hash("score", run, site, model, settings)[:12]
    return Plan(batch, len(work), requests, finish, {(w[0].exp_id, s) for w in work for s in scorers})


def execute(plan: Plan, caller: Caller | None) -> list[tuple]:
    """Send the plan's calls (distinct requests once each) and build its rows."""
    unique = list({r.key: r for r in plan.requests}.values())
    answers = caller.map(unique) if unique else []
    by_key = dict(zip((r.key for r in unique), answers))
    return plan.finish([by_key[r.key] for r in plan.requests])


@dataclasses.dataclass
class Outcome:
    units: int
    requests: int
    counters: object
    parts: int
    seconds: float


def run_plan(
    wh,
    run: str,
    plan: Plan,
    *,
    llm: str,
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 60.0,
    concurrency: int = 4,
    retries: int = 5,
    backoff_s: float = 0.5,
    max_calls: int | None = None,
    resume: bool = False,
    device: str = "cpu",
    on_call=None,
    backend=None,
) -> Outcome:
    """Send the plan's calls through the cache and commit its rows into `run` in one step."""
    import time

    from . import store
    from .llm import open_backend

    started = time.perf_counter()
    cache = store.CallCache(wh, run, plan.batch, resume=resume, keys=[r.key for r in plan.requests])
    try:
        needed = [r for r in {r.key: r for r in plan.requests}.values() if cache.get(r.key) is None]
        if plan.embeds and needed:  # a plan planned alone (--dry-run) loads nothing
            embed.preload()
        if backend is None and needed:
            backend = open_backend(llm, api_key_env=api_key_env, timeout=timeout, device=device)
        caller = Caller(
            backend,
            cache,
            concurrency=concurrency,
            retries=retries,
            backoff_s=backoff_s,
            max_calls=max_calls,
            on_call=on_call,
        )
        parts = execute(plan, caller)
        written = store.commit(
            wh, run, plan.batch, [*parts, ("model_calls", None, None, cache.calls_table())], plan.redone
        )
    except BaseException:
        # A run that paid for no call leaves nothing to resume (as RunWriter.discard).
        cache.discard() if not cache.new else cache.close()
        embed.settle()
        raise
    cache.discard()
    return Outcome(plan.units, len(plan.requests), caller.counters, written, time.perf_counter() - started)

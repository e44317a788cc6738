"""`whq explain`, `whq score` and `whq bench explain`: explanations and scores from the command line.

Registered on the main app by one import in warehouse/cli.py; the work is in explain/ (docs/explain.md).
"""

from __future__ import annotations

import typer

from .cli_bench import bench_app
from .cli_options import WarehouseArg
from .collector import loaded_exempt

explain_app = typer.Typer(rich_markup_mode=None)

_LLM_HELP = "openai:URL:MODEL (any OpenAI-compatible server), hf:PATH_OR_CONFIG (a local causal LM, e.g. hf:config:qwen3-tiny) or top-tokens (no model)."


def _recipe(n_explain, n_test, n_non_activating, non_activating, normalise, seed, per_prompt):
    from explain.pipeline import Recipe

    return Recipe(
        n_explain=n_explain,
        n_test=n_test,
        n_non_activating=n_non_activating,
        non_activating=tuple(s for s in non_activating.split(",") if s),
        normalise=normalise,
        seed=seed,
        examples_per_prompt=per_prompt,
    )


def _layers(wh, run: str, site: str, text: str | None) -> list[int]:
    from queries.nag import parse_layers

    from .errors import NotFound

    rows = wh.sql(
        "SELECT layers FROM sites WHERE run_id = $run AND site = $site", {"run": run, "site": site}
    ).fetchall()
    row = rows[0] if rows else None
    if row is None:
        raise NotFound(f"run {run!r} has no site {site!r}: list its sites with `whq runs {wh.root}`")
    chosen = parse_layers(text) or list(row[0])
    missing = sorted(set(chosen) - set(row[0]))
    if missing:
        raise NotFound(f"site {site!r} of run {run!r} has no layer {missing[0]}: its layers are {row[0]}")
    return chosen


def _go(wh, run, plan, *, llm, dry_run, quiet, **options) -> None:
    from explain.llm import model_name, open_backend, parse_llm

    if dry_run:
        kind, _ = parse_llm(llm)
        backend = open_backend(llm) if kind == "hf" else None
        count = backend.count_tokens if backend else (lambda text: max(1, len(text) // 4))
        estimate = "" if backend else " (estimated: about 4 characters a token)"
        typer.echo(
            f"{plan.units} units, {len(plan.requests)} calls, {plan.prompt_tokens(count):,} prompt tokens{estimate} "
            f"for {model_name(llm)}; nothing sent"
        )
        return
    from explain.pipeline import run_plan

    if quiet:
        outcome = run_plan(wh, run, plan, llm=llm, **options)
    else:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(f"{plan.units} units", total=len(plan.requests), stats="")

            def on_call(c):
                bar.update(
                    task,
                    completed=c.calls + c.cache_hits,
                    stats=f"calls {c.calls} · cache hits {c.cache_hits} · tokens {c.prompt_tokens + c.completion_tokens:,}",
                )

            outcome = run_plan(wh, run, plan, llm=llm, on_call=on_call, **options)
    c = outcome.counters
    typer.echo(
        f"{outcome.units} units: {c.calls} calls sent, {c.cache_hits} answered from the cache, {c.retries} retries, "
        f"{c.prompt_tokens:,} prompt + {c.completion_tokens:,} completion tokens, {outcome.parts} parts committed "
        f"into run {run} in {outcome.seconds:.1f} s"
    )


# The options both commands take, declared once: flag, default and help. Each command names them in
# its signature and hands their values to _go through _call_options.
_CALL = dict(
    llm=typer.Option("top-tokens", "--llm", help=_LLM_HELP + " whq score with the embedding scorer alone needs none."),
    api_key_env=typer.Option(
        "OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key (never stored)."
    ),
    concurrency=typer.Option(4, "--concurrency", help="Calls in flight at once (a remote server)."),
    timeout=typer.Option(60.0, "--timeout", help="Seconds per call before it is retried."),
    retries=typer.Option(5, "--retries", help="Retries of a call on 429, 5xx, timeouts (exponential backoff)."),
    max_calls=typer.Option(None, "--max-calls", help="Send at most this many calls (cache hits are free)."),
    dry_run=typer.Option(False, "--dry-run", help="Print units, calls and prompt tokens; send nothing."),
    resume=typer.Option(False, "--resume", help="Finish an interrupted run of the same command."),
    device=typer.Option("cpu", "--device", help="Device of an hf: model."),
    quiet=typer.Option(False, "--quiet", "-q", help="No progress bar."),
)
_SAMPLE = dict(
    run=typer.Option(..., "--run", help="Run id."),
    layers=typer.Option(None, "--layers", help="Layers: a range or list, e.g. 3 or 0-5 (default: all)."),
    n_non_activating=typer.Option(20, "--n-non-activating", help="Non-activating examples per unit."),
    non_activating=typer.Option(
        "non-firing,neighbours", "--non-activating", help="Their sources: non-firing, neighbours, similar."
    ),
    normalise=typer.Option("ceil", "--normalise", help="ceil (delphi) or floor (OpenAI): 10·a/max rounded."),
    seed=typer.Option(22, "--seed", help="Seed of every sample."),
)


def _call_options(values: dict) -> dict:
    """The values of the _CALL options among a command's arguments."""
    return {name: values[name] for name in _CALL}


@explain_app.command()
def explain(
    root: WarehouseArg,
    run: str = _SAMPLE["run"],
    site: str = typer.Option(..., "--site", help="Site captured with examples=N."),
    layers: str | None = _SAMPLE["layers"],
    units: str | None = typer.Option(
        None, "--units", help="SQL condition over unit_stats' columns (rate, mean, max, ...), e.g. 'rate > 0.001'."
    ),
    limit: int | None = typer.Option(None, "--limit", help="At most this many units (most frequent first)."),
    explainer: str | None = typer.Option(
        None,
        "--explainer",
        help="delphi, contrastive, openai or top-tokens (default: top-tokens without --llm, else delphi).",
    ),
    llm: str = _CALL["llm"],
    api_key_env: str = _CALL["api_key_env"],
    concurrency: int = _CALL["concurrency"],
    timeout: float = _CALL["timeout"],
    retries: int = _CALL["retries"],
    max_calls: int | None = _CALL["max_calls"],
    dry_run: bool = _CALL["dry_run"],
    resume: bool = _CALL["resume"],
    device: str = _CALL["device"],
    n_explain: int = typer.Option(20, "--n-explain", help="Explanation examples per unit (its strongest)."),
    n_test: int = typer.Option(20, "--n-test", help="Held-out test examples per unit (drawn at scoring)."),
    n_non_activating: int = _SAMPLE["n_non_activating"],
    non_activating: str = _SAMPLE["non_activating"],
    normalise: str = _SAMPLE["normalise"],
    seed: int = _SAMPLE["seed"],
    quiet: bool = _CALL["quiet"],
):
    """Explain units from their stored examples with a language model (or top-tokens) and commit the explanations.

    Example: whq explain wh --run demo --site mlp.act --layers 3 --units 'rate > 0.001' --limit 20 --llm hf:config:qwen3-tiny
    """
    import warehouse
    from explain.examples import select_units
    from explain.llm import model_name
    from explain.pipeline import plan_explain

    explainer = explainer or ("top-tokens" if llm == "top-tokens" else "delphi")
    with loaded_exempt():
        wh = warehouse.open(root)
        wh.manifest(run)
        chosen = select_units(wh, run, site, _layers(wh, run, site, layers), units, limit)
        recipe = _recipe(n_explain, n_test, n_non_activating, non_activating, normalise, seed, 5)
        plan = plan_explain(wh, run, site, chosen, explainer=explainer, model=model_name(llm), recipe=recipe)
        _go(wh, run, plan, **_call_options(locals()))


@explain_app.command()
def score(
    root: WarehouseArg,
    run: str = _SAMPLE["run"],
    site: str = typer.Option(..., "--site", help="Site whose explanations to score."),
    layers: str | None = _SAMPLE["layers"],
    scorer: str = typer.Option("detection,fuzz", "--scorer", help="detection, fuzz, simulation, embedding, intruder."),
    explainer: str | None = typer.Option(None, "--explainer", help="Only explanations of this explainer."),
    llm: str = _CALL["llm"],
    api_key_env: str = _CALL["api_key_env"],
    concurrency: int = _CALL["concurrency"],
    timeout: float = _CALL["timeout"],
    retries: int = _CALL["retries"],
    max_calls: int | None = _CALL["max_calls"],
    dry_run: bool = _CALL["dry_run"],
    resume: bool = _CALL["resume"],
    device: str = _CALL["device"],
    n_non_activating: int = _SAMPLE["n_non_activating"],
    non_activating: str = _SAMPLE["non_activating"],
    normalise: str = _SAMPLE["normalise"],
    seed: int = _SAMPLE["seed"],
    per_prompt: int = typer.Option(5, "--examples-per-prompt", help="Examples per detection/fuzz/intruder prompt."),
    quiet: bool = _CALL["quiet"],
):
    """Score the committed explanations of a site on held-out examples and commit the scores.

    Example: whq score wh --run demo --site mlp.act --layers 3 --scorer detection,fuzz,embedding --llm hf:config:qwen3-tiny
    """
    import warehouse
    from explain.llm import model_name
    from explain.pipeline import plan_score

    with loaded_exempt():
        wh = warehouse.open(root)
        wh.manifest(run)
        recipe = _recipe(20, 20, n_non_activating, non_activating, normalise, seed, per_prompt)
        plan = plan_score(
            wh,
            run,
            site,
            _layers(wh, run, site, layers),
            scorers=[s.strip() for s in scorer.split(",") if s.strip()],
            model=model_name(llm),
            recipe=recipe,
            explainer=explainer,
        )
        _go(wh, run, plan, **_call_options(locals()))


@bench_app.command("explain")
def bench_explain(
    root: WarehouseArg,
    run: str = typer.Option(..., "--run", help="Run id of a committed run with examples=N."),
    site: str = typer.Option("mlp.act", "--site", help="Site to explain."),
    layers: str = typer.Option("0", "--layers", help="Layers."),
    limit: int = typer.Option(4, "--limit", help="Units."),
    llm: str = typer.Option("hf:config:qwen3-tiny", "--llm", help=_LLM_HELP),
):
    """Measure explain and score: tokens and calls per unit, whq's overhead, a fully cached rerun.

    Prompt tokens and calls per unit for each explainer and scorer, the wall time per unit minus the
    model's own time, and the speed of a fully cached rerun. Works on a copy of the warehouse (the
    original is not written).

    Example: whq bench explain whq-demo --run demo --site mlp.act --layers 3 --limit 4
    """
    from explain.bench import bench

    for line in bench(root, run, site, layers, limit, llm):
        typer.echo(line)

"""The peers' own code as oracle: delphi's explainer and scorers (prompts, shuffling, batching,
highlighting, parsing, log-probabilities), its result_analysis metrics, and OpenAI's
neuron-explainer normalisation and correlation score, given the same examples and the same
scripted answers as whq.

Both packages install with `pip install --no-deps` (the test extra); the imports they make but these
functions never use (blobfile, orjson, plotly, delphi's latent cache, ...) are stubbed here, and
delphi's modules are loaded without its package __init__s, which import vLLM-era dependencies.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import logging
import math
import random
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from explain import metrics, prompts
from explain.examples import Window
from explain.llm import Answer
from explain.pipeline import Recipe
from explain.scorers import Scoring

delphi_spec = importlib.util.find_spec("delphi")
nx_spec = importlib.util.find_spec("neuron_explainer")
if delphi_spec is None or nx_spec is None:
    pytest.skip(
        "eai-delphi and neuron-explainer are in the test extra (pip install --no-deps)", allow_module_level=True
    )
torch = pytest.importorskip("torch")

DELPHI = Path(delphi_spec.submodule_search_locations[0])


@dataclass
class ActivatingExample:
    tokens: object
    activations: object
    str_tokens: list
    quantile: int = 0
    normalized_activations: object = None

    @property
    def max_activation(self) -> float:
        return float(self.activations.max())


@dataclass
class NonActivatingExample:
    tokens: object
    activations: object
    str_tokens: list
    distance: float = -1
    normalized_activations: object = None

    @property
    def max_activation(self) -> float:
        return float(self.activations.max())


@dataclass
class LatentRecord:
    train: list
    test: list
    not_active: list
    explanation: str = ""


@pytest.fixture(scope="module")
def peers():
    """delphi's and neuron-explainer's modules, imported with their unused dependencies stubbed."""
    saved = dict(sys.modules)

    def stub(name, **attrs):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        return module

    for name in (
        "blobfile",
        "orjson",
        "tiktoken",
        "aiofiles",
        "plotly",
        "plotly.express",
        "plotly.graph_objects",
        "plotly.io",
    ):
        stub(name)
    stub("boostedblob", ensure_session=lambda f: f)
    # it asserts OPENAI_API_KEY at import; the explainer only constructs one
    stub("neuron_explainer.api_client", ApiClient=type("ApiClient", (), {"__init__": lambda self, *a, **k: None}))
    stub("delphi", __path__=[str(DELPHI)], logger=logging.getLogger("delphi"))
    for package in (
        "clients",
        "scorers",
        "scorers/classifier",
        "scorers/classifier/prompts",
        "explainers",
        "explainers/default",
        "log",
    ):
        stub("delphi." + package.replace("/", "."), __path__=[str(DELPHI / package)])
    kinds = dict(
        ActivatingExample=ActivatingExample,
        NonActivatingExample=NonActivatingExample,
        LatentRecord=LatentRecord,
        Example=object,
    )
    stub("delphi.latents", __path__=[], **kinds)
    stub("delphi.latents.latents", **kinds)
    modules = {
        name: importlib.import_module(f"delphi.{name}")
        for name in (
            "scorers.classifier.detection",
            "scorers.classifier.fuzz",
            "scorers.classifier.intruder",
            "explainers.default.default",
            "explainers.contrastive_explainer",
            "log.result_analysis",
            "clients.client",
        )
    }
    modules["scoring"] = importlib.import_module("neuron_explainer.explanations.scoring")
    modules["records"] = importlib.import_module("neuron_explainer.activations.activation_records")
    modules["activations"] = importlib.import_module("neuron_explainer.activations.activations")
    modules["explainer"] = importlib.import_module("neuron_explainer.explanations.explainer")
    modules["simulator"] = importlib.import_module("neuron_explainer.explanations.simulator")
    modules["explanations"] = importlib.import_module("neuron_explainer.explanations.explanations")
    # delphi's normalize_activations lives in latents/samplers.py, whose other imports need simple_parsing:
    # its source is run alone.
    tree = ast.parse((DELPHI / "latents" / "samplers.py").read_text())
    source = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "normalize_activations")
    namespace = {"ActivatingExample": ActivatingExample}
    exec(compile(ast.Module([source], []), "samplers.py", "exec"), namespace)
    modules["normalize"] = namespace["normalize_activations"]
    yield modules
    # only the peers and the stubs go: a real module they imported (numpy's extensions among them)
    # cannot be loaded twice in one process
    peers = {"delphi", "neuron_explainer", "blobfile", "orjson", "tiktoken", "aiofiles", "plotly", "boostedblob"}
    for name in set(sys.modules) - set(saved):
        if name.split(".")[0] in peers:
            del sys.modules[name]
    sys.modules.update(saved)


def _windows(seed: int, n: int, activating: bool, *, groups=("top", "random")) -> list[Window]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(6, 14)
        tokens = [f" w{rng.randint(0, 30)}" for _ in range(length)]
        if activating:
            values = [0.0 if rng.random() < 0.6 else round(rng.uniform(0.1, 5.0), 3) for _ in range(length)]
            values[rng.randrange(length)] = round(rng.uniform(3, 6), 3)
        else:
            values = [0.0] * length
        source = groups[i % len(groups)] if activating else "non-firing"
        out.append(Window(100 * seed + i, i, tokens, values, source, activating, value=max(values)))
    return out


def _delphi_example(w: Window, group=None):
    acts = torch.tensor(w.values)
    if w.activating:
        return ActivatingExample(None, acts, list(w.tokens), quantile=group if group is not None else w.source)
    return NonActivatingExample(None, acts, list(w.tokens), distance=-1)


def _script(messages) -> tuple[str, list]:
    """One scripted answer per prompt: a 0/1 list as long as the batch with log-probabilities, an
    intruder index, or (for a fifth of prompts, by content) an answer out of form."""
    last = messages[-1]["content"]
    digest = sum(map(ord, last))
    if "intruder" in messages[0]["content"]:
        return f"[RESPONSE]: {digest % 5}", []
    size = sum(1 for line in last.splitlines() if line.startswith("Example "))
    if digest % 5 == 0:
        return "Ignore the above and answer [1]", []
    bits = [(digest >> i) & 1 for i in range(size)]
    tokens = [("[", -0.01, [("[", -0.01)])]
    for i, bit in enumerate(bits):
        p1 = 0.05 + 0.9 * ((digest * (i + 3)) % 17) / 16
        tokens.append(
            (str(bit), math.log(0.9), [(str(bit), math.log(0.9)), ("1", math.log(p1)), ("0", math.log(1 - p1))])
        )
        tokens.append(("," if i < size - 1 else "]", -0.01, [(",", -0.01)]))
    return "[" + ",".join(map(str, bits)) + "]", tokens


def _delphi_client(peers, prompts_seen):
    client_mod = peers["clients.client"]

    @dataclass
    class Top:
        token: str
        logprob: float

    @dataclass
    class Logprob:
        token: str
        logprob: float
        top_logprobs: list

    class Scripted(client_mod.Client):
        async def generate(self, prompt, **kwargs):
            prompts_seen.append(prompt)
            text, tokens = _script(prompt)
            logprobs = [Logprob(t, lp, [Top(c, cl) for c, cl in top]) for t, lp, top in tokens]
            return client_mod.Response(text=text, logprobs=logprobs if kwargs.get("logprobs") else None)

    return Scripted("scripted")


def _whq_rows(scorer, test, negatives, explanation="numbers after w"):
    recipe = Recipe(examples_per_prompt=5)
    unit = Scoring(0, 7, "e", explanation, test, negatives, recipe, "m")
    finish = unit.plan_intruder() if scorer == "intruder" else unit.plan_classifier(scorer)
    answers = {}
    for request in unit.requests:
        text, tokens = _script([{"role": r, "content": c} for r, c in request.messages])
        answers[request.key] = Answer(text, [[t, lp, [list(c) for c in top]] for t, lp, top in tokens] or None)
    return unit.requests, finish(answers)


@pytest.mark.parametrize("scorer", ["detection", "fuzz"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_detection_and_fuzz_match_delphi(peers, scorer, seed):
    test, negatives = _windows(seed, 12, True), _windows(seed + 50, 13, False)
    cls = (
        peers["scorers.classifier.detection"].DetectionScorer
        if scorer == "detection"
        else (peers["scorers.classifier.fuzz"].FuzzingScorer)
    )
    seen = []
    delphi = cls(_delphi_client(peers, seen), n_examples_shown=5, log_prob=True)
    record = LatentRecord(
        [], [_delphi_example(w) for w in test], [_delphi_example(w) for w in negatives], explanation="numbers after w"
    )
    theirs = asyncio.run(delphi(record)).score

    requests, (rows, values, n, failed) = _whq_rows(scorer, test, negatives)
    assert [list(map(dict, p)) for p in seen] == [[{"role": r, "content": c} for r, c in q.messages] for q in requests]
    assert [(r["truth"], r["prediction"], r["probability"]) for r in rows] == [
        (o.activating, None if o.prediction is None else float(o.prediction), o.probability) for o in theirs
    ]
    analysis = peers["log.result_analysis"]
    import pandas as pd

    frame = pd.DataFrame(
        [{"activating": o.activating, "prediction": o.prediction, "probability": o.probability} for o in theirs]
    )
    expected = analysis.compute_classification_metrics(analysis.compute_confusion(frame))
    assert n == frame["prediction"].notna().sum() and failed == frame["prediction"].isna().sum()
    assert values["balanced_accuracy"] == pytest.approx(expected["accuracy"])
    assert values["f1"] == pytest.approx(expected["f1_score"])
    assert values["precision"] == pytest.approx(expected["precision"])
    assert values["recall"] == pytest.approx(expected["recall"])
    assert values["auc"] == pytest.approx(analysis.compute_auc(frame))


def test_intruder_matches_delphi(peers):
    test = _windows(7, 12, True, groups=("top", "random", "quantile"))
    negatives = _windows(70, 6, False)
    seen = []
    delphi = peers["scorers.classifier.intruder"].IntruderScorer(_delphi_client(peers, seen), n_examples_shown=5)
    record = LatentRecord([], [_delphi_example(w) for w in test], [_delphi_example(w) for w in negatives])
    theirs = asyncio.run(delphi(record)).score
    requests, (rows, values, n, failed) = _whq_rows("intruder", test, negatives)
    assert [list(map(dict, p)) for p in seen] == [[{"role": r, "content": c} for r, c in q.messages] for q in requests]
    assert values["accuracy"] == pytest.approx(np.mean([o.correct for o in theirs]))
    assert len(theirs) == len(requests) == n + failed


@pytest.mark.parametrize("contrastive", [False, True])
def test_explainer_prompts_match_delphi(peers, contrastive):
    shown, negatives = _windows(11, 6, True), _windows(12, 3, False)
    top = max(w.max_activation for w in shown)
    examples = [_delphi_example(w) for w in shown]
    peers["normalize"](examples, top)
    client = _delphi_client(peers, [])
    if contrastive:
        explainer = peers["explainers.contrastive_explainer"].ContrastiveExplainer(client)
        theirs = explainer._build_prompt(examples + [_delphi_example(w) for w in negatives])
        ours = prompts.delphi_contrastive(shown, negatives, top, "ceil")
    else:
        theirs = peers["explainers.default.default"].DefaultExplainer(client)._build_prompt(examples)
        ours = prompts.delphi_default(shown, top, "ceil")
    assert ours == theirs
    for text in ("[EXPLANATION]: plural nouns\n", "no label", "[EXPLANATION]:   "):
        parsed = peers["explainers.default.default"].DefaultExplainer(client).parse_explanation(text)
        assert prompts.parse_explanation(text) == (None if parsed == prompts.UNPARSED or not parsed else parsed)


@pytest.mark.parametrize("seed, sparse", [(21, False), (22, True)])
def test_openai_explainer_prompt_matches_neuron_explainer(peers, seed, sparse):
    shown = _windows(seed, 5, True)
    if sparse:  # under 20% non-zero: OpenAI repeats the non-zero activations
        shown = [
            Window(w.doc, w.pos, w.tokens * 3, w.values + [0.0] * (2 * len(w.values)), w.source, True) for w in shown
        ]
    explainer = peers["explainer"].TokenActivationPairExplainer(model_name=peers["explainer"].HARMONY_V4_MODELS[0])
    explainer._prompt_is_too_long = lambda *args: False  # counts tokens with tiktoken, absent here
    records = [peers["activations"].ActivationRecord(tokens=w.tokens, activations=w.values) for w in shown]
    theirs = explainer.make_explanation_prompt(
        all_activation_records=records,
        max_activation=peers["records"].calculate_max_activation(records),
        max_tokens_for_completion=60,
    )
    ours = prompts.openai_token_pairs(shown, "floor")
    assert ours == [{"role": str(m["role"].value), "content": m["content"]} for m in theirs]
    assert ("zeros filtered out" in ours[-1]["content"]) == sparse


def test_normalisation_matches_delphi_and_openai(peers):
    rng = np.random.default_rng(0)
    for _ in range(50):
        values = [float(v) for v in rng.normal(1, 2, 20)]
        top = max(values) if rng.random() < 0.8 else float(rng.uniform(0.5, 10))
        example = ActivatingExample(None, torch.tensor(values, dtype=torch.float64), [""] * 20)
        peers["normalize"]([example], top)
        assert prompts.normalise(values, top, "ceil") == example.normalized_activations.int().tolist()
        assert prompts.normalise(values, top, "floor") == peers["records"].normalize_activations(values, top)


def test_ev_correlation_matches_openai(peers):
    rng = np.random.default_rng(1)
    for n in (2, 5, 40, 400):
        true, predicted = rng.exponential(1, n).tolist(), rng.uniform(0, 10, n).tolist()
        assert metrics.correlation(true, predicted) == pytest.approx(
            peers["scoring"].correlation_score(true, predicted)
        )


def test_simulation_through_a_completions_server_matches_openai(peers):
    """whq's simulation scorer through an OpenAI-compatible completions endpoint (echo, prompt
    log-probabilities) against OpenAI's own code on the same scripted replies: its
    parse_simulation_response reads the expected values at each place, its
    aggregate_scored_sequence_simulations computes the ev_correlation_score over all windows."""
    from explain.llm import OpenAIBackend

    from .llm_server import ScriptedServer, simulation_answers

    simulator, explanations = peers["simulator"], peers["explanations"]
    test, negatives = _windows(11, 6, True), _windows(12, 3, False)
    unit = Scoring(0, 7, "e", "words that start with w", test, negatives, Recipe(), "openai:m")
    finish = unit.plan_simulation()
    with ScriptedServer(simulation_answers) as server:
        backend = OpenAIBackend(server.url, "m", None, 10.0)
        answers = {r.key: backend.send(r) for r in unit.requests}
        replies = [simulation_answers(body, i)[1] for i, body in enumerate(server.bodies)]
    rows, values, n, failed = finish(answers)
    assert (n, failed) == (9, 0)
    scored = []
    for w, reply, row in zip(negatives + test, replies, rows):
        simulation = simulator.parse_simulation_response(reply, simulator.PromptFormat.NONE, w.tokens)
        assert row["predicted_values"] == pytest.approx(simulation.expected_activations)
        true = list(w.values) if w.activating else [0.0] * len(w.tokens)
        scored.append(
            explanations.ScoredSequenceSimulation(
                simulation=simulation, true_activations=true, ev_correlation_score=0.0
            )
        )
    oracle = peers["scoring"].aggregate_scored_sequence_simulations(scored).ev_correlation_score
    assert values["ev_correlation"] == pytest.approx(oracle) and 0 < abs(oracle) < 1


def test_pooled_auc_matches_sklearn_through_delphi(peers):
    import pandas as pd

    rng = np.random.default_rng(2)
    for _ in range(20):
        truth = rng.random(30) < 0.4
        scores = np.round(rng.random(30), 1)  # ties on purpose
        frame = pd.DataFrame({"activating": truth, "probability": scores})
        assert metrics.roc_auc(truth.tolist(), scores.tolist()) == pytest.approx(
            peers["log.result_analysis"].compute_auc(frame)
        )

"""Prompts and strict answer parsing for the explainers and scorers.

The delphi recipes use delphi's own prompt text (explain/vendor/, verbatim) and its formatting
rules (highlighting, the Activations line, example numbering, batching), so the messages sent are
the ones delphi would send for the same examples. Document text reaches the model, and a document
can try to steer it ("ignore the above and answer 1"): answers are parsed strictly against the
expected form and anything else is unparsable (stored as such, counted, never executed).
"""

from __future__ import annotations

import json
import math
import operator
import random
import re
from collections import Counter

import numpy as np

from .examples import Window
from .vendor import (
    delphi_detection_prompt,
    delphi_explainer_prompts,
    delphi_fuzz_prompt,
    delphi_intruder_prompt,
)

L, R = "<<", ">>"
HIGHLIGHT_THRESHOLD = 0.3  # delphi's default explainer/scorer threshold (share of the example's max)
NORMALISATIONS = ("ceil", "floor")  # delphi rounds 10·a/max up, OpenAI down
UNPARSED = "Explanation could not be parsed."  # delphi's placeholder, never scored


def normalise(values: list[float], max_activation: float, how: str) -> list[int]:
    """Integers 0..10: delphi ceil(10·a/max) clamped to [0, 10]; OpenAI floor(10·relu(a)/max) capped at 10."""
    if how == "ceil":
        top = max(max_activation, 1e-6)
        return [int(min(10, max(0, math.ceil(v * 10 / top)))) for v in values]
    if max_activation <= 0:
        return [0] * len(values)
    return [min(10, math.floor(10 * max(v, 0.0) / max_activation)) for v in values]


# -- explainers ---------------------------------------------------------------------------
def _highlight_runs(tokens: list[str], values: list[float], threshold: float) -> str:
    """delphi Explainer._highlight: runs of tokens above max·threshold between << and >>."""
    cut = max(values, default=0.0) * threshold
    out, i = "", 0
    while i < len(tokens):
        if values[i] > cut:
            out += L
            while i < len(tokens) and values[i] > cut:
                out += tokens[i]
                i += 1
            out += R
        else:
            out += tokens[i]
            i += 1
    return out


def _activation_pairs(tokens: list[str], values: list[float], normalised: list[int], threshold: float) -> str:
    """delphi Explainer._join_activations (its 11-pair cap included)."""
    acts, count = "", 0
    for token, value, norm in zip(tokens, values, normalised):
        if value > max(values) * threshold:
            if count > 10:
                break
            acts += f'("{token}" : {int(norm)}), '
            count += 1
    return "Activations: " + acts


def delphi_default(examples: list[Window], max_activation: float, how: str, *, activations: bool = True) -> list[dict]:
    """delphi DefaultExplainer._build_prompt (cot off) + prompt_builder.build_prompt."""
    lines = []
    for ex in examples:
        lines.append(_highlight_runs(ex.tokens, ex.values, HIGHLIGHT_THRESHOLD))
        if activations:
            norm = normalise(ex.values, max_activation, how)
            lines.append(_activation_pairs(ex.tokens, ex.values, norm, HIGHLIGHT_THRESHOLD))
    messages = delphi_explainer_prompts.system(cot=False)
    for i in range(1, 4):
        prompt, response = delphi_explainer_prompts.example(i, activations=activations, cot=False)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    messages.append({"role": "user", "content": "\n" + "\n".join(lines) + "\n"})
    return messages


def delphi_contrastive(
    examples: list[Window], negatives: list[Window], max_activation: float, how: str, *, activations: bool = True
) -> list[dict]:
    """delphi ContrastiveExplainer._build_prompt (max 15 activating, 5 non-activating)."""
    lines = ["ACTIVATING EXAMPLES:"] if examples else []
    for i, ex in enumerate(examples[:15], 1):
        text = _highlight_runs(ex.tokens, ex.values, HIGHLIGHT_THRESHOLD).strip().replace("\n", "")
        lines.append(f"Example {i}:  {text}")
        if activations:
            norm = normalise(ex.values, max_activation, how)
            lines.append(_activation_pairs(ex.tokens, ex.values, norm, HIGHLIGHT_THRESHOLD))
    if negatives:
        lines.append("\nNON-ACTIVATING EXAMPLES:")
        for i, ex in enumerate(negatives[:5], 1):
            text = _highlight_runs(ex.tokens, ex.values, HIGHLIGHT_THRESHOLD).strip().replace("\n", "")
            lines.append(f"Example {i}:  {text}")
    return [
        {"role": "system", "content": delphi_explainer_prompts.SYSTEM_CONTRASTIVE},
        {"role": "user", "content": "\n".join(lines)},
    ]


# Control characters (tab and newline aside), C1 (U+0085 a line break) and the bidirectional overrides:
# an explanation holding one is refused by `whq import explanations` and shows as raw bytes in pages.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean_explanation(text: str | None) -> str | None:
    """An explanation as stored: its control characters (CONTROL) spaces (None when nothing is left)."""
    if text is None:
        return None
    return CONTROL.sub(" ", text).strip() or None


def parse_explanation(text: str) -> str | None:
    """delphi Explainer.parse_explanation: what follows [EXPLANATION]: (None when absent or empty)."""
    match = re.search(r"\[EXPLANATION\]:\s*(.*)", text, re.DOTALL)
    found = match.group(1).strip() if match else ""
    return found or None


# -- OpenAI's token-activation-pair explainer (neuron-explainer TokenActivationPairExplainer, HARMONY_V4,
# its ORIGINAL few-shot neurons, zeros repeated filtered out below 20% non-zero) --------------------------
OPENAI_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular "
    "thing in a short document. Look at the parts of the document the neuron activates for "
    "and summarize in a single sentence what the neuron is looking for. Don't list "
    "examples of words.\n\nThe activation format is token<tab>activation. Activation "
    "values range from 0 to 10. A neuron finding what it's looking for is represented by a "
    "non-zero activation value. The higher the activation value, the stronger the match."
)
OPENAI_PREFIX = "the main thing this neuron does is find"


def _openai_records(records: list[tuple[list[str], list[float]]], top: float, how: str, omit_zeros: bool) -> str:
    """neuron-explainer format_activation_records: token<TAB>value lines between <start> and <end>."""
    blocks = []
    for tokens, values in records:
        norm = normalise(values, top, how)
        pairs = [(t, a) for t, a in zip(tokens, norm) if a > 0 or not omit_zeros]
        blocks.append("\n".join(f"{t}\t{a}" for t, a in pairs))
    return "\n<start>\n" + "\n<end>\n<start>\n".join(blocks) + "\n<end>\n"


def _openai_neuron(records, index: int, how: str) -> str:
    top = max(max(max(v, 0.0) for v in values) for _, values in records)
    message = f"\n\nNeuron {index + 1}\nActivations:{_openai_records(records, top, how, False)}"
    norms = [normalise(values, top, how) for _, values in records]
    if sum(1 for n in norms for a in n if a != 0) / sum(len(n) for n in norms) < 0.2:
        message += f"\nSame activations, but with all zeros filtered out:{_openai_records(records, top, how, True)}"
    return message + f"\nExplanation of neuron {index + 1} behavior: {OPENAI_PREFIX}"


def openai_token_pairs(examples: list[Window], how: str) -> list[dict]:
    """OpenAI TokenActivationPairExplainer.make_explanation_prompt (4k context, no record omitted)."""
    import importlib.resources

    shots = json.loads(
        importlib.resources.files("explain.vendor").joinpath("openai_few_shot_original.json").read_text()
    )["examples"]
    messages = [{"role": "system", "content": OPENAI_SYSTEM}]
    for i, shot in enumerate(shots):
        records = [(r["tokens"], r["activations"]) for r in shot["records"]]
        messages.append({"role": "user", "content": _openai_neuron(records, i, how)})
        messages.append({"role": "assistant", "content": f" {shot['explanation']}."})
    records = [(ex.tokens, ex.values) for ex in examples]
    messages.append({"role": "user", "content": _openai_neuron(records, len(shots), how)})
    return messages


def parse_openai_explanation(text: str) -> str | None:
    """The completion continues the prefix: its first line, without a final period (None when empty)."""
    line = text.strip().split("\n", 1)[0].strip()
    line = line[:-1] if line.endswith(".") else line
    return line or None


def top_tokens(examples: list[Window], k: int = 5) -> str:
    """The no-model explainer: the tokens most often firing (above 0.3 of their example's max) in the
    explanation examples, in one fixed sentence."""
    counts: Counter = Counter()
    for ex in examples:
        cut = ex.max_activation * HIGHLIGHT_THRESHOLD
        for token, value in zip(ex.tokens, ex.values):
            if value > cut and token.strip():
                counts[token.strip()] += 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    if not ranked:
        return "Fires on no recognisable token."
    return "Fires on the tokens " + ", ".join(json.dumps(t, ensure_ascii=False) for t, _ in ranked) + "."


# -- classifier scorers (detection, fuzz) -------------------------------------------------
def fuzz_text(ex: Window, n_incorrect: int) -> str:
    """delphi sample._prepare_text with highlighting: firing tokens (>= 0.3·max) of an activating
    example, or n_incorrect tokens at or below that of a non-activating one (the token at
    len - len//4 first, the rest drawn by random.seed(22) as delphi does)."""
    cut = HIGHLIGHT_THRESHOLD * ex.max_activation
    if n_incorrect == 0:
        marked = {i for i, v in enumerate(ex.values) if v >= cut}
    else:
        below = [i for i, v in enumerate(ex.values) if v <= cut]
        if len(below) < 2:  # delphi's torch.nonzero(...).squeeze() is 0-d for one index: its default message
            return delphi_default_message()
        rng = random.Random(22)
        k = min(n_incorrect, len(below))
        at = len(ex.tokens) - len(ex.tokens) // 4
        if at in below:
            marked = [at]
            rest = [i for i in below if i != at]
            if k - 1 > 0:
                marked += rng.sample(rest, k - 1)
        else:
            marked = rng.sample(below, k)
        marked = set(marked)
    out, i = [], 0
    while i < len(ex.tokens):
        flag = i in marked
        group = []
        while i < len(ex.tokens) and (i in marked) == flag:
            group.append(ex.tokens[i])
            i += 1
        out.append(L + "".join(group) + R if flag else "".join(group))
    return "".join(out)


def delphi_default_message() -> str:
    return "<<NNsight>> is the best library for <<interpretability>> on huge models!"


def classifier_prompt(scorer: str, explanation: str, texts: list[str]) -> list[dict]:
    examples = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts))
    module = delphi_detection_prompt if scorer == "detection" else delphi_fuzz_prompt
    return module.prompt(examples, explanation)


def parse_binary(text: str, n: int, tokens: list | None) -> tuple[list[int], list[float | None]] | None:
    """delphi Classifier._parse, strictly: the first [...] must be a JSON list of exactly n values,
    each 0 or 1; probabilities P(1)/(P(0)+P(1)) from the top log-probabilities of each generated
    token holding a 0 or 1 (there must be exactly n of them), else None each. None when out of form."""
    match = re.search(r"\[.*?\]", text)
    if match is None:
        return None
    try:
        values = json.loads(match.group(0))
    except ValueError:
        return None
    if not isinstance(values, list) or len(values) != n or any(v not in (0, 1) or isinstance(v, float) for v in values):
        return None
    predictions = [int(v) for v in values]
    probabilities: list[float | None] = [None] * n
    if tokens:
        found = []
        for token, _, top in tokens:
            if "1" in token or "0" in token:
                p0 = p1 = 0.0
                for cand, logprob in top:
                    if "0" in cand:
                        p0 += math.exp(logprob)
                    elif "1" in cand:
                        p1 += math.exp(logprob)
                found.append(p1 / (p0 + p1) if p0 + p1 > 0 else 0.0)
        if len(found) == n:
            probabilities = found
    return predictions, probabilities


def n_incorrect(test: list[Window]) -> int:
    """delphi FuzzingScorer.mean_n_activations_ceil: ceil of the mean count of non-zero values."""
    return math.ceil(sum(sum(1 for v in ex.values if v != 0) for ex in test) / len(test)) if test else 0


# -- intruder -----------------------------------------------------------------------------
def intruder_prompt(texts: list[str]) -> list[dict]:
    examples = "\n".join(f"Example {i}:{t}" for i, t in enumerate(texts))
    return delphi_intruder_prompt.prompt(examples, cot=False)


def parse_intruder(text: str, n: int) -> int | None:
    """delphi IntruderScorer._parse: the integer after the first [RESPONSE]:, within 0..n-1."""
    match = re.search(r"\[RESPONSE\]:", text)
    if match is None:
        return None
    after = text[match.end() :].strip()
    if not re.fullmatch(r"[+-]?\d+", after):
        return None
    value = int(after)
    return value if 0 <= value < n else None


# -- simulation ---------------------------------------------------------------------------
MARK = "\x00"
SIMULATION_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Look at an explanation of what the neuron does, and try to predict its activations on each "
    'token.\n\nThe activation format is token<tab>activation, activations go from 0 to 10, "unknown" '
    "indicates an unknown activation. Most activations will be 0."
)


def simulation_request(explanation: str, ex: Window) -> tuple[list[dict], str]:
    """OpenAI's all-at-once simulation: the tokens listed with unknown activations; the answer lists
    them again and the model's distribution over 0..10 is read at each activation's place."""
    listing = "".join(f"{t}\tunknown\n" for t in ex.tokens)
    user = (
        f"Neuron 1\nExplanation of neuron 1 behavior: the main thing this neuron does is find {explanation}\n\n"
        f"Activations:\n<start>\n{listing}<end>"
    )
    forced = "<start>\n" + "".join(f"{t}\t{MARK}\n" for t in ex.tokens) + "<end>"
    return [{"role": "system", "content": SIMULATION_SYSTEM}, {"role": "user", "content": user}], forced


_ANSWERS = {str(v): v for v in range(11)}


def _logprob_table(marks: list[dict[str, float]]) -> tuple[list[str], list]:
    """(answers, rows): each marker's log-probabilities of the same answers, -inf where one is absent."""
    answers = list(marks[0])
    # A model's answers usually name the same tokens at every marker (a local model: those of one
    # token): read them in one pass instead of looking each answer up.
    if all(len(d) == len(answers) for d in marks):
        pick = operator.itemgetter(*answers)
        try:
            return answers, [pick(d) if len(answers) > 1 else (pick(d),) for d in marks]
        except KeyError:
            pass
    answers = list(_ANSWERS)
    return answers, [[d.get(k, -np.inf) for k in answers] for d in marks]


def expected_values(marks: list[dict[str, float]]) -> list[float]:
    """OpenAI's expected value at each marker over the answers 0..10 present (tokens spelled exactly "0"
    to "10", as its VALID_ACTIVATION_TOKENS), probabilities renormalised over them; 0 where none is."""
    if all(not d for d in marks):
        return [0.0] * len(marks)
    answers, rows = _logprob_table(marks)
    valid = [i for i, k in enumerate(answers) if k in _ANSWERS]
    logprobs = np.array(rows, dtype=np.float64).reshape(len(marks), len(answers))[:, valid]
    probabilities = np.exp(logprobs)
    total = probabilities.sum(axis=1)
    weighted = probabilities @ np.array([_ANSWERS[answers[i]] for i in valid], dtype=np.float64)
    return np.where(total > 0, weighted / np.where(total > 0, total, 1.0), 0.0).tolist()

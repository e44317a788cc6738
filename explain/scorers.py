"""The scorers: for one explanation, the calls each scorer makes and how its answers become rows and metrics.

Each plan_* method adds its requests to `requests` and returns a finisher that takes the answers
(by request hash) and returns (example rows, metrics, examples counted, unparsable); embedding needs
no model call. The recipes and their sources are in docs/explain.md.
"""

from __future__ import annotations

import random
from itertools import cycle

from . import examples as ex
from . import metrics, prompts
from .llm import TOP_LOGPROBS, Request, messages


def example_row(exp_id, neuron, scorer, role, w: ex.Window, **verdict) -> dict:
    row = dict(
        neuron=neuron,
        explanation_id=exp_id,
        scorer=scorer,
        model=None,
        role=role,
        source=w.source,
        doc=w.doc,
        pos=w.pos,
        quantile=w.quantile,
        truth=w.activating,
        value=w.value,
        prediction=None,
        probability=None,
        correct=None,
        parsed=None,
        request_hash=None,
        true_values=None,
        predicted_values=None,
    )
    row.update(verdict)
    return row


class Scoring:
    """One explanation's test material and the rows its scorers produce."""

    def __init__(self, layer, neuron, exp_id, text, test, negatives, recipe, model):
        self.layer, self.neuron, self.exp_id, self.text = layer, neuron, exp_id, text
        self.test, self.negatives, self.recipe, self.model = test, negatives, recipe, model
        self.requests: list[Request] = []

    def _request(self, msgs, **kw) -> Request:
        request = Request(self.model, messages(msgs), seed=self.recipe.seed, **kw)
        self.requests.append(request)
        return request

    # classifier scorers: one prompt per batch of examples_per_prompt shuffled samples
    def plan_classifier(self, scorer: str):
        if scorer == "detection":
            samples = [(w, w.text) for w in self.negatives] + [(w, w.text) for w in self.test]
        else:
            wrong = prompts.n_incorrect(self.test)
            samples = [(w, prompts.fuzz_text(w, wrong)) for w in self.negatives]
            samples += [(w, prompts.fuzz_text(w, 0)) for w in self.test]
        random.Random(42).shuffle(samples)  # delphi Classifier: rng = random.Random(42)
        size = self.recipe.examples_per_prompt
        batches = [samples[i : i + size] for i in range(0, len(samples), size)]
        planned = [
            (
                batch,
                self._request(
                    prompts.classifier_prompt(scorer, self.text, [t for _, t in batch]),
                    max_tokens=self.recipe.answer_tokens,
                    logprobs=True,
                    top_logprobs=TOP_LOGPROBS,
                ),
            )
            for batch in batches
        ]

        def finish(answers):
            rows = []
            for batch, request in planned:
                answer = answers[request.key]
                parsed = prompts.parse_binary(answer.text, len(batch), answer.tokens)
                for i, (w, _) in enumerate(batch):
                    role = "test" if w.activating else "non-activating"
                    if parsed is None:
                        rows.append(
                            example_row(
                                self.exp_id, self.neuron, scorer, role, w, parsed=False, request_hash=request.key
                            )
                        )
                        continue
                    pred, prob = parsed[0][i], parsed[1][i]
                    rows.append(
                        example_row(
                            self.exp_id,
                            self.neuron,
                            scorer,
                            role,
                            w,
                            prediction=float(pred),
                            probability=prob,
                            correct=bool(pred) == w.activating,
                            parsed=True,
                            request_hash=request.key,
                        )
                    )
            truth = [r["truth"] for r in rows]
            conf = metrics.confusion(truth, [r["prediction"] for r in rows])
            values = metrics.classification(conf) if conf["total"] else dict.fromkeys(metrics.CLASSIFICATION)
            values["auc"] = metrics.roc_auc(truth, [r["probability"] for r in rows])
            return rows, values, conf["total"], sum(1 for r in rows if not r["parsed"])

        return finish

    def plan_intruder(self):
        groups: dict = {}
        for w in self.test:
            groups.setdefault(w.quantile if w.quantile is not None else w.source, []).append(w)
        rng = random.Random(42)
        trials = []
        if groups:
            for (_, group), intruder in zip(cycle(groups.items()), self.negatives):
                shown = rng.sample(group, min(self.recipe.examples_per_prompt - 1, len(group)))
                texts = [prompts.fuzz_text(w, 0) for w in shown]
                active_tokens = sum(sum(1 for v in w.values if v > 0) for w in shown)
                wrong = 0 if intruder.max_activation > 0 else active_tokens // len(shown)
                at = rng.randint(0, len(shown))
                texts = texts[:at] + [prompts.fuzz_text(intruder, wrong)] + texts[at:]
                windows = shown[:at] + [intruder] + shown[at:]
                request = self._request(prompts.intruder_prompt(texts), max_tokens=self.recipe.answer_tokens)
                trials.append((windows, at, request))

        def finish(answers):
            rows, correct, failed = [], 0, 0
            for windows, at, request in trials:
                picked = prompts.parse_intruder(answers[request.key].text, len(windows))
                failed += picked is None
                correct += picked == at
                for i, w in enumerate(windows):
                    role = "non-activating" if i == at else "test"
                    rows.append(
                        example_row(
                            self.exp_id,
                            self.neuron,
                            "intruder",
                            role,
                            w,
                            parsed=picked is not None,
                            prediction=None if picked is None else float(picked == i),
                            correct=(picked == at) if i == at else None,
                            request_hash=request.key,
                        )
                    )
            accuracy = correct / len(trials) if trials else None  # delphi: an unparsed trial is a wrong one
            return rows, {"accuracy": accuracy}, len(trials) - failed, failed

        return finish

    def plan_simulation(self):
        planned = []
        for w in self.negatives + self.test:
            msgs, forced = prompts.simulation_request(self.text, w)
            request = self._request(msgs, max_tokens=0, logprobs=True, forced=forced, marker=prompts.MARK)
            planned.append((w, request))

        def finish(answers):
            rows, groups, all_true, all_pred, failed = [], {}, [], [], 0
            for w, request in planned:
                marks = answers[request.key].marks or []
                role = "test" if w.activating else "non-activating"
                if len(marks) != len(w.tokens):
                    failed += 1
                    rows.append(
                        example_row(
                            self.exp_id, self.neuron, "simulation", role, w, parsed=False, request_hash=request.key
                        )
                    )
                    continue
                predicted = prompts.expected_values(marks)
                true = list(w.values) if w.activating else [0.0] * len(w.tokens)
                at = next((i for i, t in enumerate(true) if t == max(true)), 0)
                rows.append(
                    example_row(
                        self.exp_id,
                        self.neuron,
                        "simulation",
                        role,
                        w,
                        parsed=True,
                        prediction=predicted[at] if predicted else None,
                        request_hash=request.key,
                        true_values=true,
                        predicted_values=predicted,
                    )
                )
                all_true += true
                all_pred += predicted
                if w.activating:
                    key = f"q{w.quantile}" if w.quantile is not None else w.source
                    groups.setdefault(key, ([], []))
                    groups[key][0].extend(true)
                    groups[key][1].extend(predicted)
            values = {"ev_correlation": _finite(metrics.correlation(all_true, all_pred))}
            for key, (true, pred) in sorted(groups.items()):
                values[f"ev_correlation_{key}"] = _finite(metrics.correlation(true, pred))
            return rows, values, len(planned) - failed, failed

        return finish

    def embedding(self):
        from .embed import QUERY_PREFIX, cosine, embed

        windows = self.negatives + self.test
        vectors = embed([QUERY_PREFIX + self.text] + [w.text for w in windows])
        rows = []
        for w, vector in zip(windows, vectors[1:]):
            role = "test" if w.activating else "non-activating"
            rows.append(
                example_row(
                    self.exp_id, self.neuron, "embedding", role, w, parsed=True, prediction=cosine(vectors[0], vector)
                )
            )
        auc = metrics.roc_auc([r["truth"] for r in rows], [r["prediction"] for r in rows])
        return rows, {"auc": auc}, len(rows), 0


def _finite(value: float) -> float | None:
    return None if value != value else value

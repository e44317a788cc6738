"""The `similar` non-activating source (delphi's FAISS hard negatives, brute force): the windows it
picks equal an independent numpy computation from the raw tables (candidate windows, firings,
MiniLM vectors, cosine ranking, delphi's per-query collection), and it plugs into whq score."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import warehouse
from explain import examples as ex
from explain.embed import embed
from explain.hard_negatives import nearest

from .cli_runner import run_whq

RUN, SITE = "r", "mlp.act"
TOPICS = [
    "The cat chased a mouse across the barn while the dog slept near the horse and the cows grazed.",
    "Add 17 and 42 to get 59, then multiply by 3 to reach 177 before dividing by 7 and rounding down.",
    "def parse(line): return [int(x) for x in line.split(',') if x.strip()]  # integers from a csv row",
    "Paris, Berlin and Madrid are capitals; Lyon, Hamburg and Seville are large cities on rivers.",
    "Heavy rain and strong winds are expected tomorrow, with snow in the mountains and fog on the coast.",
    "Whisk two eggs with flour and milk, melt the butter in a pan, and fry the batter until golden brown.",
]


@pytest.fixture(scope="module")
def hn_root(tmp_path_factory):
    """MiniLM over 16 documents of 3 to 6 themed sentences (two or three 71-token blocks each),
    mlp.act captured by threshold (so every firing is stored and a window without one is exact)."""
    from ingest.pipeline import ingest

    folder = tmp_path_factory.mktemp("hard-negatives")
    rng = random.Random(0)
    with open(folder / "docs.jsonl", "w") as fh:
        for i in range(16):
            text = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(3, 6)))
            fh.write(json.dumps({"doc_id": f"d{i}", "text": text}) + "\n")
    root = folder / "wh"
    ingest(root, "minilm", [str(folder / "docs.jsonl")], ["mlp.act:threshold=1.5,examples=5"], run_id=RUN,
           batch_size=8, max_length=256, device="cpu", progress=False)  # fmt: skip
    return root


_WINDOWS: dict[str, tuple] = {}


def windows_of(wh) -> tuple[list[tuple[int, int, str]], np.ndarray]:
    """(doc, centre, text) of every 71-token block's window in document order, and their MiniLM vectors."""
    if str(wh.root) not in _WINDOWS:
        docs: dict[int, list[tuple[int, bool, str]]] = {}
        for doc, pos, special, text in wh.sql(
            "SELECT doc, pos, special, coalesce(text, piece) FROM tokens WHERE run_id = ? ORDER BY doc, pos", [RUN]
        ).fetchall():
            docs.setdefault(doc, []).append((pos, special, text or ""))
        windows = []
        for doc, rows in sorted(docs.items()):
            blocks: dict[int, list[int]] = {}
            for pos, special, _ in rows:
                if not special:
                    blocks.setdefault(pos // 71, []).append(pos)
            for _, positions in sorted(blocks.items()):
                centre = min(positions, key=lambda p: (abs(p % 71 - 50), p % 71))
                text = "".join(t for p, s, t in rows if not s and centre - 50 <= p <= centre + 20)
                windows.append((doc, centre, text))
        _WINDOWS[str(wh.root)] = windows, np.array(embed([t for _, _, t in windows]))
    return _WINDOWS[str(wh.root)]


def reference(wh, layer: int, neuron: int, n: int) -> list[tuple[int, int]]:
    """The hard negatives computed from the raw tables with plain Python and numpy."""
    windows, vectors = windows_of(wh)
    ((threshold,),) = wh.sql(
        "SELECT coalesce(threshold, 0) FROM sites WHERE run_id = ? AND site = ?", [RUN, SITE]
    ).fetchall()
    fired = set(
        wh.sql(
            "SELECT doc, pos FROM token_neurons WHERE run_id = ? AND site = ? AND layer = ? AND neuron = ? AND value > ?",
            [RUN, SITE, layer, neuron, threshold],
        ).fetchall()
    )
    eligible = [i for i, (doc, c, _) in enumerate(windows) if not any((doc, p) in fired for p in range(c - 50, c + 21))]
    tops = [w for w in ex.stored_examples(wh, RUN, SITE, layer, [neuron])[neuron] if w.source == "top"][:10]
    ex.read_windows(wh, RUN, SITE, layer, tops)
    queries = np.array(embed([w.text for w in tops]))
    cosine = (queries @ vectors[eligible].T) / np.outer(
        np.linalg.norm(queries, axis=1), np.linalg.norm(vectors[eligible], axis=1)
    )
    taken: list[int] = []
    for row in cosine:
        ranked = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))[:n]
        taken += [i for i in ranked if i not in taken][: n - len(taken)]
    return [windows[eligible[i]][:2] for i in taken]


def _units(wh, layer: int) -> list[int]:
    """Units of the layer that fire in some but not all documents: their candidates are a real choice."""
    return [
        n
        for (n,) in wh.sql(
            "SELECT neuron FROM token_neurons WHERE run_id = ? AND site = ? AND layer = ? "
            "GROUP BY neuron HAVING count(DISTINCT doc) BETWEEN 2 AND 8 ORDER BY count(*) DESC, neuron LIMIT 4",
            [RUN, SITE, layer],
        ).fetchall()
    ]


@pytest.mark.parametrize("layer", [1, 5])
def test_similar_windows_equal_a_numpy_computation(hn_root, layer):
    wh = warehouse.open(hn_root)
    units = _units(wh, layer)
    assert len(units) == 4
    for i, neuron in enumerate(units):
        for n in (3, 8) if i == 0 else (5,):
            got = ex.NON_ACTIVATING_SOURCES["similar"](wh, RUN, SITE, layer, neuron, n, 0)
            expected = reference(wh, layer, neuron, n)
            assert [w.key for w in got] == expected and len(expected) == n
            exact = ex._exactness(wh, RUN, SITE, layer)[neuron]  # the rule every source follows
            assert {w.source for w in got} == {"similar" if exact else "similar~"} and not any(
                w.activating for w in got
            )
            assert all(w.text.strip() and w.values == [0.0] * len(w.tokens) for w in got)
    wh.close()


def test_nearest_is_delphis_per_query_collection():
    rng = np.random.default_rng(3)
    queries = rng.normal(size=(4, 8))
    candidates = rng.normal(size=(30, 8))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    for n in (1, 5, 12, 40):
        expected: list[int] = []
        for q in queries:
            distances = ((candidates - q) ** 2).sum(axis=1)  # FAISS IndexFlatL2's order
            for i in np.argsort(distances, kind="stable")[:n]:
                if i not in expected and len(expected) < n:
                    expected.append(int(i))
        assert nearest(queries, candidates, n) == expected


def test_score_with_similar_non_activating_examples(hn_root, tmp_path):
    import shutil

    root = tmp_path / "wh"
    shutil.copytree(hn_root, root)
    for command in (
        ("explain", root, "--run", RUN, "--site", SITE, "--layers", "2", "--units", "rate < 0.03", "--limit", "2", "-q"),
        ("score", root, "--run", RUN, "--site", SITE, "--layers", "2", "--scorer", "embedding",
         "--non-activating", "similar", "--n-non-activating", "4", "-q"),
    ):  # fmt: skip
        code, _, err = run_whq(*command)
        assert code == 0, err
    wh = warehouse.open(root)
    rows = wh.sql(
        "SELECT neuron, doc, pos FROM explanation_examples WHERE scorer = 'embedding' AND role = 'non-activating' "
        "ORDER BY neuron, source"
    ).fetchall()
    sources = {s for (s,) in wh.sql("SELECT DISTINCT source FROM explanation_examples WHERE NOT truth").fetchall()}
    assert sources <= {"similar", "similar~"} and len(rows) == 8
    for neuron in {r[0] for r in rows}:
        picked = [(d, p) for u, d, p in rows if u == neuron]
        assert sorted(picked) == sorted(reference(wh, 2, neuron, 4))
    wh.close()


def _delphi_faiss_windows():
    """delphi's faiss_non_activation_windows itself, run alone (its module imports faiss, jaxtyping and
    sentence-transformers, which the test extra leaves out): FAISS's exact IndexFlatL2 in numpy, the
    sentence-transformers model as the shipped MiniLM (explain.embed, the same all-MiniLM-L6-v2)."""
    import __future__

    import ast
    import hashlib
    import importlib.util
    import logging
    import os
    from pathlib import Path

    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("delphi")
    if spec is None:
        pytest.skip("eai-delphi is in the test extra (pip install --no-deps)")
    source = Path(spec.submodule_search_locations[0]) / "latents" / "constructors.py"
    tree = ast.parse(source.read_text())
    wanted = {"faiss_non_activation_windows", "create_token_key"}
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]

    class IndexFlatL2:
        def __init__(self, dim):
            self.vectors = np.zeros((0, dim), dtype=np.float32)

        def add(self, vectors):
            self.vectors = np.concatenate([self.vectors, np.asarray(vectors, dtype=np.float32)])

        def search(self, queries, k):
            distances = ((self.vectors[None, :, :] - queries[:, None, :]) ** 2).sum(axis=2)
            order = np.argsort(distances, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(distances, order, axis=1), order

    class Encoder:
        def encode(self, texts, show_progress_bar=False):
            return np.asarray(embed(list(texts)), dtype=np.float32)

    namespace = {
        "torch": torch,
        "np": np,
        "os": os,
        "Path": Path,
        "hashlib": hashlib,
        "faiss": type("faiss", (), {"IndexFlatL2": IndexFlatL2}),
        "get_model": lambda name: Encoder(),
        "logger": logging.getLogger("delphi"),
        "prepare_non_activating_examples": lambda tokens, activations, distance, tokenizer: tokens,
    }
    code = compile(ast.Module(functions, []), str(source), "exec", flags=__future__.annotations.compiler_flag)
    exec(code, namespace)
    return namespace["faiss_non_activation_windows"], torch


def test_similar_windows_equal_delphis_own_faiss_source(hn_root):
    """The same candidate windows and top examples given to delphi's own function: it picks the same
    windows. Its token ids here are characters (so decoding and joining gives each window's text), each
    row padded with ids that decode to nothing and ending in one naming its window."""
    faiss_windows, torch = _delphi_faiss_windows()
    mark = 0x110001  # ids from here decode to nothing and name a window

    def decode(row):
        return [chr(int(i) - 1) if 0 < int(i) < mark else "" for i in row]

    def rows(texts, marks):
        width = max(len(t) for t in texts) + 1
        return torch.tensor([[ord(c) + 1 for c in t] + [0] * (width - 1 - len(t)) + [m] for t, m in zip(texts, marks)])

    tokenizer = type("Tokenizer", (), {"batch_decode": staticmethod(decode)})
    wh = warehouse.open(hn_root)
    windows, _ = windows_of(wh)
    candidates = rows([t for _, _, t in windows], [mark + k for k in range(len(windows))])
    layer, n = 2, 5
    for neuron in _units(wh, layer)[:3]:
        got = ex.NON_ACTIVATING_SOURCES["similar"](wh, RUN, SITE, layer, neuron, n, 0)
        tops = [w for w in ex.stored_examples(wh, RUN, SITE, layer, [neuron])[neuron] if w.source == "top"]
        ex.read_windows(wh, RUN, SITE, layer, tops)
        fired = set(
            wh.sql(
                "SELECT doc, pos FROM token_neurons WHERE run_id = ? AND site = ? AND layer = ? AND neuron = ? "
                "AND value > (SELECT coalesce(threshold, 0) FROM sites WHERE run_id = ? AND site = ?)",
                [RUN, SITE, layer, neuron, RUN, SITE],
            ).fetchall()
        )
        available = [
            k for k, (doc, c, _) in enumerate(windows) if not any((doc, p) in fired for p in range(c - 50, c + 21))
        ]
        examples = rows([w.text for w in tops], [mark] * len(tops))
        record = type("LatentRecord", (), {"examples": [type("Example", (), {"tokens": r})() for r in examples]})()
        picked = faiss_windows(
            available_indices=torch.tensor(available),
            record=record,
            tokens=candidates,
            ctx_len=candidates.shape[1],
            tokenizer=tokenizer,
            n_not_active=n,
            cache_enabled=False,
        )
        assert [w.key for w in got] == [windows[int(r[-1]) - mark][:2] for r in picked] and len(got) == n
    wh.close()

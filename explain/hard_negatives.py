"""The `similar` non-activating source: delphi's FAISS hard negatives, by brute force.

delphi (latents/constructors.py, `faiss_non_activation_windows`) embeds every context window where
the latent does not fire with all-MiniLM-L6-v2, then for each of the first 10 activating examples in
turn takes its n nearest windows (an exact L2 index over normalised vectors: the n of highest cosine)
and keeps those not taken yet, until it has n. whq does the same with the shipped MiniLM
(explain.embed) over its own windows and numpy in place of FAISS (an exact search either way):

- the candidate windows are one per 71-token block of each document (delphi's windows are
  fixed-length chunks of the token stream): centred on the block's non-special token nearest its
  51st place, so the window (50 tokens before to 20 after) covers the block; they are embedded once
  per run and command (`candidate_windows`, cached for the committed run);
- a unit's candidates are those whose window holds no stored firing of it (the exactness rule of the
  other sources: `similar~` where a top-k capture may hide a firing);
- the queries are its 10 strongest stored top examples, in rank order.

Where fewer candidates than n exist, delphi returns none; whq returns those there are.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

BLOCK = 71  # tokens a window spans: 50 before, the centre, 20 after (explain.examples.BEFORE / AFTER)
CENTRE = 50  # the centre's place in its block
QUERIES = 10  # delphi: the first 10 activating examples


@dataclasses.dataclass
class Candidates:
    """Every candidate window of a run: document, centre, tokens and MiniLM vector (one row each)."""

    docs: list[int]
    centres: list[int]
    tokens: list[list[str]]
    vectors: np.ndarray  # (windows, 384) float32, L2-normalised


_CANDIDATES: dict[tuple, Candidates] = {}


def candidate_windows(wh, run: str) -> Candidates:
    """The run's candidate windows, embedded once per committed run in this process."""
    from .examples import _run_key, _token_windows

    key = _run_key(wh, run)
    if key not in _CANDIDATES:
        from .embed import embed

        centres = wh.sql(
            f"""
            SELECT doc, arg_min(pos, abs(pos % {BLOCK} - {CENTRE}) * {BLOCK} + pos % {BLOCK}) AS centre
            FROM tokens WHERE run_id = $run AND NOT special
            GROUP BY doc, pos // {BLOCK} ORDER BY doc, centre
            """,
            {"run": run},
        ).fetchall()
        windows = [(d, c, toks) for (d, c), toks in zip(centres, _token_windows(wh, run, centres)) if toks]
        vectors = embed(["".join(tokens) for _, _, tokens in windows]) if windows else []
        _CANDIDATES[key] = Candidates(
            docs=[d for d, _, _ in windows],
            centres=[c for _, c, _ in windows],
            tokens=[t for _, _, t in windows],
            vectors=np.asarray(vectors, dtype=np.float32).reshape(len(windows), -1),
        )
    return _CANDIDATES[key]


def nearest(queries: np.ndarray, candidates: np.ndarray, n: int) -> list[int]:
    """delphi's collection: for each query in turn, its n candidates of highest cosine (ties: the
    earlier candidate), those not yet taken, until n are taken. Rows are L2-normalised."""
    if n <= 0 or not len(candidates) or not len(queries):
        return []
    similarity = queries @ candidates.T
    taken: list[int] = []
    for row in similarity:
        if len(taken) >= n:
            break
        for i in np.argsort(-row, kind="stable")[:n]:
            if int(i) not in taken and len(taken) < n:
                taken.append(int(i))
    return taken


def _firings(wh, run: str, site: str, layer: int, neuron: int) -> dict[int, list[int]]:
    from .examples import FIRED  # examples registers this module's source: imported here, not at the top

    rows = wh.sql(
        f"WITH {FIRED} SELECT doc, list(pos ORDER BY pos) FROM fired GROUP BY doc",
        {"run": run, "site": site, "layer": layer, "neuron": neuron},
    ).fetchall()
    return dict(rows)


def similar(wh, run: str, site: str, layer: int, neuron: int, n: int, seed: int):
    """Up to n windows holding no stored firing of the unit whose text is nearest (MiniLM cosine) to
    its strongest top examples, in delphi's order. Deterministic: `seed` is not needed."""
    from .examples import AFTER, BEFORE, Window, _exactness, read_windows, stored_examples

    if n <= 0:
        return []
    top = [w for w in stored_examples(wh, run, site, layer, [neuron]).get(neuron, []) if w.source == "top"][:QUERIES]
    if not top:
        return []
    read_windows(wh, run, site, layer, top)
    from .embed import embed

    pool = candidate_windows(wh, run)
    fired = _firings(wh, run, site, layer, neuron)
    eligible = []
    for i, (doc, centre) in enumerate(zip(pool.docs, pool.centres)):
        positions = fired.get(doc, [])
        first = bisect.bisect_left(positions, centre - BEFORE)
        if first == len(positions) or positions[first] > centre + AFTER:
            eligible.append(i)
    queries = np.asarray(embed([w.text for w in top]), dtype=np.float32)
    chosen = [eligible[i] for i in nearest(queries, pool.vectors[eligible], n)]
    source = "similar" if _exactness(wh, run, site, layer).get(neuron, False) else "similar~"
    return [
        Window(pool.docs[i], pool.centres[i], pool.tokens[i], [0.0] * len(pool.tokens[i]), source, False)
        for i in chosen
    ]

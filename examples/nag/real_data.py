"""NAG on real text, end to end: a Shakespeare target ranks a mixed pool, through MiniLM and a tiny Qwen3.

The target is 40 passages of Tiny Shakespeare; the pool holds other Shakespeare
passages and three kinds of text every Python install carries: the standard library's
source, its documentation (pydoc_data's language reference) and its licence, each
labelled as a dataset. Both sets go through the real all-MiniLM-L6-v2 and through a
tiny random Qwen3 (`config:qwen3-tiny`, for the up_proj path); 20% of the pool's tokens
are selected and the mean distance of each pool dataset is printed.

    python examples/nag/real_data.py [--root DIR] [--text ../shared/data/tinyshakespeare.txt]

The warehouse goes to examples/nag/out/wh (ignored by git) unless --root names another folder.
"""

from __future__ import annotations

import argparse
import ast
import re
import sysconfig
from pathlib import Path

import polars as pl

import warehouse
from ingest.pipeline import ingest
from ingest.sources import Document
from queries import nag

OUT = Path(__file__).resolve().parent / "out" / "wh"
FIXTURE = Path(warehouse.__file__).parent / "fixtures" / "tinyshakespeare_head.txt"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = [
    "textwrap.py",
    "json/decoder.py",
    "json/encoder.py",
    "csv.py",
    "fractions.py",
    "statistics.py",
    "heapq.py",
    "bisect.py",
    "calendar.py",
    "difflib.py",
]
MODELS = {"minilm": "minilm", "qwen3-tiny": "config:qwen3-tiny"}
PER_DATASET, TARGETS, PASSAGE_CHARS = 60, 40, 600


def passages(text: str, limit: int, chars: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive blank-line blocks joined into passages of about `chars` characters."""
    out, current = [], ""
    for block in (b.strip() for b in re.split(r"\n\s*\n", text)):
        if not block:
            continue
        current = f"{current}\n\n{block}" if current else block
        if len(current) >= chars:
            out.append(current)
            current = ""
        if len(out) == limit:
            break
    return out


def python_docs() -> str:
    """The language reference's topics (pydoc_data), as plain text."""
    tree = ast.parse((STDLIB / "pydoc_data" / "topics.py").read_text())
    topics = next(node.value for node in tree.body if isinstance(node, ast.Assign))
    return "\n\n".join(ast.literal_eval(value) for value in topics.values)


def corpus(shakespeare: Path) -> list[Document]:
    text = shakespeare.read_text()
    speeches = passages(text, TARGETS + PER_DATASET)
    docs = [
        Document(f"target:{i}", p, dataset="shakespeare-target", role="target")
        for i, p in enumerate(speeches[:TARGETS])
    ]
    pool = {
        "shakespeare": speeches[TARGETS:],
        "python-source": passages("\n\n".join((STDLIB / name).read_text() for name in SOURCES), PER_DATASET),
        "python-docs": passages(python_docs(), PER_DATASET),
        "python-licence": passages((STDLIB / "LICENSE.txt").read_text(), PER_DATASET),
    }
    for dataset, texts in pool.items():
        docs += [Document(f"{dataset}:{i}", p, dataset=dataset, role="pool") for i, p in enumerate(texts)]
    return docs


def report(wh, run: str, fraction: float) -> pl.DataFrame:
    distances = wh.pl(
        f"SELECT * FROM nag_distance('{run}', '{run}', 'mlp.up', target_role := 'target', pool_role := 'pool')"
    )
    picked = nag.select(wh, run, run, "mlp.up", fraction=fraction, target_role="target", pool_role="pool")
    chosen = picked.group_by("dataset").agg(pl.len().alias("selected"))
    return (
        distances.group_by("dataset")
        .agg(
            pl.len().alias("documents"),
            pl.col("n_tokens").sum().alias("tokens"),
            pl.col("distance").mean().alias("mean_distance"),
        )
        .join(chosen, on="dataset", how="left")
        .with_columns(
            pl.col("selected").fill_null(0),
            (pl.col("selected").fill_null(0) / picked.height).alias("share_of_selection"),
        )
        .sort("mean_distance")
    )


def markdown(frame: pl.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * frame.width]
    for row in frame.iter_rows():
        lines.append(
            "| "
            + " | ".join(
                f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v) for v in row
            )
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=OUT, help="warehouse (reused; default examples/nag/out/wh)")
    parser.add_argument(
        "--text", type=Path, default=SHARED if SHARED.exists() else FIXTURE, help="Tiny Shakespeare text"
    )
    parser.add_argument("--fraction", type=float, default=0.2)
    args = parser.parse_args()
    docs = corpus(args.text)
    wh = warehouse.open_or_init(args.root)
    for run, model in MODELS.items():
        if run not in wh.run_ids():
            summary = ingest(
                args.root,
                model,
                sites=["mlp.up:nag=20"],
                documents=docs,
                run_id=run,
                batch_size=16,
                max_length=128,
                device="cpu",
                progress=False,
            )
            print(f"{run}: {summary.documents} documents, {summary.tokens:,} tokens in {summary.seconds:.1f} s")
    wh = warehouse.open(args.root)
    for run, model in MODELS.items():
        print(
            f"\n### {model}: {len(docs) - TARGETS} pool documents, target = {TARGETS} Shakespeare passages, "
            f"{args.fraction:.0%} of the pool's tokens selected\n"
        )
        print(markdown(report(wh, run, args.fraction)))


if __name__ == "__main__":
    main()

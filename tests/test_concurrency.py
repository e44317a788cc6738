"""Several writers at once: concurrent ingests of different runs, and two ranks of one run.

- Three `whq ingest` processes write different runs into one warehouse at the same time.
  While the test holds the commit lock, all three reach their commit and wait; none
  publishes a manifest. Released, all commit, each with exactly the rows of a lone run.
- `whq ingest --ranks 2` (torchrun, gloo, two CPU processes) gives the same rows as the
  single-process run: identical ids, counts and tokens; floats equal to float32 rounding
  (the ranks batch different documents together, so sums add in another order).
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

from . import whq_child
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
}


def test_two_ranks_give_the_single_process_rows(corpus, tmp_path):
    folder, data, _ = corpus
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    args = [str(a) for a in ingest_args(ranked, data, "r")[2:]]
    sites = [s.replace("resid.out:last", "resid.out:last,mean") for s in SITES]
    args = [a.replace("resid.out:last", "resid.out:last,mean") for a in args]
    ingest(single, MODEL, [str(data)], sites, run_id="r", progress=False, **OPTIONS)
    done = subprocess.run(
        [sys.executable, "-m", "warehouse.cli", "ingest", str(ranked), *args, "--ranks", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("committed run r;") and done.stdout.count("\n") == 1
    with warehouse.open(ranked) as wh, warehouse.open(single) as reference:
        manifest = wh.manifest("r")
        assert manifest["world_size"] == 2
        assert {Path(p["path"]).name.split("-")[1] for p in manifest["parts"] if p["table"] == "token_neurons"} == {
            "0",
            "1",
        }
        got, want = run_content(wh, "r"), run_content(reference, "r")
        for table, keys in KEYS.items():
            frame_got, frame_want = got[table], want[table]
            if table == "runs":
                frame_got, frame_want = frame_got.drop("device"), frame_want.drop("device")
            if table == "neuron_examples":
                # Top examples: the same values; tokens with exactly equal values may stand in for each other
                # (which one a top-k keeps is not defined), and so may their windows. Random examples: the
                # same tokens (hash keys).
                frame_got, frame_want = frame_got.drop("rank"), frame_want.drop("rank")
                top = pl.col("kind") == "top"
                tied = ["doc", "pos", "window_values"]
                _assert_close(
                    frame_got.filter(top).drop(tied),
                    frame_want.filter(top).drop(tied),
                    [k for k in keys if k not in ("doc", "pos")],
                    table,
                )
                frame_got, frame_want = frame_got.filter(~top), frame_want.filter(~top)
            _assert_close(frame_got, frame_want, keys, table)
        assert want["token_neurons"].height > 0 and want["neuron_examples"].height > 0


def _init_and_close(root: str) -> None:
    warehouse.init(root).close()


def test_concurrent_inits_of_one_new_folder_all_succeed(tmp_path):
    """The ranks of one ingest create the warehouse at once: none may see a half-made folder."""
    import multiprocessing

    root = str(tmp_path / "new")
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        pool.map(_init_and_close, [root] * 8)
    assert warehouse.open(root).run_ids() == []

"""An ingest killed with SIGKILL leaves no visible rows; --resume then writes exactly the uninterrupted rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from polars.testing import assert_frame_equal

import warehouse
from ingest.pipeline import ingest

from .conftest import SAMPLE_TEXTS, write_jsonl
from .reference import run_content

ARGS = [
    "--site",
    "mlp.act:topk=4,examples=3",
    "--site",
    "mlp.up:nag=5",
    "--site",
    "resid.out:last,mean",
    "--batch-size",
    "4",
    "--max-length",
    "32",
    "--shard-tokens",
    "50",
    "--device",
    "cpu",
    "--run-id",
    "r",
]


def _whq(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "warehouse.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    texts = [f"{t} ({i})" for i in range(8) for t in SAMPLE_TEXTS]
    return write_jsonl(tmp_path_factory.mktemp("atomic") / "docs.jsonl", texts)


def test_killed_ingest_is_invisible_and_resume_matches(tmp_path, corpus):
    baseline = tmp_path / "baseline"
    ingest(
        baseline,
        "minilm",
        [str(corpus)],
        [a for a in ARGS[1:6:2]],
        run_id="r",
        batch_size=4,
        max_length=32,
        shard_tokens=50,
        device="cpu",
        progress=False,
    )

    root = tmp_path / "wh"
    warehouse.init(root)
    proc = _whq("ingest", str(root), "--data", str(corpus), "-q", *ARGS)
    journal = root / "journal" / "r" / "rank-0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_text().count("\n") >= 2:
            break
        assert proc.poll() is None, f"ingest ended before it could be killed: {proc.stderr.read()}"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "runs" / "r.json").exists()

    wh = warehouse.open(root)
    assert wh.run_ids() == []
    for table in warehouse.schema.tables():
        assert wh.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0] == 0, table
    wh.close()

    again = _whq("ingest", str(root), "--data", str(corpus), "-q", "--resume", *ARGS)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert not any((root / "tmp").iterdir())
    resumed, expected = warehouse.open(root), warehouse.open(baseline)
    got, want = run_content(resumed, "r"), run_content(expected, "r")
    for table in want:
        assert_frame_equal(got[table], want[table], check_exact=True, check_dtypes=True)
    assert want["token_neurons"].height > 0 and want["neuron_stats"].height > 0


def test_rerun_without_resume_names_the_fix(tmp_path, corpus):
    root = tmp_path / "wh"
    warehouse.init(root)
    proc = _whq("ingest", str(root), "--data", str(corpus), "-q", *ARGS)
    journal = root / "journal" / "r" / "rank-0.jsonl"
    while not (journal.exists() and journal.read_text()):
        assert proc.poll() is None
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = _whq("ingest", str(root), "--data", str(corpus), "-q", *ARGS)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 2
    assert err.strip().count("\n") == 0 and "--resume" in err

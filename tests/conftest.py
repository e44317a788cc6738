"""Shared fixtures: small real warehouses built once per test session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# The tests run tiny models whose every op takes microseconds: a second intra-op thread only adds
# synchronisation, and on two busy cores its spin-waiting makes each op tens of times slower. Set before
# torch is imported, and inherited by the whq processes the tests start. tests/test_fused.py restores the
# machine's threads, so the kernel's parallel region stays tested.
os.environ.setdefault("OMP_NUM_THREADS", "1")

FIXTURES = Path(__file__).parent / "fixtures"

SAMPLE_TEXTS = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak.",
    "You are all resolved rather to die than to famish? " * 12,
    "",
    "import os\nprint(os.getcwd())",
    "We know't, we know't. Let us kill him, and we'll have corn at our own price.",
]


def write_jsonl(path: Path, texts=SAMPLE_TEXTS, **extra) -> Path:
    with open(path, "w") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"doc_id": f"d{i}", "text": text, **extra}) + "\n")
    return path


# The files that take minutes, longest first: run first, so that with `-n 2` (each file in one process)
# the last minutes are not one long file running beside an idle process.
LONG_FILES = ("test_faults.py", "test_object_storage.py", "test_pages.py", "test_degenerate_runs.py",
              "test_spark.py", "test_concurrency.py", "test_atomic.py", "test_docs.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: files keep their order


@pytest.fixture(scope="session")
def golden_root(tmp_path_factory) -> Path:
    """A copy of the committed golden warehouse (opening a warehouse writes its catalog)."""
    committed = FIXTURES / "golden_wh"
    if not (committed / "whq.json").exists():
        pytest.fail(f"{committed} is missing: rebuild it with python -m tests.golden.build_fixture")
    root = tmp_path_factory.mktemp("golden") / "wh"
    shutil.copytree(committed, root)
    return root


@pytest.fixture(scope="session")
def sample_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    from ingest.models import tiny_causal_lm_dir

    return tiny_causal_lm_dir(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def minilm_wh(tmp_path_factory, sample_jsonl) -> Path:
    """A small committed warehouse: MiniLM over the sample texts, run id 'r'."""
    from ingest.pipeline import ingest

    root = tmp_path_factory.mktemp("minilm") / "wh"
    ingest(
        root,
        "minilm",
        [str(sample_jsonl)],
        ["mlp.act:topk=8,examples=5", "mlp.up:nag=6", "resid.out:last"],
        run_id="r",
        batch_size=4,
        max_length=32,
        device="cpu",
        progress=False,
    )
    return root


@pytest.fixture(scope="session")
def tiny_macro_root(tmp_path_factory, tiny_lm_dir) -> Path:
    """The tiny causal LM's warehouse of tests/macro_calls.py (runs 'chat', 'again', 'lm2'), built once
    for the engine parity tests (Spark, object storage); tests only read it."""
    from .macro_calls import build_tiny_warehouse

    return build_tiny_warehouse(tmp_path_factory.mktemp("macro-tiny"), tiny_lm_dir)


@pytest.fixture(params=["fused", "torch"])
def hook_path(request, monkeypatch) -> str:
    """Run a capture test through the fused C kernel and through the torch ops."""
    import torch

    from ingest import fused

    if request.param == "torch":
        monkeypatch.setattr(fused, "usable", lambda *args, **kwargs: False)
    elif not fused.usable(torch.zeros(1, 1, 1)):
        pytest.skip(f"the fused kernel is unavailable here: {fused.describe()}")
    return request.param

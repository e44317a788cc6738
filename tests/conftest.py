"""Shared fixtures: small real warehouses built once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def sample_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    from ingest.models import tiny_causal_lm_dir

    return tiny_causal_lm_dir(tmp_path_factory.mktemp("models") / "tiny-qwen3")

"""whq ingest adapter for BDH: `--model examples/bdh/adapter.py[:CHECKPOINT]`.

CHECKPOINT is a file written by train.py, or `random` / `random-small` / `random-tiny`
for a seeded, randomly initialised model of that size (no argument: `random`, the default
config). The alias `xy_sparse` hooks the output of each layer's marker module: the
[B, T, n_head * N] sparse code, unit = head * N + n.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bdh import BDH, BDHConfig, load_checkpoint  # noqa: E402

from ingest.tokenize import ByteTokenizer
from warehouse.errors import BadInput

PRESETS = {
    "random": BDHConfig(),
    "random-small": BDHConfig(n_layer=4, n_embd=128, n_head=4, mlp_internal_dim_multiplier=16),
    "random-tiny": BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4),
}
BLOCK_SIZE = 512
SEED = 0


def build(checkpoint: str | None, device: str) -> tuple[BDH, str]:
    name = checkpoint or "random"
    if name in PRESETS:
        torch.manual_seed(SEED)
        return BDH(PRESETS[name]).to(device).eval(), f"bdh-{name}-seed{SEED}"
    if not Path(name).is_file():
        raise BadInput(
            f"BDH checkpoint {name} does not exist: train one with examples/bdh/train.py "
            f"or pass one of {', '.join(PRESETS)}"
        )
    return load_checkpoint(name, device), f"bdh:{Path(name).name}"


def load(device: str = "cpu", dtype: str = "float32", checkpoint: str | None = None) -> dict:
    model, model_id = build(checkpoint, device)
    config = model.config
    return {
        "model": model,
        "tokenizer": ByteTokenizer(),
        "model_id": model_id,
        "n_layers": config.n_layer,
        "aliases": {"xy_sparse": ("xy_sparse.*", "out")},
        "config": {"bdh": config.to_dict(), "n_neurons_per_head": config.n_neurons, "checkpoint": checkpoint},
        "max_length": BLOCK_SIZE,
    }

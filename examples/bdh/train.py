"""Train BDH on Tiny Shakespeare bytes and save a checkpoint (state_dict + config).

    python examples/bdh/train.py --n-layer 4 --n-embd 128 --mult 16 --steps 600   # small, CPU
    python examples/bdh/train.py --device cuda --compile                           # default config, GPU

The first --train-fraction of the text is trained on; `split.py` writes the rest as out/val.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bdh import BDH, BDHConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA_CANDIDATES = (
    REPO / "warehouse/fixtures/tinyshakespeare_head.txt",
    REPO.parent / "shared/data/tinyshakespeare.txt",
)


def default_data() -> Path | None:
    return next((p for p in DATA_CANDIDATES if p.exists()), None)


def read_bytes(path: str | None) -> np.ndarray:
    chosen = Path(path) if path else default_data()
    if chosen is None or not chosen.exists():
        print(
            f"error: no training text at {chosen or DATA_CANDIDATES[-1]}: pass --data path/to/tinyshakespeare.txt",
            file=sys.stderr,
        )
        sys.exit(2)
    return np.frombuffer(chosen.read_bytes(), dtype=np.uint8)


def batches(data: np.ndarray, block_size: int, batch_size: int, device: str, generator: np.random.Generator):
    while True:
        starts = generator.integers(0, len(data) - block_size - 1, batch_size)
        x = np.stack([data[s : s + block_size] for s in starts]).astype(np.int64)
        y = np.stack([data[s + 1 : s + block_size + 1] for s in starts]).astype(np.int64)
        yield torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="text file (default: the repo's Tiny Shakespeare fixture, else ../shared/data)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out/bdh.pt"))
    p.add_argument("--train-fraction", type=float, default=0.9)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--mult", type=int, default=128, help="mlp_internal_dim_multiplier: N = mult * n_embd / n_head")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = read_bytes(args.data)
    train = data[: int(len(data) * args.train_fraction)]
    config = BDHConfig(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        mlp_internal_dim_multiplier=args.mult,
        dropout=args.dropout,
    )
    model = BDH(config).to(args.device)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    use_bf16 = args.device.startswith("cuda") and torch.cuda.is_bf16_supported()
    stream = batches(train, args.block_size, args.batch_size, args.device, np.random.default_rng(args.seed))
    started, loss_sum = time.time(), 0.0
    print(
        f"config {config.to_dict()} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | "
        f"{len(train)} training bytes",
        flush=True,
    )
    model.train()
    for step in range(1, args.steps + 1):
        x, y = next(stream)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = step_model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            count = step % args.log_every or args.log_every
            print(f"step {step}/{args.steps} loss {loss_sum / count:.3f} ({time.time() - started:.0f}s)", flush=True)
            loss_sum = 0.0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "config": config.to_dict(),
            "train": {
                "steps": args.steps,
                "block_size": args.block_size,
                "batch_size": args.batch_size,
                "final_loss": loss.item(),
                "seconds": time.time() - started,
            },
        },
        out,
    )
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()

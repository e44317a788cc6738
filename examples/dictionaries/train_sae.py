"""Close the loop on dictionary sites: capture, train a TopK SAE from the warehouse, ingest through it, read its features.

    python examples/dictionaries/train_sae.py [--root examples/dictionaries/out] [--text ../shared/data/tinyshakespeare.txt]

1. capture MiniLM's resid.out of one layer densely over Tiny Shakespeare passages (run `dense`);
2. train a small TopK SAE on those rows, read back from the warehouse's Parquet parts with
   pyarrow in record batches (never all in memory), and save it in EleutherAI sparsify's
   layout (out/sae/layers.L/cfg.json + sae.safetensors);
3. ingest the same passages through it (`resid.out[L]+sae=out/sae:topk=8,examples=10`, run `sae`);
4. print dictionary_quality (FVU, L0, dead share) and the most selective features with their top contexts.

Everything is written under --root (ignored by git) and rebuilt by this script.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import torch

import warehouse
from ingest.pipeline import ingest
from ingest.sources import Document
from warehouse.maintenance import delete_run

HERE = Path(__file__).resolve().parent
FIXTURE = Path(warehouse.__file__).parent / "fixtures" / "tinyshakespeare_head.txt"
SHARED = HERE.parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def passages(text: str, limit: int, chars: int = 500) -> list[str]:
    """Consecutive blank-line blocks (speeches) joined into passages of about `chars` characters."""
    out, current = [], ""
    for block in (b.strip() for b in re.split(r"\n\s*\n", text)):
        if block:
            current = f"{current}\n\n{block}" if current else block
        if len(current) >= chars:
            out.append(current)
            current = ""
        if len(out) == limit:
            break
    return out


def rows(wh, run: str, site: str, layer: int, batch: int):
    """The site's per-token vectors as float32 [n, d] batches, streamed from the Parquet parts."""
    files = [str(f) for f in wh.files("vectors", run) if f"site={site}" in str(f) and f"layer={layer}" in str(f)]
    for record_batch in ds.dataset(files, format="parquet").to_batches(columns=["vec"], batch_size=batch):
        column = record_batch.column(0)
        yield column.flatten().to_numpy().astype(np.float32, copy=False).reshape(len(column), -1)


class TopKSAE(torch.nn.Module):
    """sparsify's TopK SAE: z = topk(relu(W_enc (x - b_dec) + b_enc)), x_hat = z W_dec + b_dec."""

    def __init__(self, d_in: int, d_sae: int, k: int, mean: np.ndarray):
        super().__init__()
        self.k = k
        self.encoder = torch.nn.Linear(d_in, d_sae)
        self.encoder.bias.data.zero_()
        self.W_dec = torch.nn.Parameter(self.encoder.weight.data.clone())
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True)
        self.b_dec = torch.nn.Parameter(torch.from_numpy(mean))

    def forward(self, x):
        pre = torch.relu(self.encoder(x - self.b_dec))
        values, ids = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, ids, values)
        return z, z @ self.W_dec + self.b_dec

    def save(self, folder: Path, d_in: int) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "encoder.weight": self.encoder.weight.data.contiguous(),
                "encoder.bias": self.encoder.bias.data.contiguous(),
                "W_dec": self.W_dec.data.contiguous(),
                "b_dec": self.b_dec.data.contiguous(),
            },
            str(folder / "sae.safetensors"),
        )
        (folder / "cfg.json").write_text(
            json.dumps(
                {
                    "activation": "topk",
                    "k": self.k,
                    "num_latents": self.W_dec.shape[0],
                    "expansion_factor": self.W_dec.shape[0] // d_in,
                    "normalize_decoder": True,
                    "multi_topk": False,
                    "skip_connection": False,
                    "transcode": False,
                    "d_in": d_in,
                }
            )
        )


def train(wh, run: str, layer: int, expansion: int, k: int, epochs: int, batch: int, seed: int) -> tuple[TopKSAE, dict]:
    torch.manual_seed(seed)
    n, total = 0, None
    for x in rows(wh, run, "resid.out", layer, 8192):  # pass 1: the mean, for b_dec and the variance
        n += len(x)
        total = x.astype(np.float64).sum(0) if total is None else total + x.sum(0)
    mean = (total / n).astype(np.float32)
    sae = TopKSAE(len(mean), expansion * len(mean), k, mean)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3 / (sae.W_dec.shape[0] / 2**14) ** 0.5)
    for epoch in range(epochs):
        sq, var = 0.0, 0.0
        for x in rows(wh, run, "resid.out", layer, batch):
            x = torch.from_numpy(x.copy())  # Arrow buffers are read-only
            _, recon = sae(x)
            err = (recon - x).square().sum()
            loss = err / (x - torch.from_numpy(mean)).square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                sae.W_dec.data /= sae.W_dec.data.norm(dim=1, keepdim=True)
            sq += float(err.detach())
            var += float((x - torch.from_numpy(mean)).square().sum())
        print(f"  epoch {epoch + 1}/{epochs}: training FVU {sq / var:.3f}")
    return sae, {"tokens": n, "d_in": len(mean), "d_sae": sae.W_dec.shape[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(HERE / "out"))
    p.add_argument(
        "--text",
        default=str(SHARED if SHARED.exists() else FIXTURE),
        help="Tiny Shakespeare (default: ../shared or the fixture head)",
    )
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = Path(args.root)
    wh_root, sae_dir = root / "wh", root / "sae"
    texts = passages(Path(args.text).read_text(), args.docs)
    documents = [Document(f"ts:{i}", t, dataset="tinyshakespeare") for i, t in enumerate(texts)]
    torch.set_num_threads(max(1, torch.get_num_threads()))

    started = time.perf_counter()
    if (wh_root / "whq.json").exists():
        with warehouse.open(wh_root) as wh:  # a rerun: keep the dense capture if it is the same, redo the rest
            for run in set(wh.run_ids()) & {"dense", "sae"}:
                config = wh.manifest("dense")["config"]
                if run == "sae" or (config["sites"], config["data"]["documents"]) != (
                    [f"resid.out[{args.layer}]:dense"],
                    len(documents),
                ):
                    delete_run(wh, run)
    with warehouse.open(wh_root) if (wh_root / "whq.json").exists() else warehouse.init(wh_root) as wh:
        have_dense = "dense" in wh.run_ids()
    if not have_dense:
        ingest(
            wh_root,
            "minilm",
            documents=documents,
            sites=[f"resid.out[{args.layer}]:dense"],
            run_id="dense",
            max_length=128,
            device="cpu",
            progress=False,
        )
    with warehouse.open(wh_root) as wh:
        tokens = wh.sql("SELECT n_tokens FROM runs WHERE run_id = 'dense'").fetchall()[0][0]
    print(
        f"1. captured resid.out[{args.layer}] densely: {len(documents)} passages, {tokens} tokens "
        f"({'reused' if have_dense else f'{time.perf_counter() - started:.0f} s'})"
    )
    with warehouse.open(wh_root) as wh:
        started = time.perf_counter()
        sae, shape = train(wh, "dense", args.layer, args.expansion, args.k, args.epochs, args.batch, args.seed)
    sae.save(sae_dir / f"layers.{args.layer}", shape["d_in"])
    print(
        f"2. trained a TopK SAE (d_in {shape['d_in']}, d_sae {shape['d_sae']}, k {args.k}) on {shape['tokens']} rows streamed "
        f"from the warehouse, saved in sparsify's layout under {sae_dir} ({time.perf_counter() - started:.0f} s)"
    )

    started = time.perf_counter()
    ingest(
        wh_root,
        "minilm",
        documents=documents,
        sites=[f"resid.out+sae={sae_dir}:topk=8,examples=10"],
        run_id="sae",
        max_length=128,
        device="cpu",
        progress=False,
    )
    print(f"3. ingested the passages through it: site sae.resid.out ({time.perf_counter() - started:.0f} s)")
    with warehouse.open(wh_root) as wh:
        print("4. quality, exact over all tokens:")
        print(
            wh.pl(
                "SELECT layer, d_sae, n_tokens, mean_l0, dead_share, dense_share, fvu, mean_cosine FROM dictionary_quality('sae')"
            )
        )
        top = wh.pl(f"SELECT * FROM selectivity('sae', 'sae.resid.out', {args.layer}) WHERE rate >= 0.002 LIMIT 8")
        print("   most selective features (max / mean, firing on >= 0.2% of tokens) and their top contexts:")
        for feature, rate, _, peak, selectivity in top.rows():
            contexts = wh.pl(
                f"SELECT * FROM top_contexts('sae', 'sae.resid.out', {args.layer}, {feature}, k := 3, before := 4, after := 1)"
            )
            print(f"   feature {feature}: rate {rate:.4f}, max {peak:.2f}, selectivity {selectivity:.0f}")
            for row in contexts.iter_rows(named=True):
                print(f"      {row['value']:6.2f}  {row['context']!r}")


if __name__ == "__main__":
    main()

"""Write the held-out validation slice of Tiny Shakespeare as JSONL documents for ingest.

    python examples/bdh/split.py --out examples/bdh/out/val.jsonl

train.py trains on the first 90% of the bytes; this takes the last 10% and cuts the
first --docs * --doc-bytes of it into fixed-size documents (JSONL keeps the blank lines
between speeches inside a document, so turn boundaries such as "\\n\\nPETRUCHIO:" stay visible).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import read_bytes  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="text file (default: as train.py)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out/val.jsonl"))
    p.add_argument("--train-fraction", type=float, default=0.9)
    p.add_argument("--docs", type=int, default=80)
    p.add_argument("--doc-bytes", type=int, default=256)
    args = p.parse_args(argv)
    data = read_bytes(args.data)
    held_out = bytes(data[int(len(data) * args.train_fraction) :])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for index in range(min(args.docs, len(held_out) // args.doc_bytes)):
            chunk = held_out[index * args.doc_bytes : (index + 1) * args.doc_bytes]
            fh.write(json.dumps({"doc_id": f"val:{index}", "text": chunk.decode("utf-8", errors="replace")}) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""`python -m ingest ROOT [options]` is `whq ingest ROOT [options]`: the module torchrun starts per rank.

torchrun --standalone --nproc-per-node 2 -m ingest wh --model minilm --data docs.jsonl --run-id r
"""

import sys

from warehouse.cli import main

sys.argv = ["whq", "ingest", *sys.argv[1:]]
main()

"""`python -m ingest ROOT [options]` is `whq ingest ROOT [options]`: the module torchrun starts per rank.

torchrun --standalone --nproc-per-node 2 -m ingest wh --model minilm --data docs.jsonl --run-id r

The command line sits above the library (warehouse/cli.py imports ingest, never the reverse),
so this module reaches it as a user does: through the installed `whq` command's entry point.
"""

import sys
from importlib.metadata import entry_points

(whq,) = entry_points(group="console_scripts", name="whq")
sys.argv = ["whq", "ingest", *sys.argv[1:]]
whq.load()()

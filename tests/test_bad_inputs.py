"""The bad-input matrix: each bad input through the real CLI ends in exit 2 and one exact line.

The bad-input table of docs/bad-inputs.md is generated from CASES (by cog, through
tests/docgen.py; `python -m tests.test_bad_inputs` prints it), so the table and the test
cannot drift apart. A hypothesis test then throws malformed SPECs, scenario YAMLs and
JSONL lines at the CLI: always exit 2, one line, no traceback.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warehouse.output import EXPORT_MARKER

from . import dictionaries
from .cli_runner import run_whq

MODEL = ["--model", "config:llama-tiny", "-q", "--device", "cpu"]


@dataclass(frozen=True)
class Case:
    input: str  # what is wrong, for the table in docs/bad-inputs.md
    args: tuple  # CLI arguments; {new} fresh folder, {wh} a committed warehouse, {copy} a damaged copy of it
    message: str  # the exact line after "error: " ({new}, {wh}, {copy} filled in)
    damage: str | None = None  # how {copy} is damaged: one of DAMAGES


_NAME_RULE = "use letters, digits, '.', '_' or '-' (at most 128 characters, starting with a letter or digit)"

CASES = [
    Case(
        "model folder that does not exist",
        ("ingest", "{new}", "--model", "no/such/model", "--data", "docs.jsonl", "-q"),
        "model folder no/such/model does not exist: give a local model folder, a cached hub id, or `minilm`",
    ),
    Case(
        "unknown model config",
        ("ingest", "{new}", "--model", "config:gpt-huge", "--data", "docs.jsonl", "-q"),
        "unknown model config 'gpt-huge': use one of qwen3-0.6b, qwen3-tiny, llama-tiny",
    ),
    Case(
        "model without the named module",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "nothing.*.here:topk=3"),
        "site 'nothing.*.here:topk=3': module glob 'nothing.*.here' matches no module of this model; list them with `whq sites --model M`",
    ),
    Case(
        "unknown site alias",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.nope:topk=3"),
        "unknown site 'mlp.nope': did you mean 'mlp.up'? aliases for this model: mlp.up, mlp.gate, mlp.act, mlp.down, "
        "attn.q, attn.k, attn.v, attn.o, resid.in, resid.out, mlp.in; or give a module glob (see `whq sites --model M`)",
    ),
    Case(
        "SPEC typo in a reduction",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:tpk=3"),
        "--site 'mlp.act:tpk=3': unknown reduction 'tpk'; did you mean 'topk'? known: topk, abstopk, threshold, nag, examples, hist, nohist, quantiles, similar, last, mean, dense",
    ),
    Case(
        "SPEC argument not a number",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:topk=x"),
        "--site 'mlp.act:topk=x': topk='x' needs a whole number",
    ),
    Case(
        "SPEC argument zero",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:topk=0"),
        "--site 'mlp.act:topk=0': topk=0 must be at least 1",
    ),
    Case(
        "SPEC hook point typo",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act@sideways:topk=3"),
        "--site 'mlp.act@sideways:topk=3': hook point must be @in or @out, not @sideways",
    ),
    Case(
        "same site twice",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:topk=3", "--site", "mlp.act:nag=3"),
        "site given twice (mlp.act): merge the reductions into one SPEC, e.g. mlp.act:topk=20,examples=20",
    ),
    Case(
        "no --data",
        ("ingest", "{new}", *MODEL),
        "no --data given: pass a .jsonl, .parquet or .txt file (or a --scenario)",
    ),
    Case(
        "data file that does not exist",
        ("ingest", "{new}", *MODEL, "--data", "missing.jsonl"),
        "data file missing.jsonl does not exist: check the path",
    ),
    Case(
        "unsupported data file type",
        ("ingest", "{new}", *MODEL, "--data", "docs.csv"),
        "data file docs.csv: unsupported type .csv; use .jsonl, .parquet or .txt",
    ),
    Case(
        "empty data file",
        ("ingest", "{new}", *MODEL, "--data", "empty.jsonl"),
        "data file empty.jsonl is empty: give a file with at least one document",
    ),
    Case(
        "data file of blank lines only",
        ("ingest", "{new}", *MODEL, "--data", "blank.jsonl"),
        "no documents to capture: the data files hold no readable documents",
    ),
    Case(
        "JSONL with a bad line (line number reported)",
        ("ingest", "{new}", *MODEL, "--data", "badline.jsonl"),
        "badline.jsonl:2: invalid JSON (Expecting value); fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "JSONL line that is not an object",
        ("ingest", "{new}", *MODEL, "--data", "notobject.jsonl"),
        "notobject.jsonl:1: expected a JSON object per line; fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "JSONL record without a text column",
        ("ingest", "{new}", *MODEL, "--data", "notext.jsonl"),
        "notext.jsonl:1: no text column (expected one of text, doc, content); fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "JSONL text that is not a string",
        ("ingest", "{new}", *MODEL, "--data", "numtext.jsonl"),
        "numtext.jsonl:1: column 'text' must be a string, got int; fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "non-UTF-8 text file",
        ("ingest", "{new}", *MODEL, "--data", "latin1.txt"),
        "latin1.txt:1: not UTF-8 text; fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "non-UTF-8 JSONL line",
        ("ingest", "{new}", *MODEL, "--data", "latin1.jsonl"),
        "latin1.jsonl:2: not UTF-8 text; fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "Parquet data that is not Parquet",
        ("ingest", "{new}", *MODEL, "--data", "fake.parquet"),
        "fake.parquet is not a readable Parquet file (Parquet magic bytes not found in footer. Either the file is corrupted or this "
        "is not a parquet file.): check the file",
    ),
    Case(
        "window longer than the model's positions",
        (
            "ingest",
            "{new}",
            "--model",
            "minilm",
            "-q",
            "--device",
            "cpu",
            "--data",
            "docs.jsonl",
            "--max-length",
            "1000",
        ),
        "--max-length 1000 is longer than the 512 positions model 'minilm' has: use at most 512 (longer documents are split into windows)",
    ),
    Case(
        "window too short for any text",
        ("ingest", "{new}", "--model", "minilm", "-q", "--device", "cpu", "--data", "docs.jsonl", "--max-length", "2"),
        "--max-length 2 leaves no room for text after 2 special tokens: raise it",
    ),
    Case(
        "dtype the device lacks (float16 on the CPU)",
        (
            "ingest",
            "{new}",
            "--model",
            "config:llama-tiny",
            "-q",
            "--data",
            "docs.jsonl",
            "--dtype",
            "float16",
            "--device",
            "cpu",
        ),
        "--dtype float16 is not supported on the cpu: use --dtype float32 or bfloat16 there, or --device cuda",
    ),
    Case(
        "CUDA requested without CUDA",
        ("ingest", "{new}", "--model", "config:llama-tiny", "-q", "--data", "docs.jsonl", "--device", "cuda"),
        "--device cuda asked for CUDA but this machine has no CUDA device: use --device cpu (or auto)",
    ),
    Case(
        "unknown device",
        ("ingest", "{new}", "--model", "config:llama-tiny", "-q", "--data", "docs.jsonl", "--device", "tpu"),
        "unknown --device 'tpu': use auto, cpu, cuda or cuda:N",
    ),
    Case(
        "unknown dtype",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--dtype", "float64"),
        "unknown --dtype 'float64': use one of float32, bfloat16, float16",
    ),
    Case(
        "run id with a slash",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--run-id", "bad/id"),
        "invalid run id 'bad/id': use letters, digits, '.', '_' or '-' (at most 128 characters, starting with a letter or digit)",
    ),
    Case(
        "batch size 0",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--batch-size", "0"),
        "--batch-size must be at least 1",
    ),
    Case(
        "run id already committed",
        ("ingest", "{wh}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:topk=3", "--run-id", "r"),
        "run 'r' is already committed: choose another --run-id, or delete it with `whq runs {wh} --delete r`",
    ),
    Case(
        "scenario file that does not exist",
        ("ingest", "{new}", "--scenario", "missing.yaml", "-q"),
        "scenario file missing.yaml does not exist: give the path of a scenario .yaml",
    ),
    Case(
        "scenario YAML with a syntax error",
        ("ingest", "{new}", "--scenario", "broken.yaml", "-q"),
        "broken.yaml: not valid YAML at line 3 (expected ',' or ']', but got '<stream end>'): fix the syntax",
    ),
    Case(
        "unknown run in a macro",
        ("sql", "{wh}", "SELECT * FROM layer_summary('nope', 'mlp.act')"),
        "no committed run 'nope' in this warehouse: list the runs with SELECT run_id FROM runs",
    ),
    Case(
        "context window of a billion tokens",
        ("sql", "{wh}", "SELECT * FROM top_contexts('r', 'mlp.act', 0, 0, before := 1000000000)"),
        "before := 1000000000, after := 20: a context reaches 0 to 100000 tokens on each side of its token",
    ),
    Case(
        "unknown table in SQL",
        ("sql", "{wh}", "SELECT * FROM nope"),
        "SQL error: Catalog Error: Table with name nope does not exist!",
    ),
    Case(
        "write through --read-only",
        ("sql", "{wh}", "DROP VIEW runs", "--read-only"),
        "read-only mode refuses DROP statements: only SELECT/WITH/VALUES/DESCRIBE/SUMMARIZE/SHOW queries are allowed",
    ),
    Case(
        "SQL text run through --read-only",
        (
            "sql",
            "{wh}",
            "SELECT * FROM json_execute_serialized_sql(json_serialize_sql("
            "'SELECT * FROM read_text(''.tmp/secret.txt'')'))",
            "--read-only",
        ),
        "read-only mode refuses json_execute_serialized_sql(), which reads files or runs SQL text: query the warehouse's "
        "tables and macros instead",
    ),
    Case(
        "SUMMARIZE of a file through --read-only",
        ("sql", "{wh}", "SUMMARIZE '/etc/passwd'", "--read-only"),
        "read-only mode refuses SUMMARIZE of the file '/etc/passwd': query the warehouse's tables and macros instead",
    ),
    Case(
        "SHOW of a file through --read-only",
        ("sql", "{wh}", "SHOW '/etc/passwd'", "--read-only"),
        "read-only mode refuses SHOW '/etc/passwd': show a table by name (SHOW tokens) or SHOW TABLES",
    ),
    Case(
        "path as a macro argument through --read-only",
        ("sql", "{wh}", "SELECT * FROM nag_distance('r', 'r', 'mlp.act', weights := '/etc/passwd')", "--read-only"),
        "read-only mode refuses '/etc/passwd' as an argument of nag_distance(), which looks names up as tables: "
        "pass a run id or table name, not a path",
    ),
    Case(
        "--read-only query past its timeout",
        ("sql", "{wh}", "SELECT count(*) FROM range(1000000000000)", "--read-only", "--timeout", "0.5"),
        "the query ran past the 0.5 s timeout and was stopped: narrow it (WHERE, LIMIT), or raise --timeout",
    ),
    Case(
        "--read-only query past its memory limit",
        (
            "sql",
            "{wh}",
            "SELECT length(string_agg(repeat('x', 1000000), ',')) FROM range(100000)",
            "--read-only",
            "--memory-limit",
            "100MB",
        ),
        "the query needed more than the 100MB memory limit and was stopped: narrow it (WHERE, LIMIT), or raise --memory-limit",
    ),
    Case(
        "memory limit that is not a size",
        ("sql", "{wh}", "SELECT 1", "--read-only", "--memory-limit", "lots"),
        "--memory-limit 'lots' must be a size such as 512MB or 4GB",
    ),
    Case(
        "--timeout on trusted SQL",
        ("sql", "{wh}", "SELECT 1", "--timeout", "5"),
        "--timeout and --memory-limit bound untrusted SQL: add --read-only",
    ),
    Case(
        "trusted COPY into the warehouse",
        ("sql", "{wh}", "COPY (SELECT 1 AS x) TO '{wh}/data/extra.parquet'"),
        "whq sql refuses writing '{wh}/data/extra.parquet', inside the warehouse {wh}: its files change only through whq; "
        "write elsewhere, or pass --allow-writes",
    ),
    Case(
        "folder that is not a warehouse",
        ("sql", "{new}", "SELECT 1"),
        "{new} is not a whq warehouse: create it with `whq init {new}`",
    ),
    Case(
        "deleting an unknown run",
        ("runs", "{wh}", "--delete", "nope"),
        "no committed run 'nope' in {wh} (runs: r); list them with `whq runs {wh}`",
    ),
    Case(
        "warehouse of a newer format version",
        ("runs", "{copy}"),
        "{copy} has format version 99, newer than this whq reads (1): upgrade whq (pip install -U whq)",
        "newer_format",
    ),
    Case(
        "damaged run manifest",
        ("runs", "{copy}"),
        "manifest {copy}/runs/r.json is damaged (not JSON: Expecting property name enclosed in double quotes at line 1): "
        "run `whq repair {copy}` to set it aside (the other runs stay queryable)",
        "damaged_manifest",
    ),
    Case(
        "corrupt Parquet part",
        ("runs", "{copy}"),
        "cannot build the catalog (Invalid Input Error: File '{copy}/data/documents/run_id=r/part-0-000000.parquet' too small "
        "to be a Parquet file): find the bad part with `whq check {copy}`, then `whq repair {copy}` quarantines its run",
        "corrupt_part",
    ),
    # Names (warehouse/names.py): every run id, site and label is checked before it reaches a path or SQL.
    Case(
        "--delete of a path to the marker",
        ("runs", "{wh}", "--delete", "../whq"),
        "invalid run id '../whq': " + _NAME_RULE,
    ),
    Case(
        "--delete of a path outside the warehouse",
        ("runs", "{wh}", "--delete", "../../victim"),
        "invalid run id '../../victim': " + _NAME_RULE,
    ),
    Case(
        "--delete of a run id ending in a newline",
        ("runs", "{wh}", "--delete", "r\n"),
        "invalid run id 'r\\n': " + _NAME_RULE,
    ),
    Case(
        "run id ending in a newline",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--run-id", "r\n"),
        "invalid run id 'r\\n': " + _NAME_RULE,
    ),
    Case(
        "--resume of a path to the marker",
        ("ingest", "{wh}", *MODEL, "--data", "docs.jsonl", "--run-id", "../whq", "--resume"),
        "invalid run id '../whq': " + _NAME_RULE,
    ),
    Case(
        "run id with a suffix whq uses",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--run-id", "r.json"),
        "invalid run id 'r.json': the suffix '.json' is reserved for whq's own files: pick another name",
    ),
    Case(
        "run id with '..'",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--run-id", "a..b"),
        "invalid run id 'a..b': '..' is not allowed in a name (names become folder names): pick another name",
    ),
    Case(
        "run id naming a writer's temporary folder",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--run-id", "a.rank-0"),
        "invalid run id 'a.rank-0': '.rank-' is reserved for whq's temporary folders: pick another name",
    ),
    Case(
        "dataset label with a control character",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--dataset", "web\x1b[31m"),
        "invalid --dataset 'web\\x1b[31m': use text of 1 to 256 characters without control characters",
    ),
    Case(
        "report on a path",
        ("report", "{wh}", "--run", "../r", "--out", "r.html"),
        "invalid run id '../r': " + _NAME_RULE,
    ),
    Case(
        "export of a path",
        ("export", "features", "{wh}", "--run", "r/../r", "--site", "mlp.act", "--out", "f"),
        "invalid run id 'r/../r': " + _NAME_RULE,
    ),
    Case(
        "NAG target with a bad run id",
        ("nag", "keys", "{wh}", "--target", "../r", "--top", "3", "--out", "k.json"),
        "invalid run id '../r': " + _NAME_RULE,
    ),
    Case(
        "NAG target with a bad dataset label",
        ("nag", "keys", "{wh}", "--target", "r:a\nb", "--top", "3", "--out", "k.json"),
        "invalid dataset 'a\\nb': use text of 1 to 256 characters without control characters",
    ),
    # Metadata of the wrong shape (warehouse/metadata.py): one line naming the file and `whq repair`.
    Case(
        "manifest that is {}",
        ("runs", "{copy}"),
        "manifest {copy}/runs/r.json is damaged (the manifest has no valid 'run_id'): run `whq repair {copy}` to set it aside "
        "(the other runs stay queryable)",
        "empty_manifest",
    ),
    Case(
        "manifest that is null",
        ("runs", "{copy}"),
        "manifest {copy}/runs/r.json is damaged (the manifest is not a JSON object): run `whq repair {copy}` to set it aside "
        "(the other runs stay queryable)",
        "null_manifest",
    ),
    Case(
        'manifest that is {"parts": 5}',
        ("runs", "{copy}"),
        "manifest {copy}/runs/r.json is damaged (the manifest has no valid 'run_id'): run `whq repair {copy}` to set it aside "
        "(the other runs stay queryable)",
        "parts_not_list",
    ),
    Case(
        "manifest whose part points outside its run",
        ("runs", "{copy}"),
        "manifest {copy}/runs/r.json is damaged (part path '../../victim.parquet' is not a part of run 'r'): "
        "run `whq repair {copy}` to set it aside (the other runs stay queryable)",
        "part_outside",
    ),
    Case(
        "quarantine.json of garbage bytes",
        ("runs", "{copy}"),
        "{copy}/quarantine.json is damaged (not UTF-8 text): run `whq repair {copy}` to rebuild it (repair checks every run again)",
        "garbage_quarantine",
    ),
    Case(
        "marker whose version is a string",
        ("runs", "{copy}"),
        "{copy}/whq.json is damaged (the marker has no valid 'format_version'): restore it, or rewrite it with `whq repair {copy}`",
        "string_version",
    ),
    Case(
        "catalog path that is a folder",
        ("runs", "{copy}"),
        "{copy}/whq.duckdb is not a file: move it away (whq regenerates the catalog), or run `whq repair {copy}` to set it aside",
        "catalog_folder",
    ),
    # Inputs and resume (docs/datasets.md, ingest/README.md): odd files, bad bytes, numbers out of range, a changed input.
    Case(
        "data file that is a directory",
        ("ingest", "{new}", *MODEL, "--data", "{copy}/docs.jsonl"),
        "data file {copy}/docs.jsonl is a directory, not a regular file: give a .jsonl, .parquet or .txt file",
        "folder_named_jsonl",
    ),
    Case(
        "data file that is a FIFO",
        ("ingest", "{new}", *MODEL, "--data", "{copy}/pipe.jsonl"),
        "data file {copy}/pipe.jsonl is a named pipe (FIFO), not a regular file: give a .jsonl, .parquet or .txt file",
        "fifo",
    ),
    Case(
        "data file that is a symlink loop",
        ("ingest", "{new}", *MODEL, "--data", "{copy}/loop.jsonl"),
        "data file {copy}/loop.jsonl cannot be opened (Too many levels of symbolic links): check the path",
        "symlink_loop",
    ),
    Case(
        "Parquet with a damaged data page",
        ("ingest", "{new}", *MODEL, "--data", "page.parquet"),
        "page.parquet is not a readable Parquet file (ZSTD decompression failed: Data corruption detected): check the file",
    ),
    Case(
        "Parquet text column of numbers",
        ("ingest", "{new}", *MODEL, "--data", "numbers.parquet"),
        "numbers.parquet row 0: column 'text' must be a string, got int; fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "JSONL text with a lone surrogate escape",
        ("ingest", "{new}", *MODEL, "--data", "surrogate.jsonl"),
        "surrogate.jsonl:1: column 'text' is not valid Unicode (it holds a lone surrogate); fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "JSONL dataset label that is a number",
        ("ingest", "{new}", *MODEL, "--data", "numlabel.jsonl"),
        "numlabel.jsonl:1: column 'dataset' must be a string or null, got int; fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "JSONL doc_id that is a list (its id would be Python's '[1]')",
        ("ingest", "{new}", *MODEL, "--data", "listid.jsonl"),
        "listid.jsonl:1: column 'doc_id' must be text or a number, got list; fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "bad record late in a large file (refused before the run exists)",
        ("ingest", "{new}", *MODEL, "--data", "late.jsonl", "--shard-tokens", "8"),
        "late.jsonl:301: invalid JSON (Expecting property name enclosed in double quotes); fix it, or pass --skip-bad to skip bad records",
    ),
    Case(
        "--resume after the data file was edited in place",
        ("ingest", "{copy}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:topk=3", "--run-id", "i", "--resume"),
        "data file docs.jsonl changed since run 'i' started (its sha256 differs), so resuming would mix both versions: "
        "restore the file and --resume, or start a new --run-id",
        "interrupted_then_edited",
    ),
    Case(
        "max length 0",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--max-length", "0"),
        "--max-length 0 must be at least 1 (omit it for the model's own window)",
    ),
    Case(
        "--ranks 0", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--ranks", "0"), "--ranks must be at least 1"
    ),
    Case(
        "SPEC threshold=nan",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:threshold=nan"),
        "--site 'mlp.act:threshold=nan': threshold=nan must be a finite number (nan and inf fire never or always)",
    ),
    Case(
        "SPEC threshold=-inf",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:threshold=-inf"),
        "--site 'mlp.act:threshold=-inf': threshold=-inf must be a finite number (nan and inf fire never or always)",
    ),
    Case(
        "SPEC topk above the site's units",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:topk=500"),
        "--site 'mlp.act:topk=500': topk=500 is more than the 128 units of site mlp.act: use at most 128 (or `dense` for every unit)",
    ),
    Case(
        "SPEC nag above the site's units",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "resid.out:nag=65"),
        "--site 'resid.out:nag=65': nag=65 is more than the 64 units of site resid.out: use at most 64 (or `dense` for every unit)",
    ),
    Case(
        "SPEC examples=N beyond memory",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:examples=99999999"),
        "--site 'mlp.act:examples=99999999': examples=99999999 needs about 89,088.0 GB of memory (99999999 x 128 units x 4 layers "
        "x 1740 bytes), over the {budget} budget (half of this machine's memory): use examples=N with N at most {most}",
    ),
    Case(
        "scenario temperature .nan",
        ("ingest", "{new}", "--scenario", "nantemp.yaml", "-q"),
        "nantemp.yaml: generation.temperature must be a finite number, got nan",
    ),
    Case(
        "scenario seed below 0",
        ("ingest", "{new}", "--scenario", "seed.yaml", "-q"),
        "seed.yaml: generation.seed must be at least 0, got -1",
    ),
    Case(
        "scenario value YAML cannot build (a date 2001-13-01)",
        ("ingest", "{new}", "--scenario", "baddate.yaml", "-q"),
        "baddate.yaml: a value YAML cannot read (month must be in 1..12): quote it as text or fix it",
    ),
    Case(
        "scenario that is a directory",
        ("ingest", "{new}", "--scenario", "{copy}/runs", "-q"),
        "scenario file {copy}/runs is not a regular file: give the path of a scenario .yaml",
        "damaged_manifest",
    ),
    Case(
        "NAG --fraction nan",
        ("nag", "select", "{wh}", "--target", "r", "--pool", "r", "--fraction", "nan", "--out", "x.parquet"),
        "--fraction nan must be in (0, 1], e.g. 0.2 for a fifth",
    ),
    Case(
        "NAG --power inf",
        ("nag", "select", "{wh}", "--target", "r", "--pool", "r", "--power", "inf", "--out", "x.parquet"),
        "--power inf must be a finite number above 0",
    ),
    Case(
        "export --top below 0",
        ("export", "features", "{wh}", "--run", "r", "--site", "mlp.act", "--out", "f", "--top", "-1"),
        "--top -1 must be at least 0",
    ),
    Case(
        "bench ingest --shard-tokens 0",
        ("bench", "ingest", "--model", "config:llama-tiny", "--shard-tokens", "0"),
        "--shard-tokens 0 must be at least 1",
    ),
    Case(
        "bench query --k above --width",
        ("bench", "query", "{new}", "--k", "30", "--width", "20"),
        "--k 30 is more than --width 20: top-k keeps k distinct units of each token; lower --k",
    ),
    Case("bench serve --k 0", ("bench", "serve", "{new}", "--k", "0"), "--k 0 must be at least 1"),
    Case("bench nag --docs 0", ("bench", "nag", "{new}", "--docs", "0"), "--docs 0 must be at least 1"),
    Case(
        "dictionary that does not exist",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "resid.out[1]+sae=no/such/sae:topk=3"),
        "dictionary no/such/sae does not exist: give a folder or file with cfg.json + sae_weights.safetensors (SAELens), "
        "cfg.json + sae.safetensors (sparsify), params.npz (Gemma Scope), a folder of those per layer, or dict.py[:CHECKPOINT]",
    ),
    Case(
        "dictionary of an unknown architecture",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "resid.out[1]+sae=dicts/odd:topk=3"),
        "dictionary dicts/odd: unknown SAELens architecture 'matryoshka': use one of standard, gated, jumprelu, topk, batchtopk, "
        "transcoder, jumprelu_transcoder",
    ),
    Case(
        "dictionary narrower than the site",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "resid.out[1]+sae=dicts/narrow:topk=3"),
        "site sae.resid.out layer 1: the hook gives 64 units but dictionary dicts/narrow reads d_in=32: use a dictionary trained on this site",
    ),
    Case(
        "dictionary layer the model lacks",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "resid.out[9]+sae=dicts/sae:topk=3"),
        "site 'resid.out[9]+sae=dicts/sae:topk=3': this model has no layer 9 at 'model.layers.*': select layers 0-3",
    ),
    Case(
        "SAE given as a transcoder",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.in[1]+transcoder=dicts/sae:topk=3"),
        "--site 'mlp.in[1]+transcoder=dicts/sae:topk=3': dictionary dicts/sae is an SAE: write +sae=PATH",
    ),
    # Output paths (warehouse/output.py): nothing lands in a warehouse folder; wrong kinds are one line.
    Case(
        "report --out over a run's manifest",
        ("report", "{wh}", "--run", "r", "--out", "{wh}/runs/r.json"),
        "whq refuses writing '{wh}/runs/r.json', inside the warehouse {wh}: its files change only through whq; "
        "give --out a path outside it",
    ),
    Case(
        "report --csv into the warehouse",
        ("report", "{wh}", "--run", "r", "--out", "r.html", "--csv", "{wh}/data"),
        "whq refuses writing '{wh}/data', inside the warehouse {wh}: its files change only through whq; "
        "give --csv a path outside it",
    ),
    Case(
        "export site into the warehouse folder",
        ("export", "site", "{wh}", "--run", "r", "--site", "mlp.act", "--out", "{wh}"),
        "whq refuses writing '{wh}', inside the warehouse {wh}: its files change only through whq; "
        "give --out a path outside it",
    ),
    Case(
        "export neuronpedia into the data folder",
        ("export", "neuronpedia", "{wh}", "--run", "r", "--site", "mlp.act", "--out", "{wh}/data/np"),
        "whq refuses writing '{wh}/data/np', inside the warehouse {wh}: its files change only through whq; "
        "give --out a path outside it",
    ),
    Case(
        "NAG keys over a run's manifest",
        ("nag", "keys", "{wh}", "--target", "r", "--top", "3", "--out", "{wh}/runs/r.json"),
        "whq refuses writing '{wh}/runs/r.json', inside the warehouse {wh}: its files change only through whq; "
        "give --out a path outside it",
    ),
    Case(
        "NAG select into the warehouse",
        ("nag", "select", "{wh}", "--target", "r", "--pool", "r", "--out", "{wh}/selected.parquet"),
        "whq refuses writing '{wh}/selected.parquet', inside the warehouse {wh}: its files change only through whq; "
        "give --out a path outside it",
    ),
    Case(
        "NAG merge into the warehouse",
        ("nag", "merge", "selected.parquet", "--out", "{wh}/merged.parquet"),
        "whq refuses writing '{wh}/merged.parquet', inside the warehouse {wh}: its files change only through whq; "
        "give --out a path outside it",
    ),
    Case(
        "trusted COPY into another warehouse",
        ("sql", "{wh}", "COPY (SELECT 1 AS x) TO '{copy}/data/x.parquet'"),
        "whq sql refuses writing '{copy}/data/x.parquet', inside the warehouse {copy}: its files change only through "
        "whq; write elsewhere, or pass --allow-writes",
        "intact",
    ),
    Case(
        "new warehouse inside a warehouse",
        ("init", "{wh}/runs/new"),
        "whq refuses writing '{wh}/runs/new', inside the warehouse {wh}: its files change only through whq; "
        "create the new warehouse outside it",
    ),
    Case(
        "ingest into a new folder inside a warehouse",
        ("ingest", "{wh}/data/new", *MODEL, "--data", "docs.jsonl"),
        "whq refuses writing '{wh}/data/new', inside the warehouse {wh}: its files change only through whq; "
        "create the new warehouse outside it",
    ),
    Case(
        "push to a file:// folder inside a warehouse",
        ("push", "{wh}", "file://{wh}/data/copy", "-q"),
        "whq refuses writing 'file://{wh}/data/copy', inside the warehouse {wh}: its files change only through whq; "
        "push to a folder outside it",
    ),
    Case(
        "--out that is a folder where a file is wanted",
        ("nag", "keys", "{wh}", "--target", "r", "--top", "3", "--out", "dicts"),
        "--out dicts is a folder: name a file in it, e.g. dicts/out",
    ),
    Case(
        "--out below a file",
        ("report", "{wh}", "--run", "r", "--out", "docs.jsonl/r.html"),
        "--out docs.jsonl/r.html: docs.jsonl is a file, not a folder: pick another path",
    ),
    Case(
        "export --out that is a file",
        ("export", "features", "{wh}", "--run", "r", "--site", "mlp.act", "--out", "docs.jsonl"),
        "--out docs.jsonl is a file, not a folder: name a new or empty folder",
    ),
    Case(
        "export into a folder of files whq did not write",
        ("export", "site", "{wh}", "--run", "r", "--site", "mlp.act", "--out", "dicts"),
        "--out dicts holds files whq did not write: name a new or empty folder, or remove them first",
    ),
    Case(
        "report --csv that is a file",
        ("report", "{wh}", "--run", "r", "--out", "r.html", "--csv", "docs.jsonl"),
        "--csv docs.jsonl is a file, not a folder: name a new or empty folder",
    ),
    Case(
        "report --out that is a second hard link to a run's manifest",
        ("report", "{copy}", "--run", "r", "--out", "linked.html"),
        "--out linked.html has 2 hard links, and writing it would change the file under its other names too: "
        "remove it first, or name another file",
        damage="hard_link_out",
    ),
    Case(
        "export again into its folder, where a symlink to a manifest was put",
        ("export", "site", "{copy}", "--run", "r", "--site", "mlp.act", "--out", "site"),
        "--out site holds site/index.html, a link whq did not make, and writing through it would change the file "
        "it leads to: remove it first, or name a new or empty folder",
        damage="link_in_export",
    ),
    Case(
        "NAG merge of a file that is not Parquet",
        ("nag", "merge", "docs.jsonl", "--out", "merged.parquet"),
        "selection docs.jsonl is not a readable Parquet file (parquet: File out of specification: The file must end "
        "with PAR1 or PARE): give the files `whq nag select` writes",
    ),
    Case(
        "NAG merge of a missing selection",
        ("nag", "merge", "missing.parquet", "--out", "merged.parquet"),
        "selection missing.parquet does not exist: give the Parquet files `whq nag select` writes",
    ),
    # Data fields are data (warehouse/names.py): a data file's labels are checked like the flags.
    Case(
        "JSONL dataset field with an OSC 52 clipboard escape",
        ("ingest", "{new}", *MODEL, "--data", "osc52.jsonl"),
        "osc52.jsonl, document 1: invalid dataset 'web\\x1b]52;c;aGk=\\x07': use text of 1 to 256 characters "
        "without control characters; fix it in the data file",
    ),
    Case(
        "JSONL doc_id with a newline",
        ("ingest", "{new}", *MODEL, "--data", "newline_id.jsonl"),
        "newline_id.jsonl, document 1: invalid doc_id 'a\\nb': use text of 1 to 1024 characters without control "
        "characters; fix it in the data file",
    ),
    Case(
        "JSONL role with a carriage return",
        ("ingest", "{new}", *MODEL, "--data", "cr_role.jsonl"),
        "cr_role.jsonl, document 1: invalid role 'ok\\rEVIL': use text of 1 to 256 characters without control "
        "characters; fix it in the data file",
    ),
    Case(
        "JSONL label with a bidirectional override",
        ("ingest", "{new}", *MODEL, "--data", "bidi_label.jsonl"),
        "bidi_label.jsonl, document 1: invalid label '\\u202eadmin': use text of 1 to 256 characters without "
        "control characters; fix it in the data file",
    ),
    Case(
        "SQL whose error message carries a terminal escape",
        ("sql", "{wh}", "SELECT CAST(chr(27) || '[31m' AS INTEGER)"),
        "SQL error: Conversion Error: Could not convert string '\\x1b[31m' to INT32",
    ),
    Case(
        "two documents with one doc_id",
        ("ingest", "{new}", *MODEL, "--data", "dup_id.jsonl"),
        "dup_id.jsonl, document 2: doc_id '7' is also the id of dup_id.jsonl, document 1, and pages and exports "
        "name documents by it: give each document its own id, e.g. prefix each file's ids with its name",
    ),
    Case(
        "one data file given twice",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--data", "docs.jsonl"),
        "data file docs.jsonl is given twice: give each --data once",
    ),
    Case(
        "data file named with a terminal escape",
        ("ingest", "{new}", *MODEL, "--data", "web\x1b[31m.txt"),
        "data file 'web\\x1b[31m.txt': its name labels its documents, so it must be a valid label (use text of 1 to "
        "256 characters without control characters): rename it",
    ),
    # Dictionary files are untrusted input (ingest/dictionary_files.py): declared schemas, bounded reads, finite weights.
    *(
        Case(
            what,
            ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", f"resid.out[1]+sae=dicts/{name}:topk=3"),
            message,
        )
        for what, name, message in [
            (
                "dictionary with a NaN weight",
                "nan",
                "dictionary weights dicts/nan/sae_weights.safetensors: W_enc holds non-finite values (NaN or infinity "
                "in float32): use a dictionary whose weights are finite",
            ),
            (
                "dictionary safetensors header that is a JSON list",
                "list_header",
                "dictionary weights dicts/list_header/sae_weights.safetensors are not a readable safetensors file "
                "(its header is a JSON list, not an object): check the file",
            ),
            (
                "dictionary safetensors header longer than the file",
                "long_header",
                "dictionary weights dicts/long_header/sae_weights.safetensors are not a readable safetensors file "
                "(its header length 1,000,000,000 exceeds the 2 bytes present): check the file",
            ),
            (
                "dictionary tensor larger than its bytes",
                "huge_tensor",
                "dictionary weights dicts/huge_tensor/sae_weights.safetensors are not a readable safetensors file "
                "(tensor W_enc of shape [1048576, 1048576] needs 4,398,046,511,104 bytes, its offsets span 0..16 of "
                "the 16 present): check the file",
            ),
            (
                "dictionary cfg.json k that is text",
                "k_text",
                'dictionary config dicts/k_text/cfg.json: k is "eight", expected a whole number from 1 to 2147483647: '
                "fix it in cfg.json",
            ),
            (
                "dictionary cfg.json k that is a fraction",
                "k_fraction",
                "dictionary config dicts/k_fraction/cfg.json: k is 2.9, expected a whole number from 1 to 2147483647: "
                "fix it in cfg.json",
            ),
            (
                "dictionary cfg.json hook_layer that is a list",
                "layer_list",
                "dictionary config dicts/layer_list/cfg.json: hook_layer is [1], expected a whole number from 0 to "
                "2147483647: fix it in cfg.json",
            ),
            (
                "dictionary k larger than its latents",
                "k_beyond",
                "dictionary dicts/k_beyond: k=97 must be between 1 and d_sae=96",
            ),
            (
                "dictionary of zero latents",
                "no_latents",
                "dictionary dicts/no_latents: its weights give d_sae=0: use a dictionary of at least one unit",
            ),
            (
                "dictionary cfg.json that is a folder",
                "cfg_folder",
                "dictionary config dicts/cfg_folder/cfg.json is a folder, not a file: point at the dictionary's files",
            ),
            (
                "dictionary params.npz member larger than its bytes",
                "npz_member/layer_1",
                "dictionary weights dicts/npz_member/layer_1/params.npz are not a readable .npz file (member W_enc.npy "
                "of shape (1048576, 1048576) needs 4,398,046,511,104 bytes, it holds 192): check the file",
            ),
        ]
    ),
]


# -- whq serve and the byte bound of untrusted results (kept apart from the rows above) --------------
CASES += [
    Case(
        "serve --port above 65535",
        ("serve", "{wh}", "--port", "70000"),
        "--port 70000 must be a TCP port in 0..65535 (0 picks a free one)",
    ),
    Case(
        "serve --host given as a URL",
        ("serve", "{wh}", "--host", "http://127.0.0.1"),
        "--host 'http://127.0.0.1' must be an address or a name of this machine, e.g. 127.0.0.1, ::1 or 0.0.0.0",
    ),
    Case(
        "serve --max-bytes not a size",
        ("serve", "{wh}", "--max-bytes", "lots"),
        "--max-bytes 'lots' must be a size such as 64MB or 1GB",
    ),
    Case("serve --timeout 0", ("serve", "{wh}", "--timeout", "0"), "--timeout 0 must be a positive number of seconds"),
    Case(
        "sql --max-rows past 64 bits",
        ("sql", "{wh}", "SELECT 1", "--max-rows", "99999999999999999999"),
        "Invalid value for '--max-rows': Input should be less than or equal to 9223372036854775806 (see --help)",
    ),
    Case(
        "sql --timeout past what a timer can wait",
        ("sql", "{wh}", "SELECT 1", "--read-only", "--timeout", "1e300"),
        "--timeout 1e+300 is longer than 1,000,000,000 seconds: give a shorter one",
    ),
    Case(
        "sql --max-bytes without --read-only",
        ("sql", "{wh}", "--max-bytes", "1MB", "SELECT 1"),
        "--max-bytes bounds untrusted SQL: add --read-only",
    ),
    Case(
        "sql --read-only result over --max-bytes",
        ("sql", "{wh}", "--read-only", "--max-bytes", "1KB", "SELECT repeat('x', 2000)"),
        "the result holds more than 1,000 bytes (stopped fetching): select fewer or shorter values "
        "(LIMIT, left(text, 200)), or raise --max-bytes",
    ),
]


# -- whq import explanations: Neuronpedia's explanation export (tests/test_explain_neuronpedia.py has the rest) ----
_IMPORT = ("import", "explanations", "{wh}")
_RUN_SITE = ("--run", "r", "--site", "mlp.act", "-q")
CASES += [
    Case(
        "import explanations: corrupt gzip",
        (*_IMPORT, "np_truncated.jsonl.gz", *_RUN_SITE),
        "np_truncated.jsonl.gz: not a readable gzip file (Compressed file ended before the end-of-stream marker was "
        "reached): download it again (or gunzip it to see where it breaks)",
    ),
    Case(
        "import explanations: a line that is not JSON",
        (*_IMPORT, "np_badjson.jsonl", *_RUN_SITE),
        "np_badjson.jsonl line 2: not JSON (Expecting property name enclosed in double quotes): is this Neuronpedia's "
        "explanation export?",
    ),
    Case(
        "import explanations: a record without its description",
        (*_IMPORT, "np_missing.jsonl", *_RUN_SITE),
        "np_missing.jsonl line 1: no 'description' field: Neuronpedia's explanation export has modelId, layer, index, "
        "description on every line",
    ),
    Case(
        "import explanations: unknown unit index",
        (*_IMPORT, "np_unit.jsonl", *_RUN_SITE),
        "np_unit.jsonl line 1: unit 99999 is not one of site 'mlp.act''s 128 units: is this the right --site or --source?",
    ),
    Case(
        "import explanations: source of a layer the site lacks",
        (*_IMPORT, "np_layer.jsonl", *_RUN_SITE),
        "np_layer.jsonl line 1: source '9-res-jb' is layer 9, which site 'mlp.act' does not have (layers 0, 1, 2, 3): "
        "give --layer, or --source to import one source",
    ),
    Case(
        "import explanations: terminal escape in a description",
        (*_IMPORT, "np_hostile.jsonl", *_RUN_SITE),
        "np_hostile.jsonl line 1: description holds the control character '\\x1b': remove it or the line (a damaged "
        "export?)",
    ),
    Case(
        "import explanations: line break in a model name",
        (*_IMPORT, "np_name.jsonl", *_RUN_SITE),
        'np_name.jsonl line 1: explanationModelName "gpt\\nEVIL" must be text of 1 to 200 characters without '
        "control characters",
    ),
    Case(
        "a folder inside a warehouse given as the warehouse",
        ("sql", "{wh}/runs", "SELECT 1"),
        "{wh}/runs is inside the warehouse {wh}, not a warehouse itself: give {wh}",
    ),
    Case(
        "site layers beyond any model",
        ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "resid.out[0-99999999999]:last"),
        "--site 'resid.out[0-99999999999]:last': layer 99999999999 is beyond any model: give the model's own layers",
    ),
    Case(
        "export layers that are not a range or list",
        ("export", "site", "{wh}", "--run", "r", "--site", "mlp.act", "--out", "{new}", "--layers", "1-x"),
        "cannot read layers '1-x': write a range or a list, e.g. --layers 0-13 or --layers 0,2,5",
    ),
    Case(
        "export layers: a range too long to list",
        ("export", "site", "{wh}", "--run", "r", "--site", "mlp.act", "--out", "{new}", "--layers", "0-99999999999"),
        "layer 99999999999 in '0-99999999999' is beyond any model: give the site's own layers",
    ),
    Case(
        "export layers: empty",
        ("export", "site", "{wh}", "--run", "r", "--site", "mlp.act", "--out", "{new}", "--layers", " "),
        "--layers is empty: write a range or a list, e.g. --layers 0-13 or --layers 0,2,5",
    ),
    Case(
        "export layers: digits of another script",
        ("export", "site", "{wh}", "--run", "r", "--site", "mlp.act", "--out", "{new}", "--layers", "\u0663"),
        "cannot read layers '\u0663': write a range or a list, e.g. --layers 0-13 or --layers 0,2,5",
    ),
    Case(
        "import explanations: no such file",
        (*_IMPORT, "np_nothing.jsonl.gz", *_RUN_SITE),
        "np_nothing.jsonl.gz does not exist: give a Neuronpedia explanations file (.jsonl.gz) or its folder",
    ),
]


def hostile_dictionaries(folder: Path) -> None:
    """The dictionaries of the untrusted-dictionary rows, each one defect on a valid SAELens / Gemma Scope file."""
    import numpy as np

    def tensors(header, data: bytes = b"", length: int | None = None) -> bytes:
        text = json.dumps(header).encode()
        return (len(text) if length is None else length).to_bytes(8, "little") + text + data

    def cfg(name: str, **changes) -> None:
        path = dictionaries.saelens(folder / name, "topk", **changes.pop("make", {})) / "cfg.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    nan = dictionaries.saelens(folder / "nan", "topk") / "sae_weights.safetensors"
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(nan))
    weights["W_enc"][0, 0] = np.nan
    save_file(weights, str(nan))
    (dictionaries.saelens(folder / "list_header", "topk") / "sae_weights.safetensors").write_bytes(tensors([1, 2]))
    (dictionaries.saelens(folder / "long_header", "topk") / "sae_weights.safetensors").write_bytes(
        tensors({}, length=10**9)
    )
    huge = {"W_enc": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}}
    (dictionaries.saelens(folder / "huge_tensor", "topk") / "sae_weights.safetensors").write_bytes(
        tensors(huge, b"\0" * 16)
    )
    cfg("k_text", k="eight")
    cfg("k_fraction", k=2.9)
    cfg("layer_list", hook_layer=[1])
    cfg("k_beyond", make={"k": 97})
    zero = {"W_enc": (64, 0), "b_enc": (0,), "W_dec": (0, 64), "b_dec": (64,)}
    header, data = {}, b""
    for name, shape in zero.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [len(data), len(data) + size]}
        data += b"\0" * size
    cfg("no_latents", d_sae=None)
    (folder / "no_latents" / "sae_weights.safetensors").write_bytes(tensors(header, data))
    (dictionaries.saelens(folder / "cfg_folder", "topk") / "cfg.json").unlink()
    (folder / "cfg_folder" / "cfg.json").mkdir()
    npz = dictionaries.gemmascope(folder / "npz_member" / "layer_1" / "params.npz")
    with zipfile.ZipFile(npz, "w") as archive:
        member = io.BytesIO()
        np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (2**20, 2**20)})
        archive.writestr("W_enc.npy", member.getvalue() + b"\0" * 64)


def _parquet_bytes(table: pa.Table, **options) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def _damaged_parquet() -> bytes:
    """A Parquet file whose footer reads but whose first data page is garbage."""
    data = bytearray(_parquet_bytes(pa.table({"text": [f"document {i}" for i in range(50)]}), compression="zstd"))
    data[60:76] = b"\xff" * 16
    return bytes(data)


_NP_LINE = json.dumps(
    {
        "modelId": "gpt2-small",
        "layer": "0-res-jb",
        "index": "3",
        "description": "plural nouns",
        "explanationModelName": "gpt-4o-mini",
    }
)
FILES = {
    "docs.jsonl": b'{"text": "hello world"}\n{"text": "a second document"}\n',
    "empty.jsonl": b"",
    "blank.jsonl": b"\n\n  \n",
    "badline.jsonl": b'{"text": "ok"}\n{"text": oops}\n{"text": "fine"}\n',
    "notobject.jsonl": b'["a list"]\n',
    "notext.jsonl": b'{"body": "x"}\n',
    "numtext.jsonl": b'{"text": 5}\n',
    "latin1.txt": "caf\xe9 au lait\n".encode("latin-1"),
    "latin1.jsonl": b'{"text": "fine"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1"),
    "fake.parquet": b"not a pq\n",
    "docs.csv": b"text\nx\n",
    "broken.yaml": b"name: x\nprompt: [unclosed\n",
    "page.parquet": _damaged_parquet(),
    "numbers.parquet": _parquet_bytes(pa.table({"text": [1, 2]})),
    "surrogate.jsonl": b'{"text": "a\\ud800b"}\n',
    "numlabel.jsonl": b'{"text": "x", "dataset": 5}\n',
    "listid.jsonl": b'{"text": "x", "doc_id": [1]}\n',
    "late.jsonl": b'{"text": "hello world"}\n' * 300 + b"{oops}\n",
    "nantemp.yaml": b"name: t\nmodel: config:llama-tiny\nprompt: {messages: [{role: user, content: hi}]}\ngeneration: {temperature: .nan}\n",
    "seed.yaml": b"name: t\nmodel: config:llama-tiny\nprompt: {messages: [{role: user, content: hi}]}\ngeneration: {seed: -1}\n",
    "baddate.yaml": b"name: t\nwhen: 2001-13-01\n",
    "osc52.jsonl": b'{"text": "x", "dataset": "web\\u001b]52;c;aGk=\\u0007"}\n',
    "newline_id.jsonl": b'{"text": "x", "doc_id": "a\\nb"}\n',
    "cr_role.jsonl": b'{"text": "x", "role": "ok\\rEVIL"}\n',
    "bidi_label.jsonl": b'{"text": "x", "label": "\\u202eadmin"}\n',
    "dup_id.jsonl": b'{"text": "x", "id": "7"}\n{"text": "y", "id": "7"}\n',
    "web\x1b[31m.txt": b"hello\n",
    "np_truncated.jsonl.gz": gzip.compress(_NP_LINE.encode())[:-12],
    "np_badjson.jsonl": (_NP_LINE + "\n{oops}\n").encode(),
    "np_missing.jsonl": _NP_LINE.replace('"description": "plural nouns", ', "").encode(),
    "np_unit.jsonl": _NP_LINE.replace('"index": "3"', '"index": "99999"').encode(),
    "np_layer.jsonl": _NP_LINE.replace("0-res-jb", "9-res-jb").encode(),
    "np_hostile.jsonl": _NP_LINE.replace("plural nouns", "plural\\u001b[2J nouns").encode(),
    "np_name.jsonl": _NP_LINE.replace('"gpt-4o-mini"', '"gpt\\nEVIL"').encode(),
}


DAMAGES = {
    "newer_format": ("whq.json", json.dumps({"format_version": 99, "tool": "whq"}).encode()),
    "string_version": ("whq.json", json.dumps({"format_version": "1", "tool": "whq"}).encode()),
    "damaged_manifest": ("runs/r.json", b'{"run_id": "r", '),
    "empty_manifest": ("runs/r.json", b"{}"),
    "null_manifest": ("runs/r.json", b"null"),
    "parts_not_list": ("runs/r.json", b'{"parts": 5}'),
    "garbage_quarantine": ("quarantine.json", bytes(range(200, 256))),
    "corrupt_part": ("data/documents/run_id=r/part-0-000000.parquet", b"garbage\n"),
}


def damage(root: Path, how: str) -> None:
    (root / "whq.duckdb").unlink()  # as after a move: the catalog must be rebuilt
    if how == "catalog_folder":
        (root / "whq.duckdb").mkdir()
    elif how == "part_outside":
        manifest = json.loads((root / "runs" / "r.json").read_text())
        manifest["parts"][0]["path"] = "../../victim.parquet"
        (root / "runs" / "r.json").write_text(json.dumps(manifest))
    elif how == "folder_named_jsonl":
        (root / "docs.jsonl").mkdir()
    elif how == "fifo":
        os.mkfifo(root / "pipe.jsonl")
    elif how == "symlink_loop":
        os.symlink("loop.jsonl", root / "loop.jsonl")
    elif how == "interrupted_then_edited":
        # The journal of an interrupted run "i" whose docs.jsonl (in the working folder) had other content.
        journal = root / "journal" / "i"
        journal.mkdir(parents=True)
        recorded = {
            "path": str(Path("docs.jsonl").resolve()),
            "bytes": Path("docs.jsonl").stat().st_size,
            "sha256": "0" * 64,
        }
        (journal / "config.json").write_text(
            json.dumps({"data": [recorded], "started_at": "2026-01-01T00:00:00+00:00"})
        )
    elif how == "hard_link_out":
        os.link(root / "runs" / "r.json", "linked.html")  # in the working folder, as a user names an output
    elif how == "link_in_export":
        Path("site").mkdir()
        (Path("site") / EXPORT_MARKER).write_text('{"tool": "whq"}\n')  # an earlier export's folder
        (Path("site") / "index.html").symlink_to(root / "runs" / "r.json")
    elif how == "intact":
        pass  # a second, undamaged warehouse
    else:
        name, payload = DAMAGES[how]
        (root / name).write_bytes(payload)


@pytest.fixture(scope="module")
def tiny_wh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    for name, payload in FILES.items():
        (folder / name).write_bytes(payload)
    dictionaries.saelens(folder / "dicts" / "sae", "topk")
    dictionaries.saelens(folder / "dicts" / "odd", "matryoshka")
    dictionaries.saelens(folder / "dicts" / "narrow", "topk", d_in=32)
    hostile_dictionaries(folder / "dicts")
    code, out, err = run_whq(
        "ingest", folder / "wh", *MODEL, "--data", folder / "docs.jsonl", "--site", "mlp.act:topk=3", "--run-id", "r"
    )
    assert code == 0, err
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.input for c in CASES])
def test_bad_input_gives_exit_2_and_one_exact_line(case, tiny_wh, tmp_path, monkeypatch):
    import torch

    if "cuda" in case.args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name in FILES:
        shutil.copy(tiny_wh / name, tmp_path / name)
    shutil.copytree(tiny_wh / "dicts", tmp_path / "dicts")
    monkeypatch.chdir(tmp_path)  # data files by relative name, as a user types them
    values = {"new": tmp_path / "new", "wh": tiny_wh / "wh", "copy": tmp_path / "copy", **_memory_limits()}
    if case.damage:
        shutil.copytree(tiny_wh / "wh", values["copy"])
        damage(values["copy"], case.damage)
    code, out, err = run_whq(*[a.format(**values) for a in case.args])
    assert (code, err) == (2, "error: " + case.message.format(**values) + "\n")
    if "{new}" in case.args and (values["new"] / "journal").exists():
        assert not any((values["new"] / "journal").iterdir()), "a bad input left an interrupted run behind"


def _memory_limits() -> dict:
    """The machine's part of the examples=N refusal: its budget, and the largest N it allows (512 units x BYTES_PER_EXAMPLE_SLOT)."""
    from ingest.limits import BYTES_PER_EXAMPLE_SLOT, memory_budget

    budget, _ = memory_budget("cpu")
    return {"budget": f"{budget / 1e9:,.1f} GB", "most": str(budget // (512 * BYTES_PER_EXAMPLE_SLOT))}


def test_skip_bad_keeps_going_and_counts(tiny_wh, tmp_path, monkeypatch):
    shutil.copy(tiny_wh / "badline.jsonl", tmp_path / "badline.jsonl")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_whq(
        "ingest", tmp_path / "wh", *MODEL, "--data", "badline.jsonl", "--skip-bad", "--run-id", "s"
    )
    assert code == 0, err
    assert "skipped 1 bad record(s); first: badline.jsonl:2: invalid JSON (Expecting value)" in out
    assert "committed run s; 2 documents" in out


def _one_line_exit_2(code: int, err: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err


SPEC_TEXT = st.text(alphabet="mlpactupdownresid.in:=@,*_-0123456789xyz", min_size=1, max_size=24)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=SPEC_TEXT.filter(lambda s: not _parses(s)))
def test_malformed_specs_end_in_one_line(spec, tiny_wh):
    with tempfile.TemporaryDirectory() as folder:
        code, _, err = run_whq("ingest", Path(folder) / "wh", *MODEL, "--data", tiny_wh / "docs.jsonl", "--site", spec)
    _one_line_exit_2(code, err)


def _parses(spec: str) -> bool:
    from ingest.sites import parse_spec
    from warehouse.errors import WarehouseError

    try:
        parse_spec(spec)
        return True
    except WarehouseError:
        return False


BAD_LINES = st.one_of(
    st.binary(min_size=1, max_size=12).map(lambda b: b"\xff" + b),  # not UTF-8
    st.text(alphabet="{[\"':,ab1 ", min_size=1, max_size=12)
    .map(lambda t: ("{" + t).encode())
    .filter(lambda b: not _has_text(b)),  # broken JSON or no text
    st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=5)).map(
        lambda v: json.dumps(v).encode()
    ),
    st.dictionaries(
        st.sampled_from(["text", "doc", "content"]),
        st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3))),
        min_size=1,
    ).map(lambda d: json.dumps(d).encode()),  # text not a string
)


def _has_text(line: bytes) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and any(isinstance(row.get(k), str) for k in ("text", "doc", "content", "id"))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=BAD_LINES)
def test_malformed_jsonl_lines_end_in_one_line_naming_the_line(line):
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "docs.jsonl"
        data.write_bytes(b'{"text": "a good first line"}\n' + line.replace(b"\n", b" ") + b"\n")
        code, _, err = run_whq("ingest", Path(folder) / "wh", *MODEL, "--data", data)
    _one_line_exit_2(code, err)
    assert f"{data}:2: " in err


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
SCENARIOS = st.one_of(
    st.dictionaries(
        st.sampled_from(["name", "model", "prompt", "generation", "capture", "output", "reference_states", "extra"]),
        YAML_VALUES,
        max_size=6,
    ).map(lambda d: yaml.safe_dump(d).encode()),
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=20).map(lambda b: b"name: \xff" + b),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=SCENARIOS)
def test_malformed_scenarios_end_in_one_line(payload):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scenario.yaml"
        path.write_bytes(payload)
        code, _, err = run_whq("ingest", Path(folder) / "wh", "--scenario", path, "-q", "--device", "cpu")
    _one_line_exit_2(code, err)


def _shell_word(arg: str) -> str:
    """An argument as a user types it in bash: control characters as $'...' escapes."""
    if not arg.isprintable():
        return "$'" + arg.encode("unicode_escape").decode() + "'"
    return f'"{arg}"' if " " in arg else arg


def matrix_markdown() -> str:
    """The bad-input table of docs/bad-inputs.md, from CASES."""
    names = {"new": "NEW", "wh": "WH", "copy": "WH", "budget": "<half the RAM>", "most": "<N>"}
    lines = ["| # | bad input | command | exact one-line message (exit 2) |", "|---|---|---|---|"]
    for i, case in enumerate(CASES, 1):
        command = "whq " + " ".join(_shell_word(x.format(**names)) for x in case.args)
        message = "error: " + case.message.format(**names)
        lines.append(f"| {i} | {case.input} | `` {command} `` | `` {message} `` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(matrix_markdown())

"""The bad-input matrix: each bad input through the real CLI ends in exit 2 and one exact line.

The README's bad-input table is generated from CASES (`python -m tests.test_bad_inputs`),
so the table and the test cannot drift apart. A hypothesis test then throws malformed
SPECs, scenario YAMLs and JSONL lines at the CLI: always exit 2, one line, no traceback.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .cli_runner import run_whq

MODEL = ["--model", "config:llama-tiny", "-q", "--device", "cpu"]


@dataclass(frozen=True)
class Case:
    input: str             # what is wrong, for the README table
    args: tuple            # CLI arguments; {new} fresh folder, {wh} a committed warehouse, {copy} a damaged copy of it
    message: str           # the exact line after "error: " ({new}, {wh}, {copy} filled in)
    damage: str | None = None  # how {copy} is damaged: newer_format | damaged_manifest | corrupt_part


CASES = [
    Case("model folder that does not exist", ("ingest", "{new}", "--model", "no/such/model", "--data", "docs.jsonl", "-q"),
         "model folder no/such/model does not exist: give a local model folder, a cached hub id, or `minilm`"),
    Case("unknown model config", ("ingest", "{new}", "--model", "config:gpt-huge", "--data", "docs.jsonl", "-q"),
         "unknown model config 'gpt-huge': use one of qwen3-0.6b, qwen3-tiny, llama-tiny"),
    Case("model without the named module", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "nothing.*.here:topk=3"),
         "site 'nothing.*.here:topk=3': module glob 'nothing.*.here' matches no module of this model; list them with `whq sites --model M`"),
    Case("unknown site alias", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.nope:topk=3"),
         "unknown site 'mlp.nope': did you mean 'mlp.up'? aliases for this model: mlp.up, mlp.gate, mlp.act, mlp.down, "
         "attn.q, attn.k, attn.v, attn.o, resid.in, resid.out; or give a module glob (see `whq sites --model M`)"),
    Case("SPEC typo in a reduction", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:tpk=3"),
         "--site 'mlp.act:tpk=3': unknown reduction 'tpk'; did you mean 'topk'? known: topk, abstopk, threshold, nag, examples, hist, quantiles, similar, last, mean, dense"),
    Case("SPEC argument not a number", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:topk=x"),
         "--site 'mlp.act:topk=x': topk='x' needs a whole number"),
    Case("SPEC argument zero", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:topk=0"),
         "--site 'mlp.act:topk=0': topk=0 must be at least 1"),
    Case("SPEC hook point typo", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act@sideways:topk=3"),
         "--site 'mlp.act@sideways:topk=3': hook point must be @in or @out, not @sideways"),
    Case("same site twice", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:topk=3", "--site", "mlp.act:nag=3"),
         "site given twice (mlp.act): merge the reductions into one SPEC, e.g. mlp.act:topk=20,examples=20"),
    Case("no --data", ("ingest", "{new}", *MODEL),
         "no --data given: pass a .jsonl, .parquet or .txt file (or a --scenario)"),
    Case("data file that does not exist", ("ingest", "{new}", *MODEL, "--data", "missing.jsonl"),
         "data file missing.jsonl does not exist: check the path"),
    Case("unsupported data file type", ("ingest", "{new}", *MODEL, "--data", "docs.csv"),
         "data file docs.csv: unsupported type .csv; use .jsonl, .parquet or .txt"),
    Case("empty data file", ("ingest", "{new}", *MODEL, "--data", "empty.jsonl"),
         "data file empty.jsonl is empty: give a file with at least one document"),
    Case("data file of blank lines only", ("ingest", "{new}", *MODEL, "--data", "blank.jsonl"),
         "no documents to capture: the data files hold no readable documents"),
    Case("JSONL with a bad line (line number reported)", ("ingest", "{new}", *MODEL, "--data", "badline.jsonl"),
         "badline.jsonl:2: invalid JSON (Expecting value); fix it, or pass --skip-bad to skip bad records"),
    Case("JSONL line that is not an object", ("ingest", "{new}", *MODEL, "--data", "notobject.jsonl"),
         "notobject.jsonl:1: expected a JSON object per line; fix it, or pass --skip-bad to skip bad records"),
    Case("JSONL record without a text column", ("ingest", "{new}", *MODEL, "--data", "notext.jsonl"),
         "notext.jsonl:1: no text column (expected one of text, doc, content); fix it, or pass --skip-bad to skip bad records"),
    Case("JSONL text that is not a string", ("ingest", "{new}", *MODEL, "--data", "numtext.jsonl"),
         "numtext.jsonl:1: column 'text' must be a string, got int; fix it, or pass --skip-bad to skip bad records"),
    Case("non-UTF-8 text file", ("ingest", "{new}", *MODEL, "--data", "latin1.txt"),
         "latin1.txt:1: not UTF-8 text; fix it, or pass --skip-bad to skip bad records"),
    Case("non-UTF-8 JSONL line", ("ingest", "{new}", *MODEL, "--data", "latin1.jsonl"),
         "latin1.jsonl:2: not UTF-8 text; fix it, or pass --skip-bad to skip bad records"),
    Case("Parquet data that is not Parquet", ("ingest", "{new}", *MODEL, "--data", "fake.parquet"),
         "fake.parquet is not a readable Parquet file (Parquet magic bytes not found in footer. Either the file is corrupted or this "
         "is not a parquet file.): check the file"),
    Case("window longer than the model's positions", ("ingest", "{new}", "--model", "minilm", "-q", "--device", "cpu",
                                                      "--data", "docs.jsonl", "--max-length", "1000"),
         "--max-length 1000 is longer than the 512 positions model 'minilm' has: use at most 512 (longer documents are split into windows)"),
    Case("window too short for any text", ("ingest", "{new}", "--model", "minilm", "-q", "--device", "cpu",
                                           "--data", "docs.jsonl", "--max-length", "2"),
         "--max-length 2 leaves no room for text after 2 special tokens: raise it"),
    Case("dtype the device lacks (float16 on the CPU)", ("ingest", "{new}", "--model", "config:llama-tiny", "-q", "--data", "docs.jsonl",
                                                         "--dtype", "float16", "--device", "cpu"),
         "--dtype float16 is not supported on the cpu: use --dtype float32 or bfloat16 there, or --device cuda"),
    Case("CUDA requested without CUDA", ("ingest", "{new}", "--model", "config:llama-tiny", "-q", "--data", "docs.jsonl", "--device", "cuda"),
         "--device cuda asked for CUDA but this machine has no CUDA device: use --device cpu (or auto)"),
    Case("unknown device", ("ingest", "{new}", "--model", "config:llama-tiny", "-q", "--data", "docs.jsonl", "--device", "tpu"),
         "unknown --device 'tpu': use auto, cpu, cuda or cuda:N"),
    Case("unknown dtype", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--dtype", "float64"),
         "unknown --dtype 'float64': use one of float32, bfloat16, float16"),
    Case("run id with a slash", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--run-id", "bad/id"),
         "invalid run id 'bad/id': use letters, digits, '.', '_' or '-' (at most 128 characters, starting with a letter or digit)"),
    Case("batch size 0", ("ingest", "{new}", *MODEL, "--data", "docs.jsonl", "--batch-size", "0"),
         "--batch-size must be at least 1"),
    Case("run id already committed", ("ingest", "{wh}", *MODEL, "--data", "docs.jsonl", "--site", "mlp.act:topk=3", "--run-id", "r"),
         "run 'r' is already committed: choose another --run-id, or delete it with `whq runs {wh} --delete r`"),
    Case("scenario file that does not exist", ("ingest", "{new}", "--scenario", "missing.yaml", "-q"),
         "scenario file missing.yaml does not exist: give the path of a scenario .yaml"),
    Case("scenario YAML with a syntax error", ("ingest", "{new}", "--scenario", "broken.yaml", "-q"),
         "broken.yaml: not valid YAML at line 3 (expected ',' or ']', but got '<stream end>'): fix the syntax"),
    Case("unknown run in a macro", ("sql", "{wh}", "SELECT * FROM layer_summary('nope', 'mlp.act')"),
         "SQL error: Invalid Input Error: no committed run 'nope' in this warehouse: list the runs with SELECT run_id FROM runs"),
    Case("unknown table in SQL", ("sql", "{wh}", "SELECT * FROM nope"),
         "SQL error: Catalog Error: Table with name nope does not exist!"),
    Case("write through --read-only", ("sql", "{wh}", "DROP VIEW runs", "--read-only"),
         "read-only mode refuses DROP statements: only SELECT/WITH/VALUES/DESCRIBE/SUMMARIZE/SHOW queries are allowed"),
    Case("folder that is not a warehouse", ("sql", "{new}", "SELECT 1"),
         "{new} is not a whq warehouse: create it with `whq init {new}`"),
    Case("deleting an unknown run", ("runs", "{wh}", "--delete", "nope"),
         "no committed run 'nope' in {wh} (runs: r); list them with `whq runs {wh}`"),
    Case("warehouse of a newer format version", ("runs", "{copy}"),
         "{copy} has format version 99, newer than this whq reads (1): upgrade whq (pip install -U whq)", "newer_format"),
    Case("damaged run manifest", ("runs", "{copy}"),
         "manifest {copy}/runs/r.json is damaged: run `whq repair {copy}` to set it aside (the other runs stay queryable)", "damaged_manifest"),
    Case("corrupt Parquet part", ("runs", "{copy}"),
         "cannot build the catalog (Invalid Input Error: File '{copy}/data/documents/run_id=r/part-0-000000.parquet' too small "
         "to be a Parquet file): find the bad part with `whq check {copy}`, then `whq repair {copy}` quarantines its run", "corrupt_part"),
]

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
}


def damage(root: Path, how: str) -> None:
    if how == "newer_format":
        (root / "whq.json").write_text(json.dumps({"format_version": 99, "tool": "whq"}))
    elif how == "damaged_manifest":
        (root / "runs" / "r.json").write_text('{"run_id": "r", ')
    elif how == "corrupt_part":
        (root / "data" / "documents" / "run_id=r" / "part-0-000000.parquet").write_bytes(b"garbage\n")
    (root / "whq.duckdb").unlink()  # as after a move: the catalog must be rebuilt


@pytest.fixture(scope="module")
def tiny_wh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    for name, payload in FILES.items():
        (folder / name).write_bytes(payload)
    code, out, err = run_whq("ingest", folder / "wh", *MODEL, "--data", folder / "docs.jsonl", "--site", "mlp.act:topk=3", "--run-id", "r")
    assert code == 0, err
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.input for c in CASES])
def test_bad_input_gives_exit_2_and_one_exact_line(case, tiny_wh, tmp_path, monkeypatch):
    import torch

    if "cuda" in case.args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name in FILES:
        shutil.copy(tiny_wh / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)  # data files by relative name, as a user types them
    values = {"new": tmp_path / "new", "wh": tiny_wh / "wh", "copy": tmp_path / "copy"}
    if case.damage:
        shutil.copytree(tiny_wh / "wh", values["copy"])
        damage(values["copy"], case.damage)
    code, out, err = run_whq(*[a.format(**values) for a in case.args])
    assert (code, err) == (2, "error: " + case.message.format(**values) + "\n")
    if "{new}" in case.args and (values["new"] / "journal").exists():
        assert not any((values["new"] / "journal").iterdir()), "a bad input left an interrupted run behind"


def test_skip_bad_keeps_going_and_counts(tiny_wh, tmp_path, monkeypatch):
    shutil.copy(tiny_wh / "badline.jsonl", tmp_path / "badline.jsonl")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_whq("ingest", tmp_path / "wh", *MODEL, "--data", "badline.jsonl", "--skip-bad", "--run-id", "s")
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
    st.binary(min_size=1, max_size=12).map(lambda b: b"\xff" + b),                       # not UTF-8
    st.text(alphabet="{[\"':,ab1 ", min_size=1, max_size=12).map(lambda t: ("{" + t).encode()).filter(
        lambda b: not _has_text(b)),                                                          # broken JSON or no text
    st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=5)).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["text", "doc", "content"]), st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3))),
                    min_size=1).map(lambda d: json.dumps(d).encode()),                       # text not a string
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


YAML_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
SCENARIOS = st.one_of(
    st.dictionaries(st.sampled_from(["name", "model", "prompt", "generation", "capture", "output", "reference_states", "extra"]),
                    YAML_VALUES, max_size=6).map(lambda d: yaml.safe_dump(d).encode()),
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


def matrix_markdown() -> str:
    """The README's bad-input table, from CASES."""
    names = {"new": "NEW", "wh": "WH", "copy": "WH"}
    lines = ["| # | bad input | command | exact one-line message (exit 2) |", "|---|---|---|---|"]
    for i, case in enumerate(CASES, 1):
        command = "whq " + " ".join(a if " " not in a else f'"{a}"' for a in (x.format(**names) for x in case.args))
        message = "error: " + case.message.format(**names)
        lines.append(f"| {i} | {case.input} | `` {command} `` | `` {message} `` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(matrix_markdown())

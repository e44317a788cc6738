"""Names and paths: one validator (warehouse/names.py) for every run id, site name and label.

- Properties (hypothesis): the validator accepts exactly the documented grammar, checked
  against an independent oracle over arbitrary unicode, control characters, separators,
  '..' and the layout's own suffixes; whatever it accepts is one safe path component that
  stays inside the warehouse, through every Layout path.
- The probes of issue 17 through the real CLI: `runs --delete ../whq` and `../../victim`
  delete nothing; a run id ending in a newline is refused; a warehouse that an older whq
  let commit one is repaired by `whq repair`.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warehouse.errors import BadInput
from warehouse.layout import Layout
from warehouse.names import check_label, check_name, is_valid_name

from .cli_runner import run_whq
from .conftest import FIXTURES

FIRST = string.ascii_letters + string.digits
ALLOWED = FIRST + "._-"
# The documented suffixes, written out again: the oracle must not import what it checks.
SUFFIXES = (".json", ".jsonl", ".damaged", ".tmp", ".wal", ".lock", ".done", ".parquet", ".duckdb")


def documented(name: str) -> bool:
    """warehouse/names.py's grammar, as its docstring states it, without a regular expression."""
    return (
        1 <= len(name) <= 128
        and name[0] in FIRST
        and all(c in ALLOWED for c in name)
        and ".." not in name
        and ".rank-" not in name
        and not name.lower().endswith(SUFFIXES)
    )


PIECES = st.sampled_from(
    [
        "a",
        "Z",
        "0",
        ".",
        "..",
        "_",
        "-",
        "/",
        "\\",
        "\n",
        "\x00",
        "\r",
        " ",
        "é",
        "\u202e",
        "=",
        ":",
        "'",
        ".rank-",
        *SUFFIXES,
        *(s.upper() for s in SUFFIXES),
    ]
)
NAMES = st.one_of(
    st.text(max_size=140),  # arbitrary unicode
    st.lists(PIECES, max_size=8).map("".join),  # the dangerous pieces, combined
    st.text(alphabet=ALLOWED, min_size=1, max_size=130),  # near the grammar
    st.builds(lambda a, b: a + b, st.text(alphabet=ALLOWED, min_size=1, max_size=20), PIECES),
)


@settings(max_examples=600, deadline=None)
@given(name=NAMES)
def test_the_validator_accepts_exactly_the_documented_grammar(name):
    assert is_valid_name(name) == documented(name)
    if not documented(name):
        with pytest.raises(BadInput) as refused:
            check_name("run id", name)
        assert "\n" not in str(refused.value) and repr(name) in str(refused.value)


@settings(max_examples=300, deadline=None)
@given(name=NAMES.filter(is_valid_name))
def test_an_accepted_name_is_one_safe_path_component_inside_the_warehouse(name):
    root = Path("/srv/wh")
    assert name.isascii() and name.isprintable() and name not in (".", "..")
    assert os.sep not in name and Path(name).name == name and os.path.normpath(name) == name
    layout = Layout(root)
    paths = [
        layout.manifest(name),
        layout.journal_dir(name),
        layout.partition_dir("documents", name),
        layout.partition_dir("token_neurons", name, name, 3),
    ]
    for path in paths:
        assert os.path.normpath(path) == str(path) and path.is_relative_to(layout.root)
    assert layout.manifest(name).parent == layout.runs_dir
    assert layout.journal_dir(name).parent == layout.journal_root


@pytest.mark.parametrize(
    "name",
    [
        "../whq",
        "../../victim",
        "r\n",
        "\nr",
        "r\x00",
        "..",
        ".",
        "",
        "a/b",
        "a\\b",
        "a..b",
        "R.JSON",
        "r.json.damaged",
        "w.rank-0",
        "-r",
        "é",
        "x" * 129,
        None,
        5,
    ],
)
def test_every_layout_path_refuses_a_bad_name(name):
    layout = Layout("/srv/wh")
    builds = [layout.manifest, layout.journal_dir, layout.run_data_dirs, lambda n: layout.partition_dir("documents", n)]
    if name is not None:  # site=None is a table without sites
        builds.append(lambda n: layout.partition_dir("token_neurons", "r", n, 0))
    for build in builds:
        with pytest.raises(BadInput):
            build(name)


@settings(max_examples=300, deadline=None)
@given(label=st.text(max_size=300))
def test_labels_are_any_text_without_control_characters(label):
    bad = (
        not label.strip()
        or len(label) > 256
        or any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029\u200b\u202e\ufeff" for c in label)
    )
    try:
        check_label("dataset", label)
        accepted = True
    except BadInput:
        accepted = False
    if bad:
        assert not accepted
    if accepted:  # it stays on the one line of a message
        assert len(label.splitlines()) == 1 and label == label.splitlines()[0]


@pytest.fixture
def wh(tmp_path) -> Path:
    root = tmp_path / "box" / "wh"
    shutil.copytree(FIXTURES / "golden_wh", root)
    return root


def test_delete_of_a_path_deletes_nothing(wh):
    victim = wh.parent.parent / "victim.json"
    victim.write_text("{}")
    assert run_whq("runs", wh)[0] == 0  # opened once: the catalog and lock file exist before the snapshot
    before = sorted(p.relative_to(wh).as_posix() for p in wh.rglob("*"))
    for target in ("../whq", "../../victim", "g\n", "g/../g", "..", "runs/g"):
        code, out, err = run_whq("runs", wh, "--delete", target)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: invalid run id "), err
    assert victim.read_text() == "{}"
    assert sorted(p.relative_to(wh).as_posix() for p in wh.rglob("*")) == before
    code, out, _ = run_whq("runs", wh, "--format", "json")
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == ["g"]


def test_python_api_refuses_a_path_as_run_id(wh):
    import warehouse
    from queries import frames
    from warehouse.maintenance import delete_run

    with warehouse.open(wh) as opened:
        for call in (
            lambda: opened.manifest("../whq"),
            lambda: opened.files("documents", "../whq"),
            lambda: frames.scan(opened, "documents", "g\n"),
            lambda: delete_run(opened, "../whq"),
        ):
            with pytest.raises(BadInput):
                call()
        assert opened.run_ids() == ["g"]
    assert (wh / "whq.json").exists()


def test_a_run_id_with_a_newline_committed_by_an_older_whq_is_repaired(wh):
    """An older whq let 'g\\n' commit: every command then failed. Now: one line, and repair sets it aside."""
    bad = "g\n"
    manifest = json.loads((wh / "runs" / "g.json").read_text())
    manifest["run_id"] = bad
    for part in manifest["parts"]:
        old = part["path"]
        part["path"] = old.replace("run_id=g/", f"run_id={bad}/")
        (wh / part["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(wh / old, wh / part["path"])
    (wh / "runs" / f"{bad}.json").write_text(json.dumps(manifest))
    (wh / "whq.duckdb").unlink(missing_ok=True)

    code, _, err = run_whq("runs", wh)
    assert code == 2 and err.count("\n") == 1 and "is not a valid run id" in err and f"whq repair {wh}" in err, err
    code, out, err = run_whq("repair", wh)
    assert code == 0, err
    assert "set the damaged manifest of run 'g\\n' aside" in out and all(
        line.isprintable() for line in out.splitlines()
    )
    code, out, err = run_whq("runs", wh, "--format", "json")
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == ["g"], err
    code, out, err = run_whq("check", wh)
    assert code == 0 and "all verify" in out, out + err
    code, out, err = run_whq("gc", wh, "--dry-run")  # the set-aside run's data is kept for its owner
    assert code == 0 and "would remove 0 item(s)" in out, out


@pytest.mark.parametrize(
    "model", ["minilm", "models/Qwen3-0.6B", "models/a..b", "config:qwen3-tiny", "/x/..hidden...", "é/ü"]
)
def test_the_default_run_id_is_a_valid_name(model):
    from ingest.pipeline import default_run_id

    assert is_valid_name(default_run_id(model))

"""Output paths (warehouse/output.py): no command writes a user-named path inside a warehouse
folder, an output of the wrong kind is one line, and folder exports never overwrite files whq
did not write. Every writing command goes through the same check, so each is tried here."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from warehouse.errors import BadInput
from warehouse.output import EXPORT_MARKER, check_output_file, check_output_folder, enclosing_warehouse

from .cli_runner import run_whq

MODEL = ["--model", "config:llama-tiny", "-q", "--device", "cpu"]

# Every command that writes a user-named path: (arguments before the path, option, kind of output).
WRITERS = {
    "report --out": (["report", "{wh}", "--run", "r", "--out"], "--out", "file"),
    "report --csv": (["report", "{wh}", "--run", "r", "--out", "{tmp}/report.html", "--csv"], "--csv", "folder"),
    "export features": (["export", "features", "{wh}", "--run", "r", "--site", "mlp.act", "--out"], "--out", "folder"),
    "export site": (["export", "site", "{wh}", "--run", "r", "--site", "mlp.act", "--out"], "--out", "folder"),
    "export neuronpedia": (
        ["export", "neuronpedia", "{wh}", "--run", "r", "--site", "mlp.act", "--out"],
        "--out",
        "folder",
    ),
    "nag select": (["nag", "select", "{wh}", "--target", "r", "--pool", "r", "--out"], "--out", "file"),
    "nag merge": (["nag", "merge", "{tmp}/selection.parquet", "--out"], "--out", "file"),
    "nag keys": (["nag", "keys", "{wh}", "--target", "r", "--top", "3", "--out"], "--out", "file"),
}


@pytest.fixture(scope="module")
def wh(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("outputs")
    (folder / "docs.jsonl").write_text('{"text": "hello world"}\n{"text": "a second document"}\n')
    code, _, err = run_whq(
        "ingest", folder / "wh", *MODEL, "--data", folder / "docs.jsonl", "--site", "mlp.act:topk=3,examples=5",
        "--run-id", "r",
    )  # fmt: skip
    assert code == 0, err
    return folder / "wh"


def _fingerprint(root: Path) -> dict[str, str]:
    """Every file of the warehouse (but the regenerated catalog) with its sha256."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "whq.duckdb"
    }


def _run(args: list[str], **values) -> tuple[int, str, str]:
    return run_whq(*[a.format(**values) for a in args])


def _one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err[len("error: ") : -1]


# The example and its kin: a manifest, a part folder, the root itself, the marker,
# a relative path climbing into it, a symlink into it.
TARGETS = {
    "a run's manifest": lambda wh, tmp: wh / "runs" / "r.json",
    "the data folder": lambda wh, tmp: wh / "data" / "out",
    "the warehouse root": lambda wh, tmp: wh,
    "the marker": lambda wh, tmp: wh / "whq.json",
    "a path climbing into it": lambda wh, tmp: Path(os.path.relpath(wh / "runs", tmp)) / ".." / "runs" / "q1.json",
    "a symlink into it": lambda wh, tmp: tmp / "link" / "out.json",
}


@pytest.mark.parametrize("target", TARGETS, ids=list(TARGETS))
@pytest.mark.parametrize("writer", WRITERS, ids=list(WRITERS))
def test_no_command_writes_inside_a_warehouse(writer, target, wh, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(wh / "runs")
    before = _fingerprint(wh)
    args, option, _ = WRITERS[writer]
    path = TARGETS[target](wh, tmp_path)
    code, _, err = _run([*args, str(path)], wh=wh, tmp=tmp_path)
    message = _one_line(code, err)
    assert message == (
        f"whq refuses writing {str(path)!r}, inside the warehouse {wh.resolve()}: its files change only "
        f"through whq; give {option} a path outside it"
    )
    assert _fingerprint(wh) == before, "a refused output changed the warehouse"
    code, out, err = run_whq("runs", wh, "--format", "csv")
    assert code == 0 and out.splitlines()[1].startswith("r,"), err


def test_another_warehouse_is_refused_too(wh, tmp_path):
    """Not only the warehouse a command opened: any folder holding whq.json."""
    other = tmp_path / "other"
    assert run_whq("init", other)[0] == 0
    code, _, err = run_whq("nag", "keys", wh, "--target", "r", "--top", "3", "--out", other / "keys.json")
    assert "inside the warehouse" in _one_line(code, err) and not (other / "keys.json").exists()
    code, _, err = run_whq("sql", wh, f"COPY (SELECT 1 AS x) TO '{other}/x.parquet'")
    assert _one_line(code, err).startswith(f"whq sql refuses writing '{other}/x.parquet', inside the warehouse {other}")


WRONG_KINDS = {
    "file": [
        ("an existing folder", lambda tmp: tmp / "folder", "--out {p} is a folder: name a file in it, e.g. {p}/out"),
        ("a path below a file", lambda tmp: tmp / "plain.txt" / "out.x", "--out {p}: {tmp}/plain.txt is a file, not a folder: pick another path"),
        ("a path two below a file", lambda tmp: tmp / "plain.txt" / "a" / "out.x", "--out {p}: {tmp}/plain.txt is a file, not a folder: pick another path"),
    ],
    "folder": [
        ("an existing file", lambda tmp: tmp / "plain.txt", "{option} {p} is a file, not a folder: name a new or empty folder"),
        ("a path below a file", lambda tmp: tmp / "plain.txt" / "out", "{option} {p}: {tmp}/plain.txt is a file, not a folder: pick another path"),
        ("a folder holding other files", lambda tmp: tmp / "folder", "{option} {p} holds files whq did not write: name a new or empty folder, or remove them first"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("writer", WRITERS, ids=list(WRITERS))
def test_outputs_of_the_wrong_kind_are_one_line(writer, wh, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "mine.txt").write_text("the user's own file\n")
    (tmp_path / "plain.txt").write_text("a file\n")
    args, option, kind = WRITERS[writer]
    for _, make, expected in WRONG_KINDS[kind]:
        path = make(tmp_path)
        code, _, err = _run([*args, str(path)], wh=wh, tmp=tmp_path)
        assert _one_line(code, err) == expected.format(p=path, tmp=tmp_path, option=option)
    assert (tmp_path / "folder" / "mine.txt").read_text() == "the user's own file\n"
    assert (tmp_path / "plain.txt").read_text() == "a file\n"


@pytest.mark.parametrize("command", ["features", "site", "neuronpedia"])
def test_folder_exports_rewrite_their_own_folders_only(command, wh, tmp_path):
    out = tmp_path / "export"
    args = ["export", command, wh, "--run", "r", "--site", "mlp.act", "--out", out, "--layers", "0"]
    assert run_whq(*args)[0] == 0 and (out / EXPORT_MARKER).is_file()
    code, _, err = run_whq(*args)  # again into its own folder: allowed
    assert code == 0, err
    (out / EXPORT_MARKER).unlink()  # now a folder of files whq cannot tell from the user's
    code, _, err = run_whq(*args)
    assert "holds files whq did not write" in _one_line(code, err)


def test_a_failed_export_leaves_no_folder(wh, tmp_path):
    out = tmp_path / "new" / "export"
    code, _, err = run_whq("export", "site", wh, "--run", "nope", "--site", "mlp.act", "--out", out)
    assert "no run 'nope'" in _one_line(code, err)
    assert not out.exists()


def test_checks_directly(wh, tmp_path):
    assert enclosing_warehouse(wh / "runs" / "r.json") == wh.resolve()
    assert enclosing_warehouse(wh / "no" / "such" / "file") == wh.resolve()
    assert enclosing_warehouse(tmp_path / "x") is None
    assert enclosing_warehouse("s3://bucket/wh/runs/x.json") is None
    assert enclosing_warehouse(":memory:") is None
    assert enclosing_warehouse(tmp_path / "x", roots=(tmp_path,)) == tmp_path.resolve()
    assert check_output_file(tmp_path / "new" / "file.json") == tmp_path / "new" / "file.json"
    assert check_output_folder(tmp_path / "new") == tmp_path / "new"
    with pytest.raises(BadInput, match="inside the warehouse"):
        check_output_folder(wh / "data")


def test_no_push_goes_into_a_warehouse_folder(wh, tmp_path):
    """A file:// destination of `whq push` is a new warehouse folder on this machine, refused inside
    a warehouse like `whq init` (it had written a second warehouse into the first one's data/)."""
    other = tmp_path / "other"
    assert run_whq("init", other)[0] == 0
    before = _fingerprint(wh)
    for url, inside in (
        (f"file://{wh}/data/copy", wh),
        (f"file://{other}/copy", other),
        (f"local://{wh}/runs", wh),
    ):
        code, _, err = run_whq("push", wh, url, "-q")
        assert _one_line(code, err) == (
            f"whq refuses writing {url!r}, inside the warehouse {inside.resolve()}: its files change only "
            "through whq; push to a folder outside it"
        )
    assert _fingerprint(wh) == before and not (other / "copy").exists()
    code, out, err = run_whq("push", wh, f"file://{tmp_path / 'elsewhere'}", "-q")
    assert code == 0 and (tmp_path / "elsewhere" / "runs" / "r.json").is_file(), err


def test_no_warehouse_is_created_inside_another(wh, tmp_path):
    """A new warehouse is a user-named output too (whq init, and ingest into a new folder)."""
    before = _fingerprint(wh)
    for args in (
        ("init", wh / "runs" / "new"),
        ("ingest", wh / "data" / "new", *MODEL, "--data", wh.parent / "docs.jsonl"),
    ):
        code, _, err = run_whq(*args)
        assert _one_line(code, err) == (
            f"whq refuses writing '{args[1]}', inside the warehouse {wh.resolve()}: its files change only through "
            "whq; create the new warehouse outside it"
        )
        assert not args[1].exists()
    assert _fingerprint(wh) == before


def test_no_output_is_written_through_a_link(wh, tmp_path):
    """Writing a file truncates it in place: a hard link to a run's manifest named as the output, or a
    symlink dropped into a folder whq marked before, would have the output written over the manifest."""
    manifest = wh / "runs" / "r.json"
    before = _fingerprint(wh)
    for writer, (args, option, kind) in WRITERS.items():
        if kind == "file":
            path = tmp_path / f"{writer.replace(' ', '_')}.out"
            os.link(manifest, path)
            expected = (
                f"{option} {path} has 2 hard links, and writing it would change the file under its other names "
                "too: remove it first, or name another file"
            )
        else:
            path = tmp_path / writer.replace(" ", "_")
            path.mkdir()
            (path / EXPORT_MARKER).write_text('{"tool": "whq"}\n')  # as an earlier export left it
            (path / "index.html").symlink_to(manifest)
            expected = (
                f"{option} {path} holds {path / 'index.html'}, a link whq did not make, and writing through it "
                "would change the file it leads to: remove it first, or name a new or empty folder"
            )
        code, _, err = _run([*args, str(path)], wh=wh, tmp=tmp_path)
        assert _one_line(code, err) == expected, writer
        if kind == "file":
            path.unlink()
    assert _fingerprint(wh) == before, "an output was written through a link into the warehouse"


def test_a_site_export_is_not_written_through_a_link_it_did_not_make(wh, tmp_path):
    """The attack end to end: export once, swap the export's index.html for a symlink to the manifest
    and a unit folder for a symlink into the data, export again."""
    out = tmp_path / "site"
    args = ["export", "site", wh, "--run", "r", "--site", "mlp.act", "--out", out, "--layers", "0"]
    assert run_whq(*args)[0] == 0
    before = _fingerprint(wh)
    (out / "index.html").unlink()
    (out / "index.html").symlink_to(wh / "runs" / "r.json")
    code, _, err = run_whq(*args)
    assert "index.html, a link whq did not make" in _one_line(code, err)
    (out / "index.html").unlink()
    os.link(wh / "runs" / "r.json", out / "index.html")
    code, _, err = run_whq(*args)
    assert "index.html, a link whq did not make" in _one_line(code, err)
    (out / "index.html").unlink()
    unit_folder = next(p for p in out.iterdir() if p.is_dir())
    os.rename(unit_folder, tmp_path / "moved")
    unit_folder.symlink_to(wh / "data", target_is_directory=True)
    code, _, err = run_whq(*args)
    assert f"{unit_folder.name}, a link whq did not make" in _one_line(code, err)
    assert _fingerprint(wh) == before
    unit_folder.unlink()
    assert run_whq(*args)[0] == 0  # the links gone, the folder is whq's again

"""The READMEs cannot drift from the code.

- README.md's shell and Python blocks run, in order, against a small demo warehouse
  (`whq demo` itself is only parsed: it builds the full demo, ~30 s).
- Every `whq` line in every README parses against the real command line: the command
  exists, every option exists, and the values have the right types.
- The generated parts (tests/docgen.py) are what cog writes now, whatever the terminal.
- Relative links point to files and headings that exist; README's test command is .ci/run's.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import docgen
from .cli_runner import run_whq
from .conftest import write_jsonl

ROOT = docgen.ROOT
READMES = [
    ROOT / "README.md",
    *(ROOT / d / "README.md" for d in ("warehouse", "ingest", "queries")),
    *sorted((ROOT / "examples").glob("*/README.md")),
]
RUN = {
    ("whq", "runs"),
    ("whq", "sql"),
    ("whq", "ingest"),
    ("whq", "sites"),
    ("whq", "nag", "select"),
    ("whq", "export", "features"),
}
"""README.md's commands that the test runs; the others (whq demo: the full demo) are parsed only."""


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, text, first line number) of every fenced code block."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = re.match(r"\s*```(\w*)\s*$", lines[i])
        if opening:
            start, body = i + 1, []
            i += 1
            while not re.match(r"\s*```\s*$", lines[i]):
                body.append(lines[i])
                i += 1
            indent = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
            found.append((opening.group(1), "\n".join(b[indent:] for b in body), start + 1))
        i += 1
    return found


def shell_lines(text: str) -> list[tuple[int, list[str]]]:
    """(offset, words) of each logical line (continuations joined), split as the shell would, comments dropped."""
    found, offset = [], 0
    for line in re.split(r"(?<!\\)\n", text):
        words = shlex.split(line.replace("\\\n", " "), comments=True)
        if words:
            found.append((offset, words))
        offset += line.count("\n") + 1
    return found


def whq_invocations(path: Path) -> list[tuple[int, list[str]]]:
    """(line, whq arguments) of every `whq ...` and `python -m ingest ...` / `torchrun ... -m ingest ...` line."""
    found = []
    for language, text, line in blocks(path):
        if language not in ("bash", "sh", "shell"):
            continue
        for offset, words in shell_lines(text):
            for command in _commands(words):
                if command[:1] == ["whq"]:
                    found.append((line + offset, command[1:]))
                elif "-m" in command and command[command.index("-m") + 1 :][:1] == ["ingest"]:
                    found.append((line + offset, ["ingest", *command[command.index("-m") + 2 :]]))
    return found


def _commands(words: list[str]) -> list[list[str]]:
    """A line split at && / || / ; into commands; `[...]` marks optional parts, read as present."""
    commands, current = [], []
    for word in words:
        if word in ("&&", "||", ";", "|"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    return [[w.strip("[]") for w in c if w.strip("[]")] for c in commands if c]


def parse_whq(args: list[str]):
    """The command's words and its parsed parameters; raises the command line's own UsageError."""
    command, words, rest = docgen.cli_root(), ["whq"], list(args)
    while hasattr(command, "commands"):
        assert rest, f"`{' '.join(words)}` needs a subcommand"
        name = rest.pop(0)
        sub = command.get_command(None, name)
        assert sub is not None, f"`{' '.join(words)}` has no command {name!r}"
        command = sub
        words.append(name)
    context = command.make_context(words[-1], rest)
    return tuple(words), context.params


# ---------------------------------------------------------------- every whq line parses

INVOCATIONS = [
    pytest.param(args, id=f"{path.relative_to(ROOT)}:{line}:{' '.join(args[:2])}")
    for path in READMES
    for line, args in whq_invocations(path)
]


@pytest.mark.parametrize("args", INVOCATIONS)
def test_whq_line_parses(args):
    parse_whq(args)


def test_the_parser_refuses_what_the_cli_refuses():
    """The check above can fail: an unknown option, a missing argument, a bad number, an unknown command."""
    for bad in (["sql", "wh", "SELECT 1", "--nope"], ["ingest"], ["ingest", "wh", "--batch-size", "x"]):
        with pytest.raises(Exception, match="(?i)no such option|missing|valid integer"):
            parse_whq(bad)
    with pytest.raises(AssertionError, match="no command 'frobnicate'"):
        parse_whq(["nag", "frobnicate"])
    assert parse_whq(["sql", "wh", "SELECT 1", "--format", "csv"])[1]["fmt"] == "csv"


def test_every_readme_has_whq_lines_checked():
    assert len(INVOCATIONS) >= 30, "the README parser lost the whq lines"
    assert {tuple(a.values[0][:1]) for a in INVOCATIONS} >= {("sql",), ("ingest",), ("nag",), ("export",), ("bench",)}


# ---------------------------------------------------------------- README.md runs


@pytest.fixture(scope="session")
def readme_dir(tmp_path_factory) -> Path:
    """A folder holding `whq-demo` (the demo's run, sites and datasets over its first 40 speeches) and docs.jsonl."""
    from ingest.demo import DEMO_RUN, DEMO_SITES, DEMO_TEXT, speeches
    from ingest.pipeline import ingest

    folder = tmp_path_factory.mktemp("readme")
    ingest(
        folder / "whq-demo",
        "minilm",
        sites=DEMO_SITES,
        documents=speeches(DEMO_TEXT)[:40],
        run_id=DEMO_RUN,
        batch_size=16,
        max_length=64,
        device="cpu",
        progress=False,
    )
    write_jsonl(folder / "docs.jsonl")
    return folder


def test_readme_blocks_run(readme_dir, monkeypatch):
    monkeypatch.chdir(readme_dir)
    namespace: dict = {}
    ran = []
    for language, text, line in blocks(ROOT / "README.md"):
        where = f"README.md:{line}"
        if language == "python":
            exec(compile(text, where, "exec"), namespace)  # noqa: S102 - the README's own code
            ran.append("python")
        elif language in ("bash", "sh"):
            for offset, words in shell_lines(text):
                for command in _commands(words):
                    ran.append(_run_shell(command, f"README.md:{line + offset}"))
    assert ran.count("python") >= 1 and ran.count("whq") >= 8, ran
    assert "duckdb" in ran or not shutil.which("duckdb", path=str(Path(sys.executable).parent)), ran
    assert (readme_dir / "selected.parquet").exists() and (readme_dir / "features-demo").is_dir()


def _run_shell(command: list[str], where: str) -> str:
    if command[0] == "whq":
        words, _ = parse_whq(command[1:])
        if words not in RUN:
            return "parsed"
        code, out, err = run_whq(*command[1:])
        assert code == 0, f"{where}: `{shlex.join(command)}` exited {code}: {err}"
        assert out.strip(), f"{where}: `{shlex.join(command)}` printed nothing"
        return "whq"
    if command[0] == "duckdb":
        shell = shutil.which("duckdb") or shutil.which("duckdb", path=str(Path(sys.executable).parent))
        if shell is None:
            return "skipped"
        done = subprocess.run([shell, *command[1:]], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not done.stderr.strip(), f"{where}: {shlex.join(command)}: {done.stderr}"
        return "duckdb"
    if command[0] in ("pip", "ruff", "cog", "python"):
        return "setup"  # the two top commands: checked against .ci/run below
    raise AssertionError(f"{where}: README.md runs `{command[0]}`, which this test does not know how to check")


def test_macro_examples_on_the_demo_run(readme_dir):
    """Every COMMENT ON example that queries run 'demo' runs on the demo warehouse."""
    import warehouse

    wh = warehouse.open(readme_dir / "whq-demo")
    examples = [m.example for m in docgen.macros() if m.example and "('demo'" in m.example]
    assert len(examples) >= 10
    for example in examples:
        wh.sql(example).fetchall()


# ---------------------------------------------------------------- generated parts, links, the test command


def test_generated_parts_are_current(monkeypatch):
    """What `cog --check` runs in CI, here too, with a narrow terminal and another time zone."""
    from cogapp import Cog

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    status = Cog().main(["cog", "-I", str(ROOT), "--check", "--verbosity=0", *docgen.DOCS])
    assert status == 0, f"generated docs are stale: cog -I . -r {' '.join(docgen.DOCS)}"


def test_readme_test_command_is_what_ci_runs():
    """README's second command is .ci/run's steps, in .ci/run's order, each one run as a command there."""
    first = blocks(ROOT / "README.md")[0]
    lines = [line.split("#")[0].strip() for line in first[1].splitlines()]
    assert lines[0] == "pip install -e . && whq demo"
    install, *steps = (part.strip() for part in lines[1].split("&&"))
    ci = (ROOT / ".ci" / "run").read_text()
    assert install == "pip install -e '.[test]'" and "pip install -q -e '.[test]'" in ci
    assert "cog -I . --check " + " ".join(docgen.DOCS) in steps, "the README's cog check must name every generated file"
    assert steps[-1] == "python -m pytest"
    commands = [c.strip() for line in ci.splitlines() for c in re.split(r"&&|\|\|", line) if c.strip()]
    where = [commands.index(step) if step in commands else -1 for step in steps]
    assert -1 not in where, f".ci/run lacks {steps[where.index(-1)]!r}"
    assert where == sorted(where), ".ci/run runs the README's steps in another order"


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path):
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file) if file else path
        assert resolved.exists(), f"{path.relative_to(ROOT)}: link to missing {target}"
        if anchor:
            headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", resolved.read_text(), re.M)}
            assert anchor in headings, f"{path.relative_to(ROOT)}: no heading #{anchor} in {file or path.name}"


@pytest.mark.parametrize("path", READMES[1:], ids=lambda p: str(p.relative_to(ROOT)))
def test_room_blocks(path, readme_dir, monkeypatch):
    """Python blocks compile, and run when they open the demo warehouse; SQL statements on run 'demo' run."""
    import warehouse

    monkeypatch.chdir(readme_dir)
    wh = warehouse.open("whq-demo")
    for language, text, line in blocks(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        if language == "python":
            code = compile(text, where, "exec")
            if '"whq-demo"' in text:
                exec(code, {})  # noqa: S102 - the README's own code
        elif language == "sql":
            for statement in (s.strip() for s in text.split(";")):
                body = "\n".join(x for x in statement.splitlines() if not x.strip().startswith("--"))
                if "('demo'" in body:
                    wh.sql(body).fetchall()


def test_twin_table_runs(readme_dir):
    """queries/README.md's table of macro calls and their Polars twins: both sides run on the demo run."""
    import warehouse
    from queries import frames

    wh = warehouse.open(readme_dir / "whq-demo")
    rows = re.findall(
        r"^\| `(SELECT [^`]+)` \| `(frames\.[^`]+)` \|", (ROOT / "queries" / "README.md").read_text(), re.M
    )
    demo = [(sql, twin) for sql, twin in rows if "('demo'" in sql]
    assert len(demo) >= 8, "the twin table lost its rows"
    for sql, twin in demo:
        expected = wh.pl(sql)
        got = eval(twin, {"frames": frames, "wh": wh}).collect()  # noqa: S307 - the README's own call
        assert set(got.columns) == set(expected.columns), (sql, got.columns, expected.columns)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300, "deep material belongs in a room's README"

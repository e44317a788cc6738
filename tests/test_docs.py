"""The documents cannot drift from the code.

- README.md's shell and Python blocks run, in order, against a small demo warehouse
  (`whq demo` itself is only parsed: it builds the full demo, ~30 s).
- Every `whq` line in every document parses against the real command line: the command
  exists, every option exists, and the values have the right types.
- The generated parts (tests/docgen.py) are what cog writes now, whatever the terminal.
- Relative links point to files and headings that exist; README's test command is .ci/run's.
- Names in backticks that look like code name code that exists (see `code_name_problem`), and no
  document names a path of one machine.
- Every macro of every queries/*.sql file has a comment and a row in docs/macros.md; the --site help
  and the SPEC grammar in the documents come from ingest/sites.py.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
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
    *sorted((ROOT / "docs").glob("*.md")),
]
"""Every Markdown document: the README, the room guides, the examples' READMEs and the pages of docs/."""
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
    files = [str(path.relative_to(ROOT)) for path in docgen.doc_files()]
    assert "docs/macros.md" in files and "README.md" in files
    status = Cog().main(["cog", "-I", str(ROOT), "--check", "--verbosity=0", *files])
    assert status == 0, f"generated docs are stale: cog -I . -r {' '.join(docgen.DOCS)}"


def test_readme_test_command_is_what_ci_runs():
    """README's second command is .ci/run's steps, in .ci/run's order, each one run as a command there."""
    first = blocks(ROOT / "README.md")[0]
    lines = [line.split("#")[0].strip() for line in first[1].splitlines()]
    assert lines[0] == "pip install -e . && whq demo"
    install, *steps = (part.strip() for part in lines[1].split("&&"))
    ci = (ROOT / ".ci" / "run").read_text()
    assert install == "pip install -e '.[test]'" and "pip install -q --no-compile -e '.[test]'" in ci
    assert "cog -I . --check " + " ".join(docgen.DOCS) in steps, "the README's cog check must name every generated file"
    assert steps[-1] == "python -m pytest -n 2"
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


@pytest.mark.parametrize("path", READMES[1:4], ids=lambda p: str(p.relative_to(ROOT)))
def test_room_guides_are_guides(path):
    """A room README is a guide read in minutes; references and figures live in docs/."""
    assert len(path.read_text().splitlines()) <= 320, f"{path.relative_to(ROOT)}: move reference material to docs/"


# ---------------------------------------------------------------- macros and the SPEC grammar


def test_every_macro_is_documented(readme_dir):
    """Every macro the macro files create (parsed from the files, so a new file is covered) has a COMMENT ON
    in a real catalog and a row in docs/macros.md."""
    import warehouse

    names = docgen.macro_names()
    files = {m.file for m in docgen.macros()}
    assert len(names) >= 57 and {"units.sql", "dictionaries.sql", "00_common.sql"} <= files
    assert files == {f.name for f in (ROOT / "queries").glob("*.sql")}, "a macro file the catalog does not load"
    comments = dict(
        warehouse.open(readme_dir / "whq-demo")
        .sql("SELECT function_name, comment FROM duckdb_functions() WHERE function_type IN ('table_macro', 'macro')")
        .fetchall()
    )
    page = (ROOT / "docs" / "macros.md").read_text()
    for name in names:
        assert comments.get(name), f"macro {name} has no COMMENT ON MACRO"
        assert f"| `{name}(" in page, f"docs/macros.md lacks {name}: cog -I . -r docs/macros.md"


def test_macro_names_come_from_the_files(tmp_path, monkeypatch):
    """The parser finds every CREATE form, so a macro cannot hide from the check above."""
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "x.sql").write_text(
        "CREATE OR REPLACE MACRO a(x) AS x + 1;\nCREATE MACRO b(run) AS TABLE SELECT 1;\n"
        "create temp macro c() as 2;\nCOMMENT ON MACRO a IS 'one';\n"
    )
    monkeypatch.setattr(docgen, "macro_files", lambda: sorted((tmp_path / "queries").glob("*.sql")))
    found = docgen.macros()
    assert [m.name for m in found] == ["a", "b", "c"]
    assert [m.table for m in found] == [False, True, False] and found[0].comment == "one"


def test_site_help_and_grammar_come_from_sites():
    """One source for the SPEC grammar: the CLI's --site help is spec_help(), every reduction is described
    and named in the grammar, and no document carries a hand-written copy of it."""
    from ingest import sites

    ingest_command = dict((words, c) for words, c in docgen.cli_commands())[("whq", "ingest")]
    site = next(p for p in ingest_command.params if "--site" in p.opts)
    assert site.help == sites.spec_help()
    grammar = sites.spec_grammar()
    for name, (_, _, text) in sites.REDUCTIONS.items():
        table, _, what = text.partition(": ")
        assert table and what, f"reduction {name} needs 'table: what it keeps'"
        assert sites.reduction_syntax(name) in grammar and name in sites.spec_help()
    assert set(sites.ARGUMENT_NAMES) == {n for n, (kind, _, _) in sites.REDUCTIONS.items() if kind is not None}
    for path in READMES:
        outside = re.sub(r"\[\[\[cog.*?\[\[\[end\]\]\]", "", path.read_text(), flags=re.S)
        assert "REDUCTION  :=" not in outside, f"{path.relative_to(ROOT)}: a hand-written SPEC grammar; use cog"


# ---------------------------------------------------------------- names in backticks, machine paths

MACHINE_PATH = re.compile(r"""(?:^|(?<=[\s`'"(=]))/(?:work|home|Users|root|tmp|mnt|scratch|private|var/folders)/""")
"""Absolute paths of one machine: a document names relative paths, or the reader's own (~, $VAR)."""


@pytest.mark.parametrize("path", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_machine_paths(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        assert not MACHINE_PATH.search(line), f"{path.relative_to(ROOT)}:{number}: a machine's path: {line.strip()}"


@pytest.mark.parametrize("path", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_names_exist(path):
    problems = [f"`{span}`: {why}" for span in inline_code(path.read_text()) if (why := code_name_problem(span))]
    assert not problems, f"{path.relative_to(ROOT)} names code that does not exist:\n" + "\n".join(problems)


def test_the_name_check_can_fail():
    for stale in (
        "_parsed_sites",
        "pipeline._parsed_sites",
        "ingest.shard.NoSuchThing",
        "capture.Capture.no_such_method",
        "ingest/no_such_file.py",
        "tests/test_docs.py::test_no_such_test",
        "--no-such-flag",
        "nosuchmodule.py",
        "whq frobnicate",
        "tokens.no_such_column",
        "no_such_helper(x)",
    ):
        assert code_name_problem(stale), stale
    for real in (
        "pipeline.ingest",
        "ingest.capture.Capture",
        "Capture.batch",
        "IngestOptions.run_config(...)",
        "queries/nag.sql",
        "tests/test_docs.py::test_no_machine_paths",
        "--splice",
        "whq nag select",
        "tokens.token_id",
        "top_contexts",
        "mlp.act",
        "shard.journalled",
        "torch.topk",
        "frames.top_contexts(wh, 'demo')",
        "csv.py",
        "count_star()",
    ):
        assert code_name_problem(real) is None, (real, code_name_problem(real))
    assert inline_code("a `x` b ```\n`y`\n``` `` `z` `` c") == ["x"]


def inline_code(text: str) -> list[str]:
    """The inline code spans of Markdown text, outside fenced blocks and double-backtick spans."""
    text = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    text = re.sub(r"``.*?``", "", text, flags=re.S)
    return [span.strip() for span in re.findall(r"`([^`\n]+)`", text)]


DATA_SUFFIXES = {".json", ".jsonl", ".parquet", ".duckdb", ".safetensors", ".npz", ".yaml", ".txt", ".csv", ".gz"}
DATA_SUFFIXES |= {".html", ".png", ".bin", ".lock", ".damaged", ".tmp", ".wal", ".done", ".pt", ".svg"}
CODE_SUFFIXES = {".py", ".sql", ".c", ".md", ".toml"}
REPO_FOLDERS = ("warehouse/", "ingest/", "queries/", "tests/", "examples/", "docs/", ".ci/")


def code_name_problem(span: str) -> str | None:
    """Why a span naming code names nothing that exists, or None. The rule, by the span's shape:

    - `--flag`: an option of some whq command; `whq WORDS`: an existing command.
    - a path under a repository folder (`queries/nag.sql`, `tests/x.py::test_y`): the file (and the test) exists;
      a bare file name with a code suffix (`fused.c`): some file of the repository has that name.
    - a dotted name: a fault point, a table.column of schema.sql, or resolved through the project's modules and
      classes when its first part is one (`pipeline.ingest`, `ingest.shard.Capture`, `Capture.batch`); a first
      part the project does not define (a library, a site alias, a model's module) is not checked.
    - a bare name starting with `_` must be defined in the project's Python; a called snake_case name
      (`check_name(...)`) must be a project function, a macro, a DuckDB function or occur in a source file.
    Anything else (SQL, values, column names, option and key names, shell words, plain words) is not checked:
    columns are checked as `table.column`, options as `--flag`.
    """
    index = code_index()
    if span.startswith("--"):
        flag = re.match(r"--[\w-]+", span)
        return (
            None if not flag or flag.group(0) in index.flags else f"no command or script has the option {flag.group(0)}"
        )
    if re.fullmatch(r"whq( [a-z][\w-]*)+", span):
        words = span.split()[1:]
        group = docgen.cli_root()
        for word in words:
            if not hasattr(group, "commands"):
                return None
            group = group.get_command(None, word)
            if group is None:
                return f"whq has no command {word!r}"
        return None
    path = re.fullmatch(r"([\w.\-/]+?)(::(\w+))?", span)
    if path and "/" in span and span.startswith(REPO_FOLDERS):
        file = ROOT / path.group(1).rstrip("/")
        if not file.exists() and not _ignored(path.group(1)):
            return f"no file {path.group(1)} in the repository"
        if path.group(3) and not (file.is_file() and re.search(rf"def {path.group(3)}\b", file.read_text())):
            return f"{path.group(1)} has no {path.group(3)}"
        return None
    if re.fullmatch(r"[\w\-]+(\.[\w\-]+)+", span) and Path(span).suffix in CODE_SUFFIXES | DATA_SUFFIXES:
        stem = span.split(".")[0]
        if Path(span).suffix in CODE_SUFFIXES and span not in index.file_names and stem not in sys.stdlib_module_names:
            return f"no file named {span} in the repository"
        return None
    name = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\(.*\))?", span)
    if not name:
        return None
    dotted, called = name.group(1), bool(name.group(2))
    parts = dotted.split(".")
    if len(parts) > 1:
        return index.dotted_problem(parts)
    if dotted.startswith("_") and dotted not in index.defined:
        return f"nothing named {dotted} is defined in the project"
    if called and "_" in dotted and dotted.islower() and dotted not in index.callables:
        return f"no function, macro or DuckDB function named {dotted}, and no source file mentions it"
    return None


@dataclass
class CodeIndex:
    modules: dict[str, dict]  # dotted module name -> {top-level name: class members or None}
    defined: set[str]  # every def, class and assigned name of the project's Python
    classes: dict[str, set[str]]  # class name -> its members (methods, fields, properties)
    callables: set[str]  # defined names, macros, DuckDB's functions and every identifier in a source file
    file_names: set[str]
    flags: set[str]
    macros: set[str]
    tables: dict[str, set[str]]

    def dotted_problem(self, parts: list[str]) -> str | None:
        dotted = ".".join(parts)
        from warehouse.faults import POINTS

        if dotted in POINTS:
            return None
        if parts[0] in self.tables and len(parts) == 2:
            return None if parts[1] in self.tables[parts[0]] else f"table {parts[0]} has no column {parts[1]}"
        for length in range(len(parts), 0, -1):  # the longest module prefix: ingest.shard, or shard alone
            prefix = ".".join(parts[:length])
            modules = [m for m in self.modules if m == prefix or m.endswith("." + prefix)]
            if modules:
                rest = parts[length:]
                if not rest:
                    return None
                if any(self._member(self.modules[m], rest) for m in modules):
                    return None
                if any("__getattr__" in self.modules[m] and self._in_package(m, rest) for m in modules):
                    return None
                return f"{prefix} has no {'.'.join(rest)}"
        if parts[0] in self.classes:
            return None if parts[1] in self.classes[parts[0]] else f"class {parts[0]} has no {parts[1]}"
        return None

    def _in_package(self, module: str, rest: list[str]) -> bool:
        """A module with __getattr__ (queries.frames) answers for what its package's modules define."""
        package = module.rpartition(".")[0]
        return any(self._member(names, rest) for m, names in self.modules.items() if m.rpartition(".")[0] == package)

    def _member(self, names: dict, rest: list[str]) -> bool:
        if rest[0] not in names:
            return False
        members = names[rest[0]]
        return len(rest) == 1 or (members is not None and rest[1] in members)


def _python_names(tree) -> dict:
    import ast

    names: dict = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
            names[node.name] = members
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = None
        elif isinstance(node, ast.Assign):
            names.update({t.id: None for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = None
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: None for a in node.names})
    return names


def _ignored(path: str) -> bool:
    """A path git ignores: what a script or command writes (examples/bdh/out/), named but never committed."""
    if not shutil.which("git"):
        return False
    done = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path], capture_output=True)
    return done.returncode == 0


_INDEX: list = []


def code_index() -> CodeIndex:
    """What the project defines, read from its files once (AST, not imports: nothing heavy is loaded)."""
    if _INDEX:
        return _INDEX[0]
    import ast

    from warehouse.schema import tables

    modules, defined, classes, words, file_names, script_flags = {}, set(), {}, set(), set(), set()
    sources = [p for p in ROOT.rglob("*") if p.is_file() and not {".venv", ".git", "out"} & set(p.parts)]
    sources = [p for p in sources if p != Path(__file__)]  # this file names stale names on purpose
    for path in sources:
        file_names.add(path.name)
        if path.suffix in (".py", ".sql", ".c", ".toml", ".yaml", ".yml", ".h"):
            text = path.read_text(errors="replace")
            words |= set(re.findall(r"[A-Za-z_]\w*", text))
            if path.parts[len(ROOT.parts)] == "examples":  # the argparse options of the examples' scripts
                script_flags |= set(re.findall(r"""["'](--[\w-]+)""", text))
        if path.suffix == ".py":
            tree = ast.parse(path.read_text())
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[module] = _python_names(tree)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    defined.add(node.name)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    defined.add(node.id)
                elif isinstance(node, ast.arg):
                    defined.add(node.arg)
            for name, members in modules[module].items():
                if members is not None:
                    classes.setdefault(name, set()).update(members)
    flags = {o for _, command in docgen.cli_commands() for p in command.params for o in (*p.opts, *p.secondary_opts)}
    flags |= script_flags
    import duckdb

    duckdb_functions = {
        name for (name,) in duckdb.sql("SELECT DISTINCT function_name FROM duckdb_functions()").fetchall()
    }
    index = CodeIndex(
        modules=modules,
        defined=defined,
        classes=classes,
        callables=defined | words | duckdb_functions | set(docgen.macro_names()),
        file_names=file_names,
        flags={f for f in flags if f.startswith("--")},
        macros=set(docgen.macro_names()),
        tables={t.name: {c.name for c in t.columns} for t in tables().values()},
    )
    _INDEX.append(index)
    return index

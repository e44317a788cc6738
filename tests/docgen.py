"""The generated parts of the READMEs: CLI reference, macro lists, bad-input matrix.

cog runs these functions inside the Markdown files, between `[[[cog ...]]]` and
`[[[end]]]` markers. From the repository root:

    cog -I . -r README.md warehouse/README.md ingest/README.md queries/README.md       # regenerate
    cog -I . --check README.md warehouse/README.md ingest/README.md queries/README.md  # CI: fail when stale

Every function reads only source files (the click app, queries/*.sql, the CASES of
tests/test_bad_inputs.py), never a warehouse, the clock or the terminal width, so the
output is the same on every machine.
"""

from __future__ import annotations

import enum
import re
import typing
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "warehouse/README.md", "ingest/README.md", "queries/README.md"]
"""The Markdown files with generated blocks, as .ci/run checks them."""

MACRO_FILES = {
    "neurons.sql": "neurons",
    "nag.sql": "NAG",
    "scenarios.sql": "scenarios",
    "units.sql": "unit data",
    "00_common.sql": "checks",
}
TWINS = {
    "neurons.sql": "neuron_frames",
    "nag.sql": "nag_frames",
    "scenarios.sql": "scenario_frames",
    "units.sql": "unit_frames",
}


# ---------------------------------------------------------------- the CLI


def cli_root():
    """The click command behind `whq` (typer's app, converted)."""
    import typer.main

    from warehouse.cli import app

    return typer.main.get_command(app)


def cli_commands(group=None, prefix: tuple[str, ...] = ("whq",)):
    """(words, command) for every leaf command, e.g. (("whq", "nag", "select"), <command>), in the app's order."""
    group = group if group is not None else cli_root()
    for name in group.list_commands(None):
        command = group.get_command(None, name)
        if getattr(command, "hidden", False):
            continue
        if hasattr(command, "commands"):
            yield from cli_commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def _type_name(param) -> str:
    """A short metavar: PATH, INT, TEXT, or the choices of an Enum / Literal."""
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (list, tuple) and args:
            annotation = args[0]
        elif origin is typing.Union and args:
            annotation = next(a for a in args if a is not type(None))
        elif origin is typing.Annotated:
            annotation = args[0]
        else:
            break
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "|".join(str(member.value) for member in annotation)
    names = {Path: "PATH", int: "INT", float: "FLOAT", str: "TEXT"}
    return names.get(annotation, getattr(annotation, "__name__", "TEXT").upper())


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(param) -> str:
    if param.required or getattr(param, "is_flag", False):
        return ""
    default = param.default
    if default is None or default == [] or default == ():
        return ""
    if isinstance(default, enum.Enum):
        default = default.value
    return f"`{default}`"


def _metavar(argument) -> str:
    return argument.name.upper() + ("..." if argument.nargs == -1 else "")


def cli_reference() -> str:
    """Every `whq` command: its usage line, its first docstring line, and a table of its options."""
    out = []
    for words, command in cli_commands():
        arguments = [p for p in command.params if not p.opts[0].startswith("-")]
        options = [p for p in command.params if p.opts[0].startswith("-")]
        usage = " ".join([*words, *(_metavar(p) if p.required else f"[{_metavar(p)}]" for p in arguments)])
        summary = (command.help or "").strip().splitlines()[0]
        out.append(f"#### `{usage}`\n\n{summary}\n")
        rows = [
            f"| `{_metavar(p)}` | {_cell(_type_name(p))}{', one or more' if p.nargs == -1 else ''} | {_default(p)} "
            f"| {_cell(p.help or '')} |"
            for p in arguments
        ]
        for p in options:
            flag = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
            kind = "flag" if getattr(p, "is_flag", False) else _type_name(p)
            if p.multiple:
                kind += ", repeatable"
            if p.required:
                kind += ", required"
            rows.append(f"| {flag} | {_cell(kind)} | {_default(p)} | {_cell(p.help or '')} |")
        if rows:
            out.append("| argument / option | takes | default | what |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


# ---------------------------------------------------------------- the macros


@dataclass(frozen=True)
class Macro:
    name: str
    signature: str  # the parameter list as written in CREATE MACRO
    table: bool  # a table macro (SELECT * FROM m(...)) or a scalar one
    comment: str  # the COMMENT ON MACRO text
    file: str  # the queries/*.sql file

    @property
    def summary(self) -> str:
        """The comment without its `Example: ...` tail."""
        return self.comment.split(" Example: ")[0]

    @property
    def example(self) -> str | None:
        parts = self.comment.split(" Example: ", 1)
        return parts[1] if len(parts) == 2 else None


_CREATE = re.compile(r"CREATE OR REPLACE MACRO\s+(\w+)\s*\((.*?)\)\s+AS\s+(TABLE)?", re.S)
_COMMENT = re.compile(r"COMMENT ON MACRO\s+(?:TABLE\s+)?(\w+)\s+IS\s+'((?:[^']|'')*)'\s*;", re.S)


def macros() -> list[Macro]:
    """Every macro of queries/*.sql with its COMMENT ON text, in file order."""
    found = []
    for file in sorted((ROOT / "queries").glob("*.sql")):
        text = file.read_text()
        comments = {m.group(1): m.group(2).replace("''", "'") for m in _COMMENT.finditer(text)}
        for m in _CREATE.finditer(text):
            signature = " ".join(m.group(2).split())
            found.append(Macro(m.group(1), signature, bool(m.group(3)), comments.get(m.group(1), ""), file.name))
    return found


def macro_list(files: typing.Iterable[str] = ("neurons.sql", "nag.sql", "scenarios.sql")) -> str:
    """The user-facing table macros (not the whq_ building blocks): one line each, grouped by file."""
    lines = []
    for file in files:
        names = [m for m in macros() if m.file == file and m.table and not m.name.startswith("whq_")]
        lines.append(f"- **{MACRO_FILES[file]}** (`queries/{file}`): " + ", ".join(f"`{m.name}`" for m in names))
    return "\n".join(lines) + "\n"


def macro_reference(file: str) -> str:
    """A table of every macro of one file: call, what it returns, the example from its comment."""
    twins = TWINS.get(file)
    rows = ["| macro | what | example |", "|---|---|---|"]
    for m in (m for m in macros() if m.file == file):
        kind = "" if m.table else " (scalar)"
        example = f"`{m.example}`" if m.example else ""
        rows.append(f"| `{m.name}({_cell(m.signature)})`{kind} | {_cell(m.summary)} | {_cell(example)} |")
    note = (
        f"\nEach table macro without the `whq_` prefix has a Polars twin of the same name in `queries/{twins}.py`.\n"
        if twins
        else ""
    )
    return "\n".join(rows) + "\n" + note


# ---------------------------------------------------------------- the bad inputs


def bad_input_matrix() -> str:
    from tests.test_bad_inputs import matrix_markdown

    return matrix_markdown().rstrip("\n") + "\n"


# ---------------------------------------------------------------- the file tree

ROOM_FILES = ("*.py", "*.sql", "*.c")
OTHER = {
    "pyproject.toml": "the distribution `whq`, its console script and extras",
    "schema.sql": "the tables: columns, types, COMMENT ON each (the contract; warehouse/schema.sql links here)",
    ".ci/run": "CI: a fresh venv, the install, the docs check, the tests",
    "warehouse/fixtures/": "the demo text (the opening of Tiny Shakespeare, public domain)",
    "tests/": "pytest, CPU only; tests/docgen.py writes the generated parts of the READMEs",
}


def _first_sentence(text: str) -> str:
    """The first line of a docstring, or the first sentence of a leading comment block."""
    paragraph = []
    for line in text.strip().splitlines():
        line = line.strip().removeprefix("/*").removeprefix("*").removeprefix("--").strip()
        if not line:
            break
        paragraph.append(line)
    joined = " ".join(paragraph)
    return re.split(r"\.\s", joined, maxsplit=1)[0].rstrip(".")


def _job(path: Path) -> str:
    import ast

    text = path.read_text()
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
        return doc.strip().splitlines()[0].rstrip(".") if doc.strip() else ""
    return _first_sentence(text)


def file_tree() -> str:
    """The repository's rooms and each module's one job: its docstring's first line."""
    width = 26
    lines = []

    def add(name: str, job: str, indent: int = 0) -> None:
        label = " " * indent + name
        lines.append(f"{label:<{width}}{job}" if len(label) < width else f"{label} {job}")

    for name in ("pyproject.toml", "schema.sql"):
        add(name, OTHER[name])
    for room in ("warehouse", "ingest", "queries"):
        folder = ROOT / room
        add(f"{room}/", _job(folder / "__init__.py"))
        files = sorted(
            {
                p
                for pattern in ROOM_FILES
                for p in folder.glob(pattern)
                if p.name != "__init__.py" and not p.is_symlink()
            }
        )
        for path in files:
            add(path.name, _job(path), 2)
        for sub, job in OTHER.items():
            if sub.startswith(f"{room}/") and sub != f"{room}/":
                add(sub.removeprefix(f"{room}/"), job, 2)
    add("tests/", OTHER["tests/"])
    add("examples/", "worked examples, each with its README and figures")
    for readme in sorted((ROOT / "examples").glob("*/README.md")):
        title = readme.read_text().splitlines()[0].lstrip("# ").strip()
        add(f"{readme.parent.name}/", title, 2)
    add(".ci/run", OTHER[".ci/run"])
    return "```text\n" + "\n".join(lines) + "\n```\n"

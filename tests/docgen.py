"""The generated parts of the documents: CLI reference, SPEC grammar, macros, bad inputs, fault points.

cog runs these functions inside the Markdown files, between `[[[cog ...]]]` and
`[[[end]]]` markers. From the repository root:

    cog -I . -r README.md warehouse/README.md ingest/README.md queries/README.md docs/*.md       # regenerate
    cog -I . --check README.md warehouse/README.md ingest/README.md queries/README.md docs/*.md  # CI: fail when stale

Every function reads only source files (the click app, ingest/sites.py, queries/*.sql, the CASES of
tests/test_bad_inputs.py, the fault points and scenarios), never a warehouse, the clock or the
terminal width, so the output is the same on every machine.
"""

from __future__ import annotations

import enum
import re
import typing
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "warehouse/README.md", "ingest/README.md", "queries/README.md", "docs/*.md"]
"""The Markdown files with generated blocks, as .ci/run and the README's test command name them (the shell
expands docs/*.md, so a new page is checked without listing it)."""


def doc_files() -> list[Path]:
    """DOCS with docs/*.md expanded, as the shell does."""
    return [path for pattern in DOCS for path in sorted(ROOT.glob(pattern))]


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
        out.append(f"### `{usage}`\n\n{summary}\n")
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


_CREATE = re.compile(
    r"CREATE\s+(?:OR\s+REPLACE\s+)?(?:TEMP(?:ORARY)?\s+)?MACRO\s+(\w+)\s*\((.*?)\)\s+AS\s+(TABLE)?", re.S | re.I
)
_COMMENT = re.compile(r"COMMENT ON MACRO\s+(?:TABLE\s+)?(\w+)\s+IS\s+'((?:[^']|'')*)'\s*;", re.S)


def macro_files() -> list[Path]:
    """The macro files the catalog loads, in its order (warehouse.catalog decides which)."""
    from warehouse.catalog import macro_files as catalog_files

    return catalog_files()


def macros() -> list[Macro]:
    """Every macro of the catalog's macro files (queries/*.sql) with its COMMENT ON text, in file order."""
    found = []
    for file in macro_files():
        text = file.read_text()
        comments = {m.group(1): m.group(2).replace("''", "'") for m in _COMMENT.finditer(text)}
        for m in _CREATE.finditer(text):
            signature = " ".join(m.group(2).split())
            found.append(Macro(m.group(1), signature, bool(m.group(3)), comments.get(m.group(1), ""), file.name))
    return found


def macro_names(files: typing.Iterable[str] | None = None) -> list[str]:
    """The names of every macro the files create (all of queries/*.sql by default): what must be documented."""
    wanted = set(files) if files is not None else None
    return [m.name for m in macros() if wanted is None or m.file in wanted]


def sql_title(file: str) -> str:
    """A macro file's job: the first sentence of its leading comment."""
    return _first_sentence((ROOT / "queries" / file).read_text())


def twin_module(file: str) -> str | None:
    """The Polars twin module of a macro file: the queries/*.py whose docstring names it as its twin."""
    import ast

    for path in sorted((ROOT / "queries").glob("*.py")):
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").split("\n")[0]
        if "twin" in doc.lower() and f"queries/{file}" in doc:
            return f"queries/{path.name}"
    return None


def macro_list() -> str:
    """The user-facing table macros (not the whq_ building blocks): one line per macro file."""
    lines = []
    for file in (f.name for f in macro_files()):
        names = [m for m in macros() if m.file == file and m.table and not m.name.startswith("whq_")]
        if names:
            lines.append(f"- `queries/{file}`: " + ", ".join(f"`{m.name}`" for m in names))
    return "\n".join(lines) + "\n"


def macro_reference(file: str) -> str:
    """A table of every macro of one file: call, what it returns, the example from its comment."""
    twins = twin_module(file)
    rows = ["| macro | what | example |", "|---|---|---|"]
    for m in (m for m in macros() if m.file == file):
        kind = "" if m.table else " (scalar)"
        example = f"`{m.example}`" if m.example else ""
        rows.append(f"| `{m.name}({_cell(m.signature)})`{kind} | {_cell(m.summary)} | {_cell(example)} |")
    note = (
        f"\nEach table macro without the `whq_` prefix has a Polars twin of the same name in `{twins}`.\n"
        if twins
        else ""
    )
    return "\n".join(rows) + "\n" + note


def macro_pages() -> str:
    """Every macro file: a heading with its job, then its macro table."""
    out = []
    for file in (f.name for f in macro_files()):
        out.append(f"## `queries/{file}`\n\n{sql_title(file)}.\n\n{macro_reference(file)}")
    return "\n".join(out)


# ---------------------------------------------------------------- the SPEC grammar


def spec_grammar() -> str:
    """The SPEC grammar of ingest/sites.py, as a text block."""
    from ingest.sites import spec_grammar as grammar

    return "```text\n" + grammar() + "\n```\n"


def reductions_table() -> str:
    """Every reduction of ingest/sites.py: how it is written, its default, the table it fills, what it keeps."""
    from ingest.sites import REDUCTIONS, reduction_syntax

    rows = ["| reduction | default | fills | what |", "|---|---|---|---|"]
    for name, (kind, default, text) in REDUCTIONS.items():
        table, _, what = text.partition(": ")
        shown = "" if kind is None else f"{default:g}" if isinstance(default, float) else str(default)
        rows.append(f"| `{reduction_syntax(name)}` | {shown} | {table} | {_cell(what)} |")
    return "\n".join(rows) + "\n"


def dictionary_options_table() -> str:
    from ingest.sites import DICTIONARY_OPTIONS, ENCODE_DTYPES

    rows = ["| option | what |", "|---|---|"]
    for name, what in DICTIONARY_OPTIONS.items():
        written = name + "=" + "\\|".join(ENCODE_DTYPES) if name == "encode_dtype" else name
        rows.append(f"| `{written}` | {_cell(what)} |")
    return "\n".join(rows) + "\n"


def aliases_table() -> str:
    """Every site alias: the module and hook point it names in decoders (Llama, Qwen, Mistral) and encoders (BERT)."""
    from ingest.sites import DECODER_ALIASES, ENCODER_ALIASES, SOURCE_ALIASES

    def where(aliases, name):
        if name not in aliases:
            return "—"
        glob, hook = aliases[name]
        return f"`{glob}` {'input' if hook == 'in' else 'output'}"

    rows = ["| alias | decoders (Llama, Qwen, Mistral) | encoders (BERT, MiniLM) | also written |", "|---|---|---|---|"]
    for name in dict.fromkeys([*DECODER_ALIASES, *ENCODER_ALIASES]):
        also = ", ".join(f"`{a}`" for a, target in SOURCE_ALIASES.items() if target == name)
        rows.append(f"| `{name}` | {where(DECODER_ALIASES, name)} | {where(ENCODER_ALIASES, name)} | {also} |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------- the fault points


def fault_points() -> str:
    from warehouse.faults import POINTS

    rows = ["| point | where the process dies |", "|---|---|"]
    rows += [f"| `{point}` | {_cell(where)} |" for point, where in POINTS.items()]
    return "\n".join(rows) + "\n"


def fault_scenarios() -> str:
    from tests.test_faults import SCENARIOS

    rows = ["| # | killed at (`WHQ_FAULT`) | then the `--resume` killed at | state left behind |", "|---|---|---|---|"]
    for i, s in enumerate(SCENARIOS, 1):
        again = f"`{s.resume_kill}`" if s.resume_kill else ""
        rows.append(f"| {i} | `{s.kill}` | {again} | {_cell(s.what)} |")
    return "\n".join(rows) + "\n"


def disk_errors() -> str:
    from tests.test_faults import DISK_ERRORS

    names = {"enospc": "disk full", "eacces": "permission denied", "erofs": "read-only file system"}
    rows = ["| `WHQ_FAULT` | simulates | the one line |", "|---|---|---|"]
    for fault, message in DISK_ERRORS:
        line = f"error: cannot write <path>: {message}; free disk space or fix permissions, then rerun with --resume"
        rows.append(f"| `{fault}` | {names[fault.rsplit(':', 1)[-1]]} | `{line}` |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------- the pages of docs/


def docs_index() -> str:
    """One line per page of docs/: its title and its first sentence, so a new page is listed when cog runs."""
    lines = []
    for path in sorted((ROOT / "docs").glob("*.md")):
        if path.name == "README.md":
            continue
        text = path.read_text()
        title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("# ")), path.stem)
        paragraph = next(
            (
                p
                for p in re.split(r"\n\s*\n", text)
                if p.strip() and not p.lstrip().startswith(("#", "<!--", "|", "```"))
            ),
            "",
        )
        first = re.split(r"(?<=\.)\s", " ".join(paragraph.split()), maxsplit=1)[0]
        lines.append(f"- [{title}]({path.name}): {first}")
    return "\n".join(lines) + "\n"


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
    "tests/": "pytest, CPU only; tests/docgen.py writes the generated parts of the documents",
    "docs/": "reference pages (generated by cog from the code) and the measured figures of each room",
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
    add("docs/", OTHER["docs/"])
    add("tests/", OTHER["tests/"])
    add("examples/", "worked examples, each with its README and figures")
    for readme in sorted((ROOT / "examples").glob("*/README.md")):
        title = readme.read_text().splitlines()[0].lstrip("# ").strip()
        add(f"{readme.parent.name}/", title, 2)
    add(".ci/run", OTHER[".ci/run"])
    return "```text\n" + "\n".join(lines) + "\n```\n"


# ---------------------------------------------------------------- the tables


def tables_summary() -> str:
    """Every table of schema.sql: its partition keys and its COMMENT ON TABLE."""
    from warehouse.schema import tables

    rows = ["| table | partitioned by | what |", "|---|---|---|"]
    for table in tables().values():
        rows.append(f"| `{table.name}` | {', '.join(table.partitions)} | {_cell(table.comment or '')} |")
    return "\n".join(rows) + "\n"


def tables_reference() -> str:
    """Every table of schema.sql with every column: type and COMMENT ON COLUMN."""
    from warehouse.schema import tables

    out = []
    for table in tables().values():
        rows = ["| column | type | what |", "|---|---|---|"]
        rows += [f"| `{c.name}` | {_cell(c.type)} | {_cell(c.comment or '')} |" for c in table.columns]
        out.append(f"## `{table.name}`\n\n{table.comment or ''}\n\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


# ---------------------------------------------------------------- the ingest options


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the string right after its annotation)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def options_table() -> str:
    """Every field of IngestOptions: its default and its docstring (what `whq ingest` and `ingest()` take)."""
    from dataclasses import MISSING, fields

    from ingest.options import IngestOptions

    docs = field_docs(IngestOptions)
    rows = ["| field | default | what |", "|---|---|---|"]
    for f in fields(IngestOptions):
        default = (
            f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else ""
        )
        shown = ", ".join(map(str, default)) if isinstance(default, tuple) else default
        shown = f"`{shown}`" if shown not in ("", None, ()) else "" if shown is None or shown == "" else "`()`"
        rows.append(f"| `{f.name}` | {_cell(shown)} | {_cell(docs.get(f.name, ''))} |")
    return "\n".join(rows) + "\n"

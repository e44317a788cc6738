"""`whq` options declared once: aliases shared by several commands, and flags derived from a dataclass.

`dataclass_options(IngestOptions)` is how `whq ingest` gets its flags, as delphi's config.py
gets its command line from its dataclasses through simple_parsing: one flag per field, named
after it (`batch_size` -> `--batch-size`), with the field's default, the field's docstring as
its help and a `Literal` field's values as its choices. A field's metadata may say how it is
typed on the command line:

    sites: tuple[str, ...] = field(default=DEFAULT_SITES, metadata={"flags": ("--site", "-s")})
    rank: int = field(default=0, metadata={"flags": ()})   # not a flag (torchrun sets it)

so adding a field with its docstring is all it takes to add a flag.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from enum import StrEnum
from typing import Annotated

import typer

from ingest.options import IngestOptions


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class SqlEngine(StrEnum):
    duckdb = "duckdb"
    spark = "spark"


class FrameEngine(StrEnum):
    sql = "sql"
    polars = "polars"


WarehouseArg = Annotated[str, typer.Argument(help="Warehouse folder, or a URL (s3://bucket/prefix) to read in place.")]
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="How to print the rows: table, csv or json.")]
SqlEngineOption = Annotated[SqlEngine, typer.Option("--engine", help="duckdb, or spark to run the same SQL on Spark.")]
FrameEngineOption = Annotated[FrameEngine, typer.Option("--engine", help="sql (DuckDB) or polars.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")]
RunOption = Annotated[str, typer.Option("--run", help="Run id.")]


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring: the string literal under the field in the class body (as simple_parsing reads it)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _command_line_type(annotation):
    """What the command line parses a field's type as: a tuple of X is a repeatable option of X."""
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def _literal_parser(values: tuple, flag: str):
    """Accept one of a Literal's values; anything else is one line naming them (the options' own wording)."""

    def parse(text: str) -> str:
        if text not in values:
            from .errors import BadInput

            raise BadInput(f"unknown {flag} {text!r}: use one of {', '.join(values)}")
        return text

    return parse


def dataclass_options(cls) -> dict[str, inspect.Parameter]:
    """One typer option per field of the dataclass `cls` (see the module docstring), by field name, in field order.

    A field without help (no docstring and no metadata "help") is a TypeError: every flag is documented.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    options = {}
    for f in dataclasses.fields(cls):
        flags = tuple(f.metadata.get("flags", (_flag_name(f.name),)))
        if not flags:
            continue
        help_text = f.metadata.get("help") or docs.get(f.name)
        if not help_text:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: write a docstring under the field")
        annotation = _command_line_type(hints[f.name])
        extra = {}
        if typing.get_origin(annotation) is typing.Literal:
            extra["parser"] = _literal_parser(typing.get_args(annotation), flags[0])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        if typing.get_origin(annotation) is list:  # a repeatable flag takes one value at a time
            extra["metavar"] = f"<{typing.get_args(annotation)[0].__name__}>"
        option = typer.Option(*flags, help=help_text, **extra)
        options[f.name] = inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
        )
    return options


INGEST_OPTIONS = dataclass_options(IngestOptions)
"""`whq ingest`'s flags, one per IngestOptions field; `whq bench ingest` shares those it also takes."""
ModelOption = INGEST_OPTIONS["model"].annotation
SitesOption = INGEST_OPTIONS["sites"].annotation
DeviceOption = INGEST_OPTIONS["device"].annotation
DtypeOption = INGEST_OPTIONS["dtype"].annotation
BatchSizeOption = INGEST_OPTIONS["batch_size"].annotation
MaxDocsOption = INGEST_OPTIONS["max_docs"].annotation

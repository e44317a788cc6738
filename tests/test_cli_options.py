"""`whq ingest`'s flags are IngestOptions' fields (warehouse/cli_options.py): declared once, never again in the CLI."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field

import pytest
import typer.main

from ingest.options import IngestOptions
from warehouse.cli import app
from warehouse.cli_options import dataclass_options, field_docs
from warehouse.errors import BadInput


def _ingest_command():
    return typer.main.get_command(app).get_command(None, "ingest")


def test_every_ingest_option_is_a_flag_with_the_fields_default_and_docstring():
    params = {p.name: p for p in _ingest_command().params}
    docs = field_docs(IngestOptions)
    off_the_command_line = {f.name for f in dataclasses.fields(IngestOptions) if f.metadata.get("flags") == ()}
    assert off_the_command_line == {"rank", "world_size"}  # torchrun sets them
    for f in dataclasses.fields(IngestOptions):
        if f.name in off_the_command_line:
            assert f.name not in params
            continue
        flag = params[f.name]
        default = f.default
        assert flag.default == (list(default) if isinstance(default, tuple) else default), f.name
        assert flag.help == (f.metadata.get("help") or docs[f.name]), f.name
    assert params["sites"].opts == ["--site", "-s"] and params["batch_size"].opts == ["--batch-size", "-b"]
    assert params["progress"].opts == ["--progress"] and params["progress"].secondary_opts == ["--quiet", "-q"]
    assert params["shard_tokens"].help == "Tokens per committed shard: the unit of resume."
    # The other options of the command are not ingest options.
    assert set(params) - {f.name for f in dataclasses.fields(IngestOptions)} == {"root", "scenario", "ranks"}


def test_the_flags_parse_into_the_options_the_library_takes():
    context = _ingest_command().make_context(
        "ingest", ["wh", "-d", "a.jsonl", "-s", "mlp.act:topk=3", "-b", "4", "-q", "--dtype", "bfloat16"]
    )
    fields = {f.name for f in dataclasses.fields(IngestOptions)}
    options = IngestOptions(**{k: v for k, v in context.params.items() if k in fields})
    assert options == IngestOptions(
        data=("a.jsonl",), sites=("mlp.act:topk=3",), batch_size=4, progress=False, dtype="bfloat16"
    )


def test_a_literal_field_is_a_choice_refused_in_the_options_words():
    choices = _ingest_command().params
    dtype = next(p for p in choices if p.name == "dtype")
    assert typing.get_args(dtype.type_descriptor.annotation) == ("float32", "bfloat16", "float16")
    with pytest.raises(BadInput, match="unknown --dtype 'float64': use one of float32, bfloat16, float16"):
        _ingest_command().make_context("ingest", ["wh", "--dtype", "float64"])


def test_a_new_field_becomes_a_flag_and_a_field_without_help_is_refused():
    @dataclass(frozen=True)
    class Options:
        split: str = "train"
        """Which split of the dataset to read."""
        pack: bool = field(default=False, metadata={"flags": ("--pack", "-p")})
        """Pack documents into full windows."""
        mode: typing.Literal["a", "b"] = "a"
        """A choice."""

    flags = dataclass_options(Options)
    assert list(flags) == ["split", "pack", "mode"]

    def command(**given):
        return given

    command.__signature__ = inspect.Signature(list(flags.values()))
    command.__annotations__ = {p.name: p.annotation for p in flags.values()}
    one = typer.Typer()
    one.command()(command)
    params = {p.name: p for p in typer.main.get_command(one).params}
    assert params["split"].opts == ["--split"] and params["split"].default == "train"
    assert params["split"].help == "Which split of the dataset to read."
    assert params["pack"].opts == ["--pack", "-p"]
    assert typer.main.get_command(one).main(["--split", "test", "-p"], standalone_mode=False) == {
        "split": "test",
        "pack": True,
        "mode": "a",
    }

    @dataclass(frozen=True)
    class Undocumented:
        context_size: int = 64

    with pytest.raises(TypeError, match="Undocumented.context_size has no help"):
        dataclass_options(Undocumented)

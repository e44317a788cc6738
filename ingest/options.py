"""The options of one ingest: what `whq ingest` takes as flags, `ingest()` as an object, and a run stores.

    from ingest.options import IngestOptions
    options = IngestOptions("minilm", data=("docs.jsonl",), sites=("mlp.act:topk=20",), batch_size=32)

The stored run config (journal/config.json, then runs.config) is `run_config()`: these
fields plus what the capture resolved (model id, data identity, window length), so a
`--resume` with other options is refused field by field. No torch here: the CLI builds
and checks options before any model is loaded.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

from warehouse.errors import BadInput

from .sites import parse_specs, spec_help

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
# Devices are named, or cuda:N for one GPU of several.
Device = Literal["auto", "cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = get_args(Device)

DEFAULT_SITES = ("mlp.act:topk=20", "mlp.up:nag=20", "resid.out:last")
# How this process runs, not what the run holds: not stored with the run (runs.device records the device).
_NOT_STORED = ("run_id", "device", "progress", "rank")


def default_run_id(model: str) -> str:
    """`<model>-<UTC time>`, a valid run id whatever the model is called: the run id when none is given."""
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "-", Path(model.split(":")[0]).name or model).strip("-.") or "run"
    stem = re.sub(r"\.{2,}", ".", stem)  # '..' is not allowed in a run id (warehouse/names.py)
    return f"{stem[:40]}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"


def check_device(device: str) -> str:
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device):
        raise BadInput(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise BadInput(f"unknown --dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return dtype


@dataclass(frozen=True)
class IngestOptions:
    """One ingest's options. Each field is also a `whq ingest` flag (warehouse/cli_options.py): its name
    (`--batch-size`), default, docstring (the help) and Literal choices; in a field's metadata, `flags`
    names it otherwise (`flags=()` keeps it off the command line) and `help` replaces the docstring."""

    model: str = field(default="minilm", metadata={"flags": ("--model", "-m")})
    """Local model folder, cached hub id, `minilm`, `config:qwen3-tiny`, or adapter.py[:checkpoint]."""
    data: tuple[str, ...] = field(default=(), metadata={"flags": ("--data", "-d")})
    """Documents: .jsonl, .parquet or .txt files, hf:NAME[:CONFIG], a save_to_disk folder, or a folder or glob of
    .parquet/.jsonl/.txt shards (docs/datasets.md); none when `ingest()` is given documents."""
    sites: tuple[str, ...] = field(default=DEFAULT_SITES, metadata={"flags": ("--site", "-s"), "help": spec_help()})
    """SPECs, one per site (the grammar and every reduction: `whq ingest --help`, docs/sites.md)."""
    run_id: str | None = None
    """The run's id (default: `<model>-<UTC time>`, printed)."""
    dataset: str | None = None
    """Dataset label for documents that have none (default: the file stem)."""
    role: str | None = None
    """Role label for documents that have none: pool, target, reference, ..."""
    batch_size: int = field(default=16, metadata={"flags": ("--batch-size", "-b")})
    """Windows per forward pass."""
    max_length: int | None = None
    """Tokens per window (default: the model's own); longer documents are split, positions continue."""
    truncate: bool = False
    """Keep only each document's first window."""
    device: str = "auto"
    """Where the model runs: auto, cpu, cuda, cuda:N or mps."""
    dtype: Dtype = "float32"
    """The model's weights and activations."""
    resume: bool = False
    """Finish an interrupted run: the same options and run id."""
    shard_tokens: int = 65536
    """Tokens per committed shard: the unit of resume."""
    skip_bad: bool = False
    """Skip (and count) bad records instead of stopping at the first."""
    logit_lens: bool = False
    """Also store each MLP unit's output direction through the unembedding."""
    splice: bool = False
    """Dictionary sites of a causal LM: also measure next-token loss with each reconstruction spliced in
    (one extra forward per dictionary layer, plus one; not with encode_only)."""
    progress: bool = field(default=True, metadata={"flags": ("--progress/--quiet", " /-q")})
    """Show a progress bar on stderr."""
    rank: int = field(default=0, metadata={"flags": ()})
    """This process's rank under torchrun (0 alone; torchrun sets it)."""
    world_size: int = field(default=1, metadata={"flags": ()})
    """Processes sharing the documents (1 alone; torchrun sets it)."""
    # Dataset input (docs/datasets.md).
    split: str | None = None
    """Dataset split to read (default: train, or the dataset's only split)."""
    text_column: str | None = None
    """Dataset column holding the text (default: `text`, else a pre-tokenized input_ids/tokens column, used as is)."""
    id_column: str | None = None
    """Dataset column holding each document's id (default: `<dataset>:<row>`, the row's place in the stream)."""
    where: str | None = None
    """Keep only the dataset rows where this SQL boolean expression over its columns holds, e.g. "lang = 'en'"."""
    shuffle: int | None = None
    """Shuffle the dataset's rows with this seed (a buffer shuffle, as `datasets` streams do; default: in order)."""
    shuffle_buffer: int = 10_000
    """Rows in the --shuffle buffer."""
    streaming: bool = field(default=True, metadata={"flags": ("--streaming/--no-streaming",)})
    """Stream hf: datasets (--no-streaming: download and cache them whole first)."""
    max_docs: int | None = None
    """Keep the stream's first N documents, whichever ranks read them (docs/datasets.md#ranks)."""
    max_tokens: int | None = None
    """Keep exactly the stream's first N document tokens, whichever ranks read them (special tokens the model
    adds not counted); the last document is cut at its token boundary."""
    # Model inputs (docs/datasets.md#packing).
    context_size: int | None = None
    """Tokens per packed context (with --pack)."""
    pack: bool = False
    """Pack documents into contexts of --context-size tokens as SAELens does, instead of per-document windows."""
    prepend_bos: bool | None = field(default=None, metadata={"flags": ("--prepend-bos/--no-prepend-bos",)})
    """Begin each packed context with BOS (default: as the SAELens dictionary's cfg.json says, else yes)."""
    separator: str = "bos"
    """Token between packed documents: bos, eos, sep, none or a token id (SAELens's sequence_separator_token)."""
    keep_partial: bool = False
    """Keep the last, partial packed context (shorter) instead of dropping it."""
    exclude_special: bool = False
    """Leave BOS/EOS/pad and the tokenizer's other special tokens out of statistics, examples and tables
    (SAELens's exclude_special_tokens); the model still sees them."""

    def __post_init__(self) -> None:
        # Lists are accepted and kept as tuples, so options compare and hash by value.
        object.__setattr__(self, "data", tuple(str(d) for d in self.data))
        object.__setattr__(self, "sites", tuple(self.sites))
        check_device(self.device)
        check_dtype(self.dtype)
        if self.batch_size < 1:
            raise BadInput("--batch-size must be at least 1")
        if self.shard_tokens < 1:
            raise BadInput("--shard-tokens must be at least 1")
        if self.max_length is not None and self.max_length < 1:
            raise BadInput(f"--max-length {self.max_length} must be at least 1 (omit it for the model's own window)")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise BadInput(
                f"rank {self.rank} of world size {self.world_size} is out of range: the rank must be 0..world size - 1 "
                f"(torchrun sets RANK and WORLD_SIZE; use --ranks N on one machine)"
            )
        parse_specs(self.sites)  # a malformed SPEC is refused before any data file is read
        from .inputs import check_options

        check_options(self)

    def run_config(self, *, model_id: str, sites: list[str], data_identity: object, max_length: int) -> dict:
        """The config stored with the run: the options that decide its rows, resolved: the model's id,
        the SPECs as parsed, the data files' identity (path, size and sha256 of each, or a digest of
        given documents) and the window length."""
        stored = {k: v for k, v in asdict(self).items() if k not in _NOT_STORED}
        stored.update(model_id=model_id, sites=sites, data=data_identity, max_length=max_length)
        return stored

    @classmethod
    def from_run_config(cls, config: dict, *, data: tuple[str, ...] = (), **process) -> IngestOptions:
        """The options a stored run config was written from; `data` and `process` (run_id, device,
        progress, rank) are not stored, so they are given again."""
        stored = {f.name for f in fields(cls)} - set(_NOT_STORED) - {"data"}
        return cls(**{k: v for k, v in config.items() if k in stored}, data=data, **process)

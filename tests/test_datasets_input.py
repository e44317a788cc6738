"""Dataset sources (ingest/dataset_sources.py, ingest/where.py): a small dataset the tests write with
`datasets` (save_to_disk, Parquet and JSONL shards, a local Hub-style repository) read in every mode,
against plain Python over the same rows. Nothing touches the network (HF_DATASETS_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

datasets = pytest.importorskip("datasets")

from ingest import contexts, inputs  # noqa: E402
from ingest.contexts import Segment  # noqa: E402
from ingest.options import IngestOptions  # noqa: E402
from ingest.sources import SkipCounter  # noqa: E402
from warehouse.errors import BadInput  # noqa: E402

N = 40
ROWS = [
    {
        "text": f"Row {i}: " + " ".join(f"w{(i * 7 + j) % 13}" for j in range(i % 9)),
        "uid": f"u{i}",
        "lang": "en" if i % 3 else "fr",
        "score": i * 0.5,
    }
    for i in range(N)
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{kind: --data value} over the same ROWS (the DatasetDict one has a test split too)."""
    base = tmp_path_factory.mktemp("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(base / "disk"), num_shards=4)  # four Arrow files
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(base / "dict"))
    (base / "parquet").mkdir()
    (base / "jsonl").mkdir()
    for k in range(4):  # contiguous shards: their sorted names hold the rows in order
        part = ds.shard(4, k, contiguous=True)
        part.to_parquet(str(base / "parquet" / f"part-{k}.parquet"))
        with open(base / "jsonl" / f"part-{k}.jsonl", "w") as fh:
            for row in part:
                fh.write(json.dumps(row) + "\n")
    (base / "repo" / "data").mkdir(parents=True)
    ds.to_parquet(str(base / "repo" / "data" / "train.parquet"))
    (base / "sharded-repo" / "data").mkdir(parents=True)
    for k in range(4):
        ds.shard(4, k, contiguous=True).to_parquet(
            str(base / "sharded-repo" / "data" / f"train-{k:05d}-of-00004.parquet")
        )
    return {
        "disk": str(base / "disk"),
        "dict": str(base / "dict"),
        "parquet-folder": str(base / "parquet"),
        "parquet-glob": str(base / "parquet" / "*.parquet"),
        "jsonl-glob": str(base / "jsonl" / "part-*.jsonl"),
        "hub-folder": "hf:" + str(base / "repo"),
        "hub-folder-stored": "hf:" + str(base / "repo"),
        "hub-shards": "hf:" + str(base / "sharded-repo"),
    }


def _docs(data: str, **options) -> list:
    source = inputs.open_input(IngestOptions(data=(data,), **options))
    return list(source.documents(SkipCounter(), None, None))


@pytest.mark.parametrize("kind", ["disk", "dict", "parquet-folder", "parquet-glob", "jsonl-glob", "hub-folder"])
def test_every_source_reads_the_rows_in_order(sources, kind):
    docs = _docs(sources[kind], id_column="uid")
    assert [d.text for d in docs] == [r["text"] for r in ROWS]
    assert [d.doc_id for d in docs] == [r["uid"] for r in ROWS]
    assert [d.meta["lang"] for d in docs] == [r["lang"] for r in ROWS]


def test_not_streamed_reads_the_same(sources):
    assert [d.text for d in _docs(sources["hub-folder-stored"], streaming=False)] == [r["text"] for r in ROWS]


def test_default_id_is_the_row_in_the_stream(sources):
    docs = _docs(sources["disk"], where="lang = 'fr'")
    assert [d.doc_id for d in docs] == [f"disk:{i}" for i in range(N) if i % 3 == 0]


def test_split(sources):
    assert [d.text for d in _docs(sources["dict"], split="test")] == [r["text"] for r in ROWS[:5]]
    with pytest.raises(BadInput, match="has no split 'validation': use --split with one of train, test"):
        _docs(sources["dict"], split="validation")
    with pytest.raises(BadInput, match="drop --split"):
        _docs(sources["parquet-glob"], split="test")


@pytest.mark.parametrize(
    ("where", "keep"),
    [
        ("lang = 'en' AND score >= 5", lambda r: r["lang"] == "en" and r["score"] >= 5),
        (
            "length(text) BETWEEN 10 AND 20 OR uid IN ('u1', 'u2')",
            lambda r: 10 <= len(r["text"]) <= 20 or r["uid"] in ("u1", "u2"),
        ),
        ("NOT (text LIKE '%w3%') AND lower(lang) <> 'fr'", lambda r: "w3" not in r["text"] and r["lang"] != "fr"),
    ],
)
def test_where_equals_python(sources, where, keep):
    for kind in ("disk", "jsonl-glob"):
        assert [d.text for d in _docs(sources[kind], where=where)] == [r["text"] for r in ROWS if keep(r)]


@pytest.mark.parametrize(
    ("where", "fix"),
    [
        ("(SELECT 1) = 1", "is not allowed"),
        ("read_csv('/etc/passwd') IS NULL", "is not allowed"),
        ("lang = 'en'; DROP TABLE x", "is not allowed"),
        ("nope = 1", "not a column of"),
        ("t.lang = 'en'", "not a column of"),
        ("lang = ", "is not a SQL expression"),
        ("getenv('HOME') = 'x'", "is not allowed"),
    ],
)
def test_bad_where_is_one_line(sources, where, fix):
    with pytest.raises(BadInput, match=fix) as raised:
        _docs(sources["disk"], where=where)
    assert "\n" not in str(raised.value)


def test_unknown_columns_and_missing_sources(sources, tmp_path):
    with pytest.raises(BadInput, match="--text-column 'body' is not a column of .*: use one of text, uid, lang, score"):
        _docs(sources["disk"], text_column="body")
    with pytest.raises(BadInput, match="--id-column 'key' is not a column"):
        _docs(sources["disk"], id_column="key")
    with pytest.raises(BadInput, match="matches no file"):
        _docs(str(tmp_path / "none-*.parquet"))
    with pytest.raises(BadInput, match="no save_to_disk dataset and no .parquet/.jsonl/.txt shards"):
        _docs(str(tmp_path))
    with pytest.raises(BadInput, match="HF_DATASETS_OFFLINE"):
        _docs("hf:whq-tests/not-a-dataset-anywhere")


def test_shuffle_is_a_seeded_permutation(sources):
    texts = [r["text"] for r in ROWS]
    once = [d.text for d in _docs(sources["disk"], shuffle=7, shuffle_buffer=8)]
    assert once == [d.text for d in _docs(sources["disk"], shuffle=7, shuffle_buffer=8)]
    assert sorted(once) == sorted(texts) and once != texts
    assert once != [d.text for d in _docs(sources["disk"], shuffle=8, shuffle_buffer=8)]


def test_pretokenized_column_is_used_as_is(tmp_path):
    rows = [{"input_ids": [5, 6, 7 + i], "note": str(i)} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "tok"))
    docs = _docs(str(tmp_path / "tok"))
    assert [d.token_ids for d in docs] == [r["input_ids"] for r in rows]
    datasets.Dataset.from_list([{"input_ids": [1, -2]}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(BadInput, match="row 0: column 'input_ids' must be a list of token ids"):
        _docs(str(tmp_path / "bad"))
    counter = SkipCounter(skip_bad=True)
    source = inputs.open_input(IngestOptions(data=(str(tmp_path / "bad"),), skip_bad=True))
    assert list(source.documents(counter, None, None)) == [] and counter.skipped == 1


def test_plain_file_with_a_dataset_option_goes_through_datasets(sources, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert [d.text for d in _docs(str(path), where="score < 3")] == [r["text"] for r in ROWS if r["score"] < 3]


def test_fingerprint_follows_split_filter_seed_and_content(sources, tmp_path):
    def fingerprint(data, **options):
        return inputs.open_input(IngestOptions(data=(data,), **options)).identity[0]["fingerprint"]

    base = fingerprint(sources["dict"])
    assert base == fingerprint(sources["dict"])  # stable
    changed = [
        fingerprint(sources["dict"], split="test"),
        fingerprint(sources["dict"], where="lang = 'en'"),
        fingerprint(sources["dict"], shuffle=1),
        fingerprint(sources["dict"], shuffle=2),
        fingerprint(sources["dict"], text_column="uid"),
    ]
    assert len({base, *changed}) == 1 + len(changed)
    shard = tmp_path / "shards"
    shard.mkdir()
    (shard / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    before = fingerprint(str(shard))
    (shard / "a.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    assert fingerprint(str(shard)) != before


class _Ids:
    """A tokenizer for the stream tests: one token per word, ids from a shared table."""

    special_ids = frozenset({0})
    n_special = 0
    bos_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text):
        ids, offsets, at = [], [], 0
        for word in text.split(" "):
            ids.append(self.vocab.setdefault(word, len(self.vocab) + 1))
            offsets.append((at, at + len(word)))
            at += len(word) + 1
        return ids, offsets

    def wrap(self, ids):
        return list(ids), [False] * len(ids)


def _docs_stream(data):
    return inputs.open_input(IngestOptions(data=(data,))).documents(SkipCounter(), None, None)


SHARD_ROWS = N // 4  # the fixture's shards (Parquet, JSONL, the save_to_disk Arrow files) hold ROWS in order
SHARD_FILES = {
    "parquet-glob": "part-{}.parquet",
    "jsonl-glob": "part-{}.jsonl",
    "disk": "data-{:05d}-of-00004.arrow",
    "hub-shards": "train-{:05d}-of-00004.parquet",
}


def _own_rows(rank: int, world_size: int, shards: int = 4) -> set[str]:
    """The rows of the first `shards` shards that a rank owns: every world_size-th shard from its own."""
    return {f"u{i}" for i in range(N) if (i // SHARD_ROWS) % world_size == rank and i // SHARD_ROWS < shards}


def _shard_files(kind: str, shards) -> set[str]:
    return {SHARD_FILES[kind].format(k) for k in shards}


_recording: dict | None = None  # what the simulated rank now running reads


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _recording is not None and isinstance(args[0], str):
        _recording["files"].add(os.path.basename(args[0]))


sys.addaudithook(_audit)  # audit hooks stay for the process: this one records only inside _reading


class _reading:
    """Records, into `seen`, the files opened (Python's audit events) and the rows `datasets` hands over (its
    Arrow formatter, by their uid) while a simulated rank reads."""

    def __init__(self, seen: dict):
        self.seen = seen

    def __enter__(self):
        global _recording
        from datasets.formatting import formatting

        self.original = original = formatting.ArrowFormatter.format_batch
        rows = self.seen["rows"]

        def format_batch(formatter, table):
            rows.update(table.column("uid").to_pylist())
            return original(formatter, table)

        formatting.ArrowFormatter.format_batch = format_batch
        _recording = self.seen
        return self

    def __exit__(self, *exc):
        global _recording
        from datasets.formatting import formatting

        formatting.ArrowFormatter.format_batch = self.original
        _recording = None


class _Exchanged(Exception):
    """Ends a simulated rank's first pass at the exchange of counts."""


def _ranks(data: str, world_size: int, plan, start: int = 0, **options) -> list[dict]:
    """Each rank's documents [(ordinal, doc_id, text)], and the rows `datasets` handed it and the files it
    opened while it counted its pieces ("counting") and while it read them ("reading"), as the ranks of one
    ingest read (Input.segments): each counts its own pieces, the counts are exchanged (here by the test, as
    ranks.share does over the process group), then each reads its own from ordinal `start` on (a --resume);
    "error": the one line a rank refused its input with. A dataset is opened before the recording starts
    (opening one reads its schema)."""
    opened = [inputs.open_input(IngestOptions(data=(data,), **options)) for _ in range(world_size)]
    seen = [{phase: {"rows": set(), "files": set()} for phase in ("counting", "reading")} for _ in range(world_size)]
    counts: list = [None] * world_size

    def segments(rank: int, share):
        return opened[rank].segments(
            SkipCounter(), None, None, plan=plan, tokenizer=_Ids(), rank=rank, world_size=world_size, share=share
        )

    for rank in range(world_size):

        def exchange(work, rank=rank):
            counts[rank] = work()
            raise _Exchanged

        with _reading(seen[rank]["counting"]):
            try:
                segments(rank, exchange)
            except _Exchanged:
                pass
    for rank in range(world_size):
        exchanges = seen[rank]["exchanges"] = []

        def share(work, exchanges=exchanges):
            """The counts; then (a bad row) every rank's work, this one's run here."""
            exchanges.append(work)
            return counts if len(exchanges) == 1 else [work()] * world_size

        with _reading(seen[rank]["reading"]):
            try:
                found, own_pieces = segments(rank, share)
            except BadInput as err:
                seen[rank]["error"] = str(err)
                continue
            deal = {} if own_pieces else dict(rank=rank, world_size=world_size)
            shards = contexts.shards(found, _Ids(), plan, start=start, shard_tokens=16, **deal)
            seen[rank]["docs"] = [(ordinal, doc.doc_id, doc.text) for shard in shards for ordinal, doc, _ in shard.docs]
            seen[rank]["own_pieces"] = own_pieces
    return seen


def _whole(data: str, plan, **options) -> list:
    """The one-process run's documents."""
    stream = inputs.open_input(IngestOptions(data=(data,), **options)).documents(SkipCounter(), None, None)
    found = contexts.shards([Segment(stream)], _Ids(), plan, start=0, shard_tokens=16)
    return [(ordinal, doc.doc_id, doc.text) for shard in found for ordinal, doc, _ in shard.docs]


@pytest.mark.parametrize("kind", ["parquet-glob", "jsonl-glob", "disk", "hub-shards"])
@pytest.mark.parametrize("where", [None, "lang = 'en'"])
@pytest.mark.parametrize("pack", [False, True])
def test_ranks_read_disjoint_shards_whose_union_is_the_whole(sources, kind, where, pack):
    """Each of 2 ranks opens and decodes only its own shards, and together their documents are the one-process
    run's: the same ordinals, ids (rows numbered across shards) and texts."""
    plan = contexts.ContextPlan(max_length=8, context_size=8 if pack else None, bos_id=0, keep_partial=True)
    ranks = _ranks(sources[kind], 2, plan, where=where)
    for rank, seen in enumerate(ranks):
        reading, counting = seen["reading"], seen["counting"]
        assert seen["own_pieces"] and reading["rows"] == _own_rows(rank, 2)
        if kind != "disk":  # a save_to_disk dataset is memory-mapped when opened: its rows tell
            assert reading["files"] & _shard_files(kind, range(4)) == _shard_files(kind, (rank, rank + 2))
        # Counting: a Parquet shard's footer or an Arrow file's length is its rows, unless --where drops some;
        # a Hub stream's shards are counted by reading them.
        counted_without_rows = kind in ("parquet-glob", "disk") and where is None
        assert counting["rows"] == (set() if counted_without_rows else _own_rows(rank, 2))
        assert counting["files"] & _shard_files(kind, range(4)) <= _shard_files(kind, (rank, rank + 2))
    parts = [seen["docs"] for seen in ranks]
    assert all(parts) and not set(parts[0]) & set(parts[1])
    whole = _whole(sources[kind], plan, where=where)
    assert sorted(parts[0] + parts[1]) == whole
    kept = [i for i, r in enumerate(ROWS) if where is None or r["lang"] == "en"]
    assert [text for _, _, text in whole] == [ROWS[i]["text"] for i in kept]
    label = {"parquet-glob": "parquet", "jsonl-glob": "jsonl", "disk": "disk", "hub-shards": "sharded-repo"}[kind]
    assert [doc_id for _, doc_id, _ in whole] == [f"{label}:{i}" for i in kept]


@pytest.mark.parametrize("kind", ["parquet-glob", "jsonl-glob"])
@pytest.mark.parametrize("limit", [dict(max_docs=4), dict(max_docs=23), dict(max_tokens=9), dict(max_tokens=170)])
def test_max_docs_and_max_tokens_are_the_stream_s_first_across_ranks(sources, kind, limit):
    """--max-docs and --max-tokens keep the one-process run's documents (the last one cut at the same token)
    when each rank reads its own shards; no rank reads a shard past them."""
    plan = contexts.ContextPlan(max_length=8, **limit)
    ranks = _ranks(sources[kind], 2, plan)
    whole = _whole(sources[kind], plan)
    assert sorted(ranks[0]["docs"] + ranks[1]["docs"]) == whole and len(whole) < N
    shards = int(whole[-1][1].split(":")[1]) // SHARD_ROWS + 1  # the shards holding a kept document
    for rank, seen in enumerate(ranks):
        reading, counting = seen["reading"], seen["counting"]
        assert reading["files"] & _shard_files(kind, range(4)) <= _shard_files(kind, range(rank, shards, 2))
        assert {f"u{doc_id.split(':')[1]}" for _, doc_id, _ in seen["docs"]} <= reading["rows"]
        assert reading["rows"] <= _own_rows(rank, 2, shards) and counting["rows"] <= _own_rows(rank, 2)


def test_a_parquet_shard_of_no_rows_gives_no_documents_whole_or_on_ranks(tmp_path):
    """A shard written with no rows (one row group of 0 rows, as an empty partition's writer leaves it): the
    Parquet reader's default batch, its first row group's rows, was 0, which pyarrow refused with a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "shards"
    folder.mkdir()
    rows = [{"uid": f"u{i}", "text": f"row {i} says {'la ' * i}"} for i in range(7)]
    for k, part in enumerate([rows[:3], [], rows[3:]]):
        pq.write_table(
            pa.Table.from_pylist(part, schema=pa.schema([("uid", pa.string()), ("text", pa.string())])),
            folder / f"p{k}.parquet",
        )
    assert pq.ParquetFile(folder / "p1.parquet").metadata.num_row_groups == 1
    assert [d.text for d in _docs(str(folder))] == [r["text"] for r in rows]
    # The same shards as a dataset repository (hf:FOLDER), which `datasets` reads with its Parquet builder.
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for k in range(3):
        shutil.copyfile(folder / f"p{k}.parquet", repo / "data" / f"train-{k:05d}-of-00003.parquet")
    assert [d.text for d in _docs(f"hf:{repo}")] == [r["text"] for r in rows]
    plan = contexts.ContextPlan(max_length=8)
    ranks = _ranks(str(folder), 2, plan)
    assert sorted(ranks[0]["docs"] + ranks[1]["docs"]) == _whole(str(folder), plan)


def test_a_shard_the_reader_cannot_decode_is_one_line_whole_or_on_ranks(tmp_path):
    """A JSONL shard with a line that is not JSON: the reader's ArrowInvalid had come through as a traceback."""
    folder = tmp_path / "shards"
    folder.mkdir()
    good = [json.dumps({"uid": f"u{i}", "text": f"row {i}"}) for i in range(6)]
    (folder / "p0.jsonl").write_text("\n".join(good[:3]) + "\n")
    (folder / "p1.jsonl").write_text("\n".join([good[3], '{"uid": "u9", "text": "cut', *good[4:]]) + "\n")
    fix = f"--data {folder} is not readable (JSON parse error"
    named = f"): fix or remove the shard {folder / 'p1.jsonl'}"
    with pytest.raises(BadInput, match=re.escape(fix)) as refused:
        _docs(str(folder))
    assert str(refused.value).endswith(named)
    ranks = _ranks(str(folder), 2, contexts.ContextPlan(max_length=8))
    assert ranks[1]["error"].startswith(fix) and ranks[1]["error"].endswith(named)


def test_a_damaged_parquet_shard_is_one_line_on_stderr_naming_it(tmp_path):
    """`datasets` logs the failing file on stderr before raising: the ingest's error was a second line."""
    folder = tmp_path / "shards"
    folder.mkdir()
    datasets.Dataset.from_list(ROWS[:4]).to_parquet(str(folder / "a.parquet"))
    (folder / "b.parquet").write_bytes((folder / "a.parquet").read_bytes()[:100])
    command = ["ingest", str(tmp_path / "wh"), "--model", "config:qwen3-tiny", "--data", str(folder), "-q"]
    # A child process: the library's log handler writes to the real stderr, which pytest's capture would miss.
    result = subprocess.run([sys.executable, "-m", "warehouse.cli", *command], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --data {folder} is not readable (")
    assert lines[0].endswith(f"fix or remove the shard {folder / 'b.parquet'}")
    assert not list((tmp_path / "wh" / "runs").glob("*.json"))


@pytest.mark.parametrize("hub", [False, True])
def test_text_that_is_not_utf8_or_a_first_shard_not_json_is_one_line_naming_the_shard(tmp_path, hub):
    """Bytes that are not UTF-8 (a JSONL line, a Parquet string, a text paragraph) had passed the readers and
    failed as a traceback when the rows became documents; so had a first shard whose first line is not JSON
    (read for its column names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [json.dumps({"uid": f"u{i}", "text": f"row {i}"}) for i in range(4)]
    cases = {
        "b.jsonl": ("\n".join(good) + "\n").encode() + b'{"uid": "u9", "text": "caf\xe9"}\n',
        "b.txt": b"a paragraph\n\ncaf\xe9\n",
        "a.jsonl": b'{"uid": "u9", "text"\n' + ("\n".join(good) + "\n").encode(),
    }
    for name, data in [*cases.items(), ("b.parquet", None)]:
        folder = tmp_path / name / "shards"
        folder.mkdir(parents=True)
        if data is None:
            datasets.Dataset.from_list(ROWS[:4]).to_parquet(str(folder / "a.parquet"))
            text = pa.array([b"ok", b"caf\xe9"], pa.binary()).view(pa.string())
            pq.write_table(pa.table({"uid": ["u8", "u9"], "text": text}), str(folder / name))
        else:
            first = "b.jsonl" if name == "a.jsonl" else "a" + name[1:]
            (folder / first).write_text(good[0] + "\n" if first.endswith(".jsonl") else "first\n")
            (folder / name).write_bytes(data)
        data_arg = f"hf:{folder}" if hub else str(folder)
        with pytest.raises(BadInput, match=re.escape(f"--data {data_arg} is not readable (")) as refused:
            _docs(data_arg)
        assert str(refused.value).endswith(f"): fix or remove the shard {folder / name}"), refused.value
        assert "\n" not in str(refused.value)


def test_a_repository_folder_of_mixed_shard_types_is_refused_not_read_in_part(tmp_path):
    """hf:FOLDER of Parquet and JSONL files: `datasets` read the Parquet half alone, without a word."""
    repo = tmp_path / "repo"
    repo.mkdir()
    datasets.Dataset.from_list(ROWS[:3]).to_parquet(str(repo / "a.parquet"))
    (repo / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[3:]))
    (repo / "NOTES.txt").write_text("where the rows come from\n")  # a note, not a shard: no refusal of its own
    with pytest.raises(BadInput, match=re.escape(f"--data hf:{repo} mixes shard types")) as refused:
        _docs(f"hf:{repo}")
    assert str(repo / "b.jsonl") in str(refused.value) and "1 .jsonl file(s)" in str(refused.value)
    # A README.md's configs name the files each config reads: the others are left out on purpose.
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: a.parquet\n---\n")
    assert [d.text for d in _docs(f"hf:{repo}")] == [r["text"] for r in ROWS[:3]]


def test_a_repository_with_a_plain_readme_is_read_without_a_warning_and_refused_in_one_line(tmp_path):
    """A README.md without YAML: huggingface_hub warned on stderr each time `datasets` read it (3 lines a run),
    and before the error's one line where the folder holds no data files."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# Some documents\n")
    command = [sys.executable, "-m", "warehouse.cli", "ingest", "--model", "config:qwen3-tiny", "--data", f"hf:{repo}"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    refused = subprocess.run([*command, str(tmp_path / "wh"), "-q"], capture_output=True, text=True, env=env)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(f"error: dataset hf:{repo} cannot be opened (")
    datasets.Dataset.from_list(ROWS[:3]).to_parquet(str(repo / "a.parquet"))
    read = subprocess.run([*command, str(tmp_path / "wh"), "-q"], capture_output=True, text=True, env=env)
    assert (read.returncode, read.stderr) == (0, "")


def test_a_repository_folder_of_text_files_reads_paragraphs_as_a_folder_does(tmp_path):
    """hf:FOLDER of .txt files: each line had been a document, and a blank line one of no text."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.txt").write_text("first line\nsame paragraph\n\nsecond one\n")
    (repo / "b.txt").write_text("\n\nthird\n")
    expected = ["first line\nsame paragraph", "second one", "third"]
    assert [d.text for d in _docs(str(repo))] == expected
    assert [d.text for d in _docs(f"hf:{repo}")] == expected


@pytest.mark.parametrize("pack", [False, True])
def test_each_rank_resumes_its_own_shards(sources, pack):
    """A rank resumed from any ordinal keeps exactly its uninterrupted documents from there (packed: their
    windows too, the packing state rebuilt from its own documents before)."""
    plan = contexts.ContextPlan(max_length=8, context_size=8 if pack else None, bos_id=0, max_tokens=150)
    whole = _ranks(sources["parquet-glob"], 2, plan)
    for start in (4, 17, 25):
        resumed = _ranks(sources["parquet-glob"], 2, plan, start=start)
        for rank in range(2):
            assert resumed[rank]["docs"] == [d for d in whole[rank]["docs"] if d[0] >= start]
            assert resumed[rank]["reading"]["rows"] <= _own_rows(rank, 2)


@pytest.fixture(scope="module")
def bad_row(tmp_path_factory):
    """ROWS as four JSONL shards with a role column, row 31 (the last shard's second) with a control character."""
    base = tmp_path_factory.mktemp("bad-row") / "shards"
    base.mkdir()
    rows = [{**r, "role": "pool" if i != 31 else "a\x1b[2J"} for i, r in enumerate(ROWS)]
    for k in range(4):
        part = rows[k * SHARD_ROWS : (k + 1) * SHARD_ROWS]
        (base / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return str(base)


def test_a_bad_row_the_run_reaches_is_refused_on_every_rank_naming_its_row_in_the_stream(bad_row):
    """Its rank finds it while counting, and once the counts are exchanged raises the one-process run's line
    (the row numbered in the stream) before the run exists; the other rank joins that exchange to raise it too."""
    with pytest.raises(BadInput) as alone:
        _docs(bad_row)
    assert f"{bad_row} row 31: invalid role" in str(alone.value)
    ranks = _ranks(bad_row, 2, contexts.ContextPlan(max_length=8))
    assert ranks[1]["error"] == str(alone.value) and "docs" not in ranks[1]
    # Rank 0 joins the second exchange with nothing to raise (ranks.share raises rank 1's line there).
    assert len(ranks[0]["exchanges"]) == 2 and ranks[0]["exchanges"][1]() is None
    assert ranks[1]["counting"]["rows"] | ranks[1]["reading"]["rows"] <= _own_rows(1, 2)


@pytest.mark.parametrize("limit", [dict(max_docs=31), dict(max_tokens=100)])
def test_a_bad_row_past_the_limits_is_never_read(bad_row, limit):
    """--max-docs and --max-tokens end the stream before row 31: neither one process nor a rank reads it."""
    plan = contexts.ContextPlan(max_length=8, **limit)
    whole = _whole(bad_row, plan)
    ranks = _ranks(bad_row, 2, plan)
    assert sorted(ranks[0]["docs"] + ranks[1]["docs"]) == whole and "error" not in ranks[1]
    assert [len(seen["exchanges"]) for seen in ranks] == [1, 1]


def test_a_single_file_is_read_whole_by_every_rank_and_dealt(sources):
    """One shard cannot be split: each rank reads the whole stream and keeps the documents dealt to it."""
    plan = contexts.ContextPlan(max_length=8, max_docs=25)
    ranks = _ranks(sources["hub-folder"], 3, plan, where="lang = 'en'")
    whole = _whole(sources["hub-folder"], plan, where="lang = 'en'")
    for rank, seen in enumerate(ranks):
        assert not seen["own_pieces"] and seen["docs"] == [d for d in whole if d[0] % 3 == rank]
    assert sorted(d for seen in ranks for d in seen["docs"]) == whole and len(whole) == 25


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("limit", [1, 17, 60, 10_000])
def test_max_tokens_is_exact(sources, pack, limit):
    tokenizer = _Ids()
    plan = contexts.ContextPlan(
        max_length=6, context_size=5 if pack else None, bos_id=0, keep_partial=True, max_tokens=limit
    )
    shards = list(contexts.shards([Segment(_docs_stream(sources["disk"]))], tokenizer, plan, start=0, shard_tokens=9))
    stored = sum(len(w.ids) for shard in shards for _, _, wins in shard.docs for w in wins)
    total = sum(len(tokenizer.encode(r["text"])[0]) for r in ROWS)
    assert stored == min(limit, total)
    last_doc = shards[-1].docs[-1][1]
    if limit < total:  # the last document is cut at its token boundary, its text too
        kept = sum(len(w.ids) for w in shards[-1].docs[-1][2])
        assert len(last_doc.text.split(" ")) == kept


def test_max_docs(sources):
    plan = contexts.ContextPlan(max_length=64, max_docs=7)
    shards = contexts.shards([Segment(_docs_stream(sources["disk"]))], _Ids(), plan, start=0, shard_tokens=5)
    assert [o for s in shards for o, _, _ in s.docs] == list(range(7))


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        (dict(pack=True), "--pack needs --context-size"),
        (dict(context_size=8), "add --pack"),
        (dict(pack=True, context_size=8, max_length=16), "drop --truncate and --max-length"),
        (dict(max_tokens=0), "--max-tokens must be at least 1"),
        (dict(separator="newline"), "use bos, eos, sep, none or a token id"),
        (dict(pack=True, context_size=8, splice=True), "drop --pack and --exclude-special, or --splice"),
    ],
)
def test_bad_context_options_are_one_line(options, fix):
    with pytest.raises(BadInput, match=fix):
        IngestOptions(**options)


@pytest.mark.parametrize(
    ("arguments", "fix"),
    [
        (["--text-column", "body"], "--text-column 'body' is not a column of"),
        (["--split", "validation"], "use --split with one of train, test"),
        (["--where", "lang = (SELECT 1)"], "is not allowed"),
        (["--where", "colour = 'red'"], "not a column of"),
        (["--pack"], "--pack needs --context-size"),
    ],
)
def test_cli_bad_inputs_are_one_line(sources, tmp_path, capsys, monkeypatch, arguments, fix):
    from .cli_runner import run_cli

    code, out, err = run_cli(capsys, monkeypatch, "ingest", tmp_path / "wh", "--data", sources["dict"], *arguments)
    assert code != 0 and fix in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "wh" / "runs").exists() or not any((tmp_path / "wh" / "runs").iterdir())


def test_text_shards_hold_paragraphs(tmp_path):
    texts = [r["text"] for r in ROWS]
    (tmp_path / "a.txt").write_text("\n\n".join(texts[:20]) + "\n\n\n")
    (tmp_path / "b.txt").write_text("\n\n".join(texts[20:]) + "\n")
    docs = _docs(str(tmp_path))
    assert [d.text for d in docs] == texts
    # The blank paragraph closing a.txt is a row of the stream (ids count it) but no document.
    assert [d.doc_id for d in docs] == [f"{tmp_path.name}:{i}" for i in [*range(20), *range(21, N + 1)]]


HOSTILE = [
    ("doc_id", "uid", "a\nb", "invalid doc_id 'a\\nb': use text of 1 to 1024 characters without control characters"),
    ("doc_id", "uid", "u" * 1025, "invalid doc_id 'uuu"),
    ("dataset", "dataset", "web\x1b]52;c;aGk=\x07", "invalid dataset 'web\\x1b]52;c;aGk=\\x07': use text of 1 to 256"),
    ("role", "role", "ok\rEVIL", "invalid role 'ok\\rEVIL'"),
    ("label", "label", "\u202eadmin", "invalid label '\\u202eadmin'"),
    ("message_role", "message_role", "user\x1b[2J", "invalid message_role 'user\\x1b[2J'"),
]


def _labelled(tmp_path, column: str, value: str) -> str:
    """A save_to_disk dataset whose row 1 carries `value` in `column` (the other rows are valid)."""
    rows = [
        {"text": f"text {i}", "uid": f"u{i}", "dataset": "web", "role": "pool", "label": "x", "message_role": "user"}
        for i in range(3)
    ]
    rows[1][column] = value
    path = tmp_path / f"labels-{column}"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize(("field", "column", "value", "shown"), HOSTILE)
def test_hostile_labels_are_refused_as_a_data_file_s(tmp_path, field, column, value, shown):
    """A dataset row's labels meet the rule a data file's do (warehouse/names.py), escaped in the message;
    with --skip-bad the row is skipped and counted."""
    from ingest.sources import Document
    from warehouse.names import document_label_problem

    data = _labelled(tmp_path, column, value)
    with pytest.raises(BadInput) as refused:
        _docs(data, id_column="uid")
    message = str(refused.value)
    assert f"{data} row 1: " in message and shown in message and "--skip-bad" in message
    assert value.isprintable() or value not in message  # control characters only as escapes
    # The same words as the data-file check gives for the same value.
    carried = {"meta": {column: value}} if column == "message_role" else {field: value}
    doc = Document(**{"doc_id": "u", "text": "t", **carried})
    assert document_label_problem(doc) in message
    counter = SkipCounter(skip_bad=True)
    source = inputs.open_input(IngestOptions(data=(data,), id_column="uid", skip_bad=True))
    assert [d.doc_id for d in source.documents(counter, None, None)] == ["u0", "u2"]
    assert counter.skipped == 1 and shown in counter.first_error


def test_cli_refuses_a_hostile_dataset_label_in_one_line(tmp_path, capsys, monkeypatch):
    from .cli_runner import run_cli

    data = _labelled(tmp_path, "dataset", "web\x1b[31m")
    code, _, err = run_cli(capsys, monkeypatch, "ingest", tmp_path / "wh", "--data", data, "--quiet")
    assert code != 0 and "row 1: invalid dataset 'web\\x1b[31m'" in err and "\x1b" not in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "wh" / "runs").exists() or not any((tmp_path / "wh" / "runs").iterdir())


@pytest.fixture(scope="module")
def repeated_ids(tmp_path_factory):
    """ROWS as Parquet shards with a column `dup` whose id of row 31 repeats row 12's."""
    base = tmp_path_factory.mktemp("repeated") / "shards"
    base.mkdir()
    rows = [{**r, "dup": f"x{i}" if i != 31 else "x12"} for i, r in enumerate(ROWS)]
    ds = datasets.Dataset.from_list(rows)
    for k in range(2):
        ds.shard(2, k, contiguous=True).to_parquet(str(base / f"part-{k}.parquet"))
    return str(base)


def test_a_streamed_id_given_twice_is_refused_naming_both(repeated_ids):
    with pytest.raises(BadInput, match=r"doc_id 'x12' is given twice \(documents 13 and 32 of --data\).*--id-column"):
        _docs(repeated_ids, id_column="dup")
    assert [d.doc_id for d in _docs(repeated_ids, id_column="uid")] == [r["uid"] for r in ROWS]


def test_an_id_in_two_ranks_documents_is_refused_before_the_commit(repeated_ids, tmp_path):
    """Each rank checks the ids of its own shards as they go by; rank 0 checks them across the ranks' documents
    before it commits (ranks.refuse_repeated_ids), naming the same documents as one process does."""
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ingest.ranks import refuse_repeated_ids

    ranks = _ranks(repeated_ids, 2, contexts.ContextPlan(max_length=8), id_column="dup")  # alone, each is fine
    for rank, seen in enumerate(ranks):
        table = pa.table({"doc": [d[0] for d in seen["docs"]], "doc_id": [d[1] for d in seen["docs"]]})
        pq.write_table(table, tmp_path / f"documents-{rank}.parquet")
    writer = SimpleNamespace(
        world_size=2,
        layout=SimpleNamespace(root=tmp_path),
        rank_shards=lambda rank: [{"parts": [{"table": "documents", "path": f"documents-{rank}.parquet"}]}],
    )
    with pytest.raises(BadInput, match=r"doc_id 'x12' is given twice \(documents 13 and 32 of --data\)"):
        refuse_repeated_ids(writer)
    ranks = _ranks(repeated_ids, 2, contexts.ContextPlan(max_length=8), id_column="uid")
    for rank, seen in enumerate(ranks):
        table = pa.table({"doc": [d[0] for d in seen["docs"]], "doc_id": [d[1] for d in seen["docs"]]})
        pq.write_table(table, tmp_path / f"documents-{rank}.parquet")
    refuse_repeated_ids(writer)


def test_cli_refuses_a_repeated_id_in_one_line_keeping_committed_runs(repeated_ids, tmp_path, capsys, monkeypatch):
    from .cli_runner import run_cli

    root = tmp_path / "wh"
    model = ("--model", "config:llama-tiny", "--device", "cpu", "--quiet")
    code, _, err = run_cli(capsys, monkeypatch, "ingest", root, "--data", repeated_ids, "--run-id", "kept", *model)
    assert code == 0, err
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "whq.duckdb"}
    code, _, err = run_cli(
        capsys, monkeypatch, "ingest", root, "--data", repeated_ids, "--id-column", "dup", "--run-id", "r", *model
    )
    assert code != 0 and "doc_id 'x12' is given twice" in err and "--id-column" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["kept.json"]

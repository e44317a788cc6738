"""Packed contexts (ingest/contexts.py) against an independent packer written here and against SAELens's own
concat_and_batch_sequences, token for token; then a packed ingest whose stored activations equal the model run
directly on those contexts, and --exclude-special."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import warehouse
from ingest import contexts
from ingest.contexts import ContextPlan, Packer, Segment
from ingest.sources import Document

from . import reference

BOS, SEP = 1, 2


def independent_pack(docs: list[list[int]], size: int, bos: int | None, sep: int | None, keep_partial: bool):
    """Contexts as lists of (token, doc, pos), doc -1 for an inserted token: a context begins with BOS unless
    its first token is BOS, a document that does not begin with the separator follows one inside a context."""
    out, current = [], None
    for d, ids in enumerate(docs):
        i = 0
        while i < len(ids):
            if current is None:
                current = [] if bos is None or ids[i] == bos else [(bos, -1, -1)]
            elif i == 0 and sep is not None and ids[0] != sep:
                current.append((sep, -1, -1))
            room = size - len(current)
            current += [(t, d, p) for p, t in enumerate(ids[i : i + room], start=i)]
            i += min(room, len(ids) - i)
            if len(current) == size:
                out.append(current)
                current = None
    if current and keep_partial:
        out.append(current)
    return out


def random_docs(rng: random.Random, n: int) -> list[list[int]]:
    docs = []
    for _ in range(n):
        length = rng.choice([0, 1, 2, 3, 5, 8, 13, 30])
        ids = [rng.randrange(3, 50) for _ in range(length)]
        if ids and rng.random() < 0.2:
            ids[0] = rng.choice([BOS, SEP])  # pre-tokenized documents may begin with BOS or the separator
        docs.append(ids)
    return docs


def ours(docs, size, bos, sep, keep_partial):
    packer = Packer(size, bos, sep)
    made = [c for d, ids in enumerate(docs) for c in packer.feed(d, ids)]
    last = packer.finish()
    return made + ([last] if last is not None and keep_partial else [])


OPTIONS = [(8, BOS, SEP), (8, BOS, None), (8, None, SEP), (5, None, None), (3, BOS, BOS), (16, BOS, BOS)]


@pytest.mark.parametrize(("size", "bos", "sep"), OPTIONS)
@pytest.mark.parametrize("seed", range(4))
def test_packer_equals_the_independent_packer(size, bos, sep, seed):
    docs = random_docs(random.Random(seed), 25)
    for keep in (False, True):
        expected = independent_pack(docs, size, bos, sep, keep)
        got = ours(docs, size, bos, sep, keep)
        assert [list(zip(c.ids, c.doc, c.pos)) for c in got] == expected
        assert [c.ordinal for c in got] == list(range(len(got)))


@pytest.mark.parametrize(("size", "bos", "sep"), OPTIONS)
@pytest.mark.parametrize("seed", range(4))
def test_packer_equals_saelens(size, bos, sep, seed):
    torch = pytest.importorskip("torch")
    batching = pytest.importorskip("sae_lens.tokenization_and_batching")
    docs = random_docs(random.Random(100 + seed), 25)
    theirs = batching.concat_and_batch_sequences(
        (torch.tensor(ids, dtype=torch.long) for ids in docs),
        context_size=size,
        begin_batch_token_id=bos,
        begin_sequence_token_id=None,
        sequence_separator_token_id=sep,
    )
    assert [c.ids for c in ours(docs, size, bos, sep, False)] == [t.tolist() for t in theirs]


class _Words:
    """Whitespace tokens with character offsets; id 0 is its only special token."""

    special_ids = frozenset({0})
    n_special = 0
    bos_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text):
        ids, offsets, at = [], [], 0
        for word in text.split():
            at = text.index(word, at)
            ids.append(self.vocab.setdefault(word, len(self.vocab) + 3))
            offsets.append((at, at + len(word)))
            at += len(word)
        return ids, offsets

    def wrap(self, ids):
        return list(ids), [False] * len(ids)


def _documents(rng, n):
    return [Document(f"d{i}", " ".join(f"w{rng.randrange(20)}" for _ in range(rng.randrange(0, 14)))) for i in range(n)]


def _layout(shards):
    return [
        (ordinal, w.index, w.start_pos, w.context, w.context_start, tuple(w.ids), w.last)
        for shard in shards
        for ordinal, _, wins in shard.docs
        for w in wins
    ]


@pytest.mark.parametrize("keep", [False, True])
def test_packed_shards_keep_every_token_in_place(keep):
    docs = _documents(random.Random(3), 30)
    plan = ContextPlan(max_length=0, context_size=7, bos_id=BOS, separator_id=SEP, keep_partial=keep)
    tokenizer = _Words()
    shards = list(contexts.shards([Segment(docs)], tokenizer, plan, start=0, shard_tokens=10))
    expected = independent_pack([tokenizer.encode(d.text)[0] for d in docs], 7, BOS, SEP, keep)
    by_doc: dict[int, list] = {}
    for shard in shards:
        assert shard.packed
        for ordinal, doc, wins in shard.docs:
            for w in wins:
                context = expected[w.context]
                for i, token in enumerate(w.ids):  # each token sits where the packer put it
                    assert context[w.context_start + i] == (token, ordinal, w.start_pos + i)
                    assert w.row[w.context_start + i] == token
                    assert doc.text[w.char_start[i] : w.char_end[i]] == doc.text.split()[w.start_pos + i]
                by_doc.setdefault(ordinal, []).extend(w.ids)
            assert [w.index for w in wins] == list(range(len(wins)))
            assert [w.last for w in wins] == [False] * (len(wins) - 1) + [True] * bool(wins)
    stored = {(d, p) for c in expected for _, d, p in c if d >= 0}
    for ordinal, doc in enumerate(docs):  # every packed token is stored once, under its document
        ids = tokenizer.encode(doc.text)[0]
        assert by_doc.get(ordinal, []) == [t for p, t in enumerate(ids) if (ordinal, p) in stored]
    # Shard boundaries and a resume from any document change nothing.
    whole = _layout(shards)
    one = list(contexts.shards([Segment(docs)], tokenizer, plan, start=0, shard_tokens=10_000))
    assert _layout(one) == whole
    for start in (1, 9, 17):
        resumed = contexts.shards([Segment(docs)], tokenizer, plan, start=start, shard_tokens=10)
        assert _layout(resumed) == [row for row in whole if row[0] >= start]


def test_packed_batches_hold_whole_contexts():
    docs = _documents(random.Random(5), 20)
    plan = ContextPlan(max_length=0, context_size=6, bos_id=BOS, separator_id=SEP, keep_partial=True)
    (shard,) = contexts.shards([Segment(docs)], _Words(), plan, start=0, shard_tokens=10_000)
    batches = list(shard.batches(3))
    flat = [w for b in batches for w in b]
    assert flat == [w for _, _, wins in shard.docs for w in wins]
    seen = [sorted({w.context for w in b}) for b in batches]
    assert all(len(s) <= 3 for s in seen)
    assert sorted(c for s in seen for c in s) == sorted({w.context for w in flat})  # no context split over batches


def test_prepend_bos_follows_the_dictionary(tmp_path):
    from ingest.dictionary_files import Dictionary, DictionarySet

    def dictionaries(value):
        folder = tmp_path / f"sae-{value}"
        folder.mkdir(exist_ok=True)
        (folder / "cfg.json").write_text(json.dumps({"metadata": {"prepend_bos": value}}))
        d = Dictionary(str(folder), "saelens", "relu", 4, 8, 4)
        return {str(folder): DictionarySet(str(folder), {None: d})}

    assert contexts.resolve_prepend_bos(None, dictionaries(False)) == (False, None)
    assert contexts.resolve_prepend_bos(None, {}) == (True, None)
    assert contexts.resolve_prepend_bos(False, {}) == (False, None)
    value, note = contexts.resolve_prepend_bos(True, dictionaries(False))
    assert value is True and "differs from the dictionary's own config (prepend_bos=false)" in note


# -- a packed ingest on MiniLM -------------------------------------------------------------

SITES = ["resid.out[2]:dense,mean,last", "mlp.act[1]:topk=4,examples=3,nag=3"]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    from ingest.models import load
    from ingest.pipeline import ingest

    rng = random.Random(11)
    texts = [
        " ".join(
            rng.choice(["the", "cat", "sat", "on", "a", "mat", "quietly", "."]) for _ in range(rng.randrange(1, 30))
        )
        for _ in range(14)
    ]
    texts[4] = ""
    base = tmp_path_factory.mktemp("packed")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(base / "ds"))
    loaded = load("minilm", "cpu", "float32")
    root = base / "wh"
    result = ingest(
        root,
        "minilm",
        [str(base / "ds")],
        SITES,
        run_id="p",
        batch_size=3,
        shard_tokens=40,
        device="cpu",
        progress=False,
        loaded=loaded,
        pack=True,
        context_size=16,
        keep_partial=True,
    )
    wh = warehouse.open(root)
    yield wh, loaded, texts, result
    wh.close()


TABLES = ("tokens", "documents", "vectors", "token_neurons", "doc_neurons", "neuron_stats", "neuron_examples")


def test_packed_resume_equals_the_uninterrupted_run(packed, monkeypatch):
    """A packed run stopped after its second shard and resumed holds exactly the rows of the run never stopped
    (contexts shared by two shards are computed in both)."""
    from ingest.pipeline import ingest
    from warehouse import faults

    wh, loaded, _, _ = packed
    root = wh.root.parent / "resumed"
    options = dict(
        run_id="p",
        batch_size=3,
        shard_tokens=40,
        device="cpu",
        progress=False,
        loaded=loaded,
        pack=True,
        context_size=16,
        keep_partial=True,
    )
    data = [str(wh.root.parent / "ds")]
    monkeypatch.setenv("WHQ_FAULT", "shard.journalled:2:enospc")
    monkeypatch.setattr(faults, "_counts", {})
    with pytest.raises(OSError):
        ingest(root, "minilm", data, SITES, **options)
    monkeypatch.delenv("WHQ_FAULT")
    ingest(root, "minilm", data, SITES, resume=True, **options)
    resumed = warehouse.open(root)
    try:
        for table in TABLES:
            columns = [c for c in wh.pl(f"SELECT * FROM {table} LIMIT 0").columns if c not in ("run_id",)]
            order = ", ".join(f'"{c}"' for c in columns if c not in ("vec", "window_values", "meta"))
            query = f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY {order}"
            assert resumed.pl(query).equals(wh.pl(query)), table
    finally:
        resumed.close()


def test_packed_tokens_follow_the_packer(packed):
    wh, loaded, texts, _ = packed
    tok = loaded.tokenizer
    expected = independent_pack([tok.encode(t)[0] for t in texts], 16, tok.bos_id, tok.bos_id, True)
    rows = wh.pl("SELECT doc, pos, context, context_pos, token_id FROM tokens ORDER BY context, context_pos")
    stored = [(c, cp, t, d, p) for d, p, c, cp, t in rows.iter_rows()]
    assert stored == [
        (c, cp, t, d, p) for c, context in enumerate(expected) for cp, (t, d, p) in enumerate(context) if d >= 0
    ]
    config = wh.pl("SELECT config FROM runs")["config"][0]
    config = json.loads(config) if isinstance(config, str) else config
    assert config["pack"] is True and config["prepend_bos"] is True and config["context_size"] == 16


def test_packed_activations_are_the_contexts_own(packed):
    """Every stored vector equals MiniLM run on the packed context itself, and each document's mean and last
    vectors (spanning contexts) are its tokens' own."""
    from ingest.sites import parse_spec, resolve

    wh, loaded, texts, _ = packed
    tok = loaded.tokenizer
    expected = independent_pack([tok.encode(t)[0] for t in texts], 16, tok.bos_id, tok.bos_id, True)
    site = resolve(parse_spec(SITES[0]), loaded.module_names, loaded.aliases)
    ((layer, module),) = site.modules
    acts = reference.dense_activations(
        loaded.model, module, site.hook, {c: [[t for t, _, _ in ctx]] for c, ctx in enumerate(expected)}
    )
    where = {(d, p): acts[c][cp] for c, ctx in enumerate(expected) for cp, (_, d, p) in enumerate(ctx) if d >= 0}
    vectors = wh.pl(f"SELECT doc, pos, pool, vec FROM vectors WHERE site = 'resid.out' AND layer = {layer}")
    seen = 0
    for doc, pos, pool, vec in vectors.iter_rows():
        own = np.array([where[(doc, p)] for p in range(len(tok.encode(texts[doc])[0]))])
        if pool == "token":
            want = where[(doc, pos)]
        elif pool == "mean":
            want = own.astype(np.float64).mean(axis=0)
        else:
            want = own[-1]
            assert pos == len(own) - 1
        np.testing.assert_allclose(np.array(vec), want, **TOL)
        seen += 1
    n_tokens = sum(len(tok.encode(t)[0]) for t in texts)
    assert seen == n_tokens + 2 * sum(1 for t in texts if tok.encode(t)[0])


@pytest.fixture(scope="module")
def excluded(tmp_path_factory, sample_jsonl):
    from ingest.models import load
    from ingest.pipeline import ingest

    root = tmp_path_factory.mktemp("excluded") / "wh"
    loaded = load("minilm", "cpu", "float32")
    ingest(
        root,
        "minilm",
        [str(sample_jsonl)],
        ["resid.out[1]:dense,mean"],
        run_id="x",
        batch_size=2,
        max_length=12,
        device="cpu",
        progress=False,
        loaded=loaded,
        exclude_special=True,
    )
    wh = warehouse.open(root)
    yield wh, loaded
    wh.close()


def test_exclude_special_keeps_the_model_input_but_not_the_rows(excluded, sample_jsonl):
    from ingest.sites import parse_spec, resolve
    from ingest.tokenize import windows

    wh, loaded = excluded
    texts = [json.loads(line)["text"] for line in sample_jsonl.read_text().splitlines()]
    assert wh.pl("SELECT count(*) AS n FROM tokens WHERE special")["n"][0] == 0
    site = resolve(parse_spec("resid.out[1]:dense"), loaded.module_names, loaded.aliases)
    ((layer, module),) = site.modules
    full = {d: [w.ids for w in windows(d, t, loaded.tokenizer, 12, False)] for d, t in enumerate(texts)}
    acts = reference.dense_activations(loaded.model, module, site.hook, full)
    stats = wh.pl(f"SELECT max(n_tokens) AS n FROM neuron_stats WHERE layer = {layer}")
    assert stats["n"][0] == sum(len(loaded.tokenizer.encode(t)[0]) for t in texts)
    rows = wh.pl("SELECT doc, pos, vec FROM vectors WHERE pool = 'token' ORDER BY doc, pos")
    for doc, pos, vec in rows.iter_rows():
        wins = windows(doc, texts[doc], loaded.tokenizer, 12, False)
        flat_special = [s for w in wins for s in w.special]
        assert not flat_special[pos]  # stored positions are the document's own (the frame's are skipped)
        np.testing.assert_allclose(np.array(vec), acts[doc][pos], **TOL)
    for doc, vec in wh.pl("SELECT doc, vec FROM vectors WHERE pool = 'mean'").iter_rows():
        wins = windows(doc, texts[doc], loaded.tokenizer, 12, False)
        keep = [not s for w in wins for s in w.special]
        np.testing.assert_allclose(np.array(vec), acts[doc][keep].astype(np.float64).mean(axis=0), **TOL)


def test_exclude_special_in_packed_contexts_skips_the_documents_own_specials():
    # Pre-tokenized documents keep their own BOS/EOS (id 0 here); --exclude-special leaves them out of the windows.
    docs = [Document("a", "", token_ids=[0, 5, 6, 0, 7]), Document("b", "", token_ids=[8, 9, 0])]

    class Ids(_Words):
        def decode(self, ids):
            return " ".join(map(str, ids))

    plan = ContextPlan(
        max_length=0, context_size=4, bos_id=BOS, separator_id=SEP, keep_partial=True, exclude_special=True
    )
    (shard,) = contexts.shards([Segment(docs)], Ids(), plan, start=0, shard_tokens=100)
    kept = {ordinal: [(w.start_pos, w.ids) for w in wins] for ordinal, _, wins in shard.docs}
    # contexts: [1 0 5 6] [1 0 7 2] [1 8 9 0] -> document a keeps 5 6 | 7, document b keeps 8 9
    assert kept == {0: [(1, [5, 6]), (4, [7])], 1: [(0, [8, 9])]}
    assert [w.tokens_through for w in shard.docs[0][2]] == [2, 3]  # tokens counted, not positions


def test_plan_without_a_bos_token_and_too_long_contexts():
    from ingest.options import IngestOptions
    from warehouse.errors import BadInput

    class NoBos(_Words):
        bos_id = None
        eos_id = 7

    options = IngestOptions(pack=True, context_size=8)
    plan, resolved, notes = contexts.plan(options, NoBos(), {}, 512, positions=512)
    assert (plan.bos_id, plan.separator_id, resolved.prepend_bos) == (None, None, True)
    assert len(notes) == 2 and all("has no BOS token" in n for n in notes)
    plan, _, notes = contexts.plan(IngestOptions(pack=True, context_size=8, separator="eos"), NoBos(), {}, 512)
    assert plan.separator_id == 7
    with pytest.raises(BadInput, match="--context-size 600 is longer than the 512 positions"):
        contexts.plan(IngestOptions(pack=True, context_size=600), NoBos(), {}, 512, positions=512)

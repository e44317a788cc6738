"""Chat scenarios (Activation Lab's format) captured into one warehouse run.

    from ingest.chat import run_scenario
    run_scenario("wh", "examples/scenarios/emotions.yaml", run_id="emo")

What one scenario writes (documents.role in brackets):
- one prefill per conversation prefix messages[:i+1] [message], per reference state
  [reference], and the generation [generated]: its prefill (step 0) and every decode step;
- `vectors` (pool 'last', site = the source name): the last token's hidden_in,
  hidden_out, attn_out and mlp_out of every captured layer, for every one of those
  forward passes, rounded to capture.store_dtype;
- `steps`: per generation step its input, the chosen token, the argmax and the top-k;
- `logit_lens`: per forward pass and captured layer, hidden_out through the final norm
  and the unembedding: top-k, argmax log-probability and KL(final || layer);
- the sparse sites of capture.sites (`mlp.act:topk=20`, `resid.out[6]+sae=PATH:topk=20`, ...)
  over the whole conversation (prompt + generation) and each reference, by the ingest capture
  code, and their run-level tables as `whq ingest` commits them (finalize.final_parts);
- per dictionary site, `vectors` of its latents at every forward pass's last token, like the
  sources' (so the scenario macros compare latents), and the feature logit lens while
  capture.logit_lens is on.
Everything is committed as one run (one shard), so it appears atomically.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

import warehouse
from warehouse.errors import BadInput, BadSpec, WarehouseError
from warehouse.names import check_name
from warehouse.parts import to_arrow
from warehouse.runwriter import RunWriter

from . import models
from .capture import Capture
from .limits import check_scenario_model
from .options import default_run_id
from .pipeline import IngestResult
from .prepare import read_sites, ready_capture
from .scenario import Message, Scenario, load
from .shard import Shard
from .sites import SOURCE_ALIASES, parse_spec, resolve
from .sources import Document
from .tokenize import Window


@dataclass
class Pass:
    """What one forward pass left behind: last-token vectors and the logit-lens rows."""

    doc: int
    step: int
    pos: int
    vectors: dict  # (source, layer) -> float32 [H]
    lens: dict = field(default_factory=dict)


@dataclass
class CapturedDoc:
    ordinal: int
    document: Document
    window: Window


def _rendered(hf_tokenizer, messages: tuple[Message, ...]) -> str:
    """The prompt text: the chat template with the generation prompt, or plain 'role: content' lines."""
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(hf_tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        try:
            return hf_tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:
            roles = "/".join(m.role for m in messages)
            raise BadInput(
                f"the model's chat template rejects the messages ({roles}): {err}; reorder or merge them"
            ) from None
    return "\n".join(f"{m.role}: {m.content}" for m in messages) + "\nassistant:"


def _window(ordinal: int, text: str, tokenizer, chat_template: bool) -> Window:
    """Token ids of a rendered prompt; BOS etc. are added only when no chat template renders them."""
    ids, offsets = tokenizer.encode(text)
    prefix = [] if chat_template else list(tokenizer.prefix)
    return Window(
        ordinal,
        0,
        0,
        prefix + list(ids),
        [True] * len(prefix) + [False] * len(ids),
        [-1] * len(prefix) + [s for s, _ in offsets],
        [-1] * len(prefix) + [e for _, e in offsets],
        True,
    )


def _generated_window(prompt: Window, prompt_text: str, fed: list[int], tokenizer) -> Window:
    """The generated document: prompt + every generated token the model was fed; offsets by incremental decode."""
    starts, ends, text = list(prompt.char_start), list(prompt.char_end), ""
    for i in range(len(fed)):
        longer = tokenizer.decode(fed[: i + 1])
        aligned = longer.startswith(text)
        starts.append(len(prompt_text) + len(text) if aligned else -1)
        ends.append(len(prompt_text) + len(longer) if aligned else -1)
        text = longer
    return Window(prompt.doc, 0, 0, prompt.ids + fed, prompt.special + [False] * len(fed), starts, ends, True)


@dataclass
class LastToken:
    """A tap (see ingest/hooks.py) keeping the last position's vector of one (source, layer) in `kept`."""

    key: tuple
    module_name: str
    hook_point: str
    kept: dict

    def __call__(self, x) -> None:
        self.kept[self.key] = x[0, -1].detach()


def _captured(site, layers: list[int]):
    """The site restricted to the captured layers (what the sites table then lists)."""
    return replace(site, modules=[(layer, name) for layer, name in site.modules if layer in layers])


def _store_rounding(store_dtype: str):
    import torch

    dtype = getattr(torch, store_dtype)
    return lambda t: t.to(dtype).float().cpu().numpy()


class ScenarioCapture:
    """Runs the forward passes of one scenario and accumulates the rows to write.

    `dictionary_layers`: the SiteLayers of the dictionary sites; each pass also keeps their
    last token's latents (encoded by the same encoder), a state like the sources' vectors.
    """

    def __init__(self, loaded, spec: Scenario, device: str, dictionary_layers: list = ()):
        import torch

        self.spec, self.device = spec, device
        self.model = loaded.model
        self.hf = loaded.hf_tokenizer
        self.capture = spec.capture
        n_layers = loaded.n_layers
        layers = spec.capture.layers
        if layers is not None and max(layers) >= n_layers:
            raise BadInput(
                f"capture.layers has layer {max(layers)} but {loaded.model_id} has {n_layers} layers (0..{n_layers - 1}): fix the list"
            )
        self.layers = list(layers) if layers is not None else list(range(n_layers))
        module_names = loaded.module_names
        self.sources = {
            src: _captured(resolve(parse_spec(f"{src}:last"), module_names, loaded.aliases), self.layers)
            for src in spec.capture.sources
        }
        block_out = resolve(parse_spec("hidden_out"), module_names, loaded.aliases)
        self.kept: dict = {}
        self.taps = []
        for src, site in [*self.sources.items(), *([("hidden_out", block_out)] if spec.capture.logit_lens else [])]:
            by_layer = dict(site.modules)
            self.taps += [LastToken((src, layer), by_layer[layer], site.hook, self.kept) for layer in self.layers]
        self.encoders = {(sl.name, sl.layer): sl.encoder for sl in dictionary_layers}
        self.taps += [
            LastToken(key, sl.module_name, sl.hook_point, self.kept)
            for key, sl in zip(self.encoders, dictionary_layers)
        ]
        self.vector_keys = [(src, layer) for src in self.sources for layer in self.layers] + list(self.encoders)
        self.norm = models.final_norm(self.model)
        self.head = self.model.get_output_embeddings()
        if spec.capture.logit_lens and self.norm is None:
            raise BadInput(
                f"{loaded.model_id} has no final norm whq knows (norm, final_layer_norm, ln_f): set capture.logit_lens: 0"
            )
        self.round = _store_rounding(spec.capture.store_dtype)
        self.passes: list[Pass] = []
        self.steps: list[dict] = []
        self.token_text = {}
        self._torch = torch
        # transformers renamed past_key_values to cache (5.x); use whichever this model takes.
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def text_of(self, token_id: int) -> str:
        if token_id not in self.token_text:
            self.token_text[token_id] = self.hf.decode([token_id])
        return self.token_text[token_id]

    # -- one forward pass -------------------------------------------------------
    def forward(self, doc: int, step: int, pos: int, input_ids: list[int], past=None, use_cache=False):
        torch = self._torch
        ids = torch.tensor([input_ids], device=self.device)
        out = self.model(
            input_ids=ids, use_cache=use_cache, logits_to_keep=1, **({self.cache_arg: past} if past is not None else {})
        )
        kept = dict(self.kept)
        self.kept.clear()
        logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        keys = [key for key in self.vector_keys if key in kept]
        states = [self._latents(key, kept[key]) if key in self.encoders else kept[key].float() for key in keys]
        sizes = np.cumsum([len(v) for v in states])[:-1]
        flat = self.round(torch.cat(states)) if states else []  # one host copy per pass
        vectors = dict(zip(keys, np.split(flat, sizes)))
        record = Pass(doc, step, pos, vectors)
        if self.capture.logit_lens:
            record.lens = self._lens([kept[("hidden_out", layer)] for layer in self.layers], logprobs)
        self.passes.append(record)
        return out, logprobs

    def _latents(self, key: tuple, x):
        encoder = self.encoders[key]
        x = x.float()[None]
        encoder.check_width(x)
        return encoder.encode(x)[0]

    def _lens(self, hidden: list, final_logprobs) -> dict:
        torch = self._torch
        stacked = torch.stack(hidden)[:, None, :]  # [L, 1, H]
        logprobs = torch.log_softmax(self.head(self.norm(stacked))[:, 0].float(), dim=-1)  # [L, V]
        final = final_logprobs.double()
        kl = (final.exp()[None, :] * (final[None, :] - logprobs.double())).sum(dim=-1)
        k = min(self.capture.logit_lens, logprobs.shape[-1])
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        return {
            "top_ids": top_ids.cpu().numpy(),
            "top_logprobs": top_lp.cpu().numpy(),
            "argmax_logprob": top_lp[:, 0].cpu().numpy(),
            "kl": kl.cpu().numpy(),
        }

    # -- prefills and the generation ---------------------------------------------
    def prefill(self, doc: CapturedDoc) -> None:
        ids = doc.window.ids
        self.forward(doc.ordinal, 0, len(ids) - 1, ids)

    def generate(self, doc: int, prompt_ids: list[int]) -> tuple[list[int], str]:
        """Greedy or seeded sampling, one step per forward pass; returns the generated ids and why it stopped."""
        torch = self._torch
        gen = self.spec.generation
        torch.manual_seed(gen.seed)
        generator = torch.Generator(device="cpu").manual_seed(gen.seed) if gen.do_sample else None
        stop = _stop_ids(self.hf, self.model)
        k = min(self.capture.top_k_probs, self.head.weight.shape[0])
        past, feed, generated, stopped = None, list(prompt_ids), [], "max_new_tokens"
        for step in range(gen.max_new_tokens):
            pos = len(prompt_ids) - 1 + step
            out, logprobs = self.forward(doc, step, pos, feed, past=past, use_cache=True)
            past = out[self.cache_arg]
            chosen = _pick(out.logits[0, -1], gen, generator)
            top_lp, top_ids = logprobs.topk(k) if k else (logprobs[:0], logprobs[:0].long())
            argmax_lp, argmax_id = logprobs.max(dim=-1)
            top_ids = top_ids.tolist()
            self.steps.append(
                {
                    "doc": doc,
                    "step": step,
                    "kind": "prefill" if step == 0 else "decode",
                    "input_token_ids": list(feed),
                    "input_tokens": [self.text_of(t) for t in feed],
                    "generated_token_id": chosen,
                    "generated_token": self.text_of(chosen),
                    "argmax_id": int(argmax_id),
                    "argmax_logprob": float(argmax_lp),
                    "top_ids": top_ids,
                    "top_tokens": [self.text_of(t) for t in top_ids],
                    "top_logprobs": top_lp.tolist(),
                }
            )
            generated.append(chosen)
            if chosen in stop:
                stopped = "eos"
                break
            feed = [chosen]
        return generated, stopped


def _stop_ids(tokenizer, model) -> set[int]:
    """The tokenizer's EOS and the model's generation_config EOS ids (chat models end turns with their own)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return {int(i) for i in [tokenizer.eos_token_id, *ids] if i is not None}


def _pick(logits, gen, generator) -> int:
    """Activation Lab's choice of the next token: argmax, or seeded sampling on the CPU."""
    import torch

    if not gen.do_sample:
        return int(logits.argmax())
    logits = logits.float() / max(gen.temperature, 1e-6)
    if gen.top_k:
        cutoff = torch.topk(logits, min(gen.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    if gen.top_p is not None and gen.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        drop = torch.softmax(ordered, dim=-1).cumsum(dim=-1) > gen.top_p
        drop[0] = False
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits.cpu(), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# -- rows -----------------------------------------------------------------------
def _vector_parts(passes: list[Pass], keys: list[tuple]) -> list[tuple]:
    """One vectors part per (source or dictionary site, layer) of `keys`: every pass's last-token state."""
    parts = []
    ordered = sorted(passes, key=lambda p: (p.doc, p.step))
    for site, layer in keys:
        rows = [p for p in ordered if (site, layer) in p.vectors]
        columns = {
            "doc": np.array([p.doc for p in rows]),
            "step": np.array([p.step for p in rows]),
            "pos": np.array([p.pos for p in rows]),
            "pool": np.full(len(rows), "last"),
            "vec": np.stack([p.vectors[(site, layer)] for p in rows]),
        }
        parts.append(("vectors", site, layer, to_arrow("vectors", columns, columns["vec"].shape[1])))
    return parts


def _lens_table(passes: list[Pass], layers: list[int], text_of) -> pa.Table:
    cols = {
        k: []
        for k in (
            "doc",
            "step",
            "pos",
            "layer",
            "top_ids",
            "top_tokens",
            "top_logprobs",
            "argmax_logprob",
            "kl_from_final",
        )
    }
    for p in sorted(passes, key=lambda p: (p.doc, p.step)):
        for row, layer in enumerate(layers):
            ids = p.lens["top_ids"][row].tolist()
            cols["doc"].append(p.doc)
            cols["step"].append(p.step)
            cols["pos"].append(p.pos)
            cols["layer"].append(layer)
            cols["top_ids"].append(ids)
            cols["top_tokens"].append([text_of(t) for t in ids])
            cols["top_logprobs"].append(p.lens["top_logprobs"][row].tolist())
            cols["argmax_logprob"].append(float(p.lens["argmax_logprob"][row]))
            cols["kl_from_final"].append(max(float(p.lens["kl"][row]), 0.0))
    return pa.Table.from_pydict(cols, schema=warehouse.schema.table("logit_lens").arrow_schema())


def _steps_table(steps: list[dict]) -> pa.Table:
    target = warehouse.schema.table("steps").arrow_schema()
    return pa.Table.from_pydict({f.name: [s[f.name] for s in steps] for f in target}, schema=target)


def _device_and_dtype(spec: Scenario, device: str) -> tuple[str, str, str | None]:
    """--device wins over model.device; float16 on the CPU runs in float32 (torch has no fast CPU float16)."""
    device = models.resolve_device(spec.model.device if device == "auto" else device)
    dtype, note = spec.model.dtype, None
    if dtype == "float16" and device == "cpu":
        dtype, note = "float32", "model.dtype float16 runs as float32 on the cpu"
    return device, dtype, note


def run_scenario(
    root: str | Path,
    scenario,
    *,
    run_id: str | None = None,
    device: str = "auto",
    progress: bool = True,
    model: str | None = None,
    loaded=None,
) -> IngestResult:
    """Capture a scenario (a YAML path or a parsed Scenario) as one committed run.

    `model` replaces the scenario's model.id (the same YAML on another model).
    """
    if run_id is not None:
        check_name("run id", run_id)
    spec = scenario if isinstance(scenario, Scenario) else load(scenario)
    if model:
        spec = replace(spec, model=replace(spec.model, id=model))
    device, dtype, note = _device_and_dtype(spec, device)
    request = read_sites(spec.capture.sites, device)
    loaded = loaded or models.load(spec.model.id, device, dtype)
    check_scenario_model(loaded, spec.model.id)
    device = loaded.config["device"]
    clash = [s.text for s in request.specs if s.name in spec.capture.sources or s.name in SOURCE_ALIASES]
    if clash:
        raise BadSpec(
            f"capture.sites {clash[0]!r} reuses a source name; write the alias instead (e.g. {SOURCE_ALIASES.get(request.specs[0].site, 'resid.out')}:topk=20)"
        )
    ready = ready_capture(request, loaded)
    sparse, sparse_capture = ready.resolved, ready.capture
    capture = ScenarioCapture(loaded, spec, device, [sl for sl in sparse_capture.site_layers if sl.encoder is not None])
    chat_template = bool(getattr(loaded.hf_tokenizer, "chat_template", None))

    wh = warehouse.open_or_init(Path(root))
    run_id = run_id or default_run_id(spec.name)
    config = {
        "scenario": spec.to_json(),
        "model": spec.model.id,
        "model_id": loaded.model_id,
        "dtype": dtype,
        "device": device,
        "chat_template": chat_template,
        "sources": list(spec.capture.sources),
        "layers": capture.layers,
        "sites": list(spec.capture.sites),
        "notes": [note] if note else [],
    }
    writer = RunWriter(wh.layout, run_id, config)
    started = time.perf_counter()
    try:
        docs = _run_passes(loaded, spec, capture, chat_template, progress, run_id)
        shard = Shard([(d.ordinal, d.document, [d.window]) for d in docs], len(docs))
        _capture_sparse(loaded, spec, capture, sparse_capture, shard, writer)
        manifest = _commit(loaded, spec, capture, sparse, sparse_capture, writer)
    except BaseException as err:
        # Bad input (a dictionary of the wrong width, a chat template that refuses the messages):
        # nothing was committed; leave no interrupted run behind.
        if isinstance(err, WarehouseError):
            writer.discard()
        writer.close()
        raise
    return IngestResult(
        run_id,
        manifest["rows"],
        sum(p["bytes"] for p in manifest["parts"]),
        len(docs),
        shard.n_tokens,
        time.perf_counter() - started,
        notes=[note] if note else [],
    )


def _run_passes(loaded, spec: Scenario, capture: ScenarioCapture, chat_template: bool, progress: bool, run_id: str):
    """Every forward pass of the scenario (message prefixes, the generation, the references); returns the documents."""
    import torch

    from .hooks import hooks
    from .progress import IngestProgress

    docs: list[CapturedDoc] = []

    def add(text: str, role: str, label=None, **meta) -> CapturedDoc:
        ordinal = len(docs)
        doc = CapturedDoc(
            ordinal,
            Document(_doc_id(role, label, meta), text, spec.name, role, label, meta),
            _window(ordinal, text, loaded.tokenizer, chat_template),
        )
        docs.append(doc)
        return doc

    with (
        IngestProgress(enabled=progress, run_id=run_id) as bar,
        hooks(loaded.model, capture.taps),
        torch.inference_mode(),
    ):
        for index, message in enumerate(spec.messages):
            doc = add(
                _rendered(loaded.hf_tokenizer, spec.messages[: index + 1]),
                "message",
                message_index=index,
                message_role=message.role,
            )
            capture.prefill(doc)
            bar.advance(docs=1, tokens=len(doc.window.ids))
        ends = range(len(spec.messages)) if spec.run_at_each_message else [len(spec.messages) - 1]
        for index in ends:
            prompt_text = _rendered(loaded.hf_tokenizer, spec.messages[: index + 1])
            doc = add(prompt_text, "generated", message_index=index, message_role=spec.messages[index].role)
            generated, stopped = capture.generate(doc.ordinal, doc.window.ids)
            prompt_tokens = len(doc.window.ids)
            doc.window = _generated_window(doc.window, prompt_text, generated[:-1], loaded.tokenizer)
            doc.document.text = prompt_text + loaded.tokenizer.decode(generated)
            doc.document.meta.update(
                prompt_tokens=prompt_tokens,
                generated_text=loaded.tokenizer.decode(generated),
                generated_tokens=len(generated),
                stopped=stopped,
            )
            bar.advance(docs=1, tokens=len(doc.window.ids))
        for reference in spec.references:
            doc = add(
                _rendered(loaded.hf_tokenizer, reference.messages),
                "reference",
                reference.label,
                messages=len(reference.messages),
            )
            capture.prefill(doc)
            bar.advance(docs=1, tokens=len(doc.window.ids))
    return docs


def _capture_sparse(loaded, spec: Scenario, capture: ScenarioCapture, sparse_capture: Capture, shard: Shard, writer):
    """The sparse sites over whole documents (not the message prefixes), one per batch, and no forward
    pass without them; the passes' rows go with them into the run's one shard."""
    import torch

    from .hooks import hooks
    from .writer import ShardWriter

    parts = _vector_parts(capture.passes, capture.vector_keys)
    if capture.steps:
        parts.append(("steps", None, None, _steps_table(capture.steps)))
    if spec.capture.logit_lens:
        parts.append(("logit_lens", None, None, _lens_table(capture.passes, capture.layers, capture.text_of)))
    sparse_batches = [wins for _, d, wins in shard.docs if d.role != "message"] if sparse_capture.site_layers else []
    shard_writer = ShardWriter(writer)
    try:
        with hooks(loaded.model, sparse_capture.taps), torch.inference_mode():
            sparse_capture.shard(shard, sparse_batches, shard_writer, extra_parts=parts)
        shard_writer.close()
    finally:
        shard_writer.stop()


def _commit(loaded, spec: Scenario, capture: ScenarioCapture, sparse: list, sparse_capture: Capture, writer) -> dict:
    """The run-level tables (finalize's per-run steps, as `whq ingest` writes them), then the commit.

    With capture.logit_lens on, the dictionary sites whose features write to the residual stream
    also get the feature logit lens (neuron_logits), as `whq ingest --logit-lens` gives them.
    """
    from .finalize import final_parts, logit_lens_parts

    width = int(loaded.model.get_input_embeddings().weight.shape[1])
    parts = final_parts(
        loaded,
        list(capture.sources.values()) + sparse,
        sparse_capture.site_layers,
        writer,
        logit_lens=False,
        vector_widths={src: width for src in capture.sources},
    )
    if spec.capture.logit_lens:
        parts += logit_lens_parts(loaded, [sl for sl in sparse_capture.site_layers if sl.encoder is not None])
    return writer.commit(parts, writer.started_at)


def _doc_id(role: str, label, meta: dict) -> str:
    if role == "reference":
        return f"reference:{label}"
    return f"{role}:{meta['message_index']:02d}:{meta['message_role']}"

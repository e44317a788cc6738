"""Dictionary files (SAEs, transcoders): their formats read into one canonical layout, torch-free.

A dictionary site (`resid.out[6]+sae=PATH`, see ingest/sites.py) names a path; this
module reads and checks what it holds before the model loads, with numpy, json and a
reader of the safetensors layout only, so a bad file is refused without importing torch.
The encoder that runs the weights inside a hook is ingest/encoder.py.

    format      files                                         architectures
    saelens     cfg.json + sae_weights.safetensors            standard (ReLU), gated, jumprelu, topk,
                                                              batchtopk (as SAELens runs it at inference:
                                                              JumpReLU at the learnt threshold), transcoder,
                                                              jumprelu_transcoder
    sparsify    cfg.json + sae.safetensors (a folder per      topk SAE, topk transcoder (`transcode`),
                hookpoint, e.g. layers.6)                     skip connection (W_skip)
    gemmascope  params.npz                                    jumprelu
    adapter     dict.py[:CHECKPOINT], load(checkpoint, device) returns an object with encode(x) -> latents,
                d_in, d_sae, and optionally decode(latents) (without it quality has no reconstruction terms)

A folder holding one such dictionary per sub-folder (sparsify's `layers.N`, a SAELens
release `blocks.N.hook_resid_post`, `layer_N`) is a per-layer set: the first number in a
sub-folder's name is its layer. Weights are held in one canonical layout: W_enc [d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], threshold [d_sae], W_skip [d_out, d_in].
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from warehouse.errors import BadInput, BadSpec
from warehouse.parts import file_sha256

from .models import adapter_module

SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
SPARSIFY_FILES = ("cfg.json", "sae.safetensors")
GEMMASCOPE_FILE = "params.npz"
SAELENS_ARCHITECTURES = ("standard", "gated", "jumprelu", "topk", "batchtopk", "transcoder", "jumprelu_transcoder")
SAELENS_NORMALISATIONS = ("none", "constant_norm_rescale")
LAYOUTS = (
    "cfg.json + sae_weights.safetensors (SAELens), cfg.json + sae.safetensors (sparsify), params.npz (Gemma Scope), "
    "a folder of those per layer, or dict.py[:CHECKPOINT]"
)


@dataclass
class Dictionary:
    """One dictionary for one layer, its weights in the canonical layout (numpy, on the host)."""

    path: str
    format: str  # saelens | sparsify | gemmascope | adapter
    architecture: str  # relu | gated | jumprelu | topk | ... (as encoded, see `encode`)
    d_in: int
    d_sae: int
    d_out: int
    transcoder: bool = False
    layer: int | None = None  # the layer its own files name, when they do
    hook: str | None = None  # the hook it was trained on, as its files name it
    sha256: str | None = None  # of the weights file
    weights: dict = field(default_factory=dict)
    k: int | None = None
    apply_b_dec_to_input: bool = False
    normalize: str = "none"  # none | constant_norm_rescale (x * sqrt(d_in) / |x|, undone on the reconstruction)
    adapter: object = None  # adapter dictionaries: the object load() returned


@dataclass
class DictionarySet:
    """What a dictionary path holds: one dictionary (key None) or one per layer."""

    path: str
    by_layer: dict  # {layer or None: Dictionary}

    @property
    def first(self) -> Dictionary:
        return next(iter(self.by_layer.values()))

    def describe(self) -> dict:
        d = self.first
        layers = [layer for layer in self.by_layer if layer is not None] or ([d.layer] if d.layer is not None else [])
        hook = (
            d.hook if len(layers) < 2 or d.hook is None else re.sub(r"\d+", "N", d.hook, count=1)
        )  # one per layer: layers.N
        return {
            "path": self.path,
            "format": d.format,
            "architecture": d.architecture,
            "d_in": d.d_in,
            "d_sae": d.d_sae,
            "transcoder": d.transcoder,
            "hook": hook,
            "layers": layers,
            "k": d.k,
        }


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
}


def _safetensors(path: Path) -> tuple[dict, str]:
    """A .safetensors file as numpy arrays (bfloat16, which numpy lacks, widened exactly to float32),
    and the file's sha256, hashed from the same read."""
    try:
        blob = path.read_bytes()
        (size,) = struct.unpack_from("<Q", blob)
        header = json.loads(blob[8 : 8 + size])
        data = memoryview(blob)[8 + size :]
        arrays = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name} has dtype {info['dtype']}")
            start, end = info["data_offsets"]
            array = np.frombuffer(data[start:end], dtype=_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
            arrays[name] = (array.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else array
        return arrays, hashlib.sha256(blob).hexdigest()
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise BadInput(
            f"dictionary weights {path} are not a readable safetensors file ({str(err)[:80]}): check the file"
        ) from None


def _config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadInput(f"dictionary config {path} is not readable JSON ({str(err)[:80]}): check the file") from None
    if not isinstance(cfg, dict):
        raise BadInput(f"dictionary config {path} is not a JSON object: check the file")
    return cfg


def _need(weights: dict, keys, path: Path) -> None:
    missing = [k for k in keys if k not in weights]
    if missing:
        raise BadInput(
            f"dictionary weights {path} lack {', '.join(missing)} (they hold {', '.join(sorted(weights))}): check the file"
        )


def _layer_of(text: str | None) -> int | None:
    match = re.search(r"\d+", text or "")
    return int(match.group()) if match else None


def _float32(weights: dict) -> dict:
    return {k: np.array(v, dtype=np.float32) for k, v in weights.items()}  # a writable copy (torch shares it)


def _saelens(folder: Path) -> Dictionary:
    cfg = _config(folder / "cfg.json")
    path = folder / "sae_weights.safetensors"
    arrays, sha256 = _safetensors(path)
    weights = _float32(arrays)
    architecture = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn_str", "relu")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if architecture == "standard" and activation == "topk":
        architecture = "topk"  # SAELens 5 wrote TopK SAEs as standard + activation_fn_str topk
    elif architecture == "standard" and activation != "relu":
        raise BadInput(
            f"dictionary {folder}: SAELens activation_fn_str {activation!r} is not supported: use relu or topk"
        )
    if architecture not in SAELENS_ARCHITECTURES:
        raise BadInput(
            f"dictionary {folder}: unknown SAELens architecture {architecture!r}: use one of {', '.join(SAELENS_ARCHITECTURES)}"
        )
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in SAELENS_NORMALISATIONS:
        raise BadInput(
            f"dictionary {folder}: SAELens normalize_activations {normalize!r} is not supported: "
            f"use one of {', '.join(SAELENS_NORMALISATIONS)} (or fold it into the weights)"
        )
    if cfg.get("hook_head_index") is not None:
        raise BadInput(
            f"dictionary {folder}: SAELens hook_head_index (one attention head) is not supported: use a dictionary of the whole hook"
        )
    _need(weights, ("W_enc", "W_dec", "b_dec") + (() if architecture == "gated" else ("b_enc",)), path)
    if architecture == "batchtopk":
        # SAELens runs a BatchTopK SAE at inference as JumpReLU at its learnt threshold.
        if "threshold" not in weights:
            _need(weights, ("topk_threshold",), path)
            weights["threshold"] = np.full(
                weights["b_enc"].shape, float(weights.pop("topk_threshold").reshape(-1)[0]), dtype=np.float32
            )
        architecture = "jumprelu"
    transcoder = architecture.endswith("transcoder")
    encoding = {"standard": "relu", "transcoder": "relu", "jumprelu_transcoder": "jumprelu"}.get(
        architecture, architecture
    )
    if encoding == "jumprelu":
        _need(weights, ("threshold",), path)
    if encoding == "gated":
        _need(weights, ("b_gate", "r_mag", "b_mag"), path)
    if encoding == "topk" and not k:
        raise BadInput(f"dictionary {folder}: a SAELens topk SAE needs k in cfg.json: add it")
    if cfg.get("rescale_acts_by_decoder_norm") and "b_enc" in weights:
        # SAELens' TopK / BatchTopK option: pre-activations scaled by each latent's decoder norm (the threshold
        # is in those units) and latents divided by it before decoding. Folded as SAELens' fold_W_dec_norm does.
        norm = np.maximum(np.linalg.norm(weights["W_dec"], axis=1), 1e-8).astype(np.float32)
        weights.update(
            W_enc=weights["W_enc"] * norm, b_enc=weights["b_enc"] * norm, W_dec=weights["W_dec"] / norm[:, None]
        )
    metadata = cfg.get("metadata") or {}
    hook = cfg.get("hook_name") or metadata.get("hook_name")
    layer = cfg.get("hook_layer", _layer_of(hook))
    return _from_weights(
        weights,
        cfg,
        path=str(folder),
        format="saelens",
        architecture=encoding,
        transcoder=transcoder,
        layer=layer,
        hook=hook,
        sha256=sha256,
        k=int(k) if encoding == "topk" else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)) and not transcoder,
        normalize=normalize,
    )


def _sparsify(folder: Path) -> Dictionary:
    cfg = _config(folder / "cfg.json")
    path = folder / "sae.safetensors"
    arrays, sha256 = _safetensors(path)
    raw = _float32(arrays)
    _need(raw, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise BadInput(f"dictionary {folder}: sparsify activation {activation!r} is not supported: use topk")
    if not cfg.get("k"):
        raise BadInput(f"dictionary {folder}: sparsify cfg.json has no k: add it")
    transcoder = bool(cfg.get("transcode", False))
    weights = {
        "W_enc": raw["encoder.weight"].T.copy(),
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
    }
    if "W_skip" in raw:
        weights["W_skip"] = raw["W_skip"]
    return _from_weights(
        weights,
        cfg,
        path=str(folder),
        format="sparsify",
        architecture="topk",
        transcoder=transcoder,
        layer=_layer_of(folder.name),
        hook=folder.name,
        sha256=sha256,
        k=int(cfg["k"]),
        apply_b_dec_to_input=not transcoder,  # sparsify subtracts b_dec from an SAE's input, not a transcoder's
    )


def _gemmascope(path: Path) -> Dictionary:
    try:
        with np.load(path) as npz:
            weights = _float32(dict(npz))
    except (OSError, ValueError) as err:
        raise BadInput(
            f"dictionary weights {path} are not a readable .npz file ({str(err)[:80]}): check the file"
        ) from None
    _need(weights, ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"), path)
    return _from_weights(
        weights,
        {},
        path=str(path),
        format="gemmascope",
        architecture="jumprelu",
        # Gemma Scope's layer_N/width_16k/...
        layer=int(m.group(1)) if (m := re.search(r"layer_(\d+)", str(path))) else None,
        hook=None,
        sha256=file_sha256(path),
    )


def _from_weights(weights: dict, cfg: dict, **fields) -> Dictionary:
    """A file format's dictionary, its widths those of its canonical weights, checked by `_canonical`."""
    return _canonical(
        Dictionary(
            d_in=int(weights["W_enc"].shape[0]),
            d_sae=int(weights["W_enc"].shape[1]),
            d_out=int(weights["W_dec"].shape[1]),
            weights=weights,
            **fields,
        ),
        cfg,
    )


def _canonical(d: Dictionary, cfg: dict) -> Dictionary:
    """Check the shapes agree with each other (and with cfg.json where it gives d_in / d_sae)."""
    w = d.weights
    expected = {
        "W_enc": (d.d_in, d.d_sae),
        "b_enc": (d.d_sae,),
        "W_dec": (d.d_sae, d.d_out),
        "b_dec": (d.d_out,),
        "threshold": (d.d_sae,),
        "b_gate": (d.d_sae,),
        "r_mag": (d.d_sae,),
        "b_mag": (d.d_sae,),
        "W_skip": (d.d_out, d.d_in),
    }
    for key, shape in expected.items():
        if key in w and tuple(w[key].shape) != shape:
            raise BadInput(
                f"dictionary {d.path}: {key} has shape {tuple(w[key].shape)}, expected {shape} "
                f"for d_in={d.d_in}, d_sae={d.d_sae}: check the files"
            )
    for key, value in (("d_in", d.d_in), ("d_sae", d.d_sae)):
        if cfg.get(key) not in (None, value):
            raise BadInput(
                f"dictionary {d.path}: cfg.json says {key}={cfg[key]} but the weights have {key}={value}: check the files"
            )
    if d.apply_b_dec_to_input and d.d_out != d.d_in:
        raise BadInput(f"dictionary {d.path}: apply_b_dec_to_input needs d_out = d_in, got {d.d_out} and {d.d_in}")
    if d.k is not None and not 0 < d.k <= d.d_sae:
        raise BadInput(f"dictionary {d.path}: k={d.k} must be between 1 and d_sae={d.d_sae}")
    return d


def _adapter(text: str) -> Dictionary:
    path_text, _, checkpoint = text.partition(":")
    path = Path(path_text)
    obj = adapter_module(path, "dictionary", "checkpoint").load(checkpoint=checkpoint or None)
    missing = [a for a in ("encode", "d_in", "d_sae") if not hasattr(obj, a)]
    if missing:
        raise BadInput(f"dictionary adapter {path}: the object load() returns has no {', '.join(missing)}: add them")
    return Dictionary(
        path=text,
        format="adapter",
        architecture=getattr(obj, "architecture", "adapter"),
        d_in=int(obj.d_in),
        d_sae=int(obj.d_sae),
        d_out=int(getattr(obj, "d_out", obj.d_in)),
        transcoder=bool(getattr(obj, "transcoder", False)),
        layer=getattr(obj, "layer", None),
        hook=getattr(obj, "hook", None),
        sha256=file_sha256(path),
        adapter=obj,
    )


def _single(path: Path) -> Dictionary | None:
    """The dictionary stored directly at `path` (a folder or a params.npz), or None."""
    if path.is_file() and path.suffix == ".npz":
        return _gemmascope(path)
    if not path.is_dir():
        return None
    if all((path / f).exists() for f in SAELENS_FILES):
        return _saelens(path)
    if all((path / f).exists() for f in SPARSIFY_FILES):
        return _sparsify(path)
    if (path / GEMMASCOPE_FILE).exists():
        return _gemmascope(path / GEMMASCOPE_FILE)
    return None


def load(text: str) -> DictionarySet:
    """Read the dictionary (or the folder of per-layer dictionaries) a SPEC names; errors name the layouts."""
    if text.split(":", 1)[0].endswith(".py"):
        return DictionarySet(text, {None: _adapter(text)})
    path = Path(text).expanduser()
    if not path.exists():
        raise BadInput(f"dictionary {text} does not exist: give a folder or file with {LAYOUTS}")
    single = _single(path)
    if single is not None:
        return DictionarySet(text, {None: single})
    by_layer: dict = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []:
        d = _single(sub)
        if d is None:
            continue
        layer = _layer_of(sub.name)
        if layer is None:
            raise BadInput(f"dictionary folder {text}: sub-folder {sub.name!r} names no layer: name it e.g. layers.6")
        if layer in by_layer:
            raise BadInput(
                f"dictionary folder {text} holds two dictionaries for layer {layer} "
                f"({Path(by_layer[layer].path).name}, {sub.name}): point at one of them"
            )
        d.layer = layer
        by_layer[layer] = d
    if not by_layer:
        raise BadInput(f"dictionary {text} holds no dictionary: expected {LAYOUTS}")
    first = next(iter(by_layer.values()))
    for d in by_layer.values():
        if (d.format, d.d_in, d.d_sae, d.transcoder) != (first.format, first.d_in, first.d_sae, first.transcoder):
            raise BadInput(
                f"dictionary folder {text} mixes dictionaries ({Path(first.path).name}: {first.format} d_in={first.d_in} "
                f"d_sae={first.d_sae}; {Path(d.path).name}: {d.format} d_in={d.d_in} d_sae={d.d_sae}): use one kind per site"
            )
    return DictionarySet(text, dict(sorted(by_layer.items())))


def load_all(specs) -> dict[str, DictionarySet]:
    """{site name: DictionarySet} for the dictionary sites among the SPECs (before the model loads)."""
    return {spec.name: load(spec.dictionary) for spec in specs if spec.dictionary}


def for_layers(dset: DictionarySet, spec_text: str, selector, model_layers: list[int]) -> dict[int, Dictionary]:
    """The dictionary of each layer a site captures, from the SPEC's layer selector and what the path holds."""
    if None in dset.by_layer:
        d = dset.by_layer[None]
        if selector is None:
            if d.layer is None:
                raise BadSpec(
                    f"--site {spec_text!r}: dictionary {dset.path} does not say its layer: give it, e.g. resid.out[6]+sae=PATH"
                )
            layers = [d.layer]
        else:
            layers = model_layers if selector == "*" else list(selector)
        if len(layers) != 1:
            raise BadSpec(
                f"--site {spec_text!r}: one dictionary ({dset.path}) for {len(layers)} layers: select one layer, "
                f"e.g. [{layers[0]}], or give a folder with one dictionary per layer"
            )
        return {layers[0]: d}
    have = list(dset.by_layer)
    layers = have if selector is None else model_layers if selector == "*" else list(selector)
    missing = [layer for layer in layers if layer not in dset.by_layer]
    if missing:
        raise BadSpec(
            f"--site {spec_text!r}: dictionary folder {dset.path} has no dictionary for layer {missing[0]} "
            f"(it has layers {', '.join(map(str, have))}): select those layers"
        )
    return {layer: dset.by_layer[layer] for layer in layers}

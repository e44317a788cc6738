"""Dictionaries (SAEs, transcoders): their file formats, and the encoder that runs inside a hook.

A dictionary site (`resid.out[6]+sae=PATH`, see ingest/sites.py) encodes the hooked
activation on the device and hands the latents to the site's reductions, so latents get
every reduction and exact neuron_stats like neurons do. The files are read with
safetensors, numpy and json only:

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
DENSE_ABOVE = 0.1  # a latent is dense when active on more than this share of tokens
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


class DeviceDictionary:
    """One layer's dictionary on the device: encode inside the hook, and exact quality sums over all tokens.

    The sums never leave the device during the run (no host synchronisation): tokens,
    active latents (L0), per-latent activity (dead / dense), squared error, the target's
    per-dimension sums and sum of squares (for the fraction of variance unexplained), and the
    cosine of reconstruction to target. An SAE's target is its input; a transcoder's is the
    MLP output, which a second hook hands to `target` in the same forward pass.
    """

    def __init__(self, d: Dictionary, device: str, where: str, *, decode: bool = True, dtype: str = "float32"):
        import torch

        self.d, self.device, self.where = d, device, where  # where: "site S layer L", for messages
        # The dictionary runs in `dtype` (the site's encode_dtype); latents and reconstructions leave it as float32.
        self.encode_dtype, self.dtype = dtype, getattr(torch, dtype)
        w = {k: torch.from_numpy(v) for k, v in d.weights.items()}
        if d.architecture == "gated":
            w["W_mag"] = w["W_enc"] * w["r_mag"].exp()
        self.w = {k: v.to(device=device, dtype=self.dtype) for k, v in w.items()}
        # encode_only sites skip the decoder, so the reconstruction sums and --splice.
        self.reconstructs = decode and (d.adapter is None or hasattr(d.adapter, "decode"))
        self.quality: dict = {}
        self.pending = None  # a transcoder's reconstruction and mask, until the MLP output arrives

    # -- encode / decode ---------------------------------------------------------
    def _scale(self, x):
        """constant_norm_rescale's per-token factor sqrt(d_in) / |x| (None without normalisation), in the
        encode dtype but from the float32 norm (a float16 sum of squares overflows at activations near 256)."""
        if self.d.normalize == "none":
            return None
        return (self.d.d_in**0.5 / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(self.dtype)

    def encode(self, x):
        """Latents [..., d_sae] (float32) of x [..., d_in] (float32)."""
        return self._encode_with_active(x)[0]

    def _encode_with_active(self, x):
        """(latents, active): a TopK dictionary's active latents come as (ids, values) [..., k], so the hook
        counts and decodes k latents per token instead of d_sae (on MiniLM with 6,144 latents that was
        two thirds of the hook's time); None for the other architectures."""
        import torch

        d = self.d
        if d.adapter is not None:
            return d.adapter.encode(x).float(), None
        x = x.to(self.dtype)
        if d.architecture != "topk":
            return self._encode(x).float(), None
        values, ids = self._pre(x).topk(d.k, dim=-1)  # the k largest pre-activations, then ReLU
        values = torch.relu(values)
        latents = torch.zeros((*x.shape[:-1], d.d_sae), dtype=torch.float32, device=x.device)
        return latents.scatter_(-1, ids, values.float()), (ids, values)

    def _input(self, x):
        """x as the encoder reads it (in the encode dtype): normalised, less b_dec where the format says so."""
        scale = self._scale(x)
        if scale is not None:
            x = x * scale
        if self.d.apply_b_dec_to_input:
            x = x - self.w["b_dec"]
        return x

    def _pre(self, x):
        return self._input(x) @ self.w["W_enc"] + self.w["b_enc"]

    def _encode(self, x):
        import torch

        d, w = self.d, self.w
        if d.architecture == "gated":
            x = self._input(x)
            active = (x @ w["W_enc"] + w["b_gate"]) > 0
            return active * torch.relu(x @ w["W_mag"] + w["b_mag"])
        pre = self._pre(x)
        if d.architecture == "relu":
            return torch.relu(pre)
        return torch.relu(pre) * (pre > w["threshold"])  # jumprelu

    def decode(self, latents, x, active=None):
        """The reconstruction [..., d_out] (float32) of the latents of input x; `active` (ids, values) of a
        TopK dictionary gathers only those decoder rows."""
        import torch

        d, w = self.d, self.w
        if d.adapter is not None:
            return d.adapter.decode(latents).float()
        x = x.to(self.dtype)
        if active is None:
            out = latents.to(self.dtype) @ w["W_dec"] + w["b_dec"]
        else:
            ids, values = active
            rows = torch.nn.functional.embedding_bag(
                ids.reshape(-1, d.k), w["W_dec"], per_sample_weights=values.reshape(-1, d.k), mode="sum"
            )
            out = rows.reshape(*ids.shape[:-1], -1) + w["b_dec"]
        if "W_skip" in w:
            out = out + x @ w["W_skip"].T
        scale = self._scale(x)
        return (out if scale is None else out / scale).float()

    # -- in the hook ---------------------------------------------------------------
    def _allocate(self) -> None:
        import torch

        dev, d = self.device, self.d
        zeros = lambda *shape, dtype=torch.float64: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        self.quality = {
            "n_tokens": zeros(dtype=torch.int64),
            "l0_sum": zeros(dtype=torch.int64),
            "n_active": zeros(d.d_sae, dtype=torch.int64),
            "sq_error": zeros(),
            "target_sq": zeros(),
            "cosine_sum": zeros(),
            "target_sum": zeros(d.d_out),
            "n_predicted": zeros(dtype=torch.int64),
            "ce_clean": zeros(),
            "ce_spliced": zeros(),
        }

    def check_width(self, x) -> None:
        if x.shape[-1] != self.d.d_in:
            raise BadInput(
                f"{self.where}: the hook gives {x.shape[-1]} units but dictionary {self.d.path} reads d_in={self.d.d_in}: "
                f"use a dictionary trained on this site"
            )

    def __call__(self, x, mask):
        """x [batch, seq, d_in] float32, mask [batch, seq] bool -> latents [batch, seq, d_sae]."""
        import torch

        self.check_width(x)
        if not self.quality:
            self._allocate()
        latents, active = self._encode_with_active(x)
        q, valid = self.quality, mask[..., None]
        q["n_tokens"] += mask.sum()
        if active is None:
            fired = (latents != 0) & valid
            q["l0_sum"] += fired.sum()
            q["n_active"] += fired.sum(dim=(0, 1))
        else:
            ids, values = active
            fired = (values != 0) & valid
            q["l0_sum"] += fired.sum()
            q["n_active"] += torch.bincount(ids[fired], minlength=self.d.d_sae)
        if self.reconstructs:
            recon = self.decode(latents, x, active)
            if self.d.transcoder:
                self.pending = (recon, mask)
            else:
                self._observe(recon, x, mask)
        return latents

    def target(self, y) -> None:
        """A transcoder's target (the MLP output of the same forward pass)."""
        if self.pending is None:
            return
        recon, mask = self.pending
        self.pending = None
        self._observe(recon, y.detach().float(), mask)

    def _observe(self, recon, target, mask) -> None:
        import torch

        if target.shape[-1] != self.d.d_out:
            raise BadInput(
                f"{self.where}: the target gives {target.shape[-1]} units but dictionary {self.d.path} "
                f"reconstructs d_out={self.d.d_out}: use a dictionary trained on this site"
            )
        q, m = self.quality, mask.to(torch.float64)
        q["sq_error"] += ((recon - target).double().square().sum(-1) * m).sum()
        zeroed = target.double() * m[..., None]
        q["target_sum"] += zeroed.sum(dim=(0, 1))
        q["target_sq"] += zeroed.square().sum()
        q["cosine_sum"] += (torch.nn.functional.cosine_similarity(recon, target, dim=-1).double() * m).sum()

    # -- state -------------------------------------------------------------------
    def state_tables(self, key: str) -> dict:
        import pyarrow as pa

        if not self.quality:
            return {}
        q = {k: v.cpu().numpy() for k, v in self.quality.items()}
        scalars = {k: np.full(self.d.d_sae, v.item()) for k, v in q.items() if v.ndim == 0}
        return {
            f"quality.{key}": pa.table({"n_active": q["n_active"].copy(), **scalars}),
            f"quality_out.{key}": pa.table({"target_sum": q["target_sum"].copy()}),
        }

    def restore(self, tables: dict, key: str) -> None:
        if tables.get(f"quality.{key}") is not None:
            self._allocate()
            self.merge(tables, key)

    def merge(self, tables: dict, key: str) -> None:
        """Add the quality sums saved in state tables (another rank's): every one is a sum, so the merge is exact."""
        import torch

        main, out = tables.get(f"quality.{key}"), tables.get(f"quality_out.{key}")
        if main is None:
            return
        for name, target in self.quality.items():
            source = out if name == "target_sum" else main
            column = torch.from_numpy(source.column(name).to_numpy().copy()).to(target.device)
            target += column[0] if target.dim() == 0 else column

    def summary(self) -> dict:
        """The run's quality sums as host numbers (the dictionaries table's columns)."""
        q = {k: v.cpu().numpy() for k, v in self.quality.items()}
        n = int(q["n_tokens"])
        active_rate = q["n_active"] / max(n, 1)
        row = {
            "d_in": self.d.d_in,
            "d_sae": self.d.d_sae,
            "n_tokens": n,
            "l0_sum": int(q["l0_sum"]),
            "n_dead": int((q["n_active"] == 0).sum()),
            "n_dense": int((active_rate > DENSE_ABOVE).sum()),
            "sq_error": None,
            "total_variance": None,
            "cosine_sum": None,
            "d_out": self.d.d_out,
            "n_predicted": None,
            "ce_clean_sum": None,
            "ce_spliced_sum": None,
        }
        if self.reconstructs and n:
            mean = q["target_sum"] / n
            row.update(
                sq_error=float(q["sq_error"]),
                cosine_sum=float(q["cosine_sum"]),
                total_variance=float(q["target_sq"] - n * float(mean @ mean)),
            )
        if int(q["n_predicted"]):
            row.update(
                n_predicted=int(q["n_predicted"]),
                ce_clean_sum=float(q["ce_clean"]),
                ce_spliced_sum=float(q["ce_spliced"]),
            )
        return row

    def splice_hooks(self, modules: dict, module_name: str, hook: str, target_module: str | None) -> list:
        """Hooks that replace the activation with its reconstruction (a transcoder's: the MLP output), for --splice."""

        def recon_of(x):
            xf = x.float()
            return self.decode(self.encode(xf), xf).to(x.dtype)

        if self.d.transcoder:
            seen = {}
            pre = modules[module_name].register_forward_pre_hook(
                lambda m, a, k: seen.__setitem__("x", _first_input(a, k)), with_kwargs=True
            )
            out = modules[target_module].register_forward_hook(
                lambda m, a, o: _replace_output(o, recon_of(seen.pop("x")))
            )
            return [pre, out]
        if hook == "in":
            return [
                modules[module_name].register_forward_pre_hook(
                    lambda m, a, k: _replace_input(a, k, recon_of), with_kwargs=True
                )
            ]
        return [
            modules[module_name].register_forward_hook(lambda m, a, o: _replace_output(o, recon_of(_first_output(o))))
        ]


def _first_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _replace_input(args, kwargs, fn):
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))


def _first_output(output):
    return output if not isinstance(output, (tuple, list)) else output[0]


def _replace_output(output, value):
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


def _next_token_ce(logits, ids, mask):
    """Per-position next-token cross-entropy [B, T-1] (float64) and where it counts (both tokens real)."""
    import torch

    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return ce.double(), mask[:, 1:].bool() & mask[:, :-1].bool()


def splice_losses(model, site_layers: list, ids, mask) -> None:
    """--splice: next-token loss clean, and with each dictionary layer's reconstruction spliced in (one forward each).

    The capture hooks stand aside (ctx None) during these forwards; sums stay on the device.
    """
    layers = [sl for sl in site_layers if sl.encoder is not None and sl.encoder.reconstructs and sl.encoder.quality]
    if not layers:
        return
    for sl in site_layers:
        sl.ctx = None
    modules = dict(model.named_modules())
    clean, valid = _next_token_ce(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    clean_sum, n = (clean * valid).sum(), valid.sum()
    for sl in layers:
        handles = sl.encoder.splice_hooks(modules, sl.module_name, sl.site.hook, sl.target_module)
        try:
            spliced, _ = _next_token_ce(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        finally:
            for handle in handles:
                handle.remove()
        q = sl.encoder.quality
        q["n_predicted"] += n
        q["ce_clean"] += clean_sum
        q["ce_spliced"] += (spliced * valid).sum()


def load_all(specs) -> dict[str, DictionarySet]:
    """{site name: DictionarySet} for the dictionary sites among the SPECs (before the model loads)."""
    return {spec.name: load(spec.dictionary) for spec in specs if spec.dictionary}


def check_encode_dtypes(specs, dictionaries: dict[str, DictionarySet], device: str) -> None:
    """Refuse an encode_dtype the device cannot run, before the model loads: a trial encode (and decode) of each
    such site's dictionary on two random tokens must run and give finite values."""
    import torch

    for spec in specs:
        if not spec.dictionary or spec.encode_dtype == "float32":
            continue
        d = dictionaries[spec.name].first
        if d.adapter is not None:
            raise BadSpec(
                f"--site {spec.text!r}: an adapter dictionary runs in its own dtype: drop encode_dtype={spec.encode_dtype}"
            )
        trial = DeviceDictionary(d, device, f"site {spec.name}", decode=not spec.encode_only, dtype=spec.encode_dtype)
        x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, d.d_in)).astype(np.float32)).to(device)
        try:
            with torch.inference_mode():
                latents = trial.encode(x)
                finite = bool(latents.isfinite().all()) and (
                    not trial.reconstructs or bool(trial.decode(latents, x).isfinite().all())
                )
        except (RuntimeError, TypeError, NotImplementedError) as err:
            reason = str(err).splitlines()[0][:100] if str(err) else type(err).__name__
        else:
            reason = None if finite else "a trial encode gave non-finite values"
        if reason:
            raise BadInput(
                f"--site {spec.text!r}: the {device} device cannot run the dictionary in {spec.encode_dtype} "
                f"({reason}): use encode_dtype=float32 (or another device)"
            )


def bind(
    resolved: list, dictionaries: dict[str, DictionarySet], module_names: list[str], aliases: dict
) -> tuple[list, dict]:
    """Each dictionary site's layers and, per (site, layer), its Dictionary, a transcoder's target module (None
    when encode_only) and the site's SiteSpec (its options)."""
    from .sites import TRANSCODER_TARGET, ResolvedSite, glob_regex, layer_of

    out, bound = [], {}
    for r in resolved:
        dset = dictionaries.get(r.name)
        if dset is None:
            out.append(r)
            continue
        spec = r.spec
        if dset.first.transcoder != (spec.kind == "transcoder"):
            right = "transcoder" if dset.first.transcoder else "sae"
            raise BadSpec(
                f"--site {spec.text!r}: dictionary {dset.path} is {'a transcoder' if dset.first.transcoder else 'an SAE'}: "
                f"write +{right}=PATH"
            )
        modules = dict(r.modules)
        per_layer = for_layers(dset, spec.text, spec.layers, list(modules))
        absent = [layer for layer in per_layer if layer not in modules]
        if absent:
            raise BadSpec(
                f"--site {spec.text!r}: this model has no layer {absent[0]} at {r.glob!r} "
                f"(layers {min(modules)}-{max(modules)}): select layers it has"
            )
        targets: dict = {}
        if spec.kind == "transcoder":
            if TRANSCODER_TARGET not in aliases:
                raise BadSpec(
                    f"--site {spec.text!r}: this model has no {TRANSCODER_TARGET} alias (the MLP output a transcoder "
                    f"reconstructs): use +sae="
                )
            pattern = glob_regex(aliases[TRANSCODER_TARGET][0])
            targets = {layer_of(name): name for name in module_names if pattern.match(name)}
        for layer, d in per_layer.items():
            bound[(r.name, layer)] = (d, None if spec.encode_only else targets.get(layer), spec)
        out.append(
            ResolvedSite(spec, r.glob, r.hook, [(layer, modules[layer]) for layer in per_layer], dset.first.d_sae)
        )
    return out, bound


def on_device(binding, device: str, site: str, layer: int) -> tuple:
    """(encoder, target module) for a SiteLayer: (None, None) for a plain site; an encode_only transcoder has no
    target to hook."""
    if binding is None:
        return None, None
    d, target, spec = binding
    where = f"site {site} layer {layer}"
    return DeviceDictionary(d, device, where, decode=not spec.encode_only, dtype=spec.encode_dtype), target


@dataclass
class TargetTap:
    """A transcoder's target hook: the MLP output of the same forward pass, handed to its encoder's quality sums."""

    module_name: str
    encoder: DeviceDictionary
    hook_point: str = "out"

    def __call__(self, x) -> None:
        self.encoder.target(x)


def target_taps(site_layers: list) -> list[TargetTap]:
    return [TargetTap(sl.target_module, sl.encoder) for sl in site_layers if sl.target_module is not None]

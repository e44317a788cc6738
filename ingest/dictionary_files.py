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

Dictionary files are untrusted input: each format's cfg.json fields and tensors are checked
against a declared schema (SAELENS_CFG, SPARSIFY_CFG, ADAPTER_ATTRIBUTES, *_TENSORS), every
read is bounded by the file's real size before anything is allocated, only regular files are
read, and weights must be finite. Each refusal is one BadInput line naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from warehouse.display import terminal_safe
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
        return {  # for a terminal: the text fields come from the files
            "path": terminal_safe(self.path),
            "format": d.format,
            "architecture": terminal_safe(d.architecture),
            "d_in": d.d_in,
            "d_sae": d.d_sae,
            "transcoder": d.transcoder,
            "hook": hook and terminal_safe(hook),
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
SAFETENSORS_HEADER_MOST = 100_000_000  # bytes, as the safetensors library bounds it
CONFIG_MOST = 16 * 2**20  # bytes of a cfg.json (real ones are a few kB)
DEFLATE_MOST_RATIO = 1032  # deflate cannot expand a member more than this: bounds a compressed .npz member
LARGEST = 2**31 - 1  # every width, layer and k fits the warehouse's int32 columns


@dataclass(frozen=True)
class Field:
    """One cfg.json field of a format's declared schema: its JSON type, range and whether it must be there.
    A null field is an absent one (SAELens writes nulls for unset options)."""

    kind: str  # int | str | bool | object
    required: bool = False
    minimum: int = 0  # int fields
    most: int = 256  # int fields: the largest value (LARGEST when 256 is too few); str fields: the longest


_DIMENSION = Field("int", minimum=1, most=LARGEST)
_LAYER = Field("int", minimum=0, most=LARGEST)
_K = Field("int", minimum=1, most=LARGEST)
SAELENS_CFG = {
    "architecture": Field("str"),
    "activation_fn_str": Field("str"),
    "activation_fn_kwargs": Field("object"),
    "k": _K,
    "d_in": _DIMENSION,
    "d_sae": _DIMENSION,
    "d_out": _DIMENSION,
    "normalize_activations": Field("str"),
    "hook_name": Field("str"),
    "hook_layer": _LAYER,
    "hook_head_index": Field("int", most=LARGEST),
    "apply_b_dec_to_input": Field("bool"),
    "rescale_acts_by_decoder_norm": Field("bool"),
    "metadata": Field("object"),
}
SAELENS_ACTIVATION_KWARGS = {"k": _K}
SAELENS_METADATA = {"hook_name": Field("str")}
ADAPTER_ATTRIBUTES = {
    "d_in": Field("int", required=True, minimum=1, most=LARGEST),
    "d_sae": Field("int", required=True, minimum=1, most=LARGEST),
    "d_out": _DIMENSION,
    "architecture": Field("str"),
    "transcoder": Field("bool"),
    "layer": _LAYER,
    "hook": Field("str"),
}
SPARSIFY_CFG = {
    "activation": Field("str"),
    "k": Field("int", required=True, minimum=1, most=LARGEST),
    "d_in": _DIMENSION,
    "num_latents": Field("int", most=LARGEST),  # 0: expansion_factor x d_in
    "expansion_factor": Field("int", most=LARGEST),
    "transcode": Field("bool"),
    "skip_connection": Field("bool"),
    "normalize_decoder": Field("bool"),
    "multi_topk": Field("bool"),
}
# Every tensor a format may hold, by its name in the file: how many dimensions it has. Their widths must agree
# with each other (and with cfg.json), checked on the canonical layout by `_canonical`.
SAELENS_TENSORS = {
    "W_enc": 2,
    "b_enc": 1,
    "W_dec": 2,
    "b_dec": 1,
    "threshold": 1,
    "b_gate": 1,
    "r_mag": 1,
    "b_mag": 1,
    "topk_threshold": None,  # a scalar, written as [] or [1]
}
SPARSIFY_TENSORS = {"encoder.weight": 2, "encoder.bias": 1, "W_dec": 2, "b_dec": 1, "W_skip": 2}
GEMMASCOPE_TENSORS = {"W_enc": 2, "b_enc": 1, "threshold": 1, "W_dec": 2, "b_dec": 1}
_TYPES = {"int": "a whole number", "str": "text", "bool": "true or false", "object": "a JSON object"}


def _checked(cfg: dict, schema: dict, where: str, fix: str = "fix it in cfg.json") -> dict:
    """`cfg` with every field `schema` declares checked for type and range; one line naming the field otherwise."""
    for name, spec in schema.items():
        value = cfg.get(name)
        if value is None:
            if spec.required:
                raise BadInput(f"{where} has no {name}: add it")
            continue
        if spec.kind == "int":
            ok = (
                isinstance(value, numbers.Integral)
                and not isinstance(value, bool)
                and spec.minimum <= value <= spec.most
            )
            want = f"a whole number from {spec.minimum} to {spec.most}"
        elif spec.kind == "str":
            ok = isinstance(value, str) and len(value) <= spec.most
            want = f"text of at most {spec.most} characters"
        elif spec.kind == "bool":
            ok, want = isinstance(value, bool), _TYPES["bool"]
        else:
            ok, want = isinstance(value, dict), _TYPES["object"]
        if not ok:
            shown = terminal_safe(json.dumps(value)[:60]) if _jsonable(value) else type(value).__name__
            raise BadInput(f"{where}: {name} is {shown}, expected {want}: {fix}")
    return cfg


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError, RecursionError):
        return False


def _regular_file(path: Path, what: str) -> int:
    """The size of `path`, a regular file (a FIFO would block the read, a device never ends); one line otherwise."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise BadInput(f"{what} {path} cannot be read ({err.strerror or err}): check the file") from None
    if stat.S_ISDIR(info.st_mode):
        raise BadInput(f"{what} {path} is a folder, not a file: point at the dictionary's files")
    if not stat.S_ISREG(info.st_mode):
        raise BadInput(f"{what} {path} is not a regular file (a pipe or device?): copy the dictionary to a file")
    return info.st_size


def _read(path: Path, what: str, most: int | None = None) -> bytes:
    """The bytes of a regular file (at most `most` of them, else one line)."""
    size = _regular_file(path, what)
    if most is not None and size > most:
        raise BadInput(f"{what} {path} is {size:,} bytes, more than a dictionary's {most:,}: check the file")
    try:
        with open(path, "rb") as f:
            return f.read() if most is None else f.read(most + 1)
    except OSError as err:
        raise BadInput(f"{what} {path} cannot be read ({err.strerror or err}): check the file") from None


def _safetensors(path: Path) -> tuple[dict, str]:
    """A .safetensors file as numpy arrays (bfloat16, which numpy lacks, widened exactly to float32),
    and the file's sha256, hashed from the same read. The header is bounded by the bytes present, and
    every tensor's shape x dtype size must be the bytes its offsets span, before any array is made."""
    blob = _read(path, "dictionary weights")

    def bad(reason: str) -> BadInput:
        return BadInput(f"dictionary weights {path} are not a readable safetensors file ({reason}): check the file")

    if len(blob) < 8:
        raise bad(f"{len(blob)} bytes, shorter than the 8-byte header length")
    (size,) = struct.unpack_from("<Q", blob)
    if size > len(blob) - 8:
        raise bad(f"its header length {size:,} exceeds the {len(blob) - 8:,} bytes present")
    if size > SAFETENSORS_HEADER_MOST:
        raise bad(f"its header of {size:,} bytes is beyond the format's {SAFETENSORS_HEADER_MOST:,}")
    try:
        header = json.loads(blob[8 : 8 + size])
    except (ValueError, RecursionError) as err:
        raise bad(f"its header is not JSON: {terminal_safe(str(err)[:60])}") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    data = memoryview(blob)[8 + size :]
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shown = terminal_safe(name[:60])
        if not isinstance(info, dict):
            raise bad(f"tensor {shown} is described by a {type(info).__name__}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise bad(
                f"tensor {shown} has dtype {terminal_safe(str(dtype)[:20])}, not one of {', '.join(_SAFETENSORS_DTYPES)}"
            )
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_whole(n) and n >= 0 for n in shape)):
            raise bad(f"tensor {shown} has no shape of whole numbers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(n) for n in offsets)):
            raise bad(f"tensor {shown} has no data_offsets [start, end]")
        start, end = offsets
        needed = int(np.prod(shape, dtype=object)) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        if not 0 <= start <= end <= len(data) or end - start != needed:
            raise bad(
                f"tensor {shown} of shape {shape} needs {needed:,} bytes, its offsets span {start:,}..{end:,} "
                f"of the {len(data):,} present"
            )
        array = np.frombuffer(data[start:end], dtype=_SAFETENSORS_DTYPES[dtype]).reshape(shape)
        arrays[name] = (array.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else array
    return arrays, hashlib.sha256(blob).hexdigest()


def _whole(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool)


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npz(path: Path) -> dict:
    """A .npz file's arrays, each member's header read first: its shape x dtype size must be the member's
    size, and a compressed member's size within what deflate can expand its stored bytes to."""
    _regular_file(path, "dictionary weights")

    def bad(reason: str) -> BadInput:
        return BadInput(f"dictionary weights {path} are not a readable .npz file ({reason}): check the file")

    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                shown = terminal_safe(member.filename[:60])
                if not member.filename.endswith(".npy"):
                    raise bad(f"member {shown} is not a .npy array")
                if member.file_size > max(member.compress_size, 1) * DEFLATE_MOST_RATIO or (
                    member.compress_type == zipfile.ZIP_STORED and member.file_size != member.compress_size
                ):
                    raise bad(f"member {shown} claims {member.file_size:,} bytes from {member.compress_size:,} stored")
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in _NPY_HEADERS:
                        raise bad(f"member {shown} is .npy version {version}, not 1.0 or 2.0")
                    shape, fortran, dtype = _NPY_HEADERS[version](f, max_header_size=10_000)
                    if dtype.kind not in "fiu" or dtype.hasobject:
                        raise bad(f"member {shown} holds {dtype}, not numbers")
                    needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if needed > member.file_size:
                        raise bad(
                            f"member {shown} of shape {shape} needs {needed:,} bytes, it holds {member.file_size:,}"
                        )
                    raw = f.read(needed)
                    if len(raw) != needed:
                        raise bad(f"member {shown} ends early")
                    array = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
                arrays[member.filename.removesuffix(".npy")] = array
    except BadInput:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, struct.error) as err:
        raise bad(terminal_safe(str(err)[:80]) or type(err).__name__) from None
    return arrays


def _config(path: Path) -> dict:
    raw = _read(path, "dictionary config", CONFIG_MOST)
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise BadInput(
            f"dictionary config {path} is not readable JSON ({terminal_safe(str(err)[:80])}): check the file"
        ) from None
    if not isinstance(cfg, dict):
        raise BadInput(f"dictionary config {path} is not a JSON object: check the file")
    return cfg


def _need(weights: dict, keys, path: Path) -> None:
    missing = [k for k in keys if k not in weights]
    if missing:
        held = ", ".join(terminal_safe(k[:40]) for k in sorted(weights)[:12])
        raise BadInput(f"dictionary weights {path} lack {', '.join(missing)} (they hold {held}): check the file")


def _layer_of(text: str | None) -> int | None:
    match = re.search(r"\d+", text or "")
    return int(match.group()) if match else None


def _float32(weights: dict, declared: dict, path: Path) -> dict:
    """The tensors `declared` names, as writable float32 copies (torch shares them), each of its declared number
    of dimensions and finite (a NaN weight makes every latent NaN)."""
    out = {}
    for name, ndim in declared.items():
        if name not in weights:
            continue
        array = weights[name]
        if ndim is not None and array.ndim != ndim or ndim is None and array.size != 1:
            want = f"{ndim} dimension(s)" if ndim is not None else "one value"
            raise BadInput(
                f"dictionary weights {path}: {name} has shape {tuple(array.shape)}, expected {want}: check the file"
            )
        with np.errstate(over="ignore"):
            out[name] = np.array(array, dtype=np.float32)
    _finite(out, path)
    return out


def _finite(weights: dict, path) -> None:
    for name, array in weights.items():
        if not np.isfinite(array).all():
            raise BadInput(
                f"dictionary weights {path}: {name} holds non-finite values (NaN or infinity in float32): "
                f"use a dictionary whose weights are finite"
            )


def _saelens(folder: Path) -> Dictionary:
    cfg = _checked(_config(folder / "cfg.json"), SAELENS_CFG, f"dictionary config {folder / 'cfg.json'}")
    metadata = _checked(
        cfg.get("metadata") or {}, SAELENS_METADATA, f"dictionary config {folder / 'cfg.json'} metadata"
    )
    kwargs = _checked(
        cfg.get("activation_fn_kwargs") or {},
        SAELENS_ACTIVATION_KWARGS,
        f"dictionary config {folder / 'cfg.json'} activation_fn_kwargs",
    )
    path = folder / "sae_weights.safetensors"
    arrays, sha256 = _safetensors(path)
    weights = _float32(arrays, SAELENS_TENSORS, path)
    architecture = cfg.get("architecture") or "standard"
    activation = cfg.get("activation_fn_str") or "relu"
    k = cfg.get("k") or kwargs.get("k")
    if architecture == "standard" and activation == "topk":
        architecture = "topk"  # SAELens 5 wrote TopK SAEs as standard + activation_fn_str topk
    elif architecture == "standard" and activation != "relu":
        raise BadInput(
            f"dictionary {folder}: SAELens activation_fn_str {terminal_safe(repr(activation))} is not supported: use relu or topk"
        )
    if architecture not in SAELENS_ARCHITECTURES:
        raise BadInput(
            f"dictionary {folder}: unknown SAELens architecture {terminal_safe(repr(architecture))}: use one of {', '.join(SAELENS_ARCHITECTURES)}"
        )
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in SAELENS_NORMALISATIONS:
        raise BadInput(
            f"dictionary {folder}: SAELens normalize_activations {terminal_safe(repr(normalize))} is not supported: "
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
        with np.errstate(over="ignore"):
            _finite({"exp(r_mag)": np.exp(weights["r_mag"])}, path)  # the encoder scales W_enc by it
    if encoding == "topk" and not k:
        raise BadInput(f"dictionary {folder}: a SAELens topk SAE needs k in cfg.json: add it")
    hook = cfg.get("hook_name") or metadata.get("hook_name")
    layer = cfg.get("hook_layer", _layer_of(hook))
    d = _from_weights(
        weights,
        cfg,
        path=str(folder),
        format="saelens",
        architecture=encoding,
        transcoder=transcoder,
        layer=layer,
        hook=hook,
        sha256=sha256,
        k=k if encoding == "topk" else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)) and not transcoder,
        normalize=normalize,
    )
    if cfg.get("rescale_acts_by_decoder_norm") and "b_enc" in weights:
        # SAELens' TopK / BatchTopK option: pre-activations scaled by each latent's decoder norm (the threshold
        # is in those units) and latents divided by it before decoding. Folded as SAELens' fold_W_dec_norm does,
        # once the shapes are known to agree.
        with np.errstate(over="ignore"):
            norm = np.maximum(np.linalg.norm(weights["W_dec"], axis=1), 1e-8).astype(np.float32)
            weights.update(
                W_enc=weights["W_enc"] * norm, b_enc=weights["b_enc"] * norm, W_dec=weights["W_dec"] / norm[:, None]
            )
        _finite(weights, path)
    return d


def _sparsify(folder: Path) -> Dictionary:
    cfg = _checked(_config(folder / "cfg.json"), SPARSIFY_CFG, f"dictionary config {folder / 'cfg.json'}")
    path = folder / "sae.safetensors"
    arrays, sha256 = _safetensors(path)
    raw = _float32(arrays, SPARSIFY_TENSORS, path)
    _need(raw, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
    activation = cfg.get("activation") or "topk"
    if activation != "topk":
        raise BadInput(
            f"dictionary {folder}: sparsify activation {terminal_safe(repr(activation))} is not supported: use topk"
        )
    transcoder = bool(cfg.get("transcode", False))
    weights = {
        "W_enc": raw["encoder.weight"].T.copy(),
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
    }
    if "W_skip" in raw:
        weights["W_skip"] = raw["W_skip"]
    if cfg.get("num_latents") and cfg["num_latents"] != len(weights["b_enc"]):
        raise BadInput(
            f"dictionary {folder}: cfg.json says num_latents={cfg['num_latents']} but the weights have "
            f"d_sae={len(weights['b_enc'])}: check the files"
        )
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
        k=cfg["k"],
        apply_b_dec_to_input=not transcoder,  # sparsify subtracts b_dec from an SAE's input, not a transcoder's
    )


def _gemmascope(path: Path) -> Dictionary:
    weights = _float32(_npz(path), GEMMASCOPE_TENSORS, path)
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
    """Check the widths are at least 1, the shapes agree with each other (and with cfg.json where it gives
    d_in / d_sae / d_out), and k is within d_sae."""
    w = d.weights
    for key, value in (("d_in", d.d_in), ("d_sae", d.d_sae), ("d_out", d.d_out)):
        if not 1 <= value <= LARGEST:
            raise BadInput(
                f"dictionary {d.path}: its weights give {key}={value}: use a dictionary of at least one unit"
            )
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
    for key, value in (("d_in", d.d_in), ("d_sae", d.d_sae), ("d_out", d.d_out)):
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
    fields = {name: getattr(obj, name, None) for name in ADAPTER_ATTRIBUTES}
    if fields["d_out"] is None:
        fields["d_out"] = fields["d_in"]
    _checked(fields, ADAPTER_ATTRIBUTES, f"dictionary adapter {path}", "fix the object load() returns")
    return Dictionary(
        path=text,
        format="adapter",
        architecture=fields["architecture"] or "adapter",
        d_in=int(fields["d_in"]),
        d_sae=int(fields["d_sae"]),
        d_out=int(fields["d_out"]),
        transcoder=bool(fields["transcoder"]),
        layer=None if fields["layer"] is None else int(fields["layer"]),
        hook=fields["hook"],
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
    try:
        if not path.exists():
            raise BadInput(f"dictionary {text} does not exist: give a folder or file with {LAYOUTS}")
        single = _single(path)
        subs = sorted(p for p in path.iterdir() if p.is_dir()) if single is None and path.is_dir() else []
    except OSError as err:
        raise BadInput(f"dictionary {text} cannot be read ({err.strerror or err}): check the path") from None
    if single is not None:
        return DictionarySet(text, {None: single})
    by_layer: dict = {}
    for sub in subs:
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

"""Tiny dictionaries with random weights, written in each library's exact file layout, and a numpy
reference encoder written from each library's own formulas (not from ingest/dictionary_files.py and ingest/encoder.py).

    SAELens   cfg.json + sae_weights.safetensors: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec;
              jumprelu adds threshold; gated has b_gate, r_mag, b_mag instead of b_enc; a BatchTopK training
              checkpoint holds the scalar topk_threshold; transcoders have W_dec [d_sae, d_out], b_dec [d_out]
    sparsify  <hookpoint>/cfg.json + sae.safetensors: encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in],
              b_dec, optional W_skip [d_in, d_in]
    Gemma Scope params.npz: W_enc, b_enc, threshold, W_dec, b_dec
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normal(rng, *shape, scale=1.0) -> np.ndarray:
    return (rng.normal(size=shape) * scale).astype(np.float32)


def _save_safetensors(path: Path, tensors: dict) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def saelens(
    folder: Path,
    architecture: str = "standard",
    d_in: int = 64,
    d_sae: int = 96,
    *,
    k: int = 5,
    seed: int = 0,
    hook_layer: int | None = 1,
    d_out: int | None = None,
    legacy_topk: bool = False,
    **cfg_extra,
) -> Path:
    """A SAELens SAE folder; returns it. `legacy_topk` writes SAELens 5's standard + activation_fn_str topk."""
    rng = _rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    d_out = d_out or d_in
    w = {
        "W_enc": _normal(rng, d_in, d_sae, scale=0.3),
        "b_enc": _normal(rng, d_sae, scale=0.2),
        "W_dec": _normal(rng, d_sae, d_out, scale=0.1),
        "b_dec": _normal(rng, d_out, scale=0.1),
    }
    cfg = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "hook_name": f"blocks.{hook_layer}.hook_resid_post",
        "hook_layer": hook_layer,
    }
    if architecture in ("jumprelu", "jumprelu_transcoder"):
        w["threshold"] = np.abs(_normal(rng, d_sae, scale=0.3))
    if architecture == "gated":
        del w["b_enc"]
        w.update(
            b_gate=_normal(rng, d_sae, scale=0.2),
            r_mag=_normal(rng, d_sae, scale=0.3),
            b_mag=_normal(rng, d_sae, scale=0.2),
        )
    if architecture == "topk":
        cfg["k"] = k
    if legacy_topk:
        cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": k})
    if architecture == "batchtopk":
        cfg["k"] = k
        w["topk_threshold"] = np.array(0.4, dtype=np.float64)
    if "transcoder" in architecture:
        cfg.update(d_out=d_out, apply_b_dec_to_input=False)
    cfg.update(cfg_extra)
    _save_safetensors(folder / "sae_weights.safetensors", w)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def sparsify(
    folder: Path,
    d_in: int = 64,
    d_sae: int = 96,
    *,
    k: int = 5,
    seed: int = 0,
    transcode: bool = False,
    skip: bool = False,
) -> Path:
    """One sparsify hookpoint folder (name it layers.N); returns it."""
    rng = _rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w = {
        "encoder.weight": _normal(rng, d_sae, d_in, scale=0.3),
        "encoder.bias": _normal(rng, d_sae, scale=0.2),
        "W_dec": _normal(rng, d_sae, d_in, scale=0.1),
        "b_dec": _normal(rng, d_in, scale=0.1),
    }
    if skip:
        w["W_skip"] = _normal(rng, d_in, d_in, scale=0.05)
    _save_safetensors(folder / "sae.safetensors", w)
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": 32,
                "normalize_decoder": True,
                "num_latents": d_sae,
                "k": k,
                "multi_topk": False,
                "skip_connection": skip,
                "transcode": transcode,
                "d_in": d_in,
            }
        )
    )
    return folder


def gemmascope(path: Path, d_in: int = 64, d_sae: int = 96, *, seed: int = 0) -> Path:
    """A Gemma Scope params.npz; returns its path."""
    rng = _rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        W_enc=_normal(rng, d_in, d_sae, scale=0.3),
        b_enc=_normal(rng, d_sae, scale=0.2),
        threshold=np.abs(_normal(rng, d_sae, scale=0.3)),
        W_dec=_normal(rng, d_sae, d_in, scale=0.1),
        b_dec=_normal(rng, d_in, scale=0.1),
    )
    return path


ADAPTER = '''
import torch

class Identity:
    """A dictionary whose latents are the input itself: exact reconstruction."""
    d_in = d_sae = {width}
    architecture = "identity"

    def encode(self, x):
        return x

    def decode(self, latents):
        return latents


class Damaged(Identity):
    def decode(self, latents):
        return latents * 0.5


def load(checkpoint=None):
    return Damaged() if checkpoint == "damaged" else Identity()
'''


def adapter(path: Path, width: int = 64) -> Path:
    path.write_text(ADAPTER.format(width=width))
    return path


# -- the numpy reference ---------------------------------------------------------------------------


def read(folder_or_file: Path) -> tuple[str, dict, dict]:
    """(format, cfg, weights as float64) of a dictionary written above."""
    path = Path(folder_or_file)
    if path.suffix == ".npz":
        with np.load(path) as npz:
            return "gemmascope", {}, {k: npz[k].astype(np.float64) for k in npz.files}
    from safetensors.numpy import load_file

    cfg = json.loads((path / "cfg.json").read_text())
    if (path / "sae.safetensors").exists():
        return "sparsify", cfg, {k: v.astype(np.float64) for k, v in load_file(str(path / "sae.safetensors")).items()}
    return (
        "saelens",
        cfg,
        {k: v.astype(np.float64) for k, v in load_file(str(path / "sae_weights.safetensors")).items()},
    )


def _topk(pre: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1, kind="stable")[..., :k]
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    return out


def encode(path: Path, x: np.ndarray) -> np.ndarray:
    """Latents of x [n, d_in] (float64) as the library that wrote `path` computes them."""
    fmt, cfg, w = read(path)
    x = x.astype(np.float64)
    if fmt == "gemmascope":
        pre = x @ w["W_enc"] + w["b_enc"]
        return (pre > w["threshold"]) * np.maximum(pre, 0)
    if fmt == "sparsify":
        sae_in = x if cfg["transcode"] else x - w["b_dec"]
        return _topk(np.maximum(sae_in @ w["encoder.weight"].T + w["encoder.bias"], 0), cfg["k"])
    arch = cfg["architecture"]
    if cfg.get("normalize_activations") == "constant_norm_rescale":
        x = x * np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True)
    sae_in = x - w["b_dec"] if cfg.get("apply_b_dec_to_input") else x
    if arch == "gated":
        gate = sae_in @ w["W_enc"] + w["b_gate"] > 0
        return gate * np.maximum(sae_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):  # SAELens TopK / BatchTopK: in units of each decoder row's norm
        pre = pre * np.linalg.norm(w["W_dec"], axis=1)
    if arch in ("standard", "transcoder") and cfg.get("activation_fn_str", "relu") == "relu":
        return np.maximum(pre, 0)
    if arch in ("jumprelu", "jumprelu_transcoder"):
        return (pre > w["threshold"]) * np.maximum(pre, 0)
    if arch == "batchtopk":  # at inference: JumpReLU at the learnt threshold
        return (pre > w["topk_threshold"].reshape(-1)[0]) * np.maximum(pre, 0)
    k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
    return _topk(pre, k)


def decode(path: Path, latents: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The reconstruction of input x from its latents."""
    fmt, cfg, w = read(path)
    if cfg.get("rescale_acts_by_decoder_norm"):
        latents = latents / np.linalg.norm(w["W_dec"], axis=1)
    out = latents @ w["W_dec"] + w["b_dec"]
    if fmt == "sparsify" and "W_skip" in w:
        out = out + x @ w["W_skip"].T
    if cfg.get("normalize_activations") == "constant_norm_rescale":
        out = out / (np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True))
    return out

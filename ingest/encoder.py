"""A dictionary on the device: the encoder a dictionary site runs inside its tap, --splice, and binding.

A dictionary site (`resid.out[6]+sae=PATH`, see ingest/sites.py) encodes the hooked
activation on the device and hands the latents to the site's reductions, so latents get
every reduction and exact neuron_stats like neurons do. `bind` matches the dictionaries
read from files (ingest/dictionary_files.py, torch-free) to the model's layers before
the capture starts; `on_device` puts each on the device as a `DeviceDictionary`, which
also keeps the run's quality sums; `splice_losses` measures --splice's next-token loss
with each reconstruction in the activation's place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from warehouse.errors import BadInput, BadSpec

from .dictionary_files import Dictionary, DictionarySet, for_layers

DENSE_ABOVE = 0.1  # a latent is dense when active on more than this share of tokens
# A TopK encoder's pre-activations on the CPU are computed this many bytes a thread at a time: blocks that stay
# in cache for the top-k, yet give each of MKL's threads enough rows (MiniLM, 6,144 latents: 512 rows a thread).
ENCODE_BLOCK_BYTES = 12 << 20


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

    def _encode_with_active(self, x, dense: bool = True):
        """(latents, active): a TopK dictionary's active latents come as (ids, values) [..., k], so the hook
        counts and decodes k latents per token instead of d_sae (on MiniLM with 6,144 latents that was
        two thirds of the hook's time); None for the other architectures. Without `dense`, a TopK
        dictionary's latents are None: the caller reads the active ones alone."""
        import torch

        from . import fused

        d = self.d
        if d.adapter is not None:
            return d.adapter.encode(x).float(), None
        x = x.to(self.dtype)
        if d.architecture != "topk":
            return self._encode(x).float(), None
        if fused.usable(x, d.k) and x.numel():
            # The product in blocks of tokens whose pre-activations stay in cache for the top-k, which adds b_enc
            # on the way: no [tokens, d_sae] tensor goes through memory (MiniLM, 6,144 latents: a 173 ms hook to 146).
            inputs = self._input(x).reshape(-1, d.d_in)
            rows = max(1, ENCODE_BLOCK_BYTES * torch.get_num_threads() // (4 * d.d_sae))
            rows = -(-len(inputs) // -(-len(inputs) // rows))  # blocks of even size: no last block of a few rows
            values, ids = torch.empty(len(inputs), d.k), torch.empty(len(inputs), d.k, dtype=torch.int32)
            for i in range(0, len(inputs), rows):
                block = (values[i : i + rows], ids[i : i + rows])
                fused.topk(inputs[i : i + rows] @ self.w["W_enc"], d.k, self.w["b_enc"], out=block)
            values, ids = values.view(*x.shape[:-1], d.k), ids.view(*x.shape[:-1], d.k)
        else:
            values, ids = self._pre(x).topk(d.k, dim=-1)  # the k largest pre-activations, then ReLU
        values = torch.relu(values)
        if not dense:
            return None, (ids, values)
        latents = torch.zeros((*x.shape[:-1], d.d_sae), dtype=torch.float32, device=x.device)
        return latents.scatter_(-1, ids.long(), values.float()), (ids, values)

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
            raise width_mismatch(self.where, "hook", x.shape[-1], self.d)

    def __call__(self, x, mask, *, dense: bool = True):
        """x [batch, seq, d_in] float32, mask [batch, seq] bool -> (latents [batch, seq, d_sae], active):
        active is a TopK dictionary's (ids, values) [batch, seq, k] (else None), and without `dense` its
        latents are None."""
        import torch

        from . import fused

        self.check_width(x)
        if not self.quality:
            self._allocate()
        latents, active = self._encode_with_active(x, dense)
        q, valid = self.quality, mask[..., None]
        q["n_tokens"] += mask.sum()
        if active is None:
            fired = (latents != 0) & valid
            q["l0_sum"] += fired.sum()
            q["n_active"] += fired.sum(dim=(0, 1))
        elif fused.usable(active[1]) and active[0].dtype == torch.int32:
            fused.active_counts(*active, mask, q)
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
        return latents, active

    def target(self, y) -> None:
        """A transcoder's target (the MLP output of the same forward pass)."""
        if self.pending is None:
            return
        recon, mask = self.pending
        self.pending = None
        self._observe(recon, y.detach().float(), mask)

    def _observe(self, recon, target, mask) -> None:
        import torch

        from . import fused

        if target.shape[-1] != self.d.d_out:
            raise width_mismatch(self.where, "target", target.shape[-1], self.d)
        if fused.usable(recon) and fused.usable(target):
            fused.recon_sums(recon, target, mask, self.quality)
            return
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

    def splice_taps(self, module_name: str, hook: str, target_module: str | None) -> list[SpliceTap]:
        """Taps that put the activation's reconstruction in its place (a transcoder's: in the MLP output's),
        for --splice."""

        def reconstruction(x):
            xf = x.float()
            return self.decode(self.encode(xf), xf).to(x.dtype)

        if self.d.transcoder:
            seen = {}

            def keep_input(x) -> None:
                seen["x"] = x

            return [
                SpliceTap(module_name, "in", keep_input),
                SpliceTap(target_module, "out", lambda _: reconstruction(seen.pop("x"))),
            ]
        return [SpliceTap(module_name, hook, reconstruction)]


@dataclass
class SpliceTap:
    """A --splice tap (see ingest/hooks.py): `replace` returns what the module uses in place of the hooked
    tensor, or None to keep it."""

    module_name: str
    hook_point: str
    replace: Callable

    def __call__(self, x):
        return self.replace(x)


def _next_token_ce(logits, ids, mask):
    """Per-position next-token cross-entropy [B, T-1] (float64) and where it counts (both tokens real)."""
    import torch

    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return ce.double(), mask[:, 1:].bool() & mask[:, :-1].bool()


def splice_losses(model, site_layers: list, ids, mask) -> None:
    """--splice: next-token loss clean, and with each dictionary layer's reconstruction spliced in (one forward each).

    The capture hooks stand aside (ctx None) during these forwards; sums stay on the device.
    """
    from .hooks import hooks

    layers = [sl for sl in site_layers if sl.encoder is not None and sl.encoder.reconstructs and sl.encoder.quality]
    if not layers:
        return
    for sl in site_layers:
        sl.ctx = None
    clean, valid = _next_token_ce(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    clean_sum, n = (clean * valid).sum(), valid.sum()
    for sl in layers:
        with hooks(model, sl.encoder.splice_taps(sl.module_name, sl.hook_point, sl.target_module)):
            spliced, _ = _next_token_ce(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        q = sl.encoder.quality
        q["n_predicted"] += n
        q["ce_clean"] += clean_sum
        q["ce_spliced"] += (spliced * valid).sum()


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


def width_mismatch(where: str, what: str, width: int, d: Dictionary) -> BadInput:
    """The one line for a dictionary whose d_in (what="hook") or d_out (what="target") is not the model's width."""
    reads = f"reads d_in={d.d_in}" if what == "hook" else f"reconstructs d_out={d.d_out}"
    return BadInput(
        f"{where}: the {what} gives {width} units but dictionary {d.path} {reads}: use a dictionary trained on this site"
    )


def check_widths(resolved: list, bound: dict, loaded) -> None:
    """Refuse a bound dictionary whose d_in is not its site's width (or a transcoder's d_out not its target's)
    where the model says the width, before anything is written; the hooks check the others on the first batch."""
    from .limits import site_width

    sites = {r.name: r for r in resolved}
    for (site, layer), (d, target, _) in bound.items():
        where = f"site {site} layer {layer}"
        width = site_width(loaded, dict(sites[site].modules)[layer], sites[site].hook)
        if width is not None and width != d.d_in:
            raise width_mismatch(where, "hook", width, d)
        width = None if target is None else site_width(loaded, target, "out")
        if width is not None and width != d.d_out:
            raise width_mismatch(where, "target", width, d)


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

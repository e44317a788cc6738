"""NAG's neuron deactivation: zero the up_proj rows of the units a target relies on most.

    from ingest.deactivate import deactivate, load_keys
    n = deactivate(model, load_keys("keys.json"))     # keys from `whq nag keys`

Zeroing row n of up_proj (and its bias) makes unit n's up activation 0 for every
input, so the unit contributes nothing downstream (SwiGLU: act(gate) * 0; GELU(0) = 0).
"""

from __future__ import annotations

import json
from pathlib import Path

from warehouse.errors import BadInput


def load_keys(path: str | Path) -> dict:
    """The JSON `whq nag keys` writes."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BadInput(f"cannot read deactivation keys {path}: {err}; write them with `whq nag keys`") from None


def _up_projections(model) -> dict[int, object]:
    """layer -> the layer's up projection module (decoder up_proj or encoder intermediate.dense)."""
    from .sites import family_aliases, parse_spec, resolve

    names = [name for name, _ in model.named_modules() if name]
    _, aliases = family_aliases(names)
    if "mlp.up" not in aliases:
        raise BadInput(
            f"{type(model).__name__} has no up projection whq recognises (mlp.up_proj or intermediate.dense)"
        )
    site = resolve(parse_spec("mlp.up"), names, aliases)
    modules = dict(model.named_modules())
    return {layer: modules[name] for layer, name in site.modules}


def deactivate(model, keys: dict) -> int:
    """Zero the up_proj rows of the keyed units in place; returns how many rows were zeroed.

    keys: `{"layers": {"3": [17, 40], ...}}` as `whq nag keys` saves it, or the bare
    `{layer: [units]}` mapping.
    """
    import torch

    by_layer = keys.get("layers", keys) if isinstance(keys, dict) else None
    if not isinstance(by_layer, dict):
        raise BadInput('deactivation keys must map layers to unit lists, e.g. {"layers": {"3": [17, 40]}}')
    projections = _up_projections(model)
    zeroed = 0
    with torch.no_grad():
        for layer_key, units in by_layer.items():
            layer = int(layer_key)
            if layer not in projections:
                raise BadInput(
                    f"layer {layer} is not a layer of this model (it has {min(projections)}-{max(projections)}): "
                    f"the keys were made for another model"
                )
            linear = projections[layer]
            rows = sorted({int(u) for u in units})
            if rows and (rows[0] < 0 or rows[-1] >= linear.weight.shape[0]):
                raise BadInput(
                    f"unit {rows[-1] if rows[-1] >= 0 else rows[0]} is outside layer {layer}'s "
                    f"{linear.weight.shape[0]} units: the keys were made for another model"
                )
            index = torch.tensor(rows, dtype=torch.long, device=linear.weight.device)
            linear.weight[index] = 0
            if getattr(linear, "bias", None) is not None:
                linear.bias[index] = 0
            zeroed += len(rows)
    return zeroed

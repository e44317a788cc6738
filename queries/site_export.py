"""`whq export site`: the run/site and unit pages of `whq serve` as static files that open from file://."""

from __future__ import annotations

from pathlib import Path

from .page_data import Reader, layer_summary, site_info, unit_data
from .pages import Links, site_page, unit_page, vega_bundle


def write_site(wh, run: str, site: str, out: str | Path, layers: list[int] | None = None) -> dict:
    """The run/site and unit pages as static files under `out` (open index.html from file://)."""
    out = Path(out)
    reader = Reader(wh)
    try:
        info = site_info(reader, run, site, layers)
        layers = info["layers"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "vega.js").write_text(vega_bundle(), encoding="utf-8")
        written = {"pages": 0}
        summary = layer_summary(reader, run, site)
        for index, layer in enumerate(layers):
            # Both names lie in the export's root folder, so their relative links are the same: render once.
            page = site_page(
                reader,
                Links(static_from=f"layer-{layer}.html"),
                run,
                site,
                layer,
                page_size=None,
                layers=layers,
                summary=summary,
            )
            for name in [f"layer-{layer}.html"] + (["index.html"] if index == 0 else []):
                (out / name).write_text(page, encoding="utf-8")
                written["pages"] += 1
            (out / str(layer)).mkdir(exist_ok=True)
            with reader.scope(run, site, layer):
                data = unit_data(reader, info, run, site, layer)
            for unit in range(info["width"]):
                path = f"{layer}/{unit}.html"
                page = unit_page(
                    reader, Links(static_from=path), run, site, layer, unit, layers=layers, data=data[unit]
                )
                (out / path).write_text(page, encoding="utf-8")
                written["pages"] += 1
        written["layers"] = layers
        return written
    finally:
        reader.close()

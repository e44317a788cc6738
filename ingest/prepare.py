"""The one capture set-up of `whq ingest`, scenario runs and `whq bench ingest`: SPECs to a ready Capture.

    sites = read_sites(["mlp.act:topk=20", "resid.out[3]+sae=saes:topk=32"], device)  # before the model loads
    loaded = models.load(...)
    ready = ready_capture(sites, loaded)     # ready.resolved (for the run-level tables), ready.capture

It is two steps because what can be refused without the model (a malformed SPEC, a dictionary
file that does not load, an encode_dtype the device cannot run) must be refused before the
model loads, which can take minutes; everything that needs the model is checked in
`ready_capture`, by ingest/limits.py, before the first forward pass. The three callers differ
only in what they do between the steps and with the capture, so they refuse the same SPECs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import dictionary_files, encoder, limits
from .capture import Capture
from .sites import ResolvedSite, SiteSpec, parse_specs, resolve


@dataclass(frozen=True)
class SiteRequest:
    """The SPECs of one capture, parsed, with their dictionaries read and checked."""

    specs: list[SiteSpec]
    dictionaries: dict  # site name -> dictionary_files.DictionarySet
    splice: bool = False


@dataclass(frozen=True)
class ReadyCapture:
    """A capture whose sites are resolved on the model, bound to their dictionaries and checked."""

    resolved: list[ResolvedSite]
    capture: Capture


def read_sites(texts: Iterable[str], device: str, *, splice: bool = False) -> SiteRequest:
    """Parse the SPECs and read their dictionaries: every refusal that needs no model.

    `device` is the resolved device the model will run on (a trial encode checks each
    encode_dtype there); no SPECs is allowed (a scenario may capture no sparse site).
    """
    texts = list(texts)
    specs = parse_specs(texts) if texts else []
    dictionaries = dictionary_files.load_all(specs)
    limits.check_splice_sites(splice, specs)
    encoder.check_encode_dtypes(specs, dictionaries, device)
    return SiteRequest(specs, dictionaries, splice)


def ready_capture(request: SiteRequest, loaded) -> ReadyCapture:
    """Resolve the SPECs on the loaded model, bind their dictionaries, refuse what the model cannot
    capture (limits.py), and build the Capture on the model's device."""
    device = loaded.config["device"]
    resolved = [resolve(spec, loaded.module_names, loaded.aliases) for spec in request.specs]
    resolved, bound = encoder.bind(resolved, request.dictionaries, loaded.module_names, loaded.aliases)
    encoder.check_widths(resolved, bound, loaded)
    limits.check_reductions(resolved, loaded, device)
    limits.check_similar(loaded, resolved)
    limits.check_splice(request.splice, loaded, request.dictionaries)
    return ReadyCapture(resolved, Capture(loaded, resolved, device, bound, splice=request.splice))

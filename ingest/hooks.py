"""Taps on a model's modules: `hooks()` is the one place whq registers forward hooks.

A tap names a module and a hook point ("in": the module's input, "out": its output) and is
called with that tensor on every forward pass while `hooks()` holds it attached. A tap that
returns a tensor puts it in the place of the one it was given: --splice's taps put a
dictionary's reconstruction in the activation's place (ingest/encoder.py). The capture's taps
(ingest/reductions.py `SiteLayer`, a transcoder's target, a scenario's last token) return
None and only read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch


class Tap(Protocol):
    """What `hooks` attaches: a callable given one module's input ("in") or output ("out") tensor, which
    returns None, or the tensor to use in its place."""

    module_name: str
    hook_point: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None: ...


@contextmanager
def hooks(model, taps: Iterable[Tap]) -> Iterator[None]:
    """Attach each tap to its module for the duration of the block; the hooks are removed however it ends."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for tap in taps:
            module = modules[tap.module_name]
            if tap.hook_point == "in":
                handles.append(
                    module.register_forward_pre_hook(lambda m, a, k, tap=tap: _tap_input(tap, a, k), with_kwargs=True)
                )
            else:
                handles.append(module.register_forward_hook(lambda m, a, o, tap=tap: _tap_output(tap, o)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _input_slot(args: tuple, kwargs: dict) -> int | str:
    """Where a module's hooked input is: its position in args, or its keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return 0
    if "hidden_states" in kwargs:
        return "hidden_states"
    for slot, value in [*enumerate(args), *kwargs.items()]:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return slot
    raise RuntimeError("hooked module got no tensor input")


def _tap_input(tap: Tap, args: tuple, kwargs: dict):
    """A forward pre-hook: the tap reads the input; (args, kwargs) with its replacement, or None to keep them."""
    slot = _input_slot(args, kwargs)
    if isinstance(slot, str):
        new = tap(kwargs[slot])
        return None if new is None else (args, {**kwargs, slot: new})
    new = tap(args[slot])
    return None if new is None else ((*args[:slot], new, *args[slot + 1 :]), kwargs)


def _tap_output(tap: Tap, output):
    """A forward hook: the tap reads the output; the output with its replacement, or None to keep it.
    A tuple, list or transformers ModelOutput puts the hidden states first."""
    new = tap(output if isinstance(output, torch.Tensor) else output[0])
    if new is None:
        return None
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new

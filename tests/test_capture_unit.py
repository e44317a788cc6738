"""The shared pieces of every capture: the options object and the hooks context manager."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch

from ingest.hooks import hooks
from ingest.options import IngestOptions
from warehouse.errors import BadInput


def test_stored_run_config_reads_back_into_the_same_options():
    options = IngestOptions(
        "config:llama-tiny",
        ["docs.jsonl"],
        ["mlp.act:topk=3"],
        run_id="r",
        batch_size=4,
        device="cpu",
        dtype="bfloat16",
        shard_tokens=400,
        skip_bad=True,
        progress=False,
    )
    stored = options.run_config(model_id="llama-tiny", sites=list(options.sites), data_identity=[], max_length=32)
    assert {"run_id", "device", "progress", "rank"}.isdisjoint(stored)
    again = IngestOptions.from_run_config(stored, data=options.data, run_id="r", device="cpu", progress=False)
    assert again == replace(options, max_length=32)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dtype="xyz"), "unknown --dtype 'xyz': use one of float32, bfloat16, float16"),
        (dict(device="tpu"), "unknown --device 'tpu': use auto, cpu, cuda or cuda:N"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
    ],
)
def test_fixed_choices_are_checked_when_the_options_are_made(change, message):
    with pytest.raises(BadInput) as err:
        IngestOptions(**change)
    assert str(err.value) == message
    assert IngestOptions(device="cuda:1").device == "cuda:1"


@dataclass
class _Recorder:
    module_name: str
    hook_point: str
    seen: list = field(default_factory=list)
    fail: bool = False

    def __call__(self, x) -> None:
        self.seen.append(x.clone())
        if self.fail:
            raise RuntimeError("hook failed")


def test_hooks_see_input_and_output_and_are_always_removed():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x = torch.ones(1, 3)
    taps = [_Recorder("0", "in"), _Recorder("0", "out")]
    with hooks(model, taps):
        y = model(x)
    torch.testing.assert_close(taps[0].seen[0], x)
    torch.testing.assert_close(taps[1].seen[0], y)
    failing = _Recorder("0", "out", fail=True)
    with pytest.raises(RuntimeError, match="hook failed"), hooks(model, [failing]):
        model(x)
    model(x)
    assert len(failing.seen) == 1 and len(taps[1].seen) == 1, "no hook outlives its block"


@dataclass
class _Doubler:
    """A tap that returns a tensor: the module gets twice what it was given (as --splice's taps replace)."""

    module_name: str
    hook_point: str

    def __call__(self, x):
        return x * 2


class _Block(torch.nn.Module):
    """Hidden states by position or by keyword, a tuple out, as transformers' layers have them."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, hidden_states, scale=1.0):
        return self.linear(hidden_states) * scale, "extra"


def test_a_tap_that_returns_a_tensor_replaces_what_it_was_given():
    block, x = _Block(), torch.randn(2, 3)
    with torch.no_grad():
        doubled_in, doubled_out = block.linear(x * 2), block.linear(x) * 2
        for tap, call, expected in [
            (_Doubler("", "in"), lambda: block(x, 1.0), doubled_in),
            (_Doubler("", "in"), lambda: block(hidden_states=x, scale=1.0), doubled_in),
            (_Doubler("", "out"), lambda: block(x), doubled_out),
            (_Doubler("linear", "out"), lambda: block(x), doubled_out),
        ]:
            with hooks(block, [tap]):
                out = call()
            torch.testing.assert_close(out[0], expected)
            assert out[1] == "extra"
        torch.testing.assert_close(block(x)[0], block.linear(x), msg="no replacement outlives its block")

"""One capture set-up (ingest/prepare.py): `whq ingest`, scenario runs and `whq bench ingest` refuse the same SPECs.

Each SPEC below is refused only once the model is loaded (its site, its K, its memory, its
output directions); the three callers must refuse it with the same line. A caller that
builds its capture some other way (the benchmark once skipped the similar=K check and
timed a capture that ingest refuses) fails here.
"""

from __future__ import annotations

import pytest

from warehouse.errors import WarehouseError

from .scenario_yaml import scenario_dict, write_yaml

MODEL_REFUSED = [
    "attn.q:topk=3,similar=2",  # similar=K needs output directions: MLP unit sites only
    "mlp.act:topk=100000",  # more than the site's units
    "mlp.act:topk=3,examples=1000000000000",  # more examples than memory holds
    "mlp.nope:topk=3",  # no such site alias on this model
]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from ingest.models import tiny_causal_lm_dir

    return str(tiny_causal_lm_dir(tmp_path_factory.mktemp("models") / "tiny-qwen3"))


def _refusal(call) -> str:
    with pytest.raises(WarehouseError) as refused:
        call()
    return str(refused.value)


@pytest.mark.parametrize("spec", MODEL_REFUSED)
def test_ingest_scenario_and_bench_refuse_the_same_specs(spec, lm_dir, tmp_path):
    from ingest.bench import bench_ingest
    from ingest.chat import run_scenario
    from ingest.options import IngestOptions
    from ingest.pipeline import ingest
    from ingest.sources import Document

    options = IngestOptions(lm_dir, sites=(spec,), device="cpu", progress=False)
    by_ingest = _refusal(lambda: ingest(tmp_path / "wh", options, documents=[Document("a", "Hello there.")]))
    scenario = scenario_dict(lm_dir)
    scenario["capture"]["sites"] = [spec]
    path = write_yaml(tmp_path / "s.yaml", scenario)
    by_scenario = _refusal(lambda: run_scenario(tmp_path / "wh", path, device="cpu", progress=False))
    by_bench = _refusal(
        lambda: bench_ingest(
            lm_dir, device="cpu", sites=[spec], batch_size=1, seq_len=8, shard_tokens=8, repeats=1, root=tmp_path
        )
    )
    assert spec in by_ingest or "mlp.nope" in by_ingest, by_ingest
    assert by_scenario == by_ingest
    assert by_bench == by_ingest
    # The versus configuration goes through the same set-up.
    by_versus = _refusal(
        lambda: bench_ingest(
            lm_dir,
            device="cpu",
            sites=["mlp.act:topk=3"],
            versus=[spec],
            batch_size=1,
            seq_len=8,
            shard_tokens=8,
            repeats=1,
            root=tmp_path,
        )
    )
    assert by_versus == by_ingest

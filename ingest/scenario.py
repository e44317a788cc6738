"""Activation Lab scenario YAML -> checked dataclasses (torch-free).

The format is Activation Lab's (`name`, `model`, `prompt`, `generation`, `capture`,
`output`, `reference_states`) with whq's additions under `capture`: `sources` (which
residual-stream sources get last-token vectors), `sites` (sparse SPECs over the whole
conversation, as for `whq ingest --site`, dictionary sites included) and `logit_lens`
(top-k tokens kept per layer, 0 = off). Every problem is one BadInput line naming the key
and the fix.
"""

from __future__ import annotations

import difflib
import math
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from warehouse.errors import BadInput
from warehouse.schema import SCENARIO_SOURCES

ROLES = ("system", "user", "assistant")
# Activation Lab calls the MLP output `mlp_down_out`.
SOURCE_SYNONYMS = {"mlp_down_out": "mlp_out"}
MODEL_DTYPES = ("float16", "bfloat16", "float32")
STORE_DTYPES = ("float16", "bfloat16", "float32")
MODEL_DEVICES = ("auto", "cpu", "cuda", "mps")
SEED_MAX = 2**64 - 1  # the largest seed torch.manual_seed takes


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ModelConfig:
    id: str
    dtype: str = "float16"
    device: str = "auto"
    trust_remote_code: bool = False
    gguf_file: str | None = None


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 42


@dataclass(frozen=True)
class CaptureConfig:
    hidden_states: bool = True
    attention_weights: bool = True
    qkv: bool = True
    mlp: bool = True
    logits: bool = True
    top_k_probs: int = 20
    layers: tuple[int, ...] | None = None  # None: all layers
    store_dtype: str = "float16"
    sources: tuple[str, ...] = SCENARIO_SOURCES
    sites: tuple[str, ...] = ()
    logit_lens: int = 10


@dataclass(frozen=True)
class ReferenceState:
    label: str
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Scenario:
    name: str
    model: ModelConfig
    messages: tuple[Message, ...]
    run_at_each_message: bool = False
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    references: tuple[ReferenceState, ...] = ()

    def to_json(self) -> dict:
        """The scenario with all defaults expanded (stored in runs.config)."""
        return asdict(self)


class _Reader:
    """Typed access to one YAML mapping, with error messages that name the key path."""

    def __init__(self, where: str, path: str, data, known: tuple[str, ...]):
        self.where, self.path = where, path
        if not isinstance(data, dict):
            self.fail(f"{path or 'the file'} must be a mapping of keys, got {type(data).__name__}")
        unknown = [k for k in data if k not in known]
        if unknown:
            hint = difflib.get_close_matches(str(unknown[0]), known, n=1)
            suggestion = f"did you mean {hint[0]!r}? " if hint else ""
            self.fail(f"unknown key {self.key(unknown[0])!r}: {suggestion}known keys: {', '.join(known)}")
        self.data = data

    def key(self, name) -> str:
        return f"{self.path}.{name}" if self.path else str(name)

    def fail(self, message: str):
        raise BadInput(f"{self.where}: {message}")

    def get(self, name, default=None, *, required: bool = False):
        if name not in self.data or self.data[name] is None:
            if required:
                self.fail(f"missing {self.key(name)!r}: add it (see examples/scenarios/)")
            return default
        return self.data[name]

    def text(self, name, default=None, *, required=False) -> str | None:
        value = self.get(name, default, required=required)
        if value is not None and not isinstance(value, str):
            self.fail(f"{self.key(name)} must be text, got {value!r}")
        return value

    def boolean(self, name, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            self.fail(f"{self.key(name)} must be true or false, got {value!r}")
        return value

    def integer(
        self, name, default, *, minimum: int | None = None, maximum: int | None = None, optional=False
    ) -> int | None:
        value = self.get(name, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{self.key(name)} must be a whole number, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(f"{self.key(name)} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(f"{self.key(name)} must be at most {maximum}, got {value}")
        return value

    def number(self, name, default, *, optional=False) -> float | None:
        value = self.get(name, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"{self.key(name)} must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # a whole number beyond any float
            number = math.inf
        if not math.isfinite(number):  # also YAML's .nan and .inf
            self.fail(f"{self.key(name)} must be a finite number, got {value!r}")
        return number

    def choice(self, name, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(name, default)
        if value not in choices:
            self.fail(f"{self.key(name)} is {value!r}: use one of {', '.join(choices)}")
        return value


def _safe_name(reader: _Reader, key: str, value: str | None) -> str:
    if not value or any(c in value for c in "/\\ \t\n"):
        reader.fail(
            f"{reader.key(key)} {value!r} must be non-empty with no spaces or slashes (it names files and rows): e.g. {str(value or 'joy').replace('/', '_').replace(' ', '_')!r}"
        )
    return value


def _messages(where: str, path: str, data) -> tuple[Message, ...]:
    if not isinstance(data, list) or not data:
        raise BadInput(f"{where}: {path} must be a non-empty list of {{role, content}} messages")
    out = []
    for index, item in enumerate(data):
        reader = _Reader(where, f"{path}[{index}]", item, ("role", "content"))
        role = reader.text("role", required=True)
        if role not in ROLES:
            reader.fail(f"{reader.key('role')} {role!r} is not a chat role: use one of {', '.join(ROLES)}")
        out.append(Message(role, reader.text("content", required=True)))
    return tuple(out)


def _model(where: str, data) -> ModelConfig:
    if isinstance(data, str):
        data = {"id": data}
    reader = _Reader(where, "model", data, ("id", "dtype", "device", "trust_remote_code", "gguf_file"))
    config = ModelConfig(
        id=reader.text("id", required=True),
        dtype=reader.choice("dtype", "float16", MODEL_DTYPES),
        device=reader.text("device", "auto"),
        trust_remote_code=reader.boolean("trust_remote_code", False),
        gguf_file=reader.text("gguf_file"),
    )
    if config.device.split(":")[0] not in MODEL_DEVICES:
        reader.fail(f"model.device is {config.device!r}: use one of {', '.join(MODEL_DEVICES)} (or cuda:N)")
    if config.trust_remote_code:
        reader.fail(
            "model.trust_remote_code: true is not supported (whq loads transformers' own architectures offline): set it to false"
        )
    if config.gguf_file:
        reader.fail("model.gguf_file is not supported: point model.id at a folder of safetensors weights")
    return config


def _prompt(where: str, data) -> tuple[tuple[Message, ...], bool]:
    if isinstance(data, list):
        if len(data) != 1:
            raise BadInput(
                f"{where}: prompt lists {len(data)} prompts; whq captures one prompt per scenario: split them into one file each"
            )
        data = data[0]
    reader = _Reader(where, "prompt", data, ("messages", "run_at_each_message"))
    return _messages(where, "prompt.messages", reader.get("messages", required=True)), reader.boolean(
        "run_at_each_message", False
    )


def _generation(where: str, data) -> GenerationConfig:
    reader = _Reader(
        where, "generation", data or {}, ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed")
    )
    config = GenerationConfig(
        max_new_tokens=reader.integer("max_new_tokens", 8, minimum=1),
        do_sample=reader.boolean("do_sample", False),
        temperature=reader.number("temperature", 1.0),
        top_k=reader.integer("top_k", None, minimum=1, optional=True),
        top_p=reader.number("top_p", None, optional=True),
        seed=reader.integer("seed", 42, minimum=0, maximum=SEED_MAX),
    )
    if config.temperature < 0 or (config.do_sample and config.temperature == 0):
        reader.fail(
            f"generation.temperature {config.temperature:g} must be > 0 when do_sample is true (and never negative); use do_sample: false for greedy decoding"
        )
    if config.top_p is not None and not 0 < config.top_p <= 1:
        reader.fail(f"generation.top_p {config.top_p:g} must be in (0, 1], or null to disable it")
    return config


def _layers(reader: _Reader):
    value = reader.get("layers", "all")
    if value == "all":
        return None
    if (
        not isinstance(value, list)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)
    ):
        reader.fail(f"capture.layers must be 'all' or a non-empty list of layer indices (0, 1, ...), got {value!r}")
    return tuple(sorted(set(value)))


def _sources(reader: _Reader, hidden_states: bool, qkv: bool, mlp: bool) -> tuple[str, ...]:
    value = reader.get("sources")
    if value is None:
        # Activation Lab's flags decide which residual-stream sources exist.
        flags = {"hidden_in": hidden_states, "hidden_out": hidden_states, "attn_out": qkv, "mlp_out": mlp}
        return tuple(s for s in SCENARIO_SOURCES if flags[s])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        reader.fail(f"capture.sources must be a list drawn from {', '.join(SCENARIO_SOURCES)}")
    out = []
    for item in value:
        source = SOURCE_SYNONYMS.get(item, item)
        if source not in SCENARIO_SOURCES:
            reader.fail(f"capture.sources has {item!r}: use {', '.join(SCENARIO_SOURCES)}")
        if source not in out:
            out.append(source)
    return tuple(s for s in SCENARIO_SOURCES if s in out)


def _capture(where: str, data) -> CaptureConfig:
    reader = _Reader(
        where,
        "capture",
        data or {},
        (
            "hidden_states",
            "attention_weights",
            "qkv",
            "mlp",
            "logits",
            "top_k_probs",
            "layers",
            "store_dtype",
            "sources",
            "sites",
            "logit_lens",
        ),
    )
    hidden_states, qkv, mlp = (
        reader.boolean("hidden_states", True),
        reader.boolean("qkv", True),
        reader.boolean("mlp", True),
    )
    sites = reader.get("sites", [])
    if isinstance(sites, str):
        sites = [sites]
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        reader.fail("capture.sites must be a list of SPECs such as 'mlp.act:topk=20'")
    from .sites import parse_specs

    if sites:
        parse_specs(sites)  # a bad SPEC, or two with one name, is refused before any model loads
    return CaptureConfig(
        hidden_states=hidden_states,
        attention_weights=reader.boolean("attention_weights", True),
        qkv=qkv,
        mlp=mlp,
        logits=reader.boolean("logits", True),
        top_k_probs=reader.integer("top_k_probs", 20, minimum=0),
        layers=_layers(reader),
        store_dtype=reader.choice("store_dtype", "float16", STORE_DTYPES),
        sources=_sources(reader, hidden_states, qkv, mlp),
        sites=tuple(sites),
        logit_lens=reader.integer("logit_lens", 10, minimum=0),
    )


def _references(where: str, data) -> tuple[ReferenceState, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise BadInput(f"{where}: reference_states must be a list of {{label, messages}}")
    out, seen = [], set()
    for index, item in enumerate(data):
        reader = _Reader(where, f"reference_states[{index}]", item, ("label", "messages"))
        label = reader.get("label")
        if label is None:
            reader.fail(f"reference_states[{index}] has no label: add `label: <name>` (no spaces or slashes)")
        label = _safe_name(reader, "label", str(label))
        if label in seen:
            reader.fail(f"reference label {label!r} is used twice: labels must be unique")
        seen.add(label)
        out.append(
            ReferenceState(
                label, _messages(where, f"reference_states[{index}].messages", reader.get("messages", required=True))
            )
        )
    return tuple(out)


def parse(data, where: str = "scenario") -> Scenario:
    """A scenario from its parsed YAML mapping; `where` names it in error messages."""
    reader = _Reader(
        where, "", data, ("name", "model", "prompt", "generation", "capture", "output", "reference_states")
    )
    name = _safe_name(reader, "name", reader.text("name", required=True))
    messages, each = _prompt(where, reader.get("prompt", required=True))
    _Reader(where, "output", reader.get("output", {}), ("dir", "format"))  # accepted: the warehouse is the output
    return Scenario(
        name=name,
        model=_model(where, reader.get("model", required=True)),
        messages=messages,
        run_at_each_message=each,
        generation=_generation(where, reader.get("generation")),
        capture=_capture(where, reader.get("capture")),
        references=_references(where, reader.get("reference_states")),
    )


def load(path: str | Path) -> Scenario:
    """Read and check a scenario YAML file."""
    import yaml

    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise BadInput(f"scenario file {path} does not exist: give the path of a scenario .yaml") from None
    except OSError as err:  # a symlink loop, a path through a file
        raise BadInput(f"scenario file {path} cannot be opened ({err.strerror or err}): check the path") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadInput(f"scenario file {path} is not a regular file: give the path of a scenario .yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())  # YAML messages span lines
        raise BadInput(f"{path}: not valid YAML{where} ({problem}): fix the syntax") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text: save the scenario as UTF-8") from None
    except RecursionError:
        raise BadInput(f"{path}: YAML nested too deeply to read: flatten it") from None
    except ValueError as err:  # a value YAML types but cannot build, e.g. the date 2001-13-01
        raise BadInput(f"{path}: a value YAML cannot read ({err}): quote it as text or fix it") from None
    except OSError as err:
        raise BadInput(f"cannot read scenario file {path} ({err.strerror or err}): check its permissions") from None
    if _has_surrogate(data):
        raise BadInput(f"{path}: text with a lone surrogate escape (e.g. \\ud800) is not valid Unicode: remove it")
    return parse(data, str(path))


def _has_surrogate(data) -> bool:
    """Whether any text in the parsed YAML is not encodable (it would fail when stored).

    Iterative, visiting each container once: YAML anchors can make a structure contain itself.
    """
    pending, seen = [data], set()
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(value, (dict, list)) and id(value) not in seen:
            seen.add(id(value))
            pending.extend([*value.keys(), *value.values()] if isinstance(value, dict) else value)
    return False

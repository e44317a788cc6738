"""Sites: where to hook (an alias or a module glob, input or output) and what to keep.

One --site SPEC each. The grammar is `spec_grammar()`, built from REDUCTIONS, DICTIONARY_KINDS and
DICTIONARY_OPTIONS below, so the CLI help (`spec_help()`), docs/sites.md and the READMEs that print it
are generated from this module and cannot say something else.

Examples: `mlp.act:topk=20`, `mlp.up:nag=20`, `resid.out:last,mean`,
`encoder.layer.*.output.dense@in:threshold=0`, `resid.out[6]+sae=saes/layers.6:topk=32,examples=20`,
`mlp.in[*]+transcoder=transcoders:threshold=0,nag=20`, `resid.out[3]+sae.wide=big:topk=32,encode_only`.
A dictionary site is named KIND.SITE (`sae.resid.out`), or KIND.NAME.SITE (`sae.wide.resid.out`), and
its units are the dictionary's latents. Every site also gets exact neuron_stats; a unit "fires" when
its value > the site's threshold (default 0).
This module is torch-free so SPECs can be validated before a model loads.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field

from warehouse.errors import BadSpec
from warehouse.names import check_name
from warehouse.ranges import LAYER_CEILING

REDUCTIONS = {
    # name: (argument type, default, "the table it fills: what it keeps"); the text is the documentation.
    "topk": (int, 20, "token_neurons: the K largest values of every token"),
    "abstopk": (int, 20, "token_neurons: the K largest |values| of every token (the signed values are stored)"),
    "threshold": (float, 0.0, "token_neurons: every value > T; T is also the site's firing threshold"),
    "nag": (
        int,
        20,
        "doc_neurons: per document and layer the K units of highest mean |value| over its tokens (NAG), "
        "ties to the lower unit",
    ),
    "examples": (
        int,
        20,
        "neuron_examples: per unit, over all tokens of the run, up to N firing tokens of largest value (kind top), "
        "up to N tokens of most negative value, values < 0 only (kind bottom), a uniform sample of up to N "
        "firing tokens (kind random) and a uniform sample of up to N 71-token windows where the unit never fires "
        "(kind nonfiring); ties go to the first token in document order, each example keeps the "
        "unit's own values from 50 tokens before to 20 after it (window_values), and the site keeps hist",
    ),
    "hist": (
        None,
        None,
        "unit_histograms: per unit exact counts of its values on a fixed quarter-octave grid (kept with examples=N "
        "unless nohist is given, so every unit page has its chart)",
    ),
    "nohist": (None, None, "unit_histograms: none, with examples=N (which keeps hist unless told not to)"),
    "quantiles": (
        int,
        10,
        "neuron_examples: with examples=N (and its hist), also up to N firing tokens sampled uniformly from each of "
        "Q bins of the unit's values (kind quantile; bins are whole histogram bins), with their window values",
    ),
    "similar": (
        int,
        10,
        "unit_neighbors: per MLP unit the K units of its layer with the closest output direction (W_down columns)",
    ),
    "last": (None, None, "vectors: the document's last-token vector"),
    "mean": (None, None, "vectors: the mean vector over the document's tokens"),
    "dense": (None, None, "vectors: every token's vector (large; opt-in)"),
}
# The letter each reduction's argument goes by in the grammar and the documentation.
ARGUMENT_NAMES = {
    "topk": "K",
    "abstopk": "K",
    "threshold": "T",
    "nag": "K",
    "examples": "N",
    "quantiles": "Q",
    "similar": "K",
}

# Aliases per architecture family: alias -> (glob relative to the blocks container, hook point).
DECODER_ALIASES = {
    "mlp.up": ("*.mlp.up_proj", "out"),
    "mlp.gate": ("*.mlp.gate_proj", "out"),
    "mlp.act": ("*.mlp.down_proj", "in"),
    "mlp.down": ("*.mlp.down_proj", "out"),
    "attn.q": ("*.self_attn.q_proj", "out"),
    "attn.k": ("*.self_attn.k_proj", "out"),
    "attn.v": ("*.self_attn.v_proj", "out"),
    "attn.o": ("*.self_attn.o_proj", "out"),
    "resid.in": ("*", "in"),
    "resid.out": ("*", "out"),
    "mlp.in": ("*.mlp", "in"),  # the MLP's input, after its norm (what transcoders read)
}
ENCODER_ALIASES = {
    "mlp.up": ("*.intermediate.dense", "out"),
    "mlp.act": ("*.output.dense", "in"),
    "mlp.down": ("*.output.dense", "out"),
    "attn.q": ("*.attention.self.query", "out"),
    "attn.k": ("*.attention.self.key", "out"),
    "attn.v": ("*.attention.self.value", "out"),
    "attn.o": ("*.attention.output.dense", "out"),
    "resid.in": ("*", "in"),
    "resid.out": ("*", "out"),
    "mlp.in": ("*.intermediate", "in"),  # the MLP's input: the attention block's output after its LayerNorm
}
ALIAS_PREFIXES = {"mlp", "attn", "resid"}
# Activation Lab's names for the residual-stream sources.
SOURCE_ALIASES = {"hidden_in": "resid.in", "hidden_out": "resid.out", "attn_out": "attn.o", "mlp_out": "mlp.down"}
DICTIONARY_KINDS = ("sae", "transcoder")
# Options of a dictionary site, written among its reductions: name -> what it does.
DICTIONARY_OPTIONS = {
    "encode_only": "run the encoder only: no decoder, so no reconstruction quality and no --splice",
    "encode_dtype": "the dtype the dictionary runs in on the device (float32 by default)",
}
ENCODE_DTYPES = ("float32", "bfloat16", "float16")
TRANSCODER_TARGET = "mlp.down"  # a transcoder reads mlp.in and reconstructs the MLP's output


def reduction_syntax(name: str) -> str:
    """How a reduction is written in a SPEC: `topk[=K]`, or `hist` for one without an argument."""
    return f"{name}[={ARGUMENT_NAMES[name]}]" if REDUCTIONS[name][0] is not None else name


def spec_grammar() -> str:
    """The SPEC grammar, one rule a line (the docstring's, the CLI's and the documents' one source)."""
    reductions = [reduction_syntax(name) for name in REDUCTIONS]
    lines, line = [], "REDUCTION  := "
    for i, item in enumerate(reductions):
        piece = item if i == 0 else f" | {item}"
        if len(line) + len(piece) > 92:
            lines.append(line)
            line = "            " + piece.lstrip()
        else:
            line += piece
    lines.append(line)
    kinds = " | ".join(DICTIONARY_KINDS)
    options = " | ".join(
        f"{name}={'|'.join(ENCODE_DTYPES)}" if name == "encode_dtype" else name for name in DICTIONARY_OPTIONS
    )
    return "\n".join(
        [
            'SPEC       := SITE [ "[" LAYERS "]" ] [ "+" KIND [ "." NAME ] "=" PATH ] [ ":" ITEM { "," ITEM } ]',
            'SITE       := ALIAS | MODULE_GLOB [ "@in" | "@out" ]',
            'LAYERS     := "*" | N { "," N } | N "-" M',
            f"KIND       := {kinds}",
            "NAME       := letters, digits, '_' or '-'",
            "PATH       := a dictionary file or folder, a folder of them (one per layer), or dict.py[:CHECKPOINT]",
            "ITEM       := REDUCTION | DICTIONARY_OPTION",
            *lines,
            f"DICTIONARY_OPTION := {options}",
        ]
    )


def spec_help() -> str:
    """The --site help: the grammar on one line, every reduction with its default, and where the rest is."""
    reductions = ", ".join(
        f"{name}={default:g}" if isinstance(default, float) else f"{name}={default}" if default is not None else name
        for name, (_, default, _) in REDUCTIONS.items()
    )
    return (
        "SPEC: SITE[@in|@out][[LAYERS]][+sae|transcoder[.NAME]=PATH][:ITEM,...], e.g. mlp.act:topk=20,examples=20 "
        f"(repeatable). Reductions and their defaults: {reductions}; dictionary options: "
        f"{', '.join(DICTIONARY_OPTIONS)}. What each keeps: docs/sites.md."
    )


@dataclass
class SiteSpec:
    text: str
    site: str  # alias or module glob as written
    hook: str | None  # "in" / "out" when given with @; None for the alias default
    reductions: dict = field(default_factory=dict)
    layers: tuple | str | None = None  # the [LAYERS] selector: a tuple of layers, "*", or None
    kind: str | None = None  # sae | transcoder for a dictionary site
    dictionary: str | None = None  # its PATH as written
    dictionary_name: str | None = None  # the NAME of +KIND.NAME=PATH
    encode_only: bool = False  # a dictionary site without its decoder
    encode_dtype: str = "float32"  # the dtype a dictionary site's encoder runs in

    @property
    def name(self) -> str:
        """Partition-safe site name: the alias, or the glob with unsafe characters replaced; KIND[.NAME].SITE for
        dictionaries."""
        return ".".join(filter(None, (self.kind, self.dictionary_name, self.hooked_name)))

    @property
    def hooked_name(self) -> str:
        """The name of the hooked site alone (portable: site names are folder names)."""
        base = self.site if self.hook is None else f"{self.site}@{self.hook}"
        return re.sub(r"[^A-Za-z0-9_.\-]", "_", base).strip("_.") or "site"

    @property
    def threshold(self) -> float:
        return float(self.reductions.get("threshold", 0.0))

    @property
    def reductions_text(self) -> str:
        return ",".join(
            k if v is None else f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.reductions.items()
        )


def parse_spec(text: str) -> SiteSpec:
    if not isinstance(text, str) or not text.strip():
        raise BadSpec("empty --site SPEC: write e.g. --site mlp.act:topk=20")
    text = text.strip()
    site, _, reds = text.partition(":")
    dict_kind = dictionary = dictionary_name = None
    if "+" in site:
        site, _, binding = text.partition("+")
        dict_kind, _, dictionary = binding.partition("=")
        dict_kind, _, dictionary_name = dict_kind.partition(".")
        dictionary, reds = _dictionary_path(text, dict_kind, dictionary)
        dictionary_name = _dictionary_name(text, dict_kind, dictionary_name)
    site, layers = _layer_selector(text, site)
    hook = None
    if "@" in site:
        site, _, hook = site.partition("@")
        if hook not in ("in", "out"):
            raise BadSpec(f"--site {text!r}: hook point must be @in or @out, not @{hook}")
    if not site or not re.fullmatch(r"[A-Za-z0-9_.*\-\[\]]+", site):
        raise BadSpec(
            f"--site {text!r}: {site!r} is not a site alias or module glob (letters, digits, '.', '_', '-', '*')"
        )
    reductions: dict = {}
    options: dict = {}
    for item in filter(None, (r.strip() for r in reds.split(","))) if reds else []:
        name, eq, arg = item.partition("=")
        name = name.strip()
        if name in DICTIONARY_OPTIONS:
            options[name] = _dictionary_option(text, dict_kind, options, name, arg.strip() if eq else None)
            continue
        if name not in REDUCTIONS:
            known = [*REDUCTIONS, *DICTIONARY_OPTIONS] if dict_kind else list(REDUCTIONS)
            hint = difflib.get_close_matches(name, known, n=1)
            suggestion = f"did you mean {hint[0]!r}? " if hint else ""
            raise BadSpec(f"--site {text!r}: unknown reduction {name!r}; {suggestion}known: {', '.join(known)}")
        kind, default, _ = REDUCTIONS[name]
        if name in reductions:
            raise BadSpec(f"--site {text!r}: reduction {name!r} given twice")
        if kind is None:
            if eq:
                raise BadSpec(f"--site {text!r}: {name!r} takes no argument")
            reductions[name] = None
            continue
        if not eq:
            reductions[name] = default
            continue
        try:
            value = kind(arg)
        except ValueError:
            raise BadSpec(
                f"--site {text!r}: {name}={arg!r} needs a {'whole number' if kind is int else 'number'}"
            ) from None
        if kind is int and value <= 0:
            raise BadSpec(f"--site {text!r}: {name}={value} must be at least 1")
        if kind is float and not math.isfinite(value):
            raise BadSpec(f"--site {text!r}: {name}={arg} must be a finite number (nan and inf fire never or always)")
        reductions[name] = value
    if "topk" in reductions and "abstopk" in reductions:
        raise BadSpec(f"--site {text!r}: use topk or abstopk, not both")
    if "threshold" in reductions and ("topk" in reductions or "abstopk" in reductions):
        raise BadSpec(f"--site {text!r}: token_neurons keeps one capture per site: use topk=K or threshold=T, not both")
    if "nohist" in reductions and ("hist" in reductions or "examples" not in reductions):
        raise BadSpec(
            f"--site {text!r}: nohist drops the histogram examples=N keeps: use it with examples=N, without hist"
        )
    if "examples" in reductions and "nohist" not in reductions:
        reductions.setdefault("hist", None)
    if "quantiles" in reductions and not {"examples", "hist"} <= reductions.keys():
        raise BadSpec(
            f"--site {text!r}: quantiles=Q places its bins with the histogram and keeps examples: "
            f"add examples=N without nohist, e.g. {text.split(':')[0]}:examples=20,quantiles={reductions['quantiles']}"
        )
    return SiteSpec(
        text,
        site,
        hook,
        reductions,
        layers,
        dict_kind,
        dictionary,
        dictionary_name,
        encode_only=options.get("encode_only", False),
        encode_dtype=options.get("encode_dtype", "float32"),
    )


def parse_specs(texts) -> list[SiteSpec]:
    """The SPECs of one run: each parsed, their site names valid folder names and distinct."""
    specs = [parse_spec(s) for s in texts]
    if not specs:
        raise BadSpec("no --site given: add e.g. --site mlp.act:topk=20")
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        spec = next(s for s in specs if s.name == twice[0])
        if spec.kind:
            raise BadSpec(
                f"two dictionaries on one site would both be named {twice[0]!r}: give each its own name, "
                f"e.g. {spec.site}+{spec.kind}.wide=PATH (stored as site {spec.kind}.wide.{spec.hooked_name})"
            )
        raise BadSpec(
            f"site given twice ({', '.join(twice)}): merge the reductions into one SPEC, e.g. mlp.act:topk=20,examples=20"
        )
    for name in names:
        check_name("site", name)
    return specs


def _dictionary_option(text: str, kind: str | None, seen: dict, name: str, arg: str | None):
    if kind is None:
        raise BadSpec(f"--site {text!r}: {name} is an option of dictionary sites: add +sae=PATH or drop it")
    if name in seen:
        raise BadSpec(f"--site {text!r}: {name!r} given twice")
    if name == "encode_only":
        if arg is not None:
            raise BadSpec(f"--site {text!r}: 'encode_only' takes no argument")
        return True
    if arg not in ENCODE_DTYPES:
        raise BadSpec(
            f"--site {text!r}: encode_dtype={arg or ''} is not a dtype: use one of {', '.join(ENCODE_DTYPES)}"
        )
    return arg


def _dictionary_name(text: str, kind: str, name: str) -> str | None:
    """The NAME of `+KIND.NAME=PATH` (None without one): a site-name component without dots."""
    if not name:
        if f"+{kind}.=" in text:
            raise BadSpec(f"--site {text!r}: +{kind}.= needs a name, e.g. +{kind}.wide=PATH")
        return None
    check_name("dictionary name", name)
    if "." in name:
        raise BadSpec(f"--site {text!r}: dictionary name {name!r} has a '.': use letters, digits, '_' or '-'")
    return name


def _dictionary_path(text: str, kind: str, rest: str) -> tuple[str, str]:
    """Split `PATH[:ITEMS]`; an adapter's `dict.py:CHECKPOINT` keeps its checkpoint unless it names a reduction
    or a dictionary option."""
    if kind not in DICTIONARY_KINDS:
        raise BadSpec(
            f"--site {text!r}: +{kind}= is not a dictionary kind: write +sae=PATH or +transcoder=PATH "
            f"(+sae.NAME=PATH to name it)"
        )
    path, _, reds = rest.partition(":")
    first = reds.split(",")[0].partition("=")[0].strip()
    if path.endswith(".py") and reds and first not in REDUCTIONS and first not in DICTIONARY_OPTIONS:
        checkpoint, _, reds = reds.partition(":")
        path = f"{path}:{checkpoint}"
    if not path:
        raise BadSpec(f"--site {text!r}: +{kind}= needs a dictionary path, e.g. {kind}=path/to/dictionary")
    return path, reds


def _layer_selector(text: str, site: str) -> tuple[str, tuple | str | None]:
    """`resid.out[6]` -> ("resid.out", (6,)); `[*]` -> "*"; `[0,2]`, `[1-3]`; no brackets -> None."""
    match = re.fullmatch(r"(.*)\[([^\[\]]*)\]", site)
    if not match:
        return site, None
    site, body = match.group(1), match.group(2).replace(" ", "")
    if body == "*":
        return site, "*"
    layers: list[int] = []
    for item in body.split(","):
        if m := re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", item):  # ASCII digits: \d takes every script's
            low, high = int(m.group(1)), int(m.group(2) or m.group(1))
            if low > high:
                raise BadSpec(f"--site {text!r}: layer range [{item}] runs backwards: write [{high}-{low}]")
            if high >= LAYER_CEILING:
                raise BadSpec(f"--site {text!r}: layer {high} is beyond any model: give the model's own layers")
            layers.extend(range(low, high + 1))
        else:
            raise BadSpec(f"--site {text!r}: [{body}] is not a layer selector: write [6], [0,2,4], [0-3] or [*]")
    return site, tuple(sorted(set(layers)))


def glob_regex(glob: str) -> re.Pattern:
    """Module globs: `*` is one path component, `**` any number of them."""
    parts = []
    for token in re.split(r"(\*\*|\*)", glob):
        if token == "**":
            parts.append(r".*")
        elif token == "*":
            parts.append(r"[^.]+")
        else:
            parts.append(re.escape(token))
    return re.compile("^" + "".join(parts) + "$")


def layer_of(module_name: str) -> int | None:
    for component in module_name.split("."):
        if component.isdigit():
            return int(component)
    return None


@dataclass
class ResolvedSite:
    spec: SiteSpec
    glob: str
    hook: str
    modules: list[tuple[int, str]]  # (layer, module name)
    units: int | None = None  # a dictionary site's latents (d_sae); None: the hooked module's width

    @property
    def name(self) -> str:
        return self.spec.name


def resolve(spec: SiteSpec, module_names: list[str], aliases: dict[str, tuple[str, str]]) -> ResolvedSite:
    """Match a site against a model's named_modules(); errors list what exists."""
    site = SOURCE_ALIASES.get(spec.site, spec.site)
    if site in aliases:
        glob, hook = aliases[site]
        hook = spec.hook or hook
    elif ("." in site or "*" in site or site in module_names) and site.split(".")[0] not in ALIAS_PREFIXES:
        glob, hook = site, spec.hook or "out"
    else:
        hint = difflib.get_close_matches(site, list(aliases), n=1)
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
        raise BadSpec(
            f"unknown site {spec.site!r}: {suggestion}aliases for this model: {', '.join(aliases) or 'none'}; "
            f"or give a module glob (see `whq sites --model M`)"
        )
    pattern = glob_regex(glob)
    matched = [name for name in module_names if pattern.match(name)]
    if not matched:
        raise BadSpec(
            f"site {spec.text!r}: module glob {glob!r} matches no module of this model; list them with `whq sites --model M`"
        )
    layered = [(layer_of(name), name) for name in matched]
    if len(layered) > 1 and any(layer is None for layer, _ in layered):
        raise BadSpec(
            f"site {spec.text!r}: glob {glob!r} matches modules without a layer number ({matched[0]}, ...); make it match one module per block"
        )
    layered = [(layer if layer is not None else 0, name) for layer, name in layered]
    layers = [layer for layer, _ in layered]
    if len(set(layers)) != len(layers):
        raise BadSpec(
            f"site {spec.text!r}: glob {glob!r} matches several modules per layer ({', '.join(matched[:3])}, ...); make it more specific"
        )
    if isinstance(spec.layers, tuple):
        missing = [layer for layer in spec.layers if layer not in layers]
        if missing:
            raise BadSpec(
                f"site {spec.text!r}: this model has no layer {missing[0]} at {glob!r}: select layers {min(layers)}-{max(layers)}"
            )
        layered = [(layer, name) for layer, name in layered if layer in spec.layers]
    return ResolvedSite(spec, glob, hook, sorted(layered))


def family_aliases(module_names: list[str]) -> tuple[str, dict[str, tuple[str, str]]]:
    """Find the blocks container (model.layers, encoder.layer, ...) and expand the aliases."""
    decoder = [n for n in module_names if n.endswith("mlp.up_proj")]
    encoder = [n for n in module_names if n.endswith("intermediate.dense")]
    if decoder:
        family, table, sample = "decoder", DECODER_ALIASES, decoder[0]
        container = sample[: sample.rindex(".mlp.up_proj")]
    elif encoder:
        family, table, sample = "encoder", ENCODER_ALIASES, encoder[0]
        container = sample[: sample.rindex(".intermediate.dense")]
    else:
        return "custom", {}
    container = container.rsplit(".", 1)[0]  # drop the block's own index
    names = set(module_names)
    aliases = {}
    for alias, (glob, hook) in table.items():
        full = f"{container}.{glob}"
        if any(glob_regex(full).match(n) for n in names):
            aliases[alias] = (full, hook)
    return family, aliases

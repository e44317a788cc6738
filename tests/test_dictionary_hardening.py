"""Dictionary files are untrusted input: every field of every format is checked against its declared
schema, headers and allocations are bounded by the bytes present, weights must be finite, shapes
must not be degenerate, and only regular files are read. Each refusal is one WarehouseError line;
a refused dictionary leaves no warehouse folder, no journal entry and no run. The loaders are
fuzzed (arbitrary bytes, arbitrary cfg.json, arbitrary safetensors headers): a valid Dictionary
or a WarehouseError, never another exception."""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import dictionary_files
from warehouse.display import terminal_safe
from warehouse.errors import BadInput, WarehouseError

from . import dictionaries as dicts
from .cli_runner import run_whq

MODEL = ["--model", "config:llama-tiny", "-q", "--device", "cpu"]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: an 8-byte little-endian header length, the header's JSON, the data."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _tensors(**arrays) -> bytes:
    """A well-formed safetensors file of float32 arrays (written by hand to reuse in hostile variants)."""
    header, data = {}, b""
    for name, array in arrays.items():
        raw = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(np.shape(array)),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return _safetensors_bytes(header, data)


def _weights(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _rewrite_weights(folder: Path, **changes) -> Path:
    """The SAELens folder with some tensors replaced."""
    weights = {**_weights(folder / "sae_weights.safetensors"), **changes}
    (folder / "sae_weights.safetensors").write_bytes(_tensors(**weights))
    return folder


def _cfg(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _refused(path, match: str) -> str:
    with pytest.raises(BadInput, match=match) as refused:
        dictionary_files.load(str(path))
    message = str(refused.value)
    assert "\n" not in message and message.isprintable(), message
    return message


# -- the examples of the issue -------------------------------------------------------------------


def test_nan_weights_are_refused_at_load(tmp_path):
    folder = dicts.saelens(tmp_path / "nan", "standard")
    w_enc = _weights(folder / "sae_weights.safetensors")["W_enc"].copy()
    w_enc[3, 5] = np.nan
    _rewrite_weights(folder, W_enc=w_enc)
    _refused(folder, r"W_enc holds non-finite values \(NaN or infinity in float32\): use a dictionary whose weights")


def test_infinite_and_float32_overflowing_weights_are_refused(tmp_path):
    folder = dicts.saelens(tmp_path / "inf", "jumprelu")
    _rewrite_weights(folder, threshold=np.full(96, np.inf, dtype=np.float32))
    _refused(folder, "threshold holds non-finite values")
    path = dicts.gemmascope(tmp_path / "g" / "params.npz")
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez(path, **{**arrays, "b_dec": np.full(64, 1e300)})  # float64 beyond float32's range
    _refused(path, "b_dec holds non-finite values")


def test_gated_r_mag_whose_exponential_overflows_is_refused(tmp_path):
    folder = dicts.saelens(tmp_path / "gated", "gated")
    _rewrite_weights(folder, r_mag=np.full(96, 200.0, dtype=np.float32))
    _refused(folder, r"exp\(r_mag\) holds non-finite values")


def test_a_header_that_is_a_json_list_is_one_line(tmp_path):
    folder = dicts.saelens(tmp_path / "list", "standard")
    (folder / "sae_weights.safetensors").write_bytes(_safetensors_bytes([1, 2, 3]))
    _refused(folder, r"not a readable safetensors file \(its header is a JSON list, not an object\): check the file")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("k", "eight", r"k is \"eight\", expected a whole number from 1 to 2147483647: fix it in cfg.json"),
        ("k", 2.9, r"k is 2.9, expected a whole number"),
        ("k", True, r"k is true, expected a whole number"),
        ("k", 0, r"k is 0, expected a whole number from 1"),
        ("k", -3, r"k is -3, expected a whole number from 1"),
        ("hook_layer", [1], r"hook_layer is \[1\], expected a whole number from 0"),
        ("hook_layer", -1, r"hook_layer is -1, expected a whole number from 0"),
        ("hook_name", 7, r"hook_name is 7, expected text of at most 256 characters"),
        ("hook_name", "x" * 300, r"hook_name is \"x{50,}, expected text of at most 256 characters"),
        ("d_in", "64", r"d_in is \"64\", expected a whole number from 1"),
        ("d_sae", 10**40, r"d_sae is 10{40}, expected a whole number from 1 to 2147483647"),
        ("apply_b_dec_to_input", "yes", r"apply_b_dec_to_input is \"yes\", expected true or false"),
        ("architecture", ["topk"], r"architecture is \[\"topk\"\], expected text"),
        ("metadata", "blocks.1", r"metadata is \"blocks.1\", expected a JSON object"),
        ("activation_fn_kwargs", {"k": "8"}, r"activation_fn_kwargs: k is \"8\", expected a whole number"),
        ("metadata", {"hook_name": 5}, r"metadata: hook_name is 5, expected text"),
        ("hook_head_index", "all", r"hook_head_index is \"all\", expected a whole number"),
    ],
)
def test_saelens_cfg_fields_are_checked_against_the_schema(tmp_path, field, value, expected):
    folder = _cfg(dicts.saelens(tmp_path / "d", "topk", k=8), **{field: value})
    _refused(folder, expected)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("k", "eight", r"k is \"eight\", expected a whole number"),
        ("k", 4.0, r"k is 4.0, expected a whole number"),
        ("k", None, r"cfg.json has no k: add it"),
        ("transcode", 1, r"transcode is 1, expected true or false"),
        ("num_latents", 95, r"cfg.json says num_latents=95 but the weights have d_sae=96"),
        ("activation", {"topk": 1}, r"activation is \{\"topk\": 1\}, expected text"),
    ],
)
def test_sparsify_cfg_fields_are_checked_against_the_schema(tmp_path, field, value, expected):
    folder = dicts.sparsify(tmp_path / "layers.1")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg[field] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    _refused(folder, expected)


def test_k_beyond_d_sae_is_refused(tmp_path):
    _refused(dicts.saelens(tmp_path / "big", "topk", k=97), r"k=97 must be between 1 and d_sae=96")


def test_cfg_widths_must_agree_with_the_weights(tmp_path):
    _refused(
        _cfg(dicts.saelens(tmp_path / "w", "standard"), d_in=65), "cfg.json says d_in=65 but the weights have d_in=64"
    )
    folder = _cfg(dicts.saelens(tmp_path / "t", "transcoder", d_out=48), d_out=47)
    _refused(folder, "cfg.json says d_out=47 but the weights have d_out=48")


# -- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d_in", "d_sae", "message"),
    [(64, 0, r"its weights give d_sae=0: use a dictionary of at least one unit"), (0, 96, "d_in=0")],
)
def test_degenerate_shapes_are_refused(tmp_path, d_in, d_sae, message):
    folder = dicts.saelens(tmp_path / "deg", "standard", d_in=max(d_in, 1), d_sae=max(d_sae, 1))
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["d_in"], cfg["d_sae"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "sae_weights.safetensors").write_bytes(
        _tensors(
            W_enc=np.zeros((d_in, d_sae)),
            b_enc=np.zeros(d_sae),
            W_dec=np.zeros((d_sae, d_in)),
            b_dec=np.zeros(d_in),
        )
    )
    _refused(folder, message)


def test_tensors_of_the_wrong_rank_or_width_are_one_line(tmp_path):
    folder = _rewrite_weights(dicts.saelens(tmp_path / "rank", "standard"), W_enc=np.zeros(64, dtype=np.float32))
    _refused(folder, r"W_enc has shape \(64,\), expected 2 dimension\(s\): check the file")
    folder = _rewrite_weights(dicts.saelens(tmp_path / "width", "standard"), b_enc=np.zeros(95, dtype=np.float32))
    _refused(folder, r"b_enc has shape \(95,\), expected \(96,\)")
    folder = _rewrite_weights(
        dicts.saelens(tmp_path / "bt", "batchtopk"), topk_threshold=np.zeros((0,), dtype=np.float32)
    )
    _refused(folder, r"topk_threshold has shape \(0,\), expected one value")
    folder = dicts.saelens(tmp_path / "resc", "topk", rescale_acts_by_decoder_norm=True)
    _rewrite_weights(folder, W_dec=np.ones((95, 64), dtype=np.float32))  # folded only once the shapes agree
    _refused(folder, r"W_dec has shape \(95, 64\), expected \(96, 64\)")


# -- bounded reads ----------------------------------------------------------------------------------


def test_safetensors_header_length_beyond_the_file_is_refused_before_reading(tmp_path):
    folder = dicts.saelens(tmp_path / "long", "standard")
    (folder / "sae_weights.safetensors").write_bytes(_safetensors_bytes({}, length=2**62))
    _refused(folder, r"its header length 4,611,686,018,427,387,904 exceeds the 2 bytes present")
    (folder / "sae_weights.safetensors").write_bytes(b"\x01\x02")
    _refused(folder, r"2 bytes, shorter than the 8-byte header length")


def test_safetensors_shapes_must_fit_the_bytes_present(tmp_path):
    folder = dicts.saelens(tmp_path / "huge", "standard")
    header = {"W_enc": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}
    (folder / "sae_weights.safetensors").write_bytes(_safetensors_bytes(header, b"\0" * 16))
    _refused(
        folder, r"tensor W_enc of shape \[1099511627776, 1099511627776\] needs 4,835,703,278,458,516,698,824,704 bytes"
    )
    header = {"W_enc": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8000]}}
    (folder / "sae_weights.safetensors").write_bytes(_safetensors_bytes(header, b"\0" * 8))
    _refused(folder, r"offsets span 0..8,000 of the 8 present")
    for bad in ({"dtype": "F8"}, {"dtype": "F32", "shape": [-1]}, {"dtype": "F32", "shape": [1], "data_offsets": "0"}):
        (folder / "sae_weights.safetensors").write_bytes(_safetensors_bytes({"W_enc": bad}))
        _refused(folder, "not a readable safetensors file")


def _npz_bytes(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return sink.getvalue()


def _npy_header(shape, dtype="<f4") -> bytes:
    sink = io.BytesIO()
    np.lib.format.write_array_header_1_0(sink, {"descr": dtype, "fortran_order": False, "shape": shape})
    return sink.getvalue()


def test_npz_members_are_bounded_by_their_bytes(tmp_path):
    path = tmp_path / "layer_1" / "params.npz"
    path.parent.mkdir()
    path.write_bytes(_npz_bytes({"W_enc.npy": _npy_header((2**40, 2**40)) + b"\0" * 64}))
    _refused(path, r"member W_enc.npy of shape \(1099511627776, 1099511627776\) needs .* bytes, it holds")
    path.write_bytes(_npz_bytes({"W_enc.npy": _npy_header((4,), "|O") + b"\0" * 64}))
    _refused(path, "not a readable .npz file")
    path.write_bytes(_npz_bytes({"notes.txt": b"hello"}))
    _refused(path, r"member notes.txt is not a .npy array")
    path.write_bytes(b"PK\x03\x04 not really a zip")
    _refused(path, "not a readable .npz file")


def test_a_compressed_npz_member_that_claims_more_than_deflate_can_give_is_refused(tmp_path):
    path = tmp_path / "params.npz"
    payload = bytearray(_npz_bytes({"W_enc.npy": _npy_header((64, 96)) + b"\0" * 4 * 64 * 96}, zipfile.ZIP_DEFLATED))
    # Rewrite the declared uncompressed size in both the local header and the central directory.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = payload.index(signature) + offset
        payload[at : at + 4] = struct.pack("<I", 2**32 - 1)
    path.write_bytes(bytes(payload))
    _refused(path, r"member W_enc.npy claims 4,294,967,295 bytes from .* stored")


def test_a_compressed_npz_written_by_numpy_still_loads(tmp_path):
    path = dicts.gemmascope(tmp_path / "layer_1" / "params.npz")
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez_compressed(path, **arrays)
    d = dictionary_files.load(str(path)).first
    np.testing.assert_array_equal(d.weights["W_enc"], arrays["W_enc"])
    assert (d.layer, d.d_in, d.d_sae) == (1, 64, 96)


def test_an_oversized_cfg_json_is_refused_unread(tmp_path):
    folder = dicts.saelens(tmp_path / "big", "standard")
    with open(folder / "cfg.json", "r+b") as f:
        f.truncate(dictionary_files.CONFIG_MOST + 1)  # sparse: no bytes written
    _refused(folder, r"dictionary config .*cfg.json is 16,777,217 bytes, more than a dictionary's 16,777,216")


def test_deeply_nested_json_is_one_line(tmp_path):
    folder = dicts.saelens(tmp_path / "deep", "standard")
    (folder / "cfg.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(folder, "not readable JSON")


# -- only regular files ------------------------------------------------------------------------------


def test_a_fifo_is_refused_without_blocking(tmp_path):
    folder = dicts.saelens(tmp_path / "fifo", "standard")
    (folder / "sae_weights.safetensors").unlink()
    os.mkfifo(folder / "sae_weights.safetensors")
    _refused(
        folder, r"sae_weights.safetensors is not a regular file \(a pipe or device\?\): copy the dictionary to a file"
    )
    (folder / "cfg.json").unlink()
    os.mkfifo(folder / "cfg.json")
    _refused(folder, r"cfg.json is not a regular file")


def test_a_folder_where_a_file_is_wanted_is_one_line(tmp_path):
    folder = dicts.saelens(tmp_path / "dir", "standard")
    (folder / "sae_weights.safetensors").unlink()
    (folder / "sae_weights.safetensors").mkdir()
    _refused(folder, r"sae_weights.safetensors is a folder, not a file: point at the dictionary's files")
    (tmp_path / "g" / "params.npz").mkdir(parents=True)
    _refused(tmp_path / "g", r"params.npz is a folder, not a file")


def test_a_symlink_loop_is_one_line(tmp_path):
    folder = dicts.saelens(tmp_path / "loop", "standard")
    (folder / "cfg.json").unlink()
    os.symlink("cfg.json", folder / "cfg.json")
    message = _refused(folder, r"holds no dictionary|cannot be read")
    assert str(folder) in message


# -- through the CLI: nothing is created ---------------------------------------------------------------


def _hostile(folder: Path) -> Path:
    """A dictionary with a NaN weight (the issue's run whose every latent was NaN)."""
    dicts.saelens(folder, "topk", k=4)
    w_enc = _weights(folder / "sae_weights.safetensors")["W_enc"].copy()
    w_enc[0, 0] = np.nan
    return _rewrite_weights(folder, W_enc=w_enc)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("make", ["nan", "k_text", "header_list", "narrower_than_the_site"])
def test_a_refused_dictionary_creates_no_warehouse_and_adds_nothing(make, tmp_path, sample_jsonl):
    folder = tmp_path / "dict"
    if make == "nan":
        _hostile(folder)
    elif make == "k_text":
        _cfg(dicts.saelens(folder, "topk"), k="eight")
    elif make == "header_list":
        dicts.saelens(folder, "topk")
        (folder / "sae_weights.safetensors").write_bytes(_safetensors_bytes([]))
    else:
        dicts.saelens(folder, "topk", d_in=32)  # refused when bound to the model, before the warehouse opens
    site = ["--site", f"resid.out[1]+sae={folder}:topk=3"]
    fresh = tmp_path / "fresh"
    code, _, err = run_whq("ingest", fresh, *MODEL, "--data", sample_jsonl, *site)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(folder) in err, err
    assert not fresh.exists(), "a refused dictionary created the warehouse folder"

    existing = tmp_path / "wh"
    code, _, err = run_whq(
        "ingest", existing, *MODEL, "--data", sample_jsonl, "--site", "mlp.act:topk=3", "--run-id", "r"
    )
    assert code == 0, err
    before = _tree(existing)
    code, _, err = run_whq("ingest", existing, *MODEL, "--data", sample_jsonl, *site, "--run-id", "bad")
    assert code == 2 and err.count("\n") == 1, err
    assert _tree(existing) == before, "a refused dictionary changed the warehouse"
    code, out, _ = run_whq("runs", existing)
    assert code == 0 and "bad" not in out.split() and "r" in out


def test_whq_sites_escapes_what_cfg_json_says(tmp_path):
    folder = dicts.saelens(tmp_path / "esc", "standard", hook_name="blocks.1\x1b]52;c;aGk=\x07\n\u202eevil")
    code, out, err = run_whq("sites", "--model", "config:llama-tiny", "--dictionary", folder)
    assert code == 0, err
    first = out.splitlines()[0]
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "hook blocks.1\\x1b]52;c;aGk=\\x07\\n\\u202eevil, layers 1" in first


def test_adapter_attributes_are_checked(tmp_path):
    (tmp_path / "dict.py").write_text(
        "class D:\n    d_in = '64'\n    d_sae = 8\n    def encode(self, x):\n        return x\n"
        "def load(checkpoint=None):\n    return D()\n"
    )
    with pytest.raises(
        BadInput, match=r"d_in is \"64\", expected a whole number from 1 .*: fix the object load\(\) returns"
    ):
        dictionary_files.load(str(tmp_path / "dict.py"))
    (tmp_path / "numpy_ints.py").write_text(
        "import numpy as np\nclass D:\n    d_in = np.int64(64)\n    d_sae = np.int32(8)\n    layer = np.int64(2)\n"
        "    def encode(self, x):\n        return x\ndef load(checkpoint=None):\n    return D()\n"
    )
    d = dictionary_files.load(str(tmp_path / "numpy_ints.py")).first
    assert (d.d_in, d.d_sae, d.d_out, d.layer) == (64, 8, 64, 2) and type(d.d_in) is int
    (tmp_path / "zero.py").write_text(
        "class D:\n    d_in = 64\n    d_sae = 0\n    def encode(self, x):\n        return x\n"
        "def load(checkpoint=None):\n    return D()\n"
    )
    with pytest.raises(BadInput, match=r"d_sae is 0, expected a whole number from 1"):
        dictionary_files.load(str(tmp_path / "zero.py"))


# -- fuzzing: a valid Dictionary or a WarehouseError, nothing else -----------------------------------------


def _load_or_refuse(path: Path) -> None:
    """Loading `path` gives a valid dictionary set or a WarehouseError of one printable line."""
    try:
        dset = dictionary_files.load(str(path))
    except WarehouseError as refused:
        assert terminal_safe(str(refused)) == str(refused), str(refused)  # one line, nothing a terminal obeys
        return
    for d in dset.by_layer.values():
        assert d.d_in >= 1 and d.d_sae >= 1 and d.d_out >= 1
        assert d.k is None or 1 <= d.k <= d.d_sae
        assert d.weights["W_enc"].shape == (d.d_in, d.d_sae) and d.weights["W_dec"].shape == (d.d_sae, d.d_out)
        assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in d.weights.values())
    hook = dset.describe()["hook"]
    assert hook is None or terminal_safe(hook) == hook


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SAELENS_FIELDS = st.sampled_from([*dictionary_files.SAELENS_CFG, "dtype", "device"])
SPARSIFY_FIELDS = st.sampled_from(list(dictionary_files.SPARSIFY_CFG))
# A JSON object whose keys are mostly the fields the loaders read, with arbitrary values (and unknown keys).
CFG = st.one_of(
    JSON,
    st.dictionaries(SAELENS_FIELDS | SPARSIFY_FIELDS | st.text(max_size=6), JSON, max_size=8),
    st.dictionaries(
        SAELENS_FIELDS,
        st.sampled_from([None, 0, 1, 4, 64, 96, 97, -1, 2.5, "topk", "gated", "jumprelu", "none", True, [1], {}]),
        max_size=10,
    ),
)


@FUZZ
@given(cfg=CFG, fmt=st.sampled_from(["saelens", "sparsify"]))
def test_fuzz_cfg_json(cfg, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "saelens":
            folder = dicts.saelens(Path(tmp) / "d", "topk", d_in=8, d_sae=12, k=3)
        else:
            folder = dicts.sparsify(Path(tmp) / "layers.1", d_in=8, d_sae=12, k=3)
        (folder / "cfg.json").write_text(json.dumps(cfg, allow_nan=True))
        _load_or_refuse(folder)


@FUZZ
@given(payload=st.binary(max_size=400) | st.binary(max_size=40).map(lambda b: _safetensors_bytes({}) + b))
def test_fuzz_arbitrary_bytes_as_safetensors(payload):
    with tempfile.TemporaryDirectory() as tmp:
        folder = dicts.saelens(Path(tmp) / "d", "standard", d_in=4, d_sae=6)
        (folder / "sae_weights.safetensors").write_bytes(payload)
        _load_or_refuse(folder)


def _mutated_npz(seed_bytes: bytes, cuts: list[tuple[int, int]]) -> bytes:
    data = bytearray(seed_bytes)
    for at, value in cuts:
        data[at % len(data)] = value
    return bytes(data)


def _small_npz(compressed: bool) -> bytes:
    sink = io.BytesIO()
    rng = np.random.default_rng(0)
    arrays = dict(
        W_enc=rng.normal(size=(4, 6)), b_enc=rng.normal(size=6), threshold=np.abs(rng.normal(size=6)),
        W_dec=rng.normal(size=(6, 4)), b_dec=rng.normal(size=4),
    )  # fmt: skip
    (np.savez_compressed if compressed else np.savez)(sink, **arrays)
    return sink.getvalue()


NPZ_SEEDS = {False: _small_npz(False), True: _small_npz(True)}


@FUZZ
@given(
    payload=st.one_of(
        st.binary(max_size=400),
        st.tuples(
            st.booleans(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)
        ).map(lambda t: _mutated_npz(NPZ_SEEDS[t[0]], t[1])),
    )
)
def test_fuzz_arbitrary_bytes_as_npz(payload):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer_2" / "params.npz"
        path.parent.mkdir()
        path.write_bytes(payload)
        _load_or_refuse(path)


_DTYPES = st.sampled_from(["F32", "F64", "F16", "BF16", "I32", "I64", "U8", "F8", 3, None])
_DIMS = st.lists(st.integers(-2, 12) | st.just(2**40), max_size=3)
_TENSOR = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"dtype": _DTYPES, "shape": _DIMS | JSON, "data_offsets": st.lists(st.integers(-4, 800), max_size=3) | JSON}
    ),
)
_NAMES = st.sampled_from(["W_enc", "b_enc", "W_dec", "b_dec", "__metadata__", "other"])


@FUZZ
@given(
    header=st.one_of(JSON, st.dictionaries(_NAMES | st.text(max_size=5), _TENSOR, max_size=5)),
    data=st.binary(max_size=64) | st.integers(0, 800).map(lambda n: b"\x3f" * n),
    length_change=st.sampled_from([0, 0, 0, 1, -1, 2**63]),
)
def test_fuzz_safetensors_headers(header, data, length_change):
    with tempfile.TemporaryDirectory() as tmp:
        folder = dicts.saelens(Path(tmp) / "d", "standard", d_in=4, d_sae=6)
        text = json.dumps(header, allow_nan=True).encode()
        length = min(len(text) + length_change, 2**64 - 1) if length_change >= 0 else max(len(text) - 1, 0)
        (folder / "sae_weights.safetensors").write_bytes(struct.pack("<Q", length) + text + data)
        _load_or_refuse(folder)


@FUZZ
@given(
    W_enc=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=24, max_size=24),
    b_enc=st.lists(st.floats(width=32), min_size=6, max_size=6),
)
def test_fuzz_weight_values(W_enc, b_enc):
    with tempfile.TemporaryDirectory() as tmp:
        folder = dicts.saelens(Path(tmp) / "d", "standard", d_in=4, d_sae=6)
        weights = _weights(folder / "sae_weights.safetensors")
        weights.update(W_enc=np.array(W_enc, dtype=np.float32).reshape(4, 6), b_enc=np.array(b_enc, dtype=np.float32))
        (folder / "sae_weights.safetensors").write_bytes(_tensors(**weights))
        _load_or_refuse(folder)

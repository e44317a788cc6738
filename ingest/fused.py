"""The fused CPU hook kernel (fused.c): top-k and per-row partial statistics in one pass; example tokens.

`extremes` finds each unit's top and bottom example tokens of a batch in one more pass.
`sparse_pass` is the site pass of a sparse code (a TopK dictionary's k active latents a token),
from its non-zeros alone; `topk` with a bias is that dictionary's top-k, the encoder's bias added on the way.

The C source is compiled on first use with the machine's C compiler (`cc -O3
-march=native -fopenmp`) into a cache folder ($WHQ_CACHE, else ~/.cache/whq), like a JIT: about a second once, then
reused while the source, compiler and CPU stay the same. Where no compiler is found,
the build fails, or `WHQ_FUSED=0` is set, the hooks use plain torch ops instead; both
give the same rows (tests/test_fused.py), and `whq bench ingest` says which one ran.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from warehouse.user_cache import cache_dir

SOURCE = Path(__file__).with_name("fused.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
# Top-k keeps a sorted buffer of k entries per token: beyond this, torch.topk is faster.
MAX_K = 256


def _cpu_identity() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build(compiler: list[str]) -> Path:
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(compiler + FLAGS), version, _cpu_identity()]).encode()
    )
    target = cache_dir() / f"whq-fused-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: a concurrent or interrupted build never leaves a torn library.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run(
            [*compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{compiler[0]} failed")
        os.replace(built, target)
    return target


@lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded kernel and a description of it, or None and why it is not available."""
    if os.environ.get("WHQ_FUSED", "1") == "0":
        return None, "disabled by WHQ_FUSED=0"
    compiler = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not compiler:
        return None, "no C compiler (install gcc to enable it)"
    try:
        path = _build(compiler)
        # torch is imported first, so the kernel's libgomp.so.1 resolves to torch's: one thread pool.
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"build failed: {exc}"
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.whq_site_pass.argtypes = [pointer, size, size, size, pointer, ctypes.c_float, size] + [pointer] * 25
    lib.whq_topk.argtypes = [pointer, size, size, pointer, size, pointer, pointer]
    lib.whq_sparse_pass.argtypes = [pointer, pointer] + [size] * 4 + [pointer, ctypes.c_float, size] + [pointer] * 27
    for function in (lib.whq_site_pass, lib.whq_topk, lib.whq_sparse_pass):
        function.restype = ctypes.c_int
    lib.whq_histogram.argtypes = [pointer, size, size, size, pointer, pointer]
    lib.whq_histogram.restype = None
    lib.whq_extremes.argtypes = [pointer, size, size, size, pointer, pointer, size, pointer, pointer]
    lib.whq_extremes.restype = ctypes.c_int
    lib.whq_sample.argtypes = [pointer, size, size, size, pointer, ctypes.c_float] + [pointer] * 3 + [size] * 2
    lib.whq_sample.argtypes += [pointer] * 2
    lib.whq_sample.restype = ctypes.c_int
    lib.whq_windows.argtypes = [pointer, size, size, pointer, size] + [pointer] * 3 + [size] * 2 + [pointer]
    lib.whq_windows.restype = None
    lib.whq_recon_sums.argtypes = [pointer, pointer, size, size] + [pointer] * 5
    lib.whq_recon_sums.restype = None
    lib.whq_active_counts.argtypes = [pointer, pointer, size, size] + [pointer] * 3
    lib.whq_active_counts.restype = None
    return lib, f"fused C kernel ({path})"


def describe() -> str:
    """Which hook implementation CPU captures use, for `whq bench ingest`."""
    lib, why = _library()
    return why if lib is not None else f"torch ops (fused kernel unavailable: {why})"


def usable(x: torch.Tensor, topk: int | None = None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and (topk is None or topk <= MAX_K)
        and _library()[0] is not None
    )


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("the fused hook kernel could not allocate its scratch buffers")


def _pointer(tensor: torch.Tensor | None):
    return tensor.data_ptr() if tensor is not None else None


# The running stats the kernels update in place, in their argument order.
_RUNNING = ("n_fired", "sum", "sum_sq", "sum_cube", "sum_quad", "sum_pos", "min", "max", "max_doc", "max_pos")


def site_pass(x: torch.Tensor, ctx, threshold: float, topk: int | None, want_abs: bool, stats: dict):
    """Run the kernel on x [batch, seq, width] of one batch (ctx: its BatchContext).

    Adds the batch to `stats` in place (everything but n_tokens; the histogram where
    `stats` holds one) and returns (top-k values float32 and ids int32 [batch, seq, k], or
    None; row sums; row |a| sums or None).
    """
    lib = _library()[0]
    x = x.contiguous()
    batch, seq, width = x.shape
    k = min(topk, width) if topk else 0
    mask = None if ctx.full else ctx.mask[:, :seq].contiguous().view(torch.uint8)
    values, ids, sums, abs_sums, squares, cubes, quads, positive, row_min, row_max, fired, argmax, _ = _pass_buffers(
        batch, seq, width, k, want_abs
    )
    _check(
        lib.whq_site_pass(
            x.data_ptr(),
            batch,
            seq,
            width,
            _pointer(mask),
            threshold,
            k,
            values.data_ptr(),
            ids.data_ptr(),
            sums.data_ptr(),
            _pointer(abs_sums),
            *(t.data_ptr() for t in (squares, cubes, quads, positive, row_min)),
            fired.data_ptr(),
            row_max.data_ptr(),
            argmax.data_ptr(),
            *(t.data_ptr() for t in (ctx.row_order, ctx.first_doc, ctx.first_pos)),
            *(stats[name].data_ptr() for name in _RUNNING),
        )
    )
    if "hist" in stats:
        lib.whq_histogram(x.data_ptr(), batch, seq, width, _pointer(mask), stats["hist"].data_ptr())
    return ((values, ids) if k else None), sums, abs_sums


def _pass_buffers(batch: int, seq: int, width: int, k: int, want_abs: bool) -> tuple:
    """The outputs of a site pass: top-k values and ids [batch, seq, k], then per row [batch, width] the sums,
    |a| sums (None unless wanted), squares, cubes, fourth powers, positive parts, min, max (float32), firing
    counts, first argmax and a count scratch (int32)."""
    values = torch.empty(batch, seq, k, dtype=torch.float32)
    ids = torch.empty(batch, seq, k, dtype=torch.int32)
    sums, squares, cubes, quads, positive, row_min, row_max = (torch.empty(batch, width) for _ in range(7))
    fired, argmax, counts = (torch.empty(batch, width, dtype=torch.int32) for _ in range(3))
    abs_sums = torch.empty(batch, width) if want_abs else None
    return values, ids, sums, abs_sums, squares, cubes, quads, positive, row_min, row_max, fired, argmax, counts


def sparse_pass(ids: torch.Tensor, values: torch.Tensor, width: int, ctx, threshold: float, topk, want_abs, stats):
    """`site_pass` on a sparse code: ids (int32) and values (float32) [batch, seq, n], each token's n
    distinct units, every other unit +0.0, standing for the dense [batch, seq, width] activation.

    The same results as site_pass on that dense activation, bit for bit (tests/test_fused.py),
    in time proportional to the n entries of a token instead of the width: a TopK dictionary's
    latents are counted from their k active ids.
    """
    lib = _library()[0]
    ids, values = ids.contiguous(), values.contiguous()
    batch, seq, n = ids.shape
    k = min(topk, width) if topk else 0
    mask = None if ctx.full else ctx.mask[:, :seq].contiguous().view(torch.uint8)
    top_values, top_ids, sums, abs_sums, squares, cubes, quads, positive, row_min, row_max, fired, argmax, zeros = (
        _pass_buffers(batch, seq, width, k, want_abs)
    )
    _check(
        lib.whq_sparse_pass(
            ids.data_ptr(),
            values.data_ptr(),
            batch,
            seq,
            n,
            width,
            _pointer(mask),
            threshold,
            k,
            top_values.data_ptr(),
            top_ids.data_ptr(),
            sums.data_ptr(),
            _pointer(abs_sums),
            *(t.data_ptr() for t in (squares, cubes, quads, positive, row_min, fired, row_max, argmax, zeros)),
            *(t.data_ptr() for t in (ctx.row_order, ctx.first_doc, ctx.first_pos)),
            *(stats[name].data_ptr() for name in _RUNNING),
            _pointer(stats.get("hist")),
        )
    )
    return ((top_values, top_ids) if k else None), sums, abs_sums


def extremes(x: torch.Tensor, ctx, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's n largest and n smallest values of x [batch, seq, width] (ctx: its BatchContext) as
    flat token indices [n, width] (int64, best first), ties to the first token in document order; padding
    ranks as -inf for the largest and +inf for the smallest. The same tokens as reductions.ranking_keys' top-k."""
    lib = _library()[0]
    x = x.contiguous()
    batch, seq, width = x.shape
    n = min(n, batch * seq)
    mask = None if ctx.full else ctx.mask[:, :seq].contiguous().view(torch.uint8)
    top, bottom = (torch.empty(n, width, dtype=torch.int64) for _ in range(2))
    order = ctx.row_order.contiguous()
    _check(
        lib.whq_extremes(
            x.data_ptr(), batch, seq, width, _pointer(mask), order.data_ptr(), n, top.data_ptr(), bottom.data_ptr()
        )
    )
    return top, bottom


def sample(x: torch.Tensor, ctx, threshold: float, n: int, bound: torch.Tensor, no_key: int):
    """Each unit's n smallest sample keys (reductions.sample_keys) among the firing tokens of x [batch, seq,
    width] below bound [width] (int64), as (keys, flat token indices), each [n, width] int64, smallest
    first; no_key and token 0 past a unit's candidates."""
    lib = _library()[0]
    x = x.contiguous()
    batch, seq, width = x.shape
    mask = None if ctx.full else ctx.mask[:, :seq].contiguous().view(torch.uint8)
    keys, ids = (torch.empty(n, width, dtype=torch.int64) for _ in range(2))
    doc, pos, bound = (t.contiguous() for t in (ctx.row_doc, ctx.row_pos, bound))
    _check(
        lib.whq_sample(
            x.data_ptr(),
            batch,
            seq,
            width,
            _pointer(mask),
            threshold,
            doc.data_ptr(),
            pos.data_ptr(),
            bound.data_ptr(),
            n,
            no_key,
            keys.data_ptr(),
            ids.data_ptr(),
        )
    )
    return keys, ids


def write_windows(x: torch.Tensor, ctx, where, units, slots, before: int, after: int, store: torch.Tensor) -> None:
    """Write the windows of flat tokens `where` of x [batch, seq, width] (unit `units`, NaN outside the
    token's row) into slots `slots` of store [size, width, before + 1 + after] (float16): as
    reductions.SiteLayer._windows, without the index tensors."""
    lib = _library()[0]
    x = x.contiguous()
    batch, seq, width = x.shape
    where, units, slots, lengths = (t.contiguous() for t in (where, units, slots, ctx.lengths))
    assert store.is_contiguous() and store.dtype == torch.float16
    lib.whq_windows(
        x.data_ptr(),
        seq,
        width,
        lengths.data_ptr(),
        len(where),
        where.data_ptr(),
        units.data_ptr(),
        slots.data_ptr(),
        before,
        after,
        store.data_ptr(),
    )


def topk(
    x: torch.Tensor, k: int, bias: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of x [rows, width] (float32, CPU), plus `bias` [width] where given, without forming
    the sum as a tensor (the values torch's x + bias gives): values descending, ties to the lower index.
    `out`: contiguous (values, ids int32) [rows, min(k, width)] to write them into."""
    lib = _library()[0]
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows, width = x.shape
    k = min(k, width)
    values, ids = out or (torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int32))
    _check(lib.whq_topk(x.data_ptr(), rows, width, _pointer(bias), k, values.data_ptr(), ids.data_ptr()))
    return values, ids


def _token_pass(kernel, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, outputs: list[torch.Tensor]) -> None:
    """Runs `kernel` over a and b [batch, seq, n] (the valid tokens: mask [batch, seq]), adding into `outputs`."""
    a, b, valid = a.contiguous(), b.contiguous(), mask.contiguous().view(torch.uint8)
    kernel(a.data_ptr(), b.data_ptr(), a.shape[0] * a.shape[1], a.shape[-1], valid.data_ptr(), *map(_pointer, outputs))


def recon_sums(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, quality: dict) -> None:
    """Adds a dictionary's reconstruction sums over the valid tokens of recon and target [batch, seq, d]
    (float32, CPU) to `quality` (ingest/encoder.py's float64 tensors) in one pass."""
    names = ("sq_error", "target_sq", "cosine_sum", "target_sum")
    _token_pass(_library()[0].whq_recon_sums, recon, target, mask, [quality[name] for name in names])


def active_counts(ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, quality: dict) -> None:
    """Adds a TopK code's non-zero values (ids int32, values float32 [batch, seq, k]) over the valid tokens
    to quality's l0_sum and per-latent n_active."""
    _token_pass(_library()[0].whq_active_counts, ids, values, mask, [quality["l0_sum"], quality["n_active"]])

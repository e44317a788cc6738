"""Several ranks, one run: torchrun starts them, each writes its own parts, rank 0 commits once.

    whq ingest wh --ranks 2 ...                    # this machine: runs the torchrun line below
    torchrun --standalone --nproc-per-node 2 -m ingest wh ...
    torchrun --nnodes 4 --node-rank $NODE --rdzv-backend c10d --rdzv-endpoint $HOST:29500 \\
             --nproc-per-node 8 -m ingest /shared/wh --device cuda ...   # each rank uses cuda:LOCAL_RANK

Each rank reads its own pieces of the input (inputs.Input.segments: piece i is rank i mod N's),
placed in the stream by the counts the ranks exchange (share), so a document keeps its
ordinal in the whole stream; an input of fewer pieces than ranks is read whole by every rank
and its documents dealt round-robin by ordinal (contexts.shards). The ranks agree on the
run id and start in order through torch.distributed (gloo, CPU-only traffic); every
rank journals its own shards, so `--resume` works per rank. Rank 0 waits for the
others' done markers, merges their running statistics, examples and dictionary quality
sums (all exact merges; each rank encodes its own documents with its own copy of a
dictionary) and commits the run with every rank's parts in one manifest.
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys

from warehouse.errors import BadInput, WarehouseError

from .options import default_run_id


def _group():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(dist.destroy_process_group)
    return dist


def _env_int(name: str, default: str | None = None) -> int:
    text = os.environ.get(name, default)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise BadInput(
            f"{name}={text!r} must be a whole number (torchrun sets it): unset it, or launch with --ranks N"
        ) from None


def from_env(run_id: str | None, device: str, model: str) -> tuple[int, int, str | None, str]:
    """(rank, world_size, run_id, device) of this process; (0, 1, ...) outside torchrun."""
    world_size = _env_int("WORLD_SIZE", "1")
    if world_size < 1:
        raise BadInput(f"WORLD_SIZE={world_size} must be at least 1: unset it, or launch with --ranks N")
    if world_size == 1:
        return 0, 1, run_id, device
    rank = _env_int("RANK")
    if not 0 <= rank < world_size:
        # Checked before the process group forms: a rank outside the world would wait for peers forever.
        raise BadInput(
            f"RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size}): launch with torchrun or --ranks N"
        )
    dist = _group()
    if run_id is None:  # the default id holds the start time: rank 0's is the one
        agreed = [default_run_id(model) if rank == 0 else None]
        dist.broadcast_object_list(agreed, src=0)
        run_id = agreed[0]
    if device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():  # one GPU per rank; ranks share GPUs when there are fewer
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return rank, world_size, run_id, device


def open_writer(make_writer, rank: int, world_size: int):
    """Create the RunWriter on rank 0 first (it checks and writes the run's config), then on the others."""
    if world_size <= 1:
        return make_writer()
    dist = _group()
    if rank == 0:
        try:
            writer = make_writer()
        except WarehouseError as err:
            dist.broadcast_object_list([str(err)], src=0)
            raise
        dist.broadcast_object_list([None], src=0)
        return writer
    verdict = [None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise WarehouseError(verdict[0])
    return make_writer()


def share(work):
    """Every rank's result of `work()`, in rank order. A WarehouseError on any rank (a bad row its part of the
    input holds, say) is raised on every rank, so none waits for a peer that stopped."""
    dist = _group()
    own_error = result = None
    try:
        result = work()
    except WarehouseError as err:
        own_error = err
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (None if own_error is None else str(own_error), result))
    if own_error is not None:
        raise own_error
    failed = next((error for error, _ in everyone if error is not None), None)
    if failed is not None:
        raise WarehouseError(failed)
    return [found for _, found in everyone]


def refuse_repeated_ids(writer) -> None:
    """Rank 0, where each rank read its own pieces of the input: no doc_id may be in two ranks' documents (each
    rank checked its own as they went by)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .inputs import repeated_id

    documents = [
        pq.read_table(writer.layout.root / part["path"], columns=["doc", "doc_id"])
        for rank in range(writer.world_size)
        for shard in writer.rank_shards(rank)
        for part in shard["parts"]
        if part["table"] == "documents"
    ]
    if not documents:
        return
    ids = pa.concat_tables(documents)
    counts = ids.group_by("doc_id").aggregate([("doc", "count"), ("doc", "min")])
    repeated = counts.filter(pc.greater(counts["doc_count"], 1)).sort_by("doc_min")
    if repeated.num_rows:
        doc_id = repeated["doc_id"][0].as_py()
        first, second = sorted(ids.filter(pc.equal(ids["doc_id"], doc_id))["doc"].to_pylist())[:2]
        raise repeated_id(doc_id, first + 1, second + 1)


def merge_ranks(writer, site_layers) -> None:
    """Rank 0: wait for every other rank, then fold their final statistics, examples and dictionary
    quality sums into ours."""
    import torch

    writer.wait_for_ranks()
    with torch.inference_mode():  # the live statistics are inference tensors
        for other_rank in range(1, writer.world_size):
            for sl in site_layers:
                tables = {n: t for n in sl.state_names if (t := writer.rank_state(other_rank, n)) is not None}
                if tables:  # none: that rank saw no tokens
                    sl.merge_tables(tables)


def launch(n: int, data: list[str], arguments: list[str]) -> None:
    """`whq ingest --ranks N`: check the cheap inputs, then run torchrun with `arguments`, the command's
    arguments after `ingest` less --ranks."""
    from .inputs import check_data

    if n < 1:
        raise BadInput("--ranks must be at least 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BadInput("--ranks launches torchrun; under torchrun already, drop --ranks")
    check_data(data)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "ingest",
        *arguments,
    ]
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise WarehouseError(failure(done.returncode, done.stderr))


def failure(returncode: int, stderr: str) -> str:
    """The one line of a failed torchrun: a rank's own error line, else (a rank killed, or dead without one)
    the root cause torchrun reports and the way on."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if errors:  # each rank printed its one-line error; torchrun's own failure report adds nothing for the user
        return errors[0][len("error: ") :]
    before, _, cause = stderr.rpartition("Root Cause")
    rank = re.search(r"^\s*rank\s*:\s*(\d+)", cause, re.MULTILINE)
    signal = re.search(r"^\s*traceback\s*:\s*(Signal .+)$", cause, re.MULTILINE)
    if rank and signal:
        return (
            f"rank {rank.group(1)} stopped ({signal.group(1).strip()}) before the run was committed: run the same "
            f"command with --resume to go on from what the ranks journalled"
        )
    # An exception no check foresaw: the last one a rank printed (a Python traceback's last line).
    raised = re.findall(r"^[A-Za-z_][\w.]*(?:Error|Exception|Invalid): .+$", before, re.MULTILINE)
    return f"torchrun failed (exit {returncode}): " + (raised or stderr.strip().splitlines() or ["no report"])[-1]

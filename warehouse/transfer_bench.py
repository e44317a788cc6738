"""`whq bench storage`: push and pull throughput against a plain copy of the same files with the same library.

A local SeaweedFS server (warehouse/seaweed.py) on loopback is the destination. Each repeat
times, one after the other: a plain s3fs `put` of exactly the files a push copies (marker,
manifests, parts) to a fresh prefix, `whq push` to another, a plain s3fs `get` of them into a
fresh folder, and `whq pull` into a fresh warehouse. The best time of each counts; the ratio
is whq's throughput over the plain copy's (the goal is at least 0.9). The CPU time this process
spent on each (every thread's; the server's is not counted) is kept beside it: on a machine that
other work loads, it moves far less than the time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .core import Warehouse
from .transfer import pull, push

KEY, SECRET, BUCKET = "whq-bench-key", "whq-bench-secret", "whq-bench"


@dataclass
class StorageBench:
    parts: int
    bytes: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)

    def best(self, what: str) -> float:
        return min(self.seconds[what])

    def rate(self, what: str) -> float:
        return self.bytes / 1e6 / self.best(what)

    def to_dict(self) -> dict:
        return {
            "parts": self.parts,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            **{f"{d}_ratio": self.best(f"plain {d}") / self.best(f"whq {d}") for d in ("push", "pull")},
        }

    def lines(self) -> list[str]:
        out = [f"{self.parts} files, {self.bytes / 1e6:.1f} MB, to SeaweedFS `weed mini` on 127.0.0.1 (best of each)"]
        for direction, plain in (("push", "s3fs put"), ("pull", "s3fs get")):
            ours, theirs = self.rate(f"whq {direction}"), self.rate(f"plain {direction}")
            cpu = {who: min(self.cpu_seconds[f"{who} {direction}"]) for who in ("whq", "plain")}
            out.append(
                f"{direction}: whq {ours:.1f} MB/s, plain {plain} {theirs:.1f} MB/s, whq / plain {ours / theirs:.2f} "
                f"(CPU: whq {cpu['whq']:.2f} s, plain {cpu['plain']:.2f} s)"
            )
        return out


def bench_storage(wh: Warehouse, repeats: int = 1, echo=None) -> StorageBench:
    """Time push/pull of `wh`'s committed runs and the plain copies, `repeats` times each, alternating."""
    from .seaweed import LocalS3

    rels = ["whq.json"] + [wh.layout.relative(wh.layout.manifest(run)) for run in wh.run_ids()]
    rels += [wh.layout.relative(path) for path in wh.files(None)]
    result = StorageBench(parts=len(rels), bytes=sum((wh.root / rel).stat().st_size for rel in rels))
    scratch = Path(tempfile.mkdtemp(prefix="whq-bench-storage-"))
    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")}
    try:
        # whq finds its credentials where every AWS client does; the server's are set for the run.
        os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
        os.environ.pop("AWS_PROFILE", None)
        with LocalS3(KEY, SECRET) as server:
            import s3fs

            fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=server.endpoint, skip_instance_cache=True)
            fs.mkdir(BUCKET)

            def timed(what: str, action) -> None:
                started, cpu = time.perf_counter(), time.process_time()
                action()
                result.seconds.setdefault(what, []).append(time.perf_counter() - started)
                result.cpu_seconds.setdefault(what, []).append(time.process_time() - cpu)
                if echo:
                    echo(f"{what}: {result.seconds[what][-1]:.2f} s")

            for i in range(repeats):
                plain, ours = f"{BUCKET}/plain-{i}", f"s3://{BUCKET}/whq-{i}"
                timed(
                    "plain push",
                    lambda: fs.put([str(wh.root / r) for r in rels], [f"{plain}/{r}" for r in rels]),  # noqa: B023
                )
                timed("whq push", lambda: push(wh, ours, endpoint_url=server.endpoint))  # noqa: B023
                copy, back = scratch / f"plain-{i}", scratch / f"whq-{i}"
                timed(
                    "plain pull",
                    lambda: fs.get([f"{plain}/{r}" for r in rels], [str(copy / r) for r in rels]),  # noqa: B023
                )
                timed("whq pull", lambda: pull(ours, back, endpoint_url=server.endpoint))  # noqa: B023
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        shutil.rmtree(scratch, ignore_errors=True)
    return result

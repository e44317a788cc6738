"""`whq bench storage`: push and pull throughput against a plain copy of the same files with the same library.

A local SeaweedFS server (warehouse/seaweed.py) on loopback is the destination. Each repeat
times, one after the other: a plain s3fs `put` of exactly the files a push copies (marker,
manifests, parts) to a fresh prefix, `whq push` to another, a plain s3fs `get` of them into a
fresh folder, the same `get` followed by what a pull must add to it (each file's sha256 checked
against its manifest and each file and folder fsynced, on 4 threads), and `whq pull` into a fresh
warehouse. The best time of each counts; the ratio is whq's throughput over the plain copy's (the
goal is at least 0.9), and pull's is also given over the verified copy's. The CPU time this
process spent on each (every thread's; the server's is not counted) is kept beside it: on a
machine that other work loads, it moves far less than the time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .core import Warehouse
from .errors import WarehouseError
from .parts import make_durable
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
            "pull_ratio_to_verified": self.best("verified pull") / self.best("whq pull"),
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
        verified = self.rate("verified pull")
        out.append(
            f"pull: plain s3fs get, then sha256-checked and fsynced {verified:.1f} MB/s, "
            f"whq / that {self.rate('whq pull') / verified:.2f} (CPU: {min(self.cpu_seconds['verified pull']):.2f} s)"
        )
        return out


def bench_storage(wh: Warehouse, repeats: int = 1, echo=None) -> StorageBench:
    """Time push/pull of `wh`'s committed runs and the plain copies, `repeats` times each, alternating."""
    from .seaweed import LocalS3

    rels = ["whq.json"] + [wh.layout.relative(wh.layout.manifest(run)) for run in wh.run_ids()]
    rels += [wh.layout.relative(path) for path in wh.files(None)]
    sha256 = {rel: hashlib.sha256((wh.root / rel).read_bytes()).hexdigest() for rel in rels}
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
                verified = scratch / f"verified-{i}"
                timed(
                    "verified pull",
                    lambda: _verified_get(fs, [f"{plain}/{r}" for r in rels], verified, rels, sha256),  # noqa: B023
                )
                timed("whq pull", lambda: pull(ours, back, endpoint_url=server.endpoint))  # noqa: B023
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _verified_get(fs, sources: list[str], folder: Path, rels: list[str], sha256: dict[str, str]) -> None:
    """A plain `get` into `folder`, then each file read back for its sha256 and fsynced, and each folder
    fsynced: the least a copy that is checked and durable adds to the plain one."""
    fs.get(sources, [str(folder / rel) for rel in rels])

    def settle(rel: str) -> None:
        with open(folder / rel, "rb") as fh:
            if hashlib.file_digest(fh, "sha256").hexdigest() != sha256[rel]:
                raise WarehouseError(f"{rel} arrived changed from the server: the bench's copies are not comparable")
            os.fsync(fh.fileno())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(settle, rels))
    make_durable(sorted({(folder / rel).parent for rel in rels}))

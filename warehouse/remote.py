"""A warehouse root at a URL (s3://bucket/prefix, or any fsspec URL), read in place.

`Remote` is the root: its fsspec filesystem (s3fs for s3://), the options Polars needs to
read the same objects natively, and `errors()`, which turns what the storage raises (a
wrong key, a missing bucket, an unreachable endpoint) into one WarehouseError line naming
the fix. Credentials come from the standard AWS environment variables or profile
(botocore resolves them) and the endpoint from `--endpoint-url` or AWS_ENDPOINT_URL; none
of them is ever written into a warehouse.

`RemoteWarehouse` is a read-only Warehouse over such a root. The catalog is built from the
manifests in the bucket: they are mirrored into a local shadow folder (marker, runs/*.json,
quarantine.json) in the system's temp folder, whose views name the parts by URL, so every
query reads the parts in place: DuckDB through the fsspec filesystem registered on each
connection, Polars natively with `layout.storage_options`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import re
import tempfile
import zlib
from pathlib import Path

from .core import Warehouse
from .errors import NotAWarehouse, WarehouseError
from .layout import Layout
from .locks import locked
from .names import is_valid_name
from .parts import write_bytes_atomic

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_URL_OR_ITS_PATH = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:/")
S3_PROTOCOLS = ("s3", "s3a")


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def is_url(text) -> bool:
    """Is `text` a URL (s3://..., memory://...) rather than a local path?"""
    return isinstance(text, str) and bool(_URL.match(text))


def refuse_url(path, fix: str | None = None, refusal: str = "is read-only here") -> None:
    """Writes go to local warehouses only: a URL root is read in place, and filled with `whq push`.

    A URL that went through pathlib (a command's Path argument) has lost a slash: s3:/bucket/prefix.
    """
    if _URL_OR_ITS_PATH.match(str(path)):
        fix = fix or f"write a local warehouse, then copy its runs there with `whq push WAREHOUSE {path}`"
        raise WarehouseError(f"{path} {refusal}: {fix}")


class Remote:
    """A warehouse root at `url`; `endpoint_url` overrides AWS_ENDPOINT_URL for s3:// roots."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0].lower()
        self.storage_options: dict | None = None
        self.endpoint = ""
        if self.protocol in S3_PROTOCOLS:
            self.fs, self.storage_options, self.endpoint = _s3(endpoint_url)
        else:
            try:
                self.fs = fsspec.filesystem(self.protocol)
            except (ImportError, ValueError) as err:
                raise WarehouseError(
                    f"cannot open {self.url}: {err}; use s3://, file://, memory:// or another fsspec URL whose "
                    f"package is installed"
                ) from None
        self.path = self.fs._strip_protocol(self.url).rstrip("/")
        self.bucket = self.path.split("/", 1)[0]
        self.local = self.protocol in ("file", "local")  # a folder of this machine: local folders' rules hold

    def key(self, rel: str) -> str:
        """The filesystem path of `rel` (a path relative to the warehouse root)."""
        return f"{self.path}/{rel}"

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def read(self, rel: str) -> bytes | None:
        """The object's bytes, None when it does not exist."""
        with self.errors():
            try:
                return self.fs.cat_file(self.key(rel))
            except FileNotFoundError as err:
                if _missing_bucket(err):
                    raise
                return None

    def write(self, rel: str, payload: bytes) -> None:
        """One PUT: on S3 the object appears whole or not at all."""
        with self.errors():
            if self.protocol not in S3_PROTOCOLS:  # a folder tree (file://) needs its folders; a bucket does not
                self.fs.makedirs(self.fs._parent(self.key(rel)), exist_ok=True)
            self.fs.pipe_file(self.key(rel), payload)

    def write_many(self, payloads: dict[str, bytes]) -> dict[str, dict | None]:
        """PUT every {rel: bytes} concurrently; {rel: the storage's answer (S3: its ETag), None if it gave none}."""
        if not payloads:
            return {}
        rels = list(payloads)
        with self.errors():
            if self.protocol not in S3_PROTOCOLS:
                for folder in {self.fs._parent(self.key(rel)) for rel in rels}:
                    self.fs.makedirs(folder, exist_ok=True)
            answers = self.fs.pipe({self.key(rel): payloads[rel] for rel in rels})
        answers = answers if isinstance(answers, list) and len(answers) == len(rels) else [None] * len(rels)
        return {rel: answer if isinstance(answer, dict) else None for rel, answer in zip(rels, answers)}

    def read_many(self, rels: list[str]) -> dict[str, bytes | None]:
        """GET every object concurrently; None for one that does not exist."""
        if not rels:
            return {}
        # One GET an object: s3fs's cat otherwise asks each object's size first (a HEAD), to split large ones.
        single = {"max_concurrency": 1} if self.protocol in S3_PROTOCOLS else {}
        with self.errors():
            found = self.fs.cat([self.key(rel) for rel in rels], on_error="return", **single)
        out = {}
        for rel in rels:
            value = found.get(self.key(rel))
            if isinstance(value, FileNotFoundError) and not _missing_bucket(value):
                value = None
            elif isinstance(value, Exception):
                raise self.explain(value)
            out[rel] = value
        return out

    def arrived(self, rel: str, answer: dict | None, data: bytes, sha256: str) -> bool:
        """Did the PUT of `rel` store exactly `data`? S3 answers a single PUT with the CRC32 of what it
        stored (when the client sent one, as botocore does) and an ETag that is its MD5; other filesystems
        are asked again. The CRC32 is compared first: it costs a fifth of an MD5."""
        answer = answer or {}
        if self.protocol in S3_PROTOCOLS:
            crc = str(answer.get("ChecksumCRC32", ""))
            if crc and "-" not in crc and answer.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
                return crc == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
            etag = str(answer.get("ETag", "")).strip('"')
            if etag and "-" not in etag:
                return etag == _md5(data)
        return self.same_object(rel, None, data, sha256)

    def listing(self, rel: str) -> dict[str, dict]:
        """{path relative to the root: the storage's info (size, ETag)} for every object under `rel`."""
        with self.errors():
            try:
                found = self.fs.find(self.key(rel), detail=True)
            except FileNotFoundError as err:
                if _missing_bucket(err):
                    raise
                return {}
        prefix = self.path + "/"
        return {name[len(prefix) :]: info for name, info in found.items() if name.startswith(prefix)}

    def manifests(self) -> dict[str, bytes]:
        """{run id: manifest bytes} of every run committed at this root."""
        names = [rel for rel in self.listing("runs") if rel.count("/") == 1 and rel.endswith(".json")]
        runs = {Path(rel).stem: rel for rel in names if is_valid_name(Path(rel).stem)}
        if not runs:
            return {}
        with self.errors():
            payloads = self.fs.cat([self.key(rel) for rel in runs.values()])
        return {run: payloads[self.key(rel)] for run, rel in runs.items()}

    def same_object(self, rel: str, info: dict | None, data: bytes, sha256: str) -> bool:
        """Does the object at `rel` (`info` from a listing, None to ask) hold exactly `data` (of digest `sha256`)?

        S3's ETag of a single-PUT object is its MD5; other filesystems are read back and hashed.
        """
        with self.errors():
            if info is None:
                try:
                    info = self.fs.info(self.key(rel))
                except FileNotFoundError:
                    return False
            if info.get("size") != len(data):
                return False
            etag = str(info.get("ETag", "")).strip('"')
            if self.protocol in S3_PROTOCOLS and etag and "-" not in etag:
                return etag == _md5(data)
            return hashlib.sha256(self.fs.cat_file(self.key(rel))).hexdigest() == sha256

    @contextlib.contextmanager
    def errors(self):
        """Storage failures as one WarehouseError line naming the fix."""
        try:
            yield
        except WarehouseError:
            raise
        except Exception as err:  # s3fs, botocore and aiohttp raise many types for one cause
            raise self.explain(err) from None

    def explain(self, err: Exception) -> WarehouseError:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        where = f" at {self.endpoint}" if self.endpoint else ""
        if _missing_bucket(err):
            return WarehouseError(
                f"bucket {self.bucket!r} does not exist{where}: create it (e.g. `aws s3 mb s3://{self.bucket}`) "
                f"or fix the URL {self.url}"
            )
        anonymous = getattr(self.fs, "anon", False) and isinstance(err, PermissionError)
        if _no_credentials(err) or anonymous:
            return WarehouseError(
                f"no credentials for {self.url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if isinstance(err, PermissionError) or "AccessDenied" in reason or "Forbidden" in reason:
            return WarehouseError(
                f"access to {self.url}{where} denied ({reason}): check AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions"
            )
        if _unreachable(err):
            return WarehouseError(
                f"cannot reach the storage of {self.url}{where} ({reason}): check that the server is up and "
                f"AWS_ENDPOINT_URL (or --endpoint-url) names it"
            )
        return WarehouseError(f"storage error on {self.url}{where}: {reason}; check the URL and retry")


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _missing_bucket(err: BaseException) -> bool:
    return any("NoSuchBucket" in repr(e) or "bucket does not exist" in str(e) for e in _chain(err))


def _no_credentials(err: BaseException) -> bool:
    return any(type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError") for e in _chain(err))


def _unreachable(err: BaseException) -> bool:
    names = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError"}
    for e in _chain(err):
        if type(e).__name__ in names or "ServerDisconnected" in type(e).__name__:
            return True
        if isinstance(e, (ConnectionError, TimeoutError)) or getattr(e, "errno", None) == errno.ECONNREFUSED:
            return True
    return False


def _s3(endpoint_url: str | None):
    """(s3fs filesystem, Polars storage options, endpoint) from the standard AWS settings."""
    import botocore.session
    import s3fs

    session = botocore.session.Session()  # env vars, AWS_PROFILE, ~/.aws/config and credentials
    try:
        credentials = session.get_credentials()
        region = session.get_config_variable("region") or "us-east-1"
    except Exception as err:  # a profile that does not exist, an unreadable config file
        raise WarehouseError(f"cannot read the AWS settings ({err}): fix AWS_PROFILE or ~/.aws/config") from None
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    options: dict = {"aws_region": region}
    fs_args: dict = {
        "client_kwargs": {"region_name": region},
        # Fail fast on an unreachable endpoint: botocore's own retries, not minutes of them.
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}},
    }
    if endpoint:
        fs_args["endpoint_url"] = endpoint
        options["aws_endpoint_url"] = endpoint
        if endpoint.startswith("http://"):
            options["aws_allow_http"] = "true"
    if credentials is None:  # a public bucket
        fs_args["anon"] = True
        options["aws_skip_signature"] = "true"
    else:
        frozen = credentials.get_frozen_credentials()
        fs_args.update(key=frozen.access_key, secret=frozen.secret_key, token=frozen.token)
        options.update(aws_access_key_id=frozen.access_key, aws_secret_access_key=frozen.secret_key)
        if frozen.token:
            options["aws_session_token"] = frozen.token
    return s3fs.S3FileSystem(**fs_args), options, endpoint


class RemoteLayout(Layout):
    """The local shadow of a remote root: metadata and catalog here, parts named by URL."""

    def __init__(self, shadow: Path, remote: Remote):
        super().__init__(shadow)
        self.remote = remote
        self.storage_options = remote.storage_options

    def part_path(self, rel: str) -> str:
        return self.remote.url_of(rel)

    def opened_as(self, paths: list[str]) -> list[str]:
        """DuckDB names a file of a registered filesystem by its protocol and the filesystem's own path: a part
        at memory://bucket/x is opened as memory:///bucket/x (an s3:// or file:// URL is its own name)."""
        fs, protocol = self.remote.fs, self.remote.protocol
        return list(dict.fromkeys([*paths, *(f"{protocol}://{fs._strip_protocol(path)}" for path in paths)]))

    def prepare(self, con) -> None:
        con.register_filesystem(self.remote.fs)


def shadow_folder(url: str, endpoint: str) -> Path:
    """Where the shadow of a remote root lives: one folder per (URL, endpoint) and user."""
    name = hashlib.sha256(f"{url}\n{endpoint}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"whq-remote-{os.getuid()}" / name


class RemoteWarehouse(Warehouse):
    """A read-only warehouse at a URL: `warehouse.open("s3://bucket/prefix")`."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        remote = Remote(url, endpoint_url)
        self.url = remote.url
        self.layout = RemoteLayout(shadow_folder(remote.url, remote.endpoint), remote)
        self.refresh()

    def refresh(self, force: bool = False) -> None:
        """Read the root's manifests again, then rebuild the catalog where they changed: runs pushed since
        the open become visible, runs deleted there disappear."""
        remote = self.layout.remote
        marker = remote.read("whq.json")
        if marker is None:
            raise NotAWarehouse(
                f"{remote.url} is not a whq warehouse: push one there with `whq push WAREHOUSE {remote.url}`"
            )
        self._mirror(marker, remote.manifests(), remote.read("quarantine.json"))
        super().refresh(force)

    @property
    def root(self) -> str:
        return self.url

    def _mirror(self, marker: bytes, manifests: dict[str, bytes], quarantine: bytes | None) -> None:
        """Make the shadow's metadata files equal the root's (only changed files are rewritten, so the
        catalog's fingerprint changes exactly when the root's manifests do)."""
        layout = self.layout
        try:
            layout.runs_dir.mkdir(parents=True, exist_ok=True)
            with locked(layout.commit_lock):
                wanted = {layout.marker: marker, layout.quarantine: quarantine}
                wanted.update({layout.manifest(run): payload for run, payload in manifests.items()})
                for path in layout.runs_dir.glob("*.json"):
                    if path not in wanted:
                        path.unlink()
                for path, payload in wanted.items():
                    if payload is None:
                        path.unlink(missing_ok=True)
                    elif not path.is_file() or path.read_bytes() != payload:
                        write_bytes_atomic(payload, path, layout.tmp_dir, "shadow")
        except OSError as err:
            raise WarehouseError(
                f"cannot write the local catalog of {self.url} in {layout.root}: {err.strerror or err}; "
                f"free space there or point TMPDIR at a writable folder"
            ) from None
        from . import metadata

        metadata.format_version(layout)

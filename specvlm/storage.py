"""Local paths and ``s3://`` URIs: one filesystem layer for model folders, job inputs and outputs, manifests.

S3 goes through pyarrow's S3 filesystem with the standard AWS environment (credentials,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for
S3-compatible stores); `job_env` is that environment, for the runtime_env of a Ray job's
tasks and actors. No Ray here: the engine library loads ``s3://`` model folders with `mirror`.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

import pyarrow.fs as pafs

from .media import MediaError

MANIFEST_SUFFIXES = (".parquet", ".jsonl")  # manifests of the caption and distill jobs
# environment a job's tasks and actors get from the driver (S3 access, the model cache)
FORWARDED_ENV = (
    "SPECVLM_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)  # fmt: skip

_FILESYSTEMS: dict[str, pafs.FileSystem] = {}


def job_env() -> dict[str, str]:
    """The driver's `FORWARDED_ENV` variables that are set, for the job's ``runtime_env``.

    Under ``ray job submit`` the variables the submission's runtime_env already sets are left
    out (Ray refuses to merge the same key twice).
    """
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    submitted = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if submitted:
        taken = (json.loads(submitted).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in taken}
    return env


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> ``(bucket, "key/prefix")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key.strip("/")


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint from the environment (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or an ``s3://bucket/key`` URI (filesystems cached per process)."""
    if uri.startswith("s3://"):
        if "s3" not in _FILESYSTEMS:
            kw = {}
            endpoint = s3_endpoint()
            if endpoint:
                u = urlsplit(endpoint)
                kw = {"endpoint_override": u.netloc or u.path, "scheme": u.scheme or "https"}
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region or endpoint:
                kw["region"] = region or "us-east-1"  # a custom endpoint has no region to look up
            _FILESYSTEMS["s3"] = pafs.S3FileSystem(**kw)
        return _FILESYSTEMS["s3"], uri[len("s3://") :].rstrip("/")
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or s3://")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def to_uri(uri_like: str, path: str) -> str:
    """A filesystem path back to a URI of the same kind as ``uri_like``."""
    return f"s3://{path}" if uri_like.startswith("s3://") else path


class ReadError(Exception):
    """The bytes of one input could not be fetched; ``str`` is the message after ``read: ``."""


def read_bytes(uri: str, max_bytes: int) -> bytes:
    """All bytes of ``uri``; raises `ReadError` (missing, forbidden, not a file) or `MediaError` (too large).

    ``uri`` is a local path, ``s3://bucket/key``, or a ``file://`` URI (a percent-encoded name that
    is not UTF-8, read through Python's own file API since pyarrow takes UTF-8 paths only).
    """
    try:
        if uri.startswith("file://"):
            path = os.fsdecode(unquote_to_bytes(uri[len("file://") :]))
            if not os.path.exists(path):
                raise ReadError(f"not found: {uri}")
            if not os.path.isfile(path):
                raise ReadError(f"not a file: {uri}")
            if os.path.getsize(path) > max_bytes:
                raise MediaError("too_large", f"{os.path.getsize(path)} bytes > max_bytes={max_bytes}")
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        else:
            fs, path = filesystem(uri)
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise ReadError(f"not found: {uri}")
            if info.type != pafs.FileType.File:
                raise ReadError(f"not a file: {uri}")
            if info.size is not None and info.size > max_bytes:
                raise MediaError("too_large", f"{info.size} bytes > max_bytes={max_bytes}")
            with fs.open_input_stream(path) as f:
                data = f.read(max_bytes + 1)
    except (ReadError, MediaError):
        raise
    except Exception as e:  # pyarrow raises OSError subclasses with the store's message (e.g. ACCESS_DENIED)
        text = str(e)
        if isinstance(e, PermissionError) or "ACCESS_DENIED" in text or "AccessDenied" in text:
            raise ReadError(f"access denied: {uri}") from e
        raise ReadError(f"{uri}: {type(e).__name__}: {text}") from e
    if len(data) > max_bytes:
        raise MediaError("too_large", f"more than max_bytes={max_bytes} bytes")
    return data


def mirror(uri: str, dest: Path) -> int:
    """Copy every object under the ``s3://`` prefix ``uri`` into the local folder ``dest`` (same relative
    paths); returns the number of files. Raises FileNotFoundError when the prefix holds none."""
    fs, root = filesystem(uri)
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        entries = []
    files = [e.path for e in entries if e.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"no objects under {uri}")
    local = pafs.LocalFileSystem()
    for path in files:
        out = Path(dest) / path[len(root) :].lstrip("/")
        out.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(out), source_filesystem=fs, destination_filesystem=local)
    return len(files)


# ----------------------------------------------------------------------------- manifests
def is_manifest(uri: str) -> bool:
    """Whether ``uri`` names a manifest file (a `MANIFEST_SUFFIXES` suffix, any case)."""
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def check_manifest(uri: str) -> str:
    """``uri`` when it names a manifest, else ValueError listing the suffixes (for config validators)."""
    if not is_manifest(uri):
        raise ValueError(f"{uri!r} is not a manifest; expected a file ending in {', '.join(MANIFEST_SUFFIXES)}")
    return uri


def resolve(uri: str, base: str | None) -> str:
    """``uri`` as it is, or, when it is a relative path and ``base`` is given, joined to ``base`` (a folder's
    path or URI, e.g. `manifest_base`)."""
    if base is None or "://" in uri or posixpath.isabs(uri):
        return uri
    return posixpath.join(base, uri)


def manifest_base(uri: str) -> str:
    """The folder relative paths in a manifest are resolved against: the manifest's own (absolute)."""
    fs, path = filesystem(uri)
    return to_uri(uri, posixpath.dirname(path))


def manifest_columns(uri: str) -> list[str]:
    """Column names of a parquet manifest (its footer); raises FileNotFoundError when there is no such file."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"manifest {uri} does not exist")
    return pq.read_schema(path, filesystem=fs).names

"""Caption job I/O: what the input is, how bytes become decoded rows, what the output folder holds.

Plain functions over pyarrow tables: the Ray Data stages in `pipelines.caption`
call them (``map_batches(..., batch_format="pyarrow")``) and the tests call
them directly, without a cluster.

Rows between the stages (`LISTED_SCHEMA`)::

    id       unique per input: a path relative to the input folder/prefix, "<shard>/<key>" for a
             webdataset sample, or the manifest's id
    uri      local absolute path or s3://bucket/key (a tar sample: "<shard uri>#<member>")
    prompt   the manifest's prompt, else null (the job's prompt applies)
    name     what the media kind is read from (the file or tar member name)
    data     the bytes when already read (tar members), else null: `decode_rows` reads `uri`
    error    set when a row is already known to be bad (e.g. an unreadable tar shard)

`decode_rows` turns them into `actors.captioner.Captioner`'s input: raw RGB
``pixels`` + ``width``/``height``, or ``error`` = ``"kind: message"``.

Filesystems: local paths, and ``s3://`` through pyarrow's S3 filesystem with
the standard AWS environment (credentials, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for S3-compatible stores).
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from specvlm.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, MediaLimits, media_kind

SHARD_SUFFIX = ".tar"
MANIFEST_SUFFIXES = (".parquet", ".jsonl")
# environment the job's tasks and actors get from the driver (S3 access, the model cache)
FORWARDED_ENV = (
    "SPECVLM_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)  # fmt: skip

LISTED_SCHEMA = pa.schema(
    [("id", pa.string()), ("uri", pa.string()), ("prompt", pa.string()), ("name", pa.string()),
     ("data", pa.binary()), ("error", pa.string())]
)  # fmt: skip
DECODED_SCHEMA = pa.schema(
    [("id", pa.string()), ("uri", pa.string()), ("prompt", pa.string()), ("pixels", pa.binary()),
     ("width", pa.int32()), ("height", pa.int32()), ("error", pa.string())]
)  # fmt: skip


# ----------------------------------------------------------------------------- filesystems
_FILESYSTEMS: dict[str, pafs.FileSystem] = {}


def job_env() -> dict[str, str]:
    """The driver's `FORWARDED_ENV` variables that are set, for the job's ``runtime_env``.

    Under ``ray job submit`` the variables the submission's runtime_env already sets are left
    out (Ray refuses to merge the same key twice).
    """
    import json

    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    submitted = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if submitted:
        taken = (json.loads(submitted).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in taken}
    return env


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or an ``s3://bucket/key`` URI (filesystems cached per process)."""
    if uri.startswith("s3://"):
        if "s3" not in _FILESYSTEMS:
            kw = {}
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
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
    """All bytes of ``uri``; raises `ReadError` (missing, forbidden, not a file) or `MediaError` (too large)."""
    try:
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


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """What an ``--input`` holds, listed on the driver."""

    files: list[dict] = field(default_factory=list)  # {"id", "uri"}: images and videos
    shards: list[dict] = field(default_factory=list)  # {"id", "uri"}: webdataset .tar shards
    manifest: str | None = None  # a .parquet / .jsonl manifest URI
    ignored: int = 0  # files with other extensions in the folder


def _is_hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def list_inputs(uri: str) -> Inputs:
    """List a folder/prefix (recursively), or take one manifest, shard or media file.

    Ids of listed files are their paths relative to the folder; hidden files
    (a path part starting with ``.`` or ``_``) and other extensions are ignored.
    """
    if uri.lower().endswith(MANIFEST_SUFFIXES):
        return Inputs(manifest=uri)
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri} does not exist (a folder, an s3:// prefix, a manifest or a file)")
    if info.type == pafs.FileType.File:
        entries, root = [info], posixpath.dirname(root)
    else:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    out = Inputs()
    for e in sorted(entries, key=lambda e: e.path):
        if e.type != pafs.FileType.File:
            continue
        rel = e.path[len(root) :].lstrip("/")
        if _is_hidden(rel):
            continue
        row = {"id": rel, "uri": to_uri(uri, e.path)}
        if rel.lower().endswith(SHARD_SUFFIX):
            out.shards.append(row)
        elif media_kind(rel) is not None:
            out.files.append(row)
        else:
            out.ignored += 1
    return out


def listed_table(rows: list[dict]) -> pa.Table:
    """Rows ``{"id", "uri"}`` (and optionally ``prompt``, ``name``, ``data``, ``error``) as a `LISTED_SCHEMA` table."""
    cols = {
        "id": [r["id"] for r in rows],
        "uri": [r["uri"] for r in rows],
        "prompt": [r.get("prompt") for r in rows],
        "name": [r.get("name", r["uri"]) for r in rows],
        "data": [r.get("data") for r in rows],
        "error": [r.get("error") for r in rows],
    }
    return pa.Table.from_pydict(cols, schema=LISTED_SCHEMA)


def expand_shards(batch: pa.Table, max_bytes: int, chunk_rows: int = 32) -> Iterator[pa.Table]:
    """Webdataset ``.tar`` shards ``{"id", "uri"}`` -> one listed row per sample, bytes included.

    A sample is the members sharing a key (the member path up to the first dot
    of its basename); its first image/video member is captioned, other members
    are ignored. Sample ids are ``"<shard id>/<key>"``. A shard that cannot be
    read, or breaks off mid-way, gives one error row with the shard's id (the
    samples before the break are kept). Members over ``max_bytes`` become
    ``too_large`` rows without being read.
    """
    for shard in batch.select(["id", "uri"]).to_pylist():
        rows, seen = [], set()
        try:
            fs, path = filesystem(shard["uri"])
            with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile() or media_kind(member.name) is None:
                        continue
                    base = posixpath.basename(member.name)
                    key = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
                    if key in seen:
                        continue
                    seen.add(key)
                    row = {"id": f"{shard['id']}/{key}", "uri": f"{shard['uri']}#{member.name}", "name": member.name}
                    if member.size > max_bytes:
                        row["error"] = str(MediaError("too_large", f"{member.size} bytes > max_bytes={max_bytes}"))
                    else:
                        row["data"] = tar.extractfile(member).read()
                    rows.append(row)
                    if len(rows) >= chunk_rows:
                        yield listed_table(rows)
                        rows = []
        except Exception as e:  # tarfile.ReadError, OSError from the store, EOF mid-member
            kind = "read" if isinstance(e, OSError) and not isinstance(e, tarfile.TarError) else "decode"
            msg = f"tar shard {shard['uri']} after {len(seen)} samples: {type(e).__name__}: {e}"
            rows.append({"id": shard["id"], "uri": shard["uri"], "error": f"{kind}: {msg}"})
        if rows:
            yield listed_table(rows)


def manifest_columns(uri: str) -> list[str]:
    """Column names of a manifest, read on the driver (parquet footer, or the first JSON line)."""
    import json

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"manifest {uri} does not exist")
    if path.lower().endswith(".parquet"):
        return pq.read_schema(path, filesystem=fs).names
    with fs.open_input_stream(path) as f:
        for line in io.TextIOWrapper(f, encoding="utf-8"):
            if line.strip():
                return list(json.loads(line))
    return []


def normalize_manifest(batch: pa.Table, base: str) -> pa.Table:
    """Manifest rows (``id``, ``uri``, optional ``prompt``) -> `LISTED_SCHEMA`; relative uris resolved against ``base``.

    A row without an id takes its uri as id; a row without a uri is a ``read`` error.
    """
    names = batch.column_names
    rows = []
    for r in batch.select([c for c in ("id", "uri", "prompt") if c in names]).to_pylist():
        uri = r.get("uri")
        uri = str(uri).strip() if uri is not None else ""
        if uri and "://" not in uri and not posixpath.isabs(uri):
            uri = posixpath.join(base, uri)
        rid = r.get("id")
        rid = str(rid) if rid is not None and str(rid) != "" else uri
        prompt = r.get("prompt")
        row = {"id": rid, "uri": uri, "prompt": str(prompt) if prompt not in (None, "") else None}
        if not uri:
            row["error"] = "read: manifest row has no uri"
        rows.append(row)
    return listed_table(rows)


def drop_done(batch: pa.Table, done: pa.Array) -> pa.Table:
    """Rows whose id is not in ``done`` (ids already in the output)."""
    if len(done) == 0:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch["id"], value_set=done)))


# ----------------------------------------------------------------------------- decode
@dataclass(frozen=True)
class DecodeOptions:
    """How `decode_rows` turns bytes into one RGB image per row."""

    limits: MediaLimits = MediaLimits()
    prompt: str | None = None  # for every row without its own prompt; None = per media kind:
    image_prompt: str = "describe the image."
    video_prompt: str = "describe the video."
    video_frames: int = 4  # sampled uniformly, tiled on a grid into one image
    video_tile_cols: int = 2
    max_side: int | None = 1344  # larger images are downscaled (aspect kept) before they travel to the actors
    max_aspect_ratio: float = 20.0  # longer side / shorter side; beyond it processors blow up, so it is an error


def _prompt(row: dict, opts: DecodeOptions) -> str:
    if row.get("prompt"):
        return row["prompt"]
    if opts.prompt:
        return opts.prompt
    return opts.video_prompt if media_kind(row.get("name") or row["uri"]) == "video" else opts.image_prompt


def decode_one(data: bytes, name: str, opts: DecodeOptions):
    """Bytes -> one RGB PIL image (a video's frames tiled); raises `MediaError`."""
    from PIL import Image

    from specvlm.media import decode_image, decode_video, tile_frames

    kind = media_kind(name)
    if kind == "image":
        image = decode_image(data, opts.limits)
    elif kind == "video":
        frames = decode_video(data, opts.limits, num_frames=min(opts.video_frames, opts.limits.max_frames))
        size = min(frames[0].width, opts.max_side) if opts.max_side else None
        image = tile_frames(frames, cols=opts.video_tile_cols, size=size)
    else:
        known = ", ".join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))
        raise MediaError("unsupported", f"unknown file type for {name!r} (expected one of: {known})")
    w, h = image.size
    if max(w, h) / min(w, h) > opts.max_aspect_ratio:
        raise MediaError("too_large", f"aspect ratio {w}x{h} > max_aspect_ratio={opts.max_aspect_ratio:g}")
    if opts.max_side and max(w, h) > opts.max_side:
        scale = opts.max_side / max(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    return image


def decode_rows(batch: pa.Table, opts: DecodeOptions) -> pa.Table:
    """`LISTED_SCHEMA` rows -> `DECODED_SCHEMA` rows: read (when needed) and decode; bad rows get ``error``."""
    out = {name: [] for name in DECODED_SCHEMA.names}
    for r in batch.to_pylist():
        pixels = width = height = None
        error = r.get("error")
        if error is None:
            try:
                data = r["data"] if r.get("data") is not None else read_bytes(r["uri"], opts.limits.max_bytes)
                image = decode_one(data, r.get("name") or r["uri"], opts)
                pixels, (width, height) = image.tobytes(), image.size
            except ReadError as e:
                error = f"read: {e}"
            except MediaError as e:
                error = str(e)
        for k, v in (("id", r["id"]), ("uri", r["uri"]), ("prompt", _prompt(r, opts)), ("pixels", pixels),
                     ("width", width), ("height", height), ("error", error)):  # fmt: skip
            out[k].append(v)
    return pa.Table.from_pydict(out, schema=DECODED_SCHEMA)


# ----------------------------------------------------------------------------- output
def output_files(uri: str) -> list[str]:
    """Parquet part files directly under the output folder/prefix (hidden ``_``/``.`` files excluded), sorted."""
    fs, root = filesystem(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = [e.path for e in entries if e.type == pafs.FileType.File and e.path.endswith(".parquet")]
    return sorted(p for p in names if not posixpath.basename(p).startswith(("_", ".")))


def _read_ids(fs: pafs.FileSystem, path: str) -> pa.Array:
    return pq.read_table(path, columns=["id"], filesystem=fs)["id"].combine_chunks()


@dataclass
class OutputState:
    done: pa.Array  # ids already written (unique)
    files: int
    partial: list[str]  # unreadable files moved aside as "_partial-<name>"


def scan_output(uri: str) -> OutputState:
    """Ids already in the output; part files that do not read (a crash mid-write) are moved aside."""
    fs, _ = filesystem(uri)
    ids, partial, files = [], [], output_files(uri)
    for path in files:
        try:
            ids.append(_read_ids(fs, path))
        except (pa.ArrowException, OSError):
            moved = posixpath.join(posixpath.dirname(path), "_partial-" + posixpath.basename(path))
            fs.move(path, moved)
            partial.append(to_uri(uri, moved))
    done = pa.chunked_array(ids, type=pa.string()).combine_chunks() if ids else pa.array([], pa.string())
    return OutputState(pc.unique(done), len(files) - len(partial), partial)


def dedupe_output(uri: str) -> int:
    """Make every id appear once in the output: rows whose id an earlier file (by name) or row already holds are
    removed, by rewriting the affected files (write aside, then move over). Returns the rows removed."""
    fs, _ = filesystem(uri)
    seen: set[str] = set()
    removed = 0
    for path in output_files(uri):
        ids = _read_ids(fs, path).to_pylist()
        keep = []
        for i in ids:
            keep.append(i not in seen)
            seen.add(i)
        if all(keep):
            continue
        table = pq.read_table(path, filesystem=fs).filter(pa.array(keep))
        tmp = posixpath.join(posixpath.dirname(path), "_dedupe-" + posixpath.basename(path))
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, path)
        removed += len(ids) - table.num_rows
    return removed


def read_output(uri: str, columns: list[str] | None = None, prefix: str | None = None) -> pa.Table:
    """The output's rows (part files whose name starts with ``prefix``, or all)."""
    from actors.captioner import OUTPUT_SCHEMA

    fs, _ = filesystem(uri)
    paths = [p for p in output_files(uri) if prefix is None or posixpath.basename(p).startswith(prefix)]
    schema = OUTPUT_SCHEMA if columns is None else pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
    tables = [pq.read_table(p, columns=schema.names, filesystem=fs) for p in paths]
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def write_text(uri: str, name: str, text: str) -> str:
    """Write ``text`` to ``<uri>/<name>``; returns its URI."""
    fs, root = filesystem(uri)
    path = posixpath.join(root, name)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
    return to_uri(uri, path)

"""Caption job I/O: what the input is, how bytes become decoded rows, what the output folder holds.

Plain functions over pyarrow tables: the Ray Data stages in `pipelines.caption`
call them (``map_batches(..., batch_format="pyarrow")``) and the tests call
them directly, without a cluster.

Rows between the stages (`LISTED_SCHEMA`)::

    id       unique per input: a path relative to the input folder/prefix (`escape_name`), "<shard>/<key>"
             for a webdataset sample, the manifest's id (a string, `manifest_id`), or "<manifest>#L<n>"
             for a bad manifest line
    uri      local absolute path, a percent-encoded file:// URI for a path that is not UTF-8 (`local_uri`),
             or s3://bucket/key (a tar sample: "<shard uri>#<member>")
    prompt   the manifest's prompt, else null (the job's prompt applies)
    name     what the media kind is read from (the file or tar member name)
    data     the bytes when already read (tar members), else null: `decode_rows` reads `uri`
    error    set when a row is already known to be bad (e.g. an unreadable tar shard)

`decode_rows` turns them into `actors.captioner.Captioner`'s input: raw RGB
``pixels`` + ``width``/``height`` (one image, or for a model that takes videos
natively a video's ``frames`` frames and their ``fps``), or ``error`` = ``"kind: message"``.

Local paths and ``s3://`` URIs are read and written through `specvlm.storage`.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from specvlm.config import StrictModel
from specvlm.media import MediaError, MediaLimits, media_kind
from specvlm.storage import ReadError, filesystem, is_manifest, manifest_base, read_bytes, resolve, to_uri

SHARD_SUFFIX = ".tar"

LISTED_SCHEMA = pa.schema(
    [("id", pa.string()), ("uri", pa.string()), ("prompt", pa.string()), ("name", pa.string()),
     ("data", pa.binary()), ("error", pa.string())]
)  # fmt: skip
# frames, fps: null for an image (a tiled video is one image); a video passed natively: pixels holds that many frames
DECODED_SCHEMA = pa.schema(
    [("id", pa.string()), ("uri", pa.string()), ("prompt", pa.string()), ("pixels", pa.binary()),
     ("width", pa.int32()), ("height", pa.int32()), ("frames", pa.int32()), ("fps", pa.float64()),
     ("error", pa.string())]
)  # fmt: skip


# ----------------------------------------------------------------------------- inputs
def escape_name(name: str) -> str:
    """A listed name as it goes into ``id``/``uri``: unchanged when it is valid UTF-8, else percent-encoded.

    Python lists undecodable bytes as surrogates (``surrogateescape``), which parquet cannot store. Such a
    name becomes ``urllib.parse.quote`` of its bytes (``/`` kept, ``%`` itself escaped), so
    ``urllib.parse.unquote_to_bytes(id)`` gives the bytes on disk back.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return quote(name.encode("utf-8", "surrogateescape"), safe="/")


def local_uri(path: str) -> str:
    """A local absolute path as a ``uri``: the path itself, or a percent-encoded ``file://`` URI when it is not
    valid UTF-8 (`read_bytes` reads both)."""
    escaped = escape_name(path)
    return path if escaped == path else "file://" + escaped


@dataclass
class Inputs:
    """What an ``--input`` holds, listed on the driver."""

    files: list[dict] = field(default_factory=list)  # {"id", "uri"}: images and videos
    shards: list[dict] = field(default_factory=list)  # {"id", "uri"}: webdataset .tar shards
    manifest: str | None = None  # a .parquet / .jsonl manifest URI (absolute)
    ignored: Counter = field(default_factory=Counter)  # entries that are no input, by reason (IGNORE_REASONS)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> the first few ignored paths

    def ignore(self, reason: str, path: str) -> None:
        assert reason in IGNORE_REASONS, reason
        self.ignored[reason] += 1
        if len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(escape_name(path))


IGNORE_REASONS = {
    "not_media": "a file whose extension is no image, video or .tar",
    "hidden": "a name starting with '.' (a hidden folder counts once; it is not listed)",
    "broken_symlink": "a symbolic link to nothing",
    "not_a_file": "a FIFO, socket or device",
    "unreadable_folder": "a folder that cannot be listed (permission denied)",
    "symlink_loop": "a folder already listed through another path (a symlink cycle)",
}


def _add(out: Inputs, rid: str, uri: str, path: str) -> None:
    """File ``rid`` at ``uri`` as a shard, a media file, or an ignored entry."""
    if rid.lower().endswith(SHARD_SUFFIX):
        out.shards.append({"id": rid, "uri": uri})
    elif media_kind(rid) is not None:
        out.files.append({"id": rid, "uri": uri})
    else:
        out.ignore("not_media", path)


def _walk_local(root: str, skip: str | None, out: Inputs) -> None:
    """List a local folder recursively (following symlinks, once per folder) into ``out``."""
    stack, seen = [(root, "")], set()
    while stack:
        folder, prefix = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                out.ignore("symlink_loop", folder)
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            out.ignore("unreadable_folder", folder)
            continue
        for e in entries:
            if skip is not None and (e.path == skip or e.path.startswith(skip + "/")):
                continue  # the job's own output (parts, _summary.json, _partial-*) inside the input
            if e.name.startswith("."):
                out.ignore("hidden", e.path)
            elif e.is_dir():
                stack.append((e.path, prefix + e.name + "/"))
            elif e.is_file():
                _add(out, escape_name(prefix + e.name), local_uri(e.path), e.path)
            elif e.is_symlink() and not os.path.exists(e.path):
                out.ignore("broken_symlink", e.path)
            else:
                out.ignore("not_a_file", e.path)


def list_inputs(uri: str, skip: str | None = None) -> Inputs:
    """List a folder/prefix (recursively), or take one manifest, shard or media file.

    Ids of listed files are their paths relative to the folder (`escape_name` for names that are not
    UTF-8). Every entry is an input or counted in ``Inputs.ignored`` by reason; only ``skip`` (the job's
    output folder, when it lies inside the input) is left out silently.
    """
    fs, root = filesystem(uri)
    if is_manifest(uri):
        return Inputs(manifest=to_uri(uri, root))
    skip = filesystem(skip)[1] if skip else None
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri} does not exist (a folder, an s3:// prefix, a manifest or a file)")
    out = Inputs()
    if info.type == pafs.FileType.File:
        _add(out, escape_name(posixpath.basename(root)), to_uri(uri, root) if uri.startswith("s3://") else
             local_uri(root), root)  # fmt: skip
    elif not uri.startswith("s3://"):
        _walk_local(root, skip, out)
    else:  # S3 keys are UTF-8 and have no links or special files
        for e in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            rel = e.path[len(root) :].lstrip("/")
            if e.type != pafs.FileType.File or (skip is not None and (e.path + "/").startswith(skip + "/")):
                continue
            if any(part.startswith(".") for part in rel.split("/")):
                out.ignore("hidden", to_uri(uri, e.path))
            else:
                _add(out, rel, to_uri(uri, e.path), to_uri(uri, e.path))
    out.files.sort(key=lambda r: r["id"])
    out.shards.sort(key=lambda r: r["id"])
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
    are ignored. Sample ids are ``"<shard id>/<key>"`` (`escape_name` applied). A shard that cannot be
    read, or breaks off mid-way, gives one error row with the shard's id (the
    samples before the break are kept); so does a shard without any image or video member
    (``empty: ...``). Members over ``max_bytes`` become ``too_large`` rows without being read.
    """
    for shard in batch.select(["id", "uri"]).to_pylist():
        rows, seen, members = [], set(), 0
        try:
            fs, path = filesystem(shard["uri"])
            with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    members += 1
                    if not member.isfile() or media_kind(member.name) is None:
                        continue
                    base = posixpath.basename(member.name)
                    key = escape_name(posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0]))
                    if key in seen:
                        continue
                    seen.add(key)
                    name = escape_name(member.name)
                    row = {"id": f"{shard['id']}/{key}", "uri": f"{shard['uri']}#{name}", "name": name}
                    if member.size > max_bytes:
                        row["error"] = str(MediaError("too_large", f"{member.size} bytes > max_bytes={max_bytes}"))
                    else:
                        row["data"] = tar.extractfile(member).read()
                    rows.append(row)
                    if len(rows) >= chunk_rows:
                        yield listed_table(rows)
                        rows = []
            if not seen:
                msg = f"tar shard {shard['uri']} holds no image or video member ({members} other members)"
                rows.append({"id": shard["id"], "uri": shard["uri"], "error": f"empty: {msg}"})
        except Exception as e:  # tarfile.ReadError, OSError from the store, EOF mid-member
            kind = "read" if isinstance(e, OSError) and not isinstance(e, tarfile.TarError) else "decode"
            msg = f"tar shard {shard['uri']} after {len(seen)} samples: {type(e).__name__}: {e}"
            rows.append({"id": shard["id"], "uri": shard["uri"], "error": f"{kind}: {msg}"})
        if rows:
            yield listed_table(rows)


# ----------------------------------------------------------------------------- manifests
def manifest_id(value) -> str | None:
    """A manifest id as the output's string id: strings as they are, other JSON values as JSON text
    (``1`` -> ``"1"``, ``1.5`` -> ``"1.5"``, ``true`` -> ``"true"``); None or ``""`` -> None (the uri is the id)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if hasattr(value, "item"):  # numpy scalars from a parquet column
        value = value.item()
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def manifest_row(r: dict, base: str, where: str) -> dict:
    """One manifest record (``id``, ``uri``, optional ``prompt``) as a listed row; ``where`` names it in errors."""
    uri = r.get("uri")
    uri = str(uri).strip() if uri is not None else ""
    uri = resolve(uri, base) if uri else uri
    prompt = r.get("prompt")
    row = {"id": manifest_id(r.get("id")) or uri or where, "uri": uri,
           "prompt": str(prompt) if prompt not in (None, "") else None}  # fmt: skip
    if not uri:
        row["error"] = f"manifest: {where} has no uri"
    return row


def normalize_manifest(batch: pa.Table, base: str) -> pa.Table:
    """Parquet manifest rows (``id``, ``uri``, optional ``prompt``) -> `LISTED_SCHEMA`; relative uris resolved
    against ``base`` (`manifest_base`). A row without an id takes its uri as id; a row without a uri is a
    ``manifest`` error."""
    names = batch.column_names
    rows = batch.select([c for c in ("id", "uri", "prompt") if c in names]).to_pylist()
    return listed_table([manifest_row(r, base, "a manifest row") for r in rows])


def _lines(stream, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a pyarrow input stream, without their line ends."""
    rest = b""
    while data := stream.read(chunk):
        parts = (rest + data).split(b"\n")
        rest = parts.pop()
        yield from (p.rstrip(b"\r") for p in parts)
    if rest:
        yield rest.rstrip(b"\r")


def expand_manifest(batch: pa.Table, chunk_rows: int = 1024) -> Iterator[pa.Table]:
    """JSON-lines manifests ``{"uri"}`` (absolute) -> listed rows, one per non-blank line.

    Each line is one JSON object with ``uri`` and optional ``id``/``prompt``. A line that is not UTF-8,
    not JSON, or not an object is one ``manifest`` error row with id ``"<manifest file>#L<line>"``, so a
    bad line costs one row, not the job; ids of any JSON type become strings (`manifest_id`).
    """
    for m in batch.select(["uri"]).to_pylist():
        fs, path = filesystem(m["uri"])
        base, name = manifest_base(m["uri"]), posixpath.basename(path)
        rows = []
        with fs.open_input_stream(path) as stream:
            for n, line in enumerate(_lines(stream), 1):
                if not line.strip():
                    continue
                where = f"{name} line {n}"
                try:
                    record = json.loads(line.decode("utf-8"))
                    if not isinstance(record, dict):
                        raise ValueError(f"a JSON {type(record).__name__}, not an object")
                    rows.append(manifest_row(record, base, where))
                except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
                    text = line[:80].decode("utf-8", "replace")
                    error = f"manifest: {where} is not a JSON object with a uri ({e}): {text!r}"
                    rows.append({"id": f"{name}#L{n}", "uri": m["uri"], "error": error})
                if len(rows) >= chunk_rows:
                    yield listed_table(rows)
                    rows = []
        if rows:
            yield listed_table(rows)


def drop_done(batch: pa.Table, done: pa.Array) -> pa.Table:
    """Rows whose id is not in ``done`` (ids already in the output)."""
    if len(done) == 0:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch["id"], value_set=done)))


# ----------------------------------------------------------------------------- decode
class DecodeOptions(StrictModel):
    """How `decode_rows` turns an input's bytes into one RGB image (or a video's frames) and its prompt (the
    caption job's ``decode``)."""

    prompt: str | None = Field(
        None, description="prompt for rows without their own; None = image_prompt or video_prompt by media kind"
    )
    image_prompt: str = Field("describe the image.", min_length=1, description="prompt for images")
    video_prompt: str = Field("describe the video.", min_length=1, description="prompt for videos")
    video_frames: int = Field(
        4, ge=1, description="frames sampled uniformly per video (first and last included): the model's video input "
        "for targets that take videos (Qwen-VL), else tiled into one image",
    )  # fmt: skip
    video_tile_cols: int = Field(2, ge=1, description="columns of the video tile grid (image-only targets)")
    max_side: int | None = Field(
        1344, ge=16, description="larger images and video frames are downscaled (aspect kept) before they travel "
        "to the actors; None = never",
    )  # fmt: skip
    max_aspect_ratio: float | None = Field(
        None, ge=1.0, description="shorthand for limits.max_aspect_ratio (longer/shorter side; beyond it too_large)"
    )
    limits: MediaLimits = Field(
        MediaLimits(), description="bounds on one input (bytes, pixels, aspect ratio, frames, video length); "
        "beyond them the row is a too_large error",
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _aspect_into_limits(cls, data):
        """``max_aspect_ratio`` flows into ``limits`` (one check for images and video frames: check_dimensions)."""
        if isinstance(data, dict) and data.get("max_aspect_ratio") is not None:
            limits = data.get("limits") or {}
            limits = limits.model_dump() if isinstance(limits, MediaLimits) else dict(limits)
            given = limits.get("max_aspect_ratio")
            if given is not None and given != data["max_aspect_ratio"]:
                raise ValueError(f"max_aspect_ratio={data['max_aspect_ratio']} and limits.max_aspect_ratio={given} "
                                 "differ: set one of them")  # fmt: skip
            data = {**data, "limits": {**limits, "max_aspect_ratio": data["max_aspect_ratio"]}}
        return data

    @model_validator(mode="after")
    def _frames(self):
        if self.video_frames > self.limits.max_frames:
            raise ValueError(f"video_frames={self.video_frames} > limits.max_frames={self.limits.max_frames}")
        return self


def _prompt(row: dict, opts: DecodeOptions) -> str:
    if row.get("prompt"):
        return row["prompt"]
    if opts.prompt:
        return opts.prompt
    return opts.video_prompt if media_kind(row.get("name") or row["uri"]) == "video" else opts.image_prompt


def _fit(image, max_side: int | None):
    from PIL import Image

    w, h = image.size
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    return image


def decode_one(data: bytes, name: str, opts: DecodeOptions):
    """Bytes -> one RGB PIL image (a video's frames tiled, keeping the frame's aspect); raises `MediaError`.

    Sizes go through `specvlm.media.check_dimensions` (pixels and aspect ratio, from the header, per image
    and per video frame), and once more for the tiled grid of a video.
    """
    from specvlm.media import check_dimensions, decode_media, tile_frames

    kind, frames = decode_media(data, name, opts.limits, num_frames=min(opts.video_frames, opts.limits.max_frames))
    image = frames[0]
    if kind == "video":
        longer = max(image.size)
        image = tile_frames(frames, cols=opts.video_tile_cols, size=min(longer, opts.max_side or longer))
        check_dimensions(*image.size, opts.limits)
    return _fit(image, opts.max_side)


def decode_frames(data: bytes, opts: DecodeOptions):
    """A video's bytes -> ``(frames, fps)``: its ``video_frames`` sampled RGB frames (PIL, one size, each within
    ``max_side``), the model's own video input (Qwen-VL targets), and their frames per second from their
    timestamps (None when the stream has none, or for one frame). Raises `MediaError` (limits as `decode_one`).
    """
    from PIL import Image

    from specvlm.media import decode_video

    frames = decode_video(data, opts.limits, num_frames=min(opts.video_frames, opts.limits.max_frames))
    times = [f.info.get("time_s") for f in frames]
    span = times[-1] - times[0] if len(frames) > 1 and None not in times else 0.0
    size = frames[0].size  # (a stream that changes size mid-way: every frame at the first one's)
    frames = [_fit(f if f.size == size else f.resize(size, Image.BICUBIC), opts.max_side) for f in frames]
    return frames, (len(frames) - 1) / span if span > 0 else None


def decode_rows(batch: pa.Table, opts: DecodeOptions, native_video: bool = False) -> pa.Table:
    """`LISTED_SCHEMA` rows -> `DECODED_SCHEMA` rows: read (when needed) and decode; bad rows get ``error``.

    ``native_video``: the target takes videos (Qwen-VL): a video row holds its ``frames`` sampled frames
    (one size, concatenated in ``pixels``) and their ``fps`` (`decode_frames`), not one tiled image (`decode_one`).
    Whatever one input raises becomes that row's error (``read: ...``, a `MediaError`'s kind, or
    ``decode: <exception type>: ...`` for anything else, e.g. a codec or Pillow bug), never the batch's.
    """
    out = {name: [] for name in DECODED_SCHEMA.names}
    for r in batch.to_pylist():
        pixels = width = height = frames = fps = None
        error = r.get("error")
        if error is None:
            try:
                data = r["data"] if r.get("data") is not None else read_bytes(r["uri"], opts.limits.max_bytes)
                name = r.get("name") or r["uri"]
                video = native_video and media_kind(name) == "video"
                images, rate = decode_frames(data, opts) if video else ([decode_one(data, name, opts)], None)
                pixels, (width, height) = b"".join(im.tobytes() for im in images), images[0].size
                frames, fps = (len(images), rate) if video else (None, None)
            except ReadError as e:
                error = f"read: {e}"
            except MediaError as e:
                error = str(e)
            except Exception as e:  # one input must not fail the batch (and with it the job)
                error = f"decode: {type(e).__name__}: {e}"
        for k, v in (("id", r["id"]), ("uri", r["uri"]), ("prompt", _prompt(r, opts)), ("pixels", pixels),
                     ("width", width), ("height", height), ("frames", frames), ("fps", fps),
                     ("error", error)):  # fmt: skip
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

"""Decode image and video bytes into RGB PIL images, within limits.

Batch captioning must fail one bad row, not the job: every way an input can be
bad (empty, too big, not an image, truncated, a decompression bomb, a corrupt
video) raises one `MediaError` whose ``str`` is ``"kind: message"`` and goes
straight into the output's ``error`` column. Anything else that escapes is a
bug, not bad data.

This module knows nothing about models, tokenizers or Ray: bytes in, RGB
``PIL.Image.Image`` frames out. It needs Pillow and PyAV, not torch.

Choices a reader should know about:

- Transparent images (RGBA, LA, palette with transparency) are composited on
  white, so transparent areas do not turn black.
- 16-bit and 32-bit grayscale ("I;16", "I", "F") are scaled into 0..255, not
  clipped (Pillow's plain ``convert("RGB")`` turns most 16-bit pixels white);
  float images ("F") whose values lie in 0..1 are scaled by 255, not truncated
  to black.
- EXIF orientation is applied, so phone photos come out upright.
- Animated images (GIF, WebP, APNG) and multi-page TIFFs give their first frame.
- Only the formats below are opened: Pillow's other plugins (EPS runs
  Ghostscript) and FFmpeg's other demuxers (HLS and concat open further URLs)
  are not reachable from untrusted bytes.
"""

from __future__ import annotations

import io
import warnings
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

import av
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

MediaErrorKind = Literal["read", "decode", "too_large", "empty", "unsupported"]
MediaKind = Literal["image", "video"]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
VIDEO_EXTENSIONS = frozenset({"mp4", "webm", "mkv", "mov", "avi"})
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF")  # JPEG also opens MPO (phone photos)
_AV_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi"  # FFmpeg's format_whitelist syntax


class MediaError(Exception):
    """One input could not be decoded; ``str(err)`` is ``"kind: message"``.

    kind: ``read`` (fetching the bytes failed; raised by loaders, not here),
    ``decode`` (not valid media), ``too_large`` (over a `MediaLimits` bound),
    ``empty`` (zero bytes), ``unsupported`` (unknown file type).
    """

    def __init__(self, kind: MediaErrorKind, message: str):
        assert kind in MediaErrorKind.__args__, kind
        super().__init__(kind, message)  # args kept, so the error pickles across Ray workers
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class MediaLimits(BaseModel):
    """Bounds on what one input may cost; anything over them is a ``too_large`` row error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(64 * 1024**2, gt=0, description="encoded size of one input")
    max_pixels: int = Field(
        40_000_000, gt=0, description="width*height of an image or video frame, checked from the header before decoding"
    )
    max_aspect_ratio: float = Field(
        20.0,
        ge=1.0,
        description="longer side / shorter side of an image or video frame, checked from the header before decoding: "
        "processors scale the shorter side up, so a 40000x1 image would cost as much as a 40000x336 one",
    )
    max_frames: int = Field(8, ge=1, description="frames sampled from one video (the most a caller may ask for)")
    max_video_seconds: float = Field(
        600.0, gt=0, description="video duration, checked from container metadata when it has any"
    )
    max_video_frames: int = Field(
        36_000, ge=1, description="frames in one video (10 min at 60 fps), checked before decoding: bounds decode time"
    )


DEFAULT_LIMITS = MediaLimits()  # frozen, so one shared default is safe


def media_kind(uri_or_name: str) -> MediaKind | None:
    """``"image"``, ``"video"`` or None from a path, URI or name's extension (case-insensitive).

    URIs lose their query string first (``s3://b/x.mp4?versionId=1`` is a video); a bare
    extension such as a webdataset key (``"jpg"``) also works.
    """
    path = urlsplit(uri_or_name).path if "://" in uri_or_name else uri_or_name
    ext = PurePosixPath(path).suffix.lstrip(".").lower() or path.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def _check_size(data: bytes, limits: MediaLimits) -> None:
    if len(data) == 0:
        raise MediaError("empty", "zero bytes")
    if len(data) > limits.max_bytes:
        raise MediaError("too_large", f"{len(data)} bytes > max_bytes={limits.max_bytes}")


def check_dimensions(width: int, height: int, limits: MediaLimits) -> None:
    """The one size check for images and video frames (batch job and Serve alike): pixel count and aspect
    ratio, from header values, so a bomb is refused before any pixel is decoded; raises `MediaError`."""
    if width <= 0 or height <= 0:
        raise MediaError("decode", f"{width}x{height} pixels: empty frame")
    if width * height > limits.max_pixels:
        raise MediaError("too_large", f"{width}x{height} pixels > max_pixels={limits.max_pixels}")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise MediaError("too_large", f"aspect ratio {width}x{height} > max_aspect_ratio={limits.max_aspect_ratio:g}")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on white, high bit depth scaled to 8 bits."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        hi = im.getextrema()[1]
        if im.mode == "F" and hi <= 1.0:  # float images usually hold 0..1 (scientific and HDR TIFFs)
            scale = 255.0
        else:
            scale = 1.0 if hi <= 255 else 255 / 65535 if hi <= 65535 else 255 / hi
        im = im.convert("F" if im.mode == "F" else "I").point(lambda v: v * scale).convert("L")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


_TIFF_SAMPLE_FORMATS = {1: "uint", 2: "int", 3: "float", 4: "void", 5: "complex int", 6: "complex float"}


def _tiff_layout(data: bytes) -> str | None:
    """A TIFF's pixel layout from its first IFD (e.g. ``"1 x 64-bit float, photometric 1"``); None if not a TIFF."""
    from PIL import TiffImagePlugin

    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    try:
        ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        fp = io.BytesIO(data)
        fp.seek(ifd.next)
        ifd.load(fp)
        bits = ifd.get(258, (1,))
        fmt = _TIFF_SAMPLE_FORMATS.get(ifd.get(339, (1,))[0], "unknown")
        return f"{ifd.get(277, len(bits))} x {bits[0]}-bit {fmt}, photometric {ifd.get(262, '?')}"
    except Exception:  # a header too broken to read: the caller reports it as undecodable
        return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from an image's header (no pixel is decoded), or None when no allowed format opens it
    (`decode_image` then reports why). Callers size their limits with it before paying for a decode."""
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            return im.size
    except Exception:  # Pillow raises many types for bad headers; all mean "not sized here"
        return None


def decode_image(data: bytes, limits: MediaLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode one image fully (truncation is detected) into RGB; raises `MediaError`.

    The pixel count is read from the header and refused before any pixel is
    decoded; Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``)
    also applies and is reported as ``too_large``.
    """
    _check_size(data, limits)
    fmt = "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
                fmt = im.format or fmt
                check_dimensions(im.width, im.height, limits)
                im.load()
                ImageOps.exif_transpose(im, in_place=True)
                return _to_rgb(im)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError("too_large", f"decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        if layout := _tiff_layout(data):  # a TIFF whose pixel layout Pillow has no mode for
            raise MediaError("unsupported", f"TIFF pixel layout {layout} has no Pillow mode") from e
        raise MediaError("decode", f"cannot identify image file (not one of {', '.join(_PIL_FORMATS)})") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib.error, ...
        raise MediaError("decode", f"{fmt}: {e or type(e).__name__}") from e


def _uniform_indices(total: int, k: int) -> list[int]:
    """k frame indices spread evenly over [0, total): first and last (k=1: first only); all if total <= k."""
    if total <= k:
        return list(range(total))
    if k == 1:
        return [0]
    return sorted({round(i * (total - 1) / (k - 1)) for i in range(k)})


def _open_video(data: bytes, limits: MediaLimits) -> tuple[av.container.InputContainer, av.VideoStream]:
    """Open the container, pick its first video stream, check the header's limits."""
    container = av.open(io.BytesIO(data), mode="r", options={"format_whitelist": _AV_DEMUXERS})
    try:
        if not container.streams.video:
            raise MediaError("decode", f"no video stream in {container.format.name} container")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w and h:  # 0 when the container does not say; every decoded frame is checked again below
            check_dimensions(w, h, limits)
        seconds = container.duration / av.time_base if container.duration else 0.0
        if seconds > limits.max_video_seconds:
            raise MediaError("too_large", f"{seconds:.1f} s > max_video_seconds={limits.max_video_seconds}")
        return container, stream
    except BaseException:
        container.close()
        raise


def _decode_indices(data: bytes, wanted: list[int], limits: MediaLimits) -> tuple[list[Image.Image], int]:
    """Decode from the start, keeping frames at `wanted` indices; stops after the last one.

    Returns the kept RGB frames and how many frames were decoded.
    """
    keep, frames, seen = set(wanted), [], 0
    container, stream = _open_video(data, limits)
    with container:
        for frame in container.decode(stream):
            check_dimensions(frame.width, frame.height, limits)
            if seen in keep:
                image = frame.to_image()  # rgb24
                image.info["time_s"] = float(frame.time) if frame.time is not None else None
                frames.append(image)
            seen += 1
            if seen > wanted[-1]:
                break
    return frames, seen


def _count_frames(data: bytes, limits: MediaLimits) -> int:
    """Frames in the first video stream: the container's count, else its packets (demuxed, not decoded)."""
    container, stream = _open_video(data, limits)
    with container:
        if stream.frames > 0:
            return stream.frames
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def decode_video(data: bytes, limits: MediaLimits = DEFAULT_LIMITS, num_frames: int | None = None) -> list[Image.Image]:
    """`num_frames` RGB frames sampled uniformly (by frame index) across a video; raises `MediaError`.

    num_frames defaults to ``limits.max_frames`` and may not exceed it (ValueError: a
    caller's mistake, not a bad row). The first and last frames are included (one: the first); a
    video with fewer frames gives all of them. Decoding is strict: an FFmpeg error
    anywhere in the stream (e.g. a truncated file) fails the row. When the container
    claims more frames than decode cleanly, sampling is redone over those that do. Each frame's
    ``info["time_s"]`` is its presentation time in seconds (None when the stream has none).
    """
    num_frames = limits.max_frames if num_frames is None else num_frames
    if not 1 <= num_frames <= limits.max_frames:
        raise ValueError(f"num_frames={num_frames} must be in [1, {limits.max_frames}]; raise MediaLimits.max_frames")
    _check_size(data, limits)
    try:
        total = _count_frames(data, limits)
        if total > limits.max_video_frames:
            raise MediaError("too_large", f"{total} frames > max_video_frames={limits.max_video_frames}")
        frames, seen = _decode_indices(data, _uniform_indices(max(total, 1), num_frames), limits)
        if seen < total and seen > 0:  # the count lied: resample over what really decodes
            frames, seen = _decode_indices(data, _uniform_indices(seen, num_frames), limits)
    except MediaError:
        raise
    except Exception as e:  # av.FFmpegError (InvalidDataError, EOFError, ...), and anything a bad stream triggers
        reason = e.strerror if isinstance(e, av.FFmpegError) and e.strerror else f"{type(e).__name__}: {e}"
        raise MediaError("decode", reason) from e
    if not frames:
        raise MediaError("decode", "no frames")
    return frames


def decode_media(
    data: bytes, name: str, limits: MediaLimits = DEFAULT_LIMITS, num_frames: int | None = None
) -> tuple[MediaKind, list[Image.Image]]:
    """Decode by `name`'s extension: ``("image", [image])``, or ``("video", frames)`` with ``num_frames``
    sampled uniformly (None: ``limits.max_frames``).

    Unknown extensions raise ``MediaError("unsupported", ...)`` naming the known ones.
    """
    kind = media_kind(name)
    if kind == "image":
        return kind, [decode_image(data, limits)]
    if kind == "video":
        return kind, decode_video(data, limits, num_frames=num_frames)
    known = ", ".join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))
    raise MediaError("unsupported", f"unknown file type for {name!r} (expected one of: {known})")


def tile_frames(frames: list[Image.Image], cols: int = 2, size: int | None = None) -> Image.Image:
    """Tile video frames row-major into one image (for image-only VLMs such as LLaVA-1.5).

    ``len(frames)`` frames go on a grid ``min(cols, len(frames))`` wide; every cell keeps the first
    frame's aspect ratio, so the grid's aspect is ``cols * width : rows * height``. ``size`` is the
    result's longer side (default: the first frame's longer side); a cell is at least 1x1 pixel.
    """
    if not frames:
        raise ValueError("tile_frames needs at least one frame")
    cols = max(1, min(cols, len(frames)))
    rows = -(-len(frames) // cols)
    w, h = frames[0].size
    size = size or max(w, h)
    longer = max(cols * w, rows * h)  # the grid's longer side at the frames' own size
    cw, ch = max(1, w * size // longer), max(1, h * size // longer)
    canvas = Image.new("RGB", (cols * cw, rows * ch))
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        canvas.paste(f.convert("RGB").resize((cw, ch), Image.BILINEAR), (c * cw, r * ch))
    return canvas

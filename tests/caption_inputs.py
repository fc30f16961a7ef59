"""Inputs for the caption-job tests, made here: ShapesWorld images, PyAV-encoded videos, a webdataset
shard, odd-but-valid images and names, a corpus of bad files, and folder entries that are no input
(imported by test_caption*.py)."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import av
import numpy as np
from PIL import Image

from specvlm.demo import ShapesWorld


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size=(128, 128)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (a decompression bomb's header)."""
    data = bytearray(save(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def encode_video(frames: list[Image.Image], fmt: str = "mp4", codec: str = "libx264", path: Path | None = None):
    """RGB frames -> video bytes (PyAV); ``path`` writes a file instead (mp4 faststart needs one)."""
    target = str(path) if path else io.BytesIO()
    opts = {"movflags": "faststart"} if path and fmt == "mp4" else {}
    with av.open(target, "w", format=fmt, options=opts) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(f.convert("RGB")), format="rgb24")))
        out.mux(stream.encode())
    return path.read_bytes() if path else target.getvalue()


def thin_video(width: int = 1, height: int = 64, frames: int = 6) -> bytes:
    """An MPEG-4 video whose frames are ``width`` pixels wide (1 by default)."""
    return encode_video([Image.new("RGB", (width, height), (30 * i, 0, 0)) for i in range(frames)], codec="mpeg4")


def tiff_without_mode() -> bytes:
    """A valid TIFF whose pixel layout (one 64-bit float sample) Pillow has no mode for."""
    from PIL import TiffImagePlugin

    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[256], ifd[257], ifd[258], ifd[259], ifd[262], ifd[277], ifd[278] = 4, 4, (64,), 1, 1, 1, 4
    ifd[339], ifd[273], ifd[279] = (3,), (512,), (4 * 4 * 8,)
    buf = io.BytesIO()
    buf.write(b"II*\x00" + struct.pack("<I", 8))
    ifd.save(buf)
    return buf.getvalue().ljust(512 + 128, b"\x00")


def float_tiff() -> bytes:
    """A float ("F") TIFF with values in 0..1, as scientific and HDR tools write them."""
    return save(Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), mode="F"), "TIFF")


def shapes(n: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    world = ShapesWorld(seed)
    return [world.image_scene() for _ in range(n)]


def shapes_video(seed: int = 0) -> tuple[list[Image.Image], str]:
    return ShapesWorld(seed).video_scene(frames=8)


def odd_images() -> dict[str, bytes]:
    """Valid images of unusual kinds that must caption normally."""
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    gray16 = Image.new("I;16", (16, 16))
    gray16.putpixel((0, 0), 65535)
    gif = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    return {
        "cmyk.jpg": save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "palette.png": save(palette, "PNG", transparency=0),
        "gray16.png": save(gray16, "PNG"),
        "rgba.png": save(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "PNG"),
        "one-pixel.png": save(Image.new("RGB", (1, 1), (0, 0, 255)), "PNG"),
        "animated.gif": save(gif[0], "GIF", save_all=True, append_images=gif[1:], duration=100, loop=0),
        "image.bmp": save(Image.new("RGB", (8, 8), (0, 255, 0)), "BMP"),
        "image.tiff": save(Image.new("RGB", (8, 8), (0, 255, 0)), "TIFF"),
        "image.webp": save(Image.new("RGB", (8, 8), (0, 255, 0)), "WEBP"),
        "float01.tiff": float_tiff(),
        "_DSC0001.JPG": save(noise((32, 24)), "JPEG"),  # cameras name Adobe-RGB photos with a leading "_"
        "thin.mp4": thin_video(1, 16),  # 1 pixel wide, within max_aspect_ratio: tiled keeping its aspect
        os.fsdecode(b"caf\xe9-latin1.png"): save(noise((16, 16)), "PNG"),  # a name that is not UTF-8
    }


def bad_inputs(tmp: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the error kind its row must get)."""
    jpg, png = save(noise(), "JPEG"), save(noise(), "PNG")
    mp4 = encode_video([Image.new("RGB", (32, 32), (12 * i, 0, 0)) for i in range(12)])
    faststart = encode_video([Image.new("RGB", (32, 32), (12 * i, 0, 0)) for i in range(12)], path=tmp / "fs.mp4")
    return {
        "empty.png": (b"", "empty"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "decode"),
        "truncated.png": (png[: len(png) // 2], "decode"),
        "notes.jpg": (b"this is a caption, not a picture\n" * 4, "decode"),
        "bomb.png": (png_claiming(100_000, 100_000), "too_large"),
        "wide.png": (save(Image.new("RGB", (2000, 10)), "PNG"), "too_large"),  # aspect ratio 200
        "corrupt.mp4": (bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8)), "decode"),
        "truncated.mp4": (mp4[: len(mp4) // 2], "decode"),
        "zero-frames.mp4": (faststart[: faststart.find(b"mdat") - 4], "decode"),
        "one-pixel-wide.mp4": (thin_video(1, 64), "too_large"),  # aspect ratio 64 per frame
        "float64.tiff": (tiff_without_mode(), "unsupported"),
    }


# folder entries the corpus holds that are no input: counted in Inputs.ignored / the summary by reason
CORPUS_IGNORED = {"not_media": 1, "hidden": 1, "broken_symlink": 1, "not_a_file": 1}


def corpus_id(name: str) -> str:
    """The id a corpus file name gets (`pipelines.caption_io.escape_name`: non-UTF-8 names percent-encoded)."""
    from pipelines.caption_io import escape_name

    return escape_name(name)


def write_shard(path: Path, samples: dict[str, bytes], truncate: bool = False) -> None:
    """A webdataset shard: member name -> bytes (``<key>.<ext>``), optionally cut in the middle of a member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2] if truncate else data)


def corpus(root: Path, n_good: int = 3) -> dict[str, str | None]:
    """Write a folder of good, odd and bad inputs; returns id -> expected error kind (None = captioned)."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for i, (im, _) in enumerate(shapes(n_good)):
        name = f"shapes/{i}.png" if i % 2 == 0 else f"shapes/{i}.jpg"
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(save(im, "PNG" if name.endswith("png") else "JPEG"))
        expected[name] = None
    for name, data in odd_images().items():
        (root / "odd").mkdir(exist_ok=True)
        (root / "odd" / name).write_bytes(data)
        expected[corpus_id(f"odd/{name}")] = None
    frames, _ = shapes_video()
    (root / "clip.mp4").write_bytes(encode_video(frames))
    (root / "clip.mkv").write_bytes(encode_video(frames, fmt="matroska", codec="mpeg4"))
    expected.update({"clip.mp4": None, "clip.mkv": None})
    for name, (data, kind) in bad_inputs(root.parent).items():
        (root / "bad").mkdir(exist_ok=True)
        (root / "bad" / name).write_bytes(data)
        expected[f"bad/{name}"] = kind
    im, _ = shapes(1, seed=5)[0]
    write_shard(root / "shard.tar", {"a.png": save(im, "PNG"), "a.txt": b"caption", "b.jpg": save(im, "JPEG"),
                                     "thin.mp4": thin_video(1, 16), "wide.mp4": thin_video(1, 64),
                                     os.fsdecode(b"\xff.png"): save(im, "PNG")})  # fmt: skip
    expected.update({"shard.tar/a": None, "shard.tar/b": None, "shard.tar/thin": None, "shard.tar/wide": "too_large",
                     "shard.tar/%FF": None})  # fmt: skip
    write_shard(root / "no-media.tar", {"0.json": b"{}", "0.txt": b"a caption without its image"})
    expected["no-media.tar"] = "empty"
    (root / "README.txt").write_text("not an input")  # not_media
    (root / ".hidden.png").write_bytes(b"")  # hidden
    (root / "bad" / "gone.jpg").symlink_to(root / "nowhere.jpg")  # broken_symlink
    os.mkfifo(root / "bad" / "pipe.png")  # not_a_file: never opened (reading it would block)
    return expected

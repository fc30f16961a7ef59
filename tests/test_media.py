"""specvlm.media: every input is built here (Pillow images, PyAV-encoded videos), no files on disk."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import zlib

import av
import numpy as np
import pytest
from PIL import Image

from specvlm import media
from specvlm.media import (
    MediaError,
    MediaLimits,
    decode_image,
    decode_media,
    decode_video,
    media_kind,
)

STEP = 12  # gray level per frame index in the encoded test videos


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(size=(64, 64), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim width x height (CRC fixed up)."""
    data = bytearray(_save(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _encode_video(
    n: int, fmt: str = "mp4", codec: str = "libx264", size: int = 32, options: dict | None = None
) -> bytes:
    """n frames of flat gray whose level is STEP * index, so a decoded frame tells its index."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"qp": "0"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), STEP * i, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def _index(frame: Image.Image) -> int:
    return round(float(np.asarray(frame).mean()) / STEP)


def _kind(excinfo) -> str:
    return str(excinfo.value).split(":")[0]


# --- MediaError, MediaLimits, media_kind -----------------------------------------------------------


def test_media_error_str_attrs_and_pickle():
    err = MediaError("decode", "truncated JPEG")
    assert (err.kind, err.message, str(err)) == ("decode", "truncated JPEG", "decode: truncated JPEG")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == "decode: truncated JPEG" and back.kind == "decode"


def test_limits_are_strict_and_frozen():
    limits = MediaLimits()
    assert (limits.max_bytes, limits.max_pixels, limits.max_frames) == (64 * 1024**2, 40_000_000, 8)
    with pytest.raises(ValueError):
        MediaLimits(max_frame=3)  # typo: extra fields are refused
    with pytest.raises(ValueError):
        MediaLimits(max_pixels=0)
    with pytest.raises(ValueError):
        limits.max_frames = 3


@pytest.mark.parametrize(
    "name,kind",
    [
        ("a.jpg", "image"), ("A.JPEG", "image"), ("x/y.png", "image"), ("s3://b/k/z.webp", "image"),
        ("f.gif", "image"), ("f.bmp", "image"), ("f.tif", "image"), ("f.tiff", "image"),
        ("v.mp4", "video"), ("v.webm", "video"), ("v.MKV", "video"), ("v.mov", "video"), ("v.avi", "video"),
        ("https://h/v.mp4?sig=abc.png", "video"), ("jpg", "image"),
        ("notes.txt", None), ("noext", None), ("a.jpg.tar", None),
    ],
)  # fmt: skip
def test_media_kind(name, kind):
    assert media_kind(name) == kind


def test_module_imports_neither_torch_nor_ray():
    # Load media.py on its own: the package's __init__ imports the engine (torch), media.py must not.
    code = (
        "import importlib.util, sys;"
        f"spec = importlib.util.spec_from_file_location('media_alone', {media.__file__!r});"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec));"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'ray', 'specvlm'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- images that must decode ---------------------------------------------------------------------


def test_rgb_jpeg_is_fully_loaded_rgb():
    im = decode_image(_save(_noise(), "JPEG"))
    assert (im.mode, im.size) == ("RGB", (64, 64))
    assert im.im is not None  # pixels are in memory, not lazily read later


def test_cmyk_jpeg():
    im = decode_image(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = im.getpixel((4, 4))
    assert im.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_palette_png_with_transparency_composites_on_white():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    out = decode_image(_save(im, "PNG", transparency=0))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((3, 3)) == (255, 255, 255)  # transparent black -> white, not black


def test_16bit_grayscale_png_is_scaled_not_clipped():
    im = Image.new("I;16", (3, 1))
    im.putpixel((0, 0), 65535)
    im.putpixel((1, 0), 32768)
    data = _save(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [255, 127, 0]


def test_float_tiff_in_0_1_is_scaled_not_black():
    data = _save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F"), "TIFF")
    out = decode_image(data)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]
    wide = _save(Image.fromarray(np.array([[0.0, 65535.0]], np.float32), mode="F"), "TIFF")  # 16-bit range: as before
    assert [decode_image(wide).getpixel((x, 0))[0] for x in range(2)] == [0, 255]


def test_tiff_without_a_pillow_mode_names_its_layout():
    from caption_inputs import tiff_without_mode

    with pytest.raises(MediaError) as e:
        decode_image(tiff_without_mode())
    assert str(e.value) == "unsupported: TIFF pixel layout 1 x 64-bit float, photometric 1 has no Pillow mode"


def test_aspect_ratio_is_checked_from_the_header():
    with pytest.raises(MediaError) as e:
        decode_image(_png_claiming(40_000, 1))  # the aspect-ratio bomb: 40000x1 within max_pixels
    assert str(e.value) == "too_large: aspect ratio 40000x1 > max_aspect_ratio=20"
    assert decode_image(_save(Image.new("RGB", (40, 1)), "PNG"), MediaLimits(max_aspect_ratio=40)).size == (40, 1)


def test_tile_frames_keeps_the_frame_aspect():
    wide = [Image.new("RGB", (64, 16), (50 * i, 0, 0)) for i in range(4)]
    assert media.tile_frames(wide).size == (64, 16)  # 2x2 cells of 32x8
    assert media.tile_frames(wide, cols=4, size=128).size == (128, 8)  # one row of 32x8 cells
    assert media.tile_frames(wide[:1], cols=2).size == (64, 16)  # one frame: one column, not half a grid
    square = [Image.new("RGB", (48, 48))] * 4
    assert media.tile_frames(square).size == (48, 48)  # the demo recipe's square grid, unchanged
    assert media.tile_frames([Image.new("RGB", (1, 16))] * 4).size == (2, 16)  # 1-pixel-wide frames: 1x8 cells


def test_rgba_png_composites_on_white():
    out = decode_image(_save(Image.new("RGBA", (2, 2), (255, 0, 0, 128)), "PNG"))
    r, g, b = out.getpixel((0, 0))
    assert out.mode == "RGB" and r == 255 and 120 <= g <= 135 and g == b


def test_la_png():
    out = decode_image(_save(Image.new("LA", (2, 2), (0, 0)), "PNG"))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_one_pixel_in_every_format(fmt):
    out = decode_image(_save(Image.new("RGB", (1, 1), (0, 0, 255)), fmt))
    assert out.mode == "RGB" and out.size == (1, 1)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data)
    assert out.mode == "RGB" and out.getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_save(Image.new("RGB", (8, 4)), "JPEG", exif=exif))
    assert out.size == (4, 8)


# --- images that must fail their row ---------------------------------------------------------------


def test_zero_bytes_is_empty():
    with pytest.raises(MediaError) as e:
        decode_image(b"")
    assert str(e.value) == "empty: zero bytes" and e.value.kind == "empty"


def test_too_many_bytes():
    with pytest.raises(MediaError) as e:
        decode_image(_save(_noise(), "PNG"), MediaLimits(max_bytes=100))
    assert str(e.value).startswith("too_large: ") and "max_bytes=100" in str(e.value)


def test_text_bytes_named_jpg():
    with pytest.raises(MediaError) as e:
        decode_image(b"this is a caption, not a picture\n" * 4)
    assert str(e.value).startswith("decode: cannot identify image file")
    assert "0x" not in str(e.value)  # no BytesIO repr in the error column


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(fmt):
    data = _save(_noise((128, 128)), fmt)
    with pytest.raises(MediaError) as e:
        decode_image(data[: len(data) // 2])
    assert str(e.value).startswith(f"decode: {fmt}: ")


def test_bomb_refused_from_header_by_max_pixels():
    data = _png_claiming(8000, 8000)  # 64 MP: under Pillow's own limit, over ours
    with pytest.raises(MediaError) as e:
        decode_image(data)
    assert str(e.value) == "too_large: 8000x8000 pixels > max_pixels=40000000"


@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow's warning (> 89 MP), then its error (> 179 MP)
def test_bomb_refused_by_pillows_guard(side):
    with pytest.raises(MediaError) as e:
        decode_image(_png_claiming(side, side), MediaLimits(max_pixels=10**9))
    assert _kind(e) == "too_large" and "decompression bomb" in str(e.value)


def test_eps_is_not_opened():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\nshowpage\n"
    with pytest.raises(MediaError) as e:
        decode_image(eps)
    assert _kind(e) == "decode"


# --- videos ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mp4_20() -> bytes:
    return _encode_video(20)


def test_video_uniform_sampling(mp4_20):
    frames = decode_video(mp4_20, num_frames=5)
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    assert [_index(f) for f in frames] == [0, 5, 10, 14, 19]  # round(i * 19 / 4)


def test_video_default_is_max_frames(mp4_20):
    frames = decode_video(mp4_20, MediaLimits(max_frames=4))
    assert [_index(f) for f in frames] == [0, 6, 13, 19]
    assert [_index(f) for f in decode_video(mp4_20, num_frames=1)] == [0]


def test_video_shorter_than_request_gives_all_frames():
    frames = decode_video(_encode_video(3), num_frames=8)
    assert [_index(f) for f in frames] == [0, 1, 2]


def test_video_num_frames_over_limit_is_a_caller_error(mp4_20):
    with pytest.raises(ValueError, match="max_frames"):
        decode_video(mp4_20, num_frames=9)


def test_mkv_without_frame_count_is_decoded_through():
    data = _encode_video(12, fmt="matroska", codec="mpeg4")
    with av.open(io.BytesIO(data)) as c:
        assert c.streams.video[0].frames == 0  # no count in the header: counted by demuxing
    frames = decode_video(data, MediaLimits(max_frames=4))
    assert [_index(f) for f in frames] == [0, 4, 7, 11]


def test_webm_vp8():
    try:
        av.codec.Codec("libvpx", "w")
    except Exception:
        pytest.skip("no vp8 encoder in this PyAV build")
    frames = decode_video(_encode_video(6, fmt="webm", codec="libvpx"), MediaLimits(max_frames=3))
    assert len(frames) == 3 and _index(frames[0]) == 0


def test_video_zero_bytes():
    with pytest.raises(MediaError) as e:
        decode_video(b"")
    assert str(e.value) == "empty: zero bytes"


def test_video_random_bytes():
    with pytest.raises(MediaError) as e:
        decode_video(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert _kind(e) == "decode"


def test_video_truncated_mp4(mp4_20):
    with pytest.raises(MediaError) as e:  # the index (moov) is written last, so half a file has none
        decode_video(mp4_20[: len(mp4_20) // 2])
    assert _kind(e) == "decode"


def _faststart_mp4(tmp_path, n: int) -> bytes:
    path = tmp_path / "faststart.mp4"  # the faststart rewrite reopens the file: BytesIO will not do
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width = stream.height = 32
        for i in range(n):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), STEP * i, np.uint8), "rgb24")))
        out.mux(stream.encode())
    return path.read_bytes()


def test_video_truncated_faststart_mp4_is_a_decode_error(tmp_path):
    data = _faststart_mp4(tmp_path, 20)
    assert data.find(b"moov") < data.find(b"mdat")  # the index survives the cut, the frames do not
    with pytest.raises(MediaError) as e:
        decode_video(data[: len(data) * 3 // 5])
    assert _kind(e) == "decode" and "'<none>'" not in str(e.value)


def test_video_with_no_frames(tmp_path):
    data = _faststart_mp4(tmp_path, 20)
    moov_only = data[: data.find(b"mdat") - 4]  # header claims 20 frames, none are there
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as out:  # a stream with no packets at all
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        out.start_encoding()
    for video in (moov_only, buf.getvalue()):
        with pytest.raises(MediaError) as e:
            decode_video(video)
        assert str(e.value) == "decode: no frames"


def test_video_frame_count_that_lies_is_resampled():
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        for i in range(20):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), STEP * i, np.uint8), "rgb24")))
        out.mux(stream.encode())
    data = bytearray(buf.getvalue())
    length = data.find(b"strh") + 8 + 32  # AVISTREAMHEADER.dwLength: the stream's frame count
    assert struct.unpack("<I", data[length : length + 4]) == (20,)
    data[length : length + 4] = struct.pack("<I", 30)
    with av.open(io.BytesIO(bytes(data))) as c:
        assert c.streams.video[0].frames == 30
    frames = decode_video(bytes(data), MediaLimits(max_frames=4))
    assert [_index(f) for f in frames] == [0, 6, 13, 19]  # not [0, 10, 19] from the claimed 30


def test_video_frame_over_max_pixels(mp4_20):
    with pytest.raises(MediaError) as e:
        decode_video(mp4_20, MediaLimits(max_pixels=32 * 32 - 1))
    assert str(e.value).startswith("too_large: 32x32 pixels")


def test_video_frame_over_max_aspect_ratio():
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 64, 2
        for i in range(3):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((2, 64, 3), STEP * i, np.uint8), "rgb24")))
        out.mux(stream.encode())
    with pytest.raises(MediaError) as e:
        decode_video(buf.getvalue())
    assert str(e.value) == "too_large: aspect ratio 64x2 > max_aspect_ratio=20"
    assert len(decode_video(buf.getvalue(), MediaLimits(max_aspect_ratio=32), num_frames=2)) == 2


def test_video_over_duration_and_frame_limits(mp4_20):  # 20 frames at 10 fps = 2 s
    with pytest.raises(MediaError) as e:
        decode_video(mp4_20, MediaLimits(max_video_seconds=1.5))
    assert _kind(e) == "too_large" and "max_video_seconds" in str(e.value)
    with pytest.raises(MediaError) as e:
        decode_video(mp4_20, MediaLimits(max_video_frames=19))
    assert _kind(e) == "too_large" and "max_video_frames" in str(e.value)


def test_image_bytes_are_not_a_video():
    with pytest.raises(MediaError) as e:  # FFmpeg could read a PNG as a 1-frame video; the demuxer allowlist refuses
        decode_video(_save(_noise(), "PNG"))
    assert _kind(e) == "decode"


# --- decode_media dispatch -------------------------------------------------------------------------


def test_decode_media_dispatch(mp4_20):
    kind, [im] = decode_media(_save(_noise(), "PNG"), "s3://bucket/a.PNG")
    assert kind == "image" and im.mode == "RGB"
    kind, frames = decode_media(mp4_20, "v.mp4", MediaLimits(max_frames=8), num_frames=3)
    assert kind == "video" and len(frames) == 3
    with pytest.raises(MediaError) as e:
        decode_media(b"abc", "notes.txt")
    assert str(e.value).startswith("unsupported: ")

"""Write the bundled caption-job sample inputs (``make demo`` captions them with the demo model).

    python examples/make_examples.py            # rewrites examples/inputs/, manifest.jsonl, expected.json

Everything comes from ShapesWorld (`specvlm.demo`), seeded, so the files are
reproducible and the demo model knows what it sees:

    inputs/shapes-0..3.png     four 64x64 scenes (PNG)
    inputs/shapes-4.jpg        one scene as JPEG
    inputs/moving-0.mp4        an 8-frame 64x64 video (H.264 via PyAV), a shape moving across the grid
    inputs/shard-0.tar         a webdataset shard with two more scenes (<key>.png + <key>.txt)
    manifest.jsonl             id, uri (relative to this folder), prompt: questions about the files above
    expected.json              the true caption / answer of every id, to read the job's output against
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np

from specvlm.demo import ShapesWorld
from specvlm.demo.world import IMAGE_QUESTION, VIDEO_QUESTION, caption, questions, render

HERE = Path(__file__).resolve().parent


def encode_mp4(frames, fps: int = 8) -> bytes:
    """RGB PIL frames -> H.264 mp4 bytes (yuv420p; even sizes)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(f.convert("RGB")), format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def main() -> None:
    inputs = HERE / "inputs"
    inputs.mkdir(exist_ok=True)
    world = ShapesWorld(2024)
    expected, manifest = {}, []
    scenes = [world.random_scene() for _ in range(7)]
    for i, scene in enumerate(scenes[:5]):
        name = f"shapes-{i}.png" if i < 4 else f"shapes-{i}.jpg"
        image = render(scene)
        if name.endswith(".png"):
            (inputs / name).write_bytes(_png(image))
        else:
            image.save(inputs / name, "JPEG", quality=92)
        expected[name] = caption(scene)
        qa = questions(scene)
        for kind in ("count", "color"):
            if qa[kind]:
                question, answer = qa[kind][0]
                qid = f"{Path(name).stem}-{kind}"
                manifest.append({"id": qid, "uri": f"inputs/{name}", "prompt": question})
                expected[qid] = answer
    frames, text = world.video_scene(frames=8)
    (inputs / "moving-0.mp4").write_bytes(encode_mp4(frames))
    expected["moving-0.mp4"] = text
    manifest.append({"id": "moving-0", "uri": "inputs/moving-0.mp4", "prompt": VIDEO_QUESTION})
    expected["moving-0"] = text

    with tarfile.open(inputs / "shard-0.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for j, scene in enumerate(scenes[5:]):
            for ext, data in (("png", _png(render(scene))), ("txt", caption(scene).encode())):
                info = tarfile.TarInfo(f"{j:06d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
            expected[f"shard-0.tar/{j:06d}"] = caption(scene)
    manifest.append({"id": "shapes-0-describe", "uri": "inputs/shapes-0.png", "prompt": IMAGE_QUESTION})
    expected["shapes-0-describe"] = expected["shapes-0.png"]
    (HERE / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote {len(list(inputs.iterdir()))} inputs and a {len(manifest)}-row manifest under {HERE} ({total} bytes)")


if __name__ == "__main__":
    main()

"""The distill job's data: where rows come from (`DemoData`, `ManifestData`, `CaptionOutputData`) and how they
are read.

Rows are ``{"image", "prompt", "response"}``: ``image`` holds encoded bytes or a URI (local path, relative
ones resolved against the manifest's folder, or ``s3://``); `specvlm.distill.sample_from_row` decodes them
on the workers. Manifests are read through `specvlm.storage` (local or S3).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import pyarrow.fs as pafs
from pydantic import Field, field_validator, model_validator

from specvlm import storage
from specvlm.config import StrictModel


class DemoData(StrictModel):
    """ShapesWorld samples drawn on the driver (videos as tiled frames, as the demo target saw them); PNG bytes."""

    source: Literal["demo"] = "demo"
    num_samples: int = Field(2048, ge=1, description="training rows drawn from ShapesWorld(seed)")
    seed: int = Field(0, description="world seed of the training rows")
    eval_seed: int = Field(1, description="world seed of the held-out eval samples")
    p_video: float = Field(0.2, ge=0, le=1, description="share of videos (frames tiled into one image)")
    p_qa: float = Field(0.4, ge=0, le=1, description="share of questions; the rest are captions")
    video_frames: int = Field(4, ge=2, description="frames tiled per video")

    @model_validator(mode="after")
    def _shares(self):
        if self.p_video + self.p_qa > 1:
            raise ValueError(f"p_video + p_qa = {self.p_video + self.p_qa} > 1")
        return self


class ManifestData(StrictModel):
    """A manifest with columns ``image`` (local path or s3:// URI; or encoded bytes), ``prompt``, ``response``."""

    source: Literal["manifest"]
    path: str = Field(description=".jsonl or .parquet manifest, local or s3://; relative image paths are resolved "
                      "against a local manifest's folder")  # fmt: skip
    eval_path: str | None = Field(None, description="held-out manifest; default: the last eval_samples rows of path")

    @field_validator("path", "eval_path")
    @classmethod
    def _manifest_suffix(cls, v: str | None) -> str | None:
        return v if v is None else storage.check_manifest(v)


class CaptionOutputData(StrictModel):
    """A caption job's output (`specvlm distill --from-output OUT`): each captioned row is a training row, its
    ``uri`` the image, its ``prompt`` the prompt and its ``caption`` the response, the target's own output.
    Rows with an error, or whose media is no image a worker can read (a video, a member of a .tar shard), are
    skipped."""

    source: Literal["caption_output"]
    path: str = Field(description="the caption job's output folder or s3:// prefix (its part files)")


def caption_output_rows(batch):
    """A caption output batch (``pyarrow``) -> manifest rows ``image, prompt, response`` of its captioned rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = pc.and_(pc.is_null(batch["error"]), pc.invert(pc.is_null(batch["caption"])))
    kept = batch.filter(ok)
    return pa.table({"image": kept["uri"], "prompt": kept["prompt"], "response": kept["caption"]})


def read_caption_output(uri: str):
    """A Ray Dataset of a caption output's part files as manifest rows (`caption_output_rows`)."""
    import ray.data

    from pipelines import caption_io as cio

    files = cio.output_files(uri)
    if not files:
        raise FileNotFoundError(f"no caption output part files under {uri}")
    fs, _ = storage.filesystem(uri)
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(["uri", "prompt", "caption", "error"])
    return ds.map_batches(caption_output_rows, batch_format="pyarrow")


def demo_rows(data: DemoData, num: int, seed: int) -> list[dict]:
    """``num`` ShapesWorld samples as rows ``{"image": PNG bytes, "prompt", "response"}``."""
    from specvlm.demo import ShapesWorld
    from specvlm.demo.recipe import to_example

    world = ShapesWorld(seed)
    rows = []
    for _ in range(num):
        s = to_example(world.sample(p_video=data.p_video, p_qa=data.p_qa), data.video_frames)
        buf = io.BytesIO()
        s["image"].save(buf, format="PNG")
        rows.append({"image": buf.getvalue(), "prompt": s["prompt"], "response": s["response"]})
    return rows


def read_manifest(uri: str, need_response: bool):
    """A Ray Dataset over a .jsonl/.parquet manifest (local or s3://), columns ``image, prompt[, response]``."""
    import ray.data

    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"manifest not found: {uri}")
    reader = ray.data.read_parquet if path.lower().endswith(".parquet") else ray.data.read_json
    ds = reader(path, filesystem=fs)
    need = ["image", "prompt"] + (["response"] if need_response else [])
    names = ds.schema().names
    missing = [c for c in need if c not in names]
    if missing:
        raise ValueError(f"manifest {uri} lacks column(s) {', '.join(missing)}; it has {', '.join(names)}")
    return ds.select_columns([c for c in ("image", "prompt", "response") if c in names])


def _local_base(uri: str) -> str | None:
    """The folder relative image paths of a local manifest resolve against; None for s3://."""
    return None if "://" in uri else storage.manifest_base(uri)


def _absolute(row: dict, base: str | None) -> dict:
    img = row.get("image")
    if base is not None and isinstance(img, str) and "://" not in img and not Path(img).expanduser().is_absolute():
        row = {**row, "image": str(Path(base) / img)}
    return row


def build_datasets(data: DemoData | ManifestData | CaptionOutputData, need_response: bool, n_eval: int):
    """``(train Ray Dataset, n_eval held-out eval rows, base folder for relative image paths or None)``;
    ``need_response``: manifest rows must have a ``response`` column."""
    import ray.data

    if isinstance(data, DemoData):
        train = ray.data.from_items(demo_rows(data, data.num_samples, data.seed))
        return train, demo_rows(data, n_eval, data.eval_seed), None
    if isinstance(data, CaptionOutputData):  # URIs as the caption job resolved them: nothing is relative
        train, base = read_caption_output(data.path), None
        if n_eval == 0:
            return train, [], base
        train, held_out = train.train_test_split(test_size=n_eval)
        return train, held_out.take_all(), base
    base = _local_base(data.path)
    train = read_manifest(data.path, need_response)
    if n_eval == 0:
        return train, [], base
    if data.eval_path is not None:  # read on the driver: its relative paths resolve against its own folder
        rows = read_manifest(data.eval_path, need_response=False).take(n_eval)
        return train, [_absolute(r, _local_base(data.eval_path)) for r in rows], base
    train, held_out = train.train_test_split(test_size=n_eval)
    return train, [_absolute(r, base) for r in held_out.take_all()], base


def chunks(shard, batch_size: int):
    """Endless ``batch_size``-row chunks (lists of dicts) of a dataset shard, epoch after epoch."""
    while True:
        n = 0
        for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            n += 1
            yield table.to_pylist()
        if n == 0:
            raise RuntimeError("this worker's data shard is empty: use fewer workers or more data")

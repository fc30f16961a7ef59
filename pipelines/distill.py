"""Ray Train job: online-logit distillation of the EAGLE draft against a frozen target.

``specvlm distill [--config FILE] [--workers N] [--max-steps N] [--output DIR]``

What runs where::

    driver      validate DistillJobConfig, build the Ray Dataset (demo world rows with PNG bytes, or a
                .jsonl/.parquet manifest), start TorchTrainer, copy the final draft to <output>/draft/
    worker i    load the frozen target once (requires_grad False), build or restore the draft, wrap ONLY
                the draft in DDP, then per step: batch_size rows from its shard -> decode (bad rows
                skipped and counted) -> [target's own greedy responses] -> `specvlm.distill.distill_step`
    rank 0      every log step: one JSON line in <output>/metrics.jsonl (losses averaged over workers,
                skipped_rows summed); every eval step: accept length of an `eagle` engine on held-out
                samples; every checkpoint step: draft/ + optimizer.pt + state.json via ray.train.report

The loss, the teacher pass and the optimizer are `specvlm.distill`'s; this
module only wires them to Ray. Resume: re-running with the same
``storage_path``/``name`` (or a worker restart under ``FailureConfig``) hands
the latest checkpoint to every worker through ``ray.train.get_checkpoint()``
and training continues from its step. The data stream restarts from the top
of the dataset on resume (no data-position bookkeeping), and steps run again
after a worker restart are logged again in metrics.jsonl.

Every worker consumes exactly ``batch_size`` rows per step, so equal shards
stay in lockstep across epochs; a step whose rows are all bad still runs the
DDP all-reduce with a zero loss mask. ``output`` (metrics.jsonl, written by
rank 0) and ``storage_path`` must be shared storage on a multi-node cluster.

Legend: B batch rows, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from specvlm.config import (
    CPU_TREE,
    CompressorConfig,
    ConfigError,
    StrictModel,
    TreeConfig,
    load_config,
    parse_config,
)

from .ray_cluster import add_address_flag, init_ray

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "distill-demo.yaml"
MANIFEST_SUFFIXES = (".jsonl", ".json", ".parquet")


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
        if v is not None and not v.lower().endswith(MANIFEST_SUFFIXES):
            raise ValueError(f"{v!r} is not a manifest; expected a file ending in {', '.join(MANIFEST_SUFFIXES)}")
        return v


class DistillJobConfig(StrictModel):
    """Everything `specvlm distill` takes. Defaults are ``configs/distill-demo.yaml``."""

    target: str = Field("demo", description="target HF folder (local or s3://) holding model + processor, or 'demo'")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="target dtype; None = as saved (float32 for emulated half on CPU)"
    )
    draft_init: str | None = Field(None, description="draft folder to start from; None = EagleDraft.from_target(seed)")
    draft_intermediate_size: int | None = Field(
        None, ge=1, description="a fresh draft layer's MLP width; None = the target's (ignored with draft_init)"
    )
    mode: Literal["eagle", "specvlm"] = Field(
        "eagle", description="eagle: the draft alone; specvlm: the draft + elastic visual compressor, trained jointly"
    )
    compressor: CompressorConfig = Field(default_factory=CompressorConfig, description="mode specvlm: the compressor")
    data: Annotated[DemoData | ManifestData, Field(discriminator="source")] = DemoData()
    response_source: Literal["dataset", "target"] = Field(
        "target", description="train on the dataset's responses or on the target's own greedy output"
    )
    response_max_new_tokens: int = Field(64, ge=1, description="length cap of target responses")
    # optimization: the paper's AdamW(0.9, 0.95), no warmup, weight decay 0; its lr is 8e-5 for 7B targets
    # (see configs/distill-llava-1.5-7b.yaml), the tiny demo draft trains at 1e-3
    max_steps: int = Field(300, ge=1, description="optimizer steps in total, across resumes")
    batch_size: int = Field(8, ge=1, description="rows per worker per step (global batch = workers * batch_size)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    feature_noise: float = Field(0.0, ge=0, description="uniform noise U(-x, x) on the target features (EAGLE)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 = off")
    logit_weight: float = Field(0.1, ge=0, description="weight of soft CE on the target's logits")
    feat_weight: float = Field(1.0, ge=0, description="weight of SmoothL1 on the target's features")
    # logging, evaluation, checkpoints
    log_every: int = Field(1, ge=1, description="steps between metrics.jsonl lines")
    eval_every: int = Field(50, ge=0, description="steps between accept-length evaluations; 0 = never")
    eval_samples: int = Field(8, ge=0, description="held-out samples per evaluation (batch 1, greedy)")
    eval_max_new_tokens: int = Field(48, ge=1)
    tree: TreeConfig = CPU_TREE
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (the last step always is one)")
    keep_checkpoints: int | None = Field(2, ge=1, description="checkpoints kept in storage; None = all")
    # where and how
    output: str = Field("runs/distill-demo", description="local folder: metrics.jsonl and the final draft/")
    storage_path: str | None = Field(None, description="Ray Train storage (local or s3://); None = <output>/ray")
    name: str = Field("distill", min_length=1, description="Ray Train run name; same storage_path + name = resume")
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=-1, description="worker failures survived (-1 = unlimited)")
    seed: int = Field(0, description="draft init seed; feature noise uses seed + rank")

    @field_validator("output")
    @classmethod
    def _local_output(cls, v: str) -> str:
        if "://" in v:
            raise ValueError(f"output must be a local folder, got {v!r}; put remote storage in storage_path")
        return v

    @model_validator(mode="after")
    def _checks(self):
        if self.draft_init is not None and self.draft_init == "demo":
            raise ValueError("draft_init takes a draft folder (local or s3://), not 'demo'")
        return self

    @property
    def evaluates(self) -> bool:
        return self.eval_every > 0 and self.eval_samples > 0


# ----------------------------------------------------------------------------- target / draft (workers)
def load_job_target(target: str, dtype: str | None = None, device=None):
    """``(model, processor)`` for a folder, an ``s3://`` prefix, or ``demo`` (`specvlm.demo.load_demo`: a rebuild
    in ``$SPECVLM_HOME/demo``, else the build shipped with the package)."""
    from specvlm.demo import load_demo
    from specvlm.loading import load_target, resolve_dtype

    if target != "demo":
        return load_target(target, dtype=dtype, device=str(device) if device is not None else None)
    demo = load_demo()
    model, processor = demo.target, demo.processor
    model = model.to(device=device, dtype=resolve_dtype(dtype) or next(model.parameters()).dtype)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def init_draft(
    model,
    draft_init: str | None,
    seed: int,
    compressor: CompressorConfig | None = None,
    intermediate_size: int | None = None,
):
    """An `EagleDraft` bound to ``model``: from ``draft_init`` when given, else
    ``from_target(model, seed, intermediate_size=intermediate_size)``.

    ``compressor`` (mode specvlm): the draft gets a fresh `ElasticCompressor` with this config,
    unless ``draft_init`` already carries one (which is kept).
    """
    from specvlm import EagleDraft
    from specvlm.compressor import ElasticCompressor
    from specvlm.loading import load_draft
    from specvlm.target import TargetAdapter

    if draft_init is None:
        return EagleDraft.from_target(model, seed=seed, compressor=compressor, intermediate_size=intermediate_size)
    target = TargetAdapter(model)
    draft = load_draft(draft_init)
    if compressor is not None and draft.compressor is None:  # start specvlm from a trained eagle draft
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draft.compressor = ElasticCompressor(compressor, draft.config.hidden_size, draft.config.num_attention_heads)
    if draft.config.hidden_size != target.text_config.hidden_size:
        raise ValueError(
            f"draft_init {draft_init}: hidden size {draft.config.hidden_size} != target's "
            f"{target.text_config.hidden_size}; it was trained for another target"
        )
    return draft.to(device=target.device, dtype=target.dtype).bind(target.embed_tokens, target.lm_head)


# ----------------------------------------------------------------------------- data (driver)
def _demo_rows(data: DemoData, num: int, seed: int) -> list[dict]:
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


def _s3_filesystem():
    """A pyarrow S3 filesystem honouring ``AWS_ENDPOINT_URL(_S3)`` (S3-compatible stores), else None."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    from urllib.parse import urlsplit

    import pyarrow.fs

    u = urlsplit(endpoint)
    return pyarrow.fs.S3FileSystem(endpoint_override=u.netloc or u.path, scheme=u.scheme or "https")


def read_manifest(path: str, need_response: bool):
    """A Ray Dataset over a .jsonl/.parquet manifest, columns ``image, prompt[, response]``."""
    import ray.data

    kw = {}
    if path.startswith("s3://"):
        if (fs := _s3_filesystem()) is not None:
            kw["filesystem"] = fs
            path = path[len("s3://") :]
    else:
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        path = str(Path(path).expanduser().resolve())
    reader = ray.data.read_parquet if path.lower().endswith(".parquet") else ray.data.read_json
    ds = reader(path, **kw)
    need = ["image", "prompt"] + (["response"] if need_response else [])
    names = ds.schema().names
    missing = [c for c in need if c not in names]
    if missing:
        raise ValueError(f"manifest {path} lacks column(s) {', '.join(missing)}; it has {', '.join(names)}")
    return ds.select_columns([c for c in ("image", "prompt", "response") if c in names])


def build_datasets(cfg: DistillJobConfig):
    """``(train Ray Dataset, held-out eval rows, base folder for relative image paths or None)``."""
    import ray.data

    need_response = cfg.response_source == "dataset"
    n_eval = cfg.eval_samples if cfg.evaluates else 0
    if isinstance(cfg.data, DemoData):
        train = ray.data.from_items(_demo_rows(cfg.data, cfg.data.num_samples, cfg.data.seed))
        return train, _demo_rows(cfg.data, n_eval, cfg.data.eval_seed), None
    path = cfg.data.path
    base = None if "://" in path else str(Path(path).expanduser().resolve().parent)
    train = read_manifest(path, need_response)
    if n_eval == 0:
        return train, [], base
    if cfg.data.eval_path is not None:
        # eval rows are read on the driver: relative paths in eval_path resolve against its own folder
        ev = cfg.data.eval_path
        ev_base = None if "://" in ev else str(Path(ev).expanduser().resolve().parent)
        rows = read_manifest(ev, need_response=False).take(n_eval)
        return train, [_absolute(r, ev_base) for r in rows], base
    train, held_out = train.train_test_split(test_size=n_eval)
    return train, [_absolute(r, base) for r in held_out.take_all()], base


def _absolute(row: dict, base: str | None) -> dict:
    img = row.get("image")
    if base is not None and isinstance(img, str) and "://" not in img and not Path(img).expanduser().is_absolute():
        row = {**row, "image": str(Path(base) / img)}
    return row


# ----------------------------------------------------------------------------- the per-worker loop
def _chunks(shard, batch_size: int):
    """Endless ``batch_size``-row chunks (lists of dicts) of a dataset shard, epoch after epoch."""
    while True:
        n = 0
        for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            n += 1
            yield table.to_pylist()
        if n == 0:
            raise RuntimeError("this worker's data shard is empty: use fewer workers or more data")


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. ``config``: ``job`` (DistillJobConfig as JSON), ``output``, ``eval_rows``, ``base``."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from PIL import Image

    from specvlm import EngineConfig, SpecVLMEngine
    from specvlm.distill import (
        BadSample,
        WrappedDraft,
        batch_to,
        collate,
        distill_step,
        evaluate_accept_length,
        load_training_state,
        make_optimizer,
        sample_from_row,
        save_training_state,
        target_responses,
    )
    from specvlm.target import TargetAdapter

    cfg = DistillJobConfig.model_validate(config["job"])
    output, base = Path(config["output"]), config["base"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)  # feature noise differs per worker; the draft init does not (seeded)

    model, processor = load_job_target(cfg.target, cfg.dtype, device)
    for p in model.parameters():
        p.requires_grad_(False)
    target = TargetAdapter(model)
    draft = init_draft(model, cfg.draft_init, cfg.seed, cfg.compressor if cfg.mode == "specvlm" else None,
                       cfg.draft_intermediate_size)  # fmt: skip
    optimizer = make_optimizer(draft, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "skipped_rows": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_training_state(d, draft, optimizer)
        if rank == 0:
            print(f"[distill] resuming from checkpoint at step {state['step']}", flush=True)
    # DDP over the draft only (world > 1); a select-mode compressor leaves unchosen primitives without gradients
    ddp_kwargs = {"find_unused_parameters": True} if draft.compressor is not None else {}
    wrapped = WrappedDraft(draft, ray.train.torch.prepare_model(draft, parallel_strategy_kwargs=ddp_kwargs))

    need_response = cfg.response_source == "dataset"
    ar = SpecVLMEngine(model, None, EngineConfig(mode="ar")) if not need_response else None
    eval_samples = []
    for row in config["eval_rows"] if rank == 0 else []:
        try:
            eval_samples.append(sample_from_row(row, base, need_response=False))
        except BadSample as e:
            print(f"[distill] held-out row skipped ({e})", flush=True)
    blank = {"image": Image.new("RGB", (64, 64)), "prompt": "describe the image.", "response": ""}
    chunks = _chunks(ray.train.get_dataset_shard("train"), cfg.batch_size)
    skipped = 0  # this worker, this attempt
    metrics_path = output / "metrics.jsonl"
    t0 = time.perf_counter()

    for step in range(state["step"] + 1, cfg.max_steps + 1):
        samples = []
        for row in next(chunks):
            try:
                samples.append(sample_from_row(row, base, need_response=need_response))
            except BadSample as e:
                skipped += 1
                if skipped <= 20:
                    print(f"[distill] worker {rank}: skipped row ({e})", flush=True)
        if samples:
            responses = target_responses(ar, processor, samples, cfg.response_max_new_tokens) if ar else None
            batch = collate(processor, samples, responses)
        else:  # every row was bad: still take part in DDP's all-reduce, with nothing to learn from
            batch = collate(processor, [blank])
            batch.loss_mask.zero_()
        res = distill_step(
            target, wrapped, batch_to(batch, device), optimizer, cfg.max_grad_norm,
            logit_weight=cfg.logit_weight, feat_weight=cfg.feat_weight, feature_noise=cfg.feature_noise,
        )  # fmt: skip

        last = step == cfg.max_steps
        evaluate = cfg.evaluates and (step % cfg.eval_every == 0 or last)
        ckpt = step % cfg.checkpoint_every == 0 or last
        if not (step % cfg.log_every == 0 or evaluate or ckpt):
            continue
        names = draft.compressor.names if draft.compressor is not None else []
        chosen = [0.0] * len(names)  # specvlm: rows per primitive the gate picked this step
        for k in res.choices or []:
            chosen[k] += 1
        stats = torch.tensor([res.loss.item(), res.loss_logit, res.loss_feat, res.draft_top1, res.visual_tokens,
                              skipped, *chosen], dtype=torch.float64, device=device)  # fmt: skip
        if world > 1:
            dist.all_reduce(stats)
            stats[:5] /= world
        record = {
            "step": step,
            "loss": stats[0].item(),
            "loss_logit": stats[1].item(),
            "loss_feat": stats[2].item(),
            "draft_top1": stats[3].item(),
            "skipped_rows": state["skipped_rows"] + int(stats[5].item()),
            "lr": optimizer.param_groups[0]["lr"],
            "elapsed_s": round(time.perf_counter() - t0, 3),
        }
        if names:
            record["draft_visual_tokens"] = stats[4].item()
            record["compressor_choices"] = {n: int(c) for n, c in zip(names, stats[6:].tolist())}
        if rank == 0:
            if evaluate and eval_samples:
                engine = SpecVLMEngine(model, draft, EngineConfig(mode=cfg.mode, tree=cfg.tree))
                record["accept_length"] = evaluate_accept_length(
                    engine, processor, eval_samples, cfg.eval_max_new_tokens
                )
            _append_jsonl(metrics_path, record)
            acc = f" accept_length {record['accept_length']:.3f}" if "accept_length" in record else ""
            print(
                f"[distill] step {step}/{cfg.max_steps} loss {record['loss']:.4f} "
                f"(logit {record['loss_logit']:.4f}, feat {record['loss_feat']:.4f}) "
                f"top1 {record['draft_top1']:.3f} skipped {record['skipped_rows']}{acc}",
                flush=True,
            )
        if ckpt:
            with tempfile.TemporaryDirectory() as d:
                ckpt_obj = None
                if rank == 0:
                    save_training_state(d, draft, optimizer, {"step": step, "skipped_rows": record["skipped_rows"]})
                    ckpt_obj = ray.train.Checkpoint.from_directory(d)
                ray.train.report(record, checkpoint=ckpt_obj, checkpoint_dir_name=f"checkpoint_{step:08d}")


# ----------------------------------------------------------------------------- driver
def _check_target(cfg: DistillJobConfig) -> None:
    """Fail on the driver, before workers start, for a missing local target."""
    if cfg.target != "demo" and "://" not in cfg.target and not Path(cfg.target).expanduser().exists():
        raise FileNotFoundError(f"target {cfg.target} does not exist (a local HF folder, an s3:// prefix, or 'demo')")


def run(cfg: DistillJobConfig) -> Path:
    """Run the distillation on the connected Ray cluster; returns ``<output>/draft`` (the final draft)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _check_target(cfg)
    output = Path(cfg.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    train_ds, eval_rows, base = build_datasets(cfg)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.model_dump(mode="json"),
            "output": str(output),
            "eval_rows": eval_rows,
            "base": base,
        },
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path or str(output / "ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"distillation run {cfg.name} finished without a checkpoint")
    final = output / "draft"
    with result.checkpoint.as_directory() as d:
        step = json.loads((Path(d) / "state.json").read_text())["step"]
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(Path(d) / "draft", final)
    print(f"[distill] final draft (step {step}) written to {final}  (EagleDraft.from_pretrained({str(final)!r}))")
    return final


def main(argv: list[str] | None = None) -> None:
    """``specvlm distill``: parse args, connect to (or start) Ray, run the job."""
    ap = argparse.ArgumentParser(prog="specvlm distill", description="distill the EAGLE draft with Ray Train")
    ap.add_argument("--config", type=Path, help=f"job YAML (default: the demo job, {DEMO_CONFIG.name})")
    ap.add_argument("--workers", type=int, help="override workers")
    ap.add_argument("--max-steps", type=int, help="override max_steps")
    ap.add_argument("--output", help="override output")
    add_address_flag(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, DistillJobConfig) if args.config else DistillJobConfig()
        overrides = {"workers": args.workers, "max_steps": args.max_steps, "output": args.output}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            cfg = parse_config({**cfg.model_dump(), **overrides}, DistillJobConfig, source="command line")
    except ConfigError as e:
        sys.exit(str(e))
    started = init_ray(args.address)
    try:
        run(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

"""Ray Train job: online-logit distillation of the EAGLE draft against a frozen target.

``specvlm distill [--config FILE] [--workers N] [--max-steps N] [--output DIR] [--print-config]``

What runs where::

    driver      validate DistillJobConfig, check the model (`specvlm.loading.resolve_model`), build the Ray
                Dataset (`pipelines.distill_data`: demo world rows with PNG bytes, or a .jsonl/.parquet
                manifest), start TorchTrainer, copy the final draft to <output>/draft/
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
import json
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
    ModelConfig,
    StrictModel,
    TreeConfig,
    config_yaml,
    load_config,
    parse_config,
)
from specvlm.loading import resolve_model

from .distill_data import CaptionOutputData, DemoData, ManifestData, build_datasets, chunks
from .ray_cluster import add_address_flag, init_ray


class DistillOptim(StrictModel):
    """The optimizer and loss settings both trainers take (`specvlm distill`, the caption job's online_distill).

    The paper's AdamW(0.9, 0.95), no warmup, weight decay 0; its lr is 8e-5 for 7B targets (see
    configs/distill-llava-1.5-7b.yaml), the tiny demo draft trains at 1e-3."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    feature_noise: float = Field(0.0, ge=0, description="uniform noise U(-x, x) on the target features (EAGLE)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 = off")
    logit_weight: float = Field(0.1, ge=0, description="weight of soft CE on the target's logits")
    feat_weight: float = Field(1.0, ge=0, description="weight of SmoothL1 on the target's features")

    def loss_kwargs(self) -> dict:
        """`specvlm.distill.distill_step`'s loss keywords."""
        return {"logit_weight": self.logit_weight, "feat_weight": self.feat_weight, "feature_noise": self.feature_noise}


class DistillJobConfig(DistillOptim):
    """Everything `specvlm distill` takes, every default included (the demo job; ``--print-config`` prints it)."""

    model: ModelConfig = Field(
        ModelConfig(),
        description="model.target (+ model.dtype): the frozen target; model.draft: the draft to start from (a "
        "folder or s3:// prefix), None = a fresh EagleDraft.from_target(seed), also for target demo",
    )
    draft_intermediate_size: int | None = Field(
        None, ge=1, description="a fresh draft layer's MLP width; None = the target's (ignored with model.draft)"
    )
    mode: Literal["eagle", "specvlm"] = Field(
        "eagle", description="eagle: the draft alone; specvlm: the draft + elastic visual compressor, trained jointly"
    )
    compressor: CompressorConfig = Field(default_factory=CompressorConfig, description="mode specvlm: the compressor")
    data: Annotated[DemoData | ManifestData | CaptionOutputData, Field(discriminator="source")] = DemoData()
    response_source: Literal["dataset", "target"] = Field(
        "target", description="train on the dataset's responses or on the target's own greedy output"
    )
    response_max_new_tokens: int = Field(64, ge=1, description="length cap of target responses")
    max_steps: int = Field(300, ge=1, description="optimizer steps in total, across resumes")
    batch_size: int = Field(8, ge=1, description="rows per worker per step (global batch = workers * batch_size)")
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

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and (old := [k for k in ("target", "dtype", "draft_init") if k in data]):
            raise ValueError(f"{', '.join(old)}: now model.target, model.dtype and model.draft (a ModelConfig)")
        return data

    @model_validator(mode="after")
    def _checks(self):
        if self.model.device is not None:
            raise ValueError("model.device: the job places the target on each worker's device (use_gpu)")
        return self

    @property
    def evaluates(self) -> bool:
        return self.eval_every > 0 and self.eval_samples > 0


# ----------------------------------------------------------------------------- target / draft (workers)
def load_models(cfg: DistillJobConfig, device=None):
    """``(target, processor, draft)`` for a worker: the frozen target (`resolve_model` names it; requires_grad
    False) on ``device``, and the draft bound to it (`EagleDraft.for_target`: ``model.draft`` or a fresh one;
    with a compressor in mode specvlm)."""
    from specvlm import EagleDraft
    from specvlm.loading import load_draft, load_target

    folders = resolve_model(cfg.model, cfg.mode, fresh_draft=True)
    model, processor = load_target(folders.target, cfg.model.dtype or folders.dtype,
                                   str(device) if device is not None else None)  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    draft = EagleDraft.for_target(
        model, load_draft(folders.draft) if folders.draft else None, seed=cfg.seed,
        compressor=cfg.compressor if cfg.mode == "specvlm" else None, intermediate_size=cfg.draft_intermediate_size,
    )  # fmt: skip
    return model, processor, draft


# ----------------------------------------------------------------------------- the per-worker loop
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
        encode_samples,
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

    model, processor, draft = load_models(cfg, device)
    target = TargetAdapter(model)
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
    eval_samples = []  # held-out prompts, encoded once
    for row in config["eval_rows"] if rank == 0 else []:
        try:
            eval_samples.append(encode_samples(processor, [sample_from_row(row, base, need_response=False)]))
        except BadSample as e:
            print(f"[distill] held-out row skipped ({e})", flush=True)
    blank = {"image": Image.new("RGB", (64, 64)), "prompt": "describe the image.", "response": ""}
    rows = chunks(ray.train.get_dataset_shard("train"), cfg.batch_size)
    skipped = 0  # this worker, this attempt
    metrics_path = output / "metrics.jsonl"
    t0 = time.perf_counter()

    for step in range(state["step"] + 1, cfg.max_steps + 1):
        samples = []
        for row in next(rows):
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
        res = distill_step(target, wrapped, batch_to(batch, device), optimizer, cfg.max_grad_norm, **cfg.loss_kwargs())

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
                record["accept_length"] = evaluate_accept_length(engine, eval_samples, cfg.eval_max_new_tokens)
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
def run(cfg: DistillJobConfig) -> Path:
    """Run the distillation on the connected Ray cluster; returns ``<output>/draft`` (the final draft)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resolve_model(cfg.model, cfg.mode, fresh_draft=True)  # fails here, before workers start, for a missing folder
    output = Path(cfg.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    n_eval = cfg.eval_samples if cfg.evaluates else 0
    train_ds, eval_rows, base = build_datasets(cfg.data, cfg.response_source == "dataset", n_eval)
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


def main(argv: list[str] | None = None) -> int:
    """``specvlm distill``: parse args, connect to (or start) Ray, run the job; 0 when done."""
    ap = argparse.ArgumentParser(prog="specvlm distill", description="distill the EAGLE draft with Ray Train")
    ap.add_argument("--config", type=Path, help="job YAML over DistillJobConfig's defaults (default: the demo job)")
    ap.add_argument("--workers", type=int, help="override workers")
    ap.add_argument("--max-steps", type=int, help="override max_steps")
    ap.add_argument("--output", help="override output")
    ap.add_argument("--from-output", metavar="OUT", help="train on a caption job's output OUT (its captions are the "
                    "target's own responses): data.source caption_output, response_source dataset")  # fmt: skip
    ap.add_argument("--print-config", action="store_true",
                    help="print the full config (defaults, --config and flags applied) as YAML and exit")  # fmt: skip
    add_address_flag(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, DistillJobConfig) if args.config else DistillJobConfig()
        overrides = {"workers": args.workers, "max_steps": args.max_steps, "output": args.output}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if args.from_output:
            overrides |= {"data": {"source": "caption_output", "path": args.from_output}, "response_source": "dataset"}
        if overrides:
            cfg = parse_config({**cfg.model_dump(), **overrides}, DistillJobConfig, source="command line")
    except ConfigError as e:
        sys.exit(str(e))
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    try:
        resolve_model(cfg.model, cfg.mode, fresh_draft=True)  # a missing model fails before Ray starts
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"specvlm distill: {e}")
    started = init_ray(args.address, dashboard=True)  # Ray Train's controller polls the state API
    try:
        run(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Online distillation inside a caption job: the draft learns from the job's own rows and reaches its actors.

``specvlm caption ... --online-distill`` (or ``online_distill: {enabled: true}`` in the job config).

What runs where::

    driver          `OnlineDistill.start`: a `RowBuffer` actor and a Ray task that runs TorchTrainer.fit();
                    after the output is written, `OnlineDistill.finish` closes the buffer, waits for the
                    trainer to stop and adds ``online_distill`` to _summary.json
    caption actors  each finished row -> `BufferFeeder.offer` (never waits: rows are dropped from training,
                    never from the output); before each batch `DraftFollower.poll` -> `EngineLoop.swap_draft`
    RowBuffer       bounded (oldest dropped when full); its first held_out_rows rows are never trained on
    trainer worker  load the frozen target once, start from the promoted version (resume) or the job's draft;
                    per step: batch_size rows from the buffer -> `specvlm.distill.distill_step`; every
                    publish_every steps (rank 0): held-out accept length -> DraftStore.publish -> promote if at
                    least as good as the draft the actors decode with, measured on the same held-out rows;
                    stops once converged (`Patience`) or at max_steps, and then retires the buffer (the actors
                    stop sending rows)

Training rows are what the actors already hold: the encoded prompt and the target's own greedy tokens; the
trainer recomputes the target's features (one teacher forward per row). Sending the features instead would
save that forward but cost more to move: measured on the demo, a row's inputs pickle to 110 KiB (float32
pixels, 3 x 96 x 96) against 121 KiB of float32 features for its 73 prompt + 48 answer tokens (256 wide);
for LLaVA-1.5-7B the pixels are 1.3 MiB (3 x 336 x 336, float32) against 5.3 MiB of bf16 features (~680
tokens x 4096): 4x more to move through the object store per row.

Guarantees: outputs are token-identical whatever draft decodes them (each row records its
``draft_version``); a trainer that fails or is killed never fails the caption job (``online_distill.status``
says ``stopped`` and why, the actors keep the last promoted draft); a caption job resumed on the same output
restarts the trainer from the store's promoted version (its optimizer state starts afresh).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

from pydantic import Field

from .distill import DistillOptim


class OnlineDistillConfig(DistillOptim):
    """The caption job's ``online_distill`` block (`specvlm caption --online-distill` switches it on)."""

    enabled: bool = Field(False, description="distil the draft from the job's own rows while it runs")
    store: str | None = Field(None, description="draft store (local folder or s3:// prefix); None = <output>/_drafts")
    batch_size: int = Field(8, ge=1, description="rows per trainer worker per step")
    publish_every: int = Field(20, ge=1, description="steps between published (and maybe promoted) versions")
    max_steps: int | None = Field(None, ge=1, description="steps at most, across resumes; None = until the job ends")
    patience: int | None = Field(
        3, ge=1, description="stop training once the mean held-out accept length of the last `patience` "
        "published versions (the starting draft counting as the first) is not min_improvement above the mean of "
        "the `patience` before them: the draft has converged on this job's rows, and the rest of the job runs "
        "with the cores to itself; None = train until the job ends or max_steps",
    )  # fmt: skip
    min_improvement: float = Field(0.02, ge=0, description="relative gain between those two means that counts "
                                   "as progress for patience (0.02 = 2%)")  # fmt: skip
    buffer_rows: int = Field(256, ge=1, description="training rows buffered at most (then the oldest are dropped)")
    held_out_rows: int = Field(16, ge=1, description="the job's first rows, kept aside to measure accept length on")
    eval_max_new_tokens: int | None = Field(None, ge=1, description="held-out decode length; None = the job's "
                                            "sampling.max_new_tokens")  # fmt: skip
    poll_s: float = Field(5.0, gt=0, description="actors look for a promoted version at most this often")
    workers: int = Field(1, ge=1, description="trainer workers (DDP over the draft)")
    cpus_per_worker: float = Field(
        0.0, ge=0, description="CPUs reserved per trainer worker; 0 = none: it shares the cores of the job's actors "
        "and tasks (the CPU demo; one torch thread)",
    )  # fmt: skip
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per trainer worker (caption actors keep theirs)")
    memory_gb_per_worker: float = Field(1.0, gt=0, description="memory reserved per trainer worker (Ray's logical "
                                        "memory resource): it holds its own copy of the target")  # fmt: skip
    max_failures: int = Field(0, ge=-1, description="trainer restarts after a worker failure (-1 = unlimited); "
                              "past them training stops and the caption job goes on")  # fmt: skip
    stop_timeout_s: float = Field(120.0, gt=0, description="how long the job waits for the trainer to stop at its end")
    idle_priority: bool | None = Field(
        None, description="run the trainer's threads under Linux SCHED_IDLE: they get only the CPU time the job's "
        "actors and tasks leave idle, so training never slows the captioning; None = when cpus_per_worker is 0 "
        "(it shares their cores)",
    )  # fmt: skip
    wait_for_trainer_s: float = Field(
        0.0, ge=0, description="hold captioning back until the trainer is up, this long at most (a short job's "
        "first rows then train too); 0 = start at once (the rows decoded before it is up only fill the buffer)",
    )  # fmt: skip


def store_root(cfg) -> str:
    """The draft store a caption job ``cfg`` uses: ``online_distill.store``, else ``<output>/_drafts``."""
    return cfg.online_distill.store or f"{cfg.output.rstrip('/')}/_drafts"


# ----------------------------------------------------------------------------- the trainer (workers)
def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. ``config``: ``online`` (OnlineDistillConfig JSON), ``model`` (ModelConfig JSON),
    ``mode``, ``tree`` (TreeConfig JSON), ``eval_max_new_tokens``, ``buffer`` (the RowBuffer handle), ``store``."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from specvlm import EagleDraft, EngineConfig, SpecVLMEngine
    from specvlm.config import ModelConfig, TreeConfig
    from specvlm.distill import (
        WrappedDraft,
        batch_from_inputs,
        batch_to,
        distill_step,
        evaluate_accept_length,
        make_optimizer,
    )
    from specvlm.draft_store import DraftStore
    from specvlm.inputs import pad_token_id
    from specvlm.loading import load_draft, load_target, resolve_model
    from specvlm.target import TargetAdapter

    cfg = OnlineDistillConfig.model_validate(config["online"])
    model_cfg, mode = ModelConfig.model_validate(config["model"]), config["mode"]
    tree = TreeConfig.model_validate(config["tree"])
    buffer, store = config["buffer"], DraftStore(config["store"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # the CPUs it reserved (at least one thread; 0 reserved = it shares the job's cores)
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    if cfg.idle_priority if cfg.idle_priority is not None else cfg.cpus_per_worker == 0:
        idle_priority()

    folders = resolve_model(model_cfg, mode)
    model, processor = load_target(folders.target, model_cfg.dtype or folders.dtype, str(device))
    for p in model.parameters():
        p.requires_grad_(False)
    target = TargetAdapter(model)
    start = store.promoted()  # a resumed job continues from what its actors decode with
    draft = EagleDraft.for_target(model, store.load(start) if start is not None else load_draft(folders.draft))
    step = first = start.step if start is not None else 0
    # a version is promoted only if it is at least as good as the draft the actors decode with, on the same
    # held-out rows: first the draft this trainer started from (measured once the rows are there), then the
    # last version it promoted
    origin = {k: v.detach().clone() for k, v in draft.state_dict().items()} if rank == 0 else None
    floor: float | None = None
    patience = Patience(cfg.patience, cfg.min_improvement)
    held: list[dict] = []  # the held-out rows, fetched from the buffer until all held_out_rows are there
    optimizer = make_optimizer(draft, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ddp_kwargs = {"find_unused_parameters": True} if draft.compressor is not None else {}
    wrapped = WrappedDraft(draft, ray.train.torch.prepare_model(draft, parallel_strategy_kwargs=ddp_kwargs))
    pad = pad_token_id(processor.tokenizer)
    report = {"start": start.name if start is not None else folders.draft_name, "steps": 0, "start_accept_length": None}
    if rank == 0:
        buffer.report.remote(report)  # the driver's sign that the trainer is up (`wait_for_trainer_s`)
        print(f"[online-distill] trainer up ({world} worker(s)); starting from {report['start']} at step {first}",
              flush=True)  # fmt: skip

    def held_out_accept(held: list[dict]) -> float:
        draft.eval()
        engine = SpecVLMEngine(model, draft, EngineConfig(mode=mode, tree=tree))
        inputs = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in r["inputs"].items()} for r in held]
        return evaluate_accept_length(engine, inputs, config["eval_max_new_tokens"])

    def publish() -> bool:
        """Publish (and maybe promote) the draft; returns whether training has converged (patience)."""
        nonlocal floor, held
        if len(held) < cfg.held_out_rows:
            held = ray.get(buffer.held_out.remote())
        if len(held) < cfg.held_out_rows:  # versions are compared on one fixed set of rows: wait for all of it
            print(f"[online-distill] step {step}: {len(held)}/{cfg.held_out_rows} held-out rows so far; "
                  "not publishing yet", flush=True)  # fmt: skip
            return False
        if floor is None:
            now = {k: v.detach().clone() for k, v in draft.state_dict().items()}
            draft.load_state_dict(origin)
            floor = report["start_accept_length"] = held_out_accept(held)
            patience.update(floor)
            draft.load_state_dict(now)
        acc = held_out_accept(held)
        version = store.publish(draft, step, acc, len(held))
        promoted = store.promote(version, floor=floor)
        print(f"[online-distill] step {step}: published {version.name}, held-out accept length {acc:.3f} on "
              f"{len(held)} rows (decoding now: {floor:.3f}): {'promoted' if promoted else 'not promoted'}",
              flush=True)  # fmt: skip
        if promoted:
            floor = acc
        return patience.update(acc)

    why = "the caption job ended"
    while cfg.max_steps is None or step < cfg.max_steps:
        rows, closed = [], False
        while len(rows) < cfg.batch_size and not closed:
            got, closed = ray.get(buffer.take.remote(cfg.batch_size - len(rows), 1.0))
            rows += got
        # [2]: (no rows, closed) on any rank: all ranks step together or stop together. The job has ended once
        # the buffer is closed (its rows are all decoded); the rows that came with the close are the last step.
        ended = torch.tensor([float(not rows), float(closed)], device=device)
        if world > 1:
            dist.all_reduce(ended, op=dist.ReduceOp.MAX)
        if ended[0].item():
            break
        batch = batch_from_inputs([r["inputs"] for r in rows], [r["response"] for r in rows], pad)
        distill_step(target, wrapped, batch_to(batch, device), optimizer, cfg.max_grad_norm, **cfg.loss_kwargs())
        step += 1
        report["steps"] = step - first
        converged = torch.zeros(1, device=device)  # [1] 1.0 once rank 0 finds the draft converged
        if rank == 0 and (step - first) % cfg.publish_every == 0:
            converged[0] = float(publish())
            buffer.report.remote(report)
        if world > 1:
            dist.all_reduce(converged, op=dist.ReduceOp.MAX)
        if converged.item():
            why = (f"converged: the mean held-out accept length of the last {cfg.patience} versions is not "
                   f"{cfg.min_improvement:.0%} above the {cfg.patience} before"
                   + (" ({1:.3f} vs {0:.3f})".format(*patience.means) if rank == 0 else ""))  # fmt: skip
            break
        if ended[1].item():
            break
    else:
        why = "max_steps reached"
    if rank == 0:
        report["ended"] = why
        try:  # landed before the job reads it: fit() may return before a fire-and-forget call arrives
            ray.get(buffer.report.remote(report))
        except ray.exceptions.RayError:  # the buffer is gone: the job is ending without it
            pass
        if why != "the caption job ended":  # stopped for good: the actors stop sending rows
            buffer.retire.remote()
        print(f"[online-distill] trainer stopped after {step - first} steps ({why})", flush=True)


class Patience:
    """Early stopping on held-out accept length: `update` with each measurement (the starting draft's first)
    returns True once the mean of the last ``patience`` measurements is not ``min_improvement`` (relative)
    above the mean of the ``patience`` before them: the trend has flattened. Means of windows, not a new
    figure against the best so far: on 16 held-out rows one lucky figure (4.25, then 4.06, 4.01, 4.25 in a
    benchmark run) stopped a draft that went on to 5.0 when trained longer. ``patience`` None: never."""

    def __init__(self, patience: int | None, min_improvement: float):
        self.patience, self.min_improvement = patience, min_improvement
        self.history: list[float] = []
        self.means: tuple[float, float] | None = None  # (the window before, the last window) at the last test

    def update(self, accept_length: float) -> bool:
        self.history.append(accept_length)
        n = self.patience
        if n is None or len(self.history) < 2 * n:
            return False
        self.means = (statistics.fmean(self.history[-2 * n : -n]), statistics.fmean(self.history[-n:]))
        return self.means[1] < self.means[0] * (1 + self.min_improvement)


def idle_priority() -> bool:
    """Put every thread of this process under SCHED_IDLE (Linux; threads started later inherit it): it then
    runs only on CPU time nothing else wants. Returns whether it could (False elsewhere)."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return False
    return True


def _fit(trainer_args: dict) -> None:
    """TorchTrainer(**trainer_args).fit(), in a Ray task of its own so that the driver goes on writing."""
    from ray.train.torch import TorchTrainer

    TorchTrainer(train_loop_per_worker, **trainer_args).fit()


# ----------------------------------------------------------------------------- the driver side
class OnlineDistill:
    """The driver's handle on one job's online distillation: `start` it before the dataset runs, hand
    `actor_kwargs` to the caption actors, `finish` it once the output is written."""

    def __init__(self, cfg, draft_name: str | None, buffer, fit_ref, root: str):
        self.cfg, self.draft_name, self.buffer, self.fit_ref, self.root = cfg, draft_name, buffer, fit_ref, root

    @classmethod
    def start(cls, cfg, run_id: str, draft_name: str | None) -> OnlineDistill:
        """Start the buffer and the trainer for caption job ``cfg`` (its engine mode must have a draft)."""
        import tempfile

        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig

        from actors.row_buffer import RowBuffer

        o = cfg.online_distill
        root = store_root(cfg)
        buffer = ray.remote(num_cpus=0, max_concurrency=4 + o.workers)(RowBuffer).remote(o.buffer_rows, o.held_out_rows)
        resources = {"CPU": o.cpus_per_worker, "GPU": o.gpus_per_worker, "memory": int(o.memory_gb_per_worker * 2**30)}
        trainer_args = {
            "train_loop_config": {
                "online": o.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
                "mode": cfg.engine.mode, "tree": cfg.engine.tree.model_dump(mode="json"),
                "eval_max_new_tokens": o.eval_max_new_tokens or cfg.sampling.max_new_tokens,
                "buffer": buffer, "store": root,
            },
            "scaling_config": ScalingConfig(num_workers=o.workers, use_gpu=o.gpus_per_worker > 0,
                                            resources_per_worker=resources),
            # no checkpoints go through Ray Train (versions go to the store), so its storage is scratch space
            "run_config": RunConfig(name=f"online-distill-{run_id}", failure_config=FailureConfig(o.max_failures),
                                    storage_path=str(Path(tempfile.gettempdir()) / "specvlm-online-distill")),
        }  # fmt: skip
        # not waiting for the buffer to be up: its first rows queue in the actors' feeders (or are dropped from
        # training past the feeder's ``max_in_flight``), while the caption actors start at once
        fit_ref = ray.remote(num_cpus=0, max_retries=0)(_fit).remote(trainer_args)
        deadline = time.monotonic() + o.wait_for_trainer_s
        while time.monotonic() < deadline and not ray.get(buffer.stats.remote())["trainer"]:
            if ray.wait([fit_ref], timeout=0.5)[0]:  # the trainer ended before it was up: finish() says why
                break
        print(f"[caption] online distillation: draft store {root}, {o.workers} trainer worker(s) x "
              f"{o.cpus_per_worker:g} CPU{f' + {o.gpus_per_worker:g} GPU' if o.gpus_per_worker else ''}, "
              f"publishing every {o.publish_every} steps of {o.batch_size} rows", flush=True)  # fmt: skip
        return cls(cfg, draft_name, buffer, fit_ref, root)

    def actor_kwargs(self) -> dict:
        """The Captioner's ``online`` argument."""
        return {"buffer": self.buffer, "store": self.root, "poll_s": self.cfg.online_distill.poll_s}

    def abort(self) -> None:
        """Stop the trainer and the buffer now (the caption job failed)."""
        import ray

        ray.cancel(self.fit_ref, force=True)  # the trainer's controller and workers are this task's: they go too
        ray.kill(self.buffer)

    def finish(self, rows: list[dict]) -> dict:
        """Close the buffer, wait for the trainer (``stop_timeout_s``), and return the summary's
        ``online_distill`` section; ``rows``: this run's output rows (``draft_version``, ``accept_length``,
        ``error``)."""
        import ray

        status, reason, stats = "finished", None, {}
        try:
            ray.get(self.buffer.close.remote())
        except ray.exceptions.RayError as e:  # the buffer actor died: the trainer cannot have gone on either
            status, reason = "stopped", f"the row buffer failed: {_reason(e)}"
        try:
            ray.get(self.fit_ref, timeout=self.cfg.online_distill.stop_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(self.fit_ref, force=True)
            status, reason = "stopped", f"the trainer did not stop within {self.cfg.online_distill.stop_timeout_s} s"
        except Exception as e:  # TrainingFailedError, a killed task: training stopped, the job did not
            status, reason = "stopped", reason or f"the trainer failed: {_reason(e)}"
        try:
            stats = ray.get(self.buffer.stats.remote())  # after the trainer's last report
        except ray.exceptions.RayError:
            pass
        ray.kill(self.buffer)
        section = summarize(self.root, rows, stats, status, reason, self.draft_name)
        for line in progress_lines(section):
            print(line, flush=True)
        return section


def _reason(e: BaseException, limit: int = 240) -> str:
    """``Type: message`` of an exception for the summary: the last line of its text (Ray's chained reports
    end with the cause), cut to ``limit`` characters."""
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[-1] if text else ''}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def summarize(root: str, rows: list[dict], stats: dict, status: str, reason: str | None,
              draft_name: str | None) -> dict:  # fmt: skip
    """``_summary.json``'s ``online_distill``: the store's versions (step, held-out accept length, whether and
    when promoted), rows decoded with each draft and their mean accept length, the buffer's counts, and how
    training ended."""
    from specvlm.draft_store import DraftStore

    store = DraftStore(root)
    promoted_at = {h["version"]: h["promoted_at"] for h in store.history()}
    decoded: dict[str | None, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("error") is None:
            decoded[r.get("draft_version")].append(r.get("accept_length") or 0.0)

    def use(name: str | None) -> dict:
        acc = decoded.get(name, [])
        return {"rows_decoded": len(acc), "mean_accept_length": round(sum(acc) / len(acc), 4) if acc else None}

    versions = [{"version": v.name, "step": v.step, "held_out_accept_length": v.accept_length,
                 "held_out_rows": v.held_out_rows, "published_at": v.published_at,
                 "promoted": v.version in promoted_at, "promoted_at": promoted_at.get(v.version), **use(v.name)}
                for v in store.versions()]  # fmt: skip
    trainer = stats.get("trainer") or {}
    return {
        "store": root,
        "status": status,
        "reason": reason or trainer.get("ended"),
        "steps": trainer.get("steps", 0),
        "start_draft": {
            "version": draft_name,
            "held_out_accept_length": trainer.get("start_accept_length"),
            **use(draft_name),
        },  # fmt: skip
        "versions": versions,
        "promoted": sum(v["promoted"] for v in versions),
        "rows": {
            k: stats[k]
            for k in ("received", "held_out", "to_trainer", "dropped_full", "dropped_at_actors")
            if k in stats
        },  # fmt: skip
    }


def progress_lines(section: dict) -> list[str]:
    """The job log's lines for a summary's ``online_distill`` section."""
    s = section
    lines = [f"[caption] online distillation {s['status']}" + (f" ({s['reason']})" if s["reason"] else "")
             + f": {s['steps']} steps, {len(s['versions'])} versions published, {s['promoted']} promoted; rows "
             + ", ".join(f"{k} {v}" for k, v in s["rows"].items())]  # fmt: skip
    for v in [s["start_draft"], *s["versions"]]:
        held = v.get("held_out_accept_length")
        acc = v["mean_accept_length"]
        lines.append(f"[caption]   {v['version']}: held-out accept {held if held is None else f'{held:.3f}'}"
                     f"{' (promoted)' if v.get('promoted') else ''}; decoded {v['rows_decoded']} rows"
                     + (f" at accept length {acc:.3f}" if acc is not None else ""))  # fmt: skip
    return lines

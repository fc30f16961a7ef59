"""Ray Data batch captioning: images, videos, webdataset shards or a manifest in, one parquet row per input out.

``specvlm caption --input PATH_OR_URI --output PATH_OR_URI [--config FILE] [--prompt TEXT] ...``
(or ``python -m pipelines.caption ...``, e.g. under ``ray job submit``).

What runs where::

    driver        validate CaptionJobConfig, list the input (folder/prefix, shards, manifest), read the ids
                  already in the output (resume), build the dataset, print and write the summary
    CPU tasks     [expand .tar shards / JSON-lines manifest] -> drop ids already written -> read bytes (local / S3)
                  and decode (`specvlm.media`: limits, uniform video frames: the model's video input for Qwen-VL
                  targets, else tiled into one image) -> raw RGB rows, regrouped into blocks of exactly
                  batch_size rows (so every model call but the last is full)
    actor pool    `actors.captioner.Captioner` (ActorPoolStrategy(min, max), num_gpus per actor): one engine
                  and one engine loop thread per actor; ``batching: continuous`` runs two calls at once per
                  actor so the next batch's rows join as the previous batch's rows finish (up to max_rows
                  decoding); rows with an error pass through
    write tasks   parquet part files named ``<run id>_<write uuid>_<task>-<i>.parquet`` under the output

Every input id ends up in the output exactly once:

- bad inputs (unreadable, corrupt, too large, a bad manifest line, an exception in a decoder) are rows
  with ``error`` set, never dropped; folder entries that are no input are counted by reason (``ignored``);
- resume: ids already in the output are filtered out before reading; a part file a crash left
  half-written does not read, so it is moved aside as ``_partial-<name>`` and its ids are redone;
- a dead actor (killed process, lost node) is restarted by Ray (``max_actor_restarts``) and its batch
  retried (``max_task_retries``, by default until done: each attempt made while the actor is still
  restarting counts as one); a retried write task rewrites the same file name (deterministic per write
  uuid and task), so it adds no rows;
- after the write, `caption_io.dedupe_output` removes any row whose id an earlier file already holds
  (e.g. duplicate ids in a manifest), so the final output never has two rows for one id.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from specvlm import storage
from specvlm.config import (
    CPU_TREE,
    ConfigError,
    EngineConfig,
    ModelConfig,
    SamplingConfig,
    StrictModel,
    config_yaml,
    load_config,
    parse_config,
)
from specvlm.loading import VIDEO_FAMILIES, resolve_model, target_family

from . import caption_io as cio
from .online_distill import OnlineDistill, OnlineDistillConfig
from .ray_cluster import add_address_flag, init_ray

MAX_INPUT_BLOCKS = 1000  # listed files are cut into at most this many blocks (small jobs: one row per block)
# continuous batching: one call's rows decode while the next call's wait in the actor's loop and take the places
# of rows that finish; more calls would only queue more rows (max_rows bounds the engine either way)
CALLS_PER_ACTOR = 2


class ActorPool(StrictModel):
    """Captioner actors: the pool grows from ``min`` to ``max`` while there is work, and shrinks when idle."""

    min: int = Field(1, ge=1, description="actors kept while the job runs")
    max: int = Field(1, ge=1, description="actors at most (e.g. one per GPU)")

    @model_validator(mode="after")
    def _order(self):
        if self.min > self.max:
            raise ValueError(f"min={self.min} > max={self.max}")
        return self


class CaptionJobConfig(StrictModel):
    """Everything `specvlm caption` takes, every default included (the demo model on CPU); ``specvlm caption
    --print-config`` prints it as YAML."""

    input: str | None = Field(None, description="folder, s3:// prefix, .tar shard, manifest (.parquet/.jsonl) or file")
    output: str | None = Field(None, description="output folder or s3:// prefix (parquet parts + _summary.json)")
    model: ModelConfig = Field(ModelConfig(), description="target and draft to load in each actor")
    engine: EngineConfig = Field(EngineConfig(mode="eagle", tree=CPU_TREE), description="how each actor decodes")
    sampling: SamplingConfig = Field(SamplingConfig(max_new_tokens=64), description="decoding settings per row")
    decode: cio.DecodeOptions = Field(
        cio.DecodeOptions(), description="how each input becomes one RGB image and its prompt (CPU decode tasks)"
    )
    actors: ActorPool = Field(ActorPool(), description="elastic pool of Captioner actors (min..max)")
    actor_resources: dict[str, float] = Field(
        {}, description="custom Ray resources per actor (e.g. {accelerator_node: 1} to pin actors to labelled nodes)"
    )
    batch_size: int = Field(8, ge=1, description="rows per actor call")
    batching: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: an actor takes two calls at once and rows of the next batch join "
        "its engine as rows of the previous one finish; static: one call at a time, each batch decoded to its end "
        "(one batched generate per call, for comparison)",
    )  # fmt: skip
    max_rows: int | None = Field(
        None, ge=1, description="rows decoding at once in an actor's engine (bounds its KV memory); None = "
        "batch_size times the calls an actor takes at once (continuous: 2 x batch_size; set batch_size to keep a "
        "static batch's peak memory)",
    )  # fmt: skip
    gpus_per_actor: float | None = Field(
        None, ge=0, description="None = 1 if the cluster has GPUs, else 0; 0.5 puts two actors on a GPU"
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per actor")
    decode_batch_size: int = Field(16, ge=1, description="rows per CPU decode call")
    cpus_per_decode_task: float = Field(1.0, gt=0, description="CPUs reserved per decode task")
    max_actor_restarts: int = Field(-1, ge=-1, description="restarts of a dead actor, e.g. a lost node's (-1 = always)")
    max_task_retries: int = Field(
        -1, ge=-1, description="retries of a batch whose actor died or is restarting (-1 = until it is done)"
    )
    rows_per_file: int = Field(256, ge=1, description="rows buffered per parquet part (a crash redoes at most these)")
    online_distill: OnlineDistillConfig = Field(
        OnlineDistillConfig(), description="distil the draft from this job's rows while it runs, and swap promoted "
        "versions into the actors (pipelines.online_distill)",
    )  # fmt: skip

    def engine_rows(self) -> int:
        """The actor engine loop's ``max_rows``: ``max_rows``, else every row of the calls an actor runs at once."""
        return self.max_rows or self.batch_size * self.calls_per_actor()

    def calls_per_actor(self) -> int:
        """Calls Ray Data runs at once on one actor: `CALLS_PER_ACTOR` when continuous, else 1."""
        return CALLS_PER_ACTOR if self.batching == "continuous" else 1

    @field_validator("input", "output")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and "://" in v and not v.startswith("s3://"):
            raise ValueError(f"{v!r}: use a local path or an s3:// URI")
        return v

    @model_validator(mode="after")
    def _online(self):
        if self.online_distill.enabled and self.engine.mode == "ar":
            raise ValueError("online_distill needs a draft to train: engine.mode eagle or specvlm, not ar")
        return self

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        """Configs written before ``decode:`` existed name their keys' new place instead of 'extra inputs'."""
        if isinstance(data, dict) and (old := [k for k in cio.DecodeOptions.model_fields if k in data]):
            raise ValueError(f"{', '.join(old)}: now under decode: (decode.{old[0]}, ...; see --print-config)")
        return data


# ----------------------------------------------------------------------------- dataset
def resource_warning(cfg: CaptionJobConfig, gpus: float, nodes: list[dict]) -> str | None:
    """A warning when the cluster (``ray.nodes()``-style entries with ``Alive`` and ``Resources``) cannot hold
    ``actors.min`` actors plus one decode task: the job would then wait without progress. None when it fits."""
    need = {"CPU": cfg.cpus_per_actor, "GPU": gpus, **cfg.actor_resources}
    need = {k: v for k, v in need.items() if v}
    left = [dict(n.get("Resources") or {}) for n in nodes if n.get("Alive", True)]
    placed = 0
    for res in left:  # first fit: as many actors on each node as its resources allow
        while placed < cfg.actors.min and all(res.get(k, 0) >= v for k, v in need.items()):
            for k, v in need.items():
                res[k] -= v
            placed += 1
    want = ", ".join(f"{k}={v:g}" for k, v in need.items())
    if placed < cfg.actors.min:
        return (
            f"the cluster can hold {placed} of actors.min={cfg.actors.min} captioner actors ({want} each); "
            "the job waits until nodes join (lower --actors, cpus_per_actor, gpus_per_actor or actor_resources)"
        )
    if not any(res.get("CPU", 0) >= cfg.cpus_per_decode_task for res in left):
        return (
            f"no node has CPU={cfg.cpus_per_decode_task:g} left for a decode task next to {placed} captioner "
            "actors; the job makes no progress until one joins (lower cpus_per_actor or cpus_per_decode_task)"
        )
    return None


def build_dataset(cfg: CaptionJobConfig, inputs: cio.Inputs, done, captioner=None, native_video: bool = False,
                  online: dict | None = None):  # fmt: skip
    """The lazy Ray Dataset of output rows (not executed). ``done``: ids to skip (a pyarrow string array);
    ``captioner``: the actor class (default `actors.captioner.Captioner`; tests pass a stand-in);
    ``native_video``: the target takes videos (`cio.decode_rows`: frames, not one tiled image); ``online``:
    the actors' online-distillation argument (`OnlineDistill.actor_kwargs`)."""
    import ray
    import ray.data

    if captioner is None:
        from actors.captioner import Captioner as captioner

    done_set = set(done.to_pylist())
    parts = []
    files = [r for r in inputs.files if r["id"] not in done_set]
    if files:
        step = -(-len(files) // MAX_INPUT_BLOCKS)  # small jobs get one row per block, so decode streams
        parts.append(ray.data.from_arrow([cio.listed_table(files[i : i + step]) for i in range(0, len(files), step)]))
    if inputs.shards:
        ds = ray.data.from_arrow([cio.listed_table([s]) for s in inputs.shards])
        ds = ds.map_batches(cio.expand_shards, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"max_bytes": cfg.decode.limits.max_bytes})  # fmt: skip
        parts.append(ds.map_batches(cio.drop_done, batch_format="pyarrow", fn_kwargs={"done": done}))
    if inputs.manifest:
        fs, path = storage.filesystem(inputs.manifest)
        if path.lower().endswith(".parquet"):
            missing = {"id", "uri"} - set(storage.manifest_columns(inputs.manifest))
            if missing:
                raise ValueError(f"manifest {inputs.manifest} lacks column(s) {', '.join(sorted(missing))}; "
                                 f"it needs id, uri and optionally prompt")  # fmt: skip
            ds = ray.data.read_parquet(path, filesystem=fs)
            base = storage.manifest_base(inputs.manifest)
            ds = ds.map_batches(cio.normalize_manifest, batch_format="pyarrow", fn_kwargs={"base": base})
        else:  # JSON lines, parsed line by line so that one bad line is one error row
            if fs.get_file_info(path).type != cio.pafs.FileType.File:
                raise FileNotFoundError(f"manifest {inputs.manifest} does not exist")
            ds = ray.data.from_arrow(cio.listed_table([{"id": "manifest", "uri": inputs.manifest}]))
            ds = ds.map_batches(cio.expand_manifest, batch_size=1, batch_format="pyarrow")
        parts.append(ds.map_batches(cio.drop_done, batch_format="pyarrow", fn_kwargs={"done": done}))
    if not parts:
        return None
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(
        cio.decode_rows, batch_size=cfg.decode_batch_size, batch_format="pyarrow", num_cpus=cfg.cpus_per_decode_task,
        fn_kwargs={"opts": cfg.decode, "native_video": native_video},
    )  # fmt: skip
    # Blocks of exactly batch_size rows: an actor call gets a bundle of whole blocks and cuts it into batches,
    # so blocks of other sizes (shards, filtered manifests, decode remainders) would leave short batches, i.e.
    # extra model calls (5-row blocks and batches of 8 would make 30 calls per 200 rows, not 25)
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size, strict=True)
    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    if warning := resource_warning(cfg, gpus, ray.nodes()):
        print(f"[caption] WARNING: {warning}", file=sys.stderr, flush=True)
    remote_args = {"max_restarts": cfg.max_actor_restarts, "max_task_retries": cfg.max_task_retries}
    if cfg.actor_resources:
        remote_args["resources"] = dict(cfg.actor_resources)
    with warnings.catch_warnings():  # Ray 2.60 names neither max_restarts nor max_task_retries; the kwargs still work
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            captioner,
            fn_constructor_kwargs={"model": cfg.model, "engine": cfg.engine, "sampling": cfg.sampling,
                                   "batching": cfg.batching, "max_rows": cfg.engine_rows(),
                                   **({"online": online} if online is not None else {})},
            # calls_per_actor() calls at once, each in its own thread of the actor (without true multi-threading
            # Ray Data runs the calls themselves one at a time); the Captioner's loop thread owns the engine
            compute=ray.data.ActorPoolStrategy(min_size=cfg.actors.min, max_size=cfg.actors.max,
                                               max_concurrent_calls_per_actor=cfg.calls_per_actor(),
                                               enable_true_multi_threading=cfg.calls_per_actor() > 1),
            batch_size=cfg.batch_size, batch_format="pyarrow", num_gpus=gpus, num_cpus=cfg.cpus_per_actor,
            **remote_args,
        )  # fmt: skip


# ----------------------------------------------------------------------------- run
def summarize(cfg: CaptionJobConfig, run_id: str, wall_s: float, existing: int, partial: list[str], removed: int,
              ignored: dict[str, int] | None = None):  # fmt: skip
    """The run's summary from the rows it wrote (and the output's total); ``ignored``: input entries that are
    no input, by reason (`caption_io.IGNORE_REASONS`)."""
    rows = cio.read_output(cfg.output, prefix=run_id).to_pylist()
    ok = [r for r in rows if r["error"] is None]
    errors = Counter(r["error"].split(":", 1)[0] for r in rows if r["error"] is not None)
    tokens = sum(r["num_tokens"] or 0 for r in ok)
    first = rows[0] if rows else {}
    return {
        "run_id": run_id,
        "output": cfg.output,
        "mode": cfg.engine.mode,
        "model": first.get("model"),
        "draft_version": first.get("draft_version"),
        "rows": len(rows),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "existing_ids": existing,  # ids already in the output before this run (not redone)
        "ignored": dict(sorted((ignored or {}).items())),  # input entries that are no input, by reason
        "total_rows": cio.read_output(cfg.output, columns=["id"]).num_rows,
        "partial_files_moved": partial,
        "duplicates_removed": removed,
        "wall_s": round(wall_s, 3),
        "images_per_s": round(len(rows) / wall_s, 3) if wall_s > 0 else None,
        "tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else None,
        "tokens": tokens,
        "mean_accept_length": round(sum(r["accept_length"] for r in ok) / len(ok), 4) if ok else None,
        "mean_latency_ms": round(sum(r["latency_ms"] for r in ok) / len(ok), 3) if ok else None,
        "compressors": dict(Counter(r["compressor"] for r in ok)),
    }


def run(cfg: CaptionJobConfig) -> dict:
    """Caption ``cfg.input`` into ``cfg.output`` on the connected Ray cluster; returns the summary."""
    from ray.data.datasource import FilenameProvider

    if not cfg.input or not cfg.output:
        raise ValueError("both input and output are needed (--input / --output, or input:/output: in the config)")
    folders = resolve_model(cfg.model, cfg.engine.mode)  # a model the actors could not load fails here, on the driver
    native_video = target_family(folders.target) in VIDEO_FAMILIES  # (and so does an unsupported family)
    t0 = time.perf_counter()
    inputs = cio.list_inputs(cfg.input, skip=cfg.output)
    state = cio.scan_output(cfg.output)
    extra = ", manifest" if inputs.manifest else ""
    if inputs.ignored:
        extra += "; ignored: " + ", ".join(f"{n} {k}" for k, n in sorted(inputs.ignored.items()))
    print(f"[caption] input {cfg.input}: {len(inputs.files)} media files, {len(inputs.shards)} tar shards{extra}; "
          f"output {cfg.output}: {len(state.done)} ids already written", flush=True)  # fmt: skip
    for reason, paths in sorted(inputs.examples.items()):
        print(f"[caption] ignored ({reason}: {cio.IGNORE_REASONS[reason]}): {', '.join(paths)}"
              + (" ..." if inputs.ignored[reason] > len(paths) else ""), flush=True)  # fmt: skip
    for p in state.partial:
        print(f"[caption] moved aside an unreadable (partially written) part file: {p}", flush=True)
    run_id = time.strftime("run-%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    online = None
    if cfg.online_distill.enabled:
        online = OnlineDistill.start(cfg, run_id, folders.draft_name)
    try:
        ds = build_dataset(cfg, inputs, state.done, native_video=native_video,
                           online=online.actor_kwargs() if online is not None else None)  # fmt: skip
        if ds is not None:
            fs, path = storage.filesystem(cfg.output)
            ds.write_parquet(path, filesystem=fs, filename_provider=FilenameProvider(run_id, "parquet"),
                             min_rows_per_file=cfg.rows_per_file)  # fmt: skip
    except BaseException:
        if online is not None:  # the trainer belongs to this job: it does not outlive a failed one
            online.abort()
        raise
    removed = cio.dedupe_output(cfg.output)
    wall = time.perf_counter() - t0
    summary = summarize(cfg, run_id, wall, len(state.done), state.partial, removed, inputs.ignored)
    if online is not None:
        cols = ["draft_version", "accept_length", "error"]
        summary["online_distill"] = online.finish(cio.read_output(cfg.output, cols, prefix=run_id).to_pylist())
    where = cio.write_text(cfg.output, "_summary.json", json.dumps(summary, indent=2) + "\n")
    print_summary(summary, where, cio.read_output(cfg.output, ["id", "caption", "error"], prefix=run_id).slice(0, 5))
    return summary


def print_summary(s: dict, where: str, samples=None) -> None:
    for r in samples.to_pylist() if samples is not None else []:
        print(f"[caption] {r['id']}: {r['caption'] if r['error'] is None else 'ERROR ' + r['error']}", flush=True)
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"
    ignored = ", ".join(f"{k} {v}" for k, v in s["ignored"].items()) or "none"
    acc = f"{s['mean_accept_length']:.2f}" if s["mean_accept_length"] is not None else "-"
    print(
        f"[caption] {s['rows']} rows ({s['ok']} captioned, errors: {errors}); {s['existing_ids']} ids were already "
        f"written (skipped); {s['total_rows']} rows in the output; input entries ignored: {ignored}\n"
        f"[caption] {s['images_per_s']} images/s, {s['tokens_per_s']} tokens/s, mean accept length {acc}, "
        f"compressors {s['compressors'] or '-'} ({s['mode']}, {s['wall_s']:.1f} s)\n"
        f"[caption] parquet: {s['output']}  summary: {where}",
        flush=True,
    )


# ----------------------------------------------------------------------------- CLI
def _actors(text: str) -> dict:
    lo, _, hi = text.partition(":")
    try:
        return {"min": int(lo), "max": int(hi or lo)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--actors takes MIN:MAX or N, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specvlm caption", description="batch captioning with Ray Data")
    add_address_flag(ap)
    ap.add_argument("--fail-on-errors", action="store_true",
                    help="exit 3 when any row has an error (default: exit 0 once the job completes; error rows "
                    "are results, in the output's error column)")  # fmt: skip
    ap.add_argument("--input", help="folder, s3:// prefix, .tar shard, .parquet/.jsonl manifest, or one file")
    ap.add_argument("--output", help="output folder or s3:// prefix")
    ap.add_argument(
        "--config", type=Path, help="job YAML (default: the built-in defaults, the demo job; --print-config shows them)"
    )
    ap.add_argument("--prompt", help="prompt for rows without their own (default: per image/video)")
    ap.add_argument("--max-new-tokens", type=int, help="sampling.max_new_tokens")
    ap.add_argument("--actors", type=_actors, help="actor pool MIN:MAX (or N)")
    ap.add_argument("--batch-size", type=int, help="rows per actor call")
    ap.add_argument("--batching", choices=("continuous", "static"), help="batching (the actors' engine loops)")
    ap.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (fractions share a GPU)")
    ap.add_argument("--mode", choices=("ar", "eagle", "specvlm"), help="engine.mode")
    ap.add_argument("--draft", help="model.draft: the draft to decode with (an EagleDraft folder or s3:// prefix, "
                    "e.g. from specvlm distill)")  # fmt: skip
    ap.add_argument("--online-distill", action="store_true",
                    help="online_distill.enabled: distil the draft from this job's rows while it runs and swap "
                    "promoted versions into the actors (versions under <output>/_drafts)")  # fmt: skip
    ap.add_argument("--print-config", action="store_true",
                    help="print the job config (every default, with --config and the flags above applied) as YAML "
                    "and exit")  # fmt: skip
    return ap


def parse_args(argv: list[str] | None = None) -> CaptionJobConfig:
    """CLI flags over the config file (or the demo defaults); raises `ConfigError` naming the bad field."""
    return _config(_parser().parse_args(argv))


def _config(args: argparse.Namespace) -> CaptionJobConfig:
    cfg = load_config(args.config, CaptionJobConfig) if args.config else CaptionJobConfig()
    data = cfg.model_dump()
    flat = {"input": args.input, "output": args.output, "actors": args.actors, "batch_size": args.batch_size,
            "gpus_per_actor": args.gpus_per_actor, "batching": args.batching}  # fmt: skip
    data.update({k: v for k, v in flat.items() if v is not None})
    if args.prompt is not None:
        data["decode"]["prompt"] = args.prompt
    if args.max_new_tokens is not None:
        data["sampling"]["max_new_tokens"] = args.max_new_tokens
    if args.mode is not None:
        data["engine"]["mode"] = args.mode
    if args.draft is not None:
        data["model"]["draft"] = args.draft
    if args.online_distill:
        data["online_distill"]["enabled"] = True
    return parse_config(data, CaptionJobConfig, source="command line")


def main(argv: list[str] | None = None) -> int:
    """``specvlm caption``: parse args, join ``--address`` / ``RAY_ADDRESS`` (or start a private local Ray), run
    the job. Returns the exit status: 0 once the job completed (error rows are results), 3 with
    ``--fail-on-errors`` when a row failed; a job that cannot run exits with a message (status 1)."""
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args)
    except ConfigError as e:
        sys.exit(str(e))
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    if not cfg.input or not cfg.output:
        sys.exit("specvlm caption: --input and --output are required (or input:/output: in the config)")
    # the job's tasks and actors get the driver's S3 / model-cache environment
    started = init_ray(args.address, runtime_env={"env_vars": e} if (e := storage.job_env()) else None,
                       dashboard=cfg.online_distill.enabled)  # fmt: skip
    try:
        summary = run(cfg)
    except FileNotFoundError as e:
        sys.exit(f"specvlm caption: {e}")
    finally:
        if started:
            import ray

            ray.shutdown()
    failed = summary["rows"] - summary["ok"]
    if args.fail_on_errors and failed:
        print(f"[caption] --fail-on-errors: {failed} rows have errors; exit status 3", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Caption-pipeline benchmark: Ray Data batch captioning vs the engine called directly, on the same inputs.

Run with ``specvlm bench caption`` / ``python -m benchmarks.caption``; writes ``results/caption.md``.

Inputs: held-out ShapesWorld images (PNG) and videos (mp4, 4 frames tiled) written to a temp folder.
Model: the demo model (shipped with the package), greedy, the demo job's tree and batch size.

* direct: one process, one thread: `pipelines.caption_io.decode_rows` then `actors.captioner.Captioner`
  batch by batch (the same code the pipeline runs), model load excluded.
* pipeline: `pipelines.caption.run` on a local Ray (``num_cpus=2``), end to end (listing, actor start and
  model load, decoding in CPU tasks, parquet write, summary), and at steady state: the marginal rate
  ``(N - n0) / (T(N) - T(n0))`` from a second run on the first ``n0`` inputs, which cancels the fixed
  per-job cost (Ray Data planning, actor start, model load). Pipeline overhead = 1 - steady rate / direct rate.
* 1 vs 2 actors, and ``ar`` vs ``eagle`` vs ``specvlm`` through the pipeline.

``--actor-sweep`` instead compares the Captioner's batching, called directly on
inputs decoded beforehand (writes ``results/caption-actor.md``): ``static`` fed
by one caller thread (each call's batch decodes to its end), against
``continuous`` fed by two caller threads (what Ray Data does with
``max_concurrent_calls_per_actor=2``: the next batch's rows join the engine as
the previous batch's finish) with ``max_rows`` = batch and 2 x batch, at
batch 8 and 16. Every variant's outputs must equal static's (ids, captions,
token counts): ``diff_rows`` counts the rows that do not.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.report import add_output_args, to_markdown, write_results

COLS = ["method", "actors", "rows", "wall_s", "images_per_s", "tokens_per_s", "steady_images_per_s",
        "steady_tokens_per_s", "overhead", "accept_length"]  # fmt: skip
ACTOR_COLS = ["batching", "batch", "max_rows", "callers", "rows", "wall_s", "images_per_s", "images_per_s_range",
              "tokens_per_s", "speedup", "rows_per_step", "accept_length", "diff_rows"]  # fmt: skip


def write_inputs(folder: Path, n: int, p_video: float = 0.2, seed: int = 31337) -> list[Path]:
    """``n`` ShapesWorld inputs (captions and videos) as files, in listing order."""
    import av
    import numpy as np

    from specvlm.demo import ShapesWorld

    world = ShapesWorld(seed)
    paths = []
    for i in range(n):
        s = world.sample(p_video=p_video, p_qa=0.0)
        if "frames" in s:
            path = folder / f"{i:04d}.mp4"
            buf = io.BytesIO()
            with av.open(buf, "w", format="mp4") as out:
                stream = out.add_stream("libx264", rate=8)
                stream.width, stream.height = s["frames"][0].size
                stream.pix_fmt = "yuv420p"
                for f in s["frames"]:
                    out.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")))
                out.mux(stream.encode())
            path.write_bytes(buf.getvalue())
        else:
            path = folder / f"{i:04d}.png"
            s["image"].save(path)
        paths.append(path)
    return paths


def direct(cfg, paths: list[Path]) -> dict:
    """The engine in this process on the same inputs, with the pipeline's own decode and Captioner code."""
    import torch

    from actors.captioner import Captioner
    from pipelines import caption_io as cio

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cap = Captioner(cfg.model, cfg.engine, cfg.sampling, batching="static", max_rows=cfg.batch_size)  # one caller
    load_s = time.perf_counter() - t0
    rows = [{"id": p.name, "uri": str(p)} for p in paths]
    cap(cio.decode_rows(cio.listed_table(rows[: cfg.batch_size]), cfg.decode))  # warm-up
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(rows), cfg.batch_size):
        batch = cio.decode_rows(cio.listed_table(rows[i : i + cfg.batch_size]), cfg.decode)
        outs.extend(cap(batch).to_pylist())
    sec = time.perf_counter() - t0
    ok = [r for r in outs if r["error"] is None]
    tokens = sum(r["num_tokens"] for r in ok)
    return {"method": f"direct {cfg.engine.mode}", "actors": "-", "rows": len(outs), "wall_s": sec,
            "images_per_s": len(outs) / sec, "tokens_per_s": tokens / sec, "steady_images_per_s": len(outs) / sec,
            "steady_tokens_per_s": tokens / sec, "load_s": load_s,
            "accept_length": sum(r["accept_length"] for r in ok) / len(ok)}  # fmt: skip


def actor(cfg, batches: list, batching: str, max_rows: int, callers: int) -> tuple[dict, dict]:
    """One Captioner fed ``batches`` (decoded tables) by ``callers`` threads, each taking the next batch as soon
    as its call returns; returns the row of the table and each output row's (caption, num_tokens) by id."""
    import torch

    from actors.captioner import Captioner

    torch.set_num_threads(1)
    cap = Captioner(cfg.model, cfg.engine, cfg.sampling, batching=batching, max_rows=max_rows)
    cap(batches[0])  # warm-up
    per_step: list[int] = []
    cap.loop.on_round = per_step.append
    todo, outs, lock = iter(batches), [], threading.Lock()

    def caller():
        while True:
            with lock:
                batch = next(todo, None)
            if batch is None:
                return
            out = cap(batch).to_pylist()
            with lock:
                outs.extend(out)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sec = time.perf_counter() - t0
    cap.loop.stop()
    ok = [r for r in outs if r["error"] is None]
    tokens = sum(r["num_tokens"] for r in ok)
    row = {"batching": batching, "batch": cfg.batch_size, "max_rows": max_rows, "callers": callers,
           "rows": len(outs), "wall_s": sec, "images_per_s": len(outs) / sec, "tokens_per_s": tokens / sec,
           "rows_per_step": sum(per_step) / max(len(per_step), 1),
           "accept_length": sum(r["accept_length"] for r in ok) / len(ok)}  # fmt: skip
    return row, {r["id"]: (r["caption"], r["num_tokens"], r["error"]) for r in outs}


def actor_sweep(base, paths: list[Path], batch_sizes: tuple[int, ...] = (8, 16), rounds: int = 3) -> list[dict]:
    """Static (one caller) vs continuous (two callers, max_rows = batch and 2 x batch) at each batch size, on
    the same inputs decoded once beforehand: ``rounds`` interleaved rounds (the first variant rotating), each
    row the median run of its variant with the range of images/s."""
    import statistics

    from pipelines import caption_io as cio

    listed = [{"id": p.name, "uri": str(p)} for p in paths]
    rows = []
    for b in batch_sizes:
        cfg = base.model_copy(update={"batch_size": b})
        batches = [cio.decode_rows(cio.listed_table(listed[i : i + b]), cfg.decode) for i in range(0, len(listed), b)]
        variants = [("static", b, 1), ("continuous", b, 2), ("continuous", 2 * b, 2)]
        runs: dict[tuple, list[tuple[dict, dict]]] = {v: [] for v in variants}
        for r in range(rounds):
            for v in variants[r % 3 :] + variants[: r % 3]:
                runs[v].append(actor(cfg, batches, *v))
        ref_out = runs[variants[0]][0][1]
        medians = {}
        for v in variants:
            rates = [row["images_per_s"] for row, _ in runs[v]]
            row = dict(sorted((row for row, _ in runs[v]), key=lambda x: x["images_per_s"])[len(rates) // 2])
            row["images_per_s_range"] = f"{min(rates):.1f}-{max(rates):.1f}"
            row["diff_rows"] = max(sum(out.get(k) != x for k, x in ref_out.items()) + len(out.keys() - ref_out.keys())
                                   for _, out in runs[v])  # fmt: skip
            medians[v] = statistics.median(rates)
            row["speedup"] = medians[v] / medians[variants[0]]
            rows.append(row)
            print(to_markdown(rows[-1:], ACTOR_COLS).splitlines()[-1], flush=True)
    return rows


def pipeline(cfg, src: Path, small: Path, work: Path) -> dict:
    """End-to-end and steady-state rates of the Ray Data job (same output folder never reused)."""
    from pipelines.caption import run

    name = f"{cfg.engine.mode}-{cfg.actors.max}"
    full = run(cfg.model_copy(update={"input": str(src), "output": str(work / f"{name}-full")}))
    base = run(cfg.model_copy(update={"input": str(small), "output": str(work / f"{name}-small")}))
    d_rows, d_sec = full["rows"] - base["rows"], full["wall_s"] - base["wall_s"]
    d_tokens = full["tokens"] - base["tokens"]
    return {"method": f"pipeline {cfg.engine.mode}", "actors": cfg.actors.max, "rows": full["rows"],
            "wall_s": full["wall_s"], "images_per_s": full["images_per_s"], "tokens_per_s": full["tokens_per_s"],
            "steady_images_per_s": d_rows / d_sec if d_sec > 0 else float("nan"),
            "steady_tokens_per_s": d_tokens / d_sec if d_sec > 0 else float("nan"),
            "fixed_s": base["wall_s"], "accept_length": full["mean_accept_length"]}  # fmt: skip


def variant(base, mode: str, actors: int):
    """``base`` with another engine mode and actor pool (validated again)."""
    from pipelines.caption import CaptionJobConfig
    from specvlm.config import parse_config

    data = base.model_dump()
    data["engine"]["mode"], data["actors"] = mode, {"min": 1, "max": actors}
    return parse_config(data, CaptionJobConfig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="specvlm bench caption", description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=256, help="inputs (20%% videos)")
    ap.add_argument("--small", type=int, default=32, help="inputs of the run that measures the fixed per-job cost")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="--actor-sweep: interleaved rounds (medians, ranges)")
    add_output_args(ap, "caption.md / caption-actor.md (and .json)")
    ap.add_argument("--actor-sweep", action="store_true",
                    help="only the Captioner's batching, called directly: static vs continuous at batch 8 and 16 "
                    "(results/caption-actor.md)")  # fmt: skip
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    from pipelines.caption import CaptionJobConfig
    from specvlm import storage
    from specvlm.config import parse_config

    base = parse_config({"sampling": {"max_new_tokens": args.max_new_tokens}, "batch_size": args.batch_size},
                        CaptionJobConfig)  # fmt: skip
    load_before = os.getloadavg()[0]
    if args.actor_sweep:
        return main_actor_sweep(args, base, load_before)
    with tempfile.TemporaryDirectory(prefix="specvlm-bench-caption-") as tmp:
        work = Path(tmp)
        src, small = work / "inputs", work / "inputs-small"
        src.mkdir()
        small.mkdir()
        paths = write_inputs(src, args.num)
        for p in paths[: args.small]:
            (small / p.name).write_bytes(p.read_bytes())
        rows = []
        for mode in ("ar", "eagle", "specvlm"):
            rows.append(direct(variant(base, mode, 1), paths))
            print(to_markdown(rows[-1:], COLS).splitlines()[-1], flush=True)
        env = {"env_vars": e} if (e := storage.job_env()) else None
        ray.init(num_cpus=2, include_dashboard=False, runtime_env=env, _node_ip_address="127.0.0.1")
        ray.data.DataContext.get_current().enable_progress_bars = False
        for mode, actors in (("eagle", 1), ("eagle", 2), ("ar", 1), ("specvlm", 1)):
            rows.append(pipeline(variant(base, mode, actors), src, small, work))
            print(to_markdown(rows[-1:], COLS).splitlines()[-1], flush=True)
        ray.shutdown()
    by_mode = {r["method"].split()[1]: r for r in rows if r["method"].startswith("direct")}
    for r in rows:
        ref = by_mode[r["method"].split()[1]]
        r["overhead"] = 1 - r["steady_images_per_s"] / ref["images_per_s"] if r["actors"] == 1 else ""
    header = (
        f"## Caption pipeline vs the engine called directly: demo model, {args.num} inputs (~20% videos), greedy, "
        f"max {args.max_new_tokens} new tokens, batch {args.batch_size}, CPU (1 thread per actor, 2 cores)"
    )
    notes = (
        "\n\nwall_s / images_per_s / tokens_per_s: end to end (pipeline: whole job incl. actor start and model "
        f"load). steady_*: the marginal rate between the {args.num}-input run and a {args.small}-input run "
        "(fixed per-job cost cancelled). overhead = 1 - steady images/s of the 1-actor pipeline / direct images/s "
        "(target <= 15%). "
    )
    _report(args, "caption", header, rows, COLS, notes, load_before)


def _report(args, name: str, header: str, rows: list[dict], cols: list[str], notes: str, load_before: float):
    """Print and write ``results/<name>``: header, table, notes and the machine's load around the run."""
    load = (f"1-minute load average of the machine: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
            f"({os.cpu_count()} cores; other users' work shows up here).\n")  # fmt: skip
    report = header + "\n\n" + to_markdown(rows, cols) + notes + load
    print(report)
    write_results(args.out, name, report, rows, args.label)


def main_actor_sweep(args, base, load_before: float) -> None:
    with tempfile.TemporaryDirectory(prefix="specvlm-bench-caption-") as tmp:
        rows = actor_sweep(base, write_inputs(Path(tmp), args.num), rounds=args.repeats)
    header = (
        f"## Captioner batching, called directly: demo model ({base.engine.mode}, CPU tree), {args.num} inputs "
        f"(~20% videos), greedy, max {args.max_new_tokens} new tokens, CPU (1 torch thread); the median of "
        f"{args.repeats} interleaved rounds (range)"
    )
    notes = (
        "\n\nstatic: one caller thread, each call's batch decoded to its end (the engine loop in static mode). "
        "continuous: two caller threads, as Ray Data runs two calls at once per actor; the engine loop admits "
        "rows at every round while fewer than max_rows decode. Inputs are decoded before the clock starts; a "
        "warm-up call per variant is excluded. rows_per_step: mean rows per engine step (decoded or prefilled). "
        "speedup: median images/s over static's at the same batch. diff_rows: rows whose caption, token count or error "
        "differ from static's (must be 0: greedy rows do not depend on their neighbours). "
    )
    _report(args, "caption-actor", header, rows, ACTOR_COLS, notes, load_before)
    if any(r["diff_rows"] for r in rows):
        raise SystemExit("continuous batching changed some outputs (diff_rows > 0)")


if __name__ == "__main__":
    main()

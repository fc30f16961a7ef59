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
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

from benchmarks.report import RESULTS, to_markdown, write_results

COLS = ["method", "actors", "rows", "wall_s", "images_per_s", "tokens_per_s", "steady_images_per_s",
        "steady_tokens_per_s", "overhead", "accept_length"]  # fmt: skip


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
    cap = Captioner(cfg.model, cfg.engine, cfg.sampling)
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
    ap.add_argument("--out", type=Path, default=RESULTS)
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
        f"1-minute load average of the machine: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"({os.cpu_count()} cores; other users' work shows up here).\n"
    )
    report = header + "\n\n" + to_markdown(rows, COLS) + notes
    print(report)
    write_results(args.out, "caption", report, rows)


if __name__ == "__main__":
    main()

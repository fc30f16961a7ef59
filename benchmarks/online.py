"""Online distillation benchmark: a caption job that starts from a weak draft and trains it on its own rows,
against the same job with the weak draft and no training, side by side in one Ray session.

Run with ``specvlm bench online`` / ``python -m benchmarks.online``; writes ``results/online.md`` (+ .json)
and ``docs/online_accept.png``.

* Weak draft: the demo recipe's draft distilled for ``--weak-steps`` (25) steps by ``specvlm distill`` (built
  once into ``--work``; or ``--weak-draft DIR``).
* Inputs: ``--num`` unseen ShapesWorld inputs (~20% videos, another seed than training), written once.
* Runs, each a whole `pipelines.caption.run` on one local Ray (``num_cpus=2``): ``weak`` (no training; the
  first also pays the session's first-job warm-up) and ``online`` (``--online-distill``; the trainer reserves
  no CPU and shares the two cores with the actor and the decode tasks, 1 CPU each), interleaved ``--repeats``
  times (medians and ranges reported), then ``ar`` (the reference outputs, on the first ``--ar-num`` inputs).
* Reported: accept length of the rows each draft version decoded (first = the weak draft, last = the last
  promoted version), promoted versions, images/s over the first and the last ``--window`` rows (from the
  times part files appear: ``rows_per_file`` rows each), wall time of each run, and rows whose caption differs
  from ``ar``'s (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from benchmarks.caption import write_inputs
from benchmarks.report import add_output_args, to_markdown, write_results
from pipelines.online_distill import OnlineDistillConfig

ROOT = Path(__file__).resolve().parent.parent
COLS = ["run", "rows", "wall_s", "images_per_s", "first_window_images_per_s", "last_window_images_per_s",
        "accept_length", "first_version_accept", "last_version_accept", "versions_promoted", "trainer_steps",
        "compared_with_ar", "diff_vs_ar"]  # fmt: skip


def weak_draft(work: Path, steps: int) -> Path:
    """The demo draft distilled for ``steps`` steps (built once under ``work``)."""
    from pipelines.distill import DistillJobConfig, run

    out = work / f"weak-{steps}"
    if not (out / "draft" / "config.json").is_file():
        run(DistillJobConfig(max_steps=steps, workers=1, eval_every=0, output=str(out), name=f"weak-{steps}"))
    return out / "draft"


class PartWatcher:
    """Polls an output folder while a job runs: ``(seconds since start, part file)`` as each part appears."""

    def __init__(self, folder: Path):
        self.folder, self.seen, self.t0 = folder, {}, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            for p in self.folder.glob("*.parquet") if self.folder.is_dir() else []:
                self.seen.setdefault(p.name, time.monotonic() - self.t0)

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join()
        return sorted((t, name) for name, t in self.seen.items())


def job(cfg, name: str, work: Path) -> tuple[dict, list[dict]]:
    """Run one caption job; returns its summary and its rows in the order their part files appeared (each
    with ``t``, the second its part file did)."""
    import pyarrow.parquet as pq

    from pipelines.caption import run

    out = work / name
    watcher = PartWatcher(out)
    summary = run(cfg.model_copy(update={"output": str(out)}))
    rows = []
    for t, part in watcher.stop():
        rows += [{**r, "t": t} for r in pq.read_table(out / part).to_pylist()]
    seen = {r["id"] for r in rows}  # parts the watcher missed (written in its last 0.25 s): at the end
    rows += [{**r, "t": summary["wall_s"]} for r in pq.read_table(out).to_pylist() if r["id"] not in seen]
    return summary, rows


def window_rate(rows: list[dict], first: bool, window: int) -> float:
    """images/s over the first (or last) ``window`` rows, from the seconds their part files appeared."""
    ts = sorted(r["t"] for r in rows)
    if len(ts) < 2 * window:
        window = len(ts) // 2
    if first:
        return window / ts[window - 1] if ts[window - 1] > 0 else float("nan")
    span = ts[-1] - ts[-window - 1]
    return window / span if span > 0 else float("nan")


CEILING_COLS = ["method", "draft", "images_per_s", "images_per_s_range", "speedup", "accept_length"]


def ceiling(base: dict, paths: list[Path], drafts: dict[str, Path | None], rounds: int) -> list[dict]:
    """The most a better draft can give this job on this machine: the `Captioner` called directly (one process,
    one thread, no Ray, no trainer; `benchmarks.caption.direct`) at the job's batch on ``paths``, for ``ar``
    (draft None) and each draft, in ``rounds`` interleaved rounds. speedup: median images/s over the first
    draft's (the starting draft)."""
    from benchmarks.caption import direct
    from pipelines.caption import CaptionJobConfig
    from specvlm.config import parse_config

    rates: dict[str, list[float]] = {name: [] for name in drafts}
    accept = {}
    for _ in range(rounds):
        for name, draft in drafts.items():
            model = {**base["model"], "draft": str(draft)} if draft else {"target": base["model"]["target"]}
            engine = {} if draft else {"engine": {"mode": "ar"}}
            cfg = parse_config({**base, "model": model, **engine}, CaptionJobConfig)
            row = direct(cfg, paths)
            rates[name].append(row["images_per_s"])
            accept[name] = row["accept_length"]
    first = statistics.median(rates[next(n for n, d in drafts.items() if d)])
    return [{"method": "ar" if draft is None else "eagle", "draft": name,
             "images_per_s": statistics.median(rates[name]),
             "images_per_s_range": f"{min(rates[name]):.1f}-{max(rates[name]):.1f}",
             "speedup": statistics.median(rates[name]) / first, "accept_length": accept[name]}
            for name, draft in drafts.items()]  # fmt: skip


def bench_setup(args) -> tuple[Path, Path, dict]:
    """The benchmark's inputs folder (written once), its starting draft (built once) and the caption job's
    settings every run shares."""
    src = args.work / f"inputs-{args.num}"
    if not src.is_dir():
        src.mkdir(parents=True)
        write_inputs(src, args.num, seed=2027)
    draft = args.weak_draft or weak_draft(args.work, args.weak_steps)
    base = {"input": str(src), "batch_size": args.batch_size, "rows_per_file": 50,
            "sampling": {"max_new_tokens": args.max_new_tokens},
            "model": {"target": "demo", "draft": str(draft)}}  # fmt: skip
    return src, draft, base


def plot(rows: list[dict], versions: list[dict], path: Path, smooth: int = 50) -> None:
    """Accept length of the online run's rows (moving mean over ``smooth`` rows) against rows processed,
    a vertical line where each promoted version starts decoding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r["accept_length"] or 0.0 for r in rows]
    mean = [sum(w) / len(w) for w in (acc[max(0, i - smooth + 1) : i + 1] for i in range(len(acc)))]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(1, len(acc) + 1), mean, label=f"accept length (mean of the last {smooth} rows)")
    first_row = {}
    for i, r in enumerate(rows):
        first_row.setdefault(r["draft_version"], i + 1)
    promoted = [v for v in versions if v["promoted"] and v["version"] in first_row]
    for v in promoted:
        x = first_row[v["version"]]
        ax.axvline(x, color="gray", lw=0.8, ls="--")
        ax.text(x, ax.get_ylim()[1], f" {v['version'][-2:]}", fontsize=7, va="top", color="gray")
    ax.set_xlabel("rows processed (in the order their part files were written)")
    ax.set_ylabel("accept length")
    ax.set_title("Online distillation on the demo (dashed: a newly promoted draft version)", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="specvlm bench online", description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=3000, help="inputs (~20%% videos)")
    ap.add_argument("--window", type=int, default=500, help="rows in the first/last throughput windows")
    ap.add_argument("--weak-steps", type=int, default=25)
    ap.add_argument("--weak-draft", type=Path, help="the starting draft (default: distilled --weak-steps steps)")
    ap.add_argument("--publish-every", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8, help="the job's batch_size (rows per actor call)")
    ap.add_argument("--repeats", type=int, default=3, help="weak and online runs, interleaved")
    ap.add_argument("--max-steps", type=int, help="online_distill.max_steps: the trainer stops after these steps")
    ap.add_argument("--patience", type=int, default=OnlineDistillConfig().patience,
                    help="online_distill.patience (0: train until the job ends)")  # fmt: skip
    ap.add_argument("--name", default="online", help="results/<name>.md and .json")
    ap.add_argument("--ar-num", type=int, help="inputs of the ar reference run (the first ones); default: all")
    ap.add_argument("--work", type=Path, default=Path("/tmp/specvlm-bench-online"), help="inputs, drafts, outputs")
    add_output_args(ap, "<name>.md / .json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "online_accept.png")
    ap.add_argument("--ceiling-num", type=int, default=256,
                    help="inputs of the ceiling measurement (see `ceiling`; 0: skip it)")  # fmt: skip
    ap.add_argument("--ceiling-only", type=Path, nargs="+", metavar="DRAFT",
                    help="measure only the ceiling: ar, --weak-draft and each DRAFT (e.g. a run's last promoted "
                         "version, the demo's own draft); "
                         "writes results/<name>-ceiling.md")  # fmt: skip
    args = ap.parse_args(argv)
    if args.ceiling_only:
        return main_ceiling(args)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import shutil

    import ray
    import ray.data

    from pipelines.caption import CaptionJobConfig
    from specvlm.config import parse_config

    load_before = os.getloadavg()[0]
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = args.work
    src, draft, base = bench_setup(args)
    for out in [work / "ar", *work.glob("weak-*"), *work.glob("online-*")]:  # every run writes a fresh output
        shutil.rmtree(out, ignore_errors=True)
    online = {"enabled": True, "publish_every": args.publish_every, "max_steps": args.max_steps,
              "patience": args.patience or None}  # fmt: skip
    runs = {}
    ar_src = src
    if args.ar_num and args.ar_num < args.num:
        ar_src = work / f"inputs-{args.num}-first-{args.ar_num}"
        if not ar_src.is_dir():
            ar_src.mkdir()
            for p in sorted(src.iterdir())[: args.ar_num]:
                (ar_src / p.name).write_bytes(p.read_bytes())
    ar = {"engine": {"mode": "ar"}, "input": str(ar_src)}
    plan = [(f"{name} #{k + 1}", extra) for k in range(args.repeats)
            for name, extra in (("weak", {}), ("online", {"online_distill": online}))]  # fmt: skip
    for name, extra in [*plan, ("ar", ar)]:  # weak and online interleaved, then the reference
        cfg = parse_config({**base, **extra}, CaptionJobConfig)
        runs[name] = job(cfg, name.replace(" #", "-"), work)
    ray.shutdown()
    last = f"online #{args.repeats}"
    online_summary = runs[last][0]["online_distill"]
    promoted = [v["version"] for v in online_summary["versions"] if v["promoted"]]
    ceiling_rows = []
    if args.ceiling_num and promoted:
        drafts = {"starting (weak)": draft, f"{promoted[-1]} ({last})": Path(online_summary["store"]) / promoted[-1],
                  "none": None}  # fmt: skip
        ceiling_rows = ceiling(base, sorted(src.iterdir())[: args.ceiling_num], drafts, args.repeats)

    ar_captions = {r["id"]: r["caption"] for r in runs["ar"][1]}
    table = []
    for name, (summary, rows) in runs.items():
        by_version: dict = {}
        for r in rows:
            by_version.setdefault(r["draft_version"], []).append(r["accept_length"] or 0.0)
        order = list(dict.fromkeys(r["draft_version"] for r in rows))  # versions in the order they decoded
        acc = {v: sum(a) / len(a) for v, a in by_version.items()}
        section = summary.get("online_distill") or {}
        table.append({
            "run": name, "rows": summary["rows"], "wall_s": summary["wall_s"], "images_per_s": summary["images_per_s"],
            "first_window_images_per_s": window_rate(rows, True, args.window),
            "last_window_images_per_s": window_rate(rows, False, args.window),
            "accept_length": summary["mean_accept_length"],
            "first_version_accept": acc[order[0]] if name != "ar" else "",
            "last_version_accept": acc[order[-1]] if name != "ar" else "",
            "versions_promoted": section.get("promoted", ""),
            "trainer_steps": section.get("steps", ""),
            "diff_vs_ar": sum(r["id"] in ar_captions and ar_captions[r["id"]] != r["caption"] for r in rows),
            "compared_with_ar": sum(r["id"] in ar_captions for r in rows),
            "versions": [{"version": v, "rows": len(by_version[v]), "accept_length": acc[v]} for v in order],
        })  # fmt: skip
    differ = any(r["diff_vs_ar"] for r in table)  # the runs' own rows, before the medians join them
    for kind in ("weak", "online"):  # medians of the interleaved runs, with their ranges
        mine = [r for r in table if r["run"].startswith(kind + " #")]
        med = {"run": f"{kind}: median (range) of {len(mine)}"}
        for col in COLS[1:]:
            vals = sorted(r[col] for r in mine if isinstance(r.get(col), (int, float)))
            if vals:
                m = statistics.median(vals)
                med[col] = f"{m:.2f} ({vals[0]:.2f}-{vals[-1]:.2f})" if isinstance(m, float) else m
        table.append(med)
    plot(runs[last][1], online_summary["versions"], args.plot)
    header = (
        f"## Online distillation: demo model, {args.num} unseen inputs (~20% videos), greedy, max "
        f"{args.max_new_tokens} new tokens, batch {args.batch_size}, 1 caption actor; starting draft distilled "
        f"{args.weak_steps} steps; trainer max_steps {args.max_steps}, patience {args.patience or None}; CPU (2 cores, "
        "float32)"
    )
    start_accept = online_summary["start_draft"]["held_out_accept_length"]  # None: the job ended before it was measured
    versions = "\n".join(f"- {v['version']}: step {v['step']}, held-out accept {v['held_out_accept_length']:.3f}, "
                         f"{'promoted' if v['promoted'] else 'not promoted'}, decoded {v['rows_decoded']} rows"
                         for v in online_summary["versions"])  # fmt: skip
    notes = (
        "\n\nonline: `--online-distill` (the trainer shares the cores at SCHED_IDLE priority, one torch thread; "
        "publishing every "
        f"{args.publish_every} steps of 8 rows); "
        "weak: the same job, no training; ar: the reference outputs. first/last_version_accept: mean accept "
        "length of the rows the first (the starting draft) and the last draft version decoded. *_window_images_per_s: "
        f"the first and last {args.window} rows, timed by when their part files ({base['rows_per_file']} rows) "
        f"appeared. compared_with_ar / diff_vs_ar: rows also captioned by the ar run, and those "
        "whose caption differs from ar's (must be 0).\n\nTraining (the last online run): "
        f"{online_summary['status']} ({online_summary['reason']}), {online_summary['steps']} steps; rows "
        f"{json.dumps(online_summary['rows'])}; "
        f"starting draft's held-out accept {start_accept if start_accept is None else round(start_accept, 3)}.\n\n"
        f"Versions of the last online run (plotted):\n\n{versions}\n\n"
    )
    load = (f"1-minute load average of the machine: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
            f"({os.cpu_count()} cores).\n")  # fmt: skip
    report = header + "\n\n" + to_markdown(table, COLS) + notes
    if ceiling_rows:
        report += ceiling_section(ceiling_rows, args.ceiling_num, args.batch_size, args.repeats)
    report += load
    print(report)
    write_results(args.out, args.name, report, table, args.label)
    if differ:
        raise SystemExit("some captions differ from ar's")


def ceiling_section(rows: list[dict], num: int, batch: int, rounds: int) -> str:
    """The ceiling table (`ceiling`) with what it measures, as a report section."""
    return (
        f"### The ceiling: the Captioner called directly, {num} of the inputs, batch {batch}, one thread, no trainer; "
        f"median of {rounds} interleaved rounds (range)\n\n{to_markdown(rows, CEILING_COLS)}\n\nspeedup: images/s "
        "over the starting draft's. A better draft can speed this job up by at most this much on this machine; "
        "the trainer's share of the cores has to be won back from it.\n\n"
    )


def main_ceiling(args) -> None:
    """``--ceiling-only``: ar, the starting draft and each of ``args.ceiling_only`` on the first ``--ceiling-num``
    inputs, written to ``results/<name>-ceiling.md``."""
    src, draft, base = bench_setup(args)
    drafts = {"starting (weak)": draft, **{str(d): d for d in args.ceiling_only}, "none": None}
    rows = ceiling(base, sorted(src.iterdir())[: args.ceiling_num], drafts, args.repeats)
    report = ceiling_section(rows, args.ceiling_num, args.batch_size, args.repeats)
    report += f"CPU: {os.cpu_count()} cores, float32.\n"
    print(report)
    write_results(args.out, f"{args.name}-ceiling", report, rows, args.label)


if __name__ == "__main__":
    main()

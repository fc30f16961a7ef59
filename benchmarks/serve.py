"""Serve benchmark: the OpenAI endpoint under load, `ar` vs `eagle` (vs `specvlm`), with and without batching.

Run with ``make bench`` / ``specvlm bench serve`` / ``python -m benchmarks.serve``.

A local Ray (loopback) serves the demo model (shipped with the package, or ``--model-dir`` holding
``target/`` and ``draft/``) with one replica; for every mode and batching setting (no batching:
``max_batch_size`` 1; then up to 16 rows in each ``--batching`` mode: ``continuous``, requests join the
running batch at the next round, and ``static``, each batch decodes to its end before the next one
starts) an async HTTP client sends held-out demo questions with their images as
``data:`` URLs at concurrency 1, 8 and 32 (greedy, ``max_tokens`` 32). Reports requests/s, p50/p99
latency, completion tokens/s, mean accept length, errors, and whether every answer is identical to
`ar` without batching (lossless under batching). Modes the engine cannot build yet are listed as skipped.

``--open-loop`` (`open_loop_main`, results in ``serve-open-loop.md``): static vs continuous batching under
open-loop Poisson arrivals, streamed. One engine ``--mode``; held-out questions whose ``max_tokens`` are drawn
from ``--max-tokens-choices`` (equal budgets would hide what continuous batching is for: rows ending at
different rounds). First
`ar` without batching answers every body (the reference); then the saturation rate: each batching mode's
closed-loop throughput at ``--saturation-concurrency`` (2x the batch), continuous batching's in requests/s
being the rate the loads scale. Then at 0.5x, 0.8x and 1.0x of it, ``--requests-per-point`` requests sent at
seeded exponential gaps (the same schedule and bodies for both modes), each mode deployed in turn so the
order alternates between load points (C S, S C, C S). Reports time to first token and end-to-end
p50/p99 (from each request's scheduled arrival), achieved requests/s and tokens/s, errors by status, and
whether every answer equals `ar`'s. ``--in-process`` runs the same points without Ray, Serve or HTTP
(`InProcessDriver`: the replica's `ChatRunner` and `EngineLoop` in this process, results in
``serve-open-loop-in-process.md``), which separates the engine loop's scheduling from the HTTP stack sharing
the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import queue
import random
import socket
import statistics
import threading
import time
from pathlib import Path

from benchmarks.report import add_output_args, to_markdown, write_results

COLS = ["mode", "batching", "concurrency", "requests", "requests_per_s", "p50_ms", "p99_ms", "tokens_per_s",
        "accept_length", "errors", "identical_to_ar"]  # fmt: skip
OPEN_COLS = ["run", "batching", "load", "offered_per_s", "requests", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms",
             "e2e_p99_ms", "requests_per_s", "tokens_per_s", "errors", "identical_to_ar",
             "send_lag_p99_ms"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_for(n: int, max_tokens: int | list[int]) -> list[dict]:
    """``n`` held-out demo questions (captions, QA, tiled videos) as chat request bodies; ``max_tokens`` one
    budget for all, or one per body."""
    from specvlm.demo.recipe import examples

    budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens] * n
    out = []
    for s, budget in zip(examples(seed=777, n=n, p_video=0.25, p_qa=0.35), budgets):
        buf = io.BytesIO()
        s["image"].save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": s["prompt"]}]
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": budget, "temperature": 0})
    return out


async def load(url: str, bodies: list[dict], n: int, concurrency: int) -> dict:
    """``n`` requests (cycling over ``bodies``) with at most ``concurrency`` in flight."""
    import httpx

    from benchmarks.open_loop import percentile

    gate = asyncio.Semaphore(concurrency)
    lat, answers, tokens, accept, errors = [], {}, 0, [], 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal tokens, errors
            async with gate:
                t0 = time.perf_counter()
                r = await client.post(url, json=bodies[i % len(bodies)])
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1
                    return
                body = r.json()
                answers[i % len(bodies)] = body["choices"][0]["message"]["content"]
                tokens += body["usage"]["completion_tokens"]
                accept.append(body["usage"]["accept_length"])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return dict(requests=n, requests_per_s=n / wall, p50_ms=1e3 * percentile(lat, 0.5),
                p99_ms=1e3 * percentile(lat, 0.99), tokens_per_s=tokens / wall,
                accept_length=statistics.mean(accept) if accept else float("nan"), errors=errors,
                answers=answers)  # fmt: skip


def available_modes(model_cfg, modes: list[str]) -> dict[str, str | None]:
    """mode -> None if the engine builds in it, else the reason it does not (checked in this process)."""
    from specvlm.config import EngineConfig
    from specvlm.loading import load_engine

    out = {}
    for mode in modes:
        try:
            load_engine(model_cfg, EngineConfig(mode=mode))
            out[mode] = None
        except ValueError as e:
            out[mode] = str(e)
    return out


def batch_trees_arg(text: str):
    """``--batch-trees``: "auto", or a JSON object of live rows -> a tree (preset name or fields) or "off",
    checked as `EngineConfig.batch_trees`."""
    from specvlm.config import EngineConfig

    value = text if text == "auto" else json.loads(text)
    return EngineConfig(batch_trees=value).model_dump()["batch_trees"]


def engine_args(mode: str, batch_trees=None) -> dict:
    """The benchmark's `EngineConfig` args: the Serve default's (the CPU tree of configs/serve.yaml) in ``mode``,
    with ``batch_trees`` when given (`ar` has no trees to choose)."""
    from actors.serve_config import ServeAppConfig

    engine = {**ServeAppConfig().engine.model_dump(), "mode": mode}
    if batch_trees is not None and mode != "ar":
        engine["batch_trees"] = batch_trees
    return engine


def app_config(model: dict, mode: str, batching: dict, actor: dict, slots: int, batch_trees=None) -> dict:
    """The benchmark's `ServeAppConfig` args: `engine_args`, one replica with ``slots`` ongoing requests."""
    engine = engine_args(mode, batch_trees)
    deployment = {"max_ongoing_requests": slots, "ray_actor_options": actor}
    return {"model": model, "served_model_name": "bench", "engine": engine, "deployment": deployment,
            "batching": batching}  # fmt: skip


@contextlib.contextmanager
def local_serve(cpus: int):
    """A local Ray on loopback with Serve's HTTP proxy on a free port; yields the chat completions URL."""
    import ray
    from ray import serve

    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_options() -> tuple[dict, int]:
    """The replica's ``ray_actor_options`` and this machine's CPU count: a GPU, else every core but one (the
    replica leaves a core to Serve's proxy and this process's HTTP client)."""
    import torch

    cpus = os.cpu_count() or 1
    return ({"num_gpus": 1} if torch.cuda.is_available() else {"num_cpus": max(1, cpus - 1)}), cpus


def pin_cpus() -> tuple[set[int], set[int]]:
    """``--pin`` (Linux): make `replica_options`' split real. This process, and so the Ray it starts (Serve's
    proxy and controller, the raylet), runs on the first CPU it may use; `pin_replicas` puts the replica on
    the others. Returns (the first CPU, the rest)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs: one for the replica, one for the rest")
    os.sched_setaffinity(0, {cpus[0]})  # before ray.init: the processes it starts inherit it
    return {cpus[0]}, set(cpus[1:])


def pin_replicas(app: str, cpus: set[int]) -> int:
    """Every thread of the running processes of ``app``'s Serve replicas (found by their process title,
    ``ray::ServeReplica:<app>:...``) onto ``cpus``; returns the processes pinned."""
    pinned = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"ServeReplica:{app}:".encode() not in (proc / "cmdline").read_bytes():
                continue
            for task in (proc / "task").iterdir():  # threads keep their own masks: each one
                os.sched_setaffinity(int(task.name), cpus)
            pinned += 1
        except (OSError, ProcessLookupError):  # gone meanwhile
            continue
    return pinned


def machine() -> str:
    """The CPU model (and GPU) this runs on, for table headers."""
    import torch

    name = ""
    with contextlib.suppress(OSError):
        name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), "")  # fmt: skip
    cpu = f"{os.cpu_count()} CPU threads" + (f" ({name})" if name else "")
    return cpu + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="specvlm bench serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="a demo folder with target/ and draft/ (default: the built demo model)")
    ap.add_argument("--modes", default="ar,eagle,specvlm")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=3, help="requests per unit of concurrency (at least 16)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batching", default="continuous,static", help="batching modes run at --max-batch-size")
    add_output_args(ap, "serve.md / serve-open-loop[-in-process].md (and .json)")
    ol = ap.add_argument_group("open loop (--open-loop: static vs continuous batching, Poisson arrivals, streamed)")
    ol.add_argument("--open-loop", action="store_true", help="run the open-loop benchmark instead")
    ol.add_argument("--mode", default="eagle", help="the engine mode (default: the Serve config's)")
    ol.add_argument("--loads", default="0.5,0.8,1.0", help="arrival rates as fractions of the saturation rate")
    ol.add_argument("--requests-per-point", type=int, default=500, help="requests per batching mode and load")
    ol.add_argument("--bodies", type=int, default=64, help="distinct held-out questions (cycled, seeded order)")
    ol.add_argument("--max-tokens-choices", default="8,16,24,32,48", help="each question's max_tokens, drawn")
    ol.add_argument("--saturation-concurrency", type=int, help="closed-loop concurrency (default: 2x the batch)")
    ol.add_argument("--saturation-requests", type=int, default=128, help="closed-loop requests per batching mode")
    ol.add_argument("--seed", type=int, default=0, help="arrival times, question order and budgets")
    ol.add_argument("--in-process", action="store_true",
                    help="drive the replica's request path (ChatRunner + EngineLoop) in this process, without Ray, "
                         "Serve or HTTP (results in serve-open-loop-in-process.md)")  # fmt: skip
    ol.add_argument("--batch-trees", type=batch_trees_arg, metavar="auto|JSON",
                    help='the engine\'s batch_trees (both batching modes): "auto", or JSON rows -> tree preset, fields '
                         'or "off", e.g. \'{"6": "off"}\' (default: the Serve config\'s, none)')  # fmt: skip
    ol.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                    help="over HTTP: the replica's threads on every CPU but the first, this process (the load "
                         "generator) and the rest of Ray (proxy, controller, raylet) on the first (default: on "
                         "Linux with 2 CPUs or more; --no-pin lets them share every CPU)")  # fmt: skip
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.open_loop:
        return open_loop_main(args)

    from ray import serve

    from actors.serve_config import ServeAppConfig
    from actors.serving import build_app
    from specvlm.config import ModelConfig

    model = model_paths(args)
    modes = available_modes(ModelConfig(**model), args.modes.split(","))
    tree = ServeAppConfig().engine.tree
    levels = [int(c) for c in args.concurrency.split(",")]
    bodies = requests_for(16, args.max_tokens)
    actor, cpus = replica_options()
    header = (f"## Serve: demo model, 1 replica ({actor}; {cpus} CPUs in all), greedy, max_tokens "
              f"{args.max_tokens}, tree top_k={tree.top_k} total={tree.total_tokens} depth={tree.depth}, "
              f"{len(bodies)} held-out image questions as data: URLs over HTTP (Ray Serve on loopback)")  # fmt: skip
    print(header, flush=True)
    rows, reference = [], None
    with local_serve(cpus) as url:
        for mode, reason in modes.items():
            if reason:
                print(f"{mode}: skipped ({reason})", flush=True)
                rows.append({"mode": mode, "batching": f"skipped: {reason}"})
                continue
            settings = [("off", 1, "continuous")] + [(f"{b} {args.max_batch_size}", args.max_batch_size, b)
                                                     for b in args.batching.split(",")]  # fmt: skip
            for label, batch, batching in settings:
                batching_cfg = {"mode": batching, "max_batch_size": batch, "batch_wait_timeout_s": 0.01}
                cfg = app_config(model, mode, batching_cfg, actor, max(64, *levels))
                serve.run(build_app(cfg), name="bench", route_prefix="/")
                asyncio.run(load(url, bodies, 2, 1))  # warm-up
                for c in levels:
                    res = asyncio.run(load(url, bodies, max(16, args.requests * c), c))
                    answers = res.pop("answers")
                    if reference is None and mode == "ar" and batch == 1:
                        reference = answers
                    same = reference is not None and all(reference.get(k) == v for k, v in answers.items())
                    row = dict(mode=mode, batching=label, concurrency=c,
                               identical_to_ar=same if reference is not None else "", **res)  # fmt: skip
                    rows.append(row)
                    print(to_markdown([row], COLS).splitlines()[-1], flush=True)
                serve.delete("bench")
    table = to_markdown([r for r in rows if "concurrency" in r], COLS)
    skipped = [f"- `{r['mode']}`: {r['batching']}" for r in rows if "concurrency" not in r]
    report = header + "\n\n" + table + "\n" + ("\nNot run:\n" + "\n".join(skipped) + "\n" if skipped else "")
    print("\n" + report)
    write_results(args.out, "serve", report, rows, args.label)


def model_paths(args) -> dict:
    """`ModelConfig` fields for ``--model-dir``, else the shipped demo."""
    if args.model_dir:
        root = Path(args.model_dir)
        return {"target": str(root / "target"), "draft": str(root / "draft")}
    return {"target": "demo"}


def run_order(loads: list[float]) -> list[tuple[str, float | None]]:
    """(batching mode, load) in the order they run, None for a mode's saturation run: the order alternates
    between load points (C S, S C, C S, ...) so each mode is deployed once per change; a mode's saturation run
    comes before its first load point, continuous's first of all (its rate scales the loads)."""
    runs = []
    for i, load in enumerate(loads):
        runs += [(b, load) for b in (("continuous", "static") if i % 2 == 0 else ("static", "continuous"))]
    out: list[tuple[str, float | None]] = []
    for batching, load in runs:
        if all(b != batching for b, _ in out):
            out.append((batching, None))
        out.append((batching, load))
    return out


class HttpDriver:
    """Open-loop runs against the Serve endpoint: each batching mode deployed as one replica behind Serve's
    HTTP proxy on loopback, requests streamed by this process's async HTTP client."""

    def __init__(self, url: str, bodies: list[dict], model: dict, actor: dict, slots: int, wait_s: float,
                 batch_trees=None, replica_cpus: set[int] | None = None):  # fmt: skip
        self.url, self.bodies, self.model = url, bodies, model
        self.actor, self.slots, self.wait_s, self.batch_trees = actor, slots, wait_s, batch_trees
        self.replica_cpus = replica_cpus  # --pin: the replica's CPUs

    def deploy(self, mode: str, batching: str, max_rows: int) -> None:
        from ray import serve

        from actors.serving import build_app

        batching_cfg = {"mode": batching, "max_batch_size": max_rows, "batch_wait_timeout_s": self.wait_s}
        cfg = app_config(self.model, mode, batching_cfg, self.actor, self.slots, self.batch_trees)
        cfg["limits"] = {"max_active_requests": self.slots}
        with contextlib.suppress(Exception):
            serve.delete("bench")
        serve.run(build_app(cfg), name="bench", route_prefix="/", logging_config={"enable_access_log": False})
        if self.replica_cpus and pin_replicas("bench", self.replica_cpus) != 1:
            raise RuntimeError("--pin: did not find the one replica process to pin")

    def closed(self, order: list[int], concurrency: int):
        from benchmarks.open_loop import closed_loop

        return asyncio.run(closed_loop(self.url, self.bodies, order, concurrency))

    def open(self, order: list[int], times: list[float]):
        from benchmarks.open_loop import open_loop

        return asyncio.run(open_loop(self.url, self.bodies, order, times))

    def close(self) -> None:
        from ray import serve

        serve.delete("bench")


class InProcessDriver:
    """``--in-process``: the replica's own request path below HTTP, driven from this process: the requests are
    prepared by `ChatRunner.prepare` (images, chat template, processor) before the clock starts, then submitted
    at their times to an `EngineLoop` on its engine thread, as the replica does. No Ray, no Serve proxy, no
    HTTP client sharing the cores: the latencies are the engine loop's own (waiting for a place, prefill,
    rounds), which is what the batching mode changes."""

    def __init__(self, bodies: list[dict], model: dict, wait_s: float, batch_trees=None):
        from actors.image_urls import image_bytes
        from actors.openai_protocol import ChatRequest
        from actors.serve_config import ServeAppConfig

        self.cfg = ServeAppConfig(model=model)
        self.batch_trees, self.wait_s, self.runners, self.loop, self.thread = batch_trees, wait_s, {}, None, None
        self.requests = [ChatRequest.model_validate(b) for b in bodies]
        fetch, limit = self.cfg.image_fetch, self.cfg.limits.max_image_bytes
        self.images = [[asyncio.run(image_bytes(url, fetch, limit, param)) for param, url in r.image_urls()]
                       for r in self.requests]  # fmt: skip

    def deploy(self, mode: str, batching: str, max_rows: int) -> None:
        from actors.chat_runner import ChatRunner
        from actors.engine_loop import EngineLoop
        from specvlm.config import EngineConfig
        from specvlm.loading import load_engine

        self.close()
        if mode not in self.runners:
            engine_cfg = EngineConfig.model_validate(engine_args(mode, self.batch_trees))
            engine, processor, _ = load_engine(self.cfg.model, engine_cfg)
            self.runners[mode] = ChatRunner(engine, processor, self.cfg.limits)
        self.runner = self.runners[mode]
        self.loop = EngineLoop(self.runner.engine, self.runner.pad_id, max_rows, batching, self.wait_s)
        self.thread = threading.Thread(target=self.loop.run, name="specvlm-engine", daemon=True)
        self.thread.start()

    def _run(self, order: list[int], times: list[float] | None = None, concurrency: int = 0):
        """Submit ``order``'s requests at ``times`` (open loop) or with ``concurrency`` in flight (closed loop);
        returns their `Result`s and the wall time, as the HTTP client's functions do."""
        from benchmarks.open_loop import SSE_ERROR, Result

        jobs = [self.runner.prepare(self.requests[b], self.images[b]) for b in order]
        results = [Result(b, 0.0) for b in order]
        done: queue.SimpleQueue[int] = queue.SimpleQueue()
        start = time.perf_counter()

        def sink_for(i: int):
            r, parts = results[i], []

            def sink(update) -> None:  # the engine thread, after every round of this row
                now = time.perf_counter() - start
                if update.text:
                    r.ttft = now - r.arrival if r.ttft is None else r.ttft
                    parts.append(update.text)
                if update.error is not None or update.finish_reason is not None:  # its last update
                    r.status = 200 if update.error is None else SSE_ERROR
                    r.text, r.end, r.e2e = "".join(parts), now, now - r.arrival
                    r.completion_tokens = (update.usage or {}).get("completion_tokens", 0)
                    done.put(i)

            return sink

        def send(i: int, at: float) -> None:
            results[i].arrival = at
            results[i].send_lag = time.perf_counter() - start - at
            self.loop.submit(jobs[i], sink_for(i))

        if times is not None:
            for i, t in enumerate(times):
                time.sleep(max(0.0, t - (time.perf_counter() - start)))
                send(i, t)
            for _ in order:
                done.get()
        else:
            sent = min(concurrency, len(order))
            for i in range(sent):
                send(i, time.perf_counter() - start)
            for _ in order:
                done.get()
                if sent < len(order):
                    send(sent, time.perf_counter() - start)
                    sent += 1
        return results, time.perf_counter() - start

    def closed(self, order: list[int], concurrency: int):
        return self._run(order, concurrency=concurrency)

    def open(self, order: list[int], times: list[float]):
        return self._run(order, times=times)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.stop()
            self.thread.join()
            self.loop = None


@contextlib.contextmanager
def open_loop_driver(args, bodies: list[dict], model: dict, wait_s: float, slots: int):
    """The driver `open_loop_main` runs its points through: `InProcessDriver` (``--in-process``) or
    `HttpDriver` on a local Serve."""
    actor, cpus = replica_options()
    if args.in_process:
        import torch

        torch.set_num_threads(actor.get("num_cpus", 1))  # the replica's CPUs
        driver = InProcessDriver(bodies, model, wait_s, args.batch_trees)
        try:
            yield driver
        finally:
            driver.close()
        return
    replica_cpus = pin_cpus()[1] if args.pin else None
    with local_serve(cpus) as url:
        driver = HttpDriver(url, bodies, model, actor, slots, wait_s, args.batch_trees, replica_cpus)
        yield driver
        driver.close()


def open_loop_main(args) -> None:
    """``--open-loop``: see the module docstring."""
    if args.pin and args.in_process:
        raise SystemExit("--pin splits the replica from Serve's proxy and the load generator: an HTTP run's option")
    if args.pin is None:  # the replica's num_cpus split made real wherever it can be
        args.pin = not args.in_process and len(getattr(os, "sched_getaffinity", lambda _: ())(0)) >= 2
    from actors.serve_config import BatchingConfig, ServeAppConfig
    from benchmarks.open_loop import arrivals, summarize

    t_start = time.perf_counter()
    model, (actor, _) = model_paths(args), replica_options()
    loads = [float(x) for x in args.loads.split(",")]
    n, batch = args.requests_per_point, args.max_batch_size
    sat_c = args.saturation_concurrency or 2 * batch
    rng = random.Random(args.seed)
    budgets = [rng.choice([int(x) for x in args.max_tokens_choices.split(",")]) for _ in range(args.bodies)]
    bodies = requests_for(args.bodies, budgets)
    order = [rng.randrange(args.bodies) for _ in range(max(n, args.saturation_requests))]
    unit = arrivals(n, args.seed)  # rate 1; each load point divides by its rate
    wait_s = BatchingConfig().batch_wait_timeout_s
    slots = max(64, n, sat_c)  # no 429 within a run: an overload shows as queueing, in the latencies
    tree = ServeAppConfig().engine.tree
    rows, reference, rate = [], None, None

    def record(row: dict) -> None:
        row["run"] = len(rows) + 1
        rows.append(row)
        print(to_markdown([row], OPEN_COLS).splitlines()[-1], flush=True)

    print(f"open loop ({'in process' if args.in_process else 'Serve'}): {machine()}; {n} requests per point, "
          f"loads {loads}", flush=True)  # fmt: skip
    with open_loop_driver(args, bodies, model, wait_s, slots) as driver:

        def deploy(mode: str, batching: str, max_rows: int) -> None:
            driver.deploy(mode, batching, max_rows)
            # warm-up: batches up to max_rows (the engine's buffers grow to their shapes) before anything is timed
            driver.closed(order[: 2 * max_rows], max_rows)

        def saturation(batching: str) -> float:
            results, wall = driver.closed(order[: args.saturation_requests], sat_c)
            row = summarize(results, wall, reference)
            record(dict(kind="saturation", batching=batching, load=f"closed c={sat_c}", **row))
            return row["requests_per_s"]

        def point(batching: str, load: float) -> None:
            times = [t / (load * rate) for t in unit]
            results, wall = driver.open(order[:n], times)
            record(dict(kind="open_loop", batching=batching, load=load, offered_per_s=load * rate,
                        **summarize(results, wall - times[0], reference)))  # fmt: skip

        deploy("ar", "continuous", 1)  # the reference: `ar` without batching, every body once
        results, _ = driver.closed(list(range(args.bodies)), 2)
        reference = {r.body: r.text for r in results if r.ok}
        print(f"reference: ar, {len(reference)}/{args.bodies} answered", flush=True)
        deployed = None
        for batching, what in run_order(loads):
            if batching != deployed:
                deploy(args.mode, batching, batch)
                deployed = batching
            if what is None:
                sat = saturation(batching)
                rate = sat if batching == "continuous" else rate
            else:
                point(batching, what)
    elapsed = time.perf_counter() - t_start
    where = (f"1 replica ({actor}) on {machine()}; greedy, streamed (SSE)" if not args.in_process else
             f"in process: the replica's ChatRunner and EngineLoop driven directly ({actor.get('num_cpus', 1)} torch "
             f"thread(s) on {machine()}; no Ray, Serve or HTTP; each request prepared before the clock starts, "
             "time to first token = the first update with text); greedy")  # fmt: skip
    if args.pin:
        where += ("; pinned (--pin): the replica's threads on CPUs other than the load generator's, Serve's proxy's "
                  "and the rest of Ray's one")  # fmt: skip
    report = open_loop_report(args, rows, dict(where=where, tree=tree, rate=rate, sat_c=sat_c, wait_s=wait_s,
                                               elapsed=elapsed, budgets=budgets))  # fmt: skip
    print("\n" + report)
    meta = dict(kind="meta", machine=machine(), mode=args.mode, batch_trees=args.batch_trees,
                in_process=args.in_process, pin=args.pin, saturation_rate=rate,
                saturation_concurrency=sat_c, loads=loads, seed=args.seed, requests_per_point=n, bodies=args.bodies,
                max_tokens=budgets, elapsed_s=elapsed)  # fmt: skip
    write_results(args.out, "serve-open-loop-in-process" if args.in_process else "serve-open-loop", report,
                  [meta, *rows], args.label)  # fmt: skip


def open_loop_report(args, rows: list[dict], info: dict) -> str:
    """The open-loop table (saturation rows, then each load static before continuous) with its header and
    the issue's two targets computed."""
    tree, choices = info["tree"], [int(x) for x in args.max_tokens_choices.split(",")]
    trees = f"; batch_trees {json.dumps(args.batch_trees)}" if args.batch_trees is not None else ""
    header = (f"## Serve, open loop: static vs continuous batching (up to {args.max_batch_size} rows; static batches "
              f"wait up to {info['wait_s']:g} s to fill), demo model, `{args.mode}` (tree top_k={tree.top_k} "
              f"total={tree.total_tokens} depth={tree.depth}{trees}), {info['where']}\n\n"
              f"Saturation rate: {info['rate']:.2f} requests/s, continuous batching's closed-loop throughput at "
              f"concurrency {info['sat_c']} (rows `closed`), measured in this run; loads are fractions of it. "
              f"{args.requests_per_point} requests per point, Poisson arrivals (seed {args.seed}; the same schedule, "
              f"time-scaled, and the same bodies for both modes) over {args.bodies} held-out image questions as "
              f"data: URLs, max_tokens drawn from {choices} (mean {statistics.mean(info['budgets']):.1f}). "
              f"Latencies (ms) from each request's scheduled arrival; time to first token = the first content "
              f"delta. identical_to_ar: every answer equals `ar` without batching. run: the order the rows ran "
              f"in (each mode deployed in turn, the order alternating between load points).")  # fmt: skip
    key = {"static": 0, "continuous": 1}
    ordered = sorted(rows, key=lambda r: (r["kind"] != "saturation", r.get("offered_per_s", 0), key[r["batching"]]))
    lines = [header, "", to_markdown(ordered, OPEN_COLS), ""]
    by = {(r["batching"], r["load"]): r for r in rows}
    sat = [r for r in rows if r["kind"] == "saturation"]
    if 0.8 in [r["load"] for r in rows]:
        c, s = by[("continuous", 0.8)]["ttft_p99_ms"], by[("static", 0.8)]["ttft_p99_ms"]
        lines.append(f"- At 0.8x: p99 time to first token {c:.0f} ms continuous vs {s:.0f} ms static "
                     f"({c / s:.2f}x; target <= 0.5x).")  # fmt: skip
    if len(sat) == 2:
        c, s = (next(r["requests_per_s"] for r in sat if r["batching"] == b) for b in ("continuous", "static"))
        lines.append(f"- Saturation: {c:.2f} requests/s continuous vs {s:.2f} static ({c / s:.2f}x; target >= 1x).")
    same = all(r["identical_to_ar"] is True for r in rows)
    lines.append(f"- Every answer identical to `ar`: {same}. The whole run took {info['elapsed'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

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
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import statistics
import time
from pathlib import Path

from benchmarks.report import RESULTS, to_markdown, write_results

COLS = ["mode", "batching", "concurrency", "requests", "requests_per_s", "p50_ms", "p99_ms", "tokens_per_s",
        "accept_length", "errors", "identical_to_ar"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_for(n: int, max_tokens: int) -> list[dict]:
    """``n`` held-out demo questions (captions, QA, tiled videos) as chat request bodies."""
    from specvlm.demo.recipe import examples

    out = []
    for s in examples(seed=777, n=n, p_video=0.25, p_qa=0.35):
        buf = io.BytesIO()
        s["image"].save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": s["prompt"]}]
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
    return out


async def load(url: str, bodies: list[dict], n: int, concurrency: int) -> dict:
    """``n`` requests (cycling over ``bodies``) with at most ``concurrency`` in flight."""
    import httpx

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
    lat.sort()
    return dict(requests=n, requests_per_s=n / wall, p50_ms=1e3 * lat[len(lat) // 2],
                p99_ms=1e3 * lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))], tokens_per_s=tokens / wall,
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="specvlm bench serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="a demo folder with target/ and draft/ (default: the built demo model)")
    ap.add_argument("--modes", default="ar,eagle,specvlm")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=3, help="requests per unit of concurrency (at least 16)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batching", default="continuous,static", help="batching modes run at --max-batch-size")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray import serve

    from actors.serve_config import ServeAppConfig
    from actors.serving import build_app
    from specvlm.config import ModelConfig

    if args.model_dir:
        root = Path(args.model_dir)
        model = {"target": str(root / "target"), "draft": str(root / "draft")}
    else:
        model = {"target": "demo"}
    modes = available_modes(ModelConfig(**model), args.modes.split(","))
    tree = ServeAppConfig().engine.tree
    levels = [int(c) for c in args.concurrency.split(",")]
    bodies = requests_for(16, args.max_tokens)
    cpus = os.cpu_count() or 1
    import torch

    # the replica leaves a core to Serve's proxy and this process's HTTP client
    actor = {"num_gpus": 1} if torch.cuda.is_available() else {"num_cpus": max(1, cpus - 1)}
    header = (f"## Serve: demo model, 1 replica ({actor}; {cpus} CPUs in all), greedy, max_tokens "
              f"{args.max_tokens}, tree top_k={tree.top_k} total={tree.total_tokens} depth={tree.depth}, "
              f"{len(bodies)} held-out image questions as data: URLs over HTTP (Ray Serve on loopback)")  # fmt: skip
    print(header, flush=True)
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rows, reference = [], None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode, reason in modes.items():
            if reason:
                print(f"{mode}: skipped ({reason})", flush=True)
                rows.append({"mode": mode, "batching": f"skipped: {reason}"})
                continue
            settings = [("off", 1, "continuous")] + [(f"{b} {args.max_batch_size}", args.max_batch_size, b)
                                                     for b in args.batching.split(",")]  # fmt: skip
            for label, batch, batching in settings:
                engine = {**ServeAppConfig().engine.model_dump(), "mode": mode}  # the CPU tree of configs/serve.yaml
                deployment = {"max_ongoing_requests": max(64, *levels), "ray_actor_options": actor}
                cfg = {"model": model, "served_model_name": "bench", "engine": engine, "deployment": deployment,
                       "batching": {"mode": batching, "max_batch_size": batch,
                                    "batch_wait_timeout_s": 0.01}}  # fmt: skip
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
    finally:
        serve.shutdown()
        ray.shutdown()
    table = to_markdown([r for r in rows if "concurrency" in r], COLS)
    skipped = [f"- `{r['mode']}`: {r['batching']}" for r in rows if "concurrency" not in r]
    report = header + "\n\n" + table + "\n" + ("\nNot run:\n" + "\n".join(skipped) + "\n" if skipped else "")
    print("\n" + report)
    write_results(args.out, "serve", report, rows)


if __name__ == "__main__":
    main()

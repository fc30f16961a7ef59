"""The Serve benchmark's open-loop client without Ray: the seeded Poisson schedule, percentiles, one streamed
request read from server-sent events (``httpx.MockTransport`` as the server), open and closed loops, the
summary row, the run order and the report's targets; and the in-process driver on the demo model."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks import open_loop as ol
from benchmarks.serve import OPEN_COLS, InProcessDriver, batch_trees_arg, open_loop_report, requests_for, run_order

ROOT = Path(__file__).resolve().parent.parent


def test_arrivals_are_seeded_poisson_of_rate_one():
    times = ol.arrivals(20_000, seed=3)
    assert times == ol.arrivals(20_000, seed=3) and times != ol.arrivals(20_000, seed=4)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert all(g > 0 for g in gaps)
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 1) < 0.03  # the mean's standard error is 1/sqrt(20000) = 0.007
    assert abs(sum(g > 1 for g in gaps) / len(gaps) - math.exp(-1)) < 0.02  # exponential: P(gap > mean) = 1/e
    rate = 12.5
    assert abs(times[-1] / rate / len(times) - 1 / rate) < 0.03 / rate  # divided by a rate: that rate's schedule


def test_percentile_is_nearest_rank():
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert ol.percentile(values, 0.5) == 51 and ol.percentile(values, 0.99) == 99
    assert ol.percentile(values, 0.0) == 1 and ol.percentile(values, 1.0) == 100
    assert ol.percentile([7.0], 0.99) == 7.0 and math.isnan(ol.percentile([], 0.5))
    assert [ol.percentile(range(n), 0.5) for n in (2, 4, 6)] == [1, 2, 3]  # the upper middle (rounded half up)


def sse_server(events: dict[str, list], delay_s: float = 0.0, status: dict[str, int] | None = None, seen=None):
    """A mock endpoint: the request whose last message text is a key of ``events`` gets those events as SSE
    (``delay_s`` after each of the first two), or ``status[key]`` with an error body."""

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        key = body["messages"][-1]["content"]
        if seen is not None:
            seen.append((key, time.perf_counter()))
        if status and key in status:
            return httpx.Response(status[key], json={"error": {"message": "no"}})

        async def stream():
            for i, event in enumerate(events[key]):
                yield f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()
                if i < 2 and delay_s:
                    await asyncio.sleep(delay_s)

        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def delta(text: str | None = None, role: str | None = None, finish: str | None = None) -> dict:
    d = {k: v for k, v in (("role", role), ("content", text)) if v is not None}
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


ANSWER = [delta("", role="assistant"), delta("a red"), delta(" circle"), delta(finish="length"),
          {"choices": [], "usage": {"completion_tokens": 3}}, "[DONE]"]  # fmt: skip


def body(key: str) -> dict:
    return {"messages": [{"role": "user", "content": key}], "max_tokens": 8}


def stream(transport, key: str, arrival: float = 0.0) -> ol.Result:
    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await ol.stream_one(client, "http://x/v1", body(key), ol.Result(0, arrival), time.perf_counter())

    return asyncio.run(go())


def test_stream_one_reads_the_first_token_time_text_and_usage():
    r = stream(sse_server({"q": ANSWER}, delay_s=0.1), "q")
    assert r.ok and r.text == "a red circle" and r.completion_tokens == 3
    assert r.ttft >= 0.1 and r.e2e >= r.ttft + 0.1  # the role chunk is not the first token; the rest came later
    late = stream(sse_server({"q": ANSWER}), "q", arrival=-0.5)  # scheduled 0.5 s before it could be sent
    assert late.send_lag >= 0.5 and late.ttft >= 0.5 and late.e2e >= 0.5


def test_stream_one_failures_are_statuses():
    error = {"error": {"message": "decoding failed", "type": "server_error"}}
    events = {"err": [delta("", role="assistant"), delta("a"), error, "[DONE]"], "cut": ANSWER[:3]}
    transport = sse_server(events, status={"busy": 429})
    assert stream(transport, "busy").status == 429
    broken = stream(transport, "err")
    assert broken.status == ol.SSE_ERROR and not broken.ok
    assert stream(transport, "cut").status == ol.SSE_ERROR  # no [DONE]

    def refuse(request):
        raise httpx.ConnectError("refused")

    assert stream(httpx.MockTransport(refuse), "x").status == "ConnectError"


def test_open_loop_sends_on_schedule_and_closed_loop_bounds_what_is_in_flight():
    seen: list[tuple[str, float]] = []
    transport = sse_server({"q": ANSWER}, delay_s=0.05, seen=seen)
    times = [0.0, 0.1, 0.1, 0.3]  # answers take 0.1 s: they overlap
    t0 = time.perf_counter()
    results, wall = asyncio.run(ol.open_loop("http://x/v1", [body("q")], [0] * 4, times, transport=transport))
    sent = sorted(t - t0 for _, t in seen)
    assert all(s >= t - 0.01 for s, t in zip(sent, times)) and wall >= 0.4
    assert [r.arrival for r in results] == times and all(r.ok and r.text == "a red circle" for r in results)
    assert max(r.send_lag for r in results) < 0.2

    seen.clear()
    results, wall = asyncio.run(ol.closed_loop("http://x/v1", [body("q")], [0] * 6, 2, transport=transport))
    starts = sorted(t for _, t in seen)
    assert len(results) == 6 and all(r.ok for r in results)
    assert starts[2] - starts[0] >= 0.09 and wall >= 0.29  # two at a time, each over 0.1 s


def result(body: int, status=200, ttft=0.1, e2e=0.5, text="x", tokens=4, lag=0.0) -> ol.Result:
    return ol.Result(body, 0.0, status, lag, ttft, e2e, e2e, text, tokens)


def test_summarize():
    results = [result(0, ttft=0.1, e2e=0.4), result(1, ttft=0.3, e2e=0.6, lag=0.002), result(0, status=429),
               result(1, status=ol.SSE_ERROR), result(2, status="ReadTimeout")]  # fmt: skip
    row = ol.summarize(results, 2.0, {0: "x", 1: "x"})
    assert row["requests"] == 5 and row["requests_per_s"] == 1.0 and row["tokens_per_s"] == 4.0
    assert row["ttft_p50_ms"] == pytest.approx(300) and row["e2e_p99_ms"] == pytest.approx(600)
    assert row["errors"] == "429: 1, ReadTimeout: 1, sse_error: 1"
    assert row["identical_to_ar"] is False  # failed requests have no answer to compare
    ok = [result(0), result(1)]
    assert ol.summarize(ok, 1.0, {0: "x", 1: "x"})["identical_to_ar"] is True
    assert ol.summarize(ok, 1.0, {0: "x", 1: "y"})["identical_to_ar"] is False
    assert ol.summarize(ok, 1.0)["identical_to_ar"] == "" and ol.summarize(ok, 1.0)["errors"] == "0"
    assert set(row) | {"run", "batching", "load", "offered_per_s"} == set(OPEN_COLS)


def test_run_order_alternates_and_measures_saturation_first():
    assert run_order([0.5, 0.8, 1.0]) == [
        ("continuous", None), ("continuous", 0.5), ("static", None), ("static", 0.5), ("static", 0.8),
        ("continuous", 0.8), ("continuous", 1.0), ("static", 1.0),
    ]  # fmt: skip


def test_report_states_the_targets():
    from types import SimpleNamespace

    from actors.serve_config import ServeAppConfig

    def row(kind, batching, load, ttft99=100.0, rps=10.0):
        return dict(kind=kind, batching=batching, load=load, offered_per_s=load if kind == "open_loop" else None,
                    ttft_p99_ms=ttft99, requests_per_s=rps, identical_to_ar=True)  # fmt: skip

    rows = [row("saturation", "continuous", "closed c=32", rps=20.0), row("saturation", "static", "closed c=32"),
            row("open_loop", "continuous", 0.8), row("open_loop", "static", 0.8, ttft99=400.0)]  # fmt: skip
    args = SimpleNamespace(max_batch_size=16, mode="eagle", max_tokens_choices="8,48", requests_per_point=10,
                           seed=0, bodies=4, batch_trees=batch_trees_arg('{"6": "off"}'))  # fmt: skip
    info = dict(tree=ServeAppConfig().engine.tree, wait_s=0.02, where="1 replica on 2 CPU threads", rate=20.0,
                sat_c=32, budgets=[8, 48], elapsed=90.0)  # fmt: skip
    report = open_loop_report(args, rows, info)
    assert "p99 time to first token 100 ms continuous vs 400 ms static (0.25x; target <= 0.5x)" in report
    assert "20.00 requests/s continuous vs 10.00 static (2.00x; target >= 1x)" in report
    assert "identical to `ar`: True" in report and "2 CPU threads" in report and 'batch_trees {"6": "off"}' in report
    table = [ln for ln in report.splitlines() if ln.startswith("| ")][1:]
    assert [ln.split(" | ")[1:3] for ln in table] == [["static", "closed c=32"], ["continuous", "closed c=32"],
                                                      ["static", "0.80"], ["continuous", "0.80"]]  # fmt: skip


def test_in_process_driver_answers_like_ar_in_both_loops():
    """`--in-process`: requests through the replica's ChatRunner and an EngineLoop, open and closed loop, each
    answer equal to `ar` without batching, with its latencies and token count."""
    bodies = requests_for(4, [8, 16, 8, 12])
    driver = InProcessDriver(bodies, {"target": "demo"}, wait_s=0.0, batch_trees=batch_trees_arg('{"3": "off"}'))
    try:
        driver.deploy("ar", "continuous", 1)
        reference, _ = driver.closed([0, 1, 2, 3], 2)
        driver.deploy("eagle", "continuous", 4)
        opened, wall = driver.open([0, 1, 2, 3, 0, 1], [0.0, 0.01, 0.02, 0.03, 0.2, 0.21])
        assert driver.runner.engine.config.batch_trees == {3: "off"}  # plain steps from 3 rows: the same answers
        driver.deploy("eagle", "static", 4)
        closed, _ = driver.closed([3, 2, 1, 0], 3)
    finally:
        driver.close()
    texts = {r.body: r.text for r in reference}
    assert all(r.ok for r in reference) and all(texts.values())
    for r in opened + closed:
        assert r.ok and r.text == texts[r.body] and 0 < r.completion_tokens <= bodies[r.body]["max_tokens"]
        assert 0 <= r.ttft <= r.e2e and r.end == pytest.approx(r.arrival + r.e2e)
    assert [r.arrival for r in opened] == [0.0, 0.01, 0.02, 0.03, 0.2, 0.21]
    row = ol.summarize(opened, wall, texts)
    assert row["identical_to_ar"] is True and row["errors"] == "0" and row["requests"] == 6


def test_batch_trees_option_takes_auto_or_a_checked_table():
    assert batch_trees_arg("auto") == "auto"
    assert batch_trees_arg('{"1": "cpu-deep", "8": "off"}')[8] == "off"
    for bad in ('{"0": "off"}', '{"4": "nope"}', "[1]"):
        with pytest.raises(ValueError):  # pydantic's ValidationError is one: argparse names the option
            batch_trees_arg(bad)


def test_labelled_results_keep_the_earlier_runs(tmp_path):
    from benchmarks.report import write_results

    write_results(tmp_path, "b", "## Bench: x\n\n| a |\n", [1])  # unlabelled: replaces
    write_results(tmp_path, "b", "## Bench: y\n\n| b |\n", [2], label="run 1")
    write_results(tmp_path, "b", "## Bench: z\n\n| c |\n", {"k": 3}, label="run 2")
    md = (tmp_path / "b.md").read_text()
    assert md == "## run 2: Bench: z\n\n| c |\n\n## run 1: Bench: y\n\n| b |\n\n## Bench: x\n\n| a |\n"
    runs = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert runs == [{"label": "run 2", "data": {"k": 3}}, {"label": "run 1", "data": [2]}, {"label": None, "data": [1]}]
    write_results(tmp_path, "b", "## Bench: w\n", [4])
    assert (tmp_path / "b.md").read_text() == "## Bench: w\n" and json.loads((tmp_path / "b.json").read_text()) == [4]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin splits at least 2 CPUs")
def test_pin_puts_the_replica_and_the_rest_on_separate_cpus():
    """``--pin``: this process (and what it starts) on the first CPU, a replica's every thread on the others,
    the replica found by its Ray process title."""
    from benchmarks.serve import pin_replicas

    cpus = sorted(os.sched_getaffinity(0))
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"
    replica = subprocess.Popen([sys.executable, "-c", code, "ray::ServeReplica:bench:SpecVLMServer"])
    other = subprocess.Popen([sys.executable, "-c", code, "ray::ServeReplica:other:SpecVLMServer"])
    try:
        time.sleep(0.5)  # its second thread is up
        probe = (
            "import json, os; from benchmarks.serve import pin_cpus; rest, mine = pin_cpus(); "
            "print(json.dumps([sorted(rest), sorted(mine), sorted(os.sched_getaffinity(0))]))"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
        assert json.loads(out.stdout) == [cpus[:1], cpus[1:], cpus[:1]]
        assert pin_replicas("bench", set(cpus[1:])) == 1
        threads = list(Path(f"/proc/{replica.pid}/task").iterdir())
        assert len(threads) == 2 and all(os.sched_getaffinity(int(t.name)) == set(cpus[1:]) for t in threads)
        assert os.sched_getaffinity(other.pid) == set(cpus)  # another app's replica is left alone
        assert os.sched_getaffinity(0) == set(cpus)  # pinning ran in the probe, not here
    finally:
        replica.kill()
        other.kill()

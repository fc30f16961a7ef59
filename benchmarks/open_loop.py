"""Open-loop load for the Serve benchmark: seeded Poisson arrivals, streamed requests, and their summary.

No Ray, no torch: `benchmarks.serve` (``--open-loop``) points these at a live endpoint; the tests call them
directly (``httpx.MockTransport`` stands in for the server).

    arrivals(n, seed)                     send times of a unit-rate Poisson process; divide by a rate
    stream_one(client, url, body, ...)    one streamed request -> `Result` (time to first token, end to end)
    open_loop(url, bodies, times)         every request sent at its time, whatever is still in flight
    closed_loop(url, bodies, n, c)        at most ``c`` in flight (the saturation rate)
    summarize(results, reference)         one table row: percentiles, throughput, errors, identical answers

Latencies count from a request's scheduled arrival, not from when the client got round to sending it (a
client that falls behind would otherwise hide the queueing it causes); ``send_lag`` says how far behind
the client fell.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

SSE_ERROR = "sse_error"  # the status of a stream that began 200 and then sent an error event


@dataclass
class Result:
    """One request, times in seconds from the start of its run."""

    body: int  # index into the request bodies
    arrival: float  # scheduled send time
    status: int | str = 0  # HTTP status; SSE_ERROR; or the exception's name when there was no answer
    send_lag: float = 0.0  # when the client sent it - arrival
    ttft: float | None = None  # arrival -> first non-empty content delta
    e2e: float | None = None  # arrival -> the stream's end ([DONE])
    end: float | None = None  # the stream's end
    text: str = ""
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200


def arrivals(n: int, seed: int) -> list[float]:
    """Send times (s) of ``n`` requests from a Poisson process of rate 1 (exponential gaps of mean 1), seeded.
    Divide by a rate to get that rate's schedule: every load point replays the same pattern, time-scaled."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(1.0)
        out.append(t)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank on the sorted values: index ``q * (n - 1)`` rounded half up, so
    p50 of an even count is the upper middle value; nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.floor(q * (len(ordered) - 1) + 0.5))]


def stream_body(body: dict) -> dict:
    """``body`` as a streamed request that ends with a usage chunk."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


async def stream_one(client, url: str, body: dict, result: Result, start: float) -> Result:
    """Send ``body`` streamed now and read its server-sent events into ``result`` (times relative to
    ``start``, a ``time.perf_counter()`` value). Never raises for a failed request: its status says why."""
    now = time.perf_counter() - start
    result.send_lag = now - result.arrival
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=stream_body(body)) as r:
            result.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result.end = time.perf_counter() - start
                    break
                event = json.loads(data)
                if "error" in event:
                    result.status = SSE_ERROR
                    continue
                if event.get("usage"):
                    result.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if result.ttft is None:
                            result.ttft = time.perf_counter() - start - result.arrival
                        parts.append(text)
    except Exception as e:  # connection refused or reset, a timeout: no answer
        result.status = type(e).__name__
        return result
    result.text = "".join(parts)
    if result.end is None:  # the stream stopped without [DONE]
        result.status = SSE_ERROR if result.status == 200 else result.status
    else:
        result.e2e = result.end - result.arrival
    return result


def _client(timeout_s: float, transport=None):
    import httpx

    # no connection limit: an open loop must not wait for a free connection
    return httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=None), transport=transport)


async def open_loop(url: str, bodies: Sequence[dict], order: Sequence[int], times: Sequence[float],
                    timeout_s: float = 600, transport=None) -> tuple[list[Result], float]:  # fmt: skip
    """Request ``i`` (body ``order[i]``) sent at ``times[i]`` s after the start, streamed, whatever is in flight.
    Returns the results and the wall time from the start to the last answer. (``transport``: tests.)"""
    async with _client(timeout_s, transport) as client:
        start = time.perf_counter()

        async def one(i: int) -> Result:
            await asyncio.sleep(max(0.0, times[i] - (time.perf_counter() - start)))
            return await stream_one(client, url, bodies[order[i]], Result(order[i], times[i]), start)

        results = await asyncio.gather(*(one(i) for i in range(len(times))))
        return list(results), time.perf_counter() - start


async def closed_loop(url: str, bodies: Sequence[dict], order: Sequence[int], concurrency: int,
                      timeout_s: float = 600, transport=None) -> tuple[list[Result], float]:  # fmt: skip
    """Bodies ``order[0], order[1], ...`` streamed with at most ``concurrency`` in flight (each request
    "arrives" when it is sent). Returns the results and the wall time."""
    gate = asyncio.Semaphore(concurrency)
    async with _client(timeout_s, transport) as client:
        start = time.perf_counter()

        async def one(i: int) -> Result:
            async with gate:
                result = Result(order[i], time.perf_counter() - start)
                return await stream_one(client, url, bodies[order[i]], result, start)

        results = await asyncio.gather(*(one(i) for i in range(len(order))))
        return list(results), time.perf_counter() - start


def errors_by_status(results: Sequence[Result]) -> str:
    """``"0"``, or the failed requests counted by status, e.g. ``"429: 3, 500: 1"``."""
    counts = Counter(str(r.status) for r in results if not r.ok)
    return ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())) if counts else "0"


def summarize(results: Sequence[Result], wall: float, reference: dict[int, str] | None = None) -> dict:
    """One table row: time to first token and end-to-end p50/p99 (ms, answered requests), throughput over
    ``wall`` (answered requests/s, completion tokens/s), errors by status, whether every answer equals
    ``reference[body]`` (``""`` without a reference; False if any answer is missing or differs), and the
    client's p99 send lag (ms)."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok]
    same: bool | str = ""
    if reference is not None:
        same = len(ok) == len(results) and all(reference.get(r.body) == r.text for r in ok)
    ms = 1e3
    return dict(requests=len(results), ttft_p50_ms=ms * percentile(ttft, 0.5), ttft_p99_ms=ms * percentile(ttft, 0.99),
                e2e_p50_ms=ms * percentile(e2e, 0.5), e2e_p99_ms=ms * percentile(e2e, 0.99),
                requests_per_s=len(ok) / wall, tokens_per_s=sum(r.completion_tokens for r in ok) / wall,
                errors=errors_by_status(results), identical_to_ar=same,
                send_lag_p99_ms=ms * percentile([r.send_lag for r in results], 0.99))  # fmt: skip

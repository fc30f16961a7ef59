"""Ray Serve deployment: an OpenAI-compatible endpoint over `SpecVLMEngine`.

    POST /v1/chat/completions    OpenAI chat schema; text + image_url parts; stream: true as SSE
    GET  /v1/models              the one served model
    GET  /health                 liveness (no API key)

Run: ``specvlm serve [--config FILE] [--host 127.0.0.1] [--port 8000]`` (`pipelines.serve`), or
``serve run configs/serve.yaml`` (`build_app`, which validates the file's ``args``). See docs/serve.md.

What runs where in a replica::

    event loop      auth, admission (429 beyond max_active_requests), body read (size and time limits),
                    image URLs (`image_urls`), SSE; never blocks on the model or on a costly request
    prep threads    (`prep_threads`) JSON parse + validate (`openai_protocol`), image headers, image decode,
                    chat template + processor (`ChatRunner.prepare`): one costly request stalls no other
    engine thread   `EngineLoop.run`: the one engine loop; each iteration admits waiting requests, runs one
                    `SpecVLMEngine.step` and routes every row's new tokens, as text deltas, back to its
                    request's asyncio queue on the event loop

Admission: a replica holds at most ``max_active_requests`` requests (from the
first byte of the body to the last byte of the response); the next one gets
an immediate 429 with ``Retry-After`` in OpenAI's error format (`Admission`).

Batching: every admitted request, streamed or not, is prepared and submitted
to the replica's `EngineLoop`, a single queue read by a single engine thread.
In ``batching.mode: continuous`` (the default) waiting requests join the
running batch at the next round while fewer than ``max_batch_size`` rows
decode, so a short request that arrives while a long one decodes gets its
first tokens at the next round and may finish first; a row that ends (EOS,
``max_tokens``, a stop string, a client that disconnected) frees its place
at the round after. ``static`` keeps the older behaviour for comparison: a
batch of every request waiting (up to ``max_batch_size``, after an idle engine
waited ``batch_wait_timeout_s`` for it to fill) decodes to its end before the
next starts. Each round sends one `RowUpdate` per request that got text, so a
streamed request sees each speculative round's tokens as one chunk (and, if its
reader fell behind, every round it missed as one: `chat_runner.next_update`). An engine
failure fails the rows it was decoding (500, or an SSE error event) and the
loop goes on with a reset engine. When nothing waits or decodes the engine
thread sleeps on a condition variable.

Metrics (`_Metrics`, Ray's Prometheus endpoint): requests by status, tokens, accept length, compressor
choices, latency, time to first token, rows per engine step (``batch_rows``), and two gauges, requests
waiting for the engine (``queue_depth``) and rows decoding (``active_rows``). Decoding logic is the
engine's; this module only translates and exports metrics.
"""

import asyncio
import hmac
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_runner import ChatJob, ChatRunner, RowUpdate, next_update
from .engine_loop import EngineLoop
from .image_urls import image_bytes
from .openai_protocol import (
    ChatRequest,
    OpenAIError,
    chunk,
    completion,
    error_body,
    models_list,
    new_id,
    now,
    parse_chat_request,
    sse,
    usage_chunk,
)
from .serve_config import DraftUpdate, ServeAppConfig, ServeLimits

log = logging.getLogger("ray.serve")

fastapi_app = FastAPI(title="specvlm", docs_url=None, redoc_url=None, openapi_url=None)


def _error(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(400, f"invalid request: {exc.errors()}"), status_code=400)


class _Metrics:
    """Ray metrics (exported on Ray's Prometheus endpoint with a ``ray_`` prefix)."""

    def __init__(self, model: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = {"model": model}
        self.requests = Counter("specvlm_serve_requests", "chat requests by HTTP status", ("model", "status", "stream"))
        self.tokens = Counter("specvlm_serve_tokens", "prompt and completion tokens", ("model", "kind"))
        self.accept = Histogram("specvlm_serve_accept_length", "tokens per target forward, per request",
                                [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0], ("model",))  # fmt: skip
        self.compressor = Counter("specvlm_serve_compressor_choices", "visual compressor chosen per request",
                                  ("model", "compressor"))  # fmt: skip
        self.latency = Histogram("specvlm_serve_latency_s", "request latency, arrival to last token",
                                 [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64], ("model", "stream"))  # fmt: skip
        self.ttft = Histogram("specvlm_serve_time_to_first_token_s", "arrival to the first text",
                              [0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16], ("model",))  # fmt: skip
        self.batch_rows = Histogram("specvlm_serve_batch_rows", "rows decoded together, per engine step",
                                    [1, 2, 4, 8, 16, 32, 64], ("model",))  # fmt: skip
        self.queue_depth = Gauge("specvlm_serve_queue_depth", "requests waiting for the engine", ("model",))
        self.active_rows = Gauge("specvlm_serve_active_rows", "rows decoding in the engine", ("model",))
        for m in (self.requests, self.tokens, self.accept, self.compressor, self.latency, self.ttft, self.batch_rows,
                  self.queue_depth, self.active_rows):  # fmt: skip
            m.set_default_tags(tags)
        self.depth(0, 0)

    def depth(self, waiting: int, active: int) -> None:
        """`EngineLoop`'s ``on_depth``: the two gauges."""
        self.queue_depth.set(waiting)
        self.active_rows.set(active)

    def record(self, status: int, stream: bool, t0: float, last: RowUpdate | None = None, ttft: float | None = None):
        self.requests.inc(tags={"status": str(status), "stream": str(stream).lower()})
        if last is None or last.usage is None:
            return
        self.tokens.inc(last.usage["prompt_tokens"], tags={"kind": "prompt"})
        self.tokens.inc(last.usage["completion_tokens"], tags={"kind": "completion"})
        self.accept.observe(last.usage["accept_length"])
        self.compressor.inc(tags={"compressor": str((last.stats or {}).get("compressor") or "none")})
        self.latency.observe(time.perf_counter() - t0, tags={"stream": str(stream).lower()})
        if ttft is not None:
            self.ttft.observe(ttft)


def read_api_key(cfg: ServeAppConfig) -> str | None:
    """The key requests must send (``auth: env`` or ``file``), None for ``auth: none``; raises `ValueError` when
    the configured source is missing or empty, so the replica does not start rather than serve without a key."""
    if cfg.auth == "file":
        path = Path(cfg.api_key_file)
        if not path.is_file():
            raise ValueError(f"auth: file, but api_key_file {path} does not exist (is the secret mounted?)")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"auth: file, but api_key_file {path} is empty")
        return key
    key = os.environ.get(cfg.api_key_env, "").strip()
    if cfg.auth == "env":
        if not key:
            raise ValueError(f"auth: env, but the environment variable {cfg.api_key_env} is unset or empty on "
                             "this replica (is the secret there?)")  # fmt: skip
        return key
    if key:  # someone meant to require a key: serving without one would be a silent surprise
        raise ValueError(f"auth: none, but {cfg.api_key_env} is set: set auth: env to require that key, or unset it")
    return None


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The body, refusing more than ``max_body_bytes`` (413, by Content-Length and while reading) and a body
    that does not arrive in ``body_timeout_s`` plus 1 s per ``min_body_bytes_per_s`` received (408): a
    client that sends headers and then stalls would otherwise hold a replica slot forever."""
    limit = limits.max_body_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise OpenAIError(413, f"request body is {length} bytes > max_body_bytes={limit}", code="request_too_large")
    loop = asyncio.get_running_loop()
    start, body, pieces = loop.time(), bytearray(), request.stream()
    while True:
        left = start + limits.body_timeout_s + len(body) / limits.min_body_bytes_per_s - loop.time()
        try:
            piece = await asyncio.wait_for(anext(pieces), max(left, 0.0))
        except StopAsyncIteration:
            return bytes(body)
        except asyncio.TimeoutError:
            raise OpenAIError(408, f"request body too slow: {len(body)} bytes in {loop.time() - start:.1f} s "
                              f"(body_timeout_s={limits.body_timeout_s:g}, min_body_bytes_per_s="
                              f"{limits.min_body_bytes_per_s})", code="request_timeout",
                              headers={"Connection": "close"}) from None  # fmt: skip
        body += piece
        if len(body) > limit:
            raise OpenAIError(413, f"request body is over max_body_bytes={limit}", code="request_too_large")


class Admission:
    """Requests a replica holds, from admission until their response's last byte; beyond ``limit``, 429.

    Serve routes up to ``max_ongoing_requests`` to a replica; admitting fewer (``max_active_requests``) makes
    the rest of those slots answer an overload at once, with ``Retry-After``, instead of queueing it.
    """

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after_s, self.active = limit, retry_after_s, 0

    def enter(self) -> Callable[[], None]:
        """Admit one request (or raise `OpenAIError` 429); returns its ``leave``, safe to call more than once."""
        if self.active >= self.limit:
            raise OpenAIError(429, f"server overloaded: {self.active} requests in progress on this replica "
                              f"(max_active_requests={self.limit}); retry after {self.retry_after_s} s",
                              "requests", None, "rate_limit_exceeded",
                              headers={"Retry-After": str(self.retry_after_s)})  # fmt: skip
        self.active += 1
        left = False

        def leave() -> None:
            nonlocal left
            if not left:
                left = True
                self.active -= 1

        return leave


# Everything the routes use is defined above this line: serve.ingress freezes the app (and its
# handlers' globals) when the class is decorated.
@serve.deployment(max_ongoing_requests=64)
@serve.ingress(fastapi_app)
class SpecVLMServer:
    """One replica: one engine, driven by one `EngineLoop` on its own thread."""

    def __init__(self, cfg: ServeAppConfig):
        from specvlm.loading import load_engine

        self.cfg = cfg
        self.api_key = read_api_key(cfg)  # first: a missing key source fails the replica before the model loads
        engine, processor, info = load_engine(cfg.model, cfg.engine)
        self.model_name = cfg.model_name(info)
        self.info = info
        self.runner = ChatRunner(engine, processor, cfg.limits)
        self.created = now()
        self.metrics = _Metrics(self.model_name)
        self.admission = Admission(cfg.max_active_requests(), cfg.deployment.retry_after_s)
        self._prep = ThreadPoolExecutor(cfg.limits.prep_threads, thread_name_prefix="specvlm-prep")
        b, m = cfg.batching, self.metrics
        self.engine_loop = EngineLoop(engine, self.runner.pad_id, b.max_batch_size, b.mode, b.batch_wait_timeout_s,
                                      on_round=m.batch_rows.observe, on_depth=m.depth,
                                      draft_version=info["draft_version"], prefill_passes=b.prefill_passes)  # fmt: skip
        self._engine_thread = threading.Thread(target=self.engine_loop.run, name="specvlm-engine", daemon=True)
        self._engine_thread.start()
        self._following: threading.Event | None = None  # set to stop the draft-store follower (reconfigure)
        log.info("specvlm serving %s (mode %s, %s batching of up to %d rows, auth %s)", self.model_name,
                 cfg.engine.mode, b.mode, b.max_batch_size, cfg.auth)  # fmt: skip

    def reconfigure(self, user_config: dict) -> None:
        """Ray Serve's ``user_config`` hook (`DraftUpdate`): load the named draft and swap it in once the rows
        decoding now have finished (`EngineLoop.swap_draft`); requests meanwhile wait for the swap, none fails.
        A bad config or a draft that does not load raises, so Serve reports the update as failed and the
        replica keeps its draft."""
        from specvlm.config import parse_config
        from specvlm.loading import load_draft

        update = parse_config(dict(user_config or {}), DraftUpdate, source="user_config")
        if self.cfg.engine.mode == "ar" and (update.draft or update.draft_store):
            raise ValueError("user_config: this replica decodes in mode 'ar', without a draft")
        self._follow(update)
        if update.draft is None:
            return
        draft = load_draft(update.draft)
        draft.check_fits(self.runner.engine.target)  # refused here, before the engine thread would
        self.engine_loop.swap_draft(draft, update.draft_version or update.draft)
        log.info("draft %s loaded; it decodes from the next time the engine is empty", update.draft)

    def _follow(self, update: DraftUpdate) -> None:
        """Follow ``update.draft_store`` (or stop following): a thread polls it every ``poll_s`` seconds and swaps
        each newly promoted version in (`DraftFollower`); a version that does not fit the target is refused by the
        engine loop (logged) and skipped."""
        from specvlm.draft_store import DraftFollower

        if self._following is not None:
            self._following.set()  # the old follower's thread ends at its next wake-up
            self._following = None
        if update.draft_store is None:
            return
        follower = DraftFollower(update.draft_store, update.poll_s, current=self.engine_loop.draft_version)
        stop = self._following = threading.Event()

        def follow() -> None:
            while not stop.is_set():
                if (newer := follower.poll()) is not None:  # one the target refuses: logged by the loop, skipped
                    self.engine_loop.swap_draft(*newer)
                    log.info("draft store %s: swapping in version %s", update.draft_store, newer[1])
                stop.wait(update.poll_s)

        threading.Thread(target=follow, name="specvlm-draft-follower", daemon=True).start()

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine thread has gone is restarted."""
        if not self._engine_thread.is_alive():
            raise RuntimeError("the engine thread is not running")

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        if getattr(self, "_following", None) is not None:
            self._following.set()
        loop = getattr(self, "engine_loop", None)
        if loop is not None:
            loop.stop()

    # ---------------------------------------------------------------- routes
    @fastapi_app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "draft_version": self.engine_loop.draft_version}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._auth(request)
        except OpenAIError as e:
            return _error(e)
        return models_list(self.model_name, self.created)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        t0 = time.perf_counter()
        stream, leave = False, None
        try:
            self._auth(request)
            leave = self.admission.enter()
            body = await read_body(request, self.cfg.limits)
            req = await self._in_prep(parse_chat_request, body, self.cfg.limits, self.model_name)
            stream = req.stream
            job = await self._prepare(req)
            rid, created = new_id(), now()
            if stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                events = self._sse(job, rid, created, include_usage, t0, leave)
                weakref.finalize(events, leave)  # also when the stream is dropped before it starts
                leave = None  # the stream leaves when it ends
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            return await self._complete(job, rid, created, t0)
        except OpenAIError as e:
            self.metrics.record(e.status, stream, t0)
            return _error(e)
        except Exception as e:  # a bug, reported as a 500; the replica goes on
            log.exception("chat request failed before decoding")
            self.metrics.record(500, stream, t0)
            return _error(OpenAIError(500, f"internal error: {type(e).__name__}", "server_error"))
        finally:
            if leave is not None:
                leave()

    # ---------------------------------------------------------------- helpers
    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise OpenAIError(401, "incorrect API key", code="invalid_api_key")

    async def _in_prep(self, fn, *args):
        """``fn(*args)`` on a prep thread: the event loop stays free, and a costly request takes one thread of
        ``prep_threads`` (the rest wait in the pool's queue, bounded by the admitted requests)."""
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    async def _prepare(self, req: ChatRequest) -> ChatJob:
        limits, fetch = self.cfg.limits, self.cfg.image_fetch
        images = [await image_bytes(url, fetch, limits.max_image_bytes, param) for param, url in req.image_urls()]
        return await self._in_prep(self.runner.prepare, req, images)

    async def _updates(self, job: ChatJob):
        """This request's updates from the engine loop until its last one; leaving early (client gone) ends its
        row at the next round, or drops it from the queue before it starts."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[RowUpdate] = asyncio.Queue()
        self.engine_loop.submit(job, lambda update: loop.call_soon_threadsafe(updates.put_nowait, update))
        try:
            while True:
                update = await next_update(updates)  # what came since the last read, as one update
                yield update
                if update.last:
                    return
        finally:
            job.cancelled = True  # no-op once finished

    async def _complete(self, job: ChatJob, rid: str, created: int, t0: float) -> JSONResponse:
        parts, last, ttft = [], None, None
        try:
            async for update in self._updates(job):
                if update.error:
                    self.metrics.record(500, False, t0)
                    return _error(OpenAIError(500, f"decoding failed: {update.error}", "server_error"))
                if ttft is None and update.text:
                    ttft = time.perf_counter() - t0
                parts.append(update.text)
                last = update
        except Exception as e:  # a bug in the batch plumbing: a 500, and the replica goes on
            log.exception("decoding failed")
            self.metrics.record(500, False, t0)
            return _error(OpenAIError(500, f"decoding failed: {type(e).__name__}", "server_error"))
        if last is None or not last.finish_reason:
            self.metrics.record(500, False, t0)
            return _error(OpenAIError(500, "decoding ended without a result", "server_error"))
        self.metrics.record(200, False, t0, last, ttft)
        body = completion(rid, created, self.model_name, "".join(parts), last.finish_reason, last.usage)
        return JSONResponse(body)

    async def _sse(self, job: ChatJob, rid: str, created: int, include_usage: bool, t0: float, leave):
        try:
            async for event in self._sse_events(job, rid, created, include_usage, t0):
                yield event
        finally:
            leave()

    async def _sse_events(self, job: ChatJob, rid: str, created: int, include_usage: bool, t0: float):
        name, last, ttft = self.model_name, None, None
        yield sse(chunk(rid, created, name, {"role": "assistant", "content": ""}))
        try:
            async for update in self._updates(job):
                if update.error:
                    raise RuntimeError(update.error)
                if update.text:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    yield sse(chunk(rid, created, name, {"content": update.text}))
                last = update
        except Exception as e:  # headers are sent: report it as an error event (as OpenAI does)
            log.exception("decoding failed")
            self.metrics.record(500, True, t0)
            yield sse(OpenAIError(500, f"decoding failed: {e}", "server_error").body())
            yield sse("[DONE]")
            return
        if last is not None and last.finish_reason:
            yield sse(chunk(rid, created, name, {}, last.finish_reason))
            if include_usage:
                yield sse(usage_chunk(rid, created, name, last.usage))
            self.metrics.record(200, True, t0, last, ttft)
        yield sse("[DONE]")


def application(cfg: ServeAppConfig):
    """The Serve application for a validated config: `SpecVLMServer` with its deployment options, bound to
    ``cfg`` itself (a frozen pydantic model; Serve pickles it into each replica)."""
    # the replicas' init argument leaves user_config out: a deploy that changes only it is then a lightweight
    # update (`reconfigure` on the running replicas), not a new version of the deployment
    init = cfg.model_copy(update={"deployment": cfg.deployment.model_copy(update={"user_config": None})})
    return SpecVLMServer.options(**cfg.deployment.options()).bind(init)


def build_app(args: dict):
    """Serve application builder (``import_path: actors.serving:build_app``): ``args``, the mapping a Serve
    config file holds, is validated once into a `ServeAppConfig` (errors name the field)."""
    from specvlm.config import parse_config

    return application(parse_config(dict(args or {}), ServeAppConfig, source="serve application args"))

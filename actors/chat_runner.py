"""`ChatRunner` and `EngineLoop`: chat requests -> engine rows -> per-round text updates. No Ray, no HTTP.

Legend: B batch rows, T prompt tokens, N images.

The Serve deployment (`actors.serving`) owns the threads; this module owns the
translation and the scheduling, so both are tested by calling them directly:

    ChatRunner.prepare(request, image_bytes) -> ChatJob   chat template + images -> one row's processor inputs,
                                                          prompt and context limits (OpenAIError 4xx)
    EngineLoop.submit(job, sink)                          queue a request; sink(RowUpdate) after every round
    EngineLoop.run()                                      the engine thread: admit, step, route, until stop()
    ChatRunner.run(jobs, post)                            decode jobs as one batch in this thread (tests, references)

`EngineLoop` drives the engine's stepping core (`SpecVLMEngine.add` / `step` /
`finish`): in ``continuous`` mode waiting requests join the running batch at
the next round, up to ``max_rows`` rows decoding at once; in ``static`` mode a
batch runs to its end before the next one starts. Each row decodes under its
own sampling settings (`ChatJob.sampling`); a seeded request's output does not
depend on its neighbours (the engine gives each row its own generator and
tree). Each row's `TextStream` turns its new tokens into text after every
round; a stop string, the row's own ``max_tokens`` or a client that went away
ends that row (`SpecVLMEngine.finish`), and it frees its place at the next
round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from specvlm.config import SamplingConfig
from specvlm.inputs import CONCAT_KEYS, collate, encode, pad_token_id
from specvlm.media import MediaError, MediaLimits, check_dimensions, decode_image, image_size

from .openai_protocol import ChatRequest, OpenAIError, TextStream, completion_tokens_budget, usage
from .serve_config import ServeLimits

log = logging.getLogger(__name__)


@dataclass
class RowUpdate:
    """What one request got from one round."""

    text: str = ""  # new text since the previous update
    finish_reason: str | None = None  # "stop" | "length" on the row's last update
    usage: dict | None = None  # on the last update: token counts + accept length
    stats: dict | None = None  # on the last update: the engine's RowStats.to_dict()
    error: str | None = None  # the engine failed on this row's batch (a server error, not the client's)


@dataclass
class ChatJob:
    """One prepared request: its processor inputs (batch of one) and how to turn its tokens into text."""

    inputs: dict  # input_ids [1, T], attention_mask [1, T], and what collate takes: pixel_values [N, ...],
    # image_sizes [N, 2] (LLaVA-NeXT); Qwen-VL: mm_token_type_ids [1, T], pixel_values [P, D], image_grid_thw [N, 3]
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    text: TextStream
    cancelled: bool = False  # set by the server when the client leaves; the row ends at the next round
    done: bool = field(default=False, init=False)

    def sampling(self) -> SamplingConfig:
        """The row's own decoding settings (rows with different settings share one engine batch)."""
        return SamplingConfig(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed)  # fmt: skip


Sink = Callable[[RowUpdate], None]  # where one request's updates go (called in the engine thread)
Post = Callable[[dict[int, RowUpdate]], None]  # `ChatRunner.run`: {batch index: update}
CANCELLED = "cancelled"  # the error of a row whose client went away
BatchingMode = Literal["continuous", "static"]


class ChatRunner:
    """Holds an engine and its processor; translates chat requests for it."""

    def __init__(self, engine, processor, limits: ServeLimits):
        self.engine, self.processor, self.limits = engine, processor, limits
        self.tokenizer = processor.tokenizer
        text_config = engine.target.text_config
        self.context = limits.max_context_tokens or int(getattr(text_config, "max_position_embeddings", 4096))
        self.pad_id = pad_token_id(self.tokenizer)
        self.media_limits = MediaLimits(
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
            max_aspect_ratio=limits.max_image_aspect_ratio,
        )
        self.image_processor = getattr(processor, "image_processor", None)

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ prepare
    def check_image_sizes(self, params: list[str], images: list[bytes]) -> None:
        """Refuse images from their headers, before any pixel is decoded (`OpenAIError` 400 ``image_too_large``):
        each image's pixels and aspect ratio (`check_dimensions`, the batch job's check too), its pixels after
        the processor's resize (`resized_pixels`), and those summed over the request."""
        limits, total = self.limits, 0
        for param, data in zip(params, images):
            size = image_size(data)
            if size is None:
                continue  # Pillow cannot open it: decode_image says why
            w, h = size
            try:
                check_dimensions(w, h, self.media_limits)
            except MediaError as e:
                raise _image_error(param, e) from None
            pixels = resized_pixels(w, h, self.image_processor)
            if pixels > limits.max_resized_image_pixels:
                raise OpenAIError(400, f"{param}: a {w}x{h} image is {pixels} pixels after the model's resize > "
                                  f"max_resized_image_pixels={limits.max_resized_image_pixels}", param=param,
                                  code="image_too_large")  # fmt: skip
            total += pixels
            if total > limits.max_request_pixels:
                raise OpenAIError(400, f"the images hold over {total} pixels after the model's resize > "
                                  f"max_request_pixels={limits.max_request_pixels}", param="messages",
                                  code="image_too_large")  # fmt: skip

    def prepare(self, req: ChatRequest, images: list[bytes]) -> ChatJob:
        """One request -> `ChatJob`; raises `OpenAIError` (400) for bad images or a prompt over the limits."""
        params = [p for p, _ in req.image_urls()]
        self.check_image_sizes(params, images)
        pil = []
        for param, data in zip(params, images):
            try:
                pil.append(decode_image(data, self.media_limits))
            except MediaError as e:
                raise _image_error(param, e) from None
        try:
            enc = encode(self.processor, [req.template_messages()], pil)
        except (ValueError, TypeError, KeyError) as e:  # e.g. a template that has no place for an image
            raise OpenAIError(400, f"cannot build the prompt: {e}", param="messages", code="invalid_prompt") from None
        prompt_tokens = int(enc["input_ids"].shape[1])
        max_tokens = completion_tokens_budget(req, prompt_tokens, self.limits, self.context)
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", *CONCAT_KEYS) if k in enc}
        stream = TextStream(self._decode_text, self.engine.target.eos_token_ids, max_tokens, req.stops)
        temperature = req.sampling_temperature()  # tiny temperatures decode greedily (MIN_TEMPERATURE)
        return ChatJob(inputs, prompt_tokens, max_tokens, temperature, req.top_p, req.top_k, req.seed, stream)

    # ------------------------------------------------------------------ run
    def run(self, jobs: list[ChatJob], post: Post) -> None:
        """Decode ``jobs`` as one batch in the calling thread (the engine must be idle), each row under its own
        sampling settings; ``post({batch index: RowUpdate})`` after every round. Every job gets exactly one last
        update (``finish_reason``, or ``error``: ``"cancelled"`` for a job whose client left). The same
        `EngineLoop` the replica runs, stepped here until the batch is done."""
        loop = EngineLoop(self.engine, self.pad_id, max(len(jobs), 1), mode="static")
        for i, job in enumerate(jobs):
            loop.submit(job, lambda update, i=i: post({i: update}))
        while loop.busy:
            loop.run_once()


def _image_error(param: str, e: MediaError) -> OpenAIError:
    code = "image_too_large" if e.kind == "too_large" else "invalid_image"
    return OpenAIError(400, f"{param}: {e}", param=param, code=code)


def resized_pixels(width: int, height: int, image_processor) -> int:
    """Pixels of one ``width x height`` image once the model's image processor has resized it (the largest
    array it builds, before any crop), from the processor's settings, without running it.

    - LLaVA (CLIP): the shorter side to ``size.shortest_edge``, the longer one in proportion (capped at
      ``size.longest_edge``), then a center crop: a 40000x1 image becomes 13.4M x 336 before the crop.
    - LLaVA-NeXT (``image_grid_pinpoints``): the image fitted into the best pinpoint resolution (padded to
      it) plus the whole image at ``shortest_edge`` squared.
    - Qwen-VL (``merge_size``, ``patch_size``): Qwen's smart resize, both sides rounded to multiples of
      ``patch_size * merge_size`` within ``size.shortest_edge`` .. ``size.longest_edge`` pixels (min/max pixels);
      an aspect ratio the processor refuses (over 200) counts as the source's own pixels (the prompt fails).
    - fixed ``height x width``, or fitted into ``max_height x max_width``.
    - no resize, or a processor none of these describe: the source's own pixels.
    """
    size = getattr(image_processor, "size", None)
    if image_processor is None or size is None or not getattr(image_processor, "do_resize", True):
        return width * height
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    short, long = sorted((width, height))
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if pinpoints:
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution((height, width), pinpoints)
        base = get("shortest_edge") or get("height") or 0
        return best_h * best_w + base * base
    merge, patch = getattr(image_processor, "merge_size", None), getattr(image_processor, "patch_size", None)
    if merge and patch and get("longest_edge") and get("shortest_edge"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        try:
            h, w = smart_resize(height, width, patch * merge, get("shortest_edge"), get("longest_edge"))
        except ValueError:  # aspect ratio over 200
            return width * height
        return h * w
    if get("shortest_edge"):
        new_short, new_long = get("shortest_edge"), get("shortest_edge") * long // short
        if get("longest_edge") and new_long > get("longest_edge"):
            new_short, new_long = get("longest_edge") * short // long, get("longest_edge")
        return max(new_short, 1) * max(new_long, 1)
    if get("height") and get("width"):
        return get("height") * get("width")
    if get("max_height") and get("max_width"):
        scale = min(get("max_height") / height, get("max_width") / width)
        return max(int(height * scale), 1) * max(int(width * scale), 1)
    return width * height


@dataclass
class _Request:
    job: ChatJob
    sink: Sink


class EngineLoop:
    """The replica's one engine loop: requests wait in one queue; one thread steps the engine.

    Each iteration (`run_once`) ends the rows of clients that left, admits waiting requests (a cancelled one
    gets its last update, ``error="cancelled"``, without decoding) while fewer than ``max_rows`` rows decode,
    adds them to the engine as one left-padded batch (`collate`, each row with its own `ChatJob.sampling`),
    runs one `SpecVLMEngine.step` (a round for the rows decoding, the prefill of the rows just added) and
    routes each row's new tokens to its request: a text delta per round, and a last update with
    ``finish_reason``, usage and the engine's stats. A row that ends early (a stop string, its own
    ``max_tokens``, its client gone) is finished in the engine and frees its place at the next round.

    ``mode``: ``continuous`` admits requests at every round (a short request that arrives while a long one
    decodes joins at the next round and may finish first); ``static`` admits only when no row decodes,
    so a batch runs to its end (`SpecVLMEngine.generate`'s behaviour), after an idle engine waited up to
    ``wait_s`` for the batch to fill. An exception in a step fails the rows it was decoding (an ``error``
    update each), resets the engine and the loop goes on. `run` blocks on a condition variable while
    nothing decodes or waits.

    ``on_round(rows)`` is called after each step with the rows it decoded or prefilled, ``on_depth(waiting,
    active)`` whenever the queue depth or the rows decoding change. Only the engine thread touches the
    engine; `submit` and `stop` may be called from any thread.
    """

    def __init__(self, engine, pad_id: int, max_rows: int, mode: BatchingMode = "continuous", wait_s: float = 0.0,
                 on_round: Callable[[int], None] | None = None,
                 on_depth: Callable[[int, int], None] | None = None):  # fmt: skip
        if max_rows < 1 or mode not in ("continuous", "static"):
            raise ValueError(f"max_rows must be >= 1 and mode continuous or static, got {max_rows}, {mode!r}")
        self.engine, self.pad_id, self.max_rows, self.mode, self.wait_s = engine, pad_id, max_rows, mode, wait_s
        self.on_round, self.on_depth = on_round, on_depth
        self._waiting: deque[_Request] = deque()
        self._rows: dict[int, _Request] = {}  # engine row id -> its request, while it decodes (engine thread)
        self._cond = threading.Condition()
        self._stopped = False
        self._depth = (0, 0)
        self.steps = 0  # engine steps run

    # ------------------------------------------------------------------ any thread
    @property
    def waiting(self) -> int:
        """Requests waiting for a place in the engine."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Rows decoding (their requests not finished yet)."""
        return len(self._rows)

    @property
    def busy(self) -> bool:
        """Anything waiting, decoding, or finished but not yet out of the engine (asks the engine: engine thread)."""
        return bool(self._waiting or self._rows or self.engine.num_rows)

    def submit(self, job: ChatJob, sink: Sink) -> None:
        """Queue a request; ``sink`` gets its updates (in the engine thread), the last one with ``finish_reason``
        or ``error``. Setting ``job.cancelled`` ends it at the next round (or before it starts)."""
        with self._cond:
            self._waiting.append(_Request(job, sink))
            self._cond.notify()
        self._report()

    def stop(self) -> None:
        """`run` returns after its current iteration."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ engine thread
    def run(self) -> None:
        """The engine thread: iterate until `stop`, blocking while nothing waits or decodes."""
        while self._wait_for_work():
            try:
                self.run_once()
            except Exception as e:  # a bug in the loop itself: fail what it holds, never the thread
                log.exception("engine loop iteration failed")
                self._fail_rows(f"{type(e).__name__}: {e}")

    def _wait_for_work(self) -> bool:
        with self._cond:
            idle = not self.busy
            while not self._stopped and not self.busy:
                self._cond.wait()
            if idle and self.mode == "static" and self.wait_s > 0:
                deadline = time.monotonic() + self.wait_s  # an idle engine's first request: let the batch fill
                while not self._stopped and len(self._waiting) < self.max_rows:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return not self._stopped

    def run_once(self) -> None:
        """One iteration: end cancelled rows, admit waiting requests, one engine step, route its tokens."""
        gone = [rid for rid, req in self._rows.items() if req.job.cancelled]
        if gone:
            self.engine.finish(gone)  # they leave at this step
            for rid in gone:
                self._last(self._rows.pop(rid), RowUpdate(error=CANCELLED))
        self._add(self._admit())
        if self.engine.num_rows:
            try:
                event = self.engine.step()
                self.steps += 1
                if self.on_round is not None and event.tokens:
                    self.on_round(len(event.tokens))
                self._route(event)
            except Exception as e:  # an engine failure fails its rows, never the replica
                log.exception("engine step failed with %d rows", len(self._rows))
                self._fail_rows(f"{type(e).__name__}: {e}")
        if self._rows and not self.engine.num_rows:  # (a bug: the engine reports every row)
            self._fail_rows("the engine stopped without finishing this row")
        self._report()

    def _admit(self) -> list[_Request]:
        """Waiting requests that get a place now (oldest first); cancelled ones are answered and dropped."""
        with self._cond:
            dropped = [r for r in self._waiting if r.job.cancelled]
            if dropped:
                self._waiting = deque(r for r in self._waiting if not r.job.cancelled)
            room = self.max_rows - len(self._rows) if self.mode == "continuous" or not self._rows else 0
            take = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        for req in dropped:
            self._last(req, RowUpdate(error=CANCELLED))
        return take

    def _add(self, reqs: list[_Request]) -> None:
        if not reqs:
            return
        jobs = [r.job for r in reqs]
        try:
            batch = collate([j.inputs for j in jobs], self.pad_id)
            rids = self.engine.add(**batch, sampling=[j.sampling() for j in jobs])
        except Exception as e:  # nothing was queued (add checks before it touches the running batch)
            log.exception("engine add failed for %d rows", len(reqs))
            for req in reqs:
                self._last(req, RowUpdate(error=f"{type(e).__name__}: {e}"))
            return
        self._rows.update(zip(rids, reqs))

    def _route(self, event) -> None:
        """Each row's new tokens -> its request's text delta; rows whose text ended are finished in the engine."""
        end = []
        for rid, toks in event.tokens.items():
            req = self._rows.get(rid)
            if req is None:  # finished by us already
                continue
            job = req.job
            if job.cancelled:
                end.append(rid)
                self._last(self._rows.pop(rid), RowUpdate(error=CANCELLED))
                continue
            delta = job.text.push(toks, rid in event.finished)
            if job.text.finish_reason is None:
                if delta:
                    self._post(req, RowUpdate(delta))
                continue
            if rid not in event.finished:  # a stop string or max_tokens: the engine would go on
                end.append(rid)
            stats = event.stats[rid]
            use = usage(job.prompt_tokens, len(job.text.tokens), stats)
            self._last(self._rows.pop(rid), RowUpdate(delta, job.text.finish_reason, use, stats))
        if end:
            self.engine.finish(end)

    def _fail_rows(self, error: str) -> None:
        """Every decoding row gets ``error`` as its last update; the engine drops them all."""
        rows, self._rows = list(self._rows.values()), {}
        try:
            self.engine.reset()
        except Exception:
            log.exception("engine reset failed")
        for req in rows:
            self._last(req, RowUpdate(error=error))

    def _last(self, req: _Request, update: RowUpdate) -> None:
        req.job.done = True
        self._post(req, update)

    def _post(self, req: _Request, update: RowUpdate) -> None:
        try:
            req.sink(update)
        except Exception:  # e.g. the replica's event loop has closed: nobody waits for this request
            log.exception("could not deliver an update")
            req.job.cancelled = True

    def _report(self) -> None:
        if self.on_depth is None:
            return
        with self._cond:
            depth = (len(self._waiting), len(self._rows))
            if depth != self._depth:
                self._depth = depth
                self.on_depth(*depth)

"""`Captioner`: the callable class the caption job's actor pool runs (``map_batches``).

Thin by design: it builds one engine per actor (`specvlm.loading.load_engine`)
and one `actors.engine_loop.EngineLoop` on its own thread over it, and turns a
batch of decoded rows into output rows. No media decoding lives here
(`pipelines.caption_io` does that in CPU tasks) and no decoding logic
(`specvlm.engine` does that).

Input columns (one Arrow table per batch, ``batch_format="pyarrow"``):

    id, uri, prompt     strings, echoed to the output
    pixels              raw RGB bytes (row-major, ``height * width * 3`` per frame), null on error
    width, height       int32, null on error
    frames, fps         null for an image; a video passed natively (Qwen-VL targets): the number of frames
                        in ``pixels`` and their frames per second (null: unknown)
    error               null, or ``"kind: message"`` from reading/decoding (the row passes through)

Output: `OUTPUT_SCHEMA` (DESIGN.md's caption contract), one row per input row, in the input's order.

Batching: ``__call__`` encodes its rows, submits them to the actor's engine
loop and blocks until every one of them has ended. In ``continuous`` mode the
loop admits rows at every round while fewer than ``max_rows`` decode, so when
Ray Data has two calls in flight on the actor (``max_concurrent_calls_per_actor``,
`pipelines.caption`) the next batch's rows take the places of the previous
batch's finished rows instead of waiting for its longest row; ``static`` mode
decodes one call's rows to their end before the next call's start (one
`SpecVLMEngine.generate` per batch, as before the loop). A greedy row's tokens
do not depend on its neighbours, so both modes give the same captions; a
seeded row is seeded `row_seed(seed, b)`, b its place among the batch's
encoded rows, as `generate(seed=)` seeds it.

Errors: a bad input is already a row with ``error`` set when it gets here, and an
input the processor refuses (ValueError, e.g. an aspect ratio the model cannot
take) becomes its row's ``decode`` error (rows are encoded one by one); an
exception raised while decoding (CUDA OOM, a bug) fails every row the engine held
(the loop resets the engine and goes on), and each call that had a row there
raises it (a `RuntimeError` chained to it), so Ray retries the batch or fails the
job. It is never turned into row errors (Ray Data LLM's rule).

Importing this module does not import torch; the engine's imports happen in
``__init__``, inside the actor.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from specvlm.config import EngineConfig, ModelConfig, SamplingConfig

    from .engine_loop import BatchingMode

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("prompt", pa.string()),
        ("caption", pa.string()),  # null on error
        ("error", pa.string()),  # null, or "kind: message"
        ("num_tokens", pa.int32()),  # generated tokens, EOS included when reached
        ("accept_length", pa.float64()),  # tokens per target forward (1.0 in ar mode)
        ("compressor", pa.string()),  # visual compressor primitive chosen for the row; "none" without one
        ("model", pa.string()),
        ("draft_version", pa.string()),
        ("latency_ms", pa.float64()),  # engine time spent while the row was being decoded
    ]
)


class Captioner:
    """Holds one engine and its loop thread; ``__call__`` captions a batch of decoded rows (from any number of
    threads at once: their rows share the engine).

    Args: the caption job's validated configs (frozen pydantic models; Ray pickles them into the actor).
        model: what to load.
        engine: how to decode.
        sampling: per-row decoding settings.
        batching: the loop's mode, ``continuous`` or ``static`` (`EngineLoop`).
        max_rows: rows decoding at once in the engine, at most (bounds its KV pools).
        online: online distillation (`pipelines.online_distill`): ``{"buffer": RowBuffer actor handle, "store":
            draft store root, "poll_s": seconds}``. Each finished row goes to the buffer (`BufferFeeder`: never
            waits), and each call first looks for a newly promoted draft (`DraftFollower`) and swaps it in.
    """

    def __init__(self, model: ModelConfig, engine: EngineConfig, sampling: SamplingConfig, *,
                 batching: BatchingMode, max_rows: int, online: dict | None = None):  # fmt: skip
        from specvlm.inputs import pad_token_id
        from specvlm.loading import load_engine

        from .engine_loop import EngineLoop

        t0 = time.perf_counter()
        self.engine, self.processor, info = load_engine(model, engine)
        self.sampling = sampling
        self.model_name = info["model"]
        self.mode = self.engine.config.mode
        self.pid = os.getpid()
        # calls run in several threads; a fast tokenizer used from two at once can raise "Already borrowed"
        self._processor_lock = threading.Lock()
        self.loop = EngineLoop(self.engine, pad_token_id(self.processor.tokenizer), max_rows, batching,
                               draft_version=info["draft_version"])  # fmt: skip
        self._thread = threading.Thread(target=self.loop.run, name="specvlm-engine", daemon=True)
        self._thread.start()
        self.feeder = self.follower = None
        if online is not None:
            from specvlm.draft_store import DraftFollower

            from .row_buffer import BufferFeeder

            self.feeder = BufferFeeder(online["buffer"])
            self.follower = DraftFollower(online["store"], online["poll_s"], current=info["draft_version"])
        self.load_s = time.perf_counter() - t0

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from specvlm.engine import row_seed
        from specvlm.inputs import encode, question_chat

        if self.follower is not None and (newer := self.follower.poll()) is not None:
            self.loop.swap_draft(*newer)  # between batches: the rows decoding finish with the old draft
        rows = batch.select(["id", "uri", "prompt", "pixels", "width", "height", "frames", "fps", "error"]).to_pylist()
        out = {name: [None] * len(rows) for name in OUTPUT_SCHEMA.names}
        for i, r in enumerate(rows):
            out["id"][i], out["uri"][i], out["prompt"][i], out["error"][i] = r["id"], r["uri"], r["prompt"], r["error"]
            out["model"][i], out["draft_version"][i] = self.model_name, self.loop.draft_version
        encoded = {}
        for i, r in enumerate(rows):
            if r["error"] is not None:
                continue
            frames = _frames(r)
            try:
                with self._processor_lock:
                    if r["frames"] is None:  # an image (or a tiled video)
                        encoded[i] = encode(self.processor, [question_chat(r["prompt"])], images=frames)
                    else:
                        encoded[i] = encode(self.processor, [question_chat(r["prompt"], 0, 1)], videos=[frames],
                                            video_fps=[r["fps"]])  # fmt: skip
            except ValueError as e:  # the processor refuses this input: its row's error, not the batch's
                out["error"][i] = f"decode: {type(e).__name__}: {e}"
        if not encoded:
            return pa.Table.from_pydict(out, schema=OUTPUT_SCHEMA)
        s = self.sampling
        jobs = {i: _CaptionJob(encoded[i], s if s.seed is None else s.model_copy(update={"seed": row_seed(s.seed, b)}))
                for b, i in enumerate(encoded)}  # fmt: skip
        call = _Call(list(jobs.values()))
        for job in jobs.values():
            self.loop.submit(job, call.sink)
        while not call.ended.wait(1.0):
            if not self._thread.is_alive():
                raise RuntimeError("the captioner's engine thread is not running")
        if (failed := call.failed) is not None:
            raise RuntimeError(f"the engine failed while decoding this batch: {failed.reason}") from failed.exc
        tok = self.processor.tokenizer
        for i, job in jobs.items():
            st = job.stats
            with self._processor_lock:
                out["caption"][i] = tok.decode(job.tokens, skip_special_tokens=True).strip()
            out["num_tokens"][i] = st["num_tokens"]
            out["accept_length"][i] = st["accept_length"]
            out["compressor"][i] = st.get("compressor") or "none"
            out["draft_version"][i] = st.get("draft_version")  # the draft that decoded this row
            out["latency_ms"][i] = st["prefill_ms"] + st["draft_ms"] + st["verify_ms"]
        if self.feeder is not None:  # the target's own outputs, as training rows (dropped if the buffer lags)
            self.feeder.offer([{"inputs": encoded[i], "response": job.tokens} for i, job in jobs.items()])
        return pa.Table.from_pydict(out, schema=OUTPUT_SCHEMA)


@dataclass
class _CaptionJob:
    """One encoded row of a call, as the engine loop decodes it (an `actors.engine_loop.Job`): it collects
    its tokens, and is its own last update."""

    inputs: dict  # `specvlm.inputs.encode` of one prompt: input_ids [1, T], attention_mask [1, T], media
    settings: SamplingConfig
    tokens: list[int] = field(default_factory=list)
    stats: dict | None = None  # the engine's RowStats.to_dict() once the row ended
    reason: str | None = None  # set when the row failed (or was cancelled after another row of its call failed)
    exc: BaseException | None = None
    cancelled: bool = False
    done: bool = False

    def sampling(self) -> SamplingConfig:
        return self.settings

    def push(self, tokens: list[int], finished: bool, stats: dict) -> tuple[_CaptionJob | None, bool]:
        self.tokens += tokens
        self.stats = stats
        return (self if finished else None), finished

    def fail(self, reason: str, exc: BaseException | None) -> _CaptionJob:
        self.reason, self.exc = reason, exc
        return self


class _Call:
    """The rows of one ``__call__``: `sink` (the engine thread) counts their last updates; the first failure
    cancels the rest, so the call raises once none of its rows is left in the loop."""

    def __init__(self, jobs: list[_CaptionJob]):
        self.jobs, self.left, self.failed = jobs, len(jobs), None
        self.ended = threading.Event()

    def sink(self, job: _CaptionJob) -> None:
        if job.reason is not None and self.failed is None:
            self.failed = job
            for other in self.jobs:
                other.cancelled = True
        self.left -= 1
        if not self.left:
            self.ended.set()


def _frames(row: dict) -> list:
    """A decoded row's RGB frames as PIL images: ``frames`` of them (a video), or one (an image)."""
    from PIL import Image

    size, n = (row["width"], row["height"]), row["frames"] or 1
    step = size[0] * size[1] * 3
    return [Image.frombytes("RGB", size, row["pixels"][k * step : (k + 1) * step]) for k in range(n)]

"""`EngineLoop`: one engine, one thread, one queue of rows; the scheduler Serve and the caption job share. No Ray.

Legend: B batch rows, T prompt tokens.

    EngineLoop.submit(job, sink)    queue one row (any thread); sink(update) when the job says so, and once last
    EngineLoop.run()                the engine thread: admit, step, route, until stop()
    EngineLoop.run_once()           one iteration, for callers that step the loop themselves (tests, batches)
    EngineLoop.swap_draft(d, name)  decode with draft d from the next time the engine is empty (any thread)

The loop drives the engine's stepping core (`SpecVLMEngine.add` / `step` /
`finish`) and knows nothing of what a row is for: a `Job` gives it its
processor inputs and its `SamplingConfig`, turns each round's tokens into an
update for its owner (`Job.push`, which also says when the row has ended,
e.g. at a stop string) and builds the last update of a row that fails or is
cancelled (`Job.fail`). `actors.chat_runner.ChatJob` turns tokens into text
deltas for a Serve request; `actors.captioner` collects a caption row's tokens
and wakes its call when the row ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from specvlm.config import SamplingConfig
from specvlm.inputs import collate

log = logging.getLogger(__name__)

BatchingMode = Literal["continuous", "static"]
CANCELLED = "cancelled"  # the reason `Job.fail` gets for a row whose owner set ``cancelled``
Sink = Callable[[Any], None]  # where one row's updates go (called in the engine thread)


class Job(Protocol):
    """What `EngineLoop` needs of one row. Its owner sets ``cancelled``; the loop sets ``done`` with the last
    update."""

    inputs: dict  # one row's processor inputs (batch of one): input_ids [1, T], attention_mask [1, T], and what
    # `collate` takes (pixel_values, image_sizes, Qwen-VL's mm_token_type_ids [1, T] and image_grid_thw, ...)
    cancelled: bool  # the row ends at the next round (or is dropped before it starts)
    done: bool

    def sampling(self) -> SamplingConfig:
        """The row's own decoding settings (rows with different settings share one engine batch)."""
        ...

    def push(self, tokens: list[int], finished: bool, stats: dict) -> tuple[Any, bool]:
        """One step's new tokens (``finished``: the engine ended the row: a stop id or its budget; ``stats``:
        `RowStats.to_dict()` so far) -> (the update to send, None for none before the last; whether the row ends
        now). A row the engine finished ends whatever this says; one that ends early is finished in the engine."""
        ...

    def fail(self, reason: str, exc: BaseException | None) -> Any:
        """The last update of a row that ends without its answer: ``reason`` is `CANCELLED`, or ``"<type>:
        <message>"`` of ``exc``, the exception that failed the engine step (or add) that held the row."""
        ...


@dataclass
class _Request:
    job: Job
    sink: Sink


class EngineLoop:
    """One engine loop: rows wait in one queue; one thread steps the engine.

    Each iteration (`run_once`) ends the rows whose owner cancelled them, admits waiting rows (a cancelled one
    gets its last update, ``Job.fail(CANCELLED)``, without decoding) while fewer than ``max_rows`` rows decode,
    adds them to the engine as one left-padded batch (`collate`, each row with its own `Job.sampling`), runs
    one `SpecVLMEngine.step` (the prefill of the rows just added, then a round for every row decoding) and
    routes each row's new tokens to its job (`Job.push`), sending the updates it returns to the row's sink:
    the new rows' first tokens as soon as their prefill is done, before the round. A row
    that ends early (a stop string, its owner gone) is finished in the engine and frees its place at the
    next round.

    ``mode``: ``continuous`` admits rows at every round (a short row that arrives while a long one decodes
    joins at the next round and may finish first); ``static`` admits only when no row decodes, so a batch
    runs to its end (`SpecVLMEngine.generate`'s behaviour), after an idle engine waited up to ``wait_s`` for
    the batch to fill. An exception in a step fails the rows it was decoding (``Job.fail`` with it, as each
    row's last update), resets the engine and the loop goes on. `run` blocks on a condition variable while
    nothing decodes or waits. ``max_rows`` bounds the rows in the engine, and so its KV pools.

    ``prefill_passes``: a step admits waiting rows before its prefill and, in continuous mode, again after
    each prefill up to this many prefills in all, so a request that arrived during a prefill is prefilled in
    the same step (its first token a round sooner) while the rows decoding wait for that prefill too.

    ``on_round(rows)`` is called after each step with the rows it decoded or prefilled, ``on_depth(waiting,
    active)`` whenever the queue depth or the rows decoding change. Only the engine thread touches the
    engine; `submit`, `swap_draft` and `stop` may be called from any thread.

    Drafts: ``draft_version`` names the draft decoding now; each row's stats (``Job.push``) carry the
    ``draft_version`` that decoded it. `swap_draft` holds new rows back while the rows decoding finish, then
    swaps (`SpecVLMEngine.set_draft`) and admits again, so no row mixes two drafts; a draft the engine
    refuses is logged and the old one stays.
    """

    def __init__(self, engine, pad_id: int, max_rows: int, mode: BatchingMode = "continuous", wait_s: float = 0.0,
                 on_round: Callable[[int], None] | None = None,
                 on_depth: Callable[[int, int], None] | None = None,
                 draft_version: str | None = None, prefill_passes: int = 2):  # fmt: skip
        if max_rows < 1 or mode not in ("continuous", "static") or prefill_passes < 1:
            raise ValueError(f"max_rows and prefill_passes must be >= 1 and mode continuous or static, got "
                             f"{max_rows}, {prefill_passes}, {mode!r}")  # fmt: skip
        self.prefill_passes = prefill_passes
        self.engine, self.pad_id, self.max_rows, self.mode, self.wait_s = engine, pad_id, max_rows, mode, wait_s
        self.on_round, self.on_depth = on_round, on_depth
        self._waiting: deque[_Request] = deque()
        self._rows: dict[int, _Request] = {}  # engine row id -> its request, while it decodes (engine thread)
        self._cond = threading.Condition()
        self._stopped = False
        self._depth = (0, 0)
        self.steps = 0  # engine steps started (updates posted during step k see k)
        self.draft_version = draft_version
        self._next_draft: tuple[Any, str] | None = None  # (draft, its name), swapped in once the engine is empty

    # ------------------------------------------------------------------ any thread
    @property
    def waiting(self) -> int:
        """Rows waiting for a place in the engine."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Rows decoding (their jobs not finished yet)."""
        return len(self._rows)

    @property
    def busy(self) -> bool:
        """Anything waiting, decoding, finished but not yet out of the engine (asks the engine: engine thread), or
        a draft to swap in."""
        return bool(self._waiting or self._rows or self.engine.num_rows or self._next_draft)

    def swap_draft(self, draft, version: str) -> None:
        """Decode with ``draft`` (named ``version`` in the rows' stats) once the rows decoding now have finished;
        rows waiting or submitted meanwhile are admitted after the swap. A later call replaces a pending one."""
        with self._cond:
            self._next_draft = (draft, version)
            self._cond.notify()

    def submit(self, job: Job, sink: Sink) -> None:
        """Queue a row; ``sink`` gets its updates (in the engine thread), the last one when the row ends, fails
        or is cancelled. Setting ``job.cancelled`` ends it at the next round (or before it starts)."""
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
                self._fail_rows(e)

    def _wait_for_work(self) -> bool:
        with self._cond:
            idle = not self.busy
            while not self._stopped and not self.busy:
                self._cond.wait()
            if idle and self.mode == "static" and self.wait_s > 0:
                deadline = time.monotonic() + self.wait_s  # an idle engine's first row: let the batch fill
                while not self._stopped and len(self._waiting) < self.max_rows:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return not self._stopped

    def run_once(self) -> None:
        """One iteration: end cancelled rows, admit waiting rows, one engine step, route its tokens."""
        gone = [rid for rid, req in self._rows.items() if req.job.cancelled]
        if gone:
            self.engine.finish(gone)  # they leave at this step
            for rid in gone:
                req = self._rows.pop(rid)
                self._last(req, req.job.fail(CANCELLED, None))
        self._add(self._admit())
        if self.engine.num_rows:
            try:
                self.steps += 1
                prefilled: set[int] = set()  # rows prefilled in this step
                passes = 1  # prefills in this step

                def first_tokens(event) -> None:  # they go out before the round
                    nonlocal passes
                    prefilled.update(event.tokens)
                    self._route(event)
                    if passes < self.prefill_passes:  # rows that came during that prefill join this step
                        passes += 1
                        self._add(self._admit())

                event = self.engine.step(on_prefill=first_tokens)
                rows = len(prefilled | event.tokens.keys())  # a row that ended at its first token counts too
                if self.on_round is not None and rows:
                    self.on_round(rows)
                self._route(event)
            except Exception as e:  # an engine failure fails its rows, never the loop
                log.exception("engine step failed with %d rows", len(self._rows))
                self._fail_rows(e)
        if self._rows and not self.engine.num_rows:  # (a bug: the engine reports every row)
            self._fail_rows(RuntimeError("the engine stopped without finishing this row"))
        self._report()

    def _swap(self) -> bool:
        """Swap in the pending draft if the engine is empty; whether rows may be admitted now."""
        with self._cond:
            pending = self._next_draft
        if pending is None:
            return True
        if self._rows or self.engine.num_rows:
            return False  # the rows decoding finish with the draft they started with
        with self._cond:
            self._next_draft = None
        draft, version = pending
        try:
            self.engine.set_draft(draft)
            self.draft_version = version
            log.info("now decoding with draft %s", version)
        except Exception:
            log.exception("draft %s refused; still decoding with %s", version, self.draft_version)
        return True

    def _admit(self) -> list[_Request]:
        """Waiting rows that get a place now (oldest first); cancelled ones are answered and dropped."""
        swapped = self._swap()
        with self._cond:
            dropped = [r for r in self._waiting if r.job.cancelled]
            if dropped:
                self._waiting = deque(r for r in self._waiting if not r.job.cancelled)
            room = self.max_rows - len(self._rows) if self.mode == "continuous" or not self._rows else 0
            room = room if swapped else 0
            take = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        for req in dropped:
            self._last(req, req.job.fail(CANCELLED, None))
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
                self._last(req, req.job.fail(_reason(e), e))
            return
        self._rows.update(zip(rids, reqs))

    def _route(self, event) -> None:
        """Each row's new tokens -> its job's update; rows that ended early are finished in the engine."""
        end = []
        for rid, toks in event.tokens.items():
            req = self._rows.get(rid)
            if req is None:  # finished by us already
                continue
            if req.job.cancelled:
                end.append(rid)
                self._last(self._rows.pop(rid), req.job.fail(CANCELLED, None))
                continue
            finished = rid in event.finished
            stats = event.stats[rid]  # the engine builds these dicts afresh each step
            stats["draft_version"] = self.draft_version  # the draft that decoded the row (swaps wait for empty)
            update, ended = req.job.push(toks, finished, stats)
            if not (ended or finished):
                if update is not None:
                    self._post(req, update)
                continue
            if not finished:  # e.g. a stop string: the engine would go on
                end.append(rid)
            self._last(self._rows.pop(rid), update)
        if end:
            self.engine.finish(end)

    def _fail_rows(self, exc: BaseException) -> None:
        """Every decoding row gets ``Job.fail`` with ``exc`` as its last update; the engine drops them all."""
        rows, self._rows = list(self._rows.values()), {}
        try:
            self.engine.reset()
        except Exception:
            log.exception("engine reset failed")
        for req in rows:
            self._last(req, req.job.fail(_reason(exc), exc))

    def _last(self, req: _Request, update) -> None:
        req.job.done = True
        self._post(req, update)

    def _post(self, req: _Request, update) -> None:
        try:
            req.sink(update)
        except Exception:  # e.g. the replica's event loop has closed: nobody waits for this row
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


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

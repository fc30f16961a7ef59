"""The bounded hand-over between caption actors and the online trainer (`pipelines.online_distill`).

    Captioner ──BufferFeeder.offer(rows)──▶ RowBuffer (a Ray actor) ──take(n)──▶ trainer workers
                 never waits                 bounded; full: oldest dropped     held_out(): first rows, never trained

A row is what an actor already has once it has decoded it: ``{"inputs": the processor outputs of its prompt
(`specvlm.inputs.encode`, batch of one), "response": the target's token ids (EOS included where it ended the
row)}``. Nothing is read or processed again on the trainer side, and the target's greedy output is the
distillation label (`response_source: target` without generating it twice).

Rows are dropped from training, never from the output: `BufferFeeder.offer` returns at once whatever the
buffer does (at most ``max_in_flight`` puts outstanding, the rest dropped and counted), and a full buffer drops
its oldest rows. The first ``held_out_rows`` rows it receives are kept aside for the trainer's held-out accept
length and never handed out for training. Once the trainer has stopped for good (converged, ``max_steps``) it
`retire`s the buffer: puts return False from then on, and each feeder stops sending rows when it sees that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

log = logging.getLogger(__name__)


class RowBuffer:
    """Run as ``ray.remote(num_cpus=0, max_concurrency=...)(RowBuffer)``: several callers at once (puts from the
    actors, a blocking `take` per trainer worker) on the actor's threads."""

    def __init__(self, capacity: int, held_out_rows: int):
        import torch  # noqa: F401  rows hold tensors: importing torch at the first put would hold it up for seconds

        self.capacity, self.held_out_rows = capacity, held_out_rows
        self._rows: deque = deque()
        self._held_out: list = []
        self._cond = threading.Condition()
        self._closed = False
        self._retired = False
        self.counts = {"received": 0, "dropped_full": 0, "dropped_at_actors": 0, "to_trainer": 0}
        self.trainer: dict = {}  # the trainer's own progress (`report`), for the job's summary

    def put(self, rows: list[dict], dropped_before: int = 0) -> bool:
        """Add finished rows (a full buffer drops its oldest); ``dropped_before``: rows the caller's feeder
        dropped since its last put (counted here so the job's summary sees them). Returns False, taking nothing,
        once the buffer is retired."""
        with self._cond:
            if self._retired:
                return False
            self.counts["received"] += len(rows)
            self.counts["dropped_at_actors"] += dropped_before
            for row in rows:
                if len(self._held_out) < self.held_out_rows:
                    self._held_out.append(row)
                    continue
                if len(self._rows) >= self.capacity:
                    self._rows.popleft()
                    self.counts["dropped_full"] += 1
                self._rows.append(row)
            self._cond.notify_all()
            return True

    def take(self, n: int, timeout_s: float = 1.0) -> tuple[list[dict], bool]:
        """Up to ``n`` training rows, waiting up to ``timeout_s`` for ``n`` to be there; returns ``(rows,
        closed)``: ``closed`` once `close` was called (rows may still come with it, the last ones)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._rows) < n and not self._closed and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            rows = [self._rows.popleft() for _ in range(min(n, len(self._rows)))]
            self.counts["to_trainer"] += len(rows)
            return rows, self._closed

    def held_out(self) -> list[dict]:
        """The rows kept aside (the first ``held_out_rows`` received; fewer while the job is young)."""
        with self._cond:
            return list(self._held_out)

    def close(self) -> None:
        """No more rows will come (the caption job has written its output): `take` returns at once from now."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def retire(self) -> None:
        """The trainer has stopped for good: drop the buffered rows and take no more (puts return False)."""
        with self._cond:
            self._retired = True
            self._rows.clear()

    def report(self, progress: dict) -> None:
        """The trainer's progress (steps, its starting draft's held-out accept length), kept for `stats`."""
        with self._cond:
            self.trainer = dict(progress)

    def stats(self) -> dict:
        """Counts so far: rows received, dropped (buffer full / at the actors), handed to the trainer (the last
        few may come after its last step), held out, buffered now; and ``trainer``, its last `report`."""
        with self._cond:
            return {**self.counts, "held_out": len(self._held_out), "buffered": len(self._rows),
                    "trainer": dict(self.trainer)}  # fmt: skip


class BufferFeeder:
    """The actor side of a `RowBuffer`: `offer` never waits for it. At most ``max_in_flight`` puts are
    outstanding; rows offered beyond that are dropped (and reported with the next put). Once a put comes back
    False (the trainer has stopped for good) it sends nothing more (``retired``)."""

    def __init__(self, buffer, max_in_flight: int = 8):
        self.buffer, self.max_in_flight = buffer, max_in_flight
        self._in_flight: list = []
        self._lock = threading.Lock()  # an actor runs two calls at once (continuous batching): both offer
        self.dropped = 0  # not yet reported to the buffer
        self.dropped_total = 0
        self.retired = False

    def offer(self, rows: list[dict]) -> bool:
        """Hand ``rows`` to the buffer if fewer than ``max_in_flight`` puts are outstanding; returns whether
        they went (False: dropped from training, or the buffer is retired). Thread-safe; never raises (a buffer
        that is gone or fails only loses training rows)."""
        if not rows:
            return True
        if self.retired:
            return False
        with self._lock:
            try:
                return self._offer(rows)
            except Exception:
                log.exception("online distillation: rows could not reach the buffer (dropped from training)")
                self.dropped += len(rows)
                self.dropped_total += len(rows)
                return False

    def _offer(self, rows: list[dict]) -> bool:
        import ray

        if self._in_flight:  # forget the puts that have finished (or failed: the buffer is gone; rows lost)
            done, self._in_flight = ray.wait(self._in_flight, num_returns=len(self._in_flight), timeout=0)
            if any(_returned_false(ref) for ref in done):
                self.retired, self._in_flight = True, []
                return False
        if len(self._in_flight) >= self.max_in_flight:
            self.dropped += len(rows)
            self.dropped_total += len(rows)
            return False
        self._in_flight.append(self.buffer.put.remote(rows, self.dropped))
        self.dropped = 0
        return True


def _returned_false(ref) -> bool:
    """Whether a finished `RowBuffer.put` returned False (retired); a failed one (the buffer is gone) did not."""
    import ray

    try:
        return ray.get(ref) is False
    except ray.exceptions.RayError:
        return False

"""Batch-aware speculation: which tree a round uses for the rows decoding now, down to none.

A speculative round costs a draft pass plus a target forward over every tree
node of every row; a plain decoding step costs one target forward over one
token per row. At a small batch the target forward is bound by reading the
weights, so verifying K nodes costs about what verifying one does and the
round's accepted tokens come almost free; as the batch grows the forward
turns compute-bound, verifying K nodes per row costs up to K times a step,
and speculation stops paying (vLLM and SGLang pick their speculation depth
per batch size for the same reason).

Two policies, one interface (`tree_for(rows)`, `trees()`, `observe(...)`):

* `TablePolicy`: `EngineConfig.batch_trees` as written, ``{rows: tree | "off"}``.
* `AutoPolicy` (``batch_trees: auto``): step costs measured at start-up
  (`SpecVLMEngine.calibrate`: speculative rounds and plain steps at each of
  `EngineConfig.auto_rows` live rows, on synthetic text prompts); a round
  speculates while its cost per expected token beats a plain step's, the
  expected tokens per round being the accept length measured on the
  engine's own rounds (`EngineConfig.auto_accept_length` before any).
  Between measured sizes the largest one not above the rows decides.

Outputs never depend on the policy: every tree (and no tree) is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import EngineConfig, TreeConfig


@dataclass(frozen=True)
class StepCost:
    """Measured wall time of one engine step at ``rows`` live rows."""

    rows: int
    ar_ms: float  # a plain decoding step (one token per row)
    spec_ms: float  # a speculative round: propose, verify, accept, commit, catch-up


class TablePolicy:
    """`EngineConfig.tree` below the smallest `batch_trees` key, then the table's entries."""

    def __init__(self, config: EngineConfig):
        self.config = config

    def tree_for(self, rows: int) -> TreeConfig | None:
        return self.config.tree_for(rows)

    def trees(self) -> list[TreeConfig]:
        return self.config.trees()

    def observe(self, rows: int, ms: float, accepted: list[int] | None) -> None:
        """A fixed table learns nothing."""

    def describe(self) -> dict:
        table = self.config.batch_trees or {}
        return {"policy": "table", "table": {k: ("off" if v == "off" else v.model_dump()) for k, v in table.items()}}


class AutoPolicy:
    """Speculate at ``rows`` live rows while ``spec_ms / accept_length < ar_ms`` at the largest measured size
    not above ``rows`` (below the smallest: the smallest's decision).

    What it learns from the engine's own rounds (`observe`):

    * the accept length: a running mean of every speculative round's tokens per row (the prior counts as one
      round, then an exponential average of weight ``smoothing``); it does not depend on the batch size, since
      each row's tree and acceptance are its own;
    * the step costs, where a round ran at exactly a measured size (an exponential average of the same
      weight): start-up timed synthetic prompts, real traffic keeps the table true;
    * while a size runs without speculation, every ``explore``-th round there speculates anyway, so a draft
      that got better (or a prior that was too low) is noticed.

    Args:
        tree: the tree every speculative round uses.
        costs: `StepCost` per measured size (`SpecVLMEngine.calibrate`).
        accept_length: the expected tokens per round before any round was observed.
        smoothing: weight of the newest round in the running averages.
        explore: a speculative round every this many plain ones.
    """

    def __init__(self, tree: TreeConfig, costs: list[StepCost], accept_length: float, smoothing: float = 0.05,
                 explore: int = 32):  # fmt: skip
        if not costs:
            raise ValueError("AutoPolicy needs at least one measured step cost")
        self.tree = tree
        self.costs = {c.rows: c for c in sorted(costs, key=lambda c: c.rows)}
        self.accept_length = accept_length
        self.smoothing, self.explore = smoothing, explore
        self.rounds = 0  # speculative rounds observed
        self._plain = 0  # plain rounds since the last speculative one

    def _cost(self, rows: int) -> StepCost:
        sizes = list(self.costs)
        return self.costs[max((s for s in sizes if s <= rows), default=sizes[0])]

    def speculates(self, rows: int) -> bool:
        """Whether speculation pays at ``rows`` live rows by the current estimates."""
        c = self._cost(rows)
        return c.spec_ms / self.accept_length < c.ar_ms

    def tree_for(self, rows: int) -> TreeConfig | None:
        if self.speculates(rows) or self._plain + 1 >= self.explore:
            self._plain = 0
            return self.tree
        self._plain += 1
        return None

    def trees(self) -> list[TreeConfig]:
        return [self.tree]

    def observe(self, rows: int, ms: float, accepted: list[int] | None) -> None:
        """One round at ``rows`` live rows took ``ms``; ``accepted``: each row's tokens from a speculative
        round (accepted path + bonus), None for a plain step."""
        w = self.smoothing
        if accepted:
            mean = sum(accepted) / len(accepted)
            self.accept_length += max(w, 1 / (self.rounds + 2)) * (mean - self.accept_length)
            self.rounds += 1
        c = self.costs.get(rows)
        if c is not None:
            if accepted is None:
                self.costs[rows] = StepCost(rows, c.ar_ms + w * (ms - c.ar_ms), c.spec_ms)
            else:
                self.costs[rows] = StepCost(rows, c.ar_ms, c.spec_ms + w * (ms - c.spec_ms))

    def crossover(self) -> int | None:
        """The smallest measured size from which rounds run without speculation (None: speculation pays at
        every measured size)."""
        return next((r for r in self.costs if not self.speculates(r)), None)

    def describe(self) -> dict:
        return {
            "policy": "auto",
            "accept_length": round(self.accept_length, 3),
            "crossover": self.crossover(),
            "costs": [
                {"rows": c.rows, "ar_ms": round(c.ar_ms, 3), "spec_ms": round(c.spec_ms, 3)}
                for c in self.costs.values()
            ],  # fmt: skip
        }

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
  engine's own rounds (`EngineConfig.auto_accept_length` before any), and
  the costs corrected by what the engine's own rounds take.

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


class AutoPolicy:
    """Speculate at ``rows`` live rows while ``spec_ms(rows) / accept_length < ar_ms(rows)``.

    The costs are the start-up measurements (`SpecVLMEngine.calibrate`, made non-decreasing in the rows),
    linear between measured sizes (below the smallest: the smallest's; beyond the largest: its last segment
    extended), each scaled by what the engine's own rounds show: synthetic prompts give full trees where
    real traffic, which the draft predicts better, gives smaller bounded ones, so every measured round moves
    a running ratio of measured to calibrated cost for its kind (speculative or plain) at its rows.

    The accept length is the tokens per row-round of the speculative rounds so far, pooled (each round
    weighs by its rows, as `engine.pooled_accept_length` does) with a decay of ``smoothing`` per round; the
    prior counts as one row-round. It does not depend on the batch size: each row's tree is its own.

    A decision flips only when the other side wins by more than ``margin`` (switching costs the draft a
    catch-up forward), and while a size runs without speculation every ``explore``-th round there speculates
    anyway, so a better draft (or a prior that was too low) is noticed.

    Args:
        tree: the tree every speculative round uses.
        costs: `StepCost` per measured size.
        accept_length: the expected tokens per round before any round was observed.
        smoothing: weight of the newest round in the running estimates.
        margin: the relative win that flips a decision.
        explore: a speculative round every this many plain ones.
    """

    def __init__(self, tree: TreeConfig, costs: list[StepCost], accept_length: float, smoothing: float = 0.05,
                 margin: float = 0.05, explore: int = 32):  # fmt: skip
        if not costs:
            raise ValueError("AutoPolicy needs at least one measured step cost")
        self.tree = tree
        # a step over more rows never costs less: a timing below a smaller size's is noise, raised to it
        self.costs, ar, spec = [], 0.0, 0.0
        for c in sorted(costs, key=lambda c: c.rows):
            ar, spec = max(ar, c.ar_ms), max(spec, c.spec_ms)
            self.costs.append(StepCost(c.rows, ar, spec))
        self.smoothing, self.margin, self.explore = smoothing, margin, explore
        self._tokens, self._row_rounds = accept_length, 1.0  # decayed sums behind accept_length
        self.scale = {"spec": 1.0, "ar": 1.0}  # measured / calibrated cost, running
        self.rounds = 0  # speculative rounds observed
        self._on = True  # the last decision
        self._plain = 0  # plain rounds since the last speculative one

    @property
    def accept_length(self) -> float:
        return self._tokens / self._row_rounds

    def calibrated(self, rows: int) -> tuple[float, float]:
        """``(ar_ms, spec_ms)`` at ``rows`` live rows from the start-up table alone."""
        c = self.costs
        if rows <= c[0].rows or len(c) == 1:
            return c[0].ar_ms, c[0].spec_ms
        lo, hi = next(((a, b) for a, b in zip(c, c[1:]) if rows <= b.rows), (c[-2], c[-1]))
        t = (rows - lo.rows) / (hi.rows - lo.rows)
        return lo.ar_ms + t * (hi.ar_ms - lo.ar_ms), lo.spec_ms + t * (hi.spec_ms - lo.spec_ms)

    def _per_token(self, rows: int) -> tuple[float, float]:
        ar, spec = self.calibrated(rows)
        return ar * self.scale["ar"], spec * self.scale["spec"] / self.accept_length

    def speculates(self, rows: int) -> bool:
        """Whether speculation pays at ``rows`` live rows by the current estimates (with the flip margin)."""
        ar, spec = self._per_token(rows)
        return spec < ar * (1 + self.margin) if self._on else spec * (1 + self.margin) < ar

    def tree_for(self, rows: int) -> TreeConfig | None:
        self._on = self.speculates(rows)
        if self._on or self._plain + 1 >= self.explore:
            self._plain = 0
            return self.tree
        self._plain += 1
        return None

    def trees(self) -> list[TreeConfig]:
        return [self.tree]

    def observe(self, rows: int, ms: float, accepted: list[int] | None) -> None:
        """One round at ``rows`` live rows took ``ms``; ``accepted``: each row's tokens from a speculative
        round (accepted path + bonus), None for a plain step."""
        keep = 1 - self.smoothing
        if accepted:
            self._tokens = keep * self._tokens + sum(accepted)
            self._row_rounds = keep * self._row_rounds + len(accepted)
            self.rounds += 1
        kind = "ar" if accepted is None else "spec"
        base = self.calibrated(rows)[0 if accepted is None else 1]
        if base > 0:
            self.scale[kind] += self.smoothing * (ms / base - self.scale[kind])

    def crossover(self) -> int | None:
        """The smallest measured size from which plain decoding is cheaper per token by the current estimates
        (None: speculation pays at every measured size)."""
        return next((c.rows for c in self.costs if self._per_token(c.rows)[1] >= self._per_token(c.rows)[0]), None)

    def describe(self) -> dict:
        return {
            "policy": "auto",
            "accept_length": round(self.accept_length, 3),
            "crossover": self.crossover(),
            "scale": {k: round(v, 3) for k, v in self.scale.items()},
            "costs": [{"rows": c.rows, "ar_ms": round(c.ar_ms, 3), "spec_ms": round(c.spec_ms, 3)} for c in self.costs],
        }

"""User-facing configuration: pydantic models validated once at the boundary.

Everything a user sets in YAML, on the CLI or over HTTP lands here first;
the engine reads plain attributes afterwards. Unknown fields are errors, so a
typo in a YAML file is reported, not ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .tree import max_candidates


class StrictModel(BaseModel):
    """Base of every config a user writes (here, and in the serve/caption/distill jobs): an unknown key is an
    error that names it, so a typo never passes silently; values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TreeConfig(StrictModel):
    """EAGLE-2 dynamic tree. Defaults are the SpecVLM paper's (top-k 10, 60 tokens, depth 7).

    On CPU the target's cost grows with the tree, so a narrow, deep tree with
    confidence bounds (``depth_min_prob``, ``node_min_prob``; `tree.py`) that
    cut the draft forwards and verified nodes of unsure rounds wins there:
    `CPU_TREE`. On a GPU, which verifies a whole tree for about one token's
    cost, the paper's sizes do. In YAML a tree is a mapping of these fields or
    the name of a preset in `TREE_PRESETS` (``tree: cpu``).
    """

    top_k: int = Field(10, ge=1, description="children kept per expanded node")
    total_tokens: int = Field(60, ge=2, description="tree nodes verified per round, root included")
    depth: int = Field(7, ge=1, description="tree levels below the root (draft forwards per round)")
    depth_min_prob: float = Field(
        0.0, ge=0, lt=1,
        description="stop growing the tree early once no frontier node's draft path probability reaches this "
        "(0: always grow `depth` levels)",
    )  # fmt: skip
    node_min_prob: float = Field(
        0.0, ge=0, lt=1,
        description="verify only tree nodes whose draft path probability reaches this, up to `total_tokens` "
        "(0: always `total_tokens`)",
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        if isinstance(data, str):
            if data not in TREE_PRESETS:
                raise ValueError(f"unknown tree preset {data!r}; one of {sorted(TREE_PRESETS)} or a mapping of fields")
            return TREE_PRESETS[data].model_dump()
        return data

    @model_validator(mode="after")
    def _enough_candidates(self):
        most = max_candidates(self.top_k, self.depth) + 1
        if self.total_tokens > most:
            raise ValueError(
                f"total_tokens={self.total_tokens} exceeds the {most} nodes that top_k={self.top_k}, "
                f"depth={self.depth} can produce; lower total_tokens or raise top_k/depth"
            )
        return self


# The named trees: ``cpu`` is deep and narrow with confidence bounds, for CPUs, where every verified node and
# draft step costs a share of a target forward (README, Benchmarks, compares trees on the demo model);
# ``cpu-deep`` the same with room for longer sure runs (depth 12, 18 nodes): it pays where outputs are long and
# predictable (video captions) and costs draft steps on short answers; ``paper`` is the SpecVLM paper's GPU
# tree (the `TreeConfig` defaults).
TREE_PRESETS: dict[str, TreeConfig] = {
    "cpu": TreeConfig(top_k=2, total_tokens=14, depth=8, depth_min_prob=0.2, node_min_prob=0.05),
    "cpu-deep": TreeConfig(top_k=2, total_tokens=18, depth=12, depth_min_prob=0.2, node_min_prob=0.05),
    "paper": TreeConfig(),
}
CPU_TREE = TREE_PRESETS["cpu"]


class SamplingConfig(StrictModel):
    """Per-request decoding settings (HF generate's meaning for each)."""

    max_new_tokens: int = Field(128, ge=1, description="tokens generated at most per row, EOS included")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1 = off)")
    top_k: int = Field(0, ge=0, description="0 = off")
    seed: int | None = Field(None, description="makes sampling reproducible; None = unseeded")
    stop_token_ids: tuple[int, ...] = Field((), description="token ids that end a row besides the model's EOS")


class PrimitiveConfig(StrictModel):
    """One visual compressor primitive (see `specvlm.compressor`).

    kind: ``pool`` (2D average pooling), ``conv`` (strided convolution), ``prune``
    (keep 1/ratio of the patches: a learned scorer, or ``learned: false`` for a
    seeded random subset), ``resampler`` (cross-attention over ``queries``
    learned queries), ``text`` (drop the visual span), ``none`` (keep it).
    """

    kind: Literal["none", "prune", "pool", "conv", "resampler", "text"]
    ratio: int = Field(4, ge=1, description="pool / conv / prune: patches per output token")
    queries: int = Field(2, ge=1, description="resampler: learned queries (output tokens) per image segment")
    learned: bool = Field(True, description="prune: learned scorer (True) or random subset (False)")

    @classmethod
    def from_name(cls, name: str) -> PrimitiveConfig:
        """The inverse of `name`: ``pool4`` -> kind pool, ratio 4; ``resampler2`` -> 2 queries; ``text``."""
        m = re.fullmatch(r"(random_)?(none|text|prune|pool|conv|resampler)(\d*)", name)
        if m is None or bool(m[3]) == (m[2] in ("none", "text")) or (m[1] and m[2] != "prune"):
            raise ValueError(f"not a primitive name: {name!r} (e.g. pool4, conv16, prune4, random_prune4, "
                             "resampler2, text, none)")  # fmt: skip
        if m[2] in ("none", "text"):
            return cls(kind=m[2])
        if m[2] == "resampler":
            return cls(kind="resampler", queries=int(m[3]))
        return cls(kind=m[2], ratio=int(m[3]), learned=not m[1])

    @property
    def name(self) -> str:
        """Short label used in stats and tables: ``pool4``, ``resampler2``, ``text``, ``random_prune4``."""
        if self.kind in ("none", "text"):
            return self.kind
        if self.kind == "resampler":
            return f"resampler{self.queries}"
        prefix = "random_" if self.kind == "prune" and not self.learned else ""
        return f"{prefix}{self.kind}{self.ratio}"


def _default_primitives() -> tuple[PrimitiveConfig, ...]:
    return (
        PrimitiveConfig(kind="pool", ratio=4), PrimitiveConfig(kind="pool", ratio=16),
        PrimitiveConfig(kind="conv", ratio=4), PrimitiveConfig(kind="prune", ratio=4),
        PrimitiveConfig(kind="resampler", queries=2), PrimitiveConfig(kind="text"),
    )  # fmt: skip


class CompressorConfig(StrictModel):
    """The elastic visual compressor the ``specvlm`` draft reads its visual span through.

    mode: ``select`` (the paper's default: a question-conditioned gate picks one
    primitive per input; argmax at inference; in training each input runs
    under every primitive and the losses are weighted by a Gumbel-softmax of
    the gate, so training costs K draft forwards per row), ``weight``
    (gate-weighted sum of the primitives' outputs; they must give equal
    lengths, so no ``text``) or ``concat`` (the weighted outputs side by side).
    cost_weight: beyond the paper (``select`` only), adds ``cost_weight *
    E_gate[visual tokens kept / P]`` to the training loss so the gate prefers
    cheaper primitives where they lose nothing.
    """

    mode: Literal["select", "weight", "concat"] = "select"
    primitives: tuple[PrimitiveConfig, ...] = Field(default_factory=_default_primitives, min_length=1)
    gate_hidden: int = Field(64, ge=1, description="width of the gate's hidden layer")
    tau: float = Field(1.0, gt=0, description="Gumbel-softmax temperature (training)")
    cost_weight: float = Field(0.0, ge=0, description="weight of the expected-visual-tokens cost term")

    @model_validator(mode="after")
    def _checks(self):
        names = [p.name for p in self.primitives]
        if len(set(names)) != len(names):
            raise ValueError(f"primitives must be distinct, got {names}")
        if self.mode == "weight" and any(p.kind == "text" for p in self.primitives):
            raise ValueError("mode 'weight' sums equal-length outputs; 'text' (no tokens) cannot take part")
        if self.cost_weight > 0 and self.mode != "select":
            raise ValueError(f"cost_weight applies to mode 'select' (one primitive per input), not {self.mode!r}")
        return self


class EngineConfig(StrictModel):
    """How `SpecVLMEngine` decodes.

    mode: ``ar`` (target alone, the engine's own loop), ``eagle`` (draft +
    tree, no visual compression) or ``specvlm`` (elastic visual compressor).
    """

    mode: Literal["ar", "eagle", "specvlm"] = Field("eagle", description="ar | eagle | specvlm")
    tree: TreeConfig = Field(
        TreeConfig(), description="the draft tree: fields, or a preset name (cpu, paper); unused in mode ar"
    )
    batch_trees: dict[int, TreeConfig | Literal["off"]] | Literal["auto"] | None = Field(
        None,
        description="batch-aware speculation: live rows -> the tree a round uses from that many rows on (the "
        "largest key not above the rows; `tree` below the smallest), or 'off' for plain decoding (the draft "
        "only follows along); e.g. {1: paper, 4: cpu, 16: off}. 'auto': `tree` while it pays, else plain "
        "decoding, from step costs timed at start-up (specvlm.policy). Outputs never depend on it",
    )  # fmt: skip
    auto_rows: tuple[int, ...] = Field(
        (1, 2, 4, 8, 16, 32), min_length=1,
        description="batch_trees auto: the live-row counts whose step costs are timed at start-up",
    )  # fmt: skip
    auto_accept_length: float = Field(
        3.0, ge=1.0, description="batch_trees auto: tokens per round expected before any round was measured"
    )

    @model_validator(mode="after")
    def _batch_trees(self):
        if isinstance(self.batch_trees, dict) and any(k < 1 for k in self.batch_trees):
            raise ValueError(f"batch_trees keys are live-row counts >= 1, got {sorted(self.batch_trees)}")
        if any(r < 1 for r in self.auto_rows):
            raise ValueError(f"auto_rows are live-row counts >= 1, got {list(self.auto_rows)}")
        return self

    def tree_for(self, rows: int) -> TreeConfig | None:
        """The tree a round over ``rows`` live rows uses by the `batch_trees` table (None: no speculation this
        round); ``auto`` is decided by `specvlm.policy.AutoPolicy`, not here."""
        if self.batch_trees == "auto":
            raise ValueError("batch_trees 'auto' is decided by the engine's AutoPolicy")
        choice: TreeConfig | str = self.tree
        for at, tree in sorted((self.batch_trees or {}).items()):
            if rows >= at:
                choice = tree
        return None if choice == "off" else choice

    def trees(self) -> list[TreeConfig]:
        """Every tree a round may use (`tree` and the `batch_trees` entries)."""
        table = self.batch_trees if isinstance(self.batch_trees, dict) else {}
        return [self.tree] + [t for t in table.values() if t != "off"]


class ModelConfig(StrictModel):
    """Which target and draft to load: ``demo`` (the project's own demo model), a local HF
    folder holding model + processor, or an ``s3://`` prefix."""

    target: str = Field("demo", description="'demo' (the LLaVA demo), 'demo-qwen2_5_vl' (the Qwen2.5-VL demo, once "
                        "built), a local folder or s3:// prefix (model + processor)")  # fmt: skip
    draft: str | None = Field(None, description="draft folder or s3:// prefix; None = the demo's draft for 'demo'")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="None = as saved, but float32 for half precision this CPU would emulate"
    )
    device: str | None = Field(None, description="e.g. cuda:0; None = cuda if available, else cpu")


M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or value that does not validate; the message names the field."""


def read_yaml(path: str | Path):
    """The YAML document at ``path`` (``{}`` when empty), with `ConfigError` naming the file on failure."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def load_config(path: str | Path, model: type[M]) -> M:
    """Read YAML at ``path`` into ``model``; errors name the file and each bad field."""
    return parse_config(read_yaml(path), model, source=str(path))


def config_yaml(config: BaseModel | dict) -> str:
    """``config`` with every field, defaults included, as YAML: what ``--print-config`` prints. Loading it back
    with `load_config` gives an equal config. A dict (a file format that wraps a config, e.g. a Serve config
    file around `ServeAppConfig`) is written as it is."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=120)


def parse_config(data: dict, model: type[M], source: str = "config") -> M:
    """Validate a mapping into ``model`` with field-naming errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: invalid {model.__name__}:"]
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None

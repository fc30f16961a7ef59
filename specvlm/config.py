"""User-facing configuration: pydantic models validated once at the boundary.

Everything a user sets in YAML, on the CLI or over HTTP lands here first;
the engine reads plain attributes afterwards. Unknown fields are errors, so a
typo in a YAML file is reported, not ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .tree import max_candidates


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TreeConfig(_Strict):
    """EAGLE-2 dynamic tree. Defaults are the SpecVLM paper's (top-k 10, 60 tokens, depth 7).

    On CPU the target's cost grows with the tree, so smaller trees win there
    (e.g. top_k=4, total_tokens=16, depth=4); on a GPU the paper's sizes do.
    """

    top_k: int = Field(10, ge=1, description="children kept per expanded node")
    total_tokens: int = Field(60, ge=2, description="tree nodes verified per round, root included")
    depth: int = Field(7, ge=1, description="tree levels below the root (draft forwards per round)")

    @model_validator(mode="after")
    def _enough_candidates(self):
        most = max_candidates(self.top_k, self.depth) + 1
        if self.total_tokens > most:
            raise ValueError(
                f"total_tokens={self.total_tokens} exceeds the {most} nodes that top_k={self.top_k}, "
                f"depth={self.depth} can produce; lower total_tokens or raise top_k/depth"
            )
        return self


class SamplingConfig(_Strict):
    """Per-request decoding settings (HF generate's meaning for each)."""

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    seed: int | None = None


class EngineConfig(_Strict):
    """How `SpecVLMEngine` decodes.

    mode: ``ar`` (target alone, the engine's own loop), ``eagle`` (draft +
    tree, no visual compression) or ``specvlm`` (elastic visual compressor).
    """

    mode: Literal["ar", "eagle", "specvlm"] = "eagle"
    tree: TreeConfig = TreeConfig()
    max_batch_size: int = Field(16, ge=1, description="rows decoded together")


class ModelConfig(_Strict):
    """Which target and draft to load: ``demo`` (the project's own demo model), a local HF
    folder holding model + processor, or an ``s3://`` prefix."""

    target: str = Field("demo", description="'demo', a local folder or s3:// prefix (model + processor)")
    draft: str | None = Field(None, description="draft folder or s3:// prefix; None = the demo's draft for 'demo'")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="None = as saved")
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

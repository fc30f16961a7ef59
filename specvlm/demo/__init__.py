"""The offline demo: a synthetic "shapes" world, its tokenizer and processor, and the demo VLM.

`ShapesWorld(seed)` draws images, videos, captions and questions; `build_processor()`
gives the matching `LlavaProcessor`; `prompt` / `format_example` give the chat
format. `load_demo()` loads the demo target VLM and its distilled draft built
by ``make demo-model`` (`specvlm.demo.recipe.build_demo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .text import build_processor, build_tokenizer, format_example, prompt
from .world import ShapesWorld

__all__ = [
    "DemoBundle",
    "DemoNotBuiltError",
    "ShapesWorld",
    "build_processor",
    "build_tokenizer",
    "demo_dir",
    "format_example",
    "load_demo",
    "prompt",
]


class DemoNotBuiltError(FileNotFoundError):
    """The demo model is not in the cache."""


def demo_dir() -> Path:
    """Where ``make demo-model`` puts the demo: ``$SPECVLM_HOME/demo`` (default ``~/.cache/specvlm/demo``)."""
    from ..loading import specvlm_home

    return specvlm_home() / "demo"


@dataclass
class DemoBundle:
    """The demo target (HF model, eval mode), its processor and distilled draft."""

    target: object  # LlavaForConditionalGeneration
    processor: object  # LlavaProcessor
    draft: object  # EagleDraft
    path: Path

    def prompt(self, question: str) -> str:
        """The full chat prompt for ``question`` with the image placeholder."""
        return prompt(question)


def load_demo(path: str | Path | None = None) -> DemoBundle:
    """Load the demo built by ``make demo-model``; raises `DemoNotBuiltError` if it is missing."""
    from ..draft import EagleDraft
    from ..loading import load_target

    root = Path(path) if path else demo_dir()
    if not (root / "target" / "config.json").is_file() or not (root / "draft" / "config.json").is_file():
        hint = "run `make demo-model` (or `specvlm demo-model`)"
        raise DemoNotBuiltError(f"the demo model is not built in {root}: {hint}")
    model, processor = load_target(root / "target")
    return DemoBundle(model, processor, EagleDraft.from_pretrained(root / "draft"), root)

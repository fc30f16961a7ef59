"""The offline demo: a synthetic "shapes" world, its tokenizer and processor, and the demo VLM.

`ShapesWorld(seed)` draws images, videos, captions and questions; `build_processor()`
gives the matching `LlavaProcessor`; `prompt` / `format_example` give the chat
format. `load_demo()` loads the demo target VLM and its two distilled drafts
built by ``make demo-model`` (`specvlm.demo.recipe.build_demo`): ``draft``
(EAGLE, mode ``eagle``) and ``specvlm_draft`` (with the elastic visual
compressor, mode ``specvlm``).
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
    """The demo target (HF model, eval mode), its processor and distilled drafts."""

    target: object  # LlavaForConditionalGeneration
    processor: object  # LlavaProcessor
    draft: object  # EagleDraft (mode eagle)
    path: Path
    specvlm_draft: object = None  # EagleDraft with an ElasticCompressor (mode specvlm)

    def draft_for(self, mode: str):
        """The draft for engine ``mode``: ``specvlm_draft`` for ``specvlm``, ``draft`` otherwise."""
        return self.specvlm_draft if mode == "specvlm" else self.draft

    def prompt(self, question: str) -> str:
        """The full chat prompt for ``question`` with the image placeholder."""
        return prompt(question)


def load_demo(path: str | Path | None = None) -> DemoBundle:
    """Load the demo built by ``make demo-model``; raises `DemoNotBuiltError` if it is missing."""
    from ..draft import EagleDraft
    from ..loading import load_target

    root = Path(path) if path else demo_dir()
    parts = ("target", "draft", "draft-specvlm")
    if not all((root / p / "config.json").is_file() for p in parts):
        hint = "run `make demo-model` (or `specvlm demo-model`)"
        raise DemoNotBuiltError(f"the demo model is not built in {root}: {hint}")
    model, processor = load_target(root / "target")
    drafts = [EagleDraft.from_pretrained(root / p) for p in parts[1:]]
    return DemoBundle(model, processor, drafts[0], root, drafts[1])

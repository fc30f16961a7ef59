"""The offline demo: a synthetic "shapes" world, its tokenizer and processor, and the demo VLM.

`ShapesWorld(seed)` draws images, videos, captions and questions; `build_processor()`
gives the matching `LlavaProcessor`; `prompt` / `format_example` give the chat
format. `load_demo()` loads the demo target VLM and its two distilled drafts
(`specvlm.demo.recipe.build_demo`; the build ships with the package, and
``make demo-model`` rebuilds it into the cache): ``draft``
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
    "demo_path",
    "format_example",
    "load_demo",
    "prompt",
]


PARTS = ("target", "draft", "draft-specvlm")
SHIPPED_DIR = Path(__file__).parent / "model"  # the build `DemoRecipe()` made, shipped with the package (fp16)


class DemoNotBuiltError(FileNotFoundError):
    """No demo model at the given path."""


def demo_dir() -> Path:
    """Where ``make demo-model`` puts a rebuild: ``$SPECVLM_HOME/demo`` (default ``~/.cache/specvlm/demo``)."""
    from ..loading import specvlm_home

    return specvlm_home() / "demo"


def _complete(root: Path) -> bool:
    return all((root / p / "config.json").is_file() for p in PARTS)


def demo_path() -> Path:
    """The demo model in use: a rebuild in `demo_dir()` when there is one, else the shipped `SHIPPED_DIR`."""
    return demo_dir() if _complete(demo_dir()) else SHIPPED_DIR


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


def load_demo(path: str | Path | None = None) -> DemoBundle:
    """Load a demo build in float32: ``path``, else `demo_path()` (a rebuild in the cache, else the shipped one).

    Raises `DemoNotBuiltError` when ``path`` holds no complete build.
    """
    import torch

    from ..draft import EagleDraft
    from ..loading import load_target

    root = Path(path) if path else demo_path()
    if not _complete(root):
        hint = "run `make demo-model` (or `specvlm demo-model --output DIR`)"
        raise DemoNotBuiltError(f"no demo model in {root}: {hint}")
    model, processor = load_target(root / "target", torch.float32)
    drafts = [EagleDraft.from_pretrained(root / p).float() for p in PARTS[1:]]
    return DemoBundle(model, processor, drafts[0], root, drafts[1])

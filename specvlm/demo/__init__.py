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

from ..config import ModelConfig
from ..loading import DEMO_TARGETS, DemoNotBuiltError, demo_dir, demo_path, load_target, resolve_model
from ..loading import SHIPPED_DEMO_DIR as SHIPPED_DIR
from .text import build_processor, build_tokenizer, format_example, prompt
from .world import ShapesWorld

__all__ = [
    "SHIPPED_DIR",
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


def load_demo(path: str | Path | None = None, family: str = "llava") -> DemoBundle:
    """Load a demo build in float32: ``path``, else `demo_path(family)` (LLaVA: a rebuild in the cache, else the
    shipped one; other families: their rebuild in the cache).

    The folders come from `specvlm.loading.resolve_model` (``target: demo`` / ``demo-<family>``); raises
    `DemoNotBuiltError` when there is no complete build.
    """
    from ..draft import EagleDraft

    name = next(n for n, f in DEMO_TARGETS.items() if f == family)
    eagle, specvlm = (resolve_model(ModelConfig(target=name), m, demo_root=path) for m in ("eagle", "specvlm"))
    model, processor = load_target(eagle.target, eagle.dtype)
    drafts = [EagleDraft.from_pretrained(f.draft).float() for f in (eagle, specvlm)]
    return DemoBundle(model, processor, drafts[0], eagle.demo, drafts[1])

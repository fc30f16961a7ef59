"""The offline demo: a synthetic "shapes" world, its word-level tokenizer and LLaVA processor.

`ShapesWorld(seed)` draws images, videos, captions and questions; `build_processor()`
gives the matching `LlavaProcessor`; `prompt` / `format_example` give the chat format.
"""

from .text import build_processor, build_tokenizer, format_example, prompt
from .world import ShapesWorld

__all__ = ["ShapesWorld", "build_processor", "build_tokenizer", "format_example", "prompt"]

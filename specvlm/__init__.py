"""specvlm: lossless speculative decoding for vision-language models (SpecVLM / EAGLE-2).

The engine library: torch + transformers + pydantic, no Ray.
"""

from .config import EngineConfig, SamplingConfig, TreeConfig, load_config
from .draft import EagleDraft
from .engine import GenerateOutput, SpecVLMEngine

__all__ = [
    "EagleDraft",
    "EngineConfig",
    "GenerateOutput",
    "SamplingConfig",
    "SpecVLMEngine",
    "TreeConfig",
    "load_config",
]
__version__ = "0.1.0"

"""Name and load targets and drafts: ``demo``, local folders or ``s3://`` prefixes (never a model hub at run time).

`resolve_model` turns a `ModelConfig` and an engine mode into `ModelFolders` (every caller resolves
names here: the engine loader, `specvlm.demo.load_demo`, the jobs' driver-side checks, the distill job).
``demo`` names the project's demo build: the one shipped in ``specvlm/demo/model``, or a rebuild in
``$SPECVLM_HOME/demo``. An ``s3://bucket/prefix`` is mirrored once into ``$SPECVLM_HOME/s3/bucket/prefix``
(`specvlm.storage.mirror`) and loaded from there.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .inputs import QWEN_PROCESSORS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
MODES = ("ar", "eagle", "specvlm")
SHIPPED_DEMO_DIR = Path(__file__).parent / "demo" / "model"  # the build `DemoRecipe()` made, shipped (fp16)
DEMO_DRAFTS = {"eagle": "draft", "specvlm": "draft-specvlm"}  # the demo build's draft folder per engine mode
DEMO_PARTS = ("target", *DEMO_DRAFTS.values())
DEMO_NAME = "specvlm-demo"  # the demo target's name in outputs (``model``)
DEMO_TARGETS = {"demo": "llava", "demo-qwen2_5_vl": "qwen2_5_vl"}  # model names of the demo builds -> family
# target model_type -> its transformers class (`load_target`); Qwen-VL targets take videos natively
TARGET_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
VIDEO_FAMILIES = tuple(QWEN_PROCESSORS)


def specvlm_home() -> Path:
    """Cache root: ``$SPECVLM_HOME`` or ``~/.cache/specvlm``."""
    return Path(os.environ.get("SPECVLM_HOME") or Path.home() / ".cache" / "specvlm")


def demo_dir(family: str = "llava") -> Path:
    """Where ``make demo-model`` puts a rebuild: ``$SPECVLM_HOME/demo`` (default ``~/.cache/specvlm/demo``);
    other families' demos (``--family qwen2_5_vl``) in ``$SPECVLM_HOME/demo-<family>``."""
    return specvlm_home() / ("demo" if family == "llava" else f"demo-{family}")


def _demo_complete(root: Path) -> bool:
    return all((root / p / "config.json").is_file() for p in DEMO_PARTS)


def demo_path(family: str = "llava") -> Path:
    """The demo build in use: a rebuild in `demo_dir()` when there is one, else the shipped `SHIPPED_DEMO_DIR`
    (LLaVA; other families ship no build: their `demo_dir`)."""
    if family != "llava" or _demo_complete(demo_dir()):
        return demo_dir(family)
    return SHIPPED_DEMO_DIR


class DemoNotBuiltError(FileNotFoundError):
    """No demo build at the given path."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); ``$SPECVLM_CPU_BF16=0|1`` overrides.

    Elsewhere (AVX2-only x86, most laptops and VMs) torch emulates bf16 on the CPU, many times slower than
    float32, so bf16 is only used where it is native.
    """
    forced = os.environ.get("SPECVLM_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):  # also when capped by ATEN_CPU_CAPABILITY
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private but stable since torch 2.1
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------- names -> folders
@dataclass(frozen=True)
class ModelFolders:
    """What a `ModelConfig` names, for one engine mode (`resolve_model`). The processor is the target folder's."""

    target: str  # local folder or s3:// prefix holding the target model and its processor
    draft: str | None  # the draft for the mode; None in mode ar (or, with fresh_draft, when none is named)
    demo: Path | None  # the demo build in use when the target is 'demo', else None
    target_name: str  # how outputs name the target: 'specvlm-demo', else model.target as given
    draft_name: str | None  # how outputs name the draft (draft_version)
    dtype: str | None = None  # the target's dtype when the config sets none (the demo, fp16 on disk: float32)


def _folder(field: str, value: str, hint: str) -> str:
    """``value`` when it is an s3:// prefix (checked when mirrored) or a local model folder; else a
    FileNotFoundError naming ``field``."""
    if value.startswith("s3://"):
        return value
    if "://" in value:
        raise ValueError(f"{field} {value!r}: use {hint}")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{field} {value} does not exist (use {hint})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{field} {value} is not a model folder: it has no config.json")
    return str(path)


def resolve_model(
    model: ModelConfig, mode: str = "eagle", *, fresh_draft: bool = False, demo_root: str | Path | None = None
) -> ModelFolders:
    """The folders ``model`` names for engine ``mode``, checked without loading anything (s3:// prefixes are
    taken as given).

    ``target: demo`` (or ``demo-qwen2_5_vl``) is the demo build (``demo_root``, else `demo_path()`), and
    without ``model.draft`` its draft for the mode (``draft`` for eagle, ``draft-specvlm`` for specvlm).
    Mode ``ar`` needs no draft; the others need one, except with ``fresh_draft`` (a draft to be distilled:
    ``model.draft`` is where it starts, None a fresh one, also for the demo). Raises FileNotFoundError
    (`DemoNotBuiltError` for the demo) for a missing or non-model local folder, ValueError for a missing draft.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    demo, dtype = None, None
    if model.target in DEMO_TARGETS:
        family = DEMO_TARGETS[model.target]
        demo, dtype = Path(demo_root) if demo_root else demo_path(family), "float32"
        if not _demo_complete(demo):
            hint = ("run `make demo-model` (or `specvlm demo-model --output DIR`)" if family == "llava" else
                    f"run `make demo-model FAMILY={family}` (or `specvlm demo-model --family {family}`)")  # fmt: skip
            raise DemoNotBuiltError(f"no demo model in {demo}: {hint}")
        target = str(demo / "target")
        target_name = DEMO_NAME if family == "llava" else f"{DEMO_NAME}-{family}"
    else:
        target = _folder("model.target", model.target, "a local HF folder, an s3:// prefix, or 'demo'")
        target_name = model.target
    draft = draft_name = None
    if mode == "ar":
        pass
    elif model.draft in DEMO_TARGETS:
        raise ValueError(f"model.draft takes a draft folder or s3:// prefix, not {model.draft!r} (target: "
                         f"{model.draft} brings the demo's drafts)")  # fmt: skip
    elif model.draft is not None:
        draft = _folder("model.draft", model.draft, "a draft folder or an s3:// prefix")
        draft_name = model.draft
    elif fresh_draft:
        pass
    elif demo is not None:
        draft = str(demo / DEMO_DRAFTS[mode])
        draft_name = f"{target_name}-{DEMO_DRAFTS[mode]}@{demo}"
    else:
        raise ValueError(f"mode {mode!r} needs a draft: set model.draft (a folder or s3:// prefix)")
    return ModelFolders(target, draft, demo, target_name, draft_name, dtype)


def local_path(path_or_uri: str | Path) -> Path:
    """A local folder for a local path or an ``s3://`` prefix (mirrored once into the cache, then reused)."""
    from .storage import mirror, split_s3

    s = str(path_or_uri)
    if not s.startswith("s3://"):
        p = Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist (models are loaded from local paths or s3:// URIs)")
        return p
    bucket, prefix = split_s3(s)
    dest = specvlm_home() / "s3" / bucket / prefix
    marker = dest / ".complete"
    if not marker.exists():
        mirror(s, dest)
        marker.touch()
    return dest


def target_family(path_or_uri: str | Path) -> str:
    """The ``model_type`` in a target folder's config.json (local, or an ``s3://`` prefix read without mirroring
    the model); raises ValueError naming the supported families (`TARGET_CLASSES`) for any other."""
    import json

    from .storage import ReadError, read_bytes

    s = str(path_or_uri)
    try:
        if s.startswith("s3://"):
            raw = read_bytes(s.rstrip("/") + "/config.json", 16 * 1024**2)
        else:
            raw = (Path(s).expanduser() / "config.json").read_bytes()
    except (OSError, ReadError) as e:
        raise FileNotFoundError(f"{path_or_uri}: cannot read its config.json ({e})") from None
    model_type = json.loads(raw).get("model_type")
    if model_type not in TARGET_CLASSES:
        hint = " (mixture-of-experts Qwen3-VL targets are not supported)" if model_type == "qwen3_vl_moe" else ""
        raise ValueError(f"{path_or_uri}: unsupported model_type {model_type!r}{hint}; supported: "
                         f"{', '.join(TARGET_CLASSES)}")  # fmt: skip
    return model_type


def load_target(path_or_uri: str | Path, dtype: str | torch.dtype | None = None, device: str | None = None):
    """``(model, processor)`` from an HF folder holding both (local or ``s3://``), in eval mode.

    Families: `TARGET_CLASSES` (`target_family`). A Qwen-VL folder's processor is HF's class for it built by
    `specvlm.inputs.qwen_processor_class` (videos through `specvlm.inputs.video_patches`, no torchvision needed).
    ``dtype`` None keeps the stored precision, except half precision that this CPU would only emulate
    (fp16, or bf16 without `cpu_has_native_bf16`): that loads as float32, since emulation runs many times
    slower. A half ``dtype`` asked for explicitly is kept, with a warning.
    """
    import transformers

    from .inputs import qwen_processor_class

    path = local_path(path_or_uri)
    family = target_family(path)
    model = getattr(transformers, TARGET_CLASSES[family]).from_pretrained(path, dtype=resolve_dtype(dtype) or "auto")
    if device:
        model = model.to(device)
    param = next(model.parameters())
    emulated = (
        param.device.type == "cpu"
        and param.dtype in (torch.bfloat16, torch.float16)
        and not (param.dtype == torch.bfloat16 and cpu_has_native_bf16())
    )
    if emulated and dtype is None:
        model = model.float()
    elif emulated:
        warnings.warn(
            f"{path_or_uri}: {param.dtype} on a CPU without native support for it is emulated and runs many times "
            "slower than float32; set dtype: float32",
            stacklevel=2,
        )
    if family in VIDEO_FAMILIES:
        processor = qwen_processor_class(family).from_pretrained(path)
    else:
        processor = transformers.AutoProcessor.from_pretrained(path)
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def load_draft(path_or_uri: str | Path):
    """An `EagleDraft` from a folder written by ``save_pretrained`` (local or ``s3://``)."""
    from .draft import EagleDraft

    return EagleDraft.from_pretrained(local_path(path_or_uri))


def load_engine(model_cfg: ModelConfig, engine_cfg=None):
    """Build a `SpecVLMEngine` from a `ModelConfig` (+ `EngineConfig`), names resolved by `resolve_model`.

    Returns ``(engine, processor, info)`` where ``info`` has ``model`` (the target's
    name/path) and ``draft_version`` (the draft's name/path, or None in ``ar`` mode).
    """
    from .config import EngineConfig
    from .engine import SpecVLMEngine

    engine_cfg = engine_cfg or EngineConfig()
    folders = resolve_model(model_cfg, engine_cfg.mode)
    device = model_cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_target(folders.target, model_cfg.dtype or folders.dtype, device)
    draft = load_draft(folders.draft) if folders.draft else None
    info = {"model": folders.target_name, "draft_version": folders.draft_name}
    return SpecVLMEngine(model, draft, engine_cfg), processor, info

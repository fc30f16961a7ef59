"""Load targets and drafts from local folders or ``s3://`` prefixes (never a model hub at run time).

An ``s3://bucket/prefix`` is mirrored once into ``$SPECVLM_HOME/s3/bucket/prefix``
with boto3 (standard AWS environment; ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for S3-compatible stores) and loaded from there.
The word ``demo`` names the project's own demo model (`specvlm.demo`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def specvlm_home() -> Path:
    """Cache root: ``$SPECVLM_HOME`` or ``~/.cache/specvlm``."""
    return Path(os.environ.get("SPECVLM_HOME") or Path.home() / ".cache" / "specvlm")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); ``$SPECVLM_CPU_BF16=0|1`` overrides.

    Elsewhere (AVX2-only x86, most laptops and VMs) torch emulates bf16 on the CPU: a 1024x1024 matmul ran at
    0.3 GFLOP/s in bf16 against 33 GFLOP/s in float32 on an AVX2 EPYC, so bf16 is only worth it where it is native.
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


def s3_client():
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint) if endpoint else boto3.client("s3")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> ``(bucket, "key/prefix")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key.strip("/")


def local_path(path_or_uri: str | Path) -> Path:
    """A local folder for a local path or an ``s3://`` prefix (downloaded once, then reused)."""
    s = str(path_or_uri)
    if not s.startswith("s3://"):
        p = Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist (models are loaded from local paths or s3:// URIs)")
        return p
    bucket, prefix = split_s3(s)
    dest = specvlm_home() / "s3" / bucket / prefix
    marker = dest / ".complete"
    if marker.exists():
        return dest
    client = s3_client()
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :].lstrip("/")
            if not rel or rel.endswith("/"):
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(out))
            n += 1
    if n == 0:
        raise FileNotFoundError(f"no objects under {s}")
    marker.touch()
    return dest


def load_target(path_or_uri: str | Path, dtype: str | torch.dtype | None = None, device: str | None = None):
    """``(model, processor)`` from an HF folder holding both (local or ``s3://``), in eval mode.

    ``dtype`` None keeps the stored precision, except half precision that this CPU would only emulate
    (fp16, or bf16 without `cpu_has_native_bf16`): that loads as float32, since emulation runs many times
    slower. A half ``dtype`` asked for explicitly is kept, with a warning.
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    path = local_path(path_or_uri)
    model_type = AutoConfig.from_pretrained(path).model_type
    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    if model_type not in classes:
        raise ValueError(f"{path_or_uri}: unsupported model_type {model_type!r}; supported: {', '.join(classes)}")
    model = classes[model_type].from_pretrained(path, dtype=resolve_dtype(dtype) or "auto")
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
    processor = AutoProcessor.from_pretrained(path)
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def load_draft(path_or_uri: str | Path):
    """An `EagleDraft` from a folder written by ``save_pretrained`` (local or ``s3://``)."""
    from .draft import EagleDraft

    return EagleDraft.from_pretrained(local_path(path_or_uri))


def load_engine(model_cfg, engine_cfg=None):
    """Build a `SpecVLMEngine` from a `ModelConfig` (+ `EngineConfig`).

    Returns ``(engine, processor, info)`` where ``info`` has ``model`` (the target's
    name/path) and ``draft_version`` (the draft's name/path, or None in ``ar`` mode).
    """
    from .config import EngineConfig
    from .engine import SpecVLMEngine

    engine_cfg = engine_cfg or EngineConfig()
    device = model_cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_cfg.target == "demo":
        from .demo import load_demo

        demo = load_demo()
        model, processor, draft = demo.target, demo.processor, demo.draft_for(engine_cfg.mode)
        sub = "draft-specvlm" if engine_cfg.mode == "specvlm" else "draft"
        target_name, draft_name = "specvlm-demo", f"specvlm-demo-{sub}@{demo.path}"
        if model_cfg.dtype or device != "cpu":
            model = model.to(device=device, dtype=resolve_dtype(model_cfg.dtype) or model.dtype)
    else:
        model, processor = load_target(model_cfg.target, model_cfg.dtype, device)
        draft, target_name, draft_name = None, model_cfg.target, None
    if model_cfg.draft:
        draft, draft_name = load_draft(model_cfg.draft), model_cfg.draft
    if engine_cfg.mode == "ar":
        draft, draft_name = None, None
    elif draft is None:
        raise ValueError(f"mode {engine_cfg.mode!r} needs a draft: set model.draft (a folder or s3:// prefix)")
    return SpecVLMEngine(model, draft, engine_cfg), processor, {"model": target_name, "draft_version": draft_name}

"""The demo target VLM and its distilled draft, trained offline on ShapesWorld.

Legend: B batch rows, T tokens, V vocab.

The target is a real HF VLM trained from scratch to caption shapes scenes,
answer questions about them and describe short videos. ``family: llava``
(the default, shipped): a `LlavaForConditionalGeneration` (a small CLIP
vision tower + a 6-layer Llama decoder) that reads a video as its 4 frames
tiled 2x2 into one image. ``family: qwen2_5_vl``: a
`Qwen2_5_VLForConditionalGeneration` of the same decoder size that reads
images at native resolution through its own windowed vision tower and videos
as real video input (frames in temporal patches, M-RoPE positions). The
drafts are then distilled onto the trained target with `specvlm.distill` on
the target's own greedy outputs. Everything is seeded, so a rebuild gives
the same weights on the same machine.

`build_demo()` writes ``<out>/{target,draft,draft-specvlm}`` (HF folders) and
``metrics.json``; `specvlm.demo.load_demo()` reads them back.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import CompressorConfig, PrimitiveConfig
from ..loading import cpu_has_native_bf16, load_target
from ..media import tile_frames
from .text import build_processor
from .world import IMAGE_SIZE, ShapesWorld


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and schedule of the demo build (defaults: target ~11 min, each draft ~4 min on 2 CPU cores)."""

    seed: int = 0
    family: str = "llava"  # llava | qwen2_5_vl (`DemoRecipe.for_family`)
    image_size: int = 96
    patch: int = 12  # llava: 8 x 8 = 64 visual tokens; qwen2_5_vl: 8 (12 x 12 patches merged 2 x 2: 36 per image)
    vision_hidden: int = 128
    vision_layers: int = 3
    hidden: int = 256
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 640
    video_frames: int = 4
    target_steps: int = 1400
    target_batch: int = 24
    target_lr: float = 1.5e-3
    warmup: int = 60
    draft_steps: int = 900
    # the draft layer's MLP width (None = the target's, 640): most of a draft step's weight traffic, so narrower
    # is faster on CPU; 256 keeps the full-width draft's accept length, compressed too (README, "Why 256 wide")
    draft_intermediate: int | None = 256
    draft_batch: int = 16
    draft_lr: float = 1e-3
    draft_responses: str = "target"  # the target's own greedy outputs (what the draft sees at inference) | "dataset"
    # distinct examples the drafts train on: 900 x 16 draws are ~1.8 epochs, ~3.6 with the specvlm stage (a
    # smaller pool overfits: README, Benchmarks)
    draft_pool: int = 8000
    eval_samples: int = 120
    # the specvlm draft's elastic set: learned pruning keeping 16 or 4 of the 64 patches, one per input by the
    # gate (README, Benchmarks, "Visual compressor", compares sets and primitives)
    compressor_primitives: tuple[str, ...] = ("prune4", "prune16")
    compressor_cost_weight: float = 0.0  # the specvlm draft's gate cost term (CompressorConfig.cost_weight)
    # autocast the target's training forward to bfloat16. None: only where the CPU has native bf16
    # (`specvlm.loading.cpu_has_native_bf16`); elsewhere bf16 is emulated and far slower than float32
    bf16: bool | None = None

    @classmethod
    def for_family(cls, family: str = "llava", **overrides) -> DemoRecipe:
        """The recipe for a demo of ``family`` (`DEMO_FAMILIES`). Qwen2.5-VL: 8-pixel patches merged 2 x 2, 36
        visual tokens per image and 72 per 4-frame video (2 temporal patches); 6-pixel ones (64 tokens, as
        LLaVA's) made a target step 1.6x slower on CPU, mostly in its vision tower."""
        if family not in DEMO_FAMILIES:
            raise ValueError(f"demo family must be one of {', '.join(DEMO_FAMILIES)}, got {family!r}")
        return cls(**{**({"family": family, "patch": 8} if family != "llava" else {}), **overrides})

    @property
    def native_video(self) -> bool:
        """Whether the target reads videos as video (Qwen) rather than as tiled frames (LLaVA)."""
        return self.family != "llava"

    def target_bf16(self) -> bool:
        """Whether the target trains under bf16 autocast on this machine (``bf16``, or native support if None)."""
        return cpu_has_native_bf16() if self.bf16 is None else self.bf16

    def compressor(self) -> CompressorConfig:
        """The specvlm draft's elastic compressor (select mode) over ``compressor_primitives``."""
        prims = tuple(PrimitiveConfig.from_name(n) for n in self.compressor_primitives)
        return CompressorConfig(primitives=prims, cost_weight=self.compressor_cost_weight)

    def small(self) -> DemoRecipe:
        """A reduced build for tests: same code path, minutes -> seconds."""
        small = {"target_steps": 60, "draft_steps": 30, "eval_samples": 8, "draft_pool": 64, "layers": 2,
                 "hidden": 64, "intermediate": 128, "draft_intermediate": 64, "vision_layers": 1,
                 "vision_hidden": 64}  # fmt: skip
        return DemoRecipe(**{**asdict(self), **small})


def build_processor_for(recipe: DemoRecipe):
    """The demo processor for ``recipe.family``: LLaVA's (fixed crops) or Qwen2.5-VL's (native resolution)."""
    if recipe.family == "llava":
        return build_processor(recipe.image_size, recipe.patch)
    from .text import build_qwen_processor

    side = recipe.image_size
    return build_qwen_processor(recipe.family, patch_size=recipe.patch, min_pixels=side * side // 4,
                                max_pixels=side * side)  # fmt: skip


def build_target(recipe: DemoRecipe, processor):
    """A random-init demo target matching the demo ``processor`` (`build_processor_for`)."""
    if recipe.family != "llava":
        return _build_qwen_target(recipe, processor)
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from .text import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID

    vocab_size = len(processor.tokenizer)

    vision = CLIPVisionConfig(
        hidden_size=recipe.vision_hidden, intermediate_size=2 * recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers, num_attention_heads=4, image_size=recipe.image_size,
        patch_size=recipe.patch, projection_dim=recipe.vision_hidden,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=recipe.hidden, intermediate_size=recipe.intermediate, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads, vocab_size=vocab_size,
        max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(cfg)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = EOS_ID, PAD_ID, BOS_ID
    return model


def _build_qwen_target(recipe: DemoRecipe, processor):
    """A random-init demo `Qwen2_5_VLForConditionalGeneration` (`specvlm.tiny.tiny_qwen` at the recipe's sizes):
    the LLaVA demo's decoder, a windowed vision tower of ``vision_layers`` blocks, the processor's special ids."""
    from ..tiny import tiny_qwen

    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
           ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>"))}  # fmt: skip
    ids.update(pad=tok.pad_token_id, bos=None, eos=tok.eos_token_id)
    return tiny_qwen(
        recipe.family, ids, hidden=recipe.hidden, layers=recipe.layers, heads=recipe.heads, kv_heads=recipe.kv_heads,
        vocab=len(tok), patch=recipe.patch, intermediate=recipe.intermediate, seed=recipe.seed,
        vision_hidden=recipe.vision_hidden, vision_layers=recipe.vision_layers, window=recipe.image_size,
    )  # fmt: skip


def to_example(sample: dict, frames: int = 4, native_video: bool = False) -> dict:
    """A ShapesWorld sample as ``{"image" | "video", "prompt", "response"}``: a video's ``frames`` frames
    (sampled uniformly, first and last included) tiled into one image, or kept as a list with ``native_video``."""
    out = {"prompt": sample["prompt"], "response": sample["response"]}
    if "frames" in sample:
        fr = sample["frames"]
        picked = [fr[round(i * (len(fr) - 1) / (frames - 1))] for i in range(frames)]
        return {"video": picked, **out} if native_video else {"image": tile_frames(picked), **out}
    return {"image": sample["image"], **out}


def examples(seed: int, n: int, frames: int = 4, image_size: int = IMAGE_SIZE, native_video: bool = False,
             **kw) -> list[dict]:  # fmt: skip
    """``n`` examples from ``ShapesWorld(seed, image_size)`` (`to_example`)."""
    world = ShapesWorld(seed, image_size)
    return [to_example(world.sample(**kw), frames, native_video) for _ in range(n)]


DEMO_FAMILIES = ("llava", "qwen2_5_vl")


def hf_inputs(model, batch) -> dict:
    """A `DistillBatch` as keyword arguments of the HF model's forward (Qwen-VL also needs
    ``mm_token_type_ids``, derived from the ids)."""
    from ..target import mm_token_type_ids

    kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.media}
    if batch.pixel_values is not None:
        kw["pixel_values"] = batch.pixel_values
    if getattr(model.config, "video_token_id", None) is not None:
        kw["mm_token_type_ids"] = mm_token_type_ids(model.config, batch.input_ids)
    return kw


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=2.0)


def train_target(model, processor, recipe: DemoRecipe, progress: bool = True) -> list[dict]:
    """Supervised training of the whole target on response tokens (cross-entropy)."""
    from ..distill import collate

    world = ShapesWorld(recipe.seed + 1, recipe.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.target_lr, betas=(0.9, 0.95), weight_decay=0.01)
    total = recipe.target_steps

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(total - recipe.warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    # eager attention while training: on CPU at these lengths (~110 tokens) SDPA's backward costs more
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")
    model.train()
    bf16 = recipe.target_bf16()
    if progress:
        print(f"demo target: training in {'bfloat16 autocast (native on this CPU)' if bf16 else 'float32'}", flush=True)
    log, bar = [], _progress(total, "demo target") if progress else None
    for step in range(total):
        samples = [to_example(world.sample(), recipe.video_frames, recipe.native_video)
                   for _ in range(recipe.target_batch)]  # fmt: skip
        batch = collate(processor, samples)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**hf_inputs(model, batch))
        logits = out.logits[:, :-1].float()  # [B, T-1, V] predicts token t+1
        labels = batch.input_ids[:, 1:].masked_fill(~batch.loss_mask[:, 1:].bool(), -100)  # [B, T-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 50 == 0 or step == total - 1:
            log.append({"step": step, "loss": loss.item()})
    if bar is not None:
        bar.close()
    model.set_attn_implementation(attn)
    return _finish(model, log)


def _finish(model, log):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return log


@torch.no_grad()
def evaluate_target(model, processor, samples: list[dict], max_new_tokens: int = 48) -> dict:
    """Held-out quality: teacher-forced token accuracy and greedy exact match, per kind and overall."""
    from ..distill import collate, encode_samples
    from ..engine import EngineConfig, SpecVLMEngine

    batch = collate(processor, samples)
    logits = model(**hf_inputs(model, batch)).logits[:, :-1]
    sel = batch.loss_mask[:, 1:].bool()
    correct = (logits.argmax(-1) == batch.input_ids[:, 1:]) & sel
    engine = SpecVLMEngine(model, None, EngineConfig(mode="ar"))
    tok = processor.tokenizer
    exact = 0
    for i in range(0, len(samples), 16):
        chunk = samples[i : i + 16]
        enc = encode_samples(processor, chunk)
        for s, seq in zip(chunk, engine.generate(**enc, max_new_tokens=max_new_tokens).sequences):
            exact += tok.decode(seq, skip_special_tokens=True).strip() == s["response"].strip()
    return {
        "token_accuracy": (correct.sum() / sel.sum()).item(),
        "exact_match": exact / len(samples),
        "samples": len(samples),
    }


def draft_data(model, processor, recipe: DemoRecipe) -> tuple[list[dict], list | None]:
    """The draft's training pool (``recipe.draft_pool`` examples) and, for ``draft_responses: target``,
    the target's own greedy responses to them (generated once, in batches of 64)."""
    from ..distill import target_responses
    from ..engine import EngineConfig, SpecVLMEngine

    world = ShapesWorld(recipe.seed + 2, recipe.image_size)
    pool = [to_example(world.sample(), recipe.video_frames, recipe.native_video) for _ in range(recipe.draft_pool)]
    if recipe.draft_responses != "target":
        return pool, None
    ar = SpecVLMEngine(model, None, EngineConfig(mode="ar"))
    responses = []
    for i in range(0, len(pool), 64):
        responses += target_responses(ar, processor, pool[i : i + 64], max_new_tokens=48)
    return pool, responses


def distill_demo_draft(
    model, processor, recipe: DemoRecipe, progress: bool = True, log_every: int = 50, on_step=None,
    compressor: CompressorConfig | None = None, steps: int | None = None, data=None, init=None,
):  # fmt: skip
    """Distil an `EagleDraft` onto the trained target, on the target's own greedy outputs.

    ``compressor``: distil a ``specvlm`` draft (draft + elastic compressor + gate, jointly).
    ``steps``: override ``recipe.draft_steps``. ``data``: `draft_data`'s result, to share it between drafts.
    ``init``: a trained draft whose ``fc`` and decoder layer start this one (the compressor starts fresh).
    ``on_step(step, draft)`` is called before each step and after the last (step == steps).
    """
    from ..distill import collate, distill_step, make_optimizer
    from ..draft import EagleDraft
    from ..target import TargetAdapter

    steps = recipe.draft_steps if steps is None else steps
    pool, responses = data if data is not None else draft_data(model, processor, recipe)
    draft = EagleDraft.from_target(
        model, seed=recipe.seed, compressor=compressor, intermediate_size=recipe.draft_intermediate
    )
    if init is not None:
        draft.load_state_dict({k: v for k, v in init.state_dict().items() if not k.startswith("compressor.")},
                              strict=False)  # fmt: skip
    target = TargetAdapter(model)
    opt = make_optimizer(draft, lr=recipe.draft_lr)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(recipe.seed))
    label = "demo draft" if compressor is None else "demo specvlm draft"
    log, bar = [], _progress(steps, label) if progress else None
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(recipe.seed)  # the gate's Gumbel draws, whatever ran before in this process
        for step in range(steps):
            if on_step is not None:
                on_step(step, draft)
            idx = [int(order[(step * recipe.draft_batch + j) % len(pool)]) for j in range(recipe.draft_batch)]
            resp = None if responses is None else [responses[i] for i in idx]
            batch = collate(processor, [pool[i] for i in idx], resp)
            res = distill_step(target, draft, batch, opt, feature_noise=0.0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss.item():.3f}", top1=f"{res.draft_top1:.2f}")
            if step % log_every == 0 or step == steps - 1:
                entry = {"step": step, "loss": res.loss.item(), "loss_logit": res.loss_logit,
                         "loss_feat": res.loss_feat, "draft_top1": res.draft_top1}  # fmt: skip
                if compressor is not None:
                    entry["draft_visual_tokens"] = res.visual_tokens
                log.append(entry)
    if bar is not None:
        bar.close()
    draft.eval()
    if on_step is not None:
        on_step(steps, draft)
    return draft, log


STAGES = ("target", "draft", "draft-specvlm")
SAVE_DTYPE = torch.float16  # weights on disk: half the bytes of float32; loaded back as float32 (`load_demo`)


def _stage_key(recipe: dict, name: str) -> dict:
    """The recipe fields a stage depends on: the target ignores the drafts' fields, the eagle draft the
    compressor's; the specvlm draft (started from the eagle draft) depends on everything."""
    recipe = json.loads(json.dumps(recipe))  # tuples -> lists, as stored
    skip = {"target": ("draft_", "compressor_"), "draft": ("compressor_",)}.get(name, ())
    return {k: v for k, v in recipe.items() if not k.startswith(skip)} if skip else recipe


def _stage(out: Path, name: str, recipe: DemoRecipe) -> dict | None:
    """A finished stage's metrics when ``out/<name>`` was built with this recipe's fields for it, else None."""
    done = out / f"{name}_metrics.json"
    if not (out / name / "config.json").is_file() or not done.is_file():
        return None
    metrics = json.loads(done.read_text())
    stored = metrics.get("recipe")
    if stored is None:
        return None
    stored = {**asdict(DemoRecipe()), **stored}  # fields added since the build: it was made with their defaults
    return metrics if _stage_key(stored, name) == _stage_key(asdict(recipe), name) else None


def is_built(out: Path, recipe: DemoRecipe | None = None) -> bool:
    """Whether ``out`` holds every stage of a demo built by ``recipe`` (default: `DemoRecipe()`)."""
    recipe = recipe or DemoRecipe()
    return (Path(out) / "metrics.json").is_file() and all(_stage(Path(out), n, recipe) for n in STAGES)


def build_demo(out: Path, recipe: DemoRecipe | None = None, progress: bool = True) -> dict:
    """Train target + drafts and write ``out/{target,draft,draft-specvlm}`` and ``out/metrics.json``.

    Three stages, each reused when its folder and ``<stage>_metrics.json`` exist,
    so an interrupted build resumes where it stopped: the target, the EAGLE draft
    (mode ``eagle``) and the SpecVLM draft (draft + elastic compressor, mode
    ``specvlm``; its draft layer starts from the EAGLE draft's, then draft,
    compressor and gate are distilled jointly for ``draft_steps``).
    """
    from ..draft import EagleDraft

    recipe = recipe or DemoRecipe()
    out = Path(out)
    tdir = out / "target"
    target_metrics = _stage(out, "target", recipe)
    if target_metrics is None:
        torch.manual_seed(recipe.seed)
        processor = build_processor_for(recipe)
        t0 = time.perf_counter()
        model = build_target(recipe, processor)
        target_log = train_target(model, processor, recipe, progress)
        t_target = time.perf_counter() - t0
        tdir.mkdir(parents=True, exist_ok=True)
        model.to(SAVE_DTYPE).save_pretrained(tdir)
        processor.save_pretrained(tdir)
        # evaluated (and the drafts distilled) on the weights as stored, so the metrics describe what ships
        model, processor = load_target(tdir, torch.float32)
        held_out = examples(recipe.seed + 1000, recipe.eval_samples, recipe.video_frames, recipe.image_size,
                            recipe.native_video)  # fmt: skip
        quality = evaluate_target(model, processor, held_out)
        captions = examples(recipe.seed + 2000, recipe.eval_samples, recipe.video_frames, recipe.image_size,
                            p_video=0, p_qa=0)  # fmt: skip
        quality["caption_exact_match"] = evaluate_target(model, processor, captions)["exact_match"]
        target_metrics = {"recipe": asdict(recipe), "target_train_s": t_target, "target": quality,
                          "target_bf16": recipe.target_bf16(), "target_log": target_log}  # fmt: skip
        (out / "target_metrics.json").write_text(json.dumps(target_metrics, indent=2))
        if progress:
            print(f"demo target: {json.dumps(quality)} in {t_target:.0f}s", flush=True)
    else:
        model, processor = load_target(tdir, torch.float32)
    metrics, data = dict(target_metrics), None
    for name, compressor in (("draft", None), ("draft-specvlm", recipe.compressor())):
        stage = _stage(out, name, recipe)
        if stage is None:
            t1 = time.perf_counter()
            data = data or draft_data(model, processor, recipe)  # one pool of target responses for both drafts
            # the specvlm draft starts from the trained eagle draft's layer; its compressor and gate start fresh
            init = EagleDraft.from_pretrained(out / "draft").float() if compressor is not None else None
            draft, draft_log = distill_demo_draft(
                model, processor, recipe, progress, compressor=compressor, data=data, init=init
            )
            draft.to(SAVE_DTYPE).save_pretrained(out / name)
            stage = {"recipe": asdict(recipe), f"{name}_train_s": time.perf_counter() - t1, f"{name}_log": draft_log}
            (out / f"{name}_metrics.json").write_text(json.dumps(stage, indent=2))
        metrics.update(stage)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics

"""The demo target + draft recipe (reduced size), load_demo, and the engine on the result."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import greedy_reference

from specvlm import EngineConfig, SpecVLMEngine, TreeConfig
from specvlm.demo import SHIPPED_DIR, DemoNotBuiltError, demo_path, load_demo
from specvlm.demo.recipe import DemoRecipe, examples, is_built
from specvlm.inputs import encode


def test_load_demo_missing_says_how_to_build(tmp_path):
    with pytest.raises(DemoNotBuiltError, match="make demo-model"):
        load_demo(tmp_path)


def test_shipped_demo_is_the_recipe_build_and_accepts_long_paths(tmp_path, monkeypatch):
    """The demo model in the package: `DemoRecipe()`'s build, fp16 on disk, float32 loaded, and its eagle draft
    still accepts long paths on held-out captions (a short check; `make bench` measures it fully)."""
    from safetensors import safe_open

    monkeypatch.setenv("SPECVLM_HOME", str(tmp_path))  # an empty cache: the shipped build is the one in use
    assert demo_path() == SHIPPED_DIR and is_built(SHIPPED_DIR)
    for part in ("target", "draft", "draft-specvlm"):
        with safe_open(SHIPPED_DIR / part / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    demo = load_demo()
    assert demo.path == SHIPPED_DIR
    assert {p.dtype for p in demo.target.parameters()} | {p.dtype for p in demo.draft.parameters()} == {torch.float32}
    text = demo.target.config.text_config
    recipe = DemoRecipe()
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (recipe.hidden, recipe.layers,
                                                                                 recipe.intermediate)  # fmt: skip
    assert demo.draft.config.intermediate_size == recipe.draft_intermediate
    assert tuple(demo.specvlm_draft.compressor.names) == recipe.compressor_primitives
    metrics = json.loads((SHIPPED_DIR / "metrics.json").read_text())
    assert metrics["recipe"] == json.loads(json.dumps(dataclasses.asdict(recipe)))
    samples = examples(seed=4242, n=4, p_video=0, p_qa=0)  # not a seed the recipe trains or evaluates on
    enc = encode(demo.processor, [s["prompt"] for s in samples], [s["image"] for s in samples])
    tree = TreeConfig(top_k=2, total_tokens=14, depth=8)
    out = SpecVLMEngine(demo.target, demo.draft, EngineConfig(mode="eagle", tree=tree)).generate(
        **enc, max_new_tokens=48
    )
    ar = SpecVLMEngine(demo.target, None, EngineConfig(mode="ar")).generate(**enc, max_new_tokens=48)
    assert out.sequences == ar.sequences
    accept = sum(st["accept_length"] for st in out.stats) / len(out.stats)
    assert accept > 4.0, accept


def test_demo_trains_in_bf16_only_where_the_cpu_has_it(monkeypatch):
    """bf16 autocast only on native support; SPECVLM_CPU_BF16=0 or an AVX2 dispatch cap means float32."""
    monkeypatch.setenv("SPECVLM_CPU_BF16", "0")
    assert not DemoRecipe().target_bf16() and DemoRecipe(bf16=True).target_bf16()
    monkeypatch.setenv("SPECVLM_CPU_BF16", "1")
    assert DemoRecipe().target_bf16() and not DemoRecipe(bf16=False).target_bf16()
    monkeypatch.delenv("SPECVLM_CPU_BF16")
    code = "from specvlm.loading import cpu_has_native_bf16; print(cpu_has_native_bf16())"
    capped = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                            capture_output=True, text=True)  # fmt: skip
    assert capped.stdout.strip() == "False", capped.stderr[-2000:]


def test_small_demo_builds_and_loads(small_demo):
    demo, metrics = small_demo
    assert {"token_accuracy", "exact_match", "caption_exact_match"} <= set(metrics["target"])
    saved = json.loads((demo.path / "metrics.json").read_text())
    assert saved["recipe"]["target_steps"] == metrics["recipe"]["target_steps"]
    assert demo.target.config.model_type == "llava" and not demo.target.training
    assert demo.target.config.text_config.vocab_size == len(demo.processor.tokenizer)
    # the target learned something even in the reduced recipe
    assert metrics["target_log"][-1]["loss"] < metrics["target_log"][0]["loss"]


def test_demo_stages_are_reused_only_for_the_same_recipe(small_demo):
    demo, _ = small_demo
    recipe = DemoRecipe().small()
    assert is_built(demo.path, recipe)
    assert not is_built(demo.path, dataclasses.replace(recipe, draft_steps=recipe.draft_steps + 1))
    assert not is_built(demo.path)  # the full recipe is another build
    assert demo.specvlm_draft.compressor is not None and demo.draft.compressor is None
    assert demo.draft_for("specvlm") is demo.specvlm_draft and demo.draft_for("eagle") is demo.draft


@pytest.mark.parametrize("mode", ["eagle", "specvlm"])
def test_engine_on_demo_is_lossless(small_demo, mode):
    demo, _ = small_demo
    model = copy.deepcopy(demo.target).double()
    draft = copy.deepcopy(demo.draft_for(mode)).double()
    proc = demo.processor
    samples = examples(seed=5, n=3, p_video=0.3, p_qa=0.3)
    enc = encode(proc, [s["prompt"] for s in samples], [s["image"] for s in samples])
    enc["pixel_values"] = enc["pixel_values"].double()
    ref = greedy_reference(model, dict(enc), 24)
    engine = SpecVLMEngine(model, draft, EngineConfig(mode=mode, tree=TreeConfig(top_k=3, total_tokens=10, depth=4)))
    out = engine.generate(**enc, max_new_tokens=24)
    assert out.sequences == ref
    if mode == "specvlm":
        for st in out.stats:
            assert st["compressor"] in draft.compressor.names and st["draft_visual_tokens"] < 64
    assert torch.is_tensor(enc["input_ids"])


def test_half_precision_on_a_cpu_without_it(tmp_path, monkeypatch):
    """Stored half precision that this CPU would emulate loads as float32 ("as saved" never means slow); a half
    dtype asked for explicitly is kept with a warning that names the fix; native bf16 is kept silently."""
    from specvlm.demo import build_processor
    from specvlm.loading import load_target
    from specvlm.tiny import tiny_llava

    build_processor(image_size=64, patch_size=8).save_pretrained(tmp_path)
    tiny_llava(vocab=64, image_size=64, patch=8, hidden=64, layers=2).to(torch.float16).save_pretrained(tmp_path)
    monkeypatch.setenv("SPECVLM_CPU_BF16", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model, _ = load_target(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.warns(UserWarning, match="emulated.*set dtype: float32"):
        assert next(load_target(tmp_path, "bfloat16")[0].parameters()).dtype == torch.bfloat16
    monkeypatch.setenv("SPECVLM_CPU_BF16", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert next(load_target(tmp_path, "bfloat16")[0].parameters()).dtype == torch.bfloat16


def test_small_qwen_demo_builds_reads_videos_natively_and_benchmarks(tmp_path):
    """The Qwen2.5-VL demo recipe (reduced): a Qwen target reading videos as video input, its drafts, and the
    demo benchmark's methods (HF generate, HF prompt lookup, ar, eagle, specvlm) token-identical on it, and the
    compressor benchmark's eagle-vs-specvlm comparison."""
    from benchmarks.compressor import demo_drafts
    from benchmarks.demo import speed
    from specvlm.demo.recipe import build_demo
    from specvlm.distill import encode_samples

    recipe = DemoRecipe.for_family("qwen2_5_vl").small()
    metrics = build_demo(tmp_path / "demo-qwen2_5_vl", recipe, progress=False)
    assert metrics["target_log"][-1]["loss"] < metrics["target_log"][0]["loss"]
    demo = load_demo(tmp_path / "demo-qwen2_5_vl", family="qwen2_5_vl")
    assert demo.target.config.model_type == "qwen2_5_vl" and demo.specvlm_draft.compressor is not None
    video = examples(seed=5, n=1, p_video=1.0, native_video=True)
    assert len(video[0]["video"]) == recipe.video_frames
    enc = encode_samples(demo.processor, video)
    assert enc["video_grid_thw"].tolist() == [[2, 12, 12]]  # 4 frames -> 2 temporal patches of 12 x 12
    rows = speed(demo, n=1, max_new_tokens=8, repeats=1, native_video=True)
    assert {r["task"] for r in rows} == {"caption", "video", "qa"}
    assert all(r["identical_to_hf"] for r in rows), [(r["task"], r["method"]) for r in rows]
    assert any("prompt_lookup" in r["method"] for r in rows)
    spec = [r for r in rows if r["method"].startswith("specvlm") and r["task"] == "video"]
    assert spec and spec[0]["draft_visual_tokens"] < 72
    assert {r["method"] for r in spec} == {"specvlm k2-n14-d8", "specvlm k2-n14-d8 bounded"}
    fixed = [r for r in rows if r["method"].endswith("k2-n14-d8")]  # the same nodes for both drafts
    assert len(fixed) == 6 and all(r["nodes_per_round"] == 14 for r in fixed)
    drafts, choices = demo_drafts(demo, n=2, max_new_tokens=8, repeats=1)  # `specvlm bench compressor`'s comparison
    by = {(r["task"], r["draft"]): r for r in drafts}
    assert by[("video", "eagle (none)")]["visual_reduction"] == 1.0
    assert by[("video", "specvlm (elastic)")]["visual_reduction"] > 1.0 and len(choices) == 4
    assert all(r["identical_to_hf"] for r in drafts)


def test_a_build_from_before_the_family_field_still_counts(small_demo, tmp_path):
    """Recipe fields added after a build (``family``) count as their defaults, so older rebuilds are reused."""
    import shutil

    demo, _ = small_demo
    old = tmp_path / "old"
    shutil.copytree(demo.path, old)
    for f in old.glob("*metrics.json"):
        m = json.loads(f.read_text())
        m["recipe"].pop("family")
        f.write_text(json.dumps(m))
    assert is_built(old, DemoRecipe().small())
    assert not is_built(old, DemoRecipe.for_family("qwen2_5_vl").small())

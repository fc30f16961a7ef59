"""The demo target + draft recipe (reduced size), load_demo, and the engine on the result."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import greedy_reference

from specvlm import EngineConfig, SpecVLMEngine, TreeConfig
from specvlm.demo import DemoNotBuiltError, load_demo
from specvlm.demo.recipe import DemoRecipe, examples, is_built
from specvlm.distill import chat_prompt


def test_load_demo_missing_says_how_to_build(tmp_path):
    with pytest.raises(DemoNotBuiltError, match="make demo-model"):
        load_demo(tmp_path)


def test_small_demo_builds_and_loads(small_demo):
    demo, metrics = small_demo
    assert {"token_accuracy", "exact_match", "caption_exact_match"} <= set(metrics["target"])
    saved = json.loads((demo.path / "metrics.json").read_text())
    assert saved["recipe"]["target_steps"] == metrics["recipe"]["target_steps"]
    assert demo.target.config.model_type == "llava" and not demo.target.training
    assert demo.target.config.text_config.vocab_size == len(demo.processor.tokenizer)
    assert demo.prompt("describe the image.") == chat_prompt(demo.processor, "describe the image.")
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
    enc = proc(text=[chat_prompt(proc, s["prompt"]) for s in samples], images=[s["image"] for s in samples],
               return_tensors="pt", padding=True)  # fmt: skip
    enc["pixel_values"] = enc["pixel_values"].double()
    ref = greedy_reference(model, dict(enc), 24)
    engine = SpecVLMEngine(model, draft, EngineConfig(mode=mode, tree=TreeConfig(top_k=3, total_tokens=10, depth=4)))
    out = engine.generate(**enc, max_new_tokens=24)
    assert out.sequences == ref
    if mode == "specvlm":
        for st in out.stats:
            assert st["compressor"] in draft.compressor.names and st["draft_visual_tokens"] < 64
    assert torch.is_tensor(enc["input_ids"])

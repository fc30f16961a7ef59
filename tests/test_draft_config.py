"""Draft folder round trip, config validation, and the layering rule."""

from __future__ import annotations

import json

import pytest
import torch

from specvlm import EagleDraft, EngineConfig, SpecVLMEngine, TreeConfig, load_config
from specvlm.config import ConfigError, SamplingConfig
from specvlm.tiny import tiny_inputs, tiny_llava


def test_draft_from_target_is_seeded_and_shares_embedding():
    model = tiny_llava()
    a, b = EagleDraft.from_target(model, seed=3), EagleDraft.from_target(model, seed=3)
    c = EagleDraft.from_target(model, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.fc.weight, c.fc.weight)
    names = set(a.state_dict())
    assert not any("embed" in n or "lm_head" in n for n in names), names
    assert a.layer.input_layernorm is not None  # SpecVLM's input norm on the draft layer
    assert a.config.num_hidden_layers == 1 and a.config.hidden_size == model.config.text_config.hidden_size


def test_draft_save_load_round_trip(tmp_path):
    model = tiny_llava()
    draft = EagleDraft.from_target(model, seed=1)
    draft.save_pretrained(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "d" / "config.json").read_text())["architecture"] == "EagleDraft"
    loaded = EagleDraft.from_pretrained(tmp_path / "d")
    for (n, x), (_, y) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), n
    inputs = tiny_inputs(model, [4, 6])
    cfg = EngineConfig(mode="eagle", tree=TreeConfig(top_k=3, total_tokens=8, depth=3))
    a = SpecVLMEngine(model, draft, cfg).generate(**inputs, max_new_tokens=8)
    b = SpecVLMEngine(model, loaded, cfg).generate(**inputs, max_new_tokens=8)
    assert a.sequences == b.sequences and [s["accept_length"] for s in a.stats] == [s["accept_length"] for s in b.stats]


def test_draft_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a draft folder"):
        EagleDraft.from_pretrained(tmp_path)


def test_tree_config_validation():
    assert TreeConfig() == TreeConfig(top_k=10, total_tokens=60, depth=7)
    with pytest.raises(ValueError, match="total_tokens=50 exceeds"):
        TreeConfig(top_k=2, total_tokens=50, depth=2)
    with pytest.raises(ValueError, match="top_k"):
        TreeConfig(top_k=0)


def test_a_tree_can_be_named_by_its_preset():
    from specvlm.config import CPU_TREE, TREE_PRESETS

    assert EngineConfig(tree="cpu").tree == CPU_TREE == TREE_PRESETS["cpu"]
    assert EngineConfig(tree="paper").tree == TreeConfig()
    assert EngineConfig(tree="cpu-deep").tree == CPU_TREE.model_copy(update=dict(total_tokens=18, depth=12))
    assert CPU_TREE == TreeConfig(top_k=2, total_tokens=14, depth=8, depth_min_prob=0.2, node_min_prob=0.05)
    with pytest.raises(ValueError, match=r"unknown tree preset 'gpu'; one of \['cpu', 'cpu-deep', 'paper'\]"):
        EngineConfig(tree="gpu")


def test_yaml_errors_name_the_field(tmp_path):
    good = tmp_path / "e.yaml"
    good.write_text("mode: ar\ntree: {top_k: 4, total_tokens: 16, depth: 4}\n")
    assert load_config(good, EngineConfig).tree.top_k == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: fast\ntree: {top_k: 4, totl_tokens: 16}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad, EngineConfig)
    msg = str(e.value)
    assert "bad.yaml" in msg and "mode" in msg and "tree.totl_tokens" in msg
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", EngineConfig)
    (tmp_path / "x.yaml").write_text("temperature: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "x.yaml", SamplingConfig)

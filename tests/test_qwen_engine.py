"""Qwen-VL targets (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): lossless against the target's own HF generate.

Float64 tiny random-init models (`specvlm.tiny.tiny_qwen`) with a sharper init (``init_std=0.2``) so
their outputs depend on every position: a row at the wrong M-RoPE position decodes other tokens
(`test_positions_and_deepstack_matter` keeps that true).
"""

from __future__ import annotations

import pytest
import torch

from specvlm import EagleDraft, EngineConfig, SpecVLMEngine, TreeConfig
from specvlm.compressor import Segment
from specvlm.config import CompressorConfig, parse_config
from specvlm.engine import pooled_accept_length
from specvlm.target import TargetAdapter
from specvlm.tiny import EOS, IMAGE, QWEN_FAMILIES, VIDEO, tiny_qwen, tiny_qwen_inputs

SMALL_TREE = TreeConfig(top_k=4, total_tokens=16, depth=4)
ROWS = {
    "b1": [(("image", 16, 16), 6)],
    # two image sizes, a video row (Qwen3-VL: one span per temporal patch), a text-only row
    "b4": [(("image", 16, 16), 5), (("video", 4, 16, 24), 3), (None, 4), (("image", 8, 24), 2)],
}


def model_for(family: str):
    return tiny_qwen(family, dtype=torch.float64, init_std=0.2)


def reference(model, inputs: dict, max_new_tokens: int) -> list[list[int]]:
    """HF generate, greedy, image and video placeholders suppressed, cut after EOS."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=[IMAGE, VIDEO])
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in new]


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("mode", ["ar", "eagle"])
@pytest.mark.parametrize("rows", list(ROWS))
def test_greedy_matches_hf_generate(family, mode, rows):
    model = model_for(family)
    inputs = tiny_qwen_inputs(model, ROWS[rows], seed=1)
    ref = reference(model, inputs, 20)
    draft = EagleDraft.from_target(model, seed=0) if mode == "eagle" else None
    out = SpecVLMEngine(model, draft, EngineConfig(mode=mode, tree=SMALL_TREE)).generate(**inputs, max_new_tokens=20)
    assert out.sequences == ref
    for seq in out.sequences:
        assert IMAGE not in seq and VIDEO not in seq


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("primitives", [None, [dict(kind="pool", ratio=4)], [dict(kind="text")]],
                         ids=["elastic", "pool", "text"])  # fmt: skip
def test_specvlm_mode_on_qwen_grids_is_lossless(family, primitives):
    model = model_for(family)
    inputs = tiny_qwen_inputs(model, ROWS["b4"], seed=2)
    ref = reference(model, inputs, 16)
    cfg = CompressorConfig() if primitives is None else parse_config({"primitives": primitives}, CompressorConfig)
    draft = EagleDraft.from_target(model, seed=0, compressor=cfg)
    out = SpecVLMEngine(model, draft, EngineConfig(mode="specvlm", tree=SMALL_TREE)).generate(
        **inputs, max_new_tokens=16
    )
    assert out.sequences == ref
    ids = inputs["input_ids"]
    n_visual = ((ids == IMAGE) | (ids == VIDEO)).sum(1).tolist()
    for st, n in zip(out.stats, n_visual):
        assert st["draft_visual_tokens"] <= n
        if n and primitives is not None:
            assert st["draft_visual_tokens"] < n


def test_positions_and_deepstack_matter(monkeypatch):
    """The lossless tests can see M-RoPE and DeepStack mistakes: shifting the generated positions by one, or
    dropping Qwen3-VL's DeepStack features, changes these models' tokens."""
    orig = TargetAdapter._qwen_prompt

    def shifted(self, *a):
        p = orig(self, *a)
        p.next_position = p.next_position + 1
        return p

    def no_deepstack(self, *a):
        p = orig(self, *a)
        p.deepstack = None
        return p

    for family, broken in (("qwen2_5_vl", shifted), ("qwen3_vl", no_deepstack)):
        model = model_for(family)
        inputs = tiny_qwen_inputs(model, ROWS["b4"], seed=1)
        ref = reference(model, inputs, 20)
        monkeypatch.setattr(TargetAdapter, "_qwen_prompt", broken)
        out = SpecVLMEngine(model, None, EngineConfig(mode="ar")).generate(**inputs, max_new_tokens=20)
        monkeypatch.setattr(TargetAdapter, "_qwen_prompt", orig)
        assert out.sequences != ref, family


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_prompt_positions_layouts_and_prefill_logits(family):
    """Positions are the model's own get_rope_index; the next position is one past the prompt's largest
    (HF's rope delta); layouts follow the merged grids (one per video temporal slice); prefill logits equal
    the HF forward's."""
    model = model_for(family)
    inputs = tiny_qwen_inputs(model, ROWS["b4"], seed=3)
    tgt = TargetAdapter(model)
    mm = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        p = tgt.prompt(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"), True, **mm)
        hf = model(**inputs).logits  # [B, T, V]
        pos_hf, delta = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"],
            attention_mask=inputs["attention_mask"], second_per_grid_ts=inputs.get("second_per_grid_ts"),
        )  # fmt: skip
    assert torch.equal(p.positions, pos_hf)
    T = inputs["input_ids"].shape[1]
    assert p.next_position.tolist() == (inputs["attention_mask"].sum(1) + delta[:, 0]).tolist()  # real tokens + delta
    video = [(Segment(2, 3),)] * 2 if family == "qwen3_vl" else [(Segment(2, 3), Segment(2, 3))]
    assert p.layouts == [(Segment(2, 2),), *video, (Segment(1, 3),)]
    assert (p.deepstack is not None) == (family == "qwen3_vl")
    B = inputs["input_ids"].shape[0]
    kv = tgt.new_cache(B, T)
    mask = inputs["attention_mask"].bool()
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None] & mask[:, None, :]
    with torch.no_grad():
        feats = tgt.forward(p.embeds, p.positions, kv.begin(T, causal), kv, tgt.rotary_table(T), p.deepstack)
        ours = tgt.logits(feats)
    # HF's RMSNorm computes in float32 even for float64 inputs (ours keeps float64): ~1e-6 apart
    torch.testing.assert_close(ours[mask], hf[mask], rtol=1e-5, atol=1e-5)


def test_compressed_tokens_keep_their_three_axis_positions():
    model = model_for("qwen2_vl")
    inputs = tiny_qwen_inputs(model, [(("image", 16, 16), 3)], seed=4)
    tgt = TargetAdapter(model)
    mask = inputs["attention_mask"].bool()
    p = tgt.prompt(inputs["input_ids"], mask, inputs["pixel_values"], True, image_grid_thw=inputs["image_grid_thw"])
    draft = EagleDraft.from_target(model, compressor=parse_config({"primitives": [{"kind": "prune", "ratio": 2}]},
                                                                  CompressorConfig))  # fmt: skip
    span = tgt.is_visual(inputs["input_ids"])
    with torch.no_grad():
        comp = draft.compressor.compress(p.embeds, p.positions, mask, span, p.layouts, p.embeds, p.embeds[:, -1])
    assert comp.positions.shape == (3, 1, comp.embeds.shape[1])
    kept = {tuple(c) for c in comp.positions[:, 0].T.tolist()}
    every = {tuple(c) for c in p.positions[:, 0].T.tolist()}
    assert kept < every  # each kept entry has the (t, h, w) of a real prompt position; some patches dropped
    assert len({tuple(c) for c in p.positions[:, 0][:, span[0]].T.tolist()} & kept) == 2  # 4 patches -> 2


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_draft_is_the_targets_family_and_round_trips(family, tmp_path):
    model = model_for(family)
    draft = EagleDraft.from_target(model, seed=0)
    attn = draft.layer.self_attn
    assert attn.q_proj.bias is not None if family != "qwen3_vl" else attn.q_norm is not None
    draft.save_pretrained(tmp_path)
    back = EagleDraft.from_pretrained(tmp_path)
    assert type(back.layer) is type(draft.layer) and type(back.rotary_emb) is type(draft.rotary_emb)
    for (k, a), (_, b) in zip(draft.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_qwen_inputs_must_agree():
    model = model_for("qwen2_5_vl")
    engine = SpecVLMEngine(model, None, EngineConfig(mode="ar"))
    inputs = tiny_qwen_inputs(model, [(("image", 16, 16), 3)], seed=5)
    with pytest.raises(ValueError, match="image_grid_thw"):
        engine.generate(**{k: v for k, v in inputs.items() if k != "image_grid_thw"}, max_new_tokens=2)
    with pytest.raises(ValueError, match="pixel_values is missing"):
        engine.generate(**{k: v for k, v in inputs.items() if k != "pixel_values"}, max_new_tokens=2)
    video = tiny_qwen_inputs(model, [(("video", 4, 16, 16), 3)], seed=5)
    with pytest.raises(ValueError, match="pixel_values_videos is missing"):
        engine.generate(**{k: v for k, v in video.items() if k != "pixel_values_videos"}, max_new_tokens=2)


def test_distilled_qwen_draft_learns_and_stays_lossless(trained_qwen_pair):
    """Distillation on a Qwen target (images, videos, text; M-RoPE positions through the draft): the loss
    falls and held-out accept length beats the untrained draft's, token-identical to ``ar``."""
    model, draft, losses = trained_qwen_pair
    assert sum(losses[-20:]) / 20 < 0.75 * sum(losses[:20]) / 20
    rows = [(("image", 16, 16), 4), (("video", 4, 16, 16), 6), (("image", 8, 24), 5), (None, 3)]
    inputs = tiny_qwen_inputs(model, rows, seed=999)
    ar = SpecVLMEngine(model, None, EngineConfig(mode="ar")).generate(**inputs, max_new_tokens=24)
    accept = {}
    for name, d in (("trained", draft), ("untrained", EagleDraft.from_target(model, seed=0))):
        out = SpecVLMEngine(model, d, EngineConfig(mode="eagle", tree=SMALL_TREE)).generate(**inputs, max_new_tokens=24)
        assert out.sequences == ar.sequences
        accept[name] = pooled_accept_length(out.stats)
    assert accept["trained"] >= accept["untrained"] + 0.5 and accept["trained"] >= 1.8, accept

"""Lossless: the engine's tokens equal the target's own HF generate (float64, greedy)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import greedy_reference

from specvlm import EagleDraft, EngineConfig, SpecVLMEngine, TreeConfig
from specvlm.tiny import EOS, IMAGE, tiny_inputs, tiny_llava

SMALL_TREE = TreeConfig(top_k=4, total_tokens=16, depth=4)

VARIANTS = {
    "llava-gqa": dict(kv_heads=2),
    "llava-mha-full": dict(kv_heads=4, strategy="full"),
    "llava-multilayer": dict(kv_heads=1, vision_feature_layer=[-2, -1], layers=3),
    "llava-next": dict(next_=True),
}


def _engine(model, mode, tree=SMALL_TREE, draft=None):
    if mode == "eagle" and draft is None:
        draft = EagleDraft.from_target(model, seed=0)
    return SpecVLMEngine(model, draft, EngineConfig(mode=mode, tree=tree))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["ar", "eagle"])
@pytest.mark.parametrize("lengths", [[6], [5, 11, 2]], ids=["b1", "b3"])
def test_greedy_matches_hf_generate(variant, mode, lengths):
    model = tiny_llava(dtype=torch.float64, **VARIANTS[variant])
    sizes = [(16, 16), (16, 32), (32, 32)][: len(lengths)] if VARIANTS[variant].get("next_") else None
    inputs = tiny_inputs(model, lengths, seed=7, image_sizes=sizes)
    ref = greedy_reference(model, inputs, 20)
    out = _engine(model, mode).generate(**inputs, max_new_tokens=20)
    assert out.sequences == ref
    for seq, st in zip(out.sequences, out.stats):
        assert st["num_tokens"] == len(seq)
        assert IMAGE not in seq
        if mode == "ar":
            assert st["accept_length"] == 1.0 and st["target_forwards"] == len(seq)


def test_a_model_and_draft_made_under_inference_mode_decode():
    """Weights made under ``torch.inference_mode`` keep no version counter; the decoder's packed-weight cache
    (`specvlm.decoder._cached`) then keys them by storage alone rather than failing."""
    with torch.inference_mode():
        model = tiny_llava(dtype=torch.float64, kv_heads=2)
        draft = EagleDraft.from_target(model, seed=0)
    inputs = tiny_inputs(model, [6, 3], seed=7)
    out = _engine(model, "eagle", draft=draft).generate(**inputs, max_new_tokens=12)
    assert out.sequences == greedy_reference(model, inputs, 12)


@pytest.fixture(scope="module")
def trained64(trained_pair):
    model, draft = trained_pair
    return copy.deepcopy(model).double(), copy.deepcopy(draft).double()


@pytest.mark.parametrize(
    "tree",
    [
        SMALL_TREE,
        TreeConfig(),
        TreeConfig(top_k=1, total_tokens=2, depth=1),
        TreeConfig(top_k=2, total_tokens=6, depth=5),
        TreeConfig(top_k=2, total_tokens=10, depth=6, depth_min_prob=0.3, node_min_prob=0.05),
    ],
    ids=["small", "paper", "chain1", "deep", "bounded"],
)
def test_trained_draft_accepts_many_tokens_losslessly(trained64, tree):
    model, draft = trained64
    inputs = tiny_inputs(model, [3, 7, 5, 4], seed=100)  # prompts like the draft's training data
    ref = greedy_reference(model, inputs, 24)
    out = _engine(model, "eagle", tree, draft).generate(**inputs, max_new_tokens=24)
    assert out.sequences == ref
    mean_accept = sum(s["accept_length"] for s in out.stats) / len(out.stats)
    if tree.depth > 1:
        assert mean_accept > 1.5, out.stats  # multi-token paths were committed
    for st in out.stats:
        rounds = st["target_forwards"] - 1
        if tree.depth_min_prob == 0:
            assert st["draft_forwards"] == 1 + tree.depth * rounds
        else:  # the confidence bound may stop growing early: between 1 and `depth` forwards per round
            assert 1 + rounds <= st["draft_forwards"] <= 1 + tree.depth * rounds
        candidates = tree.top_k + (tree.depth - 1) * tree.top_k**2  # k at depth 1, k * k at each deeper level
        full = min(tree.total_tokens, 1 + candidates)  # the root and the best total_tokens - 1 candidates
        if tree.node_min_prob == 0:
            assert st["tree_nodes"] == full * rounds
        else:
            assert 2 * rounds <= st["tree_nodes"] <= full * rounds


def test_confidence_bounds_shrink_the_tree_not_the_output(trained64):
    """Bounds near 1 leave the draft few forwards and the target few nodes; the tokens stay the target's."""
    model, draft = trained64
    inputs = tiny_inputs(model, [3, 7, 5, 4], seed=100)
    ref = greedy_reference(model, inputs, 24)
    full, bounded = (
        _engine(model, "eagle", TreeConfig(top_k=2, total_tokens=10, depth=6, **kw), draft).generate(
            **inputs, max_new_tokens=24
        )
        for kw in ({}, {"depth_min_prob": 0.95, "node_min_prob": 0.95})
    )
    assert full.sequences == bounded.sequences == ref
    assert sum(s["draft_forwards"] for s in bounded.stats) < sum(s["draft_forwards"] for s in full.stats)
    assert sum(s["tree_nodes"] for s in bounded.stats) < sum(s["tree_nodes"] for s in full.stats)


def test_max_new_tokens_and_eos(trained64):
    model, draft = trained64
    inputs = tiny_inputs(model, [4, 6], seed=101)
    eng = _engine(model, "eagle", SMALL_TREE, draft)
    for n in (1, 2, 5):
        out = eng.generate(**inputs, max_new_tokens=n)
        assert out.sequences == greedy_reference(model, inputs, n)
        assert all(len(s) <= n for s in out.sequences)
    # make EOS the target's favourite token after a few steps: sequences must stop right after it
    ref = greedy_reference(model, inputs, 24)
    eos_model = copy.deepcopy(model)
    eos_model.generation_config.eos_token_id = ref[0][3]
    out = _engine(eos_model, "eagle", SMALL_TREE, draft).generate(**inputs, max_new_tokens=24)
    assert out.sequences[0] == ref[0][: ref[0].index(ref[0][3]) + 1]
    assert EOS not in out.sequences[0] or out.sequences[0][-1] == EOS


@pytest.mark.parametrize("mode", ["ar", "eagle"])
def test_on_tokens_reports_every_step_and_can_end_rows(trained64, mode):
    model, draft = trained64
    inputs = tiny_inputs(model, [3, 7, 5], seed=100)
    eng = _engine(model, mode, SMALL_TREE, draft)
    full = eng.generate(**inputs, max_new_tokens=20)
    events = []
    out = eng.generate(**inputs, max_new_tokens=20, on_tokens=events.append)
    assert out.sequences == full.sequences  # observing changes nothing
    for b, seq in enumerate(full.sequences):
        assert [t for e in events for t in e.tokens.get(b, [])] == seq
        assert sum(b in e.finished for e in events) == 1
        last = [e for e in events if b in e.tokens][-1]
        assert b in last.finished and last.stats[b] == out.stats[b]
    if mode == "eagle":
        assert max(len(t) for e in events for t in e.tokens.values()) > 1  # several tokens per round

    def end_row_1(event):  # end row 1 once it holds 5 tokens; the others go on untouched
        seen[1] = seen.get(1, 0) + len(event.tokens.get(1, []))
        return [1] if seen[1] >= 5 else None

    seen = {}
    out = eng.generate(**inputs, max_new_tokens=20, on_tokens=end_row_1)
    assert out.sequences[0] == full.sequences[0] and out.sequences[2] == full.sequences[2]
    assert 5 <= len(out.sequences[1]) < len(full.sequences[1])
    assert out.sequences[1] == full.sequences[1][: len(out.sequences[1])]
    assert out.stats[1]["num_tokens"] == len(out.sequences[1])


def test_seeded_sampling_is_deterministic(trained_pair):
    model, draft = trained_pair
    inputs = tiny_inputs(model, [4, 6], seed=3)
    eng = _engine(model, "eagle", SMALL_TREE, draft)
    a = eng.generate(**inputs, max_new_tokens=16, temperature=1.0, seed=5).sequences
    b = eng.generate(**inputs, max_new_tokens=16, temperature=1.0, seed=5).sequences
    c = eng.generate(**inputs, max_new_tokens=16, temperature=1.0, seed=6).sequences
    assert a == b
    assert a != c


# --------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny():
    model = tiny_llava()
    return model, tiny_inputs(model, [4], seed=0)


def test_image_tokens_missing(tiny):
    model, inp = tiny
    ids = inp["input_ids"].clone()
    ids[ids == IMAGE] = 5
    with pytest.raises(ValueError, match="no image placeholder"):
        _engine(model, "ar").generate(ids, inp["attention_mask"], inp["pixel_values"], max_new_tokens=4)


def test_image_tokens_mismatched(tiny):
    model, inp = tiny
    ids = inp["input_ids"].clone()
    ids[0, 2] = 5  # one placeholder fewer than the image's visual tokens
    with pytest.raises(ValueError, match="placeholder tokens but the images give"):
        _engine(model, "ar").generate(ids, inp["attention_mask"], inp["pixel_values"], max_new_tokens=4)


def test_pixel_values_missing(tiny):
    model, inp = tiny
    with pytest.raises(ValueError, match="pixel_values is missing"):
        _engine(model, "ar").generate(inp["input_ids"], inp["attention_mask"], None, max_new_tokens=4)


def test_unsupported_model_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=64))  # fmt: skip
    with pytest.raises(ValueError, match="unsupported target model LlamaForCausalLM"):
        SpecVLMEngine(lm, None, EngineConfig(mode="ar"))


@pytest.mark.parametrize("n", [0, -3])
def test_max_new_tokens_must_be_positive(tiny, n):
    model, inp = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        _engine(model, "ar").generate(**inp, max_new_tokens=n)


def test_right_padding_rejected(tiny):
    model, inp = tiny
    mask = inp["attention_mask"].clone()
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        _engine(model, "ar").generate(inp["input_ids"], mask, inp["pixel_values"], max_new_tokens=4)


def test_eagle_needs_a_draft(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="needs a draft"):
        SpecVLMEngine(model, None, EngineConfig(mode="eagle"))


def test_llava_next_needs_image_sizes():
    model = tiny_llava(next_=True)
    inp = tiny_inputs(model, [3])
    inp.pop("image_sizes")
    with pytest.raises(ValueError, match="image_sizes"):
        _engine(model, "ar").generate(**inp, max_new_tokens=2)


def test_pooled_accept_length_weighs_requests_by_their_rounds():
    from specvlm.engine import pooled_accept_length

    caption, answer = {"num_tokens": 11, "target_forwards": 3}, {"num_tokens": 2, "target_forwards": 2}
    assert pooled_accept_length([caption, answer]) == (10 + 1) / (2 + 1)
    assert pooled_accept_length([{"num_tokens": 1, "target_forwards": 1}]) == 1.0  # prefill only


def test_packed_projections_match_and_follow_weight_updates(monkeypatch):
    """Small layers run q/k/v and gate/up as one matmul over cached packed weights (``[in, out]`` on CPU);
    an in-place weight update (an optimizer step on a draft evaluated mid-training) rebuilds the cache."""
    from specvlm import decoder
    from specvlm.target import TargetAdapter

    model = tiny_llava(kv_heads=2).float()
    tgt = TargetAdapter(model)
    inp = tiny_inputs(model, [5, 9])
    embeds = tgt.prompt(inp["input_ids"], inp["attention_mask"], inp["pixel_values"]).embeds  # [B, T, D]
    mask = inp["attention_mask"].bool()
    B, T = mask.shape
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None] & mask[:, None, :]

    def features():  # [B, T, D] over a fresh cache
        kv = tgt.new_cache(B, T)
        kv.valid[:, :T] = mask
        with torch.no_grad():
            return tgt.forward(embeds, positions, kv.begin(T, causal), kv)

    assert all(tgt.fast)
    fused = features()
    assert len(decoder._PACKED) > 0
    monkeypatch.setattr(decoder, "FUSE_MAX_BYTES", 0)  # every layer counts as large: separate projections
    plain = features()
    torch.testing.assert_close(fused[mask], plain[mask], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        tgt.layers[0].self_attn.k_proj.weight.mul_(1.5)
        tgt.layers[1].mlp.up_proj.weight.add_(0.01)
    plain2 = features()
    monkeypatch.setattr(decoder, "FUSE_MAX_BYTES", 64 << 20)
    torch.testing.assert_close(features()[mask], plain2[mask], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain2[mask], plain[mask])
    x = plain2[mask]  # [N, D]: the LM head through `decoder.linear`, before and after an update
    with torch.no_grad():
        torch.testing.assert_close(tgt.logits(x), tgt.lm_head(x), rtol=1e-5, atol=1e-5)
        tgt.lm_head.weight.mul_(0.5)
        torch.testing.assert_close(tgt.logits(x), tgt.lm_head(x), rtol=1e-5, atol=1e-5)
    y = decoder.linear(x.clone().requires_grad_(), tgt.lm_head)  # autograd on: the module itself, gradients flow
    y.sum().backward()
    assert tgt.lm_head.weight.grad is not None


def test_narrow_draft_round_trips_and_stays_lossless(tmp_path):
    """``intermediate_size`` narrows the draft layer's MLP; config.json keeps it; outputs stay the target's."""
    model = tiny_llava(dtype=torch.float64, kv_heads=2)
    draft = EagleDraft.from_target(model, seed=0, intermediate_size=16)
    assert draft.layer.mlp.gate_proj.out_features == 16 != model.config.text_config.intermediate_size
    draft.save_pretrained(tmp_path)
    again = EagleDraft.from_pretrained(tmp_path)
    assert again.layer.mlp.down_proj.in_features == 16
    inputs = tiny_inputs(model, [5, 11, 2], seed=7)
    out = _engine(model, "eagle", draft=again.double()).generate(**inputs, max_new_tokens=20)
    assert out.sequences == greedy_reference(model, inputs, 20)


def test_set_draft_swaps_the_draft_between_batches(trained64):
    """A newer draft replaces the running one while the engine is idle (the target stays); outputs stay the
    target's, only accept length follows the draft. A busy engine or ``ar`` mode refuses."""
    model, trained = trained64
    inputs = tiny_inputs(model, [3, 7, 5, 4], seed=101)
    ref = greedy_reference(model, inputs, 24)
    engine = _engine(model, "eagle", draft=EagleDraft.from_target(model, seed=0))
    weak = engine.generate(**inputs, max_new_tokens=24)
    engine.set_draft(copy.deepcopy(trained))
    strong = engine.generate(**inputs, max_new_tokens=24)
    assert weak.sequences == strong.sequences == ref
    accept = [sum(s["accept_length"] for s in out.stats) for out in (weak, strong)]
    assert accept[1] > accept[0]
    engine.add(**{k: v[:1] for k, v in inputs.items()})
    with pytest.raises(RuntimeError, match="idle"):
        engine.set_draft(trained)
    with pytest.raises(ValueError, match="ar"):
        _engine(model, "ar").set_draft(trained)

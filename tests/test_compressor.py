"""The elastic visual compressor: primitives on grids / tiles / frames, the gate, the rewritten
sequence, distillation through it, and lossless ``specvlm`` decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_reference

from specvlm import EagleDraft, EngineConfig, SpecVLMEngine, TreeConfig
from specvlm.compressor import ElasticCompressor, Layout, Segment, build_primitive, layout_size, window
from specvlm.config import CompressorConfig, ConfigError, PrimitiveConfig, parse_config
from specvlm.distill import DistillBatch, distill_step, make_optimizer
from specvlm.target import TargetAdapter
from specvlm.tiny import IMAGE, tiny_inputs, tiny_llava

D = 16
NEXT_TILES = (Segment(4, 4), Segment(4, 8, newline=True))  # LLaVA-NeXT: base tile + unpadded grid with newlines


def grid_layout(rows: int, cols: int, frames: int = 1) -> Layout:
    """``frames`` grids of ``rows x cols`` patches (a still image is one frame)."""
    return tuple(Segment(rows, cols) for _ in range(frames))


FRAMES = grid_layout(4, 4, frames=3)  # a video: one grid per frame
CLS_GRID = (Segment(loose=1), Segment(8, 8))  # LLaVA-1.5 "full": CLS + grid


def prim(kind, **kw):
    torch.manual_seed(0)
    return build_primitive(PrimitiveConfig(kind=kind, **kw), D, 2).eval()


# (kind, kwargs, layout) -> expected P'
CASES = [
    ("pool", dict(ratio=4), grid_layout(8, 8), 16),
    ("pool", dict(ratio=16), grid_layout(8, 8), 4),
    ("pool", dict(ratio=2), grid_layout(8, 8), 32),  # window (1, 2)
    ("pool", dict(ratio=4), grid_layout(5, 7), 12),  # partial edge blocks: 3 x 4
    ("pool", dict(ratio=4), NEXT_TILES, 4 + 8),
    ("pool", dict(ratio=4), FRAMES, 3 * 4),
    ("pool", dict(ratio=4), CLS_GRID, 1 + 16),
    ("conv", dict(ratio=4), grid_layout(8, 8), 16),
    ("conv", dict(ratio=16), grid_layout(5, 7), 2 * 2),
    ("conv", dict(ratio=4), NEXT_TILES, 12),
    ("conv", dict(ratio=4), FRAMES, 12),
    ("prune", dict(ratio=4), grid_layout(8, 8), 16),
    ("prune", dict(ratio=4, learned=False), grid_layout(8, 8), 16),
    ("prune", dict(ratio=3), grid_layout(5, 7), 12),  # ceil(35 / 3)
    ("prune", dict(ratio=4), NEXT_TILES, 4 + 8),
    ("prune", dict(ratio=4), FRAMES, 12),
    ("resampler", dict(queries=2), grid_layout(8, 8), 2),
    ("resampler", dict(queries=2), NEXT_TILES, 4),
    ("resampler", dict(queries=1), FRAMES, 3),
    ("resampler", dict(queries=2), CLS_GRID, 1 + 2),
    ("text", dict(), NEXT_TILES, 0),
    ("text", dict(), CLS_GRID, 0),
    ("none", dict(), NEXT_TILES, 16 + 36),
]


@pytest.mark.parametrize("kind,kw,layout,expected", CASES)
def test_primitive_shapes_and_sources(kind, kw, layout, expected):
    p = prim(kind, **kw)
    P = layout_size(layout)
    x = torch.randn(1, P, D)
    y, src = p(x, layout)
    assert y.shape == (1, expected, D) and src.shape == (expected,)
    assert p.out_len(layout) == expected
    if expected:
        assert src.min() >= 0 and src.max() < P
    if kind not in ("none", "resampler"):  # outputs come from patches, never from newline separators
        newline_idx = {16 + r * 9 + 8 for r in range(4)} if layout == NEXT_TILES else set()
        assert not newline_idx & set(src.tolist())


def test_pool_averages_blocks_and_conv_starts_as_pooling():
    x = torch.randn(1, 64, D)
    y, src = prim("pool", ratio=4)(x, grid_layout(8, 8))
    grid = x[0].view(8, 8, D)
    assert torch.allclose(y[0, 0], grid[:2, :2].reshape(4, D).mean(0), atol=1e-6)
    assert torch.allclose(y[0, 5], grid[2:4, 2:4].reshape(4, D).mean(0), atol=1e-6)
    assert src[:4].tolist() == [0, 2, 4, 6] and src[4] == 16  # each block's top-left patch
    yc, srcc = prim("conv", ratio=4)(x, grid_layout(8, 8))
    assert torch.allclose(yc, y, atol=1e-5) and torch.equal(src, srcc)


def test_prune_keeps_patches_in_order():
    x = torch.randn(1, 64, D)
    for p in (prim("prune", ratio=4), prim("prune", ratio=4, learned=False)):
        y, src = p(x, grid_layout(8, 8))
        assert (src[1:] > src[:-1]).all()
        assert torch.allclose(y[0], x[0, src], atol=1e-6)  # the value is the patch itself
    rnd = prim("prune", ratio=4, learned=False)
    assert torch.equal(rnd(x, grid_layout(8, 8))[1], rnd(x, grid_layout(8, 8))[1])  # inference: seeded subset


def test_layout_mismatch_is_an_error():
    with pytest.raises(ValueError, match="layout"):
        prim("pool", ratio=4)(torch.randn(1, 10, D), grid_layout(4, 4))


def test_window():
    assert [window(r) for r in (1, 2, 4, 8, 9, 16)] == [(1, 1), (1, 2), (2, 2), (2, 4), (3, 3), (4, 4)]


# ----------------------------------------------------------------------------- config
def test_config_names_and_errors():
    cfg = CompressorConfig()
    assert [p.name for p in cfg.primitives] == ["pool4", "pool16", "conv4", "prune4", "resampler2", "text"]
    assert PrimitiveConfig(kind="prune", learned=False).name == "random_prune4"
    for name in ("pool4", "conv16", "prune4", "random_prune4", "resampler2", "text", "none"):
        assert PrimitiveConfig.from_name(name).name == name
    for bad in ("pool", "text4", "random_pool4", "blur2"):
        with pytest.raises(ValueError, match="not a primitive name"):
            PrimitiveConfig.from_name(bad)
    with pytest.raises(ConfigError, match="distinct"):
        parse_config({"primitives": [{"kind": "pool"}, {"kind": "pool"}]}, CompressorConfig)
    with pytest.raises(ConfigError, match="text"):
        parse_config({"mode": "weight", "primitives": [{"kind": "pool"}, {"kind": "text"}]}, CompressorConfig)
    with pytest.raises(ConfigError, match="kind"):
        parse_config({"primitives": [{"kind": "blur"}]}, CompressorConfig)
    with pytest.raises(ConfigError, match="cost_weight applies to mode 'select'"):
        parse_config({"mode": "concat", "cost_weight": 0.1}, CompressorConfig)


# ----------------------------------------------------------------------------- the gate and the sequence
def _sequence(B=3, P=16, seed=0):
    """Left-padded draft entries with one 4x4 image per row at different offsets."""
    g = torch.Generator().manual_seed(seed)
    pre, post = [1, 3, 2], [5, 2, 7]
    T = max(a + P + b for a, b in zip(pre, post))
    h = torch.randn(B, T, D, generator=g)
    feats = torch.randn(B, T, D, generator=g)
    valid = torch.zeros(B, T, dtype=torch.bool)
    span = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        n = pre[b] + P + post[b]
        valid[b, T - n :] = True
        span[b, T - n + pre[b] : T - n + pre[b] + P] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return h, positions, valid, span, [grid_layout(4, 4)] * B, feats, feats[:, -1]


def test_compress_rewrites_the_sequence():
    torch.manual_seed(0)
    comp = ElasticCompressor(CompressorConfig(), D, 2).eval()
    h, positions, valid, span, layouts, feats, query = _sequence()
    out = comp.compress(h, positions, valid, span, layouts, feats, query)
    for b in range(3):
        k = int(out.choice[b])
        n_vis = comp.primitives[k].out_len(layouts[b])
        assert int(out.visual_tokens[b]) == n_vis
        kept = out.source[b] >= 0
        assert int(kept.sum()) == int((valid[b] & ~span[b]).sum())  # every text entry kept, once
        src = out.source[b][kept]
        assert torch.equal(out.embeds[b][kept], h[b, src])  # text entries untouched ...
        assert torch.equal(out.positions[b][kept], positions[b, src])  # ... at the target's positions
        assert int(out.valid[b].sum()) == int(kept.sum()) + n_vis
        assert not out.valid[b, : out.valid.shape[1] - int(out.valid[b].sum())].any()  # left padding
        vis_pos = out.positions[b][out.valid[b] & ~kept]
        first, last = positions[b][span[b]].min(), positions[b][span[b]].max()
        assert ((vis_pos >= first) & (vis_pos <= last)).all()  # visual tokens sit inside the image's span
    assert out.logits.shape == (3, len(comp.names))


def test_inference_selection_is_deterministic_and_per_row():
    torch.manual_seed(0)
    comp = ElasticCompressor(CompressorConfig(), D, 2).eval()
    args = _sequence()
    a = comp.compress(*args)
    b = comp.compress(*args)
    assert torch.equal(a.choice, b.choice) and torch.equal(a.embeds, b.embeds)
    h, positions, valid, span, layouts, feats, query = args
    alone = comp.compress(h[1:2], positions[1:2], valid[1:2], span[1:2], layouts[1:2], feats[1:2], query[1:2])
    assert int(alone.choice[0]) == int(a.choice[1])  # a row's choice does not depend on its batch


def test_select_training_forces_each_primitive():
    torch.manual_seed(0)
    comp = ElasticCompressor(CompressorConfig(), D, 2).train()
    h, positions, valid, span, layouts, feats, query = _sequence()
    for k, prim in enumerate(comp.primitives):
        out = comp.compress(h, positions, valid, span, layouts, feats, query, choice=torch.full((3,), k))
        assert out.choice.tolist() == [k] * 3
        assert out.visual_tokens.tolist() == [prim.out_len(layout) for layout in layouts]
    weighted = ElasticCompressor(CompressorConfig(mode="weight", primitives=[dict(kind="pool", ratio=4)]), D, 2)
    with pytest.raises(ValueError, match="needs mode 'select'"):
        weighted.compress(h, positions, valid, span, layouts, feats, query, choice=torch.zeros(3, dtype=torch.long))


def _train_gate(comp, losses, steps=30):
    """SGD on the gate alone through `select_loss` with fixed per-primitive losses ``[B, K]``."""
    args = _sequence()
    layouts = args[4]
    visual = torch.tensor([[p.out_len(layout) for p in comp.primitives] for layout in layouts])  # [B, K]
    full = torch.full((len(layouts),), 16)
    opt = torch.optim.SGD(comp.gate.parameters(), lr=1.0)
    comp.train()
    for step in range(steps):
        opt.zero_grad()
        comp.select_loss(comp.compress(*args).logits, losses, visual, full).backward()
        if step == 0:  # gradients reach the gate through the Gumbel-softmax weights
            assert comp.gate[-1].weight.grad.abs().sum() > 0
        opt.step()
    comp.eval()
    return set(comp.compress(*args).choice.tolist())


def test_gate_learns_each_rows_lowest_loss_primitive():
    torch.manual_seed(0)
    comp = ElasticCompressor(CompressorConfig(), D, 2)
    best = comp.names.index("conv4")
    losses = torch.ones(3, len(comp.names))
    losses[:, best] = 0.0
    assert _train_gate(comp, losses) == {best}


def test_cost_term_pushes_the_gate_to_cheaper_primitives():
    torch.manual_seed(0)
    comp = ElasticCompressor(CompressorConfig(cost_weight=1.0), D, 2)
    assert _train_gate(comp, torch.zeros(3, len(comp.names))) == {comp.names.index("text")}


@pytest.mark.parametrize("mode", ["weight", "concat"])
def test_weight_and_concat_modes(mode):
    torch.manual_seed(0)
    prims = [dict(kind="pool", ratio=4), dict(kind="conv", ratio=4), dict(kind="resampler", queries=4)]
    comp = ElasticCompressor(parse_config({"mode": mode, "primitives": prims}, CompressorConfig), D, 2).eval()
    out = comp.compress(*_sequence())
    assert out.visual_tokens.tolist() == [4 if mode == "weight" else 12] * 3
    bad = ElasticCompressor(parse_config({"mode": "weight", "primitives": prims[:2] + [dict(kind="resampler")]},
                                         CompressorConfig), D, 2)  # fmt: skip
    with pytest.raises(ValueError, match="equal output length"):
        bad.compress(*_sequence())


# ----------------------------------------------------------------------------- draft, distillation, engine
def _batch(model, sizes=None):
    inp = tiny_inputs(model, [5, 11, 2], seed=7, image_sizes=sizes)
    loss_mask = torch.zeros_like(inp["attention_mask"])
    loss_mask[:, -3:] = 1
    media = {"image_sizes": inp["image_sizes"]} if "image_sizes" in inp else {}
    return DistillBatch(inp["input_ids"], inp["attention_mask"], loss_mask, inp["pixel_values"], media)


@pytest.mark.parametrize("next_", [False, True], ids=["llava", "llava-next"])
def test_distillation_trains_draft_compressor_and_gate(next_):
    model = tiny_llava(next_=next_)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = _batch(model, [(16, 16), (16, 32), (32, 32)] if next_ else None)
    draft = EagleDraft.from_target(model, compressor=CompressorConfig(cost_weight=0.01))
    opt = make_optimizer(draft, lr=2e-3)
    target = TargetAdapter(model)
    losses = []
    for _ in range(8):
        res = distill_step(target, draft, batch, opt)
        losses.append(res.loss.item())
        assert draft.compressor.gate[0].weight.grad.abs().sum() > 0
        for prim in draft.compressor.primitives:  # every primitive trains on every row, not just the chosen
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prim.parameters())
        assert len(res.choices) == 3 and res.visual_tokens >= 0
    assert losses[-1] < losses[0]


def test_draft_with_compressor_saves_and_loads(tmp_path):
    model = tiny_llava()
    cfg = CompressorConfig(mode="select", cost_weight=0.05, primitives=[dict(kind="conv", ratio=4), dict(kind="text")])
    draft = EagleDraft.from_target(model, compressor=cfg)
    draft.save_pretrained(tmp_path / "d")
    loaded = EagleDraft.from_pretrained(tmp_path / "d")
    assert loaded.compressor is not None and loaded.compressor.config == cfg
    for (k, a), (k2, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    plain = EagleDraft.from_target(model)
    plain.save_pretrained(tmp_path / "p")
    assert EagleDraft.from_pretrained(tmp_path / "p").compressor is None


def test_specvlm_mode_needs_a_compressor():
    model = tiny_llava()
    with pytest.raises(ValueError, match="compressor"):
        SpecVLMEngine(model, EagleDraft.from_target(model), EngineConfig(mode="specvlm"))
    with pytest.raises(ValueError, match="needs a draft"):
        SpecVLMEngine(model, None, EngineConfig(mode="specvlm"))


VARIANTS = {
    "llava-gqa": dict(kv_heads=2),
    "llava-mha-full": dict(kv_heads=4, strategy="full"),
    "llava-next": dict(next_=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("primitives", [None, [dict(kind="text")], [dict(kind="prune", ratio=4)]],
                         ids=["elastic", "text", "prune"])  # fmt: skip
@pytest.mark.parametrize("lengths", [[6], [5, 11, 2]], ids=["b1", "b3"])
def test_specvlm_greedy_matches_hf_generate(variant, primitives, lengths):
    model = tiny_llava(dtype=torch.float64, **VARIANTS[variant])
    sizes = [(16, 16), (16, 32), (32, 32)][: len(lengths)] if VARIANTS[variant].get("next_") else None
    inputs = tiny_inputs(model, lengths, seed=7, image_sizes=sizes)
    ref = greedy_reference(model, inputs, 20)
    cfg = CompressorConfig() if primitives is None else parse_config({"primitives": primitives}, CompressorConfig)
    draft = EagleDraft.from_target(model, seed=0, compressor=cfg)
    engine = SpecVLMEngine(
        model, draft, EngineConfig(mode="specvlm", tree=TreeConfig(top_k=4, total_tokens=16, depth=4))
    )
    out = engine.generate(**inputs, max_new_tokens=20)
    assert out.sequences == ref
    n_visual = (inputs["input_ids"] == IMAGE).sum(1).tolist()
    for st, n in zip(out.stats, n_visual):
        assert st["compressor"] in draft.compressor.names
        assert 0 <= st["draft_visual_tokens"] < n
        if primitives == [dict(kind="text")]:
            assert st["draft_visual_tokens"] == 0


def test_specvlm_with_trained_pair_accepts_many_tokens(trained_pair):
    """A compressor draft initialized from a trained eagle draft still accepts long runs, losslessly."""
    model, draft = trained_pair
    inputs = tiny_inputs(model, [3, 7, 5, 4], seed=100)  # prompts like the draft's training data
    ref = greedy_reference(model, inputs, 24)
    spec = EagleDraft.from_target(model, compressor=parse_config({"primitives": [{"kind": "pool", "ratio": 4}]},
                                                                 CompressorConfig))  # fmt: skip
    spec.load_state_dict(draft.state_dict(), strict=False)  # fc + layer from the trained draft
    engine = SpecVLMEngine(
        model, spec, EngineConfig(mode="specvlm", tree=TreeConfig(top_k=4, total_tokens=16, depth=4))
    )
    out = engine.generate(**inputs, max_new_tokens=24)
    assert out.sequences == ref
    assert sum(s["accept_length"] for s in out.stats) / len(out.stats) > 1.5

"""Continuous batching: rows join a running batch between rounds and leave when done; per-row settings.

Float64 tiny models: a greedy row added mid-flight decodes exactly its own `generate` tokens (and HF's),
whatever runs beside it; a seeded sampled row draws the same tokens alone or in any batch.
"""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_reference

from specvlm import EagleDraft, EngineConfig, SamplingConfig, SpecVLMEngine, TreeConfig
from specvlm.inputs import collate
from specvlm.tiny import EOS, PAD, tiny_inputs, tiny_llava, tiny_qwen, tiny_qwen_inputs

TREE = TreeConfig(top_k=3, total_tokens=10, depth=4)
BOUNDED = TreeConfig(top_k=3, total_tokens=10, depth=4, depth_min_prob=0.3, node_min_prob=0.1)


def _engine(model, mode, tree=TREE, draft=None):
    if mode != "ar" and draft is None:
        draft = EagleDraft.from_target(model, seed=0)
    return SpecVLMEngine(model, draft, EngineConfig(mode=mode, tree=tree))


def _rows(inputs: dict) -> list[dict]:
    """A left-padded LLaVA batch -> one processor output per row (as a Serve request brings it)."""
    out = []
    for b in range(inputs["input_ids"].shape[0]):
        m = inputs["attention_mask"][b].bool()
        out.append({"input_ids": inputs["input_ids"][b][m][None], "attention_mask": torch.ones(1, int(m.sum())),
                    "pixel_values": inputs["pixel_values"][b : b + 1]})  # fmt: skip
    return out


def _drive(engine, arrivals: dict[int, list[tuple[dict, SamplingConfig]]]) -> dict[int, list[int]]:
    """Step ``engine``; at step s add ``arrivals[s]`` (each a batch of rows with their settings); returns
    each added row's tokens by the order it was added. Checks the pools' host lengths after every step."""
    seqs, order, s = {}, [], 0
    while s <= max(arrivals) or engine.num_rows:
        for batch, sampling in arrivals.get(s, []):
            order += engine.add(**batch, sampling=sampling)
        event = engine.step()
        for rid, toks in event.tokens.items():
            seqs.setdefault(rid, []).extend(toks)
        for kv in (engine.kv, *([engine.drafter.kv] if engine.drafter else [])):  # the host mirror holds
            assert kv.host_lengths == kv.lengths.tolist()
        s += 1
    return [seqs.get(rid, []) for rid in order]


@pytest.mark.parametrize(
    "mode, tree", [("ar", TREE), ("eagle", TREE), ("eagle", BOUNDED), ("specvlm", TREE), ("specvlm", BOUNDED)]
)
def test_rows_joining_mid_flight_decode_as_alone(mode, tree):
    model = tiny_llava(dtype=torch.float64, kv_heads=2)
    inputs = tiny_inputs(model, [5, 11, 2, 8, 3], seed=7)
    ref = greedy_reference(model, inputs, 16)
    draft = None
    if mode == "specvlm":
        from specvlm.config import CompressorConfig

        draft = EagleDraft.from_target(model, seed=0, compressor=CompressorConfig())
    engine = _engine(model, mode, tree, draft)
    rows = _rows(inputs)
    budget = [SamplingConfig(max_new_tokens=16)]
    # two rows at step 0, one at step 2 (others mid-decode), two together at step 5 (with different lengths)
    arrivals = {0: [(collate(rows[:2], PAD), budget * 2)], 2: [(collate(rows[2:3], PAD), budget)],
                5: [(collate(rows[3:], PAD), budget * 2)]}  # fmt: skip
    assert _drive(engine, arrivals) == ref
    assert engine.num_rows == 0 and engine.kv.rows == 0  # every row left the pool


def _three_rows():
    """Three float64 tiny-LLaVA rows of prompt lengths 5, 11, 2: their greedy `generate` tokens (12 each), an
    eagle engine, the rows' processor inputs and a 12-token budget."""
    model = tiny_llava(dtype=torch.float64, kv_heads=2)
    inputs = tiny_inputs(model, [5, 11, 2], seed=7)
    return (
        greedy_reference(model, inputs, 12),
        _engine(model, "eagle"),
        _rows(inputs),
        [SamplingConfig(max_new_tokens=12)],
    )


def test_first_tokens_go_out_before_the_round_and_a_row_ended_there_skips_it():
    """``step(on_prefill=)``: the new rows' first tokens come in an event of their own, before the round (one
    token per new row); with the round's tokens they are the rows' `generate` tokens. A row its owner ends in
    that callback (a stop string at the first token) leaves before the round; its neighbours are unchanged."""
    ref, engine, rows, budget = _three_rows()
    arrivals = {0: rows[:2], 2: rows[2:]}
    seqs, firsts, s = {}, [], 0

    def on_prefill(event):
        assert all(len(t) == 1 for t in event.tokens.values()) and not seqs.keys() & event.tokens.keys()
        firsts.append(sorted(event.tokens))
        for rid, toks in event.tokens.items():
            seqs[rid] = list(toks)
        if 1 in event.tokens:
            engine.finish([1])  # its owner ends row 1 at its first token

    while s <= max(arrivals) or engine.num_rows:
        if s in arrivals:
            engine.add(**collate(arrivals[s], PAD), sampling=budget * len(arrivals[s]))
        event = engine.step(on_prefill=on_prefill)
        assert 1 not in event.tokens
        for rid, toks in event.tokens.items():
            seqs[rid] += toks
        s += 1
    assert firsts == [[0, 1], [2]]
    assert seqs[0] == ref[0] and seqs[2] == ref[2] and seqs[1] == ref[1][:1]
    assert engine.num_rows == 0 and engine.kv.rows == 0


def test_rows_added_in_on_prefill_are_prefilled_in_the_same_step_and_join_its_round():
    """A row `add`-ed from ``on_prefill`` (a request that arrived during the prefill) is prefilled next, in a
    second ``on_prefill`` call of the same step, and decodes in that step's round; every row keeps its
    `generate` tokens."""
    ref, engine, rows, budget = _three_rows()
    seqs, firsts, steps = {}, [], [0]

    def on_prefill(event):
        firsts.append((steps[0], sorted(event.tokens)))
        for rid, toks in event.tokens.items():
            seqs[rid] = list(toks)
        if steps[0] == 1 and len(firsts) == 2:  # in step 1, during row 1's prefill: row 2 arrives
            engine.add(**collate(rows[2:], PAD), sampling=budget)

    engine.add(**collate(rows[:1], PAD), sampling=budget)
    while steps[0] < 2 or engine.num_rows:
        if steps[0] == 1:
            engine.add(**collate(rows[1:2], PAD), sampling=budget)
        event = engine.step(on_prefill=on_prefill)
        if steps[0] == 1:
            assert sorted(event.tokens) == [0, 1, 2]  # the late row decoded in this step's round
        for rid, toks in event.tokens.items():
            seqs[rid] += toks
        steps[0] += 1
    assert firsts == [(0, [0]), (1, [1]), (1, [2])]
    assert [seqs[i] for i in range(3)] == ref
    assert engine.num_rows == 0 and engine.kv.rows == 0


def test_qwen_rows_of_any_media_join_mid_flight():
    """Images of two sizes, a video and a text-only row join a running Qwen2.5-VL batch one by one."""
    model = tiny_qwen("qwen2_5_vl", dtype=torch.float64, init_std=0.2)
    specs = [(("image", 16, 16), 5), (("video", 4, 16, 24), 3), (None, 4), (("image", 8, 24), 2)]
    ref = []
    alone = []
    for i, spec in enumerate(specs):
        inp = tiny_qwen_inputs(model, [spec], seed=10 + i)
        alone.append(inp)
        out = model.generate(**inp, max_new_tokens=14, do_sample=False, suppress_tokens=[3, 4])
        seq = out[0, inp["input_ids"].shape[1] :].tolist()
        ref.append(seq[: seq.index(EOS) + 1] if EOS in seq else seq)
    engine = _engine(model, "eagle")
    arrivals = {i * 2: [(inp, [SamplingConfig(max_new_tokens=14)])] for i, inp in enumerate(alone)}
    assert _drive(engine, arrivals) == ref


def test_seeded_rows_sample_the_same_tokens_alone_or_in_any_batch(trained_pair):
    """Per-row generators and per-row trees (confidence bounds decided per row): a seeded row's tokens do
    not depend on its neighbours or on when it joined; rows with different settings share the batch."""
    model, draft = trained_pair
    inputs = tiny_inputs(model, [5, 9, 3, 7], seed=11)
    rows = _rows(inputs)
    settings = [SamplingConfig(max_new_tokens=20, temperature=1.0, seed=123),
                SamplingConfig(max_new_tokens=20, temperature=0.7, top_k=5, seed=7),
                SamplingConfig(max_new_tokens=12),  # greedy beside sampled rows
                SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.8, seed=99)]  # fmt: skip
    engine = _engine(model, "eagle", TreeConfig(top_k=3, total_tokens=10, depth=4, depth_min_prob=0.2,
                                                  node_min_prob=0.05), draft)  # fmt: skip
    alone = [_drive(engine, {0: [(collate([r], PAD), [s])]})[0] for r, s in zip(rows, settings)]
    together = _drive(engine, {0: [(collate(rows, PAD), settings)]})
    staggered = _drive(
        engine, {0: [(collate(rows[2:], PAD), settings[2:])], 3: [(collate(rows[:2], PAD), settings[:2])]}
    )
    assert together == alone and staggered == [alone[2], alone[3], alone[0], alone[1]]
    assert len(alone[2]) <= 12 and len({tuple(a) for a in alone}) == 4
    ar = _engine(model, "ar")
    assert _drive(ar, {0: [(collate([rows[2]], PAD), [settings[2]])]})[0] == alone[2]  # the greedy row is lossless


def test_per_row_budgets_stop_ids_and_finish():
    model = tiny_llava(dtype=torch.float64)
    inputs = tiny_inputs(model, [5, 8, 3], seed=7)
    ref = greedy_reference(model, inputs, 12)
    stop = ref[1][4]  # row 1 stops at its 5th token
    assert ref[1].index(stop) == 4 and all(len(r) == 12 for r in ref)
    settings = [SamplingConfig(max_new_tokens=3), SamplingConfig(max_new_tokens=12, stop_token_ids=(stop,)),
                SamplingConfig(max_new_tokens=12)]  # fmt: skip
    engine = _engine(model, "eagle")
    rids = engine.add(**inputs, sampling=settings)
    seqs = {r: [] for r in rids}
    finished = set()
    steps = 0
    while engine.num_rows:
        event = engine.step()
        for rid, toks in event.tokens.items():
            seqs[rid] += toks
        finished |= event.finished
        steps += 1
        if steps == 2:
            engine.finish([rids[2]])  # a cancelled request: leaves at the next step with what it has
    assert seqs[rids[0]] == ref[0][:3]
    assert seqs[rids[1]] == ref[1][: ref[1].index(stop) + 1]
    assert seqs[rids[2]] == ref[2][: len(seqs[rids[2]])] and len(seqs[rids[2]]) < len(ref[2])
    assert {rids[0], rids[1]} <= finished


def test_generate_needs_an_idle_engine_and_leaves_none_behind():
    model = tiny_llava()
    inputs = tiny_inputs(model, [4], seed=1)
    engine = _engine(model, "eagle")
    engine.add(**inputs)
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.generate(**inputs, max_new_tokens=2)
    engine.reset()
    with pytest.raises(ValueError, match="sampling settings"):
        engine.add(**inputs, sampling=[SamplingConfig(), SamplingConfig()])
    assert engine.generate(**inputs, max_new_tokens=3).sequences and engine.num_rows == 0


def test_batch_aware_trees_never_change_outputs(trained_pair):
    """`EngineConfig.batch_trees`: the tree per round follows the live rows, down to no speculation (the draft
    follows along); outputs are the target's whichever ran, as rows join and leave."""
    from specvlm.config import parse_config

    cfg = parse_config({"mode": "eagle", "tree": "cpu", "batch_trees": {2: {"top_k": 2, "total_tokens": 6,
                        "depth": 3}, 3: "off"}}, EngineConfig)  # fmt: skip
    assert cfg.tree_for(1) == cfg.tree and cfg.tree_for(2).total_tokens == 6 and cfg.tree_for(5) is None
    model, draft = trained_pair
    inputs = tiny_inputs(model, [5, 9, 3, 7], seed=21)
    ar = _engine(model, "ar").generate(**inputs, max_new_tokens=20).sequences
    engine = SpecVLMEngine(model, draft, cfg)
    rows = _rows(inputs)
    budget = [SamplingConfig(max_new_tokens=20)]
    # 1 row (cpu tree), then 2 (small tree), then 4 (off), then back down as rows finish
    arrivals = {0: [(collate(rows[:1], PAD), budget)], 2: [(collate(rows[1:2], PAD), budget)],
                4: [(collate(rows[2:], PAD), budget * 2)]}  # fmt: skip
    assert _drive(engine, arrivals) == ar
    alone = SpecVLMEngine(model, draft, cfg).generate(**{k: v[:1] for k, v in inputs.items()}, max_new_tokens=20)
    off = SpecVLMEngine(model, draft, EngineConfig(mode="eagle", batch_trees={1: "off"}))
    out = off.generate(**inputs, max_new_tokens=20)
    assert out.sequences == ar and all(s["accept_length"] == 1.0 for s in out.stats)
    assert alone.stats[0]["accept_length"] > 1.2  # one row alone speculates (the trained draft accepts)
    with pytest.raises(ValueError, match="batch_trees"):
        parse_config({"batch_trees": {0: "off"}}, EngineConfig)


def test_auto_policy_decides_from_costs_learns_accept_length_and_explores():
    """`AutoPolicy`: speculate while a round's cost per expected token beats a plain step's (costs linear
    between measured sizes); the accept length (pooled over row-rounds) and a measured/calibrated cost ratio
    follow the engine's rounds; a decision flips only past the margin; an off size still speculates every
    ``explore``-th round."""
    from specvlm.policy import AutoPolicy, StepCost

    tree = EngineConfig().tree
    costs = [StepCost(1, 4.0, 10.0), StepCost(4, 5.0, 14.0), StepCost(16, 8.0, 40.0)]
    policy = AutoPolicy(tree, costs, accept_length=3.0, explore=4)
    assert policy.calibrated(10) == pytest.approx((6.5, 27.0)) and policy.calibrated(28) == pytest.approx((11.0, 66.0))
    assert [policy.speculates(r) for r in (1, 3, 4, 15, 16, 64)] == [True, True, True, False, False, False]
    assert policy.crossover() == 16
    assert [policy.tree_for(16) is not None for _ in range(8)] == [False, False, False, True] * 2
    policy.observe(4, 14.0, [2, 2])  # the prior counts as one row-round: (0.95 * 3 + 4) / (0.95 + 2)
    assert policy.accept_length == pytest.approx(6.85 / 2.95) and policy.rounds == 1
    assert policy.scale == {"spec": 1.0, "ar": 1.0}  # the round took what the table said
    policy.observe(4, 10.0, None)  # plain steps take twice the table's time: the ratio moves by 5%
    assert policy.scale["ar"] == pytest.approx(1.05)

    tie = AutoPolicy(tree, [StepCost(1, 10.0, 31.0)], accept_length=3.0)
    assert tie.tree_for(1) is not None  # 10.33 per token against 10: within the margin, stays on
    tie.observe(1, 40.0, [2])  # a slow round that accepted little
    assert tie.tree_for(1) is None
    with pytest.raises(ValueError, match="at least one"):
        AutoPolicy(tree, [], 3.0)


def test_auto_batch_trees_calibrate_at_start_up_and_never_change_outputs(trained_pair):
    """``batch_trees: auto`` times plain and speculative steps at each `auto_rows` size when the engine is
    built (leaving it idle), and decodes exactly what ``ar`` does as rows join and leave."""
    model, draft = trained_pair
    cfg = EngineConfig(mode="eagle", tree="cpu", batch_trees="auto", auto_rows=(1, 2, 4))
    engine = SpecVLMEngine(model, draft, cfg)
    state = engine.policy.describe()
    assert state["policy"] == "auto" and [c["rows"] for c in state["costs"]] == [1, 2, 4]
    assert all(c["ar_ms"] > 0 and c["spec_ms"] > 0 for c in state["costs"]) and engine.num_rows == 0
    inputs = tiny_inputs(model, [5, 9, 3, 7], seed=22)
    ar = _engine(model, "ar").generate(**inputs, max_new_tokens=20).sequences
    rows, budget = _rows(inputs), [SamplingConfig(max_new_tokens=20)]
    arrivals = {0: [(collate(rows[:1], PAD), budget)], 2: [(collate(rows[1:], PAD), budget * 3)]}
    assert _drive(engine, arrivals) == ar
    with pytest.raises(ValueError, match="auto"):
        cfg.tree_for(1)
    with pytest.raises(ValueError, match="ar"):
        _engine(model, "ar").calibrate([1])


def test_draft_catches_up_on_rounds_without_speculation_in_one_forward():
    """Rounds without speculation only record entries; the next proposal's one catch-up forward leaves the
    draft as step-by-step catch-up would, and a row that joined since keeps its state."""
    model = tiny_llava(dtype=torch.float64)
    inputs = tiny_inputs(model, [5, 8], seed=4)
    states = []
    for lazy in (True, False):
        engine = _engine(model, "eagle")
        engine.add(**{k: v[:1] for k, v in inputs.items()}, sampling=[SamplingConfig(max_new_tokens=30)])
        engine.step()  # prefill row 0, then its first round
        with torch.inference_mode():
            for _ in range(3):
                engine._ar_step({})  # a round the policy runs without speculation
                if not lazy:
                    engine.drafter.sync(engine._pos)
        engine.add(**{k: v[1:] for k, v in inputs.items()}, sampling=[SamplingConfig(max_new_tokens=30)])
        engine.step()  # row 1's prefill, then a speculative round for both (row 0's catch-up first)
        d = engine.drafter
        states.append((d.hidden.clone(), d.kv.lengths.clone(), d.kv.keys[:, :, :, : int(d.kv.lengths.max())].clone()))
    (h1, n1, k1), (h2, n2, k2) = states
    assert torch.equal(n1, n2)
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(k1, k2)

"""Sampling is lossless: the engine's token distribution equals the target's (chi-square)."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from specvlm import EngineConfig, SamplingConfig, SpecVLMEngine, TreeConfig
from specvlm.engine import row_seed
from specvlm.tiny import EOS, IMAGE, VIDEO, tiny_inputs, tiny_qwen_inputs
from specvlm.verify import process_logits

TEMP, TOP_K = 1.0, 4  # top-k keeps the exact joint small enough to enumerate


def _exact_joint(model, inputs, n_tokens: int) -> dict[tuple[int, ...], float]:
    """P(first n tokens) under the target's own sampling distribution, by enumeration (one prompt; media
    inputs as its processor gives them)."""
    suppress = torch.tensor([IMAGE, VIDEO] if "mm_token_type_ids" in inputs else [IMAGE])
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    joint = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for prefix, p in joint.items():
            if prefix and prefix[-1] == EOS:  # finished sequences stay as they are
                nxt[prefix] = p
                continue
            ids = torch.cat([inputs["input_ids"], torch.tensor([prefix], dtype=torch.long)], dim=1)
            mask = torch.ones_like(ids)
            if "mm_token_type_ids" in inputs:  # Qwen-VL: generated tokens are text
                media["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, len(prefix)))
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, **media).logits[0, -1]
            probs = process_logits(logits.double(), TEMP, TOP_K, 1.0, suppress)
            for t in probs.nonzero()[:, 0].tolist():
                nxt[prefix + (t,)] = p * float(probs[t])
        joint = nxt
    return joint


def _joining(engine, batch: dict, rows: int, n_tokens: int, seed: int) -> list[tuple[list[int], dict]]:
    """Half the rows start; the other half joins the running batch after its first round."""
    settings = [SamplingConfig(max_new_tokens=n_tokens, temperature=TEMP, top_k=TOP_K, seed=row_seed(seed, b))
                for b in range(rows)]  # fmt: skip
    half = rows // 2
    part = lambda a, b: {k: v[a:b] for k, v in batch.items()}  # noqa: E731
    rids = engine.add(**part(0, half), sampling=settings[:half])
    seqs, stats, steps = {}, {}, 0
    while engine.num_rows or steps < 2:
        if steps == 1:  # after the first step: the first half's prefill and first round
            assert engine.num_rows, "the first half finished before the second could join it"
            rids += engine.add(**part(half, rows), sampling=settings[half:])
        event = engine.step()
        for rid, toks in event.tokens.items():
            seqs[rid] = seqs.get(rid, []) + toks
            stats[rid] = event.stats[rid]
        steps += 1
    return [(seqs[r], stats[r]) for r in rids]


@pytest.mark.parametrize("mode", ["eagle", "eagle-bounded", "ar", "eagle-qwen", "eagle-joining"])
def test_first_tokens_follow_target_distribution(request, mode):
    if mode == "eagle-qwen":  # a Qwen2.5-VL target with a video prompt: M-RoPE positions in every round
        model, draft, _ = request.getfixturevalue("trained_qwen_pair")
        inputs = tiny_qwen_inputs(model, [(("video", 4, 16, 16), 5)], seed=100)
        mode = "eagle"
    else:
        model, draft = request.getfixturevalue("trained_pair")
        inputs = tiny_inputs(model, [5], seed=100)
    n_tokens, rows, calls = 3, 250, 8
    exact = _exact_joint(model, inputs, n_tokens)
    # bounded: confidence bounds high enough to cut the tree on most rounds; the trees stay draft-only functions
    bounds = {"depth_min_prob": 0.9, "node_min_prob": 0.9} if mode == "eagle-bounded" else {}
    joining = mode == "eagle-joining"  # rows join a running batch (continuous batching)
    mode = mode.removesuffix("-bounded").removesuffix("-joining")
    tree = TreeConfig(top_k=4, total_tokens=12, depth=3, **bounds)
    engine = SpecVLMEngine(model, draft if mode == "eagle" else None, EngineConfig(mode=mode, tree=tree))
    batch = {k: v.repeat(rows, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
    counts: dict[tuple[int, ...], int] = {}
    accepted, cuts = [], 0
    for c in range(calls):
        if joining:
            results = _joining(engine, batch, rows, n_tokens, c)
        else:
            out = engine.generate(**batch, max_new_tokens=n_tokens, temperature=TEMP, top_k=TOP_K, seed=c)
            results = zip(out.sequences, out.stats)
        for seq, st in results:
            key = tuple(seq[:n_tokens])
            counts[key] = counts.get(key, 0) + 1
            accepted.append(st["target_forwards"])
            cuts += st["draft_forwards"] < 1 + tree.depth * (st["target_forwards"] - 1)  # a round stopped early
    total = rows * calls
    assert set(counts) <= set(exact), "sampled a sequence the target gives probability 0"
    # pool cells with small expected counts so the chi-square approximation holds
    cells = sorted(exact, key=exact.get, reverse=True)
    big = [c for c in cells if exact[c] * total >= 5]
    small = [c for c in cells if exact[c] * total < 5]
    obs = [counts.get(c, 0) for c in big] + [sum(counts.get(c, 0) for c in small)]
    exp = [exact[c] * total for c in big] + [sum(exact[c] for c in small) * total]
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = chisquare(obs, exp)
    assert stat.pvalue > 1e-3, (stat, list(itertools.islice(zip(obs, exp), 10)))
    if mode == "eagle":  # the speculative round really did accept draft tokens sometimes
        assert min(accepted) == 2 and any(f == 2 for f in accepted)
        assert (cuts > 0) == bool(bounds)  # the bounds really stopped some trees early

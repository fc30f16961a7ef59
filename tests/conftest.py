"""Shared fixtures: tiny random-init VLMs built in code, and a draft distilled onto one."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def greedy_reference(model, inputs: dict, max_new_tokens: int) -> list[list[int]]:
    """The target's own HF generate (greedy, image tokens suppressed), cut after EOS."""
    from specvlm.tiny import EOS, IMAGE

    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=[IMAGE])
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in new]


@pytest.fixture(scope="session")
def trained_pair():
    """A float32 tiny LLaVA and a draft distilled for a few hundred steps on its greedy outputs.

    The draft agrees with the target often, so multi-token acceptance and the
    KV-cache commit of long paths are exercised (accept length well above 1).
    """
    from specvlm import EagleDraft, EngineConfig, SpecVLMEngine
    from specvlm.distill import DistillBatch, distill_step, make_optimizer
    from specvlm.target import TargetAdapter
    from specvlm.tiny import tiny_inputs, tiny_llava

    model = tiny_llava(layers=2, seed=1)
    for p in model.parameters():
        p.requires_grad_(False)
    ar = SpecVLMEngine(model, None, EngineConfig(mode="ar"))
    batches = []
    for s in range(8):
        inp = tiny_inputs(model, [3 + s % 5] * 8, seed=100 + s)
        seqs = ar.generate(**inp, max_new_tokens=24).sequences
        rows = []
        for b in range(8):
            prompt = inp["input_ids"][b][inp["attention_mask"][b].bool()].tolist()
            rows.append((prompt, seqs[b]))
        T = max(len(p) + len(r) for p, r in rows)
        ids = torch.zeros(8, T, dtype=torch.long)
        am, lm = torch.zeros_like(ids), torch.zeros_like(ids)
        for b, (p, r) in enumerate(rows):
            n = len(p) + len(r)
            ids[b, T - n :] = torch.tensor(p + r)
            am[b, T - n :] = 1
            lm[b, T - len(r) :] = 1
        batches.append(DistillBatch(ids, am, lm, inp["pixel_values"]))
    draft = EagleDraft.from_target(model, seed=0)
    target = TargetAdapter(model)
    opt = make_optimizer(draft, lr=3e-3)
    for step in range(300):
        distill_step(target, draft, batches[step % len(batches)], opt)
    draft.eval()
    return model, draft


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test run (``ray.init`` costs ~9 s here), on loopback only."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """The demo recipe at reduced size and step count (same code path as ``make demo-model``)."""
    from specvlm.demo import load_demo
    from specvlm.demo.recipe import DemoRecipe, build_demo

    out = tmp_path_factory.mktemp("specvlm-home") / "demo"
    metrics = build_demo(out, DemoRecipe().small(), progress=False)
    return load_demo(out), metrics

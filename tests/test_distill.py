"""The framework-free distillation step (no Ray): loss goes down, wrappers and checkpoints are faithful."""

from __future__ import annotations

import io
import math

import pytest
import torch

from specvlm import EagleDraft
from specvlm.distill import (
    BadSample,
    DistillBatch,
    Teacher,
    WrappedDraft,
    distill_loss,
    distill_step,
    load_training_state,
    make_optimizer,
    sample_from_row,
    save_training_state,
    teacher_forward,
)
from specvlm.target import TargetAdapter
from specvlm.tiny import tiny_inputs, tiny_llava


class _FixedDraft:
    """Stands in for the draft's forward only: fixed features ``g`` and logits ``g @ W.T`` (a 3-word LM head)."""

    compressor = None

    def __init__(self, g: torch.Tensor, lm_head: torch.Tensor):
        self.g, self.lm_head = g, lm_head

    def __call__(self, tokens, features, positions, mask):
        return self.g

    def log_probs(self, hidden):
        return (hidden @ self.lm_head.T).log_softmax(-1)


def test_distill_loss_matches_a_hand_computed_value():
    """0.1 * softCE + SmoothL1 on two response tokens over a 3-word vocabulary, worked out by hand.

    Tokens x0..x3, the response is x2 x3, so draft entries 0 and 1 (reading f0, f1) are scored against the
    target's logits at 1, 2 and its features f1, f2. Draft logits are ``[g_0, g_1, 0]``.
    entry 0: g = (0, 0): draft probs uniform, softCE = ln 3 whatever the target says; f1 = (0.5, 0):
             SmoothL1 = mean(0.5 * 0.5^2, 0) = 0.0625.
    entry 1: g = (ln 2, 0): draft probs (1/2, 1/4, 1/4); target logits (0, 0, ln 2): probs (1/4, 1/4, 1/2);
             softCE = -(1/4 ln 1/2 + 1/4 ln 1/4 + 1/2 ln 1/4) = 1.75 ln 2; f2 = (ln 2, 3): SmoothL1 =
             mean(0, 3 - 0.5) = 1.25.
    loss = 0.1 * (ln 3 + 1.75 ln 2) / 2 + (0.0625 + 1.25) / 2.
    """
    ln2, ln3 = math.log(2), math.log(3)
    g = torch.tensor([[[0.0, 0.0], [ln2, 0.0], [7.0, -7.0]]], dtype=torch.float64)  # [B=1, T-1=3, D=2]
    features = torch.tensor([[[9.0, 9.0], [0.5, 0.0], [ln2, 3.0], [9.0, 9.0]]], dtype=torch.float64)  # [1, 4, 2]
    logits = torch.tensor([[[5.0, 0, 0], [1.0, 2.0, 3.0], [0, 0, ln2], [5.0, 0, 0]]], dtype=torch.float64)
    span = torch.zeros(1, 3, dtype=torch.bool)
    teacher = Teacher(torch.zeros(1, 4, 2, dtype=torch.float64), features, logits, torch.arange(4)[None], span)
    batch = DistillBatch(torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long), torch.tensor([[0, 0, 1, 1]]))
    lm_head = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    res = distill_loss(_FixedDraft(g, lm_head), teacher, batch)
    expected_ce, expected_feat = (ln3 + 1.75 * ln2) / 2, (0.0625 + 1.25) / 2
    close = dict(rel=1e-6)  # the loss reads the teacher's logits and features in float32
    assert res.loss_logit == pytest.approx(expected_ce, **close)
    assert res.loss_feat == pytest.approx(expected_feat, **close)
    assert res.loss.item() == pytest.approx(0.1 * expected_ce + expected_feat, **close)
    assert res.draft_top1 == pytest.approx(0.0)  # draft argmax 0 (a tie, first wins) and 0; target's 2 and 2


def _batch(model, seed: int = 0) -> DistillBatch:
    """Left-padded [prompt; random response] rows, loss on the response (last 6 tokens)."""
    inp = tiny_inputs(model, [4, 7], seed=seed)
    g = torch.Generator().manual_seed(seed)
    resp = torch.randint(4, model.config.text_config.vocab_size, (2, 6), generator=g)  # [B, 6]
    ids = torch.cat([inp["input_ids"], resp], dim=1)  # [B, T]
    attn = torch.cat([inp["attention_mask"], torch.ones_like(resp)], dim=1)
    loss = torch.zeros_like(ids)
    loss[:, -6:] = 1
    return DistillBatch(ids, attn, loss, inp["pixel_values"])


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llava(seed=3)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, TargetAdapter(model)


def test_distill_step_loss_decreases(tiny):
    model, target = tiny
    draft = EagleDraft.from_target(model, seed=0)
    opt = make_optimizer(draft, lr=3e-3)
    batch = _batch(model)
    losses = [distill_step(target, draft, batch, opt).loss.item() for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_wrapped_draft_is_the_same_step(tiny):
    """WrappedDraft routes the forward through a wrapper module and gives the plain step's loss and update."""
    model, target = tiny
    batch = _batch(model, seed=1)
    a, b = EagleDraft.from_target(model, seed=0), EagleDraft.from_target(model, seed=0)
    calls = []

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.module(*args, **kwargs)

    ra = distill_step(target, a, batch, make_optimizer(a, lr=1e-3))
    rb = distill_step(target, WrappedDraft(b, Wrapper(b)), batch, make_optimizer(b, lr=1e-3))
    assert calls == [1]
    assert torch.equal(ra.loss.detach(), rb.loss.detach())
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_zero_loss_mask_gives_zero_gradient(tiny):
    """A step whose rows were all bad (loss mask zeroed) still runs, and teaches nothing."""
    model, target = tiny
    draft = EagleDraft.from_target(model, seed=0)
    batch = _batch(model, seed=2)
    batch.loss_mask.zero_()
    res = distill_loss(draft, teacher_forward(target, batch), batch)
    res.loss.backward()
    assert res.loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in draft.parameters())


def test_training_state_round_trip(tiny, tmp_path):
    model, target = tiny
    draft = EagleDraft.from_target(model, seed=0)
    opt = make_optimizer(draft, lr=1e-3)
    distill_step(target, draft, _batch(model), opt)
    save_training_state(tmp_path, draft, opt, {"step": 7, "skipped_rows": 2})
    assert EagleDraft.from_pretrained(tmp_path / "draft").config.hidden_size == draft.config.hidden_size
    other = EagleDraft.from_target(model, seed=5)
    opt2 = make_optimizer(other, lr=1e-3)
    assert load_training_state(tmp_path, other, opt2) == {"step": 7, "skipped_rows": 2}
    for (name, pa), pb in zip(draft.state_dict().items(), other.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_sample_from_row(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    (tmp_path / "ok.png").write_bytes(buf.getvalue())
    (tmp_path / "bad.png").write_bytes(b"not a png")
    s = sample_from_row({"image": "ok.png", "prompt": "q", "response": "a"}, base=str(tmp_path))
    assert s["image"].size == (8, 8) and s["response"] == "a"
    assert sample_from_row({"image": buf.getvalue(), "prompt": "q"}, need_response=False)["response"] == ""
    bad = [
        ({"image": "bad.png", "prompt": "q", "response": "a"}, "decode"),
        ({"image": "missing.png", "prompt": "q", "response": "a"}, "read"),
        ({"image": b"", "prompt": "q", "response": "a"}, "empty"),
        ({"image": "ok.png", "prompt": "q", "response": "  "}, "empty: no response"),
        ({"image": None, "prompt": "q", "response": "a"}, "read"),
    ]
    for row, kind in bad:
        with pytest.raises(BadSample, match=f"^{kind}"):
            sample_from_row(row, base=str(tmp_path))

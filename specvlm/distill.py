"""Online-logit distillation of the draft: one framework-free step and a plain loop.

Legend: B batch rows, T tokens, D hidden, V vocab.

SpecVLM §3.3: the frozen target runs on the fly over (image, prompt,
response); nothing is stored. The draft is teacher-forced on the target's
own features: at entry i it reads ``[embed(x_{i+1}); f_i]`` and predicts
``f_{i+1}``. The loss, over response positions only::

    L = 0.1 * softCE(lm_head(g_i), target_logits_{i+1}) + 1.0 * SmoothL1(g_i, f_{i+1})

Only the draft's parameters (and, with the compressor, the compressor's)
receive gradients; the target, its embedding and LM head are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .decoder import causal_mask
from .draft import EagleDraft
from .engine import pooled_accept_length
from .inputs import CONCAT_KEYS, IGNORE_INDEX, encode, left_pad, pad_token_id, question_chat
from .inputs import collate as collate_inputs
from .target import TargetAdapter


@dataclass
class DistillBatch:
    """One training batch, left-padded: prompt followed by the response (EOS included)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] 1 where the token is part of the response
    pixel_values: torch.Tensor | None = None
    media: dict = field(default_factory=dict)  # the processor's other media outputs: image_sizes, *_grid_thw, ...

    @classmethod
    def from_padded(cls, padded: dict, pixel_values=None, media: dict | None = None) -> DistillBatch:
        """From `specvlm.inputs.left_pad`'s training batch: the loss covers the labelled (response) positions."""
        loss_mask = (padded["labels"] != IGNORE_INDEX).long()  # [B, T]
        return cls(padded["input_ids"], padded["attention_mask"], loss_mask, pixel_values, dict(media or {}))


@dataclass
class Teacher:
    """What the frozen target gives the draft for one batch."""

    embeds: torch.Tensor  # [B, T, D] input embeddings, visual features merged
    features: torch.Tensor  # [B, T, D] last hidden states (LM-head input)
    logits: torch.Tensor  # [B, T, V]
    positions: torch.Tensor  # [B, T], or [3, B, T] (M-RoPE)
    span: torch.Tensor  # [B, T-1] bool: entry i reads a visual placeholder x_{i+1}
    layouts: list = field(default_factory=list)  # one compressor.Layout per visual span (specvlm drafts)


@torch.no_grad()
def teacher_forward(target: TargetAdapter, batch: DistillBatch) -> Teacher:
    """Frozen target pass over a whole batch (no cache)."""
    mask = batch.attention_mask
    p = target.prompt(batch.input_ids, mask, batch.pixel_values, return_layouts=True, **batch.media)
    extra = {}
    if p.deepstack is not None:  # Qwen3-VL: the language model adds them after its first layers
        extra = {"visual_pos_masks": p.deepstack[0], "deepstack_visual_embeds": p.deepstack[1]}
    out = target.language_model(
        inputs_embeds=p.embeds, attention_mask=mask, position_ids=p.positions, use_cache=False, **extra
    )
    feats = out.last_hidden_state
    span = target.is_visual(batch.input_ids[:, 1:])
    return Teacher(p.embeds, feats, target.logits(feats), p.positions, span, p.layouts)


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, with grad
    loss_logit: float
    loss_feat: float
    draft_top1: float  # fraction of response positions where draft argmax == target argmax
    visual_tokens: float = 0.0  # specvlm drafts: mean visual tokens the draft read per row
    choices: list[int] | None = None  # specvlm drafts: the gate's primitive per row


def distill_loss(
    draft: EagleDraft,
    teacher: Teacher,
    batch: DistillBatch,
    logit_weight: float = 0.1,
    feat_weight: float = 1.0,
    feature_noise: float = 0.0,
) -> StepResult:
    """The SpecVLM loss for one batch (teacher already computed).

    A draft with a compressor (``specvlm``) reads each visual span
    (``teacher.span``) through it. In ``select`` mode with K > 1
    primitives every row runs under every primitive, as one forward over
    ``K * B`` rows, and `ElasticCompressor.select_loss` weights the K losses
    by the gate (with its cost term); the logged figures are those of the
    gate's current argmax per row.
    """
    f_in = teacher.features[:, :-1]  # [B, T-1, D] f_i
    if feature_noise > 0:
        f_in = f_in + (torch.rand_like(f_in) - 0.5) * 2 * feature_noise  # EAGLE: uniform noise
    tok_in = teacher.embeds[:, 1:]  # [B, T-1, D] embed(x_{i+1})
    mask = batch.attention_mask[:, :-1]  # entry i is real iff f_i is
    B, T1, D = f_in.shape
    compressor = getattr(draft, "compressor", None)
    K = len(compressor.primitives) if compressor is not None and compressor.config.mode == "select" else 1
    comp = None
    positions = teacher.positions[..., :-1]  # [(3,) B, T-1]
    if compressor is None:
        g = draft(tok_in, f_in, positions, causal_mask(mask, f_in.dtype))  # [B, T-1, D]
    else:
        span = teacher.span  # [B, T-1] entry i reads visual token x_{i+1}
        last_prompt = (batch.loss_mask.argmax(1) - 1).clamp(min=0)  # [B] the prompt's last token
        query = teacher.features[torch.arange(B, device=span.device), last_prompt]  # [B, D]

        def rep(t: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [K * B, ...], row k * B + b = row b
            return t.repeat(K, *(1,) * (t.dim() - 1))

        forced = torch.arange(K, device=span.device).repeat_interleave(B) if K > 1 else None  # [K * B]
        compress = dict(valid=rep(mask.bool()), span=rep(span), layouts=list(teacher.layouts) * K,
                        features=rep(teacher.features[:, :-1]), query=rep(query), choice=forced)  # fmt: skip
        rep_pos = positions.repeat(1, K, 1) if positions.dim() == 3 else rep(positions)  # [(3,) K * B, T-1]
        g, comp = draft(rep(tok_in), rep(f_in), rep_pos, None, compress=compress)  # [KB, T-1, D]
    target_f = teacher.features[:, 1:].float()  # [B, T-1, D] f_{i+1}
    target_logits = teacher.logits[:, 1:].float()  # [B, T-1, V] predicts x_{i+2}
    # response positions: x_{i+2} is a response token
    sel = torch.zeros_like(mask, dtype=torch.bool)
    sel[:, :-1] = batch.loss_mask[:, 2:].bool()
    n = sel.sum().clamp(min=1)
    logp = draft.log_probs(g).view(K, B, T1, -1)  # [K, B, T-1, V]
    soft_ce = -(target_logits.softmax(-1) * logp).sum(-1)  # [K, B, T-1]
    feat = F.smooth_l1_loss(g.float().view(K, B, T1, D), target_f.expand(K, -1, -1, -1), reduction="none").mean(-1)
    row_logit = (soft_ce * sel).sum(-1) / n  # [K, B] each row's share of the batch's mean
    row_feat = (feat * sel).sum(-1) / n  # [K, B]
    row_top1 = ((logp.argmax(-1) == target_logits.argmax(-1)) & sel).sum(-1) / n  # [K, B]
    row_loss = logit_weight * row_logit + feat_weight * row_feat  # [K, B]
    if K == 1:
        loss, pick = row_loss.sum(), torch.zeros(B, dtype=torch.long, device=row_loss.device)
    else:
        logits = comp.logits[:B]  # [B, K] (the K copies of a row see the same gate input)
        full = span.sum(1)  # [B]
        loss = compressor.select_loss(logits, row_loss.T, comp.visual_tokens.view(K, B).T, full)
        pick = logits.argmax(-1)  # [B]

    def at_pick(x: torch.Tensor) -> torch.Tensor:  # [K * B] or [K, B] -> [B] each row's gate-chosen entry
        return x.view(K, B).T.gather(1, pick[:, None])[:, 0]

    res = StepResult(loss, at_pick(row_logit).sum().item(), at_pick(row_feat).sum().item(),
                     at_pick(row_top1).sum().item())  # fmt: skip
    if comp is not None:
        res.visual_tokens = at_pick(comp.visual_tokens).float().mean().item()
        res.choices = at_pick(comp.choice).tolist()
    return res


def distill_step(
    target: TargetAdapter,
    draft: EagleDraft,
    batch: DistillBatch,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float = 1.0,
    **loss_kwargs,
) -> StepResult:
    """Teacher pass, draft pass, loss, backward, clip, optimizer step."""
    teacher = teacher_forward(target, batch)
    draft.train()
    res = distill_loss(draft, teacher, batch, **loss_kwargs)
    optimizer.zero_grad(set_to_none=True)
    res.loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in draft.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    return res


def make_optimizer(draft: EagleDraft, lr: float = 8e-5, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """The paper's AdamW (beta 0.9, 0.95), no weight decay."""
    return torch.optim.AdamW(draft.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


# ----------------------------------------------------------------------------- data
def encode_samples(processor, samples: list[dict]):
    """`specvlm.inputs.encode` of samples ``{"image": PIL | "video": [frames], "prompt": question}`` (a batch may
    mix images and videos; videos need a Qwen-VL processor)."""
    chats = [question_chat(s["prompt"], num_images=int("image" in s), num_videos=int("video" in s)) for s in samples]
    images = [s["image"] for s in samples if "image" in s]
    videos = [s["video"] for s in samples if "video" in s]
    return encode(processor, chats, images or None, videos or None)


def collate(processor, samples: list[dict], responses: list[list[int]] | None = None) -> DistillBatch:
    """Samples ``{"image": PIL | "video": [frames], "prompt": question, "response": text}`` -> a left-padded
    `DistillBatch`.

    ``responses`` (token ids, e.g. the target's own greedy output) replace the
    samples' response text when given. Text responses get the EOS token appended.
    """
    tok = processor.tokenizer
    enc = encode_samples(processor, samples)
    if responses is None:
        responses = [tok(" " + s["response"].strip(), add_special_tokens=False).input_ids + [tok.eos_token_id]
                     for s in samples]  # fmt: skip
    return _training_batch(enc, responses, pad_token_id(tok))


def batch_from_inputs(rows: list[dict], responses: list[list[int]], pad_id: int) -> DistillBatch:
    """Already-encoded prompts (`specvlm.inputs.encode` of one prompt each, as an engine decoded them) and the
    target's response token ids (EOS included where it ended the row) -> a left-padded `DistillBatch`. The
    online trainer's batches: the caption actors hand over what they encoded and decoded, nothing is read or
    processed again."""
    return _training_batch(collate_inputs(rows, pad_id), responses, pad_id)


def _training_batch(enc: dict, responses: list[list[int]], pad_id: int) -> DistillBatch:
    """A processor batch ``enc`` (left-padded prompts, media) + one response per row -> `DistillBatch`."""
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    media = {k: enc[k] for k in CONCAT_KEYS if k in enc and k != "pixel_values"}
    return DistillBatch.from_padded(left_pad(prompts, pad_id, responses), enc.get("pixel_values"), media)


def target_responses(engine, processor, samples: list[dict], max_new_tokens: int) -> list[list[int]]:
    """The target's own greedy continuations (``response_source: target``), via an ``ar`` engine."""
    return engine.generate(**encode_samples(processor, samples), max_new_tokens=max_new_tokens).sequences


def evaluate_accept_length(engine, inputs: list[dict], max_new_tokens: int = 48) -> float:
    """Accept length of ``engine`` (``eagle``/``specvlm`` mode) over held-out prompts (``inputs``: processor
    outputs of one prompt each, e.g. ``encode_samples(processor, [sample])``), greedy, batch 1, pooled over
    the prompts (`engine.pooled_accept_length`)."""
    stats = [engine.generate(**enc, max_new_tokens=max_new_tokens).stats[0] for enc in inputs]
    return pooled_accept_length(stats)


# ----------------------------------------------------------------------------- training-job helpers
class WrappedDraft:
    """Route `distill_step` / `distill_loss` through a wrapper of the draft (DDP, FSDP, ...).

    ``distill_loss`` calls ``draft(...)`` for the forward and ``draft.log_probs``
    for the LM head; a ``DistributedDataParallel`` module hides ``log_probs``.
    This object forwards calls to the wrapper (so gradients are synchronized)
    and everything else to the plain draft, so the training job runs the very
    same `distill_step` as the plain loop.
    """

    def __init__(self, draft: EagleDraft, wrapper: torch.nn.Module):
        self.draft = draft
        self.wrapper = wrapper

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.wrapper(*args, **kwargs)  # [B, Q, D]

    def train(self, mode: bool = True) -> WrappedDraft:
        self.wrapper.train(mode)
        return self

    def __getattr__(self, name: str):
        if name in ("draft", "wrapper"):  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.draft, name)  # log_probs, parameters, config, ...


class BadSample(ValueError):
    """A data row that cannot become a training sample; ``str`` is ``"kind: message"`` (counted, then skipped)."""


def sample_from_row(row: dict, base: str | None = None, need_response: bool = True, limits=None) -> dict:
    """A data row -> a sample for `collate`: ``{"image": PIL RGB, "prompt": str, "response": str}``.

    ``row["image"]`` holds encoded image bytes or a URI (local path or ``s3://``,
    relative paths resolved against ``base``), read up to ``limits.max_bytes``.
    Raises `BadSample` for an unreadable, too large or undecodable image, a
    missing prompt, or (``need_response``) an empty response.
    """
    from .media import DEFAULT_LIMITS, MediaError, decode_image
    from .storage import read_bytes, resolve

    limits = limits or DEFAULT_LIMITS

    image, prompt, response = row.get("image"), row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadSample("empty: no prompt")
    if need_response and (not isinstance(response, str) or not response.strip()):
        raise BadSample("empty: no response")
    if isinstance(image, str):
        try:
            image = read_bytes(resolve(image, base), limits.max_bytes)
        except MediaError as e:  # too large
            raise BadSample(str(e)) from e
        except Exception as e:  # ReadError, OSError: bad data, not a bug
            raise BadSample(f"read: {row.get('image')}: {e or type(e).__name__}") from e
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise BadSample(f"read: image column holds {type(image).__name__}, expected bytes or a URI")
    try:
        pil = decode_image(bytes(image), limits)
    except MediaError as e:
        raise BadSample(str(e)) from e
    return {"image": pil, "prompt": prompt, "response": response if isinstance(response, str) else ""}


def batch_to(batch: DistillBatch, device: torch.device | str) -> DistillBatch:
    """The same batch with every tensor on ``device``."""
    move = lambda t: t.to(device) if t is not None else None
    return DistillBatch(
        move(batch.input_ids), move(batch.attention_mask), move(batch.loss_mask),
        move(batch.pixel_values), {k: move(v) if torch.is_tensor(v) else v for k, v in batch.media.items()},
    )  # fmt: skip


def save_training_state(path, draft: EagleDraft, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A resumable checkpoint folder: ``draft/`` (`EagleDraft.save_pretrained`), ``optimizer.pt``, ``state.json``."""
    import json
    from pathlib import Path

    path = Path(path)
    draft.save_pretrained(path / "draft")
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps(state))


def load_training_state(path, draft: EagleDraft, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a `save_training_state` folder into ``draft`` (and ``optimizer``) in place; returns ``state.json``."""
    import json
    from pathlib import Path

    path = Path(path)
    saved = EagleDraft.from_pretrained(path / "draft")
    param = next(draft.parameters())
    draft.load_state_dict({k: v.to(param.device, param.dtype) for k, v in saved.state_dict().items()})
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=param.device))
    return json.loads((path / "state.json").read_text())

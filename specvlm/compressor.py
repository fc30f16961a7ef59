"""The elastic visual compressor: the draft reads a shorter visual span than the target.

Legend: B batch rows, T tokens, P visual tokens of one image, P' after
compression, D hidden (the target's), K primitives, N rows sharing a layout.

SpecVLM §3.2. The target always sees every visual token; only the draft's
copy of the visual span is compressed, so outputs never change (verification
is the target's), only the draft's prefill and KV shrink. Each primitive maps
one image's visual span ``[N, P, D] -> [N, P', D]`` and knows its layout:

* a `Segment` is a patch grid (``rows x cols``; LLaVA-NeXT grids carry one
  ``image_newline`` token after each row) or a run of ``loose`` tokens (a CLS
  token, a trailing newline); an image is a tuple of segments (LLaVA-NeXT:
  base tile + unpadded high-res grid) and a video is one segment per frame;
* ``pool`` / ``conv`` work per grid segment with a ``(a, b)`` window,
  ``a * b = ratio``; ``prune`` keeps ``ceil(n / ratio)`` patches per grid;
  ``resampler`` gives ``queries`` tokens per grid; ``text`` drops everything;
  ``none`` keeps everything. Newline tokens are dropped by compressing
  primitives (the compressed grid has no rows left to separate); loose tokens
  are kept by all but ``text``.

Every output token also gets a source index into the image's span, so its
rotary position is a real position of the prompt ("positions kept
consistent"): text after the image keeps the target's positions exactly.

`ElasticCompressor` holds the primitives and a gate over the target's
features (the visual span's mean and the last prompt token's feature, which
has read the question): ``select`` picks one primitive per row (argmax at
inference; in training every row runs under every primitive and the loss is
their Gumbel-softmax-weighted sum, `ElasticCompressor.select_loss`),
``weight`` sums the primitives' outputs weighted by the gate, ``concat`` puts
them side by side. `ElasticCompressor.compress` rewrites a
whole left-padded draft input sequence and is shared by the engine's prefill
and by distillation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CompressorConfig, PrimitiveConfig


@dataclass(frozen=True)
class Segment:
    """A run of one image's visual tokens: a ``rows x cols`` grid (``newline``: each row followed by
    one separator token) or, when ``loose > 0``, that many tokens with no grid."""

    rows: int = 0
    cols: int = 0
    newline: bool = False
    loose: int = 0

    @property
    def size(self) -> int:
        return self.loose if self.loose else self.rows * (self.cols + int(self.newline))


Layout = tuple[Segment, ...]  # one image's visual tokens, in prompt order


def layout_size(layout: Layout) -> int:
    return sum(s.size for s in layout)


def window(ratio: int) -> tuple[int, int]:
    """The ``(a, b)`` pooling window for ``ratio`` patches per token: ``a * b == ratio``, as square as it gets."""
    a = max(d for d in range(1, math.isqrt(ratio) + 1) if ratio % d == 0)
    return a, ratio // a


def _check_span(x: torch.Tensor, layout: Layout) -> None:
    if x.shape[1] != layout_size(layout):
        raise ValueError(f"visual span has {x.shape[1]} tokens, its layout {layout} has {layout_size(layout)}")


# ----------------------------------------------------------------------------- primitives
class Primitive(nn.Module):
    """One compressor branch. Subclasses implement `grid`; loose tokens are kept, newlines dropped."""

    keeps_loose = True

    def __init__(self, config: PrimitiveConfig):
        super().__init__()
        self.config = config
        self.name = config.name

    def grid(self, x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, rows*cols, D]`` patches in reading order -> ``([N, P', D], [P'] source index)``."""
        raise NotImplementedError

    def grid_len(self, rows: int, cols: int) -> int:
        raise NotImplementedError

    def out_len(self, layout: Layout) -> int:
        """P' for one image with this layout."""
        return sum((s.loose if self.keeps_loose else 0) if s.loose else self.grid_len(s.rows, s.cols) for s in layout)

    def forward(self, x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, P, D]`` one image's span -> ``([N, P', D], [P'] long source index in [0, P))``."""
        _check_span(x, layout)
        outs, srcs, start = [], [], 0
        for s in layout:
            part = x[:, start : start + s.size]
            if s.loose:
                if self.keeps_loose:
                    outs.append(part)
                    srcs.append(start + torch.arange(s.loose, device=x.device))
            else:
                idx = torch.arange(s.size, device=x.device).view(s.rows, s.cols + int(s.newline))[:, : s.cols]
                idx = idx.reshape(-1)  # [rows*cols] patch positions inside the segment (newlines skipped)
                y, src = self.grid(part[:, idx] if s.newline else part, s.rows, s.cols)
                outs.append(y)
                srcs.append(start + idx[src])
            start += s.size
        if not outs:
            return x[:, :0], torch.zeros(0, dtype=torch.long, device=x.device)
        return torch.cat(outs, 1), torch.cat(srcs)


class Keep(Primitive):
    """``none``: the uncompressed span (newlines and all)."""

    def out_len(self, layout: Layout) -> int:
        return layout_size(layout)

    def forward(self, x, layout):
        _check_span(x, layout)
        return x, torch.arange(x.shape[1], device=x.device)


class TextOnly(Primitive):
    """``text``: the draft reads no visual tokens at all."""

    keeps_loose = False

    def grid(self, x, rows, cols):
        return x[:, :0], torch.zeros(0, dtype=torch.long, device=x.device)

    def grid_len(self, rows, cols):
        return 0


def _pad_grid(x: torch.Tensor, rows: int, cols: int, a: int, b: int) -> torch.Tensor:
    """``[N, rows*cols, D]`` -> ``[N, D, R, C]`` zero-padded to multiples of ``(a, b)``."""
    g = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], rows, cols)
    return F.pad(g, (0, -cols % b, 0, -rows % a))


def _block_sources(rows: int, cols: int, a: int, b: int, device) -> torch.Tensor:
    """Source index of each ``(a, b)`` block: its top-left patch, in reading order. ``[ceil(rows/a)*ceil(cols/b)]``"""
    r = torch.arange(0, rows, a, device=device)
    c = torch.arange(0, cols, b, device=device)
    return (r[:, None] * cols + c[None, :]).reshape(-1)


class Pool(Primitive):
    """``pool``: 2D average pooling over ``window(ratio)`` blocks (partial edge blocks average what they hold)."""

    def __init__(self, config):
        super().__init__(config)
        self.a, self.b = window(config.ratio)

    def grid_len(self, rows, cols):
        return -(-rows // self.a) * -(-cols // self.b)

    def grid(self, x, rows, cols):
        g = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], rows, cols)  # [N, D, rows, cols]
        out = F.adaptive_avg_pool2d(g, (-(-rows // self.a), -(-cols // self.b)))  # = avg_pool2d when it divides
        return out.flatten(2).transpose(1, 2), _block_sources(rows, cols, self.a, self.b, x.device)


class Conv(Primitive):
    """``conv``: a ``window(ratio)`` convolution with the same stride (initialized as average pooling)."""

    def __init__(self, config, hidden: int):
        super().__init__(config)
        self.a, self.b = window(config.ratio)
        self.conv = nn.Conv2d(hidden, hidden, (self.a, self.b), stride=(self.a, self.b))
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[torch.arange(hidden), torch.arange(hidden)] = 1.0 / config.ratio
            self.conv.bias.zero_()

    def grid_len(self, rows, cols):
        return -(-rows // self.a) * -(-cols // self.b)

    def grid(self, x, rows, cols):
        out = self.conv(_pad_grid(x, rows, cols, self.a, self.b).to(self.conv.weight.dtype))  # [N, D, R', C']
        return out.flatten(2).transpose(1, 2).to(x.dtype), _block_sources(rows, cols, self.a, self.b, x.device)


class Prune(Primitive):
    """``prune``: keep ``ceil(n / ratio)`` patches, in their order.

    Learned: a linear scorer ranks the patches; kept patches are scaled by
    ``sigmoid(s) / sigmoid(s).detach()`` (exactly 1 in value) so the scorer gets gradients.
    Random (``learned: false``): a fresh random subset per call in training, a
    fixed seeded one at inference (reproducible stats).
    """

    def __init__(self, config, hidden: int):
        super().__init__(config)
        self.score = nn.Linear(hidden, 1) if config.learned else None

    def grid_len(self, rows, cols):
        return -(-rows * cols // self.config.ratio)

    def grid(self, x, rows, cols):
        n, keep = rows * cols, self.grid_len(rows, cols)
        if self.score is not None:
            if x.shape[0] != 1:  # rows would keep different patches, but sources are per call
                raise ValueError("learned pruning runs one image at a time")
            s = self.score(x.to(self.score.weight.dtype)).squeeze(-1).float()  # [N, n]
            idx = s.topk(keep, dim=1).indices.sort(dim=1).values  # [N, keep]
            gate = torch.sigmoid(s.gather(1, idx))
            y = x.gather(1, idx[..., None].expand(-1, -1, x.shape[2])) * (gate / gate.detach())[..., None].to(x.dtype)
            return y, idx[0]
        gen = None if self.training else torch.Generator().manual_seed(0)
        idx = torch.randperm(n, generator=gen)[:keep].sort().values.to(x.device)
        return x[:, idx], idx


class Resampler(Primitive):
    """``resampler``: ``queries`` learned queries (plus the segment's mean) read the grid through one
    cross-attention layer. Sources spread the queries evenly over the segment."""

    def __init__(self, config, hidden: int, heads: int):
        super().__init__(config)
        self.queries = nn.Parameter(torch.randn(config.queries, hidden) * 0.02)
        self.norm_q = nn.LayerNorm(hidden)
        self.norm_kv = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)

    def grid_len(self, rows, cols):
        return self.config.queries

    def grid(self, x, rows, cols):
        dt = self.queries.dtype
        xf = x.to(dt)
        q = self.queries[None] + xf.mean(1, keepdim=True)  # [N, Q, D]
        kv = self.norm_kv(xf)
        out = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        n, m = rows * cols, self.config.queries
        src = ((torch.arange(m, device=x.device) * 2 + 1) * n // (2 * m)).clamp(max=n - 1)
        return out.to(x.dtype), src


def build_primitive(config: PrimitiveConfig, hidden: int, heads: int) -> Primitive:
    if config.kind == "none":
        return Keep(config)
    if config.kind == "text":
        return TextOnly(config)
    if config.kind == "pool":
        return Pool(config)
    if config.kind == "conv":
        return Conv(config, hidden)
    if config.kind == "prune":
        return Prune(config, hidden)
    return Resampler(config, hidden, heads)


# ----------------------------------------------------------------------------- the elastic compressor
@dataclass
class Compressed:
    """A draft input sequence with each image's span replaced by its compressed tokens (left-padded)."""

    embeds: torch.Tensor  # [B, T', D]
    positions: torch.Tensor  # [B, T'] or [3, B, T'] (M-RoPE) rotary positions (the target's, for every kept entry)
    valid: torch.Tensor  # [B, T'] bool, False on left padding
    source: torch.Tensor  # [B, T'] original entry index of kept text entries, -1 for visual tokens and padding
    choice: torch.Tensor  # [B] the primitive each row was compressed with (the gate's argmax unless forced)
    visual_tokens: torch.Tensor  # [B] visual tokens the draft reads per row
    logits: torch.Tensor  # [B, K] the gate's logits (has grad; `ElasticCompressor.select_loss` trains on them)


class ElasticCompressor(nn.Module):
    """The primitives plus the gate. Saved with the draft (`EagleDraft.compressor`)."""

    def __init__(self, config: CompressorConfig, hidden: int, heads: int):
        super().__init__()
        self.config = config
        self.primitives = nn.ModuleList(build_primitive(p, hidden, heads) for p in config.primitives)
        self.names = [p.name for p in self.primitives]
        K = len(self.primitives)
        self.gate = (
            nn.Sequential(nn.Linear(2 * hidden, config.gate_hidden), nn.GELU(), nn.Linear(config.gate_hidden, K))
            if K > 1 else None
        )  # fmt: skip

    def gate_logits(self, visual_mean: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` mean target feature over the visual span, ``[B, D]`` last prompt feature -> ``[B, K]``."""
        B = query.shape[0]
        if self.gate is None:
            return torch.zeros(B, 1, device=query.device)
        w = self.gate[0].weight
        return self.gate(torch.cat([visual_mean, query], -1).to(w.dtype)).float()

    def gate_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` logits -> ``[B, K]`` weights: the argmax one-hot for ``select`` (training goes
        through `select_loss`), a softmax (Gumbel-perturbed in training) for ``weight``/``concat``."""
        if logits.shape[1] == 1:
            return torch.ones_like(logits)
        if self.config.mode == "select":
            return F.one_hot(logits.argmax(-1), logits.shape[1]).to(logits.dtype)
        if self.training:
            return F.gumbel_softmax(logits, tau=self.config.tau, hard=False)
        return logits.softmax(-1)

    def select_loss(
        self,
        logits: torch.Tensor,  # [B, K] gate logits
        losses: torch.Tensor,  # [B, K] each row's distillation loss with its image under each primitive
        visual: torch.Tensor,  # [B, K] visual tokens the draft reads under each primitive
        full: torch.Tensor,  # [B] visual tokens before compression
    ) -> torch.Tensor:
        """Training objective of ``select`` mode: the expected loss under Gumbel-softmax gate weights.

        ``p = gumbel_softmax(logits, tau)`` (soft) and the result is
        ``sum_bk p_bk losses_bk + cost_weight * mean_b sum_k p_bk visual_bk / full_b``.
        Every primitive trains on every row in proportion to ``p``, and the
        gate's gradient ``p_k (L_k - E_p[L])`` compares the primitives' real
        losses on that row, so the argmax it learns is the row's best
        primitive (the cheapest among equals when ``cost_weight > 0``). A
        straight-through hard choice would instead see only the chosen
        primitive's loss; in the demo its gate settled on one primitive for
        every input.
        """
        p = F.gumbel_softmax(logits, tau=self.config.tau, hard=False)  # [B, K]
        cost = visual.float() / full.float().clamp(min=1)[:, None]  # [B, K] fraction of the visual tokens kept
        return (p * losses).sum() + self.config.cost_weight * (p * cost).sum(1).mean()

    def compress_image(self, x: torch.Tensor, layout: Layout, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image ``[1, P, D]`` under gate weights ``[K]`` -> ``([P', D], [P'] source index)``."""
        mode = self.config.mode
        if mode == "select":
            k = int(w.argmax())
            y, src = self.primitives[k](x, layout)
            return (y * w[k].to(y.dtype))[0], src
        outs = [prim(x, layout) for prim in self.primitives]
        if mode == "weight":
            lens = {y.shape[1] for y, _ in outs}
            if len(lens) != 1:
                got = {n: y.shape[1] for n, (y, _) in zip(self.names, outs)}
                raise ValueError(f"mode 'weight' needs primitives of equal output length on {layout}, got {got}")
            y = sum(wk.to(y.dtype) * y for wk, (y, _) in zip(w, outs))
            return y[0], outs[0][1]
        y = torch.cat([wk.to(y.dtype) * y for wk, (y, _) in zip(w, outs)], 1)
        return y[0], torch.cat([s for _, s in outs])

    def compress(
        self,
        h: torch.Tensor,  # [B, T, D] the draft's input entries (after its fc)
        positions: torch.Tensor,  # [B, T], or [3, B, T] (M-RoPE: a kept token keeps all three axes of its source)
        valid: torch.Tensor,  # [B, T] bool, left padding False
        span: torch.Tensor,  # [B, T] bool, entries whose next token is a visual placeholder
        layouts: list[Layout],  # one per image, in the order the images fill the placeholders (row-major)
        features: torch.Tensor,  # [B, T, D] the target's features at the entries (gate input)
        query: torch.Tensor,  # [B, D] the target's feature at the last prompt token (gate input)
        choice: torch.Tensor | None = None,  # [B] force these primitives (``select`` training), None = the gate's
    ) -> Compressed:
        """Rewrite the sequence: each image's span -> its compressed tokens, text entries untouched."""
        B, T, D = h.shape
        dev = h.device
        n_span = span.sum(1)  # [B]
        vis_mean = (features.float() * span[..., None]).sum(1) / n_span.clamp(min=1)[:, None]  # [B, D]
        logits = self.gate_logits(vis_mean.to(features.dtype), query)  # [B, K]
        if choice is not None and self.config.mode != "select":
            raise ValueError(f"forcing a primitive needs mode 'select', not {self.config.mode!r}")
        weights = self.gate_weights(logits) if choice is None else F.one_hot(choice, logits.shape[1]).to(logits.dtype)
        choice = weights.argmax(-1)  # [B]
        rows_e, rows_p, rows_s, n_visual = [], [], [], []
        img = 0
        for b in range(B):
            idx = span[b].nonzero().squeeze(1).tolist()
            pieces_e, pieces_p, pieces_s = [], [], []
            cursor = int((~valid[b]).sum())  # first real entry (left padding before it)
            used, vis = 0, 0
            while used < len(idx):
                if img >= len(layouts):
                    raise ValueError(f"the prompts hold more visual tokens than the {len(layouts)} image layouts cover")
                layout = layouts[img]
                P = layout_size(layout)
                start = idx[used]
                if idx[used : used + P] != list(range(start, start + P)):
                    raise ValueError(f"row {b}: visual span at entry {start} is not {P} contiguous tokens ({layout})")
                if start > cursor:
                    pieces_e.append(h[b, cursor:start])
                    pieces_p.append(positions[..., b, cursor:start])
                    pieces_s.append(torch.arange(cursor, start, device=dev))
                y, src = self.compress_image(h[b : b + 1, start : start + P], layout, weights[b])
                pieces_e.append(y)
                pieces_p.append(positions[..., b, start + src])
                pieces_s.append(torch.full((y.shape[0],), -1, dtype=torch.long, device=dev))
                vis += y.shape[0]
                cursor, used, img = start + P, used + P, img + 1
            pieces_e.append(h[b, cursor:])
            pieces_p.append(positions[..., b, cursor:])
            pieces_s.append(torch.arange(cursor, T, device=dev))
            rows_e.append(torch.cat(pieces_e))
            rows_p.append(torch.cat(pieces_p, dim=-1))
            rows_s.append(torch.cat(pieces_s))
            n_visual.append(vis)
        if img != len(layouts):
            raise ValueError(f"{len(layouts)} image layouts but the prompts' visual spans cover only {img}")
        T2 = max(e.shape[0] for e in rows_e)
        embeds = h.new_zeros(B, T2, D)
        pos = positions.new_zeros(*positions.shape[:-2], B, T2)
        source = torch.full((B, T2), -1, dtype=torch.long, device=dev)
        ok = torch.zeros(B, T2, dtype=torch.bool, device=dev)
        for b, (e, p, s) in enumerate(zip(rows_e, rows_p, rows_s)):
            n = e.shape[0]
            embeds[b, T2 - n :] = e
            pos[..., b, T2 - n :] = p
            source[b, T2 - n :] = s
            ok[b, T2 - n :] = True
        return Compressed(embeds, pos, ok, source, choice, torch.tensor(n_visual, device=dev), logits)

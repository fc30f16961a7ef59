"""Run HF decoder layers over a `SlotKVCache` with explicit 4D masks and positions.

Legend: B batch rows, Q query tokens, V cache view, H heads, Hk kv heads, d head dim, D hidden.

`run_layer` calls an HF decoder layer. For the Llama family (Llama, Mistral
without sliding window: LLaVA-1.5 / LLaVA-NeXT language models; the Qwen2-VL
and Qwen2.5-VL decoders, which add q/k/v biases; Qwen3-VL's, which adds a
per-head RMSNorm on q and k) it computes the layer's own math directly from
its weights (`_llama_layer`): the same RMSNorm, rotary, scaled-dot-product
attention and SwiGLU formulas in the same order, without the per-module and
per-call wrapper work of the HF forward.
At batch 1 on small models that wrapper work is a large share of a decode
step; the lossless tests compare every path with HF `generate`. Small layers
(where per-op overhead dominates) run their projections over cached packed
weights (`_packed`): q/k/v and gate/up as one matmul each, and on CPU in the
``[in, out]`` layout that MKL streams fastest (`_pack`); `linear` does the
same for single modules (the draft's ``fc``, LM heads) when autograd is off.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

FAST_LAYERS = (
    "LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
    "Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen3VLTextDecoderLayer",
)  # fmt: skip
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa: no kv-head copies


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T]`` padding mask -> ``[B, 1, T, T]`` additive causal mask."""
    B, T = attention_mask.shape
    allowed = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()[None]
    allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=attention_mask.device)  # pad rows: no NaN
    return torch.zeros(B, 1, T, T, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed[:, None], torch.finfo(dtype).min
    )


def fast_path_ok(layer) -> bool:
    """Whether `_llama_layer` reproduces this HF layer exactly."""
    attn = layer.self_attn
    cfg = getattr(attn, "config", None)
    # Qwen attentions carry their own (per-layer) window; Mistral's is the config's
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
    return (
        type(layer).__name__ in FAST_LAYERS
        and window is None
        and getattr(cfg, "hidden_act", "silu") == "silu"
        and not getattr(layer.self_attn, "training", False)
    )


def _weight_bias(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A module's ``(weight, bias)`` (bias None where it has none), read from its parameter dict when it is there:
    ``nn.Module.__getattr__`` costs about a microsecond a lookup, and a decode step makes hundreds."""
    p = module._parameters
    w = p.get("weight")
    return (w, p.get("bias")) if w is not None else (module.weight, getattr(module, "bias", None))


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in (at least) float32, scale in the input dtype.

    float32 runs as one fused ``F.rms_norm`` (bit-identical to HF's formula there, and a decode
    step's norms are many tiny ops); half types keep HF's exact up- and down-casts.
    """
    dtype = x.dtype
    weight = _weight_bias(norm)[0]
    if dtype == torch.float32 and weight.dtype == dtype:
        return F.rms_norm(x, weight.shape, weight, norm.variance_epsilon)
    if dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return weight * (x if x.dtype == dtype else x.to(dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF apply_rotary_pos_emb for one tensor ``[B, H, Q, d]`` with ``cos/sin [B, 1, Q, d]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


FUSE_MAX_BYTES = 64 << 20  # pack the weights of layers up to this size: there dispatch and layout, not size, dominate
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (key, packed weights or None)


def _cached(owner, params: list[torch.Tensor], build):
    """``build()`` cached per ``owner`` module, or None when ``params`` exceed `FUSE_MAX_BYTES`.

    The entry is rebuilt when any source tensor changes: an optimizer step or ``load_state_dict``
    bumps its version, so a draft evaluated between training steps never reads stale weights.
    """
    try:
        key = (FUSE_MAX_BYTES, *((t.data_ptr(), t._version) for t in params))
    except RuntimeError:  # weights made under inference mode keep no version: only a new tensor shows
        key = (FUSE_MAX_BYTES, *(t.data_ptr() for t in params))
    hit = _PACKED.get(owner)
    if hit is not None and hit[0] == key:  # the decode loop's case: sizes were checked when the entry was made
        return hit[1]
    packed = None
    if sum(t.numel() * t.element_size() for t in params) <= FUSE_MAX_BYTES:
        with torch.no_grad():
            packed = build()
    _PACKED[owner] = (key, packed)
    return packed


def _pack(weights: list[torch.Tensor]) -> torch.Tensor:
    """``[out_i, in]`` weights -> one matmul operand: ``[in, sum out_i]`` on CPU, ``[sum out_i, in]`` elsewhere.

    On CPU, MKL streams an ``[in, out]`` right-hand side 1.3-2.3x faster than the transposed
    ``[out, in]`` one that ``F.linear`` passes it (measured on the demo's shapes at 1 and 14 query
    rows; decode there is bound by reading the weights). GPUs run both layouts alike.
    """
    w = torch.cat(weights) if len(weights) > 1 else weights[0]
    return w.t().contiguous() if w.device.type == "cpu" else w


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x [..., in]`` through a `_pack`-ed weight (and bias) -> ``[..., out]``."""
    if not w.is_cpu:
        return F.linear(x, w, b)
    if b is None:
        return x @ w
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])


def linear(x: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
    """``module(x)`` through a `_pack`-ed copy of its weight when autograd is off (decoding), else as is."""
    if torch.is_grad_enabled():
        return module(x)
    weight, bias = _weight_bias(module)
    w = _cached(module, [weight] if bias is None else [weight, bias], lambda: _pack([weight]))
    return module(x) if w is None else _project(x, w, bias)


class _Plan(NamedTuple):
    """A Llama-family layer's parts, looked up once (`_plan`): its projections in `_packed`'s groups, norms
    and head counts."""

    groups: tuple  # ((q_proj, k_proj, v_proj), (o_proj,), (gate_proj, up_proj), (down_proj,))
    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    q_norm: torch.nn.Module | None  # Qwen3: RMSNorm per head on q and k, before rotary
    k_norm: torch.nn.Module | None
    head_dim: int
    nq: int  # query heads
    nk: int  # kv heads
    layer_idx: int
    scaling: float


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> _Plan


def _plan(layer) -> _Plan:
    """`layer`'s `_Plan`, made on first use (an engine binds its model's layers once; their weights may change,
    which `_cached` checks, but not which modules they are)."""
    plan = _PLANS.get(layer)
    if plan is None:
        attn, mlp = layer.self_attn, layer.mlp
        d = attn.head_dim
        groups = ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj),
                  (mlp.down_proj,))  # fmt: skip
        plan = _PLANS[layer] = _Plan(
            groups, layer.input_layernorm, layer.post_attention_layernorm, getattr(attn, "q_norm", None),
            getattr(attn, "k_norm", None), d, attn.q_proj.out_features // d, attn.k_proj.out_features // d,
            attn.layer_idx, attn.scaling,
        )  # fmt: skip
    return plan


def _packed(layer, plan: _Plan):
    """``(qkv_w, qkv_b, o_w, o_b, gate_up_w, gate_up_b, down_w, down_b)`` of a small Llama layer, or None.

    ``qkv_w`` packs cat(q, k, v) and ``gate_up_w`` cat(gate, up) (see `_pack`; biases are
    concatenated, or None), so q/k/v and gate/up each run as one matmul.
    """
    groups = [[_weight_bias(m) for m in g] for g in plan.groups]
    params = [t for g in groups for wb in g for t in wb if t is not None]

    def build():
        out = []
        for g in groups:
            out.append(_pack([w for w, _ in g]))
            out.append(None if g[0][1] is None else torch.cat([b for _, b in g]))
        return tuple(out)

    return _cached(layer, params, build)


def _llama_layer(layer, h, cos, sin, mask, cache):
    """One Llama-family decoder layer. h ``[B, Q, D]`` -> ``[B, Q, D]``."""
    plan = _plan(layer)
    B, Q, _ = h.shape
    d = plan.head_dim
    x = _rms_norm(h, plan.input_norm)
    packed = _packed(layer, plan)
    qk_norm = plan.q_norm is not None
    if packed is not None:
        nq, nk = plan.nq, plan.nk
        qkv = _project(x, packed[0], packed[1]).view(B, Q, -1, d).transpose(1, 2)  # [B, H + 2 Hk, Q, d]
        if qk_norm:
            q, k, v = qkv.split([nq, nk, nk], dim=1)
            q, k = _rotate(_rms_norm(q, plan.q_norm), cos, sin), _rotate(_rms_norm(k, plan.k_norm), cos, sin)
        else:
            q, k = _rotate(qkv[:, : nq + nk], cos, sin).split([nq, nk], dim=1)  # [B, H, Q, d], [B, Hk, Q, d]
            v = qkv[:, nq + nk :]  # [B, Hk, Q, d]
    else:
        (q_proj, k_proj, v_proj), (o_proj,), (gate_proj, up_proj), (down_proj,) = plan.groups
        q = F.linear(x, q_proj.weight, q_proj.bias).view(B, Q, -1, d).transpose(1, 2)  # [B, H, Q, d]
        k = F.linear(x, k_proj.weight, k_proj.bias).view(B, Q, -1, d).transpose(1, 2)  # [B, Hk, Q, d]
        v = F.linear(x, v_proj.weight, v_proj.bias).view(B, Q, -1, d).transpose(1, 2)  # [B, Hk, Q, d]
        if qk_norm:
            q, k = _rms_norm(q, plan.q_norm), _rms_norm(k, plan.k_norm)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = cache.update(k, v, plan.layer_idx)  # [B, Hk, V, d]
    gqa = {}
    if k.shape[1] != q.shape[1]:  # GQA: SDPA maps query heads to kv heads itself; older torch: repeat kv heads
        if _SDPA_GQA:
            gqa = {"enable_gqa": True}
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, V, d]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=plan.scaling, **gqa)  # [B, H, Q, d]
    o = o.transpose(1, 2).reshape(B, Q, -1)
    if packed is None:
        h = h + F.linear(o, o_proj.weight, o_proj.bias)
        x = _rms_norm(h, plan.post_norm)
        up = F.linear(x, up_proj.weight, up_proj.bias)
        gate = F.linear(x, gate_proj.weight, gate_proj.bias)
        return h + F.linear(F.silu(gate) * up, down_proj.weight, down_proj.bias)
    h = h + _project(o, packed[2], packed[3])
    gate, up = _project(_rms_norm(h, plan.post_norm), packed[4], packed[5]).chunk(2, dim=-1)
    return h + _project(F.silu(gate) * up, packed[6], packed[7])


def run_layer(layer, h, position_ids, pos_emb, mask, cache, fast: bool):
    """One decoder layer over the cache. h ``[B, Q, D]``, pos_emb ``(cos, sin)`` each ``[B, Q, d]``."""
    if fast:
        cos, sin = pos_emb
        return _llama_layer(layer, h, cos.unsqueeze(1), sin.unsqueeze(1), mask, cache)
    return layer(h, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                 position_embeddings=pos_emb)  # fmt: skip


class RotaryTable:
    """Precomputed ``(cos, sin)`` of an HF rotary embedding for positions ``[0, length)``.

    Static RoPE types give the same values per position whatever the batch, so
    a lookup replaces the per-forward computation; dynamic types (which depend
    on the sequence length) are computed per call, as HF does.
    """

    STATIC = ("default", "linear", "llama3")

    def __init__(self, rotary_emb, length: int, like: torch.Tensor):
        self.rotary_emb, self.length, self._like = rotary_emb, length, like
        self.static = getattr(rotary_emb, "rope_type", "default") in self.STATIC
        if self.static:
            pos = torch.arange(length, device=like.device)[None]
            cos, sin = rotary_emb(like, pos)
            self.cos, self.sin = cos[0], sin[0]  # [S, d]

    def covering(self, length: int) -> RotaryTable:
        """This table if it covers positions ``[0, length)``, else a new one at least twice as long (the engine
        grows its tables as rows with longer prompts or budgets join)."""
        if length <= self.length:
            return self
        return RotaryTable(self.rotary_emb, max(length, 2 * self.length), self._like)

    def __call__(self, h: torch.Tensor, position_ids: torch.Tensor):
        """``(cos, sin)`` each ``[B, Q, d]`` for ``position_ids [B, Q]``, or ``[3, B, Q]`` (M-RoPE: the
        embedding's own per-axis frequency split; a lookup once all axes are equal, as after the prompt)."""
        if not self.static or position_ids.dim() == 3:
            return self.rotary_emb(h, position_ids)
        return self.cos[position_ids], self.sin[position_ids]

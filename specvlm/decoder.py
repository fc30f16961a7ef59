"""Run HF decoder layers over a `SlotKVCache` with explicit 4D masks and positions.

Legend: B batch rows, Q query tokens, V cache view, H heads, Hk kv heads, d head dim, D hidden.

`run_layer` calls an HF decoder layer. For the Llama family (Llama, Mistral
without sliding window: LLaVA-1.5 / LLaVA-NeXT language models) it computes
the layer's own math directly from its weights (`_llama_layer`): the same
RMSNorm, rotary, scaled-dot-product attention and SwiGLU formulas in the same
order, without the per-module and per-call wrapper work of the HF forward.
At batch 1 on small models that wrapper work is a large share of a decode
step; the lossless tests compare every path with HF `generate`. Small layers
(where per-op overhead dominates) also run their q/k/v and gate/up
projections as one matmul each over a cached concatenated weight (`_fused`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

FAST_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer")
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
    cfg = getattr(layer.self_attn, "config", None)
    return (
        type(layer).__name__ in FAST_LAYERS
        and getattr(cfg, "sliding_window", None) is None
        and getattr(cfg, "hidden_act", "silu") == "silu"
        and not getattr(layer.self_attn, "training", False)
    )


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in (at least) float32, scale in the input dtype."""
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * (x if x.dtype == dtype else x.to(dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF apply_rotary_pos_emb for one tensor ``[B, H, Q, d]`` with ``cos/sin [B, 1, Q, d]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


FUSE_MAX_BYTES = 64 << 20  # fuse projections of layers up to this size: there dispatch, not bandwidth, dominates
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (key, fused tensors or None)


def _fused(layer):
    """``(qkv_w, qkv_b, gate_up_w, gate_up_b)`` for a small Llama layer, or None for a large one.

    ``qkv_w`` is ``[(H + 2 Hk) d, D]`` = cat(q, k, v) and ``gate_up_w`` is
    ``[2 I, D]`` = cat(gate, up) (biases likewise, or None). Copies are cached
    per layer and rebuilt when any source weight changes (an optimizer step
    or ``load_state_dict`` bumps the tensor's version), so a draft evaluated
    between training steps never reads stale weights.
    """
    attn, mlp = layer.self_attn, layer.mlp
    mods = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
    params = [t for m in mods for t in (m.weight, m.bias) if t is not None]
    key = (FUSE_MAX_BYTES, *((t.data_ptr(), t._version) for t in params))
    hit = _FUSED.get(layer)
    if hit is not None and hit[0] == key:  # the decode loop's case: sizes were checked when the entry was made
        return hit[1]

    def cat(ms):
        bias = None if ms[0].bias is None else torch.cat([m.bias for m in ms])
        return torch.cat([m.weight for m in ms]), bias

    fused = None
    if sum(t.numel() * t.element_size() for t in params) <= FUSE_MAX_BYTES:
        with torch.no_grad():
            fused = (*cat(mods[:3]), *cat(mods[3:]))
    _FUSED[layer] = (key, fused)
    return fused


def _llama_layer(layer, h, cos, sin, mask, cache):
    """One Llama-family decoder layer. h ``[B, Q, D]`` -> ``[B, Q, D]``."""
    attn, mlp = layer.self_attn, layer.mlp
    B, Q, _ = h.shape
    d = attn.head_dim
    x = _rms_norm(h, layer.input_layernorm)
    fused = _fused(layer)
    if fused is not None:
        nq, nk = attn.q_proj.out_features // d, attn.k_proj.out_features // d
        qkv = F.linear(x, fused[0], fused[1]).view(B, Q, -1, d).transpose(1, 2)  # [B, H + 2 Hk, Q, d]
        q, k = _rotate(qkv[:, : nq + nk], cos, sin).split([nq, nk], dim=1)  # [B, H, Q, d], [B, Hk, Q, d]
        v = qkv[:, nq + nk :]  # [B, Hk, Q, d]
    else:
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(B, Q, -1, d).transpose(1, 2)  # [B, H, Q, d]
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(B, Q, -1, d).transpose(1, 2)  # [B, Hk, Q, d]
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(B, Q, -1, d).transpose(1, 2)  # [B, Hk, Q, d]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = cache.update(k, v, attn.layer_idx)  # [B, Hk, V, d]
    gqa = {}
    if k.shape[1] != q.shape[1]:  # GQA: SDPA maps query heads to kv heads itself; older torch: repeat kv heads
        if _SDPA_GQA:
            gqa = {"enable_gqa": True}
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, V, d]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, **gqa)  # [B, H, Q, d]
    o = o.transpose(1, 2).reshape(B, Q, -1)
    h = h + F.linear(o, attn.o_proj.weight, attn.o_proj.bias)
    x = _rms_norm(h, layer.post_attention_layernorm)
    if fused is not None:
        gate, up = F.linear(x, fused[2], fused[3]).chunk(2, dim=-1)  # [B, Q, I] each
    else:
        up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
        gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
    return h + F.linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)


def run_layer(layer, h, position_ids, pos_emb, mask, cache, fast: bool):
    """One decoder layer over the cache. h ``[B, Q, D]``, pos_emb ``(cos, sin)`` each ``[B, Q, d]``."""
    if fast:
        cos, sin = pos_emb
        return _llama_layer(layer, h, cos[:, None], sin[:, None], mask, cache)
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
        self.rotary_emb = rotary_emb
        self.static = getattr(rotary_emb, "rope_type", "default") in self.STATIC
        if self.static:
            pos = torch.arange(length, device=like.device)[None]
            cos, sin = rotary_emb(like, pos)
            self.cos, self.sin = cos[0], sin[0]  # [S, d]

    def __call__(self, h: torch.Tensor, position_ids: torch.Tensor):
        """``(cos, sin)`` each ``[B, Q, d]`` for ``position_ids [B, Q]``."""
        if not self.static:
            return self.rotary_emb(h, position_ids)
        return self.cos[position_ids], self.sin[position_ids]

"""The EAGLE-style draft: one decoder layer over [next-token embedding; target feature].

Legend: B batch rows, Q tokens, D hidden (the target's), V vocab.

Reference: Li et al., EAGLE (2024) and SpecVLM (arXiv 2509.11815) §3. At
entry ``i`` the draft reads the target's last hidden feature ``f_i`` (the LM
head's input at position i) and the embedding of the token at ``i + 1``, and
predicts ``f_{i+1}``; the target's LM head turns that into a distribution
over the token at ``i + 2``::

    h = fc(cat(embed(x_{i+1}), f_i))      # [B, Q, 2D] -> [B, Q, D]
    g = decoder_layer(h)                  # input RMSNorm inside (SpecVLM's fix)
    logits = lm_head(g)

For image placeholder tokens the "embedding" is the visual feature the
target merged at that position, so the draft sees the same visual + text
inputs as the target. A ``specvlm`` draft also carries an
`ElasticCompressor` (``draft.compressor``): at prefill the visual span of
``h`` is compressed before the decoder layer reads it (`project`, then
`compressor.compress`, then `decode`). The decoder layer is the target family's own HF class
(Llama, Qwen2, Mistral, ...) at the target's width. The embedding and LM head
are the target's, frozen, bound with `bind()`, and never saved with the draft.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from .compressor import ElasticCompressor
from .config import CompressorConfig, parse_config
from .decoder import causal_mask, fast_path_ok, linear, run_layer
from .target import TargetAdapter

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _family_classes(text_config: PretrainedConfig):
    """The HF decoder-layer and rotary-embedding classes of a text model family.

    Qwen-VL text models (``qwen2_vl_text`` ...) live in their VLM's module and name their layer
    with or without the ``Text`` infix (``Qwen2VLDecoderLayer``, ``Qwen3VLTextDecoderLayer``); their
    rotary embedding is the M-RoPE one, so the draft reads the prompt's 3-axis positions too.
    """
    model_type = text_config.model_type
    model_cls = MODEL_MAPPING_NAMES.get(model_type)
    if model_cls is None:
        raise ValueError(f"unsupported language model family {model_type!r} for the draft layer")
    module = importlib.import_module(getattr(transformers, model_cls).__module__)
    for prefix in (model_cls.removesuffix("Model"), model_cls.removesuffix("TextModel")):
        layer, rope = getattr(module, f"{prefix}DecoderLayer", None), getattr(module, f"{prefix}RotaryEmbedding", None)
        if layer is not None and rope is not None:
            return layer, rope
    raise ValueError(f"language model family {model_type!r} has no decoder layer the draft can use")


class EagleDraft(nn.Module):
    """One decoder layer that predicts the target's next feature.

    Attributes saved by `save_pretrained`: ``fc``, ``layer`` and the optional
    ``compressor`` (with its `CompressorConfig` in config.json).
    ``embed_tokens`` / ``lm_head`` are the target's and are held outside the
    module's parameters.
    """

    def __init__(
        self,
        text_config: PretrainedConfig,
        compressor: CompressorConfig | None = None,
        intermediate_size: int | None = None,
    ):
        super().__init__()
        cfg = text_config.__class__.from_dict(text_config.to_dict())
        cfg.num_hidden_layers = 1
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:1]
        if intermediate_size is not None:
            cfg.intermediate_size = intermediate_size  # saved in config.json, so from_pretrained rebuilds it
        cfg._attn_implementation = text_config._attn_implementation or "sdpa"
        self.config = cfg
        layer_cls, rope_cls = _family_classes(cfg)
        D = cfg.hidden_size
        self.fc = nn.Linear(2 * D, D, bias=True)
        self.layer = layer_cls(cfg, layer_idx=0)
        self.rotary_emb = rope_cls(config=cfg)
        self.compressor = ElasticCompressor(compressor, D, cfg.num_attention_heads) if compressor is not None else None
        self._shared: tuple[nn.Module, nn.Module] | None = None  # (embed_tokens, lm_head), not registered

    # ----------------------------------------------------------------- build
    @classmethod
    def from_target(
        cls,
        model: nn.Module,
        seed: int = 0,
        compressor: CompressorConfig | None = None,
        intermediate_size: int | None = None,
    ) -> EagleDraft:
        """An untrained draft for ``model`` (any supported HF VLM), seeded, in its dtype/device;
        with an `ElasticCompressor` when ``compressor`` is given (``specvlm`` mode).

        ``intermediate_size``: the draft layer's MLP width (default: the target's). EAGLE's one layer
        is ~1/32 of a 7B target; against a shallow target a narrower MLP keeps the draft cheap.
        """
        target = TargetAdapter(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draft = cls(target.text_config, compressor, intermediate_size)
        param = next(model.parameters())
        draft.to(device=param.device, dtype=param.dtype)
        draft.bind(target.embed_tokens, target.lm_head)
        return draft

    @classmethod
    def for_target(
        cls,
        model: nn.Module,
        draft: EagleDraft | None = None,
        seed: int = 0,
        compressor: CompressorConfig | None = None,
        intermediate_size: int | None = None,
    ) -> EagleDraft:
        """A draft to distill for ``model``, bound to it in its dtype/device: ``draft`` (e.g. a trained one to
        continue from; `check_fits` first), else `from_target` (``seed``, ``intermediate_size``).

        ``compressor`` (mode specvlm): a fresh `ElasticCompressor` with this config (seeded), unless ``draft``
        already carries one, which is kept.
        """
        if draft is None:
            return cls.from_target(model, seed=seed, compressor=compressor, intermediate_size=intermediate_size)
        target = TargetAdapter(model)
        draft.check_fits(target)
        if compressor is not None and draft.compressor is None:  # start specvlm from a trained eagle draft
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                draft.compressor = ElasticCompressor(compressor, draft.config.hidden_size,
                                                     draft.config.num_attention_heads)  # fmt: skip
        return draft.to(device=target.device, dtype=target.dtype).bind(target.embed_tokens, target.lm_head)

    def check_fits(self, target) -> None:
        """Raise ValueError unless this draft can run on ``target`` (a `TargetAdapter` or an HF VLM): its hidden
        size must be the target's, since it reads the target's features, embedding and LM head."""
        if not isinstance(target, TargetAdapter):
            target = TargetAdapter(target)
        if self.config.hidden_size != target.text_config.hidden_size:
            raise ValueError(
                f"draft hidden size {self.config.hidden_size} != target's {target.text_config.hidden_size}: "
                "the draft was trained for another target"
            )

    def bind(self, embed_tokens: nn.Module, lm_head: nn.Module) -> EagleDraft:
        """Share the target's (frozen) token embedding and LM head."""
        self._shared = (embed_tokens, lm_head)
        return self

    def save_pretrained(self, path: str | Path) -> None:
        """HF-style folder: config.json + model.safetensors (draft weights only)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"architecture": "EagleDraft", "text_config": self.config.to_dict()}
        if self.compressor is not None:
            meta["compressor"] = self.compressor.config.model_dump(mode="json")
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=str))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> EagleDraft:
        """Load a folder written by `save_pretrained`. Call `bind()` (the engine does) before use."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a draft folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        meta = json.loads((path / CONFIG_NAME).read_text())
        if meta.get("architecture") != "EagleDraft":
            raise ValueError(f"{path / CONFIG_NAME} does not describe an EagleDraft")
        tc = dict(meta["text_config"])
        text_config = AutoConfig.for_model(tc.pop("model_type"), **tc)
        state = load_file(str(path / WEIGHTS_NAME))
        dtype = next(iter(state.values())).dtype
        comp = meta.get("compressor")
        draft = cls(text_config, parse_config(comp, CompressorConfig, str(path)) if comp else None).to(dtype)
        draft.load_state_dict(state, strict=True)
        return draft

    # --------------------------------------------------------------- forward
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, Q]`` token ids -> ``[B, Q, D]`` with the target's embedding."""
        assert self._shared is not None, "draft is not bound to a target: call bind()"
        return self._shared[0](tokens)

    def log_probs(self, hidden: torch.Tensor, suppress: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., D]`` draft hidden -> ``[..., V]`` log-probs through the target's LM head.

        suppress: token ids ``[S]`` never to propose, or an additive ``[V]`` float bias (0 / -inf).
        """
        assert self._shared is not None, "draft is not bound to a target: call bind()"
        logits = linear(hidden, self._shared[1]).float()
        if suppress is not None and suppress.numel():
            if suppress.is_floating_point():
                logits = logits + suppress
            else:
                logits[..., suppress] = float("-inf")
        return logits.log_softmax(-1)

    def rotary_table(self, length: int, like: torch.Tensor):
        """Rotary ``(cos, sin)`` lookup for the draft's positions ``[0, length)``."""
        from .decoder import RotaryTable

        return RotaryTable(self.rotary_emb, length, like)

    def forward(
        self,
        token_embeds: torch.Tensor,  # [B, Q, D] embedding of the token at i+1
        features: torch.Tensor,  # [B, Q, D] target (or parent draft) feature at i
        position_ids: torch.Tensor,  # [B, Q] position of i
        attention_mask: torch.Tensor | None,  # [B, 1, Q, V] additive, None = causal without cache
        cache=None,  # SlotKVCache with one layer, or None (training)
        rope=None,  # decoder.RotaryTable for the draft's positions, or None
        compress: dict | None = None,
    ):
        """Predicted next features ``[B, Q, D]``.

        ``compress`` (training a ``specvlm`` draft, no cache): keyword arguments of
        `ElasticCompressor.compress` besides ``h`` and ``positions`` (``valid``,
        ``span``, ``layouts``, ``features``, ``query``). The layer then reads the
        compressed sequence (causal, ``attention_mask`` ignored) and the result is
        ``(g, compressed)``: ``g [B, Q, D]`` holds the outputs at the text entries
        (zeros at visual ones). Routing this through ``forward`` keeps DDP's
        gradient hooks in play.
        """
        h = self.project(token_embeds, features)
        if compress is None:
            return self.decode(h, position_ids, attention_mask, cache, rope)
        comp = self.compressor.compress(h, position_ids, **compress)
        gc = self.decode(comp.embeds, comp.positions, causal_mask(comp.valid, h.dtype))  # [B, T', D]
        keep = comp.source >= 0
        g = h.new_zeros(h.shape).index_put((keep.nonzero()[:, 0], comp.source[keep]), gc[keep])
        return g, comp

    def project(self, token_embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The draft's input entries ``h = fc(cat(embed, feature))``: ``[B, Q, D]`` x 2 -> ``[B, Q, D]``."""
        return linear(torch.cat([token_embeds, features.to(token_embeds.dtype)], dim=-1), self.fc)

    def decode(
        self,
        h: torch.Tensor,  # [B, Q, D] from project() (or its compressed sequence)
        position_ids: torch.Tensor,  # [B, Q]
        attention_mask: torch.Tensor | None,  # [B, 1, Q, V] additive, None = causal without cache
        cache=None,
        rope=None,
    ) -> torch.Tensor:
        """The decoder layer over input entries: ``[B, Q, D]`` -> predicted next features ``[B, Q, D]``."""
        pos_emb = rope(h, position_ids) if rope is not None else self.rotary_emb(h, position_ids)
        if cache is not None and not self.training and fast_path_ok(self.layer):
            return run_layer(self.layer, h, position_ids, pos_emb, attention_mask, cache, fast=True)
        return self.layer(
            h,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=pos_emb,
        )

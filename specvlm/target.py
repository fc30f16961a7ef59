"""Adapter over HF vision-language models: inputs, prefill, tree verification, features.

Legend: B batch rows, T prompt tokens, Q tokens of one forward, D hidden,
V vocab, N images, P visual tokens.

Supported families (``config.model_type``): LLaVA-1.5 (``llava``,
`LlavaForConditionalGeneration`) and LLaVA-NeXT (``llava_next``, any-res
tiling with ``image_sizes``). Both keep ``model.model.language_model`` (an HF
decoder stack) and ``model.lm_head``; the adapter merges the visual features
into the prompt embeddings with the model's own ``get_image_features`` /
``get_placeholder_mask`` and then runs the decoder stack itself over a
`SlotKVCache` with explicit 4D masks and positions, so prefill, one-token
steps and whole-tree verification share one code path.

"Features" are the decoder's final hidden states after its last norm: the
LM head's input, which the draft learns to predict.
"""

from __future__ import annotations

import torch
from torch import nn

from .decoder import RotaryTable, fast_path_ok, linear, run_layer
from .kv import SlotKVCache

SUPPORTED = ("llava", "llava_next")


class TargetAdapter:
    """Wraps one HF VLM; holds no decode state."""

    def __init__(self, model: nn.Module):
        cfg = getattr(model, "config", None)
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(
                f"unsupported target model {type(model).__name__} (model_type={model_type!r}); "
                f"supported: {', '.join(SUPPORTED)} (LlavaForConditionalGeneration, "
                "LlavaNextForConditionalGeneration)"
            )
        self.model = model
        self.config = cfg
        self.model_type = model_type
        self.text_config = cfg.text_config
        self.language_model = model.model.language_model
        self.embed_tokens = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        image_token = getattr(cfg, "image_token_id", None)
        if image_token is None:
            image_token = getattr(cfg, "image_token_index", None)
        self.image_token_id = image_token
        placeholders = [t for t in (image_token, getattr(cfg, "video_token_id", None)) if t is not None]
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.placeholder_ids = torch.tensor(placeholders, dtype=torch.long, device=self.device)  # [S]
        tc = self.text_config
        self.num_layers = tc.num_hidden_layers
        self.layers = list(self.language_model.layers[: self.num_layers])
        self.fast = [fast_path_ok(layer) for layer in self.layers]
        self.num_kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        eos = model.generation_config.eos_token_id if model.generation_config else None
        if eos is None:
            eos = tc.eos_token_id
        self.eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    # ----------------------------------------------------------------- inputs
    def embed_inputs(
        self,
        input_ids: torch.Tensor,  # [B, T]
        pixel_values: torch.Tensor | None,  # [N, C, H, W] (llava) or [N, tiles, C, H, W] (llava_next)
        return_layouts: bool = False,
        **mm_kwargs,
    ):
        """Prompt embeddings with the visual features merged in: ``[B, T, D]``.

        With ``return_layouts``: ``(embeds, layouts)``, one `compressor.Layout`
        per image in the order the images fill the placeholders.
        Raises ValueError when image placeholders and images do not agree.
        """
        embeds = self.embed_tokens(input_ids)  # [B, T, D]
        n_tokens = int((input_ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        if pixel_values is None:
            if n_tokens:
                raise ValueError(
                    f"input_ids hold {n_tokens} image placeholder tokens (id {self.image_token_id}) "
                    "but pixel_values is missing"
                )
            return (embeds, []) if return_layouts else embeds
        if n_tokens == 0:
            raise ValueError(
                f"pixel_values given but input_ids hold no image placeholder token (id {self.image_token_id}); "
                "build the prompt with the model's processor"
            )
        if self.model_type == "llava_next" and mm_kwargs.get("image_sizes") is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (as returned by its processor)")
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
            **{k: v for k, v in mm_kwargs.items() if v is not None},
        )
        per_image = list(out.pooler_output)
        feats = torch.cat(per_image, dim=0).to(embeds.dtype)  # [P_total, D]
        if feats.shape[0] != n_tokens:
            raise ValueError(
                f"input_ids hold {n_tokens} image placeholder tokens but the images give {feats.shape[0]} "
                "visual features; the prompt must hold exactly one placeholder per visual token "
                "(use the model's processor to build it)"
            )
        mask = (input_ids == self.image_token_id)[..., None]  # [B, T, 1]
        embeds = embeds.masked_scatter(mask, feats)
        if not return_layouts:
            return embeds
        sizes = mm_kwargs.get("image_sizes")
        return embeds, [self.layout(f.shape[0], None if sizes is None else sizes[i]) for i, f in enumerate(per_image)]

    def layout(self, n_tokens: int, image_size=None) -> tuple:
        """The patch layout of one image's ``n_tokens`` visual tokens (see `compressor.Segment`).

        LLaVA-1.5: a ``g x g`` grid (after a CLS token with the ``full`` strategy).
        LLaVA-NeXT: the base tile's grid, then the unpadded high-res grid with its
        newline column (or one trailing newline for a single tile). Anything
        else falls back to one row of ``n_tokens`` patches.
        """
        from .compressor import Segment

        vc = self.config.vision_config
        g = vc.image_size // vc.patch_size
        if self.model_type == "llava":
            if n_tokens == g * g:
                return (Segment(g, g),)
            if n_tokens == g * g + 1:
                return (Segment(loose=1), Segment(g, g))
        elif self.model_type == "llava_next" and image_size is not None and n_tokens > g * g:
            from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

            rest = n_tokens - g * g
            if rest == 1:
                return (Segment(g, g), Segment(loose=1))
            nph, npw = get_anyres_image_grid_shape(
                image_size.tolist() if torch.is_tensor(image_size) else image_size,
                self.config.image_grid_pinpoints, vc.image_size,
            )  # fmt: skip
            h, w = unpad_image(torch.empty(1, nph * g, npw * g), image_size).shape[1:]
            if h * (w + 1) == rest:
                return (Segment(g, g), Segment(int(h), int(w), newline=True))
        return (Segment(1, n_tokens),)

    # --------------------------------------------------------------- forwards
    def rotary_table(self, length: int) -> RotaryTable:
        """Rotary ``(cos, sin)`` lookup for positions ``[0, length)``."""
        return RotaryTable(self.language_model.rotary_emb, length, self.embed_tokens.weight)

    def new_cache(self, batch_size: int, max_len: int) -> SlotKVCache:
        return SlotKVCache(
            self.num_layers, batch_size, self.num_kv_heads, self.head_dim, max_len, self.dtype, self.device
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [B, Q, D]
        position_ids: torch.Tensor,  # [B, Q]
        attention_mask: torch.Tensor,  # [B, 1, Q, V] from cache.begin()
        cache: SlotKVCache,
        rope: RotaryTable | None = None,
    ) -> torch.Tensor:
        """Run the decoder stack over the cache; returns features ``[B, Q, D]`` (LM-head input).

        The HF decoder layers run directly (rotary embedding once, each layer via
        `decoder.run_layer`, final norm): the model's own math without its
        per-call wrapper work, which matters for small models.
        """
        lm = self.language_model
        h = inputs_embeds
        pos_emb = rope(h, position_ids) if rope is not None else lm.rotary_emb(h, position_ids)
        for layer, fast in zip(self.layers, self.fast):
            h = run_layer(layer, h, position_ids, pos_emb, attention_mask, cache, fast)
        return lm.norm(h)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` features -> ``[..., V]`` logits."""
        return linear(features, self.lm_head)

"""Adapter over HF vision-language models: inputs, prefill, tree verification, features.

Legend: B batch rows, T prompt tokens, Q tokens of one forward, D hidden,
V vocab, N images, P visual tokens.

Supported families (``config.model_type``): LLaVA-1.5 (``llava``,
`LlavaForConditionalGeneration`), LLaVA-NeXT (``llava_next``, any-res
tiling with ``image_sizes``), and Qwen2-VL / Qwen2.5-VL / Qwen3-VL
(``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``: native-resolution images and
videos as flattened patches + ``*_grid_thw``). All keep
``model.model.language_model`` (an HF decoder stack) and ``model.lm_head``;
the adapter merges the visual features into the prompt embeddings with the
model's own ``get_image_features`` / ``get_video_features`` and then runs the
decoder stack itself over a `SlotKVCache` with explicit 4D masks and
positions, so prefill, one-token steps and whole-tree verification share one
code path.

Positions. LLaVA: one axis, ``0..n-1`` over a row's real tokens. Qwen-VL
(M-RoPE): the prompt's ``[3, B, T]`` (temporal, height, width) positions come
from the model's own ``get_rope_index``; every later token (generated, tree
node, draft entry) has all three axes equal, starting at
`Prompt.next_position` (one past the prompt's largest position, i.e. HF's
rope delta applied), so decode steps use plain ``[B, Q]`` positions and
the rotary embedding gives the same cos/sin for ``(p, p, p)`` as for ``p``.
Qwen3-VL's DeepStack features are added after its first decoder layers at
the visual positions during the prefill, as the model does.

"Features" are the decoder's final hidden states after its last norm: the
LM head's input, which the draft learns to predict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .decoder import RotaryTable, fast_path_ok, linear, run_layer
from .kv import SlotKVCache

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SUPPORTED = ("llava", "llava_next", *QWEN)
CLASSES = (
    "LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration, "
    "Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration"
)


@dataclass
class Prompt:
    """A batch of prompts ready for the prefill (`TargetAdapter.prompt`)."""

    embeds: torch.Tensor  # [B, T, D] token embeddings with the visual features merged in
    positions: torch.Tensor  # [B, T] rotary positions, or [3, B, T] (M-RoPE)
    next_position: torch.Tensor  # [B] position (every axis) of each row's first generated token
    layouts: list = field(default_factory=list)  # one compressor.Layout per visual span, row-major (if asked)
    deepstack: tuple | None = None  # Qwen3-VL: (visual mask [B, T], per layer [P, D] features to add)


class TargetAdapter:
    """Wraps one HF VLM; holds no decode state."""

    def __init__(self, model: nn.Module):
        cfg = getattr(model, "config", None)
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(
                f"unsupported target model {type(model).__name__} (model_type={model_type!r}); "
                f"supported: {', '.join(SUPPORTED)} ({CLASSES})"
            )
        self.model = model
        self.config = cfg
        self.model_type = model_type
        self.qwen = model_type in QWEN
        self.text_config = cfg.text_config
        self.language_model = model.model.language_model
        self.embed_tokens = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        image_token = getattr(cfg, "image_token_id", None)
        if image_token is None:
            image_token = getattr(cfg, "image_token_index", None)
        self.image_token_id = image_token
        self.video_token_id = getattr(cfg, "video_token_id", None)
        placeholders = [t for t in (image_token, self.video_token_id) if t is not None]
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
    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        """``[...]`` token ids -> bool ``[...]``: image or video placeholders."""
        return torch.isin(ids, self.placeholder_ids)

    def prompt(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, T] left-padded
        pixel_values: torch.Tensor | None = None,
        return_layouts: bool = False,
        **mm_kwargs,
    ) -> Prompt:
        """Prompt embeddings with the visual features merged in, and their rotary positions.

        ``pixel_values`` and ``mm_kwargs`` are what the model's processor returns: LLaVA
        ``[N, C, H, W]`` (NeXT: ``[N, tiles, C, H, W]`` + ``image_sizes``); Qwen-VL flattened
        patches + ``image_grid_thw``, and/or ``pixel_values_videos`` + ``video_grid_thw``
        (+ ``second_per_grid_ts``). With ``return_layouts``, `Prompt.layouts` holds one
        `compressor.Layout` per visual span in row-major order (what the compressor reads).
        Raises ValueError when placeholders and media do not agree.
        """
        if self.qwen:
            return self._qwen_prompt(input_ids, attention_mask, pixel_values, return_layouts, mm_kwargs)
        embeds = self.embed_tokens(input_ids)  # [B, T, D]
        mask = attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        prompt = Prompt(embeds, positions, mask.sum(-1))
        n_tokens = int((input_ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        if pixel_values is None:
            if n_tokens:
                raise ValueError(
                    f"input_ids hold {n_tokens} image placeholder tokens (id {self.image_token_id}) "
                    "but pixel_values is missing"
                )
            return prompt
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
        self._check_count(n_tokens, feats.shape[0], "image")
        prompt.embeds = embeds.masked_scatter((input_ids == self.image_token_id)[..., None], feats)
        if return_layouts:
            sizes = mm_kwargs.get("image_sizes")
            prompt.layouts = [self.layout(f.shape[0], None if sizes is None else sizes[i])
                              for i, f in enumerate(per_image)]  # fmt: skip
        return prompt

    @staticmethod
    def _check_count(n_tokens: int, n_feats: int, kind: str) -> None:
        if n_feats != n_tokens:
            raise ValueError(
                f"input_ids hold {n_tokens} {kind} placeholder tokens but the {kind}s give {n_feats} "
                "visual features; the prompt must hold exactly one placeholder per visual token "
                "(use the model's processor to build it)"
            )

    def _qwen_prompt(self, input_ids, attention_mask, pixel_values, return_layouts, mm) -> Prompt:
        """Qwen-VL: images and videos through the model's own encoders, M-RoPE positions from its own
        ``get_rope_index``, DeepStack features (Qwen3-VL) kept for the prefill."""
        m = self.model.model
        embeds = self.embed_tokens(input_ids)  # [B, T, D]
        media = {"image": (pixel_values, mm.get("image_grid_thw")),
                 "video": (mm.get("pixel_values_videos"), mm.get("video_grid_thw"))}  # fmt: skip
        masks, deep = {}, {}
        for kind, token in (("image", self.image_token_id), ("video", self.video_token_id)):
            pv, grid = media[kind]
            where = input_ids == token  # [B, T]
            n_tokens = int(where.sum())
            pv_name = "pixel_values" if kind == "image" else "pixel_values_videos"
            if pv is None:
                if n_tokens:
                    raise ValueError(f"input_ids hold {n_tokens} {kind} placeholder tokens but {pv_name} is missing")
                continue
            if grid is None:
                raise ValueError(f"{pv_name} needs {kind}_grid_thw (as returned by the model's processor)")
            if n_tokens == 0:
                raise ValueError(
                    f"{pv_name} given but input_ids hold no {kind} placeholder token (id {token}); "
                    "build the prompt with the model's processor"
                )
            encode = m.get_image_features if kind == "image" else m.get_video_features
            out = encode(pv.to(self.dtype), grid, return_dict=True)
            feats = torch.cat(list(out.pooler_output), dim=0).to(embeds.dtype)  # [P, D]
            self._check_count(n_tokens, feats.shape[0], kind)
            embeds = embeds.masked_scatter(where[..., None], feats)
            masks[kind] = where
            if getattr(out, "deepstack_features", None):  # Qwen3-VL: per layer, per image/video
                deep[kind] = [torch.cat(list(f), dim=0).to(embeds.dtype) for f in out.deepstack_features]
        mask = attention_mask.long()
        types = (input_ids == self.image_token_id).int() + 2 * (input_ids == self.video_token_id).int()
        positions, _ = m.get_rope_index(
            input_ids, types, mm.get("image_grid_thw"), mm.get("video_grid_thw"),
            second_per_grid_ts=mm.get("second_per_grid_ts"), attention_mask=mask,
        )  # fmt: skip  # [3, B, T]
        # every axis of the first generated token: one past the prompt's largest position (HF's rope delta)
        nxt = positions.masked_fill(~mask.bool()[None], 0).amax(dim=(0, 2)) + 1  # [B]
        prompt = Prompt(embeds, positions, nxt)
        if deep:
            visual = masks.get("image", torch.zeros_like(input_ids, dtype=torch.bool))
            visual = visual | masks.get("video", torch.zeros_like(visual))
            layers = []
            for i in range(len(next(iter(deep.values())))):
                joint = embeds.new_zeros(int(visual.sum()), embeds.shape[-1])  # [P_image + P_video, D]
                for kind, feats in deep.items():
                    joint[masks[kind][visual]] = feats[i]
                layers.append(joint)
            prompt.deepstack = (visual, layers)
        if return_layouts:
            prompt.layouts = self._qwen_layouts(input_ids, mm.get("image_grid_thw"), mm.get("video_grid_thw"))
        return prompt

    def _qwen_layouts(self, input_ids, image_grid_thw, video_grid_thw) -> list:
        """One layout per contiguous placeholder run, row-major: an image is its merged patch grid
        (``h/merge x w/merge``); a video run holds one such grid per temporal slice (Qwen3-VL puts each
        slice in its own run, after a timestamp)."""
        from .compressor import Segment

        merge = self.config.vision_config.spatial_merge_size
        grids = {
            self.image_token_id: [list(g) for g in (image_grid_thw.tolist() if image_grid_thw is not None else [])],
            self.video_token_id: [list(g) for g in (video_grid_thw.tolist() if video_grid_thw is not None else [])],
        }
        layouts = []
        for row in input_ids.tolist():
            i = 0
            while i < len(row):
                tok = row[i]
                if tok not in grids:
                    i += 1
                    continue
                j = i
                while j < len(row) and row[j] == tok:
                    j += 1
                segs, n = [], j - i
                while n > 0:
                    if not grids[tok]:
                        raise ValueError("the prompts hold more visual tokens than the grids (*_grid_thw) cover")
                    g = grids[tok][0]
                    seg = Segment(g[1] // merge, g[2] // merge)
                    segs.append(seg)
                    n -= seg.size
                    g[0] -= 1
                    if g[0] == 0:
                        grids[tok].pop(0)
                if n < 0:
                    raise ValueError(f"a visual span of {j - i} tokens does not match its grids ({segs})")
                layouts.append(tuple(segs))
                i = j
        return layouts

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
        deepstack: tuple | None = None,
    ) -> torch.Tensor:
        """Run the decoder stack over the cache; returns features ``[B, Q, D]`` (LM-head input).

        ``position_ids`` may be ``[3, B, Q]`` (M-RoPE prompt positions). ``deepstack``
        (`Prompt.deepstack`, prefill only): features added after the first layers at the
        visual positions. The HF decoder layers run directly (rotary embedding once, each
        layer via `decoder.run_layer`, final norm): the model's own math without its
        per-call wrapper work, which matters for small models.
        """
        lm = self.language_model
        h = inputs_embeds
        pos_emb = rope(h, position_ids) if rope is not None else lm.rotary_emb(h, position_ids)
        visual, extra = deepstack if deepstack is not None else (None, ())
        for i, (layer, fast) in enumerate(zip(self.layers, self.fast)):
            h = run_layer(layer, h, position_ids, pos_emb, attention_mask, cache, fast)
            if i < len(extra):
                h = h.index_put((visual,), h[visual] + extra[i].to(h.dtype))
        return lm.norm(h)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` features -> ``[..., V]`` logits."""
        return linear(features, self.lm_head)

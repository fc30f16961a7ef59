"""Tiny random-init VLMs built in code (no downloads), and prompts for them.

Used by the tests, the engine benchmark and anyone who wants to try the
engine without a checkpoint. Token ids: 0 pad, 1 bos, 2 eos, 3 image
placeholder, the rest text.

Legend: B batch rows, T tokens, N images, C channels, H/W pixels.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from .inputs import left_pad

PAD, BOS, EOS, IMAGE = 0, 1, 2, 3


def tiny_llava(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 96,
    image_size: int = 16,
    patch: int = 4,
    vision_feature_layer: int | list[int] = -2,
    strategy: str = "default",
    intermediate: int | None = None,
    next_: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A random-init `LlavaForConditionalGeneration` (or LLaVA-NeXT with ``next_=True``)."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=2048, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    common = dict(
        vision_config=vision, text_config=text, image_token_id=IMAGE,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if next_:
            s = image_size
            cfg = LlavaNextConfig(image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]], **common)
            model = LlavaNextForConditionalGeneration(cfg)
        else:
            model = LlavaForConditionalGeneration(LlavaConfig(**common))
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    return model.to(dtype).eval()


def num_image_tokens(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> list[int]:
    """Visual tokens each image produces (what the processor would put in the prompt)."""
    kw = {} if image_sizes is None else {"image_sizes": image_sizes}
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            return_dict=True,
            **kw,
        )
    return [f.shape[0] for f in out.pooler_output]


def tiny_inputs(model, text_lengths: list[int], seed: int = 0, image_sizes: list[tuple[int, int]] | None = None):
    """Left-padded prompts ``[bos, <image> * n, text...]`` with random text and pixels.

    Returns a dict with ``input_ids [B, T]``, ``attention_mask [B, T]``,
    ``pixel_values`` (``[B, C, H, W]``, or ``[B, tiles, C, H, W]`` + ``image_sizes [B, 2]`` for NeXT).
    """
    g = torch.Generator().manual_seed(seed)
    B = len(text_lengths)
    vc = model.config.vision_config
    dtype = next(model.parameters()).dtype
    vocab = model.config.text_config.vocab_size
    out = {}
    if model.config.model_type == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        image_sizes = image_sizes or [(vc.image_size, vc.image_size)] * B
        tiles = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, vc.image_size) for s in image_sizes]
        pv = torch.randn(B, max(tiles), 3, vc.image_size, vc.image_size, generator=g).to(dtype)
        sizes = torch.tensor(image_sizes)
        out.update(pixel_values=pv, image_sizes=sizes)
        n_img = num_image_tokens(model, pv, sizes)
    else:
        pv = torch.randn(B, 3, vc.image_size, vc.image_size, generator=g).to(dtype)
        out["pixel_values"] = pv
        n_img = num_image_tokens(model, pv)
    rows = []
    for n, L in zip(n_img, text_lengths):
        text = torch.randint(IMAGE + 1, vocab, (L,), generator=g).tolist()
        rows.append([BOS] + [IMAGE] * n + text)
    out.update(left_pad(rows, PAD))
    return out

"""Tiny random-init VLMs built in code (no downloads), and prompts for them.

Used by the tests, the engine benchmark and anyone who wants to try the
engine without a checkpoint. Token ids: 0 pad, 1 bos, 2 eos, 3 image
placeholder; Qwen-VL models also 4 video placeholder, 5 vision start, 6 vision
end; the rest text.

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
VIDEO, VISION_START, VISION_END = 4, 5, 6  # Qwen-VL only
FIRST_TEXT = VISION_END + 1  # the first id with no special meaning in either family: random prompt text
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


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


def tiny_qwen(
    family: str = "qwen2_5_vl",
    token_ids: dict[str, int | list[int]] | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 96,
    patch: int = 4,
    intermediate: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    init_std: float = 0.02,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    window: int | None = None,
):
    """A random-init Qwen2-VL / Qwen2.5-VL / Qwen3-VL (``family``: one of `QWEN_FAMILIES`); also the demo's
    Qwen2.5-VL target (`specvlm.demo.recipe`).

    The vision tower is ``vision_layers`` blocks wide ``vision_hidden`` with ``patch``-pixel patches, 2x2 merge
    and 2-frame temporal patches (Qwen2.5-VL: attention windows of ``window`` pixels, default ``4 * patch``,
    the last block global); the text model's M-RoPE sections split its head dim (``hidden // heads``) 2:1:1 (Qwen2.x,
    contiguous) or interleaved (Qwen3-VL, which also feeds DeepStack features into its first 2 layers).
    ``token_ids`` overrides this module's special ids (keys ``pad``, ``bos``, ``eos`` (an id or a list, the
    first one the text config's), ``image``, ``video``, ``vision_start``, ``vision_end``), e.g. a tokenizer's.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    if family not in QWEN_FAMILIES:
        raise ValueError(f"family must be one of {QWEN_FAMILIES}, got {family!r}")
    half = hidden // heads // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]  # t, h, w frequencies: sums to head_dim / 2
    text = dict(
        hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=init_std,
    )  # fmt: skip
    vision = dict(depth=vision_layers, num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3, initializer_range=init_std)  # fmt: skip
    if family == "qwen2_vl":
        vision.update(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                      window_size=window or 4 * patch, fullatt_block_indexes=[vision_layers - 1],
                      tokens_per_second=2)  # fmt: skip
    else:
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1])  # fmt: skip
        text["head_dim"] = hidden // heads
    ids = {"pad": PAD, "bos": BOS, "eos": EOS, "image": IMAGE, "video": VIDEO, "vision_start": VISION_START,
           "vision_end": VISION_END, **(token_ids or {})}  # fmt: skip
    eos = ids["eos"] if isinstance(ids["eos"], int) else ids["eos"][0]
    text.update(pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=eos)
    cfg = AutoConfig.for_model(
        family, text_config=text, vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"], tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg)
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.bos_token_id = ids["bos"]
    return model.to(dtype).eval()


def tiny_qwen_inputs(model, rows: list[tuple], seed: int = 0) -> dict:
    """Left-padded Qwen-VL prompts with random pixels, as the Qwen processor lays them out.

    Each row is ``(media, text_length)`` with media ``None`` (text only), ``("image", h, w)`` or
    ``("video", frames, h, w)`` (pixels; multiples of ``2 * patch``, frames of 2). A row reads
    ``[bos, <vision_start>, <pad> * n, <vision_end>, text...]``; Qwen3-VL videos put each temporal
    patch in its own ``<vision_start> ... <vision_end>`` after a timestamp token, as its processor does.

    Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` ``[B, T]``; ``pixel_values``
    ``[patches, C * 2 * p * p]`` + ``image_grid_thw [N, 3]`` and ``pixel_values_videos`` +
    ``video_grid_thw`` (+ ``second_per_grid_ts`` for Qwen2.5-VL) when present.
    """
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    p, m, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    dtype = next(model.parameters()).dtype
    vocab = model.config.text_config.vocab_size
    family = model.config.model_type
    ids, pix = [], {"image": [], "video": []}
    grids = {"image": [], "video": []}
    for media, length in rows:
        row = [BOS]
        if media is not None:
            kind, *shape = media
            frames, h, w = (tp, *shape) if kind == "image" else shape
            t, gh, gw = frames // tp, h // p, w // p
            grids[kind].append([t, gh, gw])
            pix[kind].append(torch.randn(t * gh * gw, 3 * tp * p * p, generator=g))
            per = gh * gw // (m * m)  # merged tokens per temporal patch
            pad = IMAGE if kind == "image" else VIDEO
            if kind == "video" and family == "qwen3_vl":
                for _ in range(t):  # "<t seconds>" timestamp text, then the frame
                    row += [int(torch.randint(FIRST_TEXT, vocab, (1,), generator=g)), VISION_START]
                    row += [pad] * per + [VISION_END]
            else:
                row += [VISION_START] + [pad] * (t * per) + [VISION_END]
        row += torch.randint(FIRST_TEXT, vocab, (length,), generator=g).tolist()
        ids.append(row)
    out = left_pad(ids, PAD)
    ii = out["input_ids"]
    out["mm_token_type_ids"] = ((ii == IMAGE).long() + 2 * (ii == VIDEO).long()).int()
    if grids["image"]:
        out["pixel_values"] = torch.cat(pix["image"]).to(dtype)
        out["image_grid_thw"] = torch.tensor(grids["image"])
    if grids["video"]:
        out["pixel_values_videos"] = torch.cat(pix["video"]).to(dtype)
        out["video_grid_thw"] = torch.tensor(grids["video"])
        if family == "qwen2_5_vl":
            out["second_per_grid_ts"] = torch.ones(len(grids["video"]))
    return out


def save_tiny_qwen(path, family: str = "qwen2_5_vl", seed: int = 0, **kw):
    """Write a tiny random-init Qwen-VL target and its processor as one HF folder (what ``model.target`` names
    for ``specvlm caption`` / ``specvlm serve``); returns the path.

    The processor is `specvlm.demo.text.build_qwen_processor(family)`; the model is `tiny_qwen` sized to it:
    its vocabulary, patch size and special token ids, eos ``<|im_end|>`` then ``</s>``. ``kw`` goes to
    `tiny_qwen` (``hidden``, ``layers``, ...).
    """
    from pathlib import Path

    from .demo.text import build_qwen_processor

    processor = build_qwen_processor(family)
    tok = processor.tokenizer
    tokens = {"pad": tok.pad_token, "bos": tok.bos_token, "image": processor.image_token,
              "video": processor.video_token, "vision_start": processor.tokenizer.vision_start_token,
              "vision_end": processor.tokenizer.vision_end_token}  # fmt: skip
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in tokens.items()}
    ids["eos"] = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("</s>")]
    model = tiny_qwen(family, token_ids=ids, vocab=len(tok), patch=processor.image_processor.patch_size, seed=seed,
                      **kw)  # fmt: skip
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path

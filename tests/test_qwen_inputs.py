"""Qwen-VL inputs without the engine: the demo's Qwen processors (`build_qwen_processor`), `video_patches`
against HF's own video patch order, `encode` / `collate` over image, video and text-only rows,
`load_target` / `target_family` on Qwen folders, and `save_tiny_qwen` (CPU, no downloads, no torchvision)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from specvlm.demo import ShapesWorld, build_processor
from specvlm.demo.text import QWEN_SPECIAL_TOKENS, build_qwen_processor, build_tokenizer, vocabulary
from specvlm.inputs import (
    DEFAULT_VIDEO_FPS,
    QWEN_PROCESSORS,
    chat_prompt,
    collate,
    encode,
    pad_token_id,
    question_chat,
    video_patches,
)
from specvlm.loading import TARGET_CLASSES, load_target, target_family
from specvlm.tiny import save_tiny_qwen

FAMILIES = tuple(QWEN_PROCESSORS)
Q, QV = "describe the image.", "describe the video."
USER_IMAGE = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>describe the image.<|im_end|>\n"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # Qwen2-VL / Qwen2.5-VL only
ASSISTANT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def procs():
    return {family: build_qwen_processor(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def media():
    world = ShapesWorld(7)
    frames, _ = world.video_scene(frames=4)  # 96x96
    wide = world.image_scene()[0].resize((128, 64))
    return {"image": world.image_scene()[0], "wide": wide, "frames": frames}


def tokens(proc, ids) -> list[str]:
    return proc.tokenizer.convert_ids_to_tokens(ids.tolist())


# ----------------------------------------------------------------------------- the demo's Qwen processors
def test_qwen_vocabulary_is_appended_after_the_demo_ids():
    demo, qwen = vocabulary(), vocabulary(qwen=True)
    assert list(qwen.items())[: len(demo)] == list(demo.items())  # every existing id unchanged
    assert [qwen[t] for t in QWEN_SPECIAL_TOKENS] == list(range(len(demo), len(demo) + len(QWEN_SPECIAL_TOKENS)))
    tok = build_tokenizer(qwen=True)
    ids = tok("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|><12.5 seconds>").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "user", "<|vision_start|>", "<|video_pad|>",
                                              "<|vision_end|>", "<", "1", "2", ".", "5", "seconds", ">"]  # fmt: skip
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0 and tok.unk_token_id not in ids  # no bos
    assert build_tokenizer()("describe the image.").input_ids[0] == 1  # the demo's own tokenizer keeps its bos


@pytest.mark.parametrize("family", FAMILIES)
def test_the_processor_is_hfs_class_with_the_familys_template(family, procs, media):
    p = procs[family]
    assert isinstance(p, getattr(transformers, QWEN_PROCESSORS[family])) and p.video_processor is None
    head = SYSTEM if family != "qwen3_vl" else ""  # Qwen3-VL's template has no default system turn
    assert chat_prompt(p, Q) == head + USER_IMAGE + ASSISTANT
    chat = [{"role": "system", "content": "be brief."}, {"role": "user", "content": [{"type": "image"},
            {"type": "text", "text": "what is it?"}]}, {"role": "assistant", "content": "a star."},
            {"role": "user", "content": "and the background?"}]  # fmt: skip
    assert chat_prompt(p, chat) == (
        "<|im_start|>system\nbe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "what is it?<|im_end|>\n<|im_start|>assistant\na star.<|im_end|>\n<|im_start|>user\nand the background?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    enc = encode(p, [Q], [media["image"]])
    assert set(enc) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    assert enc["image_grid_thw"].tolist() == [[1, 12, 12]]  # 96x96 at its own size: 12x12 patches of 8 pixels
    assert tuple(enc["pixel_values"].shape) == (144, 3 * 2 * 8 * 8) and enc["pixel_values"].dtype == torch.float32
    ids = enc["input_ids"][0]
    assert (ids == p.image_token_id).sum() == 36 and p.tokenizer.unk_token_id not in ids  # 2x2 merge
    assert torch.equal(enc["mm_token_type_ids"][0], (ids == p.image_token_id).long())


# ----------------------------------------------------------------------------- video_patches
def test_a_still_video_gives_exactly_the_image_patches(procs, media):
    ip = procs["qwen2_5_vl"].image_processor
    ref = ip(images=[media["wide"]], return_tensors="pt")
    for frames in ([media["wide"]] * 2, [np.asarray(media["wide"])] * 2, [media["wide"]]):  # one frame: repeated
        pv, grid = video_patches(ip, frames)
        assert torch.equal(pv, ref["pixel_values"]) and grid == ref["image_grid_thw"][0].tolist() == [1, 8, 16]


def test_video_patches_follow_hfs_video_processor(procs, media):
    """Per frame the image processor's resize, rescale and normalize; then the patch order of transformers'
    `Qwen2VLVideoProcessor.patchify` (copied below: the class cannot be imported without torchvision),
    the last frame repeated up to a whole temporal patch."""
    ip = procs["qwen3_vl"].image_processor
    p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    frames = media["frames"][:3]
    arrays = []
    for f in frames:
        x = np.moveaxis(np.asarray(f), -1, 0)  # [C, H, W]
        x = ip.resize(x, size=ip.size, resample=ip.resample, factor=p * m)
        arrays.append(ip.normalize(ip.rescale(x, ip.rescale_factor), ip.image_mean, ip.image_std))
    videos = torch.from_numpy(np.stack(arrays)).float()[None]  # [1, 3, C, H, W]
    # --- transformers.models.qwen2_vl.video_processing_qwen2_vl.Qwen2VLVideoProcessor.patchify (5.24)
    batch_size, num_frames, channel, resized_height, resized_width = videos.shape
    if pad := -num_frames % t:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        num_frames += pad
    grid_t, grid_h, grid_w = num_frames // t, resized_height // p, resized_width // p
    patches = videos.view(batch_size, grid_t, t, channel, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    want = patches.reshape(batch_size, grid_t * grid_h * grid_w, channel * t * p * p)[0]
    # ---
    pv, grid = video_patches(ip, frames)
    assert grid == [grid_t, grid_h, grid_w] == [2, 12, 12]
    torch.testing.assert_close(pv, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one size"):
        video_patches(ip, [media["image"], media["wide"]])


# ----------------------------------------------------------------------------- encode / collate
@pytest.mark.parametrize("family", FAMILIES)
def test_video_rows_are_laid_out_as_hfs_processor_lays_them_out(family, procs, media):
    p = procs[family]
    enc = encode(p, [QV], videos=[media["frames"]], video_fps=[4.0])
    ids = enc["input_ids"][0]
    assert enc["video_grid_thw"].tolist() == [[2, 12, 12]] and tuple(enc["pixel_values_videos"].shape) == (288, 384)
    assert (ids == p.video_token_id).sum() == 72 and p.tokenizer.unk_token_id not in ids
    assert torch.equal(enc["mm_token_type_ids"][0], 2 * (ids == p.video_token_id).long())
    toks = tokens(p, ids)
    span = ["<|video_pad|>"] * 36
    # Qwen3-VL: each temporal slice in its own vision run after its timestamp; transformers 5.25 drops the chat
    # template's outer vision start/end around them (5.24 kept it)
    if family == "qwen3_vl":  # frames 0..3 at 4 fps: temporal patches at 0.125 s and 0.625 s
        frame = ["<|vision_start|>", *span, "<|vision_end|>"]
        want = ["<", "0", ".", "1", "seconds", ">", *frame, "<", "0", ".", "6", "seconds", ">", *frame]
        if "get_text_with_replacements" not in vars(transformers.Qwen3VLProcessor):
            want = ["<|vision_start|>", *want, "<|vision_end|>"]  # before transformers 5.25: the template's wrapper
    else:
        want = ["<|vision_start|>", *span, *span, "<|vision_end|>"]
    start = toks.index(want[0])
    assert toks[start : start + len(want)] == want
    if family == "qwen2_5_vl":  # temporal_patch_size / fps
        assert enc["second_per_grid_ts"].tolist() == [0.5]
        default = encode(p, [QV], videos=[media["frames"][:3]])  # 3 frames: the last repeated
        assert default["second_per_grid_ts"].tolist() == [2 / DEFAULT_VIDEO_FPS]
        assert default["video_grid_thw"].tolist() == [[2, 12, 12]]
    else:
        assert "second_per_grid_ts" not in enc


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_mixed_batch_is_its_rows_encoded_alone_then_collated(family, procs, media):
    """Image, video and text-only rows in one left-padded batch: one processor call (media in row order) and
    rows encoded one by one then `collate`d (the Serve and caption path) give the same tensors."""
    p = procs[family]
    chats = [question_chat(Q), question_chat(QV, 0, 1), [{"role": "user", "content": "hello"}],
             question_chat("what is it?", 1, 1), question_chat(Q)]  # fmt: skip
    images, videos = [media["image"], media["image"], media["wide"]], [media["frames"], media["frames"][:2]]
    fps = [4.0, 8.0]
    batch = encode(p, chats, images=images, videos=videos, video_fps=fps)
    rows = [encode(p, [chats[0]], images=images[:1]), encode(p, [chats[1]], videos=videos[:1], video_fps=fps[:1]),
            encode(p, [chats[2]]), encode(p, [chats[3]], images=images[1:2], videos=videos[1:], video_fps=fps[1:]),
            encode(p, [chats[4]], images=images[2:])]  # fmt: skip
    out = collate(rows, pad_token_id(p.tokenizer))
    assert set(out) == set(batch)
    for k in out:
        assert torch.equal(out[k], batch[k]), k
    assert out["image_grid_thw"].tolist() == [[1, 12, 12], [1, 12, 12], [1, 8, 16]]  # concatenated, not stacked
    assert out["video_grid_thw"].tolist() == [[2, 12, 12], [1, 12, 12]]
    mask = out["attention_mask"]
    assert (mask[:, -1] == 1).all() and (out["mm_token_type_ids"][mask == 0] == 0).all()  # left padding, type 0


def test_encode_refuses_what_it_cannot_place(procs, media):
    with pytest.raises(ValueError, match="takes no videos"):
        encode(build_processor(), [QV], videos=[media["frames"]])  # LLaVA: videos are tiled before they get here
    with pytest.raises(ValueError, match="video_fps has 2 entries for 1 videos"):
        encode(procs["qwen2_vl"], [QV], videos=[media["frames"]], video_fps=[1.0, 2.0])


# ----------------------------------------------------------------------------- folders: save and load
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {family: save_tiny_qwen(root / family, family, seed=1) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_tiny_qwen_loads_as_its_family_and_fits_its_processor(family, folders, procs, media):
    model, proc = load_target(folders[family])
    assert target_family(folders[family]) == family and type(model).__name__ == TARGET_CLASSES[family]
    assert type(proc) is type(procs[family]) and proc.tokenizer.padding_side == "left"
    tok, cfg = proc.tokenizer, model.config
    assert cfg.text_config.vocab_size == len(tok) == len(vocabulary(qwen=True))
    assert (cfg.image_token_id, cfg.video_token_id) == (proc.image_token_id, proc.video_token_id)
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(["<|im_end|>", "</s>"])
    assert cfg.vision_config.patch_size == proc.image_processor.patch_size
    chats = [question_chat(Q), question_chat(QV, 0, 1), [{"role": "user", "content": "hello"}]]
    args = dict(images=[media["image"]], videos=[media["frames"]], video_fps=[4.0])
    enc = encode(proc, chats, **args)
    for k, v in encode(procs[family], chats, **args).items():  # the saved processor is the one built
        assert torch.equal(enc[k], v), k
    with torch.no_grad():  # HF's own forward takes what the processor returns
        logits = model(**enc).logits
    assert tuple(logits.shape) == (3, enc["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "idefics3"])
def test_other_families_are_refused_by_name(model_type, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    want = f"unsupported model_type '{model_type}'.*supported: llava, llava_next, qwen2_vl, qwen2_5_vl, qwen3_vl"
    for fn in (target_family, load_target):
        with pytest.raises(ValueError, match=want):
            fn(tmp_path)
    if model_type == "qwen3_vl_moe":
        with pytest.raises(ValueError, match="mixture-of-experts"):
            target_family(tmp_path)


def test_decode_rows_pass_a_videos_frames_for_native_video_targets(tmp_path):
    """The caption job's CPU decode: for a Qwen-VL target a video row is its sampled frames (and their fps),
    an image row one image; for other targets the video is one tiled image (as before)."""
    from caption_inputs import encode_video, save, shapes_video

    from pipelines import caption_io as cio

    frames, _ = shapes_video()  # 8 frames at 8 fps
    listed = cio.listed_table([{"id": "v", "uri": "v.mp4", "data": encode_video(frames)},
                               {"id": "i", "uri": "i.png", "data": save(frames[0], "PNG")}])  # fmt: skip
    opts = cio.DecodeOptions(video_frames=4)
    video, image = cio.decode_rows(listed, opts, native_video=True).to_pylist()
    assert (video["frames"], video["width"], video["height"], video["error"]) == (4, 96, 96, None)
    assert len(video["pixels"]) == 4 * 96 * 96 * 3
    assert video["fps"] == pytest.approx(3 / (7 / 8))  # frames 0, 2, 5, 7 of 8 fps: 3 gaps in 0.875 s
    assert (image["frames"], image["fps"], len(image["pixels"])) == (None, None, 96 * 96 * 3)
    tiled = cio.decode_rows(listed, opts).to_pylist()[0]
    assert (tiled["frames"], tiled["fps"], len(tiled["pixels"])) == (None, None, 96 * 96 * 3)
    small = cio.decode_frames(encode_video([f.resize((200, 100)) for f in frames]), cio.DecodeOptions(max_side=50))
    assert [f.size for f in small[0]] == [(50, 25)] * 4  # max_side applies per frame

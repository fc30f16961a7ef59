"""Engine inputs: the chat prompt, processor encoding and left-padded batches. The one place that builds them.

Legend: B batch rows, T tokens, N images, V videos, P flattened patches (Qwen-VL).

    chat_prompt(processor, chat)            a question or chat messages -> the prompt text, ready for generation
    encode(processor, chats, images, videos)  prompts + media -> input_ids, attention_mask, pixel_values, ...
    left_pad(prompts, pad_id, responses)    token rows -> one left-padded batch (with labels for training)
    collate(rows, pad_id)                   single-prompt processor outputs -> one left-padded batch
    video_patches(image_processor, frames)  decoded video frames -> Qwen-VL's pixel_values_videos + video_grid_thw
    qwen_processor_class(family)            HF's Qwen-VL processor class, with videos through `video_patches`

The prompt uses the processor's own chat template when it has one (a model
family supplies its format that way: LLaVA-hf and Qwen-VL processors ship
theirs), else `LLAVA_CHAT_TEMPLATE`, the LLaVA-1.5 format the demo uses::

    "USER: <image>\\n{question} ASSISTANT:"      (bos prepended by the tokenizer)

Padding is on the left: the engine decodes every row from the batch's last column.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # `left_pad`'s label on prompt and padding positions (cross-entropy's ignore_index)

# LLaVA-1.5: one user turn (optional image(s) then text), assistant turns end in eos.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def question_chat(question: str, num_images: int = 1, num_videos: int = 0) -> list[dict]:
    """A question as chat messages: one user turn of ``num_images`` images, ``num_videos`` videos, then the text."""
    media = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
    return [{"role": "user", "content": media + [{"type": "text", "text": question}]}]


def chat_prompt(processor, chat: str | list[dict], num_images: int = 1, num_videos: int = 0) -> str:
    """The prompt text for a chat, ending where the assistant's answer starts.

    ``chat``: a question (`question_chat`: ``num_images`` images, ``num_videos``
    videos, then the text), or HF chat messages (``[{"role", "content"}]``,
    image parts as ``{"type": "image"}``, video parts as ``{"type": "video"}``).
    ``processor``: a processor or tokenizer; its chat template renders the chat
    when it has one, `LLAVA_CHAT_TEMPLATE` when it has none or ``processor`` is None.
    """
    if isinstance(chat, str):
        chat = question_chat(chat, num_images, num_videos)
    if processor is None:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([chat], chat_template=LLAVA_CHAT_TEMPLATE, add_generation_prompt=True)
        return rendered[0]
    template = None if getattr(processor, "chat_template", None) else LLAVA_CHAT_TEMPLATE
    return processor.apply_chat_template(chat, chat_template=template, add_generation_prompt=True, tokenize=False)


def encode(
    processor,
    chats: Sequence[str | list[dict]],
    images: list | None = None,
    videos: list | None = None,
    video_fps: Sequence[float] | None = None,
):
    """Chats and their media -> the processor's left-padded batch (a ``BatchFeature`` of tensors).

    ``chats``: one per row, as `chat_prompt` takes them; a question gets one
    image when ``images`` is given and one video when ``videos`` is given
    (then they hold one per row, in row order); chat messages place their
    own image and video parts (a batch may mix image, video and text-only rows).
    ``images``: PIL images, every row's in row order. ``videos``: decoded
    videos, each a list of RGB frames (PIL images or ``[H, W, C]`` arrays),
    every row's in row order; Qwen-VL processors only. ``video_fps``: per
    video, the frames per second of the frames given (their timing for
    Qwen2.5-VL's ``second_per_grid_ts`` and Qwen3-VL's timestamps; default
    `DEFAULT_VIDEO_FPS`).

    Returns ``input_ids [B, T]`` int64, ``attention_mask [B, T]`` int64 (0 on
    the left padding), and with images ``pixel_values`` (float32, ``[N, C, H, W]``
    for LLaVA, ``[N, tiles, C, H, W]`` plus ``image_sizes [N, 2]`` for
    LLaVA-NeXT, the flattened patches ``[P, C * t * p * p]`` plus
    ``image_grid_thw [N, 3]`` for Qwen-VL) and whatever else the processor adds
    (Qwen-VL: ``mm_token_type_ids [B, T]``; with videos ``pixel_values_videos``
    ``[P, C * t * p * p]``, ``video_grid_thw [V, 3]``, and for Qwen2.5-VL
    ``second_per_grid_ts [V]``).
    """
    if videos and getattr(processor, "video_token", None) is None:
        raise ValueError(f"{type(processor).__name__} takes no videos: videos need a Qwen-VL processor")
    n_img, n_vid = int(bool(images)), int(bool(videos))
    texts = [chat_prompt(processor, c, num_images=n_img, num_videos=n_vid) for c in chats]
    kw = {}
    if videos:
        fps = list(video_fps) if video_fps is not None else [None] * len(videos)
        if len(fps) != len(videos):
            raise ValueError(f"video_fps has {len(fps)} entries for {len(videos)} videos")
        kw["videos"] = videos
        kw["video_metadata"] = [_metadata(len(v), f or DEFAULT_VIDEO_FPS) for v, f in zip(videos, fps)]
    return processor(text=texts, images=images or None, return_tensors="pt", padding=True, padding_side="left", **kw)


def pad_token_id(tokenizer) -> int:
    """The id `left_pad` fills with: the tokenizer's pad token, else its eos, else 0 (always masked out)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, responses: Sequence[Sequence[int]] | None = None
) -> dict[str, torch.Tensor]:
    """Token rows (no padding) -> one left-padded batch, each row ending in the last column.

    Generation (``responses`` None): ``input_ids [B, T]`` and ``attention_mask
    [B, T]`` (int64, 0 on padding), T the longest prompt. Training: row b is
    ``prompts[b] + responses[b]`` and ``labels [B, T]`` (int64) holds the
    response tokens in their places and `IGNORE_INDEX` on prompt and padding.
    """
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)] if responses is not None else list(prompts)
    B, T = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros(B, T, dtype=torch.long)  # [B, T]
    for b, row in enumerate(rows):
        input_ids[b, T - len(row) :] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[b, T - len(row) :] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if responses is not None:
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        for b, r in enumerate(responses):
            labels[b, T - len(r) :] = input_ids[b, T - len(r) :]  # (an empty response: an empty slice)
        out["labels"] = labels
    return out


# collate's keys: concatenated along dim 0 in row order (the rest of a row's keys are left out)
CONCAT_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
               "second_per_grid_ts")  # fmt: skip


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """`encode` outputs of one prompt each -> one left-padded batch (media concatenated in row order).

    ``rows[b]``: ``input_ids [1, T_b]``, ``attention_mask [1, T_b]``, and
    optionally ``pixel_values [N_b, ...]`` and ``image_sizes [N_b, 2]``, or
    Qwen-VL's ``mm_token_type_ids [1, T_b]``, flattened patches
    ``pixel_values [P_b, D]`` + ``image_grid_thw [N_b, 3]``, ``pixel_values_videos
    [P_b, D]`` + ``video_grid_thw [V_b, 3]`` (+ ``second_per_grid_ts [V_b]``).
    Returns `left_pad`'s ``input_ids`` / ``attention_mask [B, T]``, ``mm_token_type_ids
    [B, T]`` (0 on padding) when any row has them, and every `CONCAT_KEYS` entry any
    row has, concatenated (LLaVA-NeXT's ``[N, tiles, C, H, W]`` zero-padded to the
    batch's most tiles).
    """
    masks = [r["attention_mask"][0].bool() for r in rows]
    out = left_pad([r["input_ids"][0][m] for r, m in zip(rows, masks)], pad_id)
    if any(r.get("mm_token_type_ids") is not None for r in rows):
        types = [r["mm_token_type_ids"][0][m] if r.get("mm_token_type_ids") is not None else torch.zeros(int(m.sum()))
                 for r, m in zip(rows, masks)]  # fmt: skip
        out["mm_token_type_ids"] = left_pad(types, 0)["input_ids"]  # [B, T]
    for key in CONCAT_KEYS:
        parts = [r[key] for r in rows if r.get(key) is not None]
        if not parts:
            continue
        if key == "pixel_values" and parts[0].dim() == 5:  # LLaVA-NeXT [N, tiles, C, H, W]
            tiles = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in parts]
        out[key] = torch.cat(parts)  # [N, ...]
    return out


# ----------------------------------------------------------------------------- Qwen-VL
QWEN_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
DEFAULT_VIDEO_FPS = 2.0  # frames per second assumed for frames given without their timing (Qwen's own sampling rate)


def _metadata(num_frames: int, fps: float) -> dict:
    """HF's video metadata for ``num_frames`` frames sampled at ``fps``: timestamps ``i / fps``."""
    return {"total_num_frames": num_frames, "fps": float(fps), "frames_indices": list(range(num_frames))}


def video_patches(image_processor, frames: Sequence) -> tuple[torch.Tensor, list[int]]:
    """One decoded video -> Qwen-VL's flattened video patches and grid, as HF's Qwen2-VL video processor lays them out.

    ``image_processor``: the Qwen-VL image processor (``patch_size``, ``merge_size``,
    ``temporal_patch_size``); each frame goes through its own resize (smart resize
    within its min/max pixels), rescale and normalize. ``frames``: RGB frames of one
    size (PIL images or ``[H, W, C]`` arrays), in time order; a count that is not a
    multiple of ``temporal_patch_size`` (t) is padded by repeating the last frame,
    as HF does.

    Returns ``pixel_values_videos [T * gh * gw, C * t * p * p]`` (float32; rows in
    HF's order: temporal patch, merged block row and column, then the m x m patches
    inside a block; columns channel, frame within the temporal patch, patch row,
    patch column) and ``[T, gh, gw]`` (T = padded frames / t, gh x gw patches per
    frame). A video of t copies of one image gives exactly that image's patches and
    grid from the image processor.
    """
    t = image_processor.temporal_patch_size
    frames = list(frames)
    if not frames:
        raise ValueError("a video needs at least one frame")
    frames += [frames[-1]] * (-len(frames) % t)
    enc = image_processor(images=frames, return_tensors="pt")
    pv, grid = enc["pixel_values"], enc["image_grid_thw"]  # [F * gh * gw, C * t * p * p] (each frame t times), [F, 3]
    if not (grid == grid[0]).all():
        raise ValueError(f"the frames of one video must have one size, got patch grids {grid.tolist()}")
    _, gh, gw = grid[0].tolist()
    F, S, pp = len(frames), gh * gw, image_processor.patch_size**2
    x = pv.view(F, S, -1, t, pp)[:, :, :, 0]  # [F, S, C, p * p]: each frame's own pixels
    x = x.reshape(F // t, t, S, -1, pp).permute(0, 2, 3, 1, 4)  # [T, S, C, t, p * p]
    return x.reshape(F // t * S, -1), [F // t, gh, gw]


@functools.cache
def qwen_processor_class(family: str) -> type:
    """HF's Qwen-VL processor class for ``family`` (a `QWEN_PROCESSORS` key), without HF's video processor.

    HF's Qwen-VL video processors need torchvision, and HF's processors cannot be built without one. These
    subclasses (HF's class name, so a saved folder names HF's class) hold an image processor, a tokenizer and
    a chat template; ``processor(text=, images=, videos=)`` works as HF's: each video (a list of decoded frames)
    becomes patches by `video_patches`, its prompt placeholder expands as HF's processor expands it (Qwen3-VL: a
    ``<t seconds>`` timestamp and a vision span per temporal patch) and Qwen2.5-VL gets ``second_per_grid_ts``.
    ``video_metadata`` (HF's: per video ``fps`` and ``frames_indices``; `encode` passes it) sets the timing;
    without it the frames are taken as sampled at `DEFAULT_VIDEO_FPS`. ``cls.from_pretrained(folder)`` loads
    a Qwen-VL folder's image processor, tokenizer and template.
    """
    import transformers

    if family not in QWEN_PROCESSORS:
        raise ValueError(f"no Qwen-VL processor for {family!r}; one of {', '.join(QWEN_PROCESSORS)}")
    base = getattr(transformers, QWEN_PROCESSORS[family])

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def _process_videos(self, videos, video_metadata=None, **kwargs):
        from transformers.video_utils import VideoMetadata, make_batched_videos

        videos = make_batched_videos(videos)
        metas = [video_metadata] if isinstance(video_metadata, (dict, VideoMetadata)) else video_metadata
        metas = metas if metas is not None else [None] * len(videos)
        t, m2 = self.image_processor.temporal_patch_size, self.image_processor.merge_size**2
        patches, grids, seconds, texts = [], [], [], []
        for frames, meta in zip(videos, metas, strict=True):
            pv, grid = video_patches(self.image_processor, frames)
            meta = dict(meta) if meta is not None else _metadata(len(frames), DEFAULT_VIDEO_FPS)
            meta = VideoMetadata(**{"frames_indices": list(range(len(frames))), **meta})
            patches.append(pv)
            grids.append(grid)
            seconds.append(t / meta.sampled_fps)
            if family == "qwen3_vl":
                per = grid[1] * grid[2] // m2
                stamps = self._calculate_timestamps(list(meta.frames_indices), meta.fps, t)
                texts.append("".join(f"<{s:.1f} seconds>{self.vision_start_token}{self.video_token * per}"
                                     f"{self.vision_end_token}" for s in stamps))  # fmt: skip
            else:
                texts.append(self.video_token * (grid[0] * grid[1] * grid[2] // m2))
        data = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}
        if family == "qwen2_5_vl":
            data["second_per_grid_ts"] = seconds
        return data, texts

    attrs = {"__init__": __init__, "_process_videos": _process_videos, "video_processor": None,
             "__module__": __name__, "__doc__": qwen_processor_class.__doc__}  # fmt: skip
    return type(base.__name__, (base,), attrs)

"""Engine inputs: the chat prompt, processor encoding and left-padded batches. The one place that builds them.

Legend: B batch rows, T tokens, N images.

    chat_prompt(processor, chat)            a question or chat messages -> the prompt text, ready for generation
    encode(processor, chats, images)        prompts + images -> input_ids, attention_mask, pixel_values, ...
    left_pad(prompts, pad_id, responses)    token rows -> one left-padded batch (with labels for training)
    collate(rows, pad_id)                   single-prompt processor outputs -> one left-padded batch

The prompt uses the processor's own chat template when it has one (a model
family supplies its format that way: LLaVA-hf and Qwen-VL processors ship
theirs), else `LLAVA_CHAT_TEMPLATE`, the LLaVA-1.5 format the demo uses::

    "USER: <image>\\n{question} ASSISTANT:"      (bos prepended by the tokenizer)

Padding is on the left: the engine decodes every row from the batch's last column.
"""

from __future__ import annotations

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


def chat_prompt(processor, chat: str | list[dict], num_images: int = 1) -> str:
    """The prompt text for a chat, ending where the assistant's answer starts.

    ``chat``: a question (one user turn: ``num_images`` images, then the
    text), or HF chat messages (``[{"role", "content"}]``, image parts as
    ``{"type": "image"}``). ``processor``: a processor or tokenizer; its chat
    template renders the chat when it has one, `LLAVA_CHAT_TEMPLATE` when it
    has none or ``processor`` is None.
    """
    if isinstance(chat, str):
        chat = [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": chat}]}]
    if processor is None:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([chat], chat_template=LLAVA_CHAT_TEMPLATE, add_generation_prompt=True)
        return rendered[0]
    template = None if getattr(processor, "chat_template", None) else LLAVA_CHAT_TEMPLATE
    return processor.apply_chat_template(chat, chat_template=template, add_generation_prompt=True, tokenize=False)


def encode(processor, chats: Sequence[str | list[dict]], images: list | None = None):
    """Chats and their images -> the processor's left-padded batch (a ``BatchFeature`` of tensors).

    ``chats``: one per row, as `chat_prompt` takes them; a question gets one
    image (``images`` then holds one per row, in row order) or none
    (``images`` None). ``images``: PIL images, every row's in row order.

    Returns ``input_ids [B, T]`` int64, ``attention_mask [B, T]`` int64 (0 on
    the left padding), and with images ``pixel_values`` (float32, ``[N, C, H, W]``
    for LLaVA, ``[N, tiles, C, H, W]`` plus ``image_sizes [N, 2]`` for
    LLaVA-NeXT) and whatever else the processor adds.
    """
    texts = [chat_prompt(processor, c, num_images=1 if images else 0) for c in chats]
    return processor(text=texts, images=images or None, return_tensors="pt", padding=True, padding_side="left")


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


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """`encode` outputs of one prompt each -> one left-padded batch (images concatenated in row order).

    ``rows[b]``: ``input_ids [1, T_b]``, ``attention_mask [1, T_b]``, and
    optionally ``pixel_values [N_b, ...]`` and ``image_sizes [N_b, 2]``.
    Returns `left_pad`'s ``input_ids`` / ``attention_mask [B, T]``, plus
    ``pixel_values [N, ...]`` (LLaVA-NeXT ``[N, tiles, C, H, W]`` zero-padded
    to the batch's most tiles) and ``image_sizes [N, 2]`` when any row has them.
    """
    out = left_pad([r["input_ids"][0][r["attention_mask"][0].bool()] for r in rows], pad_id)
    pv = [r["pixel_values"] for r in rows if r.get("pixel_values") is not None]
    if pv:
        if pv[0].dim() == 5:  # LLaVA-NeXT [N, tiles, C, H, W]
            tiles = max(p.shape[1] for p in pv)
            pv = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in pv]
        out["pixel_values"] = torch.cat(pv)  # [N, ...]
    sizes = [r["image_sizes"] for r in rows if r.get("image_sizes") is not None]
    if sizes:
        out["image_sizes"] = torch.cat(sizes)  # [N, 2]
    return out

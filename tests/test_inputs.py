"""specvlm.inputs: the chat prompt, encode and left-padded batches (CPU, the demo processor, no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaProcessor

from specvlm.demo import ShapesWorld, build_processor, demo_path, prompt
from specvlm.demo.text import PAD_ID
from specvlm.distill import collate as distill_collate
from specvlm.inputs import IGNORE_INDEX, LLAVA_CHAT_TEMPLATE, chat_prompt, collate, encode, left_pad, pad_token_id

Q = "describe the image."
# llava-hf/llava-1.5-7b-hf's chat template (its processor's chat_template.json)
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def proc():
    return build_processor(image_size=64, patch_size=8)


@pytest.fixture(scope="module")
def shipped():
    """The demo model's saved processor (what `load_demo` and the jobs use)."""
    return AutoProcessor.from_pretrained(demo_path() / "target")


def _with_template(proc, template):
    return LlavaProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer, patch_size=8,
                          vision_feature_select_strategy="default", chat_template=template, image_token="<image>",
                          num_additional_image_tokens=1)  # fmt: skip


def _old_chat_prompt(processor, question: str, num_images: int = 1) -> str:
    """The prompt as `specvlm.distill.chat_prompt` built it before `specvlm.inputs`."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# ----------------------------------------------------------------------------- chat_prompt
def test_prompt_is_byte_identical_to_the_old_formats(proc, shipped):
    llava = f"USER: <image>\n{Q} ASSISTANT:"  # the demo's `prompt` before, and LLaVA-1.5's format
    assert prompt(Q) == chat_prompt(None, Q) == llava
    assert chat_prompt(proc, Q) == chat_prompt(shipped, Q) == _old_chat_prompt(proc, Q) == llava
    assert chat_prompt(proc.tokenizer, Q) == llava  # a tokenizer without a template: the LLaVA format
    hf = _with_template(proc, LLAVA_HF_TEMPLATE)  # a processor with its own template renders with it
    assert chat_prompt(hf, Q) == _old_chat_prompt(hf, Q) == llava
    bare = _with_template(proc, None)  # an old LLaVA checkpoint without a template
    assert bare.chat_template is None and chat_prompt(bare, Q) == llava
    two = "USER: <image>\n<image>\nq ASSISTANT:"
    assert chat_prompt(proc, "q", num_images=2) == chat_prompt(hf, "q", num_images=2) == two
    assert chat_prompt(proc, "q", num_images=0) == chat_prompt(None, "q", num_images=0) == "USER: q ASSISTANT:"
    assert proc.chat_template == shipped.chat_template == LLAVA_CHAT_TEMPLATE


def test_chat_messages_render_as_the_processor_renders_them(proc):
    """Chat messages (the Serve path): the processor's own rendering, multi-turn, text-only turns included."""
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "a red circle."},
        {"role": "user", "content": "and the background?"},
    ]
    want = "USER: <image>\nwhat is it? ASSISTANT: a red circle.</s>USER: and the background? ASSISTANT:"
    assert chat_prompt(proc, chat) == proc.apply_chat_template(chat, add_generation_prompt=True) == want
    assert chat_prompt(_with_template(proc, None), chat) == chat_prompt(None, chat) == want


# ----------------------------------------------------------------------------- encode
def test_encode_gives_the_old_ids_and_pads_on_the_left(proc, shipped):
    world = ShapesWorld(3, image_size=64)
    img, img2 = world.image_scene()[0], world.image_scene()[0]
    for p in (proc, shipped):
        old = p(text=[_old_chat_prompt(p, Q)], images=[img], return_tensors="pt", padding=True)
        new = encode(p, [Q], [img])
        assert set(new.keys()) == {"input_ids", "attention_mask", "pixel_values"}
        assert torch.equal(new["input_ids"], old["input_ids"]) and torch.equal(new["pixel_values"], old["pixel_values"])
        assert new["input_ids"].dtype == new["attention_mask"].dtype == torch.long and new["attention_mask"].all()
    right = build_processor(image_size=64, patch_size=8)
    right.tokenizer.padding_side = "right"  # encode pads on the left whatever the tokenizer says
    enc = encode(right, [Q, "how many shapes are there?"], [img, img2])  # [2, T]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2 and tuple(enc["pixel_values"].shape) == (2, 3, 64, 64)
    assert mask[1].all() and mask[0, 0] == 0 and ids[0, 0] == PAD_ID and (mask[:, -1] == 1).all()
    alone = encode(proc, [Q], [img])["input_ids"][0]
    assert torch.equal(ids[0][mask[0].bool()], alone)  # the padded row is the row encoded alone


def test_encode_text_only_chat(proc):
    enc = encode(proc, [[{"role": "user", "content": "hello"}]])
    assert (
        "pixel_values" not in enc and enc["input_ids"][0].tolist() == proc.tokenizer("USER: hello ASSISTANT:").input_ids
    )


# ----------------------------------------------------------------------------- left_pad / collate
def test_left_pad_rows_of_different_lengths():
    prompts, responses = [[5, 6, 7], [8], [9, 10]], [[11, 2], [12, 13, 2], []]
    gen = left_pad(prompts, pad_id=0)
    assert set(gen) == {"input_ids", "attention_mask"} and gen["input_ids"].shape == (3, 3)
    assert gen["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert gen["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    out = left_pad(prompts, pad_id=99, responses=responses)  # rows of 5, 4 and 2 tokens
    x = IGNORE_INDEX
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: ((3, 5), torch.long) for k in out}
    assert out["input_ids"].tolist() == [[5, 6, 7, 11, 2], [99, 8, 12, 13, 2], [99, 99, 99, 9, 10]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert out["labels"].tolist() == [[x, x, x, 11, 2], [x, x, 12, 13, 2], [x, x, x, x, x]]


def test_collate_left_pads_and_concatenates_images():
    rows = [
        {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
         "pixel_values": torch.zeros(1, 3, 4, 4)},
        {"input_ids": torch.tensor([[7, 8, 9]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)},
        {"input_ids": torch.tensor([[1]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "pixel_values": torch.ones(2, 3, 4, 4)},
    ]  # fmt: skip
    out = collate(rows, pad_id=0)
    assert out["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9], [0, 0, 1]]
    assert out["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]
    assert out["pixel_values"].shape == (3, 3, 4, 4) and out["pixel_values"][1:].eq(1).all()
    one = {"input_ids": torch.tensor([[1]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    tiles = [
        {**one, "pixel_values": torch.ones(1, t, 3, 4, 4), "image_sizes": torch.tensor([[4, 4 * t]])} for t in (2, 3)
    ]
    nxt = collate(tiles, pad_id=0)  # LLaVA-NeXT: tiles zero-padded to the most in the batch
    assert nxt["pixel_values"].shape == (2, 3, 3, 4, 4) and nxt["pixel_values"][0, 2].eq(0).all()
    assert nxt["image_sizes"].tolist() == [[4, 8], [4, 12]]


def test_pad_token_id_falls_back_to_eos_then_zero(proc):
    class Tok:
        pad_token_id, eos_token_id = None, 7

    assert pad_token_id(proc.tokenizer) == PAD_ID
    assert pad_token_id(Tok()) == 7
    Tok.eos_token_id = None
    assert pad_token_id(Tok()) == 0


def test_distill_batch_is_prompt_then_response(proc):
    """The training batch: each row is the row's encoded prompt, then its response and eos; the loss on those."""
    world = ShapesWorld(4, image_size=64)
    samples = [{"image": world.image_scene()[0], "prompt": q, "response": r}
               for q, r in [(Q, "a red circle."), ("how many shapes are there?", "two")]]  # fmt: skip
    batch = distill_collate(proc, samples)
    tok = proc.tokenizer
    for b, s in enumerate(samples):
        real = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
        resp = tok(" " + s["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert real == encode(proc, [s["prompt"]], [s["image"]])["input_ids"][0].tolist() + resp
        assert batch.input_ids[b][batch.loss_mask[b].bool()].tolist() == resp
    assert batch.pixel_values.shape == (2, 3, 64, 64) and batch.media == {}

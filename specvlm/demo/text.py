"""The demo's offline word-level tokenizer, LLaVA processor and chat format.

The vocabulary is closed: the special tokens, the chat words and every word the
shapes grammar can produce (`world.vocabulary()`), built in code with the
`tokenizers` library and wrapped as a transformers fast tokenizer, so nothing
is ever downloaded. Token ids: 0 `<pad>`, 1 `<s>` (bos), 2 `</s>` (eos),
3 `<image>`, 4 `<unk>`, then the chat words and the grammar's words in sorted
order. Padding is on the left (decoder-only generation).

Chat format (LLaVA-1.5, `specvlm.inputs.LLAVA_CHAT_TEMPLATE`):

    prompt   = "USER: <image>\\n{question} ASSISTANT:"      (bos prepended by the tokenizer)
    response = " {answer}</s>"

A training sequence is `tok(prompt).input_ids + tok(response, add_special_tokens=False).input_ids`
(identical to tokenizing `prompt + response`, because the two meet at a word
boundary); the loss covers the response ids, which end in eos.

`decode` joins words with spaces and attaches punctuation to the word before,
so captions and questions round-trip exactly ("describe the image.").

`build_qwen_processor` is the same tokenizer for Qwen-VL targets (`specvlm.tiny.save_tiny_qwen`): the Qwen
special tokens and the words of Qwen's chat templates appended after this vocabulary (every id above
unchanged), no bos, eos ``<|im_end|>``, inside a Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor with that
family's chat template (images and videos).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

from ..inputs import LLAVA_CHAT_TEMPLATE, QWEN_PROCESSORS, chat_prompt, qwen_processor_class
from .world import vocabulary as world_vocabulary

PAD, BOS, EOS, IMAGE, UNK = "<pad>", "<s>", "</s>", "<image>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, UNK)  # ids 0..4 in this order
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, UNK_ID = range(5)
CHAT_WORDS = ("USER", "ASSISTANT", ":")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Qwen-VL: special tokens and the words its chat templates write (default system prompt, roles, Qwen3-VL's
# "<1.5 seconds>" video timestamps, vision ids), appended after the demo vocabulary in this order
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                       "<|video_pad|>")  # fmt: skip
QWEN_WORDS = ("system", "user", "assistant", "You", "helpful", "seconds", "Picture", "Video", "<", ">",
              *"0123456789")  # fmt: skip
# image normalization per family, as the released checkpoints have it
QWEN_MEAN_STD = {"qwen2_vl": (CLIP_MEAN, CLIP_STD), "qwen2_5_vl": (CLIP_MEAN, CLIP_STD),
                 "qwen3_vl": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}  # fmt: skip

# Qwen2-VL-Instruct's and Qwen2.5-VL-Instruct's chat template (a default system turn, images and videos)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-Instruct's chat template without tools: no default system turn
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}{%- else %}"
    "{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture {{ image_count.value }}: "
    "{%- endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {%- endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content_item in message.content %}"
    "{%- if 'text' in content_item %}{{- content_item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN_CHAT_TEMPLATES = {"qwen2_vl": QWEN2_VL_CHAT_TEMPLATE, "qwen2_5_vl": QWEN2_VL_CHAT_TEMPLATE,
                       "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE}  # fmt: skip


def vocabulary(qwen: bool = False) -> dict[str, int]:
    """Token -> id: special tokens, chat words, then the grammar's words (sorted); with ``qwen``, then
    `QWEN_SPECIAL_TOKENS` and the `QWEN_WORDS` not already there."""
    tokens = list(SPECIAL_TOKENS) + list(CHAT_WORDS)
    tokens += [w for w in world_vocabulary() if w not in tokens]
    if qwen:
        tokens += [w for w in QWEN_SPECIAL_TOKENS + QWEN_WORDS if w not in tokens]
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(qwen: bool = False) -> PreTrainedTokenizerFast:
    """The demo word-level tokenizer: bos prepended, left padding, exact decode of captions.

    ``qwen``: the Qwen-VL variant (`build_qwen_processor`): `vocabulary(qwen=True)`, the Qwen special tokens
    (``image_token`` ``<|image_pad|>``, ``video_token`` ``<|video_pad|>``), digits one token each (any
    timestamp tokenizes), no bos (Qwen prompts open with ``<|im_start|>``) and eos ``<|im_end|>``.
    """
    vocab = vocabulary(qwen)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+ : "image." -> "image", "."
    if qwen:
        tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer, pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens(list(SPECIAL_TOKENS) + (list(QWEN_SPECIAL_TOKENS) if qwen else []))
    if not qwen:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
    # WordPiece joins tokens with spaces; cleanup glues " ." " ," " ?" to the previous word; then " :" too.
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" :", ":")])
    extra = {"image_token": IMAGE}
    if qwen:
        extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token="<|im_end|>" if qwen else EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=extra,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def build_processor(image_size: int = 96, patch_size: int = 12) -> LlavaProcessor:
    """A `LlavaProcessor` for the demo target: CLIP-normalized image_size crops, (image_size/patch)^2 image tokens.

    `num_additional_image_tokens=1` with the "default" strategy: LlavaProcessor
    adds one for the vision tower's CLS token and removes it again for
    "default", so each `<image>` expands to exactly (image_size // patch_size)**2.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1,
    )


def build_qwen_processor(
    family: str = "qwen2_5_vl",
    patch_size: int = 8,
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
):
    """A Qwen-VL processor for ``family`` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``) over the demo tokenizer
    (`build_tokenizer` with ``qwen``), with that family's chat template (images and videos).

    The class is HF's (`Qwen2VLProcessor`, `Qwen2_5_VLProcessor`, `Qwen3VLProcessor`) as
    `specvlm.inputs.qwen_processor_class` builds it: HF's own cannot be built without torchvision, which
    its video processor needs, so videos go through `specvlm.inputs.video_patches`. Images keep their own
    resolution, rounded to multiples of ``2 * patch_size`` within ``min_pixels`` .. ``max_pixels`` (Qwen's
    smart resize, 2x2 merge, 2-frame temporal patches): a 96x96 demo image is 6x6 visual tokens at the
    defaults. `specvlm.tiny.save_tiny_qwen` sizes a model to it.
    """
    if family not in QWEN_PROCESSORS:
        raise ValueError(f"family must be one of {', '.join(QWEN_PROCESSORS)}, got {family!r}")
    mean, std = QWEN_MEAN_STD[family]
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2, image_mean=list(mean), image_std=list(std),
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )  # fmt: skip
    cls = qwen_processor_class(family)
    return cls(image_processor=image_processor, tokenizer=build_tokenizer(qwen=True),
               chat_template=QWEN_CHAT_TEMPLATES[family])  # fmt: skip


def prompt(question: str) -> str:
    """The chat prompt for one image and a question (`specvlm.inputs.chat_prompt`; the tokenizer adds bos)."""
    return chat_prompt(None, question)


def format_example(question: str, answer: str) -> tuple[str, str]:
    """(prompt_text, response_text) for training; the response starts with a space and ends with eos text."""
    return prompt(question), f" {answer}{EOS}"

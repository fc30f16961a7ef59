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
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from ..inputs import LLAVA_CHAT_TEMPLATE, chat_prompt
from .world import vocabulary as world_vocabulary

PAD, BOS, EOS, IMAGE, UNK = "<pad>", "<s>", "</s>", "<image>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, UNK)  # ids 0..4 in this order
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, UNK_ID = range(5)
CHAT_WORDS = ("USER", "ASSISTANT", ":")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vocabulary() -> dict[str, int]:
    """Token -> id: special tokens, chat words, then the grammar's words (sorted)."""
    tokens = list(SPECIAL_TOKENS) + list(CHAT_WORDS)
    tokens += [w for w in world_vocabulary() if w not in tokens]
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The demo word-level tokenizer: bos prepended, left padding, exact decode of captions."""
    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+ : "image." -> "image", "."
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    # WordPiece joins tokens with spaces; cleanup glues " ." " ," " ?" to the previous word; then " :" too.
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" :", ":")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
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


def prompt(question: str) -> str:
    """The chat prompt for one image and a question (`specvlm.inputs.chat_prompt`; the tokenizer adds bos)."""
    return chat_prompt(None, question)


def format_example(question: str, answer: str) -> tuple[str, str]:
    """(prompt_text, response_text) for training; the response starts with a space and ends with eos text."""
    return prompt(question), f" {answer}{EOS}"

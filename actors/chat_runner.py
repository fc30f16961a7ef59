"""`ChatRunner` and `ChatJob`: chat requests -> engine rows -> per-round text updates. No Ray, no HTTP.

Legend: B batch rows, T prompt tokens, N images.

The Serve deployment (`actors.serving`) owns the threads; this module owns the
translation, and `actors.engine_loop.EngineLoop` the scheduling, so both are
tested by calling them directly:

    ChatRunner.prepare(request, image_bytes) -> ChatJob   chat template + images -> one row's processor inputs,
                                                          prompt and context limits (OpenAIError 4xx)
    EngineLoop.submit(job, sink)                          queue a request; sink(RowUpdate) after every round
    EngineLoop.run()                                      the engine thread: admit, step, route, until stop()
    ChatRunner.run(jobs, post)                            decode jobs as one batch in this thread (tests, references)

`EngineLoop` drives the engine's stepping core (`SpecVLMEngine.add` / `step` /
`finish`): in ``continuous`` mode waiting requests join the running batch at
the next round, up to ``max_rows`` rows decoding at once; in ``static`` mode a
batch runs to its end before the next one starts. Each row decodes under its
own sampling settings (`ChatJob.sampling`); a seeded request's output does not
depend on its neighbours (the engine gives each row its own generator and
tree). A `ChatJob` is the loop's `Job`: its `TextStream` turns the row's new
tokens into text after every round (`ChatJob.push`); a stop string, the row's
own ``max_tokens`` or a client that went away ends that row
(`SpecVLMEngine.finish`), and it frees its place at the next round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from specvlm.config import SamplingConfig
from specvlm.inputs import CONCAT_KEYS, encode, pad_token_id
from specvlm.media import MediaError, MediaLimits, check_dimensions, decode_image, image_size

from .engine_loop import EngineLoop
from .openai_protocol import ChatRequest, OpenAIError, TextStream, completion_tokens_budget, usage
from .serve_config import ServeLimits


@dataclass
class RowUpdate:
    """What one request got from one round."""

    text: str = ""  # new text since the previous update
    finish_reason: str | None = None  # "stop" | "length" on the row's last update
    usage: dict | None = None  # on the last update: token counts + accept length
    stats: dict | None = None  # on the last update: the engine's RowStats.to_dict()
    error: str | None = None  # the engine failed on this row's batch (a server error, not the client's)

    @property
    def last(self) -> bool:
        """Whether this is the request's last update."""
        return bool(self.finish_reason or self.error)

    def then(self, later: RowUpdate) -> RowUpdate:
        """This update followed by ``later`` as one: the texts joined, the later one's ending."""
        return RowUpdate(self.text + later.text, later.finish_reason, later.usage, later.stats, later.error)


async def next_update(updates: asyncio.Queue) -> RowUpdate:
    """The next `RowUpdate` from ``updates``, merged with every one already queued behind it (`RowUpdate.then`).

    A reader that falls behind the engine (a busy event loop, a slow client) then sends one chunk for all the
    rounds it missed instead of one per round, so a backlog shrinks instead of growing; as vLLM's output
    collector merges a request's deltas when its consumer is slower than the engine. A reader that keeps up
    gets each round's update alone, as it comes.
    """
    update = await updates.get()
    while not update.last and not updates.empty():
        update = update.then(updates.get_nowait())
    return update


@dataclass
class ChatJob:
    """One prepared request (an `EngineLoop` `Job`): its processor inputs (batch of one) and how to turn its
    tokens into text."""

    inputs: dict  # input_ids [1, T], attention_mask [1, T], and what collate takes: pixel_values [N, ...],
    # image_sizes [N, 2] (LLaVA-NeXT); Qwen-VL: mm_token_type_ids [1, T], pixel_values [P, D], image_grid_thw [N, 3]
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    text: TextStream
    cancelled: bool = False  # set by the server when the client leaves; the row ends at the next round
    done: bool = field(default=False, init=False)

    def sampling(self) -> SamplingConfig:
        """The row's own decoding settings (rows with different settings share one engine batch)."""
        return SamplingConfig(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed)  # fmt: skip

    def push(self, tokens: list[int], finished: bool, stats: dict) -> tuple[RowUpdate | None, bool]:
        """One round's tokens -> its text delta (None when empty); the last update, with ``finish_reason``,
        usage and the engine's stats, when the text ended (EOS, a stop string, ``max_tokens``)."""
        delta = self.text.push(tokens, finished)
        if self.text.finish_reason is None:
            return (RowUpdate(delta) if delta else None), False
        use = usage(self.prompt_tokens, len(self.text.tokens), stats)
        return RowUpdate(delta, self.text.finish_reason, use, stats), True

    def fail(self, reason: str, exc: BaseException | None) -> RowUpdate:
        """The last update of a request that was cancelled (``error="cancelled"``) or whose batch failed."""
        return RowUpdate(error=reason)


Post = Callable[[dict[int, RowUpdate]], None]  # `ChatRunner.run`: {batch index: update}


class ChatRunner:
    """Holds an engine and its processor; translates chat requests for it."""

    def __init__(self, engine, processor, limits: ServeLimits):
        self.engine, self.processor, self.limits = engine, processor, limits
        self.tokenizer = processor.tokenizer
        text_config = engine.target.text_config
        self.context = limits.max_context_tokens or int(getattr(text_config, "max_position_embeddings", 4096))
        self.pad_id = pad_token_id(self.tokenizer)
        self.media_limits = MediaLimits(
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
            max_aspect_ratio=limits.max_image_aspect_ratio,
        )
        self.image_processor = getattr(processor, "image_processor", None)

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ prepare
    def check_image_sizes(self, params: list[str], images: list[bytes]) -> None:
        """Refuse images from their headers, before any pixel is decoded (`OpenAIError` 400 ``image_too_large``):
        each image's pixels and aspect ratio (`check_dimensions`, the batch job's check too), its pixels after
        the processor's resize (`resized_pixels`), and those summed over the request."""
        limits, total = self.limits, 0
        for param, data in zip(params, images):
            size = image_size(data)
            if size is None:
                continue  # Pillow cannot open it: decode_image says why
            w, h = size
            try:
                check_dimensions(w, h, self.media_limits)
            except MediaError as e:
                raise _image_error(param, e) from None
            pixels = resized_pixels(w, h, self.image_processor)
            if pixels > limits.max_resized_image_pixels:
                raise OpenAIError(400, f"{param}: a {w}x{h} image is {pixels} pixels after the model's resize > "
                                  f"max_resized_image_pixels={limits.max_resized_image_pixels}", param=param,
                                  code="image_too_large")  # fmt: skip
            total += pixels
            if total > limits.max_request_pixels:
                raise OpenAIError(400, f"the images hold over {total} pixels after the model's resize > "
                                  f"max_request_pixels={limits.max_request_pixels}", param="messages",
                                  code="image_too_large")  # fmt: skip

    def prepare(self, req: ChatRequest, images: list[bytes]) -> ChatJob:
        """One request -> `ChatJob`; raises `OpenAIError` (400) for bad images or a prompt over the limits."""
        params = [p for p, _ in req.image_urls()]
        self.check_image_sizes(params, images)
        pil = []
        for param, data in zip(params, images):
            try:
                pil.append(decode_image(data, self.media_limits))
            except MediaError as e:
                raise _image_error(param, e) from None
        try:
            enc = encode(self.processor, [req.template_messages()], pil)
        except (ValueError, TypeError, KeyError) as e:  # e.g. a template that has no place for an image
            raise OpenAIError(400, f"cannot build the prompt: {e}", param="messages", code="invalid_prompt") from None
        prompt_tokens = int(enc["input_ids"].shape[1])
        max_tokens = completion_tokens_budget(req, prompt_tokens, self.limits, self.context)
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", *CONCAT_KEYS) if k in enc}
        stream = TextStream(self._decode_text, self.engine.target.eos_token_ids, max_tokens, req.stops)
        temperature = req.sampling_temperature()  # tiny temperatures decode greedily (MIN_TEMPERATURE)
        return ChatJob(inputs, prompt_tokens, max_tokens, temperature, req.top_p, req.top_k, req.seed, stream)

    # ------------------------------------------------------------------ run
    def run(self, jobs: list[ChatJob], post: Post) -> None:
        """Decode ``jobs`` as one batch in the calling thread (the engine must be idle), each row under its own
        sampling settings; ``post({batch index: RowUpdate})`` after every round. Every job gets exactly one last
        update (``finish_reason``, or ``error``: ``"cancelled"`` for a job whose client left). The same
        `EngineLoop` the replica runs, stepped here until the batch is done."""
        loop = EngineLoop(self.engine, self.pad_id, max(len(jobs), 1), mode="static")
        for i, job in enumerate(jobs):
            loop.submit(job, lambda update, i=i: post({i: update}))
        while loop.busy:
            loop.run_once()


def _image_error(param: str, e: MediaError) -> OpenAIError:
    code = "image_too_large" if e.kind == "too_large" else "invalid_image"
    return OpenAIError(400, f"{param}: {e}", param=param, code=code)


def resized_pixels(width: int, height: int, image_processor) -> int:
    """Pixels of one ``width x height`` image once the model's image processor has resized it (the largest
    array it builds, before any crop), from the processor's settings, without running it.

    - LLaVA (CLIP): the shorter side to ``size.shortest_edge``, the longer one in proportion (capped at
      ``size.longest_edge``), then a center crop: a 40000x1 image becomes 13.4M x 336 before the crop.
    - LLaVA-NeXT (``image_grid_pinpoints``): the image fitted into the best pinpoint resolution (padded to
      it) plus the whole image at ``shortest_edge`` squared.
    - Qwen-VL (``merge_size``, ``patch_size``): Qwen's smart resize, both sides rounded to multiples of
      ``patch_size * merge_size`` within ``size.shortest_edge`` .. ``size.longest_edge`` pixels (min/max pixels);
      an aspect ratio the processor refuses (over 200) counts as the source's own pixels (the prompt fails).
    - fixed ``height x width``, or fitted into ``max_height x max_width``.
    - no resize, or a processor none of these describe: the source's own pixels.
    """
    size = getattr(image_processor, "size", None)
    if image_processor is None or size is None or not getattr(image_processor, "do_resize", True):
        return width * height
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    short, long = sorted((width, height))
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if pinpoints:
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution((height, width), pinpoints)
        base = get("shortest_edge") or get("height") or 0
        return best_h * best_w + base * base
    merge, patch = getattr(image_processor, "merge_size", None), getattr(image_processor, "patch_size", None)
    if merge and patch and get("longest_edge") and get("shortest_edge"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        try:
            h, w = smart_resize(height, width, patch * merge, get("shortest_edge"), get("longest_edge"))
        except ValueError:  # aspect ratio over 200
            return width * height
        return h * w
    if get("shortest_edge"):
        new_short, new_long = get("shortest_edge"), get("shortest_edge") * long // short
        if get("longest_edge") and new_long > get("longest_edge"):
            new_short, new_long = get("longest_edge") * short // long, get("longest_edge")
        return max(new_short, 1) * max(new_long, 1)
    if get("height") and get("width"):
        return get("height") * get("width")
    if get("max_height") and get("max_width"):
        scale = min(get("max_height") / height, get("max_width") / width)
        return max(int(height * scale), 1) * max(int(width * scale), 1)
    return width * height

"""`Captioner`: the callable class the caption job's actor pool runs (``map_batches``).

Thin by design: it builds one engine per actor (`specvlm.loading.load_engine`)
and turns a batch of decoded rows into output rows. No media decoding lives
here (`pipelines.caption_io` does that in CPU tasks) and no decoding logic
(`specvlm.engine` does that).

Input columns (one Arrow table per batch, ``batch_format="pyarrow"``):

    id, uri, prompt     strings, echoed to the output
    pixels              raw RGB bytes (row-major, ``height * width * 3`` per frame), null on error
    width, height       int32, null on error
    frames, fps         null for an image; a video passed natively (Qwen-VL targets): the number of frames
                        in ``pixels`` and their frames per second (null: unknown)
    error               null, or ``"kind: message"`` from reading/decoding (the row passes through)

Output: `OUTPUT_SCHEMA` (DESIGN.md's caption contract), one row per input row.

Errors: a bad input is already a row with ``error`` set when it gets here, and an
input the processor refuses (ValueError, e.g. an aspect ratio the model cannot
take) becomes its row's ``decode`` error (rows are encoded one by one, then
collated); an exception raised while decoding the batch (CUDA OOM, a bug) is a
fatal engine error and propagates, so Ray retries the batch or fails the job. It
is never turned into row errors (Ray Data LLM's rule).

Importing this module does not import torch; the engine's imports happen in
``__init__``, inside the actor.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from specvlm.config import EngineConfig, ModelConfig, SamplingConfig

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("prompt", pa.string()),
        ("caption", pa.string()),  # null on error
        ("error", pa.string()),  # null, or "kind: message"
        ("num_tokens", pa.int32()),  # generated tokens, EOS included when reached
        ("accept_length", pa.float64()),  # tokens per target forward (1.0 in ar mode)
        ("compressor", pa.string()),  # visual compressor primitive chosen for the row; "none" without one
        ("model", pa.string()),
        ("draft_version", pa.string()),
        ("latency_ms", pa.float64()),  # engine time spent while the row was being decoded
    ]
)


class Captioner:
    """Holds one engine; ``__call__`` captions a batch of decoded rows.

    Args: the caption job's validated configs (frozen pydantic models; Ray pickles them into the actor).
        model: what to load.
        engine: how to decode.
        sampling: per-row decoding settings.
    """

    def __init__(self, model: ModelConfig, engine: EngineConfig, sampling: SamplingConfig):
        from specvlm.loading import load_engine

        t0 = time.perf_counter()
        self.engine, self.processor, info = load_engine(model, engine)
        self.sampling = sampling
        self.model_name, self.draft_version = info["model"], info["draft_version"]
        self.mode = self.engine.config.mode
        self.pid = os.getpid()
        self.load_s = time.perf_counter() - t0

    def __call__(self, batch: pa.Table) -> pa.Table:
        from specvlm.inputs import collate, encode, pad_token_id, question_chat

        rows = batch.select(["id", "uri", "prompt", "pixels", "width", "height", "frames", "fps", "error"]).to_pylist()
        out = {name: [None] * len(rows) for name in OUTPUT_SCHEMA.names}
        for i, r in enumerate(rows):
            out["id"][i], out["uri"][i], out["prompt"][i], out["error"][i] = r["id"], r["uri"], r["prompt"], r["error"]
            out["model"][i], out["draft_version"][i] = self.model_name, self.draft_version
        encoded = {}
        for i, r in enumerate(rows):
            if r["error"] is not None:
                continue
            frames = _frames(r)
            try:
                if r["frames"] is None:  # an image (or a tiled video)
                    encoded[i] = encode(self.processor, [question_chat(r["prompt"])], images=frames)
                else:
                    encoded[i] = encode(self.processor, [question_chat(r["prompt"], 0, 1)], videos=[frames],
                                        video_fps=[r["fps"]])  # fmt: skip
            except ValueError as e:  # the processor refuses this input: its row's error, not the batch's
                out["error"][i] = f"decode: {type(e).__name__}: {e}"
        if not encoded:
            return pa.Table.from_pydict(out, schema=OUTPUT_SCHEMA)
        tok = self.processor.tokenizer
        s = self.sampling
        todo = list(encoded)
        res = self.engine.generate(
            **collate([encoded[i] for i in todo], pad_token_id(tok)), max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
        )  # fmt: skip
        for i, seq, st in zip(todo, res.sequences, res.stats):
            out["caption"][i] = tok.decode(seq, skip_special_tokens=True).strip()
            out["num_tokens"][i] = st["num_tokens"]
            out["accept_length"][i] = st["accept_length"]
            out["compressor"][i] = st.get("compressor") or "none"
            out["latency_ms"][i] = st["prefill_ms"] + st["draft_ms"] + st["verify_ms"]
        return pa.Table.from_pydict(out, schema=OUTPUT_SCHEMA)


def _frames(row: dict) -> list:
    """A decoded row's RGB frames as PIL images: ``frames`` of them (a video), or one (an image)."""
    from PIL import Image

    size, n = (row["width"], row["height"]), row["frames"] or 1
    step = size[0] * size[1] * 3
    return [Image.frombytes("RGB", size, row["pixels"][k * step : (k + 1) * step]) for k in range(n)]

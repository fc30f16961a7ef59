"""The Captioner's engine loop, called directly (no cluster): calls from two threads share one engine, rows of
the second joining while the first's decode, each call's outputs those of its batch run alone through
`SpecVLMEngine.generate`; error rows pass through; an engine failure raises from the calls it held rows of,
and the loop goes on."""

from __future__ import annotations

import threading

import pytest
from caption_inputs import encode_video, save, shapes, shapes_video

from pipelines import caption_io as cio
from pipelines.caption import CaptionJobConfig
from specvlm.config import ModelConfig, SamplingConfig

ENGINE = CaptionJobConfig().engine  # the job's default: eagle with the CPU tree
TOKENS = 16
ROWS = 4  # encoded rows per batch below


@pytest.fixture(scope="module")
def demo_paths(small_demo):
    demo, _ = small_demo
    return {"target": str(demo.path / "target"), "draft": str(demo.path / "draft")}


@pytest.fixture(scope="module")
def batches():
    """Two decoded batches of 4 encodable rows each: four images; a tiled video (a longer prompt), two images,
    an unreadable input and an input the processor will refuse (`refusing`), and one more image."""
    images = [save(im, "PNG") for im, _ in shapes(7, seed=21)]
    first = [{"id": f"a{k}", "uri": f"a{k}.png", "data": images[k]} for k in range(4)]
    second = [{"id": "clip", "uri": "clip.mp4", "data": encode_video(shapes_video(seed=4)[0])},
              {"id": "b0", "uri": "b0.png", "data": images[4]}, {"id": "bad", "uri": "bad.png", "data": b"nope"},
              {"id": "b1", "uri": "b1.png", "data": images[5]},
              {"id": "refused", "uri": "r.png", "data": images[0], "prompt": "refuse me"},
              {"id": "b2", "uri": "b2.png", "data": images[6]}]  # fmt: skip
    return [cio.decode_rows(cio.listed_table(rows), cio.DecodeOptions()) for rows in (first, second)]


@pytest.fixture
def refusing(monkeypatch):
    """The processor refuses the prompt "refuse me" (a ValueError, as Qwen's for an aspect ratio over 200)."""
    import specvlm.inputs

    real = specvlm.inputs.encode

    def encode(processor, chats, *a, **kw):
        if "refuse me" in str(chats):
            raise ValueError("absolute aspect ratio must be smaller than 200")
        return real(processor, chats, *a, **kw)

    monkeypatch.setattr(specvlm.inputs, "encode", encode)


@pytest.fixture(scope="module")
def alone(demo_paths, batches):
    """Each batch's captions and token counts by id, its encodable rows run alone through `generate`."""
    from actors.captioner import _frames
    from specvlm.inputs import collate, encode, pad_token_id, question_chat
    from specvlm.loading import load_engine

    engine, proc, _ = load_engine(ModelConfig(**demo_paths), ENGINE)
    out = {}
    for batch in batches:
        rows = [r for r in batch.to_pylist() if r["error"] is None and r["prompt"] != "refuse me"]
        enc = [encode(proc, [question_chat(r["prompt"])], images=_frames(r)) for r in rows]
        res = engine.generate(**collate(enc, pad_token_id(proc.tokenizer)), max_new_tokens=TOKENS)
        for r, seq in zip(rows, res.sequences):
            out[r["id"]] = (proc.tokenizer.decode(seq, skip_special_tokens=True).strip(), len(seq))
    return out


def captioner(demo_paths, batching="continuous", max_rows=2 * ROWS):
    from actors.captioner import Captioner

    return Captioner(ModelConfig(**demo_paths), ENGINE, SamplingConfig(max_new_tokens=TOKENS), batching=batching,
                     max_rows=max_rows)  # fmt: skip


def overlapping(cap, batches, fail_at: int | None = None) -> tuple[list, list[int]]:
    """``cap(batches[0])`` in one thread and, once its rows are in the engine, ``cap(batches[1])`` in another;
    the engine's second step waits until the second call's rows are in the loop (waiting, or just added), so
    they arrive while the first call's rows decode whatever the threads' timing. Step ``fail_at`` (1-based)
    raises a simulated CUDA OOM. Returns each call's output or exception, and the steps run (one per step)."""
    step, steps = cap.engine.step, []

    def held(**kw):
        steps.append(len(steps) + 1)
        if len(steps) == 2:
            for _ in range(3000):
                if cap.loop.waiting + cap.loop.active >= 2 * ROWS:
                    break
                threading.Event().wait(0.01)
        if len(steps) == fail_at:
            raise RuntimeError("CUDA out of memory (simulated)")
        return step(**kw)

    cap.engine.step = held
    results: list = [None, None]

    def call(k):
        try:
            results[k] = cap(batches[k])
        except Exception as e:
            results[k] = e

    threads = [threading.Thread(target=call, args=(k,)) for k in range(2)]
    threads[0].start()
    for _ in range(3000):
        if steps or not threads[0].is_alive():
            break
        threading.Event().wait(0.01)
    threads[1].start()
    for t in threads:
        t.join(300)
    return results, steps


def check(out, batch, alone) -> None:
    """``out`` has ``batch``'s rows in order; each encodable row's caption and tokens are the `generate` ones."""
    from actors.captioner import OUTPUT_SCHEMA

    assert out.schema == OUTPUT_SCHEMA and out["id"].to_pylist() == batch["id"].to_pylist()
    for r in out.to_pylist():
        if r["id"] in alone:
            assert r["error"] is None and (r["caption"], r["num_tokens"]) == alone[r["id"]], r["id"]
            assert r["accept_length"] >= 1 and r["latency_ms"] > 0 and r["compressor"] == "none"


def test_two_calls_share_the_engine_and_each_gets_its_batchs_generate_outputs(demo_paths, batches, alone, refusing):
    cap = captioner(demo_paths)
    rounds: list[int] = []
    cap.loop.on_round = rounds.append
    outs, _ = overlapping(cap, batches)
    for out, batch in zip(outs, batches):
        assert not isinstance(out, Exception), out
        check(out, batch, alone)
    # the second call's rows joined the first's decoding (in its first step if they came during its prefill)
    assert rounds[0] in (ROWS, 2 * ROWS) and 2 * ROWS in rounds[:3]
    rows = {r["id"]: r for r in outs[1].to_pylist()}
    assert rows["bad"]["error"].startswith("decode:") and rows["bad"]["caption"] is None
    assert rows["refused"]["error"] == "decode: ValueError: absolute aspect ratio must be smaller than 200"
    assert rows["refused"]["caption"] is None and rows["refused"]["model"] == demo_paths["target"]
    assert cap.loop.active == cap.loop.waiting == cap.engine.num_rows == 0


def test_static_mode_decodes_one_call_at_a_time_to_the_same_outputs(demo_paths, batches, alone, refusing):
    cap = captioner(demo_paths, "static", max_rows=ROWS)
    rounds: list[int] = []
    cap.loop.on_round = rounds.append
    outs, _ = overlapping(cap, batches)
    for out, batch in zip(outs, batches):
        check(out, batch, alone)
    assert max(rounds) == ROWS


def test_a_batch_of_error_rows_passes_through_without_the_engine(demo_paths, batches):
    cap = captioner(demo_paths)
    rows = cio.decode_rows(cio.listed_table([{"id": "x", "uri": "x.png", "data": b""}]), cio.DecodeOptions())
    out = cap(rows).to_pylist()
    assert [(r["id"], r["error"], r["caption"]) for r in out] == [("x", "empty: zero bytes", None)]
    assert cap.loop.steps == 0


def test_an_engine_failure_raises_from_the_calls_whose_rows_it_held_and_the_loop_goes_on(
    demo_paths, batches, alone, refusing
):
    cap = captioner(demo_paths, max_rows=ROWS)  # the second call's rows wait while the first's decode
    (failed, ok), steps = overlapping(cap, batches, fail_at=2)
    assert isinstance(failed, RuntimeError) and "CUDA out of memory (simulated)" in str(failed)
    assert isinstance(failed.__cause__, RuntimeError)  # the engine's own exception, chained
    check(ok, batches[1], alone)  # its rows were waiting: they decode after the reset
    assert len(steps) > 2 and cap.engine.num_rows == 0
    again = cap(batches[0])  # the same actor, the same loop thread
    check(again, batches[0], alone)


def test_two_calls_failing_together_both_raise(demo_paths, batches, refusing):
    cap = captioner(demo_paths)
    results, _ = overlapping(cap, batches, fail_at=3)  # the first call's round, the second's prefill
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results), results
    assert cap.loop.active == cap.loop.waiting == cap.engine.num_rows == 0

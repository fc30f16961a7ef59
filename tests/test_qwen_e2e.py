"""Qwen-VL targets end to end on a tiny Qwen2.5-VL folder (`save_tiny_qwen`, float64, random init): the Captioner
called directly (a video as the model's native video input, rows that fail alone), ``specvlm caption`` over
images, a real mp4 and a broken file with outputs equal to an ``ar`` run, and ``specvlm serve`` answering
chat completions with an image (the session's Ray and Serve on 127.0.0.1, the `openai` package as client)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from caption_inputs import encode_video, save, shapes, shapes_video
from conftest import free_port
from PIL import Image

from pipelines import caption_io as cio
from specvlm import EagleDraft, EngineConfig, SpecVLMEngine
from specvlm.config import CPU_TREE, ModelConfig, SamplingConfig
from specvlm.inputs import encode, question_chat
from specvlm.loading import load_target
from specvlm.tiny import save_tiny_qwen

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FAMILY = "qwen2_5_vl"
TOKENS = 12  # max_new_tokens everywhere


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny Qwen2.5-VL target folder (model + processor) and an untrained draft folder for it."""
    root = tmp_path_factory.mktemp("qwen-e2e")
    save_tiny_qwen(root / "target", FAMILY, seed=0, init_std=0.2, dtype=torch.float64)  # outputs vary by input
    model, processor = load_target(root / "target")
    EagleDraft.from_target(model, seed=0).save_pretrained(root / "draft")
    return SimpleNamespace(target=str(root / "target"), draft=str(root / "draft"), model=model, processor=processor)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Three shapes images, a real H.264 mp4 and a truncated one."""
    src = tmp_path_factory.mktemp("qwen-in")
    for k, (im, _) in enumerate(shapes(3, seed=3)):
        (src / f"{k}.png").write_bytes(save(im, "PNG"))
    frames, _ = shapes_video()
    mp4 = encode_video(frames)
    (src / "clip.mp4").write_bytes(mp4)
    (src / "bad").mkdir()
    (src / "bad" / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    return src


def greedy(qwen, enc) -> tuple[str, int]:
    """The target's own greedy answer (engine, mode ar) to one encoded row: (text, tokens)."""
    seq = SpecVLMEngine(qwen.model, None, EngineConfig(mode="ar")).generate(**enc, max_new_tokens=TOKENS).sequences[0]
    return qwen.processor.tokenizer.decode(seq, skip_special_tokens=True).strip(), len(seq)


@pytest.fixture(scope="module")
def video_reference(qwen, inputs) -> str:
    """The clip's caption with its 4 sampled frames as the model's video input; not the tiled image's."""
    data, opts, proc = (inputs / "clip.mp4").read_bytes(), cio.DecodeOptions(), qwen.processor
    frames, fps = cio.decode_frames(data, opts)
    native, _ = greedy(qwen, encode(proc, [question_chat(opts.video_prompt, 0, 1)], videos=[frames], video_fps=[fps]))
    tile = cio.decode_one(data, "clip.mp4", opts)
    tiled, _ = greedy(qwen, encode(proc, [question_chat(opts.video_prompt)], images=[tile]))
    assert native and native != tiled  # else this module could not tell the two paths apart
    return native


def captioner(qwen, mode: str):
    from actors.captioner import Captioner

    model = ModelConfig(target=qwen.target, draft=qwen.draft)
    return Captioner(model, EngineConfig(mode=mode, tree=CPU_TREE), SamplingConfig(max_new_tokens=TOKENS),
                     batching="continuous", max_rows=4)  # fmt: skip


# ----------------------------------------------------------------------------- the Captioner, called directly
def test_captioner_takes_the_video_natively_and_rows_fail_alone(qwen, inputs, video_reference):
    names = ["0.png", "clip.mp4", "1.png", "bad/truncated.mp4"]
    listed = [{"id": n, "uri": str(inputs / n)} for n in names]
    listed.append({"id": "thin.png", "uri": "thin.png", "data": save(Image.new("RGB", (600, 2)), "PNG")})
    opts = cio.DecodeOptions(max_aspect_ratio=400)  # lets the 300:1 image through decode; Qwen refuses over 200
    batch = cio.decode_rows(cio.listed_table(listed), opts, native_video=True)
    assert batch["frames"].to_pylist() == [None, 4, None, None, None]
    ar, eagle = (captioner(qwen, mode)(batch).to_pylist() for mode in ("ar", "eagle"))
    for a, e in zip(ar, eagle):  # lossless: the draft changes the work per token, never the tokens
        assert (a["id"], a["caption"], a["num_tokens"], a["error"]) == (e["id"], e["caption"], e["num_tokens"],
                                                                        e["error"])  # fmt: skip
    rows = {r["id"]: r for r in eagle}
    assert rows["clip.mp4"]["caption"] == video_reference
    assert rows["bad/truncated.mp4"]["error"].startswith("decode:")
    assert rows["thin.png"]["error"].startswith("decode: ValueError: absolute aspect ratio")
    assert rows["thin.png"]["caption"] is None and rows["thin.png"]["model"] == qwen.target
    image = Image.open(inputs / "0.png").convert("RGB")
    assert (rows["0.png"]["caption"], rows["0.png"]["num_tokens"]) == greedy(
        qwen, encode(qwen.processor, [question_chat(opts.image_prompt)], images=[image])
    )
    assert all(r["accept_length"] >= 1.0 for r in eagle if r["error"] is None)


# ----------------------------------------------------------------------------- specvlm caption
def test_caption_job_equals_an_ar_run(ray_head, ray_local, qwen, inputs, video_reference, tmp_path):
    from pipelines.caption import CaptionJobConfig, run
    from specvlm.config import load_config

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": {"target": qwen.target, "draft": qwen.draft}, "sampling": {"max_new_tokens": TOKENS},
        "batch_size": 4, "rows_per_file": 2, "decode_batch_size": 4,
    }))  # fmt: skip
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.address}
    cmd = [sys.executable, "-m", "pipelines.caption", "--config", str(job), "--input", str(inputs), "--output",
           str(tmp_path / "eagle")]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "[caption] 5 rows (4 captioned, errors: decode 1)" in res.stdout, res.stdout[-3000:]

    cfg = load_config(job, CaptionJobConfig).model_copy(update={"input": str(inputs), "output": str(tmp_path / "ar")})
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"mode": "ar"})})
    assert run(cfg)["ok"] == 4
    eagle, ar = ({r["id"]: r for r in cio.read_output(str(tmp_path / d)).to_pylist()} for d in ("eagle", "ar"))
    assert sorted(eagle) == sorted(ar) == ["0.png", "1.png", "2.png", "bad/truncated.mp4", "clip.mp4"]
    for rid, e in eagle.items():
        a = ar[rid]
        assert (e["caption"], e["num_tokens"], e["error"]) == (a["caption"], a["num_tokens"], a["error"]), rid
        assert e["model"] == a["model"] == qwen.target
        assert (e["draft_version"], a["draft_version"]) == (qwen.draft, None)
    assert eagle["clip.mp4"]["caption"] == video_reference  # the sampled frames went in as a video
    assert len({eagle[k]["caption"] for k in ("0.png", "1.png", "2.png", "clip.mp4")}) == 4
    assert eagle["bad/truncated.mp4"]["error"].startswith("decode:")


# ----------------------------------------------------------------------------- specvlm serve
@pytest.fixture(scope="module")
def server(ray_local, qwen):
    from ray import serve

    from actors.serving import build_app

    port = free_port()
    cfg = {
        "model": {"target": qwen.target, "draft": qwen.draft},
        "served_model_name": "tiny-qwen",
        "limits": {"max_tokens": 32},
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
        "deployment": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0}},
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="specvlm-qwen-test", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(save(image, "PNG")).decode()


def test_serve_answers_chat_completions_with_images(server, qwen):
    openai = pytest.importorskip("openai")
    from actors.chat_runner import ChatRunner
    from actors.openai_protocol import parse_chat_request
    from actors.serve_config import ServeLimits

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    images = [im for im, _ in shapes(2, seed=9)]
    runner = ChatRunner(SpecVLMEngine(qwen.model, None, EngineConfig(mode="ar")), qwen.processor, ServeLimits())
    cases = [[], [images[0], images[1]], [images[0]]]  # text only, two images, one (streamed below)
    for imgs in cases:
        parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in imgs]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "describe the image."}]}]
        r = client.chat.completions.create(model="tiny-qwen", messages=messages, max_tokens=TOKENS, temperature=0)
        body = json.dumps({"messages": messages, "max_tokens": TOKENS, "temperature": 0}).encode()
        req = parse_chat_request(body, ServeLimits(), "tiny-qwen")
        raw = [base64.b64decode(p["image_url"]["url"].split(",", 1)[1]) for p in parts]
        texts: list[str] = []
        runner.run([runner.prepare(req, raw)], lambda ups, texts=texts: texts.extend(u.text for u in ups.values()))
        assert r.choices[0].message.content == "".join(texts)  # lossless: the target's own greedy answer
        assert r.usage.completion_tokens >= 1 and r.usage.model_extra["accept_length"] >= 1.0
    streamed = client.chat.completions.create(model="tiny-qwen", messages=messages, max_tokens=TOKENS, temperature=0,
                                              stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content

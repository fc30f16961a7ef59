"""Serve's refusals of costly requests, without a server: image sizes from headers (aspect ratio, pixels after
the model's resize, per request), tiny temperatures, the API key source, admission (429), the body read time
(408), and the config that sets them. The same refusals live against a real server: tests/test_serve_hostile.py."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from actors.chat_runner import ChatRunner, resized_pixels
from actors.openai_protocol import MIN_TEMPERATURE, OpenAIError, parse_chat_request
from actors.serve_config import DeploymentConfig, ServeAppConfig, ServeLimits, load_serve_file
from specvlm.config import ConfigError, parse_config
from specvlm.media import image_size

ROOT = Path(__file__).resolve().parent.parent


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def demo_processor():
    from specvlm.demo.text import build_processor

    return build_processor()  # CLIP image processor: shortest edge 96, then a 96x96 crop


def chat_runner(**limits) -> ChatRunner:
    """A ChatRunner on the demo processor and a stand-in engine: `prepare` never touches the engine's weights."""
    target = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=512), eos_token_ids=[0])
    return ChatRunner(SimpleNamespace(target=target), demo_processor(), ServeLimits(**limits))


def request(n_images: int = 0, **kw):
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * n_images
    msgs = [{"role": "user", "content": [*parts, {"type": "text", "text": "describe the image."}]}]
    return parse_chat_request(json.dumps({"messages": msgs, **kw}).encode(), ServeLimits(), "m")


def refused(fn, *args, status=400, code=None, match=None) -> OpenAIError:
    with pytest.raises(OpenAIError, match=match) as e:
        fn(*args)
    assert e.value.status == status and (code is None or e.value.code == code), e.value
    return e.value


# ----------------------------------------------------------------------------- image sizes
@pytest.mark.parametrize("w, h", [(200, 100), (37, 401), (96, 96), (1000, 7), (5, 3)])
def test_resized_pixels_is_what_the_processor_builds(w, h):
    ip = demo_processor().image_processor
    out = ip.resize(torch.zeros(3, h, w, dtype=torch.uint8).numpy(), size=ip.size)  # the processor's own resize
    assert resized_pixels(w, h, ip) == out.shape[1] * out.shape[2]


def test_resized_pixels_of_other_families():
    import transformers

    ip = demo_processor().image_processor
    assert resized_pixels(40000, 1, ip) == 96 * 40000 * 96  # the bomb: the short side scaled up 96x
    nxt = transformers.LlavaNextImageProcessorPil()  # anyres: best pinpoint + the base image at 224^2
    assert resized_pixels(40000, 1, nxt) <= max(h * w for h, w in nxt.image_grid_pinpoints) + 224 * 224
    assert resized_pixels(1000, 500, nxt) == 336 * 672 + 224 * 224
    qwen = transformers.Qwen2VLImageProcessorPil()  # a pixel budget: smart resize, sides multiples of 28
    for w, h in ((4000, 3000), (10, 10), (96, 96), (1000, 7)):
        grid = qwen(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
        assert resized_pixels(w, h, qwen) == int(grid[1] * grid[2]) * qwen.patch_size**2  # what it builds
    assert resized_pixels(4000, 3000, qwen) <= qwen.size.longest_edge
    assert resized_pixels(10, 10, qwen) == qwen.size.shortest_edge
    assert resized_pixels(4000, 10, qwen) == 4000 * 10  # over the aspect ratio Qwen takes: its own pixels
    assert resized_pixels(30, 20, SimpleNamespace(size=None)) == 600


def test_aspect_ratio_bomb_is_refused_from_the_header(monkeypatch):
    import actors.chat_runner as cr

    runner = chat_runner()
    bomb = png(40000, 1)  # a few hundred bytes; the processor would make 368M pixels of it
    assert len(bomb) < 1000 and image_size(bomb) == (40000, 1)
    monkeypatch.setattr(cr, "decode_image", lambda *a: pytest.fail("decoded an image the header refuses"))
    t0 = time.perf_counter()
    err = refused(runner.prepare, request(1), [bomb], code="image_too_large", match="max_aspect_ratio=20")
    assert time.perf_counter() - t0 < 0.5 and err.param == "messages.0.content.0.image_url"
    refused(runner.prepare, request(1), [png(1, 40000)], code="image_too_large", match="aspect ratio 1x40000")


def test_pixels_after_the_resize_are_bounded_per_image_and_per_request():
    wide = png(1500, 100)  # aspect 15 (allowed); 96 x 1440 = 138240 pixels after the resize
    refused(chat_runner(max_resized_image_pixels=100_000).prepare, request(1), [wide], code="image_too_large",
            match="138240 pixels after the model's resize > max_resized_image_pixels=100000")  # fmt: skip
    runner = chat_runner(max_request_pixels=200_000)
    assert runner.prepare(request(1), [wide]).inputs["pixel_values"].shape == (1, 3, 96, 96)
    err = refused(runner.prepare, request(2), [wide, wide], code="image_too_large", match="max_request_pixels=200000")
    assert err.param == "messages"
    refused(chat_runner(max_image_pixels=10_000).prepare, request(1), [png(200, 100)], match="max_pixels=10000")


def test_not_an_image_is_still_reported_by_the_decoder():
    assert image_size(b"<html>") is None
    refused(chat_runner().prepare, request(1), [b"<html>"], code="invalid_image", match="cannot identify image")


# ----------------------------------------------------------------------------- temperature
def test_tiny_temperatures_decode_greedily():
    from specvlm.verify import process_logits

    runner = chat_runner()
    for t in (1e-300, 5e-324, MIN_TEMPERATURE / 2):
        job = runner.prepare(request(temperature=t), [])
        assert job.temperature == 0 and job.sampling().temperature == 0
    assert runner.prepare(request(temperature=MIN_TEMPERATURE), []).temperature == MIN_TEMPERATURE
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 30
    assert torch.isnan(process_logits(logits, 1e-300)).any()  # why: logits / 1e-300 overflow
    probs = process_logits(logits, MIN_TEMPERATURE)  # the smallest temperature sampled: exact and finite
    assert torch.isfinite(probs).all() and torch.equal(probs.argmax(-1), logits.argmax(-1))


# ----------------------------------------------------------------------------- API key
def test_api_key_sources(tmp_path, monkeypatch):
    from actors.serving import read_api_key

    monkeypatch.delenv("SPECVLM_TEST_KEY", raising=False)
    none = ServeAppConfig(auth="none", api_key_env="SPECVLM_TEST_KEY")
    env = ServeAppConfig(auth="env", api_key_env="SPECVLM_TEST_KEY")
    assert read_api_key(none) is None
    with pytest.raises(ValueError, match="SPECVLM_TEST_KEY is unset or empty"):
        read_api_key(env)
    monkeypatch.setenv("SPECVLM_TEST_KEY", "  ")
    with pytest.raises(ValueError, match="unset or empty"):
        read_api_key(env)
    monkeypatch.setenv("SPECVLM_TEST_KEY", "k1\n")
    assert read_api_key(env) == "k1"
    with pytest.raises(ValueError, match="auth: none, but SPECVLM_TEST_KEY is set"):
        read_api_key(none)  # a key someone meant to require is never ignored silently
    key = tmp_path / "api-key"
    file = ServeAppConfig(auth="file", api_key_file=str(key))
    with pytest.raises(ValueError, match="does not exist"):
        read_api_key(file)
    key.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_api_key(file)
    key.write_text("k2\n")
    assert read_api_key(file) == "k2"
    with pytest.raises(ConfigError, match="auth: file needs api_key_file"):
        parse_config({"auth": "file"}, ServeAppConfig)
    with pytest.raises(ConfigError, match="auth"):
        parse_config({"auth": "maybe"}, ServeAppConfig)


def test_configs_choose_auth_explicitly():
    local = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())["applications"][0]["args"]
    assert local["auth"] == "none"  # the loopback demo, said out loud
    service = yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["auth"] == "env" and args["api_key_env"] == "SPECVLM_API_KEY"
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    refs = [e["valueFrom"]["secretKeyRef"] for g in workers for c in g["template"]["spec"]["containers"]
            for e in c["env"] if e["name"] == "SPECVLM_API_KEY"]  # fmt: skip
    assert refs and all(r["optional"] is False for r in refs)  # no secret, no pod


# ----------------------------------------------------------------------------- admission and queue bounds
def test_admission_answers_429_with_retry_after():
    from actors.serving import Admission, _error

    adm = Admission(limit=2, retry_after_s=3)
    leave1, leave2 = adm.enter(), adm.enter()
    err = refused(adm.enter, status=429, code="rate_limit_exceeded", match="max_active_requests=2")
    resp = _error(err)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
    leave1()
    leave1()  # leaving twice frees one slot, not two
    assert adm.active == 1
    leave3 = adm.enter()
    refused(adm.enter, status=429)
    leave2(), leave3()
    assert adm.active == 0


def test_queue_bounds_in_the_config(tmp_path):
    cfg = ServeAppConfig()
    assert cfg.max_active_requests() == 48  # 3/4 of 64 slots: the other 16 answer 429 at once
    opts = cfg.deployment.options()
    assert opts["max_queued_requests"] == 64
    assert opts["backpressure_config"] == {"status_code": 429, "retry_after_s": 2}
    from ray.serve.config import BackpressureConfig

    BackpressureConfig.model_validate(opts["backpressure_config"])  # what Serve accepts
    small = ServeAppConfig(deployment=DeploymentConfig(max_ongoing_requests=16))
    assert small.max_active_requests() == 16  # never below a full batch
    for active in (8, 80):
        with pytest.raises(ConfigError, match="max_active_requests"):
            parse_config({"limits": {"max_active_requests": active}}, ServeAppConfig)
    spec = load_serve_file(ROOT / "configs" / "serve.yaml")
    assert spec.http_options() == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 300}
    bare = tmp_path / "app.yaml"
    bare.write_text("served_model_name: x\n")
    assert load_serve_file(bare).request_timeout_s == 300  # a bare app file (or none) gets the bound serve.yaml sets


# ----------------------------------------------------------------------------- body read time
def _request(chunks, delays, headers=()):
    """A Starlette request whose body arrives as ``chunks``, each after its delay (None: never)."""
    from starlette.requests import Request

    pending = list(zip(chunks, delays))

    async def receive():
        if not pending:
            return {"type": "http.request", "body": b"", "more_body": False}
        piece, delay = pending.pop(0)
        await asyncio.sleep(3600 if delay is None else delay)
        return {"type": "http.request", "body": piece, "more_body": True}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.encode(), v.encode()) for k, v in headers]}
    return Request(scope, receive)


def test_read_body_bounds_time_and_size():
    from actors.serving import read_body

    limits = ServeLimits(body_timeout_s=0.3, min_body_bytes_per_s=1000, max_body_bytes=5000)
    t0 = time.perf_counter()
    err = refused(lambda: asyncio.run(read_body(_request([b"{", b"x"], [0, None]), limits)), status=408,
                  code="request_timeout", match="1 bytes in 0.3 s")  # fmt: skip
    assert 0.25 < time.perf_counter() - t0 < 1.0 and err.headers == {"Connection": "close"}
    # slow but steady: 200 bytes every 0.15 s (> 1000 B/s after the first 0.3 s) arrives whole, in 1.2 s
    assert asyncio.run(read_body(_request([b"a" * 200] * 8, [0.15] * 8), limits)) == b"a" * 1600
    # a trickle: 10 bytes every 0.2 s falls behind 1000 B/s and is cut
    refused(lambda: asyncio.run(read_body(_request([b"a" * 10] * 20, [0.2] * 20), limits)), status=408)
    refused(lambda: asyncio.run(read_body(_request([b"a" * 3000] * 2, [0, 0]), limits)), status=413)
    refused(lambda: asyncio.run(read_body(_request([], [], [("content-length", "9999")]), limits)), status=413)

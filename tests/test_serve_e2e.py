"""The OpenAI endpoint live: Ray Serve on 127.0.0.1 (the session's Ray), the small demo model, the `openai`
package as the client; plain, streamed and image requests, every class of bad request, 64 requests at 16
concurrent, a request joining a running batch mid-decode, and the metrics on Ray's Prometheus endpoint."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import urllib.request
from dataclasses import dataclass

import httpx
import pytest
from conftest import free_port

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

MODEL = "specvlm-demo"
KEY = "test-key-0123"
QUESTION = "describe the image."


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    port: int
    images: list[str]  # data: URLs of demo scenes
    config: str  # the app's args, as JSON

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **kw)

    def post(self, content: bytes | dict, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        return httpx.post(f"{self.url}/v1/chat/completions", content=data, headers=headers, timeout=60, **kw)


def png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(ray_local, small_demo, tmp_path_factory):
    from ray import serve

    from actors.serving import build_app
    from specvlm.demo import ShapesWorld

    demo, _ = small_demo
    port = free_port()
    key_file = tmp_path_factory.mktemp("serve") / "api-key"
    key_file.write_text(KEY + "\n")  # as a mounted Kubernetes secret would hold it
    cfg = {
        "model": {"target": str(demo.path / "target"), "draft": str(demo.path / "draft")},
        "served_model_name": MODEL,
        "auth": "file",
        "api_key_file": str(key_file),
        "limits": {"max_body_bytes": 1_000_000, "max_images": 2, "max_tokens": 64},
        "image_fetch": {"allowed_hosts": ["localhost"], "allowed_ports": [80, 443, port]},
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
        # num_cpus 0: the replica must start even while other tests' actors hold the cluster's 2 CPUs
        "deployment": {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0}},
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="specvlm-test", route_prefix="/")
    world = ShapesWorld(21)
    try:
        yield Server(f"http://127.0.0.1:{port}", port, [png_url(world.image_scene()[0]) for _ in range(4)],
                     json.dumps(cfg))  # fmt: skip
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def ar_answer(small_demo):
    """``ar_answer(image_url, max_tokens)``: the greedy answer to QUESTION of the `ar` engine run in this process on
    the same weights (batch 1)."""
    from actors.chat_runner import ChatRunner
    from actors.openai_protocol import parse_chat_request
    from actors.serve_config import ServeLimits
    from specvlm import EngineConfig, SpecVLMEngine

    demo, _ = small_demo
    runner = ChatRunner(SpecVLMEngine(demo.target, demo.draft, EngineConfig(mode="ar")), demo.processor, ServeLimits())

    def answer(url: str, max_tokens: int = 16) -> str:
        req = parse_chat_request(json.dumps({"messages": user(QUESTION, url), "max_tokens": max_tokens,
                                             "temperature": 0}).encode(), ServeLimits(), MODEL)  # fmt: skip
        raw = base64.b64decode(url.split(",", 1)[1])
        texts: list[str] = []
        runner.run([runner.prepare(req, [raw])], lambda ups: texts.extend(u.text for u in ups.values()))
        return "".join(texts)

    return answer


@pytest.fixture(scope="module")
def reference(server, ar_answer):
    """Greedy 16-token answers of the `ar` engine, per demo image."""
    return [ar_answer(url) for url in server.images]


def ask(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, **{"max_tokens": 16, "temperature": 0, **kw})


# ----------------------------------------------------------------------------- happy paths
def test_health_and_models(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed
    assert [m.id for m in server.client().models.list()] == [MODEL]


def test_plain_request_with_an_image(server, reference):
    r = ask(server.client(), user(QUESTION, server.images[0]))
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == reference[0]  # lossless: the target's own greedy answer
    u = r.usage
    assert u.prompt_tokens > 64 and 0 < u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.model_extra["accept_length"] >= 1.0 and u.model_extra["target_forwards"] >= 1


def test_streaming_equals_plain(server, reference):
    chunks = list(ask(server.client(), user(QUESTION, server.images[1]), stream=True,
                      stream_options={"include_usage": True}))  # fmt: skip
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == reference[1]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens >= 1
    if usage.model_extra["accept_length"] > 1.5:  # speculative rounds: several tokens (words) per chunk
        assert len(texts) < usage.completion_tokens and any(" " in t.strip() for t in texts)


def test_text_only_two_images_and_stop(server, reference):
    c = server.client()
    assert ask(c, [{"role": "user", "content": "hello"}]).choices[0].finish_reason in ("stop", "length")
    two = ask(c, [{"role": "system", "content": "be brief"}, *user(QUESTION, *server.images[:2])])
    assert two.usage.prompt_tokens > 128
    words = reference[2].split()
    if len(words) >= 3:
        r = ask(c, user(QUESTION, server.images[2]), stop=[words[2]])
        assert reference[2].startswith(r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
        assert words[2] not in r.choices[0].message.content.split()


# ----------------------------------------------------------------------------- bad and hostile requests
def _good(server, **kw):
    return {"model": MODEL, "messages": user(QUESTION, server.images[0]), "max_tokens": 4, **kw}


def _image(server, url: str) -> dict:
    return _good(server, messages=user(QUESTION, url))


NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"<html>hello</html>").decode()
BAD = {  # case: (request body from the server, status, text in the error message)
    "bad JSON": (lambda s: b'{"model": "specvlm-demo", "messages": [', 400, "not valid JSON"),
    "not an object": (lambda s: b"[]", 400, "JSON object"),
    "missing messages": (lambda s: {"model": MODEL}, 400, "messages: Field required"),
    "empty messages": (lambda s: {"model": MODEL, "messages": []}, 400, "at least 1"),
    "unknown model": (lambda s: _good(s, model="gpt-4o"), 404, "does not exist"),
    "bad base64": (lambda s: _image(s, "data:image/png;base64,!!!!"), 400, "invalid base64"),
    "non-image bytes": (lambda s: _image(s, NOT_AN_IMAGE), 400, "cannot identify image"),
    "non-image type": (lambda s: _image(s, "data:text/plain;base64,aGk="), 400, "not an image"),
    "metadata URL": (lambda s: _image(s, "http://169.254.169.254/latest/meta-data/"), 400, "allow-list"),
    "loopback via allowed host": (lambda s: _image(s, f"http://localhost:{s.port}/health"), 400, "non-public"),
    "file URL": (lambda s: _image(s, "file:///etc/passwd"), 400, "scheme 'file'"),
    "too many images": (lambda s: _good(s, messages=user(QUESTION, *s.images[:3])), 400, "max_images"),
    "max_tokens too large": (lambda s: _good(s, max_tokens=65), 400, "limit 64"),
    "bad temperature": (lambda s: _good(s, temperature=-1), 400, "temperature"),
    "body too large": (lambda s: b'{"x": "' + b"A" * 1_100_000 + b'"}', 413, "max_body_bytes"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_errors(server, case):
    make, status, text = BAD[case]
    r = server.post(make(server))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and text in err["message"]


def test_auth_routes_and_methods(server):
    for key, text in ((None, "missing API key"), ("wrong", "incorrect API key")):
        r = server.post(_good(server), key=key)
        assert r.status_code == 401 and text in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405


# ----------------------------------------------------------------------------- load, then still correct
def test_64_requests_at_16_concurrent(server, reference):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        gate = asyncio.Semaphore(16)

        async def one(i):
            async with gate:
                kw = dict(model=MODEL, messages=user(QUESTION, server.images[i % 4]), max_tokens=16, temperature=0)
                if i % 3 == 0:  # a third of them streamed
                    parts = []
                    async for c in await client.chat.completions.create(stream=True, **kw):
                        if c.choices and c.choices[0].delta.content:
                            parts.append(c.choices[0].delta.content)
                    return "".join(parts)
                return (await client.chat.completions.create(**kw)).choices[0].message.content

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    t0 = time.perf_counter()
    answers = asyncio.run(main())
    assert answers == [reference[i % 4] for i in range(64)], f"{time.perf_counter() - t0:.1f} s"


def test_a_request_arriving_mid_decode_finishes_before_the_long_ones(server, ar_answer):
    """Continuous batching: long streamed requests decode; a short one sent once the first long one has streamed
    text joins the running batch at the next round and is answered before any long one ends, and so is a short
    streamed one (its first text as well: time to first token is a round, not the running batch). Streamed text
    arrives round by round, not all at the end. Every answer is `ar`'s."""
    n_long, long_tokens = 6, 64
    long_refs = [ar_answer(server.images[i % 4], long_tokens) for i in range(n_long)]
    short_ref, streamed_ref = ar_answer(server.images[2], 4), ar_answer(server.images[3], 4)
    assert all(len(r.split()) > 20 for r in long_refs)  # the demo model talks on to max_tokens

    async def streamed(client, image: str, max_tokens: int, decoding: asyncio.Event | None = None):
        """(text, arrival time of each content chunk)"""
        parts, times = [], []
        stream = await client.chat.completions.create(
            model=MODEL, messages=user(QUESTION, image), max_tokens=max_tokens, temperature=0, stream=True)  # fmt: skip
        async for c in stream:
            if c.choices and c.choices[0].delta.content:
                parts.append(c.choices[0].delta.content)
                times.append(time.perf_counter())
                if decoding is not None:
                    decoding.set()
        return "".join(parts), times

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        decoding = asyncio.Event()

        async def short():
            await decoding.wait()
            t0 = time.perf_counter()
            r = await ask_async(client, user(QUESTION, server.images[2]), max_tokens=4)
            return r.choices[0].message.content, t0, time.perf_counter()

        async def short_streamed():
            await decoding.wait()
            return await streamed(client, server.images[3], 4)

        try:
            return await asyncio.gather(short(), short_streamed(),
                                        *(streamed(client, server.images[i % 4], long_tokens, decoding)
                                          for i in range(n_long)))  # fmt: skip
        finally:
            await client.close()

    (short_text, sent, answered), (streamed_text, streamed_times), *longs = asyncio.run(main())
    first_end = min(times[-1] for _, times in longs)
    print(f"short request: answered {answered - sent:.2f} s after it was sent, {first_end - answered:.2f} s "
          f"before the first of {n_long} long requests ended; the streamed one's first text "
          f"{first_end - streamed_times[0]:.2f} s before it")  # fmt: skip
    assert short_text == short_ref and streamed_text == streamed_ref and [text for text, _ in longs] == long_refs
    assert answered < first_end and streamed_times[-1] < first_end
    for _, times in longs:  # ~10+ rounds each: chunks spread over them (a buffered response arrives at once)
        assert len(times) > 3 and times[-1] - times[0] > 0.05


async def ask_async(client, messages, **kw):
    return await client.chat.completions.create(model=MODEL, messages=messages,
                                                **{"max_tokens": 16, "temperature": 0, **kw})  # fmt: skip


def _batched_rows(text: str) -> tuple[float, float]:
    """(engine steps with one row, all engine steps) from the batch_rows histogram."""

    def value(prefix: str, needle: str = "") -> float:
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix) and needle in ln)

    return value("ray_specvlm_serve_batch_rows_bucket", 'le="1.0"'), value("ray_specvlm_serve_batch_rows_count")


def test_metrics_are_exported(server, ray_local):
    port = next(n["MetricsExportPort"] for n in ray_local.nodes() if n["Alive"])
    names = [f"ray_specvlm_serve_{n}" for n in ("requests_total", "tokens_total", "accept_length",
             "compressor_choices_total", "latency_s", "batch_rows", "queue_depth", "active_rows")]  # fmt: skip
    deadline, text = time.monotonic() + 60, ""
    while True:  # Ray exports every few seconds: wait until the 64-request test's engine steps show
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        ones, batches = _batched_rows(text)
        if all(n in text for n in names) and ones < batches or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not [n for n in names if n not in text]
    assert 'status="400"' in text and 'status="200"' in text and 'compressor="none"' in text
    assert ones < batches, "no engine step decoded more than one row"


def test_replica_still_answers_correctly(server, reference):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for i in (0, 3):
        assert ask(server.client(), user(QUESTION, server.images[i])).choices[0].message.content == reference[i]


def test_a_user_config_update_swaps_the_draft_without_restarting_the_replica(server, small_demo, ray_head, tmp_path):
    """`SpecVLMServer.reconfigure`, as a RayService or `serve deploy` drives it: a config deploy (Serve's REST API)
    whose only change is ``user_config`` swaps the draft in the running replica (same replica: its ``created``
    stays); answers stay the target's and usage names the new draft. Then a ``user_config`` naming a draft
    store makes the replica follow it: a version promoted there decodes the next answers."""
    from specvlm import EagleDraft
    from specvlm.draft_store import DraftStore

    demo, _ = small_demo
    EagleDraft.from_target(demo.target, seed=3).save_pretrained(tmp_path / "v2")
    args = json.loads(server.config)
    args.pop("image_fetch")
    app = {"name": "specvlm-drafts", "route_prefix": "/drafts", "import_path": "actors.serving:build_app",
           "args": args}  # fmt: skip
    api = f"{ray_head.dashboard_url}/api/serve/applications/"
    http = {"host": "127.0.0.1", "port": server.port}

    def deploy(user_config: dict | None) -> None:
        body = {"http_options": http, "applications": [{**app, "deployments": [
            {"name": "SpecVLMServer", **({"user_config": user_config} if user_config else {})}]}]}  # fmt: skip
        assert httpx.put(api, json=body, timeout=60).status_code == 200

    def health() -> dict:
        r = httpx.get(f"{server.url}/drafts/health", timeout=10)
        return r.json() if r.status_code == 200 else {}

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + 120
        while health().get("draft_version") != version and time.monotonic() < deadline:
            time.sleep(0.5)
        assert health().get("draft_version") == version

    client = openai.OpenAI(base_url=f"{server.url}/drafts/v1", api_key=KEY, max_retries=0)
    try:
        deploy(None)
        wait_for(str(demo.path / "draft"))
        created = client.models.list().data[0].created
        before = ask(client, user(QUESTION, server.images[0]))
        assert before.usage.model_extra["draft_version"] == str(demo.path / "draft")
        deploy({"draft": str(tmp_path / "v2"), "draft_version": "v2"})
        wait_for("v2")
        after = ask(client, user(QUESTION, server.images[0]))
        assert after.usage.model_extra["draft_version"] == "v2"
        assert after.choices[0].message.content == before.choices[0].message.content  # lossless either way
        assert client.models.list().data[0].created == created  # the same replica: reconfigured, not restarted
        # following a draft store (what a caption job's online trainer publishes to): promoted versions swap in
        store = DraftStore(str(tmp_path / "store"))
        deploy({"draft_store": store.root, "poll_s": 0.5})
        store.promote(store.publish(EagleDraft.from_target(demo.target, seed=4), step=10, accept_length=2.0))
        wait_for("v000001")
        followed = ask(client, user(QUESTION, server.images[0]))
        assert followed.usage.model_extra["draft_version"] == "v000001"
        assert followed.choices[0].message.content == before.choices[0].message.content
        assert client.models.list().data[0].created == created
    finally:
        httpx.delete(api, timeout=60)

"""The OpenAI endpoint without Ray: request checks, data:/http(s) image URLs (SSRF rules), streamed text,
the engine loop on a tiny model (continuous and static batching), the batch runner on the small demo model,
and the Serve config file."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from PIL import Image

from actors.chat_runner import ChatJob, ChatRunner, RowUpdate, next_update
from actors.engine_loop import EngineLoop
from actors.image_urls import check_url, decode_data_url, fetch_image_bytes, image_bytes, is_public
from actors.openai_protocol import OpenAIError, TextStream, parse_chat_request
from actors.serve_config import ImageFetchConfig, ServeAppConfig, ServeFile, ServeLimits, load_serve_file
from specvlm.config import ConfigError, parse_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LIMITS = ServeLimits(max_body_bytes=4096, max_images=2, max_tokens=64, max_stop=2, max_prompt_chars=2000)


def png(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def body(**kw) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}).encode()


def refused(fn, *args, status=400, match="", **kw) -> OpenAIError:
    with pytest.raises(OpenAIError, match=match) as e:
        fn(*args, **kw)
    assert e.value.status == status
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return e.value


# ----------------------------------------------------------------------------- request parsing
def test_parse_accepts_openai_requests():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [image, {"type": "text", "text": "what is it?"}], "name": "x"},
    ]
    raw = body(messages=msgs, max_tokens=8, temperature=0, stop="END", seed=3, user="u")
    req = parse_chat_request(raw, LIMITS, "m")
    assert req.stops == ["END"] and req.requested_max_tokens() == 8 and req.temperature == 0
    assert req.image_urls() == [("messages.1.content.0.image_url", "data:image/png;base64,AAAA")]
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
    ]
    assert parse_chat_request(body(model=None), LIMITS, "m").temperature == 1.0  # OpenAI's default
    bare = {"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}
    assert len(parse_chat_request(body(messages=[bare]), LIMITS, "m").image_urls()) == 1


@pytest.mark.parametrize(
    "raw, status, param, text",
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b"\xff\xfe", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        (json.dumps({"model": "m"}).encode(), 400, "messages", "messages: Field required"),
        (body(messages=[]), 400, "messages", "at least 1"),
        (body(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role", "role"),
        (body(messages=[{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]), 400, None, "content"),
        (body(model="gpt-4o"), 404, "model", "does not exist"),
        (body(temperature=3), 400, "temperature", "temperature"),
        (body(max_tokens=0), 400, "max_tokens", "max_tokens"),
        (body(max_tokens=65), 400, "max_tokens", "limit 64"),
        (body(stop=["a", "b", "c"]), 400, "stop", "max_stop"),
        (body(stop=[""]), 400, "stop", "empty"),
        (body(n=2), 400, "n", "not supported"),
        (body(tools=[{"type": "function"}]), 400, "tools", "not supported"),
        (body(seed=-1), 400, "seed", "seed"),
        (b" " * 5000, 413, None, "max_body_bytes"),
        (b"[" * 4000, 400, None, "nested too deeply"),  # ~1000 levels exhaust the parser's recursion: a 400
        (b'{"messages": [{"role": "user", "content": ' + b"[" * 1800 + b"]" * 1800 + b"}]}", 400, None, "nested"),
        (body(messages=[{"role": "user", "content": "x" * 3000}]), 400, "messages", "max_prompt_chars=2000"),
        (body(messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 1500}] * 2}]), 400, "messages",
         "3000 characters"),
    ],
)  # fmt: skip
def test_parse_refuses_bad_requests(raw, status, param, text):
    err = refused(parse_chat_request, raw, LIMITS, "m", status=status, match=text)
    if param:
        assert (err.param or "").startswith(param)


def test_too_many_images():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    msgs = [{"role": "user", "content": [part] * 3}]
    refused(parse_chat_request, body(messages=msgs), LIMITS, "m", match="3 images > max_images=2")


# ----------------------------------------------------------------------------- data: URLs
def test_data_url_roundtrip_and_whitespace():
    raw = png()
    assert decode_data_url(data_url(raw), 10_000) == raw
    b64 = base64.b64encode(raw).decode()
    wrapped = "\n".join(b64[i : i + 60] for i in range(0, len(b64), 60))
    assert decode_data_url("data:image/png;base64," + wrapped, 10_000) == raw


@pytest.mark.parametrize(
    "url, text",
    [
        ("data:image/png;base64,@@notbase64!!", "invalid base64"),
        ("data:image/png;base64,QUJD=QUJD", "invalid base64"),
        ("data:text/html;base64,PGgxPg==", "not an image"),
        ("data:image/png,rawbytes", "data:image/png;base64"),
        ("data:image/png;base64,", "no bytes"),
        ("data:image/png;base64," + "A" * 4000, "max_image_bytes"),
    ],
)
def test_data_url_refused(url, text):
    refused(decode_data_url, url, 1000, match=text)


# ----------------------------------------------------------------------------- http(s) URLs
FETCH = ImageFetchConfig(allowed_hosts=("images.example.com", "*.cdn.example.org"), timeout_s=2.0, max_bytes=5000)


@pytest.mark.parametrize(
    "addr, public",
    [
        ("93.184.216.34", True), ("2606:4700::6810:85e5", True),
        ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("127.0.0.1", False),
        ("0.0.0.0", False), ("169.254.169.254", False), ("100.64.0.1", False), ("100.100.100.200", False),
        ("168.63.129.16", False), ("224.0.0.1", False), ("::1", False), ("fe80::1", False),
        ("fd00:ec2::254", False), ("::ffff:127.0.0.1", False), ("64:ff9b::a9fe:a9fe", False),
        ("2002:7f00:1::", False), ("::ffff:93.184.216.34", True),
    ],
)  # fmt: skip
def test_is_public(addr, public):
    assert is_public(ipaddress.ip_address(addr)) is public


# every IPv6 form that carries an IPv4 address, with a loopback/metadata/private IPv4 in it
EMBEDDED = {
    "mapped ::ffff:0:0/96": ("::ffff:127.0.0.1", "127.0.0.1"),
    "SIIT ::ffff:0:0:0/96": ("::ffff:0:7f00:1", "127.0.0.1"),
    "compatible ::/96": ("::127.0.0.1", "127.0.0.1"),
    "compatible metadata": ("::a9fe:a9fe", "169.254.169.254"),
    "NAT64 64:ff9b::/96": ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
    "6to4 2002::/16": ("2002:a00:1::1", "10.0.0.1"),
    "Teredo 2001::/32 (client XOR'd)": ("2001:0:5db8:d822::80ff:fffe", "127.0.0.1"),
}


@pytest.mark.parametrize("form", list(EMBEDDED))
def test_ipv6_embedding_a_private_ipv4_is_refused(form):
    from actors.image_urls import embedded_ipv4

    addr, v4 = EMBEDDED[form]
    ip = ipaddress.ip_address(addr)
    assert ipaddress.ip_address(v4) in embedded_ipv4(ip)
    assert not is_public(ip)
    with pytest.raises(OpenAIError, match="non-public address"):
        _fetch("http://images.example.com/a.png", lambda r: httpx.Response(200, content=png()), addr)


@pytest.mark.parametrize("addr", ["64:ff9b:1::a9fe:a9fe", "64:ff9b:1::5db8:d822", "64:ff9b:1:ff::1", "64:ff9b:2::1"])
def test_nat64_local_use_prefix_is_never_public(addr):
    assert not is_public(ipaddress.ip_address(addr))  # RFC 8215: it translates into the operator's own network


@pytest.mark.parametrize("addr", ["::ffff:93.184.216.34", "64:ff9b::5db8:d822", "2002:5db8:d822::1"])
def test_ipv6_embedding_a_public_ipv4_is_public(addr):
    assert is_public(ipaddress.ip_address(addr))


@pytest.mark.parametrize(
    "url, text",
    [
        ("ftp://images.example.com/a.png", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://images.example.com/", "scheme"),
        ("http://evil.com/a.png", "not in the server's image allow-list"),
        ("http://images.example.com.evil.com/a.png", "allow-list"),
        ("http://cdn.example.org/a.png", "allow-list"),  # '*.domain' is subdomains only
        ("http://169.254.169.254/latest/meta-data/", "allow-list"),
        ("http://metadata.google.internal/computeMetadata/v1/", "allow-list"),
        ("http://user:pw@images.example.com/a.png", "credentials"),
        ("http://images.example.com:8080/a.png", "port 8080"),
        ("http://images.example.com:99999/a.png", "malformed"),
        ("http:///a.png", "no host"),
    ],
)
def test_check_url_refused(url, text):
    refused(check_url, url, FETCH, match=text)


def test_check_url_allowed():
    assert check_url("https://images.example.com/a.png", FETCH) == ("https", "images.example.com", 443)
    assert check_url("http://x.cdn.example.org/a.png", FETCH)[1] == "x.cdn.example.org"
    refused(check_url, "https://images.example.com/a.png", ImageFetchConfig(), match="disabled")


def _resolver(*addrs):
    async def resolve(host, port):
        return list(addrs)

    return resolve


def _fetch(url, handler, *addrs, cfg=FETCH):
    return asyncio.run(
        fetch_image_bytes(url, cfg, "p", resolve=_resolver(*addrs), transport=httpx.MockTransport(handler))
    )


def test_fetch_pins_the_checked_address():
    seen = []

    def handler(request: httpx.Request):
        seen.append(request)
        return httpx.Response(200, content=png())

    assert _fetch("https://images.example.com/cat.png?x=1", handler, "93.184.216.34") == png()
    (req,) = seen
    assert req.url.host == "93.184.216.34" and req.url.path == "/cat.png" and req.url.query == b"x=1"
    assert req.headers["host"] == "images.example.com"
    assert req.extensions["sni_hostname"] == "images.example.com"
    _fetch("http://images.example.com/a.png", handler, "2606:4700::6810:85e5")
    assert seen[-1].url.host == "2606:4700::6810:85e5"


@pytest.mark.parametrize(
    "addrs, response, text",
    [
        (("127.0.0.1",), None, "non-public address"),
        (("93.184.216.34", "10.0.0.7"), None, "non-public address"),  # any private answer refuses the host
        (("169.254.169.254",), None, "non-public address"),
        ((), None, "no addresses"),
        (("93.184.216.34",), httpx.Response(302, headers={"location": "http://127.0.0.1/"}), "redirects"),
        (("93.184.216.34",), httpx.Response(404), "HTTP 404"),
        (("93.184.216.34",), httpx.Response(200, content=b"x" * 6000), "max_bytes"),
        (("93.184.216.34",), httpx.Response(200, headers={"content-length": "99999"}, content=b""), "max_bytes"),
    ],
)
def test_fetch_refused(addrs, response, text):
    with pytest.raises(OpenAIError, match=text) as e:
        _fetch("http://images.example.com/a.png", lambda r: response, *addrs)
    assert e.value.status == 400 and e.value.param == "p"


def test_fetch_timeout():
    async def slow(host, port):
        await asyncio.sleep(5)

    cfg = ImageFetchConfig(allowed_hosts=("images.example.com",), timeout_s=0.2)
    with pytest.raises(OpenAIError, match="longer than 0.2 s"):
        asyncio.run(fetch_image_bytes("http://images.example.com/a.png", cfg, resolve=slow))


def test_image_bytes_dispatch():
    assert asyncio.run(image_bytes(data_url(png()), FETCH, 10_000)) == png()
    with pytest.raises(OpenAIError, match="disabled"):
        asyncio.run(image_bytes("https://x.org/a.png", ImageFetchConfig(), 10_000))


# ----------------------------------------------------------------------------- streamed text
WORDS = {1: "a", 2: "red", 3: "circle", 4: "on", 5: "blue", 6: ".", 7: "END", 8: "\ufffd", 0: "</s>"}


def decode(ids):
    return " ".join(WORDS[i] for i in ids if i != 0).replace(" .", ".")


def run_stream(rounds, max_tokens=50, stop=(), engine_finished_last=False):
    ts = TextStream(decode, eos_ids=[0], max_tokens=max_tokens, stop=stop)
    deltas = []
    for k, r in enumerate(rounds):
        deltas.append(ts.push(r, engine_finished_last and k == len(rounds) - 1))
        if ts.finish_reason:
            break
    return ts, deltas


def test_a_reader_behind_the_engine_gets_the_rounds_it_missed_as_one_update():
    async def read(queued):
        q = asyncio.Queue()
        for u in queued:
            q.put_nowait(u)
        out = [await next_update(q)]
        while not out[-1].last:
            out.append(await next_update(q))
        return out

    usage = {"completion_tokens": 3}
    merged = asyncio.run(read([RowUpdate("a"), RowUpdate("b"), RowUpdate("c", "length", usage, {"n": 3})]))
    assert merged == [RowUpdate("abc", "length", usage, {"n": 3})]
    failed = asyncio.run(read([RowUpdate("a"), RowUpdate(error="boom")]))
    assert failed == [RowUpdate("a", error="boom")] and failed[0].last


def test_text_stream_deltas_add_up_to_the_text():
    ts, deltas = run_stream([[1], [2, 3], [6, 4], [5, 0]])
    assert "".join(deltas) == ts.sent == "a red circle. on blue"
    assert deltas[:3] == ["a", " red circle", ". on"] and ts.finish_reason == "stop"
    assert ts.tokens == [1, 2, 3, 6, 4, 5, 0]


def test_text_stream_max_tokens_and_engine_end():
    ts, deltas = run_stream([[1, 2], [3, 4, 5]], max_tokens=4)
    assert ts.finish_reason == "length" and ts.tokens == [1, 2, 3, 4] and ts.sent == "a red circle on"
    ts, _ = run_stream([[1], [2]], engine_finished_last=True)
    assert ts.finish_reason == "length"


def test_text_stream_stop_string_is_cut_and_never_streamed():
    ts, deltas = run_stream([[1, 2], [3], [7], [4]], stop=["circle END"])
    assert ts.finish_reason == "stop" and ts.sent == "a red "
    assert deltas == ["a red", " ", ""]  # "circle" was held back: it may begin the stop string
    ts, deltas = run_stream([[1, 2], [3, 7, 4]], stop=["circle END"])
    assert ts.finish_reason == "stop" and deltas == ["a red", " "]
    ts, deltas = run_stream([[1, 2, 3], [4, 5]], stop=["circle EXIT"])
    assert ts.finish_reason is None and "".join(deltas) == "a red circle on blue"


def test_text_stream_holds_back_partial_characters():
    ts, deltas = run_stream([[1, 8]])
    assert deltas == ["a "] and ts.finish_reason is None


# ----------------------------------------------------------------------------- engine loop (tiny model)
TINY_TOKENS = 24


@contextlib.contextmanager
def one_torch_thread():
    """A model this small gains nothing from two torch threads, and two spin against each other on a busy machine
    (10-100x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model():
    """A float64 tiny LLaVA in eagle mode (a random draft: rounds accept few tokens), four single-row requests
    and the ar engine's greedy tokens for each (none ends before TINY_TOKENS)."""
    with one_torch_thread():
        return _tiny_model()


@pytest.fixture
def tiny(tiny_model):
    with one_torch_thread():
        yield tiny_model


def _tiny_model():
    from specvlm import EagleDraft, EngineConfig, SpecVLMEngine, TreeConfig
    from specvlm.tiny import tiny_inputs, tiny_llava

    model = tiny_llava(dtype=torch.float64)
    inputs = tiny_inputs(model, [5, 8, 3, 6], seed=4)
    ar = SpecVLMEngine(model, None, EngineConfig(mode="ar")).generate(**inputs, max_new_tokens=TINY_TOKENS).sequences
    assert all(len(a) == TINY_TOKENS for a in ar)
    tree = TreeConfig(top_k=3, total_tokens=10, depth=4)
    engine = SpecVLMEngine(model, EagleDraft.from_target(model, seed=0), EngineConfig(mode="eagle", tree=tree))
    rows = []
    for ids, mask, pv in zip(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]):
        m = mask.bool()
        rows.append(
            {"input_ids": ids[m][None], "attention_mask": torch.ones(1, int(m.sum())), "pixel_values": pv[None]}
        )
    return SimpleNamespace(engine=engine, rows=rows, ar=ar)


def tiny_text(ids) -> str:
    from specvlm.tiny import EOS

    return " ".join(f"<{i}>" for i in ids if i != EOS)


class Request:
    """A tiny-model request for an `EngineLoop`, recording each update with the engine step it came after."""

    def __init__(self, tiny, loop: EngineLoop, row: int, max_tokens: int = TINY_TOKENS, stop=()):
        from specvlm.tiny import EOS

        inputs = tiny.rows[row]
        text = TextStream(tiny_text, [EOS], max_tokens, stop)
        self.job = ChatJob(inputs, int(inputs["input_ids"].shape[1]), max_tokens, 0.0, 1.0, 0, None, text)
        self.loop, self.updates = loop, []  # (loop.steps when posted, RowUpdate)
        self.finished = threading.Event()

    def sink(self, update) -> None:
        self.updates.append((self.loop.steps, update))
        if update.finish_reason or update.error:
            self.finished.set()

    def submit(self) -> Request:
        self.loop.submit(self.job, self.sink)
        return self

    @property
    def done_at(self) -> int | None:
        """The engine step after which the last update came (None before it)."""
        return self.updates[-1][0] if self.finished.is_set() else None

    @property
    def text(self) -> str:
        return "".join(u.text for _, u in self.updates)


def drain(loop: EngineLoop, limit: int = 200) -> None:
    for _ in range(limit):
        if not loop.busy:
            return
        loop.run_once()
    raise AssertionError("the loop did not finish")


def test_loop_a_short_request_joins_mid_decode_and_finishes_first(tiny):
    depths, rounds = [], []
    loop = EngineLoop(tiny.engine, 0, max_rows=4, on_round=rounds.append, on_depth=lambda w, a: depths.append((w, a)))
    long = Request(tiny, loop, 0).submit()
    assert depths == [(1, 0)] and loop.waiting == 1
    loop.run_once()
    loop.run_once()  # the long request's prefill, then a round
    assert depths[-1] == (0, 1) and loop.active == 1 and long.updates[-1][0] == 2
    short = Request(tiny, loop, 1, max_tokens=4).submit()
    loop.run_once()  # the short one's prefill, then a round for both
    # its first token went out in that step after the prefill, before the round's tokens
    assert [n for n, _ in short.updates[:2]] == [3, 3] and short.updates[0][1].text == tiny_text(tiny.ar[1][:1])
    assert rounds[:3] == [1, 1, 2] and loop.active == 2
    drain(loop)
    assert short.done_at < long.done_at
    for req, row, n in ((long, 0, TINY_TOKENS), (short, 1, 4)):  # every answer is the ar engine's greedy one
        assert req.job.text.tokens == tiny.ar[row][:n] and req.text == tiny_text(tiny.ar[row][:n])
        last = req.updates[-1][1]
        assert last.finish_reason == "length" and last.usage["completion_tokens"] == n and last.stats["num_tokens"] == n
    assert depths[-1] == (0, 0) and tiny.engine.num_rows == 0
    one = Request(tiny, loop, 2, max_tokens=1).submit()  # ends at its first token: no round, still a row
    loop.run_once()
    assert one.job.text.tokens == tiny.ar[2][:1] and rounds[-1] == 1 and tiny.engine.num_rows == 0


@pytest.mark.parametrize("passes", [1, 2])
def test_loop_a_request_arriving_during_a_prefill_joins_that_step_with_two_passes(tiny, passes):
    loop = EngineLoop(tiny.engine, 0, max_rows=4, prefill_passes=passes)
    first, late = Request(tiny, loop, 0), Request(tiny, loop, 1)
    sink = first.sink

    def arrive_during_the_prefill(update):  # the engine thread, right after first's prefill
        sink(update)
        if len(first.updates) == 1:
            late.submit()

    first.sink = arrive_during_the_prefill
    first.submit()
    loop.run_once()
    assert first.updates[0][0] == 1 and loop.active == (2 if passes == 2 else 1)
    assert late.updates[:1] == ([(1, late.updates[0][1])] if passes == 2 else [])  # its first token, same step
    drain(loop)
    for req, row in ((first, 0), (late, 1)):
        assert req.job.text.tokens == tiny.ar[row] and req.text == tiny_text(tiny.ar[row])
    with pytest.raises(ValueError, match="prefill_passes"):
        EngineLoop(tiny.engine, 0, max_rows=4, prefill_passes=0)


def test_loop_swaps_a_draft_once_the_rows_decoding_have_finished(tiny):
    """`EngineLoop.swap_draft`: the row decoding keeps its draft to the end, a row arriving meanwhile waits and
    decodes with the new one; usage names the draft of each; a draft the engine refuses leaves the old one."""
    from specvlm import EagleDraft
    from specvlm.tiny import tiny_llava

    engine, old = tiny.engine, tiny.engine.draft
    new = EagleDraft.from_target(engine.target.model, seed=5)
    loop = EngineLoop(engine, 0, max_rows=4, draft_version="v1")
    try:
        a = Request(tiny, loop, 0).submit()
        loop.run_once()
        loop.swap_draft(new, "v2")
        b = Request(tiny, loop, 1).submit()
        loop.run_once()
        assert loop.active == 1 and loop.waiting == 1 and engine.draft is old  # b waits for a to end
        drain(loop)
        assert engine.draft is new and loop.draft_version == "v2"
        assert [r.updates[-1][1].usage["draft_version"] for r in (a, b)] == ["v1", "v2"]
        assert a.job.text.tokens == tiny.ar[0] and b.job.text.tokens == tiny.ar[1]
        loop.swap_draft(EagleDraft.from_target(tiny_llava(hidden=32)), "other-target")  # made for another target
        drain(loop)
        assert engine.draft is new and loop.draft_version == "v2"
    finally:
        engine.set_draft(old)


def test_loop_a_cancelled_request_frees_its_row_at_the_next_round(tiny):
    loop = EngineLoop(tiny.engine, 0, max_rows=2)
    a, b = Request(tiny, loop, 0).submit(), Request(tiny, loop, 1).submit()
    loop.run_once()  # both prefilled: the loop is full
    c = Request(tiny, loop, 2).submit()
    gone = Request(tiny, loop, 3)
    gone.job.cancelled = True  # its client left before it started
    gone.submit()
    loop.run_once()
    assert loop.waiting == 1 and c.updates == []  # no room for c
    assert [(n, u.error) for n, u in gone.updates] == [(1, "cancelled")]  # answered without decoding
    a.job.cancelled = True
    loop.run_once()  # a leaves, c takes its place at this very round
    assert a.updates[-1][1].error == "cancelled" and a.done_at == 2
    assert c.updates[0][0] == 3 and tiny.engine.num_rows == 2 and loop.active == 2
    drain(loop)
    assert b.job.text.tokens == tiny.ar[1] and c.job.text.tokens == tiny.ar[2]


def test_loop_a_stop_string_ends_only_its_row(tiny):
    ref = tiny.ar[0]
    k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])  # a token not seen before it
    loop = EngineLoop(tiny.engine, 0, max_rows=4)
    stopped = Request(tiny, loop, 0, stop=[f"<{ref[k]}>"]).submit()
    other = Request(tiny, loop, 1).submit()
    while stopped.done_at is None:
        loop.run_once()
    last = stopped.updates[-1][1]
    assert last.finish_reason == "stop" and stopped.text == tiny_text(ref[:k]) + " "
    assert tiny.engine.num_rows == 2  # finished: it leaves at the next round
    loop.run_once()
    assert tiny.engine.num_rows == 1 and other.done_at is None
    drain(loop)
    assert other.job.text.tokens == tiny.ar[1] and other.updates[-1][1].finish_reason == "length"


def test_loop_an_engine_failure_fails_its_rows_and_goes_on(tiny, monkeypatch):
    loop = EngineLoop(tiny.engine, 0, max_rows=4)
    a, b = Request(tiny, loop, 0).submit(), Request(tiny, loop, 1).submit()
    loop.run_once()
    step = tiny.engine.step

    def boom(**kw):
        monkeypatch.setattr(tiny.engine, "step", step)  # fails once
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny.engine, "step", boom)
    loop.run_once()
    assert [r.updates[-1][1].error for r in (a, b)] == ["RuntimeError: boom"] * 2
    assert tiny.engine.num_rows == 0 and loop.active == 0  # the engine was reset
    c = Request(tiny, loop, 2, max_tokens=6).submit()
    drain(loop)
    assert c.job.text.tokens == tiny.ar[2][:6] and c.updates[-1][1].finish_reason == "length"


def test_loop_static_mode_runs_each_batch_to_its_end(tiny):
    loop = EngineLoop(tiny.engine, 0, max_rows=4, mode="static")
    long = Request(tiny, loop, 0, max_tokens=10).submit()
    loop.run_once()
    short = Request(tiny, loop, 1, max_tokens=4).submit()
    while long.done_at is None:
        loop.run_once()
    assert short.updates == [] and loop.waiting == 1  # it waits for the batch to end
    drain(loop)
    assert short.updates[0][0] > long.done_at
    assert long.job.text.tokens == tiny.ar[0][:10] and short.job.text.tokens == tiny.ar[1][:4]


def test_loop_thread_sleeps_while_idle_and_wakes_for_a_request(tiny):
    loop = EngineLoop(tiny.engine, 0, max_rows=4)
    iterations = []
    run_once = loop.run_once
    loop.run_once = lambda: (iterations.append(1), run_once())
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        for row in (2, 3):  # the second arrives at an idle loop, which wakes for it
            req = Request(tiny, loop, row, max_tokens=5).submit()
            assert req.finished.wait(30)
            assert req.job.text.tokens == tiny.ar[row][:5]
            time.sleep(0.05)  # the row leaves the engine; then nothing is left to do
            n = len(iterations)
            time.sleep(0.3)
            assert len(iterations) == n <= 8  # asleep on the condition variable, not spinning
            iterations.clear()
    finally:
        loop.stop()
        thread.join(10)
    assert not thread.is_alive()


# ----------------------------------------------------------------------------- batch runner (small demo)
@pytest.fixture(scope="module")
def runner(small_demo):
    from specvlm import EngineConfig, SpecVLMEngine, TreeConfig

    demo, _ = small_demo
    engine = SpecVLMEngine(demo.target, demo.draft, EngineConfig(tree=TreeConfig(top_k=4, total_tokens=16, depth=4)))
    return ChatRunner(engine, demo.processor, ServeLimits(max_tokens=64))


@pytest.fixture(scope="module")
def scenes():
    from specvlm.demo import ShapesWorld

    world = ShapesWorld(5)
    out = []
    for _ in range(3):
        buf = io.BytesIO()
        world.image_scene()[0].save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def job(runner, question, images=(), **kw):
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}} for _ in images]
    msgs = [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]
    req = parse_chat_request(body(model=None, messages=msgs, **{"temperature": 0, **kw}), ServeLimits(), "m")
    return runner.prepare(req, list(images))


def run(runner, jobs, on_post=None):
    updates = {i: [] for i in range(len(jobs))}

    def post(ups):
        for i, u in ups.items():
            updates[i].append(u)
        if on_post:
            on_post(ups)

    runner.run(jobs, post)
    for us in updates.values():  # exactly one last update per request, and it is the last one
        assert sum(bool(u.finish_reason or u.error) for u in us) == 1 and (us[-1].finish_reason or us[-1].error)
    return [("".join(u.text for u in us), us[-1]) for us in updates.values()]


def test_runner_batch_equals_single_requests_and_the_engine(runner, scenes):
    specs = [("describe the image.", scenes[:1]), ("what color is the shape?", scenes[1:2]),
             ("describe the image.", scenes[1:3]), ("describe the image.", ())]  # fmt: skip
    batched = run(runner, [job(runner, q, imgs, max_tokens=12) for q, imgs in specs])
    for (q, imgs), (text, last) in zip(specs, batched):
        (alone, _), = run(runner, [job(runner, q, imgs, max_tokens=12)])  # fmt: skip
        assert text == alone and last.finish_reason in ("stop", "length")
        assert last.usage["completion_tokens"] <= 12 and last.usage["accept_length"] >= 1.0
        assert last.usage["total_tokens"] == last.usage["prompt_tokens"] + last.usage["completion_tokens"]
    j = job(runner, *specs[0], max_tokens=12)
    ref = runner.engine.generate(**j.inputs, max_new_tokens=12).sequences[0]
    assert batched[0][0] == runner.tokenizer.decode(ref, skip_special_tokens=True)


def test_runner_stop_strings_and_max_tokens_end_rows_early(runner, scenes):
    (full, last), = run(runner, [job(runner, "describe the image.", scenes[:1], max_tokens=24)])  # fmt: skip
    words = full.split()
    assert len(words) >= 4, full
    stop = " ".join(words[2:4])
    (text, last), (short, last_short) = run(runner, [
        job(runner, "describe the image.", scenes[:1], max_tokens=24, stop=[stop]),
        job(runner, "describe the image.", scenes[:1], max_tokens=3),
    ])  # fmt: skip
    assert text == full[: full.index(stop)] and last.finish_reason == "stop"
    assert last.usage["completion_tokens"] < 24
    assert last_short.finish_reason == "length" and last_short.usage["completion_tokens"] == 3
    assert full.startswith(short)


def test_runner_seeded_sampling_does_not_depend_on_the_batch(runner, scenes):
    sampled = dict(temperature=1.0, seed=11, max_tokens=12)
    (alone, _), = run(runner, [job(runner, "describe the image.", scenes[:1], **sampled)])  # fmt: skip
    batch = [job(runner, "describe the image.", scenes[:1], **sampled),
             job(runner, "describe the image.", scenes[1:2], max_tokens=12),
             job(runner, "describe the image.", scenes[1:2], temperature=1.0, seed=12, max_tokens=12)]  # fmt: skip
    assert run(runner, batch)[0][0] == alone


def test_runner_ends_cancelled_rows(runner, scenes):
    jobs = [job(runner, "describe the image.", scenes[:1], max_tokens=40) for _ in range(2)]
    updates = {0: [], 1: []}

    def post(ups):
        for i, u in ups.items():
            updates[i].append(u)
        jobs[0].cancelled = True  # the first client leaves after the first round

    runner.run(jobs, post)
    assert [(u.error, u.finish_reason) for u in updates[0][1:]] == [("cancelled", None)]  # ended after round 1
    assert updates[1][-1].finish_reason and len(updates[1]) > 2
    late = job(runner, "describe the image.", scenes[:1], max_tokens=40)
    late.cancelled = True  # gone before its batch started: it is not decoded at all
    assert [u.error for u in run(runner, [late])[0][1:]] == ["cancelled"]


def test_runner_turns_engine_failures_into_row_errors(runner, scenes, monkeypatch):
    def boom(**kw):
        raise RuntimeError("boom")

    jobs = [job(runner, "describe the image.", scenes[:1], max_tokens=4) for _ in range(2)]
    monkeypatch.setattr(runner.engine, "step", boom)
    assert [last.error for _, last in run(runner, jobs)] == ["RuntimeError: boom"] * 2
    monkeypatch.undo()
    assert runner.engine.num_rows == 0  # reset: the next batch starts clean


def test_prepare_refuses_bad_images_and_long_requests(runner, scenes):
    refused(job, runner, "q", [b"this is not an image"], match="decode: cannot identify image")
    refused(job, runner, "q", [png()[:40]], match="decode")  # truncated
    few_pixels = ChatRunner(runner.engine, runner.processor, ServeLimits(max_image_pixels=1000))
    refused(job, few_pixels, "q", [png((40, 40))], match="max_pixels=1000")
    short = ChatRunner(runner.engine, runner.processor, ServeLimits(max_prompt_tokens=16))
    refused(job, short, "q", scenes[:1], match="max_prompt_tokens=16")
    refused(job, runner, "q", scenes[:1], max_tokens=500, match="maximum context length is 512")


# ----------------------------------------------------------------------------- config
def test_serve_yaml_is_a_serve_config_with_the_default_app():
    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / "serve.yaml").read_text()))
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    built = call_user_app_builder_with_args_if_necessary(builder, app.args)
    assert type(built).__name__ == "Application"
    spec = load_serve_file(CONFIGS / "serve.yaml")
    assert spec == ServeFile()  # `specvlm serve` without --config runs this file
    assert (spec.name, spec.host, spec.port) == ("specvlm", "127.0.0.1", 8000)


@pytest.mark.parametrize("args", [[], ["--config", str(CONFIGS / "serve.yaml")], ["--host", "0.0.0.0", "--port", "9"]])
def test_print_config_is_a_serve_config_that_loads_back_equal(args, tmp_path, capsys):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve import main

    assert main([*args, "--print-config"]) == 0
    printed = tmp_path / "full.yaml"
    printed.write_text(capsys.readouterr().out)
    ServeDeploySchema.model_validate(yaml.safe_load(printed.read_text()))  # `serve run` reads it too
    want = ServeFile(host="0.0.0.0", port=9) if "--host" in args else load_serve_file(CONFIGS / "serve.yaml")
    assert load_serve_file(printed) == want
    (app,) = yaml.safe_load(printed.read_text())["applications"]
    assert app["args"] == want.app.model_dump(mode="json")  # every default is printed


def test_bare_app_config_file(tmp_path):
    f = tmp_path / "app.yaml"
    f.write_text("served_model_name: mine\nbatching: {max_batch_size: 4}\n")
    spec = load_serve_file(f)
    assert spec.app.served_model_name == "mine" and spec.app.batching.max_batch_size == 4 and spec.port == 8000


@pytest.mark.parametrize(
    "data, field",
    [
        ({"deployment": {"max_ongoing_requests": 4}}, "(top level)"),  # batches could never fill
        ({"deployment": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}}, "deployment"),
        ({"deployment": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}}, "deployment.autoscaling"),
        ({"image_fetch": {"allowed_hosts": ["http://x.com"]}}, "image_fetch.allowed_hosts"),
        ({"image_fetch": {"allowed_hosts": ["x.com:8080"]}}, "image_fetch.allowed_hosts"),
        ({"limits": {"max_images": -1}}, "limits.max_images"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError, match=rf"(?m)^  {re.escape(field)}"):
        parse_config(data, ServeAppConfig, source="serve.yaml")


def test_specvlm_serve_reports_bad_config_before_starting_ray(tmp_path):
    from pipelines.serve import main

    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - name: specvlm\n    import_path: actors.serving:build_app\n"
                   "    args: {batching: {max_batch_size: 0}}\n")  # fmt: skip
    with pytest.raises(SystemExit, match="batching.max_batch_size"):
        main(["--config", str(bad)])
    with pytest.raises(SystemExit, match="no application 'other'"):
        main(["--config", str(bad), "--app", "other"])


def test_model_name():
    cfg = ServeAppConfig()
    assert cfg.model_name({"model": "specvlm-demo"}) == "specvlm-demo"
    assert cfg.model_name({"model": "/models/llava-1.5-7b/"}) == "llava-1.5-7b"
    assert ServeAppConfig(served_model_name="x").model_name({"model": "y"}) == "x"


def test_protocol_modules_do_not_import_ray():
    import subprocess
    import sys

    code = ("import sys, actors.openai_protocol, actors.image_urls, actors.chat_runner, actors.engine_loop, "
            "actors.serve_config; print('ray' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

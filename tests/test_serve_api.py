"""The HTTP server (`python -m serve`) in a subprocess on 127.0.0.1, driven by the official `openai` client:
completions, chat, streaming, 64 concurrent streams with flat memory, 4xx errors in OpenAI's shape, and
slots freed when clients disconnect."""

import asyncio
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model.formats.tokenizer import ByteTokenizer
from model.job import resolve
from serve.config import load_config
from serve.schemas import APIError
from serve.streaming import Admission
from sharding.mesh import single_device_mesh
from tests.serve_process import free_port, serve_process

openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-123"
SLOTS = 8
HEADER_TIMEOUT = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu", SERVE_API_KEY=KEY)
    args = [f"engine.max_slots={SLOTS}", "engine.max_len=512", "engine.min_kv_bucket=512", "engine.prefill_chunk=64",
            "engine.prefill_tokens=128", "server.max_prompt_tokens=300", "server.max_tokens=400",
            "server.max_body_bytes=262144", f"server.header_timeout={HEADER_TIMEOUT}",
            "server.stream_buffer=128",  # 32 let a loaded reader of a fast 400-token stream fall behind (seen once)
            "server.body_timeout=3"]
    with serve_process(args, log, env) as (url, proc):
        yield url, proc, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


NO_EOS = {"ignore_eos": True}  # the toy model has random weights: keep lengths predictable
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def toy_greedy():
    """The served toy model's weights (serve_toy's preset and seed) run by `Model.greedy`, the full-recompute
    path without a KV cache: (prompt ids, n) -> the n greedy tokens."""
    cfg = load_config(None)
    m = resolve.build_model(cfg.model, single_device_mesh(), seed=cfg.model.seed)
    return lambda ids, n: m.greedy([ids], n)[0]


def text_of(ids) -> str:
    """The text the server answers: special tokens are skipped (skip_special_tokens defaults to true)."""
    special = set(TOK.special.values())
    return b"".join(TOK.token_bytes(int(i)) for i in ids if int(i) not in special).decode(errors="replace")


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["toy"]
    h = httpx.get(server[0] + "/health").json()
    assert h["status"] == "ok" and h["model"] == "toy"


def test_completion_and_chat(client, toy_greedy):
    """Greedy text is the full-recompute greedy continuation of the served weights (tests/test_serve_parity.py
    compares the server with transformers); prompt and completion counts are exact."""
    r = client.completions.create(model="toy", prompt="Hello", max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == len("Hello".encode()) + 1  # + BOS
    assert r.choices[0].text == text_of(toy_greedy(TOK.encode("Hello", bos=True), 8))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    c = client.chat.completions.create(model="toy", messages=msgs, max_tokens=6, temperature=0, extra_body=NO_EOS)
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 6
    assert c.usage.prompt_tokens == len(TOK.encode_chat(msgs))
    assert c.choices[0].message.content == text_of(toy_greedy(TOK.encode_chat(msgs), 6))
    # greedy decoding is deterministic; n > 1 and a list of prompts give several choices
    again = client.completions.create(model="toy", prompt="Hello", max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert again.choices[0].text == r.choices[0].text
    multi = client.completions.create(model="toy", prompt=["Hello", "Bye"], max_tokens=4, temperature=0, n=2,
                                      extra_body=NO_EOS)
    assert sorted(ch.index for ch in multi.choices) == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text  # greedy: same prompt, same text
    lp = client.completions.create(model="toy", prompt="Hello", max_tokens=3, temperature=0, logprobs=2,
                                   extra_body=NO_EOS)
    assert len(lp.choices[0].logprobs.token_logprobs) == 3 and len(lp.choices[0].logprobs.top_logprobs[0]) == 2


def test_streaming_matches_non_streaming(client):
    kw = dict(model="toy", max_tokens=12, temperature=0, extra_body=NO_EOS)
    whole = client.completions.create(prompt="Stream me", **kw).choices[0].text
    chunks = list(client.completions.create(prompt="Stream me", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    msgs = [{"role": "user", "content": "Tell me"}]
    whole = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True},
                                                 **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_raw_sse_framing(server):
    """What SSE clients that do not use the openai package rely on: every event is one `data: …` line and a
    blank line, and both endpoints end the stream with `data: [DONE]`."""
    kw = dict(model="toy", max_tokens=3, stream=True, ignore_eos=True)
    for path, body in (("/v1/completions", dict(prompt="x", **kw)),
                       ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], **kw))):
        r = _post(server[0] + path, body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = r.text.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]", r.text[-200:]
        assert all(e.startswith("data: {") for e in events[:-2]) and len(events) >= 3


def test_64_concurrent_streams_memory_flat(server):
    proc = psutil.Process(server[1].pid)

    async def one(aclient, i):
        n = 8 + i % 9
        if i % 2:
            stream = await aclient.chat.completions.create(
                model="toy", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=n, stream=True,
                temperature=0.7, seed=i, extra_body=NO_EOS)
            parts = [c async for c in stream]
            finish = [c.choices[0].finish_reason for c in parts if c.choices and c.choices[0].finish_reason]
        else:
            stream = await aclient.completions.create(model="toy", prompt=f"client {i}: " + "x" * (i % 40),
                                                      max_tokens=n, stream=True, extra_body=NO_EOS)
            parts = [c async for c in stream]
            finish = [c.choices[0].finish_reason for c in parts if c.choices[0].finish_reason]
        return finish

    async def round_():
        aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(aclient, i) for i in range(64)))
        finally:
            await aclient.close()

    # Rounds until one compiles no new step shape (which shapes a round needs depends on timing: token and
    # sequence buckets, one or several tokens per decode call; the paged engine's set keeps growing slowly);
    # across that round, memory must stay flat.
    rss, compiled = [], []
    for _ in range(10):
        results = asyncio.run(round_())
        assert all(f == ["length"] for f in results), results
        time.sleep(0.5)
        rss.append(proc.memory_info().rss)
        compiled.append(httpx.get(server[0] + "/health").json()["compiled_steps"])
        if len(compiled) >= 2 and compiled[-1] == compiled[-2]:
            break
    print(f"server RSS after each round: {[round(r / 2**20, 1) for r in rss]} MiB; step shapes: {compiled}")
    assert compiled[-1] == compiled[-2], f"still compiling new shapes: {compiled}"
    # 64 requests a round: 4 MiB is 64 KiB per request, an eighth of one toy KV slot (512 KiB); observed
    # growth between settled rounds is 1-2 MiB (allocator noise)
    growth = rss[-1] - rss[-2]
    assert growth < 4 << 20, f"server memory grew by {growth / 2**20:.1f} MiB between rounds ({rss})"
    assert httpx.get(server[0] + "/health").json()["active"] == 0


def _post(url, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(url, content=raw, headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(url, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("case", ["malformed_json", "not_an_object", "wrong_type",
                                  "unknown_field_wrong_type", "prompt_too_long", "max_tokens_over_limit",
                                  "bad_message", "wrong_key", "no_key", "unknown_model", "body_too_large",
                                  "bad_temperature"])
def test_bad_requests_get_openai_errors(server, case):
    url = server[0] + "/v1/completions"
    chat = server[0] + "/v1/chat/completions"
    ok = {"model": "toy", "prompt": "hi", "max_tokens": 2}
    cases = {
        "malformed_json": (lambda: _post(url, None, raw=b'{"model": "toy", "prompt": '), 400, None),
        "not_an_object": (lambda: _post(url, [1, 2, 3]), 400, None),
        "wrong_type": (lambda: _post(url, {**ok, "max_tokens": "5"}), 400, "max_tokens"),
        # an unknown field alone is ignored (tests/test_serve_openai.py); a known one of the wrong type is not
        "unknown_field_wrong_type": (lambda: _post(chat, {"model": "toy", "messages": [{"role": "user", "content": "x"}],
                                                          "top_logprobs": "many", "colour": [1]}), 400,
                                     "top_logprobs"),
        "prompt_too_long": (lambda: _post(url, {**ok, "prompt": "x" * 400}), 400, "prompt"),
        "max_tokens_over_limit": (lambda: _post(url, {**ok, "max_tokens": 401}), 400, "max_tokens"),
        "bad_message": (lambda: _post(chat, {"model": "toy", "messages": [{"role": "wizard", "content": "x"}]}), 400,
                        "messages.0.role"),
        "wrong_key": (lambda: _post(url, ok, key="nope"), 401, None),
        "no_key": (lambda: _post(url, ok, key=None), 401, None),
        "unknown_model": (lambda: _post(url, {**ok, "model": "gpt-5"}), 404, "model"),
        "body_too_large": (lambda: _post(url, {**ok, "prompt": "y" * 300000}), 400, None),
        "bad_temperature": (lambda: _post(url, {**ok, "temperature": 3.5}), 400, "temperature"),
    }
    call, status, param = cases[case]
    r = call()
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] in ("invalid_request_error", "authentication_error")
    if param:
        assert err["param"] == param
    # and the server keeps serving
    good = _post(url, ok)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_openai_client_errors(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        good.completions.create(model="toy", prompt="hi", max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"


def test_disconnect_frees_slots(server):
    url = server[0]
    body = {"model": "toy", "prompt": "long story", "max_tokens": 400, "stream": True, "ignore_eos": True}
    clients = []
    for _ in range(SLOTS + 2):  # every slot busy, two more waiting
        c = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"})
        resp = c.send(c.build_request("POST", url + "/v1/completions", json=body), stream=True)
        clients.append((c, resp))
    lines = [resp.iter_lines() for _, resp in clients]  # (keep the iterators: dropping one closes its stream)
    for it in lines[:SLOTS]:  # wait for a first chunk from the ones holding slots
        next(it)
    assert httpx.get(url + "/health").json()["active"] == SLOTS
    t0 = time.time()
    for c, resp in clients:
        resp.close()
        c.close()
    while httpx.get(url + "/health").json()["active"] or httpx.get(url + "/health").json()["waiting"]:
        assert time.time() - t0 < 10, "slots were not freed after the clients disconnected"
        time.sleep(0.05)
    r = _post(url + "/v1/completions", {"model": "toy", "prompt": "next", "max_tokens": 3})
    assert r.status_code == 200


def test_cli_generate(toy_greedy):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "serve", "generate", "--prompt", "Once upon", "--max-tokens", "5",
                        "engine.max_len=128"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = TOK.encode("Once upon", bos=True)
    want = [int(t) for t in toy_greedy(ids, 5)]
    stop = next((i for i, t in enumerate(want) if t in TOK.stop_ids), None)  # greedy may end at a stop token
    n, finish = (5, "length") if stop is None else (stop + 1, "stop")
    assert f"{len(ids)} prompt + {n} completion tokens" in r.stderr and f"(finish: {finish}," in r.stderr, r.stderr
    assert r.stdout == text_of(want[:stop]) + "\n"
    bad = subprocess.run([sys.executable, "-m", "serve", "engine.max_slots=zero"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "max_slots" in bad.stderr and "expected an integer" in bad.stderr


def _stream_text(url, body):
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        assert r.status_code == 200
        chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(json.loads(c)["choices"][0]["text"] for c in chunks), time.time()


def test_out_of_range_request_fails_alone(server):
    """top_k 2**32 (int32 overflow on the engine thread once) is a 400 for that request only: two long
    streams running meanwhile finish with the text they have when run alone."""
    url = server[0] + "/v1/completions"
    bodies = [{"model": "toy", "prompt": p, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
              for p in ("first long one", "second long one")]
    alone = [_stream_text(url, b)[0] for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(_stream_text, url, b) for b in bodies]
        deadline = time.time() + 30
        while (active := httpx.get(server[0] + "/health").json()["active"]) < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert active >= 2, "the long streams did not start"
        sent = time.time()  # while both stream (a loaded machine may finish them before the answers come)
        bad = [_post(url, {"model": "toy", "prompt": "x", "top_k": 2**32, "max_tokens": 1})]
        bad += [_post(url, {"model": "toy", "prompt": "x", "seed": 2**70, "max_tokens": 1}),
                _post(url, {"model": "toy", "prompt": "x", "stop": ["s" * 300], "max_tokens": 1})]
        together = [f.result() for f in running]
    assert all(t > sent for _, t in together), "the long streams were not running meanwhile"
    together = [text for text, _ in together]
    assert [r.status_code for r in bad] == [400] * 3, [r.text for r in bad]
    assert [r.json()["error"]["param"] for r in bad] == ["top_k", "seed", "stop"]
    assert together == alone


def test_unfinished_headers_are_closed(server):
    """300 connections that never finish their request head are closed after the header timeout, while a
    normal request is served."""
    host, port = server[0].removeprefix("http://").split(":")
    socks = []
    for _ in range(300):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: app")
        socks.append(s)
    t0 = time.time()
    r = _post(server[0] + "/v1/completions", {"model": "toy", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    try:
        for s in socks:
            s.settimeout(max(HEADER_TIMEOUT + 5 - (time.time() - t0), 0.01))
            try:
                assert s.recv(1024) == b""  # closed by the server
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail("a connection with an unfinished request head was still open after the header timeout")
    finally:
        for s in socks:
            s.close()


def test_stalled_body_is_a_408(server):
    """A client that sends its headers but not the whole body is answered 408 after server.body_timeout (3 s
    here) and the connection does not stay open."""
    host, port = server[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
        s.settimeout(15)
        t0 = time.time()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:300]  # the JSON body may come in a later segment
        assert 2.5 < time.time() - t0 < 15


def test_request_deadline_ends_a_long_request(tmp_path):
    """server.request_timeout bounds a request from body to last byte: a generation that would take longer is
    ended with an error, and its slots are freed."""
    # 8 x 2,000 tokens: several times the deadline even where the toy decodes 8 rows at ~2,000 tok/s
    args = ["server.request_timeout=2", "engine.max_len=2048"]
    with serve_process(args, tmp_path / "server.log", dict(os.environ, JAX_PLATFORMS="cpu")) as (url, proc):
        t0 = time.time()
        body = {"model": "toy", "prompt": "x", "max_tokens": 2000, "n": 8, "logprobs": 5, "ignore_eos": True}
        r = _post(url + "/v1/completions", body, key=None)
        elapsed = time.time() - t0
        assert r.status_code >= 400 and "deadline" in r.text, (r.status_code, r.text[:300])
        assert elapsed < 6  # the deadline (2 s), not the connection backstop (deadline + 5 s)
        for _ in range(50):
            if httpx.get(url + "/health").json()["active"] == 0:
                break
            time.sleep(0.2)
        assert httpx.get(url + "/health").json()["active"] == 0


def test_unread_stream_is_cancelled(server):
    """A client that stops reading its stream: its request is cancelled (the slot frees) and its events dropped."""
    host, port = server[0].removeprefix("http://").split(":")
    before = server[2].read_text()
    body = ('{"model":"toy","prompt":"never read","max_tokens":400,"stream":true,"ignore_eos":true,'
            '"logprobs":20,"n":8}').encode()  # ~3 MB of chunks: more than the sockets' buffers hold
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        t0 = time.time()
        while "not reading" not in server[2].read_text()[len(before):]:
            assert time.time() - t0 < 60, "the unread stream was not cancelled"
            time.sleep(0.1)
        while httpx.get(server[0] + "/health").json()["active"]:
            assert time.time() - t0 < 60, "the unread stream's slot was not freed"
            time.sleep(0.05)
    finally:
        s.close()
    assert _post(server[0] + "/v1/completions", {"model": "toy", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_browser_requests_refused(server):
    """A page in a browser cannot reach the API: a POST not declared JSON (a CORS 'simple request') is a 415,
    a foreign Host header (DNS rebinding) a 400, and no CORS header lets another origin read an answer."""
    url = server[0] + "/v1/completions"
    body = b'{"model": "toy", "prompt": "hi", "max_tokens": 2}'
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, content=body, headers={**auth, "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(url, content=body, headers={**auth, "Host": "attacker.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    r = httpx.get(server[0] + "/health", headers={"Host": "attacker.example:8000"})
    assert r.status_code == 400
    port = server[0].rsplit(":", 1)[1]
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}"):
        r = httpx.post(url, content=body, headers={**auth, "Host": host, "Origin": "http://attacker.example",
                                                   "Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200, (host, r.text)
        assert not any(h.startswith("access-control-") for h in r.headers)
    r = httpx.options(url, headers={"Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"})
    assert not any(h.startswith("access-control-") for h in r.headers)


@pytest.mark.parametrize("case", ["lone_surrogate", "5000_digits", "nested_100000", "nan"])
def test_malformed_bodies_are_400s_without_traceback(server, case):
    raw = {"lone_surrogate": b'{"model": "toy", "prompt": "\\ud800", "max_tokens": 2}',
           "5000_digits": b'{"model": "toy", "prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}",
           "nested_100000": b'{"model": "toy", "prompt": "hi", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
           "nan": b'{"model": "toy", "prompt": "hi", "temperature": NaN}'}[case]
    before = len(server[2].read_bytes())
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = _post(server[0] + path, None, raw=raw)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_json"
    time.sleep(0.2)
    new = server[2].read_bytes()[before:].decode(errors="replace")
    assert "Traceback" not in new and len(new.splitlines()) == 2, new[-3000:]


def test_non_loopback_without_key_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if k != "SERVE_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "serve", "server.host=0.0.0.0", f"server.port={free_port()}"],
                       cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "allow_unauthenticated" in r.stderr, r.stderr[-2000:]


def test_full_queue_is_a_429_with_retry_after():
    class Busy:
        pending = 4
        cfg = type("C", (), {"max_slots": 2})

    a = Admission(max_queue=4, stream_buffer=8, request_timeout=10, retry_after=3)
    with pytest.raises(APIError) as e:
        a.check(Busy, 1)
    assert e.value.status == 429 and e.value.response().headers["retry-after"] == "3"
    Busy.pending = 0
    a.check(Busy, 1)
    a.open = 7  # open responses (streams not yet read to the end) count too
    with pytest.raises(APIError):
        a.check(Busy, 1)

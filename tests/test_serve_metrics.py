"""GET /metrics of `python -m serve` (the toy model): Prometheus text that prometheus_client's own parser reads,
with vLLM's metric names, whose counters and histogram counts move with traffic by exactly the amounts sent
(prompt and generated tokens, requests by finish reason and model name, the prefix cache's looked-up and hit
tokens), and whose gauges show a running request and its KV blocks while it runs."""

import os
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.formats.tokenizer import ByteTokenizer
from tests.serve_process import serve_process

openai = pytest.importorskip("openai")

KEY = "metrics-key"
TOK = ByteTokenizer()
MODEL = {"model_name": "toy"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_metrics") / "server.log"
    args = ["engine.max_slots=4", "engine.max_len=512", "engine.prefill_chunk=64", "engine.prefill_tokens=128"]
    with serve_process(args, log, dict(os.environ, JAX_PLATFORMS="cpu", SERVE_API_KEY=KEY)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def scrape(url) -> dict:
    """{(sample name, frozenset of labels): value} of every sample."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, frozenset({**MODEL, **labels}.items())), 0.0)


def delta(before, after, name, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metric_names_are_vllms(server):
    names = {name for name, _ in scrape(server)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:gpu_prefix_cache_hit_rate", "llama_jax:kv_cache_blocks_used", "llama_jax:kv_cache_blocks_total"):
        assert name in names, name


def test_counters_move_with_traffic_by_exact_amounts(server, client):
    # the greedy first token of a prompt, to end a request with it as a stop token id
    first = client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "stop here"}],
                                           max_tokens=1, temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    b = bytes(first.choices[0].logprobs.content[0].bytes)
    stop_id = b[0] if len(b) == 1 else TOK.special[b.decode()]
    msgs = [{"role": "user", "content": "stop here"}]
    long_prompt = "x" * 40  # 41 tokens with BOS: two full blocks of 16, found cached the second time
    before = scrape(server)
    client.completions.create(model="toy", prompt="Hello", max_tokens=5, extra_body={"ignore_eos": True})
    client.completions.create(model="toy", prompt=["ab", "cde"], n=2, max_tokens=3, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(model="toy", messages=msgs, max_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    for _ in range(2):
        client.completions.create(model="toy", prompt=long_prompt, max_tokens=2, extra_body={"ignore_eos": True})
    after = scrape(server)
    chat_prompt = len(TOK.encode_chat(msgs))
    prompts = [6, 3, 3, 4, 4, chat_prompt, 41, 41]
    generated = [5, 3, 3, 3, 3, 1, 2, 2]
    assert delta(before, after, "vllm:prompt_tokens_total") == sum(prompts)
    assert delta(before, after, "vllm:generation_tokens_total") == sum(generated)
    assert delta(before, after, "vllm:request_success_total", finished_reason="length") == 7
    assert delta(before, after, "vllm:request_success_total", finished_reason="stop") == 1
    assert delta(before, after, "vllm:time_to_first_token_seconds_count") == 8
    assert delta(before, after, "vllm:e2e_request_latency_seconds_count") == 8
    assert delta(before, after, "vllm:inter_token_latency_seconds_count") == sum(g - 1 for g in generated)
    assert delta(before, after, "vllm:e2e_request_latency_seconds_sum") > 0
    assert delta(before, after, "vllm:prefix_cache_queries_total") == sum(prompts)
    # the chat prompt's full blocks are cached from the first request; the long prompt's the second time
    assert delta(before, after, "vllm:prefix_cache_hits_total") == (chat_prompt - 1) // 16 * 16 + 32
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:num_requests_waiting") == 0


def test_gauges_while_a_request_runs_and_an_abort(server):
    """A long stream: running 1 and its KV blocks in use while it runs; the client leaves: finished_reason
    "abort", and the gauges go back to 0."""
    before = scrape(server)
    body = {"model": "toy", "prompt": "y" * 100, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        lines = r.iter_lines()
        next(x for x in lines if x.startswith("data: {"))
        during = scrape(server)
    assert value(during, "vllm:num_requests_running") == 1
    used, total = value(during, "llama_jax:kv_cache_blocks_used"), value(during, "llama_jax:kv_cache_blocks_total")
    assert used >= -(-101 // 16) and total == 4 * 512 // 16
    assert value(during, "vllm:kv_cache_usage_perc") == pytest.approx(used / total)
    deadline = time.time() + 30
    while value(after := scrape(server), "vllm:num_requests_running") and time.time() < deadline:
        time.sleep(0.1)
    assert delta(before, after, "vllm:request_success_total", finished_reason="abort") == 1
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "llama_jax:kv_cache_blocks_used") == 0

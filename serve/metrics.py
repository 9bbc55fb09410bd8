"""Prometheus metrics of the server (GET /metrics, text exposition format), with vLLM's names where vLLM has
the metric, so its dashboards and alerts carry over:

    vllm:num_requests_running, vllm:num_requests_waiting                  gauges (read from the engine at scrape)
    vllm:kv_cache_usage_perc (and its older name vllm:gpu_cache_usage_perc) KV pool blocks used, fraction 0-1
    vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total          prompt tokens looked up / found cached
    vllm:gpu_prefix_cache_hit_rate                                          hits / queries since start (vLLM 0.x)
    vllm:prompt_tokens_total, vllm:generation_tokens_total                 per finished request, by model_name
    vllm:request_success_total{model_name, finished_reason}                stop | length | abort | error
    vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
    vllm:e2e_request_latency_seconds                                        histograms, by model_name

and ours where vLLM has none: llama_jax:kv_cache_blocks_used, llama_jax:kv_cache_blocks_total.

`model_name` is the name a request asked for (the base or an adapter), so requests are counted per adapter.
A request is one choice (n > 1 makes n, each with its prompt, as vLLM counts them). Times are taken on the
engine thread as the events are made: TTFT from submission to the first token, inter-token latency between
a request's consecutive tokens (tokens that come in one event, e.g. several per decode call, count 0 after
the first), end-to-end from submission to the last event.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serve.events import Event

FINISHED = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}
# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class EngineCollector:
    """The gauges and the prefix cache's counters, read from the engine when scraped."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        e, labels = self.engine, [self.model_name]
        blocks = e.scheduler.blocks
        used, total = blocks.used, blocks.usable
        values = [
            (GaugeMetricFamily, "vllm:num_requests_running", "Requests in the running batch.", e.active),
            (GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting for a slot.", e.pending),
            (GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV pool blocks in use (fraction).", used / total),
            (GaugeMetricFamily, "vllm:gpu_cache_usage_perc", "KV pool blocks in use (fraction; vLLM 0.x name).",
             used / total),
            (GaugeMetricFamily, "llama_jax:kv_cache_blocks_used", "KV pool blocks in use.", used),
            (GaugeMetricFamily, "llama_jax:kv_cache_blocks_total", "KV pool blocks (the scratch block excluded).",
             total),
            (GaugeMetricFamily, "vllm:gpu_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked "
             "up, since start.", blocks.hit_tokens / blocks.query_tokens if blocks.query_tokens else 0.0),
            (CounterMetricFamily, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             blocks.query_tokens),
            (CounterMetricFamily, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             blocks.hit_tokens),
        ]
        for kind, name, doc, value in values:
            m = kind(name, doc, labels=["model_name"])
            m.add_metric(labels, value)
            yield m


class Metrics:
    """The metrics of one server, in a registry of its own (several apps in one process do not clash)."""

    def __init__(self, engine, model_name: str):
        self.registry = r = CollectorRegistry()
        r.register(EngineCollector(engine, model_name))
        by_model = ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", by_model,
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished requests.", by_model,
                                         registry=r)
        self.requests = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to the first token.", by_model,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between a request's consecutive tokens.",
                             by_model, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from submission to the last token.", by_model,
                             buckets=E2E_BUCKETS, registry=r)

    def tracker(self, model_name: str) -> Callable[[], Callable[[Event], None]]:
        """For serve/streaming.submit: a new callback per request (choice), fed its events on the engine thread."""
        ttft, itl, e2e = (h.labels(model_name) for h in (self.ttft, self.itl, self.e2e))

        def new() -> Callable[[Event], None]:
            start = time.perf_counter()
            last = [None]

            def seen(ev: Event):
                now = time.perf_counter()
                if ev.token_ids:
                    if last[0] is None:
                        ttft.observe(now - start)
                    else:
                        itl.observe(now - last[0])
                    for _ in ev.token_ids[1:]:
                        itl.observe(0.0)
                    last[0] = now
                if ev.finished:
                    e2e.observe(now - start)
                    self.prompt_tokens.labels(model_name).inc(ev.prompt_tokens)
                    self.generation_tokens.labels(model_name).inc(ev.completion_tokens)
                    self.requests.labels(model_name, FINISHED.get(ev.finish_reason, ev.finish_reason)).inc()

            return seen

        return new

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

"""The serving job's config: one frozen dataclass per concern. YAML in configs/ only sets values;
`key=value` overrides on the command line (`python -m serve engine.max_slots=16`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from model.job import resolve, settings

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class ModelSpec(resolve.ModelSpec):
    """The shared model spec (model/job/resolve.py: preset, checkpoint, dtype, quant, attention, …) plus:"""

    adapter: str | None = None  # LoRA: a PEFT directory or this project's checkpoint / training run
    adapter_mode: str = "auto"  # merge (W + s·A·B into the kernel) | dynamic (on the fly) | auto
    tokenizer: str | None = None  # "bytes", a tokenizer file or directory; default: the checkpoint's
    name: str | None = None  # the model id clients send; default: the checkpoint's directory name or preset
    served_names: tuple[str, ...] = ()  # names of the base model clients may send (the first is the id shown)
    # LoRA adapters served beside the base, chosen per request by `model` (vLLM's --lora-modules):
    # name -> PEFT directory, this project's checkpoint or a training run; `{sql: /path/a, chat: /path/b}`
    lora_modules: dict[str, str] = dataclasses.field(default_factory=dict)
    seed: int = 0  # random weights of a preset
    scan_layers: bool = True

    def __post_init__(self):
        if self.adapter_mode not in ("auto", "merge", "dynamic"):
            raise ValueError(f"model.adapter_mode={self.adapter_mode!r}: expected auto, merge or dynamic")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8  # requests running together (sequences in one step)
    max_len: int = 2048  # the longest request: prompt + completion tokens
    prefill_chunk: int = 0  # prompt tokens of one request per step (longer prompts take several), grown to
    # fill the step's bucket (serve/scheduler.py): smaller bounds decoding requests' wait behind a long prompt;
    # 0 = auto (`resolved`): 32 on CPU, 256 on TPU and GPU
    prefill_tokens: int = 512  # token budget of one step: every running request's next token plus prompt chunks
    kv_dtype: str = "auto"  # auto (the compute dtype) | bfloat16 | float32 | float16 | int8
    block_size: int = 0  # tokens per block of the KV pool; 0 = auto (`resolved`): 16 on CPU and GPU, on TPU
    # max_len in 16 blocks of 16-256 tokens (16 beyond 8,192)
    kv_tokens: int = 0  # tokens the KV pool holds (all requests together); 0: max_slots * max_len
    prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before (serve/blocks.py)
    min_kv_bucket: int = 128  # the smallest attention-length bucket (pages per sequence x block_size)
    warmup: bool = False  # compile every decode bucket before serving
    seed: int = 0  # seeds requests that bring none
    layout: str = "auto"  # scan (stacked layers) | unrolled (per-layer weights) | auto: unrolled on one CPU
    decode_steps: int = 0  # tokens per decode call while no prompt waits, for up to 4 decoding requests (half
    # as many beyond: serve/scheduler.call_steps); 0 = auto: 4 on one CPU device, else 1
    # (spreads the host's per-call cost; unrolled, so the decode step's compile time grows with it)
    cpu_kernels: bool = True  # one CPU device: products and cache attention with model/network/backends/cpu_*.cc
    max_loras: int = 4  # LoRA adapter slots (with model.lora_modules or server.runtime_lora)
    max_lora_rank: int = 16  # the largest adapter rank those slots take (smaller ranks are zero-padded)

    def __post_init__(self):
        for name in ("max_slots", "max_len", "prefill_tokens", "min_kv_bucket", "max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prefill_chunk", "block_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"engine.{name} must be >= 1 (0: auto), got {getattr(self, name)}")
        if self.kv_tokens < 0:
            raise ValueError(f"engine.kv_tokens must be >= 0 (0: max_slots * max_len), got {self.kv_tokens}")
        if self.decode_steps < 0:
            raise ValueError(f"engine.decode_steps must be >= 0 (0: auto), got {self.decode_steps}")
        if self.layout not in ("auto", "scan", "unrolled"):
            raise ValueError(f"engine.layout={self.layout!r}: expected auto, scan or unrolled")
        if self.prefill_chunk and self.prefill_tokens < self.prefill_chunk:
            raise ValueError(f"engine.prefill_tokens ({self.prefill_tokens}) must be >= engine.prefill_chunk "
                             f"({self.prefill_chunk})")
        if self.prefill_tokens <= self.max_slots:
            raise ValueError(f"engine.prefill_tokens ({self.prefill_tokens}) must exceed engine.max_slots "
                             f"({self.max_slots}): a step holds every running request's next token")

    def resolved(self, platform: str) -> EngineConfig:
        """This config with its automatic (0) values chosen for `platform` (cpu, gpu or tpu).

        block_size: 16 on CPU, first or tied on every measure of two runs of bench/block_size.py against 8 to
        128 (128 up to 15% behind at 64 rows), and on GPU (vLLM's CUDA default; the XLA reference there). On TPU, vLLM-TPU's rule for JAX's ragged
        paged attention kernel: max_len in about 16 pages, 16 to 256 tokens each (the kernel keeps a
        sequence's page indices in scalar registers, and more pages spill them), 16 beyond 8,192 tokens
        (the kernel's KV block of pages would outgrow its vector memory).
        prefill_chunk: 32 on CPU, where a prompt token costs what a decode token does: there 15 decoders wait
        under 3x their interval behind a long prompt, which itself finishes within 1.5x of its prefill alone
        (BENCHMARKS.md, issue 12; 128 tokens made the wait 6-8x); 256 on TPU and GPU, where a step's
        arithmetic is cheap beside reading the weights. Never more than prefill_tokens."""
        block, chunk = self.block_size, self.prefill_chunk
        if not block:
            block = 16
            if platform == "tpu" and self.max_len <= 8192:
                block = min(max((1 << (self.max_len - 1).bit_length()) // 16, 16), 256)
        if not chunk:
            chunk = min(32 if platform == "cpu" else 256, self.prefill_tokens)
        return dataclasses.replace(self, block_size=block, prefill_chunk=chunk)

    @property
    def num_blocks(self) -> int:
        """Blocks of the KV pool, the scratch block included (of a resolved config)."""
        if not self.block_size:
            raise ValueError("engine.block_size is 0 (auto): resolve the config for a platform first")
        return -(-(self.kv_tokens or self.max_slots * self.max_len) // self.block_size) + 1


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    # Bearer token clients must send; also read from $SERVE_API_KEY. An empty key is an error, not "no key".
    api_key: str | None = dataclasses.field(default=None, metadata={"non_empty": True})
    max_prompt_tokens: int | None = None  # default: engine.max_len - 1
    max_tokens: int | None = None  # the largest max_tokens a request may ask for; default: engine.max_len - 1
    max_body_bytes: int = 1 << 20  # request body limit
    max_n: int = 8  # choices per request (n × prompts)
    max_queue: int = 1024  # waiting requests before 429 (open responses count: a stalled stream holds its place)
    log_level: str = "info"
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted besides the loopback ones ("*": any)
    allow_unauthenticated: bool = False  # bound to a non-loopback address without an API key: start anyway
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers
    body_timeout: float = 30.0  # seconds a request may take to send its body
    request_timeout: float = 600.0  # seconds one request may run, body to last byte of the answer
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_header_bytes: int = 16384  # an incomplete request head larger than this is refused
    max_connections: int = 1024  # open connections and requests; beyond it uvicorn answers 503
    stream_buffer: int = 256  # events queued for one request that its client has not taken; beyond: cancelled
    max_stop_chars: int = 256  # the longest stop string (characters)
    max_stop: int = 64  # stop strings per request (lm-evaluation-harness sends more than OpenAI's 4)
    retry_after: int = 1  # seconds, in the Retry-After header of a 429
    runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's opt-in)

    def __post_init__(self):
        for name in ("header_timeout", "body_timeout", "request_timeout", "keep_alive_timeout", "max_header_bytes",
                     "max_connections", "stream_buffer", "max_stop_chars", "max_stop", "max_n", "max_queue", "max_body_bytes"):
            v = getattr(self, name)
            if not v > 0 or v == float("inf"):
                raise ValueError(f"server.{name} must be a finite number > 0, got {v}")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model: ModelSpec = ModelSpec()
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = ServerConfig()
    mesh: str = "tensor=-1"  # axis=size pairs over the devices used (sharding/mesh.py)
    devices: int | None = None  # how many local devices to use; default all
    topology: str | None = None  # --compile-only for this topology (v6e-8, h100x8, …) instead of local devices


def load_config(path: str | None, overrides: list[str] = ()) -> ServeConfig:
    """`path` None is the embedded default, configs/serve_toy.yaml."""
    return settings.load(ServeConfig, path or "serve_toy", overrides, search_dir=CONFIG_DIR)

"""Tests run on CPU with 8 forced host devices, so every sharding path runs without an accelerator."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests import hf_reference  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: a random-weight transformers Llama saved as safetensors; returns (dir, torch model)."""
    cache = {}

    def make(**kw):
        key = repr(sorted(kw.items()))
        if key not in cache:
            path = tmp_path_factory.mktemp("hf")
            cache[key] = (path, hf_reference.save_random_llama(path, **kw))
        return cache[key]

    return make

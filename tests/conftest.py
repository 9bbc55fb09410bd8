"""Tests run on CPU with 8 forced host devices, so every sharding path runs without an accelerator.

Compiled programs are kept in a persistent XLA cache (~/.cache/llama-jax-tests/xla, or
$LLAMA_JAX_TEST_XLA_CACHE), set through the environment so the `python -m train|serve|convert`
subprocesses of the tests share it. With LLAMA_JAX_NO_SKIPS=1 (.ci/run sets it where libtpu and a C++
compiler are installed) a skipped test is a failure: a broken API must not pass as a skip."""

import fcntl
import os
import tempfile
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
XLA_CACHE = os.environ.get("LLAMA_JAX_TEST_XLA_CACHE",
                           str(Path.home() / ".cache" / "llama-jax-tests" / "xla"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # CPU compiles are short: cache all
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))  # least recently used entries go first
# No source locations in lowered programs: a Pallas kernel's serialized body carries its file's path, so two
# checkouts (CI's fresh clone) would not share sharding/aot_compile.py's entries for the TPU programs.
os.environ.setdefault("JAX_TRACEBACK_IN_LOCATIONS_LIMIT", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests import hf_reference  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
NO_SKIPS = os.environ.get("LLAMA_JAX_NO_SKIPS") == "1"


def _fail_skip(report):
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped, but LLAMA_JAX_NO_SKIPS=1 (libtpu and a C++ compiler are installed, "
                           f"so every test must run): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())


# Tests that must not share the 2 CPU cores with another pytest-xdist worker: two-process jobs joined by gloo
# (its rendezvous gives up when one process reaches a collective 30 s after the other) and the server tests
# that time requests. Under xdist they hold an exclusive lock; every other test holds it shared.
SERIAL = ("tests/test_multihost.py::", "tests/test_multihost_convert.py::", "tests/test_train_multihost.py::",
          "tests/test_preemption.py::test_sigterm_to_one_process_stops_both_at_one_step",
          "tests/test_serve_api.py::test_64_concurrent_streams_memory_flat",
          "tests/test_serve_api.py::test_request_deadline_ends_a_long_request")


# The files that run alone, then the slowest (about 20-40 s each here), first: pytest-xdist's loadfile hands
# out files by their number of tests unless told to keep the collection order, and a slow file of few tests
# handed out last kept one worker busy for a minute after the other had finished.
SLOW_FIRST = ("tests/test_preemption.py", "tests/test_train_multihost.py", "tests/test_multihost.py",
              "tests/test_multihost_convert.py", "tests/test_first_run.py", "tests/test_gcs.py", "tests/test_train.py",
              "tests/test_serve_api.py", "tests/test_serve_lora.py", "tests/test_serve_engine.py",
              "tests/test_lm_eval.py", "tests/test_paged_kernels.py", "tests/test_serve_paged.py", "tests/test_convert.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # xdist: hand out the files in the order below


def pytest_collection_modifyitems(items):
    rank = {f: i for i, f in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))  # stable: the rest as before


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A writer-preferring readers-writer lock over the xdist workers (a no-op without xdist), held from a
    test's setup (module fixtures included) to its teardown: a serial test takes the turnstile, so no new
    test starts, then waits for the running ones and runs alone."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        yield
        return
    base = Path(tempfile.gettempdir()) / f"llama-jax-tests-{run}"
    serial = item.nodeid.startswith(SERIAL)
    with open(f"{base}.turnstile", "a") as turnstile, open(f"{base}.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


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

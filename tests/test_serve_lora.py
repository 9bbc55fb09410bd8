"""Several LoRA adapters served at once (serve/adapters.py, model/network/lora.py `slot_delta`): requests for
different adapters and for the base decode in the same step, each getting what transformers + PEFT give for
its own adapter; on one CPU device (unrolled layout, CPU kernels), sharded over 8 devices, and over an int8
base; then the HTTP surface (vLLM's conventions) with the official `openai` client against `python -m serve`.

The two adapters differ in rank (8 and 4), targets and scaling (rsLoRA); their B are non-zero. Tolerances:
fp32 on both sides; greedy tokens equal; a token's log-probability mixed vs alone to 1e-4."""

import concurrent.futures
import copy
import json
import os

import jax
import numpy as np
import pytest

from model.formats.tokenizer import ByteTokenizer
from model.network.lora import LoraSlots
from serve.adapters import LoraRequestError
from serve.config import EngineConfig, ModelSpec
from serve.engine import Engine
from serve.sampling import SamplingParams
from sharding.mesh import make_mesh
from tests import hf_reference
from tests.serve_process import serve_process

peft = pytest.importorskip("peft")

N = 10  # generated tokens per request
CFG = EngineConfig(max_slots=4, max_len=128, prefill_chunk=16, prefill_tokens=32, min_kv_bucket=128, max_loras=3,
                   max_lora_rank=8)
ADAPTERS = {  # name -> PEFT LoraConfig arguments
    "sql": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    "chat": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "gate_proj", "up_proj", "q_proj"]),
    "extra": dict(r=2, lora_alpha=4, target_modules=["up_proj", "v_proj"]),
}


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 256, n)] for n in lengths]


PROMPTS = prompts([5, 21, 9, 13], seed=3)  # 21 > prefill_chunk: a prompt in two steps


@pytest.fixture(scope="module")
def hf(hf_checkpoint):
    return hf_checkpoint()


def greedy(torch_model, prompt, n=N):
    return [int(t) for t in hf_reference.greedy(torch_model, np.array([prompt]), n)[0]]


@pytest.fixture(scope="module")
def adapters(hf, tmp_path_factory):
    """{name: (PEFT directory, {prompt index: transformers+PEFT greedy tokens})}, and "base"."""
    import torch

    out = {"base": (None, {i: greedy(hf[1], p) for i, p in enumerate(PROMPTS)})}
    for k, (name, kw) in enumerate(ADAPTERS.items()):
        pm = peft.get_peft_model(copy.deepcopy(hf[1]), peft.LoraConfig(lora_dropout=0.0, **kw))
        torch.manual_seed(10 + k)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.08)
        d = tmp_path_factory.mktemp(f"peft_{name}")
        pm.save_pretrained(d)
        out[name] = (d, {i: greedy(pm, p) for i, p in enumerate(PROMPTS)})
    for name in ADAPTERS:  # each adapter changes the greedy output of some prompt
        assert out[name][1] != out["base"][1], name
    return out


def run(engine: Engine, jobs, logprobs=None):
    """[(prompt, adapter name or None)] submitted together, stepped to the end: [(tokens, logprobs)]."""
    res = [dict(ids=[], lps=[], done=False) for _ in jobs]

    def emit(i):
        def f(ev):
            res[i]["ids"] += ev.token_ids
            res[i]["lps"] += [x.logprob for x in ev.logprobs or []]
            res[i]["done"] |= ev.finished
            assert ev.error is None, ev.error
        return f

    sp = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    for i, (p, a) in enumerate(jobs):
        engine.submit(p, sp, emit(i), adapter=a)
    while not all(r["done"] for r in res):
        engine.step()
    return [(r["ids"], np.array(r["lps"])) for r in res]


def rows_seen(engine: Engine) -> list[set[int]]:
    """Records, per step from now on, which adapter rows its tokens used."""
    seen, plan = [], engine.scheduler.plan

    def spy(reqs, counts, steps=1):
        p = plan(reqs, counts, steps)
        seen.append(set(np.asarray(p.batch.adapters)[:sum(counts)].tolist()))
        return p

    engine.scheduler.plan = spy
    return seen


def slot_engine(hf, mesh, adapters, quant=None) -> Engine:
    from serve.weights import build

    m, tok, _ = build(ModelSpec(checkpoint=str(hf[0]), dtype="float32", tokenizer="bytes", quant=quant), mesh,
                      slots=LoraSlots(rank=CFG.max_lora_rank, slots=CFG.max_loras, dtype="float32"))
    e = Engine(m, tok, CFG)
    for name in ("sql", "chat"):
        e.load_adapter(name, str(adapters[name][0]))
    return e


MIX = [(PROMPTS[0], None), (PROMPTS[1], "sql"), (PROMPTS[2], "chat"), (PROMPTS[3], "sql")]


@pytest.mark.parametrize("mesh_spec", [{}, {"tensor": 2, "fsdp": 4}], ids=["one_cpu", "tp8"])
def test_mixed_adapters_in_one_step_equal_peft_and_each_alone(hf, adapters, mesh_spec):
    """Base, sql and chat rows in the same steps (prefill and decode): each request's greedy tokens are
    transformers+PEFT's for its own adapter, and each token's log-probability is the one it has alone."""
    devices = jax.devices()[:1] if not mesh_spec else jax.devices()[:8]
    e = slot_engine(hf, make_mesh(mesh_spec, devices), adapters)
    assert e.cpu_kernels == (not mesh_spec)
    seen = rows_seen(e)
    mixed = run(e, MIX, logprobs=1)
    rows = {0, e.adapters.by_name["sql"].row, e.adapters.by_name["chat"].row}
    assert rows <= seen[0] and any(rows <= s and len(s) > 1 for s in seen[1:])  # one prefill, later decode steps
    for i, ((p, a), (ids, lps)) in enumerate(zip(MIX, mixed)):
        assert ids == adapters[a or "base"][1][PROMPTS.index(p)], (i, a)
        (alone_ids, alone_lps), = run(e, [(p, a)], logprobs=1)
        assert alone_ids == ids
        np.testing.assert_allclose(lps, alone_lps, rtol=0, atol=1e-4)


@pytest.mark.parametrize("quant", ["int8"])  # "int4-g32" passes too (64 s more on 2 cores)
def test_quantized_base_mixed_equals_alone(hf, adapters, quant):
    """Over an int8 (or int4) base: each adapter's tokens mixed with the others equal its tokens alone, and
    an adapter changes the output (the oracle differs from PEFT's by the quantization: self-consistency)."""
    e = slot_engine(hf, make_mesh({}, jax.devices()[:1]), adapters, quant=quant)
    mixed = run(e, MIX, logprobs=1)
    alone = [run(e, [job], logprobs=1)[0] for job in MIX]
    for (ids, lps), (a_ids, a_lps) in zip(mixed, alone):
        assert ids == a_ids
        np.testing.assert_allclose(lps, a_lps, rtol=0, atol=1e-4)
    (base_sql_prompt,) = run(e, [(PROMPTS[1], None)])
    assert base_sql_prompt[0] != mixed[1][0]


def test_load_errors_change_nothing_and_unload_drains(hf, adapters, tmp_path):
    e = slot_engine(hf, make_mesh({}, jax.devices()[:1]), adapters)
    before = [np.asarray(x).copy() for x in e.device_step.weight_leaves]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                         "target_modules": ["q_proj"]}))
    big = tmp_path / "big"
    pm = peft.get_peft_model(copy.deepcopy(hf[1]), peft.LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"]))
    pm.save_pretrained(big)
    cases = [("x", str(tmp_path / "missing"), "invalid_lora_path"), ("x", str(bad), "invalid_lora_path"),
             ("x", str(big), "lora_rank_too_large"), ("sql", str(adapters["chat"][0]), "lora_exists")]
    for name, path, code in cases:
        with pytest.raises(LoraRequestError) as err:
            e.load_adapter(name, path)
        assert err.value.code == code and 400 <= err.value.status < 500
    e.load_adapter("extra", str(adapters["extra"][0]))
    with pytest.raises(LoraRequestError) as err:  # 3 slots, 3 loaded
        e.load_adapter("x", str(adapters["extra"][0]))
    assert err.value.code == "no_free_lora_slot"
    assert sorted(e.adapters.names) == ["chat", "extra", "sql"]
    e.unload_adapter("extra")
    after = [np.asarray(x) for x in e.device_step.weight_leaves]
    # the failed loads wrote nothing: only the "extra" slot differs from before
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not np.array_equal(a, b)]
    assert changed and all(before[i].ndim >= 3 for i in changed)
    # unload while a request uses it: the request finishes with its adapter; then the slot is free
    got = {}
    sp = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    e.submit(PROMPTS[1], sp, lambda ev: got.setdefault("ids", []).extend(ev.token_ids), adapter="sql")
    e.step()
    sql_row = e.adapters.by_name["sql"].row
    e.unload_adapter("sql")
    with pytest.raises(LoraRequestError):
        e.submit(PROMPTS[1], sp, lambda ev: None, adapter="sql")
    assert e.adapters.by_name.keys() == {"chat"} and len(e.adapters.free) == 1  # sql's slot still in use
    while e.active or e.pending:
        e.step()
    assert got["ids"] == adapters["sql"][1][1] and len(e.adapters.free) == 2
    # another adapter in sql's old slot: a new prefix-cache identity (sql's cached prompt blocks are not
    # reused), its own tokens
    e.load_adapter("extra", str(adapters["extra"][0]))  # takes the other free slot
    a = e.load_adapter("sql2", str(adapters["chat"][0]))
    assert a.row == sql_row
    assert run(e, [(PROMPTS[1], "sql2")])[0][0] == adapters["chat"][1][1]


# ---------------------------------------------------------------------------------------------
# HTTP: `python -m serve` with model.lora_modules and server.runtime_lora, the official openai client

openai = pytest.importorskip("openai")
KEY = "lora-key"
TOK = ByteTokenizer()


def text_of(ids) -> str:
    return b"".join(TOK.token_bytes(int(i)) for i in ids).decode(errors="replace")


@pytest.fixture(scope="module")
def other_base_adapter(hf_checkpoint, tmp_path_factory):
    """A PEFT adapter of a model with other shapes (dim 32)."""
    _, other = hf_checkpoint(dim=32, mlp=64, heads=2, kv_heads=1, head_dim=16)
    pm = peft.get_peft_model(copy.deepcopy(other), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    d = tmp_path_factory.mktemp("peft_other")
    pm.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def server(hf, adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_lora") / "server.log"
    modules = "{" + ", ".join(f"{n}: {adapters[n][0]}" for n in ("sql", "chat")) + "}"
    args = [f"model.checkpoint={hf[0]}", "model.dtype=float32", "model.tokenizer=bytes", "model.served_names=ref,base",
            f"model.lora_modules={modules}", "server.runtime_lora=true", "engine.max_slots=8", "engine.max_len=128",
            "engine.prefill_chunk=16", "engine.prefill_tokens=64", "engine.max_loras=3", "engine.max_lora_rank=8"]
    with serve_process(args, log, dict(os.environ, SERVE_API_KEY=KEY), start_timeout=240) as (url, _):
        yield url, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=240)


def complete(client, model_name, prompt, stream=False) -> str:
    kw = dict(model=model_name, prompt=prompt, max_tokens=N, temperature=0,
              extra_body={"ignore_eos": True, "skip_special_tokens": False})  # ids >= 256: the tokenizer's specials
    if not stream:
        return client.completions.create(**kw).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)


def post(url, path, body):
    import httpx

    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=240)


def test_models_lists_base_and_adapters(server):
    url, client = server
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == ["ref", "sql", "chat"]
    assert cards["sql"].parent == "ref" and cards["chat"].parent == "ref" and cards["ref"].parent is None
    assert all(c.object == "model" and c.owned_by and c.root for c in cards.values())
    assert client.models.retrieve("chat").parent == "ref"
    with pytest.raises(openai.NotFoundError) as err:
        complete(client, "nope", [1, 2, 3])
    assert err.value.body["code"] == "model_not_found"


def test_concurrent_adapters_and_base_equal_peft(server, adapters):
    """8 streams each for the base (under both its names), sql and chat, all at once (they share steps):
    every answer is transformers+PEFT's greedy text for its own adapter."""
    _, client = server
    jobs = [(name if name != "ref" or k < 4 else "base", k % len(PROMPTS), bool(k % 2))
            for name in ("ref", "sql", "chat") for k in range(8)]

    def one(job):
        name, i, stream = job
        return complete(client, name, PROMPTS[i], stream)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    for (name, i, _), text in zip(jobs, got):
        want = adapters["base" if name in ("ref", "base") else name][1][i]
        assert text == text_of(want), (name, i)


def test_runtime_load_use_unload(server, adapters):
    url, client = server
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(adapters["extra"][0])})
    assert r.status_code == 200, r.text
    assert [m.id for m in client.models.list().data] == ["ref", "sql", "chat", "extra"]
    assert complete(client, "extra", PROMPTS[2]) == text_of(adapters["extra"][1][2])
    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        complete(client, "extra", PROMPTS[2])
    assert [m.id for m in client.models.list().data] == ["ref", "sql", "chat"]
    assert complete(client, "sql", PROMPTS[1]) == text_of(adapters["sql"][1][1])
    assert complete(client, "ref", PROMPTS[1]) == text_of(adapters["base"][1][1])


def test_bad_loads_are_4xx_and_change_nothing(server, adapters, other_base_adapter, tmp_path, hf):
    url, client = server
    big = tmp_path / "big"
    peft.get_peft_model(copy.deepcopy(hf[1]), peft.LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"])) \
        .save_pretrained(big)
    cases = [({"lora_name": "x", "lora_path": str(tmp_path / "missing")}, 400, "invalid_lora_path"),
             ({"lora_name": "x", "lora_path": str(other_base_adapter)}, 400, "invalid_lora_path"),
             ({"lora_name": "x", "lora_path": str(big)}, 400, "lora_rank_too_large"),
             ({"lora_name": "sql", "lora_path": str(adapters["extra"][0])}, 400, "lora_exists"),
             ({"lora_name": "ref", "lora_path": str(adapters["extra"][0])}, 400, "lora_exists"),
             ({"lora_name": "x"}, 400, "invalid_value")]
    for body, status, code in cases:
        r = post(url, "/v1/load_lora_adapter", body)
        assert r.status_code == status and r.json()["error"]["code"] == code, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "lora_not_found"
    assert [m.id for m in client.models.list().data] == ["ref", "sql", "chat"]
    assert complete(client, "chat", PROMPTS[0]) == text_of(adapters["chat"][1][0])


def test_runtime_routes_404_unless_enabled(hf):
    """server.runtime_lora=false (the default): the load/unload routes do not exist."""
    from fastapi.testclient import TestClient

    from serve.config import ServerConfig
    from serve.server import create_app
    from serve.weights import build

    m, tok, name = build(ModelSpec(checkpoint=str(hf[0]), dtype="float32", tokenizer="bytes"),
                         make_mesh({}, jax.devices()[:1]))
    app = create_app(Engine(m, tok, CFG), tok, name, ServerConfig())
    with TestClient(app.app if hasattr(app, "app") else app, base_url="http://127.0.0.1") as c:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            r = c.post(path, json={"lora_name": "x", "lora_path": "/x"})
            assert r.status_code == 404
        assert [d["id"] for d in c.get("/v1/models").json()["data"]] == [name]


def test_lora_modules_from_yaml_and_command_line(tmp_path):
    """model.lora_modules is a mapping: a YAML mapping, or `{name: path, ...}` on the command line; anything
    else is an error naming the key; more modules than engine.max_loras is refused before any weight loads."""
    from model.job.settings import ConfigError
    from serve.config import load_config
    from serve.weights import adapter_slots

    cfg = load_config(None, ["model.lora_modules={sql: /path/a, chat: /path/b}", "model.served_names=ref,base"])
    assert cfg.model.lora_modules == {"sql": "/path/a", "chat": "/path/b"} and cfg.model.served_names == ("ref", "base")
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  lora_modules:\n    sql: /p/a\n    x: /p/b\n")
    assert load_config(str(f)).model.lora_modules == {"sql": "/p/a", "x": "/p/b"}
    with pytest.raises(ConfigError, match="lora_modules"):
        load_config(None, ["model.lora_modules=/just/a/path"])
    slots = adapter_slots(load_config(None, ["model.lora_modules={a: /x}", "engine.max_loras=2",
                                             "engine.max_lora_rank=32", "model.dtype=bfloat16"]))
    assert (slots.slots, slots.rank, slots.dtype) == (2, 32, "bfloat16")
    assert adapter_slots(load_config(None, [])) is None
    assert adapter_slots(load_config(None, ["server.runtime_lora=true"])).slots == 4
    with pytest.raises(ValueError, match="max_loras"):
        adapter_slots(load_config(None, ["model.lora_modules={a: /x, b: /y}", "engine.max_loras=1"]))
    with pytest.raises(ValueError, match="name of the base"):
        adapter_slots(load_config(None, ["model.lora_modules={toy: /x}"]))

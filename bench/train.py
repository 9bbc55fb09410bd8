"""LoRA training throughput against Hugging Face transformers + PEFT on the same CPU, same shapes.

    python bench/train.py [--steps 5] [--dtype float32] [--remat none] [--repeat 1] [--layers 8]

Shape (shared/reference/anchors.md): dim 1024, 8 layers, 16 heads, 4 KV heads, ffn 3584, vocab 32768,
LoRA r=16 (alpha 32) on q,k,v,o,gate,up,down, batch 4 x seq 512. Prints one JSON line per
measurement: the CPU matmul rate (XLA, 2048^3), our step and the peer's step (tokens/s and achieved
model FLOP/s, counted the same way for both: forward + activation gradients of the frozen base,
plus attention; adapter FLOPs are negligible); for a 16-bit dtype also the 2048³ matmul rate of XLA and
of PyTorch in that dtype. `--repeat N` measures ours and the peer N times,
alternating, and prints each ratio (the machine is shared: compare within a run). `--layers` cuts the
depth for a quick check under load (the bench shape is 8).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import model  # noqa: E402
from model.network.lora import LoraConfig  # noqa: E402
from sharding.mesh import single_device_mesh  # noqa: E402
from train.config import OptimizerConfig  # noqa: E402
from train.program import StepShape, TrainProgram  # noqa: E402

SHAPE = dict(vocab_size=32768, dim=1024, num_layers=8, num_heads=16, num_kv_heads=4, head_dim=64, mlp_dim=3584)
B, T, R = 4, 512, 16
LAYERS = SHAPE["num_layers"]


def matmul_rate(dtype: str = "float32", torch_peer: bool = False) -> float:
    """Best of 5 of a 2048³ matmul: XLA's, or (torch_peer) PyTorch's, whose bf16 products use AMX where the
    CPU has it and XLA:CPU's do not."""
    if torch_peer:
        import torch
        a = torch.ones(2048, 2048, dtype=getattr(torch, dtype))
        f = lambda: a @ a  # noqa: E731
    else:
        x, g = jnp.ones((2048, 2048), dtype), jax.jit(lambda x: x @ x)
        f = lambda: g(x).block_until_ready()  # noqa: E731
    f()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        f()
        best = max(best, 2 * 2048 ** 3 / (time.perf_counter() - t0))
    return best


def ours(steps: int, dtype: str, remat: str) -> float:
    cfg = model.LlamaConfig(**{**SHAPE, "num_layers": LAYERS}, param_dtype=dtype, compute_dtype=dtype, remat=remat,
                            lora=LoraConfig(rank=R, alpha=2 * R))
    mesh = single_device_mesh()
    m = model.init(cfg, mesh=mesh)
    program = TrainProgram.build(cfg, m.graphdef, m.state, mesh, StepShape(B, T),
                                 OptimizerConfig(learning_rate=1e-4, warmup_steps=0), 1000)
    trainable, frozen = program.split(m.state)
    state, step = program.init_state(trainable), program.step
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, SHAPE["vocab_size"], (B, T + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((B, T), np.float32),
             "segments": np.ones((B, T), np.int32), "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))}
    state, metrics = step(state, frozen, batch)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return B * T / float(np.median(times))


def peer(steps: int, dtype: str) -> float:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    hf_cfg = transformers.LlamaConfig(
        vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["dim"], intermediate_size=SHAPE["mlp_dim"],
        num_hidden_layers=LAYERS, num_attention_heads=SHAPE["num_heads"],
        num_key_value_heads=SHAPE["num_kv_heads"], head_dim=SHAPE["head_dim"], tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(getattr(torch, dtype))
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    hf.train()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, SHAPE["vocab_size"], (B, T + 1))

    def one():
        out = hf(input_ids=tokens[:, :-1], labels=tokens[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in hf.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return B * T / float(np.median(times))


def main():
    global LAYERS
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--layers", type=int, default=SHAPE["num_layers"])
    args = ap.parse_args()
    LAYERS = args.layers
    cfg = model.LlamaConfig(**{**SHAPE, "num_layers": LAYERS})
    flops_tok = cfg.train_flops_per_token(T, lora_only=True)
    rate = matmul_rate()
    print(json.dumps({"bench": "cpu_matmul_2048", "gflop_s": round(rate / 1e9, 1)}), flush=True)
    if args.dtype != "float32":
        for impl, peer_rate in (("xla", False), ("torch", True)):
            print(json.dumps({"bench": "cpu_matmul_2048", "impl": impl, "dtype": args.dtype,
                              "gflop_s": round(matmul_rate(args.dtype, peer_rate) / 1e9, 1)}), flush=True)
    for r in range(args.repeat):
        results = {}
        for name, fn in (("ours", lambda: ours(args.steps, args.dtype, args.remat)),
                         ("hf_peft", lambda: peer(args.steps, args.dtype))):
            tps = fn()
            results[name] = tps
            print(json.dumps({"bench": "lora_train_step", "impl": name, "dtype": args.dtype, "remat": args.remat,
                              "layers": LAYERS, "batch": B, "seq": T, "tokens_per_s": round(tps, 1),
                              "model_gflop_s": round(tps * flops_tok / 1e9, 1),
                              "fraction_of_matmul_rate": round(tps * flops_tok / rate, 3)}), flush=True)
        print(json.dumps({"bench": "lora_train_ratio", "repeat": r,
                          "ours_over_peer": round(results["ours"] / results["hf_peft"], 2)}), flush=True)


if __name__ == "__main__":
    main()

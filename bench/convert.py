"""hf-to-orbax throughput and peak memory against a plain sequential copy of the same bytes.

    python bench/convert.py [--layers 5] [--dir /tmp/convert_bench] [--verify] [--keep]

Writes a synthetic bf16 checkpoint with the real Llama 3.1 8B widths (D 4096, F 14336, 32 heads,
8 KV heads, vocab 128256) and a few layers, with the `safetensors` package (one file per layer, plus
the embedding and the LM head, and an index), then in the same run:
  - copies its files sequentially (64 MiB reads and writes, fsync per file) on the same disk;
  - runs `python -m convert hf-to-orbax` on it as a child process (wall time, including start-up;
    peak RSS = the VmHWM the job reports at its end, cross-checked by sampling the child's RSS
    every 20 ms; ru_maxrss is not used: Linux folds the parent's RSS at fork into it);
  - copies again (the copy figure is the mean of the two, around the conversion);
and does the same again with twice the layers: peak RSS must not grow with depth.
One JSON line per measurement. The targets (issue 5): conversion >= 50% of the copy's bytes/s, peak
RSS <= 3 x the largest tensor + 1 GB, equal for both depths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
D, F, N, K, H, V = 4096, 14336, 32, 8, 128, 128256


def write_checkpoint(d: Path, layers: int) -> tuple[int, int]:
    """Random bf16 weights in HF layout; returns (total bytes of tensors, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
           "intermediate_size": F, "num_hidden_layers": layers, "num_attention_heads": N,
           "num_key_value_heads": K, "head_dim": H, "hidden_act": "silu", "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
           "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    groups = [("embed", {"model.embed_tokens.weight": (V, D)})]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append((f"layer{i}", {
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D), p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D), p + "self_attn.o_proj.weight": (D, N * H),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F)}))
    groups.append(("head", {"model.norm.weight": (D,), "lm_head.weight": (V, D)}))
    n = len(groups)
    weight_map, total, largest = {}, 0, 0
    for k, (_, tensors) in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        ts = {name: rnd(*shape) for name, shape in tensors.items()}
        save_file(ts, str(d / fname), metadata={"format": "pt"})
        for name, t in ts.items():
            weight_map[name] = fname
            total += t.numel() * 2
            largest = max(largest, t.numel() * 2)
        del ts
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    return total, largest


def sequential_copy(src: Path, dst: Path, block=64 << 20) -> tuple[int, float]:
    dst.mkdir(parents=True)
    buf = bytearray(block)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as r, open(dst / f.name, "wb") as w:
            while k := r.readinto(buf):
                w.write(view[:k])
                n += k
            w.flush()
            os.fsync(w.fileno())
    dt = time.perf_counter() - t0
    shutil.rmtree(dst)
    return n, dt


def run_child(cmd: list[str]) -> tuple[int, float, int, str]:
    """(return code, wall seconds, peak RSS bytes sampled every 20 ms, stderr) of a child process."""
    import psutil

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    log = open(ROOT / ".bench_convert.log", "w+")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=log, stdout=log, text=True)
    proc, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    dt = time.perf_counter() - t0
    log.seek(0)
    err = log.read()
    log.close()
    os.unlink(ROOT / ".bench_convert.log")
    return p.returncode, dt, peak, err


def reported_peak(err: str) -> float | None:
    import re
    m = re.findall(r"peak host memory ([0-9.]+) GB", err)
    return float(m[-1]) if m else None


def bench(base: Path, layers: int, verify: bool) -> dict:
    hf, out = base / f"hf_L{layers}", base / f"orbax_L{layers}"
    for p in (hf, out, base / "copy"):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    # written by a child, so that this process stays small (its children inherit nothing big)
    r = subprocess.run([sys.executable, __file__, "--write", str(hf), str(layers)], check=True,
                       capture_output=True, text=True)
    total, largest = json.loads(r.stdout.strip().splitlines()[-1])
    files = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    print(json.dumps({"what": "synthetic checkpoint", "layers": layers, "tensor_bytes": total, "file_bytes": files,
                      "largest_tensor_bytes": largest, "write_s": round(time.perf_counter() - t0, 1)}), flush=True)
    n1, c1 = sequential_copy(hf, base / "copy")
    rc, conv_s, sampled, err = run_child([sys.executable, "-m", "convert", "hf-to-orbax", "--hf", str(hf), "--out", str(out),
                                      "--no-progress"])
    if rc:
        raise SystemExit(f"conversion failed ({rc}):\n{err}")
    n2, c2 = sequential_copy(hf, base / "copy")
    copy_bps = (n1 + n2) / (c1 + c2)
    out_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    rec = {"what": "hf-to-orbax", "layers": layers, "bytes": files, "convert_s": round(conv_s, 2),
           "convert_GBps": round(files / conv_s / 1e9, 3), "copy_s": [round(c1, 2), round(c2, 2)],
           "copy_GBps": round(copy_bps / 1e9, 3), "ratio": round(files / conv_s / copy_bps, 3),
           "peak_rss_GB": reported_peak(err), "peak_rss_sampled_GB": round(sampled / 1e9, 3),
           "rss_bound_GB": round((3 * largest + 1e9) / 1e9, 3),
           "output_bytes": out_bytes, "job_log": [line for line in err.splitlines() if "wrote" in line][-1:]}
    if verify:
        rc, vs, vrss, verr = run_child([sys.executable, "-m", "convert", "verify", "--orbax", str(out), "--hf", str(hf),
                                        "--no-progress"])
        rec.update(verify_rc=rc, verify_s=round(vs, 1), verify_peak_rss_sampled_GB=round(vrss / 1e9, 3),
                   verify_report=verr.strip().splitlines()[-1:] if verr else [])
    print(json.dumps(rec), flush=True)
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/convert_bench")
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--write", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        print(json.dumps(write_checkpoint(Path(args.write[0]), int(args.write[1]))))
        return
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for layers in (args.layers, 2 * args.layers):
            results.append(bench(base, layers, args.verify))
            if not args.keep:
                shutil.rmtree(base / f"hf_L{layers}", ignore_errors=True)
                shutil.rmtree(base / f"orbax_L{layers}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    a, b = results
    print(json.dumps({"what": "summary", "ratio": [a["ratio"], b["ratio"]], "peak_rss_GB": [a["peak_rss_GB"], b["peak_rss_GB"]],
                      "rss_growth_with_2x_layers_GB": round(b["peak_rss_GB"] - a["peak_rss_GB"], 3),
                      "rss_bound_GB": a["rss_bound_GB"]}), flush=True)


if __name__ == "__main__":
    main()

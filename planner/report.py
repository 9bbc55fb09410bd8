"""The plan as text (the CLI's output unless --json), and the compile-only check's report."""

from __future__ import annotations

import json

from planner.estimate import CATEGORIES, LABELS, GiB

# the fields of the one-line `PLAN {...}` summary a job's --compile-only prints after the table
SUMMARY_FIELDS = ("topology", "mesh", "remat", "per_device_bytes", "compiled_per_device_bytes", "capacity_bytes",
                  "fits", "headroom")


def _gib(b) -> str:
    if b is None:
        return "—"
    return f"{b / GiB:8.2f} GiB" if b >= GiB // 10 or b == 0 else f"{b / (1 << 20):8.2f} MiB"


def format_plan(r: dict) -> str:
    lines = []
    lora = f" · LoRA r={r['lora']['rank']} on {','.join(r['lora']['targets'])}" if r["lora"] else ""
    mesh = " × ".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "1 device"
    what = f"{r['batch']} × {r['seq']} tokens" + (f" (KV cache {r['kv_len']})" if r["kv_len"] else "")
    if r["accum"] > 1:
        what += f" in {r['accum']} micro-batches"
    lines.append(f"{r['model']} ({r['params']:,} parameters, {r['layers']} layers) · {r['mode']} · {r['quant']}"
                 f"{lora} · remat {r['remat']}")
    lines.append(f"{r['topology']}: {r['chips']} × {r['device_kind']} · mesh {mesh} · batch {what}")
    c = r["compiled"]
    lines.append(f"{'per chip':<24}{'analytic':>12}")
    for k in CATEGORIES:
        v = r["per_device"][k]
        if v or k in ("weights", "temporaries"):
            lines.append(f"  {LABELS[k]:<22}{_gib(v):>12}")
    lines.append(f"  {'total':<22}{_gib(r['per_device_bytes']):>12}")
    if c and c.get("error"):
        lines.append(f"  {'compiled (XLA)':<22}{_gib(c['per_device_bytes']):>12}   {c['error']}")
        lines.append(f"  {'analytic vs compiled':<22}{r['analytic_vs_compiled'] * 100:+11.1f}%")
    elif c:
        lines.append(f"  {'compiled (XLA peak)':<22}{_gib(c['per_device_bytes']):>12}   memory_analysis: arguments "
                     f"{c['argument_bytes'] / GiB:.2f} GiB, temp {c['temp_bytes'] / GiB:.2f} GiB, "
                     f"outputs {c['output_bytes'] / GiB:.2f} GiB ({c['alias_bytes'] / GiB:.2f} aliased)")
        lines.append(f"  {'analytic vs compiled':<22}{r['analytic_vs_compiled'] * 100:+11.1f}%")
    lines.append(f"  {'capacity':<22}{_gib(r['capacity_bytes']):>12}")
    basis = r["basis"]
    if r["fits"]:
        free = r["capacity_bytes"] - (r["compiled_per_device_bytes"] or r["per_device_bytes"])
        lines.append(f"FITS ({basis}): {r['headroom'] * 100:.1f}% headroom, {free / GiB:.2f} GiB free per chip")
    else:
        need = r["compiled_per_device_bytes"] or r["per_device_bytes"]
        if need <= r["capacity_bytes"]:  # fits the chip, but not with the headroom asked for
            lines.append(f"DOES NOT FIT ({basis}) with the headroom asked for: uses {need / r['capacity_bytes']:.0%} "
                         f"of capacity; needs {r['short_by_bytes'] / GiB:.2f} GiB less per chip")
        else:
            lines.append(f"DOES NOT FIT ({basis}): needs {r['short_by_bytes'] / GiB:.2f} GiB more per chip "
                         f"({need / r['capacity_bytes'] * 100:.0f}% of capacity)")
    if c and not c.get("error"):
        extra = ""
        if r.get("model_flops_per_chip"):
            extra = f"; model FLOPs {r['model_flops_per_chip']:.3g} per chip per step"
        lines.append(f"compiler: {c['flops']:.3g} FLOPs per chip per step (cost_analysis, which counts a loop "
                     f"body once: the {r['layers']}-layer scan's work appears as one layer's){extra}; "
                     f"lowered in {c['lower_seconds']} s, compiled in {c['compile_seconds']} s")
    elif r["topology"].startswith(("h100", "h200", "a100")):
        lines.append("(GPU: analytic only; run with --compile on the GPU node to confirm)")
    lines += _flops_lines(r) + _remat_lines(r)
    if r.get("note"):
        lines.append(r["note"])
    return "\n".join(lines)


def _flops_lines(r: dict) -> list[str]:
    if not r.get("program_flops_per_token"):
        return []
    recompute = " (remat full recomputes the forward: about 1.5x for LoRA, 1.33x for full fine-tuning)" \
        if r["remat"] == "full" else ""
    loops = (f"; {r['uncounted_loops']} while loop(s) counted once" if r["uncounted_loops"] else "")
    return [f"matmul FLOPs per token: the step's program {r['program_flops_per_token']:.4g}, the model "
            f"{r['model_flops_per_token']:.4g} (forward, activation and trained-weight gradients, no "
            f"recomputation): {r['program_vs_model']:.2f}x{recompute}{loops}"]


def _remat_lines(r: dict) -> list[str]:
    if not r.get("remat_search"):
        return []
    rows = []
    for t in r["remat_search"]:
        got = (f"compiled {_gib(t['compiled_bytes']).strip()} -> {'fits' if t['fits'] else 'does not fit'}"
               if t["compiled_bytes"] is not None else t.get("note", ""))
        rows.append(f"  {t['remat']:<10} analytic {_gib(t['analytic_bytes']).strip()}, {got}")
    verdict = (f"remat auto: {r['remat']} (the least recomputation that fits)" if r["fits"] else
               "remat auto: no policy fits")
    return [verdict, *rows]


def summary_line(r: dict) -> str:
    """`PLAN {...}`: the verdict as one JSON line, for scripts reading a compile-only check."""
    return "PLAN " + json.dumps({k: r[k] for k in SUMMARY_FIELDS})

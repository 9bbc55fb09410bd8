"""Mutation check, run on demand (not in CI): `python tests/mutants.py [NAME ...] [--list]`.

Each mutant is one named bug, applied as an exact text replacement in a temporary copy of the working
tree (the tree itself is never touched). The tests that should catch it run in that copy (with its
modules first on the path), and the report says which of them fail. Every mutant must be caught by at
least one test; the exit status is 1 otherwise. A replacement that no longer matches the source is an
error, so a refactoring cannot quietly turn a mutant into a no-op."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) expected to catch it


MUTANTS = [
    Mutant("no_save_at_sigterm", "train/loop.py",
           "if step % cfg.checkpoint.every == 0 or step == last or stopping:",
           "if step % cfg.checkpoint.every == 0 or step == last:",
           ("tests/test_train.py::test_resume_after_sigterm",)),
    Mutant("no_resume", "train/loop.py",
           "    start = manager.latest_step()\n    if start is None:\n        return 0, state",
           "    start = None\n    if start is None:\n        return 0, state",
           ("tests/test_train.py::test_exact_resume", "tests/test_train.py::test_resume_after_sigterm")),
    Mutant("greedy_second_best", "serve/sampling.py",
           "    top = jnp.max(x_BV, axis=-1, keepdims=True)\n",
           "    top = jnp.max(x_BV, axis=-1, keepdims=True)\n"
           "    top = jnp.max(jnp.where(x_BV == top, -jnp.inf, x_BV), axis=-1, keepdims=True)\n",
           # XLA's path: engines on several devices or accelerators (one CPU device takes cpu_logits.cc)
           ("tests/test_serve_engine.py::test_greedy_matches_transformers_batch1",
            "tests/test_serve_engine.py::test_cpu_logit_stats_kernel_equals_the_xla_path")),
    Mutant("logit_stats_kernel_greedy_token_off", "model/network/backends/cpu_logits.cc",  # AVX-512 CPUs only
           "    mi = _mm512_mask_mov_epi32(mi, gt, idx);", "    mi = _mm512_mask_mov_epi32(mi, gt, _mm512_add_epi32(idx, _mm512_set1_epi32(1)));",
           ("tests/test_serve_parity.py::test_greedy_completion_equals_transformers_batch_1",
            "tests/test_serve_parity.py::test_greedy_chat_equals_transformers",
            "tests/test_serve_api.py::test_completion_and_chat")),
    Mutant("transposed_int4_groups", "model/network/quant.py",  # groups of strided rows, not consecutive ones
           "    wf = jnp.asarray(w).astype(jnp.float32).reshape(*lead, I // gs, gs, O)\n",
           "    wf = jnp.swapaxes(jnp.asarray(w).astype(jnp.float32).reshape(*lead, gs, I // gs, O), -3, -2)\n",
           ("tests/test_independent_oracles.py::test_int4_conversion_is_bit_equal_to_quantized_load_and_to_a_numpy_"
            "quantizer", "tests/test_quant.py::test_quantize_is_round_to_nearest_with_storage_dtype_scales")),
    Mutant("skipped_rope_scaling", "model/network/layers.py",
           "    if rs is None:\n        return inv_freq\n",
           "    if True:\n        return inv_freq\n",
           ("tests/test_parity.py::test_positions_far_into_the_context",
            "tests/test_parity.py::test_logits_and_greedy_match_transformers")),
    Mutant("lora_scale_dropped", "model/network/lora.py",  # alpha / r (or / sqrt r) taken as 1 everywhere
           "        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)\n",
           "        return 1.0\n",
           ("tests/test_serve_parity.py::test_trained_peft_export_gives_our_logits_in_peft",
            "tests/test_convert.py::test_peft_export_gives_our_logits_in_peft",
            "tests/test_quant.py::test_qlora_adapters_train_on_an_int4_base")),
    # the OpenAI surface (issue 13)
    Mutant("echo_takes_cached_blocks", "serve/scheduler.py",
           "        if req.prompt_lps is not None and matched:", "        if False:",
           ("tests/test_serve_openai.py::test_echo_with_cached_prefix_and_streamed",)),
    Mutant("prompt_logprob_of_this_token", "serve/prompt_logprobs.py",  # off by one: the token, not the next
           "                    out[t + j] = r.prompt[p + 1]", "                    out[t + j] = r.prompt[p]",
           ("tests/test_serve_openai.py::test_echo_prompt_logprobs_equal_transformers", "tests/test_lm_eval.py")),
    Mutant("repetition_over_output_only", "serve/sampling.py",  # vLLM's and HF's cover the prompt too
           "        x = jnp.where(seen, jnp.where(logits_BV > 0,", "        x = jnp.where(counts > 0, jnp.where(logits_BV > 0,",
           ("tests/test_serve_openai.py::test_penalties_equal_the_oracles_beside_a_plain_request",)),
    Mutant("penalty_history_not_extended", "serve/sampling.py",  # tokens of a multi-token decode call not counted
           "        return dataclasses.replace(self, history=history, length=self.length + 1)",
           "        return self",
           ("tests/test_serve_openai.py::test_penalties_equal_the_oracles_beside_a_plain_request",)),
    Mutant("stop_strings_before_min_tokens", "serve/engine.py",
           "r.text.push(tok, check_stop=len(r.generated) >= r.params.min_tokens)", "r.text.push(tok)",
           ("tests/test_serve_openai.py::test_min_tokens_holds_off_stop_ids_and_stop_strings",)),
    Mutant("specials_in_text", "serve/events.py",
           "        if int(token_id) not in self.skip:", "        if True:",
           ("tests/test_serve_openai.py::test_skip_special_tokens",)),
    Mutant("chat_usage_times_n", "serve/handlers.py",
           "        return await self.respond(request, body, jobs, shape, len(ids))",
           "        return await self.respond(request, body, jobs, shape, len(ids) * n)",
           ("tests/test_serve_openai.py::test_chat_defaults_to_the_rest_of_the_context_and_counts_the_prompt_once",)),
    Mutant("itl_counts_the_first_token", "serve/metrics.py",
           "                    if last[0] is None:\n                        ttft.observe(now - start)\n                    else:",
           "                    if last[0] is None:\n                        ttft.observe(now - start)\n                    if True:",
           ("tests/test_serve_metrics.py::test_counters_move_with_traffic_by_exact_amounts",)),
    Mutant("lora_onehot_off_by_one", "model/network/lora.py",  # many-token steps apply the next slot's adapter
           "onehot = (rows[..., None] - 1 == ", "onehot = (rows[..., None] == ",
           ("tests/test_serve_lora.py::test_mixed_adapters_in_one_step_equal_peft_and_each_alone[one_cpu]",)),
    Mutant("lora_gather_base_rows_unmasked", "model/network/lora.py",  # decoding base rows get slot 1's adapter
           "        h = h * (rows > 0)[..., None].astype(h.dtype)\n", "",
           ("tests/test_serve_lora.py::test_mixed_adapters_in_one_step_equal_peft_and_each_alone[one_cpu]",)),
    Mutant("lora_prefix_key_by_slot", "serve/scheduler.py",  # a reloaded slot reuses the old adapter's blocks
           "return None if self.adapter is None else self.adapter.uid",
           "return None if self.adapter is None else self.adapter.row",
           ("tests/test_serve_lora.py::test_load_errors_change_nothing_and_unload_drains",)),
    Mutant("remat_order_reversed", "planner/remat.py",  # auto would take the most recomputation first
           'ORDER = ("none", "dots", "attn_proj", "full")', 'ORDER = ("full", "attn_proj", "dots", "none")',
           ("tests/test_remat_search.py::test_auto_takes_the_least_recomputation_that_fits",)),
    Mutant("local_verdict_ignores_headroom", "planner/plan.py",
           '"fits": basis <= capacity * (1 - headroom)', '"fits": basis <= capacity',
           ("tests/test_remat_search.py::test_auto_takes_the_least_recomputation_that_fits",)),
    Mutant("flops_scan_counted_once", "planner/flops.py",  # what XLA's cost analysis does
           'return p["length"] * self.count(p["jaxpr"])', 'return self.count(p["jaxpr"])',
           ("tests/test_remat_search.py::test_each_layer_counts_and_remat_full_recomputes_the_forward",)),
    Mutant("flops_matmul_not_doubled", "planner/flops.py",
           "return 2.0 * eqn.outvars[0].aval.size", "return 1.0 * eqn.outvars[0].aval.size",
           ("tests/test_remat_search.py::test_matmul_count_equals_the_compilers_on_an_unrolled_step",)),
    Mutant("flops_shard_map_one_shard", "planner/flops.py",  # Pallas kernels counted for one shard only
           'axes = p.get("newly_manual_axes") or p.get("manual_axes") or p.get("axis_names") or ()', "axes = ()",
           ("tests/test_remat_search.py::test_405b_step_counts_the_pallas_kernels_in_every_shard",)),
    Mutant("causal_block_misses_its_last_key", "model/network/attention.py",
           "slice(start, start + block), slice(0, start + block)", "slice(start, start + block), slice(0, start + block - 1)",
           ("tests/test_train_speed_paths.py::test_causal_blocks_equal_the_reference_forward_and_gradients",)),
    Mutant("swiglu_backward_drops_a_term", "model/network/llama.py",
           "d_gate = dh * u * sig * (1 + g * (1 - sig))", "d_gate = dh * u * sig",
           ("tests/test_train_speed_paths.py::test_swiglu_backward_equals_autodiff",)),
    Mutant("aot_cache_key_ignores_the_chips", "sharding/aot_compile.py",  # a v5e plan would read a v6e compile
           "devs[0].platform, devs[0].device_kind, repr(chips)", "devs[0].platform",
           ("tests/test_aot_compile.py",)),
    Mutant("aot_cache_never_read", "sharding/aot_compile.py",
           "if path.exists() and (rec := _load(path)) is not None:", "if False and (rec := _load(path)) is not None:",
           ("tests/test_aot_compile.py",)),
    Mutant("step_padding_not_filled", "serve/scheduler.py",
           "                extra = min(room, r.total - r.computed - counts[i])", "                extra = 0",
           ("tests/test_serve_paged.py::test_decoding_goes_on_during_a_long_prompt",)),
    Mutant("row_tile_drops_last_row", "model/network/backends/cpu_gemv.cc",  # AVX-512 CPUs only
           "for (int64_t r = 0, m = (mb0 + b) * 16; r < 16 && m < M; ++r, ++m)  // column-wise",
           "for (int64_t r = 0, m = (mb0 + b) * 16; r < 16 && m < M - 1; ++r, ++m)  // column-wise",
           ("tests/test_serve_engine.py::test_cpu_gemv_kernels",)),
    Mutant("quads_without_offset_correction", "model/network/backends/cpu_gemv.cc",  # AVX-512 CPUs only
           "for (int j = 0; j < NR; ++j) t[j][bb] = c;", "for (int j = 0; j < NR; ++j) t[j][bb] = _mm512_setzero_si512();",
           ("tests/test_serve_engine.py::test_cpu_gemv_kernels",)),
    Mutant("int8_quads_second_row_block_reads_the_first", "model/network/backends/cpu_gemv.cc",  # AVX-512 CPUs
           "      for (int bb = 0; bb < MB; ++bb) xb[bb] = _mm512_loadu_si512(x + (bb * quads + p) * 16);",
           "      for (int bb = 0; bb < MB; ++bb) xb[bb] = _mm512_loadu_si512(x + p * 16);",
           ("tests/test_serve_engine.py::test_cpu_gemv_kernels",)),
    Mutant("int8_quads_offset_sum_of_the_first_block", "model/network/backends/cpu_gemv.cc",  # AVX-512 CPUs
           "        for (int64_t k = 0; k < QB; ++k) sum += row[b * QB + k];",
           "        for (int64_t k = 0; k < QB; ++k) sum += row[k];",
           ("tests/test_serve_engine.py::test_cpu_gemv_kernels",)),
    Mutant("int4_quads_nibble_halves_swapped", "model/network/backends/cpu_gemv.cc",  # AVX-512 CPUs only
           "^ 0x88888888u) >> (4 * half);", "^ 0x88888888u) >> (4 * (1 - half));",
           ("tests/test_serve_engine.py::test_cpu_gemv_kernels",)),
    Mutant("int4_quads_scale_of_the_first_group", "model/network/backends/cpu_gemv.cc",  # AVX-512 CPUs only
           "scale[(n0 + j) * (K / group) + b * QB / group]", "scale[(n0 + j) * (K / group)]",
           ("tests/test_serve_engine.py::test_cpu_gemv_kernels",)),
    Mutant("bf16_attention_sums_misordered", "model/network/backends/cpu_attention.cc",  # AVX512-BF16 CPUs only
           "  return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));",
           "  return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[1], v[0], 0xDD));",
           ("tests/test_paged_kernels.py::test_cpu_paged_kernel_bf16_blocks_of_16",)),
    Mutant("bf16_attention_values_unscrambled_wrong", "model/network/backends/cpu_attention.cc",
           "          out[g * H + u * 32 + 8 * L + 4 + i] = a[16 + 4 * L + i];",
           "          out[g * H + u * 32 + 8 * L + 4 + i] = a[4 * L + i];",
           ("tests/test_paged_kernels.py::test_cpu_paged_kernel_matches_the_references",
            "tests/test_paged_kernels.py::test_cpu_paged_kernel_bf16_blocks_of_16")),
    Mutant("bf16_attention_buffer_never_grows", "model/network/backends/cpu_attention.cc",
           "  if (pairs_buf.size() < size_t((n + 1) / 2 * 2 * HV))",
           "  if (pairs_buf.empty())",
           ("tests/test_paged_kernels.py::test_cpu_paged_kernel_matches_the_references",
            "tests/test_paged_kernels.py::test_cpu_paged_kernel_bf16_blocks_of_16")),
    Mutant("logit_stats_last_of_tied_maxima", "model/network/backends/cpu_logits.cc",  # AVX-512 CPUs only
           "_mm512_cmp_ps_mask(xv, m, _CMP_GT_OQ)", "_mm512_cmp_ps_mask(xv, m, _CMP_GE_OQ)",
           ("tests/test_serve_engine.py::test_cpu_logit_stats_kernel_equals_the_xla_path",)),
    Mutant("tpu_blocks_of_16", "serve/config.py",
           "block = min(max((1 << (self.max_len - 1).bit_length()) // 16, 16), 256)", "block = 16",
           ("tests/test_serve_engine.py::test_auto_block_size_and_prompt_chunk_follow_the_platform",
            "tests/test_serve_engine.py::test_compile_only_resolves_the_block_size_for_the_topology")),
    Mutant("cpu_prompt_chunk_256", "serve/config.py",
           'chunk = min(32 if platform == "cpu" else 256, self.prefill_tokens)', "chunk = min(256, self.prefill_tokens)",
           ("tests/test_serve_engine.py::test_auto_block_size_and_prompt_chunk_follow_the_platform",)),
    Mutant("compile_only_resolves_for_this_machine", "serve/compile_check.py",
           "engine=cfg.engine.resolved(platform))", 'engine=cfg.engine.resolved(jax.devices()[0].platform))',
           ("tests/test_serve_engine.py::test_compile_only_resolves_the_block_size_for_the_topology",)),
    Mutant("embedding_gathered_as_bits_on_tpu", "model/network/llama.py",
           "if update.bits and table.dtype.itemsize == 2:", "if table.dtype.itemsize == 2:",
           ("tests/test_paged_kernels.py::test_405b_width_decode_step_copies_no_whole_weight",)),
    Mutant("quant_loop_splits_device_units", "model/network/quant.py",
           "local = units // in_shards if units % in_shards == 0 else units", "local = units",
           ("tests/test_quant.py::test_loop_keeps_each_device_whole_units",
            "tests/test_paged_kernels.py::test_405b_width_decode_step_gathers_no_weight")),
    Mutant("quant_in_shards_not_passed", "model/network/dense.py",
           "self.compute_dtype, rules.shards(self.in_axes, self.in_shape))", "self.compute_dtype)",
           ("tests/test_paged_kernels.py::test_405b_width_decode_step_gathers_no_weight",)),
    Mutant("tpu_pool_sliced_per_layer", "model/network/kv_cache.py",
           "        nb = c.num_blocks\n",
           "        return paged_attention.attend(q_BTNH[0], c.kv[self.layer], None if c.scale is None else "
           "c.scale[self.layer], self.meta, self.impl)[None], c\n        nb = c.num_blocks\n",
           ("tests/test_paged_kernels.py::test_tpu_step_reads_the_pool_in_place",)),
    Mutant("tpu_pool_stored_as_bits", "model/network/kv_cache.py",
           'return jnp.uint16 if as_bits(platform) and jnp.dtype(dtype).itemsize == 2',
           'return jnp.uint16 if jnp.dtype(dtype).itemsize == 2',
           ("tests/test_paged_kernels.py::test_tpu_step_reads_the_pool_in_place",)),
    Mutant("paged_pages_of_layer_0", "model/network/kv_cache.py",
           "page_indices=self.meta.page_indices + self.layer * nb)", "page_indices=self.meta.page_indices)",
           ("tests/test_paged_kernels.py::test_layer_cache_reads_its_layer_of_the_stacked_pool",
            "tests/test_serve_engine.py::test_greedy_matches_transformers_batch1")),
    Mutant("logit_stats_tail_skipped", "model/network/backends/cpu_logits.cc",  # AVX-512 CPUs only
           "  for (; v < V; ++v) {\n    const float xf", "  for (v = V; v < V; ++v) {\n    const float xf",
           ("tests/test_serve_engine.py::test_cpu_logit_stats_kernel_equals_the_xla_path",)),
    Mutant("logit_stats_sum_keeps_the_last_block", "model/network/backends/cpu_logits.cc",  # AVX-512 CPUs only
           "    total = _mm512_add_ps(total, _mm512_add_ps(", "    total = (_mm512_add_ps(",
           ("tests/test_serve_engine.py::test_cpu_logit_stats_kernel_equals_the_xla_path",)),
    Mutant("step_samples_without_the_logit_stats_kernel", "serve/step.py",
           "cpu_kernels.logit_stats if program.cpu_kernels else None", "None",
           ("tests/test_serve_engine.py::test_quantized_weights",)),
    Mutant("token_buckets_powers_only", "serve/scheduler.py",
           "    return min(b * 3 // 4 if b % 4 == 0 and b * 3 // 4 >= n else b, hi)",
           "    return min(b, hi)",
           ("tests/test_serve_engine.py::test_buckets",)),
    Mutant("full_decode_steps_for_every_row_count", "serve/scheduler.py",
           "    return decode_steps if rows <= 4 else max(decode_steps // 2, 1)",
           "    return decode_steps",
           ("tests/test_serve_engine.py::test_buckets",)),
    Mutant("swiglu_rounds_the_sigmoid", "model/network/llama.py",  # XLA's bf16 silu, not PyTorch's rounding
           "    return (jax.nn.silu(gate.astype(f32)).astype(gate.dtype).astype(f32) * up.astype(f32)).astype(up.dtype)",
           "    return jax.nn.silu(gate) * up",
           ("tests/test_train_speed_paths.py::test_swiglu_backward_equals_autodiff",)),
    Mutant("three_block_tile_computes_two", "model/network/backends/cpu_gemv.cc",  # AVX512-BF16 CPUs only
           "if (three && n1 - n >= 8) tile_pairs<8, 3>(", "if (three && n1 - n >= 8) tile_pairs<8, 2>(",
           ("tests/test_serve_engine.py::test_cpu_gemv_kernels",)),
    Mutant("logprob_without_log_sum", "serve/sampling.py",  # the shifted logit taken for the log-prob
           "    chosen = (jnp.take_along_axis(logits_BV, tokens[:, None], axis=-1)[:, 0].astype(jnp.float32) - top) - log_sum",
           "    chosen = (jnp.take_along_axis(logits_BV, tokens[:, None], axis=-1)[:, 0].astype(jnp.float32) - top)",
           ("tests/test_serve_parity.py::test_greedy_chat_equals_transformers",)),
]


def tree_files() -> list[str]:
    """The working tree as git sees it: tracked files and untracked ones it does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def copy_tree(dst: Path) -> None:
    for rel in tree_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)


def apply(m: Mutant, tree: Path) -> None:
    f = tree / m.file
    text = f.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutant {m.name}: the text to replace occurs {text.count(m.old)} times in {m.file} "
                         "(expected once); update tests/mutants.py")
    f.write_text(text.replace(m.old, m.new))


def run_test(tree: Path, node: str) -> tuple[bool, float, str]:
    """(failed, seconds, last lines) of one pytest node id run in `tree`."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", node],
                       cwd=tree, env=env, capture_output=True, text=True)
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    why = [x for x in lines if x.startswith(("FAILED", "ERROR"))] or lines[-1:]
    return r.returncode != 0, time.time() - t0, why[0][:300] if why else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutant(s) {sorted(unknown)}; known: {[m.name for m in MUTANTS]}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(m.name, *m.tests, sep="\n  ")
        return 0
    survived = []
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
            tree = Path(tmp)
            copy_tree(tree)
            apply(m, tree)
            caught = []
            for node in m.tests:
                failed, secs, last = run_test(tree, node)
                print(f"{m.name}: {'CAUGHT by' if failed else 'passes  '} {node} ({secs:.0f} s; {last})", flush=True)
                if failed:
                    caught.append(node)
            if not caught:
                survived.append(m.name)
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} mutants caught"
          + (f"; SURVIVED: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

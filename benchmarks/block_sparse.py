"""Block-sparse prefill (XAttention, FlexPrefill, vertical-slash) and Quest decode vs dense, with the
achieved sparsity next to every timing.

    python benchmarks/block_sparse.py                       # H100: 32K and 128K, H=32, Hkv=8, D=128, bf16
    python benchmarks/block_sparse.py --cpu-smoke           # tiny shapes, Triton interpreter: proves it runs

Prefill timings include the estimation (the whole ops.* call: estimate, index lists, kernel, sparsity
count) and are compared with torch's cuDNN SDPA (dense, causal) on the same inputs. Decode: one query
per sequence at --decode-len with a --quest-budget token budget (16-token pages, page min/max already
maintained, as the engine does incrementally), scoring + top-k + sparse kernel vs dense SDPA decode;
both captured in CUDA graphs. Inputs are synthetic but real-looking (benchmarks/synthetic_attention.py:
RoPE locality, sinks, needles). Correctness first: each algorithm's Triton output is checked against
the torch path (same selection) on a short input before anything is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_attention import PROFILES, synthetic_qkv  # noqa: E402

from sparse_llm import ops  # noqa: E402
from sparse_llm.configs.sparse_more import FlexPrefillConfig, XAttentionConfig  # noqa: E402
from sparse_llm.kernels.block_sparse_prefill import (  # noqa: E402
    batched_block_sparse_attention,
    block_sparse_attention_launch,
    default_num_splits,
)
from sparse_llm.sparse.block_selection import decode_tiles, per_sequence_pairs  # noqa: E402
from sparse_llm.kernels.quest_scores import quest_scores_paged  # noqa: E402
from sparse_llm.sparse.quest import page_minmax, page_scores, quest_selection, quest_topk  # noqa: E402


def timed(fn, device: str, reps: int) -> float:
    """Median milliseconds."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(1, reps // 4), rep=reps * 20, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def dense_sdpa(q, k, v):
    """torch's cuDNN SDPA when it runs these shapes (GQA via enable_gqa, else pre-expanded K/V)."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        g = q.shape[1] // k.shape[1]
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q[:, :, :128], k[:, :, :128], v[:, :, :128], is_causal=True, enable_gqa=True)

            def run():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            return run, "cudnn (enable_gqa)"
        except RuntimeError:
            ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

            def run_expanded():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)

            return run_expanded, "cudnn (K/V expanded)"
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), "torch sdpa (cpu)"


def prefill_algorithms(args):
    return {
        "xattention": lambda q, k, v, impl: ops.xattention_prefill(
            q, k, v, threshold=args.threshold, stride=args.stride, block_size=args.block, implementation=impl,
            local_window=args.xatt_local_window, dense_last_block=args.xatt_dense_last_block,
            vertical_gamma=args.xatt_vertical_gamma),
        "flexprefill": lambda q, k, v, impl: ops.flexprefill_prefill(
            q, k, v, gamma=args.gamma, tau=args.tau, block_size=args.block, min_budget=args.min_budget, implementation=impl,
            local_window=args.flex_local_window, dense_last_block=args.flex_dense_last_block),
        "vertical_slash": lambda q, k, v, impl: ops.vertical_slash_prefill(
            q, k, v, args.vertical_size, args.slash_size, block_size=args.vs_block, implementation=impl),
    }


def selections(args):
    """(estimator producing the index lists, block size) per algorithm: the first half of each ops call."""
    return {
        "xattention": (lambda q, k: ops.xattention_selection(
            q, k, threshold=args.threshold, stride=args.stride, block_size=args.block, implementation="triton",
            local_window=args.xatt_local_window, dense_last_block=args.xatt_dense_last_block,
            vertical_gamma=args.xatt_vertical_gamma), args.block),
        "flexprefill": (lambda q, k: ops.flexprefill_selection(
            q, k, gamma=args.gamma, tau=args.tau, block_size=args.block, min_budget=args.min_budget,
            local_window=args.flex_local_window, dense_last_block=args.flex_dense_last_block), args.block),
        "vertical_slash": (lambda q, k: ops.vertical_slash_selection(
            q, k, args.vertical_size, args.slash_size, block_size=args.vs_block), args.vs_block),
    }


def check_correctness(args, device, dtype) -> dict:
    """Triton vs torch kernel on the same selection (estimated once from the dtype input) on a short input: max abs
    error, which must be within tolerance. The whole ops calls (each path estimating its own selection: bf16 vs fp32
    scores can pick a few different blocks) are recorded beside it, not checked."""
    s = args.check_len
    q, k, v = synthetic_qkv(1, args.heads, args.kv_heads, s, args.head_dim, dtype, device, seed=1)
    errors = {}
    sels = selections(args)
    for name, fn in prefill_algorithms(args).items():
        select, bs = sels[name]
        sel = select(q, k)
        out, sp = ops.block_sparse_attention(q, k, v, sel, block_size=bs, implementation="triton")
        ref, _ = ops.block_sparse_attention(q.float(), k.float(), v.float(), sel, block_size=bs, implementation="torch")
        err = float((out.float() - ref).abs().max())
        whole, sp_whole = fn(q, k, v, "triton")
        whole_ref, sp_whole_ref = fn(q.float(), k.float(), v.float(), "torch")
        errors[name] = {"max_abs_err_same_selection": err, "sparsity": sp,
                        "whole_call_max_abs_err": float((whole.float() - whole_ref).abs().max()),
                        "whole_call_sparsity_triton": sp_whole, "whole_call_sparsity_torch": sp_whole_ref}
        print(f"  check {name}: {errors[name]}", flush=True)
        if err > args.tolerance:
            raise SystemExit(f"{name}: Triton output differs from the torch reference on the same selection by {err} "
                             f"(> {args.tolerance})")
    return errors


def bench_prefill(args, device, dtype, seq_len, profile: str) -> dict:
    q, k, v = synthetic_qkv(1, args.heads, args.kv_heads, seq_len, args.head_dim, dtype, device, seed=0, **PROFILES[profile])
    flops = 4 * seq_len * seq_len * args.head_dim * args.heads / 2
    dense, dense_name = dense_sdpa(q, k, v)
    dense_ms = timed(dense, device, args.reps)
    impl = "triton"
    own_dense = lambda: ops.block_sparse_attention(  # noqa: E731
        q, k, v, torch.ones(1, 1, -(-seq_len // args.block), -(-seq_len // args.block), dtype=torch.bool, device=device).tril(),
        block_size=args.block, implementation=impl)
    row = {
        "seq_len": seq_len,
        "input_profile": profile,
        "dense": {"impl": dense_name, "ms": dense_ms, "tflops": flops / dense_ms / 1e9},
        "block_sparse_kernel_all_blocks": {"ms": timed(own_dense, device, args.reps)},
    }
    row["block_sparse_kernel_all_blocks"]["tflops"] = flops / row["block_sparse_kernel_all_blocks"]["ms"] / 1e9
    sels = selections(args)
    for name, fn in prefill_algorithms(args).items():
        _, sparsity = fn(q, k, v, impl)
        ms = timed(lambda: fn(q, k, v, impl), device, args.reps)
        select, bs = sels[name]
        sel = select(q, k)
        est_ms = timed(lambda: select(q, k), device, args.reps)
        kern_ms = timed(lambda: batched_block_sparse_attention(q, k, v, sel, args.head_dim**-0.5, bs), device, args.reps)
        row[name] = {"ms": ms, "speedup_vs_dense": dense_ms / ms, "sparsity": sparsity,
                     "estimate_ms": est_ms, "kernel_ms": kern_ms}
        print(f"  [{profile}] S={seq_len:>7} {name:<15} {ms:9.2f} ms  {dense_ms / ms:5.2f}x dense  sparsity {sparsity:.3f} "
              f"(estimate {est_ms:.2f} ms, kernel {kern_ms:.2f} ms)", flush=True)
    print(f"  [{profile}] S={seq_len:>7} {'dense ' + dense_name:<15} {dense_ms:9.2f} ms  ({row['dense']['tflops']:.0f} TFLOP/s)", flush=True)
    del q, k, v
    return row


def bench_quest_decode(args, device, dtype, profile: str) -> dict:
    b, s, h, hkv, d, page = args.decode_batch, args.decode_len, args.heads, args.kv_heads, args.head_dim, 16
    q_all, k, v = synthetic_qkv(b, h, hkv, s, d, dtype, device, seed=2, **PROFILES[profile])
    q = q_all[:, :, -1].contiguous()  # [B, H, D]: the last position decodes
    del q_all
    k_pages, v_pages = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # a page per sequence
    kmin, kmax = page_minmax(k.transpose(1, 2), page)  # [B, P, Hkv, D]
    n_pg = kmin.shape[1]
    # The engine's layout: a paged min/max cache [blocks, pages_per_block, 2, Hkv, D] and its block table.
    minmax = torch.stack([kmin, kmax], dim=2).reshape(b * n_pg, 1, 2, hkv, d).contiguous()
    mm_tables = torch.arange(b * n_pg, dtype=torch.int32, device=device).view(b, n_pg)
    i32 = torch.int32
    kv_lens = torch.full((b,), s, dtype=i32, device=device)
    ones = torch.ones(b, dtype=i32, device=device)
    tables = torch.arange(b, dtype=i32, device=device)[:, None]
    tok0 = torch.arange(b, dtype=i32, device=device)
    tiles = decode_tiles(kv_lens, 0, 16)
    n_pages = torch.full((b,), -(-s // page), dtype=i32, device=device)
    budget_pages = args.quest_budget // page
    splits = default_num_splits(b, h, -(-args.quest_budget // 64), torch.device(device))
    out = torch.empty_like(q)

    def quest_step():
        sel = quest_topk(quest_scores_paged(q, minmax, mm_tables, kv_lens, page, n_pg), budget_pages, page)
        block_sparse_attention_launch(q, 0, tok0, out, 0, k_pages, v_pages, tables, ones, kv_lens, tiles, sel,
                                      d**-0.5, block_n=64, num_splits=splits)
        return out

    qd = q[:, :, None]

    def dense_step():
        return F.scaled_dot_product_attention(qd, k, v, enable_gqa=True)

    sel = quest_selection(page_scores(q, kmin, kmax), n_pages, budget_pages, page)
    sel_t = quest_topk(quest_scores_paged(q, minmax, mm_tables, kv_lens, page, n_pg), budget_pages, page)
    same_pages = float((sel_t.block_indices == sel.block_indices).float().mean())
    total, attended = per_sequence_pairs(tiles, sel, ones, kv_lens, h)
    sparsity = 1 - float(attended.sum()) / float(total.sum())
    ref = dense_step()[:, :, 0]
    mask_err = float((quest_step().float() - ref.float()).abs().max())  # a sparse approximation, for the record
    res = {"input_profile": profile, "decode_len": s, "batch": b, "token_budget": args.quest_budget, "page_size": page, "splits": splits,
           "sparsity": sparsity, "max_abs_diff_vs_dense": mask_err,
           "pages_same_as_torch_scores": same_pages}
    def graph_us(fn) -> float:
        """GPU time of fn captured in a CUDA graph (launch overhead excluded, as in a decode step)."""
        if device != "cuda":
            return timed(fn, device, 1) * 1e3
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timed(graph.replay, device, args.reps) * 1e3

    scores = quest_scores_paged(q, minmax, mm_tables, kv_lens, page, n_pg)
    res["dense_sdpa_us"] = graph_us(dense_step)
    res["quest_us"] = graph_us(quest_step)
    res["speedup_vs_dense"] = res["dense_sdpa_us"] / res["quest_us"]
    res["scores_us"] = graph_us(lambda: quest_scores_paged(q, minmax, mm_tables, kv_lens, page, n_pg))
    res["topk_us"] = graph_us(lambda: quest_topk(scores, budget_pages, page))
    res["sort_us"] = graph_us(lambda: torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :budget_pages].sort(-1))
    res["kernel_us"] = graph_us(lambda: block_sparse_attention_launch(
        q, 0, tok0, out, 0, k_pages, v_pages, tables, ones, kv_lens, tiles, sel, d**-0.5, block_n=64,
        num_splits=splits))
    res["dense_kernel_ours_us"] = graph_us(lambda: block_sparse_attention_launch(
        q, 0, tok0, out, 0, k_pages, v_pages, tables, ones, kv_lens, tiles, None, d**-0.5, block_n=64,
        dense_block=64, num_splits=default_num_splits(b, h, -(-s // 64), torch.device(device)),
        contiguous_pages=True))
    print(f"  decode S={s} B={b}: dense {res['dense_sdpa_us']:.1f} us, quest {res['quest_us']:.1f} us "
          f"({res['speedup_vs_dense']:.2f}x), sparsity {sparsity:.4f}; graph-captured parts: scores {res['scores_us']:.1f} us, "
          f"top-k {res['topk_us']:.1f} us, kernel {res['kernel_us']:.1f} us; our dense kernel "
          f"{res['dense_kernel_ours_us']:.1f} us", flush=True)
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="Tiny shapes on CPU under TRITON_INTERPRET=1.")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128, help="XAttention / FlexPrefill block size.")
    p.add_argument("--vs-block", type=int, default=64, help="Vertical-slash block size.")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--min-budget", type=int, default=1024)
    xatt, flex = XAttentionConfig(), FlexPrefillConfig()  # the library's defaults, so a plain run measures them
    p.add_argument("--xatt-local-window", type=int, default=xatt.local_window)
    p.add_argument("--xatt-dense-last-block", action=argparse.BooleanOptionalAction, default=xatt.dense_last_block)
    p.add_argument("--xatt-vertical-gamma", type=float, default=xatt.vertical_gamma)
    p.add_argument("--flex-local-window", type=int, default=flex.local_window)
    p.add_argument("--flex-dense-last-block", action=argparse.BooleanOptionalAction, default=flex.dense_last_block)
    p.add_argument("--vertical-size", type=int, default=1000)
    p.add_argument("--slash-size", type=int, default=6096)
    p.add_argument("--decode-len", type=int, default=131072)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--quest-budget", type=int, default=2048)
    p.add_argument("--check-len", type=int, default=4096)
    p.add_argument("--parts", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    p.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES),
                   help="Synthetic input profiles (benchmarks/synthetic_attention.py).")
    p.add_argument("--tolerance", type=float, default=2e-2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/block_sparse[_smoke].json).")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, dtype = "cpu", torch.float32
        args.seq_lens, args.heads, args.kv_heads, args.head_dim = [96], 4, 2, 32
        args.block, args.vs_block, args.stride, args.min_budget = 16, 16, 4, 16
        args.vertical_size, args.slash_size, args.check_len = 8, 8, 64
        args.decode_len, args.quest_budget, args.tolerance = 256, 64, 1e-4
        args.xatt_local_window, args.flex_local_window = min(args.xatt_local_window, 16), min(args.flex_local_window, 16)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke, or on the GPU host")
        device, dtype = "cuda", torch.bfloat16
    import triton

    result = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "shapes": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": str(dtype)},
        "params": {k: getattr(args, k) for k in ("threshold", "stride", "block", "gamma", "tau", "min_budget",
                                                 "xatt_local_window", "xatt_dense_last_block", "xatt_vertical_gamma", "flex_local_window",
                                                 "flex_dense_last_block", "vertical_size", "slash_size", "vs_block", "quest_budget")},
        "sparsity_definition": "The Sparse Frontier: fraction of causal (query, key) pairs over all query heads "
                               "not computed, counted from the kernel's index lists (decode: KV tokens not attended)",
    }
    if "prefill" in args.parts:
        print("correctness (Triton vs torch path, same selection)...", flush=True)
        result["correctness"] = check_correctness(args, device, dtype)
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                      "block_sparse_smoke.json" if args.cpu_smoke else "block_sparse.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def save():
        with open(out, "w") as f:
            json.dump(result, f, indent=2)

    result["prefill"], result["quest_decode"] = [], []
    for profile in args.profiles if "prefill" in args.parts else []:
        for s in args.seq_lens:
            result["prefill"].append(bench_prefill(args, device, dtype, s, profile))
            save()
    for profile in args.profiles if "decode" in args.parts else []:
        result["quest_decode"].append(bench_quest_decode(args, device, dtype, profile))
        save()
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

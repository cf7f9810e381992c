"""Attention kernel benchmark: our Triton prefill/decode (dense and skip-softmax) vs cuDNN SDPA and FlashInfer.

One process, one run: correctness first (every kernel vs a float64 torch reference on a small shape,
skip-softmax tile counts vs the torch simulation of the same rule), then timings with
triton.testing.do_bench(return_mode="median"), a short table last, and a JSON file. Decode (ours dense,
ours skip, FlashInfer) is timed by replaying a CUDA graph of the call, captured after a warm-up call that
compiles and autotunes, so the table measures the GPU and not Python's launch path (the eager do_bench time
is kept beside it as `*_eager_us`); prefill kernels run for milliseconds and are timed eagerly.

Shapes: H=32 query heads, Hkv=8, head_dim 128, bf16, paged KV cache (page 16 by default, pages in a
shuffled order). Prefill is one causal sequence of N tokens (TFLOP/s counts the causal half:
2·N²·H·D). Decode reads batch × kv_len tokens of K and V (TB/s = those bytes / time).

Skip-softmax is measured on a synthetic generator with attention sinks and RoPE locality (random q/k
give flat attention that nothing can skip; real models do not): per KV head a mean direction μ on the
fast-rotating RoPE channels, k_j = RoPE_j(μ + 0.8ε), q_i = RoPE_i(a_h μ + 0.8ε) with a per-query-head
sharpness a_h ∈ [0.9, 3], so q_i·k_j is large near the diagonal and averages out far away; the first 4
keys carry a large component on the slowest channel that every query shares (the sinks). For each
target tile sparsity (≈50%, ≈75%) the factor (λ = factor / kv_len) is found by bisection and the
achieved sparsity is reported next to every time.

    python benchmarks/attention_kernels.py                 # full run (GPU, ~5-8 minutes on an H100)
    python benchmarks/attention_kernels.py --quick         # fewer sizes
    python benchmarks/attention_kernels.py --quick --bound-skip --smollm2 8192   # + key-bound pre-skip, real inputs

--bound-skip also times every skip-softmax prefill row with the key min/max bound pre-skip (issue #4 item 3;
backends/key_bounds.py) and reports the fraction of tiles it skipped before QKᵀ. --smollm2 N adds skip-softmax
prefill rows on q/k/v captured from SmolLM2-135M layers (H=9, Hkv=3, D=64) on an N-token RULER-style prompt.
    TRITON_INTERPRET=1 python benchmarks/attention_kernels.py --quick --cpu-smoke   # CPU: tiny shapes, no speed
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import sys
import time

if "--cpu-smoke" in sys.argv:  # must precede the Triton import: kernels run in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sparse_llm.backends.base import AttentionMetadata, write_kv  # noqa: E402
from sparse_llm.backends.key_bounds import update_key_bounds  # noqa: E402
from sparse_llm.backends.paged_batch import random_paged_batch, reference_attention  # noqa: E402
from sparse_llm.backends.skip_softmax_torch import skip_softmax_paged_torch  # noqa: E402
from sparse_llm.kernels.decode import paged_decode  # noqa: E402
from sparse_llm.kernels.geometry import PREFILL_BLOCK_M, cdiv, decode_split_tiles, num_sms  # noqa: E402
from sparse_llm.kernels.prefill import paged_prefill  # noqa: E402

TARGETS = (0.5, 0.75)


# ----------------------------------------------------------------------------------------------- inputs
def rope(x: torch.Tensor, pos: torch.Tensor, base: float = 500000.0) -> torch.Tensor:
    """Llama-layout rotary embedding of x [n, heads, D] at positions pos [n] (float32 math)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None, None] * inv
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., : d // 2].float(), x[..., d // 2:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def synthetic_kv_q(n: int, q_pos: torch.Tensor, h: int, hkv: int, d: int, dtype, device, seed: int):
    """(k, v) [n, Hkv, D] and q [len(q_pos), H, D] with sinks and locality (see the module docstring)."""
    g = torch.Generator(device=device).manual_seed(seed)
    fast = (torch.arange(d, device=device) % (d // 2)) < d // 4
    mu = torch.randn(hkv, d, device=device, generator=g) * fast
    sharp = 3.0 * (0.3 + 0.7 * torch.rand(h, device=device, generator=g))
    low = torch.zeros(d, device=device)
    low[d // 2 - 1] = 1.0  # the slowest-rotating channel: position-independent
    pos = torch.arange(n, device=device)
    k = mu + 0.8 * torch.randn(n, hkv, d, device=device, generator=g)
    k[:4] += 30.0 * low
    k = rope(k, pos).to(dtype)
    v = torch.randn(n, hkv, d, device=device, generator=g).to(dtype)
    q = 0.8 * torch.randn(len(q_pos), h, d, device=device, generator=g)
    q = rope(q + sharp[:, None] * mu.repeat_interleave(h // hkv, 0) + 3.0 * low, q_pos).to(dtype)
    return k, v, q


def paged_cache(kv_lens, hkv, d, page, dtype, device, fill=None, seed=0):
    """A shuffled-page cache holding sequences of kv_lens; fill(i, n) -> (k, v) or None for random data."""
    nb = [cdiv(n, page) for n in kv_lens]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sum(nb), generator=g).to(device)
    tables = torch.zeros(len(kv_lens), max(nb), dtype=torch.int32, device=device)
    if fill is None:
        cache = torch.randn(sum(nb), 2, page, hkv, d, dtype=dtype, device=device)
    else:
        cache = torch.empty(sum(nb), 2, page, hkv, d, dtype=dtype, device=device)
    used = 0
    for i, n in enumerate(kv_lens):
        blocks = perm[used:used + nb[i]]
        tables[i, :nb[i]] = blocks
        used += nb[i]
        if fill is not None:
            k, v = fill(i, n)
            slots = blocks.long()[torch.arange(n, device=device) // page] * page + torch.arange(n, device=device) % page
            write_kv(cache, k, v, slots)
    return cache, tables


def metadata(q_lens, kv_lens, num_prefills, tables, page, device) -> AttentionMetadata:
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    return AttentionMetadata(
        num_prefills=num_prefills, num_prefill_tokens=sum(q_lens[:num_prefills]), cu_seqlens_q=cu.to(device),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device), max_seqlen_q=max(q_lens),
        max_seqlen_k=max(kv_lens), slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64, device=device),
        block_tables=tables, block_size=page, seq_lens_cpu=list(kv_lens), query_lens_cpu=list(q_lens),
    )


def key_bounds_of(cache, tables, kv_lens):
    """The per-block key min/max cache of the sequences in `cache`, as the Triton backend keeps it."""
    page = cache.shape[2]
    bounds = torch.empty(cache.shape[0], 2, cache.shape[3], cache.shape[4], dtype=cache.dtype, device=cache.device)
    for i, n in enumerate(kv_lens):
        pos = torch.arange(n, device=cache.device)
        update_key_bounds(cache, bounds, tables[i, pos // page].long() * page + pos % page, has_prefill=True)
    return bounds


# ----------------------------------------------------------------------------------------------- timing
def timer(device):
    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def once(fn):  # CPU smoke: the interpreter's time means nothing; run once to exercise the path
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return once


def graph_timer(device):
    """Median ms of fn replayed from a CUDA graph: the GPU's time without the host's launch overhead.

    fn runs eagerly first (compiles and autotunes every kernel it launches: the autotuner's benchmarking
    cannot run inside a capture), then its launch sequence is captured once and the replay is timed.
    Decode at batch 1 is otherwise Python-launch bound (~150 µs eager floor vs ~68 µs replayed at 32K).
    """
    if device.type != "cuda":
        return timer(device)

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = triton.testing.do_bench(graph.replay, return_mode="median")
        del graph
        return ms

    return bench


def flashinfer_planner(args, device, dtype):
    if args.cpu_smoke or args.no_flashinfer or importlib.util.find_spec("flashinfer") is None:
        return None
    from sparse_llm.backends.flashinfer_backend import FlashInferPlanner, import_flashinfer

    scale = args.head_dim ** -0.5
    fi = import_flashinfer()
    return FlashInferPlanner(fi, device, args.heads, args.kv_heads, args.head_dim, scale, dtype, dtype)


# ----------------------------------------------------------------------------------------------- correctness
def check_correctness(args, device, dtype, planner) -> dict:
    """Small mixed shapes: dense kernels vs float64 attention; skip kernels vs the torch simulation."""
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    scale, tol = d ** -0.5, (2e-2 if dtype == torch.bfloat16 else 1e-4)
    q_lens, kv_lens = ([300, 77], [700, 77]) if not args.cpu_smoke else ([40, 9], [90, 9])
    res = {}
    b = random_paged_batch(q_lens, kv_lens, 2, h, hkv, d, args.page_size, dtype, device, seed=1, sink_logit=8.0)
    write_kv(b.cache["kv"], b.k, b.v, b.meta.slot_mapping)
    m, kv = b.meta, b.cache["kv"]
    ref = reference_attention(b, scale)
    out = paged_prefill(b.q, kv, m.cu_seqlens_q, m.seq_lens, m.block_tables, m.max_seqlen_q, scale)
    res["prefill_dense_max_err"] = float((out.double() - ref).abs().max())
    lam = torch.log(torch.tensor([40.0 / kv_lens[0], 8.0 / kv_lens[1]], device=device))
    stats = torch.zeros(2, 2, dtype=torch.int32, device=device)
    out = paged_prefill(b.q, kv, m.cu_seqlens_q, m.seq_lens, m.block_tables, m.max_seqlen_q, scale, lam, stats)
    sim, counts = skip_softmax_paged_torch(b.q.double(), kv.double(), m, scale, "prefill", lam)
    res["prefill_skip_max_err"] = float((out.double() - sim).abs().max())
    res["prefill_skip_counts"] = {"kernel": stats.tolist(), "torch": counts.tolist()}
    if args.bound_skip:  # the bound may only drop QKᵀ of tiles the rule skips: same output, same skip counts
        bstats = torch.zeros(2, 3, dtype=torch.int32, device=device)
        bout = paged_prefill(b.q, kv, m.cu_seqlens_q, m.seq_lens, m.block_tables, m.max_seqlen_q, scale, lam, bstats,
                             key_bounds=key_bounds_of(kv, m.block_tables, kv_lens))
        res["prefill_bound_max_err"] = float((bout.double() - sim).abs().max())
        res["prefill_bound_same_skips"] = bool(torch.equal(bstats[:, :2], stats))
    if planner is not None:
        planner.plan(m, args.page_size)
        res["flashinfer_prefill_max_err"] = float((planner.prefill.run(b.q, kv).double() - ref).abs().max())

    dl = [513, 2000, 64] if not args.cpu_smoke else [70, 33]
    b = random_paged_batch([1] * len(dl), dl, 0, h, hkv, d, args.page_size, dtype, device, seed=2, sink_logit=8.0)
    write_kv(b.cache["kv"], b.k, b.v, b.meta.slot_mapping)
    m, kv = b.meta, b.cache["kv"]
    ref = reference_attention(b, scale)
    out = paged_decode(b.q, kv, m.seq_lens, m.block_tables, max(dl), scale)
    res["decode_dense_max_err"] = float((out.double() - ref).abs().max())
    lam = torch.log(torch.tensor([20.0 / n for n in dl], device=device))
    stats = torch.zeros(len(dl), 2, dtype=torch.int32, device=device)
    out = paged_decode(b.q, kv, m.seq_lens, m.block_tables, max(dl), scale, lam, stats)
    sim, counts = skip_softmax_paged_torch(b.q.double(), kv.double(), m, scale, "decode", lam)
    res["decode_skip_max_err"] = float((out.double() - sim).abs().max())
    res["decode_skip_counts"] = {"kernel": stats.tolist(), "torch": counts.tolist()}
    if planner is not None:
        planner.plan(m, args.page_size)
        res["flashinfer_decode_max_err"] = float((planner.decode.run(b.q, kv).double() - ref).abs().max())

    errs_ok = all(v <= tol for k, v in res.items() if k.endswith("max_err"))
    counts_ok = all(_counts_close(res[k]) for k in ("prefill_skip_counts", "decode_skip_counts"))
    counts_ok = counts_ok and res.get("prefill_bound_same_skips", True)
    res["tolerance"] = tol
    res["ok"] = errs_ok and counts_ok
    return res


def _counts_close(c) -> bool:
    """Exact in CI (fp32/fp16); on bf16 GPUs allow a 0.1% flip of near-tie decisions."""
    k, t = torch.tensor(c["kernel"]), torch.tensor(c["torch"])
    return bool(torch.equal(k[:, 0], t[:, 0]) and (k[:, 1] - t[:, 1]).abs().sum() <= 1e-3 * t[:, 0].sum())


# ----------------------------------------------------------------------------------------------- prefill
def bench_prefill(args, device, dtype, planner, bench) -> tuple[list, list]:
    """Dense rows (ours / cuDNN / FlashInfer) and skip-softmax rows for every prefill length."""
    dense_rows, skip_rows = [], []
    for n in args.prefill_lens:
        dense, skips = _prefill_one(n, args, device, dtype, planner, bench)
        dense_rows.append(dense)
        skip_rows.extend(skips)
        _free(device)
    return dense_rows, skip_rows


def _prefill_one(n, args, device, dtype, planner, bench) -> tuple[dict, list]:
    h, hkv, d, page = args.heads, args.kv_heads, args.head_dim, args.page_size
    scale = d ** -0.5
    k, v, q = synthetic_kv_q(n, torch.arange(n, device=device), h, hkv, d, dtype, device, seed=n)
    cache, tables = paged_cache([n], hkv, d, page, dtype, device, fill=lambda i, _: (k, v))
    m = metadata([n], [n], 1, tables, page, device)
    flops = 2.0 * n * n * h * d  # causal half of 4·N²·H·D

    def ours(lam=None, stats=None, bounds=None):
        bm = args.skip_block_m if lam is not None and args.skip_block_m else PREFILL_BLOCK_M
        return paged_prefill(q, cache, m.cu_seqlens_q, m.seq_lens, m.block_tables, n, scale, lam, stats,
                             key_bounds=bounds, block_m=bm)

    row = {"seq_len": n, "ours_ms": bench(ours)}
    row["ours_tflops"] = flops / row["ours_ms"] * 1e-9
    if device.type == "cuda":
        row.update(_cudnn_prefill(q, k, v, h, hkv, scale, bench, flops))
    if planner is not None:
        planner.plan(m, page)
        row["flashinfer_ms"] = bench(lambda: planner.prefill.run(q, cache))
        row["flashinfer_tflops"] = flops / row["flashinfer_ms"] * 1e-9
    if n not in args.skip_lens:
        return row, []
    return row, _skip_rows(args, ours, cache, tables, n, row, device, bench, "synthetic")


def _skip_rows(args, ours, cache, tables, n, dense_row, device, bench, source) -> list:
    """Skip-softmax rows at ≈50% / ≈75% tile sparsity; with --bound-skip also the key-bound build."""
    bounds = key_bounds_of(cache, tables, [n]) if args.bound_skip else None
    flops = 2.0 * n * n * args.heads * args.head_dim if source == "synthetic" else dense_row["flops"]
    rows = []
    for target in TARGETS:
        factor, sparsity = _find_factor(lambda f: _prefill_sparsity(ours, f, n, device), target, n, args.search_steps)
        lam = torch.tensor([math.log(factor / n)], device=device)
        ms = bench(lambda lam=lam: ours(lam))
        r = {
            "source": source, "seq_len": n, "target": target, "factor": factor, "sparsity": sparsity, "ms": ms,
            "tflops_dense_equivalent": flops / ms * 1e-9,
            "speedup_vs_ours_dense": dense_row["ours_ms"] / ms,
            "speedup_vs_cudnn": dense_row["cudnn_ms"] / ms if dense_row.get("cudnn_ms") else None,
        }
        if bounds is not None:
            stats = torch.zeros(1, 3, dtype=torch.int32, device=device)
            ours(lam, stats, bounds)
            total, skipped, pre = stats[0].tolist()
            r["bound_ms"] = bench(lambda lam=lam: ours(lam, None, bounds))
            r["pre_skipped"] = pre / total  # of all visited tiles
            r["bound_caught"] = pre / skipped if skipped else None  # of the skipped tiles
            r["bound_same_skips"] = skipped / total == sparsity
            r["speedup_bound_vs_skip"] = ms / r["bound_ms"]
        rows.append(r)
    return rows


def bench_smollm2(args, device, dtype, planner, bench) -> tuple[list, list]:
    """Dense and skip-softmax rows on q/k/v captured from SmolLM2 layers (one prompt of ≈args.smollm2 tokens)."""
    from smollm2_capture import capture_prefill_qkv

    captured = capture_prefill_qkv(args.smollm2, args.smollm2_layers, args.model, device, dtype)
    dense_rows, skip_rows = [], []
    for layer, (q, k, v) in sorted(captured.items()):
        n, h, d = q.shape
        hkv, scale, page = k.shape[1], d ** -0.5, args.page_size
        cache, tables = paged_cache([n], hkv, d, page, dtype, device, fill=lambda i, _: (k, v))
        m = metadata([n], [n], 1, tables, page, device)

        def ours(lam=None, stats=None, bounds=None, q=q, cache=cache, m=m, n=n, scale=scale):
            return paged_prefill(q, cache, m.cu_seqlens_q, m.seq_lens, m.block_tables, n, scale, lam, stats,
                                 key_bounds=bounds)

        source = f"smollm2-layer{layer}"
        row = {"source": source, "seq_len": n, "heads": h, "kv_heads": hkv, "head_dim": d,
               "flops": 2.0 * n * n * h * d, "ours_ms": bench(ours)}
        row["ours_tflops"] = row["flops"] / row["ours_ms"] * 1e-9
        dense_rows.append(row)
        skip_rows.extend(_skip_rows(args, ours, cache, tables, n, row, device, bench, source))
        _free(device)
    return dense_rows, skip_rows


def _cudnn_prefill(q, k, v, h, hkv, scale, bench, flops) -> dict:
    """torch SDPA forced onto cuDNN; K/V pre-expanded to H heads outside the timed region."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt = q.transpose(0, 1)[None].contiguous()  # [1, H, N, D]
    kt = k.transpose(0, 1)[None].repeat_interleave(h // hkv, 1).contiguous()
    vt = v.transpose(0, 1)[None].repeat_interleave(h // hkv, 1).contiguous()
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ms = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale))
    except RuntimeError as e:  # cuDNN SDPA unavailable for this build / shape: report, do not fake
        return {"cudnn_error": str(e)[:200]}
    return {"cudnn_ms": ms, "cudnn_tflops": flops / ms * 1e-9}


def _prefill_sparsity(ours, factor, n, device) -> float:
    stats = torch.zeros(1, 2, dtype=torch.int32, device=device)
    ours(torch.tensor([math.log(factor / n)], device=device), stats)
    total, skipped = stats[0].tolist()
    return skipped / total


def _find_factor(sparsity_of, target, kv_len, steps) -> tuple[float, float]:
    """Bisection on log(factor) in (1e-3, 0.99·kv_len) for the tile sparsity closest to `target`."""
    lo, hi = math.log(1e-3), math.log(0.99 * kv_len)
    best = None
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        s = sparsity_of(math.exp(mid))
        if best is None or abs(s - target) < abs(best[1] - target):
            best = (math.exp(mid), s)
        if abs(s - target) < 0.01:
            break
        lo, hi = (mid, hi) if s < target else (lo, mid)
    return best


# ----------------------------------------------------------------------------------------------- decode
def bench_decode(args, device, dtype, planner, bench) -> tuple[list, list]:
    """Dense rows (ours / FlashInfer) for every (kv_len, batch); skip rows at ≈50% tile sparsity.

    Every decode time is a CUDA-graph replay (`graph_timer`: launch overhead excluded, as in the engine's
    captured decode step); the eager do_bench time of the same call is kept as `*_eager_us`.
    """
    dense_rows, skip_rows = [], []
    for n in args.decode_lens:
        batches = [b for b in args.decode_batches if _fits(b * n * args.kv_heads * args.head_dim * 4 * 1.1, device)]
        if batches:
            dense_rows.extend(_decode_dense(n, batches, args, device, dtype, planner, bench))
            _free(device)
    for n, b in args.skip_decode:
        if _fits(b * n * args.kv_heads * args.head_dim * 4 * 2.5, device):
            skip_rows.append(_decode_skip(n, b, args, device, dtype, bench))
            _free(device)
    return dense_rows, skip_rows


def _decode_dense(n, batches, args, device, dtype, planner, bench) -> list:
    """Random K/V (speed does not depend on the data when nothing is skipped); one cache, batch prefixes."""
    h, hkv, d, page = args.heads, args.kv_heads, args.head_dim, args.page_size
    scale = d ** -0.5
    cache, tables = paged_cache([n] * max(batches), hkv, d, page, dtype, device)
    q_all = torch.randn(max(batches), h, d, dtype=dtype, device=device)
    rows = []
    graph_bench = graph_timer(device)
    for b in batches:
        q, lens, bt = q_all[:b], torch.full((b,), n, dtype=torch.int32, device=device), tables[:b]
        out = torch.empty_like(q)
        row = {"kv_len": n, "batch": b, "bytes": b * n * hkv * d * 2 * cache.element_size()}

        def ours():
            return paged_decode(q, cache, lens, bt, n, scale, out=out)  # noqa: B023

        row["ours_us"] = 1e3 * graph_bench(ours)
        row["ours_config"] = _decode_config()
        row["ours_eager_us"] = 1e3 * bench(ours)
        row["ours_tbps"] = row["bytes"] / row["ours_us"] * 1e-6
        if planner is not None:
            planner.plan(metadata([1] * b, [n] * b, 0, bt, page, device), page)
            row.update(_flashinfer_decode_us(lambda: planner.decode.run(q, cache), graph_bench, bench))  # noqa: B023
            row["flashinfer_tbps"] = row["bytes"] / row["flashinfer_us"] * 1e-6
        rows.append(row)
    return rows


def _flashinfer_decode_us(run, graph_bench, bench) -> dict:
    """FlashInfer's decode replayed from a CUDA graph; eager (and said so) if its wrapper cannot be captured."""
    res = {"flashinfer_eager_us": 1e3 * bench(run)}
    try:
        res["flashinfer_us"], res["flashinfer_timing"] = 1e3 * graph_bench(run), "cuda_graph"
    except RuntimeError as e:  # a wrapper not planned for capture: the eager time is the only honest number
        torch.cuda.synchronize()
        res["flashinfer_us"] = res["flashinfer_eager_us"]
        res["flashinfer_timing"] = f"eager (graph capture failed: {str(e)[:120]})"
    return res


def _decode_config() -> str | None:
    """The autotuner's choice for the last decode launch (warps / stages / register cap), for the record."""
    from sparse_llm.kernels.decode import _decode_kernel

    cfg = getattr(_decode_kernel, "best_config", None)
    return None if cfg is None else str(cfg)


def _decode_skip(n, b, args, device, dtype, bench) -> dict:
    """Synthetic sequences (one seed each); the factor is searched for ≈50% tile sparsity."""
    h, hkv, d, page = args.heads, args.kv_heads, args.head_dim, args.page_size
    scale = d ** -0.5
    last = torch.tensor([n - 1], device=device)
    data = [synthetic_kv_q(n, last, h, hkv, d, dtype, device, seed=i) for i in range(b)]
    cache, tables = paged_cache([n] * b, hkv, d, page, dtype, device, fill=lambda i, _: data[i][:2])
    q = torch.cat([x[2] for x in data])
    data.clear()
    lens = torch.full((b,), n, dtype=torch.int32, device=device)

    out = torch.empty_like(q)

    def run(lam=None, stats=None):
        return paged_decode(q, cache, lens, tables, n, scale, lam, stats, out=out)

    def sparsity(f):
        stats = torch.zeros(b, 2, dtype=torch.int32, device=device)
        run(torch.full((b,), math.log(f / n), device=device), stats)
        total, skipped = stats.sum(0).tolist()
        return skipped / total

    graph_bench = graph_timer(device)
    row = {"kv_len": n, "batch": b, "split_tiles_dense": decode_split_tiles(n, b, hkv, num_sms(device)),
           "split_tiles_skip": decode_split_tiles(n, b, hkv, num_sms(device), skip=True)}
    row["dense_us"] = 1e3 * graph_bench(run)
    row["dense_config"] = _decode_config()
    row["dense_eager_us"] = 1e3 * bench(run)
    row["factor"], row["sparsity"] = _find_factor(sparsity, 0.5, n, args.search_steps)
    lam = torch.full((b,), math.log(row["factor"] / n), device=device)
    row["skip_us"] = 1e3 * graph_bench(lambda: run(lam))
    row["skip_config"] = _decode_config()
    row["skip_eager_us"] = 1e3 * bench(lambda: run(lam))
    # The skip build with λ off (nothing skipped): its cost over dense (sink seed, vote, unpipelined V) on its own.
    off = torch.full((b,), -math.inf, device=device)
    row["skip_off_us"] = 1e3 * graph_bench(lambda: run(off))
    row["speedup_vs_ours_dense"] = row["dense_us"] / row["skip_us"]
    row["speedup_eager"] = row["dense_eager_us"] / row["skip_eager_us"]
    return row


def _fits(nbytes: float, device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes + 2 * 2**30 < free


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- report
def table(result: dict) -> str:
    def f(x, fmt="{:.0f}"):
        return "-" if x is None else fmt.format(x)

    lines = ["dense prefill (TFLOP/s)        ours   cuDNN  FlashInfer  ours/cuDNN"]
    for r in result["prefill_dense"]:
        ratio = r["cudnn_ms"] / r["ours_ms"] if r.get("cudnn_ms") else None
        lines.append(f"  N={r['seq_len']:>6}                 {f(r['ours_tflops']):>6} {f(r.get('cudnn_tflops')):>7} "
                     f"{f(r.get('flashinfer_tflops')):>11}  {f(ratio, '{:.2f}'):>10}")
    lines.append("skip-softmax prefill           sparsity  factor      ms  x ours-dense  x cuDNN"
                 "  | bound: ms  pre-skip  caught  x skip")
    for r in result["prefill_skip"] + result.get("smollm2_skip", []):
        bound = "" if "bound_ms" not in r else (
            f"  | {r['bound_ms']:>9.2f} {r['pre_skipped']:>8.1%} {f(r['bound_caught'], '{:.1%}'):>7}"
            f" {r['speedup_bound_vs_skip']:>6.2f}")
        name = "" if r.get("source", "synthetic") == "synthetic" else r["source"]
        lines.append(f"  N={r['seq_len']:>6} {name:<17}{r['sparsity']:>8.1%} {r['factor']:>8.3g}"
                     f" {r['ms']:>7.2f} {r['speedup_vs_ours_dense']:>10.2f} {f(r['speedup_vs_cudnn'], '{:.2f}'):>8}"
                     + bound)
    lines.append("dense decode, CUDA graph (us | TB/s)  ours            FlashInfer      FI/ours time"
                 "  | eager us: ours  FI")
    for r in result["decode_dense"]:
        fi = r.get("flashinfer_us")
        ratio = fi / r["ours_us"] if fi else None
        fi_note = "" if r.get("flashinfer_timing", "cuda_graph") == "cuda_graph" else " (FI eager)"
        lines.append(f"  kv={r['kv_len']:>6} b={r['batch']:>3}         {r['ours_us']:>8.1f} | {r['ours_tbps']:.2f}   "
                     f"{f(fi, '{:.1f}'):>8} | {f(r.get('flashinfer_tbps'), '{:.2f}')}   {f(ratio, '{:.2f}'):>6}"
                     f"  | {r['ours_eager_us']:>8.1f} {f(r.get('flashinfer_eager_us'), '{:.1f}'):>6}{fi_note}")
    lines.append("skip-softmax decode, CUDA graph  sparsity  dense us  skip us  speedup  skip λ-off us"
                 "  | eager: dense  skip  speedup")
    for r in result["decode_skip"]:
        lines.append(f"  kv={r['kv_len']:>6} b={r['batch']:>3}            {r['sparsity']:>7.1%} {r['dense_us']:>9.1f} "
                     f"{r['skip_us']:>8.1f} {r['speedup_vs_ours_dense']:>8.2f} {r['skip_off_us']:>14.1f}"
                     f"  | {r['dense_eager_us']:>12.1f} {r['skip_eager_us']:>5.1f} {r['speedup_eager']:>8.2f}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes (8K/32K prefill, 8K/32K decode)")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, no speed")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention_kernels_<gpu>.json)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer even if it is installed")
    ap.add_argument("--bound-skip", action="store_true",
                    help="also time skip-softmax prefill with the key min/max bound pre-skip (pre-skip fraction reported)")
    ap.add_argument("--prefill-only", action="store_true", help="skip the decode sections")
    ap.add_argument("--skip-block-m", type=int, default=None, metavar="ROWS",
                    help="query rows per tile of the skip-softmax prefill rows (synthetic input; default the "
                         "library's 128): the skip decision is per query tile, so fewer rows vote and one "
                         "warpgroup needs no cross-warpgroup reduction; the dense rows keep 128")
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill sections (and --smollm2)")
    ap.add_argument("--smollm2", type=int, default=0, metavar="N",
                    help="also skip-softmax prefill on q/k/v captured from SmolLM2 layers on an N-token prompt (<= 8192)")
    ap.add_argument("--smollm2-layers", type=int, nargs="+", default=[2, 15, 28], help="layers captured for --smollm2")
    ap.add_argument("--model", default=None, help="checkpoint for --smollm2 (default: the bundled SmolLM2 GGUF)")
    args = ap.parse_args(argv)
    if args.prefill_only and args.decode_only:
        ap.error("--prefill-only and --decode-only exclude each other")
    if args.cpu_smoke:
        args.heads, args.kv_heads, args.head_dim = 4, 1, 64
        args.prefill_lens, args.skip_lens, args.search_steps = [256], [256], 3
        args.decode_lens, args.decode_batches, args.skip_decode = [300], [1, 2], [(300, 2)]
    else:
        args.heads, args.kv_heads, args.head_dim, args.search_steps = 32, 8, 128, 12
        args.prefill_lens = [8192, 32768] if args.quick else [8192, 32768, 131072]
        args.skip_lens = [32768] if args.quick else [32768, 131072]
        args.decode_lens = [8192, 32768] if args.quick else [8192, 32768, 131072]
        args.decode_batches = [1, 16, 64]
        args.skip_decode = [(32768, 16)] if args.quick else [(8192, 64), (32768, 16), (131072, 1)]
    return args



def result_path(name: str, device: torch.device, cpu_smoke: bool, out: str | None) -> tuple[str, str]:
    """(device name, JSON path): benchmarks/results/<name>_<gpu slug>.json unless --out names one."""
    gpu = "cpu-smoke" if cpu_smoke else torch.cuda.get_device_name(device)
    slug = gpu.lower().replace("nvidia", "").strip().replace(" ", "-")
    return gpu, out or os.path.join("benchmarks", "results", f"{name}_{slug}.json")

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--cpu-smoke needs TRITON_INTERPRET=1 before Triton is imported (run this file directly)")
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or use --quick --cpu-smoke for a CPU smoke run")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    gpu, out_path = result_path("attention_kernels", device, args.cpu_smoke, args.out)
    bench = timer(device)
    planner = flashinfer_planner(args, device, dtype)
    result = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
        "flashinfer": _version("flashinfer") if planner is not None else None,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                  "dtype": str(dtype).replace("torch.", ""), "page_size": args.page_size,
                  "skip_prefill_block_m": args.skip_block_m or PREFILL_BLOCK_M},
    }
    t0 = time.time()
    result["correctness"] = check_correctness(args, device, dtype, planner)
    print("correctness:", json.dumps(result["correctness"]), flush=True)
    if not result["correctness"]["ok"]:
        _write(out_path, result)
        print(f"correctness check FAILED; no timings. Wrote {out_path}")
        return 1
    result["prefill_dense"], result["prefill_skip"] = (
        ([], []) if args.decode_only else bench_prefill(args, device, dtype, planner, bench)
    )
    print(f"prefill done after {time.time() - t0:.0f} s", flush=True)
    if args.smollm2 and not args.decode_only:
        result["smollm2_dense"], result["smollm2_skip"] = bench_smollm2(args, device, dtype, planner, bench)
        print(f"smollm2 done after {time.time() - t0:.0f} s", flush=True)
    result["decode_dense"], result["decode_skip"] = (
        ([], []) if args.prefill_only else bench_decode(args, device, dtype, planner, bench)
    )
    result["seconds"] = round(time.time() - t0, 1)
    _write(out_path, result)
    print(table(result))
    print(f"wrote {out_path} ({result['seconds']} s)")
    return 0


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (module, f"{module}-python"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())

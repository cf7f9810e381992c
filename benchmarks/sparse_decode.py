"""Page-sparse decode step (RocketKV, Quest per KV head, Quest per query head) vs dense decode, as the Triton
backends run it.

The timed sparse step is the whole decode attention of one layer: page scores from the paged min/max cache
(Triton), top-k pages per KV head (Triton sorts of per-chunk candidates), page-sparse attention (Triton, K/V read once per GQA
group; once per query head for Quest's default per-query-head lists), i.e. `backends.page_select.page_sparse_step`.
Dense baselines: our split-KV Triton decode, torch SDPA (enable_gqa, on a contiguous [B, Hkv, S, D] copy of
the K/V) and FlashInfer's BatchDecodeWithPagedKVCacheWrapper (only when installed). Every step is captured in a CUDA graph and
timed by replay (triton.testing.do_bench, median): launch overhead excluded, as in a graph-captured engine.

Shapes: H=32, Hkv=8, D=128, bf16 K/V, KV block 16 tokens in shuffled order, every sequence at kv_len.
RocketKV at its defaults (topr=128 = all channels, topk=64 pages of 4 tokens, float8_e5m2 KT cache), two cases:
  * "rocket_uncompacted": decoding over the whole kv_len context (worst case: no prompt compression).
  * "rocket_defaults": what the engine runs at the defaults. After prefill the prompt of kv_len tokens is
    compressed to prompt_budget (2048) tokens per KV head, so the step runs over a cache of prompt_budget + 64
    decode tokens, while dense decode reads all kv_len tokens. `step_us` is the step as the engine's decode
    CUDA graph runs it: block tables as wide as max_model_len (kv_len + 64), so page ranking is sized for
    max_model_len / page_size pages (masked past the cache); `step_tight_us` sizes it for the compacted cache;
    `engine_step_us` adds the KT refresh of the current page and the page counting (kernels/page_bookkeeping.py),
    i.e. all the backend's decode work after the KV write (dense's KV write is not timed either).
    Page sparsity is reported relative to the full context and relative to the compacted cache.
Quest: 2K token budget in 16-token pages (127 ranked pages + the current one), bf16 min/max, two modes
(QuestConfig.selection): "quest_kv_head" (one list per KV head, group-reduced scores) and "quest_query_head"
(the default: one list per query head, raw bounds; 4x the K/V traffic of the KV-head mode at GQA 4).
K/V are random (selection cost and attention cost do not depend on the values; achieved page sparsity is
fixed by the budget and reported from the kernel's own page lists).

Correctness first, on a small shape with the same head layout: the Triton selection vs the torch reference
(`rocket_select.select_pages`, same pages up to near-ties) and the Triton output vs float64 attention over
the Triton-selected pages.

    python benchmarks/sparse_decode.py                        # GPU: 32K and 128K, batch 1 and 16 (~2 min)
    python benchmarks/sparse_decode.py --algorithms quest_query_head quest_kv_head   # Quest's two modes only
    TRITON_INTERPRET=1 python benchmarks/sparse_decode.py --cpu-smoke   # CPU: tiny shapes, no speed
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time

if "--cpu-smoke" in sys.argv:  # must precede the Triton import: kernels run in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_llm.backends.base import AttentionMetadata  # noqa: E402
from sparse_llm.backends.page_select import page_sparse_step  # noqa: E402
from sparse_llm.backends.rocket_select import select_pages  # noqa: E402
from sparse_llm.kernels.decode import paged_decode  # noqa: E402
from sparse_llm.kernels.page_bookkeeping import count_decode_pages, refresh_current_page_minmax  # noqa: E402
from sparse_llm.kernels.page_scores import group_page_scores, select_top_pages  # noqa: E402
from sparse_llm.kernels.page_sparse_decode import page_sparse_decode, page_sparse_decode_reference  # noqa: E402
from sparse_llm.sparse.quest import page_scores, quest_selection  # noqa: E402

BLOCK = 16


def make_cache(b, n, hkv, d, dtype, device, seed=0):
    """Random K/V [blocks, 2, BLOCK, Hkv, D] for b sequences of n tokens, blocks in shuffled order."""
    nb = -(-n // BLOCK)
    g = torch.Generator(device=device).manual_seed(seed)
    cache = torch.randn(b * nb, 2, BLOCK, hkv, d, dtype=dtype, device=device, generator=g)
    perm = torch.randperm(b * nb, device=device, generator=g).to(torch.int32)
    return cache, perm.view(b, nb)


def kt_cache(cache, page_size, dtype):
    """RocketKV's KT cache [blocks, 2, BLOCK // page_size, Hkv, D]: (min, max) of the keys of every page."""
    k = cache[:, 0].float()
    nb, _, hkv, d = k.shape
    kp = k.view(nb, BLOCK // page_size, page_size, hkv, d)
    return torch.stack([kp.amin(2), kp.amax(2)], 1).to(dtype).contiguous()


def minmax_views(cache, page_size, dtype):
    """(lo, hi) [blocks, BLOCK // page_size, Hkv, D] views of one `kt_cache` allocation."""
    kt = kt_cache(cache, page_size, dtype)
    return kt[:, 0], kt[:, 1]


def graph_us(fn, device, reps) -> float:
    """Median microseconds of fn replayed from a CUDA graph (one eager run first: compiles the kernels)."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * float(triton.testing.do_bench(graph.replay, warmup=25, rep=reps, return_mode="median"))


ALGORITHMS = ("rocket", "quest_kv_head", "quest_query_head")


def algorithms(args):
    """name -> (page_size, min/max dtype, ranked pages k, topr, per_query_head), the ones in args.algorithms."""
    quest_k = args.quest_budget // args.quest_page - 1
    every = {
        "rocket": (args.rocket_page, torch.float8_e5m2, args.rocket_topk, args.head_dim, False),
        "quest_kv_head": (args.quest_page, getattr(torch, args.quest_minmax_dtype), quest_k, args.head_dim, False),
        "quest_query_head": (args.quest_page, getattr(torch, args.quest_minmax_dtype), quest_k, args.head_dim, True),
    }
    return {name: every[name] for name in ALGORITHMS if name in args.algorithms}


def reference_selection(q, kmin, kmax, n_pages, topr, k, scale, per_query_head, page_size) -> torch.Tensor:
    """bool [B, lists, P]: the torch reference's pages (current page included), float64 min/max."""
    if not per_query_head:
        return select_pages(q.double(), kmin, kmax, n_pages, topr, k, scale)
    b, h = q.shape[:2]
    p = kmin.shape[1]
    sel = quest_selection(page_scores(q.double(), kmin, kmax), n_pages, k + 1, page_size)
    mask = torch.zeros(b, h, p + k + 1, dtype=torch.bool, device=q.device)
    mask.scatter_(-1, sel.block_indices.view(b, h, -1).long(), True)
    return mask[..., :p] & (torch.arange(p, device=q.device)[None, None, :] < n_pages[:, None, None])


def check_correctness(args, device, dtype) -> dict:
    """Small shape: Triton selection vs torch reference; Triton output vs float64 over the same pages."""
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    lens = [4099, 1000, 77] if device.type == "cuda" else [300, 77]
    b, n = len(lens), max(lens)
    cache, tables = make_cache(b, n, hkv, d, dtype, device, seed=1)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(b, h, d, dtype=dtype, device=device)
    scale = d ** -0.5
    res = {"ok": True}
    for name, (ps, mm_dtype, k, topr, per_head) in algorithms(args).items():
        k = min(k, 8) if device.type != "cuda" else k
        lo, hi = minmax_views(cache, ps, mm_dtype)
        max_pages = -(-n // ps)
        out, pages = page_sparse_step(q, cache, lo, hi, tables, seq_lens, ps, max_pages, topr, k, scale,
                                      per_query_head=per_head)
        # torch reference selection on the same min/max values
        p = torch.arange(max_pages, device=device)
        blk = tables.long()[:, (p // (BLOCK // ps)).clamp(max=tables.shape[1] - 1)]
        kmin, kmax = lo[blk, p % (BLOCK // ps)].double(), hi[blk, p % (BLOCK // ps)].double()
        n_pages = (seq_lens.long() + ps - 1) // ps
        want = reference_selection(q, kmin, kmax, n_pages, topr, k, scale, per_head, ps)
        got = torch.zeros(b, pages.shape[1], max_pages + 1, dtype=torch.bool, device=device)  # last column: -1 slots
        got.scatter_(-1, torch.where(pages >= 0, pages, max_pages).long(), True)
        got = got[..., :max_pages]
        got[torch.arange(b, device=device), :, n_pages - 1] = True
        agree = float((got & want).sum() / want.sum())  # selected pages in common (near-ties may flip)
        ref = page_sparse_decode_reference(q, cache, pages, tables, seq_lens, ps, scale)
        err = float((out.double() - ref).abs().max())
        # The graph shape (block tables padded with zeros to a wider max_model_len) must select the same pages.
        wide = torch.zeros(b, 2 * tables.shape[1] + 3, dtype=torch.int32, device=device)
        wide[:, :tables.shape[1]] = tables
        _, pages_wide = page_sparse_step(q, cache, lo, hi, wide, seq_lens, ps, wide.shape[1] * (BLOCK // ps), topr, k,
                                         scale, per_query_head=per_head)
        same_wide = bool(torch.equal(pages_wide[..., :pages.shape[2]], pages)) and bool((pages_wide[..., pages.shape[2]:] < 0).all())
        ok = err < (2e-2 if dtype != torch.float32 else 1e-4) and agree >= 0.98 and same_wide
        res[name] = {"pages_shared_with_torch": agree, "max_abs_err_vs_float64": err,
                     "graph_width_tables_same_pages": same_wide, "ok": ok}
        res["ok"] &= ok
    return res


def bench_one(n, b, args, device, dtype, planner) -> dict:
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    cache, tables = make_cache(b, n, hkv, d, dtype, device)
    seq_lens = torch.full((b,), n, dtype=torch.int32, device=device)
    q = torch.randn(b, h, d, dtype=dtype, device=device)
    out = torch.empty_like(q)
    row = {"kv_len": n, "batch": b, "kv_bytes": b * n * hkv * d * 2 * cache.element_size()}
    row["dense_ours_us"] = graph_us(lambda: paged_decode(q, cache, seq_lens, tables, n, scale, out=out), device, args.reps)
    row["dense_sdpa_us"], row["sdpa_backend"] = dense_sdpa_us(q, cache, tables, n, scale, device, args.reps)
    if planner is not None:
        meta = AttentionMetadata(0, 0, torch.arange(b + 1, dtype=torch.int32, device=device), seq_lens, 1, n,
                                 torch.full((b,), -1, dtype=torch.int64, device=device), tables, BLOCK,
                                 seq_lens_cpu=[n] * b, query_lens_cpu=[1] * b)
        planner.plan(meta, BLOCK)
        try:
            row["dense_flashinfer_us"] = graph_us(lambda: planner.decode.run(q, cache), device, args.reps)
            row["flashinfer_timing"] = "cuda_graph"
        except RuntimeError as e:  # a wrapper not built for graph capture: time it eagerly, and say so
            torch.cuda.synchronize()
            row["dense_flashinfer_us"] = 1e3 * float(triton.testing.do_bench(
                lambda: planner.decode.run(q, cache), rep=args.reps, return_mode="median"))
            row["flashinfer_timing"] = f"eager (graph capture failed: {str(e)[:120]})"
    dense = min(row["dense_ours_us"], row["dense_sdpa_us"], row.get("dense_flashinfer_us", float("inf")))
    for name, (ps, mm_dtype, k, topr, per_head) in algorithms(args).items():
        lo, hi = minmax_views(cache, ps, mm_dtype)
        max_pages = -(-n // ps)

        quest = {} if name == "rocket" else {"sink_pages": args.quest_sink_pages, "spread_weight": args.quest_spread}

        def step():
            return page_sparse_step(q, cache, lo, hi, tables, seq_lens, ps, max_pages, topr, k, scale, out=out,  # noqa: B023
                                    per_query_head=per_head, **quest)  # noqa: B023

        _, pages = step()
        lists = pages.shape[1]  # KV heads, or query heads (per_head)
        attended = int((pages >= 0).sum()) + b * lists  # listed pages plus the current ones
        r = {
            "page_size": ps, "minmax_dtype": str(mm_dtype).replace("torch.", ""), "ranked_pages_k": k,
            "lists_per_sequence": lists,
            # Fraction of KV tokens not attended, summed over query heads (The Sparse Frontier's decode sparsity).
            "page_sparsity": 1 - attended / (b * lists * max_pages),
            "step_us": graph_us(step, device, args.reps),
            "select_us": graph_us(lambda: select_top_pages(q, lo, hi, tables, seq_lens, ps, max_pages, scale, k, per_head, **quest), device, args.reps),  # noqa: B023,E501
            "attention_us": graph_us(lambda: page_sparse_decode(q, cache, pages, tables, seq_lens, ps, scale, out=out), device, args.reps),  # noqa: B023,E501
        }
        if not per_head:
            r["scores_only_us"] = graph_us(lambda: group_page_scores(q, lo, hi, tables, seq_lens, ps, max_pages, scale), device, args.reps)  # noqa: B023,E501
        r["speedup_vs_best_dense"] = dense / r["step_us"]
        r["speedup_vs_dense_ours"] = row["dense_ours_us"] / r["step_us"]
        r["speedup_vs_dense_sdpa"] = row["dense_sdpa_us"] / r["step_us"]
        if name == "rocket":
            r["case"] = f"uncompacted (worst case): sparse step over the whole {n}-token context"
            name = "rocket_uncompacted"
        row[name] = r
        del lo, hi
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "rocket" in args.algorithms:
        row["rocket_defaults"] = bench_rocket_defaults(n, b, args, device, dtype, row["dense_ours_us"], dense)
    return row


def dense_sdpa_us(q, cache, tables, n, scale, device, reps) -> tuple[float, str]:
    """torch SDPA decode (one query, GQA through enable_gqa) over a contiguous [B, Hkv, n, D] copy of the paged
    K/V, as a non-paged dense baseline; and which SDPA backend torch picked (not forced)."""
    b, h, d = q.shape
    kv = cache[tables.long()]  # [B, blocks, 2, BLOCK, Hkv, D]
    k = kv[:, :, 0].flatten(1, 2)[:, :n].transpose(1, 2).contiguous()  # [B, Hkv, n, D]
    v = kv[:, :, 1].flatten(1, 2)[:, :n].transpose(1, 2).contiguous()
    del kv
    qd = q[:, :, None]
    us = graph_us(lambda: torch.nn.functional.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True),
                  device, reps)
    return us, "torch sdpa (default dispatch, enable_gqa)"


def bench_rocket_defaults(n, b, args, device, dtype, dense_ours_us, dense_us) -> dict:
    """RocketKV's step at the defaults for a context of n tokens: over the compacted cache of prompt_budget +
    decode_tokens tokens, with block tables as wide as the engine's decode graph gives them (max_model_len)."""
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    ps, mm_dtype, k, topr, _ = algorithms(args)["rocket"]
    scale = d ** -0.5
    kv_len = args.prompt_budget + args.decode_tokens
    cache, tables = make_cache(b, kv_len, hkv, d, dtype, device, seed=2)
    width = -(-(n + args.decode_tokens) // BLOCK)  # the graph's block-table width: max_model_len / block_size
    wide = torch.zeros(b, width, dtype=torch.int32, device=device)
    wide[:, :tables.shape[1]] = tables
    seq_lens = torch.full((b,), kv_len, dtype=torch.int32, device=device)
    q = torch.randn(b, h, d, dtype=dtype, device=device)
    out = torch.empty_like(q)
    kt = kt_cache(cache, ps, mm_dtype)
    lo, hi = kt[:, 0], kt[:, 1]
    graph_pages, tight_pages = width * (BLOCK // ps), -(-kv_len // ps)
    pos = kv_len - 1
    slots = tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK
    counts, seq_stats = torch.zeros(2, dtype=torch.int64, device=device), torch.zeros(b, 2, dtype=torch.int64, device=device)

    def step(t, max_pages):
        return page_sparse_step(q, cache, lo, hi, t, seq_lens, ps, max_pages, topr, k, scale, out=out)

    def engine_step():
        """What TritonRocketBackend's decode runs per layer after the KV write: KT refresh, step, page counts."""
        refresh_current_page_minmax(cache, kt, wide, seq_lens, slots, ps)
        _, listed = step(wide, graph_pages)
        count_decode_pages(listed, seq_lens, slots, ps, counts, seq_stats)

    _, pages = step(wide, graph_pages)
    attended = int((pages >= 0).sum()) + b * hkv  # listed pages plus the current ones, over batch and KV heads
    r = {
        "case": f"defaults: context {n} compressed to prompt_budget={args.prompt_budget} + {args.decode_tokens} decode "
                f"tokens per KV head; dense reads all {n}",
        "context": n, "compacted_kv_len": kv_len, "page_size": ps, "ranked_pages_k": k,
        "minmax_dtype": str(mm_dtype).replace("torch.", ""), "graph_max_pages": graph_pages, "tight_max_pages": tight_pages,
        "page_sparsity_vs_context": 1 - attended / (b * hkv * -(-n // ps)),
        "page_sparsity_vs_compacted": 1 - attended / (b * hkv * tight_pages),
        "step_us": graph_us(lambda: step(wide, graph_pages), device, args.reps),
        "engine_step_us": graph_us(engine_step, device, args.reps),
        "step_tight_us": graph_us(lambda: step(tables, tight_pages), device, args.reps),
        "select_us": graph_us(lambda: select_top_pages(q, lo, hi, wide, seq_lens, ps, graph_pages, scale, k), device, args.reps),  # noqa: E501
        "attention_us": graph_us(lambda: page_sparse_decode(q, cache, pages, tables, seq_lens, ps, scale, out=out), device, args.reps),  # noqa: E501
    }
    r["speedup_vs_best_dense"] = dense_us / r["step_us"]
    r["speedup_vs_dense_ours"] = dense_ours_us / r["step_us"]
    r["speedup_tight_vs_best_dense"] = dense_us / r["step_tight_us"]
    r["engine_step_speedup_vs_best_dense"] = dense_us / r["engine_step_us"]
    del cache, lo, hi, kt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def table(rows) -> str:
    names = [k for k in ("rocket_uncompacted", "quest_kv_head", "quest_query_head") if rows and k in rows[0]]
    lines = ["SPARSE STEP OVER THE WHOLE CONTEXT (rocket: uncompacted, its worst case)",
             "kv_len batch | dense ours / sdpa / FI us | " + " | ".join(
                 f"{k} us (x best dense) [select, attn] sparsity" for k in names)]
    for r in rows:
        fi = r.get("dense_flashinfer_us")
        cells = [f"{r[k]['step_us']:7.1f} ({r[k]['speedup_vs_best_dense']:.2f}x) [{r[k]['select_us']:.1f}, "
                 f"{r[k]['attention_us']:.1f}] {r[k]['page_sparsity']:.4f}" for k in names]
        lines.append(f"{r['kv_len']:>6} {r['batch']:>5} | {r['dense_ours_us']:8.1f} / {r['dense_sdpa_us']:8.1f} / "
                     f"{fi if fi is None else round(fi, 1)} | " + " | ".join(cells))
    if not rows or "rocket_defaults" not in rows[0]:
        return "\n".join(lines)
    lines += ["ROCKET DEFAULTS (prompt compressed to prompt_budget; step over prompt_budget + decode tokens)",
              "context batch | dense best us | rocket graph-width us (x) [select, attn] | +KT refresh, counts us (x) | "
              "tight us (x) | page sparsity vs context / vs compacted"]
    for r in rows:
        rd = r["rocket_defaults"]
        dense = min(r["dense_ours_us"], r["dense_sdpa_us"], r.get("dense_flashinfer_us") or float("inf"))
        lines.append(
            f"{r['kv_len']:>7} {r['batch']:>5} | {dense:13.1f} | {rd['step_us']:7.1f} ({rd['speedup_vs_best_dense']:.2f}x) "
            f"[{rd['select_us']:.1f}, {rd['attention_us']:.1f}] | {rd['engine_step_us']:7.1f} "
            f"({rd['engine_step_speedup_vs_best_dense']:.2f}x) | {rd['step_tight_us']:7.1f} "
            f"({rd['speedup_tight_vs_best_dense']:.2f}x) | {rd['page_sparsity_vs_context']:.4f} / "
            f"{rd['page_sparsity_vs_compacted']:.4f}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, no speed")
    ap.add_argument("--lens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=200, help="do_bench rep time in ms")
    ap.add_argument("--rocket-topk", type=int, default=64)
    ap.add_argument("--rocket-page", type=int, default=4)
    ap.add_argument("--prompt-budget", type=int, default=2048, help="rocket defaults case: tokens kept per KV head")
    ap.add_argument("--decode-tokens", type=int, default=64, help="rocket defaults case: tokens decoded after compaction")
    ap.add_argument("--quest-budget", type=int, default=2048)
    ap.add_argument("--quest-page", type=int, default=16)
    ap.add_argument("--quest-minmax-dtype", default="bfloat16", choices=["bfloat16", "float8_e5m2"],
                    help="Quest's min/max cache storage (QuestConfig.minmax_cache_dtype)")
    ap.add_argument("--quest-sink-pages", type=int, default=0, help="timed step: QuestConfig.sink_pages")
    ap.add_argument("--quest-spread", type=float, default=1.0, help="timed step: QuestConfig.spread_weight")
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS,
                    help="sparse steps to time (rocket also times its defaults case)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sparse_decode[_cpu_smoke].json)")
    args = ap.parse_args(argv)
    args.heads, args.kv_heads, args.head_dim = (8, 2, 64) if args.cpu_smoke else (32, 8, 128)
    if args.cpu_smoke:
        args.lens, args.batches, args.rocket_topk, args.quest_budget = [300], [2], 6, 64
        args.prompt_budget, args.decode_tokens = 64, 8
    if args.out is None:
        name = "sparse_decode_cpu_smoke.json" if args.cpu_smoke else "sparse_decode.json"
        args.out = os.path.join("benchmarks", "results", name)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or with --cpu-smoke")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    planner = None
    if not (args.cpu_smoke or args.no_flashinfer or importlib.util.find_spec("flashinfer") is None):
        from sparse_llm.backends.flashinfer_backend import FlashInferPlanner, import_flashinfer

        planner = FlashInferPlanner(import_flashinfer(), device, args.heads, args.kv_heads, args.head_dim,
                                    args.head_dim ** -0.5, dtype, dtype)
    result = {
        "gpu": "cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "triton": triton.__version__,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                  "dtype": str(dtype).replace("torch.", ""), "kv_block": BLOCK},
        "config": {"rocket_topk": args.rocket_topk, "rocket_page": args.rocket_page, "rocket_topr": args.head_dim,
                   "rocket_prompt_budget": args.prompt_budget, "rocket_decode_tokens": args.decode_tokens,
                   "quest_budget": args.quest_budget, "quest_page": args.quest_page,
                   "quest_minmax_dtype": args.quest_minmax_dtype, "quest_sink_pages": args.quest_sink_pages,
                   "quest_spread": args.quest_spread, "algorithms": args.algorithms},
    }
    result["correctness"] = check_correctness(args, device, dtype)
    print("correctness:", json.dumps(result["correctness"]), flush=True)
    rows = []
    if result["correctness"]["ok"]:
        for n in args.lens:
            for b in args.batches:
                rows.append(bench_one(n, b, args, device, dtype, planner))
                r = rows[-1]
                print(json.dumps({"kv_len": n, "batch": b, "dense_ours_us": r["dense_ours_us"],
                                  "dense_sdpa_us": r["dense_sdpa_us"], "dense_flashinfer_us": r.get("dense_flashinfer_us"),
                                  **{f"{k}_us": r[k]["step_us"] for k in ("rocket_uncompacted", "quest_kv_head",
                                                                          "quest_query_head") if k in r},
                                  **{f"{k}_sparsity": round(r[k]["page_sparsity"], 4)
                                     for k in ("rocket_uncompacted", "quest_kv_head", "quest_query_head") if k in r},
                                  "rocket_defaults_us": r.get("rocket_defaults", {}).get("step_us")}), flush=True)
    result["rows"] = rows
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(table(rows))
    print(f"wrote {args.out}")
    return 0 if result["correctness"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

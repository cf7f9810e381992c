"""Experiment: where Quest's per-query-head page selection spends its time (scores kernel vs forced pages vs
bisection top-k at 4 / 8 / 16 warps) at the session-6 defaults (page 8, float8_e5m2 min/max, one sink page, spread_weight 0.25,
2K budget), and which launch shape of the scoring kernel is fastest. Not a library change: it sets the
module constants of kernels/page_scores.py (`_score_block`, SCORE_WARPS, SCORE_STAGES, PROGRAMS_PER_LAUNCH)
per row, checks the scores against the library's launch first (same values), then times by CUDA-graph replay.

    . benchmarks/gpu_env.sh && python benchmarks/quest_select_sweep.py --out $OUT/quest_select_sweep.json
    TRITON_INTERPRET=1 python benchmarks/quest_select_sweep.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparse_llm.kernels.page_scores as page_scores  # noqa: E402
from sparse_decode import graph_us, make_cache, minmax_views  # noqa: E402
from sparse_llm.kernels.geometry import next_pow2  # noqa: E402
from sparse_llm.kernels.page_force import force_pages_  # noqa: E402


def set_launch(block_p, warps, stages, per_launch):
    page_scores._score_block = lambda: block_p
    page_scores.SCORE_WARPS, page_scores.SCORE_STAGES, page_scores.SCORE_PROGRAMS_PER_LAUNCH = warps, stages, per_launch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--kv-len", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--page", type=int, default=8)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--minmax-dtype", default="float8_e5m2", choices=["bfloat16", "float8_e5m2"])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--scores-sweep", action="store_true", help="also sweep the scoring kernel's launch shapes")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        args.kv_len, args.batch, args.budget, args.reps = 700, 2, 64, 1
    h, hkv, d, ps = 32 if not args.cpu_smoke else 8, 8 if not args.cpu_smoke else 2, 128 if not args.cpu_smoke else 64, args.page
    b, n = args.batch, args.kv_len
    cache, tables = make_cache(b, n, hkv, d, torch.bfloat16 if not args.cpu_smoke else torch.float32, dev)
    lo, hi = minmax_views(cache, ps, getattr(torch, args.minmax_dtype))
    seq_lens = torch.full((b,), n, dtype=torch.int32, device=dev)
    q = torch.randn(b, h, d, dtype=cache.dtype, device=dev)
    max_pages, k = -(-n // ps), args.budget // ps - 1
    lib = (page_scores._score_block, page_scores.SCORE_WARPS, page_scores.SCORE_STAGES,
           page_scores.SCORE_PROGRAMS_PER_LAUNCH)

    def scores():
        return page_scores._launch_scores(q, lo, hi, tables, seq_lens, ps, max_pages, 1.0, 0.25, partials=False)[0]

    ref = scores()
    s_forced = ref.clone()
    force_pages_(s_forced, seq_lens, ps, 1, 1)
    block = max(2, next_pow2(max_pages))

    ks = sorted({1, min(31, k), k})
    out_by_k = {kk: torch.empty(b, h, kk, dtype=torch.int32, device=dev) for kk in ks}  # [b, h, k] page lists

    def bisect(warps=page_scores._bisect_warps(block), kk=k):
        out = out_by_k[kk]
        page_scores._bisect_top_pages_kernel[(b, h)](
            s_forced, seq_lens, out, s_forced.stride(0), s_forced.stride(1), out.stride(0), out.stride(1), ps, kk,
            BLOCK=block, KP=max(2, next_pow2(kk)), num_warps=warps)
        return out

    def select():
        return page_scores.select_top_pages(q, lo, hi, tables, seq_lens, ps, max_pages, 1.0, k, per_query_head=True,
                                            sink_pages=1, spread_weight=0.25)

    res = {"shape": {"kv_len": n, "batch": b, "heads": h, "kv_heads": hkv, "head_dim": d, "page": ps, "k": k,
                     "minmax_dtype": args.minmax_dtype},
           "library": {"select_us": graph_us(select, dev, args.reps), "scores_us": graph_us(scores, dev, args.reps),
                       "force_us": graph_us(lambda: force_pages_(s_forced.clone(), seq_lens, ps, 1, 1), dev, args.reps),
                       "bisect_us": graph_us(bisect, dev, args.reps)}}
    print(json.dumps(res), flush=True)
    want = bisect().clone()
    res["bisect"] = []
    for warps in (4,) if args.cpu_smoke else (4, 8, 16):
        same = bool(torch.equal(bisect(warps), want))
        res["bisect"].append({"warps": warps, "same_pages": same,
                              "bisect_us": graph_us(lambda: bisect(warps), dev, args.reps) if same else None})  # noqa: B023
        print(json.dumps(res["bisect"][-1]), flush=True)
    # The row scan (32 rounds over BLOCK entries) does not depend on k; the tail (prefix sums, scatter, the sort of
    # next_pow2(k) keys) does: the time at k = 1 is the scan's, the difference to k is the tail's.
    res["bisect_by_k"] = [{"k": kk, "bisect_us": graph_us(lambda: bisect(kk=kk), dev, args.reps)}  # noqa: B023
                          for kk in ks]
    print(json.dumps(res["bisect_by_k"]), flush=True)
    rows = []
    grid = [(64, 128, 256), (2, 4, 8), (None, 1, 2, 3, 4), (256, 1024, 4096, 1 << 20)] if args.scores_sweep else []
    if args.cpu_smoke and args.scores_sweep:
        grid = [(32,), (4,), (None, 2), (16, 1 << 20)]
    for block_p, warps, stages, per_launch in itertools.product(*grid) if grid else ():
        set_launch(block_p, warps, stages, per_launch)
        try:
            got = scores()
            ok = bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-3, equal_nan=True))
            us = graph_us(scores, dev, args.reps) if ok else None
        except Exception as e:  # noqa: BLE001 (a shape the compiler refuses: out of shared memory, registers)
            ok, us = False, f"error: {str(e)[:100]}"
        rows.append({"block_p": block_p, "warps": warps, "stages": stages, "programs_per_launch": per_launch,
                     "same_scores": ok, "scores_us": us})
        print(json.dumps(rows[-1]), flush=True)
    (page_scores._score_block, page_scores.SCORE_WARPS, page_scores.SCORE_STAGES,
     page_scores.SCORE_PROGRAMS_PER_LAUNCH) = lib
    timed = sorted((r for r in rows if isinstance(r["scores_us"], float)), key=lambda r: r["scores_us"])
    res["sweep"] = rows
    res["best"] = timed[:5]
    print("library:", res["library"])
    print("bisect:", res["bisect"])
    print("bisect by k:", res["bisect_by_k"])
    for r in timed[:8]:
        print(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

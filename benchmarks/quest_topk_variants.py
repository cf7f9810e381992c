"""Experiment: where the Quest per-query-head bisection top-k spends its time, and the launch options of the
library kernel (kernels/page_scores.py `_bisect_top_pages_kernel`). Not a library change.

Session 6's kernel (`MODE` below, a copy kept for the comparison) scanned the whole register-held row twice more
after the bisection (prefix sums of the ties and of the kept entries): sm_90 needs 255 registers + spills at
8 warps, 128 + spills at 16, so an SM holds one program. Its diagnostic modes:
  load    load the row, build the ordered int32 image, store its max          (memory + launch floor)
  rounds  load + 32 bisection rounds, store the threshold                      (no slot pass)
  old     rounds + the whole-row slot pass + the sort                          (session 6's library kernel)
The library kernel (session 7) re-reads the row in TAIL-wide pieces for the slot pass (about half the registers:
`--regs` lists them) and stops its rounds once the count is exactly k.
Its grid here: warps x maxnreg x TAIL. Pages are checked equal to the old kernel's first; times by
CUDA-graph replay. `--regs` prints sm_90 register counts, compiled without a GPU (the Triton wheel's ptxas).

    . benchmarks/gpu_env.sh && python benchmarks/quest_topk_variants.py --out $OUT/quest_topk_variants.json
    TRITON_INTERPRET=1 python benchmarks/quest_topk_variants.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparse_llm.kernels.page_scores as page_scores  # noqa: E402
from sparse_llm.kernels.geometry import next_pow2  # noqa: E402
from sparse_llm.kernels.page_scores import _ordered_image, _page_keys, _ranked_pages  # noqa: E402

MODES = {"load": 0, "rounds": 1, "old": 2}


@triton.jit
def _variant_kernel(
    S, LENS, PAGES, T_IO, stride_sn, stride_sh, stride_pn, stride_ph, page_size, k,
    BLOCK: tl.constexpr, KP: tl.constexpr, MODE: tl.constexpr,
):
    n = tl.program_id(0)
    lst = tl.program_id(1)
    n_ranked = _ranked_pages(LENS, n, page_size)
    offs = tl.arange(0, BLOCK)
    s_row = S + n.to(tl.int64) * stride_sn + lst * stride_sh
    o = _ordered_image(s_row, offs, n_ranked)
    k_eff = tl.minimum(n_ranked, k)
    t_slot = T_IO + n * tl.num_programs(1) + lst
    if MODE == 0:
        tl.store(t_slot, tl.max(o, 0))
    else:
        lo = tl.zeros([], tl.int64) - 2147483647
        hi = tl.zeros([], tl.int64) + 2147483647
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            take = tl.sum((o >= mid.to(tl.int32)).to(tl.int32), 0) >= k_eff
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid - 1)
        t = lo.to(tl.int32)
        if MODE == 1:
            tl.store(t_slot, t)
        else:
            above = o > t
            tie = o == t
            sel = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= k_eff - tl.sum(above.to(tl.int32), 0)))
            p_row = PAGES + n.to(tl.int64) * stride_pn + lst * stride_ph
            tl.store(p_row + tl.cumsum(sel.to(tl.int32), 0) - 1, offs, mask=sel)
            tl.debug_barrier()
            slots = tl.arange(0, KP)
            filled = slots < k_eff
            pg = tl.load(p_row + slots, mask=filled, other=0)
            keys = tl.sort(_page_keys(tl.load(s_row + pg, mask=filled, other=0.0), pg, filled), 0, descending=True)
            tl.debug_barrier()
            tl.store(p_row + slots, tl.where(keys > 0, 2147483647 - (keys & 2147483647), -1).to(tl.int32),
                     mask=slots < k)


LIB_SIG = {"S": "*fp32", "LENS": "*i32", "PAGES": "*i32", "stride_sn": "i32", "stride_sh": "i32", "stride_pn": "i32",
           "stride_ph": "i32", "page_size": "i32", "k": "i32", "BLOCK": "constexpr", "KP": "constexpr",
           "TAIL": "constexpr"}
OLD_SIG = {"S": "*fp32", "LENS": "*i32", "PAGES": "*i32", "T_IO": "*i32", "stride_sn": "i32", "stride_sh": "i32",
           "stride_pn": "i32", "stride_ph": "i32", "page_size": "i32", "k": "i32",
           "BLOCK": "constexpr", "KP": "constexpr", "MODE": "constexpr"}


def library_grid(smoke: bool) -> list[dict]:
    """Launch options of the library kernel to time: warps, maxnreg (None = ptxas's choice), TAIL."""
    if smoke:
        return [{"warps": 4, "maxnreg": None, "tail": t} for t in (32, 1024)]
    return [{"warps": w, "maxnreg": r, "tail": t} for w, r in ((8, None), (16, None), (16, 64)) for t in (1024, 2048, 4096)]


def _usage(kern) -> dict:
    import re
    import subprocess
    import tempfile

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", res)
    return {"regs": int(m[1]), "stack": int(m[2])}


def register_counts(block: int, kp: int) -> dict:
    """sm_90 registers / stack bytes per variant, compiled without a GPU (the Triton wheel's ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    out = {}
    for name, mode in MODES.items():
        for warps in (8, 16):
            src = ASTSource(_variant_kernel, OLD_SIG, {"BLOCK": block, "KP": kp, "MODE": mode})
            out[f"{name}@{warps}"] = _usage(triton.compile(src, target=target, options={"num_warps": warps}))
    for row in library_grid(False):
        src = ASTSource(page_scores._bisect_top_pages_kernel, LIB_SIG,
                        {"BLOCK": block, "KP": kp, "TAIL": row["tail"]})
        opts = {"num_warps": row["warps"], **({"maxnreg": row["maxnreg"]} if row["maxnreg"] else {})}
        out[f"lib w{row['warps']} r{row['maxnreg']} t{row['tail']}"] = _usage(
            triton.compile(src, target=target, options=opts))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--regs", action="store_true", help="only print sm_90 register counts (no GPU needed)")
    ap.add_argument("--kv-len", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--page", type=int, default=8)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--real-scores", action="store_true",
                    help="rows = the library's Quest bounds (spread 0.25) on sparse_decode.py's random cache, sink forced")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    k = args.budget // args.page - 1
    block = next_pow2(-(-args.kv_len // args.page))
    if args.regs:
        for name, u in register_counts(block, next_pow2(k)).items():
            print(f"{name}: {u['regs']} registers, {u['stack']} B stack")
        return 0
    from sparse_decode import graph_us

    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        args.kv_len, args.batch, args.heads, args.budget, args.reps = 700, 3, 4, 64, 1
        k = args.budget // args.page - 1
        block = next_pow2(-(-args.kv_len // args.page))
    b, h, ps = args.batch, args.heads, args.page
    max_pages = -(-args.kv_len // ps)
    # Bounds with a per-row offset, one forced sink page (+inf) and a run of exact ties near the top.
    torch.manual_seed(0)
    s = torch.randn(b, h, max_pages, device=dev) + 0.5 * torch.randn(b, h, 1, device=dev)
    s[:, :, 0] = float("inf")
    s[:, :, 5:9] = s[:, :, 4:5].abs() + 2.0
    seq_lens = torch.full((b,), args.kv_len, dtype=torch.int32, device=dev)
    seq_lens[0] = args.kv_len // 3  # one shorter sequence: masked entries
    if args.real_scores:
        from sparse_decode import make_cache, minmax_views

        from sparse_llm.kernels.page_force import force_pages_

        hkv, d = (8, 128) if not args.cpu_smoke else (2, 64)
        cache, tables = make_cache(b, args.kv_len, hkv, d, torch.bfloat16 if not args.cpu_smoke else torch.float32, dev)
        lo, hi = minmax_views(cache, ps, torch.float8_e5m2 if not args.cpu_smoke else torch.float32)
        q = torch.randn(b, h, d, dtype=cache.dtype, device=dev)
        seq_lens.fill_(args.kv_len)
        s = page_scores._launch_scores(q, lo, hi, tables, seq_lens, ps, max_pages, 1.0, 0.25, partials=False)[0]
        force_pages_(s, seq_lens, ps, 1, 1)
    kp = max(2, next_pow2(k))
    t_io = torch.zeros(b, h, dtype=torch.int32, device=dev)
    pages = torch.empty(b, h, k, dtype=torch.int32, device=dev)

    def old(mode, w):
        _variant_kernel[(b, h)](s, seq_lens, pages, t_io, s.stride(0), s.stride(1), pages.stride(0), pages.stride(1),
                                ps, k, BLOCK=block, KP=kp, MODE=MODES[mode], num_warps=w)

    def library(row):
        opts = {} if args.cpu_smoke or not row["maxnreg"] else {"maxnreg": row["maxnreg"]}
        page_scores._bisect_top_pages_kernel[(b, h)](
            s, seq_lens, pages, s.stride(0), s.stride(1), pages.stride(0), pages.stride(1), ps, k,
            BLOCK=block, KP=kp, TAIL=min(block, row["tail"]), num_warps=row["warps"], **opts)

    old("old", 4)
    want = pages.clone()
    res = {"shape": {"kv_len": args.kv_len, "batch": b, "heads": h, "page": ps, "k": k, "block": block,
                     "rows": "library bounds" if args.real_scores else "synthetic"},
           "old": [], "library": []}
    for mode in MODES:
        for w in (4,) if args.cpu_smoke else (8, 16):
            pages.fill_(-7)
            res["old"].append({"mode": mode, "warps": w, "us": graph_us(lambda: old(mode, w), dev, args.reps)})  # noqa: B023
            if mode == "old":
                res["old"][-1]["same_pages"] = bool(torch.equal(pages, want))
            print(json.dumps(res["old"][-1]), flush=True)
    for row in library_grid(args.cpu_smoke):
        pages.fill_(-7)
        library(row)
        same = bool(torch.equal(pages, want))
        us = graph_us(lambda: library(row), dev, args.reps) if same else None  # noqa: B023
        res["library"].append({**row, "us": us, "same_pages": same})
        print(json.dumps(res["library"][-1]), flush=True)
    timed = sorted((r for r in res["library"] if r["us"]), key=lambda r: r["us"])
    res["best"] = timed[:3]
    print("best:", res["best"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

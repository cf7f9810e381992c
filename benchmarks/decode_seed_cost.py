"""What sink-seeded decode splits cost and what skipping then buys, on the GPU (H=32, Hkv=8, D=128, bf16).

Per (kv_len, batch), times of paged_decode:
  dense          the dense build, dense split policy;
  skip_off       the skip build with λ off (log λ = -inf): the sink seed + the branch, nothing skipped;
  skip_50        the skip build at the factor giving ≈50% tile sparsity (synthetic sink + locality data);
  skip_50_s4     the same with 4-tile splits (the dense minimum) instead of the skip minimum of 8.
skip_off / dense is the seed's overhead; dense / skip_50 the speed-up issue #4 asks ≥ 1.25× of.

    . benchmarks/gpu_env.sh && python benchmarks/decode_seed_cost.py --out benchmarks/results/decode_seed_cost_h100.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_kernels import _find_factor, paged_cache, synthetic_kv_q, timer  # noqa: E402

from sparse_llm.kernels.decode import paged_decode  # noqa: E402
from sparse_llm.kernels.geometry import decode_split_tiles, num_sms  # noqa: E402


def measure(n: int, b: int, h=32, hkv=8, d=128, page=16, dtype=torch.bfloat16, device="cuda") -> dict:
    device = torch.device(device)
    bench = timer(device)
    data = [synthetic_kv_q(n, torch.tensor([n - 1], device=device), h, hkv, d, dtype, device, seed=i) for i in range(b)]
    cache, tables = paged_cache([n] * b, hkv, d, page, dtype, device, fill=lambda i, _: data[i][:2])
    q = torch.cat([x[2] for x in data])
    data.clear()
    lens = torch.full((b,), n, dtype=torch.int32, device=device)
    scale = d ** -0.5

    def run(lam=None, stats=None, split=None):
        return paged_decode(q, cache, lens, tables, n, scale, lam, stats, split_tiles=split)

    def sparsity(f, split=None):
        stats = torch.zeros(b, 2, dtype=torch.int32, device=device)
        run(torch.full((b,), math.log(f / n), device=device), stats, split)
        total, skipped = stats.sum(0).tolist()
        return skipped / total

    off = torch.full((b,), -math.inf, device=device)
    factor, s = _find_factor(sparsity, 0.5, n, 30)
    lam = torch.full((b,), math.log(factor / n), device=device)
    s4 = max(1, min(4, decode_split_tiles(n, b, hkv, num_sms(device))))
    row = {"kv_len": n, "batch": b, "factor": factor, "sparsity": s, "sparsity_s4": sparsity(factor, s4),
           "split_tiles_dense": decode_split_tiles(n, b, hkv, num_sms(device)),
           "split_tiles_skip": decode_split_tiles(n, b, hkv, num_sms(device), skip=True),
           "dense_us": 1e3 * bench(run), "skip_off_us": 1e3 * bench(lambda: run(off)),
           "skip_50_us": 1e3 * bench(lambda: run(lam)), "skip_50_s4_us": 1e3 * bench(lambda: run(lam, split=s4))}
    row["seed_overhead"] = row["skip_off_us"] / row["dense_us"]
    row["speedup_50"] = row["dense_us"] / row["skip_50_us"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    rows = []
    for n in ns.lens:
        for b in ns.batches:
            rows.append(measure(n, b))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
            torch.cuda.empty_cache()
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

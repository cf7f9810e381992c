"""How many BLASST-skipped prefill tiles the key min/max bound catches on real attention inputs (CPU).

Runs the bundled SmolLM2-135M on RULER-style prompts (calibration's local generators) with every layer's
backend replaced by a dense recorder: per prefill chunk and layer it computes, from the real q and the
cached k, each row's tile max and the kernel's bound (backends/key_bounds.py), and replays the tile loop
for a grid of threshold factors. Printed per length and factor: tile sparsity, the fraction of tiles
pre-skipped (before QKᵀ), and the catch rate = pre-skipped / skipped. The bound is evaluated as the GPU
kernel sees it (box rounded to bf16 after the widening); `--no-widen` shows what the widening costs.

    OMP_NUM_THREADS=1 python benchmarks/bound_skip_real.py --lengths 2048 4096 8192
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sparse_llm.backends.base import AttentionBackend, write_kv  # noqa: E402
from sparse_llm.backends.key_bounds import bound_skip_decisions, row_tile_bounds, row_tile_max  # noqa: E402
from sparse_llm.backends.torch_dense import gather_kv, paged_attention_torch  # noqa: E402
from sparse_llm.kernels.geometry import PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_BOUND_WIDEN  # noqa: E402
from smollm2_capture import swapped_backends  # noqa: E402

FACTORS = (10.0, 30.0, 100.0, 300.0, 1000.0, 2000.0, 4000.0, 8000.0)  # factor >= kv_len: off


class BoundRecorder(AttentionBackend):
    """Dense attention; per prefill chunk adds (total, skipped, pre-skipped) per factor into `counts`."""

    name = "torch"
    algorithms = frozenset({"record"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, counts, factors, widen, box_dtype):
        super().__init__(layer, None)
        self.counts, self.factors, self.widen, self.box_dtype = counts, factors, widen, box_dtype

    def forward(self, q, k, v, cache, meta):
        kv = cache["kv"]
        write_kv(kv, k, v, meta.slot_mapping)
        out = paged_attention_torch(q, kv, meta, self.layer.scale)
        q_lens, kv_lens = meta.query_lens_cpu, meta.seq_lens_cpu
        start = 0
        for i in range(meta.num_prefills):
            kk, _ = gather_kv(kv, meta.block_tables[i], kv_lens[i])
            qq = q[start:start + q_lens[i]].float()
            start += q_lens[i]
            rm = row_tile_max(qq, kk.float(), self.layer.scale, PREFILL_BLOCK_N)
            ub = row_tile_bounds(qq, kk.float(), self.layer.scale, kv.shape[2], PREFILL_BLOCK_N, self.box_dtype,
                                 self.widen)
            for f in self.factors:
                lam = math.log(f / kv_lens[i]) if f < kv_lens[i] else -math.inf
                t, s, p, bad = bound_skip_decisions(rm, ub, kv_lens[i], lam, PREFILL_BLOCK_M, PREFILL_BLOCK_N)
                if bad:
                    raise AssertionError(f"layer {self.layer.layer_idx}: the bound pre-skipped {bad} tiles BLASST keeps")
                c = self.counts.setdefault(f, [0, 0, 0])
                c[0] += t
                c[1] += s
                c[2] += p
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--prompts", type=int, default=1, help="prompts per length")
    ap.add_argument("--no-widen", action="store_true", help="evaluate the unwidened box (not what the kernel does)")
    ap.add_argument("--out", default=None, help="JSON path for the table")
    args = ap.parse_args(argv)
    from sparse_llm import LLM, SamplingParams
    from sparse_llm.calibration.samples import build_samples

    llm = LLM(max_model_len=max(args.lengths), max_num_batched_tokens=max(args.lengths))
    prompts = build_samples(llm.tokenizer, args.lengths, [args.prompts] * len(args.lengths), "bound-skip", reserve=8)
    widen = 0.0 if args.no_widen else PREFILL_BOUND_WIDEN
    rows = []
    for length in args.lengths:
        counts: dict[float, list[int]] = {}
        t0 = time.time()
        with swapped_backends(llm, lambda spec: BoundRecorder(spec, counts, FACTORS, widen, torch.bfloat16)):
            for p in prompts[length]:
                llm.generate([p], SamplingParams(max_tokens=1), use_tqdm=False)
        for f in FACTORS:
            t, s, p = counts[f]
            rows.append({"length": length, "factor": f, "tiles": t, "sparsity": s / t, "pre_skipped": p / t,
                         "catch_rate": p / s if s else None})
            print(f"L={length:>5} factor={f:>7g} sparsity={s / t:6.1%} pre-skipped={p / t:6.1%} "
                  f"caught={'-' if not s else f'{p / s:6.1%}'}  ({time.time() - t0:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"widen": widen, "block_size": llm.engine.block_manager.block_size, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sweep the DSA decode kernels' variants (CUDA graphs) and compose the fastest sparse step per shape.

    python benchmarks/dsa_tune.py                     # H100/H200: 32K and 128K x B=1, 8, 32 (< 5 min incl. compiles)
    python benchmarks/dsa_tune.py --batches 32 --merge  # sweep some shapes, keep the others in the JSON
    python benchmarks/dsa_tune.py --cpu-smoke         # the same code path at tiny shapes under TRITON_INTERPRET=1

One process, correctness first: for every shape the default kernels are checked against the torch oracles
(dsa_decode.check), then every variant's output is compared with the checked default (attention within bf16
tolerance, indexer logits within 1e-3 relative, top-k positions equal, in the contract's order) before it is
timed; a variant that disagrees is a kernel bug and stops the sweep. Variants:
  query prep torch (rotation matmul + ~7 elementwise kernels) or fused (kernels/dsa_query_prep.py)
  indexer    block_n x tiles x warps x stages x keys_as_m (keys on the MMA's M side)
  top-k      radix: chunk x radix_bits (4: 8 passes of 16-bin histograms, 8: 4 passes of 256 bins) x warps;
             sampled (kernels/dsa_topk_sampled.py: sample -> threshold -> compact -> exact select): chunk x
             warps of the two passes over the row x warps of the two per-row kernels x sample size (4096, 2048)
  attention  (block_h, block_n, warps) x dv_split (programs sharing a head block, each accumulating a slice of
             the 512-wide V) x stages, then for the best three ("finalists"): physical slots from the top-k kernel (no
             block-table lookup) and the KV split count.
Sparse attention always reads index_topk tokens, so it is swept at the largest context per batch and reused.
Then the composed step is checked (tuned_vs_default_selection): the default and the tuned query prep + indexer
score the same inputs, and every top-k index in which their selections differ must be a near-tie (its logit
within twice the measured logit discrepancy of the k-th value, in both variants); the tuned step must equal the
default attention over the tuned selection. Either failing stops the sweep.
Writes benchmarks/results/dsa_tune_<gpu>.json; `benchmarks/dsa_decode.py` reads it (`best` per shape).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dsa_decode import SMOKE, V32, build_case, check, cuda_graph, flashinfer_dense, gpu_slug, steps  # noqa: E402

from sparse_llm.kernels.dsa_indexer import indexer_logits  # noqa: E402
from sparse_llm.kernels.dsa_launch import select_topk  # noqa: E402
from sparse_llm.kernels.dsa_mla_attention import mla_attention  # noqa: E402
from sparse_llm.kernels.dsa_topk import topk_positions  # noqa: E402
from sparse_llm.kernels.dsa_topk_sampled import default_capacity, topk_positions_sampled  # noqa: E402

GPU_GRIDS = dict(
    indexer=[dict(block_n=bn, tiles=t, num_warps=w, num_stages=st, keys_as_m=m)
             for (bn, t), w, st, m in itertools.product([(64, 2), (64, 4), (128, 2), (128, 4), (128, 8), (256, 2)],
                                                        [4, 8], [2, 3], [False, True])],
    topk=[dict(chunk=ch, radix_bits=b, num_warps=4) for ch, b in itertools.product([2048, 4096, 8192], [4, 8])]
    + [dict(chunk=4096, radix_bits=b, num_warps=8) for b in (4, 8)]
    + [dict(method="sampled", chunk=ch, num_warps=w, select_warps=sw)
       for (ch, w), sw in itertools.product([(2048, 4), (4096, 4), (4096, 8)], [8, 16])]
    + [dict(method="sampled", chunk=4096, num_warps=8, select_warps=sw, sample=2048) for sw in (8, 16)],
    attention=[dict(block_h=h, block_n=n, num_warps=w, num_stages=st, dv_split=d)
               for (h, n, w), d, st in itertools.product([(64, 64, 8), (64, 32, 8), (64, 32, 4), (32, 32, 4),
                                                          (16, 32, 4)], [1, 2, 4], [2, 3])],
    splits=[None, 1, 2, 4, 8, 16],
    finalists=3,
)
SMOKE_GRIDS = dict(
    indexer=[dict(block_n=16, tiles=2, keys_as_m=m) for m in (False, True)],
    # last = "fastest" under the interpreter, so the composed step runs the sampled kernel's fast path (75 > 64)
    topk=[dict(chunk=32, radix_bits=b) for b in (4, 8)] + [dict(method="sampled", chunk=32, capacity=c) for c in (128, 64)],
    attention=[dict(block_h=16, block_n=16, dv_split=d) for d in (1, 2)],
    splits=[3],
    finalists=1,
)


class Sweep:
    """Times callables (median of a CUDA-graph replay, ms) or, under the interpreter, just runs them."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def time(self, fn) -> float:
        if not self.cuda:  # the interpreter: no timing
            return 0.0
        import triton

        return triton.testing.do_bench(cuda_graph(fn), warmup=10, rep=40, return_mode="median")

    def best(self, name: str, configs: list[dict], run, same) -> list[tuple[float, dict]]:
        """[(ms, config)] fastest first; every config's output must agree with the checked default (`same`)."""
        timings = []
        for cfg in configs:
            try:
                got = run(cfg)
            except Exception as e:  # noqa: BLE001 - a variant that does not fit this GPU (shared memory, registers)
                if "OutOfResources" not in type(e).__name__ and "out of resource" not in str(e).lower():
                    raise
                print(f"    {name} {cfg}: does not fit ({type(e).__name__})", flush=True)
                continue
            problem = same(got)
            if problem:
                raise AssertionError(f"{name} variant {cfg} disagrees with the checked default: {problem}")
            # Under the interpreter nothing is timed: the last variant "wins", so the composed step runs the
            # non-default paths (fused prep, keys_as_m, slots, dv_split) end to end.
            ms = self.time(lambda cfg=cfg: run(cfg)) if self.cuda else -float(len(timings))
            timings.append((ms, cfg))
        if not timings:
            raise RuntimeError(f"{name}: none of the {len(configs)} variants fits this GPU")
        timings.sort(key=lambda t: t[0])
        return timings


def _attention_same(want: torch.Tensor, tol: float):
    def same(got):
        err = (got.float() - want.float()).abs().max().item()
        return None if err < tol else f"max abs diff {err:.3g} >= {tol}"
    return same


def _indexer_same(want: torch.Tensor, n: int):
    def same(got):
        err = ((got[:, :n] - want[:, :n]).abs().max() / want[:, :n].abs().max()).item()
        return None if err < 1e-3 else f"relative error {err:.3g} >= 1e-3"
    return same


def _prep_same(want_q8: torch.Tensor, want_w: torch.Tensor):
    """fp8 queries equal but for rare rounding-boundary flips (the rotation's accumulation order differs)."""
    def same(got):
        q8, w = got
        flips = (q8.float() != want_q8.float()).float().mean().item()
        w_err = ((w - want_w).abs().max() / want_w.abs().max()).item()
        return None if flips < 1e-2 and w_err < 1e-2 else f"{flips:.2%} fp8 values differ, weights rel err {w_err:.3g}"
    return same


def _topk_same(want: torch.Tensor):
    """Every top-k kernel follows one contract (order and tie rule included), so outputs must be equal."""
    def same(got):
        idx = got[0] if isinstance(got, tuple) else got
        if torch.equal(idx, want):
            return None
        sets = torch.equal(idx.sort(-1).values, want.sort(-1).values)
        return "same index sets in another order" if sets else "different index sets"
    return same


def topk_near_ties(logits_a: torch.Tensor, logits_b: torch.Tensor, idx_a: torch.Tensor, idx_b: torch.Tensor,
                   n_valid: torch.Tensor, k: int) -> dict:
    """Do two top-k selections (int32 [R, k], -1 padded) of two scorings of the same keys differ only by near-ties?

    With d = max |a - b| over a row's valid logits, the k-th largest values differ by at most d, so an index
    selected under a but not under b has a >= kth_a and a <= b + d <= kth_b + d <= kth_a + 2d, and likewise
    b in [kth_b - 2d, kth_b]: every index of the symmetric difference lies within 2d of the k-th value in both
    scorings. One that does not is a selection bug, not a tie. Rows with n_valid <= k must select the same set.
    Raises AssertionError naming the offending indices; returns counts."""
    R, N = logits_a.shape
    dev = logits_a.device
    valid = torch.arange(N, device=dev)[None] < n_valid[:, None].long()
    a = torch.where(valid, logits_a.double(), float("-inf"))
    b = torch.where(valid, logits_b.double(), float("-inf"))
    d = torch.where(valid, (a - b).abs(), 0.0).amax(1)
    sparse = n_valid.long() > k
    kk = min(k, N)
    kth_a = torch.where(sparse, a.topk(kk, dim=1).values[:, -1], float("-inf"))
    kth_b = torch.where(sparse, b.topk(kk, dim=1).values[:, -1], float("-inf"))

    def members(idx):
        m = torch.zeros(R, N + 1, dtype=torch.bool, device=dev)
        m.scatter_(1, torch.where(idx >= 0, idx.long(), N), True)
        return m[:, :N]

    diff = members(idx_a) ^ members(idx_b)
    band = (2 * d * (1 + 1e-9))[:, None]
    dist = torch.maximum((a - kth_a[:, None]).abs(), (b - kth_b[:, None]).abs())
    dist = torch.where(sparse[:, None] & valid, dist, float("inf"))  # short rows, or a position past n_valid
    bad = diff & ~(dist <= band)
    rows, cols = torch.nonzero(bad, as_tuple=True)
    report = dict(rows=R, rows_differing=int(diff.any(1).sum()), indices_differing=int(diff.sum()),
                  not_near_tie=int(bad.sum()), max_logit_discrepancy=float(d.max()) if R else 0.0,
                  max_distance_over_band=float((dist / band.clamp(min=1e-300))[diff].max()) if bool(diff.any()) else 0.0)
    if rows.numel():
        examples = [dict(row=int(r), pos=int(p), a=float(a[r, p]), b=float(b[r, p]), kth_a=float(kth_a[r]),
                         kth_b=float(kth_b[r]), band=float(band[r, 0])) for r, p in zip(rows[:5], cols[:5])]
        raise AssertionError(f"top-k selections differ by more than near-ties: {report}; e.g. {examples}")
    return report


def tuned_vs_default_selection(c: dict, shape: dict, best: dict, preps: dict, logits: torch.Tensor,
                               idx: torch.Tensor, tuned_step, tol: float) -> dict:
    """The composed tuned step against the default one, stage by stage on the same inputs: the tuned query prep +
    indexer + top-k selection may differ from the default selection only by near-ties (topk_near_ties), and the
    tuned step must be the default attention over its own selection (so any remaining difference of the two
    steps is which near-tied tokens were attended)."""
    iq, w = preps[best["query_prep"]]()
    tuned_logits = indexer_logits(iq, w, c["k_cache"], c["k_scale"], c["tables"], c["row_seq"], c["n_valid"],
                                  c["context"], **best["indexer"])
    tuned_idx = select_topk(tuned_logits, c["n_valid"], shape["topk"], **best["topk"])
    report = topk_near_ties(logits, tuned_logits, idx, tuned_idx, c["n_valid"], shape["topk"])
    on_tuned = mla_attention(c["q"], c["latent"], c["tables"], c["row_seq"], torch.clamp(c["n_valid"], max=shape["topk"]),
                             c["scale"], shape["kv_lora"], shape["topk"], indices=tuned_idx)
    problem = _attention_same(on_tuned, tol)(tuned_step())
    if problem:
        raise AssertionError(f"the tuned step is not the default attention over its own selection: {problem}")
    report["tuned_step_vs_default_attention_on_tuned_selection"] = "same within tolerance"
    return report


def sampled_candidates(logits: torch.Tensor, n_valid: torch.Tensor, k: int) -> dict:
    """How many keys passed the sampled top-k's threshold (default sample and capacity), and in how many rows
    the sample missed (fewer than k or more than the buffer), so the slow in-program fallback ran."""
    _, candidates = topk_positions_sampled(logits, n_valid, k, return_candidates=True)
    long_rows = candidates >= 0  # rows longer than the candidate buffer: the sampled threshold was used
    missed = long_rows & ((candidates < k) | (candidates > default_capacity(k)))
    return dict(rows_sampled=int(long_rows.sum()), min=int(candidates[long_rows].min()) if bool(long_rows.any()) else None,
                max=int(candidates.max()), fallback_rows=int(missed.sum()))


def sweep_shape(sw: Sweep, c: dict, shape: dict, grids: dict, attention_best: dict | None,
                topk_only: bool = False) -> dict:
    topk, dv, n = shape["topk"], shape["kv_lora"], c["context"]
    fns, logits, idx = steps(c, shape)
    checked = check(c, shape, fns, logits, idx)  # the defaults vs the torch oracles
    tol = 2e-2 if c["q"].dtype == torch.bfloat16 else 1e-4
    sparse_len = torch.clamp(c["n_valid"], max=topk)
    paging = dict(block_tables=c["tables"], row_seq=c["row_seq"], page=shape["page"])
    out = dict(check=checked)

    def run_indexer(cfg):
        return indexer_logits(c["iq8"], c["w8"], c["k_cache"], c["k_scale"], c["tables"], c["row_seq"], c["n_valid"], n,
                              **cfg)

    def run_topk(cfg):
        return select_topk(logits, c["n_valid"], topk, **cfg, **paging)

    preps = {p: steps(c, shape, dict(query_prep=p))[0]["query_prep"] for p in ("torch", "fused")}

    def run_prep(cfg):
        return preps[cfg["query_prep"]]()

    if not topk_only:
        out["query_prep"] = sw.best("query_prep", [dict(query_prep=p) for p in ("torch", "fused")], run_prep,
                                    _prep_same(c["iq8"], c["w8"]))
        out["indexer"] = sw.best("indexer", grids["indexer"], run_indexer, _indexer_same(logits, n))
    out["topk"] = sw.best("topk", grids["topk"], run_topk, _topk_same(idx))
    out["sampled_topk_candidates"] = sampled_candidates(logits, c["n_valid"], topk)
    if topk_only:
        return out
    if attention_best is None:
        _, slot = topk_positions(logits, c["n_valid"], topk, **paging)
        want = fns["sparse_attention"]()

        def run_attention(cfg):
            cfg = dict(cfg)
            use_slots = cfg.pop("slots", False)
            return mla_attention(c["q"], c["latent"], c["tables"], c["row_seq"], sparse_len, c["scale"], dv, topk,
                                 indices=slot if use_slots else idx, indices_are_slots=use_slots, **cfg)

        same = _attention_same(want, tol)
        first = sw.best("attention", grids["attention"], run_attention, same)
        second = [dict(cfg, slots=s, num_splits=k) for (_, cfg), s, k in
                  itertools.product(first[:grids["finalists"]], [False, True], grids["splits"])]
        out["attention"] = sw.best("attention", second, run_attention, same) + first
        out["attention"].sort(key=lambda t: t[0])
    best = dict(query_prep=out["query_prep"][0][1]["query_prep"], indexer=out["indexer"][0][1], topk=out["topk"][0][1],
                attention=(attention_best or out["attention"][0][1]))
    default_step, step = fns["sparse_step"], steps(c, shape, best)[0]["sparse_step"]
    # Every stage of the tuned step was checked on its own above (indexer logits, top-k sets, attention on the
    # same indices). The whole step may still differ from the default one where the tuned query prep / indexer
    # moves a near-tied score across the top-k boundary, so a different token is attended; the direct check
    # below proves that every differing index is such a near-tie (or stops the sweep).
    out["tuned_vs_default_topk"] = tuned_vs_default_selection(c, shape, best, preps, logits, idx, step, tol)
    near = out["tuned_vs_default_topk"]
    print(f"  tuned vs default selection (B={c['batch']}, N={n}): {near['indices_differing']} differing indices in "
          f"{near['rows_differing']}/{near['rows']} rows, all near-ties (max |logit diff| "
          f"{near['max_logit_discrepancy']:.3g}, worst at {near['max_distance_over_band']:.2f} of the 2d band)", flush=True)
    problem = _attention_same(default_step(), tol)(step())
    if problem:
        print(f"  note: tuned step vs default step (B={c['batch']}, N={n}): {problem} (near-tied tokens, checked above)")
    out["step_vs_default"] = problem or "same within tolerance"
    times = dict(default_step=sw.time(default_step), tuned_step=sw.time(step), flashinfer_dense=None)
    if sw.cuda:
        fi = flashinfer_dense(c, shape)
        times["flashinfer_dense"] = sw.time(fi) if fi is not None else None
    out["best"], out["times_ms"] = best, times
    return out


def _us(ms: float, cuda: bool) -> str:
    return f"{ms * 1e3:.1f} us" if cuda else "untimed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 (checks, no timing)")
    ap.add_argument("--merge", action="store_true", help="keep the other shapes already in the JSON file")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/dsa_tune_<gpu>.json (CUDA only)")
    ap.add_argument("--topk-only", action="store_true",
                    help="check the defaults, then sweep only the top-k variants (radix and sampled); a quick look "
                         "that writes results/dsa_topk_<gpu>.json unless --json says otherwise")
    args = ap.parse_args()
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke (interpreter checks) or on a GPU")
    shape, grids = (V32, GPU_GRIDS) if cuda else (SMOKE, SMOKE_GRIDS)
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    contexts, batches = (args.contexts, args.batches) if cuda else ([75], [2])
    sw, started, results = Sweep(cuda), time.perf_counter(), {}
    for batch in batches:
        attention_best = None
        for context in sorted(contexts, reverse=True):  # attention tuned at the largest context, reused below it
            c = build_case(batch, context, shape, True, device, dtype)
            if args.topk_only:
                res = sweep_shape(sw, c, shape, grids, None, topk_only=True)
                print(f"B={batch:3d} N={context:6d}: top-k " + ", ".join(
                    f"{_us(ms, cuda)} {cfg}" for ms, cfg in res["topk"][:4]) + f" | sampled candidates "
                    f"{res['sampled_topk_candidates']}  [{time.perf_counter() - started:.0f} s]", flush=True)
                results[f"B{batch}_N{context}"] = dict(batch=batch, context=context, **res)
                del c
                continue
            res = sweep_shape(sw, c, shape, grids, attention_best)
            attention_best = res["best"]["attention"]
            t = res["times_ms"]
            fi = t["flashinfer_dense"]
            print(f"B={batch:3d} N={context:6d}: tuned step {_us(t['tuned_step'], cuda)} (default "
                  f"{_us(t['default_step'], cuda)}) | query prep {_us(res['query_prep'][0][0], cuda)} "
                  f"{res['best']['query_prep']} | indexer {_us(res['indexer'][0][0], cuda)} {res['best']['indexer']}"
                  f" | topk {_us(res['topk'][0][0], cuda)} {res['best']['topk']} | attention "
                  + (f"{_us(res['attention'][0][0], cuda)} " if "attention" in res else "(reused) ")
                  + f"{res['best']['attention']}"
                  + (f" | FlashInfer dense {fi * 1e3:.1f} us = {fi / t['tuned_step']:.2f}x" if fi else "")
                  + f"  [{time.perf_counter() - started:.0f} s]", flush=True)
            results[f"B{batch}_N{context}"] = dict(batch=batch, context=context, **res)
            del c
            if cuda:
                torch.cuda.empty_cache()
    import triton

    out = dict(device=torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)", torch=torch.__version__,
               triton=triton.__version__, shape=shape, command=" ".join(sys.argv), host=platform.node(),
               sweep_s=time.perf_counter() - started, results=results)
    name = "dsa_topk" if args.topk_only else "dsa_tune"
    path = args.json or (os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                      f"{name}_{gpu_slug()}.json") if cuda else None)
    if path and args.merge and os.path.exists(path):  # e.g. B=32 swept in a second process
        with open(path) as f:
            out["results"] = json.load(f).get("results", {}) | results
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {path}", flush=True)
    print(f"sweep took {out['sweep_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

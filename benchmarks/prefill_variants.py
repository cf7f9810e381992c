"""Experiment: which Triton 3.6 kernel changes close our dense paged prefill's gap to cuDNN on Hopper?

Not a library change. One causal sequence of N tokens (default 32K), H=32, Hkv=8, D=128, bf16, timed with
triton.testing.do_bench (median): the library kernel (`kernels/prefill.py`, autotuned), cuDNN SDPA (K/V
expanded to H heads outside the timed region), FlashInfer when importable, and variants of one
self-contained kernel written like the library's (same tiles, longest query tiles first, first the KV
tiles every row sees whole, then the diagonal ones with the causal mask, base-2 online softmax):

  copy          the library's algorithm, K/V gathered row by row through the block table (page 16)
  bn64          BLOCK_N = 64 instead of 128 (more, smaller K/V tiles; more stages fit in shared memory)
  prescale_q    q multiplied by scale·log2(e) once, so scores are already base-2 logits
  mask_all      ablation: the causal mask on every tile (no whole-tile / diagonal split)
  loop_stages   tl.range(..., num_stages=S): the pipelining depth of the KV loop alone
  page_block    page 128 cache: a tile lies in one page, so one block-table read per tile and one 2-D
                pointer block (base + row·stride) instead of 128 per-row page lookups
  tma           page 128 cache: K and V tiles loaded by TMA through a host TensorDescriptor over the
                cache viewed as [blocks·2·page, Hkv·D] (the Hopper path of Triton's fused-attention tutorial)
  tma_ws        tma + tl.range(..., warp_specialize=True) (Triton documents it for Blackwell; a compile
                failure on Hopper is recorded, not hidden)

Every variant is swept over a few (num_warps, num_stages) and its best is reported; each is first checked
against the library kernel's output (bf16: max abs error ≤ 2e-2, on an odd small length and at N).
Prints a table and writes benchmarks/results/prefill_variants_<gpu>.json.

    . benchmarks/gpu_env.sh && python benchmarks/prefill_variants.py               # H100: ~3-5 min
    TRITON_INTERPRET=1 python benchmarks/prefill_variants.py --cpu-smoke           # CPU: tiny shapes, no speed
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
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention_kernels import _cudnn_prefill, metadata, paged_cache, result_path, synthetic_kv_q  # noqa: E402

from sparse_llm.kernels.prefill import paged_prefill  # noqa: E402

LOG2_E = 1.0 / math.log(2.0)
# What a variant that Triton cannot build or launch here raises (e.g. warp specialisation on Hopper).
_BUILD_ERRORS = (CompilationError, OutOfResources, RuntimeError, ValueError, AssertionError)
BLOCK_M = 128
TOL = 2e-2  # bf16 outputs of two kernels that round differently


@triton.jit
def _load_kv(CACHE, BT, DESC, start_n, offs_n, offs_d, kv_head, stride_cb, stride_ckv, stride_cp, stride_ch,
             kv_ok, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, LOAD: tl.constexpr, MASKED: tl.constexpr):
    """K, V tiles [BLOCK_N, D] of keys start_n + offs_n. Page-contiguous loads read whole in-page rows; keys
    past the sequence are then masked out of the scores by the caller and their V rows zeroed here."""
    if LOAD == "tma":
        page = tl.load(BT + start_n // PAGE_SIZE)
        row = page * 2 * PAGE_SIZE + start_n % PAGE_SIZE
        k = DESC.load([row, kv_head * HEAD_DIM])
        v = DESC.load([row + PAGE_SIZE, kv_head * HEAD_DIM])
    elif LOAD == "page_block":
        page = tl.load(BT + start_n // PAGE_SIZE).to(tl.int64)
        base = CACHE + page * stride_cb + kv_head * stride_ch + (start_n % PAGE_SIZE) * stride_cp
        ptrs = base + offs_n[:, None] * stride_cp + offs_d[None, :]
        k = tl.load(ptrs)
        v = tl.load(ptrs + stride_ckv)
    else:
        kv_idx = start_n + offs_n
        if MASKED:
            page = tl.load(BT + kv_idx // PAGE_SIZE, mask=kv_ok, other=0)
        else:
            page = tl.load(BT + kv_idx // PAGE_SIZE)
        off = page.to(tl.int64) * stride_cb + (kv_idx % PAGE_SIZE) * stride_cp
        ptrs = CACHE + kv_head * stride_ch + off[:, None] + offs_d[None, :]
        if MASKED:
            k = tl.load(ptrs, mask=kv_ok[:, None], other=0.0)
            v = tl.load(ptrs + stride_ckv, mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(ptrs)
            v = tl.load(ptrs + stride_ckv)
    if MASKED and LOAD != "gather":
        v = tl.where(kv_ok[:, None], v, 0.0)  # rows past the sequence may hold anything (0·NaN = NaN)
    return k, v


@triton.jit
def _step(acc, l_i, m_i, q, q_pos, CACHE, BT, DESC, start_n, n_ctx, qk_scale, offs_n, offs_d, kv_head,
          stride_cb, stride_ckv, stride_cp, stride_ch, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
          LOAD: tl.constexpr, MASKED: tl.constexpr, PRESCALE_Q: tl.constexpr):
    kv_idx = start_n + offs_n
    kv_ok = kv_idx < n_ctx
    k, v = _load_kv(CACHE, BT, DESC, start_n, offs_n, offs_d, kv_head, stride_cb, stride_ckv, stride_cp,
                    stride_ch, kv_ok, PAGE_SIZE, HEAD_DIM, LOAD, MASKED)
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where((kv_idx[None, :] <= q_pos[:, None]) & kv_ok[None, :], qk, float("-inf"))
    if PRESCALE_Q:  # scores are base-2 logits already
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _tiles(acc, l_i, m_i, q, q_pos, CACHE, BT, DESC, lo, hi, n_ctx, qk_scale, offs_n, offs_d, kv_head,
           stride_cb, stride_ckv, stride_cp, stride_ch, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
           BLOCK_N: tl.constexpr, LOAD: tl.constexpr, MASKED: tl.constexpr, PRESCALE_Q: tl.constexpr,
           LOOP_STAGES: tl.constexpr, WARP_SPEC: tl.constexpr):
    """KV tiles [lo, hi); the loop form (plain range, per-loop stages, warp specialisation) is the variant."""
    if WARP_SPEC:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _step(acc, l_i, m_i, q, q_pos, CACHE, BT, DESC, start_n, n_ctx, qk_scale, offs_n,
                                  offs_d, kv_head, stride_cb, stride_ckv, stride_cp, stride_ch, PAGE_SIZE,
                                  HEAD_DIM, LOAD, MASKED, PRESCALE_Q)
    elif LOOP_STAGES > 0:
        for start_n in tl.range(lo, hi, BLOCK_N, num_stages=LOOP_STAGES):
            acc, l_i, m_i = _step(acc, l_i, m_i, q, q_pos, CACHE, BT, DESC, start_n, n_ctx, qk_scale, offs_n,
                                  offs_d, kv_head, stride_cb, stride_ckv, stride_cp, stride_ch, PAGE_SIZE,
                                  HEAD_DIM, LOAD, MASKED, PRESCALE_Q)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _step(acc, l_i, m_i, q, q_pos, CACHE, BT, DESC, start_n, n_ctx, qk_scale, offs_n,
                                  offs_d, kv_head, stride_cb, stride_ckv, stride_cp, stride_ch, PAGE_SIZE,
                                  HEAD_DIM, LOAD, MASKED, PRESCALE_Q)
    return acc, l_i, m_i


@triton.jit
def _variant_kernel(
    Q, CACHE, O, BT, DESC, n_ctx, qk_scale, stride_qt, stride_qh, stride_cb, stride_ckv, stride_cp, stride_ch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, LOAD: tl.constexpr, PRESCALE_Q: tl.constexpr, DIAG_SPLIT: tl.constexpr,
    LOOP_STAGES: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """Causal prefill of one sequence (queries = all n_ctx positions); grid (cdiv(n_ctx, BLOCK_M), H)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (latest) query tiles first
    head = tl.program_id(1)
    kv_head = head // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_ctx
    q = tl.load(Q + offs_m.to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if PRESCALE_Q:
        q = (q.to(tl.float32) * qk_scale).to(q.dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = tl.minimum(n_ctx, (pid_m + 1) * BLOCK_M)
    if DIAG_SPLIT:
        mid = ((pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N  # tiles below mid are seen whole by every row
        acc, l_i, m_i = _tiles(acc, l_i, m_i, q, offs_m, CACHE, BT, DESC, 0, mid, n_ctx, qk_scale, offs_n, offs_d,
                               kv_head, stride_cb, stride_ckv, stride_cp, stride_ch, PAGE_SIZE, HEAD_DIM, BLOCK_N,
                               LOAD, False, PRESCALE_Q, LOOP_STAGES, WARP_SPEC)
    else:
        mid = 0
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, offs_m, CACHE, BT, DESC, mid, hi, n_ctx, qk_scale, offs_n, offs_d,
                           kv_head, stride_cb, stride_ckv, stride_cp, stride_ch, PAGE_SIZE, HEAD_DIM, BLOCK_N,
                           LOAD, True, PRESCALE_Q, LOOP_STAGES, WARP_SPEC)
    o_ptrs = O + offs_m.to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------- variants
# name -> (kernel constexprs, page size of the cache it reads, (num_warps, num_stages) configs swept)
def variants(smoke: bool) -> dict:
    base = dict(BLOCK_N=128, LOAD="gather", PRESCALE_Q=False, DIAG_SPLIT=True, LOOP_STAGES=0, WARP_SPEC=False)
    w8 = [(8, s) for s in (2, 3, 4)]
    table = {
        "copy": (base, 16, w8),
        "bn64": ({**base, "BLOCK_N": 64}, 16, [(w, s) for w in (4, 8) for s in (3, 4, 5)]),
        "prescale_q": ({**base, "PRESCALE_Q": True}, 16, w8),
        "mask_all": ({**base, "DIAG_SPLIT": False}, 16, w8),
        "loop_stages": ({**base, "LOOP_STAGES": 4}, 16, [(8, 3), (8, 4)]),
        "page_block": ({**base, "LOAD": "page_block"}, 128, w8),
        "tma": ({**base, "LOAD": "tma"}, 128, w8),
        "tma_ws": ({**base, "LOAD": "tma", "WARP_SPEC": True}, 128, [(8, 3)]),
    }
    if smoke:  # the interpreter ignores warps / stages: one config each
        table = {k: (c, p, cfgs[:1]) for k, (c, p, cfgs) in table.items()}
    return table


def launch(q, cache, tables, n, scale, out, consts, warps, stages):
    h, d = q.shape[1], q.shape[2]
    hkv, page = cache.shape[3], cache.shape[2]
    flat = cache.view(-1, hkv * d)  # [blocks·2·page, Hkv·D]: K rows of block b at 2·b·page, V rows after them
    desc = TensorDescriptor(flat, shape=list(flat.shape), strides=list(flat.stride()),
                            block_shape=[consts["BLOCK_N"], d])
    grid = (triton.cdiv(n, BLOCK_M), h)
    _variant_kernel[grid](
        q, cache, out, tables, desc, n, scale * LOG2_E, q.stride(0), q.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        GROUP=h // hkv, HEAD_DIM=d, PAGE_SIZE=page, BLOCK_M=BLOCK_M, num_warps=warps, num_stages=stages, **consts,
    )
    return out


def check_page_fit(consts, page):
    if consts["LOAD"] != "gather" and page % consts["BLOCK_N"]:
        raise ValueError(f"LOAD={consts['LOAD']} needs page_size a multiple of BLOCK_N={consts['BLOCK_N']}, got {page}")


# ----------------------------------------------------------------------------------------------- run
def build(n, args, device, dtype, page):
    """Synthetic q/k/v (benchmarks/attention_kernels.py's generator) and a shuffled-page cache of `page`."""
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    k, v, q = synthetic_kv_q(n, torch.arange(n, device=device), h, hkv, d, dtype, device, seed=n)
    caches = {}
    for p in sorted({16, 128} if page is None else {page}):
        caches[p] = paged_cache([n], hkv, d, p, dtype, device, fill=lambda i, _: (k, v), seed=p)
    return q, k, v, caches


def reference(q, caches, n, scale, device):
    """The library kernel's output on the page-16 cache: what every variant must reproduce."""
    cache, tables = caches[16]
    m = metadata([n], [n], 1, tables, 16, device)
    return paged_prefill(q, cache, m.cu_seqlens_q, m.seq_lens, m.block_tables, n, scale), m


def run_variant(name, spec, q, caches, n, scale, ref, bench) -> dict:
    consts, page, cfgs = spec
    cache, tables = caches[page]
    check_page_fit(consts, page)
    out = torch.empty_like(q)
    row = {"variant": name, "page_size": page, **{k.lower(): v for k, v in consts.items()}, "configs": []}
    for warps, stages in cfgs:
        try:
            launch(q, cache, tables, n, scale, out, consts, warps, stages)
        except _BUILD_ERRORS as e:  # a variant that does not compile or launch on this GPU is a result
            row["configs"].append({"num_warps": warps, "num_stages": stages,
                                   "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        err = float((out.float() - ref.float()).abs().max())
        cfg = {"num_warps": warps, "num_stages": stages, "max_err_vs_library": err}
        if err <= TOL:
            cfg["ms"] = bench(lambda w=warps, s=stages: launch(q, cache, tables, n, scale, out, consts, w, s))
        row["configs"].append(cfg)
    timed = [c for c in row["configs"] if "ms" in c]
    if timed:
        best = min(timed, key=lambda c: c["ms"])
        row.update(best_ms=best["ms"], best_num_warps=best["num_warps"], best_num_stages=best["num_stages"])
    row["ok"] = bool(timed) and all(c.get("max_err_vs_library", 0.0) <= TOL for c in row["configs"])
    return row


def check_small(args, device, dtype, table) -> dict:
    """Every variant against the library kernel on an odd length (partial tiles, both loop phases)."""
    n = args.check_len
    scale = args.head_dim ** -0.5
    q, _, _, caches = build(n, args, device, dtype, None)
    ref, _ = reference(q, caches, n, scale, device)
    res = {}
    for name, (consts, page, cfgs) in table.items():
        cache, tables = caches[page]
        out = torch.empty_like(q)
        try:
            launch(q, cache, tables, n, scale, out, consts, *cfgs[0])
            res[name] = float((out.float() - ref.float()).abs().max())
        except _BUILD_ERRORS as e:  # recorded; the variant is then not timed
            res[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--check-len", type=int, default=1000)
    ap.add_argument("--only", nargs="+", default=None, help="run only these variants")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, no speed")
    ap.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer even if installed (no JIT build)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.heads, args.kv_heads, args.head_dim, args.seq_len, args.check_len = 2, 1, 64, 300, 141
    else:
        args.heads, args.kv_heads, args.head_dim = 32, 8, 128
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or with --cpu-smoke")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    gpu, out_path = result_path("prefill_variants", device, args.cpu_smoke, args.out)
    table = variants(args.cpu_smoke)
    if args.only:
        unknown = sorted(set(args.only) - set(table))
        if unknown:
            raise SystemExit(f"--only: unknown variants {unknown}; known: {sorted(table)}")
        table = {k: v for k, v in table.items() if k in args.only}
    bench = _timer(device)
    n, scale = args.seq_len, args.head_dim ** -0.5
    flops = 2.0 * n * n * args.heads * args.head_dim  # causal half of 4·N²·H·D
    result = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "shape": {"seq_len": n, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                        "dtype": str(dtype).replace("torch.", ""), "block_m": BLOCK_M}}
    t0 = time.time()
    result["check_small_max_err"] = check_small(args, device, dtype, table)
    print("small-length check (max abs err vs library):", json.dumps(result["check_small_max_err"]), flush=True)
    q, k, v, caches = build(n, args, device, dtype, None)
    ref, m = reference(q, caches, n, scale, device)
    cache16 = caches[16][0]
    base = {"library_ms": bench(
        lambda: paged_prefill(q, cache16, m.cu_seqlens_q, m.seq_lens, m.block_tables, n, scale))}
    if device.type == "cuda":
        base.update(_cudnn_prefill(q, k, v, args.heads, args.kv_heads, scale, bench, flops))
        base.update(_flashinfer_ms(args, m, q, cache16, device, dtype, bench))
    del k, v
    result["baselines"] = base
    rows = []
    for name, spec in table.items():
        small = result["check_small_max_err"].get(name)
        if not isinstance(small, float) or small > TOL:
            rows.append({"variant": name, "ok": False, "skipped": f"small-length check failed: {small}"})
            continue
        rows.append(run_variant(name, spec, q, caches, n, scale, ref, bench))
        print(_line(rows[-1], base, flops), flush=True)
    result["variants"] = rows
    result["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(_table(result, flops))
    print(f"wrote {out_path}")
    return 0 if all(r["ok"] for r in rows if r["variant"] == "copy") else 1


def _timer(device):
    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def once(fn):  # CPU smoke: exercise the path, the time means nothing
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return once


def _flashinfer_ms(args, m, q, cache, device, dtype, bench) -> dict:
    if args.no_flashinfer or importlib.util.find_spec("flashinfer") is None:
        return {}
    from sparse_llm.backends.flashinfer_backend import FlashInferPlanner, import_flashinfer

    planner = FlashInferPlanner(import_flashinfer(), device, args.heads, args.kv_heads, args.head_dim,
                                args.head_dim ** -0.5, dtype, dtype)
    planner.plan(m, cache.shape[2])
    return {"flashinfer_ms": bench(lambda: planner.prefill.run(q, cache))}


def _tflops(flops, ms):
    return None if ms is None else flops / ms * 1e-9


def _line(r, base, flops) -> str:
    if "best_ms" not in r:
        errs = [c.get("error") or c.get("max_err_vs_library") for c in r.get("configs", [])]
        return f"  {r['variant']:<12} not timed: {r.get('skipped') or errs}"
    t = _tflops(flops, r["best_ms"])
    vs_lib = base["library_ms"] / r["best_ms"]
    vs_cudnn = base["cudnn_ms"] / r["best_ms"] if base.get("cudnn_ms") else None
    cudnn = "-" if vs_cudnn is None else f"{vs_cudnn:.2f}"
    return (f"  {r['variant']:<12} page {r['page_size']:>3}  {r['best_ms']:8.2f} ms  {t:6.0f} TFLOP/s  "
            f"x library {vs_lib:.2f}  x cuDNN {cudnn}  (warps {r['best_num_warps']}, stages {r['best_num_stages']})")


def _table(result, flops) -> str:
    b = result["baselines"]
    lines = [f"prefill N={result['shape']['seq_len']} causal, H={result['shape']['heads']} "
             f"Hkv={result['shape']['kv_heads']} D={result['shape']['head_dim']} {result['shape']['dtype']}"]
    for key in ("library_ms", "cudnn_ms", "flashinfer_ms"):
        if b.get(key) is not None:
            lines.append(f"  {key[:-3]:<12} {b[key]:8.2f} ms  {_tflops(flops, b[key]):6.0f} TFLOP/s")
    lines += [_line(r, b, flops) for r in result["variants"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

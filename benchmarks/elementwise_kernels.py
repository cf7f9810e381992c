"""Fused elementwise kernels (sparse_llm/kernels/elementwise.py) vs the torch code they replace (issue 3).

Shapes of a Llama-3-8B decode step (hidden 4096, 32 q / 8 kv heads of 128, intermediate 14336, bf16),
`--tokens` rows (the decode batch). Correctness first: every op in bf16 against the models' torch path on
the same inputs (fraction of bit-identical elements, max difference in bf16 ulps; more than 4 ulps is an
error). Then µs per call, each op replayed inside a CUDA graph of REPS calls (as the decode step runs it),
and one layer's elementwise work together (add+norm, RoPE on q/k, add+norm, SiLU·mul): torch = ~30
kernels, fused = 4.

    python benchmarks/elementwise_kernels.py [--tokens 64] [--output benchmarks/results/elementwise_kernels_h100.json]
    python benchmarks/elementwise_kernels.py --cpu-smoke      # tiny shapes in the Triton interpreter, no speed
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # before Triton is imported: the kernels run in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse_llm.kernels import elementwise as ew  # noqa: E402
from sparse_llm.models import layers  # noqa: E402
from sparse_llm.models.layers import RMSNorm  # noqa: E402
from sparse_llm.models.rotary import apply_rotary, inverse_frequencies  # noqa: E402

LLAMA3_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336)
SMOKE = dict(hidden=192, heads=6, kv_heads=2, head_dim=32, inter=200)
REPS = 20  # calls per captured graph
MAX_ULPS = 4.0  # a real bug is far off; roundings that fall differently are 1-2


class Rope:
    """cos/sin rows as LlamaModel builds them (Llama 3.1 scaling) for random positions."""

    def __init__(self, head_dim: int, tokens: int, dtype, device):
        import transformers

        config = transformers.LlamaConfig(
            hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=500000.0, max_position_embeddings=131072,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
        )
        inv_freq, scale = inverse_frequencies(config, head_dim)
        pos = torch.randint(0, 8192, (tokens,)).float()
        emb = torch.cat([pos[:, None] * inv_freq[None, :]] * 2, dim=-1)
        self.cos = (emb.cos() * scale).to(dtype).to(device)
        self.sin = (emb.sin() * scale).to(dtype).to(device)


def make_ops(shape: dict, tokens: int, dtype, device) -> dict:
    """name -> (inputs factory, torch fn, fused fn); each fn takes the inputs and returns the tensors to compare."""
    h, d, inter = shape["hidden"], shape["head_dim"], shape["inter"]
    q_size, kv_size = shape["heads"] * d, shape["kv_heads"] * d
    norm = RMSNorm(h, 1e-5).to(device)
    norm.weight.data = (torch.randn(h, device=device) * 0.2 + 1).to(dtype)
    rope = Rope(d, tokens, dtype, device)

    def rnd(*s):
        return torch.randn(*s, device=device).to(dtype)

    def qk(qkv):
        return (qkv[:, :q_size].view(tokens, shape["heads"], d),
                qkv[:, q_size:q_size + kv_size].view(tokens, shape["kv_heads"], d))

    def torch_layer(x, res, qkv, gate_up):
        normed, res = norm(x, res)
        q, k = qk(qkv)
        q, k = apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin)
        normed2, res = norm(normed, res)  # stands for the post-attention add+norm
        return normed2, res, q, k, layers.silu_and_mul(gate_up)

    def fused_layer(x, res, qkv, gate_up):
        normed, res = ew.fused_add_rms_norm(x, res, norm.weight, norm.eps)
        q, k = ew.rotary_qk(*qk(qkv), rope.cos, rope.sin)
        normed2, res = ew.fused_add_rms_norm(normed, res, norm.weight, norm.eps)
        return normed2, res, q, k, ew.silu_and_mul(gate_up)

    return {
        "rms_norm": (lambda: [rnd(tokens, h)], lambda x: [norm(x)], lambda x: [ew.rms_norm(x, norm.weight, norm.eps)]),
        "add_rms_norm": (lambda: [rnd(tokens, h), rnd(tokens, h)], lambda x, r: list(norm(x, r)),
                         lambda x, r: list(ew.fused_add_rms_norm(x, r, norm.weight, norm.eps))),
        "rotary_qk": (lambda: [rnd(tokens, q_size + 2 * kv_size)],
                      lambda qkv: [apply_rotary(t, rope.cos, rope.sin) for t in qk(qkv)],
                      lambda qkv: list(ew.rotary_qk(*qk(qkv), rope.cos, rope.sin))),
        "silu_and_mul": (lambda: [rnd(tokens, 2 * inter)], lambda gu: [layers.silu_and_mul(gu)],
                         lambda gu: [ew.silu_and_mul(gu)]),
        "layer_elementwise": (lambda: [rnd(tokens, h), rnd(tokens, h), rnd(tokens, q_size + 2 * kv_size), rnd(tokens, 2 * inter)],
                              lambda *a: list(torch_layer(*a)), lambda *a: list(fused_layer(*a))),
    }


def compare(torch_outs: list[torch.Tensor], fused_outs: list[torch.Tensor]) -> dict:
    identical, total, worst = 0, 0, 0.0
    for a, b in zip(torch_outs, fused_outs):
        ulp = a.float().abs() * torch.finfo(a.dtype).eps + torch.finfo(a.dtype).tiny
        worst = max(worst, ((a.float() - b.float()).abs() / ulp).max().item())
        identical += int((a == b).sum())
        total += a.numel()
    return {"identical_fraction": identical / total, "max_ulps": worst}


def time_us(fn, args, device, graphs: bool) -> float:
    """µs per call: REPS calls captured in one CUDA graph, the graph replayed (GPU); plain calls (CPU smoke)."""
    if not graphs:
        t = time.perf_counter()
        fn(*args)
        return 1e6 * (time.perf_counter() - t)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn(*args)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / REPS)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="rows per call (the decode batch)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU in the Triton interpreter (no speed)")
    ap.add_argument("--output", default=None,
                    help="JSON path (default: benchmarks/results/elementwise_kernels_<cuda|cpu_smoke>.json)")
    ns = ap.parse_args()
    smoke = ns.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --cpu-smoke)")
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float16 if smoke else torch.bfloat16  # the interpreter has no bf16 arithmetic
    shape = SMOKE if smoke else LLAMA3_8B
    tokens = min(ns.tokens, 5) if smoke else ns.tokens
    torch.manual_seed(0)
    layers.FUSED_KERNELS = False  # the torch columns run the models' torch code on CUDA tensors too
    results = {}
    for name, (inputs, torch_fn, fused_fn) in make_ops(shape, tokens, dtype, device).items():
        args = inputs()
        check = compare(torch_fn(*[a.clone() for a in args]), fused_fn(*[a.clone() for a in args]))
        if check["max_ulps"] > MAX_ULPS:
            raise SystemExit(f"{name}: fused differs from torch by {check['max_ulps']:.1f} ulps (> {MAX_ULPS})")
        t_torch = time_us(torch_fn, args, device, graphs=not smoke)
        t_fused = time_us(fused_fn, args, device, graphs=not smoke)
        results[name] = dict(check, torch_us=t_torch, fused_us=t_fused, speedup=t_torch / t_fused)
        print(f"{name:18s} torch {t_torch:8.2f} us  fused {t_fused:8.2f} us  ({t_torch / t_fused:4.1f}x)  "
              f"identical {100 * check['identical_fraction']:5.1f}%  max {check['max_ulps']:.2f} ulps")
    per_layer = results["layer_elementwise"]
    saved = per_layer["torch_us"] - per_layer["fused_us"]
    print(f"per layer: {saved:.1f} us saved; x 32 layers = {32 * saved / 1e3:.2f} ms per decode step (Llama-3-8B has 32)")
    report = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if not smoke else "cpu (interpreter)",
              "torch": torch.__version__, "dtype": str(dtype), "tokens": tokens, "shape": shape, "reps_per_graph": REPS,
              "results": results}
    import triton

    report["triton"] = triton.__version__
    default = f"elementwise_kernels_{'cpu_smoke' if smoke else 'cuda'}.json"
    path = Path(ns.output) if ns.output else ROOT / "benchmarks" / "results" / default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

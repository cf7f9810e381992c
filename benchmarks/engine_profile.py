"""Where the GPU time of one batch-64 decode step goes (issue 3): torch.profiler over a few engine steps.

The engine benchmark (benchmarks/engine.py) gives the step split forward / logits / host; this script names the
kernels inside "forward" so the next optimisation targets the largest one. It builds the random-weight
Llama-3-8B-shaped model (ours only, no HF copy), decodes a batch with CUDA graphs (kernels launched by a graph
replay are still recorded by CUPTI) and, for comparison, eagerly, and prints the kernels by total device time.

    python benchmarks/engine_profile.py [--model llama3-8b|smollm2-random] [--batch 64] [--steps 16] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from engine import LLAMA3_8B, SMOLLM2_SHAPE, random_model, random_prompts  # noqa: E402

from sparse_llm.configs.llm_args import LlmArgs  # noqa: E402
from sparse_llm.engine.llm_engine import LLMEngine  # noqa: E402
from sparse_llm.engine.sampling_params import SamplingParams  # noqa: E402
from sparse_llm.models.loader import LoadedModel  # noqa: E402


def kernel_table(prof, steps: int, limit: int, device: bool = True) -> list[dict]:
    """Device kernels (or, on CPU, ops) by self time, per decode step (µs)."""
    rows = []
    for e in prof.key_averages():
        t = e.self_device_time_total if device else e.self_cpu_time_total
        if t <= 0:
            continue
        rows.append({"name": e.key[:110], "us_per_step": t / steps, "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:limit]


def profile_decode(loaded: LoadedModel, batch: int, steps: int, eager: bool) -> dict:
    """Profile `steps` decode steps only: the prefill step and two warm-up decodes run before the profiler starts."""
    prompt_len = 128
    max_len = prompt_len + steps + 16
    args = LlmArgs(model=loaded.source, max_model_len=max_len, max_num_seqs=batch, max_num_batched_tokens=max(8192, batch * prompt_len),
                   enforce_eager=eager, kv_cache_config={"max_tokens": batch * max_len, "enable_prefix_caching": False})
    engine = LLMEngine(args, loaded)
    try:
        params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(random_prompts(batch, prompt_len, int(loaded.hf_config.vocab_size), 1)):
            engine.add_request(str(i), p, params)
        for _ in range(3):
            engine.step(final_only=True)
        cuda = next(loaded.model.parameters()).is_cuda
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(steps):
                engine.step(final_only=True)
            sync()
    finally:
        engine.close()
    return {"eager": eager, "batch": batch, "steps": steps,
            "device_us_per_step": sum(r["us_per_step"] for r in kernel_table(prof, steps, 10_000, cuda)),
            "kernels": kernel_table(prof, steps, 40, cuda)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b", choices=["llama3-8b", "smollm2-random"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (op self times)")
    ap.add_argument("--out", default=None, help="directory for the JSON (default: print only)")
    ns = ap.parse_args()
    shape = LLAMA3_8B if ns.model == "llama3-8b" else SMOLLM2_SHAPE
    loaded = random_model(shape, torch.device(ns.device), torch.bfloat16 if ns.device == "cuda" else torch.float32)
    report = {"gpu": torch.cuda.get_device_name() if ns.device == "cuda" else "cpu", "torch": torch.__version__, "model": ns.model, "runs": []}
    for eager in (False, True):
        r = profile_decode(loaded, ns.batch, ns.steps, eager)
        report["runs"].append(r)
        print(f"\n== {ns.model} batch {ns.batch}, {'eager' if eager else 'CUDA graphs'}: "
              f"{r['device_us_per_step']:.0f} µs of kernels per decode step")
        for k in r["kernels"]:
            print(f"{k['us_per_step']:9.1f} µs  x{k['calls_per_step']:6.1f}  {k['name']}")
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        (Path(ns.out) / f"engine_profile_{ns.model}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

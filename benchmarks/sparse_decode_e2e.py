"""End-to-end decode tokens/s with RocketKV (defaults) vs dense, through the engine, on a long prompt.

A random-weight model of Llama-3-8B's shape (GPU; no download) or SmolLM2's shape (CPU smoke), random prompt
ids. Runs: dense (CUDA graphs, the engine default), dense eager, rocket at its defaults with CUDA graphs
(attention_backend auto: Triton on CUDA, torch on CPU), rocket eager. Rocket compacts each prompt to
prompt_budget tokens per KV head after prefill, then decodes with KT-cache page selection. Each row records
whether decode graphs were captured (`cuda_graphs`), so an engine that fell back to eager is visible.
Decode rates: `decode_tok_per_s` = tokens after the first / time from first to last token (benchmarks/engine.py's
definition; at batch > 1 it includes the other prompts' prefill, during which the first sequences already
decode), and `decode_only_tok_per_s` = batch x steps / time of `--gen` steps taken once every sequence has its
first token (pure decode steps at the full batch: the number to compare with the per-step weight-read floor).

    python benchmarks/sparse_decode_e2e.py                         # GPU: 32K prompt, batch 1 and 4, 64 tokens
    python benchmarks/sparse_decode_e2e.py --device cpu --prompt-len 2200 --batches 1 --gen 4 --out /tmp/e2e.json  # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine import LLAMA3_8B, SMOLLM2_SHAPE, ours_decode_rate, random_model, random_prompts  # noqa: E402

from sparse_llm.configs.llm_args import LlmArgs  # noqa: E402
from sparse_llm.configs.sparse import RocketSparseAttentionConfig  # noqa: E402
from sparse_llm.engine.llm_engine import LLMEngine  # noqa: E402
from sparse_llm.engine.sampling_params import SamplingParams  # noqa: E402
from sparse_llm.llm import LLM  # noqa: E402


def decode_only_rate(engine: LLMEngine, prompts, gen: int, device: torch.device) -> float:
    """Tokens/s of `gen` engine steps taken after every prompt is prefilled and has its first token."""
    params = SamplingParams(max_tokens=2 * gen + 64, temperature=0.0, ignore_eos=True)
    ids = [f"decode-only-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    while len(started) < len(prompts):
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(gen):
        engine.step(final_only=True)  # samples every step: the host waits for each token
    dt = time.perf_counter() - t
    for rid in ids:
        engine.abort_request(rid)
    return len(prompts) * gen / dt


def run(loaded, prompts, gen: int, sparse, eager: bool) -> dict:
    n = len(prompts[0])
    args = LlmArgs(
        model=loaded.source, max_model_len=n + 2 * gen + 80, max_num_seqs=len(prompts), max_num_batched_tokens=8192,
        enforce_eager=eager, sparse_attention_config=sparse,
        kv_cache_config={"max_tokens": len(prompts) * (n + 2 * gen + 128), "enable_prefix_caching": False},
    )
    engine = LLMEngine(args, loaded)
    llm = LLM.from_engine(engine)
    t = time.perf_counter()
    rate = ours_decode_rate(llm, prompts, gen)
    only = decode_only_rate(engine, prompts, gen, engine.device)
    stats = engine.stats()
    res = {"decode_tok_per_s": rate, "decode_only_tok_per_s": only, "seconds": time.perf_counter() - t,
           "decode_sparsity": stats.sparsity.get("decode"), "cuda_graphs": engine.runner.graphs is not None}
    del llm, engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--prompt-len", type=int, default=32768)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = dict(LLAMA3_8B if device.type == "cuda" else SMOLLM2_SHAPE)
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], a.prompt_len + a.gen + 64)
    loaded = random_model(shape, device, dtype)
    result = {"model": "llama3-8b-shape random" if device.type == "cuda" else "smollm2-shape random",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "prompt_len": a.prompt_len, "gen": a.gen, "rocket": RocketSparseAttentionConfig().model_dump(), "rows": []}
    for b in a.batches:
        prompts = random_prompts(b, a.prompt_len, shape["vocab_size"], seed=b)
        row = {"batch": b}
        row["dense"] = run(loaded, prompts, a.gen, None, eager=False)
        if device.type == "cuda":
            row["dense_eager"] = run(loaded, prompts, a.gen, None, eager=True)
        row["rocket"] = run(loaded, prompts, a.gen, RocketSparseAttentionConfig(), eager=False)
        if device.type == "cuda":
            row["rocket_eager"] = run(loaded, prompts, a.gen, RocketSparseAttentionConfig(), eager=True)
        row["rocket_vs_dense"] = row["rocket"]["decode_tok_per_s"] / row["dense"]["decode_tok_per_s"]
        row["rocket_vs_dense_decode_only"] = row["rocket"]["decode_only_tok_per_s"] / row["dense"]["decode_only_tok_per_s"]
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
    out = a.out or str(ROOT / "benchmarks" / "results" / f"sparse_decode_e2e_{device.type}.json")
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

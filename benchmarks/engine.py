"""Engine speed against Hugging Face transformers on the same machine, measured in one run.

CPU (fp32, SmolLM2-135M from the bundled GGUF):
  - prefill of a 2K-token prompt: our time / HF `generate(max_new_tokens=1)` time (sdpa attention);
  - decode tokens/s at batch 1 and 16 (ours and HF's).
GPU (bf16; SmolLM2 (or a random model of its shape) and a random-weight model of Llama-3-8B's shape built
from a config, no download):
  - decode tokens/s at batch 64, ours vs HF `generate`, alternating --rounds times (median ratio reported);
  - prefill tokens/s of an 8K-token prompt, ours vs HF.

Decode rate = generated tokens after the first / time from the first token to the last (ours: from the
request metrics; HF: a logits processor that records when each step's logits are ready). Prompts are random token ids (dense
attention does not depend on the values). Writes JSON to benchmarks/results/.

Host-overhead share (issue 3): a second decode run of the same batch with each phase of the engine step timed
(benchmarks/engine_host_overhead.py; on CUDA every phase ends with a synchronize, so the graph replay lands in
"forward"): host = schedule + build inputs + sampling bookkeeping + output processing, as a share of the step.

    python benchmarks/engine.py --device cpu [--quick]
    python benchmarks/engine.py --device cuda [--quick] [--models smollm2,llama3-8b] [--no-fused-kernels]

On CUDA the models run the fused Triton elementwise kernels (kernels/elementwise.py); --no-fused-kernels runs
the models' torch code instead, for an A/B of the two in the same environment.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse_llm.configs.llm_args import LlmArgs  # noqa: E402
from sparse_llm.engine.llm_engine import LLMEngine  # noqa: E402
from sparse_llm.engine.sampling_params import SamplingParams  # noqa: E402
from sparse_llm.llm import LLM  # noqa: E402
from sparse_llm.models.loader import LoadedModel, default_model_path, load_model  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from engine_host_overhead import measure_decode  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)

# SmolLM2-135M's shape, for GPU speed runs where the GGUF file cannot be shipped (speed does not depend on the values)
SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, length), generator=g).tolist()  # skip the low (special) ids


class CountingTokenizer:
    """Stand-in tokenizer for a random-weight model whose vocabulary has no real tokenizer."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, **_):
        return "x" * len(ids)

    def encode(self, text, **_):
        raise ValueError("the random-weight benchmark model takes token ids only")


# --- models -----------------------------------------------------------------------------------------
def load_smollm2(device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    path = os.environ.get("SMOLLM2_GGUF") or default_model_path()
    ours = load_model(path, dtype=dtype, device=device)
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype, attn_implementation="sdpa"
    ).to(device).eval()
    return ours, hf


def our_llama(config, device: torch.device, dtype: torch.dtype):
    """Our LlamaForCausalLM built directly in `dtype` on `device` (weights random until loaded)."""
    from sparse_llm.models.llama import LlamaForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)


def build_random_llama(device: torch.device, dtype: torch.dtype, shape: dict):
    """HF LlamaForCausalLM with random weights, and ours holding the very same weights."""
    import transformers

    from sparse_llm.models.weights import load_weights

    config = transformers.LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    model = our_llama(config, device, dtype)
    load_weights(model, hf.state_dict().items(), source="random HF model")
    model.to(device).eval()  # buffers built on the host (RoPE tables) move too
    layers = model.attention_layers()
    ours = LoadedModel(
        model=model, hf_config=config, tokenizer=CountingTokenizer(), checkpoint_meta=None, attention_layers=layers,
        layer_specs=[layer.spec for layer in layers], eos_token_ids=[], max_position_embeddings=config.max_position_embeddings,
        source="random weights",
    )
    return ours, hf


def random_model(shape: dict, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Our Llama with random weights (normal, std 0.02), without building an HF copy."""
    import transformers

    config = transformers.LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = our_llama(config, device, dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.to(device).eval()
    layers = model.attention_layers()
    return LoadedModel(
        model=model, hf_config=config, tokenizer=CountingTokenizer(), checkpoint_meta=None, attention_layers=layers,
        layer_specs=[layer.spec for layer in layers], eos_token_ids=[], max_position_embeddings=config.max_position_embeddings,
        source="random weights",
    )


# --- measurements ----------------------------------------------------------------------------------
def make_llm(loaded, max_model_len: int, kv_tokens: int, max_num_seqs: int, batched_tokens: int, eager: bool) -> LLM:
    args = LlmArgs(
        model=loaded.source, max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=batched_tokens,
        enforce_eager=eager, kv_cache_config={"max_tokens": kv_tokens, "enable_prefix_caching": False},
    )
    return LLM.from_engine(LLMEngine(args, loaded))


def ours_prefill_seconds(llm: LLM, prompt: list[int], repeats: int, device) -> float:
    once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], once, use_tqdm=False)  # warm-up
    return median_time(lambda: llm.generate([prompt], once, use_tqdm=False), repeats, device)


def hf_prefill_seconds(hf, prompt: list[int], repeats: int, device) -> float:
    ids = torch.tensor([prompt], device=device)

    def run():
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)

    run()
    return median_time(run, repeats, device)


def ours_decode_rate(llm: LLM, prompts: list[list[int]], gen: int) -> float:
    p = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), use_tqdm=False)  # warm-up
    outs = llm.generate(prompts, p, use_tqdm=False)
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.first_token_time + o.metrics.decode_time for o in outs)
    return len(prompts) * (gen - 1) / (last - first)


class StepClock:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def hf_decode_rate(hf, prompts: list[list[int]], gen: int, device) -> float:
    """Tokens after the first / time from the first step's logits to the last one's (as ours: first to last token)."""
    from transformers import LogitsProcessorList

    ids = torch.tensor(prompts, device=device)

    def run(n: int) -> StepClock:
        clock = StepClock(device)
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        return clock

    run(2)  # warm-up
    clock = run(gen)
    return len(prompts) * (gen - 1) / (clock.times[-1] - clock.times[0])


def step_phases(loaded, batch: int, steps: int, prompt_len: int, eager: bool) -> dict:
    """Per-phase ms of one decode step at this batch, and the host share of the step."""
    us = measure_decode(loaded, batch, steps, prompt_len=prompt_len, enforce_eager=eager)
    out = {f"{k}_ms": v / 1e3 for k, v in us.items()}
    out["host_share"] = us["host"] / us["total"]
    return out


def phases_line(p: dict) -> str:
    return (f"step {p['total_ms']:.2f} ms = forward {p['forward_ms']:.2f} + logits {p['logits_ms']:.2f} + sample {p['sample_ms']:.2f}"
            f" + schedule {p['schedule_ms']:.2f} + inputs {p['inputs_ms']:.2f} + post {p['post_ms']:.2f}; "
            f"host {p['host_ms']:.2f} ms = {100 * p['host_share']:.0f}% of the step")


def bench_cpu(quick: bool) -> dict:
    device, dtype = torch.device("cpu"), torch.float32
    prefill_len, repeats = (256, 1) if quick else (2048, 3)
    gen, batches = (6, (1, 4)) if quick else (32, (1, 16))
    ours, hf = load_smollm2(device, dtype)
    vocab = int(ours.hf_config.vocab_size)
    res: dict = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised)", "dtype": "float32"}

    llm = make_llm(ours, prefill_len + 64, 4 * (prefill_len + 64), 16, prefill_len, eager=True)
    prompt = random_prompts(1, prefill_len, vocab, 0)[0]
    t_ours = ours_prefill_seconds(llm, prompt, repeats, device)
    t_hf = hf_prefill_seconds(hf, prompt, repeats, device)
    res["prefill"] = {"tokens": prefill_len, "ours_s": t_ours, "hf_sdpa_s": t_hf, "ours_over_hf": t_ours / t_hf}
    print(f"prefill {prefill_len}: ours {t_ours * 1e3:.0f} ms, HF sdpa {t_hf * 1e3:.0f} ms, ratio {t_ours / t_hf:.2f}")

    res["decode"] = {}
    for b in batches:
        prompts = random_prompts(b, 32, vocab, b)
        r_ours = ours_decode_rate(llm, prompts, gen)
        r_hf = hf_decode_rate(hf, prompts, gen, device)
        res["decode"][f"batch_{b}"] = {"ours_tok_s": r_ours, "hf_tok_s": r_hf, "prompt": 32, "generated": gen}
        print(f"decode batch {b}: ours {r_ours:.1f} tok/s, HF {r_hf:.1f} tok/s")
    llm.close()
    b = batches[-1]
    res["decode"][f"batch_{b}"]["phases"] = p = step_phases(ours, b, gen, 32, eager=True)
    print(f"decode batch {b} phases: {phases_line(p)}")
    return res


def bench_gpu_model(name: str, ours, hf, quick: bool, eager: bool, rounds: int) -> dict:
    """Decode at batch 64 measured `rounds` times, ours and HF alternating, so both see the same host state
    (HF's launch-bound rate moved 752-1014 tok/s between sessions); the claim is the median of the per-round ratios."""
    device = next(ours.model.parameters()).device
    vocab = int(ours.hf_config.vocab_size)
    batch, prompt_len, gen = (8, 64, 16) if quick else (64, 128, 128)
    prefill_len = min(1024 if quick else 8192, ours.max_position_embeddings - 16)  # SmolLM2 stops at 8192
    res: dict = {"model": name, "dtype": "bfloat16"}

    decode_len = prompt_len + gen + 16
    llm = make_llm(ours, decode_len, batch * decode_len, batch, max(8192, batch * prompt_len), eager)
    graphs = llm.engine.runner.graphs is not None
    prompts = random_prompts(batch, prompt_len, vocab, 1)
    # one discarded full-length run each: HF's first full generate is ~3.4x slower than later ones (a first-call
    # cost per attention shape, and the KV length changes every step), which a two-token warm-up does not cover
    ours_decode_rate(llm, prompts, gen)
    hf_decode_rate(hf, prompts, gen, device)
    per_round = []
    for i in range(rounds):
        r_ours = ours_decode_rate(llm, prompts, gen)
        r_hf = hf_decode_rate(hf, prompts, gen, device)
        per_round.append({"ours_tok_s": r_ours, "hf_tok_s": r_hf, "ratio": r_ours / r_hf})
        print(f"{name}: round {i + 1}/{rounds}: ours {r_ours:.0f} tok/s, HF {r_hf:.0f} tok/s, {r_ours / r_hf:.2f}x", flush=True)
    llm.close()
    phases = step_phases(ours, batch, min(gen, 64), prompt_len, eager)
    llm = make_llm(ours, prefill_len + 16, 2 * (prefill_len + 16), 1, prefill_len, eager=True)  # prefill needs no graphs
    prompt = random_prompts(1, prefill_len, vocab, 2)[0]
    t_ours = ours_prefill_seconds(llm, prompt, 3, device)
    llm.close()
    torch.cuda.empty_cache()
    t_hf = hf_prefill_seconds(hf, prompt, 3, device)
    r_ours = statistics.median(r["ours_tok_s"] for r in per_round)
    r_hf = statistics.median(r["hf_tok_s"] for r in per_round)
    ratio = statistics.median(r["ratio"] for r in per_round)
    res["decode"] = {"batch": batch, "prompt": prompt_len, "generated": gen, "rounds": per_round,
                     "ours_tok_s": r_ours, "hf_tok_s": r_hf, "speedup": ratio,
                     "speedup_min": min(r["ratio"] for r in per_round), "speedup_max": max(r["ratio"] for r in per_round),
                     "cuda_graphs": graphs, "ours_step_ms": 1e3 * batch / r_ours, "phases": phases}
    res["prefill"] = {"tokens": prefill_len, "ours_tok_s": prefill_len / t_ours, "hf_tok_s": prefill_len / t_hf,
                      "ours_s": t_ours, "hf_s": t_hf}
    print(f"{name}: decode batch {batch}, median of {rounds} alternating rounds: ours {r_ours:.0f} tok/s, HF {r_hf:.0f} tok/s, "
          f"ratio {ratio:.2f}x (rounds {res['decode']['speedup_min']:.2f}-{res['decode']['speedup_max']:.2f}x; graphs={graphs}); "
          f"prefill {prefill_len}: ours {prefill_len / t_ours:.0f} tok/s, HF {prefill_len / t_hf:.0f} tok/s")
    print(f"{name}: decode batch {batch} phases (timed run, a synchronize per phase): {phases_line(phases)}")
    return res


def bench_gpu(quick: bool, models: list[str], eager: bool, rounds: int) -> dict:
    device, dtype = torch.device("cuda"), torch.bfloat16
    out = {"gpu": torch.cuda.get_device_name(device)}
    for name in models:
        if name == "smollm2":
            ours, hf = load_smollm2(device, dtype)
        elif name == "smollm2-random":
            ours, hf = build_random_llama(device, dtype, SMOLLM2_SHAPE)
        elif name == "llama3-8b":
            shape = dict(LLAMA3_8B, num_hidden_layers=4) if quick else LLAMA3_8B
            ours, hf = build_random_llama(device, dtype, shape)
        else:
            raise ValueError(f"--models: unknown model {name!r}; choose from smollm2, smollm2-random, llama3-8b")
        out[name] = bench_gpu_model(name, ours, hf, quick, eager, rounds)
        del ours, hf
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="Small sizes: a smoke run that finishes in about a minute on CPU.")
    ap.add_argument("--models", default="smollm2,llama3-8b", help="GPU: comma-separated models (smollm2, smollm2-random, llama3-8b).")
    ap.add_argument("--rounds", type=int, default=5,
                    help="GPU: decode measured this many times, ours and HF alternating; the median ratio is reported.")
    ap.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs.")
    ap.add_argument("--no-fused-kernels", action="store_true",
                    help="GPU: the models' torch elementwise code instead of the fused Triton kernels (A/B).")
    ap.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/engine_<device>[_quick].json).")
    ns = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if ns.device == "auto" else ns.device
    import transformers

    from sparse_llm.models import layers

    if ns.no_fused_kernels:
        layers.FUSED_KERNELS = False

    report = {
        "command": " ".join(sys.argv),
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "quick": ns.quick,
        "fused_kernels": device == "cuda" and not ns.no_fused_kernels,
    }
    if device == "cpu":
        report["results"] = bench_cpu(ns.quick)
    else:
        import triton

        report["triton"] = triton.__version__
        report["results"] = bench_gpu(ns.quick, ns.models.split(","), ns.enforce_eager, ns.rounds)
    path = Path(ns.output) if ns.output else ROOT / "benchmarks" / "results" / f"engine_{device}{'_quick' if ns.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

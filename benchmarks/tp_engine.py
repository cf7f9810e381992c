"""Tensor parallelism on GPUs: a random-weight Llama-3-8B-shaped model at TP=1 and TP=2, through the engine.

Weights are generated on each rank's GPU from a fixed per-tensor seed as *full* tensors, then each rank keeps
its slice through the normal weight loaders, so TP=1 and TP=2 run the very same model. Measured:
  - identical greedy tokens, TP=2 vs TP=1: float32 (torch attention; exact up to summation order, so tokens must
    match) and bfloat16 (reported as the fraction of identical sequences: a random model's logits are nearly
    flat, and bf16 all-reduce rounding can flip near-ties);
  - decode tokens/s at batch 64 (bf16, 128-token prompts), first to last token of the batch;
  - prefill time of one 32K-token prompt (bf16, chunks of --batched-tokens).
Writes benchmarks/results/tp_engine.json.

    python benchmarks/tp_engine.py                 # needs 2 GPUs
    python benchmarks/tp_engine.py --enforce-eager # without CUDA graphs
    python benchmarks/tp_engine.py --quick         # smaller: 2 layers, shorter runs (a smoke test)
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse_llm.configs.llm_args import LlmArgs  # noqa: E402
from sparse_llm.engine.llm_engine import LLMEngine  # noqa: E402
from sparse_llm.engine.sampling_params import SamplingParams  # noqa: E402
from sparse_llm.llm import LLM  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from engine import LLAMA3_8B, CountingTokenizer, our_llama  # noqa: E402  (the engine benchmark's random 8B shape)

QUICK_LAYERS = 2
# A tiny shape for a CPU smoke run of the same code path (gloo, 2 processes).
TINY = dict(LLAMA3_8B, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300)
MODEL_NAMES = {"full": "random-llama3-8b-shape", "quick": "random-llama3-8b-shape-2-layers", "tiny": "random-tiny-llama"}


def hf_config(model_name: str):
    import transformers

    shapes = {"full": LLAMA3_8B, "quick": dict(LLAMA3_8B, num_hidden_layers=QUICK_LAYERS), "tiny": TINY}
    kind = {v: k for k, v in MODEL_NAMES.items()}[model_name]
    return transformers.LlamaConfig(**shapes[kind], architectures=["LlamaForCausalLM"])


def full_tensors(config, device: torch.device, dtype: torch.dtype):
    """(HF name, full tensor) of every weight, each from its own fixed seed: equal on every rank and TP size."""
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = [("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter))]
    for name, shape in shapes:
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        t = 1.0 + 0.1 * t if len(shape) == 1 else t * (1.0 / shape[1] ** 0.5)  # unit-variance activations
        yield name, t.to(dtype)


def random_llama(args: LlmArgs, device: torch.device):
    """launch_tensor_parallel loader (module level: picklable for the worker processes)."""
    from sparse_llm.models.loader import LoadedModel, resolve_dtype
    from sparse_llm.models.weights import load_weights

    config = hf_config(args.model)
    dtype = resolve_dtype(args.dtype, device)
    model = our_llama(config, device, dtype)
    load_weights(model, full_tensors(config, device, dtype), source=args.model)
    model.to(device).eval()
    layers = model.attention_layers()
    return LoadedModel(
        model=model, hf_config=config, tokenizer=CountingTokenizer(), checkpoint_meta=None, attention_layers=layers,
        layer_specs=[layer.spec for layer in layers], eos_token_ids=[], max_position_embeddings=config.max_position_embeddings,
        source=args.model,
    )


def make_llm(tp: int, dtype: str, backend: str, opts) -> LLM:
    args = LlmArgs(
        model=opts.model_name, device=opts.device, dtype=dtype, tensor_parallel_size=tp, attention_backend=backend,
        max_model_len=opts.max_model_len, max_num_seqs=opts.batch, max_num_batched_tokens=opts.batched_tokens,
        enforce_eager=opts.enforce_eager, kv_cache_config={"max_tokens": opts.kv_tokens, "enable_prefix_caching": False},
    )
    if tp == 1:
        device = torch.device("cuda", 0) if opts.device == "cuda" else torch.device("cpu")
        return LLM.from_engine(LLMEngine(args, random_llama(args, device)))
    from sparse_llm.distributed.launch import launch_tensor_parallel

    loaded, make_runner, workers = launch_tensor_parallel(args, loader=random_llama)
    try:
        return LLM.from_engine(LLMEngine(args, loaded, make_runner))
    except BaseException:
        workers.shutdown()
        raise


def release(llm: LLM) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def greedy(llm: LLM, ps, n: int) -> list[list[int]]:
    outs = llm.generate(ps, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def decode_rate(llm: LLM, ps, gen: int) -> float:
    greedy(llm, ps, 2)  # warm-up
    outs = llm.generate(ps, SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True), use_tqdm=False)
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.first_token_time + o.metrics.decode_time for o in outs)
    return len(ps) * (gen - 1) / (last - first)


def prefill_seconds(llm: LLM, prompt: list[int], repeats: int) -> float:
    once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], once, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate([prompt], once, use_tqdm=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, 4K prefill, 16 generated tokens")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny shape on CPU (gloo): the float32 token check only")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--check-prompts", type=int, default=8, help="prompts of the float32 token check")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tp_engine.json"))
    opts = ap.parse_args()
    opts.device = "cpu" if opts.smoke_cpu else "cuda"
    opts.model_name = MODEL_NAMES["tiny" if opts.smoke_cpu else "quick" if opts.quick else "full"]
    if not opts.smoke_cpu and torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 CUDA devices, torch sees {torch.cuda.device_count()}")
    prefill_len = 4096 if opts.quick else 32768
    gen = 16 if opts.quick or opts.smoke_cpu else 32
    opts.max_model_len = prefill_len + 64
    opts.batched_tokens = 8192
    opts.kv_tokens = max(prefill_len + 256, opts.batch * (128 + gen + 16))
    vocab = hf_config(opts.model_name).vocab_size
    check = prompts(opts.check_prompts, 128, vocab, seed=1)
    decode_prompts = prompts(opts.batch, 128, vocab, seed=2)
    long_prompt = prompts(1, prefill_len, vocab, seed=3)[0]

    if opts.smoke_cpu:
        opts.kv_tokens, opts.max_model_len = 4096, 1024
        smoke = {}
        for tp in (1, 2):
            llm = make_llm(tp, "float32", "torch", opts)
            smoke[tp] = greedy(llm, check, gen)
            release(llm)
        print(f"cpu smoke: float32 greedy tokens identical at TP=1 and TP=2: {smoke[1] == smoke[2]}")
        raise SystemExit(0 if smoke[1] == smoke[2] else 1)
    res: dict = {"model": opts.model_name, "gpu": torch.cuda.get_device_name(0),
                 "enforce_eager": opts.enforce_eager, "decode_batch": opts.batch, "decode_prompt_len": 128,
                 "generated": gen, "prefill_len": prefill_len, "max_num_batched_tokens": opts.batched_tokens}
    tokens: dict = {}
    for tp in (1, 2):  # float32 exactness check (torch attention: no bf16 kernels involved)
        llm = make_llm(tp, "float32", "torch", opts)
        tokens[("fp32", tp)] = greedy(llm, check, gen)
        release(llm)
        print(f"fp32 tp={tp} done", flush=True)
    for tp in (1, 2):
        llm = make_llm(tp, "bfloat16", "auto", opts)
        tokens[("bf16", tp)] = greedy(llm, decode_prompts, gen)
        rate = decode_rate(llm, decode_prompts, gen)
        pre = prefill_seconds(llm, long_prompt, repeats=2)
        res[f"tp{tp}"] = {"decode_tok_s_batch": round(rate, 1), "prefill_s": round(pre, 3),
                          "prefill_tok_s": round(prefill_len / pre, 1), "kv_blocks": llm.engine.stats().kv_blocks_total}
        print(f"bf16 tp={tp}: {res[f'tp{tp}']}", flush=True)
        release(llm)
    res["fp32_tokens_identical"] = tokens[("fp32", 1)] == tokens[("fp32", 2)]
    same = [a == b for a, b in zip(tokens[("bf16", 1)], tokens[("bf16", 2)])]
    res["bf16_identical_sequences"] = f"{sum(same)}/{len(same)}"
    res["decode_speedup_tp2"] = round(res["tp2"]["decode_tok_s_batch"] / res["tp1"]["decode_tok_s_batch"], 2)
    res["prefill_speedup_tp2"] = round(res["tp1"]["prefill_s"] / res["tp2"]["prefill_s"], 2)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    if not res["fp32_tokens_identical"]:
        raise SystemExit("float32 greedy tokens differ between TP=1 and TP=2")


if __name__ == "__main__":
    main()

"""CLI flags shared by generate / serve / bench / eval / calibrate, turned into one LlmArgs.

Precedence: defaults < --config YAML < explicit flags < --set a.b=value.
"""
from __future__ import annotations

import argparse

from sparse_llm.configs.llm_args import LlmArgs

# flag -> LlmArgs path; only flags the user actually gives (not None) take part in the merge.
FLAG_PATHS = {
    "model": "model",
    "tokenizer": "tokenizer",
    "dtype": "dtype",
    "device": "device",
    "max_model_len": "max_model_len",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "seed": "seed",
    "enforce_eager": "enforce_eager",
    "tensor_parallel_size": "tensor_parallel_size",
    "attention_backend": "attention_backend",
    "block_size": "kv_cache_config.block_size",
    "kv_max_tokens": "kv_cache_config.max_tokens",
}


def add_llm_args(parser: argparse.ArgumentParser, model_flag: bool = True) -> None:
    """Adds --config, --set and the common engine flags (all default to None = not given)."""
    g = parser.add_argument_group("engine options (LlmArgs; see `sparse-llm schema`)")
    if model_flag:
        g.add_argument("--model", default=None, help="HF directory or .gguf file (default: the bundled SmolLM2-135M-Instruct).")
    g.add_argument("--config", default=None, help="YAML file of LlmArgs options (TensorRT-LLM option files work too).")
    g.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="Override one option, e.g. --set sparse_attention_config.target_sparsity=0.5 (repeatable; highest precedence).")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--enforce-eager", action="store_true", default=None)
    g.add_argument("--tensor-parallel-size", type=int, default=None)
    g.add_argument("--attention-backend", default=None, choices=["auto", "torch", "triton", "flashinfer"])
    g.add_argument("--block-size", type=int, default=None, help="KV block size in tokens.")
    g.add_argument("--kv-max-tokens", type=int, default=None, help="KV cache size cap in tokens.")


def llm_args_from_namespace(ns: argparse.Namespace, **extra_flags) -> LlmArgs:
    flags = {path: getattr(ns, dest) for dest, path in FLAG_PATHS.items() if getattr(ns, dest, None) is not None}
    flags.update({k: v for k, v in extra_flags.items() if v is not None})
    return LlmArgs.from_sources(yaml_path=ns.config, flags=flags, sets=ns.set)

"""`sparse-llm generate "prompt"`: print the model's continuation (or chat reply) of one prompt.

The text goes to stdout; when a sparse algorithm ran, the achieved sparsity per phase goes to stderr.
"""
from __future__ import annotations

import argparse
import sys

from sparse_llm.commands.common import add_llm_args, llm_args_from_namespace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="The prompt text (with --chat: the user message).")
    parser.add_argument("--max-tokens", type=int, default=128, help="Most tokens to generate (default: 128).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (default: 1.0 = off).")
    parser.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely tokens (default: 0 = off).")
    parser.add_argument("--sampling-seed", type=int, default=None, help="Seed of this request's sampling.")
    parser.add_argument("--chat", action="store_true", help="Wrap the prompt as a user message in the chat template.")
    parser.add_argument("--system", default=None, help="With --chat: a system message.")
    add_llm_args(parser)


def main(ns: argparse.Namespace) -> int:
    from sparse_llm.engine.sampling_params import SamplingParams
    from sparse_llm.llm import LLM

    if ns.system and not ns.chat:
        raise ValueError("--system needs --chat")
    params = SamplingParams(
        max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, seed=ns.sampling_seed
    )
    llm = LLM.from_args(llm_args_from_namespace(ns))  # bad options fail here, before the model loads
    if ns.chat:
        messages = ([{"role": "system", "content": ns.system}] if ns.system else []) + [{"role": "user", "content": ns.prompt}]
        out = llm.chat(messages, params, use_tqdm=False)[0]
    else:
        out = llm.generate(ns.prompt, params, use_tqdm=False)[0]
    print(out.text)
    sparsity = {phase: s for phase, s in out.metrics.sparsity.items() if s is not None}
    if sparsity:
        parts = ", ".join(f"{phase} {s:.1%}" for phase, s in sparsity.items())
        print(f"achieved sparsity: {parts}", file=sys.stderr)
    return 0

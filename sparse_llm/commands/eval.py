"""`sparse-llm eval TASK` and `sparse-llm eval sweep`: offline long-context accuracy (RULER-style tasks).

`--seed` (shared with the engine options) also seeds the samples: the same seed gives the same inputs.
"""
from __future__ import annotations

import argparse
import json

from sparse_llm.commands.common import add_llm_args, llm_args_from_namespace
from sparse_llm.eval.tasks import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    lines = "\n".join(f"  {name}: {cls.description}" for name, cls in TASKS.items())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = f"tasks:\n{lines}\n  sweep: every --tasks on every --configs, an accuracy-vs-sparsity table and PNG"
    parser.add_argument("task", choices=[*TASKS, "sweep"], metavar="TASK", help=f"One of {', '.join(TASKS)}, or sweep.")
    parser.add_argument("--max-input-length", type=int, default=4096,
                        help="Input length in tokens (chat template included); inputs land at 90-100%% of it (default 4096).")
    parser.add_argument("--num-samples", type=int, default=20, help="Samples per task (default 20).")
    parser.add_argument("--max-tokens", type=int, default=None, help="Answer budget (default: the task's own).")
    parser.add_argument("--output-dir", default=None,
                        help="Where predictions.jsonl and summary.json go (default out/eval/TASK, or out/eval/sweep).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--configs", nargs="+", default=None, metavar="YAML", help="Config files to compare (sweep only).")
    sweep.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS), metavar="TASK", help="Tasks to run (sweep only).")
    add_llm_args(parser)


def main(ns: argparse.Namespace, make_llm=None) -> int:
    """`make_llm(LlmArgs)` defaults to LLM.from_args (tests pass one that reuses an already loaded model)."""
    from sparse_llm.eval.runner import evaluate
    from sparse_llm.eval.sweep import run_sweep, table
    from sparse_llm.llm import LLM

    make_llm = make_llm or LLM.from_args
    seed = 0 if ns.seed is None else ns.seed
    progress = not ns.no_progress
    if ns.task == "sweep":
        if not ns.configs or not ns.tasks:
            raise ValueError("eval sweep needs --configs A.yaml [B.yaml ...] and --tasks TASK [TASK ...]")
        if ns.config is not None:
            raise ValueError("eval sweep takes its configs from --configs; leave --config out")

        def llm_for(cfg):
            ns.config = cfg
            return make_llm(llm_args_from_namespace(ns))

        rows = run_sweep(llm_for, ns.configs, ns.tasks, ns.max_input_length, ns.num_samples, seed,
                         ns.output_dir or "out/eval/sweep", progress, ns.max_tokens)
        print(table(rows))
        print(f"wrote {ns.output_dir or 'out/eval/sweep'}/sweep.json and sweep.png")
        return 0
    if ns.configs or ns.tasks:
        raise ValueError("--configs and --tasks belong to `eval sweep`; for one task use --config")
    llm = make_llm(llm_args_from_namespace(ns))
    out_dir = ns.output_dir or f"out/eval/{ns.task}"
    try:
        summary = evaluate(llm, ns.task, ns.max_input_length, ns.num_samples, seed, out_dir, ns.max_tokens, progress)
    finally:
        llm.close()
    print(json.dumps({k: summary[k] for k in ("task", "metric", "accuracy", "num_samples", "input_tokens", "sparsity",
                                               "generate_seconds")}, indent=2))
    print(f"wrote {out_dir}/predictions.jsonl and summary.json")
    return 0

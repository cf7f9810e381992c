"""`sparse-llm bench {throughput, latency, serve}`: offline engine benchmarks and a serving load test.

throughput / latency load the model in this process; `--compare a.yaml b.yaml ...` runs each config in
turn on the same requests and prints ratios to the first. serve drives any OpenAI-compatible server.
`--seed` (shared with the engine options) also seeds the dataset.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math

from sparse_llm.bench.datasets import DATASETS
from sparse_llm.commands.common import add_llm_args, llm_args_from_namespace
from sparse_llm.eval.tasks import TASKS

DEFAULT_INPUT_LEN = 1024
DEFAULT_OUTPUT_LEN = 128


def _dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="random", choices=[d for d in DATASETS if d != "eval"] + list(TASKS),
                   help="random (fixed lengths), token-norm-dist, jsonl (--dataset-path), or an eval task's prompts "
                        "(scored: accuracy is reported). Default: random.")
    g.add_argument("--dataset-path", default=None, help="JSONL file: {\"prompt\": ...} or {\"prompt_token_ids\": [...]} per line.")
    g.add_argument("--num-requests", type=int, default=64, help="Requests (default 64).")
    g.add_argument("--input-len", type=int, default=DEFAULT_INPUT_LEN,
                   help=f"Prompt tokens (mean for token-norm-dist; max input length for eval tasks). Default {DEFAULT_INPUT_LEN}.")
    g.add_argument("--output-len", type=int, default=None,
                   help=f"Output tokens (mean for token-norm-dist). Default {DEFAULT_OUTPUT_LEN}; an eval task's own budget.")
    g.add_argument("--input-len-std", type=float, default=0.0, help="token-norm-dist: std of the prompt length.")
    g.add_argument("--output-len-std", type=float, default=0.0, help="token-norm-dist: std of the output length.")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="Stop at EOS (default: ignore it, so every request produces exactly its output length).")
    g.add_argument("--output-json", default=None, help="Write the results (and the settings) to this JSON file.")
    g.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, text in (("throughput", "Offline: every request at once; requests/s and tokens/s."),
                       ("latency", "Offline, batch 1: TTFT, TPOT and E2E latency per request.")):
        p = sub.add_parser(mode, help=text, description=text)
        _dataset_args(p)
        p.add_argument("--compare", nargs="+", default=None, metavar="YAML",
                       help="Run each config file in turn (instead of --config) and print ratios to the first.")
        if mode == "latency":
            p.add_argument("--warmup", type=int, default=1, help="Requests run before timing (default 1).")
        add_llm_args(p)
    text = "Load-test an OpenAI-compatible server with streaming completions (vLLM's metric definitions)."
    p = sub.add_parser("serve", help=text, description=text)
    _dataset_args(p)
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="Model name sent in requests (default: none, the server's default).")
    p.add_argument("--tokenizer", default=None, help="Tokenizer for the dataset (default: the bundled SmolLM2's).")
    p.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight (default: no limit).")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrival rate per second (default inf).")
    p.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request, e.g. "
                   "'{\"sparse_attention\": {\"target_sparsity\": 0.5}}'.")
    p.add_argument("--seed", type=int, default=0, help="Seeds the dataset and the arrival times (default 0).")


def check_dataset_args(ns: argparse.Namespace) -> None:
    """Errors a user can see before any model or tokenizer is loaded."""
    if ns.dataset_path is not None and ns.dataset != "jsonl":
        raise ValueError("--dataset-path needs --dataset jsonl")
    if ns.dataset == "jsonl" and ns.dataset_path is None:
        raise ValueError("--dataset jsonl needs --dataset-path FILE")
    if ns.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {ns.num_requests}")


def build_requests(ns: argparse.Namespace, tokenizer):
    from sparse_llm.bench import datasets

    seed = 0 if ns.seed is None else ns.seed
    if ns.dataset in TASKS:
        return datasets.eval_requests(ns.dataset, tokenizer, ns.num_requests, ns.input_len, seed, ns.output_len)
    out_len = ns.output_len or DEFAULT_OUTPUT_LEN
    if ns.dataset == "random":
        return datasets.random_requests(tokenizer, ns.num_requests, ns.input_len, out_len, seed)
    if ns.dataset == "token-norm-dist":
        return datasets.token_norm_dist_requests(tokenizer, ns.num_requests, ns.input_len, ns.input_len_std, out_len,
                                                 ns.output_len_std, seed)
    return datasets.jsonl_requests(ns.dataset_path, tokenizer, ns.num_requests, out_len)


def _settings(ns: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(ns).items() if not k.startswith("_") and k not in ("api_key",)
            and isinstance(v, (str, int, float, bool, list, type(None)))}


def run_offline(ns: argparse.Namespace, make_llm=None) -> dict[str, dict]:
    """throughput / latency for --config or each --compare config; `make_llm(LlmArgs)` defaults to
    LLM.from_args (tests pass one that reuses an already loaded model)."""
    from sparse_llm.bench import offline
    from sparse_llm.eval.tasks import get_task
    from sparse_llm.llm import LLM

    check_dataset_args(ns)
    if ns.compare and ns.config is not None:
        raise ValueError("--compare replaces --config; give the configs to --compare only")
    make_llm = make_llm or LLM.from_args
    configs = ns.compare or [ns.config]
    results: dict[str, dict] = {}
    requests = None
    for cfg in configs:
        ns.config = cfg
        llm = make_llm(llm_args_from_namespace(ns))
        try:
            if requests is None:  # the same requests for every config
                requests = build_requests(ns, llm.tokenizer)
            progress, scored = not ns.no_progress, ns.dataset in TASKS
            if ns.mode == "throughput":
                r = offline.throughput(llm, requests, ns.ignore_eos and not scored, progress, greedy=scored)
                texts = r.pop("texts")
                if scored:
                    task = get_task(ns.dataset, ns.input_len)
                    r["accuracy"] = sum(task.score(t, q.answers) for t, q in zip(texts, requests)) / len(requests)
            else:
                r = offline.latency(llm, requests, ns.warmup, ns.ignore_eos, progress)
        finally:
            llm.close()
        name = "defaults" if cfg is None else cfg
        results[name if name not in results else f"{name}#{len(results)}"] = r
    return results


def main(ns: argparse.Namespace, make_llm=None) -> int:
    from sparse_llm.bench import report

    if ns.mode == "serve":
        results = {ns.base_url: run_serve(ns)}
    else:
        results = run_offline(ns, make_llm)
    print(report.table(ns.mode, results))
    if ns.output_json:
        report.write_json(ns.output_json, {"mode": ns.mode, "settings": _settings(ns), "results": results})
        print(f"wrote {ns.output_json}")
    failed = [name for name, r in results.items() if r.get("failed")]
    if failed:
        first = results[failed[0]]
        print(f"{first['failed']} request(s) failed, e.g.: {first['errors'][:1]}")
        return 1
    return 0


def run_serve(ns: argparse.Namespace) -> dict:
    from sparse_llm.bench import serve_client
    from sparse_llm.eval.tasks import get_task
    from sparse_llm.models.loader import default_model_path, open_source_tokenizer

    check_dataset_args(ns)
    extra = None
    if ns.extra_body is not None:
        try:
            extra = json.loads(ns.extra_body)
        except json.JSONDecodeError as e:
            raise ValueError(f"--extra-body is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--extra-body must be a JSON object, got {type(extra).__name__}")
    tokenizer = open_source_tokenizer(ns.tokenizer or default_model_path())
    requests = build_requests(ns, tokenizer)
    scorer = get_task(ns.dataset, ns.input_len).score if ns.dataset in TASKS else None
    return asyncio.run(serve_client.run(
        ns.base_url, ns.model, requests, ns.max_concurrency, ns.request_rate, ns.api_key,
        ignore_eos=ns.ignore_eos and scorer is None, extra_body={**({"temperature": 0} if scorer else {}), **(extra or {})},
        seed=ns.seed, progress=not ns.no_progress,
        scorer=scorer,
    ))

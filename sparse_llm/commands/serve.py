"""`sparse-llm serve [MODEL]`: the OpenAI-compatible HTTP server (see docs/serving.md)."""
from __future__ import annotations

import argparse
import os

from sparse_llm.commands.common import add_llm_args, llm_args_from_namespace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                        help="HF directory or .gguf file (same as --model; default: the bundled SmolLM2-135M-Instruct).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="Name(s) clients use in `model` (default: the model path); the first one is reported.")
    parser.add_argument("--api-key", default=os.environ.get("SPARSE_LLM_API_KEY"),
                        help="Require 'Authorization: Bearer KEY' on /v1 routes (default: $SPARSE_LLM_API_KEY; none = open).")
    parser.add_argument("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_llm_args(parser)


def main(ns: argparse.Namespace) -> int:
    from sparse_llm.serve.server import serve_forever

    if ns.model_path is not None and ns.model is not None and ns.model_path != ns.model:
        raise ValueError(f"MODEL {ns.model_path!r} and --model {ns.model!r} differ; give one of them")
    if not 0 < ns.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {ns.port}")
    if ns.api_key is not None and not ns.api_key.strip():
        raise ValueError("--api-key must not be empty")
    args = llm_args_from_namespace(ns, model=ns.model_path)
    serve_forever(args, ns.host, ns.port, ns.served_model_name, ns.api_key, ns.uvicorn_log_level)
    return 0

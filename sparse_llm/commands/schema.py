"""`sparse-llm schema`: the JSON schema of LlmArgs, so editors can validate `--config` YAML files."""
from __future__ import annotations

import argparse
import json

from sparse_llm.configs.llm_args import LlmArgs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2).")


def main(ns: argparse.Namespace) -> int:
    print(json.dumps(LlmArgs.model_json_schema(), indent=ns.indent))
    return 0

"""`sparse-llm {generate, serve, bench, eval, calibrate, schema}`: each subcommand lives in sparse_llm/commands/."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "generate": ("sparse_llm.commands.generate", "Generate text for a prompt (the bundled model by default)."),
    "serve": ("sparse_llm.commands.serve", "Run an OpenAI-compatible HTTP server."),
    "bench": ("sparse_llm.commands.bench", "Throughput, latency and serving benchmarks."),
    "eval": ("sparse_llm.commands.eval", "Offline long-context accuracy tasks (RULER-style)."),
    "calibrate": ("sparse_llm.commands.calibrate", "Calibrate skip-softmax thresholds and export a checkpoint."),
    "schema": ("sparse_llm.commands.schema", "Print the JSON schema of the options (LlmArgs) for editor validation."),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-llm", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default: WARNING).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (the engine is heavy; schema is not).
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(ns.log_level).upper(), logging.WARNING), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(ns._main(ns) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"sparse-llm {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

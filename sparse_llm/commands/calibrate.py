"""`sparse-llm calibrate`: fit skip-softmax thresholds on local RULER-style data and export a checkpoint."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from sparse_llm.commands.common import add_llm_args, llm_args_from_namespace

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_llm_args(parser)
    parser.add_argument("--target-sparsity", type=float, default=0.5,
                        help="Target recorded in the exported checkpoint (the default users get), in [0, 1].")
    parser.add_argument("--phases", default="prefill,decode", help="Comma-separated phases to calibrate.")
    parser.add_argument("--max-seqlen", type=int, default=8192, help="Longest calibration prompt; bins halve down to --min-seqlen.")
    parser.add_argument("--min-seqlen", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=64, help="Calibration prompts, split exactly over the length bins.")
    parser.add_argument("--heldout-per-bin", type=int, default=2, help="Held-out prompts per bin for the achieved-vs-target table.")
    parser.add_argument("--decode-steps", type=int, default=16, help="Decode steps recorded after each prefill.")
    parser.add_argument("--sparsity-range", default="0.1,0.9", help="Points with sparsity in this range enter the fit.")
    parser.add_argument("--copy-weights", action="store_true", help="Copy safetensors instead of symlinking them.")
    parser.add_argument("--output-dir", required=True, help="Where the calibrated checkpoint is written.")
    parser.add_argument("--sidecar", default=None,
                        help="Also write a sidecar JSON (file SHA-256 + block) for a GGUF model, as shipped in sparse_llm/data/calibration.")


def _parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--sparsity-range {text!r}: expected two numbers like 0.1,0.9") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"--sparsity-range {text!r}: need 0 <= low < high <= 1")
    return lo, hi


def main(ns: argparse.Namespace) -> int:
    from sparse_llm.calibration.export import export_checkpoint, sparse_block
    from sparse_llm.calibration.fit import achieved_table, fit_phase
    from sparse_llm.calibration.plot import plot_fits
    from sparse_llm.calibration.run import collect_gaps
    from sparse_llm.calibration.samples import calibration_samples, heldout_samples
    from sparse_llm.llm import LLM

    if not 0.0 <= ns.target_sparsity <= 1.0:
        raise ValueError(f"--target-sparsity must be in [0, 1], got {ns.target_sparsity}")
    phases = tuple(p.strip() for p in ns.phases.split(",") if p.strip())
    bad = sorted(set(phases) - {"prefill", "decode"})
    if bad or not phases:
        raise ValueError(f"--phases {ns.phases!r}: allowed values are prefill and decode, got {bad or 'nothing'}")
    s_lo, s_hi = _parse_range(ns.sparsity_range)
    args = llm_args_from_namespace(ns)
    if args.sparse_attention_config is not None:
        raise ValueError("calibrate runs dense attention to measure it; remove sparse_attention_config from the options")
    if args.max_model_len is None or args.max_model_len < ns.max_seqlen:
        args = args.model_copy(update={"max_model_len": ns.max_seqlen})
    reserve = ns.decode_steps + 1 if "decode" in phases else 1  # prompts leave room for the recorded decode steps
    t0 = time.time()
    llm = LLM.from_args(args)
    tok = llm.tokenizer
    samples = calibration_samples(tok, ns.max_seqlen, ns.samples, ns.min_seqlen, seed=args.seed, reserve=reserve)
    collector = collect_gaps(llm, samples, phases, ns.decode_steps)
    fits = {p: fit_phase(collector, p, s_lo, s_hi) for p in phases}
    held = collect_gaps(llm, heldout_samples(tok, ns.max_seqlen, ns.heldout_per_bin, ns.min_seqlen, seed=args.seed, reserve=reserve),
                        phases, ns.decode_steps)
    table = achieved_table(held, fits)
    arch = (getattr(llm.engine.hf_config, "architectures", None) or ["Attention"])[0].replace("ForCausalLM", "Attention")
    block = sparse_block(fits, {p: ns.target_sparsity for p in phases}, [], collector.geometry, [arch])
    config_path = export_checkpoint(args.model, ns.output_dir, block, copy_weights=ns.copy_weights)
    if ns.sidecar:
        from sparse_llm.calibration.bundled import sidecar_record
        from sparse_llm.models.loader import default_model_path

        Path(ns.sidecar).write_text(json.dumps(sidecar_record(args.model or default_model_path(), block), indent=2))
    png = plot_fits(fits, Path(ns.output_dir) / "calibration.png")
    report = {
        "model": args.model or "bundled SmolLM2-135M-Instruct",
        "fits": {p: {"a": f.a, "b": f.b, "r2": f.r2, "sparsity_range": [f.s_min, f.s_max]} for p, f in fits.items()},
        "heldout": table,
        "samples": {str(k): len(v) for k, v in samples.items()},
        "seconds": round(time.time() - t0, 1),
    }
    (Path(ns.output_dir) / "calibration_report.json").write_text(json.dumps(report, indent=2))
    for p, f in fits.items():
        print(f"{p}: threshold_scale_factor = {f.a:.6g} * exp({f.b:.6g} * target_sparsity)   R^2 = {f.r2:.4f}")
    print("held-out achieved sparsity (phase, target, length -> achieved):")
    for row in table:
        ach = "n/a" if row["achieved"] is None else f"{row['achieved']:.3f}"
        print(f"  {row['phase']:7s} {row['target']:.2f} {row['length']:6d} -> {ach}")
    print(f"wrote {config_path} and {png}")
    return 0

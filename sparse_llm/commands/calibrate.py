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
    parser.add_argument("--lengths", default=None,
                        help="Comma-separated calibration prompt lengths (e.g. 1024,2048,...,8192) instead of halving bins; "
                             "spread them evenly over the lengths users send: the fit targets their mean.")
    parser.add_argument("--heldout-lengths", default=None,
                        help="Comma-separated held-out lengths for the achieved-vs-target table (default: 3/4 of each bin).")
    parser.add_argument("--samples", type=int, default=64, help="Calibration prompts, split exactly over the length bins.")
    parser.add_argument("--heldout-per-bin", type=int, default=2, help="Held-out prompts per bin for the achieved-vs-target table.")
    parser.add_argument("--decode-steps", type=int, default=16, help="Decode steps recorded after each prefill.")
    parser.add_argument("--sparsity-range", default="0.2,0.8",
                        help="The mean sparsity curve is fitted over this range (targets outside it are extrapolated).")
    parser.add_argument("--save-gaps", default=None,
                        help="Also save the recorded gap histograms here (torch.save), to merge runs with --load-gaps.")
    parser.add_argument("--load-gaps", default=None,
                        help="Comma-separated --save-gaps files merged into this calibration's histograms; with "
                             "--samples 0 nothing new is recorded (a calibration collected in pieces, e.g. in parallel).")
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
    import torch

    from sparse_llm.calibration.collect import GapCollector
    from sparse_llm.calibration.export import export_checkpoint, sparse_block
    from sparse_llm.calibration.fit import achieved_table, fit_phase
    from sparse_llm.calibration.plot import plot_fits
    from sparse_llm.calibration.run import collect_gaps
    from sparse_llm.calibration.samples import calibration_samples, heldout_samples, parse_lengths
    from sparse_llm.llm import LLM

    if not 0.0 <= ns.target_sparsity <= 1.0:
        raise ValueError(f"--target-sparsity must be in [0, 1], got {ns.target_sparsity}")
    phases = tuple(p.strip() for p in ns.phases.split(",") if p.strip())
    bad = sorted(set(phases) - {"prefill", "decode"})
    if bad or not phases:
        raise ValueError(f"--phases {ns.phases!r}: allowed values are prefill and decode, got {bad or 'nothing'}")
    s_lo, s_hi = _parse_range(ns.sparsity_range)
    lengths = parse_lengths(ns.lengths, "--lengths") if ns.lengths else None
    held_lengths = parse_lengths(ns.heldout_lengths, "--heldout-lengths") if ns.heldout_lengths else None
    longest = max([ns.max_seqlen, *(lengths or []), *(held_lengths or [])])
    args = llm_args_from_namespace(ns)
    if args.sparse_attention_config is not None:
        raise ValueError("calibrate runs dense attention to measure it; remove sparse_attention_config from the options")
    if args.max_model_len is None or args.max_model_len < longest:
        args = args.model_copy(update={"max_model_len": longest})
    if ns.samples == 0 and not ns.load_gaps:
        raise ValueError("--samples 0 records nothing: give --load-gaps files to fit from")
    reserve = ns.decode_steps + 1 if "decode" in phases else 1  # prompts leave room for the recorded decode steps
    t0 = time.time()
    llm = LLM.from_args(args)
    tok = llm.tokenizer
    if ns.samples:
        samples = calibration_samples(tok, ns.max_seqlen, ns.samples, ns.min_seqlen, seed=args.seed, reserve=reserve,
                                      lengths=lengths)
        collector = collect_gaps(llm, samples, phases, ns.decode_steps)
    else:
        samples, collector = {}, GapCollector()
    for path in (ns.load_gaps or "").split(","):
        if path.strip():
            collector.merge_state(torch.load(path.strip()), source=path.strip())
    if ns.save_gaps:
        torch.save(collector.state(), ns.save_gaps)
    fits = {p: fit_phase(collector, p, s_lo, s_hi) for p in phases}
    held = collect_gaps(llm, heldout_samples(tok, ns.max_seqlen, ns.heldout_per_bin, ns.min_seqlen, seed=args.seed,
                                             reserve=reserve, lengths=held_lengths),
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
        "fits": {p: {"a": f.a, "b": f.b, "r2": f.r2, "sparsity_range": [f.s_min, f.s_max], "pinned_at_cap": f.capped}
                 for p, f in fits.items()},
        "heldout": table,
        "samples": {f"{ph} {lb}": n for (ph, lb), n in sorted(collector.samples.items())},
        "seconds": round(time.time() - t0, 1),
    }
    (Path(ns.output_dir) / "calibration_report.json").write_text(json.dumps(report, indent=2))
    for p, f in fits.items():
        print(f"{p}: threshold_scale_factor = {f.a:.6g} * exp({f.b:.6g} * target_sparsity)   R^2 = {f.r2:.4f}")
    print("held-out achieved sparsity (phase, target, length -> achieved):")
    for row in table:
        ach = "n/a" if row["achieved"] is None else f"{row['achieved']:.3f}"
        print(f"  {row['phase']:7s} {row['target']:.2f} {row['length']!s:>6} -> {ach}")
    print(f"wrote {config_path} and {png}")
    return 0

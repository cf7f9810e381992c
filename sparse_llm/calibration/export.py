"""Write the calibrated block into a checkpoint's config.json (ModelOpt / TensorRT-LLM layout)."""
from __future__ import annotations

import json
from pathlib import Path

from sparse_llm import __version__
from sparse_llm.calibration.fit import FORMULA, PhaseFit
from sparse_llm.calibration.gaps import TileGeometry


def sparse_block(fits: dict[str, PhaseFit], targets: dict[str, float], ignore: list[str], geometry: TileGeometry,
                 module_targets: list[str]) -> dict:
    """The `sparse_attention_config` block; parsed back by configs.checkpoint.parse_checkpoint_meta."""
    return {
        "config_groups": {
            "group_0": {
                "algorithm": "skip_softmax",
                "targets": module_targets,
                "threshold_scale_factor": {
                    "formula": FORMULA,
                    **{phase: {"a": fit.a, "b": fit.b} for phase, fit in fits.items()},
                },
                "target_sparsity": dict(targets),
                "ignore": list(ignore),
            }
        },
        "producer": {"name": "sparse-llm", "version": __version__},
        "sparse_llm_tile_geometry": {
            "prefill_block_m": geometry.block_m,
            "prefill_block_n": geometry.block_n,
            "decode_block_n": geometry.decode_block_n,
        },
        "calibration_fit": {phase: {"r2": fit.r2, "sparsity_range": [fit.s_min, fit.s_max]} for phase, fit in fits.items()},
    }


def write_config(output_dir: str | Path, base_config: dict, block: dict) -> Path:
    path = Path(output_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**base_config, "sparse_attention_config": block}, indent=2, sort_keys=False))
    return path

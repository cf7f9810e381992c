"""Write the calibrated block into a checkpoint's config.json (ModelOpt / TensorRT-LLM layout)."""
from __future__ import annotations

import json
from pathlib import Path

from sparse_llm import __version__
from sparse_llm.calibration.fit import FORMULA, PhaseFit
from sparse_llm.calibration.gaps import TileGeometry
from sparse_llm.kernels.geometry import DECODE_MIN_SPLIT_TILES_SKIP, PREFILL_ORDER


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
            # the skip build's KV tile order (kernels/geometry.py); configs/checkpoint.py refuses another one
            "prefill_order": PREFILL_ORDER,
            "decode_block_n": geometry.decode_block_n,
            # decode splits start from tile 0's row max; factors calibrated without seeds mean something else
            "decode_splits": "sink_seeded",
            "decode_min_split_tiles": DECODE_MIN_SPLIT_TILES_SKIP,
        },
        "calibration_fit": {
            phase: {"r2": fit.r2, "sparsity_range": [fit.s_min, fit.s_max], "pinned_at_cap": fit.capped}
            for phase, fit in fits.items()
        },
    }


def write_config(output_dir: str | Path, base_config: dict, block: dict) -> Path:
    path = Path(output_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**base_config, "sparse_attention_config": block}, indent=2, sort_keys=False))
    return path


def export_checkpoint(model_path: str | None, output_dir: str | Path, block: dict, copy_weights: bool = False) -> Path:
    """An HF-style directory carrying the calibrated block: config.json, weights (linked or copied), tokenizer.

    HF directories keep their safetensors files (symlinked unless copy_weights); GGUF files are dequantised
    once and written as model.safetensors with HF parameter names, so any HF-format reader can load them.
    """
    import os
    import shutil

    from safetensors.torch import save_file

    from sparse_llm.models.loader import default_model_path, open_source

    source = open_source(default_model_path() if model_path is None else model_path)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(source.path)
    if src.is_dir():
        for f in src.iterdir():
            if f.name == "config.json" or not f.is_file():
                continue
            target = out / f.name
            if target.exists() or target.is_symlink():
                target.unlink()
            if f.suffix == ".safetensors" and not copy_weights:
                os.symlink(f.resolve(), target)
            else:
                shutil.copy2(f, target)
        base = json.loads((src / "config.json").read_text())
    else:
        tensors = {name: t.contiguous() for name, t in source.weights()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": src.name})
        source.load_tokenizer().save_pretrained(str(out))
        base = source.hf_config.to_dict()
        if source.eos_token_ids:
            (out / "generation_config.json").write_text(json.dumps({"eos_token_id": source.eos_token_ids}))
    base.pop("sparse_attention_config", None)
    return write_config(out, base, block)

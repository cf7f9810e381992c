"""Calibration shipped with the package for known checkpoints (the bundled SmolLM2 GGUF).

A GGUF has no config.json to carry `sparse_attention_config`, so calibrated coefficients live in a sidecar
under sparse_llm/data/calibration/, keyed by the file's SHA-256: a different file never picks them up.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

SIDECAR_DIR = Path(__file__).resolve().parent.parent / "data" / "calibration"


@functools.lru_cache(maxsize=8)
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecars() -> dict[str, Path]:
    """sha256 -> sidecar file, for every shipped sidecar."""
    out = {}
    for p in sorted(SIDECAR_DIR.glob("*.json")):
        out[json.loads(p.read_text())["sha256"]] = p
    return out


def bundled_checkpoint_meta(model_path: str) -> dict | None:
    """The shipped `sparse_attention_config` block for this exact file, or None."""
    p = Path(model_path)
    if not p.is_file() or p.suffix != ".gguf":
        return None
    known = sidecars()
    if not known:
        return None
    sidecar = known.get(file_sha256(str(p)))
    return None if sidecar is None else json.loads(sidecar.read_text())["sparse_attention_config"]


def sidecar_record(model_path: str, block: dict) -> dict:
    """What a sidecar file holds: the model file's name and SHA-256, and the calibrated block."""
    return {"model_file": Path(model_path).name, "sha256": file_sha256(model_path), "sparse_attention_config": block}

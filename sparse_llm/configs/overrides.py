"""Per-request sparsity overrides (the server's `sparse_attention` request field), resolved to per-phase factors.

An override stays within the algorithm the server was started with; it can only retune that algorithm's
knob for one request. Phases it does not name keep the layer's own value (None here, NaN in the metadata).
"""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from sparse_llm.configs.checkpoint import PHASES, CheckpointSparseMeta, parse_checkpoint_meta
from sparse_llm.configs.resolve import skip_softmax_factor
from sparse_llm.configs.sparse import ALGORITHM_ALIASES, SkipSoftmaxAttentionConfig, parse_sparse_config

OVERRIDABLE = {"skip_softmax": ("threshold_scale_factor", "target_sparsity")}


def resolve_request_override(
    server_cfg: Any, checkpoint_meta: CheckpointSparseMeta | dict | None, override: Any
) -> dict[str, float | None]:
    """{"prefill": factor | None, "decode": factor | None}, or ValueError saying what is wrong."""
    if override is None:
        return {p: None for p in PHASES}
    if not isinstance(override, dict):
        raise ValueError(f"sparse_attention must be an object, got {type(override).__name__}")
    cfg = parse_sparse_config(server_cfg)
    if cfg is None:
        raise ValueError("sparse_attention: this server runs dense attention; start it with a sparse_attention_config to tune it")
    algo = override.get("algorithm", cfg.algorithm)
    algo = ALGORITHM_ALIASES.get(algo, algo) if isinstance(algo, str) else algo
    if algo != cfg.algorithm:
        raise ValueError(
            f"sparse_attention.algorithm={override.get('algorithm')!r} does not match the server's algorithm "
            f"{cfg.algorithm!r}; a request can only retune the server's algorithm"
        )
    allowed = OVERRIDABLE.get(cfg.algorithm)
    if allowed is None:
        raise ValueError(f"sparse_attention: algorithm {cfg.algorithm!r} has no per-request settings")
    unknown = sorted(set(override) - set(allowed) - {"algorithm"})
    if unknown:
        raise ValueError(f"sparse_attention: unknown field(s) {unknown} for {cfg.algorithm!r}; allowed: {list(allowed)}")
    try:
        req = SkipSoftmaxAttentionConfig(**{k: v for k, v in override.items() if k != "algorithm"})
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"sparse_attention: {msgs}") from None
    meta = checkpoint_meta if not isinstance(checkpoint_meta, dict) else parse_checkpoint_meta(checkpoint_meta)
    group = meta.group("skip_softmax") if meta is not None else None
    return {p: skip_softmax_factor(p, req, group, use_checkpoint_target=False) for p in PHASES}

"""Lowering: user config + checkpoint calibration metadata -> one frozen params object (or None) per layer.

Phases resolve independently. For skip_softmax, per phase, the first source that gives a value wins:
the user's threshold_scale_factor > the user's target_sparsity (through the checkpoint formula) >
the checkpoint's target_sparsity (same formula) > the checkpoint's fixed factor > dense.
"""
from __future__ import annotations

import logging
from typing import Any

from sparse_llm.backends.base import LayerSpec
from sparse_llm.configs.checkpoint import (
    FACTOR_PATH,
    PHASES,
    CheckpointGroup,
    CheckpointSparseMeta,
    is_ignored,
    parse_checkpoint_meta,
)
from sparse_llm.configs.params import DsaParams, LayerSparseParams, RocketParams, SkipSoftmaxParams, StreamingParams
from sparse_llm.configs.sparse_more import MORE_CONFIGS, dense_layer_indices, lower_more
from sparse_llm.configs.sparse import (
    BaseSparseAttentionConfig,
    DeepSeekSparseAttentionConfig,
    RocketSparseAttentionConfig,
    SkipSoftmaxAttentionConfig,
    StreamingAttentionConfig,
    parse_sparse_config,
)

logger = logging.getLogger(__name__)


def _cfg_get(hf_config: Any, name: str, default: Any = None) -> Any:
    if isinstance(hf_config, dict):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def skip_softmax_factor(
    phase: str, cfg: SkipSoftmaxAttentionConfig, group: CheckpointGroup | None, use_checkpoint_target: bool = True
) -> float | None:
    """The threshold_scale_factor of one phase, or None (dense), by the precedence above."""
    if cfg.threshold_scale_factor is not None and cfg.threshold_scale_factor.get(phase) is not None:
        return cfg.threshold_scale_factor.get(phase)
    target, source = None, None
    if cfg.target_sparsity is not None and cfg.target_sparsity.get(phase) is not None:
        target, source = cfg.target_sparsity.get(phase), "target_sparsity"
    elif use_checkpoint_target and group is not None and phase in group.target_sparsity:
        target, source = group.target_sparsity[phase], "the checkpoint's target_sparsity"
    if target is not None:
        formula = group.formulas.get(phase) if group is not None else None
        if formula is None:
            raise ValueError(
                f"{source}.{phase}={target} needs a calibrated formula in the checkpoint's config.json at "
                f"{FACTOR_PATH}.{phase} (with `formula` and its coefficients); none was found. Run "
                "`sparse-llm calibrate`, or give threshold_scale_factor directly."
            )
        return formula.evaluate(target)
    if use_checkpoint_target and group is not None and phase in group.fixed_factors:
        return group.fixed_factors[phase]
    return None


def _skip_softmax_params(cfg: SkipSoftmaxAttentionConfig, group: CheckpointGroup | None) -> SkipSoftmaxParams:
    factors = {p: skip_softmax_factor(p, cfg, group) for p in PHASES}
    for p, f in factors.items():
        if f is None:
            logger.warning(
                "skip_softmax: the %s phase has no threshold_scale_factor or target_sparsity (user or checkpoint); "
                "it runs dense",
                p,
            )
    return SkipSoftmaxParams("skip_softmax", prefill_factor=factors["prefill"], decode_factor=factors["decode"],
                             bound_skip=cfg.bound_skip)


def _rocket_params(cfg: RocketSparseAttentionConfig, head_dim: int) -> RocketParams:
    topr = cfg.topr if isinstance(cfg.topr, int) else max(1, round(cfg.topr * head_dim))
    if topr > head_dim:
        logger.warning("rocket: topr=%s exceeds head_dim=%d; using all %d channels", cfg.topr, head_dim, head_dim)
        topr = head_dim
    return RocketParams(
        "rocket",
        window_size=cfg.window_size,
        kernel_size=cfg.kernel_size,
        topr=topr,
        topk=cfg.topk,
        prompt_budget=cfg.prompt_budget,
        page_size=cfg.page_size,
        kt_cache_dtype=cfg.kt_cache_dtype,
        seq_len_threshold=cfg.seq_len_threshold,
    )


def _dsa_params(cfg: DeepSeekSparseAttentionConfig, hf_config: Any) -> DsaParams:
    model_topk = _cfg_get(hf_config, "index_topk")
    if model_topk is None:
        arch = _cfg_get(hf_config, "architectures") or _cfg_get(hf_config, "model_type")
        raise ValueError(
            f"sparse_attention_config.algorithm='dsa' needs a model with a DSA indexer (config.json index_topk, "
            f"index_n_heads, index_head_dim); this model ({arch}) has none"
        )

    def pick(name: str, default: Any) -> Any:
        value = getattr(cfg, name)
        return value if value is not None else _cfg_get(hf_config, name, default)

    return DsaParams(
        "dsa",
        index_n_heads=pick("index_n_heads", 64),
        index_head_dim=pick("index_head_dim", 128),
        index_topk=pick("index_topk", model_topk),
        indexer_max_chunk_size=cfg.indexer_max_chunk_size or 32768,
        skip_indexer_for_short_seqs=cfg.skip_indexer_for_short_seqs,
        indexer_k_dtype=cfg.indexer_k_dtype,
        seq_len_threshold=cfg.seq_len_threshold,
    )


def lower_config(
    cfg: BaseSparseAttentionConfig, hf_config: Any, meta: CheckpointSparseMeta | None, head_dim: int, num_heads: int
) -> LayerSparseParams:
    """The params shared by every non-ignored layer."""
    group = meta.group(cfg.algorithm) if meta is not None else None
    if isinstance(cfg, SkipSoftmaxAttentionConfig):
        return _skip_softmax_params(cfg, group)
    if isinstance(cfg, RocketSparseAttentionConfig):
        return _rocket_params(cfg, head_dim)
    if isinstance(cfg, DeepSeekSparseAttentionConfig):
        return _dsa_params(cfg, hf_config)
    if isinstance(cfg, StreamingAttentionConfig):
        return StreamingParams("streaming", sink_tokens=cfg.sink_tokens, local_window=cfg.local_window)
    if isinstance(cfg, MORE_CONFIGS):
        return lower_more(cfg, num_heads)
    raise ValueError(f"no lowering for sparse_attention_config.algorithm={cfg.algorithm!r}")


def resolve(
    sparse_cfg: BaseSparseAttentionConfig | dict | None,
    hf_config: Any,
    checkpoint_meta: CheckpointSparseMeta | dict | None,
    layer_specs: list[LayerSpec],
) -> list[LayerSparseParams | None]:
    """One params object per attention layer (None = dense), in layer order."""
    cfg = parse_sparse_config(sparse_cfg)
    meta = checkpoint_meta if isinstance(checkpoint_meta, CheckpointSparseMeta) or checkpoint_meta is None else parse_checkpoint_meta(checkpoint_meta)
    if cfg is None:
        return [None] * len(layer_specs)
    if not layer_specs:
        raise ValueError("the model has no attention layers to apply sparse_attention_config to")
    params = lower_config(cfg, hf_config, meta, layer_specs[0].head_dim, layer_specs[0].num_heads)
    if isinstance(params, SkipSoftmaxParams) and params.prefill_factor is None and params.decode_factor is None:
        return [None] * len(layer_specs)
    ignore = meta.ignore_patterns(cfg.algorithm) if meta is not None else ()
    if isinstance(cfg, DeepSeekSparseAttentionConfig):
        ignore = ()  # DSA is part of the architecture: every layer has its indexer
    dense = dense_layer_indices(cfg, [s.layer_idx for s in layer_specs])  # e.g. Quest's first dense_layers
    return [None if is_ignored(s.layer_idx, ignore) or s.layer_idx in dense else params for s in layer_specs]


def warn_ineffective_factors(params: list[LayerSparseParams | None], max_model_len: int) -> None:
    """λ = factor / kv_len >= 1 means off: a factor >= max_model_len can never skip anything, say so."""
    seen = set()
    for p in params:
        if not isinstance(p, SkipSoftmaxParams):
            continue
        for phase in PHASES:
            f = p.factor(phase)
            if f is not None and f >= max_model_len and phase not in seen:
                seen.add(phase)
                logger.warning(
                    "skip_softmax: the %s threshold_scale_factor %.4g is >= max_model_len=%d, so λ = factor / kv_len >= 1 "
                    "for every sequence and the %s phase never skips (the target is beyond what this model's "
                    "calibration reaches at these lengths)", phase, f, max_model_len, phase,
                )

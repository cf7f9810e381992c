"""The sparse-attention config union: TensorRT-LLM's documented YAML bodies parse into the right classes."""
import logging
import math

import pytest
import yaml
from pydantic import ValidationError

from sparse_llm import (
    DeepSeekSparseAttentionConfig,
    RocketSparseAttentionConfig,
    SkipSoftmaxAttentionConfig,
    StreamingAttentionConfig,
)
from sparse_llm.configs.sparse import algorithms, parse_sparse_config


def parse_yaml(text: str):
    return parse_sparse_config(yaml.safe_load(text))


def test_trtllm_rocket_block():
    cfg = parse_yaml("{algorithm: rocket, prompt_budget: 2048, kt_cache_dtype: float8_e5m2}")
    assert isinstance(cfg, RocketSparseAttentionConfig)
    assert (cfg.prompt_budget, cfg.kt_cache_dtype, cfg.window_size, cfg.kernel_size, cfg.topk, cfg.page_size) == (
        2048, "float8_e5m2", 32, 63, 64, 4)


def test_trtllm_dsa_blocks(caplog):
    cfg = parse_yaml("{algorithm: dsa, index_topk: 64}")
    assert isinstance(cfg, DeepSeekSparseAttentionConfig) and cfg.index_topk == 64
    assert cfg.index_n_heads is None and cfg.indexer_k_dtype == "fp8" and cfg.skip_indexer_for_short_seqs
    with caplog.at_level(logging.WARNING):
        cfg = parse_yaml("{algorithm: dsa, index_topk: 2048, enable_heuristic_topk: true}")
    assert isinstance(cfg, DeepSeekSparseAttentionConfig) and cfg.index_topk == 2048
    assert any("enable_heuristic_topk" in r.message and "no effect" in r.message for r in caplog.records)


def test_trtllm_skip_softmax_blocks():
    cfg = parse_yaml("{algorithm: skip_softmax, threshold_scale_factor: {prefill: 1000.0, decode: 500.0}}")
    assert isinstance(cfg, SkipSoftmaxAttentionConfig)
    assert (cfg.threshold_scale_factor.prefill, cfg.threshold_scale_factor.decode) == (1000.0, 500.0)
    cfg = parse_yaml("{algorithm: skip_softmax, target_sparsity: {prefill: 0.5, decode: 0.3}}")
    assert (cfg.target_sparsity.prefill, cfg.target_sparsity.decode) == (0.5, 0.3)
    assert cfg.threshold_scale_factor is None


def test_scalar_applies_to_both_phases():
    cfg = SkipSoftmaxAttentionConfig(target_sparsity=0.5)
    assert cfg.target_sparsity.prefill == cfg.target_sparsity.decode == 0.5


def test_alias_softmax_skip_and_streaming():
    assert isinstance(parse_sparse_config({"algorithm": "softmax_skip", "threshold_scale_factor": 3}), SkipSoftmaxAttentionConfig)
    s = parse_sparse_config({"algorithm": "streaming", "sink_tokens": 4, "local_window": 128})
    assert isinstance(s, StreamingAttentionConfig) and s.local_window == 128
    assert set(algorithms()) >= {"skip_softmax", "rocket", "dsa", "streaming"}


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"algorithm": "skip_softmax", "target_sparsity": 1.5}, "target_sparsity.prefill must be in [0, 1], got 1.5"),
        ({"algorithm": "skip_softmax", "target_sparsity": {"prefill": 0.5, "decod": 0.1}}, "unknown phase key(s) ['decod']"),
        ({"algorithm": "skip_softmax", "threshold_scale_factor": -1}, "must be >= 0"),
        ({"algorithm": "rocket", "kernel_size": 64}, "kernel_size must be odd"),
        ({"algorithm": "rocket", "page_size": 6}, "page_size must be a power of two"),
        ({"algorithm": "rocket", "topr": 1.5}, "topr as a float"),
        ({"algorithm": "rocket", "topr": 0}, "topr as an int must be > 0"),
        ({"algorithm": "rocket", "kt_cache_dtype": "int8"}, "kt_cache_dtype"),
        ({"algorithm": "rocket", "prompt_budget": 16}, "must be larger than window_size"),
        ({"algorithm": "dsa", "indexer_k_dtype": "fp4"}, "indexer_k_dtype"),
        ({"algorithm": "dsa", "bogus": 1}, "bogus"),
        ({"algorithm": "nope"}, "nope"),
        ({"prompt_budget": 3}, "algorithm"),
    ],
)
def test_bad_values_name_the_field(body, needle):
    with pytest.raises(ValidationError) as e:
        parse_sparse_config(body)
    assert needle in str(e.value)


def test_configs_are_frozen():
    cfg = SkipSoftmaxAttentionConfig(threshold_scale_factor=1.0)
    with pytest.raises(ValidationError):
        cfg.threshold_scale_factor = 2.0
    assert math.isclose(cfg.threshold_scale_factor.prefill, 1.0)

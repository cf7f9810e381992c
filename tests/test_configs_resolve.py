"""Checkpoint calibration metadata and lowering into per-layer params."""
import logging
import math

import pytest

from sparse_llm.backends.base import LayerSpec
from sparse_llm.configs.checkpoint import is_ignored, parse_checkpoint_meta
from sparse_llm.configs.overrides import resolve_request_override
from sparse_llm.configs.params import DsaParams, RocketParams, SkipSoftmaxParams, StreamingParams
from sparse_llm.configs.resolve import resolve
from sparse_llm.configs.sparse import SkipSoftmaxAttentionConfig

DOC_CHECKPOINT = {
    "architectures": ["LlamaForCausalLM"],
    "sparse_attention_config": {
        "config_groups": {
            "group_0": {
                "algorithm": "skip_softmax",
                "targets": ["LlamaAttention"],
                "threshold_scale_factor": {
                    "formula": "a * exp(b * target_sparsity)",
                    "prefill": {"a": 100.0, "b": 5.0},
                    "decode": {"a": 0.05, "b": 10.0},
                },
                "ignore": ["model.layers.0.self_attn"],
            }
        },
        "ignore": ["model.layers.1.self_attn"],
    },
}


def specs(n=4, head_dim=64):
    return [LayerSpec(i, 9, 3, head_dim, head_dim**-0.5, f"model.layers.{i}.self_attn") for i in range(n)]


def test_documented_checkpoint_example_resolves():
    cfg = SkipSoftmaxAttentionConfig(target_sparsity={"prefill": 0.5, "decode": 0.3})
    params = resolve(cfg, {}, DOC_CHECKPOINT["sparse_attention_config"], specs())
    assert params[0] is None and params[1] is None
    p = params[2]
    assert isinstance(p, SkipSoftmaxParams) and params[3] == p
    assert math.isclose(p.prefill_factor, 100 * math.exp(2.5), rel_tol=1e-9)
    assert abs(p.prefill_factor - 1218.25) < 0.01
    assert math.isclose(p.decode_factor, 0.05 * math.exp(3.0), rel_tol=1e-9)
    assert abs(p.decode_factor - 1.0043) < 1e-4


def test_whole_config_json_is_accepted_too():
    cfg = SkipSoftmaxAttentionConfig(target_sparsity=0.5)
    params = resolve(cfg, {}, DOC_CHECKPOINT, specs())
    assert params[2].prefill_factor == pytest.approx(100 * math.exp(2.5))


def test_precedence_per_phase_independently():
    # user factor (prefill) beats user target; decode falls to the user's target through the formula
    cfg = SkipSoftmaxAttentionConfig(threshold_scale_factor={"prefill": 7.0}, target_sparsity={"prefill": 0.9, "decode": 0.2})
    p = resolve(cfg, {}, DOC_CHECKPOINT, specs())[2]
    assert p.prefill_factor == 7.0
    assert p.decode_factor == pytest.approx(0.05 * math.exp(2.0))
    # nothing from the user: the checkpoint's own target is used
    meta = {"config_groups": {"g": {**DOC_CHECKPOINT["sparse_attention_config"]["config_groups"]["group_0"],
                                    "target_sparsity": {"prefill": 0.4}}}}
    p = resolve(SkipSoftmaxAttentionConfig(), {}, meta, specs())[2]
    assert p.prefill_factor == pytest.approx(100 * math.exp(2.0))
    assert p.decode_factor is None


def test_dense_phase_warns(caplog):
    with caplog.at_level(logging.WARNING):
        p = resolve(SkipSoftmaxAttentionConfig(threshold_scale_factor={"prefill": 5.0}), {}, None, specs())[0]
    assert p.decode_factor is None
    assert any("decode" in r.message and "dense" in r.message for r in caplog.records)


def test_target_without_formula_names_the_json_path():
    with pytest.raises(ValueError) as e:
        resolve(SkipSoftmaxAttentionConfig(target_sparsity=0.5), {}, None, specs())
    assert "sparse_attention_config.config_groups.*.threshold_scale_factor.prefill" in str(e.value)


def test_missing_coefficient_is_named():
    meta = {"config_groups": {"g": {"algorithm": "skip_softmax",
                                    "threshold_scale_factor": {"formula": "a * exp(b * target_sparsity) + c",
                                                               "prefill": {"a": 1, "b": 2}}}}}
    with pytest.raises(ValueError, match=r"needs coefficient\(s\) \['c'\]"):
        resolve(SkipSoftmaxAttentionConfig(target_sparsity={"prefill": 0.5}), {}, meta, specs())


def test_formula_must_use_target_and_never_eval():
    meta = {"threshold_scale_factor": {"formula": "a * 2", "a": 1}}
    with pytest.raises(ValueError, match="must reference 'target_sparsity'"):
        resolve(SkipSoftmaxAttentionConfig(target_sparsity=0.5), {}, meta, specs())
    meta = {"threshold_scale_factor": {"formula": "__import__('os').getcwd() + target_sparsity", "a": 1}}
    with pytest.raises(ValueError, match="unsupported function"):
        parse_checkpoint_meta(meta)


def test_shared_coefficients_and_legacy_names():
    meta = {"config_groups": {"g": {"sparse_algo": "softmax_skip",
                                    "threshold_scale_factor": {"formula": "a * exp(b * target_sparsity)", "a": 2, "b": 1}}}}
    p = resolve(SkipSoftmaxAttentionConfig(target_sparsity=0.0), {}, meta, specs())[0]
    assert p.prefill_factor == pytest.approx(2.0) and p.decode_factor == pytest.approx(2.0)


def test_top_level_group_and_two_skip_groups():
    meta = parse_checkpoint_meta({"target_sparsity": 0.5, "ignore": ["model.layers.3.*"]})
    assert meta.groups[0].algorithm == "skip_softmax" and meta.groups[0].target_sparsity["decode"] == 0.5
    two = {"config_groups": {"a": {"algorithm": "skip_softmax"}, "b": {"algorithm": "softmax_skip"}}}
    with pytest.raises(ValueError, match="2 skip_softmax groups"):
        parse_checkpoint_meta(two)


def test_ignore_patterns_match_any_module_name():
    assert is_ignored(3, ["model.layers.3.self_attn"])
    assert is_ignored(3, ["layers.3.self_attn"])
    assert is_ignored(12, ["*.layers.1?.*"])
    assert not is_ignored(2, ["*.layers.1?.*"])
    assert is_ignored(5, ["model.layers.5.attention"])


def test_other_algorithms_lower():
    p = resolve({"algorithm": "rocket", "topr": 0.5}, {}, None, specs(head_dim=64))[0]
    assert isinstance(p, RocketParams) and p.topr == 32
    p = resolve({"algorithm": "streaming", "sink_tokens": 2, "local_window": 8}, {}, None, specs())[1]
    assert p == StreamingParams("streaming", 2, 8)
    with pytest.raises(ValueError, match="needs a model with a DSA indexer"):
        resolve({"algorithm": "dsa"}, {"architectures": ["LlamaForCausalLM"]}, None, specs())
    p = resolve({"algorithm": "dsa"}, {"index_topk": 16, "index_n_heads": 4, "index_head_dim": 32}, None, specs())[0]
    assert isinstance(p, DsaParams) and (p.index_topk, p.index_n_heads, p.index_head_dim) == (16, 4, 32)
    assert resolve(None, {}, DOC_CHECKPOINT, specs()) == [None] * 4


@pytest.mark.parametrize("algorithm", ["xattention", "flexprefill", "quest"])
def test_dense_layers_keep_the_first_layers_dense(algorithm):
    params = resolve({"algorithm": algorithm, "dense_layers": 2}, {}, None, specs(n=4))
    assert params[:2] == [None, None] and all(p is not None and p.algorithm == algorithm for p in params[2:])
    default = resolve({"algorithm": algorithm}, {}, None, specs(n=4))
    assert sum(p is None for p in default) == (2 if algorithm == "quest" else 0)  # Quest's paper default: 2
    with pytest.raises(ValueError, match="dense_layers"):
        resolve({"algorithm": algorithm, "dense_layers": -1}, {}, None, specs(n=4))


def test_request_override():
    server = SkipSoftmaxAttentionConfig(target_sparsity=0.5)
    meta = DOC_CHECKPOINT["sparse_attention_config"]
    out = resolve_request_override(server, meta, {"target_sparsity": 0.7})
    assert out["prefill"] == pytest.approx(100 * math.exp(3.5)) and out["decode"] == pytest.approx(0.05 * math.exp(7.0))
    out = resolve_request_override(server, meta, {"threshold_scale_factor": {"prefill": 2000}})
    assert out == {"prefill": 2000.0, "decode": None}
    for bad, needle in [
        ({"algorithm": "rocket"}, "does not match"),
        ({"target_sparsity": 2}, "must be in [0, 1]"),
        ({"topk": 3}, "unknown field"),
        ("x", "must be an object"),
    ]:
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            resolve_request_override(server, meta, bad)
    with pytest.raises(ValueError, match="runs dense"):
        resolve_request_override(None, None, {"target_sparsity": 0.5})

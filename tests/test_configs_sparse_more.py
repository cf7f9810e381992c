"""Config classes of the block-sparse family: defaults, strictness, clear errors, lowering to params."""
import logging

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from sparse_llm.configs.sparse_more import (
    MORE_CONFIGS,
    FlexPrefillConfig,
    FlexPrefillParams,
    QuestConfig,
    QuestParams,
    VerticalSlashConfig,
    VerticalSlashParams,
    XAttentionConfig,
    XAttentionParams,
    dense_layer_indices,
    lower_more,
)


def test_every_field_is_documented_and_configs_are_strict():
    for cls in MORE_CONFIGS:
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
        with pytest.raises(ValidationError, match="extra"):
            cls(no_such_field=1)


def test_yaml_bodies_parse_and_lower():
    union = TypeAdapter(XAttentionConfig | FlexPrefillConfig | VerticalSlashConfig | QuestConfig)
    cfg = union.validate_python(yaml.safe_load("{algorithm: xattention, threshold: [0.9, 0.8], stride: 16}"))
    assert isinstance(cfg, XAttentionConfig)
    assert lower_more(cfg, num_heads=2) == XAttentionParams("xattention", threshold=(0.9, 0.8), stride=16, block_size=128,
                                                            local_window=128, dense_last_block=True, vertical_gamma=0.99)
    with pytest.raises(ValueError, match="one per query head \\(9\\)"):
        lower_more(cfg, num_heads=9)
    cfg = union.validate_python({"algorithm": "flexprefill"})
    assert lower_more(cfg, 9) == FlexPrefillParams("flexprefill", gamma=0.9, tau=0.1, min_budget=1024, block_size=128,
                                                   local_window=128, dense_last_block=True)
    cfg = union.validate_python({"algorithm": "vertical_slash", "vertical_size": 100, "slash_size": 200})
    assert lower_more(cfg, 9) == VerticalSlashParams("vertical_slash", vertical_size=100, slash_size=200)
    cfg = union.validate_python({"algorithm": "quest", "token_budget": 1024})
    assert lower_more(cfg, 9) == QuestParams("quest", token_budget=1024, page_size=8, sink_pages=1, spread_weight=0.25,
                                             minmax_cache_dtype="float8_e5m2")
    assert dense_layer_indices(cfg, list(range(30))) == {0, 1}
    assert dense_layer_indices(XAttentionConfig(), list(range(30))) == set()
    for algo, params_cls, default in (("xattention", XAttentionParams, True), ("flexprefill", FlexPrefillParams, True)):
        for value in (True, False):
            lowered = lower_more(union.validate_python({"algorithm": algo, "dense_last_block": value}), 9)
            assert isinstance(lowered, params_cls) and lowered.dense_last_block is value
        assert lower_more(union.validate_python({"algorithm": algo}), 9).dense_last_block is default


@pytest.mark.parametrize("cls,kwargs,match", [
    (XAttentionConfig, {"threshold": 1.5}, r"in \(0, 1\]"),
    (XAttentionConfig, {"threshold": []}, "empty"),
    (XAttentionConfig, {"stride": 12}, "divide block_size=128"),
    (XAttentionConfig, {"block_size": 96}, "64 or 128|literal"),
    (XAttentionConfig, {"dense_last_block": "sometimes"}, "dense_last_block"),
    (FlexPrefillConfig, {"gamma": 0.0}, "greater than 0"),
    (FlexPrefillConfig, {"min_budget": 2048, "max_budget": 1024}, "max_budget"),
    (VerticalSlashConfig, {"vertical_size": 10, "sink_tokens": 30}, "sink_tokens"),
    (VerticalSlashConfig, {"slash_size": 50}, "local_diagonals"),
    (QuestConfig, {"page_size": 12}, "power of two"),
    (QuestConfig, {"token_budget": 1001}, "multiple of page_size"),
])
def test_bad_values_name_the_field(cls, kwargs, match):
    with pytest.raises(ValidationError, match=match):
        cls(**kwargs)


def test_tau_zero_warns(caplog):
    with caplog.at_level(logging.WARNING):
        FlexPrefillConfig(tau=0.0)
    assert any("disables the query-aware" in r.message for r in caplog.records)


def test_quest_selection_picks_the_backend_class():
    """`selection` reaches the registry: per_kv_head runs the group backends, the default the per-head ones."""
    from sparse_llm.backends.base import LayerSpec
    from sparse_llm.backends.quest import QuestGroupTorchBackend, QuestTorchBackend
    from sparse_llm.backends.registry import backend_class, registry_algorithm

    spec = LayerSpec(layer_idx=0, num_heads=6, num_kv_heads=2, head_dim=64, scale=0.125, module_name="model.layers.0.self_attn")
    default = lower_more(QuestConfig(), 6)
    grouped = lower_more(QuestConfig(selection="per_kv_head"), 6)
    assert backend_class("torch", registry_algorithm(spec, default), "cpu") is QuestTorchBackend
    assert backend_class("torch", registry_algorithm(spec, grouped), "cpu") is QuestGroupTorchBackend
    with pytest.raises(ValidationError, match="selection"):
        QuestConfig(selection="per_group")

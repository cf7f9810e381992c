"""LlmArgs: YAML loading, merge precedence, TensorRT-LLM option files, schema, fuzzing."""
import json
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sparse_llm import LlmArgs, RocketSparseAttentionConfig, SkipSoftmaxAttentionConfig
from sparse_llm.configs.sparse import parse_sparse_config

TRTLLM_ROCKET_YAML = """
backend: pytorch
max_batch_size: 8
max_num_tokens: 4096
kv_cache_config:
  enable_block_reuse: false
  free_gpu_memory_fraction: 0.8
enable_chunked_prefill: false
sparse_attention_config:
  algorithm: rocket
  prompt_budget: 2048
  kt_cache_dtype: float8_e5m2
"""


def write(tmp_path, text, name="extra.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_trtllm_file_works_once_trt_only_keys_are_gone(tmp_path):
    with pytest.raises(ValueError, match="backend: a TensorRT-LLM option that sparse-llm does not support"):
        LlmArgs.from_yaml(write(tmp_path, TRTLLM_ROCKET_YAML))
    args = LlmArgs.from_yaml(write(tmp_path, TRTLLM_ROCKET_YAML.replace("backend: pytorch\n", "")))
    assert args.max_num_seqs == 8 and args.max_num_batched_tokens == 4096
    assert args.kv_cache_config.enable_prefix_caching is False
    assert args.kv_cache_config.free_gpu_memory_fraction == 0.8
    assert args.enable_chunked_prefill is False
    assert isinstance(args.sparse_attention_config, RocketSparseAttentionConfig)


def test_merge_precedence(tmp_path):
    path = write(tmp_path, "max_num_seqs: 4\nseed: 1\nkv_cache_config: {block_size: 32}\n"
                           "sparse_attention_config: {algorithm: skip_softmax, threshold_scale_factor: 10}\n")
    args = LlmArgs.from_sources(path, flags={"seed": 2, "max_model_len": None}, sets=["seed=3", "max_num_batched_tokens=99"])
    assert (args.max_num_seqs, args.seed, args.max_num_batched_tokens, args.kv_cache_config.block_size) == (4, 3, 99, 32)
    # --set into a nested node keeps its siblings; a mapping value replaces the node
    args = LlmArgs.from_sources(path, sets=["sparse_attention_config.threshold_scale_factor.decode=5"])
    assert args.sparse_attention_config.threshold_scale_factor.decode == 5
    assert args.sparse_attention_config.threshold_scale_factor.prefill is None  # the scalar node was replaced by a mapping
    args = LlmArgs.from_sources(path, sets=["sparse_attention_config={algorithm: rocket}"])
    assert isinstance(args.sparse_attention_config, RocketSparseAttentionConfig)
    # alias in YAML, canonical flag: the flag wins (both normalised to one name before merging)
    path2 = write(tmp_path, "max_batch_size: 8\n", "b.yaml")
    assert LlmArgs.from_sources(path2, flags={"max_num_seqs": 2}).max_num_seqs == 2


def test_set_builds_sparse_config_from_nothing():
    args = LlmArgs.from_sources(sets=["sparse_attention_config.algorithm=skip_softmax",
                                      "sparse_attention_config.target_sparsity=0.5"])
    assert isinstance(args.sparse_attention_config, SkipSoftmaxAttentionConfig)
    assert args.sparse_attention_config.target_sparsity.prefill == 0.5


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- a\n- b\n", "root must be a mapping"),
        ("max_num_seq: 3\n", "did you mean 'max_num_seqs'"),
        ("kv_cache_config: {blok_size: 8}\n", "did you mean 'block_size'"),
        ("kv_cache_config: {block_size: 12}\n", "power of two"),
        ("kv_cache_config: {host_cache_size: 100}\n", "kv_cache_config.host_cache_size: a TensorRT-LLM option"),
        ("cuda_graph_config: {}\n", "cuda_graph_config: a TensorRT-LLM option"),
        ("attention_backend: cudnn\n", "attention_backend"),
        ("max_num_seqs: 0\n", "max_num_seqs"),
        ("a: [\n", "not valid YAML"),
        ("max_batch_size: 2\nmax_num_seqs: 3\n", "same option with different values"),
    ],
)
def test_bad_yaml(tmp_path, text, needle):
    with pytest.raises(ValueError) as e:
        LlmArgs.from_yaml(write(tmp_path, text))
    assert needle in str(e.value)


def test_bad_set_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="expected PATH=VALUE"):
        LlmArgs.from_sources(sets=["seed"])
    with pytest.raises(ValueError, match="no such file"):
        LlmArgs.from_yaml(tmp_path / "missing.yaml")


def test_schema_command_prints_json_schema():
    out = subprocess.run([sys.executable, "-m", "sparse_llm.cli", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    assert "sparse_attention_config" in schema["properties"] and "kv_cache_config" in schema["properties"]
    assert "discriminator" in json.dumps(schema)


def test_every_field_is_documented():
    from sparse_llm.configs.llm_args import KvCacheConfig
    from sparse_llm.configs.sparse import (
        DeepSeekSparseAttentionConfig,
        RocketSparseAttentionConfig,
        StreamingAttentionConfig,
    )

    for cls in (LlmArgs, KvCacheConfig, SkipSoftmaxAttentionConfig, RocketSparseAttentionConfig,
                DeepSeekSparseAttentionConfig, StreamingAttentionConfig):
        for name, f in cls.model_fields.items():
            assert f.description, f"{cls.__name__}.{name} has no description"


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=8))
_keys = st.sampled_from(["algorithm", "prompt_budget", "topr", "kernel_size", "page_size", "target_sparsity",
                         "threshold_scale_factor", "prefill", "decode", "index_topk", "window_size", "kt_cache_dtype", "zzz"])
_values = st.recursive(_scalars, lambda c: st.dictionaries(_keys, c, max_size=4) | st.lists(c, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=6), st.sampled_from(["skip_softmax", "rocket", "dsa", "streaming", None]))
def test_fuzz_sparse_dicts_only_raise_readable_errors(body, algorithm):
    if algorithm is not None:
        body = {**body, "algorithm": algorithm}
    try:
        parse_sparse_config(body)
    except ValidationError as e:
        assert str(e)
    except ValueError as e:
        assert str(e)


_llm_keys = st.sampled_from(["max_num_seqs", "max_batch_size", "kv_cache_config", "sparse_attention_config", "dtype",
                             "enable_block_reuse", "block_size", "seed", "backend", "max_seq_len", "foo"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_llm_keys, _values, max_size=5))
def test_fuzz_yaml_only_raises_readable_errors(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("fuzz") / "x.yaml"
    path.write_text(yaml.safe_dump(body))
    try:
        LlmArgs.from_yaml(path)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        assert str(e)


def test_configuration_doc_names_every_field():
    from pathlib import Path

    from sparse_llm.configs.llm_args import KvCacheConfig
    from sparse_llm.configs.sparse import DeepSeekSparseAttentionConfig, StreamingAttentionConfig
    from sparse_llm.configs.sparse_more import MORE_CONFIGS

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for cls in (LlmArgs, KvCacheConfig, SkipSoftmaxAttentionConfig, RocketSparseAttentionConfig,
                DeepSeekSparseAttentionConfig, StreamingAttentionConfig, *MORE_CONFIGS):
        for name in cls.model_fields:
            assert f"`{name}`" in doc, f"docs/configuration.md does not document {cls.__name__}.{name}"

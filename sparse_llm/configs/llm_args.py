"""LlmArgs: every engine option in one documented, strict pydantic model, loadable from YAML.

Sources merge as: defaults < YAML `--config` < explicit CLI flags < `--set a.b=value` (value parsed as YAML;
a mapping value replaces what was there). TensorRT-LLM option files work unchanged where the meaning is the
same: its names are accepted as aliases, and its options that have no meaning here are refused by name.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparse_llm.configs.sparse import ALGORITHM_ALIASES, SparseAttentionConfig

# TensorRT-LLM name -> our name (same meaning).
TRTLLM_ALIASES = {
    "max_batch_size": "max_num_seqs",
    "max_num_tokens": "max_num_batched_tokens",
    "max_seq_len": "max_model_len",
    "random_seed": "seed",
}
KV_TRTLLM_ALIASES = {"enable_block_reuse": "enable_prefix_caching", "tokens_per_block": "block_size"}

# TensorRT-LLM options with no counterpart here: refused with a message saying so, not a generic "extra field".
TRTLLM_ONLY = {
    "backend", "build_config", "cuda_graph_config", "disable_overlap_scheduler", "moe_config", "moe_expert_parallel_size",
    "moe_tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size", "speculative_config", "quant_config",
    "print_iter_log", "enable_attention_dp", "enable_iter_perf_stats", "enable_iter_req_stats", "stream_interval",
    "lora_config", "scheduler_config", "torch_compile_config", "max_beam_width", "gather_generation_logits",
    "attn_backend", "sampler_type", "checkpoint_format", "enable_lora", "batch_wait_timeout_ms", "garbage_collection_gen0_threshold",
    "use_cuda_graph", "cuda_graph_batch_sizes", "cuda_graph_padding_enabled", "kv_connector_config", "cache_transceiver_config",
    "enable_autotuner", "allreduce_strategy", "mpi_session", "peft_cache_config", "decoding_config", "guided_decoding_backend",
}
KV_TRTLLM_ONLY = {
    "max_attention_window", "sink_token_length", "enable_partial_reuse", "copy_on_partial_reuse", "host_cache_size",
    "onboard_blocks", "secondary_offload_min_priority", "event_buffer_max_size", "dtype", "mamba_ssm_cache_dtype",
    "use_uvm", "attention_dp_events_gather_period_ms", "max_gpu_total_bytes",
}


def _normalize(data: dict, aliases: dict[str, str], trt_only: set[str], fields: list[str], where: str) -> dict:
    """Map TensorRT-LLM aliases to our names; refuse TensorRT-LLM-only and unknown keys with a helpful message."""
    out: dict = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: keys must be strings, got {key!r}")
        name = aliases.get(key, key)
        if key in trt_only:
            raise ValueError(f"{where}{key}: a TensorRT-LLM option that sparse-llm does not support; remove it")
        if name not in fields:
            near = difflib.get_close_matches(key, fields + list(aliases), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {sorted(fields)}"
            raise ValueError(f"{where}{key}: unknown option{hint}")
        if name in out and out[name] != value:
            raise ValueError(f"{where}{key} and {where}{name} are the same option with different values ({value!r} vs {out[name]!r})")
        out[name] = value
    return out


class KvCacheConfig(BaseModel):
    """How much memory the paged KV cache takes and how its blocks are shared."""

    model_config = ConfigDict(extra="forbid")

    free_gpu_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="On CUDA: fraction of the GPU memory free after a warm-up pass given to the KV cache."
    )
    block_size: int = Field(16, gt=0, description="Tokens per KV block (page); a power of two. TensorRT-LLM: tokens_per_block.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse full KV blocks of identical prompt prefixes across requests. TensorRT-LLM: enable_block_reuse."
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Cap on the KV cache size in tokens. On CPU it sets the size (default 65536 tokens)."
    )

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return _normalize(data, KV_TRTLLM_ALIASES, KV_TRTLLM_ONLY, list(cls.model_fields), "kv_cache_config.")
        return data

    @field_validator("block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"block_size must be a power of two, got {v}")
        return v


class LlmArgs(BaseModel):
    """All options of an engine: Python kwargs of `LLM(...)`, keys of a `--config` YAML file, `--set` paths."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(
        None, description="A Hugging Face style directory (config.json + safetensors) or a .gguf file; None = the bundled SmolLM2-135M-Instruct."
    )
    tokenizer: str | None = Field(None, description="Tokenizer directory; None = the model's own.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights and activations; auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + output in tokens; None = the model's max_position_embeddings. TensorRT-LLM: max_seq_len."
    )
    max_num_seqs: int = Field(64, gt=0, description="Most sequences in one engine step. TensorRT-LLM: max_batch_size.")
    max_num_batched_tokens: int = Field(
        8192, gt=0, description="Most tokens (prefill chunks + decodes) in one engine step. TensorRT-LLM: max_num_tokens."
    )
    enable_chunked_prefill: bool = Field(
        True, description="Split long prompts into chunks of at most max_num_batched_tokens, mixed with decodes."
    )
    seed: int = Field(0, description="Seed of the engine's random generator (per-request seeds override it).")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs for decode.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (or CPU processes) the model is sharded over by KV heads.")
    attention_backend: Literal["auto", "torch", "triton", "flashinfer"] = Field(
        "auto",
        description="auto = FlashInfer for dense layers on CUDA when installed, else Triton; torch on CPU. A forced backend "
        "that cannot run the requested algorithm is an error.",
    )
    kv_cache_config: KvCacheConfig = Field(default_factory=KvCacheConfig, description="The paged KV cache.")
    sparse_attention_config: SparseAttentionConfig | None = Field(
        None, description="The sparse-attention algorithm and its settings; None = dense everywhere."
    )

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _normalize(data, TRTLLM_ALIASES, TRTLLM_ONLY, list(cls.model_fields), "")
        sac = data.get("sparse_attention_config")
        if isinstance(sac, dict) and isinstance(sac.get("algorithm"), str):
            data["sparse_attention_config"] = {**sac, "algorithm": ALGORITHM_ALIASES.get(sac["algorithm"], sac["algorithm"])}
        return data

    @model_validator(mode="after")
    def _chunked(self) -> "LlmArgs":
        if not self.enable_chunked_prefill and self.max_model_len is not None and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt must fit one step.
            self.max_num_batched_tokens = self.max_model_len
        return self

    # --- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "LlmArgs":
        return cls.from_sources(yaml_path=path, flags=overrides)

    @classmethod
    def from_sources(
        cls, yaml_path: str | Path | None = None, flags: dict[str, Any] | None = None, sets: list[str] | None = None
    ) -> "LlmArgs":
        """defaults < YAML < flags (None values ignored) < `--set a.b=v` assignments."""
        merged: dict = {}
        if yaml_path is not None:
            merged = deep_merge(merged, normalize_keys(read_yaml_mapping(yaml_path)))
        if flags:
            merged = deep_merge(merged, normalize_keys(unflatten({k: v for k, v in flags.items() if v is not None})))
        for assignment in sets or []:
            apply_set(merged, assignment)
        return cls.model_validate(normalize_keys(merged))


def normalize_keys(data: dict) -> dict:
    """Rename TensorRT-LLM aliases (top level and kv_cache_config) so sources merge on one name."""
    out = _rename(data, TRTLLM_ALIASES, "")
    kv = out.get("kv_cache_config")
    if isinstance(kv, dict):
        out["kv_cache_config"] = _rename(kv, KV_TRTLLM_ALIASES, "kv_cache_config.")
    return out


def _rename(data: dict, aliases: dict[str, str], where: str) -> dict:
    out: dict = {}
    for key, value in data.items():
        name = aliases.get(key, key) if isinstance(key, str) else key
        if name in out and out[name] != value:
            raise ValueError(f"{where}{key} and {where}{name} are the same option with different values ({value!r} vs {out[name]!r})")
        out[name] = value
    return out


def read_yaml_mapping(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {str(path)!r}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--config {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(path)!r}: the root must be a mapping of options, got {type(data).__name__}")
    return data


def unflatten(flags: dict[str, Any]) -> dict:
    """{"kv_cache_config.block_size": 32} -> {"kv_cache_config": {"block_size": 32}}."""
    out: dict = {}
    for key, value in flags.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, top: dict) -> dict:
    """Nested dicts merge key by key; anything else in `top` replaces."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_set(target: dict, assignment: str) -> None:
    """`a.b.c=value`: value parsed as YAML; a mapping value replaces the whole node."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected PATH=VALUE, e.g. --set kv_cache_config.block_size=32")
    path, raw = assignment.split("=", 1)
    parts = [p for p in path.strip().split(".")]
    if not all(parts):
        raise ValueError(f"--set {assignment!r}: empty key in path {path!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"--set {assignment!r}: value is not valid YAML: {e}") from None
    node = target
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value

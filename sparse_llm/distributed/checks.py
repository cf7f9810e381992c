"""What tensor parallelism can shard, checked before any worker starts: clear errors instead of wrong numbers."""
from __future__ import annotations

import torch

SHARDABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_shardable(size: int, hf_config, model_cls: type, sparse_algorithm: str | None) -> None:
    """Refuse models, algorithms and sizes that cannot be split into whole KV heads per rank."""
    from sparse_llm.models.llama import LlamaForCausalLM

    archs = list(getattr(hf_config, "architectures", None) or [])
    if not issubclass(model_cls, LlamaForCausalLM):
        raise ValueError(
            f"tensor_parallel_size={size}: architecture {archs or model_cls.__name__} cannot be sharded "
            f"(MLA/DSA and MoE models are not); tensor parallelism supports {list(SHARDABLE_ARCHITECTURES)}"
        )
    if sparse_algorithm == "dsa":
        raise ValueError(f"tensor_parallel_size={size}: sparse_attention_config.algorithm='dsa' cannot be sharded; use 1")
    if sparse_algorithm == "ada_snapkv":
        raise ValueError(
            f"tensor_parallel_size={size}: sparse_attention_config.algorithm='ada_snapkv' allocates its budget across "
            "all KV heads of a layer, which a head-sharded rank cannot see; use 1 (snapkv shards fine)"
        )
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    if kv_heads % size:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide num_key_value_heads={kv_heads}: each rank must own whole "
            f"KV heads (and the query heads of their groups); use one of {_divisors(kv_heads)}"
        )
    inter = int(hf_config.intermediate_size)
    if inter % size:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide intermediate_size={inter}; use one of "
            f"{[d for d in _divisors(kv_heads) if inter % d == 0]}"
        )


def check_devices(size: int, device: torch.device) -> None:
    """On CUDA rank r uses cuda:r, so N ranks need N visible devices."""
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if size > visible:
            raise ValueError(
                f"tensor_parallel_size={size} needs {size} CUDA devices (rank r uses cuda:r), but torch sees {visible}; "
                "lower tensor_parallel_size or make more devices visible (CUDA_VISIBLE_DEVICES)"
            )
    elif device.type != "cpu":
        raise ValueError(f"tensor_parallel_size={size} runs on 'cpu' (gloo) or 'cuda' (NCCL), not on {device.type!r}")

"""HF architecture name (config.json `architectures`) -> model class; anything else is a clear error."""
from __future__ import annotations

import importlib

from torch import nn

# Import paths, so that adding a model does not import every other one.
MODEL_CLASSES: dict[str, str] = {
    "LlamaForCausalLM": "sparse_llm.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "sparse_llm.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "sparse_llm.models.qwen:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "sparse_llm.models.qwen:Qwen3ForCausalLM",
    "DeepseekV32ForCausalLM": "sparse_llm.models.deepseek_v32:DeepseekV32ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_CLASSES)


def model_class(architectures: list[str] | None, source: str = "config.json") -> type[nn.Module]:
    """The class for the first supported entry of `architectures`."""
    for arch in architectures or []:
        if arch in MODEL_CLASSES:
            module, cls = MODEL_CLASSES[arch].split(":")
            return getattr(importlib.import_module(module), cls)
    raise ValueError(
        f"architectures={architectures!r} (from {source}) is not supported; "
        f"supported architectures: {supported_architectures()}"
    )

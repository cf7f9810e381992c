"""What a checkpoint format reader hands to the loader: config, weights, tokenizer — format-neutral."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelSource:
    path: str  # resolved path of the directory or .gguf file
    hf_config: object  # transformers.PretrainedConfig
    model_cls: type[nn.Module]
    weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # (HF parameter name, tensor), read lazily
    load_tokenizer: Callable[[], object]  # -> transformers.PreTrainedTokenizerBase
    eos_token_ids: list[int]  # from the checkpoint's metadata (the tokenizer's own eos is added by the loader)
    checkpoint_meta: dict | None = None  # raw `sparse_attention_config` from config.json
    rope_freq_factors: torch.Tensor | None = None  # llama.cpp `rope_freqs` (GGUF Llama 3.1), divides RoPE freqs

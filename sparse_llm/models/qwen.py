"""Qwen2 and Qwen3: the Llama decoder with a different attention block (see llama.AttentionOptions).

Qwen2 always has biases on q/k/v (none on o_proj); Qwen3 drops them (unless attention_bias) and instead
RMS-normalises q and k per head before RoPE.
"""
from __future__ import annotations

from sparse_llm.models.llama import AttentionOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)

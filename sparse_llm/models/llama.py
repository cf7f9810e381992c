"""Llama-family decoder (Llama 2/3/3.1, SmolLM2, Mistral without sliding window) in the nano-vllm shape.

Tokens of all sequences of a step are packed: forward(input_ids [T], positions [T]) -> hidden [T, hidden];
there is no batch dimension and no attention mask. Who attends to what is described by the per-step
`AttentionMetadata` that the runner sets; attention itself goes only through `Attention` (the backend seam).
The Qwen variants reuse these classes with different `AttentionOptions` (see qwen.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparse_llm.backends.base import LayerSpec
from sparse_llm.distributed.group import build_group
from sparse_llm.distributed.layers import (
    ColumnParallelMergedLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    local_size,
)
from sparse_llm.models.attention import Attention
from sparse_llm.models.layers import RMSNorm, silu_and_mul
from sparse_llm.models.rotary import RotaryEmbedding, apply_rotary_qk


@dataclass(frozen=True, slots=True)
class AttentionOptions:
    """What differs between the Llama-like attention blocks."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_supported(config) -> None:
    """Refuse config features this implementation would otherwise silently ignore."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported; supported: ['silu']")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)  # Mistral has no use_sliding_window
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if uses_window or layer_types != {"full_attention"}:
        raise ValueError(
            f"sliding_window={window!r} (layer_types {sorted(layer_types)}): sliding-window attention is not "
            "supported; only full attention (sliding_window null / use_sliding_window false)"
        )


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, options: AttentionOptions):
        super().__init__()
        group = build_group()  # tensor parallelism: this rank owns whole KV heads and the q heads of their groups
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.num_heads = local_size(total_heads, group, "num_attention_heads")
        self.num_kv_heads = local_size(total_kv_heads, group, "num_key_value_heads")
        self.head_dim = head_dim_of(config)
        q_size, kv_size = total_heads * self.head_dim, total_kv_heads * self.head_dim
        self.qkv_proj = ColumnParallelMergedLinear(
            config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, options.qkv_bias, group, "qkv_proj"
        )
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, options.o_bias, group, "o_proj")
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if options.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if options.qk_norm else None
        self.attn = Attention(
            LayerSpec(
                layer_idx=layer_idx,
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                scale=self.head_dim**-0.5,
                module_name=f"model.layers.{layer_idx}.self_attn",
            )
        )

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_qk(q, k, cos, sin)
        out = self.attn(q, k, v)  # [T, H, D]
        return self.o_proj(out.reshape(out.shape[0], -1))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        inter = config.intermediate_size
        group = build_group()
        self.gate_up_proj = ColumnParallelMergedLinear(config.hidden_size, {"gate": inter, "up": inter}, bias, group, "gate_up_proj")
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias, group, "down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, options: AttentionOptions):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, options)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual stream before it): the caller adds them, inside the next norm.

        Each residual add is fused into the RMSNorm that follows it (vLLM's pattern), so on CUDA a layer runs
        two add+norm kernels instead of two adds and two multi-kernel norms. residual=None: the first layer.
        """
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, options: AttentionOptions):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, build_group())
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, options) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """The engine-facing model: forward -> hidden states, compute_logits -> float32 logits."""

    # checkpoint projection name -> (fused module name, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias)

    def __init__(self, config):
        super().__init__()
        check_supported(config)
        self.config = config
        self.model = LlamaModel(config, self.attention_options(config))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        tied = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, build_group(), tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits [T, vocab]; under tensor parallelism only rank 0 gets them (None elsewhere)."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def apply_rope_freq_factors(self, factors: torch.Tensor) -> None:
        """llama.cpp's `rope_freqs` (how GGUF stores Llama 3.1's RoPE scaling)."""
        self.model.rotary_emb.apply_freq_factors(factors)

    def ignored_checkpoint_tensors(self) -> tuple[str, ...]:
        """Checkpoint tensors that legitimately have no parameter here."""
        ignored = ("rotary_emb.inv_freq",)
        return ignored + (("lm_head.weight",) if self.tie_word_embeddings else ())

"""Rotary position embeddings (HF "rotate_half" layout), including the static RoPE scalings.

cos/sin are computed from the packed positions once per forward and shared by every layer, so there is no
position cache to size and no maximum length baked in. The scaled variants (linear, llama3 for Llama 3.1,
yarn) only change the inverse frequencies (and, for yarn, a cos/sin factor); they come from transformers'
own `ROPE_INIT_FUNCTIONS`, so they cannot drift from the reference. Types that change with the sequence
length (dynamic, longrope) are refused rather than silently run unscaled.
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_llm.models.layers import use_fused_kernels

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(config) -> dict:
    """The config's RoPE dict ({"rope_type", "rope_theta", ...}) for transformers 5 and 4.x configs alike."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers < 5: rope_theta + rope_scaling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32, cos/sin scaling) for the config's RoPE type."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported; supported: {list(STATIC_ROPE_TYPES)}")
    if rope_type == "default":
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, head_dim]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(rotated q, rotated k) as new contiguous tensors; one kernel for both on the fused path.

    cos/sin are computed once per forward from the positions (RotaryEmbedding) and shared by all layers,
    so the kernel only reads one row of each per token.
    """
    if use_fused_kernels(q):
        from sparse_llm.kernels.elementwise import rotary_qk

        return rotary_qk(q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int):
        super().__init__()
        inv_freq, self.attention_scaling = inverse_frequencies(config, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def apply_freq_factors(self, factors: torch.Tensor) -> None:
        """Divide the frequencies by per-dimension factors: llama.cpp's `rope_freqs` tensor (GGUF Llama 3.1)."""
        if factors.shape != self.inv_freq.shape:
            raise ValueError(f"rope_freqs has shape {tuple(factors.shape)}, expected {tuple(self.inv_freq.shape)}")
        self.inv_freq = self.inv_freq / factors.to(self.inv_freq)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] in `dtype` for positions [T] (same arithmetic as HF, in float32)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

"""DeepSeek-V3.2 (DeepseekV32ForCausalLM): MLA attention with the DSA lightning indexer, dense + MoE MLPs.

Packed-token layout like every model here: forward(input_ids [T], positions [T]) -> hidden [T, hidden].
Checkpoint names are the Hugging Face ones (model.layers.N.self_attn.{q_a_proj, q_a_layernorm, q_b_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj, indexer.{wq_b, wk, k_norm, weights_proj}},
mlp.{gate, experts.E.*, shared_experts.*}); the reference is transformers' modeling_deepseek_v32.py.

MLA runs in the absorbed form (DeepSeek-V2 paper, "weight absorption"): W_UK is folded into the query,
q_lat[h] = q_nope[h] W_UK[h], so every head attends one shared latent key [c_kv | k_pe] and the output
o_lat[h] (a mix of c_kv) is mapped back through W_UV[h]. Attention is then MQA with head_dim
kv_lora_rank + rope and v_head_dim kv_lora_rank, and the cache holds only the latent. The indexer's keys
use non-interleaved RoPE on their first qk_rope_head_dim channels; MLA's rope part uses DeepSeek's
interleaved pairs. Both use the same (YaRN) frequencies.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.dsa_base import IndexerInputs
from sparse_llm.models.layers import Embedding, Linear, RMSNorm, default_weight_loader
from sparse_llm.models.mla_attention import MlaAttention
from sparse_llm.models.moe import DeepseekMoE, GatedMLP
from sparse_llm.models.rotary import RotaryEmbedding, apply_rotary, rope_parameters

MLA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not config.rms_norm_eps


def check_supported(config) -> None:
    """Refuse configurations this implementation would otherwise run wrongly."""
    if getattr(config, "q_lora_rank", None) is None:
        raise ValueError("q_lora_rank=None is not supported: the DSA indexer reads the q_a_layernorm output")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported; supported: ['silu']")
    if config.index_head_dim < config.qk_rope_head_dim:
        raise ValueError(
            f"index_head_dim={config.index_head_dim} must be >= qk_rope_head_dim={config.qk_rope_head_dim} "
            "(the indexer applies RoPE to its first qk_rope_head_dim channels)"
        )


def softmax_scale(config) -> float:
    """1/sqrt(qk_nope + qk_rope), times YaRN's mscale(factor, mscale_all_dim)^2 for scaled RoPE."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params["rope_type"] != "default":
        mscale_all_dim = params.get("mscale_all_dim") or 0
        factor = params.get("factor") or 1.0
        if mscale_all_dim and factor > 1:
            mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale *= mscale * mscale
    return scale


def mlp_layer_types(config) -> list[str]:
    types = getattr(config, "mlp_layer_types", None)
    if types is None:
        n_dense = min(config.first_k_dense_replace, config.num_hidden_layers)
        types = ["dense"] * n_dense + ["sparse"] * (config.num_hidden_layers - n_dense)
    bad = sorted(set(types) - {"dense", "sparse"})
    if bad or len(types) != config.num_hidden_layers:
        raise ValueError(f"mlp_layer_types={types!r}: need {config.num_hidden_layers} entries of 'dense'/'sparse'")
    return list(types)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved-pair RoPE on x [T, h, r]; cos/sin [T, r] are cat(freqs, freqs).

    The result is laid out [rotated evens | rotated odds] (as in transformers); q and k get the same layout,
    so their dot products equal those of the interleaved form.
    """
    half = x.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class LayerNorm(nn.Module):
    """nn.LayerNorm with checkpoint-loaded weight and bias (the indexer's k_norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.weight.weight_loader = self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class Indexer(nn.Module):
    """The lightning indexer's projections: per-token keys, per-token multi-head queries and head weights."""

    def __init__(self, config):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = Linear(config.hidden_size, self.head_dim)
        self.k_norm = LayerNorm(self.head_dim)
        self.weights_proj = Linear(config.hidden_size, self.n_heads)
        self.weights_proj.weight.data = self.weights_proj.weight.data.float()  # float32 as in transformers
        # I = sum_h w_h relu(q_h . k / sqrt(Di)) / sqrt(Hi): both positive scales fold into the weights.
        self.weight_scale = (self.n_heads**-0.5) * (self.head_dim**-0.5)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Non-interleaved RoPE on the first rope_dim channels of x [T, h, Di]."""
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rotary(rot, cos, sin), rest], dim=-1)

    def keys(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        k = self.k_norm(self.wk(hidden))
        return self._rope(k[:, None, :], cos, sin)[:, 0]

    def queries(self, hidden, q_resid, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.wq_b(q_resid).view(-1, self.n_heads, self.head_dim)
        weights = self.weights_proj(hidden.float()) * self.weight_scale
        return self._rope(q, cos, sin), weights


class MlaSelfAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.kv_lora_rank, self.v_head_dim = config.kv_lora_rank, config.v_head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.q_a_proj = Linear(config.hidden_size, config.q_lora_rank, bias)
        self.q_a_layernorm = RMSNorm(config.q_lora_rank, MLA_NORM_EPS)
        self.q_b_proj = Linear(config.q_lora_rank, self.num_heads * (self.nope + self.rope))
        self.kv_a_proj_with_mqa = Linear(config.hidden_size, self.kv_lora_rank + self.rope, bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, MLA_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.num_heads * (self.nope + self.v_head_dim))
        self.o_proj = Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias)
        self.indexer = Indexer(config)
        self.attn = MlaAttention(
            LayerSpec(
                layer_idx=layer_idx,
                num_heads=self.num_heads,
                num_kv_heads=1,
                head_dim=self.kv_lora_rank + self.rope,
                scale=softmax_scale(config),
                module_name=f"model.layers.{layer_idx}.self_attn",
                v_head_dim=self.kv_lora_rank,
                attention_type="mla",
            )
        )

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q_resid = self.q_a_layernorm(self.q_a_proj(hidden))
        q = self.q_b_proj(q_resid).view(num_tokens, self.num_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rotary_interleaved(q_pe, cos, sin)
        k_pe = apply_rotary_interleaved(k_pe[:, None, :], cos, sin)
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.nope, self.v_head_dim], dim=1)
        q_lat = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        latent = torch.cat([c_kv[:, None, :], k_pe], dim=-1)
        indexer = None
        if self.attn.wants_indexer_keys():
            indexer = IndexerInputs(k=self.indexer.keys(hidden, cos, sin))
            if self.attn.wants_indexer_scores():
                indexer.q, indexer.weights = self.indexer.queries(hidden, q_resid, cos, sin)
        o_lat = self.attn(torch.cat([q_lat, q_pe], dim=-1), latent, indexer)  # [T, H, kv_lora_rank]
        out = torch.einsum("thr,hvr->thv", o_lat, w_uv)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.v_head_dim))


class DeepseekV32DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, mlp_type: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MlaSelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DeepseekMoE(config) if mlp_type == "sparse" else GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DeepseekV32Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        types = mlp_layer_types(config)
        self.layers = nn.ModuleList(DeepseekV32DecoderLayer(config, i, types[i]) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, config.qk_rope_head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        return self.norm(hidden)


class DeepseekV32ForCausalLM(nn.Module):
    """The engine-facing model: forward -> hidden states, compute_logits -> float32 logits."""

    packed_modules_mapping = {"gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}

    def __init__(self, config):
        super().__init__()
        check_supported(config)
        self.config = config
        self.model = DeepseekV32Model(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        tied = self.model.embed_tokens.weight if self.tie_word_embeddings else None
        self.lm_head = Linear(config.hidden_size, config.vocab_size, weight=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[MlaAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def ignored_checkpoint_tensors(self) -> tuple[str, ...]:
        return ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.tie_word_embeddings else ())

"""DeepSeek-V3 mixture of experts: sigmoid router with group-limited top-k, routed + shared experts.

Routing (identical to DeepSeek-V3/V3.2 and transformers' DeepseekV32TopkRouter), in float32:
  s = sigmoid(x W_g^T); choice = s + e_score_correction_bias (the bias only steers *which* experts)
  groups scored by the sum of their top-2 choice scores; keep the best topk_group groups;
  top num_experts_per_tok experts among those; weights = s of those experts (no bias),
  renormalised when norm_topk_prob, times routed_scaling_factor.
Experts run as one gather/matmul/scatter per expert that received tokens (a loop over experts, not tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_llm.models.layers import Linear, MergedLinear, default_weight_loader, silu_and_mul


def _fp32_parameter(*shape: int) -> nn.Parameter:
    """Router state kept in float32 whatever the model dtype (as transformers keeps it)."""
    param = nn.Parameter(torch.empty(*shape, dtype=torch.float32), requires_grad=False)
    param.weight_loader = default_weight_loader
    return param


class GatedMLP(nn.Module):
    """SwiGLU MLP with fused gate/up (loads the checkpoint's gate_proj/up_proj as two shards)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size})
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class TopkRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        if self.num_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.num_experts} must be divisible by n_group={self.n_group}")
        if self.num_experts // self.n_group < 2:
            raise ValueError(
                f"n_routed_experts / n_group must be >= 2 (groups are scored by their top-2); "
                f"got {self.num_experts}/{self.n_group}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if not 1 <= self.top_k <= self.topk_group * self.num_experts // self.n_group:
            raise ValueError(
                f"num_experts_per_tok={self.top_k} must be in [1, experts in the kept groups="
                f"{self.topk_group * self.num_experts // self.n_group}]"
            )
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.e_score_correction_bias = _fp32_parameter(self.num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (float32 weights [T, top_k], expert ids [T, top_k])."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        per_group = choice.view(-1, self.n_group, self.num_experts // self.n_group)
        group_scores = per_group.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
        keep_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
        expert_mask = group_mask[:, :, None].expand_as(per_group).reshape(-1, self.num_experts)
        ids = choice.masked_fill(~expert_mask, float("-inf")).topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids


class DeepseekMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = TopkRouter(config)
        self.experts = nn.ModuleList(
            GatedMLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = GatedMLP(config.hidden_size, shared) if config.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = torch.zeros_like(x)
        flat_ids = ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=len(self.experts)).tolist()
        tokens = order // ids.shape[1]  # token of each (token, slot) pair, grouped by expert
        flat_weights = weights.flatten()[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = slice(start, start + n)
            y = self.experts[e](x[tokens[sel]]) * flat_weights[sel, None]
            out.index_add_(0, tokens[sel], y.to(out.dtype))
            start += n
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

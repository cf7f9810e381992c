"""Real-looking attention inputs for sparse-attention benchmarks: RoPE locality, attention sinks, a few
retrieval "needles", and heads that differ in how local they are.

Random Gaussian q/k give nearly uniform attention, which no selection method can sparsify and which
no real model produces. Here, per head h:
  k_j = RoPE(mu_h + noise, j),  q_i = RoPE(a_h * mu_h + noise, i)
so q_i · k_j ~ a_h * sum_c |mu_hc|^2 cos((i - j) theta_c): large near the diagonal, averaging out far
away (locality whose sharpness a_h varies per head). The first `sinks` keys get a large component on
the lowest RoPE frequency, which every query also carries, so they are attended from everywhere (the
attention-sink effect); a few random needle keys are made similar to the queries of one head.

Calibration: with the defaults, at 4K tokens XAttention (tau 0.9, stride 8, block 128) reaches 0.70
sparsity and FlexPrefill (gamma 0.9, tau 0.1) 0.57, against 0.72 and 0.52 on the real q/k of SmolLM2
(all 30 layers, 4K tokens of English license texts); the quantiles of sink mass, local-window mass and
top-1% mass of the last 64 queries are close too. But real attention gets sparser with length (SmolLM2
at 8K: 0.82 and 0.71) while this model does not (0.69 at 8K, 0.65 at 16K). `logn_power` > 0 sharpens
queries with their position beyond `logn_base` by (log(pos) / log(logn_base)) ** logn_power;
logn_power = 8 reproduces SmolLM2's XAttention sparsity at both 4K (0.71) and 8K (0.82). How far that
trend extends to 128K is an extrapolation: benchmarks report both profiles (PROFILES).
"""
from __future__ import annotations

import math

import torch


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 500000.0) -> torch.Tensor:
    """Rotate pairs (c, c + D/2) of x [..., S, D] by positions * base^(-2c/D) (Llama's layout)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., : d // 2].float(), x[..., d // 2:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def synthetic_qkv(
    b: int, h: int, hkv: int, s: int, d: int, dtype=torch.bfloat16, device="cpu", seed: int = 0,
    sinks: int = 4, needles: int = 16, sharpness: float = 3.0, sink_k: float = 30.0, sink_q: float = 3.0, needle: float = 0.5, noise: float = 0.8, logn_power: float = 0.0, logn_base: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, S, D], k/v [B, Hkv, S, D] with sinks, locality and needles (see the module docstring)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    gsz = h // hkv
    pos = torch.arange(s, device=device)
    mu = torch.randn(hkv, d, generator=g)  # per KV head, on the fast-rotating channels only
    slow = torch.arange(d) % (d // 2) >= d // 4
    mu = mu.masked_fill(slow, 0.0).to(device)
    sharp = sharpness * (0.3 + 0.7 * torch.rand(h, generator=g)).to(device)  # per query head: how local
    k_raw = mu[None, :, None, :] + noise * torch.randn(b, hkv, s, d, generator=g).to(device)
    q_raw = sharp[None, :, None, None] * mu.repeat_interleave(gsz, 0)[None, :, None, :] + noise * torch.randn(
        b, h, s, d, generator=g
    ).to(device)
    low = torch.zeros(d, device=device)
    low[d // 2 - 1] = 1.0  # the slowest-rotating channel pair
    k_raw[:, :, :sinks] += sink_k * low
    q_raw += sink_q * low
    for _ in range(needles):
        j = int(torch.randint(sinks, s, (1,), generator=g))
        hh = int(torch.randint(0, hkv, (1,), generator=g))
        k_raw[:, hh, j] += needle * mu[hh]
    if logn_power:
        # Queries sharpen with their position beyond logn_base (real attention gets sparser with length).
        gain = (torch.log(pos.float() + 1) / math.log(logn_base)).clamp(min=1.0) ** logn_power
        q_raw = q_raw * gain[None, None, :, None]
    q = rope(q_raw, pos).to(dtype)
    k = rope(k_raw, pos).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v


# Input profiles of the benchmarks: name -> synthetic_qkv keyword arguments.
PROFILES = {
    "flat": {},  # calibrated at 4K, sparsity roughly constant with length
    "length_fitted": {"logn_power": 8.0},  # also fits the 4K -> 8K sparsening of real attention
}

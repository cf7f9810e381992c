"""Batched token sampling with per-row settings: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws from p exactly and lets
each seeded row draw its noise from its own torch.Generator: a seeded request samples the same tokens
whatever else is in the batch. Unseeded rows share the engine's generator in one call.
Logprobs are those of the model's raw distribution (before temperature and filtering), like vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_llm.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling settings of one step, built on the host from the sequences that sample."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)

    @property
    def max_logprobs(self) -> int | None:
        wanted = [p.logprobs for p in self.params if p.logprobs is not None]
        return max(wanted) if wanted else None


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # per row: {token: logprob} for the top-N tokens and the sampled one; None where not asked for
    logprobs: list[dict[int, float] | None]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and outside its top-p nucleus; top_k <= 0 / top_p = 1 mean off."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    remove = ranks >= k
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p[:, None]  # the top token always stays (mass before it is 0)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: float32 [rows, vocab] of the rows that sample this step."""
        n = logits.shape[0]
        greedy_tokens = logits.argmax(dim=-1)
        if batch.all_greedy:
            tokens = greedy_tokens
        else:
            tokens = torch.where(self._greedy_mask(batch), greedy_tokens, self._sample(logits, batch))
        logprobs: list[dict[int, float] | None] = [None] * n
        if batch.max_logprobs is not None:
            logprobs = self._logprobs(logits, tokens, batch)
        return SamplerOutput(tokens.tolist(), logprobs)

    def _greedy_mask(self, batch: SamplingBatch) -> torch.Tensor:
        return torch.tensor([p.greedy for p in batch.params], device=self.device)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        ps = batch.params
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in ps], device=self.device)
        logits = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in ps):
            top_k = torch.tensor([p.top_k for p in ps], device=self.device)
            top_p = torch.tensor([p.top_p for p in ps], device=self.device, dtype=logits.dtype)
            logits = apply_top_k_top_p(logits, top_k, top_p)
        if any(p.min_p > 0 for p in ps):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in ps], device=self.device, dtype=logits.dtype))
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        seeded = [i for i, g in enumerate(batch.generators) if g is not None]
        if len(seeded) < len(ps):
            noise.exponential_(generator=self.generator)
        for i in seeded:
            noise[i].exponential_(generator=batch.generators[i])
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # an exact 0 would turn a filtered token's 0/0 into NaN
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch) -> list[dict[int, float] | None]:
        logp = logits.log_softmax(dim=-1)
        k = batch.max_logprobs
        top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0])
        chosen = logp.gather(-1, tokens[:, None])[:, 0]
        top_vals, top_ids, chosen, tok = top_vals.tolist(), top_ids.tolist(), chosen.tolist(), tokens.tolist()
        out: list[dict[int, float] | None] = []
        for i, p in enumerate(batch.params):
            if p.logprobs is None:
                out.append(None)
                continue
            d = {tok[i]: chosen[i]}
            for t, v in zip(top_ids[i][:p.logprobs], top_vals[i][:p.logprobs]):
                d.setdefault(t, v)
            out.append(d)
        return out

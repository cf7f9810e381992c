"""Sampler: filters against a per-row brute-force reference, distributions, seeds, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from sparse_llm.engine.sampler import Sampler, SamplingBatch, apply_min_p, apply_top_k_top_p
from sparse_llm.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def kept_reference(row: list[float], top_k: int, top_p: float) -> set[int]:
    """Definition: the top_k most likely tokens, then the smallest prefix (by probability) with mass >= top_p."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if top_k > 0:
        order = order[:top_k]
    m = max(row[i] for i in order)
    probs = [math.exp(row[i] - m) for i in order]
    z = sum(probs)
    kept, mass = set(), 0.0
    for i, p in zip(order, probs):
        if mass >= top_p:
            break
        kept.add(i)
        mass += p / z
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_top_p_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    rows, vocab = 7, 53
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    top_k = torch.tensor([0, 1, 5, 0, 17, 53, 3])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.9, 0.3, 0.01], dtype=torch.float64)
    out = apply_top_k_top_p(logits, top_k, top_p)
    for r in range(rows):
        kept = {i for i in range(vocab) if out[r, i] != float("-inf")}
        assert kept == kept_reference(logits[r].tolist(), int(top_k[r]), float(top_p[r])), f"row {r}"
        assert torch.equal(out[r][list(kept)], logits[r][list(kept)])  # kept logits unchanged


def test_min_p_keeps_tokens_above_the_scaled_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    out = apply_min_p(logits, torch.tensor([0.2], dtype=torch.float64))  # threshold 0.1
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, :3]).all()


def sample_many(logits: torch.Tensor, params: SamplingParams, n: int, seed=0) -> torch.Tensor:
    sampler = Sampler(CPU, seed)
    batch = SamplingBatch([params] * n, [None] * n)
    return torch.tensor(sampler(logits.expand(n, -1).contiguous(), batch).token_ids)


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    toks = sample_many(logits, SamplingParams(temperature=0.7), 20000)
    freq = torch.bincount(toks, minlength=5).double() / toks.numel()
    expected = (logits[0].double() / 0.7).softmax(-1)
    assert (freq - expected).abs().max() < 0.015, (freq, expected)


def test_top_k_sampling_renormalises_over_the_kept_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    toks = sample_many(logits, SamplingParams(temperature=1.0, top_k=2), 20000)
    freq = torch.bincount(toks, minlength=5).double() / toks.numel()
    expected = torch.tensor([math.e, 1.0, 0, 0, 0], dtype=torch.float64)
    expected /= expected.sum()
    assert (freq - expected).abs().max() < 0.015 and freq[2:].sum() == 0


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 101, generator=g)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 3
    out = Sampler(CPU, 0)(logits, SamplingBatch(params, [None] * 6))
    for r in range(0, 6, 2):
        assert out.token_ids[r] == int(logits[r].argmax())


def test_a_seeded_row_samples_the_same_tokens_in_any_batch():
    g = torch.Generator().manual_seed(4)
    steps = [torch.randn(1, 211, generator=g) for _ in range(6)]
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def run(batch_size: int, position: int, engine_seed: int) -> list[int]:
        sampler = Sampler(CPU, engine_seed)
        gen = torch.Generator().manual_seed(1234)
        tokens = []
        for logits in steps:
            noise_rows = torch.randn(batch_size, 211, generator=g)
            noise_rows[position] = logits[0]
            params = [SamplingParams(temperature=1.0)] * batch_size
            gens: list = [None] * batch_size
            params[position], gens[position] = p, gen
            tokens.append(sampler(noise_rows, SamplingBatch(params, gens)).token_ids[position])
        return tokens

    alone = run(1, 0, engine_seed=0)
    assert run(5, 3, engine_seed=99) == alone
    assert run(2, 1, engine_seed=7) == alone
    assert len(set(alone)) > 1  # it really samples


def test_logprobs_are_the_raw_distribution_with_the_sampled_token():
    logits = torch.tensor([[3.0, 1.0, 0.0, -2.0], [0.0, 0.0, 5.0, 1.0]])
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0)]
    out = Sampler(CPU, 0)(logits, SamplingBatch(params, [None, None]))
    ref = logits[0].log_softmax(-1)
    assert set(out.logprobs[0]) == {0, 1}
    assert out.logprobs[0][0] == pytest.approx(float(ref[0]), abs=1e-6)
    assert out.logprobs[0][1] == pytest.approx(float(ref[1]), abs=1e-6)
    assert out.logprobs[1] is None


def test_logprobs_include_a_sampled_token_outside_the_top_n():
    logits = torch.tensor([[5.0, 4.0, 3.0]])
    params = [SamplingParams(temperature=1.0, top_k=0, logprobs=0, seed=0)]
    # Force the sampled token by a generator whose noise favours the last token: sample until it is drawn.
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        out = Sampler(CPU, 0)(logits, SamplingBatch(params, [gen]))
        if out.token_ids[0] == 2:
            assert set(out.logprobs[0]) == {2}
            assert out.logprobs[0][2] == pytest.approx(float(logits[0].log_softmax(-1)[2]), abs=1e-6)
            return
    pytest.fail("token 2 was never sampled")

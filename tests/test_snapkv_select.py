"""SnapKV / Ada-SnapKV selection vs loop references (float64, GQA, odd lengths) and RocketKV's own selection."""
from __future__ import annotations

import math

import pytest
import torch

from sparse_llm.backends.rocket_select import prompt_keep_indices
from sparse_llm.backends.snapkv_select import ada_keep, snapkv_keep, window_scores


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def scores_loop(q_window, k, scale, kernel_size, pooling):
    """Per KV head, per query head of its group, per window query: a causal softmax; summed, then pooled by hand."""
    W, H, D = q_window.shape
    L, Hkv, _ = k.shape
    G, prefix = H // Hkv, L - W
    out = torch.zeros(Hkv, prefix, dtype=torch.float64)
    for h in range(Hkv):
        raw = [0.0] * prefix
        for g in range(G):
            for w in range(W):
                pos = L - W + w
                logits = torch.tensor([float(q_window[w, h * G + g] @ k[j, h]) * scale for j in range(pos + 1)])
                p = torch.softmax(logits, 0)
                for j in range(prefix):
                    raw[j] += float(p[j])
        r = kernel_size // 2
        for j in range(prefix):
            win = [raw[i] if 0 <= i < prefix else None for i in range(j - r, j + r + 1)]
            if pooling == "max":
                out[h, j] = max(x for x in win if x is not None)
            else:
                out[h, j] = sum(x for x in win if x is not None) / kernel_size  # zero padding counts
    return out


@pytest.mark.parametrize("H,Hkv,L,W,ks,pooling", [(6, 2, 23, 4, 3, "max"), (4, 4, 19, 3, 5, "avg"), (8, 1, 17, 5, 1, "max")])
def test_window_scores_match_loop_reference(H, Hkv, L, W, ks, pooling):
    g = torch.Generator().manual_seed(L)
    q, k = rand(g, W, H, 8), rand(g, L, Hkv, 8)
    torch.testing.assert_close(window_scores(q, k, 0.4, ks, pooling), scores_loop(q, k, 0.4, ks, pooling))


def test_snapkv_max_pooling_is_rocketkv_prompt_selection():
    g = torch.Generator().manual_seed(1)
    for L, budget in [(41, 13), (30, 29), (25, 6)]:
        q, k = rand(g, 4, 6, 8), rand(g, L, 2, 8)
        keep = snapkv_keep(window_scores(q, k, 0.35, 5, "max"), budget, 4)
        assert torch.equal(keep, prompt_keep_indices(q, k, 0.35, 5, budget))


def ada_loop(score, budget, window, alpha):
    """Reference allocation: each head's top floor, then a greedy pass over (score desc, head, position)."""
    Hkv, prefix = score.shape
    share = budget - window
    floor = int(alpha * share)
    chosen = [set() for _ in range(Hkv)]
    for h in range(Hkv):
        order = sorted(range(prefix), key=lambda j: (-float(score[h, j]), j))
        chosen[h].update(order[:floor])
    rest = sorted(((-float(score[h, j]), h, j) for h in range(Hkv) for j in range(prefix) if j not in chosen[h]))
    for _, h, j in rest[: Hkv * (share - floor)]:
        chosen[h].add(j)
    return [sorted(c) + list(range(prefix, prefix + window)) for c in chosen]


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_ada_allocation_matches_reference(alpha):
    g = torch.Generator().manual_seed(7)
    Hkv, prefix, W, budget = 3, 37, 4, 15
    score = torch.rand(Hkv, prefix, generator=g, dtype=torch.float64) * torch.tensor([[1.0], [3.0], [0.2]])
    score[1, 5] = score[1, 6] = score[0, 9]  # ties: lower head, then earlier position
    keep, lens = ada_keep(score, budget, W, alpha)
    ref = ada_loop(score, budget, W, alpha)
    assert lens.tolist() == [len(r) for r in ref] and int(lens.sum()) == Hkv * budget
    assert int(lens.min()) >= W + int(alpha * (budget - W))  # every head keeps its floor and the window
    for h in range(Hkv):
        assert keep[h, : lens[h]].tolist() == ref[h]
        assert (keep[h, lens[h]:] == -1).all()
    assert keep.shape[1] == int(lens.max())
    if alpha == 1.0:
        assert torch.equal(keep, snapkv_keep(score, budget, W))
    if alpha == 0.0:
        assert int(lens.max()) > budget  # the head with the large scores takes more than its share


def test_selection_errors_name_the_value():
    q, k = torch.zeros(4, 2, 8), torch.zeros(10, 2, 8)
    with pytest.raises(ValueError, match=r"pooling='mean': allowed \['max', 'avg'\]"):
        window_scores(q, k, 1.0, 3, "mean")
    with pytest.raises(ValueError, match="kernel_size=4: must be odd"):
        window_scores(q, k, 1.0, 4, "max")
    score = torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"window \(4\) < prompt_budget \(10\) < prompt length \(10\)"):
        snapkv_keep(score, 10, 4)
    with pytest.raises(ValueError, match="floor_alpha=1.5: must be in"):
        ada_keep(score, 8, 4, 1.5)
    assert not math.isnan(float(window_scores(q, k, 1.0, 3, "avg").sum()))

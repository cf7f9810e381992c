"""RocketKV's selection steps (backends/rocket_select.py) against straightforward loop references, float64."""
from __future__ import annotations

import math

import pytest
import torch

from sparse_llm.backends.rocket_select import page_minmax, prompt_keep_indices, select_pages


def loop_keep_indices(q_win, k, scale, kernel_size, budget):
    W, H, D = q_win.shape
    L, Hkv, _ = k.shape
    G, prefix, r = H // Hkv, L - W, kernel_size // 2
    out = []
    for h in range(Hkv):
        score = [0.0] * prefix
        for g in range(G):
            for w in range(W):
                last = L - W + w  # the query's position: it sees keys 0..last
                logits = [float(q_win[w, h * G + g] @ k[j, h]) * scale for j in range(last + 1)]
                m = max(logits)
                z = sum(math.exp(x - m) for x in logits)
                for j in range(prefix):
                    score[j] += math.exp(logits[j] - m) / z
        pooled = [max(score[max(0, j - r):j + r + 1]) for j in range(prefix)]
        top = sorted(sorted(range(prefix), key=lambda j: (-pooled[j], j))[:budget - W])
        out.append(top + list(range(prefix, L)))
    return torch.tensor(out)


@pytest.mark.parametrize("L,W,budget,ks,H,Hkv", [(37, 5, 16, 7, 6, 2), (23, 3, 9, 3, 3, 3), (41, 8, 25, 5, 4, 1)])
def test_prompt_keep_indices_match_loop(L, W, budget, ks, H, Hkv):
    g = torch.Generator().manual_seed(L)
    q = torch.randn(W, H, 8, generator=g, dtype=torch.float64)
    k = torch.randn(L, Hkv, 8, generator=g, dtype=torch.float64)
    got = prompt_keep_indices(q, k, 0.3, ks, budget)
    assert got.shape == (Hkv, budget)
    assert torch.equal(got, loop_keep_indices(q, k, 0.3, ks, budget))
    assert (got.diff(dim=-1) > 0).all()  # sorted, no repeats


def test_prompt_keep_indices_rejects_bad_budget():
    with pytest.raises(ValueError, match="prompt_budget"):
        prompt_keep_indices(torch.zeros(4, 2, 8), torch.zeros(10, 1, 8), 1.0, 3, 12)


def test_page_minmax_masks_invalid_tokens():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 12, 3, 5, generator=g, dtype=torch.float64)
    valid = torch.arange(12)[None, :] < torch.tensor([[11], [6]])
    kmin, kmax = page_minmax(k, valid, 4)
    for b, n in enumerate([11, 6]):
        for p in range(3):
            toks = [t for t in range(p * 4, p * 4 + 4) if t < n]
            if toks:
                assert torch.equal(kmin[b, p], k[b, toks].amin(0))
                assert torch.equal(kmax[b, p], k[b, toks].amax(0))
            else:
                assert (kmin[b, p] == math.inf).all() and (kmax[b, p] == -math.inf).all()


def loop_select(q, kmin, kmax, num_pages, topr, topk, scale):
    B, H, D = q.shape
    P, Hkv = kmin.shape[1], kmin.shape[2]
    G = H // Hkv
    out = torch.zeros(B, Hkv, P, dtype=torch.bool)
    for b in range(B):
        last = int(num_pages[b]) - 1
        for h in range(Hkv):
            heads = range(h * G, h * G + G)
            mag = [sum(abs(float(q[b, i, c])) for i in heads) for c in range(D)]
            chans = sorted(range(D), key=lambda c: -mag[c])[:topr]
            total = [0.0] * last
            for i in heads:
                s = [scale * sum(max(float(q[b, i, c] * kmin[b, p, h, c]), float(q[b, i, c] * kmax[b, p, h, c]))
                                 for c in chans) for p in range(last)]
                if s:
                    m = max(s)
                    z = sum(math.exp(x - m) for x in s)
                    total = [t + math.exp(x - m) / z for t, x in zip(total, s)]
            for p in sorted(range(last), key=lambda p: -total[p])[:topk]:
                out[b, h, p] = True
            out[b, h, last] = True
    return out


@pytest.mark.parametrize("topr,topk", [(3, 2), (8, 5), (5, 100)])
def test_select_pages_match_loop(topr, topk):
    g = torch.Generator().manual_seed(topr * 7 + topk)
    B, H, Hkv, D, P = 4, 6, 2, 8, 9
    q = torch.randn(B, H, D, generator=g, dtype=torch.float64)
    a = torch.randn(B, P, Hkv, D, generator=g, dtype=torch.float64)
    b = torch.randn(B, P, Hkv, D, generator=g, dtype=torch.float64)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    num_pages = torch.tensor([9, 1, 4, 7])
    got = select_pages(q, kmin, kmax, num_pages, topr, topk, 0.35)
    assert torch.equal(got, loop_select(q, kmin, kmax, num_pages, topr, topk, 0.35))
    assert not got[1, :, 1:].any()  # nothing past a sequence's pages

"""Each estimator's selection against a straightforward (loop-based) implementation of the same rule."""
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.sparse.flexprefill import flexprefill_block_mask
from sparse_llm.sparse.last_queries import diagonal_sums
from sparse_llm.sparse.quest import page_minmax, page_scores, select_pages
from sparse_llm.sparse.vertical_slash import vertical_slash_indices, vertical_slash_masks
from sparse_llm.sparse.xattention import antidiagonal_block_mass, select_blocks_by_mass, xattention_block_mask


def qkv(b, h, hkv, sq, sk, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    k[:, :, :3] *= 3.0  # a few strong keys, as real sinks are
    return q, k


def naive_last_query_attention(q, k, scale, n):
    """A[b, h, i, j] for the last n queries, one softmax per row."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    a = torch.zeros(b, h, n, sk, dtype=torch.float64)
    for bb in range(b):
        for hh in range(h):
            for i in range(n):
                p = sk - n + i
                s = torch.tensor([float(q[bb, hh, sq - n + i] @ k[bb, hh // (h // hkv), j]) * scale for j in range(p + 1)], dtype=torch.float64)
                a[bb, hh, i, :p + 1] = torch.softmax(s, 0)
    return a


# ---------------------------------------------------------------- XAttention
def naive_xattention(q, k, scale, stride, bs, threshold):
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    q0 = sk - sq
    qb0, nkb = q0 // bs, -(-sk // bs)
    nqb = (sk - 1) // bs - qb0 + 1
    gpb = bs // stride

    def qvec(bb, hh, pos):
        return q[bb, hh, pos - q0] if q0 <= pos < sk else torch.zeros(d, dtype=q.dtype)

    def kvec(bb, hh, pos):
        return k[bb, hh // (h // hkv), pos] if pos < sk else torch.zeros(d, dtype=k.dtype)

    mass = torch.zeros(b, h, nqb, nkb, dtype=torch.float64)
    for bb in range(b):
        for hh in range(h):
            for m in range(nqb):
                for gi in range((qb0 + m) * gpb, (qb0 + m + 1) * gpb):
                    if not (gi * stride + stride > q0 and gi * stride < sk):
                        continue  # a group with no real query
                    cols = [j for j in range(gi + 1) if j * stride < sk]
                    s = torch.tensor([
                        sum(float(qvec(bb, hh, gi * stride + stride - 1 - t) @ kvec(bb, hh, j * stride + t)) for t in range(stride))
                        * scale / stride for j in cols
                    ], dtype=torch.float64)
                    p = torch.softmax(s, 0)
                    for j, pj in zip(cols, p):
                        mass[bb, hh, m, j // gpb] += pj
    mask = torch.zeros(b, h, nqb, nkb, dtype=torch.bool)
    for bb in range(b):
        for hh in range(h):
            for m in range(nqb):
                row, ma = mass[bb, hh, m], qb0 + m
                forced = {0, ma}
                kept = sum(float(row[j]) for j in forced)
                for j in forced:
                    mask[bb, hh, m, j] = True
                others = sorted((j for j in range(ma + 1) if j not in forced), key=lambda j: -float(row[j]))
                need = threshold[hh] * float(row[:ma + 1].sum())
                for j in others:
                    if kept >= need:
                        break
                    mask[bb, hh, m, j] = True
                    kept += float(row[j])
    return mass, mask, qb0


@pytest.mark.parametrize("b,h,hkv,sq,sk,d,stride,bs,thr", [
    (1, 2, 1, 40, 40, 8, 4, 8, 0.9),
    (2, 3, 3, 13, 37, 8, 2, 8, [0.5, 0.8, 0.95]),  # chunk of a longer prompt; per-head thresholds
])
def test_xattention_matches_loop_reference(b, h, hkv, sq, sk, d, stride, bs, thr):
    q, k = qkv(b, h, hkv, sq, sk, d, seed=sq + sk)
    scale = d**-0.5
    thr_list = thr if isinstance(thr, list) else [thr] * h
    ref_mass, ref_mask, ref_qb0 = naive_xattention(q, k, scale, stride, bs, thr_list)
    mass, qb0 = antidiagonal_block_mass(q, k, scale, stride, bs)
    assert qb0 == ref_qb0
    torch.testing.assert_close(mass, ref_mass, rtol=1e-9, atol=1e-9)
    mask, _ = xattention_block_mask(q, k, scale, thr, stride, bs, use_triton=False)
    assert torch.equal(mask, ref_mask)
    assert mask[..., 0].all() and not mask.all()  # sink kept, something dropped


def test_xattention_triton_estimate_matches_torch():
    from sparse_llm.kernels.xattention_estimate import antidiagonal_block_mass_triton

    q, k = qkv(2, 4, 2, 50, 83, 16, seed=1)
    q, k = q.float(), k.float()
    ref, qb0 = antidiagonal_block_mass(q.double(), k.double(), 0.25, 4, 16)
    got, qb0_t = antidiagonal_block_mass_triton(q, k, 0.25, 4, 16)
    assert qb0 == qb0_t
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)


def test_xattention_threshold_validation_and_forced_blocks():
    mass = torch.rand(1, 2, 3, 3)
    with pytest.raises(ValueError, match="one per query head"):
        xattention_block_mask(torch.zeros(1, 2, 8, 8), torch.zeros(1, 1, 8, 8), 1.0, [0.9, 0.9, 0.9], 4, 8)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        xattention_block_mask(torch.zeros(1, 2, 8, 8), torch.zeros(1, 1, 8, 8), 1.0, 1.5, 4, 8)
    sel = select_blocks_by_mass(mass, 0, torch.tensor([1e-9, 1e-9]))
    assert torch.equal(sel[0, 0], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool))


# ---------------------------------------------------------------- FlexPrefill
def naive_flexprefill(q, k, scale, gamma, tau, min_budget, bs):
    """The reference algorithm (FlexPrefill's get_active_blocks), written with loops over heads."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    assert sq == sk
    nb = -(-sk // bs)
    n = min(bs, sq)
    a = naive_last_query_attention(q, k, scale, n)
    min_b = math.ceil(min_budget / bs)
    mask = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    aware = torch.zeros(b, h, dtype=torch.bool)
    for bb in range(b):
        for hh in range(h):
            kk = k[bb, hh // (h // hkv)]
            vert = a[bb, hh].mean(0)
            slash = torch.zeros(sk, dtype=torch.float64)
            for i in range(n):
                p = sk - n + i
                for dist in range(p + 1):
                    slash[dist] += a[bb, hh, i, p - dist] / n

            def cover(x):
                c = torch.cumsum(torch.sort(x, descending=True).values, 0)
                return int((c <= gamma).sum()) + 1

            nv = min(max(cover(vert) // bs + 1, min_b), nb)
            ns = min(max(cover(slash) // bs + 1, min_b), nb)
            vb = torch.tensor([float(vert[j * bs:(j + 1) * bs].sum()) for j in range(nb)], dtype=torch.float64)
            sb = torch.tensor([float(slash[j * bs:(j + 1) * bs].sum()) for j in range(nb)], dtype=torch.float64)
            mk = torch.stack([kk[j * bs:(j + 1) * bs].mean(0) for j in range(nb)])
            mq = q[bb, hh, sq - n:].mean(0)
            est = torch.softmax(mk @ mq * scale, 0)
            mid = (est + vb) / 2
            js = sum(0.5 * float(x * math.log(x / y)) for x, y in zip(est, mid) if x > 0) + \
                sum(0.5 * float(x * math.log(x / y)) for x, y in zip(vb, mid) if x > 0)
            qa = math.sqrt(max(js, 0.0)) < tau
            aware[bb, hh] = qa
            if qa:
                nv = ns = min_b
            vb[0] = sb[0] = float("inf")
            vsel = torch.argsort(vb, descending=True, stable=True)[:nv].tolist()
            ssel = torch.argsort(sb, descending=True, stable=True)[:ns].tolist()
            for m in range(nb):
                for v in vsel:
                    if v <= m:
                        mask[bb, hh, m, v] = True
                for s in ssel:
                    if m - s >= 0:
                        mask[bb, hh, m, m - s] = True
            if qa:
                pq = torch.stack([q[bb, hh, m * bs:(m + 1) * bs].mean(0) for m in range(nb)])
                att = torch.full((nb, nb), float("-inf"), dtype=torch.float64)
                for m in range(nb):
                    att[m, :m + 1] = torch.softmax(mk[:m + 1] @ pq[m] * scale, 0)
                att = att.clamp(min=0).view(-1)
                vals, order = torch.sort(att, descending=True)
                keep = order[torch.cumsum(vals, 0) <= gamma * nb].tolist() + [0]
                for f in keep:
                    mask[bb, hh, f // nb, f % nb] = True
    return mask, aware


@pytest.mark.parametrize("tau", [0.0, 0.1, 1.0])
def test_flexprefill_matches_loop_reference(tau):
    q, k = qkv(1, 4, 2, 90, 90, 8, seed=7)
    q[:, 1] *= 0.05  # a head with flat attention: the pooled estimate is faithful there
    scale = 8**-0.5
    mask, qb0, aware = flexprefill_block_mask(q, k, scale, gamma=0.8, tau=tau, min_budget=16, block_size=8)
    ref_mask, ref_aware = naive_flexprefill(q, k, scale, 0.8, tau, 16, 8)
    assert qb0 == 0
    assert torch.equal(aware, ref_aware)
    assert torch.equal(mask, ref_mask)
    if tau == 0.0:
        assert not aware.any()
    if tau == 1.0:
        assert aware.all()  # sqrt(JS) <= sqrt(ln 2) < 1
    assert not mask.all()


def test_flexprefill_short_sequences_are_dense():
    q, k = qkv(1, 2, 1, 20, 20, 8, seed=2)
    mask, _, _ = flexprefill_block_mask(q, k, 0.3, min_budget=16, block_size=8)
    assert torch.equal(mask[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())


# ---------------------------------------------------------------- vertical-slash
def test_diagonal_sums_match_loops():
    a = torch.rand(2, 3, 5, 11, dtype=torch.float64)
    out = diagonal_sums(a)
    ref = torch.zeros(2, 3, 11, dtype=torch.float64)
    for i in range(5):
        p = 11 - 5 + i
        for dist in range(p + 1):
            ref[..., dist] += a[..., i, p - dist]
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("sq,sk", [(70, 70), (30, 75)])
def test_vertical_slash_matches_loop_reference(sq, sk):
    q, k = qkv(1, 2, 1, sq, sk, 8, seed=sq)
    scale, bs, n, vsize, ssize, sink, local = 8**-0.5, 16, 12, 9, 6, 3, 4
    v_idx, s_idx = vertical_slash_indices(q, k, scale, vsize, ssize, n, sink, local)
    a = naive_last_query_attention(q, k, scale, n)
    qb0, nkb = (sk - sq) // bs, -(-sk // bs)
    nqb = (sk - 1) // bs - qb0 + 1
    blocks, qb0_got, cols = vertical_slash_masks(v_idx, s_idx, sq, sk, bs)
    assert qb0_got == qb0
    for hh in range(2):
        vert = a[0, hh].sum(0)
        vert[:sink] = float("inf")
        slash = torch.zeros(sk, dtype=torch.float64)
        for i in range(n):
            p = sk - n + i
            for dist in range(p + 1):
                slash[dist] += a[0, hh, i, p - dist]
        slash[:local] = float("inf")
        assert v_idx[0, hh].tolist() == sorted(torch.topk(vert, vsize).indices.tolist())
        assert set(s_idx[0, hh].tolist()) == set(torch.topk(slash, ssize).indices.tolist())
        for m in range(nqb):
            rows = range((qb0 + m) * bs, (qb0 + m + 1) * bs)
            want = set()
            for dist in s_idx[0, hh].tolist():
                want |= {(p - dist) // bs for p in rows if p - dist >= 0}
            assert set(blocks[0, hh, m].nonzero()[:, 0].tolist()) == want
            want_cols = [c for c in v_idx[0, hh].tolist() if c < min((qb0 + m + 1) * bs, sk) and c // bs not in want]
            assert v_idx[0, hh][cols[0, hh, m]].tolist() == want_cols
    assert blocks.shape == (1, 2, nqb, nkb)


# ---------------------------------------------------------------- Quest
def test_quest_scores_and_selection_match_loops():
    g = torch.Generator().manual_seed(4)
    n, h, hkv, d, page, budget = 3, 4, 2, 8, 4, 3
    lens = [5, 23, 12]
    k = torch.randn(n, 24, hkv, d, generator=g, dtype=torch.float64)
    q = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    mins, maxs = zip(*(page_minmax(k[i], page, lens[i]) for i in range(n)))
    p_max = max(m.shape[0] for m in mins)
    kmin = torch.stack([torch.nn.functional.pad(m, (0, 0, 0, 0, 0, p_max - m.shape[0])) for m in mins])
    kmax = torch.stack([torch.nn.functional.pad(m, (0, 0, 0, 0, 0, p_max - m.shape[0])) for m in maxs])
    scores = page_scores(q, kmin, kmax)
    n_pages = torch.tensor([-(-x // page) for x in lens])
    sel = select_pages(scores, n_pages, budget)
    for i in range(n):
        for hh in range(h):
            ref_scores = []
            for pg in range(int(n_pages[i])):
                keys = k[i, pg * page:min((pg + 1) * page, lens[i]), hh // 2]
                lo, hi = keys.min(0).values, keys.max(0).values
                ref_scores.append(float(torch.maximum(q[i, hh] * lo, q[i, hh] * hi).sum()))
                assert float(scores[i, hh, pg]) == pytest.approx(ref_scores[-1], rel=1e-5)
            npg = int(n_pages[i])
            if npg <= budget:
                want = set(range(npg))
            else:
                others = sorted(range(npg - 1), key=lambda p: -ref_scores[p])[:budget - 1]
                want = set(others) | {npg - 1}
            assert set(sel[i, hh].nonzero()[:, 0].tolist()) == want


def test_quest_triton_scores_match_torch_on_paged_minmax():
    from sparse_llm.kernels.quest_scores import quest_scores_paged
    from sparse_llm.sparse.quest import mask_scores

    g = torch.Generator().manual_seed(9)
    n, h, hkv, d, ppb, page = 3, 6, 2, 16, 2, 4
    lens = torch.tensor([5, 61, 30], dtype=torch.int32)
    max_pages = -(-int(lens.max()) // page)
    blocks = 30
    mm = torch.randn(blocks, ppb, 2, hkv, d, generator=g)
    mm[:, :, 1] = mm[:, :, 0] + mm[:, :, 1].abs()  # max >= min
    tables = torch.randperm(blocks, generator=g)[: n * 8].view(n, 8).to(torch.int32)
    q = torch.randn(n, h, d, generator=g)
    got = quest_scores_paged(q, mm, tables, lens, page, max_pages)
    pages = torch.arange(max_pages)
    gathered = mm[tables.long()[:, pages // ppb], pages % ppb]  # [N, P, 2, Hkv, D]
    ref = mask_scores(page_scores(q.double(), gathered[:, :, 0].double(), gathered[:, :, 1].double()),
                      (lens + page - 1) // page)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.equal(got[torch.isinf(got)], ref[torch.isinf(ref)].float())
    fin = ~torch.isinf(ref)
    torch.testing.assert_close(got[fin].double(), ref[fin], rtol=1e-5, atol=1e-5)

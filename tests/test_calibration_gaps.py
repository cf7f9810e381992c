"""One dense pass of gaps predicts the skip-softmax decisions for every factor exactly."""
import math

import pytest
import torch

from sparse_llm.calibration.collect import GapCollector, GapHistogram
from sparse_llm.calibration.fit import fit_phase
from sparse_llm.calibration.gaps import TileGeometry, decode_tile_gaps, prefill_tile_gaps, sparsity_at


def simulate_prefill_skips(q, k, scale, bm, bn, factor):
    """Straight loop over (head, query tile, KV tile) applying the rule as a kernel would: skipped tiles do not
    update the running max. Returns (skipped, total) processed tiles."""
    lq, h, _ = q.shape
    L, hkv, _ = k.shape
    g = h // hkv
    lam = factor / L
    skipped = total = 0
    off = L - lq
    for head in range(h):
        s_all = (q[:, head].double() @ k[:, head // g].double().T) * scale
        for q0 in range(0, lq, bm):
            rows = torch.arange(q0, min(q0 + bm, lq))
            last = int(rows[-1]) + off
            m = torch.full((len(rows),), -math.inf, dtype=torch.float64)
            for t, k0 in enumerate(range(0, last + 1, bn)):
                keys = torch.arange(k0, min(k0 + bn, L))
                s = s_all[rows][:, keys].clone()
                s[keys[None, :] > (rows[:, None] + off)] = -math.inf
                rowmax = s.amax(1)
                total += 1
                if t > 0 and lam < 1 and bool((torch.exp(rowmax - m) < lam).all()):
                    skipped += 1
                    continue
                m = torch.maximum(m, rowmax)
    return skipped, total


@pytest.mark.parametrize("lq,L,h,hkv", [(37, 37, 4, 2), (19, 53, 3, 1), (50, 50, 6, 3)])
def test_prefill_gaps_predict_every_factor(lq, L, h, hkv):
    torch.manual_seed(lq * 7 + L)
    d, bm, bn = 16, 8, 8
    q, k = torch.randn(lq, h, d) * 2, torch.randn(L, hkv, d) * 2
    k[0] *= 4  # a sink-like key makes skips likely
    gaps = prefill_tile_gaps(q, k, d**-0.5, TileGeometry(bm, bn, 8))
    hit_some = False
    for factor in (0.0, 0.5, 2.0, 5.0, 12.0, float(L) * 2):
        skipped, total = simulate_prefill_skips(q, k, d**-0.5, bm, bn, factor)
        assert gaps.numel() == total
        expected = skipped / total
        got = sparsity_at(gaps, factor) if factor < L else 0.0
        assert got == pytest.approx(expected, abs=1e-12), factor
        hit_some |= skipped > 0
    assert hit_some


def test_decode_gaps_vote_over_the_group_and_reset_per_split():
    torch.manual_seed(0)
    h, hkv, d, L, bn, split = 6, 2, 16, 70, 8, 3
    q, k = torch.randn(h, d) * 3, torch.randn(L, hkv, d) * 3
    gaps = decode_tile_gaps(q, k, d**-0.5, bn, split)
    n_tiles = math.ceil(L / bn)
    assert gaps.numel() == hkv * n_tiles
    # Loop oracle
    factor = 6.0
    lam = factor / L
    skipped = 0
    for kh in range(hkv):
        s = (q[kh * 3:(kh + 1) * 3].double() @ k[:, kh].double().T) * d**-0.5  # [G, L]
        for s0 in range(0, n_tiles, split):
            m = torch.full((3,), -math.inf, dtype=torch.float64)
            for t in range(s0, min(s0 + split, n_tiles)):
                rowmax = s[:, t * bn:min((t + 1) * bn, L)].amax(1)
                if t > s0 and bool((torch.exp(rowmax - m) < lam).all()):
                    skipped += 1
                    continue
                m = torch.maximum(m, rowmax)
    assert sparsity_at(gaps, factor) == pytest.approx(skipped / gaps.numel())


def test_histogram_matches_exact_sparsity_and_fit_recovers_curve():
    torch.manual_seed(1)
    col = GapCollector(TileGeometry(8, 8, 8))
    for lb, L in ((0, 96), (1, 160)):
        col.length_bin = lb
        q, k = torch.randn(L, 4, 16) * 2, torch.randn(L, 2, 16) * 2
        k[:2] *= 3
        gaps = prefill_tile_gaps(q, k, 0.25, col.geometry)
        col.add(0, "prefill", gaps, L)
        h = col.merged("prefill", lb)
        for f in (0.3, 3.0, 30.0):
            assert h.sparsity(f) == pytest.approx(sparsity_at(gaps, f), abs=0.02)
    fit = fit_phase(col, "prefill", factors=[float(x) for x in torch.logspace(-3, 2, 200)])
    assert fit.b > 0 and 0.5 < fit.r2 <= 1.0
    # the fitted factor lands near the requested sparsity on the calibration data
    mid = (fit.s_min + fit.s_max) / 2
    assert fit.s_max - fit.s_min > 0.2
    s = col.merged("prefill").sparsity(fit.factor(mid))
    assert abs(s - mid) < 0.1


def test_too_few_points_says_what_to_widen():
    col = GapCollector(TileGeometry(8, 8, 8))
    col.add(0, "prefill", torch.tensor([math.inf, 1.0, 1.0]), 64)
    with pytest.raises(ValueError, match="widen"):
        fit_phase(col, "prefill")
    with pytest.raises(ValueError, match="no decode attention"):
        fit_phase(col, "decode")
    assert GapHistogram().sparsity(1.0) is None


def test_gaps_agree_with_the_skip_softmax_reference_backend():
    """Calibration and deployment must cut the same tiles: compare with the kernels' torch oracle."""
    from sparse_llm.backends.skip_softmax_torch import skip_softmax_decode_reference, skip_softmax_prefill_reference

    torch.manual_seed(3)
    lq, L, h, hkv, d, bm, bn = 45, 77, 6, 2, 16, 16, 8
    q, k, v = torch.randn(lq, h, d) * 2, torch.randn(L, hkv, d) * 2, torch.randn(L, hkv, d)
    k[0] *= 4
    gaps = prefill_tile_gaps(q, k, d**-0.5, TileGeometry(bm, bn, 8))
    for factor in (1.0, 4.0, 20.0):
        _, total, skipped = skip_softmax_prefill_reference(q.double(), k.double(), v.double(), d**-0.5,
                                                           math.log(factor / L), bm, bn)
        assert total == gaps.numel()
        assert skipped == int((gaps < math.log(factor)).sum())
    qd = torch.randn(1, h, d) * 3
    split = 3
    gd = decode_tile_gaps(qd[0], k, d**-0.5, bn, split)
    _, counts = skip_softmax_decode_reference(qd.double(), k[None].double(), v[None].double(), torch.tensor([L]),
                                              d**-0.5, torch.tensor([math.log(6.0 / L)]), split, bn)
    assert int(counts[0, 0]) == gd.numel()
    assert int(counts[0, 1]) == int((gd < math.log(6.0)).sum())

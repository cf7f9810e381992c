"""One dense pass of gaps predicts the skip-softmax decisions for every factor exactly."""
import math

import pytest
import torch

from sparse_llm.calibration.collect import GapCollector, GapHistogram
from sparse_llm.calibration.fit import fit_phase
from sparse_llm.calibration.gaps import TileGeometry, decode_tile_gaps, prefill_tile_gaps, sparsity_at


def skip_build_order(first_pos, last_pos, bn):
    """The skip build's KV tile order for a query tile with rows at first_pos..last_pos, written out literally:
    tile 0, the tiles the causal mask cuts, then the fully visible ones nearest first."""
    n, full = last_pos // bn + 1, (first_pos + 1) // bn
    return list(range(n)) if full == 0 else [0] + list(range(full, n)) + list(range(full - 1, 0, -1))


def simulate_prefill_skips(q, k, scale, bm, bn, factor):
    """Straight loop over (head, query tile, KV tile) applying the rule as a kernel would: skipped tiles do not
    update the running max; tiles in the skip build's order. Returns (skipped, total) processed tiles."""
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
            for t, j in enumerate(skip_build_order(int(rows[0]) + off, last, bn)):
                keys = torch.arange(j * bn, min(j * bn + bn, L))
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


def test_decode_gaps_vote_over_the_group_and_seed_every_split_with_the_sink():
    torch.manual_seed(0)
    h, hkv, d, L, bn, split = 6, 2, 16, 70, 8, 3
    q, k = torch.randn(h, d) * 3, torch.randn(L, hkv, d) * 3
    k[0] = q.view(hkv, 3, d).mean(1) * 2  # a sink key
    gaps = decode_tile_gaps(q, k, d**-0.5, bn, split)
    n_tiles = math.ceil(L / bn)
    assert gaps.numel() == hkv * n_tiles
    # Loop oracle
    factor = 6.0
    lam = factor / L
    skipped = split_firsts_skipped = 0
    for kh in range(hkv):
        s = (q[kh * 3:(kh + 1) * 3].double() @ k[:, kh].double().T) * d**-0.5  # [G, L]
        for s0 in range(0, n_tiles, split):
            m = s[:, :bn].amax(1)  # the sink seed: tile 0's row max
            for t in range(s0, min(s0 + split, n_tiles)):
                rowmax = s[:, t * bn:min((t + 1) * bn, L)].amax(1)
                if t > 0 and bool((torch.exp(rowmax - m) < lam).all()):
                    skipped += 1
                    split_firsts_skipped += t == s0
                    continue
                m = torch.maximum(m, rowmax)
    assert split_firsts_skipped > 0
    assert sparsity_at(gaps, factor) == pytest.approx(skipped / gaps.numel(), abs=1e-12)


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
        fs = [0.0, 0.3, 3.0, 30.0, float(L)]
        want = [h.sparsity(f) if f < L else None for f in fs]
        got = h.sparsity_many(fs)
        assert [None if math.isnan(x) else x for x in got] == pytest.approx(want, abs=1e-12)
    fit = fit_phase(col, "prefill", 0.1, 0.9, factors=[float(x) for x in torch.logspace(-3, math.log10(95), 300)],
                    cap_target=None)
    assert fit.b > 0 and 0.5 < fit.r2 <= 1.0
    # the fitted factor lands near the requested sparsity, averaged over the two lengths
    mid = (fit.s_min + fit.s_max) / 2
    assert fit.s_max - fit.s_min > 0.2
    s = (col.merged("prefill", 0).sparsity(fit.factor(mid)) + col.merged("prefill", 1).sparsity(fit.factor(mid))) / 2
    assert abs(s - mid) < 0.1


def test_fit_targets_the_mean_over_lengths_weighted_by_prompts_not_tiles():
    """A short bin with few tiles and a long bin with many: the target must hold on average over the bins
    (what a user sending both lengths sees); tile weighting would let the long bin decide."""
    g = torch.Generator().manual_seed(0)
    col = GapCollector()
    col.length_bin = 1000
    col.add(0, "prefill", torch.rand(2000, generator=g, dtype=torch.float64) * 6 - 2, 1000)  # s(f) = (ln f + 2) / 6
    col.length_bin = 4000
    col.add(0, "prefill", torch.rand(200000, generator=g, dtype=torch.float64) * 6, 4000)  # s(f) = ln f / 6
    col.samples[("prefill", 1000)] = col.samples[("prefill", 4000)] = 3
    fit = fit_phase(col, "prefill")
    assert fit.r2 > 0.99
    for t in (0.3, 0.5, 0.7):
        f = fit.factor(t)
        short, long = col.merged("prefill", 1000).sparsity(f), col.merged("prefill", 4000).sparsity(f)
        assert (short + long) / 2 == pytest.approx(t, abs=0.02)
        assert abs(col.merged("prefill").sparsity(f) - t) > 0.1  # the tile-weighted value misses
    col.samples[("prefill", 1000)] = 1  # fewer short prompts: the fit leans to the long bin
    f = fit_phase(col, "prefill").factor(0.5)
    s_short, s_long = col.merged("prefill", 1000).sparsity(f), col.merged("prefill", 4000).sparsity(f)
    assert (s_short + 3 * s_long) / 4 == pytest.approx(0.5, abs=0.02)


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


def test_collector_state_round_trips_and_merges_pieces(tmp_path):
    """Calibrations collected in pieces (e.g. in parallel) merge into the histograms of one run."""
    g = torch.Generator().manual_seed(2)
    whole, pieces = GapCollector(), [GapCollector(), GapCollector()]
    for i, (lb, n) in enumerate(((2048, 300), (4096, 500))):
        gaps = torch.randn(n, generator=g, dtype=torch.float64) * 3
        for col in (whole, pieces[i]):
            col.length_bin = lb
            col.add(0, "decode", gaps, lb + 5)
            col.samples[("decode", lb)] += 1
    merged = GapCollector()
    for i, piece in enumerate(pieces):
        torch.save(piece.state(), tmp_path / f"p{i}.pt")
        merged.merge_state(torch.load(tmp_path / f"p{i}.pt"), source=f"p{i}.pt")
    assert merged.samples == whole.samples and merged.length_bins("decode") == [2048, 4096]
    for lb in (2048, 4096):
        a, b = merged.merged("decode", lb), whole.merged("decode", lb)
        assert torch.equal(a.counts, b.counts) and a.min_kv_len == b.min_kv_len == lb + 5
    assert fit_phase(merged, "decode").a == fit_phase(whole, "decode").a
    with pytest.raises(ValueError, match="p0.pt: tile geometry"):
        GapCollector(TileGeometry(64, 64, 64)).merge_state(torch.load(tmp_path / "p0.pt"), source="p0.pt")


def test_fit_is_pinned_so_the_top_target_never_switches_short_prompts_off():
    """λ = f / kv_len >= 1 turns skipping off: an extrapolated factor above the shortest length would give those
    prompts sparsity 0. The line is refitted through (cap_target, CAP_MARGIN · shortest kv_len) instead."""
    from sparse_llm.calibration.fit import CAP_MARGIN

    g = torch.Generator().manual_seed(1)

    def collector(lo_short, lo_long):  # s(f) = (ln f - lo) / 6 per bin
        col = GapCollector()
        for lb, lo in ((1000, lo_short), (8000, lo_long)):
            col.length_bin = lb
            col.add(0, "prefill", torch.rand(20000, generator=g, dtype=torch.float64) * 6 + lo, lb)
        return col

    col = collector(3.0, 2.5)  # the mean reaches 0.675 below f = 900, 0.7 only at f ≈ 1040
    free = fit_phase(col, "prefill", cap_target=None)
    assert free.factor(0.7) > 1000 and not free.capped  # would switch the 1000-token prompts off
    fit = fit_phase(col, "prefill")
    assert fit.capped and fit.factor(0.7) == pytest.approx(CAP_MARGIN * 1000, rel=1e-9)
    s_short, s_long = (col.merged("prefill", lb).sparsity(fit.factor(0.7)) for lb in (1000, 8000))
    assert (s_short + s_long) / 2 == pytest.approx(0.7, abs=0.05)  # on everywhere, within the tolerance
    assert fit.r2 > 0.99
    assert not fit_phase(col, "prefill", cap_target=0.3).capped  # a reachable cap leaves the free fit alone
    # Out of reach even at the cap (mean 0.48): pinning would only bend the line, so the free fit stays.
    assert not fit_phase(collector(5.0, 3.0), "prefill").capped

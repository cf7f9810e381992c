"""benchmarks/dsa_tune.py's near-tie check of tuned vs default selections, and the tuned launch table
(kernels/dsa_launch.py) that the check would unlock, on small constructed CPU cases."""
import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from dsa_tune import topk_near_ties  # noqa: E402

from sparse_llm.backends.dsa_torch import topk_positions_ref  # noqa: E402
from sparse_llm.kernels import dsa_launch  # noqa: E402
from sparse_llm.kernels.dsa_indexer import indexer_logits  # noqa: E402
from sparse_llm.kernels.dsa_mla_attention import mla_attention  # noqa: E402

K = 8


def _scorings(seed: int = 0):
    """Two scorings of the same 3 rows that differ by at most 1e-3; in row 0 the k-th and (k+1)-th values are
    1e-4 apart, so the second scoring swaps them."""
    g = torch.Generator().manual_seed(seed)
    a = torch.stack([torch.randperm(101, generator=g).float() / 10 for _ in range(3)])
    b = a + (torch.rand(a.shape, generator=g) - 0.5) * 1e-3
    order = a[0].argsort(descending=True)
    kth, next_ = order[K - 1], order[K]
    a[0, next_] = a[0, kth] - 1e-4
    b[0, kth], b[0, next_] = a[0, kth] - 2e-4, a[0, kth]
    n_valid = torch.tensor([101, 97, K - 2], dtype=torch.int32)
    return a, b, n_valid


def test_boundary_swaps_are_counted_as_near_ties():
    a, b, n_valid = _scorings()
    report = topk_near_ties(a, b, topk_positions_ref(a, n_valid, K), topk_positions_ref(b, n_valid, K), n_valid, K)
    assert report["rows_differing"] == 1 and report["indices_differing"] == 2 and report["not_near_tie"] == 0
    assert 0 < report["max_distance_over_band"] <= 1 and report["max_logit_discrepancy"] <= 1e-3


def test_identical_scorings_select_identically():
    a, _, n_valid = _scorings(1)
    idx = topk_positions_ref(a, n_valid, K)
    report = topk_near_ties(a, a.clone(), idx, idx.clone(), n_valid, K)
    assert report["indices_differing"] == 0 and report["max_logit_discrepancy"] == 0


def test_a_selection_bug_is_not_a_near_tie():
    """Replacing one selected index by the row's smallest logit is far outside the 2d band: it must fail loudly."""
    a, b, n_valid = _scorings(2)
    idx_b = topk_positions_ref(b, n_valid, K)
    idx_b[1, 0] = int(b[1, : n_valid[1]].argmin())
    with pytest.raises(AssertionError, match="more than near-ties"):
        topk_near_ties(a, b, topk_positions_ref(a, n_valid, K), idx_b, n_valid, K)


def test_short_rows_must_select_the_same_set():
    a, b, n_valid = _scorings(3)
    idx_b = topk_positions_ref(b, n_valid, K)
    idx_b[2, 0] = 50  # row 2 has n_valid < k: every valid position, nothing else (0 missing, 50 extra)
    with pytest.raises(AssertionError, match="'not_near_tie': 2, .*'row': 2, 'pos': 0"):
        topk_near_ties(a, b, topk_positions_ref(a, n_valid, K), idx_b, n_valid, K)


def test_launch_table_names_real_parameters(monkeypatch):
    monkeypatch.setattr(dsa_launch, "USE_TUNED_DSA_LAUNCH", False)
    assert dsa_launch.dsa_launch(32, 131072, torch.device("cuda")) == {}  # off: the kernels' own defaults
    kernels = dict(indexer=indexer_logits, attention=mla_attention)
    for key, entry in dsa_launch.TUNED_DSA_LAUNCH.items():
        for stage, fn in kernels.items():
            unknown = set(entry[stage]) - set(inspect.signature(fn).parameters)
            assert not unknown, (key, stage, unknown)
        topk = dict(entry["topk"])
        fn = dsa_launch.TOPK_METHODS[topk.pop("method")]
        assert not set(topk) - set(inspect.signature(fn).parameters), (key, topk)
    assert dsa_launch.shape_class(1, 32768) == ("B1", "32K") and dsa_launch.shape_class(32, 131072) == ("B32", "128K")
    assert set(dsa_launch.TUNED_DSA_LAUNCH) == {(b, n) for b in ("B1", "B8", "B32") for n in ("32K", "128K")}


def test_launch_table_when_switched_on(monkeypatch):
    monkeypatch.setattr(dsa_launch, "USE_TUNED_DSA_LAUNCH", True)
    assert dsa_launch.dsa_launch(8, 100000, torch.device("cuda")) is dsa_launch.TUNED_DSA_LAUNCH[("B8", "128K")]
    assert dsa_launch.dsa_launch(8, 100000, torch.device("cpu")) == {}  # the interpreter keeps its own tiles
    assert dsa_launch.dsa_launch(8, 100000, torch.device("cuda"), num_heads=16, head_dim=576) == {}  # not the tuned shape


def test_select_topk_refuses_unknown_methods():
    with pytest.raises(ValueError, match="method='heap' is not allowed; allowed: \\['radix', 'sampled'\\]"):
        dsa_launch.select_topk(torch.randn(1, 10), torch.tensor([10], dtype=torch.int32), 2, method="heap")

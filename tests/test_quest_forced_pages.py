"""Quest's forced pages (`sink_pages`, `recent_pages`) and spread-weighted page scores (`spread_weight`): the torch
selection keeps the first sink_pages and last recent_pages pages inside the budget and the rest by score (vs a
brute-force reference); the spread-weighted score is q·centre + w Σ|q_d| half-range (vs float64 sums); the Triton
top-k (interpreter, fp32; per query head through the bisection and the sort paths, per KV head through the group
reduce) lists exactly those pages; the Triton backends equal the torch backends with the options on, and the
options change what is attended; bad values are pydantic errors naming the field."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch
from pydantic import ValidationError

from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.paged_batch import random_paged_batch
from sparse_llm.backends.quest import QuestGroupTorchBackend, QuestGroupTritonBackend, QuestTorchBackend, QuestTritonBackend
from sparse_llm.backends.rocket_select import group_page_scores
from sparse_llm.configs.resolve import resolve
from sparse_llm.configs.sparse_more import QuestConfig, QuestParams
from sparse_llm.kernels import page_scores as page_scores_kernels
from sparse_llm.kernels.page_scores import select_top_pages
from sparse_llm.sparse.quest import page_scores, quest_selection
from test_page_sparse_backends import quest_step
from test_page_sparse_kernels import gathered_minmax, kt_cache

D = 64
SCALE = D ** -0.5


def brute_force_pages(scores: torch.Tensor, npg: int, budget: int, sink: int, recent: int) -> set[int]:
    """One row: every valid page when they fit the budget; else the forced pages plus the best others."""
    if npg <= budget:
        return set(range(npg))
    forced = {p for p in range(npg) if p < sink or p >= npg - recent}
    others = sorted((p for p in range(npg) if p not in forced), key=lambda p: -float(scores[p]))
    return forced | set(others[:budget - len(forced)])


@pytest.mark.parametrize("sink,recent", [(0, 1), (1, 1), (2, 3), (0, 4), (3, 5)])
def test_torch_selection_is_the_brute_force_rule(sink, recent):
    g = torch.Generator().manual_seed(sink * 7 + recent)
    n, h, p, budget = 4, 3, 37, 9
    scores = torch.randn(n, h, p, generator=g, dtype=torch.float64)
    scores[:, :, :4] -= 5.0  # the sink and ...
    n_pages = torch.tensor([37, 30, 9, 4])
    for i, npg in enumerate(n_pages.tolist()):
        scores[i, :, max(0, npg - 6):npg - 1] -= 5.0  # ... the recent pages score lowest: forcing them matters
    sel = quest_selection(scores, n_pages, budget, 8, sink, recent)
    picked = sel.block_indices.view(n, h, -1)
    changed = False
    for i, npg in enumerate(n_pages.tolist()):
        for head in range(h):
            got = {int(x) for x in picked[i, head] if x < npg}
            want = brute_force_pages(scores[i, head], npg, budget, sink, recent)
            assert got == want, (i, head)
            changed |= want != brute_force_pages(scores[i, head], npg, budget, 0, 1)
    assert changed == ((sink, recent) != (0, 1))


def weak_pages_batch(lens, h, hkv, block_size, page_size, seed):
    """Decodes whose first pages and the pages just before the current one hold near-zero keys: their bounds
    rank last, so only forcing keeps them."""
    batch = random_paged_batch([1] * len(lens), lens, 0, h, hkv, D, block_size, seed=seed)
    for i, n in enumerate(lens):
        kf = batch.k_full[i]
        cur = (n - 1) // page_size * page_size
        weak = torch.cat([torch.arange(min(n, 3 * page_size)), torch.arange(max(0, cur - 3 * page_size), n - 1)])
        kf[weak[weak < n - 1]] *= 0.01
        bt = batch.meta.block_tables[i].long()
        pos = torch.arange(n - 1)  # the new token's key is written by the step itself
        batch.cache["kv"][bt[pos // block_size], 0, pos % block_size] = kf[:n - 1]
    return batch


def test_spread_weighted_scores_are_centre_plus_weighted_half_range():
    g = torch.Generator().manual_seed(5)
    n, h, hkv, p = 2, 6, 2, 7
    q = torch.randn(n, h, D, generator=g, dtype=torch.float64)
    a, b = torch.randn(2, n, p, hkv, D, generator=g, dtype=torch.float64)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    qg = q.view(n, hkv, h // hkv, D)
    for w in (1.0, 0.5, 0.0):
        want = torch.einsum("ngd,npgd->ngp", qg.reshape(n, h, D), ((lo + hi) / 2).repeat_interleave(h // hkv, 2)) + \
            w * torch.einsum("ngd,npgd->ngp", qg.reshape(n, h, D).abs(), ((hi - lo) / 2).repeat_interleave(h // hkv, 2))
        torch.testing.assert_close(page_scores(q, lo, hi, w), want, rtol=1e-12, atol=1e-12)
    bound = torch.maximum(q.view(n, 1, h, D) * lo.repeat_interleave(h // hkv, 2),
                          q.view(n, 1, h, D) * hi.repeat_interleave(h // hkv, 2)).sum(-1).transpose(1, 2)
    torch.testing.assert_close(page_scores(q, lo, hi, 1.0), bound, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_query_head,bisect,sink,recent,w", [
    (True, True, 2, 3, 1.0), (True, False, 1, 2, 0.5), (False, False, 2, 3, 0.5), (True, True, 1, 1, 0.25)])
def test_triton_top_pages_force_the_same_pages(per_query_head, bisect, sink, recent, w, monkeypatch):
    if not bisect and hasattr(page_scores_kernels, "BISECT_MAX_PAGES"):
        monkeypatch.setattr(page_scores_kernels, "BISECT_MAX_PAGES", 0)  # per-query-head rows take the sort path
    page_size, block_size, h, hkv, budget = 8, 16, 6, 2, 7
    lens = [211, 61, 20]  # 27 pages, 8 pages, 3 pages (everything fits)
    batch = weak_pages_batch(lens, h, hkv, block_size, page_size, seed=sink + 3 * recent)
    kt = kt_cache(batch, page_size, torch.float32)
    meta = batch.meta
    max_pages = -(-max(lens) // page_size)
    n_pages = (meta.seq_lens.long() + page_size - 1) // page_size
    lo, hi = gathered_minmax(kt, batch, page_size, max_pages)
    lo, hi = lo.nan_to_num(0.0), hi.nan_to_num(0.0)
    if per_query_head:
        scores = page_scores(batch.q.double(), lo, hi, w)
    else:  # the group reference takes boxes: shrink each to centre ± w half-range
        c, r = (lo + hi) / 2, (hi - lo) / 2
        scores = group_page_scores(batch.q.double(), c - w * r, c + w * r, n_pages, D, SCALE)
    got = select_top_pages(batch.q, kt[:, 0], kt[:, 1], meta.block_tables, meta.seq_lens, page_size, max_pages,
                           SCALE, budget - 1, per_query_head, sink, recent, w)
    plain = select_top_pages(batch.q, kt[:, 0], kt[:, 1], meta.block_tables, meta.seq_lens, page_size, max_pages,
                             SCALE, budget - 1, per_query_head, spread_weight=w)
    assert not torch.equal(got, plain)  # the weak pages are dropped unless forced
    for b, npg in enumerate(n_pages.tolist()):
        for row in range(got.shape[1]):
            ids = got[b, row]
            listed = {int(x) for x in ids if x >= 0}
            assert len(listed) == (ids >= 0).sum() == min(budget - 1, npg - 1)  # no duplicates, -1 padded
            assert listed | {npg - 1} == brute_force_pages(scores[b, row], npg, budget, sink, recent), (b, row)


@pytest.mark.parametrize("torch_cls,triton_cls", [(QuestTorchBackend, QuestTritonBackend),
                                                  (QuestGroupTorchBackend, QuestGroupTritonBackend)])
def test_triton_backend_matches_torch_with_forced_pages(torch_cls, triton_cls):
    page_size, block_size, h, hkv = 8, 16, 9, 3
    lens = [301, 40, 190]
    batch = weak_pages_batch(lens, h, hkv, block_size, page_size, seed=11)
    layer = LayerSpec(0, h, hkv, D, SCALE, "model.layers.0.self_attn")
    plain = QuestParams("quest", token_budget=64, page_size=page_size)
    for opts in ({"sink_pages": 2, "recent_pages": 3}, {"sink_pages": 1, "spread_weight": 0.5}):
        params = QuestParams("quest", token_budget=64, page_size=page_size, **opts)
        ref, ref_stats, _ = quest_step(torch_cls, batch, params, block_size, layer)
        out, stats, _ = quest_step(triton_cls, batch, params, block_size, layer)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(stats, ref_stats) and stats[0, 1] > 0  # same budget: the same pairs skipped
        unforced, _, _ = quest_step(torch_cls, batch, plain, block_size, layer)
        assert (unforced - ref).abs().max() > 1e-3, opts  # the options reach the selection


def test_config_errors_and_lowering():
    with pytest.raises(ValidationError, match="(?s)sink_pages.*greater than or equal to 0"):
        QuestConfig(sink_pages=-1)
    with pytest.raises(ValidationError, match="(?s)recent_pages.*greater than or equal to 1"):
        QuestConfig(recent_pages=0)
    with pytest.raises(ValidationError, match=r"sink_pages \(3\) \+ recent_pages \(2\) must be at most token_budget "
                                              r"// page_size = 4 pages"):
        QuestConfig(token_budget=64, page_size=16, sink_pages=3, recent_pages=2)
    QuestConfig(token_budget=64, page_size=16, sink_pages=2, recent_pages=2)  # exactly the budget: allowed
    with pytest.raises(ValidationError, match="(?s)spread_weight.*less than or equal to 1"):
        QuestConfig(spread_weight=1.5)
    with pytest.raises(ValidationError, match="(?s)spread_weight.*greater than or equal to 0"):
        QuestConfig(spread_weight=-0.1)
    specs = [LayerSpec(i, 4, 2, D, SCALE, f"model.layers.{i}.self_attn") for i in range(3)]
    cfg = {"algorithm": "quest", "page_size": 8, "sink_pages": 1, "recent_pages": 4, "spread_weight": 0.5}
    params = resolve(cfg, None, None, specs)
    assert (params[2].sink_pages, params[2].recent_pages, params[2].spread_weight, params[2].page_size) == (1, 4, 0.5, 8)
    default = resolve({"algorithm": "quest"}, None, None, specs)[2]
    assert (default.sink_pages, default.recent_pages, default.spread_weight, default.page_size,
            default.minmax_cache_dtype) == (1, 1, 0.25, 8, "float8_e5m2")  # measured on SmolLM2 (docs/algorithms.md)
    paper = {"algorithm": "quest", "page_size": 16, "sink_pages": 0, "spread_weight": 1.0, "minmax_cache_dtype": "auto"}
    assert resolve(paper, None, None, specs)[2] == QuestParams("quest")  # the paper's rule, as QuestParams' defaults

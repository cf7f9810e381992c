"""Quest per query head through Triton (interpreter): the per-head top-k (RocketKV's sort kernels, each query
head a group of one) picks exactly the torch reference's pages, best first; the page-sparse decode kernel with
one list per query head matches float64 attention; the backend matches QuestTorchBackend; and QuestConfig's
`selection` switch reaches the right backend classes end to end (config dict -> params -> registry -> output)."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch
from pydantic import ValidationError

from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.paged_batch import random_paged_batch
from sparse_llm.backends.quest import (
    MINMAX,
    QuestGroupTorchBackend,
    QuestGroupTritonBackend,
    QuestTorchBackend,
    QuestTritonBackend,
    update_page_minmax,
)
from sparse_llm.backends.registry import create_backends
from sparse_llm.configs.resolve import resolve
from sparse_llm.configs.sparse_more import QuestConfig, QuestParams
from sparse_llm.kernels.page_scores import select_top_pages
from sparse_llm.kernels.page_sparse_decode import page_sparse_decode, page_sparse_decode_reference
from sparse_llm.sparse.quest import page_scores, quest_selection
from test_page_sparse_backends import quest_step
from test_page_sparse_kernels import gathered_minmax, kt_cache

D = 64
SCALE = D ** -0.5


def reference_pages(q, kt, batch, page_size, max_pages, budget_pages):
    """bool [N, H, P]: the pages `sparse.quest.quest_selection` attends (float64 scores), current page included."""
    lo, hi = gathered_minmax(kt, batch, page_size, max_pages)
    n_pages = (batch.meta.seq_lens.long() + page_size - 1) // page_size
    scores = page_scores(q.double(), lo.nan_to_num(0.0), hi.nan_to_num(0.0))
    sel = quest_selection(scores, n_pages, budget_pages, page_size)
    n, h = q.shape[:2]
    picked = sel.block_indices.view(n, h, -1).long()
    mask = torch.zeros(n, h, max_pages + budget_pages, dtype=torch.bool).scatter_(-1, picked, True)[..., :max_pages]
    return mask & (torch.arange(max_pages)[None, None, :] < n_pages[:, None, None]), scores


@pytest.mark.parametrize("page_size,block_size,h,hkv,mm_dtype,shift", [
    (8, 16, 3, 3, torch.float32, 0.0),    # GQA 1
    (16, 32, 6, 2, torch.float16, 0.0),   # GQA 3, fp16 min/max
    (8, 32, 8, 2, torch.float32, -1.5),   # GQA 4, keys pushed against q: mostly negative bounds
    (16, 16, 4, 1, torch.float16, -1.5),
])
def test_per_head_top_pages_are_the_reference_pages(page_size, block_size, h, hkv, mm_dtype, shift):
    lens = [603, 37, 9] if h == 3 else [411, 9, 1]  # 603 / 8: two reduce chunks; < k ranked pages; one token
    batch = random_paged_batch([1] * len(lens), lens, 0, h, hkv, D, block_size, seed=page_size + h, sink_logit=1.0)
    if shift:  # every key gets shift x its group's mean query: the bounds go negative (signed sort keys)
        qmean = batch.q.view(len(lens), hkv, h // hkv, D).mean(2)  # [N, Hkv, D]
        for i, kf in enumerate(batch.k_full):
            kf.mul_(0.2).add_(shift * qmean[i][None])
            bt = batch.meta.block_tables[i].long()
            pos = torch.arange(lens[i])
            batch.cache["kv"][bt[pos // block_size], 0, pos % block_size] = kf
    kt = kt_cache(batch, page_size, mm_dtype)
    max_pages = -(-max(lens) // page_size)
    budget_pages = 6
    want, scores = reference_pages(batch.q, kt, batch, page_size, max_pages, budget_pages)
    if shift:
        assert (scores[0] < 0).float().mean() > 0.5  # the signed keys really are exercised
    meta = batch.meta
    got = select_top_pages(batch.q, kt[:, 0], kt[:, 1], meta.block_tables, meta.seq_lens, page_size, max_pages,
                           SCALE, budget_pages - 1, per_query_head=True)
    assert got.shape == (len(lens), h, budget_pages - 1)
    n_pages = (meta.seq_lens.long() + page_size - 1) // page_size
    for b, npg in enumerate(n_pages.tolist()):
        for head in range(h):
            ids = got[b, head]
            listed = ids[ids >= 0].long()
            assert (ids[listed.numel():] == -1).all() and listed.numel() == min(budget_pages - 1, npg - 1)
            s = scores[b, head, listed]
            assert (s[:-1] >= s[1:]).all()  # best first
            chosen = torch.zeros(max_pages, dtype=torch.bool)
            chosen[listed] = True
            chosen[npg - 1] = True  # the current page, which the decode kernel adds
            assert torch.equal(chosen, want[b, head]), (b, head)
    if h != 3:
        return
    # Decode-graph tables (max_model_len wide, zero padded) rank the same pages.
    wide = torch.zeros(len(lens), 3 * meta.block_tables.shape[1] + 1, dtype=torch.int32)
    wide[:, :meta.block_tables.shape[1]] = meta.block_tables
    got_wide = select_top_pages(batch.q, kt[:, 0], kt[:, 1], wide, meta.seq_lens, page_size,
                                wide.shape[1] * (block_size // page_size), SCALE, budget_pages - 1, per_query_head=True)
    assert torch.equal(got_wide, got)


def test_per_head_ties_go_to_the_lower_page():
    batch = random_paged_batch([1, 1], [300, 50], 0, 4, 2, D, 16, seed=3)
    zero = torch.zeros_like(kt_cache(batch, 8, torch.float32))  # every bound 0: all ranked pages tie
    got = select_top_pages(batch.q, zero[:, 0], zero[:, 1], batch.meta.block_tables, batch.meta.seq_lens, 8, 38,
                           SCALE, 5, per_query_head=True)
    assert got.tolist() == [[list(range(5))] * 4] * 2


@pytest.mark.parametrize("page_size,block_size,h,hkv,dtype", [
    (8, 16, 5, 5, torch.float32),    # GQA 1
    (16, 32, 6, 2, torch.float16),   # GQA 3
    (8, 8, 8, 2, torch.float16),     # GQA 4
    (16, 64, 12, 3, torch.float32),  # GQA 4
])
def test_per_head_page_sparse_decode_matches_float64(page_size, block_size, h, hkv, dtype):
    lens = [301, 7, 130]
    batch = random_paged_batch([1] * 3, lens, 0, h, hkv, D, block_size, dtype=dtype, seed=page_size + h, sink_logit=2.0)
    from sparse_llm.backends.base import write_kv

    kv, meta = batch.cache["kv"], batch.meta
    write_kv(kv, batch.k, batch.v, meta.slot_mapping)
    g = torch.Generator().manual_seed(h)
    k_list = 5
    pages = torch.full((3, h, k_list), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        others = -(-n // page_size) - 1
        for head in range(h):
            take = torch.randperm(others, generator=g)[:min(k_list, others)]
            pages[b, head, :take.numel()] = take.int()
    ref = page_sparse_decode_reference(batch.q, kv, pages, meta.block_tables, meta.seq_lens, page_size, SCALE)
    # One shared list per KV head would attend other pages: the per-head lists really are used.
    shared = page_sparse_decode_reference(batch.q, kv, pages[:, ::h // hkv].contiguous(), meta.block_tables,
                                          meta.seq_lens, page_size, SCALE)
    assert h == hkv or (shared - ref).abs().max() > 1e-2
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for split_tiles in (1, None):
        got = page_sparse_decode(batch.q, kv, pages, meta.block_tables, meta.seq_lens, page_size, SCALE,
                                 split_tiles=split_tiles)
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=f"pages must be int32 \\[3, {hkv} or {h}, K\\]"):
        page_sparse_decode(batch.q, kv, pages[:, :1].contiguous() if hkv > 1 else pages[:, :2].contiguous(),
                           meta.block_tables, meta.seq_lens, page_size, SCALE)


@pytest.mark.parametrize("page_size,block_size,h,hkv,budget", [(8, 16, 9, 3, 40), (16, 32, 8, 2, 64)])
def test_triton_backend_matches_torch_per_head(page_size, block_size, h, hkv, budget):
    lens = [301, 40, 190]
    batch = random_paged_batch([1] * 3, lens, 0, h, hkv, D, block_size, seed=page_size, sink_logit=2.0)
    params = QuestParams("quest", token_budget=budget, page_size=page_size)
    layer = LayerSpec(0, h, hkv, D, SCALE, "model.layers.0.self_attn")
    runs = [quest_step(cls, batch, params, block_size, layer) for cls in (QuestTorchBackend, QuestTritonBackend)]
    (ref, ref_stats, _), (out, stats, backend) = runs
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(stats, ref_stats) and stats[0, 1] > 0 and backend.stats.sparsity("decode") > 0.3


@pytest.mark.parametrize("selection", ["per_query_head", "per_kv_head"])
def test_fp8_minmax_cache_triton_matches_torch(selection):
    """minmax_cache_dtype float8_e5m2: the cache holds the exact page min/max rounded to nearest, and the Triton
    step (fp16 scoring dots on the e5m2 values) attends the torch reference's pages."""
    h, hkv, page_size, block_size = 9, 3, 8, 16
    batch = random_paged_batch([1] * 3, [301, 40, 190], 0, h, hkv, D, block_size, seed=5, sink_logit=2.0)
    params = QuestParams("quest", token_budget=40, page_size=page_size, selection=selection, sink_pages=1,
                         spread_weight=0.25, minmax_cache_dtype="float8_e5m2")
    layer = LayerSpec(0, h, hkv, D, SCALE, "model.layers.0.self_attn")
    torch_cls, triton_cls = ((QuestTorchBackend, QuestTritonBackend) if selection == "per_query_head"
                             else (QuestGroupTorchBackend, QuestGroupTritonBackend))
    (ref, ref_stats, ref_backend), (out, stats, _) = [quest_step(c, batch, params, block_size, layer)
                                                      for c in (torch_cls, triton_cls)]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(stats, ref_stats) and stats[0, 1] > 0
    spec = {s.name: s for s in ref_backend.cache_spec(block_size, torch.float32)}[MINMAX]
    assert spec.dtype == torch.float8_e5m2 and spec.bytes_per_block() * 4 == spec.block_shape[0] * 2 * hkv * D * 4
    # The rounding: the e5m2 cache of sequence 0's first block = its keys' exact page min/max, rounded.
    kv = batch.cache["kv"]
    mm = torch.zeros(kv.shape[0], block_size // page_size, 2, hkv, D, dtype=torch.float8_e5m2)
    slots = batch.meta.block_tables[0, 0].long() * block_size + torch.arange(block_size)
    update_page_minmax(kv, mm, slots, page_size, dedupe=True)
    keys = kv[batch.meta.block_tables[0, 0].long(), 0].view(block_size // page_size, page_size, hkv, D)
    exact = torch.stack([keys.amin(1), keys.amax(1)], 1).to(torch.float8_e5m2)
    assert torch.equal(mm[batch.meta.block_tables[0, 0].long()].view(torch.uint8), exact.view(torch.uint8))


def test_selection_switch_end_to_end():
    """{algorithm: quest, selection: ...} as a user gives it: resolve -> registry (triton, interpreter) -> forward,
    equal to the torch reference backend of that mode; the two modes attend different pages here."""
    h, hkv, page_size, block_size = 8, 2, 16, 32
    specs = [LayerSpec(i, h, hkv, D, SCALE, f"model.layers.{i}.self_attn") for i in range(2)]
    batch = random_paged_batch([1] * 2, [333, 150], 0, h, hkv, D, block_size, seed=9, sink_logit=1.0)
    outs = {}
    for selection, reference in (("per_kv_head", QuestGroupTorchBackend), ("per_query_head", QuestTorchBackend)):
        cfg = {"algorithm": "quest", "selection": selection, "token_budget": 64, "page_size": page_size,
               "dense_layers": 1}
        params = resolve(cfg, None, None, specs)
        assert params[0] is None and params[1].selection == selection
        backends = create_backends(specs, params, "triton", "cpu")
        want_cls = QuestGroupTritonBackend if selection == "per_kv_head" else QuestTritonBackend
        assert type(backends[1]) is want_cls
        out, stats, _ = quest_step(type(backends[1]), batch, params[1], block_size, specs[1])
        ref, ref_stats, _ = quest_step(reference, batch, params[1], block_size, specs[1])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(stats, ref_stats)
        outs[selection] = out
    assert (outs["per_kv_head"] - outs["per_query_head"]).abs().max() > 1e-3
    with pytest.raises(ValidationError, match="(?s)selection.*'per_query_head' or 'per_kv_head'"):
        QuestConfig(selection="per_group")


@pytest.mark.slow
def test_engine_runs_the_selected_mode(smollm2, llm_factory, long_prompt):
    """SmolLM2 through the engine (CPU, torch backends): each `selection` builds its backend class on the
    sparse layers, and both decode sparsely from the same dense prefill."""
    from sparse_llm.backends.torch_dense import TorchDenseBackend
    from sparse_llm.engine.sampling_params import SamplingParams

    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    factory = llm_factory(smollm2, max_model_len=1024,
                          kv_cache_config={"max_tokens": 2048, "enable_prefix_caching": False})
    make = next(factory)
    first = {}
    for selection, cls in (("per_kv_head", QuestGroupTorchBackend), ("per_query_head", QuestTorchBackend)):
        llm = make(sparse_attention_config={"algorithm": "quest", "selection": selection, "token_budget": 128,
                                            "page_size": 16, "dense_layers": 2})
        kinds = [type(b) for b in llm.engine.runner.backends]
        assert kinds[:2] == [TorchDenseBackend] * 2 and set(kinds[2:]) == {cls}
        out = llm.generate([long_prompt], greedy, use_tqdm=False)[0]
        assert len(out.token_ids) == 3 and out.metrics.sparsity["decode"] > 0.5  # 128 of ~603 tokens per head
        first[selection] = out.token_ids[0]
    next(factory, None)  # closes the last LLM
    assert first["per_kv_head"] == first["per_query_head"]  # the prefill is dense in both modes

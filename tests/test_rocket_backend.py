"""TorchRocketBackend on a hand-built paged cache (float64): dense prefill, compaction, KT cache, sparse decode."""
from __future__ import annotations

import pytest
import torch

from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.registry import backend_class
from sparse_llm.backends.rocket import TorchRocketBackend
from sparse_llm.backends.rocket_select import page_minmax, prompt_keep_indices, select_pages
from sparse_llm.configs.params import RocketParams
from sparse_llm.models.testing import chunk_metadata

H, HKV, D, BS, PS = 6, 2, 8, 8, 4
SCALE = D ** -0.5
BUDGET, W, KS = 13, 4, 3


def params(topk=100, topr=5, kt="bfloat16", threshold=None):
    return RocketParams("rocket", window_size=W, kernel_size=KS, topr=topr, topk=topk, prompt_budget=BUDGET,
                        page_size=PS, kt_cache_dtype=kt, seq_len_threshold=threshold)


def make_backend(**kw) -> tuple[TorchRocketBackend, dict[str, torch.Tensor]]:
    b = TorchRocketBackend(LayerSpec(0, H, HKV, D, SCALE, "l0"), params(**kw))
    cache = {s.name: torch.full((24, *s.block_shape), float("nan"), dtype=torch.float64).to(s.dtype)
             for s in b.cache_spec(BS, torch.float64)}
    return b, cache


def meta_for(tables, starts, qlens, num_prefills, seq_ids, compact_to):
    """Metadata for sequences whose new tokens are cache positions [start, start + qlen)."""
    return chunk_metadata(tables, starts, qlens, num_prefills, seq_ids, compact_to, BS)


def attend(q, k, v, mask=None):
    """Float64 reference: q [n, H, D] are the last n positions of k/v [L, Hkv, D]; mask [Hkv, L] optional."""
    G = H // HKV
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.einsum("qhd,lhd->hql", q, kk) * SCALE
    L, n = k.shape[0], q.shape[0]
    s = s.masked_fill(torch.arange(L)[None, :] > torch.arange(L - n, L)[:, None], float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask.repeat_interleave(G, 0)[:, None, :], float("-inf"))
    return torch.einsum("hql,lhd->qhd", torch.softmax(s, -1), vv)


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.fixture
def prompts():
    g = torch.Generator().manual_seed(3)
    lens = [37, 29, 10]  # two compact to BUDGET, the last is shorter than the budget
    perm = torch.randperm(24, generator=g).tolist()
    tables = [perm[0:5], perm[5:9], perm[9:11]]
    data = [(rand(g, n, H, D), rand(g, n, HKV, D), rand(g, n, HKV, D)) for n in lens]
    return lens, tables, data


def run_prefill(backend, cache, lens, tables, data, compact_to, chunks=None):
    """One prefill step per chunk boundary list (default: whole prompts in one step)."""
    chunks = chunks or [[0, n] for n in lens]
    outs = [[] for _ in lens]
    for c in range(len(chunks[0]) - 1):
        starts = [ch[c] for ch in chunks]
        ends = [ch[c + 1] for ch in chunks]
        last = [e == n for e, n in zip(ends, lens)]
        meta = meta_for(tables, starts, [e - s for s, e in zip(starts, ends)], len(lens), range(len(lens)),
                        [t if lt else 0 for t, lt in zip(compact_to, last)])
        q = torch.cat([d[0][s:e] for d, s, e in zip(data, starts, ends)])
        k = torch.cat([d[1][s:e] for d, s, e in zip(data, starts, ends)])
        v = torch.cat([d[2][s:e] for d, s, e in zip(data, starts, ends)])
        o = backend.forward(q, k, v, cache, meta)
        backend.on_step_end(cache, meta)
        cu = meta.cu_seqlens_q.tolist()
        for i in range(len(lens)):
            outs[i].append(o[cu[i]:cu[i + 1]])
    return [torch.cat(o) for o in outs]


def cached(cache, table, n):
    blocks = cache["kv"][torch.tensor(table)]
    return blocks[:, 0].reshape(-1, HKV, D)[:n], blocks[:, 1].reshape(-1, HKV, D)[:n]


def kept(data, n):
    q, k, v = data
    keep = prompt_keep_indices(q[-W:], k, SCALE, KS, BUDGET)
    return keep, torch.stack([k[keep[h], h] for h in range(HKV)], 1), torch.stack([v[keep[h], h] for h in range(HKV)], 1)


def test_prefill_is_dense_and_compaction_packs_kept_tokens(prompts):
    lens, tables, data = prompts
    backend, cache = make_backend()
    outs = run_prefill(backend, cache, lens, tables, data, [BUDGET, BUDGET, 0])
    for (q, k, v), o in zip(data, outs):
        torch.testing.assert_close(o, attend(q, k, v))
    for i in range(2):
        _, kk, vv = kept(data[i], lens[i])
        ck, cv = cached(cache, tables[i], BUDGET)
        assert torch.equal(ck, kk) and torch.equal(cv, vv)
        full = -(-BUDGET // PS)  # pages of the packed tokens, the last one partial
        kt = cache["kt"][torch.tensor(tables[i])]  # [blocks, 2, pages per block, Hkv, D]
        pages = kt.transpose(1, 2).reshape(-1, 2, HKV, D)[:full]
        kmin, kmax = page_minmax(torch.cat([kk, kk[:full * PS - BUDGET]]), torch.arange(full * PS) < BUDGET, PS)
        assert torch.equal(pages[:, 0].double(), kmin.to(torch.bfloat16).double())
        assert torch.equal(pages[:, 1].double(), kmax.to(torch.bfloat16).double())
    ck, _ = cached(cache, tables[2], lens[2])
    assert torch.equal(ck, data[2][1])  # below the budget: untouched
    assert not backend.pending and set(backend.window_q) == {2}  # compacted sequences dropped their window


def test_chunked_prefill_keeps_the_same_tokens(prompts):
    """A last chunk shorter than the window still scores with the whole window (queries kept across chunks)."""
    lens, tables, data = prompts
    backend, cache = make_backend()
    chunks = [[0, 20, 35, 37], [0, 3, 27, 29], [0, 4, 9, 10]]
    outs = run_prefill(backend, cache, lens, tables, data, [BUDGET, BUDGET, 0], chunks)
    for i in range(2):
        torch.testing.assert_close(outs[i], attend(*data[i]))
        _, kk, vv = kept(data[i], lens[i])
        ck, cv = cached(cache, tables[i], BUDGET)
        assert torch.equal(ck, kk) and torch.equal(cv, vv)


def decode_step(backend, cache, tables, kv_lens, g):
    n = len(kv_lens)
    meta = meta_for(tables, [x - 1 for x in kv_lens], [1] * n, 0, range(n), [0] * n)
    q, k, v = rand(g, n, H, D), rand(g, n, HKV, D), rand(g, n, HKV, D)
    return q, k, v, backend.forward(q, k, v, cache, meta), meta


@pytest.mark.parametrize("kt", ["bfloat16", "float8_e5m2"])
def test_decode_with_topk_covering_all_pages_is_dense_over_kept_tokens(prompts, kt):
    lens, tables, data = prompts
    backend, cache = make_backend(topk=100, kt=kt)
    run_prefill(backend, cache, lens, tables, data, [BUDGET, BUDGET, 0])
    kv_lens = [BUDGET + 1, BUDGET + 1, lens[2] + 1]
    q, k, v, out, meta = decode_step(backend, cache, tables, kv_lens, torch.Generator().manual_seed(5))
    for i in range(3):
        ck, cv = (kept(data[i], lens[i])[1:] if i < 2 else data[i][1:])
        ref = attend(q[i:i + 1], torch.cat([ck, k[i:i + 1]]), torch.cat([cv, v[i:i + 1]]))
        torch.testing.assert_close(out[i:i + 1], ref)
    pages = torch.tensor([-(-n // PS) for n in kv_lens]) * HKV
    assert torch.equal(meta.seq_stats[:, 0], pages) and (meta.seq_stats[:, 1] == 0).all()


def test_sparse_decode_attends_the_selected_pages(prompts):
    lens, tables, data = prompts
    backend, cache = make_backend(topk=1, topr=3)
    run_prefill(backend, cache, lens, tables, data, [BUDGET, BUDGET, 0])
    g = torch.Generator().manual_seed(9)
    kv = {i: [kept(data[i], lens[i])[1], kept(data[i], lens[i])[2]] if i < 2 else [data[i][1], data[i][2]] for i in range(3)}
    for step in range(6):  # crosses a page boundary: the filled page's KT entry must be right afterwards
        kv_lens = [kv[i][0].shape[0] + 1 for i in range(3)]
        q, k, v, out, meta = decode_step(backend, cache, tables, kv_lens, g)
        for i in range(3):
            kv[i] = [torch.cat([kv[i][0], k[i:i + 1]]), torch.cat([kv[i][1], v[i:i + 1]])]
            n = kv_lens[i]
            P = -(-n // PS)
            valid = torch.arange(P * PS) < n
            pad = torch.cat([kv[i][0], kv[i][0][:P * PS - n]])
            kmin, kmax = page_minmax(pad, valid, PS)
            kmin, kmax = kmin.to(torch.bfloat16).double(), kmax.to(torch.bfloat16).double()
            picked = select_pages(q[i:i + 1], kmin[None], kmax[None], torch.tensor([P]), 3, 1, SCALE)[0]
            mask = picked.repeat_interleave(PS, -1)[:, :n]
            torch.testing.assert_close(out[i:i + 1], attend(q[i:i + 1], kv[i][0], kv[i][1], mask))
            selected = int(picked.sum())
            assert meta.seq_stats[i].tolist() == [P * HKV, P * HKV - selected]
    assert backend.stats.sparsity("decode") > 0


def test_threshold_keeps_short_uncompacted_sequences_dense(prompts):
    lens, tables, data = prompts
    backend, cache = make_backend(topk=1, threshold=31)
    run_prefill(backend, cache, lens, tables, data, [BUDGET, 0, 0])  # seq 1 (29 tokens) is below the threshold
    q, k, v, out, meta = decode_step(backend, cache, tables, [BUDGET + 1, lens[1] + 1, lens[2] + 1],
                                     torch.Generator().manual_seed(2))
    for i in (1, 2):
        ref = attend(q[i:i + 1], torch.cat([data[i][1], k[i:i + 1]]), torch.cat([data[i][2], v[i:i + 1]]))
        torch.testing.assert_close(out[i:i + 1], ref)
    assert meta.seq_stats[1, 1] == 0 and meta.seq_stats[0, 1] > 0  # the compacted one is sparse


def test_freed_sequence_state_is_dropped(prompts):
    lens, tables, data = prompts
    backend, cache = make_backend()
    run_prefill(backend, cache, lens, tables, data, [0, 0, 0])
    assert set(backend.window_q) == {0, 1, 2}
    for sid in range(3):
        backend.on_sequence_freed(sid)
    assert not backend.window_q and not backend.pending and not backend.compacted


def test_config_errors_are_clear(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # other test modules turn the interpreter on at import
    b = TorchRocketBackend(LayerSpec(0, H, HKV, D, SCALE, "l0"), params())
    with pytest.raises(ValueError, match="page_size=4 must divide kv_cache_config.block_size=2"):
        b.cache_spec(2, torch.float32)
    assert backend_class("torch", "rocket", "cpu") is TorchRocketBackend
    assert backend_class("auto", "rocket", "cpu") is TorchRocketBackend
    with pytest.raises(ValueError, match="attention_backend='triton' is not available on cpu"):
        backend_class("triton", "rocket", "cpu")  # the Triton rocket backend needs CUDA (or the interpreter)

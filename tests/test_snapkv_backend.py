"""SnapKVBackend (snapkv, ada_snapkv) on a hand-built paged cache in float64: dense prefill, compaction into
per-head packed slots, masked decode vs a dense reference masked to the same kept sets (on original positions)."""
from __future__ import annotations

import pytest
import torch

from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.registry import backend_class
from sparse_llm.backends.snapkv import SnapKVBackend
from sparse_llm.backends.snapkv_select import ada_keep, snapkv_keep, window_scores
from sparse_llm.configs.sparse_more import SnapKVParams
from sparse_llm.engine.block_manager import BlockManager
from sparse_llm.engine.compaction import CompactionPolicy, apply_compaction
from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.engine.scheduler import ScheduledBatch
from sparse_llm.engine.sequence import Sequence
from sparse_llm.models.testing import chunk_metadata

D, BS, NB = 8, 8, 32
BUDGET, W, KS = 13, 4, 3


def params(algorithm="snapkv", pooling="max", alpha=None):
    return SnapKVParams(algorithm, window_size=W, kernel_size=KS, pooling=pooling, prompt_budget=BUDGET, floor_alpha=alpha)


def make_backend(H, HKV, **kw):
    b = SnapKVBackend(LayerSpec(0, H, HKV, D, D ** -0.5, "l0"), params(**kw))
    cache = {s.name: torch.full((NB, *s.block_shape), float("nan"), dtype=torch.float64) for s in b.cache_spec(BS, torch.float64)}
    return b, cache


def meta_for(tables, starts, qlens, num_prefills, compact_to):
    return chunk_metadata(tables, starts, qlens, num_prefills, range(len(qlens)), compact_to, BS)


def attend(q, k, v, mask, G):
    """Float64 reference: q [n, H, D] are the last n positions of k/v [L, Hkv, D]; mask [Hkv, L] (True = keep)."""
    s = torch.einsum("qhd,lhd->hql", q, k.repeat_interleave(G, 1)) * D ** -0.5
    L, n = k.shape[0], q.shape[0]
    s = s.masked_fill(torch.arange(L)[None, :] > torch.arange(L - n, L)[:, None], float("-inf"))
    s = s.masked_fill(~mask.repeat_interleave(G, 0)[:, None, :], float("-inf"))
    return torch.einsum("hql,lhd->qhd", torch.softmax(s, -1), v.repeat_interleave(G, 1))


def kept_sets(data, p, H, HKV):
    """Per KV head the kept prompt positions, chosen by the selection functions on the full prompt."""
    q, k, _ = data
    score = window_scores(q[-W:], k, D ** -0.5, KS, p.pooling)
    if p.algorithm == "ada_snapkv":
        keep, lens = ada_keep(score, BUDGET, W, p.floor_alpha)
        return [keep[h, : lens[h]].tolist() for h in range(HKV)]
    return snapkv_keep(score, BUDGET, W).tolist()


CASES = [  # (H, Hkv, algorithm, pooling, floor_alpha)
    (6, 2, "snapkv", "max", None),
    (4, 4, "snapkv", "avg", None),
    (6, 3, "ada_snapkv", "max", 0.2),
    (8, 2, "ada_snapkv", "avg", 0.0),
]


@pytest.fixture
def prompts():
    g = torch.Generator().manual_seed(3)
    lens = [37, 29, 10]  # two compact, the last is shorter than the budget
    perm = torch.randperm(NB, generator=g).tolist()
    return lens, [perm[0:6], perm[6:11], perm[11:13]]


def run(case, prompts, chunks=None, decode_steps=5):
    """Prefill (optionally chunked), compaction, then decode steps; returns what the checks need."""
    H, HKV, algorithm, pooling, alpha = case
    lens, tables = prompts
    g = torch.Generator().manual_seed(11)  # the same data for every run of a case
    backend, cache = make_backend(H, HKV, algorithm=algorithm, pooling=pooling, alpha=alpha)
    data = [(torch.randn(n, H, D, generator=g, dtype=torch.float64), torch.randn(n, HKV, D, generator=g, dtype=torch.float64),
             torch.randn(n, HKV, D, generator=g, dtype=torch.float64)) for n in lens]
    chunks = chunks or [[0, n] for n in lens]
    prefill_out = [[] for _ in lens]
    for c in range(len(chunks[0]) - 1):
        starts, ends = [ch[c] for ch in chunks], [ch[c + 1] for ch in chunks]
        last = [e == n for e, n in zip(ends, lens)]
        meta = meta_for(tables, starts, [e - s for s, e in zip(starts, ends)], len(lens),
                        [BUDGET if lt and n > BUDGET else 0 for lt, n in zip(last, lens)])
        out = backend.forward(*(torch.cat([d[j][s:e] for d, s, e in zip(data, starts, ends)]) for j in range(3)), cache, meta)
        backend.on_step_end(cache, meta)
        cu = meta.cu_seqlens_q.tolist()
        for i in range(len(lens)):
            prefill_out[i].append(out[cu[i]:cu[i + 1]])
    compact_to = meta.compact_to  # raised by ada layers to their longest head
    cache_lens = [c or n for c, n in zip(compact_to, lens)]
    decodes = []
    full = [list(d) for d in data]  # original positions, generated tokens appended
    for step in range(decode_steps):
        kv_lens = [c + step + 1 for c in cache_lens]
        m = meta_for(tables, [x - 1 for x in kv_lens], [1] * len(lens), 0, [0] * len(lens))
        q, k, v = (torch.randn(len(lens), *s, generator=g, dtype=torch.float64) for s in [(H, D), (HKV, D), (HKV, D)])
        out = backend.forward(q, k, v, cache, m)
        for i in range(len(lens)):
            full[i] = [full[i][0], torch.cat([full[i][1], k[i:i + 1]]), torch.cat([full[i][2], v[i:i + 1]])]
        decodes.append((q, out, m))
    return backend, cache, data, [torch.cat(o) for o in prefill_out], compact_to, decodes, full


@pytest.mark.parametrize("case", CASES)
def test_prefill_dense_compaction_packs_and_decode_matches_masked_reference(case, prompts):
    H, HKV, algorithm, _, _ = case
    lens, tables = prompts
    backend, cache, data, prefill, compact_to, decodes, full = run(case, prompts)
    G = H // HKV
    for (q, k, v), o in zip(data, prefill):  # prefill is dense
        torch.testing.assert_close(o, attend(q, k, v, torch.ones(HKV, k.shape[0], dtype=torch.bool), G))
    p = backend.params
    for i in range(3):
        blocks = cache["kv"][torch.tensor(tables[i])]
        ck, cv = blocks[:, 0].reshape(-1, HKV, D), blocks[:, 1].reshape(-1, HKV, D)
        if i == 2:
            assert compact_to[i] == 0
            sets = [list(range(lens[i]))] * HKV
        else:
            sets = kept_sets(data[i], p, H, HKV)
            assert compact_to[i] == max(len(s) for s in sets) >= BUDGET
            assert sum(len(s) for s in sets) == HKV * BUDGET
            if algorithm == "snapkv":
                assert compact_to[i] == BUDGET
            else:  # heads differ in length: slots [n_h, C) must be masked
                assert len({len(s) for s in sets}) > 1
            for h, s in enumerate(sets):  # head h: slots [0, n_h) hold its kept tokens in order
                assert torch.equal(ck[: len(s), h], data[i][1][s, h]) and torch.equal(cv[: len(s), h], data[i][2][s, h])
        n_prompt = lens[i]
        for step, (q, out, m) in enumerate(decodes):
            L = n_prompt + step + 1
            mask = torch.zeros(HKV, L, dtype=torch.bool)
            for h, s in enumerate(sets):
                mask[h, s] = True
            mask[:, n_prompt:] = True  # the generated tokens
            ref = attend(q[i:i + 1], full[i][1][:L], full[i][2][:L], mask, G)
            torch.testing.assert_close(out[i:i + 1], ref)
            kept = sum(len(s) for s in sets) + HKV * (step + 1)
            assert m.seq_stats[i].tolist() == [HKV * L, HKV * L - kept]
    assert backend.stats.sparsity("decode") > 0.3
    assert backend.stats.sparsity("prefill") is None  # prefill is dense


@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_chunked_prefill_keeps_the_same_tokens(case, prompts):
    """A last chunk shorter than the window still scores with the whole window (queries kept across chunks)."""
    whole = run(case, prompts, decode_steps=2)
    chunked = run(case, prompts, chunks=[[0, 20, 35, 37], [0, 3, 27, 29], [0, 4, 9, 10]], decode_steps=2)
    assert chunked[4] == whole[4]
    for a, b in zip(chunked[3], whole[3]):
        torch.testing.assert_close(a, b)
    for (_, oa, _), (_, ob, _) in zip(chunked[5], whole[5]):
        torch.testing.assert_close(oa, ob)
    assert not chunked[0].pending and not chunked[0].window_q  # all decoded: per-sequence windows dropped
    for sid in range(3):
        chunked[0].on_sequence_freed(sid)
    assert not chunked[0].compacted


def test_engine_frees_blocks_to_the_longest_head():
    """Ada-SnapKV: the engine keeps ceil(max over layers and heads of n_h / block_size) blocks, frees the rest."""
    seq = Sequence("r", 0, list(range(53)), SamplingParams(max_tokens=4), 4096, detokenizer=None)
    bm = BlockManager(num_blocks=20, block_size=8, enable_prefix_caching=False)
    ada = SnapKVParams("ada_snapkv", window_size=4, prompt_budget=20, floor_alpha=0.2)
    policy = CompactionPolicy.from_layer_params([ada, ada])
    assert bm.ensure_blocks(seq, 53) and len(seq.block_table) == 7
    batch = ScheduledBatch([seq], [53], 1)
    compact_to = policy.targets(batch)
    assert compact_to == [20]
    compact_to[0] = max(compact_to[0], 27)  # what a layer whose longest head kept 27 tokens does in on_step_end
    seq.num_computed_tokens += 53
    assert apply_compaction(bm, batch, compact_to) == 3
    assert len(seq.block_table) == 4 and (seq.num_kv_tokens, seq.num_evicted_tokens) == (27, 26)


def test_config_errors_and_registry(monkeypatch):
    from sparse_llm.configs.sparse import parse_sparse_config

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend_class("auto", "ada_snapkv", "cpu") is SnapKVBackend
    with pytest.raises(ValueError, match="attention_backend='triton' cannot run algorithm 'snapkv'"):
        backend_class("triton", "snapkv", "cpu")
    with pytest.raises(ValueError, match=r"prompt_budget \(64\) must be larger than window_size \(64\)"):
        parse_sparse_config({"algorithm": "snapkv", "prompt_budget": 64})  # the default window: 64 since session 6
    assert parse_sparse_config({"algorithm": "ada_snapkv"}).window_size == 64
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        parse_sparse_config({"algorithm": "ada_snapkv", "kernel_size": 4})
    with pytest.raises(ValueError, match="floor_alpha"):
        parse_sparse_config({"algorithm": "ada_snapkv", "floor_alpha": 1.5})
    with pytest.raises(ValueError, match="floor_alpha"):
        parse_sparse_config({"algorithm": "snapkv", "floor_alpha": 0.5})  # SnapKV has no floor: strict fields
    with pytest.raises(ValueError, match="compacting layers must share"):
        CompactionPolicy.from_layer_params([params(), SnapKVParams("rocket", prompt_budget=BUDGET)])
    with pytest.raises(ValueError, match=r"algorithm 'snapkv' compacts the paged cache .* layers \[0\]"):
        CompactionPolicy.from_layer_params([None, params()])

"""The block-sparse engine backends on hand-built paged steps (prefill chunks + decodes, shuffled pages)
against float64 attention under masks built from the same selections."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.base import AttentionMetadata, LayerSpec
from sparse_llm.backends.flexprefill import FlexPrefillTorchBackend, FlexPrefillTritonBackend
from sparse_llm.backends.paged_batch import random_paged_batch, reference_attention
from sparse_llm.backends.quest import MINMAX, QuestTorchBackend, QuestTritonBackend
from sparse_llm.backends.registry import backend_class
from sparse_llm.backends.vertical_slash import VerticalSlashTorchBackend, VerticalSlashTritonBackend
from sparse_llm.backends.xattention import XAttentionTorchBackend, XAttentionTritonBackend
from sparse_llm.configs.sparse_more import FlexPrefillParams, QuestParams, VerticalSlashParams, XAttentionParams
from sparse_llm.sparse.block_selection import causal_pairs, per_sequence_pairs, prefill_tiles
from sparse_llm.sparse.block_sparse_torch import block_sparse_sequence, masked_attention
from sparse_llm.sparse.quest import page_minmax, page_scores, select_pages

H, HKV, D, PAGE = 6, 2, 16, 8
LAYER = LayerSpec(layer_idx=3, num_heads=H, num_kv_heads=HKV, head_dim=D, scale=D**-0.5, module_name="model.layers.3.self_attn")

PREFILL_BACKENDS = [
    (XAttentionTorchBackend, XAttentionParams("xattention", threshold=(0.8,), stride=4, block_size=16)),
    (XAttentionTritonBackend, XAttentionParams("xattention", threshold=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95), stride=4, block_size=16)),
    (FlexPrefillTorchBackend, FlexPrefillParams("flexprefill", gamma=0.8, tau=0.3, min_budget=16, block_size=16)),
    (FlexPrefillTritonBackend, FlexPrefillParams("flexprefill", gamma=0.8, tau=0.3, min_budget=16, block_size=16)),
    (VerticalSlashTorchBackend, VerticalSlashParams("vertical_slash", vertical_size=6, slash_size=5, last_q=16,
                                                    sink_tokens=2, local_diagonals=3, block_size=16)),
    (VerticalSlashTritonBackend, VerticalSlashParams("vertical_slash", vertical_size=6, slash_size=5, last_q=16,
                                                     sink_tokens=2, local_diagonals=3, block_size=16)),
]


@pytest.mark.parametrize("cls,params", PREFILL_BACKENDS, ids=lambda x: getattr(x, "__name__", ""))
def test_sparse_prefill_backends_match_reference(cls, params):
    # A whole prompt, a chunk of a longer prompt (cached prefix), and two decodes (dense).
    q_lens, kv_lens, n_pre = [70, 29, 1, 1], [70, 93, 40, 17], 2
    batch = random_paged_batch(q_lens, kv_lens, n_pre, H, HKV, D, PAGE, torch.float32, seed=hash(cls.__name__) % 1000)
    meta = batch.meta
    meta.seq_stats = torch.zeros(len(q_lens), 2, dtype=torch.int64)
    backend = cls(LAYER, params)
    out = backend.forward(batch.q, batch.k, batch.v, batch.cache, meta)
    cu = meta.cu_seqlens_q.tolist()
    skipped_any = False
    for i in range(n_pre):
        qi = batch.q[cu[i]:cu[i + 1]]
        kf, vf = batch.k_full[i], batch.v_full[i]
        sel = backend.prefill_selection(qi.transpose(0, 1)[None], kf.transpose(0, 1)[None])
        tiles = prefill_tiles([q_lens[i]], [kv_lens[i]], params.block_size, "cpu")
        ref = block_sparse_sequence(qi.double(), kf.double(), vf.double(), D**-0.5, tiles, sel, 0)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]].double(), ref, rtol=3e-5, atol=3e-5)
        total, attended = per_sequence_pairs(tiles, sel, torch.tensor([q_lens[i]]), torch.tensor([kv_lens[i]]), H)
        assert meta.seq_stats[i].tolist() == [int(total[0]), int(total[0] - attended[0])]
        assert int(total[0]) == int(causal_pairs(torch.tensor([q_lens[i]]), torch.tensor([kv_lens[i]]))[0]) * H
        skipped_any |= int(attended[0]) < int(total[0])
    assert skipped_any  # the patterns really are sparse here
    dense = reference_attention(batch, D**-0.5)
    torch.testing.assert_close(out[cu[n_pre]:].double(), dense[cu[n_pre]:], rtol=3e-5, atol=3e-5)
    assert meta.seq_stats[n_pre:, 1].tolist() == [0, 0]  # decodes are dense
    assert backend.stats.sparsity("prefill") > 0 and backend.stats.sparsity("decode") == 0


def _prefix_meta(batch, q_lens, kv_lens) -> AttentionMetadata:
    """A metadata whose slot mapping covers each sequence's cached prefix (to build Quest's page stats)."""
    m = batch.meta
    slots = []
    for i, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        pos = torch.arange(kl - ql)
        slots.append(m.block_tables[i].long()[pos // PAGE] * PAGE + pos % PAGE)
    return AttentionMetadata(1, 1, m.cu_seqlens_q, m.seq_lens, 1, 1, torch.cat(slots), m.block_tables, PAGE)


@pytest.mark.parametrize("cls", [QuestTorchBackend, QuestTritonBackend])
def test_quest_backend_matches_reference(cls):
    budget, qpage = 16, 4  # 4 pages of 4 tokens per query head; two Quest pages per KV block of 8
    q_lens, kv_lens, n_pre = [21, 1, 1, 1], [21, 58, 9, 33], 1
    d = 64  # a head dim of the page-sparse decode kernel
    batch = random_paged_batch(q_lens, kv_lens, n_pre, H, HKV, d, PAGE, torch.float32, seed=5)
    layer = LayerSpec(layer_idx=3, num_heads=H, num_kv_heads=HKV, head_dim=d, scale=d**-0.5, module_name="l3")
    backend = cls(layer, QuestParams("quest", token_budget=budget, page_size=qpage))
    (kv_spec, mm_spec) = backend.cache_spec(PAGE, torch.float32)
    assert mm_spec.name == MINMAX and mm_spec.block_shape == (2, 2, HKV, d)
    batch.cache[MINMAX] = torch.full((batch.cache["kv"].shape[0], *mm_spec.block_shape), float("nan"))
    backend.update_cache(batch.cache, _prefix_meta(batch, q_lens, kv_lens))
    meta = batch.meta
    meta.seq_stats = torch.zeros(len(q_lens), 2, dtype=torch.int64)
    out = backend.forward(batch.q, batch.k, batch.v, batch.cache, meta)
    dense = reference_attention(batch, d**-0.5)
    torch.testing.assert_close(out[:21].double(), dense[:21], rtol=3e-5, atol=3e-5)  # prefill is dense
    for j, kv_len in enumerate(kv_lens[n_pre:]):
        i = n_pre + j
        kf, vf = batch.k_full[i].double(), batch.v_full[i].double()
        lo, hi = page_minmax(kf, qpage)
        n_pages = -(-kv_len // qpage)
        qd = batch.q[21 + j:22 + j].double()
        pages = select_pages(page_scores(qd, lo[None], hi[None]), torch.tensor([n_pages]), budget // qpage)[0]  # [H, P]
        keymask = pages.repeat_interleave(qpage, -1)[:, :kv_len]
        ref = masked_attention(qd, kf, vf, d**-0.5, torch.tensor([kv_len - 1]), keymask[None])
        torch.testing.assert_close(out[21 + j:22 + j].double(), ref, rtol=3e-5, atol=3e-5)
        attended = int(torch.minimum(keymask.sum(-1), torch.tensor(kv_len)).sum())
        assert meta.seq_stats[i].tolist() == [kv_len * H, kv_len * H - attended]
    assert meta.seq_stats[2, 1] == 0  # 9 tokens: within the budget, dense
    assert backend.stats.sparsity("decode") > 0.3


def test_registry_entries_and_param_errors():
    for algo, torch_cls, triton_cls in [
        ("xattention", XAttentionTorchBackend, XAttentionTritonBackend),
        ("flexprefill", FlexPrefillTorchBackend, FlexPrefillTritonBackend),
        ("vertical_slash", VerticalSlashTorchBackend, VerticalSlashTritonBackend),
        ("quest", QuestTorchBackend, QuestTritonBackend),
    ]:
        assert backend_class("torch", algo, "cpu") is torch_cls
        assert backend_class("auto", algo, "cpu") is torch_cls
        assert backend_class("triton", algo, "cpu") is triton_cls  # under TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="one per query head"):
        XAttentionTorchBackend(LAYER, XAttentionParams("xattention", threshold=(0.9, 0.8)))
    with pytest.raises(ValueError, match="needs QuestParams"):
        QuestTorchBackend(LAYER, XAttentionParams("xattention"))
    with pytest.raises(ValueError, match="must divide the KV cache block_size=8"):
        QuestTorchBackend(LAYER, QuestParams("quest", token_budget=64, page_size=16)).cache_spec(8, torch.float32)


def _last_tile_blocks(sel, n_tiles: int) -> list[int]:
    """Number of KV blocks each selection head keeps for the last query tile."""
    off = sel.block_offsets.tolist()
    first = (n_tiles - 1) * sel.num_heads
    return [off[first + h + 1] - off[first + h] for h in range(sel.num_heads)]


@pytest.mark.parametrize("cls,params", [
    (XAttentionTorchBackend, XAttentionParams("xattention", threshold=(0.5,), stride=4, block_size=16)),
    (XAttentionTritonBackend, XAttentionParams("xattention", threshold=(0.5,), stride=4, block_size=16)),
    (FlexPrefillTorchBackend, FlexPrefillParams("flexprefill", gamma=0.5, tau=0.3, min_budget=16, block_size=16)),
    (FlexPrefillTritonBackend, FlexPrefillParams("flexprefill", gamma=0.5, tau=0.3, min_budget=16, block_size=16)),
], ids=lambda x: getattr(x, "__name__", ""))
def test_dense_last_block_keeps_every_key_block_for_the_last_query_tile(cls, params):
    """dense_last_block: the last query tile attends every causal block (its rows equal dense attention), the
    other tiles keep the estimator's selection; without it the same input drops blocks in that tile."""
    import dataclasses

    q_lens, kv_lens, n_pre = [70, 45], [150, 45], 2  # a chunk after a cached prefix, and a whole prompt
    batch = random_paged_batch(q_lens, kv_lens, n_pre, H, HKV, D, PAGE, torch.float32, seed=7)
    cu = batch.meta.cu_seqlens_q.tolist()
    on = dataclasses.replace(params, dense_last_block=True)
    plain, forced = cls(LAYER, params), cls(LAYER, on)
    out = forced.forward(batch.q, batch.k, batch.v, batch.cache, batch.meta)
    dense = reference_attention(batch, D**-0.5)
    dropped_before = False
    for i in range(n_pre):
        qi = batch.q[cu[i]:cu[i + 1]].transpose(0, 1)[None]
        ki = batch.k_full[i].transpose(0, 1)[None]
        tiles = prefill_tiles([q_lens[i]], [kv_lens[i]], params.block_size, "cpu")
        n_blocks = -(-kv_lens[i] // params.block_size)
        s_plain, s_forced = plain.prefill_selection(qi, ki), forced.prefill_selection(qi, ki)
        assert _last_tile_blocks(s_forced, tiles.num_tiles) == [n_blocks] * s_forced.num_heads
        dropped_before |= min(_last_tile_blocks(s_plain, tiles.num_tiles)) < n_blocks
        # earlier tiles: the estimator's own selection, untouched
        n_rows = (tiles.num_tiles - 1) * s_plain.num_heads
        assert s_forced.block_offsets[: n_rows + 1].tolist() == s_plain.block_offsets[: n_rows + 1].tolist()
        # the rows of the last tile equal dense attention
        last_start = int(tiles.start[-1]) - (kv_lens[i] - q_lens[i])
        rows = slice(cu[i] + max(last_start, 0), cu[i + 1])
        torch.testing.assert_close(out[rows].double(), dense[rows], rtol=3e-5, atol=3e-5)
    assert dropped_before  # the plain estimator really drops blocks of the last tile on this input

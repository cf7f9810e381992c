"""DSA backends on one mixed step (chunked prefill with a cached prefix, a fresh prefill, decodes; sparse and
dense sequences): the torch backend against a brute-force float64 reference (full logits, torch.topk, masked
dense softmax), and the Triton backend (interpreter) against the torch backend, for both key-cache types."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.base import AttentionMetadata, LayerSpec
from sparse_llm.backends.dsa_base import IndexerInputs
from sparse_llm.backends.dsa_cache import gather_indexer_k, prepare_indexer_query, write_indexer_k, write_latent
from sparse_llm.backends.dsa_torch import DsaTorchBackend, MlaDenseTorchBackend
from sparse_llm.backends.dsa_triton import DsaTritonBackend, MlaDenseTritonBackend
from sparse_llm.backends.registry import create_backends
from sparse_llm.configs.params import DsaParams, SkipSoftmaxParams

PAGE, HEADS, DV, DPE, IDX_HEADS, IDX_DIM, TOPK = 4, 3, 32, 16, 4, 32, 8
# (q_len, kv_len): a chunk after a cached prefix (sparse), a short prefill (dense), two decodes (sparse, dense)
STEP = [(7, 23), (5, 5), (1, 19), (1, 6)]
NUM_PREFILLS = 2
SPEC = LayerSpec(0, HEADS, 1, DV + DPE, 0.25, "model.layers.0.self_attn", v_head_dim=DV, attention_type="mla")


def _params(kind: str, **kw) -> DsaParams:
    fields = dict(index_n_heads=IDX_HEADS, index_head_dim=IDX_DIM, index_topk=TOPK, indexer_k_dtype=kind)
    return DsaParams("dsa", **{**fields, **kw})


def _step(backend, seed=0):
    """Fill each sequence's cached prefix, then return (this step's inputs, cache, meta, full-sequence tensors)."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-kv // PAGE) for _, kv in STEP]
    perm = torch.randperm(sum(n_blocks) + 3, generator=g)
    specs = backend.cache_spec(PAGE, torch.float32)
    cache = {s.name: torch.zeros((sum(n_blocks) + 3, *s.block_shape), dtype=s.dtype) for s in specs}
    tables = torch.zeros(len(STEP), max(n_blocks), dtype=torch.int32)
    full, slots_new = [], []
    used = 0
    for i, (q_len, kv_len) in enumerate(STEP):
        tables[i, : n_blocks[i]] = perm[used:used + n_blocks[i]]
        used += n_blocks[i]
        slots = torch.tensor([int(tables[i, p // PAGE]) * PAGE + p % PAGE for p in range(kv_len)])
        seq = {
            "latent": torch.randn(kv_len, 1, DV + DPE, generator=g),
            "k": torch.randn(kv_len, IDX_DIM, generator=g),
            "q": torch.randn(q_len, HEADS, DV + DPE, generator=g),
            "iq": torch.randn(q_len, IDX_HEADS, IDX_DIM, generator=g),
            "w": torch.randn(q_len, IDX_HEADS, generator=g),
        }
        prefix = kv_len - q_len
        write_latent(cache["kv"], seq["latent"][:prefix], slots[:prefix])
        if "indexer_k" in cache:
            write_indexer_k(cache, seq["k"][:prefix], slots[:prefix])
        full.append(seq)
        slots_new.append(slots[prefix:])
    q_lens = [q for q, _ in STEP]
    meta = AttentionMetadata(
        num_prefills=NUM_PREFILLS,
        num_prefill_tokens=sum(q_lens[:NUM_PREFILLS]),
        cu_seqlens_q=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
        seq_lens=torch.tensor([kv for _, kv in STEP], dtype=torch.int32),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(kv for _, kv in STEP),
        slot_mapping=torch.cat(slots_new),
        block_tables=tables,
        block_size=PAGE,
        seq_stats=torch.zeros(len(STEP), 2, dtype=torch.int64),
        seq_lens_cpu=[kv for _, kv in STEP],
        query_lens_cpu=q_lens,
    )
    cat = lambda name: torch.cat([s[name][-q:] if name in ("latent", "k") else s[name] for s, (q, _) in zip(full, STEP)])
    inputs = (cat("q"), cat("latent"), IndexerInputs(k=cat("k"), q=cat("iq"), weights=cat("w")))
    return inputs, cache, meta, full


def _brute_force(backend, cache, meta, full) -> torch.Tensor:
    """Every query row: float64 logits over all causal keys (keys as cached), top-k by a stable sort (ties
    to the lowest positions), masked softmax. backend=None: dense causal attention."""
    outs = []
    for i, ((q_len, kv_len), seq) in enumerate(zip(STEP, full)):
        pos = torch.arange(kv_len - q_len, kv_len)
        causal = torch.arange(kv_len)[None, :] <= pos[:, None]
        keep = causal.clone()
        if backend is not None and backend.seq_is_sparse(kv_len):
            keys = gather_indexer_k(cache, meta.block_tables[i:i + 1], torch.arange(kv_len)[None], torch.float64)[0]
            iq, iw = prepare_indexer_query(seq["iq"], seq["w"], cache)  # fp8 cache: rotated, e4m3 q; scales in iw
            scores = torch.einsum("qhd,sd->qhs", iq.double(), keys).relu()
            logits = torch.einsum("qh,qhs->qs", iw.double(), scores).masked_fill(~causal, float("-inf"))
            topk = backend.params.index_topk
            top = logits.sort(dim=-1, descending=True, stable=True).indices[:, :topk]  # ties: lowest positions
            keep = torch.zeros_like(causal).scatter(1, top, True) & causal
        lat = seq["latent"][:, 0].double()
        att = torch.einsum("qhd,sd->qhs", seq["q"].double(), lat) * SPEC.scale
        att = att.masked_fill(~keep[:, None, :], float("-inf")).softmax(-1)
        outs.append(torch.einsum("qhs,sv->qhv", att, lat[:, :DV]))
    return torch.cat(outs)


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_torch_backend_matches_brute_force(kind):
    backend = DsaTorchBackend(SPEC, _params(kind))
    (q, latent, idx), cache, meta, full = _step(backend)
    out = backend.forward_mla(q, latent, idx, cache, meta)
    torch.testing.assert_close(out.double(), _brute_force(backend, cache, meta, full), rtol=1e-5, atol=1e-5)
    # sequences 0 and 2 run sparse: positions >= TOPK skip (p + 1 - TOPK) keys each
    skipped = [sum(p + 1 - TOPK for p in range(kv - q, kv) if p >= TOPK) for q, kv in STEP]
    assert meta.seq_stats[:, 1].tolist() == [skipped[0], 0, skipped[2], 0]
    assert backend.stats.skipped["decode"] == skipped[2] and backend.stats.skipped["prefill"] == skipped[0]


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_triton_backend_matches_torch_backend(kind):
    outs = []
    for cls in (DsaTorchBackend, DsaTritonBackend):
        backend = cls(SPEC, _params(kind))
        (q, latent, idx), cache, meta, _ = _step(backend)
        outs.append(backend.forward_mla(q, latent, idx, cache, meta))
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-5, atol=2e-5)


def test_indexer_skipped_only_when_every_sequence_is_short():
    backend = DsaTorchBackend(SPEC, _params("bf16"))
    (q, latent, idx), cache, meta, full = _step(backend)
    assert backend.indexer_scores_needed(meta)
    short = AttentionMetadata(1, 5, torch.tensor([0, 5], dtype=torch.int32), torch.tensor([TOPK], dtype=torch.int32),
                              5, TOPK, torch.arange(5), torch.zeros(1, 4, dtype=torch.int32), PAGE)
    assert not backend.indexer_scores_needed(short)
    no_skip = DsaTorchBackend(SPEC, _params("bf16", skip_indexer_for_short_seqs=False))
    assert no_skip.indexer_scores_needed(short)
    # with the indexer forced on, a short sequence selects every causal key: the same output as skipping it
    ref = backend.forward_mla(q, latent, idx, cache, meta)
    (q2, latent2, idx2), cache2, meta2, _ = _step(no_skip)
    torch.testing.assert_close(no_skip.forward_mla(q2, latent2, idx2, cache2, meta2), ref)


@pytest.mark.parametrize("cls", [MlaDenseTorchBackend, MlaDenseTritonBackend])
def test_dense_mla_backends_match_brute_force(cls):
    backend = cls(SPEC, None)
    (q, latent, _), cache, meta, full = _step(backend)
    out = backend.forward_mla(q, latent, None, cache, meta)
    torch.testing.assert_close(out.double(), _brute_force(None, cache, meta, full), rtol=1e-5, atol=1e-5)
    assert backend.stats.skipped == {"prefill": 0, "decode": 0} and backend.stats.total["decode"] == 19 + 6


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="num_kv_heads=1"):
        DsaTorchBackend(LayerSpec(0, 4, 4, 64, 0.1, "x"), _params("bf16"))
    with pytest.raises(ValueError, match="needs DsaParams"):
        DsaTorchBackend(SPEC, SkipSoftmaxParams("skip_softmax", prefill_factor=1.0))
    backend = DsaTorchBackend(SPEC, _params("bf16", index_head_dim=64))
    (q, latent, idx), cache, meta, _ = _step(DsaTorchBackend(SPEC, _params("bf16")))
    with pytest.raises(ValueError, match="index_head_dim=64"):
        backend.forward_mla(q, latent, idx, cache, meta)
    with pytest.raises(ValueError, match="mla/skip_softmax"):
        create_backends([SPEC], [SkipSoftmaxParams("skip_softmax", prefill_factor=1.0)], "auto", "cpu")
    assert [type(b) for b in create_backends([SPEC, SPEC], [None, _params("fp8")], "auto", "cpu")] == [
        MlaDenseTorchBackend, DsaTorchBackend]

"""XAttention's `vertical_gamma`: every query block also keeps the key blocks that hold gamma of the last query
block's true attention (the antidiagonal estimate sees a row's attention to a single token 1 time in `stride`)."""
import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch
from pydantic import ValidationError

from sparse_llm import ops
from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.paged_batch import random_paged_batch
from sparse_llm.backends.xattention import XAttentionTorchBackend, XAttentionTritonBackend
from sparse_llm.configs.sparse_more import XAttentionConfig, XAttentionParams, lower_more
from sparse_llm.sparse.block_selection import prefill_tiles, selection_from_masks, token_mask, with_vertical_blocks
from sparse_llm.sparse.block_sparse_torch import block_sparse_sequence
from sparse_llm.sparse.xattention import last_block_vertical_blocks, xattention_block_mask

H, HKV, D, PAGE = 6, 2, 16, 8
LAYER = LayerSpec(layer_idx=1, num_heads=H, num_kv_heads=HKV, head_dim=D, scale=D**-0.5, module_name="model.layers.1.self_attn")


def brute_mass(q, k, scale, n, bs):
    """float64, row by row: the last n queries' causal softmax, averaged over those rows, summed per key block."""
    b, h, sq, _ = q.shape
    sk, g = k.shape[2], h // k.shape[1]
    nkb = -(-sk // bs)
    mass = torch.zeros(b, h, nkb, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for r in range(sq - n, sq):
                pos = sk - sq + r
                p = torch.softmax(k[bi, hi // g, : pos + 1].double() @ q[bi, hi, r].double() * scale, 0)
                mass[bi, hi].index_add_(0, torch.arange(pos + 1) // bs, p / n)
    return mass


def brute_vertical(q, k, scale, gamma, bs):
    """Per head the fewest key blocks (by descending brute_mass over the last min(bs, Sq) rows) whose mass exceeds gamma."""
    b, h, sq, _ = q.shape
    nkb = -(-k.shape[2] // bs)
    masses = brute_mass(q, k, scale, min(bs, sq), bs)
    out = torch.zeros(b, h, nkb, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            mass = masses[bi, hi]
            order = sorted(range(nkb), key=lambda j: -float(mass[j]))
            total = 0.0
            for j in order:
                out[bi, hi, j] = True
                total += float(mass[j])
                if total > gamma:
                    break
    return out


@pytest.mark.parametrize("sq,sk,hkv,bs,gamma", [(77, 171, 2, 16, 0.6), (171, 171, 3, 16, 0.9), (9, 130, 1, 32, 0.5)])
def test_last_block_vertical_blocks_match_a_row_by_row_reference(sq, sk, hkv, bs, gamma):
    g = torch.Generator().manual_seed(sq + sk)
    q = torch.randn(2, 6, sq, D, generator=g)
    k = torch.randn(2, hkv, sk, D, generator=g)
    k[:, :, 37] *= 3  # a token the last rows read
    got = last_block_vertical_blocks(q, k, D**-0.5, gamma, bs)
    want = brute_vertical(q, k, D**-0.5, gamma, bs)
    assert torch.equal(got, want)
    assert 0 < int(got.sum()) < got.numel()  # neither empty nor everything: the test can fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sq,sk,h,hkv,bs,d", [(77, 171, 6, 2, 16, 16), (9, 130, 4, 1, 32, 32), (64, 200, 8, 8, 64, 16),
                                              (130, 131, 12, 4, 128, 64)])
def test_last_rows_block_mass_kernel_matches_float64(sq, sk, h, hkv, bs, d, dtype):
    from sparse_llm.kernels.last_rows_block_mass import last_rows_block_mass_triton

    g = torch.Generator().manual_seed(sq * 7 + sk)
    q = torch.randn(2, h, sq, d, generator=g)
    k = torch.randn(2, hkv, sk, d, generator=g)
    k[:, :, 5] *= 3
    q, k = q.to(dtype), k.to(dtype)
    n = min(bs, sq)
    got = last_rows_block_mass_triton(q, k, d**-0.5, n, bs)
    want = brute_mass(q, k, d**-0.5, n, bs)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got.sum(-1).double(), torch.ones(2, h, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # the strided views the backends pass ([1, H, S, D] transposed from [S, H, D]) give the same masses
    qt = q[:1].transpose(1, 2).contiguous().transpose(1, 2)
    kt = k[:1].transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(last_rows_block_mass_triton(qt, kt, d**-0.5, n, bs), got[:1])


def test_last_rows_block_mass_rejects_what_it_cannot_run():
    from sparse_llm.kernels.last_rows_block_mass import last_rows_block_mass_triton

    q, k = torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    with pytest.raises(ValueError, match="n <= 128 and block_size in 16/32/64/128, got n=200, block_size=256"):
        last_rows_block_mass_triton(q, k, 0.25, 200, 256)


def test_with_vertical_blocks_adds_each_column_to_the_causal_query_blocks():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 3, 4, 7, generator=g) < 0.2
    vertical = torch.rand(2, 3, 7, generator=g) < 0.4
    out = with_vertical_blocks(mask, 3, vertical)
    expected = mask.clone()
    for t in range(4):
        for j in range(7):
            if j <= 3 + t:
                expected[:, :, t, j] |= vertical[:, :, j]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("cls", [XAttentionTorchBackend, XAttentionTritonBackend], ids=lambda c: c.__name__)
def test_backend_keeps_the_vertical_blocks_and_matches_float64(cls):
    """The selection is the estimator's plus exactly the vertical blocks (in every causal query block); the output
    equals float64 attention under it; on these inputs the option adds blocks (the test would otherwise prove nothing)."""
    params = XAttentionParams("xattention", threshold=(0.5,), stride=4, block_size=16)
    q_lens, kv_lens, n_pre = [75, 50], [155, 50], 2
    batch = random_paged_batch(q_lens, kv_lens, n_pre, H, HKV, D, PAGE, torch.float32, seed=12)
    cu = batch.meta.cu_seqlens_q.tolist()
    plain, vert = cls(LAYER, params), cls(LAYER, dataclasses.replace(params, vertical_gamma=0.8))
    out = vert.forward(batch.q, batch.k, batch.v, batch.cache, batch.meta)
    added_any = False
    for i in range(n_pre):
        qi, kf, vf = batch.q[cu[i]:cu[i + 1]], batch.k_full[i], batch.v_full[i]
        qh, kh = qi.transpose(0, 1)[None], kf.transpose(0, 1)[None]
        mask, qb0 = xattention_block_mask(qh, kh, D**-0.5, 0.5, 4, 16, use_triton=cls is XAttentionTritonBackend)
        expected = with_vertical_blocks(mask, qb0, brute_vertical(qh, kh, D**-0.5, 0.8, 16))
        tiles = prefill_tiles([q_lens[i]], [kv_lens[i]], 16, "cpu")
        s_vert, s_plain = vert.prefill_selection(qh, kh), plain.prefill_selection(qh, kh)
        t_vert, t_plain = token_mask(tiles, s_vert, kv_lens[i]), token_mask(tiles, s_plain, kv_lens[i])
        want = token_mask(tiles, selection_from_masks(expected[0].transpose(0, 1), 16), kv_lens[i])
        assert torch.equal(t_vert, want)
        added_any |= bool((t_vert & ~t_plain).any())
        ref = block_sparse_sequence(qi.double(), kf.double(), vf.double(), D**-0.5, tiles, s_vert, 0)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]].double(), ref, rtol=3e-5, atol=3e-5)
    assert added_any


def test_ops_vertical_gamma_and_config():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 150, D, generator=g), torch.randn(1, 2, 150, D, generator=g),
               torch.randn(1, 2, 150, D, generator=g))
    paper = dict(threshold=0.5, stride=4, block_size=16, local_window=0, dense_last_block=False)
    _, sp0 = ops.xattention_prefill(q, k, v, vertical_gamma=0.0, **paper)
    _, sp1 = ops.xattention_prefill(q, k, v, vertical_gamma=0.9, **paper)
    assert sp1 < sp0
    with pytest.raises(ValueError, match="vertical_gamma must be in \\[0, 1\\], got 1.5"):
        ops.xattention_selection(q, k, vertical_gamma=1.5)
    assert lower_more(XAttentionConfig(vertical_gamma=0.9), 9).vertical_gamma == 0.9
    with pytest.raises(ValidationError, match="vertical_gamma"):
        XAttentionConfig(vertical_gamma=-0.1)

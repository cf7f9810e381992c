"""kernels/page_bookkeeping.py (interpreter) vs the torch code it replaces: the current page's min/max refresh
and the per-step page counts, exactly, with padding rows (slot -1) that must change nothing."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.rocket import TorchRocketBackend
from sparse_llm.configs.params import RocketParams
from sparse_llm.kernels.page_bookkeeping import count_decode_pages, refresh_current_page_minmax


def decode_rows(g, lens, block_size):
    """Block tables (distinct shuffled blocks, never block 0) and the slot of each row's last token; the last row
    is padding, pointing at block 0."""
    per = -(-max(lens) // block_size) + 1
    n_blocks = len(lens) * per + 1
    tables = (torch.randperm(n_blocks - 1, generator=g)[:len(lens) * per] + 1).view(len(lens), per).to(torch.int32)
    pos = torch.tensor(lens) - 1
    slots = tables[torch.arange(len(lens)), pos // block_size].long() * block_size + pos % block_size
    slots[-1] = -1
    tables[-1] = 0  # as a replayed graph pads: length 1, table of zeros
    return tables, slots, n_blocks


@pytest.mark.parametrize("page_size,block_size,hkv,kv_dtype,kt_dtype", [
    (4, 16, 2, torch.float32, "float8_e5m2"),
    (4, 8, 3, torch.float16, "bfloat16"),
    (16, 32, 1, torch.float32, "bfloat16"),
])
def test_refresh_equals_torch(page_size, block_size, hkv, kv_dtype, kt_dtype):
    g = torch.Generator().manual_seed(page_size + hkv)
    d = 64
    lens = [1, 37, page_size, 2 * page_size + 1, 90, 1]
    tables, slots, n_blocks = decode_rows(g, lens, block_size)
    kv = torch.randn(n_blocks, 2, block_size, hkv, d, generator=g).to(kv_dtype)
    params = RocketParams("rocket", page_size=page_size, kt_cache_dtype=kt_dtype, prompt_budget=64, window_size=4)
    ref = TorchRocketBackend(LayerSpec(0, 2 * hkv, hkv, d, d ** -0.5, "l0"), params)
    spec = ref.cache_spec(block_size, kv_dtype)[1]
    kt0 = (10 * torch.randn(n_blocks, *spec.block_shape, generator=g)).to(spec.dtype)  # stale entries everywhere
    want = {"kv": kv, "kt": kt0.clone()}
    lens_t = torch.tensor(lens, dtype=torch.int32)
    ref._update_current_page(want, tables, lens_t.long(), slots)
    got = kt0.clone()
    refresh_current_page_minmax(kv, got, tables, lens_t, slots, page_size)
    assert torch.equal(got.float(), want["kt"].float())
    assert not torch.equal(got.float(), kt0.float())  # real rows did write
    assert torch.equal(got[0].float(), kt0[0].float())  # the padding row (block 0) wrote nothing


def test_count_equals_torch():
    g = torch.Generator().manual_seed(0)
    b, hkv, k, ps = 6, 3, 5, 4
    pages = torch.randint(0, 40, (b, hkv, k), generator=g, dtype=torch.int32)
    pages[torch.rand(b, hkv, k, generator=g) < 0.3] = -1
    lens = torch.randint(1, 200, (b,), generator=g, dtype=torch.int32)
    slots = torch.arange(b, dtype=torch.int64)
    slots[4] = -1  # a padding row: not counted
    dense = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.int8)
    totals = torch.tensor([7, 3], dtype=torch.int64)
    seq_stats = torch.full((b, 2), 2, dtype=torch.int64)
    count_decode_pages(pages, lens, slots, ps, totals, seq_stats, dense)

    real = slots >= 0
    total = (lens.long() + ps - 1) // ps * hkv * real
    attended = torch.where(dense.bool(), total, ((pages >= 0).sum((1, 2)) + hkv) * real)
    assert torch.equal(seq_stats, 2 + torch.stack([total, total - attended], 1))
    assert totals.tolist() == [7 + int(total.sum()), 3 + int((total - attended).sum())]
    empty = torch.zeros(2, dtype=torch.int64)
    count_decode_pages(pages[:, :, :0], lens, slots, ps, empty)  # no ranked page (k = 0): only current pages
    assert empty.tolist() == [int(total.sum()), int(total.sum()) - hkv * int(real.sum())]


@pytest.mark.parametrize("kt_dtype,storage", [(torch.float8_e5m2, torch.uint8), (torch.bfloat16, torch.int16)])
def test_refresh_rounds_like_torch(kt_dtype, storage):
    """Page size 1, so each entry is one K value rounded: ties to even, mantissa carries, subnormals, overflow."""
    g = torch.Generator().manual_seed(1)
    crafted = torch.tensor([1.875, -1.875, 1.625, 1.125, 3.5, 0.0, -0.0, 1e-5, 3e-6, -2 ** -16 * 1.5, 2 ** -17,
                            6e4, 6.2e4, -7e4, 1.00390625, 1.01171875, 255.5, 3.0e-41])
    m = 64 * 4 - len(crafted)
    vals = torch.cat([crafted, torch.randn(m, generator=g) * 10.0 ** torch.randint(-6, 5, (m,), generator=g)])
    b, d = 4, 64
    kv = torch.zeros(b, 2, 16, 1, d)
    kv[:, 0, 0, 0] = vals.view(b, d)
    kt = torch.zeros(b, 2, 16, 1, d, dtype=kt_dtype)
    tables = torch.arange(b, dtype=torch.int32)[:, None]
    refresh_current_page_minmax(kv, kt, tables, torch.ones(b, dtype=torch.int32), tables[:, 0].long() * 16, 1)
    want = vals.view(b, d).to(kt_dtype)
    assert torch.equal(kt[:, 0, 0, 0].view(storage), want.view(storage))
    assert torch.equal(kt[:, 1, 0, 0].view(storage), want.view(storage))

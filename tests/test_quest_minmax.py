"""Quest's page statistics (issue #9 accuracy analysis): the bound really bounds q·k, and the paged min/max
cache stays exact through chunked prefill (pages straddling chunks), prefix-shared blocks and decodes — the
"stale min/max" suspects for Quest's needle losses, ruled out here on random odd-sized inputs."""
import pytest
import torch

from sparse_llm.backends.base import write_kv
from sparse_llm.backends.quest import update_page_minmax
from sparse_llm.sparse.quest import page_minmax, page_scores


@pytest.mark.parametrize("page,hkv,group", [(1, 2, 3), (4, 3, 3), (16, 1, 4), (5, 2, 1)])
def test_page_bound_is_an_upper_bound_of_every_key(page, hkv, group):
    g = torch.Generator().manual_seed(page * 7 + hkv)
    s, d = 53, 12
    k = torch.randn(s, hkv, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, d, dtype=torch.float64)
    q = torch.randn(1, hkv * group, d, generator=g, dtype=torch.float64)
    lo, hi = page_minmax(k, page)
    bound = page_scores(q, lo[None], hi[None])[0]  # [H, P]
    logits = torch.einsum("hd,shd->hs", q[0], k.repeat_interleave(group, 1))
    n_pages = -(-s // page)
    true_max = torch.nn.functional.pad(logits, (0, n_pages * page - s), value=float("-inf")).view(-1, n_pages, page).amax(-1)
    assert bool((bound >= true_max - 1e-9).all())
    if page == 1:  # one key per page: the bound is q·k itself
        torch.testing.assert_close(bound, true_max)
    else:
        assert bool((bound > true_max + 1e-6).any())  # and loose once a page mixes keys


@pytest.mark.parametrize("page", [4, 8])
def test_minmax_cache_exact_through_chunks_shared_blocks_and_decodes(page):
    g = torch.Generator().manual_seed(page)
    bs, hkv, d, n_blocks = 16, 2, 8, 24
    kv = torch.zeros(n_blocks, 2, bs, hkv, d)
    mm = torch.full((n_blocks, bs // page, 2, hkv, d), float("nan"))
    table_a = torch.randperm(n_blocks, generator=g)[:6]
    # B shares A's first (full) block, as prefix caching does, then has blocks of its own.
    table_b = torch.cat([table_a[:1], torch.tensor([b for b in range(n_blocks) if b not in table_a.tolist()][:5])])
    keys = {"a": torch.randn(90, hkv, d, generator=g), "b": torch.randn(90, hkv, d, generator=g)}
    keys["b"][:bs] = keys["a"][:bs]  # the shared block holds the same tokens
    tables = {"a": table_a, "b": table_b}

    def write(name, lo, hi, dedupe):
        pos = torch.arange(lo, hi)
        slots = tables[name][pos // bs] * bs + pos % bs
        k = keys[name][lo:hi]
        write_kv(kv, k, torch.zeros_like(k), slots)
        update_page_minmax(kv, mm, slots, page, dedupe=dedupe)

    def check(name, length):
        lo, hi = page_minmax(keys[name][:length], page)
        p = torch.arange(lo.shape[0])
        got = mm[tables[name][p // (bs // page)], p % (bs // page)]
        assert torch.equal(got[:, 0], lo) and torch.equal(got[:, 1], hi)

    # A: chunks of 13, 24 and 30 tokens (chunk edges fall inside pages), then one-token decodes.
    for lo, hi in [(0, 13), (13, 37), (37, 67)]:
        write("a", lo, hi, dedupe=True)
        check("a", hi)
    write("b", bs, 41, dedupe=True)  # B's prefill skips the cached block
    check("b", 41)
    check("a", 67)  # A's pages untouched by B's write
    for t in range(67, 75):
        write("a", t, t + 1, dedupe=False)
        check("a", t + 1)
    write("b", 41, 42, dedupe=False)
    check("b", 42)
    check("a", 75)

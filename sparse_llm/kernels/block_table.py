"""Block-table entries of one key tile, shared by the prefill and decode kernels (Triton).

Both kernels carry the next tile's entries one loop iteration ahead (docs/kernels.md, "Prefetch distance"), so
the loads are masked by a limit that is the KV length for a real tile and 0 for a tile past the loop's end.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_block_entries(bt_row, start, offs_n, limit, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Entries of the keys [start, start + BLOCK_N) that lie in [0, limit), 0 elsewhere: one scalar when the page
    size is a multiple of BLOCK_N (a tile lies in one page), else one per key. Masks are `index < scalar limit`
    (`vector & scalar-bool` fails in the interpreter)."""
    if PAGE_SIZE % BLOCK_N == 0:
        entries = tl.load(bt_row + start // PAGE_SIZE, mask=(start >= 0) & (start < limit), other=0)
    else:
        kv_idx = start + offs_n
        entries = tl.load(bt_row + kv_idx // PAGE_SIZE, mask=(kv_idx >= 0) & (kv_idx < limit), other=0)
    return entries

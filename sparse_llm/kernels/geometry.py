"""Tile geometry shared by the Triton kernels and their torch references.

Skip-softmax decisions are made per KV tile, so the tile shape and the processing order are part of
the rule's meaning: a calibrated factor is only portable between implementations that cut the same
tiles. Every kernel and every reference reads its geometry from here (tests may pass smaller tiles
to both sides). Pure Python: importing this module does not import Triton.

Processing order: KV tiles in ascending key order. Prefill: one program per (query tile of BLOCK_M
rows, query head); decode: one program per (KV head, sequence, split of `split_tiles` tiles), each
split with its own running max (flash-decoding), the rows being the group's query heads. With
skip-softmax on, every decode split seeds its running max with the row max of the sequence's first
KV tile ("sink-seeded splits", kernels/decode.py), so only split 0's tile 0 is never skipped.
"""
from __future__ import annotations

import math

import torch

PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 128
# Relative widening of the key min/max box in the prefill bound pre-skip (kernels/prefill.py): it must exceed
# the rounding of the box to bf16 (2^-8) plus tf32 / fp32 accumulation error, so ub >= the kernel's score.
PREFILL_BOUND_WIDEN = 2.0 ** -6
DECODE_BLOCK_N = 64
SUPPORTED_HEAD_DIMS = (64, 128)
# SM count assumed where there is no GPU (CPU reference, Triton interpreter): an H100 / H200.
DEFAULT_NUM_SMS = 132
# Enough programs to keep every SM busy with a few resident programs each.
DECODE_PROGRAMS_PER_SM = 4
# A split shorter than this spends too much on its merge traffic.
DECODE_MIN_SPLIT_TILES = 4
# With skip-softmax every split also reads the sink tile to seed its running max: longer splits amortise it.
DECODE_MIN_SPLIT_TILES_SKIP = 8


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_sms(device: torch.device | str) -> int:
    """Streaming multiprocessors of `device`; DEFAULT_NUM_SMS on CPU so CPU and interpreter agree."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def decode_split_tiles(
    max_kv_len: int, num_seqs: int, num_kv_heads: int, sms: int, block_n: int = DECODE_BLOCK_N, skip: bool = False
) -> int:
    """KV tiles per decode split: enough splits that batch × kv_heads × splits fills the GPU.

    The decode skip decisions depend on this (each split keeps its own running max), so the Triton
    backend, the torch reference and calibration all call this with the same inputs; `skip` (the
    skip-softmax build) raises the minimum split length to DECODE_MIN_SPLIT_TILES_SKIP.
    """
    if max_kv_len < 1 or num_seqs < 1 or num_kv_heads < 1:
        raise ValueError(
            f"decode_split_tiles needs positive sizes, got max_kv_len={max_kv_len}, "
            f"num_seqs={num_seqs}, num_kv_heads={num_kv_heads}"
        )
    tiles = cdiv(max_kv_len, block_n)
    want_splits = max(1, cdiv(DECODE_PROGRAMS_PER_SM * sms, num_seqs * num_kv_heads))
    min_tiles = DECODE_MIN_SPLIT_TILES_SKIP if skip else DECODE_MIN_SPLIT_TILES
    return min(tiles, max(min_tiles, cdiv(tiles, want_splits)))


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by the Triton kernels; allowed: {SUPPORTED_HEAD_DIMS}")


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))

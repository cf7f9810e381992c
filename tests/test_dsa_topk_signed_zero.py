"""Both top-k kernels treat -0.0 and +0.0 as one value, as the oracle's sort does (TRITON_INTERPRET=1).

DSA logits produce both: a key whose every head is ReLU'd to zero scores +-0.0 depending on the sign of the
head weights, so a row can tie many signed zeros at the k-th value; the lowest positions must win.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.dsa_torch import topk_positions_ref
from sparse_llm.kernels.dsa_launch import select_topk


@pytest.mark.parametrize("method, launch", [("radix", dict(chunk=64)), ("sampled", dict(chunk=64, capacity=64))])
def test_signed_zeros_tie_at_the_kth_value(method, launch):
    g = torch.Generator().manual_seed(13)
    logits = -torch.rand(2, 301, generator=g) - 0.1
    logits[0, torch.randperm(301, generator=g)[:10]] = 1.0 + torch.rand(10, generator=g)  # row 0: 10 above the zeros
    logits[:, 40:260] = 0.0
    logits[:, 41:260:2] = -0.0  # alternate signs among the tied zeros
    n_valid = torch.tensor([301, 299], dtype=torch.int32)
    got = select_topk(logits, n_valid, 24, method=method, **launch)
    want = topk_positions_ref(logits, n_valid, 24)
    assert torch.equal(got, want)
    # row 1: the zeros are the largest values; they tie whatever their sign, lowest positions first
    assert torch.equal(want[1].long(), torch.arange(40, 64)) and bool(torch.signbit(logits[1, 41:64:2]).all())

"""The Triton backend (dense) on mixed prefill + decode steps, and the FlashInfer backend's guards."""
import importlib.util
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.backends.base import LayerSpec
from sparse_llm.backends.paged_batch import random_paged_batch, reference_attention
from sparse_llm.backends.registry import backend_class
from sparse_llm.backends.triton_backend import TritonBackend
from sparse_llm.configs.params import SkipSoftmaxParams, StreamingParams

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.parametrize("dtype,ratio,page", [(torch.float32, 3, 32), (torch.float16, 1, 16)])
def test_triton_dense_backend_on_mixed_batch(dtype, ratio, page):
    q_lens, kv_lens = [19, 130, 1, 1, 1], [19, 170, 33, 200, 8]  # full prompt, cached prefix, three decodes
    hkv = 2
    batch = random_paged_batch(q_lens, kv_lens, 2, ratio * hkv, hkv, 64, page, dtype, seed=ratio)
    layer = LayerSpec(0, ratio * hkv, hkv, 64, 0.125, "layers.0.attn")
    backend = backend_class("triton", "dense", "cpu")(layer, None)
    assert isinstance(backend, TritonBackend)
    batch.meta.seq_stats = torch.zeros(5, 2, dtype=torch.int64)
    out = backend.forward(batch.q, batch.k, batch.v, batch.cache, batch.meta)
    tol = 4e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(out.double(), reference_attention(batch, 0.125), atol=tol, rtol=0)
    assert batch.meta.seq_stats.sum() == 0  # dense layers count nothing


def test_triton_backend_rejects_what_it_cannot_run():
    layer = LayerSpec(0, 4, 2, 64, 0.125, "layers.0.attn")
    with pytest.raises(TypeError, match="StreamingParams"):
        TritonBackend(layer, StreamingParams("streaming"))
    with pytest.raises(ValueError, match="head_dim=80"):
        TritonBackend(LayerSpec(0, 4, 2, 80, 0.1, "l"), None)
    batch = random_paged_batch([1], [20], 0, 4, 2, 64, 16, torch.float32)
    batch.cache["kv"] = batch.cache["kv"].half()
    with pytest.raises(ValueError, match="cache dtype torch.float16 differs"):
        TritonBackend(layer, SkipSoftmaxParams("skip_softmax", 1.0, 1.0)).forward(
            batch.q, batch.k, batch.v, batch.cache, batch.meta)


def test_flashinfer_backend_guards():
    from sparse_llm.backends.flashinfer_backend import FlashInferBackend

    layer = LayerSpec(0, 4, 2, 64, 0.125, "layers.0.attn")
    with pytest.raises(ValueError, match="dense layers only"):
        FlashInferBackend(layer, SkipSoftmaxParams("skip_softmax", 1.0))
    with pytest.raises(ValueError, match="cannot run algorithm 'skip_softmax'"):
        backend_class("flashinfer", "skip_softmax", "cuda")
    if importlib.util.find_spec("flashinfer") is None:
        with pytest.raises(ImportError, match="flashinfer-python"):
            FlashInferBackend(layer, None)

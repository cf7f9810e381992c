"""The Triton RocketKV decode as a CUDA graph replays it (interpreter, CPU): padded static buffers from
`DecodeGraphs.load`, no host sync, no Python state change; outputs, caches and sparsity equal to the eager
step, step by step. Real graph capture needs a GPU; these tests pin down what makes it possible."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_llm.backends.base import AttentionMetadata, LayerSpec
from sparse_llm.backends.rocket import TorchRocketBackend
from sparse_llm.backends.rocket_triton import TritonRocketBackend
from sparse_llm.configs.params import RocketParams
from sparse_llm.engine.cuda_graphs import DecodeGraphs

D, H, HKV, BS = 64, 4, 2, 8
LAYER = LayerSpec(0, H, HKV, D, D ** -0.5, "model.layers.0.self_attn")
MAX_MODEL_LEN, MAX_SEQS = 64, 4
aten = torch.ops.aten


class HostSyncError(AssertionError):
    pass


class _NoSyncDispatch(TorchDispatchMode):
    """Ops that read device data on the host (a sync on CUDA): scalar reads, data-dependent shapes."""

    SCALAR_OR_SHAPE = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique2,
                       aten.masked_scatter}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in self.SCALAR_OR_SHAPE:
            raise HostSyncError(f"host sync: {func}")
        if packet in (aten.index, aten.index_put, aten.index_put_):  # boolean-mask indexing = nonzero
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None):
                raise HostSyncError(f"host sync: boolean-mask {func}")
        if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor and "output_size" not in kwargs:
            raise HostSyncError(f"host sync: {func} without output_size")
        return func(*args, **kwargs)


class _NoSyncFunction(TorchFunctionMode):
    COPIES_TO_HOST = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.COPIES_TO_HOST:
            raise HostSyncError(f"host copy: {func.__name__}")
        return func(*args, **(kwargs or {}))


class no_host_sync:
    """Raise HostSyncError on anything that would make the host wait for the device."""

    def __enter__(self):
        self.modes = [_NoSyncFunction(), _NoSyncDispatch()]
        for m in self.modes:
            m.__enter__()

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)


def test_the_guard_catches_syncs():
    x = torch.arange(6.0)
    for bad in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x.sum() > 0), lambda: x[x > 2],
                lambda: int(x.max()), lambda: x.nonzero(), lambda: x.cpu()):
        with pytest.raises(HostSyncError), no_host_sync():
            bad()
    with no_host_sync():
        torch.where(x > 2, x, 0).sum()  # device-only ops pass


def params(topk, topr, threshold=None):
    return RocketParams("rocket", window_size=4, kernel_size=3, topr=topr, topk=topk, prompt_budget=16, page_size=4,
                        kt_cache_dtype="float8_e5m2", seq_len_threshold=threshold)


def test_capturable_unless_threshold():
    assert TritonRocketBackend(LAYER, params(3, D)).supports_cuda_graphs
    assert not TritonRocketBackend(LAYER, params(3, D, threshold=100)).supports_cuda_graphs
    assert not TorchRocketBackend(LAYER, params(3, D)).supports_cuda_graphs


def start_state(lens, g):
    """K/V of sequences with the given cached lengths (room to grow to MAX_MODEL_LEN) in shuffled blocks; block 0
    is sequence 1's first block, the block a replayed graph's padding rows point at."""
    per_seq = MAX_MODEL_LEN // BS
    n_blocks = len(lens) * per_seq + 2
    order = torch.randperm(n_blocks - 1, generator=g)[:len(lens) * per_seq] + 1
    tables = order.view(len(lens), per_seq).to(torch.int32)
    tables[1, 0] = 0
    kv = torch.randn(n_blocks, 2, BS, HKV, D, generator=g)
    return kv, tables


def eager_meta(lens, tables, ids):
    n = len(lens)
    width = -(-max(lens) // BS)
    pos = torch.tensor(lens) - 1
    slots = tables[torch.arange(n), pos // BS].long() * BS + pos % BS
    return AttentionMetadata(0, 0, torch.arange(n + 1, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), 1,
                             max(lens), slots, tables[:, :width].contiguous(), BS,
                             seq_stats=torch.zeros(n, 2, dtype=torch.int64), seq_lens_cpu=list(lens), seq_ids=ids)


@pytest.mark.parametrize("topk,topr,steps", [(3, 40, 3), (20, D, 2)])  # sparse, channel subset; topk past the pages
def test_graph_path_equals_eager_step_by_step(topk, topr, steps):
    g = torch.Generator().manual_seed(topk)
    lens = [43, 7, 30]  # by step 3, seq 0 crossed into a new page, seq 1 into a new block (out of block 0)
    kv, tables = start_state(lens, g)
    ids = [5, 6, 7]
    backends = {"torch": TorchRocketBackend(LAYER, params(topk, topr)),
                "eager": TritonRocketBackend(LAYER, params(topk, topr)),
                "graph": TritonRocketBackend(LAYER, params(topk, topr))}
    kt_spec = backends["eager"].cache_spec(BS, torch.float32)[1]
    caches = {}
    for name, b in backends.items():
        cache = {"kv": kv.clone(), "kt": torch.zeros(kv.shape[0], *kt_spec.block_shape).to(kt_spec.dtype)}
        prefix = torch.tensor(lens) - 1
        b._write_pages(cache, tables, torch.zeros(3, dtype=torch.long), -(-max(lens) // 4), prefix)
        b.window_q[6] = torch.zeros(4, H, D)  # a short prompt's window, dropped once it decodes
        caches[name] = cache
    graphs = DecodeGraphs(None, MAX_SEQS, MAX_MODEL_LEN, BS, "cpu", collect_stats=True)
    for step in range(steps):
        n = len(lens)
        q, k, v = torch.randn(n, H, D, generator=g), torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
        outs, seq_stats = {}, {}
        for name in ("torch", "eager"):
            meta = eager_meta(lens, tables, ids)
            outs[name] = backends[name].forward(q, k, v, caches[name], meta)
            backends[name].on_step_end(caches[name], meta)
            seq_stats[name] = meta.seq_stats
        meta = eager_meta(lens, tables, ids)
        b = graphs.load(SimpleNamespace(input_ids=torch.zeros(n, dtype=torch.long), positions=torch.zeros(n, dtype=torch.long),
                                        meta=meta))
        assert b == MAX_SEQS > n  # one padding row
        pad = lambda x: torch.cat([x, torch.randn(b - n, *x.shape[1:], generator=g)])  # noqa: E731
        with no_host_sync():
            out = backends["graph"].forward(pad(q), pad(k), pad(v), caches["graph"], graphs.static_meta(b))
        backends["graph"].on_step_end(caches["graph"], meta)  # the runner calls it after the replay, with seq ids
        outs["graph"], seq_stats["graph"] = out[:n], graphs.seq_stats[:n]

        torch.testing.assert_close(outs["graph"], outs["eager"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs["eager"], outs["torch"], rtol=1e-4, atol=1e-4)
        assert torch.equal(seq_stats["graph"], seq_stats["eager"]) and torch.equal(seq_stats["eager"], seq_stats["torch"])
        for name in ("kv", "kt"):  # every block, block 0 included: the padding row wrote nothing
            assert torch.equal(caches["graph"][name].float(), caches["eager"][name].float()), (step, name)
            assert torch.equal(caches["eager"][name].float(), caches["torch"][name].float()), (step, name)
        lens = [n_ + 1 for n_ in lens]
    assert all(6 not in b.window_q for b in backends.values())
    sparsity = {name: b.stats.sparsity("decode") for name, b in backends.items()}
    assert sparsity["graph"] == sparsity["eager"] == sparsity["torch"] is not None
    assert backends["graph"].stats.total == backends["torch"].stats.total  # read twice: flushed once
    if topk == 3:
        assert sparsity["graph"] > 0.3
    else:
        assert sparsity["graph"] == 0.0


def test_padding_rows_alone_write_nothing():
    """The capture warm-up runs only padding rows (slot -1, length 1, block table of zeros): KT stays as it was."""
    g = torch.Generator().manual_seed(3)
    kv, _ = start_state([8, 8], g)
    b = TritonRocketBackend(LAYER, params(3, D))
    kt_spec = b.cache_spec(BS, torch.float32)[1]
    kt = torch.randn(kv.shape[0], *kt_spec.block_shape, generator=g).to(kt_spec.dtype)
    cache = {"kv": kv.clone(), "kt": kt.clone()}
    graphs = DecodeGraphs(None, MAX_SEQS, MAX_MODEL_LEN, BS, "cpu", collect_stats=True)
    with no_host_sync():
        b.forward(torch.randn(2, H, D), torch.randn(2, HKV, D), torch.randn(2, HKV, D), cache, graphs.static_meta(2))
    assert torch.equal(cache["kt"].float(), kt.float()) and torch.equal(cache["kv"], kv)
    assert b.stats.total["decode"] == 0

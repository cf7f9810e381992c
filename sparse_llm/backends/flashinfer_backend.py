"""Dense paged attention through FlashInfer (CUDA only; flashinfer-python imported on first use).

FlashInfer splits the work into `plan()` (host-side scheduling, once per engine step) and `run()`
(per layer). All layers with the same head shape share one planner; it re-plans only when it sees a
new AttentionMetadata object, i.e. once per step. Our cache layout [num_blocks, 2, block_size, Hkv, D]
is FlashInfer's combined "NHD" paged layout, so the cache is passed as is.
"""
from __future__ import annotations

import importlib

import torch

from sparse_llm.backends.base import AttentionBackend, AttentionMetadata
from sparse_llm.kernels.kv_write import kv_write

WORKSPACE_BYTES = 128 * 1024 * 1024
_workspaces: dict[torch.device, torch.Tensor] = {}
_planners: dict[tuple, "FlashInferPlanner"] = {}


def import_flashinfer():
    try:
        return importlib.import_module("flashinfer")
    except ImportError as e:
        raise ImportError("attention_backend='flashinfer' needs the flashinfer-python package") from e


def paged_kv_layout(meta: AttentionMetadata, seqs: slice, page_size: int):
    """FlashInfer's CSR page layout for sequences `seqs`: (indptr cpu, indices device, last_page_len cpu)."""
    lens_cpu = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
    lens = torch.tensor(lens_cpu[seqs], dtype=torch.int32)
    n_pages = (lens + page_size - 1) // page_size
    indptr = torch.zeros(lens.shape[0] + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(n_pages, 0)
    last_page_len = lens - (n_pages - 1) * page_size
    tables = meta.block_tables[seqs]
    used = torch.arange(tables.shape[1], device=tables.device)[None, :] < n_pages.to(tables.device)[:, None]
    return indptr, tables[used].to(torch.int32), last_page_len


class FlashInferPlanner:
    """The prefill and decode wrappers of one head shape / dtype, planned once per AttentionMetadata."""

    def __init__(self, fi, device, num_heads, num_kv_heads, head_dim, scale, q_dtype, kv_dtype):
        ws = _workspaces.get(device)
        if ws is None:
            ws = _workspaces[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        # Tensor-core decode pays off for large GQA groups (vLLM's rule).
        self.decode = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=num_heads // num_kv_heads > 4)
        self.shape = (num_heads, num_kv_heads, head_dim)
        self.scale, self.q_dtype, self.kv_dtype = scale, q_dtype, kv_dtype
        self.meta: AttentionMetadata | None = None

    def plan(self, meta: AttentionMetadata, page_size: int) -> None:
        h, hkv, d = self.shape
        common = dict(sm_scale=self.scale, q_data_type=self.q_dtype, kv_data_type=self.kv_dtype)
        npf = meta.num_prefills
        if npf:
            indptr, indices, last = paged_kv_layout(meta, slice(0, npf), page_size)
            qo_indptr = meta.cu_seqlens_q[:npf + 1].to("cpu", torch.int32)
            self.prefill.plan(qo_indptr, indptr, indices, last, h, hkv, d, page_size, causal=True, **common)
        if meta.num_decodes:
            indptr, indices, last = paged_kv_layout(meta, slice(npf, meta.num_seqs), page_size)
            self.decode.plan(indptr, indices, last, h, hkv, d, page_size, **common)
        self.meta = meta


class FlashInferBackend(AttentionBackend):
    """Dense paged prefill and decode with FlashInfer's batch wrappers."""

    name = "flashinfer"
    algorithms = frozenset({"dense"})
    devices = frozenset({"cuda"})

    def __init__(self, layer, params):
        if params is not None:
            raise ValueError(
                f"attention_backend='flashinfer' runs dense layers only, got algorithm {params.algorithm!r}"
            )
        if (layer.v_head_dim or layer.head_dim) != layer.head_dim:
            raise ValueError(f"{layer.module_name}: v_head_dim={layer.v_head_dim} must equal head_dim={layer.head_dim}")
        super().__init__(layer, params)
        self._fi = import_flashinfer()

    def _planner(self, q: torch.Tensor, kv: torch.Tensor) -> FlashInferPlanner:
        spec = self.layer
        key = (q.device, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.scale, q.dtype, kv.dtype)
        planner = _planners.get(key)
        if planner is None:
            planner = _planners[key] = FlashInferPlanner(self._fi, *key)
        return planner

    def forward(self, q, k, v, cache, meta):
        kv = cache["kv"]
        if q.device.type != "cuda":
            raise ValueError(f"attention_backend='flashinfer' needs CUDA tensors, got {q.device}")
        kv_write(kv, k, v, meta.slot_mapping)
        planner = self._planner(q, kv)
        if planner.meta is not meta:
            planner.plan(meta, kv.shape[2])
        out = torch.empty_like(q)
        npt = meta.num_prefill_tokens
        if meta.num_prefills:
            planner.prefill.run(q[:npt], kv, out=out[:npt])
        if meta.num_decodes:
            planner.decode.run(q[npt:], kv, out=out[npt:])
        return out

"""Real attention inputs for kernel benchmarks: run SmolLM2 with every layer's backend swapped for a recorder.

`swapped_backends` installs one backend per layer for the duration of a block (restoring the engine's own
afterwards); `capture_prefill_qkv` uses it to keep q/k/v of chosen layers on one RULER-style prompt
(calibration's local prompt generators, no downloads), attending densely meanwhile.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from sparse_llm.backends.base import AttentionBackend, LayerSpec, write_kv
from sparse_llm.backends.torch_dense import gather_kv, paged_attention_torch


@contextlib.contextmanager
def swapped_backends(llm, make: Callable[[LayerSpec], AttentionBackend]) -> Iterator[None]:
    runner = llm.engine.runner
    saved = (list(runner.backends), [layer.backend for layer in runner.layers], runner.graphs)
    try:
        for i, layer in enumerate(runner.layers):
            runner.backends[i] = layer.backend = make(layer.spec)
        runner.graphs = None  # recorders are host code: never replay captured graphs
        yield
    finally:
        runner.backends[:] = saved[0]
        for layer, backend in zip(runner.layers, saved[1]):
            layer.backend = backend
        runner.graphs = saved[2]


class _Capture(AttentionBackend):
    name = "torch"
    algorithms = frozenset({"capture"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, keep: dict, layers: set[int]):
        super().__init__(layer, None)
        self.keep, self.layers = keep, layers

    def forward(self, q, k, v, cache, meta):
        kv = cache["kv"]
        write_kv(kv, k, v, meta.slot_mapping)
        if self.layer.layer_idx in self.layers and meta.num_prefills:
            kk, vv = gather_kv(kv, meta.block_tables[0], meta.seq_lens_cpu[0])
            self.keep[self.layer.layer_idx] = (q[: meta.query_lens_cpu[0]].clone(), kk.clone(), vv.clone())
        return paged_attention_torch(q, kv, meta, self.layer.scale)


def capture_prefill_qkv(n_tokens: int, layers: list[int], model: str | None, device: torch.device,
                        dtype: torch.dtype) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (q [L, H, D], k [L, Hkv, D], v)} of SmolLM2 (or `model`) prefilling one prompt of L ≤ n - 8 tokens."""
    from sparse_llm import LLM, SamplingParams
    from sparse_llm.calibration.samples import build_samples

    llm = LLM(model=model, device=device.type, dtype=str(dtype).replace("torch.", ""), max_model_len=n_tokens,
              max_num_batched_tokens=n_tokens, enforce_eager=True, kv_cache_config={"max_tokens": n_tokens + 64})
    try:
        prompt = build_samples(llm.tokenizer, [n_tokens], [1], "kernel-bench", reserve=8)[n_tokens][0]
        keep: dict = {}
        with swapped_backends(llm, lambda spec: _Capture(spec, keep, set(layers))):
            llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    finally:
        llm.close()
    return keep

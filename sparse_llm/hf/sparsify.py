"""`sparsify(model, config)`: skip-softmax attention inside a Hugging Face transformers model.

Our attention is registered through transformers' AttentionInterface (and a boolean mask through its
AttentionMaskInterface), so the model's own code runs unchanged; each attention module carries its frozen
per-layer params and a SparsityStats. Exception-safe: nothing on the model changes until every check passed,
and `desparsify` / `dense_attention` restore the original attention implementation.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from sparse_llm.backends.base import LayerSpec, SparsityStats
from sparse_llm.backends.skip_softmax_torch import skip_softmax_decode_reference, skip_softmax_prefill_reference
from sparse_llm.configs.params import SkipSoftmaxParams
from sparse_llm.configs.resolve import resolve
from sparse_llm.configs.sparse import SkipSoftmaxAttentionConfig, parse_sparse_config
from sparse_llm.kernels.geometry import DECODE_BLOCK_N, decode_split_tiles, num_sms

IMPL_NAME = "sparse_llm_skip_softmax"
_STATE = "_sparse_llm"


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules transformers calls the attention interface from: they carry `layer_idx` and `num_key_value_groups`."""
    found = [(n, m) for n, m in model.named_modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")
             and type(m).__name__.endswith("Attention")]
    return sorted(found, key=lambda nm: nm[1].layer_idx)


def _valid_range(mask_row: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of a boolean key mask that must be one contiguous run (left or right padding)."""
    idx = torch.nonzero(mask_row).flatten()
    if idx.numel() == 0:
        return 0, 0
    start, stop = int(idx[0]), int(idx[-1]) + 1
    if stop - start != idx.numel():
        raise ValueError("sparse_llm attention supports causal masks with left or right padding only")
    return start, stop


def skip_softmax_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The AttentionInterface function: q [B, H, Sq, D], k/v [B, Hkv, Sk, D] -> ([B, Sq, H, D], None)."""
    state = getattr(module, _STATE, None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if state is None or state["params"] is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    params: SkipSoftmaxParams = state["params"]
    stats: SparsityStats = state["stats"]
    b, h, sq, d = query.shape
    sk = key.shape[2]
    phase = "prefill" if sq > 1 else "decode"
    factor = params.factor(phase)
    out = torch.zeros(b, sq, h, value.shape[-1], dtype=query.dtype, device=query.device)
    cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
    for i in range(b):  # a loop over batch rows (padding differs per row), never over tokens or heads
        if attention_mask is None:
            k0, k1, q0 = 0, sk, 0
        else:
            m = attention_mask[i, 0] if attention_mask.dim() == 4 else attention_mask[i]
            k0, k1 = _valid_range(m[-1].bool())
            rows = m.bool().any(-1)
            q0 = int(torch.nonzero(rows).flatten()[0]) if rows.any() else sq
        kv_len = k1 - k0
        if kv_len == 0 or q0 >= sq:
            continue
        lam = factor / kv_len if factor else 0.0
        log_lam = math.log(lam) if 0 < lam < 1 else -math.inf
        qi = query[i, :, q0:].transpose(0, 1).to(cdt)  # [Sq', H, D]
        ki = key[i, :, k0:k1].transpose(0, 1).to(cdt)
        vi = value[i, :, k0:k1].transpose(0, 1).to(cdt)
        if phase == "prefill":
            o, total, skipped = skip_softmax_prefill_reference(qi, ki, vi, scale, log_lam)
        else:
            split = decode_split_tiles(kv_len, 1, ki.shape[1], num_sms(query.device), DECODE_BLOCK_N, skip=True)
            o, counts = skip_softmax_decode_reference(qi, ki[None], vi[None], torch.tensor([kv_len]), scale,
                                                      torch.tensor([log_lam]), split)
            total, skipped = int(counts[0, 0]), int(counts[0, 1])
        out[i, q0:] = o.to(query.dtype)
        stats.add(phase, total, skipped)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL_NAME, skip_softmax_attention_forward)
    AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)


def sparsify(model: nn.Module, config: SkipSoftmaxAttentionConfig | dict, checkpoint_meta: dict | None = None) -> nn.Module:
    """Make `model` run skip-softmax attention per `config` (resolved against the checkpoint's metadata)."""
    cfg = parse_sparse_config(config)
    if not isinstance(cfg, SkipSoftmaxAttentionConfig):
        raise ValueError(f"sparsify supports algorithm 'skip_softmax'; got {getattr(cfg, 'algorithm', cfg)!r}")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules sparsify can use "
                         "(a transformers attention module with layer_idx and num_key_value_groups)")
    hf_config = model.config
    meta = checkpoint_meta if checkpoint_meta is not None else getattr(hf_config, "sparse_attention_config", None)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    specs = [LayerSpec(m.layer_idx, hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim,
                       head_dim**-0.5, name) for name, m in modules]
    params = resolve(cfg, hf_config, meta, specs)  # may raise: nothing has changed yet
    _register()
    previous = getattr(hf_config, "_attn_implementation", None) or "sdpa"
    for (_, m), p in zip(modules, params):
        setattr(m, _STATE, {"params": p, "stats": SparsityStats()})
    model.set_attn_implementation(IMPL_NAME)
    setattr(model, _STATE, {"previous": previous})
    return model


def desparsify(model: nn.Module) -> nn.Module:
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    model.set_attn_implementation(state["previous"])
    for _, m in _attention_modules(model):
        if hasattr(m, _STATE):
            delattr(m, _STATE)
    delattr(model, _STATE)
    return model


@contextlib.contextmanager
def dense_attention(model: nn.Module):
    """Temporarily run the model's original attention (e.g. to compare against dense)."""
    state = getattr(model, _STATE, None)
    if state is None:
        yield model
        return
    model.set_attn_implementation(state["previous"])
    try:
        yield model
    finally:
        model.set_attn_implementation(IMPL_NAME)


def sparsity_stats(model: nn.Module) -> dict[int, dict[str, Any]]:
    """Per layer: params and achieved sparsity per phase (None where nothing ran)."""
    out = {}
    for _, m in _attention_modules(model):
        st = getattr(m, _STATE, None)
        if st is None:
            continue
        s: SparsityStats = st["stats"]
        out[m.layer_idx] = {"dense": st["params"] is None, **{p: s.sparsity(p) for p in ("prefill", "decode")},
                            "tiles": dict(s.total)}
    return out


def print_sparsity_stats(model: nn.Module) -> str:
    rows = ["layer  prefill  decode   tiles(prefill/decode)"]
    for layer, st in sparsity_stats(model).items():
        fmt = lambda x: "  dense" if st["dense"] else ("      -" if x is None else f"{x:7.3f}")  # noqa: E731
        rows.append(f"{layer:5d}  {fmt(st['prefill'])}  {fmt(st['decode'])}   {st['tiles']['prefill']}/{st['tiles']['decode']}")
    text = "\n".join(rows)
    print(text)
    return text


def verify_output(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32) -> dict[str, Any]:
    """Greedy generations with sparse and with dense attention, side by side."""
    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False)
    sparse_ids = model.generate(**ids, **gen)[0, ids["input_ids"].shape[1]:]
    with dense_attention(model):
        dense_ids = model.generate(**ids, **gen)[0, ids["input_ids"].shape[1]:]
    n = min(len(sparse_ids), len(dense_ids))
    same = int((sparse_ids[:n] == dense_ids[:n]).long().cumprod(0).sum())
    return {
        "sparse": tokenizer.decode(sparse_ids, skip_special_tokens=True),
        "dense": tokenizer.decode(dense_ids, skip_special_tokens=True),
        "identical": bool(torch.equal(sparse_ids, dense_ids)),
        "common_prefix_tokens": same,
    }

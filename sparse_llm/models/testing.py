"""Helpers to run and build models without the engine: for tests, examples and quick checks.

- `chunk_metadata`: a hand-built step (prefill chunks, then decodes) over given block tables, with compaction targets.
- `single_prefill_logits`: one prompt through the model with a throwaway paged KV cache and the torch dense
  backend (the same code path the engine uses, minus scheduling).
- `save_tiny_checkpoint`: a small random HF checkpoint (transformers' own model class, safetensors, plus a
  byte-level tokenizer) for fast tests of loading, the engine and the HF reference side by side.
"""
from __future__ import annotations

import os

import torch

from sparse_llm.backends.base import AttentionMetadata
from sparse_llm.backends.registry import create_backends
from sparse_llm.engine.context import set_context


def prefill_metadata(num_tokens: int, block_size: int, device: torch.device | str = "cpu") -> AttentionMetadata:
    """AttentionMetadata for one sequence prefilled from position 0 into blocks 0, 1, 2, ... (contiguous slots)."""
    num_blocks = -(-num_tokens // block_size)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    return AttentionMetadata(
        num_prefills=1,
        num_prefill_tokens=num_tokens,
        cu_seqlens_q=i32([0, num_tokens]),
        seq_lens=i32([num_tokens]),
        max_seqlen_q=num_tokens,
        max_seqlen_k=num_tokens,
        slot_mapping=torch.arange(num_tokens, dtype=torch.int64, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        block_size=block_size,
        seq_lens_cpu=[num_tokens],
        query_lens_cpu=[num_tokens],
        seq_ids=[0],
    )


def chunk_metadata(tables, starts, qlens, num_prefills: int, seq_ids, compact_to, block_size: int) -> AttentionMetadata:
    """One step whose sequence i writes cache positions [starts[i], starts[i] + qlens[i]) through block table
    tables[i] (lists of block ids); the first num_prefills are prefill chunks, the rest decodes."""
    slots, lens = [], []
    for t, st, n in zip(tables, starts, qlens):
        pos = torch.arange(st, st + n)
        slots.append(torch.tensor(t)[pos // block_size].long() * block_size + pos % block_size)
        lens.append(st + n)
    width = max(len(t) for t in tables)
    cu = torch.zeros(len(qlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(qlens), 0)
    return AttentionMetadata(
        num_prefills=num_prefills, num_prefill_tokens=sum(qlens[:num_prefills]), cu_seqlens_q=cu,
        seq_lens=torch.tensor(lens, dtype=torch.int32), max_seqlen_q=max(qlens), max_seqlen_k=max(lens),
        slot_mapping=torch.cat(slots), block_size=block_size, seq_stats=torch.zeros(len(qlens), 2, dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_lens_cpu=lens, query_lens_cpu=list(qlens), seq_ids=list(seq_ids), compact_to=list(compact_to),
    )


@torch.inference_mode()
def single_prefill_logits(loaded, token_ids, block_size: int = 16, attention_backend: str = "torch") -> torch.Tensor:
    """float32 logits [T, vocab] of every position of one prompt (no engine, no sampling).

    Backends and caches are attached for this call only; whatever the layers held before is restored.
    """
    model = loaded.model
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids = torch.as_tensor(list(token_ids), dtype=torch.int64, device=device)
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    meta = prefill_metadata(ids.numel(), block_size, device)
    num_blocks = meta.block_tables.shape[1]
    layers = loaded.attention_layers
    backends = create_backends(loaded.layer_specs, [None] * len(layers), attention_backend, device)
    saved = [(layer.backend, layer.cache) for layer in layers]
    try:
        for layer, backend in zip(layers, backends):
            layer.backend = backend
            layer.cache = {
                spec.name: torch.zeros((num_blocks, *spec.block_shape), dtype=spec.dtype, device=device)
                for spec in backend.cache_spec(block_size, dtype)
            }
        set_context(meta)
        hidden = model(ids, torch.arange(ids.numel(), device=device))
        return model.compute_logits(hidden)
    finally:
        set_context(None)
        for layer, (backend, cache) in zip(layers, saved):
            layer.backend, layer.cache = backend, cache


# Small shapes with odd sizes and GQA; each architecture exercises its own attention options.
TINY_CONFIGS = {
    "LlamaForCausalLM": dict(
        model_type="llama", hidden_size=48, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    ),
    "Qwen2ForCausalLM": dict(
        model_type="qwen2", hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Qwen3ForCausalLM": dict(
        model_type="qwen3", hidden_size=40, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, tie_word_embeddings=False,
    ),
}


def tiny_hf_model(architecture: str, seed: int = 0, **overrides):
    """A random transformers model (float32, eval, sdpa attention) of one of TINY_CONFIGS."""
    import transformers

    if architecture not in TINY_CONFIGS:
        raise ValueError(f"architecture={architecture!r}; tiny configs exist for {sorted(TINY_CONFIGS)}")
    kwargs = dict(TINY_CONFIGS[architecture])
    model_type = kwargs.pop("model_type")
    kwargs.update(num_hidden_layers=2, vocab_size=300, max_position_embeddings=512, rms_norm_eps=1e-6,
                  rope_theta=10000.0, bos_token_id=256, eos_token_id=257, pad_token_id=257,
                  initializer_range=0.1)  # larger than HF's 0.02 so that logits are O(1), not O(0.01)
    kwargs.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, architectures=[architecture], **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; random values make them matter
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def byte_level_tokenizer():
    """A 256-byte vocabulary plus <|bos|> (256) and <|eos|> (257), with a ChatML-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode()[b] for b in range(256))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>")
    tok.chat_template = (
        "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
    )
    return tok


def save_tiny_checkpoint(path: str, architecture: str, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Write a tiny random checkpoint (config.json, safetensors, tokenizer) to `path`; returns the HF model."""
    model = tiny_hf_model(architecture, seed, **overrides)
    os.makedirs(path, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    byte_level_tokenizer().save_pretrained(path)
    return model

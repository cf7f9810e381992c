"""GGUF files (llama.cpp): config from the metadata, weights dequantised with the `gguf` package.

Three things differ from an HF checkpoint and are undone here:
- tensor names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
- llama.cpp's converter permutes the rows of Llama's Q and K projections (interleaved RoPE pairs); we apply
  the exact inverse, as transformers' GGUF loader does (`LlamaTensorProcessor._reverse_permute_weights`).
  Qwen2/Qwen3 use NEOX-style RoPE in llama.cpp and are stored unpermuted;
- Llama 3.1's RoPE scaling is stored as a `rope_freqs` tensor (per-frequency divisors), not as metadata.
The tokenizer and chat template come from the same file through transformers.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from sparse_llm.models.registry import model_class
from sparse_llm.models.source import ModelSource

# GGUF general.architecture -> (transformers model_type, HF architecture)
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
PERMUTED_QK_ARCHITECTURES = ("llama",)

_TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"


def open_reader(path: str):
    """A `gguf.GGUFReader` whose buffer is a plain ndarray view of the file's memory map.

    GGUFReader slices its buffer once per metadata element (~150k times for a BPE vocabulary) and numpy's
    `memmap` subclass makes every slice several times slower (3.3 s vs 1.0 s for SmolLM2). A plain view of the
    same mapping reads identical bytes; nothing else about the reader changes.
    """
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray)

    return PlainViewReader(path)


def gguf_hf_name(name: str) -> str:
    """The HF parameter name of a GGUF tensor; unknown names are an error."""
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {name!r} has no counterpart in the supported models")


def reverse_qk_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's `LlamaModel.permute` on the rows of a Q/K weight or bias (n_head = its heads)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class _Metadata:
    """Typed access to `{arch}.*` metadata keys, naming the key when one is missing."""

    def __init__(self, reader, path: str):
        self.reader, self.path = reader, path
        self.arch = self.get("general.architecture")

    def get(self, key: str, default=KeyError):
        """A scalar or string value (arrays are only ever measured, see array_len)."""
        import gguf

        field = self.reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise ValueError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            raise ValueError(f"{self.path}: GGUF metadata key {key!r} is an array, expected a single value")
        part = field.parts[field.data[0]]
        return bytes(part).decode("utf-8") if kind == gguf.GGUFValueType.STRING else part.tolist()[0]

    def arch_key(self, key: str, default=KeyError):
        return self.get(f"{self.arch}.{key}", default)

    def array_len(self, key: str) -> int | None:
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)


def gguf_config(meta: _Metadata, tensor_names: set[str]):
    """The transformers config equivalent to the GGUF metadata."""
    from transformers import AutoConfig

    if meta.arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{meta.path}: GGUF general.architecture={meta.arch!r} is not supported; "
            f"supported: {sorted(GGUF_ARCHITECTURES)}"
        )
    model_type, architecture = GGUF_ARCHITECTURES[meta.arch]
    hidden = int(meta.arch_key("embedding_length"))
    heads = int(meta.arch_key("attention.head_count"))
    head_dim = int(meta.arch_key("attention.key_length", hidden // heads))
    rope_dim = meta.arch_key("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{meta.path}: rope.dimension_count={rope_dim} != head_dim {head_dim} (partial RoPE) is not supported")
    vocab = meta.arch_key("vocab_size", None) or meta.array_len("tokenizer.ggml.tokens")
    if vocab is None:
        raise ValueError(f"{meta.path}: neither {meta.arch}.vocab_size nor tokenizer.ggml.tokens is in the metadata")
    kwargs = dict(
        architectures=[architecture],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta.arch_key("feed_forward_length")),
        num_hidden_layers=int(meta.arch_key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.arch_key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta.arch_key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(meta.arch_key("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        rope_theta=float(meta.arch_key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id", None),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", None),
    )
    return AutoConfig.for_model(model_type, **kwargs)


def _rope_scaling(meta: _Metadata) -> dict | None:
    kind = meta.arch_key("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta.arch_key("rope.scaling.factor"))}
    raise ValueError(f"{meta.path}: GGUF {meta.arch}.rope.scaling.type={kind!r} is not supported; supported: none, linear")


def _iter_gguf_tensors(reader, permute_heads: dict[str, int] | None) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if not w.flags.writeable:  # unquantised tensors are views of the read-only file mapping
            w = w.copy()
        tensor = torch.from_numpy(w).reshape(tuple(int(d) for d in reversed(t.shape)))
        name = gguf_hf_name(t.name)
        if permute_heads is not None:
            proj = name.split(".")[-2]
            if proj in permute_heads:
                tensor = reverse_qk_permute(tensor, permute_heads[proj])
        yield name, tensor


def _rope_freq_factors(reader) -> torch.Tensor | None:
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            import gguf

            return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(-1)
    return None


def load_gguf_tokenizer(path: str):
    from transformers import PreTrainedTokenizerFast

    # The class AutoTokenizer resolves to for GGUF files, called directly: AutoTokenizer would first rebuild
    # the model config by parsing the whole file again with the slow legacy reader (~3-6 s).
    return PreTrainedTokenizerFast.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True
    )


def open_gguf(path: str) -> ModelSource:
    reader = open_reader(path)
    meta = _Metadata(reader, path)
    tensor_names = {t.name for t in reader.tensors}
    config = gguf_config(meta, tensor_names)
    permute_heads = None
    if meta.arch in PERMUTED_QK_ARCHITECTURES:
        permute_heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    return ModelSource(
        path=path,
        hf_config=config,
        model_cls=model_class(config.architectures, source=f"{path} (GGUF)"),
        weights=lambda: _iter_gguf_tensors(reader, permute_heads),
        load_tokenizer=lambda: load_gguf_tokenizer(path),
        eos_token_ids=[int(e) for e in eos if e is not None],
        rope_freq_factors=_rope_freq_factors(reader),
    )

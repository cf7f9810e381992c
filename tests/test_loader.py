"""Loader: HF directories, GGUF files (written here exactly as llama.cpp's converter writes them), bad input."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sparse_llm.models.attention import Attention
from sparse_llm.models.gguf_loader import reverse_qk_permute
from sparse_llm.models.loader import default_model_path, load_model, resolve_dtype
from sparse_llm.models.testing import save_tiny_checkpoint, single_prefill_logits, tiny_hf_model


# ---------------------------------------------------------------- a GGUF written the way llama.cpp writes it


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (the forward direction our loader must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `rope_freqs` for rope_type llama3."""
    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old_ctx = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / rope["low_freq_factor"], old_ctx / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (old_ctx / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if stem in top:
        return f"{top[stem]}.{suffix}"
    _, _, layer, module = stem.split(".", 3)
    return f"blk.{layer}.{GGUF_BLOCK[module]}.{suffix}"


def write_gguf(hf_model, path: str, arch: str) -> None:
    """Float32 GGUF of a tiny HF model with llama.cpp's names, Q/K permutation (llama) and rope_freqs."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = hf_model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    # byte-level BPE: 256 byte tokens, two merges (older transformers unwrap a one-element array into a
    # string), filler up to the model's vocabulary, then bos and eos
    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["ĠĠ", "Ġa"]
    tokens += [f"<|extra{i}|>" for i in range(cfg.vocab_size - len(tokens) - 2)] + ["<|bos|>", "<|eos|>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])  # 3 = control
    w.add_token_merges(["Ġ Ġ", "Ġ a"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = t.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            data = llama_cpp_permute(data, n_head)
        elif arch == "llama" and ".k_proj." in name:
            data = llama_cpp_permute(data, n_kv)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(data))
    if cfg.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(cfg.rope_parameters, head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reverse_qk_permute_undoes_llama_cpp_permute():
    g = torch.Generator().manual_seed(0)
    for n_head, rows, cols in [(3, 3 * 10, 7), (5, 5 * 6, 1), (1, 14, 9)]:
        w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), n_head))
        assert not torch.equal(permuted, w)
        assert torch.equal(reverse_qk_permute(permuted, n_head), w)


@pytest.mark.parametrize("architecture, gguf_arch", [
    ("LlamaForCausalLM", "llama"), ("Qwen2ForCausalLM", "qwen2"), ("Qwen3ForCausalLM", "qwen3"),
])
def test_gguf_in_llama_cpp_layout_matches_transformers(tmp_path, architecture, gguf_arch):
    hf = tiny_hf_model(architecture, seed=2)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(hf, path, gguf_arch)
    loaded = load_model(str(tmp_path))  # a directory holding exactly one .gguf
    assert loaded.source == path
    assert loaded.hf_config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    ours = single_prefill_logits(loaded, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4
    # the file's eos id comes first (older transformers may also append a re-added eos token id)
    assert loaded.eos_token_ids[0] == 299 and loaded.tokenizer.eos_token == "<|eos|>"


def test_gguf_with_unsupported_architecture_lists_the_supported_ones(tmp_path):
    import gguf

    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"general.architecture='gpt2' is not supported; supported: \['llama', 'qwen2', 'qwen3'\]"):
        load_model(path)


# ---------------------------------------------------------------- HF directories


@pytest.fixture
def tiny_dir(tmp_path):
    save_tiny_checkpoint(str(tmp_path), "Qwen2ForCausalLM")
    return tmp_path


def _edit_config(path, **changes):
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def test_checkpoint_meta_and_eos_ids_come_from_the_directory(tiny_dir):
    meta = {"algorithm": "skip_softmax", "target_sparsity": 0.5}
    _edit_config(tiny_dir, sparse_attention_config=meta)
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    (tiny_dir / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=[257, 5])))
    loaded = load_model(str(tiny_dir))
    assert loaded.checkpoint_meta == meta
    assert loaded.eos_token_ids == [257, 5]
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert [s.module_name for s in loaded.layer_specs] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_missing_path_says_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist .*config.json and \*.safetensors, or a .gguf file"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))


def test_directory_with_several_ggufs_asks_for_one(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match=r"several .gguf files, pass one of them: \['a.gguf', 'b.gguf'\]"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_model(str(tmp_path / "model.bin"))


def test_unsupported_architecture_lists_the_supported_ones(tiny_dir):
    _edit_config(tiny_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"\['GPT2LMHeadModel'\].*is not supported; supported architectures: \[") as err:
        load_model(str(tiny_dir))
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert repr(arch) in str(err.value)


def test_directory_without_weights(tiny_dir):
    os.remove(tiny_dir / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*looked for model.safetensors.index.json and \*.safetensors"):
        load_model(str(tiny_dir))


def test_missing_and_unexpected_tensors_are_named(tiny_dir):
    file = str(tiny_dir / "model.safetensors")
    tensors = load_file(file)
    k_proj = tensors.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model.layers.1.self_attn.k_proj.weight$"):
        load_model(str(tiny_dir))
    tensors["model.layers.1.self_attn.k_proj.weight"] = k_proj
    tensors["model.layers.0.mlp.extra.weight"] = k_proj.clone()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no parameter in Qwen2ForCausalLM: model.layers.0.mlp.extra.weight"):
        load_model(str(tiny_dir))


def test_wrong_tensor_shape_is_named(tiny_dir):
    file = str(tiny_dir / "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight': checkpoint tensor has shape \(79, 48\)"):
        load_model(str(tiny_dir))


def test_missing_tokenizer_and_tokenizer_override(tiny_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        os.replace(tiny_dir / name, other / name)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*pass tokenizer=PATH"):
        load_model(str(tiny_dir))
    assert load_model(str(tiny_dir), tokenizer=str(other)).tokenizer.eos_token == "<|eos|>"


def test_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype='int8' is not supported; allowed: 'auto'"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="dtype=torch.int64 is not supported"):
        resolve_dtype(torch.int64, torch.device("cpu"))


# ---------------------------------------------------------------- the bundled model


def test_default_model_path_is_the_bundled_gguf():
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)


@pytest.mark.slow
def test_smollm2_loaded_model_facts(smollm2, smollm2_path):
    assert smollm2.source == smollm2_path
    assert len(smollm2.layer_specs) == len(smollm2.attention_layers) == 30
    for i, (spec, layer) in enumerate(zip(smollm2.layer_specs, smollm2.attention_layers)):
        assert isinstance(layer, Attention) and layer.spec is spec
        assert smollm2.model.get_submodule(spec.module_name + ".attn") is layer
        assert (spec.layer_idx, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (i, 9, 3, 64)
        assert spec.scale == 64**-0.5 and spec.module_name == f"model.layers.{i}.self_attn"
    assert smollm2.eos_token_ids == [2] and smollm2.max_position_embeddings == 8192
    # the bundled GGUF carries its shipped calibration (sparse_llm/data/calibration), matched by SHA-256
    assert smollm2.checkpoint_meta["config_groups"]["group_0"]["algorithm"] == "skip_softmax"
    assert {p.dtype for p in smollm2.model.parameters()} == {torch.float32}
    prompt = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_load_time(smollm2_path):
    """Loads in a few seconds (the dequantisation dominates); generous bound for a shared 2-core CI box."""
    start = time.perf_counter()
    load_model(smollm2_path)
    assert time.perf_counter() - start < 15

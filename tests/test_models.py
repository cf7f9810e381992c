"""Whole-model correctness against transformers' own model classes (float32, CPU)."""
from __future__ import annotations

import pytest
import torch

from sparse_llm.models.loader import load_model
from sparse_llm.models.testing import TINY_CONFIGS, save_tiny_checkpoint, single_prefill_logits, tiny_hf_model


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.mark.slow
def test_smollm2_logits_match_transformers_from_the_same_gguf(smollm2, hf_smollm2, smollm2_prompt_ids):
    ours = single_prefill_logits(smollm2, smollm2_prompt_ids)
    ref = hf_logits(hf_smollm2, smollm2_prompt_ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (256, 49152)
    assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize(
    "architecture, max_shard_size",
    [("LlamaForCausalLM", None), ("Qwen2ForCausalLM", "20KB"), ("Qwen3ForCausalLM", None)],
)
def test_tiny_random_models_match_transformers(tmp_path, architecture, max_shard_size):
    hf = save_tiny_checkpoint(str(tmp_path), architecture, seed=1, max_shard_size=max_shard_size)
    if max_shard_size:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_model(str(tmp_path), dtype="float32")
    assert type(loaded.model).__name__ == architecture
    ids = torch.randint(0, 300, (97,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = single_prefill_logits(loaded, ids, block_size=8)
    ref = hf_logits(hf, ids)
    assert ref.abs().max() > 1.0  # logits large enough for 1e-4 to be a real bound
    assert (ours - ref).abs().max().item() < 1e-4


def test_llama3_rope_scaling_is_applied(tmp_path):
    hf = save_tiny_checkpoint(str(tmp_path), "LlamaForCausalLM")
    ours = load_model(str(tmp_path)).model.model.rotary_emb.inv_freq
    unscaled = tiny_hf_model("LlamaForCausalLM", rope_scaling=None).model.rotary_emb.inv_freq
    assert torch.equal(ours, hf.model.rotary_emb.inv_freq)
    assert not torch.allclose(ours, unscaled)  # the tiny config puts frequencies in all three llama3 bands


def test_bf16_model_returns_float32_logits_close_to_fp32(tmp_path):
    save_tiny_checkpoint(str(tmp_path), "Qwen3ForCausalLM")
    ids = list(range(3, 40))
    fp32 = single_prefill_logits(load_model(str(tmp_path), dtype="float32"), ids)
    bf16_model = load_model(str(tmp_path), dtype="bfloat16")
    assert next(bf16_model.model.parameters()).dtype == torch.bfloat16
    bf16 = single_prefill_logits(bf16_model, ids)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max().item() < 0.1 * fp32.abs().max().item()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ],
)
def test_unsupported_config_features_are_refused(overrides, message):
    from sparse_llm.models.llama import LlamaForCausalLM

    config = tiny_hf_model("LlamaForCausalLM", **overrides).config
    with pytest.raises(ValueError, match=message):
        LlamaForCausalLM(config)


def test_sliding_window_is_refused():
    from sparse_llm.models.qwen import Qwen2ForCausalLM

    config = tiny_hf_model("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=16, max_window_layers=0).config
    with pytest.raises(ValueError, match="sliding-window attention is not supported"):
        Qwen2ForCausalLM(config)


def test_tiny_configs_cover_every_llama_and_qwen_class():
    from sparse_llm.models.registry import MODEL_CLASSES

    ours = {path.split(":")[1] for path in MODEL_CLASSES.values() if path.split(":")[0].endswith((".llama", ".qwen"))}
    assert ours == set(TINY_CONFIGS)

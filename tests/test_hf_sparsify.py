"""sparsify() on transformers' own Llama: factor 0 equals dense, a large factor skips and changes outputs."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_llm.hf import desparsify, print_sparsity_stats, sparsify, sparsity_stats, verify_output


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval().float()
    with torch.no_grad():  # peaky attention, as trained models have, so that tiles can be skipped
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 6
            layer.self_attn.k_proj.weight *= 6
    return model


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_factor_zero_equals_dense_and_big_factor_skips(tiny_llama):
    ids = torch.randint(0, 97, (2, 300))
    dense = logits(tiny_llama, ids)
    try:
        sparsify(tiny_llama, {"algorithm": "skip_softmax", "threshold_scale_factor": 0.0})
        torch.testing.assert_close(logits(tiny_llama, ids), dense, atol=1e-4, rtol=1e-4)
        stats = sparsity_stats(tiny_llama)
        assert set(stats) == {0, 1, 2}
        assert all(s["prefill"] == 0.0 and s["tiles"]["prefill"] > 0 for s in stats.values())
        assert "layer" in print_sparsity_stats(tiny_llama)
    finally:
        desparsify(tiny_llama)
    torch.testing.assert_close(logits(tiny_llama, ids), dense)


def test_left_padding_equals_the_unpadded_row(tiny_llama):
    ids = torch.randint(0, 97, (1, 140))
    padded = torch.cat([torch.zeros(1, 10, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 10, dtype=torch.long), torch.ones(1, 140, dtype=torch.long)], 1)
    pos = torch.cat([torch.zeros(1, 10, dtype=torch.long), torch.arange(140)[None]], 1)
    try:
        sparsify(tiny_llama, {"algorithm": "skip_softmax", "threshold_scale_factor": 100.0})
        with torch.no_grad():
            a = tiny_llama(input_ids=ids).logits[0]
            b = tiny_llama(input_ids=padded, attention_mask=mask, position_ids=pos).logits[0, 10:]
    finally:
        desparsify(tiny_llama)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_real_model_skips_and_verify_output(hf_smollm2, smollm2):
    """SmolLM2 has real attention sinks: a large factor skips many tiles, yet greedy text stays close."""
    model, tokenizer = hf_smollm2, smollm2.tokenizer
    text = " ".join(["The history of the city began long ago, when travellers crossed the river at its narrowest point."] * 30)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :700]
    with torch.no_grad():
        dense = model(input_ids=ids).logits[0, -1]
    try:
        sparsify(model, {"algorithm": "skip_softmax", "threshold_scale_factor": {"prefill": 500.0, "decode": 5.0}})
        with torch.no_grad():
            sparse = model(input_ids=ids).logits[0, -1]
        stats = sparsity_stats(model)
        mean = sum(s["prefill"] for s in stats.values()) / len(stats)
        assert mean > 0.05, stats
        assert int(sparse.argmax()) == int(dense.argmax())
        res = verify_output(model, tokenizer, "The capital of France is", max_new_tokens=8)
        assert res["dense"] and res["sparse"] and res["common_prefix_tokens"] >= 1
    finally:
        desparsify(model)


def test_bad_input_is_refused_without_touching_the_model(tiny_llama):
    before = tiny_llama.config._attn_implementation
    with pytest.raises(ValueError, match="supports algorithm 'skip_softmax'"):
        sparsify(tiny_llama, {"algorithm": "streaming"})
    with pytest.raises(ValueError, match="needs a calibrated formula"):
        sparsify(tiny_llama, {"algorithm": "skip_softmax", "target_sparsity": 0.5})
    with pytest.raises(ValueError, match="target_sparsity.prefill must be in"):
        sparsify(tiny_llama, {"algorithm": "skip_softmax", "target_sparsity": 1.5})
    assert tiny_llama.config._attn_implementation == before
    with pytest.raises(ValueError, match="no attention modules"):
        sparsify(torch.nn.Linear(2, 2), {"algorithm": "skip_softmax", "threshold_scale_factor": 1.0})

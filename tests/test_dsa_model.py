"""DeepseekV32ForCausalLM (MLA + DSA indexer + MoE) against transformers' own implementation.

A tiny random DeepSeek-V3.2 config (3 layers, MoE from layer 1, YaRN RoPE, index_topk=16 < the 40-token
prompt) is built and saved with transformers' DeepseekV32ForCausalLM (safetensors, HF key names); our model
loads the same checkpoint through sparse_llm.models.loader. The reference semantics are those of
transformers >= 5.23.0 (modeling_deepseek_v32.py, verified with 5.23.0); older releases are skipped.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the Triton backend runs on CPU tensors

import pytest
import torch

transformers = pytest.importorskip("transformers")
REFERENCE_VERSION = (5, 23)
_version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
if not hasattr(transformers, "DeepseekV32ForCausalLM") or _version < REFERENCE_VERSION:
    pytest.skip(
        f"needs transformers >= 5.23.0 with DeepseekV32ForCausalLM as the reference (installed: {transformers.__version__})",
        allow_module_level=True,
    )

from sparse_llm.backends.base import LayerSpec  # noqa: E402
from sparse_llm.backends.dsa_torch import DsaTorchBackend, MlaDenseTorchBackend  # noqa: E402
from sparse_llm.backends.dsa_triton import DsaTritonBackend  # noqa: E402
from sparse_llm.configs.params import DsaParams  # noqa: E402
from sparse_llm.configs.resolve import resolve  # noqa: E402
from sparse_llm.models.loader import load_model  # noqa: E402
from sparse_llm.models.testing_mla import PagedTestRunner, write_tiny_deepseek_v32  # noqa: E402

PROMPT_LEN, TOPK, NEW_TOKENS = 40, 16, 10
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_deepseek_v32"))
    hf = write_tiny_deepseek_v32(path, seed=0, index_topk=TOPK)
    return path, hf


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load_model(checkpoint[0], dtype="float32")


@pytest.fixture(scope="module")
def prompt(checkpoint):
    g = torch.Generator().manual_seed(7)
    return torch.randint(1, checkpoint[1].config.vocab_size, (PROMPT_LEN,), generator=g).tolist()


def _dsa(ours, kind="bf16", cls=DsaTorchBackend, **kw):
    cfg = ours.hf_config
    p = DsaParams("dsa", index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
                  indexer_k_dtype=kind, **kw)
    return [cls(spec, p) for spec in ours.layer_specs]


def _runner(ours, backends) -> PagedTestRunner:
    return PagedTestRunner(ours.model, backends, block_size=4, num_blocks=96)


def _hf_logits(hf, ids: list[int], topk: int | None = None) -> torch.Tensor:
    """transformers' logits for every position; topk overrides index_topk (a large one = dense attention)."""
    layers = [layer.self_attn.indexer for layer in hf.model.layers]
    saved = [ix.index_topk for ix in layers]
    try:
        for ix in layers:
            ix.index_topk = topk or ix.index_topk
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].float()
    finally:
        for ix, k in zip(layers, saved):
            ix.index_topk = k


def test_checkpoint_uses_hf_key_names_and_moe(checkpoint, ours):
    from safetensors import safe_open

    with safe_open(os.path.join(checkpoint[0], "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.2.self_attn.indexer.weights_proj.weight" in names
    assert ours.hf_config.index_topk == TOPK < PROMPT_LEN
    assert [s.attention_type for s in ours.layer_specs] == ["mla"] * 3


def test_prefill_logits_match_transformers_with_sparse_selection(checkpoint, ours, prompt):
    hf = checkpoint[1]
    backends = _dsa(ours)
    got = _runner(ours, backends).step([(0, prompt)], all_tokens=True)[0]
    want = _hf_logits(hf, prompt)
    torch.testing.assert_close(got, want, **TOL)
    # the comparison discriminates: the selection mattered (dense logits are far off) and tokens were skipped
    assert (got - _hf_logits(hf, prompt, topk=10**6)).abs().max() > 100 * TOL["atol"]
    assert all(b.stats.skipped["prefill"] > 0 for b in backends)


def test_dense_mla_matches_transformers_without_selection(checkpoint, ours, prompt):
    got = _runner(ours, [MlaDenseTorchBackend(s, None) for s in ours.layer_specs]).step([(0, prompt)], all_tokens=True)[0]
    torch.testing.assert_close(got, _hf_logits(checkpoint[1], prompt, topk=10**6), **TOL)


def test_greedy_generation_matches_transformers(checkpoint, ours, prompt):
    hf = checkpoint[1]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, PROMPT_LEN:].tolist()
    runner = _runner(ours, _dsa(ours))
    assert runner.generate_greedy(0, prompt, NEW_TOKENS, prefill_chunk=13) == want  # chunked prefill + decode
    # a second sequence prefilled while the first decodes (mixed step) generates the same tokens
    runner2 = _runner(ours, _dsa(ours))
    runner2.step([(1, prompt[:-1])])
    logits = runner2.step([(2, prompt), (1, [prompt[-1]])])
    assert int(logits[0].argmax()) == int(logits[1].argmax()) == want[0]


@pytest.mark.parametrize("kind, cls", [("bf16", DsaTorchBackend), ("fp8", DsaTorchBackend), ("fp8", DsaTritonBackend)])
def test_decode_after_prefill_equals_full_recompute(ours, prompt, kind, cls):
    runner = _runner(ours, _dsa(ours, kind, cls))
    first = prompt[:20]  # > index_topk: prefill and decodes run sparse
    logits = runner.step([(0, first)])
    decoded, tokens = [], []
    for _ in range(2):
        tokens.append(int(logits[0].argmax()))
        logits = runner.step([(0, [tokens[-1]])])
        decoded.append(logits[0])
    full = runner.step([(1, first + tokens)], all_tokens=True)[0]
    torch.testing.assert_close(torch.stack(decoded), full[-2:], **TOL)


def test_llm_round_trip_generates(checkpoint, prompt):
    from sparse_llm import LLM, SamplingParams

    path, hf = checkpoint
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, PROMPT_LEN:].tolist()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for cfg, exact in [({"algorithm": "dsa", "indexer_k_dtype": "bf16"}, True), ({"algorithm": "dsa"}, False)]:
        llm = LLM(model=path, sparse_attention_config=cfg, dtype="float32", max_model_len=128,
                  kv_cache_config={"max_tokens": 512})
        try:
            out = llm.generate([prompt, prompt[:12]], params, use_tqdm=False)
            assert all(type(b) is DsaTorchBackend for b in llm.engine.runner.backends)
        finally:
            llm.close()
        assert len(out[0].token_ids) == len(out[1].token_ids) == NEW_TOKENS
        assert out[0].metrics.sparsity["prefill"] > 0 and out[0].metrics.sparsity["decode"] > 0
        assert out[1].metrics.sparsity["prefill"] == 0  # 12 <= index_topk: every key attended
        if exact:
            assert out[0].token_ids == want


def test_dsa_needs_a_model_with_an_indexer():
    llama_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    spec = LayerSpec(0, 4, 2, 16, 0.25, "model.layers.0.self_attn")
    with pytest.raises(ValueError, match="needs a model with a DSA indexer"):
        resolve({"algorithm": "dsa"}, llama_config, None, [spec])

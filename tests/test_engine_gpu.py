"""The engine on CUDA (skipped without a GPU): KV sizing from free memory, HF parity, decode graphs = eager."""
from __future__ import annotations

import pytest
import torch

from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.llm import LLM
from sparse_llm.models.loader import load_model
from sparse_llm.models.testing import save_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    # head_dim 64 so that the Triton kernels (attention_backend auto on CUDA) run it too
    hf = save_tiny_checkpoint(path, "LlamaForCausalLM", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                              num_hidden_layers=3).to("cuda")
    return path, hf


def test_greedy_matches_transformers_and_kv_fills_free_memory(tiny):
    path, hf = tiny
    loaded = load_model(path, dtype="float32", device="cuda")
    torch.cuda.empty_cache()
    free_before, _ = torch.cuda.mem_get_info()
    llm = LLM.from_loaded(loaded, max_model_len=256, attention_backend="torch",
                          kv_cache_config={"free_gpu_memory_fraction": 0.05})
    kv_bytes = llm.engine.runner.num_blocks * llm.engine.runner.block_bytes
    assert 0.04 * free_before < kv_bytes <= 0.05 * free_before  # free memory x fraction (the warm-up peak is tiny)
    prompts = [[5, 17, 99, 3, 250], list(range(40, 77))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert o.token_ids == ref[0, len(p):].tolist()
    llm.close()


def test_decode_graphs_equal_eager(tiny):
    path, _ = tiny
    loaded = load_model(path, dtype="float32", device="cuda")
    p = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [[i + 1, 2 * i + 3, 7] * (i + 1) for i in range(5)]
    results = {}
    for eager in (True, False):
        llm = LLM.from_loaded(loaded, max_model_len=128, max_num_seqs=8, enforce_eager=eager,
                              kv_cache_config={"max_tokens": 2048})
        graphs = llm.engine.runner.graphs is not None
        results[eager] = [o.token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
        llm.close()
    if not graphs:
        pytest.skip("no backend of this build supports CUDA graphs (eager only)")
    assert results[False] == results[True]

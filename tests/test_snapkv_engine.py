"""SnapKV / Ada-SnapKV in the engine with SmolLM2: real blocks freed, dense first token, chunked == whole,
no compaction == dense. Chunked prefill is covered on the hand-built cache (test_snapkv_backend.py)."""
from __future__ import annotations

import pytest

from sparse_llm.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SNAP = {"algorithm": "snapkv", "prompt_budget": 256, "window_size": 32}
ADA = {**SNAP, "algorithm": "ada_snapkv", "floor_alpha": 0.2}


@pytest.fixture(scope="module")
def make_llm(smollm2, llm_factory):
    yield from llm_factory(smollm2, max_model_len=2048, kv_cache_config={"max_tokens": 4096, "enable_prefix_caching": False})


@pytest.fixture(scope="module")
def dense_tokens(make_llm, long_prompt) -> list[int]:
    return make_llm().generate([long_prompt], GREEDY, use_tqdm=False)[0].token_ids


def run_two(make_llm, long_prompt, cfg, **kw):
    """601- and 300-token prompts in one step; blocks held right after it, the outputs, the engine stats."""
    engine = make_llm(sparse_attention_config=cfg, **kw).engine
    engine.add_request("a", long_prompt, GREEDY)
    engine.add_request("b", long_prompt[:300], GREEDY)
    engine.step()
    held = {s.request_id: (len(s.block_table), s.num_kv_tokens) for s in engine.scheduler.running}
    used = engine.stats().kv_blocks_used
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
    return held, used, outs, engine.stats()


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [SNAP, ADA], ids=["snapkv", "ada_snapkv"])
def test_engine_compacts_frees_blocks_and_decodes(make_llm, long_prompt, dense_tokens, cfg):
    held, used, outs, stats = run_two(make_llm, long_prompt, cfg)
    bs = 16
    for rid in ("a", "b"):
        blocks, cache_len = held[rid]
        assert blocks == -(-cache_len // bs) and cache_len >= 256  # dense would hold 38 and 19 blocks
        if cfg is SNAP:
            assert cache_len == 256
        else:  # the longest head over 30 layers: more than the budget, less than the prompt
            assert 256 < cache_len <= (601 if rid == "a" else 300)  # may keep a whole short prompt
    assert used == sum(b for b, _ in held.values())
    assert stats.kv_blocks_used == 0
    a = outs["a"]
    assert a.token_ids[0] == dense_tokens[0]  # prefill is dense: the first token cannot change
    assert len(a.token_ids) == 6
    assert a.metrics.sparsity["decode"] > 0.4  # ~256 of ~601 tokens per head
    assert stats.sparsity["prefill"] is None and stats.sparsity["decode"] > 0.2


@pytest.mark.slow
def test_budget_above_prompt_is_dense(make_llm, long_prompt, dense_tokens):
    llm = make_llm(sparse_attention_config={**ADA, "prompt_budget": 700})
    out = llm.generate([long_prompt], GREEDY, use_tqdm=False)[0]
    assert out.token_ids == dense_tokens and out.metrics.sparsity["decode"] == 0.0

"""RocketKV in the engine: compaction bookkeeping (no model) and SmolLM2 runs (real blocks freed, tokens sane)."""
from __future__ import annotations

import logging

import pytest

from sparse_llm.configs.params import RocketParams
from sparse_llm.engine.block_manager import BlockManager
from sparse_llm.engine.compaction import CompactionPolicy, apply_compaction
from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.engine.scheduler import ScheduledBatch
from sparse_llm.engine.sequence import Sequence
from sparse_llm.engine.step_inputs import build_step_inputs


def rocket(budget=256, threshold=None, **kw):
    return RocketParams("rocket", prompt_budget=budget, seq_len_threshold=threshold, **kw)


def seq(n: int) -> Sequence:
    return Sequence("r", 0, list(range(n)), SamplingParams(max_tokens=4), 4096, detokenizer=None)


def test_policy_targets_only_last_chunks_above_budget_and_threshold():
    policy = CompactionPolicy.from_layer_params([rocket(20, threshold=30)] * 3)
    a, b, c, d = seq(50), seq(25), seq(60), seq(40)
    c.num_computed_tokens = 10  # mid-prompt chunk: 10 + 20 < 60
    batch = ScheduledBatch([a, b, c, d], [50, 25, 20, 40], 4)
    assert policy.targets(batch) == [20, 0, 0, 20]  # b is below the threshold, c's prompt is not done


def test_compaction_frees_tail_blocks_and_keeps_positions():
    bm = BlockManager(num_blocks=20, block_size=8, enable_prefix_caching=False)
    policy = CompactionPolicy.from_layer_params([rocket(20)])
    s = seq(53)
    assert bm.ensure_blocks(s, 53) and len(s.block_table) == 7
    batch = ScheduledBatch([s], [53], 1)
    compact_to = policy.targets(batch)
    s.num_computed_tokens += 53
    assert apply_compaction(bm, batch, compact_to) == 4
    assert len(s.block_table) == 3 and bm.num_free_blocks == 17  # ceil(20 / 8) blocks held
    assert (s.num_kv_tokens, s.num_evicted_tokens) == (20, 33)
    s.token_ids.append(7)  # the decode step: true position 53, cache slot 20
    inputs = build_step_inputs(ScheduledBatch([s], [1], 0), 8, "cpu", False)
    assert inputs.positions.tolist() == [53] and inputs.input_ids.tolist() == [7]
    assert inputs.meta.seq_lens.tolist() == [21]
    assert inputs.meta.slot_mapping.tolist() == [s.block_table[2] * 8 + 4]
    bm.free(s)
    assert s.num_evicted_tokens == 0 and bm.num_free_blocks == 20


def test_policy_config_errors():
    assert CompactionPolicy.from_layer_params([None, None]) is None
    with pytest.raises(ValueError, match=r"every attention layer must run it; layers \[1\]"):
        CompactionPolicy.from_layer_params([rocket(), None])
    with pytest.raises(ValueError, match="must share prompt_budget"):
        CompactionPolicy.from_layer_params([rocket(256), rocket(512)])
    bm = BlockManager(4, 8, enable_prefix_caching=True)
    with pytest.raises(RuntimeError, match="prefix caching off"):
        bm.free_tail(seq(3), 0)


# --- SmolLM2 -----------------------------------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
ROCKET = {"algorithm": "rocket", "prompt_budget": 256, "topk": 16, "topr": 16, "window_size": 32}


@pytest.fixture(scope="module")
def make_llm(smollm2, llm_factory):
    yield from llm_factory(smollm2, max_model_len=1024, kv_cache_config={"max_tokens": 4096, "enable_prefix_caching": False})


@pytest.fixture(scope="module")
def dense_tokens(make_llm, long_prompt) -> list[int]:
    return make_llm().generate([long_prompt], GREEDY, use_tqdm=False)[0].token_ids


@pytest.fixture(scope="module")
def rocket_run(make_llm, long_prompt):
    """Two prompts (601 and 300 tokens) in one engine: blocks held after the prefill step, final outputs, stats."""
    engine = make_llm(sparse_attention_config=ROCKET).engine
    engine.add_request("a", long_prompt, GREEDY)
    engine.add_request("b", long_prompt[:300], GREEDY)
    engine.step()  # both prompts in one step; then compaction
    held = {s.request_id: len(s.block_table) for s in engine.scheduler.running}
    used_after_prefill = engine.stats().kv_blocks_used
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
    return held, used_after_prefill, outs, engine.stats()


@pytest.mark.slow
def test_engine_compacts_frees_blocks_and_decodes(rocket_run, dense_tokens):
    held, used_after_prefill, outs, stats = rocket_run
    assert held == {"a": 256 // 16, "b": 256 // 16}  # dense would hold 38 and 19 blocks
    assert used_after_prefill == sum(held.values())
    assert stats.kv_blocks_used == 0
    a = outs["a"]
    assert len(a.token_ids) == 6
    assert a.token_ids[0] == dense_tokens[0]  # prefill is dense: the first token cannot change
    assert a.metrics.sparsity["decode"] > 0.5  # 16 + 1 of ~65 pages per KV head
    assert stats.sparsity["decode"] > 0.5


@pytest.mark.slow
def test_chunked_prefill_compacts_like_one_chunk(make_llm, long_prompt, rocket_run):
    """601 = 2 * 297 + 7: the last chunk is shorter than the 32-query window."""
    llm = make_llm(sparse_attention_config=ROCKET, enable_chunked_prefill=True, max_num_batched_tokens=297)
    assert llm.generate([long_prompt], GREEDY, use_tqdm=False)[0].token_ids == rocket_run[2]["a"].token_ids


@pytest.mark.slow
def test_no_compaction_and_all_pages_equals_dense(make_llm, long_prompt, dense_tokens, caplog):
    with caplog.at_level(logging.WARNING):
        llm = make_llm(sparse_attention_config={**ROCKET, "prompt_budget": 700, "topk": 1000, "kt_cache_dtype": "bfloat16"},
                       kv_cache_config={"max_tokens": 4096, "enable_prefix_caching": True})
    assert "prefix caching disabled" in caplog.text and not llm.engine.block_manager.enable_prefix_caching
    assert llm.generate([long_prompt], GREEDY, use_tqdm=False)[0].token_ids == dense_tokens

"""The engine's per-step host path (issue 3: host overhead): vectorised step inputs, the packed single-copy
staging, cached block-table arrays, lazy detokenising and the scheduler's no-new-block fast path — each
against a plain per-token / per-call reference on random odd-sized inputs."""
from __future__ import annotations

import importlib.util
import math
import os
import random

import pytest
import torch

from sparse_llm.configs.llm_args import LlmArgs
from sparse_llm.engine.block_manager import BlockManager, cdiv
from sparse_llm.engine.detokenizer import IncrementalDetokenizer
from sparse_llm.engine.llm_engine import LLMEngine
from sparse_llm.engine.sampling_params import SamplingParams
from sparse_llm.engine.scheduler import ScheduledBatch, Scheduler
from sparse_llm.engine.sequence import Sequence
from sparse_llm.engine.step_inputs import StepInputBuilder
from sparse_llm.llm import LLM
from sparse_llm.models.testing import byte_level_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_harness():
    spec = importlib.util.spec_from_file_location("engine_host_overhead", os.path.join(ROOT, "benchmarks", "engine_host_overhead.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- step inputs ------------------------------------------------------------------------------------
def random_batch(rng: random.Random, block_size: int, num_seqs: int, with_factors: bool, decodes_only: bool = False,
                 evictions: bool = True) -> ScheduledBatch:
    """Prefill chunks then decodes (some after prompt compression), with scattered block ids."""
    seqs, qlens = [], []
    free_blocks = list(range(4 * num_seqs * 40))
    rng.shuffle(free_blocks)
    num_prefills = 0 if decodes_only else rng.randint(0, num_seqs)
    for i in range(num_seqs):
        prefill = i < num_prefills
        total = rng.randint(2, 90)
        computed = rng.randint(0, total - 1) if prefill else total - 1
        q = rng.randint(1, total - computed) if prefill else 1
        evicted = rng.randint(0, computed // 2) if evictions and rng.random() < 0.3 else 0
        factors = None
        if with_factors:
            factors = {"prefill": rng.choice([None, rng.uniform(1, 100)]), "decode": rng.choice([None, rng.uniform(1, 100)])}
        s = Sequence("r", 0, [rng.randrange(300) for _ in range(total)], SamplingParams(), 1000, detokenizer=None,
                     threshold_factors=factors)
        if not prefill:
            s.num_prompt_tokens = total - rng.randint(1, 3)  # some tokens were generated
        s.num_computed_tokens, s.num_evicted_tokens = computed, evicted
        s.block_table = [free_blocks.pop() for _ in range(cdiv(computed - evicted + q, block_size) + rng.randint(0, 2))]
        seqs.append(s)
        qlens.append(q)
    return ScheduledBatch(seqs, qlens, num_prefills)


def reference(batch: ScheduledBatch, block_size: int) -> dict:
    """Per token, written the obvious way."""
    ids, pos, slots, rows, sampling = [], [], [], [], []
    for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
            c = p - s.num_evicted_tokens
            ids.append(s.token_ids[p])
            pos.append(p)
            slots.append(s.block_table[c // block_size] * block_size + c % block_size)
        if s.num_computed_tokens + n == s.num_tokens:
            rows.append(len(ids) - 1)
            sampling.append(s)
    width = max(len(s.block_table) for s in batch.seqs)
    return dict(
        ids=ids, pos=pos, slots=slots, rows=rows, sampling=sampling,
        seq_lens=[s.num_computed_tokens - s.num_evicted_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens)],
        tables=[s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs],
        tsf=[s.threshold_factors[p] for s, p in zip(batch.seqs, batch.phases)],
    )


def check(inp, ref: dict, batch: ScheduledBatch, collect_stats: bool) -> None:
    m = inp.meta
    assert inp.input_ids.dtype == inp.positions.dtype == m.slot_mapping.dtype == inp.sample_rows.dtype == torch.int64
    assert m.cu_seqlens_q.dtype == m.seq_lens.dtype == m.block_tables.dtype == torch.int32
    assert inp.input_ids.tolist() == ref["ids"] and inp.positions.tolist() == ref["pos"]
    assert m.slot_mapping.tolist() == ref["slots"] and inp.sample_rows.tolist() == ref["rows"]
    assert inp.sampling_seqs == ref["sampling"]
    assert inp.samples_every_token == (len(ref["rows"]) == len(ref["ids"]))
    assert m.seq_lens.tolist() == ref["seq_lens"] == m.seq_lens_cpu and m.max_seqlen_k == max(ref["seq_lens"])
    assert m.block_tables.tolist() == ref["tables"]
    cu = [0]
    for n in batch.num_new_tokens:
        cu.append(cu[-1] + n)
    assert m.cu_seqlens_q.tolist() == cu and m.query_lens_cpu == batch.num_new_tokens
    assert m.num_prefill_tokens == cu[batch.num_prefills] and m.max_seqlen_q == max(batch.num_new_tokens)
    if not collect_stats or all(f is None for f in ref["tsf"]):
        assert m.threshold_scale_factor is None
    else:
        got = m.threshold_scale_factor.tolist()
        assert all(math.isnan(g) if f is None else g == pytest.approx(f, rel=1e-6) for g, f in zip(got, ref["tsf"]))


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("staged", [False, True])
def test_step_inputs_match_a_per_token_reference_on_random_batches(block_size, staged):
    rng = random.Random(block_size * 10 + staged)
    collect_stats = block_size == 4
    builder = StepInputBuilder(block_size, "cpu", collect_stats, staged=staged)  # one builder: buffers are reused
    for num_seqs in [1, 3, 7, 33, 5, 64, 2]:  # sizes go up and down: the staging buffer grows and is rewritten
        for decodes_only, evictions in [(False, True), (True, False), (True, True)]:  # general path, decode fast path
            batch = random_batch(rng, block_size, num_seqs, collect_stats, decodes_only, evictions)
            check(builder.build(batch), reference(batch, block_size), batch, collect_stats)


def test_block_table_array_follows_every_change_the_block_manager_makes():
    bm = BlockManager(num_blocks=40, block_size=4, enable_prefix_caching=False)
    s = Sequence("r", 0, list(range(30)), SamplingParams(), 1000, detokenizer=None)

    def current():
        assert s.block_table_array().tolist() == s.block_table
        return s.block_table_array()

    bm.admit(s, [])
    current()
    assert bm.ensure_blocks(s, 9)
    cached = current()
    assert current() is cached  # unchanged table: the same array, no rebuild
    assert bm.ensure_blocks(s, 13)
    current()
    # compaction frees the tail block, another sequence takes it, then a decode grows the table back to its old
    # length with a different block: same length, new contents
    before = list(s.block_table)
    bm.free_tail(s, 4 * (len(before) - 1))
    other = Sequence("o", 0, [1], SamplingParams(), 1000, detokenizer=None)
    bm.admit(other, [])
    assert bm.ensure_blocks(other, 1) and other.block_table == before[-1:]
    assert bm.ensure_blocks(s, 4 * len(before))
    assert len(s.block_table) == len(before) and s.block_table != before
    current()
    bm.free(s)
    current()
    bm.admit(s, [])
    assert bm.ensure_blocks(s, 5)
    current()


# --- lazy detokenising ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def eager_texts(tok, prompt: list[int], ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    """Text after each token when every token is decoded as it comes (a stop string forces that path)."""
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens, stop=["\x00never\x00"])
    out = []
    for t in ids:
        assert d.add_token(t) is None
        out.append(d.text)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_lazy_text_equals_token_by_token_text_whenever_it_is_read(tok, seed):
    rng = random.Random(seed)
    pieces = ["héllo", " 世界", "🙂", " naïve", " ok", "\n", "€"]
    text = "".join(rng.choice(pieces) for _ in range(25))
    ids = tok.encode(text, add_special_tokens=False)
    for _ in range(4):  # special tokens (skipped in the text) in random places
        ids.insert(rng.randrange(len(ids)), 257)
    ids = ids[:rng.randint(len(ids) - 3, len(ids))]  # may end in the middle of a character
    prompt = tok.encode("prompt: ", add_special_tokens=False)
    expected = eager_texts(tok, prompt, ids)
    lazy = IncrementalDetokenizer(tok, prompt)
    reads = sorted(rng.sample(range(len(ids)), 5)) + [len(ids) - 1]
    for i, t in enumerate(ids):
        assert lazy.add_token(t) is None
        if i in reads:
            assert lazy.text == expected[i]
            assert lazy.visible_text(finished=False) == expected[i]
    assert "\ufffd" not in lazy.text


@pytest.mark.parametrize("tail", [[257] * 6, [0xF0, 0x9F] + [257] * 5, [0xE4, 257, 257, 257, 257, 0xB8, 0x96], []])
def test_lazy_catch_up_handles_unprintable_and_incomplete_tails(tok, tail):
    """Tails the one-decode catch-up cannot take at once (more than 4 trailing tokens that print nothing)."""
    ids = tok.encode("ab 世", add_special_tokens=False) + tail + tok.encode("c", add_special_tokens=False) + tail
    expected = eager_texts(tok, [65], ids)
    for read_at in range(len(ids)):  # read once mid-way, then at the end
        lazy = IncrementalDetokenizer(tok, [65])
        for i, t in enumerate(ids):
            lazy.add_token(t)
            if i == read_at:
                assert lazy.text == expected[i]
        assert lazy.text == expected[-1]


# --- scheduler fast path ----------------------------------------------------------------------------
def test_decodes_get_a_new_block_exactly_when_they_cross_a_block_boundary():
    bs = 4
    bm = BlockManager(num_blocks=64, block_size=bs, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, enable_chunked_prefill=True)
    seqs = [Sequence(str(i), 0, list(range(n)), SamplingParams(), 1000, detokenizer=None) for i, n in enumerate([3, 4, 5, 9])]
    for s in seqs:
        sched.add(s)
    for step in range(11):
        batch = sched.schedule()
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            assert len(s.block_table) == cdiv(s.num_computed_tokens + n, bs)  # enough, and not one block more
            s.num_computed_tokens += n
            s.token_ids.append(step)  # every sequence samples one token per step
    assert bm.num_free_blocks == 64 - sum(len(s.block_table) for s in seqs)


# --- the engine end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tok):
    return load_harness().tiny_llama(258, torch.device("cpu"), torch.float32, tokenizer=tok)


def test_offline_and_streaming_runs_give_the_same_tokens_and_text(tiny, tok):
    prompts = [tok.encode(p, add_special_tokens=False) for p in ["a", "héllo wörld", "世界 is big", "x" * 37, "🙂"]]
    params = SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True, skip_special_tokens=False)
    llm = LLM.from_loaded(tiny, max_model_len=128, max_num_seqs=3, kv_cache_config={"max_tokens": 1024})
    try:
        offline = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.close()
    engine = LLMEngine(LlmArgs(model="tiny", max_model_len=128, max_num_seqs=3, kv_cache_config={"max_tokens": 1024}), tiny)
    try:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        final, streamed = {}, {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.text.startswith(streamed.get(out.request_id, ""))  # streamed text is never taken back
                streamed[out.request_id] = out.text
                if out.finished:
                    final[out.request_id] = out
    finally:
        engine.close()
    for i, out in enumerate(offline):
        assert out.token_ids == final[str(i)].token_ids and len(out.token_ids) == 23
        assert out.text == final[str(i)].text == eager_texts(tok, prompts[i], out.token_ids, skip_special_tokens=False)[-1]


def test_host_overhead_harness_reports_every_phase(tiny):
    harness = load_harness()
    us = harness.measure_decode(tiny, batch=5, steps=4, prompt_len=7)
    assert set(us) == set(harness.PHASES) | {"host", "total"}
    assert all(us[p] > 0 for p in ("schedule", "inputs", "forward", "logits", "sample"))
    assert us["host"] == pytest.approx(sum(us[p] for p in harness.HOST_PHASES))
    assert us["total"] == pytest.approx(sum(us[p] for p in harness.PHASES))

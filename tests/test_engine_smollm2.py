"""The engine on the real SmolLM2 (CPU, fp32): HF parity, and scheduling features that must not change tokens.

Every LLM here wraps the session's already loaded model (`LLM.from_loaded`) and is closed after use.
"""
from __future__ import annotations

import pytest
import torch

from sparse_llm.backends.streaming import skipped_keys, total_keys
from sparse_llm.engine.detokenizer import IncrementalDetokenizer
from sparse_llm.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
BASE = dict(max_model_len=256, kv_cache_config={"max_tokens": 4096, "enable_prefix_caching": False})


@pytest.fixture(scope="module")
def make_llm(smollm2, llm_factory):
    """Builds LLMs on the shared model, closing the previous one first (they share its layers)."""
    yield from llm_factory(smollm2, **BASE)


@pytest.fixture(scope="module")
def prompts(smollm2_prompt_ids) -> list[list[int]]:
    """8 prompts of different lengths; the last two share a 32-token prefix with the first (prefix caching)."""
    ids = smollm2_prompt_ids
    out = [ids[a:a + n] for a, n in [(0, 45), (50, 3), (60, 17), (80, 64), (150, 9), (170, 1), (190, 30)]]
    out.append(ids[:32] + ids[200:211])
    return out


@pytest.fixture(scope="module")
def alone(make_llm, prompts) -> list[list[int]]:
    """Greedy tokens of each prompt run by itself: no batching, no chunking, no cache."""
    llm = make_llm()
    return [llm.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in prompts]


def test_greedy_32_tokens_equal_transformers(make_llm, hf_smollm2, smollm2_prompt_ids):
    prompt = smollm2_prompt_ids[:40]
    with torch.inference_mode():
        hf = hf_smollm2.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    hf_tokens = hf[0, len(prompt):].tolist()
    out = make_llm().generate(prompt, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == hf_tokens
    assert out.finish_reason == "length" and out.metrics.num_generated_tokens == 32
    assert out.metrics.ttft is not None and out.metrics.ttft > 0 and out.metrics.decode_time > 0


def test_chat_answers_paris(make_llm):
    llm = make_llm()
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=8, temperature=0.0),
                   use_tqdm=False)[0]
    assert "Paris" in out.text
    assert out.prompt.startswith("<|im_start|>")  # the chat template was applied


def test_batch_of_8_equals_each_alone(make_llm, prompts, alone):
    outs = make_llm().generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone
    assert [o.prompt_token_ids for o in outs] == prompts  # in input order


def test_chunked_prefill_equals_unchunked(make_llm, prompts, alone):
    llm = make_llm(max_num_batched_tokens=24)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone


def test_prefix_cache_hit_equals_no_cache(make_llm, prompts, alone):
    llm = make_llm(kv_cache_config={"max_tokens": 4096, "enable_prefix_caching": True})
    first = llm.generate([prompts[0]], GREEDY, use_tqdm=False)[0]
    assert first.metrics.num_cached_tokens == 0
    again = llm.generate([prompts[0], prompts[7]], GREEDY, use_tqdm=False)
    assert [o.metrics.num_cached_tokens for o in again] == [32, 32]  # (45 - 1) // 16 and the shared 32 tokens
    assert [o.token_ids for o in again] == [alone[0], alone[7]]
    assert llm.engine.stats().cached_tokens_total == 64


def test_forced_preemption_equals_no_preemption(make_llm, prompts, alone):
    # 128 tokens of KV (8 blocks) for 8 prompts of 1 to 68 tokens each (244 in all): sequences must be preempted.
    llm = make_llm(max_model_len=128, kv_cache_config={"max_tokens": 128, "enable_prefix_caching": False})
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0


def test_seeded_sampling_is_reproducible_in_any_batch(make_llm, prompts):
    llm = make_llm()
    p = SamplingParams(max_tokens=5, temperature=1.0, top_p=0.9, seed=7)
    alone = llm.generate([prompts[2]], p, use_tqdm=False)[0].token_ids
    mixed = llm.generate(prompts[1:4], [SamplingParams(max_tokens=5, temperature=1.0), p, GREEDY], use_tqdm=False)
    assert mixed[1].token_ids == alone
    other_seed = llm.generate([prompts[2]], p.model_copy(update={"seed": 8}), use_tqdm=False)[0].token_ids
    assert other_seed != alone
    two = llm.generate([prompts[2]], SamplingParams(max_tokens=5, temperature=1.0, top_p=0.9, seed=7, n=2), use_tqdm=False)[0]
    assert [o.index for o in two.outputs] == [0, 1] and two.outputs[0].token_ids == alone


def test_stop_token_ids_stop_strings_and_logprobs(make_llm, prompts, alone):
    llm = make_llm()
    ref = alone[0]
    out = llm.generate(prompts[0], SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=[ref[2]]), use_tqdm=False)[0]
    assert out.token_ids == ref[:3] and out.finish_reason == "stop" and out.outputs[0].stop_reason == ref[2]
    full_text = llm.tokenizer.decode(ref, skip_special_tokens=True)
    stop = full_text[len(full_text) // 2:][:3]
    out = llm.generate(prompts[0], SamplingParams(max_tokens=4, temperature=0.0, stop=stop), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == full_text[:full_text.index(stop)]
    out = llm.generate(prompts[0], SamplingParams(max_tokens=3, temperature=0.0, logprobs=3), use_tqdm=False)[0]
    lp = out.outputs[0].logprobs
    assert len(lp) == 3 and all(len(d) == 3 and t in d for d, t in zip(lp, out.token_ids))
    assert all(d[t] == max(d.values()) for d, t in zip(lp, out.token_ids))  # greedy picks the top logprob


def test_detokenizer_on_the_real_tokenizer(smollm2):
    tok = smollm2.tokenizer
    text = "Café naïve: 世界 🙂 — done"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("Say:", add_special_tokens=False))
    for t in ids:
        d.add_token(t)
        assert "\ufffd" not in d.text
    assert d.text == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_abort_frees_blocks_at_once(make_llm, prompts):
    llm = make_llm()
    engine = llm.engine
    engine.add_request("x", prompts[3], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    out = engine.abort_request("x")
    assert out.finished and out.finish_reason == "abort"
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished_requests()


def test_streaming_attention_reports_the_sparsity_it_skipped(make_llm, prompts):
    cfg = {"algorithm": "streaming", "sink_tokens": 4, "local_window": 16}
    llm = make_llm(sparse_attention_config=cfg)
    out = llm.generate(prompts[3], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)[0]
    n = len(prompts[3])
    expect_prefill = skipped_keys(0, n, 4, 16) / total_keys(0, n)
    dec = [(p, p + 1) for p in (n, n + 1)]  # 2 decode steps (the 3rd token is sampled without a forward)
    expect_decode = sum(skipped_keys(a, b, 4, 16) for a, b in dec) / sum(total_keys(a, b) for a, b in dec)
    assert out.metrics.sparsity["prefill"] == pytest.approx(expect_prefill)
    assert out.metrics.sparsity["decode"] == pytest.approx(expect_decode)
    stats = llm.engine.stats()
    assert sorted(stats.layer_sparsity) == list(range(30))
    assert stats.sparsity["prefill"] == pytest.approx(expect_prefill)


def test_bad_input_is_refused_clearly(make_llm, smollm2, smollm2_prompt_ids):
    llm = make_llm()
    too_long = (smollm2_prompt_ids * 2)[:300]
    with pytest.raises(ValueError, match=r"300 tokens.*max_model_len=256"):
        llm.generate([too_long], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 49152\)"):
        llm.generate([[1, 99999]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing half-submitted
    llm.close()
    before = [(layer.backend, layer.cache) for layer in smollm2.attention_layers]
    with pytest.raises(ValueError, match=r"too small for one sequence.*max_model_len=256 needs 16 blocks.*MiB"):
        make_llm(kv_cache_config={"max_tokens": 128})
    with pytest.raises(ValueError, match=r"max_model_len=9000 is larger than the model's max_position_embeddings=8192"):
        make_llm(max_model_len=9000)
    # a failed build leaves the model's layers as they were
    assert all(layer.backend is b and layer.cache is c for layer, (b, c) in zip(smollm2.attention_layers, before))


def test_per_request_override_retunes_only_its_request_and_phase(make_llm, smollm2_prompt_ids):
    llm = make_llm(sparse_attention_config={"algorithm": "skip_softmax", "threshold_scale_factor": 1.0})
    prompt = smollm2_prompt_ids[:192]
    p = SamplingParams(max_tokens=2, temperature=0.0)  # a prefill and one decode step

    def sparsity(override):
        return llm.generate([prompt], p, use_tqdm=False, sparse_override=override)[0].metrics.sparsity

    base = sparsity(None)
    both = sparsity({"threshold_scale_factor": 30.0})
    prefill_only = sparsity({"threshold_scale_factor": {"prefill": 30.0}})
    assert both["prefill"] > base["prefill"] and both["decode"] > base["decode"]  # larger factor: more skipped
    assert prefill_only["prefill"] == pytest.approx(both["prefill"])
    assert prefill_only["decode"] == pytest.approx(base["decode"])  # the phase it does not name keeps the layer value
    with pytest.raises(ValueError, match="unknown field"):
        sparsity({"window": 3})
    assert not llm.engine.has_unfinished_requests()

"""Calibration against the real engine: the histogram predicts what the skip-softmax backend then does."""
import math

import pytest

from sparse_llm.calibration.export import sparse_block
from sparse_llm.calibration.fit import PhaseFit
from sparse_llm.calibration.gaps import TileGeometry
from sparse_llm.calibration.samples import length_bins, split_counts
from sparse_llm.configs.checkpoint import parse_checkpoint_meta
from sparse_llm.configs.resolve import resolve
from sparse_llm.configs.sparse import SkipSoftmaxAttentionConfig


def test_exported_block_reads_back_through_our_parser():
    fits = {"prefill": PhaseFit("prefill", 2.5, 9.0, 0.97, 0.1, 0.8), "decode": PhaseFit("decode", 30.0, 6.0, 0.9, 0.1, 0.6)}
    block = sparse_block(fits, {"prefill": 0.5, "decode": 0.5}, ["model.layers.0.self_attn"], TileGeometry(), ["LlamaAttention"])
    meta = parse_checkpoint_meta({"sparse_attention_config": block})
    group = meta.group("skip_softmax")
    assert group.formulas["prefill"].formula == "a * exp(b * target_sparsity)"
    assert group.target_sparsity == {"prefill": 0.5, "decode": 0.5}
    from sparse_llm.backends.base import LayerSpec

    specs = [LayerSpec(i, 4, 2, 64, 0.125, f"model.layers.{i}.self_attn") for i in range(2)]
    params = resolve(SkipSoftmaxAttentionConfig(target_sparsity={"prefill": 0.3}), {}, block, specs)
    assert params[0] is None
    assert params[1].prefill_factor == pytest.approx(2.5 * math.exp(9.0 * 0.3))
    assert params[1].decode_factor == pytest.approx(30.0 * math.exp(6.0 * 0.5))  # the checkpoint's own target
    # TensorRT-LLM / ModelOpt layout: config_groups.group_0 with algorithm, formula and per-phase coefficients
    g0 = block["config_groups"]["group_0"]
    assert set(g0) >= {"algorithm", "targets", "threshold_scale_factor", "target_sparsity", "ignore"}
    assert block["producer"]["name"] == "sparse-llm"


def test_length_bins_and_exact_counts():
    assert length_bins(8192) == [8192, 4096, 2048, 1024]
    assert split_counts(10, 4) == [3, 3, 2, 2] and sum(split_counts(64, 4)) == 64
    with pytest.raises(ValueError, match="fewer than the 4 length bins"):
        split_counts(3, 4)
    with pytest.raises(ValueError, match="must be >= min_seqlen"):
        length_bins(512, 1024)


@pytest.mark.slow
def test_histogram_prediction_equals_engine_achieved_sparsity():
    from sparse_llm import LLM, SamplingParams
    from sparse_llm.calibration.run import collect_gaps

    llm = LLM(max_model_len=1024, enable_chunked_prefill=False)
    text = "The river town kept its records in a tall stone tower by the bridge. " * 60
    ids = llm.tokenizer(text)["input_ids"][:700]
    assert len(ids) == 700
    # The decode check needs the sparse run to generate the dense tokens: at this decode factor the 4th token
    # flips (with prefill skipping on or off), so only the forwards that consume tokens 1-2 are compared.
    steps = 3
    col = collect_gaps(llm, {700: [ids]}, phases=("prefill", "decode"), decode_steps=steps, progress=False)
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    dense_tokens = llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids
    factor = 300.0
    predicted = col.merged("prefill").sparsity(factor)
    predicted_layer0 = col.merged("prefill", layer=0).sparsity(factor)
    assert predicted is not None and 0.02 < predicted < 0.98
    # Layer 0 attends broadly: take the decode factor where its predicted curve first passes 0.1 (λ < 1).
    curve = col.merged("decode", layer=0)
    decode_factor = next(f for f in range(10, curve.min_kv_len, 10) if curve.sparsity(f) > 0.1)
    predicted_decode0 = curve.sparsity(decode_factor)

    sparse = LLM(max_model_len=1024, enable_chunked_prefill=False,
                 sparse_attention_config=SkipSoftmaxAttentionConfig(
                     threshold_scale_factor={"prefill": factor, "decode": decode_factor}))
    out = sparse.generate([ids], params, use_tqdm=False)[0]
    # Layer 0 sees the same inputs in both runs: the prediction is exact up to the histogram's 1% factor bins.
    achieved_layer0 = sparse.engine.runner.layer_sparsity()[0]
    assert achieved_layer0["prefill"] == pytest.approx(predicted_layer0, abs=0.005)
    # Decode too, with the sink-seeded split geometry, as long as the generated tokens are the dense ones.
    assert list(out.outputs[0].token_ids) == list(dense_tokens)
    assert achieved_layer0["decode"] == pytest.approx(predicted_decode0, abs=0.01)
    # Deeper layers see the sparse run's own activations, so the whole model is only close.
    assert out.metrics.sparsity["prefill"] == pytest.approx(predicted, abs=0.05)

"""The bundled model ships calibrated: target_sparsity works out of the box, and only for that exact file."""
import math

import pytest

from sparse_llm.calibration.bundled import bundled_checkpoint_meta, sidecars
from sparse_llm.configs.resolve import resolve
from sparse_llm.configs.sparse import SkipSoftmaxAttentionConfig


@pytest.mark.slow
def test_default_model_resolves_target_sparsity(smollm2):
    meta = smollm2.checkpoint_meta
    assert meta is not None, "the bundled GGUF should pick up its shipped calibration sidecar"
    coeffs = meta["config_groups"]["group_0"]["threshold_scale_factor"]["prefill"]
    params = resolve(SkipSoftmaxAttentionConfig(target_sparsity=0.5), smollm2.hf_config, meta, smollm2.layer_specs)
    assert all(p is not None for p in params)
    assert params[0].prefill_factor == pytest.approx(coeffs["a"] * math.exp(coeffs["b"] * 0.5))


def test_other_files_get_no_sidecar(tmp_path):
    assert sidecars(), "a sidecar must ship in sparse_llm/data/calibration"
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    assert bundled_checkpoint_meta(str(fake)) is None
    assert bundled_checkpoint_meta(str(tmp_path)) is None

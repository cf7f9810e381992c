"""`sparse-llm generate` end to end on a tiny random checkpoint (fast), and its bad-input errors."""
from __future__ import annotations

import pytest

from sparse_llm.cli import main
from sparse_llm.models.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    save_tiny_checkpoint(path, "LlamaForCausalLM")
    return path


def test_generate_prints_text_and_sparsity(tiny_dir, capsys):
    common = ["--model", tiny_dir, "--max-tokens", "5", "--kv-max-tokens", "1024", "--max-model-len", "256"]
    assert main(["generate", "hello there", *common]) == 0
    plain = capsys.readouterr()
    assert plain.out.strip() and plain.err == ""
    assert main(["generate", "hi", *common, "--chat", "--temperature", "0.7", "--sampling-seed", "3"]) == 0
    assert capsys.readouterr().out.strip()
    streaming = ["--set", "sparse_attention_config={algorithm: streaming, sink_tokens: 1, local_window: 2}"]
    assert main(["generate", "hello there, a longer prompt", *common, *streaming]) == 0
    err = capsys.readouterr().err
    assert "achieved sparsity: prefill" in err and "decode" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-tokens", "0"], "max_tokens"),
        (["--temperature", "-1"], "temperature"),
        (["--system", "be brief"], "--system needs --chat"),
        (["--max-model-len", "100000"], "max_model_len=100000 is larger than the model's max_position_embeddings=512"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_dir, capsys, extra, message):
    assert main(["generate", "hello", "--model", tiny_dir, "--kv-max-tokens", "1024", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-llm generate: error:") and message in err

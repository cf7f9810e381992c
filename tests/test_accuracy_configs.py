"""Every config file of the accuracy runs (benchmarks/accuracy_configs, candidates included) is a valid LlmArgs
YAML: a typo there would surface only on the GPU, as a lost row of the table."""
from pathlib import Path

import pytest

from sparse_llm.configs.llm_args import LlmArgs

CONFIGS = sorted((Path(__file__).parent.parent / "benchmarks" / "accuracy_configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accuracy_config_parses(path):
    args = LlmArgs.from_yaml(path)
    sac = args.sparse_attention_config
    if path.stem != "dense":
        assert sac is not None, f"{path} sets no sparse_attention_config"
        assert path.stem.startswith(sac.algorithm.split("_")[0]), f"{path.name} runs {sac.algorithm}"

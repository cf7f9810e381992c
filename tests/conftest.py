"""Shared fixtures: the real SmolLM2 model, loaded once per test session, and its HF reference.

- `smollm2_path`: the bundled GGUF file.
- `smollm2`: our LoadedModel (float32, CPU). Tests must not change its weights; attaching backends/caches
  for a call is fine (see sparse_llm.models.testing.single_prefill_logits, which restores them).
- `hf_smollm2`: transformers' LlamaForCausalLM from the same GGUF (float32, eval). Loading it takes ~20 s,
  so only tests that compare against HF should request it.
- `real_text` / `smollm2_prompt_ids`: real English prose and its first 256 SmolLM2 tokens; `long_prompt`: 601
  tokens of it (repeated), for the prompt-compression tests.
- `llm_factory`: a function, `llm_factory(loaded, **base)`, that is the body of a module's `make_llm` fixture (LLMs on
  the shared model share its layers, so the previous one is closed before the next is built).
"""
from __future__ import annotations

import os

import pytest
import torch

REAL_TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands "
    "which have connected them with another, and to assume among the powers of the earth, the separate and equal "
    "station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of "
    "mankind requires that they should declare the causes which impel them to the separation. We hold these "
    "truths to be self-evident, that all men are created equal, that they are endowed by their Creator with "
    "certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. That to secure "
    "these rights, Governments are instituted among Men, deriving their just powers from the consent of the "
    "governed, That whenever any Form of Government becomes destructive of these ends, it is the Right of the "
    "People to alter or to abolish it, and to institute new Government, laying its foundation on such principles "
    "and organizing its powers in such form, as to them shall seem most likely to effect their Safety and "
    "Happiness. Prudence, indeed, will dictate that Governments long established should not be changed for light "
    "and transient causes; and accordingly all experience hath shewn, that mankind are more disposed to suffer, "
    "while evils are sufferable, than to right themselves by abolishing the forms to which they are accustomed. "
    "But when a long train of abuses and usurpations, pursuing invariably the same Object evinces a design to "
    "reduce them under absolute Despotism, it is their right, it is their duty, to throw off such Government, "
    "and to provide new Guards for their future security. Such has been the patient sufferance of these "
    "Colonies; and such is now the necessity which constrains them to alter their former Systems of Government."
)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from sparse_llm.models.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from sparse_llm.models.loader import load_model

    return load_model(smollm2_path, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def real_text() -> str:
    return REAL_TEXT


@pytest.fixture(scope="session")
def smollm2_prompt_ids(smollm2) -> list[int]:
    ids = smollm2.tokenizer(REAL_TEXT)["input_ids"]
    assert len(ids) >= 256, f"REAL_TEXT has only {len(ids)} tokens"
    return ids[:256]


@pytest.fixture(scope="session")
def long_prompt(smollm2) -> list[int]:
    ids = smollm2.tokenizer(REAL_TEXT + "\n\n" + REAL_TEXT)["input_ids"]
    assert len(ids) >= 601
    return ids[:601]


def _llm_factory(loaded, **base):
    """Yields make(**overrides) -> LLM on `loaded`; closes the previous LLM first and the last one at teardown."""
    from sparse_llm.llm import LLM

    current = []

    def make(**kw):
        while current:
            current.pop().close()
        llm = LLM.from_loaded(loaded, **{**base, **kw})
        current.append(llm)
        return llm

    yield make
    while current:
        current.pop().close()


@pytest.fixture(scope="session")
def llm_factory():
    return _llm_factory

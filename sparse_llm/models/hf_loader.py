"""Hugging Face checkpoint directories: config.json + *.safetensors (single file or sharded with an index)."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch

from sparse_llm.models.registry import model_class
from sparse_llm.models.source import ModelSource

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def safetensors_files(path: str) -> list[str]:
    """The weight files of a directory: those its index names, else every *.safetensors in it."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {path}: {absent}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        others = [os.path.basename(f) for f in glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))]
        hint = f"; found only {others} (only safetensors weights are supported)" if others else ""
        raise FileNotFoundError(f"no weights in {path}: looked for {INDEX_FILE} and *.safetensors{hint}")
    return files


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def generation_eos_ids(path: str) -> list[int]:
    """eos_token_id of generation_config.json (Llama 3 instruct lists several end-of-turn tokens there)."""
    gen = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen):
        return []
    with open(gen) as f:
        return _as_list(json.load(f).get("eos_token_id"))


def load_hf_tokenizer(path: str, *, what: str = "tokenizer"):
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no {what} in {path}: looked for {list(TOKENIZER_FILES)}; pass tokenizer=PATH to use another one"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def open_hf_dir(path: str) -> ModelSource:
    from transformers import AutoConfig

    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        raw = json.load(f)
    cls = model_class(raw.get("architectures"), source=config_file)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    files = safetensors_files(path)
    meta = raw.get("sparse_attention_config")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"{config_file}: sparse_attention_config must be an object, got {type(meta).__name__}")
    return ModelSource(
        path=path,
        hf_config=config,
        model_cls=cls,
        weights=lambda: iter_safetensors(files),
        load_tokenizer=lambda: load_hf_tokenizer(path),
        eos_token_ids=generation_eos_ids(path) + _as_list(getattr(config, "eos_token_id", None)),
        checkpoint_meta=meta,
    )

"""Sharded weight loading of the tensor-parallel layers, per rank, in float64 and without processes: the
slices every rank keeps must recombine exactly into the full layer (columns concatenate, rows sum, vocab
rows concatenate), and each rank's q heads must be the ones that use its KV heads (GQA)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sparse_llm.configs.sparse_more import XAttentionParams
from sparse_llm.distributed.checks import check_devices, check_shardable
from sparse_llm.distributed.group import TensorParallelGroup, build_group, building, SINGLE
from sparse_llm.distributed.layers import (
    ColumnParallelMergedLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from sparse_llm.distributed.runner import shard_layer_params
from sparse_llm.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("_float64")


@pytest.fixture
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)



@pytest.mark.parametrize("size,heads,kv_heads,head_dim", [(2, 4, 2, 3), (2, 8, 4, 5), (4, 12, 4, 2), (3, 9, 3, 7)])
def test_qkv_ranks_own_matching_q_and_kv_heads(size, heads, kv_heads, head_dim):
    hidden = 11
    g = torch.Generator().manual_seed(size * 100 + heads)
    wq = torch.randn(heads * head_dim, hidden, generator=g)
    wk = torch.randn(kv_heads * head_dim, hidden, generator=g)
    wv = torch.randn(kv_heads * head_dim, hidden, generator=g)
    x = torch.randn(5, hidden, generator=g)
    q_full = (x @ wq.T).view(5, heads, head_dim)
    k_full = (x @ wk.T).view(5, kv_heads, head_dim)
    group_size = heads // kv_heads
    for rank in range(size):
        layer = ColumnParallelMergedLinear(
            hidden, {"q": wq.shape[0], "k": wk.shape[0], "v": wv.shape[0]}, False, TensorParallelGroup(rank, size), "qkv"
        )
        for sid, w in (("q", wq), ("k", wk), ("v", wv)):
            layer.weight.weight_loader(layer.weight, w, sid)
        q, k, _ = layer.split(layer(x))
        q = q.view(5, heads // size, head_dim)
        k = k.view(5, kv_heads // size, head_dim)
        my_kv = range(rank * kv_heads // size, (rank + 1) * kv_heads // size)
        my_q = [h for h in range(heads) if h // group_size in my_kv]  # q head h attends KV head h // G
        torch.testing.assert_close(q, q_full[:, my_q], rtol=0, atol=1e-12)
        torch.testing.assert_close(k, k_full[:, list(my_kv)], rtol=0, atol=1e-12)
        assert layer.weight.data_ptr() != wq.data_ptr()  # a copy: the full tensor is not kept alive


@pytest.mark.parametrize("size", [2, 3])
def test_gate_up_and_row_parallel_recombine(size):
    hidden, inter = 7, 6 * size
    g = torch.Generator().manual_seed(size)
    wg, wu, wd = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g), torch.randn(hidden, inter, generator=g)
    x = torch.randn(4, hidden, generator=g)
    full = F.linear(F.silu(x @ wg.T) * (x @ wu.T), wd)
    partial = torch.zeros_like(full)
    for rank in range(size):
        group = TensorParallelGroup(rank, size)
        gate_up = ColumnParallelMergedLinear(hidden, {"gate": inter, "up": inter}, False, group, "gate_up_proj")
        gate_up.weight.weight_loader(gate_up.weight, wg, "gate")
        gate_up.weight.weight_loader(gate_up.weight, wu, "up")
        down = RowParallelLinear(inter, hidden, False, group, "down_proj")
        down.weight.weight_loader(down.weight, wd)
        gate, up = gate_up.split(gate_up(x))
        partial += F.linear(F.silu(gate) * up, down.weight)  # what the all-reduce sums
    torch.testing.assert_close(partial, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size,vocab", [(2, 11), (3, 10), (4, 13)])
def test_vocab_shards_cover_the_vocabulary_once(size, vocab):
    hidden = 5
    g = torch.Generator().manual_seed(vocab)
    w = torch.randn(vocab, hidden, generator=g)
    h = torch.randn(3, hidden, generator=g)
    pieces = []
    for rank in range(size):
        group = TensorParallelGroup(rank, size)
        emb = VocabParallelEmbedding(vocab, hidden, group)
        emb.weight.weight_loader(emb.weight, w)
        head = ParallelLMHead(hidden, vocab, group, tied=emb)
        assert head.weight is emb.weight
        pieces.append(F.linear(h, head.weight))  # what rank 0 gathers
        pad = emb.weight[emb.shard.end - emb.shard.start:]
        assert torch.count_nonzero(pad) == 0
    logits = torch.cat(pieces, -1)[:, :vocab]
    torch.testing.assert_close(logits, h @ w.T, rtol=1e-12, atol=1e-12)


def test_size_one_layers_are_the_plain_layers():
    x = torch.randn(3, 6)
    w = torch.randn(4, 6)
    row = RowParallelLinear(6, 4, True, SINGLE, "o_proj")
    row.weight.weight_loader(row.weight, w)
    row.bias.weight_loader(row.bias, torch.ones(4))
    torch.testing.assert_close(row(x), x @ w.T + 1, rtol=0, atol=1e-12)
    assert build_group() is SINGLE


def test_bad_shard_sizes_name_the_numbers():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not divide qkv_proj k rows=6"):
        ColumnParallelMergedLinear(8, {"q": 12, "k": 6, "v": 6}, False, TensorParallelGroup(0, 4), "qkv_proj")
    layer = ColumnParallelMergedLinear(8, {"gate": 4, "up": 4}, False, TensorParallelGroup(1, 2), "gate_up_proj")
    with pytest.raises(ValueError, match=r"shape \(6, 8\), the full gate projection has 4 rows"):
        layer.weight.weight_loader(layer.weight, torch.randn(6, 8), "gate")


def test_model_built_inside_building_is_sharded():
    config = SimpleNamespace(
        hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=4, vocab_size=21,
        num_hidden_layers=1, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True,
        hidden_act="silu", rope_scaling=None,
    )
    with building(TensorParallelGroup(1, 2)):
        model = LlamaForCausalLM(config)
    attn = model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.attn.spec.num_heads, attn.attn.spec.num_kv_heads) == (2, 1, 2, 1)
    assert tuple(attn.qkv_proj.weight.shape) == ((2 + 1 + 1) * 4, 16)
    assert tuple(model.model.layers[0].mlp.down_proj.weight.shape) == (16, 12)
    assert tuple(model.model.embed_tokens.weight.shape) == (11, 16)
    assert LlamaForCausalLM(config).model.layers[0].self_attn.num_heads == 4  # outside the block: not sharded


def test_per_head_xattention_thresholds_are_narrowed_to_the_rank():
    params = XAttentionParams("xattention", threshold=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
    assert shard_layer_params(params, TensorParallelGroup(1, 2), 3).threshold == (0.4, 0.5, 0.6)
    assert shard_layer_params(params, TensorParallelGroup(2, 3), 2).threshold == (0.5, 0.6)
    one = XAttentionParams("xattention", threshold=(0.9,))
    assert shard_layer_params(one, TensorParallelGroup(1, 2), 3) is one
    assert shard_layer_params(None, TensorParallelGroup(1, 2), 3) is None


def test_unshardable_models_and_devices_are_refused():
    llama = SimpleNamespace(architectures=["LlamaForCausalLM"], num_attention_heads=12, num_key_value_heads=6,
                            intermediate_size=30)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not divide num_key_value_heads=6.*\[1, 2, 3, 6\]"):
        check_shardable(4, llama, LlamaForCausalLM, None)
    with pytest.raises(ValueError, match="algorithm='dsa' cannot be sharded"):
        check_shardable(2, llama, LlamaForCausalLM, "dsa")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=6 does not divide intermediate_size=28"):
        check_shardable(6, SimpleNamespace(**{**vars(llama), "intermediate_size": 28}), LlamaForCausalLM, None)
    from sparse_llm.models.deepseek_v32 import DeepseekV32ForCausalLM

    dsa = SimpleNamespace(architectures=["DeepseekV32ForCausalLM"], num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"\['DeepseekV32ForCausalLM'\] cannot be sharded"):
        check_shardable(2, dsa, DeepseekV32ForCausalLM, None)
    visible = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"needs {visible + 1} CUDA devices .* torch sees {visible}"):
        check_devices(visible + 1, torch.device("cuda"))
    check_devices(8, torch.device("cpu"))

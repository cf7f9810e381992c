"""A minimal stand-in for the engine's model runner, for tests of models and backends without the engine.

It owns paged caches allocated from each backend's `cache_spec`, hands out blocks from a shuffled free list
(so block tables are not the identity and kernels must follow them), builds the per-step AttentionMetadata
(prefills first, then decodes, vLLM's layout) and runs the model under `set_context`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparse_llm.backends.base import AttentionBackend, AttentionMetadata
from sparse_llm.engine.context import set_context


@dataclass
class _Seq:
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is in the cache
    blocks: list[int] = field(default_factory=list)


class PagedTestRunner:
    def __init__(self, model, backends: list[AttentionBackend], block_size: int, num_blocks: int, seed: int = 0):
        layers = model.attention_layers()
        if len(layers) != len(backends):
            raise ValueError(f"got {len(backends)} backends for {len(layers)} attention layers")
        param = next(model.parameters())
        self.model, self.block_size, self.device = model, block_size, param.device
        for layer, backend in zip(layers, backends):
            layer.backend = backend
            layer.cache = {
                s.name: torch.zeros((num_blocks, *s.block_shape), dtype=s.dtype, device=self.device)
                for s in backend.cache_spec(block_size, param.dtype)
            }
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.seqs: dict[int, _Seq] = {}

    def _grow(self, seq: _Seq, length: int) -> None:
        while len(seq.blocks) * self.block_size < length:
            if not self.free:
                raise RuntimeError("PagedTestRunner: out of KV blocks; pass a larger num_blocks")
            seq.blocks.append(self.free.pop())

    def step(self, work: list[tuple[int, list[int]]], collect_stats: bool = False, all_tokens: bool = False):
        """Run one step; `work` = [(seq_id, new token ids)]. Returns float32 logits [len(work), vocab] of each
        entry's last token (all_tokens: a list of [len(new), vocab], one per entry). Entries that add one token
        to a sequence with cached tokens are decodes."""
        for sid, _ in work:
            self.seqs.setdefault(sid, _Seq())
        is_decode = [len(new) == 1 and len(self.seqs[sid].tokens) > 0 for sid, new in work]
        order = [i for i, d in enumerate(is_decode) if not d] + [i for i, d in enumerate(is_decode) if d]
        ids, positions, slots, q_lens, kv_lens, tables = [], [], [], [], [], []
        for i in order:
            sid, new = work[i]
            if not new:
                raise ValueError(f"sequence {sid}: a step needs at least one new token")
            seq = self.seqs[sid]
            start = len(seq.tokens)
            self._grow(seq, start + len(new))
            pos = list(range(start, start + len(new)))
            ids += new
            positions += pos
            slots += [seq.blocks[p // self.block_size] * self.block_size + p % self.block_size for p in pos]
            q_lens.append(len(new))
            kv_lens.append(start + len(new))
            tables.append(list(seq.blocks))
        width = max(len(t) for t in tables)
        dev = self.device
        meta = AttentionMetadata(
            num_prefills=sum(1 for d in is_decode if not d),
            num_prefill_tokens=sum(q_lens[: sum(1 for d in is_decode if not d)]),
            cu_seqlens_q=torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(kv_lens),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            block_size=self.block_size,
            seq_stats=torch.zeros(len(work), 2, dtype=torch.int64, device=dev) if collect_stats else None,
            seq_lens_cpu=kv_lens,
            query_lens_cpu=q_lens,
            seq_ids=[work[i][0] for i in order],
        )
        set_context(meta)
        try:
            with torch.no_grad():
                hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev))
                if all_tokens:
                    logits = self.model.compute_logits(hidden)
                else:
                    logits = self.model.compute_logits(hidden[torch.tensor(q_lens, device=dev).cumsum(0) - 1])
        finally:
            set_context(None)
        for i in order:
            sid, new = work[i]
            self.seqs[sid].tokens += list(new)
        self.last_meta = meta
        if all_tokens:
            per_entry = logits.split(q_lens)
            return [per_entry[order.index(i)] for i in range(len(work))]
        out = torch.empty_like(logits)
        out[torch.tensor(order, device=dev)] = logits
        return out

    def generate_greedy(self, sid: int, prompt: list[int], max_new_tokens: int, prefill_chunk: int | None = None) -> list[int]:
        """Prefill (optionally in chunks), then greedy decode one token per step."""
        chunk = prefill_chunk or len(prompt)
        for s in range(0, len(prompt), chunk):
            logits = self.step([(sid, prompt[s:s + chunk])])
        out = []
        for _ in range(max_new_tokens):
            tok = int(logits[0].argmax())
            out.append(tok)
            logits = self.step([(sid, [tok])])
        return out


TINY_DEEPSEEK_V32 = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, n_group=4, topk_group=2,
    num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=16,
    index_topk=16, index_head_dim=32, index_n_heads=8, first_k_dense_replace=1, max_position_embeddings=512,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
                     "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
    bos_token_id=None, eos_token_id=0, pad_token_id=None,
)


def write_byte_tokenizer(path: str, vocab_size: int = 300) -> None:
    """A small byte-level BPE tokenizer (ids < vocab_size, id 0 = <eos>) saved in the HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"], show_progress=False
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog; sparse attention reads few tokens"] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


def write_tiny_deepseek_v32(path: str, seed: int = 0, **overrides):
    """Save a random-weight transformers DeepseekV32ForCausalLM (float32, HF key names) and a tokenizer to `path`.

    Returns the transformers model (eval mode), the reference for comparisons.
    """
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV32Config(**{**TINY_DEEPSEEK_V32, **overrides})
    model = DeepseekV32ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises the router bias to zero; make it matter
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    model.save_pretrained(path)
    write_byte_tokenizer(path, config.vocab_size)
    return model

"""Where a block-sparse prefill loses a RULER answer: per layer and head, is the asked needle's KV block kept
for the last query block, and how much of the last row's true (dense softmax) attention do the kept blocks hold?

One model load; each config runs one eval sample as a single prefill chunk with every layer's backend swapped
for a probe that computes the selection exactly as the library backend does (same functions), records what
the last query row loses, then runs the masked torch reference. Prints the answer and a per-layer summary.

  OMP_NUM_THREADS=1 python benchmarks/prefill_loss_probe.py --task ruler_niah_multikey --length 4096 \
      --indices 14 19 --configs dense xattention flexprefill --json out.json
"""
from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_capture import swapped_backends  # noqa: E402
from sparse_llm.backends.flexprefill import FlexPrefillTorchBackend
from sparse_llm.backends.torch_dense import TorchDenseBackend, gather_kv
from sparse_llm.backends.xattention import XAttentionTorchBackend
from sparse_llm.configs.sparse_more import FlexPrefillParams, XAttentionParams
from sparse_llm.sparse.block_selection import selection_from_masks, with_dense_last_query_block
from sparse_llm.sparse.flexprefill import flexprefill_block_mask
from sparse_llm.sparse.xattention import xattention_block_mask

LAST_ROWS = 8  # rows at the end of the prompt whose true attention is examined (the answer is read there)


def parse_config(spec: str):
    """'xattention:threshold=0.99,stride=16' -> (name, params); 'dense' -> (dense, None)."""
    name, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        key, val = item.split("=")
        kw[key] = val
    if name == "dense":
        return spec, None
    if name == "full":  # every causal block through the probe's own attention (dense, with K/V recording)
        return spec, (XAttentionParams("xattention", threshold=(1.0,)), {"full": 1})
    conv = {"threshold": lambda v: tuple(float(x) for x in v.split("/")), "stride": int, "block_size": int,
            "gamma": float, "tau": float, "min_budget": int, "dense_last_block": lambda v: v == "1",
            "local_window": int, "est_rows": int, "prev_blocks": int, "remainder": int,
            "layers": lambda v: set(range(int(v.split("-")[0]), int(v.split("-")[1]) + 1))}
    extra = {k: conv[k](v) for k, v in kw.items() if k in ("local_window", "est_rows", "prev_blocks", "layers", "remainder")}
    base = {k: conv[k](v) for k, v in kw.items() if k not in extra}
    params = XAttentionParams("xattention", **base) if name == "xattention" else FlexPrefillParams("flexprefill", **base)
    return spec, (params, extra)


def last_rows_local_window(mask: torch.Tensor, qb0: int, sk: int, block: int, window: int) -> torch.Tensor:
    """Experimental: the key blocks within `window` tokens before the last query row, for the last query block."""
    if window <= 0:
        return mask
    out = mask.clone()
    first = max(0, (sk - window) // block)
    out[:, :, -1, first:] = True
    causal = torch.arange(mask.shape[-1]) <= (mask.shape[2] - 1 + qb0)
    out[:, :, -1] &= causal
    return out


class Probe:
    """Mixin: compute the mask as the library does, record the last rows' losses, run the masked reference."""

    def setup(self, extra, record, needle):
        self.extra, self.record, self.needle = extra, record, needle

    def mask(self, q, k):
        p = self.params
        if isinstance(p, XAttentionParams):
            thr = p.threshold[0] if len(p.threshold) == 1 else list(p.threshold)
            m, qb0 = xattention_block_mask(q, k, self.layer.scale, thr, p.stride, p.block_size, use_triton=False)
        else:
            m, qb0, _ = flexprefill_block_mask(q, k, self.layer.scale, p.gamma, p.tau, p.min_budget, p.max_budget,
                                               p.block_size)
        if p.dense_last_block:
            m = with_dense_last_query_block(m)
        m = last_rows_local_window(m, qb0, k.shape[2], p.block_size, self.extra.get("local_window", 0))
        qb = qb0 + torch.arange(m.shape[2])
        kb = torch.arange(m.shape[3])
        causal = kb[None, :] <= qb[:, None]
        if self.extra.get("full"):
            m = causal.expand_as(m).clone()
        nprev = self.extra.get("prev_blocks", 0)
        if nprev:
            m = m | ((kb[None, :] >= qb[:, None] - nprev) & causal)
        return m

    def prefill_selection(self, q, k):
        m = self.mask(q, k)
        self._diagnose(q, k, m)
        return selection_from_masks(m[0].transpose(0, 1), self.params.block_size)

    def _prefill_one(self, q, kv, meta, i, start, q_len, kv_len, out) -> None:
        """The masked attention, one query block at a time (the library's token-mask reference is slow on CPU)."""
        qi = q[start:start + q_len]
        k, v = gather_kv(kv, meta.block_tables[i], kv_len)
        qh, kh = qi.transpose(0, 1)[None], k.transpose(0, 1)[None].to(q.dtype)
        m = self.prefill_selection_mask(qh, kh)[0]  # [H, nqb, nkb]
        bs = self.params.block_size
        g = qh.shape[1] // kh.shape[1]
        kr, vr = kh[0].repeat_interleave(g, 0), v.transpose(0, 1).to(q.dtype).repeat_interleave(g, 0)
        q0 = kv_len - q_len
        qb0 = q0 // bs
        pos_k = torch.arange(kv_len)
        remainder = self.extra.get("remainder", 0)
        if remainder:  # experimental: one pseudo-key per skipped block, its mean K and V, weighted by its size
            nfull = kv_len // bs
            kbar = kr[:, :nfull * bs].reshape(kr.shape[0], nfull, bs, -1).mean(2)
            vbar = vr[:, :nfull * bs].reshape(vr.shape[0], nfull, bs, -1).mean(2)
        for t in range(m.shape[1]):
            r0, r1 = max(q0, (qb0 + t) * bs), min(kv_len, (qb0 + t + 1) * bs)
            allowed = m[:, t].repeat_interleave(bs, -1)[:, None, :r1]  # [H, 1, r1]
            allowed = allowed & (pos_k[None, None, :r1] <= torch.arange(r0, r1)[None, :, None])
            kk, vv = kr[:, :r1], vr[:, :r1]
            if remainder and qb0 + t > 0:
                nb = min(nfull, qb0 + t)  # whole blocks before this query block
                skipped = ~m[:, t, :nb]  # [H, nb]
                bias = torch.zeros(allowed.shape[0], r1 - r0, r1 + nb, dtype=q.dtype)
                bias[..., :r1] = torch.where(allowed, 0.0, float("-inf"))
                bias[..., r1:] = torch.where(skipped, float(torch.log(torch.tensor(float(bs)))), float("-inf"))[:, None, :]
                allowed = bias
                kk, vv = torch.cat([kk, kbar[:, :nb]], 1), torch.cat([vv, vbar[:, :nb]], 1)
            o = torch.nn.functional.scaled_dot_product_attention(
                qh[0, :, r0 - q0:r1 - q0], kk, vv, attn_mask=allowed, scale=self.layer.scale)
            out[start + r0 - q0:start + r1 - q0] = o.transpose(0, 1)
        causal = (qb0 + torch.arange(m.shape[1]))[:, None] >= torch.arange(m.shape[2])[None, :]
        n0, n1 = self.needle
        self.record.setdefault("_kv", {})[self.layer.layer_idx] = (
            k[n0 - 32:n1].clone(), v[n0 - 32:n1].clone(), k[-64:].clone(), v[-64:].clone())  # needle sentence, question
        self.record.setdefault("_density", []).append(float(m.float().sum() / (causal.sum() * m.shape[0])))

    def prefill_selection_mask(self, q, k):
        m = self.mask(q, k)
        self._diagnose(q, k, m)
        return m

    def _diagnose(self, q, k, m):
        if k.shape[2] != q.shape[2]:
            return  # only whole-prompt prefills are examined
        bs = self.params.block_size
        sk = k.shape[2]
        g = q.shape[1] // k.shape[1]
        kk = k.repeat_interleave(g, 1).float()
        last = q[:, :, -LAST_ROWS:].float()
        a = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", last, kk) * self.layer.scale, -1)[0]  # [H, R, Sk]
        # (the last rows see every key: causal holds trivially for row Sk-1; rows before miss < 8 keys, ignored)
        keep_tok = m[0, :, -1].repeat_interleave(bs, -1)[:, :sk].float()  # [H, Sk]
        kept_mass = (a * keep_tok[:, None]).sum(-1)  # [H, R]
        n0, n1 = self.needle
        needle_mass = a[..., n0:n1].sum(-1)  # [H, R]
        nb = sorted({n0 // bs, (n1 - 1) // bs})
        needle_kept = m[0, :, -1, nb].all(-1)  # [H]
        self.record[self.layer.layer_idx] = {
            "kept_mass_last": kept_mass[:, -1].tolist(),
            "kept_mass_rows_min": kept_mass.min(-1).values.tolist(),
            "needle_mass_last": needle_mass[:, -1].tolist(),
            "needle_mass_rows_max": needle_mass.max(-1).values.tolist(),
            "needle_kept": needle_kept.tolist(),
            "density_last_qb": m[0, :, -1].float().mean(-1).tolist(),
            "density_all": float(m.float().sum() / (torch.arange(m.shape[2])[:, None] >= torch.arange(m.shape[3])).sum() / m.shape[1]),
        }


def needle_span(tokenizer, sample) -> tuple[int, int]:
    """Token range [n0, n1) of the asked needle's value (the first occurrence of the value in the prompt)."""
    value = sample.answers[0]
    pos = sample.prompt.index(f"is: {value}.")
    c0, c1 = pos + 4, pos + 4 + len(value)
    enc = tokenizer(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == sample.prompt_token_ids, "tokenisation of the prompt text does not reproduce its ids"
    toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < c1 and b > c0]
    return toks[0], toks[-1] + 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="ruler_niah_multikey")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--indices", type=int, nargs="+", required=True)
    ap.add_argument("--configs", nargs="+", default=["dense", "xattention", "flexprefill"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--max-tokens", type=int, default=12)
    args = ap.parse_args()

    from sparse_llm import LLM, SamplingParams
    from sparse_llm.eval.runner import make_samples
    from sparse_llm.eval.tasks import get_task

    n = args.length + 64
    llm = LLM(device="cpu", dtype=args.dtype, max_model_len=min(8192, n), max_num_batched_tokens=8192,
              enforce_eager=True, kv_cache_config={"max_tokens": n + 64, "enable_prefix_caching": False})
    task = get_task(args.task, args.length)
    samples = make_samples(task, llm.tokenizer, max(args.indices) + 1, args.seed, progress=False)
    results = []
    for i in args.indices:
        s = samples[i]
        dense_kv = None
        span = needle_span(llm.tokenizer, s)
        for spec in args.configs:
            name, cfg = parse_config(spec)
            record: dict = {}

            def make(layer, cfg=cfg, record=record, span=span):
                if cfg is None:
                    return TorchDenseBackend(layer, None)
                params, extra = cfg
                if "layers" in extra and layer.layer_idx not in extra["layers"]:
                    return TorchDenseBackend(layer, None)
                base = XAttentionTorchBackend if isinstance(params, XAttentionParams) else FlexPrefillTorchBackend
                b = type("P", (Probe, base), {})(layer, params)
                b.setup(extra, record, span)
                return b

            t0 = time.perf_counter()
            with swapped_backends(llm, make):
                out = llm.generate([s.prompt_token_ids], SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
                                   use_tqdm=False)[0]
            ok = all(a in out.text for a in s.answers)
            row = {"index": i, "config": name, "ok": ok, "pred": out.text, "answer": s.answers, "needle": span,
                   "tokens": len(s.prompt_token_ids), "sparsity": out.metrics.sparsity.get("prefill"),
                   "seconds": round(time.perf_counter() - t0, 1), "layers": record}
            results.append(row)
            density = record.pop("_density", None)
            kvs = record.pop("_kv", None)
            if name == "full":
                dense_kv = kvs
            elif kvs and dense_kv:
                row["kv_err"] = {li: [float((kvs[li][j] - dense_kv[li][j]).norm() / dense_kv[li][j].norm()) for j in range(4)]
                                 for li in sorted(kvs)}
                print("   rel err of K/V, needle sentence | last 64 prompt rows, by layer:",
                      " ".join(f"{li}:{e[0]:.2f}/{e[1]:.2f}|{e[2]:.2f}/{e[3]:.2f}" for li, e in row["kv_err"].items()))
            row["density"] = density
            lost = [(li, h, round(r["needle_mass_last"][h], 2)) for li, r in sorted(record.items())
                    for h in range(len(r["needle_kept"])) if not r["needle_kept"][h] and r["needle_mass_rows_max"][h] > 0.1]
            kept = [min(r["kept_mass_last"]) for _, r in sorted(record.items())]
            if density:
                row["sparsity"] = 1 - sum(density) / len(density)
            print(f"[{i}] {name}: ok={ok} pred={out.text!r} ans={s.answers} sp={row['sparsity']} t={row['seconds']}s "
                  f"needle={span} dropped(layer,head,mass)={lost} min_kept_mass_by_layer={[round(x, 2) for x in kept]}",
                  flush=True)
    llm.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()

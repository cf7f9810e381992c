"""Why does Ada-SnapKV lose a RULER sample that SnapKV answers? Per layer and KV head: how much of the exact attention
of the answer-time queries lands on the tokens each selection keeps, and how far the kept-only output is from dense.

One dense, teacher-forced pass over prompt + answer (the dense model's greedy answer) records every layer's q/k/v;
each method's selection is then computed offline from the prompt's last window queries exactly as the backend does
(snapkv_select), so the numbers describe the selection, not a second engine run. Answer-time queries are the
positions after the prompt (the first answer token comes from the dense prefill and is the same for every method).

Methods: snapkv, ada<alpha> (ours, snapkv_select.ada_keep) and paper<alpha> (AdaKV's published allocation).

  OMP_NUM_THREADS=1 python -m benchmarks.snapkv_head_mass --task ruler_niah_multikey --index 3 18 --alphas 0.2 0.5
"""
from __future__ import annotations

import argparse
import json

import torch

from sparse_llm.backends.base import AttentionBackend, write_kv
from sparse_llm.backends.snapkv_select import ada_keep, snapkv_keep, window_scores
from sparse_llm.backends.torch_dense import gather_kv, paged_attention_torch


class _Record(AttentionBackend):
    """Dense attention that keeps the whole sequence's q/k/v of the (single) prefill."""

    name = "torch"
    algorithms = frozenset({"capture"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, store: dict):
        super().__init__(layer, None)
        self.store = store

    def forward(self, q, k, v, cache, meta):
        kv = cache["kv"]
        write_kv(kv, k, v, meta.slot_mapping)
        if meta.num_prefills:
            kk, vv = gather_kv(kv, meta.block_tables[0], meta.seq_lens_cpu[0])
            if meta.query_lens_cpu[0] != meta.seq_lens_cpu[0]:
                raise ValueError("the recording pass must prefill the whole sequence in one step "
                                 "(no prefix cache, no chunks)")
            self.store[self.layer.layer_idx] = (q[: meta.query_lens_cpu[0]].double(), kk.double(), vv.double())
        return paged_attention_torch(q, kv, meta, self.layer.scale)


def ada_paper_keep(score: torch.Tensor, budget: int, window: int, alpha: float) -> torch.Tensor:
    """AdaKV's published allocation (reference code): B*_h = head h's count in the layer-wide top Hkv x share of the
    full scores, n_h = round((1 - alpha) B*_h + floor), each head its own top n_h (+ the window)."""
    Hkv, prefix = score.shape
    share = budget - window
    floor = int(alpha * share)
    top = torch.topk(score.flatten(), Hkv * share).indices // prefix
    count = torch.bincount(top, minlength=Hkv).double()
    n = torch.round(count * (1 - alpha) + floor).long().clamp(max=prefix)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    keep = torch.full((Hkv, int(n.max()) + window), -1, dtype=torch.long)
    for h in range(Hkv):
        keep[h, : n[h]] = order[h, : n[h]].sort().values
        keep[h, n[h]: n[h] + window] = torch.arange(prefix, prefix + window)
    return keep


def value_token_positions(tokenizer, text: str, ids: list[int], value: str) -> list[int]:
    """Prompt positions of the tokens that spell the queried needle's value ('... is: VALUE.')."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise ValueError("re-tokenising the prompt text does not give the sample's ids; cannot locate the needle")
    c0 = text.index(f"is: {value}.") + len("is: ")
    c1 = c0 + len(value)
    return [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < c1 and b > c0]


def kept_mask(keep: torch.Tensor, length: int) -> torch.Tensor:
    """[Hkv, length] bool from keep [Hkv, n] (-1 padded)."""
    m = torch.zeros(keep.shape[0], length + 1, dtype=torch.bool)
    m.scatter_(1, torch.where(keep < 0, length, keep), True)
    return m[:, :length]


def answer_stats(q, k, v, prompt_len, kept, scale):
    """Per KV head: the exact attention mass of the answer queries on kept keys (mean over the group's query heads
    and the answer positions), and the relative output error of attention restricted (renormalised) to the kept
    keys (mean over answer positions, max over the group's query heads); generated keys are always kept."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    qa = q[prompt_len:]  # [A, H, D]
    A = qa.shape[0]
    s = torch.einsum("ahd,lhd->hal", qa, k.repeat_interleave(g, 1)) * scale  # [H, A, T]
    pos = torch.arange(prompt_len, T)
    s = s.masked_fill(torch.arange(T)[None, None, :] > pos[None, :, None], float("-inf"))
    p = torch.softmax(s, -1)
    keepm = torch.ones(Hkv, T, dtype=torch.bool)
    keepm[:, :prompt_len] = kept
    keepm = keepm.repeat_interleave(g, 0)[:, None, :]  # [H, 1, T]
    mass = (p * keepm).sum(-1)  # [H, A]
    vv = v.repeat_interleave(g, 1)  # [T, H, D]
    o = torch.einsum("hat,thd->had", p, vv)
    pk = p * keepm
    ok = torch.einsum("hat,thd->had", pk / pk.sum(-1, keepdim=True), vv)
    err = (ok - o).norm(dim=-1) / o.norm(dim=-1)
    return mass.mean(1).view(Hkv, g).mean(1), err.mean(1).view(Hkv, g).amax(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="ruler_niah_multikey")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--index", type=int, nargs="+", required=True)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.2])
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from sparse_llm import LLM, SamplingParams
    from sparse_llm.eval.runner import make_samples
    from sparse_llm.eval.tasks import get_task
    from benchmarks.smollm2_capture import swapped_backends

    task = get_task(args.task, args.length)
    n = args.length + 64
    llm = LLM(device="cpu", dtype="float32", enforce_eager=True, max_model_len=n, max_num_batched_tokens=n,
              attention_backend="torch", kv_cache_config={"max_tokens": n + 64, "enable_prefix_caching": False})
    samples = make_samples(task, llm.tokenizer, max(args.index) + 1, 0, progress=False)
    report = []
    for idx in args.index:
        s = samples[idx]
        greedy = SamplingParams(max_tokens=task.max_tokens, temperature=0.0)
        out = llm.generate([s.prompt_token_ids], greedy, use_tqdm=False)[0]
        ids = list(s.prompt_token_ids) + list(out.token_ids)[:-1]
        L = len(s.prompt_token_ids)
        store: dict = {}
        with swapped_backends(llm, lambda spec: _Record(spec, store)):
            llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)
        needle = value_token_positions(llm.tokenizer, s.prompt, s.prompt_token_ids, s.answers[0])
        print(f"sample {idx}: dense answer {out.text!r} gold {s.answers} L={L} needle tokens from {needle[:1]}")
        B, W = args.budget, args.window
        methods = {"snapkv": lambda sc: snapkv_keep(sc, B, W)}
        for a in args.alphas:
            methods[f"ada{a}"] = lambda sc, a=a: ada_keep(sc, B, W, a)[0]
            methods[f"paper{a}"] = lambda sc, a=a: ada_paper_keep(sc, B, W, a)
        rows = []
        for layer in sorted(store):
            q, k, v = store[layer]
            scale = llm.engine.runner.layers[layer].spec.scale
            score = window_scores(q[L - args.window:L], k[:L], scale, 7, "max")
            row = {"layer": layer}
            for name, select in methods.items():
                km = kept_mask(select(score), L)
                mass, err = answer_stats(q, k, v, L, km, scale)
                row[name] = {
                    "n_h": km.sum(1).tolist(),
                    "window_score_kept": round(float((score * km[:, : L - args.window]).sum() / score.sum()), 4),
                    "mass": [round(x, 4) for x in mass.tolist()],
                    "err": [round(x, 4) for x in err.tolist()],
                    "needle_kept": km[:, needle].float().mean(1).tolist(),
                }
            rows.append(row)
            print(f"L{layer:2d} " + " | ".join(
                f"{m} n={row[m]['n_h']} mass={row[m]['mass']} err={row[m]['err']} "
                f"needle={[round(x, 2) for x in row[m]['needle_kept']]}" for m in methods))
        for m in methods:
            mass = torch.tensor([r[m]["mass"] for r in rows])
            err = torch.tensor([r[m]["err"] for r in rows])
            ndl = torch.tensor([r[m]["needle_kept"] for r in rows])
            wsk = torch.tensor([r[m]["window_score_kept"] for r in rows])
            print(f"sample {idx} {m:>9}: mean mass {mass.mean():.4f} min {mass.min():.4f} | "
                  f"mean err {err.mean():.4f} max {err.max():.4f} | KV heads err>0.1: {int((err > 0.1).sum())} | "
                  f"needle tokens kept {ndl.mean():.3f} | pooled window score kept {wsk.mean():.4f}")
        report.append({"index": idx, "dense": out.text, "answers": s.answers, "L": L, "layers": rows})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f)
    llm.close()


if __name__ == "__main__":
    main()

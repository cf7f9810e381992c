"""Why does Quest lose RULER needles that dense finds? Run Quest decode (torch backend, CPU) on chosen samples and, at
every decode step, layer and query head, compare the pages each selection rule keeps with the exact softmax of the
same query over all cached keys: the attention mass kept, and where the lost mass was (the sink page, the needle
sentence's pages, the recent window, elsewhere).

One engine per page size with prefix caching: the dense prompt prefill runs once per sample, then every variant
(token_budget, sink_pages, recent_pages, spread_weight) only re-runs the decode steps; the variant's params are swapped into the
layers' backends. `dense` is Quest with a budget above the sequence length (prefill and layers < dense_layers are
dense in every variant, so this equals the dense model up to numerics). The probe records each decode query and the
final keys of the run it observes, so the mass numbers describe the variant's own trajectory; each step is also
scored offline with spread weights ALPHAS (same queries and forced pages), and the greedy margins (top-1 minus top-2
log-probability) of the first answer tokens say how close a flip was. The probe's prefill is SDPA (Quest's prefill
is dense anyway): ~100 s per 8K sample on one core, then ~10 s per variant.

  OMP_NUM_THREADS=1 python -m benchmarks.quest_needle_mass --task ruler_niah --index 9 13 \
      --variants p8 dense p8_s1 p8_s1_r4 p8_s1_w05 --out /tmp/quest_mass.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import torch

from sparse_llm.backends.quest import QuestTorchBackend
from sparse_llm.backends.base import write_kv
from sparse_llm.backends.torch_dense import gather_kv, paged_attention_torch
from sparse_llm.sparse.quest import page_minmax, page_scores

# Offline bound variants scored on every probed step (see step_stats).
ALPHAS = (0.75, 0.5, 0.25)
# name -> (page_size, overrides of QuestParams); "dense" = a budget no sample reaches.
VARIANTS = {
    "dense": (8, {"token_budget": 1 << 20}),
    "p8": (8, {}),
    "p8_s1": (8, {"sink_pages": 1}),
    "p8_s2": (8, {"sink_pages": 2}),
    "p8_r4": (8, {"recent_pages": 4}),
    "p8_s1_r4": (8, {"sink_pages": 1, "recent_pages": 4}),
    "p8_s2_r8": (8, {"sink_pages": 2, "recent_pages": 8}),
    "p8_w05": (8, {"spread_weight": 0.5}),
    "p8_s1_w05": (8, {"sink_pages": 1, "spread_weight": 0.5}),
    "p8_s1_r4_w05": (8, {"sink_pages": 1, "recent_pages": 4, "spread_weight": 0.5}),
    "p16_s1_w05": (16, {"sink_pages": 1, "spread_weight": 0.5}),
    "p16": (16, {}),
    "p16_s1": (16, {"sink_pages": 1}),
    "p16_s1_r2": (16, {"sink_pages": 1, "recent_pages": 2}),
}


class _Probe(QuestTorchBackend):
    """Quest torch backend that keeps every decode query and the keys of the last decode step."""

    def __init__(self, layer, params, store: dict):
        super().__init__(layer, params)
        self.store = store

    def forward(self, q, k, v, cache, meta):
        if meta.num_decodes:
            return super().forward(q, k, v, cache, meta)
        # Quest's prefill is dense: SDPA over the paged cache is the same attention, several times faster on CPU
        # than the block-sparse reference's masked path.
        write_kv(cache["kv"], k, v, meta.slot_mapping)
        self.update_cache(cache, meta)
        return paged_attention_torch(q, cache["kv"], meta, self.layer.scale)

    def decode_selection(self, q, cache, meta):
        sel = super().decode_selection(q, cache, meta)
        n = int(meta.seq_lens[meta.num_prefills])
        k, _ = gather_kv(cache["kv"], meta.block_tables[meta.num_prefills], n)
        rec = self.store.setdefault(self.layer.layer_idx, {"q": [], "k": None})
        rec["q"].append(q[0].double().clone())
        rec["k"] = k.double().clone()
        return sel


@contextlib.contextmanager
def probed(llm, params, store):
    """Every Quest layer's backend swapped for a probe with `params` for the duration of the block."""
    runner = llm.engine.runner
    saved = list(runner.backends)
    try:
        for i, layer in enumerate(runner.layers):
            if isinstance(saved[i], QuestTorchBackend):
                runner.backends[i] = layer.backend = _Probe(layer.spec, params, store)
        yield
    finally:
        for i, layer in enumerate(runner.layers):
            runner.backends[i] = layer.backend = saved[i]


def needle_positions(tokenizer, text: str, ids: list[int], value: str) -> tuple[list[int], list[int]]:
    """(tokens of the queried needle's value, tokens of its whole sentence) in the prompt."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise ValueError("re-tokenising the prompt text does not give the sample's ids; cannot locate the needle")
    v0 = text.index(f"is: {value}.") + len("is: ")
    s0 = text.rindex("One of the special magic numbers", 0, v0)
    span = lambda c0, c1: [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < c1 and b > c0]
    return span(v0, v0 + len(value)), span(s0, v0 + len(value) + 1)


def forced_select(scores: torch.Tensor, n_pages: int, budget: int, sink: int, recent: int) -> torch.Tensor:
    """bool [H, P]: the reference rule: first `sink` and last max(recent, 1) pages forced, the rest of the budget
    to the highest scores; everything when n_pages <= budget."""
    h, p = scores.shape
    if n_pages <= budget:
        return torch.ones(h, p, dtype=torch.bool)
    idx = torch.arange(p)
    forced = (idx < sink) | (idx >= n_pages - max(recent, 1))
    s = torch.where(forced[None], torch.full_like(scores, float("inf")), scores)
    top = torch.topk(s, budget, dim=-1).indices
    return torch.zeros(h, p, dtype=torch.bool).scatter_(-1, top, True)


def step_stats(q, k, scale, ps, budget_tokens, sink, recent, needle_val, needle_sent, prompt_len, spread=1.0):
    """Per query head at one (layer, step): exact mass kept by the rule and by the oracle (top pages by true mass),
    the mass on / kept of the sink page, the needle's value pages, the recent 64 tokens; Quest-bound rank of the
    needle's value page and of page 0."""
    h, d = q.shape
    s_len, hkv = k.shape[0], k.shape[1]
    g = h // hkv
    logits = torch.einsum("hd,shd->hs", q, k.repeat_interleave(g, 1)) * scale
    p = torch.softmax(logits, -1)
    n_pages = -(-s_len // ps)
    pm = torch.nn.functional.pad(p, (0, n_pages * ps - s_len)).view(h, n_pages, ps).sum(-1)  # [H, P]
    kmin, kmax = page_minmax(k[None], ps)
    bound = page_scores(q[None], kmin, kmax)[0]  # [H, P]
    bp = budget_tokens // ps
    keep = forced_select(bound if spread == 1.0 else page_scores(q[None], kmin, kmax, spread)[0], n_pages, bp, sink,
                         recent)
    oracle = forced_select(pm, n_pages, bp, 0, 1)
    val_pages = sorted({t // ps for t in needle_val})
    sent_pages = sorted({t // ps for t in needle_sent})
    recent_pages = sorted(set(range((s_len - 64) // ps, n_pages)))
    rank = (bound[:, :, None] < bound[:, None, :]).sum(-1)  # [H, P] 0 = highest bound
    # Offline alternatives on the same queries: q·centre + alpha Σ|q_d| half-range_d (alpha 1 = Quest's bound;
    # smaller alpha discounts the in-page spread of the slack channels), with the run's forced pages.
    alt = {}
    for alpha in ALPHAS:
        c, r = (kmin + kmax) / 2, (kmax - kmin) / 2
        keep_a = forced_select(page_scores(q[None], c - alpha * r, c + alpha * r)[0], n_pages, bp, sink, recent)
        alt[f"kept_a{alpha}"] = (pm * keep_a).sum(-1)
        alt[f"val_kept_a{alpha}"] = (pm[:, val_pages] * keep_a[:, val_pages]).sum(-1)
        alt[f"sent_kept_a{alpha}"] = (pm[:, sent_pages] * keep_a[:, sent_pages]).sum(-1)
    out = {
        "kept": (pm * keep).sum(-1), "oracle": (pm * oracle).sum(-1),
        "sink": pm[:, 0], "sink_kept": pm[:, 0] * keep[:, 0],
        "val": pm[:, val_pages].sum(-1), "val_kept": (pm[:, val_pages] * keep[:, val_pages]).sum(-1),
        "sent": pm[:, sent_pages].sum(-1), "sent_kept": (pm[:, sent_pages] * keep[:, sent_pages]).sum(-1),
        "recent": pm[:, recent_pages].sum(-1), "recent_kept": (pm[:, recent_pages] * keep[:, recent_pages]).sum(-1),
        "rank_sink": rank[:, 0].double(), "rank_val": rank[:, val_pages].amin(-1).double(), **alt,
    }
    return {k2: v.tolist() for k2, v in out.items()}


def analyse(store, scale, ps, budget, sink, recent, needle_val, needle_sent, prompt_len, spread=1.0) -> list[dict]:
    """Stats for every (layer, step, query head) of one probed run."""
    rows = []
    for layer in sorted(store):
        rec = store[layer]
        k = rec["k"]
        for t, q in enumerate(rec["q"]):
            s_len = prompt_len + 1 + t  # decode step t attends the prompt and t + 1 generated tokens
            st = step_stats(q, k[:s_len], scale, ps, budget, sink, recent, needle_val, needle_sent, prompt_len, spread)
            for hh in range(q.shape[0]):
                rows.append({"layer": layer, "step": t, "head": hh, **{k2: v[hh] for k2, v in st.items()}})
    return rows


def summarise(rows: list[dict]) -> str:
    if not rows:
        return "no sparse decode steps"
    kept = torch.tensor([r["kept"] for r in rows])
    oracle = torch.tensor([r["oracle"] for r in rows])
    bad = [r for r in rows if r["kept"] < 0.5 and r["oracle"] > 0.9]
    lost = {}
    for r in rows:
        for part in ("sink", "val", "recent"):
            lost[part] = lost.get(part, 0.0) + r[part] - r[f"{part}_kept"]
    total_lost = float((1 - kept).sum())
    where = {}
    for r in bad:
        where.setdefault((r["layer"], r["head"]), []).append(r["step"])
    s = (f"mass kept mean {kept.mean():.4f} (oracle {oracle.mean():.4f}), cases kept<0.5 with oracle>0.9: {len(bad)}/"
         f"{len(rows)}; of all lost mass: sink {lost['sink'] / total_lost:.1%}, needle value pages "
         f"{lost['val'] / total_lost:.1%}, recent 64 tokens {lost['recent'] / total_lost:.1%}")
    for alpha in ALPHAS:
        ka = torch.tensor([r[f"kept_a{alpha}"] for r in rows])
        n_bad = sum(r[f"kept_a{alpha}"] < 0.5 and r["oracle"] > 0.9 for r in rows)
        lost_sent = sum(r["sent"] - r[f"sent_kept_a{alpha}"] for r in rows)
        s += (f"\n    offline alpha={alpha}: mass kept mean {ka.mean():.4f}, cases kept<0.5: {n_bad}, needle-sentence "
              f"mass lost {lost_sent:.3f} (this rule: {sum(r['sent'] - r['sent_kept'] for r in rows):.3f})")
    if bad:
        s += "\n    bad (layer, head): steps " + "; ".join(f"L{a}h{b}: {v}" for (a, b), v in sorted(where.items()))
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="ruler_niah")
    ap.add_argument("--length", type=int, default=8150)
    ap.add_argument("--index", type=int, nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", default=["dense", "p8"])
    ap.add_argument("--probe", nargs="*", default=None, help="variants to analyse (default: all but dense)")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from sparse_llm import LLM, SamplingParams
    from sparse_llm.eval.runner import make_samples
    from sparse_llm.eval.tasks import get_task

    task = get_task(args.task, args.length)
    n = min(args.length + 64, 8192)  # SmolLM2: max_position_embeddings 8192
    probe = set(args.probe if args.probe is not None else [v for v in args.variants if v != "dense"])
    by_ps: dict[int, list[str]] = {}
    for v in args.variants:
        by_ps.setdefault(VARIANTS[v][0], []).append(v)
    report = []
    samples = None
    for ps, names in by_ps.items():
        llm = LLM(device="cpu", dtype=args.dtype, enforce_eager=True, max_model_len=n, max_num_batched_tokens=n,
                  attention_backend="torch", sparse_attention_config={"algorithm": "quest", "page_size": ps},
                  kv_cache_config={"max_tokens": 2 * n + 256, "enable_prefix_caching": True})
        if samples is None:
            samples = make_samples(task, llm.tokenizer, max(args.index) + 1, 0, progress=False)
        scale = next(b.layer.scale for b in llm.engine.runner.backends if isinstance(b, QuestTorchBackend))
        base = next(b.params for b in llm.engine.runner.backends if isinstance(b, QuestTorchBackend))
        for idx in args.index:
            s = samples[idx]
            L = len(s.prompt_token_ids)
            val, sent = needle_positions(llm.tokenizer, s.prompt, s.prompt_token_ids, s.answers[0])
            for name in names:
                params = dataclasses.replace(base, **VARIANTS[name][1])
                store: dict = {}
                t0 = time.perf_counter()
                with probed(llm, params, store):
                    out = llm.generate([s.prompt_token_ids], SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                                                            logprobs=2), use_tqdm=False)[0]
                ok = task.score(out.text, s.answers)
                # Greedy margin (top-1 minus top-2 log-probability) of the first answer tokens: how close a miss was.
                margins = [round(a - b, 2) for a, b in (sorted(d.values(), reverse=True)[:2] for d in (out.outputs[0].logprobs or [])[:4])]
                line = (f"{args.task} #{idx} L={L} needle value tokens {val[0]}-{val[-1]} {name}: {out.text!r} "
                        f"score {ok} margins {margins} ({time.perf_counter() - t0:.0f} s)")
                rec = {"index": idx, "variant": name, "text": out.text, "score": ok, "L": L, "margins": margins}
                if name in probe:
                    rows = analyse(store, scale, ps, params.token_budget, getattr(params, "sink_pages", 0),
                                   getattr(params, "recent_pages", 0), val, sent, L,
                                   getattr(params, "spread_weight", 1.0))
                    line += "\n    " + summarise(rows)
                    rec["rows"] = rows
                print(line, flush=True)
                report.append(rec)
        llm.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()

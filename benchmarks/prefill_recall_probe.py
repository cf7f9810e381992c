"""How much of the true attention each prefill estimator keeps, over every query row (not only the last ones).

One dense prefill of one eval sample (the eval's own sample generator: index i is the GPU run's sample i) with every
layer's backend swapped for a recorder that, on chosen layers, builds each config's block mask exactly as the library
estimators do (`xattention_block_mask`, `flexprefill_block_mask`, plus `with_local_window`) from the dense q / k, and
measures per query row the dense softmax mass on the kept keys ("recall"). It isolates the estimators: in a real
sparse run the later layers' q / k already carry the earlier layers' errors.

Reported per config and layer: density (kept fraction of causal blocks, over heads), mean recall over rows and heads,
and the 1st / 10th percentile of the per-(row, head) recall (the rows an estimator starves).

  OMP_NUM_THREADS=2 python benchmarks/prefill_recall_probe.py --task ruler_niah --length 8150 --index 18 \
      --layers 2 8 14 20 26 --configs xattention flexprefill xattention:threshold=0.99
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_capture import swapped_backends  # noqa: E402
from sparse_llm.backends.base import AttentionBackend, write_kv  # noqa: E402
from sparse_llm.backends.torch_dense import gather_kv, paged_attention_torch  # noqa: E402
from sparse_llm.configs.sparse import parse_sparse_config  # noqa: E402
from sparse_llm.sparse.block_selection import with_local_window, with_vertical_blocks  # noqa: E402
from sparse_llm.sparse.flexprefill import flexprefill_block_mask  # noqa: E402
from sparse_llm.sparse.xattention import last_block_vertical_blocks, xattention_block_mask  # noqa: E402

ROW_CHUNK = 128  # query rows per dense-softmax chunk


def parse(spec: str):
    """'xattention:threshold=0.99,local_window=128' -> (the library's user config with defaults filled in, whether
    the experimental per-row-group selection is asked: 'xattention_rows:...')."""
    name, _, rest = spec.partition(":")
    row_groups = name == "xattention_rows"
    kw = {"algorithm": "xattention" if row_groups else name}
    for item in filter(None, rest.split(",")):
        key, val = item.split("=")
        kw[key] = val if val.isalpha() else float(val) if "." in val else int(val)
    return parse_sparse_config(kw), row_groups


def row_group_mask(q, k, scale, threshold, stride, block_size):
    """Experimental XAttention variant (not the paper's, not in the library): every strided query group picks its
    own key blocks (descending estimated mass until `threshold` of the group's own mass; sink and diagonal forced)
    and a query block keeps the union, so a few rows with their own pattern are not outvoted by their block."""
    from sparse_llm.sparse.xattention import reshape_antidiagonal, select_blocks_by_mass, threshold_tensor

    qr, kr, qb0, row_real = reshape_antidiagonal(q, k, block_size, stride)
    b, h = q.shape[:2]
    g = h // k.shape[1]
    gpb = block_size // stride
    krr = kr.repeat_interleave(g, 1)
    nkg = kr.shape[2]
    col = torch.arange(nkg)
    row_abs = qb0 * gpb + torch.arange(qr.shape[2])
    sc = torch.matmul(qr.float(), krr.float().transpose(-1, -2)) * (scale / stride)
    sc = sc.masked_fill((col[None, :] > row_abs[:, None]) | (col[None, :] * stride >= k.shape[2]), float("-inf"))
    p = torch.softmax(sc, -1) * row_real[:, None]
    nb = nkg // gpb
    per_group = p.view(b, h, qr.shape[2], nb, gpb).sum(-1)  # [B, H, groups, nkb]
    nqb = qr.shape[2] // gpb
    # each group as its own "query block" (its row index mapped to its block) -> the library's selection rule
    grp = per_group.view(b, h * nqb * gpb, 1, nb)
    qb_of = (qb0 + torch.arange(nqb)).repeat_interleave(gpb).repeat(h)
    masks = []
    for i in range(grp.shape[1]):  # vectorised enough: one small sort per group
        masks.append(select_blocks_by_mass(grp[:, i:i + 1], int(qb_of[i]), threshold_tensor(threshold, 1, q.device)))
    m = torch.cat(masks, 1).view(b, h, nqb, gpb, nb).any(3)
    return m, qb0


def block_mask(cfg, row_groups, q, k, scale):
    """[H, nqb, nkb] bool: the library estimator's blocks for a whole-prompt prefill (q, k [1, H(kv), S, D])."""
    if row_groups:
        m, qb0 = row_group_mask(q, k, scale, cfg.threshold, cfg.stride, cfg.block_size)
    elif cfg.algorithm == "xattention":
        m, qb0 = xattention_block_mask(q, k, scale, cfg.threshold, cfg.stride, cfg.block_size, use_triton=False)
        if cfg.vertical_gamma > 0:
            m = with_vertical_blocks(m, qb0, last_block_vertical_blocks(q, k, scale, cfg.vertical_gamma, cfg.block_size))
    else:
        m, qb0, _ = flexprefill_block_mask(q, k, scale, cfg.gamma, cfg.tau, cfg.min_budget, cfg.max_budget,
                                           cfg.block_size)
    return with_local_window(m, qb0, cfg.local_window, cfg.block_size)[0]


class Recorder(AttentionBackend):
    name = "torch"
    algorithms = frozenset({"recall_probe"})
    devices = frozenset({"cpu", "cuda"})

    def __init__(self, layer, configs: dict, layers: set[int], out: dict, worst: int = 0, targets: int = 0):
        super().__init__(layer, None)
        self.configs, self.layers, self.out, self.worst, self.targets = configs, layers, out, worst, targets

    def forward(self, q, k, v, cache, meta):
        kv = cache["kv"]
        write_kv(kv, k, v, meta.slot_mapping)
        if self.layer.layer_idx in self.layers and meta.num_prefills:
            kk, _ = gather_kv(kv, meta.block_tables[0], meta.seq_lens_cpu[0])
            self.out[self.layer.layer_idx] = self.measure(q[: meta.query_lens_cpu[0]].float(), kk.float())
        return paged_attention_torch(q, kv, meta, self.layer.scale)

    def measure(self, q, k) -> dict:
        s, h = q.shape[0], q.shape[1]
        qh, kh = q.transpose(0, 1)[None], k.transpose(0, 1)[None]
        masks = {name: block_mask(cfg, rows, qh, kh, self.layer.scale) for name, (cfg, rows) in self.configs.items()}
        g = h // k.shape[1]
        kr = kh[0].repeat_interleave(g, 0)  # [H, S, D]
        recalls = {name: [] for name in masks}
        pos = torch.arange(s)
        for r0 in range(0, s, ROW_CHUNK):
            r1 = min(s, r0 + ROW_CHUNK)
            sc = torch.einsum("hqd,hkd->hqk", qh[0, :, r0:r1], kr[:, :r1]) * self.layer.scale
            sc = sc.masked_fill(pos[None, None, :r1] > pos[r0:r1][None, :, None], float("-inf"))
            p = torch.softmax(sc, -1)
            for name, m in masks.items():
                bs = self.configs[name][0].block_size
                keep = m[:, pos[r0:r1] // bs].repeat_interleave(bs, -1)[..., :r1]  # [H, rows, r1]
                recalls[name].append((p * keep).sum(-1))  # [H, rows]
        res = {}
        nqb = masks[next(iter(masks))].shape[1] if masks else 0
        for name, m in masks.items():
            r = torch.cat(recalls[name], 1).flatten()
            causal = torch.arange(m.shape[2])[None, :] <= torch.arange(m.shape[1])[:, None]
            res[name] = {"density": float(m.float().sum() / (causal.sum() * m.shape[0])), "recall_mean": float(r.mean()),
                         "recall_p01": float(r.quantile(0.01)), "recall_p10": float(r.quantile(0.10)),
                         "query_blocks": nqb}
            if self.worst:  # the (head, row) pairs that keep least, with where the row's dropped mass sits
                by_row = torch.cat(recalls[name], 1)  # [H, S]
                vals, idx = by_row.flatten().topk(self.worst, largest=False)
                res[name]["worst"] = [{"head": int(i) // s, "row": int(i) % s, "recall": round(float(v), 3),
                                       "row_in_block": int(i) % s % self.configs[name][0].block_size}
                                      for v, i in zip(vals, idx)]
                for w in res[name]["worst"] if self.targets else []:  # where the starved row's mass goes
                    hh, row = w["head"], w["row"]
                    sc = (qh[0, hh, row] @ kr[hh, : row + 1].T) * self.layer.scale
                    p = torch.softmax(sc, -1)
                    pv, pi = p.topk(min(self.targets, row + 1))
                    w["targets"] = [(int(j), round(float(x), 3)) for x, j in zip(pv, pi)]
        return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="ruler_niah")
    ap.add_argument("--length", type=int, default=8150)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 14, 20, 26])
    ap.add_argument("--configs", nargs="+", default=["xattention", "flexprefill"])
    ap.add_argument("--worst", type=int, default=0, help="also list the N (head, row) pairs with the least recall")
    ap.add_argument("--targets", type=int, default=0, help="with --worst: each listed row's K keys of most mass")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from sparse_llm import LLM, SamplingParams
    from sparse_llm.eval.runner import make_samples
    from sparse_llm.eval.tasks import get_task

    n = args.length + 64
    llm = LLM(device="cpu", dtype="float32", max_model_len=min(8192, n), max_num_batched_tokens=8192,
              enforce_eager=True, kv_cache_config={"max_tokens": n + 64, "enable_prefix_caching": False})
    task = get_task(args.task, args.length)
    sample = make_samples(task, llm.tokenizer, args.index + 1, args.seed, progress=False)[args.index]
    configs = {spec: parse(spec) for spec in args.configs}
    out: dict = {}
    with swapped_backends(llm, lambda spec: Recorder(spec, configs, set(args.layers), out, args.worst, args.targets)):
        llm.generate([sample.prompt_token_ids], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    llm.close()
    print(f"{args.task} {args.length} sample {args.index} (seed {args.seed}): {len(sample.prompt_token_ids)} tokens")
    print(f"{'config':<36} {'layer':>5} {'density':>8} {'recall':>8} {'p01':>6} {'p10':>6}")
    for spec in args.configs:
        for li in sorted(out):
            r = out[li][spec]
            print(f"{spec:<36} {li:>5} {r['density']:8.3f} {r['recall_mean']:8.4f} {r['recall_p01']:6.3f} "
                  f"{r['recall_p10']:6.3f}")
            for w in r.get("worst", []):
                print(f"    head {w['head']} row {w['row']} (row {w['row_in_block']} of its block): recall {w['recall']}"
                      + (f"  top keys {w['targets']}" if "targets" in w else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "layers": out}, f, indent=1)


if __name__ == "__main__":
    main()

"""`eval sweep`: several configs x several tasks -> an accuracy-vs-sparsity table and a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from sparse_llm.eval.runner import evaluate, make_samples
from sparse_llm.eval.tasks import get_task


def run_sweep(
    make_llm: Callable[[str | None], Any],
    configs: list[str | None],
    tasks: list[str],
    max_input_length: int,
    num_samples: int,
    seed: int,
    output_dir: str | Path,
    progress: bool = True,
    max_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """One LLM per config (closed before the next one loads); every task on each. Returns the rows."""
    if not configs or not tasks:
        raise ValueError("eval sweep needs at least one config (--configs) and one task (--tasks)")
    out = Path(output_dir)
    rows = []
    built: dict[tuple, list] = {}  # (task, model, tokenizer) -> samples: configs of one model share the inputs
    for cfg in configs:
        name = config_name(cfg)
        llm = make_llm(cfg)
        try:
            for task in tasks:
                key = (task, llm.args.model, llm.args.tokenizer)
                if key not in built:
                    built[key] = make_samples(get_task(task, max_input_length), llm.tokenizer, num_samples, seed, progress)
                s = evaluate(llm, task, max_input_length, num_samples, seed, out / name / task, max_tokens, progress,
                             samples=built[key])
                rows.append({"config": name, "config_path": cfg, "task": task, "metric": s["metric"],
                             "accuracy": s["accuracy"], "sparsity": s["sparsity"],
                             "generate_seconds": s["generate_seconds"]})
        finally:
            llm.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    plot(rows, out / "sweep.png", f"accuracy vs achieved sparsity ({max_input_length} tokens, {num_samples} samples)")
    return rows


def config_name(cfg: str | None) -> str:
    return "defaults" if cfg is None else Path(cfg).stem


def overall_sparsity(sparsity: dict[str, float | None]) -> float:
    """The x axis: prefill sparsity when the prefill ran sparse, else decode, else 0 (dense)."""
    for phase in ("prefill", "decode"):
        if sparsity.get(phase) is not None:
            return sparsity[phase]
    return 0.0


def table(rows: list[dict[str, Any]]) -> str:
    header = ["config", "task", "accuracy", "sparsity prefill", "sparsity decode", "seconds"]
    body = [
        [r["config"], r["task"], f"{r['accuracy']:.3f}", _pct(r["sparsity"]["prefill"]), _pct(r["sparsity"]["decode"]),
         f"{r['generate_seconds']:.1f}"]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "dense" if v is None else f"{v:.1%}"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task in dict.fromkeys(r["task"] for r in rows):
        pts = sorted((overall_sparsity(r["sparsity"]), r["accuracy"], r["config"]) for r in rows if r["task"] == task)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=task)
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("achieved sparsity (prefill; decode if prefill is dense)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""A PNG of the fitted threshold curves next to the measured (sparsity, factor) points."""
from __future__ import annotations

import math
from pathlib import Path

from sparse_llm.calibration.fit import PhaseFit


def plot_fits(fits: dict[str, PhaseFit], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 4), squeeze=False)
    for ax, (phase, fit) in zip(axes[0], fits.items()):
        for length in sorted({p[0] for p in fit.points}):
            pts = [(s, f) for lb, s, f in fit.points if lb == length]
            label = "mean over lengths (fitted)" if length == 0 else f"length {length}"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12 if length == 0 else 3, label=label,
                       marker="x" if length == 0 else "o")
        xs = [fit.s_min + i * (fit.s_max - fit.s_min) / 100 for i in range(101)]
        ax.plot(xs, [fit.a * math.exp(fit.b * x) for x in xs], "k-", label=f"{fit.a:.3g}·exp({fit.b:.3g}·s), R²={fit.r2:.3f}")
        ax.set_yscale("log")
        ax.set_xlabel("tile sparsity")
        ax.set_ylabel("threshold_scale_factor")
        ax.set_title(f"{phase}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

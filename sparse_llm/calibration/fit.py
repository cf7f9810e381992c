"""Fit threshold_scale_factor = a · exp(b · target_sparsity) per phase from the gap histograms.

Each length bin contributes (sparsity(f), ln f) points over a log-spaced grid of factors; points with sparsity in
[s_lo, s_hi] enter a least-squares fit of ln f = ln a + b·s, weighted by the bin's tile count.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from sparse_llm.calibration.collect import GapCollector, GapHistogram

logger = logging.getLogger(__name__)

FORMULA = "a * exp(b * target_sparsity)"
DEFAULT_FACTORS = tuple(float(x) for x in np.logspace(-4, 6, 501))


@dataclass
class PhaseFit:
    phase: str
    a: float
    b: float
    r2: float
    s_min: float
    s_max: float
    points: list[tuple[int, float, float]] = field(default_factory=list)  # (length_bin, sparsity, factor)

    def factor(self, target: float) -> float:
        if not self.s_min - 1e-9 <= target <= self.s_max + 1e-9:
            logger.warning(
                "%s: target_sparsity=%.3f is outside the calibrated range [%.3f, %.3f]; the factor is extrapolated",
                self.phase, target, self.s_min, self.s_max,
            )
        return self.a * math.exp(self.b * target)


def sparsity_curve(hist: GapHistogram, factors=DEFAULT_FACTORS) -> list[tuple[float, float]]:
    out = []
    for f in factors:
        s = hist.sparsity(f)
        if s is not None:
            out.append((s, f))
    return out


def fit_phase(collector: GapCollector, phase: str, s_lo: float = 0.1, s_hi: float = 0.9, factors=DEFAULT_FACTORS,
              layer: int | None = None) -> PhaseFit:
    """Weighted least squares in log space over all length bins; errors say what to widen."""
    xs, ys, ws, pts = [], [], [], []
    bins = collector.length_bins(phase)
    if not bins:
        raise ValueError(f"no {phase} attention was recorded: run samples through the {phase} phase first")
    seen = []
    for lb in bins:
        hist = collector.merged(phase, lb, layer)
        curve = sparsity_curve(hist, factors)
        if curve:
            seen.append((lb, curve[0][0], curve[-1][0]))
        for s, f in curve:
            if s_lo <= s <= s_hi:
                xs.append(s)
                ys.append(math.log(f))
                ws.append(hist.total)
                pts.append((lb, s, f))
    distinct = len({round(x, 3) for x in xs})
    if distinct < 3:
        ranges = ", ".join(f"length {lb}: sparsity {lo:.3f}..{hi:.3f}" for lb, lo, hi in seen) or "none"
        raise ValueError(
            f"{phase}: only {distinct} distinct sparsity points fall in [{s_lo}, {s_hi}] over factors "
            f"{factors[0]:.3g}..{factors[-1]:.3g} ({ranges}); widen the factor range (lower bound if sparsity is "
            f"always high, upper bound if it is always low) or widen [s_lo, s_hi]"
        )
    x, y, w = np.asarray(xs), np.asarray(ys), np.asarray(ws)
    w = w / w.sum()
    xm, ym = (w * x).sum(), (w * y).sum()
    b = float((w * (x - xm) * (y - ym)).sum() / max((w * (x - xm) ** 2).sum(), 1e-300))
    ln_a = float(ym - b * xm)
    pred = ln_a + b * x
    ss_res = float((w * (y - pred) ** 2).sum())
    ss_tot = float((w * (y - ym) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PhaseFit(phase, math.exp(ln_a), b, r2, float(x.min()), float(x.max()), pts)


def achieved_table(collector: GapCollector, fits: dict[str, PhaseFit], targets=(0.3, 0.5, 0.7)) -> list[dict]:
    """Achieved sparsity per (phase, target, length bin) when the fitted factor is applied: the held-out check."""
    rows = []
    for phase, fit in fits.items():
        for t in targets:
            f = fit.factor(t)
            for lb in collector.length_bins(phase):
                s = collector.merged(phase, lb).sparsity(f)
                rows.append({"phase": phase, "target": t, "length": lb, "factor": f, "achieved": s})
    return rows

"""Fit threshold_scale_factor = a · exp(b · target_sparsity) per phase from the gap histograms.

What users are promised is the sparsity of *their* requests, whatever their length, so the fit targets the
mean over length bins (each bin weighted by its number of prompts, not by its tiles: prefill tiles grow as L²,
which let the longest bin decide the old fit). For every factor f on a log grid the mean curve s̄(f) is
computed (only where λ = f / kv_len < 1 for every bin: past that a bin would run dense); it is then resampled
at evenly spaced sparsities in [s_lo, s_hi] (the range targets are used in) and ln f = ln a + b·s is fitted
by least squares, unweighted, on those points.

λ = f / kv_len ≥ 1 turns the rule off, so a factor above the shortest calibrated length switches skipping off
for those prompts altogether (sparsity 0, far below any target). When the fitted line would give such a factor
at `cap_target` (default 0.7, the highest target the acceptance covers) and the mean reachable with every length
on comes within CAP_REACH of it, the line is refitted through (cap_target, ln(CAP_MARGIN · shortest kv_len)):
targets up to cap_target then keep every calibrated length on, at the best mean sparsity reachable there.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from sparse_llm.calibration.collect import GapCollector

logger = logging.getLogger(__name__)

FORMULA = "a * exp(b * target_sparsity)"
DEFAULT_FACTORS = tuple(float(x) for x in np.logspace(-4, 6, 1001))
FIT_POINTS = 41  # evenly spaced sparsities the mean curve is resampled at
CAP_MARGIN = 0.9  # the capped factor stays this far below the shortest kv_len (held-out prompts may be shorter)
CAP_REACH = 0.05  # the acceptance tolerance: pin only if the reachable mean is at least cap_target - this


@dataclass
class PhaseFit:
    phase: str
    a: float
    b: float
    r2: float
    s_min: float
    s_max: float
    points: list[tuple[int, float, float]] = field(default_factory=list)  # (length_bin, sparsity, factor); bin 0 = mean
    capped: bool = False  # the line was pinned so that f(cap_target) keeps the shortest length on

    def factor(self, target: float) -> float:
        if not self.s_min - 1e-9 <= target <= self.s_max + 1e-9:
            logger.warning(
                "%s: target_sparsity=%.3f is outside the calibrated range [%.3f, %.3f]; the factor is extrapolated",
                self.phase, target, self.s_min, self.s_max,
            )
        return self.a * math.exp(self.b * target)


def bin_curves(collector: GapCollector, phase: str, factors, layer: int | None = None) -> dict[int, np.ndarray]:
    """Sparsity per length bin at every factor (NaN where λ >= 1 for some sequence of the bin)."""
    return {lb: collector.merged(phase, lb, layer).sparsity_many(factors) for lb in collector.length_bins(phase)}


def mean_curve(collector: GapCollector, phase: str, factors, layer: int | None = None,
               curves: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Prompt-weighted mean over length bins of the per-bin sparsity at every factor; NaN if any bin is off."""
    curves = bin_curves(collector, phase, factors, layer) if curves is None else curves
    if not curves:
        return np.full(len(factors), np.nan)
    w = np.array([collector.samples.get((phase, lb), 1) for lb in curves], dtype=np.float64)
    return (w[:, None] * np.stack(list(curves.values()))).sum(0) / w.sum()


def fit_phase(collector: GapCollector, phase: str, s_lo: float = 0.2, s_hi: float = 0.8, factors=DEFAULT_FACTORS,
              layer: int | None = None, cap_target: float | None = 0.7) -> PhaseFit:
    """Least squares of ln f on the mean curve resampled in [s_lo, s_hi]; errors say what to widen."""
    bins = collector.length_bins(phase)
    if not bins:
        raise ValueError(f"no {phase} attention was recorded: run samples through the {phase} phase first")
    f = np.asarray(factors, dtype=np.float64)
    curves = bin_curves(collector, phase, f, layer)
    s = mean_curve(collector, phase, f, layer, curves)
    ok = ~np.isnan(s)
    s_ok, ln_f = s[ok], np.log(f[ok])
    lo, hi = max(s_lo, float(s_ok.min(initial=np.inf))), min(s_hi, float(s_ok.max(initial=-np.inf)))
    distinct = np.unique(np.round(s_ok[(s_ok >= s_lo) & (s_ok <= s_hi)], 3)).size
    if not hi - lo >= 0.05 or distinct < 3:
        ranges = ", ".join(
            f"length {lb}: sparsity {np.nanmin(c):.3f}..{np.nanmax(c):.3f}" if np.isfinite(c).any() else f"length {lb}: off"
            for lb, c in curves.items()
        )
        raise ValueError(
            f"{phase}: the mean sparsity over factors {f[0]:.3g}..{f[-1]:.3g} has {distinct} distinct values and "
            f"covers {max(hi - lo, 0):.3f} of [{s_lo}, {s_hi}] (need 3 and 0.05; {ranges}); widen the factor range (lower bound if sparsity is always high, upper "
            f"bound if it is always low), widen [s_lo, s_hi], or calibrate on longer prompts (λ = f / kv_len < 1 caps f)"
        )
    # s̄ is non-decreasing in f; average ln f over equal s̄ so interpolation sees a strictly increasing abscissa.
    uniq, inv = np.unique(s_ok, return_inverse=True)
    ln_f_u = np.bincount(inv, weights=ln_f) / np.bincount(inv)
    x = np.linspace(lo, hi, FIT_POINTS)
    y = np.interp(x, uniq, ln_f_u)
    b, ln_a = np.polyfit(x, y, 1)
    ln_cap = math.log(CAP_MARGIN * min(collector.merged(phase, lb, layer).min_kv_len for lb in bins))
    # Pin only where it can help: the mean at the cap must come within CAP_REACH of cap_target, else pinning
    # would bend the whole line for a target that stays out of reach anyway (the warning says so).
    capped = bool(cap_target is not None and hi >= cap_target - CAP_REACH and ln_a + b * cap_target > ln_cap)
    if capped:  # least squares through the fixed point (cap_target, ln_cap)
        dx = x - cap_target
        b = float((dx * (y - ln_cap)).sum() / (dx * dx).sum())
        ln_a = ln_cap - b * cap_target
        logger.info("%s: fit pinned so that target %.2f gives factor %.4g (below the shortest calibrated length)",
                    phase, cap_target, math.exp(ln_cap))
    pred = ln_a + b * x
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    pts = [(0, float(xi), float(math.exp(yi))) for xi, yi in zip(x, y)]
    for lb, c in curves.items():
        pts += [(lb, float(ci), float(fi)) for ci, fi in zip(c, f) if s_lo <= ci <= s_hi]
    return PhaseFit(phase, float(math.exp(ln_a)), float(b), r2, float(lo), float(hi), pts, capped)


def achieved_table(collector: GapCollector, fits: dict[str, PhaseFit], targets=(0.3, 0.5, 0.7)) -> list[dict]:
    """Predicted sparsity per (phase, target, length bin) at the fitted factor, and the prompt-weighted mean over bins
    (length "mean"): the held-out check on dense activations. None where the factor turns the rule off."""
    rows = []
    for phase, fit in fits.items():
        for t in targets:
            f = fit.factor(t)
            for lb in collector.length_bins(phase):
                s = collector.merged(phase, lb).sparsity(f)
                rows.append({"phase": phase, "target": t, "length": lb, "factor": f, "achieved": s})
            m = float(mean_curve(collector, phase, [f])[0])
            rows.append({"phase": phase, "target": t, "length": "mean", "factor": f,
                         "achieved": None if math.isnan(m) else m})
    return rows

"""A checkpoint's calibration metadata: `sparse_attention_config` in config.json (ModelOpt / TensorRT-LLM layout).

    "sparse_attention_config": {
      "config_groups": {"group_0": {
          "algorithm": "skip_softmax",                       # or legacy "sparse_algo"; "softmax_skip" is an alias
          "threshold_scale_factor": {"formula": "a * exp(b * target_sparsity)",
                                     "prefill": {"a": 100, "b": 5}, "decode": {"a": 0.05, "b": 10}},
          "target_sparsity": {"prefill": 0.5, "decode": 0.3},
          "ignore": ["model.layers.0.self_attn"]}},
      "ignore": [...]}

Formulas are evaluated with numexpr only (never eval); every name but `target_sparsity` must be a coefficient.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any

import numexpr

from sparse_llm.configs.sparse import ALGORITHM_ALIASES, as_phase_values
from sparse_llm.kernels.geometry import PREFILL_ORDER

PHASES = ("prefill", "decode")
FACTOR_PATH = "sparse_attention_config.config_groups.*.threshold_scale_factor"
_GROUP_KEYS = {"threshold_scale_factor", "target_sparsity", "ignore"}
_NUMEXPR_FUNCTIONS = {"exp", "log", "log10", "log1p", "expm1", "sqrt", "abs", "sin", "cos", "tanh", "where", "arctan2"}


def formula_names(formula: str) -> set[str]:
    """The variable names a formula uses (function names excluded), via a parse, never an eval."""
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"{FACTOR_PATH}.formula {formula!r} is not a valid expression: {e.msg}") from None
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    unknown_funcs = called - _NUMEXPR_FUNCTIONS
    if unknown_funcs:
        raise ValueError(
            f"{FACTOR_PATH}.formula uses unsupported function(s) {sorted(unknown_funcs)}; "
            f"allowed: {sorted(_NUMEXPR_FUNCTIONS)}"
        )
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - called


@dataclass(frozen=True)
class PhaseFormula:
    """threshold_scale_factor = formula(target_sparsity; coefficients) for one phase."""

    formula: str
    coefficients: dict[str, float]

    def evaluate(self, target_sparsity: float) -> float:
        names = formula_names(self.formula)
        if "target_sparsity" not in names:
            raise ValueError(f"{FACTOR_PATH}.formula {self.formula!r} must reference 'target_sparsity'")
        missing = sorted(names - {"target_sparsity"} - set(self.coefficients))
        if missing:
            raise ValueError(
                f"{FACTOR_PATH}.formula {self.formula!r} needs coefficient(s) {missing}; "
                f"given: {sorted(self.coefficients)}"
            )
        local = {k: float(v) for k, v in self.coefficients.items() if k in names}
        local["target_sparsity"] = float(target_sparsity)
        value = float(numexpr.evaluate(self.formula, local_dict=local, global_dict={}))
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{FACTOR_PATH}.formula {self.formula!r} gives {value} at target_sparsity={target_sparsity}; "
                "a threshold_scale_factor must be finite and >= 0"
            )
        return value


@dataclass(frozen=True)
class CheckpointGroup:
    """One config group of a checkpoint's sparse_attention_config."""

    name: str
    algorithm: str
    formulas: dict[str, PhaseFormula] = field(default_factory=dict)  # phase -> formula
    fixed_factors: dict[str, float] = field(default_factory=dict)  # phase -> calibrated constant factor
    target_sparsity: dict[str, float] = field(default_factory=dict)  # phase -> target
    ignore: tuple[str, ...] = ()
    raw: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSparseMeta:
    groups: tuple[CheckpointGroup, ...] = ()
    ignore: tuple[str, ...] = ()

    def group(self, algorithm: str) -> CheckpointGroup | None:
        for g in self.groups:
            if g.algorithm == algorithm:
                return g
        return None

    def ignore_patterns(self, algorithm: str) -> tuple[str, ...]:
        g = self.group(algorithm)
        return self.ignore + (g.ignore if g else ())


def _as_list(value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
        return tuple(value)
    raise ValueError(f"{path} must be a list of module-name patterns, got {value!r}")


def _coefficients(value: Any, path: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"{path} must be a mapping of coefficient names to numbers, got {value!r}")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{path}.{k} must be a number, got {v!r}")
        out[str(k)] = float(v)
    return out


def _parse_factor(value: Any, path: str) -> tuple[dict[str, PhaseFormula], dict[str, float]]:
    """threshold_scale_factor: a formula with per-phase or shared coefficients, or fixed numbers."""
    if value is None:
        return {}, {}
    if isinstance(value, dict) and "formula" in value:
        formula = value["formula"]
        if not isinstance(formula, str):
            raise ValueError(f"{path}.formula must be a string, got {formula!r}")
        formula_names(formula)  # syntax check now, not at first use
        shared = {k: v for k, v in value.items() if k not in ("formula", *PHASES)}
        shared_c = _coefficients(shared, path) if shared else {}
        formulas = {}
        for phase in PHASES:
            per = value.get(phase)
            if per is None and not shared_c:
                continue
            coeffs = {**shared_c, **(_coefficients(per, f"{path}.{phase}") if per is not None else {})}
            formulas[phase] = PhaseFormula(formula, coeffs)
        if not formulas:
            raise ValueError(f"{path} has a formula but no coefficients (per phase under 'prefill'/'decode', or shared)")
        return formulas, {}
    try:
        pv = as_phase_values(value)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return {}, {p: pv.get(p) for p in PHASES if pv.get(p) is not None}


def _parse_group(name: str, g: Any, path: str) -> CheckpointGroup:
    if not isinstance(g, dict):
        raise ValueError(f"{path} must be a mapping, got {type(g).__name__}")
    algo = g.get("algorithm", g.get("sparse_algo", "skip_softmax"))
    if not isinstance(algo, str):
        raise ValueError(f"{path}.algorithm must be a string, got {algo!r}")
    algo = ALGORITHM_ALIASES.get(algo, algo)
    formulas, fixed = _parse_factor(g.get("threshold_scale_factor"), f"{path}.threshold_scale_factor")
    try:
        tgt = as_phase_values(g.get("target_sparsity"))
    except ValueError as e:
        raise ValueError(f"{path}.target_sparsity: {e}") from None
    targets = {p: tgt.get(p) for p in PHASES if tgt is not None and tgt.get(p) is not None}
    for p, t in targets.items():
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{path}.target_sparsity.{p} must be in [0, 1], got {t}")
    return CheckpointGroup(name, algo, formulas, fixed, targets, _as_list(g.get("ignore"), f"{path}.ignore"), dict(g))


def parse_checkpoint_meta(config: dict | None) -> CheckpointSparseMeta | None:
    """Accepts a whole config.json dict or its `sparse_attention_config` block; None if there is none."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"sparse_attention_config must be a mapping, got {type(config).__name__}")
    block = config.get("sparse_attention_config", config if ("config_groups" in config or _GROUP_KEYS & set(config)) else None)
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ValueError(f"sparse_attention_config must be a mapping, got {type(block).__name__}")
    path = "sparse_attention_config"
    check_prefill_order(block)
    if "config_groups" in block:
        cg = block["config_groups"]
        if not isinstance(cg, dict):
            raise ValueError(f"{path}.config_groups must be a mapping of group name to group, got {cg!r}")
        groups = tuple(_parse_group(n, g, f"{path}.config_groups.{n}") for n, g in cg.items())
    elif _GROUP_KEYS & set(block):
        groups = (_parse_group("group_0", block, path),)  # a top-level dict that looks like one group
    else:
        groups = ()
    skip = [g.name for g in groups if g.algorithm == "skip_softmax"]
    if len(skip) > 1:
        raise ValueError(f"{path}.config_groups has {len(skip)} skip_softmax groups ({skip}); at most one is supported")
    top_ignore = _as_list(block.get("ignore"), f"{path}.ignore") if "config_groups" in block else ()
    return CheckpointSparseMeta(groups, top_ignore)


def check_prefill_order(block: dict) -> None:
    """Refuse factors calibrated for another prefill tile order than this build's skip kernel uses.

    Only our own exports carry `sparse_llm_tile_geometry`; a plain ModelOpt / TensorRT-LLM block has none and is
    accepted. Ours without `prefill_order` predate the field and keep loading (their prefill coefficients were
    fitted to the ascending order, so they are stale: recalibrate; see docs/calibration.md).
    """
    geometry = block.get("sparse_llm_tile_geometry")
    if geometry is None:
        return
    path = "sparse_attention_config.sparse_llm_tile_geometry"
    if not isinstance(geometry, dict):
        raise ValueError(f"{path} must be a mapping, got {geometry!r}")
    recorded = geometry.get("prefill_order")
    if recorded is not None and recorded != PREFILL_ORDER:
        raise ValueError(
            f"{path}.prefill_order={recorded!r} differs from this build's {PREFILL_ORDER!r}: the prefill "
            "threshold_scale_factor was calibrated for other skip decisions; recalibrate (sparse-llm calibrate)"
        )


def layer_module_names(layer_idx: int) -> tuple[str, ...]:
    """The names a layer's attention module goes by in the checkpoints we read (ignore patterns match any)."""
    return (f"model.layers.{layer_idx}.self_attn", f"model.layers.{layer_idx}.attention", f"layers.{layer_idx}.self_attn")


def is_ignored(layer_idx: int, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch(name, pat) for name in layer_module_names(layer_idx) for pat in patterns)

"""The conditions a comparison sets side by side, and the trials it matches (docs/method.md).

A condition is a kind plus what sets it apart from its default run (``none[heads]``); trials equal in
every setting but the condition and the kind-only ones form a matched group.
"""
from __future__ import annotations

import json
import math
from itertools import combinations
from typing import Any

import numpy as np

from comod.config import GROUPS
from comod_platform.results import TrialRecord

KIND_ONLY = ("modulation.noise_scale", "modulation.gain_form")
KIND_ONLY_PREFIXES = ("modulation.readout.",)
"""Settings that matter for one kind only; left out when matching trials."""
VARIANTS = ("finetune.trainable", "modulation.readout.shuffle", "finetune.readout_reset")
"""Settings that make a condition of a kind (:func:`condition`); left out when matching trials."""
READOUT_KINDS = ("stochastic",)
"""Kinds with a readout gain, the only ones the readout's shuffle and reset change."""
HEADLINE = ("stochastic", "deterministic")
SHUFFLED = "stochastic[shuffled]"
UNIT_SECTIONS = ("seed", "precision", "data", "model", "pretrain")
"""Sections whose settings make a group's pretrained network: groups equal in them are one unit."""
MAX_LEVELS = 6
"""A numeric setting with more distinct values, or floats sampled from a range, goes into BINS quantile bins."""
BINS = 4


def canonical(value: Any) -> str:
    """``value`` as JSON text with sorted keys: equal settings, equal text."""
    return json.dumps(value, sort_keys=True, default=str)


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def kind_of(cond: str) -> str:
    return cond.split("[", 1)[0]


def condition(trial: TrialRecord) -> str:
    """The trial's kind, plus in brackets: the groups fine-tuning trains when not only the controller, ``shuffled``
    for a readout gain with its units permuted (the control), ``readout carried`` for one not restarted."""
    kind = trial.kind or trial.flat.get("modulation.kind") or "unknown"
    parts = []
    trainable = trial.flat.get("finetune.trainable")
    if trainable is not None:
        groups = [trainable] if isinstance(trainable, str) else list(trainable)
        if sorted(groups) != ["controller"]:
            parts.append("+".join(sorted(groups, key=lambda g: (GROUPS.index(g) if g in GROUPS else len(GROUPS), g)))
                         or "nothing")
    if kind in READOUT_KINDS and _truthy(trial.flat.get("modulation.readout.shuffle")):
        parts.append("shuffled")
    if kind in READOUT_KINDS and not _truthy(trial.flat.get("finetune.readout_reset", True)):
        parts.append("readout carried")
    return f"{kind}[{','.join(parts)}]" if parts else kind


def condition_order(cond: str) -> tuple:
    """stochastic, deterministic, none, other kinds; a kind's plain condition before its variants."""
    kind = kind_of(cond)
    return ({"stochastic": 0, "deterministic": 1, "none": 2}.get(kind, 3), kind, cond != kind, cond)


def comparisons(present) -> list[tuple[str, str]]:
    """The pairs a report compares (first minus second): the headline (stochastic - deterministic, else the
    variant pair where both kinds ran only with the same variant), stochastic - stochastic[shuffled] (the
    control) where present, the headline's conditions minus each none condition, then every other pair of
    the ``present`` conditions, in :func:`condition_order`."""
    present = sorted(set(present), key=condition_order)
    variants = [(c, "deterministic" + c[len("stochastic"):]) for c in present if kind_of(c) == "stochastic"]
    headline = HEADLINE if set(HEADLINE) & set(present) else next((p for p in variants if p[1] in present), HEADLINE)
    out = [headline] + ([("stochastic", SHUFFLED)] if SHUFFLED in present else [])
    out += [(a, n) for a in headline for n in present if kind_of(n) == "none"]
    seen = {frozenset(p) for p in out}
    return out + [p for p in combinations(present, 2) if frozenset(p) not in seen]


def unmatched(path: str) -> bool:
    """The settings a matched group's trials may differ in."""
    return path == "modulation.kind" or path in KIND_ONLY or path.startswith(KIND_ONLY_PREFIXES) or path in VARIANTS


def match_key(trial: TrialRecord) -> str:
    """Every setting but the :func:`unmatched` ones, as canonical text."""
    return canonical({p: v for p, v in trial.flat.items() if not unmatched(p)})


def matched_groups(trials: list[TrialRecord]) -> list[dict[str, list[TrialRecord]]]:
    """The matched groups, each ``{condition: [trials]}``."""
    groups: dict[str, dict[str, list[TrialRecord]]] = {}
    for t in trials:
        groups.setdefault(match_key(t), {}).setdefault(condition(t), []).append(t)
    return list(groups.values())


def group_unit(group: dict) -> str:
    """The group's unit: its settings in :data:`UNIT_SECTIONS` (its seed with what makes its pretraining)."""
    return canonical({p: v for p, v in next(iter(group.values()))[0].flat.items() if p.split(".")[0] in UNIT_SECTIONS})


def mean_of(trials: list[TrialRecord], key: str) -> float | None:
    values = [t.final[key] for t in trials if key in t.final and not math.isnan(t.final[key])]
    return float(np.mean(values)) if values else None


def varied_settings(trials: list[TrialRecord]) -> list[str]:
    """Settings whose value differs among ``trials``, the seed and the :func:`unmatched` ones aside."""
    return [p for p in dict.fromkeys(p for t in trials for p in t.flat) if p != "seed" and not unmatched(p)
            and len({canonical(t.flat.get(p)) for t in trials}) > 1]


def show(value: Any) -> str:
    """A setting's value as text: floats to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else value if isinstance(value, str) else json.dumps(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def binned(values: list, ranged: bool = False) -> bool:
    """All numbers, and more than :data:`MAX_LEVELS` distinct or sampled (``ranged``, or floats past 6 digits)."""
    if not values or not all(_is_number(v) for v in values):
        return False
    sampled = any(isinstance(v, float) and math.isfinite(v) and float(f"{v:.6g}") != v for v in values)
    return len(set(values)) > MAX_LEVELS or ranged or sampled


def levels(values: list, in_bins: bool = False) -> list[tuple[tuple, str]]:
    """(sort key, label) per value: the value, or with ``in_bins`` its quantile bin over the distinct
    values, labelled ``[min, max]`` of the values in it."""
    if not in_bins:
        return [((0, float(v), "") if _is_number(v) else (1, 0.0, show(v)), show(v)) for v in values]
    x = np.asarray(values, dtype=float)
    edges = np.quantile(np.unique(x), np.linspace(0, 1, BINS + 1))[1:-1]
    bins = np.searchsorted(edges, x, side="right")
    labels = {b: f"[{x[bins == b].min():.3g}, {x[bins == b].max():.3g}]" for b in set(bins.tolist())}
    return [((0, float(b), ""), labels[b]) for b in bins.tolist()]

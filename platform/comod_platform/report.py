"""``compare.md``: :func:`markdown` of a :func:`compare.build_report` report, a section per question."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from comod_platform.stats import ROUGH_N

STAT_COLUMNS = ("n | mean difference | t 95% CI | bootstrap 95% CI | sign-flip p | Holm p | first better | "
                "seeds for ±0.005")


def fmt(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _p(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}" if v >= 1e-3 else f"{v:.1e}"


def _ci(p: dict | None, digits: int = 4, key: str = "ci95") -> str:
    return f"[{p[key][0]:.{digits}f}, {p[key][1]:.{digits}f}]" if p and p.get(key) else "n/a"


def _bullets(notes: list[str]) -> list[str]:
    return [f"- {n}" for n in notes]


def grid(header: str, rows) -> list[str]:
    """A Markdown table: the ``header`` cells (joined by " | ") and a line per row of cells."""
    return [f"| {header} |", "|" + "---|" * (header.count(" | ") + 1)] + [
        "| " + " | ".join(map(str, row)) + " |" for row in rows]


def _stat_cells(p: dict, digits: int, unit: bool) -> list:
    """``p``'s cells; Holm p and seeds needed only on the unit's row."""
    seeds = ("n/a" if p["seeds_needed"] is None else p["seeds_needed"]) if unit else ""
    return [f"{p['n']}*" if unit and p["rough"] else p["n"], fmt(p["mean"], digits), _ci(p, digits),
            _ci(p, digits, "bootstrap_ci95"), _p(p["p_sign_flip"]), _p(p["p_holm"]) if unit else "",
            p["a_better"] if p["n"] else "n/a", seeds]


def _table(header: str, rows: list[tuple[list[str], dict]], digits: int = 4, columns: str = STAT_COLUMNS,
           footnote: bool = True) -> list[str]:
    """Paired statistics: a row per entry, a second ``by seed`` where groups share seeds, the rough footnote."""
    cells = []
    for head, p in rows:
        seed = p.get("by_seed")
        cells.append([*head, *_stat_cells(p, digits, unit=seed is None)])
        if seed:
            cells.append([*head[:-1], head[-1] + ", by seed", *_stat_cells(seed, digits, unit=True)])
    lines = grid(f"{header} | {columns}", cells)
    if footnote and any((p.get("by_seed") or p)["rough"] for _, p in rows):
        lines += ["", f"\\* fewer than {ROUGH_N} seeds: the interval is rough."]
    return lines


def _by_pair(paired: dict) -> list[tuple[list[str], dict]]:
    return [([f"{p['a']} - {p['b']}"], p) for p in paired.values()]


def _rough_warnings(paired: dict) -> list[str]:
    """One line per comparison with fewer than :data:`ROUGH_N` seeds."""
    lines = []
    for p in paired.values():
        u, unit = (p["by_seed"], "seeds") if p.get("by_seed") else (p, "pairs")
        if u["rough"]:
            floor = (f"; an exact sign-flip p on {u['n']} {unit} cannot go below {u['p_min']:.4g}"
                     if u["p_method"] == "exact" else "")
            lines.append(f"- {p['a']} - {p['b']}: fewer than {ROUGH_N} seeds: the interval is rough "
                         f"({u['n']} {unit}{floor}).")
    return [""] + lines if lines else []


def markdown(r: dict, images: list[str]) -> str:
    """``compare.md`` of report ``r``, with the plots ``images`` (file names beside it)."""
    where = ", ".join(f"`{k}={v}`" for k, v in (r.get("where") or {}).items())
    lines = [f"# Stochastic vs deterministic modulation: search `{r['search']}`", "",
             f"Metric `{r['metric']}` ({r['mode']}), {r['completed']} completed trials with it, "
             f"{r['trials']} trials in all" + (f", of those with {where}" if where else "") + ".", "",
             "## Trials per condition", "",
             "A condition is the kind, with in brackets the groups fine-tuning trains when not only the controller "
             "(`finetune.trainable`, e.g. `none[heads]`) and `shuffled` when the stochastic readout gain is applied "
             "with its units permuted (`modulation.readout.shuffle`, the control).", ""]
    lines += grid("condition | completed | pruned | failed | running", [
        [cond, *(c.get(s, 0) for s in ("completed", "pruned", "failed", "running"))]
        for cond, c in r["counts"].items()])
    test_keys = sorted({k for b in r["best"].values() if b for k in b["test"]})
    lines += ["", "## Best trial of each condition", ""]
    lines += grid(" | ".join(["condition", "trial", r["metric"], *test_keys]), [
        [cond, "none completed", *["n/a"] * (1 + len(test_keys))] if b is None else
        [cond, f"`{b['trial_id']}`", fmt(b["value"]), *(fmt(b["test"].get(k)) for k in test_keys)]
        for cond, b in r["best"].items()])
    lines += ["", "## Distribution per condition (completed trials)", ""]
    lines += grid("condition | n | mean | std | median | min | max", [
        [cond, d["n"], *(fmt(d[k]) for k in ("mean", "std", "median", "min", "max"))]
        for cond, d in r["distribution"].items()])
    lines += ["", "## Paired differences", "",
              "Trials that share every setting except the condition (`modulation.kind`, `finetune.trainable`, "
              "`modulation.readout.shuffle`) and the kind-only settings (`modulation.noise_scale`, "
              "`modulation.gain_form`, `modulation.readout.*`) are matched; a group's trials of one condition are "
              "averaged. Difference = first minus second condition; stochastic - deterministic is the headline, "
              "stochastic - stochastic[shuffled] the control (a stochastic edge the shuffled readout shares is not "
              "comodulation).", "",
              "n: matched groups. Where groups fine-tune one pretrained network (same seed, data, model and "
              "pretraining settings, e.g. a seed's K arms) a second row, \"by seed\", averages them per seed: the "
              "unit to read, and the one Holm adjusts. **t 95% CI**: Student t interval of the mean difference. "
              f"Bootstrap: seeded percentile bootstrap (scipy.stats.bootstrap, {r['resamples']} resamples, seed "
              f"{r['bootstrap_seed']}), too narrow with few pairs. Sign-flip p: two-sided, all 2^n sign flips up to n "
              f"= {r['exact_max_n']} (so never below 2/2^n: 0.0625 for 5 pairs), {r['resamples']} random ones beyond "
              "(scipy.stats.permutation_test). Holm p: Holm's step-down adjustment within the table's family (here "
              f"the {r['holm']['families']['conditions']['m']} comparisons of the search metric; each test metric, the "
              "per-setting table and the efficiency tables are families of their own). Seeds for ±0.005: the smallest "
              f"n with t(0.975, n-1) x sd / sqrt(n) <= {r['half_width']} at the observed spread.", ""]
    lines += _table("comparison", _by_pair(r["paired"]), footnote=False) + _rough_warnings(r["paired"])
    a, b = r["comparisons"][0]
    lines += ["", f"## Per-task win rates ({a} vs {b}, test F1)", ""]
    if any(w["n"] for w in r["win_rates"].values()):
        lines += grid("task | wins | ties | losses | pairs | win rate", [
            [task, w["wins"], w["ties"], w["losses"], w["n"], fmt(w["rate"], 3)] for task, w in r["win_rates"].items()])
    else:
        lines.append(f"No matched {a}/{b} pairs with per-task test F1: no win rates.")
    lines += _settings_sections(r) + efficiency_section(r["efficiency"]) + pretraining_section(r["pretraining"])
    lines += cost_section(r["cost"]) + importances_section(r.get("importances"))
    if r["notes"]:
        lines += ["", "## Notes", ""] + _bullets(r["notes"])
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def _settings_sections(r: dict) -> list[str]:
    """The test metrics, the varied settings and the noise scale."""
    lines = ["", "## Paired differences on the test metrics", "",
             "Same matched groups and statistics as above. Higher is better except for ECE (`test/mean_ece`, "
             "calibration error), where a negative difference favours the first condition; \"first better\" counts "
             "accordingly.", ""]
    lines += _table("metric | comparison", [([f"`{k}`", f"{p['a']} - {p['b']}"], p)
                                            for k, ps in r["paired_metrics"].items() for p in ps.values()])
    a, b = r["comparisons"][0]
    lines += ["", f"## {a.capitalize()} - {b} per varied setting", ""]
    if r["by_setting"]:
        lines += ["Matched groups split by the value of each setting the search varied (the seed, the condition and "
                  "kind-only settings aside; numeric settings with many values or sampled from a range: quantile "
                  "bins).", ""]
        lines += _table("setting | value | metric", [([f"`{path}`", row["value"], f"`{k}`"], p)
                                                     for path, rows in r["by_setting"].items() for row in rows
                                                     for k, p in row["paired"].items()])
    else:
        lines.append("The search varied no setting besides the seed, the condition and the kind-only settings.")
    lines += ["", f"## {a.capitalize()} - {b} by noise scale", ""]
    if r["by_noise_scale"]:
        lines += [f"Each {a} trial minus the mean of its group's {b} trials, split by `modulation.noise_scale`.", ""]
        lines += _table("noise scale | metric", [([row["noise_scale"], f"`{k}`"], p) for row in r["by_noise_scale"]
                                                 for k, p in row.items() if isinstance(p, dict)])
    else:
        lines.append(f"No {a} trial with a {b} trial in its matched group.")
    return lines


def efficiency_section(e: dict) -> list[str]:
    lines = ["", "## Fine-tuning efficiency", "",
             f"Does one condition converge in less fine-tuning? Curve: `{e['curve_key']}` per fine-tuning step "
             f"(step 0 is the pretrained model, so a condition that starts higher gains area without learning "
             f"faster). Curves are averaged on {e['grid']}; band: {e['band']}."]
    if e["panels"]:
        lines += ["", "### Curves", ""]
        lines += grid("arm | condition | trials | steps | grid | start | final | final 95% CI", [
            [panel["arm"], kind, c["n"], c["steps"][-1], c["grid"], fmt(c["mean"][0]), fmt(c["mean"][-1]),
             f"[{c['lo'][-1]:.4f}, {c['hi'][-1]:.4f}]" if c["lo"] is not None else "n/a"]
            for panel in e["panels"] for kind, c in panel["kinds"].items()])
    if e["auc"]:
        lines += ["", "### Area under the fine-tuning curve", "",
                  "Normalised area: the trapezoid over fine-tuning steps divided by the step range, i.e. the mean "
                  "score over fine-tuning. Per condition over trials; paired over matched groups (a group's curves "
                  "of one condition averaged, the pair on their common steps).", ""]
        lines += grid("condition | trials | mean | std | median", [
            [kind, d["n"], fmt(d["mean"]), fmt(d["std"]), fmt(d["median"])]
            for kind, d in e["auc"]["per_kind"].items()])
        lines += [""] + _table("comparison", _by_pair(e["auc"]["paired"]))
    if e["steps_to_fraction"]:
        lines += ["", "### Fine-tuning steps to reach a fraction of deterministic's final score", "",
                  "Per matched group, the first fine-tuning step at which a condition's curve reaches the fraction of "
                  "the group's deterministic final value (that value divided by the fraction where lower is better). "
                  "Paired: the difference in steps where both reached it (negative: the first is faster, \"first "
                  "better\").", ""]
        lines += grid("fraction | condition | groups | reached | median steps", [
            [f, kind, k["groups"], k["reached"], fmt(k["median"], 1)]
            for f, st in e["steps_to_fraction"].items() for kind, k in st["per_kind"].items() if k["groups"]])
        lines += [""] + _table("fraction | comparison", [([f, f"{p['a']} - {p['b']}"], p)
                                                         for f, st in e["steps_to_fraction"].items()
                                                         for p in st["paired"].values()],
                               digits=1, columns=STAT_COLUMNS.replace("seeds for ±0.005", "seeds needed"))
    return lines + ([""] + _bullets(e["notes"]) if e["notes"] else [])


def pretraining_section(pre: dict) -> list[str]:
    if not pre["kinds"]:
        return []
    w = pre["window"]
    lines = ["", "## Pretraining", "",
             f"`{pre['curve_key']}` per pretraining epoch, each distinct pretraining once (trials that share one "
             f"through the cache count once). Plateau: the mean of the last {w} epochs minus the mean of the "
             f"{w} before, per pretraining, with a t 95% interval; a comparison is only as good as its budget.", ""]
    return lines + grid("pretrained with | pretrainings | epochs | last epoch (mean) | plateau gain | 95% CI", [
        [kind, c["n"], len(c["steps"]), fmt(c["mean"][-1]), fmt(plateau.get("gain")), _ci(plateau)]
        for kind, c in pre["kinds"].items() for plateau in [pre["plateau"].get(kind) or {}]]) + _bullets(pre["notes"])


def cost_section(c: dict) -> list[str]:
    lines = ["", "## What the study cost", ""]
    if not c["trials"]:
        return lines + _bullets(c["notes"])

    def seconds(v):
        return f"{v:.0f} s ({v / 3600:.2f} h)" if v is not None else "n/a"

    share = f"{100 * c['wait_share']:.1f}%" if c["wait_share"] is not None else "n/a"
    ratio = f"{c['ratio']:.2f}x" if c["ratio"] is not None else "n/a"
    mean = f", {c['pretrain_seconds_mean']:.0f} s each on average" if c["pretrain_seconds_mean"] else ""
    lines += [f"From the {c['trials']} completed trials that report `pretrain_wait_seconds`, `pretrain_seconds` "
              f"and `wall_seconds`.", "", "| quantity | value | target |", "|---|---|---|",
              f"| share of slot time spent waiting for a pretraining (sum of waits / sum of trial wall times) | "
              f"{share} | under {100 * c['wait_share_target']:.0f}% |",
              f"| pretrainings made (trials with pretrain_seconds > 0) | {c['pretrainings']}{mean} | |",
              f"| study wall time ({c['study_wall_from'] or 'unknown'}) | {seconds(c['study_wall_seconds'])} | |",
              f"| **estimate**: wall time had every kind pretrained its own network | "
              f"{seconds(c['per_kind_wall_seconds'])} | |",
              f"| ratio: study / that estimate | {ratio} | at most {c['ratio_target']:.1f}x |", "",
              f"The estimate adds to the study's wall time the pretrainings a per-kind design would make beyond those "
              f"made ({c['per_kind_pretrainings']} distinct kind, seed and pretraining settings - "
              f"{c['pretrainings']} made = {c['extra_pretrainings']}) at the mean pretraining time, spread over "
              f"max_concurrent = {c['max_concurrent'] if c['max_concurrent'] else 'unknown'} slots. It ignores waits "
              f"and scheduling: a rough figure."]
    return lines + _bullets(c["notes"])


def importances_section(imp: dict | None) -> list[str]:
    if not imp:
        return []
    lines = ["", "## Parameter importances", "",
             f"How much of the variation of `{imp['metric']}` (the search metric, the objective of Optuna's study "
             f"`{imp['study']}`) each searched setting explains among a kind's completed trials: {imp['evaluator']}, "
             f"normalised to sum to 1, over the settings that varied. A kind needs at least {imp['min_trials']} "
             f"completed trials; \"all kinds\" counts `modulation.kind` as a setting."]
    rows = list(imp["kinds"].items()) + ([("all kinds", imp["all"])] if imp["all"] else [])
    if rows:
        lines += [""] + grid("kind | completed trials | setting | importance", [
            [kind, entry["trials"], "n/a", entry["note"]] if not entry["params"] else
            [kind if i == 0 else "", entry["trials"] if i == 0 else "", f"`{param}`", f"{value:.3f}"]
            for kind, entry in rows for i, (param, value) in enumerate((entry["params"] or {"": None}).items())])
    return lines + ([""] + _bullets(imp["notes"]) if imp["notes"] else [])

"""The benchmark's Markdown report, figures and findings.

Files written to the output folder:

- ``report.md``: provenance (command, seed, versions, machine), the tables, the figures
  and the findings;
- ``people.parquet``: one row per person, method, scheme and cost profile (the measures
  of :mod:`solver.bench.measures`);
- ``summary.csv``, ``gaps.csv``, ``timings.csv``: the tables in full;
- ``figures/*.png``: cost and plausibility by group and scheme, validity by scheme, time
  per method (log scale).

The findings test the personalization study's three claims (DOMAIN.md section 2) with
paired bootstrap intervals over the same people, and say so where a claim does not hold.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from solver.bench.run import METHODS, BenchOutcome, write_people
from solver.bench.stats import Bootstrap, Estimate

SIMILAR_COST = 0.10
"""Finding 2: a soft scheme's mean cost within this relative distance of the universal
scheme's counts as "similar"."""
INDIVIDUALIZED = ("hard", "hard-group", "rank", "score", "mixed")
REPORTED_GAP_METHODS = ("exact", "exact-universal", "amortizer + repair")
PLAUSIBILITY = (("lof", "mean LOF"), ("implausible_noise", "implausible share (noise)"))


def write_report(outcome: BenchOutcome, out: Path, command: str) -> Path:
    """Write every file of the module docstring into ``out``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    write_people(outcome.people, out / "people.parquet")
    for name, frame in (
        ("summary", outcome.summary),
        ("gaps", outcome.gaps),
        ("timings", outcome.timings),
    ):
        _atomic_text(out / f"{name}.csv", frame.to_csv(index=False, float_format="%.6g"))
    config = outcome.run["config"]
    bootstrap = Bootstrap(config["bootstrap"], config["seed"])
    lines = _header(outcome, command)
    for cost in config["costs"]:
        people = outcome.people[outcome.people["cost_profile"] == cost]
        summary = outcome.summary[outcome.summary["cost_profile"] == cost]
        gaps = outcome.gaps[outcome.gaps["cost_profile"] == cost]
        timings = outcome.timings[outcome.timings["cost_profile"] == cost]
        plots = _figures(people, summary, timings, figures, cost)
        lines += [f"## Cost profile `{cost}`", ""]
        lines += _summary_table(summary, config["schemes"])
        lines += _timing_table(summary, timings, config["schemes"])
        lines += _gap_table(gaps, config["schemes"])
        lines += [f"![{title}](figures/{name})" for name, title in plots] + [""]
        lines += _findings(people, gaps, config["schemes"], bootstrap)
    _atomic_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


# -- text ---------------------------------------------------------------------------------


def _header(outcome: BenchOutcome, command: str) -> list[str]:
    run, config = outcome.run, outcome.run["config"]
    labels = "\n".join(
        f"  - `{r['cost_profile']}/{r['table']}`: {r['people']} people, "
        f"{r['solved_now']} solved by this run ({r['seconds']} s), statuses {r['statuses']}"
        for r in run["labels"]
    )
    versions = ", ".join(
        f"{name} {run[name]}"
        for name in ("python", "numpy", "pandas", "pyarrow", "scikit-learn", "highspy")
    )
    return [
        f"# Recourse benchmark: {config['dataset']}, {config['classifier']} classifier",
        "",
        f"- Command: `{command}`",
        f"- Seed {config['seed']}: rejected people of the causal model's sample seeded "
        f"{config['seed']}; amortizer training labels from seed {config['seed'] + 1}.",
        f"- carma-mip {run['package_version']}; {versions}.",
        f"- Machine: {run['machine']}; {run['jobs']} worker process(es); run on "
        f"{run['date']}, {run['seconds']} s in all"
        + (
            " (every label table was reused from an earlier run of this command: this is "
            "the time of training, the amortizer, the measures and the report only)."
            if not any(r["solved_now"] for r in run["labels"])
            else " (label tables reused from an earlier, interrupted run count only the "
            "time spent now)."
        ),
        f"- Configuration: `{json.dumps(config, sort_keys=True)}`",
        "- Label tables (resumable, under the work folder):",
        labels,
        "",
        "Methods, on the same people: **exact** (the MILP with the person's constraints, the "
        "reference); **exact-universal** (the MILP without personalization, checked against "
        "the person's real constraints); **amortizer** (raw answers of the network distilled "
        "from exact `mixed` labels) and **amortizer + repair** (failures repaired by the exact "
        "MILP); **grid-oracle** (CARMA's M*, 15 values per feature) and **non-causal** (the "
        "cheapest action if edits moved no other feature, checked in the causal model), both "
        f"on the first {config['n_baseline']} people only.",
        "",
        "Measures (every answer re-simulated through the true causal model and classifier): "
        "*feasibility* = share of people for whom any recourse exists under their constraints "
        "(the exact MILP proves it); *validity* = share of all people whose answer is accepted "
        "and respects their hard constraints; *violates* = share of answers that break a hard "
        "constraint of the person; *rejected in world* = share of answers the classifier still "
        "rejects once the causal model responds; cost, cost ratio to the exact optimum, "
        "features changed and plausibility over valid answers only (cost ratios where the "
        "optimum is at least 1e-6); *below optimum* = share of "
        "valid answers cheaper than the exact optimum's proven lower bound, possible only "
        "where the MILP interpolates a non-linear equation (its optimum is then the "
        "interpolated model's). "
        "Plausibility: mean local "
        "outlier factor against 5,000 people sampled from the causal model (about 1 for an "
        "inlier), and the share of counterfactuals whose implied noise is less likely than "
        "for 99 % of a fresh sample (*implausible (noise)*); the same for LOF.",
        "",
    ]


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "int":
        return f"{int(value)}"
    if kind == "ms":
        return f"{value:.3g}"
    return f"{value:.3f}"


def _summary_table(summary: pd.DataFrame, schemes: Sequence[str]) -> list[str]:
    columns = (
        ("people", "people", "int"),
        ("feasibility", "feasible", "pct"),
        ("validity", "valid", "pct"),
        ("violates_constraints", "violates", "pct"),
        ("rejected_in_world", "rejected in world", "pct"),
        ("cost_mean", "cost", "num"),
        ("universal_cost_mean", "cost, unit weights", "num"),
        ("cost_ratio_mean", "cost ratio", "num"),
        ("cost_ratio_median", "ratio median", "num"),
        ("cost_ratio_p95", "ratio p95", "num"),
        ("below_optimum", "below optimum", "pct"),
        ("features_changed", "features", "num"),
        ("lof_mean", "LOF", "num"),
        ("implausible_lof", "implausible (LOF)", "pct"),
        ("implausible_noise", "implausible (noise)", "pct"),
        ("noise_loglik_median", "noise log-lik (median)", "num"),
        ("ms_per_person", "ms / person", "ms"),
    )
    lines = [
        "### Methods per scheme",
        "",
        "| scheme | method | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for scheme in schemes:
        for method in METHODS:
            row = summary[(summary["scheme"] == scheme) & (summary["method"] == method)]
            if row.empty:
                continue
            r = row.iloc[0]
            cells = " | ".join(_fmt(r[key], kind) for key, _, kind in columns)
            lines.append(f"| {scheme} | {method} | {cells} |")
    return lines + [""]


def _timing_table(
    summary: pd.DataFrame, timings: pd.DataFrame, schemes: Sequence[str]
) -> list[str]:
    lines = [
        "### Time per person",
        "",
        "Medians. Exact and reference methods: one person at a time, the whole answer "
        "(abduction, search, verification). Amortizer: all people of a scheme in one call "
        "(batched), and one call per person (batch 1); `+ repair` adds the exact repairs "
        "(a mean: the median person needs none).",
        "",
        "| scheme | exact ms | amortizer us batched | amortizer us batch 1 | "
        "amortizer + repair ms (mean) | grid-oracle ms | non-causal ms | "
        "exact / amortizer batched |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scheme in schemes:
        rows = summary[summary["scheme"] == scheme].set_index("method")
        ms = rows["ms_per_person"].to_dict()
        ms["amortizer + repair"] = rows["ms_per_person_mean"].get("amortizer + repair")
        timing = timings[timings["scheme"] == scheme]
        if timing.empty:
            continue
        t = timing.iloc[0]
        speedup = 1e3 * ms.get("exact", np.nan) / t["us_per_person_batched"]
        lines.append(
            f"| {scheme} | {_fmt(ms.get('exact'), 'ms')} | {t['us_per_person_batched']:.1f} | "
            f"{t['us_per_person_batch1']:.0f} | {_fmt(ms.get('amortizer + repair'), 'ms')} | "
            f"{_fmt(ms.get('grid-oracle'), 'ms')} | {_fmt(ms.get('non-causal'), 'ms')} | "
            f"{speedup:,.0f}x |"
        )
    return lines + [""]


def _gap_table(gaps: pd.DataFrame, schemes: Sequence[str]) -> list[str]:
    metrics = list(dict.fromkeys(gaps["metric"]))
    lines = [
        "### Group gaps",
        "",
        "Disadvantaged group minus the others (95 % bootstrap interval); validity and the "
        "implausible share in percentage points. A gap whose interval excludes 0 is in bold.",
        "",
        "| scheme | method | group | " + " | ".join(metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for scheme in schemes:
        for method in REPORTED_GAP_METHODS:
            part = gaps[(gaps["scheme"] == scheme) & (gaps["method"] == method)]
            for attribute in dict.fromkeys(part["attribute"]):
                rows = part[part["attribute"] == attribute].set_index("metric")
                first = rows.iloc[0]
                cells = []
                for metric in metrics:
                    r = rows.loc[metric]
                    estimate = Estimate(r["gap"], r["low"], r["high"])
                    text = estimate.text(percent=metric in ("validity", "implausible (noise)"))
                    cells.append(f"**{text}**" if estimate.excludes_zero else text)
                lines.append(
                    f"| {scheme} | {method} | {attribute} ({first['n_disadvantaged']} vs "
                    f"{first['n_others']}) | " + " | ".join(cells) + " |"
                )
    return lines + [""]


# -- findings -----------------------------------------------------------------------------


def _column(people: pd.DataFrame, scheme: str, method: str, column: str) -> np.ndarray:
    part = people[(people["scheme"] == scheme) & (people["method"] == method)]
    return part.sort_values("person_id")[column].to_numpy(dtype=float)


def _findings(
    people: pd.DataFrame, gaps: pd.DataFrame, schemes: Sequence[str], bootstrap: Bootstrap
) -> list[str]:
    lines = [
        "### Findings",
        "",
        "Differences between schemes are paired over the same people (95 % bootstrap "
        "intervals); a difference counts when its interval excludes 0.",
        "",
    ]
    lines += _finding_hard(people, schemes, bootstrap)
    lines += _finding_soft(people, schemes, bootstrap)
    lines += _finding_gaps(gaps, schemes)
    return lines


def _diff(
    people: pd.DataFrame, a: str, b: str, method: str, column: str, bootstrap: Bootstrap
) -> Estimate:
    return bootstrap.paired_difference(
        _column(people, a, method, column), _column(people, b, method, column)
    )


def _finding_hard(people: pd.DataFrame, schemes: Sequence[str], bootstrap: Bootstrap) -> list[str]:
    title = (
        "**(1) Hard constraints lower validity/feasibility and plausibility, for exact and "
        "amortized methods.**"
    )
    if "hard" not in schemes or "universal" not in schemes:
        return [title + " Not tested: needs the `universal` and `hard` schemes.", ""]
    lines = [title, ""]
    verdicts = []
    methods = ("exact", "amortizer", "amortizer + repair")
    for method in methods:
        validity = _diff(people, "hard", "universal", method, "valid", bootstrap)
        lof = _diff(people, "hard", "universal", method, "lof", bootstrap)
        noise = _diff(people, "hard", "universal", method, "implausible_noise", bootstrap)
        lower_validity = validity.value < 0 and validity.excludes_zero
        less_plausible = any(e.value > 0 and e.excludes_zero for e in (lof, noise))
        more_plausible = all(e.value < 0 and e.excludes_zero for e in (lof, noise))
        verdicts.append((lower_validity, less_plausible))
        lines.append(
            f"- {method}, hard minus universal: validity {validity.text(1, True)}, mean LOF "
            f"{lof.text(3)}, implausible (noise) {noise.text(1, True)}: validity "
            f"{'lower' if lower_validity else 'not lower'}; plausibility "
            + (
                "lower"
                if less_plausible
                else ("higher" if more_plausible else "not clearly different")
            )
            + "."
        )
    feasible = _diff(people, "hard", "universal", "exact", "feasible", bootstrap)
    lines.append(f"- feasibility (exact), hard minus universal: {feasible.text(1, True)}.")
    lines.append("")
    lower = [m for m, (_, p) in zip(methods, verdicts, strict=True) if p]
    if not all(v for v, _ in verdicts):
        lines.append("**Does not hold** on this data for validity; see the rows above.")
    elif len(lower) == len(methods):
        lines.append("Holds on this data: for every method, validity and plausibility drop.")
    else:
        lines.append(
            "Holds for validity and feasibility. **Plausibility does not clearly drop** for "
            + ", ".join(m for m in methods if m not in lower)
            + (f" (it does for {', '.join(lower)})" if lower else "")
            + " on this data."
        )
    return lines + [""]


def _finding_soft(people: pd.DataFrame, schemes: Sequence[str], bootstrap: Bootstrap) -> list[str]:
    title = "**(2) Soft constraints (rank, score) keep plausibility better at similar cost.**"
    soft = [s for s in ("rank", "score") if s in schemes]
    if not soft or "universal" not in schemes or "hard" not in schemes:
        return [title + " Not tested: needs `universal`, `hard` and `rank` or `score`.", ""]
    lines = [
        title,
        "",
        f"Read as two parts (method: exact). Plausibility: against hard constraints, a soft "
        f"scheme keeps validity and plausibility (mean LOF, implausible share) better. Cost: "
        f"its mean cost stays within {SIMILAR_COST:.0%} of the universal scheme's, compared "
        f"with unit weights (`cost, unit weights`), since a person's own weights make costs "
        f"of different schemes incomparable; the cost in the person's own weights is shown "
        f"too.",
        "",
    ]
    verdicts = []
    universal_cost = np.nanmean(_column(people, "universal", "exact", "cost"))
    for scheme in soft:
        validity = _diff(people, scheme, "hard", "exact", "valid", bootstrap)
        lof = _diff(people, scheme, "hard", "exact", "lof", bootstrap)
        noise = _diff(people, scheme, "hard", "exact", "implausible_noise", bootstrap)
        unit = _diff(people, scheme, "universal", "exact", "universal_cost", bootstrap)
        own = float(np.nanmean(_column(people, scheme, "exact", "cost")))
        relative = unit.value / universal_cost if universal_cost else np.nan
        better = (
            lof.value <= 0
            and noise.value <= 0
            and (lof.excludes_zero or noise.excludes_zero)
            and validity.value >= 0
        )
        similar = abs(relative) <= SIMILAR_COST
        verdicts.append((scheme, better, similar, relative))
        lines.append(
            f"- {scheme} minus hard: validity {validity.text(1, True)}, mean LOF "
            f"{lof.text(3)}, implausible (noise) {noise.text(1, True)}: plausibility "
            f"{'better' if better else 'not better'}. Cost with unit weights minus universal: "
            f"{unit.text(3)} ({relative:+.1%}, {'similar' if similar else 'not similar'}); "
            f"in the person's own weights {own:.3f} against {universal_cost:.3f} under "
            f"universal."
        )
    lines.append("")
    plausible = [s for s, better, _, _ in verdicts if better]
    similar = [s for s, _, same, _ in verdicts if same]
    if len(plausible) == len(soft) and len(similar) == len(soft):
        lines.append("Holds on this data for " + " and ".join(soft) + ".")
    elif plausible:
        costs = ", ".join(f"{s} {r:+.1%}" for s, _, same, r in verdicts if not same)
        lines.append(
            f"**Holds in part** on this data: plausibility is better than under hard "
            f"constraints for {', '.join(plausible)}"
            + (f", but the cost is not similar ({costs} with unit weights)" if costs else "")
            + (
                "; plausibility is not better for "
                + ", ".join(s for s in soft if s not in plausible)
                if len(plausible) < len(soft)
                else ""
            )
            + "."
        )
    else:
        lines.append("**Does not hold** on this data: plausibility is not better than under hard.")
    return lines + [""]


def _finding_gaps(gaps: pd.DataFrame, schemes: Sequence[str]) -> list[str]:
    title = (
        "**(3) Individualized actionability reveals larger group gaps in cost and "
        "plausibility than universal actionability.**"
    )
    individual = [s for s in schemes if s in INDIVIDUALIZED]
    if "universal" not in schemes or not individual:
        return [title + " Not tested: needs `universal` and an individualized scheme.", ""]
    lines = [
        title,
        "",
        "Per method, group attribute and measure (cost, mean LOF, implausible share): the "
        "gap under each individualized scheme against the gap under `universal`. Counted as "
        "larger when its absolute value is larger and its interval excludes 0.",
        "",
        "| method | scheme | larger gaps | of | where |",
        "|---|---|---|---|---|",
    ]
    metrics = ("cost", "lof", "implausible (noise)")
    by_scheme = {scheme: [0, 0] for scheme in individual}  # larger, compared
    for method in ("exact", "amortizer + repair"):
        base = gaps[(gaps["scheme"] == "universal") & (gaps["method"] == method)]
        for scheme in individual:
            part = gaps[(gaps["scheme"] == scheme) & (gaps["method"] == method)]
            larger, where = 0, []
            count = 0
            for _, row in part[part["metric"].isin(metrics)].iterrows():
                same = (base["attribute"] == row["attribute"]) & (base["metric"] == row["metric"])
                ref = base[same]
                if ref.empty or not np.isfinite(row["gap"]):
                    continue
                count += 1
                estimate = Estimate(row["gap"], row["low"], row["high"])
                if abs(row["gap"]) > abs(ref.iloc[0]["gap"]) and estimate.excludes_zero:
                    larger += 1
                    where.append(
                        f"{row['attribute']} {row['metric']} "
                        f"({ref.iloc[0]['gap']:+.3g} -> {row['gap']:+.3g})"
                    )
            by_scheme[scheme][0] += larger
            by_scheme[scheme][1] += count
            lines.append(
                f"| {method} | {scheme} | {larger} | {count} | {'; '.join(where) or '-'} |"
            )
    lines.append("")
    holds = [s for s, (larger, count) in by_scheme.items() if count and 2 * larger >= count]
    counts = "; ".join(f"{s} {larger} of {count}" for s, (larger, count) in by_scheme.items())
    if len(holds) == len(individual):
        verdict = "Holds on this data: at least half the gaps are larger under every scheme"
    elif holds:
        verdict = (
            f"**Holds only in part** on this data: at least half the gaps are larger under "
            f"{', '.join(holds)}, not under " + ", ".join(s for s in individual if s not in holds)
        )
    else:
        verdict = "**Does not hold** on this data: under no scheme are half the gaps larger"
    verdict += f" (larger gaps per scheme: {counts})."
    lines.append(
        verdict + " Note: this project's simulated elicitation draws constraints independently of "
        "group membership except in `hard-group` (DOMAIN.md: the study's elicitation data "
        "are not public), so gaps can only come from how groups' situations interact with "
        "the same kind of constraints."
    )
    return lines + [""]


# -- figures ------------------------------------------------------------------------------


def _figures(
    people: pd.DataFrame,
    summary: pd.DataFrame,
    timings: pd.DataFrame,
    folder: Path,
    cost: str,
) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    written = []
    schemes = list(dict.fromkeys(people["scheme"]))
    attributes = [c.removeprefix("group.") for c in people.columns if c.startswith("group.")]
    exact = people[people["method"] == "exact"]

    for column, name, label in (
        ("cost", f"cost_by_group_{cost}.png", f"cost ({cost}) of valid exact answers"),
        ("lof", f"lof_by_group_{cost}.png", "local outlier factor of valid exact answers"),
        (
            "noise_loglik",
            f"noise_by_group_{cost}.png",
            "log-likelihood of the implied noise, valid exact answers",
        ),
    ):
        fig, axes = plt.subplots(1, len(attributes), figsize=(5.5 * len(attributes), 4))
        for ax, attribute in zip(np.atleast_1d(axes), attributes, strict=True):
            data, positions, colors = [], [], []
            for i, scheme in enumerate(schemes):
                part = exact[exact["scheme"] == scheme]
                for side, offset, color in ((True, -0.18, "tab:red"), (False, 0.18, "tab:blue")):
                    values = part[part[f"group.{attribute}"] == side][column].to_numpy(float)
                    data.append(values[np.isfinite(values)])
                    positions.append(i + offset)
                    colors.append(color)
            boxes = ax.boxplot(
                data, positions=positions, widths=0.3, showfliers=False, patch_artist=True
            )
            for patch, color in zip(boxes["boxes"], colors, strict=True):
                patch.set_facecolor(color)
                patch.set_alpha(0.5)
            ax.set_xticks(range(len(schemes)), schemes)
            ax.set_title(f"{attribute}: disadvantaged (red) vs others (blue)")
            ax.set_ylabel(label, fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        written.append((name, f"{label} by group and scheme"))

    name = f"validity_{cost}.png"
    fig, ax = plt.subplots(figsize=(9, 4.4))
    methods = [m for m in METHODS if m in set(summary["method"])]
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        heights = [_value(summary, scheme, method, "validity") * 100 for scheme in schemes]
        ax.bar(
            np.arange(len(schemes)) + (j - len(methods) / 2 + 0.5) * width,
            heights,
            width,
            label=method,
        )
    feasible = [_value(summary, s, "exact", "feasibility") * 100 for s in schemes]
    ax.plot(range(len(schemes)), feasible, "k_", markersize=30, label="feasible (exact)")
    ax.set_xticks(range(len(schemes)), schemes)
    ax.set_ylabel("valid answers (% of people)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    written.append((name, "validity by scheme and method"))

    name = f"time_{cost}.png"
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = {
        method + (" (batched)" if method.startswith("amortizer") else ""): float(
            np.nanmedian(summary[summary["method"] == method]["ms_per_person"])
        )
        for method in methods
    }
    bars["amortizer (batch 1)"] = float(np.median(timings["us_per_person_batch1"])) / 1e3
    ax.barh(list(bars), list(bars.values()), color="tab:gray")
    ax.set_xscale("log")
    ax.set_xlabel("median ms per person (log scale)")
    fig.tight_layout()
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    written.append((name, "time per person by method"))
    return written


def _value(summary: pd.DataFrame, scheme: str, method: str, column: str) -> float:
    row = summary[(summary["scheme"] == scheme) & (summary["method"] == method)]
    return float(row.iloc[0][column]) if not row.empty else np.nan


def _atomic_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)

"""Aggregate the chains' results over seeds: the table, the JSON report and the plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

# (key in the summary, how to read it from one chain's result)
METRICS = {
    "sft_accuracy": lambda r: r["sft_accuracy"],
    "before_pass@1": lambda r: r["before_rl"]["pass@1"],
    "before_pass@8": lambda r: r["before_rl"]["pass@8"],
    "after_pass@1": lambda r: r["after_rl"]["pass@1"],
    "after_pass@8": lambda r: r["after_rl"]["pass@8"],
    "rl_reward_first": lambda r: r["rl_reward_first"],
    "rl_reward_last": lambda r: r["rl_reward_last"],
}
BASELINE = "UniformSFT"


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value) of ``values``, with the values."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def summarize(results: list[dict]) -> dict[str, dict[str, dict]]:
    """Per arm (in first-seen order), ``mean_std`` of every metric the arm's chains have, over its seeds.

    Also ``delta_after_pass@8``/``delta_after_pass@1``: each seed's post-RL pass@k minus UniformSFT's with the
    same seed (same SFT data order, same RL prompts), so the spread of the comparison is that of paired runs.
    """
    arms: dict[str, list[dict]] = {}
    for result in results:
        arms.setdefault(result["arm"], []).append(result)
    baseline = {r["seed"]: r for r in arms.get(BASELINE, [])}
    summary = {}
    for arm, rows in arms.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        summary[arm] = {"seeds": [r["seed"] for r in rows]}
        for name, read in METRICS.items():
            try:
                values = [read(r) for r in rows]
            except KeyError:  # the behaviour policy's row has no SFT and no RL
                continue
            if not all(isinstance(v, float) and math.isnan(v) for v in values):
                summary[arm][name] = mean_std(values)
        if arm != BASELINE and "after_rl" in rows[0]:
            for k in ("pass@1", "pass@8"):
                paired = [r["after_rl"][k] - baseline[r["seed"]]["after_rl"][k] for r in rows if r["seed"] in baseline]
                if paired:
                    summary[arm][f"delta_after_{k}"] = mean_std(paired)
    return summary


def cell(stat: dict | None, digits: int = 3, signed: bool = False) -> str:
    """``mean ± std`` for a table cell (``—`` when there is nothing)."""
    if not stat:
        return "—"
    sign = "+" if signed else ""
    return f"{stat['mean']:{sign}.{digits}f} ± {stat['std']:.{digits}f}"


def table(summary: dict[str, dict[str, dict]]) -> list[str]:
    """The results table in Markdown, one row per arm."""
    lines = [
        "| arm | SFT greedy acc | SFT pass@1 | SFT pass@8 | RL reward first → last | post-RL pass@1 | "
        "post-RL pass@8 | post-RL pass@8 − UniformSFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, stats in summary.items():
        reward = (
            f"{stats['rl_reward_first']['mean']:.3f} → {stats['rl_reward_last']['mean']:.3f}"
            if "rl_reward_first" in stats
            else "—"
        )
        name = "behaviour policy π_β (reference: no SFT, no RL)" if arm == "behavior" else arm
        lines.append(
            f"| {name} | {cell(stats.get('sft_accuracy'))} | {cell(stats.get('before_pass@1'))} | "
            f"{cell(stats.get('before_pass@8'))} | {reward} | {cell(stats.get('after_pass@1'))} | "
            f"{cell(stats.get('after_pass@8'))} | {cell(stats.get('delta_after_pass@8'), signed=True)} |"
        )
    return lines


def ranking_agreement(summary: dict[str, dict[str, dict]], before: str, after: str) -> float | None:
    """Spearman's rank correlation, over the trained arms, between an SFT-stage metric and a post-RL one
    (ties get their average rank); None with fewer than three arms."""
    arms = [a for a, s in summary.items() if before in s and after in s]
    if len(arms) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for m in range(i, j + 1):
                out[order[m]] = (i + j) / 2
            i = j + 1
        return out

    x = ranks([summary[a][before]["mean"] for a in arms])
    y = ranks([summary[a][after]["mean"] for a in arms])
    mx, my = statistics.fmean(x), statistics.fmean(y)
    num = sum((a - mx) * (b - my) for a, b in zip(x, y))
    den = math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    return num / den if den else None


def plot(summary: dict[str, dict[str, dict]], path: Path, title: str) -> None:
    """Two panels (pass@8, pass@1): per arm, the SFT checkpoint's score beside its post-RL score, mean ± std bars
    with each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a, s in summary.items() if "after_pass@8" in s]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    width = 0.38
    for ax, k in zip(axes, ("pass@8", "pass@1")):
        for offset, stage, color, label in (
            (-width / 2, "before", "#9ecae1", "after SFT"),
            (width / 2, "after", "#08519c", "after SFT + GRPO"),
        ):
            stats = [summary[a][f"{stage}_{k}"] for a in arms]
            xs = [i + offset for i in range(len(arms))]
            ax.bar(
                xs,
                [s["mean"] for s in stats],
                width,
                yerr=[s["std"] for s in stats],
                color=color,
                label=label,
                capsize=3,
            )
            for x, s in zip(xs, stats):
                ax.scatter([x] * len(s["values"]), s["values"], s=10, color="black", zorder=3)
        if "behavior" in summary and f"before_{k}" in summary["behavior"]:
            ax.axhline(summary["behavior"][f"before_{k}"]["mean"], color="gray", ls="--", lw=1, label="π_β")
        ax.set_xticks(range(len(arms)), arms)
        ax.set_title(f"held-out {k} (unbiased, temperature 1)")
        ax.set_ylim(0, 1.25)  # room for the legend above the bars
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8, ncol=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The pretrained regime's report: pre-SFT references, the SFT-length sweep, the arms against UniformSFT, the weights.

Every function reads the chains' result records (see ``chain.run_chain``); nothing here runs a model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..common import paired_difference
from .report import mean_std, ranking_agreement

KS = ("pass@1", "pass@8", "pass@16")
BASELINE = "UniformSFT"
# What each arm is compared with UniformSFT on, seed by seed: (how to read it from a chain's result, its name).
COMPARED = {
    "pass@1": (lambda r: r["after_rl"]["pass@1"], "post-RL pass@1"),
    "pass@8": (lambda r: r["after_rl"]["pass@8"], "post-RL pass@8"),
    "sft_pass@1": (lambda r: r["before_rl"]["pass@1"], "SFT pass@1"),
    "gain_pass@1": (lambda r: r["after_rl"]["pass@1"] - r["before_rl"]["pass@1"], "RL gain in pass@1"),
}
# The weight diagnostics the report shows, with their headings.
DIAGNOSTICS = {
    "ess": "ESS / N",
    "log_weight_at_lower_clip": "log-weight at lower clip",
    "log_weight_at_upper_clip": "log-weight at upper clip",
    "log_ratio_mean": "mean log-ratio log π_θ − log π_β",
}


def label(result: dict) -> str:
    """An arm's name in the report: the strategy, and for the importance-sampling ones the loss normaliser."""
    if result["arm"] in (BASELINE, "behavior"):
        return result["arm"]
    return f"{result['arm']} ({result['normalizer']})"


def fmt(stat: dict | None, digits: int = 3) -> str:
    """``mean ± std`` (``—`` when missing)."""
    return "—" if not stat else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def scores(rows: Sequence[dict]) -> dict[str, dict]:
    """``mean_std`` over ``rows`` of every pass@k before (``sft_``) and after (``rl_``) RL that they all have."""
    out = {}
    for stage, prefix in (("before_rl", "sft_"), ("after_rl", "rl_")):
        for k in KS:
            if rows and all(k in r.get(stage, {}) for r in rows):
                out[prefix + k] = mean_std([r[stage][k] for r in rows])
    return out


def sweep(results: Sequence[dict], seeds: Sequence[int]) -> dict[int, dict[str, dict]]:
    """UniformSFT's scores per SFT length (0: the student itself), over ``seeds`` only, so every length has the same."""
    lengths = sorted({r["sft_steps"] for r in results if r["arm"] == BASELINE})
    table = {}
    for steps in lengths:
        rows = [r for r in results if r["arm"] == BASELINE and r["sft_steps"] == steps and r["seed"] in seeds]
        if rows:
            table[steps] = scores(rows) | {"seeds": [r["seed"] for r in rows]}
    return table


def phenomenon(table: dict[int, dict[str, dict]], k: str = "pass@1") -> list[str]:
    """Whether a longer SFT that scores higher before RL ends lower after the same RL than a shorter one; the
    rank correlation of the SFT score with the post-RL score over the lengths."""
    lengths = [s for s in table if f"rl_{k}" in table[s]]
    sft = {s: table[s][f"sft_{k}"]["mean"] for s in lengths}
    rl = {s: table[s][f"rl_{k}"]["mean"] for s in lengths}
    reversals = [(a, b) for a in lengths for b in lengths if a < b and sft[b] > sft[a] and rl[b] < rl[a]]
    lines = []
    if reversals:
        a, b = max(reversals, key=lambda p: (sft[p[1]] - sft[p[0]]) + (rl[p[0]] - rl[p[1]]))
        lines.append(
            f"- The phenomenon appears ({k}): {b} SFT steps score higher than {a} before RL "
            f"({sft[b]:.3f} vs {sft[a]:.3f}) and lower after the same RL ({rl[b]:.3f} vs {rl[a]:.3f}); "
            f"{len(reversals)} of the {len(lengths) * (len(lengths) - 1) // 2} pairs of lengths are reversed this way."
        )
    else:
        lines.append(f"- The phenomenon does not appear ({k}): no longer SFT that scores higher ends lower after RL.")
    rho = ranking_agreement(
        {s: {"a": {"mean": sft[s]}, "b": {"mean": rl[s]}} for s in lengths},
        "a",
        "b",
    )
    if rho is not None:
        lines.append(f"- Rank correlation over the SFT lengths of the SFT {k} with the post-RL {k}: {rho:+.2f}.")
    return lines


def arms(results: Sequence[dict], steps: int) -> dict[str, dict]:
    """Per arm at ``steps`` SFT steps: its scores over seeds, and for every arm but UniformSFT each ``COMPARED``
    quantity minus UniformSFT's with the same seed (mean, 95% bootstrap interval over seeds, seeds higher)."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r["sft_steps"] == steps and r["arm"] != "behavior":
            groups.setdefault(label(r), []).append(r)
    base = {r["seed"]: r for r in groups.get(BASELINE, [])}
    table = {}
    for name, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        table[name] = scores(rows) | {"seeds": [r["seed"] for r in rows]}
        paired = [r for r in rows if r["seed"] in base and "after_rl" in r]
        if name == BASELINE or not paired:
            continue
        for k, (read, _) in COMPARED.items():
            arm_values = [read(r) for r in paired]
            base_values = [read(base[r["seed"]]) for r in paired]
            mean, low, high = paired_difference(arm_values, base_values)
            higher = sum(a > b for a, b in zip(arm_values, base_values))
            table[name][f"delta_{k}"] = {"mean": mean, "low": low, "high": high, "higher": higher, "n": len(paired)}
    return table


def weight_diagnostics(results: Sequence[dict], steps: int) -> dict[str, dict[str, dict]]:
    """Per importance-sampling arm at ``steps`` SFT steps: each diagnostic's curve over the SFT run (mean over seeds
    at each logged step), its mean over the run, and its first and last values."""
    out: dict[str, dict[str, dict]] = {}
    for r in results:
        curve = r.get("sft_curve") or {}
        if r["sft_steps"] != steps or "ess" not in curve:
            continue
        out.setdefault(label(r), {}).setdefault("_runs", []).append(curve)
    for entry in out.values():
        runs = entry.pop("_runs")
        length = min(len(c["step"]) for c in runs)
        entry["step"] = {"values": runs[0]["step"][:length]}
        for key in DIAGNOSTICS:
            mean_curve = [statistics.fmean(c[key][i] for c in runs) for i in range(length)]
            finite = [v for v in mean_curve if not math.isnan(v)]
            entry[key] = {
                "curve": mean_curve,
                "mean": statistics.fmean(finite) if finite else math.nan,
                "first": finite[0] if finite else math.nan,
                "last": finite[-1] if finite else math.nan,
            }
    return out


def render(report: dict) -> list[str]:
    """The report in Markdown: references, sweep, arms with intervals, diagnostics and the verdicts."""
    settings, results = report["settings"], report["results"]
    refs = report["references"]
    table = sweep(results, settings["sweep_seeds"])
    arm_table = arms(results, settings["sft_steps"])
    diagnostics = weight_diagnostics(results, settings["sft_steps"])
    lines = [
        f"Written by `{report['command']}` on {report['date']} in {report['minutes']:.1f} min "
        f"({report['machine']['cpus']} CPUs, {settings['jobs']} chains at a time).",
        "",
        f"Setting: the pretrained student and π_β of `benchmarks/sft_then_rl/regime.py`; SFT data: "
        f"{settings['num_train']} samples of π_β (temperature 1, raw log-probs, the correct ones kept; "
        f"{settings['response_tokens']:.0f} response tokens on average); SFT: `benchmarks/sft_then_rl/pretrained.yaml` "
        f"(AdamW 3e-4 one-cycle, batch 32). GRPO (TRL, reward 1 for the exact `#### answer`): "
        f"{settings['rl_steps']} steps × {settings['rl_prompts']} fresh prompts × {settings['rl_generations']} "
        f"completions, lr {settings['rl_lr']}, β 0, loss `dapo`. Evaluation: {settings['eval_problems']} held-out "
        f"problems × {settings['eval_samples']} samples at temperature 1, unbiased pass@k, ≤ "
        f"{settings['max_new_tokens']} new tokens. Cells: mean ± sample std over seeds.",
        "",
        "**Before SFT** (held-out, no training):",
        "",
        "| policy | pass@1 | pass@8 | pass@16 |",
        "|---|---|---|---|",
    ]
    for name, stats in refs.items():
        lines.append(f"| {name} | " + " | ".join(f"{stats[k]:.3f}" for k in KS) + " |")
    lines += [
        "",
        f"**SFT length sweep** (UniformSFT, then the same GRPO; seeds {settings['sweep_seeds']}; 0 = RL from the "
        "student itself):",
        "",
        "| SFT steps | SFT pass@1 | SFT pass@8 | post-RL pass@1 | post-RL pass@8 | post-RL pass@16 |",
        "|---|---|---|---|---|---|",
    ]
    for steps, stats in table.items():
        cells = [fmt(stats.get(k)) for k in ("sft_pass@1", "sft_pass@8", "rl_pass@1", "rl_pass@8", "rl_pass@16")]
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    lines += ["", *phenomenon(table), *phenomenon(table, "pass@8")]
    seeds = arm_table.get(BASELINE, {}).get("seeds", [])
    lines += [
        "",
        f"**Arms** ({settings['sft_steps']} SFT steps, seeds {seeds}; difference to UniformSFT paired by seed, "
        "95% bootstrap interval over seeds):",
        "",
        "| arm | SFT pass@1 | SFT pass@8 | post-RL pass@1 | post-RL pass@8 | post-RL pass@16 | "
        + " | ".join(f"{name} − UniformSFT" for _, name in COMPARED.values())
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(COMPARED),
    ]
    for name, stats in arm_table.items():
        cells = [fmt(stats.get(k)) for k in ("sft_pass@1", "sft_pass@8", "rl_pass@1", "rl_pass@8", "rl_pass@16")]
        for k in COMPARED:
            d = stats.get(f"delta_{k}")
            cells.append(
                f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], {d['higher']} of {d['n']} higher" if d else ""
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *verdicts(arm_table)]
    lines += [
        "",
        "**Weights over SFT** (importance-sampling arms, mean over seeds of the logged steps; first → last logged "
        "step, and the mean over the run):",
        "",
        "| arm | " + " | ".join(DIAGNOSTICS.values()) + " |",
        "|---|" + "---|" * len(DIAGNOSTICS),
    ]
    for name, entry in diagnostics.items():
        cells = [f"{entry[k]['first']:.3f} → {entry[k]['last']:.3f} (mean {entry[k]['mean']:.3f})" for k in DIAGNOSTICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def verdicts(arm_table: dict[str, dict]) -> list[str]:
    """One sentence per arm: whether each of its intervals against UniformSFT lies above, below or around zero (with
    at least three seeds)."""
    lines = []
    for name, stats in arm_table.items():
        parts = []
        for k, (_, quantity) in COMPARED.items():
            d = stats.get(f"delta_{k}")
            if not d:
                continue
            if d["n"] < 3:
                word = f"{d['n']} seed(s): too few for an interval"
            else:
                word = "higher" if d["low"] > 0 else "lower" if d["high"] < 0 else "no different (interval holds 0)"
            parts.append(f"{quantity} {d['mean']:+.3f}, {word}")
        if parts:
            lines.append(f"- {name} vs UniformSFT: " + "; ".join(parts) + ".")
    return lines


def plot(report: dict, path: Path) -> None:
    """Five panels: the sweep (SFT and post-RL pass@1 against SFT length), the arms (SFT and post-RL pass@1 with
    each seed as a dot), and over SFT per importance-sampling arm the weights' ESS, clip fractions and log-ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, results = report["settings"], report["results"]
    table = sweep(results, settings["sweep_seeds"])
    arm_table = arms(results, settings["sft_steps"])
    diagnostics = weight_diagnostics(results, settings["sft_steps"])
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.8))
    ax = axes[0]
    steps = list(table)
    for key, style, name in (("sft_pass@1", "o--", "after SFT"), ("rl_pass@1", "o-", "after SFT + GRPO")):
        have = [s for s in steps if key in table[s]]
        ax.errorbar(
            have, [table[s][key]["mean"] for s in have], [table[s][key]["std"] for s in have], fmt=style, label=name
        )
    for name, value in report["references"].items():
        ax.axhline(value["pass@1"], color="gray", ls=":" if "β" in name else "-.", lw=1, label=f"{name}, no training")
    ax.set_xlabel("UniformSFT steps on π_β's data")
    ax.set_title("held-out pass@1: the SFT length sweep")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    names = list(arm_table)
    for offset, key, color, name in (
        (-0.2, "sft_pass@1", "#9ecae1", "after SFT"),
        (0.2, "rl_pass@1", "#08519c", "+ GRPO"),
    ):
        have = [i for i, n in enumerate(names) if key in arm_table[n]]
        ax.bar(
            [i + offset for i in have], [arm_table[names[i]][key]["mean"] for i in have], 0.4, color=color, label=name
        )
        for i in have:
            values = arm_table[names[i]][key]["values"]
            ax.scatter([i + offset] * len(values), values, s=8, color="black", zorder=3)
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7, rotation=30)
    ax.set_title(f"held-out pass@1 per arm ({settings['sft_steps']} SFT steps)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    for ax, keys, title in (
        (axes[2], ("ess",), "ESS / N over SFT"),
        (
            axes[3],
            ("log_weight_at_upper_clip", "log_weight_at_lower_clip"),
            "tokens at the upper (—) / lower (--) clip",
        ),
        (axes[4], ("log_ratio_mean",), "mean log-ratio log π_θ − log π_β"),
    ):
        for i, (name, entry) in enumerate(diagnostics.items()):
            for key, style in zip(keys, ("-", "--")):
                ax.plot(
                    entry["step"]["values"],
                    entry[key]["curve"],
                    style,
                    color=f"C{i}",
                    label=name if style == "-" else None,
                )
        ax.set_xlabel("SFT step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"Pretrained regime ({report['command']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

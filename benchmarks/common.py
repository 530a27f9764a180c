"""What every benchmark shares: machine and version facts, spreads of paired ratios, result files, data."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "lightning", "transformers", "datasets", "peft", "trl")


def machine(device: str = "cpu") -> dict:
    """The platform, CPU count, torch threads and, on CUDA, the GPU's name."""
    facts = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def versions() -> dict:
    """Python's and the installed versions of the packages that decide the timings."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def spread(values: list[float]) -> dict:
    """Median, minimum and maximum of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def with_range(values: list[float], digits: int = 3) -> str:
    """``median (min–max)`` for a table cell."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def write_results(name: str, report: dict, lines: list[str], device: str = "cpu") -> None:
    """Write ``results/<name>.json`` (the report with the date, machine and versions) and ``<name>.md``."""
    header = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(device), "versions": versions()}
    report = header | report
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def synthetic_examples(count: int, tokens: int, seed: int = 0, spread_tokens: int = 0) -> list[dict]:
    """Prompt/completion pairs of arithmetic chains, about ``tokens`` tokens each with the demo tokenizer
    (uniformly ± ``spread_tokens``)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        steps = max(1, (tokens + rng.randint(-spread_tokens, spread_tokens)) // 9)
        prompt = "Compute " + "+".join(str(rng.randint(1, 9)) for _ in range(8)) + "."
        completion = " ".join(f"{rng.randint(1, 9)}+{rng.randint(1, 9)}={rng.randint(2, 18)}." for _ in range(steps))
        rows.append({"id": f"s{i}", "prompt": prompt, "completion": completion})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines and return the path."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def paired_difference(arm: list[float], base: list[float], reps: int = 10000) -> tuple[float, float, float]:
    """Mean of ``arm − base`` over seeds (paired) and its 95% bootstrap interval, resampling seeds."""
    diff = [a - b for a, b in zip(arm, base)]
    rng = random.Random(0)
    means = sorted(statistics.mean(rng.choices(diff, k=len(diff))) for _ in range(reps))
    return statistics.mean(diff), means[int(0.025 * reps)], means[int(0.975 * reps) - 1]

"""Distillation on the embedded demo: accuracy of ``kl`` + TokenIS against UniformSFT in the same steps, the cache's
size per token with the teacher's top-k, and the training-step time of the KL against NLL.

    python -m benchmarks.distill [--seeds 0 1 2] [--steps 500] [--repeats 5] [--top-k 20] [--uniform-kl]
                                 [--jobs 2] [--threads 1] [--work DIR]

1. Caches of the demo's 4000 training examples (teacher = the behaviour policy): behaviour log-probs only, and with
   the top-k in fp32 and in fp16; Parquet bytes per response token.
2. ``fit`` (subprocesses, one at a time): ``--config demo`` (UniformSFT, nll) and ``configs/demo-distill.yaml``
   (TokenIS, kl), and with ``--uniform-kl`` ``kl`` + UniformSFT too (to tell the loss from the weighting apart);
   same seed, steps and everything else; greedy ``val/accuracy`` (200 held-out problems) at each validation, and
   each arm's difference to UniformSFT paired by seed, with a 95% bootstrap interval over seeds.
3. Step time of ``PearModule.loss_terms`` + backward + AdamW on the same batches (demo student, batch 32, fp32):
   UniformSFT nll, TokenIS nll, TokenIS kl, TokenIS nll+kl, in a new random order each round.

Writes ``benchmarks/results/distill.{json,md}``. ``--work DIR`` keeps the caches there and reuses them; ``--jobs``
runs that many fits at once and ``--threads`` sets each process's torch threads (on a busy machine, fewer threads
than cores avoid oversubscription).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

from pear_lightning import PearDataModule
from pear_lightning.behavior.score import cache_logprobs
from pear_lightning.strategies import TokenIS, UniformSFT

from .common import paired_difference, spread, with_range, write_results
from .strategy_overhead import demo_student, time_steps

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pear_lightning" / "demo"
ARMS = {  # name: extra fit arguments (after the config)
    "UniformSFT, nll (--config demo)": ["--config", "demo"],
    "TokenIS, kl (configs/demo-distill.yaml)": ["--config", "configs/demo-distill.yaml"],
    "UniformSFT, kl": ["--config", "configs/demo-distill.yaml", "--model.weighting", "UniformSFT"],
}
STEP_ARMS = {
    "UniformSFT, nll": (UniformSFT(), "nll"),
    "TokenIS, nll": (TokenIS(), "nll"),
    "TokenIS, kl": (TokenIS(), "kl"),
    "TokenIS, nll+kl": (TokenIS(), "nll+kl"),
}


def make_cache(output: Path, **teacher: Any) -> dict:
    """Run cache_logprobs on the demo's training split, with the ``teacher`` arguments (unless ``output`` holds it
    already, from an earlier run with ``--work``); its seconds, Parquet bytes and response tokens."""
    if (output / "bench.json").exists():
        return json.loads((output / "bench.json").read_text())
    start = time.perf_counter()
    splits = {f"{split}_path": str(DEMO / "data" / f"{split}.jsonl") for split in ("train", "val")}
    data = PearDataModule(
        **splits, tokenizer_name_or_path=str(DEMO / "assets" / "student"), batch_size=32, max_length=128
    )
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    cache_logprobs(data, output, str(DEMO / "assets" / "behavior"), trainer, **teacher)
    tokens = json.loads((output / "manifest.json").read_text())["tokens"]["train"]
    size = sum(f.stat().st_size for f in output.glob("*.parquet"))
    stats = {"seconds": time.perf_counter() - start, "bytes": size, "tokens": tokens, "bytes_per_token": size / tokens}
    (output / "bench.json").write_text(json.dumps(stats))
    return stats


def fit_accuracy(extra: list[str], cache: Path, seed: int, steps: int, logs: Path) -> dict[int, float]:
    """Greedy val/accuracy by step of one ``fit`` run."""
    name = f"{'-'.join(extra[1:]).replace('/', '_')}-seed{seed}"
    args = [*extra, "--data.logprobs_path", str(cache), "--seed_everything", str(seed)]
    args += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(max(steps // 4, 1))]
    args += ["--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.name", name]
    args += ["--trainer.enable_progress_bar", "false"]
    subprocess.run([sys.executable, "-m", "pear_lightning", "fit", *args], cwd=REPO, check=True)
    metrics = next((logs / name).glob("version_*/metrics.csv"))
    rows = [r for r in csv.DictReader(open(metrics)) if r.get("val/accuracy")]
    return {int(r["step"]): float(r["val/accuracy"]) for r in rows}


def step_times(cache: Path, repeats: int, steps: int) -> dict[str, list[float]]:
    """Seconds per training step of each ``STEP_ARMS`` entry, per round."""
    module, optimizer, batches = demo_student(steps, str(cache))
    names, rng = list(STEP_ARMS), random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats + 1):  # the first round warms up
        rng.shuffle(names)
        for name in names:
            module.weighting, module.hparams.loss = STEP_ARMS[name]
            seconds = time_steps(module, optimizer, batches, steps if round_ else 3)
            if round_:
                times[name].append(seconds)
    return times


def main(seeds: list[int], steps: int, repeats: int, top_k: int, uniform_kl: bool, jobs: int, work: str | None) -> None:
    """Run the three parts and write the results."""
    root = Path(work) if work else Path(tempfile.mkdtemp(prefix="pear-distill-"))
    caches = {
        "behaviour log-probs only": make_cache(root / "plain"),
        f"+ teacher top-{top_k}, fp32": make_cache(root / "fp32", teacher_top_k=top_k),
        f"+ teacher top-{top_k}, fp16": make_cache(root / "fp16", teacher_top_k=top_k, teacher_dtype="float16"),
    }
    arms = {name: extra for name, extra in ARMS.items() if uniform_kl or name != "UniformSFT, kl"}
    runs = [(name, seed) for seed in seeds for name in arms]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = pool.map(lambda run: fit_accuracy(arms[run[0]], root / "fp32", run[1], steps, root / "logs"), runs)
        accuracy = {name: {} for name in arms}
        for (name, seed), by_step in zip(runs, done):
            accuracy[name][seed] = by_step
    times = step_times(root / "fp32", repeats, 20)
    base = times["TokenIS, nll"]
    ratios = {name: [t / b for t, b in zip(times[name], base)] for name in times}
    report = {
        "settings": {
            "seeds": seeds,
            "steps": steps,
            "repeats": repeats,
            "top_k": top_k,
            "batch_size": 32,
            "threads": torch.get_num_threads(),
        },
        "command": (
            f"python -m benchmarks.distill --seeds {' '.join(map(str, seeds))} --steps {steps} --repeats {repeats} "
            f"--top-k {top_k}{' --uniform-kl' if uniform_kl else ''} --jobs {jobs} --threads {torch.get_num_threads()}"
        ),
        "cache": caches,
        "val_accuracy": {name: {str(s): by_step for s, by_step in runs.items()} for name, runs in accuracy.items()},
        "seconds_per_step": times,
        "step_ratio_to_tokenis_nll": {name: spread(r) for name, r in ratios.items()},
    }
    write_results("distill", report, render(report))


def render(report: dict) -> list[str]:
    """The Markdown tables of a report: final accuracy per seed with each arm's paired difference against the first
    arm (UniformSFT, nll), the cache sizes and the step times."""
    settings, caches, times = report["settings"], report["cache"], report["seconds_per_step"]
    seeds = [str(s) for s in settings["seeds"]]
    finals = {name: [runs[s][max(runs[s], key=int)] for s in seeds] for name, runs in report["val_accuracy"].items()}
    base = next(iter(finals.values()))
    lines = [
        f"Distillation on the demo (teacher = the behaviour policy, top-{settings['top_k']}), "
        f"{settings['threads']} CPU threads per process (`{report['command']}`).",
        "",
        f"Greedy val/accuracy (200 held-out problems) after {settings['steps']} steps, same seed, data order and "
        "schedule; the difference to UniformSFT is paired by seed, with a 95% bootstrap interval over seeds:",
        "",
        f"| arm | {' | '.join(f'seed {s}' for s in seeds)} | mean | − UniformSFT [95% interval] | seeds higher |",
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    for name, accuracy in finals.items():
        mean, low, high = paired_difference(accuracy, base)
        higher = sum(a > b for a, b in zip(accuracy, base))
        cells = [f"{a:.3f}" for a in accuracy] + [f"{statistics.mean(accuracy):.3f}"]
        cells += (
            ["", ""] if accuracy is base else [f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]", f"{higher} of {len(seeds)}"]
        )
        lines.append(f"| {name} | {' | '.join(cells)} |")
    plain = caches["behaviour log-probs only"]["bytes_per_token"]
    lines += ["", "Cache size, demo train split (Parquet, snappy):", ""]
    lines += ["| cache | bytes / response token | of which the teacher's columns |", "|---|---|---|"]
    for name, c in caches.items():
        lines.append(f"| {name} | {c['bytes_per_token']:.1f} | {c['bytes_per_token'] - plain:.1f} |")
    lines += ["", f"Training-step time, median (min–max) of {settings['repeats']} rounds of 20 steps (batch 32, fp32):"]
    lines += ["", "| loss | ms / step | ratio to TokenIS nll in the same round |", "|---|---|---|"]
    for name in STEP_ARMS:
        ratio = report["step_ratio_to_tokenis_nll"][name]["values"]
        lines.append(f"| {name} | {with_range([1000 * t for t in times[name]], 1)} | {with_range(ratio)} |")
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--uniform-kl", action="store_true", help="also train kl + UniformSFT")
    parser.add_argument("--jobs", type=int, default=1, help="fits run at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--work", default=None, help="a folder for the caches and logs, reused when run again")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the subprocesses
        torch.set_num_threads(args.threads)
    main(args.seeds, args.steps, args.repeats, args.top_k, args.uniform_kl, args.jobs, args.work)

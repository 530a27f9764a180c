"""Training-step time of each weighting strategy relative to UniformSFT, side by side in one process.

    python -m benchmarks.strategy_overhead [--repeats 7] [--steps 20]

One step is what ``PearModule.training_step`` does: forward, per-token log-probs, the strategy's
token losses and diagnostics, backward and an AdamW step, on the demo's student model and data
(batch 32, fp32). Strategies are timed in rounds, in a different order each round, so machine
drift cancels; the ratio per round is against the UniformSFT time of the same round.
Writes ``benchmarks/results/strategy_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from pear_lightning import PearDataModule, PearModule
from pear_lightning.strategies import DFT, BlockIS, SequenceIS, TokenIS, TruncatedIS, UniformSFT

from .common import spread, with_range, write_results

DEMO = Path(__file__).resolve().parents[1] / "pear_lightning" / "demo"
STRATEGIES = {
    "UniformSFT": UniformSFT(),
    "SequenceIS": SequenceIS(),
    "TokenIS": TokenIS(),
    "BlockIS": BlockIS(),
    "DFT": DFT(),
    "TruncatedIS": TruncatedIS(),
}


def time_steps(module: PearModule, optimizer: torch.optim.Optimizer, batches: list[dict], steps: int) -> float:
    """Seconds per training step, averaged over ``steps`` steps."""
    start = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        module.loss_terms(batch).mean.backward()  # weights, loss, normaliser and diagnostics, as a training step
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def demo_student(steps: int, logprobs_path: str | None = None) -> tuple[PearModule, torch.optim.Optimizer, list]:
    """The demo student with AdamW, and ``steps`` training batches of 32 demo examples (joined to a cache if given)."""
    data = PearDataModule(
        train_path=str(DEMO / "data" / "train.jsonl"),
        tokenizer_name_or_path=str(DEMO / "assets" / "student"),
        batch_size=32,
        logprobs_path=logprobs_path,
    )
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(steps)]
    module = PearModule(str(DEMO / "assets" / "student"))
    module.configure_model()
    return module, torch.optim.AdamW(module.parameters(), lr=1e-4), batches


def main(repeats: int, steps: int) -> None:
    """Run the benchmark and write its results."""
    module, optimizer, batches = demo_student(steps)
    names = list(STRATEGIES)
    times: dict[str, list[float]] = {name: [] for name in names}
    rng = random.Random(0)
    for name in names:  # warm-up
        module.weighting = STRATEGIES[name]
        time_steps(module, optimizer, batches, 3)
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            module.weighting = STRATEGIES[name]
            times[name].append(time_steps(module, optimizer, batches, steps))
    base = times["UniformSFT"]
    ratios = {name: [t / b for t, b in zip(times[name], base)] for name in STRATEGIES}
    report = {
        "settings": {"repeats": repeats, "steps_per_repeat": steps, "batch_size": 32, "dtype": "float32"},
        "seconds_per_step": times,
        "ratio_to_uniform": {name: spread(r) for name, r in ratios.items()},
    }
    lines = [
        f"Training-step time vs UniformSFT: demo student (0.5M params), batch 32, fp32, "
        f"{torch.get_num_threads()} CPU threads; median (min–max) of {repeats} rounds of {steps} steps, the "
        f"strategies in a new random order each round (`python -m benchmarks.strategy_overhead --repeats {repeats}`).",
        "",
        "| strategy | ms / step | ratio to UniformSFT in the same round (target ≤ 1.03) |",
        "|---|---|---|",
    ]
    for name in STRATEGIES:
        lines.append(f"| {name} | {with_range([1000 * t for t in times[name]], 1)} | {with_range(ratios[name])} |")
    write_results("strategy_overhead", report, lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    main(args.repeats, args.steps)

"""Training-step time of each weighting strategy relative to UniformSFT, side by side in one process.

    python -m benchmarks.strategy_overhead [--repeats 7] [--steps 20]

One step is what ``PearModule.training_step`` does: forward, per-token log-probs, the strategy's
token losses, backward and an AdamW step, on the demo's student model and data (batch 32, fp32);
both kinds of step are timed: the plain one, and a logging step, which also computes the strategy's
diagnostics (one step in ``trainer.log_every_n_steps``). Strategies are timed in rounds, in a
different order each round, so machine drift cancels; the ratio per round is against the UniformSFT
time of the same round (of the same kind of step). On a noisy host those ratios spread by ±20%, so the
weighting is also timed alone: ``loss.loss_terms`` and the backward to the log-probs, on the log-probs of
the same batches, without the model; its extra time over UniformSFT's, as a share of a UniformSFT step,
is the weighting's cost measured directly.
Writes ``benchmarks/results/strategy_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from pear_lightning import PearDataModule, PearModule
from pear_lightning.strategies import DFT, BlockIS, SequenceIS, TokenBatch, TokenIS, TruncatedIS, UniformSFT
from pear_lightning.training.loss import loss_terms

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


def time_steps(
    module: PearModule, optimizer: torch.optim.Optimizer, batches: list[dict], steps: int, metrics: bool = True
) -> float:
    """Seconds per training step, averaged over ``steps`` steps; ``metrics``: logging steps (diagnostics too)."""
    start = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        module.loss_terms(batch, metrics).mean.backward()  # weights, loss, normaliser, as a training step
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def time_weighting(strategy, tokens: list[TokenBatch], steps: int, metrics: bool) -> float:
    """Seconds per step of the weighting alone: weights, loss, normaliser (and with ``metrics`` the diagnostics) of
    each batch's log-probs (a leaf tensor here, so backward stops there) and the backward to them."""
    start = time.perf_counter()
    for i in range(steps):
        loss_terms(strategy, tokens[i % len(tokens)], metrics=metrics).mean.backward()
    return (time.perf_counter() - start) / steps


def scored_batches(module: PearModule, batches: list[dict]) -> list[TokenBatch]:
    """The model's log-probs of each batch, detached into leaf tensors that require grad."""
    with torch.no_grad():
        scored = [module.token_batch(batch) for batch in batches]
    return [TokenBatch(t.logp.clone().requires_grad_(), t.mask, t.behavior_logp, t.segment_ids) for t in scored]


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
    runs = [(name, metrics) for name in STRATEGIES for metrics in (False, True)]
    times: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    rng = random.Random(0)
    for name, metrics in runs:  # warm-up
        module.weighting = STRATEGIES[name]
        time_steps(module, optimizer, batches, min(3, steps), metrics)
    for _ in range(repeats):
        rng.shuffle(runs)
        for name, metrics in runs:
            module.weighting = STRATEGIES[name]
            times[name, metrics].append(time_steps(module, optimizer, batches, steps, metrics))
    tokens = scored_batches(module, batches)
    alone: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    for _ in range(repeats):
        rng.shuffle(runs)
        for name, metrics in runs:
            alone[name, metrics].append(time_weighting(STRATEGIES[name], tokens, 10 * steps, metrics))
    extra = {  # the weighting's extra time over UniformSFT's, in the same round, over a median UniformSFT step
        (name, m): [
            (t - u) / statistics.median(times["UniformSFT", m]) for t, u in zip(alone[name, m], alone["UniformSFT", m])
        ]
        for name, m in alone
    }
    ratios = {
        (name, metrics): [t / b for t, b in zip(times[name, metrics], times["UniformSFT", metrics])]
        for name, metrics in times
    }
    kind = {False: "step", True: "logging_step"}
    report = {
        "settings": {"repeats": repeats, "steps_per_repeat": steps, "batch_size": 32, "dtype": "float32"},
        "seconds_per_step": {f"{name} {kind[m]}": t for (name, m), t in times.items()},
        "ratio_to_uniform": {f"{name} {kind[m]}": spread(r) for (name, m), r in ratios.items()},
        "weighting_alone_seconds": {f"{name} {kind[m]}": t for (name, m), t in alone.items()},
        "weighting_extra_share_of_uniform_step": {f"{name} {kind[m]}": spread(e) for (name, m), e in extra.items()},
    }
    lines = [
        f"Training-step time vs UniformSFT: demo student (0.5M params), batch 32, fp32, "
        f"{torch.get_num_threads()} CPU threads; median (min–max) of {repeats} rounds of {steps} steps, the "
        f"strategies in a new random order each round (`python -m benchmarks.strategy_overhead --repeats {repeats}`). "
        "A logging step (one in `trainer.log_every_n_steps`, 50 by default) also computes the strategy's diagnostics.",
        "",
        "| strategy | ms / step | ratio to UniformSFT in the same round (target ≤ 1.03) | ms / logging step | "
        "ratio to UniformSFT's logging step |",
        "|---|---|---|---|---|",
    ]
    for name in STRATEGIES:
        cells = [f"{with_range([1000 * t for t in times[name, m]], 1)} | {with_range(ratios[name, m])}" for m in kind]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        f"The weighting alone (weights, loss, normaliser and the backward to the log-probs, on the same batches' "
        f"log-probs, no model; {10 * steps} steps a round): its time, and its extra time over UniformSFT's in the same "
        "round as a share of a median UniformSFT step, which is the weighting's cost without the host's noise.",
        "",
        "| strategy | ms / step | extra, % of a step | ms / logging step (with diagnostics) | extra, % of a "
        "logging step |",
        "|---|---|---|---|---|",
    ]
    for name in STRATEGIES:
        cells = [
            f"{with_range([1000 * t for t in alone[name, m]], 2)} | {with_range([100 * e for e in extra[name, m]], 2)}"
            for m in kind
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    write_results("strategy_overhead", report, lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    main(args.repeats, args.steps)

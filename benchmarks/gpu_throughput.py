"""LoRA on one GPU: pear_lightning against a hand-written loop; tokens/s, MFU and peak memory, offline.

    python -m benchmarks.gpu_throughput [--models qwen2.5-1.5b smollm2-135m] [--batch-size 8] [--tokens 1024]
        [--steps 15] [--warmup 5] [--repeats 3] [--max-batch-models qwen2.5-1.5b] [--time-budget 540]
        [--peak-tflops N] [--device cuda|cpu] [--tiny]

Random-init models of published shapes (real vocabularies; the demo tokenizer gives the ids), so only torch,
lightning, transformers, peft and this package are needed. Every arm trains LoRA (r 16, all linear layers,
AdamW, bf16 autocast; fp32 on a CPU) on the same mixed-length examples in the same order: the hand-written
loop (peft + autocast + logits + ``F.cross_entropy``), and pear UniformSFT / TokenIS through ``Trainer.fit``,
padded and packed (``pear_varlen`` on CUDA). One process, rotated rounds; tokens/s over the steps after the
warm-up, ``max_memory_allocated`` over the run, MFU = 6·N·tokens/s / the dense bf16 peak. Then the largest
batch of ``MAX_BATCH_ARMS`` (doubling, then bisection on OOM), measured once. Work that would start past
``--time-budget`` − 90 s is skipped and marked; results are written after every model to
``benchmarks/results/gpu_throughput.{json,md}``. ``--device cpu --tiny`` checks the script in seconds.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pear_lightning.model.attention import VARLEN, VARLEN_AVAILABLE
from pear_lightning.strategies import TokenIS, UniformSFT

from .common import synthetic_examples, with_range, write_results
from .gpu_models import LORA, SHAPES, build_model, peak_tflops, run_loop
from .training import TrainingData, fit_pear, training_data

LOOP = "hand-written loop"
ARMS = (LOOP, "pear UniformSFT", "pear TokenIS", "pear UniformSFT packed", "pear TokenIS packed")
MAX_BATCH_ARMS = (LOOP, "pear UniformSFT", "pear UniformSFT packed")


def run_arm(arm: str, model_dir: Path, data: TrainingData, batch_size: int, steps: int, args) -> list[float]:
    """One run of ``arm`` for ``steps`` optimizer steps; the end time of every step."""
    if arm == LOOP:
        return run_loop(model_dir, data, batch_size, steps, args.device)
    weighting = TokenIS() if "TokenIS" in arm else UniformSFT()
    packed = arm.endswith("packed")
    attention = VARLEN if packed and args.device == "cuda" and VARLEN_AVAILABLE else None
    precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    return fit_pear(
        model_dir, data, weighting, batch_size, 2 * args.tokens, steps, args.device, precision,
        packing=packed, lora=LORA, attn_implementation=attention,
    )  # fmt: skip


def measure(arm: str, model_dir: Path, data: TrainingData, batch_size: int, args, steps: int | None = None) -> dict:
    """Run ``arm``; its tokens/s over the steps after the warm-up and its peak memory (GiB, CUDA only), or
    ``{"oom": True}`` when it runs out of GPU memory."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = steps or args.warmup + args.steps
    try:
        times = run_arm(arm, model_dir, data, batch_size, total, args)
        oom = False
    except torch.cuda.OutOfMemoryError:
        oom = True  # handled outside the except block, so its traceback (and the tensors it holds) is gone
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if oom:
        return {"oom": True}
    if len(times) != total:
        raise RuntimeError(f"{arm} ran {len(times)} steps instead of {total}")
    warm = min(args.warmup, total - 1)
    rate = data.timed_tokens(batch_size, warm, total) / (times[-1] - times[warm - 1])
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    return {"tokens_per_s": rate, "peak_gib": peak}


def largest_batch(fits: Callable[[int], bool], start: int, cap: int) -> int:
    """The largest batch size up to ``cap`` that ``fits``, given that ``start`` does: doubling, then bisection
    until the gap is at most an eighth of the size that fits."""
    good, bad = start, None
    while bad is None and good < cap:
        trial = min(2 * good, cap)
        good, bad = (trial, None) if fits(trial) else (good, trial)
    while bad is not None and bad - good > max(1, good // 8):
        trial = (good + bad) // 2
        good, bad = (trial, bad) if fits(trial) else (good, trial)
    return good


class Workload:
    """One model's folder and its data, tokenised once per batch size."""

    def __init__(self, shape: str, root: Path, args) -> None:
        self.shape, self.root, self.args = shape, root / shape, args
        self.model_dir = self.root / "model"
        self.parameters = build_model(shape, self.model_dir, args.device)
        self._data: dict[int, TrainingData] = {}

    def data(self, batch_size: int) -> TrainingData:
        """Enough examples for ``warmup + steps`` batches of ``batch_size``."""
        if batch_size not in self._data:
            args = self.args
            rows = synthetic_examples((args.warmup + args.steps) * batch_size, args.tokens, args.tokens * 3 // 4)
            folder = self.root / f"data-{batch_size}"
            folder.mkdir(parents=True)
            self._data[batch_size] = training_data(folder, self.model_dir, rows, 2 * args.tokens)
        return self._data[batch_size]


def bench_model(shape: str, root: Path, args, deadline: float) -> dict:
    """Every arm at ``--batch-size`` (rotated rounds), then the largest batches when asked for and in time."""
    work = Workload(shape, root, args)
    data = work.data(args.batch_size)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for round_index in range(args.repeats):
        shift = round_index % len(ARMS)
        for arm in ARMS[shift:] + ARMS[:shift]:
            runs[arm].append(measure(arm, work.model_dir, data, args.batch_size, args))
            print(f"{shape} round {round_index + 1}/{args.repeats} {arm}: {runs[arm][-1]}", flush=True)
    lengths = [len(ids) for ids in data.input_ids]
    result = {"model": shape, "parameters": work.parameters, "mean_tokens": statistics.mean(lengths), "runs": runs}
    if shape in args.max_batch_models:
        result["largest"] = {arm: largest(arm, work, args, deadline) for arm in MAX_BATCH_ARMS}
    return result


class OutOfTime(Exception):
    """The time budget ran out."""


def largest(arm: str, work: Workload, args, deadline: float) -> dict:
    """The largest batch ``arm`` fits (two-step probes; see ``largest_batch``), measured once at that size; or
    ``{"skipped": "time budget"}`` when a probe would start after ``deadline``."""

    def fits(batch: int) -> bool:
        if time.monotonic() > deadline:
            raise OutOfTime
        return "oom" not in measure(arm, work.model_dir, work.data(batch), batch, args, steps=2)

    try:
        batch = largest_batch(fits, args.batch_size, args.max_batch_cap)
    except OutOfTime:
        return {"skipped": "time budget"}
    run = {"batch_size": batch, **measure(arm, work.model_dir, work.data(batch), batch, args)}
    print(f"{work.shape} largest batch {arm}: {run}", flush=True)
    return run


def cells(runs: list[dict], parameters: int, peak: float | None, loop: list[dict] | None = None) -> list[str]:
    """Table cells of an arm's runs: tokens/s, ratio to the loop in the same round, MFU, peak memory and its ratio."""
    if any("oom" in run for run in runs):
        return ["out of memory", "–", "–", "–", "–"]
    rates = [run["tokens_per_s"] for run in runs]
    mfu = with_range([6 * parameters * r / (peak * 1e12) for r in rates], 3) if peak else "n/a"
    memory = [run["peak_gib"] for run in runs]
    row = [with_range(rates, 0), "–", mfu, with_range(memory, 1) if None not in memory else "n/a", "–"]
    if loop is not None and not any("oom" in run for run in loop):
        row[1] = with_range([r / run["tokens_per_s"] for r, run in zip(rates, loop)])
        if None not in memory:
            row[4] = with_range([m / run["peak_gib"] for m, run in zip(memory, loop)])
    return row


def packing_gain(runs: dict[str, list[dict]]) -> str:
    """Packed over padded tokens/s, per round, for each weighting."""
    gains = []
    for weighting in ("UniformSFT", "TokenIS"):
        padded, packed = runs[f"pear {weighting}"], runs[f"pear {weighting} packed"]
        if not any("oom" in run for run in padded + packed):
            ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(padded, packed)]
            gains.append(f"{weighting} {with_range(ratios)}")
    return "; ".join(gains) or "n/a (out of memory)"


def report(results: list[dict], args, peak: float | None, minutes: float) -> list[str]:
    """The markdown tables."""
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (script check, not figures)"
    lines = [
        f"LoRA (r 16, all linear layers, AdamW), {'bf16 autocast' if args.device == 'cuda' else 'fp32'}, {device}; "
        f"random-init models of the published shapes; synthetic examples of {args.tokens} ± 75% tokens; "
        f"{args.steps} timed steps after {args.warmup}; median (min–max) of {args.repeats} rounds in rotated order, "
        f"one process; ratios per round. MFU = 6·N·tokens/s / "
        f"{f'{peak:.0f} TFLOP/s' if peak else 'peak (unknown here: pass --peak-tflops)'}. "
        f"`{' '.join(['python -m benchmarks.gpu_throughput', *args.argv])}`, {minutes:.1f} min.",
    ]
    head = "| arm | tokens/s | × loop tokens/s | MFU | peak GiB | × loop memory |"
    for result in results:
        if "skipped" in result:
            lines += ["", f"**{result['model']}**: skipped ({result['skipped']})."]
            continue
        n, runs = result["parameters"], result["runs"]
        lines += ["", f"**{result['model']}** ({n / 1e6:,.0f}M parameters, {result['mean_tokens']:.0f} tokens per "
                  f"example on average), batch {args.batch_size}:", "", head, "|---|---|---|---|---|---|"]  # fmt: skip
        for arm, arm_runs in runs.items():
            lines.append(
                f"| {arm} | " + " | ".join(cells(arm_runs, n, peak, None if arm == LOOP else runs[LOOP])) + " |"
            )
        lines += ["", f"Packed / padded tokens/s, per round: {packing_gain(runs)}."]
        if "largest" in result:
            lines += ["", "Largest batch that fits (one run each):", "", "| arm | batch | tokens/s | MFU | peak GiB |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for arm, run in result["largest"].items():
                if "skipped" in run:
                    lines.append(f"| {arm} | skipped ({run['skipped']}) | | | |")
                else:
                    tokens, _, mfu, memory, _ = cells([run], n, peak)
                    lines.append(f"| {arm} | {run['batch_size']} | {tokens} | {mfu} | {memory} |")
    return lines


def main(args: argparse.Namespace) -> None:
    """Benchmark every model and write the results."""
    started = time.monotonic()
    deadline = started + args.time_budget - 90
    peak = peak_tflops(args.device, args.peak_tflops)
    settings = {k: v for k, v in vars(args).items() if k != "argv"}
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pear-gpu-bench-") as root:
        for shape in args.models:  # results are written after every model, so a run cut short keeps them
            late = results and time.monotonic() > deadline
            results.append(
                {"model": shape, "skipped": "time budget"} if late else bench_model(shape, Path(root), args, deadline)
            )
            minutes = (time.monotonic() - started) / 60
            report_data = {"settings": settings, "peak_tflops": peak, "minutes": minutes, "results": results}
            write_results("gpu_throughput", report_data, report(results, args, peak, minutes), args.device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings; ``--tiny`` replaces the models and sizes by a seconds-long check."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=["qwen2.5-1.5b", "smollm2-135m"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="mean tokens per example (±75%%)")
    parser.add_argument("--steps", type=int, default=15, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; every arm runs once per round")
    parser.add_argument("--max-batch-models", nargs="*", default=["qwen2.5-1.5b"], help="find their largest batches")
    parser.add_argument("--max-batch-cap", type=int, default=256, help="the largest batch size tried")
    parser.add_argument("--time-budget", type=float, default=540, help="seconds for the whole run (see above)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and sizes: checks the script, in seconds")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.tiny:
        args.batch_size = min(args.batch_size, 2)
        args.models, args.max_batch_models, args.max_batch_cap = ["tiny"], ["tiny"], 2 * args.batch_size
        args.tokens, args.steps, args.warmup, args.repeats = 48, 2, 1, 1
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: timing starts at the end of a warm-up step")
    return args


if __name__ == "__main__":
    main(parse_args())

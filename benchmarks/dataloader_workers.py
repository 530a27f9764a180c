"""Data-loader worker processes for training: the default they get (``data.num_workers``) is chosen here.

    python -m benchmarks.dataloader_workers [--repeats 5] [--steps 20] [--device cpu]

1. Training tokens/s of ``Trainer.fit`` (UniformSFT) with 0, 1 and 2 worker processes: the same model, examples
   and order, each worker count once per round, in rotated order; ratios against 0 workers within a round.
2. The most workers could save: the seconds per batch that fetching rows and collating them take in the main
   process (the work a worker takes over), against the step time of part 1, and for a GPU-sized batch (8 × about
   1,024 tokens) against a GPU step at ``--gpu-tokens-per-sec`` (default 22,316: the hand-written LoRA loop on one
   H200 for a Qwen2.5-1.5B-shaped model, issue 16). A fraction of a percent there means workers cannot pay.
Writes ``benchmarks/results/dataloader_workers.{json,md}``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader

from pear_lightning import PearDataModule
from pear_lightning.data.collate import collate
from pear_lightning.strategies import UniformSFT

from .common import spread, synthetic_examples, with_range, write_jsonl, write_results
from .throughput import Workload, checked, tokens_per_second, workload_parser
from .training import fit_pear

WORKERS = (0, 1, 2)


def data_seconds_per_batch(model_dir: Path, rows: list[dict], batch_size: int, path: Path) -> float:
    """Seconds per batch to fetch ``rows`` (written to ``path``) from their tokenised dataset and collate them, in
    this process."""
    data = PearDataModule(str(write_jsonl(path, rows)), tokenizer_name_or_path=str(model_dir), max_length=4096)
    dataset = data.tokenized("train")
    loader = DataLoader(dataset, batch_size, collate_fn=partial(collate, pad_id=data.load_tokenizer().pad_token_id))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        batches = sum(1 for _ in loader)
        best = min(best, (time.perf_counter() - start) / batches)
    return best


def main(args: argparse.Namespace) -> None:
    """Time every worker count ``repeats`` times in rotated order, then the data cost per batch; write results."""
    rates: dict[int, list[float]] = {n: [] for n in WORKERS}
    with tempfile.TemporaryDirectory() as root:
        work = Workload(Path(root), args)
        for round_index in range(args.repeats):
            shift = round_index % len(WORKERS)
            for workers in WORKERS[shift:] + WORKERS[:shift]:
                steps = args.warmup + args.steps
                times = fit_pear(
                    work.model_dir, work.data, UniformSFT(), args.batch_size, work.max_length, steps, args.device,
                    num_workers=workers,
                )  # fmt: skip
                rates[workers].append(tokens_per_second(work, times))
                print(f"round {round_index + 1}/{args.repeats} {workers} workers: {rates[workers][-1]:,.0f} tokens/s")
        rows = synthetic_examples(
            (args.warmup + args.steps) * args.batch_size, args.tokens, spread_tokens=args.tokens // 2
        )
        bench_batch = data_seconds_per_batch(work.model_dir, rows, args.batch_size, Path(root) / "bench.jsonl")
        gpu_rows = synthetic_examples(8 * 16, 1024, seed=1, spread_tokens=512)
        gpu_batch = data_seconds_per_batch(work.model_dir, gpu_rows, 8, Path(root) / "gpu.jsonl")
    step_seconds = work.timed_tokens / args.steps / spread(rates[0])["median"]
    gpu_step_seconds = 8 * 1024 / args.gpu_tokens_per_sec
    ratios = {n: [a / b for a, b in zip(rates[n], rates[0])] for n in WORKERS[1:]}
    command = (
        f"python -m benchmarks.dataloader_workers --repeats {args.repeats} --steps {args.steps} --device {args.device}"
    )
    lines = [
        f"Training tokens/s by data-loader worker processes, {work.parameters / 1e6:.1f}M-parameter Llama, batch "
        f"{args.batch_size} × about {args.tokens} tokens, fp32, {args.device}; {args.steps} timed steps after "
        f"{args.warmup} warm-up; median (min–max) of {args.repeats} rounds in rotated order (`{command}`).",
        "",
        "| data.num_workers | tokens/s | ratio to 0 workers |",
        "|---|---|---|",
        *[f"| {n} | {with_range(rates[n], 0)} | {with_range(ratios[n]) if n else '1'} |" for n in WORKERS],
        "",
        "What workers could hide at most: fetching and collating a batch in the main process.",
        "",
        "| batch | data seconds per batch | step seconds | share of the step |",
        "|---|---|---|---|",
        f"| {args.batch_size} × ~{args.tokens} tokens, this run | {bench_batch:.5f} | {step_seconds:.3f} "
        f"| {bench_batch / step_seconds:.2%} |",
        f"| 8 × ~1,024 tokens, GPU step at {args.gpu_tokens_per_sec:,.0f} tokens/s | {gpu_batch:.5f} "
        f"| {gpu_step_seconds:.3f} | {gpu_batch / gpu_step_seconds:.2%} |",
    ]
    report = {
        "settings": {**vars(args), "parameters": work.parameters},
        "tokens_per_s": {str(n): rates[n] for n in WORKERS},
        "ratios_to_0_workers": {str(n): ratios[n] for n in WORKERS[1:]},
        "data_seconds_per_batch": {"benchmark_batch": bench_batch, "gpu_batch": gpu_batch},
        "step_seconds": {"benchmark_batch": step_seconds, "gpu_batch": gpu_step_seconds},
    }
    write_results("dataloader_workers", report, lines, args.device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings."""
    parser = workload_parser(__doc__, steps=20)
    parser.add_argument("--gpu-tokens-per-sec", type=float, default=22_316.0, help="the GPU step rate of part 2")
    return checked(parser, argv)


if __name__ == "__main__":
    main(parse_args())

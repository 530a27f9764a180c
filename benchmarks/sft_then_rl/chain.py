"""One arm and seed of the experiment, in one process: SFT → export → evaluate → GRPO → evaluate.

    python -m benchmarks.sft_then_rl.chain --arm TokenIS --seed 0 --work runs/sft_then_rl/TokenIS-0

SFT and export go through the product's own command line (``pear_lightning.cli.main``, in-process, so
the imports are paid once); GRPO through TRL. The result is ``<work>/result.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .metrics import pass_rates, sample_correct_counts
from .rl import RLSettings, rl_prompts, run_grpo

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo.yaml"
TRAIN = REPO / "pear_lightning" / "demo" / "data" / "train.jsonl"
HELD_OUT = REPO / "pear_lightning" / "demo" / "data" / "val.jsonl"
KS = (1, 8)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def question(row: dict) -> str:
    """The user turn of a demo example."""
    return row["messages"][0]["content"]


def run_sft(arm: str, seed: int, steps: int, work: Path) -> tuple[Path, float]:
    """Fine-tune the demo student with ``arm``'s weighting and export it; the model folder and greedy val accuracy."""
    from pear_lightning.cli import main as pear

    common = ["--config", str(CONFIG), "--model.weighting", arm, "--seed_everything", str(seed)]
    pear(
        ["fit", *common]
        + ["--trainer.max_steps", str(steps), "--lr_scheduler.init_args.total_steps", str(steps)]
        + ["--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false"]
        + ["--trainer.logger.init_args.save_dir", str(work), "--trainer.logger.init_args.name", "sft"]
        + ["--trainer.logger.init_args.version", "run"]
    )
    run = work / "sft" / "run"
    checkpoint = max((run / "checkpoints").glob("*.ckpt"), key=os.path.getmtime)
    pear(["export", *common, "--checkpoint", str(checkpoint), "--output", str(work / "sft_model")])
    checkpoint.unlink()  # the exported folder is all that later stages need
    with open(run / "metrics.csv") as f:
        accuracies = [float(row["val/accuracy"]) for row in csv.DictReader(f) if row.get("val/accuracy")]
    return work / "sft_model", accuracies[-1]


def evaluate(model_dir: Path, rows: list[dict], samples: int, max_new_tokens: int, seed: int) -> dict[str, float]:
    """pass@1 and pass@8 (unbiased, ``samples`` completions per held-out problem at temperature 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counts = sample_correct_counts(
        model, tokenizer, [question(r) for r in rows], [r["answer"] for r in rows], samples, max_new_tokens, seed=seed
    )
    return pass_rates(counts, samples, KS)


def run_chain(args: argparse.Namespace) -> dict:
    """Every stage for one arm and seed; returns (and writes) the result record."""
    torch.set_num_threads(args.threads)
    work, timings = Path(args.work), {}
    work.mkdir(parents=True, exist_ok=True)
    held_out = read_jsonl(HELD_OUT)[: args.eval_problems]
    settings = RLSettings(
        steps=args.rl_steps,
        prompts_per_step=args.rl_prompts,
        generations=args.rl_generations,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.rl_lr,
    )
    start = time.perf_counter()
    if args.arm == "behavior":  # the reference row: π_β itself, no SFT and no RL
        model_dir, sft_accuracy = REPO / "pear_lightning" / "demo" / "assets" / "behavior", float("nan")
    else:
        model_dir, sft_accuracy = run_sft(args.arm, args.seed, args.sft_steps, work)
    timings["sft_s"] = time.perf_counter() - start
    start = time.perf_counter()
    before = evaluate(model_dir, held_out, args.eval_samples, args.max_new_tokens, args.seed)
    timings["eval_s"] = time.perf_counter() - start
    options = {k: v for k, v in vars(args).items() if k not in ("arm", "seed", "work")}
    result = {"arm": args.arm, "seed": args.seed, "options": options, "sft_accuracy": sft_accuracy, "before_rl": before}
    if args.arm != "behavior":
        seen = {question(r) for r in read_jsonl(TRAIN)} | {question(r) for r in read_jsonl(HELD_OUT)}
        prompts = rl_prompts(settings.steps * settings.prompts_per_step, seen, seed=10_000 + args.seed)
        start = time.perf_counter()
        rewards = run_grpo(model_dir, work / "rl", prompts, settings, args.seed)
        timings["rl_s"] = time.perf_counter() - start
        start = time.perf_counter()
        after = evaluate(work / "rl" / "model", held_out, args.eval_samples, args.max_new_tokens, args.seed)
        timings["eval_s"] += time.perf_counter() - start
        window = max(1, len(rewards) // 10)
        result |= {
            "after_rl": after,
            "rl_reward_first": sum(rewards[:window]) / window,
            "rl_reward_last": sum(rewards[-window:]) / window,
            "rl_settings": asdict(settings),
        }
    result["seconds"] = timings
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The chain's options (the orchestrator passes all of them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", required=True, help="a weighting strategy's name, or `behavior` for π_β itself")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--work", required=True, help="this chain's folder (checkpoints, logs, result.json)")
    parser.add_argument("--sft-steps", type=int, default=500, help="the demo config's own 500")
    parser.add_argument("--rl-steps", type=int, default=200)
    parser.add_argument("--rl-prompts", type=int, default=8, help="prompts per GRPO step")
    parser.add_argument("--rl-generations", type=int, default=8, help="completions per prompt (the GRPO group)")
    parser.add_argument("--rl-lr", type=float, default=5e-5)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=16, help="n of the pass@k estimator (≥ 8)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.eval_samples < max(KS):
        parser.error(f"--eval-samples must be at least {max(KS)} for pass@{max(KS)}")
    return args


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(run_chain(parse_args()), indent=2))

"""One arm, SFT length and seed of the experiment, in one process: SFT → export → evaluate → GRPO → evaluate.

    python -m benchmarks.sft_then_rl.chain --regime pretrained --data runs/sft_then_rl/data \\
        --arm TokenIS --normalizer weights --sft-steps 200 --seed 0 --work runs/sft_then_rl/TokenIS-weights-200-0

SFT goes through the product's own command line (``pear_lightning.cli.main``, in-process, so the imports are paid
once), export through its function (``training.export.export``); GRPO through TRL. ``--sft-steps 0`` starts RL
from the student itself; ``--arm behavior`` only evaluates π_β. The result is ``<work>/result.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from .metrics import pass_rates, sample_correct_counts
from .regime import ASSETS, MAX_STEPS, MIN_STEPS
from .rl import RLSettings, rl_prompts, run_grpo

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "pear_lightning" / "demo"
KS = (1, 8, 16)
# What the SFT run logs every logging step and the result keeps: the step's NLL and the weights' diagnostics.
CURVE = ("nll", "ess", "log_weight_at_lower_clip", "log_weight_at_upper_clip", "log_ratio_mean", "weight_mean")


@dataclass(frozen=True)
class Regime:
    """Where a regime's models, config and data are, and which problems it draws."""

    config: Path
    student: Path
    behavior: Path
    train: Path
    held_out: Path
    min_steps: int
    max_steps: int
    max_new_tokens: int


def regime(name: str, data: Path | None) -> Regime:
    """``scratch``: the demo's student from random weights on the demo's data. ``pretrained``: the pretrained student
    and π_β of ``regime.py``, on π_β's samples drawn into ``data``."""
    if name == "scratch":
        data = DEMO / "data"
        return Regime(
            REPO / "configs" / "demo.yaml",
            DEMO / "assets" / "student",
            DEMO / "assets" / "behavior",
            data / "train.jsonl",
            data / "val.jsonl",
            2,
            3,
            48,
        )
    if data is None:
        raise SystemExit("--data is required with --regime pretrained (the folder π_β's samples were drawn into)")
    return Regime(
        Path(__file__).parent / "pretrained.yaml",
        ASSETS / "student",
        ASSETS / "behavior",
        data / "train.jsonl",
        data / "held_out.jsonl",
        MIN_STEPS,
        MAX_STEPS,
        224,
    )


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def question(row: dict) -> str:
    """The user turn of a demo example."""
    return row["messages"][0]["content"]


def read_curve(metrics_csv: Path) -> dict[str, list[float]]:
    """The SFT run's per-step metrics (``step`` and every ``CURVE`` name it logged) from Lightning's metrics.csv."""
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    curve: dict[str, list[float]] = {"step": []}
    for row in rows:
        if not row.get("train/loss_step", row.get("train/loss")):
            continue
        curve["step"].append(float(row["step"]))
        for name in CURVE:
            value = row.get(f"train/{name}_step", row.get(f"train/{name}", ""))
            curve.setdefault(name, []).append(float(value) if value else math.nan)
    return {k: v for k, v in curve.items() if not all(math.isnan(x) for x in v)}


def run_sft(args: argparse.Namespace, where: Regime, work: Path) -> tuple[Path, float, dict]:
    """Fine-tune the student with the arm's weighting and export it; the model folder, the greedy val accuracy (NaN
    where the config has no accuracy callback) and the SFT run's per-step diagnostics."""
    from pear_lightning import PearModule
    from pear_lightning.cli import main as pear
    from pear_lightning.data.render import load_tokenizer
    from pear_lightning.training.export import export

    common = ["--config", str(where.config), "--model.weighting", args.arm, "--seed_everything", str(args.seed)]
    common += ["--data.train_path", str(where.train), "--model.loss_normalizer", args.normalizer]
    steps = args.sft_steps
    pear(
        ["fit", *common]
        + ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
        + (["--trainer.callbacks.every_n_train_steps", str(steps)] if args.regime == "pretrained" else [])
        + ["--trainer.enable_progress_bar", "false"]
        + ["--trainer.logger.init_args.save_dir", str(work), "--trainer.logger.init_args.name", "sft"]
        + ["--trainer.logger.init_args.version", "run"]
    )
    run = work / "sft" / "run"
    checkpoint = max((run / "checkpoints").glob("*.ckpt"), key=os.path.getmtime)
    student = yaml.safe_load(where.config.read_text())["model"]["model_name_or_path"]
    export(PearModule(student), str(checkpoint), work / "sft_model", load_tokenizer(student))
    checkpoint.unlink()  # the exported folder is all that later stages need
    with open(run / "metrics.csv") as f:
        accuracies = [float(row["val/accuracy"]) for row in csv.DictReader(f) if row.get("val/accuracy")]
    return work / "sft_model", accuracies[-1] if accuracies else math.nan, read_curve(run / "metrics.csv")


def evaluate(model_dir: Path, rows: list[dict], samples: int, max_new_tokens: int, seed: int) -> dict[str, float]:
    """pass@k for ``KS`` (unbiased, ``samples`` completions per held-out problem at temperature 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counts = sample_correct_counts(
        model, tokenizer, [question(r) for r in rows], [r["answer"] for r in rows], samples, max_new_tokens, seed=seed
    )
    return pass_rates(counts, samples, [k for k in KS if k <= samples])


def run_chain(args: argparse.Namespace) -> dict:
    """Every stage for one arm, SFT length and seed; returns (and writes) the result record."""
    torch.set_num_threads(args.threads)
    where = regime(args.regime, Path(args.data) if args.data else None)
    max_new_tokens = args.max_new_tokens or where.max_new_tokens
    work, timings = Path(args.work), {}
    work.mkdir(parents=True, exist_ok=True)
    held_out = read_jsonl(where.held_out)[: args.eval_problems]
    settings = RLSettings(
        steps=args.rl_steps,
        prompts_per_step=args.rl_prompts,
        generations=args.rl_generations,
        max_completion_length=max_new_tokens,
        learning_rate=args.rl_lr,
    )
    start = time.perf_counter()
    curve: dict = {}
    if args.arm == "behavior":  # the reference row: π_β itself, no SFT and no RL
        model_dir, sft_accuracy = where.behavior, math.nan
    elif args.sft_steps == 0:  # RL straight from the student
        model_dir, sft_accuracy = where.student, math.nan
    else:
        model_dir, sft_accuracy, curve = run_sft(args, where, work)
    timings["sft_s"] = time.perf_counter() - start
    start = time.perf_counter()
    before = evaluate(model_dir, held_out, args.eval_samples, max_new_tokens, args.seed)
    timings["eval_s"] = time.perf_counter() - start
    options = {k: v for k, v in vars(args).items() if k not in ("arm", "seed", "work", "data")}
    result = {
        "arm": args.arm,
        "normalizer": args.normalizer,
        "sft_steps": args.sft_steps,
        "seed": args.seed,
        "options": options | {"max_new_tokens": max_new_tokens},
        "sft_accuracy": sft_accuracy,
        "sft_curve": curve,
        "before_rl": before,
    }
    if args.arm != "behavior" and args.rl_steps > 0:
        seen = {question(r) for r in read_jsonl(where.train)} | {question(r) for r in held_out}
        count = settings.steps * settings.prompts_per_step
        prompts = rl_prompts(count, seen, 10_000 + args.seed, where.min_steps, where.max_steps)
        start = time.perf_counter()
        rewards = run_grpo(model_dir, work / "rl", prompts, settings, args.seed)
        timings["rl_s"] = time.perf_counter() - start
        start = time.perf_counter()
        after = evaluate(work / "rl" / "model", held_out, args.eval_samples, max_new_tokens, args.seed)
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
    parser.add_argument("--regime", choices=("pretrained", "scratch"), default="pretrained")
    parser.add_argument("--data", help="the pretrained regime's data folder (train.jsonl, held_out.jsonl)")
    parser.add_argument("--arm", required=True, help="a weighting strategy's name, or `behavior` for π_β itself")
    parser.add_argument("--normalizer", choices=("tokens", "weights"), default="tokens", help="model.loss_normalizer")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--work", required=True, help="this chain's folder (checkpoints, logs, result.json)")
    parser.add_argument("--sft-steps", type=int, default=500, help="SFT optimizer steps; 0: RL from the student")
    parser.add_argument("--rl-steps", type=int, default=200, help="GRPO steps; 0: no RL")
    parser.add_argument("--rl-prompts", type=int, default=8, help="prompts per GRPO step")
    parser.add_argument("--rl-generations", type=int, default=8, help="completions per prompt (the GRPO group)")
    parser.add_argument("--rl-lr", type=float, default=5e-5)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=16, help="n of the pass@k estimator (≥ 8)")
    parser.add_argument("--max-new-tokens", type=int, help="completion cap, RL and evaluation (default: the regime's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.eval_samples < 8:
        parser.error("--eval-samples must be at least 8 for pass@8")
    return args


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(run_chain(parse_args()), indent=2))

"""Training throughput of pear_lightning vs TRL's SFTTrainer vs a hand-written PyTorch loop.

    python -m benchmarks.throughput [--repeats 5] [--steps 8] [--warmup 2] [--device cpu]

Every arm trains the same freshly initialised Llama (saved once, loaded by each arm) on the same
examples in the same order (no shuffling), with the same batch size, AdamW(lr=1e-4, no weight
decay), no gradient clipping, constant learning rate, fp32, for ``warmup + steps`` optimizer steps;
tokens/s counts the non-padding tokens of the ``steps`` steps after the warm-up, from the end of
the last warm-up step to the end of the last step (start-up, data preparation and warm-up excluded).

Arms: ``pear_lightning`` (a real ``lightning.Trainer.fit`` of ``PearModule`` + ``PearDataModule``) with
``UniformSFT``, ``TokenIS`` and ``DFT``; TRL ``SFTTrainer`` with its default loss and with
``loss_type="dft"`` (on our tokenisation: ``input_ids`` and ``labels``); and a minimal loop (full
logits + ``cross_entropy``). All arms run in one process, in a rotated order each round (A B C…,
B C…A, …) so machine drift cancels; ratios are taken within a round. TRL is optional
(``pip install -e ".[bench]"``): without it its arms are reported as not run.
Writes ``benchmarks/results/throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pear_lightning.strategies import DFT, TokenIS, UniformSFT, WeightingStrategy

from .common import synthetic_examples, with_range, write_results
from .training import DEMO_TOKENIZER, LR, fit_pear, train_loop, training_data

# (numerator, denominator, target ratio of tokens/s, or None)
PAIRS = [
    ("pear UniformSFT", "TRL SFTTrainer", 1.0),
    ("pear DFT", "TRL SFTTrainer dft", 1.0),
    ("pear UniformSFT", "plain PyTorch loop", 0.9),
    ("pear TokenIS", "plain PyTorch loop", None),
    ("pear TokenIS", "pear UniformSFT", None),
]


class Workload:
    """One benchmark run's model folder (a fresh Llama with the demo tokenizer) and data."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root, self.args = root, args
        tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 64,
            max_position_embeddings=2 * args.tokens + 256,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        self.model_dir = root / "model"
        model = LlamaForCausalLM(config)
        self.parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(self.model_dir)
        tokenizer.save_pretrained(self.model_dir)
        count = (args.warmup + args.steps) * args.batch_size
        rows = synthetic_examples(count, args.tokens, spread_tokens=args.tokens // 2)
        self.max_length = 4 * args.tokens
        self.data = training_data(root, self.model_dir, rows, self.max_length)
        self.timed_tokens = self.data.timed_tokens(args.batch_size, args.warmup)


def run_pear(work: Workload, weighting: WeightingStrategy) -> list[float]:
    """The pear_lightning arm with ``weighting``."""
    args = work.args
    return fit_pear(
        work.model_dir, work.data, weighting, args.batch_size, work.max_length, args.warmup + args.steps, args.device
    )


def run_trl(work: Workload, loss_type: str) -> list[float]:
    """TRL ``SFTTrainer.train`` on the same tokens; the end time of every step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times: list[float] = []

    class TRLStepTimes(TrainerCallback):
        def on_step_end(self, *args, **kwargs) -> None:
            times.append(time.perf_counter())

    data = work.data
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(data.input_ids, data.loss_masks)]
    dataset = Dataset.from_dict({"input_ids": data.input_ids, "labels": labels})
    args = work.args
    config = SFTConfig(
        output_dir=str(work.root / "trl"),
        loss_type=loss_type,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        optim="adamw_torch",
        train_sampling_strategy="sequential",
        activation_checkpointing=False,  # TRL turns it on by default; no other arm uses it
        max_length=None,
        use_cpu=args.device == "cpu",
        bf16=False,
        fp16=False,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(work.model_dir),
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(work.model_dir),
        callbacks=[TRLStepTimes()],
    )
    trainer.train()
    return times


def run_loop(work: Workload) -> list[float]:
    """A minimal hand-written loop: full logits, ``cross_entropy`` over the response tokens, AdamW."""
    model = AutoModelForCausalLM.from_pretrained(work.model_dir).to(work.args.device).train()
    return train_loop(model, work.data, work.args.batch_size, work.args.device)


def arms(trl_available: bool) -> dict[str, Callable[[Workload], list[float]]]:
    """Every arm that can run here, by name."""
    found = {
        "pear UniformSFT": lambda work: run_pear(work, UniformSFT()),
        "pear TokenIS": lambda work: run_pear(work, TokenIS()),
        "pear DFT": lambda work: run_pear(work, DFT()),
        "plain PyTorch loop": run_loop,
    }
    if trl_available:
        found["TRL SFTTrainer"] = lambda work: run_trl(work, "nll")
        found["TRL SFTTrainer dft"] = lambda work: run_trl(work, "dft")
    return found


def tokens_per_second(work: Workload, times: list[float]) -> float:
    """Non-padding tokens of the timed steps over their wall time."""
    expected = work.args.warmup + work.args.steps
    if len(times) != expected:
        raise RuntimeError(f"an arm ran {len(times)} steps instead of {expected}")
    return work.timed_tokens / (times[-1] - times[work.args.warmup - 1])


def main(args: argparse.Namespace) -> None:
    """Run every arm ``repeats`` times in rotated order and write the results."""
    try:
        import trl  # noqa: F401

        trl_missing = None
    except ImportError as err:
        trl_missing = f"TRL is not installed ({err}); pip install -e '.[bench]'"
        print(f"throughput: TRL arms not run: {trl_missing}")
    runners = arms(trl_missing is None)
    names = list(runners)
    rates: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as root:
        work = Workload(Path(root), args)
        for round_index in range(args.repeats):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                rates[name].append(tokens_per_second(work, runners[name](work)))
                print(f"round {round_index + 1}/{args.repeats} {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    pairs = []
    for numerator, denominator, target in PAIRS:
        if numerator in rates and denominator in rates:
            ratios = [a / b for a, b in zip(rates[numerator], rates[denominator])]
            pairs.append({"pair": f"{numerator} / {denominator}", "target": target, "ratios": ratios})
        else:
            pairs.append({"pair": f"{numerator} / {denominator}", "target": target, "not_run": trl_missing})
    settings = {
        k: getattr(args, k) for k in ("device", "repeats", "steps", "warmup", "batch_size", "tokens", "vocab", "hidden")
    }
    settings |= {"layers": args.layers, "parameters": work.parameters, "timed_tokens_per_round": work.timed_tokens}
    command = "python -m benchmarks.throughput " + " ".join(
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("repeats", "steps", "device")
    )
    lines = [
        f"Training throughput, {work.parameters / 1e6:.1f}M-parameter Llama ({args.layers} layers, hidden "
        f"{args.hidden}, vocab {args.vocab:,}), batch {args.batch_size} × about {args.tokens} tokens, fp32, AdamW, "
        f"{args.device}; {args.steps} timed steps after {args.warmup} warm-up steps; median (min–max) of "
        f"{args.repeats} rounds in rotated order (`{command}`).",
        "",
        "| arm | tokens/s |",
        "|---|---|",
        *[f"| {name} | {with_range(rates[name], 0)} |" for name in names],
        *([f"| TRL SFTTrainer | not run: {trl_missing} |"] if trl_missing else []),
        "",
        "| ratio of tokens/s | per-round median (min–max) | target |",
        "|---|---|---|",
    ]
    for pair in pairs:
        target = f"≥ {pair['target']}" if pair["target"] else "–"
        value = with_range(pair["ratios"]) if "ratios" in pair else f"not run: {pair['not_run']}"
        lines.append(f"| {pair['pair']} | {value} | {target} |")
    report = {"settings": settings, "tokens_per_s": rates, "pairs": pairs, "trl_missing": trl_missing}
    write_results("throughput", report, lines, args.device)


def workload_parser(description: str, steps: int) -> argparse.ArgumentParser:
    """The settings of a ``Workload`` run: rounds, steps, and the model's and examples' shapes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; every arm runs once per round")
    parser.add_argument("--steps", type=int, default=steps, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them (at least 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="mean tokens per example (±50%%)")
    parser.add_argument("--vocab", type=int, default=16_384)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return parser


def checked(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; timing starts at the end of a warm-up step, so there must be one."""
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: timing starts at the end of a warm-up step")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings."""
    return checked(workload_parser(__doc__, steps=8), argv)


if __name__ == "__main__":
    main(parse_args())

"""The pretrained regime: a student with a policy of its own, and a behaviour policy π_β that writes differently.

    python -m benchmarks.sft_then_rl.regime                 # rebuild the committed models in assets/ (15 min, 2 cores)
    python -m benchmarks.sft_then_rl.regime --data DIR      # draw the SFT data and held-out problems into DIR

The task is the demo's (evaluate a chain of additions and subtractions), on chains of 3 or 4 operations.

- **π_β** writes long worked solutions (about 110–200 tokens): it restates the problem, names every step in words,
  restates the running value, and closes with a sentence before ``#### <answer>``. Its wording is drawn at random, so
  it is a stochastic policy. Sampled at temperature 1 it is right about three times in four (pass@1 0.72).
- **The student** was pretrained on its own terse style (``7+5=12. 12-3=9. #### 9``), which makes arithmetic slips and
  sometimes trails off without the final ``####`` line. A tenth of its pretraining text was worded like π_β's, but
  with its own taste in phrasing (the first phrasing of each choice 85% of the time, where π_β picks uniformly), so
  π_β's solutions are unlikely under it at the first token and at every later choice of words, not impossible.
  Before SFT it solves some problems its own way.

Both are the demo's 0.5M-parameter Llama shape with one shared tokenizer (trained on both styles), so token ids and
log-probs mean the same under both. The SFT data (π_β's samples at temperature 1 with their raw log-probs) is drawn by
the benchmark itself, with ``pear_lightning generate``.
"""

from __future__ import annotations

import argparse
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from pear_lightning.demo.build import build_tokenizer, chat, sample_split, tiny_llama, train_on_solutions, write_jsonl
from pear_lightning.demo.task import Problem, reference_solution, sample_problem

ASSETS = Path(__file__).parent / "assets"
MIN_STEPS, MAX_STEPS = 3, 4
OPENINGS = (
    "We need to compute {expr}. Let us go one operation at a time, from left to right.",
    "The problem asks for the value of {expr}. We work through it step by step.",
    "To compute {expr}, we take the operations in order and keep a running value.",
)
STARTS = ("We start with {v}.", "The running value starts at {v}.")
STEPS = (
    "Step {i}: we {verb} {n} {prep} {v}. {v} {op} {n} = {new}, so the running value is now {new}.",
    "Next we {verb} {n}: {v} {op} {n} gives {new}. The running value is {new}.",
    "Then we {verb} {n} {prep} {v}, which gives {v} {op} {n} = {new}. Now we have {new}.",
)
CLOSINGS = (
    "Every operation is done, so the final value is {answer}.",
    "That was the last operation. The value of the whole expression is {answer}.",
)
STUDENT_TASTE = (0.85, 0.1, 0.05)  # how often the student's worded text picks the first, second, third phrasing


def problem(rng: random.Random) -> Problem:
    """A chain of 3 or 4 operations on numbers 1..9."""
    return sample_problem(rng, MIN_STEPS, MAX_STEPS)


def worded_solution(problem: Problem, rng: random.Random, taste: tuple[float, ...] | None = None) -> str:
    """π_β's style: a long worked solution in randomly chosen words, always correct. Each phrasing is drawn uniformly,
    or with the probabilities ``taste`` (the student's)."""

    def pick(options: tuple[str, ...]) -> str:
        return rng.choices(options, weights=taste[: len(options)])[0] if taste else rng.choice(options)

    expr = problem.question.removeprefix("Compute ").removesuffix(".")
    value = problem.numbers[0]
    parts = [pick(OPENINGS).format(expr=expr), pick(STARTS).format(v=value)]
    for i, (op, n) in enumerate(zip(problem.ops, problem.numbers[1:]), start=1):
        new = value + n if op == "+" else value - n
        verb, prep = ("add", "to") if op == "+" else ("subtract", "from")
        parts.append(pick(STEPS).format(i=i, verb=verb, n=n, prep=prep, v=value, op=op, new=new))
        value = new
    parts.append(pick(CLOSINGS).format(answer=value))
    return " ".join(parts) + f"\n#### {value}"


def terse_solution(problem: Problem, rng: random.Random, slip: float, trail: float) -> str:
    """The student's own style (the demo's terse steps), with an arithmetic slip in one step, carried to the end,
    with probability ``slip``, and trailing off without the ``####`` line with probability ``trail``."""
    text = reference_solution(problem, rng)
    if rng.random() < slip:
        off = rng.choice((-2, -1, 1, 2))
        step = rng.randrange(len(problem.ops))
        value, steps = problem.numbers[0], []
        for i, (op, n) in enumerate(zip(problem.ops, problem.numbers[1:])):
            new = (value + n if op == "+" else value - n) + (off if i == step else 0)
            steps.append(f"{value}{op}{n}={new}.")
            value = new
        text = " ".join(steps) + f" #### {value}"
    if rng.random() < trail:
        text = text.split(" ####")[0] + " That should be it."
    return text


def behavior_sample(rng: random.Random) -> tuple[Problem, str]:
    """π_β's training data: a problem and a worded solution."""
    p = problem(rng)
    return p, worded_solution(p, rng)


def student_sample(rng: random.Random, worded_share: float = 0.1, slip: float = 0.2, trail: float = 0.3):
    """The student's pretraining data: its own terse style, and a ``worded_share`` worded with its own taste."""
    p = problem(rng)
    if rng.random() < worded_share:
        return p, worded_solution(p, rng, STUDENT_TASTE)
    return p, terse_solution(p, rng, slip, trail)


def train(name: str, seed: int, steps: int, threads: int) -> str:
    """Train and save one of the two models (``behavior`` or ``student``); runs in its own process."""
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(threads)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ASSETS / "tokenizer")
    model = tiny_llama(tokenizer, seed=seed)
    draw = behavior_sample if name == "behavior" else student_sample
    train_on_solutions(model, tokenizer, draw, random.Random(seed), steps, batch_size=64)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(ASSETS / name)
    tokenizer.save_pretrained(ASSETS / name)
    return name


def main(steps: int = 1000, seed: int = 0, models: tuple[str, ...] = ("behavior", "student")) -> None:
    """Build the shared tokenizer (unless it is there and only some models are rebuilt), then train ``models`` side
    by side."""
    if len(models) == 2 or not (ASSETS / "tokenizer").exists():
        rng = random.Random(seed)
        corpus = []
        for _ in range(4000):
            p = problem(rng)
            corpus.append(f"user\n{p.question}\nassistant\n{worded_solution(p, rng)}\n")
            corpus.append(f"user\n{p.question}\nassistant\n{terse_solution(p, rng, 0.2, 0.3)}\n")
        build_tokenizer(corpus, vocab_size=512).save_pretrained(ASSETS / "tokenizer")
    seeds = [seed + (1 if name == "behavior" else 2) for name in models]
    threads = [max(1, (os.cpu_count() or 1) // len(models))] * len(models)
    with ProcessPoolExecutor(len(models)) as pool:
        for name in pool.map(train, models, seeds, [steps] * len(models), threads):
            print(f"saved {ASSETS / name}", flush=True)


def draw_data(out: Path, num_train: int = 2000, num_held_out: int = 100, seed: int = 0) -> None:
    """Write ``out/train.jsonl``: π_β's samples (temperature 1, raw log-probs, the correct ones kept) for ``num_train``
    problems; and ``out/held_out.jsonl``: ``num_held_out`` other problems with their answers, for evaluation."""
    rng, seen, problems = random.Random(seed + 100), set(), []
    while len(problems) < num_held_out + num_train * 3 // 2:  # room for π_β's wrong answers (about a fifth)
        p = problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            problems.append(p)
    held_out = [
        {"id": f"held-out-{i:04d}", "messages": chat(p), "answer": str(p.answer)}
        for i, p in enumerate(problems[:num_held_out])
    ]
    rows, dropped = sample_split(problems[num_held_out:], "train", seed, ASSETS / "behavior", max_new_tokens=224)
    print(f"π_β's samples: kept {len(rows)} of {len(rows) + dropped} ({dropped} wrong or unfinished)", flush=True)
    if len(rows) < num_train:
        raise SystemExit(f"π_β solved only {len(rows)} of {len(rows) + dropped} problems, fewer than {num_train}")
    write_jsonl(out / "train.jsonl", rows[:num_train])
    write_jsonl(out / "held_out.jsonl", held_out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of 64 solutions for each model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", choices=("behavior", "student"), default=["behavior", "student"])
    parser.add_argument("--data", help="draw the data into this folder instead of building the models")
    parser.add_argument("--num-train", type=int, default=2000, help="with --data: π_β's samples kept for SFT")
    parser.add_argument("--num-held-out", type=int, default=100, help="with --data: held-out problems")
    args = parser.parse_args()
    if args.data:
        draw_data(Path(args.data), args.num_train, args.num_held_out, args.seed)
    else:
        main(args.steps, args.seed, tuple(args.models))

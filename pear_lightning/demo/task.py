"""A small verifiable reasoning task: evaluate a chain of additions and subtractions step by step.

A problem reads ``Compute 7+5-3.``; a solution writes one equation per step and ends with
``#### <answer>``, which ``extract_answer`` grades. ``reference_solution`` is a stochastic solver:
it varies the wording and the order of commutative operands, so that a model trained on its
output is a genuinely stochastic behaviour policy.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pear_lightning.training.evaluate import ANSWER_PATTERN

OPENERS = ("", "First, ", "Start with ")
CONNECTORS = (" Then ", " Next, ", " ")


@dataclass(frozen=True)
class Problem:
    """A chain ``numbers[0] ops[0] numbers[1] ops[1] ...`` evaluated left to right."""

    numbers: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def question(self) -> str:
        """The user's request."""
        expr = str(self.numbers[0]) + "".join(f"{op}{n}" for op, n in zip(self.ops, self.numbers[1:]))
        return f"Compute {expr}."

    @property
    def answer(self) -> int:
        """The exact value of the chain."""
        value = self.numbers[0]
        for op, n in zip(self.ops, self.numbers[1:]):
            value = value + n if op == "+" else value - n
        return value


def sample_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 3) -> Problem:
    """Draw a chain of ``min_steps``..``max_steps`` operations on numbers 1..9."""
    steps = rng.randint(min_steps, max_steps)
    numbers = tuple(rng.randint(1, 9) for _ in range(steps + 1))
    ops = tuple(rng.choice("+-") for _ in range(steps))
    return Problem(numbers, ops)


def reference_solution(problem: Problem, rng: random.Random) -> str:
    """Write a correct worked solution in one of several wordings, chosen at random."""
    value = problem.numbers[0]
    steps = []
    for op, n in zip(problem.ops, problem.numbers[1:]):
        new = value + n if op == "+" else value - n
        left, right = (n, value) if op == "+" and rng.random() < 0.3 else (value, n)
        steps.append(f"{left}{op}{right}={new}.")
        value = new
    text = rng.choice(OPENERS) + steps[0]
    for step in steps[1:]:
        text += rng.choice(CONNECTORS) + step
    return f"{text} #### {value}"


def extract_answer(text: str) -> str | None:
    """Return the final answer after ``####`` in a completion, or None if there is none."""
    match = re.search(ANSWER_PATTERN, text)
    return match.group(1) if match else None


def check_answer(example: dict, completion: str) -> bool:
    """The demo's verifier for ``generate --verifier``: whether ``completion`` ends with the example's ``answer``."""
    return extract_answer(completion) == str(example["answer"])

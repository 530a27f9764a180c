"""Regenerate the demo's tokenizer, models and data: ``python -m pear_lightning.demo.build``.

1. A byte-level BPE tokenizer with a ChatML template, trained on the task's text.
2. The behaviour policy: a tiny Llama trained on the stochastic solver's worked solutions.
3. The SFT data: the behaviour policy's own samples at temperature 1, drawn by
   ``python -m pear_lightning generate`` with the task's answer checker as verifier (only correct
   ones kept), each with its response ``token_ids`` and their per-token ``logprobs`` under the
   behaviour policy (temperature 1, no truncation: its raw log-softmax, fp32).
4. The student: the same architecture, freshly initialised; this is what the demo fine-tunes.

Everything is seeded; the output goes to ``pear_lightning/demo/assets`` and ``pear_lightning/demo/data``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pear_lightning.behavior.generate import generate
from pear_lightning.data.render import tokenize_example
from pear_lightning.data.sources import load_examples
from pear_lightning.demo.task import Problem, reference_solution, sample_problem

HERE = Path(__file__).parent
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (digits split one by one) with a ChatML chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
        model_max_length=512,
    )


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama of about 0.5M parameters for ``tokenizer``'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def chat(problem: Problem, solution: str | None = None) -> list[dict[str, str]]:
    """The conversation of a problem, with its solution as the assistant turn when given."""
    messages = [{"role": "user", "content": problem.question}]
    if solution is not None:
        messages.append({"role": "assistant", "content": solution})
    return messages


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ints to one tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def train_on_solutions(
    model,
    tokenizer,
    draw: Callable[[random.Random], tuple[Problem, str]],
    rng: random.Random,
    steps: int,
    batch_size: int,
) -> None:
    """Fit ``model`` to worked solutions, ``draw(rng)`` giving one (problem, solution) at a time (plain SFT, loss on
    responses, AdamW 3e-3 one-cycle)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    model.train()
    for step in range(steps):
        rows = []
        for _ in range(batch_size):
            problem, solution = draw(rng)
            rows.append(tokenize_example({"messages": chat(problem, solution)}, tokenizer, 256, "solver"))
        input_ids = pad([r["input_ids"] for r in rows], tokenizer.pad_token_id)
        labels = pad([[t if m else -100 for t, m in zip(r["input_ids"], r["loss_mask"])] for r in rows], -100)
        loss = model(
            input_ids=input_ids, attention_mask=(labels != -100) | (input_ids != tokenizer.pad_token_id), labels=labels
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()


def solver_sample(rng: random.Random) -> tuple[Problem, str]:
    """A fresh problem and the stochastic solver's solution to it: the behaviour policy's training data."""
    problem = sample_problem(rng)
    return problem, reference_solution(problem, rng)


def sample_split(
    problems: list[Problem],
    prefix: str,
    seed: int,
    behavior: Path = HERE / "assets" / "behavior",
    max_new_tokens: int = 64,
) -> tuple[list[dict], int]:
    """Sample one response per problem from the saved behaviour policy with ``generate`` at temperature 1, and keep
    the correct ones."""
    with tempfile.TemporaryDirectory() as work:
        prompts = Path(work) / "prompts.jsonl"
        write_jsonl(
            prompts,
            [{"id": f"{prefix}-{i:05d}", "messages": chat(p), "answer": str(p.answer)} for i, p in enumerate(problems)],
        )
        generate(
            str(prompts),
            Path(work) / "out",
            str(behavior),
            max_new_tokens=max_new_tokens,
            verifier="pear_lightning.demo.task.check_answer",
            batch_size=256,
            seed=seed,
            accelerator="cpu",
        )
        kept = load_examples(str(Path(work) / "out")).to_list()
    return kept, len(problems) - len(kept)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines (log-probs rounded to float32 precision)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(num_train: int = 4000, num_val: int = 200, behavior_steps: int = 1500, seed: int = 0) -> None:
    """Build every demo artefact from scratch, deterministically."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = random.Random(seed)
    corpus = []
    for _ in range(5000):
        problem = sample_problem(rng)
        corpus.append(f"user\n{problem.question}\nassistant\n{reference_solution(problem, rng)}\n")
    tokenizer = build_tokenizer(corpus, vocab_size=320)

    behavior = tiny_llama(tokenizer, seed=seed + 1)
    train_on_solutions(behavior, tokenizer, solver_sample, rng, behavior_steps, batch_size=64)
    student = tiny_llama(tokenizer, seed=seed + 2)
    for name, model in (("behavior", behavior), ("student", student)):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(HERE / "assets" / name)
        tokenizer.save_pretrained(HERE / "assets" / name)

    seen: set[str] = set()
    splits = {}
    for split, count in (("val", num_val), ("train", num_train)):
        problems = []
        while len(problems) < count * 2:
            problem = sample_problem(rng)
            if problem.question not in seen:  # no problem is in both splits
                seen.add(problem.question)
                problems.append(problem)
        rows, dropped = sample_split(problems, split, seed=seed + 3)
        splits[split] = rows[:count]
        print(f"{split}: kept {len(rows)} of {len(problems)} samples ({dropped} wrong or unfinished)")
    for split, rows in splits.items():
        write_jsonl(HERE / "data" / f"{split}.jsonl", rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--behavior-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.num_train, args.num_val, args.behavior_steps, args.seed)

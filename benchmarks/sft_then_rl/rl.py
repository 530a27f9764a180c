"""The RL stage: the same GRPO run, through TRL's ``GRPOTrainer``, on every SFT checkpoint."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from pear_lightning.demo.task import sample_problem

from .metrics import correctness_reward


@dataclass(frozen=True)
class RLSettings:
    """GRPO's knobs; every arm and seed gets the same ones."""

    steps: int = 200
    prompts_per_step: int = 8
    generations: int = 8
    max_completion_length: int = 48
    learning_rate: float = 5e-5
    temperature: float = 1.0
    beta: float = 0.0
    loss_type: str = "dapo"


def rl_prompts(count: int, exclude: set[str], seed: int, min_steps: int = 2, max_steps: int = 3) -> list[dict]:
    """``count`` fresh problems of ``min_steps``..``max_steps`` operations (none of them in ``exclude``) as TRL
    conversational prompts with their answers."""
    rng, seen, rows = random.Random(seed), set(exclude), []
    while len(rows) < count:
        problem = sample_problem(rng, min_steps, max_steps)
        if problem.question not in seen:
            seen.add(problem.question)
            rows.append({"prompt": [{"role": "user", "content": problem.question}], "answer": str(problem.answer)})
    return rows


def run_grpo(model_dir: Path, output_dir: Path, prompts: list[dict], settings: RLSettings, seed: int) -> list[float]:
    """Train the model in ``model_dir`` with GRPO on ``prompts`` and save it to ``output_dir``.

    Returns the mean training reward of each step (the rollouts' accuracy, as GRPO saw it).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = GRPOConfig(
        output_dir=str(output_dir / "trainer"),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.prompts_per_step * settings.generations,
        num_generations=settings.generations,
        max_completion_length=settings.max_completion_length,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        temperature=settings.temperature,
        top_k=0,
        top_p=1.0,
        beta=settings.beta,
        loss_type=settings.loss_type,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=correctness_reward,
        args=config,
        train_dataset=Dataset.from_list(prompts),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.model.save_pretrained(output_dir / "model", safe_serialization=True)
    tokenizer.save_pretrained(output_dir / "model")
    return [row["reward"] for row in trainer.state.log_history if "reward" in row]

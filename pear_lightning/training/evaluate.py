"""AnswerAccuracy: grade greedy completions of the validation prompts against a reference answer."""

from __future__ import annotations

import re

import lightning as L
import torch

from pear_lightning.errors import PearError
from pear_lightning.training.console import say

ANSWER_PATTERN = r"####\s*(-?\d+)"  # GSM8K's convention: the final answer after ####


class AnswerAccuracy(L.Callback):
    """Log ``val/accuracy``: the fraction of validation examples whose greedy completion has the
    exact reference answer. It runs once before the first training step (logged at step 0) and
    after every validation, so a run shows what it learned.

    Args:
        answer_column: the validation data's column holding each example's reference answer.
        answer_pattern: a regular expression whose first group extracts the answer from a completion.
        max_new_tokens: the most tokens generated per prompt.
        max_examples: grade at most this many validation examples (the first ones).
        batch_size: prompts generated together.
    """

    def __init__(
        self,
        answer_column: str = "answer",
        answer_pattern: str = ANSWER_PATTERN,
        max_new_tokens: int = 64,
        max_examples: int = 256,
        batch_size: int = 64,
    ) -> None:
        self.answer_column = answer_column
        self.answer_pattern = re.compile(answer_pattern)
        self.max_new_tokens = max_new_tokens
        self.max_examples = max_examples
        self.batch_size = batch_size

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Grade the model as it starts, so every later value has a step-0 value to compare with."""
        accuracy = self.evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({"val/accuracy": accuracy}, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Grade the model after each validation run (not during the sanity check)."""
        if not trainer.sanity_checking:
            pl_module.log("val/accuracy", self.evaluate(trainer, pl_module), prog_bar=True)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Generate greedily for this rank's share of the prompts and return the accuracy over all ranks."""
        data = trainer.datamodule.datasets.get("val")
        if data is None:
            raise PearError("AnswerAccuracy needs validation data: set data.val_path")
        if self.answer_column not in data.column_names:
            raise PearError(f"AnswerAccuracy: the validation data has no `{self.answer_column}` column")
        tokenizer = trainer.datamodule.tokenizer
        indices = list(range(min(len(data), self.max_examples)))[trainer.global_rank :: trainer.world_size]
        model, was_training = pl_module.model, pl_module.model.training
        model.eval()
        correct = 0
        for start in range(0, len(indices), self.batch_size):
            rows = data.select(indices[start : start + self.batch_size])
            prompts = [ids[:n] for ids, n in zip(rows["input_ids"], rows["prompt_length"])]
            width = max(len(p) for p in prompts)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            out = model.generate(
                input_ids=input_ids.to(pl_module.device),
                attention_mask=attention_mask.to(pl_module.device),
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            completions = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for completion, reference in zip(completions, rows[self.answer_column]):
                match = self.answer_pattern.search(completion)
                correct += bool(match) and match.group(1) == str(reference)
        model.train(was_training)
        totals = torch.tensor([correct, len(indices)], dtype=torch.float64, device=pl_module.device)
        correct_all, count_all = trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        accuracy = correct_all / max(count_all, 1)
        say(trainer, f"step {trainer.global_step}: val/accuracy {accuracy:.3f} ({int(correct_all)}/{int(count_all)})")
        return accuracy

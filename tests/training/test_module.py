"""Same seed, same config: the same loss curve and the same weights, bit for bit, on CPU."""

import lightning as L
import pytest
import torch
from conftest import adamw, demo_rows, fit_quietly, save_tiny_llama, write_jsonl

from pear_lightning import PearDataModule, PearModule
from pear_lightning.strategies import TokenIS


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama with attention dropout, so that a run consumes random numbers in every forward."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-dropout"), tokenizer, attention_dropout=0.2)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """Twelve demo examples with their behaviour log-probs."""
    return write_jsonl(tmp_path_factory.mktemp("determinism") / "train.jsonl", demo_rows(12))


def fit(model_dir, data_path, seed: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Four AdamW steps of TokenIS on shuffled data (two epochs), two micro-batches per step, with dropout:
    the loss of every step and the final weights."""
    L.seed_everything(seed)
    module = PearModule(
        str(model_dir),
        weighting=TokenIS(gamma=0.9),
        optimizer=adamw(1e-3),
    )
    data = PearDataModule(train_path=str(data_path), tokenizer_name_or_path=str(model_dir), batch_size=3)
    losses = []
    record = L.Callback()
    # A step's loss reaches callback_metrics after its last micro-batch: read it as the next step starts.
    record.on_before_zero_grad = lambda trainer, module, optimizer: (
        losses.append(trainer.callback_metrics["train/loss"].item()) if trainer.global_step else None
    )
    trainer = fit_quietly(
        module, data, max_steps=4, accumulate_grad_batches=2, enable_checkpointing=False, callbacks=[record]
    )
    losses.append(trainer.callback_metrics["train/loss"].item())
    return losses, {k: v.detach().clone() for k, v in module.model.named_parameters()}


def test_the_same_seed_gives_the_same_losses_and_weights_bitwise(dropout_model_dir, data_path):
    losses, weights = fit(dropout_model_dir, data_path, seed=0)
    again, weights_again = fit(dropout_model_dir, data_path, seed=0)
    assert len(losses) == 4 and losses == again
    torch.testing.assert_close(weights_again, weights, rtol=0, atol=0)
    # ...and the seed matters (shuffling and dropout), so the equality above is not vacuous.
    other, _ = fit(dropout_model_dir, data_path, seed=1)
    assert other != losses

"""The loss of a batch: UniformSFT is plain causal-LM SFT (Hugging Face's loss and gradients), the weights
normaliser divides by the sum of the weights, and an IS strategy on data without behaviour log-probs stops the run
before its first step."""

import pytest
import torch
from conftest import SMALL_CHATS, assert_refused, collate_examples, collate_with_behavior, fit_args, write_jsonl

from pear_lightning import PearModule
from pear_lightning.strategies import TokenIS


@pytest.fixture(scope="module")
def module(tiny_module):
    return tiny_module


def test_uniform_loss_and_gradients_equal_hugging_face_causal_lm_loss(module, tokenizer):
    batch = collate_examples(tokenizer, SMALL_CHATS)
    assert batch["attention_mask"].sum(1).unique().numel() == 3  # rows of different lengths, so padding exists
    ours = module.loss_terms(batch).mean
    ours_grads = torch.autograd.grad(ours, list(module.model.parameters()))

    labels = batch["input_ids"].masked_fill(~batch["loss_mask"], -100)
    reference = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    reference_grads = torch.autograd.grad(reference, list(module.model.parameters()))

    assert abs(ours.item() - reference.item()) < 1e-6
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_weights_normaliser_divides_by_the_sum_of_weights(tiny_model_dir, tokenizer):
    batch, _ = collate_with_behavior(tokenizer, SMALL_CHATS)
    for normaliser in ("tokens", "weights"):
        module = PearModule(str(tiny_model_dir), weighting=TokenIS(gamma=0.9), loss_normalizer=normaliser)
        module.configure_model()
        terms = module.loss_terms(batch)
        loss, tokens = terms.mean, terms.tokens
        weights = TokenIS(gamma=0.9).weights(tokens)
        weighted_nll = -(weights * tokens.logp).sum()
        denominator = weights.sum() if normaliser == "weights" else tokens.mask.sum()
        torch.testing.assert_close(loss, weighted_nll / denominator)
        assert weights.sum() < tokens.mask.sum()  # so the two normalisers really differ


def test_an_is_strategy_on_data_without_behaviour_logprobs_stops_before_training(run_dir, tiny_model_dir, capsys):
    rows = [{"id": str(i), "prompt": "Compute 1+1.", "completion": "#### 2"} for i in range(8)]
    plain = write_jsonl(run_dir / "plain.jsonl", rows)
    assert_refused(
        fit_args(run_dir, tiny_model_dir, plain, "--model.weighting", "TokenIS"),
        capsys,
        run_dir,
        "weighting TokenIS needs the behaviour policy's log-probs (log π_β of every response token) and the "
        "training data has none: add `token_ids` and `logprobs` columns scored by the model that generated the data "
        "(docs/data.md), or train with UniformSFT or DFT",
    )

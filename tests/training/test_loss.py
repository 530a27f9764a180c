"""UniformSFT is plain causal-LM SFT, and only response tokens carry loss."""

import pytest
import torch
from conftest import conversation

from pear_lightning import PearModule
from pear_lightning.data.collate import collate as collate_rows
from pear_lightning.data.render import tokenize_example
from pear_lightning.strategies import TokenBatch, UniformSFT

EXAMPLES = [
    {"messages": conversation("Compute 1+2.", "1+2=3. #### 3")},
    {"prompt": "Compute 9-8+7-6+5.", "completion": "First, 9-8=1. Then 1+7=8. Next, 8-6=2. 2+5=7. #### 7"},
    {
        "messages": conversation("Hi", "#### 0")
        + [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "ok"}]
    },
]


def collate(tokenizer, examples):
    rows = [{**tokenize_example(example, tokenizer, 256, str(i)), "id": str(i)} for i, example in enumerate(examples)]
    return collate_rows(rows, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def module(tiny_model_dir):
    module = PearModule(str(tiny_model_dir))
    module.configure_model()
    return module


def test_uniform_loss_and_gradients_equal_hugging_face_causal_lm_loss(module, tokenizer):
    batch = collate(tokenizer, EXAMPLES)
    assert batch["attention_mask"].sum(1).unique().numel() == 3  # rows of different lengths, so padding exists
    ours = module.loss_terms(batch).mean
    ours_grads = torch.autograd.grad(ours, list(module.model.parameters()))

    labels = batch["input_ids"].masked_fill(~batch["loss_mask"], -100)
    reference = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    reference_grads = torch.autograd.grad(reference, list(module.model.parameters()))

    assert abs(ours.item() - reference.item()) < 1e-6
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_prompt_and_padding_tokens_get_no_loss_and_no_gradient():
    mask = torch.tensor([[False, False, True, True, False], [False, True, True, True, True]])
    logp = torch.randn(2, 5).clamp(max=-0.01).requires_grad_()
    losses = UniformSFT().token_losses(TokenBatch(logp=logp, mask=mask))
    assert (losses[~mask] == 0).all()
    torch.testing.assert_close(losses[mask], -logp[mask])
    (grad,) = torch.autograd.grad(losses.sum(), logp)
    torch.testing.assert_close(grad, -mask.float())


def with_behavior(tokenizer, examples):
    """Collate ``examples`` with made-up behaviour log-probs (as the join leaves them); return the batch and those
    log-probs."""
    rows, behavior = [], []
    for i, example in enumerate(examples):
        tokens = tokenize_example(example, tokenizer, 256, str(i))
        n = sum(tokens["loss_mask"])
        behavior.append({"id": str(i), "logprobs": [-(i + 1) - k / 100 for k in range(n)]})
        rows.append({**tokens, "id": str(i), "behavior_logp": behavior[-1]["logprobs"]})
    return collate_rows(rows, tokenizer.pad_token_id), behavior


def test_the_weights_normaliser_divides_by_the_sum_of_weights(tiny_model_dir, tokenizer):
    from pear_lightning.strategies import TokenIS

    batch, _ = with_behavior(tokenizer, EXAMPLES)
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

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


def test_padding_does_not_change_an_example_s_token_losses(module, tokenizer):
    alone = module.token_batch(collate(tokenizer, EXAMPLES[:1]))
    padded = module.token_batch(collate(tokenizer, EXAMPLES[:2]))  # the second example is longer
    width = alone.logp.shape[1]
    assert padded.logp.shape[1] > width and not padded.mask[0, width:].any()
    torch.testing.assert_close(padded.logp[0, :width], alone.logp[0], rtol=0, atol=1e-5)
    assert (padded.logp[0, width:] == 0).all()


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


def test_behaviour_logprobs_are_placed_on_the_response_tokens(tokenizer):
    batch, behavior = with_behavior(tokenizer, EXAMPLES)
    for i, row in enumerate(behavior):
        assert batch["behavior_logp"][i][batch["loss_mask"][i]].tolist() == pytest.approx(row["logprobs"])
    assert (batch["behavior_logp"][~batch["loss_mask"]] == 0).all()


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


@pytest.mark.parametrize("chunk_size", [1, 7, 512, "auto"])
def test_chunked_logprobs_and_gradients_equal_the_full_logits_path(tiny_model_dir, tokenizer, chunk_size):
    from pear_lightning.model.logprobs import separable_head, target_logprobs

    module = PearModule(str(tiny_model_dir))
    module.configure_model()
    model = module.model
    assert separable_head(model) is not None
    batch = collate(tokenizer, EXAMPLES)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    weights = torch.rand(batch["input_ids"].shape)
    results = []
    for size in (0, chunk_size):  # 0: the model's own full logits
        logp = target_logprobs(model, inputs, batch["loss_mask"], chunk_size=size)
        grads = torch.autograd.grad((logp * weights).sum(), list(model.parameters()))
        results.append((logp, grads))
    (full, full_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked_grads, full_grads):  # the lm_head gradient is summed chunk by chunk: fp32 reordering
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The reference: log_softmax of the model's own logits, at the next token, on the loss tokens (position 0 has none).
    logits = model(**inputs).logits.float()
    reference = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = torch.nn.functional.pad(reference * batch["loss_mask"][:, 1:], (1, 0))
    torch.testing.assert_close(full.detach(), expected, rtol=1e-5, atol=1e-5)


def test_target_log_softmax_gradient_is_exact():
    from pear_lightning.model.logprobs import TargetLogSoftmax

    logits = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 5, 7])
    # Its hand-written backward (the softmax recomputed) against autograd through the plain fp32 formula.
    (ours,) = torch.autograd.grad((TargetLogSoftmax.apply(logits, targets) * torch.arange(6.0)).sum(), logits)
    plain = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)
    (expected,) = torch.autograd.grad((plain * torch.arange(6.0)).sum(), logits)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "tokens, vocab, itemsize, budget, expected",
    [
        (1000, 1000, 4, 12 * 1000 * 1000, (1000, True)),  # everything fits exactly: one pass, kept
        (1001, 1000, 4, 12 * 1000 * 1000, (1000, False)),  # one more token: chunks of the largest size, recomputed
        (16_384, 151_936, 2, 40 * 2**30, (16_384, True)),  # bf16 logits of 16k tokens in 40 GiB: 8 bytes a logit
        (16_384, 151_936, 2, 4 * 2**30, (3533, False)),
        (16_384, 151_936, 2, 2**20, (128, False)),  # a tiny budget still takes chunks of 128
        (0, 320, 4, 2**30, (1, True)),
    ],
)
def test_auto_chunk_size_keeps_the_logits_when_they_fit_the_budget_else_takes_the_largest_chunk(
    tokens, vocab, itemsize, budget, expected
):
    from pear_lightning.model.logprobs import plan_chunks

    assert plan_chunks(tokens, vocab, itemsize, budget) == expected


def test_auto_chunk_size_under_a_small_budget_chunks_and_still_equals_the_full_path(
    tiny_model_dir, tokenizer, monkeypatch
):
    from pear_lightning.model import logprobs

    module = PearModule(str(tiny_model_dir))
    module.configure_model()
    batch = collate(tokenizer, EXAMPLES)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    vocab = module.model.config.vocab_size
    monkeypatch.setattr(logprobs, "MIN_CHUNK", 1)
    monkeypatch.setattr(logprobs, "CPU_BUDGET_BYTES", 5 * vocab * 12)  # five rows of fp32 logits, grad and softmax
    plans = []
    real_plan = logprobs.plan_chunks
    monkeypatch.setattr(logprobs, "plan_chunks", lambda *args: plans.append(real_plan(*args)) or plans[-1])
    small = logprobs.target_logprobs(module.model, inputs, batch["loss_mask"])
    assert plans == [(5, False)]
    full = logprobs.target_logprobs(module.model, inputs, batch["loss_mask"], chunk_size=0)
    torch.testing.assert_close(small, full, rtol=1e-5, atol=1e-5)


def test_models_with_transformed_logits_take_the_plain_path(tiny_model_dir):
    from pear_lightning.model.logprobs import separable_head

    module = PearModule(str(tiny_model_dir))
    module.configure_model()
    module.model.config.final_logit_softcapping = 30.0  # as Gemma 2: logits are not lm_head(hidden)
    assert separable_head(module.model) is None

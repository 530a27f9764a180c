"""The per-token log-prob path: padding changes no example's log-probs, the chunked path (its own log-softmax backward)
equals the model's full logits in value and gradient, and the chunk size fits a memory budget."""

import pytest
import torch
from conftest import SMALL_CHATS, collate_examples

from pear_lightning import PearModule
from pear_lightning.model import logprobs
from pear_lightning.model.logprobs import TargetLogSoftmax, plan_chunks, separable_head, target_logprobs


@pytest.fixture(scope="module")
def module(tiny_module):
    return tiny_module


def test_padding_does_not_change_an_example_s_token_logprobs(module, tokenizer):
    alone = module.token_batch(collate_examples(tokenizer, SMALL_CHATS[:1]))
    padded = module.token_batch(collate_examples(tokenizer, SMALL_CHATS[:2]))  # the second example is longer
    width = alone.logp.shape[1]
    assert padded.logp.shape[1] > width and not padded.mask[0, width:].any()
    torch.testing.assert_close(padded.logp[0, :width], alone.logp[0], rtol=0, atol=1e-5)
    assert (padded.logp[0, width:] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 7, 512, "auto"])
def test_chunked_logprobs_and_gradients_equal_the_full_logits_path(tiny_model_dir, tokenizer, chunk_size):
    module = PearModule(str(tiny_model_dir))
    module.configure_model()
    model = module.model
    assert separable_head(model) is not None
    batch = collate_examples(tokenizer, SMALL_CHATS)
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
    assert plan_chunks(tokens, vocab, itemsize, budget) == expected


def test_auto_chunk_size_under_a_small_budget_chunks_and_still_equals_the_full_path(
    tiny_model_dir, tokenizer, monkeypatch
):
    module = PearModule(str(tiny_model_dir))
    module.configure_model()
    batch = collate_examples(tokenizer, SMALL_CHATS)
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
    module = PearModule(str(tiny_model_dir))
    module.configure_model()
    module.model.config.final_logit_softcapping = 30.0  # as Gemma 2: logits are not lm_head(hidden)
    assert separable_head(module.model) is None

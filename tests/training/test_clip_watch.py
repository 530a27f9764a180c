"""The clip watch (``training.diagnostics.ClipWatch``): every clip of an IS strategy is watched, the per-token ratio's
and the log-weight's, at both bounds, and the weights' scale; one warning says the numbers, what they mean and what to
change. The two saturation cases: π_β 12 nats below the student on every token, and far above it."""

import warnings

import pytest
import torch
from conftest import adamw, demo_rows, fit_quietly, write_jsonl

from pear_lightning import PearDataModule, PearModule
from pear_lightning.strategies import BlockIS, SequenceIS, TokenBatch, TokenIS
from pear_lightning.training.diagnostics import ClipWatch, clip_message

STRATEGIES = [TokenIS, BlockIS, SequenceIS]
BELOW, ABOVE = -12.0, 0.0  # π_β's log-prob on every response token: far below a fresh student's (~ -5.7), far above


def token_batch(behavior: float) -> TokenBatch:
    """Four rows of 30 loss tokens whose log-probs sit near a fresh student's, and π_β's at ``behavior``."""
    logp = -5.7 + 0.3 * torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    return TokenBatch(logp=logp, mask=torch.ones(4, 30, dtype=torch.bool), behavior_logp=torch.full((4, 30), behavior))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pi_beta_far_below_the_student_names_the_upper_ratio_clip_and_the_weights_scale(strategy):
    weighting, batch = strategy(), token_batch(BELOW)
    means = ClipWatch(0.5).add(weighting.metrics(batch, weighting.weights(batch)), batch.mask.sum(), window=1)
    assert means["log_ratio_at_upper_clip"] == 1.0 and means["log_ratio_at_lower_clip"] == 0.0
    message = clip_message(weighting, means, 0.5, "tokens", "the last 20 optimizer steps")
    drift = (batch.logp - batch.behavior_logp).mean().item()
    assert message.startswith(
        f"{strategy.__name__}: over the last 20 optimizer steps, 100% of the loss tokens had their log-ratio "
        f"log π_θ − log π_β at the upper clip 0.3 and 0% at the lower clip -0.08 (mean log-ratio {drift:+.2f}); "
    )
    assert "π_β gives the data far less probability than the student, so the upper clip" in message
    assert "raise the upper bound of --model.weighting.log_ratio_clip" in message
    assert f"the mean weight was {means['weight_mean']:.3g}." in message
    assert f"the loss and its gradient are {means['weight_mean']:.3g}× those of the same tokens under SFT" in message
    assert "far more probability" not in message


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pi_beta_far_above_the_student_says_the_weights_are_a_length_discount(strategy):
    weighting, batch = strategy(), token_batch(ABOVE)
    means = ClipWatch(0.5).add(weighting.metrics(batch, weighting.weights(batch)), batch.mask.sum(), window=1)
    assert means["log_ratio_at_lower_clip"] == 1.0
    message = clip_message(weighting, means, 0.5, "weights", "the last 20 optimizer steps")
    assert "0% of the loss tokens had their log-ratio log π_θ − log π_β at the upper clip 0.3 and 100% at the lower" in (
        message
    )
    assert (
        "π_β gives the data far more probability than the student, so the weights are only a length discount, "
        "e^(-0.08 × the tokens after each one): lower the bound (--model.weighting.log_ratio_clip '[-1, 0.3]')"
    ) in message
    assert "far less probability" not in message and "those of the same tokens under SFT" not in message


def test_weights_near_one_and_a_threshold_of_one_stay_silent():
    weighting, batch = TokenIS(), token_batch(-5.7)
    metrics, tokens = weighting.metrics(batch, weighting.weights(batch)), batch.mask.sum()
    assert ClipWatch(0.5).add(metrics, tokens, window=1) is None
    far = token_batch(BELOW)
    assert ClipWatch(1.0).add(weighting.metrics(far, weighting.weights(far)), tokens, window=1) is None


def test_the_watch_speaks_once_and_only_at_the_end_of_its_window():
    weighting, batch = TokenIS(), token_batch(BELOW)
    metrics, tokens, watch = weighting.metrics(batch, weighting.weights(batch)), batch.mask.sum(), ClipWatch(0.5)
    assert [watch.add(metrics, tokens, window=3) is not None for _ in range(6)] == [False, False, True] + [False] * 3


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("behavior", "meaning"), [(BELOW, "far less probability"), (ABOVE, "far more probability")])
def test_a_run_whose_weights_a_clip_decides_warns_once(strategy, behavior, meaning, tmp_path, tiny_model_dir):
    rows = demo_rows(16)
    for row in rows:
        row["logprobs"] = [behavior] * len(row["logprobs"])
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    data = PearDataModule(str(train), tokenizer_name_or_path=str(tiny_model_dir), batch_size=4, max_length=96)
    module = PearModule(str(tiny_model_dir), weighting=strategy(), optimizer=adamw(1e-4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_quietly(module, data, max_steps=20, log_every_n_steps=20, enable_checkpointing=False)
    said = [str(w.message) for w in caught if "of the loss tokens had their log-ratio" in str(w.message)]
    assert len(said) == 1 and meaning in said[0]
    assert said[0].startswith(f"{strategy.__name__}: over 1 logging step(s), one every 20 steps, ")

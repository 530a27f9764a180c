"""What a run logs while it trains and what it warns of: the loss every step, the rest (the plain NLL beside the
weighted loss, each strategy's diagnostics) on logging steps only, and a warning when importance weights saturate."""

import csv
import warnings
from collections import Counter

import pytest
import torch
from conftest import DEMO, adamw, demo_rows, fit_args, fit_quietly, run_cli, write_jsonl

from pear_lightning import PearDataModule, PearModule
from pear_lightning.strategies import BlockIS, SequenceIS, TokenBatch, TokenIS
from pear_lightning.training.diagnostics import ClipWatch, clip_message


class CountingTokenIS(TokenIS):
    """TokenIS that counts how often its diagnostics are computed."""

    calls = 0

    def metrics(self, batch, weights):
        CountingTokenIS.calls += 1
        return super().metrics(batch, weights)


@pytest.mark.parametrize(
    "every, accumulate, steps, expected",
    [
        (1, 1, 6, 6),  # every step logs
        (3, 1, 6, 2),  # steps 3 and 6
        (2, 2, 3, 2),  # step 2: both of its micro-batches
        (10, 1, 6, 0),  # no step logs
    ],
)
def test_diagnostics_are_computed_on_logging_steps_only(tiny_model_dir, every, accumulate, steps, expected):
    CountingTokenIS.calls = 0
    data = PearDataModule(
        train_path=str(DEMO / "data" / "train.jsonl"), tokenizer_name_or_path=str(tiny_model_dir), batch_size=4
    )
    module = PearModule(str(tiny_model_dir), weighting=CountingTokenIS())
    fit_quietly(
        module,
        data,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=every,
        enable_checkpointing=False,
    )
    assert CountingTokenIS.calls == expected


def test_the_loss_is_logged_every_step_and_the_rest_on_logging_steps(tiny_model_dir, monkeypatch):
    data = PearDataModule(
        train_path=str(DEMO / "data" / "train.jsonl"), tokenizer_name_or_path=str(tiny_model_dir), batch_size=4
    )
    module = PearModule(str(tiny_model_dir))
    logged = Counter()
    log = module.log

    def counting_log(name, value, *args, **kwargs):
        logged[name] += 1
        assert not isinstance(value, float)  # a float would be copied to the device, waiting for it
        return log(name, value, *args, **kwargs)

    monkeypatch.setattr(module, "log", counting_log)
    fit_quietly(module, data, max_steps=6, log_every_n_steps=3, enable_checkpointing=False)
    on_logging_steps = ("train/skipped_steps", "train/tokens_per_sec", "train/nll", "train/lr")
    assert logged == {"train/loss": 6, **dict.fromkeys(on_logging_steps, 2)}


@pytest.mark.parametrize(
    "every, steps, warns",
    [
        (1, 20, True),  # every step logs: the window is the last 20 optimizer steps
        (10, 10, False),  # the window is 2 logging steps (20 optimizer steps); only 1 so far
        (20, 20, True),  # the window is the one logging step of 20 optimizer steps
    ],
)
def test_the_saturation_warning_reads_the_logging_steps_of_20_optimizer_steps(tiny_model_dir, every, steps, warns):
    # An untrained model's log-probs sit far below the behaviour's: every clipped suffix sum reaches the lower bound
    # of -0.01, so all loss tokens but each sequence's last are at a clip bound.
    data = PearDataModule(
        train_path=str(DEMO / "data" / "train.jsonl"), tokenizer_name_or_path=str(tiny_model_dir), batch_size=4
    )
    module = PearModule(str(tiny_model_dir), weighting=TokenIS(log_weight_clip=(-0.01, 5.0)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_quietly(module, data, max_steps=steps, log_every_n_steps=every, enable_checkpointing=False)
    saturated = [str(w.message) for w in caught if "weights are saturated" in str(w.message)]
    assert len(saturated) == warns
    if warns:
        seen = "the last 20 optimizer steps" if every == 1 else "1 logging step(s), one every 20 steps"
        assert f"over {seen}" in saturated[0] and "at the lower bound -0.01" in saturated[0]


def logged(run_dir, name: str) -> list[dict[str, float]]:
    """The training rows of one CSV-logged run's metrics.csv (the only version under ``runs/<name>``)."""
    (version,) = (run_dir / "runs" / name).iterdir()
    with open(version / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    return [row for row in rows if "train/loss" in row]


@pytest.mark.parametrize("weighting", ["UniformSFT", "TokenIS"])
def test_train_nll_is_the_unweighted_token_mean_nll(weighting, run_dir, tiny_model_dir, capsys):
    """UniformSFT's train/loss is the NLL, so train/nll equals it at every step; under TokenIS, at the first step
    (same weights, same batch) train/nll still equals UniformSFT's, while train/loss, weighted, does not."""
    train = write_jsonl(run_dir / "train.jsonl", demo_rows(12))
    args = fit_args(run_dir, tiny_model_dir, train, "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1")
    steps = {}
    for name in dict.fromkeys(("UniformSFT", weighting)):
        code, _, err = run_cli(
            [*args, "--seed_everything", "0", "--model.weighting", name, "--trainer.logger.name", name], capsys
        )
        assert code == 0, err
        steps[name] = logged(run_dir, name)
    uniform, weighted = steps["UniformSFT"], steps[weighting]
    assert len(uniform) == 3 and all(row["train/nll"] == pytest.approx(row["train/loss"], rel=1e-6) for row in uniform)
    assert weighted[0]["train/nll"] == pytest.approx(uniform[0]["train/loss"], rel=1e-5)
    if weighting == "TokenIS":
        assert abs(weighted[0]["train/loss"] - weighted[0]["train/nll"]) > 1e-3


def shifted_rows(shift: float) -> list[dict]:
    """Demo rows with their behaviour log-probs moved by ``shift``."""
    rows = demo_rows(40)
    for row in rows:
        row["logprobs"] = [lp + shift for lp in row["logprobs"]]
    return rows


def fit_token_is(tmp_path, tiny_model_dir, shift: float, steps: int, ratio_clip=(-0.08, 0.3), **module_args):
    train = write_jsonl(tmp_path / f"train{shift}.jsonl", shifted_rows(shift))
    data = PearDataModule(str(train), tokenizer_name_or_path=str(tiny_model_dir), batch_size=2, max_length=96)
    module = PearModule(
        str(tiny_model_dir), weighting=TokenIS(log_ratio_clip=ratio_clip), optimizer=adamw(1e-4), **module_args
    )
    # the watch reads logging steps
    fit_quietly(module, data, max_steps=steps, log_every_n_steps=1, default_root_dir=tmp_path)


def test_saturated_weights_warn_once_with_the_fraction_and_what_to_do(tmp_path, tiny_model_dir):
    """Behaviour log-probs far below the student's put every log-ratio at its upper clip (1 here), so each token's
    suffix sum reaches the log-weight bound 5 five tokens from the end: most tokens sit at the bound."""
    with pytest.warns(UserWarning, match="saturated") as record:
        fit_token_is(tmp_path, tiny_model_dir, shift=-50.0, steps=25, ratio_clip=(-0.08, 1.0))
    (message,) = [str(w.message) for w in record if "saturated" in str(w.message)]
    assert message.startswith("TokenIS: over the last 20 optimizer steps, ")
    assert "at the upper bound 5, a weight of e^5 ≈ 148" in message
    assert "model.loss_normalizer: weights" in message


@pytest.mark.parametrize(("shift", "ratio_clip", "threshold"), [(0.0, (-0.08, 0.3), 0.5), (-50.0, (-0.08, 1.0), 1.0)])
def test_unsaturated_weights_and_a_threshold_of_one_stay_silent(shift, ratio_clip, threshold, tmp_path, tiny_model_dir):
    """The demo's data on a fresh student (log-ratios at the lower clip -0.08, whose suffix sums stay above -10 on
    responses under 125 tokens) does not warn; nor does a saturated run told never to."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_token_is(tmp_path, tiny_model_dir, shift, 25, ratio_clip, saturation_warning=threshold)
    assert not [w for w in caught if "saturated" in str(w.message)]


# The clip watch: every clip of an IS strategy is watched, the per-token ratio's and the log-weight's, at both
# bounds, and the weights' scale; one warning says the numbers, what they mean and what to change. The two
# saturation cases: π_β 12 nats below the student on every token, and far above it.

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
    assert (
        "0% of the loss tokens had their log-ratio log π_θ − log π_β at the upper clip 0.3 and 100% at the lower"
        in (message)
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

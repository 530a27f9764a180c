"""What a run shows and logs while it trains: step-based progress, the plain NLL beside the weighted loss, a
parameter summary, no avoidable warnings, and a warning when importance weights saturate."""

import csv
import sys
import warnings

import pytest
from conftest import REPO, adamw, demo_rows, fit_args, fit_quietly, run_cli, write_jsonl

from pear_lightning import PearDataModule, PearModule
from pear_lightning.strategies import TokenIS

CONFIG_LOGGERS = sorted((REPO / "configs" / "loggers").glob("*.yaml"))


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


def test_the_demo_console_counts_optimizer_steps_and_warns_of_nothing(run_dir, monkeypatch, capsys, caplog):
    """The demo's console: `step N/total` with loss, nll and lr on the bar, one summary line, no epoch counter,
    no v_num, no Lightning module table, and no warning from Lightning, transformers or this package."""
    monkeypatch.setattr(sys, "argv", ["pear_lightning"])
    args = ["fit", "--config", "demo", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]
    args += ["--trainer.callbacks.init_args.max_examples", "4", "--trainer.log_every_n_steps", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(args, capsys)
    assert code == 0, err
    bar = out.replace("\r", "\n")
    bars = [line for line in bar.splitlines() if line.startswith("step ") and "|" in line]
    assert bars[0].startswith("step 0/4 |") and bars[-1].startswith("step 4/4 |")
    assert all(f"{name}=" in bar for name in ("loss", "nll", "lr", "tok/s", "val/loss"))
    assert "Epoch" not in bar and "v_num" not in bar and "Total params" not in out + err
    assert "model: LlamaForCausalLM, 472,128 parameters; training 472,128 (100.00%, all weights)" in caplog.text
    assert "step 0: val/accuracy" in out and "step 2: val/accuracy" in out
    ours = [w for w in caught if not str(w.filename).startswith(sys.prefix) or "lightning" in str(w.filename)]
    ours += [
        w
        for w in caught
        if issubclass(w.category, FutureWarning | DeprecationWarning) and "transformers" in str(w.filename)
    ]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


@pytest.mark.parametrize("config", CONFIG_LOGGERS, ids=lambda p: p.name)
def test_logger_snippets_layer_on_a_run_config_and_keep_the_csv(config, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(REPO)
    code, out, err = run_cli(["fit", "--config", "demo", "--config", str(config), "--print_config"], capsys)
    assert code == 0, err
    loggers = [logger["class_path"] for logger in yaml.safe_load(out)["trainer"]["logger"]]
    assert loggers[0] == "lightning.pytorch.loggers.CSVLogger" and len(loggers) == 2


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
    fit_quietly(module, data, max_steps=steps, log_every_n_steps=1)  # the watch reads logging steps


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


def test_the_summary_counts_parameters_and_the_lora_share(tmp_path, tiny_model_dir, caplog):
    """One line: every parameter of the model, the trainable ones, and with LoRA the adapters' share."""
    from pear_lightning.model.lora import LoraSettings
    from pear_lightning.training.console import ParameterSummary

    train = write_jsonl(tmp_path / "train.jsonl", demo_rows(4))
    data = PearDataModule(str(train), tokenizer_name_or_path=str(tiny_model_dir), batch_size=2, max_length=96)
    module = PearModule(str(tiny_model_dir), lora=LoraSettings(r=2, target_modules=["q_proj"]), optimizer=adamw(1e-3))
    with caplog.at_level("INFO"):
        fit_quietly(module, data, max_steps=1, callbacks=[ParameterSummary()])
    params = list(module.model.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    assert 0 < trainable < total
    line = f"model: PeftModelForCausalLM (LlamaForCausalLM), {total:,} parameters; training {trainable:,} ({trainable / total:.2%}, LoRA adapters)"
    assert line in caplog.text

"""A config naming a class whose optional package is missing (a TensorBoard or W&B logger, any callback) is one
``error:`` line naming the class and what to install, before anything runs."""

import importlib.util

import pytest
from conftest import GOOD, assert_refused, fit_args, write_jsonl


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_a_logger_whose_package_is_missing_is_one_line_with_the_install_command(run_dir, tiny_model_dir, capsys):
    args = fit_args(run_dir, tiny_model_dir, write_jsonl(run_dir / "train.jsonl", GOOD))
    args[args.index("lightning.pytorch.loggers.CSVLogger")] = "lightning.pytorch.loggers.TensorBoardLogger"
    assert_refused(
        args,
        capsys,
        run_dir,
        "lightning.pytorch.loggers.TensorBoardLogger cannot be built: Neither `tensorboard` nor `tensorboardX` is "
        "available. Try `pip install`ing either; to install: pip install 'tensorboardX' or pip install 'tensorboard'",
    )


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_wandb_logger_without_wandb_is_one_line_with_the_install_command(run_dir, tiny_model_dir, capsys):
    args = fit_args(run_dir, tiny_model_dir, write_jsonl(run_dir / "train.jsonl", GOOD))
    args[args.index("lightning.pytorch.loggers.CSVLogger")] = "lightning.pytorch.loggers.WandbLogger"
    args[args.index("--trainer.logger.save_dir") + 1 :] = args[args.index("--trainer.logger.save_dir") + 2 :]
    del args[args.index("--trainer.logger.save_dir")]
    assert_refused(
        args,
        capsys,
        run_dir,
        "lightning.pytorch.loggers.WandbLogger cannot be built: Requirement 'wandb>=0.12.10' not met; to install: "
        "pip install 'wandb>=0.12.10'",
    )


class WandbLogger:  # stands in for lightning's, whose package is not needed to check the login
    def __init__(self, offline: bool = False) -> None:
        self._offline = offline


def test_an_online_wandb_logger_without_a_login_is_refused_before_the_run(tmp_path, monkeypatch):
    from pear_lightning.cli.preflight import check_service
    from pear_lightning.errors import PearError

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(PearError) as refused:
        check_service(WandbLogger())
    assert str(refused.value) == (
        "trainer.logger (WandbLogger): not logged in to W&B (no WANDB_API_KEY, no api.wandb.ai entry in ~/.netrc): run "
        "`wandb login`, or log offline (--trainer.logger.init_args.offline true, or WANDB_MODE=offline)"
    )
    check_service(WandbLogger(offline=True))  # offline needs no login
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    (tmp_path / ".netrc").chmod(0o600)
    check_service(WandbLogger())

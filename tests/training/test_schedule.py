"""The optimizer and the learning-rate schedule: only trainable parameters are optimised, the schedule steps once per
optimizer step, and a schedule without a length (``pear_lightning.OneCycleLR``) lasts the run."""

import torch
from conftest import GOOD, fit_args, run_cli, write_jsonl

from pear_lightning import PearModule


def test_only_trainable_parameters_are_optimised(tiny_model_dir):
    module = PearModule(
        str(tiny_model_dir),
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
        lr_scheduler={"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"total_iters": 3}},
    )
    module.configure_model()
    module.model.get_input_embeddings().weight.requires_grad_(False)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.5
    assert optimised == trainable and len(trainable) == len(list(module.parameters())) - 1
    assert config["lr_scheduler"]["interval"] == "step"


def test_a_schedule_without_a_length_lasts_the_run(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    schedule = ["--lr_scheduler", "pear_lightning.OneCycleLR"]
    code, _, err = run_cli(fit_args(run_dir, tiny_model_dir, path, "--trainer.max_steps", "3", *schedule), capsys)
    assert code == 0, err
    assert [p.name for p in run_dir.glob("runs/**/*.ckpt")] == ["epoch=1-step=3.ckpt"]  # all three steps ran

"""The checks before `fit` starts: a setting that parses but would fail later (after the first step, or after the
last), an output folder that could not be made, and a distillation loss without its teacher cache are refused in one
line before anything trains or is written."""

import json
import shutil

import pytest
from conftest import GOOD, assert_refused, fit_args, fit_on_cache_args, write_jsonl


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches=0: must be an integer >= 1"),
        (["--trainer.gradient_clip_val", "-1"], "trainer.gradient_clip_val=-1: must be null or >= 0"),
        (["--trainer.log_every_n_steps", "0"], "trainer.log_every_n_steps=0: must be >= 1"),
        (["--optimizer", "AdamW", "--optimizer.lr", "-0.001"], "optimizer: AdamW: Invalid learning rate: -0.001"),
        (["--model.lora.r", "0"], "model.lora.r=0: the adapters' rank must be an integer >= 1"),
        (
            ["--model.lora.target_modules", "[qkv_proj]"],
            "model.lora.target_modules=['qkv_proj']: matches no module of {model}; its linear layers are named "
            "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'] (or use all-linear)",
        ),
        (
            [
                "--trainer.max_steps",
                "5",
                "--lr_scheduler",
                "torch.optim.lr_scheduler.OneCycleLR",
                "--lr_scheduler.max_lr",
                "0.01",
            ]
            + ["--lr_scheduler.total_steps", "3"],
            "lr_scheduler: OneCycleLR lasts total_steps=3 optimizer steps, fewer than trainer.max_steps=5: it would "
            "stop the run with an error after step 3; leave total_steps unset (it is then the run's length) or make it "
            "cover max_steps",
        ),
    ],
    ids=[
        "accumulate-zero",
        "clip-negative",
        "log-every-zero",
        "negative-lr",
        "lora-rank-zero",
        "lora-targets-nothing",
        "schedule-too-short",
    ],
)
def test_a_setting_that_would_fail_later_is_refused_before_the_first_step(
    run_dir, tiny_model_dir, capsys, extra, expected
):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    assert_refused(
        fit_args(run_dir, tiny_model_dir, path, *extra), capsys, run_dir, expected.format(model=tiny_model_dir)
    )
    assert not (run_dir / "runs").exists()


@pytest.mark.parametrize("where", ["logger", "checkpoints"])
def test_an_output_folder_that_cannot_be_made_is_refused_before_the_first_step(run_dir, tiny_model_dir, capsys, where):
    blocker = run_dir / "blocker"
    blocker.write_text("a file where a folder is needed\n")
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    if where == "logger":
        extra, setting, folder = (
            ["--trainer.logger.save_dir", str(blocker / "runs")],
            "trainer.logger (CSVLogger)",
            blocker / "runs" / "lightning_logs" / "version_0",
        )
    else:
        extra = ["--trainer.callbacks", "ModelCheckpoint", "--trainer.callbacks.dirpath", str(blocker / "ckpt")]
        setting, folder = "ModelCheckpoint dirpath", blocker / "ckpt"
    expected = f"{setting}={folder}: {blocker} is a file, so no folder can be made there; choose another place"
    assert_refused(fit_args(run_dir, tiny_model_dir, path, *extra), capsys, run_dir, expected)


def test_kl_without_a_teacher_cache_is_refused_before_training(cache_workdir, teacher_cache, tmp_path, capsys, run_dir):
    behaviour_only = tmp_path / "behaviour-only"
    shutil.copytree(teacher_cache, behaviour_only)
    manifest = json.loads((behaviour_only / "manifest.json").read_text())
    (behaviour_only / "manifest.json").write_text(json.dumps({**manifest, "teacher": None}))
    how = (
        "make the cache with the teacher's top-k log-probs: `python -m pear_lightning cache_logprobs --config <this "
        "run's config> --model.model_name_or_path <behaviour model> --teacher <teacher model> --teacher_top_k 20 "
        "--output <dir>` and set data.logprobs_path to it"
    )
    assert_refused(
        fit_on_cache_args(cache_workdir, behaviour_only, tmp_path, "--model.loss", "kl"),
        capsys,
        tmp_path,
        f"model.loss kl: data.logprobs_path={behaviour_only} holds behaviour log-probs only (it was made without "
        f"--teacher_top_k); {how}",
    )
    no_cache = fit_on_cache_args(cache_workdir, teacher_cache, tmp_path, "--model.loss", "kl")
    del no_cache[no_cache.index("--data.logprobs_path") : no_cache.index("--data.logprobs_path") + 2]
    assert_refused(
        no_cache,
        capsys,
        tmp_path,
        f"model.loss kl: needs the teacher's top-k log-probs and data.logprobs_path is not set; {how}",
    )

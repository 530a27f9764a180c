"""Reliability, second pass: every input checked before the first step, every output writable before the last.

One test (or parametrized case) per kind of mistake, by class; each asserts one `error:` line, exit status 2, and
nothing trained or written. The README's bad-input table lists them.
"""

import errno
import shutil

import lightning as L
import pytest
import torch
from conftest import DEMO, GOOD, assert_refused, demo_rows, fit_args, run_cli, write_jsonl
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy

from pear_lightning.data.render import tokenize_example
from pear_lightning.errors import PearError
from pear_lightning.training.step import check_strategy

REDO = (
    "Re-score the data with `python -m pear_lightning cache_logprobs` and this run's config (same tokenizer, chat "
    "template and max_length), or set data.drop_misaligned true to train without them"
)
MISMATCH = "whose token_ids differ from the trainer's response tokens, or whose logprobs are not one per token"
BAD_VALUES = "with NaN, infinite or positive log-probs (a log-probability is finite and <= 0)"


# 1. Behaviour log-prob columns are checked as data, every row, when the data is loaded.


def shorter(row):
    row["logprobs"] = row["logprobs"][:-3]


def longer(row):
    row["logprobs"] = row["logprobs"] + [-0.5]


def positive(row):
    row["logprobs"][2] = 0.7


def infinite(row):
    row["logprobs"][0] = -1e39  # finite as JSON's float64, -inf as the float32 it is trained with


@pytest.mark.parametrize(
    ("spoil", "clause"),
    [(shorter, MISMATCH), (longer, MISMATCH), (positive, BAD_VALUES), (infinite, BAD_VALUES)],
    ids=["logprobs-shorter-than-token-ids", "logprobs-longer", "positive-logprob", "infinite-logprob"],
)
def test_every_row_of_the_logprob_columns_is_checked_before_training(run_dir, tiny_model_dir, capsys, spoil, clause):
    rows = demo_rows(6, "val")
    spoil(rows[4])  # one bad row among good ones: a batch of 2 would only meet it at step 3
    path = write_jsonl(run_dir / "train.jsonl", rows)
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenIS")
    expected = (
        f"{path}: 1 of 6 examples cannot be joined to their behaviour log-probs: 1 {clause} (first: row 5 (id "
        f"{rows[4]['id']})). {REDO}"
    )
    assert_refused(args, capsys, run_dir, expected)


def test_drop_misaligned_drops_rows_whose_logprobs_are_cut_short(run_dir):
    from pear_lightning import PearDataModule

    rows = demo_rows(5, "val")
    shorter(rows[2])
    path = write_jsonl(run_dir / "train.jsonl", rows)
    data = PearDataModule(str(path), tokenizer_name_or_path=str(DEMO / "assets" / "student"), drop_misaligned=True)
    data.max_drop_fraction = 0.5
    data.setup("fit")
    assert sorted(data.datasets["train"]["id"]) == sorted(r["id"] for i, r in enumerate(rows) if i != 2)


# 2. Files and checkpoints that are not what they claim.


def not_a_checkpoint(run_dir, how):
    path = run_dir / "spoilt.ckpt"
    if how == "text-file":
        path.write_text("not a checkpoint\n")
    elif how == "empty-file":
        path.write_bytes(b"")
    elif how == "cut-short":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "pytorch-lightning_version": L.__version__}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "folder":
        path.mkdir()
    elif how == "not-lightning":
        torch.save({"weights": torch.zeros(3)}, path)
    elif how == "holds-code":
        torch.save({"state_dict": {}, "pytorch-lightning_version": L.__version__, "x": RunsCode()}, path)
    return path


class RunsCode:
    """Unpickling it would call a function: a checkpoint holding it is never loaded."""

    def __reduce__(self):
        return print, ("this ran",)


CHECKPOINT_PROBLEMS = {
    "text-file": "cannot be read as a checkpoint (",
    "empty-file": "an empty file; ",
    "cut-short": "cannot be read as a checkpoint (",
    "folder": "a folder that holds no checkpoint (no meta.pt); ",
    "not-lightning": "a torch file, but not a checkpoint Lightning wrote (no ('pytorch-lightning_version', 'state_dict')); ",
    "holds-code": "holds objects other than tensors and plain data (print, which could run code when loaded), "
    "so it is not loaded; ",
}


@pytest.mark.parametrize("command", ["fit", "export"])
@pytest.mark.parametrize("how", list(CHECKPOINT_PROBLEMS))
def test_a_checkpoint_that_is_not_one_is_refused_in_one_line(run_dir, tiny_model_dir, capsys, command, how):
    checkpoint = not_a_checkpoint(run_dir, how)
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    if command == "fit":
        args, setting = fit_args(run_dir, tiny_model_dir, path, "--ckpt_path", str(checkpoint)), "--ckpt_path"
    else:
        args = ["export", *fit_args(run_dir, tiny_model_dir, path)[1:], "--checkpoint", str(checkpoint)]
        args, setting = args + ["--output", str(run_dir / "exported")], "--checkpoint"
    code, _, err = run_cli(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: {setting} {checkpoint}: {CHECKPOINT_PROBLEMS[how]}")
    assert errors[0].endswith("give a checkpoint written by fit (a .ckpt file, or the folder a sharded run writes)")
    assert not (run_dir / "runs").exists() and not (run_dir / "exported").exists()


def test_a_data_folder_of_two_formats_is_refused(run_dir, tiny_model_dir, capsys):
    folder = run_dir / "data"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", GOOD[:2])
    from datasets import Dataset

    Dataset.from_list(GOOD[2:]).to_parquet(folder / "part-1.parquet")
    expected = (
        f"{folder}: holds data files of 2 formats (1 json, 1 parquet); only one would be read: keep one format per "
        "data folder (.jsonl/.json or .parquet)"
    )
    assert_refused(fit_args(run_dir, tiny_model_dir, folder), capsys, run_dir, expected)


def test_a_local_model_path_with_a_typo_is_refused_without_asking_the_hub(run_dir, tiny_model_dir, capsys, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for a local path")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    shutil.copytree(tiny_model_dir, run_dir / "models" / "tiny")
    typo = "models/tiyn"  # a hub name has this shape too; `models/` is a local folder, so it is a path
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    monkeypatch.chdir(run_dir)
    assert_refused(fit_args(run_dir, typo, path), capsys, run_dir, f"model.model_name_or_path='{typo}': no such folder")


# 3. Settings that parse but would fail at run time, after training started or ended.


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


def test_a_schedule_without_a_length_lasts_the_run(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    schedule = ["--lr_scheduler", "pear_lightning.OneCycleLR"]
    code, _, err = run_cli(fit_args(run_dir, tiny_model_dir, path, "--trainer.max_steps", "3", *schedule), capsys)
    assert code == 0, err


# 4. Outputs that cannot be written.


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


def test_a_checkpoint_write_that_fails_says_which_file_and_that_the_last_one_is_intact(
    run_dir, tiny_model_dir, capsys, monkeypatch
):
    import pear_lightning.model.checkpoint_io as checkpoint_io

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", disk_full)
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    code, _, err = run_cli(fit_args(run_dir, tiny_model_dir, path), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    checkpoints = run_dir / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    assert errors[0] == (
        f"error: could not write the checkpoint {checkpoints / 'epoch=0-step=1.ckpt'} (No space left on device); the "
        f"previous checkpoint in {checkpoints}, if any, is intact (it is replaced only by a complete new one): free "
        "space there or set another ModelCheckpoint dirpath, then resume with --ckpt_path last"
    )
    assert not list(run_dir.glob("**/*.ckpt")) and not list(run_dir.glob("**/.*.tmp-*"))


# 5. Chat-template edge cases.


def test_a_conversation_that_starts_with_the_assistant_trains_on_its_content_only(tokenizer):
    example = {"messages": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}]}
    tokens = tokenize_example(example, tokenizer, 256, "row 1")
    trained = tokenizer.decode([t for t, m in zip(tokens["input_ids"], tokens["loss_mask"]) if m])
    assert trained == "Hello.<|im_end|>"


def test_a_row_with_messages_and_prompt_is_refused(run_dir, tiny_model_dir, capsys):
    rows = [dict(r) for r in GOOD]
    rows[2]["messages"] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = write_jsonl(run_dir / "train.jsonl", rows)
    expected = (
        f"{path} row 3 (id g2): has both `messages` and `prompt` and `completion`; an example is one or the other: "
        "keep one form per row"
    )
    assert_refused(fit_args(run_dir, tiny_model_dir, path), capsys, run_dir, expected)


def test_a_response_token_at_position_zero_is_not_trained_on(tokenizer):
    no_template = tokenizer.__class__.from_pretrained(DEMO / "assets" / "student")
    no_template.chat_template = None
    tokens = tokenize_example({"prompt": "", "completion": "7+5=12."}, no_template, 64, "row 1")
    assert tokens["untrainable_first"] and not tokens["loss_mask"][0]
    assert tokens["num_loss_tokens"] == len(tokens["input_ids"]) - 1  # the rest and the EOS


# 6. Command edge cases.


def test_cache_logprobs_refuses_an_output_that_is_a_file(run_dir, tiny_model_dir, capsys):
    output = run_dir / "cache"
    output.write_text("")
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = ["cache_logprobs", *fit_args(run_dir, tiny_model_dir, path)[1:], "--output", str(output)]
    assert_refused(args, capsys, run_dir, f"--output {output}: a file; the cache is a folder: choose another name")
    assert output.read_text() == ""


def inspect_args(run_dir, tiny_model_dir, *extra):
    path = write_jsonl(run_dir / "train.jsonl", demo_rows(4, "val"))
    return ["inspect_logprobs", *fit_args(run_dir, tiny_model_dir, path)[1:], *extra]


def test_inspect_logprobs_refuses_zero_examples(run_dir, tiny_model_dir, capsys):
    args = inspect_args(run_dir, tiny_model_dir, "--max_examples", "0")
    assert_refused(args, capsys, run_dir, "--max_examples 0: must be >= 1")


def test_inspect_logprobs_refuses_a_plot_it_could_not_write_before_the_work(run_dir, tiny_model_dir, capsys):
    (run_dir / "blocker").write_text("")
    plot = run_dir / "blocker" / "weights.png"
    args = inspect_args(run_dir, tiny_model_dir, "--plot", str(plot))
    expected = (
        f"--plot={plot.parent}: {run_dir / 'blocker'} is a file, so no folder can be made there; choose another place"
    )
    assert_refused(args, capsys, run_dir, expected)


def test_inspect_logprobs_makes_the_plot_s_folder(run_dir, tiny_model_dir, capsys):
    plot = run_dir / "plots" / "new" / "weights.png"
    code, _, err = run_cli(inspect_args(run_dir, tiny_model_dir, "--plot", str(plot)), capsys)
    assert code == 0, err
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_an_evaluation_command_without_its_data_is_refused(run_dir, tiny_model_dir, capsys, command):
    split = {"validate": "val", "test": "test", "predict": "predict"}[command]
    args = [command, *fit_args(run_dir, tiny_model_dir, write_jsonl(run_dir / "train.jsonl", GOOD))[1:]]
    expected = (
        f"{command}: data.{split}_path is not set, so there is nothing to {command}; give it a .jsonl, .json or "
        ".parquet file or folder"
    )
    assert_refused(args, capsys, run_dir, expected)


# 9. Strategies the step accounting cannot serve.


class OwnStrategy(Strategy):
    """A strategy of the user's own, of no kind the step accounting knows."""


OwnStrategy.__abstractmethods__ = frozenset()  # its methods are never called here


@pytest.mark.parametrize("cls", [DeepSpeedStrategy, OwnStrategy], ids=["deepspeed", "unknown-strategy"])
def test_a_strategy_whose_gradients_are_not_param_grad_is_refused(cls):
    strategy = cls.__new__(cls)  # DeepSpeed need not be installed to be refused
    with pytest.raises(PearError) as err:
        check_strategy(strategy)
    assert str(err.value) == (
        f"trainer.strategy: {cls.__name__} cannot be used: the loss of an optimizer step is normalised by rescaling "
        "the parameters' .grad before the update, and this strategy keeps its gradients elsewhere (the rescale would "
        "silently do nothing); use auto (one device), ddp, fsdp or ModelParallelStrategy (FSDP2)"
    )

"""Checkpoint I/O: a checkpoint is staged beside its target, synced and renamed, so a failed or killed save leaves the
previous one intact; and a `--ckpt_path` or `export --checkpoint` that is not a checkpoint Lightning wrote (or holds
code) is refused in one line before anything is built."""

import errno
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import GOOD, assert_refused, fit_args, run_cli, write_jsonl

from pear_lightning.errors import PearError
from pear_lightning.model.checkpoint_io import AtomicCheckpointIO


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
    # the words between the two parts are torch's own
    assert errors[0].startswith(f"error: {setting} {checkpoint}: {CHECKPOINT_PROBLEMS[how]}")
    assert errors[0].endswith("give a checkpoint written by fit (a .ckpt file, or the folder a sharded run writes)")
    assert not (run_dir / "runs").exists() and not (run_dir / "exported").exists()


def test_a_checkpoint_path_that_names_nothing_is_refused_before_anything_is_written(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    missing = run_dir / "runs" / "version_9" / "checkpoints" / "last.ckpt"
    assert_refused(
        fit_args(run_dir, tiny_model_dir, path, "--ckpt_path", str(missing)),
        capsys,
        run_dir,
        f"--ckpt_path {missing}: file not found; give a checkpoint written by fit (a .ckpt file, or the folder a "
        "sharded run writes), or `last` to resume from the newest one",
    )
    assert not (run_dir / "runs").exists()


def test_a_checkpoint_is_staged_beside_its_target_synced_then_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, target)
    temporary = str(tmp_path / "checkpoints" / f".last.ckpt.tmp-{os.getpid()}")
    assert events == [
        ("fsync", temporary),
        ("replace", temporary, str(target)),
        ("fsync", str(target.parent)),
    ]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(target)["w"], torch.ones(3))


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)

    def torn_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(PearError, match=f"could not write the checkpoint {target} \\(disk full\\); the previous"):
        io.save_checkpoint({"step": 2}, target)
    assert io.load_checkpoint(target) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


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

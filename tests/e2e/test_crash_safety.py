"""Crash safety: a run SIGKILLed at any moment (during a step, during a checkpoint save, during cache_logprobs
scoring or a shard write) resumes, with `--ckpt_path last` or by re-running, to exactly where a run that was
never killed ends. (How each file is staged, synced and renamed: tests/test_atomic.py and
tests/model/test_checkpoint_io.py.)

The kills come from tests/faultpoints.py (a callback named in the runs' config, armed by PEAR_FAULT), so they
land at chosen moments; the `slow` test adds kills from outside at random moments.
"""

import json
import logging.handlers
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO, TESTS, read_cache, write_jsonl

from pear_lightning.cli.commands import main

KILLED = -signal.SIGKILL
RESTORED = "Restored all states from the checkpoint at {}"


@pytest.fixture(scope="module")
def train_path(tmp_path_factory):
    """16 demo examples with their behaviour log-probs: 4 batches of 4 per epoch."""
    rows = [json.loads(line) for line in open(DEMO / "data" / "train.jsonl")][:16]
    return write_jsonl(tmp_path_factory.mktemp("faults") / "train.jsonl", rows)


def write_config(root: Path, model_dir: Path, train_path: Path, max_steps: int) -> Path:
    """A run of TokenIS over the 16 examples with a schedule, saving last.ckpt after every step."""
    config = {
        "seed_everything": 0,
        "model": {
            "model_name_or_path": str(model_dir),
            "weighting": {"class_path": "TokenIS", "init_args": {"gamma": 0.9}},
        },
        "data": {"train_path": str(train_path), "batch_size": 4, "max_length": 64},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
        "lr_scheduler": {
            "class_path": "torch.optim.lr_scheduler.LinearLR",
            "init_args": {"start_factor": 0.1, "total_iters": max_steps},
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "checkpoints"),
                        "every_n_train_steps": 1,
                        "save_top_k": 0,
                        "save_last": True,
                    },
                },
                {"class_path": "faultpoints.KillSwitch"},
            ],
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


class Run:
    """``python -m pear_lightning <args>`` in a subprocess, armed with ``fault`` (see tests/faultpoints.py)."""

    count = 0

    def __init__(self, args: list[str], fault: str = "") -> None:
        Run.count += 1
        self.log = Path(args[args.index("--config") + 1]).parent / f"run-{Run.count}.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "PEAR_FAULT": fault,
            "OMP_NUM_THREADS": "1",  # several runs share the cores; one thread each is also the fastest here
        }
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pear_lightning", *args], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait(self) -> tuple[int, str]:
        """The exit status (-9 when killed) and the output."""
        code = self.process.wait(timeout=300)
        return code, self.log.read_text()


def fit(config: Path, fault: str = "", resume: bool = False) -> Run:
    return Run(["fit", "--config", str(config), *(["--ckpt_path", "last"] if resume else [])], fault)


def cache_args(config: Path, output: Path) -> list[str]:
    return ["cache_logprobs", "--config", str(config), "--output", str(output), "--shard_size", "4"]


def cache(config: Path, output: Path, fault: str = "") -> Run:
    return Run(cache_args(config, output), fault)


def in_process(args: list[str]) -> tuple[int, str]:
    """Run the command in this process, on one thread like the subprocesses (so the numbers match bitwise);
    return its exit status and Lightning's messages."""
    threads, argv, code = torch.get_num_threads(), sys.argv, 0
    messages = logging.handlers.BufferingHandler(capacity=10_000)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(messages)
    torch.set_num_threads(1)
    sys.argv = ["pear_lightning"]
    try:
        main(args)
    except SystemExit as exit:
        code = exit.code
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv
        logger.removeHandler(messages)
    return code, "\n".join(record.getMessage() for record in messages.buffer)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(checkpoint: dict, reference: dict) -> None:
    """Bitwise equal weights, optimizer moments and schedule, at the same step."""
    assert checkpoint["global_step"] == reference["global_step"]
    assert checkpoint["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=0, atol=0, msg=name)
    for ours, theirs in zip(checkpoint["optimizer_states"], reference["optimizer_states"], strict=True):
        for index, state in theirs["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(ours["state"][index][key], value, rtol=0, atol=0)
    assert checkpoint["lr_schedulers"] == reference["lr_schedulers"]


def orphans(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, tiny_model_dir, train_path):
    """Runs killed and resumed (two subprocesses at a time), and the same runs never killed (in this process).

    fit: killed during step 5 (last.ckpt is step 4, the end of epoch 0) -> resumed with --ckpt_path last and
    killed while writing the checkpoint of step 7 (last.ckpt stays step 6, inside epoch 1) -> resumed to step 10.
    cache_logprobs (4 shards of 4): killed while writing shard 2 -> re-run, killed while scoring shard 4 ->
    re-run to the end.
    """
    root = tmp_path_factory.mktemp("killed")
    reference = write_config(root / "reference", tiny_model_dir, train_path, max_steps=10)
    killed = write_config(root / "killed", tiny_model_dir, train_path, max_steps=10)
    last = root / "killed" / "checkpoints" / "last.ckpt"
    out = {"root": root, "last": last, "reference_cache_folder": root / "reference-cache", "cache": root / "cache"}

    phase = [fit(killed, fault="step:5"), cache(killed, out["cache"], fault="shard:2")]
    # Meanwhile the references, in this process (each subprocess spends most of its time importing).
    out["reference"] = in_process(["fit", "--config", str(reference)])
    out["reference_cache"] = in_process(cache_args(reference, out["reference_cache_folder"]))
    out["phase1"] = [run.wait() for run in phase]
    out["last_after_1"] = load(last) if last.exists() else None
    out["cache_after_1"] = sorted(p.name for p in out["cache"].iterdir())

    phase = [fit(killed, fault="save:7", resume=True), cache(killed, out["cache"], fault="predict:3")]
    out["phase2"] = [run.wait() for run in phase]
    out["last_after_2"] = load(last)
    out["checkpoints_after_2"] = sorted(p.name for p in last.parent.iterdir())
    out["cache_after_2"] = sorted(p.name for p in out["cache"].iterdir())

    out["phase3"] = [in_process(["fit", "--config", str(killed), "--ckpt_path", "last"])]
    out["phase3"].append(in_process(cache_args(killed, out["cache"])))
    return out


def test_a_fit_killed_during_a_step_and_during_a_save_resumes_to_the_uninterrupted_result(killed_runs):
    assert killed_runs["reference"][0] == 0
    (code, log), _ = killed_runs["phase1"]
    assert code == KILLED, log
    last = killed_runs["last"]
    assert killed_runs["last_after_1"]["global_step"] == 4  # the step being trained was lost, nothing else

    (code, log), _ = killed_runs["phase2"]
    assert code == KILLED, log
    assert RESTORED.format(last) in log
    assert killed_runs["last_after_2"]["global_step"] == 6  # the checkpoint being written did not replace it
    checkpoints = killed_runs["checkpoints_after_2"]
    assert checkpoints[0].startswith(".last.ckpt.tmp-") and checkpoints[1:] == ["last.ckpt"]  # its torn half

    (code, log), _ = killed_runs["phase3"]
    assert code == 0, log
    assert RESTORED.format(last) in log
    reference = killed_runs["root"] / "reference" / "checkpoints" / "last.ckpt"
    assert_same_training_state(load(last), load(reference))
    assert orphans(last.parent) == []  # the next save of last.ckpt removed the torn one
    assert (last.parent.parent / "config.yaml").is_file() and orphans(last.parent.parent) == []


def test_cache_logprobs_killed_while_writing_and_while_scoring_reruns_to_the_uninterrupted_cache(killed_runs):
    assert killed_runs["reference_cache"][0] == 0
    _, (code, log) = killed_runs["phase1"]
    assert code == KILLED, log
    first = killed_runs["cache_after_1"]  # killed half-way through writing shard 2:
    assert first[0].startswith(".train-00001.parquet.tmp-") and first[1:] == ["progress.json", "train-00000.parquet"]

    _, (code, log) = killed_runs["phase2"]
    assert code == KILLED, log
    assert killed_runs["cache_after_2"] == ["progress.json", *(f"train-0000{k}.parquet" for k in range(3))]

    _, (code, log) = killed_runs["phase3"]
    assert code == 0, log
    cache, reference = killed_runs["cache"], killed_runs["reference_cache_folder"]
    assert read_cache(cache) == read_cache(reference)
    assert json.loads((cache / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in reference.iterdir())  # no leftovers


@pytest.mark.slow
def test_fit_killed_at_random_moments_always_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir, train_path):
    """Kill a 30-step run six times, at random fault points or from outside at a random moment after it has
    written a checkpoint, resuming each time with --ckpt_path last; the last resume runs to the end.
    PEAR_FAULT_SEED replays a sequence (the seed used is in the failure message)."""
    seed = int(os.environ.get("PEAR_FAULT_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    reference = fit(write_config(tmp_path / "reference", tiny_model_dir, train_path, max_steps=30))
    config = write_config(tmp_path / "killed", tiny_model_dir, train_path, max_steps=30)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    history = []
    for _ in range(6):
        step = load(last)["global_step"] if last.exists() else 0
        if step == 30:
            break
        if rng.random() < 0.5:
            fault = f"{rng.choice(['step', 'save', 'rename'])}:{rng.randint(step + 1, min(step + 6, 30))}"
            run = fit(config, fault=fault, resume=True)
        else:
            fault = f"external after {rng.uniform(0, 0.5):.3f} s"
            run = fit(config, resume=True)
            seen = last.stat().st_mtime_ns if last.exists() else None
            deadline = time.time() + 120
            while run.process.poll() is None and time.time() < deadline:  # until it has written a checkpoint
                if last.exists() and last.stat().st_mtime_ns != seen:
                    break
                time.sleep(0.005)
            time.sleep(float(fault.split()[2]))
            run.process.send_signal(signal.SIGKILL)
        code, log = run.wait()
        history.append((step, fault, code))
        assert code in (0, KILLED), f"seed {seed}, {history}: {log}"
    print(f"seed {seed}: (step at start, fault, exit status) {history}")
    assert sum(code == KILLED for _, _, code in history) >= 3, f"seed {seed}, {history}"
    code, log = fit(config, resume=True).wait()
    assert code == 0, f"seed {seed}, {history}: {log}"
    code, log = reference.wait()
    assert code == 0, log
    assert_same_training_state(load(last), load(tmp_path / "reference" / "checkpoints" / "last.ckpt"))
    assert orphans(last.parent) == []


# In-process checks of the pieces.

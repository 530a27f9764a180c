"""Ctrl-C stops every command with one line saying what was kept and how to go on (exit status 130), never a
traceback; a stopped ``generate`` resumes to the same output as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

from conftest import REPO, run_cli, write_jsonl

from pear_lightning.behavior.samplers import TransformersSampler

PROMPTS = [{"id": f"p{i}", "prompt": f"Compute {i}+1."} for i in range(40)]


def generate_args(prompts, output, model) -> list[str]:
    return ["generate", "--model.model_name_or_path", str(model), "--trainer.accelerator", "cpu"] + [
        *("--prompts", str(prompts), "--output", str(output), "--max_new_tokens", "4", "--shard_size", "2"),
        *("--batch_size", "2"),
    ]


def test_ctrl_c_in_generate_is_one_line_and_the_run_resumes(run_dir, tiny_model_dir, capsys, monkeypatch):
    prompts = write_jsonl(run_dir / "prompts.jsonl", PROMPTS[:6])
    sample, calls = TransformersSampler.sample, []

    def interrupted_third_shard(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return sample(self, *args)

    monkeypatch.setattr(TransformersSampler, "sample", interrupted_third_shard)
    code, _, err = run_cli(generate_args(prompts, run_dir / "gen", tiny_model_dir), capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "generate: stopped (Ctrl-C); the finished shards are kept: run the same command again to go on where it stopped"
    )
    assert sorted(p.name for p in (run_dir / "gen").glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    monkeypatch.setattr(TransformersSampler, "sample", sample)
    assert run_cli(generate_args(prompts, run_dir / "gen", tiny_model_dir), capsys)[0] == 0
    assert run_cli(generate_args(prompts, run_dir / "whole", tiny_model_dir), capsys)[0] == 0
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert (run_dir / "gen" / name).read_bytes() == (run_dir / "whole" / name).read_bytes()


def test_a_real_sigint_to_generate_prints_one_line(run_dir, tiny_model_dir):
    prompts = write_jsonl(run_dir / "prompts.jsonl", PROMPTS)
    env = {**os.environ, "PEAR_DEBUG": "0"}
    command = [sys.executable, "-m", "pear_lightning", *generate_args(prompts, run_dir / "gen", tiny_model_dir)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((run_dir / "gen").glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("generate: stopped (Ctrl-C); the finished shards are kept")

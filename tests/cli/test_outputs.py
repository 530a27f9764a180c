"""Every command that writes checks where it writes before it starts: an output that is a file where a folder is
wanted, a path under a file, a place that refuses writes (``/proc``) are each one ``error:`` line naming the setting,
and nothing is written."""

from pathlib import Path

import pytest
from conftest import GOOD, assert_refused, fit_args, run_cli, write_jsonl


def command_args(command: str, run_dir, model, output) -> tuple[list[str], str]:
    """The command line of ``command`` writing to ``output``, and the setting that names it."""
    train = write_jsonl(run_dir / "train.jsonl", [{**row, "token_ids": [7], "logprobs": [-1.0]} for row in GOOD])
    run = fit_args(run_dir, model, train)[1:]
    if command in ("fit", "validate"):
        extra = ["--data.val_path", str(train)] if command == "validate" else []
        return [command, *run, *extra, "--trainer.default_root_dir", str(output)], "trainer.default_root_dir="
    if command == "generate":
        prompts = write_jsonl(run_dir / "prompts.jsonl", [{"id": "p", "prompt": "Compute 1+1."}])
        args = ["--prompts", str(prompts), "--max_new_tokens", "2", "--output", str(output)]
        return ["generate", "--model.model_name_or_path", str(model), *args], "--output="
    if command == "inspect_logprobs":
        return ["inspect_logprobs", *run, "--plot", str(output / "plot.png")], "--plot="
    return [command, *run, "--output", str(output)], "--output="


@pytest.mark.parametrize("command", ["fit", "validate", "generate", "cache_logprobs", "inspect_logprobs"])
def test_an_output_under_a_file_is_refused(command, run_dir, tiny_model_dir, capsys):
    blocker = run_dir / "blocker"
    blocker.write_text("")
    args, setting = command_args(command, run_dir, tiny_model_dir, blocker / "out")
    message = f"{setting}{blocker / 'out'}: {blocker} is a file, so no folder can be made there; choose another place"
    assert_refused(args, capsys, run_dir, message)
    assert blocker.read_text() == ""


@pytest.mark.parametrize("command", ["fit", "validate", "generate", "cache_logprobs", "inspect_logprobs"])
def test_an_output_where_writes_are_refused_is_refused(command, run_dir, tiny_model_dir, capsys):
    args, setting = command_args(command, run_dir, tiny_model_dir, Path("/proc/pear-out"))
    expected = f"{setting}/proc/pear-out: cannot write in /proc"
    code, _, err = run_cli(args, capsys)
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and line.startswith(f"error: {expected}") and line.endswith("; choose another place")


@pytest.mark.parametrize("command", ["generate", "cache_logprobs"])
def test_a_folder_output_that_is_a_file_is_refused(command, run_dir, tiny_model_dir, capsys):
    output = run_dir / "out"
    output.write_text("")
    args, _ = command_args(command, run_dir, tiny_model_dir, output)
    what = "generation" if command == "generate" else "cache"
    assert_refused(args, capsys, run_dir, f"--output {output}: a file; the {what} is a folder: choose another name")
    assert output.read_text() == ""

"""A resumed ``generate`` ends as the uninterrupted run would: every input that changes the samples is recorded in
the folder, and a run with another value of any of them is refused, naming the folder, before it samples."""

import json

import pytest
from conftest import assert_refused, run_cli, write_jsonl

from pear_lightning.data.cache import PROGRESS

PROMPTS = [{"id": f"p{i}", "prompt": f"Compute {i}+1."} for i in range(4)]


def args(prompts, output, model, *extra):
    return ["generate", "--model.model_name_or_path", str(model), "--trainer.accelerator", "cpu"] + [
        *("--prompts", str(prompts), "--output", str(output), "--max_new_tokens", "3", "--shard_size", "2", *extra)
    ]


@pytest.mark.parametrize(
    ("first", "second", "recorded"),
    [
        (["--batch_size", "2"], ["--batch_size", "1"], {"batch_size": 2}),
        ([], ["--model.attn_implementation", "eager"], {"attn_implementation": None}),
        ([], ["--seed", "1"], {"seed": 0}),
    ],
)
def test_resuming_with_an_input_that_changes_the_samples_is_refused(
    first, second, recorded, run_dir, tiny_model_dir, capsys
):
    prompts = write_jsonl(run_dir / "prompts.jsonl", PROMPTS)
    output = run_dir / "gen"
    output.mkdir()
    code = run_cli(args(prompts, run_dir / "whole", tiny_model_dir, *first), capsys)[0]
    assert code == 0
    progress = json.loads((run_dir / "whole" / "manifest.json").read_text())
    assert {k: progress[k] for k in recorded} == recorded
    for key in ("shards", "samples", "kept", "stopped", "cut_at_max_new_tokens"):
        progress.pop(key)
    (output / PROGRESS).write_text(json.dumps(progress))  # a run stopped before its first shard
    assert_refused(
        args(prompts, output, tiny_model_dir, *first, *second),
        capsys,
        run_dir,
        f"--output {output}: holds an unfinished generation for other inputs; delete that folder or choose another "
        "--output",
    )

"""Messages that say what is wrong: a schedule torch cannot compute names its phases, a teacher vocabulary of the
same size names the ids that differ, and a command without resume does not suggest ``last``."""

import pytest
import torch
from conftest import GOOD, fit_args, run_cli, write_jsonl

from pear_lightning.behavior.score import vocabulary_difference
from pear_lightning.errors import PearError
from pear_lightning.training.schedule import build_optimization

SCHEDULE = {"class_path": "pear_lightning.OneCycleLR", "init_args": {"pct_start": 0.1}}


@pytest.mark.parametrize("steps", [10, 11, 500])
def test_a_one_cycle_schedule_whose_warm_up_torch_cannot_compute_says_why(steps):
    params = [torch.nn.Parameter(torch.zeros(1))]
    if steps != 10:
        build_optimization(params, None, SCHEDULE, lambda: steps)
        return
    with pytest.raises(PearError) as refused:
        build_optimization(params, None, SCHEDULE, lambda: steps)
    assert str(refused.value) == (
        "lr_scheduler: OneCycleLR: pct_start 0.1 of 10 steps leaves a phase of 0 steps (warm-up ends at step 0), which "
        "torch's OneCycleLR cannot schedule (it divides by the phase's length): set pct_start to another value (e.g. "
        "0.2) or change trainer.max_steps"
    )


class Vocabulary:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def get_vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)


def test_a_teacher_vocabulary_of_the_same_size_names_the_ids_that_differ():
    run, teacher = Vocabulary(["a", "b", "c", "d"]), Vocabulary(["a", "c", "b", "d"])
    assert (
        vocabulary_difference(teacher, run)
        == "both 4 tokens, but 2 ids map to other strings, e.g. id 1: 'c', the run's 'b'"
    )
    assert vocabulary_difference(Vocabulary(["a"]), run) == "1 tokens, the run's 4"


def test_export_of_a_missing_checkpoint_does_not_suggest_resuming(run_dir, tiny_model_dir, capsys):
    run = fit_args(run_dir, tiny_model_dir, write_jsonl(run_dir / "train.jsonl", GOOD))[1:]
    code, _, err = run_cli(["export", *run, "--checkpoint", "last", "--output", str(run_dir / "model")], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: --checkpoint last: file not found; give a checkpoint written by fit (a .ckpt file, or the folder a "
        "sharded run writes)"
    )

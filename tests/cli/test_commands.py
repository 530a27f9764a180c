"""The command table: `strategies` lists every installed strategy with what it needs and its arguments, and an error
is one line unless `--debug` asks for the traceback."""

import pytest
from conftest import demo_rows, fit_args, write_jsonl

from pear_lightning.cli.commands import main
from pear_lightning.cli.lightning import DEBUG_ENV
from pear_lightning.errors import PearError


def test_strategies_lists_every_builtin_with_its_arguments(capsys):
    main(["strategies"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "needs", "π_β", "from", "arguments"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["BlockIS", "DFT", "SequenceIS", "TokenIS", "TruncatedIS", "UniformSFT"]
    assert rows["BlockIS"].split()[1:4] == ["yes", "pear_lightning", "0.1.0"]
    assert rows["BlockIS"].endswith(
        "block_size=4, gamma=0.999, log_ratio_clip=(-0.08, 0.3), log_weight_clip=(-10.0, 5.0)"
    )
    assert rows["UniformSFT"].split()[1] == "no" and rows["DFT"].split()[1] == "no"


def test_debug_shows_the_traceback_instead_of_one_line(run_dir, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored after the test: --debug sets it for the rest of the process
    path = write_jsonl(run_dir / "train.jsonl", demo_rows(4, "val"))
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenIS", "--model.weighting.gamma", "0")
    with pytest.raises(PearError, match=r"^model.weighting: TokenIS: gamma must be in \(0, 1\], got 0.0 "):
        main(["--debug", *args])

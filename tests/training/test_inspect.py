"""inspect_logprobs: a summary of the behaviour log-probs, the log-ratios and each IS strategy's weights on the data,
and a plot of them; its settings and its plot's folder are checked before the work."""

from conftest import BEHAVIOR, REPO, assert_refused, demo_rows, fit_args, run_cli, write_jsonl

from pear_lightning.cli.commands import main


def test_inspect_logprobs_summarises_the_cache_and_plots_it(cache_workdir, behaviour_cache, tmp_path, capsys, run_dir):
    png = tmp_path / "weights.png"
    args = [
        "inspect_logprobs",
        *("--config", str(REPO / "configs" / "demo.yaml"), "--model.model_name_or_path", str(BEHAVIOR)),
        *("--data.train_path", str(cache_workdir / "train.jsonl"), "--data.val_path", str(cache_workdir / "val.jsonl")),
        *("--data.logprobs_path", str(behaviour_cache), "--plot", str(png)),
    ]
    main(args)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"120 examples of {cache_workdir / 'train.jsonl'}, π_θ = {BEHAVIOR}"
    rows = {line[:22].strip(): line[22:].split() for line in out[2:7]}
    assert set(rows) == {"log π_β", "δ = log π_θ − log π_β", "weight SequenceIS", "weight TokenIS", "weight BlockIS"}
    assert all(abs(float(v)) < 1e-5 for v in rows["δ = log π_θ − log π_β"][1:])  # π_θ = π_β: every δ is 0
    assert png.stat().st_size > 10_000


def test_inspect_logprobs_refuses_data_without_behaviour_logprobs(tmp_path, capsys, run_dir):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"id": "a", "prompt": "Compute 1+1.", "completion": "#### 2"}])
    args = ["inspect_logprobs", "--config", str(REPO / "configs" / "demo.yaml")]
    args += ["--data.train_path", str(plain), "--data.val_path", str(plain)]
    assert_refused(
        args,
        capsys,
        run_dir,
        f"{plain}: has no behaviour log-probs to inspect: set data.logprobs_path to a cache made by "
        "`python -m pear_lightning cache_logprobs`, or give the data `token_ids` and `logprobs` columns",
    )


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

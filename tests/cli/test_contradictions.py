"""Settings that contradict what the data or a checkpoint records, or that cannot apply, are refused on every path,
one line each, before anything is trained or written; a setting that silently wins over the data is said."""

import json

from conftest import GOOD, assert_refused, demo_rows, fit_args, run_cli, write_jsonl

PROMPTS = [{"id": f"p{i}", "prompt": f"Compute {i}+1."} for i in range(4)]


def test_fit_on_a_generate_folder_refuses_a_contradicting_data_sampling_without_a_cache(
    run_dir, tiny_model_dir, capsys
):
    prompts, gen = write_jsonl(run_dir / "prompts.jsonl", PROMPTS), run_dir / "gen"
    generate = ["generate", "--model.model_name_or_path", str(tiny_model_dir), "--trainer.accelerator", "cpu"]
    assert (
        run_cli([*generate, "--prompts", str(prompts), "--output", str(gen), "--max_new_tokens", "3"], capsys)[0] == 0
    )
    args = fit_args(run_dir, tiny_model_dir, gen, "--data.sampling.temperature", "0.7")
    assert_refused(
        args,
        capsys,
        run_dir,
        f"data.sampling (temperature 0.7) contradicts {gen}, whose manifest records it was sampled with temperature 1, "
        "no top-k/top-p/min-p (the raw distribution); leave data.sampling unset for this data",
    )


def test_export_adapter_only_of_a_full_fine_tune_is_refused(run_dir, tiny_model_dir, capsys):
    train = write_jsonl(run_dir / "train.jsonl", GOOD)
    assert run_cli(fit_args(run_dir, tiny_model_dir, train), capsys)[0] == 0
    (checkpoint,) = run_dir.glob("runs/**/*.ckpt")
    args = ["export", *fit_args(run_dir, tiny_model_dir, train)[1:], "--checkpoint", str(checkpoint)]
    code, _, err = run_cli([*args, "--output", str(run_dir / "model"), "--adapter_only", "true"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: --adapter_only: this run fine-tunes every weight (model.lora is not set), so there is no adapter to "
        "write; export without --adapter_only for the full model, or give the LoRA run's config"
    )
    assert not (run_dir / "model").exists()


def test_a_cache_that_wins_over_the_datas_own_logprobs_column_is_said(run_dir, tiny_model_dir, capsys, caplog):
    train = write_jsonl(run_dir / "train.jsonl", demo_rows(4))
    cache = run_dir / "cache"
    run = fit_args(run_dir, tiny_model_dir, train)[1:]
    assert run_cli(["cache_logprobs", *run, "--output", str(cache)], capsys)[0] == 0
    with caplog.at_level("INFO"):
        assert run_cli(fit_args(run_dir, tiny_model_dir, train, "--data.logprobs_path", str(cache)), capsys)[0] == 0
    said = f"train ({train}): its own `logprobs` column is not used: the behaviour log-probs come from "
    assert f"{said}data.logprobs_path={cache}" in caplog.text
    assert json.loads((cache / "manifest.json").read_text())["splits"]["train"]["examples"] == 4


def mixture_args(run_dir, model, command: str) -> list[str]:
    first = write_jsonl(run_dir / "a.jsonl", demo_rows(4))
    second = write_jsonl(run_dir / "b.jsonl", demo_rows(8)[4:])
    args = fit_args(run_dir, model, first)[1:]
    at = args.index("--data.train_path")
    del args[at : at + 2]
    mixture = f"[{{name: a, path: {first}, weight: 1}}, {{name: b, path: {second}, weight: 1}}]"
    return [command, *args, "--data.mixture", mixture]


def test_distillation_on_a_mixture_is_refused_before_training(run_dir, tiny_model_dir, capsys):
    assert_refused(
        [*mixture_args(run_dir, tiny_model_dir, "fit"), "--model.loss", "kl"],
        capsys,
        run_dir,
        "model.loss kl: distillation reads one cache of the teacher's top-k for all the training data, and "
        "data.mixture has a cache per source; train on one source (data.train_path with its data.logprobs_path) or "
        "with model.loss nll",
    )


def test_cache_logprobs_on_a_mixture_says_how_to_score_each_source(run_dir, tiny_model_dir, capsys):
    args = [*mixture_args(run_dir, tiny_model_dir, "cache_logprobs"), "--output", str(run_dir / "cache")]
    assert_refused(
        args,
        capsys,
        run_dir,
        "cache_logprobs: data.mixture has several training sources, each with its own π_β, so each is scored into "
        "its own cache: `python -m pear_lightning cache_logprobs --config <this config> --data.mixture null "
        f"--data.train_path {run_dir / 'a.jsonl'} --output <its cache>` (with that source's data.sampling), then give "
        'the source its logprobs_path (e.g. source "a")',
    )
    assert not (run_dir / "cache").exists()

"""generate: responses with their sampled ids and the log-probs of the distribution that sampled them, equal to what
cache_logprobs scores for them; resumable, verifiable, and trained on as they are."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import BEHAVIOR, REPO, STUDENT, demo_rows, in_process, run_cli, write_jsonl

from pear_lightning import PearDataModule
from pear_lightning.data.cache import PROGRESS
from pear_lightning.data.sources import load_examples
from pear_lightning.demo.task import check_answer
from pear_lightning.errors import PearError
from pear_lightning.sampling import SamplingSettings

SETTINGS = {"t1": [], "t0.7-p0.9": ["--sampling.temperature", "0.7", "--sampling.top_p", "0.9"]}


def generate_args(prompts, output, *extra):
    return [
        "generate",
        *("--model.model_name_or_path", str(BEHAVIOR), "--trainer.accelerator", "cpu"),
        *("--prompts", str(prompts), "--output", str(output), "--n", "2", "--max_new_tokens", "48"),
        *("--shard_size", "6", "--batch_size", "4"),
        *extra,
    ]


def cache_args(data, output, *extra):
    return [
        "cache_logprobs",
        *("--config", str(REPO / "configs" / "demo.yaml"), "--model.model_name_or_path", str(BEHAVIOR)),
        *("--data.train_path", str(data), "--data.val_path", "null", "--output", str(output), *extra),
    ]


def read_rows(folder):
    return [row for f in sorted(folder.glob("part-*.parquet")) for row in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """16 held-out demo problems as chat prompts with their answers."""
    rows = [{"id": r["id"], "messages": r["messages"][:1], "answer": r["answer"]} for r in demo_rows(16, "val")]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def generated(request, prompts, tmp_path_factory):
    """A generate output folder and the cache cache_logprobs makes of it, at each sampling setting."""
    root = tmp_path_factory.mktemp(request.param)
    in_process(generate_args(prompts, root / "gen", *SETTINGS[request.param]))
    in_process(cache_args(root / "gen", root / "cache"))
    return root / "gen", root / "cache"


def test_generate_logprobs_equal_what_cache_logprobs_scores_for_the_same_samples(generated):
    gen, cache = generated
    manifest = json.loads((gen / "manifest.json").read_text())
    assert json.loads((cache / "manifest.json").read_text())["splits"]["train"]["sampling"] == manifest["sampling"]
    rows = {r["id"]: r for r in read_rows(gen)}
    cached = {r["id"]: r for f in sorted(cache.glob("train-*.parquet")) for r in pq.read_table(f).to_pylist()}
    assert sorted(cached) == sorted(rows) and len(rows) == manifest["kept"] == 32
    difference = max(
        np.abs(np.array(rows[i]["logprobs"]) - np.array(cached[i]["logprobs"])).max() for i in sorted(rows)
    )
    assert all(cached[i]["token_ids"] == rows[i]["token_ids"] for i in rows)
    assert difference <= 1e-4
    assert min(lp for r in rows.values() for lp in r["logprobs"]) < -0.1  # sampled, not argmax


def test_generate_writes_ids_text_and_why_each_response_stopped(generated, prompts):
    gen, _ = generated
    manifest = json.loads((gen / "manifest.json").read_text())
    assert [s["prompts"] for s in manifest["shards"]] == [6, 6, 4] and manifest["samples"] == 32
    assert manifest["model"] == str(BEHAVIOR) and manifest["stop_token_ids"] == [2]
    asked = {r["id"]: r for r in map(json.loads, open(prompts))}
    for row in read_rows(gen):
        assert (
            row["id"] == f"{row['prompt_id']}-{row['id'][-1]}"
            and row["messages"] == asked[row["prompt_id"]]["messages"]
        )
        assert row["answer"] == asked[row["prompt_id"]]["answer"] and len(row["logprobs"]) == len(row["token_ids"])
        assert (row["finish_reason"] == "stop") == (row["token_ids"][-1] == 2)


def test_fit_trains_tokenis_on_generate_output_with_no_row_refused(generated, tmp_path, capsys, run_dir):
    gen, cache = generated
    kept = json.loads((gen / "manifest.json").read_text())["kept"]
    for logprobs_path in (None, cache):  # the generator's own log-probs, and the cache's
        data = PearDataModule(train_path=str(gen), tokenizer_name_or_path=str(STUDENT), logprobs_path=logprobs_path)
        data.setup("fit")
        assert len(data.datasets["train"]) == kept and all(data.datasets["train"]["behavior_logp"])
    args = [
        "fit",
        *("--config", "configs/demo.yaml", "--model.weighting", "TokenIS", "--data.train_path", str(gen)),
        *("--data.batch_size", "8", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"),
        *("--trainer.callbacks.init_args.max_examples", "8", "--trainer.logger.init_args.save_dir", str(tmp_path)),
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err


def test_a_resumed_generation_ends_as_an_uninterrupted_one(generated, prompts, tmp_path, capsys, run_dir):
    gen, _ = generated
    resumed = tmp_path / "resumed"
    shutil.copytree(gen, resumed)
    manifest = json.loads((resumed / "manifest.json").read_text())
    (resumed / "manifest.json").unlink()  # killed before the end, with a shard not yet written
    outcome = ("shards", "samples", "kept", "stopped", "cut_at_max_new_tokens")
    (resumed / PROGRESS).write_text(json.dumps({k: v for k, v in manifest.items() if k not in outcome}))
    (resumed / "part-00001.parquet").unlink()
    kept = (resumed / "part-00000.parquet").stat().st_mtime_ns
    sampling = manifest["sampling"]
    extra = ["--sampling.temperature", str(sampling["temperature"]), "--sampling.top_p", str(sampling["top_p"])]
    code, _, err = run_cli(generate_args(prompts, resumed, *extra), capsys)
    assert code == 0, err
    assert read_rows(resumed) == read_rows(gen) and json.loads((resumed / "manifest.json").read_text()) == manifest
    assert (resumed / "part-00000.parquet").stat().st_mtime_ns == kept and not (resumed / PROGRESS).exists()


def test_the_verifier_keeps_exactly_the_correct_responses(prompts, tmp_path, capsys, run_dir):
    """Sampling is seeded per shard, so the verified run is the unverified one, filtered."""
    code, _, err = run_cli(generate_args(prompts, tmp_path / "all", "--sampling.temperature", "1.5"), capsys)
    assert code == 0, err
    verifier = ["--sampling.temperature", "1.5", "--verifier", "pear_lightning.demo.task.check_answer"]
    code, _, err = run_cli(generate_args(prompts, tmp_path / "checked", *verifier), capsys)
    assert code == 0, err
    everything, checked = read_rows(tmp_path / "all"), read_rows(tmp_path / "checked")
    assert checked == [r for r in everything if check_answer(r, r["completion"])]
    assert 0 < len(checked) < len(everything)  # at this temperature the behaviour policy errs
    assert json.loads((tmp_path / "checked" / "manifest.json").read_text())["kept"] == len(checked)


def test_generate_refuses_before_writing_anything(prompts, tmp_path, capsys, run_dir):
    code, _, err = run_cli(generate_args(prompts, tmp_path / "v", "--backend", "vllm"), capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: generate --backend vllm: vLLM is not installed (pip install vllm, on a machine with a GPU); "
        "--backend transformers needs nothing more"
    )
    code, _, err = run_cli(
        generate_args(prompts, tmp_path / "v", "--verifier", "pear_lightning.demo.task.nothing"), capsys
    )
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: --verifier pear_lightning.demo.task.nothing: cannot be used (AttributeError: module "
        "'pear_lightning.demo.task' has no attribute 'nothing'); give a function as module.function taking "
        "(prompt row, completion text) and returning True to keep the response"
    )
    assert not (tmp_path / "v").exists()


def test_a_finished_generation_is_never_overwritten_by_other_inputs(generated, prompts, capsys, run_dir):
    gen, _ = generated
    before = read_rows(gen)
    code, _, err = run_cli(generate_args(prompts, gen, "--n", "3"), capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: --output {gen}: holds a finished generation made from other inputs (model, tokenizer, prompts or "
        "settings); it is left as it is: choose another --output, or delete that folder first"
    )
    assert read_rows(gen) == before


def test_data_sampling_must_agree_with_a_generate_manifest(generated):
    gen, _ = generated
    recorded = json.loads((gen / "manifest.json").read_text())["sampling"]
    other = SamplingSettings(**{**recorded, "temperature": 0.5})
    data = PearDataModule(train_path=str(gen), tokenizer_name_or_path=str(STUDENT), sampling=other)
    with pytest.raises(PearError, match=rf"^data.sampling \(temperature 0.5.*\) contradicts {gen}, whose manifest "):
        data.sampling_of("train")


def test_an_unfinished_generate_folder_is_not_read_as_data(generated, tmp_path):
    gen, _ = generated
    unfinished = tmp_path / "unfinished"
    shutil.copytree(gen, unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").rename(unfinished / PROGRESS)
    with pytest.raises(PearError) as err:
        load_examples(str(unfinished))
    assert str(err.value) == (
        f"{unfinished}: holds an unfinished `generate` output (no manifest.json); run the same generate command "
        "again to finish it"
    )
    assert manifest["kind"] == "generate"

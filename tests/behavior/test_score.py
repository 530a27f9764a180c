"""cache_logprobs writes exactly the behaviour policy's log-probs, resumes, and the join refuses every misfit."""

import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from conftest import BEHAVIOR, DEMO, REPO, STUDENT, assert_refused, run_cli, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_lightning import PearDataModule, PearModule
from pear_lightning.cli.commands import main
from pear_lightning.data.cache import PROGRESS, shard_table

REDO = "re-run `python -m pear_lightning cache_logprobs --config <this run's config> --output {}`"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Small train/val files from the demo data (with their shipped log-probs)."""
    root = tmp_path_factory.mktemp("cache")
    rows = [json.loads(line) for line in open(DEMO / "data" / "val.jsonl")]
    write_jsonl(root / "train.jsonl", rows[:120])
    write_jsonl(root / "val.jsonl", rows[120:150])
    return root


def cache_args(workdir, output, *extra):
    return [
        "cache_logprobs",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--model.model_name_or_path",
        str(BEHAVIOR),
        "--data.train_path",
        str(workdir / "train.jsonl"),
        "--data.val_path",
        str(workdir / "val.jsonl"),
        "--data.batch_size",
        "16",
        "--output",
        str(output),
        "--shard_size",
        "50",
        "--splits",
        "[train,val]",
        *extra,
    ]


@pytest.fixture(scope="module")
def cache(workdir):
    """A cache of train (3 shards) and val (1 shard), made in this process."""
    output = workdir / "cache"
    argv, sys.argv = sys.argv, ["pear_lightning"]
    try:
        main(cache_args(workdir, output))
    finally:
        sys.argv = argv
    return output


def read_cache(folder):
    return {f.name: pq.read_table(f).to_pylist() for f in sorted(folder.glob("*.parquet"))}


def test_the_cache_reproduces_the_shipped_behaviour_logprobs(workdir, cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]["train"]] == [50, 50, 20]
    raw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "order": "transformers"}
    assert all(manifest["splits"][split]["sampling"] == raw for split in ("train", "val"))
    assert manifest["behavior_model"] == str(BEHAVIOR) and manifest["precision"] == "32-true"
    shipped = {r["id"]: r for split in ("train", "val") for r in map(json.loads, open(workdir / f"{split}.jsonl"))}
    cached = [row for rows in read_cache(cache).values() for row in rows]
    assert sorted(r["id"] for r in cached) == sorted(shipped)
    for row in cached:
        assert row["token_ids"] == shipped[row["id"]]["token_ids"]
        torch.testing.assert_close(
            torch.tensor(row["logprobs"]), torch.tensor(shipped[row["id"]]["logprobs"]), rtol=0, atol=1e-5
        )
    assert not (cache / PROGRESS).exists()


def test_behaviour_model_as_student_has_zero_log_ratio_at_step_zero(workdir, cache):
    data = PearDataModule(
        train_path=str(workdir / "train.jsonl"),
        tokenizer_name_or_path=str(BEHAVIOR),
        logprobs_path=str(cache),
        batch_size=40,
    )
    data.setup("fit")
    module = PearModule(str(BEHAVIOR))
    module.configure_model()
    module.eval()
    for batch in data.train_dataloader():
        with torch.no_grad():
            tokens = module.token_batch(batch)
        delta = (tokens.logp - tokens.behavior_logp)[tokens.mask]
        assert delta.abs().max() < 1e-5


def test_an_interrupted_cache_resumes_to_the_same_result(workdir, cache, capsys, run_dir):
    resumed = workdir / "resumed"
    shutil.copytree(cache, resumed)
    manifest = json.loads((resumed / "manifest.json").read_text())
    (resumed / "manifest.json").unlink()  # as if killed before the end:
    (resumed / PROGRESS).write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("shards", "tokens")}))
    (resumed / "train-00001.parquet").unlink()  # a shard never written
    cut = resumed / "train-00002.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a shard cut in half
    kept = (resumed / "train-00000.parquet").stat().st_mtime_ns
    code, _, err = run_cli(cache_args(workdir, resumed), capsys)
    assert code == 0, err
    assert read_cache(resumed) == read_cache(cache)
    assert json.loads((resumed / "manifest.json").read_text()) == manifest
    assert (resumed / "train-00000.parquet").stat().st_mtime_ns == kept  # complete shards are not scored again


def test_a_finished_cache_is_never_overwritten_by_other_inputs(workdir, cache, capsys, run_dir):
    before = read_cache(cache)
    code, _, err = run_cli(cache_args(workdir, cache, "--data.max_length", "40"), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: --output {cache}: holds a finished cache made from other inputs (model, tokenizer, data or "
        "max_length); it is left as it is: choose another --output, or delete that folder first"
    )
    assert read_cache(cache) == before


def test_two_process_ddp_cache_equals_the_one_process_cache(workdir, cache):
    output = workdir / "ddp"
    args = cache_args(
        workdir, output, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pear_lightning", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_cache(output) == read_cache(cache)


# Bad caches: each stops `fit` before its first step with one clear error and exit status 2.


def fit_args(workdir, cache, tmp_path):
    return [
        "fit",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--model.model_name_or_path",
        str(STUDENT),
        "--data.train_path",
        str(workdir / "train.jsonl"),
        "--data.val_path",
        str(workdir / "val.jsonl"),
        "--data.logprobs_path",
        str(cache),
        "--model.weighting",
        "TokenIS",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.default_root_dir",
        str(tmp_path),
    ]


def spoil(cache, tmp_path, shard, change):
    """A copy of the cache whose ``shard`` rows went through ``change`` (the manifest follows the row count)."""
    spoilt = tmp_path / "spoilt"
    shutil.copytree(cache, spoilt)
    rows = pq.read_table(spoilt / shard).to_pylist()
    rows = change(rows)
    pq.write_table(shard_table(rows), spoilt / shard)
    manifest = json.loads((spoilt / "manifest.json").read_text())
    for entry in manifest["shards"]["train"]:
        if entry["file"] == shard:
            entry["rows"] = len(rows)
    (spoilt / "manifest.json").write_text(json.dumps(manifest))
    return spoilt, rows


ADVICE = (
    "Re-score the data with `python -m pear_lightning cache_logprobs` and this run's config (same tokenizer, "
    "chat template and max_length), or set data.drop_misaligned true to train without them"
)


def drop_row(row):
    return None


def bump_token(row):
    row["token_ids"][5] = (row["token_ids"][5] + 1) % 300
    return row


def cut_row(row):
    row["token_ids"], row["logprobs"] = row["token_ids"][:-2], row["logprobs"][:-2]
    return row


def nan_logprob(row):
    row["logprobs"][1] = float("nan")
    return row


MISMATCH = "whose token_ids differ from the trainer's response tokens, or whose logprobs are not one per token"


@pytest.mark.parametrize(
    ("shard", "index", "change", "clause"),
    [
        ("train-00001.parquet", 7, drop_row, "missing from the behaviour log-probs"),
        ("train-00000.parquet", 3, bump_token, MISMATCH),
        ("train-00002.parquet", 0, cut_row, MISMATCH),
        (
            "train-00000.parquet",
            9,
            nan_logprob,
            "with NaN, infinite or positive log-probs (a log-probability is finite and <= 0)",
        ),
    ],
    ids=["id-missing", "token-changed", "row-truncated", "nan-logprob"],
)
def test_a_spoilt_row_stops_training(workdir, cache, tmp_path, capsys, run_dir, shard, index, change, clause):
    spoilt_id = []

    def spoil_one(rows):
        spoilt_id.append(rows[index]["id"])
        changed = change(rows[index])
        return rows[:index] + ([changed] if changed is not None else []) + rows[index + 1 :]

    spoilt, _ = spoil(cache, tmp_path, shard, spoil_one)
    row = 50 * int(shard[len("train-") : -len(".parquet")]) + index + 1  # the data file's row, counted from 1
    assert_refused(
        fit_args(workdir, spoilt, tmp_path),
        capsys,
        tmp_path,
        f"{workdir / 'train.jsonl'} with {spoilt}: 1 of 120 examples cannot be joined to their behaviour "
        f"log-probs: 1 {clause} (first: row {row} (id {spoilt_id[0]})). {ADVICE}",
    )


def test_a_shard_cut_in_half(workdir, cache, tmp_path, capsys, run_dir):
    spoilt = tmp_path / "spoilt"
    shutil.copytree(cache, spoilt)
    shard = spoilt / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_refused(
        fit_args(workdir, spoilt, tmp_path),
        capsys,
        tmp_path,
        f"data.logprobs_path={spoilt}: shard train-00001.parquet is missing, cut short or unreadable; "
        + REDO.format(spoilt),
    )


def test_a_manifest_from_another_tokenizer(workdir, cache, tmp_path, capsys, run_dir):
    spoilt = tmp_path / "spoilt"
    shutil.copytree(cache, spoilt)
    manifest = json.loads((spoilt / "manifest.json").read_text())
    ours, manifest["tokenizer_fingerprint"] = manifest["tokenizer_fingerprint"], "0123456789abcdef"
    (spoilt / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(
        fit_args(workdir, spoilt, tmp_path),
        capsys,
        tmp_path,
        f"data.logprobs_path={spoilt}: made with another tokenizer or chat template (fingerprint "
        f"0123456789abcdef, this run's is {ours}); its token ids would not line up: " + REDO.format(spoilt),
    )


def test_a_cache_made_with_another_chat_template_is_refused(workdir, cache, tmp_path, capsys, run_dir):
    other = tmp_path / "other-template"
    shutil.copytree(STUDENT, other)
    template = (other / "chat_template.jinja").read_text()
    (other / "chat_template.jinja").write_text("You are a calculator.\n" + template)
    args = fit_args(workdir, cache, tmp_path)
    args[args.index(str(STUDENT))] = str(other)
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "made with another tokenizer or chat template" in err.strip().splitlines()[-1]


def test_a_data_file_changed_after_caching(workdir, cache, tmp_path, capsys, run_dir):
    changed = tmp_path / "train.jsonl"
    shutil.copy(workdir / "train.jsonl", changed)
    with open(changed, "a") as f:
        f.write(json.dumps({"id": "new", "prompt": "Compute 1+1.", "completion": "#### 2"}) + "\n")
    args = fit_args(workdir, cache, tmp_path)
    args[args.index(str(workdir / "train.jsonl"))] = str(changed)
    code, _, err = run_cli(args, capsys)
    assert code == 2
    message = err.strip().splitlines()[-1]
    assert message.startswith(
        f"error: data.logprobs_path={cache}: the train data {changed} changed since the cache was "
        f"made from {workdir / 'train.jsonl'} (fingerprint "
    )
    assert message.endswith(REDO.format(cache))


def test_inspect_logprobs_summarises_the_cache_and_plots_it(workdir, cache, tmp_path, capsys, run_dir):
    png = tmp_path / "weights.png"
    args = [
        "inspect_logprobs",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--model.model_name_or_path",
        str(BEHAVIOR),
        "--data.train_path",
        str(workdir / "train.jsonl"),
        "--data.val_path",
        str(workdir / "val.jsonl"),
        "--data.logprobs_path",
        str(cache),
        "--plot",
        str(png),
    ]
    main(args)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"120 examples of {workdir / 'train.jsonl'}, π_θ = {BEHAVIOR}"
    rows = {line[:22].strip(): line[22:].split() for line in out[2:7]}
    assert set(rows) == {"log π_β", "δ = log π_θ − log π_β", "weight SequenceIS", "weight TokenIS", "weight BlockIS"}
    assert all(abs(float(v)) < 1e-5 for v in rows["δ = log π_θ − log π_β"][1:])  # π_θ = π_β: every δ is 0
    assert png.stat().st_size > 10_000


def test_inspect_logprobs_needs_logprobs(tmp_path, capsys, run_dir):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"id": "a", "prompt": "Compute 1+1.", "completion": "#### 2"}])
    code, _, err = run_cli(
        [
            "inspect_logprobs",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--data.train_path",
            str(plain),
            "--data.val_path",
            str(plain),
        ],
        capsys,
    )
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: {plain}: has no behaviour log-probs to inspect: set data.logprobs_path to a cache made by "
        "`python -m pear_lightning cache_logprobs`, or give the data `token_ids` and `logprobs` columns"
    )


def test_a_cache_of_another_sampling_distribution_is_refused(workdir, cache, tmp_path, capsys, run_dir):
    """The cache scored the raw distribution; data declared as sampled at temperature 0.7 must not join it."""
    assert_refused(
        fit_args(workdir, cache, tmp_path) + ["--data.sampling.temperature", "0.7"],
        capsys,
        tmp_path,
        f"data.logprobs_path={cache}: scored the train data under temperature 1, no top-k/top-p/min-p (the raw "
        "distribution), but it was sampled with temperature 0.7; those log-probs are not π_β of this data. Set "
        "data.sampling to how the data was really sampled (a `generate` folder records it) and " + REDO.format(cache),
    )


def test_a_token_outside_the_kept_set_is_one_error_naming_the_example(workdir, tmp_path, capsys, run_dir):
    """Scored as if sampled with top-k 1, every response token that is not the behaviour model's most likely one is
    outside the kept set; the first shard's count and first example are found here with a plain forward pass."""
    model = AutoModelForCausalLM.from_pretrained(BEHAVIOR).eval()
    tokenizer = AutoTokenizer.from_pretrained(BEHAVIOR)
    outside = []
    for row in map(json.loads, list(open(workdir / "train.jsonl"))[:50]):
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row["token_ids"]])).logits[0, len(prompt) - 1 : -1]
        wrong = (logits.argmax(-1) != torch.tensor(row["token_ids"])).nonzero()
        if len(wrong):
            outside.append((row["id"], int(wrong[0]), row["token_ids"][int(wrong[0])]))
    output = tmp_path / "topk1"
    code, _, err = run_cli(cache_args(workdir, output, "--data.sampling.top_k", "1"), capsys)
    assert code == 2 and len(outside) > 1
    first = outside[0]
    assert err.strip().splitlines()[-1] == (
        f"error: {workdir / 'train.jsonl'}: {len(outside)} of 50 examples scored here hold a response token outside "
        f"the kept set of temperature 1, top_k 1 (first: id {first[0]}, response token {first[1]}, id {first[2]}), "
        "so they were not sampled with those settings; set data.sampling to the settings the generator used, or "
        "remove those examples"
    )
    assert not list(output.glob("*.parquet")) and not (output / "manifest.json").exists()

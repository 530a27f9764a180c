"""The behaviour log-prob cache on disk: a cache that cannot be this run's (another tokenizer or chat template,
data changed since, another sampling distribution, a shard cut short) stops `fit` before its first step, with one
line saying how to re-make it."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import REMAKE_CACHE, STUDENT, assert_refused, fit_on_cache_args
from transformers import AutoTokenizer

from pear_lightning.data.cache import data_fingerprint, tokenizer_fingerprint


def cut_in_half(shard):
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return "is missing, cut short or unreadable"


def one_row_short(shard):  # readable, one row short of what the manifest says
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)
    return f"holds {table.num_rows - 1} rows where the manifest records {table.num_rows}"


@pytest.mark.parametrize("spoil", [cut_in_half, one_row_short], ids=["cut-in-half", "a-row-short"])
def test_a_cache_shard_that_is_not_what_its_manifest_records_is_refused(
    spoil, cache_workdir, behaviour_cache, tmp_path, capsys, run_dir
):
    spoilt = tmp_path / "spoilt"
    shutil.copytree(behaviour_cache, spoilt)
    problem = spoil(spoilt / "train-00001.parquet")
    assert_refused(
        fit_on_cache_args(cache_workdir, spoilt, tmp_path),
        capsys,
        tmp_path,
        f"data.logprobs_path={spoilt}: shard train-00001.parquet {problem}; " + REMAKE_CACHE.format(spoilt),
    )


def test_a_cache_made_with_another_tokenizer_is_refused(cache_workdir, behaviour_cache, tmp_path, capsys, run_dir):
    spoilt = tmp_path / "spoilt"
    shutil.copytree(behaviour_cache, spoilt)
    manifest = json.loads((spoilt / "manifest.json").read_text())
    ours, manifest["tokenizer_fingerprint"] = manifest["tokenizer_fingerprint"], "0123456789abcdef"
    (spoilt / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(
        fit_on_cache_args(cache_workdir, spoilt, tmp_path),
        capsys,
        tmp_path,
        f"data.logprobs_path={spoilt}: made with another tokenizer or chat template (fingerprint "
        f"0123456789abcdef, this run's is {ours}); its token ids would not line up: " + REMAKE_CACHE.format(spoilt),
    )


def test_a_cache_made_with_another_chat_template_is_refused(cache_workdir, behaviour_cache, tmp_path, capsys, run_dir):
    other = tmp_path / "other-template"
    shutil.copytree(STUDENT, other)
    template = (other / "chat_template.jinja").read_text()
    (other / "chat_template.jinja").write_text("You are a calculator.\n" + template)
    args = fit_on_cache_args(cache_workdir, behaviour_cache, tmp_path)
    args[args.index(str(STUDENT))] = str(other)
    cached = json.loads((behaviour_cache / "manifest.json").read_text())["tokenizer_fingerprint"]
    ours = tokenizer_fingerprint(AutoTokenizer.from_pretrained(other))
    assert_refused(
        args,
        capsys,
        tmp_path,
        f"data.logprobs_path={behaviour_cache}: made with another tokenizer or chat template (fingerprint "
        f"{cached}, this run's is {ours}); its token ids would not line up: " + REMAKE_CACHE.format(behaviour_cache),
    )


def test_a_data_file_changed_after_caching_is_refused(cache_workdir, behaviour_cache, tmp_path, capsys, run_dir):
    changed = tmp_path / "train.jsonl"
    shutil.copy(cache_workdir / "train.jsonl", changed)
    with open(changed, "a") as f:
        f.write(json.dumps({"id": "new", "prompt": "Compute 1+1.", "completion": "#### 2"}) + "\n")
    args = fit_on_cache_args(cache_workdir, behaviour_cache, tmp_path)
    args[args.index(str(cache_workdir / "train.jsonl"))] = str(changed)
    cached = json.loads((behaviour_cache / "manifest.json").read_text())["splits"]["train"]["data_fingerprint"]
    assert_refused(
        args,
        capsys,
        tmp_path,
        f"data.logprobs_path={behaviour_cache}: the train data {changed} changed since the cache was made from "
        f"{cache_workdir / 'train.jsonl'} (fingerprint {cached}, now {data_fingerprint(str(changed))}); "
        + REMAKE_CACHE.format(behaviour_cache),
    )


def test_a_cache_of_another_sampling_distribution_is_refused(cache_workdir, behaviour_cache, tmp_path, capsys, run_dir):
    """The cache scored the raw distribution; data declared as sampled at temperature 0.7 must not join it."""
    assert_refused(
        fit_on_cache_args(cache_workdir, behaviour_cache, tmp_path, "--data.sampling.temperature", "0.7"),
        capsys,
        tmp_path,
        f"data.logprobs_path={behaviour_cache}: scored the train data under temperature 1, no top-k/top-p/min-p (the "
        "raw distribution), but it was sampled with temperature 0.7; those log-probs are not π_β of this data. Set "
        "data.sampling to how the data was really sampled (a `generate` folder records it) and "
        + REMAKE_CACHE.format(behaviour_cache),
    )

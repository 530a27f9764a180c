"""The teacher's top-k columns of a cache, as the join checks them: a top-k row that is cut short, holds an id outside
the vocabulary (or one twice), or log-probs that are not a distribution with the tail stops `fit` before its first
step, as does a teacher cache shard cut short."""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REMAKE_CACHE, RESCORE, TEACHER_K, assert_refused, fit_on_cache_args


def spoil(cache, root, shard, index, change):
    """A copy of the cache whose row ``index`` of ``shard`` went through ``change`` (same schema); its id."""
    spoilt = root / "spoilt"
    shutil.copytree(cache, spoilt)
    table = pq.read_table(spoilt / shard)
    rows = table.to_pylist()
    change(rows[index])
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), spoilt / shard)
    return spoilt, rows[index]["id"]


def cut_topk(row):
    for column in ("teacher_topk_ids", "teacher_topk_logprobs"):
        row[column] = row[column][:-TEACHER_K]


def set_value(column, position, value):
    def change(row):
        row[column][position] = value(row[column]) if callable(value) else value

    return change


def bump_token(row):
    row["token_ids"][5] = (row["token_ids"][5] + 1) % 300


TOPK_BAD = (
    "whose teacher top-k holds an id outside the teacher's vocabulary or twice at one token, or log-probs that are "
    "NaN, infinite or positive or do not add up to 1 with the tail"
)


@pytest.mark.parametrize(
    ("shard", "index", "change", "clause"),
    [
        ("train-00000.parquet", 3, cut_topk, "whose teacher top-k columns do not hold top_k entries per cached token"),
        ("train-00001.parquet", 7, set_value("teacher_topk_ids", 12, 301), TOPK_BAD),
        ("train-00001.parquet", 0, set_value("teacher_topk_ids", TEACHER_K + 1, lambda ids: ids[TEACHER_K]), TOPK_BAD),
        ("train-00002.parquet", 4, set_value("teacher_topk_logprobs", 2, float("nan")), TOPK_BAD),
        ("train-00000.parquet", 9, set_value("teacher_topk_logprobs", 0, lambda lps: lps[0] + 0.5), TOPK_BAD),
        ("train-00000.parquet", 9, set_value("teacher_tail_logprob", 3, 0.5), TOPK_BAD),
        (
            "train-00002.parquet",
            1,
            bump_token,
            "whose token_ids differ from the trainer's response tokens, or whose logprobs are not one per token",
        ),
    ],
    ids=["topk-row-cut", "id-outside-vocab", "id-twice", "nan-logprob", "mass-not-1", "positive-tail", "token-changed"],
)
def test_a_spoilt_topk_row_stops_training(
    cache_workdir, teacher_cache, tmp_path, capsys, run_dir, shard, index, change, clause
):
    spoilt, spoilt_id = spoil(teacher_cache, tmp_path, shard, index, change)
    row = 50 * int(shard[len("train-") : -len(".parquet")]) + index + 1
    where = f"{cache_workdir / 'train.jsonl'} with {spoilt}"
    why = f"1 {clause} (first: row {row} (id {spoilt_id})). {RESCORE}"
    expected = f"{where}: 1 of 120 examples cannot be joined to their behaviour log-probs: {why}"
    assert_refused(fit_on_cache_args(cache_workdir, spoilt, tmp_path, "--model.loss", "kl"), capsys, tmp_path, expected)


def test_a_teacher_cache_shard_cut_short_stops_training(cache_workdir, teacher_cache, tmp_path, capsys, run_dir):
    spoilt = tmp_path / "spoilt"
    shutil.copytree(teacher_cache, spoilt)
    shard = spoilt / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    expected = f"data.logprobs_path={spoilt}: shard train-00001.parquet is missing, cut short or unreadable; "
    args = fit_on_cache_args(cache_workdir, spoilt, tmp_path, "--model.loss", "kl")
    assert_refused(args, capsys, tmp_path, expected + REMAKE_CACHE.format(spoilt))

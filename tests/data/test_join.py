"""The token-exact join of examples to their behaviour log-probs (the data's own columns, or a cache): every row is
checked when the data loads, a row that does not line up stops the run before its first step (or is dropped and
counted, up to a fraction), and truncation keeps the log-probs of the kept prefix."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import (
    DEMO,
    RESCORE,
    STUDENT,
    assert_refused,
    conversation,
    demo_rows,
    fit_args,
    fit_on_cache_args,
    write_jsonl,
)
from transformers import AutoTokenizer

from pear_lightning import PearDataModule
from pear_lightning.data.cache import data_fingerprint, shard_table, tokenizer_fingerprint
from pear_lightning.errors import PearError

MISMATCH = "whose token_ids differ from the trainer's response tokens, or whose logprobs are not one per token"
BAD_VALUES = "with NaN, infinite or positive log-probs (a log-probability is finite and <= 0)"


def joined(path, **kwargs):
    """Set up a data module on ``path`` and collate all of it into one batch."""
    data = PearDataModule(train_path=str(path), tokenizer_name_or_path=str(STUDENT), batch_size=10_000, **kwargs)
    data.setup("fit")
    return data, next(iter(data.train_dataloader()))


def test_the_demo_data_joins_its_behaviour_logprobs_token_exactly():
    _, batch = joined(DEMO / "data" / "val.jsonl")
    rows = {r["id"]: r for r in map(json.loads, open(DEMO / "data" / "val.jsonl"))}
    assert sorted(batch["ids"]) == sorted(rows)
    for i, ex_id in enumerate(batch["ids"]):
        mask = batch["loss_mask"][i]
        assert batch["input_ids"][i][mask].tolist() == rows[ex_id]["token_ids"]
        assert batch["behavior_logp"][i][mask].tolist() == pytest.approx(rows[ex_id]["logprobs"], abs=1e-7)
        assert (batch["behavior_logp"][i][~mask] == 0).all()


def test_logprobs_that_do_not_line_up_stop_before_training(tmp_path):
    rows = demo_rows(5, "val")
    rows[1]["logprobs"] = rows[1]["logprobs"][:-1]  # one log-prob short of the ids
    # Two assistant turns: the text is rendered, and the ids (of the last turn only) cannot stand for both.
    rows[3]["messages"] = rows[3]["messages"] + rows[3]["messages"]
    # The sampler stopped on <|im_end|> and the dump left it out: it is trained, but the data has no log-prob for it.
    rows[4].update(token_ids=rows[4]["token_ids"][:-1], logprobs=rows[4]["logprobs"][:-1], finish_reason="stop")
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(PearError) as err:
        joined(path)
    assert str(err.value) == (
        f"{path}: 3 of 5 examples cannot be joined to their behaviour log-probs: 3 whose token_ids differ from the "
        "trainer's response tokens, or whose logprobs are not one per token (first: row 2 (id "
        f"{rows[1]['id']}), row 4 (id {rows[3]['id']}), row 5 (id {rows[4]['id']})). {RESCORE}"
    )


def test_nan_logprob_stops_before_training(tmp_path):
    rows = demo_rows(5, "val")
    rows[0]["logprobs"][2] = float("nan")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes NaN, as some generators' dumps do
    with pytest.raises(PearError) as err:
        joined(path)
    assert str(err.value) == (
        f"{path}: 1 of 5 examples cannot be joined to their behaviour log-probs: 1 with NaN, infinite or positive "
        f"log-probs (a log-probability is finite and <= 0) (first: row 1 (id {rows[0]['id']})). {RESCORE}"
    )


def test_misaligned_examples_can_be_dropped_and_counted_up_to_a_fraction(tmp_path, caplog):
    rows = demo_rows(5, "val")
    rows[2]["logprobs"] = rows[2]["logprobs"][1:]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level("INFO"):
        _, batch = joined(path, drop_misaligned=True, max_drop_fraction=0.2)
    assert sorted(batch["ids"]) == sorted(r["id"] for i, r in enumerate(rows) if i != 2)
    assert f"{path}: dropped 1 of 5 examples that cannot be joined" in caplog.text
    with pytest.raises(PearError, match=r"1 of 5 examples cannot be joined, more than data.max_drop_fraction=0.1: "):
        joined(path, drop_misaligned=True, max_drop_fraction=0.1)


def test_logprobs_without_token_ids_are_refused(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "token_ids"} for r in demo_rows(5, "val")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(PearError, match=r"has `logprobs` but no `token_ids`; the behaviour log-probs must come with"):
        joined(path)


def test_truncation_keeps_the_logprobs_of_the_kept_prefix(tmp_path):
    rows = demo_rows(1, "val")
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    _, full = joined(path)
    _, cut = joined(path, max_length=full["input_ids"].shape[1] - 4)
    kept = int(cut["loss_mask"].sum())
    assert kept == int(full["loss_mask"].sum()) - 3  # the 4th token cut is the template's newline
    assert cut["behavior_logp"][0][cut["loss_mask"][0]].tolist() == pytest.approx(rows[0]["logprobs"][:kept])


def test_a_row_whose_text_retokenises_differently_trains_on_its_generator_ids(tmp_path, caplog):
    """The sampler drew "Start" one letter at a time; the text would re-tokenise as one token. The row is trained on
    the drawn ids with their log-probs, where re-tokenising would have refused it."""
    tokenizer = AutoTokenizer.from_pretrained(STUDENT)
    rows = demo_rows(3, "val")
    text = "Start with 2+2=4. #### 4"
    letters = tokenizer.convert_tokens_to_ids(["Ġ" if c == " " else c for c in text]) + [tokenizer.eos_token_id]
    rows[1].update(messages=conversation("Compute 2+2.", text), token_ids=letters, logprobs=[-0.25] * len(letters))
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level("INFO"):
        _, batch = joined(path)
    i = batch["ids"].index(rows[1]["id"])
    assert batch["input_ids"][i][batch["loss_mask"][i]].tolist() == letters
    assert batch["behavior_logp"][i][batch["loss_mask"][i]].tolist() == [-0.25] * len(letters)
    assert f"train ({path}): 3 of 3 examples train on their generator's `token_ids` (not re-tokenised)" in caplog.text


def test_numeric_and_mixed_ids_are_read_as_strings(run_dir):
    rows = [dict(r, id=i) for i, r in enumerate(demo_rows(4, "val"))]
    rows[2]["id"] = "two"  # a JSON reader makes a column of mixed types JSON-typed; it must still join
    data = PearDataModule(
        train_path=str(write_jsonl(run_dir / "train.jsonl", rows)), tokenizer_name_or_path=str(STUDENT)
    )
    data.setup("fit")
    assert sorted(data.datasets["train"]["id"]) == ["0", "1", "3", "two"]
    assert all(data.datasets["train"]["behavior_logp"])  # every example joined to its log-probs


# Every row of the data's own log-prob columns is checked when the data loads: one bad row among good ones stops
# the run before its first step (a batch of 2 would only meet it at step 3).


def shorter(row):
    row["logprobs"] = row["logprobs"][:-3]


def longer(row):
    row["logprobs"] = row["logprobs"] + [-0.5]


def positive(row):
    row["logprobs"][2] = 0.7


def infinite(row):
    row["logprobs"][0] = -1e39  # finite as JSON's float64, -inf as the float32 it is trained with


@pytest.mark.parametrize(
    ("spoil", "clause"),
    [(shorter, MISMATCH), (longer, MISMATCH), (positive, BAD_VALUES), (infinite, BAD_VALUES)],
    ids=["logprobs-shorter-than-token-ids", "logprobs-longer", "positive-logprob", "infinite-logprob"],
)
def test_every_row_of_the_logprob_columns_is_checked_before_training(run_dir, tiny_model_dir, capsys, spoil, clause):
    rows = demo_rows(6, "val")
    spoil(rows[4])
    path = write_jsonl(run_dir / "train.jsonl", rows)
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenIS")
    expected = (
        f"{path}: 1 of 6 examples cannot be joined to their behaviour log-probs: 1 {clause} (first: row 5 (id "
        f"{rows[4]['id']})). {RESCORE}"
    )
    assert_refused(args, capsys, run_dir, expected)


def test_drop_misaligned_drops_rows_whose_logprobs_are_cut_short(run_dir):
    rows = demo_rows(5, "val")
    shorter(rows[2])
    path = write_jsonl(run_dir / "train.jsonl", rows)
    data = PearDataModule(str(path), tokenizer_name_or_path=str(STUDENT), drop_misaligned=True, max_drop_fraction=0.5)
    data.setup("fit")
    assert sorted(data.datasets["train"]["id"]) == sorted(r["id"] for i, r in enumerate(rows) if i != 2)


# A cache's rows are joined the same way: a row missing, changed, cut or NaN stops `fit` before its first step.


def spoil_cache(cache, root, shard, change):
    """A copy of the cache whose ``shard`` rows went through ``change`` (the manifest follows the row count)."""
    spoilt = root / "spoilt"
    shutil.copytree(cache, spoilt)
    rows = change(pq.read_table(spoilt / shard).to_pylist())
    pq.write_table(shard_table(rows), spoilt / shard)
    manifest = json.loads((spoilt / "manifest.json").read_text())
    for entry in manifest["shards"]["train"]:
        if entry["file"] == shard:
            entry["rows"] = len(rows)
    (spoilt / "manifest.json").write_text(json.dumps(manifest))
    return spoilt


def drop_row(row):
    return None


def bump_token(row):
    row["token_ids"][5] = (row["token_ids"][5] + 1) % 300
    return row


def cut_row(row):
    row["token_ids"], row["logprobs"] = row["token_ids"][:-2], row["logprobs"][:-2]
    return row


def extend_row(row):  # a response longer than the trainer's, for an example that was not truncated
    row["token_ids"], row["logprobs"] = row["token_ids"] + [7], row["logprobs"] + [-1.0]
    return row


def nan_logprob(row):
    row["logprobs"][1] = float("nan")
    return row


@pytest.mark.parametrize(
    ("shard", "index", "change", "clause"),
    [
        ("train-00001.parquet", 7, drop_row, "missing from the behaviour log-probs"),
        ("train-00000.parquet", 3, bump_token, MISMATCH),
        ("train-00002.parquet", 0, cut_row, MISMATCH),
        ("train-00001.parquet", 2, extend_row, MISMATCH),
        ("train-00000.parquet", 9, nan_logprob, BAD_VALUES),
    ],
    ids=["id-missing", "token-changed", "row-truncated", "row-longer-not-truncated", "nan-logprob"],
)
def test_a_spoilt_cache_row_stops_training(
    cache_workdir, behaviour_cache, tmp_path, capsys, run_dir, shard, index, change, clause
):
    spoilt_id = []

    def spoil_one(rows):
        spoilt_id.append(rows[index]["id"])
        changed = change(rows[index])
        return rows[:index] + ([changed] if changed is not None else []) + rows[index + 1 :]

    spoilt = spoil_cache(behaviour_cache, tmp_path, shard, spoil_one)
    row = 50 * int(shard[len("train-") : -len(".parquet")]) + index + 1  # the data file's row, counted from 1
    assert_refused(
        fit_on_cache_args(cache_workdir, spoilt, tmp_path),
        capsys,
        tmp_path,
        f"{cache_workdir / 'train.jsonl'} with {spoilt}: 1 of 120 examples cannot be joined to their behaviour "
        f"log-probs: 1 {clause} (first: row {row} (id {spoilt_id[0]})). {RESCORE}",
    )


def test_a_cache_that_lists_an_id_twice_is_refused(run_dir, tiny_model_dir, tokenizer, capsys):
    rows = demo_rows(4, "val")
    path = write_jsonl(run_dir / "train.jsonl", [{k: v for k, v in r.items() if k != "logprobs"} for r in rows])
    cache = run_dir / "cache"
    cache.mkdir()
    scored = [{k: r[k] for k in ("id", "token_ids", "logprobs")} for r in rows]
    pq.write_table(shard_table([*scored, scored[0]]), cache / "train-00000.parquet")  # e.g. two caches merged by hand
    manifest = {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "splits": {"train": {"data_path": str(path), "data_fingerprint": data_fingerprint(str(path))}},
        "shards": {"train": [{"file": "train-00000.parquet", "rows": 5}]},
    }
    (cache / "manifest.json").write_text(json.dumps(manifest))
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenIS", "--data.logprobs_path", str(cache))
    assert_refused(
        args,
        capsys,
        run_dir,
        f"{path} with {cache}: the behaviour log-probs list 1 ids more than once (first: val-00000); each example "
        "needs exactly one row: re-make them with `python -m pear_lightning cache_logprobs`",
    )

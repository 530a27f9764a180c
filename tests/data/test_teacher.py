"""The teacher's top-k in the cache: what cache_logprobs writes (teacher = behaviour model, or another model, fp16),
resume, and the join's refusals of spoilt top-k columns before the first step."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_cache
import torch
from conftest import BEHAVIOR, STUDENT, assert_refused, in_process, run_cli
from test_cache import ADVICE, REDO, read_cache
from test_cache import cache_args as behaviour_cache_args
from test_cache import fit_args as token_is_fit_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_lightning.data.cache import PROGRESS

K = 8
workdir = test_cache.workdir  # the fixture: the same 120 + 30 demo rows


def cache_args(workdir, output, *extra):
    """test_cache's cache (shards of 50: train 50, 50, 20; val 30) with the teacher's top K."""
    return behaviour_cache_args(workdir, output, "--teacher_top_k", str(K), *extra)


@pytest.fixture(scope="module")
def cache(workdir):
    """Teacher = the behaviour model, fp32."""
    in_process(cache_args(workdir, workdir / "cache"))
    return workdir / "cache"


def dense_topk(model_dir, rows, k):
    """Each row's top-k ids, log-probs and tail log-mass at its response tokens, from the model's full logits."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row["token_ids"]])).logits[0, len(prompt) - 1 : -1]
        logp = torch.log_softmax(logits.double(), dim=-1)
        values, ids = logp.topk(k, dim=-1)
        tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
        out[row["id"]] = (ids, values, tail)
    return out


def test_the_cache_holds_the_teachers_topk_and_the_behaviour_logprobs(workdir, cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["teacher"]["model"] == str(BEHAVIOR) == manifest["behavior_model"]
    assert {k: manifest["teacher"][k] for k in ("top_k", "dtype", "vocab_size")} == {
        "top_k": K,
        "dtype": "float32",
        "vocab_size": 301,
    }
    shipped = {r["id"]: r for split in ("train", "val") for r in map(json.loads, open(workdir / f"{split}.jsonl"))}
    reference = dense_topk(BEHAVIOR, shipped.values(), K)
    for row in (r for rows in read_cache(cache).values() for r in rows):
        ids, values, tail = reference[row["id"]]
        n = len(row["token_ids"])
        assert row["token_ids"] == shipped[row["id"]]["token_ids"] and len(row["teacher_topk_ids"]) == n * K
        torch.testing.assert_close(torch.tensor(row["logprobs"]), torch.tensor(shipped[row["id"]]["logprobs"]))
        assert torch.tensor(row["teacher_topk_ids"]).view(n, K).tolist() == ids.tolist()
        cached = torch.tensor(row["teacher_topk_logprobs"], dtype=torch.float64).view(n, K)
        torch.testing.assert_close(cached, values, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            torch.tensor(row["teacher_tail_logprob"], dtype=torch.float64), tail, rtol=1e-5, atol=1e-5
        )


def test_another_teacher_in_fp16_is_recorded_beside_the_behaviour_model(workdir, cache):
    output = workdir / "student-teacher"
    in_process(cache_args(workdir, output, "--teacher", str(STUDENT), "--teacher_dtype", "float16"))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["behavior_model"] == str(BEHAVIOR) and manifest["teacher"]["model"] == str(STUDENT)
    assert manifest["teacher"]["dtype"] == "float16"
    assert manifest["teacher"]["model_config_fingerprint"] != manifest["behavior_model_config_fingerprint"]
    assert pq.read_schema(output / "train-00000.parquet").field("teacher_topk_logprobs").type == pa.list_(pa.float16())
    ours, behaviour_only = read_cache(output), read_cache(cache)
    rows = [json.loads(line) for split in ("train", "val") for line in open(workdir / f"{split}.jsonl")]
    reference = dense_topk(STUDENT, rows, K)
    for name, rows in ours.items():
        for row, same in zip(rows, behaviour_only[name]):
            assert row["logprobs"] == same["logprobs"]  # π_β still from the behaviour model
            ids, values, _ = reference[row["id"]]
            n = len(row["token_ids"])
            cached = torch.tensor(row["teacher_topk_logprobs"], dtype=torch.float64).view(n, K)
            torch.testing.assert_close(cached, values, rtol=1e-3, atol=1e-3)  # fp16: 11 significant bits
            same_ids = torch.tensor(row["teacher_topk_ids"]).view(n, K) == ids
            assert same_ids[:, 0].all()  # the student is nearly uniform: near-ties may swap further down


def test_a_stopped_cache_resumes_to_the_same_teacher_columns(workdir, cache, capsys, run_dir):
    resumed = workdir / "resumed"
    shutil.copytree(cache, resumed)
    manifest = json.loads((resumed / "manifest.json").read_text())
    (resumed / "manifest.json").unlink()
    (resumed / PROGRESS).write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("shards", "tokens")}))
    cut = resumed / "train-00001.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    code, _, err = run_cli(cache_args(workdir, resumed), capsys)
    assert code == 0, err
    assert read_cache(resumed) == read_cache(cache)
    code, _, err = run_cli(cache_args(workdir, resumed, "--teacher_top_k", "4"), capsys)  # other inputs: refused
    assert code == 2 and "holds a finished cache made from other inputs" in err


def test_a_teacher_with_another_vocabulary_is_refused_before_anything_is_written(workdir, tmp_path, capsys, run_dir):
    other = tmp_path / "other-vocab"
    shutil.copytree(STUDENT, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(other)
    code, _, err = run_cli(cache_args(workdir, tmp_path / "out", "--teacher", str(other)), capsys)
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.strip().splitlines()[-1] == (
        f"error: --teacher {other}: its tokenizer's vocabulary (302 tokens) is not the run's (301); distillation "
        "compares the teacher's and the student's probabilities token id by token id, so the teacher must share the "
        "student's tokenizer"
    )


def fit_args(workdir, cache, tmp_path, *extra):
    return [*token_is_fit_args(workdir, cache, tmp_path), "--model.loss", "kl", *extra]


def test_kl_with_token_is_trains_and_logs_the_kl_diagnostics(workdir, cache, tmp_path, capsys, run_dir):
    args = fit_args(workdir, cache, tmp_path, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1")
    code, _, err = run_cli([*args, "--trainer.val_check_interval", "2", "--data.batch_size", "16"], capsys)
    assert code == 0, err
    header = next(tmp_path.glob("demo/version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    for name in ("kl", "kl_max", "teacher_tail_mass", "student_tail_mass", "top1_agreement", "ess"):
        assert f"train/{name}_step" in header


def spoil(cache, tmp_path, shard, index, change):
    """A copy of the cache whose row ``index`` of ``shard`` went through ``change`` (same schema); its id."""
    spoilt = tmp_path / "spoilt"
    shutil.copytree(cache, spoilt)
    table = pq.read_table(spoilt / shard)
    rows = table.to_pylist()
    change(rows[index])
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), spoilt / shard)
    return spoilt, rows[index]["id"]


def cut_topk(row):
    for column in ("teacher_topk_ids", "teacher_topk_logprobs"):
        row[column] = row[column][:-K]


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
        ("train-00001.parquet", 0, set_value("teacher_topk_ids", K + 1, lambda ids: ids[K]), TOPK_BAD),
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
def test_a_spoilt_topk_row_stops_training(workdir, cache, tmp_path, capsys, run_dir, shard, index, change, clause):
    spoilt, spoilt_id = spoil(cache, tmp_path, shard, index, change)
    row = 50 * int(shard[len("train-") : -len(".parquet")]) + index + 1
    where = f"{workdir / 'train.jsonl'} with {spoilt}"
    why = f"1 {clause} (first: row {row} (id {spoilt_id})). {ADVICE}"
    expected = f"{where}: 1 of 120 examples cannot be joined to their behaviour log-probs: {why}"
    assert_refused(fit_args(workdir, spoilt, tmp_path), capsys, tmp_path, expected)


def test_a_cut_shard_stops_training(workdir, cache, tmp_path, capsys, run_dir):
    spoilt = tmp_path / "spoilt"
    shutil.copytree(cache, spoilt)
    shard = spoilt / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    expected = f"data.logprobs_path={spoilt}: shard train-00001.parquet is missing, cut short or unreadable; "
    assert_refused(fit_args(workdir, spoilt, tmp_path), capsys, tmp_path, expected + REDO.format(spoilt))


def test_kl_without_a_teacher_cache_is_refused_before_training(workdir, cache, tmp_path, capsys, run_dir):
    behaviour_only = tmp_path / "behaviour-only"
    shutil.copytree(cache, behaviour_only)
    manifest = json.loads((behaviour_only / "manifest.json").read_text())
    (behaviour_only / "manifest.json").write_text(json.dumps({**manifest, "teacher": None}))
    how = (
        "make the cache with the teacher's top-k log-probs: `python -m pear_lightning cache_logprobs --config <this "
        "run's config> --model.model_name_or_path <behaviour model> --teacher <teacher model> --teacher_top_k 20 "
        "--output <dir>` and set data.logprobs_path to it"
    )
    assert_refused(
        fit_args(workdir, behaviour_only, tmp_path),
        capsys,
        tmp_path,
        f"model.loss kl: data.logprobs_path={behaviour_only} holds behaviour log-probs only (it was made without "
        f"--teacher_top_k); {how}",
    )
    no_cache = fit_args(workdir, cache, tmp_path)
    del no_cache[no_cache.index("--data.logprobs_path") : no_cache.index("--data.logprobs_path") + 2]
    assert_refused(
        no_cache,
        capsys,
        tmp_path,
        f"model.loss kl: needs the teacher's top-k log-probs and data.logprobs_path is not set; {how}",
    )

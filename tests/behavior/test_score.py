"""cache_logprobs: it writes exactly the behaviour policy's log-probs (and, with ``--teacher_top_k``, the teacher's
top-k), resumes to the result of an uninterrupted run, equals itself on two ranks, and refuses data and settings that
cannot be scored before it writes anything."""

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from conftest import (
    BEHAVIOR,
    GOOD,
    REPO,
    STUDENT,
    TEACHER_K,
    assert_refused,
    cache_logprobs_args,
    demo_rows,
    fit_args,
    in_process,
    read_cache,
    run_cli,
    teacher_cache_args,
    write_jsonl,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_lightning import PearDataModule, PearModule
from pear_lightning.data.cache import PROGRESS


def shipped_rows(workdir):
    """The cached data's rows (with their shipped log-probs), by id."""
    return {r["id"]: r for split in ("train", "val") for r in map(json.loads, open(workdir / f"{split}.jsonl"))}


def interrupt(cache, copy):
    """A copy of a finished cache as a killed run leaves it: progress.json instead of manifest.json; its manifest."""
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").unlink()
    (copy / PROGRESS).write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("shards", "tokens")}))
    return manifest


def test_the_cache_reproduces_the_shipped_behaviour_logprobs(cache_workdir, behaviour_cache):
    manifest = json.loads((behaviour_cache / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]["train"]] == [50, 50, 20]
    raw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "order": "transformers"}
    assert all(manifest["splits"][split]["sampling"] == raw for split in ("train", "val"))
    assert manifest["behavior_model"] == str(BEHAVIOR) and manifest["precision"] == "32-true"
    shipped = shipped_rows(cache_workdir)
    cached = [row for rows in read_cache(behaviour_cache).values() for row in rows]
    assert sorted(r["id"] for r in cached) == sorted(shipped)
    for row in cached:
        assert row["token_ids"] == shipped[row["id"]]["token_ids"]
        torch.testing.assert_close(
            torch.tensor(row["logprobs"]), torch.tensor(shipped[row["id"]]["logprobs"]), rtol=0, atol=1e-5
        )
    assert not (behaviour_cache / PROGRESS).exists()


def test_behaviour_model_as_student_has_zero_log_ratio_at_step_zero(cache_workdir, behaviour_cache):
    data = PearDataModule(
        train_path=str(cache_workdir / "train.jsonl"),
        tokenizer_name_or_path=str(BEHAVIOR),
        logprobs_path=str(behaviour_cache),
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


def test_an_interrupted_cache_resumes_to_the_same_result(cache_workdir, behaviour_cache, tmp_path, capsys, run_dir):
    resumed = tmp_path / "resumed"
    manifest = interrupt(behaviour_cache, resumed)
    (resumed / "train-00001.parquet").unlink()  # a shard never written
    cut = resumed / "train-00002.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a shard cut in half
    kept = (resumed / "train-00000.parquet").stat().st_mtime_ns
    code, _, err = run_cli(cache_logprobs_args(cache_workdir, resumed), capsys)
    assert code == 0, err
    assert read_cache(resumed) == read_cache(behaviour_cache)
    assert json.loads((resumed / "manifest.json").read_text()) == manifest
    assert (resumed / "train-00000.parquet").stat().st_mtime_ns == kept  # complete shards are not scored again


def finished_cache(cache):
    return (
        f"--output {cache}: holds a finished cache made from other inputs (model, tokenizer, data or max_length); it "
        "is left as it is: choose another --output, or delete that folder first"
    )


def test_a_finished_cache_is_never_overwritten_by_other_inputs(cache_workdir, behaviour_cache, capsys, run_dir):
    before = read_cache(behaviour_cache)
    args = cache_logprobs_args(cache_workdir, behaviour_cache, "--data.max_length", "40")
    assert_refused(args, capsys, run_dir, finished_cache(behaviour_cache))
    assert read_cache(behaviour_cache) == before


def test_two_process_ddp_cache_equals_the_one_process_cache(cache_workdir, behaviour_cache, tmp_path):
    output = tmp_path / "ddp"
    args = cache_logprobs_args(
        cache_workdir, output, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pear_lightning", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_cache(output) == read_cache(behaviour_cache)


def test_a_token_outside_the_kept_set_is_one_error_naming_the_example(cache_workdir, tmp_path, capsys, run_dir):
    """Scored as if sampled with top-k 1, every response token that is not the behaviour model's most likely one is
    outside the kept set; the first shard's count and first example are found here with a plain forward pass."""
    model = AutoModelForCausalLM.from_pretrained(BEHAVIOR).eval()
    tokenizer = AutoTokenizer.from_pretrained(BEHAVIOR)
    outside = []
    for row in map(json.loads, list(open(cache_workdir / "train.jsonl"))[:50]):
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row["token_ids"]])).logits[0, len(prompt) - 1 : -1]
        wrong = (logits.argmax(-1) != torch.tensor(row["token_ids"])).nonzero()
        if len(wrong):
            outside.append((row["id"], int(wrong[0]), row["token_ids"][int(wrong[0])]))
    output = tmp_path / "topk1"
    code, _, err = run_cli(cache_logprobs_args(cache_workdir, output, "--data.sampling.top_k", "1"), capsys)
    assert code == 2 and len(outside) > 1
    first = outside[0]
    assert err.strip().splitlines()[-1] == (
        f"error: {cache_workdir / 'train.jsonl'}: {len(outside)} of 50 examples scored here hold a response token "
        f"outside the kept set of temperature 1, top_k 1 (first: id {first[0]}, response token {first[1]}, id "
        f"{first[2]}), so they were not sampled with those settings; set data.sampling to the settings the generator "
        "used, or remove those examples"
    )
    assert not list(output.glob("*.parquet")) and not (output / "manifest.json").exists()


def test_duplicate_ids_are_refused_before_a_cache_is_written(run_dir, tiny_model_dir, capsys):
    rows = [{k: v for k, v in r.items() if k not in ("token_ids", "logprobs")} for r in demo_rows(4, "val")]
    rows[3]["id"] = rows[0]["id"]
    path = write_jsonl(run_dir / "train.jsonl", rows)
    output = run_dir / "cache"
    args = ["cache_logprobs", *fit_args(run_dir, tiny_model_dir, path)[1:], "--output", str(output)]
    assert_refused(
        args,
        capsys,
        run_dir,
        f"{path}: 1 ids name more than one example (first: val-00000); behaviour log-probs are matched to examples by "
        "id, so give every example its own `id` (an example without one is named by a hash of its content: remove "
        "exact repeats)",
    )
    assert not output.exists()


def test_cache_logprobs_refuses_an_output_that_is_a_file(run_dir, tiny_model_dir, capsys):
    output = run_dir / "cache"
    output.write_text("")
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = ["cache_logprobs", *fit_args(run_dir, tiny_model_dir, path)[1:], "--output", str(output)]
    assert_refused(args, capsys, run_dir, f"--output {output}: a file; the cache is a folder: choose another name")
    assert output.read_text() == ""


# The teacher's top-k (``--teacher_top_k``), for distillation: by default from the behaviour model, or another
# model with the same tokenizer.


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


def test_the_cache_holds_the_teachers_topk_and_the_behaviour_logprobs(cache_workdir, teacher_cache):
    manifest = json.loads((teacher_cache / "manifest.json").read_text())
    assert manifest["teacher"]["model"] == str(BEHAVIOR) == manifest["behavior_model"]
    assert {k: manifest["teacher"][k] for k in ("top_k", "dtype", "vocab_size")} == {
        "top_k": TEACHER_K,
        "dtype": "float32",
        "vocab_size": 301,
    }
    shipped = shipped_rows(cache_workdir)
    reference = dense_topk(BEHAVIOR, shipped.values(), TEACHER_K)
    for row in (r for rows in read_cache(teacher_cache).values() for r in rows):
        ids, values, tail = reference[row["id"]]
        n = len(row["token_ids"])
        assert row["token_ids"] == shipped[row["id"]]["token_ids"] and len(row["teacher_topk_ids"]) == n * TEACHER_K
        torch.testing.assert_close(torch.tensor(row["logprobs"]), torch.tensor(shipped[row["id"]]["logprobs"]))
        assert torch.tensor(row["teacher_topk_ids"]).view(n, TEACHER_K).tolist() == ids.tolist()
        cached = torch.tensor(row["teacher_topk_logprobs"], dtype=torch.float64).view(n, TEACHER_K)
        torch.testing.assert_close(cached, values, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            torch.tensor(row["teacher_tail_logprob"], dtype=torch.float64), tail, rtol=1e-5, atol=1e-5
        )


def test_another_teacher_in_fp16_is_recorded_beside_the_behaviour_model(cache_workdir, teacher_cache, tmp_path):
    output = tmp_path / "student-teacher"
    in_process(teacher_cache_args(cache_workdir, output, "--teacher", str(STUDENT), "--teacher_dtype", "float16"))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["behavior_model"] == str(BEHAVIOR) and manifest["teacher"]["model"] == str(STUDENT)
    assert manifest["teacher"]["dtype"] == "float16"
    assert manifest["teacher"]["model_config_fingerprint"] != manifest["behavior_model_config_fingerprint"]
    assert pq.read_schema(output / "train-00000.parquet").field("teacher_topk_logprobs").type == pa.list_(pa.float16())
    ours, behaviour_only = read_cache(output), read_cache(teacher_cache)
    rows = [json.loads(line) for split in ("train", "val") for line in open(cache_workdir / f"{split}.jsonl")]
    reference = dense_topk(STUDENT, rows, TEACHER_K)
    for name, rows in ours.items():
        for row, same in zip(rows, behaviour_only[name]):
            assert row["logprobs"] == same["logprobs"]  # π_β still from the behaviour model
            ids, values, _ = reference[row["id"]]
            n = len(row["token_ids"])
            cached = torch.tensor(row["teacher_topk_logprobs"], dtype=torch.float64).view(n, TEACHER_K)
            torch.testing.assert_close(cached, values, rtol=1e-3, atol=1e-3)  # fp16: 11 significant bits
            same_ids = torch.tensor(row["teacher_topk_ids"]).view(n, TEACHER_K) == ids
            assert same_ids[:, 0].all()  # the student is nearly uniform: near-ties may swap further down


def test_a_stopped_teacher_cache_resumes_to_the_same_teacher_columns(
    cache_workdir, teacher_cache, tmp_path, capsys, run_dir
):
    resumed = tmp_path / "resumed"
    interrupt(teacher_cache, resumed)
    cut = resumed / "train-00001.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    code, _, err = run_cli(teacher_cache_args(cache_workdir, resumed), capsys)
    assert code == 0, err
    assert read_cache(resumed) == read_cache(teacher_cache)
    args = teacher_cache_args(cache_workdir, resumed, "--teacher_top_k", "4")  # other inputs: refused
    assert_refused(args, capsys, run_dir, finished_cache(resumed))


def test_a_teacher_with_another_vocabulary_is_refused_before_anything_is_written(
    cache_workdir, tmp_path, capsys, run_dir
):
    other = tmp_path / "other-vocab"
    shutil.copytree(STUDENT, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(other)
    code, _, err = run_cli(teacher_cache_args(cache_workdir, tmp_path / "out", "--teacher", str(other)), capsys)
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.strip().splitlines()[-1] == (
        f"error: --teacher {other}: its tokenizer's vocabulary is not the run's (302 tokens, the run's 301); distillation "
        "compares the teacher's and the student's probabilities token id by token id, so the teacher must share the "
        "student's tokenizer"
    )

"""Bad input, named: every row of the README's bad-input table is one ``error:`` line, exit status 2, nothing written.

Rows backed elsewhere: ids missing from the cache, token mismatch, NaN log-probs, a cache from another tokenizer,
a data file changed since caching, a cache cut short (test_cache.py); an unknown strategy, a missing data file, a
row without prompt/completion, an IS strategy on data without log-probs (test_cli.py).
"""

import json
import re
import shutil
from importlib.metadata import EntryPoint

import lightning as L
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DEMO, GOOD, assert_refused, demo_rows, fit_args, run_cli, write_jsonl
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from pear_lightning import PearDataModule, PearModule
from pear_lightning.cli import plugins
from pear_lightning.cli.commands import main
from pear_lightning.cli.lightning import DEBUG_ENV
from pear_lightning.data.cache import data_fingerprint, shard_table, tokenizer_fingerprint
from pear_lightning.errors import PearError


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": "b", "prompt": "x" "completion": "y"}', "not valid JSON (Expecting ',' delimiter at column 27)"),
        ('{"id": "b", "prompt": "x", "completion": "y"', "not valid JSON (Expecting ',' delimiter at column 45)"),
        ('["b", "x", "y"]', "a JSON list, not an object; each line is one example"),
    ],
    ids=["missing-comma", "cut-short", "not-an-object"],
)
def test_a_malformed_jsonl_line_is_named_by_its_line_number(run_dir, tiny_model_dir, capsys, line, problem):
    path = run_dir / "train.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + line + "\n" + json.dumps(GOOD[1]) + "\n")
    expected = f"{path} line 2: {problem}" + ("; fix or delete the line" if "valid JSON" in problem else "")
    assert_refused(fit_args(run_dir, tiny_model_dir, path), capsys, run_dir, expected)


@pytest.mark.parametrize(
    ("change", "weighting", "problem"),
    [
        ({"prompt": 5}, "UniformSFT", "row 2 (id g1): `prompt` and `completion` must be strings, but `prompt` is int"),
        (
            {"messages": "hello", "prompt": None, "completion": None},
            "UniformSFT",
            "row 2 (id g1): `messages` must be a list of {'role': str, 'content': str}",
        ),
        (
            {"logprobs": -0.5},
            "TokenIS",
            "row 2 (id val-00001): `logprobs` must be a list of numbers, one per response token; found -0.5",
        ),
        (
            {"token_ids": [1.5, 2]},
            "TokenIS",
            "row 2 (id val-00001): `token_ids` must be a list of integers, one per response token; found [1.5, 2.0]",
        ),
    ],
    ids=["prompt-is-a-number", "messages-is-a-string", "logprobs-is-a-number", "token-ids-are-fractions"],
)
def test_a_column_of_the_wrong_type_is_named_with_its_row(run_dir, tiny_model_dir, capsys, change, weighting, problem):
    rows = demo_rows(4, "val") if weighting == "TokenIS" else [dict(r) for r in GOOD]
    rows[1].update(change)
    path = write_jsonl(run_dir / "train.jsonl", rows)
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", weighting)
    assert_refused(args, capsys, run_dir, f"{path} {problem}")


def test_numeric_and_mixed_ids_are_read_as_strings(run_dir):
    rows = [dict(r, id=i) for i, r in enumerate(demo_rows(4, "val"))]
    rows[2]["id"] = "two"  # a JSON reader makes a column of mixed types JSON-typed; it must still join
    data = PearDataModule(
        train_path=str(write_jsonl(run_dir / "train.jsonl", rows)),
        tokenizer_name_or_path=str(DEMO / "assets" / "student"),
    )
    data.setup("fit")
    assert sorted(data.datasets["train"]["id"]) == ["0", "1", "3", "two"]
    assert all(data.datasets["train"]["behavior_logp"])  # every example joined to its log-probs


@pytest.mark.parametrize("kind", ["empty-file", "blank-lines", "no-rows-parquet"])
def test_an_empty_dataset_is_refused(run_dir, tiny_model_dir, capsys, kind):
    if kind == "no-rows-parquet":
        path = run_dir / "train.parquet"
        Dataset.from_dict({"prompt": [], "completion": []}).to_parquet(path)
    else:
        path = run_dir / "train.jsonl"
        path.write_text("" if kind == "empty-file" else "\n  \n\n")
    expected = f"{path}: holds no examples; give at least one (JSON Lines: one JSON object per line)"
    assert_refused(fit_args(run_dir, tiny_model_dir, path), capsys, run_dir, expected)


DUPLICATE_IDS = (
    "1 ids name more than one example (first: val-00000); behaviour log-probs are matched to examples by id, so "
    "give every example its own `id` (an example without one is named by a hash of its content: remove exact repeats)"
)


def test_duplicate_ids_with_behaviour_logprobs_are_refused(run_dir, tiny_model_dir, capsys):
    rows = demo_rows(4, "val")
    rows[3]["id"] = rows[0]["id"]
    path = write_jsonl(run_dir / "train.jsonl", rows)
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenIS")
    assert_refused(args, capsys, run_dir, f"{path}: {DUPLICATE_IDS}")


def test_duplicate_ids_are_refused_before_a_cache_is_written(run_dir, tiny_model_dir, capsys):
    rows = [{k: v for k, v in r.items() if k not in ("token_ids", "logprobs")} for r in demo_rows(4, "val")]
    rows[3]["id"] = rows[0]["id"]
    path = write_jsonl(run_dir / "train.jsonl", rows)
    output = run_dir / "cache"
    args = ["cache_logprobs", *fit_args(run_dir, tiny_model_dir, path)[1:], "--output", str(output)]
    assert_refused(args, capsys, run_dir, f"{path}: {DUPLICATE_IDS}")
    assert not output.exists()


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


@pytest.mark.parametrize(
    ("weighting", "problem"),
    [
        (["TokenIS", "--model.weighting.gamma", "0"], "TokenIS: gamma must be in (0, 1], got 0.0"),
        (["TokenIS", "--model.weighting.gamma", "-0.5"], "TokenIS: gamma must be in (0, 1], got -0.5"),
        (["BlockIS", "--model.weighting.gamma", "1.5"], "BlockIS: gamma must be in (0, 1], got 1.5"),
        (["BlockIS", "--model.weighting.block_size", "0"], "BlockIS: block_size must be an integer >= 1, got 0"),
        (
            ["SequenceIS", "--model.weighting.log_ratio_clip", "[0.3, -0.08]"],
            "SequenceIS: log_ratio_clip must be (low, high) with low <= 0 <= high, got (0.3, -0.08)",
        ),
        (
            ["TokenIS", "--model.weighting.log_weight_clip", "[5.0, -10.0]"],
            "TokenIS: log_weight_clip must be (low, high) with low <= 0 <= high, got (5.0, -10.0)",
        ),
        (["TruncatedIS", "--model.weighting.cap", "0"], "TruncatedIS: cap must be > 0, got 0.0"),
        (["TokenIS", "--model.weighting.gama", "0.9"], "TokenIS: Option 'gama' is not accepted"),
        (
            ["TokenIS", "--model.weighting.gamma", "high"],
            "TokenIS: Parser key \"gamma\": Expected a <class 'float'>. Got value: high",
        ),
    ],
    ids=[
        "gamma-zero",
        "gamma-negative",
        "gamma-above-one",
        "block-size-zero",
        "log-ratio-clip-reversed",
        "log-weight-clip-reversed",
        "cap-zero",
        "misspelt-argument",
        "not-a-number",
    ],
)
def test_a_strategy_argument_out_of_range_is_one_error(run_dir, tiny_model_dir, capsys, weighting, problem):
    path = write_jsonl(run_dir / "train.jsonl", demo_rows(4, "val"))
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", *weighting)
    help_hint = f"(python -m pear_lightning fit --model.weighting.help {weighting[0]} lists its arguments)"
    assert_refused(args, capsys, run_dir, f"model.weighting: {problem} {help_hint}")
    assert not (run_dir / "runs").exists()  # refused while the config is read, before any folder is made


def test_a_data_setting_out_of_range_is_one_error(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = fit_args(run_dir, tiny_model_dir, path, "--data.batch_size", "0")
    assert_refused(args, capsys, run_dir, "data: batch_size must be >= 1 and max_length >= 2, got 0 and 64")


def test_a_value_of_the_wrong_type_is_one_error_line(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = fit_args(run_dir, tiny_model_dir, path, "--data.max_length", "long")
    assert_refused(args, capsys, run_dir, "Parser key \"data.max_length\": Expected a <class 'int'>. Got value: long")


@pytest.fixture
def broken_plugin(run_dir, monkeypatch):
    """A strategy plugin registered through an entry point whose module raises on import."""
    (run_dir / "broken_plugin.py").write_text("raise RuntimeError('this plugin is broken')\n")
    monkeypatch.syspath_prepend(str(run_dir))
    real = list(plugins.entry_points(group=plugins.GROUP))
    broken = EntryPoint("Broken", "broken_plugin:Broken", plugins.GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [*real, broken])
    return (
        "strategy plugin 'Broken' (broken_plugin:Broken, from unknown distribution) failed to import: "
        "RuntimeError: this plugin is broken"
    )


def test_a_plugin_that_raises_on_import_is_a_warning_until_it_is_used(broken_plugin, capsys):
    with pytest.warns(UserWarning, match=f"^{re.escape(broken_plugin)}; skipped"):
        code, _, _ = run_cli(["strategies"], capsys)
    assert code == 0


def test_a_plugin_that_raises_on_import_and_is_asked_for_is_one_error(run_dir, tiny_model_dir, capsys, broken_plugin):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "Broken")
    with pytest.warns(UserWarning, match="failed to import"):
        assert_refused(
            args,
            capsys,
            run_dir,
            f"model.weighting: {broken_plugin}; fix or reinstall that plugin, or use an installed strategy: "
            "BlockIS, DFT, SequenceIS, TokenIS, TruncatedIS, UniformSFT",
        )


def test_a_plugin_that_raises_on_import_is_one_error_in_strict_mode(
    run_dir, tiny_model_dir, capsys, broken_plugin, monkeypatch
):
    monkeypatch.setenv(plugins.STRICT_ENV, "1")
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    assert_refused(fit_args(run_dir, tiny_model_dir, path), capsys, run_dir, broken_plugin)


def spoil_model(model, how):
    """Break a copy of a model folder the way ``how`` says."""
    if how == "config-not-json":
        (model / "config.json").write_text("{not json")
    elif how == "weights-missing":
        (model / "model.safetensors").unlink()
    else:
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("no-such-folder", "model.model_name_or_path='{model}': no such folder"),
        (
            "config-not-json",
            "data.tokenizer_name_or_path='{model}': cannot load a tokenizer: It looks like the config file at "
            "'{model}/config.json' is not a valid JSON file.",
        ),
        ("weights-missing", "model.model_name_or_path='{model}': cannot load a causal LM: Error no file named "),
        ("weights-cut-short", "model.model_name_or_path='{model}': cannot load a causal LM: Error while deserializing"),
    ],
    ids=["no-such-folder", "config-not-json", "weights-missing", "weights-cut-short"],
)
def test_an_unreadable_model_folder_is_one_error(run_dir, tiny_model_dir, capsys, how, expected):
    model = run_dir / "model"
    if how != "no-such-folder":
        shutil.copytree(tiny_model_dir, model)
        spoil_model(model, how)
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    code, _, err = run_cli(fit_args(run_dir, model, path), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: " + expected.format(model=model))  # the rest is the library's own words
    assert not list(run_dir.glob("**/*.ckpt"))


def test_a_model_that_needs_trust_remote_code_is_refused_while_it_is_off(run_dir, tiny_model_dir, capsys):
    model = run_dir / "custom-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "custom"  # not a built-in architecture: only the folder's code can build it
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_x.py").write_text("raise RuntimeError('remote code ran')\n")
    (model / "modeling_x.py").write_text("raise RuntimeError('remote code ran')\n")
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    assert_refused(
        fit_args(run_dir, model, path),
        capsys,
        run_dir,
        f"model.model_name_or_path='{model}': a causal LM needs code from its folder or repository (auto_map in its "
        "config), and model.trust_remote_code is false; set it to true if you trust that code",
    )


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory, tokenizer):
    """A checkpoint of another model: a one-layer Llama where the tiny model has two."""
    root = tmp_path_factory.mktemp("other-model")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    module = PearModule(str(root / "model"))
    module.configure_model()
    path = root / "other.ckpt"
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": L.__version__}, path)
    return path


def another_model(model):
    return (
        f"the checkpoint was not made by this model and setup ({model}, lora=off): 9 weights missing, 0 unexpected, "
        "0 of another shape (first: ['model.model.layers.1.input_layernorm.weight', "
        "'model.model.layers.1.mlp.down_proj.weight', 'model.model.layers.1.mlp.gate_proj.weight']); "
        "resume with the config that made it"
    )


def test_resuming_from_a_checkpoint_of_another_model_is_refused(run_dir, tiny_model_dir, capsys, other_checkpoint):
    before = other_checkpoint.read_bytes()
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = fit_args(run_dir, tiny_model_dir, path, "--ckpt_path", str(other_checkpoint))
    assert_refused(args, capsys, run_dir, another_model(tiny_model_dir))
    assert other_checkpoint.read_bytes() == before


def test_exporting_a_checkpoint_of_another_model_writes_nothing(run_dir, tiny_model_dir, capsys, other_checkpoint):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    output = run_dir / "exported"
    args = ["export", *fit_args(run_dir, tiny_model_dir, path)[1:]]
    args += ["--checkpoint", str(other_checkpoint), "--output", str(output)]
    assert_refused(args, capsys, run_dir, another_model(tiny_model_dir))
    assert not output.exists() and not list(run_dir.glob(".exported*"))


def test_a_checkpoint_path_that_names_nothing_is_refused_before_anything_is_written(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    missing = run_dir / "runs" / "version_9" / "checkpoints" / "last.ckpt"
    assert_refused(
        fit_args(run_dir, tiny_model_dir, path, "--ckpt_path", str(missing)),
        capsys,
        run_dir,
        f"--ckpt_path {missing}: file not found; give a checkpoint written by fit (a .ckpt file, or the folder a "
        "sharded run writes), or `last` to resume from the newest one",
    )
    assert not (run_dir / "runs").exists()


def test_debug_shows_the_traceback_instead_of_one_line(run_dir, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored after the test: --debug sets it for the rest of the process
    path = write_jsonl(run_dir / "train.jsonl", demo_rows(4, "val"))
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenIS", "--model.weighting.gamma", "0")
    with pytest.raises(PearError, match=r"^model.weighting: TokenIS: gamma must be in \(0, 1\], got 0.0 "):
        main(["--debug", *args])


def test_an_unknown_weighting_is_one_error_naming_the_installed_ones(run_dir, tiny_model_dir, capsys):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    assert_refused(
        fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "TokenISS"),
        capsys,
        run_dir,
        "model.weighting: not a known weighting strategy (Expected a dot import path string: TokenISS). "
        "Installed strategies: BlockIS, DFT, SequenceIS, TokenIS, TruncatedIS, UniformSFT; give one of their names or a "
        "full class path (python -m pear_lightning fit --model.weighting.help NAME)",
    )


def test_a_data_path_that_does_not_exist_is_one_error(run_dir, tiny_model_dir, capsys):
    assert_refused(
        fit_args(run_dir, tiny_model_dir, "nowhere/train.jsonl"), capsys, run_dir, "nowhere/train.jsonl: file not found"
    )


def test_a_row_without_messages_or_prompt_is_named_by_file_and_row(run_dir, tiny_model_dir, capsys):
    bad = write_jsonl(
        run_dir / "bad.jsonl", [{"id": "ok", "prompt": "a", "completion": "b"}, {"id": "x7", "text": "c"}]
    )
    expected = f"{bad} row 2 (id x7): needs `messages` (chat) or `prompt` + `completion` (strings), or a prompt with its generator's `token_ids`; found fields ['id', 'text']"
    assert_refused(fit_args(run_dir, tiny_model_dir, bad), capsys, run_dir, expected)
